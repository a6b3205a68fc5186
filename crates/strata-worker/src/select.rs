//! Which files a COPY (or a bind mount) takes from its source, and the
//! digest of their content.
//!
//! Sources are resolved inside their root: a symlink named as a source is
//! followed, but only within the root, so a COPY can never read outside
//! the build context. Wildcards expand component by component with Go's
//! `filepath.Match` rules; `.dockerignore` hides context files; `--exclude`
//! patterns apply relative to each source.

use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use strata_cas::Digest;
use strata_dockerfile::{IgnoreMatcher, clean_path};
use strata_snapshot::resolve_path;

use crate::error::FileError;

/// A root files are taken from.
pub struct SourceRoot<'a> {
    /// The directory on the host.
    pub root: &'a Path,
    /// `.dockerignore` of the context; `None` for stages and images.
    pub ignore: Option<&'a IgnoreMatcher>,
    /// Whether owners are kept (stage and image sources) or reset (the
    /// context, whose owners are whoever checked it out).
    pub keep_owner: bool,
}

/// One matched source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Which source argument matched it.
    pub spec: usize,
    /// Where it is on the host.
    pub host: PathBuf,
    /// Its path relative to the root (`""` for the root itself).
    pub rel: String,
    /// Whether it is a directory (after following a symlink).
    pub is_dir: bool,
}

/// One file, directory or link below an item.
pub struct Entry<'a> {
    /// Path relative to the item (`""` for an item that is a file).
    pub rel: &'a str,
    /// Where it is on the host.
    pub host: &'a Path,
    /// Its metadata (not following symlinks, except for the item itself).
    pub meta: &'a Metadata,
}

/// Whether a source path has wildcards (`*`, `?`, `[`).
pub fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn ignored(src: &SourceRoot<'_>, rel: &str) -> bool {
    !rel.is_empty() && src.ignore.is_some_and(|m| m.matches(rel))
}

/// Whether `.dockerignore` hides the path `rel` names, which resolved
/// (through symlinks) to `host`: both the name and what it resolved to
/// count, so a symlink in the context never reaches an ignored file, as
/// in BuildKit, whose context never holds ignored files at all.
fn hidden(src: &SourceRoot<'_>, rel: &str, host: &Path, is_dir: bool) -> bool {
    let check = |r: &str| ignores(src.ignore, r, is_dir);
    if check(rel) {
        return true;
    }
    host.strip_prefix(src.root)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
        .is_some_and(|through| through != rel && check(&through))
}

/// Whether `ignore` (`.dockerignore`) leaves out the entry at `rel`, a
/// directory if `is_dir`: an ignored directory that an exception pattern
/// reaches into is kept, as Docker's context walker keeps it.
pub fn ignores(ignore: Option<&IgnoreMatcher>, rel: &str, is_dir: bool) -> bool {
    !rel.is_empty()
        && ignore.is_some_and(|m| m.matches(rel) && !(is_dir && m.may_include_below(rel)))
}

/// Resolves the source arguments to items. A missing plain path is an
/// error; a wildcard that matches nothing is not (as in BuildKit).
pub fn select(src: &SourceRoot<'_>, specs: &[String]) -> Result<Vec<Item>, FileError> {
    let mut items = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let cleaned = clean_path(&format!("/{spec}"));
        let rel = cleaned.trim_start_matches('/').to_string();
        if has_wildcard(&rel) {
            let mut found = Vec::new();
            glob(
                src,
                Path::new(src.root),
                "",
                &rel.split('/').collect::<Vec<_>>(),
                &mut found,
            )?;
            found.sort();
            for (rel, host) in found {
                let is_dir = fs::metadata(&host).map(|m| m.is_dir()).unwrap_or(false);
                items.push(Item {
                    spec: i,
                    host,
                    rel,
                    is_dir,
                });
            }
            continue;
        }
        let not_found = || FileError::NotFound { spec: spec.clone() };
        let host = resolve_path(src.root, &rel, true).map_err(FileError::resolve(spec))?;
        let meta = fs::metadata(&host).map_err(|_| not_found())?;
        if hidden(src, &rel, &host, meta.is_dir()) {
            return Err(not_found());
        }
        items.push(Item {
            spec: i,
            host,
            rel,
            is_dir: meta.is_dir(),
        });
    }
    Ok(items)
}

