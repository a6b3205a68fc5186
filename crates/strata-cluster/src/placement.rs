//! The solver's worker in a cluster: each stage of a build is placed on
//! one worker (its steps then run there in order, keeping the filesystem
//! local), where the scheduling core's locality policy says
//! (`strata_sched::place`), and its steps run there in slots the core
//! counts. A slot is held while a step runs, not while its stage waits.
//! This file is the driver: it asks workers over the network and feeds
//! the core what happened.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use strata_cas::Digest;
use strata_dockerfile::Platform;
use strata_net::{Connection, read_frame, write_frame};
use strata_oci::LayerRef;
use strata_plan::{Base, Op, Plan, Read, Source, Step};
use strata_solver::{Job, StageResult, StepAt, Worker, WorkerError};
use tokio_util::sync::CancellationToken;

use crate::protocol::{
    BuildSpec, CoordinatorRequest, ExecEvent, Holder, Reply, Request, RequestError, StepRef,
};
use crate::replicas::Replicas;
use crate::roster::{Link, Roster};

/// A running step's hold on one of its worker's slots, given back when
/// dropped.
struct Slot {
    roster: Arc<Roster>,
    ticket: Option<strata_sched::Ticket>,
}

impl Slot {
    fn take(roster: &Arc<Roster>, worker: &str) -> Option<Slot> {
        let ticket = roster.lock().take(worker)?;
        Some(Slot {
            roster: Arc::clone(roster),
            ticket: Some(ticket),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.roster.lock().release(ticket);
        }
        self.roster.slot_freed.notify_waiters();
    }
}

/// Selection checksums a coordinator remembers at most (64 bytes each).
const MAX_SELECTIONS: usize = 100_000;

/// What COPY steps selected from build contexts, as workers measured it,
/// by [`strata_worker::SelectionMemo::context_key`]: a COPY from a context
/// built before needs no worker to be keyed.
#[derive(Default)]
pub(crate) struct Selections(Mutex<std::collections::HashMap<Digest, Digest>>);

impl Selections {
    /// The checksum of what a COPY selects from a build context, by its
    /// memo key, if a worker measured it before.
    pub(crate) fn get(&self, key: &Digest) -> Option<Digest> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }

    /// Remembers what a worker measured a COPY to select; past
    /// [`MAX_SELECTIONS`], the memo starts over.
    pub(crate) fn remember(&self, key: Digest, sum: Digest) {
        let mut memo = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if memo.len() >= MAX_SELECTIONS {
            memo.clear();
        }
        memo.insert(key, sum);
    }
}

/// Places and runs one build's stages.
pub(crate) struct Placement {
    roster: Arc<Roster>,
    replicas: Arc<Replicas>,
    selections: Arc<Selections>,
    spec: Arc<BuildSpec>,
    plan: Arc<Plan>,
    cancel: CancellationToken,
    /// Where its stages are, by plan stage.
    stages: Mutex<strata_sched::Stages>,
    /// Workers that have the build (its context and plan).
    begun: tokio::sync::Mutex<HashSet<String>>,
    /// The workers each new layer was streamed to as it was written, until
    /// it is published.
    taken: Mutex<HashMap<Digest, Vec<String>>>,
}

impl Placement {
    pub fn new(
        roster: Arc<Roster>,
        replicas: Arc<Replicas>,
        selections: Arc<Selections>,
        spec: Arc<BuildSpec>,
        plan: Arc<Plan>,
        cancel: CancellationToken,
    ) -> Placement {
        Placement {
            roster,
            replicas,
            selections,
            spec,
            plan,
            cancel,
            stages: Mutex::default(),
            begun: tokio::sync::Mutex::default(),
            taken: Mutex::default(),
        }
    }

