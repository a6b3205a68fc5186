//! A cluster's files (`strata cluster init`) and a cluster of processes
//! on this machine (`strata cluster up --local N`, `strata cluster down`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_net::{ClusterCa, Role};

use crate::config::{
    ClientConfig, CoordinatorConfig, GroupMember, NodeAddress, TlsFiles, WorkerConfig, write,
};

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

/// What goes wrong making a cluster's files or running one locally.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A file or directory could not be made, read or written.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// To what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA or a certificate could not be made, read or saved.
    #[error("the cluster's certificates in {}", dir.display())]
    Certificates {
        /// The cluster directory.
        dir: PathBuf,
        /// Why.
        source: Box<strata_net::Error>,
    },
    /// A configuration file could not be read or written.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The ports from the base port run past 65535.
    #[error("no port {offset} above {base}")]
    Port {
        /// How far above the base.
        offset: usize,
        /// The base port.
        base: u16,
    },
    /// `add-client` without a CA key to issue from.
    #[error("{} holds no cluster CA key (ca-key.pem): make one with `strata cluster init --dir {}`", dir.display(), dir.display())]
    NoCa {
        /// The cluster directory.
        dir: PathBuf,
    },
    /// `add-client` with a name already issued.
    #[error("{} exists: {name} is taken (pick another name, or remove the old files to reissue it)", path.display())]
    Taken {
        /// The client's name.
        name: String,
        /// Its file that exists.
        path: PathBuf,
    },
    /// A node process could not be started.
    #[error("cannot start {name}")]
    Start {
        /// The node.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// The nodes did not all register in time.
    #[error("the cluster in {} did not come up within {}s ({last}); see {}", dir.display(), waited.as_secs(), logs.display())]
    NotUp {
        /// The cluster directory.
        dir: PathBuf,
        /// How long it was given.
        waited: Duration,
        /// What was seen last.
        last: String,
        /// The nodes' logs.
        logs: PathBuf,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LocalError {
    let path = path.to_path_buf();
    move |source| LocalError::Io { what, path, source }
}

fn certificates(dir: &Path) -> impl FnOnce(strata_net::Error) -> LocalError {
    let dir = dir.to_path_buf();
    move |source| LocalError::Certificates {
        dir,
        source: Box::new(source),
    }
}

/// The names of a local cluster's coordinators: `coordinator` alone, or
/// `coordinator-1` … `coordinator-N` in a group.
pub fn coordinator_names(coordinators: usize) -> Vec<String> {
    if coordinators <= 1 {
        vec!["coordinator".to_string()]
    } else {
        (1..=coordinators)
            .map(|j| format!("coordinator-{j}"))
            .collect()
    }
}

/// The ports of a local cluster from `base`: coordinators first, then
/// workers, then the coordinators' Raft ports.
struct Ports {
    base: u16,
    coordinators: usize,
    workers: usize,
}

impl Ports {
    fn at(&self, offset: usize) -> Result<u16, LocalError> {
        u16::try_from(offset)
            .ok()
            .and_then(|o| self.base.checked_add(o))
            .ok_or(LocalError::Port {
                offset,
                base: self.base,
            })
    }

    fn coordinator(&self, j: usize) -> Result<SocketAddr, LocalError> {
        Ok(([127, 0, 0, 1], self.at(j - 1)?).into())
    }

    fn worker(&self, i: usize) -> Result<SocketAddr, LocalError> {
        Ok(([127, 0, 0, 1], self.at(self.coordinators - 1 + i)?).into())
    }

    /// Its image endpoint (TCP).
    fn registry(&self, j: usize) -> Result<SocketAddr, LocalError> {
        Ok((
            [127, 0, 0, 1],
            self.at(2 * self.coordinators + self.workers + j - 1)?,
        )
            .into())
    }

    fn raft(&self, j: usize) -> Result<SocketAddr, LocalError> {
        Ok((
            [127, 0, 0, 1],
            self.at(self.coordinators + self.workers + j - 1)?,
        )
            .into())
    }
}

/// Makes (or completes) a cluster's files in `dir`: the CA, certificates
/// for `coordinators` coordinators, `workers` workers and a client, and
/// their configs on 127.0.0.1 from `base_port` up. Existing files are
/// kept.
pub fn init(
    dir: &Path,
    workers: usize,
    coordinators: usize,
    base_port: u16,
    hosts: &[String],
) -> Result<Vec<PathBuf>, LocalError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let ca = if dir.join("ca-key.pem").exists() {
        ClusterCa::load(dir).map_err(certificates(dir))?
    } else {
        let name = format!(
            "strata cluster {}",
            dir.canonicalize()
                .unwrap_or_else(|_| dir.to_path_buf())
                .display()
        );
        let ca = ClusterCa::create(&name).map_err(certificates(dir))?;
        ca.save(dir).map_err(certificates(dir))?;
        ca
    };
    let ports = Ports {
        base: base_port,
        coordinators: coordinators.max(1),
        workers,
    };
    let names = coordinator_names(coordinators);
    let mut written = Vec::new();
    // Coordinators serve images over HTTPS to engines that check the
    // host they dialed: their certificates name it.
    let mut served_at: Vec<String> = vec!["127.0.0.1".into(), "localhost".into()];
    served_at.extend(hosts.iter().cloned());
    let issue = |role: Role, name: &str| -> Result<(), LocalError> {
        if !dir.join(format!("{name}.pem")).exists() {
            let hosts: &[String] = if role == Role::Coordinator {
                &served_at
            } else {
                &[]
            };
            ca.issue_for(role, name, hosts)
                .and_then(|id| id.save(dir, name))
                .map_err(certificates(dir))?;
        }
        Ok(())
    };
    for name in &names {
        issue(Role::Coordinator, name)?;
    }
    issue(Role::Client, "client")?;
    issue(Role::Admin, "admin")?;
    for i in 1..=workers {
        issue(Role::Worker, &worker_name(i))?;
    }
    let group: Vec<GroupMember> = if names.len() > 1 {
        (1..=names.len())
            .map(|j| {
                Ok(GroupMember {
                    id: j as u64,
                    raft: ports.raft(j)?,
                })
            })
            .collect::<Result<_, LocalError>>()?
    } else {
        Vec::new()
    };
    let mut all_coordinators = Vec::new();
    for (j, name) in (1..).zip(&names) {
        all_coordinators.push(NodeAddress::from(ports.coordinator(j)?));
        let path = dir.join(format!("{name}.toml"));
        if path.exists() {
            continue;
        }
        write(
            &path,
            "# A strata coordinator: `strata coordinator --config FILE`.\n\
             # listen: where workers and clients reach it (QUIC over UDP). home: its state\n\
             # directory. lease_seconds: how long a silent worker keeps its stages. id,\n\
             # raft_listen, group: its place in the group replicating the cache index.\n\
             # replication: workers each built layer is kept on; repair_mib_per_second:\n\
             # how fast lost copies are made again. [registry] listen: where it serves\n\
             # the cluster's images (`docker pull 127.0.0.1:PORT/app:1`).\n\
             # Overrides: STRATA_LISTEN, STRATA_HOME, STRATA_LEASE_SECONDS,\n\
             # STRATA_RAFT_LISTEN, STRATA_REPLICATION, STRATA_REPAIR_MIB_PER_SECOND,\n\
             # STRATA_REGISTRY_LISTEN.\n\
             # config/ has every setting explained.",
            &CoordinatorConfig {
                listen: ports.coordinator(j)?,
                home: format!("state/{name}").into(),
                lease_seconds: 5,
                id: j as u64,
                raft_listen: ports.raft(j)?,
                group: group.clone(),
                replication: CoordinatorConfig::DEFAULT_REPLICATION,
                repair_mib_per_second: CoordinatorConfig::DEFAULT_REPAIR_RATE,
                upload_quota_mib_per_hour: CoordinatorConfig::DEFAULT_UPLOAD_QUOTA,
                keep_storage: None,
                keep_duration: None,
                metrics: crate::config::MetricsConfig::on(),
                registry: crate::config::RegistryConfig {
                    listen: Some(ports.registry(j)?),
                    tls: None,
                },
                tls: tls(name),
            },
        )?;
        written.push(path);
    }
    for i in 1..=workers {
        let name = worker_name(i);
        let path = dir.join(format!("{name}.toml"));
        if path.exists() {
            continue;
        }
        write(
            &path,
            "# A strata worker: `strata worker --config FILE`.\n\
             # coordinator: the coordinator it serves. listen: where peers fetch its\n\
             # blobs (advertise: the address they dial, if not listen). home: its state\n\
             # directory. slots: steps it runs at once.\n\
             # Overrides: STRATA_COORDINATOR, STRATA_LISTEN, STRATA_ADVERTISE,\n\
             # STRATA_HOME, STRATA_SLOTS. config/ has every setting explained.",
            &WorkerConfig {
                coordinators: all_coordinators.clone(),
                listen: ports.worker(i)?,
                advertise: None,
                home: format!("state/{name}").into(),
                slots: 2,
                insecure_entitlements: Vec::new(),
                emulation: true,
                keep_storage: None,
                keep_duration: None,
                metrics: crate::config::MetricsConfig::on(),
                tls: tls(&name),
            },
        )?;
        written.push(path);
    }
    let path = dir.join("client.toml");
    if !path.exists() {
        write(
            &path,
            "# For clients: `strata build --cluster client.toml` (or STRATA_CLUSTER).\n\
             # coordinators: all dialled at once; the first to answer (the leader when known) serves.",
            &ClientConfig {
                coordinators: all_coordinators.clone(),
                tls: tls("client"),
                memory: None,
            },
        )?;
        written.push(path);
    }
    let path = dir.join("admin.toml");
    if !path.exists() {
        write(
            &path,
            "# For administrators: `strata cluster cordon|uncordon|add-coordinator|remove-coordinator --cluster admin.toml`.\n\
             # Keep it (and admin-key.pem) off build machines.",
            &ClientConfig {
                coordinators: all_coordinators,
                tls: tls("admin"),
                memory: None,
            },
        )?;
        written.push(path);
    }
    Ok(written)
}

/// Issues a client certificate named `name` from the CA in `dir` (made by
/// [`init`]) and writes `NAME.toml`, a client configuration with the
/// coordinators of `dir/client.toml`. Each team given its own name reads
/// only its own builds' blobs and has an upload quota of its own. Returns
/// the files written.
pub fn add_client(dir: &Path, name: &str) -> Result<Vec<PathBuf>, LocalError> {
    if !dir.join("ca-key.pem").exists() {
        return Err(LocalError::NoCa {
            dir: dir.to_path_buf(),
        });
    }
    let config = dir.join(format!("{name}.toml"));
    let cert = dir.join(format!("{name}.pem"));
    for taken in [&config, &cert] {
        if taken.exists() {
            return Err(LocalError::Taken {
                name: name.to_string(),
                path: taken.clone(),
            });
        }
    }
    let base = dir.join("client.toml");
    let coordinators = ClientConfig::load(&base)?.coordinators;
    let ca = ClusterCa::load(dir).map_err(certificates(dir))?;
    ca.issue(Role::Client, name)
        .and_then(|id| id.save(dir, name))
        .map_err(certificates(dir))?;
    write(
        &config,
        &format!("# For client {name}: `strata build --cluster {name}.toml` (or STRATA_CLUSTER)."),
        &ClientConfig {
            coordinators,
            tls: tls(name),
            memory: None,
        },
    )?;
    Ok(vec![cert, dir.join(format!("{name}-key.pem")), config])
}

/// Starts `coordinators` coordinators and `workers` workers from `dir`
/// (made with [`init`] if needed) as background processes of `exe`, logs
/// in `dir/logs`, pids in `dir/NAME.pid`; those already running are left
/// alone. Returns once a coordinator sees every worker, or fails after
/// `wait`.
pub async fn up(
    exe: &Path,
    dir: &Path,
    workers: usize,
    coordinators: usize,
    wait: Duration,
) -> Result<(), LocalError> {
    init(dir, workers, coordinators, DEFAULT_BASE_PORT, &[])?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(io("create", &logs))?;
    let mut names: Vec<(String, &str)> = coordinator_names(coordinators)
        .into_iter()
        .map(|n| (n, "coordinator"))
        .collect();
    names.extend((1..=workers).map(|i| (worker_name(i), "worker")));
    for (name, role) in &names {
        let pid_file = dir.join(format!("{name}.pid"));
        if let Some(pid) = read_pid(&pid_file)
            && alive(pid)
        {
            continue;
        }
        let log_path = logs.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).map_err(io("create", &log_path))?;
        let err = log.try_clone().map_err(io("open", &log_path))?;
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
            .map_err(|source| LocalError::Start {
                name: name.clone(),
                source,
            })?;
        std::fs::write(&pid_file, child.id().to_string()).map_err(io("write", &pid_file))?;
    }
    let client = ClientConfig::load(&dir.join("client.toml"))?;
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < wait {
        match ready(&client).await {
            Ok(n) if n >= workers => return Ok(()),
            Ok(n) => last = format!("{n} of {workers} workers registered"),
            Err(e) => last = strata_registry::error_chain(&e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(LocalError::NotUp {
        dir: dir.to_path_buf(),
        waited: wait,
        last,
        logs,
    })
}

/// How many workers every coordinator has registered (a worker serves
/// them all): the fewest any of them has.
async fn ready(client: &ClientConfig) -> Result<usize, crate::client::ClientError> {
    let mut fewest = usize::MAX;
    for addr in &client.coordinators {
        let one = client.only(addr);
        let c = crate::client::Client::connect(&one).await?;
        let status = c.status().await?;
        fewest = fewest.min(status.workers.iter().filter(|w| w.alive).count());
    }
    Ok(fewest)
}

/// Stops the processes [`up`] started in `dir`: SIGTERM, then SIGKILL for
/// any still running after `grace`. Returns the names stopped.
pub fn down(dir: &Path, grace: Duration) -> Result<Vec<String>, LocalError> {
    let mut stopped = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(io("list", dir))?;
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
