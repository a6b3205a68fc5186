//! Garbage collection: `strata prune`.
//!
//! Roots are the named images and, within the size budget, the most
//! recently used cache entries; edges are a blob's `ref.` labels. Cache
//! entries go first (oldest first), blobs after, so an entry never names a
//! deleted blob. Blobs a running build leases are never deleted.

use std::collections::HashSet;

use strata_cache::CacheIndex;
use strata_cas::Digest;
use strata_oci::LayerRef;
use strata_snapshot::chain_id;

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
pub fn prune(node: &Node, keep_storage: Option<u64>) -> Result<PruneReport, String> {
    let cas = &node.content;
    let blobs = cas.list().map_err(|e| e.to_string())?;
    let size_of: std::collections::HashMap<Digest, u64> =
        blobs.iter().map(|(d, i)| (*d, i.size)).collect();

    let mut roots: HashSet<Digest> = cas.leased().into_keys().collect();
    let mut chains: Vec<Vec<LayerRef>> = Vec::new();
    for t in node.images.list().map_err(|e| e.to_string())? {
        roots.insert(t.image.manifest_blob);
        roots.insert(t.image.config_blob);
        roots.extend(t.image.layers.iter().map(|l| l.blob));
        chains.push(t.image.layers);
    }
    let mut entries = node.cache.list().map_err(|e| e.to_string())?;
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
            node.cache.remove(&key).map_err(|e| e.to_string())?;
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
        if !kept.contains(d) && cas.delete(d).map_err(|e| e.to_string())? {
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
    report.snapshots = node
        .snapshots
        .remove_except(&keep_chains)
        .map_err(|e| e.to_string())?;
    report.remaining = cas.total_size().map_err(|e| e.to_string())?;
    Ok(report)
}
