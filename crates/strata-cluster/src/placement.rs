//! The solver's worker in a cluster: each stage of a build is placed on
//! one worker (its steps then run there in order, keeping the filesystem
//! local), preferring the worker that already holds the stage's base, then
//! the least loaded one with a free slot. A slot is held while a step
//! runs, not while its stage waits.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use strata_cas::Digest;
use strata_dockerfile::Platform;
use strata_net::{Connection, read_frame, write_frame};
use strata_oci::LayerRef;
use strata_plan::{Base, Op, Plan, RunMountKind, Source, StagePlan, Step};
use strata_solver::{Job, StageResult, Worker, WorkerError};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::coordinator::Coordinator;
use crate::protocol::{BuildSpec, ExecEvent, Holder, Reply, Request, StepRef};

/// Where a stage is.
#[derive(Debug, Clone)]
struct Pin {
    worker: String,
    /// It ran a step there, so its filesystem is there: it stays.
    settled: bool,
}

/// A running step's hold on one of its worker's slots, given back when
/// dropped.
struct Slot {
    coord: Arc<Coordinator>,
    worker: String,
    /// The worker's connection when taken: a worker that registered again
    /// since has a fresh count.
    conn: usize,
}

impl Slot {
    fn take(coord: &Arc<Coordinator>, worker: &str) -> Option<Slot> {
        let mut workers = coord.workers.lock().unwrap_or_else(PoisonError::into_inner);
        let w = workers
            .get_mut(worker)
            .filter(|w| w.alive && w.running < w.slots)?;
        w.running += 1;
        Some(Slot {
            coord: Arc::clone(coord),
            worker: worker.to_string(),
            conn: w.conn.quic.stable_id(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut workers = self
            .coord
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = workers.get_mut(&self.worker)
            && w.conn.quic.stable_id() == self.conn
        {
            w.running = w.running.saturating_sub(1);
        }
        drop(workers);
        self.coord.slot_freed.notify_waiters();
    }
}

/// Places and runs one build's stages.
pub(crate) struct Placement {
    coord: Arc<Coordinator>,
    spec: Arc<BuildSpec>,
    plan: Arc<Plan>,
    handle: Handle,
    cancel: CancellationToken,
    /// Plan stage → the worker it is on, while it runs.
    placed: Mutex<HashMap<usize, Pin>>,
    /// Plan stage → the worker that ran it, whose filesystem it is on.
    ran: Mutex<HashMap<usize, String>>,
    /// Workers that have the build (its context and plan).
    begun: tokio::sync::Mutex<HashSet<String>>,
}

impl Placement {
    pub fn new(
        coord: Arc<Coordinator>,
        spec: Arc<BuildSpec>,
        plan: Arc<Plan>,
        handle: Handle,
        cancel: CancellationToken,
    ) -> Placement {
        Placement {
            coord,
            spec,
            plan,
            handle,
            cancel,
            placed: Mutex::default(),
            ran: Mutex::default(),
            begun: tokio::sync::Mutex::default(),
        }
    }

    fn stage_index(&self, stage: &StagePlan) -> Result<usize, WorkerError> {
        self.plan
            .stages
            .iter()
            .position(|s| s.dockerfile_index == stage.dockerfile_index && s.name == stage.name)
            .ok_or_else(|| WorkerError::new(format!("stage {} is not in the plan", stage.name)))
    }

    fn step_index(stage: &StagePlan, step: &Step) -> Result<usize, WorkerError> {
        stage
            .steps
            .iter()
            .position(|s| s.number == step.number)
            .ok_or_else(|| {
                WorkerError::new(format!(
                    "step {} is not in stage {}",
                    step.number, stage.name
                ))
            })
    }

    /// The worker stage `i` is on, choosing one (busy or not) if it has
    /// none yet: measuring a step's inputs takes no slot.
    async fn pin(&self, i: usize) -> Result<String, WorkerError> {
        loop {
            let changed = self.coord.slot_freed.notified();
            if let Some(p) = self.pinned(i) {
                return Ok(p.worker);
            }
            if let Some(w) = self.choose(i, false, self.base_layers(i)) {
                self.placed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(i)
                    .or_insert(Pin {
                        worker: w.clone(),
                        settled: false,
                    });
                continue;
            }
            self.wait(changed).await?;
        }
    }

    /// A slot to run one of stage `i`'s steps (on `parent`) in, and the
    /// worker it is on.
    /// A stage settles on a worker with its first step run, and its other
    /// steps wait for a slot there, where its filesystem is. The slot is
    /// held while the step runs only, never while the stage waits for
    /// another build's step, so builds sharing steps cannot hold every
    /// slot while they wait for each other.
    async fn slot(&self, i: usize, parent: &[LayerRef]) -> Result<(String, Slot), WorkerError> {
        let queued = std::time::Instant::now();
        loop {
            let changed = self.coord.slot_freed.notified();
            let worker = match self.pinned(i) {
                Some(p) if p.settled => {
                    if self.connection(&p.worker).is_err() {
                        return Err(WorkerError::lost(format!("worker {} is gone", p.worker)));
                    }
                    Some(p.worker)
                }
                _ => self.choose(i, true, parent),
            };
            if let Some(w) = worker
                && let Some(slot) = Slot::take(&self.coord, &w)
            {
                let stage = &self.plan.stages[i].name;
                let settled = Pin {
                    worker: w.clone(),
                    settled: true,
                };
                if self
                    .placed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(i, settled)
                    .is_none_or(|p| !p.settled)
                {
                    tracing::info!(build = self.spec.id, %stage, worker = %w, "stage placed");
                }
                self.ran
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(i, w.clone());
                strata_metrics::queue_wait(queued.elapsed().as_secs_f64());
                return Ok((w, slot));
            }
            self.wait(changed).await?;
        }
    }

    /// The base image layers of stage `i` (none for a stage on a stage).
    fn base_layers(&self, i: usize) -> &[LayerRef] {
        match &self.plan.stages[i].base {
            Base::Image(img) => &img.layers,
            _ => &[],
        }
    }

    fn pinned(&self, i: usize) -> Option<Pin> {
        self.placed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&i)
            .cloned()
    }

    /// Waits for a slot to be freed or a worker to come or go.
    async fn wait(&self, changed: tokio::sync::futures::Notified<'_>) -> Result<(), WorkerError> {
        tokio::select! {
            () = changed => Ok(()),
            () = tokio::time::sleep(Duration::from_millis(500)) => Ok(()),
            () = self.cancel.cancelled() => {
                Err(WorkerError { cancelled: true, ..WorkerError::new("cancelled") })
            }
        }
    }

    /// The best live worker for stage `i` that is not cordoned (with a
    /// free slot, if `free`), to run on `layers`: the one its base stage
    /// ran on, then the one holding most bytes of `layers` (nothing to
    /// fetch), then the one it measured inputs on, then the least loaded.
    fn choose(&self, i: usize, free: bool, layers: &[LayerRef]) -> Option<String> {
        let base_worker = match self.plan.stages[i].base {
            Base::Stage(b) => self
                .ran
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&b)
                .cloned(),
            _ => None,
        };
        let soft = self.pinned(i).map(|p| p.worker);
        // Read once per layer, not once per worker and layer.
        let recorded: Vec<(u64, Vec<String>)> = layers
            .iter()
            .map(|l| (l.size, self.coord.recorded_holders(&l.blob)))
            .collect();
        let workers = self
            .coord
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let needs = self.plan.stage_entitlements(i);
        let stage = &self.plan.stages[i];
        let runs_steps = stage.steps.iter().any(|s| matches!(s.op, Op::Exec(_)));
        let platform = Platform::parse(&stage.platform).ok();
        workers
            .iter()
            .filter_map(|(name, w)| {
                let fit = match (&platform, runs_steps) {
                    (Some(p), true) => platform_fit(p, &w.platforms, &w.native)?,
                    _ => PlatformFit::Native,
                };
                (w.alive
                    && (!free || w.running < w.slots)
                    && !self.coord.is_cordoned(name)
                    && needs.is_subset(&w.entitlements))
                .then_some((name, w, fit))
            })
            .map(|(name, w, fit)| {
                let held: u64 = recorded
                    .iter()
                    .filter(|(_, holders)| holders.contains(name))
                    .map(|(size, _)| size)
                    .sum();
                let is = |n: &Option<String>| n.as_deref() == Some(name.as_str());
                (
                    // A worker that runs the stage's platform natively
                    // first: emulation is many times slower than any
                    // transfer it would save.
                    std::cmp::Reverse((fit, is(&base_worker), held, is(&soft))),
                    w.load(),
                    name.clone(),
                )
            })
            .min()
            .map(|(_, _, name)| name)
    }

    /// Stage `i` is done: a later attempt or stage is placed afresh.
    fn unplace(&self, i: usize) {
        self.placed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&i);
    }

