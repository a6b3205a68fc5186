//! What a command running in the daemon works with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use strata_daemon::{Session, Sink};
use strata_worker::Node;

/// What a command running in the daemon works with: the node and its
/// client. Clones are the same command's.
#[derive(Clone)]
pub struct Cx {
    /// The state directory's stores.
    pub node: Arc<Node>,
    /// The client.
    pub session: Session,
    /// The build contexts' stat caches, decoded, shared by every build.
    pub contexts: Arc<strata_cluster::context::StatCaches>,
}

impl Cx {
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

    /// Runs `work`, which blocks its thread (the store's database, files
    /// read or written whole), on a blocking thread, within the command's
    /// span (so its warnings still reach the client).
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Cx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let cx = self.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| work(&cx)))
            .await
            .context("the command's work stopped")?
    }
}
