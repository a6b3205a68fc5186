//! `cluster/netns`: a cluster whose nodes each have a network namespace,
//! built through from the host like any client would.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use strata_integration::{Strata, busybox_tar, repo_root, run_bounded, strata_bin, write_files};

fn netns(args: &[&str]) -> std::process::Output {
    run_bounded(
        Command::new(repo_root().join("cluster/netns"))
            .args(args)
            .env("STRATA_BIN", strata_bin())
            .env(
                "STRATA_IMPORT",
                format!("busybox:latest={}", busybox_tar().display()),
            ),
        Duration::from_secs(120),
    )
}

/// Bytes the host received from the namespace behind veth `link`.
fn received_from(link: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{link}/statistics/rx_bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = netns(&["down", "--dir", self.0.to_str().unwrap()]);
    }
}

#[test]
fn a_cluster_across_network_namespaces_builds_over_real_interfaces() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let down = Down(dir.path());
    let up = netns(&["up", "--workers", "2", "--dir", d]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let status = String::from_utf8_lossy(&up.stdout);
    assert!(
        status.contains("worker-1       10.77.0.11:7400"),
        "{status}"
    );
    assert!(
        status.contains("worker-2       10.77.0.12:7400"),
        "{status}"
    );
    let before: Vec<u64> = ["stv-c", "stv-w1", "stv-w2"]
        .iter()
        .map(|l| received_from(l))
        .collect();

    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest AS a\nRUN head -c 3000000 /dev/urandom > /a\n\
             FROM busybox:latest AS b\nRUN head -c 3000000 /dev/urandom > /b\n\
             FROM busybox:latest\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n\
             CMD [\"sh\", \"-c\", \"wc -c /a /b\"]\n",
        )],
    );
    let client = Strata::new();
    let report = client.home().join("report.json");
    client.ok(&[
        "build",
        "--cluster",
        &format!("{d}/client.toml"),
        "--report",
        report.to_str().unwrap(),
        "-o",
        "type=image",
        "-t",
        "across:1",
        ctx.path().to_str().unwrap(),
    ]);
    let out = client.ok(&["run", "--rm", "across:1"]);
    assert!(
        out.contains("3000000 /a") && out.contains("3000000 /b"),
        "{out}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let workers: BTreeSet<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["cached"] == false && s["instruction"].as_str().unwrap().starts_with("RUN"))
        .map(|s| s["worker"].as_str().unwrap())
        .collect();
    assert_eq!(workers.len(), 2, "{r}");

    // The 3 MB stage from one worker reached the other, and the image the
    // host, through the veths.
    let after: Vec<u64> = ["stv-c", "stv-w1", "stv-w2"]
        .iter()
        .map(|l| received_from(l))
        .collect();
    let sent_by_workers = (after[1] - before[1]) + (after[2] - before[2]);
    assert!(
        sent_by_workers > 6_000_000,
        "the workers sent {sent_by_workers} bytes over their veths"
    );

    drop(down);
    let links = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !links.contains("strbr0") && !links.contains("stv-"),
        "{links}"
    );
    let spaces = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!spaces.contains("strata-"), "{spaces}");
}
