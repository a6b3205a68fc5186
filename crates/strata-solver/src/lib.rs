//! strata's solver: turns a [`Plan`] into results.
//!
//! Stages run at the same time (at most `jobs` steps at once), each once
//! its base stage is done; a step that reads another stage (`COPY
//! --from`, a `RUN --mount=from`) waits for that stage alone, so the steps
//! before it run while that stage builds. Inside a stage each step's
//! cache key is computed from its parent's key, its op and the content of
//! its inputs (which a [`Worker`] measures), then looked up in the
//! [`CacheIndex`](strata_cache::CacheIndex); only a miss is executed,
//! and identical keys in flight run once. A `COPY --from` whose source
//! produced the same bytes as before therefore stays cached even when the
//! source stage re-ran (early cutoff).
//!
//! The solver sees ops and keys, never Dockerfile syntax, files or
//! processes: the worker does the work.

mod id;
mod solve;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_cas::Digest;
use strata_oci::{ImageConfig, LayerRef};
use strata_plan::{Plan, StagePlan, Step};
use tokio_util::sync::CancellationToken;

pub use id::{MAX_BUILD_ID, new_build_id, valid_build_id};
pub use solve::{Flights, Solver};

/// The result of a stage: its key, layer chain and final image config.
#[derive(Debug, Clone, PartialEq)]
pub struct StageResult {
    /// The key of its last step (or of its base, with no steps).
    pub key: Digest,
    /// Its layer chain, bottom first.
    pub layers: Vec<LayerRef>,
    /// Its image config, `rootfs`, `history` and `created` filled in.
    pub config: ImageConfig,
}

/// Receives a step's output as it is produced.
pub type Output = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Receives the name of the node a step was placed on.
pub type Placed = Arc<dyn Fn(&str) + Send + Sync>;

/// Told what moving a step's inputs to its node took: bytes, seconds.
pub type Fetched = Arc<dyn Fn(u64, f64) + Send + Sync>;

/// A step of a plan, by index, with the stages finished when its stage
/// began: everything a worker needs to measure or run it, owned, so a
/// worker may hand it to another thread or send it over the network.
/// Made only by [`StepAt::new`], which checks the indices.
#[derive(Clone)]
pub struct StepAt {
    plan: Arc<Plan>,
    stage: usize,
    step: usize,
    sources: Arc<[Option<StageResult>]>,
}

impl StepAt {
    /// A step of `plan`; `None` when the plan has no such step.
    pub fn new(
        plan: Arc<Plan>,
        stage: usize,
        step: usize,
        sources: Arc<[Option<StageResult>]>,
    ) -> Option<StepAt> {
        (step < plan.stages.get(stage)?.steps.len()).then_some(StepAt {
            plan,
            stage,
            step,
            sources,
        })
    }

    /// The plan.
    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// The plan index of its stage and its index in that stage's steps.
    pub fn index(&self) -> (usize, usize) {
        (self.stage, self.step)
    }

    /// Results of the plan's stages finished when its stage began, by
    /// plan index.
    pub fn sources(&self) -> &[Option<StageResult>] {
        &self.sources
    }

    /// Its stage.
    pub fn stage(&self) -> &StagePlan {
        &self.plan.stages[self.stage]
    }

    /// The step.
    pub fn step(&self) -> &Step {
        &self.stage().steps[self.step]
    }
}

/// One step for a worker to run.
#[derive(Clone)]
pub struct Job {
    /// The step.
    pub at: StepAt,
    /// The layer chain it runs on top of.
    pub parent: Vec<LayerRef>,
    /// Where its output goes.
    pub output: Output,
    /// Told the node's name once the step has one to run on (a cluster
    /// places steps on workers; one machine has no one to name).
    pub placed: Placed,
    /// Told what fetching the step's inputs to its node took (a cluster
    /// worker fetches them from peers; one machine has them).
    pub fetched: Fetched,
    /// Cancelled when the build is.
    pub cancel: CancellationToken,
}

/// How a step on a worker ended without a result: what the solver does
/// next depends on it, never on a message's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// The step failed: the build fails with it.
    Failed,
    /// The build was cancelled.
    Cancelled,
    /// The worker holding the stage's filesystem is gone (a cluster node
    /// died): the stage starts over elsewhere.
    Lost,
}

