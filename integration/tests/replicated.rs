//! Three coordinators replicating the cache index (Raft) and two workers,
//! real processes on loopback: the leader is killed, the cache survives,
//! builds go on, and the killed coordinator comes back and catches up.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use strata_integration::cluster::{Cluster, runs, worker_running};
use strata_integration::{Strata, write_files};

/// `(member, leader, last applied)` from `strata cluster status`.
fn group(status: &str) -> Option<(u64, Option<u64>, u64)> {
    let line = status
        .lines()
        .find(|l| l.starts_with("replicated index:"))?;
    let word_after = |w: &str| {
        line.split(w)
            .nth(1)?
            .split([' ', ','])
            .next()
            .map(str::to_string)
    };
    Some((
        word_after("member ")?.parse().ok()?,
        word_after("leader ")?.parse().ok(),
        word_after("last applied ")?.parse().unwrap_or(0),
    ))
}

/// `strata cluster status` as coordinator `name` alone answers it.
fn status_of(cluster: &Cluster, name: &str) -> Option<String> {
    let config = cluster.path().join(format!("client-{name}.toml"));
    if !config.exists() {
        let listen = std::fs::read_to_string(cluster.path().join(format!("{name}.toml")))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("listen = ").map(str::to_string))
            .unwrap();
        std::fs::write(
            &config,
            format!(
                "coordinators = [{listen}]\n[tls]\nca = \"ca.pem\"\ncert = \"client.pem\"\nkey = \"client-key.pem\"\n"
            ),
        )
        .unwrap();
    }
    let out = cluster.run(&["cluster", "status", "--cluster", config.to_str().unwrap()]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds `n` Dockerfiles of one step each, one after another, each from
/// a client of its own; returns, for each that succeeded, its context and
/// build report.
fn stream_of_builds(cluster: &Cluster, n: usize) -> Vec<(tempfile::TempDir, serde_json::Value)> {
    let mut done = Vec::new();
    for i in 0..n {
        let ctx = tempfile::tempdir().unwrap();
        write_files(
            ctx.path(),
            &[(
                "Dockerfile",
                &format!("FROM busybox:latest\nRUN echo stream {i} > /s\n"),
            )],
        );
        let client = Strata::new();
        let out = cluster
            .spawn_build(&client, ctx.path(), &[])
            .wait_with_output()
            .unwrap();
        if out.status.success() {
            let report = std::fs::read(client.home().join("report.json")).unwrap();
            done.push((ctx, serde_json::from_slice(&report).unwrap()));
        } else {
            eprintln!(
                "stream build {i} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    done
}

/// Waits until coordinator `name` follows a leader and has applied
/// everything the leader had applied when asked.
fn wait_caught_up(cluster: &Cluster, name: &str) {
    let start = Instant::now();
    loop {
        let leader_applied = cluster
            .coordinator_names()
            .into_iter()
            .filter_map(|n| group(&status_of(cluster, &n)?))
            .find(|(id, l, _)| Some(*id) == *l)
            .map(|(_, _, applied)| applied);
        let back = status_of(cluster, name).and_then(|s| group(&s));
        if let (Some(want), Some((_, Some(_), got))) = (leader_applied, back)
            && got >= want
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name} did not catch up: {back:?} vs leader at {leader_applied:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn losing_the_leader_loses_no_cache_and_a_restarted_coordinator_catches_up() {
    let cluster = Cluster::start_group(3, 3, 2);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest AS a\nRUN echo a > /a\n\
             FROM busybox:latest AS b\nRUN echo b > /b\n\
             FROM busybox:latest\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nRUN cat /a /b > /ab\n\
             CMD [\"cat\", \"/ab\"]\n",
        )],
    );
    let first = cluster.build(&Strata::new(), ctx.path(), &["-t", "kept:1"]);
    assert_eq!(runs(&first), 3, "{first}");

    // A build is running when the leader dies.
    let inflight_ctx = tempfile::tempdir().unwrap();
    write_files(
        inflight_ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nRUN sleep 2 && echo in flight > /f\nCMD [\"cat\", \"/f\"]\n",
        )],
    );
    let inflight_client = Strata::new();
    let inflight =
        cluster.spawn_build(&inflight_client, inflight_ctx.path(), &["-t", "inflight:1"]);
    cluster.wait_for(Duration::from_secs(30), |s| worker_running(s, 1).is_some());

    let (_, leader, _) = group(&cluster.status()).unwrap();
    let leader = leader.expect("a leader");
    let victim = format!("coordinator-{leader}");
    // And a stream of builds, one after another, before, during and after
    // the election.
    std::thread::scope(|scope| {
        let stream = scope.spawn(|| stream_of_builds(&cluster, 8));
        std::thread::sleep(Duration::from_millis(500));
        let killed = Instant::now();
        cluster.kill(&victim);
        // The others elect a leader among themselves.
        let (survivor, new_leader) = loop {
            let seen = cluster
                .coordinator_names()
                .into_iter()
                .filter(|n| *n != victim)
                .find_map(|n| {
                    let (_, l, _) = group(&status_of(&cluster, &n)?)?;
                    l.filter(|l| *l != leader).map(|l| (n, l))
                });
            if let Some(s) = seen {
                break s;
            }
            assert!(killed.elapsed() < Duration::from_secs(30), "no new leader");
            std::thread::sleep(Duration::from_millis(50));
        };
        eprintln!(
            "coordinator-{new_leader} leads {:?} after coordinator-{leader} was killed (seen by {survivor})",
            killed.elapsed()
        );
        // Workers move to a coordinator still up.
        cluster.wait_for(Duration::from_secs(30), |s| {
            s.lines()
                .filter(|l| l.starts_with("worker-") && l.contains(" up "))
                .count()
                == 3
        });

        // Every build of the stream succeeded, and each one's result is in
        // the cache the new leader keeps: built again, nothing runs.
        let streamed = stream.join().unwrap();
        assert_eq!(streamed.len(), 8, "some builds of the stream failed");
        for (ctx, report) in &streamed {
            let again = cluster.build(&Strata::new(), ctx.path(), &[]);
            assert_eq!(runs(&again), 0, "{again}");
            assert_eq!(
                again["image"]["manifest_digest"],
                report["image"]["manifest_digest"]
            );
        }
    });

    // The build in flight finishes, through a coordinator still up.
    let out = inflight.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the build in flight failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        inflight_client.ok(&["run", "--rm", "inflight:1"]),
        "in flight\n"
    );

    // Every step the first build recorded is still in the cache: another
    // client, through another coordinator, runs nothing.
    let again_client = Strata::new();
    let again = cluster.build(&again_client, ctx.path(), &["-t", "kept:1"]);
    assert_eq!(runs(&again), 0, "{again}");
    assert_eq!(again_client.ok(&["run", "--rm", "kept:1"]), "a\nb\n");
    // And new results are recorded by the group that is left.
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nRUN echo after > /after\nCMD [\"cat\", \"/after\"]\n",
        )],
    );
    let after = cluster.build(&Strata::new(), ctx.path(), &["-t", "after:1"]);
    assert_eq!(runs(&after), 1, "{after}");

    // The killed coordinator comes back from its disk and catches up.
    cluster.up();
    wait_caught_up(&cluster, &victim);
    let rebuilt = cluster.build(&Strata::new(), ctx.path(), &["-t", "after:1"]);
    assert_eq!(runs(&rebuilt), 0, "{rebuilt}");
}

