//! The solver against an in-memory worker and cache: keys, cache hits,
//! early cutoff, parallel stages, failures, publishing before recording.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_cache::{CacheEntry, CacheIndex};
use strata_cas::{Digest, Sha256};
use strata_oci::{ImageConfig, LayerRef};
use strata_plan::{Base, CopyOp, ExecOp, Op, Plan, Source, StagePlan, Step};
use strata_solver::{Job, SolveError, SolveOptions, Solver, StepAt, Worker, WorkerError};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct MemCache(Mutex<HashMap<Digest, CacheEntry>>);

impl MemCache {
    fn list(&self) -> strata_cache::Result<Vec<(Digest, CacheEntry)>> {
        Ok(self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }
}

#[async_trait::async_trait]
impl CacheIndex for MemCache {
    async fn get(&self, k: &Digest) -> strata_cache::Result<Option<CacheEntry>> {
        Ok(self.0.lock().unwrap().get(k).cloned())
    }
    async fn put(&self, k: &Digest, e: &CacheEntry) -> strata_cache::Result<()> {
        self.0.lock().unwrap().insert(*k, e.clone());
        Ok(())
    }
    async fn touch(&self, k: &Digest) -> strata_cache::Result<()> {
        if let Some(e) = self.0.lock().unwrap().get_mut(k) {
            e.last_used = strata_cas::now_unix();
        }
        Ok(())
    }
}

/// Runs "commands" by making a layer from their text; a COPY's input is
/// whatever `outputs` says its source stage produced.
#[derive(Default)]
struct FakeWorker {
    executed: Mutex<Vec<String>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// What the builder's output "is", by the command that made it.
    outputs: Mutex<HashMap<String, String>>,
    delay: Duration,
    /// Commands whose first run loses the worker (a cluster node dying).
    lose_once: Mutex<Vec<String>>,
    /// Stages the solver said it was done with, by plan index.
    done: Mutex<Vec<usize>>,
    /// Layers published, in the order their publishes finished.
    published: Mutex<Vec<Digest>>,
    /// How long publishing a layer takes.
    publish_delay: Duration,
    /// Publishing fails (no copy could be made anywhere).
    refuse_publish: bool,
    /// Layers no node holds any more.
    lost: Mutex<HashSet<Digest>>,
    /// Commands that take this much longer than `delay`.
    slow: HashMap<String, Duration>,
}

#[async_trait::async_trait]
impl Worker for FakeWorker {
    async fn inputs(&self, at: &StepAt) -> Result<Vec<Digest>, WorkerError> {
        Ok(match &at.step().op {
            Op::Copy(c) => match c.from {
                Source::Stage(i) => {
                    let src = at.sources()[i].as_ref().unwrap();
                    let top = src.layers.last().map(|l| l.blob).unwrap();
                    let made_by = self
                        .outputs
                        .lock()
                        .unwrap()
                        .get(&top.to_string())
                        .cloned()
                        .unwrap_or_default();
                    vec![Digest::of(made_by.as_bytes())]
                }
                _ => vec![],
            },
            _ => vec![],
        })
    }

    fn has_layers(&self, layers: &[LayerRef]) -> bool {
        let lost = self.lost.lock().unwrap();
        layers.iter().all(|l| !lost.contains(&l.blob))
    }

    async fn publish(&self, layer: LayerRef) -> Result<(), WorkerError> {
        tokio::time::sleep(self.publish_delay).await;
        self.published.lock().unwrap().push(layer.blob);
        if self.refuse_publish {
            return Err(WorkerError::new("no worker could take a copy"));
        }
        Ok(())
    }

    async fn execute(&self, job: Job) -> Result<Option<LayerRef>, WorkerError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let Op::Exec(e) = &job.at.step().op else {
            self.running.fetch_sub(1, Ordering::SeqCst);
            return Ok(None);
        };
        let cmd = e.args.join(" ");
        if let Some(longer) = self.slow.get(&cmd) {
            tokio::time::sleep(*longer).await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        {
            let mut lose = self.lose_once.lock().unwrap();
            if let Some(i) = lose.iter().position(|c| *c == cmd) {
                lose.remove(i);
                return Err(WorkerError::lost("the worker went away"));
            }
        }
        if cmd.contains("fail") {
            (job.output)(b"boom\n");
            return Err(WorkerError::new("exit code: 1").with_tail(vec!["boom".into()]));
        }
        self.executed.lock().unwrap().push(cmd.clone());
        let blob = Digest::of(format!("{cmd}{}", job.parent.len()).as_bytes());
        // The output "content" ignores a `# comment`: two commands that differ
        // only there produce the same bytes.
        let content = cmd.split('#').next().unwrap_or("").trim().to_string();
        self.outputs
            .lock()
            .unwrap()
            .insert(blob.to_string(), content);
        Ok(Some(LayerRef {
            blob,
            diff_id: Sha256::of(blob.hex().as_bytes()),
            size: 1,
        }))
    }

