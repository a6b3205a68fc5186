//! Copies of built layers: a step's result enters the cache index once
//! `replication` workers hold its layer (or as many as could take a copy,
//! never none), and the leader of the group copies again, at a bounded
//! rate, the layers a lost worker left short.
//! Where blobs are is replicated state (`strata_raft`); whether a worker
//! is alive is each coordinator's own view of its connections.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use strata_cas::Digest;
use strata_net::Connection;
use strata_oci::LayerRef;
use strata_raft::{CommandV1, Member};
use tokio::sync::mpsc;

use crate::error::ReplicateError;
use crate::protocol::{CoordinatorRequest, CopyBlob, CopyError, Holder, Reply, Request};
use crate::roster::Roster;

/// How often the leader looks over its records of workers.
const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// How often the leader looks for layers short of copies when no worker
/// came or went: reading every cache entry costs about 140 ms per 50,000
/// entries, so it runs when a worker changes and only seldom otherwise
/// (to finish copies that failed).
const SCAN_EVERY: Duration = Duration::from_secs(30);

/// Repair copies a node sends or takes at once: each is paced at
/// `repair_mib_per_second`, so repair takes at most this many times that
/// rate of any node's network, and the whole fleet repairs in parallel.
const REPAIR_COPIES_PER_NODE: usize = 1;

/// How long a worker may be gone before the leader takes it off the
/// records. Its layers are copied as soon as its lease lapses; its
/// records only tell, when it comes back, what it held: until then they
/// are harmless, and dropping them sooner buys nothing.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Blobs per command when a worker's whole store is recorded: an entry
/// stays near 160 KiB however much a worker holds, and a Raft append of
/// up to 64 entries within a frame's limit.
const BLOBS_PER_RECORD: usize = 5_000;

/// Records queued at most: past that, the workers they are about are
/// recorded again, whole, once the queue drains.
const RECORDS_QUEUED: usize = 4096;

/// Commands about workers waiting to be written to the group, in order: a
/// worker's `Forget` and its `Registered` when it comes back must not
/// swap, nor its `Registered` and the `Located` of a heartbeat after it.
pub(crate) struct Records {
    tx: mpsc::Sender<CommandV1>,
    rx: Mutex<Option<mpsc::Receiver<CommandV1>>>,
}

impl Default for Records {
    fn default() -> Records {
        let (tx, rx) = mpsc::channel(RECORDS_QUEUED);
        Records {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Records {
    /// Queues `command` behind those pushed before it; false if the queue
    /// is full (the group cannot keep up, or has no majority).
    pub(crate) fn push(&self, command: CommandV1) -> bool {
        self.tx.try_send(command).is_ok()
    }
}

/// Why a copy was not made.
#[derive(Debug)]
enum CopyFailed {
    /// This copy failed; another target may take one.
    This(String),
    /// The bytes are not the layer: nothing may be cached under it.
    NotTheLayer(String),
}

impl std::fmt::Display for CopyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyFailed::This(why) | CopyFailed::NotTheLayer(why) => f.write_str(why),
        }
    }
}

/// The cache index as repair sees it.
pub(crate) struct Census {
    /// Cache entries.
    pub entries: usize,
    /// Layers of cached results with fewer live copies than wanted.
    pub short: Vec<Short>,
    /// Cache entries no worker holds the layer of any more
    /// ([`strata_sched::copies::Census::orphans`]).
    pub orphans: Vec<Digest>,
}

/// A layer of a cached result and the live workers holding it.
pub(crate) struct Short {
    pub layer: LayerRef,
    pub live: usize,
}

/// Copies of built layers, and the records of workers the leader keeps
/// in the group.
pub(crate) struct Replicas {
    roster: Arc<Roster>,
    member: Arc<Member>,
    /// Workers each built layer is kept on.
    pub(crate) replication: usize,
    /// Bytes per second for background copies.
    repair_rate: u64,
    /// Layers workers evicted below their wanted copies: repair leaves
    /// them be.
    shrunk: Mutex<strata_sched::copies::Shrunk>,
    /// Blobs being copied now: a build publishing a layer and the repair
    /// loop do not copy the same blob at once.
    copying: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// What the leader records about workers, written to the group in the
    /// order it was decided, off the request handlers.
    pub(crate) records: Records,
}

impl Replicas {
    pub(crate) fn new(
        roster: Arc<Roster>,
        member: Arc<Member>,
        replication: usize,
        repair_rate: u64,
    ) -> Replicas {
        Replicas {
            roster,
            member,
            replication,
            repair_rate,
            shrunk: Mutex::default(),
            copying: Mutex::default(),
            records: Records::default(),
        }
    }

