//! The local daemon, as users meet it: many commands on one state
//! directory at once, and what happens when a client or the daemon dies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_integration::cluster::{Cluster, runs};
use strata_integration::{Strata, strata_bin, write_files};

/// A Dockerfile whose first stage every build shares and whose last step
/// is its own.
fn service(i: usize) -> String {
    format!(
        "FROM busybox:latest AS deps\nRUN sleep 2 && echo deps > /deps\nFROM busybox:latest\nCOPY --from=deps /deps /deps\nRUN echo service {i} > /app\n"
    )
}

fn daemon_pid(s: &Strata) -> i32 {
    std::fs::read_to_string(s.home().join("daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Kills the daemon of `s` with SIGKILL; returns its pid.
fn kill_daemon(s: &Strata) -> i32 {
    let pid = daemon_pid(s);
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    pid
}

#[test]
fn eight_builds_at_once_on_one_home_succeed_share_a_step_and_leave_other_commands_answering() {
    let s = Strata::new().with_busybox(&[]);
    let dirs: Vec<tempfile::TempDir> = (0..8).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, d) in dirs.iter().enumerate() {
        write_files(d.path(), &[("Dockerfile", &service(i))]);
    }
    let builds: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let report = s.home().join(format!("report-{i}.json"));
            let child = s
                .cmd()
                .args(["build", "--progress", "plain", "-t", &format!("svc:{i}")])
                .arg("--report")
                .arg(&report)
                .arg(d.path())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (child, report)
        })
        .collect();

    // While they run, the state directory answers other commands.
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let images = s.ok(&["images"]);
    let du = s.ok(&["du"]);
    assert!(images.contains("busybox"), "{images}");
    assert!(du.contains("Images") && du.contains("Build cache"), "{du}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );

    let mut shared_runs = 0;
    for (child, report) in builds {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
        shared_runs += report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|st| {
                st["cached"] == false && st["instruction"].as_str().unwrap().contains("sleep 2")
            })
            .count();
    }
    assert_eq!(shared_runs, 1, "the shared step ran {shared_runs} times");
    for i in 0..8 {
        assert_eq!(
            s.ok(&["run", "--rm", &format!("svc:{i}"), "cat", "/app", "/deps"]),
            format!("service {i}\ndeps\n")
        );
    }
}