/// Drops every UDP datagram to or from `port` (on this machine: loopback
/// included) until dropped: a coordinator's Raft endpoint cut off while
/// its workers and clients still reach it.
struct Partition {
    port: String,
}

impl Partition {
    fn rules(&self) -> [[&str; 8]; 2] {
        [
            [
                "INPUT", "-p", "udp", "--dport", &self.port, "-j", "DROP", "",
            ],
            [
                "INPUT", "-p", "udp", "--sport", &self.port, "-j", "DROP", "",
            ],
        ]
    }

    fn cut(port: u16) -> Partition {
        let p = Partition {
            port: port.to_string(),
        };
        for r in p.rules() {
            let ok = Command::new("iptables")
                .arg("-I")
                .args(&r[..7])
                .status()
                .unwrap()
                .success();
            assert!(ok, "iptables -I {r:?} failed");
        }
        p
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for r in self.rules() {
            let _ = Command::new("iptables").arg("-D").args(&r[..7]).status();
        }
    }
}

fn raft_port(cluster: &Cluster, name: &str) -> u16 {
    std::fs::read_to_string(cluster.path().join(format!("{name}.toml")))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("raft_listen = "))
        .and_then(|a| a.trim_matches('"').rsplit(':').next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_coordinator_cut_off_cannot_commit_the_majority_goes_on_and_it_converges() {
    let cluster = Cluster::start_group(3, 1, 5);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN echo one > /one\n")],
    );
    cluster.build(&Strata::new(), ctx.path(), &[]);
    // Make the per-coordinator client files.
    for n in cluster.coordinator_names() {
        status_of(&cluster, &n).unwrap();
    }
    let via = |n: &str| cluster.path().join(format!("client-{n}.toml"));

    let cut = Partition::cut(raft_port(&cluster, "coordinator-3"));
    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN echo two > /two\n")],
    );
    // The majority elects or keeps a leader and records new results.
    loop {
        if let Some((_, Some(l), _)) = status_of(&cluster, "coordinator-1").and_then(|s| group(&s))
            && l != 3
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let two = cluster.build_via(&via("coordinator-1"), &Strata::new(), ctx.path(), &[]);
    assert_eq!(runs(&two), 1, "{two}");
    // The one cut off cannot confirm anything: a build through it fails,
    // saying why, and records nothing.
    let out = Strata::new().run(&[
        "build",
        "--cluster",
        via("coordinator-3").to_str().unwrap(),
        ctx.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("has no leader"), "{err}");

    // Healed, it catches up with what the majority committed.
    drop(cut);
    wait_caught_up(&cluster, "coordinator-3");
    let again = cluster.build_via(&via("coordinator-3"), &Strata::new(), ctx.path(), &[]);
    assert_eq!(runs(&again), 0, "{again}");
}

#[test]
fn coordinators_join_and_leave_the_group_at_run_time() {
    let cluster = Cluster::start_group(3, 1, 5);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN echo kept > /kept\n")],
    );
    cluster.build(&Strata::new(), ctx.path(), &[]);

    // A fourth coordinator's certificate and config, the way an operator
    // makes them: `cluster init` again, which keeps what exists. With four
    // coordinators and one worker, the fourth listens at base+3, its
    // Raft endpoint at base+8 and its image endpoint at base+12.
    let base = loop {
        let base = 30_000 + (std::process::id() * 7 + rand_offset()) % 30_000;
        let free = |p: u32| {
            std::net::UdpSocket::bind(("127.0.0.1", p as u16)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p as u16)).is_ok()
        };
        if [3, 8, 12].iter().all(|o| free(base + o)) {
            break base;
        }
    };
    cluster.ok(&[
        "cluster",
        "init",
        "--dir",
        cluster.path().to_str().unwrap(),
        "--workers",
        "1",
        "--coordinators",
        "4",
        "--base-port",
        &base.to_string(),
    ]);
    let log = std::fs::File::create(cluster.path().join("logs/coordinator-4.log")).unwrap();
    let mut fourth = Command::new(strata_integration::strata_bin())
        .args(["coordinator", "--config"])
        .arg(cluster.path().join("coordinator-4.toml"))
        .env_remove("STRATA_HOME")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Stop<'a>(&'a mut std::process::Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _stop = Stop(&mut fourth);

    let client = cluster.admin();
    let raft = format!("127.0.0.1:{}", base + 8);
    let start = Instant::now();
    let added = loop {
        let out = cluster.run(&[
            "cluster",
            "add-coordinator",
            "--id",
            "4",
            "--raft",
            &raft,
            "--cluster",
            client.to_str().unwrap(),
        ]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        // The new coordinator may still be starting.
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(added, "coordinator 4 added to the group\n");
    // It holds the whole index, and votes.
    let (_, leader, applied) = group(&cluster.status()).unwrap();
    let leader = leader.unwrap();
    let start = Instant::now();
    loop {
        let s = status_of(&cluster, "coordinator-4").unwrap_or_default();
        if s.contains("member 4 of 1,2,3,4")
            && group(&s).is_some_and(|(_, l, a)| l == Some(leader) && a >= applied)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "status of coordinator-4: {s:?}\nits log:\n{}",
            std::fs::read_to_string(cluster.path().join("logs/coordinator-4.log"))
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    cluster.ok(&[
        "cluster",
        "remove-coordinator",
        "--id",
        "4",
        "--cluster",
        client.to_str().unwrap(),
    ]);
    let s = cluster.status();
    assert!(s.contains(" of 1,2,3,"), "{s}");
}

/// A little variety between runs in the same second.
fn rand_offset() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() % 10_000)
}

