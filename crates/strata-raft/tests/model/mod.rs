//! What the replicated index must look like from outside, and a check that
//! a recorded history does.
//!
//! * [`linearizable`]: a Wing–Gong search as Lowe improved it (the search
//!   Knossos and Porcupine make): is there an order of the calls, each
//!   taking effect at one moment between its start and its end, in which
//!   every call returns what the sequential model says? A call whose
//!   answer never came (its member was killed, the network cut) may take
//!   effect at any moment after its start, or never. States already seen
//!   with the same calls taken are not searched again; the search keeps
//!   its own stack, so a long history cannot overflow the thread's.
//! * The models: a cache entry ([`Entry`]) and a worker's record and what
//!   it holds ([`Worker`]), as `store.rs` applies the commands. The index
//!   is checked one object at a time (linearizability is local: a history
//!   is linearizable if and only if each object's is).

#![allow(dead_code)]

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    /// The object's state.
    type State: Clone + Eq + Hash + Debug;
    /// What a call asks.
    type Op: Debug + Clone;
    /// What a call answered.
    type Ret: Debug + PartialEq + Clone;
    /// The state before any call.
    fn init(&self) -> Self::State;
    /// The state after `op` took effect in `state`, if it could have
    /// answered `ret` there (`None` for `ret`: the answer is unknown).
    fn step(
        &self,
        state: &Self::State,
        op: &Self::Op,
        ret: Option<&Self::Ret>,
    ) -> Option<Self::State>;
    /// Whether a read `read` answering `ret` saw `write`'s own effect
    /// (values are unique, so that read came after the write took effect).
    fn witnessed(&self, _write: &Self::Op, _read: &Self::Op, _ret: &Self::Ret) -> bool {
        false
    }
    /// Whether `op`, if no read [witnessed](Self::witnessed) it, left
    /// nothing any read could tell: a write of a unique value overwritten
    /// before anyone read it.
    fn unseen_is_nothing(&self, _op: &Self::Op) -> bool {
        false
    }
}

/// The history with every unanswered call the model can place made
/// answered: one a read witnessed took effect before that read ended, so
/// it ends then at the latest; one no read witnessed and that leaves
/// nothing else to see is dropped (it may as well never have happened).
/// The search then meets few calls that may land anywhere, each of which
/// multiplies its work.
fn tighten<M: Model>(model: &M, history: &[Call<M::Op, M::Ret>]) -> Vec<Call<M::Op, M::Ret>> {
    let reads: Vec<&Call<M::Op, M::Ret>> = history
        .iter()
        .filter(|c| c.end.is_some() && c.ret.is_some())
        .collect();
    let mut out = Vec::with_capacity(history.len());
    for c in history {
        if c.end.is_some() {
            out.push(c.clone());
            continue;
        }
        let seen_by = reads
            .iter()
            .filter(|r| {
                r.ret
                    .as_ref()
                    .is_some_and(|ret| model.witnessed(&c.op, &r.op, ret))
            })
            .filter_map(|r| r.end)
            .min();
        match seen_by {
            Some(end) => out.push(Call {
                end: Some(end.max(c.start)),
                ..c.clone()
            }),
            None if model.unseen_is_nothing(&c.op) => {}
            None => out.push(c.clone()),
        }
    }
    out
}

/// One call of a history: asked at `start`, answered `ret` at `end` (in
/// any unit, from one clock). No `end`: it was never answered.
#[derive(Debug, Clone)]
pub struct Call<O, R> {
    pub start: u64,
    pub end: Option<u64>,
    pub op: O,
    pub ret: Option<R>,
}

/// Why a history is not linearizable: the call that no order could fit,
/// with how far the deepest order got.
#[derive(Debug)]
pub struct Anomaly {
    pub call: String,
    pub linearized: usize,
    pub of: usize,
}

impl std::fmt::Display for Anomaly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no order of the calls explains {} (the deepest order placed {} of {} calls)",
            self.call, self.linearized, self.of
        )
    }
}

/// How many states the search may visit before giving up: a bound, so a
/// pathological history fails with a message instead of running forever.
pub const SEARCH_LIMIT: usize = 20_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Invoke,
    Return,
}

