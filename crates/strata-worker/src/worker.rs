//! The in-process worker: steps on this machine's snapshots.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use strata_cas::{Digest, Lease};
use strata_dockerfile::IgnoreMatcher;
use strata_exec::Runtime;
use strata_oci::LayerRef;
use strata_plan::{Op, Read, RunMountKind, Source, StagePlan, Step};
use strata_snapshot::View;
use strata_solver::{Job, StageResult, StepAt, Worker, WorkerError};

use crate::copy::Fetched;
use crate::error::{FileError, failed};
use crate::memo::SelectionMemo;
use crate::node::Node;
use crate::run::{Prepared, RunContext, prepare};
use crate::select::{SourceRoot, checksum};
use crate::{copy, fetch, users};

/// Runs steps on this machine.
/// Writes a build context out on first use; its directory, or why not.
pub type MakeContext = Box<dyn Fn() -> Result<PathBuf, WorkerError> + Send + Sync>;

/// Where a build's context is.
enum ContextDir {
    /// A directory on this host.
    Here(PathBuf),
    /// Written out the first time a step reads it: a build whose every
    /// step is cached never writes it.
    OnUse {
        make: MakeContext,
        made: OnceLock<Result<PathBuf, WorkerError>>,
    },
}

pub struct LocalWorker {
    node: Arc<Node>,
    context: ContextDir,
    ignore: IgnoreMatcher,
    secrets: BTreeMap<String, Vec<u8>>,
    /// `--ssh` agents: their sockets, by id.
    ssh_agents: BTreeMap<String, PathBuf>,
    lease: Mutex<Lease>,
    /// What this build downloaded, by URL: keying a step and running it
    /// need the same bytes, fetched once.
    downloads: Mutex<HashMap<String, fetch::Download>>,
    /// Unpacked artifacts standing in for a `COPY --from` source, by the
    /// copying step (its stage's Dockerfile index and its number).
    provided: Mutex<HashMap<(usize, usize), PathBuf>>,
    /// The entitlements this node grants a step.
    grants: strata_plan::Grants,
    /// What a bind mount of the context shows: a copy without the
    /// ignored files, made the first time a step needs it.
    visible_context: OnceLock<Result<tempfile::TempDir, WorkerError>>,
    /// The context's content digest when it is known (a cluster build's
    /// context tree): selections from it are then remembered by it.
    context_id: Option<Digest>,
    /// The digest of a selection from the context, from its tree.
    tree_selection: Option<TreeSelection>,
}

/// The digest [`crate::select::checksum`] gives for what `specs` select
/// in the build context (its `.dockerignore` the matcher), answered from
/// the context's tree rather than its files; `None` when the tree alone
/// cannot say, and the files are walked.
pub type TreeSelection = Box<dyn Fn(&[String], &IgnoreMatcher) -> Option<Digest> + Send + Sync>;

/// Numbers the sandboxes of this process: container IDs name runtime
/// state and cgroups, so builds side by side (a cluster worker runs
/// several) must never share one.
static CONTAINER_SEQ: AtomicU64 = AtomicU64::new(0);

fn err(message: impl Into<String>) -> WorkerError {
    WorkerError::new(message)
}

impl LocalWorker {
    /// A worker for one build: its context directory, `.dockerignore` and
    /// secrets.
    pub fn new(
        node: Arc<Node>,
        context: PathBuf,
        ignore: IgnoreMatcher,
        secrets: BTreeMap<String, Vec<u8>>,
    ) -> LocalWorker {
        let lease = Mutex::new(node.content.lease());
        LocalWorker {
            node,
            context: ContextDir::Here(context),
            ignore,
            secrets,
            ssh_agents: BTreeMap::new(),
            lease,
            downloads: Mutex::default(),
            provided: Mutex::default(),
            grants: strata_plan::Grants::default(),
            visible_context: OnceLock::new(),
            context_id: None,
            tree_selection: None,
        }
    }

    /// The context directory holds exactly the tree named `id` (written
    /// out from it, never changed): what a step selects from it is
    /// remembered by `id`, so a later build of the same tree does not hash
    /// its files again.
    pub fn context_named(mut self, id: Digest) -> LocalWorker {
        self.context_id = Some(id);
        self
    }

    /// What a step selects from the context is keyed by `select` where
    /// it can say (from the context's tree, before the context is written
    /// out, and without reading its files again).
    pub fn selecting_from_tree(mut self, select: TreeSelection) -> LocalWorker {
        self.tree_selection = Some(select);
        self
    }

