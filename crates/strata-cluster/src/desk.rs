//! The coordinator's side of what workers tell it: their registrations
//! and heartbeats (what they hold and dropped), which of their copies are
//! spare, the blobs a peer found a holder lacks, and cordons. The workers
//! and their blobs live in the [`Roster`]; what is recorded for the group
//! goes through [`Replicas`]; placement reads both.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_cas::Digest;
use strata_dockerfile::Platform;
use strata_net::{Connection, write_frame};
use strata_raft::Member;
use strata_sched::copies::{CopyKind, Retirement};

use crate::error::ReplicateError;
use crate::names::Names;
use crate::protocol::{
    CoordinatorRequest, Failed, Refusal, Registration, Reply, Request, WorkerRequest,
};
use crate::replicas::Replicas;
use crate::roster::{Link, Roster, epoch};
use crate::uploads::Uploads;

/// Platforms as a worker reported them; ones this node cannot read are
/// left out.
fn parse_platforms(names: &[String]) -> Vec<Platform> {
    names
        .iter()
        .filter_map(|p| Platform::parse(p).ok())
        .collect()
}

/// What a coordinator answers workers with.
pub(crate) struct WorkerDesk {
    /// The registered workers, and where the group records blobs.
    pub(crate) roster: Arc<Roster>,
    /// Copies of built layers, and the records of workers.
    pub(crate) replicas: Arc<Replicas>,
    /// Its member of the group.
    pub(crate) member: Arc<Member>,
    /// The images the cluster names: their layers are never spare.
    pub(crate) names: Arc<Names>,
    /// The build contexts clients upload, which workers fetch.
    pub(crate) uploads: Arc<Uploads>,
}

impl WorkerDesk {
    /// For each of `blobs`, what `worker` dropping its copy loses: nothing
    /// when enough other live workers hold it; else a cache entry, or a
    /// named image's layer, which stays.
    pub(crate) fn spare(&self, worker: &str, blobs: &[Digest]) -> Reply {
        if blobs.len() > crate::protocol::MAX_SPARE_ASKED {
            return Reply::over_limit(
                "blobs asked about",
                blobs.len(),
                crate::protocol::MAX_SPARE_ASKED,
            );
        }
        match self.copy_kinds(worker, blobs) {
            Ok(kinds) => Reply::Spare(kinds),
            Err(failed) => Reply::Failed(failed),
        }
    }

    /// What `worker` dropping its copy of each of `blobs` loses.
    fn copy_kinds(&self, worker: &str, blobs: &[Digest]) -> Result<Vec<CopyKind>, Failed> {
        let named = self.names.named_layers().map_err(|e| Failed::of(&e))?;
        Ok(blobs
            .iter()
            .map(|b| {
                // A coordinator's copy does not count: its store
                // keeps what it holds only under its own budget.
                let others = self
                    .roster
                    .live_copies(b)
                    .into_iter()
                    .filter(|h| h.name != worker)
                    .count();
                strata_sched::copies::kind(others, self.replicas.replication, named.contains(b))
            })
            .collect())
    }