    /// `f` of `worker`'s state, while it is alive.
    fn live<T>(
        &self,
        worker: &str,
        f: impl FnOnce(&crate::coordinator::WorkerState) -> T,
    ) -> Option<T> {
        self.coord
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(worker)
            .filter(|w| w.alive)
            .map(f)
    }

    fn connection(&self, worker: &str) -> Result<Connection, WorkerError> {
        self.live(worker, |w| w.conn.clone())
            .ok_or_else(|| WorkerError::lost(format!("worker {worker} is gone")))
    }

    /// Makes sure `worker` has the build.
    async fn begin(&self, worker: &str) -> Result<Connection, WorkerError> {
        let conn = self.connection(worker)?;
        let mut begun = self.begun.lock().await;
        if begun.contains(worker) {
            return Ok(conn);
        }
        let begin = Request::Begin(Box::new((*self.spec).clone()));
        self.ask(worker, &conn, &begin, |r| match r {
            Reply::Ok => Ok(Ok(())),
            other => Err(other),
        })
        .await?;
        begun.insert(worker.to_string());
        Ok(conn)
    }

    /// Asks `worker` on `conn`; `answer` takes the reply it expects and
    /// gives back any other. A worker that stops answering is gone.
    async fn ask<T>(
        &self,
        worker: &str,
        conn: &Connection,
        req: &Request,
        answer: impl FnOnce(Reply) -> Result<Result<T, WorkerError>, Reply>,
    ) -> Result<T, WorkerError> {
        match crate::worker::request(conn, req).await {
            Ok(Reply::Error(e)) => Err(WorkerError::new(format!("worker {worker}: {e}"))),
            Ok(reply) => answer(reply).unwrap_or_else(|other| {
                Err(WorkerError::new(format!(
                    "worker {worker} answered {other:?}"
                )))
            }),
            Err(e) => Err(self.gone(worker, conn, e)),
        }
    }