/// The workers holding more than `bytes` of blobs.
fn holding_more_than(cluster: &Cluster, bytes: u64) -> Vec<String> {
    cluster
        .worker_names()
        .into_iter()
        .filter(|w| cluster.blob_bytes(w) > bytes)
        .collect()
}

/// Builds a Dockerfile whose first RUN makes a 6 MB layer of random bytes
/// (its image checks them); returns the context, the report and the two
/// workers the layer was published on.
fn build_a_6mb_layer(
    cluster: &Cluster,
    tag: &str,
) -> (tempfile::TempDir, serde_json::Value, Vec<String>) {
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\n\
             RUN head -c 6000000 /dev/urandom > /big && md5sum /big > /big.md5\n\
             RUN echo small > /small\n\
             CMD [\"md5sum\", \"-c\", \"/big.md5\"]\n",
        )],
    );
    let first = cluster.build(&Strata::new(), ctx.path(), &["-t", tag]);
    assert_eq!(runs(&first), 2, "{first}");
    // The build ended with its results published: two workers hold the
    // 6 MB layer, and once their next heartbeats reach the leader (whose
    // view status shows), no layer is short.
    let holders = holding_more_than(cluster, 6_000_000);
    assert_eq!(holders.len(), 2, "{holders:?}");
    cluster.wait_for(Duration::from_secs(10), |s| {
        Cluster::replication(s) == Some((2, 0))
    });
    (ctx, first, holders)
}