    /// Before `worker` drops its copies of `blobs`: takes out of the
    /// index every cache entry whose layer chain names one that would be
    /// left with no live copy, and says which copies may go (those no
    /// remaining entry needs and no named image holds). Only blobs the
    /// worker reported holding take entries out: no worker retires
    /// another's layers; one it never reported (a build context's file)
    /// just goes. The index is
    /// changed first, so a hit is never served for a layer that is gone;
    /// an entry put in the moment between (a step finishing on top of
    /// the blob) is found by the repair loop's census, as an orphan.
    pub(crate) async fn retire(&self, worker: &str, blobs: Vec<Digest>) -> Reply {
        if blobs.len() > crate::protocol::MAX_SPARE_ASKED {
            return Reply::over_limit(
                "blobs asked to retire",
                blobs.len(),
                crate::protocol::MAX_SPARE_ASKED,
            );
        }
        let kinds = match self.copy_kinds(worker, &blobs) {
            Ok(kinds) => kinds,
            Err(failed) => return Reply::Failed(failed),
        };
        // Only last copies need the index changed, and only those the
        // worker told this coordinator it holds: no worker takes entries
        // out of the index for another's layers.
        let reported: Vec<bool> = {
            let workers = self.roster.lock();
            let held = workers.live(worker).map(|w| &w.link.blobs);
            blobs
                .iter()
                .map(|b| held.is_some_and(|h| h.contains(b)))
                .collect()
        };
        // What it did not report (a build context's files, which no
        // cache entry names) it may drop, with the index left as it is.
        let kinds: Vec<CopyKind> = kinds
            .into_iter()
            .zip(reported)
            .map(|(k, held)| match k {
                CopyKind::Last if !held => CopyKind::Spare,
                k => k,
            })
            .collect();
        let last: Vec<Digest> = blobs
            .iter()
            .zip(&kinds)
            .filter(|(_, k)| **k == CopyKind::Last)
            .map(|(b, _)| *b)
            .collect();
        if last.is_empty() {
            return Reply::Retired(kinds.iter().map(|k| *k == CopyKind::Spare).collect());
        }
        let member = Arc::clone(&self.member);
        let asked = last.clone();
        let planned = tokio::task::spawn_blocking(move || {
            let entries = member
                .local()
                .entries()
                .map_err(|e| ReplicateError::Index(e.into()))?;
            let chains: Vec<(Digest, Vec<Digest>)> = entries
                .into_iter()
                .map(|(key, e)| (key, e.layers.iter().map(|l| l.blob).collect()))
                .collect();
            Ok::<_, ReplicateError>(Retirement::plan(
                &asked,
                chains.iter().map(|(k, c)| (*k, c.as_slice())),
            ))
        })
        .await;
        let plan = match planned {
            Ok(Ok(plan)) => plan,
            Ok(Err(e)) => return Reply::Failed(Failed::because("reading the cache index", &e)),
            Err(e) => return Reply::Failed(Failed::because("reading the cache index", &e)),
        };
        let mut removed = vec![false; plan.remove.len()];
        for (i, key) in plan.remove.iter().enumerate() {
            match self
                .member
                .write(strata_raft::CommandV1::Remove { key: *key })
                .await
            {
                Ok(_) => removed[i] = true,
                Err(e) => {
                    tracing::warn!(%key, %worker, error = %e, "cannot take a cache entry out of the index: the worker keeps the layer it needs");
                }
            }
        }
        let last_ok = plan.droppable(&|i| removed[i]);
        if !plan.remove.is_empty() {
            tracing::info!(
                %worker,
                entries = removed.iter().filter(|r| **r).count(),
                last_copies = last.len(),
                "took cache entries out of the index before a worker drops the last copies of their layers"
            );
        }
        let mut last_ok = last_ok.into_iter();
        Reply::Retired(
            kinds
                .iter()
                .map(|k| match k {
                    CopyKind::Spare => true,
                    CopyKind::Last => last_ok.next().unwrap_or(false),
                    CopyKind::Named => false,
                })
                .collect(),
        )
    }

