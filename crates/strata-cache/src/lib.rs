//! The cache index: which step cache keys are done, and what they made.
//!
//! [`CacheIndex`] is the seam: the embedded build uses [`LocalCacheIndex`]
//! (RocksDB under the state directory); a cluster puts the same interface
//! in front of a replicated index. An entry records the whole layer chain
//! after the step, so any step's result can be mounted from one lookup.
//!
//! Entries are written only after every blob they name is stored, and
//! removed before those blobs are collected, so an entry never points at
//! nothing.
//!
//! [`exchange`] is the form entries travel in between machines
//! (`--cache-to`, `--cache-from`).

pub mod exchange;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_cas::{Digest, MetaDb, last_used_is_stale, now_unix};
use strata_oci::LayerRef;

/// What a finished step produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The layer chain after the step, bottom first.
    pub layers: Vec<LayerRef>,
    /// Whether the step itself added the top layer (false: it changed no file).
    pub made_layer: bool,
    /// When it was recorded (seconds since the epoch).
    pub created: u64,
    /// When a build last used it.
    pub last_used: u64,
    /// Which node produced it.
    pub producer: String,
}

impl CacheEntry {
    /// A new entry made now by `producer`.
    pub fn new(layers: Vec<LayerRef>, made_layer: bool, producer: &str) -> CacheEntry {
        let now = now_unix();
        CacheEntry {
            layers,
            made_layer,
            created: now,
            last_used: now,
            producer: producer.to_string(),
        }
    }
}

/// Errors of a cache index.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database failed.
    #[error("cache index at {}: {source}", path.display())]
    Db {
        /// Its directory.
        path: PathBuf,
        /// Why.
        source: rocksdb::Error,
    },
    /// The metadata database is not what the index needs.
    #[error(transparent)]
    Store(#[from] strata_cas::Error),
    /// A record could not be read.
    #[error("cache entry {key} is unreadable: {detail}")]
    Decode {
        /// Its key.
        key: Digest,
        /// Why.
        detail: String,
    },
    /// A remote index could not be reached.
    #[error("cache index unavailable: {0}")]
    Unavailable(String),
}

/// The cache index's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Step cache key → result, as a solver uses it. Async: a replicated
/// index waits on its group, and the solver awaits it on the runtime.
#[async_trait::async_trait]
pub trait CacheIndex: Send + Sync {
    /// Makes the reads that follow see every write acknowledged before
    /// this call (a replicated index asks its leader once; a local one
    /// always does).
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// The entry for `key`, if the step is done.
    async fn get(&self, key: &Digest) -> Result<Option<CacheEntry>>;
    /// Records a finished step. Every blob the entry names must be stored.
    async fn put(&self, key: &Digest, entry: &CacheEntry) -> Result<()>;
    /// Records that a build used the entry now (to within
    /// [`strata_cas::LAST_USED_GRANULARITY`]).
    async fn touch(&self, key: &Digest) -> Result<()>;
}

const CF_CACHE: &str = "cache";

/// The cache index of one machine, in RocksDB.
pub struct LocalCacheIndex {
    meta: Arc<MetaDb>,
}

impl std::fmt::Debug for LocalCacheIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCacheIndex")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl LocalCacheIndex {
    /// The column families the index keeps its entries in.
    pub const COLUMN_FAMILIES: &'static [&'static str] = &[CF_CACHE];

    /// The index in `meta`, which must have been opened with
    /// [`LocalCacheIndex::COLUMN_FAMILIES`].
    pub fn open(meta: Arc<MetaDb>) -> Result<LocalCacheIndex> {
        meta.require(Self::COLUMN_FAMILIES)?;
        Ok(LocalCacheIndex { meta })
    }

    fn entries(&self) -> &rocksdb::ColumnFamily {
        self.meta.cf(CF_CACHE)
    }

    fn db_err(&self) -> impl FnOnce(rocksdb::Error) -> Error + '_ {
        move |source| Error::Db {
            path: self.meta.path().to_path_buf(),
            source,
        }
    }
}

