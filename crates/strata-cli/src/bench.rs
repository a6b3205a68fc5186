//! `strata bench WORKLOAD`: the workload built on the local daemon, on a
//! cluster and with BuildKit, cold then warm, in one run; a table here,
//! JSON and an HTML report on disk.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use strata_bench::run::{Docker, Strata, Target, run};
use strata_bench::{Report, Summary, TargetRun, Workload};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The workload file (`examples/bench/ci.toml` is one).
    workload: PathBuf,
    /// Also build on this cluster (its `client.toml`); repeatable.
    #[arg(long, value_name = "FILE")]
    cluster: Vec<PathBuf>,
    /// Leave out the local daemon.
    #[arg(long)]
    no_local: bool,
    /// BuildKit through `docker build`: `auto` when a dockerd answers
    /// (DOCKER_HOST) and has the workload's base image, `on` (it must),
    /// `off`.
    #[arg(long, value_enum, default_value = "auto")]
    docker: DockerUse,
    /// The docker client to run (one whose `docker build` uses BuildKit).
    #[arg(
        long,
        env = "STRATA_BENCH_DOCKER",
        default_value = "docker",
        value_name = "PATH"
    )]
    docker_cli: PathBuf,
    /// Another seed than the file's: new contents, so a cold run on caches
    /// that have seen the workload.
    #[arg(long)]
    seed: Option<u64>,
    /// Run only the first pass (`cold`), not the same builds again.
    #[arg(long)]
    cold_only: bool,
    /// Where to write `report.json` and `report.html` (default:
    /// `strata-bench-NAME` here).
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DockerUse {
    Auto,
    On,
    Off,
}

pub fn bench(home: &Path, args: BenchArgs) -> Result<ExitCode> {
    let mut workload = Workload::load(&args.workload)?;
    if let Some(seed) = args.seed {
        workload.seed = seed;
    }
    let exe = std::env::current_exe().context("cannot find the strata executable")?;
    let scratch = tempfile::Builder::new()
        .prefix("strata-bench-")
        .tempdir()
        .context("cannot make a scratch directory")?;
    let jobs = workload.generate(&scratch.path().join("contexts"))?;
    let mut err = std::io::stderr().lock();

    let mut targets: Vec<Box<dyn Target>> = Vec::new();
    if !args.no_local {
        // Through this state directory's daemon, as the user's builds go.
        targets.push(Box::new(Strata {
            exe: exe.clone(),
            home: home.to_path_buf(),
            cluster: None,
            scratch: scratch.path().to_path_buf(),
        }));
    }
    for c in &args.cluster {
        strata_cluster::config::ClientConfig::load(c)?;
        targets.push(Box::new(Strata {
            exe: exe.clone(),
            home: home.to_path_buf(),
            cluster: Some(c.clone()),
            scratch: scratch.path().to_path_buf(),
        }));
    }
    let docker = Docker {
        exe: args.docker_cli.clone(),
    };
    match args.docker {
        DockerUse::Off => {}
        DockerUse::On | DockerUse::Auto => {
            let why_not = if !docker.reachable() {
                Some("no dockerd answers (DOCKER_HOST)".to_string())
            } else if workload.dockerfiles.is_none() && !docker.has(&workload.base) {
                Some(format!(
                    "dockerd has no {} (docker pull or docker load it)",
                    workload.base
                ))
            } else {
                None
            };
            match why_not {
                None => targets.push(Box::new(docker)),
                Some(why) if args.docker == DockerUse::On => bail!("BuildKit: {why}"),
                Some(why) => writeln!(err, "BuildKit left out: {why}")?,
            }
        }
    }
    if targets.is_empty() {
        bail!("nothing to measure: every target is left out");
    }

    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    writeln!(
        err,
        "{}: {} builds, {} at a time, on {} target(s){}",
        workload.name,
        jobs.len(),
        workload.concurrency,
        targets.len(),
        workload
            .ideal_seconds()
            .map(|s| format!("; ideal cold wall time {s:.1}s"))
            .unwrap_or_default()
    )?;
    drop(err);
    let phases: &[&str] = if args.cold_only {
        &["cold"]
    } else {
        &["cold", "warm"]
    };
    let mut runs = Vec::new();
    for phase in phases {
        for t in &targets {
            let bar = ProgressBar::with_draw_target(
                Some(jobs.len() as u64),
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    ProgressDrawTarget::stderr()
                } else {
                    ProgressDrawTarget::hidden()
                },
            );
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:.bold} [{bar:30}] {pos}/{len} {msg} {elapsed}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(format!("{} ({phase})", t.name()));
            let (builds, wall) = run(t.as_ref(), &jobs, workload.concurrency, &|done, failed| {
                bar.set_position(done as u64);
                if failed > 0 {
                    bar.set_message(format!("{failed} failed"));
                }
            });
            bar.finish_and_clear();
            let summary = Summary::of(&builds, wall);
            let _ = writeln!(
                std::io::stderr().lock(),
                "{} ({phase}): {}/{} builds in {:.1}s, {:.1} builds/min",
                t.name(),
                summary.builds - summary.failed,
                summary.builds,
                summary.wall_seconds,
                summary.builds_per_minute
            );
            runs.push(TargetRun {
                target: t.name(),
                phase: (*phase).to_string(),
                summary,
                builds,
            });
        }
    }
    let report = Report {
        ideal_seconds: workload.ideal_seconds(),
        workload,
        started,
        runs,
    };
    let dir = args.output.unwrap_or_else(|| {
        PathBuf::from(format!(
            "strata-bench-{}",
            report
                .workload
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect::<String>()
        ))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
    let json = dir.join("report.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    let html = dir.join("report.html");
    std::fs::write(&html, report.html())
        .with_context(|| format!("cannot write {}", html.display()))?;
    let mut out = std::io::stdout().lock();
    write!(out, "{}", report.table())?;
    writeln!(out, "report: {} and {}", html.display(), json.display())?;
    let failed: usize = report.runs.iter().map(|r| r.summary.failed).sum();
    if failed > 0 {
        let first = report
            .runs
            .iter()
            .find_map(|r| r.summary.first_error.clone())
            .unwrap_or_default();
        bail!("{failed} build(s) failed; the first:\n{first}");
    }
    Ok(ExitCode::SUCCESS)
}
