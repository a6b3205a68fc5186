//! `strata worker`: runs the stages a coordinator places here, with the
//! same engine as the embedded build ([`LocalWorker`]), and serves its
//! blobs to peers.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use strata_cas::{ContentStore, Digest, Lease};
use strata_dockerfile::IgnoreMatcher;
use strata_net::{Connection, Endpoint, Role, write_frame};
use strata_plan::Plan;
use strata_solver::{Job, StageResult, StepAt, WorkerError};
use strata_worker::{LocalWorker, Node};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::access::ReadRights;
use crate::config::{NodeAddress, WorkerConfig};
use crate::error::{EvictError, PushError, RegisterError, StartError};
use crate::peers::{FetchError, Peers, report_lacking};
use crate::pipeline::Pipeline;
use crate::protocol::{
    AnyRequest, BuildSpec, CoordinatorRequest, CopyError, CopyKind, ExecEvent, Failed, Holder,
    PeerRequest, Refusal, Registration, Reply, Request, StepRef, WorkerRequest, request,
};

/// Layers other workers may push to a worker at once; one more is refused
/// (its pusher leaves it to the copy after).
const TAKES: usize = 4;

/// How long a pushed layer may send nothing before the taker drops it.
const TAKE_IDLE: Duration = Duration::from_secs(30);

/// Blobs of a build context a worker fetches at once.
const CONTEXT_FETCHES: usize = 16;

/// A build some of whose stages run here.
struct BuildHere {
    /// The build's id, for log lines.
    id: String,
    plan: Arc<Plan>,
    worker: Arc<LocalWorker>,
    /// Its scratch directory: the context written out (`context/`), when
    /// a step reads it, and the artifacts it took.
    scratch: Option<tempfile::TempDir>,
    /// The tree written out there, once it is.
    written: Arc<Mutex<Option<Digest>>>,
    /// Where a written-out context goes when the build ends.
    idle: Arc<Mutex<IdleContexts>>,
}

impl Drop for BuildHere {
    fn drop(&mut self) {
        let written = self
            .written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let (Some(root), Some(scratch)) = (written, self.scratch.take()) else {
            return;
        };
        let context = scratch.path().join("context");
        let kept = scratch
            .path()
            .parent()
            .ok_or_else(|| "no parent".to_string())
            .and_then(|tmp| {
                let kept = tempfile::Builder::new()
                    .prefix("context-")
                    .tempdir_in(tmp)
                    .map_err(|e| e.to_string())?;
                // Onto the empty directory just made.
                std::fs::rename(&context, kept.path()).map_err(|e| e.to_string())?;
                Ok(kept)
            });
        match kept {
            Ok(kept) => {
                let dropped = self
                    .idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .put(root, kept);
                // Removed outside the lock.
                drop(dropped);
            }
            Err(e) => tracing::debug!(error = %e, "cannot keep a written-out context"),
        }
    }
}

/// Written-out build contexts no build uses now, newest last, at most
/// [`IDLE_CONTEXTS`]. A build takes the one of its own tree, else the
/// newest, and patches it to its tree ([`crate::context::patch`]): a
/// context that changed in a few files since is written in a few files.
#[derive(Debug, Default)]
pub(crate) struct IdleContexts(Vec<(Digest, tempfile::TempDir)>);

/// Written-out contexts a worker keeps for the next builds.
const IDLE_CONTEXTS: usize = 2;

impl IdleContexts {
    fn take(&mut self, root: &Digest) -> Option<(Digest, tempfile::TempDir)> {
        let i = self
            .0
            .iter()
            .position(|(d, _)| d == root)
            .or_else(|| self.0.len().checked_sub(1))?;
        Some(self.0.remove(i))
    }

    /// Keeps `dir`, the tree `root` written out; returns those it no
    /// longer keeps, for the caller to drop.
    fn put(&mut self, root: Digest, dir: tempfile::TempDir) -> Vec<tempfile::TempDir> {
        self.0.push((root, dir));
        let over = self.0.len().saturating_sub(IDLE_CONTEXTS);
        self.0.drain(..over).map(|(_, d)| d).collect()
    }
}

/// Writes the tree `root` out at `at`, where nothing is: by patching
/// `taken`, an idle written-out context, when there is one, else anew.
fn write_context(
    cas: &ContentStore,
    root: &Digest,
    at: &std::path::Path,
    taken: Option<(Digest, tempfile::TempDir)>,
) -> Result<(), crate::context::ContextError> {
    use crate::context::ContextError;
    if let Some((from, old)) = taken {
        let old = old.keep();
        match std::fs::rename(&old, at) {
            Ok(()) => match crate::context::patch(cas, &from, root, at) {
                Ok(changed) => {
                    tracing::info!(%from, to = %root, changed, "patched a written-out context");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot patch a written-out context; writing it anew");
                    std::fs::remove_dir_all(at).map_err(|source| ContextError::Write {
                        path: at.to_path_buf(),
                        source,
                    })?;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot reuse a written-out context");
                if let Err(e) = std::fs::remove_dir_all(&old) {
                    tracing::warn!(path = %old.display(), error = %e, "cannot remove a written-out context");
                }
            }
        }
    }
    std::fs::create_dir(at).map_err(|source| ContextError::Write {
        path: at.to_path_buf(),
        source,
    })?;
    crate::context::materialize(cas, root, at).map(drop)
}

/// The longest wait between attempts to reach a coordinator.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The waits between attempts to reach a coordinator: from 100 ms,
/// doubling, each jittered up to twice its length (so at most
/// [`RECONNECT_MAX`]) so that a fleet of workers that lost a coordinator
/// together do not all come back in the same instant.
fn reconnect_delays() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(RECONNECT_MAX / 2)
        .without_max_times()
        .with_jitter()
        .build()
}

