//! Build history: a record of each build a node ran or coordinated, kept
//! in the node's metadata database, the newest [`MAX_RECORDS`] of them;
//! and a build's timeline as a Chrome trace (Perfetto opens it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use strata_cas::MetaDb;
use strata_solver::StepRecord;

const CF_HISTORY: &str = "history";

/// Builds a node remembers; older ones go.
pub const MAX_RECORDS: usize = 1000;

/// How a build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    /// It made its image.
    Succeeded,
    /// A step, the plan or an output failed.
    Failed,
    /// Its client cancelled it or went away.
    Cancelled,
}

impl std::fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
            BuildStatus::Cancelled => "cancelled",
        })
    }
}

/// One build, as `strata history` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    /// Its id, as its client printed it and log lines name it.
    pub id: String,
    /// The names it was given.
    pub tags: Vec<String>,
    /// How it ended.
    pub status: BuildStatus,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Where it ran: `local`, or the coordinator that solved it.
    pub node: String,
    /// Who asked for it: on a coordinator, the client certificate's name.
    pub client: Option<String>,
    /// When it started, seconds since the epoch.
    pub started: f64,
    /// How long it took, in seconds.
    pub duration_seconds: f64,
    /// The image it made.
    pub image: Option<String>,
    /// Bytes of layers moved to assemble the image (a cluster build's
    /// download); 0 for a local build.
    pub bytes_moved: u64,
    /// Every step, in the order they finished.
    pub steps: Vec<StepRecord>,
}

impl BuildRecord {
    /// A build that starts now.
    pub fn begin(id: &str, tags: Vec<String>, node: &str) -> BuildRecord {
        BuildRecord {
            id: id.to_string(),
            tags,
            status: BuildStatus::Failed,
            error: None,
            node: node.to_string(),
            client: None,
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            duration_seconds: 0.0,
            image: None,
            bytes_moved: 0,
            steps: Vec::new(),
        }
    }

    /// Steps that ran.
    pub fn steps_run(&self) -> usize {
        self.steps.iter().filter(|s| !s.cached).count()
    }

    /// Steps taken from the cache (or from a concurrent build).
    pub fn steps_cached(&self) -> usize {
        self.steps.iter().filter(|s| s.cached).count()
    }

    /// The nodes whose steps the build used, in order of first use.
    pub fn workers(&self) -> Vec<String> {
        let mut seen = Vec::new();
        for s in &self.steps {
            if !s.worker.is_empty() && !seen.contains(&s.worker) {
                seen.push(s.worker.clone());
            }
        }
        seen
    }
}

/// The build history in a node's metadata database.
#[derive(Debug)]
pub struct History {
    meta: Arc<MetaDb>,
    /// How many records the database holds, once counted; recording
    /// holds it while it writes, so concurrent builds count right.
    kept: Mutex<Option<usize>>,
}

/// Why history could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The database failed.
    #[error("build history in {path}: {detail}")]
    Db {
        /// The database.
        path: String,
        /// Why.
        detail: String,
    },
    /// No build, or more than one, has this id (or id prefix).
    #[error("{0}")]
    NotFound(String),
}

