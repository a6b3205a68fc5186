//! The cluster's images, read-only, over the OCI distribution API: what
//! `docker pull`, `skopeo copy` and a Kubernetes node's runtime speak. A
//! coordinator serves every image the cluster names (the tags builds
//! recorded in the replicated state), so an image built in the cluster is
//! pulled straight from it, with no push to a registry in between.
//!
//! A name in a request is read as Docker reads one: `app` is the cluster's
//! `docker.io/library/app`, `team/app` is `docker.io/team/app`, and
//! `registry.example.com/team/app` is itself. Manifests are OCI image
//! manifests of uncompressed layers (a layer's digest is its diff_id), the
//! same bytes a client storing the image writes; the config is served from
//! the replicated state, a layer from the coordinator's store, fetched
//! (and verified) from a worker holding it on first use.
//!
//! [`Catalog`] answers what a request names from the cluster's tags, with
//! no I/O; [`serve`] is the HTTP driver.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use strata_cas::Sha256;
use strata_oci::{LayerRef, Reference};
use strata_raft::ClusterImage;

use crate::error::{ImageError, LayerError};

/// The manifest media type served.
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// The media type blobs are served as.
const BLOB_TYPE: &str = "application/octet-stream";

/// Longest request path taken (the distribution spec bounds a name to
/// 255 characters; a reference or digest adds at most ~140).
const MAX_PATH: usize = 512;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/<name>/manifests/<reference>`
    Manifest {
        /// The repository name.
        name: String,
        /// A tag or a manifest digest.
        reference: String,
    },
    /// `GET /v2/<name>/blobs/<digest>`
    Blob {
        /// The repository name.
        name: String,
        /// The blob's digest (`sha256:…`).
        digest: String,
    },
    /// `GET /v2/<name>/tags/list`
    Tags {
        /// The repository name.
        name: String,
    },
}

impl Route {
    /// Reads the part of a path after `/v2/`; `None` for anything the API
    /// does not name.
    pub fn parse(rest: &str) -> Option<Route> {
        if rest.len() > MAX_PATH {
            return None;
        }
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Some(Route::Tags {
                name: name.to_string(),
            });
        }
        if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
            return Some(Route::Manifest {
                name: name.to_string(),
                reference: reference.to_string(),
            });
        }
        let (name, digest) = rest.rsplit_once("/blobs/")?;
        Some(Route::Blob {
            name: name.to_string(),
            digest: digest.to_string(),
        })
    }
}

/// Why a request has no answer, as the distribution API's error codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The name is not an image name, or the cluster names no image in it.
    NameUnknown(String),
    /// No such tag or manifest digest in the repository.
    ManifestUnknown(String),
    /// No such blob in the repository.
    BlobUnknown(String),
    /// Not a digest.
    DigestInvalid(String),
}

impl Refusal {
    fn code(&self) -> &'static str {
        match self {
            Refusal::NameUnknown(_) => "NAME_UNKNOWN",
            Refusal::ManifestUnknown(_) => "MANIFEST_UNKNOWN",
            Refusal::BlobUnknown(_) => "BLOB_UNKNOWN",
            Refusal::DigestInvalid(_) => "DIGEST_INVALID",
        }
    }

    fn message(&self) -> &str {
        match self {
            Refusal::NameUnknown(m)
            | Refusal::ManifestUnknown(m)
            | Refusal::BlobUnknown(m)
            | Refusal::DigestInvalid(m) => m,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Refusal::DigestInvalid(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::NOT_FOUND,
        }
    }
}

/// A blob a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobHit {
    /// An image config, whole.
    Config(Vec<u8>),
    /// A layer, on the workers.
    Layer(LayerRef),
}

/// The images the cluster names, as the distribution API looks them up.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    tags: Vec<(Reference, ClusterImage)>,
}

impl Catalog {
    /// The catalog of the cluster's tags (normalized names and their
    /// images); a name that does not read as a tag is left out.
    pub fn new(tags: Vec<(String, ClusterImage)>) -> Catalog {
        Catalog {
            tags: tags
                .into_iter()
                .filter_map(|(name, image)| Some((name.parse::<Reference>().ok()?, image)))
                .collect(),
        }
    }

    /// The images named in the repository `name` (as a request gives it),
    /// with their tags.
    fn repository(&self, name: &str) -> Result<Vec<(&str, &ClusterImage)>, Refusal> {
        let unknown = || Refusal::NameUnknown(format!("the cluster names no image {name}"));
        let wanted = name.parse::<Reference>().map_err(|_| unknown())?;
        if wanted.digest.is_some() || name.contains(':') || name.contains('@') {
            return Err(unknown());
        }
        let found: Vec<_> = self
            .tags
            .iter()
            .filter(|(r, _)| r.domain == wanted.domain && r.path == wanted.path)
            .filter_map(|(r, image)| Some((r.tag.as_deref()?, image)))
            .collect();
        if found.is_empty() {
            return Err(unknown());
        }
        Ok(found)
    }

    /// The manifest `reference` (a tag or `sha256:…`) names in `name`:
    /// its bytes and digest.
    pub fn manifest(&self, name: &str, reference: &str) -> Result<(Vec<u8>, Sha256), Refusal> {
        let images = self.repository(name)?;
        let unknown = || Refusal::ManifestUnknown(format!("{name} has no manifest {reference}"));
        let manifest = |image: &ClusterImage| {
            strata_oci::image_manifest(&image.config, &image.layers)
                .ok()
                .map(|bytes| {
                    let digest = Sha256::of(&bytes);
                    (bytes, digest)
                })
        };
        if reference.starts_with("sha256:") {
            let wanted = parse_digest(reference)?;
            return images
                .iter()
                .filter_map(|(_, image)| manifest(image))
                .find(|(_, d)| *d == wanted)
                .ok_or_else(unknown);
        }
        images
            .iter()
            .find(|(tag, _)| *tag == reference)
            .and_then(|(_, image)| manifest(image))
            .ok_or_else(unknown)
    }

    /// The blob `digest` names among the images of `name`.
    pub fn blob(&self, name: &str, digest: &str) -> Result<BlobHit, Refusal> {
        let images = self.repository(name)?;
        let wanted = parse_digest(digest)?;
        for (_, image) in &images {
            if Sha256::of(&image.config) == wanted {
                return Ok(BlobHit::Config(image.config.clone()));
            }
            if let Some(layer) = image.layers.iter().find(|l| l.diff_id == wanted) {
                return Ok(BlobHit::Layer(*layer));
            }
        }
        Err(Refusal::BlobUnknown(format!("{name} has no blob {digest}")))
    }

    /// The tags of `name`, sorted.
    pub fn tag_list(&self, name: &str) -> Result<Vec<String>, Refusal> {
        let mut tags: Vec<String> = self
            .repository(name)?
            .into_iter()
            .map(|(t, _)| t.to_string())
            .collect();
        tags.sort();
        tags.dedup();
        Ok(tags)
    }
}

fn parse_digest(s: &str) -> Result<Sha256, Refusal> {
    s.parse::<Sha256>()
        .map_err(|_| Refusal::DigestInvalid(format!("{s:?} is not a sha256 digest")))
}

/// A layer's bytes, as the endpoint streams them.
pub(crate) type Layer = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// What the endpoint serves: the images a cluster names, and their
/// layers (a coordinator's).
#[async_trait::async_trait]
pub(crate) trait Images: Send + Sync + 'static {
    /// Every named image, as of now.
    fn catalog(&self) -> Result<Catalog, ImageError>;

    /// Opens `layer`'s bytes, fetching them (verified) first if they are
    /// not here.
    async fn open_layer(&self, layer: &LayerRef) -> Result<Layer, LayerError>;
}

/// A running endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Serving {
    /// Where it listens (the port chosen when asked for port 0).
    pub addr: SocketAddr,
}

/// Serves `images` on `addr` in the background: plain HTTP
/// when `tls` is `None` (loopback only: the caller checks), else HTTPS.
pub(crate) async fn serve(
    images: Arc<dyn Images>,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<Serving, std::io::Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/v2/", get(base))
        .route("/v2/{*rest}", get(answer))
        .fallback(read_only)
        .with_state(images);
    strata_metrics::spawn_router(listener, local, tls, app, "images");
    tracing::info!(addr = %local, "serving the cluster's images (OCI distribution, read-only)");
    Ok(Serving { addr: local })
}

fn api_version(mut r: Response) -> Response {
    r.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    r
}

fn refused(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "errors": [{"code": code, "message": message, "detail": null}]
    });
    api_version((status, axum::Json(body)).into_response())
}

async fn base() -> Response {
    api_version((StatusCode::OK, axum::Json(serde_json::json!({}))).into_response())
}

async fn read_only(method: Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        return refused(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no such endpoint");
    }
    refused(
        StatusCode::METHOD_NOT_ALLOWED,
        "UNSUPPORTED",
        "the cluster's image endpoint is read-only: push with `strata build --push`",
    )
}

async fn answer(
    State(images): State<Arc<dyn Images>>,
    method: Method,
    Path(rest): Path<String>,
) -> Response {
    let Some(route) = Route::parse(&rest) else {
        return refused(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no such endpoint");
    };
    let catalog = match images.catalog() {
        Ok(c) => c,
        Err(e) => {
            return refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                &strata_registry::error_chain(&e),
            );
        }
    };
    let head = method == Method::HEAD;
    let answered = match route {
        Route::Manifest { name, reference } => {
            catalog.manifest(&name, &reference).map(|(bytes, digest)| {
                let size = bytes.len() as u64;
                content(MANIFEST_TYPE, &digest.to_string(), size, head, bytes.into())
            })
        }
        Route::Tags { name } => catalog.tag_list(&name).map(|tags| {
            axum::Json(serde_json::json!({"name": name, "tags": tags})).into_response()
        }),
        Route::Blob { name, digest } => match catalog.blob(&name, &digest) {
            Err(e) => Err(e),
            Ok(BlobHit::Config(bytes)) => {
                let size = bytes.len() as u64;
                Ok(content(BLOB_TYPE, &digest, size, head, bytes.into()))
            }
            Ok(BlobHit::Layer(layer)) if head => {
                Ok(content(BLOB_TYPE, &digest, layer.size, true, Body::empty()))
            }
            Ok(BlobHit::Layer(layer)) => match images.open_layer(&layer).await {
                Ok(bytes) => {
                    let stream = tokio_util::io::ReaderStream::with_capacity(bytes, 1 << 20);
                    let body = Body::from_stream(stream);
                    Ok(content(BLOB_TYPE, &digest, layer.size, false, body))
                }
                Err(e) => {
                    let e = strata_registry::error_chain(&e);
                    tracing::warn!(layer = %layer.blob, error = %e, "cannot serve a layer");
                    return refused(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", &e);
                }
            },
        },
    };
    match answered {
        Ok(r) => api_version(r),
        Err(e) => refused(e.status(), e.code(), e.message()),
    }
}

/// A manifest or blob of `size` bytes named `digest`: its headers, and
/// `body` unless the request was a `HEAD`.
fn content(media_type: &str, digest: &str, size: u64, head: bool, body: Body) -> Response {
    let headers = [
        (header::CONTENT_TYPE, media_type.to_string()),
        (header::CONTENT_LENGTH, size.to_string()),
        (
            header::HeaderName::from_static("docker-content-digest"),
            digest.to_string(),
        ),
    ];
    if head {
        (headers, Body::empty()).into_response()
    } else {
        (headers, body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(config: &[u8], layer: u8) -> ClusterImage {
        let bytes = [layer; 4];
        ClusterImage {
            config: config.to_vec(),
            layers: vec![LayerRef {
                blob: strata_cas::Digest::of(&bytes),
                diff_id: Sha256::of(&bytes),
                size: 4,
            }],
            tagged: 0,
        }
    }

    fn catalog() -> Catalog {
        Catalog::new(vec![
            ("docker.io/library/app:1".into(), image(b"{\"a\":1}", 1)),
            ("docker.io/library/app:2".into(), image(b"{\"a\":2}", 2)),
            ("docker.io/team/app:1".into(), image(b"{\"t\":1}", 3)),
            (
                "registry.example.com/team/app:1".into(),
                image(b"{\"r\":1}", 4),
            ),
        ])
    }

    #[test]
    fn paths_split_at_the_last_api_part() {
        assert_eq!(
            Route::parse("team/app/manifests/1"),
            Some(Route::Manifest {
                name: "team/app".into(),
                reference: "1".into()
            })
        );
        assert_eq!(
            Route::parse("a/blobs/uploads/blobs/sha256:00"),
            Some(Route::Blob {
                name: "a/blobs/uploads".into(),
                digest: "sha256:00".into()
            })
        );
        assert_eq!(
            Route::parse("app/tags/list"),
            Some(Route::Tags { name: "app".into() })
        );
        assert_eq!(Route::parse("app/blobs"), None);
        assert_eq!(Route::parse(&"a/".repeat(400)), None);
    }

    #[test]
    fn names_read_as_docker_reads_them() {
        let c = catalog();
        let (one, _) = c.manifest("app", "1").unwrap();
        assert_eq!(c.manifest("library/app", "1").unwrap().0, one);
        assert_eq!(c.manifest("docker.io/library/app", "1").unwrap().0, one);
        assert_ne!(c.manifest("team/app", "1").unwrap().0, one);
        assert_ne!(
            c.manifest("registry.example.com/team/app", "1").unwrap().0,
            one
        );
        assert_eq!(c.tag_list("app").unwrap(), vec!["1", "2"]);
        assert!(matches!(
            c.manifest("other", "1"),
            Err(Refusal::NameUnknown(_))
        ));
        assert!(matches!(
            c.manifest("app", "3"),
            Err(Refusal::ManifestUnknown(_))
        ));
        assert!(matches!(
            c.manifest("app:1", "1"),
            Err(Refusal::NameUnknown(_))
        ));
    }

    #[test]
    fn a_manifest_is_found_by_its_digest_and_names_its_blobs() {
        let c = catalog();
        let (bytes, digest) = c.manifest("app", "2").unwrap();
        let by_digest = c.manifest("app", &digest.to_string()).unwrap();
        assert_eq!(by_digest.0, bytes);
        // Not in another repository.
        assert!(c.manifest("team/app", &digest.to_string()).is_err());
        let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let config = manifest["config"]["digest"].as_str().unwrap();
        assert_eq!(
            c.blob("app", config).unwrap(),
            BlobHit::Config(b"{\"a\":2}".to_vec())
        );
        let layer = manifest["layers"][0]["digest"].as_str().unwrap();
        assert!(matches!(c.blob("app", layer), Ok(BlobHit::Layer(l)) if l.size == 4));
        assert!(matches!(
            c.blob("team/app", layer),
            Err(Refusal::BlobUnknown(_))
        ));
        assert!(matches!(
            c.blob("app", "sha256:zz"),
            Err(Refusal::DigestInvalid(_))
        ));
    }
}
