//! Where the tests find BuildKit's test data.

use std::path::PathBuf;

/// `STRATA_BUILDKIT_CONFORMANCE`, else `../shared/conformance/buildkit`
/// beside the checkout. The checkout is found at run time (cargo sets
/// `CARGO_MANIFEST_DIR` for the tests it runs): a test binary built in
/// another clone sharing the target directory must not look there.
pub fn buildkit_data() -> PathBuf {
    if let Some(d) = std::env::var_os("STRATA_BUILDKIT_CONFORMANCE") {
        return PathBuf::from(d);
    }
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.join("../../../shared/conformance/buildkit")
}
