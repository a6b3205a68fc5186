//! Copies of built layers: how many to keep, where the next one goes,
//! and what a worker dropping its copy loses.
//!
//! A step's layer enters the cache index once `replication` workers hold
//! it (or every live worker, when fewer are up); a worker lost leaves its
//! layers short, and repair copies them to the least loaded workers that
//! lack them. Eviction asks before dropping: a spare copy goes first, the
//! last copies of a cached layer only when the store is still over its
//! budget, and a named image's layers never.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use strata_cas::Digest;

use crate::fleet::Fleet;

/// What a worker dropping its copy of a blob would lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyKind {
    /// Nothing: enough other live workers hold it.
    Spare,
    /// Maybe the last copies of a cached layer: dropped only after the
    /// spare ones, when the worker is still over its budget.
    Last,
    /// A layer of an image the cluster names, not spare: kept until the
    /// name is dropped.
    Named,
}

/// What dropping one copy loses, when `others` live workers besides the
/// asker hold the blob and the cluster keeps `replication` copies.
pub fn kind(others: usize, replication: usize, named: bool) -> CopyKind {
    if others >= replication {
        CopyKind::Spare
    } else if named {
        CopyKind::Named
    } else {
        CopyKind::Last
    }
}

/// Copies to aim for with `live` workers up: `replication`, or every live
/// worker when fewer are up.
pub fn wanted(replication: usize, live: usize) -> usize {
    replication.min(live)
}

/// Where the next `n` copies of a blob go, best first: live workers that
/// are not cordoned and that `lacks` says lack it, the emptiest store
/// first (a copy on a full one would only make it evict another layer's
/// second copy), then the least loaded, then by name. Linear in the
/// fleet's size.
pub fn targets<'f, L>(fleet: &'f Fleet<L>, lacks: &dyn Fn(&str) -> bool, n: usize) -> Vec<&'f str> {
    let mut out: Vec<(u64, usize, &str)> = fleet
        .iter()
        .filter(|(name, m)| m.alive() && !fleet.is_cordoned(name) && lacks(name))
        .map(|(name, m)| (m.fullness(), m.load(), name))
        .collect();
    if n == 0 {
        return Vec::new();
    }
    if out.len() > n {
        out.select_nth_unstable(n - 1);
        out.truncate(n);
    }
    out.sort_unstable();
    out.into_iter().map(|(_, _, name)| name).collect()
}

/// A layer short of copies, as repair sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Short {
    /// The live workers holding it.
    pub holders: Vec<String>,
    /// Copies it lacks, besides those being taken.
    pub missing: usize,
    /// Workers taking a copy of it now: neither a source nor a target.
    pub taking: Vec<String>,
}

/// One copy of a round of repair: layer `short` (an index into the
/// list planned for) from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Which short layer.
    pub short: usize,
    /// A live holder that sends it.
    pub from: String,
    /// A live worker lacking it that takes it.
    pub to: String,
}

