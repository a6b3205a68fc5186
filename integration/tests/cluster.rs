//! Clusters of real processes on loopback: a coordinator and workers
//! started with `strata cluster up --local`, builds submitted with
//! `strata build --cluster`, as a user runs them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use strata_integration::cluster::{Cluster, ContextLine, context_line, runs, worker_running};
use strata_integration::{Strata, dockerfile_context, fails_with, write_files};

/// Four builders, each with 20 MB the final stage does not copy.
const FAN_OUT: &str = "\
FROM busybox:latest AS a
RUN head -c 20000000 /dev/zero > /unneeded && echo a > /out-a
FROM busybox:latest AS b
RUN head -c 20000001 /dev/zero > /unneeded && echo b > /out-b
FROM busybox:latest AS c
RUN head -c 20000002 /dev/zero > /unneeded && echo c > /out-c
FROM busybox:latest AS d
RUN head -c 20000003 /dev/zero > /unneeded && echo d > /out-d
FROM busybox:latest
COPY --from=a /out-a /out/
COPY --from=b /out-b /out/
COPY --from=c /out-c /out/
COPY --from=d /out-d /out/
CMD [\"sh\", \"-c\", \"cat /out/*\"]
";

fn workers_of(report: &serde_json::Value) -> HashMap<String, String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                format!("{} {}", s["stage"].as_str().unwrap(), s["number"]),
                s["worker"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn stages_spread_over_workers_and_the_image_matches_the_embedded_build() {
    let cluster = Cluster::start(3, 5);
    let ctx = dockerfile_context(FAN_OUT);

    let client = Strata::new();
    // An epoch makes the image the same wherever and whenever it is built.
    let epoch = ["--build-arg", "SOURCE_DATE_EPOCH=1700000000"];
    let report = cluster.build(&client, ctx.path(), &["-t", "fan:1", epoch[0], epoch[1]]);
    let placed = workers_of(&report);
    let builders: BTreeSet<&String> = ["a 2", "b 2", "c 2", "d 2"]
        .iter()
        .map(|k| &placed[*k])
        .collect();
    assert!(builders.len() >= 2, "the builders ran on {builders:?}");
    assert_eq!(client.ok(&["run", "--rm", "fan:1"]), "a\nb\nc\nd\n");

    // The same Dockerfile built on one machine gives the same image.
    let embedded = Strata::new().with_busybox(&[]);
    let local = embedded.build(ctx.path(), &epoch);
    assert_eq!(
        report["image"]["manifest_digest"], local["image"]["manifest_digest"],
        "cluster and embedded builds differ"
    );

    // The final stage copied artifacts, not the builders' 20 MB layers:
    // each builder layer is on the two workers replication keeps it on,
    // and on no third for the build's sake.
    let total: u64 = cluster
        .worker_names()
        .iter()
        .map(|w| cluster.blob_bytes(w))
        .sum();
    assert!(
        (2 * 4 * 20_000_000..2 * 4 * 20_000_000 + 15_000_000).contains(&total),
        "the workers hold {total} bytes, not two copies of each builder layer"
    );

    // Another client, another state directory: nothing runs again, and
    // only the image's layers come to it.
    let other = Strata::new();
    let again = cluster.build(&other, ctx.path(), &["-t", "fan:1", epoch[0], epoch[1]]);
    assert_eq!(runs(&again), 0, "{again}");
    assert_eq!(
        again["image"]["manifest_digest"],
        report["image"]["manifest_digest"]
    );
    let fetched = again["bytes_fetched"].as_u64().unwrap();
    assert!(
        fetched < 5_000_000,
        "fetched {fetched} bytes for a 2 MB image"
    );
    assert_eq!(other.ok(&["run", "--rm", "fan:1"]), "a\nb\nc\nd\n");

    // A --build-context naming an image reaches every node that plans; a
    // directory stays on the client's machine and is refused by name.
    let named = tempfile::tempdir().unwrap();
    write_files(
        named.path(),
        &[("Dockerfile", "FROM base\nRUN echo named > /named\n")],
    );
    cluster.build(
        &other,
        named.path(),
        &[
            "-t",
            "named:1",
            "--build-context",
            "base=docker-image://busybox:latest",
        ],
    );
    assert_eq!(
        other.ok(&["run", "--rm", "named:1", "cat", "/named"]),
        "named\n"
    );
    let refused = other.run(&[
        "build",
        "--cluster",
        cluster.client().to_str().unwrap(),
        "--build-context",
        &format!("base={}", named.path().display()),
        named.path().to_str().unwrap(),
    ]);
    fails_with(
        &refused,
        &["--build-context base: a cluster build takes docker-image://"],
    );
}

#[test]
fn a_build_kept_off_the_worker_that_made_its_cache_reuses_it_and_moves_only_what_it_needs() {
    // One copy of each layer: the other worker holds only what it fetches.
    let cluster = Cluster::start_with(1, 2, &[("replication", "1".into())]);
    let client = cluster.client();
    let client = client.to_str().unwrap();
    let ctx = tempfile::tempdir().unwrap();
    let dockerfile = "FROM busybox:latest\n\
                      RUN head -c 8000000 /dev/urandom > /big\n\
                      RUN echo small > /small\n";
    write_files(ctx.path(), &[("Dockerfile", dockerfile)]);
    let first = cluster.build(&Strata::new(), ctx.path(), &["-t", "moved:1"]);
    let made_on = workers_of(&first)["stage-0 2"].clone();
    let other = cluster
        .worker_names()
        .into_iter()
        .find(|w| *w != made_on)
        .unwrap();

    // Cordoning is an administrator's: a client certificate is refused.
    let refused = cluster.run(&["cluster", "cordon", &made_on, "--cluster", client]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("needs an admin certificate"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let admin = cluster.admin();
    let admin = admin.to_str().unwrap();
    let out = cluster.ok(&["cluster", "cordon", &made_on, "--cluster", admin]);
    assert_eq!(out, format!("{made_on} cordoned\n"));
    let status = cluster.status();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with(&made_on) && l.contains("cordoned")),
        "{status}"
    );
    let unknown = cluster.run(&["cluster", "cordon", "worker-9", "--cluster", admin]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no worker named worker-9"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );

    // The same Dockerfile again: everything comes from the cache, whose
    // maker still serves its layers while cordoned.
    let again_client = Strata::new();
    let again = cluster.build(&again_client, ctx.path(), &["-t", "moved:1"]);
    assert_eq!(runs(&again), 0, "{again}");
    assert_eq!(
        again["image"]["manifest_digest"],
        first["image"]["manifest_digest"]
    );

    // One step more: only that step runs, on the other worker, which takes
    // the cached layers under it from their maker instead of running them.
    let before = cluster.blob_bytes(&other);
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            &format!("{dockerfile}RUN cat /small /small > /double\n"),
        )],
    );
    let extended_client = Strata::new();
    let extended = cluster.build(&extended_client, ctx.path(), &["-t", "moved:2"]);
    assert_eq!(runs(&extended), 1, "{extended}");
    assert_eq!(workers_of(&extended)["stage-0 4"], other);
    let moved = cluster.blob_bytes(&other) - before;
    assert!(
        (8_000_000..12_000_000).contains(&moved),
        "{other} took {moved} bytes for an 8 MB parent chain"
    );
    assert_eq!(
        extended_client.ok(&["run", "--rm", "moved:2", "cat", "/double"]),
        "small\nsmall\n"
    );

    cluster.ok(&["cluster", "uncordon", &made_on, "--cluster", admin]);
    assert!(!cluster.status().contains("cordoned"));
}