/// A worker process.
pub struct WorkerNode {
    pub(crate) node: Arc<Node>,
    name: String,
    slots: usize,
    listen: SocketAddr,
    /// The coordinators it serves (all of them, the group's members).
    coordinators: Vec<NodeAddress>,
    endpoint: Endpoint,
    peers: Arc<Peers>,
    /// Builds begun here, by coordinator and that coordinator's id.
    builds: Mutex<HashMap<(String, u64), Arc<BuildHere>>>,
    running: AtomicUsize,
    /// What its configuration grants steps.
    grants: strata_plan::Grants,
    /// The platforms it runs steps for: its own, and emulated ones unless
    /// its configuration says `emulation = false`.
    platforms: Vec<strata_dockerfile::Platform>,
    /// The blobs each client may read here, as coordinators granted.
    reads: Mutex<ReadRights>,
    /// This run of the process ([`Registration::incarnation`]).
    incarnation: u64,
    /// How much its store keeps.
    keep: strata_sched::Keep,
    /// Layers other workers may push to it at once ([`PeerRequest::Take`]).
    takes: tokio::sync::Semaphore,
    /// Its connections to coordinators, while registered.
    pub(crate) registered: Mutex<Vec<Connection>>,
    /// Build contexts written out for builds that ended.
    idle_contexts: Arc<Mutex<IdleContexts>>,
}

impl std::fmt::Debug for WorkerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerNode")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Removes the build contexts an earlier run of the worker wrote out
/// under `tmp` and left (it was killed): nothing knows what they hold.
fn clear_written_contexts(tmp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("context-")
            && let Err(err) = std::fs::remove_dir_all(e.path())
        {
            tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a context an earlier run left");
        }
    }
}

impl crate::Service for WorkerNode {
    fn handle<'a>(
        self: &'a Arc<Self>,
        conn: &'a Connection,
        req: Request,
        send: &'a mut quinn::SendStream,
        recv: &'a mut quinn::RecvStream,
    ) -> impl std::future::Future<Output = Result<(), strata_net::Error>> + Send + 'a {
        self.answer(conn, req, send, recv)
    }
}