/// Kills `last`, the layer's last original holder, and builds `ctx` again
/// from a new client: every step comes from the cache, through the copies.
fn hits_without(cluster: &Cluster, last: &str, ctx: &Path, tag: &str, first: &serde_json::Value) {
    cluster.kill(last);
    cluster.wait_for(Duration::from_secs(60), |s| {
        s.lines()
            .any(|l| l.starts_with(last) && l.contains(" gone "))
    });
    let client = Strata::new();
    let again = cluster.build(&client, ctx, &["-t", tag]);
    assert_eq!(runs(&again), 0, "{again}");
    assert_eq!(
        again["image"]["manifest_digest"],
        first["image"]["manifest_digest"]
    );
    assert_eq!(client.ok(&["run", "--rm", tag]), "/big: OK\n");
}

#[test]
fn layers_a_lost_worker_held_are_copied_again_and_the_cache_still_hits() {
    // Three coordinators, three workers, each built layer kept on two.
    let cluster = Cluster::start_group(3, 3, 2);
    let (ctx, first, holders) = build_a_6mb_layer(&cluster, "kept:1");
    let spare = cluster
        .worker_names()
        .into_iter()
        .find(|w| !holders.contains(w))
        .unwrap();

    // One holder dies: the leader copies what it held to the spare.
    let killed = Instant::now();
    cluster.kill(&holders[0]);
    cluster.wait_for(Duration::from_secs(60), |s| {
        s.lines()
            .any(|l| l.starts_with(&holders[0]) && l.contains(" gone "))
            && Cluster::replication(s) == Some((2, 0))
    });
    eprintln!(
        "{spare} holds the lost worker's layers again {:?} after {} was killed",
        killed.elapsed(),
        holders[0]
    );
    assert!(cluster.blob_bytes(&spare) > 6_000_000);

    // The other original holder dies too: the cache hit needs the copies.
    hits_without(&cluster, &holders[1], ctx.path(), "kept:1", &first);
}

