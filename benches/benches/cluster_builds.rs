//! Builds on a local cluster (a coordinator and three workers started with
//! `strata cluster up --local 3`) against the same builds embedded, in one
//! run:
//!
//! * the fan-out Dockerfile (four CPU-bound builders, one final stage),
//!   cold: makespan on the cluster and embedded, and the difference as the
//!   share of the cluster's time spent placing stages and moving blobs
//!   (one machine lends the cluster no extra cores: this measures what
//!   distribution costs, not what it gains);
//! * the same on a cluster keeping one copy of each layer instead of two:
//!   what publishing the second copy costs a build;
//! * twenty builds submitted at once whose Dockerfiles share one builder
//!   stage: builds per minute, and how often the builder ran (once);
//! * a worker holding a 256 MiB layer killed: how long the leader takes to
//!   copy it again, bounded to 32 MiB/s and unbounded, against the bound.
//!
//! Needs root and runc; run it with `scripts/bench`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use common::{Row, median, print_table, runs, strata_release_bin, time};
use strata_integration::cluster::Cluster;
use strata_integration::{Strata, busybox_tar, repo_root, write_files};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("cluster_builds: benchmark");
        return;
    }
    let bin = strata_release_bin();
    let fan = repo_root().join("examples/fanout");

    // Cold builds, each in a fresh state directory and a fresh cluster.
    let mut embedded_times = Vec::new();
    let mut cluster_times = Vec::new();
    let mut one_copy_times = Vec::new();
    let mut workers = std::collections::BTreeSet::new();
    for round in 1..=runs(3) {
        let embedded = Strata::new();
        let mut c = Command::new(&bin);
        c.env("STRATA_HOME", embedded.home())
            .args(["image", "import", "busybox:latest"])
            .arg(busybox_tar());
        time(c);
        let mut c = Command::new(&bin);
        c.env("STRATA_HOME", embedded.home())
            .args(["build", "--progress", "quiet"])
            .arg(&fan);
        eprintln!("fan-out, embedded, run {round}");
        embedded_times.push(time(c));

        let cluster = Cluster::start(3, 5);
        let client = Strata::new();
        let report = client.home().join("report.json");
        let mut c = Command::new(&bin);
        c.env("STRATA_HOME", client.home())
            .args(["build", "--progress", "quiet", "--cluster"])
            .arg(cluster.client())
            .arg("--report")
            .arg(&report)
            .arg(&fan);
        eprintln!("fan-out, cluster, run {round}");
        cluster_times.push(time(c));
        let one_copy = Cluster::start_with(1, 3, &[("replication", "1".into())]);
        let mut c = Command::new(&bin);
        c.env("STRATA_HOME", Strata::new().home())
            .args(["build", "--progress", "quiet", "--cluster"])
            .arg(one_copy.client())
            .arg(&fan);
        eprintln!("fan-out, cluster keeping one copy, run {round}");
        one_copy_times.push(time(c));
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        workers.extend(
            r["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["worker"].as_str().unwrap().to_string()),
        );
    }
    let (embedded_secs, cluster_secs) = (median(embedded_times), median(cluster_times));
    let one_copy_secs = median(one_copy_times);
    workers.remove("-");

    let cluster = Cluster::start(3, 5);
    // Twenty builds at once sharing a builder.
    let n = 20;
    let dirs: Vec<tempfile::TempDir> = (0..n)
        .map(|i| {
            let d = tempfile::tempdir().unwrap();
            write_files(
                d.path(),
                &[(
                    "Dockerfile",
                    &format!(
                        "FROM busybox:latest AS builder\n\
                         RUN dd if=/dev/zero bs=1M count=400 2>/dev/null | sha256sum > /artifact\n\
                         FROM busybox:latest\n\
                         COPY --from=builder /artifact /artifact\n\
                         RUN echo build {i} >> /artifact\n"
                    ),
                )],
            );
            d
        })
        .collect();
    let clients: Vec<Strata> = (0..n).map(|_| Strata::new()).collect();
    eprintln!("{n} concurrent builds sharing a builder");
    let start = Instant::now();
    let children: Vec<_> = dirs
        .iter()
        .zip(&clients)
        .map(|(d, s)| {
            Command::new(&bin)
                .env("STRATA_HOME", s.home())
                .args(["build", "--progress", "quiet", "--cluster"])
                .arg(cluster.client())
                .arg("--report")
                .arg(s.home().join("report.json"))
                .arg(d.path())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let concurrent_secs = start.elapsed().as_secs_f64();
    let builder_runs: usize = clients
        .iter()
        .map(|s| {
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(s.home().join("report.json")).unwrap())
                    .unwrap();
            r["steps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["stage"] == "builder" && s["cached"] == false)
                .count()
        })
        .sum();

    let bounded = repair_time(&bin, 32);
    let unbounded = repair_time(&bin, 0);

    print_table(
        "fan-out (examples/fanout), cold, medians",
        "embedded",
        &[
            Row {
                name: format!("makespan on {} workers, 2 copies", workers.len()),
                strata: cluster_secs,
                baseline: embedded_secs,
            },
            Row {
                name: "makespan on 3 workers, 1 copy".into(),
                strata: one_copy_secs,
                baseline: embedded_secs,
            },
        ],
    );
    println!(
        "publishing a second copy of each layer: {:+.2}s ({:+.0}%)",
        cluster_secs - one_copy_secs,
        100.0 * (cluster_secs - one_copy_secs) / one_copy_secs
    );
    println!(
        "placing stages and moving blobs: {:.0}% of the cluster's makespan ({:.2}s)",
        100.0 * (cluster_secs - embedded_secs).max(0.0) / cluster_secs,
        (cluster_secs - embedded_secs).max(0.0)
    );
    println!(
        "{n} concurrent builds sharing a builder: {:.1}s, {:.1} builds per minute; the builder ran {builder_runs} time(s)",
        concurrent_secs,
        n as f64 * 60.0 / concurrent_secs
    );
    let mib = REPAIR_BYTES as f64 / f64::from(1 << 20);
    println!(
        "copying again the {mib:.0} MiB layer of a killed worker: {bounded:.2}s at a 32 MiB/s bound ({:.1} MiB/s, {:.2}x the bound), {unbounded:.2}s unbounded ({:.1} MiB/s)",
        mib / bounded,
        mib / bounded / 32.0,
        mib / unbounded
    );
}

/// The layer a worker holds when it is killed.
const REPAIR_BYTES: u64 = 256 << 20;

/// Seconds from a killed worker's lease expiring (the coordinator counts
/// it gone) until its 256 MiB layer has its second copy again, copied at
/// up to `mib_per_second` (0: no bound).
fn repair_time(bin: &std::path::Path, mib_per_second: u64) -> f64 {
    use std::time::Duration;
    let cluster = Cluster::start_with(
        1,
        3,
        &[
            ("lease_seconds", "1".into()),
            ("repair_mib_per_second", mib_per_second.to_string()),
        ],
    );
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            &format!("FROM busybox:latest\nRUN head -c {REPAIR_BYTES} /dev/urandom > /big\n"),
        )],
    );
    let mut c = Command::new(bin);
    c.env("STRATA_HOME", Strata::new().home())
        .args(["build", "--progress", "quiet", "--cluster"])
        .arg(cluster.client())
        .arg(ctx.path());
    time(c);
    let holder = cluster
        .worker_names()
        .into_iter()
        .find(|w| cluster.blob_bytes(w) > REPAIR_BYTES)
        .unwrap();
    eprintln!("killing {holder}, copies at {mib_per_second} MiB/s (0: unbounded)");
    cluster.kill(&holder);
    cluster.wait_for(Duration::from_secs(30), |s| {
        s.lines()
            .any(|l| l.starts_with(&holder) && l.contains(" gone "))
    });
    let gone = Instant::now();
    cluster.wait_for(Duration::from_secs(120), |s| {
        Cluster::replication(s) == Some((2, 0))
    });
    gone.elapsed().as_secs_f64()
}