    /// The context is written out by `make`, the first time a step reads
    /// it (instead of being the directory given to [`LocalWorker::new`]).
    pub fn context_made_on_use(mut self, make: MakeContext) -> LocalWorker {
        self.context = ContextDir::OnUse {
            make,
            made: OnceLock::new(),
        };
        self
    }

    /// The context's directory, written out now if it is made on use.
    fn context(&self) -> Result<PathBuf, WorkerError> {
        match &self.context {
            ContextDir::Here(dir) => Ok(dir.clone()),
            ContextDir::OnUse { make, made } => made
                .get_or_init(|| {
                    let begun = std::time::Instant::now();
                    let dir = make();
                    tracing::debug!(elapsed = ?begun.elapsed(), ok = dir.is_ok(), "wrote the build context out");
                    dir
                })
                .clone(),
        }
    }

    /// The context as a bind mount shows it: the directory itself when
    /// nothing is ignored, else a copy of what `.dockerignore` leaves.
    fn visible_context(&self) -> Result<PathBuf, WorkerError> {
        let context = self.context()?;
        if self.ignore.is_empty() {
            return Ok(context);
        }
        let made = self.visible_context.get_or_init(|| {
            let tmp = self.node.home().join("tmp");
            let dir = tempfile::Builder::new()
                .prefix("context-")
                .tempdir_in(&tmp)
                .map_err(|e| failed(FileError::io("make a directory in", &tmp)(e)))?;
            let src = SourceRoot {
                root: &context,
                ignore: Some(&self.ignore),
                keep_owner: false,
            };
            crate::select::copy_visible(&src, dir.path()).map_err(failed)?;
            Ok(dir)
        });
        match made {
            Ok(dir) => Ok(dir.path().to_path_buf()),
            Err(e) => Err(e.clone()),
        }
    }

    /// Forwards these SSH agents (sockets on this machine, by id) to the
    /// steps that mount them.
    pub fn forwarding_ssh(mut self, agents: BTreeMap<String, PathBuf>) -> LocalWorker {
        self.ssh_agents = agents;
        self
    }

    /// Lets steps have the entitlements `grants` holds; with none given, a
    /// step needing one is refused before it runs.
    pub fn granting(mut self, grants: strata_plan::Grants) -> LocalWorker {
        self.grants = grants;
        self
    }

    /// The OCI runtime, found on first use: fully cached builds need none.
    fn runtime(&self) -> Result<&Runtime, WorkerError> {
        self.node
            .runtime()
            .map_err(|e| WorkerError::from_error(e.as_ref()))
    }