#[test]
fn a_worker_back_with_a_wiped_disk_holds_nothing_and_its_layers_are_copied_again() {
    let cluster = Cluster::start_group(1, 3, 2);
    let (ctx, first, holders) = build_a_6mb_layer(&cluster, "wiped:1");

    // A holder's disk is replaced while it is down; it comes back empty.
    cluster.kill(&holders[0]);
    std::fs::remove_dir_all(cluster.worker_home(&holders[0])).unwrap();
    cluster.up();
    // It registers with nothing, so the layer is short of a copy until
    // the leader has one made: two workers hold it again on disk,
    // whichever took the copy.
    cluster.wait_for(Duration::from_secs(60), |s| {
        Cluster::replication(s) == Some((2, 0)) && holding_more_than(&cluster, 6_000_000).len() == 2
    });
    assert!(holding_more_than(&cluster, 6_000_000).contains(&holders[1]));

    // The one original copy left goes too: the build needs the new one.
    hits_without(&cluster, &holders[1], ctx.path(), "wiped:1", &first);
}

/// Every file named `name` under `dir`.
fn files_named(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p);
            } else if e.file_name() == name {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn a_layer_its_holder_lost_is_dropped_from_the_records_and_built_again() {
    // One copy of each layer: a holder that loses the file loses the
    // only copy.
    let cluster = Cluster::start_with(1, 2, &[("replication", "1".into())]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\n\
             RUN head -c 2000000 /dev/zero | tr '\\0' x > /x\n",
        )],
    );
    let first = cluster.build(&Strata::new(), ctx.path(), &["-t", "lost:1"]);
    assert_eq!(runs(&first), 1, "{first}");
    let made = Strata::new();
    cluster.build(&made, ctx.path(), &["-t", "lost:1"]);
    let layer = strata_integration::image_model::top_layer(&made, "lost:1").unwrap();
    let name = strata_cas::Digest::of(&layer).hex();

    // The worker holding it loses the file (a disk fault, an operator's
    // rm), while it runs and while the records say it holds it.
    let held: Vec<_> = cluster
        .worker_names()
        .iter()
        .flat_map(|w| files_named(&cluster.worker_home(w), &name))
        .collect();
    assert_eq!(held.len(), 1, "{held:?}");
    std::fs::remove_file(&held[0]).unwrap();

    // A new client's build finds the cached step, cannot fetch its layer,
    // tells the coordinator, which asks the holder, drops the record,
    // and the build runs the step again: the user sees a build that works.
    let client = Strata::new();
    let again = cluster.build(&client, ctx.path(), &["-t", "lost:1"]);
    assert_eq!(runs(&again), 1, "{again}");
    assert_eq!(
        client
            .ok(&["run", "--rm", "lost:1", "wc", "-c", "/x"])
            .trim(),
        "2000000 /x"
    );
    // The records hold again: the next build is a hit, fetched whole.
    let third = cluster.build(&Strata::new(), ctx.path(), &["-t", "lost:1"]);
    assert_eq!(runs(&third), 0, "{third}");
}

/// Sets `name = value` in worker `worker`'s config (ahead of its tables).
fn set_worker(cluster: &Cluster, worker: &str, name: &str, value: &str) {
    let path = cluster.path().join(format!("{worker}.toml"));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{name} = {value}\n{text}")).unwrap();
}

