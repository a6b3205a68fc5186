//! The build context on the wire: the client packs what `.dockerignore`
//! lets through into a tar blob, workers unpack it and build from it as
//! the embedded build does from the directory. The coordinator keeps
//! uploaded contexts under its store bounds, pinning those a client is
//! about to build from ([`Pins`]).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

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

/// How long a context a client uploaded or asked about is kept from
/// eviction: the build it submits next finds it.
pub const PIN_FOR: Duration = Duration::from_secs(600);

/// Pins kept at most; past that the oldest go first. Uploads are bounded
/// by each client's quota, questions are not.
const MAX_PINS: usize = 100_000;

/// Contexts clients uploaded or asked about in the last [`PIN_FOR`] and
/// have not built from yet.
#[derive(Debug, Default)]
pub(crate) struct Pins {
    /// When each was last pinned, and by how many uploads or questions
    /// no build has used yet.
    at: HashMap<Digest, (Instant, usize)>,
}

impl Pins {
    /// `context` was uploaded or asked about at `now`.
    pub(crate) fn pin(&mut self, context: Digest, now: Instant) {
        if self.at.len() >= MAX_PINS && !self.at.contains_key(&context) {
            self.at
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < PIN_FOR);
            if self.at.len() >= MAX_PINS
                && let Some(oldest) = self
                    .at
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(d, _)| *d)
            {
                self.at.remove(&oldest);
            }
        }
        let entry = self.at.entry(context).or_insert((now, 0));
        *entry = (now, entry.1 + 1);
    }

    /// A build took `context` up (and holds it while it runs): one pin
    /// less.
    pub(crate) fn used(&mut self, context: &Digest) {
        if let Some((_, n)) = self.at.get_mut(context) {
            *n -= 1;
            if *n == 0 {
                self.at.remove(context);
            }
        }
    }

    /// The contexts pinned at `now`.
    pub(crate) fn pinned(&mut self, now: Instant) -> HashSet<Digest> {
        self.at
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < PIN_FOR);
        self.at.keys().copied().collect()
    }
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

    #[test]
    fn a_pin_lasts_pin_for_and_no_longer() {
        let mut pins = Pins::default();
        let t0 = Instant::now();
        let d = Digest::of(b"context");
        pins.pin(d, t0);
        assert!(
            pins.pinned(t0 + PIN_FOR - Duration::from_secs(1))
                .contains(&d)
        );
        pins.pin(d, t0 + Duration::from_secs(60));
        assert!(
            pins.pinned(t0 + PIN_FOR).contains(&d),
            "asked again: pinned again"
        );
        assert!(
            pins.pinned(t0 + PIN_FOR + Duration::from_secs(60))
                .is_empty()
        );
    }

    #[test]
    fn pins_are_bounded_and_the_oldest_goes_first() {
        let mut pins = Pins::default();
        let t0 = Instant::now();
        for i in 0..MAX_PINS {
            pins.pin(
                Digest::of(&i.to_le_bytes()),
                t0 + Duration::from_millis(i as u64),
            );
        }
        let newest = Digest::of(b"newest");
        pins.pin(newest, t0 + Duration::from_secs(200));
        let now = t0 + Duration::from_secs(200);
        let pinned = pins.pinned(now);
        assert_eq!(pinned.len(), MAX_PINS);
        assert!(pinned.contains(&newest));
        assert!(!pinned.contains(&Digest::of(&0usize.to_le_bytes())));
    }
}
