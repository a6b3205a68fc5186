//! The store: RocksDB for what is known about blobs and for the bytes of
//! small ones, files for the bytes of the rest.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::{Digest, MetaDb, Sha256};

const CF_BLOBS: &str = "blobs";
const CF_SHA256: &str = "sha256";
const CF_INLINE: &str = "inline";

/// Blobs this large or smaller are kept in the metadata database beside
/// their record, not as files: a build context of 30,000 small files costs
/// 30,000 values written together, not 30,000 files made, synced and
/// renamed, and a blob's bytes and its record are written in one atomic
/// write.
pub const INLINE_UP_TO: u64 = 64 * 1024;

/// How the column family `name` is kept: the bytes of inline blobs go
/// to RocksDB's blob files (key-value separation), so compaction moves
/// their keys and leaves the bytes where they were written once; every
/// other family is RocksDB's default.
pub(crate) fn column_family_options(name: &str) -> rocksdb::Options {
    let mut options = rocksdb::Options::default();
    if name == CF_INLINE {
        options.set_enable_blob_files(true);
        options.set_min_blob_size(0);
        // Space of deleted blobs comes back as compaction rewrites the
        // oldest blob files' live values.
        options.set_enable_blob_gc(true);
    }
    options
}

/// Errors of the content store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No blob with this digest is stored.
    #[error("blob {0} is not in the content store")]
    NotFound(Digest),
    /// The bytes on disk do not match the blob's digest or size.
    #[error("blob {digest} is corrupt: {detail}")]
    Corrupt {
        /// The blob.
        digest: Digest,
        /// What did not match.
        detail: String,
    },
    /// Ingested bytes did not hash to the digest the caller expected.
    #[error("content hashes to {actual}, expected {expected}")]
    Unexpected {
        /// What the caller said the content is.
        expected: Digest,
        /// What it is.
        actual: Digest,
    },
    /// Ingested bytes did not hash to the sha256 the sender claimed.
    #[error("content hashes to {actual} (sha256), but was sent as {claimed}")]
    UnexpectedSha256 {
        /// What the sender said the sha256 is.
        claimed: Sha256,
        /// What it is.
        actual: Sha256,
    },
    /// A sha256 already names another blob. Both hashes are computed here,
    /// so this means a hash collision; the existing mapping stands.
    #[error("sha256 {sha256} already names blob {existing}; {refused} refused")]
    Sha256Taken {
        /// The sha256 both blobs claim.
        sha256: Sha256,
        /// The blob it names.
        existing: Digest,
        /// The blob that was refused.
        refused: Digest,
    },
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// The metadata database failed.
    #[error("content store metadata at {}: {source}", path.display())]
    Db {
        /// The database directory.
        path: PathBuf,
        /// Why it failed.
        source: rocksdb::Error,
    },
    /// The metadata database was opened without the store's column
    /// families.
    #[error("metadata database {} has no column family {name}", path.display())]
    MissingColumnFamily {
        /// The database directory.
        path: PathBuf,
        /// The missing family.
        name: &'static str,
    },
    /// A metadata record could not be decoded.
    #[error("content store metadata for {digest} is unreadable: {detail}")]
    Decode {
        /// The blob the record is about.
        digest: Digest,
        /// Why it could not be read.
        detail: String,
    },
}

/// The content store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> Error + 'p {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What the store knows about a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    /// Length in bytes.
    pub size: u64,
    /// The sha256 of the same bytes, for OCI.
    pub sha256: Sha256,
    /// When it was first stored (seconds since the epoch).
    pub created: u64,
    /// When a build last used it.
    pub last_used: u64,
    /// Free-form annotations. Keys starting with `ref.` name other blobs
    /// this one keeps alive (their value is a blake3 digest).
    pub labels: BTreeMap<String, String>,
}