/// A step that failed on a worker. It crosses the network whole (a
/// cluster worker's failure reaches the coordinator's solver as it was
/// made), so its causes travel as text.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct WorkerError {
    /// What kind of end it was.
    pub kind: Failure,
    /// What happened.
    pub message: String,
    /// What caused it, outermost first: each the message of the error
    /// under the one before.
    pub causes: Vec<String>,
    /// The last lines the step printed, if it ran a process.
    pub tail: Vec<String>,
}

impl WorkerError {
    /// A failure with a message and no output.
    pub fn new(message: impl Into<String>) -> WorkerError {
        WorkerError {
            kind: Failure::Failed,
            message: message.into(),
            causes: Vec::new(),
            tail: Vec::new(),
        }
    }

    /// A failure from `error`, its sources kept as the causes.
    pub fn from_error(error: &(dyn std::error::Error + 'static)) -> WorkerError {
        WorkerError {
            causes: Causes::of(error),
            ..WorkerError::new(error.to_string())
        }
    }

    /// The worker running the stage is gone.
    pub fn lost(message: impl Into<String>) -> WorkerError {
        WorkerError {
            kind: Failure::Lost,
            ..WorkerError::new(message)
        }
    }

    /// The build was cancelled while the step ran or waited.
    pub fn cancelled() -> WorkerError {
        WorkerError {
            kind: Failure::Cancelled,
            ..WorkerError::new("cancelled")
        }
    }

    /// The same failure, said as part of `what`: `what: message`.
    pub fn within(self, what: &str) -> WorkerError {
        WorkerError {
            message: format!("{what}: {}", self.message),
            ..self
        }
    }

    /// The same failure, as the end of the worker holding the stage.
    pub fn as_lost(self) -> WorkerError {
        WorkerError {
            kind: Failure::Lost,
            ..self
        }
    }

    /// The same failure, with the last lines the step printed.
    pub fn with_tail(self, tail: Vec<String>) -> WorkerError {
        WorkerError { tail, ..self }
    }
}

/// The causes of a failed step, as an error chain: each one's source is
/// the next, so the CLI prints them as `caused by` lines.
#[derive(Debug, Clone)]
pub struct Causes {
    message: String,
    next: Option<Box<Causes>>,
}

impl Causes {
    /// Causes kept at most: a chain is this deep only if something is
    /// wrong, and its links (made on another node) are dropped one inside
    /// another.
    pub const MAX: usize = 16;

    /// The messages of `error`'s sources, outermost first, the first
    /// [`Causes::MAX`] of them: what crosses the wire of a chain.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
        std::iter::successors(error.source(), |e| e.source())
            .take(Self::MAX)
            .map(ToString::to_string)
            .collect()
    }

    /// `causes`, outermost first, the first [`Causes::MAX`] of them;
    /// `None` when there are none.
    pub fn new(causes: &[String]) -> Option<Causes> {
        let mut chain = None;
        for message in causes.iter().take(Self::MAX).rev() {
            chain = Some(Causes {
                message: message.clone(),
                next: chain.map(Box::new),
            });
        }
        chain
    }
}

impl std::fmt::Display for Causes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Causes {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.next
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

/// Where steps run. The embedded build has one, in-process; a cluster
/// puts workers on other machines behind the same calls. Every call that
/// may wait (on a disk, a process or the network) is async: the solver
/// awaits it on the runtime and never parks a thread for it.
#[async_trait::async_trait]
pub trait Worker: Send + Sync + 'static {
    /// Digests of the content a step reads besides its parent filesystem:
    /// the files a COPY selects, the sources a RUN bind-mounts. Asked only
    /// of a step that reads something.
    async fn inputs(&self, at: &StepAt) -> Result<Vec<Digest>, WorkerError>;

    /// Whether every blob of a cached chain is usable here.
    fn has_layers(&self, layers: &[LayerRef]) -> bool;

    /// Runs a step; returns the layer it added, or `None` if it changed no file.
    async fn execute(&self, job: Job) -> Result<Option<LayerRef>, WorkerError>;

    /// Makes a layer a step added safe to name in the cache index: a
    /// cluster first copies it to more workers, so losing one loses no
    /// cache. The solver records the step only after this returns; the
    /// build goes on meanwhile.
    async fn publish(&self, layer: LayerRef) -> Result<(), WorkerError> {
        let _ = layer;
        Ok(())
    }

