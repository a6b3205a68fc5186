//! Turning an overlay upper dir into an OCI layer tar.
//!
//! Overlay records a deleted path as a 0/0 character device and a replaced
//! directory with the `trusted.overlay.opaque` attribute; OCI layers record
//! them as `.wh.<name>` and `.wh..wh..opq` entries. Entries are written in
//! sorted order with numeric owners and no user or group names, so the same
//! tree always gives the same bytes.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use crate::error::{Error, Result, io_err};

const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What a diff wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiffStats {
    /// Tar entries, whiteouts included.
    pub entries: u64,
}

/// Writes the layer tar for `upper` to `out`, every entry with the time
/// the tree has (a reproducible image clamps them later, on its own copy:
/// [`crate::clamp_times`]). Also removes overlay's own bookkeeping
/// attributes from the tree (all but the opaque marker), so the directory
/// can later serve as a lower layer of another mount.
pub fn write_layer(upper: &Path, out: impl Write) -> Result<DiffStats> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut state = Walk {
        stats: DiffStats::default(),
        links: HashMap::new(),
    };
    state.dir(&mut builder, upper, Path::new(""))?;
    builder.into_inner().map_err(|source| Error::Write {
        entry: "(end of archive)".to_string(),
        source,
    })?;
    Ok(state.stats)
}

/// True when `upper` holds nothing: the step changed no file.
pub fn is_empty_dir(upper: &Path) -> Result<bool> {
    Ok(fs::read_dir(upper)
        .map_err(io_err("cannot list", upper))?
        .next()
        .is_none())
}

struct Walk {
    stats: DiffStats,
    /// First path of each multiply-linked inode, for hard-link entries.
    links: HashMap<(u64, u64), PathBuf>,
}

