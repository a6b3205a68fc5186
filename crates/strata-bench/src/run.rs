//! Running a workload on a target: its builds, `concurrency` at a time,
//! each timed from the moment its command starts to the moment it exits.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::workload::Job;

/// A step of a measured build, as its report tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The node that ran it (or made the cached result).
    pub worker: String,
    /// When it started and finished, seconds since the epoch.
    pub started: f64,
    /// When it finished.
    pub finished: f64,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// How one build went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// The build's place in the workload.
    pub index: usize,
    /// Its image name.
    pub tag: String,
    /// Seconds from the start of the target's run to the build's start.
    pub start: f64,
    /// Seconds it took.
    pub seconds: f64,
    /// Why it failed, if it did (the end of its output).
    pub error: Option<String>,
    /// Steps that ran.
    pub steps_run: usize,
    /// Steps found in the cache.
    pub steps_cached: usize,
    /// Bytes moved to the client (a cluster build's layers).
    pub bytes_moved: u64,
    /// Its steps, when the target reports them.
    pub steps: Vec<Step>,
}

/// Something that builds a workload's jobs: the local daemon, a cluster,
/// BuildKit.
pub trait Target: Sync {
    /// Its name in the report.
    fn name(&self) -> String;
    /// Builds `job`; `Err` with the reason when the build failed.
    fn build(&self, job: &Job) -> Result<Outcome, String>;
}

/// What a finished build says of itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Steps that ran.
    pub steps_run: usize,
    /// Steps from the cache.
    pub steps_cached: usize,
    /// Bytes moved to the client.
    pub bytes_moved: u64,
    /// Its steps, when known.
    pub steps: Vec<Step>,
}

/// Runs every job on `target`, `concurrency` at a time, in the jobs'
/// order; `progress(done, failed)` after each. Returns the builds in
/// workload order and the run's wall time.
pub fn run(
    target: &dyn Target,
    jobs: &[Job],
    concurrency: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> (Vec<Measured>, f64) {
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::with_capacity(jobs.len()));
    let begun = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(i) else { break };
                    let start = begun.elapsed().as_secs_f64();
                    let clock = Instant::now();
                    let result = target.build(job);
                    let seconds = clock.elapsed().as_secs_f64();
                    let m = match result {
                        Ok(o) => Measured {
                            index: job.index,
                            tag: job.tag.clone(),
                            start,
                            seconds,
                            error: None,
                            steps_run: o.steps_run,
                            steps_cached: o.steps_cached,
                            bytes_moved: o.bytes_moved,
                            steps: o.steps,
                        },
                        Err(e) => Measured {
                            index: job.index,
                            tag: job.tag.clone(),
                            start,
                            seconds,
                            error: Some(e),
                            steps_run: 0,
                            steps_cached: 0,
                            bytes_moved: 0,
                            steps: Vec::new(),
                        },
                    };
                    let mut all = done
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    all.push(m);
                    let failed = all.iter().filter(|m| m.error.is_some()).count();
                    progress(all.len(), failed);
                }
            });
        }
    });
    let wall = begun.elapsed().as_secs_f64();
    let mut all = done
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    all.sort_by_key(|m| m.index);
    (all, wall)
}

/// The last lines of a failed command's output: why it failed.
fn tail(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(out);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// `strata build`, through the local daemon or (with `cluster`) a
/// cluster, as a user runs it.
#[derive(Debug, Clone)]
pub struct Strata {
    /// The `strata` executable.
    pub exe: PathBuf,
    /// The state directory (`STRATA_HOME`) its commands use.
    pub home: PathBuf,
    /// `--cluster FILE`, for a cluster.
    pub cluster: Option<PathBuf>,
    /// Where reports go (one per build).
    pub scratch: PathBuf,
}

impl Target for Strata {
    fn name(&self) -> String {
        match &self.cluster {
            Some(c) => format!("strata cluster ({})", c.display()),
            None => "strata (local daemon)".into(),
        }
    }

    fn build(&self, job: &Job) -> Result<Outcome, String> {
        let report = self.scratch.join(format!(
            "report-{}-{}.json",
            job.index,
            self.cluster.is_some()
        ));
        let mut cmd = Command::new(&self.exe);
        cmd.env("STRATA_HOME", &self.home)
            .env_remove("STRATA_CLUSTER")
            .args(["build", "--progress", "quiet", "-t", &job.tag, "--report"])
            .arg(&report);
        if let Some(c) = &self.cluster {
            cmd.arg("--cluster").arg(c);
        }
        let out = cmd
            .arg(&job.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        if !out.status.success() {
            return Err(tail(&out.stderr));
        }
        let text = std::fs::read(&report)
            .map_err(|e| format!("no build report {}: {e}", report.display()))?;
        let _ = std::fs::remove_file(&report);
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| format!("unreadable build report {}: {e}", report.display()))?;
        let steps: Vec<Step> = v["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| Step {
                worker: s["worker"].as_str().unwrap_or("").to_string(),
                started: s["started"].as_f64().unwrap_or(0.0),
                finished: s["finished"].as_f64().unwrap_or(0.0),
                cached: s["cached"].as_bool().unwrap_or(false),
            })
            .collect();
        Ok(Outcome {
            steps_run: steps.iter().filter(|s| !s.cached).count(),
            steps_cached: steps.iter().filter(|s| s.cached).count(),
            bytes_moved: v["bytes_fetched"].as_u64().unwrap_or(0),
            steps,
        })
    }
}