/// One round of repair: copies that run at once, no worker sending or
/// taking more than `per_node` of them (each copy is paced at the repair
/// rate, so a node gives repair at most `per_node` times that rate, and a
/// bigger fleet repairs faster). Sources are the least busy holders, and
/// of those the one holding the fewest short layers (a scarce source is
/// kept for the layers only it holds);
/// targets are ranked as [`targets`] ranks them, workers that hold no
/// short layer first (the others are wanted as sources). What does not
/// fit waits for the next round.
/// `busy` counts the copies each node is in already (those of an earlier
/// round still running).
pub fn plan_repair<L>(
    fleet: &Fleet<L>,
    shorts: &[Short],
    per_node: usize,
    mut busy: HashMap<String, usize>,
) -> Vec<Assignment> {
    let per_node = per_node.max(1);
    let mut demand: HashMap<&str, usize> = HashMap::new();
    for h in shorts.iter().flat_map(|s| s.holders.iter()) {
        *demand.entry(h.as_str()).or_default() += 1;
    }
    let count = |n: &str, busy: &HashMap<String, usize>| busy.get(n).copied().unwrap_or(0);
    // Every possible target, best first, ranked once: as [`targets`]
    // ranks them, those holding no short layer before the others. Nodes
    // only get busier within a plan, so the front that is full is
    // skipped for good.
    let mut ranked: Vec<(bool, u64, usize, &str)> = fleet
        .iter()
        .filter(|(name, m)| m.alive() && !fleet.is_cordoned(name) && count(name, &busy) < per_node)
        .map(|(name, m)| (demand.contains_key(name), m.fullness(), m.load(), name))
        .collect();
    // A plan takes few targets, so only the best few are sorted (each
    // copy may pass over its layer's holders and those taking it), the
    // rest only if they run out.
    let wanted: usize = shorts.iter().map(|s| s.missing).sum();
    let passed: usize = shorts
        .iter()
        .map(|s| s.holders.len() + s.taking.len())
        .max()
        .unwrap_or(0);
    let mut sorted = (2 * wanted + passed + 16).min(ranked.len());
    if sorted < ranked.len() {
        ranked.select_nth_unstable(sorted);
    }
    ranked[..sorted].sort_unstable();
    let mut first_free = 0;
    let mut out = Vec::new();
    for (i, short) in shorts.iter().enumerate() {
        let mut taking: Vec<String> = short.taking.clone();
        for _ in 0..short.missing {
            loop {
                while first_free < sorted && count(ranked[first_free].3, &busy) >= per_node {
                    first_free += 1;
                }
                if first_free < sorted || !sort_the_rest(&mut ranked, &mut sorted) {
                    break;
                }
            }
            if first_free == ranked.len() {
                return out;
            }
            let Some(from) = short
                .holders
                .iter()
                .filter(|h| fleet.live(h).is_some() && count(h, &busy) < per_node)
                .min_by_key(|h| {
                    let wanted = demand.get(h.as_str()).copied().unwrap_or(0);
                    (count(h, &busy), wanted, h.as_str())
                })
                .cloned()
            else {
                break;
            };
            let lacks = |n: &str| {
                !short.holders.iter().any(|h| h == n)
                    && !taking.iter().any(|t| t == n)
                    && count(n, &busy) < per_node
            };
            let found = loop {
                let best = ranked[first_free..sorted]
                    .iter()
                    .map(|(_, _, _, n)| *n)
                    .find(|n| lacks(n));
                if best.is_some() || !sort_the_rest(&mut ranked, &mut sorted) {
                    break best;
                }
            };
            let Some(to) = found.map(str::to_string) else {
                break;
            };
            *busy.entry(from.clone()).or_default() += 1;
            *busy.entry(to.clone()).or_default() += 1;
            taking.push(to.clone());
            out.push(Assignment { short: i, from, to });
        }
    }
    out
}

/// Sorts the part of `ranked` past its sorted front `sorted`, which then
/// covers all of it; false if nothing was left to sort.
fn sort_the_rest<T: Ord>(ranked: &mut [T], sorted: &mut usize) -> bool {
    if *sorted == ranked.len() {
        return false;
    }
    ranked[*sorted..].sort_unstable();
    *sorted = ranked.len();
    true
}

/// Blobs whose copies workers dropped to stay within their budgets: the
/// cluster chose to keep fewer copies of them, so repair leaves them
/// short. Copying one back would only make another full store evict
/// something else, and under pressure repair and eviction would trade
/// the same bytes forever. A blob is wanted in full again once a worker
/// gains a copy of it (a step used it).
#[derive(Debug, Default)]
pub struct Shrunk {
    blobs: HashSet<Digest>,
}

impl Shrunk {
    /// Blobs remembered at most; past that the set starts over, and repair
    /// copies some back once.
    pub const MAX: usize = 1 << 20;

    /// A worker evicted its copies of `left`'s blobs, each paired with
    /// how many other live workers still hold it; `want` copies are
    /// wanted. Those it left short are not copied back; those it left
    /// with enough copies are no business of repair's anyway.
    pub fn evicted(&mut self, left: impl IntoIterator<Item = (Digest, usize)>, want: usize) {
        for (b, _) in left.into_iter().filter(|(_, others)| *others < want) {
            if self.blobs.len() >= Self::MAX {
                self.blobs.clear();
            }
            self.blobs.insert(b);
        }
    }

