//! A fleet simulation: strata's scheduling core (`strata-sched`, the code
//! the coordinator runs to register workers, place stages, copy layers and
//! evict them) driven on a virtual clock by 100 to 1,000 simulated workers
//! and a synthetic CI trace, under each placement policy. BuildKit's
//! `loadbalance=sticky` (what a buildx user on Kubernetes has today) is
//! the baseline every ratio is against.
//!
//! The trace: services of Zipf-distributed popularity, each built on one
//! of a few base images through a dependency stage that a family of
//! services shares and that changes with few commits, then a build stage
//! that every new commit changes; a quarter of builds are of a commit
//! built before (a retry, a second pipeline). Workers have slots, a
//! bounded store and a 1 Gbit/s link; one is replaced every thousand
//! builds, and 5% are lost at once halfway through.
//!
//! `cargo bench -p strata-benches --bench fleet_sim` (`-- --quick`: only
//! 100 workers). What it measures is what the core decides, not the
//! network: transfers cost their size over the link, steps their
//! duration.

#![allow(clippy::print_stdout)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use strata_cas::Digest;
use strata_plan::Entitlements;
use strata_sched::repair::{self, Repair};
use strata_sched::{Candidate, Fleet, Keep, Policy, Spec, Ticket, Want, copies, evict, place};

const SLOTS: usize = 4;
/// Bytes per second over a worker's link (1 Gbit/s).
const LINK: f64 = 125e6;
/// The coordinator's defaults: copies per layer, and repair's rate.
const REPLICATION: usize = 2;
const REPAIR_RATE: f64 = 64.0 * 1024.0 * 1024.0;
/// Copies a node is in at once during repair, as the coordinator's.
const REPAIR_COPIES_PER_NODE: usize = 1;
/// Each worker's `keep_storage`.
const KEEP_STORAGE: u64 = 8 << 30;
const BASES: usize = 8;
const SERVICES: usize = 400;
const FAMILIES: usize = 100;
const ZIPF_S: f64 = 1.1;
/// A build of a commit built before.
const RERUN: f64 = 0.25;
/// A commit that changes its family's dependencies.
const DEPS_CHANGE: f64 = 0.02;
const DEPS_SECONDS: f64 = 45.0;
const DEPS_BYTES: u64 = 150_000_000;
const BUILD_SECONDS: f64 = 12.0;
const BUILD_BYTES: u64 = 25_000_000;
/// Share of the fleet's slots the trace keeps busy on average.
const UTILIZATION: f64 = 0.6;
/// A worker replaced every this many builds.
const CHURN_EVERY: usize = 1_000;
/// Share of workers lost at once, halfway.
const LOSS: f64 = 0.05;

struct Layer {
    size: u64,
    holders: Vec<u32>,
}

struct SimWorker {
    name: String,
    epoch: u64,
    /// Layer → when last used (simulated seconds).
    held: HashMap<u64, u64>,
    bytes: u64,
    /// Layers running stages read.
    in_use: HashMap<u64, u32>,
}

struct Build {
    service: usize,
    deps_key: u64,
    build_key: u64,
    /// The deps stage's layer once known, and where it ran in this build.
    deps: Option<u64>,
    deps_worker: Option<String>,
}

#[derive(Clone, Copy)]
struct Pending {
    build: usize,
    stage: u8,
    ready: f64,
}

enum Event {
    Arrive,
    Done {
        build: usize,
        stage: u8,
        worker: u32,
        epoch: u64,
        ticket: usize,
        inputs: [Option<u64>; 2],
    },
}

#[derive(Default)]
struct Stats {
    lookups: u64,
    hits: u64,
    /// Fetched by workers for the steps they run: from peers, from
    /// registries.
    peer_bytes: u64,
    registry_bytes: u64,
    /// Copies made so each new layer has its replicas.
    copy_bytes: u64,
    waits: Vec<f64>,
    index_writes: u64,
    repair_bytes: u64,
    repair_lost_entries: u64,
    rescheduled: u64,
    finished: usize,
    end: f64,
}

