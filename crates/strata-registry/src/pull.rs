//! Pulling: registry → content store → image store.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::BlobResponse;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use strata_cas::{ContentStore, Digest, Sha256};
use strata_oci::{
    Artifact, Compression, Image, ImageConfig, ImageStore, LayerRef, MAX_METADATA_BYTES, Reference,
    check_layer_count, compression_of, descriptor_sha256, record_compressed, select_manifest,
    store_layer, stored_layer,
};

use crate::error::{Error, Result, error_chain, from_oci};
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
const ATTEMPTS: usize = 5;

/// The waits between attempts at one blob: exponential from half a
/// second, jittered so that layers broken off together (one dropped
/// connection) do not come back together.
fn retry_delays() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(8))
        .with_max_times(ATTEMPTS - 1)
        .with_jitter()
        .build()
}

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
        let format_err = |detail: String| Error::Format {
            reference: shown.clone(),
            detail,
        };
        let (manifest, digest) = self.manifest(ep, reference, Some(platform)).await?;
        let config_bytes = self.config(ep, &manifest, &shown).await?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| format_err(format!("the image config is malformed: {e}")))?;
        let diff_ids = config
            .rootfs
            .diff_ids
            .iter()
            .map(|d| {
                d.parse()
                    .map_err(|_| format_err(format!("diff_id {d} is not a sha256 digest")))
            })
            .collect::<Result<Vec<Sha256>>>()?;
        let cas = Arc::clone(images.content());
        let fetched = self
            .layers(ep, &manifest, &diff_ids, &cas, &shown, progress)
            .await?;
        let layers: Vec<LayerRef> = fetched.iter().map(|f| f.layer).collect();
        let image = images.create_with_config_bytes(&config_bytes, &layers)?;
        images.tag(reference, &image)?;
        let bytes = fetched.iter().filter_map(|f| f.downloaded).sum();
        strata_metrics::transferred(strata_metrics::Transfer::Pulled, bytes);
        Ok(Pulled {
            image,
            digest,
            registry: ep.host.clone(),
            layers_downloaded: fetched.iter().filter(|f| f.downloaded.is_some()).count(),
            bytes,
        })
    }

    /// Pulls the artifact `reference` into `cas`: its config must have
    /// media type `media_type`, and `diff_ids` reads from it what each
    /// layer unpacks to. Every blob is checked against its digest and
    /// every layer against its diff_id; layers stored already are not
    /// downloaded. Returns the artifact and the bytes downloaded.
    pub async fn pull_artifact(
        &self,
        reference: &Reference,
        media_type: &str,
        cas: &Arc<ContentStore>,
        progress: &dyn Transfer,
        diff_ids: impl FnOnce(&[u8]) -> std::result::Result<Vec<Sha256>, String>,
    ) -> Result<(Artifact, u64)> {
        let ep = self.home(reference)?;
        let shown = reference.to_string();
        let format_err = |detail: String| Error::Format {
            reference: shown.clone(),
            detail,
        };
        let (manifest, _) = self.manifest(&ep, reference, None).await?;
        let have = manifest.config().media_type().to_string();
        if have != media_type {
            return Err(format_err(format!("it is {have}, not {media_type}")));
        }
        let config = self.config(&ep, &manifest, &shown).await?;
        let want = diff_ids(&config).map_err(format_err)?;
        let fetched = self
            .layers(&ep, &manifest, &want, cas, &shown, progress)
            .await?;
        let bytes = fetched.iter().filter_map(|f| f.downloaded).sum();
        strata_metrics::transferred(strata_metrics::Transfer::Pulled, bytes);
        Ok((
            Artifact {
                config,
                media_type: have,
                layers: fetched.iter().map(|f| f.layer).collect(),
            },
            bytes,
        ))
    }

    /// The manifest `reference` names, checked against the digest the
    /// reference gives; with a `platform`, an index is resolved to that
    /// platform's manifest. Returns it and its digest.
    async fn manifest(
        &self,
        ep: &Endpoint,
        reference: &Reference,
        platform: Option<Platform<'_>>,
    ) -> Result<(ImageManifest, String)> {
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
        if raw.len() as u64 > MAX_METADATA_BYTES {
            return Err(format_err(format!(
                "the manifest is larger than {} MiB",
                MAX_METADATA_BYTES >> 20
            )));
        }
        let probe: serde_json::Value = serde_json::from_slice(&raw)
            .map_err(|e| format_err(format!("the manifest is not JSON: {e}")))?;
        let raw = match (probe.get("manifests").is_some(), platform) {
            (true, Some(platform)) => {
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
            }
            (true, None) => {
                return Err(format_err(
                    "it is an image index, not a single manifest".to_string(),
                ));
            }
            (false, _) => raw,
        };
        let manifest = ImageManifest::from_reader(raw.as_ref())
            .map_err(|e| format_err(format!("the manifest is malformed: {e}")))?;
        Ok((manifest, digest))
    }

    /// The config blob of `manifest`, bounded in size and checked against
    /// its digest.
    async fn config(
        &self,
        ep: &Endpoint,
        manifest: &ImageManifest,
        shown: &str,
    ) -> Result<Vec<u8>> {
        let desc = manifest.config();
        let format_err = |detail: String| Error::Format {
            reference: shown.to_string(),
            detail,
        };
        if desc.size() > MAX_METADATA_BYTES {
            return Err(format_err(format!(
                "its config is {} bytes, more than {} MiB",
                desc.size(),
                MAX_METADATA_BYTES >> 20
            )));
        }
        let want = descriptor_sha256(desc)?;
        let mut bytes = Vec::new();
        ep.client
            .pull_blob(&ep.oci, &oci_descriptor(desc), &mut bytes)
            .await
            .map_err(|e| from_oci(e, &ep.host, ep.repository(), shown))?;
        let got = Sha256::of(&bytes);
        if got != want {
            return Err(format_err(format!(
                "its config hashes to {got}, not {want} as the manifest says"
            )));
        }
        Ok(bytes)
    }

    /// The layers of `manifest`, each unpacking to its diff_id, in the
    /// store.
    async fn layers(
        &self,
        ep: &Endpoint,
        manifest: &ImageManifest,
        diff_ids: &[Sha256],
        cas: &Arc<ContentStore>,
        shown: &str,
        progress: &dyn Transfer,
    ) -> Result<Vec<Fetched>> {
        check_layer_count(manifest, diff_ids).map_err(|e| Error::Format {
            reference: shown.to_string(),
            detail: e.to_string(),
        })?;
        // The futures are made first (none starts until polled), not in a
        // closure the stream calls: a future built in a closure over
        // borrowed arguments is not provably `Send`, and a pull runs in
        // spawned tasks (a coordinator plans builds in one).
        let mut fetches = Vec::with_capacity(diff_ids.len());
        for (desc, diff_id) in manifest.layers().iter().zip(diff_ids) {
            fetches.push(self.layer(ep, desc, *diff_id, Arc::clone(cas), shown, progress));
        }
        futures_util::stream::iter(fetches)
            .buffered(PARALLEL_LAYERS)
            .try_collect()
            .await
    }

    /// One layer, uncompressed in the store: found there by its diff_id,
    /// made from a stored compressed blob, or downloaded (and unpacked as
    /// it arrives).
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
        if let Some(layer) = stored_layer(&cas, &diff_id)? {
            progress.finish(&id, "already stored");
            return Ok(Fetched {
                layer,
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
        let what = format!("{id} of {shown}");
        let (compressed, layer, downloaded) = match cas.by_sha256(&want)? {
            Some(compressed) => {
                let cas = Arc::clone(&cas);
                let layer = tokio::task::spawn_blocking(move || -> Result<LayerRef> {
                    let reader = cas.open_blob(&compressed)?;
                    Ok(store_layer(&cas, reader, &what, Some(&diff_id))?)
                })
                .await
                .map_err(|e| Error::Config(format!("unpacking {id} stopped: {e}")))??;
                (compressed, layer, None)
            }
            None => {
                let (compressed, layer) = self
                    .download(ep, desc, &want, diff_id, &cas, shown, progress)
                    .await?;
                cas.set_label(&compressed, &source_label(&ep.host), Some(ep.repository()))?;
                (compressed, layer, Some(desc.size()))
            }
        };
        if compression != Compression::None {
            record_compressed(&cas, &layer, compression, &compressed)?;
        }
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

    /// Downloads a layer blob into the store and unpacks it on the way:
    /// each chunk goes to the compressed blob (its sha256 checked at the
    /// end) and to an [`Unpacker`]. A broken transfer resumes where it
    /// stopped (or starts over when the registry ignores ranges), a few
    /// times, before giving up. Nothing is stored unless both digests
    /// match.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        ep: &Endpoint,
        desc: &Descriptor,
        want: &Sha256,
        diff_id: Sha256,
        cas: &Arc<ContentStore>,
        shown: &str,
        progress: &dyn Transfer,
    ) -> Result<(Digest, LayerRef)> {
        let id = desc.digest().to_string();
        let what = format!("{id} of {shown}");
        let oci_desc = oci_descriptor(desc);
        let store_err = |e: std::io::Error| {
            Error::Store(strata_oci::Error::Format(format!("storing {id}: {e}")))
        };
        progress.start(&id, Some(desc.size()));
        let mut w = cas.writer()?;
        let mut unpacker = Unpacker::start(Arc::clone(cas), what.clone(), diff_id);
        let mut attempt = 1;
        let mut delays = retry_delays();
        loop {
            // Always a range request, from where the blob stands: a
            // resumed download continues, and a first one (from 0) is not
            // hashed a second time by oci-client (`w` checks the sha256).
            let offset = w.size();
            let response = ep
                .client
                .pull_blob_stream_partial(&ep.oci, &oci_desc, offset, None)
                .await;
            let outcome = match response {
                Ok(BlobResponse::Partial(mut stream)) => {
                    copy_stream(&mut stream, &mut w, &mut unpacker, &id, progress).await
                }
                Ok(BlobResponse::Full(mut stream)) => {
                    if offset > 0 {
                        // The registry sent the whole blob again: so does
                        // the unpacker get it.
                        w = cas.writer()?;
                        unpacker.abort();
                        unpacker = Unpacker::start(Arc::clone(cas), what.clone(), diff_id);
                    }
                    copy_stream(&mut stream, &mut w, &mut unpacker, &id, progress).await
                }
                Err(e) => {
                    let e = from_oci(e, &ep.host, ep.repository(), shown);
                    if !matches!(e, Error::Registry { .. }) {
                        unpacker.abort();
                        return Err(e);
                    }
                    Err(e.to_string())
                }
            };
            if outcome.as_ref().is_err_and(|e| e == UNPACKER_STOPPED) {
                return Err(unpacker
                    .finish()
                    .await
                    .err()
                    .unwrap_or_else(|| Error::Format {
                        reference: shown.to_string(),
                        detail: format!("layer {id} could not be unpacked"),
                    }));
            }
            let failure = match outcome {
                Ok(()) if w.size() >= desc.size() => break,
                Ok(()) => format!("the blob ended after {} of {} bytes", w.size(), desc.size()),
                Err(detail) => detail,
            };
            let Some(delay) = delays.next() else {
                unpacker.abort();
                return Err(Error::Registry {
                    registry: ep.host.clone(),
                    detail: format!(
                        "downloading blob {id} failed {attempt} times; last: {failure}"
                    ),
                });
            };
            tracing::warn!(registry = %ep.host, blob = %id, at = w.size(), detail = %failure, ?delay, "download broke off; resuming");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
        w.flush().map_err(store_err)?;
        let got = w.sha256();
        if got != *want || w.size() != desc.size() {
            unpacker.abort();
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
        let layer = unpacker.finish().await?;
        Ok((w.commit()?, layer))
    }
}

/// Unpacks a layer while it downloads: a thread reads the compressed
/// bytes from a channel and stores the layer uncompressed
/// ([`store_layer`], which inflates and hashes on two more threads), so
/// unpacking a large layer overlaps its download instead of following it.
struct Unpacker {
    tx: Option<tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>>,
    done: Option<tokio::sync::oneshot::Receiver<Result<LayerRef>>>,
}

impl Unpacker {
    fn start(cas: Arc<ContentStore>, what: String, diff_id: Sha256) -> Unpacker {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let reader = ChannelReader {
                rx,
                chunk: bytes::Bytes::new(),
            };
            let _ =
                done_tx.send(store_layer(&cas, reader, &what, Some(&diff_id)).map_err(Error::from));
        });
        Unpacker {
            tx: Some(tx),
            done: Some(done),
        }
    }

    /// Hands the unpacker the next chunk; false when it has stopped (its
    /// error comes from [`Unpacker::finish`]).
    async fn feed(&self, chunk: bytes::Bytes) -> bool {
        match &self.tx {
            Some(tx) => tx.send(Ok(chunk)).await.is_ok(),
            None => false,
        }
    }

    /// Stops it without storing anything.
    fn abort(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(Err(std::io::Error::other("download abandoned")));
        }
        self.done = None;
    }

    /// The end of the stream: the unpacked layer.
    async fn finish(mut self) -> Result<LayerRef> {
        drop(self.tx.take());
        match self.done.take() {
            Some(done) => done
                .await
                .map_err(|_| Error::Config("the layer unpacker stopped".to_string()))?,
            None => Err(Error::Config("the layer unpacker was stopped".to_string())),
        }
    }
}

