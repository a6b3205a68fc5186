//! `strata coordinator`, `strata worker` and `strata cluster …`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use strata_cluster::client::{Client, ClientError};
use strata_cluster::config::{ClientConfig, CoordinatorConfig, WorkerConfig};
use strata_cluster::coordinator::Coordinator;
use strata_cluster::worker::WorkerNode;
use tokio_util::sync::CancellationToken;

use crate::registry::RegistryFlags;

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The node's configuration file.
    #[arg(long)]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make a cluster CA, certificates and configuration files.
    Init {
        /// Where to write them.
        #[arg(long)]
        dir: PathBuf,
        /// How many workers to make certificates and configs for.
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// How many coordinators (1, 3 or 5: a group of 3 survives losing
        /// one, of 5 two).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=7))]
        coordinators: u16,
        /// The first coordinator's port; the other coordinators, the
        /// workers and the coordinators' Raft ports take the ones after it.
        #[arg(long, default_value_t = strata_cluster::local::DEFAULT_BASE_PORT)]
        base_port: u16,
        /// A name or address clients reach the coordinators' image
        /// endpoints at (repeat for several): their certificates name it,
        /// beside 127.0.0.1 and localhost, so `docker pull` over HTTPS
        /// checks out.
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
    },
    /// Issue a client certificate of its own to a team (or a CI fleet):
    /// it reads only its own builds' blobs and has its own upload quota.
    AddClient {
        /// Its name (letters, digits, '-', '_', '.').
        name: String,
        /// The cluster's directory, with the CA key (`cluster init`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Start a coordinator and workers on this machine, in the background.
    Up {
        /// How many workers.
        #[arg(long = "local")]
        workers: usize,
        /// How many coordinators.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=7))]
        coordinators: u16,
        /// The cluster's directory (made if needed).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Stop what `cluster up` started.
    Down {
        /// The cluster's directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Show the coordinators, the workers and the cache.
    Status {
        /// The client configuration (`DIR/client.toml`).
        #[arg(long, env = "STRATA_CLUSTER")]
        cluster: PathBuf,
        /// `table` for people, `json` for scripts (the same fields).
        #[arg(long, value_enum, default_value = "table")]
        format: StatusFormat,
    },
    /// Place no new stages on a worker (it still serves its blobs and
    /// finishes the stages it has), e.g. before taking it down.
    Cordon {
        /// The worker's name.
        worker: String,
        /// The client configuration (`DIR/client.toml`).
        #[arg(long, env = "STRATA_CLUSTER")]
        cluster: PathBuf,
    },
    /// Add a coordinator (started with its config, not yet in the group)
    /// to the group replicating the cache index: it catches up, then
    /// votes.
    AddCoordinator {
        /// Its id (the `id` in its config).
        #[arg(long)]
        id: u64,
        /// Its `raft_listen` address, as the others reach it.
        #[arg(long)]
        raft: std::net::SocketAddr,
        /// The client configuration (`DIR/client.toml`).
        #[arg(long, env = "STRATA_CLUSTER")]
        cluster: PathBuf,
    },
    /// Remove a coordinator from the group (then stop it).
    RemoveCoordinator {
        /// Its id.
        #[arg(long)]
        id: u64,
        /// The client configuration (`DIR/client.toml`).
        #[arg(long, env = "STRATA_CLUSTER")]
        cluster: PathBuf,
    },
    /// Import a cache another machine exported (`strata build --cache-to`)
    /// into the cluster's shared index, so every client's builds hit it:
    /// needs the admin certificate (`DIR/admin.toml`), since what the
    /// index says every team's builds use.
    ImportCache(ImportCacheArgs),
    /// Where each node's bytes are: named images, cache, other blobs
    /// (layers, contexts), snapshots, and what eviction may reclaim.
    Du {
        /// The client configuration (`DIR/client.toml`).
        #[arg(long, env = "STRATA_CLUSTER")]
        cluster: PathBuf,
        /// `table` for people, `json` for scripts (the same fields).
        #[arg(long, value_enum, default_value = "table")]
        format: StatusFormat,
    },
    /// The images the cluster names (its builds' tags), which its
    /// coordinators serve over the OCI distribution API (`[registry]`).
    Images {
        /// The client configuration (`DIR/client.toml`).
        #[arg(long, env = "STRATA_CLUSTER")]
        cluster: PathBuf,
        /// `table` for people, `json` for scripts (the same fields).
        #[arg(long, value_enum, default_value = "table")]
        format: StatusFormat,
    },
    /// Drop image names from the cluster: their layers become cache that
    /// workers may evict.
    Rmi {
        /// The names (`app:1`).
        #[arg(required = true)]
        names: Vec<String>,
        /// The client configuration (`DIR/client.toml`).
        #[arg(long, env = "STRATA_CLUSTER")]
        cluster: PathBuf,
    },
    /// Place stages on a cordoned worker again.
    Uncordon {
        /// The worker's name.
        worker: String,
        /// The client configuration (`DIR/client.toml`).
        #[arg(long, env = "STRATA_CLUSTER")]
        cluster: PathBuf,
    },
}

#[derive(Debug, Args, serde::Serialize, serde::Deserialize)]
pub struct ImportCacheArgs {
    /// The cache: `REF`, `type=registry,ref=REF` or `type=local,src=DIR`
    /// (as `strata build --cache-from` takes it).
    pub spec: String,
    /// The admin's client configuration (`DIR/admin.toml`).
    #[arg(long, env = "STRATA_CLUSTER")]
    pub cluster: PathBuf,
}

/// `strata cluster import-cache`, in the daemon: the cache is imported
/// into this state directory first (every blob checked against its
/// digest), then its layers uploaded to the cluster, where each is checked
/// again and copied to workers before the entries naming it are put.
pub async fn import_cache(
    cx: &crate::cx::Cx,
    args: ImportCacheArgs,
    flags: &RegistryFlags,
) -> Result<u8> {
    let mut from = strata_worker::parse_cache_from(&args.spec)?;
    if let strata_worker::CacheLocation::Local { dir, .. } = &mut from.location {
        *dir = cx.path(dir);
    }
    let registry = flags.registry_for(cx);
    let transfer = cx.session.transfer();
    let imported = strata_worker::import_cache(&cx.node, &registry, &from, transfer.as_ref()).await;
    cx.session.progress_done();
    let imported =
        imported.with_context(|| format!("cannot import cache from {}", from.location))?;
    let config = ClientConfig::load(&cx.path(&args.cluster)).map_err(anyhow::Error::msg)?;
    let entries = imported.entries;
    let records = entries.len();
    let added = async {
        let client = Client::connect(&config).await?;
        client.import_cache(&cx.node.content, entries).await
    }
    .await
    .with_context(|| {
        format!(
            "cannot import cache from {} into the cluster",
            from.location
        )
    })?;
    writeln!(
        cx.err(),
        "imported cache from {} into the cluster: {records} steps, {added} new",
        from.location
    )?;
    Ok(0)
}

/// Cancelled on Ctrl-C or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
        t.cancel();
    });
    token
}

