//! `strata`: build Dockerfiles into OCI images, on one machine or a cluster.
//!
//! This crate is only the command line: it parses arguments, sets up
//! logging, calls the library crates and prints results. Errors reach
//! `main` as `anyhow` chains and are printed once, with their causes.

mod bench;
mod build;
mod cluster;
mod cx;
mod daemon;
mod dockerfile;
mod engine;
mod git;
mod history;
mod images;
mod progress;
mod registry;
mod run;
mod stdio;
mod template;
mod units;
mod warnings;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Build Dockerfiles into OCI images, on one machine or across a cluster.
#[derive(Debug, Parser)]
#[command(name = "strata", version, propagate_version = true)]
struct Cli {
    /// Log filter for diagnostics on stderr (e.g. `debug`, `strata=trace`).
    #[arg(long, global = true, env = "STRATA_LOG", default_value = "warn")]
    log: String,

    /// How diagnostics are written: `text`, or `json` (one object a line,
    /// with the build id and other fields as keys). A daemon a command
    /// starts takes STRATA_LOG_FORMAT from its environment.
    #[arg(
        long,
        global = true,
        env = "STRATA_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,

    /// State directory (images, layers, cache).
    #[arg(long, global = true, env = "STRATA_HOME")]
    home: Option<PathBuf>,

    #[command(flatten)]
    registry: registry::RegistryFlags,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build an image from a Dockerfile.
    Build(Box<build::BuildArgs>),
    /// Run a command in a new container from an image; exits with its code.
    Run(run::RunArgs),
    /// List images.
    Images(images::ImagesArgs),
    /// Remove image names.
    Rmi(images::RmiArgs),
    /// Show images as JSON, in `docker inspect`'s shape.
    Inspect(images::InspectArgs),
    /// Give a stored image another name.
    Tag(images::TagArgs),
    /// Show what the state directory holds: images, build cache, blobs.
    Du(images::DuArgs),
    /// Pull an image from a registry.
    Pull(registry::PullArgs),
    /// Push an image to a registry.
    Push(registry::PushArgs),
    /// Write an image to a `docker save` archive.
    Save(registry::SaveArgs),
    /// Read images from a `docker save` archive.
    Load(registry::LoadArgs),
    /// List recent builds (`--cluster`: the cluster's), show one, or write
    /// its timeline as a trace.
    History(history::HistoryArgs),
    /// Remove build cache and unreferenced data.
    Prune(images::PruneArgs),
    /// Manage images.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// Check or inspect a Dockerfile without building it.
    #[command(subcommand)]
    Dockerfile(dockerfile::DockerfileCommand),
    /// Measure build throughput on a workload: the local daemon, clusters
    /// and BuildKit side by side, cold and warm.
    Bench(bench::BenchArgs),
    /// Run a cluster coordinator.
    Coordinator(cluster::NodeArgs),
    /// Run a cluster worker.
    Worker(cluster::NodeArgs),
    /// Make, start, stop and inspect clusters.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// The local daemon that runs every command on this state directory
    /// (started on demand; `--foreground` for systemd).
    Daemon(daemon::DaemonArgs),
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    let home = cli.home.unwrap_or_else(strata_worker::default_home);
    // Commands on the state directory run in its daemon.
    let flags = cli.registry;
    let result = match cli.command {
        Command::Build(a) => build::client_inputs(&home, a)
            .and_then(|(a, _spooled)| daemon::remote(&home, daemon::Call::Build(a, flags))),
        Command::Run(a) => daemon::remote(&home, daemon::Call::Run(a, flags)),
        Command::Images(a) => daemon::remote(&home, daemon::Call::Images(a)),
        Command::Rmi(a) => daemon::remote(&home, daemon::Call::Rmi(a)),
        Command::Tag(a) => daemon::remote(&home, daemon::Call::Tag(a)),
        Command::Inspect(a) => daemon::remote(&home, daemon::Call::Inspect(a)),
        Command::Du(a) => daemon::remote(&home, daemon::Call::Du(a)),
        Command::Pull(a) => daemon::remote(&home, daemon::Call::Pull(a, flags)),
        Command::Push(a) => daemon::remote(&home, daemon::Call::Push(a, flags)),
        Command::Save(a) => {
            registry::save_checked(&a).and_then(|()| daemon::remote(&home, daemon::Call::Save(a)))
        }
        Command::Load(a) => registry::load_from_stdin(&home, a)
            .and_then(|(a, _spooled)| daemon::remote(&home, daemon::Call::Load(a))),
        // A cluster's history is asked of it from here; this machine's,
        // of its daemon.
        Command::History(a) => match a.cluster.clone() {
            Some(cluster) => history::cluster(&cluster, a),
            None => daemon::remote(&home, daemon::Call::History(a)),
        },
        Command::Bench(a) => bench::bench(&home, a),
        Command::Prune(a) => daemon::remote(&home, daemon::Call::Prune(a)),
        Command::Image(c) => daemon::remote(&home, daemon::Call::Image(c)),
        Command::Daemon(a) => daemon::daemon(&home, a),
        Command::Dockerfile(cmd) => dockerfile::run(cmd),
        Command::Coordinator(a) => cluster::coordinator(a, &flags),
        Command::Worker(a) => cluster::worker(a),
        Command::Cluster(cluster::ClusterCommand::ImportCache(a)) => {
            daemon::remote(&home, daemon::Call::ImportCache(a, flags))
        }
        Command::Cluster(cmd) => cluster::cluster(cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            report(&err);
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    // openraft logs each unanswered heartbeat to a member that is down as
    // an error, many a second: its diagnostics show when asked for by name
    // (`--log warn,openraft=info`).
    let filter = if filter.contains("openraft") {
        filter.to_string()
    } else {
        format!("{filter},openraft=off")
    };
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        // Colour only for a person at a terminal: never in a file or pipe.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(warnings::layer())
        .init();
}

/// An error and its causes, as printed after `error: `.
fn error_text(err: &anyhow::Error) -> String {
    strata_solver::with_causes(err.to_string(), err.chain().skip(1))
}

/// Prints an error and its causes to stderr.
fn report(err: &anyhow::Error) {
    let _ = writeln!(std::io::stderr().lock(), "error: {}", error_text(err));
}

/// A multi-threaded runtime for one command.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