#[test]
fn a_worker_killed_mid_stage_does_not_fail_the_build() {
    let cluster = Cluster::start(2, 2);
    let ctx = dockerfile_context(
        "FROM busybox:latest\nRUN sleep 3 && echo survived > /f\nCMD [\"cat\", \"/f\"]\n",
    );
    let client = Strata::new();
    let report_path = client.home().join("report.json");
    let build = cluster.spawn_build(&client, ctx.path(), &["-t", "survivor:1"]);
    // Whichever worker got the stage dies in the middle of it.
    let status = cluster.wait_for(Duration::from_secs(30), |s| worker_running(s, 1).is_some());
    let victim = worker_running(&status, 1).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    cluster.kill(&victim);
    let out = build.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the build failed with {victim} killed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    let ran_on = &workers_of(&report)["stage-0 2"];
    assert_ne!(
        ran_on, &victim,
        "the step's result came from the killed worker"
    );
    assert_eq!(client.ok(&["run", "--rm", "survivor:1"]), "survived\n");
    // What the dead worker was making never reached the cache: the next
    // build finds the surviving result and runs nothing.
    let again = cluster.build(&Strata::new(), ctx.path(), &[]);
    assert_eq!(runs(&again), 0, "{again}");
}

#[test]
fn a_new_layer_reaches_its_second_worker_as_it_is_written_and_outlives_its_maker() {
    use strata_integration::http::get;
    let cluster = Cluster::start(2, 2);
    let ctx = dockerfile_context(
        "FROM busybox:latest\nRUN head -c 16000000 /dev/urandom > /big && echo made > /f\nCMD [\"cat\", \"/f\"]\n",
    );
    let report = cluster.build(&Strata::new(), ctx.path(), &["-t", "streamed:1"]);
    let maker = workers_of(&report)["stage-0 2"].clone();
    let other = cluster
        .worker_names()
        .into_iter()
        .find(|w| *w != maker)
        .unwrap();
    // The other worker got the layer from the stream its maker wrote it
    // to, and did not fetch it again when asked for the copy.
    let bytes = |metrics: &str, kind: &str| -> f64 {
        let line = format!("strata_transfer_bytes_total{{kind=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line)?.parse().ok())
            .unwrap_or(0.0)
    };
    let (_, metrics) = get(cluster.metrics_addr(&other), "/metrics");
    assert!(
        bytes(&metrics, "peer_streamed") >= 16e6,
        "{other} took no 16 MB layer as {maker} wrote it:\n{metrics}"
    );
    assert!(
        bytes(&metrics, "peer_received") < 16e6,
        "{other} fetched the layer again:\n{metrics}"
    );
    // Its copy is the layer: with the maker gone, a new client's build is
    // cached whole and its image runs.
    cluster.kill(&maker);
    let client = Strata::new();
    let again = cluster.build(&client, ctx.path(), &["-t", "streamed:1"]);
    assert_eq!(runs(&again), 0, "{again}");
    assert_eq!(client.ok(&["run", "--rm", "streamed:1"]), "made\n");
}

#[test]
fn a_client_killed_mid_build_takes_its_build_with_it() {
    let cluster = Cluster::start(1, 5);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN sleep 120\n")],
    );
    let client = Strata::new();
    let mut build = cluster.spawn_build(&client, ctx.path(), &[]);
    cluster.wait_for(Duration::from_secs(30), |s| worker_running(s, 1).is_some());
    build.kill().unwrap();
    build.wait().unwrap();
    // No goodbye from a killed client: the coordinator notices the
    // connection is dead, cancels the build and its running step.
    let status = cluster.wait_for(Duration::from_secs(30), |s| {
        s.contains("0 builds running") && worker_running(s, 0).is_some()
    });
    // The step never finished, so nothing of it is in the cache.
    assert!(status.contains("): 0 cache entries"), "{status}");
}

/// The error a build ends with, as its client prints it: the line after
/// `error: ` and the `caused by` lines under it.
fn error_of(stderr: &str) -> String {
    let at = stderr
        .find("error: ")
        .unwrap_or_else(|| panic!("no error in: {stderr}"));
    stderr[at..].trim_end().to_string()
}

