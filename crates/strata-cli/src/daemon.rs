//! `strata daemon`, and how every command that touches the state directory
//! reaches it.
//!
//! A command parses its arguments here, in the client, then sends them to
//! the daemon of its state directory (starting one when none answers),
//! which runs the command's code with its one open node. The client draws
//! what comes back: output, progress, the exit code.

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use strata_daemon::wire::{FromDaemon, TransferEvent};
use strata_daemon::{Client, Ended, Session};
use strata_registry::Transfer;
use strata_worker::Node;
use tracing::Instrument as _;

use crate::cx::Cx;
use crate::progress::{Mode, Renderer};
use crate::registry::RegistryFlags;

/// The default idle time after which a daemon exits.
const DEFAULT_IDLE: u64 = 300;

#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(subcommand)]
    command: Option<DaemonCommand>,
    /// Serve in this process, logging to stderr (for systemd); without
    /// it, a daemon is started in the background if none runs.
    #[arg(long)]
    foreground: bool,
    /// Seconds without a command after which the daemon exits (0: never).
    #[arg(long, env = "STRATA_DAEMON_IDLE_TIMEOUT", default_value_t = DEFAULT_IDLE)]
    idle_timeout: u64,
    /// Where to serve Prometheus metrics, /healthz and /readyz over HTTP:
    /// a loopback address (port 0: any free port, which `strata daemon
    /// status` names), or `off`.
    #[arg(
        long,
        env = "STRATA_DAEMON_METRICS_LISTEN",
        default_value = "127.0.0.1:0",
        value_parser = metrics_listen
    )]
    metrics_listen: MetricsListen,
    /// Bytes of blobs the state directory keeps at most (`10GB`, `500MiB`):
    /// past that, the least recently used go (never an image's, nor one a
    /// build holds), and the cache entries naming them. Default: a tenth
    /// of its filesystem, as buildkitd's.
    #[arg(long, env = "STRATA_KEEP_STORAGE", value_name = "SIZE")]
    keep_storage: Option<String>,
    /// Seconds a blob no build used is kept at most (default: no limit).
    #[arg(long, env = "STRATA_KEEP_DURATION", value_name = "SECONDS")]
    keep_duration: Option<u64>,
}

/// `--metrics-listen`: an address, or off.
#[derive(Debug, Clone, Copy)]
struct MetricsListen(Option<std::net::SocketAddr>);

fn metrics_listen(s: &str) -> Result<MetricsListen, String> {
    if s == "off" {
        return Ok(MetricsListen(None));
    }
    let addr: std::net::SocketAddr = s
        .parse()
        .map_err(|e| format!("{s}: not an address (IP:PORT) or `off`: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr}: the daemon serves metrics on loopback only (a coordinator or worker can expose them with TLS and a token)"
        ));
    }
    Ok(MetricsListen(Some(addr)))
}

/// The daemon on `/readyz` (ready while it serves: its store is open) and
/// the gauges read at each scrape.
struct DaemonHealth {
    node: Arc<Node>,
}

impl strata_metrics::Health for DaemonHealth {
    fn ready(&self) -> Result<(), strata_metrics::NotReady> {
        Ok(())
    }

    fn refresh(&self) {
        for (kind, n) in self.node.usage() {
            strata_metrics::store_bytes(kind, n);
        }
    }

    /// The daemon is a node with one worker: itself.
    fn dashboard(&self) -> Option<serde_json::Value> {
        use strata_worker::history::{Dashboard, NodeView, WorkerView};
        let node = &self.node;
        let slots = strata_worker::default_slots();
        let local = WorkerView {
            name: "local".into(),
            address: node.home().display().to_string(),
            state: "up",
            slots,
            running: slots.saturating_sub(node.slots.available_permits()),
            blobs: node.content.list().map(|l| l.len()).unwrap_or(0),
        };
        let about = NodeView {
            name: node.home().display().to_string(),
            role: "daemon",
            version: env!("CARGO_PKG_VERSION"),
        };
        let entries = node.cache.list().map(|l| l.len()).unwrap_or(0);
        serde_json::to_value(Dashboard::of(node, about, vec![local], entries)).ok()
    }
}

#[derive(Debug, Subcommand)]
enum DaemonCommand {
    /// Whether a daemon serves this state directory, and what it does.
    Status,
    /// Stop the daemon (what it runs is cancelled).
    Stop,
}

