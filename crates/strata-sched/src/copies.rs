//! Copies of built layers: how many to keep, where the next one goes,
//! and what a worker dropping its copy loses.
//!
//! A step's layer enters the cache index once `replication` workers hold
//! it (or every live worker, when fewer are up); a worker lost leaves its
//! layers short, and repair copies them to the least loaded workers that
//! lack them. Eviction asks before dropping: a spare copy goes first, the
//! last copies of a cached layer only when the store is still over its
//! budget, and a named image's layers never.

use std::collections::HashSet;

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
/// are not cordoned and that `lacks` says lack it, least loaded first,
/// then by name. Linear in the fleet's size.
pub fn targets<'f, L>(fleet: &'f Fleet<L>, lacks: &dyn Fn(&str) -> bool, n: usize) -> Vec<&'f str> {
    let mut out: Vec<(usize, &str)> = fleet
        .iter()
        .filter(|(name, m)| m.alive() && !fleet.is_cordoned(name) && lacks(name))
        .map(|(name, m)| (m.load(), name))
        .collect();
    if n == 0 {
        return Vec::new();
    }
    if out.len() > n {
        out.select_nth_unstable(n - 1);
        out.truncate(n);
    }
    out.sort_unstable();
    out.into_iter().map(|(_, name)| name).collect()
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

    /// A worker evicted its copies of `blobs`.
    pub fn evicted(&mut self, blobs: impl IntoIterator<Item = Digest>) {
        for b in blobs {
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::fleet::Spec;

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
    }

    #[test]
    fn a_copy_evicted_on_purpose_is_not_repaired_until_used_again() {
        let mut shrunk = Shrunk::default();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        shrunk.evicted([a]);
        assert!(!shrunk.wants_repair(&a));
        assert!(shrunk.wants_repair(&b));
        shrunk.gained(&a);
        assert!(shrunk.wants_repair(&a));
    }
}