#[test]
fn a_failed_cluster_build_reads_as_the_same_build_failed_on_one_machine() {
    let cluster = Cluster::start(1, 5);
    let client = Strata::new();
    let local = Strata::new().with_busybox(&[]);
    for (dockerfile, says) in [
        (
            "FROM busybox:latest\nRUN echo boom && exit 3\n",
            "error: Dockerfile:2: [stage-0 2/2] RUN echo boom && exit 3: process \"/bin/sh -c echo boom && exit 3\" did not complete successfully: exit code: 3",
        ),
        (
            "FROM busybox:latest\nCOPY missing.txt /\n",
            "\"missing.txt\": not found",
        ),
    ] {
        let ctx = tempfile::tempdir().unwrap();
        write_files(ctx.path(), &[("Dockerfile", dockerfile)]);
        let dir = ctx.path().to_str().unwrap();
        let on_cluster = client.run(&[
            "build",
            "--cluster",
            cluster.client().to_str().unwrap(),
            dir,
        ]);
        assert!(!on_cluster.status.success());
        let here = local.run(&["build", dir]);
        assert!(!here.status.success());
        let (cluster_err, local_err) = (
            String::from_utf8_lossy(&on_cluster.stderr).into_owned(),
            String::from_utf8_lossy(&here.stderr).into_owned(),
        );
        assert!(error_of(&cluster_err).contains(says), "{cluster_err}");
        assert_eq!(
            error_of(&cluster_err),
            error_of(&local_err),
            "{cluster_err}\n{local_err}"
        );
        if dockerfile.contains("boom") {
            // The failed step's last output, above the error.
            assert!(
                cluster_err
                    .contains("------\n > [stage-0 2/2] RUN echo boom && exit 3:\nboom\n------"),
                "{cluster_err}"
            );
        }
    }
    // The cluster's history keeps each failure with its error.
    let history = client.ok(&[
        "history",
        "--cluster",
        cluster.client().to_str().unwrap(),
        "--format",
        "json",
    ]);
    let builds: serde_json::Value = serde_json::from_str(&history).unwrap();
    let failed = builds
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["status"] == "failed")
        .count();
    assert_eq!(failed, 2, "{history}");
}