struct Sim {
    policy: Policy,
    rng: SmallRng,
    t0: Instant,
    now: f64,
    fleet: Fleet<u32>,
    workers: Vec<SimWorker>,
    layers: Vec<Layer>,
    index: HashMap<u64, u64>,
    /// Steps running, by key, and the builds waiting on each: identical
    /// steps in flight run once, as the solver runs them.
    flights: HashMap<u64, Vec<(usize, u8)>>,
    /// Layers evicted below their copies on purpose.
    shrunk: copies::Shrunk,
    builds: Vec<Build>,
    queue: VecDeque<Pending>,
    events: BinaryHeap<(Reverse<u64>, Reverse<u64>, usize)>,
    /// Under the sticky policy, what waits for each worker's slots.
    waiting: Vec<VecDeque<Pending>>,
    slab: Vec<Option<Event>>,
    tickets: Vec<Option<Ticket>>,
    seq: u64,
    zipf: Vec<f64>,
    commits: Vec<u64>,
    deps_versions: Vec<u64>,
    stats: Stats,
    none: Entitlements,
}

fn key(parts: &[u64]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(&p.to_le_bytes());
    }
    let b = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&b.as_bytes()[..8]);
    u64::from_le_bytes(out)
}

fn digest(layer: u64) -> Digest {
    let mut d = [0u8; 32];
    d[..8].copy_from_slice(&layer.to_le_bytes());
    Digest(d)
}

fn layer_of(d: &Digest) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.0[..8]);
    u64::from_le_bytes(b)
}

impl Sim {
    fn new(policy: Policy, workers: usize, seed: u64) -> Sim {
        let t0 = Instant::now();
        let mut fleet = Fleet::default();
        let mut sims = Vec::new();
        for i in 0..workers {
            let name = format!("w{i:04}");
            fleet.register(&name, spec(), 1, i as u32, t0);
            sims.push(SimWorker {
                name,
                epoch: 1,
                held: HashMap::new(),
                bytes: 0,
                in_use: HashMap::new(),
            });
        }
        let layers = (0..BASES)
            .map(|b| Layer {
                size: 80_000_000 + 40_000_000 * b as u64,
                holders: Vec::new(),
            })
            .collect();
        let mut zipf: Vec<f64> = (1..=SERVICES)
            .map(|k| 1.0 / (k as f64).powf(ZIPF_S))
            .collect();
        let total: f64 = zipf.iter().sum();
        let mut acc = 0.0;
        for z in &mut zipf {
            acc += *z / total;
            *z = acc;
        }
        Sim {
            policy,
            rng: SmallRng::seed_from_u64(seed),
            t0,
            now: 0.0,
            fleet,
            workers: sims,
            layers,
            index: HashMap::new(),
            flights: HashMap::new(),
            shrunk: copies::Shrunk::default(),
            builds: Vec::new(),
            queue: VecDeque::new(),
            events: BinaryHeap::new(),
            waiting: (0..workers).map(|_| VecDeque::new()).collect(),
            slab: Vec::new(),
            tickets: Vec::new(),
            seq: 0,
            zipf,
            commits: vec![0; SERVICES],
            deps_versions: vec![0; FAMILIES],
            stats: Stats::default(),
            none: Entitlements::new(),
        }
    }

    fn at(&mut self, t: f64, e: Event) {
        self.seq += 1;
        self.slab.push(Some(e));
        self.events.push((
            Reverse((t * 1e6) as u64),
            Reverse(self.seq),
            self.slab.len() - 1,
        ));
    }

    fn instant(&self) -> Instant {
        self.t0 + Duration::from_secs_f64(self.now)
    }

    fn live(&self, w: u32) -> bool {
        let s = &self.workers[w as usize];
        self.fleet
            .get(&s.name)
            .is_some_and(|m| m.alive() && m.epoch() == s.epoch)
    }

    fn live_holders(&self, layer: u64) -> usize {
        self.layers[layer as usize]
            .holders
            .iter()
            .filter(|&&w| self.live(w))
            .count()
    }

    fn arrive(&mut self) {
        let u: f64 = self.rng.random();
        let service = self.zipf.partition_point(|&c| c < u).min(SERVICES - 1);
        let family = service % FAMILIES;
        if self.rng.random::<f64>() >= RERUN || self.commits[service] == 0 {
            self.commits[service] += 1;
            if self.rng.random::<f64>() < DEPS_CHANGE {
                self.deps_versions[family] += 1;
            }
        }
        let base = (family % BASES) as u64;
        let deps_key = key(&[1, family as u64, self.deps_versions[family], base]);
        let build_key = key(&[2, service as u64, self.commits[service], deps_key]);
        self.builds.push(Build {
            service,
            deps_key,
            build_key,
            deps: None,
            deps_worker: None,
        });
        self.ready(self.builds.len() - 1, 0);
    }