/// A command the daemon runs, with its arguments as the client parsed
/// them (flags from the client's environment already applied).
#[derive(Debug, Serialize, Deserialize)]
pub enum Call {
    Build(Box<crate::build::BuildArgs>, RegistryFlags),
    Run(crate::run::RunArgs, RegistryFlags),
    Images(crate::images::ImagesArgs),
    Rmi(crate::images::RmiArgs),
    Tag(crate::images::TagArgs),
    Du(crate::images::DuArgs),
    Prune(crate::images::PruneArgs),
    Image(crate::images::ImageCommand),
    Pull(crate::registry::PullArgs, RegistryFlags),
    Push(crate::registry::PushArgs, RegistryFlags),
    Save(crate::registry::SaveArgs),
    Load(crate::registry::LoadArgs),
    History(crate::history::HistoryArgs),
    Inspect(crate::images::InspectArgs),
    ImportCache(crate::cluster::ImportCacheArgs, RegistryFlags),
}

impl Call {
    /// How the client shows this command's progress.
    fn progress(&self) -> Mode {
        match self {
            Call::Build(a, _) => a.progress_mode(),
            Call::Pull(a, _) => a.progress,
            Call::Push(a, _) => a.progress,
            _ => Mode::Auto,
        }
    }
}

struct Handler {
    node: Arc<Node>,
    contexts: Arc<strata_cluster::context::StatCaches>,
}

impl strata_daemon::Handler for Handler {
    fn call(&self, call: Vec<u8>, session: Session) -> BoxFuture<'_, Result<u8, String>> {
        Box::pin(async move {
            let (call, _): (Call, usize) =
                bincode::serde::decode_from_slice(&call, bincode::config::standard())
                    .map_err(|e| format!("the daemon cannot read this command: {e}"))?;
            tracing::info!(call = ?call_name(&call), "running a command");
            // What the command's work warns of, the client sees too.
            let span = tracing::info_span!("command", call = call_name(&call));
            let stderr = std::sync::Mutex::new(session.stderr());
            let _forwarding = crate::warnings::forward(&span, move |line| {
                let mut stderr = stderr
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let _ = std::io::Write::write_all(&mut *stderr, line.as_bytes());
            });
            let cx = Cx {
                node: Arc::clone(&self.node),
                session,
                contexts: Arc::clone(&self.contexts),
            };
            dispatch(cx, call)
                .instrument(span)
                .await
                .map_err(|e| crate::error_text(&e))
        })
    }
}

/// Runs one command: those that wait on the network or on steps as
/// tasks, those that only read or write the store on a blocking thread.
async fn dispatch(cx: Cx, call: Call) -> anyhow::Result<u8> {
    match call {
        Call::Build(a, flags) => crate::build::run(&cx, *a, &flags).await,
        Call::Run(a, flags) => crate::run::run(&cx, a, &flags).await,
        Call::Pull(a, flags) => crate::registry::pull(&cx, a, &flags).await,
        Call::Push(a, flags) => crate::registry::push(&cx, a, &flags).await,
        Call::ImportCache(a, flags) => crate::cluster::import_cache(&cx, a, &flags).await,
        Call::Images(a) => cx.blocking(|cx| crate::images::images(cx, a)).await,
        Call::Rmi(a) => cx.blocking(|cx| crate::images::rmi(cx, a)).await,
        Call::Tag(a) => cx.blocking(|cx| crate::images::tag(cx, a)).await,
        Call::Du(a) => cx.blocking(|cx| crate::images::du(cx, a)).await,
        Call::Prune(a) => cx.blocking(|cx| crate::images::prune(cx, a)).await,
        Call::Image(c) => cx.blocking(|cx| crate::images::image(cx, c)).await,
        Call::Save(a) => cx.blocking(|cx| crate::registry::save(cx, a)).await,
        Call::Load(a) => cx.blocking(|cx| crate::registry::load(cx, a)).await,
        Call::History(a) => cx.blocking(|cx| crate::history::local(cx, a)).await,
        Call::Inspect(a) => cx.blocking(|cx| crate::images::inspect(cx, a)).await,
    }
}