fn glob(
    src: &SourceRoot<'_>,
    dir: &Path,
    rel: &str,
    parts: &[&str],
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), FileError> {
    let Some((first, rest)) = parts.split_first() else {
        out.push((rel.to_string(), dir.to_path_buf()));
        return Ok(());
    };
    let join = |name: &str| {
        if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        }
    };
    if !has_wildcard(first) {
        let next_rel = join(first);
        if let Ok(host) = resolve_path(src.root, &next_rel, true)
            && host.symlink_metadata().is_ok()
            && !hidden(src, &next_rel, &host, host.is_dir())
        {
            return glob(src, &host, &next_rel, rest, out);
        }
        return Ok(());
    }
    let pattern = globset::GlobBuilder::new(first)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|source| FileError::Wildcard {
            pattern: first.to_string(),
            source,
        })?
        .compile_matcher();
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    let mut names: Vec<OsString> = entries.flatten().map(|e| e.file_name()).collect();
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let Some(n) = name.to_str() else { continue };
        if !pattern.is_match(n) {
            continue;
        }
        let next_rel = join(n);
        let host =
            resolve_path(src.root, &next_rel, true).map_err(FileError::resolve(&next_rel))?;
        if hidden(src, &next_rel, &host, host.is_dir()) {
            continue;
        }
        glob(src, &host, &next_rel, rest, out)?;
    }
    Ok(())
}

