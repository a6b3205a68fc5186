//! What stops a coordinator or a worker from starting, by kind, each with
//! its cause.

use std::net::SocketAddr;
use std::path::PathBuf;

/// What stops a coordinator or a worker from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its certificate, key or the cluster's CA could not be read, or a
    /// setting in its configuration could not be.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Its certificate names no role, or cannot make a TLS configuration.
    #[error("its certificate")]
    Certificate(#[source] strata_net::Error),
    /// Its certificate is another role's.
    #[error("{} is a {found} certificate; a {wanted} needs a {wanted}'s", cert.display())]
    Role {
        /// The certificate file.
        cert: PathBuf,
        /// The role it names.
        found: strata_net::Role,
        /// The role starting.
        wanted: strata_net::Role,
    },
    /// The state directory could not be opened.
    #[error("cannot open the state directory {}", home.display())]
    Node {
        /// The state directory.
        home: PathBuf,
        /// Why.
        source: strata_worker::NodeError,
    },
    /// An address could not be listened on.
    #[error("cannot listen for {what} on {addr}")]
    Listen {
        /// What it was to serve.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An endpoint it was configured to serve (metrics, images) could not
    /// be started.
    #[error("cannot serve {what} on {addr} ({hint})")]
    Serve {
        /// What it was to serve.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// The setting that moves or turns it off.
        hint: &'static str,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The disk the store is on could not be measured for its bounds.
    #[error("the store's bounds")]
    Bounds(#[from] strata_worker::GcError),
    /// A directory of its state could not be made.
    #[error("cannot create {}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The group of coordinators could not be joined.
    #[error("cannot join the group of coordinators")]
    Group(#[source] strata_raft::Error),
    /// This coordinator lost its state while the group counts it as a
    /// voter.
    #[error(
        "coordinator {id}'s state ({}) is empty, but the group of coordinators {voters:?} still counts it as a voter: it lost its state, and voting with an empty log could lose acknowledged writes. \
         Take it out of the group first (`strata cluster remove-coordinator --id {id} --cluster admin.toml`), start it again, then add it back (`strata cluster add-coordinator --id {id} --raft {raft} --cluster admin.toml`)",
        dir.display()
    )]
    LostItsState {
        /// Its id in the group.
        id: u64,
        /// Its Raft state directory.
        dir: PathBuf,
        /// The group's voters.
        voters: Vec<u64>,
        /// Its Raft address.
        raft: String,
    },
}

impl StartError {
    /// A [`StartError::Listen`] maker for `map_err`.
    pub(crate) fn listen<E: std::error::Error + Send + Sync + 'static>(
        what: &'static str,
        addr: SocketAddr,
    ) -> impl FnOnce(E) -> StartError {
        move |e| StartError::Listen {
            what,
            addr,
            source: Box::new(e),
        }
    }
}

/// What goes wrong with an image the cluster names (`cluster images`,
/// `cluster rmi`, `--push` from the cluster).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A name that is no image reference.
    #[error("{name:?} is not an image name")]
    BadName {
        /// The name, as given.
        name: String,
        /// Why.
        source: strata_oci::ParseReferenceError,
    },
    /// A built image could not be named in the group's state.
    #[error("the image is built but naming it {name} failed")]
    Name {
        /// The name.
        name: String,
        /// Why.
        source: strata_raft::Error,
    },
    /// No image by that name.
    #[error("the cluster names no image {0}")]
    NoSuchImage(String),
    /// The replicated index could not be read or written.
    #[error("the cluster's image names")]
    Index(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No worker is up to push from.
    #[error("no live worker to push from")]
    NoWorker,
    /// The worker pushing failed, or did not answer.
    #[error("pushing from {worker}")]
    Push {
        /// The worker.
        worker: String,
        /// What it said, or why it did not answer.
        source: crate::protocol::Failed,
    },
}

/// Why a submitted build is refused before it starts.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Its id is not one to take.
    #[error("build id {0:?} is not 1 to {max} characters of [0-9a-z-]", max = strata_solver::MAX_BUILD_ID)]
    BadId(String),
    /// Too many names, or too long ones.
    #[error("a build may have at most {most} names of at most {longest} bytes")]
    TooManyNames {
        /// The most names.
        most: usize,
        /// The longest name, in bytes.
        longest: usize,
    },
    /// A name that is no image reference.
    #[error("{name:?} is not an image name")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        source: strata_oci::ParseReferenceError,
    },
    /// A name with a digest.
    #[error("{0:?} names a digest: a build's names are tags (app:1)")]
    Digest(String),
}