    /// Checks what peers reported: each (blob, holder) where a holder said
    /// it lacks a blob it is recorded to hold. The holder is asked itself;
    /// if it does not hold the blob, it is no longer counted as holding it
    /// here at once, the group's records drop it, and repair copies the
    /// blob again if it is short.
    pub(crate) async fn check_lacking(&self, reported: Vec<(Digest, String)>) -> Reply {
        if reported.len() > crate::protocol::MAX_LACKING {
            return Reply::over_limit(
                "lacking blobs in one report",
                reported.len(),
                crate::protocol::MAX_LACKING,
            );
        }
        let mut by_worker: BTreeMap<String, Vec<Digest>> = BTreeMap::new();
        for (blob, holder) in reported {
            by_worker.entry(holder).or_default().push(blob);
        }
        let mut dropped = 0;
        for (worker, blobs) in by_worker {
            let Some((conn, registration)) = self
                .roster
                .lock()
                .live(&worker)
                .map(|w| (w.link.conn.clone(), w.link.incarnation))
            else {
                continue;
            };
            let mut lacks = Vec::new();
            for blob in blobs {
                let asked = tokio::time::timeout(
                    Duration::from_secs(5),
                    crate::protocol::request(
                        &conn,
                        &Request::Coordinator(CoordinatorRequest::HasBlob(blob)),
                    ),
                )
                .await;
                if let Ok(Ok(Reply::Bool(false))) = asked {
                    lacks.push(blob);
                }
            }
            if lacks.is_empty() {
                continue;
            }
            tracing::warn!(%worker, blobs = lacks.len(), "a worker lacks blobs it was recorded to hold; dropping the records");
            if let Some(w) = self
                .roster
                .lock()
                .get_mut(&worker)
                .filter(|w| w.link.incarnation == registration)
            {
                for b in &lacks {
                    w.link.blobs.remove(b);
                }
            }
            dropped += lacks.len();
            if let Err(e) = self
                .member
                .write(strata_raft::CommandV1::Lost {
                    worker: worker.clone(),
                    registration,
                    blobs: lacks.clone(),
                })
                .await
            {
                tracing::warn!(%worker, error = %e, "cannot record that a worker lacks blobs");
                continue;
            }
            // Answered once this member has applied it too: the stage the
            // reporter starts over is placed on these records.
            let applied = Instant::now();
            while lacks
                .iter()
                .any(|b| self.roster.recorded_holders(b).contains(&worker))
                && applied.elapsed() < Duration::from_secs(2)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if dropped > 0 {
            self.roster.changed.notify_one();
        }
        Reply::Ok
    }

    /// Answers what a worker asks on `send`.
    pub(crate) async fn answer(
        &self,
        conn: &Connection,
        req: WorkerRequest,
        send: &mut quinn::SendStream,
    ) -> Result<(), strata_net::Error> {
        let reply = match req {
            WorkerRequest::GetBlobs(blobs) => {
                if blobs.len() > strata_net::MAX_BATCH {
                    Reply::over_limit(
                        "blobs asked for in one batch",
                        blobs.len(),
                        strata_net::MAX_BATCH,
                    )
                } else {
                    let sent = self.uploads.send_arriving(send, &blobs, conn.addr).await?;
                    strata_metrics::transferred(strata_metrics::Transfer::PeerSent, sent);
                    return Ok(());
                }
            }
            WorkerRequest::Spare(blobs) => self.spare(&conn.peer.name, &blobs),
            WorkerRequest::Retire(blobs) => self.retire(&conn.peer.name, blobs).await,
            WorkerRequest::Register(r) => {
                self.register(conn, r);
                Reply::Ok
            }
            WorkerRequest::Heartbeat {
                running,
                blobs,
                dropped,
                stored,
            } => self.heartbeat(conn, running, blobs, dropped, stored),
        };
        write_frame(send, &reply, conn.addr).await
    }

    /// A worker's heartbeat: what it gained and dropped since the last.
    fn heartbeat(
        &self,
        conn: &Connection,
        running: usize,
        blobs: Vec<Digest>,
        dropped: Vec<Digest>,
        stored: u64,
    ) -> Reply {
        let gained = blobs.len();
        self.replicas.gained(&blobs);
        let evicted = dropped.clone();
        let current = {
            let mut workers = self.roster.lock();
            let name = &conn.peer.name;
            match workers.heartbeat(name, epoch(conn), Instant::now()) {
                Some(w) => {
                    w.set_stored(stored);
                    let w = &mut w.link;
                    w.blobs.extend(blobs.iter().copied());
                    for d in &dropped {
                        w.blobs.remove(d);
                    }
                    if self.member.is_leader()
                        && !dropped.is_empty()
                        && !self.replicas.records.push(strata_raft::CommandV1::Lost {
                            worker: conn.peer.name.clone(),
                            registration: w.incarnation,
                            blobs: dropped,
                        })
                    {
                        w.recorded = false;
                    }
                    // The worker tells every coordinator; the
                    // leader records it, queued under the lock so
                    // a registration of the same worker cannot
                    // come between.
                    if self.member.is_leader()
                        && !blobs.is_empty()
                        && !self.replicas.records.push(strata_raft::CommandV1::Held {
                            worker: conn.peer.name.clone(),
                            registration: w.incarnation,
                            blobs,
                        })
                    {
                        w.recorded = false;
                    }
                    true
                }
                _ => false,
            }
        };
        if current {
            self.replicas.note_evicted(&conn.peer.name, evicted);
            tracing::trace!(worker = %conn.peer.name, running, gained, "heartbeat");
            Reply::Ok
        } else {
            Reply::Refused(crate::protocol::Refusal::NotRegistered)
        }
    }

    fn register(&self, conn: &Connection, r: Registration) {
        let name = conn.peer.name.clone();
        // A worker listening on a wildcard address is reached at the
        // address its connection comes from.
        let addr = if r.addr.ip().is_unspecified() {
            SocketAddr::new(conn.addr.ip(), r.addr.port())
        } else {
            r.addr
        };
        tracing::info!(worker = %name, %addr, slots = r.slots, blobs = r.blobs.len(), "worker registered");
        let spec = strata_sched::Spec {
            slots: r.slots.max(1),
            platforms: parse_platforms(&r.platforms),
            native: parse_platforms(&r.native),
            entitlements: r.entitlements,
            keep_storage: r.keep_storage,
        };
        let link = Link {
            conn: conn.clone(),
            addr,
            blobs: r.blobs.into_iter().collect(),
            recorded: false,
            incarnation: r.incarnation,
        };
        {
            let mut workers = self.roster.lock();
            workers.register(&name, spec, epoch(conn), link, Instant::now());
            if let Some(w) = workers.current(&name, epoch(conn)) {
                w.set_stored(r.stored);
            }
        }
        // The worker registers with every coordinator; the leader records
        // it (a new leader records the workers it finds unrecorded).
        if self.member.is_leader() {
            self.replicas.record_registration(&name);
        }
        self.roster.slot_freed.notify_waiters();
        self.roster.changed.notify_one();
    }

    /// What the cluster grants a build: the entitlements some live worker
    /// grants (stages needing one are placed only on such workers).
    pub(crate) fn grants(&self) -> strata_plan::Grants {
        let granted = self.roster.lock().granted();
        strata_plan::Grants {
            granted,
            node: "any live worker of this cluster".into(),
            setting: "insecure_entitlements = [\"{}\"] in a worker's worker.toml".into(),
        }
    }

    pub(crate) fn cordon(&self, worker: &str, cordoned: bool) -> Reply {
        if !self.roster.lock().cordon(worker, cordoned) {
            return Reply::Refused(Refusal::NoSuchWorker(worker.to_string()));
        }
        tracing::info!(%worker, cordoned, "worker cordon changed");
        self.roster.slot_freed.notify_waiters();
        Reply::Ok
    }
}
