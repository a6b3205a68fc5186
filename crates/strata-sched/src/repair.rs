//! Repair as a state machine: the leader tells it which layers a census
//! found short of copies and which copies ended; it answers with the
//! copies to start. No node sends or takes more than `per_node` copies at
//! once, and each copy is paced at the repair rate by whoever carries it
//! out, so no node gives repair more than `per_node` times that rate. A
//! copy starts as soon as its nodes are free, not when the slowest copy
//! of a round ends.

use std::collections::HashMap;

use strata_cas::Digest;

use crate::copies::{Short, plan_repair};
use crate::fleet::Fleet;

/// A layer to bring back to its wanted copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer {
    /// Its blob.
    pub blob: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// A copy to start: `layer` from worker `from` to worker `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The layer.
    pub layer: Layer,
    /// A live holder, which sends it.
    pub from: String,
    /// A live worker lacking it, which takes it.
    pub to: String,
}

/// The copies repair has queued and running.
#[derive(Debug)]
pub struct Repair {
    per_node: usize,
    /// Layers still to look at, in the order the census found them.
    queue: Vec<Layer>,
    running: Vec<Copy>,
    /// Workers a copy of a blob failed to: not chosen for it again.
    failed: HashMap<Digest, Vec<String>>,
}

/// Failed copies remembered at most; past that they are forgotten, and a
/// target that failed may be tried once more.
const FAILED_KEPT: usize = 100_000;

impl Repair {
    /// Repair with each node in at most `per_node` copies at once (at
    /// least one).
    pub fn new(per_node: usize) -> Repair {
        Repair {
            per_node: per_node.max(1),
            queue: Vec::new(),
            running: Vec::new(),
            failed: HashMap::new(),
        }
    }

    /// A census found `layers` short of copies: they replace what was
    /// queued; the copies running go on.
    pub fn found(&mut self, layers: Vec<Layer>) {
        self.queue = layers;
    }

    /// The layers queued, for the driver to look up their holders.
    pub fn queued(&self) -> impl Iterator<Item = &Layer> {
        self.queue.iter()
    }

    /// The copies running.
    pub fn running(&self) -> &[Copy] {
        &self.running
    }

