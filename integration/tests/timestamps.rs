//! Times in images, as a user sees them: COPY keeps source times and an
//! image is dated by its build (as `docker build`), `SOURCE_DATE_EPOCH`
//! makes images reproducible, and no time ever enters a cache key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use strata_integration::cluster::{Cluster, runs};
use strata_integration::docker::Docker;
use strata_integration::image_model::read_docker_archive;
use strata_integration::{Strata, busybox_tar, cached, copy_tree, succeed, write_files};

/// Times the context files are given: long before any build.
const A_TIME: u64 = 1_500_000_000;
const B_TIME: u64 = 1_500_000_100;

const DOCKERFILE: &str = "\
FROM busybox:latest AS builder
RUN mkdir /out && echo built > /out/artifact
FROM busybox:latest
COPY app /app
COPY app/a.txt /single
COPY --from=builder /out/artifact /from-stage
COPY --from=busybox:latest /bin/busybox /from-image
RUN echo made > /made
";

/// What the tests read back: the files COPY took from the context and
/// from an image, whose times are their sources'.
const KEPT: [&str; 4] = ["/app/a.txt", "/app/sub/b.txt", "/single", "/from-image"];
/// Files the build itself wrote, dated when it wrote them.
const MADE: [&str; 2] = ["/from-stage", "/made"];

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn touch(path: &Path, secs: u64) {
    let ok = Command::new("touch")
        .arg("-h")
        .arg("-d")
        .arg(format!("@{secs}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(ok.success());
}

/// A checkout of the test context whose files have the given times.
fn checkout(dir: &Path, a: u64, b: u64) {
    write_files(
        dir,
        &[
            ("Dockerfile", DOCKERFILE),
            ("app/a.txt", "one\n"),
            ("app/sub/b.txt", "two\n"),
        ],
    );
    touch(&dir.join("app/a.txt"), a);
    touch(&dir.join("app/sub/b.txt"), b);
}

/// Every file of a tree given `secs` as its time (a fresh clone).
fn touch_all(dir: &Path, secs: u64) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            touch_all(&p, secs);
        }
        touch(&p, secs);
    }
}

/// `stat` of `paths` in the image: `path seconds` lines.
fn times(run: impl Fn(&[&str]) -> String, image: &str, paths: &[&str]) -> Vec<(String, u64)> {
    let mut args = vec!["run", "--rm", image, "stat", "-c", "%n %Y"];
    args.extend_from_slice(paths);
    run(&args)
        .lines()
        .map(|l| {
            let (p, t) = l.rsplit_once(' ').unwrap();
            (p.to_string(), t.parse().unwrap())
        })
        .collect()
}

