//! `--cache-to` and `--cache-from`: a build's cache entries out to a
//! registry or a layout directory, and in again on another machine.
//!
//! The entries travel as [`strata_cache::exchange`] says: a manifest
//! whose config lists step keys and layer chains, whose layers are those
//! chains' layers. An import checks every blob against its digest and
//! every layer against its diff_id before any entry naming it is
//! recorded, and keeps the entries this machine has: a step it did
//! itself is not replaced.

use std::path::PathBuf;
use std::sync::Arc;

use strata_cache::exchange::{CacheExport, ExchangeError, MEDIA_TYPE, import};
use strata_cas::Digest;
use strata_oci::{Artifact, Compression, Reference};
use strata_plan::{Base, Plan};
use strata_registry::{Registry, Transfer};
use strata_solver::Solved;

use crate::error::{FlagError, FlagProblem};
use crate::node::Node;

/// Where an exported cache lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheLocation {
    /// `type=registry,ref=REF`.
    Registry(Reference),
    /// `type=local,dest=DIR` / `src=DIR`: an OCI layout, under a tag.
    Local {
        /// The layout directory.
        dir: PathBuf,
        /// The tag (`latest` unless `tag=` says).
        tag: String,
    },
}

impl std::fmt::Display for CacheLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheLocation::Registry(r) => write!(f, "{r}"),
            CacheLocation::Local { dir, tag } => write!(f, "{}:{tag}", dir.display()),
        }
    }
}

/// Which steps an export carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// The steps of the image's own stages (BuildKit's default).
    #[default]
    Min,
    /// Every step of the build, every stage's.
    Max,
}

/// One `--cache-to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheTo {
    /// Where.
    pub location: CacheLocation,
    /// Which steps.
    pub mode: CacheMode,
    /// How layers are compressed.
    pub compression: Compression,
    /// `ignore-error=true`: a failed export is a warning, not a failed build.
    pub ignore_error: bool,
}

/// One `--cache-from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheFrom {
    /// Where.
    pub location: CacheLocation,
}

/// Why a cache could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum CacheIoError {
    /// The registry failed or sent something wrong.
    #[error(transparent)]
    Registry(#[from] strata_registry::Error),
    /// The layout directory could not be read or written.
    #[error(transparent)]
    Layout(#[from] strata_oci::Error),
    /// The cache's config is not one strata reads.
    #[error(transparent)]
    Format(#[from] ExchangeError),
    /// The cache index failed.
    #[error(transparent)]
    Index(#[from] strata_cache::Error),
    /// A task stopped.
    #[error("{0}")]
    Internal(String),
}

/// BuildKit's attributes strata takes without acting on them: its cache
/// is always an OCI manifest (`image-manifest=true`, `oci-mediatypes=true`).
const ACCEPTED: &[&str] = &[
    "oci-mediatypes",
    "image-manifest",
    "compression-level",
    "force-compression",
];

/// Parses a `--cache-to` value as buildx does: `type=registry,ref=REF`
/// or `type=local,dest=DIR`, with `mode=min|max`, `compression=`,
/// `tag=` and `ignore-error=`; a bare `REF` is a registry.
pub fn parse_cache_to(s: &str) -> Result<CacheTo, FlagError> {
    let bad = |problem| flag_error("--cache-to", s, problem);
    let attrs = attributes("--cache-to", s)?;
    let mut to = CacheTo {
        location: location("--cache-to", s, &attrs, "dest")?,
        mode: CacheMode::Min,
        compression: Compression::Gzip,
        ignore_error: false,
    };
    for (k, v) in &attrs {
        match k.as_str() {
            "type" | "ref" | "dest" | "tag" => {}
            "mode" => {
                to.mode = match v.as_str() {
                    "min" => CacheMode::Min,
                    "max" => CacheMode::Max,
                    other => return Err(bad(FlagProblem::Mode(other.into()))),
                }
            }
            "compression" => {
                to.compression = match v.as_str() {
                    "gzip" => Compression::Gzip,
                    "zstd" => Compression::Zstd,
                    "uncompressed" => Compression::None,
                    other => return Err(bad(FlagProblem::Compression(other.into()))),
                }
            }
            "ignore-error" => to.ignore_error = boolean("--cache-to", s, k, v)?,
            k if ACCEPTED.contains(&k) => {}
            other => return Err(bad(FlagProblem::UnknownAttribute(other.into()))),
        }
    }
    Ok(to)
}

/// Parses a `--cache-from` value: `type=registry,ref=REF`,
/// `type=local,src=DIR[,tag=TAG]`, or a bare `REF`.
pub fn parse_cache_from(s: &str) -> Result<CacheFrom, FlagError> {
    let attrs = attributes("--cache-from", s)?;
    let location = location("--cache-from", s, &attrs, "src")?;
    if let Some((k, _)) = attrs.iter().find(|(k, _)| {
        !matches!(k.as_str(), "type" | "ref" | "src" | "tag") && !ACCEPTED.contains(&k.as_str())
    }) {
        return Err(flag_error(
            "--cache-from",
            s,
            FlagProblem::UnknownAttribute(k.clone()),
        ));
    }
    Ok(CacheFrom { location })
}

fn flag_error(flag: &'static str, value: &str, problem: FlagProblem) -> FlagError {
    FlagError {
        flag,
        value: value.to_string(),
        problem,
    }
}

fn attributes(flag: &'static str, s: &str) -> Result<Vec<(String, String)>, FlagError> {
    if !s.contains('=') {
        return Ok(vec![
            ("type".into(), "registry".into()),
            ("ref".into(), s.to_string()),
        ]);
    }
    s.split(',')
        .map(|part| match part.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => Err(flag_error(flag, s, FlagProblem::NotKeyValue(part.into()))),
        })
        .collect()
}

fn boolean(flag: &'static str, s: &str, k: &str, v: &str) -> Result<bool, FlagError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(flag_error(
            flag,
            s,
            FlagProblem::NotBoolean {
                key: k.into(),
                value: v.into(),
            },
        )),
    }
}

