//! `strata dockerfile check|dump`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use strata_dockerfile::{Dockerfile, Error as DockerfileError, Platform, predefined_args};

#[derive(Debug, Subcommand)]
pub enum DockerfileCommand {
    /// Parse and validate a Dockerfile; errors are printed as
    /// `FILE:LINE:COL: message` with the offending line.
    Check(CheckArgs),
    /// Print the parsed instructions in BuildKit's parse-tree format.
    Dump(FileArg),
}

#[derive(Debug, Args)]
pub struct FileArg {
    /// The Dockerfile to read.
    #[arg(short = 'f', long = "file", default_value = "Dockerfile")]
    file: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    file: FileArg,
    /// A build argument, as `strata build` would get it.
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    build_args: Vec<String>,
    /// The stage to check (and the stages it needs); default: the last.
    #[arg(long)]
    target: Option<String>,
}

pub fn run(cmd: DockerfileCommand) -> Result<ExitCode> {
    match cmd {
        DockerfileCommand::Dump(f) => {
            let bytes = read(&f.file)?;
            match strata_dockerfile::parse(&bytes) {
                Ok(ast) => {
                    std::io::stdout().lock().write_all(ast.dump().as_bytes())?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(print_located(&e.with_file(&f.file), &bytes)),
            }
        }
        DockerfileCommand::Check(args) => check(args),
    }
}

fn check(args: CheckArgs) -> Result<ExitCode> {
    let path = &args.file.file;
    let bytes = read(path)?;
    let build_args = parse_build_args(&args.build_args, &|k| std::env::var(k).ok())?;
    let df = match Dockerfile::parse(&bytes) {
        Ok(df) => df,
        Err(e) => return Ok(print_located(&e.with_file(path), &bytes)),
    };
    let host = Platform::host();
    let predefined = predefined_args(&host, &host, args.target.as_deref());
    let graph = match df.check(&build_args, &predefined, args.target.as_deref()) {
        Ok(g) => g,
        Err(e) => return Ok(print_located(&e.with_file(path), &bytes)),
    };
    let mut err = std::io::stderr().lock();
    let config = strata_dockerfile::lint::CheckConfig::of(&df, &build_args)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for f in strata_dockerfile::lint::check(&df, &config) {
        writeln!(
            err,
            "{}:{}: warning: {}: {}",
            path.display(),
            f.line,
            f.rule,
            f.message
        )?;
    }
    let instructions: usize = df.stages.iter().map(|s| s.instructions.len()).sum();
    writeln!(
        std::io::stdout().lock(),
        "{}: ok: {} stage(s), {} instruction(s); target {} needs {} stage(s)",
        path.display(),
        df.stages.len(),
        instructions,
        df.stages[graph.target].display_name(),
        graph.order.len()
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Reads `KEY=VALUE` pairs; a bare `KEY` takes its value from the
/// environment, as `docker build --build-arg KEY` does.
pub fn parse_build_args(
    raw: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in raw {
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match env(a) {
                Some(v) => (a.clone(), v),
                None => continue,
            },
        };
        if k.is_empty() {
            bail!("invalid --build-arg {a:?}: the name is empty");
        }
        out.insert(k, v);
    }
    Ok(out)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read Dockerfile {}", path.display()))
}

/// Prints `FILE:LINE:COL: message`, the offending line and a caret under
/// the column, and returns the failure exit code.
fn print_located(e: &DockerfileError, source: &[u8]) -> ExitCode {
    let mut out = std::io::stderr().lock();
    let _ = writeln!(out, "{e}");
    if let Some(pos) = e.position() {
        let text = String::from_utf8_lossy(source);
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        if let Some(line) = text.lines().nth(pos.line.saturating_sub(1)) {
            let gutter = pos.line.to_string();
            // Keep tabs so the caret lines up under them.
            let pad: String = line
                .chars()
                .take(pos.column.saturating_sub(1))
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            let _ = writeln!(out, " {gutter} | {line}");
            let _ = writeln!(out, " {} | {pad}^", " ".repeat(gutter.len()));
        }
    }
    ExitCode::FAILURE
}
