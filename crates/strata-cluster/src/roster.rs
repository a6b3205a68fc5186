//! The registered workers as this coordinator sees them (the scheduling
//! core's registry, with each worker's connection), and where the group
//! records blobs: what placement, replication and the request handlers
//! ask of the fleet. It knows nothing of builds or of copies.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use strata_cas::{ContentStore, Digest};
use strata_net::Connection;
use strata_raft::Member;
use tokio::sync::Notify;

use crate::error::RecordError;
use crate::protocol::Holder;

/// What the coordinator keeps with each registered worker, beside what
/// the scheduling core knows of it.
pub(crate) struct Link {
    pub conn: Connection,
    pub addr: SocketAddr,
    /// Every blob it told this coordinator it holds (registration and
    /// heartbeats since).
    pub blobs: HashSet<Digest>,
    /// Whether the group has this worker's registration and every blob it
    /// reported, as this coordinator (leading) wrote them.
    pub recorded: bool,
    /// The worker process's run, under which its locations are recorded.
    pub incarnation: u64,
}

/// The registered workers.
pub(crate) type Workers = strata_sched::Fleet<Link>;

/// A connection's id, the registration epoch of the worker on it.
pub(crate) fn epoch(conn: &Connection) -> u64 {
    u64::try_from(conn.quic.stable_id()).unwrap_or(u64::MAX)
}

/// The registered workers, and where the group records blobs.
pub(crate) struct Roster {
    workers: Mutex<Workers>,
    /// The group's records of where blobs are.
    member: Arc<Member>,
    /// The coordinator's own store: it holds blobs too (uploaded
    /// contexts, layers its image endpoint fetched).
    content: Arc<ContentStore>,
    /// The coordinator, as a holder of blobs.
    me: Holder,
    /// How long a worker may be silent.
    lease: Duration,
    /// Wakes stages waiting for a free slot: one was freed, or a worker
    /// came, went or was cordoned.
    pub(crate) slot_freed: Notify,
    /// Wakes the repair loop: a worker came or went, or holds less.
    pub(crate) changed: Notify,
}

impl Roster {
    pub(crate) fn new(
        member: Arc<Member>,
        content: Arc<ContentStore>,
        me: Holder,
        lease: Duration,
    ) -> Roster {
        Roster {
            workers: Mutex::default(),
            member,
            content,
            me,
            lease,
            slot_freed: Notify::new(),
            changed: Notify::new(),
        }
    }

    /// The registered workers, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Workers> {
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Workers silent for longer than the lease are gone: their blobs are
    /// no longer offered and their stages start over elsewhere.
    pub(crate) fn expire_leases(&self) {
        let expired: Vec<String> = {
            let mut workers = self.lock();
            let expired = workers.expire(Instant::now(), self.lease);
            for name in &expired {
                if let Some(w) = workers.get(name) {
                    w.link.conn.quic.close(1u32.into(), b"lease expired");
                }
            }
            expired
        };
        for name in expired {
            tracing::warn!(worker = %name, "lease expired; the worker is gone");
            self.worker_gone();
        }
    }

    /// Marks a worker gone (if `conn` is still its connection).
    pub(crate) fn lose(&self, name: &str, conn: &Connection) {
        let gone = self.lock().lose(name, epoch(conn));
        if gone {
            tracing::warn!(worker = %name, "the worker is gone");
            self.worker_gone();
        }
    }

    /// A worker is gone: stages waiting for slots look again, and the
    /// repair loop copies what it leaves short. Its records stay: another
    /// coordinator may still reach it, and it may come back (the leader
    /// takes it off after ten minutes without it).
    fn worker_gone(&self) {
        self.slot_freed.notify_waiters();
        self.changed.notify_one();
    }

    /// Records in the group that `worker`, which said so on `conn`,
    /// holds `blobs`. Fails if `conn` is no longer the worker's (it left
    /// or came back since): what it held then is not known now.
    pub(crate) async fn located(
        &self,
        worker: &str,
        conn: &Connection,
        blobs: Vec<Digest>,
    ) -> Result<(), RecordError> {
        if blobs.is_empty() {
            return Ok(());
        }
        // Known here at once, so recording the worker again (a new lead)
        // does not drop them before its next heartbeat tells.
        let registration = {
            let mut workers = self.lock();
            match workers.get_mut(worker) {
                Some(w) if w.epoch() == epoch(conn) => {
                    w.link.blobs.extend(blobs.iter().copied());
                    w.link.incarnation
                }
                _ => return Err(RecordError::Gone(worker.to_string())),
            }
        };
        self.member
            .write(strata_raft::CommandV1::Held {
                worker: worker.to_string(),
                registration,
                blobs,
            })
            .await
            .map(|_| ())
            .map_err(RecordError::Index)
    }

    /// The workers the group records as holding `blob`.
    pub(crate) fn recorded_holders(&self, blob: &Digest) -> Vec<String> {
        self.member.local().holders(blob).unwrap_or_else(|e| {
            tracing::warn!(%blob, error = %e, "cannot read where the blob is");
            Vec::new()
        })
    }

    /// The workers among `names`, recorded as holding `blob`, that are
    /// alive, where they serve blobs. A record of the worker's run now
    /// (its registration) is enough; one of an earlier run (the worker came
    /// back and the group has not recorded it yet) counts only if the
    /// worker told this coordinator it holds the blob: it may have lost its
    /// store.
    pub(crate) fn live_holders(&self, blob: &Digest, names: &[String]) -> Vec<Holder> {
        let workers = self.lock();
        names
            .iter()
            .filter_map(|n| {
                let w = workers.live(n)?;
                let current = self
                    .member
                    .local()
                    .worker(n)
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.registered == w.link.incarnation);
                (current || w.link.blobs.contains(blob)).then(|| Holder {
                    name: n.clone(),
                    addr: w.link.addr,
                })
            })
            .collect()
    }

    /// The live workers the group records as holding `blob`.
    pub(crate) fn live_copies(&self, blob: &Digest) -> Vec<Holder> {
        self.live_holders(blob, &self.recorded_holders(blob))
    }

    /// Live nodes holding `blob`, other than `except`; the coordinator
    /// itself when its store has it.
    pub(crate) fn holders(&self, blob: &Digest, except: Option<&str>) -> Vec<Holder> {
        let mut names = self.recorded_holders(blob);
        names.retain(|n| Some(n.as_str()) != except);
        let mut out = self.live_holders(blob, &names);
        if self.content.contains(blob).unwrap_or(false) {
            out.push(self.me.clone());
        }
        out
    }

    /// Whether `worker` holds `blob`, as [`Roster::live_holders`]
    /// counts holders.
    pub(crate) fn holds(&self, worker: &str, blob: &Digest) -> bool {
        let names = self.recorded_holders(blob);
        names.iter().any(|w| w == worker)
            && !self.live_holders(blob, &[worker.to_string()]).is_empty()
    }
}
