//! Build progress on stderr, in BuildKit's style: `plain` for logs (one
//! line per event, output prefixed with the step's number), `tty` redrawn
//! in place with indicatif, `quiet` for nothing, `rawjson` for scripts
//! (BuildKit's solve status as JSON lines). Pulls and pushes show
//! the same way: a bar per blob on a terminal, a line per blob otherwise.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use strata_registry::Transfer;
use strata_solver::{Event, EventKind};

use crate::units::human_size;

/// How progress is shown.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Mode {
    /// `tty` on a terminal, else `plain`.
    Auto,
    /// One line per event.
    Plain,
    /// Redrawn in place.
    Tty,
    /// Nothing but errors.
    Quiet,
    /// BuildKit's solve status as JSON, an object per line
    /// (`{"vertexes":[…],"statuses":[…],"logs":[…]}`), for scripts.
    Rawjson,
}

impl Mode {
    fn resolve(self) -> Mode {
        match self {
            Mode::Auto if std::io::IsTerminal::is_terminal(&std::io::stderr()) => Mode::Tty,
            Mode::Auto => Mode::Plain,
            m => m,
        }
    }
}

/// Steps seen so far, by stage and number, and the next `#N` to hand out.
#[derive(Default)]
struct Steps {
    next: usize,
    by_step: HashMap<(String, usize), StepState>,
}

struct StepState {
    id: usize,
    bar: Option<ProgressBar>,
    partial: Vec<u8>,
    /// When it started (`rawjson`).
    started: Option<String>,
}

/// Renders events and counts what happened.
pub struct Renderer {
    mode: Mode,
    start: Instant,
    multi: Option<MultiProgress>,
    steps: Mutex<Steps>,
    transfers: Mutex<HashMap<String, BlobTransfer>>,
}

/// A blob being pulled or pushed: its bar (on a terminal), when it
/// started, bytes so far.
struct BlobTransfer {
    bar: Option<ProgressBar>,
    started: Instant,
    bytes: u64,
}

impl Renderer {
    /// A renderer for `mode`.
    pub fn new(mode: Mode) -> Arc<Renderer> {
        let mode = mode.resolve();
        let multi = (mode == Mode::Tty)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Arc::new(Renderer {
            mode,
            start: Instant::now(),
            multi,
            steps: Mutex::new(Steps::default()),
            transfers: Mutex::default(),
        })
    }

    fn line(&self, text: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => {
                let _ = writeln!(std::io::stderr().lock(), "{text}");
            }
        }
    }

    /// Draws one event.
    pub fn on(&self, e: Event) {
        if self.mode == Mode::Quiet {
            return;
        }
        let mut guard = self.steps.lock().unwrap_or_else(PoisonError::into_inner);
        let Steps { next, by_step } = &mut *guard;
        let key = (e.stage.clone(), e.number);
        let title = format!("[{} {}/{}] {}", e.stage, e.number, e.total, e.label);
        let state = by_step.entry(key).or_insert_with(|| {
            *next += 1;
            StepState {
                id: *next,
                bar: None,
                partial: Vec::new(),
                started: None,
            }
        });
        if self.mode == Mode::Rawjson {
            let line = raw_event(state, &e, &title);
            drop(guard);
            self.line(&line);
            return;
        }
        let id = state.id;
        match (&e.kind, self.mode) {
            (EventKind::Started, Mode::Tty) => {
                if let Some(m) = &self.multi {
                    let bar = m.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {msg} {elapsed:.dim}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_message(title);
                    bar.enable_steady_tick(Duration::from_millis(120));
                    state.bar = Some(bar);
                }
            }
            (EventKind::Started, _) => self.line(&format!("#{id} {title}")),
            (EventKind::Placed(node), _) => match &state.bar {
                Some(bar) => bar.set_message(format!("{title} on {node}")),
                None => self.line(&format!("#{id} on {node}")),
            },
            (EventKind::Cached, _) => {
                if self.mode == Mode::Plain {
                    self.line(&format!("#{id} {title}"));
                    self.line(&format!("#{id} CACHED"));
                } else {
                    self.line(&format!(" => CACHED {title}"));
                }
            }
            (EventKind::Output(bytes), _) => {
                state.partial.extend_from_slice(bytes);
                let elapsed = self.start.elapsed().as_secs_f64();
                while let Some(i) = state.partial.iter().position(|&b| b == b'\n') {
                    let l: Vec<u8> = state.partial.drain(..=i).collect();
                    let text = String::from_utf8_lossy(&l[..l.len() - 1]).into_owned();
                    self.line(&format!("#{id} {elapsed:.3} {text}"));
                }
            }
            (EventKind::Done(secs), _) => {
                if !state.partial.is_empty() {
                    let text =
                        String::from_utf8_lossy(&std::mem::take(&mut state.partial)).into_owned();
                    self.line(&format!("#{id} {text}"));
                }
                match state.bar.take() {
                    Some(bar) => {
                        bar.finish_and_clear();
                        self.line(&format!(" => {title} {secs:.1}s"));
                    }
                    None if self.mode == Mode::Plain => {
                        if e.label.starts_with("FROM ") {
                            self.line(&format!("#{id} {title}"));
                        }
                        self.line(&format!("#{id} DONE {secs:.1}s"));
                    }
                    None => self.line(&format!(" => {title} {secs:.1}s")),
                }
            }
            (EventKind::Failed(msg), _) => {
                if let Some(bar) = state.bar.take() {
                    bar.finish_and_clear();
                }
                self.line(&format!("#{id} ERROR: {msg}"));
            }
        }
    }

    /// Writes a command's own standard error, above any bars drawn.
    pub fn stderr(&self, bytes: &[u8]) {
        let write = || {
            let _ = std::io::stderr().lock().write_all(bytes);
        };
        match &self.multi {
            Some(m) => m.suspend(write),
            None => write(),
        }
    }

    /// Stops any spinner or bar still drawn.
    pub fn finish(&self) {
        let mut guard = self.steps.lock().unwrap_or_else(PoisonError::into_inner);
        for s in guard.by_step.values_mut() {
            if let Some(bar) = s.bar.take() {
                bar.finish_and_clear();
            }
        }
        let mut transfers = self
            .transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for t in transfers.values_mut() {
            if let Some(bar) = t.bar.take() {
                bar.finish_and_clear();
            }
        }
    }
}