    /// A worker that stopped answering: gone, and the stage with it.
    fn gone(&self, worker: &str, conn: &Connection, detail: String) -> WorkerError {
        self.coord.lose(worker, conn);
        // Its stages are placed again when they start over.
        self.placed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, p| p.worker != worker);
        self.ran
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, w| w != worker);
        WorkerError::lost(format!("worker {worker} is gone ({detail})"))
    }

    /// The blobs a step reads besides its context: its parent layers and
    /// the layers of the stages and images it copies or mounts from.
    fn needed(
        &self,
        step: &Step,
        parent: &[LayerRef],
        sources: &[Option<StageResult>],
        with_artifact: bool,
    ) -> Vec<LayerRef> {
        let mut out: Vec<LayerRef> = parent.to_vec();
        let mut from = |s: &Source| match s {
            Source::Stage(i) => {
                if let Some(Some(r)) = sources.get(*i) {
                    out.extend(r.layers.iter().copied());
                }
            }
            Source::Image(img) => out.extend(img.layers.iter().copied()),
            Source::Context => {}
        };
        match &step.op {
            Op::Copy(_) if with_artifact => {}
            Op::Copy(c) => from(&c.from),
            Op::Exec(e) => {
                for m in &e.mounts {
                    if let RunMountKind::Bind { from: f, .. } = &m.kind {
                        from(f);
                    }
                }
            }
            Op::Mkdir(_) => {}
        }
        let mut seen = HashSet::new();
        out.retain(|l| seen.insert(l.blob));
        out
    }

    fn step_ref(
        &self,
        worker: &str,
        i: usize,
        s: usize,
        parent: &[LayerRef],
        sources: &[Option<StageResult>],
        artifact: Option<(Digest, Vec<Holder>)>,
    ) -> StepRef {
        let step = &self.plan.stages[i].steps[s];
        let fetch: Vec<(LayerRef, Vec<Holder>)> = self
            .needed(step, parent, sources, artifact.is_some())
            .into_iter()
            .filter(|l| !self.coord.holds(worker, &l.blob))
            .map(|l| (l, self.coord.holders(&l.blob, Some(worker))))
            .collect();
        StepRef {
            build: self.spec.id,
            stage: i,
            step: s,
            parent: parent.to_vec(),
            sources: sources
                .iter()
                .map(|r| r.as_ref().map(|r| (r.key, r.layers.clone())))
                .collect(),
            fetch,
            artifact,
        }
    }

    /// For a `COPY --from=stage` step: the live worker holding that
    /// stage's filesystem.
    fn source_holder(&self, step: &Step) -> Option<String> {
        let Op::Copy(c) = &step.op else { return None };
        let Source::Stage(src) = c.from else {
            return None;
        };
        let name = self
            .ran
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&src)
            .cloned()?;
        self.connection(&name).ok().map(|_| name)
    }

    /// Where `worker` serves blobs.
    fn holder(&self, worker: &str) -> Option<Holder> {
        self.live(worker, |w| Holder {
            name: worker.to_string(),
            addr: w.addr,
        })
    }

    /// Asks `holder` to pack what step `s` of stage `i` copies.
    async fn artifact(
        &self,
        holder: &str,
        i: usize,
        s: usize,
        sources: &[Option<StageResult>],
    ) -> Result<Digest, WorkerError> {
        let conn = self.begin(holder).await?;
        let req = Request::Artifact(Box::new(self.step_ref(holder, i, s, &[], sources, None)));
        self.ask(holder, &conn, &req, |r| match r {
            Reply::Artifact(r) => Ok(r),
            other => Err(other),
        })
        .await
    }

    /// Tells every worker that had the build that it is over.
    pub async fn end(&self) {
        let begun: Vec<String> = self.begun.lock().await.iter().cloned().collect();
        for w in begun {
            if let Ok(conn) = self.connection(&w) {
                let _ = crate::worker::request(&conn, &Request::End(self.spec.id)).await;
            }
        }
    }

    async fn inputs_async(
        &self,
        stage: &StagePlan,
        step: &Step,
        sources: &[Option<StageResult>],
    ) -> Result<Vec<Digest>, WorkerError> {
        let i = self.stage_index(stage)?;
        let s = Self::step_index(stage, step)?;
        // What a COPY --from=stage selects is measured where that stage's
        // filesystem is; everything else where the stage runs.
        let worker = match self.source_holder(step) {
            Some(holder) => holder,
            None => self.pin(i).await?,
        };
        let conn = self.begin(&worker).await?;
        let req = Request::Inputs(Box::new(self.step_ref(&worker, i, s, &[], sources, None)));
        self.ask(&worker, &conn, &req, |r| match r {
            Reply::Inputs(r) => Ok(r),
            other => Err(other),
        })
        .await
    }

    async fn execute_async(&self, job: &Job<'_>) -> Result<Option<LayerRef>, WorkerError> {
        let i = self.stage_index(job.stage)?;
        let s = Self::step_index(job.stage, job.step)?;
        let (worker, _slot) = self.slot(i, job.parent).await?;
        (job.placed)(&worker);
        let conn = self.begin(&worker).await?;
        // A COPY --from=stage away from that stage's worker copies from an
        // artifact of the copied paths, not the stage's layers.
        let artifact = match self.source_holder(job.step) {
            Some(holder) if holder != worker => {
                let blob = self.artifact(&holder, i, s, job.sources).await?;
                Some((blob, self.holder(&holder).into_iter().collect()))
            }
            _ => None,
        };
        let req = Request::Execute(Box::new(self.step_ref(
            &worker,
            i,
            s,
            job.parent,
            job.sources,
            artifact,
        )));
        let lost = |e: String| self.gone(&worker, &conn, e);
        let (mut send, mut recv) = conn.open().await.map_err(|e| lost(e.to_string()))?;
        write_frame(&mut send, &req, conn.addr)
            .await
            .map_err(|e| lost(e.to_string()))?;
        let _ = send.finish();
        let outcome = loop {
            let event = tokio::select! {
                e = read_frame::<ExecEvent>(&mut recv, conn.addr) => e,
                () = job.cancel.cancelled() => {
                    let _ = recv.stop(0u32.into());
                    return Err(WorkerError { cancelled: true, ..WorkerError::new("cancelled") });
                }
            };
            match event {
                Ok(Some(ExecEvent::Output(bytes))) => (job.output)(&bytes),
                Ok(Some(ExecEvent::Fetched { bytes, seconds })) => (job.fetched)(bytes, seconds),
                Ok(Some(ExecEvent::Done(result))) => break result,
                Ok(None) => break Err(lost("the step's stream ended early".into())),
                Err(e) => break Err(lost(e.to_string())),
            }
        };
        if let Ok(Some(layer)) = &outcome {
            // The parent chain is on the worker too: it ran on it or
            // fetched it.
            let gained: Vec<Digest> = job
                .parent
                .iter()
                .chain([layer])
                .map(|l| l.blob)
                .filter(|b| !self.coord.holds(&worker, b))
                .collect();
            self.coord
                .located(&worker, &conn, gained)
                .await
                .map_err(|e| WorkerError::lost(format!("cannot record where the layer is: {e}")))?;
        }
        outcome
    }
}