    fn name(&self) -> String {
        "fake".into()
    }

    fn stage_done(&self, stage: usize) {
        self.done.lock().unwrap().push(stage);
    }
}

fn exec(cmd: &str, n: usize) -> Step {
    Step {
        op: Op::Exec(ExecOp {
            args: vec![cmd.into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            no_network: false,
            host_network: false,
            insecure: false,
            mounts: vec![],
            extra_hosts: vec![],
            shm_size: None,
            ulimits: vec![],
            files: vec![],
        }),
        label: format!("RUN {cmd}"),
        line: n,
        number: n,
    }
}

fn copy_from(stage: usize, n: usize) -> Step {
    Step {
        op: Op::Copy(CopyOp {
            from: Source::Stage(stage),
            sources: vec!["/out".into()],
            inline: vec![],
            dest: "/".into(),
            chown: None,
            chmod: None,
            parents: false,
            excludes: vec![],
            unpack: false,
            urls: vec![],
        }),
        label: "COPY --from".into(),
        line: n,
        number: n,
    }
}

fn stage(name: &str, base: Base, steps: Vec<Step>) -> StagePlan {
    StagePlan {
        name: name.into(),
        dockerfile_index: 0,
        base,
        from_label: "FROM scratch".into(),
        steps,
        config: ImageConfig::scratch("linux", "amd64", None),
        history: vec![],
        base_history: vec![],
        platform: "linux/amd64".into(),
    }
}

fn opts() -> SolveOptions {
    SolveOptions {
        no_cache: false,
        no_cache_stages: Vec::new(),
        jobs: 4,
        slots: None,
        cancel: CancellationToken::new(),
        progress: Arc::new(|_| {}),
        source_date_epoch: None,
    }
}

fn fan_out(suffix: &str) -> Arc<Plan> {
    let mut stages = Vec::new();
    for i in 0..3 {
        stages.push(stage(
            &format!("b{i}"),
            Base::Scratch,
            vec![exec(&format!("make {i}{suffix}"), 1)],
        ));
    }
    stages.push(stage(
        "final",
        Base::Scratch,
        vec![
            copy_from(0, 1),
            copy_from(1, 2),
            copy_from(2, 3),
            exec("finish", 4),
        ],
    ));
    Arc::new(Plan {
        stages,
        target: 3,
        lint: Vec::new(),
    })
}

#[tokio::test]
async fn second_build_is_fully_cached_and_stages_run_in_parallel() {
    let worker = Arc::new(FakeWorker {
        delay: Duration::from_millis(100),
        ..Default::default()
    });
    let cache = Arc::new(MemCache::default());
    let solver = Arc::new(Solver::new(worker.clone(), cache.clone()));
    let first = solver.solve(fan_out(""), opts()).await.unwrap();
    assert_eq!(worker.executed.lock().unwrap().len(), 4);
    assert!(
        worker.max_running.load(Ordering::SeqCst) >= 2,
        "independent stages overlap"
    );
    assert!(first.steps.iter().all(|s| !s.cached));
    let second = solver.solve(fan_out(""), opts()).await.unwrap();
    assert_eq!(
        worker.executed.lock().unwrap().len(),
        4,
        "nothing runs again"
    );
    assert!(second.steps.iter().all(|s| s.cached));
    assert_eq!(first.stages[3].key, second.stages[3].key);
    assert_eq!(first.stages[3].layers, second.stages[3].layers);
}

#[tokio::test]
async fn a_stage_runs_its_steps_up_to_a_copy_from_while_that_stage_builds() {
    let worker = Arc::new(FakeWorker {
        slow: HashMap::from([("compile".to_string(), Duration::from_millis(300))]),
        ..Default::default()
    });
    let plan = Arc::new(Plan {
        stages: vec![
            stage("builder", Base::Scratch, vec![exec("compile", 1)]),
            stage(
                "final",
                Base::Scratch,
                vec![exec("apk add ca-certificates", 1), copy_from(0, 2)],
            ),
        ],
        target: 1,
        lint: Vec::new(),
    });
    let cache = Arc::new(MemCache::default());
    let solver = Arc::new(Solver::new(worker.clone(), cache));
    let solved = solver.solve(plan, opts()).await.unwrap();
    assert_eq!(
        *worker.executed.lock().unwrap(),
        ["apk add ca-certificates", "compile"],
        "the final stage's first step does not wait for the builder"
    );
    assert_eq!(
        solved.stages[1].layers.len(),
        1,
        "the copy still reads the builder's result"
    );
    let copy = solved.steps.iter().find(|s| s.instruction == "COPY --from");
    let compile = solved.steps.iter().find(|s| s.instruction == "RUN compile");
    assert!(
        matches!((copy, compile), (Some(c), Some(b)) if c.started >= b.finished),
        "the copy starts once the builder is done"
    );
}

#[tokio::test]
async fn identical_builder_output_keeps_later_steps_cached() {
    let worker = Arc::new(FakeWorker::default());
    let solver = Arc::new(Solver::new(worker.clone(), Arc::new(MemCache::default())));
    solver.solve(fan_out(""), opts()).await.unwrap();
    // The builders re-run (their command changed) but produce the same
    // content, so the final stage's COPYs and its RUN stay cached.
    let again = solver.solve(fan_out(" # reworded"), opts()).await.unwrap();
    let fin: Vec<bool> = again
        .steps
        .iter()
        .filter(|s| s.stage == "final")
        .map(|s| s.cached)
        .collect();
    assert_eq!(fin, [true, true, true, true]);
    assert_eq!(worker.executed.lock().unwrap().len(), 7);
}

#[tokio::test]
async fn no_cache_runs_everything() {
    let worker = Arc::new(FakeWorker::default());
    let solver = Arc::new(Solver::new(worker.clone(), Arc::new(MemCache::default())));
    solver.solve(fan_out(""), opts()).await.unwrap();
    let mut o = opts();
    o.no_cache = true;
    solver.solve(fan_out(""), o).await.unwrap();
    assert_eq!(worker.executed.lock().unwrap().len(), 8);
}

#[tokio::test]
async fn a_failing_step_fails_the_build_and_caches_nothing() {
    let worker = Arc::new(FakeWorker::default());
    let cache = Arc::new(MemCache::default());
    let solver = Arc::new(Solver::new(worker.clone(), cache.clone()));
    let plan = Arc::new(Plan {
        stages: vec![stage(
            "s",
            Base::Scratch,
            vec![exec("ok", 2), exec("fail now", 3), exec("never", 4)],
        )],
        target: 0,
        lint: Vec::new(),
    });
    let err = solver.solve(plan, opts()).await.unwrap_err();
    match err {
        SolveError::Step(f) => {
            assert_eq!((f.label.as_str(), f.line), ("RUN fail now", 3));
            assert_eq!(f.tail, ["boom"]);
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        cache.list().unwrap().len(),
        1,
        "only the step that succeeded is cached"
    );
    assert!(
        !worker
            .executed
            .lock()
            .unwrap()
            .contains(&"never".to_string())
    );
}

#[tokio::test]
async fn identical_steps_in_flight_run_once() {
    let worker = Arc::new(FakeWorker {
        delay: Duration::from_millis(150),
        ..Default::default()
    });
    let solver = Arc::new(Solver::new(worker.clone(), Arc::new(MemCache::default())));
    let plan = Arc::new(Plan {
        stages: vec![
            stage("a", Base::Scratch, vec![exec("same", 1)]),
            stage("b", Base::Scratch, vec![exec("same", 1)]),
        ],
        target: 1,
        lint: Vec::new(),
    });
    let (x, y) = tokio::join!(
        solver.solve(Arc::clone(&plan), opts()),
        solver.solve(plan, opts())
    );
    x.unwrap();
    y.unwrap();
    assert_eq!(worker.executed.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_lost_worker_starts_the_stage_over() {
    let worker = Arc::new(FakeWorker::default());
    worker.lose_once.lock().unwrap().push("make two".into());
    let plan = Arc::new(Plan {
        stages: vec![stage(
            "only",
            Base::Scratch,
            vec![
                exec("make one", 1),
                exec("make two", 2),
                exec("make three", 3),
            ],
        )],
        target: 0,
        lint: Vec::new(),
    });
    let solver = Arc::new(Solver::new(worker.clone(), Arc::new(MemCache::default())));
    let solved = solver.solve(plan, opts()).await.unwrap();
    // The first step's result was cached before the loss; starting over
    // finds it, then runs the rest.
    assert_eq!(
        *worker.executed.lock().unwrap(),
        ["make one", "make two", "make three"]
    );
    assert_eq!(
        solved.steps.len(),
        3,
        "one record per step: {:?}",
        solved.steps
    );
    assert_eq!(*worker.done.lock().unwrap(), [0], "the plan's one stage");
}

fn two_steps() -> Arc<Plan> {
    Arc::new(Plan {
        stages: vec![stage(
            "only",
            Base::Scratch,
            vec![exec("make one", 1), exec("make two", 2)],
        )],
        target: 0,
        lint: Vec::new(),
    })
}

#[tokio::test]
async fn a_step_is_cached_only_once_its_layer_is_published() {
    let refusing = Arc::new(FakeWorker {
        refuse_publish: true,
        ..Default::default()
    });
    let cache = Arc::new(MemCache::default());
    let solver = Arc::new(Solver::new(refusing.clone(), cache.clone()));
    // The build itself succeeds; its steps are not recorded.
    solver.solve(two_steps(), opts()).await.unwrap();
    assert_eq!(refusing.published.lock().unwrap().len(), 2);
    assert!(cache.list().unwrap().is_empty());

    let worker = Arc::new(FakeWorker {
        publish_delay: Duration::from_millis(50),
        ..Default::default()
    });
    let solver = Arc::new(Solver::new(worker.clone(), cache.clone()));
    let solved = solver.solve(two_steps(), opts()).await.unwrap();
    // The build ends with both published and recorded. Publishes run
    // concurrently, so the order they finish in is not the layers' order.
    let mut published = worker.published.lock().unwrap().clone();
    published.sort();
    let mut layers = solved.stages[0]
        .layers
        .iter()
        .map(|l| l.blob)
        .collect::<Vec<_>>();
    layers.sort();
    assert_eq!(published, layers);
    assert_eq!(cache.list().unwrap().len(), 2);
}

#[tokio::test]
async fn a_result_shared_while_it_publishes_runs_again_if_its_layer_is_lost() {
    let worker = Arc::new(FakeWorker {
        publish_delay: Duration::from_millis(400),
        ..Default::default()
    });
    let solver = Arc::new(Solver::new(worker.clone(), Arc::new(MemCache::default())));
    let plan = Arc::new(Plan {
        stages: vec![stage("only", Base::Scratch, vec![exec("make x", 1)])],
        target: 0,
        lint: Vec::new(),
    });
    let first = tokio::spawn({
        let (solver, plan) = (Arc::clone(&solver), Arc::clone(&plan));
        async move { solver.solve(plan, opts()).await }
    });
    while worker.executed.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Its worker is lost while the layer is being published.
    worker.lost.lock().unwrap().insert(Digest::of(b"make x0"));
    let second = solver.solve(plan, opts()).await.unwrap();
    assert!(!second.steps[0].cached);
    assert_eq!(*worker.executed.lock().unwrap(), ["make x", "make x"]);
    first.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_build_sharing_a_step_ends_only_once_the_step_is_published() {
    let worker = Arc::new(FakeWorker {
        delay: Duration::from_millis(100),
        publish_delay: Duration::from_millis(400),
        ..Default::default()
    });
    let solver = Arc::new(Solver::new(worker.clone(), Arc::new(MemCache::default())));
    let plan = Arc::new(Plan {
        stages: vec![stage("only", Base::Scratch, vec![exec("make shared", 1)])],
        target: 0,
        lint: Vec::new(),
    });
    // Each build, as it ends, sees how many layers were published.
    let build = || {
        let (solver, plan, worker) = (Arc::clone(&solver), Arc::clone(&plan), Arc::clone(&worker));
        tokio::spawn(async move {
            let solved = solver.solve(plan, opts()).await.unwrap();
            (solved, worker.published.lock().unwrap().len())
        })
    };
    let (x, y) = tokio::join!(build(), build());
    let ((x, x_saw), (y, y_saw)) = (x.unwrap(), y.unwrap());
    assert_eq!(worker.executed.lock().unwrap().len(), 1);
    // One ran the step, the other shared it; both ended after the publish.
    assert_ne!(x.steps[0].cached, y.steps[0].cached);
    assert_eq!((x_saw, y_saw), (1, 1));
}

/// Steps wait on their worker without holding a thread: a build of 48
/// independent stages runs them all at once on a runtime whose blocking
/// pool has one thread (a cluster's steps wait on workers for minutes;
/// a pool the size of tokio's default, 512, would cap the whole
/// coordinator).
#[test]
fn waiting_steps_hold_no_thread() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let worker = Arc::new(FakeWorker {
        delay: Duration::from_millis(500),
        ..Default::default()
    });
    let stages: Vec<StagePlan> = (0..48)
        .map(|n| {
            stage(
                &format!("s{n}"),
                Base::Scratch,
                vec![exec(&format!("wait {n}"), 1)],
            )
        })
        .collect();
    let plan = Arc::new(Plan {
        stages,
        target: 0,
        lint: Vec::new(),
    });
    let solver = Arc::new(Solver::new(worker.clone(), Arc::new(MemCache::default())));
    let options = SolveOptions { jobs: 64, ..opts() };
    rt.block_on(solver.solve(plan, options)).unwrap();
    assert_eq!(worker.executed.lock().unwrap().len(), 48);
    assert_eq!(
        worker.max_running.load(Ordering::SeqCst),
        48,
        "every waiting step was running at once"
    );
}