/// Checks `history` against `model`.
pub fn linearizable<M: Model>(model: &M, history: &[Call<M::Op, M::Ret>]) -> Result<(), Anomaly> {
    let history = &tighten(model, history)[..];
    // The events in time order, a call's start before any end at the same
    // moment (touching calls count as concurrent: the clock is coarser
    // than the network). Node 0 is the list's head.
    let mut events: Vec<(u64, Kind, usize)> = Vec::with_capacity(history.len() * 2);
    for (i, c) in history.iter().enumerate() {
        events.push((c.start, Kind::Invoke, i));
        if let Some(end) = c.end {
            events.push((end, Kind::Return, i));
        }
    }
    events.sort_by_key(|(t, k, i)| (*t, *k == Kind::Return, *i));
    let n = events.len();
    let (mut next, mut prev) = (vec![0usize; n + 1], vec![0usize; n + 1]);
    let mut invoke_at = vec![usize::MAX; history.len()];
    let mut return_at = vec![usize::MAX; history.len()];
    for (pos, (_, kind, call)) in events.iter().enumerate() {
        let node = pos + 1;
        prev[node] = pos;
        next[pos] = node;
        match kind {
            Kind::Invoke => invoke_at[*call] = node,
            Kind::Return => return_at[*call] = node,
        }
    }
    next[n] = usize::MAX;
    let event = |node: usize| events[node - 1];

    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, q) = (prev[node], next[node]);
        next[p] = q;
        if q != usize::MAX {
            prev[q] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, q) = (prev[node], next[node]);
        next[p] = node;
        if q != usize::MAX {
            prev[q] = node;
        }
    };

    let words = history.len().div_ceil(64);
    let mut taken = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut returns_left = history.iter().filter(|c| c.end.is_some()).count();
    let mut deepest = (0usize, None::<usize>);
    let mut node = next[0];
    let mut visited = 0usize;
    loop {
        if returns_left == 0 {
            return Ok(());
        }
        visited += 1;
        if visited > SEARCH_LIMIT {
            return Err(Anomaly {
                call: format!("the history (the search passed {SEARCH_LIMIT} states)"),
                linearized: deepest.0,
                of: history.len(),
            });
        }
        let backtrack = if node == usize::MAX {
            true
        } else {
            let (_, kind, call) = event(node);
            match kind {
                Kind::Invoke => {
                    let c = &history[call];
                    let stepped = model.step(&state, &c.op, c.ret.as_ref());
                    let fresh = stepped.as_ref().and_then(|s| {
                        let mut t = taken.clone();
                        t[call / 64] |= 1 << (call % 64);
                        seen.insert((t, s.clone())).then_some(())
                    });
                    match (stepped, fresh) {
                        (Some(s), Some(())) => {
                            stack.push((call, std::mem::replace(&mut state, s)));
                            taken[call / 64] |= 1 << (call % 64);
                            unlink(&mut next, &mut prev, node);
                            if return_at[call] != usize::MAX {
                                unlink(&mut next, &mut prev, return_at[call]);
                                returns_left -= 1;
                            }
                            if stack.len() > deepest.0 {
                                deepest = (stack.len(), None);
                            }
                            node = next[0];
                        }
                        _ => node = next[node],
                    }
                    false
                }
                Kind::Return => {
                    if stack.len() == deepest.0 && deepest.1.is_none() {
                        deepest.1 = Some(call);
                    }
                    true
                }
            }
        };
        if backtrack {
            let Some((call, before)) = stack.pop() else {
                let call = deepest.1.map_or_else(
                    || "the history".to_string(),
                    |i| format!("{:?} answering {:?}", history[i].op, history[i].ret),
                );
                return Err(Anomaly {
                    call,
                    linearized: deepest.0,
                    of: history.len(),
                });
            };
            state = before;
            taken[call / 64] &= !(1 << (call % 64));
            if return_at[call] != usize::MAX {
                relink(&mut next, &mut prev, return_at[call]);
                returns_left += 1;
            }
            relink(&mut next, &mut prev, invoke_at[call]);
            node = next[invoke_at[call]];
        }
    }
}

/// A cache entry, as far as the history tells them apart: its version
/// (in `created`) and when it was last used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    pub created: u64,
    pub last_used: u64,
}

/// What is done to one cache key.
#[derive(Debug, Clone)]
pub enum EntryOp {
    Put(u64),
    Touch(u64),
    Remove,
    Read,
}

/// One cache key: `Put` of version `v` records `(v, v)`; `Touch` moves
/// `last_used` forward only; `Remove` drops it; a read answers it.
pub struct Entry;

impl Model for Entry {
    type State = Option<Version>;
    type Op = EntryOp;
    type Ret = Option<Version>;

    fn init(&self) -> Option<Version> {
        None
    }

