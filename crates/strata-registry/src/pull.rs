//! Pulling: registry → content store → image store.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::BlobResponse;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use strata_cas::{ContentStore, Digest, Sha256};
use strata_oci::{
    Compression, Image, ImageConfig, ImageStore, LayerRef, Reference, compression_of,
    descriptor_sha256, record_compressed, select_manifest, store_layer,
};

use crate::error::{Error, Result, chain, from_oci};
use crate::progress::Transfer;
use crate::registry::{Endpoint, Registry};

/// Manifest media types strata reads: OCI and Docker, single and
/// multi-platform.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Layers fetched at once.
const PARALLEL_LAYERS: usize = 4;
/// Attempts at one blob before giving up.
const ATTEMPTS: u32 = 5;

/// The label naming where a pulled blob came from (`source.HOST` =
/// repository), so a push to the same registry can mount it.
pub(crate) fn source_label(host: &str) -> String {
    format!("source.{host}")
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The image, stored and named.
    pub image: Image,
    /// The registry's digest of the platform's manifest.
    pub digest: String,
    /// Where it came from (`HOST[:PORT]`).
    pub registry: String,
    /// Layers downloaded (the others were stored already).
    pub layers_downloaded: usize,
    /// Bytes downloaded.
    pub bytes: u64,
}

/// The platform to pull for.
#[derive(Debug, Clone, Copy)]
pub struct Platform<'a> {
    /// `linux`.
    pub os: &'a str,
    /// `amd64`, `arm64`, …
    pub architecture: &'a str,
    /// `v8`, `v7`, … when it matters.
    pub variant: Option<&'a str>,
}

struct Fetched {
    layer: LayerRef,
    downloaded: Option<u64>,
}

impl Registry {
    /// Pulls `reference` for `platform` into `images` and names it there
    /// `reference`. Docker Hub images try the mirrors first.
    pub async fn pull(
        &self,
        reference: &Reference,
        platform: Platform<'_>,
        images: &ImageStore,
        progress: &dyn Transfer,
    ) -> Result<Pulled> {
        let mut sources = self.sources(reference)?.into_iter().peekable();
        while let Some(ep) = sources.next() {
            match self
                .pull_from(&ep, reference, platform, images, progress)
                .await
            {
                Err(e) if ep.mirror && sources.peek().is_some() => {
                    tracing::info!(mirror = %ep.host, %reference, error = %e, "mirror cannot serve the image; trying the next source");
                }
                other => return other,
            }
        }
        Err(Error::Config(format!(
            "no registry to pull {reference} from"
        )))
    }

