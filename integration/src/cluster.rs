//! A cluster of real `strata` processes on 127.0.0.1 for one test, made
//! and started the way a user does it (`strata cluster init`, `strata
//! cluster up --local N`), stopped when dropped.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{COMMAND_LIMIT, Strata, busybox_tar, run_bounded, strata_bin, succeed};

/// A running local cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    workers: usize,
    coordinators: usize,
}

/// `n + 1` consecutive free UDP ports on 127.0.0.1, the first returned.
fn free_ports(n: usize) -> u16 {
    // Tests run side by side in one process: each call starts elsewhere.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    for attempt in 0..200u32 {
        let seed = std::process::id()
            .wrapping_mul(7919)
            .wrapping_add((call * 200 + attempt).wrapping_mul(104_729));
        let base = 20_000 + (seed % 40_000) as u16;
        // Nodes listen on UDP, and serve metrics on TCP, on each port.
        let all_free = (0..=n as u16).all(|i| {
            UdpSocket::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()
        });
        if all_free {
            return base;
        }
    }
    panic!("no {} consecutive free UDP ports", n + 1)
}

impl Cluster {
    /// A coordinator (with busybox:latest in its store, and the given
    /// worker lease) and `workers` workers.
    pub fn start(workers: usize, lease_seconds: u64) -> Cluster {
        Cluster::start_group(1, workers, lease_seconds)
    }

    /// `coordinators` coordinators replicating the cache index (each with
    /// busybox:latest in its store, and the given worker lease) and
    /// `workers` workers.
    pub fn start_group(coordinators: usize, workers: usize, lease_seconds: u64) -> Cluster {
        Cluster::start_with(
            coordinators,
            workers,
            &[("lease_seconds", lease_seconds.to_string())],
        )
    }

    /// `coordinators` coordinators and `workers` workers, the
    /// coordinators' `settings` (name, value) changed from what `cluster
    /// init` writes; a name `section.key` is set at the top of that
    /// section.
    pub fn start_with(coordinators: usize, workers: usize, settings: &[(&str, String)]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("strata-cluster-")
            .tempdir()
            .unwrap();
        let c = Cluster {
            dir,
            workers,
            coordinators,
        };
        // Coordinators, workers, the coordinators' Raft ports, then their
        // image endpoints.
        let port = free_ports(3 * coordinators + workers - 1).to_string();
        c.ok(&[
            "cluster",
            "init",
            "--dir",
            c.path().to_str().unwrap(),
            "--workers",
            &workers.to_string(),
            "--coordinators",
            &coordinators.to_string(),
            "--base-port",
            &port,
        ]);
        for name in c.coordinator_names() {
            let config = c.path().join(format!("{name}.toml"));
            let text: String = std::fs::read_to_string(&config)
                .unwrap()
                .lines()
                .map(|line| {
                    let set = settings
                        .iter()
                        .find(|(name, _)| line.starts_with(&format!("{name} = ")));
                    let in_section: String = settings
                        .iter()
                        .filter_map(|(name, value)| {
                            let (section, key) = name.split_once('.')?;
                            (line == format!("[{section}]")).then(|| format!("{key} = {value}\n"))
                        })
                        .collect();
                    match set {
                        Some((name, value)) => format!("{name} = {value}\n"),
                        None => format!("{line}\n{in_section}"),
                    }
                })
                .collect();
            std::fs::write(&config, text).unwrap();
            succeed(
                Command::new(strata_bin())
                    .env("STRATA_HOME", c.path().join("state").join(&name))
                    .args(["image", "import", "busybox:latest"])
                    .arg(busybox_tar()),
            );
        }
        c.up();
        c
    }

    /// Starts whatever of the cluster is not running (all of it, first).
    pub fn up(&self) {
        // Nodes log what they do for each build (naming it by its id).
        let log = std::env::var("STRATA_LOG").unwrap_or_else(|_| "info".into());
        succeed(Command::new(strata_bin()).env("STRATA_LOG", log).args([
            "cluster",
            "up",
            "--local",
            &self.workers.to_string(),
            "--coordinators",
            &self.coordinators.to_string(),
            "--dir",
            self.path().to_str().unwrap(),
        ]));
    }

    /// Where node `name` serves its metrics: 127.0.0.1 on the TCP port of
    /// the number it listens on.
    pub fn metrics_addr(&self, name: &str) -> std::net::SocketAddr {
        let config = std::fs::read_to_string(self.path().join(format!("{name}.toml"))).unwrap();
        let listen = config
            .lines()
            .find_map(|l| l.strip_prefix("listen = "))
            .unwrap()
            .trim_matches('"');
        let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
        ([127, 0, 0, 1], port).into()
    }

