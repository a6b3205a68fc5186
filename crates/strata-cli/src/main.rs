//! `strata`: build Dockerfiles into OCI images, on one machine or a cluster.
//!
//! This crate is only the command line: it parses arguments, sets up
//! logging, calls the library crates and prints results. Errors reach
//! `main` as `anyhow` chains and are printed once, with their causes.

mod dockerfile;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Build Dockerfiles into OCI images, on one machine or across a cluster.
#[derive(Debug, Parser)]
#[command(name = "strata", version, propagate_version = true)]
struct Cli {
    /// Log filter for diagnostics on stderr (e.g. `debug`, `strata=trace`).
    #[arg(long, global = true, env = "STRATA_LOG", default_value = "warn")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check or inspect a Dockerfile without building it.
    #[command(subcommand)]
    Dockerfile(dockerfile::DockerfileCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Dockerfile(cmd) => dockerfile::run(cmd),
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
