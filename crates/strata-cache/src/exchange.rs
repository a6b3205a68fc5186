//! The form a cache travels in between machines (`--cache-to`,
//! `--cache-from`): a list of step keys and the layer chains they made,
//! carried as the config of an OCI manifest whose layers are those
//! chains' layers.
//!
//! The config names layers by diff_id (the sha256 of the uncompressed
//! tar, which every importer checks as it unpacks) and records by the
//! index of each layer in that list, so a layer shared by a hundred
//! records is listed, sent and checked once. Nothing here trusts the
//! bytes it reads: counts are bounded, indexes checked, digests parsed.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use strata_cas::{Digest, Sha256};
use strata_oci::LayerRef;

use crate::{CacheEntry, LocalCacheIndex, Result};

/// The media type of an exported cache's config (and the manifest's
/// `artifactType`).
pub const MEDIA_TYPE: &str = "application/vnd.strata.cache.v1+json";

/// The format tag inside the config; another tag is refused, not guessed at.
const FORMAT: &str = "strata.cache.v1";

/// The most records an imported cache may hold.
pub const MAX_RECORDS: usize = 100_000;
/// The most layers an imported cache may hold.
pub const MAX_LAYERS: usize = 20_000;
/// The deepest layer chain a record may name.
pub const MAX_CHAIN: usize = 1_000;

/// Why an exported cache cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The config is not this format.
    #[error("the cache config is not strata's: {0}")]
    Malformed(String),
    /// A limit was passed.
    #[error("the cache has {what} {count}, more than the {limit} allowed")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// How many.
        count: usize,
        /// The limit.
        limit: usize,
    },
}

/// An exported cache: what its config says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheExport {
    /// `strata.cache.v1`.
    pub format: String,
    /// Every layer of the records, by diff_id (`sha256:…`), in the order
    /// of the manifest's layers.
    pub layers: Vec<String>,
    /// The steps.
    pub records: Vec<Record>,
}

/// One step of an exported cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The step's cache key (`blake3:…`).
    pub key: String,
    /// Its layer chain, bottom first, as indexes into
    /// [`CacheExport::layers`].
    pub layers: Vec<usize>,
    /// Whether the step added the top layer.
    pub made_layer: bool,
    /// When the step was done (seconds since the epoch): its history
    /// entry's date, so an image built from imported steps is the image
    /// the exporter built.
    pub created: u64,
}

impl CacheExport {
    /// The records of `keys` that `index` holds (a key it does not hold
    /// is left out), and the layers they name in the order the config
    /// lists them.
    pub fn collect(
        index: &LocalCacheIndex,
        keys: impl IntoIterator<Item = Digest>,
    ) -> Result<(CacheExport, Vec<LayerRef>)> {
        let mut layers: Vec<LayerRef> = Vec::new();
        let mut at: HashMap<Sha256, usize> = HashMap::new();
        let mut records = BTreeMap::new();
        for key in keys {
            if records.contains_key(&key) {
                continue;
            }
            let Some(entry) = index.get(&key)? else {
                continue;
            };
            let chain = entry
                .layers
                .iter()
                .map(|l| {
                    *at.entry(l.diff_id).or_insert_with(|| {
                        layers.push(*l);
                        layers.len() - 1
                    })
                })
                .collect();
            records.insert(
                key,
                Record {
                    key: key.to_string(),
                    layers: chain,
                    made_layer: entry.made_layer,
                    created: entry.created,
                },
            );
        }
        let export = CacheExport {
            format: FORMAT.to_string(),
            layers: layers.iter().map(|l| l.diff_id.to_string()).collect(),
            records: records.into_values().collect(),
        };
        Ok((export, layers))
    }

    /// The config's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain strings, numbers and booleans: encoding cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a config, checking its format, its limits and that every
    /// record names layers it lists.
    pub fn parse(bytes: &[u8]) -> std::result::Result<CacheExport, ExchangeError> {
        let export: CacheExport =
            serde_json::from_slice(bytes).map_err(|e| ExchangeError::Malformed(e.to_string()))?;
        if export.format != FORMAT {
            return Err(ExchangeError::Malformed(format!(
                "format {:?}, not {FORMAT:?}",
                export.format
            )));
        }
        let limit = |what, count, limit| {
            if count > limit {
                Err(ExchangeError::TooLarge { what, count, limit })
            } else {
                Ok(())
            }
        };
        limit("records", export.records.len(), MAX_RECORDS)?;
        limit("layers", export.layers.len(), MAX_LAYERS)?;
        for r in &export.records {
            limit("layers in one chain", r.layers.len(), MAX_CHAIN)?;
            r.key
                .parse::<Digest>()
                .map_err(|e| ExchangeError::Malformed(format!("record key: {e}")))?;
            if let Some(i) = r.layers.iter().find(|i| **i >= export.layers.len()) {
                return Err(ExchangeError::Malformed(format!(
                    "record {} names layer {i} of {}",
                    r.key,
                    export.layers.len()
                )));
            }
        }
        export.diff_ids()?;
        Ok(export)
    }