    async fn pull_from(
        &self,
        ep: &Endpoint,
        reference: &Reference,
        platform: Platform<'_>,
        images: &ImageStore,
        progress: &dyn Transfer,
    ) -> Result<Pulled> {
        let shown = reference.to_string();
        let oci_err = |e| from_oci(e, &ep.host, ep.repository(), &shown);
        let (raw, mut digest) = ep
            .client
            .pull_manifest_raw(&ep.oci, &ep.auth, MANIFEST_TYPES)
            .await
            .map_err(oci_err)?;
        if let Some(want) = &reference.digest {
            check_digest(&raw, want, &shown)?;
            digest = want.clone();
        }
        let format_err = |detail: String| Error::Format {
            reference: shown.clone(),
            detail,
        };
        let probe: serde_json::Value = serde_json::from_slice(&raw)
            .map_err(|e| format_err(format!("the manifest is not JSON: {e}")))?;
        let raw = if probe.get("manifests").is_some() {
            let index = ImageIndex::from_reader(raw.as_ref())
                .map_err(|e| format_err(format!("the image index is malformed: {e}")))?;
            let chosen = select_manifest(
                index.manifests(),
                platform.os,
                platform.architecture,
                platform.variant,
            )
            .ok_or_else(|| {
                let have: Vec<String> = index
                    .manifests()
                    .iter()
                    .filter_map(|d| d.platform().as_ref())
                    .map(|p| format!("{}/{}", p.os(), p.architecture()))
                    .collect();
                format_err(format!(
                    "no image for {}/{} (the index has {})",
                    platform.os,
                    platform.architecture,
                    have.join(", ")
                ))
            })?;
            digest = chosen.digest().to_string();
            let (raw, _) = ep
                .client
                .pull_manifest_raw(&ep.at_digest(&digest), &ep.auth, MANIFEST_TYPES)
                .await
                .map_err(oci_err)?;
            check_digest(&raw, &digest, &shown)?;
            raw
        } else {
            raw
        };
        let manifest = ImageManifest::from_reader(raw.as_ref())
            .map_err(|e| format_err(format!("the manifest is malformed: {e}")))?;

        let mut config_bytes = Vec::new();
        ep.client
            .pull_blob(
                &ep.oci,
                &oci_descriptor(manifest.config()),
                &mut config_bytes,
            )
            .await
            .map_err(oci_err)?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| format_err(format!("the image config is malformed: {e}")))?;
        if config.rootfs.diff_ids.len() != manifest.layers().len() {
            return Err(format_err(format!(
                "the manifest lists {} layers, its config {}",
                manifest.layers().len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let cas = Arc::clone(images.content());
        let fetched: Vec<Fetched> =
            futures_util::stream::iter(manifest.layers().iter().zip(&config.rootfs.diff_ids).map(
                |(desc, diff_id)| {
                    let cas = Arc::clone(&cas);
                    let (shown, format_err) = (&shown, &format_err);
                    async move {
                        let diff_id: Sha256 = diff_id.parse().map_err(|_| {
                            format_err(format!("diff_id {diff_id} is not a sha256 digest"))
                        })?;
                        self.layer(ep, desc, diff_id, cas, shown, progress).await
                    }
                },
            ))
            .buffered(PARALLEL_LAYERS)
            .try_collect()
            .await?;
        let layers: Vec<LayerRef> = fetched.iter().map(|f| f.layer).collect();
        let image = images.create_with_config_bytes(&config_bytes, &layers)?;
        images.tag(reference, &image)?;
        Ok(Pulled {
            image,
            digest,
            registry: ep.host.clone(),
            layers_downloaded: fetched.iter().filter(|f| f.downloaded.is_some()).count(),
            bytes: fetched.iter().filter_map(|f| f.downloaded).sum(),
        })
    }

    /// One layer, uncompressed in the store: found there by its diff_id,
    /// made from a stored compressed blob, or downloaded.
    async fn layer(
        &self,
        ep: &Endpoint,
        desc: &Descriptor,
        diff_id: Sha256,
        cas: Arc<ContentStore>,
        shown: &str,
        progress: &dyn Transfer,
    ) -> Result<Fetched> {
        let id = desc.digest().to_string();
        if let Some(blob) = cas.by_sha256(&diff_id)?
            && let Some(info) = cas.info(&blob)?
        {
            progress.finish(&id, "already stored");
            return Ok(Fetched {
                layer: LayerRef {
                    blob,
                    diff_id,
                    size: info.size,
                },
                downloaded: None,
            });
        }
        let media_type = desc.media_type().to_string();
        let compression = compression_of(&media_type).ok_or_else(|| Error::Format {
            reference: shown.to_string(),
            detail: format!(
                "layer {id} has media type {media_type}, which is not a layer strata can unpack"
            ),
        })?;
        let want = descriptor_sha256(desc)?;
        let (compressed, downloaded) = match cas.by_sha256(&want)? {
            Some(blob) => (blob, None),
            None => {
                let blob = self
                    .download(ep, desc, &want, &cas, shown, progress)
                    .await?;
                cas.set_label(&blob, &source_label(&ep.host), Some(ep.repository()))?;
                (blob, Some(desc.size()))
            }
        };
        let what = format!("{id} of {shown}");
        let layer = tokio::task::spawn_blocking(move || -> Result<LayerRef> {
            let reader = cas.open_blob(&compressed)?;
            let layer = store_layer(&cas, reader, &what)?;
            if layer.diff_id != diff_id {
                return Err(Error::Format {
                    reference: what,
                    detail: format!(
                        "the layer unpacks to {}, but the image config says {diff_id}",
                        layer.diff_id
                    ),
                });
            }
            if compression != Compression::None {
                record_compressed(&cas, &layer, compression, &compressed)?;
            }
            Ok(layer)
        })
        .await
        .map_err(|e| Error::Config(format!("unpacking {id} stopped: {e}")))??;
        progress.finish(
            &id,
            if downloaded.is_some() {
                "pulled"
            } else {
                "unpacked"
            },
        );
        Ok(Fetched { layer, downloaded })
    }

    /// Downloads a blob into the store, its sha256 checked as it streams;
    /// a broken transfer resumes where it stopped (or starts over when
    /// the registry ignores ranges), a few times, before giving up.
    async fn download(
        &self,
        ep: &Endpoint,
        desc: &Descriptor,
        want: &Sha256,
        cas: &ContentStore,
        shown: &str,
        progress: &dyn Transfer,
    ) -> Result<Digest> {
        let id = desc.digest().to_string();
        let oci_desc = oci_descriptor(desc);
        let store_err = |e: std::io::Error| {
            Error::Store(strata_oci::Error::Format(format!("storing {id}: {e}")))
        };
        progress.start(&id, Some(desc.size()));
        let mut w = cas.writer()?;
        let mut attempt = 1;
        loop {
            let offset = w.size();
            let response = if offset == 0 {
                ep.client
                    .pull_blob_stream(&ep.oci, &oci_desc)
                    .await
                    .map(BlobResponse::Full)
            } else {
                ep.client
                    .pull_blob_stream_partial(&ep.oci, &oci_desc, offset, None)
                    .await
            };
            let outcome = match response {
                Ok(BlobResponse::Partial(mut stream)) => {
                    copy_stream(&mut stream, &mut w, &id, progress)
                        .await
                        .map_err(|e| chain(&e))
                }
                Ok(BlobResponse::Full(mut stream)) => {
                    if offset > 0 {
                        // The registry sent the whole blob again.
                        w = cas.writer()?;
                    }
                    copy_stream(&mut stream, &mut w, &id, progress)
                        .await
                        .map_err(|e| chain(&e))
                }
                Err(e) => {
                    let e = from_oci(e, &ep.host, ep.repository(), shown);
                    if !matches!(e, Error::Registry { .. }) {
                        return Err(e);
                    }
                    Err(e.to_string())
                }
            };
            match outcome {
                Ok(()) if w.size() >= desc.size() => break,
                Ok(()) => {
                    if attempt >= ATTEMPTS {
                        return Err(Error::Registry {
                            registry: ep.host.clone(),
                            detail: format!(
                                "blob {id} ended after {} of {} bytes, {attempt} times",
                                w.size(),
                                desc.size()
                            ),
                        });
                    }
                }
                Err(detail) => {
                    if attempt >= ATTEMPTS {
                        return Err(Error::Registry {
                            registry: ep.host.clone(),
                            detail: format!(
                                "downloading blob {id} failed {attempt} times; last: {detail}"
                            ),
                        });
                    }
                    tracing::warn!(registry = %ep.host, blob = %id, at = w.size(), %detail, "download broke off; resuming");
                }
            }
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            attempt += 1;
        }
        w.flush().map_err(store_err)?;
        let got = w.sha256();
        if got != *want || w.size() != desc.size() {
            return Err(Error::Format {
                reference: shown.to_string(),
                detail: format!(
                    "blob {id} from {} is {} bytes hashing to {got}, not {} bytes as the manifest says",
                    ep.host,
                    w.size(),
                    desc.size()
                ),
            });
        }
        Ok(w.commit()?)
    }
}

/// Copies a blob stream into the writer, reporting progress; stops at the
/// first error, keeping what arrived.
async fn copy_stream(
    stream: &mut oci_client::client::SizedStream,
    w: &mut strata_cas::BlobWriter<'_>,
    id: &str,
    progress: &dyn Transfer,
) -> std::io::Result<()> {
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        w.write_all(&chunk)?;
        progress.advance(id, chunk.len() as u64);
    }
    Ok(())
}

fn check_digest(raw: &[u8], want: &str, shown: &str) -> Result<()> {
    let got = Sha256::of(raw).to_string();
    if got != want {
        return Err(Error::Format {
            reference: shown.to_string(),
            detail: format!("the registry sent a manifest hashing to {got}, not {want}"),
        });
    }
    Ok(())
}

/// oci-client's descriptor type for an oci-spec descriptor.
fn oci_descriptor(d: &Descriptor) -> oci_client::manifest::OciDescriptor {
    oci_client::manifest::OciDescriptor {
        media_type: d.media_type().to_string(),
        digest: d.digest().to_string(),
        size: i64::try_from(d.size()).unwrap_or(i64::MAX),
        ..Default::default()
    }
}
