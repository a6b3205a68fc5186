//! A monorepo-sized build context on a cluster against the same builds
//! embedded and on BuildKit (dockerd), in one run: 30,000 small files in
//! 300 folders (node_modules-like, 4 kB each) and one 200 MB file, 320 MB
//! in all, copied whole by `FROM busybox` / `COPY . /app` /
//! `RUN find /app -type f | wc -l`.
//!
//! Cases, for each target: cold (empty caches), nothing changed (three
//! builds, the median), one small file edited. The cluster is one
//! coordinator and two workers on loopback, started fresh for the cold
//! build; its client's state is fresh too. Prints the times, the ratios
//! against embedded and BuildKit, and the cluster's bytes: context read
//! and sent by the client, and layers it downloaded.
//!
//! `STRATA_BENCH_FILES` (default 30,000) and `STRATA_BENCH_BIG_MB` (200)
//! size the context; `STRATA_BENCH_RUNS` (1) repeats the whole. Needs
//! root, dockerd and runc; run it with `scripts/bench`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::{median, runs, strata_release_bin};
use strata_integration::cluster::{Cluster, context_line};
use strata_integration::docker::Docker;
use strata_integration::{Strata, busybox_tar};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes the context: `files` files of 4 kB in folders of 100, one big
/// file, the Dockerfile.
fn make_context(dir: &Path, files: usize, big_mb: usize) {
    for i in 0..files {
        let folder = dir.join(format!("node_modules/pkg{:04}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&folder).unwrap();
        }
        let mut body = format!("// module {i}\n").into_bytes();
        body.resize(4096, b' ');
        std::fs::write(folder.join(format!("f{:03}.js", i % 100)), body).unwrap();
    }
    // Bytes that do not repeat, so no layer compresses them away.
    let mut big = vec![0u8; big_mb << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(dir.join("assets.bin"), big).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox:latest\nCOPY . /app\nRUN find /app -type f | wc -l\n",
    )
    .unwrap();
}

fn edit(ctx: &Path, n: usize) {
    let p = ctx.join("node_modules/pkg0042/f007.js");
    let mut text = std::fs::read(&p).unwrap();
    text.extend_from_slice(format!("// edit {n}\n").as_bytes());
    std::fs::write(&p, text).unwrap();
}

/// Runs `cmd`, failing the benchmark unless it succeeds; returns seconds
/// and standard error. The disk's dirty pages are written first (not
/// timed), so no build pays for writing out the 350 MB the one before
/// it left in the page cache.
fn timed(mut cmd: Command) -> (f64, String) {
    let synced = Command::new("sync").status().unwrap();
    assert!(synced.success(), "sync failed");
    let start = Instant::now();
    let out = cmd.output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{cmd:?} failed:\n{err}");
    (secs, err)
}

#[derive(Default)]
struct Case {
    cold: Vec<f64>,
    warm: Vec<f64>,
    edited: Vec<f64>,
}

/// The cluster's bytes in one build: context read, sent, layers fetched.
#[derive(Default, Clone)]
struct Moved {
    read: String,
    sent: String,
    fetched: u64,
}

fn moved(progress: &str, report: &Path) -> Moved {
    let line = context_line(progress);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    Moved {
        read: line.read,
        sent: format!("{} in {} blobs", line.sent, line.blobs),
        fetched: r["bytes_fetched"].as_u64().unwrap_or(0),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("monorepo_context: benchmark");
        return;
    }
    let (files, big_mb) = (
        env("STRATA_BENCH_FILES", 30_000),
        env("STRATA_BENCH_BIG_MB", 200),
    );
    let bin = strata_release_bin();
    let docker = Docker::shared();
    if docker
        .cmd()
        .args(["image", "inspect", "busybox:latest"])
        .output()
        .is_ok_and(|o| !o.status.success())
    {
        docker.ok(&["import", busybox_tar().to_str().unwrap(), "busybox:latest"]);
    }
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    eprintln!("writing a context of {files} files and {big_mb} MB");
    make_context(&ctx, files, big_mb);

    let (mut embedded, mut cluster, mut buildkit) =
        (Case::default(), Case::default(), Case::default());
    let mut bytes: Vec<(&str, Moved)> = Vec::new();
    let mut edits = 0;
    for round in 1..=runs(1) {
        // Embedded: a fresh state directory with busybox.
        let local = Strata::new();
        let import = Command::new(&bin)
            .env("STRATA_HOME", local.home())
            .args(["image", "import", "busybox:latest"])
            .arg(busybox_tar())
            .output()
            .unwrap();
        assert!(import.status.success());
        let build = || {
            let mut c = Command::new(&bin);
            c.env("STRATA_HOME", local.home())
                .args(["build", "--progress", "quiet", "-t", "mono:1"])
                .arg(&ctx);
            c
        };
        // The cluster: fresh, as is its client.
        let c = Cluster::start(2, 5);
        let client = Strata::new();
        let report = client.home().join("report.json");
        let cluster_build = || {
            let mut cmd = Command::new(&bin);
            cmd.env("STRATA_HOME", client.home())
                .args(["build", "--progress", "plain", "-t", "mono:1", "--cluster"])
                .arg(c.client())
                .arg("--report")
                .arg(&report)
                .arg(&ctx);
            cmd
        };
        let docker_build = || {
            let mut cmd = docker.cmd();
            cmd.args(["build", "-q", "-t", "mono:1"]).arg(&ctx);
            cmd
        };
        let _ = docker.cmd().args(["rmi", "-f", "mono:1"]).output();
        docker.ok(&["builder", "prune", "-af"]);

        eprintln!("round {round}: cold");
        embedded.cold.push(timed(build()).0);
        let (secs, err) = timed(cluster_build());
        cluster.cold.push(secs);
        bytes.push(("cold", moved(&err, &report)));
        buildkit.cold.push(timed(docker_build()).0);

        eprintln!("round {round}: nothing changed");
        for i in 0..3 {
            embedded.warm.push(timed(build()).0);
            let (secs, err) = timed(cluster_build());
            cluster.warm.push(secs);
            if i == 2 {
                bytes.push(("nothing changed", moved(&err, &report)));
            }
            buildkit.warm.push(timed(docker_build()).0);
        }

        eprintln!("round {round}: one file edited");
        edits += 1;
        edit(&ctx, edits);
        embedded.edited.push(timed(build()).0);
        let (secs, err) = timed(cluster_build());
        cluster.edited.push(secs);
        bytes.push(("one file edited", moved(&err, &report)));
        buildkit.edited.push(timed(docker_build()).0);
        let last = |v: &[f64]| v.last().copied().unwrap_or(f64::NAN);
        eprintln!(
            "round {round} (cluster / embedded / BuildKit): cold {:.2} / {:.2} / {:.2} s, edited {:.2} / {:.2} / {:.2} s",
            last(&cluster.cold),
            last(&embedded.cold),
            last(&buildkit.cold),
            last(&cluster.edited),
            last(&embedded.edited),
            last(&buildkit.edited),
        );
    }

    println!(
        "\nmonorepo context: {files} files + {big_mb} MB, COPY . /app; 1 coordinator + 2 workers on loopback"
    );
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "case", "cluster", "embedded", "BuildKit", "vs embedded", "vs BuildKit"
    );
    for (name, pick) in [
        ("cold", (|c: &Case| c.cold.clone()) as fn(&Case) -> Vec<f64>),
        ("nothing changed", |c: &Case| c.warm.clone()),
        ("one file edited", |c: &Case| c.edited.clone()),
    ] {
        let (cl, em, bk) = (
            median(pick(&cluster)),
            median(pick(&embedded)),
            median(pick(&buildkit)),
        );
        println!(
            "{name:<18} {cl:>9.2}s {em:>9.2}s {bk:>9.2}s {:>11.2}x {:>11.2}x",
            cl / em,
            cl / bk
        );
    }
    println!("\ncluster bytes (last round)");
    for (name, m) in bytes.iter().rev().take(3).rev() {
        println!(
            "{name:<18} context read {}, sent {}; layers downloaded {} bytes",
            m.read, m.sent, m.fetched
        );
    }
}
