//! Garbage collection: `strata prune`, and the eviction that keeps a
//! node's store within its bounds ([`Keep`]).
//!
//! Roots are the named images and, within the size budget, the most
//! recently used cache entries; edges are a blob's `ref.` labels. Cache
//! entries go first (oldest first), blobs after, so an entry never names a
//! deleted blob. Blobs a running build leases are never deleted.

use std::collections::HashSet;

use strata_cas::Digest;
use strata_oci::LayerRef;
use strata_snapshot::chain_id;

use strata_sched::{Candidate, Keep, evict::choose};

use crate::error::GcError;
use crate::node::Node;

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Cache entries forgotten.
    pub cache_entries: usize,
    /// Blobs deleted.
    pub blobs: usize,
    /// Bytes of blobs deleted.
    pub bytes: u64,
    /// Extracted snapshots removed.
    pub snapshots: usize,
    /// Bytes of blobs left.
    pub remaining: u64,
}

/// Collects unreferenced data, keeping at most `keep_storage` bytes of
/// blobs for the cache (images are always kept). `None` clears the whole
/// build cache.
pub fn prune(node: &Node, keep_storage: Option<u64>) -> Result<PruneReport, GcError> {
    let cas = &node.content;
    let blobs = cas.list()?;
    let size_of: std::collections::HashMap<Digest, u64> =
        blobs.iter().map(|(d, i)| (*d, i.size)).collect();

    let mut roots: HashSet<Digest> = cas.leased().into_keys().collect();
    let mut chains: Vec<Vec<LayerRef>> = Vec::new();
    for t in node.images.list()? {
        roots.extend(t.image.blobs());
        chains.push(t.image.layers);
    }
    let mut entries = node.cache.list()?;
    // Newest first: those are kept while the budget lasts.
    entries.sort_by_key(|(_, e)| std::cmp::Reverse(e.last_used));
    let mut report = PruneReport::default();
    let mut kept = roots.clone();
    let mut used: u64 = kept.iter().filter_map(|d| size_of.get(d)).sum();
    for (key, entry) in entries {
        let extra: u64 = entry
            .layers
            .iter()
            .filter(|l| !kept.contains(&l.blob))
            .filter_map(|l| size_of.get(&l.blob))
            .sum();
        let keep = keep_storage.is_some_and(|budget| used + extra <= budget);
        if keep {
            used += extra;
            kept.extend(entry.layers.iter().map(|l| l.blob));
            chains.push(entry.layers);
        } else {
            node.cache.remove(&key)?;
            report.cache_entries += 1;
        }
    }
    // Follow `ref.` labels (compressed forms, manifests' parts).
    let mut stack: Vec<Digest> = kept.iter().copied().collect();
    while let Some(d) = stack.pop() {
        if let Ok(Some(info)) = cas.info(&d) {
            for r in info.references() {
                if kept.insert(r) {
                    stack.push(r);
                }
            }
        }
    }
    for (d, info) in &blobs {
        if !kept.contains(d) && cas.delete(d)? {
            report.blobs += 1;
            report.bytes += info.size;
        }
    }
    if report.blobs > 0 {
        node.selections.clear()?;
    }
    let mut keep_chains = HashSet::new();
    for layers in &chains {
        let mut parent: Option<Digest> = None;
        for l in layers {
            let c = chain_id(parent.as_ref(), &l.blob);
            keep_chains.insert(c);
            parent = Some(c);
        }
    }
    report.snapshots = node.snapshots.remove_except(&keep_chains)?;
    report.remaining = cas.total_size()?;
    Ok(report)
}

/// `storage` bytes (unset: a tenth of the filesystem `home` is on, as
/// buildkitd's default) and `duration` seconds unused: a store's bounds.
pub fn keep_within(
    home: &std::path::Path,
    storage: Option<u64>,
    duration: Option<u64>,
) -> Result<Keep, GcError> {
    let storage = match storage {
        Some(bytes) => bytes,
        None => {
            let disk = |source| GcError::Disk {
                path: home.to_path_buf(),
                source,
            };
            std::fs::create_dir_all(home).map_err(disk)?;
            let fs = nix::sys::statvfs::statvfs(home).map_err(|e| disk(e.into()))?;
            fs.blocks().saturating_mul(fs.fragment_size()) / 10
        }
    };
    Ok(Keep {
        storage: Some(storage),
        duration,
    })
}

/// How often a node (worker, coordinator, local daemon) looks at its
/// store's bounds.
pub const EVICT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Seconds a new blob is never evicted for: a blob fetched for a step is
/// leased by it within moments, and a copy just taken is wanted.
pub const GRACE: u64 = 5;