impl Drop for Unpacker {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Reads what the download sends; an error item ends the layer with it.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(next)) => self.chunk = next,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

/// Copies a blob stream into the writer and the unpacker, reporting
/// progress; stops at the first error, keeping what arrived.
async fn copy_stream(
    stream: &mut oci_client::client::SizedStream,
    w: &mut strata_cas::BlobWriter<'_>,
    unpacker: &mut Unpacker,
    id: &str,
    progress: &dyn Transfer,
) -> std::result::Result<(), String> {
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| error_chain(&e))?;
        w.write_all(&chunk).map_err(|e| error_chain(&e))?;
        progress.advance(id, chunk.len() as u64);
        if !unpacker.feed(chunk).await {
            return Err(UNPACKER_STOPPED.to_string());
        }
    }
    Ok(())
}

/// What [`copy_stream`] says when the unpacker gave up: no retry helps,
/// the unpacker's own error says why.
const UNPACKER_STOPPED: &str = "the layer unpacker stopped";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_tried_a_bounded_number_of_times_with_growing_waits() {
        let delays: Vec<Duration> = retry_delays().collect();
        assert_eq!(delays.len(), ATTEMPTS - 1);
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(16)),
            "{delays:?}"
        );
        assert!(delays[0] >= Duration::from_millis(500), "{delays:?}");
    }
}