fn unix(rfc3339: &str) -> u64 {
    let out = Command::new("date")
        .args(["-u", "-d", rfc3339, "+%s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "not a date: {rfc3339}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The config of a strata image, through `strata save`.
fn config(s: &Strata, image: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    s.ok(&["save", "-o", archive.to_str().unwrap(), image]);
    read_docker_archive(&archive).unwrap().config
}

/// The dates of the history entries this Dockerfile's own instructions
/// made (after `base` entries).
fn own_history_dates(config: &Value, base: usize) -> Vec<u64> {
    config["history"].as_array().unwrap()[base..]
        .iter()
        .map(|h| unix(h["created"].as_str().unwrap()))
        .collect()
}

#[test]
fn copied_files_keep_their_times_and_the_image_is_dated_by_its_build_as_with_docker_build() {
    let ctx = tempfile::tempdir().unwrap();
    checkout(ctx.path(), A_TIME, B_TIME);

    let docker = Docker::shared();
    docker.load_busybox(&["busybox:latest"]);
    let (start, tag) = (now(), "strata-timestamps/copy:1");
    let ctx_arg = ctx.path().to_str().unwrap();
    docker.ok(&["build", "-q", "--no-cache", "-t", tag, ctx_arg]);
    let end = now();
    let docker_kept = times(|a| docker.ok(a), tag, &KEPT);
    let docker_made = times(|a| docker.ok(a), tag, &MADE);
    let docker_created = docker.ok(&["image", "inspect", "--format", "{{.Created}}", tag]);
    docker.ok(&["rmi", tag]);
    assert_eq!(
        docker_kept.iter().map(|(_, t)| *t).collect::<Vec<_>>()[..2],
        [A_TIME, B_TIME]
    );
    assert!(docker_made.iter().all(|(_, t)| (start..=end).contains(t)));
    assert!((start..=end).contains(&unix(docker_created.trim())));

    let s = Strata::new().with_busybox(&[]);
    let start = now();
    let first = s.build(ctx.path(), &["-t", "copy:1"]);
    let end = now();
    let run = |a: &[&str]| s.ok(a);
    assert_eq!(times(run, "copy:1", &KEPT), docker_kept);
    for (path, t) in times(run, "copy:1", &MADE) {
        assert!((start..=end).contains(&t), "{path} dated {t}");
    }
    let cfg = config(&s, "copy:1");
    let created = unix(cfg["created"].as_str().unwrap());
    assert!((start..=end).contains(&created), "{cfg}");
    let base_entries = config(&s, "busybox:latest")["history"]
        .as_array()
        .map_or(0, Vec::len);
    let dates = own_history_dates(&cfg, base_entries);
    assert_eq!(dates.len(), 5, "{cfg}");
    assert!(dates.iter().all(|t| (start..=end).contains(t)), "{cfg}");

    // A fresh checkout, later, at another path: every file has a new time.
    // Keys are content, so everything is cached, and the image is the one
    // the first build made, dates and ID alike (as with docker build).
    std::thread::sleep(Duration::from_millis(1100));
    let clone = tempfile::tempdir().unwrap();
    copy_tree(ctx.path(), clone.path());
    touch_all(clone.path(), now());
    let again = s.build(clone.path(), &["-t", "copy:2"]);
    assert_eq!(cached(&again), (6, 6), "{again}");
    assert_eq!(again["image"]["id"], first["image"]["id"]);
    assert_eq!(times(run, "copy:2", &KEPT), docker_kept);
}

/// A base image some of whose files are newer than the epoch the tests
/// use, as a rootfs tar in `dir`: busybox plus `/etc/late`.
fn late_base(dir: &Path) -> std::path::PathBuf {
    let tar = dir.join("late.tar");
    let mut out = tar::Builder::new(std::fs::File::create(&tar).unwrap());
    let mut busybox = tar::Archive::new(std::fs::File::open(busybox_tar()).unwrap());
    for e in busybox.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let path = e.path().unwrap().into_owned();
        if h.entry_type().is_symlink() || h.entry_type().is_hard_link() {
            let target = e.link_name().unwrap().unwrap().into_owned();
            out.append_link(&mut h.clone(), &path, target).unwrap();
        } else {
            out.append_data(&mut h.clone(), &path, &mut e).unwrap();
        }
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(5);
    h.set_mtime(1_800_000_000);
    h.set_entry_type(tar::EntryType::Regular);
    out.append_data(&mut h, "etc/late", &b"late\n"[..]).unwrap();
    out.finish().unwrap();
    tar
}

const EPOCH: u64 = 1_700_000_000;
const EPOCH_DATE: &str = "2023-11-14T22:13:20Z";

#[test]
fn source_date_epoch_gives_one_image_from_any_checkout_on_any_machine() {
    let epoch_arg = format!("SOURCE_DATE_EPOCH={EPOCH}");
    // Two machines, two checkouts made at different times at different
    // paths, all after the epoch.
    let base_dir = tempfile::tempdir().unwrap();
    let base = late_base(base_dir.path());
    let base = base.to_str().unwrap();
    let (one, two) = (Strata::new(), Strata::new());
    one.ok(&["image", "import", "busybox:latest", base]);
    two.ok(&["image", "import", "busybox:latest", base]);
    let (ctx1, ctx2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    checkout(ctx1.path(), now(), now());
    checkout(ctx2.path(), now() + 3_600, now() + 7_200);

    let first = one.build(ctx1.path(), &["-t", "repro:1", "--build-arg", &epoch_arg]);
    std::thread::sleep(Duration::from_millis(1100));
    // The environment variable works as the build arg does (as buildx).
    let report = two.home().join("report.json");
    succeed(
        two.cmd()
            .env("SOURCE_DATE_EPOCH", EPOCH.to_string())
            .args(["build", "--progress", "plain", "--report"])
            .arg(&report)
            .args(["-t", "repro:1"])
            .arg(ctx2.path()),
    );
    let second: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(cached(&second).0, 0, "{second}");
    assert_eq!(
        second["image"]["manifest_digest"],
        first["image"]["manifest_digest"]
    );
    let config_one = config(&one, "repro:1");

    // The image and its history are dated by the epoch; files the build
    // wrote or copied after it are clamped to it, earlier ones kept, and
    // the base image's files are left as they are.
    assert_eq!(config_one["created"], EPOCH_DATE);
    let base_entries = config(&one, "busybox:latest")["history"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(
        own_history_dates(&config_one, base_entries)
            .iter()
            .all(|t| *t == EPOCH)
    );
    let run = |a: &[&str]| one.ok(a);
    let got = times(
        run,
        "repro:1",
        &[
            "/app/a.txt",
            "/made",
            "/from-stage",
            "/from-image",
            "/etc/late",
        ],
    );
    let got: Vec<u64> = got.into_iter().map(|(_, t)| t).collect();
    assert_eq!(got, [EPOCH, EPOCH, EPOCH, 0, 1_800_000_000]);

    // rewrite-timestamp=true clamps the base image's files too.
    let rewritten = one.build(
        ctx1.path(),
        &[
            "-t",
            "repro:all",
            "--build-arg",
            &epoch_arg,
            "--output",
            "type=image,rewrite-timestamp=true",
        ],
    );
    assert_eq!(cached(&rewritten), (6, 6), "{rewritten}");
    let late = times(run, "repro:all", &["/etc/late", "/app/a.txt"]);
    assert_eq!(late[0].1, EPOCH);
    assert_eq!(late[1].1, EPOCH);

    // Another epoch is another image, and nothing runs again for it.
    let later = one.build(
        ctx1.path(),
        &[
            "-t",
            "repro:2",
            "--build-arg",
            "SOURCE_DATE_EPOCH=1700000500",
        ],
    );
    assert_eq!(cached(&later), (6, 6), "{later}");
    assert_ne!(later["image"]["id"], first["image"]["id"]);
    assert_eq!(config(&one, "repro:2")["created"], "2023-11-14T22:21:40Z");
}

#[test]
fn a_bad_epoch_or_a_rewrite_without_one_is_refused_by_name() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN true\n")],
    );
    let ctx = ctx.path().to_str().unwrap();
    let out = s.run(&["build", "--build-arg", "SOURCE_DATE_EPOCH=yesterday", ctx]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SOURCE_DATE_EPOCH must be a whole number of seconds")
            && err.contains("yesterday"),
        "{err}"
    );
    let out = s.run(&[
        "build",
        "--output",
        "type=image,rewrite-timestamp=true",
        ctx,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rewrite-timestamp=true needs SOURCE_DATE_EPOCH"),
        "{err}"
    );
}

#[test]
fn on_a_cluster_a_fresh_checkout_hits_the_cache_and_an_epoch_gives_the_embedded_image() {
    let cluster = Cluster::start(2, 5);
    let ctx = tempfile::tempdir().unwrap();
    checkout(ctx.path(), A_TIME, B_TIME);
    let client = Strata::new();
    let first = cluster.build(&client, ctx.path(), &["-t", "c:1"]);
    assert_eq!(cached(&first).0, 0, "{first}");
    assert_eq!(
        times(|a| client.ok(a), "c:1", &KEPT[..2])
            .into_iter()
            .map(|(_, t)| t)
            .collect::<Vec<_>>(),
        [A_TIME, B_TIME]
    );

    // A fresh clone elsewhere, from another client: nothing runs again.
    let clone = tempfile::tempdir().unwrap();
    copy_tree(ctx.path(), clone.path());
    touch_all(clone.path(), now());
    let other = Strata::new();
    let again = cluster.build(&other, clone.path(), &["-t", "c:1"]);
    assert_eq!(runs(&again), 0, "{again}");
    assert_eq!(again["image"]["id"], first["image"]["id"]);

    // With an epoch the cluster's image is the embedded build's, bit for
    // bit, though every layer was made at another time on another machine.
    let epoch_arg = format!("SOURCE_DATE_EPOCH={EPOCH}");
    let clustered = cluster.build(&other, clone.path(), &["--build-arg", &epoch_arg]);
    assert_eq!(runs(&clustered), 0, "{clustered}");
    let embedded = Strata::new().with_busybox(&[]);
    let local = embedded.build(ctx.path(), &["--build-arg", &epoch_arg]);
    assert_eq!(
        clustered["image"]["manifest_digest"],
        local["image"]["manifest_digest"]
    );
}