impl BlobInfo {
    /// The blobs this one references through `ref.` labels.
    pub fn references(&self) -> impl Iterator<Item = Digest> + '_ {
        self.labels
            .iter()
            .filter(|(k, _)| k.starts_with("ref."))
            .filter_map(|(_, v)| v.parse().ok())
    }
}

/// How far a recorded last use may lag behind the real one, in seconds.
///
/// Like `relatime`: a warm build uses every blob and cache entry it
/// touches, and rewriting each record on every build would turn a build
/// that changes nothing into one that writes the database. Collection
/// orders by last use, where a minute makes no difference.
pub const LAST_USED_GRANULARITY: u64 = 60;

/// Whether a last-use time recorded as `recorded` should be rewritten at
/// `now`.
pub fn last_used_is_stale(recorded: u64, now: u64) -> bool {
    now.saturating_sub(recorded) >= LAST_USED_GRANULARITY || now < recorded
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Blobs on disk, metadata in RocksDB.
pub struct ContentStore {
    root: PathBuf,
    meta: Arc<MetaDb>,
    leases: Arc<Mutex<HashMap<Digest, usize>>>,
    ingest_seq: AtomicU64,
    /// Blobs added or removed since the store was opened.
    changes: AtomicU64,
    /// Blobs removed since the store was opened.
    removals: AtomicU64,
}

impl std::fmt::Debug for ContentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl ContentStore {
    /// The column families the store keeps its metadata in.
    pub const COLUMN_FAMILIES: &'static [&'static str] = &[CF_BLOBS, CF_SHA256, CF_INLINE];

    /// Opens (creating if needed) a store under `root` with a metadata
    /// database of its own.
    pub fn open(root: &Path) -> Result<ContentStore> {
        let path = root.join("meta");
        fs::create_dir_all(&path).map_err(io_err("cannot create", &path))?;
        let meta = MetaDb::open(&path, Self::COLUMN_FAMILIES)
            .map_err(|source| Error::Db { path, source })?;
        Self::open_in(root, meta)
    }

    /// Opens (creating if needed) the store under `root`, its metadata in
    /// `meta`, which must have been opened with
    /// [`ContentStore::COLUMN_FAMILIES`]. Unfinished ingests left by a
    /// killed process are removed.
    pub fn open_in(root: &Path, meta: Arc<MetaDb>) -> Result<ContentStore> {
        meta.require(Self::COLUMN_FAMILIES)?;
        for dir in ["blobs", "ingest"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?;
        }
        let ingest = root.join("ingest");
        for entry in fs::read_dir(&ingest)
            .map_err(io_err("cannot list", &ingest))?
            .flatten()
        {
            let _ = fs::remove_file(entry.path());
        }
        Ok(ContentStore {
            root: root.to_path_buf(),
            meta,
            leases: Arc::default(),
            ingest_seq: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            removals: AtomicU64::new(0),
        })
    }

    /// A count that moves whenever a blob is added or removed: two equal
    /// readings mean listing the store again would show nothing new.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// A count that moves whenever a blob is removed: blobs found present
    /// are all still present while two readings, the first taken before
    /// they were looked up, are equal.
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::SeqCst)
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn db_err(&self) -> impl FnOnce(rocksdb::Error) -> Error + '_ {
        move |source| Error::Db {
            path: self.meta.path().to_path_buf(),
            source,
        }
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.meta.cf(name)
    }

    /// Where a blob kept as a file lives (one larger than
    /// [`INLINE_UP_TO`]). Reading the file directly skips verification;
    /// prefer [`ContentStore::open_blob`], or [`ContentStore::stored`] to
    /// send the bytes as they are.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    /// Starts writing a new blob. Both of its digests (blake3 and sha256)
    /// are computed from the bytes written: no digest is ever taken from
    /// whoever sent them.
    pub fn writer(&self) -> Result<BlobWriter<'_>> {
        let seq = self.ingest_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("ingest")
            .join(format!("{}-{seq}", std::process::id()));
        Ok(BlobWriter {
            store: self,
            sink: Sink::Memory(Vec::new()),
            tmp,
            blake3: blake3::Hasher::new(),
            sha256: sha2::Sha256::new(),
            size: 0,
        })
    }

    /// A batch of blobs to be made durable together ([`Batch`]). It holds
    /// the store, so that its commit can move to a blocking thread.
    pub fn batch(self: &Arc<Self>) -> Batch {
        Batch {
            store: Arc::clone(self),
            pending: Vec::new(),
            labels: BTreeMap::new(),
        }
    }

    /// Stores `data`; storing the same bytes again is a no-op.
    pub fn put(&self, data: &[u8]) -> Result<Digest> {
        // Hashing first keeps the common case (an image config or manifest
        // a warm build makes again) free of temp files and fsyncs.
        let digest = Digest::of(data);
        if self.present(&digest)? {
            return Ok(digest);
        }
        let mut w = self.writer()?;
        w.write_all(data)
            .map_err(io_err("cannot write", &w.tmp.clone()))?;
        w.commit()
    }

    /// Stores everything `reader` yields.
    pub fn put_reader(&self, reader: &mut dyn Read) -> Result<Digest> {
        let mut w = self.writer()?;
        let tmp = w.tmp.clone();
        io::copy(reader, &mut w).map_err(io_err("cannot write", &tmp))?;
        w.commit()
    }

    /// What is known about a blob, if it is stored.
    pub fn info(&self, d: &Digest) -> Result<Option<BlobInfo>> {
        let Some(raw) = self
            .meta
            .db()
            .get_cf(self.cf(CF_BLOBS), d.0)
            .map_err(self.db_err())?
        else {
            return Ok(None);
        };
        bincode::serde::decode_from_slice(&raw, bincode_config())
            .map(|(info, _)| Some(info))
            .map_err(|e| Error::Decode {
                digest: *d,
                detail: e.to_string(),
            })
    }

    /// Whether a blob is stored.
    pub fn contains(&self, d: &Digest) -> Result<bool> {
        Ok(self.info(d)?.is_some())
    }

    /// Those of `ds` that are not stored, in order, looked up in one
    /// batch: what checking a build context of tens of thousands of
    /// files asks.
    pub fn absent(&self, ds: &[Digest]) -> Result<Vec<Digest>> {
        let keys: Vec<&[u8]> = ds.iter().map(|d| &d.0[..]).collect();
        let found = self
            .meta
            .db()
            .batched_multi_get_cf(self.cf(CF_BLOBS), keys.iter(), false);
        let mut out = Vec::new();
        for (d, r) in ds.iter().zip(found) {
            if r.map_err(self.db_err())?.is_none() {
                out.push(*d);
            }
        }
        Ok(out)
    }

    /// The blob with this sha256, if any.
    pub fn by_sha256(&self, sha: &Sha256) -> Result<Option<Digest>> {
        Ok(self
            .meta
            .db()
            .get_cf(self.cf(CF_SHA256), sha.0)
            .map_err(self.db_err())?
            .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
            .map(Digest))
    }

    /// Adds a blob's metadata to `batch`, with `sha256_name` the mapping
    /// from its sha256 to it, and with `inline` its bytes.
    fn record_into(
        &self,
        batch: &mut WriteBatch,
        d: &Digest,
        info: &BlobInfo,
        sha256_name: bool,
        inline: Option<&[u8]>,
    ) -> Result<()> {
        let bytes =
            bincode::serde::encode_to_vec(info, bincode_config()).map_err(|e| Error::Decode {
                digest: *d,
                detail: e.to_string(),
            })?;
        batch.put_cf(self.cf(CF_BLOBS), d.0, bytes);
        if sha256_name {
            batch.put_cf(self.cf(CF_SHA256), info.sha256.0, d.0);
        }
        if let Some(inline) = inline {
            batch.put_cf(self.cf(CF_INLINE), d.0, inline);
        }
        Ok(())
    }

    /// Writes a blob's metadata, and with `sha256_name` the mapping from its
    /// sha256 to it, in one batch.
    fn write_info(&self, d: &Digest, info: &BlobInfo, sha256_name: bool) -> Result<()> {
        let mut batch = WriteBatch::default();
        self.record_into(&mut batch, d, info, sha256_name, None)?;
        self.meta.db().write(batch).map_err(self.db_err())
    }

    /// Refuses a new blob whose sha256 already names another stored blob:
    /// a sha256 is never remapped.
    fn check_sha256_free(&self, d: &Digest, info: &BlobInfo) -> Result<()> {
        match self.by_sha256(&info.sha256)? {
            Some(existing) if existing != *d && self.contains(&existing)? => {
                Err(Error::Sha256Taken {
                    sha256: info.sha256,
                    existing,
                    refused: *d,
                })
            }
            _ => Ok(()),
        }
    }

    /// Records new blobs, each with its metadata, the sha256 that names it
    /// and, when kept inline, its bytes, in one write; synced when it
    /// carries bytes, which nothing else makes durable.
    fn record_new(&self, new: &[(Digest, BlobInfo, Option<Vec<u8>>)]) -> Result<()> {
        let mut batch = WriteBatch::default();
        for (d, info, inline) in new {
            self.check_sha256_free(d, info)?;
            self.record_into(&mut batch, d, info, true, inline.as_deref())?;
        }
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(new.iter().any(|(_, _, inline)| inline.is_some()));
        self.meta
            .db()
            .write_opt(batch, &options)
            .map_err(self.db_err())
    }

    /// Makes `pending` durable, moves files into place and records every
    /// blob not already stored, each new one with `labels`: what
    /// [`Batch::commit`] and [`BlobWriter::commit`] do. Returns how many
    /// were new.
    fn place(&self, pending: Vec<Pending>, labels: &BTreeMap<String, String>) -> Result<usize> {
        let sync = |what: &'static str| -> Result<()> {
            let root = File::open(&self.root).map_err(io_err("cannot open", &self.root))?;
            nix::unistd::syncfs(&root).map_err(|e| Error::Io {
                what,
                path: self.root.clone(),
                source: e.into(),
            })
        };
        let mut new = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut files = Vec::new();
        for p in pending {
            if !seen.insert(p.digest) || self.present(&p.digest)? {
                if let Stored::File(tmp) = &p.bytes {
                    let _ = fs::remove_file(tmp);
                }
                continue;
            }
            match p.bytes {
                Stored::Inline(bytes) => new.push((p.digest, p.size, p.sha256, Some(bytes))),
                Stored::File(tmp) => files.push((tmp, p.digest, p.size, p.sha256)),
            }
        }
        let mut placed = Vec::new();
        if !files.is_empty() {
            // The bytes first, then the names. A few files are synced
            // each, with their folders; more, with the whole filesystem
            // at once.
            let each = files.len() <= SYNC_EACH_UP_TO;
            let fsync = |path: &Path| {
                File::open(path)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err("cannot sync", path))
            };
            let synced = if each {
                files.iter().try_for_each(|(tmp, ..)| fsync(tmp))
            } else {
                sync("cannot sync the blobs in")
            };
            let mut files = files.into_iter();
            let moved = synced.and_then(|()| {
                let mut dirs = Vec::new();
                for (tmp, digest, size, sha256) in files.by_ref() {
                    let dest = self.blob_path(&digest);
                    let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
                    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
                    if let Err(e) = fs::rename(&tmp, &dest) {
                        let _ = fs::remove_file(&tmp);
                        return Err(io_err("cannot move blob to", &dest)(e));
                    }
                    placed.push(dest);
                    new.push((digest, size, sha256, None));
                    if !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                }
                if each {
                    dirs.iter().try_for_each(|d| fsync(d))
                } else {
                    sync("cannot sync the blob names in")
                }
            });
            for (tmp, ..) in files {
                let _ = fs::remove_file(tmp);
            }
            if let Err(e) = moved {
                for dest in placed {
                    let _ = fs::remove_file(dest);
                }
                return Err(e);
            }
        }
        let now = now_unix();
        let records: Vec<(Digest, BlobInfo, Option<Vec<u8>>)> = new
            .into_iter()
            .map(|(digest, size, sha256, inline)| {
                let info = BlobInfo {
                    size,
                    sha256,
                    created: now,
                    last_used: now,
                    labels: labels.clone(),
                };
                (digest, info, inline)
            })
            .collect();
        if records.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.record_new(&records) {
            for dest in placed {
                let _ = fs::remove_file(dest);
            }
            return Err(e);
        }
        self.changes
            .fetch_add(records.len() as u64, Ordering::SeqCst);
        Ok(records.len())
    }

    /// Sets (or, with `None`, removes) a label.
    pub fn set_label(&self, d: &Digest, key: &str, value: Option<&str>) -> Result<()> {
        let mut info = self.info(d)?.ok_or(Error::NotFound(*d))?;
        if info.labels.get(key).map(String::as_str) == value {
            return Ok(());
        }
        match value {
            Some(v) => info.labels.insert(key.to_string(), v.to_string()),
            None => info.labels.remove(key),
        };
        self.write_info(d, &info, false)
    }

    /// Records that a build used the blob now (to within
    /// [`LAST_USED_GRANULARITY`]).
    pub fn touch(&self, d: &Digest) -> Result<()> {
        let mut info = self.info(d)?.ok_or(Error::NotFound(*d))?;
        let now = now_unix();
        if !last_used_is_stale(info.last_used, now) {
            return Ok(());
        }
        info.last_used = now;
        self.write_info(d, &info, false)
    }

    /// Where a recorded blob's bytes are, with its record: in hand when
    /// it is kept inline, else the file to read (which may be missing or
    /// damaged: this does not check). `None` when no blob `d` is recorded.
    pub fn stored(&self, d: &Digest) -> Result<Option<(BlobInfo, Stored)>> {
        let Some(info) = self.info(d)? else {
            return Ok(None);
        };
        let inline = self
            .meta
            .db()
            .get_cf(self.cf(CF_INLINE), d.0)
            .map_err(self.db_err())?;
        let at = match inline {
            Some(bytes) => Stored::Inline(bytes),
            None => Stored::File(self.blob_path(d)),
        };
        Ok(Some((info, at)))
    }

    /// Opens a blob for reading; the reader fails if the bytes do not hash
    /// to `d`.
    pub fn open_blob(&self, d: &Digest) -> Result<BlobReader> {
        let (info, at) = self.stored(d)?.ok_or(Error::NotFound(*d))?;
        let source = match at {
            Stored::Inline(bytes) => Source::Memory(io::Cursor::new(bytes)),
            Stored::File(path) => Source::File(File::open(&path).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => Error::Corrupt {
                    digest: *d,
                    detail: format!("{} is missing", path.display()),
                },
                _ => Error::Io {
                    what: "cannot open",
                    path: path.clone(),
                    source: e,
                },
            })?),
        };
        Ok(BlobReader {
            source,
            digest: *d,
            size: info.size,
            read: 0,
            hasher: blake3::Hasher::new(),
        })
    }

    /// Reads a whole blob, verified.
    pub fn read(&self, d: &Digest) -> Result<Vec<u8>> {
        let mut r = self.open_blob(d)?;
        let mut out = Vec::with_capacity(r.size as usize);
        r.read_to_end(&mut out).map_err(|e| self.read_error(d, e))?;
        Ok(out)
    }

    /// Turns an error from a [`BlobReader`] into a store error.
    pub fn read_error(&self, d: &Digest, e: io::Error) -> Error {
        match e.kind() {
            io::ErrorKind::InvalidData => Error::Corrupt {
                digest: *d,
                detail: e.to_string(),
            },
            _ => Error::Io {
                what: "cannot read",
                path: self.blob_path(d),
                source: e,
            },
        }
    }

    /// Whether the blob is recorded and its bytes are there (inline, or
    /// its file), at its size: what can be told without reading it
    /// ([`verify`](Self::verify) reads it).
    pub fn present(&self, d: &Digest) -> Result<bool> {
        Ok(match self.stored(d)? {
            None => false,
            Some((info, Stored::Inline(bytes))) => bytes.len() as u64 == info.size,
            Some((info, Stored::File(path))) => {
                std::fs::metadata(path).is_ok_and(|m| m.len() == info.size)
            }
        })
    }

    /// Reads a blob in full and checks it; true if it is intact.
    pub fn verify(&self, d: &Digest) -> Result<bool> {
        let mut r = self.open_blob(d)?;
        match io::copy(&mut r, &mut io::sink()) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(false),
            Err(e) => Err(self.read_error(d, e)),
        }
    }

    /// Every stored blob with its metadata.
    pub fn list(&self) -> Result<Vec<(Digest, BlobInfo)>> {
        let mut out = Vec::new();
        for item in self
            .meta
            .db()
            .iterator_cf(self.cf(CF_BLOBS), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.map_err(self.db_err())?;
            let Ok(key) = <[u8; 32]>::try_from(&*k) else {
                continue;
            };
            let d = Digest(key);
            let (info, _) =
                bincode::serde::decode_from_slice(&v, bincode_config()).map_err(|e| {
                    Error::Decode {
                        digest: d,
                        detail: e.to_string(),
                    }
                })?;
            out.push((d, info));
        }
        Ok(out)
    }

    /// Removes a blob: metadata (and inline bytes) first, then the file, so
    /// metadata never points at a missing file. A leased blob is refused.
    pub fn delete(&self, d: &Digest) -> Result<bool> {
        // Held through the delete: a lease taken meanwhile either comes
        // first (and the blob stays) or finds it gone.
        let leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        if leases.contains_key(d) {
            return Ok(false);
        }
        let Some(info) = self.info(d)? else {
            return Ok(false);
        };
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_BLOBS), d.0);
        batch.delete_cf(self.cf(CF_INLINE), d.0);
        if self.by_sha256(&info.sha256)? == Some(*d) {
            batch.delete_cf(self.cf(CF_SHA256), info.sha256.0);
        }
        // Counted before the write: a reader that saw the blob present
        // and reads the count after this sees it moved.
        self.removals.fetch_add(1, Ordering::SeqCst);
        self.meta.db().write(batch).map_err(self.db_err())?;
        self.changes.fetch_add(1, Ordering::SeqCst);
        let path = self.blob_path(d);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(Error::Io {
                what: "cannot remove",
                path,
                source: e,
            }),
        }
    }

    /// Takes a lease: blobs added to it are not deleted until it drops.
    pub fn lease(&self) -> Lease {
        Lease {
            leases: Arc::clone(&self.leases),
            held: Vec::new(),
        }
    }

    /// The blobs leases currently hold, with their hold counts.
    pub fn leased(&self) -> HashMap<Digest, usize> {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Total size of all blobs.
    pub fn total_size(&self) -> Result<u64> {
        Ok(self.list()?.iter().map(|(_, i)| i.size).sum())
    }
}