impl Walk {
    fn dir<W: Write>(&mut self, b: &mut tar::Builder<W>, host: &Path, rel: &Path) -> Result<()> {
        let mut names: Vec<OsString> = fs::read_dir(host)
            .map_err(io_err("cannot list", host))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(io_err("cannot list", host))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let host_path = host.join(&name);
            let rel_path = rel.join(&name);
            self.entry(b, &host_path, &rel_path)?;
        }
        Ok(())
    }

    fn entry<W: Write>(&mut self, b: &mut tar::Builder<W>, host: &Path, rel: &Path) -> Result<()> {
        let meta = fs::symlink_metadata(host).map_err(io_err("cannot inspect", host))?;
        let ft = meta.file_type();
        let mtime = meta.mtime();
        if ft.is_char_device() && meta.rdev() == 0 {
            let name = rel.file_name().map(|n| n.as_bytes()).unwrap_or_default();
            let mut wh = rel.with_file_name(OsString::from_vec([b".wh.", name].concat()));
            if wh.as_os_str().is_empty() {
                wh = PathBuf::from(".wh.");
            }
            let attrs = Attrs {
                mode: 0,
                uid: 0,
                gid: 0,
                mtime,
            };
            return self.append(b, &wh, EntryType::Regular, attrs, Body::Empty, &[]);
        }
        let xattrs = self.xattrs(host, ft.is_symlink())?;
        let attrs = Attrs {
            mode: meta.mode() & 0o7777,
            uid: meta.uid().into(),
            gid: meta.gid().into(),
            mtime,
        };
        if ft.is_dir() {
            let opaque = xattrs.iter().any(|(k, v)| k == OPAQUE_XATTR && v == b"y");
            let kept: Vec<(String, Vec<u8>)> = xattrs
                .into_iter()
                .filter(|(k, _)| !k.starts_with("trusted.overlay."))
                .collect();
            let mut dir_name = rel.as_os_str().to_os_string();
            dir_name.push("/");
            self.append(
                b,
                Path::new(&dir_name),
                EntryType::Directory,
                attrs,
                Body::Empty,
                &kept,
            )?;
            if opaque {
                let marker = Attrs {
                    mode: 0,
                    uid: 0,
                    gid: 0,
                    mtime,
                };
                self.append(
                    b,
                    &rel.join(".wh..wh..opq"),
                    EntryType::Regular,
                    marker,
                    Body::Empty,
                    &[],
                )?;
            }
            self.dir(b, host, rel)?;
            return Ok(());
        }
        if ft.is_symlink() {
            let target = fs::read_link(host).map_err(io_err("cannot read symlink", host))?;
            return self.append(
                b,
                rel,
                EntryType::Symlink,
                attrs,
                Body::Link(&target),
                &xattrs,
            );
        }
        if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.links.get(&key).cloned() {
                    return self.append(
                        b,
                        rel,
                        EntryType::Link,
                        attrs,
                        Body::Link(&first),
                        &xattrs,
                    );
                }
                self.links.insert(key, rel.to_path_buf());
            }
            let file = fs::File::open(host).map_err(io_err("cannot read", host))?;
            return self.append(
                b,
                rel,
                EntryType::Regular,
                attrs,
                Body::File(file, meta.len()),
                &xattrs,
            );
        }
        let (kind, dev) = if ft.is_char_device() {
            (EntryType::Char, Some(meta.rdev()))
        } else if ft.is_block_device() {
            (EntryType::Block, Some(meta.rdev()))
        } else if ft.is_fifo() {
            (EntryType::Fifo, None)
        } else {
            tracing::debug!(path = %host.display(), "sockets are not part of layers");
            return Ok(());
        };
        let mut h = header(kind, attrs, 0);
        if let Some(dev) = dev {
            h.set_device_major(libc::major(dev))
                .map_err(|e| Error::Tar(e.to_string()))?;
            h.set_device_minor(libc::minor(dev))
                .map_err(|e| Error::Tar(e.to_string()))?;
        }
        self.pax(b, &xattrs)?;
        b.append_data(&mut h, rel, std::io::empty())
            .map_err(|source| Error::Write {
                entry: rel.display().to_string(),
                source,
            })?;
        self.stats.entries += 1;
        Ok(())
    }

    /// Extended attributes to record; overlay's own are removed from the
    /// tree (except the opaque marker, which the caller turns into an entry).
    fn xattrs(&self, host: &Path, symlink: bool) -> Result<Vec<(String, Vec<u8>)>> {
        let names = match xattr::list(host) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::Io {
                    what: "cannot list attributes of",
                    path: host.to_path_buf(),
                    source: e,
                });
            }
        };
        let mut out = Vec::new();
        for name in names {
            let key = name.to_string_lossy().into_owned();
            if key.starts_with("trusted.overlay.") && key != OPAQUE_XATTR {
                let _ = xattr::remove(host, &name);
                continue;
            }
            if symlink && !key.starts_with("trusted.") && !key.starts_with("security.") {
                continue;
            }
            if let Ok(Some(v)) = xattr::get(host, &name) {
                out.push((key, v));
            }
        }
        out.sort();
        Ok(out)
    }

    fn pax<W: Write>(&self, b: &mut tar::Builder<W>, xattrs: &[(String, Vec<u8>)]) -> Result<()> {
        let records: Vec<(String, &[u8])> = xattrs
            .iter()
            .filter(|(k, _)| k != OPAQUE_XATTR)
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
            .collect();
        if records.is_empty() {
            return Ok(());
        }
        b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
            .map_err(|source| Error::Write {
                entry: "(extended attributes)".to_string(),
                source,
            })
    }

    fn append<W: Write>(
        &mut self,
        b: &mut tar::Builder<W>,
        path: &Path,
        kind: EntryType,
        attrs: Attrs,
        body: Body<'_>,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<()> {
        self.pax(b, xattrs)?;
        let res = match body {
            Body::Empty => b.append_data(&mut header(kind, attrs, 0), path, std::io::empty()),
            Body::Link(target) => b.append_link(&mut header(kind, attrs, 0), path, target),
            Body::File(file, len) => b.append_data(&mut header(kind, attrs, len), path, file),
        };
        res.map_err(|source| Error::Write {
            entry: path.display().to_string(),
            source,
        })?;
        self.stats.entries += 1;
        Ok(())
    }
}

/// Mode, owner and time of an entry.
#[derive(Clone, Copy)]
struct Attrs {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
}

/// What follows an entry's header.
enum Body<'a> {
    Empty,
    Link(&'a Path),
    File(fs::File, u64),
}

fn header(kind: EntryType, attrs: Attrs, size: u64) -> Header {
    let mut h = Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(attrs.mode);
    h.set_uid(attrs.uid);
    h.set_gid(attrs.gid);
    h.set_mtime(attrs.mtime.max(0) as u64);
    h.set_size(size);
    h
}

use std::os::unix::ffi::OsStringExt;

/// Removes overlay's bookkeeping attributes (all `trusted.overlay.*` but the
/// opaque marker) from a tree that will serve as a lower layer.
pub fn strip_overlay_attrs(dir: &Path) -> Result<()> {
    let walk = Walk {
        stats: DiffStats::default(),
        links: HashMap::new(),
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = fs::symlink_metadata(&p).map_err(io_err("cannot inspect", &p))?;
        walk.xattrs(&p, meta.file_type().is_symlink())?;
        if meta.is_dir() {
            for e in fs::read_dir(&p).map_err(io_err("cannot list", &p))? {
                stack.push(e.map_err(io_err("cannot list", &p))?.path());
            }
        }
    }
    Ok(())
}