/// Starts a build of `dir` whose progress is read until a line holds
/// `marker`; returns the running client.
fn build_until(s: &Strata, dir: &std::path::Path, marker: &str) -> std::process::Child {
    let mut child = s
        .cmd()
        .args(["build", "--progress", "plain"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let start = Instant::now();
    loop {
        let line = lines.next().unwrap().unwrap();
        if line.contains(marker) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no {marker:?}");
    }
    // The rest of the progress goes on being drained.
    std::thread::spawn(move || for _ in lines {});
    child
}

#[test]
fn a_daemon_killed_mid_build_is_reported_and_the_next_command_recovers() {
    let s = Strata::new().with_busybox(&[]);
    let dir = tempfile::tempdir().unwrap();
    write_files(
        dir.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nRUN echo first > /first\nRUN echo sleeping && sleep 61\n",
        )],
    );
    let report = s.home().join("report.json");
    let mut child = s
        .cmd()
        .args(["build", "--progress", "plain", "--report"])
        .arg(&report)
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    // Killed once its sandbox runs (the line it prints is out), not while
    // runc may still be creating it.
    loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
        if line.trim_end().ends_with(" sleeping") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = kill_daemon(&s);
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(!status.success());
    assert!(
        rest.contains(&format!(
            "the strata daemon (pid {pid}) stopped in the middle of this command"
        )) && rest.contains(&s.home().join("daemon.log").display().to_string()),
        "{rest}"
    );

    // The next command starts another daemon, which stops the sandbox the
    // dead one left running; the finished step is still cached.
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM busybox:latest\nRUN echo first > /first\nRUN echo second\n",
    )
    .unwrap();
    let again = s.build(dir.path(), &[]);
    assert_ne!(daemon_pid(&s), pid);
    let first = again["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["instruction"].as_str().unwrap().contains("echo first"))
        .unwrap();
    assert_eq!(first["cached"], true, "{again}");
    let left = Command::new("runc")
        .arg("--root")
        .arg(s.home().join("runc"))
        .args(["list", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&left.stdout).trim(), "");
    // The sandbox was killed when the new daemon opened the state
    // directory; its process is gone once the kernel has reaped it. (Its
    // length is this test's own: other tests' sandboxes sleep 60 s.)
    let start = Instant::now();
    while Command::new("pgrep")
        .args(["-f", "^sleep 61$"])
        .status()
        .unwrap()
        .success()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the killed daemon's sandbox is still running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ctrl_c_of_one_client_cancels_its_build_only() {
    let s = Strata::new().with_busybox(&[]);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let shared = "FROM busybox:latest\nRUN sleep 3 && echo shared > /shared\n";
    write_files(
        a.path(),
        &[("Dockerfile", &format!("{shared}RUN echo a\n"))],
    );
    write_files(
        b.path(),
        &[("Dockerfile", &format!("{shared}RUN echo b\n"))],
    );
    let a_client = build_until(&s, a.path(), "RUN sleep 3");
    let b_client = s
        .cmd()
        .args(["build", "--progress", "quiet", "-t", "b:1"])
        .arg(b.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        Command::new("kill")
            .args(["-INT", &a_client.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let a_out = a_client.wait_with_output().unwrap();
    assert!(!a_out.status.success());
    let b_out = b_client.wait_with_output().unwrap();
    assert!(
        b_out.status.success(),
        "{}",
        String::from_utf8_lossy(&b_out.stderr)
    );
    assert_eq!(s.ok(&["run", "--rm", "b:1", "cat", "/shared"]), "shared\n");
    // Nothing of the cancelled build still runs in the daemon.
    let status = s.ok(&["daemon", "status"]);
    assert!(status.contains(" 0 command(s) running"), "{status}");
}

#[test]
fn stale_sockets_second_daemons_other_users_and_other_builds_get_clear_answers() {
    let s = Strata::new();
    std::fs::create_dir_all(s.home()).unwrap();
    // A socket file nobody listens on, as a killed daemon leaves it.
    let stale = std::os::unix::net::UnixListener::bind(s.home().join("daemon.sock")).unwrap();
    drop(stale);
    let s = s.with_busybox(&[]);
    assert!(s.ok(&["images"]).contains("busybox"));

    // A second daemon on the same state directory.
    let out = s.run(&["daemon", "--foreground"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another strata process holds the state directory"),
        "{err}"
    );

    // Another user: the socket is the daemon's user's alone.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(s.home().join("daemon.sock"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(strata_bin())
        .arg("--home")
        .arg(s.home())
        .arg("images")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to the strata daemon at") && err.contains("Permission denied"),
        "{err}"
    );

    // Another build of strata: the running daemon finishes, stops, and
    // the newer client starts its own.
    let bin_dir = tempfile::tempdir().unwrap();
    let other = bin_dir.path().join("strata");
    std::fs::copy(strata_bin(), &other).unwrap();
    let out = Command::new(&other)
        .arg("--home")
        .arg(s.home())
        .arg("images")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("busybox"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is another build"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&other)
        .arg("--home")
        .arg(s.home())
        .args(["daemon", "stop"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn two_cluster_clients_on_one_host_build_at_once() {
    let cluster = Cluster::start(2, 5);
    let client = Strata::new();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_files(a.path(), &[("Dockerfile", &service(1))]);
    write_files(b.path(), &[("Dockerfile", &service(2))]);
    let first = cluster.spawn_build(&client, a.path(), &["-t", "one:1"]);
    let second = client
        .cmd()
        .args(["build", "--cluster"])
        .arg(cluster.client())
        .args(["--progress", "quiet", "-o", "type=image", "-t", "two:1"])
        .arg(b.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for child in [first, second] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        client.ok(&["run", "--rm", "one:1", "cat", "/app"]),
        "service 1\n"
    );
    assert_eq!(
        client.ok(&["run", "--rm", "two:1", "cat", "/app"]),
        "service 2\n"
    );
    let again = cluster.build(&client, a.path(), &[]);
    assert_eq!(runs(&again), 0, "{again}");
}

#[test]
fn the_daemon_serves_metrics_and_a_dashboard_and_keeps_a_history_of_builds() {
    use strata_integration::http::get;
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nRUN echo one > /one\nRUN echo two > /two\n",
        )],
    );
    let first = s.build(ctx.path(), &["-t", "kept:1"]);
    let again = s.build(ctx.path(), &["-t", "kept:2"]);
    let failing = tempfile::tempdir().unwrap();
    write_files(
        failing.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN exit 3\n")],
    );
    assert!(
        !s.run(&["build", failing.path().to_str().unwrap()])
            .status
            .success()
    );

    // `daemon status` names the endpoint.
    let status = s.ok(&["daemon", "status"]);
    let url = status
        .lines()
        .find_map(|l| l.strip_prefix("metrics: http://"))
        .unwrap_or_else(|| panic!("no metrics address in:\n{status}"));
    let addr: std::net::SocketAddr = url.trim_end_matches("/metrics").parse().unwrap();
    let (code, metrics) = get(addr, "/metrics");
    assert_eq!(code, 200);
    for line in [
        "strata_builds_finished_total{outcome=\"succeeded\"} 2",
        "strata_builds_finished_total{outcome=\"failed\"} 1",
        "strata_cache_lookups_total{result=\"hit\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    assert_eq!(get(addr, "/readyz").0, 200);

    // The history: newest first, the failure with its error.
    let listed: serde_json::Value =
        serde_json::from_str(&s.ok(&["history", "--format", "json"])).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!(listed[0]["status"], "failed");
    assert!(
        listed[0]["error"].as_str().unwrap().contains("RUN exit 3"),
        "{}",
        listed[0]
    );
    assert_eq!(listed[1]["id"], again["id"]);
    assert_eq!(listed[2]["id"], first["id"]);
    let shown = s.ok(&["history", "inspect", first["id"].as_str().unwrap()]);
    assert!(shown.contains("Steps:     2 run, 0 cached"), "{shown}");
    assert!(
        s.run(&["history", "inspect", "zzzz"]).status.code() == Some(1),
        "an unknown id is an error"
    );

    // The dashboard's data: this node, its builds, its cache's use.
    let (code, body) = get(addr, "/api/dashboard");
    assert_eq!(code, 200);
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["node"]["role"], "daemon");
    assert_eq!(view["recent"][1]["id"], again["id"]);
    assert_eq!(view["cache"]["hits_hour"], 2, "{body}");
    let (code, page) = get(addr, "/");
    assert_eq!(code, 200);
    assert!(page.contains("<title>strata</title>"));
}

/// Bytes of blobs in a state directory's content store.
fn blob_bytes(home: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![home.join("content").join("blobs")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

#[test]
fn the_daemon_keeps_its_store_within_keep_storage_and_evicted_steps_run_again() {
    let s = Strata::new();
    // The daemon starts with the first command, in its environment.
    let budget: u64 = 30_000_000;
    strata_integration::succeed(
        s.cmd()
            .env("STRATA_KEEP_STORAGE", "30MB")
            .args(["image", "import", "busybox:latest"])
            .arg(strata_integration::busybox_tar()),
    );
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest AS builder\nARG N\nRUN head -c 12000000 /dev/urandom > /big && echo $N > /n\nFROM busybox:latest\nCOPY --from=builder /n /n\n",
        )],
    );
    let build = |n: u32| {
        let arg = format!("N={n}");
        s.build(ctx.path(), &["--build-arg", &arg])
    };
    let run_step_cached = |report: &serde_json::Value| {
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|st| st["instruction"].as_str().unwrap_or("").starts_with("RUN"))
            .map(|st| st["cached"].as_bool() == Some(true))
            .unwrap()
    };
    // Blobs are dated to the second: a second apart, their order is known.
    for n in 1..=4 {
        assert!(!run_step_cached(&build(n)), "build {n}");
        std::thread::sleep(Duration::from_millis(1100));
    }
    // Four 12 MB builder layers are past the budget: the least recently
    // used go, within a few eviction rounds.
    let start = Instant::now();
    while blob_bytes(s.home()) > budget {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the store still holds {} bytes",
            blob_bytes(s.home())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The first build's layer went with its cache entry: it runs again,
    // and succeeds; the newest is still a hit.
    assert!(!run_step_cached(&build(1)));
    assert!(run_step_cached(&build(4)));
    let log = std::fs::read_to_string(s.home().join("daemon.log")).unwrap();
    assert!(log.contains("evicted to stay within keep_storage"), "{log}");
}

/// The directory under `/run/strata/netns` holding the step networks of
/// the node whose state directory is `home`, found by the owner it names.
fn networks_of(home: &std::path::Path) -> Option<std::path::PathBuf> {
    let cni = home.join("cni");
    std::fs::read_dir("/run/strata/netns")
        .ok()?
        .flatten()
        .map(|d| d.path())
        .find(|d| {
            std::fs::read(d.join("owner")).is_ok_and(|o| o == cni.as_os_str().as_encoded_bytes())
        })
}

#[test]
fn step_networks_of_a_killed_daemon_whose_home_was_removed_are_released_by_the_next_node() {
    let dir = tempfile::tempdir().unwrap();
    write_files(
        dir.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN echo networked\n")],
    );
    // A CI job: its daemon builds, is killed with its pooled networks
    // still wired, and its temporary home is removed.
    let job = Strata::new().with_busybox(&[]);
    job.build(dir.path(), &["--no-cache"]);
    let left = networks_of(job.home()).expect("the step's network is pooled under /run");
    let namespaces = std::fs::read_dir(&left).unwrap().count() - 1;
    assert!(namespaces >= 1, "{}", left.display());
    let pid = kill_daemon(&job);
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the daemon lives"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(job);
    assert!(left.exists(), "nothing else releases them");

    // The next node on this host, in another home, releases them.
    let next = Strata::new().with_busybox(&[]);
    next.build(dir.path(), &["--no-cache"]);
    assert!(
        !left.exists(),
        "{} is still there: {:?}",
        left.display(),
        std::fs::read_dir(&left).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    // And its own networks are not taken for orphans'.
    assert!(networks_of(next.home()).is_some());
}