    /// A cached result whose layer some live worker holds.
    fn hit(&mut self, k: u64) -> Option<u64> {
        self.stats.lookups += 1;
        let layer = *self.index.get(&k)?;
        if self.live_holders(layer) == 0 {
            // An orphan: no one holds it any more; the index drops it.
            self.index.remove(&k);
            self.stats.index_writes += 1;
            return None;
        }
        self.stats.hits += 1;
        Some(layer)
    }

    fn ready(&mut self, build: usize, stage: u8) {
        let k = if stage == 0 {
            self.builds[build].deps_key
        } else {
            self.builds[build].build_key
        };
        match self.hit(k) {
            Some(layer) if stage == 0 => {
                self.builds[build].deps = Some(layer);
                self.ready(build, 1);
            }
            Some(_) => self.finish(),
            None => {
                if let Some(waiters) = self.flights.get_mut(&k) {
                    // The same step runs for another build: no work here.
                    waiters.push((build, stage));
                    self.stats.hits += 1;
                    return;
                }
                self.flights.insert(k, Vec::new());
                self.enqueue(Pending {
                    build,
                    stage,
                    ready: self.now,
                });
            }
        }
    }

    /// Stage `stage` of `build` (key `k`) made `layer`: it and the
    /// builds waiting on the same step go on.
    fn made(&mut self, k: u64, layer: u64, build: usize, stage: u8, worker: Option<String>) {
        let waiters = self.flights.remove(&k).unwrap_or_default();
        for (b, st) in std::iter::once((build, stage)).chain(waiters) {
            if st == 0 {
                self.builds[b].deps = Some(layer);
                self.builds[b].deps_worker = if b == build { worker.clone() } else { None };
                self.ready(b, 1);
            } else {
                self.finish();
            }
        }
    }

    /// A stage waits for a slot: anywhere, or under the sticky policy on
    /// the worker its key hashes to (as a buildkitd pod queues).
    fn enqueue(&mut self, p: Pending) {
        if self.policy != Policy::Sticky {
            self.queue.push_back(p);
            return;
        }
        let inputs = self.inputs(&p);
        match self.place(&p, inputs, false) {
            Some(w) => {
                self.waiting[w as usize].push_back(p);
                self.dispatch(Some(w));
            }
            None => self.queue.push_back(p),
        }
    }

    /// Where the policy places `p` (with a slot free now, if `free`).
    fn place(&self, p: &Pending, inputs: [Option<u64>; 2], free: bool) -> Option<u32> {
        let layers = &self.layers;
        let workers = &self.workers;
        let held = |name: &str| -> u64 {
            let Ok(w) = name[1..].parse::<usize>() else {
                return 0;
            };
            inputs
                .iter()
                .flatten()
                .filter(|l| workers[w].held.contains_key(l))
                .map(|l| layers[*l as usize].size)
                .sum()
        };
        let b = &self.builds[p.build];
        let want = Want {
            platform: None,
            entitlements: &self.none,
            free_slot: free,
            base_worker: if p.stage == 1 {
                b.deps_worker.as_deref()
            } else {
                None
            },
            soft: None,
            held: &held,
            key: match self.policy {
                // buildx hashes the context: one per service.
                Policy::Sticky => b.service as u64,
                _ => self.seq,
            },
        };
        place::choose(&self.fleet, &want, self.policy).and_then(|n| n[1..].parse().ok())
    }

    fn finish(&mut self) {
        self.stats.finished += 1;
        self.stats.end = self.now;
    }

    fn inputs(&self, p: &Pending) -> [Option<u64>; 2] {
        let b = &self.builds[p.build];
        let base = (b.service % FAMILIES % BASES) as u64;
        if p.stage == 0 {
            [Some(base), None]
        } else {
            [Some(base), b.deps]
        }
    }

    /// Whether `p` is a build stage whose deps layer is gone.
    fn stale(&self, p: &Pending) -> bool {
        p.stage == 1
            && self.builds[p.build]
                .deps
                .is_none_or(|d| self.live_holders(d) == 0)
    }

