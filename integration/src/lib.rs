//! Helpers for tests that drive the `strata` binary and real tools as a
//! user would.
//!
//! Tests here need root (strata mounts overlays and runs runc) and the
//! Debian packages `scripts/setup` installs.

// Test helpers stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod cluster;
pub mod docker;
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
        c.env("STRATA_HOME", self.home.path())
            .env_remove("STRATA_LOG");
        c
    }

    /// Runs `strata ARGS` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs `strata ARGS`, failing the test unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
