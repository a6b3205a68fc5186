//! Scheduling stages and steps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use strata_cache::{CacheEntry, CacheIndex};
use strata_cas::Digest;
use strata_oci::LayerRef;
use strata_plan::key::{image_key, scratch_key, step_key};
use strata_plan::{Base, Plan, StagePlan, StepMade, history_with_layers, image_created};
use tokio::sync::{OnceCell, Semaphore, watch};
use tracing::Instrument as _;

use crate::{
    Causes, Event, EventKind, Failure, Job, SolveError, SolveOptions, Solved, StageResult, StepAt,
    StepFailed, StepRecord, Worker, WorkerError,
};

/// One step being run: its result once it ran, and whether the build
/// that ran it has published it (copied its layer and recorded it).
struct FlightState {
    entry: OnceCell<CacheEntry>,
    published: watch::Sender<bool>,
}

impl Default for FlightState {
    fn default() -> FlightState {
        FlightState {
            entry: OnceCell::new(),
            published: watch::Sender::new(false),
        }
    }
}

type Flight = Arc<FlightState>;

/// Steps being executed right now, by key: a second request for the same
/// key waits for the first instead of running again. Solvers that share
/// one (a coordinator's concurrent builds) run identical steps once.
#[derive(Clone, Default)]
pub struct Flights(Arc<Mutex<HashMap<Digest, Flight>>>);

/// Runs plans against a worker and a cache index.
pub struct Solver {
    worker: Arc<dyn Worker>,
    cache: Arc<dyn CacheIndex>,
    in_flight: Flights,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Shared state of one solve.
struct Run {
    plan: Arc<Plan>,
    opts: SolveOptions,
    results: Mutex<Vec<Option<StageResult>>>,
    done: Vec<watch::Sender<bool>>,
    records: Mutex<Vec<StepRecord>>,
    jobs: Semaphore,
    error: Mutex<Option<SolveError>>,
    /// Steps that ran, being published and recorded in the cache index.
    publishing: Mutex<Vec<tokio::task::JoinHandle<Result<(), SolveError>>>>,
    /// When each step that ran here (stage, step) got its slot: on a
    /// cluster, when it was placed on a worker.
    running: Mutex<HashMap<(usize, usize), f64>>,
    /// What fetching each step's inputs took (bytes, seconds), on a
    /// cluster.
    fetches: Mutex<HashMap<(usize, usize), (u64, f64)>>,
}

impl Run {
    fn fail(&self, e: SolveError) {
        let mut slot = self.error.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(e);
        }
        self.opts.cancel.cancel();
    }

    /// Waits until every stage of `stages` is done: true then, false
    /// when the build is cancelled first (a stage that fails cancels it,
    /// its error recorded, so whatever waits on it gives up).
    async fn wait_for_stages(&self, stages: &[usize]) -> bool {
        for &d in stages {
            let Some(done) = self.done.get(d) else {
                return false;
            };
            let mut done = done.subscribe();
            tokio::select! {
                ready = done.wait_for(|ok| *ok) => {
                    if ready.is_err() {
                        return false;
                    }
                }
                () = self.opts.cancel.cancelled() => return false,
            }
        }
        true
    }

    fn snapshot(&self) -> Vec<Option<StageResult>> {
        self.results
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn event(&self, stage: &StagePlan, number: usize, label: &str, kind: EventKind) {
        (self.opts.progress)(Event {
            stage: stage.name.clone(),
            number,
            total: stage.total(),
            label: label.to_string(),
            kind,
        });
    }
}

impl Solver {
    /// A solver that runs steps on `worker` and caches them in `cache`.
    pub fn new(worker: Arc<dyn Worker>, cache: Arc<dyn CacheIndex>) -> Solver {
        Solver::sharing(worker, cache, Flights::default())
    }

    /// A solver whose steps in flight are shared with other solvers.
    pub fn sharing(
        worker: Arc<dyn Worker>,
        cache: Arc<dyn CacheIndex>,
        in_flight: Flights,
    ) -> Solver {
        Solver {
            worker,
            cache,
            in_flight,
        }
    }