/// `docker build` with BuildKit, on the dockerd `DOCKER_HOST` names (or
/// the default one).
#[derive(Debug, Clone)]
pub struct Docker {
    /// The `docker` client.
    pub exe: PathBuf,
}

impl Docker {
    /// Whether a dockerd answers.
    pub fn reachable(&self) -> bool {
        Command::new(&self.exe)
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Whether dockerd has `image`.
    pub fn has(&self, image: &str) -> bool {
        Command::new(&self.exe)
            .args(["image", "inspect", image])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Target for Docker {
    fn name(&self) -> String {
        "docker build (BuildKit)".into()
    }

    fn build(&self, job: &Job) -> Result<Outcome, String> {
        let out = Command::new(&self.exe)
            .env("DOCKER_BUILDKIT", "1")
            .args(["build", "--progress", "plain", "-t", &job.tag])
            .arg(&job.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        if !out.status.success() {
            return Err(tail(&out.stderr));
        }
        let (run, cached) = buildkit_steps(&String::from_utf8_lossy(&out.stderr));
        Ok(Outcome {
            steps_run: run,
            steps_cached: cached,
            bytes_moved: 0,
            steps: Vec::new(),
        })
    }
}

/// Steps run and cached in BuildKit's plain progress: every vertex named
/// `[stage n/m] INSTRUCTION` but `FROM`, cached when a `#N CACHED` line
/// follows.
fn buildkit_steps(plain: &str) -> (usize, usize) {
    let mut steps = std::collections::BTreeSet::new();
    let mut cached = std::collections::BTreeSet::new();
    for line in plain.lines() {
        let Some((vertex, rest)) = line.split_once(' ') else {
            continue;
        };
        if !vertex.starts_with('#') {
            continue;
        }
        if rest == "CACHED" {
            cached.insert(vertex.to_string());
        } else if rest.starts_with('[')
            && let Some((_, instruction)) = rest.split_once("] ")
            && !instruction.starts_with("FROM")
            && !rest.starts_with("[internal]")
        {
            steps.insert(vertex.to_string());
        }
    }
    let hit = steps.intersection(&cached).count();
    (steps.len() - hit, hit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildkit_s_plain_progress_gives_run_and_cached_steps() {
        let plain = "#1 [internal] load build definition from Dockerfile\n\
                     #5 [deps 1/2] FROM docker.io/library/busybox:latest\n\
                     #6 [deps 2/2] RUN sleep 3\n\
                     #6 CACHED\n\
                     #7 [stage-1 2/4] COPY --from=deps /deps /deps\n\
                     #7 CACHED\n\
                     #8 [stage-1 3/4] COPY src/ /src/\n\
                     #8 DONE 0.1s\n\
                     #9 [stage-1 4/4] RUN sleep 1\n\
                     #9 0.512 output\n";
        assert_eq!(buildkit_steps(plain), (2, 2));
    }

    struct Flaky;

    impl Target for Flaky {
        fn name(&self) -> String {
            "flaky".into()
        }
        fn build(&self, job: &Job) -> Result<Outcome, String> {
            if job.index == 2 {
                Err("step failed".into())
            } else {
                Ok(Outcome {
                    steps_run: 1,
                    ..Outcome::default()
                })
            }
        }
    }

    #[test]
    fn every_job_runs_once_and_failures_are_kept() {
        let jobs: Vec<Job> = (0..7)
            .map(|index| Job {
                index,
                service: index,
                commit: 0,
                tag: format!("t{index}"),
                dir: PathBuf::from("/nonexistent"),
            })
            .collect();
        let seen = Mutex::new(Vec::new());
        let (all, _) = run(&Flaky, &jobs, 3, &|done, failed| {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((done, failed));
        });
        assert_eq!(
            all.iter().map(|m| m.index).collect::<Vec<_>>(),
            (0..7).collect::<Vec<_>>()
        );
        assert_eq!(all[2].error.as_deref(), Some("step failed"));
        let seen = seen.into_inner().unwrap_or_default();
        assert_eq!(seen.last(), Some(&(7, 1)));
    }
}
