//! Applying an OCI layer tar to a root directory.
//!
//! The root is either an empty directory (the lowest layer) or an overlay
//! mount whose upper dir becomes the layer: deleting a path there leaves an
//! overlay whiteout, and writing below an existing directory copies it up
//! with its attributes, so the upper dir ends up in the exact form overlay
//! reads lower layers in.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::EntryType;

use crate::error::{Error, Result, io_err};
use crate::resolve::{Escapes, entry_components, resolve_in_root_with};

/// Counts from one application.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries written (files, dirs, links, devices).
    pub entries: u64,
    /// Whiteouts and opaque markers honored.
    pub whiteouts: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// What a tar being applied is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TarKind {
    /// An image layer: whiteouts delete, and a symlink climbing above the
    /// root is refused.
    #[default]
    Layer,
    /// An archive `ADD` unpacks, as Docker does: in a chroot (a climbing
    /// symlink stops at the root), and `.wh.` names are files like any
    /// other.
    Archive,
}

/// Applies the uncompressed layer tar read from `reader` below `root`.
pub fn apply_tar(root: &Path, reader: impl Read) -> Result<ApplyStats> {
    apply_tar_with(root, reader, TarKind::Layer)
}

/// A header's numeric field (`raw`, and what the tar crate made of it) as
/// Go's `archive/tar` reads it, and so Docker and BuildKit: a field left
/// empty (NULs or spaces) is 0. Anything else must be a number.
fn numeric(raw: &[u8], parsed: std::io::Result<u64>) -> Result<u64> {
    if raw.iter().all(|b| *b == 0 || *b == b' ') {
        return Ok(0);
    }
    parsed.map_err(|e| Error::Tar(e.to_string()))
}

/// Refuses a whiteout that names no sibling, as the OCI layer spec has it:
/// `.wh.` alone, `.wh..` and `.wh...` would remove the directory itself
/// or its parent, and other `.wh..wh.` names are reserved.
fn check_whiteout(hidden: &[u8], shown: &str) -> Result<()> {
    let reason = match hidden {
        b"" => "a whiteout of no name",
        b"." | b".." => "a whiteout of the directory itself or its parent",
        h if h.starts_with(b".wh.") => "a reserved whiteout name",
        _ => return Ok(()),
    };
    Err(Error::Unsafe {
        entry: shown.to_string(),
        reason: reason.into(),
    })
}

