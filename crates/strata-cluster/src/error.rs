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