    /// Where coordinator `name` serves the cluster's images (its
    /// `[registry] listen`).
    pub fn registry_addr(&self, name: &str) -> std::net::SocketAddr {
        let config = std::fs::read_to_string(self.path().join(format!("{name}.toml"))).unwrap();
        let section = config.split("\n[registry]\n").nth(1).unwrap();
        section
            .lines()
            .find_map(|l| l.strip_prefix("listen = "))
            .unwrap()
            .trim_matches('"')
            .parse()
            .unwrap()
    }

    /// `skopeo copy` of the cluster's image `name` from coordinator
    /// `coordinator`'s image endpoint into the OCI layout `layout`, as
    /// `tag`: fails the test unless it succeeds.
    pub fn copy_with_skopeo(&self, coordinator: &str, name: &str, layout: &Path, tag: &str) {
        let from = format!("docker://{}/{name}", self.registry_addr(coordinator));
        succeed(
            Command::new("skopeo")
                .args(["copy", "--src-tls-verify=false", &from])
                .arg(format!("oci:{}:{tag}", layout.display())),
        );
    }

    /// What node `name` has logged.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join("logs").join(format!("{name}.log")))
            .unwrap_or_default()
    }

    /// The coordinators' names.
    pub fn coordinator_names(&self) -> Vec<String> {
        if self.coordinators == 1 {
            vec!["coordinator".into()]
        } else {
            (1..=self.coordinators)
                .map(|j| format!("coordinator-{j}"))
                .collect()
        }
    }

    /// `strata build --cluster` from `s`'s state directory: fails the
    /// test unless it succeeds; returns its `--report`.
    pub fn build(&self, s: &Strata, ctx: &Path, extra: &[&str]) -> serde_json::Value {
        self.build_via(&self.client(), s, ctx, extra)
    }

    /// [`Cluster::build`] with the client configuration `client`.
    pub fn build_via(
        &self,
        client: &Path,
        s: &Strata,
        ctx: &Path,
        extra: &[&str],
    ) -> serde_json::Value {
        self.build_showing(client, s, ctx, extra).0
    }

    /// [`Cluster::build_via`], returning the build's progress output too.
    /// The image is fetched into `s`'s local store (`-o type=image`).
    pub fn build_showing(
        &self,
        client: &Path,
        s: &Strata,
        ctx: &Path,
        extra: &[&str],
    ) -> (serde_json::Value, String) {
        let mut args = vec!["--output", "type=image"];
        args.extend_from_slice(extra);
        self.build_leaving(client, s, ctx, &args)
    }

    /// A build whose image stays in the cluster unless `extra` asks for an
    /// output: its `--report` and progress output.
    pub fn build_leaving(
        &self,
        client: &Path,
        s: &Strata,
        ctx: &Path,
        extra: &[&str],
    ) -> (serde_json::Value, String) {
        let report = s.home().join("report.json");
        let mut args = vec![
            "build",
            "--cluster",
            client.to_str().unwrap(),
            "--progress",
            "plain",
            "--report",
            report.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push(ctx.to_str().unwrap());
        let out = s.run(&args);
        let progress = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{progress}");
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        // Progress names the worker of every step that ran, as it starts.
        let ran = report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["cached"] == false && !s["instruction"].as_str().unwrap().starts_with("FROM")
            })
            .count();
        let named = progress
            .lines()
            .filter(|l| l.starts_with('#') && l.contains(" on worker-"))
            .count();
        assert_eq!(named, ran, "{progress}");
        (report, progress.into_owned())
    }

    /// Starts `strata build --cluster … --report REPORT EXTRA… CTX` from
    /// `client`'s state directory in the background, its stderr piped; the
    /// report lands in the client's home.
    pub fn spawn_build(&self, client: &Strata, ctx: &Path, extra: &[&str]) -> Child {
        let report = client.home().join("report.json");
        client
            .cmd()
            .args(["build", "--cluster", self.client().to_str().unwrap()])
            .args(["--progress", "plain", "--report", report.to_str().unwrap()])
            .args(["--output", "type=image"])
            .args(extra)
            .arg(ctx)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The cluster's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `client.toml`.
    pub fn client(&self) -> PathBuf {
        self.path().join("client.toml")
    }

    /// Its administrator's configuration (cordon, the group's members).
    pub fn admin(&self) -> PathBuf {
        self.path().join("admin.toml")
    }

    /// The pid of node `name` (`coordinator`, `worker-2`).
    pub fn pid(&self, name: &str) -> i32 {
        std::fs::read_to_string(self.path().join(format!("{name}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Kills node `name` (`coordinator-2`, `worker-1`) with SIGKILL: no
    /// goodbye to its peers, nothing flushed.
    pub fn kill(&self, name: &str) {
        let killed = Command::new("kill")
            .args(["-9", &self.pid(name).to_string()])
            .status()
            .unwrap();
        assert!(killed.success(), "kill -9 {name} failed");
    }

    /// A worker's state directory.
    pub fn worker_home(&self, name: &str) -> PathBuf {
        self.path().join("state").join(name)
    }

    /// The workers' names.
    pub fn worker_names(&self) -> Vec<String> {
        (1..=self.workers).map(|i| format!("worker-{i}")).collect()
    }

    /// Runs `strata ARGS` (no state directory of its own).
    pub fn run(&self, args: &[&str]) -> Output {
        run_bounded(Command::new(strata_bin()).args(args), COMMAND_LIMIT)
    }

    /// Runs `strata ARGS`, failing the test unless it fails; returns
    /// what it said on stderr.
    pub fn refused(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "`strata {}` was not refused:\n{err}",
            args.join(" ")
        );
        err
    }

    /// Runs `strata ARGS`, failing the test unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        succeed(Command::new(strata_bin()).args(args))
    }

    /// `strata cluster status` for this cluster.
    pub fn status(&self) -> String {
        self.ok(&[
            "cluster",
            "status",
            "--cluster",
            self.client().to_str().unwrap(),
        ])
    }

    /// Waits until `check(status)` holds, up to `limit`.
    pub fn wait_for(&self, limit: Duration, check: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.status();
            if check(&s) {
                return s;
            }
            assert!(start.elapsed() < limit, "gave up waiting; status:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The line of `strata cluster status` on copies of built layers:
    /// (copies wanted, layers short of them).
    pub fn replication(status: &str) -> Option<(usize, usize)> {
        let line = status.lines().find(|l| l.starts_with("replication: "))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let number_before = |w: &str| {
            let i = words.iter().position(|x| *x == w)?;
            words.get(i.checked_sub(1)?)?.parse().ok()
        };
        Some((number_before("copies")?, number_before("layers")?))
    }

    /// Files in a node's content store (blobs too large to be kept
    /// inline in its database).
    pub fn blob_files(&self, name: &str) -> usize {
        let blobs = self.path().join("state").join(name).join("content/blobs");
        std::fs::read_dir(blobs)
            .map(|shards| {
                shards
                    .flatten()
                    .map(|s| std::fs::read_dir(s.path()).map_or(0, |f| f.count()))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Bytes of blob files in a node's content store (blobs kept inline in
    /// its database are not counted).
    pub fn blob_bytes(&self, name: &str) -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        // A blob evicted meanwhile counts for nothing.
                        .map(|e| match e.metadata() {
                            Ok(m) if m.is_dir() => walk(&e.path()),
                            Ok(m) => m.len(),
                            Err(_) => 0,
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(&self.path().join("state").join(name).join("content/blobs"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(strata_bin())
            .args(["cluster", "down", "--dir"])
            .arg(self.dir.path())
            .output();
        // A worker killed on purpose leaves its sandbox's mount, which its
        // next start would clear; this one does not start again.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root = self.dir.path().to_string_lossy().into_owned();
        for target in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
            if target.starts_with(&root) {
                let _ = Command::new("umount").args(["-l", target]).status();
            }
        }
    }
}

/// Steps of a build report that ran a `RUN` (were not cached).
pub fn runs(report: &serde_json::Value) -> usize {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            !s["cached"].as_bool().unwrap() && s["instruction"].as_str().unwrap().starts_with("RUN")
        })
        .count()
}

/// The worker `cluster status` shows running `steps` steps, if any.
pub fn worker_running(status: &str, steps: usize) -> Option<String> {
    status
        .lines()
        .filter(|l| l.starts_with("worker-"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.get(4) == Some(&steps.to_string().as_str()))
        .map(|cols| cols[0].to_string())
}

/// What the `context:` line of a cluster build's progress says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextLine {
    /// Entries in the context.
    pub entries: u64,
    /// Bytes read to hash it, as printed (`0B`, `4.11kB`).
    pub read: String,
    /// Bytes sent, as printed.
    pub sent: String,
    /// Blobs sent.
    pub blobs: u64,
}

/// Finds and reads the line `context: E entries, S in F distinct files;
/// read R, sent B in N blobs` in a cluster build's progress.
pub fn context_line(progress: &str) -> ContextLine {
    let line = progress
        .lines()
        .find(|l| l.starts_with("context: "))
        .unwrap_or_else(|| panic!("no context line in:\n{progress}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |w: &str| {
        let i = words.iter().position(|x| *x == w).unwrap();
        words[i + 1].trim_end_matches(',').to_string()
    };
    ContextLine {
        entries: words[1].parse().unwrap(),
        read: after("read"),
        sent: after("sent"),
        blobs: words[words.len() - 2].parse().unwrap(),
    }
}