    /// Solves `plan`: every stage it holds, the target among them.
    pub async fn solve(
        self: &Arc<Self>,
        plan: Arc<Plan>,
        opts: SolveOptions,
    ) -> Result<Solved, SolveError> {
        let mut measured = Measured::start();
        let solved = self.solve_plan(plan, opts).await;
        measured.outcome = Some(match &solved {
            Ok(_) => strata_metrics::Outcome::Succeeded,
            Err(SolveError::Cancelled) => strata_metrics::Outcome::Cancelled,
            Err(_) => strata_metrics::Outcome::Failed,
        });
        solved
    }

    async fn solve_plan(
        self: &Arc<Self>,
        plan: Arc<Plan>,
        opts: SolveOptions,
    ) -> Result<Solved, SolveError> {
        // Once per build, not per step: the build sees every result
        // recorded before it started.
        self.cache.sync().await?;
        let n = plan.stages.len();
        let done: Vec<watch::Sender<bool>> = (0..n).map(|_| watch::channel(false).0).collect();
        let run = Arc::new(Run {
            jobs: Semaphore::new(opts.jobs.max(1)),
            plan: Arc::clone(&plan),
            opts,
            results: Mutex::new(vec![None; n]),
            done,
            records: Mutex::new(Vec::new()),
            error: Mutex::new(None),
            publishing: Mutex::new(Vec::new()),
            running: Mutex::new(HashMap::new()),
            fetches: Mutex::new(HashMap::new()),
        });
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            // A stage starts once its base stage is done; each of its steps
            // that reads another stage waits for that one alone (below), as
            // BuildKit's vertices do, so a stage's first steps run while
            // the stages its later steps copy from are still building.
            let base = match plan.stages[i].base {
                Base::Stage(b) => vec![b],
                _ => Vec::new(),
            };
            let (me, run) = (Arc::clone(self), Arc::clone(&run));
            tasks.spawn(
                async move {
                    if !run.wait_for_stages(&base).await {
                        return;
                    }
                    match me.stage(&run, i).await {
                        Ok(result) => {
                            run.results.lock().unwrap_or_else(PoisonError::into_inner)[i] =
                                Some(result);
                            // Kept though no one waits yet: a later step reads it.
                            run.done[i].send_replace(true);
                        }
                        Err(e) => run.fail(e),
                    }
                }
                .in_current_span(),
            );
        }
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                run.fail(SolveError::Internal(e.to_string()));
            }
        }
        // Steps that ran are recorded even when the build failed after
        // them: a fixed build takes them from the cache.
        let publishing = std::mem::take(
            &mut *run
                .publishing
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for p in publishing {
            match p.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => run.fail(e),
                Err(e) => run.fail(SolveError::Internal(e.to_string())),
            }
        }
        let run =
            Arc::try_unwrap(run).map_err(|_| SolveError::Internal("solve still shared".into()))?;
        if let Some(e) = run
            .error
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
        {
            return Err(e);
        }
        if run.opts.cancel.is_cancelled() {
            return Err(SolveError::Cancelled);
        }
        let stages = run
            .results
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .into_iter()
            .map(|r| r.ok_or_else(|| SolveError::Internal("a stage produced no result".into())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Solved {
            stages,
            steps: run
                .records
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner),
        })
    }

    /// Solves stage `i`, starting it over (a few times) when the worker
    /// running it is lost.
    async fn stage(&self, run: &Arc<Run>, i: usize) -> Result<StageResult, SolveError> {
        let stage = &run.plan.stages[i];
        let mut attempt = 1;
        let outcome = loop {
            match self.stage_once(run, i).await {
                Err(StageFailure::Lost(e)) if attempt < STAGE_ATTEMPTS => {
                    tracing::warn!(stage = %stage.name, attempt, error = %e, "the stage's worker is gone; starting the stage over");
                    run.records
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .retain(|r| r.stage != stage.name);
                    attempt += 1;
                }
                Err(StageFailure::Lost(e) | StageFailure::Failed(e)) => break Err(e),
                Ok(r) => break Ok(r),
            }
        };
        self.worker.stage_done(i);
        outcome
    }

    async fn stage_once(&self, run: &Arc<Run>, i: usize) -> Result<StageResult, StageFailure> {
        let stage = &run.plan.stages[i];
        let mut results: Arc<[Option<StageResult>]> = run.snapshot().into();
        let (mut key, mut layers, base_history) = match &stage.base {
            Base::Scratch => (scratch_key(&stage.platform), Vec::new(), Vec::new()),
            Base::Image(img) => {
                run.event(stage, 1, &stage.from_label, EventKind::Done(0.0));
                (
                    image_key(&img.manifest),
                    img.layers.clone(),
                    stage.base_history.clone(),
                )
            }
            Base::Stage(b) => {
                let r = results[*b].as_ref().ok_or_else(|| {
                    StageFailure::Failed(SolveError::Internal("base stage unfinished".into()))
                })?;
                (r.key, r.layers.clone(), r.config.history.clone())
            }
        };
        let mut made = Vec::with_capacity(stage.steps.len());
        for (s, step) in stage.steps.iter().enumerate() {
            if run.opts.cancel.is_cancelled() {
                return Err(StageFailure::Failed(SolveError::Cancelled));
            }
            let step_err = |e: WorkerError| {
                let err = SolveError::Step(Box::new(StepFailed {
                    stage: stage.name.clone(),
                    number: step.number,
                    total: stage.total(),
                    label: step.label.clone(),
                    line: step.line,
                    message: e.message,
                    causes: Causes::new(&e.causes),
                    tail: e.tail,
                }));
                match e.kind {
                    Failure::Cancelled => StageFailure::Failed(SolveError::Cancelled),
                    Failure::Lost => StageFailure::Lost(err),
                    Failure::Failed => StageFailure::Failed(err),
                }
            };
            let reads = step.op.stage_inputs();
            if !reads.is_empty() {
                if !run.wait_for_stages(&reads).await {
                    return Err(StageFailure::Failed(SolveError::Cancelled));
                }
                results = run.snapshot().into();
            }
            let started = now();
            let at = StepAt::new(Arc::clone(&run.plan), i, s, Arc::clone(&results)).ok_or_else(
                || {
                    StageFailure::Failed(SolveError::Internal(format!(
                        "no step {s} in stage {i} of the plan"
                    )))
                },
            )?;
            // A step that reads nothing besides its parent needs no worker
            // to key it.
            let inputs = if step.op.reads().is_empty() {
                Vec::new()
            } else {
                self.worker.inputs(&at).await.map_err(step_err)?
            };
            let step_key = step_key(&key, &step.op, &inputs);
            let skip_cache = run.opts.no_cache || run.opts.no_cache_stages.contains(&stage.name);
            let cached = if skip_cache {
                None
            } else {
                self.cache.get(&step_key).await.map_err(index_err)?
            };
            let cached = cached.filter(|e| self.worker.has_layers(&e.layers));
            if !skip_cache {
                strata_metrics::cache_lookup(cached.is_some());
            }
            let (entry, result) = match cached {
                Some(entry) => {
                    self.cache.touch(&step_key).await.map_err(index_err)?;
                    run.event(stage, step.number, &step.label, EventKind::Cached);
                    (entry, strata_metrics::StepResult::Cached)
                }
                None => {
                    let (entry, ran) = self
                        .share_or_run(run, at, step_key, &layers)
                        .await
                        .map_err(step_err)?;
                    let (flight, shared) = ran;
                    let publishing = if shared {
                        run.event(stage, step.number, &step.label, EventKind::Cached);
                        // A build sharing a step ends, as the one running
                        // it does, once it is published.
                        let mut published = flight.published.subscribe();
                        tokio::spawn(async move {
                            // A publisher gone without a word has
                            // published, or failed, all it will.
                            let _ = published.wait_for(|p| *p).await;
                            Ok(())
                        })
                    } else {
                        self.publish(step_key, entry.clone(), flight)
                    };
                    run.publishing
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(publishing);
                    let result = if shared {
                        strata_metrics::StepResult::Shared
                    } else {
                        strata_metrics::StepResult::Executed
                    };
                    (entry, result)
                }
            };
            let was_cached = result != strata_metrics::StepResult::Executed;
            let producer = entry.producer.clone();
            layers = entry.layers;
            made.push(StepMade {
                layer: entry.made_layer,
                created: i64::try_from(entry.created).unwrap_or(i64::MAX),
            });
            key = step_key;
            let (fetched_bytes, fetch_seconds) = if was_cached {
                (0, 0.0)
            } else {
                run.fetches
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&(i, s))
                    .copied()
                    .unwrap_or((0, 0.0))
            };
            let finished = now();
            strata_metrics::step_finished(&step.label, result, (finished - started).max(0.0));
            run.records
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(StepRecord {
                    stage: stage.name.clone(),
                    number: step.number,
                    instruction: step.label.clone(),
                    line: step.line,
                    cache_key: step_key.to_string(),
                    cached: was_cached,
                    started,
                    finished,
                    // A cached step names the worker that made it.
                    worker: if was_cached {
                        producer
                    } else {
                        self.worker.runs_on(i)
                    },
                    running: if was_cached {
                        None
                    } else {
                        run.running
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get(&(i, s))
                            .copied()
                    },
                    fetched_bytes,
                    fetch_seconds,
                });
        }
        let mut config = stage.config.clone();
        config.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.to_string()).collect();
        let epoch = run.opts.source_date_epoch;
        let now = i64::try_from(strata_cas::now_unix()).unwrap_or(i64::MAX);
        config.history = history_with_layers(stage, base_history, &made, epoch, now);
        config.created = image_created(&config.history, epoch);
        Ok(StageResult {
            key,
            layers,
            config,
        })
    }

    /// The step's result: from the build running the same step now (or
    /// that ran it and is publishing it), else from running it here; its
    /// flight, for the build to end once it is published; and whether it
    /// was shared (not run here).
    async fn share_or_run(
        &self,
        run: &Arc<Run>,
        at: StepAt,
        step_key: Digest,
        layers: &[LayerRef],
    ) -> Result<(CacheEntry, (Flight, bool)), WorkerError> {
        loop {
            let flight = Arc::clone(
                self.in_flight
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(step_key)
                    .or_default(),
            );
            let mut ran = false;
            let done = flight
                .entry
                .get_or_try_init(|| async {
                    ran = true;
                    self.execute(run, at.clone(), layers).await
                })
                .await
                .cloned();
            let drop_flight = || {
                let mut map = self
                    .in_flight
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if map.get(&step_key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                    map.remove(&step_key);
                }
            };
            let entry = match done {
                Ok(entry) => entry,
                Err(e) => {
                    // Builds already waiting on it try the step themselves.
                    drop_flight();
                    return Err(e);
                }
            };
            // A result made on a worker lost since is no use: drop it and
            // run the step.
            if !ran && !self.worker.has_layers(&entry.layers) {
                drop_flight();
                continue;
            }
            return Ok((entry, (flight, !ran)));
        }
    }

    /// Publishes the layer a step made and then records the step in the
    /// cache index, in the background. Until then the step stays in
    /// flight, so concurrent builds share it rather than run it again.
    fn publish(
        &self,
        step_key: Digest,
        entry: CacheEntry,
        flight: Flight,
    ) -> tokio::task::JoinHandle<Result<(), SolveError>> {
        let (worker, cache, flights) = (
            Arc::clone(&self.worker),
            Arc::clone(&self.cache),
            self.in_flight.clone(),
        );
        tokio::spawn(
            async move {
                let made = entry.layers.last().copied().filter(|_| entry.made_layer);
                let recorded = match made {
                    Some(layer) => match worker.publish(layer).await {
                        Ok(()) => cache.put(&step_key, &entry).await,
                        Err(e) => {
                            // Not recorded: the cache must not name a layer
                            // no live node holds.
                            tracing::warn!(layer = %layer.blob, error = %e.message, "the step's layer could not be published; the step is not cached");
                            Ok(())
                        }
                    },
                    None => cache.put(&step_key, &entry).await,
                };
                let mut map = flights.0.lock().unwrap_or_else(PoisonError::into_inner);
            if map.get(&step_key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                map.remove(&step_key);
            }
                drop(map);
                flight.published.send_replace(true);
                recorded.map_err(SolveError::from)
            }
            .in_current_span(),
        )
    }

    /// Runs one step on the worker and returns what to cache.
    async fn execute(
        &self,
        run: &Arc<Run>,
        at: StepAt,
        parent: &[LayerRef],
    ) -> Result<CacheEntry, WorkerError> {
        let queued = Instant::now();
        let _permit = run
            .jobs
            .acquire()
            .await
            .map_err(|e| WorkerError::new(e.to_string()))?;
        // The node's shared slots are its queue; a cluster's are the
        // workers', which placement measures.
        let _slot = match &run.opts.slots {
            Some(slots) => {
                let permit = Arc::clone(slots)
                    .acquire_owned()
                    .await
                    .map_err(|e| WorkerError::new(e.to_string()))?;
                strata_metrics::queue_wait(queued.elapsed().as_secs_f64());
                Some((permit, strata_metrics::busy()))
            }
            None => None,
        };
        let (i, s) = at.index();
        let stage = at.stage();
        let step = at.step();
        run.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((i, s), now());
        run.event(stage, step.number, &step.label, EventKind::Started);
        let clock = Instant::now();
        let event = {
            let run = Arc::clone(run);
            let (name, number, label) = (stage.name.clone(), step.number, step.label.clone());
            let total = stage.total();
            Arc::new(move |kind: EventKind| {
                (run.opts.progress)(Event {
                    stage: name.clone(),
                    number,
                    total,
                    label: label.clone(),
                    kind,
                })
            })
        };
        let on_output = Arc::clone(&event);
        let output: crate::Output =
            Arc::new(move |bytes: &[u8]| on_output(EventKind::Output(bytes.to_vec())));
        // On a cluster the step runs once placed: that is when its wait
        // for a worker's slot ended.
        let placed: crate::Placed = {
            let run = Arc::clone(run);
            Arc::new(move |node: &str| {
                run.running
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert((i, s), now());
                event(EventKind::Placed(node.to_string()))
            })
        };
        let fetched: crate::Fetched = {
            let run = Arc::clone(run);
            Arc::new(move |bytes: u64, seconds: f64| {
                run.fetches
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert((i, s), (bytes, seconds));
            })
        };
        let outcome = self
            .worker
            .execute(Job {
                at: at.clone(),
                parent: parent.to_vec(),
                output,
                placed,
                fetched,
                cancel: run.opts.cancel.clone(),
            })
            .await;
        match outcome {
            Ok(layer) => {
                run.event(
                    stage,
                    step.number,
                    &step.label,
                    EventKind::Done(clock.elapsed().as_secs_f64()),
                );
                let mut layers = parent.to_vec();
                let made = layer.is_some();
                layers.extend(layer);
                Ok(CacheEntry::new(layers, made, &self.worker.runs_on(i)))
            }
            Err(e) => {
                run.event(
                    stage,
                    step.number,
                    &step.label,
                    EventKind::Failed(e.message.clone()),
                );
                Err(e)
            }
        }
    }
}

/// A build being solved, counted as started now and as finished when
/// dropped: a solve whose future is dropped counts as cancelled.
struct Measured {
    clock: Instant,
    outcome: Option<strata_metrics::Outcome>,
}

impl Measured {
    fn start() -> Measured {
        strata_metrics::build_started();
        Measured {
            clock: Instant::now(),
            outcome: None,
        }
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        strata_metrics::build_finished(
            self.outcome.unwrap_or(strata_metrics::Outcome::Cancelled),
            self.clock.elapsed().as_secs_f64(),
        );
    }
}

/// How often a stage is started over when its worker is lost.
const STAGE_ATTEMPTS: u32 = 3;

/// A failure of the cache index ends the build.
fn index_err(e: strata_cache::Error) -> StageFailure {
    StageFailure::Failed(e.into())
}

/// Why one attempt at a stage ended.
enum StageFailure {
    /// The worker holding its filesystem is gone: worth another attempt.
    Lost(SolveError),
    /// Anything else ends the build.
    Failed(SolveError),
}
