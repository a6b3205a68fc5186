//! The messages of a strata cluster. Every request opens a QUIC stream of
//! its own and starts with a [`Request`]; what follows on the stream is
//! listed with each variant. `docs/protocol.md` describes them for people.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use strata_cas::{Digest, Sha256};
use strata_net::{Connection, Role, read_frame, write_frame};
use strata_oci::LayerRef;
use strata_solver::{Causes, Event, StepRecord, WorkerError};
use strata_worker::PlanInputs;

/// A node that holds blobs, and where it serves them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Holder {
    /// The node's name (its certificate's).
    pub name: String,
    /// Its blob service.
    pub addr: SocketAddr,
}

/// A base image as the coordinator resolved it: what a worker needs to
/// plan the same build without asking a registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireImage {
    /// The name as the Dockerfile wrote it (`golang:1.19`).
    pub name: String,
    /// Its normalized reference.
    pub reference: String,
    /// Its manifest's sha256.
    pub manifest: Sha256,
    /// Its config, as JSON (the config's serde form is JSON's).
    pub config_json: Vec<u8>,
    /// Its layers.
    pub layers: Vec<LayerRef>,
}

/// A build as a worker receives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildSpec {
    /// The coordinator's id for it.
    pub id: u64,
    /// The build's id as its client and every log line name it.
    pub build_id: String,
    /// What decides the plan.
    pub inputs: PlanInputs,
    /// The base images the coordinator resolved.
    pub bases: Vec<WireImage>,
    /// The build context, a tar blob.
    pub context: Digest,
    /// `--secret`s, by id.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// A digest of the plan, which the worker's must match.
    pub plan: Digest,
}

/// A build as a client submits it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitBuild {
    /// The build's id, which the client shows (`[0-9a-z-]`, at most
    /// 64 characters; the coordinator refuses others).
    pub build_id: String,
    /// The names the client gives the image (for the history; at most
    /// [`MAX_TAGS`]).
    pub tags: Vec<String>,
    /// What decides the plan.
    pub inputs: PlanInputs,
    /// The build context, a tar blob already uploaded.
    pub context: Digest,
    /// `--secret`s, by id.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--no-cache-filter`: stages whose steps ignore the cache.
    pub no_cache_stages: Vec<String>,
    /// `--pull`.
    pub pull: bool,
}

/// What a client hears while its build runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BuildEvent {
    /// Progress of a step.
    Progress(Event),
    /// The build failed: what kind of failure, the error as a local
    /// build reports it (with its causes), and a failed step's last output.
    Failed(Box<BuildFailed>),
    /// The build finished.
    Done(Box<BuildDone>),
}

/// What kind of failure ended a build: what a client acts on, never the
/// message's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The request cannot be built as it stands (its Dockerfile, inputs,
    /// entitlements, base images): sent again, it fails again.
    Request,
    /// A step failed.
    Step,
    /// The build was cancelled.
    Cancelled,
    /// The cluster could not finish it (its index, a node).
    Cluster,
}

/// A build that failed, as its client hears of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildFailed {
    /// What kind of failure.
    pub kind: FailureKind,
    /// The error as a local build reports it, its causes its chain.
    pub error: Failed,
    /// The failed step's `[STAGE N/M] INSTRUCTION`.
    pub title: Option<String>,
    /// The failing step's last output lines.
    pub tail: Vec<String>,
}

impl std::fmt::Display for BuildFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// The error's message, then its causes: a failed build reads as the
/// error it carries.
impl std::error::Error for BuildFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl BuildFailed {
    /// A failure of kind `kind`.
    pub fn new(kind: FailureKind, error: Failed) -> BuildFailed {
        BuildFailed {
            kind,
            error,
            title: None,
            tail: Vec::new(),
        }
    }

    /// A solve that failed, its step located in the Dockerfile `file`.
    pub fn of_solve(e: &strata_solver::SolveError, file: &str) -> BuildFailed {
        use strata_solver::SolveError;
        let kind = match e {
            SolveError::Step(_) => FailureKind::Step,
            SolveError::Cancelled => FailureKind::Cancelled,
            SolveError::Cache(_) | SolveError::Internal(_) => FailureKind::Cluster,
        };
        let located = e.located(file);
        BuildFailed {
            kind,
            error: match e.causes() {
                Some(first) => Failed::because(located, first),
                None => Failed::new(located),
            },
            title: e.step_title(),
            tail: e.tail().to_vec(),
        }
    }

    /// The error and its causes, one text (for a build's record).
    pub fn text(&self) -> String {
        strata_solver::with_causes(self.error.to_string(), Causes::of(&self.error))
    }
}

