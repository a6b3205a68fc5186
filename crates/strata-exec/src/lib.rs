//! strata's executor: one build step's process in an OCI-runtime sandbox.
//!
//! [`Runtime`] finds runc (or crun) and runs a [`Sandbox`] over a root
//! filesystem someone else prepared: it writes the bundle's `config.json`
//! (built with the oci-spec crate), starts the runtime, streams the
//! process's output and returns its exit status. Each step gets its own
//! mount, pid, ipc and uts namespaces, Docker's default capabilities,
//! masked paths and a seccomp filter refusing what Docker's default
//! profile refuses, and a network of its own on a NAT bridge ([`Cni`])
//! unless it asks for none or (entitled) for the host's.
//!
//! It knows nothing of layers, images or Dockerfiles: user names are
//! resolved, mounts prepared and output interpreted by the caller.

mod network;
mod runtime;
mod spec;

pub use network::{BRIDGE, Cni, DEFAULT_SUBNET, PrivateNetwork};
pub use runtime::{ExitStatus, Output, Runtime, Stream};
pub use spec::{Mount, Network, Rlimit, Sandbox};

/// What can go wrong running a step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No OCI runtime binary.
    #[error(
        "no OCI runtime found: install Debian's runc package (apt-get install runc), or set STRATA_RUNTIME to a runc or crun binary"
    )]
    NoRuntime,
    /// The bundle could not be written.
    #[error("cannot write the sandbox bundle {}: {source}", path.display())]
    Bundle {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The runtime could not be started or waited for.
    #[error("cannot run {runtime}: {source}")]
    Spawn {
        /// The runtime binary.
        runtime: String,
        /// Why.
        source: std::io::Error,
    },
    /// The spec could not be built.
    #[error("cannot build the runtime spec: {0}")]
    Spec(String),
    /// A step's network could not be made.
    #[error("cannot give step {step} its network: {detail}")]
    Network {
        /// The step's sandbox.
        step: String,
        /// Why.
        detail: String,
    },
    /// No CNI plugins for a step's own network.
    #[error(
        "a RUN step gets a network of its own through the CNI bridge plugin, which is not installed: apt-get install containernetworking-plugins (or set STRATA_CNI_PATH to the plugins' directory)"
    )]
    NoNetwork,
}

/// The executor's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