    /// The worker stage `i` is on, choosing one (busy or not) if it has
    /// none yet: measuring a step's inputs takes no slot.
    async fn pin(&self, i: usize) -> Result<String, WorkerError> {
        loop {
            let changed = self.roster.slot_freed.notified();
            if let Some(p) = self.pinned(i) {
                return Ok(p.worker);
            }
            if let Some(w) = self.choose(i, false, self.base_layers(i)) {
                self.stages().pin(i, &w);
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
            let changed = self.roster.slot_freed.notified();
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
                && let Some(slot) = Slot::take(&self.roster, &w)
            {
                if self.stages().settle(i, &w) {
                    let stage = &self.plan.stages[i].name;
                    tracing::info!(build = self.spec.id, %stage, worker = %w, "stage placed");
                }
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

    fn stages(&self) -> std::sync::MutexGuard<'_, strata_sched::Stages> {
        self.stages.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pinned(&self, i: usize) -> Option<strata_sched::Pin> {
        self.stages().pinned(i).cloned()
    }

    /// Waits for a slot to be freed or a worker to come or go.
    async fn wait(&self, changed: tokio::sync::futures::Notified<'_>) -> Result<(), WorkerError> {
        tokio::select! {
            () = changed => Ok(()),
            () = tokio::time::sleep(Duration::from_millis(500)) => Ok(()),
            () = self.cancel.cancelled() => {
                Err(WorkerError::cancelled())
            }
        }
    }

    /// The worker to place stage `i` on (with a free slot, if `free`) to
    /// run on `layers`, as the scheduling core's locality policy ranks
    /// them.
    fn choose(&self, i: usize, free: bool, layers: &[LayerRef]) -> Option<String> {
        let base_worker = match self.plan.stages[i].base {
            Base::Stage(b) => self.stages().ran_on(b).map(str::to_string),
            _ => None,
        };
        let soft = self.pinned(i).map(|p| p.worker);
        // Read once per layer, not once per worker and layer.
        let recorded: Vec<(u64, Vec<String>)> = layers
            .iter()
            .map(|l| (l.size, self.roster.recorded_holders(&l.blob)))
            .collect();
        let held = |name: &str| -> u64 {
            recorded
                .iter()
                .filter(|(_, holders)| holders.iter().any(|h| h == name))
                .map(|(size, _)| size)
                .sum()
        };
        let entitlements = self.plan.stage_entitlements(i);
        let stage = &self.plan.stages[i];
        let runs_steps = stage.steps.iter().any(|s| matches!(s.op, Op::Exec(_)));
        let platform = Platform::parse(&stage.platform).ok().filter(|_| runs_steps);
        let want = strata_sched::Want {
            platform: platform.as_ref(),
            entitlements: &entitlements,
            free_slot: free,
            base_worker: base_worker.as_deref(),
            soft: soft.as_deref(),
            held: &held,
            key: self.spec.id,
        };
        let workers = self.roster.lock();
        strata_sched::place::choose(&workers, &want, strata_sched::Policy::Locality)
            .map(str::to_string)
    }

    /// Stage `i` is done: a later attempt or stage is placed afresh.
    fn unplace(&self, i: usize) {
        self.stages().done(i);
    }

    /// `f` of `worker`'s state, while it is alive.
    fn live<T>(&self, worker: &str, f: impl FnOnce(&Link) -> T) -> Option<T> {
        self.roster.lock().live(worker).map(|w| f(&w.link))
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
        let begin = Request::Coordinator(CoordinatorRequest::Begin(Box::new((*self.spec).clone())));
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
        match crate::protocol::request(conn, req).await {
            Ok(Reply::Failed(e)) => {
                Err(WorkerError::from_error(&e).within(&format!("worker {worker}")))
            }
            Ok(Reply::Refused(e)) => {
                Err(WorkerError::from_error(&e).within(&format!("worker {worker}")))
            }
            Ok(reply) => answer(reply).unwrap_or_else(|other| {
                Err(WorkerError::new(format!(
                    "worker {worker} answered {other:?}"
                )))
            }),
            Err(e) => Err(self.gone(worker, conn, &e)),
        }
    }

    /// A worker that stopped answering: gone, and the stage with it.
    fn gone(
        &self,
        worker: &str,
        conn: &Connection,
        why: &(dyn std::error::Error + 'static),
    ) -> WorkerError {
        self.roster.lose(worker, conn);
        // Its stages are placed again when they start over.
        let moved = self.stages().lost(worker);
        if !moved.is_empty() {
            tracing::info!(build = self.spec.id, %worker, stages = ?moved, "stages of a lost worker start over");
        }
        WorkerError::from_error(why)
            .within(&format!("worker {worker} is gone"))
            .as_lost()
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
        // A COPY from an artifact reads the artifact, not its source.
        let copies_artifact = with_artifact && matches!(step.op, Op::Copy(_));
        for read in step.op.reads().into_iter().filter(|_| !copies_artifact) {
            match read {
                Read::Paths {
                    from: Source::Stage(i),
                    ..
                } => {
                    if let Some(Some(r)) = sources.get(*i) {
                        out.extend(r.layers.iter().copied());
                    }
                }
                Read::Paths {
                    from: Source::Image(img),
                    ..
                } => out.extend(img.layers.iter().copied()),
                Read::Paths {
                    from: Source::Context,
                    ..
                }
                | Read::Url(_) => {}
            }
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
            .filter(|l| !self.roster.holds(worker, &l.blob))
            .map(|l| (l, self.roster.holders(&l.blob, Some(worker))))
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
            push_to: Vec::new(),
        }
    }

    /// For a `COPY --from=stage` step: the live worker holding that
    /// stage's filesystem.
    fn source_holder(&self, step: &Step) -> Option<String> {
        let Op::Copy(c) = &step.op else { return None };
        let Source::Stage(src) = c.from else {
            return None;
        };
        let name = self.stages().ran_on(src)?.to_string();
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
        let req = Request::Coordinator(CoordinatorRequest::Artifact(Box::new(self.step_ref(
            holder,
            i,
            s,
            &[],
            sources,
            None,
        ))));
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
                let _ = crate::protocol::request(
                    &conn,
                    &Request::Coordinator(CoordinatorRequest::End(self.spec.id)),
                )
                .await;
            }
        }
    }
}

#[async_trait::async_trait]
impl Worker for Placement {
    async fn inputs(&self, at: &StepAt) -> Result<Vec<Digest>, WorkerError> {
        let step = at.step();
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
            && let Some(sum) = self.selections.get(&key)
        {
            return Ok(vec![sum]);
        }
        let (i, s) = at.index();
        // What a COPY --from=stage selects is measured where that stage's
        // filesystem is; everything else where the stage runs.
        let worker = match self.source_holder(step) {
            Some(holder) => holder,
            None => self.pin(i).await?,
        };
        let conn = self.begin(&worker).await?;
        let req = Request::Coordinator(CoordinatorRequest::Inputs(Box::new(self.step_ref(
            &worker,
            i,
            s,
            &[],
            at.sources(),
            None,
        ))));
        let inputs: Vec<Digest> = self
            .ask(&worker, &conn, &req, |r| match r {
                Reply::Inputs(r) => Ok(r),
                other => Err(other),
            })
            .await?;
        if let (Some(key), [sum]) = (known, inputs.as_slice()) {
            self.selections.remember(key, *sum);
        }
        Ok(inputs)
    }

    fn has_layers(&self, layers: &[LayerRef]) -> bool {
        layers
            .iter()
            .all(|l| !self.roster.holders(&l.blob, None).is_empty())
    }

    async fn execute(&self, job: Job) -> Result<Option<LayerRef>, WorkerError> {
        let (i, s) = job.at.index();
        let step = job.at.step();
        let (worker, _slot) = self.slot(i, &job.parent).await?;
        (job.placed)(&worker);
        let conn = self.begin(&worker).await?;
        // A COPY --from=stage away from that stage's worker copies from an
        // artifact of the copied paths, not the stage's layers.
        let artifact = match self.source_holder(step) {
            Some(holder) if holder != worker => {
                let blob = self.artifact(&holder, i, s, job.at.sources()).await?;
                Some((blob, self.holder(&holder).into_iter().collect()))
            }
            _ => None,
        };
        let mut step_ref = self.step_ref(&worker, i, s, &job.parent, job.at.sources(), artifact);
        // Where the layer's copies go, sent it as it is written.
        step_ref.push_to = self.replicas.takers(&worker);
        let takers: Vec<String> = step_ref.push_to.iter().map(|h| h.name.clone()).collect();
        let req = Request::Coordinator(CoordinatorRequest::Execute(Box::new(step_ref)));
        let lost = |e: RequestError| self.gone(&worker, &conn, &e);
        let (mut send, mut recv) = conn.open().await.map_err(|e| lost(e.into()))?;
        write_frame(&mut send, &req, conn.addr)
            .await
            .map_err(|e| lost(e.into()))?;
        let _ = send.finish();
        let outcome = loop {
            let event = tokio::select! {
                e = read_frame::<ExecEvent>(&mut recv, conn.addr) => e,
                () = job.cancel.cancelled() => {
                    let _ = recv.stop(0u32.into());
                    return Err(WorkerError::cancelled());
                }
            };
            match event {
                Ok(Some(ExecEvent::Output(bytes))) => (job.output)(&bytes),
                Ok(Some(ExecEvent::Fetched { bytes, seconds })) => (job.fetched)(bytes, seconds),
                Ok(Some(ExecEvent::Done(result))) => break result,
                Ok(None) => break Err(lost(RequestError::Unanswered(conn.peer.to_string()))),
                Err(e) => break Err(lost(e.into())),
            }
        };
        if let Ok(Some(layer)) = &outcome {
            if !takers.is_empty() {
                self.taken
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(layer.blob, takers);
            }
            // The parent chain is on the worker too: it ran on it or
            // fetched it.
            let gained: Vec<Digest> = job
                .parent
                .iter()
                .chain([layer])
                .map(|l| l.blob)
                .filter(|b| !self.roster.holds(&worker, b))
                .collect();
            self.roster
                .located(&worker, &conn, gained)
                .await
                .map_err(|e| {
                    WorkerError::from_error(&e)
                        .within("cannot record where the layer is")
                        .as_lost()
                })?;
        }
        outcome
    }

    /// Copies the layer until the configured number of workers hold it
    /// (as many as can take a copy); fails only if no live node holds it.
    async fn publish(&self, layer: LayerRef) -> Result<(), WorkerError> {
        let taken = self
            .taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&layer.blob)
            .unwrap_or_default();
        self.replicas
            .replicate_to(layer, &taken, None)
            .await
            .map(|_| ())
            .map_err(|e| WorkerError::from_error(&e))
    }

    fn name(&self) -> String {
        "cluster".into()
    }

    fn runs_on(&self, stage: usize) -> String {
        self.pinned(stage)
            .map(|p| p.worker)
            .unwrap_or_else(|| "-".into())
    }

    fn stage_done(&self, stage: usize) {
        self.unplace(stage);
    }
}
