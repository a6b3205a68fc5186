//! A git repository as the build context, as `docker buildx build URL`
//! takes one: `https://host/repo.git`, `git://host/repo`, `git@host:repo`,
//! `ssh://…` or `github.com/org/repo`, with `#REF` (branch, tag or commit)
//! and `#REF:DIR` (a directory in it). The client fetches it with the
//! user's own `git` (their credentials, SSH agent and configuration), into
//! a directory of the state directory the daemon reads, without `.git`
//! (BuildKit's default), submodules included. As with BuildKit, the
//! repository's `.dockerignore` hides nothing: it is for a client's own
//! files.

use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// A git context: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitContext {
    /// The repository, as git takes it.
    pub remote: String,
    /// The branch, tag or commit (`None`: the remote's HEAD).
    pub reference: Option<String>,
    /// A directory within the checkout.
    pub subdir: Option<String>,
}

/// Whether a context argument names a git repository, by BuildKit's rules:
/// a git transport, or an HTTP(S) address of a `.git` repository.
pub fn is_git_url(s: &str) -> bool {
    let base = s.split('#').next().unwrap_or(s);
    if ["git://", "git@", "ssh://", "github.com/"]
        .iter()
        .any(|p| base.starts_with(p))
    {
        return true;
    }
    (base.starts_with("https://") || base.starts_with("http://"))
        && base.trim_end_matches('/').ends_with(".git")
}

impl GitContext {
    /// Parses `URL[#REF[:DIR]]`.
    pub fn parse(s: &str) -> Result<GitContext> {
        let (base, fragment) = match s.split_once('#') {
            Some((b, f)) => (b, Some(f)),
            None => (s, None),
        };
        let remote = if base.starts_with("github.com/") {
            format!("https://{base}")
        } else {
            base.to_string()
        };
        let (reference, subdir) = match fragment {
            None | Some("") => (None, None),
            Some(f) => match f.split_once(':') {
                Some((r, d)) => (Some(r), Some(d)),
                None => (Some(f), None),
            },
        };
        let reference = reference.filter(|r| !r.is_empty()).map(str::to_string);
        if let Some(r) = &reference
            && (r.starts_with('-') || r.chars().any(|c| c.is_control() || c == ' '))
        {
            bail!("git context {s}: {r:?} is not a branch, tag or commit");
        }
        let subdir = subdir
            .map(|d| d.trim_matches('/'))
            .filter(|d| !d.is_empty() && *d != ".")
            .map(str::to_string);
        if let Some(d) = &subdir
            && Path::new(d)
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
        {
            bail!(
                "git context {s}: the directory {d:?} must be a plain path inside the repository"
            );
        }
        Ok(GitContext {
            remote,
            reference,
            subdir,
        })
    }

    /// Fetches the repository into `dir` (empty) and returns the context
    /// directory within it.
    pub fn fetch(&self, dir: &Path) -> Result<PathBuf> {
        let shown = self.to_string();
        git(dir, &["init", "-q", "."], &shown)?;
        git(dir, &["remote", "add", "origin", &self.remote], &shown)?;
        let wanted = self.reference.as_deref().unwrap_or("HEAD");
        // A shallow fetch of the one ref (a commit too, where the server
        // allows it), else everything and the ref looked up: a dumb HTTP
        // server serves no shallow fetch.
        let shallow = git(
            dir,
            &["fetch", "-q", "--depth=1", "--no-tags", "origin", wanted],
            &shown,
        );
        let commit = match shallow {
            Ok(_) => "FETCH_HEAD".to_string(),
            Err(shallow_error) => {
                git(
                    dir,
                    &[
                        "fetch",
                        "-q",
                        "--tags",
                        "origin",
                        "+refs/heads/*:refs/remotes/origin/*",
                    ],
                    &shown,
                )
                .map_err(|_| shallow_error)?;
                let candidates = [
                    wanted.to_string(),
                    format!("origin/{wanted}"),
                    format!("refs/tags/{wanted}"),
                ];
                candidates
                    .iter()
                    .find_map(|c| {
                        git(
                            dir,
                            &["rev-parse", "-q", "--verify", &format!("{c}^{{commit}}")],
                            &shown,
                        )
                        .ok()
                        .map(|out| out.trim().to_string())
                    })
                    .with_context(|| {
                        format!("git context {shown}: no branch, tag or commit {wanted:?}")
                    })?
            }
        };
        git(dir, &["checkout", "-q", "--detach", &commit], &shown)?;
        git(
            dir,
            &[
                "submodule",
                "update",
                "-q",
                "--init",
                "--recursive",
                "--depth=1",
            ],
            &shown,
        )?;
        std::fs::remove_dir_all(dir.join(".git"))
            .with_context(|| format!("git context {shown}: cannot remove .git"))?;
        let Some(sub) = &self.subdir else {
            return Ok(dir.to_path_buf());
        };
        // A symlink in the checkout must not lead the context out of it.
        let root = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        let context = dir.join(sub).canonicalize().with_context(|| {
            format!("git context {shown}: no directory {sub:?} in the repository")
        })?;
        if !context.starts_with(&root) || !context.is_dir() {
            bail!("git context {shown}: {sub:?} is not a directory inside the repository");
        }
        Ok(context)
    }
}