/// The store's total size, and the blobs eviction may take, least
/// recently used first: neither leased by a build, nor part of a named
/// image, nor newer than [`GRACE`].
pub fn candidates(node: &Node, now: u64) -> Result<(u64, Vec<Candidate>), GcError> {
    let cas = &node.content;
    let blobs = cas.list()?;
    let total = blobs.iter().map(|(_, i)| i.size).sum();
    let mut kept: HashSet<Digest> = cas.leased().into_keys().collect();
    for t in node.images.list()? {
        kept.extend(t.image.blobs());
    }
    let mut out: Vec<Candidate> = blobs
        .into_iter()
        .filter(|(d, i)| !kept.contains(d) && now.saturating_sub(i.created) >= GRACE)
        .map(|(blob, i)| Candidate {
            blob,
            size: i.size,
            last_used: i.last_used.max(i.created),
        })
        .collect();
    out.sort_by_key(|c| (c.last_used, c.blob.0));
    Ok((total, out))
}

/// Keeps a node that is its own cache index (the local daemon's) within
/// `keep`: the cache entries whose layer chain names a blob [`choose`]
/// picks leave the index first, then the blobs go, so a hit is never
/// served for what is gone, even when the process is killed between the
/// two (a blob left behind is taken next round).
pub fn enforce(node: &Node, keep: &Keep, now: u64) -> Result<EvictReport, GcError> {
    let (total, candidates) = candidates(node, now)?;
    let victims = choose(total, &candidates, keep, now, &|_| false);
    if victims.is_empty() {
        return Ok(EvictReport {
            stored: total,
            ..EvictReport::default()
        });
    }
    let entries: Vec<(Digest, Vec<Digest>)> = node
        .cache
        .list()?
        .into_iter()
        .map(|(key, e)| (key, e.layers.iter().map(|l| l.blob).collect()))
        .collect();
    let retiring = strata_sched::copies::Retirement::plan(
        &victims,
        entries.iter().map(|(k, c)| (*k, c.as_slice())),
    );
    for key in &retiring.remove {
        node.cache.remove(key)?;
    }
    let mut report = evict(node, &victims)?;
    report.stored = total;
    report.cache_entries = retiring.remove.len();
    Ok(report)
}

/// The label on a blob that is a file or folder of a build context (a
/// coordinator's upload, a worker's fetch): such blobs are counted apart
/// by [`usage`], and a worker does not report them to the cache index.
pub const CONTEXT_LABEL: &str = "strata.context";

/// The label on the manifest of a base image a coordinator pulled to plan
/// a build: such an image is a cache, kept within the store's bounds and
/// dropped whole when they are reached, where an image put there by hand
/// stays.
pub const PULLED_LABEL: &str = "strata.pulled-for-planning";

/// Where a node's bytes are, as `strata du` and `strata cluster du` show.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Named images, and the bytes of their blobs.
    pub images: (usize, u64),
    /// Entries of this node's own cache index, and the bytes of their
    /// layers no image holds.
    pub cache: (usize, u64),
    /// Files and folders of build contexts ([`CONTEXT_LABEL`]), and
    /// their bytes.
    pub contexts: (usize, u64),
    /// Other blobs (layers a cluster's index names, artifacts,
    /// downloads), and their bytes.
    pub other: (usize, u64),
    /// Extracted snapshots, and their bytes.
    pub snapshots: (usize, u64),
    /// Bytes of `RUN --mount=type=cache` directories.
    pub cache_mounts: u64,
    /// Bytes of blobs eviction may take: neither an image's (but for
    /// images kept as a cache, [`PULLED_LABEL`]) nor held by a running
    /// build.
    pub reclaimable: u64,
    /// Bytes of all blobs.
    pub total: u64,
}

