//! A workload: a small TOML file that decides, with its seed, every build
//! of a benchmark: services with their own contexts, commits that edit
//! them, a dependency stage they share and a build stage of their own;
//! or a folder of real Dockerfiles with their contexts, each commit a
//! synthetic edit of one file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// What a workload file says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Its name, for the report.
    pub name: String,
    /// Services, each an image of its own (with `dockerfiles`: one per
    /// folder there).
    #[serde(default)]
    pub services: usize,
    /// Commits built per service, one after another (each edits one file
    /// of the service's context).
    pub commits: usize,
    /// Seconds the dependency stage every build shares takes to run.
    #[serde(default)]
    pub dependency_seconds: f64,
    /// Seconds each service's own build stage takes to run.
    #[serde(default)]
    pub build_seconds: f64,
    /// A folder of real services instead of made-up ones: each folder in
    /// it with a `Dockerfile` is a service, built from a copy of itself
    /// (relative to the workload file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfiles: Option<PathBuf>,
    /// With `dockerfiles`: the file (relative to each service's folder)
    /// each commit appends a comment line to, as an edit would. Unset: a
    /// file `.strata-bench-commit` is written beside the Dockerfile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<String>,
    /// Files in each service's context.
    #[serde(default = "default_files")]
    pub context_files: usize,
    /// Bytes in each service's context, spread over its files.
    #[serde(default = "default_bytes")]
    pub context_bytes: u64,
    /// Builds running at once.
    pub concurrency: usize,
    /// Decides the contents: the same file and seed give the same builds,
    /// and so hit the same cache entries. A new seed makes a cold run on
    /// a cache that has seen the workload.
    #[serde(default)]
    pub seed: u64,
    /// The base image every stage starts from; it must be in each
    /// target's store (or registry) beforehand.
    #[serde(default = "default_base")]
    pub base: String,
}

fn default_files() -> usize {
    10
}

fn default_bytes() -> u64 {
    10_000
}

fn default_base() -> String {
    "busybox:latest".into()
}

/// The largest workload a file may describe: a bound on what a mistyped
/// number can make a machine write and run.
pub const MAX_BUILDS: usize = 10_000;
const MAX_CONCURRENCY: usize = 256;
const MAX_SECONDS: f64 = 3600.0;
const MAX_FILES: usize = 1_000_000;
const MAX_CONTEXT_BYTES: u64 = 10 << 30;

/// One build of the workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Its position in the workload (builds start in this order).
    pub index: usize,
    /// The service.
    pub service: usize,
    /// The commit.
    pub commit: usize,
    /// The image name it is built as.
    pub tag: String,
    /// Its context directory (with its Dockerfile).
    pub dir: PathBuf,
}