/// Blobs held by a running build; released when dropped.
#[derive(Debug)]
pub struct Lease {
    leases: Arc<Mutex<HashMap<Digest, usize>>>,
    held: Vec<Digest>,
}

impl Lease {
    /// Keeps `d` from being deleted while this lease lives.
    pub fn hold(&mut self, d: Digest) {
        *self
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(d)
            .or_default() += 1;
        self.held.push(d);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut map = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        for d in self.held.drain(..) {
            if let Some(n) = map.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&d);
                }
            }
        }
    }
}

/// Where a blob's bytes are kept.
#[derive(Debug)]
pub enum Stored {
    /// In the metadata database: these are they.
    Inline(Vec<u8>),
    /// In this file.
    File(PathBuf),
}

/// Where a blob being written goes: memory while it is small enough to be
/// kept inline, then a temp file under `ingest/`.
enum Sink {
    Memory(Vec<u8>),
    File(BufWriter<File>),
    Finished,
}

/// Writes one blob. Dropped without [`BlobWriter::commit`], it leaves
/// nothing behind.
pub struct BlobWriter<'a> {
    store: &'a ContentStore,
    sink: Sink,
    tmp: PathBuf,
    blake3: blake3::Hasher,
    sha256: sha2::Sha256,
    size: u64,
}