/// A finished build: enough to assemble the image on the client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildDone {
    /// The image config, as JSON.
    pub config_json: Vec<u8>,
    /// Its layers, bottom first.
    pub layers: Vec<LayerRef>,
    /// How many of them, the bottom ones, are the base image's.
    pub image_layers: usize,
    /// Who holds each layer.
    pub holders: Vec<(Digest, Vec<Holder>)>,
    /// Every step: its key, cached or not, where it ran, when.
    pub steps: Vec<StepRecord>,
    /// The names the cluster now serves the image under (normalized,
    /// `docker.io/library/app:1`); none when the client names it itself
    /// (a build with `SOURCE_DATE_EPOCH`, whose times the client rewrites).
    pub tagged: Vec<String>,
}

/// A worker announcing itself to the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    /// Where it serves blobs to peers.
    pub addr: SocketAddr,
    /// Steps it runs at once.
    pub slots: usize,
    /// Blobs it holds.
    pub blobs: Vec<Digest>,
    /// The entitlements its configuration grants steps.
    pub entitlements: strata_plan::Entitlements,
    /// The platforms it runs steps for (`linux/arm64`), natively or
    /// emulated.
    pub platforms: Vec<String>,
    /// Those it runs natively.
    pub native: Vec<String>,
    /// This run of the worker process: its start time in microseconds
    /// since the epoch. The locations of its blobs are recorded under it,
    /// so a worker back from a restart is not taken to hold what it held
    /// before.
    pub incarnation: u64,
    /// Its store's bound (`keep_storage`), when it has one.
    pub keep_storage: Option<u64>,
    /// Bytes its store holds now.
    pub stored: u64,
}

/// One step of a build, for the worker its stage runs on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRef {
    /// The build.
    pub build: u64,
    /// Plan index of the stage.
    pub stage: usize,
    /// Index of the step within the stage.
    pub step: usize,
    /// The layers the step runs on.
    pub parent: Vec<LayerRef>,
    /// Finished stages: their key and layers, by plan index.
    pub sources: Vec<Option<(Digest, Vec<LayerRef>)>>,
    /// Blobs the worker may lack, and who holds them.
    pub fetch: Vec<(LayerRef, Vec<Holder>)>,
    /// For a `COPY --from=stage` placed away from that stage: the artifact
    /// of the copied paths to copy from, and who holds it.
    pub artifact: Option<(Digest, Vec<Holder>)>,
    /// Of a step to run: the workers that will hold copies of its layer,
    /// sent the layer's bytes as they are written.
    pub push_to: Vec<Holder>,
}

/// A layer for a worker to copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyBlob {
    /// The layer, as the cache index records it: the copy is refused
    /// unless its content has this diff_id.
    pub layer: LayerRef,
    /// Who holds it.
    pub holders: Vec<Holder>,
    /// The highest rate to fetch it at, if bounded.
    pub bytes_per_second: Option<u64>,
}

/// Why a worker did not take a copy.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum CopyError {
    /// The blob came whole, but its content is not the layer the index
    /// was told of (another diff_id): nothing may be recorded under it.
    #[error("{0}")]
    NotTheLayer(String),
    /// It could not be fetched (no holder answered, the link broke).
    #[error("{0}")]
    Failed(String),
}

/// Coordinator → worker: a client may read these blobs, the layers of one
/// of its builds, for [`crate::access::READ_FOR`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grant {
    /// The client's name (its certificate's).
    pub client: String,
    /// The blobs.
    pub blobs: Vec<Digest>,
}

/// What the worker running a step sends back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ExecEvent {
    /// The step's inputs are here: what fetching them from peers took.
    Fetched {
        /// Bytes received.
        bytes: u64,
        /// Seconds it took (fetching, or waiting for them).
        seconds: f64,
    },
    /// Output of the step's process.
    Output(Vec<u8>),
    /// The step ended: the layer it made, if it changed files.
    Done(Result<Option<LayerRef>, WorkerError>),
}

/// The state of the cluster, for `strata cluster status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The coordinator's name.
    pub coordinator: String,
    /// Its process.
    pub pid: u32,
    /// Workers, alive or not.
    pub workers: Vec<WorkerStatus>,
    /// Entries in the cache index.
    pub cache_entries: usize,
    /// The group of coordinators keeping the index, as this one sees it.
    pub group: GroupStatus,
    /// Blobs whose holders the group records.
    pub blobs_located: usize,
    /// Workers each layer a build made is kept on.
    pub replication: usize,
    /// Layers of cached results with fewer live copies than that.
    pub under_replicated: usize,
    /// Workers the group records as registered.
    pub workers_registered: usize,
    /// Builds running now.
    pub builds_running: usize,
}