/// Now, as BuildKit's JSON dates its events.
fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// A step's vertex digest in `rawjson`: stable for the step within the
/// build, as BuildKit's is for its vertex.
fn vertex_digest(stage: &str, number: usize) -> String {
    strata_cas::Sha256::of(format!("{stage}\n{number}").as_bytes()).to_string()
}

/// One event as a line of BuildKit's solve status JSON.
fn raw_event(state: &mut StepState, e: &Event, title: &str) -> String {
    use base64::Engine;
    let digest = vertex_digest(&e.stage, e.number);
    let now = timestamp();
    let started = state.started.get_or_insert_with(|| now.clone()).clone();
    let vertex = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"digest": digest, "name": title, "started": started});
        if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        serde_json::json!({ "vertexes": [v] })
    };
    let status = match &e.kind {
        EventKind::Started => vertex(serde_json::json!({})),
        EventKind::Placed(node) => serde_json::json!({"logs": [{
            "vertex": digest, "stream": 2, "timestamp": now,
            "data": base64::engine::general_purpose::STANDARD.encode(format!("running on {node}\n")),
        }]}),
        EventKind::Cached => vertex(serde_json::json!({"completed": now, "cached": true})),
        EventKind::Output(bytes) => serde_json::json!({"logs": [{
            "vertex": digest, "stream": 1, "timestamp": now,
            "data": base64::engine::general_purpose::STANDARD.encode(bytes),
        }]}),
        EventKind::Done(_) => vertex(serde_json::json!({"completed": now})),
        EventKind::Failed(msg) => vertex(serde_json::json!({"completed": now, "error": msg})),
    };
    status.to_string()
}

/// A pull or push of one blob as a line of BuildKit's solve status JSON.
fn raw_transfer(id: &str, total: Option<u64>, current: u64, done: bool) -> String {
    let now = timestamp();
    let mut status =
        serde_json::json!({"id": id, "name": id, "current": current, "timestamp": now});
    if let Some(o) = status.as_object_mut() {
        if let Some(t) = total {
            o.insert("total".into(), t.into());
        }
        if done {
            o.insert("completed".into(), now.into());
        }
    }
    serde_json::json!({ "statuses": [status] }).to_string()
}

/// `sha256:0123456789ab…` as Docker shows blobs: twelve hex digits.
fn short_blob(id: &str) -> &str {
    let hex = id.split_once(':').map_or(id, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

impl Transfer for Renderer {
    fn start(&self, id: &str, total: Option<u64>) {
        if self.mode == Mode::Quiet {
            return;
        }
        if self.mode == Mode::Rawjson {
            self.line(&raw_transfer(id, total, 0, false));
        }
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(total.unwrap_or(0)));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(short_blob(id).to_string());
            bar
        });
        self.transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id.to_string(),
                BlobTransfer {
                    bar,
                    started: Instant::now(),
                    bytes: 0,
                },
            );
    }

    fn advance(&self, id: &str, bytes: u64) {
        if let Some(t) = self
            .transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(id)
        {
            t.bytes += bytes;
            if let Some(bar) = &t.bar {
                bar.inc(bytes);
            }
        }
    }

    fn finish(&self, id: &str, how: &str) {
        if self.mode == Mode::Quiet {
            return;
        }
        let entry = self
            .transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if self.mode == Mode::Rawjson {
            let bytes = entry.as_ref().map_or(0, |t| t.bytes);
            self.line(&raw_transfer(id, None, bytes, true));
            return;
        }
        let detail = match entry {
            Some(t) => {
                if let Some(bar) = t.bar {
                    bar.finish_and_clear();
                }
                format!(
                    " {} in {:.1}s",
                    human_size(t.bytes),
                    t.started.elapsed().as_secs_f64()
                )
            }
            None => String::new(),
        };
        self.line(&format!("#0 {} {how}{detail}", short_blob(id)));
    }
}
