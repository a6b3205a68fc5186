//! Pushing: image store → registry. Blobs first (skipping what the
//! registry has), the manifest last, so a name never points at missing
//! content.

use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::errors::OciDistributionError;
use oci_spec::image::{DescriptorBuilder, ImageManifestBuilder, MediaType};
use strata_cas::{ContentStore, Digest, Sha256};
use strata_oci::{Artifact, Compression, Image, LayerRef, Reference, compressed};

use crate::error::{Error, Result, from_oci};
use crate::progress::Transfer;
use crate::pull::source_label;
use crate::registry::{Endpoint, Registry};

/// Blobs sent at once.
const PARALLEL_BLOBS: usize = 4;

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pushed {
    /// The manifest's digest in the registry.
    pub digest: String,
    /// Where it went (`HOST[:PORT]`).
    pub registry: String,
    /// Blobs uploaded.
    pub blobs_sent: usize,
    /// Blobs the registry had (or mounted from another repository).
    pub blobs_skipped: usize,
    /// Bytes of blobs uploaded.
    pub bytes_sent: u64,
    /// The manifest's size in bytes.
    pub size: u64,
}

/// A blob to send: its local digest, sha256 and size.
#[derive(Clone, Copy)]
struct Blob {
    local: Digest,
    sha256: Sha256,
    size: u64,
}

impl Blob {
    /// An image's config.
    fn config_of(image: &Image, cas: &ContentStore) -> Result<Blob> {
        Ok(Blob {
            local: image.config_blob,
            sha256: image.id,
            size: cas.info(&image.config_blob)?.map_or(0, |i| i.size),
        })
    }
}

impl Registry {
    /// Pushes `image` as `reference`, its layers compressed with
    /// `compression` (compressed forms are made once and kept).
    pub async fn push(
        &self,
        image: &Image,
        reference: &Reference,
        cas: &Arc<ContentStore>,
        compression: Compression,
        progress: &dyn Transfer,
    ) -> Result<Pushed> {
        self.push_image(image, reference, cas, compression, progress, false)
            .await
    }

    /// Pushes an image's blobs and manifest (as `reference`, or by digest).
    async fn push_image(
        &self,
        image: &Image,
        reference: &Reference,
        cas: &Arc<ContentStore>,
        compression: Compression,
        progress: &dyn Transfer,
        by_digest: bool,
    ) -> Result<Pushed> {
        self.push_manifest(
            Blob::config_of(image, cas)?,
            MediaType::ImageConfig,
            None,
            &image.layers,
            reference,
            cas,
            compression,
            progress,
            by_digest,
        )
        .await
    }