    /// Nothing queued and nothing running.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_empty()
    }

    /// The copy of `blob` to `to` ended; `copied` says whether `to` holds
    /// it now. A layer whose copy failed waits for the next census, and
    /// then goes to another worker: the same copy tried again would
    /// likely fail the same way.
    pub fn ended(&mut self, blob: &Digest, to: &str, copied: bool) {
        self.running
            .retain(|c| !(c.layer.blob == *blob && c.to == to));
        if !copied {
            self.queue.retain(|l| l.blob != *blob);
            if self.failed.len() >= FAILED_KEPT {
                self.failed.clear();
            }
            self.failed.entry(*blob).or_default().push(to.to_string());
        }
    }

    /// The copies to start now, with the fleet as it is: `holders(blob)`
    /// names the live workers holding a queued blob, and `want` copies of
    /// each are wanted. A layer with its copies, or with no live holder
    /// left to copy from, leaves the queue.
    pub fn next<L>(
        &mut self,
        fleet: &Fleet<L>,
        holders: &dyn Fn(&Digest) -> Vec<String>,
        want: usize,
    ) -> Vec<Copy> {
        let mut busy: HashMap<String, usize> = HashMap::new();
        for c in &self.running {
            *busy.entry(c.from.clone()).or_default() += 1;
            *busy.entry(c.to.clone()).or_default() += 1;
        }
        let (running, failed) = (&self.running, &mut self.failed);
        let (mut shorts, mut layers) = (Vec::new(), Vec::new());
        self.queue.retain(|l| {
            let live = holders(&l.blob);
            if live.is_empty() || live.len() >= want {
                failed.remove(&l.blob);
                return false;
            }
            let taking: Vec<String> = running
                .iter()
                .filter(|c| c.layer.blob == l.blob)
                .map(|c| c.to.clone())
                .collect();
            let missing = want.saturating_sub(live.len() + taking.len());
            if missing > 0 {
                // Not a source, nor a target: those taking it now, and
                // those a copy of it failed to.
                let mut not_to = taking;
                not_to.extend(failed.get(&l.blob).into_iter().flatten().cloned());
                shorts.push(Short {
                    holders: live,
                    missing,
                    taking: not_to,
                });
                layers.push(*l);
            }
            true
        });
        let started: Vec<Copy> = plan_repair(fleet, &shorts, self.per_node, busy)
            .into_iter()
            .filter_map(|a| {
                Some(Copy {
                    layer: *layers.get(a.short)?,
                    from: a.from,
                    to: a.to,
                })
            })
            .collect();
        self.running.extend(started.iter().cloned());
        started
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::time::Instant;

    use super::*;
    use crate::fleet::Spec;

    /// Bytes a second each copy is paced at.
    const RATE: u64 = 1 << 20;

    /// A fleet of fake workers on a virtual clock, the layers they hold,
    /// and the copies repair started, each ending `size / RATE` seconds
    /// after it started.
    struct Scenario {
        fleet: Fleet<()>,
        held: BTreeMap<Digest, HashSet<String>>,
        /// Copies under way: when each ends, what it is, and whether it
        /// fails.
        under_way: Vec<(f64, Copy, bool)>,
        now: f64,
        /// Workers whose copies fail.
        broken: HashSet<String>,
        /// The most copies a node was in at once, and the bytes each node
        /// sent or took.
        most_at_once: usize,
        moved: HashMap<String, u64>,
        copies_made: usize,
    }

    impl Scenario {
        fn new(workers: usize, layers: usize, copies: usize) -> Scenario {
            let mut fleet = Fleet::default();
            for w in 0..workers {
                let spec = Spec {
                    slots: 4,
                    ..Spec::default()
                };
                fleet.register(&format!("w{w}"), spec, 1, (), Instant::now());
            }
            let held = (0..layers)
                .map(|i| {
                    let on = (0..copies).map(|c| format!("w{}", (i * 7 + c * 13) % workers));
                    (Digest::of(&i.to_le_bytes()), on.collect())
                })
                .collect();
            Scenario {
                fleet,
                held,
                under_way: Vec::new(),
                now: 0.0,
                broken: HashSet::new(),
                most_at_once: 0,
                moved: HashMap::new(),
                copies_made: 0,
            }
        }

        fn lose(&mut self, worker: &str) {
            self.fleet.lose(worker, 1);
            for on in self.held.values_mut() {
                on.remove(worker);
            }
        }

        fn live_holders(&self, blob: &Digest) -> Vec<String> {
            let mut on: Vec<String> = self.held.get(blob).into_iter().flatten().cloned().collect();
            on.sort();
            on
        }

        /// What a census finds: the layers with fewer than `want` copies.
        fn census(&self, want: usize) -> Vec<Layer> {
            self.held
                .iter()
                .filter(|(_, on)| on.len() < want)
                .map(|(blob, _)| Layer {
                    blob: *blob,
                    size: 3 * RATE + u64::from(blob.0[0]) * 4096,
                })
                .collect()
        }

        /// Drives `repair` as the leader's driver does until it is idle,
        /// taking a census whenever it runs dry; returns the virtual
        /// seconds it took.
        fn run(&mut self, repair: &mut Repair, want: usize) -> f64 {
            repair.found(self.census(want));
            let mut censuses = 1;
            loop {
                let holders: HashMap<Digest, Vec<String>> = repair
                    .queued()
                    .map(|l| (l.blob, self.live_holders(&l.blob)))
                    .collect();
                let started = repair.next(
                    &self.fleet,
                    &|b| holders.get(b).cloned().unwrap_or_default(),
                    want,
                );
                for c in started {
                    let ends = self.now + c.layer.size as f64 / RATE as f64;
                    let fails = self.broken.contains(&c.to);
                    self.under_way.push((ends, c, fails));
                }
                let mut at_once: HashMap<&str, usize> = HashMap::new();
                for (_, c, _) in &self.under_way {
                    *at_once.entry(&c.from).or_default() += 1;
                    *at_once.entry(&c.to).or_default() += 1;
                }
                self.most_at_once = self
                    .most_at_once
                    .max(at_once.values().copied().max().unwrap_or(0));
                // The next copy to end.
                let Some(first) = (0..self.under_way.len())
                    .min_by(|&a, &b| self.under_way[a].0.total_cmp(&self.under_way[b].0))
                else {
                    // Nothing under way: the next census looks again, as
                    // the leader's does every few seconds.
                    let again = self.census(want);
                    let copyable = again.iter().any(|l| !self.live_holders(&l.blob).is_empty());
                    if !copyable || censuses > 3 {
                        return self.now;
                    }
                    repair.found(again);
                    censuses += 1;
                    continue;
                };
                let (ends, c, fails) = self.under_way.swap_remove(first);
                self.now = ends;
                if !fails {
                    self.held
                        .entry(c.layer.blob)
                        .or_default()
                        .insert(c.to.clone());
                    self.copies_made += 1;
                    for n in [&c.from, &c.to] {
                        *self.moved.entry(n.clone()).or_default() += c.layer.size;
                    }
                }
                repair.ended(&c.layer.blob, &c.to, !fails);
            }
        }
    }

    #[test]
    fn losing_a_tenth_of_a_fleet_is_repaired_exactly_within_the_rate_bound() {
        let mut s = Scenario::new(100, 2_000, 2);
        for w in (0..100).step_by(10) {
            s.lose(&format!("w{w}"));
        }
        let want = 2;
        let short = s.census(want);
        assert!(short.len() > 300, "{}", short.len());
        let mut repair = Repair::new(1);
        let took = s.run(&mut repair, want);
        // Every layer has its copies again, and no more: each short layer
        // was copied exactly once.
        assert!(s.held.values().all(|on| on.len() == want));
        assert_eq!(s.copies_made, short.len());
        // No node was in two copies at once: none gave repair more than
        // the rate, in any second.
        assert_eq!(s.most_at_once, 1);
        let busiest = s.moved.values().copied().max().unwrap_or(0);
        assert!(
            busiest as f64 <= took * RATE as f64,
            "{busiest} bytes in {took} s"
        );
        // Copies start as nodes free up, so the fleet repairs in parallel:
        // far faster than one copy at a time.
        let serial: f64 = short.iter().map(|l| l.size as f64 / RATE as f64).sum();
        assert!(
            took < serial / 10.0,
            "{took} s against {serial} s one at a time"
        );
    }

    #[test]
    fn a_copy_that_fails_waits_for_the_next_census_and_a_layer_with_no_live_copy_is_left() {
        let mut s = Scenario::new(6, 40, 1);
        // w0 is lost: what only it held has nothing to copy from.
        s.lose("w0");
        let orphans = s.held.values().filter(|on| on.is_empty()).count();
        assert!(orphans > 0);
        // w5 takes no copy: every copy to it fails, and is not tried again
        // until a census finds the layer short again.
        s.broken.insert("w5".into());
        let on_w5 = |s: &Scenario| s.held.values().filter(|on| on.contains("w5")).count();
        let before = on_w5(&s);
        let mut repair = Repair::new(2);
        s.run(&mut repair, 2);
        assert!(repair.is_idle());
        assert!(s.most_at_once <= 2);
        let copied = s.held.values().filter(|on| on.len() == 2).count();
        assert_eq!(copied, 40 - orphans);
        assert_eq!(on_w5(&s), before);
        assert_eq!(s.held.values().filter(|on| on.is_empty()).count(), orphans);
    }
}
