//! The local image store: names to manifests, manifests and configs as
//! blobs in the content store.
//!
//! Images in the store always list their layers uncompressed
//! (`application/vnd.oci.image.layer.v1.tar`), so a layer's manifest digest
//! is its diff_id and its bytes are the blob the snapshotter extracts.
//! Compression happens on export.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use oci_spec::image::{Descriptor, ImageManifest, ImageManifestBuilder, MediaType, Sha256Digest};
use serde::{Deserialize, Serialize};
use strata_cas::{ContentStore, Digest, MetaDb, Sha256, now_unix};

use crate::config::ImageConfig;
use crate::error::{Error, Result};
use crate::reference::Reference;

const CF_IMAGES: &str = "images";

/// One layer of an image as the store knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerRef {
    /// The uncompressed tar's blob.
    pub blob: Digest,
    /// Its sha256 (the OCI `diff_id`).
    pub diff_id: Sha256,
    /// Its size in bytes.
    pub size: u64,
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// The manifest blob.
    pub manifest_blob: Digest,
    /// The manifest's sha256: the image's content address.
    pub manifest_digest: Sha256,
    /// The config blob.
    pub config_blob: Digest,
    /// The config's sha256: the image ID.
    pub id: Sha256,
    /// The parsed config.
    pub config: ImageConfig,
    /// The layers, bottom first.
    pub layers: Vec<LayerRef>,
}

impl Image {
    /// The image of `config_json` and `layers` as a store holding it
    /// names it (IDs, digests, blobs), and its manifest's bytes, with
    /// nothing stored: an image that lives elsewhere (a cluster's).
    pub fn described(config_json: &[u8], layers: &[LayerRef]) -> Result<(Image, Vec<u8>)> {
        let config: ImageConfig = serde_json::from_slice(config_json)
            .map_err(|e| Error::Format(format!("image config is not valid JSON: {e}")))?;
        let bytes = image_manifest(config_json, layers)?;
        let image = Image {
            manifest_blob: Digest::of(&bytes),
            manifest_digest: Sha256::of(&bytes),
            config_blob: Digest::of(config_json),
            id: Sha256::of(config_json),
            config,
            layers: layers.to_vec(),
        };
        Ok((image, bytes))
    }

    /// Total uncompressed size of the layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// The layer blobs, bottom first.
    pub fn layer_blobs(&self) -> Vec<Digest> {
        self.layers.iter().map(|l| l.blob).collect()
    }

    /// Every blob the image keeps: manifest, config, layers.
    pub fn blobs(&self) -> impl Iterator<Item = Digest> + Clone + '_ {
        [self.manifest_blob, self.config_blob]
            .into_iter()
            .chain(self.layers.iter().map(|l| l.blob))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct TagRecord {
    manifest: Digest,
    created: u64,
}

/// A name in the store and the image it points at.
#[derive(Debug, Clone)]
pub struct Tagged {
    /// The name.
    pub reference: Reference,
    /// When the name was last pointed at this image (seconds since the epoch).
    pub created: u64,
    /// The image.
    pub image: Image,
}

/// Names → images, on top of the content store.
pub struct ImageStore {
    meta: Arc<MetaDb>,
    cas: Arc<ContentStore>,
    /// Images read from their manifests, by manifest blob: a manifest's
    /// bytes never change, so neither does the image they describe (at
    /// most [`LOADED_KEPT`]).
    loaded: Mutex<HashMap<Digest, Image>>,
}

/// Images [`ImageStore::load`] keeps read: a node's base images and the
/// images it builds, with room to spare.
const LOADED_KEPT: usize = 256;

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

fn sha256_to_oci(s: &Sha256) -> Result<Sha256Digest> {
    s.hex()
        .parse()
        .map_err(|e| Error::Format(format!("bad digest {s}: {e}")))
}

impl ImageStore {
    /// The column families the store keeps its names in.
    pub const COLUMN_FAMILIES: &'static [&'static str] = &[CF_IMAGES];

