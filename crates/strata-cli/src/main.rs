//! `strata`: build Dockerfiles into OCI images, on one machine or a cluster.
//!
//! This crate is only the command line: it parses arguments, sets up
//! logging, calls the library crates and prints results. Errors reach
//! `main` as `anyhow` chains and are printed once, with their causes.

mod build;
mod cluster;
mod dockerfile;
mod images;
mod progress;
mod registry;
mod run;

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
    Build(build::BuildArgs),
    /// Run a command in a new container from an image; exits with its code.
    Run(run::RunArgs),
    /// List images.
    Images(images::ImagesArgs),
    /// Remove image names.
    Rmi(images::RmiArgs),
    /// Pull an image from a registry.
    Pull(registry::PullArgs),
    /// Push an image to a registry.
    Push(registry::PushArgs),
    /// Write an image to a `docker save` archive.
    Save(registry::SaveArgs),
    /// Read images from a `docker save` archive.
    Load(registry::LoadArgs),
    /// Remove build cache and unreferenced data.
    Prune(images::PruneArgs),
    /// Manage images.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// Check or inspect a Dockerfile without building it.
    #[command(subcommand)]
    Dockerfile(dockerfile::DockerfileCommand),
    /// Run a cluster coordinator.
    Coordinator(cluster::NodeArgs),
    /// Run a cluster worker.
    Worker(cluster::NodeArgs),
    /// Make, start, stop and inspect clusters.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let home = cli.home.unwrap_or_else(strata_worker::default_home);
    let result = match cli.command {
        Command::Build(a) => build::run(&home, a, &cli.registry),
        Command::Run(a) => run::run(&home, a, &cli.registry),
        Command::Images(a) => images::images(&home, a),
        Command::Rmi(a) => images::rmi(&home, a),
        Command::Pull(a) => registry::pull(&home, a, &cli.registry),
        Command::Push(a) => registry::push(&home, a, &cli.registry),
        Command::Save(a) => registry::save(&home, a),
        Command::Load(a) => registry::load(&home, a),
        Command::Prune(a) => images::prune(&home, a),
        Command::Image(c) => images::image(&home, c),
        Command::Dockerfile(cmd) => dockerfile::run(cmd),
        Command::Coordinator(a) => cluster::coordinator(a, &cli.registry),
        Command::Worker(a) => cluster::worker(a),
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

fn init_logging(filter: &str) {
    // openraft logs each unanswered heartbeat to a member that is down as
    // an error, many a second: its diagnostics show when asked for by name
    // (`--log warn,openraft=info`).
    let filter = if filter.contains("openraft") {
        filter.to_string()
    } else {
        format!("{filter},openraft=off")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Prints an error and its causes to stderr.
fn report(err: &anyhow::Error) {
    let mut out = std::io::stderr().lock();
    let _ = write!(out, "error: {err}");
    for cause in err.chain().skip(1) {
        let _ = write!(out, "\n  caused by: {cause}");
    }
    let _ = writeln!(out);
}

/// Opens the node, with the state directory named in errors.
fn open_node(home: &std::path::Path) -> anyhow::Result<std::sync::Arc<strata_worker::Node>> {
    use anyhow::Context as _;
    let node = strata_worker::Node::open(home)
        .with_context(|| format!("cannot open the strata state directory {}", home.display()))?;
    Ok(std::sync::Arc::new(node))
}

/// A multi-threaded runtime for one command.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