impl Workload {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Workload, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: "cannot read the workload",
            path: path.to_path_buf(),
            source,
        })?;
        let mut w: Workload = toml::from_str(&text).map_err(|e| Error::Workload {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        if let Some(dir) = &w.dockerfiles {
            let dir = path.parent().unwrap_or(Path::new(".")).join(dir);
            w.services = services_in(&dir)
                .map_err(|detail| Error::Workload {
                    path: path.to_path_buf(),
                    detail,
                })?
                .len();
            w.dockerfiles = Some(dir);
        }
        w.check().map_err(|detail| Error::Workload {
            path: path.to_path_buf(),
            detail,
        })?;
        Ok(w)
    }

    /// Whether the numbers are ones to run.
    pub fn check(&self) -> Result<(), String> {
        let builds = self.services.saturating_mul(self.commits);
        if builds == 0 || builds > MAX_BUILDS {
            return Err(format!(
                "services × commits is {builds}: it must be 1 to {MAX_BUILDS}"
            ));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(format!("concurrency must be 1 to {MAX_CONCURRENCY}"));
        }
        for (name, v) in [
            ("dependency_seconds", self.dependency_seconds),
            ("build_seconds", self.build_seconds),
        ] {
            if !(0.0..=MAX_SECONDS).contains(&v) {
                return Err(format!("{name} must be 0 to {MAX_SECONDS}"));
            }
        }
        if !(1..=MAX_FILES).contains(&self.context_files) {
            return Err(format!("context_files must be 1 to {MAX_FILES}"));
        }
        if self.context_bytes > MAX_CONTEXT_BYTES {
            return Err(format!("context_bytes must be at most {MAX_CONTEXT_BYTES}"));
        }
        if self.base.is_empty() || self.base.chars().any(|c| c.is_whitespace()) {
            return Err(format!("base {:?} is not an image name", self.base));
        }
        Ok(())
    }

    /// The builds, commit by commit (every service's first commit, then
    /// every service's second…), as CI builds a monorepo's pushes.
    pub fn builds(&self) -> usize {
        self.services * self.commits
    }

    /// The ideal wall time of a cold run: the shared stage once, then
    /// every build stage spread over the concurrent slots. Unknown for
    /// real Dockerfiles.
    pub fn ideal_seconds(&self) -> Option<f64> {
        self.dockerfiles.is_none().then(|| {
            self.dependency_seconds
                + (self.builds() as f64 * self.build_seconds) / self.concurrency as f64
        })
    }

    /// Writes every build's context under `dir` and returns the builds.
    pub fn generate(&self, dir: &Path) -> Result<Vec<Job>, Error> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { what, path, source }
        };
        if let Some(real) = &self.dockerfiles {
            return self.replay(real, dir);
        }
        let mut jobs = Vec::with_capacity(self.builds());
        for commit in 0..self.commits {
            for service in 0..self.services {
                let ctx = dir.join(format!("s{service}-c{commit}"));
                let src = ctx.join("src");
                std::fs::create_dir_all(&src).map_err(io("cannot make", &src))?;
                std::fs::write(ctx.join("Dockerfile"), self.dockerfile(service, commit))
                    .map_err(io("cannot write", &ctx.join("Dockerfile")))?;
                self.write_context(&src, service, commit)?;
                jobs.push(Job {
                    index: jobs.len(),
                    service,
                    commit,
                    tag: format!("bench-{}-s{service}:c{commit}", safe(&self.name)),
                    dir: ctx,
                });
            }
        }
        Ok(jobs)
    }

    /// The Dockerfile of one build: the shared dependency stage (the same
    /// in every build, so one run of it serves all), then the service's
    /// own stage on its sources.
    fn dockerfile(&self, service: usize, commit: usize) -> String {
        format!(
            "FROM {base} AS deps\n\
             RUN sleep {dep} && echo 'dependencies of workload {name} seed {seed}' > /deps\n\
             FROM {base}\n\
             COPY --from=deps /deps /deps\n\
             COPY src/ /src/\n\
             RUN sleep {build} && echo 'service {service} commit {commit}' > /app && find /src -type f | wc -l > /files\n",
            base = self.base,
            dep = self.dependency_seconds,
            name = safe(&self.name),
            seed = self.seed,
            build = self.build_seconds,
        )
    }

    /// A service's sources at a commit: `context_files` files sharing
    /// `context_bytes`, from the seed and the service; each commit edits
    /// one more file.
    fn write_context(&self, src: &Path, service: usize, commit: usize) -> Result<(), Error> {
        let per_file = self.context_bytes / self.context_files as u64;
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.seed.to_le_bytes());
        key[8..16].copy_from_slice(&(service as u64).to_le_bytes());
        let mut buf = vec![0u8; usize::try_from(per_file).unwrap_or(usize::MAX).min(1 << 20)];
        for f in 0..self.context_files {
            // Folders of 100 files, as a node_modules tree has.
            let folder = src.join(format!("d{:04}", f / 100));
            if f % 100 == 0 {
                std::fs::create_dir_all(&folder).map_err(|source| Error::Io {
                    what: "cannot make",
                    path: folder.clone(),
                    source,
                })?;
            }
            let path = folder.join(format!("f{f:06}"));
            let mut file = std::fs::File::create(&path).map_err(|source| Error::Io {
                what: "cannot write",
                path: path.clone(),
                source,
            })?;
            let mut stream = blake3::Hasher::new_keyed(&key);
            stream.update(&(f as u64).to_le_bytes());
            let mut out = stream.finalize_xof();
            let mut left = per_file;
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(buf.len()).min(buf.len());
                out.fill(&mut buf[..n]);
                std::io::Write::write_all(&mut file, &buf[..n]).map_err(|source| Error::Io {
                    what: "cannot write",
                    path: path.clone(),
                    source,
                })?;
                left -= n as u64;
            }
            // The synthetic edit: commit c has changed files 0..c.
            if f < commit {
                std::io::Write::write_all(&mut file, format!("\nedit {f}\n").as_bytes()).map_err(
                    |source| Error::Io {
                        what: "cannot write",
                        path: path.clone(),
                        source,
                    },
                )?;
            }
        }
        Ok(())
    }
}