    /// The deps layer `p` runs on is gone: its build, and those waiting
    /// on the same step, go back to their deps stage.
    fn rerun_deps(&mut self, p: Pending) {
        let k = self.builds[p.build].build_key;
        let waiters = self.flights.remove(&k).unwrap_or_default();
        for (b, _) in std::iter::once((p.build, 1)).chain(waiters) {
            self.builds[b].deps = None;
            self.builds[b].deps_worker = None;
            self.ready(b, 0);
        }
    }

    /// Places what waits, in order, while slots are free.
    fn dispatch(&mut self, freed: Option<u32>) {
        if let Some(w) = freed {
            while self.live(w)
                && self
                    .fleet
                    .get(&self.workers[w as usize].name)
                    .is_some_and(|m| m.has_free_slot())
                && let Some(p) = self.waiting[w as usize].pop_front()
            {
                if self.stale(&p) {
                    self.rerun_deps(p);
                    continue;
                }
                let inputs = self.inputs(&p);
                self.start(p, w, inputs);
            }
        }
        while let Some(&p) = self.queue.front() {
            if self.stale(&p) {
                self.queue.pop_front();
                self.rerun_deps(p);
                continue;
            }
            let inputs = self.inputs(&p);
            if self.policy == Policy::Sticky {
                self.queue.pop_front();
                match self.place(&p, inputs, false) {
                    Some(w) => {
                        self.waiting[w as usize].push_back(p);
                        self.dispatch(Some(w));
                    }
                    None => {
                        self.queue.push_front(p);
                        break;
                    }
                }
                continue;
            }
            match self.place(&p, inputs, true) {
                Some(w) => {
                    self.queue.pop_front();
                    self.start(p, w, inputs);
                }
                None => break,
            }
        }
    }

    fn start(&mut self, p: Pending, w: u32, inputs: [Option<u64>; 2]) {
        let name = self.workers[w as usize].name.clone();
        let Some(ticket) = self.fleet.take(&name) else {
            self.enqueue(p);
            return;
        };
        self.stats.waits.push(self.now - p.ready);
        let mut fetch = 0;
        let mut fetched = false;
        for l in inputs.into_iter().flatten() {
            let ws = &mut self.workers[w as usize];
            *ws.in_use.entry(l).or_default() += 1;
            if ws.held.contains_key(&l) {
                continue;
            }
            let size = self.layers[l as usize].size;
            if self.live_holders(l) > 0 {
                self.stats.peer_bytes += size;
            } else {
                self.stats.registry_bytes += size;
            }
            fetch += size;
            fetched = true;
            self.gain(w, l);
        }
        if fetched {
            self.stats.index_writes += 1;
        }
        let run = if p.stage == 0 {
            DEPS_SECONDS
        } else {
            BUILD_SECONDS
        };
        let jitter = 0.8 + 0.4 * self.rng.random::<f64>();
        let done = self.now + fetch as f64 / LINK + run * jitter;
        self.tickets.push(Some(ticket));
        let epoch = self.workers[w as usize].epoch;
        let ticket = self.tickets.len() - 1;
        self.at(
            done,
            Event::Done {
                build: p.build,
                stage: p.stage,
                worker: w,
                epoch,
                ticket,
                inputs,
            },
        );
    }

    fn gain(&mut self, w: u32, l: u64) {
        let now = self.now as u64;
        let ws = &mut self.workers[w as usize];
        if ws.held.insert(l, now).is_none() {
            ws.bytes += self.layers[l as usize].size;
            self.layers[l as usize].holders.push(w);
            self.shrunk.gained(&digest(l));
            self.report_stored(w);
        }
    }

    fn done(&mut self, build: usize, stage: u8, w: u32, epoch: u64, inputs: [Option<u64>; 2]) {
        if self.workers[w as usize].epoch != epoch || !self.live(w) {
            // Its worker was lost: the stage runs again elsewhere.
            self.stats.rescheduled += 1;
            self.enqueue(Pending {
                build,
                stage,
                ready: self.now,
            });
            return;
        }
        for l in inputs.into_iter().flatten() {
            let ws = &mut self.workers[w as usize];
            if let Some(n) = ws.in_use.get_mut(&l) {
                *n -= 1;
                if *n == 0 {
                    ws.in_use.remove(&l);
                }
            }
            if let Some(t) = ws.held.get_mut(&l) {
                *t = self.now as u64;
            }
        }
        let layer = self.layers.len() as u64;
        self.layers.push(Layer {
            size: if stage == 0 { DEPS_BYTES } else { BUILD_BYTES },
            holders: Vec::new(),
        });
        self.gain(w, layer);
        self.stats.index_writes += 1;
        self.stats.copy_bytes += self.replicate(layer);
        let k = if stage == 0 {
            self.builds[build].deps_key
        } else {
            self.builds[build].build_key
        };
        self.index.insert(k, layer);
        self.stats.index_writes += 1;
        self.evict(w);
        let name = self.workers[w as usize].name.clone();
        self.made(k, layer, build, stage, Some(name));
    }

