//! The embedded build: plan, solve on the local worker, assemble the image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_dockerfile::{Dockerfile, IgnoreMatcher, Platform};
use strata_oci::{Image, Reference};
use strata_plan::{Entitlements, Grants, ImageResolver, Options, Plan, RunSettings};
use strata_registry::{Registry, Transfer};
use strata_solver::{Progress, SolveOptions, Solved};
use tokio_util::sync::CancellationToken;

use crate::bases::BaseImages;
use crate::contexts::{Named, NamedContext, make_image, override_stages};
use crate::engine::Engine;
use crate::error::BuildError;
use crate::node::Node;
use crate::timestamps::{SOURCE_DATE_EPOCH, Timestamps, parse_source_date_epoch, store_image};
use crate::worker::{Embedded, LocalWorker, off_runtime};

/// A build to run.
pub struct BuildRequest {
    /// The Dockerfile.
    pub dockerfile: PathBuf,
    /// How errors name it: as the user gave it (`Dockerfile:3: …`).
    pub dockerfile_name: String,
    /// The context directory.
    pub context: PathBuf,
    /// `--build-arg`s.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--no-cache-filter`: stages whose steps ignore the cache.
    pub no_cache_stages: Vec<String>,
    /// Most steps at once.
    pub jobs: usize,
    /// `--secret`s, by id.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// `--ssh` agents: sockets on this machine, by id.
    pub ssh: BTreeMap<String, PathBuf>,
    /// The context was fetched from a git repository: as BuildKit, which
    /// applies `.dockerignore` only to a client's local files, none is.
    pub remote_context: bool,
    /// The build checks' configuration: with `error`, a finding of the
    /// planner's (`UndefinedVar`) it does not skip fails the build before
    /// any step runs.
    pub checks: strata_dockerfile::lint::CheckConfig,
    /// Names for the result.
    pub tags: Vec<Reference>,
    /// Platform to build for.
    pub platform: Platform,
    /// Progress events.
    pub progress: Progress,
    /// Cancels the build.
    pub cancel: CancellationToken,
    /// Where base images missing locally come from (`None`: local only).
    pub registry: Option<Arc<Registry>>,
    /// `--pull`: fetch base images again even when stored.
    pub always_pull: bool,
    /// Progress of base image pulls.
    pub pull_progress: Arc<dyn Transfer>,
    /// `--allow`: the entitlements the build asks for.
    pub allow: Entitlements,
    /// What this machine grants.
    pub grants: Grants,
    /// `--output …,rewrite-timestamp=true`: with `SOURCE_DATE_EPOCH`,
    /// clamp the base image's layers too.
    pub rewrite_timestamp: bool,
    /// `--label`s for the image.
    pub labels: BTreeMap<String, String>,
    /// What every `RUN` gets from the build's flags.
    pub run: RunSettings,
    /// `--build-context`s, by name.
    pub contexts: BTreeMap<String, NamedContext>,
}

/// A finished build.
pub struct BuildResult {
    /// The image.
    pub image: Image,
    /// The plan that was solved.
    pub plan: Arc<Plan>,
    /// What ran and what was cached.
    pub solved: Solved,
}