impl History {
    /// The column families history lives in.
    pub const COLUMN_FAMILIES: &'static [&'static str] = &[CF_HISTORY];

    /// The history in `meta`, which must have been opened with
    /// [`History::COLUMN_FAMILIES`].
    pub fn open(meta: Arc<MetaDb>) -> Result<History, strata_cas::Error> {
        meta.require(Self::COLUMN_FAMILIES)?;
        Ok(History {
            meta,
            kept: Mutex::new(None),
        })
    }

    fn err(&self, detail: impl std::fmt::Display) -> HistoryError {
        HistoryError::Db {
            path: self.meta.path().display().to_string(),
            detail: detail.to_string(),
        }
    }

    /// Records `build`, then lets the oldest go past [`MAX_RECORDS`]:
    /// only the ones past it are read, so recording costs the same with
    /// one record kept as with a thousand.
    pub fn record(&self, build: &BuildRecord) -> Result<(), HistoryError> {
        let value = serde_json::to_vec(build).map_err(|e| self.err(e))?;
        let key = key(build);
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let counted = self.put_and_trim(&key, &value, *kept);
        // A failure leaves the count unknown: the next record counts again.
        *kept = counted.as_ref().ok().copied();
        counted.map(|_| ())
    }

    /// Writes one record and deletes the oldest past [`MAX_RECORDS`];
    /// returns how many are left. `kept` is the count before, if known.
    fn put_and_trim(
        &self,
        key: &[u8],
        value: &[u8],
        kept: Option<usize>,
    ) -> Result<usize, HistoryError> {
        let cf = self.meta.cf(CF_HISTORY);
        let db = self.meta.db();
        let fresh = match kept {
            Some(_) => db
                .get_pinned_cf(cf, key)
                .map_err(|e| self.err(e))?
                .is_none(),
            None => true,
        };
        db.put_cf(cf, key, value).map_err(|e| self.err(e))?;
        let mut count = match kept {
            Some(n) => n + usize::from(fresh),
            None => {
                let mut it = db.raw_iterator_cf(cf);
                it.seek_to_first();
                let mut n = 0;
                while it.valid() {
                    n += 1;
                    it.next();
                }
                it.status().map_err(|e| self.err(e))?;
                n
            }
        };
        if count > MAX_RECORDS {
            let mut batch = rocksdb::WriteBatch::default();
            let mut it = db.raw_iterator_cf(cf);
            it.seek_to_first();
            while count > MAX_RECORDS && it.valid() {
                if let Some(k) = it.key() {
                    batch.delete_cf(cf, k);
                }
                count -= 1;
                it.next();
            }
            it.status().map_err(|e| self.err(e))?;
            db.write(batch).map_err(|e| self.err(e))?;
        }
        Ok(count)
    }

    /// The newest `limit` builds, newest first. A record that cannot be
    /// read (written by another version) is skipped.
    pub fn list(&self, limit: usize) -> Result<Vec<BuildRecord>, HistoryError> {
        self.newest(limit, f64::INFINITY)
    }

    /// The newest builds, newest first: at least `count` (if there are
    /// that many), and every one started at `since` (seconds since the
    /// epoch) or later. Records are keyed by start time, so older ones
    /// are never read.
    pub fn newest(&self, count: usize, since: f64) -> Result<Vec<BuildRecord>, HistoryError> {
        let cf = self.meta.cf(CF_HISTORY);
        let mut out: Vec<BuildRecord> = Vec::new();
        for item in self.meta.db().iterator_cf(cf, rocksdb::IteratorMode::End) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if out.len() >= count && started_of(&k) < since {
                break;
            }
            if let Ok(r) = serde_json::from_slice::<BuildRecord>(&v) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The build whose id is `id`, or starts with it (as Docker takes a
    /// short image id).
    pub fn get(&self, id: &str) -> Result<BuildRecord, HistoryError> {
        find(self.list(MAX_RECORDS)?, id)
    }
}

/// The build in `records` whose id is `id` or starts with it: exactly one.
pub fn find(records: Vec<BuildRecord>, id: &str) -> Result<BuildRecord, HistoryError> {
    if let Some(exact) = records.iter().find(|r| r.id == id) {
        return Ok(exact.clone());
    }
    let mut matching: Vec<BuildRecord> = records
        .into_iter()
        .filter(|r| !id.is_empty() && r.id.starts_with(id))
        .collect();
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 => Err(HistoryError::NotFound(format!(
            "no build {id} in the history (`strata history` lists them)"
        ))),
        n => Err(HistoryError::NotFound(format!(
            "{n} builds have ids starting with {id}: give more of it"
        ))),
    }
}

/// Builds running now, with where each of their steps stands: what a
/// dashboard shows live. Fed by the builds' progress events.
#[derive(Debug, Default)]
pub struct Live(std::sync::Mutex<BTreeMap<String, LiveBuild>>);