    /// Copies `layer` until it has the wanted copies, as publishing a
    /// step's layer does; returns the bytes copied.
    fn replicate(&mut self, layer: u64) -> u64 {
        let want = copies::wanted(REPLICATION, self.fleet.live_count());
        let have = self.live_holders(layer);
        if have == 0 || have >= want {
            return 0;
        }
        let targets: Vec<u32> = {
            let holders = &self.layers[layer as usize].holders;
            let lacks = |n: &str| n[1..].parse::<u32>().is_ok_and(|w| !holders.contains(&w));
            copies::targets(&self.fleet, &lacks, want - have)
                .into_iter()
                .filter_map(|n| n[1..].parse().ok())
                .collect()
        };
        let size = self.layers[layer as usize].size;
        let mut copied = 0;
        for t in targets {
            self.gain(t, layer);
            self.stats.index_writes += 1;
            copied += size;
            self.evict(t);
        }
        copied
    }

    fn evict(&mut self, w: u32) {
        let ws = &self.workers[w as usize];
        if ws.bytes <= KEEP_STORAGE {
            return;
        }
        let mut candidates: Vec<Candidate> = ws
            .held
            .iter()
            .filter(|(l, _)| !ws.in_use.contains_key(l))
            .map(|(&l, &t)| Candidate {
                blob: digest(l),
                size: self.layers[l as usize].size,
                last_used: t,
            })
            .collect();
        candidates.sort_by_key(|c| (c.last_used, c.blob.0));
        let spare = |d: &Digest| {
            let l = layer_of(d);
            let others = self.live_holders(l).saturating_sub(1);
            copies::kind(others, REPLICATION, false) == strata_sched::CopyKind::Spare
        };
        let keep = Keep {
            storage: Some(KEEP_STORAGE),
            duration: None,
        };
        let victims = evict::choose(ws.bytes, &candidates, &keep, self.now as u64, &spare);
        if victims.is_empty() {
            return;
        }
        let want = copies::wanted(REPLICATION, self.fleet.live_count());
        for d in victims {
            let l = layer_of(&d);
            let ws = &mut self.workers[w as usize];
            if ws.held.remove(&l).is_some() {
                ws.bytes -= self.layers[l as usize].size;
                self.layers[l as usize].holders.retain(|&h| h != w);
                self.shrunk.evicted([(d, self.live_holders(l))], want);
            }
        }
        self.report_stored(w);
        self.stats.index_writes += 1;
    }

    /// What `w`'s heartbeat tells: the bytes its store holds.
    fn report_stored(&mut self, w: u32) {
        let ws = &self.workers[w as usize];
        if let Some(m) = self.fleet.current(&ws.name, ws.epoch) {
            m.set_stored(ws.bytes);
        }
    }

    /// Worker `w` is lost: its copies are gone. With `repair`, the layers
    /// of cached results it leaves short are copied again.
    fn lose(&mut self, w: u32) {
        let name = self.workers[w as usize].name.clone();
        let epoch = self.workers[w as usize].epoch;
        self.fleet.lose(&name, epoch);
        let held: Vec<u64> = self.workers[w as usize].held.keys().copied().collect();
        for l in held {
            self.layers[l as usize].holders.retain(|&h| h != w);
        }
        let ws = &mut self.workers[w as usize];
        ws.held.clear();
        ws.in_use.clear();
        ws.bytes = 0;
    }

