//! A cluster's files (`strata cluster init`) and a cluster of processes
//! on this machine (`strata cluster up --local N`, `strata cluster down`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_net::{ClusterCa, Role};

use crate::config::{ClientConfig, CoordinatorConfig, TlsFiles, WorkerConfig, write};

/// The port the coordinator of a local cluster listens on; workers take
/// the ones after it.
pub const DEFAULT_BASE_PORT: u16 = 7400;

fn tls(name: &str) -> TlsFiles {
    TlsFiles {
        ca: "ca.pem".into(),
        cert: format!("{name}.pem").into(),
        key: format!("{name}-key.pem").into(),
    }
}

fn worker_name(i: usize) -> String {
    format!("worker-{i}")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

/// Makes (or completes) a cluster's files in `dir`: the CA, certificates
/// for a coordinator, `workers` workers and a client, and their configs on
/// 127.0.0.1 from `base_port` up. Existing files are kept.
pub fn init(dir: &Path, workers: usize, base_port: u16) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let ca = if dir.join("ca-key.pem").exists() {
        ClusterCa::load(dir).map_err(|e| e.to_string())?
    } else {
        let name = format!(
            "strata cluster {}",
            dir.canonicalize()
                .unwrap_or_else(|_| dir.to_path_buf())
                .display()
        );
        let ca = ClusterCa::create(&name).map_err(|e| e.to_string())?;
        ca.save(dir).map_err(|e| e.to_string())?;
        ca
    };
    let mut written = Vec::new();
    let coordinator: SocketAddr = ([127, 0, 0, 1], base_port).into();
    let issue = |role: Role, name: &str| -> Result<(), String> {
        if !dir.join(format!("{name}.pem")).exists() {
            ca.issue(role, name)
                .and_then(|id| id.save(dir, name))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    issue(Role::Coordinator, "coordinator")?;
    issue(Role::Client, "client")?;
    for i in 1..=workers {
        issue(Role::Worker, &worker_name(i))?;
    }
    let path = dir.join("coordinator.toml");
    if !path.exists() {
        write(
            &path,
            "# A strata coordinator: `strata coordinator --config coordinator.toml`.\n\
             # listen: where workers and clients reach it (QUIC over UDP). home: its state\n\
             # directory. lease_seconds: how long a silent worker keeps its stages.\n\
             # Overrides: STRATA_LISTEN, STRATA_HOME, STRATA_LEASE_SECONDS.",
            &CoordinatorConfig {
                listen: coordinator,
                home: "state/coordinator".into(),
                lease_seconds: 5,
                tls: tls("coordinator"),
            },
        )
        .map_err(|e| e.to_string())?;
        written.push(path);
    }
    for i in 1..=workers {
        let name = worker_name(i);
        let path = dir.join(format!("{name}.toml"));
        if path.exists() {
            continue;
        }
        let port = base_port
            .checked_add(u16::try_from(i).unwrap_or(u16::MAX))
            .ok_or_else(|| format!("no port left after {base_port} for {name}"))?;
        write(
            &path,
            "# A strata worker: `strata worker --config FILE`.\n\
             # coordinator: the coordinator it serves. listen: where peers fetch its\n\
             # blobs (advertise: the address they dial, if not listen). home: its state\n\
             # directory. slots: steps it runs at once.\n\
             # Overrides: STRATA_COORDINATOR, STRATA_LISTEN, STRATA_ADVERTISE,\n\
             # STRATA_HOME, STRATA_SLOTS. config/ has every setting explained.",
            &WorkerConfig {
                coordinator: coordinator.into(),
                listen: ([127, 0, 0, 1], port).into(),
                advertise: None,
                home: format!("state/{name}").into(),
                slots: 2,
                tls: tls(&name),
            },
        )
        .map_err(|e| e.to_string())?;
        written.push(path);
    }
    let path = dir.join("client.toml");
    if !path.exists() {
        write(
            &path,
            "# For clients: `strata build --cluster client.toml` (or STRATA_CLUSTER).\n\
             # coordinators: tried in order.",
            &ClientConfig {
                coordinators: vec![coordinator.into()],
                tls: tls("client"),
            },
        )
        .map_err(|e| e.to_string())?;
        written.push(path);
    }
    Ok(written)
}

/// Starts a coordinator and `workers` workers from `dir` (made with
/// [`init`] if needed) as background processes of `exe`, logs in
/// `dir/logs`, pids in `dir/NAME.pid`; returns once the coordinator sees
/// every worker, or fails after `wait`.
pub async fn up(exe: &Path, dir: &Path, workers: usize, wait: Duration) -> Result<(), String> {
    init(dir, workers, DEFAULT_BASE_PORT)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(io(&logs))?;
    let mut names = vec![("coordinator".to_string(), "coordinator")];
    names.extend((1..=workers).map(|i| (worker_name(i), "worker")));
    for (name, role) in &names {
        let pid_file = dir.join(format!("{name}.pid"));
        if let Some(pid) = read_pid(&pid_file)
            && alive(pid)
        {
            continue;
        }
        let log_path = logs.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).map_err(io(&log_path))?;
        let err = log.try_clone().map_err(io(&log_path))?;
        use std::os::unix::process::CommandExt as _;
        let child = Command::new(exe)
            .arg(role)
            .arg("--config")
            .arg(dir.join(format!("{name}.toml")))
            .env_remove("STRATA_HOME")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            // Its own process group: a Ctrl-C at the terminal that ran
            // `cluster up` does not reach it.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        std::fs::write(&pid_file, child.id().to_string()).map_err(io(&pid_file))?;
    }
    let client = ClientConfig::load(&dir.join("client.toml")).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < wait {
        match crate::client::Client::connect(&client).await {
            Ok(c) => match c.status().await {
                Ok(s) if s.workers.iter().filter(|w| w.alive).count() >= workers => return Ok(()),
                Ok(s) => {
                    last = format!(
                        "{} of {workers} workers registered",
                        s.workers.iter().filter(|w| w.alive).count()
                    );
                }
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "the cluster in {} did not come up within {}s ({last}); see {}",
        dir.display(),
        wait.as_secs(),
        logs.display()
    ))
}

/// Stops the processes [`up`] started in `dir`: SIGTERM, then SIGKILL for
/// any still running after `grace`. Returns the names stopped.
pub fn down(dir: &Path, grace: Duration) -> Result<Vec<String>, String> {
    let mut stopped = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(io(dir))?;
    let mut pids = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "pid")
            && let Some(pid) = read_pid(&path)
        {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            pids.push((name, pid, path));
        }
    }
    for (_, pid, _) in &pids {
        signal(*pid, nix::sys::signal::Signal::SIGTERM);
    }
    let start = Instant::now();
    while pids.iter().any(|(_, p, _)| alive(*p)) && start.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (name, pid, path) in pids {
        if alive(pid) {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = std::fs::remove_file(&path);
        stopped.push(name);
    }
    stopped.sort();
    Ok(stopped)
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// Whether `pid` runs (and is not a zombie waiting to be reaped).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}