impl Worker for Placement {
    fn inputs(
        &self,
        stage: &StagePlan,
        step: &Step,
        sources: &[Option<StageResult>],
    ) -> Result<Vec<Digest>, WorkerError> {
        let reads_something = match &step.op {
            Op::Copy(c) => !c.sources.is_empty() || !c.urls.is_empty(),
            Op::Exec(e) => e
                .mounts
                .iter()
                .any(|m| matches!(m.kind, RunMountKind::Bind { .. })),
            Op::Mkdir(_) => false,
        };
        if !reads_something {
            return Ok(Vec::new());
        }
        // What a COPY selects from the context is named by the context's
        // tree: known once, it needs no worker (a fully cached build
        // begins on none).
        let known = match &step.op {
            Op::Copy(c) if c.from == Source::Context && c.urls.is_empty() => {
                Some(strata_worker::SelectionMemo::context_key(
                    &self.spec.context,
                    &c.sources,
                    &c.excludes,
                ))
            }
            _ => None,
        };
        if let Some(key) = known
            && let Some(sum) = self.coord.selection(&key)
        {
            return Ok(vec![sum]);
        }
        let inputs = self
            .handle
            .block_on(self.inputs_async(stage, step, sources))?;
        if let (Some(key), [sum]) = (known, inputs.as_slice()) {
            self.coord.remember_selection(key, *sum);
        }
        Ok(inputs)
    }