impl BlobWriter<'_> {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Ends the writing: the bytes of a blob to keep inline, or the temp
    /// file of one kept as a file, flushed but not synced (placing it
    /// syncs it).
    fn finish(&mut self) -> Result<Stored> {
        match std::mem::replace(&mut self.sink, Sink::Finished) {
            Sink::Memory(bytes) => Ok(Stored::Inline(bytes)),
            Sink::File(buf) => {
                buf.into_inner().map_err(|e| Error::Io {
                    what: "cannot write",
                    path: self.tmp.clone(),
                    source: e.into_error(),
                })?;
                Ok(Stored::File(std::mem::take(&mut self.tmp)))
            }
            Sink::Finished => Err(Error::Io {
                what: "cannot finish",
                path: self.tmp.clone(),
                source: io::Error::other("writer already finished"),
            }),
        }
    }

    /// Finishes the blob and stores it as a batch of one
    /// ([`Batch::commit`]): a small one is recorded with its bytes in one
    /// synced write; a file is synced, renamed into place, and then
    /// recorded. If the blob already exists this is a no-op that returns
    /// its digest.
    pub fn commit(mut self) -> Result<Digest> {
        let digest = self.digest();
        let sha256 = self.sha256();
        let bytes = self.finish()?;
        let pending = Pending {
            bytes,
            digest,
            size: self.size,
            sha256,
        };
        self.store.place(vec![pending], &BTreeMap::new())?;
        Ok(digest)
    }

    /// Like [`BlobWriter::commit`], but fails (storing nothing) unless the
    /// content hashes to `expected`, and to the sha256 `claimed` when one
    /// is given: what a peer or client says a blob is, checked against
    /// what was computed on receipt.
    pub fn commit_expecting(self, expected: Digest, claimed: Option<&Sha256>) -> Result<Digest> {
        let actual = self.digest();
        if actual != expected {
            return Err(Error::Unexpected { expected, actual });
        }
        let sha256 = self.sha256();
        if let Some(claimed) = claimed
            && *claimed != sha256
        {
            return Err(Error::UnexpectedSha256 {
                claimed: *claimed,
                actual: sha256,
            });
        }
        self.commit()
    }

    /// The digest of what has been written so far: a blob that arrived
    /// unnamed is stored under it ([`BlobWriter::finish_into`]).
    pub fn digest(&self) -> Digest {
        Digest(*self.blake3.finalize().as_bytes())
    }

    /// The sha256 of what has been written so far.
    pub fn sha256(&self) -> Sha256 {
        Sha256(self.sha256.clone().finalize().into())
    }

    /// Finishes the blob as part of `batch`, to be made durable and stored
    /// with the batch's other blobs by [`Batch::commit`]; fails (storing
    /// nothing) unless the content hashes to `expected`. Returns its digest.
    pub fn finish_into(mut self, batch: &mut Batch, expected: Digest) -> Result<Digest> {
        let actual = self.digest();
        if actual != expected {
            return Err(Error::Unexpected { expected, actual });
        }
        let sha256 = self.sha256();
        let bytes = self.finish()?;
        batch.pending.push(Pending {
            bytes,
            digest: actual,
            size: self.size,
            sha256,
        });
        Ok(actual)
    }
}

