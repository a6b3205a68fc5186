//! The build context on the wire, as a Merkle tree (as REAPI's input
//! roots are): every file is a blob named by its blake3, every directory
//! a small blob listing its entries (names, modes, times, and the blobs of
//! its files and subdirectories), and the context is named by its root
//! directory's blob.
//!
//! The client hashes what `.dockerignore` lets through ([`hash`]),
//! remembering each file's digest by its stat ([`StatCache`]) so an
//! unchanged file is never read again; it asks the coordinator which
//! blobs it lacks and uploads only those. A worker fetches the blobs it
//! lacks and writes the tree out ([`materialize`]) to build from it as the
//! embedded build does from the directory. The coordinator keeps uploaded
//! contexts under its store bounds, pinning those a client is about to
//! build from ([`Pins`]) with every blob their tree names ([`closure`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use strata_cas::{ContentStore, Digest, Stored};
use strata_dockerfile::IgnoreMatcher;
use strata_worker::select::{Entry, SourceRoot, select, walk, walk_all};

/// What goes wrong with a build context.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// Reading the context directory failed.
    #[error(transparent)]
    Walk(#[from] strata_worker::FileError),
    /// A file's digest was not taken (its hashing thread stopped).
    #[error("{0}: no digest was taken")]
    Unhashed(String),
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The context holds something a build context cannot carry.
    #[error("{path}: {what} cannot be part of a build context")]
    Unsupported {
        /// Where, relative to the context.
        path: String,
        /// What it is.
        what: &'static str,
    },
    /// The context is over a bound.
    #[error("the build context has more than {0} entries")]
    TooLarge(usize),
    /// A directory blob is not one, or breaks a rule.
    #[error("build context directory {digest}: {detail}")]
    BadDirectory {
        /// Its blob.
        digest: Digest,
        /// What is wrong.
        detail: String,
    },
    /// A blob the tree names is not in the store.
    #[error("build context blob {0} is missing from the store")]
    Missing(Digest),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] strata_cas::Error),
    /// Writing the tree out failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The label on the blobs of build contexts a node received: a worker does
/// not report them to the cache index as held (a context's files are no
/// layers anyone will ask the worker for), and `du` counts them apart.
pub use strata_worker::CONTEXT_LABEL;

/// The most entries (files, directories, links) a context may have.
pub const MAX_ENTRIES: usize = 4_000_000;

/// The largest directory blob accepted.
const MAX_DIRECTORY_BLOB: usize = 64 << 20;

/// What a directory blob starts with: its format, and a namespace no file
/// of a context can collide with by accident.
const MAGIC: &[u8] = b"strata.context.dir.v1\0";

/// One directory of a context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    /// Its permission bits.
    pub mode: u32,
    /// Its modification time, in seconds (as a tar keeps it).
    pub mtime: i64,
    /// Its entries, sorted by name.
    pub entries: Vec<DirEntry>,
}

/// A named entry of a [`Directory`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// Its name: one path component, not `.` or `..`.
    pub name: Vec<u8>,
    /// What it is.
    pub kind: EntryKind,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file: its contents' blob and size, mode and time.
    File {
        /// The blob of its contents.
        blob: Digest,
        /// Its size.
        size: u64,
        /// Its permission bits.
        mode: u32,
        /// Its modification time, in seconds.
        mtime: i64,
    },
    /// A directory: its [`Directory`]'s blob.
    Dir(Digest),
    /// A symbolic link and its target.
    Symlink {
        /// Where it points, as written.
        target: Vec<u8>,
        /// Its modification time, in seconds.
        mtime: i64,
    },
}

impl Directory {
    /// The blob bytes of this directory.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        // Encoding plain structs into a Vec cannot fail.
        if let Ok(body) = bincode::serde::encode_to_vec(self, bincode::config::standard()) {
            out.extend(body);
        }
        out
    }

    /// Reads directory blob `digest`, checking every rule a sender could
    /// break: the format, sorted unique names that are single components,
    /// link targets of sane length.
    pub fn decode(digest: &Digest, bytes: &[u8]) -> Result<Directory, ContextError> {
        let bad = |detail: String| ContextError::BadDirectory {
            digest: *digest,
            detail,
        };
        if bytes.len() > MAX_DIRECTORY_BLOB {
            return Err(bad(format!("over {MAX_DIRECTORY_BLOB} bytes")));
        }
        let body = bytes
            .strip_prefix(MAGIC)
            .ok_or_else(|| bad("not a directory blob".into()))?;
        let config = bincode::config::standard().with_limit::<MAX_DIRECTORY_BLOB>();
        let (dir, used): (Directory, usize) = bincode::serde::decode_from_slice(body, config)
            .map_err(|e| bad(format!("cannot decode: {e}")))?;
        if used != body.len() {
            return Err(bad("trailing bytes".into()));
        }
        for pair in dir.entries.windows(2) {
            if pair[0].name >= pair[1].name {
                return Err(bad("entries are not sorted and unique".into()));
            }
        }
        for e in &dir.entries {
            let n = &e.name;
            if n.is_empty()
                || n == b"."
                || n == b".."
                || n.len() > 255
                || n.contains(&b'/')
                || n.contains(&0)
            {
                return Err(bad(format!(
                    "entry name {:?} is not one path component",
                    String::from_utf8_lossy(n)
                )));
            }
            if let EntryKind::Symlink { target, .. } = &e.kind
                && (target.is_empty() || target.len() > 4096 || target.contains(&0))
            {
                return Err(bad(format!(
                    "link {:?} has no usable target",
                    String::from_utf8_lossy(n)
                )));
            }
        }
        Ok(dir)
    }
}

/// Reads and checks directory blob `digest` from `cas`.
pub fn read_directory(cas: &ContentStore, digest: &Digest) -> Result<Directory, ContextError> {
    match cas.info(digest)? {
        Some(info) if info.size > MAX_DIRECTORY_BLOB as u64 => {
            return Err(ContextError::BadDirectory {
                digest: *digest,
                detail: format!("over {MAX_DIRECTORY_BLOB} bytes"),
            });
        }
        Some(_) => {}
        None => return Err(ContextError::Missing(*digest)),
    }
    Directory::decode(digest, &cas.read(digest)?)
}

/// A context hashed: its root, its directories and its files.
#[derive(Debug)]
pub struct Hashed {
    /// The root directory's blob: the context's name.
    pub root: Digest,
    /// Every directory blob, root last: (blob, bytes).
    pub dirs: Vec<(Digest, Vec<u8>)>,
    /// Every file content, once: blob → (a file holding it, its size).
    pub files: BTreeMap<Digest, (PathBuf, u64)>,
    /// Entries in the context.
    pub entries: usize,
    /// Bytes read to hash files the stat cache did not know.
    pub read: u64,
}

