//! `USER` and `--chown` names, looked up in the image's own `/etc/passwd`
//! and `/etc/group`, as Docker does.

use std::path::Path;

use strata_snapshot::resolve_path;

/// A resolved identity.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// User ID.
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
    /// Supplementary groups the user is a member of.
    pub groups: Vec<u32>,
}

struct Entry {
    name: String,
    id: u32,
    gid: u32,
    members: Vec<String>,
}

/// Reads `passwd`-style lines: name:x:id:gid… or group-style
/// name:x:id:member,member.
fn read_db(root: &Path, file: &str, group: bool) -> Vec<Entry> {
    let Ok(path) = resolve_path(root, file, true) else {
        return Vec::new();
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let id = f.get(2)?.parse().ok()?;
            Some(Entry {
                name: f.first()?.to_string(),
                id,
                gid: if group { id } else { f.get(3)?.parse().ok()? },
                members: if group {
                    f.get(3)
                        .map(|m| {
                            m.split(',')
                                .filter(|s| !s.is_empty())
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default()
                } else {
                    Vec::new()
                },
            })
        })
        .collect()
}

/// A user or group the image's `/etc/passwd` or `/etc/group` lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// No such user name.
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoUser(String),
    /// No such group name.
    #[error("unable to find group {0}: no matching entries in group file")]
    NoGroup(String),
}

/// Resolves `spec` (`user`, `uid`, `user:group`, `uid:gid`) in the root
/// filesystem at `root`. `with_groups` also collects supplementary groups
/// (for processes; file ownership needs none).
pub fn resolve(root: &Path, spec: &str, with_groups: bool) -> Result<Identity, UserError> {
    if spec.is_empty() {
        return Ok(Identity {
            uid: 0,
            gid: 0,
            groups: if with_groups {
                member_groups(root, "root", 0)
            } else {
                Vec::new()
            },
        });
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read_db(root, "/etc/passwd", false);
    let (uid, mut gid, name) = match user.parse::<u32>() {
        Ok(uid) => match passwd.iter().find(|e| e.id == uid) {
            Some(e) => (uid, e.gid, Some(e.name.clone())),
            None => (uid, 0, None),
        },
        Err(_) => match passwd.iter().find(|e| e.name == user) {
            Some(e) => (e.id, e.gid, Some(e.name.clone())),
            None => {
                return Err(UserError::NoUser(user.to_string()));
            }
        },
    };
    if let Some(g) = group.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => read_db(root, "/etc/group", true)
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.id)
                .ok_or_else(|| UserError::NoGroup(g.to_string()))?,
        };
    }
    let groups = match (&name, with_groups, group) {
        (Some(n), true, None) => member_groups(root, n, gid),
        _ => Vec::new(),
    };
    Ok(Identity { uid, gid, groups })
}

fn member_groups(root: &Path, name: &str, primary: u32) -> Vec<u32> {
    let mut out: Vec<u32> = read_db(root, "/etc/group", true)
        .into_iter()
        .filter(|e| e.members.iter().any(|m| m == name) && e.id != primary)
        .map(|e| e.id)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ids_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nstaff:x:50:app\napp:x:1000:\n",
        )
        .unwrap();
        let r = |s| resolve(dir.path(), s, true);
        assert_eq!(
            r("app").unwrap(),
            Identity {
                uid: 1000,
                gid: 1000,
                groups: vec![50]
            }
        );
        assert_eq!(
            r("app:staff").unwrap(),
            Identity {
                uid: 1000,
                gid: 50,
                groups: vec![]
            }
        );
        assert_eq!(r("1000:7").unwrap().gid, 7);
        assert_eq!(
            r("4242").unwrap(),
            Identity {
                uid: 4242,
                gid: 0,
                groups: vec![]
            }
        );
        assert_eq!(r("").unwrap().uid, 0);
        assert_eq!(r("nobody").unwrap_err(), UserError::NoUser("nobody".into()));
        assert_eq!(
            r("app:nogroup").unwrap_err().to_string(),
            "unable to find group nogroup: no matching entries in group file"
        );
    }
}
