//! COPY and ADD into a step's root filesystem, with Docker's rules for
//! destinations: a trailing `/`, an existing directory, several sources or
//! a directory source make the destination a directory; a directory source
//! contributes its contents; files from the context belong to root unless
//! `--chown` says otherwise.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use strata_plan::CopyOp;
use strata_snapshot::{TarKind, apply_tar_with, resolve_path, set_mtime};

use crate::error::FileError;
use crate::select::{Item, SourceRoot, exclude_matcher, select, walk};
use crate::users;

/// A file `ADD` downloaded: the name it gets, its bytes and its mtime.
pub struct Fetched {
    /// The file name (see [`strata_plan::RemoteFile::name`]).
    pub name: String,
    /// The content.
    pub content: Box<dyn Read>,
    /// Modification time (the server's `Last-Modified`).
    pub mtime: i64,
}

/// Runs `op` into the root filesystem at `dest_root`, reading from `src`
/// (absent when the op copies only inline files) and `fetched` (the op's
/// downloads, in order).
pub fn copy(
    op: &CopyOp,
    src: Option<&SourceRoot<'_>>,
    fetched: Vec<Fetched>,
    dest_root: &Path,
) -> Result<(), FileError> {
    let owner = match &op.chown {
        Some(spec) => {
            let id = users::resolve(dest_root, spec, false)?;
            Some((id.uid, id.gid))
        }
        None => None,
    };
    let items = match src {
        Some(s) if !op.sources.is_empty() => select(s, &op.sources)?,
        _ => Vec::new(),
    };
    let dest_path = op.dest.trim_end_matches('/');
    let dest_host =
        resolve_path(dest_root, dest_path, true).map_err(FileError::resolve(dest_path))?;
    // Several source arguments make the destination a directory; several
    // matches of one wildcard do not (each lands on the destination in
    // turn, the last one staying, as in BuildKit).
    let dest_is_dir = op.dest.ends_with('/')
        || fs::metadata(&dest_host)
            .map(|m| m.is_dir())
            .unwrap_or(false)
        || op.sources.len() + op.inline.len() + op.urls.len() > 1
        || (items.len() == 1 && items[0].is_dir && !op.parents);
    let excludes = exclude_matcher(&op.excludes)?;
    let mut w = Writer {
        owner,
        keep_owner: src.is_some_and(|s| s.keep_owner),
        chmod: op.chmod,
        links: HashMap::new(),
        dirs: Vec::new(),
    };

    if !dest_is_dir {
        // One file (or inline document) to exactly `dest`.
        let parent = Path::new(dest_path)
            .parent()
            .and_then(Path::to_str)
            .unwrap_or("/");
        let parent_host = w.ensure_dir(dest_root, parent)?;
        let name = Path::new(dest_path)
            .file_name()
            .ok_or_else(|| FileError::Destination(op.dest.clone()))?;
        let target = parent_host.join(name);
        if let Some(f) = op.inline.first() {
            w.inline(&target, &f.data, f.mode)?;
        }
        if let Some(f) = fetched.into_iter().next() {
            w.fetched(&target, f)?;
        }
        for item in &items {
            let Some(s) = src else { break };
            if item.is_dir {
                let dir = w.ensure_dir(dest_root, dest_path)?;
                copy_dir(&mut w, s, item, excludes.as_ref(), &dir)?;
            } else if op.unpack && is_archive(&item.host) {
                let dir = w.ensure_dir(dest_root, dest_path)?;
                unpack(&item.host, &dir)?;
            } else {
                walk(s, item, excludes.as_ref(), &mut |e| {
                    w.put(e.host, e.meta, &target).map(|_| ())
                })?;
            }
        }
        return w.finish();
    }

    let dest_dir = w.ensure_dir(dest_root, dest_path)?;
    for item in &items {
        let Some(s) = src else { break };
        let base = if op.parents {
            let parent = Path::new(&item.rel)
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if parent.is_empty() {
                dest_dir.clone()
            } else {
                w.ensure_dir(dest_root, &format!("{dest_path}/{parent}"))?
            }
        } else {
            dest_dir.clone()
        };
        if item.is_dir {
            let target = if op.parents && !item.rel.is_empty() {
                w.ensure_dir(dest_root, &format!("{dest_path}/{}", item.rel))?
            } else {
                base
            };
            copy_dir(&mut w, s, item, excludes.as_ref(), &target)?;
        } else if op.unpack && is_archive(&item.host) {
            unpack(&item.host, &base)?;
        } else {
            let name = Path::new(&item.rel)
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            let target = base.join(name);
            walk(s, item, excludes.as_ref(), &mut |e| {
                w.put(e.host, e.meta, &target).map(|_| ())
            })?;
        }
    }
    for f in &op.inline {
        w.inline(&dest_dir.join(&f.name), &f.data, f.mode)?;
    }
    for f in fetched {
        w.fetched(&dest_dir.join(&f.name), f)?;
    }
    w.finish()
}

