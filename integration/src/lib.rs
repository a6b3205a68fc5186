//! Helpers for tests that drive the `strata` binary and real tools as a
//! user would.
//!
//! Tests here need root (strata mounts overlays and runs runc) and the
//! Debian packages `scripts/setup` installs.

// Test helpers stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod browser;
pub mod cluster;
pub mod docker;
pub mod emulator;
pub mod http;
pub mod image_model;
pub mod registry;

/// The repository's root, found at run time (cargo sets
/// `CARGO_MANIFEST_DIR` for the tests and benchmarks it runs): a binary
/// built in another clone sharing the target directory must not use that
/// clone.
pub fn repo_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    // Benchmarks run from `benches/`, tests from `integration/`: both sit
    // at the top of the repository.
    manifest.parent().unwrap().to_path_buf()
}

/// The `strata` binary of this build (next to the test executables).
pub fn strata_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("strata");
    assert!(
        bin.is_file(),
        "{} missing: build it with `cargo build --bin strata`",
        bin.display()
    );
    bin
}

/// The root filesystem tar of a base image (`busybox`, `golang`, `node`,
/// `nginx`), made once per machine by `scripts/base-image`.
pub fn base_image_tar(name: &str) -> PathBuf {
    let out = Command::new(repo_root().join("scripts/base-image"))
        .arg(name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/base-image {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The busybox root filesystem tar.
pub fn busybox_tar() -> PathBuf {
    static TAR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    TAR.get_or_init(|| base_image_tar("busybox")).clone()
}

/// A strata state directory for one test.
pub struct Strata {
    home: tempfile::TempDir,
    small_fs: bool,
}

impl Drop for Strata {
    fn drop(&mut self) {
        // The daemon a test's commands started goes with the test.
        // (`daemon stop` waits a bounded time; a panic here would abort.)
        let _ = self
            .cmd()
            .args(["daemon", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if self.small_fs {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.home.path())
                .status();
        }
    }
}

impl Default for Strata {
    fn default() -> Self {
        Self::new()
    }
}

impl Strata {
    /// A fresh, empty state directory.
    pub fn new() -> Strata {
        Strata {
            home: tempfile::Builder::new()
                .prefix("strata-home-")
                .tempdir()
                .unwrap(),
            small_fs: false,
        }
    }

    /// A fresh state directory on a filesystem of its own holding only
    /// `megabytes` (a tmpfs), to see what a full disk does.
    pub fn on_small_filesystem(megabytes: u32) -> Strata {
        let mut s = Strata::new();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={megabytes}m"),
                "strata-test",
            ])
            .arg(s.home.path())
            .status()
            .unwrap();
        assert!(status.success(), "cannot mount a tmpfs (needs root)");
        s.small_fs = true;
        s
    }

    /// The state directory.
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// A `strata` command using this state directory.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(strata_bin());
        // A test that wants an epoch gives one.
        c.env("STRATA_HOME", self.home.path())
            .env_remove("STRATA_LOG")
            .env_remove("SOURCE_DATE_EPOCH");
        c
    }

    /// Runs `strata ARGS` and returns its output, within
    /// [`COMMAND_LIMIT`].
    pub fn run(&self, args: &[&str]) -> Output {
        run_bounded(self.cmd().args(args), COMMAND_LIMIT)
    }

    /// Runs `strata ARGS`, failing the test unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        succeed(self.cmd().args(args))
    }

    /// Imports the busybox base image as `busybox:latest` (and `names`).
    pub fn with_busybox(self, names: &[&str]) -> Strata {
        let tar = busybox_tar();
        let tar = tar.to_str().unwrap();
        self.ok(&["image", "import", "busybox:latest", tar]);
        for n in names {
            self.ok(&["image", "import", n, tar]);
        }
        self
    }

    /// Builds `context` with progress off; returns the parsed report.
    pub fn build(&self, context: &Path, extra: &[&str]) -> serde_json::Value {
        let report = self.home.path().join("report.json");
        let mut args = vec![
            "build",
            "--progress",
            "plain",
            "--report",
            report.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push(context.to_str().unwrap());
        self.ok(&args);
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap()
    }
}

/// How long a strata command in a test may run: one still running after
/// five minutes is killed and fails the test, since a hang is a bug to
/// report, not to wait out.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(300);

/// Runs `cmd` within [`COMMAND_LIMIT`], failing the test unless it
/// succeeds; returns its stdout.
pub fn succeed(cmd: &mut Command) -> String {
    let out = run_bounded(cmd, COMMAND_LIMIT);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` to the end, or kills it and fails after `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained as it comes, so a chatty command never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {limit:?}:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Fails the test unless `out` failed with each of `want` in its stderr;
/// returns the stderr.
pub fn fails_with(out: &Output, want: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "should have failed:\n{err}");
    for w in want {
        assert!(err.contains(w), "expected {w:?} in:\n{err}");
    }
    err
}

/// Copies a directory tree (files and directories only).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// Writes `files` (path, content) under `dir`.
pub fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (p, c) in files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
}

/// A new build context holding only a Dockerfile of `text`.
pub fn dockerfile_context(text: &str) -> tempfile::TempDir {
    let ctx = tempfile::tempdir().unwrap();
    write_files(ctx.path(), &[("Dockerfile", text)]);
    ctx
}

/// The cache keys of a build report, in step order.
pub fn keys(report: &serde_json::Value) -> Vec<(String, String)> {
    let mut steps: Vec<(String, u64, String)> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["number"].as_u64().unwrap(),
                s["cache_key"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    steps.sort();
    steps
        .into_iter()
        .map(|(st, n, k)| (format!("{st}/{n}"), k))
        .collect()
}

/// How many steps of a report were cached, and how many there were.
pub fn cached(report: &serde_json::Value) -> (usize, usize) {
    let steps = report["steps"].as_array().unwrap();
    (
        steps
            .iter()
            .filter(|s| s["cached"].as_bool() == Some(true))
            .count(),
        steps.len(),
    )
}

/// A server a test runs (a registry, an agent, a git daemon): started
/// with no terminal, waited for until it is ready, killed when dropped.
pub struct Background {
    child: std::process::Child,
}

impl Background {
    /// Spawns `cmd` (`what` names it in failures) and waits up to 20 s for
    /// `ready`.
    pub fn start(cmd: &mut Command, what: &str, ready: impl Fn() -> bool) -> Background {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} (scripts/setup installs it): {e}"));
        let server = Background { child };
        let start = Instant::now();
        while !ready() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{what} did not become ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
