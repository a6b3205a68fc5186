//! The Raft log and the replicated state machine, both in one RocksDB
//! database. Every write that Raft depends on (log entries, the vote, the
//! applied state) is synced before it is acknowledged.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use strata_cache::CacheEntry;
use strata_cas::{Digest, MetaDb};

use crate::{ClusterImage, Command, CommandV2, Node, NodeId, Response, TypeConfig, WorkerRecord};

/// Log entries by index (big-endian, so they sort).
const LOG: &str = "raft-log";
/// The vote, the committed and the last purged log ids.
const LOG_META: &str = "raft-log-meta";
/// Cache entries by key.
const ENTRIES: &str = "raft-entries";
/// Workers holding each blob.
const LOCATIONS: &str = "raft-locations";
/// Registered workers by name.
const WORKERS: &str = "raft-workers";
/// What the state machine has applied, its membership, its snapshot.
const APPLIED: &str = "raft-applied";
/// Image names the cluster holds, by normalized reference.
const TAGS: &str = "raft-tags";

const FAMILIES: &[&str] = &[LOG, LOG_META, ENTRIES, LOCATIONS, WORKERS, APPLIED, TAGS];

type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, AnyError> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(|e| AnyError::new(&e))
}

fn decode<T: for<'de> Deserialize<'de>>(raw: &[u8]) -> Result<T, AnyError> {
    bincode::serde::decode_from_slice(raw, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| AnyError::new(&e))
}

/// The record under `key` in the column family `cf`, decoded.
fn read<T: for<'de> Deserialize<'de>>(
    db: &MetaDb,
    cf: &str,
    key: impl AsRef<[u8]>,
) -> Result<Option<T>, AnyError> {
    match db.db().get_cf(db.cf(cf), key) {
        Ok(Some(raw)) => decode(&raw).map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(AnyError::new(&e)),
    }
}

fn synced() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

/// Opens the database of a Raft member in `dir`.
pub(crate) fn open(dir: &Path) -> Result<Arc<MetaDb>, rocksdb::Error> {
    MetaDb::open(dir, FAMILIES)
}