fn copy_dir(
    w: &mut Writer,
    s: &SourceRoot<'_>,
    item: &Item,
    excludes: Option<&strata_dockerfile::IgnoreMatcher>,
    target: &Path,
) -> Result<(), FileError> {
    // Where each copied directory landed, so children follow it even when
    // the destination already had a symlink there.
    let mut placed: HashMap<String, PathBuf> = HashMap::new();
    placed.insert(String::new(), target.to_path_buf());
    walk(s, item, excludes, &mut |e| {
        let (parent_rel, name) = match e.rel.rsplit_once('/') {
            Some((p, n)) => (p, n),
            None => ("", e.rel),
        };
        let parent = match placed.get(parent_rel) {
            Some(p) => p.clone(),
            // A parent hidden by .dockerignore while its child is not.
            None => {
                let p = target.join(parent_rel);
                fs::create_dir_all(&p).map_err(FileError::io("create", &p))?;
                p
            }
        };
        let dest = parent.join(name);
        let landed = w.put(e.host, e.meta, &dest)?;
        if e.meta.is_dir() {
            placed.insert(e.rel.to_string(), landed);
        }
        Ok(())
    })
}

/// Writes copied entries with the right owner, mode, links and times.
struct Writer {
    owner: Option<(u32, u32)>,
    keep_owner: bool,
    chmod: Option<u32>,
    /// First destination of each multiply-linked source inode.
    links: HashMap<(u64, u64), PathBuf>,
    /// Directories whose times are set last.
    dirs: Vec<(PathBuf, i64)>,
}

impl Writer {
    fn ids(&self, meta: &fs::Metadata) -> (u32, u32) {
        match self.owner {
            Some(o) => o,
            None if self.keep_owner => (meta.uid(), meta.gid()),
            None => (0, 0),
        }
    }

    /// Makes `path` (absolute inside the root) a directory, creating what
    /// is missing with the copy's owner; returns where it is on the host.
    fn ensure_dir(&self, root: &Path, path: &str) -> Result<PathBuf, FileError> {
        make_dirs(root, path, self.owner.unwrap_or((0, 0)))
    }

    fn inline(&mut self, target: &Path, data: &str, mode: u32) -> Result<(), FileError> {
        remove_non_dir(target)?;
        fs::write(target, data).map_err(FileError::io("write", target))?;
        let (uid, gid) = self.owner.unwrap_or((0, 0));
        std::os::unix::fs::lchown(target, Some(uid), Some(gid))
            .map_err(FileError::io("chown", target))?;
        fs::set_permissions(
            target,
            fs::Permissions::from_mode(self.chmod.unwrap_or(mode)),
        )
        .map_err(FileError::io("chmod", target))
    }

    /// Writes a download: owned by `--chown` (else root), mode `--chmod`
    /// (else 0600, as BuildKit gives downloads).
    fn fetched(&mut self, target: &Path, mut f: Fetched) -> Result<(), FileError> {
        remove_non_dir(target)?;
        let mut out = fs::File::create(target).map_err(FileError::io("create", target))?;
        io::copy(&mut f.content, &mut out).map_err(FileError::io("write", target))?;
        let (uid, gid) = self.owner.unwrap_or((0, 0));
        std::os::unix::fs::lchown(target, Some(uid), Some(gid))
            .map_err(FileError::io("chown", target))?;
        fs::set_permissions(
            target,
            fs::Permissions::from_mode(self.chmod.unwrap_or(0o600)),
        )
        .map_err(FileError::io("chmod", target))?;
        set_mtime(target, f.mtime).map_err(FileError::snapshot("set the time of", target))
    }