/// The `.dockerignore` BuildKit would use: `<Dockerfile>.dockerignore`
/// beside the Dockerfile, else `.dockerignore` in the context.
fn ignore_file(dockerfile: &Path, context: &Path) -> Option<PathBuf> {
    let beside = dockerfile.with_file_name(format!(
        "{}.dockerignore",
        dockerfile
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    [beside, context.join(".dockerignore")]
        .into_iter()
        .find(|p| p.is_file())
}

/// What decides a build's plan: the same on every node that plans it (the
/// embedded build, a cluster's coordinator and each of its workers), so
/// every node finds the same stages, steps and keys.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlanInputs {
    /// The Dockerfile's bytes.
    pub dockerfile: Vec<u8>,
    /// Its name, for errors (`Dockerfile:3: …`).
    pub dockerfile_name: String,
    /// `--build-arg`s.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// The platform built for (`linux/amd64`).
    pub platform: String,
    /// `--allow`: the entitlements the client asks for. Every node that
    /// plans the build refuses a step needing one not asked for.
    pub allow: Entitlements,
    /// `--label`s for the image.
    pub labels: BTreeMap<String, String>,
    /// `--network`, `--add-host`, `--shm-size`, `--ulimit`: what every
    /// `RUN` gets.
    pub run: RunSettings,
    /// `--build-context`s: each name → the reference it stands for, `REF`
    /// for `docker-image://REF`, `context:NAME` for an image the building
    /// node makes of a directory or layout (see [`crate::contexts`]).
    pub contexts: BTreeMap<String, String>,
}

impl PlanInputs {
    /// Reads the Dockerfile at `path`; errors call it `name`.
    pub fn read(
        path: &Path,
        name: String,
        build_args: BTreeMap<String, String>,
        target: Option<String>,
        platform: &Platform,
        allow: Entitlements,
    ) -> Result<PlanInputs, BuildError> {
        let dockerfile = std::fs::read(path)
            .map_err(|e| BuildError::Input(format!("cannot read Dockerfile {name}: {e}")))?;
        Ok(PlanInputs {
            dockerfile,
            dockerfile_name: name,
            build_args,
            target,
            platform: platform.to_string(),
            allow,
            labels: BTreeMap::new(),
            run: RunSettings::default(),
            contexts: BTreeMap::new(),
        })
    }

    /// With `--label`s for the image.
    pub fn labeled(mut self, labels: BTreeMap<String, String>) -> PlanInputs {
        self.labels = labels;
        self
    }

    /// With what every `RUN` gets from the build's flags.
    pub fn running(mut self, run: RunSettings) -> PlanInputs {
        self.run = run;
        self
    }

    /// With `--build-context`s.
    pub fn with_contexts(mut self, contexts: &BTreeMap<String, NamedContext>) -> PlanInputs {
        self.contexts = contexts
            .iter()
            .map(|(name, c)| (name.clone(), c.reference(name)))
            .collect();
        self
    }

    /// The `--build-arg`s no `ARG` of the Dockerfile declares and that
    /// are not ones BuildKit predefines (proxies, `SOURCE_DATE_EPOCH`,
    /// `BUILDKIT_*`): nothing consumes them. Empty when the Dockerfile does
    /// not parse (the build says why).
    pub fn unused_build_args(&self) -> Vec<String> {
        const PREDEFINED: &[&str] = &[
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "FTP_PROXY",
            "NO_PROXY",
            "ALL_PROXY",
            SOURCE_DATE_EPOCH,
        ];
        let Ok(df) = Dockerfile::parse(&self.dockerfile) else {
            return Vec::new();
        };
        let declared = df.declared_args();
        self.build_args
            .keys()
            .filter(|k| !declared.contains(*k))
            .filter(|k| {
                !PREDEFINED.iter().any(|p| p.eq_ignore_ascii_case(k)) && !k.starts_with("BUILDKIT_")
            })
            .cloned()
            .collect()
    }

    /// `SOURCE_DATE_EPOCH` (a build arg, which the CLI takes from the
    /// environment as buildx does), if given: it dates the image and
    /// clamps its files' times ([`crate::Timestamps`]).
    pub fn source_date_epoch(&self) -> Result<Option<i64>, BuildError> {
        self.build_args
            .get(SOURCE_DATE_EPOCH)
            .map(|v| parse_source_date_epoch(v))
            .transpose()
    }

    /// The plan, base images found by `resolver`; refused when a step
    /// needs an entitlement the client did not ask for.
    pub fn plan(&self, resolver: &dyn ImageResolver) -> Result<Plan, BuildError> {
        let mut df =
            Dockerfile::parse(&self.dockerfile).map_err(|e| e.with_file(&self.dockerfile_name))?;
        override_stages(&mut df, &self.contexts);
        let platform = Platform::parse(&self.platform).map_err(BuildError::Input)?;
        let opts = Options {
            build_args: self.build_args.clone(),
            target: self.target.clone(),
            platform,
            build_platform: Platform::host(),
            labels: self.labels.clone(),
            run: self.run.clone(),
        };
        self.source_date_epoch()?;
        let resolver = Named {
            contexts: &self.contexts,
            made: &BTreeMap::new(),
            inner: resolver,
        };
        let plan = strata_plan::plan(&df, &self.dockerfile_name, &opts, &resolver)?;
        plan.check_entitlements(&self.dockerfile_name, &self.allow)?;
        Ok(plan)
    }
}

/// The `.dockerignore` of a build, as BuildKit finds it
/// (`<Dockerfile>.dockerignore` beside the Dockerfile, else `.dockerignore`
/// in the context); empty when there is none, and for a `remote` context
/// (a git repository): BuildKit applies one only to a client's own files.
pub fn ignore_for(
    dockerfile: &Path,
    context: &Path,
    remote: bool,
) -> Result<IgnoreMatcher, BuildError> {
    if remote {
        return Ok(IgnoreMatcher::default());
    }
    match ignore_file(dockerfile, context) {
        Some(p) => {
            let bytes = std::fs::read(&p)
                .map_err(|e| BuildError::Input(format!("cannot read {}: {e}", p.display())))?;
            Ok(IgnoreMatcher::from_dockerignore(&bytes).map_err(|e| e.with_file(&p))?)
        }
        None => Ok(IgnoreMatcher::default()),
    }
}

/// Plans `req` on `node` as a build would (base images pulled, directory
/// contexts made) and runs nothing: what `--check` looks at.
pub async fn plan_only(node: &Arc<Node>, req: &BuildRequest) -> Result<Arc<Plan>, BuildError> {
    prepare(node, req).await.map(|p| p.plan)
}

/// The engine of a build on this machine.
fn engine<'a>(node: &'a Node, grants: &'a Grants, runnable: &'a [Platform]) -> Engine<'a> {
    Engine {
        grants,
        runnable,
        runs_on: "this machine",
        index: Arc::clone(&node.cache) as Arc<dyn strata_cache::CacheIndex>,
        flights: &node.flights,
    }
}