fn location(
    flag: &'static str,
    s: &str,
    attrs: &[(String, String)],
    dir_key: &'static str,
) -> Result<CacheLocation, FlagError> {
    let bad = |problem| flag_error(flag, s, problem);
    let get = |key: &str| {
        attrs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    match get("type").unwrap_or("registry") {
        "registry" => {
            let r = get("ref").ok_or_else(|| bad(FlagProblem::NeedsRef))?;
            let reference = r
                .parse::<Reference>()
                .map_err(|e| bad(FlagProblem::Reference(e)))?;
            Ok(CacheLocation::Registry(reference))
        }
        "local" => {
            let dir = get(dir_key)
                .filter(|d| !d.is_empty())
                .ok_or_else(|| bad(FlagProblem::NeedsDir(dir_key)))?;
            Ok(CacheLocation::Local {
                dir: PathBuf::from(dir),
                tag: get("tag").unwrap_or("latest").to_string(),
            })
        }
        other @ ("inline" | "gha" | "s3" | "azblob") => {
            Err(bad(FlagProblem::UnsupportedCache(other.into())))
        }
        other => Err(bad(FlagProblem::UnknownCache(other.into()))),
    }
}

/// The keys of the steps `mode` exports: every step of the build, or the
/// steps of the target stage and the stages it is built on.
pub fn exported_keys(plan: &Plan, solved: &Solved, mode: CacheMode) -> Vec<Digest> {
    let mut stages = std::collections::HashSet::new();
    let mut at = Some(plan.target);
    // A stage's base is an earlier stage: at most one hop per stage.
    for _ in 0..plan.stages.len() {
        let Some(i) = at else { break };
        let Some(stage) = plan.stages.get(i) else {
            break;
        };
        stages.insert(stage.name.as_str());
        at = match &stage.base {
            Base::Stage(p) => Some(*p),
            _ => None,
        };
    }
    solved
        .steps
        .iter()
        .filter(|s| mode == CacheMode::Max || stages.contains(s.stage.as_str()))
        .filter_map(|s| s.cache_key.parse::<Digest>().ok())
        .collect()
}

/// What an export did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Steps written.
    pub records: usize,
    /// Layers they name.
    pub layers: usize,
    /// Bytes sent: the blobs a registry lacked, or a layout did.
    pub bytes: u64,
}