    /// `worker` gained `blobs`: those evicted short may be repaired again.
    pub(crate) fn gained(&self, blobs: &[Digest]) {
        let mut shrunk = self.shrunk.lock().unwrap_or_else(PoisonError::into_inner);
        for b in blobs {
            shrunk.gained(b);
        }
    }

    /// `worker` evicted `blobs`: those it left short of copies stay short
    /// (repair does not copy them back), until a worker gains one again.
    pub(crate) fn note_evicted(&self, worker: &str, blobs: Vec<Digest>) {
        if blobs.is_empty() {
            return;
        }
        let want = self.copies_wanted();
        // Counted before the lock is taken: counting takes the workers'.
        let left: Vec<(Digest, usize)> = blobs
            .into_iter()
            .map(|b| {
                let others = self
                    .roster
                    .live_copies(&b)
                    .iter()
                    .filter(|h| h.name != worker)
                    .count();
                (b, others)
            })
            .collect();
        self.shrunk
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .evicted(left, want);
    }

    /// Whether a live worker has told this coordinator it holds `blob`.
    fn reported_live(&self, blob: &Digest) -> bool {
        self.roster
            .lock()
            .iter()
            .any(|(_, w)| w.alive() && w.link.blobs.contains(blob))
    }

    /// Copies of a layer to aim for now: `replication`, or every live
    /// worker when fewer are up.
    pub(crate) fn copies_wanted(&self) -> usize {
        let live = self.roster.lock().live_count();
        strata_sched::copies::wanted(self.replication, live)
    }

    /// The cache entries, and the layers cached results made that have
    /// fewer live copies than wanted, as this coordinator sees the
    /// workers. It reads every entry: call it off the runtime's threads.
    pub(crate) fn census(&self) -> Result<Census, ReplicateError> {
        let entries = self
            .member
            .local()
            .entries()
            .map_err(|e| ReplicateError::Index(e.into()))?;
        let made: HashMap<Digest, LayerRef> = entries
            .iter()
            .filter(|(_, e)| e.made_layer)
            .filter_map(|(_, e)| e.layers.last().map(|l| (l.blob, *l)))
            .collect();
        let cached: Vec<strata_sched::copies::Cached> = entries
            .iter()
            .map(|(key, e)| strata_sched::copies::Cached {
                key: *key,
                created: e.created,
                made: e.layers.last().filter(|_| e.made_layer).map(|l| l.blob),
            })
            .collect();
        let want = self.copies_wanted();
        let held =
            |b: &Digest| !self.roster.recorded_holders(b).is_empty() || self.reported_live(b);
        let live = |b: &Digest| self.roster.live_copies(b).len();
        let census = {
            let shrunk = self.shrunk.lock().unwrap_or_else(PoisonError::into_inner);
            let now = strata_cas::now_unix();
            strata_sched::copies::census(&cached, now, want, &shrunk, &held, &live)
        };
        Ok(Census {
            entries: entries.len(),
            short: census
                .short
                .into_iter()
                .filter_map(|(blob, live)| {
                    Some(Short {
                        layer: *made.get(&blob)?,
                        live,
                    })
                })
                .collect(),
            orphans: census.orphans,
        })
    }

    /// Makes sure `layer` has the wanted number of live copies on workers,
    /// asking the least loaded workers that lack it (and are not
    /// cordoned) to fetch it from its holders, no faster than
    /// `bytes_per_second` if given. Returns the copies made. Fails if no
    /// live node holds it, or if a copy finds its content is not the
    /// layer (another diff_id): nothing may be cached under it. Copies
    /// that fail otherwise leave it short, for the repair loop to finish.
    pub(crate) async fn replicate(
        &self,
        layer: LayerRef,
        bytes_per_second: Option<u64>,
    ) -> Result<usize, ReplicateError> {
        self.replicate_to(layer, &[], bytes_per_second).await
    }

    /// [`Replicas::replicate`], asking the workers in `first` before any
    /// other: those that took the layer as it was written
    /// ([`Replicas::takers`]), whose copy is then only checked.
    pub(crate) async fn replicate_to(
        &self,
        layer: LayerRef,
        first: &[String],
        bytes_per_second: Option<u64>,
    ) -> Result<usize, ReplicateError> {
        self.exclusive(
            layer.blob,
            self.copy_until_enough(layer, first, bytes_per_second),
        )
        .await
    }

