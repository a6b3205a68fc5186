//! `strata build` on one machine, as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_integration::http::{FileServer, LAST_MODIFIED_UNIX};
use strata_integration::{Strata, cached, copy_tree, keys, repo_root, write_files};

fn example(name: &str) -> std::path::PathBuf {
    repo_root().join("examples").join(name)
}

#[test]
fn multistage_example_builds_runs_and_is_small() {
    let s = Strata::new().with_busybox(&[]);
    let report = s.build(&example("multistage-busybox"), &["-t", "myapp:multistage"]);
    assert_eq!(cached(&report).0, 0);
    let out = s.ok(&["run", "--rm", "myapp:multistage"]);
    assert_eq!(out, "Hello, Docker Multi-Stage Build!\n");
    let images = s.ok(&["images"]);
    assert!(
        images.contains("myapp") && images.contains("multistage"),
        "{images}"
    );
    // The final image carries none of the builder's sources.
    let src = s.ok(&[
        "run",
        "--rm",
        "myapp:multistage",
        "sh",
        "-c",
        "test -e /src && echo present || echo absent",
    ]);
    assert_eq!(src, "absent\n");
    // Nothing changed: every step comes from the cache.
    let again = s.build(&example("multistage-busybox"), &["-t", "myapp:multistage"]);
    let (hits, total) = cached(&again);
    assert_eq!(hits, total);
    assert_eq!(
        again["image"]["manifest_digest"],
        report["image"]["manifest_digest"]
    );
}

#[test]
fn run_reports_the_exit_code() {
    let s = Strata::new().with_busybox(&[]);
    let out = s.run(&[
        "run",
        "--rm",
        "busybox:latest",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 42",
    ]);
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    // As `docker run -w -u`: a working directory the image lacks is made,
    // and the command runs as the user given.
    let out = s.run(&[
        "run",
        "--rm",
        "-w",
        "/made/here",
        "-u",
        "1234:5678",
        "busybox:latest",
        "sh",
        "-c",
        "pwd; id -u; id -g",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/made/here\n1234\n5678\n"
    );
}

#[test]
fn same_keys_and_with_an_epoch_the_same_image_from_two_checkouts_and_state_dirs() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (ca, cb) = (
        a.path().join("checkout-one"),
        b.path().join("elsewhere/checkout-two"),
    );
    copy_tree(&example("multistage-busybox"), &ca);
    copy_tree(&example("multistage-busybox"), &cb);
    // Keys never hold a time; the image does, unless an epoch fixes them.
    let epoch = ["--build-arg", "SOURCE_DATE_EPOCH=1700000000"];
    let r1 = Strata::new().with_busybox(&[]).build(&ca, &epoch);
    std::thread::sleep(Duration::from_millis(1100));
    let r2 = Strata::new().with_busybox(&[]).build(&cb, &epoch);
    assert_eq!(keys(&r1), keys(&r2));
    assert_eq!(
        r1["image"]["manifest_digest"],
        r2["image"]["manifest_digest"]
    );
}

#[test]
fn editing_a_source_reruns_only_what_depends_on_it() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&example("multistage-busybox"), dir.path());
    let s = Strata::new().with_busybox(&[]);
    s.build(dir.path(), &[]);
    std::fs::write(dir.path().join("greeting.txt"), "Hello again!\n").unwrap();
    let r = s.build(dir.path(), &["-t", "edited"]);
    let ran: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["cached"] == false)
        .map(|s| s["instruction"].as_str().unwrap())
        .collect();
    assert!(
        ran.iter().any(|i| i.starts_with("COPY greeting.txt")),
        "{ran:?}"
    );
    assert!(!ran.iter().any(|i| i.starts_with("WORKDIR")), "{ran:?}");
    assert_eq!(s.ok(&["run", "--rm", "edited"]), "Hello again!\n");
}

