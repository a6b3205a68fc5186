//! Planning the same build on every node: the coordinator resolves base
//! images and hands workers what it found, and each side checks that it
//! arrived at the same plan.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use strata_cas::Digest;
use strata_dockerfile::Platform;
use strata_oci::ImageConfig;
use strata_plan::{Base, ImageResolver, Plan, ResolveError, ResolvedImage};

use crate::protocol::WireImage;

/// Pull and push progress is not shown to clients: the build's own
/// progress is, and a push's result.
pub(crate) struct Quiet;

impl strata_registry::Transfer for Quiet {
    fn start(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: &str, _: u64) {}
    fn finish(&self, _: &str, _: &str) {}
}

/// Base images that cannot cross the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A resolved image's config could not be written.
    #[error("cannot encode the config of {name}")]
    Unencodable {
        /// The image.
        name: String,
        /// Why.
        source: serde_json::Error,
    },
    /// A worker's plan names a base image the coordinator's did not.
    #[error("base image {name} was not resolved by the coordinator")]
    Unresolved {
        /// The image.
        name: String,
    },
    /// A config sent by the coordinator could not be read.
    #[error("the config of {name} is unreadable")]
    Unreadable {
        /// The image.
        name: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// A resolver that remembers what it resolved, for the workers.
pub(crate) struct Recording<'a> {
    pub inner: &'a dyn ImageResolver,
    pub seen: Mutex<Vec<(String, ResolvedImage)>>,
}

impl ImageResolver for Recording<'_> {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, ResolveError> {
        let found = self.inner.resolve(reference, platform)?;
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((reference.to_string(), found.clone()));
        Ok(found)
    }
}

impl Recording<'_> {
    /// What was resolved, as workers receive it.
    pub fn wire(&self) -> Result<Vec<WireImage>, WireError> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, r)| {
                Ok(WireImage {
                    name: name.clone(),
                    reference: r.reference.clone(),
                    manifest: r.manifest,
                    config_json: serde_json::to_vec(&r.config).map_err(|source| {
                        WireError::Unencodable {
                            name: name.clone(),
                            source,
                        }
                    })?,
                    layers: r.layers.clone(),
                })
            })
            .collect()
    }
}

/// Resolves base images from what the coordinator sent, never a registry.
pub(crate) struct Replay(HashMap<String, ResolvedImage>);

impl Replay {
    pub fn new(images: &[WireImage]) -> Result<Replay, WireError> {
        let mut map = HashMap::new();
        for w in images {
            let config: ImageConfig =
                serde_json::from_slice(&w.config_json).map_err(|source| WireError::Unreadable {
                    name: w.name.clone(),
                    source,
                })?;
            map.insert(
                w.name.clone(),
                ResolvedImage {
                    reference: w.reference.clone(),
                    manifest: w.manifest,
                    config,
                    layers: w.layers.clone(),
                },
            );
        }
        Ok(Replay(map))
    }
}

impl ImageResolver for Replay {
    fn resolve(&self, reference: &str, _: &Platform) -> Result<ResolvedImage, ResolveError> {
        self.0.get(reference).cloned().ok_or_else(|| {
            Box::new(WireError::Unresolved {
                name: reference.to_string(),
            }) as ResolveError
        })
    }
}

/// A digest of a plan's shape: stages, bases, every step's op. Two nodes
/// that planned the same build agree on it.
pub(crate) fn digest(plan: &Plan) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"strata.plan.v1\0");
    h.update(&(plan.target as u64).to_le_bytes());
    for s in &plan.stages {
        h.update(s.name.as_bytes());
        h.update(b"\0");
        match &s.base {
            Base::Scratch => {
                h.update(b"scratch");
            }
            Base::Image(img) => {
                h.update(img.manifest.as_bytes());
            }
            Base::Stage(i) => {
                h.update(&(*i as u64).to_le_bytes());
            }
        }
        for step in &s.steps {
            h.update(&(step.number as u64).to_le_bytes());
            for i in step.op.stage_inputs() {
                h.update(&(i as u64).to_le_bytes());
            }
            let bytes = strata_plan::key::op_key_bytes(&step.op);
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
        }
    }
    Digest(*h.finalize().as_bytes())
}