/// The Raft log of one member.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<MetaDb>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<MetaDb>) -> LogStore {
        LogStore { db }
    }

    fn meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, AnyError> {
        read(&self.db, LOG_META, key)
    }

    fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<(), AnyError> {
        self.db
            .db()
            .put_cf_opt(self.db.cf(LOG_META), key, encode(v)?, &synced())
            .map_err(|e| AnyError::new(&e))
    }

    /// Whether this member has voted or holds log entries.
    pub(crate) fn has_state(&self) -> Result<bool, AnyError> {
        Ok(self.meta::<Vote<NodeId>>("vote")?.is_some()
            || self.last_entry()?.is_some()
            || self.meta::<LogId<NodeId>>("purged")?.is_some())
    }

    /// Records that this state belongs to member `id`, or fails if it
    /// belongs to another.
    pub(crate) fn claim(&self, id: NodeId) -> Result<(), String> {
        match self.meta::<NodeId>("member").map_err(|e| e.to_string())? {
            Some(owner) if owner != id => Err(format!(
                "this state belongs to coordinator {owner}, not to coordinator {id}: give each coordinator its own home"
            )),
            Some(_) => Ok(()),
            None => self.put_meta("member", &id).map_err(|e| e.to_string()),
        }
    }

    fn last_entry(&self) -> Result<Option<Entry<TypeConfig>>, AnyError> {
        let mut it = self.db.db().iterator_cf(self.db.cf(LOG), IteratorMode::End);
        match it.next() {
            Some(Ok((_, raw))) => decode(&raw).map(Some),
            Some(Err(e)) => Err(AnyError::new(&e)),
            None => Ok(None),
        }
    }

    /// Deletes log entries from `from` (inclusive) to `to` (exclusive).
    fn delete_range(&self, from: u64, to: u64) -> Result<(), AnyError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.db.cf(LOG), from.to_be_bytes(), to.to_be_bytes());
        self.db
            .db()
            .write_opt(batch, &synced())
            .map_err(|e| AnyError::new(&e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let it = self.db.db().iterator_cf(
            self.db.cf(LOG),
            IteratorMode::From(&start.to_be_bytes(), Direction::Forward),
        );
        let mut out = Vec::new();
        for item in it {
            let (key, raw) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = u64::from_be_bytes(key.as_ref().try_into().map_err(|_| {
                StorageIOError::read_logs(AnyError::error("a log key is not 8 bytes"))
            })?);
            if !range.contains(&index) {
                break;
            }
            out.push(decode(&raw).map_err(StorageIOError::read_logs)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> =
            self.meta("purged").map_err(StorageIOError::read_logs)?;
        let last = self
            .last_entry()
            .map_err(StorageIOError::read_logs)?
            .map(|e| e.log_id)
            .or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_meta("vote", vote)
            .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.meta("vote")
            .map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        // Not synced: a committed id lost in a crash is learned again from
        // the leader; only log entries and the vote must survive one.
        let raw = encode(&committed).map_err(StorageIOError::write_logs)?;
        self.db
            .db()
            .put_cf(self.db.cf(LOG_META), "committed", raw)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self
            .meta::<Option<LogId<NodeId>>>("committed")
            .map_err(StorageIOError::read_logs)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        for e in entries {
            let raw = encode(&e).map_err(StorageIOError::write_logs)?;
            batch.put_cf(self.db.cf(LOG), e.log_id.index.to_be_bytes(), raw);
        }
        let written = self.db.db().write_opt(batch, &synced());
        let flushed = written
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(flushed);
        written.map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.delete_range(log_id.index, u64::MAX)
            .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Recorded first: a crash in between leaves entries the log no
        // longer claims, never a claim without entries.
        self.put_meta("purged", &log_id)
            .map_err(StorageIOError::write_logs)?;
        self.delete_range(0, log_id.index.saturating_add(1))
            .map_err(|e| StorageIOError::write_logs(e).into())
    }
}

/// Decodes the records `items` yields, their keys read by `key`.
fn collect<K, T: for<'de> Deserialize<'de>>(
    items: impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>>,
    key: impl Fn(&[u8]) -> Result<K, AnyError>,
) -> Result<Vec<(K, T)>, AnyError> {
    let mut out = Vec::new();
    for item in items {
        let (k, v) = item.map_err(|e| AnyError::new(&e))?;
        out.push((key(&k)?, decode(&v)?));
    }
    Ok(out)
}

fn digest_key(k: &[u8]) -> Result<Digest, AnyError> {
    Digest::from_hex(&String::from_utf8_lossy(k)).map_err(|e| AnyError::new(&e))
}

fn name_key(k: &[u8]) -> Result<String, AnyError> {
    Ok(String::from_utf8_lossy(k).into_owned())
}

/// What a snapshot holds: the whole replicated state, versioned like the
/// commands.
#[derive(Serialize, Deserialize)]
enum SnapshotBody {
    V1 {
        entries: Vec<(Digest, CacheEntry)>,
        locations: Vec<(Digest, Vec<String>)>,
        workers: Vec<(String, WorkerRecord)>,
    },
    /// Version 1 and the members that have taken part.
    V2 {
        entries: Vec<(Digest, CacheEntry)>,
        locations: Vec<(Digest, Vec<String>)>,
        workers: Vec<(String, WorkerRecord)>,
        joined: Vec<NodeId>,
    },
    /// Version 2 and the image names.
    V3 {
        entries: Vec<(Digest, CacheEntry)>,
        locations: Vec<(Digest, Vec<String>)>,
        workers: Vec<(String, WorkerRecord)>,
        joined: Vec<NodeId>,
        tags: Vec<(String, ClusterImage)>,
    },
}

/// A snapshot as stored: its meta and its bytes.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The replicated state of one member: the cache index and where blobs
/// are.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<MetaDb>,
    /// Held while the stored snapshot is replaced: one built while
    /// another is installed must not overwrite a newer one.
    storing_snapshot: Arc<std::sync::Mutex<()>>,
}

impl StateMachine {
    pub(crate) fn new(db: Arc<MetaDb>) -> StateMachine {
        StateMachine {
            db,
            storing_snapshot: Arc::default(),
        }
    }

    fn applied<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, AnyError> {
        read(&self.db, APPLIED, key)
    }

    /// The cache entry under `key`, as this member has applied it.
    pub fn entry(&self, key: &Digest) -> Result<Option<CacheEntry>, AnyError> {
        read(&self.db, ENTRIES, key.hex())
    }

    /// The workers holding `blob`, as this member has applied it.
    pub fn holders(&self, blob: &Digest) -> Result<Vec<String>, AnyError> {
        Ok(read(&self.db, LOCATIONS, blob.hex())?.unwrap_or_default())
    }

    /// Every cache entry.
    pub fn entries(&self) -> Result<Vec<(Digest, CacheEntry)>, AnyError> {
        self.scan(ENTRIES)
    }

    /// Every located blob and the workers holding it.
    pub fn locations(&self) -> Result<Vec<(Digest, Vec<String>)>, AnyError> {
        self.scan(LOCATIONS)
    }

    /// The registered worker named `name`.
    pub fn worker(&self, name: &str) -> Result<Option<WorkerRecord>, AnyError> {
        read(&self.db, WORKERS, name.as_bytes())
    }

    /// The members of the group that have taken part.
    pub fn joined(&self) -> Result<Vec<NodeId>, AnyError> {
        Ok(self.applied("joined")?.unwrap_or_default())
    }

    /// The image named `name` (a normalized reference), as this member
    /// has applied it.
    pub fn tag(&self, name: &str) -> Result<Option<ClusterImage>, AnyError> {
        read(&self.db, TAGS, name.as_bytes())
    }

    /// Every image name and its image.
    pub fn tags(&self) -> Result<Vec<(String, ClusterImage)>, AnyError> {
        self.scan_keyed(TAGS, name_key)
    }

    /// Every registered worker.
    pub fn workers(&self) -> Result<Vec<(String, WorkerRecord)>, AnyError> {
        self.scan_keyed(WORKERS, name_key)
    }

    /// Every record of `cf`, keyed by a digest's hex.
    fn scan<T: for<'de> Deserialize<'de>>(&self, cf: &str) -> Result<Vec<(Digest, T)>, AnyError> {
        self.scan_keyed(cf, digest_key)
    }

    /// Every record of `cf`, its key read by `key`.
    fn scan_keyed<K, T: for<'de> Deserialize<'de>>(
        &self,
        cf: &str,
        key: impl Fn(&[u8]) -> Result<K, AnyError>,
    ) -> Result<Vec<(K, T)>, AnyError> {
        collect(
            self.db
                .db()
                .iterator_cf(self.db.cf(cf), IteratorMode::Start),
            key,
        )
    }

    /// Writes the holders of each blob in `changed` to `batch` (a blob
    /// nobody holds is dropped).
    fn put_holders(
        &self,
        batch: &mut WriteBatch,
        changed: BTreeMap<Digest, Vec<String>>,
    ) -> Result<(), AnyError> {
        for (blob, mut holders) in changed {
            if holders.is_empty() {
                batch.delete_cf(self.db.cf(LOCATIONS), blob.hex());
            } else {
                holders.sort();
                holders.dedup();
                batch.put_cf(self.db.cf(LOCATIONS), blob.hex(), encode(&holders)?);
            }
        }
        Ok(())
    }

    /// Every blob `worker` is recorded to hold, with all its holders.
    fn held_by(&self, worker: &str) -> Result<BTreeMap<Digest, Vec<String>>, AnyError> {
        Ok(self
            .scan::<Vec<String>>(LOCATIONS)?
            .into_iter()
            .filter(|(_, h)| h.iter().any(|w| w == worker))
            .collect())
    }

    /// Records in `batch` that `worker` holds `blobs`, and, when `afresh`,
    /// nothing it was recorded to hold before.
    fn add_holder(
        &self,
        batch: &mut WriteBatch,
        worker: &str,
        blobs: &[Digest],
        afresh: bool,
    ) -> Result<Response, AnyError> {
        let mut next = if afresh {
            self.held_by(worker)?
        } else {
            BTreeMap::new()
        };
        for holders in next.values_mut() {
            holders.retain(|w| w != worker);
        }
        for blob in blobs {
            let holders = match next.entry(*blob) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => v.insert(self.holders(blob)?),
            };
            if !holders.iter().any(|w| w == worker) {
                holders.push(worker.to_string());
            }
        }
        let mut changed = BTreeMap::new();
        for (blob, mut holders) in next {
            holders.sort();
            holders.dedup();
            if self.holders(&blob)? != holders {
                changed.insert(blob, holders);
            }
        }
        let any = !changed.is_empty();
        self.put_holders(batch, changed)?;
        Ok(Response { changed: any })
    }

    /// Applies one command to `batch`, reading what it changes.
    fn apply_command(&self, batch: &mut WriteBatch, cmd: &Command) -> Result<Response, AnyError> {
        let cmd = match cmd {
            Command::V1(cmd) => cmd,
            Command::V2(cmd) => return self.apply_v2(batch, cmd),
        };
        use crate::CommandV1 as C;
        match cmd {
            C::Put { key, entry } => {
                batch.put_cf(self.db.cf(ENTRIES), key.hex(), encode(entry)?);
                Ok(Response { changed: true })
            }
            C::Touch { key, at } => match self.entry(key)? {
                Some(mut e) if e.last_used < *at => {
                    e.last_used = *at;
                    batch.put_cf(self.db.cf(ENTRIES), key.hex(), encode(&e)?);
                    Ok(Response { changed: true })
                }
                _ => Ok(Response { changed: false }),
            },
            C::Remove { key } => {
                let changed = self.entry(key)?.is_some();
                batch.delete_cf(self.db.cf(ENTRIES), key.hex());
                Ok(Response { changed })
            }
            C::Registered {
                worker,
                addr,
                at,
                blobs,
            } => {
                let record: Option<WorkerRecord> = read(&self.db, WORKERS, worker.as_bytes())?;
                let mut afresh = false;
                match record.map(|r| r.registered) {
                    // A registration older than the recorded one says
                    // nothing of the worker now.
                    Some(r) if r > *at => return Ok(Response { changed: false }),
                    // This run is recorded already (a location of it came
                    // first): what the registration lists is gained, and
                    // what the worker gained since stays.
                    Some(r) if r == *at => {}
                    // A new run: what the worker held before is not what
                    // it holds now.
                    _ => afresh = true,
                }
                self.add_holder(batch, worker, blobs, afresh)?;
                let record = WorkerRecord {
                    addr: addr.clone(),
                    registered: *at,
                };
                batch.put_cf(self.db.cf(WORKERS), worker.as_bytes(), encode(&record)?);
                Ok(Response { changed: true })
            }
            C::Located { worker, blobs } => self.add_holder(batch, worker, blobs, false),
            C::Held {
                worker,
                registration,
                blobs,
            } => {
                let record: Option<WorkerRecord> = read(&self.db, WORKERS, worker.as_bytes())?;
                let afresh = match record {
                    // Gained before the worker came back: its store is not
                    // what it was.
                    Some(r) if r.registered > *registration => {
                        return Ok(Response { changed: false });
                    }
                    Some(r) if r.registered == *registration => false,
                    // The first word of a run whose registration is still
                    // on its way: the run starts here, so the registration
                    // adds to what it gained instead of replacing it.
                    old => {
                        let record = WorkerRecord {
                            addr: old.map(|r| r.addr).unwrap_or_default(),
                            registered: *registration,
                        };
                        batch.put_cf(self.db.cf(WORKERS), worker.as_bytes(), encode(&record)?);
                        true
                    }
                };
                let added = self.add_holder(batch, worker, blobs, afresh)?;
                Ok(Response {
                    changed: added.changed || afresh,
                })
            }
            C::Joined { member } => {
                let mut joined = self.joined()?;
                if joined.contains(member) {
                    return Ok(Response { changed: false });
                }
                joined.push(*member);
                joined.sort_unstable();
                batch.put_cf(self.db.cf(APPLIED), "joined", encode(&joined)?);
                Ok(Response { changed: true })
            }
            C::Lost {
                worker,
                registration,
                blobs,
            } => {
                let record: Option<WorkerRecord> = read(&self.db, WORKERS, worker.as_bytes())?;
                if record.is_none_or(|r| r.registered != *registration) {
                    return Ok(Response { changed: false });
                }
                let mut changed = BTreeMap::new();
                for blob in blobs {
                    let mut holders = self.holders(blob)?;
                    if let Some(i) = holders.iter().position(|w| w == worker) {
                        holders.remove(i);
                        changed.insert(*blob, holders);
                    }
                }
                let any = !changed.is_empty();
                self.put_holders(batch, changed)?;
                Ok(Response { changed: any })
            }
            C::Forget { worker, registered } => {
                let record: Option<WorkerRecord> = read(&self.db, WORKERS, worker.as_bytes())?;
                // Registered again since the leader decided: it stays.
                if record.as_ref().is_some_and(|r| r.registered != *registered) {
                    return Ok(Response { changed: false });
                }
                let mut changed = self.held_by(worker)?;
                for holders in changed.values_mut() {
                    holders.retain(|w| w != worker);
                }
                let any = record.is_some() || !changed.is_empty();
                self.put_holders(batch, changed)?;
                batch.delete_cf(self.db.cf(WORKERS), worker.as_bytes());
                Ok(Response { changed: any })
            }
        }
    }

    /// Applies one command of version 2 to `batch`.
    fn apply_v2(&self, batch: &mut WriteBatch, cmd: &CommandV2) -> Result<Response, AnyError> {
        match cmd {
            CommandV2::Tag { name, image } => {
                let changed = self
                    .tag(name)?
                    .is_none_or(|old| old.config != image.config || old.layers != image.layers);
                batch.put_cf(self.db.cf(TAGS), name.as_bytes(), encode(image)?);
                Ok(Response { changed })
            }
            CommandV2::Untag { name } => {
                let changed = self.tag(name)?.is_some();
                batch.delete_cf(self.db.cf(TAGS), name.as_bytes());
                Ok(Response { changed })
            }
        }
    }

    /// The state as of one moment, however applies go on meanwhile: what
    /// it has applied, its membership, and the snapshot body.
    #[allow(clippy::type_complexity)]
    fn point_in_time(
        &self,
    ) -> Result<
        (
            Option<LogId<NodeId>>,
            StoredMembership<NodeId, Node>,
            Vec<u8>,
        ),
        AnyError,
    > {
        let snap = self.db.db().snapshot();
        let applied = |key: &str| -> Result<Option<Vec<u8>>, AnyError> {
            snap.get_cf(self.db.cf(APPLIED), key)
                .map_err(|e| AnyError::new(&e))
        };
        let last: Option<LogId<NodeId>> = match applied("last")? {
            Some(raw) => decode::<Option<LogId<NodeId>>>(&raw)?,
            None => None,
        };
        let membership = match applied("membership")? {
            Some(raw) => decode(&raw)?,
            None => StoredMembership::default(),
        };
        let scan = |cf: &str| snap.iterator_cf(self.db.cf(cf), IteratorMode::Start);
        let joined: Vec<NodeId> = match applied("joined")? {
            Some(raw) => decode(&raw)?,
            None => Vec::new(),
        };
        let body = encode(&SnapshotBody::V3 {
            entries: collect(scan(ENTRIES), digest_key)?,
            locations: collect(scan(LOCATIONS), digest_key)?,
            workers: collect(scan(WORKERS), name_key)?,
            joined,
            tags: collect(scan(TAGS), name_key)?,
        })?;
        Ok((last, membership, body))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        // Applies may go on while the snapshot is built: it is read from
        // one RocksDB snapshot, so it is the state at one log index.
        let (last_applied, membership, data) = self
            .point_in_time()
            .map_err(StorageIOError::read_state_machine)?;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, data.len()),
            None => format!("empty-{}", data.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let _storing = self
            .storing_snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let newer_stored = self
            .applied::<StoredSnapshot>("snapshot")
            .map_err(StorageIOError::read_state_machine)?
            .is_some_and(|s| s.meta.last_log_id >= last_applied);
        if !newer_stored {
            self.db
                .db()
                .put_cf_opt(
                    self.db.cf(APPLIED),
                    "snapshot",
                    encode(&stored).map_err(StorageIOError::write_state_machine)?,
                    &synced(),
                )
                .map_err(|e| StorageIOError::write_state_machine(&e))?;
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        let last = self
            .applied::<Option<LogId<NodeId>>>("last")
            .map_err(StorageIOError::read_state_machine)?
            .flatten();
        let membership = self
            .applied("membership")
            .map_err(StorageIOError::read_state_machine)?
            .unwrap_or_default();
        Ok((last, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        // One entry per batch: a command reads what the one before it
        // wrote.
        for e in entries {
            let mut batch = WriteBatch::default();
            let response = match &e.payload {
                EntryPayload::Blank => Response { changed: false },
                EntryPayload::Normal(cmd) => self
                    .apply_command(&mut batch, cmd)
                    .map_err(|err| StorageIOError::apply(e.log_id, err))?,
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(e.log_id), m.clone());
                    batch.put_cf(
                        self.db.cf(APPLIED),
                        "membership",
                        encode(&stored).map_err(|err| StorageIOError::apply(e.log_id, err))?,
                    );
                    Response { changed: true }
                }
            };
            batch.put_cf(
                self.db.cf(APPLIED),
                "last",
                encode(&Some(e.log_id)).map_err(|err| StorageIOError::apply(e.log_id, err))?,
            );
            self.db
                .db()
                .write_opt(batch, &synced())
                .map_err(|err| StorageIOError::apply(e.log_id, &err))?;
            out.push(response);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let sig = Some(meta.signature());
        let (entries, locations, workers, joined, tags) =
            match decode(&data).map_err(|e| StorageIOError::read_snapshot(sig.clone(), e))? {
                SnapshotBody::V1 {
                    entries,
                    locations,
                    workers,
                } => (entries, locations, workers, Vec::new(), Vec::new()),
                SnapshotBody::V2 {
                    entries,
                    locations,
                    workers,
                    joined,
                } => (entries, locations, workers, joined, Vec::new()),
                SnapshotBody::V3 {
                    entries,
                    locations,
                    workers,
                    joined,
                    tags,
                } => (entries, locations, workers, joined, tags),
            };
        let write_err = |e: AnyError| StorageIOError::write_snapshot(sig.clone(), e);
        let mut batch = WriteBatch::default();
        for cf in [ENTRIES, LOCATIONS, WORKERS, TAGS] {
            for item in self
                .db
                .db()
                .iterator_cf(self.db.cf(cf), IteratorMode::Start)
            {
                let (k, _) = item.map_err(|e| write_err(AnyError::new(&e)))?;
                batch.delete_cf(self.db.cf(cf), k);
            }
        }
        for (key, entry) in &entries {
            batch.put_cf(
                self.db.cf(ENTRIES),
                key.hex(),
                encode(entry).map_err(write_err)?,
            );
        }
        for (blob, holders) in &locations {
            batch.put_cf(
                self.db.cf(LOCATIONS),
                blob.hex(),
                encode(holders).map_err(write_err)?,
            );
        }
        for (name, record) in &workers {
            batch.put_cf(
                self.db.cf(WORKERS),
                name.as_bytes(),
                encode(record).map_err(write_err)?,
            );
        }
        for (name, image) in &tags {
            batch.put_cf(
                self.db.cf(TAGS),
                name.as_bytes(),
                encode(image).map_err(write_err)?,
            );
        }
        batch.put_cf(
            self.db.cf(APPLIED),
            "last",
            encode(&meta.last_log_id).map_err(write_err)?,
        );
        batch.put_cf(
            self.db.cf(APPLIED),
            "membership",
            encode(&meta.last_membership).map_err(write_err)?,
        );
        batch.put_cf(
            self.db.cf(APPLIED),
            "joined",
            encode(&joined).map_err(write_err)?,
        );
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        batch.put_cf(
            self.db.cf(APPLIED),
            "snapshot",
            encode(&stored).map_err(write_err)?,
        );
        // All or nothing: a crash mid-install leaves the old state whole.
        let _storing = self
            .storing_snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.db
            .db()
            .write_opt(batch, &synced())
            .map_err(|e| write_err(AnyError::new(&e)).into())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let stored: Option<StoredSnapshot> = self
            .applied("snapshot")
            .map_err(StorageIOError::read_state_machine)?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::CommandV1;

    fn blob(i: u8) -> Digest {
        Digest::of(&[i])
    }

    fn apply(sm: &StateMachine, cmd: impl Into<Command>) -> bool {
        let mut batch = WriteBatch::default();
        let r = sm.apply_command(&mut batch, &cmd.into()).unwrap();
        sm.db.db().write(batch).unwrap();
        r.changed
    }

    fn registered(worker: &str, blobs: Vec<Digest>) -> CommandV1 {
        CommandV1::Registered {
            worker: worker.into(),
            addr: "127.0.0.1:1".into(),
            at: 7,
            blobs,
        }
    }

    #[test]
    fn registering_again_replaces_what_a_worker_holds() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::new(open(dir.path()).unwrap());
        apply(&sm, registered("w1", vec![blob(1), blob(2)]));
        apply(&sm, registered("w2", vec![blob(2)]));
        assert_eq!(sm.holders(&blob(2)).unwrap(), ["w1", "w2"]);
        assert!(apply(
            &sm,
            CommandV1::Located {
                worker: "w2".into(),
                blobs: vec![blob(1), blob(3)],
            }
        ));
        assert!(!apply(
            &sm,
            CommandV1::Located {
                worker: "w2".into(),
                blobs: vec![blob(3)],
            }
        ));
        assert_eq!(sm.holders(&blob(1)).unwrap(), ["w1", "w2"]);

        // w1 comes back (a new run) with a wiped disk but for blob 3.
        apply(
            &sm,
            CommandV1::Registered {
                worker: "w1".into(),
                addr: "127.0.0.1:1".into(),
                at: 8,
                blobs: vec![blob(3)],
            },
        );
        assert_eq!(sm.holders(&blob(1)).unwrap(), ["w2"]);
        assert_eq!(sm.holders(&blob(2)).unwrap(), ["w2"]);
        assert_eq!(sm.holders(&blob(3)).unwrap(), ["w1", "w2"]);

        // A Forget decided before w2 registered again changes nothing.
        let forget = |registered| CommandV1::Forget {
            worker: "w2".into(),
            registered,
        };
        assert!(!apply(&sm, forget(6)));
        assert_eq!(sm.holders(&blob(1)).unwrap(), ["w2"]);
        assert!(apply(&sm, forget(7)));
        assert!(!apply(&sm, forget(7)));
        assert_eq!(sm.holders(&blob(1)).unwrap(), Vec::<String>::new());
        assert_eq!(sm.locations().unwrap().len(), 1);
        let workers: Vec<String> = sm.workers().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(workers, ["w1"]);
    }

    #[test]
    fn a_location_from_before_a_worker_came_back_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::new(open(dir.path()).unwrap());
        let register = |at| CommandV1::Registered {
            worker: "w".into(),
            addr: "127.0.0.1:1".into(),
            at,
            blobs: vec![],
        };
        let held = |registration, b| CommandV1::Held {
            worker: "w".into(),
            registration,
            blobs: vec![blob(b)],
        };
        let lost = |registration, b| CommandV1::Lost {
            worker: "w".into(),
            registration,
            blobs: vec![blob(b)],
        };
        apply(&sm, register(100));
        assert!(apply(&sm, held(100, 1)));
        // The worker comes back with a wiped store (registration 200)
        // while a location of its first life is still on its way: the
        // late location names no blob it holds, and is dropped.
        apply(&sm, register(200));
        assert!(!apply(&sm, held(100, 2)));
        assert!(sm.holders(&blob(2)).unwrap().is_empty());
        assert!(sm.holders(&blob(1)).unwrap().is_empty());
        // A worker asked, saying it lacks a blob, loses it; a word from an
        // earlier registration changes nothing.
        assert!(apply(&sm, held(200, 4)));
        assert!(!apply(&sm, lost(100, 4)));
        assert!(apply(&sm, lost(200, 4)));
        assert!(sm.holders(&blob(4)).unwrap().is_empty());
        // A registration older than the recorded one changes nothing.
        assert!(apply(&sm, held(200, 5)));
        assert!(!apply(&sm, register(100)));
        assert_eq!(sm.holders(&blob(5)).unwrap(), ["w"]);
        assert_eq!(sm.worker("w").unwrap().map(|r| r.registered), Some(200));
    }

    #[test]
    fn a_location_ahead_of_its_registration_is_kept_when_the_registration_comes() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::new(open(dir.path()).unwrap());
        let register = |at, blobs: &[u8]| CommandV1::Registered {
            worker: "w".into(),
            addr: "127.0.0.1:1".into(),
            at,
            blobs: blobs.iter().map(|b| blob(*b)).collect(),
        };
        let held = |registration, b| CommandV1::Held {
            worker: "w".into(),
            registration,
            blobs: vec![blob(b)],
        };
        apply(&sm, register(100, &[1]));
        // The worker comes back (run 200) and builds a layer before the
        // leader records its registration, which lists its store as it was
        // when it registered: the layer it built since must stay recorded.
        assert!(apply(&sm, held(200, 2)));
        assert!(sm.holders(&blob(1)).unwrap().is_empty(), "run 100's blobs");
        assert_eq!(sm.worker("w").unwrap().map(|r| r.registered), Some(200));
        assert!(apply(&sm, register(200, &[3])));
        assert_eq!(sm.holders(&blob(2)).unwrap(), ["w"]);
        assert_eq!(sm.holders(&blob(3)).unwrap(), ["w"]);
        let record = sm.worker("w").unwrap().unwrap();
        assert_eq!(
            (record.registered, record.addr.as_str()),
            (200, "127.0.0.1:1")
        );
        // A first run works the same, with no record at all before.
        let other = CommandV1::Held {
            worker: "v".into(),
            registration: 7,
            blobs: vec![blob(4)],
        };
        assert!(apply(&sm, other));
        assert!(apply(
            &sm,
            CommandV1::Registered {
                worker: "v".into(),
                addr: "127.0.0.1:2".into(),
                at: 7,
                blobs: vec![],
            }
        ));
        assert_eq!(sm.holders(&blob(4)).unwrap(), ["v"]);
    }

    #[tokio::test]
    async fn a_snapshot_carries_entries_locations_and_workers() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut from = StateMachine::new(open(a.path()).unwrap());
        apply(&from, registered("w1", vec![blob(1)]));
        apply(
            &from,
            CommandV1::Put {
                key: blob(9),
                entry: CacheEntry::new(Vec::new(), false, "w1"),
            },
        );
        apply(
            &from,
            CommandV2::Tag {
                name: "docker.io/library/app:1".into(),
                image: image(b"{}"),
            },
        );
        let snap = from.build_snapshot().await.unwrap();

        let mut to = StateMachine::new(open(b.path()).unwrap());
        apply(&to, registered("stale", vec![blob(5)]));
        apply(
            &to,
            CommandV2::Tag {
                name: "stale:1".into(),
                image: image(b"{}"),
            },
        );
        to.install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(to.holders(&blob(1)).unwrap(), ["w1"]);
        assert_eq!(to.holders(&blob(5)).unwrap(), Vec::<String>::new());
        assert!(to.entry(&blob(9)).unwrap().is_some());
        let workers: Vec<String> = to.workers().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(workers, ["w1"]);
        let tags: Vec<String> = to.tags().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(tags, ["docker.io/library/app:1"]);
    }

    fn image(config: &[u8]) -> ClusterImage {
        ClusterImage {
            config: config.to_vec(),
            layers: vec![strata_oci::LayerRef {
                blob: blob(1),
                diff_id: strata_cas::Sha256::of(&[1]),
                size: 1,
            }],
            tagged: 7,
        }
    }

    #[test]
    fn a_name_points_at_its_last_image_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::new(open(dir.path()).unwrap());
        let tag = |config: &[u8]| CommandV2::Tag {
            name: "app:1".into(),
            image: image(config),
        };
        assert!(apply(&sm, tag(b"{\"a\":1}")));
        // The same image again changes nothing; another one replaces it.
        assert!(!apply(&sm, tag(b"{\"a\":1}")));
        assert!(apply(&sm, tag(b"{\"a\":2}")));
        assert_eq!(sm.tag("app:1").unwrap().unwrap().config, b"{\"a\":2}");
        assert!(apply(
            &sm,
            CommandV2::Untag {
                name: "app:1".into()
            }
        ));
        assert!(!apply(
            &sm,
            CommandV2::Untag {
                name: "app:1".into()
            }
        ));
        assert!(sm.tag("app:1").unwrap().is_none());
    }
}