/// A blob written and checked, waiting for its batch's commit.
struct Pending {
    /// Its bytes, or its temp file.
    bytes: Stored,
    digest: Digest,
    size: u64,
    sha256: Sha256,
}

/// Files a batch syncs one by one (with their folders); a batch of more
/// syncs the filesystem, once for their bytes and once for their names.
const SYNC_EACH_UP_TO: usize = 4;

/// Blobs made durable together: many small blobs (a build context's
/// files) are recorded with their bytes in one synced write, and larger
/// ones cost one sync of the filesystem for the data and one for the
/// names, not two syncs each, as git's batched fsync does. Each blob is
/// still whole under its name or absent: every blob's bytes are on disk
/// before any is renamed into place or recorded. Dropped without
/// [`Batch::commit`], it leaves nothing behind.
pub struct Batch {
    store: Arc<ContentStore>,
    pending: Vec<Pending>,
    /// Labels every new blob of the batch gets.
    labels: BTreeMap<String, String>,
}

impl Batch {
    /// Blobs waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Every blob the batch stores anew gets label `key` = `value`.
    pub fn label(&mut self, key: &str, value: &str) {
        self.labels.insert(key.to_string(), value.to_string());
    }

    /// Makes every blob of the batch durable, moves it into place and
    /// records it. Returns how many were new.
    pub fn commit(mut self) -> Result<usize> {
        let pending = std::mem::take(&mut self.pending);
        self.store.place(pending, &self.labels)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        for p in self.pending.drain(..) {
            if let Stored::File(tmp) = p.bytes {
                let _ = fs::remove_file(tmp);
            }
        }
    }
}

