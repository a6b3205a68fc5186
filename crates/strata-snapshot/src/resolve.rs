//! Paths inside a container root, resolved the way the container sees them.
//!
//! A symlink met on the way is followed within the root: an absolute target
//! starts again at the root. A `..` that would climb above the root is an
//! escape and refused, as is any layer entry or hard-link target naming `..`
//! or an absolute path.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// How many symlinks one resolution may follow, as Linux's `MAXSYMLINKS`.
const MAX_LINKS: usize = 40;

/// Splits a layer entry name into clean components. `./` prefixes and
/// trailing slashes are dropped; `..` and absolute names are refused.
pub fn entry_components(name: &[u8]) -> Result<Vec<OsString>> {
    let refuse = |reason: &str| Error::Unsafe {
        entry: String::from_utf8_lossy(name).into_owned(),
        reason: reason.to_string(),
    };
    if name.first() == Some(&b'/') {
        return Err(refuse("absolute paths are not allowed in a layer"));
    }
    let mut out = Vec::new();
    for c in Path::new(OsStr::from_bytes(name)).components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("`..` would leave the layer root")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("absolute paths are not allowed in a layer"));
            }
        }
    }
    Ok(out)
}

/// Resolves `components` below `root` to a host path. Symlinks are followed
/// in every component but the last, and in the last too when `follow_last`.
/// `entry` names the path in errors.
pub fn resolve_in_root(
    root: &Path,
    components: &[OsString],
    follow_last: bool,
    entry: &str,
) -> Result<PathBuf> {
    resolve_in_root_with(root, components, follow_last, entry, Escapes::Refuse)
}

/// What a `..` that would climb above the root does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Escapes {
    /// It is an error: layers that try are refused.
    #[default]
    Refuse,
    /// It stays at the root, as in a chroot: what `ADD archive.tar` does
    /// in Docker.
    Clamp,
}

/// [`resolve_in_root`] with a choice of what an escaping `..` does.
pub fn resolve_in_root_with(
    root: &Path,
    components: &[OsString],
    follow_last: bool,
    entry: &str,
    escapes: Escapes,
) -> Result<PathBuf> {
    let mut pending: Vec<OsString> = components.iter().rev().cloned().collect();
    let mut resolved: Vec<OsString> = Vec::with_capacity(components.len());
    let mut links = 0;
    while let Some(c) = pending.pop() {
        match c.as_bytes() {
            b"" | b"." => continue,
            b".." => {
                if resolved.pop().is_none() && escapes == Escapes::Refuse {
                    return Err(Error::Unsafe {
                        entry: entry.to_string(),
                        reason: "a symlink on its path climbs above the root".into(),
                    });
                }
                continue;
            }
            _ => {}
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&c);
        let is_last = pending.is_empty();
        let link = match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() && (!is_last || follow_last) => {
                std::fs::read_link(&candidate).ok()
            }
            _ => None,
        };
        match link {
            Some(target) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Error::Unsafe {
                        entry: entry.to_string(),
                        reason: "too many levels of symbolic links".into(),
                    });
                }
                if target.is_absolute() {
                    resolved.clear();
                }
                for part in target.components().rev() {
                    match part {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            None => resolved.push(c),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

/// Resolves a slash-separated path inside the root (leading `/` allowed:
/// it means the root), following every symlink. Used to look things up in
/// an image's filesystem.
pub fn resolve_path(root: &Path, path: &str, follow_last: bool) -> Result<PathBuf> {
    let components: Vec<OsString> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(OsString::from)
        .collect();
    resolve_in_root(root, &components, follow_last, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn names_are_cleaned_and_escapes_refused() {
        assert_eq!(entry_components(b"./usr/bin/").unwrap(), ["usr", "bin"]);
        assert!(entry_components(b"").unwrap().is_empty());
        assert!(entry_components(b"../etc/passwd").is_err());
        assert!(entry_components(b"a/../../b").is_err());
        assert!(entry_components(b"/etc/passwd").is_err());
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        symlink("/usr/bin", root.join("bin")).unwrap();
        symlink("..", root.join("usr/bin/up")).unwrap();
        symlink("../../..", root.join("usr/bin/evil")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            resolve_path(root, "/bin/sh", false).unwrap(),
            root.join("usr/bin/sh")
        );
        assert_eq!(resolve_path(root, "bin", false).unwrap(), root.join("bin"));
        assert_eq!(
            resolve_path(root, "bin", true).unwrap(),
            root.join("usr/bin")
        );
        assert_eq!(
            resolve_path(root, "usr/bin/up/lib", false).unwrap(),
            root.join("usr/lib")
        );
        assert!(resolve_path(root, "usr/bin/evil/etc", false).is_err());
        assert!(resolve_path(root, "loop/x", false).is_err());
    }
}