    /// Pushes `images` (one per platform) and, as `reference`, an image
    /// index listing them: each manifest by its digest first, the index
    /// last, so the name never points at a missing platform.
    pub async fn push_index(
        &self,
        images: &[Image],
        reference: &Reference,
        cas: &Arc<ContentStore>,
        compression: Compression,
        progress: &dyn Transfer,
    ) -> Result<Pushed> {
        let mut descriptors = Vec::new();
        let (mut blobs_sent, mut blobs_skipped, mut bytes_sent) = (0, 0, 0);
        for image in images {
            let pushed = self
                .push_image(image, reference, cas, compression, progress, true)
                .await?;
            blobs_sent += pushed.blobs_sent;
            blobs_skipped += pushed.blobs_skipped;
            bytes_sent += pushed.bytes_sent;
            descriptors.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": pushed.digest,
                "size": pushed.size,
                "platform": strata_oci::platform_of(image),
            }));
        }
        let body = strata_oci::image_index(descriptors)?;
        let digest = Sha256::of(&body).to_string();
        let ep = self.home(reference)?;
        let shown = reference.to_string();
        let content_type = "application/vnd.oci.image.index.v1+json"
            .parse()
            .map_err(|e| Error::Config(format!("bad content type: {e}")))?;
        ep.client
            .push_manifest_raw(&ep.oci, body.clone(), content_type)
            .await
            .map_err(|e| from_oci(e, &ep.host, ep.repository(), &shown))?;
        Ok(Pushed {
            digest,
            registry: ep.host.clone(),
            blobs_sent,
            blobs_skipped,
            bytes_sent,
            size: body.len() as u64,
        })
    }

    /// Pushes `artifact` as `reference`: its config stored as a blob of
    /// its media type, which the manifest also gives as its
    /// `artifactType`.
    pub async fn push_artifact(
        &self,
        artifact: &Artifact,
        reference: &Reference,
        cas: &Arc<ContentStore>,
        compression: Compression,
        progress: &dyn Transfer,
    ) -> Result<Pushed> {
        let local = cas.put(&artifact.config)?;
        let config = Blob {
            local,
            sha256: Sha256::of(&artifact.config),
            size: artifact.config.len() as u64,
        };
        let media = MediaType::Other(artifact.media_type.clone());
        self.push_manifest(
            config,
            media.clone(),
            Some(media),
            &artifact.layers,
            reference,
            cas,
            compression,
            progress,
            false,
        )
        .await
    }

    /// Pushes `layers` (compressed, skipping what the registry has), the
    /// config, then the manifest naming them: as `reference`, or by its
    /// digest in that repository when `by_digest`.
    #[allow(clippy::too_many_arguments)]
    async fn push_manifest(
        &self,
        config: Blob,
        config_type: MediaType,
        artifact_type: Option<MediaType>,
        layers: &[LayerRef],
        reference: &Reference,
        cas: &Arc<ContentStore>,
        compression: Compression,
        progress: &dyn Transfer,
        by_digest: bool,
    ) -> Result<Pushed> {
        let ep = self.home(reference)?;
        let shown = reference.to_string();
        let oci_err = |e| from_oci(e, &ep.host, ep.repository(), &shown);
        ep.client
            .auth(&ep.oci, &ep.auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(oci_err)?;

        // Each layer is compressed (once; the form is kept) and sent as
        // soon as it is ready, so uploads overlap the compression of the
        // layers after them.
        let (shown, ep) = (&shown, &ep);
        let layers: Vec<(Blob, Option<u64>)> = futures_util::stream::iter(layers.iter().copied())
            .map(|layer| {
                let cas = Arc::clone(cas);
                async move {
                    let blob = tokio::task::spawn_blocking({
                        let cas = Arc::clone(&cas);
                        move || compressed(&cas, &layer, compression)
                    })
                    .await
                    .map_err(|e| Error::Config(format!("compressing a layer stopped: {e}")))?
                    .map(|(local, sha256, size)| Blob {
                        local,
                        sha256,
                        size,
                    })?;
                    let sent = self.send_blob(ep, blob, &cas, shown, progress).await?;
                    Ok::<_, Error>((blob, sent))
                }
            })
            .buffered(PARALLEL_BLOBS)
            .try_collect()
            .await?;
        let config_sent = self.send_blob(ep, config, cas, shown, progress).await?;
        let sent: Vec<Option<u64>> = layers
            .iter()
            .map(|(_, s)| *s)
            .chain([config_sent])
            .collect();
        let layers: Vec<Blob> = layers.into_iter().map(|(b, _)| b).collect();

        let descriptor = |media: MediaType, b: &Blob| -> Result<oci_spec::image::Descriptor> {
            let digest: oci_spec::image::Sha256Digest = b
                .sha256
                .hex()
                .parse()
                .map_err(|e| Error::Config(format!("bad digest {}: {e}", b.sha256)))?;
            DescriptorBuilder::default()
                .media_type(media)
                .digest(digest)
                .size(b.size)
                .build()
                .map_err(|e| Error::Config(format!("cannot describe {}: {e}", b.sha256)))
        };
        let layer_type = match compression {
            Compression::None => MediaType::ImageLayer,
            Compression::Gzip => MediaType::ImageLayerGzip,
            Compression::Zstd => MediaType::ImageLayerZstd,
        };
        let mut manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(descriptor(config_type, &config)?)
            .layers(
                layers
                    .iter()
                    .map(|b| descriptor(layer_type.clone(), b))
                    .collect::<Result<Vec<_>>>()?,
            )
            .build()
            .map_err(|e| Error::Config(format!("cannot build the manifest: {e}")))?;
        manifest.set_artifact_type(artifact_type);
        let body = manifest
            .to_string()
            .map_err(|e| Error::Config(format!("cannot encode the manifest: {e}")))?
            .into_bytes();
        let digest = Sha256::of(&body).to_string();
        let content_type = "application/vnd.oci.image.manifest.v1+json"
            .parse()
            .map_err(|e| Error::Config(format!("bad content type: {e}")))?;
        let size = body.len() as u64;
        let target = if by_digest {
            ep.at_digest(&digest)
        } else {
            ep.oci.clone()
        };
        ep.client
            .push_manifest_raw(&target, body, content_type)
            .await
            .map_err(oci_err)?;
        let bytes_sent = sent.iter().flatten().sum();
        strata_metrics::transferred(strata_metrics::Transfer::Pushed, bytes_sent);
        Ok(Pushed {
            digest,
            registry: ep.host.clone(),
            blobs_sent: sent.iter().filter(|s| s.is_some()).count(),
            blobs_skipped: sent.iter().filter(|s| s.is_none()).count(),
            bytes_sent,
            size,
        })
    }

    /// Sends one blob unless the registry has it or can mount it from the
    /// repository it was pulled from; returns the bytes sent.
    async fn send_blob(
        &self,
        ep: &Endpoint,
        b: Blob,
        cas: &ContentStore,
        shown: &str,
        progress: &dyn Transfer,
    ) -> Result<Option<u64>> {
        let oci_err = |e| from_oci(e, &ep.host, ep.repository(), shown);
        let digest = b.sha256.to_string();
        if ep
            .client
            .blob_exists(&ep.oci, &digest)
            .await
            .map_err(oci_err)?
        {
            progress.finish(&digest, "already in the registry");
            return Ok(None);
        }
        if let Some(repo) = cas
            .info(&b.local)?
            .and_then(|i| i.labels.get(&source_label(&ep.host)).cloned())
            .filter(|r| r != ep.repository())
        {
            let from = oci_client::Reference::with_digest(
                ep.oci.registry().to_string(),
                repo,
                digest.clone(),
            );
            if ep.client.mount_blob(&ep.oci, &from, &digest).await.is_ok() {
                progress.finish(&digest, "mounted");
                return Ok(None);
            }
        }
        progress.start(&digest, Some(b.size));
        let bytes: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match cas.stored(&b.local)? {
            Some((_, strata_cas::Stored::Inline(bytes))) => Box::new(std::io::Cursor::new(bytes)),
            Some((_, strata_cas::Stored::File(path))) => Box::new(
                tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?,
            ),
            None => return Err(strata_cas::Error::NotFound(b.local).into()),
        };
        let id = digest.clone();
        let stream = tokio_util::io::ReaderStream::with_capacity(bytes, 1 << 20)
            .map(move |chunk| chunk.map_err(OciDistributionError::IoError));
        // The upload takes a 'static stream and the progress sink is
        // borrowed: the blob's bytes are reported when it is done.
        ep.client
            .push_blob_stream(&ep.oci, stream, &digest, Some(b.size))
            .await
            .map_err(oci_err)?;
        // Remembered like a pull's source: the next push of this blob to
        // another repository of the registry mounts it.
        cas.set_label(&b.local, &source_label(&ep.host), Some(ep.repository()))?;
        progress.advance(&id, b.size);
        progress.finish(&id, "pushed");
        Ok(Some(b.size))
    }
}