    fn layers_of<'a>(
        &self,
        source: &'a Source,
        sources: &'a [Option<StageResult>],
    ) -> Result<&'a [LayerRef], WorkerError> {
        match source {
            Source::Stage(i) => sources
                .get(*i)
                .and_then(Option::as_ref)
                .map(|r| r.layers.as_slice())
                .ok_or_else(|| err("source stage has not finished")),
            Source::Image(img) => Ok(&img.layers),
            Source::Context => Ok(&[]),
        }
    }

    fn view(&self, source: &Source, sources: &[Option<StageResult>]) -> Result<View, WorkerError> {
        let blobs: Vec<Digest> = self
            .layers_of(source, sources)?
            .iter()
            .map(|l| l.blob)
            .collect();
        self.hold(&blobs);
        self.node.snapshots.view(&blobs).map_err(failed)
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A step reads `blobs` (their snapshots): they stay while this build
    /// lives, and count as just used for eviction.
    pub fn hold(&self, blobs: &[Digest]) {
        let mut lease = self.lease();
        for b in blobs {
            lease.hold(*b);
            if let Err(e) = self.node.content.touch(b) {
                tracing::debug!(blob = %b, error = %e, "cannot record a blob's use");
            }
        }
    }

    /// `file`'s content, downloaded once per build (unless stored and
    /// named by a checksum) and leased.
    fn download(&self, file: &strata_plan::RemoteFile) -> Result<fetch::Download, WorkerError> {
        let known = self
            .downloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&file.url)
            .copied();
        let d = match known {
            Some(d) => fetch::check(&self.node.content, file, d),
            None => fetch::fetch(&self.node.content, file),
        }
        .map_err(failed)?;
        self.lease().hold(d.blob);
        self.downloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(file.url.clone(), d);
        Ok(d)
    }

    /// Packs what a `COPY --from=stage` step copies out of the stage's
    /// filesystem (which must be here) into a blob: all another node needs
    /// to run the step, instead of the stage's every layer.
    pub fn artifact(
        &self,
        step: &Step,
        sources: &[Option<StageResult>],
    ) -> Result<Digest, WorkerError> {
        let Op::Copy(c) = &step.op else {
            return Err(err("only COPY --from has an artifact"));
        };
        let view = self.view(&c.from, sources)?;
        let root = view.root();
        let src = SourceRoot {
            root: &root,
            ignore: None,
            keep_owner: true,
        };
        let items = crate::select::select(&src, &c.sources).map_err(failed)?;
        let excludes = crate::select::exclude_matcher(&c.excludes).map_err(failed)?;
        let mut w = self.node.content.writer().map_err(failed)?;
        crate::select::pack(&src, &items, excludes.as_ref(), &mut w).map_err(failed)?;
        std::io::Write::flush(&mut w).map_err(failed)?;
        let blob = w.commit().map_err(failed)?;
        self.lease().hold(blob);
        Ok(blob)
    }

    /// The next run of `step` copies from `root` (an unpacked
    /// [`LocalWorker::artifact`]) instead of its source stage.
    pub fn provide_source(&self, stage: &StagePlan, step: &Step, root: PathBuf) {
        self.provided
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((stage.dockerfile_index, step.number), root);
    }

    /// The op's downloads, opened for reading (fetched now unless stored).
    fn fetched(&self, c: &strata_plan::CopyOp) -> Result<Vec<Fetched>, WorkerError> {
        let mut out = Vec::new();
        for f in &c.urls {
            let d = self.download(f)?;
            let content = self.node.content.open_blob(&d.blob).map_err(failed)?;
            out.push(Fetched {
                name: f.name.clone(),
                content: Box::new(content),
                mtime: d.mtime,
            });
        }
        Ok(out)
    }

    /// The digest of `specs` in a source, with the root that source has.
    fn source_digest(
        &self,
        source: &Source,
        specs: &[String],
        excludes: &[String],
        sources: &[Option<StageResult>],
    ) -> Result<Digest, WorkerError> {
        match source {
            Source::Context => {
                let key = self
                    .context_id
                    .map(|id| SelectionMemo::context_key(&id, specs, excludes));
                if let Some(known) = key.and_then(|k| self.node.selections.get(&k)) {
                    return Ok(known);
                }
                let from_tree = self
                    .tree_selection
                    .as_ref()
                    .filter(|_| excludes.is_empty())
                    .and_then(|select| select(specs, &self.ignore));
                if let Some(sum) = from_tree {
                    if let Some(k) = key {
                        self.node.selections.put(&k, &sum);
                    }
                    return Ok(sum);
                }
                let context = self.context()?;
                let root = SourceRoot {
                    root: &context,
                    ignore: Some(&self.ignore),
                    keep_owner: false,
                };
                let sum = checksum(&root, specs, excludes, Some(&self.node.file_digests)).map_err(
                    |e| {
                        let mut e = failed(e);
                        e.message.push_str(" in the build context");
                        e
                    },
                )?;
                if let Some(k) = key {
                    self.node.selections.put(&k, &sum);
                }
                Ok(sum)
            }
            other => {
                let layers = self.layers_of(other, sources)?;
                let key = SelectionMemo::key(layers, specs, excludes);
                if let Some(known) = self.node.selections.get(&key) {
                    return Ok(known);
                }
                let view = self.view(other, sources)?;
                let root = view.root();
                let src = SourceRoot {
                    root: &root,
                    ignore: None,
                    keep_owner: true,
                };
                let sum = checksum(&src, specs, excludes, None).map_err(failed)?;
                self.node.selections.put(&key, &sum);
                Ok(sum)
            }
        }
    }
}

/// The solver's calls, answered on the calling thread: they read files,
/// run processes and snapshot filesystems, so call them where blocking is
/// allowed ([`Embedded`] does for the embedded build; a cluster worker
/// does for the steps it is sent).
impl LocalWorker {
    /// Digests of the content a step reads besides its parent filesystem.
    pub fn inputs(&self, at: &StepAt) -> Result<Vec<Digest>, WorkerError> {
        let sources = at.sources();
        at.step()
            .op
            .reads()
            .into_iter()
            .map(|read| match read {
                Read::Paths {
                    from,
                    paths,
                    excludes,
                } => self.source_digest(from, paths, excludes, sources),
                // The checksum names the content: keying the step needs
                // no download (BuildKit's rule too).
                Read::Url(f) => match &f.sha256 {
                    Some(hex) => Ok(Digest::of(format!("sha256:{hex}").as_bytes())),
                    None => self.download(f).map(|d| d.blob),
                },
            })
            .collect()
    }

    /// Whether every blob of a cached chain is stored here.
    pub fn has_layers(&self, layers: &[LayerRef]) -> bool {
        layers
            .iter()
            .all(|l| self.node.content.contains(&l.blob).unwrap_or(false))
    }