/// Why a worker could not take on a build.
#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    /// The build's scratch directory could not be made.
    #[error("cannot make a directory in {}", dir.display())]
    Scratch {
        /// Where.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The base images the coordinator resolved could not be read.
    #[error(transparent)]
    Bases(#[from] crate::plan::WireError),
    /// The build does not plan here, or cannot run here.
    #[error(transparent)]
    Plan(#[from] strata_worker::BuildError),
    /// It plans to something else than the coordinator's plan.
    #[error(
        "this worker plans the build differently from the coordinator (are both the same strata version?)"
    )]
    PlannedDifferently,
    /// The build context's tree is not one, or the store failed.
    #[error("the build context")]
    Context(#[from] crate::context::ContextError),
    /// The build context's blobs could not be fetched.
    #[error("fetching the build context")]
    Fetch(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The coordinator lacks blobs of the context it named.
    #[error(
        "the coordinator lacks {0} blobs of the build context (evicted meanwhile?): submit the build again"
    )]
    Evicted(usize),
    /// Preparing the build stopped (its task failed).
    #[error("preparing the build stopped")]
    Stopped(#[source] tokio::task::JoinError),
}

impl WorkerNode {
    /// Opens the state directory and starts listening.
    pub fn start(config: &WorkerConfig) -> Result<Arc<WorkerNode>, StartError> {
        let (id, me, node) = crate::open_node(&config.tls, Role::Worker, &config.home)?;
        let endpoint = Endpoint::listen(config.listen, &id)
            .map_err(StartError::listen("peers", config.listen))?;
        clear_written_contexts(&node.home().join("tmp"));
        let listen = config
            .advertise
            .map_or_else(|| endpoint.local_addr(), Ok)
            .map_err(StartError::listen("peers", config.listen))?;
        Ok(Arc::new(WorkerNode {
            node: Arc::new(node),
            slots: config.slots,
            listen,
            coordinators: config.coordinators.clone(),
            peers: Arc::new(Peers::new(endpoint.clone())),
            endpoint,
            builds: Mutex::default(),
            running: AtomicUsize::new(0),
            grants: strata_plan::Grants {
                granted: config.insecure_entitlements.iter().copied().collect(),
                node: format!("worker {}", me.name),
                setting: "insecure_entitlements = [\"{}\"] in its worker.toml".into(),
            },
            platforms: if config.emulation {
                strata_worker::runnable()
            } else {
                strata_worker::native()
            },
            name: me.name,
            reads: Mutex::default(),
            keep: strata_worker::keep_within(
                &config.home,
                config.keep_storage,
                config.keep_duration,
            )?,
            registered: Mutex::default(),
            takes: tokio::sync::Semaphore::new(TAKES),
            idle_contexts: Arc::default(),
            incarnation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        }))
    }

    /// Serves its metrics, `/healthz` and `/readyz` as `config` says
    /// (ready: registered with a coordinator); returns where.
    pub async fn serve_metrics(
        self: &Arc<Self>,
        config: &WorkerConfig,
    ) -> Result<Option<SocketAddr>, StartError> {
        let health = Arc::new(WorkerHealth(Arc::downgrade(self)));
        let served = crate::observe::serve(&config.metrics, self.listen, &config.tls, health).await;
        strata_metrics::slots(self.slots);
        served
    }

    /// This worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it serves blobs.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// Serves peers and the coordinator until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let me = Arc::clone(&self);
        tokio::spawn(async move {
            while let Some(conn) = me.endpoint.accept().await {
                tokio::spawn(Arc::clone(&me).serve(conn));
            }
        });
        let evicting = tokio::spawn(Arc::clone(&self).evict_forever());
        // Every coordinator of the group gets the worker: any of them may
        // place stages on it, and losing one leaves the others in touch.
        let mut serving = tokio::task::JoinSet::new();
        for at in self.coordinators.clone() {
            serving.spawn(Arc::clone(&self).serve_coordinator(at, shutdown.clone()));
        }
        while serving.join_next().await.is_some() {}
        evicting.abort();
        self.endpoint.close();
    }

    /// Registers with the coordinator at `at`, heartbeats, and registers
    /// again whenever the connection is lost, until `shutdown`.
    async fn serve_coordinator(self: Arc<Self>, at: NodeAddress, shutdown: CancellationToken) {
        let mut delays = reconnect_delays();
        while !shutdown.is_cancelled() {
            match self.join_one(&at).await {
                Ok((conn, reported)) => {
                    delays = reconnect_delays();
                    tracing::info!(worker = %self.name, coordinator = %at, "registered");
                    let serving = tokio::spawn(Arc::clone(&self).serve(conn.clone()));
                    self.registered
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(conn.clone());
                    tokio::select! {
                        () = self.heartbeat(&conn, reported) => {}
                        () = shutdown.cancelled() => {}
                    }
                    serving.abort();
                    self.registered
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .retain(|c| c.quic.stable_id() != conn.quic.stable_id());
                    // The coordinator counts this worker lost with the
                    // connection and starts its stages over elsewhere: its
                    // builds here (their contexts) are done with.
                    self.builds
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .retain(|(from, _), _| *from != conn.peer.name);
                    tracing::warn!(worker = %self.name, coordinator = %at, "lost the coordinator; reconnecting");
                }
                Err(e) => {
                    tracing::debug!(worker = %self.name, coordinator = %at, error = %strata_registry::error_chain(&e), "cannot reach the coordinator");
                }
            }
            let delay = delays.next().unwrap_or(RECONNECT_MAX);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }

    /// The blobs in this worker's store, and the store's count of changes
    /// as of the listing (see [`strata_cas::ContentStore::changes`]).
    /// The store's count of changes, the blobs the index should know of,
    /// and the bytes the store holds.
    fn blobs(&self) -> Result<(u64, HashSet<Digest>, u64), RegisterError> {
        let changes = self.node.content.changes();
        let listed = self.node.content.list().map_err(RegisterError::List)?;
        let stored = listed.iter().map(|(_, info)| info.size).sum();
        // Context files are the coordinator's to keep, not the index's to
        // know: a build context of 30,000 files is no 30,000 locations.
        let blobs = listed
            .into_iter()
            .filter(|(_, info)| !info.labels.contains_key(crate::context::CONTEXT_LABEL))
            .map(|(d, _)| d)
            .collect();
        Ok((changes, blobs, stored))
    }

    /// Registers with one coordinator; returns the connection, the blobs
    /// it was told of, and the store's count of changes then.
    async fn join_one(
        &self,
        at: &NodeAddress,
    ) -> Result<(Connection, (u64, HashSet<Digest>, u64)), RegisterError> {
        let conn = at
            .connect(&self.endpoint)
            .await
            .map_err(|e| RegisterError::Connect(Box::new(e)))?;
        let (changes, blobs, stored) = self.blobs()?;
        let reply = request(
            &conn,
            &Request::Worker(WorkerRequest::Register(Registration {
                addr: self.listen,
                slots: self.slots,
                blobs: blobs.iter().copied().collect(),
                entitlements: self.grants.granted.clone(),
                platforms: self.platforms.iter().map(ToString::to_string).collect(),
                native: strata_worker::native()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                incarnation: self.incarnation,
                keep_storage: self.keep.storage,
                stored,
            })),
        )
        .await
        .map_err(RegisterError::Request)?;
        match reply {
            Reply::Ok => Ok((conn, (changes, blobs, stored))),
            Reply::Failed(e) => Err(RegisterError::Failed(e)),
            Reply::Refused(e) => Err(RegisterError::Refused(e)),
            other => Err(RegisterError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Tells the coordinator it is alive, and which blobs it gained
    /// (through any coordinator's builds), every second, until that fails.
    /// `reported` is what it was told, as of the store's count of changes
    /// `changes`: while the count stands, the store is not listed again.
    async fn heartbeat(
        &self,
        conn: &Connection,
        (mut changes, mut reported, mut stored): (u64, HashSet<Digest>, u64),
    ) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (listed, gained, dropped): (u64, Vec<Digest>, Vec<Digest>) =
                if self.node.content.changes() == changes {
                    (changes, Vec::new(), Vec::new())
                } else {
                    match self.blobs() {
                        Ok((listed, now, bytes)) => {
                            stored = bytes;
                            (
                                listed,
                                now.difference(&reported).copied().collect(),
                                reported.difference(&now).copied().collect(),
                            )
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot list this worker's blobs");
                            (changes, Vec::new(), Vec::new())
                        }
                    }
                };
            let beat = Request::Worker(WorkerRequest::Heartbeat {
                running: self.running.load(Ordering::Relaxed),
                blobs: gained.clone(),
                dropped: dropped.clone(),
                stored,
            });
            match tokio::time::timeout(Duration::from_secs(5), request(conn, &beat)).await {
                Ok(Ok(Reply::Ok)) => {
                    reported.extend(gained);
                    for d in &dropped {
                        reported.remove(d);
                    }
                    changes = listed;
                }
                Ok(Ok(Reply::Refused(Refusal::NotRegistered))) => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "heartbeat failed");
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// Keeps the store within its bounds, every [`strata_worker::EVICT_EVERY`], until the
    /// worker stops: the least recently used blobs that no running build
    /// holds go, spare copies (as a coordinator sees them) first. Each
    /// coordinator hears of what went with the next heartbeat.
    async fn evict_forever(self: Arc<Self>) {
        let mut pace = strata_sched::evict::Pace::default();
        loop {
            tokio::time::sleep(strata_worker::EVICT_EVERY).await;
            if let Err(e) = self.evict_once(&mut pace).await {
                tracing::warn!(error = %e, "cannot evict from this worker's store");
            }
        }
    }

    async fn evict_once(&self, pace: &mut strata_sched::evict::Pace) -> Result<(), EvictError> {
        let keep = self.keep;
        // Read before the store is listed: a blob added meanwhile makes
        // the next round look again.
        let (changes, now) = (self.node.content.changes(), strata_cas::now_unix());
        if !pace.due(changes, now, &keep) {
            return Ok(());
        }
        let node = Arc::clone(&self.node);
        let (total, candidates) =
            tokio::task::spawn_blocking(move || strata_worker::candidates(&node, now)).await??;
        pace.checked(changes, now, total, &keep);
        tracing::debug!(
            total,
            candidates = candidates.len(),
            ?keep,
            "looking at the store's bounds"
        );
        let nothing_spare = |_: &Digest| false;
        // Which blobs would go if no copy were spare: if none, there is
        // nothing to ask anyone.
        if strata_sched::evict::choose(total, &candidates, &keep, now, &nothing_spare).is_empty() {
            return Ok(());
        }
        // With no word from a coordinator nothing goes: any copy may be
        // a named image's layer, or the last one.
        let Some(copies) = self.ask_spare(&candidates).await else {
            return Ok(());
        };
        // Those asked about (the least recently used) are this round's
        // candidates, a named image's layers aside.
        let kind = |d: &Digest| copies.get(d).copied();
        let victims = strata_sched::evict::choose_in_cluster(total, &candidates, &keep, now, &kind);
        let (spare, last): (Vec<Digest>, Vec<Digest>) = victims
            .into_iter()
            .partition(|d| kind(d) == Some(CopyKind::Spare));
        // Last copies go only once the index no longer offers what needs
        // them; a store still over its bound after this round looks again
        // in the next.
        let spared = spare.len();
        let mut victims = spare;
        if !last.is_empty()
            && let Some(may) = self.ask_retire(&last).await
        {
            victims.extend(last.iter().zip(may).filter(|(_, ok)| *ok).map(|(d, _)| *d));
        }
        self.evict(victims, spared).await
    }

    /// Deletes `victims` from this worker's store.
    /// `spare` of them are spare copies.
    async fn evict(&self, victims: Vec<Digest>, spare: usize) -> Result<(), EvictError> {
        let node = Arc::clone(&self.node);
        let report =
            tokio::task::spawn_blocking(move || strata_worker::evict(&node, &victims)).await??;
        if report.blobs > 0 {
            tracing::info!(
                blobs = report.blobs,
                bytes = report.bytes,
                snapshots = report.snapshots,
                spare,
                "evicted to stay within keep_storage / keep_duration"
            );
        }
        Ok(())
    }

    /// Asks a coordinator to take out of the index the cache entries
    /// that need `blobs`, the last copies this worker is about to drop:
    /// for each, whether it may go now; `None` when no coordinator
    /// answers (then none goes).
    async fn ask_retire(&self, blobs: &[Digest]) -> Option<Vec<bool>> {
        let ask = WorkerRequest::Retire(blobs.to_vec());
        self.ask_coordinators(ask, "did not retire last copies", |reply| match reply {
            Reply::Retired(may) if may.len() == blobs.len() => Ok(may),
            other => Err(other),
        })
        .await
    }

    /// What a coordinator says dropping each of the first
    /// [`MAX_SPARE_ASKED`](crate::protocol::MAX_SPARE_ASKED) `candidates`
    /// loses; `None` when no coordinator answers.
    async fn ask_spare(
        &self,
        candidates: &[strata_sched::Candidate],
    ) -> Option<HashMap<Digest, CopyKind>> {
        let asked: Vec<Digest> = candidates
            .iter()
            .take(crate::protocol::MAX_SPARE_ASKED)
            .map(|c| c.blob)
            .collect();
        let ask = WorkerRequest::Spare(asked.clone());
        self.ask_coordinators(ask, "no word on spare copies", |reply| match reply {
            Reply::Spare(copies) if copies.len() == asked.len() => {
                Ok(asked.iter().copied().zip(copies).collect())
            }
            other => Err(other),
        })
        .await
    }

    /// Asks the coordinators this worker registered with, one after
    /// another, until one answers as `accept` takes (it gives back an
    /// answer it does not take); `None` if none does.
    async fn ask_coordinators<T>(
        &self,
        ask: WorkerRequest,
        unanswered: &str,
        accept: impl Fn(Reply) -> Result<T, Reply>,
    ) -> Option<T> {
        let conns = self
            .registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let ask = Request::Worker(ask);
        for conn in conns {
            match request(&conn, &ask).await {
                Ok(reply) => match accept(reply) {
                    Ok(answer) => return Some(answer),
                    Err(other) => {
                        tracing::debug!(coordinator = %conn.peer, answer = ?other, "{unanswered}");
                    }
                },
                Err(e) => tracing::debug!(coordinator = %conn.peer, error = %e, "{unanswered}"),
            }
        }
        None
    }

    /// Gathers an image's layers from their holders (verified, as every
    /// fetch) and pushes it with the client's credentials, which live only
    /// as long as this call.
    async fn push(
        &self,
        spec: crate::protocol::PushSpec,
    ) -> Result<strata_registry::Pushed, PushError> {
        let crate::protocol::PushSpec {
            config,
            layers,
            request,
        } = spec;
        let destination: strata_oci::Reference =
            request
                .destination
                .parse()
                .map_err(|source| PushError::Destination {
                    name: request.destination.clone(),
                    source,
                })?;
        let mut lease = self.node.content.lease();
        for (l, _) in &layers {
            lease.hold(l.blob);
        }
        let fetched = self
            .peers
            .ensure(&self.node.content, &layers)
            .await
            .map_err(PushError::Gather)?;
        let config_blob = self
            .node
            .content
            .put(&config)
            .map_err(|e| PushError::Store(e.into()))?;
        lease.hold(config_blob);
        let layers: Vec<strata_oci::LayerRef> = layers.into_iter().map(|(l, _)| l).collect();
        let (image, _) = strata_oci::Image::described(&config, &layers)
            .map_err(|e| PushError::Store(e.into()))?;
        let host = destination.domain.clone();
        let registry = strata_registry::Registry::new(strata_registry::RegistryOptions {
            insecure: if request.insecure {
                vec![host.clone()]
            } else {
                Vec::new()
            },
            given: Some(request.credential.map(|c| (host, c)).into_iter().collect()),
            ..Default::default()
        });
        let pushed = registry
            .push(
                &image,
                &destination,
                &self.node.content,
                request.compression,
                &crate::plan::Quiet,
            )
            .await
            .map_err(|source| PushError::Registry {
                destination: destination.familiar(),
                source,
            })?;
        tracing::info!(
            image = %request.name,
            destination = %destination.familiar(),
            digest = %pushed.digest,
            fetched,
            sent = pushed.bytes_sent,
            "pushed for a client"
        );
        drop(lease);
        Ok(pushed)
    }

    /// Answers the requests a peer opens on `conn`.
    async fn serve(self: Arc<Self>, conn: Connection) {
        crate::serve_requests(&self, &conn).await;
    }

    async fn answer(
        &self,
        conn: &Connection,
        req: Request,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), strata_net::Error> {
        // Log lines about a build name it as its client does.
        let build = match &req {
            Request::Coordinator(CoordinatorRequest::Begin(spec)) => Some(spec.build_id.clone()),
            Request::Coordinator(
                CoordinatorRequest::Execute(s)
                | CoordinatorRequest::Inputs(s)
                | CoordinatorRequest::Artifact(s),
            ) => self
                .builds
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&(conn.peer.name.clone(), s.build))
                .map(|b| b.id.clone()),
            _ => None,
        };
        match build {
            Some(id) => {
                self.answer_request(conn, req, send, recv)
                    .instrument(tracing::info_span!("build", %id))
                    .await
            }
            None => self.answer_request(conn, req, send, recv).await,
        }
    }

    async fn answer_request(
        &self,
        conn: &Connection,
        req: Request,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), strata_net::Error> {
        let req = match req {
            Request::Any(AnyRequest::GetBlob(d)) => {
                return crate::access::serve_blob(&self.reads, &self.node.content, conn, &d, send)
                    .await;
            }
            Request::Peer(PeerRequest::Take) => {
                let Ok(_taking) = self.takes.try_acquire() else {
                    let busy =
                        Failed::new(format!("{} takes {TAKES} pushed layers at once", self.name));
                    return write_frame(send, &Reply::Took(Err(busy)), conn.addr).await;
                };
                // No layer larger than the store keeps.
                let limit = self
                    .keep
                    .storage
                    .map_or(strata_net::MAX_BLOB, |k| k.min(strata_net::MAX_BLOB));
                let took =
                    strata_net::recv_unnamed(recv, &self.node.content, conn.addr, limit, TAKE_IDLE)
                        .await;
                let reply = Reply::Took(match took {
                    Ok((blob, bytes)) => {
                        strata_metrics::transferred(strata_metrics::Transfer::PeerStreamed, bytes);
                        tracing::debug!(%blob, bytes, from = %conn.peer.name, "took a layer as it was written");
                        Ok(blob)
                    }
                    Err(e) => Err(Failed::of(&e)),
                });
                return write_frame(send, &reply, conn.addr).await;
            }
            Request::Coordinator(r) => r,
            other => {
                strata_metrics::request_error("not_served");
                let refusal = Reply::Refused(other.not_served(Role::Worker));
                return write_frame(send, &refusal, conn.addr).await;
            }
        };
        let reply = match req {
            // A coordinator checking what a peer reported this worker
            // lacks.
            CoordinatorRequest::HasBlob(d) => {
                Reply::Bool(self.node.content.present(&d).unwrap_or(false))
            }
            CoordinatorRequest::Grant(grant) => {
                self.reads
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .grant(&grant.client, &grant.blobs, Instant::now());
                Reply::Ok
            }
            CoordinatorRequest::Execute(step) => {
                return self.execute(*step, send, conn.addr, conn).await;
            }
            CoordinatorRequest::Begin(spec) => match self.begin(*spec, conn).await {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Failed(Failed::of(&e)),
            },
            CoordinatorRequest::Inputs(step) => Reply::Inputs(self.inputs(*step, conn).await),
            CoordinatorRequest::Artifact(step) => Reply::Artifact(self.artifact(*step, conn).await),
            CoordinatorRequest::Copy(copy) => {
                let layer = &copy.layer;
                // A layer taken as it was written is here already.
                let fetched = if self.node.content.present(&layer.blob).unwrap_or(false) {
                    Ok(0)
                } else {
                    self.peers
                        .fetch(
                            &self.node.content,
                            &layer.blob,
                            &copy.holders,
                            copy.bytes_per_second,
                        )
                        .await
                };
                Reply::Copied(match fetched {
                    Ok(bytes) => match crate::peers::check_diff_id(&self.node.content, layer) {
                        Ok(()) => {
                            // Copies at a bounded rate are the leader's
                            // repairs; the others, a new layer's replicas.
                            if copy.bytes_per_second.is_some() {
                                strata_metrics::repaired(bytes);
                            }
                            tracing::debug!(blob = %layer.blob, bytes, from = %conn.peer.name, "took a copy");
                            Ok(())
                        }
                        Err(e @ crate::peers::DiffIdError::Store(_)) => {
                            Err(CopyError::Failed(strata_registry::error_chain(&e)))
                        }
                        Err(e) => {
                            tracing::warn!(blob = %layer.blob, error = %e, "a copy is not the layer it was said to be");
                            Err(CopyError::NotTheLayer(e.to_string()))
                        }
                    },
                    Err(e) => {
                        report_lacking(&e, conn).await;
                        Err(CopyError::Failed(e.message))
                    }
                })
            }
            CoordinatorRequest::PushImage(spec) => {
                Reply::Pushed(self.push(*spec).await.map_err(|e| Failed::of(&e)))
            }
            CoordinatorRequest::Du => Reply::Usage(vec![
                crate::protocol::NodeUsage::measure(&self.node, &self.name, "worker").await,
            ]),
            CoordinatorRequest::End(id) => {
                self.builds
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&(conn.peer.name.clone(), id));
                Reply::Ok
            }
        };
        write_frame(send, &reply, conn.addr).await
    }

    /// Takes on a build: its context, and the same plan as the
    /// coordinator's.
    async fn begin(&self, spec: BuildSpec, conn: &Connection) -> Result<(), BeginError> {
        if self
            .builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&(conn.peer.name.clone(), spec.id))
        {
            return Ok(());
        }
        let coordinator = Holder {
            name: conn.peer.name.clone(),
            addr: conn.addr,
        };
        let context_lease = self.fetch_context(spec.context, &coordinator, conn).await?;
        let tmp = self.node.home().join("tmp");
        let node = Arc::clone(&self.node);
        let grants = self.grants.clone();
        let idle = Arc::clone(&self.idle_contexts);
        let here = tokio::task::spawn_blocking(move || -> Result<BuildHere, BeginError> {
            let dir = tempfile::Builder::new()
                .prefix("context-")
                .tempdir_in(&tmp)
                .map_err(|source| BeginError::Scratch {
                    dir: tmp.clone(),
                    source,
                })?;

            let replay = crate::plan::Replay::new(&spec.bases)?;
            let plan = spec.inputs.plan(&replay)?;
            if crate::plan::digest(&plan) != spec.plan {
                return Err(BeginError::PlannedDifferently);
            }
            strata_worker::check_runnable(&plan, &strata_worker::runnable(), "this worker")?;
            // Written out when a step first reads it, holding the tree's
            // blobs until then: a fully cached build never writes it.
            let written = Arc::new(Mutex::new(None));
            let make = {
                let (node, root, at) =
                    (Arc::clone(&node), spec.context, dir.path().join("context"));
                let (idle, written) = (Arc::clone(&idle), Arc::clone(&written));
                let lease = std::sync::Mutex::new(Some(context_lease));
                Box::new(move || {
                    let taken = idle
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take(&root);
                    let made = write_context(&node.content, &root, &at, taken)
                        .map(|()| at.clone())
                        .map_err(|e| {
                            WorkerError::from_error(&e).within("writing out the build context")
                        });
                    if made.is_ok() {
                        *written.lock().unwrap_or_else(PoisonError::into_inner) = Some(root);
                    }
                    drop(lease.lock().unwrap_or_else(PoisonError::into_inner).take());
                    made
                })
            };
            // A COPY from the context is keyed from its tree, before (and
            // whether or not) it is written out.
            let select: strata_worker::TreeSelection = {
                let (node, root) = (Arc::clone(&node), spec.context);
                Box::new(move |specs, ignore| {
                    crate::context::selection_checksum(&node.content, &root, specs, ignore)
                })
            };
            let worker = LocalWorker::new(
                node,
                dir.path().join("context"),
                IgnoreMatcher::default(),
                spec.secrets,
            )
            .context_named(spec.context)
            .selecting_from_tree(select)
            .context_made_on_use(make)
            .granting(grants);
            Ok(BuildHere {
                id: spec.build_id,
                plan: Arc::new(plan),
                worker: Arc::new(worker),
                scratch: Some(dir),
                written,
                idle,
            })
        })
        .await
        .map_err(BeginError::Stopped)??;
        self.builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((conn.peer.name.clone(), spec.id), Arc::new(here));
        tracing::info!(coordinator = %conn.peer.name, "took on the build");
        Ok(())
    }

    /// Fetches the blobs of context tree `root` this worker lacks from the
    /// coordinator on `conn`: its directories level by level, then its
    /// files, small ones many to a stream ([`Request::GetBlobs`], made
    /// durable together), large ones each on its own; [`CONTEXT_FETCHES`]
    /// streams at once. Returns a lease holding every blob of the tree
    /// until it is written out.
    async fn fetch_context(
        &self,
        root: Digest,
        from: &Holder,
        conn: &Connection,
    ) -> Result<Lease, BeginError> {
        use crate::context::{EntryKind, MAX_ENTRIES};
        use futures_util::StreamExt as _;
        use futures_util::TryStreamExt as _;
        let cas = &self.node.content;
        let holders = std::slice::from_ref(from);
        let mut lease = cas.lease();
        let mut seen = HashSet::from([root]);
        let (mut level, mut files) = (vec![root], Vec::new());
        let mut fetched = 0u64;
        while !level.is_empty() {
            for d in &level {
                lease.hold(*d);
            }
            let lacking = cas
                .absent(&level)
                .map_err(crate::context::ContextError::from)?;
            let batches = lacking
                .chunks(strata_net::MAX_BATCH / 4)
                .map(<[Digest]>::to_vec);
            fetched += futures_util::stream::iter(batches.map(|b| get_batch(conn, cas, b)))
                .buffer_unordered(CONTEXT_FETCHES)
                .try_fold(0, |n, m| async move { Ok(n + m) })
                .await?;
            let mut next = Vec::new();
            for d in &level {
                let dir = crate::context::read_directory(cas, d)?;
                for e in dir.entries {
                    if seen.len() > MAX_ENTRIES {
                        return Err(crate::context::ContextError::TooLarge(MAX_ENTRIES).into());
                    }
                    match e.kind {
                        EntryKind::Dir(c) if seen.insert(c) => next.push(c),
                        EntryKind::File { blob, size, .. } if seen.insert(blob) => {
                            files.push((blob, size))
                        }
                        _ => {}
                    }
                }
            }
            level = next;
        }
        for (d, _) in &files {
            lease.hold(*d);
        }
        // Looked up in one batch: tens of thousands of files.
        let all: Vec<Digest> = files.iter().map(|(d, _)| *d).collect();
        let absent: HashSet<Digest> = cas
            .absent(&all)
            .map_err(crate::context::ContextError::from)?
            .into_iter()
            .collect();
        let (small, mut large): (Vec<_>, Vec<_>) = files
            .into_iter()
            .filter(|(d, _)| absent.contains(d))
            .partition(|(_, size)| *size <= strata_net::BATCHED_UP_TO);
        let batches = strata_net::batches(&small, |(_, size)| *size)
            .into_iter()
            .map(|b| b.iter().map(|(d, _)| *d).collect::<Vec<_>>());
        let mut gets: Vec<futures_util::future::BoxFuture<'_, Result<u64, BeginError>>> =
            Vec::new();
        // Large files first, then the batches beside them.
        strata_net::largest_first(&mut large, |(_, size)| *size);
        for (d, _) in large {
            let peers = &self.peers;
            gets.push(Box::pin(async move {
                let n = peers
                    .fetch(cas, &d, holders, None)
                    .await
                    .map_err(|e| BeginError::Fetch(Box::new(e)))?;
                if let Err(e) = cas.set_label(&d, crate::context::CONTEXT_LABEL, Some("1")) {
                    tracing::warn!(blob = %d, error = %e, "cannot mark a context blob");
                }
                Ok(n)
            }));
        }
        for b in batches {
            gets.push(Box::pin(get_batch(conn, cas, b)));
        }
        fetched += futures_util::stream::iter(gets)
            .buffer_unordered(CONTEXT_FETCHES)
            .try_fold(0, |n, m| async move { Ok(n + m) })
            .await?;
        tracing::debug!(context = %root, bytes = fetched, "fetched the build context's missing blobs");
        Ok(lease)
    }

    fn build(&self, from: &str, id: u64) -> Result<Arc<BuildHere>, WorkerError> {
        self.builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(from.to_string(), id))
            .cloned()
            .ok_or_else(|| WorkerError::new(format!("build {id} was not begun on this worker")))
    }

    /// What a step needs that is elsewhere, fetched.
    /// Returns the bytes fetched.
    async fn fetch(&self, step: &StepRef, coordinator: &Connection) -> Result<u64, WorkerError> {
        match self.peers.ensure(&self.node.content, &step.fetch).await {
            Ok(bytes) => Ok(bytes),
            Err(e) => Err(lacking(e, coordinator).await),
        }
    }

    async fn inputs(&self, step: StepRef, from: &Connection) -> Result<Vec<Digest>, WorkerError> {
        self.on_step(step, from, |worker, at| worker.inputs(at))
            .await
    }

    async fn artifact(&self, step: StepRef, from: &Connection) -> Result<Digest, WorkerError> {
        self.on_step(step, from, |worker, at| {
            worker.artifact(at.step(), at.sources())
        })
        .await
    }

    /// Runs `f` off the runtime on the build's worker and the step, once
    /// the blobs it needs are here.
    async fn on_step<T: Send + 'static>(
        &self,
        step: StepRef,
        from: &Connection,
        f: impl FnOnce(&LocalWorker, &StepAt) -> Result<T, WorkerError> + Send + 'static,
    ) -> Result<T, WorkerError> {
        let here = self.build(&from.peer.name, step.build)?;
        self.fetch(&step, from).await?;
        tokio::task::spawn_blocking(move || {
            let at = locate(&here.plan, &step)?;
            f(&here.worker, &at)
        })
        .await
        .map_err(|e| WorkerError::new(e.to_string()))?
    }

    /// Fetches and unpacks a step's artifact; the step will copy from it.
    async fn provide_artifact(
        &self,
        here: &Arc<BuildHere>,
        step: &StepRef,
        coordinator: &Connection,
    ) -> Result<(), WorkerError> {
        let Some((blob, holders)) = &step.artifact else {
            return Ok(());
        };
        if !self.node.content.contains(blob).unwrap_or(false)
            && let Err(e) = self
                .peers
                .fetch(&self.node.content, blob, holders, None)
                .await
        {
            return Err(lacking(e, coordinator).await);
        }
        let (here, step, blob) = (Arc::clone(here), step.clone(), *blob);
        let node = Arc::clone(&self.node);
        tokio::task::spawn_blocking(move || {
            let at = locate(&here.plan, &step)?;
            let dir = here
                .scratch
                .as_ref()
                .ok_or_else(|| WorkerError::new("the build ended"))?
                .path()
                .join(format!("artifact-{}-{}", step.stage, step.step));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|e| WorkerError::new(e.to_string()))?;
            let reader = node
                .content
                .open_blob(&blob)
                .map_err(|e| WorkerError::new(e.to_string()))?;
            // A peer's tar: the hardened extraction layers get (nothing
            // lands outside `dir`, modes, times and owners kept).
            strata_snapshot::apply_tar(&dir, reader)
                .map_err(|e| WorkerError::new(format!("unpacking artifact {blob}: {e}")))?;
            here.worker.provide_source(at.stage(), at.step(), dir);
            Ok(())
        })
        .await
        .map_err(|e| WorkerError::new(e.to_string()))?
    }

    async fn execute(
        &self,
        step: StepRef,
        send: &mut quinn::SendStream,
        peer: SocketAddr,
        from: &Connection,
    ) -> Result<(), strata_net::Error> {
        self.running.fetch_add(1, Ordering::Relaxed);
        let busy = strata_metrics::busy();
        let outcome = self.execute_step(step, send, peer, from).await;
        drop(busy);
        self.running.fetch_sub(1, Ordering::Relaxed);
        let done = match outcome {
            Ok(r) => r,
            Err(e) => Err(e),
        };
        write_frame(send, &ExecEvent::Done(done), peer).await
    }

    async fn execute_step(
        &self,
        step: StepRef,
        send: &mut quinn::SendStream,
        peer: SocketAddr,
        from: &Connection,
    ) -> Result<Result<Option<strata_oci::LayerRef>, WorkerError>, WorkerError> {
        let here = self.build(&from.peer.name, step.build)?;
        let fetching = Instant::now();
        let fetched = self.fetch(&step, from).await?;
        // The layers the step runs on stay while the build lives; one
        // evicted since the coordinator placed the step is reported, and
        // the stage starts over with the records corrected.
        let parents: Vec<Digest> = step.parent.iter().map(|l| l.blob).collect();
        here.worker.hold(&parents);
        let gone: Vec<(Digest, String)> = parents
            .iter()
            .filter(|b| !self.node.content.present(b).unwrap_or(false))
            .map(|b| (*b, self.name.clone()))
            .collect();
        if !gone.is_empty() {
            let e = FetchError {
                message: format!(
                    "worker {} no longer holds {} layer(s) the step runs on (evicted)",
                    self.name,
                    gone.len()
                ),
                lacking: gone,
            };
            return Err(lacking(e, from).await);
        }
        self.provide_artifact(&here, &step, from).await?;
        // What moving its inputs here cost, for the build's timeline.
        let moved = ExecEvent::Fetched {
            bytes: fetched,
            seconds: fetching.elapsed().as_secs_f64(),
        };
        if write_frame(send, &moved, peer).await.is_err() {
            return Err(WorkerError::new("the coordinator went away"));
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let cancel = CancellationToken::new();
        let job_cancel = cancel.clone();
        let at = locate(&here.plan, &step)?;
        let output: strata_solver::Output = Arc::new(move |bytes: &[u8]| {
            let _ = tx.send(bytes.to_vec());
        });
        let job = Job {
            at,
            parent: step.parent,
            output,
            // The coordinator named this worker already, and heard what
            // it fetched.
            placed: Arc::new(|_: &str| {}),
            fetched: Arc::new(|_: u64, _: f64| {}),
            cancel: job_cancel,
        };
        // The layer goes to the workers named to hold its copies as it is
        // written.
        let (pipeline, tee) = match step.push_to.as_slice() {
            [] => (None, None),
            to => {
                let (p, t) = Pipeline::start(&self.peers, to);
                (Some(p), Some(Box::new(t) as strata_worker::LayerTee))
            }
        };
        let running = tokio::spawn(
            LocalWorker::execute_teeing(Arc::clone(&here.worker), job, tee).in_current_span(),
        );
        // The step's output goes back as it comes; a coordinator that is
        // gone cancels the step.
        while let Some(bytes) = rx.recv().await {
            if write_frame(send, &ExecEvent::Output(bytes), peer)
                .await
                .is_err()
            {
                cancel.cancel();
            }
        }
        let ran = running.await.map_err(|e| WorkerError::new(e.to_string()))?;
        if let Some(p) = pipeline {
            let layer = match &ran {
                Ok(Some(l)) => Some(l.blob),
                _ => None,
            };
            p.end(layer).await;
        }
        Ok(ran)
    }
}