/// Why a layer could not be given its copies, or the cache index read
/// for repair.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    /// The cache index could not be read.
    #[error("the cache index")]
    Index(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No live node holds the blob to copy from.
    #[error("no live node holds blob {0}")]
    Unheld(strata_cas::Digest),
    /// Every copy failed, and the node that held it is gone.
    #[error("no live worker holds blob {blob} after copying{}", in_parens(tried))]
    Lost {
        /// The blob.
        blob: strata_cas::Digest,
        /// Why each copy failed.
        tried: Vec<String>,
    },
    /// A worker's copy is not the layer: nothing may be cached under it.
    #[error("{0}")]
    NotTheLayer(String),
}

/// Why the image endpoint cannot serve a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// No node that holds it gave it.
    #[error("layer {diff_id} cannot be fetched")]
    Fetch {
        /// The layer's diff_id.
        diff_id: strata_cas::Sha256,
        /// Why.
        source: crate::peers::FetchError,
    },
    /// The store could not be read.
    #[error("cannot read layer {diff_id} from the store")]
    Store {
        /// The layer's diff_id.
        diff_id: strata_cas::Sha256,
        /// Why.
        source: strata_cas::Error,
    },
    /// Its file could not be opened.
    #[error("cannot open {}", path.display())]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It left the store while it was being opened.
    #[error("layer {0} is gone from the store")]
    Gone(strata_cas::Sha256),
}

/// Why the group did not record what a worker holds.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The worker's connection is not the one it said so on any more.
    #[error("worker {0} left or came back meanwhile")]
    Gone(String),
    /// The write to the group failed.
    #[error("the group did not record it")]
    Index(#[source] strata_raft::Error),
}

/// Why a worker could not evict from its store.
#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    /// Listing or deleting failed.
    #[error(transparent)]
    Gc(#[from] strata_worker::GcError),
    /// The task doing it stopped.
    #[error("eviction stopped")]
    Stopped(#[from] tokio::task::JoinError),
}

/// Why a worker could not push an image for a client.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The destination is no image reference.
    #[error("{name:?} is not an image name")]
    Destination {
        /// The destination, as given.
        name: String,
        /// Why.
        source: strata_oci::ParseReferenceError,
    },
    /// The image's layers could not be gathered from their holders.
    #[error("gathering the image's layers")]
    Gather(#[source] crate::peers::FetchError),
    /// The image's config could not be stored or described.
    #[error("storing the image")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The registry refused or failed.
    #[error("cannot push {destination}")]
    Registry {
        /// Where to, as a user writes it.
        destination: String,
        /// Why.
        source: strata_registry::Error,
    },
}

/// Why a coordinator could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Its name could not be looked up.
    #[error("cannot look up {addr}")]
    Lookup {
        /// The address, as configured.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Its name has no address.
    #[error("{0} has no address")]
    NoAddress(String),
    /// It did not answer in time.
    #[error("{addr}: no answer within {within:?}")]
    Timeout {
        /// The address.
        addr: String,
        /// How long it was given.
        within: std::time::Duration,
    },
    /// The connection failed (refused, TLS, certificates).
    #[error("{addr}")]
    Net {
        /// The address.
        addr: String,
        /// Why.
        source: strata_net::Error,
    },
    /// What answered is another role.
    #[error("{addr}: {peer} is not a coordinator")]
    NotCoordinator {
        /// The address.
        addr: String,
        /// Who answered.
        peer: String,
    },
}

/// Why a coordinator could not plan a build.
#[derive(Debug, thiserror::Error)]
pub enum PlanningError {
    /// The build cannot be planned, or not run on this cluster.
    #[error(transparent)]
    Build(#[from] strata_worker::BuildError),
    /// What it resolved cannot be sent to workers.
    #[error(transparent)]
    Wire(#[from] crate::plan::WireError),
}

/// Why a worker could not register with a coordinator.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The coordinator could not be reached.
    #[error(transparent)]
    Connect(Box<ConnectError>),
    /// This worker's store could not be listed.
    #[error("cannot list this worker's blobs")]
    List(#[source] strata_cas::Error),
    /// The registration did not get through, or got no answer.
    #[error("registering")]
    Request(#[source] crate::protocol::RequestError),
    /// The coordinator refused it.
    #[error("the coordinator refused the registration")]
    Refused(#[source] crate::protocol::Refusal),
    /// The coordinator failed.
    #[error("the coordinator could not register this worker")]
    Failed(#[source] crate::protocol::Failed),
    /// The coordinator answered something else.
    #[error("unexpected answer to registering: {0}")]
    Unexpected(String),
}

/// `" (a; b)"`, or nothing for no reasons.
fn in_parens(why: &[String]) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(" ({})", why.join("; "))
    }
}