    /// This worker's name, for reports.
    fn name(&self) -> String;

    /// Where the plan's stage `stage` runs, for reports (a cluster names
    /// the node).
    fn runs_on(&self, stage: usize) -> String {
        let _ = stage;
        self.name()
    }

    /// The solver is done with the plan's stage `stage` (its last step
    /// finished or was cached, or it failed): a cluster frees the node's
    /// slot.
    fn stage_done(&self, stage: usize) {
        let _ = stage;
    }
}

/// What happened to a step, for progress displays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// It started running.
    Started,
    /// It runs on this node of a cluster.
    Placed(String),
    /// Its result was found in the cache.
    Cached,
    /// It printed this.
    Output(Vec<u8>),
    /// It finished, taking this long.
    Done(f64),
    /// It failed with this message.
    Failed(String),
}

/// A progress event about one step (or a stage's `FROM`, number 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Stage name.
    pub stage: String,
    /// Step number within the stage (the base is 1 when it is an image).
    pub number: usize,
    /// Steps in the stage.
    pub total: usize,
    /// The instruction.
    pub label: String,
    /// What happened.
    pub kind: EventKind,
}

/// Receives progress events.
pub type Progress = Arc<dyn Fn(Event) + Send + Sync>;

/// How to solve.
#[derive(Clone)]
pub struct SolveOptions {
    /// Ignore the cache (results are still recorded).
    pub no_cache: bool,
    /// Ignore the cache for the steps of these stages only
    /// (`--no-cache-filter`).
    pub no_cache_stages: Vec<String>,
    /// Most steps of this build running at once.
    pub jobs: usize,
    /// Slots every build of the node shares: with them, a step runs only
    /// once it holds one, so concurrent builds together stay within the
    /// node's limit.
    pub slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Cancels the build.
    pub cancel: CancellationToken,
    /// Progress events go here.
    pub progress: Progress,
    /// `SOURCE_DATE_EPOCH`: dates every history entry and the image
    /// config; without it they carry when their steps' results were made.
    pub source_date_epoch: Option<i64>,
}

/// A step as the build report records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Stage name.
    pub stage: String,
    /// Step number within the stage.
    pub number: usize,
    /// The instruction.
    pub instruction: String,
    /// Its line in the Dockerfile.
    pub line: usize,
    /// Its cache key.
    pub cache_key: String,
    /// Whether it came from the cache.
    pub cached: bool,
    /// When it started (seconds since the epoch).
    pub started: f64,
    /// When it finished.
    pub finished: f64,
    /// Which worker ran (or found) it.
    pub worker: String,
    /// When it got a slot and began to run, if it ran here: the time
    /// before that, since `started`, it waited (for a slot, or for the
    /// stages it reads).
    #[serde(default)]
    pub running: Option<f64>,
    /// Bytes its node fetched from peers before it ran.
    #[serde(default)]
    pub fetched_bytes: u64,
    /// Seconds that took, from `running` on.
    #[serde(default)]
    pub fetch_seconds: f64,
}

/// A solved plan.
#[derive(Debug, Clone)]
pub struct Solved {
    /// Each stage's result, by plan index.
    pub stages: Vec<StageResult>,
    /// Every step, in the order they finished.
    pub steps: Vec<StepRecord>,
}

