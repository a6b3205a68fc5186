//! Coordinators and workers on `/metrics`, `/healthz` and `/readyz`:
//! what each says of its readiness, and the gauges read at each scrape.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use strata_worker::history::{Dashboard, NodeView, WorkerView};

use crate::config::{MetricsConfig, TlsFiles};
use crate::coordinator::Coordinator;
use crate::worker::WorkerNode;

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

/// The bytes of a node's blobs, for `strata_store_bytes`.
fn store_bytes(node: &strata_worker::Node) {
    for (kind, n) in node.usage() {
        strata_metrics::store_bytes(kind, n);
    }
}

/// How often the dashboard's view of the cluster (workers, cache entries)
/// is read again: reading it scans the cache index.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// A coordinator is ready once it knows a leader of the replicated index:
/// before that, no lookup or write can be answered.
pub(crate) struct CoordinatorHealth {
    pub(crate) coordinator: Weak<Coordinator>,
    /// The last view of the cluster, and when it was read.
    pub(crate) status: Mutex<Option<(Instant, Vec<WorkerView>, usize)>>,
}

impl strata_metrics::Health for CoordinatorHealth {
    fn ready(&self) -> Result<(), String> {
        let c = self.coordinator.upgrade().ok_or("shutting down")?;
        let m = c.member.raft().metrics().borrow().clone();
        match m.current_leader {
            Some(_) => Ok(()),
            None => Err(format!(
                "no leader of the replicated cache index is known (term {})",
                m.current_term
            )),
        }
    }

    fn refresh(&self) {
        if let Some(c) = self.coordinator.upgrade() {
            store_bytes(&c.node);
        }
    }

    fn dashboard(&self) -> Option<serde_json::Value> {
        let c = self.coordinator.upgrade()?;
        let (workers, entries) = {
            let mut cached = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            match &*cached {
                Some((at, workers, entries)) if at.elapsed() < STATUS_EVERY => {
                    (workers.clone(), *entries)
                }
                _ => {
                    let s = c.status();
                    let workers: Vec<WorkerView> = s
                        .workers
                        .iter()
                        .map(|w| WorkerView {
                            name: w.name.clone(),
                            address: w.addr.to_string(),
                            state: if !w.alive {
                                "gone"
                            } else if w.cordoned {
                                "cordoned"
                            } else {
                                "up"
                            },
                            slots: w.slots,
                            running: w.running,
                            blobs: w.blobs,
                        })
                        .collect();
                    *cached = Some((Instant::now(), workers.clone(), s.cache_entries));
                    (workers, s.cache_entries)
                }
            }
        };
        let about = NodeView {
            name: c.name.clone(),
            role: "coordinator",
            version: env!("CARGO_PKG_VERSION"),
        };
        serde_json::to_value(Dashboard::of(&c.node, about, workers, entries)).ok()
    }
}

/// A worker is ready once registered with a coordinator: before that no
/// step is placed on it.
pub(crate) struct WorkerHealth(pub(crate) Weak<WorkerNode>);

impl strata_metrics::Health for WorkerHealth {
    fn ready(&self) -> Result<(), String> {
        let w = self.0.upgrade().ok_or("shutting down")?;
        let registered = w
            .registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        if registered == 0 {
            Err(format!(
                "worker {} is not registered with any coordinator",
                w.name()
            ))
        } else {
            Ok(())
        }
    }

    fn refresh(&self) {
        if let Some(w) = self.0.upgrade() {
            store_bytes(&w.node);
        }
    }
}