/// How a node's start-up line names its metrics endpoint.
fn serving_metrics(addr: Option<std::net::SocketAddr>) -> String {
    match addr {
        Some(a) if a.ip().is_loopback() => format!(", metrics on http://{a}/metrics"),
        Some(a) => format!(", metrics on https://{a}/metrics"),
        None => String::new(),
    }
}

pub fn coordinator(args: NodeArgs, flags: &RegistryFlags) -> Result<ExitCode> {
    let config = CoordinatorConfig::load(&args.config)?;
    crate::runtime()?.block_on(async {
        stop_serving(&config.home).await?;
        let coord = Coordinator::start(&config, flags.registry()).await?;
        let metrics = coord.serve_metrics(&config).await?;
        let images = coord.serve_images(&config).await?;
        writeln!(
            std::io::stderr(),
            "coordinator listening on {}{}{}",
            coord.addr(),
            serving_metrics(metrics),
            images.map_or(String::new(), |a| {
                let scheme = if config.registry.serves_tls() {
                    "https"
                } else {
                    "http"
                };
                format!(", images on {scheme}://{a}")
            })
        )?;
        coord.run(shutdown_signal()).await;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn worker(args: NodeArgs) -> Result<ExitCode> {
    let config = WorkerConfig::load(&args.config)?;
    crate::runtime()?.block_on(async {
        stop_serving(&config.home).await?;
        let node = WorkerNode::start(&config)?;
        let metrics = node.serve_metrics(&config).await?;
        writeln!(
            std::io::stderr(),
            "worker {} serving blobs on {}{}, coordinators {}",
            node.name(),
            node.addr(),
            serving_metrics(metrics),
            config
                .coordinators
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        node.run(shutdown_signal()).await;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn cluster(cmd: ClusterCommand) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        ClusterCommand::Init {
            dir,
            workers,
            coordinators,
            base_port,
            hosts,
        } => {
            let written = strata_cluster::local::init(
                &dir,
                workers,
                usize::from(coordinators),
                base_port,
                &hosts,
            )?;
            for p in &written {
                writeln!(out, "wrote {}", p.display())?;
            }
            writeln!(
                out,
                "cluster files in {}: start with `strata coordinator --config {}` and `strata worker --config …`, build with `strata build --cluster {}`",
                dir.display(),
                dir.join(format!(
                    "{}.toml",
                    strata_cluster::local::coordinator_names(usize::from(coordinators))[0]
                ))
                .display(),
                dir.join("client.toml").display()
            )?;
        }
        ClusterCommand::AddClient { name, dir } => {
            let written = strata_cluster::local::add_client(&dir, &name)?;
            for p in &written {
                writeln!(out, "wrote {}", p.display())?;
            }
            writeln!(
                out,
                "client {name}: build with `strata build --cluster {}`",
                dir.join(format!("{name}.toml")).display()
            )?;
        }
        ClusterCommand::Up {
            workers,
            coordinators,
            dir,
        } => {
            let exe = std::env::current_exe().context("cannot find the strata executable")?;
            crate::runtime()?.block_on(strata_cluster::local::up(
                &exe,
                &dir,
                workers,
                usize::from(coordinators),
                Duration::from_secs(60),
            ))?;
            let who = if coordinators == 1 {
                "a coordinator".to_string()
            } else {
                format!("{coordinators} coordinators")
            };
            writeln!(
                out,
                "cluster up: {who} and {workers} worker{}; build with `strata build --cluster {}`",
                if workers == 1 { "" } else { "s" },
                dir.join("client.toml").display()
            )?;
        }
        ClusterCommand::Down { dir } => {
            let stopped = strata_cluster::local::down(&dir, Duration::from_secs(10))?;
            writeln!(out, "stopped {}", stopped.join(", "))?;
        }
        ClusterCommand::Cordon { worker, cluster } => {
            set_cordon(&cluster, &worker, true)?;
            writeln!(out, "{worker} cordoned")?;
        }
        ClusterCommand::Uncordon { worker, cluster } => {
            set_cordon(&cluster, &worker, false)?;
            writeln!(out, "{worker} uncordoned")?;
        }
        ClusterCommand::Images { cluster, format } => {
            let images = ask(&cluster, async |c| c.images().await)?;
            print_images(&mut out, &images, format)?;
        }
        ClusterCommand::Rmi { names, cluster } => {
            for name in names {
                ask(&cluster, async |c| c.untag(&name).await)?;
                writeln!(out, "Untagged: {name}")?;
            }
        }
        ClusterCommand::Du { cluster, format } => {
            let nodes = ask(&cluster, async |c| c.du().await)?;
            print_du(&mut out, &nodes, format)?;
        }
        // Run in the daemon, which holds the state it stages the cache in.
        ClusterCommand::ImportCache(_) => {
            anyhow::bail!("cluster import-cache runs in the local daemon")
        }
        ClusterCommand::AddCoordinator { id, raft, cluster } => {
            change_group(
                &cluster,
                strata_raft::MembershipChange::Add {
                    id,
                    node: strata_raft::Node {
                        addr: raft.to_string(),
                    },
                },
            )?;
            writeln!(out, "coordinator {id} added to the group")?;
        }
        ClusterCommand::RemoveCoordinator { id, cluster } => {
            change_group(&cluster, strata_raft::MembershipChange::Remove { id })?;
            writeln!(out, "coordinator {id} removed from the group")?;
        }
        ClusterCommand::Status { cluster, format } => {
            let config = ClientConfig::load(&cluster)?;
            let views = crate::runtime()?.block_on(coordinator_views(&config));
            let report = StatusReport::from_views(&views).with_context(|| {
                format!(
                    "no coordinator answered: {}",
                    views
                        .iter()
                        .filter_map(|(_, v)| v.as_ref().err().cloned())
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            })?;
            // The leader is the coordinator the next command prefers.
            if let Some(leader) = report.coordinators.iter().find(|c| c.state == "leader")
                && let Some(addr) = config
                    .coordinators
                    .iter()
                    .find(|a| a.to_string() == leader.address)
            {
                config.remember(addr);
            }
            match format {
                StatusFormat::Json => {
                    serde_json::to_writer_pretty(&mut out, &report)?;
                    writeln!(out)?;
                }
                StatusFormat::Table => report.write_table(&mut out)?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How `strata cluster status` prints.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum StatusFormat {
    Table,
    Json,
}

/// How long `strata cluster status` waits for each coordinator: one that
/// has not answered by then is listed `unreachable`.
const STATUS_WAIT: Duration = Duration::from_secs(1);

/// What `strata cluster status` shows, as a table or as JSON.
#[derive(Debug, serde::Serialize)]
struct StatusReport {
    /// The coordinator whose view of the cluster this is (the leader when
    /// one answered).
    coordinator: String,
    pid: u32,
    cache_entries: usize,
    blobs_located: usize,
    builds_running: usize,
    group: GroupReport,
    replication: usize,
    layers_short: usize,
    workers_registered: usize,
    coordinators: Vec<CoordinatorRow>,
    workers: Vec<WorkerRow>,
}

#[derive(Debug, serde::Serialize)]
struct GroupReport {
    member: u64,
    members: Vec<u64>,
    leader: Option<u64>,
    term: u64,
    last_applied: Option<u64>,
    took_part: Vec<u64>,
}

#[derive(Debug, serde::Serialize)]
struct CoordinatorRow {
    name: Option<String>,
    address: String,
    /// `leader`, `follower` or `unreachable`.
    state: &'static str,
    pid: Option<u32>,
    term: Option<u64>,
    applied: Option<u64>,
    /// Why an unreachable one did not answer.
    error: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct WorkerRow {
    name: String,
    address: String,
    /// `up`, `cordoned` or `gone`.
    state: &'static str,
    slots: usize,
    running: usize,
    blobs: usize,
    /// The platforms it runs steps for, natively first.
    platforms: Vec<String>,
}

/// A coordinator's address, and what it says of the cluster or why it
/// did not.
type View = (
    strata_cluster::config::NodeAddress,
    Result<strata_cluster::protocol::ClusterStatus, String>,
);

impl StatusReport {
    /// The report from every coordinator's view; `None` when none
    /// answered.
    fn from_views(views: &[View]) -> Option<StatusReport> {
        let answered = || views.iter().filter_map(|(_, s)| s.as_ref().ok());
        let status = answered()
            .find(|s| s.group.leader == Some(s.group.id))
            .or_else(|| answered().next())?;
        let g = &status.group;
        Some(StatusReport {
            coordinator: status.coordinator.clone(),
            pid: status.pid,
            cache_entries: status.cache_entries,
            blobs_located: status.blobs_located,
            builds_running: status.builds_running,
            group: GroupReport {
                member: g.id,
                members: g.members.iter().map(|(id, _)| *id).collect(),
                leader: g.leader,
                term: g.term,
                last_applied: g.last_applied,
                took_part: g.joined.clone(),
            },
            replication: status.replication,
            layers_short: status.under_replicated,
            workers_registered: status.workers_registered,
            coordinators: views
                .iter()
                .map(|(addr, view)| match view {
                    Ok(s) => CoordinatorRow {
                        name: Some(s.coordinator.clone()),
                        address: addr.to_string(),
                        state: if s.group.leader == Some(s.group.id) {
                            "leader"
                        } else {
                            "follower"
                        },
                        pid: Some(s.pid),
                        term: Some(s.group.term),
                        applied: s.group.last_applied,
                        error: None,
                    },
                    Err(e) => CoordinatorRow {
                        name: None,
                        address: addr.to_string(),
                        state: "unreachable",
                        pid: None,
                        term: None,
                        applied: None,
                        error: Some(e.clone()),
                    },
                })
                .collect(),
            workers: status
                .workers
                .iter()
                .map(|w| WorkerRow {
                    name: w.name.clone(),
                    address: w.addr.to_string(),
                    state: match (w.alive, w.cordoned) {
                        (false, _) => "gone",
                        (true, true) => "cordoned",
                        (true, false) => "up",
                    },
                    slots: w.slots,
                    running: w.running,
                    blobs: w.blobs,
                    platforms: w.platforms.clone(),
                })
                .collect(),
        })
    }

    fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let list = |ids: &[u64]| {
            if ids.is_empty() {
                "-".to_string()
            } else {
                ids.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
        writeln!(
            out,
            "coordinator {} (pid {}): {} cache entries, {} blobs located, {} builds running",
            self.coordinator, self.pid, self.cache_entries, self.blobs_located, self.builds_running
        )?;
        let g = &self.group;
        writeln!(
            out,
            "replicated index: member {} of {}, leader {}, term {}, last applied {}, took part {}",
            g.member,
            list(&g.members),
            g.leader
                .map_or_else(|| "none".to_string(), |l| l.to_string()),
            g.term,
            or_dash(g.last_applied.map(|i| i.to_string())),
            list(&g.took_part),
        )?;
        writeln!(
            out,
            "replication: {} copies of each built layer, {} layers short, {} workers registered",
            self.replication, self.layers_short, self.workers_registered
        )?;
        writeln!(
            out,
            "{:<14} {:<22} {:<11} {:>7} {:>5} {:>8}",
            "COORDINATOR", "ADDRESS", "STATE", "PID", "TERM", "APPLIED"
        )?;
        for c in &self.coordinators {
            writeln!(
                out,
                "{:<14} {:<22} {:<11} {:>7} {:>5} {:>8}",
                c.name.as_deref().unwrap_or("?"),
                c.address,
                c.state,
                or_dash(c.pid.map(|p| p.to_string())),
                or_dash(c.term.map(|t| t.to_string())),
                or_dash(c.applied.map(|a| a.to_string())),
            )?;
        }
        writeln!(
            out,
            "{:<14} {:<22} {:<8} {:>5} {:>7} {:>6}  PLATFORMS",
            "WORKER", "ADDRESS", "STATE", "SLOTS", "RUNNING", "BLOBS"
        )?;
        for w in &self.workers {
            writeln!(
                out,
                "{:<14} {:<22} {:<8} {:>5} {:>7} {:>6}  {}",
                w.name,
                w.address,
                w.state,
                w.slots,
                w.running,
                w.blobs,
                w.platforms.join(",")
            )?;
        }
        Ok(())
    }
}

/// What each coordinator of `config` says of itself, all asked at once,
/// or why not (no answer within [`STATUS_WAIT`], among others).
async fn coordinator_views(config: &ClientConfig) -> Vec<View> {
    ask_each(
        config,
        STATUS_WAIT,
        |c: Client| async move { c.status().await },
    )
    .await
}

/// `f`'s answer from each coordinator of `config`, all asked at once, or
/// why there is none (no answer within `wait`, among others); in the
/// order of the file.
pub async fn ask_each<T, F, Fut>(
    config: &ClientConfig,
    wait: Duration,
    f: F,
) -> Vec<(strata_cluster::config::NodeAddress, Result<T, String>)>
where
    T: Send + 'static,
    F: Fn(Client) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<T, ClientError>> + Send,
{
    let mut asks = tokio::task::JoinSet::new();
    for (i, addr) in config.coordinators.iter().enumerate() {
        let one = config.only(addr);
        let addr = addr.clone();
        let f = f.clone();
        asks.spawn(async move {
            let ask = async { f(Client::connect(&one).await?).await };
            let view = match tokio::time::timeout(wait, ask).await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("{addr}: no answer within {wait:?}")),
            };
            (i, view)
        });
    }
    let mut views: Vec<_> = config
        .coordinators
        .iter()
        .map(|a| (a.clone(), Err(format!("{a}: no answer"))))
        .collect();
    while let Some(Ok((i, status))) = asks.join_next().await {
        views[i].1 = status;
    }
    views
}

fn change_group(cluster: &Path, change: strata_raft::MembershipChange) -> Result<()> {
    ask(cluster, async |c| c.change_group(change).await)
}

fn set_cordon(cluster: &Path, worker: &str, cordoned: bool) -> Result<()> {
    ask(cluster, async |c| c.cordon(worker, cordoned).await)
}

/// `strata cluster images`'s table, or its JSON (the same fields).
fn print_images(
    out: &mut impl Write,
    images: &[strata_cluster::protocol::NamedImage],
    format: StatusFormat,
) -> Result<()> {
    if matches!(format, StatusFormat::Json) {
        writeln!(out, "{}", serde_json::to_string_pretty(images)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<40} {:<19} {:>10}  DIGEST",
        "NAME", "IMAGE ID", "SIZE"
    )?;
    for i in images {
        let short = i.id.strip_prefix("sha256:").unwrap_or(&i.id);
        writeln!(
            out,
            "{:<40} {:<19} {:>10}  {}",
            i.name,
            short.get(..12).unwrap_or(short),
            crate::units::human_size(i.size),
            i.digest
        )?;
    }
    Ok(())
}

/// `strata cluster du`'s table, or its JSON (a line per node, the same
/// fields).
fn print_du(
    out: &mut impl Write,
    nodes: &[strata_cluster::protocol::NodeUsage],
    format: StatusFormat,
) -> Result<()> {
    use crate::units::human_size;
    if matches!(format, StatusFormat::Json) {
        let rows: Vec<serde_json::Value> = nodes
            .iter()
            .map(|n| match &n.usage {
                Ok(u) => serde_json::json!({"name": n.name, "role": n.role, "usage": u}),
                Err(e) => serde_json::json!({
                    "name": n.name,
                    "role": n.role,
                    "error": strata_registry::error_chain(e),
                }),
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<14} {:<12} {:>14} {:>14} {:>14} {:>14} {:>14} {:>12} {:>10}",
        "NODE",
        "ROLE",
        "IMAGES",
        "CACHE",
        "CONTEXTS",
        "OTHER BLOBS",
        "SNAPSHOTS",
        "RECLAIMABLE",
        "BLOBS"
    )?;
    let pair = |(n, b): (usize, u64)| format!("{n} {}", human_size(b));
    for n in nodes {
        match &n.usage {
            Ok(u) => writeln!(
                out,
                "{:<14} {:<12} {:>14} {:>14} {:>14} {:>14} {:>14} {:>12} {:>10}",
                n.name,
                n.role,
                pair(u.images),
                pair(u.cache),
                pair(u.contexts),
                pair(u.other),
                pair(u.snapshots),
                human_size(u.reclaimable),
                human_size(u.total)
            )?,
            Err(e) => writeln!(
                out,
                "{:<14} {:<12} unknown: {}",
                n.name,
                n.role,
                strata_registry::error_chain(e)
            )?,
        }
    }
    Ok(())
}

/// Connects to the cluster `cluster` names and asks it one thing.
fn ask<T>(cluster: &Path, f: impl AsyncFnOnce(&Client) -> Result<T, ClientError>) -> Result<T> {
    crate::runtime()?.block_on(async {
        let client = connect(cluster).await?;
        f(&client).await.map_err(anyhow::Error::from)
    })
}

/// Has a worker of the cluster push the image it names `tag` to the
/// registry `tag` names, with the credentials `registry` has for it
/// (handed over for this push only).
pub async fn push_from(
    cluster: &Path,
    registry: &strata_registry::Registry,
    tag: &strata_oci::Reference,
    compression: strata_oci::Compression,
) -> Result<strata_registry::Pushed> {
    let credential = registry
        .credential_for(tag)
        .with_context(|| format!("the credentials for {}", tag.domain))?;
    let push = strata_cluster::protocol::PushRequest {
        name: tag.familiar(),
        destination: tag.familiar(),
        compression,
        credential,
        insecure: registry.options().is_insecure(&tag.domain),
    };
    async {
        let client = connect(cluster).await?;
        client.push(push).await.map_err(anyhow::Error::from)
    }
    .await
    .with_context(|| format!("cannot push {} from the cluster", tag.familiar()))
}

/// A client of the cluster `client.toml` describes.
pub async fn connect(config: &Path) -> Result<Client> {
    let config = ClientConfig::load(config)?;
    Client::connect(&config).await.map_err(anyhow::Error::from)
}

/// Stops the daemon serving `home`, if one does: a coordinator or worker
/// about to own that state directory (commands run on it beforehand, such
/// as `strata image import`, started one).
async fn stop_serving(home: &Path) -> Result<()> {
    if let Some(pid) = strata_daemon::Client::new(home).stop().await? {
        tracing::info!(pid, home = %home.display(), "stopped the daemon serving this node's state directory");
    }
    Ok(())
}