/// The Raft group of coordinators, as one member sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GroupStatus {
    /// This member's id.
    pub id: u64,
    /// The leader's id, if one is known.
    pub leader: Option<u64>,
    /// The current term.
    pub term: u64,
    /// The index of the last log entry applied here.
    pub last_applied: Option<u64>,
    /// Every member: id and Raft address.
    pub members: Vec<(u64, String)>,
    /// The members recorded as having taken part (one of them starting
    /// with an empty state has lost it).
    pub joined: Vec<u64>,
}

/// One worker in [`ClusterStatus`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its name.
    pub name: String,
    /// Where it serves blobs.
    pub addr: SocketAddr,
    /// Whether its lease is current.
    pub alive: bool,
    /// Whether new stages are kept off it.
    pub cordoned: bool,
    /// Steps it may run at once.
    pub slots: usize,
    /// Steps it runs now.
    pub running: usize,
    /// Blobs it holds, as the coordinator knows.
    pub blobs: usize,
    /// The platforms it runs steps for, natively first.
    pub platforms: Vec<String>,
}

/// The first message on every stream. Its outer kind says which role may
/// ask it; a node checks that against the asker's certificate before it
/// looks further ([`Request::may_come_from`]), so each of its handlers
/// takes only the requests one role may make, by type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Any certificate of the cluster, of any node.
    Any(AnyRequest),
    /// A client's (or an admin's), of a coordinator.
    Client(ClientRequest),
    /// An admin's, of a coordinator.
    Admin(AdminRequest),
    /// A worker's, of a coordinator.
    Worker(WorkerRequest),
    /// A coordinator's, of a worker.
    Coordinator(CoordinatorRequest),
    /// A worker's, of another worker.
    Peer(PeerRequest),
}

/// What a worker may ask of another worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Take the layer whose bytes follow, to the end of the stream, as the
    /// asker writes it ([`Reply::Took`], once stored under the digest the
    /// taker computed). The coordinator named the taker as a holder-to-be
    /// of the step's layer; it asks it for the copy by digest afterwards,
    /// as for any copy, and the taker then has it already.
    Take,
}

/// What any node or client may ask of any node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AnyRequest {
    /// Send this blob (then: the blob stream back). Each blob is checked
    /// against what the asker may read ([`crate::access`]).
    GetBlob(Digest),
    /// Of a coordinator: these holders said they do not hold these blobs,
    /// (blob, holder), at most [`MAX_LACKING`] ([`Reply::Ok`] once the
    /// coordinator asked each and corrected its records).
    Lacking(Vec<(Digest, String)>),
}

/// What a client (or an admin) may ask of a coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Is this blob stored? ([`Reply::Bool`]; asking pins it a while).
    HasBlob(Digest),
    /// Store this blob (then: the blob stream from the client;
    /// [`Reply::Ok`]).
    PutBlob(Digest),
    /// Store these small blobs, at most [`strata_net::MAX_BATCH`] (then: a
    /// batch stream of them from the client, made durable together;
    /// [`Reply::Ok`]).
    PutBlobs(Vec<Digest>),
    /// Which of these blobs of the build context whose root directory is
    /// `context` it lacks, at most [`MAX_MISSING_ASKED`]
    /// ([`Reply::Missing`]). The context is kept, with every blob its tree
    /// names, for the build the client submits next.
    Missing {
        /// The context's root directory blob.
        context: Digest,
        /// Blobs of its tree.
        blobs: Vec<Digest>,
    },
    /// Run a build (then: [`BuildEvent`]s back).
    Build(Box<SubmitBuild>),
    /// The cluster's state ([`Reply::Status`]).
    Status,
    /// The builds it coordinated, newest first, at most `limit` (and
    /// [`MAX_HISTORY`]), or the one whose id is or starts with `id`
    /// ([`Reply::History`]). A client sees its own builds only; an admin,
    /// everyone's.
    History {
        /// One build, by id or id prefix.
        id: Option<String>,
        /// How many.
        limit: usize,
    },
    /// Where each node's bytes are; it asks every live worker
    /// ([`Reply::Usage`]).
    Du,
    /// The images the cluster names ([`Reply::Images`]).
    Images,
    /// Drop the image name (a tag, as `app:1`); the image's layers are
    /// then cache like any other ([`Reply::Ok`]).
    Untag(String),
    /// Push an image the cluster names to a registry, from a worker
    /// ([`Reply::Pushed`]).
    Push(PushRequest),
}