/// The step a [`StepRef`] names, with the stages finished before it.
fn locate(plan: &Arc<Plan>, step: &StepRef) -> Result<StepAt, WorkerError> {
    StepAt::new(
        Arc::clone(plan),
        step.stage,
        step.step,
        sources(plan, step).into(),
    )
    .ok_or_else(|| WorkerError::new(format!("no step {}/{} in the plan", step.stage, step.step)))
}

/// Finished stages as the engine wants them, their configs from the plan.
fn sources(plan: &Plan, step: &StepRef) -> Vec<Option<StageResult>> {
    step.sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_ref().map(|(key, layers)| StageResult {
                key: *key,
                layers: layers.clone(),
                config: plan
                    .stages
                    .get(i)
                    .map(|st| st.config.clone())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// A step's failed fetch as the step's error: when a holder lacked a blob
/// it was named for, the coordinator hears of it, and the stage starts
/// over (as when a worker is lost) with the records corrected.
async fn lacking(e: FetchError, coordinator: &Connection) -> WorkerError {
    if e.lacking.is_empty() {
        return WorkerError::new(e.message);
    }
    report_lacking(&e, coordinator).await;
    WorkerError::lost(format!(
        "{}: the cluster's records of it are corrected; the stage starts over",
        e.message
    ))
}

/// Fetches a batch of small blobs from the coordinator on `conn` into
/// `cas` (checked, made durable together). Returns their bytes.
async fn get_batch(
    conn: &Connection,
    cas: &Arc<ContentStore>,
    blobs: Vec<Digest>,
) -> Result<u64, BeginError> {
    let fail = |e: strata_net::Error| BeginError::Fetch(Box::new(e));
    let (mut send, mut recv) = conn.open().await.map_err(fail)?;
    let wanted: HashSet<Digest> = blobs.iter().copied().collect();
    write_frame(
        &mut send,
        &Request::Worker(WorkerRequest::GetBlobs(blobs)),
        conn.addr,
    )
    .await
    .map_err(fail)?;
    let _ = send.finish();
    let label = Some((crate::context::CONTEXT_LABEL, "1"));
    let got = strata_net::recv_batch(&mut recv, cas, &wanted, conn.addr, label, &mut |_| Ok(()))
        .await
        .map_err(fail)?;
    if !got.missing.is_empty() {
        return Err(BeginError::Evicted(got.missing.len()));
    }
    Ok(got.bytes)
}

/// A worker is ready once registered with a coordinator: before that no
/// step is placed on it.
pub(crate) struct WorkerHealth(pub(crate) std::sync::Weak<WorkerNode>);

impl strata_metrics::Health for WorkerHealth {
    fn ready(&self) -> Result<(), strata_metrics::NotReady> {
        let w = self
            .0
            .upgrade()
            .ok_or(crate::observe::NotReady::ShuttingDown)?;
        let registered = w
            .registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        if registered == 0 {
            Err(crate::observe::NotReady::NotRegistered(w.name().to_string()).into())
        } else {
            Ok(())
        }
    }

    fn refresh(&self) {
        if let Some(w) = self.0.upgrade() {
            crate::observe::store_bytes(&w.node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnecting_never_stops_never_waits_past_its_bound_and_is_spread() {
        let first: Vec<Duration> = reconnect_delays().take(200).collect();
        assert_eq!(first.len(), 200, "a worker keeps trying");
        assert!(first.iter().all(|d| *d <= RECONNECT_MAX), "{first:?}");
        assert!(first[0] < Duration::from_millis(250), "{first:?}");
        // Jittered: a fleet that lost a coordinator together does not
        // come back in lockstep.
        let others: Vec<Duration> = (0..20).filter_map(|_| reconnect_delays().nth(5)).collect();
        assert!(others.iter().any(|d| *d != others[0]), "{others:?}");
    }
}