impl std::fmt::Display for GitContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.remote)?;
        match (&self.reference, &self.subdir) {
            (None, None) => Ok(()),
            (r, None) => write!(f, "#{}", r.as_deref().unwrap_or("")),
            (r, Some(d)) => write!(f, "#{}:{d}", r.as_deref().unwrap_or("")),
        }
    }
}

/// Runs `git ARGS` in `dir` with no prompt, no transport that runs a
/// program (`ext::`), and a stalled transfer given up after a minute;
/// returns stdout, or fails with git's own words.
fn git(dir: &Path, args: &[&str], shown: &str) -> Result<String> {
    let out = Command::new("git")
        .args([
            "-c",
            "protocol.ext.allow=never",
            "-c",
            "http.lowSpeedLimit=1",
            "-c",
            "http.lowSpeedTime=60",
            "-c",
            "advice.detachedHead=false",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_SSH_COMMAND", ssh_command())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("git context {shown}: cannot run git (install git)"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "git context {shown}: git {} failed: {}",
            args.first().copied().unwrap_or(""),
            err.trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// ssh as the user runs it, never asking for a password or a host key
/// on a terminal no one watches.
fn ssh_command() -> String {
    std::env::var("GIT_SSH_COMMAND").unwrap_or_else(|_| "ssh -o BatchMode=yes".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths_as_buildkit_tells_them() {
        for url in [
            "https://example.com/org/app.git",
            "https://example.com/org/app.git#main:sub",
            "git://example.com/app",
            "git@example.com:org/app.git",
            "ssh://git@example.com/app.git",
            "github.com/org/app",
        ] {
            assert!(is_git_url(url), "{url}");
        }
        for path in [
            ".",
            "app.git",
            "https://example.com/context.tar.gz",
            "/srv/app.git",
        ] {
            assert!(!is_git_url(path), "{path}");
        }
    }

    #[test]
    fn fragments_name_a_ref_and_a_directory_inside() {
        let g = GitContext::parse("github.com/org/app#v1.2:services/api/").unwrap();
        assert_eq!(g.remote, "https://github.com/org/app");
        assert_eq!(g.reference.as_deref(), Some("v1.2"));
        assert_eq!(g.subdir.as_deref(), Some("services/api"));
        assert_eq!(
            g.to_string(),
            "https://github.com/org/app#v1.2:services/api"
        );
        let g = GitContext::parse("git://h/app#:docs").unwrap();
        assert_eq!((g.reference, g.subdir.as_deref()), (None, Some("docs")));
        // A leading slash is the repository's root, not the host's.
        let g = GitContext::parse("git://h/app#main:/etc").unwrap();
        assert_eq!(g.subdir.as_deref(), Some("etc"));
        for bad in [
            "git://h/app#main:../etc",
            "git://h/app#main:a/../../etc",
            "git://h/app#--upload-pack=x",
        ] {
            assert!(GitContext::parse(bad).is_err(), "{bad}");
        }
    }
}
