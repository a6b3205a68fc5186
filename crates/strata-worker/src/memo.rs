//! Selection checksums of stage and image sources, remembered.
//!
//! A `COPY --from` or `RUN --mount=from=` step is keyed by the checksum of
//! what it selects ([`crate::select::checksum`]). Measuring it means
//! mounting the source's layers and walking them; but layers are named by
//! the blake3 of their bytes, so the same layers and the same selection
//! always give the same checksum, and a warm build can look it up instead.
//! (BuildKit keeps a content-hash cache per snapshot for the same reason.)

use std::sync::Arc;

use strata_cas::{Digest, MetaDb};
use strata_oci::LayerRef;

const CF_SELECTIONS: &str = "selections";

/// Selection checksums by layers and selection, in the node's metadata
/// database.
#[derive(Debug)]
pub struct SelectionMemo {
    meta: Arc<MetaDb>,
}

impl SelectionMemo {
    /// The column families the memo lives in.
    pub const COLUMN_FAMILIES: &'static [&'static str] = &[CF_SELECTIONS];

    /// The memo in `meta`, which must have been opened with
    /// [`SelectionMemo::COLUMN_FAMILIES`].
    pub fn open(meta: Arc<MetaDb>) -> Result<SelectionMemo, strata_cas::Error> {
        meta.require(Self::COLUMN_FAMILIES)?;
        Ok(SelectionMemo { meta })
    }

    /// The memo key of selecting `specs` minus `excludes` from `layers`.
    /// It names the checksum's version, so a change to what the checksum
    /// covers never returns an old value.
    pub fn key(layers: &[LayerRef], specs: &[String], excludes: &[String]) -> Digest {
        Self::keyed(b"memo\0", layers.iter().map(|l| &l.blob), specs, excludes)
    }

    /// The memo key of selecting `specs` minus `excludes` from a build
    /// context whose content digest is `context` (its tree's root).
    pub fn context_key(context: &Digest, specs: &[String], excludes: &[String]) -> Digest {
        Self::keyed(b"context\0", std::iter::once(context), specs, excludes)
    }

    fn keyed<'a>(
        kind: &[u8],
        sources: impl Iterator<Item = &'a Digest>,
        specs: &[String],
        excludes: &[String],
    ) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(crate::select::CHECKSUM_VERSION);
        h.update(kind);
        for d in sources {
            h.update(&d.0);
        }
        for (tag, list) in [("spec", specs), ("exclude", excludes)] {
            for s in list {
                h.update(tag.as_bytes());
                h.update(&(s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
        }
        Digest(*h.finalize().as_bytes())
    }

    /// The remembered checksum, if any. A record that cannot be read is
    /// treated as absent: the checksum is measured again.
    pub fn get(&self, key: &Digest) -> Option<Digest> {
        let cf = self.meta.cf(CF_SELECTIONS);
        match self.meta.db().get_cf(cf, key.0) {
            Ok(Some(v)) => <[u8; 32]>::try_from(v.as_slice()).ok().map(Digest),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(path = %self.meta.path().display(), error = %e, "cannot read the selection memo");
                None
            }
        }
    }

    /// Remembers a checksum. Failing to is not an error of the build.
    pub fn put(&self, key: &Digest, checksum: &Digest) {
        let cf = self.meta.cf(CF_SELECTIONS);
        if let Err(e) = self.meta.db().put_cf(cf, key.0, checksum.0) {
            tracing::warn!(path = %self.meta.path().display(), error = %e, "cannot write the selection memo");
        }
    }

    /// Forgets everything; entries are cheap to measure again, and
    /// collection may have removed the layers they describe.
    pub fn clear(&self) -> Result<usize, strata_cas::Error> {
        self.meta
            .clear(CF_SELECTIONS)
            .map_err(|source| strata_cas::Error::Db {
                path: self.meta.path().to_path_buf(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_cas::Sha256;

    fn layer(b: &[u8]) -> LayerRef {
        LayerRef {
            blob: Digest::of(b),
            diff_id: Sha256::of(b),
            size: 1,
        }
    }

    #[test]
    fn keys_name_layers_and_selection_and_values_round_trip() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let base = SelectionMemo::key(&[layer(b"a")], &s(&["/out"]), &[]);
        assert_eq!(base, SelectionMemo::key(&[layer(b"a")], &s(&["/out"]), &[]));
        for other in [
            SelectionMemo::key(&[layer(b"b")], &s(&["/out"]), &[]),
            SelectionMemo::key(&[layer(b"a"), layer(b"b")], &s(&["/out"]), &[]),
            SelectionMemo::key(&[layer(b"a")], &s(&["/out2"]), &[]),
            SelectionMemo::key(&[layer(b"a")], &s(&["/o", "ut"]), &[]),
            SelectionMemo::key(&[layer(b"a")], &s(&["/out"]), &s(&["*.md"])),
        ] {
            assert_ne!(base, other);
        }

        let dir = tempfile::tempdir().unwrap();
        let memo =
            SelectionMemo::open(MetaDb::open(dir.path(), SelectionMemo::COLUMN_FAMILIES).unwrap())
                .unwrap();
        assert_eq!(memo.get(&base), None);
        let sum = Digest::of(b"checksum");
        memo.put(&base, &sum);
        assert_eq!(memo.get(&base), Some(sum));
        assert_eq!(memo.clear().unwrap(), 1);
        assert_eq!(memo.get(&base), None);
    }
}