/// What only an admin may ask of a coordinator: what changes the cluster
/// for everyone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Place no new stages on this worker (or place them again); it keeps
    /// serving its blobs ([`Reply::Ok`]).
    Cordon {
        /// The worker's name.
        worker: String,
        /// Cordoned (true) or back in service (false).
        cordoned: bool,
    },
    /// Add a coordinator to the group replicating the cache index, or
    /// remove one ([`Reply::Ok`] once committed).
    ChangeGroup(strata_raft::MembershipChange),
    /// Add these cache entries (an exported cache, `strata cluster
    /// import-cache`) to the cluster's index, at most [`MAX_IMPORTED`],
    /// each chain at most [`MAX_IMPORTED_CHAIN`] layers. Every layer must
    /// have been uploaded and be what its entry says (its sha256 and size,
    /// computed here); each is copied to workers before any entry naming
    /// it is put, and a key the index has is kept ([`Reply::Imported`]).
    ImportCache(Vec<(Digest, strata_cache::CacheEntry)>),
}

/// What a worker may ask of a coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WorkerRequest {
    /// First on its connection ([`Reply::Ok`]).
    Register(Registration),
    /// Still here, running this many steps, holding these blobs it had
    /// not told this coordinator of, and no longer holding those it
    /// dropped.
    Heartbeat {
        /// Steps running now.
        running: usize,
        /// Blobs gained since the last heartbeat.
        blobs: Vec<Digest>,
        /// Blobs deleted since the last heartbeat (evicted to stay within
        /// its bounds, or pruned).
        dropped: Vec<Digest>,
        /// Bytes its store holds now: new copies go where there is room.
        stored: u64,
    },
    /// Which of these blobs are spare copies, that enough other live
    /// workers (or the coordinator) hold, at most [`MAX_SPARE_ASKED`]
    /// ([`Reply::Spare`], in the same order).
    Spare(Vec<Digest>),
    /// The asker is about to drop its copies of these blobs, the last
    /// ones of some (at most [`MAX_SPARE_ASKED`]): take the cache entries
    /// that need them out of the index first ([`Reply::Retired`], in the
    /// same order).
    Retire(Vec<Digest>),
    /// Send these blobs of a build context, at most
    /// [`strata_net::MAX_BATCH`] (then: a batch stream of them back).
    GetBlobs(Vec<Digest>),
}

/// What a coordinator may ask of a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CoordinatorRequest {
    /// A build some of whose stages it will run ([`Reply::Ok`] once the
    /// worker has the context and the same plan).
    Begin(Box<BuildSpec>),
    /// A step's input digests ([`Reply::Inputs`]).
    Inputs(Box<StepRef>),
    /// Run a step (then: [`ExecEvent`]s back).
    Execute(Box<StepRef>),
    /// Of the worker holding a stage's filesystem: pack what this `COPY
    /// --from` step copies from it ([`Reply::Artifact`]).
    Artifact(Box<StepRef>),
    /// The build is over ([`Reply::Ok`]).
    End(u64),
    /// Fetch this blob from its holders and keep it ([`Reply::Ok`] once
    /// stored), so it has more copies.
    Copy(Box<CopyBlob>),
    /// Let a client read these blobs ([`Reply::Ok`]).
    Grant(Box<Grant>),
    /// Is this blob stored? (checking what a peer reported it lacks;
    /// [`Reply::Bool`]).
    HasBlob(Digest),
    /// Where its bytes are ([`Reply::Usage`]).
    Du,
    /// Gather an image's layers and push it ([`Reply::Pushed`]).
    PushImage(Box<PushSpec>),
}

/// A push a client asks of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushRequest {
    /// The cluster's name of the image (`app:1`).
    pub name: String,
    /// Where it goes (`registry.example.com/team/app:1`).
    pub destination: String,
    /// How its layers are compressed on the way.
    pub compression: strata_oci::Compression,
    /// The client's credentials for the destination's registry, for this
    /// push only: the pushing worker holds them in memory until it is
    /// done, and nothing writes or logs them.
    pub credential: Option<strata_registry::Credential>,
    /// Whether the registry is spoken to over plain HTTP.
    pub insecure: bool,
}

/// A push a coordinator hands a worker: the image, where each of its
/// layers is, and the client's request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushSpec {
    /// The image config's exact bytes.
    pub config: Vec<u8>,
    /// Its layers, bottom first, and who holds each.
    pub layers: Vec<(LayerRef, Vec<Holder>)>,
    /// The client's request.
    pub request: PushRequest,
}

/// An image the cluster names, as `strata cluster images` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedImage {
    /// The name, as people write it (`app:1`).
    pub name: String,
    /// The image ID (the config's sha256).
    pub id: String,
    /// The manifest's digest, what `docker pull NAME@DIGEST` takes.
    pub digest: String,
    /// Bytes of its layers, uncompressed.
    pub size: u64,
    /// When it was named (seconds since the epoch).
    pub tagged: u64,
}