    /// A worker gained a copy of `blob`.
    pub fn gained(&mut self, blob: &Digest) {
        self.blobs.remove(blob);
    }

    /// Whether repair should bring `blob` back to its wanted copies.
    pub fn wants_repair(&self, blob: &Digest) -> bool {
        !self.blobs.contains(blob)
    }
}

/// Last copies a worker is about to drop, and the cache entries that
/// must leave the index first: an entry whose layer chain names a blob
/// with no copy left could only be served as a hit for something gone.
/// The driver removes [`Retirement::remove`] from the index, then tells
/// the worker which blobs it may drop ([`Retirement::droppable`]): only
/// those whose every entry is out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Retirement {
    /// The cache entries to take out of the index, by key.
    pub remove: Vec<Digest>,
    /// For each blob asked about, the indices in `remove` of the entries
    /// that need it.
    needed_by: Vec<Vec<usize>>,
}

impl Retirement {
    /// Plans retiring `blobs`, given every cache entry as its key and the
    /// blobs of its layer chain. Linear in the entries' layers.
    pub fn plan<'e>(
        blobs: &[Digest],
        entries: impl IntoIterator<Item = (Digest, &'e [Digest])>,
    ) -> Retirement {
        let asked: HashMap<Digest, usize> =
            blobs.iter().enumerate().map(|(i, b)| (*b, i)).collect();
        let mut needed_by = vec![Vec::new(); blobs.len()];
        let mut remove = Vec::new();
        for (key, chain) in entries {
            let mut needs = chain.iter().filter_map(|b| asked.get(b)).peekable();
            if needs.peek().is_none() {
                continue;
            }
            for &i in needs {
                if needed_by[i].last() != Some(&remove.len()) {
                    needed_by[i].push(remove.len());
                }
            }
            remove.push(key);
        }
        Retirement { remove, needed_by }
    }

    /// For each blob asked about, in order, whether its copy may go now:
    /// `removed(i)` says whether entry `remove[i]` left the index.
    pub fn droppable(&self, removed: &dyn Fn(usize) -> bool) -> Vec<bool> {
        self.needed_by
            .iter()
            .map(|entries| entries.iter().all(|&i| removed(i)))
            .collect()
    }
}

/// Seconds a new cache entry is never taken for an orphan: the entry is
/// put as soon as its holders have the layer, and the leader records
/// them from their next heartbeats, a moment later (a new leader, from
/// their registrations).
pub const ORPHAN_GRACE: u64 = 60;

/// Whether an entry put at `created` may be taken for an orphan at `now`
/// (a clock that went back takes none).
pub fn orphaned(created: u64, now: u64) -> bool {
    now.saturating_sub(created) >= ORPHAN_GRACE
}

/// A cache entry as repair sees it.
#[derive(Debug, Clone, Copy)]
pub struct Cached {
    /// Its key.
    pub key: Digest,
    /// When it was put (seconds since the epoch).
    pub created: u64,
    /// The blob of the layer its step made; `None` when the step made
    /// none (its layers are its parent's, kept by that entry).
    pub made: Option<Digest>,
}

/// The cache index as repair sees it: what to copy, what to forget.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Layers cached results made with fewer live copies than wanted,
    /// each with its live copies (none: nothing left to copy from).
    pub short: Vec<(Digest, usize)>,
    /// Entries whose layer no worker is recorded or heard to hold any
    /// more (every copy evicted, lost, or its workers forgotten): a hit on
    /// them could only run the step again.
    pub orphans: Vec<Digest>,
}