    fn step(
        &self,
        state: &Option<Version>,
        op: &EntryOp,
        ret: Option<&Option<Version>>,
    ) -> Option<Option<Version>> {
        match op {
            EntryOp::Put(v) => Some(Some(Version {
                created: *v,
                last_used: *v,
            })),
            EntryOp::Touch(at) => Some(state.map(|e| Version {
                last_used: e.last_used.max(*at),
                ..e
            })),
            EntryOp::Remove => Some(None),
            EntryOp::Read => (ret.is_none_or(|r| r == state)).then_some(*state),
        }
    }

    fn witnessed(&self, write: &EntryOp, read: &EntryOp, ret: &Option<Version>) -> bool {
        match (write, read, ret) {
            (EntryOp::Put(v), EntryOp::Read, Some(seen)) => seen.created == *v,
            (EntryOp::Touch(at), EntryOp::Read, Some(seen)) => seen.last_used == *at,
            _ => false,
        }
    }

    /// Versions and touch times are unique in a history.
    fn unseen_is_nothing(&self, op: &EntryOp) -> bool {
        matches!(op, EntryOp::Put(_) | EntryOp::Touch(_))
    }
}

/// A worker as the index records it: its registration, if any, and which
/// of the history's blobs (bit `i`: blob `i`) it is recorded to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Held {
    pub registered: Option<u64>,
    pub blobs: u32,
}

/// What is done to one worker's records.
#[derive(Debug, Clone)]
pub enum WorkerOp {
    Registered {
        at: u64,
        blobs: u32,
    },
    Held {
        registration: u64,
        blobs: u32,
    },
    Lost {
        registration: u64,
        blobs: u32,
    },
    Forget {
        registered: u64,
    },
    /// Reads its registration.
    ReadRecord,
    /// Reads whether it is among blob `i`'s holders.
    ReadHolds(u32),
}

/// What a read of a worker answered.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerRet {
    Record(Option<u64>),
    Holds(bool),
}

/// One worker, as `store.rs` applies its commands: a registration replaces
/// what it held; blobs gained count unless a later registration is
/// recorded; blobs lost count only in the recorded registration; a forget
/// of another registration than the recorded one does nothing.
pub struct Worker;

impl Model for Worker {
    type State = Held;
    type Op = WorkerOp;
    type Ret = WorkerRet;

    fn init(&self) -> Held {
        Held {
            registered: None,
            blobs: 0,
        }
    }

    fn witnessed(&self, write: &WorkerOp, read: &WorkerOp, ret: &WorkerRet) -> bool {
        matches!(
            (write, read, ret),
            (WorkerOp::Registered { at, .. }, WorkerOp::ReadRecord, WorkerRet::Record(Some(r))) if r == at
        )
    }

    fn step(&self, s: &Held, op: &WorkerOp, ret: Option<&WorkerRet>) -> Option<Held> {
        let s = *s;
        Some(match op {
            // A registration older than the recorded one is dropped; the
            // recorded one gains; a new one replaces.
            WorkerOp::Registered { at, blobs } => match s.registered {
                Some(r) if r > *at => s,
                Some(r) if r == *at => Held {
                    blobs: s.blobs | blobs,
                    ..s
                },
                _ => Held {
                    registered: Some(*at),
                    blobs: *blobs,
                },
            },
            // A location of an older run is dropped; one of a run not
            // recorded yet starts it.
            WorkerOp::Held {
                registration,
                blobs,
            } => match s.registered {
                Some(r) if r > *registration => s,
                Some(r) if r == *registration => Held {
                    blobs: s.blobs | blobs,
                    ..s
                },
                _ => Held {
                    registered: Some(*registration),
                    blobs: *blobs,
                },
            },
            WorkerOp::Lost {
                registration,
                blobs,
            } => {
                if s.registered == Some(*registration) {
                    Held {
                        blobs: s.blobs & !blobs,
                        ..s
                    }
                } else {
                    s
                }
            }
            WorkerOp::Forget { registered } => {
                if s.registered.is_some_and(|r| r != *registered) {
                    s
                } else {
                    Held {
                        registered: None,
                        blobs: 0,
                    }
                }
            }
            WorkerOp::ReadRecord => {
                if ret.is_some_and(|r| *r != WorkerRet::Record(s.registered)) {
                    return None;
                }
                s
            }
            WorkerOp::ReadHolds(i) => {
                if ret.is_some_and(|r| *r != WorkerRet::Holds(s.blobs & (1 << i) != 0)) {
                    return None;
                }
                s
            }
        })
    }
}