/// One node's line of `strata cluster du`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeUsage {
    /// Its name.
    pub name: String,
    /// `coordinator` or `worker`.
    pub role: String,
    /// Its usage, or why it is not known.
    pub usage: Result<strata_worker::Usage, Failed>,
}

impl NodeUsage {
    /// What `node`'s store holds, measured off the runtime's threads.
    pub(crate) async fn measure(
        node: &std::sync::Arc<strata_worker::Node>,
        name: &str,
        role: &str,
    ) -> NodeUsage {
        let node = std::sync::Arc::clone(node);
        let usage = tokio::task::spawn_blocking(move || {
            strata_worker::usage(&node).map_err(|e| Failed::of(&e))
        })
        .await
        .unwrap_or_else(|e| Err(Failed::because("measuring stopped", &e)));
        NodeUsage {
            name: name.to_string(),
            role: role.to_string(),
            usage,
        }
    }
}

/// The most entries one [`Request::ImportCache`] may carry (a client
/// sends more in several).
pub const MAX_IMPORTED: usize = 10_000;

/// The most layers, counted over every chain, one [`Request::ImportCache`]
/// carries, so it fits a frame.
pub const MAX_IMPORTED_LAYERS: usize = 100_000;

/// The longest layer chain of an imported entry.
pub const MAX_IMPORTED_CHAIN: usize = 1_000;

/// The most builds one [`Reply::History`] carries.
pub const MAX_HISTORY: usize = 100;

/// The most names a submitted build may have, and their longest.
pub const MAX_TAGS: (usize, usize) = (64, 256);

/// What a worker dropping its copy of a blob would lose
/// ([`Reply::Spare`]).
pub use strata_sched::CopyKind;

/// The most blobs one [`Request::Spare`] may ask about.
pub const MAX_SPARE_ASKED: usize = 100_000;

/// The most blobs one [`Request::Missing`] may ask about (a client asks
/// about more in several): 8 MiB of digests, half a frame.
pub const MAX_MISSING_ASKED: usize = 250_000;

/// The most (blob, holder) pairs one [`Request::Lacking`] may name.
pub const MAX_LACKING: usize = 256;

/// A single answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// Done.
    Ok,
    /// Yes or no.
    Bool(bool),
    /// Taken on, and failed: what and why.
    Failed(Failed),
    /// A step's input digests.
    Inputs(Result<Vec<Digest>, WorkerError>),
    /// The cluster's state.
    Status(Box<ClusterStatus>),
    /// The blob an artifact was packed into.
    Artifact(Result<Digest, WorkerError>),
    /// A copy taken, or why not.
    Copied(Result<(), CopyError>),
    /// A pushed layer taken: the digest its bytes hash to.
    Took(Result<Digest, Failed>),
    /// For each blob asked about, what dropping the asker's copy loses.
    Spare(Vec<CopyKind>),
    /// For each blob asked to retire, whether the asker may drop its copy
    /// now: no cache entry needs it, and no image the cluster names.
    Retired(Vec<bool>),
    /// Builds a coordinator coordinated.
    History(Vec<strata_worker::BuildRecord>),
    /// Cache entries imported: how many the index did not have.
    Imported(usize),
    /// Where nodes' bytes are.
    Usage(Vec<NodeUsage>),
    /// The blobs asked about that are not stored.
    Missing(Vec<Digest>),
    /// The images the cluster names, by name.
    Images(Vec<NamedImage>),
    /// A push made, or why not.
    Pushed(Result<strata_registry::Pushed, Failed>),
    /// Refused for a reason the asker acts on.
    Refused(Refusal),
}

/// A request refused for a reason the asker acts on: a kind to branch on,
/// never a message's text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The worker asking is not registered here, or its lease lapsed: it
    /// registers again.
    #[error("not registered (or lease expired): register again")]
    NotRegistered,
    /// An uploaded blob was not what its name says: other bytes, or fewer
    /// (a file that changed while it was sent).
    #[error("blob {blob}: {detail}")]
    BlobMismatch {
        /// The blob named.
        blob: Digest,
        /// What did not match.
        detail: String,
    },
    /// The asker's certificate may not ask this.
    #[error(
        "{asker} may not ask {asked}: that needs {} {needs} certificate{}",
        if matches!(needs, Role::Admin) { "an" } else { "a" },
        if matches!(needs, Role::Admin) { " (`admin.toml` from `strata cluster init`)" } else { "" }
    )]
    NotAllowed {
        /// Who asked: its role and name.
        asker: String,
        /// What it asked for.
        asked: String,
        /// The role that may ask it.
        needs: Role,
    },
    /// The node asked does not serve this: it is asked of another role.
    #[error("a {by} is not asked {asked}")]
    NotServed {
        /// What was asked for.
        asked: String,
        /// The role of the node asked.
        by: Role,
    },
    /// The request names more than a request may.
    #[error("{count} {what}, over the limit of {limit}")]
    OverLimit {
        /// What it names too many of.
        what: String,
        /// How many it names.
        count: usize,
        /// The most it may.
        limit: usize,
    },
    /// An upload would pass the client's quota.
    #[error(transparent)]
    OverQuota(#[from] crate::access::OverQuota),
    /// No worker by that name has registered.
    #[error("no worker named {0} has registered")]
    NoSuchWorker(String),
    /// A blob is not the layer the request says it is.
    #[error("blob {blob} is not the layer its cache entry names: {detail}")]
    NotTheLayer {
        /// The blob.
        blob: Digest,
        /// What its content is, and what was said.
        detail: String,
    },
    /// A blob the request names was never uploaded.
    #[error("layer {0} was not uploaded")]
    NotUploaded(Digest),
}