impl Workload {
    /// Real services, copied for each commit and edited.
    fn replay(&self, real: &Path, dir: &Path) -> Result<Vec<Job>, Error> {
        let services = services_in(real).map_err(|detail| Error::Workload {
            path: real.to_path_buf(),
            detail,
        })?;
        let mut jobs = Vec::with_capacity(services.len() * self.commits);
        for commit in 0..self.commits {
            for (service, (name, from)) in services.iter().enumerate() {
                let ctx = dir.join(format!("{name}-c{commit}"));
                copy_tree(from, &ctx)?;
                let line = format!("\n# strata bench: commit {commit}, seed {}\n", self.seed);
                let edited = match &self.edit {
                    Some(file) => ctx.join(file),
                    None => ctx.join(".strata-bench-commit"),
                };
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(self.edit.is_none())
                    .open(&edited)
                    .map_err(|source| Error::Io {
                        what: "cannot edit (the workload's `edit`)",
                        path: edited.clone(),
                        source,
                    })?;
                std::io::Write::write_all(&mut f, line.as_bytes()).map_err(|source| Error::Io {
                    what: "cannot edit",
                    path: edited.clone(),
                    source,
                })?;
                jobs.push(Job {
                    index: jobs.len(),
                    service,
                    commit,
                    tag: format!("bench-{}-{}:c{commit}", safe(&self.name), safe(name)),
                    dir: ctx,
                });
            }
        }
        Ok(jobs)
    }
}

/// The services in a folder of real ones: each folder with a Dockerfile,
/// by name.
fn services_in(dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut found: Vec<(String, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Dockerfile").is_file())
        .map(|p| {
            let name = p
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            (name, p)
        })
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(format!(
            "{} holds no folder with a Dockerfile",
            dir.display()
        ));
    }
    Ok(found)
}

/// Copies the tree `from` to `to`: files, folders and symlinks (as
/// symlinks), iteratively.
fn copy_tree(from: &Path, to: &Path) -> Result<(), Error> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    };
    let mut stack = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((src, dst)) = stack.pop() {
        std::fs::create_dir_all(&dst).map_err(io("cannot make", &dst))?;
        for entry in std::fs::read_dir(&src).map_err(io("cannot read", &src))? {
            let entry = entry.map_err(io("cannot read", &src))?;
            let (s, d) = (entry.path(), dst.join(entry.file_name()));
            let kind = entry.file_type().map_err(io("cannot read", &s))?;
            if kind.is_dir() {
                stack.push((s, d));
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&s).map_err(io("cannot read", &s))?;
                std::os::unix::fs::symlink(&target, &d).map_err(io("cannot write", &d))?;
            } else {
                std::fs::copy(&s, &d).map_err(io("cannot copy", &s))?;
            }
        }
    }
    Ok(())
}

