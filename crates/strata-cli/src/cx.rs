//! What a command running in the daemon works with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_daemon::{Session, Sink};
use strata_worker::Node;

/// What a command running in the daemon works with: the node and its
/// client.
pub struct Cx<'a> {
    /// The state directory's stores.
    pub node: &'a Arc<Node>,
    /// The client.
    pub session: &'a Session,
    /// The build contexts' stat caches, decoded, shared by every build.
    pub contexts: &'a strata_cluster::context::StatCaches,
}

impl Cx<'_> {
    /// The client's standard output.
    pub fn out(&self) -> Sink {
        self.session.stdout()
    }

    /// The client's standard error.
    pub fn err(&self) -> Sink {
        self.session.stderr()
    }

    /// A path as the client gave it.
    pub fn path(&self, p: &Path) -> PathBuf {
        self.session.path(p)
    }

    /// Runs a future on the daemon's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.session.block_on(f)
    }
}