/// A request taken on that failed: what failed, and its causes as an
/// error chain (each the source of the one before), which cross the wire
/// as text, at most [`Causes::MAX`] of them.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[serde(from = "FailedOnWire", into = "FailedOnWire")]
#[error("{message}")]
pub struct Failed {
    message: String,
    #[source]
    causes: Option<Causes>,
}

impl Failed {
    /// A failure with no cause below it.
    pub fn new(message: impl Into<String>) -> Failed {
        Failed {
            message: message.into(),
            causes: None,
        }
    }

    /// `error`, its sources kept as the causes.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Failed {
        Failed {
            message: error.to_string(),
            causes: Causes::new(&Causes::of(error)),
        }
    }

    /// `what` failed because of `error` (and its sources).
    pub fn because(what: impl Into<String>, error: &(dyn std::error::Error + 'static)) -> Failed {
        let mut causes = vec![error.to_string()];
        causes.extend(Causes::of(error));
        Failed {
            message: what.into(),
            causes: Causes::new(&causes),
        }
    }
}

/// [`Failed`] as it crosses the wire.
#[derive(Clone, Serialize, Deserialize)]
struct FailedOnWire {
    message: String,
    causes: Vec<String>,
}

impl From<FailedOnWire> for Failed {
    fn from(w: FailedOnWire) -> Failed {
        Failed {
            message: w.message,
            causes: Causes::new(&w.causes),
        }
    }
}