    fn has_layers(&self, layers: &[LayerRef]) -> bool {
        layers
            .iter()
            .all(|l| !self.coord.holders(&l.blob, None).is_empty())
    }

    fn execute(&self, job: &Job<'_>) -> Result<Option<LayerRef>, WorkerError> {
        self.handle.block_on(self.execute_async(job))
    }

    /// Copies the layer until the configured number of workers hold it
    /// (as many as can take a copy); fails only if no live node holds it.
    fn publish(&self, layer: &LayerRef) -> Result<(), WorkerError> {
        self.handle
            .block_on(self.coord.replicate(*layer, None))
            .map(|_| ())
            .map_err(WorkerError::new)
    }

    fn name(&self) -> String {
        "cluster".into()
    }

    fn runs_on(&self, stage: &StagePlan) -> String {
        self.stage_index(stage)
            .ok()
            .and_then(|i| {
                self.placed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&i)
                    .map(|p| p.worker.clone())
            })
            .unwrap_or_else(|| "-".into())
    }

    fn stage_done(&self, stage: &StagePlan) {
        if let Ok(i) = self.stage_index(stage) {
            self.unplace(i);
        }
    }
}

/// How a worker runs a stage's platform; better is greater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PlatformFit {
    Emulated,
    Native,
}

/// Whether a worker runs `p` (natively, or through an emulator), from
/// what it reported; `None` if it does not.
fn platform_fit(p: &Platform, runs: &[Platform], native: &[Platform]) -> Option<PlatformFit> {
    let matches = |r: &Platform| r.matches(&p.os, &p.architecture, p.variant.as_deref());
    if native.iter().any(matches) {
        Some(PlatformFit::Native)
    } else if runs.iter().any(matches) {
        Some(PlatformFit::Emulated)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_workers_beat_emulating_ones_and_others_do_not_fit() {
        let p = |s: &str| Platform::parse(s).unwrap();
        let amd64_emulating_arm64 = (
            vec![p("linux/amd64"), p("linux/arm64")],
            vec![p("linux/amd64")],
        );
        let arm64 = (vec![p("linux/arm64")], vec![p("linux/arm64")]);
        let fit = |w: &(Vec<Platform>, Vec<Platform>), s: &str| platform_fit(&p(s), &w.0, &w.1);
        assert_eq!(fit(&arm64, "linux/arm64"), Some(PlatformFit::Native));
        assert_eq!(
            fit(&amd64_emulating_arm64, "linux/arm64"),
            Some(PlatformFit::Emulated)
        );
        assert_eq!(
            fit(&amd64_emulating_arm64, "linux/amd64"),
            Some(PlatformFit::Native)
        );
        assert_eq!(fit(&arm64, "linux/amd64"), None);
        assert!(PlatformFit::Native > PlatformFit::Emulated);
    }
}