#[test]
fn identical_builder_output_keeps_the_final_stage_cached() {
    let dir = tempfile::tempdir().unwrap();
    let df = |comment: &str| {
        format!(
            "FROM busybox:latest AS builder\nRUN echo artifact > /out # {comment}\nFROM busybox:latest\nCOPY --from=builder /out /out\nRUN cat /out > /copy\n"
        )
    };
    write_files(dir.path(), &[("Dockerfile", &df("first"))]);
    let s = Strata::new().with_busybox(&[]);
    s.build(dir.path(), &[]);
    write_files(dir.path(), &[("Dockerfile", &df("second"))]);
    let r = s.build(dir.path(), &[]);
    let state: Vec<(String, bool)> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["instruction"].as_str().unwrap().to_string(),
                s["cached"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(
        state.iter().any(|(i, c)| i.starts_with("RUN echo") && !c),
        "the builder re-ran: {state:?}"
    );
    assert!(
        state
            .iter()
            .filter(|(i, _)| i.starts_with("COPY") || i.starts_with("RUN cat"))
            .all(|(_, c)| *c),
        "{state:?}"
    );
}

#[test]
fn args_env_workdir_user_and_config_reach_the_image() {
    let dir = tempfile::tempdir().unwrap();
    write_files(
        dir.path(),
        &[
            (
                "Dockerfile",
                "ARG BASE=busybox\nFROM ${BASE}:latest\nARG GREETING=hi\nENV APP_HOME=/opt/app\nWORKDIR $APP_HOME\nCOPY --chown=www-data:www-data --chmod=640 data.txt ./\nUSER www-data\nRUN id -u > /tmp/uid && echo \"$GREETING from $(pwd)\" > /tmp/msg\nUSER root\nEXPOSE 8080\nLABEL org.example=yes\nCMD [\"cat\", \"/tmp/msg\"]\n",
            ),
            ("data.txt", "data\n"),
        ],
    );
    let s = Strata::new().with_busybox(&[]);
    s.build(dir.path(), &["-t", "cfg", "--build-arg", "GREETING=hello"]);
    assert_eq!(s.ok(&["run", "--rm", "cfg"]), "hello from /opt/app\n");
    assert_eq!(s.ok(&["run", "--rm", "cfg", "cat", "/tmp/uid"]), "33\n");
    let ls = s.ok(&["run", "--rm", "cfg", "ls", "-ln", "/opt/app/data.txt"]);
    assert!(ls.starts_with("-rw-r-----") && ls.contains(" 33 "), "{ls}");
}

#[test]
fn bad_inputs_fail_clearly_and_leave_the_store_consistent() {
    let s = Strata::new().with_busybox(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "FROM busybox:latest\nCOPY missing.txt /\n",
            "\"missing.txt\": not found",
        ),
        (
            "FROM busybox:latest\nCOPY ../../etc/passwd /\n",
            "not found",
        ),
        (
            "FROM busybox:latest\nCOPY --from=nostage /x /x\n",
            "(and no stage is named nostage)",
        ),
        (
            "FROM busybox:latest AS a\nCOPY --from=b /x /x\nFROM busybox:latest AS b\nCOPY --from=a /y /y\n",
            "circular dependency",
        ),
        (
            "FROM nosuchimage:1\n",
            "cannot use image nosuchimage:1\n  caused by: cannot pull base image nosuchimage:1\n  caused by: docker.io",
        ),
        (
            "FROM busybox:latest\nRUN echo partial > /p && exit 3\n",
            "exit code: 3",
        ),
        // A stage another copies from fails: the build ends with its error.
        (
            "FROM busybox:latest AS a\nRUN exit 3\nFROM busybox:latest\nCOPY --from=a /a /a\n",
            "exit code: 3",
        ),
        ("FROM busybox:latest\nFORM x\n", "unknown instruction: FORM"),
        // A failed step shows what caused it, one line per cause.
        (
            "FROM busybox:latest\nCOPY loop-a/x /\n",
            "\"loop-a/x\" cannot be resolved in the build context\n  caused by: ",
        ),
    ];
    std::os::unix::fs::symlink("loop-b", dir.path().join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", dir.path().join("loop-b")).unwrap();
    for (df, want) in cases {
        write_files(dir.path(), &[("Dockerfile", df)]);
        let out = s.run(&["build", "--progress", "plain", dir.path().to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{df:?} should fail");
        assert!(err.contains(want), "{df:?}: expected {want:?} in:\n{err}");
        assert!(
            err.contains("Dockerfile:"),
            "{df:?}: the error names the file and line:\n{err}"
        );
    }
    // The failing RUN cached nothing, and the store is whole.
    let prune = s.ok(&["prune", "--keep-storage", "10GB"]);
    assert!(prune.starts_with("Removed 0 cache entries"), "{prune}");
    write_files(
        dir.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN echo fine > /f\n")],
    );
    s.build(dir.path(), &[]);
}

#[test]
fn add_downloads_urls_once_and_checks_checksums() {
    use sha2::Digest as _;
    let server = FileServer::start();
    server.put("/files/tool.txt", b"version 1\n");
    let sum = format!("{:x}", sha2::Sha256::digest(b"version 1\n"));
    let s = Strata::new().with_busybox(&[]);
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("/files/tool.txt");
    write_files(
        dir.path(),
        &[(
            "Dockerfile",
            &format!(
                "FROM busybox:latest\n\
                 ADD {url} /dl/\n\
                 ADD --checksum=sha256:{sum} --chmod=755 {url} /checked\n\
                 RUN stat -c '%n %a %u %Y' /dl/tool.txt /checked > /stat && cat /dl/tool.txt /checked >> /stat\n"
            ),
        )],
    );
    // A download keeps the server's Last-Modified as its time.
    let args = ["-t", "dl:1"];
    s.build(dir.path(), &args);
    // One download serves both the key and the copy, and both ADDs.
    assert_eq!(server.requests(), 1);
    let stat = s.ok(&["run", "--rm", "dl:1", "cat", "/stat"]);
    assert_eq!(
        stat,
        format!(
            "/dl/tool.txt 600 0 {t}\n/checked 755 0 {t}\nversion 1\nversion 1\n",
            t = LAST_MODIFIED_UNIX
        )
    );

    // Warm: the unchecked URL is fetched to learn whether it changed; the
    // checksum alone keys the other.
    let report = s.build(dir.path(), &args);
    assert_eq!(cached(&report), (3, 3));
    assert_eq!(server.requests(), 2);

    // New content upstream: the first ADD reruns, and the second, no
    // longer cached, finds the checksum wrong.
    server.put("/files/tool.txt", b"version 2\n");
    let out = s.run(&["build", "--progress", "plain", dir.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "ADD {url}: checksum mismatch: expected sha256:{sum}"
        )) && err.contains("Dockerfile:3"),
        "{err}"
    );

    write_files(
        dir.path(),
        &[(
            "Dockerfile",
            &format!("FROM busybox:latest\nADD {} /x\n", server.url("/nope")),
        )],
    );
    let out = s.run(&["build", "--progress", "plain", dir.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("404 Not Found") && err.contains("/nope"),
        "{err}"
    );
}

#[test]
fn a_full_disk_fails_the_build_clearly_and_loses_nothing() {
    let s = Strata::on_small_filesystem(48).with_busybox(&[]);
    let dir = tempfile::tempdir().unwrap();
    // The step itself fits; storing its 30 MB layer next to it does not.
    write_files(
        dir.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nRUN head -c 31457280 /dev/urandom > /big\n",
        )],
    );
    let out = s.run(&["build", "--progress", "plain", dir.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the build should fail:\n{err}");
    assert!(
        err.contains("No space left on device") && err.contains(s.home().to_str().unwrap()),
        "the error says what is full and where:\n{err}"
    );
    assert!(err.contains("Dockerfile:2"), "{err}");
    // Nothing half-written is left behind, and once the space is back
    // the store works: the base image is intact and builds run.
    let ingest = s.home().join("content/ingest");
    assert_eq!(
        std::fs::read_dir(&ingest).unwrap().count(),
        0,
        "leftovers in {}",
        ingest.display()
    );
    let prune = s.ok(&["prune"]);
    assert!(prune.starts_with("Removed"), "{prune}");
    write_files(
        dir.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN echo fits > /f\n")],
    );
    s.build(dir.path(), &[]);
    let out = s.ok(&["run", "--rm", "busybox:latest", "echo", "intact"]);
    assert_eq!(out, "intact\n");
}

#[test]
fn ctrl_c_stops_the_build_and_the_next_one_works() {
    let s = Strata::new().with_busybox(&[]);
    let dir = tempfile::tempdir().unwrap();
    write_files(
        dir.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nRUN echo started && sleep 60\n",
        )],
    );
    let child = s
        .cmd()
        .args(["build", "--progress", "plain", dir.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "the sandbox was killed promptly"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cancelled"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No mount or container is left, and the next build runs.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(s.home().to_str().unwrap()),
        "stale mounts under the state directory"
    );
    write_files(
        dir.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN echo second > /f\n")],
    );
    s.build(dir.path(), &[]);
    let prune = s.ok(&["prune"]);
    assert!(prune.contains("Removed"), "{prune}");
}