    /// Runs a step up to its process: a step with none (COPY, WORKDIR)
    /// is done, and a RUN is made ready to start. Blocking.
    fn begin(&self, job: &Job, tee: &mut Option<LayerTee>) -> Result<Begun, WorkerError> {
        let (stage, step, sources) = (job.at.stage(), job.at.step(), job.at.sources());
        self.grants.check(&step.op.entitlements()).map_err(failed)?;
        let blobs: Vec<Digest> = job.parent.iter().map(|l| l.blob).collect();
        self.hold(&blobs);
        let active = self.node.snapshots.active(&blobs).map_err(failed)?;
        let rootfs = active.rootfs();
        match &step.op {
            Op::Mkdir(m) => mkdir(&rootfs, &m.path, &m.user).map_err(failed)?,
            Op::Copy(c) => {
                let fetched = self.fetched(c)?;
                match &c.from {
                    Source::Context => {
                        let context = self.context()?;
                        let src = SourceRoot {
                            root: &context,
                            ignore: Some(&self.ignore),
                            keep_owner: false,
                        };
                        copy::copy(c, Some(&src), fetched, &rootfs).map_err(failed)?;
                    }
                    other => {
                        let provided = self
                            .provided
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&(stage.dockerfile_index, step.number));
                        let view = match provided {
                            Some(_) => None,
                            None => Some(self.view(other, sources)?),
                        };
                        let root = match (&provided, &view) {
                            (Some(p), _) => p.clone(),
                            (None, Some(v)) => v.root(),
                            (None, None) => return Err(err("no source to copy from")),
                        };
                        let src = SourceRoot {
                            root: &root,
                            ignore: None,
                            keep_owner: true,
                        };
                        copy::copy(c, Some(&src), fetched, &rootfs).map_err(failed)?;
                    }
                }
            }
            Op::Exec(e) => {
                let n = CONTAINER_SEQ.fetch_add(1, Ordering::Relaxed);
                let id = format!("strata-{}-{n}", std::process::id());
                let bundle = self.node.home().join("run").join(&id);
                fs::create_dir_all(&bundle)
                    .map_err(|e| failed(FileError::io("create", &bundle)(e)))?;
                let views = |s: &Source| self.view(s, sources);
                let upper = active.upper();
                let binds_context = e.mounts.iter().any(|m| {
                    matches!(
                        &m.kind,
                        RunMountKind::Bind {
                            from: Source::Context,
                            ..
                        }
                    )
                });
                // Only a bind mount of the context reads it here.
                let context = match binds_context {
                    true => self.visible_context(),
                    false => Ok(PathBuf::new()),
                };
                let prepared = context.and_then(|context| {
                    let ctx = RunContext {
                        rootfs: &rootfs,
                        upper: &upper,
                        bundle: &bundle,
                        context: &context,
                        views: &views,
                        cache_mounts: &self.node.home().join("cache-mounts"),
                        secrets: &self.secrets,
                        ssh_agents: &self.ssh_agents,
                        output: Arc::clone(&job.output),
                        cancel: job.cancel.clone(),
                        id: &id,
                    };
                    prepare(e, &ctx)
                });
                return match prepared {
                    Ok(prepared) => Ok(Begun::Run(Box::new(RunStep {
                        active,
                        prepared,
                        bundle,
                    }))),
                    Err(e) => {
                        let _ = fs::remove_dir_all(&bundle);
                        Err(e)
                    }
                };
            }
        }
        self.end(active, tee.as_mut()).map(Begun::Done)
    }

    /// A step's filesystem is final: its layer, if it changed a file.
    /// Blocking.
    fn end(
        &self,
        active: strata_snapshot::Active,
        tee: Option<&mut LayerTee>,
    ) -> Result<Option<LayerRef>, WorkerError> {
        let tee = tee.map(|t| &mut **t as &mut dyn std::io::Write);
        let layer = active.commit_teeing(tee).map_err(failed)?;
        Ok(layer.map(|l| {
            self.lease().hold(l.digest);
            LayerRef {
                blob: l.digest,
                diff_id: l.diff_id,
                size: l.size,
            }
        }))
    }

    /// This machine's name, for reports.
    pub fn name(&self) -> String {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "local".into())
    }
}

/// Where a step's layer bytes also go as the layer is written.
pub type LayerTee = Box<dyn std::io::Write + Send>;

/// What a step came to on its blocking thread.
enum Begun {
    /// It ran (it has no process): its layer, if it changed a file.
    Done(Option<LayerRef>),
    /// A RUN, ready to start.
    Run(Box<RunStep>),
}

