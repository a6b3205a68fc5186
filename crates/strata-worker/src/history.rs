//! Build history: a record of each build a node ran or coordinated, kept
//! in the node's metadata database, the newest [`MAX_RECORDS`] of them;
//! and a build's timeline as a Chrome trace (Perfetto opens it).

use std::collections::BTreeMap;
use std::sync::Arc;

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
        Ok(History { meta })
    }

    fn err(&self, detail: impl std::fmt::Display) -> HistoryError {
        HistoryError::Db {
            path: self.meta.path().display().to_string(),
            detail: detail.to_string(),
        }
    }

    /// Records `build`, then lets the oldest go past [`MAX_RECORDS`].
    pub fn record(&self, build: &BuildRecord) -> Result<(), HistoryError> {
        let cf = self.meta.cf(CF_HISTORY);
        let value = serde_json::to_vec(build).map_err(|e| self.err(e))?;
        self.meta
            .db()
            .put_cf(cf, key(build), value)
            .map_err(|e| self.err(e))?;
        let keys: Vec<Box<[u8]>> = self
            .meta
            .db()
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .map(|item| item.map(|(k, _)| k))
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))?;
        if keys.len() > MAX_RECORDS {
            let mut batch = rocksdb::WriteBatch::default();
            for k in &keys[..keys.len() - MAX_RECORDS] {
                batch.delete_cf(cf, k);
            }
            self.meta.db().write(batch).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// The newest `limit` builds, newest first. A record that cannot be
    /// read (written by another version) is skipped.
    pub fn list(&self, limit: usize) -> Result<Vec<BuildRecord>, HistoryError> {
        let cf = self.meta.cf(CF_HISTORY);
        let mut out = Vec::new();
        for item in self.meta.db().iterator_cf(cf, rocksdb::IteratorMode::End) {
            if out.len() >= limit {
                break;
            }
            let (_, v) = item.map_err(|e| self.err(e))?;
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
        events.push(json!({
            "name": s.instruction,
            "cat": if s.cached { "cached" } else { "executed" },
            "ph": "X",
            "ts": micros(s.started),
            "dur": ((s.finished - s.started).max(0.0) * 1e6).round(),
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
        assert_eq!(all[0].id, format!("b{:05}", MAX_RECORDS + 4));
        assert_eq!(all[MAX_RECORDS - 1].id, "b00005");
        assert_eq!(
            h.get("b0100").map(|r| r.id).ok(),
            None,
            "a prefix of several"
        );
        assert_eq!(h.get("b01004").map(|r| r.id).ok(), Some("b01004".into()));
        assert!(h.get("b00000").is_err(), "gone");
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
        assert_eq!((b.steps_run(), b.steps_cached()), (3, 1));
    }
}