impl Hashed {
    /// Every blob the tree names: directories, then files.
    pub fn blobs(&self) -> Vec<Digest> {
        self.dirs
            .iter()
            .map(|(d, _)| *d)
            .chain(self.files.keys().copied())
            .collect()
    }
}

/// What a file's stat said when its digest was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stat {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
}

impl Stat {
    fn of(m: &fs::Metadata) -> Stat {
        Stat {
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

/// A file's digest by its path and stat, kept between builds of one
/// context directory, so a file whose stat has not changed is not read
/// again (as git's index and BuildKit's fsutil do). A file changed within
/// [`RACY`] of being hashed is not remembered: a later change in the same
/// clock tick could keep its stat.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StatCache {
    files: HashMap<String, (Stat, Digest)>,
    /// Whether anything changed since it was loaded: an unchanged cache
    /// is not written again (a no-change build writes nothing).
    #[serde(skip)]
    changed: bool,
}

/// How many context directories' stat caches a state directory keeps.
pub const KEPT_STAT_CACHES: usize = 32;

/// How recent a change must be for a file's digest not to be remembered.
const RACY: Duration = Duration::from_secs(2);

/// The largest stat cache file read.
const MAX_STAT_CACHE: u64 = 1 << 30;

/// Why a stat cache on disk is ignored (and the context hashed afresh).
#[derive(Debug, thiserror::Error)]
enum Unusable {
    #[error(transparent)]
    Read(#[from] std::io::Error),
    #[error("{0} bytes, more than a stat cache may hold")]
    TooLarge(u64),
    #[error("damaged")]
    Damaged(#[from] bincode::error::DecodeError),
}

impl StatCache {
    /// Where the stat cache of context directory `context` lives under
    /// state directory `home`.
    pub fn path(home: &Path, context: &Path) -> PathBuf {
        let canonical = context
            .canonicalize()
            .unwrap_or_else(|_| context.to_path_buf());
        let name = Digest::of(canonical.as_os_str().as_bytes());
        home.join("context-cache").join(name.hex())
    }

    /// Loads the cache at `path`; an unreadable or damaged one is empty.
    pub fn load(path: &Path) -> StatCache {
        let read = || -> Result<StatCache, Unusable> {
            let meta = fs::metadata(path)?;
            if meta.len() > MAX_STAT_CACHE {
                return Err(Unusable::TooLarge(meta.len()));
            }
            let bytes = fs::read(path)?;
            let config = bincode::config::standard().with_limit::<{ MAX_STAT_CACHE as usize }>();
            Ok(bincode::serde::decode_from_slice(&bytes, config).map(|(c, _)| c)?)
        };
        match read() {
            Ok(c) => c,
            Err(e) => {
                if path.exists() {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring the context's stat cache");
                }
                StatCache::default()
            }
        }
    }

    /// Writes the cache to `path` atomically (temp, fsync, rename), then
    /// keeps the [`KEPT_STAT_CACHES`] most recently saved caches of its
    /// folder and deletes the rest (contexts in checkouts that are gone).
    /// A cache that hashing did not change, and that is there already, is
    /// not written again, only marked used now.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        if !self.changed
            && let Ok(f) = fs::File::options().write(true).open(path)
        {
            return f.set_modified(SystemTime::now());
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let body = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(std::io::Error::other)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(&body)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        let mut saved: Vec<(SystemTime, PathBuf)> = fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| {
                let modified = e.metadata().ok()?.modified().ok()?;
                Some((modified, e.path()))
            })
            .collect();
        if saved.len() > KEPT_STAT_CACHES {
            saved.sort();
            for (_, old) in &saved[..saved.len() - KEPT_STAT_CACHES] {
                if old != path {
                    let _ = fs::remove_file(old);
                }
            }
        }
        Ok(())
    }
}

/// The stat caches a long-running process (the local daemon) loaded or
/// saved, kept decoded between builds: building one context again does
/// not read and decode its 30,000 entries again. Each is taken while a
/// build hashes with it and given back once saved; one whose file
/// changed since (another process wrote it) is loaded afresh.
#[derive(Debug, Default)]
pub struct StatCaches {
    kept: Mutex<HashMap<PathBuf, (SystemTime, StatCache)>>,
}

impl StatCaches {
    /// The cache at `path`: the one kept, while its file is as this
    /// process left it, else [`StatCache::load`]. Two builds of one
    /// context at once each get one; the last given back is kept.
    pub fn take(&self, path: &Path) -> StatCache {
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(path);
        match kept {
            Some((at, cache)) if modified(path) == Some(at) => cache,
            _ => StatCache::load(path),
        }
    }

    /// Keeps `cache`, saved at `path` by [`StatCache::save`], for the
    /// next build; at most [`KEPT_STAT_CACHES`], as on disk.
    pub fn keep(&self, path: &Path, mut cache: StatCache) {
        let Some(at) = modified(path) else {
            return;
        };
        cache.changed = false;
        let mut kept = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() >= KEPT_STAT_CACHES && !kept.contains_key(path) {
            let oldest = kept
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(p, _)| p.clone());
            if let Some(oldest) = oldest {
                kept.remove(&oldest);
            }
        }
        kept.insert(path.to_path_buf(), (at, cache));
    }
}

/// When the file at `path` was last written or marked used.
fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn seconds(m: &fs::Metadata) -> i64 {
    m.mtime()
}

/// A directory being assembled from its entries.
struct Pending {
    mode: u32,
    mtime: i64,
    entries: Vec<DirEntry>,
}

/// A file of the context whose digest is to be taken.
struct FileAt {
    /// Its directory's path relative to the root ("" for the root).
    parent: String,
    name: Vec<u8>,
    rel: String,
    host: PathBuf,
    meta: fs::Metadata,
}

/// Hashes the context at `dir` (what `ignore` lets through) into a tree,
/// reading only the files `cache` does not know by their stat, several at
/// once; `cache` is updated with what was read.
pub fn hash(
    dir: &Path,
    ignore: &IgnoreMatcher,
    cache: &mut StatCache,
) -> Result<Hashed, ContextError> {
    hash_at(dir, ignore, cache, SystemTime::now())
}

/// [`hash`], as if begun at `started` (files changed within [`RACY`] of
/// it are not remembered).
fn hash_at(
    dir: &Path,
    ignore: &IgnoreMatcher,
    cache: &mut StatCache,
    started: SystemTime,
) -> Result<Hashed, ContextError> {
    let src = SourceRoot {
        root: dir,
        ignore: Some(ignore),
        keep_owner: false,
    };
    let items = select(&src, &[".".to_string()])?;
    let root_meta = fs::metadata(dir).map_err(|e| ContextError::Read {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut dirs: BTreeMap<String, Pending> = BTreeMap::new();
    dirs.insert(
        String::new(),
        Pending {
            mode: root_meta.mode() & 0o7777,
            mtime: seconds(&root_meta),
            entries: Vec::new(),
        },
    );
    let mut files: Vec<FileAt> = Vec::new();
    let mut links: Vec<(String, DirEntry)> = Vec::new();
    let mut entries = 0usize;
    let mut on_entry = |e: &Entry<'_>| {
        if e.rel.is_empty() {
            return Ok(());
        }
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(ContextError::TooLarge(MAX_ENTRIES));
        }
        let (parent, _) = e.rel.rsplit_once('/').unwrap_or(("", e.rel));
        let name = e
            .host
            .file_name()
            .unwrap_or(OsStr::new(""))
            .as_bytes()
            .to_vec();
        let ft = e.meta.file_type();
        if ft.is_dir() {
            dirs.insert(
                e.rel.to_string(),
                Pending {
                    mode: e.meta.mode() & 0o7777,
                    mtime: seconds(e.meta),
                    entries: Vec::new(),
                },
            );
        } else if ft.is_file() {
            files.push(FileAt {
                parent: parent.to_string(),
                name,
                rel: e.rel.to_string(),
                host: e.host.to_path_buf(),
                meta: e.meta.clone(),
            });
        } else if ft.is_symlink() {
            let target = fs::read_link(e.host).map_err(|source| ContextError::Read {
                path: e.host.to_path_buf(),
                source,
            })?;
            links.push((
                parent.to_string(),
                DirEntry {
                    name,
                    kind: EntryKind::Symlink {
                        target: target.as_os_str().as_bytes().to_vec(),
                        mtime: seconds(e.meta),
                    },
                },
            ));
        } else {
            use std::os::unix::fs::FileTypeExt as _;
            // Sockets are left out, as `docker build` leaves them.
            if !ft.is_socket() {
                return Err(ContextError::Unsupported {
                    path: e.rel.to_string(),
                    what: "a device or named pipe",
                });
            }
        }
        Ok(())
    };
    for item in &items {
        if !item.host.is_dir() {
            walk(&src, item, None, &mut on_entry)?;
            continue;
        }
        // Listed on every core: statting 30,000 files is most of what
        // hashing an unchanged context costs.
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let Some(all) = walk_all(&src, item, threads, MAX_ENTRIES)? else {
            return Err(ContextError::TooLarge(MAX_ENTRIES));
        };
        for e in &all {
            on_entry(&Entry {
                rel: &e.rel,
                host: &e.host,
                meta: &e.meta,
            })?;
        }
    }

    let (digests, read) = digest_files(&files, cache, started)?;
    let mut blobs: BTreeMap<Digest, (PathBuf, u64)> = BTreeMap::new();
    for (f, d) in files.iter().zip(&digests) {
        blobs
            .entry(*d)
            .or_insert_with(|| (f.host.clone(), f.meta.size()));
        if let Some(p) = dirs.get_mut(&f.parent) {
            p.entries.push(DirEntry {
                name: f.name.clone(),
                kind: EntryKind::File {
                    blob: *d,
                    size: f.meta.size(),
                    mode: f.meta.mode() & 0o7777,
                    mtime: seconds(&f.meta),
                },
            });
        }
    }
    for (parent, entry) in links {
        if let Some(p) = dirs.get_mut(&parent) {
            p.entries.push(entry);
        }
    }
    // Deepest first, so each directory's children are done before it.
    let mut order: Vec<String> = dirs.keys().cloned().collect();
    order.sort_by_key(|rel| {
        std::cmp::Reverse(if rel.is_empty() {
            0
        } else {
            rel.matches('/').count() + 1
        })
    });
    let mut out = Vec::with_capacity(order.len());
    let mut root = Digest::of(b"");
    for rel in order {
        let Some(mut p) = dirs.remove(&rel) else {
            continue;
        };
        p.entries.sort_by(|a, b| a.name.cmp(&b.name));
        let node = Directory {
            mode: p.mode,
            mtime: p.mtime,
            entries: p.entries,
        };
        let bytes = node.encode();
        let digest = Digest::of(&bytes);
        if rel.is_empty() {
            root = digest;
        } else {
            let (parent, name) = rel.rsplit_once('/').unwrap_or(("", &rel));
            let name = Path::new(name)
                .file_name()
                .unwrap_or(OsStr::new(name))
                .as_bytes()
                .to_vec();
            if let Some(parent) = dirs.get_mut(parent) {
                parent.entries.push(DirEntry {
                    name,
                    kind: EntryKind::Dir(digest),
                });
            }
        }
        out.push((digest, bytes));
    }
    Ok(Hashed {
        root,
        dirs: out,
        files: blobs,
        entries,
        read,
    })
}

/// Each file's digest: from `cache` when its stat is unchanged, else read
/// (several files at once). Returns the digests in `files`' order and the
/// bytes read.
fn digest_files(
    files: &[FileAt],
    cache: &mut StatCache,
    started: SystemTime,
) -> Result<(Vec<Digest>, u64), ContextError> {
    let mut digests: Vec<Option<Digest>> = files
        .iter()
        .map(|f| {
            cache
                .files
                .get(&f.rel)
                .filter(|(stat, _)| *stat == Stat::of(&f.meta))
                .map(|(_, d)| *d)
        })
        .collect();
    let todo: Vec<usize> = (0..files.len()).filter(|i| digests[*i].is_none()).collect();
    let read: u64 = todo.iter().map(|i| files[*i].meta.size()).sum();
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<(usize, Result<Digest, ContextError>)>> = Mutex::default();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8)
        .min(todo.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = todo.get(n) else {
                        return;
                    };
                    let got = digest_file(&files[i].host);
                    done.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((i, got));
                }
            });
        }
    });
    let racy_from = started
        .checked_sub(RACY)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    for (i, got) in done
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        let d = got?;
        digests[i] = Some(d);
        let stat = Stat::of(&files[i].meta);
        cache.changed = true;
        if stat.mtime_ns < racy_from && stat.ctime_ns < racy_from {
            cache.files.insert(files[i].rel.clone(), (stat, d));
        } else {
            cache.files.remove(&files[i].rel);
        }
    }
    // What the context no longer has, the cache forgets.
    let present: HashSet<&str> = files.iter().map(|f| f.rel.as_str()).collect();
    let before = cache.files.len();
    cache.files.retain(|rel, _| present.contains(rel.as_str()));
    cache.changed |= cache.files.len() != before;
    let digests = digests
        .into_iter()
        .zip(files)
        .map(|(d, f)| d.ok_or_else(|| ContextError::Unhashed(f.rel.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((digests, read))
}

fn digest_file(path: &Path) -> Result<Digest, ContextError> {
    let read = |source| ContextError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::File::open(path).map_err(read)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(&mut f).map_err(read)?;
    Ok(Digest(*h.finalize().as_bytes()))
}

/// Every blob the tree of `root` names, as far as `cas` holds its
/// directories. Bounded by [`MAX_ENTRIES`]; walks with a queue, never by
/// recursion.
pub fn closure(cas: &ContentStore, root: &Digest) -> Result<Closure, ContextError> {
    let (nodes, absent) = walk_tree(cas, root)?;
    let mut seen = HashSet::new();
    let files = nodes
        .values()
        .flat_map(|dir| &dir.entries)
        .filter_map(|e| match e.kind {
            EntryKind::File { blob, .. } => seen.insert(blob).then_some(blob),
            _ => None,
        })
        .collect();
    Ok(Closure {
        dirs: nodes.into_keys().collect(),
        files,
        absent,
    })
}

/// What [`closure`] found.
#[derive(Debug, Default)]
pub struct Closure {
    /// Directory blobs present and read.
    pub dirs: Vec<Digest>,
    /// File blobs the directories name (present or not).
    pub files: Vec<Digest>,
    /// Directory blobs named but not in the store.
    pub absent: Vec<Digest>,
}

impl Closure {
    /// Every blob: directories, files, absent directories.
    pub fn all(&self) -> impl Iterator<Item = &Digest> {
        self.dirs.iter().chain(&self.files).chain(&self.absent)
    }
}

/// Every directory of the tree of `root` that `cas` holds, read and
/// checked, and the directories named but absent. Walks with a queue,
/// never by recursion; bounded by [`MAX_ENTRIES`] directories.
fn walk_tree(
    cas: &ContentStore,
    root: &Digest,
) -> Result<(HashMap<Digest, Directory>, Vec<Digest>), ContextError> {
    let mut nodes = HashMap::new();
    let mut absent = Vec::new();
    let mut queued = HashSet::from([*root]);
    let mut queue = std::collections::VecDeque::from([*root]);
    while let Some(d) = queue.pop_front() {
        let node = match read_directory(cas, &d) {
            Ok(node) => node,
            Err(ContextError::Missing(_)) => {
                absent.push(d);
                continue;
            }
            Err(e) => return Err(e),
        };
        for e in &node.entries {
            if let EntryKind::Dir(child) = e.kind
                && queued.insert(child)
            {
                queue.push_back(child);
            }
        }
        nodes.insert(d, node);
        if queued.len() > MAX_ENTRIES {
            return Err(ContextError::TooLarge(MAX_ENTRIES));
        }
    }
    Ok((nodes, absent))
}

/// How many entries the tree of `root` has written out: a directory named
/// twice counts twice. Computed bottom up with a memo, never by recursion.
fn expanded(nodes: &HashMap<Digest, Directory>, root: &Digest) -> u64 {
    let mut memo: HashMap<Digest, u64> = HashMap::new();
    let mut stack = vec![(*root, false)];
    while let Some((d, children_done)) = stack.pop() {
        if memo.contains_key(&d) {
            continue;
        }
        let Some(node) = nodes.get(&d) else {
            memo.insert(d, 0);
            continue;
        };
        let children = node.entries.iter().filter_map(|e| match e.kind {
            EntryKind::Dir(c) => Some(c),
            _ => None,
        });
        if children_done {
            let below = children.fold(0u64, |n, c| {
                n.saturating_add(memo.get(&c).copied().unwrap_or(0))
            });
            memo.insert(d, below.saturating_add(node.entries.len() as u64));
        } else {
            stack.push((d, true));
            stack.extend(
                children
                    .filter(|c| !memo.contains_key(c))
                    .map(|c| (c, false)),
            );
        }
    }
    memo.get(root).copied().unwrap_or(0)
}

/// Writes the tree of `root` from `cas` into the empty directory `dir`:
/// files copied from their blobs with their modes and times, links,
/// directories (their times set last). Every directory blob is checked
/// ([`Directory::decode`]): names are single components, so nothing is
/// written outside `dir`; a tree that would expand past [`MAX_ENTRIES`]
/// is refused before anything is written. Walks with a stack, never by
/// recursion. Returns the entries written.
pub fn materialize(cas: &ContentStore, root: &Digest, dir: &Path) -> Result<usize, ContextError> {
    let nodes = whole_tree(cas, root)?;
    let mut out = Written::default();
    let written = write_tree(&nodes, root, dir, &mut out)?;
    out.finish(cas)?;
    Ok(written)
}

/// The digest [`strata_worker::select::checksum`] gives for what `specs`
/// select in the tree of `root` written out ([`materialize`]) with
/// `.dockerignore` `ignore`, taken from the tree alone: no file is read
/// again and nothing need be written out, so a COPY from the context is
/// keyed by the digests the client took. `None` where the tree alone
/// cannot say the same as the files: a wildcard, a link on the way to a
/// source, a source that is missing or ignored (walking the files then
/// says what is wrong), a folder of the tree that is not stored, or more
/// than [`MAX_ENTRIES`] entries. Written-out files carry no extended
/// attributes, so none are summed. Walks with a stack, never by
/// recursion.
pub fn selection_checksum(
    cas: &ContentStore,
    root: &Digest,
    specs: &[String],
    ignore: &IgnoreMatcher,
) -> Option<Digest> {
    use strata_worker::select::{SelectionSum, has_wildcard, ignores};
    /// What a source names in the tree.
    enum Found {
        Dir(std::sync::Arc<Directory>),
        File { mode: u32, blob: Digest },
    }
    let mut read: HashMap<Digest, std::sync::Arc<Directory>> = HashMap::new();
    let mut folder = |d: &Digest| -> Option<std::sync::Arc<Directory>> {
        if let Some(dir) = read.get(d) {
            return Some(std::sync::Arc::clone(dir));
        }
        let dir = std::sync::Arc::new(read_directory(cas, d).ok()?);
        read.insert(*d, std::sync::Arc::clone(&dir));
        Some(dir)
    };
    let ignore = Some(ignore);
    // The items, as `select` finds them for paths without wildcards.
    let mut items = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let cleaned = strata_dockerfile::clean_path(&format!("/{spec}"));
        let rel = cleaned.trim_start_matches('/').to_string();
        if has_wildcard(&rel) {
            return None;
        }
        let mut found = Found::Dir(folder(root)?);
        let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
        for (n, part) in parts.iter().enumerate() {
            let Found::Dir(dir) = &found else {
                return None;
            };
            let at = dir
                .entries
                .binary_search_by(|e| e.name.as_slice().cmp(part.as_bytes()))
                .ok()?;
            found = match &dir.entries[at].kind {
                EntryKind::Dir(d) => Found::Dir(folder(d)?),
                EntryKind::File { blob, mode, .. } if n + 1 == parts.len() => Found::File {
                    mode: *mode,
                    blob: *blob,
                },
                _ => return None,
            };
        }
        if ignores(ignore, &rel, matches!(found, Found::Dir(_))) {
            return None;
        }
        items.push((i, rel, found));
    }
    let mut sum = SelectionSum::new(specs);
    let mut budget = MAX_ENTRIES;
    for (i, rel, found) in items {
        let dir = match found {
            Found::File { mode, blob } => {
                sum.item(i, &rel, false);
                sum.entry('f', mode, "", None, None);
                sum.content(&blob.0);
                continue;
            }
            Found::Dir(dir) => dir,
        };
        sum.item(i, &rel, true);
        // As `walk` visits: a folder's entries in byte order, then its
        // folders, the first first.
        let mut stack = vec![(dir, String::new())];
        while let Some((dir, below)) = stack.pop() {
            let mut folders = Vec::new();
            for e in &dir.entries {
                let name = String::from_utf8_lossy(&e.name);
                let child = if below.is_empty() {
                    name.into_owned()
                } else {
                    format!("{below}/{name}")
                };
                let from_root = if rel.is_empty() {
                    child.clone()
                } else {
                    format!("{rel}/{child}")
                };
                if ignores(ignore, &from_root, matches!(e.kind, EntryKind::Dir(_))) {
                    continue;
                }
                budget = budget.checked_sub(1)?;
                match &e.kind {
                    EntryKind::Dir(d) => {
                        let sub = folder(d)?;
                        sum.entry('d', sub.mode, &child, None, None);
                        folders.push((sub, child));
                    }
                    EntryKind::File { blob, mode, .. } => {
                        sum.entry('f', *mode, &child, None, None);
                        sum.content(&blob.0);
                    }
                    // A link's own permission bits are all set on Linux.
                    EntryKind::Symlink { target, .. } => {
                        sum.entry('l', 0o777, &child, None, None);
                        sum.link_target(target);
                    }
                }
            }
            stack.extend(folders.into_iter().rev());
        }
    }
    Some(sum.finish())
}

/// Turns `dir`, which holds the tree of `from` as [`materialize`] wrote
/// it, into the tree of `to`: only what differs is written, removed or
/// changed, and a folder whose digest is the same in both is not looked
/// into, so a context that changed in a few files costs a few files.
/// The same checks as [`materialize`] hold. Returns the entries written
/// or removed. On an error `dir` is left part way: write it anew.
pub fn patch(
    cas: &ContentStore,
    from: &Digest,
    to: &Digest,
    dir: &Path,
) -> Result<usize, ContextError> {
    let old = whole_tree(cas, from)?;
    let new = whole_tree(cas, to)?;
    let write = |path: &Path, source| ContextError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut stack = vec![(*from, *to, dir.to_path_buf())];
    let mut out = Written::default();
    let mut changed = 0usize;
    while let Some((was, now, at)) = stack.pop() {
        if was == now {
            continue;
        }
        let was = old.get(&was).ok_or(ContextError::Missing(was))?;
        let node = new.get(&now).ok_or(ContextError::Missing(now))?;
        out.dirs.push((at.clone(), node.mode, node.mtime));
        let mut before: HashMap<&[u8], &EntryKind> = was
            .entries
            .iter()
            .map(|e| (e.name.as_slice(), &e.kind))
            .collect();
        for e in &node.entries {
            let path = at.join(OsStr::from_bytes(&e.name));
            match (before.remove(e.name.as_slice()), &e.kind) {
                (Some(k), _) if *k == e.kind => continue,
                (Some(EntryKind::Dir(a)), EntryKind::Dir(b)) => {
                    stack.push((*a, *b, path));
                    continue;
                }
                (Some(k), _) => remove(&path, k).map_err(|err| write(&path, err))?,
                (None, _) => {}
            }
            changed += 1;
            changed += write_entry(&new, now, e, &path, &mut out)?;
        }
        for (name, kind) in before {
            let path = at.join(OsStr::from_bytes(name));
            remove(&path, kind).map_err(|err| write(&path, err))?;
            changed += 1;
        }
    }
    out.finish(cas)?;
    Ok(changed)
}

/// Every folder of the tree of `root`, each checked, all present, and
/// within [`MAX_ENTRIES`] once expanded.
fn whole_tree(
    cas: &ContentStore,
    root: &Digest,
) -> Result<HashMap<Digest, Directory>, ContextError> {
    let (nodes, absent) = walk_tree(cas, root)?;
    if let Some(d) = absent.first() {
        return Err(ContextError::Missing(*d));
    }
    if expanded(&nodes, root) > MAX_ENTRIES as u64 {
        return Err(ContextError::TooLarge(MAX_ENTRIES));
    }
    Ok(nodes)
}

/// Removes what an entry of kind `kind` wrote at `path`.
fn remove(path: &Path, kind: &EntryKind) -> std::io::Result<()> {
    match kind {
        EntryKind::Dir(_) => fs::remove_dir_all(path),
        _ => fs::remove_file(path),
    }
}

/// What writing a tree out leaves to do once its folders and links are
/// made: the files, copied from their blobs (several at once), then each
/// folder's mode and time.
#[derive(Default)]
struct Written {
    /// Each file: where, its blob, size, mode and time, and its folder's
    /// digest (for errors).
    files: Vec<(PathBuf, Digest, u64, u32, i64, Digest)>,
    /// Each folder made or changed, parents first.
    dirs: Vec<(PathBuf, u32, i64)>,
}

/// Files copied at once when writing a tree out: creating files is mostly
/// the kernel's work, which several threads share.
const FILE_WRITERS: usize = 4;

impl Written {
    /// Copies the files, then sets the folders' modes and times, deepest
    /// first: children change their folder's time.
    fn finish(self, cas: &ContentStore) -> Result<(), ContextError> {
        let writers = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, FILE_WRITERS);
        // Contiguous runs: a folder's files mostly go to one thread.
        let per = self.files.len().div_ceil(writers).max(1);
        std::thread::scope(|s| {
            let running: Vec<_> = self
                .files
                .chunks(per)
                .map(|run| s.spawn(move || run.iter().try_for_each(|f| write_file(cas, f))))
                .collect();
            running.into_iter().try_for_each(|t| {
                t.join().unwrap_or_else(|_| {
                    Err(ContextError::Write {
                        path: PathBuf::new(),
                        source: std::io::Error::other("a file writer stopped"),
                    })
                })
            })
        })?;
        for (at, mode, mtime) in self.dirs.into_iter().rev() {
            let write = |source| ContextError::Write {
                path: at.clone(),
                source,
            };
            fs::set_permissions(&at, fs::Permissions::from_mode(mode & 0o7777)).map_err(write)?;
            set_mtime(&at, mtime).map_err(write)?;
        }
        Ok(())
    }
}

