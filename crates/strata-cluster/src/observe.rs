//! Coordinators and workers on `/metrics`, `/healthz` and `/readyz`: the
//! server, and the gauges every node reads at each scrape. What each says
//! of its readiness is its own (`strata_metrics::Health`, beside it).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{MetricsConfig, TlsFiles};

/// Serves this process's metrics as `config` says, for a node listening
/// (QUIC) on `node` with the credentials `tls`: HTTPS with the node's
/// certificate off loopback. Returns where, or `None` when disabled.
pub(crate) async fn serve(
    config: &MetricsConfig,
    node: SocketAddr,
    tls: &TlsFiles,
    health: Arc<dyn strata_metrics::Health>,
) -> Result<Option<SocketAddr>, crate::StartError> {
    let Some(addr) = config.address(node) else {
        return Ok(None);
    };
    let https = if addr.ip().is_loopback() {
        None
    } else {
        let id = tls.identity()?;
        Some(Arc::new(
            strata_net::https_config(&id).map_err(crate::StartError::Certificate)?,
        ))
    };
    let token = config.token()?;
    let served = strata_metrics::serve(addr, https, token, health)
        .await
        .map_err(|e| crate::StartError::Serve {
            what: "metrics",
            addr,
            hint: "set [metrics] listen, or enabled = false, in the node's config; STRATA_METRICS_LISTEN=off",
            source: Box::new(e),
        })?;
    Ok(Some(served.addr))
}

/// Why a coordinator or worker is not ready.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotReady {
    /// The node is stopping.
    #[error("shutting down")]
    ShuttingDown,
    /// No lookup or write of the cache index can be answered.
    #[error("no leader of the replicated cache index is known (term {0})")]
    NoLeader(u64),
    /// No step is placed on a worker no coordinator knows.
    #[error("worker {0} is not registered with any coordinator")]
    NotRegistered(String),
}

/// The bytes of a node's blobs, for `strata_store_bytes`.
pub(crate) fn store_bytes(node: &strata_worker::Node) {
    for (kind, n) in node.usage() {
        strata_metrics::store_bytes(kind, n);
    }
}