/// A RUN between its preparation and its end.
struct RunStep {
    active: strata_snapshot::Active,
    prepared: Prepared,
    bundle: PathBuf,
}

/// Kills a step's container, and removes its bundle, if the step is
/// dropped while its process runs (its build's task aborted): no process
/// outlives the step that no one waits for any more.
struct Reap {
    node: Arc<Node>,
    /// The container and its bundle, until the process is waited for.
    armed: Option<(String, PathBuf)>,
}

impl Drop for Reap {
    fn drop(&mut self) {
        let Some((id, bundle)) = self.armed.take() else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let node = Arc::clone(&self.node);
        handle.spawn(async move {
            if let Ok(runtime) = node.runtime() {
                runtime.kill(&id).await;
            }
            let _ = tokio::fs::remove_dir_all(&bundle).await;
        });
    }
}

/// Runs a step's file work `f` on a blocking thread, in the caller's span.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WorkerError> + Send + 'static,
) -> Result<T, WorkerError> {
    off_runtime(f, |e| err(format!("the step's thread failed: {e}"))).await
}

/// Runs `f`, which blocks its thread (files, the store), on a blocking
/// thread in the caller's span; a thread that stopped (it panicked)
/// becomes the error `stopped` makes of it.
pub(crate) async fn off_runtime<T: Send + 'static, E: Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
    stopped: impl FnOnce(tokio::task::JoinError) -> E,
) -> Result<T, E> {
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || span.in_scope(f)).await {
        Ok(done) => done,
        Err(e) => Err(stopped(e)),
    }
}

impl LocalWorker {
    /// Runs a step; returns the layer it added, or `None` if it changed no
    /// file. Its file work runs on blocking threads; a RUN's process is
    /// waited for as a task, so no thread waits for it.
    pub async fn execute(self: Arc<Self>, job: Job) -> Result<Option<LayerRef>, WorkerError> {
        self.execute_teeing(job, None).await
    }

    /// [`LocalWorker::execute`], the layer's bytes also written to `tee`
    /// as the layer is made (best effort: a failing `tee` fails no step).
    pub async fn execute_teeing(
        self: Arc<Self>,
        job: Job,
        mut tee: Option<LayerTee>,
    ) -> Result<Option<LayerRef>, WorkerError> {
        let worker = Arc::clone(&self);
        let (begun, tee) = blocking(move || {
            let begun = worker.begin(&job, &mut tee);
            Ok((begun, tee))
        })
        .await?;
        let step = match begun? {
            Begun::Done(layer) => return Ok(layer),
            Begun::Run(step) => step,
        };
        let mut reap = Reap {
            node: Arc::clone(&self.node),
            armed: Some((step.prepared.id().to_string(), step.bundle.clone())),
        };
        let status = match self.runtime() {
            Ok(runtime) => step.prepared.wait(runtime).await,
            Err(e) => Err(e),
        };
        reap.armed = None;
        blocking(move || {
            let RunStep {
                active,
                prepared,
                bundle,
            } = *step;
            let ended = status.and_then(|s| prepared.finish(s));
            let _ = fs::remove_dir_all(&bundle);
            ended?;
            let mut tee = tee;
            self.end(active, tee.as_mut())
        })
        .await
    }
}

/// The embedded build's worker: a [`LocalWorker`] whose blocking calls
/// run on the runtime's blocking threads, so the solver awaits them and
/// no runtime thread waits on a disk or a process.
pub struct Embedded(pub Arc<LocalWorker>);

#[async_trait::async_trait]
impl Worker for Embedded {
    async fn inputs(&self, at: &StepAt) -> Result<Vec<Digest>, WorkerError> {
        let (worker, at) = (Arc::clone(&self.0), at.clone());
        blocking(move || worker.inputs(&at)).await
    }

    fn has_layers(&self, layers: &[LayerRef]) -> bool {
        self.0.has_layers(layers)
    }

    async fn execute(&self, job: Job) -> Result<Option<LayerRef>, WorkerError> {
        LocalWorker::execute(Arc::clone(&self.0), job).await
    }

    fn name(&self) -> String {
        self.0.name()
    }
}

/// `WORKDIR`: `mkdir -p` inside the root, new directories owned by `user`.
fn mkdir(root: &Path, path: &str, user: &str) -> Result<(), crate::FileError> {
    // A USER the image cannot resolve yet (its account is made later) does
    // not stop WORKDIR: the directory is then root's, as Docker makes it.
    let id = users::resolve(root, user, false).unwrap_or_default();
    copy::make_dirs(root, path, (id.uid, id.gid)).map(drop)
}
