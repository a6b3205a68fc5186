//! Overlay mounts.
//!
//! Lower dirs are passed relative to the snapshot root, from a helper
//! thread that has its own working directory (`unshare(CLONE_FS)`), so the
//! mount options stay short and many layers fit in the kernel's one-page
//! limit on them. Copy-up is forced to copy whole files and directory
//! renames are not redirected (`metacopy=off,redirect_dir=off,index=off`),
//! so an upper dir is a complete, self-contained layer.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, Result};

/// The kernel copies mount options into one page.
const MAX_OPTIONS: usize = 4095;

/// A mounted overlay; unmounted when dropped (lazily, if still busy).
#[derive(Debug)]
pub struct OverlayMount {
    target: PathBuf,
    mounted: bool,
}

impl OverlayMount {
    /// Mounts an overlay at `target` (absolute). `lowers` are relative to
    /// `base`, top-most first. Without `upper` the mount is read-only and
    /// needs at least two lowers.
    pub fn mount(
        base: &Path,
        lowers: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        target: &Path,
    ) -> Result<OverlayMount> {
        let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let mut options = format!("lowerdir={}", lower.join(":"));
        if let Some((upper, work)) = upper {
            options.push_str(&format!(
                ",upperdir={},workdir={}",
                upper.display(),
                work.display()
            ));
        }
        options.push_str(",index=off,redirect_dir=off,metacopy=off");
        if options.len() > MAX_OPTIONS {
            let per = options.len() / lowers.len().max(1);
            return Err(Error::TooManyLayers {
                layers: lowers.len(),
                max: MAX_OPTIONS / per.max(1),
            });
        }
        let base = base.to_path_buf();
        let tgt = target.to_path_buf();
        let result = std::thread::scope(|s| {
            s.spawn(move || -> nix::Result<()> {
                // This thread's working directory is its own from here on.
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)?;
                nix::unistd::chdir(&base)?;
                nix::mount::mount(
                    Some("overlay"),
                    &tgt,
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(options.as_str()),
                )
            })
            .join()
        });
        match result {
            Ok(Ok(())) => Ok(OverlayMount {
                target: target.to_path_buf(),
                mounted: true,
            }),
            Ok(Err(source)) => Err(Error::Mount {
                what: "mount overlay at",
                path: target.to_path_buf(),
                source,
            }),
            Err(_) => Err(Error::Mount {
                what: "mount overlay at",
                path: target.to_path_buf(),
                source: nix::Error::EINTR,
            }),
        }
    }

    /// Where the overlay is mounted.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, reporting failure.
    pub fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        unmount(&self.target)
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount2(&self.target, MntFlags::MNT_DETACH);
        }
    }
}

/// Unmounts `target`; a busy mount is detached instead.
pub fn unmount(target: &Path) -> Result<()> {
    match nix::mount::umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::Error::EBUSY) => {
            nix::mount::umount2(target, MntFlags::MNT_DETACH).map_err(|source| Error::Mount {
                what: "unmount",
                path: target.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(Error::Mount {
            what: "unmount",
            path: target.to_path_buf(),
            source,
        }),
    }
}

/// Mount points at or below `dir`, deepest first, from `/proc/self/mountinfo`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> PathBuf {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }
}