    /// Copies one entry to `dest`; returns where a directory landed.
    fn put(&mut self, host: &Path, meta: &fs::Metadata, dest: &Path) -> Result<PathBuf, FileError> {
        let ft = meta.file_type();
        let (uid, gid) = self.ids(meta);
        if ft.is_dir() {
            let landed = match fs::metadata(dest) {
                Ok(m) if m.is_dir() => {
                    fs::canonicalize(dest).unwrap_or_else(|_| dest.to_path_buf())
                }
                _ => {
                    remove_non_dir(dest)?;
                    fs::create_dir(dest).map_err(FileError::io("create", dest))?;
                    dest.to_path_buf()
                }
            };
            std::os::unix::fs::lchown(&landed, Some(uid), Some(gid))
                .map_err(FileError::io("chown", &landed))?;
            let mode = self.chmod.unwrap_or(meta.mode() & 0o7777);
            fs::set_permissions(&landed, fs::Permissions::from_mode(mode))
                .map_err(FileError::io("chmod", &landed))?;
            copy_xattrs(host, &landed);
            self.dirs.push((landed.clone(), meta.mtime()));
            return Ok(landed);
        }
        remove_non_dir(dest)?;
        if ft.is_file() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                fs::hard_link(first, dest).map_err(FileError::io("link", dest))?;
                return Ok(dest.to_path_buf());
            }
            self.links.insert(key, dest.to_path_buf());
        }
        if ft.is_symlink() {
            let t = fs::read_link(host).map_err(FileError::io("read link", host))?;
            std::os::unix::fs::symlink(&t, dest).map_err(FileError::io("create link", dest))?;
        } else if ft.is_file() {
            let mut from = fs::File::open(host).map_err(FileError::io("read", host))?;
            let mut to = fs::File::create(dest).map_err(FileError::io("create", dest))?;
            io::copy(&mut from, &mut to).map_err(FileError::io("copy to", dest))?;
        } else {
            let kind = if ft.is_char_device() {
                nix::sys::stat::SFlag::S_IFCHR
            } else if ft.is_block_device() {
                nix::sys::stat::SFlag::S_IFBLK
            } else if ft.is_fifo() {
                nix::sys::stat::SFlag::S_IFIFO
            } else {
                return Ok(dest.to_path_buf());
            };
            nix::sys::stat::mknod(
                dest,
                kind,
                nix::sys::stat::Mode::from_bits_truncate(meta.mode()),
                meta.rdev(),
            )
            .map_err(|e| FileError::io("create", dest)(e.into()))?;
        }
        std::os::unix::fs::lchown(dest, Some(uid), Some(gid))
            .map_err(FileError::io("chown", dest))?;
        if !ft.is_symlink() {
            let mode = self.chmod.unwrap_or(meta.mode() & 0o7777);
            fs::set_permissions(dest, fs::Permissions::from_mode(mode))
                .map_err(FileError::io("chmod", dest))?;
            copy_xattrs(host, dest);
        }
        set_mtime(dest, meta.mtime()).map_err(FileError::snapshot("set the time of", dest))?;
        Ok(dest.to_path_buf())
    }

    fn finish(self) -> Result<(), FileError> {
        for (dir, t) in self.dirs.iter().rev() {
            set_mtime(dir, *t).map_err(FileError::snapshot("set the time of", dir))?;
        }
        Ok(())
    }
}

/// `mkdir -p` of `path` (absolute inside `root`, symlinks resolved within
/// it): what is missing is made with mode 0755 and owner `(uid, gid)`.
/// Returns where the directory is on the host.
pub(crate) fn make_dirs(
    root: &Path,
    path: &str,
    (uid, gid): (u32, u32),
) -> Result<PathBuf, FileError> {
    let mut so_far = String::new();
    let mut host = root.to_path_buf();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        so_far.push('/');
        so_far.push_str(part);
        host = resolve_path(root, &so_far, true).map_err(FileError::resolve(&so_far))?;
        match fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(FileError::NotADirectory {
                    dest: path.to_string(),
                    blocked: so_far,
                });
            }
            Err(_) => {
                fs::create_dir(&host).map_err(FileError::io("create", &host))?;
                std::os::unix::fs::lchown(&host, Some(uid), Some(gid))
                    .map_err(FileError::io("chown", &host))?;
                fs::set_permissions(&host, fs::Permissions::from_mode(0o755))
                    .map_err(FileError::io("chmod", &host))?;
            }
        }
    }
    Ok(host)
}

fn remove_non_dir(p: &Path) -> Result<(), FileError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(FileError::io("replace", p)),
        Ok(_) => fs::remove_file(p).map_err(FileError::io("replace", p)),
        Err(_) => Ok(()),
    }
}

fn copy_xattrs(from: &Path, to: &Path) {
    let Ok(names) = xattr::list(from) else { return };
    for n in names {
        if n.to_string_lossy().starts_with("trusted.overlay.") {
            continue;
        }
        if let Ok(Some(v)) = xattr::get(from, &n) {
            let _ = xattr::set(to, &n, &v);
        }
    }
}

/// Whether a file is a tar archive, plain or compressed (ADD unpacks
/// those; a build context on standard input is one).
pub fn is_archive(path: &Path) -> bool {
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    let Ok(mut r) = strata_oci::decompressing(f) else {
        return false;
    };
    let mut header = [0u8; 512];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got == 512 && valid_checksum(&header)
}

/// A tar header's checksum: the byte sum with the checksum field as blanks.
fn valid_checksum(h: &[u8; 512]) -> bool {
    let stored = std::str::from_utf8(&h[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let sum: u32 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    stored == Some(sum)
}

/// `ADD archive.tar.gz /dir/`: the archive's contents, owners as recorded.
fn unpack(archive: &Path, dir: &Path) -> Result<(), FileError> {
    let f = fs::File::open(archive).map_err(FileError::io("read", archive))?;
    let r = strata_oci::decompressing(f).map_err(FileError::io("read", archive))?;
    // As in Docker, which unpacks in a chroot at `dir`: a symlink that
    // climbs above `dir` stops there, and `.wh.` names are plain files.
    apply_tar_with(dir, r, TarKind::Archive)
        .map(|_| ())
        .map_err(FileError::snapshot("unpack", archive))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_blocked_by_a_file_is_named() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("file"), "x").unwrap();
        let made = make_dirs(root.path(), "/a/b", (0, 0)).unwrap();
        assert!(made.is_dir());
        assert_eq!(made, root.path().join("a/b"));
        let e = make_dirs(root.path(), "/file/sub", (0, 0)).unwrap_err();
        assert!(
            matches!(&e, FileError::NotADirectory { dest, blocked } if dest == "/file/sub" && blocked == "/file"),
            "{e}"
        );
    }
}