/// Takes the census of `entries` at `now` with `want` copies wanted:
/// `held(blob)` says whether any worker is recorded or heard to hold a
/// blob, `live(blob)` how many live workers hold it. Layers `shrunk` by
/// eviction are not short. Each blob is looked at once for each question.
pub fn census(
    entries: &[Cached],
    now: u64,
    want: usize,
    shrunk: &Shrunk,
    held: &dyn Fn(&Digest) -> bool,
    live: &dyn Fn(&Digest) -> usize,
) -> Census {
    let orphans = entries
        .iter()
        .filter_map(|e| Some((e.key, e.made?, e.created)))
        .filter(|(_, blob, created)| orphaned(*created, now) && !held(blob))
        .map(|(key, _, _)| key)
        .collect();
    let mut short = Vec::new();
    if want > 0 {
        let made: HashSet<Digest> = entries.iter().filter_map(|e| e.made).collect();
        for blob in made {
            let copies = live(&blob);
            if copies < want && shrunk.wants_repair(&blob) {
                short.push((blob, copies));
            }
        }
    }
    Census { short, orphans }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::fleet::Spec;

    #[test]
    fn a_last_copy_goes_only_once_every_entry_needing_it_left_the_index() {
        let b = |n: u8| Digest::of(&[n]);
        let (base, x, y, unused) = (b(1), b(2), b(3), b(4));
        // Entry k1 made x on base; k2 made y on x; k3 needs neither.
        let chains = [
            (b(11), vec![base, x]),
            (b(12), vec![base, x, y]),
            (b(13), vec![base]),
        ];
        let entries = || chains.iter().map(|(k, c)| (*k, c.as_slice()));
        let plan = Retirement::plan(&[x, unused, y], entries());
        assert_eq!(plan.remove, vec![b(11), b(12)]);
        // Nothing removed yet: only the blob no entry needs may go.
        assert_eq!(plan.droppable(&|_| false), [false, true, false]);
        // k2 out, k1 still in: y may go, x not.
        assert_eq!(plan.droppable(&|i| i == 1), [false, true, true]);
        assert_eq!(plan.droppable(&|_| true), [true, true, true]);
        // Nothing asked, nothing to remove.
        assert_eq!(Retirement::plan(&[], entries()), Retirement::default());
    }

    #[test]
    fn a_copy_is_spare_only_when_enough_others_hold_it_and_a_named_one_stays() {
        assert_eq!(kind(2, 2, true), CopyKind::Spare);
        assert_eq!(kind(1, 2, false), CopyKind::Last);
        assert_eq!(kind(1, 2, true), CopyKind::Named);
        assert_eq!(kind(0, 1, false), CopyKind::Last);
        assert_eq!(wanted(3, 2), 2);
        assert_eq!(wanted(2, 10), 2);
    }

    #[test]
    fn copies_go_to_the_least_loaded_live_uncordoned_workers_lacking_the_blob() {
        let mut fleet = Fleet::default();
        for name in ["a", "b", "c", "d", "e"] {
            let spec = Spec {
                slots: 2,
                ..Spec::default()
            };
            fleet.register(name, spec, 1, (), Instant::now());
        }
        let _busy = fleet.take("b").unwrap();
        fleet.lose("c", 1);
        fleet.cordon("d", true);
        let lacks = |w: &str| w != "a";
        assert_eq!(targets(&fleet, &lacks, 5), ["e", "b"]);
        assert_eq!(targets(&fleet, &lacks, 1), ["e"]);
        assert!(targets(&fleet, &lacks, 0).is_empty());
        // A fuller store comes after an emptier one, however busy.
        for (name, stored) in [("b", 100), ("e", 900)] {
            let m = fleet.current(name, 1).unwrap();
            m.set_stored(stored);
        }
        assert_eq!(
            targets(&fleet, &lacks, 5),
            ["e", "b"],
            "no bound: room is not known"
        );
        fleet.register(
            "f",
            Spec {
                slots: 2,
                keep_storage: Some(1000),
                ..Spec::default()
            },
            1,
            (),
            Instant::now(),
        );
        fleet.current("f", 1).unwrap().set_stored(950);
        let g = Spec {
            slots: 2,
            keep_storage: Some(1000),
            ..Spec::default()
        };
        fleet.register("g", g, 1, (), Instant::now());
        fleet.current("g", 1).unwrap().set_stored(100);
        assert_eq!(targets(&fleet, &lacks, 5), ["e", "b", "g", "f"]);
    }

    /// Workers `w0`.. of 2 slots, up.
    fn workers(n: usize) -> Fleet<()> {
        let mut fleet = Fleet::default();
        for i in 0..n {
            let spec = Spec {
                slots: 2,
                ..Spec::default()
            };
            fleet.register(&format!("w{i}"), spec, 1, (), Instant::now());
        }
        fleet
    }

    #[test]
    fn a_round_of_repair_uses_every_free_node_once_and_never_a_holder_as_target() {
        let mut fleet = workers(6);
        fleet.lose("w5", 1);
        let short = |holders: &[&str], missing| Short {
            holders: holders.iter().map(|h| h.to_string()).collect(),
            missing,
            taking: Vec::new(),
        };
        let shorts = [
            short(&["w0"], 1),
            short(&["w0"], 1),
            short(&["w1", "w5"], 2),
            short(&["w5"], 1),
        ];
        let plan = plan_repair(&fleet, &shorts, 1, HashMap::new());
        // w0 sends once; the second layer it alone holds waits. The third
        // goes from w1 (w5 is down) once: w1 is then busy. The fourth has
        // no live holder.
        assert_eq!(plan.len(), 2, "{plan:?}");
        let mut nodes: Vec<&str> = plan
            .iter()
            .flat_map(|a| [a.from.as_str(), a.to.as_str()])
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        assert_eq!(nodes.len(), 4, "each node in one copy at most: {plan:?}");
        for a in &plan {
            assert!(!shorts[a.short].holders.contains(&a.to));
            assert_ne!(a.to, "w5");
        }
        // With two copies a node, every layer with a live holder is served.
        let plan = plan_repair(&fleet, &shorts, 2, HashMap::new());
        let served: HashSet<usize> = plan.iter().map(|a| a.short).collect();
        assert_eq!(served, HashSet::from([0, 1, 2]));
        let third: Vec<&str> = plan
            .iter()
            .filter(|a| a.short == 2)
            .map(|a| a.to.as_str())
            .collect();
        assert_eq!(third.len(), 2);
        assert_ne!(third[0], third[1]);
    }

    #[test]
    fn a_copy_evicted_on_purpose_is_not_repaired_until_used_again() {
        let mut shrunk = Shrunk::default();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        shrunk.evicted([(a, 0)], 2);
        assert!(!shrunk.wants_repair(&a));
        assert!(shrunk.wants_repair(&b));
        shrunk.gained(&a);
        assert!(shrunk.wants_repair(&a));
    }

    #[test]
    fn only_an_eviction_that_leaves_a_blob_short_keeps_repair_away() {
        let mut shrunk = Shrunk::default();
        let (spare, last, lost) = (
            Digest::of(b"spare"),
            Digest::of(b"last"),
            Digest::of(b"lost"),
        );
        // Two copies wanted: `spare` still has two elsewhere, `last` one,
        // `lost` none.
        shrunk.evicted([(spare, 2), (last, 1), (lost, 0)], 2);
        assert!(shrunk.wants_repair(&spare));
        assert!(!shrunk.wants_repair(&last));
        assert!(!shrunk.wants_repair(&lost));
        // With one copy wanted, an eviction leaving one elsewhere is fine.
        let mut one = Shrunk::default();
        one.evicted([(last, 1)], 1);
        assert!(one.wants_repair(&last));
    }

    #[test]
    fn rounds_of_repair_restore_every_layer_with_a_live_copy_within_the_per_node_bound() {
        let mut fleet = workers(10);
        // Three workers are lost; they held the other copy of 30 layers,
        // each left on one of the two survivors w0 and w1.
        for lost in ["w7", "w8", "w9"] {
            fleet.lose(lost, 1);
        }
        let want = wanted(3, fleet.live_count());
        let mut holders: Vec<Vec<String>> = (0..30).map(|i| vec![format!("w{}", i % 2)]).collect();
        let mut rounds = 0;
        loop {
            let shorts: Vec<Short> = holders
                .iter()
                .map(|h| Short {
                    holders: h.clone(),
                    missing: want.saturating_sub(h.len()),
                    taking: Vec::new(),
                })
                .filter(|s| s.missing > 0)
                .collect();
            if shorts.is_empty() {
                break;
            }
            let index: Vec<usize> = (0..holders.len())
                .filter(|&i| holders[i].len() < want)
                .collect();
            let plan = plan_repair(&fleet, &shorts, 1, HashMap::new());
            assert!(!plan.is_empty(), "round {rounds} made no progress");
            let mut per_node: HashMap<&str, usize> = HashMap::new();
            for a in &plan {
                *per_node.entry(&a.from).or_default() += 1;
                *per_node.entry(&a.to).or_default() += 1;
            }
            assert!(per_node.values().all(|&n| n == 1), "{plan:?}");
            for a in plan {
                holders[index[a.short]].push(a.to);
            }
            rounds += 1;
            assert!(rounds <= 60, "repair does not end");
        }
        // 60 copies among 7 live workers, each in one copy a round: at
        // most 3 a round, so 20 rounds at best. The copies made send too:
        // not two a round (all that w0 and w1 could send alone).
        assert!(holders.iter().all(|h| h.len() == want));
        assert!(rounds <= 24, "{rounds} rounds");
    }

    #[test]
    fn an_entry_just_put_is_never_an_orphan() {
        let now = 1_000_000;
        assert!(!orphaned(now, now));
        assert!(!orphaned(now - ORPHAN_GRACE + 1, now));
        assert!(orphaned(now - ORPHAN_GRACE, now));
        // A clock that went back leaves entries alone.
        assert!(!orphaned(now + 5, now));
    }

    #[test]
    fn the_census_forgets_only_old_entries_nobody_holds_and_copies_only_what_eviction_did_not_shrink()
     {
        let now = 10_000;
        let blob = |n: u8| Digest::of(&[n]);
        let old = now - ORPHAN_GRACE;
        let entries = [
            // Held by two live workers: neither short nor an orphan.
            Cached {
                key: blob(10),
                created: old,
                made: Some(blob(1)),
            },
            // One live copy of two: short.
            Cached {
                key: blob(11),
                created: old,
                made: Some(blob(2)),
            },
            // Nobody holds it, put long ago: an orphan, and short with no
            // copy to copy from.
            Cached {
                key: blob(12),
                created: old,
                made: Some(blob(3)),
            },
            // Nobody holds it yet, just put: kept.
            Cached {
                key: blob(13),
                created: now,
                made: Some(blob(4)),
            },
            // Made no layer: nothing to hold.
            Cached {
                key: blob(14),
                created: old,
                made: None,
            },
            // Evicted short on purpose: left short.
            Cached {
                key: blob(15),
                created: old,
                made: Some(blob(5)),
            },
            // Two entries share a layer: it is counted once.
            Cached {
                key: blob(16),
                created: old,
                made: Some(blob(2)),
            },
        ];
        let copies = |b: &Digest| -> usize {
            match b {
                b if *b == blob(1) => 2,
                b if *b == blob(2) || *b == blob(5) => 1,
                _ => 0,
            }
        };
        let mut shrunk = Shrunk::default();
        shrunk.evicted([(blob(5), 1)], 2);
        let mut c = census(&entries, now, 2, &shrunk, &|b| copies(b) > 0, &copies);
        c.short.sort();
        let mut short = vec![(blob(2), 1), (blob(3), 0), (blob(4), 0)];
        short.sort();
        assert_eq!(c.short, short);
        assert_eq!(c.orphans, vec![blob(12)]);
        // With no live worker, nothing is wanted: nothing is short.
        let none = census(&entries, now, 0, &shrunk, &|_| false, &|_| 0);
        assert!(none.short.is_empty());
        assert_eq!(none.orphans.len(), 5);
    }
}