/// Visits everything an item brings: the item itself when it is a file,
/// or (for a directory) everything below it, parents before children, in
/// byte order. Ignored and excluded paths are skipped.
pub fn walk<E: From<FileError>>(
    src: &SourceRoot<'_>,
    item: &Item,
    excludes: Option<&IgnoreMatcher>,
    visit: &mut dyn FnMut(&Entry<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let meta = fs::metadata(&item.host).map_err(FileError::io("read", &item.host))?;
    if !meta.is_dir() {
        return visit(&Entry {
            rel: "",
            host: &item.host,
            meta: &meta,
        });
    }
    let mut stack: Vec<(PathBuf, String)> = vec![(item.host.clone(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut subdirs = Vec::new();
        for e in listed(src, item, excludes, &dir, &rel)? {
            visit(&Entry {
                rel: &e.rel,
                host: &e.host,
                meta: &e.meta,
            })?;
            if e.meta.is_dir() {
                subdirs.push((e.host, e.rel));
            }
        }
        // Pushed in reverse, so directories are entered in byte order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// An entry [`walk`] or [`walk_all`] found, owned.
#[derive(Debug)]
pub struct Walked {
    /// Path relative to the item.
    pub rel: String,
    /// Where it is on the host.
    pub host: PathBuf,
    /// Its metadata, not following a symlink.
    pub meta: Metadata,
}

/// What [`walk`] visits in directory `dir` (at `rel` below `item`), in
/// byte order: each entry stat'ed relative to the open directory
/// (fstatat, not following a link), ignored and excluded ones left out.
fn listed(
    src: &SourceRoot<'_>,
    item: &Item,
    excludes: Option<&IgnoreMatcher>,
    dir: &Path,
    rel: &str,
) -> Result<Vec<Walked>, FileError> {
    let entries = fs::read_dir(dir).map_err(FileError::io("list", dir))?;
    let mut listed: Vec<(OsString, fs::DirEntry)> =
        entries.flatten().map(|e| (e.file_name(), e)).collect();
    listed.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = Vec::with_capacity(listed.len());
    for (name, entry) in listed {
        let child_rel = if rel.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{rel}/{}", name.to_string_lossy())
        };
        let root_rel = if item.rel.is_empty() {
            std::borrow::Cow::Borrowed(child_rel.as_str())
        } else {
            std::borrow::Cow::Owned(format!("{}/{child_rel}", item.rel))
        };
        let host = dir.join(&name);
        let meta = entry.metadata().map_err(FileError::io("read", &host))?;
        // Ignored entries are skipped; an ignored directory that an
        // exception reaches into is kept and entered, as Docker does.
        let skip = if ignored(src, &root_rel) {
            !(meta.is_dir() && src.ignore.is_some_and(|m| m.may_include_below(&root_rel)))
        } else {
            excludes.is_some_and(|x| {
                x.matches(&child_rel) && !(meta.is_dir() && x.may_include_below(&child_rel))
            })
        };
        if !skip {
            out.push(Walked {
                rel: child_rel,
                host,
                meta,
            });
        }
    }
    Ok(out)
}

/// Everything [`walk`] visits below directory item `item`, in no
/// particular order, its directories listed on `threads` threads at once;
/// `None` once more than `limit` entries are found (the listing stops
/// there).
pub fn walk_all(
    src: &SourceRoot<'_>,
    item: &Item,
    threads: usize,
    limit: usize,
) -> Result<Option<Vec<Walked>>, FileError> {
    use std::sync::{Condvar, Mutex, PoisonError};
    /// Directories waiting to be listed, how many are being listed, and
    /// what was found.
    struct Work {
        dirs: Vec<(PathBuf, String)>,
        busy: usize,
        found: Vec<Walked>,
        over: bool,
        failed: Option<FileError>,
    }
    let work = Mutex::new(Work {
        dirs: vec![(item.host.clone(), String::new())],
        busy: 0,
        found: Vec::new(),
        over: false,
        failed: None,
    });
    let ready = Condvar::new();
    let lister = || {
        let mut w = work.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if w.over || w.failed.is_some() {
                break;
            }
            let Some((dir, rel)) = w.dirs.pop() else {
                if w.busy == 0 {
                    break;
                }
                w = ready.wait(w).unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            w.busy += 1;
            drop(w);
            let got = listed(src, item, None, &dir, &rel);
            w = work.lock().unwrap_or_else(PoisonError::into_inner);
            w.busy -= 1;
            match got {
                Ok(entries) => {
                    for e in entries {
                        if e.meta.is_dir() {
                            w.dirs.push((e.host.clone(), e.rel.clone()));
                        }
                        w.found.push(e);
                    }
                    w.over = w.found.len() > limit;
                }
                Err(e) => w.failed = Some(e),
            }
            ready.notify_all();
        }
        // Whoever stops wakes the others to see why.
        ready.notify_all();
    };
    std::thread::scope(|s| {
        for _ in 1..threads.max(1) {
            s.spawn(lister);
        }
        lister();
    });
    let w = work.into_inner().unwrap_or_else(PoisonError::into_inner);
    match (w.failed, w.over) {
        (Some(e), _) => Err(e),
        (None, true) => Ok(None),
        (None, false) => Ok(Some(w.found)),
    }
}

/// Writes what `items` select in `src` (minus `excludes`) as a tar to
/// `out`, each entry at its path relative to the root, in the order
/// [`walk`] visits them: modes, times, link targets, and owners where the
/// source keeps them (stages and images; context files belong to root).
/// Unpacked, the tree selects the same items with the same specs: it is
/// what a COPY from the source can read, and nothing else.
pub fn pack(
    src: &SourceRoot<'_>,
    items: &[Item],
    excludes: Option<&IgnoreMatcher>,
    out: &mut dyn std::io::Write,
) -> Result<(), FileError> {
    use std::os::unix::fs::MetadataExt as _;
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    for item in items {
        let mut append = |e: &Entry<'_>| -> Result<(), FileError> {
            let path = match (item.rel.is_empty(), e.rel.is_empty()) {
                (true, true) => return Ok(()),
                (true, false) => e.rel.to_string(),
                (false, true) => item.rel.clone(),
                (false, false) => format!("{}/{}", item.rel, e.rel),
            };
            let fail = |err| FileError::io("pack", e.host)(err);
            let ft = e.meta.file_type();
            let mut h = tar::Header::new_gnu();
            h.set_mode(e.meta.mode() & 0o7777);
            h.set_mtime(u64::try_from(e.meta.mtime()).unwrap_or(0));
            let (uid, gid) = if src.keep_owner {
                (e.meta.uid(), e.meta.gid())
            } else {
                (0, 0)
            };
            h.set_uid(u64::from(uid));
            h.set_gid(u64::from(gid));
            h.set_size(0);
            if ft.is_dir() {
                h.set_entry_type(tar::EntryType::Directory);
                tar.append_data(&mut h, &path, std::io::empty())
                    .map_err(fail)
            } else if ft.is_symlink() {
                let target = fs::read_link(e.host).map_err(fail)?;
                h.set_entry_type(tar::EntryType::Symlink);
                tar.append_link(&mut h, &path, target).map_err(fail)
            } else if ft.is_file() {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(e.meta.len());
                let f = fs::File::open(e.host).map_err(fail)?;
                tar.append_data(&mut h, &path, f).map_err(fail)
            } else {
                // Sockets, fifos and devices are not copied.
                Ok(())
            }
        };
        walk(src, item, excludes, &mut append)?;
    }
    tar.finish().map_err(FileError::io(
        "finish the tar of",
        Path::new("the selection"),
    ))
}

/// Copies what a source shows (everything `.dockerignore` does not hide)
/// into the empty directory `dest`: files, directories, symlinks, modes
/// and times. A bind mount of the build context shows this copy, never the
/// ignored files beside it.
pub fn copy_visible(src: &SourceRoot<'_>, dest: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::PermissionsExt as _;
    let items = select(src, &[".".to_string()])?;
    let mut dirs = Vec::new();
    for item in &items {
        walk(src, item, None, &mut |e| -> Result<(), FileError> {
            let to = dest.join(e.rel);
            let fail = |err| FileError::io("copy", e.host)(err);
            let ft = e.meta.file_type();
            if ft.is_dir() {
                fs::create_dir_all(&to).map_err(fail)?;
                dirs.push((to, e.meta.mode(), e.meta.mtime()));
            } else if ft.is_symlink() {
                let target = fs::read_link(e.host).map_err(fail)?;
                std::os::unix::fs::symlink(target, &to).map_err(fail)?;
            } else if ft.is_file() {
                fs::copy(e.host, &to).map_err(fail)?;
                fs::set_permissions(&to, fs::Permissions::from_mode(e.meta.mode() & 0o7777))
                    .map_err(fail)?;
                strata_snapshot::set_mtime(&to, e.meta.mtime())
                    .map_err(FileError::snapshot("set the time of", &to))?;
            }
            Ok(())
        })?;
    }
    // Children change their directory's time: directories go last.
    for (dir, mode, mtime) in dirs.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode & 0o7777))
            .map_err(FileError::io("chmod", &dir))?;
        strata_snapshot::set_mtime(&dir, mtime)
            .map_err(FileError::snapshot("set the time of", &dir))?;
    }
    Ok(())
}