/// A build running now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveBuild {
    /// Its id.
    pub id: String,
    /// Its names.
    pub tags: Vec<String>,
    /// Who asked for it, on a coordinator.
    pub client: Option<String>,
    /// When it started, seconds since the epoch.
    pub started: f64,
    /// Its steps so far, in the order they were first heard of.
    pub steps: Vec<LiveStep>,
}

/// A step of a running build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveStep {
    /// Its stage.
    pub stage: String,
    /// Its number in the stage.
    pub number: usize,
    /// The instruction.
    pub label: String,
    /// `running`, `done`, `cached` or `failed`.
    pub state: String,
    /// The node running it, when known.
    pub node: Option<String>,
    /// When it started, seconds since the epoch.
    pub started: f64,
    /// How long it took, once done.
    pub seconds: Option<f64>,
}

/// The most builds [`Live`] follows at once, and steps per build: a
/// bound on what a flood of builds costs the dashboard.
const LIVE_BUILDS: usize = 10_000;
const LIVE_STEPS: usize = 10_000;

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Live {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, LiveBuild>) -> T) -> T {
        f(&mut self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Build `id` started.
    pub fn begin(&self, id: &str, tags: &[String], client: Option<&str>) {
        self.with(|m| {
            if m.len() < LIVE_BUILDS {
                m.insert(
                    id.to_string(),
                    LiveBuild {
                        id: id.to_string(),
                        tags: tags.to_vec(),
                        client: client.map(str::to_string),
                        started: now(),
                        steps: Vec::new(),
                    },
                );
            }
        });
    }

    /// Build `id` heard `event`.
    pub fn event(&self, id: &str, event: &strata_solver::Event) {
        use strata_solver::EventKind;
        self.with(|m| {
            let Some(b) = m.get_mut(id) else { return };
            let at = b
                .steps
                .iter()
                .position(|s| s.stage == event.stage && s.number == event.number);
            let i = match at {
                Some(i) => i,
                None if b.steps.len() < LIVE_STEPS => {
                    b.steps.push(LiveStep {
                        stage: event.stage.clone(),
                        number: event.number,
                        label: event.label.clone(),
                        state: "running".into(),
                        node: None,
                        started: now(),
                        seconds: None,
                    });
                    b.steps.len() - 1
                }
                None => return,
            };
            let step = &mut b.steps[i];
            match &event.kind {
                EventKind::Started => step.state = "running".into(),
                EventKind::Placed(node) => step.node = Some(node.clone()),
                EventKind::Cached => {
                    step.state = "cached".into();
                    step.seconds = Some(0.0);
                }
                EventKind::Done(secs) => {
                    step.state = "done".into();
                    step.seconds = Some(*secs);
                }
                EventKind::Failed(_) => step.state = "failed".into(),
                EventKind::Output(_) => {}
            }
        });
    }

    /// Build `id` ended.
    pub fn end(&self, id: &str) {
        self.with(|m| m.remove(id));
    }

    /// The builds running now, oldest first.
    pub fn snapshot(&self) -> Vec<LiveBuild> {
        let mut builds: Vec<LiveBuild> = self.with(|m| m.values().cloned().collect());
        builds.sort_by(|a, b| a.started.total_cmp(&b.started));
        builds
    }
}

/// What a node is doing and has done, as its dashboard shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Activity {
    /// Builds running now.
    pub running: Vec<LiveBuild>,
    /// The newest builds, newest first.
    pub recent: Vec<BuildRecord>,
    /// Bytes of its blobs.
    pub bytes: u64,
    /// Steps its builds of the last hour looked up in the cache.
    pub lookups_hour: usize,
    /// Those found there.
    pub hits_hour: usize,
}

/// A node's dashboard: what `/api/dashboard` answers and the page shows.
#[derive(Debug, Clone, Serialize)]
pub struct Dashboard {
    /// The node.
    pub node: NodeView,
    /// The workers it places steps on (a daemon: itself).
    pub workers: Vec<WorkerView>,
    /// Its cache.
    pub cache: CacheView,
    /// Builds running now.
    pub running: Vec<LiveBuild>,
    /// The newest builds.
    pub recent: Vec<BuildRecord>,
}