#[test]
fn a_worker_stays_within_keep_storage_and_evicted_steps_run_again() {
    const KEEP: u64 = 12 << 20;
    let cluster = Cluster::start_with(1, 1, &[("replication", "1".into())]);
    let worker = cluster.worker_names()[0].clone();
    cluster.kill(&worker);
    set_worker(&cluster, &worker, "keep_storage", &KEEP.to_string());
    cluster.up();
    // Twelve builds, each making a 3 MB layer of its own: 36 MB of layers
    // through a store that keeps 12.
    let contexts: Vec<tempfile::TempDir> = (0..12)
        .map(|i| {
            let ctx = tempfile::tempdir().unwrap();
            write_files(
                ctx.path(),
                &[(
                    "Dockerfile",
                    &format!(
                        "FROM busybox:latest\n\
                         RUN head -c 3000000 /dev/urandom > /layer-{i}\n"
                    ),
                )],
            );
            ctx
        })
        .collect();
    // First, and so least recently used, an image the cluster names.
    let named = tempfile::tempdir().unwrap();
    write_files(
        named.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nRUN head -c 3000000 /dev/urandom > /kept\n",
        )],
    );
    cluster.build(&Strata::new(), named.path(), &["-t", "kept:1"]);
    for ctx in &contexts {
        let report = cluster.build(&Strata::new(), ctx.path(), &[]);
        assert_eq!(runs(&report), 1, "{report}");
    }
    // Once the newest layers are past their grace, the store is back
    // within its bound, and the index no longer offers what went.
    let status = cluster.wait_for(Duration::from_secs(60), |_| {
        let held = cluster.blob_bytes(&worker);
        eprintln!("{worker} holds {held} bytes of blobs");
        held <= KEEP
    });
    eprintln!(
        "{worker} holds {} bytes of blobs (keep_storage {KEEP})\n{status}",
        cluster.blob_bytes(&worker)
    );
    // Each layer was the last copy: its cache entries left the index
    // before the worker dropped it, so no hit was offered for it meanwhile.
    let said = cluster.log("coordinator");
    assert!(
        said.contains("took cache entries out of the index before a worker drops"),
        "{said}"
    );
    // The named image kept its layers: it is pulled whole from the
    // cluster, and building it again is a hit.
    let layout = tempfile::tempdir().unwrap();
    cluster.copy_with_skopeo("coordinator", "kept:1", layout.path(), "kept");
    let again = cluster.build(&Strata::new(), named.path(), &["-t", "kept:1"]);
    assert_eq!(runs(&again), 0, "{again}");
    // A worker killed in the middle of evicting, and started again, leaves
    // no cache hit pointing at a layer it lost: every build succeeds,
    // the evicted ones by running their step again.
    cluster.kill(&worker);
    cluster.wait_for(Duration::from_secs(60), |s| {
        s.lines()
            .any(|l| l.starts_with(&worker) && l.contains(" gone "))
    });
    cluster.up();
    let mut ran = 0;
    for ctx in &contexts {
        let report = cluster.build(&Strata::new(), ctx.path(), &[]);
        ran += runs(&report);
    }
    assert!(ran >= 8, "only {ran} of 12 evicted steps ran again");
    assert!(ran <= 12);
}

