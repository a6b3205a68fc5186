//! The embedded engine in one process, with runc: a RUN step's process is
//! waited for as a task, so steps whose processes wait on each other all
//! run even when the runtime has a single blocking thread.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;

use strata_dockerfile::Platform;
use strata_integration::{busybox_tar, write_files};
use strata_plan::Grants;
use strata_worker::{BuildRequest, Node};
use tokio_util::sync::CancellationToken;

/// Pull progress nobody reads.
struct Quiet;

impl strata_registry::Transfer for Quiet {
    fn start(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: &str, _: u64) {}
    fn finish(&self, _: &str, _: &str) {}
}

/// Four stages whose RUNs each wait (at most 60 s) until all four have
/// started, through a shared cache mount, and a last stage that copies
/// from each. Were a process waited for on a blocking thread, the single
/// one would hold the first RUN, the others would never start, and the
/// first would give up and fail the build.
#[test]
fn run_steps_that_wait_for_each_other_all_run_on_one_blocking_thread() {
    let home = tempfile::tempdir().unwrap();
    let ctx = tempfile::tempdir().unwrap();
    let mut dockerfile = String::new();
    for n in 0..4 {
        dockerfile.push_str(&format!(
            "FROM busybox:latest AS s{n}\n\
             RUN --mount=type=cache,id=meet,target=/meet,sharing=shared \
             touch /meet/{n} && i=0 && \
             while [ $(ls /meet | wc -l) -lt 4 ]; do \
               i=$((i+1)); [ $i -lt 1200 ] || exit 7; sleep 0.05; \
             done && echo {n} > /done\n"
        ));
    }
    dockerfile.push_str("FROM busybox:latest\n");
    for n in 0..4 {
        dockerfile.push_str(&format!("COPY --from=s{n} /done /done{n}\n"));
    }
    write_files(ctx.path(), &[("Dockerfile", &dockerfile)]);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let node = Arc::new(Node::open(home.path()).unwrap());
    let platform = Platform::host();
    let (image, _) = strata_oci::import(
        &node.images,
        &busybox_tar(),
        &node.home().join("tmp"),
        &platform.os,
        &platform.architecture,
    )
    .unwrap();
    node.images
        .tag(&"busybox:latest".parse().unwrap(), &image)
        .unwrap();
    let req = BuildRequest {
        dockerfile: ctx.path().join("Dockerfile"),
        dockerfile_name: "Dockerfile".into(),
        context: ctx.path().to_path_buf(),
        build_args: BTreeMap::new(),
        target: None,
        no_cache: false,
        no_cache_stages: Vec::new(),
        jobs: 8,
        secrets: BTreeMap::new(),
        ssh: BTreeMap::new(),
        remote_context: false,
        checks: Default::default(),
        tags: vec!["met:1".parse().unwrap()],
        platform,
        progress: Arc::new(|_| {}),
        cancel: CancellationToken::new(),
        registry: None,
        always_pull: false,
        pull_progress: Arc::new(Quiet),
        allow: Default::default(),
        grants: Grants {
            granted: Default::default(),
            node: "this machine".into(),
            setting: "{}".into(),
        },
        rewrite_timestamp: false,
        labels: BTreeMap::new(),
        run: Default::default(),
        contexts: BTreeMap::new(),
    };
    let built = runtime.block_on(strata_worker::build(Arc::clone(&node), req));
    let built = built.unwrap_or_else(|e| panic!("the build failed: {e}"));
    // Every RUN ran (none was cached), and the image holds what each wrote.
    let ran = built.solved.steps.iter().filter(|s| !s.cached).count();
    assert!(ran >= 4, "{:?}", built.solved.steps);
    assert_eq!(built.image.layers.len(), image.layers.len() + 4);
}
