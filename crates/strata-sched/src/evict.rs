//! Which blobs a store over its bounds drops: those unused for too long,
//! then the least recently used until it is within its budget, spare
//! copies (other nodes keep enough) before the last ones.

use strata_cas::Digest;

/// How much a node keeps: blobs past `storage` bytes, or unused for
/// `duration` seconds, are evicted (least recently used first). `None`:
/// no bound of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keep {
    /// Bytes of blobs kept at most.
    pub storage: Option<u64>,
    /// Seconds a blob is kept unused at most.
    pub duration: Option<u64>,
}

impl Keep {
    /// Whether anything is bounded.
    pub fn bounds_anything(&self) -> bool {
        self.storage.is_some() || self.duration.is_some()
    }
}

/// Seconds after which a store checked within its bounds and unchanged
/// since is checked again when it has a time bound: its blobs age with
/// no change to the store.
pub const RECHECK_UNCHANGED: u64 = 60;

/// When a store's bounds are worth checking: listing a store of a million
/// blobs every few seconds would keep a core busy on an idle node. A store
/// found within its size bound grows only through a change it counts (a
/// blob added), so it needs no other check until its count moves, or,
/// under a time bound, until [`RECHECK_UNCHANGED`] has passed. A store
/// found over its bound is checked every round: what held its blobs (a
/// running build's lease) may have let go.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pace {
    last: Option<Checked>,
}

#[derive(Debug, Clone, Copy)]
struct Checked {
    changes: u64,
    at: u64,
    within: bool,
}

impl Pace {
    /// Whether to check a store whose count of changes reads `changes`
    /// at `now` (seconds), under `keep`.
    pub fn due(&self, changes: u64, now: u64, keep: &Keep) -> bool {
        match self.last {
            None => true,
            Some(c) => {
                !c.within
                    || c.changes != changes
                    || (keep.duration.is_some() && now.saturating_sub(c.at) >= RECHECK_UNCHANGED)
            }
        }
    }

    /// Notes a check at `now` of the store as its count read `changes`
    /// before it was listed: `total` bytes, against `keep`.
    pub fn checked(&mut self, changes: u64, now: u64, total: u64, keep: &Keep) {
        self.last = Some(Checked {
            changes,
            at: now,
            within: keep.storage.is_none_or(|s| total <= s),
        });
    }
}

/// A blob eviction may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The blob.
    pub blob: Digest,
    /// Its size.
    pub size: u64,
    /// When a build last used it (seconds since the epoch).
    pub last_used: u64,
}

/// Which of `candidates` (least recently used first) to evict from a
/// store of `total` bytes under `keep` at `now`: every one unused for
/// longer than `keep.duration`, then, while the store is over
/// `keep.storage`, the next ones, those `spare(blob)` says are spare
/// (other nodes keep enough copies) before the others.
pub fn choose(
    total: u64,
    candidates: &[Candidate],
    keep: &Keep,
    now: u64,
    spare: &dyn Fn(&Digest) -> bool,
) -> Vec<Digest> {
    let mut left = total;
    let mut out = Vec::new();
    let mut rest = Vec::new();
    for c in candidates {
        if keep
            .duration
            .is_some_and(|d| now.saturating_sub(c.last_used) > d)
        {
            out.push(c.blob);
            left = left.saturating_sub(c.size);
        } else {
            rest.push(c);
        }
    }
    // Spare ones first, each group least recently used first; `spare` is
    // asked once per blob.
    let (spare, last): (Vec<&Candidate>, Vec<&Candidate>) =
        rest.into_iter().partition(|c| spare(&c.blob));
    for c in spare.into_iter().chain(last) {
        if keep.storage.is_none_or(|budget| left <= budget) {
            break;
        }
        out.push(c.blob);
        left = left.saturating_sub(c.size);
    }
    out
}

/// What a worker of a cluster evicts from a store of `total` bytes under
/// `keep` at `now`, given what a coordinator says dropping each
/// candidate's copy loses (`kind`; `None`: not asked about, so kept): a
/// named image's layers never, spare copies before last ones.
pub fn choose_in_cluster(
    total: u64,
    candidates: &[Candidate],
    keep: &Keep,
    now: u64,
    kind: &dyn Fn(&Digest) -> Option<crate::CopyKind>,
) -> Vec<Digest> {
    let droppable: Vec<Candidate> = candidates
        .iter()
        .filter(|c| kind(&c.blob).is_some_and(|k| k != crate::CopyKind::Named))
        .copied()
        .collect();
    let spare = |d: &Digest| kind(d) == Some(crate::CopyKind::Spare);
    choose(total, &droppable, keep, now, &spare)
}

/// An image kept as a cache (a base image a coordinator pulled to plan a
/// build), whole or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedImage {
    /// When a build last used it (seconds since the epoch).
    pub last_used: u64,
    /// The bytes dropping it frees: its blobs no other image keeps.
    pub bytes: u64,
}