/// Where `node`'s bytes are.
pub fn usage(node: &Node) -> Result<Usage, GcError> {
    let listed = node.content.list()?;
    let labelled = |label: &str| -> HashSet<Digest> {
        listed
            .iter()
            .filter(|(_, i)| i.labels.contains_key(label))
            .map(|(d, _)| *d)
            .collect()
    };
    let (labelled, pulled) = (labelled(CONTEXT_LABEL), labelled(PULLED_LABEL));
    let blobs: std::collections::HashMap<Digest, u64> =
        listed.into_iter().map(|(d, i)| (d, i.size)).collect();
    let size_of = |set: &HashSet<Digest>| -> u64 { set.iter().filter_map(|d| blobs.get(d)).sum() };
    let images = node.images.list()?;
    let mut ids = HashSet::new();
    let mut image_blobs = HashSet::new();
    // Blobs only images kept as a cache hold.
    let mut kept_by_others = HashSet::new();
    let mut cached_blobs = HashSet::new();
    for t in &images {
        ids.insert(t.image.id);
        let all = t.image.blobs();
        if pulled.contains(&t.image.manifest_blob) {
            cached_blobs.extend(all.clone());
        } else {
            kept_by_others.extend(all.clone());
        }
        image_blobs.extend(all);
    }
    let entries = node.cache.list()?;
    let cache_blobs: HashSet<Digest> = entries
        .iter()
        .flat_map(|(_, e)| e.layers.iter().map(|l| l.blob))
        .filter(|b| !image_blobs.contains(b) && blobs.contains_key(b))
        .collect();
    let (contexts, other): (HashSet<Digest>, HashSet<Digest>) = blobs
        .keys()
        .filter(|b| !image_blobs.contains(b) && !cache_blobs.contains(b))
        .copied()
        .partition(|b| labelled.contains(b));
    let leased: HashSet<Digest> = node.content.leased().into_keys().collect();
    let reclaimable = blobs
        .iter()
        .filter(|(d, _)| {
            let cached = cached_blobs.contains(*d) && !kept_by_others.contains(*d);
            (cached || !image_blobs.contains(*d)) && !leased.contains(*d)
        })
        .map(|(_, s)| s)
        .sum();
    Ok(Usage {
        images: (ids.len(), size_of(&image_blobs)),
        cache: (entries.len(), size_of(&cache_blobs)),
        contexts: (contexts.len(), size_of(&contexts)),
        other: (other.len(), size_of(&other)),
        snapshots: (
            node.snapshots.count()?,
            crate::node::dir_bytes(&node.home().join("snapshots")),
        ),
        cache_mounts: crate::node::dir_bytes(&node.home().join("cache-mounts")),
        reclaimable,
        total: blobs.values().sum(),
    })
}

/// What an eviction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictReport {
    /// Cache entries forgotten because a blob they name went.
    pub cache_entries: usize,
    /// Blobs deleted.
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Extracted snapshots of them removed.
    pub snapshots: usize,
    /// Bytes of blobs the store held before (when it was listed).
    pub stored: u64,
}

/// Deletes `victims` (a blob leased meanwhile stays) and the snapshots
/// that extract them.
pub fn evict(node: &Node, victims: &[Digest]) -> Result<EvictReport, GcError> {
    let cas = &node.content;
    let mut report = EvictReport::default();
    let mut dropped = HashSet::new();
    for d in victims {
        let size = cas.info(d)?.map(|i| i.size);
        if let Some(size) = size
            && cas.delete(d)?
        {
            dropped.insert(*d);
            report.blobs += 1;
            report.bytes += size;
        }
    }
    if !dropped.is_empty() {
        node.selections.clear()?;
        report.snapshots = node.snapshots.remove_chains_of(&dropped)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use strata_cache::CacheEntry;
    use strata_oci::LayerRef;

    use super::*;

    fn layer(blob: Digest) -> LayerRef {
        LayerRef {
            blob,
            diff_id: strata_cas::Sha256([0; 32]),
            size: 1,
        }
    }

    #[test]
    fn entries_needing_an_evicted_blob_leave_the_index_and_the_rest_stay_whole() {
        let home = tempfile::tempdir().unwrap();
        let node = Node::open(home.path()).unwrap();
        let old = node.content.put(b"an old layer").unwrap();
        let held = node.content.put(b"a layer a running build holds").unwrap();
        let mut lease = node.content.lease();
        lease.hold(held);
        let entry = |blobs: &[Digest]| {
            CacheEntry::new(blobs.iter().map(|b| layer(*b)).collect(), true, "here")
        };
        let (k1, k2, k3) = (Digest::of(b"k1"), Digest::of(b"k2"), Digest::of(b"k3"));
        node.cache.put(&k1, &entry(&[old])).unwrap();
        node.cache.put(&k2, &entry(&[held, old])).unwrap();
        node.cache.put(&k3, &entry(&[held])).unwrap();
        // Every blob is past its grace and unused for longer than kept.
        let keep = Keep {
            storage: None,
            duration: Some(10),
        };
        let report = enforce(&node, &keep, strata_cas::now_unix() + 100).unwrap();
        assert_eq!((report.blobs, report.cache_entries), (1, 2));
        assert!(!node.content.contains(&old).unwrap());
        let left: Vec<Digest> = node
            .cache
            .list()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left, vec![k3]);
    }
}