/// Names what [`checksum`] covers; changing that changes this.
pub const CHECKSUM_VERSION: &[u8] = b"strata.selection.v1\0";

/// Content digests of host files by what their stat says (device, inode,
/// size, modification and change times), as git's index and BuildKit's
/// fsutil keep them: a build context checksummed again reads only the
/// files whose stat changed. A file changed within [`FileDigests::RACY`]
/// of being read is not remembered (a later change in the same clock tick
/// could keep its stat). Kept in memory for the life of the process (the
/// local daemon's, a worker's), at most [`FileDigests::MAX`] files.
#[derive(Debug, Default)]
pub struct FileDigests {
    known: std::sync::Mutex<std::collections::HashMap<FileStat, [u8; 32]>>,
}

/// What identifies a file's content, short of reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileStat {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStat {
    fn of(m: &Metadata) -> FileStat {
        FileStat {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

impl FileDigests {
    /// Files remembered at most; past that, all are forgotten at once.
    pub const MAX: usize = 500_000;

    /// How recent a change keeps a file's digest from being remembered.
    pub const RACY: std::time::Duration = std::time::Duration::from_secs(2);

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<FileStat, [u8; 32]>> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, stat: &FileStat) -> Option<[u8; 32]> {
        self.lock().get(stat).copied()
    }

    /// Remembers `digest` for a file of `stat` read at `now`, unless it
    /// changed within [`FileDigests::RACY`] of it.
    fn put(&self, stat: FileStat, digest: [u8; 32], now: std::time::SystemTime) {
        let now_ns = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
        let settled = now_ns - i128::try_from(Self::RACY.as_nanos()).unwrap_or(i128::MAX);
        if stat.mtime_ns >= settled || stat.ctime_ns >= settled {
            return;
        }
        let mut known = self.lock();
        if known.len() >= Self::MAX {
            known.clear();
        }
        known.insert(stat, digest);
    }

    /// How many files it remembers.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it remembers none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The digest of what `specs` select in `src`: paths, types, modes,
/// contents, link targets, extended attributes (and owners, for stage and
/// image sources). Modification times and the root's own path are not part
/// of it, so the same files give the same digest in any checkout. Files
/// whose content digest `known` holds by their stat are not read again;
/// those read are added to it.
pub fn checksum(
    src: &SourceRoot<'_>,
    specs: &[String],
    excludes: &[String],
    known: Option<&FileDigests>,
) -> Result<Digest, FileError> {
    checksum_at(src, specs, excludes, known, std::time::SystemTime::now())
}

/// [`checksum`], as if read at `now` (files changed within
/// [`FileDigests::RACY`] of it are not remembered).
fn checksum_at(
    src: &SourceRoot<'_>,
    specs: &[String],
    excludes: &[String],
    known: Option<&FileDigests>,
    now: std::time::SystemTime,
) -> Result<Digest, FileError> {
    let exclude = exclude_matcher(excludes)?;
    let items = select(src, specs)?;
    let mut sum = SelectionSum::new(specs);
    for item in &items {
        sum.item(item.spec, &item.rel, item.is_dir);
        walk(src, item, exclude.as_ref(), &mut |e| {
            hash_entry(&mut sum, src, e, known, now)
        })?;
    }
    Ok(sum.finish())
}

/// What [`checksum`] feeds its hash, in the order it is fed: the specs,
/// then each item and the entries [`walk`] visits below it. A source that
/// is not a host directory (a build context's tree) gives the digest its
/// files would give by feeding the same, in the same order.
pub struct SelectionSum(blake3::Hasher);

impl SelectionSum {
    /// A sum of what `specs` select.
    pub fn new(specs: &[String]) -> SelectionSum {
        let mut h = blake3::Hasher::new();
        h.update(CHECKSUM_VERSION);
        for (i, s) in specs.iter().enumerate() {
            feed(&mut h, format!("spec {i} {s}").as_bytes());
        }
        SelectionSum(h)
    }

    /// An item spec `spec` matched, at `rel` in the source.
    pub fn item(&mut self, spec: usize, rel: &str, is_dir: bool) {
        feed(
            &mut self.0,
            format!("item {spec} {rel} {is_dir}").as_bytes(),
        );
    }

    /// An entry at `rel` below its item: its kind (`d`, `f`, `l`, `c`,
    /// `b`, `p`, `s`), permission bits, owner (for sources that keep
    /// owners) and device number (for devices).
    pub fn entry(
        &mut self,
        kind: char,
        mode: u32,
        rel: &str,
        owner: Option<(u32, u32)>,
        device: Option<u64>,
    ) {
        let mut line = format!("{kind} {:o} {rel}", mode & 0o7777);
        if let Some((uid, gid)) = owner {
            line.push_str(&format!(" {uid}:{gid}"));
        }
        if let Some(rdev) = device {
            line.push_str(&format!(" dev {rdev}"));
        }
        feed(&mut self.0, line.as_bytes());
    }

    /// The target of the link just entered.
    pub fn link_target(&mut self, target: &[u8]) {
        feed(&mut self.0, target);
    }

    /// The content digest (blake3) of the file just entered.
    pub fn content(&mut self, digest: &[u8; 32]) {
        self.0.update(digest);
    }

    /// An extended attribute of the entry just entered.
    pub fn xattr(&mut self, name: &[u8], value: &[u8]) {
        feed(&mut self.0, name);
        feed(&mut self.0, value);
    }

    /// The digest.
    pub fn finish(self) -> Digest {
        Digest(*self.0.finalize().as_bytes())
    }
}

/// `--exclude` patterns as a matcher (none when there are none).
pub fn exclude_matcher(excludes: &[String]) -> Result<Option<IgnoreMatcher>, FileError> {
    if excludes.is_empty() {
        return Ok(None);
    }
    IgnoreMatcher::new(excludes)
        .map(Some)
        .map_err(FileError::Exclude)
}

fn feed(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn hash_entry(
    h: &mut SelectionSum,
    src: &SourceRoot<'_>,
    e: &Entry<'_>,
    known: Option<&FileDigests>,
    now: std::time::SystemTime,
) -> Result<(), FileError> {
    let ft = e.meta.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        'f'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else {
        's'
    };
    h.entry(
        kind,
        e.meta.mode(),
        e.rel,
        src.keep_owner.then(|| (e.meta.uid(), e.meta.gid())),
        (ft.is_char_device() || ft.is_block_device()).then(|| e.meta.rdev()),
    );
    if ft.is_symlink() {
        let t = fs::read_link(e.host).map_err(FileError::io("read link", e.host))?;
        h.link_target(t.as_os_str().as_bytes());
    } else if ft.is_file() {
        let stat = FileStat::of(e.meta);
        let digest = match known.and_then(|k| k.get(&stat)) {
            Some(d) => d,
            None => {
                let mut f = fs::File::open(e.host).map_err(FileError::io("read", e.host))?;
                // Read through a buffer on the stack: a zeroed buffer on
                // the heap for each of 30,000 small files cost more than
                // reading them.
                let mut content = blake3::Hasher::new();
                content
                    .update_reader(&mut f)
                    .map_err(FileError::io("read", e.host))?;
                let d = *content.finalize().as_bytes();
                if let Some(k) = known {
                    k.put(stat, d, now);
                }
                d
            }
        };
        h.content(&digest);
    }
    if !ft.is_symlink()
        && let Ok(names) = xattr::list(e.host)
    {
        let mut names: Vec<OsString> = names.collect();
        names.sort();
        for n in names {
            if let Ok(Some(v)) = xattr::get(e.host, &n) {
                h.xattr(n.as_bytes(), &v);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(dir: &Path) -> SourceRoot<'_> {
        SourceRoot {
            root: dir,
            ignore: None,
            keep_owner: false,
        }
    }

    #[test]
    fn walking_on_several_threads_finds_what_walk_visits_and_stops_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for d in 0..20 {
            let sub = p.join(format!("pkg{d:02}/lib"));
            fs::create_dir_all(&sub).unwrap();
            for f in 0..10 {
                fs::write(sub.join(format!("f{f}.js")), b"x").unwrap();
            }
            fs::write(p.join(format!("pkg{d:02}/notes.md")), b"n").unwrap();
        }
        std::os::unix::fs::symlink("pkg00", p.join("link")).unwrap();
        let ignore = IgnoreMatcher::new(&["**/*.md".to_string(), "pkg19".to_string()]).unwrap();
        let src = SourceRoot {
            root: p,
            ignore: Some(&ignore),
            keep_owner: false,
        };
        let item = &select(&src, &[".".to_string()]).unwrap()[0];
        let mut walked = Vec::new();
        walk(
            &src,
            item,
            None,
            &mut |e: &Entry<'_>| -> Result<(), FileError> {
                walked.push(e.rel.to_string());
                Ok(())
            },
        )
        .unwrap();
        for threads in [1, 2, 8] {
            let mut all: Vec<String> = walk_all(&src, item, threads, 10_000)
                .unwrap()
                .unwrap()
                .into_iter()
                .map(|e| e.rel)
                .collect();
            all.sort();
            let mut want = walked.clone();
            want.sort();
            assert_eq!(all, want, "{threads} threads");
        }
        // 19 packages of a folder and 10 files, and the link.
        assert_eq!(walked.len(), 19 * 12 + 1);
        assert!(
            !walked
                .iter()
                .any(|r| r.ends_with(".md") || r.starts_with("pkg19"))
        );
        assert!(walk_all(&src, item, 2, 100).unwrap().is_none());
    }

    #[test]
    fn a_context_file_is_read_again_only_when_its_stat_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::create_dir(p.join("src")).unwrap();
        fs::write(p.join("src/a.js"), b"one").unwrap();
        fs::write(p.join("b.js"), b"two").unwrap();
        let root = context(p);
        let specs = [".".to_string()];
        let known = FileDigests::default();
        let plain = checksum(&root, &specs, &[], None).unwrap();
        // Just written: read, and not remembered.
        let now = std::time::SystemTime::now();
        assert_eq!(
            checksum_at(&root, &specs, &[], Some(&known), now).unwrap(),
            plain
        );
        assert!(known.is_empty());
        // Read well after: remembered by stat, the digest unchanged.
        let later = now + std::time::Duration::from_secs(10);
        assert_eq!(
            checksum_at(&root, &specs, &[], Some(&known), later).unwrap(),
            plain
        );
        assert_eq!(known.len(), 2);
        let stat = FileStat::of(&fs::metadata(p.join("b.js")).unwrap());
        assert_eq!(known.get(&stat), Some(*blake3::hash(b"two").as_bytes()));
        assert_eq!(
            checksum_at(&root, &specs, &[], Some(&known), later).unwrap(),
            plain
        );
        // Rewritten with the same size: its stat moves, so it is read.
        fs::write(p.join("b.js"), b"TWO").unwrap();
        let edited = checksum_at(&root, &specs, &[], Some(&known), later).unwrap();
        assert_ne!(edited, plain);
        assert_eq!(edited, checksum(&root, &specs, &[], None).unwrap());
    }

    #[test]
    fn a_source_that_cannot_be_selected_says_which_and_why() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("b", dir.path().join("a")).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("b")).unwrap();
        let src = context(dir.path());

        let missing = select(&src, &["nothing".into()]).unwrap_err();
        assert!(matches!(&missing, FileError::NotFound { spec } if spec == "nothing"));
        assert_eq!(missing.to_string(), "\"nothing\": not found");

        // A symlink loop: the error names the path, its cause the loop.
        let looped = select(&src, &["a/x".into()]).unwrap_err();
        assert!(matches!(&looped, FileError::Resolve { path, .. } if path == "a/x"));
        let cause = std::error::Error::source(&looped).map(ToString::to_string);
        assert!(
            cause
                .as_deref()
                .is_some_and(|c| c.contains("symbolic links")),
            "{cause:?}"
        );

        let bad = select(&src, &["[".into()]).unwrap_err();
        assert!(matches!(&bad, FileError::Wildcard { pattern, .. } if pattern == "["));
        assert!(std::error::Error::source(&bad).is_some());

        // A wildcard that matches nothing is no error.
        assert_eq!(select(&src, &["*.none".into()]).unwrap(), Vec::new());
    }
}
