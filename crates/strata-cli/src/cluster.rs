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
    /// Show the coordinator, its workers and the cache.
    Status {
        /// The client configuration (`DIR/client.toml`).
        #[arg(long, env = "STRATA_CLUSTER")]
        cluster: PathBuf,
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
    /// Place stages on a cordoned worker again.
    Uncordon {
        /// The worker's name.
        worker: String,
        /// The client configuration (`DIR/client.toml`).
        #[arg(long, env = "STRATA_CLUSTER")]
        cluster: PathBuf,
    },
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

pub fn coordinator(args: NodeArgs, flags: &RegistryFlags) -> Result<ExitCode> {
    let config = CoordinatorConfig::load(&args.config)?;
    crate::runtime()?.block_on(async {
        crate::daemon::stop_serving(&config.home).await?;
        let coord = Coordinator::start(&config, flags.registry())
            .await
            .map_err(anyhow::Error::msg)?;
        writeln!(
            std::io::stderr(),
            "coordinator listening on {}",
            coord.addr()
        )?;
        coord.run(shutdown_signal()).await;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn worker(args: NodeArgs) -> Result<ExitCode> {
    let config = WorkerConfig::load(&args.config)?;
    crate::runtime()?.block_on(async {
        crate::daemon::stop_serving(&config.home).await?;
        let node = WorkerNode::start(&config).map_err(anyhow::Error::msg)?;
        writeln!(
            std::io::stderr(),
            "worker {} serving blobs on {}, coordinators {}",
            node.name(),
            node.addr(),
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
        } => {
            let written =
                strata_cluster::local::init(&dir, workers, usize::from(coordinators), base_port)
                    .map_err(anyhow::Error::msg)?;
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
            let written =
                strata_cluster::local::add_client(&dir, &name).map_err(anyhow::Error::msg)?;
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
            crate::runtime()?
                .block_on(strata_cluster::local::up(
                    &exe,
                    &dir,
                    workers,
                    usize::from(coordinators),
                    Duration::from_secs(60),
                ))
                .map_err(anyhow::Error::msg)?;
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
            let stopped = strata_cluster::local::down(&dir, Duration::from_secs(10))
                .map_err(anyhow::Error::msg)?;
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
        ClusterCommand::Status { cluster } => {
            let status = ask(&cluster, async |c| c.status().await)?;
            writeln!(
                out,
                "coordinator {} (pid {}): {} cache entries, {} blobs located, {} builds running",
                status.coordinator,
                status.pid,
                status.cache_entries,
                status.blobs_located,
                status.builds_running
            )?;
            let g = &status.group;
            writeln!(
                out,
                "replicated index: member {} of {}, leader {}, term {}, last applied {}, took part {}",
                g.id,
                g.members
                    .iter()
                    .map(|(id, _)| id.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                g.leader
                    .map_or_else(|| "none".to_string(), |l| l.to_string()),
                g.term,
                g.last_applied
                    .map_or_else(|| "-".to_string(), |i| i.to_string()),
                if g.joined.is_empty() {
                    "-".to_string()
                } else {
                    g.joined
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                }
            )?;
            writeln!(
                out,
                "replication: {} copies of each built layer, {} layers short, {} workers registered",
                status.replication, status.under_replicated, status.workers_registered
            )?;
            let config = ClientConfig::load(&cluster)?;
            if config.coordinators.len() > 1 {
                let views = crate::runtime()?.block_on(coordinator_views(&config));
                writeln!(
                    out,
                    "{:<14} {:<22} {:<9} {:>7} {:>5} {:>8}",
                    "COORDINATOR", "ADDRESS", "STATE", "PID", "TERM", "APPLIED"
                )?;
                for (addr, view) in views {
                    match view {
                        Some(s) => writeln!(
                            out,
                            "{:<14} {:<22} {:<9} {:>7} {:>5} {:>8}",
                            s.coordinator,
                            addr.to_string(),
                            if s.group.leader == Some(s.group.id) {
                                "leader"
                            } else {
                                "follower"
                            },
                            s.pid,
                            s.group.term,
                            s.group
                                .last_applied
                                .map_or_else(|| "-".to_string(), |i| i.to_string())
                        )?,
                        None => writeln!(
                            out,
                            "{:<14} {:<22} {:<9} {:>7} {:>5} {:>8}",
                            "?",
                            addr.to_string(),
                            "down",
                            "-",
                            "-",
                            "-"
                        )?,
                    }
                }
            }
            writeln!(
                out,
                "{:<14} {:<22} {:<8} {:>5} {:>7} {:>6}",
                "WORKER", "ADDRESS", "STATE", "SLOTS", "RUNNING", "BLOBS"
            )?;
            for w in &status.workers {
                writeln!(
                    out,
                    "{:<14} {:<22} {:<8} {:>5} {:>7} {:>6}",
                    w.name,
                    w.addr.to_string(),
                    match (w.alive, w.cordoned) {
                        (false, _) => "gone",
                        (true, true) => "cordoned",
                        (true, false) => "up",
                    },
                    w.slots,
                    w.running,
                    w.blobs
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What each coordinator of `config` says of itself (`None`: no answer).
async fn coordinator_views(
    config: &ClientConfig,
) -> Vec<(
    strata_cluster::config::NodeAddress,
    Option<strata_cluster::protocol::ClusterStatus>,
)> {
    let mut asks = tokio::task::JoinSet::new();
    for (i, addr) in config.coordinators.iter().enumerate() {
        let one = ClientConfig {
            coordinators: vec![addr.clone()],
            tls: config.tls.clone(),
        };
        asks.spawn(async move {
            let status = match Client::connect(&one).await {
                Ok(c) => c.status().await.ok(),
                Err(_) => None,
            };
            (i, status)
        });
    }
    let mut views: Vec<_> = config
        .coordinators
        .iter()
        .map(|a| (a.clone(), None))
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

/// Connects to the cluster `cluster` names and asks it one thing.
fn ask<T>(cluster: &Path, f: impl AsyncFnOnce(&Client) -> Result<T, ClientError>) -> Result<T> {
    crate::runtime()?.block_on(async {
        let client = connect(cluster).await?;
        f(&client).await.map_err(anyhow::Error::from)
    })
}

/// A client of the cluster `client.toml` describes.
pub async fn connect(config: &Path) -> Result<Client> {
    let config = ClientConfig::load(config)?;
    Client::connect(&config).await.map_err(anyhow::Error::from)
}