    /// What repair copies after losses: every cached layer short of its
    /// copies, from a live holder to the least loaded workers lacking it,
    /// as the coordinator's driver runs the core's [`Repair`]: each copy
    /// takes its size over the repair rate, and the next starts as soon
    /// as its nodes are free. Returns the bytes copied, the seconds that
    /// takes, and the seconds one copy at a time would.
    fn repair(&mut self) -> (u64, f64, f64) {
        let cached: Vec<(u64, u64)> = self.index.iter().map(|(&k, &l)| (k, l)).collect();
        let want = copies::wanted(REPLICATION, self.fleet.live_count());
        let mut short = Vec::new();
        for (k, l) in cached {
            let live = self.live_holders(l);
            if live == 0 {
                // Every copy went with the lost: the entry goes too.
                self.stats.repair_lost_entries += 1;
                self.index.remove(&k);
                self.stats.index_writes += 1;
            } else if live < want && self.shrunk.wants_repair(&digest(l)) {
                short.push(l);
            }
        }
        short.sort_unstable();
        short.dedup();
        let by_blob: HashMap<Digest, u64> = short.iter().map(|&l| (digest(l), l)).collect();
        let mut core = Repair::new(REPAIR_COPIES_PER_NODE);
        core.found(
            short
                .iter()
                .map(|&l| repair::Layer {
                    blob: digest(l),
                    size: self.layers[l as usize].size,
                })
                .collect(),
        );
        let (mut bytes, mut clock) = (0, 0.0);
        let mut under_way: Vec<(f64, repair::Copy)> = Vec::new();
        loop {
            let holders: HashMap<Digest, Vec<String>> = core
                .to_look_up(&self.fleet)
                .filter_map(|l| {
                    let layer = *by_blob.get(&l.blob)?;
                    let names = self.layers[layer as usize]
                        .holders
                        .iter()
                        .filter(|&&w| self.live(w))
                        .map(|&w| self.workers[w as usize].name.clone())
                        .collect();
                    Some((l.blob, names))
                })
                .collect();
            let holders_of = |b: &Digest| holders.get(b).cloned();
            for c in core.next(&self.fleet, &holders_of, want) {
                under_way.push((clock + c.layer.size as f64 / REPAIR_RATE, c));
            }
            let Some(first) =
                (0..under_way.len()).min_by(|&a, &b| under_way[a].0.total_cmp(&under_way[b].0))
            else {
                break;
            };
            let (ends, c) = under_way.swap_remove(first);
            clock = ends;
            let (Some(&l), Ok(to)) = (by_blob.get(&c.layer.blob), c.to[1..].parse::<u32>()) else {
                core.ended(&c.layer.blob, &c.to, false);
                continue;
            };
            self.gain(to, l);
            self.stats.index_writes += 1;
            bytes += c.layer.size;
            self.evict(to);
            core.ended(&c.layer.blob, &c.to, true);
        }
        (bytes, clock, bytes as f64 / REPAIR_RATE)
    }

    /// Replaces a random worker with a fresh one of the same name.
    fn churn(&mut self) {
        let w = self.rng.random_range(0..self.workers.len()) as u32;
        self.lose(w);
        let ws = &mut self.workers[w as usize];
        ws.epoch += 1;
        let (name, epoch) = (ws.name.clone(), ws.epoch);
        let now = self.instant();
        self.fleet.register(&name, spec(), epoch, w, now);
        self.stats.repair_bytes += self.repair().0;
        self.requeue(w);
    }

    /// What waited on a lost worker is placed again.
    fn requeue(&mut self, w: u32) {
        let waiting = std::mem::take(&mut self.waiting[w as usize]);
        for p in waiting {
            self.enqueue(p);
        }
    }

    fn run(&mut self, builds: usize) -> (u64, f64, f64) {
        let slot_seconds = (1.0 - RERUN) * (DEPS_CHANGE * DEPS_SECONDS + BUILD_SECONDS) + 2.0;
        let rate = UTILIZATION * (self.workers.len() * SLOTS) as f64 / slot_seconds;
        let mut t = 0.0;
        for _ in 0..builds {
            t += -(1.0 - self.rng.random::<f64>()).ln() / rate;
            self.at(t, Event::Arrive);
        }
        let mut arrived = 0;
        let mut loss = (0, 0.0, 0.0);
        while let Some((Reverse(at), _, i)) = self.events.pop() {
            self.now = at as f64 / 1e6;
            let Some(e) = self.slab[i].take() else {
                continue;
            };
            let mut freed = None;
            match e {
                Event::Arrive => {
                    arrived += 1;
                    self.arrive();
                    if arrived % CHURN_EVERY == 0 {
                        self.churn();
                    }
                    if arrived == builds / 2 {
                        let n = ((self.workers.len() as f64) * LOSS).ceil() as usize;
                        for _ in 0..n {
                            let w = self.rng.random_range(0..self.workers.len()) as u32;
                            self.lose(w);
                            self.requeue(w);
                        }
                        loss = self.repair();
                    }
                }
                Event::Done {
                    build,
                    stage,
                    worker,
                    epoch,
                    ticket,
                    inputs,
                } => {
                    if let Some(t) = self.tickets[ticket].take() {
                        self.fleet.release(t);
                    }
                    freed = Some(worker);
                    self.done(build, stage, worker, epoch, inputs);
                }
            }
            self.dispatch(freed);
        }
        loss
    }
}

