//! Repair as a state machine: the leader tells it which layers a census
//! found short of copies and which copies ended; it answers with the
//! copies to start. No node sends or takes more than `per_node` copies at
//! once, and each copy is paced at the repair rate by whoever carries it
//! out, so no node gives repair more than `per_node` times that rate. A
//! copy starts as soon as its nodes are free, not when the slowest copy
//! of a round ends.

use std::collections::{HashMap, HashSet, VecDeque};

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
///
/// Each call looks only at the front of the queue, as many layers as the
/// free workers could take copies of, and asks the driver only for the
/// holders of layers it has not seen (the driver's lookup reads the
/// replicated state): a repair of tens of thousands of layers costs about
/// the same per copy as one of ten.
#[derive(Debug)]
pub struct Repair {
    per_node: usize,
    /// Layers to look at, in the order the census found them; a layer
    /// whose copies all run waits in `in_flight` instead.
    queue: VecDeque<Queued>,
    in_flight: HashMap<Digest, Layer>,
    running: Vec<Copy>,
    /// Workers a copy of a blob failed to: not chosen for it again.
    failed: HashMap<Digest, Vec<String>>,
    /// Queued layers a copy of which ended since their holders were
    /// looked up: looked up again.
    stale: HashSet<Digest>,
}

/// A layer in the queue, and the workers holding it when last looked up
/// (those since gone are left out as the fleet says).
#[derive(Debug)]
struct Queued {
    layer: Layer,
    holders: Option<Vec<String>>,
}

impl Queued {
    fn new(layer: Layer) -> Queued {
        Queued {
            layer,
            holders: None,
        }
    }
}

/// Failed copies remembered at most; past that they are forgotten, and a
/// target that failed may be tried once more.
const FAILED_KEPT: usize = 100_000;

/// Layers looked at per free worker, and at least: enough that sources
/// busy with other copies do not leave free workers idle.
const LOOK_PER_FREE: usize = 4;
const LOOK_AT_LEAST: usize = 64;

impl Repair {
    /// Repair with each node in at most `per_node` copies at once (at
    /// least one).
    pub fn new(per_node: usize) -> Repair {
        Repair {
            per_node: per_node.max(1),
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            running: Vec::new(),
            failed: HashMap::new(),
            stale: HashSet::new(),
        }
    }

    /// A census found `layers` short of copies: they replace what was
    /// queued; the copies running go on.
    pub fn found(&mut self, layers: Vec<Layer>) {
        self.stale.clear();
        self.queue = layers
            .into_iter()
            .filter(|l| !self.in_flight.contains_key(&l.blob))
            .map(Queued::new)
            .collect();
    }

    /// The layers whose holders [`Repair::next`] needs with `fleet` as it
    /// is: those at the front of the queue not looked up yet.
    pub fn to_look_up<L>(&self, fleet: &Fleet<L>) -> impl Iterator<Item = &Layer> {
        self.queue
            .iter()
            .take(self.window(fleet, &self.busy()))
            .filter(|q| q.holders.is_none() || self.stale.contains(&q.layer.blob))
            .map(|q| &q.layer)
    }

    /// The copies each node is in now.
    fn busy(&self) -> HashMap<String, usize> {
        let mut busy: HashMap<String, usize> = HashMap::new();
        for c in &self.running {
            *busy.entry(c.from.clone()).or_default() += 1;
            *busy.entry(c.to.clone()).or_default() += 1;
        }
        busy
    }

    /// Layers to look at with the nodes `busy` says are in copies.
    fn window<L>(&self, fleet: &Fleet<L>, busy: &HashMap<String, usize>) -> usize {
        let full = busy
            .iter()
            .filter(|(n, k)| **k >= self.per_node && fleet.live(n).is_some())
            .count();
        let free = fleet.live_count().saturating_sub(full);
        (free * LOOK_PER_FREE).max(LOOK_AT_LEAST)
    }