#[test]
fn strangers_are_refused_and_roles_are_checked() {
    let cluster = Cluster::start(1, 5);
    // A client whose certificate comes from another cluster's CA.
    let other = tempfile::tempdir().unwrap();
    cluster.ok(&[
        "cluster",
        "init",
        "--dir",
        other.path().to_str().unwrap(),
        "--workers",
        "0",
    ]);
    let config = std::fs::read_to_string(cluster.client()).unwrap();
    let foreign = other.path().join("foreign-client.toml");
    std::fs::write(&foreign, config).unwrap();
    let out = cluster.run(&["cluster", "status", "--cluster", foreign.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no coordinator answered"), "{err}");

    // A worker started with a client's certificate.
    let cfg = cluster.path().join("worker-1.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let bad = cluster.path().join("bad-worker.toml");
    std::fs::write(
        &bad,
        text.replace("worker-1.pem", "client.pem")
            .replace("worker-1-key.pem", "client-key.pem"),
    )
    .unwrap();
    let out = cluster.run(&["worker", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a client certificate"), "{err}");
}

#[test]
fn a_damaged_blob_is_never_accepted_and_the_build_still_succeeds() {
    let cluster = Cluster::start(2, 5);
    let ctx =
        dockerfile_context("FROM busybox:latest\nRUN echo intact > /f\nCMD [\"cat\", \"/f\"]\n");
    let first = Strata::new();
    cluster.build(&first, ctx.path(), &["-t", "x:1"]);
    // Damage every large blob on every worker (the busybox layer among
    // them): a client fetching them must refuse those bytes and take them
    // from the one good holder left, the coordinator.
    let mut damaged = 0;
    for w in cluster.worker_names() {
        let blobs = cluster.worker_home(&w).join("content/blobs");
        for dir in std::fs::read_dir(&blobs).unwrap().flatten() {
            for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
                if f.metadata().unwrap().len() > 1_000_000 {
                    let mut bytes = std::fs::read(f.path()).unwrap();
                    bytes[1000] ^= 0xff;
                    std::fs::write(f.path(), bytes).unwrap();
                    damaged += 1;
                }
            }
        }
    }
    assert!(damaged > 0);
    let second = Strata::new();
    let client = cluster.client();
    let out = second.run(&[
        "build",
        "--cluster",
        client.to_str().unwrap(),
        "--progress",
        "plain",
        "-o",
        "type=image",
        "-t",
        "x:1",
        ctx.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The client names the holder whose bytes it refused, on the
    // terminal (its daemon did the fetching, and logged it too), then
    // takes the blob from the next one.
    let log = std::fs::read_to_string(second.home().join("daemon.log")).unwrap();
    assert!(
        log.contains("refused") && log.contains("trying the next"),
        "no damaged blob was refused: {stderr}\n{log}"
    );
    assert!(
        stderr.lines().any(|l| l
            .starts_with("warning: fetching from this holder failed; trying the next")
            && l.contains("holder=worker-")
            && l.contains("refused")),
        "the refusal did not reach the client's terminal:\n{stderr}\n{log}"
    );
    assert_eq!(second.ok(&["run", "--rm", "x:1"]), "intact\n");
    for w in cluster.worker_names() {
        let log = std::fs::read_to_string(cluster.path().join(format!("logs/{w}.log")))
            .unwrap_or_default();
        assert!(!log.contains("panicked"), "{w}: {log}");
    }
}

#[test]
fn concurrent_builds_run_a_shared_builder_once() {
    let cluster = Cluster::start(2, 5);
    let builder = "FROM busybox:latest AS builder\nRUN sleep 1 && echo shared > /artifact\n";
    let mut children = Vec::new();
    let mut dirs = Vec::new();
    // More builds than the two workers have slots: builds waiting for the
    // shared steps must not hold the slots those steps need.
    for i in 0..10 {
        let ctx = tempfile::tempdir().unwrap();
        write_files(
            ctx.path(),
            &[(
                "Dockerfile",
                &format!(
                    "{builder}FROM busybox:latest\nCOPY --from=builder /artifact /a\nRUN echo {i} >> /a\n"
                ),
            )],
        );
        let client = Strata::new();
        let report = client.home().join("report.json");
        let child = cluster.spawn_build(&client, ctx.path(), &[]);
        children.push((child, report, client));
        dirs.push(ctx);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while children
        .iter_mut()
        .any(|(c, _, _)| c.try_wait().unwrap().is_none())
    {
        if Instant::now() > deadline {
            for (c, _, _) in &mut children {
                let _ = c.kill();
            }
            panic!(
                "concurrent builds still running after 120 s:\n{}",
                cluster.status()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut builder_runs = 0;
    for (child, report, _client) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        builder_runs += r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["stage"] == "builder" && s["cached"] == false)
            .count();
    }
    assert_eq!(
        builder_runs, 1,
        "the shared builder ran {builder_runs} times"
    );
}

#[test]
fn a_one_file_edit_uploads_that_file_and_the_directories_above_it() {
    let cluster = Cluster::start(1, 5);
    // 3,000 files in 30 folders, and one file of 2 MB.
    let ctx = tempfile::tempdir().unwrap();
    for d in 0..30 {
        let dir = ctx.path().join(format!("pkg{d:02}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f:03}.js")), format!("module {d} {f}\n")).unwrap();
        }
    }
    std::fs::write(ctx.path().join("big.bin"), vec![7u8; 2 << 20]).unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nCOPY . /app\nRUN find /app -type f | wc -l > /count\n",
        )],
    );
    // Older than the stat cache's racy window: the next build trusts it.
    std::thread::sleep(Duration::from_millis(2100));
    let client = Strata::new();
    let (report, progress) = cluster.build_showing(&cluster.client(), &client, ctx.path(), &[]);
    let ContextLine { entries, blobs, .. } = context_line(&progress);
    // 3,000 + the big file + the Dockerfile, 30 folders; the same bytes
    // in two files are one blob, and every folder is a blob.
    assert_eq!(entries, 3_032, "{progress}");
    assert_eq!(blobs, 3_002 + 31, "{progress}");
    assert_eq!(runs(&report), 1, "{report}");
    // The context's small files are kept inline in the stores that took
    // them, not as 3,000 files each: what is a file is big.bin and layers.
    for node in [cluster.coordinator_names()[0].clone(), "worker-1".into()] {
        let files = cluster.blob_files(&node);
        assert!((1..10).contains(&files), "{node} holds {files} blob files");
    }

    // Nothing changed: nothing is read, nothing is sent.
    let (report, progress) = cluster.build_showing(&cluster.client(), &client, ctx.path(), &[]);
    let ContextLine {
        read, sent, blobs, ..
    } = context_line(&progress);
    assert_eq!(
        (read.as_str(), sent.as_str(), blobs),
        ("0B", "0B", 0),
        "{progress}"
    );
    assert_eq!(runs(&report), 0, "{report}");

    // One file edited (and one removed beside it): it and the two
    // folders above it are sent.
    std::fs::write(ctx.path().join("pkg07/f042.js"), "edited\n").unwrap();
    std::fs::remove_file(ctx.path().join("pkg07/f001.js")).unwrap();
    let (report, progress) =
        cluster.build_showing(&cluster.client(), &client, ctx.path(), &["-t", "edit:1"]);
    let ContextLine { read, blobs, .. } = context_line(&progress);
    assert_eq!((read.as_str(), blobs), ("7B", 3), "{progress}");
    assert_eq!(runs(&report), 1, "{report}");
    // The worker patched the context it wrote out for the first build:
    // the image has the edit.
    assert!(
        cluster
            .log("worker-1")
            .contains("patched a written-out context"),
        "{}",
        cluster.log("worker-1")
    );
    assert_eq!(
        client.ok(&[
            "run",
            "--rm",
            "edit:1",
            "sh",
            "-c",
            "cat /app/pkg07/f042.js; test -e /app/pkg07/f001.js || echo removed",
        ]),
        "edited\nremoved\n"
    );

    // Another client, its state empty: it reads the context, sends
    // nothing, and every step is cached.
    let (report, progress) =
        cluster.build_showing(&cluster.client(), &Strata::new(), ctx.path(), &[]);
    let ContextLine { sent, blobs, .. } = context_line(&progress);
    assert_eq!((sent.as_str(), blobs), ("0B", 0), "{progress}");
    assert_eq!(runs(&report), 0, "{report}");

    // The worker's 3,000 context files are not the index's business: it
    // locates layers only (after the heartbeats that follow the builds).
    std::thread::sleep(Duration::from_secs(3));
    let status = cluster.status();
    let located: usize = status
        .split(" blobs located")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no blobs located in:\n{status}"));
    assert!(located < 100, "{located} blobs located:\n{status}");
}

/// A cluster of one worker whose coordinator keeps `more` bytes beyond
/// what its store holds at start (the busybox it was given), restarted
/// with that `keep_storage`; its name, and the bound.
fn coordinator_keeping(more: u64) -> (Cluster, String, u64) {
    let cluster = Cluster::start(1, 5);
    let coordinator = cluster.coordinator_names()[0].clone();
    let keep = cluster.blob_bytes(&coordinator) + more;
    cluster.kill(&coordinator);
    let config = cluster.path().join(format!("{coordinator}.toml"));
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("keep_storage = {keep}\n{text}")).unwrap();
    cluster.up();
    (cluster, coordinator, keep)
}

#[test]
fn a_coordinator_keeps_uploaded_contexts_within_keep_storage_and_a_client_uploads_again() {
    // Its store holds busybox, named, which stays; contexts get 5 MB.
    let (cluster, coordinator, keep) = coordinator_keeping(5 << 20);
    // Six contexts of 3 MB each that does not compress: 18 MB of uploads.
    let contexts: Vec<tempfile::TempDir> = (0..6)
        .map(|i| {
            let ctx = tempfile::tempdir().unwrap();
            let noise: Vec<u8> = (0..3_000_000u32)
                .map(|n| (n.wrapping_mul(2_654_435_761).wrapping_add(i) >> 13) as u8)
                .collect();
            std::fs::write(ctx.path().join("noise"), noise).unwrap();
            write_files(
                ctx.path(),
                &[(
                    "Dockerfile",
                    &format!("FROM busybox:latest\nCOPY noise /noise\nRUN echo {i} > /i\n"),
                )],
            );
            ctx
        })
        .collect();
    for ctx in &contexts {
        let report = cluster.build(&Strata::new(), ctx.path(), &[]);
        assert_eq!(runs(&report), 1, "{report}");
    }
    let start = Instant::now();
    loop {
        let held = cluster.blob_bytes(&coordinator);
        if held <= keep {
            eprintln!(
                "{coordinator} holds {held} bytes of blobs (keep_storage {keep}) {:?} after the last build",
                start.elapsed()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{coordinator} still holds {held} bytes, over keep_storage {keep}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The first context went: its client uploads it again, and the build
    // finds every step in the cache.
    let again = cluster.build(&Strata::new(), contexts[0].path(), &[]);
    assert_eq!(runs(&again), 0, "{again}");
}

#[test]
fn a_coordinator_keeps_base_images_it_pulled_within_keep_storage_and_pulls_again() {
    // Its store holds busybox, imported by the operator, which stays;
    // 1 MB more is allowed.
    let (cluster, coordinator, keep) = coordinator_keeping(1 << 20);

    // A base in a registry: busybox and 3 MB that does not compress.
    let reg = strata_integration::registry::Registry::start(false);
    let local = Strata::new().with_busybox(&[]);
    let base_ctx =
        dockerfile_context("FROM busybox:latest\nRUN head -c 3000000 /dev/urandom > /noise\n");
    local.build(base_ctx.path(), &["-t", "noisy:1"]);
    let base = format!("{}/team/noisy:1", reg.host());
    local.ok(&["push", "noisy:1", &base]);

    // The coordinator pulls it to plan the build, and drops it once the
    // build is over: its store is back within keep_storage.
    let ctx = dockerfile_context(&format!("FROM {base}\nRUN wc -c < /noise > /size\n"));
    let report = cluster.build(&Strata::new(), ctx.path(), &[]);
    assert_eq!(runs(&report), 1, "{report}");
    let start = Instant::now();
    loop {
        let held = cluster.blob_bytes(&coordinator);
        if held <= keep
            && cluster
                .log(&coordinator)
                .contains("dropped a base image pulled for planning")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{coordinator} still holds {held} bytes, over keep_storage {keep}:\n{}",
            cluster.log(&coordinator)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The busybox it was given stays: a build from it needs no registry.
    let plain = dockerfile_context("FROM busybox:latest\nRUN echo still here\n");
    assert_eq!(runs(&cluster.build(&Strata::new(), plain.path(), &[])), 1);
    // The next build of the first pulls the base again; its step is cached.
    let again = cluster.build(&Strata::new(), ctx.path(), &[]);
    assert_eq!(runs(&again), 0, "{again}");
}

#[test]
fn nodes_serve_metrics_and_health_and_the_cluster_keeps_each_builds_history_by_its_id() {
    use strata_integration::http::get;
    let cluster = Cluster::start(2, 5);
    let ctx = dockerfile_context(
        "FROM busybox:latest AS dep\nRUN echo dep > /dep\nFROM busybox:latest\nCOPY --from=dep /dep /dep\nRUN cat /dep > /out\n",
    );
    let client = Strata::new();
    let report = cluster.build(&client, ctx.path(), &["-t", "observed:1"]);
    let id = report["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 20, "{report}");

    // The coordinator: ready, leading its group of one, the build counted
    // with its steps and cache lookups.
    let coordinator = cluster.metrics_addr("coordinator");
    assert_eq!(get(coordinator, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(coordinator, "/readyz"), (200, "ready\n".into()));
    let (status, metrics) = get(coordinator, "/metrics");
    assert_eq!(status, 200);
    for line in [
        "strata_builds_started_total 1",
        "strata_builds_finished_total{outcome=\"succeeded\"} 1",
        "strata_raft_is_leader 1",
        "strata_cache_lookups_total{result=\"miss\"} 3",
        "strata_step_duration_seconds_count{instruction=\"RUN\",result=\"executed\"} 2",
        "strata_step_duration_seconds_count{instruction=\"COPY\",result=\"executed\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    // Workers: their slots, the steps they ran, the bytes they moved.
    let mut moved = 0.0;
    for w in cluster.worker_names() {
        let addr = cluster.metrics_addr(&w);
        assert_eq!(get(addr, "/readyz").0, 200, "{w}");
        let (_, metrics) = get(addr, "/metrics");
        assert!(metrics.contains("strata_slots 2\n"), "{w}:\n{metrics}");
        assert!(metrics.contains("strata_slots_busy 0\n"), "{w}:\n{metrics}");
        for kind in ["blobs", "snapshots", "cache_mounts"] {
            let line = format!("strata_store_bytes{{kind=\"{kind}\"}} ");
            assert!(metrics.contains(&line), "{w}: no {line}\n{metrics}");
        }
        moved += metrics
            .lines()
            .filter(|l| l.starts_with("strata_transfer_bytes_total{kind=\"peer_"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    assert!(moved > 0.0, "replication moved no bytes between workers");

    // The history: on the cluster, under the id the client printed.
    let listed = cluster.ok(&["history", "--cluster", cluster.client().to_str().unwrap()]);
    let row = listed
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| {
            panic!("build {id} not listed:\n{listed}");
        });
    assert!(
        row.contains("observed:1") && row.contains("succeeded"),
        "{row}"
    );
    let inspected = cluster.ok(&[
        "history",
        "inspect",
        &id[..8],
        "--cluster",
        cluster.client().to_str().unwrap(),
        "--format",
        "json",
    ]);
    let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(inspected["id"], id.as_str());
    assert_eq!(inspected["status"], "succeeded");
    assert_eq!(inspected["steps"].as_array().unwrap().len(), 3);
    // The trace: a span per step, on the workers' slots.
    let trace = client.home().join("trace.json");
    cluster.ok(&[
        "history",
        "trace",
        &id,
        "-o",
        trace.to_str().unwrap(),
        "--cluster",
        cluster.client().to_str().unwrap(),
    ]);
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let spans: Vec<&serde_json::Value> = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] == "X" && (e["cat"] == "executed" || e["cat"] == "cached"))
        .collect();
    assert_eq!(spans.len(), 3, "{trace}");
    // Each step that ran waited for its worker first, shown as a span.
    let waits = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "wait")
        .count();
    assert_eq!(waits, 3, "{trace}");
    assert!(spans.iter().all(|s| s["args"]["cache_key"].is_string()));
    // The client's own history has it too.
    assert!(client.ok(&["history"]).contains(&id));
    // Every node that took part logged it by its id.
    assert!(
        cluster.log("coordinator").contains(&id),
        "{}",
        cluster.log("coordinator")
    );
    // Logs written to a file carry no colour codes.
    assert!(!cluster.log("coordinator").contains('\x1b'));
    let workers_logged = cluster
        .worker_names()
        .iter()
        .filter(|w| cluster.log(w).contains(&id))
        .count();
    assert!(workers_logged >= 1);
}

#[test]
fn the_dashboard_shows_workers_and_a_running_build_with_its_steps_in_a_browser() {
    use strata_integration::http::get;
    let cluster = Cluster::start(2, 5);
    let ctx = dockerfile_context(
        "FROM busybox:latest\nRUN echo warm > /warm\nRUN sleep 12 && echo slow > /slow\n",
    );
    let client = Strata::new();
    let build = cluster.spawn_build(&client, ctx.path(), &["-t", "watched:1"]);
    let coordinator = cluster.metrics_addr("coordinator");
    // Wait until the coordinator has the build running its slow step.
    let start = Instant::now();
    let id = loop {
        let (status, body) = get(coordinator, "/api/dashboard");
        assert_eq!(status, 200, "{body}");
        let view: serde_json::Value = serde_json::from_str(&body).unwrap();
        let running = view["running"].as_array().cloned().unwrap_or_default();
        let slow = running.iter().find(|b| {
            b["steps"].as_array().into_iter().flatten().any(|s| {
                s["label"].as_str().unwrap_or("").starts_with("RUN sleep")
                    && s["state"] == "running"
            })
        });
        if let Some(b) = slow {
            break b["id"].as_str().unwrap().to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no running build: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-cluster.png");
    let dom = strata_integration::browser::render(&format!("http://{coordinator}/"), &shot);
    eprintln!("dashboard screenshot: {}", shot.display());
    assert!(dom.contains(&format!("data-build=\"{id}\"")), "{dom}");
    assert!(dom.contains("RUN sleep 12"), "{dom}");
    assert!(dom.contains("watched:1"), "{dom}");
    for w in cluster.worker_names() {
        assert!(
            dom.contains(&format!("<td>{w}</td>")),
            "{w} not shown:\n{dom}"
        );
    }
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);

    // Once done, it is among the recent builds.
    let out = build.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, body) = get(coordinator, "/api/dashboard");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(view["running"].as_array().unwrap().is_empty(), "{body}");
    assert_eq!(view["recent"][0]["id"], id.as_str(), "{body}");
    assert_eq!(view["recent"][0]["status"], "succeeded", "{body}");
}

#[test]
fn each_platform_s_steps_go_to_a_worker_that_runs_it_or_the_build_is_refused() {
    use strata_integration::emulator::{Arm64Emulator, QEMU_AARCH64};
    if !std::path::Path::new(QEMU_AARCH64).exists() {
        eprintln!("no arm64 emulator on this machine ({QEMU_AARCH64}): nothing to place");
        return;
    }
    // Workers learn what they run when they start.
    let _emulator = Arm64Emulator::register();
    let cluster = Cluster::start(2, 2);
    // worker-2 takes no emulated steps.
    let restart_without_emulation = |name: &str| {
        cluster.kill(name);
        let config = cluster.path().join(format!("{name}.toml"));
        // A top-level key: before the file's tables.
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("emulation = false\n{text}")).unwrap();
        cluster.up();
    };
    restart_without_emulation("worker-2");
    let status = cluster.wait_for(Duration::from_secs(30), |s| {
        s.lines()
            .any(|l| l.starts_with("worker-1 ") && l.contains(" up ") && l.contains("linux/arm64"))
            && s.lines()
                .any(|l| l.starts_with("worker-2 ") && l.contains(" up ") && !l.contains("arm64"))
    });
    assert!(status.contains("PLATFORMS"), "{status}");

    // An arm64 base from a registry, as a cluster takes bases.
    let reg = strata_integration::registry::Registry::start(false);
    let local = Strata::new();
    let arm = strata_integration::base_image_tar("busybox-arm64");
    local.ok(&[
        "image",
        "import",
        "--platform",
        "linux/arm64",
        "busybox-arm:1",
        arm.to_str().unwrap(),
    ]);
    let base = format!("{}/arm/busybox:1", reg.host());
    local.ok(&["push", "busybox-arm:1", &base]);

    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            &format!(
                "FROM {base} AS a\nRUN uname -m > /a\nFROM {base} AS b\nRUN uname -m > /b\nFROM {base}\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n"
            ),
        )],
    );
    let client = Strata::new();
    let out = tempfile::tempdir().unwrap();
    let files = out.path().join("files");
    let report = cluster.build(
        &client,
        ctx.path(),
        &["--platform", "linux/arm64", "-o", files.to_str().unwrap()],
    );
    let placed = workers_of(&report);
    for step in ["a 2", "b 2"] {
        assert_eq!(placed[step], "worker-1", "{step} ran on {placed:?}");
    }
    assert_eq!(
        std::fs::read_to_string(files.join("a")).unwrap(),
        "aarch64\n"
    );
    assert_eq!(
        std::fs::read_to_string(files.join("b")).unwrap(),
        "aarch64\n"
    );

    // Several platforms at once: each platform's steps placed by what the
    // workers run, the images one index, on a base that has both.
    let multi_ctx = tempfile::tempdir().unwrap();
    std::fs::copy(
        strata_integration::busybox_tar(),
        multi_ctx.path().join("busybox-amd64.tar"),
    )
    .unwrap();
    std::fs::copy(&arm, multi_ctx.path().join("busybox-arm64.tar")).unwrap();
    write_files(
        multi_ctx.path(),
        &[(
            "Dockerfile",
            "FROM scratch\nARG TARGETARCH\nADD busybox-${TARGETARCH}.tar /\n",
        )],
    );
    let multi_base = format!("{}/multi/busybox:1", reg.host());
    local.ok(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        &multi_base,
        "--push",
        multi_ctx.path().to_str().unwrap(),
    ]);
    let app = tempfile::tempdir().unwrap();
    write_files(
        app.path(),
        &[(
            "Dockerfile",
            &format!("FROM {multi_base}\nRUN uname -m > /m\n"),
        )],
    );
    let both = out.path().join("both");
    let layout = out.path().join("both.tar");
    client.ok(&[
        "build",
        "--cluster",
        cluster.client().to_str().unwrap(),
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        &format!("type=local,dest={}", both.display()),
        "-o",
        &format!("type=oci,dest={}", layout.display()),
        app.path().to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(both.join("linux_amd64/m")).unwrap(),
        "x86_64\n"
    );
    assert_eq!(
        std::fs::read_to_string(both.join("linux_arm64/m")).unwrap(),
        "aarch64\n"
    );
    let index = std::process::Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}", layout.display()))
        .output()
        .unwrap();
    let index: serde_json::Value = serde_json::from_slice(&index.stdout).unwrap();
    assert_eq!(
        index["manifests"].as_array().map(Vec::len),
        Some(2),
        "{index}"
    );

    // With no worker to run arm64, the build is refused by name, not left
    // waiting.
    restart_without_emulation("worker-1");
    cluster.wait_for(Duration::from_secs(30), |s| {
        s.lines()
            .any(|l| l.starts_with("worker-1 ") && l.contains(" up ") && !l.contains("arm64"))
    });
    let refused = client.run(&[
        "build",
        "--cluster",
        cluster.client().to_str().unwrap(),
        "--platform",
        "linux/arm64",
        "--no-cache",
        ctx.path().to_str().unwrap(),
    ]);
    fails_with(
        &refused,
        &["runs steps for linux/arm64, which the cluster's live workers cannot run"],
    );
}

#[test]
fn an_admin_imports_a_cache_exported_elsewhere_and_every_client_s_build_hits_it() {
    let cluster = Cluster::start(2, 5);
    let reg = strata_integration::registry::Registry::start(false);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            (
                "Dockerfile",
                "FROM busybox:latest\nRUN echo one > /one\nRUN head -c 3000000 /dev/urandom > /blob\nCOPY f /f\n",
            ),
            ("f", "f\n"),
        ],
    );
    let ctx_arg = ctx.path().to_str().unwrap();

    // A CI runner outside the cluster exports its cache.
    let elsewhere = Strata::new().with_busybox(&[]);
    let cache = format!("{}/ci/app:cache", reg.host());
    let exported = elsewhere.build(
        ctx.path(),
        &["--cache-to", &format!("type=registry,ref={cache},mode=max")],
    );

    // A client may not put a cache into what every team shares.
    let client = Strata::new();
    let client_config = cluster.client();
    let client_config = client_config.to_str().unwrap();
    let out = client.run(&[
        "build",
        "--cluster",
        client_config,
        "--cache-from",
        &cache,
        ctx_arg,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("strata cluster import-cache --cluster DIR/admin.toml"),
        "{err}"
    );
    let out = client.run(&[
        "cluster",
        "import-cache",
        "--cluster",
        client_config,
        &cache,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("that needs an admin certificate"), "{err}");

    // The admin imports it; every client's first build takes each step
    // from it, and gets the exporter's image.
    let admin = Strata::new();
    let admin_config = cluster.admin();
    let import = [
        "cluster",
        "import-cache",
        "--cluster",
        admin_config.to_str().unwrap(),
        cache.as_str(),
    ];
    let out = admin.run(&import);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("into the cluster: 3 steps, 3 new"), "{err}");
    let report = cluster.build(&client, ctx.path(), &[]);
    assert_eq!(strata_integration::cached(&report), (3, 3));
    assert_eq!(report["image"]["id"], exported["image"]["id"]);
    // The layers (the base's and the three steps') are on workers, as
    // many copies as the cluster keeps of a built layer: here, both (a
    // worker the build began on also holds its context).
    let status = cluster.status();
    let blobs: Vec<u64> = status
        .lines()
        .filter(|l| l.starts_with("worker-"))
        .filter_map(|l| l.split_whitespace().nth(5)?.parse().ok())
        .collect();
    assert_eq!(blobs.len(), 2, "{status}");
    assert!(blobs.iter().all(|&b| b >= 4), "{status}");

    // Where the bytes are, node by node: the base image on the
    // coordinator, the 3 MB layer and its neighbours on each worker.
    let du: serde_json::Value = serde_json::from_str(&cluster.ok(&[
        "cluster",
        "du",
        "--cluster",
        client_config,
        "--format",
        "json",
    ]))
    .unwrap();
    let nodes = du.as_array().unwrap();
    let names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["coordinator", "worker-1", "worker-2"], "{du}");
    assert!(
        nodes[0]["usage"]["images"][0].as_u64().unwrap() >= 1,
        "{du}"
    );
    for w in &nodes[1..] {
        assert!(w["usage"]["total"].as_u64().unwrap() > 3_000_000, "{du}");
        // The four layers.
        assert!(w["usage"]["other"][0].as_u64().unwrap() >= 4, "{du}");
    }
    // The context's file and folder, counted apart: on the coordinator
    // the client uploaded them to, and on the worker the build ran on.
    let contexts = |n: &serde_json::Value| n["usage"]["contexts"][0].as_u64().unwrap();
    assert!(contexts(&nodes[0]) >= 2, "{du}");
    assert!(nodes[1..].iter().any(|w| contexts(w) >= 2), "{du}");
    let table = cluster.ok(&["cluster", "du", "--cluster", client_config]);
    assert!(table.starts_with("NODE"), "{table}");
    assert!(
        table.lines().next().unwrap().contains("CONTEXTS"),
        "{table}"
    );
    assert!(table.lines().any(|l| l.starts_with("worker-2 ")), "{table}");

    // Again: nothing new.
    let out = admin.run(&import);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 steps, 0 new"), "{err}");
}

#[test]
fn a_cluster_build_stays_in_the_cluster_and_skopeo_and_docker_pull_it_from_a_coordinator() {
    let cluster = Cluster::start(2, 5);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            (
                "Dockerfile",
                "FROM busybox:latest\nCOPY f /f\nRUN cat /f /f > /g\n",
            ),
            ("f", "served\n"),
        ],
    );
    let client = cluster.client();
    // The image stays in the cluster: nothing comes down to the client,
    // whose store does not name it.
    let first = Strata::new();
    let (report, progress) =
        cluster.build_leaving(&client, &first, ctx.path(), &["-t", "served:1"]);
    assert_eq!(report["bytes_fetched"], 0, "{report}");
    assert!(
        progress.contains("served:1 in the cluster, not downloaded"),
        "{progress}"
    );
    assert!(!first.ok(&["images"]).contains("served"));
    let id = report["image"]["id"].as_str().unwrap().to_string();
    // Another client, with nothing of its own, gets it whole from the
    // cache and downloads nothing either.
    let (again, _) =
        cluster.build_leaving(&client, &Strata::new(), ctx.path(), &["-t", "served:1"]);
    assert_eq!(runs(&again), 0, "{again}");
    assert_eq!(again["bytes_fetched"], 0, "{again}");
    assert_eq!(again["image"]["id"], id.as_str());

    // skopeo copies it from a coordinator's endpoint: the config it gets
    // is the image the build reported.
    let endpoint = cluster.registry_addr("coordinator");
    let layout = tempfile::tempdir().unwrap();
    cluster.copy_with_skopeo("coordinator", "served:1", layout.path(), "served");
    let inspected = strata_integration::succeed(
        std::process::Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:served", layout.path().display())),
    );
    let manifest: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(
        manifest["config"]["digest"], id,
        "the config skopeo copied is not the built image's"
    );
    // A name the cluster does not know is the registry's 404.
    let unknown = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{endpoint}/served:2"))
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("manifest unknown"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    // The endpoint takes no pushes.
    let pushed = std::process::Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:served", layout.path().display()))
        .arg(format!("docker://{endpoint}/pushed:1"))
        .output()
        .unwrap();
    assert!(!pushed.status.success());

    // Docker pulls it too (127.0.0.0/8 is a registry it takes over plain
    // HTTP) and runs it: the same image ID, the step's files.
    let docker = strata_integration::docker::Docker::shared();
    let name = format!("{endpoint}/served:1");
    docker.ok(&["pull", &name]);
    assert_eq!(
        docker
            .ok(&["image", "inspect", "--format", "{{.Id}}", &name])
            .trim(),
        id
    );
    assert_eq!(
        docker.ok(&["run", "--rm", &name, "cat", "/g"]),
        "served\nserved\n"
    );
    docker.ok(&["rmi", &name]);

    // `cluster images` lists it; `cluster rmi` drops the name, and the
    // endpoint no longer serves it.
    let client = client.to_str().unwrap();
    let listed: serde_json::Value = serde_json::from_str(&cluster.ok(&[
        "cluster",
        "images",
        "--cluster",
        client,
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(listed[0]["name"], "served:1", "{listed}");
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert_eq!(listed[0]["digest"], manifest_digest(&endpoint, "served:1"));
    assert_eq!(
        cluster.ok(&["cluster", "rmi", "served:1", "--cluster", client]),
        "Untagged: served:1\n"
    );
    let gone = cluster.run(&["cluster", "rmi", "served:1", "--cluster", client]);
    fails_with(&gone, &["the cluster names no image served:1"]);
    let after = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{endpoint}/served:1"))
        .output()
        .unwrap();
    assert!(!after.status.success());
}

/// The digest of the manifest `reference` names at the image endpoint
/// `endpoint`, as skopeo reads it.
fn manifest_digest(endpoint: &std::net::SocketAddr, reference: &str) -> String {
    strata_integration::succeed(
        std::process::Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
            .arg(format!("docker://{endpoint}/{reference}")),
    )
    .trim()
    .to_string()
}

#[test]
fn a_cluster_build_is_pushed_by_a_worker_with_the_client_s_credentials_for_that_push_only() {
    use strata_integration::registry::{PASSWORD, Registry, USER, docker_login};
    let registry = Registry::start(true);
    let cluster = Cluster::start(2, 5);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN echo pushed > /p\n")],
    );
    let name = format!("{}/team/pushed:1", registry.host());
    let push = |client: &Strata, docker_config: &std::path::Path| {
        let report = client.home().join("report.json");
        let out = client
            .cmd()
            .env("DOCKER_CONFIG", docker_config)
            .args(["build", "--cluster"])
            .arg(cluster.client())
            .args(["--progress", "plain", "--push", "-t", &name, "--report"])
            .arg(&report)
            .arg(ctx.path())
            .output()
            .unwrap();
        (out, report)
    };

    // Without credentials the registry refuses the worker, and the client
    // is told so.
    let anonymous = tempfile::tempdir().unwrap();
    let (out, _) = push(&Strata::new(), anonymous.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("cannot push {name} from the cluster")),
        "{err}"
    );

    // With the client's login, a worker pushes it: the client downloads
    // no layer, and the registry has the image the build reported.
    let login = tempfile::tempdir().unwrap();
    docker_login(login.path(), &registry.host(), USER, PASSWORD);
    let client = Strata::new();
    let (out, report) = push(&client, login.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{name}: digest: sha256:")),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["bytes_fetched"], 0, "{report}");
    assert!(!client.ok(&["images"]).contains("pushed"));
    let inspected = strata_integration::succeed(
        std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false", "--creds"])
            .arg(format!("{USER}:{PASSWORD}"))
            .arg(format!("docker://{name}")),
    );
    let manifest: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(manifest["config"]["digest"], report["image"]["id"]);
    // A worker pushed it, and no node wrote the password anywhere.
    let pushed_by: Vec<String> = cluster
        .worker_names()
        .into_iter()
        .filter(|w| cluster.log(w).contains("pushed for a client"))
        .collect();
    assert_eq!(pushed_by.len(), 1, "{pushed_by:?}");
    let leaked = std::process::Command::new("grep")
        .args(["-rl", PASSWORD])
        .arg(cluster.path())
        .output()
        .unwrap();
    assert!(
        leaked.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&leaked.stdout)
    );
}

#[test]
fn a_coordinator_serves_images_over_https_to_a_client_with_a_cluster_certificate_only() {
    let cluster = Cluster::start_with(1, 1, &[("registry.tls", "true".into())]);
    assert!(
        cluster.log("coordinator").contains("images on https://"),
        "{}",
        cluster.log("coordinator")
    );
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN echo tls > /t\n")],
    );
    let (report, _) = cluster.build_leaving(
        &cluster.client(),
        &Strata::new(),
        ctx.path(),
        &["-t", "secure:1"],
    );
    let id = report["image"]["id"].as_str().unwrap().to_string();
    let from = format!("docker://{}/secure:1", cluster.registry_addr("coordinator"));
    // What containers' certs.d holds for a registry: its CA, and a client
    // certificate and key (the client's, from `cluster init`).
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(cluster.path().join("ca.pem"), certs.path().join("ca.crt")).unwrap();
    let skopeo = |certs: &std::path::Path| {
        std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--cert-dir"])
            .arg(certs)
            .arg(&from)
            .output()
            .unwrap()
    };
    // The server's certificate checks out against the cluster CA for
    // 127.0.0.1, but with no client certificate the handshake fails.
    let refused = skopeo(certs.path());
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("certificate required"), "{said}");
    std::fs::copy(
        cluster.path().join("client.pem"),
        certs.path().join("client.cert"),
    )
    .unwrap();
    std::fs::copy(
        cluster.path().join("client-key.pem"),
        certs.path().join("client.key"),
    )
    .unwrap();
    let served = skopeo(certs.path());
    assert!(
        served.status.success(),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
    let manifest: serde_json::Value = serde_json::from_slice(&served.stdout).unwrap();
    assert_eq!(manifest["config"]["digest"], id.as_str());
}