/// Exports the entries of `keys` to `to`.
pub async fn export_cache(
    node: &Arc<Node>,
    registry: &Registry,
    to: &CacheTo,
    keys: Vec<Digest>,
    progress: &dyn Transfer,
) -> Result<Exported, CacheIoError> {
    let (export, layers) = CacheExport::collect(node.cache.as_ref(), keys)?;
    let mut lease = node.content.lease();
    for l in &layers {
        lease.hold(l.blob);
    }
    let artifact = Artifact {
        config: export.to_bytes(),
        media_type: MEDIA_TYPE.to_string(),
        layers,
    };
    let bytes = match &to.location {
        CacheLocation::Registry(reference) => {
            registry
                .push_artifact(
                    &artifact,
                    reference,
                    &node.content,
                    to.compression,
                    progress,
                )
                .await?
                .bytes_sent
        }
        CacheLocation::Local { dir, tag } => {
            let (node, dir, tag, compression) =
                (Arc::clone(node), dir.clone(), tag.clone(), to.compression);
            let artifact = artifact.clone();
            tokio::task::spawn_blocking(move || {
                strata_oci::write_artifact_layout(&node.content, &artifact, &dir, &tag, compression)
            })
            .await
            .map_err(|e| CacheIoError::Internal(format!("the cache export stopped: {e}")))??
        }
    };
    drop(lease);
    Ok(Exported {
        records: export.records.len(),
        layers: artifact.layers.len(),
        bytes,
    })
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Steps in the cache.
    pub records: usize,
    /// Steps recorded here (the others were here already).
    pub added: usize,
    /// Bytes downloaded (a layout's: 0).
    pub bytes: u64,
    /// The entries, as recorded here (for a cluster to import them too).
    pub entries: Vec<(Digest, strata_cache::CacheEntry)>,
}

/// Imports the cache at `from` into this node's index, its layers into
/// the content store.
pub async fn import_cache(
    node: &Arc<Node>,
    registry: &Registry,
    from: &CacheFrom,
    progress: &dyn Transfer,
) -> Result<Imported, CacheIoError> {
    let diff_ids = |config: &[u8]| {
        CacheExport::parse(config)
            .and_then(|e| e.diff_ids())
            .map_err(|e| e.to_string())
    };
    let (artifact, bytes) = match &from.location {
        CacheLocation::Registry(reference) => {
            registry
                .pull_artifact(reference, MEDIA_TYPE, &node.content, progress, diff_ids)
                .await?
        }
        CacheLocation::Local { dir, tag } => {
            let (node, dir, tag) = (Arc::clone(node), dir.clone(), tag.clone());
            let artifact = tokio::task::spawn_blocking(move || {
                strata_oci::read_artifact_layout(&node.content, &dir, &tag, MEDIA_TYPE, |c| {
                    diff_ids(c).map_err(strata_oci::Error::Format)
                })
            })
            .await
            .map_err(|e| CacheIoError::Internal(format!("the cache import stopped: {e}")))??;
            (artifact, 0)
        }
    };
    let mut lease = node.content.lease();
    for l in &artifact.layers {
        lease.hold(l.blob);
    }
    let export = CacheExport::parse(&artifact.config)?;
    let entries = export.entries(&artifact.layers, &format!("cache-from {}", from.location))?;
    let added = import(node.cache.as_ref(), &entries)?;
    drop(lease);
    Ok(Imported {
        records: entries.len(),
        added,
        bytes,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_as_buildx_spells_them() {
        let to = parse_cache_to("type=registry,ref=localhost:5000/app:cache,mode=max").unwrap();
        assert_eq!(to.mode, CacheMode::Max);
        assert_eq!(
            to.location,
            CacheLocation::Registry("localhost:5000/app:cache".parse().unwrap())
        );
        let to =
            parse_cache_to("type=local,dest=/tmp/c,compression=zstd,ignore-error=true").unwrap();
        assert_eq!(to.compression, Compression::Zstd);
        assert!(to.ignore_error);
        assert_eq!(to.mode, CacheMode::Min);
        assert_eq!(
            to.location,
            CacheLocation::Local {
                dir: "/tmp/c".into(),
                tag: "latest".into()
            }
        );
        let from = parse_cache_from("user/app:cache").unwrap();
        assert_eq!(
            from.location,
            CacheLocation::Registry("user/app:cache".parse().unwrap())
        );
        let from = parse_cache_from("type=local,src=/tmp/c,tag=v2").unwrap();
        assert_eq!(
            from.location,
            CacheLocation::Local {
                dir: "/tmp/c".into(),
                tag: "v2".into()
            }
        );
        assert!(
            parse_cache_to("type=registry,ref=a/b,image-manifest=true,oci-mediatypes=true").is_ok()
        );
        for (bad, says) in [
            ("type=gha", "not supported"),
            ("type=inline", "not supported"),
            ("type=local", "needs dest=DIR"),
            ("type=registry", "needs ref=REF"),
            ("type=registry,ref=a/b,mode=all", "neither min nor max"),
            ("type=registry,ref=a/b,colour=red", "unknown attribute"),
            ("type=bogus,ref=x", "unknown cache type"),
        ] {
            let e = parse_cache_to(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(
            parse_cache_from("type=local,dest=/x")
                .unwrap_err()
                .to_string()
                .contains("needs src=DIR")
        );
    }
}
