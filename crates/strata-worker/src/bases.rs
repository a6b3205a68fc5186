//! Base images a build names (`FROM`, `COPY --from`): resolved from the
//! local image store while planning stays pure, and pulled between
//! planning passes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use strata_dockerfile::Platform;
use strata_oci::Reference;
use strata_plan::{ImageResolver, ResolveError, ResolvedImage};
use strata_registry::{Registry, Transfer};

use crate::error::BaseImageError;

/// Resolves `FROM` (and `COPY --from`) images: the local image store
/// first, then the registry the name points at, as `docker build` does.
/// With `always_pull`, a name is pulled again once per build (`--pull`).
///
/// Planning stays pure: as an [`ImageResolver`] it reads the image store
/// only, and notes what it must pull instead of pulling.
/// [`BaseImages::plan`] drives it: it plans, pulls every image the pass
/// noted at once (awaited, on no thread of its own), and plans again.
pub struct BaseImages<'a> {
    /// The image store.
    pub store: &'a strata_oci::ImageStore,
    /// Where to pull from; `None` resolves locally only.
    pub registry: Option<&'a Registry>,
    /// `--pull`.
    pub always_pull: bool,
    /// Pull progress.
    pub progress: &'a dyn Transfer,
    /// What the pulls of this build came to, by name: `Ok` once pulled,
    /// else why not. Each name is pulled at most once per build.
    pulls: Mutex<HashMap<String, Result<(), Arc<BaseImageError>>>>,
    /// Names the last planning pass needs pulled first, with the
    /// platform it needs.
    wanted: Mutex<Vec<(String, Platform)>>,
}

impl<'a> BaseImages<'a> {
    /// Base images from `store`, pulling from `registry` what it lacks.
    pub fn new(
        store: &'a strata_oci::ImageStore,
        registry: Option<&'a Registry>,
        always_pull: bool,
        progress: &'a dyn Transfer,
    ) -> BaseImages<'a> {
        BaseImages {
            store,
            registry,
            always_pull,
            progress,
            pulls: Mutex::default(),
            wanted: Mutex::default(),
        }
    }

    /// Runs `plan` (which resolves through this resolver) until it needs
    /// nothing pulled, pulling what each pass asked for concurrently in
    /// between. Every name is pulled once at most, so this ends after at
    /// most one pass per distinct base image, plus one.
    pub async fn plan<T, E>(&self, plan: impl Fn() -> Result<T, E>) -> Result<T, E> {
        loop {
            let planned = plan();
            let wanted: Vec<(String, Platform)> = {
                let mut wanted = lock(&self.wanted);
                let pulls = lock(&self.pulls);
                let mut fresh: Vec<(String, Platform)> = Vec::new();
                for (name, platform) in wanted.drain(..) {
                    if !pulls.contains_key(&name) && !fresh.iter().any(|(n, _)| *n == name) {
                        fresh.push((name, platform));
                    }
                }
                fresh
            };
            if wanted.is_empty() {
                return planned;
            }
            let mut pulling = Vec::with_capacity(wanted.len());
            for (name, platform) in &wanted {
                pulling.push(self.pull(name, platform));
            }
            let pulled = futures_util::future::join_all(pulling).await;
            let mut pulls = lock(&self.pulls);
            for ((name, _), outcome) in wanted.into_iter().zip(pulled) {
                pulls.insert(name, outcome);
            }
        }
    }

    /// The names this build pulled.
    pub fn pulled(&self) -> Vec<String> {
        lock(&self.pulls)
            .iter()
            .filter(|(_, outcome)| outcome.is_ok())
            .map(|(name, _)| name.clone())
            .collect()
    }

    async fn pull(&self, reference: &str, platform: &Platform) -> Result<(), Arc<BaseImageError>> {
        let named = || reference.to_string();
        let Some(registry) = self.registry else {
            return Err(Arc::new(BaseImageError::NoRegistry { reference: named() }));
        };
        let parsed: Reference = reference.parse().map_err(|source| {
            Arc::new(BaseImageError::Reference {
                reference: named(),
                source,
            })
        })?;
        let target = crate::platforms::registry_target(platform);
        registry
            .pull(&parsed, target, self.store, self.progress)
            .await
            .map(|_| ())
            .map_err(|source| {
                Arc::new(BaseImageError::Pull {
                    reference: named(),
                    source: Box::new(source),
                })
            })
    }

    /// Notes that planning needs `reference` pulled, and gives it a
    /// stand-in for the rest of this pass (whose plan is thrown away).
    fn want(&self, reference: &str, platform: &Platform) -> ResolvedImage {
        lock(&self.wanted).push((reference.to_string(), platform.clone()));
        ResolvedImage {
            reference: reference.to_string(),
            manifest: strata_cas::Sha256::of(reference.as_bytes()),
            config: strata_oci::ImageConfig::scratch(
                &platform.os,
                &platform.architecture,
                platform.variant.as_deref(),
            ),
            layers: Vec::new(),
        }
    }

    fn stored(&self, reference: &str) -> Result<Option<strata_oci::Tagged>, BaseImageError> {
        self.store
            .get(reference)
            .map_err(|source| BaseImageError::Store {
                reference: reference.to_string(),
                source: Box::new(source),
            })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ImageResolver for BaseImages<'_> {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, ResolveError> {
        let pulled = lock(&self.pulls).get(reference).cloned();
        // `--pull` asks the registry, and a failed pull fails the build
        // rather than falling back to what is stored.
        if self.always_pull
            && let Some(Err(e)) = pulled
        {
            return Err(Box::new(e));
        }
        let pullable = self.registry.is_some() && pulled.is_none();
        let local = if self.always_pull && pullable {
            None
        } else {
            self.stored(reference)?
        };
        // A name holds one platform here: a stored image of another is
        // pulled again for this one where a registry has it; where none
        // does, the stored one stands and the plan refuses it by name.
        let other_platform = local.as_ref().is_some_and(|t| {
            t.image.config.os != platform.os || t.image.config.architecture != platform.architecture
        });
        if let Some(Err(e)) = &pulled
            && other_platform
        {
            tracing::info!(image = reference, error = %e, "no image of the build's platform to pull");
        }
        let found = match (local, pulled) {
            (Some(_), None) if other_platform && pullable => {
                return Ok(self.want(reference, platform));
            }
            (Some(t), _) => t,
            (None, None) if pullable => return Ok(self.want(reference, platform)),
            (None, Some(Err(e))) => return Err(Box::new(e)),
            (None, Some(Ok(()))) => {
                return Err(Box::new(BaseImageError::Vanished {
                    reference: reference.to_string(),
                }));
            }
            (None, None) => {
                return Err(Box::new(BaseImageError::NotFound {
                    reference: reference.to_string(),
                }));
            }
        };
        Ok(ResolvedImage {
            reference: found.reference.normalized(),
            manifest: found.image.manifest_digest,
            config: found.image.config,
            layers: found.image.layers,
        })
    }
}