/// Copies one file of a tree from its blob; the copy's length is the
/// blob file's, so a blob that holds other than the tree says is refused.
fn write_file(
    cas: &ContentStore,
    (path, blob, size, mode, mtime, parent): &(PathBuf, Digest, u64, u32, i64, Digest),
) -> Result<(), ContextError> {
    let write = |source| ContextError::Write {
        path: path.clone(),
        source,
    };
    let copied = match cas.stored(blob)? {
        None => return Err(ContextError::Missing(*blob)),
        Some((_, Stored::Inline(bytes))) => {
            fs::write(path, &bytes).map_err(write)?;
            bytes.len() as u64
        }
        Some((_, Stored::File(from))) => fs::copy(from, path).map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                ContextError::Missing(*blob)
            } else {
                write(err)
            }
        })?,
    };
    if copied != *size {
        return Err(ContextError::BadDirectory {
            digest: *parent,
            detail: format!(
                "{} is {size} bytes, but its blob {blob} holds {copied}",
                path.display()
            ),
        });
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777)).map_err(write)?;
    set_mtime(path, *mtime).map_err(write)
}

/// Makes the folders and links of the tree of `root` (its folder in
/// `nodes`) in the directory `dir`, which exists, and queues its files
/// and folders in `out`. Returns the entries written.
fn write_tree(
    nodes: &HashMap<Digest, Directory>,
    root: &Digest,
    dir: &Path,
    out: &mut Written,
) -> Result<usize, ContextError> {
    let mut stack = vec![(*root, dir.to_path_buf())];
    let mut written = 0usize;
    while let Some((digest, at)) = stack.pop() {
        let node = nodes.get(&digest).ok_or(ContextError::Missing(digest))?;
        out.dirs.push((at.clone(), node.mode, node.mtime));
        for e in &node.entries {
            written += 1;
            let path = at.join(OsStr::from_bytes(&e.name));
            if let EntryKind::Dir(child) = &e.kind {
                fs::create_dir(&path).map_err(|source| ContextError::Write {
                    path: path.clone(),
                    source,
                })?;
                stack.push((*child, path));
            } else {
                write_entry(nodes, digest, e, &path, out)?;
            }
        }
    }
    Ok(written)
}