/// Which node a dashboard is of.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// Its name.
    pub name: String,
    /// `coordinator` or `daemon`.
    pub role: &'static str,
    /// Its version of strata.
    pub version: &'static str,
}

/// A worker on a dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    /// Its name.
    pub name: String,
    /// Where it is.
    pub address: String,
    /// `up`, `cordoned` or `gone`.
    pub state: &'static str,
    /// Steps it runs at once at most.
    pub slots: usize,
    /// Steps it runs now.
    pub running: usize,
    /// Blobs it holds.
    pub blobs: usize,
}

/// A cache on a dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct CacheView {
    /// Its entries.
    pub entries: usize,
    /// Bytes of this node's blobs.
    pub bytes: u64,
    /// Steps looked up in the last hour.
    pub lookups_hour: usize,
    /// Those found.
    pub hits_hour: usize,
}

impl Dashboard {
    /// `node`'s dashboard, with the workers and cache entries its role
    /// knows of.
    pub fn of(
        node: &crate::Node,
        about: NodeView,
        workers: Vec<WorkerView>,
        entries: usize,
    ) -> Dashboard {
        let a = Activity::of(node);
        Dashboard {
            node: about,
            workers,
            cache: CacheView {
                entries,
                bytes: a.bytes,
                lookups_hour: a.lookups_hour,
                hits_hour: a.hits_hour,
            },
            running: a.running,
            recent: a.recent,
        }
    }
}

/// Builds a dashboard lists as recent.
const RECENT: usize = 20;

impl Activity {
    /// `node`'s activity now.
    pub fn of(node: &crate::Node) -> Activity {
        let hour_ago = now() - 3600.0;
        // The recent builds shown, and every build of the last hour for
        // the hit rate: not the whole history, at each poll.
        let records = node.history.newest(RECENT, hour_ago).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the build history");
            Vec::new()
        });
        let (lookups_hour, hits_hour) = cache_use(&records, hour_ago);
        Activity {
            running: node.live.snapshot(),
            recent: records.into_iter().take(RECENT).collect(),
            bytes: node.content.total_size().unwrap_or(0),
            lookups_hour,
            hits_hour,
        }
    }
}

/// What a node's recent history says of its cache since `since`
/// (seconds since the epoch): steps looked up, and those that hit.
pub fn cache_use(records: &[BuildRecord], since: f64) -> (usize, usize) {
    records
        .iter()
        .filter(|r| r.started >= since)
        .flat_map(|r| &r.steps)
        .fold((0, 0), |(all, hits), s| {
            (all + 1, hits + usize::from(s.cached))
        })
}

/// When the build a record's key names started, seconds since the epoch
/// (the key begins with it: [`key`]).
fn started_of(key: &[u8]) -> f64 {
    key.get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0.0, |b| u64::from_be_bytes(b) as f64 / 1e6)
}

/// Records sort by when they started, then by id.
fn key(build: &BuildRecord) -> Vec<u8> {
    let micros = (build.started.max(0.0) * 1e6) as u64;
    let mut k = micros.to_be_bytes().to_vec();
    k.extend_from_slice(build.id.as_bytes());
    k
}