/// Which of `images` to drop from a store of `total` bytes, `reclaimable`
/// of which [`choose`] may evict without them, under `keep` at `now`:
/// every one unused for longer than `keep.duration`, then, while the
/// store would stay over `keep.storage` with every candidate gone, the
/// least recently used. Returns their indices in `images`.
pub fn retire(
    images: &[CachedImage],
    total: u64,
    reclaimable: u64,
    keep: &Keep,
    now: u64,
) -> Vec<usize> {
    let mut left = total.saturating_sub(reclaimable);
    let mut order: Vec<usize> = (0..images.len()).collect();
    order.sort_by_key(|&i| images[i].last_used);
    let mut out = Vec::new();
    for i in order {
        let stale = keep
            .duration
            .is_some_and(|d| now.saturating_sub(images[i].last_used) > d);
        let over = keep.storage.is_some_and(|budget| left > budget);
        if stale || over {
            out.push(i);
            left = left.saturating_sub(images[i].bytes);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn cached_images_go_when_stale_or_when_the_store_stays_over_without_them() {
        let img = |last_used, bytes| CachedImage { last_used, bytes };
        let images = [img(300, 40), img(100, 50), img(200, 30)];
        let keep = |storage, duration| Keep { storage, duration };
        // Within bounds once the other candidates go: all stay.
        assert!(retire(&images, 200, 100, &keep(Some(100), None), 400).is_empty());
        // 30 bytes over: the least recently used goes, and is enough.
        assert_eq!(
            retire(&images, 230, 100, &keep(Some(100), None), 400),
            vec![1]
        );
        // 60 over: the next least recently used too.
        assert_eq!(
            retire(&images, 260, 100, &keep(Some(100), None), 400),
            vec![1, 2]
        );
        // Unbounded: nothing goes, however big.
        assert!(retire(&images, 1 << 40, 0, &keep(None, None), 400).is_empty());
        // Unused for longer than keep_duration: gone, whatever the size.
        assert_eq!(
            retire(&images, 0, 0, &keep(None, Some(150)), 400),
            vec![1, 2]
        );
    }

    #[test]
    fn an_unchanged_store_within_its_bounds_is_not_listed_again() {
        let size_only = Keep {
            storage: Some(100),
            duration: None,
        };
        let mut pace = Pace::default();
        assert!(pace.due(7, 1_000, &size_only), "first round");
        pace.checked(7, 1_000, 80, &size_only);
        assert!(!pace.due(7, 1_005, &size_only));
        assert!(!pace.due(7, 100_000, &size_only), "no time bound");
        assert!(pace.due(8, 1_005, &size_only), "a blob came or went");
        // Over its bound: every round, whatever the count says.
        pace.checked(8, 1_010, 120, &size_only);
        assert!(pace.due(8, 1_015, &size_only));
        // Under a time bound, an unchanged store ages: again after a while.
        let aging = Keep {
            storage: None,
            duration: Some(3_600),
        };
        pace.checked(9, 2_000, 10_000, &aging);
        assert!(!pace.due(9, 2_000 + RECHECK_UNCHANGED - 1, &aging));
        assert!(pace.due(9, 2_000 + RECHECK_UNCHANGED, &aging));
    }

    use super::*;

    fn c(n: u8, size: u64, last_used: u64) -> Candidate {
        Candidate {
            blob: Digest::of(&[n]),
            size,
            last_used,
        }
    }

    #[test]
    fn old_blobs_go_then_the_least_recently_used_until_under_budget() {
        let all = [c(1, 10, 100), c(2, 10, 200), c(3, 10, 300), c(4, 10, 400)];
        let none = |_: &Digest| false;
        // 40 bytes, a budget of 25: the two least recently used go.
        let keep = Keep {
            storage: Some(25),
            duration: None,
        };
        assert_eq!(
            choose(40, &all, &keep, 500, &none),
            [all[0].blob, all[1].blob]
        );
        // Unused for more than 250 s: 1 and 2 go whatever the budget.
        let keep = Keep {
            storage: None,
            duration: Some(250),
        };
        assert_eq!(
            choose(40, &all, &keep, 500, &none),
            [all[0].blob, all[1].blob]
        );
        // Under budget and nothing old: nothing goes.
        let keep = Keep {
            storage: Some(100),
            duration: Some(1000),
        };
        assert!(choose(40, &all, &keep, 500, &none).is_empty());
    }

    #[test]
    fn spare_copies_go_before_last_copies() {
        let all = [c(1, 10, 100), c(2, 10, 200), c(3, 10, 300)];
        let spare = |d: &Digest| *d == Digest::of(&[3]);
        let keep = Keep {
            storage: Some(15),
            duration: None,
        };
        // 30 bytes, 15 to free: the spare copy (3) first, then the least
        // recently used last copy (1).
        assert_eq!(
            choose(30, &all, &keep, 500, &spare),
            [all[2].blob, all[0].blob]
        );
    }

    #[test]
    fn a_named_image_s_layer_or_one_not_asked_about_is_never_evicted_however_full() {
        use crate::CopyKind;
        let all = [c(1, 10, 100), c(2, 10, 200), c(3, 10, 300), c(4, 10, 400)];
        let kinds = [
            (Digest::of(&[1]), CopyKind::Named),
            (Digest::of(&[2]), CopyKind::Last),
            (Digest::of(&[3]), CopyKind::Spare),
        ];
        let kind = |d: &Digest| kinds.iter().find(|(k, _)| k == d).map(|(_, k)| *k);
        // Far over: everything that may go goes, spare first.
        let keep = Keep {
            storage: Some(0),
            duration: Some(0),
        };
        assert_eq!(
            choose_in_cluster(40, &all, &keep, 500, &kind),
            [all[1].blob, all[2].blob]
        );
        let keep = Keep {
            storage: Some(30),
            duration: None,
        };
        assert_eq!(
            choose_in_cluster(40, &all, &keep, 500, &kind),
            [all[2].blob]
        );
    }
}