/// An error writing the temp file `tmp`, naming it: whoever reports it (a
/// full disk, most likely) only knows it was writing "a blob".
fn writing(tmp: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("writing {} in the content store: {e}", tmp.display()),
    )
}

impl Write for BlobWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let tmp = &self.tmp;
        if let Sink::Memory(bytes) = &mut self.sink
            && (bytes.len() + buf.len()) as u64 > INLINE_UP_TO
        {
            // Too large to keep inline: on to a file.
            let file = File::create(tmp).map_err(|e| writing(tmp, e))?;
            let mut file = BufWriter::with_capacity(256 * 1024, file);
            file.write_all(bytes).map_err(|e| writing(tmp, e))?;
            self.sink = Sink::File(file);
        }
        let n = match &mut self.sink {
            Sink::Memory(bytes) => {
                bytes.extend_from_slice(buf);
                buf.len()
            }
            Sink::File(file) => file.write(buf).map_err(|e| writing(tmp, e))?,
            Sink::Finished => return Err(io::Error::other("blob writer finished")),
        };
        self.blake3.update(&buf[..n]);
        self.sha256.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::File(f) => f.flush().map_err(|e| writing(&self.tmp, e)),
            Sink::Memory(_) | Sink::Finished => Ok(()),
        }
    }
}

impl Drop for BlobWriter<'_> {
    fn drop(&mut self) {
        if let Sink::File(_) = std::mem::replace(&mut self.sink, Sink::Finished) {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// What a [`BlobReader`] reads from.
enum Source {
    File(File),
    Memory(io::Cursor<Vec<u8>>),
}

/// Reads a blob and checks its digest and size at the end; a mismatch is
/// an `InvalidData` error instead of end of file.
pub struct BlobReader {
    source: Source,
    digest: Digest,
    size: u64,
    read: u64,
    hasher: blake3::Hasher,
}

impl BlobReader {
    /// The blob's size according to the store.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match &mut self.source {
            Source::File(f) => f.read(buf)?,
            Source::Memory(m) => m.read(buf)?,
        };
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if n == 0 || self.read > self.size {
            let actual = Digest(*self.hasher.finalize().as_bytes());
            if self.read != self.size || actual != self.digest {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "content on disk is {} bytes hashing to {actual}, expected {} bytes",
                        self.read, self.size
                    ),
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