/// `build`'s timeline in the Chrome trace event format: a process per
/// node, a thread per slot it used (steps that overlapped on a node are on
/// different slots), each step a span named by its instruction, with its
/// stage, line, cache key and whether it was cached.
pub fn chrome_trace(build: &BuildRecord) -> serde_json::Value {
    use serde_json::json;
    let origin = build.started;
    let micros = |t: f64| ((t - origin).max(0.0) * 1e6).round();
    let mut steps: Vec<&StepRecord> = build.steps.iter().collect();
    steps.sort_by(|a, b| a.started.total_cmp(&b.started));
    let mut nodes: BTreeMap<String, (usize, Vec<f64>)> = BTreeMap::new();
    let mut events = Vec::new();
    for s in steps {
        let name = if s.worker.is_empty() {
            build.node.clone()
        } else {
            s.worker.clone()
        };
        let next = nodes.len() + 1;
        let (pid, lanes) = nodes.entry(name).or_insert_with(|| (next, Vec::new()));
        // The first slot free when the step started, else a new one.
        let lane = match lanes.iter().position(|end| *end <= s.started) {
            Some(l) => l,
            None => {
                lanes.push(0.0);
                lanes.len() - 1
            }
        };
        lanes[lane] = s.finished;
        // The wait before it ran (for a slot, a worker, its inputs), as a
        // span of its own.
        let ran_from = s
            .running
            .filter(|r| *r > s.started && *r <= s.finished)
            .unwrap_or(s.started);
        if ran_from > s.started {
            events.push(json!({
                "name": format!("waiting: {}", s.instruction),
                "cat": "wait",
                "ph": "X",
                "ts": micros(s.started),
                "dur": ((ran_from - s.started) * 1e6).round(),
                "pid": *pid,
                "tid": lane + 1,
                "args": { "stage": s.stage, "step": s.number },
            }));
        }
        // Then moving its inputs to the node, if that took time.
        let fetched_until = if s.fetched_bytes > 0 {
            (ran_from + s.fetch_seconds.max(0.0)).min(s.finished)
        } else {
            ran_from
        };
        if fetched_until > ran_from {
            events.push(json!({
                "name": format!("fetching {} bytes: {}", s.fetched_bytes, s.instruction),
                "cat": "transfer",
                "ph": "X",
                "ts": micros(ran_from),
                "dur": ((fetched_until - ran_from) * 1e6).round(),
                "pid": *pid,
                "tid": lane + 1,
                "args": { "stage": s.stage, "step": s.number, "bytes": s.fetched_bytes },
            }));
        }
        events.push(json!({
            "name": s.instruction,
            "cat": if s.cached { "cached" } else { "executed" },
            "ph": "X",
            "ts": micros(fetched_until),
            "dur": ((s.finished - fetched_until).max(0.0) * 1e6).round(),
            "pid": *pid,
            "tid": lane + 1,
            "args": {
                "stage": s.stage,
                "step": s.number,
                "line": s.line,
                "cache_key": s.cache_key,
                "cached": s.cached,
            },
        }));
    }
    for (name, (pid, lanes)) in &nodes {
        events.push(json!({
            "name": "process_name", "ph": "M", "pid": pid,
            "args": { "name": name },
        }));
        for lane in 0..lanes.len() {
            events.push(json!({
                "name": "thread_name", "ph": "M", "pid": pid, "tid": lane + 1,
                "args": { "name": format!("slot {}", lane + 1) },
            }));
        }
    }
    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "build": build.id,
            "status": build.status.to_string(),
            "tags": build.tags,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(worker: &str, started: f64, finished: f64, cached: bool) -> StepRecord {
        StepRecord {
            stage: "build".into(),
            number: 2,
            instruction: "RUN make".into(),
            line: 3,
            cache_key: "k".into(),
            cached,
            started,
            finished,
            worker: worker.into(),
            running: None,
            fetched_bytes: 0,
            fetch_seconds: 0.0,
        }
    }

    fn history() -> (tempfile::TempDir, History) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let meta =
            MetaDb::open(dir.path(), History::COLUMN_FAMILIES).unwrap_or_else(|e| panic!("{e}"));
        let h = History::open(meta).unwrap_or_else(|e| panic!("{e}"));
        (dir, h)
    }

    #[test]
    fn the_newest_come_first_and_the_oldest_go() {
        let (_dir, h) = history();
        for i in 0..(MAX_RECORDS + 5) {
            let mut r = BuildRecord::begin(&format!("b{i:05}"), vec![], "local");
            r.started = 1000.0 + i as f64;
            h.record(&r).unwrap_or_else(|e| panic!("{e}"));
        }
        let all = h.list(usize::MAX).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(all.len(), MAX_RECORDS);
        // Recording the same build again adds nothing.
        let mut again = BuildRecord::begin(&format!("b{:05}", MAX_RECORDS + 4), vec![], "local");
        again.started = 1000.0 + (MAX_RECORDS + 4) as f64;
        h.record(&again).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.list(usize::MAX).map(|v| v.len()).ok(), Some(MAX_RECORDS));
        assert_eq!(all[0].id, format!("b{:05}", MAX_RECORDS + 4));
        assert_eq!(all[MAX_RECORDS - 1].id, "b00005");
        assert_eq!(
            h.get("b0100").map(|r| r.id).ok(),
            None,
            "a prefix of several"
        );
        assert_eq!(h.get("b01004").map(|r| r.id).ok(), Some("b01004".into()));
        assert!(h.get("b00000").is_err(), "gone");
        // Two at least, and all since 2000.0 (b01000 on): reading stops
        // at the first older one past the count.
        let newest = h.newest(2, 2000.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(newest.len(), 5);
        assert_eq!(newest[4].id, "b01000");
        assert_eq!(h.newest(2, f64::INFINITY).map(|v| v.len()).ok(), Some(2));
    }

    #[test]
    fn a_history_opened_again_keeps_the_newest_of_what_is_there() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let meta =
            MetaDb::open(dir.path(), History::COLUMN_FAMILIES).unwrap_or_else(|e| panic!("{e}"));
        let record = |h: &History, i: usize| {
            let mut r = BuildRecord::begin(&format!("b{i:05}"), vec![], "local");
            r.started = 1000.0 + i as f64;
            h.record(&r).unwrap_or_else(|e| panic!("{e}"));
        };
        let first = History::open(Arc::clone(&meta)).unwrap_or_else(|e| panic!("{e}"));
        for i in 0..MAX_RECORDS - 2 {
            record(&first, i);
        }
        drop(first);
        // As a restarted daemon: it has not counted, and must not keep more.
        let second = History::open(meta).unwrap_or_else(|e| panic!("{e}"));
        for i in MAX_RECORDS - 2..MAX_RECORDS + 3 {
            record(&second, i);
        }
        let all = second.list(usize::MAX).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(all.len(), MAX_RECORDS);
        assert_eq!(all[MAX_RECORDS - 1].id, "b00003");
    }

    #[test]
    fn overlapping_steps_on_a_node_take_separate_slots() {
        let mut b = BuildRecord::begin("x", vec!["app:1".into()], "local");
        b.started = 100.0;
        b.steps = vec![
            step("worker-1", 100.0, 103.0, false),
            step("worker-1", 101.0, 102.0, false),
            step("worker-1", 103.0, 104.0, true),
            step("worker-2", 100.5, 101.0, false),
        ];
        let trace = chrome_trace(&b);
        let spans: Vec<(u64, u64, f64)> = trace["traceEvents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["ph"] == "X")
            .map(|e| {
                (
                    e["pid"].as_u64().unwrap_or(0),
                    e["tid"].as_u64().unwrap_or(0),
                    e["ts"].as_f64().unwrap_or(-1.0),
                )
            })
            .collect();
        assert_eq!(
            spans,
            vec![
                (1, 1, 0.0),
                (2, 1, 500_000.0),
                (1, 2, 1_000_000.0),
                (1, 1, 3_000_000.0)
            ]
        );
        assert_eq!(b.workers(), vec!["worker-1", "worker-2"]);
        // A step that waited for its slot shows the wait before it, and
        // the fetch of its inputs.
        b.steps[3].running = Some(100.75);
        b.steps[3].fetch_seconds = 0.05;
        b.steps[3].fetched_bytes = 4096;
        let trace = chrome_trace(&b);
        let on_worker_2: Vec<(String, f64, f64)> = trace["traceEvents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["ph"] == "X" && e["pid"] == 2)
            .map(|e| {
                (
                    e["cat"].as_str().unwrap_or("").to_string(),
                    e["ts"].as_f64().unwrap_or(-1.0),
                    e["dur"].as_f64().unwrap_or(-1.0),
                )
            })
            .collect();
        assert_eq!(
            on_worker_2,
            vec![
                ("wait".to_string(), 500_000.0, 250_000.0),
                ("transfer".to_string(), 750_000.0, 50_000.0),
                ("executed".to_string(), 800_000.0, 200_000.0)
            ]
        );
        assert_eq!((b.steps_run(), b.steps_cached()), (3, 1));
    }
}