impl From<Failed> for FailedOnWire {
    fn from(f: Failed) -> FailedOnWire {
        let mut causes = Vec::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = f
            .causes
            .as_ref()
            .map(|c| c as &(dyn std::error::Error + 'static));
        while let Some(c) = next {
            causes.push(c.to_string());
            next = c.source();
        }
        FailedOnWire {
            message: f.message,
            causes,
        }
    }
}

impl Reply {
    /// The refusal of a request naming `count` of `what`, over `limit`.
    pub(crate) fn over_limit(what: &str, count: usize, limit: usize) -> Reply {
        Reply::Refused(Refusal::OverLimit {
            what: what.to_string(),
            count,
            limit,
        })
    }

    /// The answer that `what` failed because of `error`.
    pub(crate) fn failed(what: &str, error: &(dyn std::error::Error + 'static)) -> Reply {
        Reply::Failed(Failed::because(what, error))
    }
}

impl Refusal {
    /// What a transfer error says of the blob that failed, if it was the
    /// blob's bytes that were wrong.
    pub fn of_transfer(e: &strata_net::Error) -> Option<Refusal> {
        match e {
            strata_net::Error::Blob { digest, detail, .. }
            | strata_net::Error::Forged { digest, detail, .. } => Some(Refusal::BlobMismatch {
                blob: *digest,
                detail: detail.clone(),
            }),
            _ => None,
        }
    }
}

impl Request {
    /// The role whose certificate may ask it; an admin may also ask what
    /// a client may.
    pub fn asked_by(&self) -> Option<Role> {
        match self {
            Request::Any(_) => None,
            Request::Client(_) => Some(Role::Client),
            Request::Admin(_) => Some(Role::Admin),
            Request::Worker(_) => Some(Role::Worker),
            Request::Coordinator(_) => Some(Role::Coordinator),
            Request::Peer(_) => Some(Role::Worker),
        }
    }

    /// Whether a certificate of `role` may ask it: the one check of
    /// roles, made before a node looks at what is asked.
    pub fn may_come_from(&self, role: Role) -> bool {
        match self.asked_by() {
            None => true,
            Some(Role::Client) => matches!(role, Role::Client | Role::Admin),
            Some(wanted) => role == wanted,
        }
    }

    /// What it asks, after "may not ask", for refusals.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Any(AnyRequest::GetBlob(_)) => "for a blob",
            Request::Any(AnyRequest::Lacking(_)) => "to check holders reported lacking blobs",
            Request::Client(r) => match r {
                ClientRequest::HasBlob(_) => "whether it holds a blob",
                ClientRequest::PutBlob(_) => "to store a blob",
                ClientRequest::PutBlobs(_) => "to store blobs",
                ClientRequest::Missing { .. } => "which blobs of a build context it lacks",
                ClientRequest::Build(_) => "for a build",
                ClientRequest::Status => "for its status",
                ClientRequest::History { .. } => "for its build history",
                ClientRequest::Du => "where the cluster's bytes are",
                ClientRequest::Images => "for the images the cluster names",
                ClientRequest::Untag(_) => "to drop an image name",
                ClientRequest::Push(_) => "for a push",
            },
            Request::Admin(r) => match r {
                AdminRequest::Cordon { .. } => "to cordon a worker",
                AdminRequest::ChangeGroup(_) => "to change the group of coordinators",
                AdminRequest::ImportCache(_) => "to import a cache into the cluster's index",
            },
            Request::Worker(r) => match r {
                WorkerRequest::Register(_) => "to register as a worker",
                WorkerRequest::Heartbeat { .. } => "to record a worker's heartbeat",
                WorkerRequest::Spare(_) => "which blobs are spare copies",
                WorkerRequest::Retire(_) => "to retire the last copies of blobs",
                WorkerRequest::GetBlobs(_) => "for blobs of a build context",
            },
            Request::Coordinator(r) => match r {
                CoordinatorRequest::Begin(_) => "to begin a build",
                CoordinatorRequest::Inputs(_) => "for a step's inputs",
                CoordinatorRequest::Execute(_) => "to run a step",
                CoordinatorRequest::Artifact(_) => "for an artifact",
                CoordinatorRequest::End(_) => "to end a build",
                CoordinatorRequest::Copy(_) => "to take a copy of a blob",
                CoordinatorRequest::Grant(_) => "to let a client read blobs",
                CoordinatorRequest::HasBlob(_) => "whether it holds a blob",
                CoordinatorRequest::Du => "where its bytes are",
                CoordinatorRequest::PushImage(_) => "to push an image",
            },
            Request::Peer(PeerRequest::Take) => "to take a layer as it is written",
        }
    }

    /// The refusal of `asker`, whose certificate may not ask it.
    pub fn not_allowed(&self, asker: &strata_net::Peer) -> Refusal {
        Refusal::NotAllowed {
            asker: asker.to_string(),
            asked: self.name().to_string(),
            needs: self.asked_by().unwrap_or(asker.role),
        }
    }

    /// The refusal of a node of role `by`, which does not serve it.
    pub fn not_served(&self, by: Role) -> Refusal {
        Refusal::NotServed {
            asked: self.name().to_string(),
            by,
        }
    }
}

/// How long a node has to answer a connection: one that is down may not
/// answer at all, and QUIC's idle timeout is far longer.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The connection or the stream failed, or the reply was not one.
    #[error(transparent)]
    Net(#[from] strata_net::Error),
    /// The peer closed the stream without a reply.
    #[error("{0} closed the stream without answering")]
    Unanswered(String),
}

/// Sends one request and reads its one reply.
pub(crate) async fn request(conn: &Connection, req: &Request) -> Result<Reply, RequestError> {
    let (mut send, mut recv) = conn.open().await?;
    write_frame(&mut send, req, conn.addr).await?;
    let _ = send.finish();
    read_frame::<Reply>(&mut recv, conn.addr)
        .await?
        .ok_or_else(|| RequestError::Unanswered(conn.peer.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_that_is_not_what_it_was_named_is_refused_by_kind_and_other_failures_are_not() {
        let peer: SocketAddr = ([127, 0, 0, 1], 7400).into();
        let blob = Digest::of(b"context file");
        for e in [
            strata_net::Error::Forged {
                peer,
                digest: blob,
                detail: "the bytes hash to something else: refused".into(),
            },
            strata_net::Error::Blob {
                peer,
                digest: blob,
                detail: "3 of 12 bytes arrived".into(),
            },
        ] {
            match Refusal::of_transfer(&e) {
                Some(Refusal::BlobMismatch { blob: b, .. }) => assert_eq!(b, blob),
                other => panic!("{e}: {other:?}"),
            }
        }
        let refused = strata_net::Error::Refused {
            peer,
            detail: "over the hourly quota".into(),
        };
        assert_eq!(Refusal::of_transfer(&refused), None);
        // It travels as a kind.
        let reply = Reply::Refused(Refusal::NotRegistered);
        let bytes = bincode::serde::encode_to_vec(&reply, bincode::config::standard()).unwrap();
        let (back, _): (Reply, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert!(matches!(back, Reply::Refused(Refusal::NotRegistered)));
    }

    #[test]
    fn a_failed_build_reaches_its_client_with_its_kind_and_causes() {
        let disk = std::io::Error::other("no space left on device");
        let sent = BuildEvent::Failed(Box::new(BuildFailed {
            kind: FailureKind::Step,
            error: Failed::because("Dockerfile:3: [stage-0 2/2] RUN make: exit code 2", &disk),
            title: Some("[stage-0 2/2] RUN make".into()),
            tail: vec!["make: *** [all] Error 2".into()],
        }));
        let bytes = bincode::serde::encode_to_vec(&sent, bincode::config::standard()).unwrap();
        let back: BuildEvent = strata_net::decode_frame(&bytes).unwrap();
        let BuildEvent::Failed(failed) = back else {
            panic!("not a failure");
        };
        assert_eq!(failed.kind, FailureKind::Step);
        assert_eq!(failed.tail, ["make: *** [all] Error 2"]);
        // As an error it reads as a local build's: the message once, then
        // each cause below it.
        let e: &(dyn std::error::Error + 'static) = &*failed;
        let chain: Vec<String> = std::iter::successors(Some(e), |e| e.source())
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            chain,
            [
                "Dockerfile:3: [stage-0 2/2] RUN make: exit code 2",
                "no space left on device"
            ]
        );
        let cancelled = BuildFailed::of_solve(&strata_solver::SolveError::Cancelled, "Dockerfile");
        assert_eq!(cancelled.kind, FailureKind::Cancelled);
        assert_eq!(cancelled.text(), "build cancelled");
    }

    /// A request of each outer kind.
    fn one_of_each() -> Vec<Request> {
        let d = Digest::of(b"blob");
        vec![
            Request::Any(AnyRequest::GetBlob(d)),
            Request::Client(ClientRequest::Status),
            Request::Admin(AdminRequest::Cordon {
                worker: "worker-1".into(),
                cordoned: true,
            }),
            Request::Worker(WorkerRequest::Spare(vec![d])),
            Request::Coordinator(CoordinatorRequest::HasBlob(d)),
            Request::Peer(PeerRequest::Take),
        ]
    }

    #[test]
    fn each_role_may_ask_only_its_own_requests_and_an_admin_a_client_s_too() {
        let roles = [Role::Client, Role::Admin, Role::Worker, Role::Coordinator];
        let allowed: Vec<Vec<bool>> = one_of_each()
            .iter()
            .map(|r| roles.iter().map(|role| r.may_come_from(*role)).collect())
            .collect();
        assert_eq!(
            allowed,
            [
                // client, admin, worker, coordinator
                [true, true, true, true],
                [true, true, false, false],
                [false, true, false, false],
                [false, false, true, false],
                [false, false, false, true],
                [false, false, true, false],
            ]
        );
    }

    #[test]
    fn a_refusal_by_role_names_the_asker_what_it_asked_and_the_certificate_it_needs() {
        let client = strata_net::Peer {
            role: Role::Client,
            name: "team-b".into(),
        };
        let cordon = &one_of_each()[2];
        assert!(!cordon.may_come_from(client.role));
        let refusal = cordon.not_allowed(&client);
        assert_eq!(
            refusal.to_string(),
            "client team-b may not ask to cordon a worker: that needs an admin certificate \
             (`admin.toml` from `strata cluster init`)"
        );
        let has = &one_of_each()[4];
        assert_eq!(
            has.not_allowed(&client).to_string(),
            "client team-b may not ask whether it holds a blob: that needs a coordinator certificate"
        );
        assert_eq!(
            one_of_each()[1].not_served(Role::Worker).to_string(),
            "a worker is not asked for its status"
        );
    }

    #[test]
    fn a_failure_crosses_the_wire_with_its_causes_as_an_error_chain() {
        let io = std::io::Error::other("disk full");
        let failed = Failed::because("cannot record cache entry", &io);
        let bytes =
            bincode::serde::encode_to_vec(Reply::Failed(failed), bincode::config::standard())
                .unwrap();
        let (back, _): (Reply, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        let Reply::Failed(back) = back else {
            panic!("{back:?}")
        };
        let chain: Vec<String> =
            std::iter::successors(Some(&back as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .map(ToString::to_string)
            .collect();
        assert_eq!(chain, ["cannot record cache entry", "disk full"]);
        // A chain made too deep by another node is cut, not followed.
        let deep = FailedOnWire {
            message: "outer".into(),
            causes: (0..10_000).map(|i| i.to_string()).collect(),
        };
        let failed = Failed::from(deep);
        let depth =
            std::iter::successors(Some(&failed as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .count();
        assert_eq!(depth, 1 + Causes::MAX);
    }
}
