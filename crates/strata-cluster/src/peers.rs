//! Blobs between nodes: connections to other nodes' blob services, and
//! fetching a blob from whichever holder has it whole.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use strata_cas::{ContentStore, Digest};
use strata_net::{Connection, Endpoint, recv_blob_limited, write_frame};
use strata_oci::LayerRef;
use tokio::sync::Mutex;
use tracing::Instrument as _;

use crate::protocol::{AnyRequest, Holder, MAX_LACKING, Request, request};

/// Why blobs could not be fetched.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    /// What went wrong with each holder tried.
    pub message: String,
    /// Holders that said they do not hold a blob they were named for:
    /// (blob, holder).
    pub lacking: Vec<(Digest, String)>,
}

impl FetchError {
    fn new(message: impl Into<String>) -> FetchError {
        FetchError {
            message: message.into(),
            lacking: Vec::new(),
        }
    }
}

/// Blobs fetched at once.
const PARALLEL_FETCHES: usize = 4;

/// Connections to other nodes, opened on first use and kept while they
/// live.
#[derive(Debug)]
pub struct Peers {
    endpoint: Endpoint,
    conns: Mutex<HashMap<SocketAddr, Connection>>,
}

impl Peers {
    /// Peers dialed from `endpoint`.
    pub fn new(endpoint: Endpoint) -> Peers {
        Peers {
            endpoint,
            conns: Mutex::default(),
        }
    }

    /// A live connection to the node at `addr`.
    pub async fn connection(&self, addr: SocketAddr) -> Result<Connection, strata_net::Error> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&addr)
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let c = self.endpoint.connect(addr).await?;
        conns.insert(addr, c.clone());
        Ok(c)
    }

    /// Fetches `blob` into `cas` from the first of `holders` that sends
    /// it whole and verified; a holder that fails (gone, lacking it, or
    /// sending bytes that do not hash to the name) is passed over.
    /// Returns the bytes received. With `bytes_per_second`, the blob
    /// comes no faster.
    pub async fn fetch(
        &self,
        cas: &Arc<ContentStore>,
        blob: &Digest,
        holders: &[Holder],
        bytes_per_second: Option<u64>,
    ) -> Result<u64, FetchError> {
        let mut why = Vec::new();
        let mut lacking = Vec::new();
        for h in holders {
            match self.fetch_from(cas, blob, h, bytes_per_second).await {
                Ok(Some(n)) => return Ok(n),
                Ok(None) => {
                    why.push(format!("{} does not hold it", h.name));
                    lacking.push((*blob, h.name.clone()));
                }
                Err(e) => {
                    tracing::warn!(blob = %blob, holder = %h.name, error = %e, "fetching from this holder failed; trying the next");
                    why.push(format!("{}: {e}", h.name));
                }
            }
        }
        Err(FetchError {
            message: if why.is_empty() {
                format!("blob {blob} is held by no live node")
            } else {
                format!("cannot fetch blob {blob}: {}", why.join("; "))
            },
            lacking,
        })
    }

    async fn fetch_from(
        &self,
        cas: &Arc<ContentStore>,
        blob: &Digest,
        holder: &Holder,
        bytes_per_second: Option<u64>,
    ) -> Result<Option<u64>, strata_net::Error> {
        let conn = self.connection(holder.addr).await?;
        let (mut send, mut recv) = conn.open().await?;
        write_frame(
            &mut send,
            &Request::Any(AnyRequest::GetBlob(*blob)),
            conn.addr,
        )
        .await?;
        let _ = send.finish();
        let got = recv_blob_limited(&mut recv, cas, blob, conn.addr, bytes_per_second).await;
        match &got {
            Ok(Some(n)) => strata_metrics::transferred(strata_metrics::Transfer::PeerReceived, *n),
            Ok(None) => {}
            Err(e) => {
                strata_metrics::request_error(e.kind());
                conn.close_if_forged(e);
            }
        }
        got
    }

    /// Makes sure every layer in `needed` is in `cas`, fetching those that
    /// are not (a few at once). Returns the bytes received.
    pub async fn ensure(
        self: &Arc<Self>,
        cas: &Arc<ContentStore>,
        needed: &[(LayerRef, Vec<Holder>)],
    ) -> Result<u64, FetchError> {
        let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL_FETCHES));
        let mut tasks = tokio::task::JoinSet::new();
        for (layer, holders) in needed {
            if cas.contains(&layer.blob).unwrap_or(false) {
                continue;
            }
            let (me, cas, limit) = (Arc::clone(self), Arc::clone(cas), Arc::clone(&limit));
            let (blob, holders) = (layer.blob, holders.clone());
            tasks.spawn(
                async move {
                    let _permit = limit
                        .acquire()
                        .await
                        .map_err(|e| FetchError::new(e.to_string()))?;
                    me.fetch(&cas, &blob, &holders, None).await
                }
                .in_current_span(),
            );
        }
        // Every fetch runs to its end, so every holder found lacking is
        // known.
        let mut total = 0;
        let mut failed: Option<FetchError> = None;
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(n)) => total += n,
                Ok(Err(e)) => match &mut failed {
                    Some(f) => f.lacking.extend(e.lacking),
                    None => failed = Some(e),
                },
                Err(e) => {
                    failed.get_or_insert_with(|| FetchError::new(format!("a fetch stopped: {e}")));
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        for (layer, _) in needed {
            check_diff_id(cas, layer).map_err(|e| FetchError::new(e.to_string()))?;
        }
        Ok(total)
    }
}

/// Checks that a layer's content is what its diff_id, as a worker or
/// coordinator reported it, says: the sha256 the store computed when the
/// bytes arrived. Nothing may be recorded under a diff_id a node was only
/// told.
pub fn check_diff_id(cas: &ContentStore, layer: &LayerRef) -> Result<(), DiffIdError> {
    let info = cas
        .info(&layer.blob)?
        .ok_or(DiffIdError::NotStored(layer.blob))?;
    if info.sha256 != layer.diff_id {
        return Err(DiffIdError::Mismatch {
            blob: layer.blob,
            reported: layer.diff_id,
            content: info.sha256,
        });
    }
    Ok(())
}

/// Why a layer's content was not checked against its diff_id, or failed.
#[derive(Debug, thiserror::Error)]
pub enum DiffIdError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] strata_cas::Error),
    /// The layer is not in the store.
    #[error("layer {0} is not stored")]
    NotStored(Digest),
    /// Its content is another layer's.
    #[error(
        "layer {blob} was reported as diff_id {reported}, but its content is {content}: refused"
    )]
    Mismatch {
        /// The blob.
        blob: Digest,
        /// The diff_id it was reported as.
        reported: strata_cas::Sha256,
        /// The sha256 of its content.
        content: strata_cas::Sha256,
    },
}

/// Tells the coordinator on `coordinator` which holders a failed fetch
/// found lacking what they were named for, so that it checks them and
/// corrects its records. Best effort: the fetch has failed either way.
pub(crate) async fn report_lacking(e: &FetchError, coordinator: &Connection) {
    if e.lacking.is_empty() {
        return;
    }
    let report = Request::Any(AnyRequest::Lacking(
        e.lacking.iter().take(MAX_LACKING).cloned().collect(),
    ));
    if let Err(why) = request(coordinator, &report).await {
        tracing::warn!(error = %why, "cannot tell the coordinator of holders lacking blobs");
    }
}