fn call_name(call: &Call) -> &'static str {
    match call {
        Call::Build(..) => "build",
        Call::Run(..) => "run",
        Call::Images(_) => "images",
        Call::Rmi(_) => "rmi",
        Call::Tag(_) => "tag",
        Call::Du(_) => "du",
        Call::Prune(_) => "prune",
        Call::Image(_) => "image",
        Call::Pull(..) => "pull",
        Call::Push(..) => "push",
        Call::Save(_) => "save",
        Call::Load(_) => "load",
        Call::History(_) => "history",
        Call::Inspect(_) => "inspect",
        Call::ImportCache(..) => "cluster import-cache",
    }
}

/// Starts a daemon for `home` in the background, detached from this
/// process and its terminal, its output appended to the daemon's log.
fn spawn_daemon(home: &Path, idle_timeout: u64) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt as _;
    std::fs::create_dir_all(home)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(strata_daemon::log_path(home))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--home")
        .arg(home)
        .args(["daemon", "--foreground", "--idle-timeout"])
        .arg(idle_timeout.to_string())
        .env(
            "STRATA_LOG",
            std::env::var("STRATA_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    cmd.spawn()
}

fn idle_from_env() -> u64 {
    std::env::var("STRATA_DAEMON_IDLE_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_IDLE)
}

/// Runs `call` in the daemon of `home`, drawing its output and progress
/// here; returns its exit code.
pub fn remote(home: &Path, call: Call) -> Result<ExitCode> {
    let renderer = Renderer::new(call.progress());
    let bytes = bincode::serde::encode_to_vec(&call, bincode::config::standard())
        .context("cannot encode the command for the daemon")?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = Client::new(home);
    let idle = idle_from_env();
    let ended = rt.block_on(async {
        let connected = client
            .connect(&|| spawn_daemon(home, idle), &|note| {
                let _ = writeln!(std::io::stderr().lock(), "{note}");
            })
            .await?;
        // Ctrl-C cancels this command in the daemon (and nothing else);
        // a second one leaves without waiting to hear how it ended.
        let interrupted = tokio_util::sync::CancellationToken::new();
        let first = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                first.cancel();
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        let on_frame = &mut |frame: FromDaemon| draw(&renderer, frame);
        connected
            .call(bytes, env, cwd, &interrupted, on_frame)
            .await
    });
    renderer.finish();
    match ended? {
        Ended::Exit(code) => Ok(ExitCode::from(code)),
        Ended::Failed(message) => {
            let _ = writeln!(std::io::stderr().lock(), "error: {message}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn draw(renderer: &Renderer, frame: FromDaemon) {
    match frame {
        FromDaemon::Stdout(b) => {
            let _ = std::io::stdout().lock().write_all(&b);
        }
        FromDaemon::Stderr(b) => renderer.stderr(&b),
        FromDaemon::Progress(e) => renderer.on(e),
        FromDaemon::Transfer(TransferEvent::Start { id, total }) => renderer.start(&id, total),
        FromDaemon::Transfer(TransferEvent::Advance { id, bytes }) => {
            renderer.advance(&id, bytes);
        }
        FromDaemon::Transfer(TransferEvent::Finish { id, how }) => {
            Transfer::finish(renderer, &id, &how);
        }
        FromDaemon::ProgressDone => renderer.finish(),
        FromDaemon::Exit(_)
        | FromDaemon::Failed(_)
        | FromDaemon::Status(_)
        | FromDaemon::Stopping => {}
    }
}

/// Keeps the state directory within `keep`, as a worker keeps its store.
async fn evict_forever(node: Arc<Node>, keep: strata_sched::Keep) {
    tracing::info!(keep_storage = ?keep.storage, keep_duration = ?keep.duration, "store bounds");
    let mut pace = strata_sched::evict::Pace::default();
    loop {
        tokio::time::sleep(strata_worker::EVICT_EVERY).await;
        // Read before the store is listed: a blob added meanwhile makes
        // the next round look again.
        let (changes, now) = (node.content.changes(), strata_cas::now_unix());
        if !pace.due(changes, now, &keep) {
            continue;
        }
        let n = Arc::clone(&node);
        let evicted =
            tokio::task::spawn_blocking(move || strata_worker::enforce(&n, &keep, now)).await;
        if let Ok(Ok(r)) = &evicted {
            pace.checked(changes, now, r.stored, &keep);
        }
        match evicted {
            Ok(Ok(r)) if r.blobs > 0 => tracing::info!(
                blobs = r.blobs,
                bytes = r.bytes,
                snapshots = r.snapshots,
                cache_entries = r.cache_entries,
                "evicted to stay within keep_storage / keep_duration"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot evict from the store"),
            Err(e) => tracing::warn!(error = %e, "eviction stopped"),
        }
    }
}

/// `strata daemon …`.
pub fn daemon(home: &Path, args: DaemonArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = Client::new(home);
    let mut out = std::io::stdout().lock();
    match args.command {
        Some(DaemonCommand::Status) => match rt.block_on(client.status())? {
            Some(s) => {
                writeln!(
                    out,
                    "strata daemon pid {} serving {} for {}s: {} command(s) running, {} served; exits after {}s idle\nversion {}",
                    s.pid,
                    s.home.display(),
                    s.uptime_seconds,
                    s.running,
                    s.served,
                    s.idle_timeout_seconds,
                    s.version
                )?;
                if let Some(m) = s.metrics {
                    writeln!(out, "metrics: http://{m}/metrics")?;
                }
                Ok(ExitCode::SUCCESS)
            }
            None => {
                writeln!(out, "no strata daemon serves {}", home.display())?;
                Ok(ExitCode::from(3))
            }
        },
        Some(DaemonCommand::Stop) => {
            match rt.block_on(client.stop())? {
                Some(pid) => writeln!(out, "stopped the strata daemon (pid {pid})")?,
                None => writeln!(out, "no strata daemon serves {}", home.display())?,
            }
            Ok(ExitCode::SUCCESS)
        }
        None if args.foreground => {
            drop(out);
            let storage = args
                .keep_storage
                .as_deref()
                .map(crate::units::parse_size)
                .transpose()
                .context("--keep-storage (STRATA_KEEP_STORAGE)")?;
            let keep = strata_worker::keep_within(home, storage, args.keep_duration)?;
            serve(home, &rt, args.idle_timeout, args.metrics_listen.0, keep)
        }
        None => {
            let idle = args.idle_timeout;
            let connected = rt.block_on(client.connect(&|| spawn_daemon(home, idle), &|note| {
                let _ = writeln!(std::io::stderr().lock(), "{note}");
            }))?;
            writeln!(
                out,
                "strata daemon pid {} serves {}",
                connected.pid,
                home.display()
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn serve(
    home: &Path,
    rt: &tokio::runtime::Runtime,
    idle_timeout: u64,
    metrics: Option<std::net::SocketAddr>,
    keep: strata_sched::Keep,
) -> Result<ExitCode> {
    // A daemon that is stopping (it has closed its socket) still holds the
    // state directory for a moment: wait for it, a bounded time. One that
    // answers, or a cluster node, is another matter: say so at once.
    let waiting = std::time::Instant::now();
    let node = loop {
        match Node::open_with(home, false) {
            Ok(n) => break Arc::new(n),
            Err(strata_worker::NodeError::Busy(_)) => {
                let answering =
                    std::os::unix::net::UnixStream::connect(strata_daemon::socket_path(home))
                        .is_ok();
                if answering || waiting.elapsed() > Duration::from_secs(30) {
                    let pid = std::fs::read_to_string(strata_daemon::pid_path(home))
                        .map(|p| format!(" (pid {})", p.trim()))
                        .unwrap_or_default();
                    bail!(
                        "another strata process holds the state directory {}: a daemon{pid}, or a cluster node using it as its home; `strata daemon stop` stops a daemon",
                        home.display(),
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot open the strata state directory {}", home.display())
                });
            }
        }
    };
    let metrics = match metrics {
        Some(addr) => {
            let health = Arc::new(DaemonHealth {
                node: Arc::clone(&node),
            });
            let served = rt.block_on(strata_metrics::serve(addr, None, None, health))?;
            strata_metrics::slots(strata_worker::default_slots());
            Some(served.addr)
        }
        None => None,
    };
    rt.spawn(evict_forever(Arc::clone(&node), keep));
    let handler = Arc::new(Handler {
        node,
        contexts: Arc::default(),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let opts = strata_daemon::Options {
        home: home.to_path_buf(),
        idle_timeout: (idle_timeout > 0).then(|| Duration::from_secs(idle_timeout)),
        stop: stop.clone(),
        metrics,
    };
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot watch for SIGTERM")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("signalled; stopping");
            stop.cancel();
        });
        strata_daemon::serve(opts, handler).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
