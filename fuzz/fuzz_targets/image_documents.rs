//! Image configs, manifests and indexes as a registry (or an imported
//! archive) hands them over, read as strata reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_spec::image::{ImageIndex, ImageManifest};

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = serde_json::from_slice::<strata_oci::ImageConfig>(data) {
        let _ = serde_json::to_vec(&config);
    }
    if let Ok(manifest) = serde_json::from_slice::<ImageManifest>(data) {
        for layer in manifest.layers() {
            let _ = strata_oci::descriptor_sha256(layer);
        }
    }
    if let Ok(index) = serde_json::from_slice::<ImageIndex>(data) {
        let _ = strata_oci::select_manifest(index.manifests(), "linux", "amd64", None);
    }
});