fn decode(key: Digest, raw: &[u8]) -> Result<CacheEntry> {
    bincode::serde::decode_from_slice(raw, bincode::config::standard())
        .map(|(e, _)| e)
        .map_err(|e| Error::Decode {
            key,
            detail: e.to_string(),
        })
}

impl LocalCacheIndex {
    /// The entry for `key`, if the step is done.
    pub fn get(&self, key: &Digest) -> Result<Option<CacheEntry>> {
        match self
            .meta
            .db()
            .get_cf(self.entries(), key.0)
            .map_err(self.db_err())?
        {
            Some(raw) => decode(*key, &raw).map(Some),
            None => Ok(None),
        }
    }

    /// Records a finished step. Every blob the entry names must be stored.
    pub fn put(&self, key: &Digest, entry: &CacheEntry) -> Result<()> {
        let raw =
            bincode::serde::encode_to_vec(entry, bincode::config::standard()).map_err(|e| {
                Error::Decode {
                    key: *key,
                    detail: e.to_string(),
                }
            })?;
        self.meta
            .db()
            .put_cf(self.entries(), key.0, raw)
            .map_err(self.db_err())
    }

    /// Forgets a step.
    pub fn remove(&self, key: &Digest) -> Result<()> {
        self.meta
            .db()
            .delete_cf(self.entries(), key.0)
            .map_err(self.db_err())
    }

    /// Every entry.
    pub fn list(&self) -> Result<Vec<(Digest, CacheEntry)>> {
        let mut out = Vec::new();
        for item in self
            .meta
            .db()
            .iterator_cf(self.entries(), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.map_err(self.db_err())?;
            let Ok(k) = <[u8; 32]>::try_from(&*k) else {
                continue;
            };
            out.push((Digest(k), decode(Digest(k), &v)?));
        }
        Ok(out)
    }

    /// Records that a build used the entry now (to within
    /// [`strata_cas::LAST_USED_GRANULARITY`]).
    pub fn touch(&self, key: &Digest) -> Result<()> {
        if let Some(mut e) = self.get(key)? {
            let now = now_unix();
            if last_used_is_stale(e.last_used, now) {
                e.last_used = now;
                self.put(key, &e)?;
            }
        }
        Ok(())
    }
}

/// One machine's RocksDB answers in microseconds from its memtable and
/// page cache: the calls run inline.
#[async_trait::async_trait]
impl CacheIndex for LocalCacheIndex {
    async fn get(&self, key: &Digest) -> Result<Option<CacheEntry>> {
        LocalCacheIndex::get(self, key)
    }

    async fn put(&self, key: &Digest, entry: &CacheEntry) -> Result<()> {
        LocalCacheIndex::put(self, key, entry)
    }

    async fn touch(&self, key: &Digest) -> Result<()> {
        LocalCacheIndex::touch(self, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_cas::Sha256;

    #[test]
    fn put_get_list_remove_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = Digest::of(b"step");
        let layer = LayerRef {
            blob: Digest::of(b"l"),
            diff_id: Sha256::of(b"l"),
            size: 1,
        };
        {
            let meta = MetaDb::open(dir.path(), LocalCacheIndex::COLUMN_FAMILIES).unwrap();
            let idx = LocalCacheIndex::open(meta).unwrap();
            assert!(idx.get(&key).unwrap().is_none());
            idx.put(&key, &CacheEntry::new(vec![layer], true, "local"))
                .unwrap();
        }
        let meta = MetaDb::open(dir.path(), LocalCacheIndex::COLUMN_FAMILIES).unwrap();
        let idx = LocalCacheIndex::open(meta).unwrap();
        let e = idx.get(&key).unwrap().unwrap();
        assert_eq!(e.layers, [layer]);
        idx.touch(&key).unwrap();
        assert_eq!(idx.list().unwrap().len(), 1);
        idx.remove(&key).unwrap();
        assert!(idx.get(&key).unwrap().is_none());
    }
}