    /// The diff_id each of the manifest's layers must unpack to.
    pub fn diff_ids(&self) -> std::result::Result<Vec<Sha256>, ExchangeError> {
        self.layers
            .iter()
            .map(|d| {
                d.parse()
                    .map_err(|e| ExchangeError::Malformed(format!("layer: {e}")))
            })
            .collect()
    }

    /// The entries to record, given the layers as stored (in the config's
    /// order, each checked against its diff_id). `producer` says where
    /// they came from.
    pub fn entries(
        &self,
        layers: &[LayerRef],
        producer: &str,
    ) -> std::result::Result<Vec<(Digest, CacheEntry)>, ExchangeError> {
        if layers.len() != self.layers.len() {
            return Err(ExchangeError::Malformed(format!(
                "{} layers stored for {} listed",
                layers.len(),
                self.layers.len()
            )));
        }
        self.records
            .iter()
            .map(|r| {
                let key = r
                    .key
                    .parse::<Digest>()
                    .map_err(|e| ExchangeError::Malformed(format!("record key: {e}")))?;
                let chain = r
                    .layers
                    .iter()
                    .map(|i| {
                        layers.get(*i).copied().ok_or_else(|| {
                            ExchangeError::Malformed(format!("record {} names layer {i}", r.key))
                        })
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let mut entry = CacheEntry::new(chain, r.made_layer, producer);
                entry.created = r.created;
                Ok((key, entry))
            })
            .collect()
    }
}

/// Records `entries` in `index`, leaving every key it holds already as
/// it is (a step this machine did is not replaced by an imported one).
/// Every blob the entries name must be stored. Returns how many it
/// recorded.
pub fn import(index: &LocalCacheIndex, entries: &[(Digest, CacheEntry)]) -> Result<usize> {
    let mut added = 0;
    for (key, entry) in entries {
        if index.get(key)?.is_none() {
            index.put(key, entry)?;
            added += 1;
        }
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalCacheIndex;
    use strata_cas::MetaDb;

    fn layer(n: u8) -> LayerRef {
        LayerRef {
            blob: Digest::of(&[n]),
            diff_id: Sha256::of(&[n]),
            size: u64::from(n),
        }
    }

    fn index(dir: &std::path::Path) -> LocalCacheIndex {
        let meta = MetaDb::open(dir, LocalCacheIndex::COLUMN_FAMILIES).unwrap();
        LocalCacheIndex::open(meta).unwrap()
    }

    #[test]
    fn records_round_trip_sharing_layers() {
        let dir = tempfile::tempdir().unwrap();
        let from = index(dir.path());
        let (k1, k2, missing) = (Digest::of(b"1"), Digest::of(b"2"), Digest::of(b"3"));
        from.put(&k1, &CacheEntry::new(vec![layer(1)], true, "a"))
            .unwrap();
        from.put(&k2, &CacheEntry::new(vec![layer(1), layer(2)], true, "a"))
            .unwrap();
        let (export, layers) = CacheExport::collect(&from, [k1, k2, missing, k1]).unwrap();
        assert_eq!(layers, vec![layer(1), layer(2)]);
        assert_eq!(export.records.len(), 2);

        let read = CacheExport::parse(&export.to_bytes()).unwrap();
        assert_eq!(read, export);
        let entries = read.entries(&layers, "cache-from").unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let to = index(dir2.path());
        // A step done here already keeps its own entry.
        to.put(&k1, &CacheEntry::new(vec![layer(9)], true, "here"))
            .unwrap();
        assert_eq!(import(&to, &entries).unwrap(), 1);
        assert_eq!(to.get(&k1).unwrap().unwrap().layers, vec![layer(9)]);
        let got = to.get(&k2).unwrap().unwrap();
        assert_eq!(got.layers, vec![layer(1), layer(2)]);
        assert_eq!(got.producer, "cache-from");
        assert_eq!(got.created, from.get(&k2).unwrap().unwrap().created);
    }

    #[test]
    fn hostile_configs_are_refused() {
        let ok = r#"{"format":"strata.cache.v1","layers":[],"records":[]}"#;
        assert!(CacheExport::parse(ok.as_bytes()).is_ok());
        let key = Digest::of(b"k").to_string();
        for bad in [
            r#"{"format":"buildkit","layers":[],"records":[]}"#.to_string(),
            r#"{"format":"strata.cache.v1","layers":["sha256:zz"],"records":[]}"#.to_string(),
            format!(
                r#"{{"format":"strata.cache.v1","layers":[],"records":[{{"key":"{key}","layers":[0],"made_layer":true,"created":0}}]}}"#
            ),
            r#"{"format":"strata.cache.v1","layers":[],"records":[{"key":"nope","layers":[],"made_layer":true,"created":0}]}"#.to_string(),
            r#"{"format":"strata.cache.v1","layers":[],"records":[],"extra":1}"#.to_string(),
            "[]".to_string(),
        ] {
            assert!(CacheExport::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        let many = CacheExport {
            format: FORMAT.into(),
            layers: vec![Sha256::of(b"x").to_string(); MAX_LAYERS + 1],
            records: Vec::new(),
        };
        let e = CacheExport::parse(&many.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }
}