fn spec() -> Spec {
    Spec {
        slots: SLOTS,
        keep_storage: Some(KEEP_STORAGE),
        ..Spec::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Row {
    workers: usize,
    policy: Policy,
    builds: usize,
    finished: usize,
    hit_rate: f64,
    mb_per_build: f64,
    registry_mb_per_build: f64,
    copy_mb_per_build: f64,
    p50: f64,
    p95: f64,
    writes_per_s: f64,
    loss_gb: f64,
    loss_s: f64,
    loss_serial_s: f64,
    churn_gb: f64,
    lost_entries: u64,
    rescheduled: u64,
    wall: Duration,
}

fn simulate(workers: usize, policy: Policy) -> Row {
    let per_worker = std::env::var("FLEET_SIM_BUILDS_PER_WORKER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let builds = per_worker * workers;
    let wall = Instant::now();
    let mut sim = Sim::new(policy, workers, 42);
    let (loss_bytes, loss_s, loss_serial_s) = sim.run(builds);
    let mut waits = std::mem::take(&mut sim.stats.waits);
    waits.sort_by(f64::total_cmp);
    let s = &sim.stats;
    Row {
        workers,
        policy,
        builds,
        finished: s.finished,
        hit_rate: s.hits as f64 / s.lookups.max(1) as f64,
        mb_per_build: (s.peer_bytes + s.registry_bytes) as f64 / 1e6 / builds as f64,
        registry_mb_per_build: s.registry_bytes as f64 / 1e6 / builds as f64,
        copy_mb_per_build: s.copy_bytes as f64 / 1e6 / builds as f64,
        p50: percentile(&waits, 0.5),
        p95: percentile(&waits, 0.95),
        writes_per_s: s.index_writes as f64 / s.end.max(1.0),
        loss_gb: loss_bytes as f64 / 1e9,
        loss_s,
        loss_serial_s,
        churn_gb: s.repair_bytes as f64 / 1e9,
        lost_entries: s.repair_lost_entries,
        rescheduled: s.rescheduled,
        wall: wall.elapsed(),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[usize] = if quick { &[100] } else { &[100, 300, 1000] };
    println!(
        "| workers | policy | builds | done | cache hits | MB fetched for steps/build | of it from registries | MB of replica copies/build | queue wait p50 / p95 | index writes/s | repair after losing 5%: bytes, time (one copy at a time) | churn repair | rescheduled steps | simulated in |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in sizes {
        let rows: Vec<Row> = Policy::ALL.iter().map(|&p| simulate(n, p)).collect();
        let Some(sticky) = rows.iter().find(|r| r.policy == Policy::Sticky) else {
            continue;
        };
        let (sticky_mb, sticky_p95) = (sticky.mb_per_build, sticky.p95);
        for r in &rows {
            println!(
                "| {} | {} | {} | {} | {:.1}% | {:.0} ({:.2}× sticky) | {:.1} | {:.0} | {:.1} s / {:.1} s ({:.2}× sticky p95) | {:.0} | {:.1} GB, {:.0} s ({:.0} s), {} entries lost | {:.1} GB | {} | {:.1} s |",
                r.workers,
                r.policy.name(),
                r.builds,
                r.finished,
                r.hit_rate * 100.0,
                r.mb_per_build,
                r.mb_per_build / sticky_mb.max(f64::MIN_POSITIVE),
                r.registry_mb_per_build,
                r.copy_mb_per_build,
                r.p50,
                r.p95,
                r.p95 / sticky_p95.max(f64::MIN_POSITIVE),
                r.writes_per_s,
                r.loss_gb,
                r.loss_s,
                r.loss_serial_s,
                r.lost_entries,
                r.churn_gb,
                r.rescheduled,
                r.wall.as_secs_f64(),
            );
        }
    }
}