/// What a build has before its first step.
struct Prepared {
    plan: Arc<Plan>,
    ignore: IgnoreMatcher,
    stamps: Timestamps,
    lease: strata_cas::Lease,
    /// The platforms this machine runs steps for.
    runnable: Vec<Platform>,
}

/// Builds `req` on `node`.
pub async fn build(node: Arc<Node>, req: BuildRequest) -> Result<BuildResult, BuildError> {
    let prepared = prepare(&node, &req).await?;
    let plan = &prepared.plan;
    let found: Vec<&strata_dockerfile::lint::Finding> = plan
        .lint
        .iter()
        .filter(|f| req.checks.checks(f.rule))
        .collect();
    if req.checks.error && !found.is_empty() {
        let list: Vec<String> = found.iter().map(|f| format!(" - {f}")).collect();
        return Err(BuildError::Input(format!(
            "{}\n{}",
            strata_dockerfile::lint::violation(found, &req.dockerfile_name),
            list.join("\n")
        )));
    }
    solve_and_store(node, req, prepared).await
}

async fn prepare(node: &Arc<Node>, req: &BuildRequest) -> Result<Prepared, BuildError> {
    let inputs = PlanInputs::read(
        &req.dockerfile,
        req.dockerfile_name.clone(),
        req.build_args.clone(),
        req.target.clone(),
        &req.platform,
        req.allow.clone(),
    )?
    .labeled(req.labels.clone())
    .running(req.run.clone())
    .with_contexts(&req.contexts);
    let runnable = crate::platforms::runnable();
    let engine = engine(node, &req.grants, &runnable);
    engine.admit(&req.allow)?;
    if !req.context.is_dir() {
        return Err(BuildError::Input(format!(
            "build context {} is not a directory",
            req.context.display()
        )));
    }
    let ignore = ignore_for(&req.dockerfile, &req.context, req.remote_context)?;
    let stamps = Timestamps::new(inputs.source_date_epoch()?, req.rewrite_timestamp)?;
    // Directories and layouts given as contexts become images, held for
    // the build.
    let mut lease = node.content.lease();
    let made = {
        let (node, contexts, platform) =
            (Arc::clone(node), req.contexts.clone(), req.platform.clone());
        off_runtime(
            move || {
                let mut made = BTreeMap::new();
                for (name, context) in &contexts {
                    if !matches!(context, NamedContext::Image(_)) {
                        let image = make_image(&node, name, context, &platform)?;
                        made.insert(context.reference(name), image);
                    }
                }
                Ok(made)
            },
            BuildError::Stopped,
        )
        .await?
    };
    for image in made.values() {
        for l in &image.layers {
            lease.hold(l.blob);
        }
    }
    let base_images = BaseImages::new(
        &node.images,
        req.registry.as_deref(),
        req.always_pull,
        req.pull_progress.as_ref(),
    );
    let (plan, ()) = engine
        .plan(&base_images, || {
            let named = Named {
                contexts: &BTreeMap::new(),
                made: &made,
                inner: &base_images,
            };
            Ok::<_, BuildError>((inputs.plan(&named)?, ()))
        })
        .await?;
    let plan = Arc::new(plan);

    for stage in &plan.stages {
        if let strata_plan::Base::Image(img) = &stage.base {
            for l in &img.layers {
                lease.hold(l.blob);
            }
        }
    }
    Ok(Prepared {
        plan,
        ignore,
        stamps,
        lease,
        runnable,
    })
}

async fn solve_and_store(
    node: Arc<Node>,
    req: BuildRequest,
    prepared: Prepared,
) -> Result<BuildResult, BuildError> {
    let Prepared {
        plan,
        ignore,
        stamps,
        lease,
        runnable,
    } = prepared;
    let engine = engine(&node, &req.grants, &runnable);
    let worker = Arc::new(Embedded(Arc::new(
        LocalWorker::new(Arc::clone(&node), req.context.clone(), ignore, req.secrets)
            .forwarding_ssh(req.ssh)
            .granting(req.grants.clone()),
    )));
    let solve_opts = SolveOptions {
        no_cache: req.no_cache,
        no_cache_stages: req.no_cache_stages.clone(),
        jobs: req.jobs,
        slots: Some(Arc::clone(&node.slots)),
        cancel: req.cancel.clone(),
        progress: req.progress,
        source_date_epoch: stamps.source_date_epoch,
    };
    let solved = engine.solve(&plan, worker, solve_opts).await?;
    let target = &solved.stages[plan.target];
    let image = store_image(
        &node,
        target.config.clone(),
        &target.layers,
        plan.image_layers(plan.target),
        stamps,
    )
    .await?;
    for tag in &req.tags {
        node.images.tag(tag, &image)?;
    }
    drop(lease);
    Ok(BuildResult {
        image,
        plan,
        solved,
    })
}