    /// The workers a layer that `maker` is about to write should stream
    /// to as it writes it: where its copies would go, best first, as many
    /// as the copies wanted besides the maker's.
    pub(crate) fn takers(&self, maker: &str) -> Vec<Holder> {
        let n = self.copies_wanted().saturating_sub(1);
        let workers = self.roster.lock();
        strata_sched::copies::targets(&workers, &|name| name != maker, n)
            .into_iter()
            .filter_map(|name| {
                workers.get(name).map(|w| Holder {
                    name: name.to_string(),
                    addr: w.link.addr,
                })
            })
            .collect()
    }

    /// Runs `copy` while no other copy of `blob` runs: a build publishing a
    /// layer and repair do not copy the same blob at once.
    async fn exclusive<T>(&self, blob: Digest, copy: impl std::future::Future<Output = T>) -> T {
        let lock = Arc::clone(
            self.copying
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(blob)
                .or_default(),
        );
        let done = {
            let _copying = lock.lock().await;
            copy.await
        };
        // The last one out removes the lock; one still waiting on it keeps
        // it, so no third caller copies alongside. Clones are only taken
        // under the map's lock, so the count is exact there.
        let mut copying = self.copying.lock().unwrap_or_else(PoisonError::into_inner);
        drop(lock);
        if copying
            .get(&blob)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            copying.remove(&blob);
        }
        done
    }

    /// Asks worker `name` (on `conn`) to copy `layer` from `sources` and
    /// records the copy in the group.
    async fn copy_to(
        &self,
        layer: LayerRef,
        name: &str,
        conn: &Connection,
        sources: Vec<crate::protocol::Holder>,
        bytes_per_second: Option<u64>,
    ) -> Result<(), CopyFailed> {
        let blob = layer.blob;
        let copy = Request::Coordinator(CoordinatorRequest::Copy(Box::new(CopyBlob {
            layer,
            holders: sources,
            bytes_per_second,
        })));
        match crate::protocol::request(conn, &copy).await {
            Ok(Reply::Copied(Err(CopyError::NotTheLayer(e)))) => Err(CopyFailed::NotTheLayer(
                format!("{name} refused a copy: {e}"),
            )),
            Ok(Reply::Copied(Err(CopyError::Failed(e)))) => {
                Err(CopyFailed::This(format!("{name}: {e}")))
            }
            Ok(Reply::Copied(Ok(()))) => match self.roster.located(name, conn, vec![blob]).await {
                Ok(()) => {
                    tracing::debug!(%blob, worker = %name, "copied");
                    Ok(())
                }
                // The copy is there, unrecorded: the worker's next
                // heartbeat reports it to the leader.
                Err(e) => Err(CopyFailed::This(format!(
                    "{name} took a copy the group did not record: {e}"
                ))),
            },
            Ok(Reply::Failed(e)) => Err(CopyFailed::This(format!(
                "{name}: {}",
                strata_registry::error_chain(&e)
            ))),
            Ok(Reply::Refused(e)) => Err(CopyFailed::This(format!("{name}: {e}"))),
            Ok(other) => Err(CopyFailed::This(format!("{name} answered {other:?}"))),
            Err(e) => Err(CopyFailed::This(format!("{name}: {e}"))),
        }
    }

    /// One copy of `layer` to `name`: whether it was made. A copy whose
    /// content is not the layer fails the whole; any other failure is
    /// noted in `why`, and the next worker is tried.
    async fn try_copy(
        &self,
        layer: LayerRef,
        name: &str,
        conn: &Connection,
        sources: &[Holder],
        bytes_per_second: Option<u64>,
        why: &mut Vec<String>,
    ) -> Result<bool, ReplicateError> {
        match self
            .copy_to(layer, name, conn, sources.to_vec(), bytes_per_second)
            .await
        {
            Ok(()) => Ok(true),
            Err(CopyFailed::This(e)) => {
                why.push(e);
                Ok(false)
            }
            Err(CopyFailed::NotTheLayer(e)) => Err(ReplicateError::NotTheLayer(e)),
        }
    }

    async fn copy_until_enough(
        &self,
        layer: LayerRef,
        first: &[String],
        bytes_per_second: Option<u64>,
    ) -> Result<usize, ReplicateError> {
        let blob = layer.blob;
        // Those sent the layer as it was written are asked for their copy
        // whatever the records say (a heartbeat may have listed the blob
        // already): their check of its diff_id is the second look at what
        // its maker reported, before anything is cached under it.
        let mut made = 0;
        let mut why = Vec::new();
        if !first.is_empty() {
            let sources = self.roster.holders(&blob, None);
            let takers: Vec<(String, Connection)> = {
                let workers = self.roster.lock();
                first
                    .iter()
                    .filter_map(|n| workers.live(n).map(|w| (n.clone(), w.link.conn.clone())))
                    .collect()
            };
            for (name, conn) in takers {
                if self
                    .try_copy(layer, &name, &conn, &sources, bytes_per_second, &mut why)
                    .await?
                {
                    made += 1;
                }
            }
        }
        let want = self.copies_wanted();
        let recorded = self.roster.recorded_holders(&blob);
        let mut have = self.roster.live_holders(&blob, &recorded).len();
        if have >= want {
            return if have > 0 {
                Ok(made)
            } else {
                Err(ReplicateError::Unheld(blob))
            };
        }
        let sources = self.roster.holders(&blob, None);
        if sources.is_empty() {
            return Err(ReplicateError::Unheld(blob));
        }
        let targets: Vec<(String, Connection)> = {
            let workers = self.roster.lock();
            let lacks = |n: &str| {
                workers
                    .get(n)
                    .is_some_and(|w| !w.link.blobs.contains(&blob))
                    && !recorded.iter().any(|r| r == n)
            };
            // All of them, best first: a copy that fails falls to the next.
            strata_sched::copies::targets(&workers, &lacks, usize::MAX)
                .into_iter()
                .filter_map(|n| workers.get(n).map(|w| (n.to_string(), w.link.conn.clone())))
                .collect()
        };
        for (name, conn) in targets {
            if have >= want {
                break;
            }
            if self
                .try_copy(layer, &name, &conn, &sources, bytes_per_second, &mut why)
                .await?
            {
                have += 1;
                made += 1;
            }
        }
        if have < want && !why.is_empty() {
            tracing::warn!(%blob, have, want, why = %why.join("; "), "the blob is short of copies");
        }
        // Copying took a while: a result enters the cache only if a live
        // worker holds its layer now, not when one did at the start.
        if self.roster.live_copies(&blob).is_empty() {
            return Err(ReplicateError::Lost { blob, tried: why });
        }
        Ok(made)
    }

    /// Writes the queued [`Records`] to the group, one after another, until
    /// the coordinator stops. What is still queued when this member stops
    /// leading is dropped: the new leader records every live worker as it
    /// sees them. A worker whose record did not make it is recorded
    /// again, whole, in the next repair round.
    pub(crate) async fn write_records(self: Arc<Self>) {
        let Some(mut rx) = self
            .records
            .rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        while let Some(command) = rx.recv().await {
            if !self.member.is_leader() {
                continue;
            }
            let (worker, registered) = match &command {
                CommandV1::Registered { worker, .. } => (worker.clone(), true),
                CommandV1::Located { worker, .. }
                | CommandV1::Held { worker, .. }
                | CommandV1::Lost { worker, .. }
                | CommandV1::Forget { worker, .. } => (worker.clone(), false),
                _ => continue,
            };
            match self.member.write(command).await {
                // What it holds is known now: a worker back with less than
                // it had leaves layers short.
                Ok(_) if registered => self.roster.changed.notify_one(),
                Ok(_) => {}
                // A worker gone meanwhile is recorded afresh if it comes
                // back; a live one in the next round.
                Err(e) => {
                    tracing::warn!(%worker, error = %e, "cannot record a change of a worker in the group");
                    self.mark_unrecorded(&worker);
                }
            }
        }
    }

    /// The group may lack what worker `name` holds: the next repair
    /// round records it again.
    fn mark_unrecorded(&self, name: &str) {
        if let Some(w) = self.roster.lock().get_mut(name) {
            w.link.recorded = false;
        }
    }

    /// Queues the record that worker `name` is registered, with every blob
    /// it told this coordinator of: under the workers' lock, so a
    /// heartbeat's blobs are either in it or queued after it.
    pub(crate) fn record_registration(&self, name: &str) {
        let mut workers = self.roster.lock();
        let Some(w) = workers
            .get_mut(name)
            .filter(|w| w.alive())
            .map(|w| &mut w.link)
        else {
            return;
        };
        let blobs: Vec<Digest> = w.blobs.iter().copied().collect();
        let mut chunks = blobs.chunks(BLOBS_PER_RECORD);
        // A run of the worker the group has recorded already (a new
        // leader recording it again) only gains: replacing its list with
        // what this coordinator heard would drop what another coordinator
        // recorded a moment ago, before the worker's heartbeat said so
        // here. A run whose record a location made first has no address
        // yet: its registration still goes, and adds to what it holds.
        let recorded = self
            .member
            .local()
            .worker(name)
            .ok()
            .flatten()
            .is_some_and(|r| r.registered == w.incarnation && r.addr == w.addr.to_string());
        let mut queued = if recorded {
            true
        } else {
            self.records.push(CommandV1::Registered {
                worker: name.to_string(),
                addr: w.addr.to_string(),
                at: w.incarnation,
                blobs: chunks.next().map(<[Digest]>::to_vec).unwrap_or_default(),
            })
        };
        for rest in chunks {
            queued = queued
                && self.records.push(CommandV1::Held {
                    worker: name.to_string(),
                    registration: w.incarnation,
                    blobs: rest.to_vec(),
                });
        }
        w.recorded = queued;
    }

    /// What the leader does each round about its records of workers: a
    /// member that just took the lead records every live worker again
    /// (what it missed while following), any live worker whose record
    /// failed is recorded again, and a worker gone for [`FORGET_AFTER`] is
    /// taken off.
    fn reconcile_workers(&self, took_lead: bool, gone: &mut strata_sched::Absences) {
        let known: HashMap<String, u64> = match self.member.local().workers() {
            Ok(w) => w.into_iter().map(|(n, r)| (n, r.registered)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the registered workers");
                return;
            }
        };
        let (to_record, alive): (Vec<String>, HashSet<String>) = {
            let workers = self.roster.lock();
            (
                workers
                    .iter()
                    .filter(|(_, w)| w.alive() && (took_lead || !w.link.recorded))
                    .map(|(n, _)| n.to_string())
                    .collect(),
                workers
                    .iter()
                    .filter(|(_, w)| w.alive())
                    .map(|(n, _)| n.to_string())
                    .collect(),
            )
        };
        for name in to_record {
            self.record_registration(&name);
        }
        let alive = |n: &str| alive.contains(n);
        let forget = gone.look(
            known.keys().map(String::as_str),
            &alive,
            Instant::now(),
            FORGET_AFTER,
        );
        for name in forget {
            tracing::info!(worker = %name, "gone for {FORGET_AFTER:?}: taken off the records");
            if let Some(&registered) = known.get(&name) {
                self.records.push(CommandV1::Forget {
                    worker: name,
                    registered,
                });
            }
        }
    }

    /// On the leader, every [`RECONCILE_EVERY`] until the coordinator
    /// stops: keeps the records of workers true
    /// ([`Replicas::reconcile_workers`]); a new lead also wakes the
    /// repair loop.
    pub(crate) async fn reconcile(self: Arc<Self>) {
        let mut led_in = None;
        let mut gone = strata_sched::Absences::default();
        loop {
            tokio::time::sleep(RECONCILE_EVERY).await;
            // A lead lost and won back between two rounds is a new term:
            // what went on in between was not recorded here.
            let term = self.member.leading_term();
            let took_lead = term.is_some() && term != led_in;
            led_in = term;
            if term.is_none() {
                gone.clear();
                continue;
            }
            self.reconcile_workers(took_lead, &mut gone);
            // Members that have taken part are recorded for good: one that
            // comes back with an empty state then knows it lost it.
            if let Err(e) = self.member.record_joined().await {
                tracing::warn!(error = %e, "cannot record that a member took part");
            }
            if took_lead {
                self.roster.changed.notify_one();
            }
        }
    }

    /// On the leader, until the coordinator stops: when a worker comes or
    /// goes or its record is written, on a new lead, and every
    /// [`SCAN_EVERY`] otherwise, copies the layers short of copies at the
    /// repair rate ([`Replicas::repair_layers`]).
    pub(crate) async fn repair(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(SCAN_EVERY) => {}
                () = self.roster.changed.notified() => {}
            }
            if !self.member.is_leader() {
                strata_metrics::replication_shortfall(0);
                continue;
            }
            let me = Arc::clone(&self);
            let census = match tokio::task::spawn_blocking(move || me.census()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot list the cached layers");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listing the cached layers stopped");
                    continue;
                }
            };
            strata_metrics::replication_shortfall(census.short.len());
            for key in census.orphans {
                match self.member.write(CommandV1::Remove { key }).await {
                    Ok(_) => {
                        tracing::info!(%key, "no worker holds the layer of a cache entry any more: entry removed")
                    }
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "cannot remove a cache entry whose layer is gone")
                    }
                }
            }
            let short = census.short.into_iter().filter(|s| s.live > 0);
            Arc::clone(&self)
                .repair_layers(short.map(|s| s.layer).collect())
                .await;
        }
    }

    /// Copies `layers` until each has its wanted copies, as the
    /// scheduling core's [`strata_sched::repair::Repair`] decides: this
    /// driver tells it where the layers are and which copies ended, and
    /// starts the copies it answers with, each at the repair rate. A copy
    /// starts as soon as its two nodes are free. Stops when nothing is
    /// left to start or running (a failed copy's layer waits for the next
    /// scan), or, once its copies end, when this member stops leading.
    async fn repair_layers(self: Arc<Self>, layers: Vec<LayerRef>) {
        use strata_sched::repair::{Layer, Repair};
        let refs: HashMap<Digest, LayerRef> = layers.iter().map(|l| (l.blob, *l)).collect();
        let mut core = Repair::new(REPAIR_COPIES_PER_NODE);
        core.found(
            layers
                .iter()
                .map(|l| Layer {
                    blob: l.blob,
                    size: l.size,
                })
                .collect(),
        );
        let mut copies = tokio::task::JoinSet::new();
        // Which copy each task carries out.
        let mut tasks: HashMap<tokio::task::Id, (Digest, String)> = HashMap::new();
        loop {
            if self.member.is_leader() {
                for (blob, to) in self.start_copies(&mut core, &refs, &mut copies, &mut tasks) {
                    core.ended(&blob, &to, false);
                }
            }
            let Some(done) = copies.join_next_with_id().await else {
                return;
            };
            let (id, copied) = match done {
                Ok((id, Ok(()))) => (id, true),
                Ok((id, Err(why))) => {
                    let (blob, to) = tasks.get(&id).cloned().unzip();
                    tracing::warn!(?blob, worker = ?to, error = %why, "cannot copy the layer");
                    (id, false)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a copy stopped");
                    (e.id(), false)
                }
            };
            if let Some((blob, to)) = tasks.remove(&id) {
                if copied {
                    tracing::info!(%blob, worker = %to, "copied a layer a lost worker left short");
                }
                core.ended(&blob, &to, copied);
            }
        }
    }

    /// Starts the copies `core` answers with now, on `copies`, noting in
    /// `tasks` which copy each task is; returns those that could not
    /// start (their target left meanwhile).
    fn start_copies(
        self: &Arc<Self>,
        core: &mut strata_sched::repair::Repair,
        refs: &HashMap<Digest, LayerRef>,
        copies: &mut tokio::task::JoinSet<Result<(), CopyFailed>>,
        tasks: &mut HashMap<tokio::task::Id, (Digest, String)>,
    ) -> Vec<(Digest, String)> {
        let want = self.copies_wanted();
        let looking: Vec<Digest> = {
            let workers = self.roster.lock();
            core.to_look_up(&workers).map(|l| l.blob).collect()
        };
        // Counted before the workers' lock is taken again: counting takes
        // it. A layer the fleet's change since lets the core look at too
        // waits for the next call.
        let holders: HashMap<Digest, Vec<String>> = looking
            .into_iter()
            .map(|blob| {
                let live = self.roster.live_copies(&blob);
                (blob, live.into_iter().map(|h| h.name).collect())
            })
            .collect();
        let planned: Vec<(strata_sched::repair::Copy, Option<Connection>)> = {
            let workers = self.roster.lock();
            let started = core.next(&workers, &|b| holders.get(b).cloned(), want);
            started
                .into_iter()
                .map(|c| {
                    let conn = workers.live(&c.to).map(|w| w.link.conn.clone());
                    (c, conn)
                })
                .collect()
        };
        let mut unstarted = Vec::new();
        for (c, conn) in planned {
            let (Some(layer), Some(conn)) = (refs.get(&c.layer.blob).copied(), conn) else {
                unstarted.push((c.layer.blob, c.to));
                continue;
            };
            // The planned holder first, the others after it.
            let mut sources = self.roster.holders(&layer.blob, Some(&c.to));
            sources.sort_by_key(|h| h.name != c.from);
            let me = Arc::clone(self);
            let to = c.to.clone();
            let task = copies.spawn(async move {
                let rate = Some(me.repair_rate);
                me.exclusive(layer.blob, me.copy_to(layer, &to, &conn, sources, rate))
                    .await
            });
            tasks.insert(task.id(), (layer.blob, c.to));
        }
        unstarted
    }
}