/// Writes the entry `e` of the folder `parent` at `path`, where nothing
/// is: a link, a folder and all below it, or a file, queued in `out`.
/// Returns the entries written below it.
fn write_entry(
    nodes: &HashMap<Digest, Directory>,
    parent: Digest,
    e: &DirEntry,
    path: &Path,
    out: &mut Written,
) -> Result<usize, ContextError> {
    let write = |source| ContextError::Write {
        path: path.to_path_buf(),
        source,
    };
    match &e.kind {
        EntryKind::Dir(child) => {
            fs::create_dir(path).map_err(write)?;
            return write_tree(nodes, child, path, out);
        }
        EntryKind::File {
            blob,
            size,
            mode,
            mtime,
        } => out
            .files
            .push((path.to_path_buf(), *blob, *size, *mode, *mtime, parent)),
        EntryKind::Symlink { target, mtime } => {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), path).map_err(write)?;
            set_mtime(path, *mtime).map_err(write)?;
        }
    }
    Ok(0)
}

fn set_mtime(path: &Path, secs: i64) -> std::io::Result<()> {
    let t = nix::sys::time::TimeSpec::new(secs, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)
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

    fn sample(p: &Path) {
        fs::create_dir_all(p.join("src/deep")).unwrap();
        fs::write(p.join("src/deep/a.txt"), "a").unwrap();
        fs::write(p.join("src/b.txt"), "a").unwrap();
        fs::write(p.join("build.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(p.join("build.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(p.join("secret.key"), "no").unwrap();
        std::os::unix::fs::symlink("src/deep/a.txt", p.join("link")).unwrap();
    }

    fn store(cas: &ContentStore, h: &Hashed) {
        for (_, bytes) in &h.dirs {
            cas.put(bytes).unwrap();
        }
        for (path, _) in h.files.values() {
            cas.put(&fs::read(path).unwrap()).unwrap();
        }
    }

    /// `h`'s blobs in a new store, and its tree written out from there:
    /// the store and the written-out directory (under the temporary
    /// directories, kept while the first value lives).
    fn stored_and_written(
        h: &Hashed,
    ) -> (
        (tempfile::TempDir, tempfile::TempDir),
        ContentStore,
        PathBuf,
    ) {
        let store_dir = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(store_dir.path()).unwrap();
        store(&cas, h);
        let out = tempfile::tempdir().unwrap();
        let o = out.path().join("ctx");
        fs::create_dir(&o).unwrap();
        materialize(&cas, &h.root, &o).unwrap();
        ((store_dir, out), cas, o)
    }

    #[test]
    fn a_selection_is_keyed_from_the_tree_as_from_the_files_it_writes_out() {
        let ctx = tempfile::tempdir().unwrap();
        let p = ctx.path();
        sample(p);
        fs::create_dir_all(p.join("logs/old")).unwrap();
        fs::write(p.join("logs/keep.txt"), "k").unwrap();
        fs::write(p.join("logs/drop.txt"), "d").unwrap();
        fs::write(p.join("logs/old/x"), "x").unwrap();
        fs::create_dir_all(p.join("empty")).unwrap();
        fs::set_permissions(p.join("empty"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(p.join("src/deep/setuid"), "s").unwrap();
        fs::set_permissions(
            p.join("src/deep/setuid"),
            fs::Permissions::from_mode(0o4750),
        )
        .unwrap();
        std::os::unix::fs::symlink("src", p.join("srclink")).unwrap();
        let ignore = IgnoreMatcher::new(&["*.key", "logs", "!logs/keep.txt"]).unwrap();
        let h = hash(p, &ignore, &mut StatCache::default()).unwrap();
        let (_dirs, cas, o) = stored_and_written(&h);

        let written = SourceRoot {
            root: &o,
            ignore: None,
            keep_owner: false,
        };
        let here = SourceRoot {
            root: p,
            ignore: Some(&ignore),
            keep_owner: false,
        };
        let none = IgnoreMatcher::default();
        for specs in [
            vec!["."],
            vec!["./"],
            vec!["/"],
            vec!["src"],
            vec!["src/deep/"],
            vec!["build.sh"],
            vec!["logs"],
            vec!["src", "build.sh", "."],
        ] {
            let specs: Vec<String> = specs.into_iter().map(String::from).collect();
            let from_tree = selection_checksum(&cas, &h.root, &specs, &none)
                .unwrap_or_else(|| panic!("{specs:?}: the tree can say"));
            let from_files = strata_worker::select::checksum(&written, &specs, &[], None).unwrap();
            assert_eq!(from_tree, from_files, "{specs:?}, written out");
            // What the embedded build keys from the context itself.
            let embedded = strata_worker::select::checksum(&here, &specs, &[], None).unwrap();
            assert_eq!(from_tree, embedded, "{specs:?}, in the context");
        }
        // Where the tree alone cannot say the same, the files are walked.
        for specs in [
            vec!["src/*.txt"],
            vec!["srclink/b.txt"],
            vec!["link"],
            vec!["missing"],
            vec!["build.sh/x"],
        ] {
            let specs: Vec<String> = specs.into_iter().map(String::from).collect();
            assert_eq!(
                selection_checksum(&cas, &h.root, &specs, &none),
                None,
                "{specs:?}"
            );
        }
        // An ignored source is refused by the walk, not keyed.
        let ignored = IgnoreMatcher::new(&["src"]).unwrap();
        assert_eq!(
            selection_checksum(&cas, &h.root, &["src".to_string()], &ignored),
            None
        );
        // A folder that is not stored: the files are walked.
        let other = tempfile::tempdir().unwrap();
        let empty = ContentStore::open(other.path()).unwrap();
        assert_eq!(
            selection_checksum(&empty, &h.root, &[".".to_string()], &none),
            None
        );
    }

    #[test]
    fn the_context_arrives_as_copy_would_see_it() {
        let ctx = tempfile::tempdir().unwrap();
        let p = ctx.path();
        sample(p);
        let ignore = IgnoreMatcher::new(&["*.key"]).unwrap();
        let h = hash(p, &ignore, &mut StatCache::default()).unwrap();
        assert_eq!(
            h.root,
            hash(p, &ignore, &mut StatCache::default()).unwrap().root,
            "hashing is deterministic"
        );
        assert_eq!(h.files.len(), 2, "the same contents are one blob");
        assert_eq!(h.entries, 6);

        let (_dirs, cas, o) = stored_and_written(&h);
        assert_eq!(fs::read_to_string(o.join("src/deep/a.txt")).unwrap(), "a");
        assert_eq!(fs::read_to_string(o.join("src/b.txt")).unwrap(), "a");
        assert_eq!(
            fs::metadata(o.join("build.sh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_link(o.join("link")).unwrap(),
            Path::new("src/deep/a.txt")
        );
        assert!(!o.join("secret.key").exists(), ".dockerignore is applied");
        assert_eq!(
            fs::metadata(o.join("src/deep/a.txt")).unwrap().mtime(),
            fs::metadata(p.join("src/deep/a.txt")).unwrap().mtime(),
            "times are kept"
        );
        // Written out and hashed again, it is the same tree.
        assert_eq!(
            hash(&o, &IgnoreMatcher::default(), &mut StatCache::default())
                .unwrap()
                .root,
            h.root
        );
        let c = closure(&cas, &h.root).unwrap();
        assert_eq!((c.dirs.len(), c.files.len(), c.absent.len()), (3, 2, 0));
    }

    #[test]
    fn a_written_out_tree_patched_to_another_is_that_tree_written_out() {
        let ctx = tempfile::tempdir().unwrap();
        let p = ctx.path();
        sample(p);
        fs::create_dir_all(p.join("gone/below")).unwrap();
        fs::write(p.join("gone/below/x"), "x").unwrap();
        fs::write(p.join("becomes-dir"), "file").unwrap();
        let none = IgnoreMatcher::default();
        let store_dir = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(store_dir.path()).unwrap();
        let before = hash(p, &none, &mut StatCache::default()).unwrap();
        store(&cas, &before);
        // An edit, a mode change, a new folder, a removed folder, a file
        // that became a folder, a link retargeted.
        fs::write(p.join("src/deep/a.txt"), "edited").unwrap();
        fs::set_permissions(p.join("src/b.txt"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir_all(p.join("new/one")).unwrap();
        fs::write(p.join("new/one/n"), "n").unwrap();
        fs::remove_dir_all(p.join("gone")).unwrap();
        fs::remove_file(p.join("becomes-dir")).unwrap();
        fs::create_dir(p.join("becomes-dir")).unwrap();
        fs::write(p.join("becomes-dir/inside"), "i").unwrap();
        fs::remove_file(p.join("link")).unwrap();
        std::os::unix::fs::symlink("build.sh", p.join("link")).unwrap();
        let after = hash(p, &none, &mut StatCache::default()).unwrap();
        store(&cas, &after);

        let out = tempfile::tempdir().unwrap();
        let o = out.path().join("ctx");
        fs::create_dir(&o).unwrap();
        materialize(&cas, &before.root, &o).unwrap();
        let changed = patch(&cas, &before.root, &after.root, &o).unwrap();
        // Written out again, it hashes to the new tree: contents, modes,
        // times of files and folders alike.
        assert_eq!(
            hash(&o, &none, &mut StatCache::default()).unwrap().root,
            after.root
        );
        assert!(!o.join("gone").exists());
        assert_eq!(
            fs::read_to_string(o.join("becomes-dir/inside")).unwrap(),
            "i"
        );
        // build.sh and the untouched tree below it were left alone.
        assert!(changed < 12, "{changed} entries changed");
        // Patching to the same tree changes nothing.
        assert_eq!(patch(&cas, &after.root, &after.root, &o).unwrap(), 0);
    }

    #[test]
    fn one_edit_changes_one_file_blob_and_the_directories_above_it() {
        let ctx = tempfile::tempdir().unwrap();
        let p = ctx.path();
        sample(p);
        let none = IgnoreMatcher::default();
        let before = hash(p, &none, &mut StatCache::default()).unwrap();
        fs::write(p.join("src/deep/a.txt"), "edited").unwrap();
        let after = hash(p, &none, &mut StatCache::default()).unwrap();
        let old: HashSet<Digest> = before.blobs().into_iter().collect();
        let new: Vec<Digest> = after
            .blobs()
            .into_iter()
            .filter(|d| !old.contains(d))
            .collect();
        // The file, src/deep, src and the root.
        assert_eq!(new.len(), 4, "{new:?}");
    }

    #[test]
    fn an_unchanged_file_is_not_read_again() {
        let ctx = tempfile::tempdir().unwrap();
        let p = ctx.path();
        fs::write(p.join("old"), vec![7u8; 10_000]).unwrap();
        set_mtime(&p.join("old"), 1_000_000_000).unwrap();
        let none = IgnoreMatcher::default();
        let mut cache = StatCache::default();
        // Just changed: its digest is taken, not remembered.
        let first = hash(p, &none, &mut cache).unwrap();
        assert_eq!(first.read, 10_000);
        assert_eq!(hash(p, &none, &mut cache).unwrap().read, 10_000);
        // Hashed well after the change: remembered, across a save.
        let later = SystemTime::now() + Duration::from_secs(10);
        hash_at(p, &none, &mut cache, later).unwrap();
        let saved = tempfile::tempdir().unwrap();
        let at = saved.path().join("cache");
        cache.save(&at).unwrap();
        let mut cache = StatCache::load(&at);
        let second = hash_at(p, &none, &mut cache, later).unwrap();
        assert_eq!((second.read, second.root), (0, first.root));
        // Nothing changed: saving writes no new file, it marks it used.
        let inode = fs::metadata(&at).unwrap().ino();
        fs::File::options()
            .write(true)
            .open(&at)
            .unwrap()
            .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();
        cache.save(&at).unwrap();
        let meta = fs::metadata(&at).unwrap();
        assert_eq!(meta.ino(), inode);
        assert!(meta.modified().unwrap() > SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        assert_eq!(StatCache::load(&at).files.len(), cache.files.len());
        // Its stat changes (ctime moves, mtime kept): it is read again.
        fs::write(p.join("old"), vec![8u8; 10_000]).unwrap();
        set_mtime(&p.join("old"), 1_000_000_000).unwrap();
        let third = hash_at(p, &none, &mut cache, later).unwrap();
        assert_eq!(third.read, 10_000);
        assert_ne!(third.root, first.root);
    }

    #[test]
    fn a_kept_stat_cache_serves_the_next_build_until_another_process_writes_its_file() {
        let ctx = tempfile::tempdir().unwrap();
        let p = ctx.path();
        fs::write(p.join("a"), b"a").unwrap();
        set_mtime(&p.join("a"), 1_000_000_000).unwrap();
        let none = IgnoreMatcher::default();
        let later = SystemTime::now() + Duration::from_secs(10);
        let saved = tempfile::tempdir().unwrap();
        let at = saved.path().join("cache");
        let caches = StatCaches::default();
        let mut cache = caches.take(&at);
        assert!(cache.files.is_empty(), "nothing saved yet");
        hash_at(p, &none, &mut cache, later).unwrap();
        cache.save(&at).unwrap();
        caches.keep(&at, cache);
        // The kept one is served, not the file decoded again: an entry
        // only the kept one has is there.
        let mut kept = caches.take(&at);
        assert_eq!(kept.files.len(), 1);
        assert!(!kept.changed);
        let entry = kept.files.values().next().copied().unwrap();
        kept.files.insert("only-in-memory".into(), entry);
        caches.keep(&at, kept);
        let kept = caches.take(&at);
        assert_eq!(kept.files.len(), 2);
        assert_eq!(StatCache::load(&at).files.len(), 1);
        let bytes = fs::read(&at).unwrap();
        caches.keep(&at, kept);
        // Another process writes the file: it is loaded afresh.
        fs::write(&at, b"not a stat cache").unwrap();
        set_mtime(&at, 1_000_000_000).unwrap();
        assert!(caches.take(&at).files.is_empty());
        fs::write(&at, bytes).unwrap();
        assert_eq!(caches.take(&at).files.len(), 1);
    }

    #[test]
    fn only_the_most_recent_stat_caches_are_kept() {
        let home = tempfile::tempdir().unwrap();
        let ctx = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..KEPT_STAT_CACHES + 3)
            .map(|i| StatCache::path(home.path(), &ctx.path().join(i.to_string())))
            .collect();
        for (i, p) in paths.iter().enumerate() {
            StatCache::default().save(p).unwrap();
            // Saved one after another, a second apart as the clock sees it.
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64);
            fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let left = fs::read_dir(paths[0].parent().unwrap()).unwrap().count();
        assert_eq!(left, KEPT_STAT_CACHES);
        assert!(!paths[0].exists() && !paths[1].exists());
        assert!(paths[KEPT_STAT_CACHES + 2].exists());
    }

    #[test]
    fn a_hostile_directory_blob_is_refused() {
        let d = Digest::of(b"x");
        let entry = |name: &[u8]| DirEntry {
            name: name.to_vec(),
            kind: EntryKind::Dir(d),
        };
        let dir = |entries| Directory {
            mode: 0o755,
            mtime: 0,
            entries,
        };
        for bad in [
            dir(vec![entry(b"..")]),
            dir(vec![entry(b"a/b")]),
            dir(vec![entry(b"")]),
            dir(vec![entry(b"b"), entry(b"a")]),
            dir(vec![entry(b"a"), entry(b"a")]),
        ] {
            let bytes = bad.encode();
            assert!(
                matches!(
                    Directory::decode(&Digest::of(&bytes), &bytes),
                    Err(ContextError::BadDirectory { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(Directory::decode(&d, b"not a directory").is_err());
        let good = dir(vec![entry(b"a"), entry(b"b")]).encode();
        assert!(Directory::decode(&Digest::of(&good), &good).is_ok());
    }

    #[test]
    fn a_tree_that_expands_past_the_bound_is_refused_not_written() {
        // Each level names the one below twice: 2^40 paths from 40 blobs.
        let store_dir = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(store_dir.path()).unwrap();
        let mut below = cas
            .put(
                &Directory {
                    mode: 0o755,
                    mtime: 0,
                    entries: vec![],
                }
                .encode(),
            )
            .unwrap();
        for _ in 0..40 {
            let node = Directory {
                mode: 0o755,
                mtime: 0,
                entries: vec![
                    DirEntry {
                        name: b"a".to_vec(),
                        kind: EntryKind::Dir(below),
                    },
                    DirEntry {
                        name: b"b".to_vec(),
                        kind: EntryKind::Dir(below),
                    },
                ],
            };
            below = cas.put(&node.encode()).unwrap();
        }
        let c = closure(&cas, &below).unwrap();
        assert_eq!(c.dirs.len(), 41, "each blob is read once");
        let out = tempfile::tempdir().unwrap();
        assert!(matches!(
            materialize(&cas, &below, out.path()),
            Err(ContextError::TooLarge(_))
        ));
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
