//! Build contexts clients upload to a coordinator: which trees it holds
//! whole, which it keeps for the builds about to use them, the bounds of
//! its store, and what each client may upload in an hour.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use strata_cas::{Digest, Lease};
use strata_net::{Connection, read_blob_header, recv_announced, write_frame};
use strata_worker::Node;

use crate::access::UploadQuota;
use crate::context::{Closure, ContextError, Pins};
use crate::protocol::{Failed, Refusal, Reply};

/// Closures of build contexts a coordinator remembers at most (a few
/// MiB each at 30,000 files).
const MAX_TREES: usize = 16;

/// Why a build's context cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// Blobs of its tree are not here.
    #[error("build context {root} was not uploaded whole ({absent} of its blobs are missing)")]
    NotWhole {
        /// Its root.
        root: Digest,
        /// Blobs missing.
        absent: usize,
    },
    /// Its tree could not be read.
    #[error("build context")]
    Tree(#[source] ContextError),
    /// Reading it stopped.
    #[error("reading the build context stopped")]
    Stopped(#[source] tokio::task::JoinError),
}

/// A coordinator's uploaded build contexts.
pub(crate) struct Uploads {
    node: Arc<Node>,
    /// Closures of build contexts found whole, by root, each with the
    /// store's count of removals when it was: a context built again is
    /// not walked again, nor looked up again while nothing was removed.
    trees: Mutex<HashMap<Digest, (Arc<Closure>, u64)>>,
    /// Contexts a build is about to use.
    pins: Mutex<Pins>,
    /// What each client uploaded in the last hour.
    quota: Mutex<UploadQuota>,
    /// Bounds of the store.
    keep: strata_sched::Keep,
}

impl Uploads {
    pub(crate) fn new(node: Arc<Node>, keep: strata_sched::Keep, bytes_per_hour: u64) -> Uploads {
        Uploads {
            node,
            trees: Mutex::default(),
            pins: Mutex::default(),
            quota: Mutex::new(UploadQuota::new(bytes_per_hour)),
            keep,
        }
    }

    /// Keeps the store within its bounds, every [`strata_worker::EVICT_EVERY`]:
    /// the least recently used uploaded contexts go, never one a build
    /// holds or a client is about to build from. Base images it pulled
    /// for planning are named images and stay.
    pub(crate) async fn evict_forever(self: Arc<Self>) {
        let mut pace = strata_sched::evict::Pace::default();
        loop {
            tokio::time::sleep(strata_worker::EVICT_EVERY).await;
            // Read before the store is listed: a blob added meanwhile
            // makes the next round look again.
            let (changes, now) = (self.node.content.changes(), strata_cas::now_unix());
            if !pace.due(changes, now, &self.keep) {
                continue;
            }
            let me = Arc::clone(&self);
            let pinned = self
                .pins
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pinned(Instant::now());
            let evicted = tokio::task::spawn_blocking(move || {
                // A pinned context keeps every blob its tree names.
                let mut keep = HashSet::new();
                for root in &pinned {
                    keep.insert(*root);
                    match crate::context::closure(&me.node.content, root) {
                        Ok(c) => keep.extend(c.all().copied()),
                        Err(e) => tracing::warn!(context = %root, error = %e, "cannot read a pinned context's tree"),
                    }
                }
                let (total, mut candidates) = strata_worker::candidates(&me.node, now)?;
                candidates.retain(|c| !keep.contains(&c.blob));
                let victims = strata_sched::evict::choose(total, &candidates, &me.keep, now, &|_| false);
                strata_worker::evict(&me.node, &victims)
                    .map(|report| strata_worker::EvictReport { stored: total, ..report })
            })
            .await;
            if let Ok(Ok(r)) = &evicted {
                pace.checked(changes, now, r.stored, &self.keep);
            }
            match evicted {
                Ok(Ok(report)) if report.blobs > 0 => tracing::info!(
                    blobs = report.blobs,
                    bytes = report.bytes,
                    "evicted contexts to stay within keep_storage / keep_duration"
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot evict from the coordinator's store")
                }
                Err(e) => tracing::warn!(error = %e, "eviction stopped"),
            }
        }
    }

    /// Which of `blobs` of context tree `context` are not here: none,
    /// without looking, when a build found the tree whole and no blob has
    /// gone since.
    pub(crate) async fn missing(&self, context: Digest, blobs: Vec<Digest>) -> Reply {
        if self.known_whole(&context) {
            return Reply::Missing(Vec::new());
        }
        let node = Arc::clone(&self.node);
        match tokio::task::spawn_blocking(move || node.content.absent(&blobs)).await {
            Ok(Ok(lacks)) => Reply::Missing(lacks),
            Ok(Err(e)) => Reply::failed("cannot look blobs up", &e),
            Err(e) => Reply::failed("looking blobs up stopped", &e),
        }
    }

    /// Whether every blob of context tree `root` is here: a build of it
    /// found it whole, and no blob was removed since.
    fn known_whole(&self, root: &Digest) -> bool {
        self.trees
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(root)
            .is_some_and(|(_, at)| *at == self.node.content.removals())
    }

    /// A client uploaded `context` or asked about it: it stays for the
    /// build the client submits next.
    pub(crate) fn pin(&self, context: Digest) {
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pin(context, Instant::now());
    }

    /// Holds every blob of context tree `root` for a build (workers fetch
    /// them from here), or says which are missing; marks it used.
    pub(crate) async fn hold_whole(&self, root: Digest) -> Result<Lease, TreeError> {
        let mut context_lease = self.node.content.lease();
        context_lease.hold(root);
        let node = Arc::clone(&self.node);
        let known = self
            .trees
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&root)
            .cloned();
        let tree = tokio::task::spawn_blocking(move || {
            let (c, whole_at) = match known {
                Some((c, at)) => (c, Some(at)),
                None => (
                    Arc::new(crate::context::closure(&node.content, &root)?),
                    None,
                ),
            };
            // Held before they are counted: no blob of the tree can go
            // from here on, and one gone since it was found whole moved
            // the count.
            for d in c.all() {
                context_lease.hold(*d);
            }
            let removals = node.content.removals();
            if whole_at == Some(removals) {
                return Ok((c, 0, removals, context_lease));
            }
            let all: Vec<Digest> = c.all().copied().collect();
            let absent = node.content.absent(&all)?.len();
            Ok::<_, ContextError>((c, absent, removals, context_lease))
        })
        .await
        .map_err(TreeError::Stopped)?
        .map_err(TreeError::Tree)?;
        let lease = match tree {
            (c, 0, removals, lease) => {
                // A tree's closure is fixed by its root's digest: the next
                // build of it checks only that no blob went meanwhile.
                let mut trees = self.trees.lock().unwrap_or_else(PoisonError::into_inner);
                if trees.len() >= MAX_TREES {
                    trees.clear();
                }
                trees.insert(root, (c, removals));
                lease
            }
            (_, absent, _, _) => return Err(TreeError::NotWhole { root, absent }),
        };
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .used(&root);
        if let Err(e) = self.node.content.touch(&root) {
            tracing::debug!(context = %root, error = %e, "cannot mark the context used");
        }
        Ok(lease)
    }

    /// Receives a client's upload of blob `d`, within its hourly quota.
    /// Receives a batch of small blobs a client uploads, each counted
    /// against its quota as it is announced.
    pub(crate) async fn receive_batch(
        &self,
        conn: &Connection,
        blobs: Vec<Digest>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), strata_net::Error> {
        let client = conn.peer.name.clone();
        if blobs.len() > strata_net::MAX_BATCH {
            let _ = recv.stop(crate::access::OVER_QUOTA.into());
            let reply = Reply::over_limit("blobs in one batch", blobs.len(), strata_net::MAX_BATCH);
            return write_frame(send, &reply, conn.addr).await;
        }
        let wanted: HashSet<Digest> = blobs.into_iter().collect();
        let mut reserved: Vec<u64> = Vec::new();
        let quota = &self.quota;
        let mut over_quota = None;
        let mut admit = |size: u64| {
            let r = quota
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .reserve(&client, size, Instant::now());
            match r {
                Ok(()) => {
                    reserved.push(size);
                    Ok(())
                }
                Err(over) => {
                    let said = over.to_string();
                    over_quota = Some(over);
                    Err(said)
                }
            }
        };
        let got = strata_net::recv_batch(
            recv,
            &self.node.content,
            &wanted,
            conn.addr,
            None,
            &mut admit,
        )
        .await;
        let reply = match got {
            Ok(got) => {
                strata_metrics::transferred(strata_metrics::Transfer::Uploaded, got.bytes);
                Reply::Ok
            }
            Err(e) => {
                strata_metrics::request_error(e.kind());
                let mut quota = self.quota.lock().unwrap_or_else(PoisonError::into_inner);
                for size in reserved {
                    quota.refund(&client, size);
                }
                drop(quota);
                tracing::warn!(client = %conn.peer.name, error = %e, "a batch upload failed");
                if matches!(e, strata_net::Error::Refused { .. }) {
                    let _ = recv.stop(crate::access::OVER_QUOTA.into());
                }
                match over_quota {
                    Some(over) => Reply::Refused(Refusal::OverQuota(over)),
                    None => Refusal::of_transfer(&e)
                        .map_or_else(|| Reply::Failed(Failed::of(&e)), Reply::Refused),
                }
            }
        };
        write_frame(send, &reply, conn.addr).await
    }

    pub(crate) async fn receive_upload(
        &self,
        conn: &Connection,
        d: Digest,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), strata_net::Error> {
        let client = &conn.peer.name;
        let reply = match read_blob_header(recv, &d, conn.addr).await? {
            None => Reply::Failed(Failed::new(format!("blob {d} did not come"))),
            Some(announced) => {
                let reserved = self
                    .quota
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .reserve(client, announced.size, Instant::now());
                match reserved {
                    Err(over) => {
                        tracing::warn!(%client, blob = %d, error = %over, "upload refused");
                        // Reading no further stops the sender.
                        let _ = recv.stop(crate::access::OVER_QUOTA.into());
                        Reply::Refused(Refusal::OverQuota(over))
                    }
                    Ok(()) => {
                        let got = recv_announced(
                            recv,
                            &self.node.content,
                            &d,
                            conn.addr,
                            announced,
                            None,
                        )
                        .await;
                        match &got {
                            Ok(n) => {
                                strata_metrics::transferred(strata_metrics::Transfer::Uploaded, *n)
                            }
                            Err(e) => strata_metrics::request_error(e.kind()),
                        }
                        if got.is_err() {
                            self.quota
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .refund(client, announced.size);
                        }
                        // A blob that is not what it was named is a lie
                        // (or a file that changed while it was sent): the
                        // connection goes with it.
                        got?;
                        Reply::Ok
                    }
                }
            }
        };
        write_frame(send, &reply, conn.addr).await
    }
}