#[test]
fn a_coordinator_that_lost_its_state_does_not_vote_until_taken_out_and_added_again() {
    let cluster = Cluster::start_group(3, 1, 5);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nRUN echo acknowledged > /a\n",
        )],
    );
    cluster.build(&Strata::new(), ctx.path(), &[]);
    // Every member has taken part, and the group has recorded it.
    cluster.wait_for(Duration::from_secs(30), |s| s.contains("took part 1,2,3\n"));

    // Coordinator 1 (the one that made the group) loses its disk and
    // starts again: it finds the group counting it as a voter, and stops,
    // saying what to do, instead of making a new group or voting with an
    // empty log.
    cluster.kill("coordinator-1");
    std::fs::remove_dir_all(cluster.path().join("state/coordinator-1/raft")).unwrap();
    let first = || {
        Command::new(strata_integration::strata_bin())
            .args(["coordinator", "--config"])
            .arg(cluster.path().join("coordinator-1.toml"))
            .env_remove("STRATA_HOME")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let refused = strata_integration::run_bounded(
        Command::new(strata_integration::strata_bin())
            .args(["coordinator", "--config"])
            .arg(cluster.path().join("coordinator-1.toml"))
            .env_remove("STRATA_HOME"),
        Duration::from_secs(60),
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains("still counts it as a voter"), "{said}");
    assert!(said.contains("remove-coordinator --id 1"), "{said}");
    // The others go on, with every acknowledged write.
    let again = cluster.build(&Strata::new(), ctx.path(), &[]);
    assert_eq!(runs(&again), 0, "{again}");

    // The operator's way back: take it out, start it, add it again.
    let admin = cluster.admin();
    cluster.ok(&[
        "cluster",
        "remove-coordinator",
        "--id",
        "1",
        "--cluster",
        admin.to_str().unwrap(),
    ]);
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _back = Stop(first());
    let raft = format!("127.0.0.1:{}", raft_port(&cluster, "coordinator-1"));
    let start = Instant::now();
    loop {
        let out = cluster.run(&[
            "cluster",
            "add-coordinator",
            "--id",
            "1",
            "--raft",
            &raft,
            "--cluster",
            admin.to_str().unwrap(),
        ]);
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let start = Instant::now();
    loop {
        let s = status_of(&cluster, "coordinator-1").unwrap_or_default();
        if s.contains("member 1 of 1,2,3") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = cluster.build(&Strata::new(), ctx.path(), &[]);
    assert_eq!(runs(&last), 0, "{last}");
}

#[test]
fn a_change_that_would_leave_no_majority_answering_is_refused() {
    let cluster = Cluster::start_group(3, 1, 5);
    let admin = cluster.admin();
    let admin = admin.to_str().unwrap();
    cluster.kill("coordinator-3");
    cluster.wait_for(Duration::from_secs(30), |s| {
        s.lines().any(|l| l.contains(" unreachable "))
    });
    // Removing a live member while another is down would leave {1,3}
    // with one member answering: the group would stop. Refused, saying
    // which members do not answer.
    let err = cluster.refused(&[
        "cluster",
        "remove-coordinator",
        "--id",
        "2",
        "--cluster",
        admin,
    ]);
    assert!(
        err.contains("would be voters {1, 3}, of which only [1] answer ([3] do not)"),
        "{err}"
    );
    // Adding a member that is not running: refused at once, not left to
    // be promoted whenever it shows up.
    let err = cluster.refused(&[
        "cluster",
        "add-coordinator",
        "--id",
        "4",
        "--raft",
        "127.0.0.1:9",
        "--cluster",
        admin,
    ]);
    assert!(
        err.contains("coordinator 4 at 127.0.0.1:9 does not answer"),
        "{err}"
    );
    // The group is as it was, and builds go on.
    let status = cluster.status();
    assert!(
        status.contains("member 1 of 1,2,3,") || status.contains("of 1,2,3,"),
        "{status}"
    );
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN echo still > /s\n")],
    );
    cluster.build(&Strata::new(), ctx.path(), &[]);
}

#[test]
fn a_dead_first_coordinator_stalls_no_client_and_status_lists_it_unreachable() {
    let cluster = Cluster::start_group(3, 1, 2);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nRUN echo cached > /c\nCMD [\"cat\", \"/c\"]\n",
        )],
    );
    let client = Strata::new();
    let first = cluster.build(&client, ctx.path(), &["-t", "first:1"]);
    assert_eq!(runs(&first), 1, "{first}");
    let timed = |tag: &str| {
        let start = Instant::now();
        let report = cluster.build(&client, ctx.path(), &["-t", tag]);
        assert_eq!(runs(&report), 0, "{report}");
        start.elapsed()
    };
    let all_up = timed("cached:1");

    // The first coordinator client.toml lists goes away without a word.
    let listed: Vec<String> = {
        let text = std::fs::read_to_string(cluster.client()).unwrap();
        let list = text
            .split("coordinators = [")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .unwrap()
            .to_string();
        list.split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let first_name = cluster
        .coordinator_names()
        .into_iter()
        .find(|n| {
            std::fs::read_to_string(cluster.path().join(format!("{n}.toml")))
                .unwrap()
                .contains(&format!("listen = \"{}\"", listed[0]))
        })
        .unwrap();
    cluster.kill(&first_name);
    // Once the others have a leader (an election, when the dead one led),
    // a fully cached build works without waiting on the dead one.
    cluster.wait_for(Duration::from_secs(30), |s| {
        s.lines()
            .any(|l| l.starts_with("coordinator-") && l.split_whitespace().nth(2) == Some("leader"))
    });
    let one_down = timed("cached:2");
    let again = timed("cached:3");
    eprintln!(
        "fully cached build: {all_up:?} with all coordinators up, {one_down:?} and {again:?} with {first_name} ({}) down",
        listed[0]
    );

    // Status names it unreachable, in the table and in JSON.
    let table = cluster.status();
    let row = table
        .lines()
        .find(|l| l.contains(&listed[0]))
        .unwrap_or_else(|| panic!("{} not listed:\n{table}", listed[0]));
    assert!(row.contains("unreachable"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&cluster.ok(&[
        "cluster",
        "status",
        "--format",
        "json",
        "--cluster",
        cluster.client().to_str().unwrap(),
    ]))
    .unwrap();
    let coordinators = json["coordinators"].as_array().unwrap();
    assert_eq!(coordinators.len(), 3, "{json}");
    assert_eq!(coordinators[0]["address"], listed[0].as_str(), "{json}");
    assert_eq!(coordinators[0]["state"], "unreachable", "{json}");
    assert!(coordinators[0]["pid"].is_null(), "{json}");
    let states: Vec<&str> = coordinators[1..]
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    assert!(states.contains(&"leader"), "{json}");
    assert_eq!(json["workers"][0]["state"], "up", "{json}");
    assert!(json["cache_entries"].as_u64().unwrap() >= 1, "{json}");
    // The leader is the coordinator the next command tries first.
    let leader = coordinators
        .iter()
        .find(|c| c["state"] == "leader")
        .unwrap()["address"]
        .as_str()
        .unwrap()
        .to_string();
    let remembered =
        std::fs::read_to_string(cluster.path().join(".client.toml.coordinator")).unwrap();
    assert_eq!(remembered.trim(), leader);
}

#[test]
fn two_hundred_builds_leave_every_store_within_its_bounds() {
    const KEEP: u64 = 16 << 20;
    const BUILDS: usize = 200;
    const AT_ONCE: usize = 4;
    let cluster = Cluster::start_with(1, 2, &[]);
    // Every node bounded: the workers' layers, the coordinator's contexts.
    cluster.kill("coordinator");
    for w in cluster.worker_names() {
        cluster.kill(&w);
        set_worker(&cluster, &w, "keep_storage", &KEEP.to_string());
    }
    set_worker(&cluster, "coordinator", "keep_storage", &KEEP.to_string());
    cluster.up();
    // Each build its own context and a 400 kB layer of its own: 80 MB of
    // layers, on both workers, through stores that keep 16.
    let client = cluster.client();
    let started = Instant::now();
    for batch in 0..BUILDS / AT_ONCE {
        let running: Vec<_> = (0..AT_ONCE)
            .map(|k| {
                let i = batch * AT_ONCE + k;
                let ctx = tempfile::tempdir().unwrap();
                write_files(
                    ctx.path(),
                    &[
                        (
                            "Dockerfile",
                            "FROM busybox:latest\nCOPY seed /seed\n\
                             RUN head -c 400000 /dev/urandom > /blob\n",
                        ),
                        ("seed", &format!("build {i}\n")),
                    ],
                );
                let s = Strata::new();
                let child = s
                    .cmd()
                    .args(["build", "--cluster"])
                    .arg(&client)
                    .args(["--progress", "quiet"])
                    .arg(ctx.path())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                (ctx, s, child)
            })
            .collect();
        for (_ctx, _s, child) in running {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    eprintln!("{BUILDS} builds in {:.1?}", started.elapsed());
    // Once the last layers are past their grace, every store is back
    // within its bound.
    cluster.wait_for(Duration::from_secs(60), |_| {
        let held: Vec<u64> = ["coordinator", "worker-1", "worker-2"]
            .iter()
            .map(|n| cluster.blob_bytes(n))
            .collect();
        eprintln!("held {held:?}");
        held.iter().all(|&b| b <= KEEP)
    });
    // Each worker keeps at most two written-out contexts, and nothing
    // else of the builds lingers in its scratch space.
    for w in cluster.worker_names() {
        let scratch: Vec<_> = std::fs::read_dir(cluster.worker_home(&w).join("tmp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(scratch.len() <= 2, "{w}: {scratch:?}");
    }
    // And the cluster still builds, from what it kept (a stage whose
    // base layer went meanwhile starts over where it is).
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM busybox:latest\nRUN echo after > /a\n")],
    );
    let s = Strata::new();
    let out = s.run(&[
        "build",
        "--cluster",
        client.to_str().unwrap(),
        "-o",
        "type=image",
        "-t",
        "after:1",
        ctx.path().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.ok(&["run", "--rm", "after:1", "cat", "/a"]), "after\n");
}
