//! The build context on the wire: the client packs what `.dockerignore`
//! lets through into a tar blob, workers unpack it and build from it as
//! the embedded build does from the directory.

use std::io::Write as _;
use std::path::Path;

use strata_cas::{ContentStore, Digest};
use strata_dockerfile::IgnoreMatcher;
use strata_worker::select::{SourceRoot, select};

/// Packs the context at `dir` into a tar blob in `cas`: every entry
/// `ignore` lets through, in the order COPY walks them, with modes and
/// modification times. Owners are left out: COPY gives context files to
/// root. Returns the blob.
pub fn pack(cas: &ContentStore, dir: &Path, ignore: &IgnoreMatcher) -> Result<Digest, String> {
    let src = SourceRoot {
        root: dir,
        ignore: Some(ignore),
        keep_owner: false,
    };
    let items = select(&src, &[".".to_string()])?;
    let mut writer = cas.writer().map_err(|e| e.to_string())?;
    strata_worker::select::pack(&src, &items, None, &mut writer)?;
    writer
        .flush()
        .map_err(|e| format!("packing the context: {e}"))?;
    writer.commit().map_err(|e| e.to_string())
}

/// Unpacks context blob `digest` from `cas` into the empty directory
/// `dir`, keeping modes and times. Entries that would leave `dir` are
/// refused by the tar reader.
pub fn unpack(cas: &ContentStore, digest: &Digest, dir: &Path) -> Result<(), String> {
    let reader = cas.open_blob(digest).map_err(|e| e.to_string())?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive
        .unpack(dir)
        .map_err(|e| format!("unpacking the build context into {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_context_arrives_as_copy_would_see_it() {
        let store = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(store.path()).unwrap();
        let ctx = tempfile::tempdir().unwrap();
        let p = ctx.path();
        std::fs::create_dir_all(p.join("src/deep")).unwrap();
        std::fs::write(p.join("src/deep/a.txt"), "a").unwrap();
        std::fs::write(p.join("build.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(p.join("build.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(p.join("secret.key"), "no").unwrap();
        std::os::unix::fs::symlink("src/deep/a.txt", p.join("link")).unwrap();
        let ignore = IgnoreMatcher::new(&["*.key"]).unwrap();
        let d = pack(&cas, p, &ignore).unwrap();
        assert_eq!(
            d,
            pack(&cas, p, &ignore).unwrap(),
            "packing is deterministic"
        );

        let out = tempfile::tempdir().unwrap();
        unpack(&cas, &d, out.path()).unwrap();
        let o = out.path();
        assert_eq!(
            std::fs::read_to_string(o.join("src/deep/a.txt")).unwrap(),
            "a"
        );
        assert_eq!(
            std::fs::metadata(o.join("build.sh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert_eq!(
            std::fs::read_link(o.join("link")).unwrap(),
            Path::new("src/deep/a.txt")
        );
        assert!(!o.join("secret.key").exists(), ".dockerignore is applied");
    }
}
