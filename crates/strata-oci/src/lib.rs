//! Images: the OCI and Docker formats strata reads and writes, and the
//! local image store.
//!
//! * [`ImageConfig`]: the config blob, Docker's superset of OCI's
//!   (healthcheck, ONBUILD, SHELL).
//! * [`Reference`]: image names with Docker's normalization.
//! * [`ImageStore`]: names → manifests → config and layers, all blobs in
//!   the content store; layers are stored uncompressed.
//! * [`import()`] and [`export_oci`]/[`export_docker_archive`]: root
//!   filesystem tars, `docker save` archives and OCI layouts in and out.
//! * [`Artifact`]: a manifest of layers whose config is something else
//!   (the build cache), kept in a layout under a tag.
//!
//! It knows nothing of Dockerfiles, builds or caches.

mod artifact;
mod compress;
mod config;
mod error;
mod export;
mod import;
mod reference;
mod store;
mod time;

pub use artifact::{
    Artifact, MAX_METADATA_BYTES, artifact_manifest, check_layer_count, read_artifact_layout,
    stored_layer, write_artifact_layout,
};
pub use compress::{Compression, compressed, compression_of, decompressing, record_compressed};
pub use config::{
    ContainerConfig, DEFAULT_PATH, Empty, HealthConfig, History, ImageConfig, RootFs,
};
pub use error::{Error, Result};
pub use export::{export_docker_archive, export_oci, export_oci_index, image_index, platform_of};
pub use import::{ImportFormat, archive_names, import, select_manifest, store_layer};
pub use reference::{DEFAULT_DOMAIN, ParseReferenceError, Reference};
pub use store::{Image, ImageStore, LayerRef, Tagged, descriptor_sha256, image_manifest};
pub use time::{rfc3339, unix_from_rfc3339};
