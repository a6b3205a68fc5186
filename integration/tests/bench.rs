//! `strata bench` as a user runs it: a workload file, the local daemon, a
//! cluster and BuildKit in one run, the report opened in a real browser.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use strata_integration::cluster::Cluster;
use strata_integration::docker::{Docker, SOCKET};
use strata_integration::{COMMAND_LIMIT, Strata, run_bounded};

const WORKLOAD: &str = "\
name = \"tiny ci\"
services = 2
commits = 2
dependency_seconds = 1
build_seconds = 0.2
context_files = 30
context_bytes = 30000
concurrency = 2
seed = 41
";

#[test]
fn bench_measures_the_daemon_a_cluster_and_buildkit_side_by_side_and_reports_in_html() {
    let docker = Docker::shared();
    docker.load_busybox(&["busybox:latest"]);
    let cluster = Cluster::start(2, 5);
    let client = Strata::new().with_busybox(&[]);
    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("tiny.toml");
    std::fs::write(&workload, WORKLOAD).unwrap();
    let out_dir = dir.path().join("out");
    // dockerd keeps its cache between tests: a seed of its own makes this
    // run cold there too.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_string();
    let out = run_bounded(
        client
            .cmd()
            .env("DOCKER_HOST", format!("unix://{SOCKET}"))
            .arg("bench")
            .arg(&workload)
            .arg("--cluster")
            .arg(cluster.client())
            .args(["--seed", &seed])
            .args(["--docker", "on", "--docker-cli", "/usr/bin/docker", "-o"])
            .arg(&out_dir),
        COMMAND_LIMIT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The table: three targets, cold and warm, ratios against BuildKit.
    for target in [
        "strata (local daemon)",
        "strata cluster (",
        "docker build (BuildKit)",
    ] {
        assert_eq!(stdout.matches(target).count(), 2, "{target}:\n{stdout}");
    }
    assert!(stdout.contains('×'), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 6);
    for r in runs {
        let s = &r["summary"];
        assert_eq!(s["builds"], 4, "{r}");
        assert_eq!(s["failed"], 0, "{r}");
        assert!(s["p50"].as_f64().unwrap() > 0.0, "{r}");
        if r["phase"] == "warm" {
            // Nothing changed: every step of every build is cached.
            assert_eq!(s["hit_rate"], 1.0, "{r}");
        } else {
            // The dependency stage ran once and was shared after.
            let hit = s["hit_rate"].as_f64().unwrap();
            assert!(hit > 0.0 && hit < 1.0, "{r}");
        }
    }
    // The cluster's steps ran on its workers, which the report counts.
    let cluster_cold = &runs[1]["summary"]["busy_slots"];
    assert!(
        cluster_cold
            .as_object()
            .unwrap()
            .keys()
            .all(|w| w.starts_with("worker-")),
        "{cluster_cold}"
    );

    // The page, in a browser: every plot, every run.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-report.png");
    let url = format!("file://{}", out_dir.join("report.html").display());
    let dom = strata_integration::browser::render(&url, &shot);
    eprintln!("bench report screenshot: {}", shot.display());
    for id in [
        "summary",
        "throughput",
        "latency",
        "hit-rate",
        "bytes",
        "slots",
    ] {
        assert!(dom.contains(&format!("id=\"{id}\"")), "{id}:\n{dom}");
    }
    assert!(dom.contains("docker build (BuildKit) (warm)"), "{dom}");
    assert!(dom.contains("strata bench: tiny ci"), "{dom}");
}

#[test]
fn a_workload_out_of_bounds_is_refused_before_anything_runs() {
    let client = Strata::new();
    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("huge.toml");
    std::fs::write(
        &workload,
        WORKLOAD.replace("services = 2", "services = 100000"),
    )
    .unwrap();
    let out = client.run(&["bench", workload.to_str().unwrap(), "--docker", "off"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("huge.toml") && err.contains("services × commits"),
        "{err}"
    );
}
