//! `strata history`: the builds this machine ran (in its daemon's state
//! directory) or, with `--cluster`, those the cluster's coordinators
//! coordinated for this client; one build's steps; its timeline as a
//! Chrome trace.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use strata_worker::BuildRecord;

use crate::cx::Cx;
use crate::units::{ago, human_size};

#[derive(Debug, Args, Serialize, Deserialize)]
pub struct HistoryArgs {
    #[command(subcommand)]
    command: Option<HistoryCommand>,
    /// The cluster's builds, from every coordinator of this client
    /// configuration (a client sees its own builds; an admin, all).
    #[arg(long, global = true, env = "STRATA_CLUSTER", value_name = "FILE")]
    pub cluster: Option<PathBuf>,
    /// How many builds to list, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// How to print a list or a build.
    #[arg(long, global = true, value_enum, default_value = "table")]
    format: Format,
}

#[derive(Debug, Subcommand, Serialize, Deserialize)]
enum HistoryCommand {
    /// Show one build: status, times and every step (its cache key,
    /// cached or not, where it ran).
    Inspect {
        /// The build's id, or enough of its start to name one.
        id: String,
    },
    /// Write a build's timeline as a Chrome trace: a lane per slot of
    /// each node, every step a span (Perfetto and chrome://tracing open it).
    Trace {
        /// The build's id, or enough of its start to name one.
        id: String,
        /// The file to write.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
enum Format {
    Table,
    Json,
}

/// How long each coordinator may take to answer.
const HISTORY_WAIT: Duration = Duration::from_secs(5);

/// `strata history --cluster …`: asked of the cluster's coordinators.
pub fn cluster(cluster: &Path, args: HistoryArgs) -> Result<ExitCode> {
    let config = strata_cluster::config::ClientConfig::load(cluster)?;
    let id = match &args.command {
        Some(HistoryCommand::Inspect { id } | HistoryCommand::Trace { id, .. }) => Some(id.clone()),
        None => None,
    };
    let limit = args.limit;
    let asked = id.clone();
    let answers =
        crate::runtime()?.block_on(crate::cluster::ask_each(&config, HISTORY_WAIT, move |c| {
            let asked = asked.clone();
            async move { c.history(asked.as_deref(), limit).await }
        }));
    let mut records: Vec<BuildRecord> = Vec::new();
    let mut errors = Vec::new();
    for (addr, answer) in answers {
        match answer {
            // Each coordinator keeps the builds it coordinated.
            Ok(found) => {
                for r in found {
                    if !records.iter().any(|k| k.id == r.id) {
                        records.push(r);
                    }
                }
            }
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    let no_answer = errors.len() == config.coordinators.len();
    for e in &errors {
        tracing::warn!(error = %e, "a coordinator's history is missing");
    }
    if no_answer {
        bail!("no coordinator answered: {}", errors.join("; "));
    }
    records.sort_by(|a, b| b.started.total_cmp(&a.started));
    records.truncate(limit);
    let records = match &id {
        Some(id) => vec![
            strata_worker::history::find(records, id)
                .map_err(|e| anyhow::anyhow!("{e} (asked {})", cluster.display()))?,
        ],
        None => records,
    };
    show(&args, records, &mut std::io::stdout().lock(), &|p| {
        p.to_path_buf()
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `strata history …` in the daemon: this state directory's builds.
pub fn local(cx: &Cx, args: HistoryArgs) -> Result<u8> {
    let records = match &args.command {
        Some(HistoryCommand::Inspect { id } | HistoryCommand::Trace { id, .. }) => {
            vec![cx.node.history.get(id)?]
        }
        None => cx.node.history.list(args.limit)?,
    };
    show(&args, records, &mut cx.out(), &|p| cx.path(p))?;
    Ok(0)
}

/// Prints a list or one build, or writes one build's trace.
fn show(
    args: &HistoryArgs,
    records: Vec<BuildRecord>,
    out: &mut dyn Write,
    path: &dyn Fn(&Path) -> PathBuf,
) -> Result<()> {
    match (&args.command, args.format) {
        (None, Format::Json) => {
            serde_json::to_writer_pretty(&mut *out, &records)?;
            writeln!(out)?;
        }
        (None, Format::Table) => list_table(&records, out)?,
        (Some(HistoryCommand::Inspect { .. }), Format::Json) => {
            serde_json::to_writer_pretty(&mut *out, &records.first())?;
            writeln!(out)?;
        }
        (Some(HistoryCommand::Inspect { .. }), Format::Table) => {
            for r in &records {
                inspect_table(r, out)?;
            }
        }
        (Some(HistoryCommand::Trace { output, .. }), _) => {
            let Some(r) = records.first() else {
                bail!("no such build");
            };
            let file = path(output);
            let trace = strata_worker::history::chrome_trace(r);
            std::fs::write(&file, serde_json::to_vec(&trace)?)
                .with_context(|| format!("cannot write the trace {}", file.display()))?;
            writeln!(
                out,
                "wrote the timeline of build {} ({} steps) to {}",
                r.id,
                r.steps.len(),
                output.display()
            )?;
        }
    }
    Ok(())
}

fn names(r: &BuildRecord) -> String {
    if r.tags.is_empty() {
        "<none>".into()
    } else {
        r.tags.join(", ")
    }
}

fn list_table(records: &[BuildRecord], out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "{:<22} {:<24} {:<10} {:<24} {:>9} {:>5} {:>6}  {:<18} {:>8}",
        "BUILD ID", "NAME", "STATUS", "CREATED", "DURATION", "RUN", "CACHED", "WORKERS", "MOVED"
    )?;
    for r in records {
        writeln!(
            out,
            "{:<22} {:<24} {:<10} {:<24} {:>8.1}s {:>5} {:>6}  {:<18} {:>8}",
            r.id,
            names(r),
            r.status.to_string(),
            ago(r.started as u64),
            r.duration_seconds,
            r.steps_run(),
            r.steps_cached(),
            r.workers().join(","),
            human_size(r.bytes_moved),
        )?;
    }
    Ok(())
}

fn inspect_table(r: &BuildRecord, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "Build:     {}", r.id)?;
    writeln!(out, "Name:      {}", names(r))?;
    writeln!(out, "Status:    {}", r.status)?;
    if let Some(e) = &r.error {
        writeln!(out, "Error:     {}", e.lines().next().unwrap_or(""))?;
    }
    writeln!(out, "On:        {}", r.node)?;
    if let Some(c) = &r.client {
        writeln!(out, "Client:    {c}")?;
    }
    writeln!(out, "Created:   {}", ago(r.started as u64))?;
    writeln!(out, "Duration:  {:.2}s", r.duration_seconds)?;
    if let Some(i) = &r.image {
        writeln!(out, "Image:     {i}")?;
    }
    writeln!(
        out,
        "Steps:     {} run, {} cached",
        r.steps_run(),
        r.steps_cached()
    )?;
    writeln!(out, "Moved:     {}", human_size(r.bytes_moved))?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<14} {:>5} {:<40} {:>8} {:<7} {:<14} CACHE KEY",
        "STAGE", "LINE", "INSTRUCTION", "TIME", "CACHED", "WORKER"
    )?;
    let mut steps = r.steps.clone();
    steps.sort_by(|a, b| a.started.total_cmp(&b.started));
    for s in &steps {
        let instruction: String = s.instruction.chars().take(40).collect();
        writeln!(
            out,
            "{:<14} {:>5} {:<40} {:>7.2}s {:<7} {:<14} {}",
            s.stage,
            s.line,
            instruction,
            (s.finished - s.started).max(0.0),
            if s.cached { "yes" } else { "no" },
            s.worker,
            s.cache_key.chars().take(19).collect::<String>(),
        )?;
    }
    Ok(())
}