    /// The store over `cas`, its names in `meta`, which must have been
    /// opened with [`ImageStore::COLUMN_FAMILIES`].
    pub fn open(meta: Arc<MetaDb>, cas: Arc<ContentStore>) -> Result<ImageStore> {
        meta.require(Self::COLUMN_FAMILIES)?;
        Ok(ImageStore {
            meta,
            cas,
            loaded: Mutex::default(),
        })
    }

    fn names(&self) -> &rocksdb::ColumnFamily {
        self.meta.cf(CF_IMAGES)
    }

    /// The content store behind the images.
    pub fn content(&self) -> &Arc<ContentStore> {
        &self.cas
    }

    fn db_err(&self) -> impl FnOnce(rocksdb::Error) -> Error + '_ {
        move |source| Error::Db {
            path: self.meta.path().to_path_buf(),
            source,
        }
    }

    /// Stores a config and a manifest listing `layers` (already in the
    /// content store) and returns the image. Nothing is named yet.
    pub fn create(&self, config: &ImageConfig, layers: &[LayerRef]) -> Result<Image> {
        self.create_with_config_bytes(&config.to_json(), layers)
    }

    /// Like [`ImageStore::create`] with the config's exact bytes, so an
    /// imported image keeps its ID.
    pub fn create_with_config_bytes(
        &self,
        config_json: &[u8],
        layers: &[LayerRef],
    ) -> Result<Image> {
        let (image, bytes) = Image::described(config_json, layers)?;
        let config_blob = self.cas.put(config_json)?;
        let manifest_blob = self.cas.put(&bytes)?;
        // The manifest keeps its config and layers alive for collectors.
        self.cas
            .set_label(&manifest_blob, "ref.config", Some(&config_blob.to_string()))?;
        for (i, l) in layers.iter().enumerate() {
            self.cas.set_label(
                &manifest_blob,
                &format!("ref.layer.{i}"),
                Some(&l.blob.to_string()),
            )?;
        }
        Ok(image)
    }

    /// Reads an image from its manifest blob. One read before is taken
    /// again while every blob it names is still stored (a build reads its
    /// base images each time; parsing their manifests and configs was a
    /// tenth of a build with nothing to do).
    pub fn load(&self, manifest_blob: &Digest) -> Result<Image> {
        let known = self
            .loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(manifest_blob)
            .cloned();
        if let Some(image) = known {
            let blobs: Vec<Digest> = image.blobs().collect();
            if self.cas.absent(&blobs)?.is_empty() {
                return Ok(image);
            }
        }
        let image = self.read(manifest_blob)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if loaded.len() >= LOADED_KEPT {
            loaded.clear();
        }
        loaded.insert(*manifest_blob, image.clone());
        Ok(image)
    }

    /// Reads an image from its manifest blob, its config and layers found
    /// by their sha256.
    fn read(&self, manifest_blob: &Digest) -> Result<Image> {
        let bytes = self.cas.read(manifest_blob)?;
        let manifest = ImageManifest::from_reader(bytes.as_slice())
            .map_err(|e| Error::Format(format!("manifest {manifest_blob} is malformed: {e}")))?;
        let config_sha = descriptor_sha256(manifest.config())?;
        let config_blob = self.cas.by_sha256(&config_sha)?.ok_or_else(|| {
            Error::Format(format!(
                "config {config_sha} of manifest {manifest_blob} is missing"
            ))
        })?;
        let config_bytes = self.cas.read(&config_blob)?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| Error::Format(format!("config {config_sha} is malformed: {e}")))?;
        let mut layers = Vec::with_capacity(manifest.layers().len());
        for d in manifest.layers() {
            let diff_id = descriptor_sha256(d)?;
            let blob = self.cas.by_sha256(&diff_id)?.ok_or_else(|| {
                Error::Format(format!(
                    "layer {diff_id} of manifest {manifest_blob} is missing"
                ))
            })?;
            layers.push(LayerRef {
                blob,
                diff_id,
                size: d.size(),
            });
        }
        Ok(Image {
            manifest_blob: *manifest_blob,
            manifest_digest: Sha256::of(&bytes),
            config_blob,
            id: config_sha,
            config,
            layers,
        })
    }

    /// Points `reference` at `image`. Tagging an image with the name it
    /// already has changes nothing.
    pub fn tag(&self, reference: &Reference, image: &Image) -> Result<()> {
        if self
            .record(&reference.normalized())?
            .is_some_and(|r| r.manifest == image.manifest_blob)
        {
            return Ok(());
        }
        let rec = TagRecord {
            manifest: image.manifest_blob,
            created: now_unix(),
        };
        let bytes = serde_json::to_vec(&rec).map_err(|e| Error::Format(e.to_string()))?;
        self.meta
            .db()
            .put_cf(self.names(), reference.normalized(), bytes)
            .map_err(self.db_err())
    }

    /// Removes a name; true if it existed.
    pub fn untag(&self, reference: &Reference) -> Result<bool> {
        let key = reference.normalized();
        let existed = self
            .meta
            .db()
            .get_cf(self.names(), &key)
            .map_err(self.db_err())?
            .is_some();
        self.meta
            .db()
            .delete_cf(self.names(), &key)
            .map_err(self.db_err())?;
        Ok(existed)
    }

    fn record(&self, key: &str) -> Result<Option<TagRecord>> {
        let Some(raw) = self
            .meta
            .db()
            .get_cf(self.names(), key)
            .map_err(self.db_err())?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| Error::Format(format!("image record {key} is unreadable: {e}")))
    }

    /// Finds an image by name (`alpine`, `app:1`) or by ID prefix of at
    /// least 4 hex digits (`sha256:` optional), as `docker` does.
    pub fn get(&self, name: &str) -> Result<Option<Tagged>> {
        if let Ok(reference) = name.parse::<Reference>()
            && let Some(rec) = self.record(&reference.normalized())?
        {
            let image = self.load(&rec.manifest)?;
            return Ok(Some(Tagged {
                reference,
                created: rec.created,
                image,
            }));
        }
        let hex = name.strip_prefix("sha256:").unwrap_or(name);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let found: Vec<Tagged> = self
                .list()?
                .into_iter()
                .filter(|t| t.image.id.hex().starts_with(hex))
                .collect();
            if let Some(first) = found.first() {
                if found.iter().all(|t| t.image.id == first.image.id) {
                    return Ok(Some(first.clone()));
                }
                return Err(Error::Format(format!(
                    "image ID prefix {name} is ambiguous"
                )));
            }
        }
        Ok(None)
    }

    /// Every name with its image, sorted by name.
    pub fn list(&self) -> Result<Vec<Tagged>> {
        let mut out = Vec::new();
        for item in self
            .meta
            .db()
            .iterator_cf(self.names(), rocksdb::IteratorMode::Start)
        {
            let (k, _) = item.map_err(self.db_err())?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let Ok(reference) = key.parse::<Reference>() else {
                continue;
            };
            let Some(rec) = self.record(&key)? else {
                continue;
            };
            match self.load(&rec.manifest) {
                Ok(image) => out.push(Tagged {
                    reference,
                    created: rec.created,
                    image,
                }),
                Err(e) => tracing::warn!(image = %key, error = %e, "skipping unreadable image"),
            }
        }
        Ok(out)
    }
}

/// The sha256 a descriptor names.
pub fn descriptor_sha256(d: &Descriptor) -> Result<Sha256> {
    let s = d.digest().to_string();
    s.parse()
        .map_err(|_| Error::Format(format!("descriptor digest {s} is not sha256")))
}

/// The manifest of an image of `config_json` over `layers` (uncompressed,
/// bottom first), as the store writes it: the same inputs give the same
/// bytes, so a cluster and its clients name one image by one digest.
pub fn image_manifest(config_json: &[u8], layers: &[LayerRef]) -> Result<Vec<u8>> {
    let mut descs = Vec::with_capacity(layers.len());
    for l in layers {
        descs.push(Descriptor::new(
            MediaType::ImageLayer,
            l.size,
            sha256_to_oci(&l.diff_id)?,
        ));
    }
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            config_json.len() as u64,
            sha256_to_oci(&Sha256::of(config_json))?,
        ))
        .layers(descs)
        .build()
        .map_err(|e| Error::Format(format!("cannot build manifest: {e}")))?;
    Ok(manifest
        .to_string()
        .map_err(|e| Error::Format(format!("cannot encode manifest: {e}")))?
        .into_bytes())
}