/// A name as image names and shell words take it.
fn safe(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    if s.is_empty() { "workload".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ci() -> Workload {
        Workload {
            name: "CI like".into(),
            services: 3,
            commits: 2,
            dependency_seconds: 3.0,
            build_seconds: 1.0,
            context_files: 120,
            context_bytes: 12_000,
            concurrency: 2,
            seed: 7,
            base: "busybox:latest".into(),
            dockerfiles: None,
            edit: None,
        }
    }

    fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)
                .unwrap_or_else(|e| panic!("{e}"))
                .flatten()
            {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(dir).unwrap_or(&p).display().to_string();
                    out.push((rel, std::fs::read(&p).unwrap_or_default()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn the_same_workload_and_seed_give_the_same_builds() {
        let (a, b) = (
            tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")),
            tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")),
        );
        let jobs = ci().generate(a.path()).unwrap_or_else(|e| panic!("{e}"));
        ci().generate(b.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(jobs.len(), 6);
        assert_eq!(jobs[0].tag, "bench-ci-like-s0:c0");
        assert_eq!((jobs[3].service, jobs[3].commit), (0, 1));
        assert_eq!(tree(a.path()), tree(b.path()));
        // A commit edits its service's sources; services differ.
        let s0c0 = tree(&a.path().join("s0-c0"));
        let s0c1 = tree(&a.path().join("s0-c1"));
        let s1c0 = tree(&a.path().join("s1-c0"));
        assert_eq!(s0c0.len(), 121);
        assert_ne!(s0c0, s0c1);
        assert_ne!(s0c0[1..], s1c0[1..]);
        let bytes: usize = s0c0.iter().skip(1).map(|(_, b)| b.len()).sum();
        assert_eq!(bytes, 12_000);
        // Another seed, another shared stage.
        let mut other = ci();
        other.seed = 8;
        assert_ne!(ci().dockerfile(0, 0), other.dockerfile(0, 0));
        assert_eq!(ci().ideal_seconds(), Some(3.0 + 6.0 / 2.0));
    }

    #[test]
    fn real_services_are_copied_and_each_commit_edits_one_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let real = dir.path().join("services");
        for name in ["api", "web"] {
            std::fs::create_dir_all(real.join(name).join("src")).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(
                real.join(name).join("Dockerfile"),
                "FROM busybox\nCOPY . /app\n",
            )
            .unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(real.join(name).join("src/main.txt"), "hello")
                .unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::create_dir_all(real.join("docs")).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("real.toml");
        std::fs::write(
            &file,
            "name = \"real\"\ncommits = 2\nconcurrency = 2\ndockerfiles = \"services\"\nedit = \"src/main.txt\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let w = Workload::load(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((w.services, w.builds(), w.ideal_seconds()), (2, 4, None));
        let out = dir.path().join("out");
        let jobs = w.generate(&out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(jobs[1].tag, "bench-real-web:c0");
        let c1 = std::fs::read_to_string(jobs[2].dir.join("src/main.txt")).unwrap_or_default();
        assert_eq!(c1, "hello\n# strata bench: commit 1, seed 0\n");
        // The originals are untouched.
        assert_eq!(
            std::fs::read_to_string(real.join("api/src/main.txt")).unwrap_or_default(),
            "hello"
        );
        // An edit of a file that is not there is an error naming it.
        std::fs::write(&file, "name = \"real\"\ncommits = 1\nconcurrency = 1\ndockerfiles = \"services\"\nedit = \"nope.txt\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let w = Workload::load(&file).unwrap_or_else(|e| panic!("{e}"));
        let err = w
            .generate(&dir.path().join("out2"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.txt"), "{err}");
    }

    #[test]
    fn numbers_out_of_bounds_are_refused() {
        let mut w = ci();
        w.services = 0;
        assert!(w.check().is_err());
        let mut w = ci();
        w.commits = MAX_BUILDS;
        assert!(w.check().is_err());
        let mut w = ci();
        w.concurrency = 0;
        assert!(w.check().is_err());
        let mut w = ci();
        w.build_seconds = f64::NAN;
        assert!(w.check().is_err());
        let mut w = ci();
        w.base = "busybox latest".into();
        assert!(w.check().is_err());
    }
}