    /// Nothing queued and nothing running.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_empty()
    }

    /// The copy of `blob` to `to` ended; `copied` says whether `to` holds
    /// it now. Once a layer's copies have all ended it is looked at again
    /// first (it may want more); a layer whose copy failed waits for the
    /// next census instead, and then goes to another worker: the same
    /// copy tried again would likely fail the same way.
    pub fn ended(&mut self, blob: &Digest, to: &str, copied: bool) {
        self.running
            .retain(|c| !(c.layer.blob == *blob && c.to == to));
        if !copied {
            if self.failed.len() >= FAILED_KEPT {
                self.failed.clear();
            }
            self.failed.entry(*blob).or_default().push(to.to_string());
        }
        if self.running.iter().any(|c| c.layer.blob == *blob) {
            return;
        }
        match self.in_flight.remove(blob) {
            Some(layer) if !self.failed.contains_key(blob) => {
                self.queue.push_front(Queued::new(layer));
            }
            Some(_) => {}
            // Still queued, for more copies than ran: what it told of
            // the layer's holders is out of date.
            None => {
                self.stale.insert(*blob);
            }
        }
    }

    /// The copies to start now, with the fleet as it is: `holders(blob)`
    /// names the workers holding a layer [`Repair::to_look_up`] gave
    /// (`None` for another), and `want` copies of each are wanted. A
    /// layer with its copies, or with no live holder left to copy from,
    /// leaves the queue.
    pub fn next<L>(
        &mut self,
        fleet: &Fleet<L>,
        holders: &dyn Fn(&Digest) -> Option<Vec<String>>,
        want: usize,
    ) -> Vec<Copy> {
        let busy = self.busy();
        let mut taking: HashMap<Digest, Vec<String>> = HashMap::new();
        for c in &self.running {
            taking.entry(c.layer.blob).or_default().push(c.to.clone());
        }
        let n = self.window(fleet, &busy).min(self.queue.len());
        let (mut shorts, mut looked, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        for mut q in self.queue.drain(..n) {
            let known = q
                .holders
                .take()
                .filter(|_| !self.stale.remove(&q.layer.blob));
            let Some(mut live) = known.or_else(|| holders(&q.layer.blob)) else {
                kept.push(q);
                continue;
            };
            live.retain(|h| fleet.live(h).is_some());
            if live.is_empty() || live.len() >= want {
                self.failed.remove(&q.layer.blob);
                continue;
            }
            // Every holder busy: nothing to copy from until one ends.
            if live
                .iter()
                .all(|h| busy.get(h).copied().unwrap_or(0) >= self.per_node)
            {
                q.holders = Some(live);
                kept.push(q);
                continue;
            }
            let taking = taking.get(&q.layer.blob).cloned().unwrap_or_default();
            let missing = want.saturating_sub(live.len() + taking.len());
            // Not a source, nor a target: those taking it now, and those
            // a copy of it failed to.
            let mut not_to = taking;
            not_to.extend(
                self.failed
                    .get(&q.layer.blob)
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
            q.holders = Some(live.clone());
            shorts.push(Short {
                holders: live,
                missing,
                taking: not_to,
            });
            looked.push(q);
        }
        let started: Vec<Copy> = plan_repair(fleet, &shorts, self.per_node, busy)
            .into_iter()
            .filter_map(|a| {
                Some(Copy {
                    layer: looked.get(a.short)?.layer,
                    from: a.from,
                    to: a.to,
                })
            })
            .collect();
        // A layer all of whose missing copies now run waits for them to
        // end; the others keep their place at the front.
        let mut placed: HashMap<Digest, usize> = HashMap::new();
        for c in &started {
            *placed.entry(c.layer.blob).or_default() += 1;
        }
        for (q, short) in looked.into_iter().zip(&shorts) {
            let now_running = placed.get(&q.layer.blob).copied().unwrap_or(0);
            let all_run = short.missing <= now_running;
            if all_run && (now_running > 0 || taking.contains_key(&q.layer.blob)) {
                self.in_flight.insert(q.layer.blob, q.layer);
            } else {
                kept.push(q);
            }
        }
        for q in kept.into_iter().rev() {
            self.queue.push_front(q);
        }
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
        /// Holders the driver looked up.
        lookups: usize,
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
                lookups: 0,
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
                    .to_look_up(&self.fleet)
                    .map(|l| (l.blob, self.live_holders(&l.blob)))
                    .collect();
                self.lookups += holders.len();
                let started = repair.next(&self.fleet, &|b| holders.get(b).cloned(), want);
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
    fn a_layer_short_of_two_copies_is_looked_up_again_after_its_first_copy() {
        let mut fleet = Fleet::default();
        for w in 0..5 {
            fleet.register(&format!("w{w}"), Spec::default(), 1, (), Instant::now());
        }
        let layer = Layer {
            blob: Digest::of(b"layer"),
            size: 1,
        };
        let mut holders = vec!["w0".to_string()];
        let mut repair = Repair::new(1);
        repair.found(vec![layer]);
        let mut made = Vec::new();
        for _ in 0..4 {
            let asked: Vec<Digest> = repair.to_look_up(&fleet).map(|l| l.blob).collect();
            let known = holders.clone();
            let started = repair.next(&fleet, &|b| asked.contains(b).then(|| known.clone()), 3);
            // One source: one copy at a time, each to a worker lacking it.
            assert!(started.len() <= 1, "{started:?}");
            for c in started {
                assert!(!holders.contains(&c.to), "{} holds it already", c.to);
                holders.push(c.to.clone());
                made.push(c.to.clone());
                repair.ended(&c.layer.blob, &c.to, true);
            }
        }
        assert_eq!(made.len(), 2, "{made:?}");
        assert!(repair.is_idle());
    }

    #[test]
    fn each_copy_looks_at_a_bounded_part_of_the_queue_however_long() {
        let mut s = Scenario::new(100, 10_000, 2);
        for w in (0..100).step_by(10) {
            s.lose(&format!("w{w}"));
        }
        let short = s.census(2).len();
        assert!(short > 1_500, "{short}");
        let mut repair = Repair::new(1);
        s.run(&mut repair, 2);
        assert_eq!(s.copies_made, short);
        // Looking up the whole queue each time would be about short² / 2
        // lookups: over a million here. Each layer is looked up when
        // found and again after its copy.
        assert!(
            s.lookups <= 2 * short,
            "{} lookups for {short} layers",
            s.lookups
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
