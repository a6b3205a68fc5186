//! Real sandboxes: runc over a busybox root filesystem (needs root, runc
//! and busybox-static, which `scripts/setup` installs).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_exec::{ExitStatus, Mount, Network, Runtime, Sandbox, Stream};
use tokio_util::sync::CancellationToken;

fn busybox_root(dir: &Path) {
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static is installed");
    for applet in ["sh", "echo", "cat", "sleep", "id", "ls", "true"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
}

fn sandbox(script: &str) -> Sandbox {
    Sandbox {
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into(), "GREETING=hi".into()],
        cwd: "/".into(),
        uid: 0,
        gid: 0,
        additional_gids: vec![],
        hostname: "strata".into(),
        network: Network::Host,
        mounts: vec![],
        insecure: false,
        shm_size: None,
        rlimits: vec![],
    }
}

async fn run(sb: &Sandbox, cancel: &CancellationToken) -> (ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    busybox_root(&root);
    let rt = Runtime::discover(&dir.path().join("runc")).unwrap();
    let out = Arc::new(Mutex::new((String::new(), String::new())));
    let sink = Arc::clone(&out);
    // Container IDs name cgroups, which are machine-wide: tests running
    // side by side need IDs of their own.
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let id = format!(
        "strata-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let status = rt
        .run(
            &id,
            &root,
            &bundle,
            sb,
            Arc::new(move |s, b| {
                let mut o = sink.lock().unwrap();
                let text = String::from_utf8_lossy(b);
                match s {
                    Stream::Stdout => o.0.push_str(&text),
                    Stream::Stderr => o.1.push_str(&text),
                }
            }),
            cancel,
        )
        .await
        .unwrap();
    let (o, e) = out.lock().unwrap().clone();
    (status, o, e)
}

#[tokio::test]
async fn runs_with_output_and_exit_code() {
    let (status, out, err) =
        run(&sandbox("echo $GREETING from $(cat /etc/hostname 2>/dev/null || hostname); echo oops >&2; exit 3"), &CancellationToken::new()).await;
    assert_eq!(status, ExitStatus::Code(3), "stdout: {out}\nstderr: {err}");
    assert!(out.starts_with("hi from"), "{out}");
    assert_eq!(err, "oops\n");
}

#[tokio::test]
async fn a_command_that_cannot_start_says_why() {
    let mut sb = sandbox("");
    sb.args = vec!["/bin/no-such-tool".into()];
    let (status, _, err) = run(&sb, &CancellationToken::new()).await;
    assert!(!status.success());
    assert!(
        err.contains("runc: ") && err.contains("no-such-tool"),
        "{err}"
    );
}

#[tokio::test]
async fn own_pid_namespace_and_no_network() {
    let (status, out, _) = run(
        &sandbox("echo $$; ls /proc | grep -c '^[0-9]'"),
        &CancellationToken::new(),
    )
    .await;
    assert!(status.success());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1", "the step is pid 1 of its own namespace");
    let mut sb = sandbox("cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '");
    sb.network = Network::None;
    let (_, out, _) = run(&sb, &CancellationToken::new()).await;
    assert_eq!(out.trim(), "lo");
}

#[tokio::test]
async fn bind_and_tmpfs_mounts() {
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("secret"), "s3cret").unwrap();
    let mut sb = sandbox(
        "cat /run/secrets/x; echo written > /scratch/f && cat /scratch/f; echo no > /run/secrets/y",
    );
    sb.mounts = vec![
        Mount::Bind {
            source: host.path().to_path_buf(),
            destination: "/run/secrets".into(),
            read_only: true,
        },
        Mount::Tmpfs {
            destination: "/scratch".into(),
            size: Some(1 << 20),
        },
    ];
    std::fs::rename(host.path().join("secret"), host.path().join("x")).unwrap();
    let (status, out, err) = run(&sb, &CancellationToken::new()).await;
    assert_eq!(out, "s3cretwritten\n");
    assert!(!status.success() && err.contains("Read-only"), "{err}");
}

#[tokio::test]
async fn cancel_kills_the_step() {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.cancel();
    });
    let start = Instant::now();
    let (status, _, _) = run(&sandbox("sleep 30"), &cancel).await;
    assert_eq!(status, ExitStatus::Cancelled);
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn shm_size_and_resource_limits() {
    let mut sb = sandbox("ulimit -Sn; ulimit -Hn; grep ' /dev/shm ' /proc/mounts");
    let (_, out, _) = run(&sb, &CancellationToken::new()).await;
    assert!(out.contains("size=65536k"), "the default /dev/shm: {out}");
    sb.shm_size = Some(128 << 20);
    sb.rlimits = vec![strata_exec::Rlimit {
        name: "RLIMIT_NOFILE".into(),
        soft: 321,
        hard: 654,
    }];
    let (status, out, err) = run(&sb, &CancellationToken::new()).await;
    assert!(status.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], ["321", "654"], "{out}");
    assert!(lines[2].contains("size=131072k"), "{out}");
}