/// [`apply_tar`] of a layer or an archive ([`TarKind`]). Entry names with
/// `..` or a leading `/` are refused either way.
pub fn apply_tar_with(root: &Path, reader: impl Read, kind: TarKind) -> Result<ApplyStats> {
    let escapes = match kind {
        TarKind::Layer => Escapes::Refuse,
        TarKind::Archive => Escapes::Clamp,
    };
    let mut archive = tar::Archive::new(reader);
    let mut stats = ApplyStats::default();
    let mut created: HashSet<PathBuf> = HashSet::new();
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    let entries = archive.entries().map_err(|e| Error::Tar(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::Tar(e.to_string()))?;
        let entry_type = entry.header().entry_type();
        if matches!(
            entry_type,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            continue;
        }
        let name = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&name).into_owned();
        let mut comps = entry_components(&name)?;
        let Some(base) = comps.pop() else { continue };
        let parent = resolve_in_root_with(root, &comps, true, &shown, escapes)?;
        if kind == TarKind::Layer
            && let Some(hidden) = base.as_bytes().strip_prefix(b".wh.")
        {
            stats.whiteouts += 1;
            if hidden == b".wh..opq" {
                clear_dir(&parent, &created)?;
            } else {
                check_whiteout(hidden, &shown)?;
                remove_any(&parent.join(OsStr::from_bytes(hidden)))?;
            }
            continue;
        }
        mkdir_all(root, &parent)?;
        let target = parent.join(&base);
        let header = entry.header().clone();
        let mode = numeric(&header.as_old().mode, header.mode().map(u64::from))? as u32 & 0o7777;
        match entry_type {
            EntryType::Directory => match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_any(&target)?;
                    fs::create_dir(&target).map_err(io_err("cannot create directory", &target))?;
                }
                Err(_) => {
                    fs::create_dir(&target).map_err(io_err("cannot create directory", &target))?
                }
            },
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_any(&target)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io_err("cannot create", &target))?;
                // Either side may fail: a truncated tar or a full disk.
                stats.bytes += io::copy(&mut entry, &mut file)
                    .map_err(io_err("cannot extract into", &target))?;
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default();
                remove_any(&target)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &target)
                    .map_err(io_err("cannot create symlink", &target))?;
            }
            EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default();
                let link_comps = entry_components(&link)?;
                let source = resolve_in_root_with(root, &link_comps, false, &shown, escapes)?;
                if source == target {
                    continue;
                }
                remove_any(&target)?;
                fs::hard_link(&source, &target).map_err(io_err("cannot hard-link to", &source))?;
                created.insert(target);
                stats.entries += 1;
                continue;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                remove_any(&target)?;
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let (node, dev) = match entry_type {
                    EntryType::Char => (SFlag::S_IFCHR, libc::makedev(major, minor)),
                    EntryType::Block => (SFlag::S_IFBLK, libc::makedev(major, minor)),
                    _ => (SFlag::S_IFIFO, 0),
                };
                nix::sys::stat::mknod(&target, node, Mode::from_bits_truncate(mode), dev).map_err(
                    |e| Error::Io {
                        what: "cannot create device",
                        path: target.clone(),
                        source: e.into(),
                    },
                )?;
            }
            other => {
                tracing::warn!(entry = %shown, kind = ?other, "skipping layer entry of unsupported type");
                continue;
            }
        }
        let uid = numeric(&header.as_old().uid, header.uid())?;
        let gid = numeric(&header.as_old().gid, header.gid())?;
        std::os::unix::fs::lchown(&target, Some(uid as u32), Some(gid as u32))
            .map_err(io_err("cannot change owner of", &target))?;
        if entry_type != EntryType::Symlink {
            // After chown, which clears set-user-ID bits.
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .map_err(io_err("cannot set mode of", &target))?;
            if let Some(exts) = entry
                .pax_extensions()
                .map_err(|e| Error::Tar(e.to_string()))?
            {
                for ext in exts {
                    let ext = ext.map_err(|e| Error::Tar(e.to_string()))?;
                    let Some(attr) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                        continue;
                    };
                    if attr.starts_with(b"trusted.overlay.") {
                        continue;
                    }
                    xattr::set(&target, OsStr::from_bytes(attr), ext.value_bytes())
                        .map_err(io_err("cannot set extended attribute on", &target))?;
                }
            }
        }
        let mtime = header.mtime().unwrap_or(0) as i64;
        if entry_type == EntryType::Directory {
            dir_times.push((target.clone(), mtime));
        } else {
            set_mtime(&target, mtime)?;
        }
        created.insert(target);
        stats.entries += 1;
    }
    // Children change their directory's mtime, so directories go last,
    // deepest first.
    for (dir, mtime) in dir_times.iter().rev() {
        set_mtime(dir, *mtime)?;
    }
    Ok(stats)
}

/// Sets a path's access and modification times without following a symlink.
pub fn set_mtime(path: &Path, secs: i64) -> Result<()> {
    let t = TimeSpec::new(secs, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| Error::Io {
        what: "cannot set times of",
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// Creates missing directories from `root` down to `dir`. Entries normally
/// come after their directory; a layer that omits one gets it with
/// default attributes, as `tar` would create it.
fn mkdir_all(root: &Path, dir: &Path) -> Result<()> {
    if dir == root
        || fs::symlink_metadata(dir)
            .map(|m| m.is_dir())
            .unwrap_or(false)
    {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && parent.starts_with(root)
    {
        mkdir_all(root, parent)?;
    }
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => {
            remove_any(dir)?;
            fs::create_dir(dir).map_err(io_err("cannot create directory", dir))
        }
        Err(_) => fs::create_dir(dir).map_err(io_err("cannot create directory", dir)),
    }
}

/// Removes whatever is at `path` (not following a symlink); absent is fine.
fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err("cannot remove", path)),
        Ok(_) => fs::remove_file(path).map_err(io_err("cannot remove", path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            what: "cannot inspect",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// An opaque directory hides what lower layers put in it; entries this
/// layer already wrote there stay.
fn clear_dir(dir: &Path, created: &HashSet<PathBuf>) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    let names: Vec<OsString> = entries.flatten().map(|e| e.file_name()).collect();
    for name in names {
        let p = dir.join(&name);
        if !created.contains(&p) {
            remove_any(&p)?;
        }
    }
    Ok(())
}