/// A step that failed, where it is in the Dockerfile.
#[derive(Debug, thiserror::Error)]
#[error("[{stage} {number}/{total}] {label} (line {line}): {message}")]
pub struct StepFailed {
    /// Stage name.
    pub stage: String,
    /// Step number.
    pub number: usize,
    /// Steps in the stage.
    pub total: usize,
    /// The instruction.
    pub label: String,
    /// Its line.
    pub line: usize,
    /// What went wrong.
    pub message: String,
    /// What caused it.
    #[source]
    pub causes: Option<Causes>,
    /// The last lines it printed.
    pub tail: Vec<String>,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum SolveError {
    /// A step failed.
    #[error(transparent)]
    Step(Box<StepFailed>),
    /// The build was cancelled.
    #[error("build cancelled")]
    Cancelled,
    /// The cache index failed.
    #[error(transparent)]
    Cache(#[from] strata_cache::Error),
    /// A task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

/// `text` followed by `causes`, one `caused by:` line each: how the CLI
/// prints an error's chain, and how a coordinator sends a failed build's.
pub fn with_causes(
    mut text: String,
    causes: impl IntoIterator<Item = impl std::fmt::Display>,
) -> String {
    for cause in causes {
        text.push_str(&format!("\n  caused by: {cause}"));
    }
    text
}

impl SolveError {
    /// The error as a build reports it ([`SolveError::located`] in the
    /// Dockerfile `file`), with what caused a failed step.
    pub fn reported(&self, file: &str) -> String {
        let first = self.causes().map(|c| c as &dyn std::error::Error);
        with_causes(
            self.located(file),
            std::iter::successors(first, |c| c.source()),
        )
    }

    /// What caused a failed step, when the worker said.
    pub fn causes(&self) -> Option<&Causes> {
        match self {
            SolveError::Step(f) => f.causes.as_ref(),
            _ => None,
        }
    }

    /// The error as a build reports it: a failed step located in the
    /// Dockerfile `file` (`FILE:LINE: [STAGE N/M] INSTRUCTION: why`), any
    /// other failure as it is.
    pub fn located(&self, file: &str) -> String {
        match (self, self.step_title()) {
            (SolveError::Step(f), Some(title)) => {
                format!("{file}:{}: {title}: {}", f.line, f.message)
            }
            _ => self.to_string(),
        }
    }

    /// A failed step's `[STAGE N/M] INSTRUCTION` (none for other failures).
    pub fn step_title(&self) -> Option<String> {
        match self {
            SolveError::Step(f) => Some(format!(
                "[{} {}/{}] {}",
                f.stage, f.number, f.total, f.label
            )),
            _ => None,
        }
    }

    /// A failed step's last output lines (none for other failures).
    pub fn tail(&self) -> &[String] {
        match self {
            SolveError::Step(f) => &f.tail,
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot commit the step's layer")]
    struct Commit(#[source] Write);

    #[derive(Debug, thiserror::Error)]
    #[error("writing blob 1234")]
    struct Write(#[source] std::io::Error);

    #[test]
    fn a_lost_worker_s_failure_keeps_its_causes_under_its_words() {
        let e = WorkerError::from_error(&Write(std::io::Error::other("reset")))
            .within("worker w-1 is gone")
            .as_lost();
        assert_eq!(e.kind, Failure::Lost);
        assert_eq!(e.message, "worker w-1 is gone: writing blob 1234");
        assert_eq!(e.causes, ["reset"]);
    }

    #[test]
    fn a_failed_step_keeps_the_worker_s_causes_as_its_error_chain() {
        let e = WorkerError::from_error(&Commit(Write(std::io::Error::other("disk full"))));
        assert_eq!(e.kind, Failure::Failed);
        assert_eq!(e.message, "cannot commit the step's layer");
        assert_eq!(e.causes, ["writing blob 1234", "disk full"]);
        // As it reaches the CLI: each cause one link further in.
        let failed = SolveError::Step(Box::new(StepFailed {
            stage: "app".into(),
            number: 2,
            total: 3,
            label: "RUN make".into(),
            line: 4,
            message: e.message,
            causes: Causes::new(&e.causes),
            tail: e.tail,
        }));
        let mut chain = Vec::new();
        let mut next = std::error::Error::source(&failed);
        while let Some(c) = next {
            chain.push(c.to_string());
            next = c.source();
        }
        assert_eq!(chain, ["writing blob 1234", "disk full"]);
        assert_eq!(
            failed.located("Dockerfile"),
            "Dockerfile:4: [app 2/3] RUN make: cannot commit the step's layer"
        );
    }

    #[test]
    fn a_chain_from_another_node_is_kept_to_a_bound() {
        let long: Vec<String> = (0..1000).map(|i| format!("cause {i}")).collect();
        let mut depth = 0;
        let causes = Causes::new(&long).unwrap();
        let mut next: Option<&dyn std::error::Error> = Some(&causes);
        while let Some(c) = next {
            depth += 1;
            next = c.source();
        }
        assert_eq!(depth, Causes::MAX);
        assert!(Causes::new(&[]).is_none());
    }
}
