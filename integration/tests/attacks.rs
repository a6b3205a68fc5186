//! Attacks on a shared fleet, made as a hostile client would make them,
//! each asserting what the attacker and the other users see
//! (`docs/security.md` says how each is stopped).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use strata_cas::{Digest, Sha256};
use strata_cluster::config::ClientConfig;
use strata_cluster::protocol::{
    AdminRequest, AnyRequest, ClientRequest, CoordinatorRequest, Refusal, Reply, Request,
    WorkerRequest,
};
use strata_integration::cluster::Cluster;
use strata_integration::image_model::read_docker_archive;
use strata_integration::{Strata, write_files};
use strata_net::Role;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `strata build ARGS CTX` from `s`, expecting it to fail; returns
/// its stderr.
fn refused(s: &Strata, args: &[&str], ctx: &Path) -> String {
    let mut all = vec!["build", "--progress", "plain"];
    all.extend_from_slice(args);
    all.push(ctx.to_str().unwrap());
    let out = s.run(&all);
    let err = stderr(&out);
    assert!(!out.status.success(), "the build was not refused:\n{err}");
    err
}

/// Writes `text` as the Dockerfile of context `ctx`.
fn dockerfile(ctx: &Path, text: &str) {
    write_files(ctx, &[("Dockerfile", text)]);
}

/// What precedes a blob's bytes on the wire, as a peer sends it: the
/// attacker writes its own header, with whatever sha256 it likes.
#[derive(serde::Serialize)]
enum BlobHeader {
    Found { size: u64, sha256: Option<Sha256> },
}

/// A new connection to the cluster's first coordinator with the
/// credentials of `client.toml`, and the runtime it lives on.
fn connect(client: &Path) -> (tokio::runtime::Runtime, strata_net::Connection) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn = rt.block_on(async {
        let config = ClientConfig::load(client).unwrap();
        let endpoint = strata_net::Endpoint::dialer(&config.tls.identity().unwrap()).unwrap();
        let addr = config.coordinators[0].resolve().await.unwrap();
        endpoint.connect(addr).await.unwrap()
    });
    (rt, conn)
}

/// Uploads `bytes` to the cluster's first coordinator as blob `name`,
/// claiming `sha256`. Returns the coordinator's reply, or how the
/// connection ended.
fn upload(client: &Path, name: Digest, sha256: Sha256, bytes: &[u8]) -> Result<Reply, String> {
    let (rt, conn) = connect(client);
    rt.block_on(async {
        let addr = conn.addr;
        let (mut send, mut recv) = conn.open().await.unwrap();
        strata_net::write_frame(
            &mut send,
            &Request::Client(ClientRequest::PutBlob(name)),
            addr,
        )
        .await
        .unwrap();
        let header = BlobHeader::Found {
            size: bytes.len() as u64,
            sha256: Some(sha256),
        };
        strata_net::write_frame(&mut send, &header, addr)
            .await
            .unwrap();
        send.write_all(bytes).await.unwrap();
        let _ = send.finish();
        let reply = strata_net::read_frame::<Reply>(&mut recv, addr).await;
        match reply {
            Ok(Some(r)) => Ok(r),
            _ => Err(conn.quic.closed().await.to_string()),
        }
    })
}

/// Whether the coordinator holds blob `d`, asked over a new connection.
fn coordinator_has(client: &Path, d: Digest) -> bool {
    let (rt, conn) = connect(client);
    rt.block_on(async {
        let addr = conn.addr;
        let (mut send, mut recv) = conn.open().await.unwrap();
        strata_net::write_frame(&mut send, &Request::Client(ClientRequest::HasBlob(d)), addr)
            .await
            .unwrap();
        let _ = send.finish();
        match strata_net::read_frame::<Reply>(&mut recv, addr).await {
            Ok(Some(Reply::Bool(b))) => b,
            other => panic!("HasBlob answered {other:?}"),
        }
    })
}

/// A layer tar holding one file.
fn layer_with(path: &str, content: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o755);
    h.set_cksum();
    b.append_data(&mut h, path, content).unwrap();
    b.into_inner().unwrap()
}

/// The top layer of image `tag` in `s`'s store: its blake3 name, its
/// sha256 (diff_id) and its size.
fn top_layer(s: &Strata, tag: &str) -> (Digest, Sha256, u64) {
    let bytes = strata_integration::image_model::top_layer(s, tag).unwrap();
    assert!(
        !bytes.starts_with(&[0x1f, 0x8b]),
        "layers are saved uncompressed"
    );
    (Digest::of(&bytes), Sha256::of(&bytes), bytes.len() as u64)
}

/// Asks the node at `addr` for blob `d` with the credentials of client
/// configuration `client`: the blob's size, or the refusal.
fn get_blob(client: &Path, addr: std::net::SocketAddr, d: Digest) -> Result<Option<u64>, String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let config = ClientConfig::load(client).unwrap();
        let endpoint = strata_net::Endpoint::dialer(&config.tls.identity().unwrap()).unwrap();
        let conn = endpoint.connect(addr).await.unwrap();
        let (mut send, mut recv) = conn.open().await.unwrap();
        strata_net::write_frame(&mut send, &Request::Any(AnyRequest::GetBlob(d)), addr)
            .await
            .unwrap();
        let _ = send.finish();
        let cas = std::sync::Arc::new(strata_cas::ContentStore::open(store.path()).unwrap());
        strata_net::recv_blob(&mut recv, &cas, &d, addr)
            .await
            .map_err(|e| e.to_string())
    })
}

/// Where the nodes of `cluster` serve blobs: each worker, then the
/// coordinator.
fn blob_services(cluster: &Cluster) -> Vec<std::net::SocketAddr> {
    let mut all: Vec<_> = cluster
        .worker_names()
        .iter()
        .map(|w| {
            strata_cluster::config::WorkerConfig::load(&cluster.path().join(format!("{w}.toml")))
                .unwrap()
                .listen
        })
        .collect();
    let coordinator = &cluster.coordinator_names()[0];
    all.push(
        strata_cluster::config::CoordinatorConfig::load(
            &cluster.path().join(format!("{coordinator}.toml")),
        )
        .unwrap()
        .listen,
    );
    all
}

/// Two teams of one cluster, team A's configuration being `client.toml`
/// and team B's one `cluster add-client` issued.
struct Teams {
    a: std::path::PathBuf,
    b: std::path::PathBuf,
    /// Team A's state, holding its build `a:1`.
    a_state: Strata,
    /// The context of that build.
    ctx: tempfile::TempDir,
    /// Its top layer, holding a secret.
    secret: Digest,
}

/// Adds team B to `cluster`, and has team A build a layer holding a
/// secret.
fn two_teams_and_a_secret(cluster: &Cluster) -> Teams {
    let added = cluster.ok(&[
        "cluster",
        "add-client",
        "team-b",
        "--dir",
        cluster.path().to_str().unwrap(),
    ]);
    assert!(added.contains("team-b.toml"), "{added}");
    let ctx = tempfile::tempdir().unwrap();
    dockerfile(
        ctx.path(),
        "FROM busybox:latest\nRUN head -c 16 /dev/urandom | od -x > /secret\n",
    );
    let a_state = Strata::new();
    cluster.build_via(&cluster.client(), &a_state, ctx.path(), &["-t", "a:1"]);
    let secret = top_layer(&a_state, "a:1").0;
    Teams {
        a: cluster.client(),
        b: cluster.path().join("team-b.toml"),
        a_state,
        ctx,
        secret,
    }
}

#[test]
fn a_client_reads_only_the_blobs_of_its_own_builds() {
    let cluster = Cluster::start(2, 5);
    let Teams {
        a: team_a,
        b: team_b,
        ctx,
        secret,
        ..
    } = two_teams_and_a_secret(&cluster);

    // Team B, knowing the digest, gets nothing from any node, and is told
    // why; team A may read it again from whoever holds it.
    let mut served = 0;
    for addr in blob_services(&cluster) {
        let e = get_blob(&team_b, addr, secret).unwrap_err();
        assert!(
            e.contains("client team-b may read only the layers of its own builds"),
            "{e}"
        );
        if let Ok(Some(_)) = get_blob(&team_a, addr, secret) {
            served += 1;
        }
    }
    assert!(served >= 1, "no node served team A its own layer");

    // Team B's own build of the same Dockerfile is a cache hit: its image
    // is the same, and now the layer is team B's to read too.
    let b = Strata::new();
    let report = cluster.build_via(&team_b, &b, ctx.path(), &["-t", "b:1"]);
    assert_eq!(strata_integration::cluster::runs(&report), 0, "{report}");
    assert_eq!(top_layer(&b, "b:1").0, secret);
    let readable = blob_services(&cluster)
        .into_iter()
        .filter(|addr| matches!(get_blob(&team_b, *addr, secret), Ok(Some(_))))
        .count();
    assert!(readable >= 1);
}

#[test]
fn a_copy_whose_content_is_not_the_layer_the_index_names_is_refused() {
    let cluster = Cluster::start(1, 5);
    let (blob, diff_id, size) = top_layer(&Strata::new().with_busybox(&[]), "busybox:latest");
    let name = &cluster.coordinator_names()[0];
    let config = strata_cluster::config::CoordinatorConfig::load(
        &cluster.path().join(format!("{name}.toml")),
    )
    .unwrap();
    let services = blob_services(&cluster);
    let (worker, coordinator) = (services[0], services[1]);
    // A coordinator asks the worker to copy busybox's layer (which the
    // coordinator holds), naming it by a diff_id it does not have.
    let copy = |diff_id: Sha256| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let endpoint = strata_net::Endpoint::dialer(&config.tls.identity().unwrap()).unwrap();
            let conn = endpoint.connect(worker).await.unwrap();
            let (mut send, mut recv) = conn.open().await.unwrap();
            let copy = strata_cluster::protocol::CopyBlob {
                layer: strata_oci::LayerRef {
                    blob,
                    diff_id,
                    size,
                },
                holders: vec![strata_cluster::protocol::Holder {
                    name: name.clone(),
                    addr: coordinator,
                }],
                bytes_per_second: None,
            };
            let request = Request::Coordinator(CoordinatorRequest::Copy(Box::new(copy)));
            strata_net::write_frame(&mut send, &request, worker)
                .await
                .unwrap();
            let _ = send.finish();
            strata_net::read_frame::<Reply>(&mut recv, worker)
                .await
                .unwrap()
                .unwrap()
        })
    };
    let lie = copy(Sha256::of(b"not busybox"));
    match lie {
        Reply::Copied(Err(strata_cluster::protocol::CopyError::NotTheLayer(e))) => {
            assert!(e.contains("was reported as diff_id"), "{e}");
        }
        other => panic!("a copy under a false diff_id was answered {other:?}"),
    }
    assert!(matches!(copy(diff_id), Reply::Copied(Ok(()))));
}

#[test]
fn a_client_over_its_upload_quota_is_refused_with_the_setting_named() {
    let cluster = Cluster::start_with(1, 1, &[("upload_quota_mib_per_hour", "2".into())]);
    let s = Strata::new();
    // A context of 3 MiB of incompressible bytes passes the quota.
    let ctx = tempfile::tempdir().unwrap();
    dockerfile(ctx.path(), "FROM busybox:latest\nCOPY big /big\n");
    let mut big = vec![0u8; 3 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in &mut big {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(ctx.path().join("big"), &big).unwrap();
    let mut args = vec!["build", "--cluster"];
    let client = cluster.client();
    args.push(client.to_str().unwrap());
    args.push(ctx.path().to_str().unwrap());
    let out = s.run(&args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    // The context's folders went first (a few hundred bytes); its 3 MiB
    // file is refused before a byte of it is stored.
    assert!(
        err.contains("client has uploaded ")
            && err.contains("3145728 more would pass its quota of 2097152 bytes an hour")
            && err.contains("upload_quota_mib_per_hour"),
        "{err}"
    );
    // A small context still builds: the refused upload did not count.
    let small = tempfile::tempdir().unwrap();
    dockerfile(small.path(), "FROM busybox:latest\nRUN echo ok > /ok\n");
    cluster.build(&s, small.path(), &[]);
}

/// `n` QUIC Initial packets (TLS ClientHellos) a client with the
/// credentials of `client` sends when it dials, captured on a socket that
/// never answers.
fn captured_client_hellos(client: &Path, n: usize) -> Vec<Vec<u8>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = ClientConfig::load(client).unwrap();
        let dialer = strata_net::Endpoint::dialer(&config.tls.identity().unwrap()).unwrap();
        let tap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tap_addr = tap.local_addr().unwrap();
        let mut hellos = Vec::new();
        for _ in 0..n {
            let d = dialer.clone();
            let attempt = tokio::spawn(async move { d.connect(tap_addr).await });
            let mut buf = vec![0u8; 65_536];
            let (len, _) = tap.recv_from(&mut buf).await.unwrap();
            hellos.push(buf[..len].to_vec());
            attempt.abort();
        }
        hellos
    })
}

#[test]
fn replayed_handshakes_do_not_stop_a_client_that_keeps_working() {
    let cluster = Cluster::start(1, 5);
    let coordinator = *blob_services(&cluster).last().unwrap();
    let hellos = captured_client_hellos(&cluster.client(), 40);
    // The attacker replays a captured ClientHello from a new port every
    // 100 ms, each a handshake that never finishes, for as long as the
    // client works.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let replayer = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut sockets = Vec::new();
            for hello in hellos.iter().cycle() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.send_to(hello, coordinator).unwrap();
                sockets.push(s);
                std::thread::sleep(Duration::from_millis(100));
            }
            sockets.len()
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    // Meanwhile every status call answers (a coordinator that awaited
    // the stalled handshakes in turn let the client's 3 s connect time
    // run out), and a build goes through.
    for _ in 0..5 {
        let status = cluster.status();
        assert!(status.contains("worker-1"), "{status}");
    }
    let ctx = tempfile::tempdir().unwrap();
    dockerfile(ctx.path(), "FROM busybox:latest\nRUN echo through > /f\n");
    cluster.build(&Strata::new(), ctx.path(), &[]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let replayed = replayer.join().unwrap();
    assert!(replayed >= 10, "only {replayed} handshakes were replayed");
}

#[test]
fn a_blob_sent_under_busybox_s_diff_id_is_refused_and_poisons_nothing() {
    let cluster = Cluster::start(1, 5);
    let victim = Strata::new().with_busybox(&[]);
    let saved = victim.home().join("busybox.tar");
    victim.ok(&["save", "-o", saved.to_str().unwrap(), "busybox:latest"]);
    let busybox = read_docker_archive(&saved).unwrap();
    let diff_id = busybox.config["rootfs"]["diff_ids"][0]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let diff_id = Sha256::from_hex(&diff_id).unwrap();

    // The attacker's filesystem, labelled with busybox's diff_id: the
    // coordinator hashes what arrives, refuses it and hangs up.
    let evil = layer_with("pwned", b"#!/bin/sh\necho owned\n");
    let name = Digest::of(&evil);
    let e = upload(&cluster.client(), name, diff_id, &evil).unwrap_err();
    assert!(e.contains("did not hash to its name"), "{e}");
    assert!(!coordinator_has(&cluster.client(), name));

    // The same bytes under their own sha256 are an ordinary upload: the
    // refusal above was for the lie, not the bytes.
    let honest = upload(&cluster.client(), name, Sha256::of(&evil), &evil).unwrap();
    assert!(matches!(honest, Reply::Ok), "{honest:?}");
    assert!(coordinator_has(&cluster.client(), name));

    // Another client's FROM busybox gets busybox.
    let ctx = tempfile::tempdir().unwrap();
    dockerfile(
        ctx.path(),
        "FROM busybox:latest\nRUN test ! -e /pwned && /bin/busybox true && echo clean > /ok\n",
    );
    cluster.build(&victim, ctx.path(), &["-t", "victim:1"]);
    let out = victim.home().join("victim.tar");
    victim.ok(&["save", "-o", out.to_str().unwrap(), "victim:1"]);
    let image = read_docker_archive(&out).unwrap();
    let root = &image.fs["(dir)"];
    assert!(root.get("pwned").is_none(), "{root}");
    assert!(root.get("ok").is_some(), "{root}");
    assert!(root["bin"]["(dir)"].get("busybox").is_some(), "{root}");
    assert_eq!(
        image.config["rootfs"]["diff_ids"][0],
        busybox.config["rootfs"]["diff_ids"][0]
    );
}

#[test]
fn insecure_and_host_network_need_the_client_s_allow_and_the_node_s_grant() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    dockerfile(
        ctx.path(),
        "FROM busybox:latest\nRUN --security=insecure grep CapEff /proc/self/status\n",
    );
    // Asked for by the Dockerfile alone: refused before anything runs.
    let e = refused(&s, &[], ctx.path());
    assert!(
        e.contains(":2: RUN --security=insecure grep CapEff /proc/self/status: --security=insecure needs the entitlement security.insecure: pass `--allow security.insecure` to strata build"),
        "{e}"
    );
    assert!(!e.contains("CapEff:"), "{e}");
    // Allowed by the client, not granted by the machine.
    let e = refused(&s, &["--allow", "security.insecure"], ctx.path());
    assert!(
        e.contains("granting the entitlement security.insecure is not allowed by this machine: `--allow-insecure-entitlement security.insecure`"),
        "{e}"
    );
    // Both: the step runs with every capability.
    let out = s.run(&[
        "build",
        "--progress",
        "plain",
        "--allow",
        "security.insecure",
        "--allow-insecure-entitlement",
        "security.insecure",
        ctx.path().to_str().unwrap(),
    ]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    let host = std::fs::read_to_string("/proc/self/status").unwrap();
    let host_caps = host.lines().find(|l| l.starts_with("CapBnd:")).unwrap();
    let want = host_caps.replace("CapBnd:", "CapEff:");
    assert!(log.contains(&want), "{want} not in\n{log}");

    // The same for the host's network, and an unknown entitlement.
    dockerfile(ctx.path(), "FROM busybox:latest\nRUN --network=host true\n");
    let e = refused(&s, &[], ctx.path());
    assert!(
        e.contains("--network=host needs the entitlement network.host"),
        "{e}"
    );
    let e = refused(&s, &["--allow", "network.hots"], ctx.path());
    assert!(e.contains("unknown entitlement \"network.hots\""), "{e}");

    // On a cluster, the workers grant: none does by default.
    let cluster = Cluster::start(1, 5);
    let client = cluster.client();
    let client = client.to_str().unwrap();
    let e = refused(
        &s,
        &["--cluster", client, "--allow", "network.host"],
        ctx.path(),
    );
    assert!(
        e.contains("granting the entitlement network.host is not allowed by any live worker of this cluster: insecure_entitlements = [\"network.host\"] in a worker's worker.toml grants it"),
        "{e}"
    );
    let e = refused(&s, &["--cluster", client], ctx.path());
    assert!(
        e.contains("needs the entitlement network.host: pass `--allow network.host`"),
        "{e}"
    );
}

/// Whether process `pid` is alive.
fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_dockerfile_built_to_exhaust_the_frontend_stops_no_coordinator() {
    let cluster = Cluster::start_group(3, 1, 5);
    let client = cluster.client();
    let client = client.to_str().unwrap();
    let s = Strata::new();
    let ctx = tempfile::tempdir().unwrap();

    // 10,000 nested expansions on one 60 KB line.
    let depth = 10_000;
    let word = format!("{}x{}", "${a:-".repeat(depth), "}".repeat(depth));
    dockerfile(
        ctx.path(),
        &format!("FROM busybox:latest\nARG a\nENV v={word}\n"),
    );
    let e = refused(&s, &["--cluster", client], ctx.path());
    assert!(e.contains("Dockerfile:3:"), "{e}");
    assert!(e.contains("expansions are nested more than 64 deep"), "{e}");
    // Refused once, not handed to the next coordinator.
    assert!(!e.contains("submitting the build to another"), "{e}");

    // A chain of ARGs, each twice the last.
    let mut text = String::from("FROM busybox:latest\nARG a0=xxxxxxxxxxxxxxxx\n");
    for i in 1..64 {
        text.push_str(&format!("ARG a{i}=${{a{}}}${{a{}}}\n", i - 1, i - 1));
    }
    text.push_str("ENV v=$a63\n");
    dockerfile(ctx.path(), &text);
    let e = refused(&s, &["--cluster", client], ctx.path());
    assert!(e.contains("over the limit of 1048576 bytes"), "{e}");

    for name in cluster.coordinator_names() {
        assert!(alive(cluster.pid(&name)), "{name} is gone");
    }
    // And the group still builds.
    dockerfile(ctx.path(), "FROM busybox:latest\nRUN echo fine > /f\n");
    cluster.build(&s, ctx.path(), &["-t", "fine:1"]);
}

#[test]
fn a_setuid_root_file_in_a_layer_is_out_of_reach_of_other_users() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    dockerfile(
        ctx.path(),
        "FROM busybox:latest\nRUN mkdir -p /opt/suid && cp /bin/busybox /opt/suid/id && chmod 4755 /opt/suid/id\n",
    );
    s.build(ctx.path(), &[]);
    // The layer's setuid-root busybox is extracted in a snapshot, as any
    // layer's files are.
    let found = std::process::Command::new("find")
        .arg(s.home().join("snapshots"))
        .args(["-path", "*/opt/suid/id", "-perm", "-4000"])
        .output()
        .unwrap();
    let suid = String::from_utf8_lossy(&found.stdout)
        .lines()
        .next()
        .expect("the setuid file is in a snapshot")
        .to_string();
    // An unprivileged user of the host cannot reach it: the state
    // directory is its owner's alone.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(s.home()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["sh", "-c"])
        .arg(format!("{suid} -u"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an unprivileged user ran {suid}, as euid {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn dockerignore_holds_through_symlinks_and_bind_mounts_of_the_context() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            (".dockerignore", "secret.env\nprivate\n"),
            ("secret.env", "TOKEN=hunter2\n"),
            ("private/key", "-----KEY-----\n"),
            ("public.txt", "hello\n"),
        ],
    );
    std::os::unix::fs::symlink("secret.env", ctx.path().join("link")).unwrap();
    std::os::unix::fs::symlink("private", ctx.path().join("dirlink")).unwrap();

    // A bind mount of the context shows what the context holds for the
    // build: not the ignored files.
    dockerfile(
        ctx.path(),
        "FROM busybox:latest\nRUN --mount=type=bind,target=/ctx sh -c 'ls -a /ctx; cat /ctx/public.txt; cat /ctx/secret.env /ctx/link /ctx/private/key /ctx/dirlink/key 2>&1; true' > /seen\n",
    );
    s.build(ctx.path(), &["-t", "seen:1"]);
    let seen = s.ok(&["run", "--rm", "seen:1", "cat", "/seen"]);
    assert!(
        seen.contains("hello") && seen.contains("public.txt"),
        "{seen}"
    );
    assert!(!seen.contains("hunter2") && !seen.contains("KEY"), "{seen}");

    // COPY through a symlink to an ignored file finds nothing, as with
    // BuildKit, whose context never holds the ignored file.
    for source in ["link", "dirlink/key"] {
        dockerfile(
            ctx.path(),
            &format!("FROM busybox:latest\nCOPY {source} /x\n"),
        );
        let err = refused(&s, &[], ctx.path());
        assert!(err.contains("not found"), "{source}: {err}");
    }
}

#[test]
fn a_client_certificate_cannot_change_the_group_of_coordinators() {
    let cluster = Cluster::start_group(3, 1, 5);
    let client = cluster.client();
    // A member that does not exist would take the group's quorum with it.
    let out = cluster.run(&[
        "cluster",
        "add-coordinator",
        "--id",
        "9",
        "--raft",
        "127.0.0.1:9",
        "--cluster",
        client.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("needs an admin certificate"),
        "{}",
        stderr(&out)
    );
    let out = cluster.run(&[
        "cluster",
        "remove-coordinator",
        "--id",
        "2",
        "--cluster",
        client.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("needs an admin certificate"));
    // The group is as it was, and builds go on.
    let status = cluster.status();
    assert!(status.contains("member 1 of 1,2,3"), "{status}");
    let ctx = tempfile::tempdir().unwrap();
    dockerfile(ctx.path(), "FROM busybox:latest\nRUN echo still > /f\n");
    cluster.build(&Strata::new(), ctx.path(), &[]);
}

#[test]
fn a_run_step_has_a_network_of_its_own_and_no_user_namespaces() {
    // A service on the host's loopback only, and one on every address.
    let local = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let everywhere = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let (local_port, every_port) = (
        local.local_addr().unwrap().port(),
        everywhere.local_addr().unwrap().port(),
    );
    // Each answers a connection by closing it, so a probe that got in ends.
    for listener in [&local, &everywhere] {
        let listener = listener.try_clone().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                drop(conn);
            }
        });
    }
    let gateway = "10.89.0.1";
    let probe = format!(
        "(echo | nc -w 3 127.0.0.1 {local_port} && echo loopback reached || echo loopback refused) > /probe; \
         (echo | nc -w 3 {gateway} {every_port} && echo bridge reached || echo bridge refused) >> /probe; \
         (unshare -U -r true 2>&1 && echo userns made || echo userns refused) >> /probe"
    );
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    dockerfile(ctx.path(), &format!("FROM busybox:latest\nRUN {probe}\n"));
    s.build(ctx.path(), &["-t", "probe:1"]);
    let seen = s.ok(&["run", "--rm", "probe:1", "cat", "/probe"]);
    assert!(seen.contains("loopback refused"), "{seen}");
    assert!(seen.contains("bridge reached"), "{seen}");
    assert!(
        seen.contains("Operation not permitted") && seen.contains("userns refused"),
        "{seen}"
    );

    // The host's network is an entitlement; with it, the same probe
    // reaches the loopback service (so the probe itself works).
    dockerfile(
        ctx.path(),
        &format!("FROM busybox:latest\nRUN --network=host {probe}\n"),
    );
    s.build(
        ctx.path(),
        &[
            "-t",
            "probe:host",
            "--allow",
            "network.host",
            "--allow-insecure-entitlement",
            "network.host",
        ],
    );
    let seen = s.ok(&["run", "--rm", "probe:host", "cat", "/probe"]);
    assert!(seen.contains("loopback reached"), "{seen}");
}

/// Sends `req` to the cluster's first coordinator with the credentials of
/// `config`; its reply.
fn ask(config: &Path, req: &Request) -> Reply {
    let (rt, conn) = connect(config);
    rt.block_on(request_on(&conn, req))
}

/// Sends `req` to the node at `addr` with the credentials of `config`;
/// its reply.
fn ask_at(config: &Path, addr: std::net::SocketAddr, req: &Request) -> Reply {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = ClientConfig::load(config).unwrap();
        let endpoint = strata_net::Endpoint::dialer(&config.tls.identity().unwrap()).unwrap();
        let conn = endpoint.connect(addr).await.unwrap();
        request_on(&conn, req).await
    })
}

/// Sends `req` on a new stream of `conn`; its reply.
async fn request_on(conn: &strata_net::Connection, req: &Request) -> Reply {
    let (mut send, mut recv) = conn.open().await.unwrap();
    strata_net::write_frame(&mut send, req, conn.addr)
        .await
        .unwrap();
    let _ = send.finish();
    strata_net::read_frame::<Reply>(&mut recv, conn.addr)
        .await
        .unwrap()
        .unwrap()
}

#[test]
fn a_client_asking_what_only_workers_or_coordinators_ask_is_refused_by_its_role() {
    let cluster = Cluster::start(2, 5);
    let Teams {
        a: team_a,
        b: team_b,
        a_state: a,
        ctx,
        secret,
    } = two_teams_and_a_secret(&cluster);

    // Team B grants itself team A's layer on every worker, as a
    // coordinator would: each refuses by role, and the layer stays out
    // of team B's reach.
    let services = blob_services(&cluster);
    let (workers, coordinator) = services.split_at(services.len() - 1);
    let grant = Request::Coordinator(CoordinatorRequest::Grant(Box::new(
        strata_cluster::protocol::Grant {
            client: "team-b".into(),
            blobs: vec![secret],
        },
    )));
    for worker in workers {
        let refused = ask_at(&team_b, *worker, &grant);
        assert!(
            matches!(&refused, Reply::Refused(r @ Refusal::NotAllowed { needs: Role::Coordinator, .. })
                if r.to_string().contains("client team-b may not ask to let a client read blobs")),
            "{refused:?}"
        );
        let read = get_blob(&team_b, *worker, secret);
        assert!(
            read.as_ref()
                .is_err_and(|e| e.contains("may read only the layers of its own builds")),
            "{read:?}"
        );
    }

    // Team B says it is a worker holding the layer, to be handed its
    // builds' steps and named as its holder: refused by role.
    let heartbeat = Request::Worker(WorkerRequest::Heartbeat {
        running: 0,
        blobs: vec![secret],
        dropped: Vec::new(),
        stored: 0,
    });
    let refused = ask_at(&team_b, coordinator[0], &heartbeat);
    assert!(
        matches!(&refused, Reply::Refused(Refusal::NotAllowed { needs: Role::Worker, asker, .. })
            if asker == "client team-b"),
        "{refused:?}"
    );

    // What a client asks, asked of a worker, is not served there.
    let status = ask_at(&team_a, workers[0], &Request::Client(ClientRequest::Status));
    assert!(
        matches!(
            &status,
            Reply::Refused(Refusal::NotServed {
                by: Role::Worker,
                ..
            })
        ),
        "{status:?}"
    );

    // The cluster goes on: team A builds again, all from the cache.
    let report = cluster.build_via(&team_a, &a, ctx.path(), &["-t", "a:2"]);
    assert_eq!(strata_integration::cluster::runs(&report), 0, "{report}");
}

#[test]
fn an_imported_cache_entry_is_held_to_what_the_coordinator_computed() {
    let cluster = Cluster::start(1, 5);
    let admin = cluster.admin();
    let layer = layer_with("f", b"imported\n");
    let (blob, diff_id) = (Digest::of(&layer), Sha256::of(&layer));
    assert!(matches!(
        upload(&admin, blob, diff_id, &layer),
        Ok(Reply::Ok)
    ));
    let entry = |diff_id: Sha256, blob: Digest| {
        vec![(
            Digest::of(b"some step"),
            strata_cache::CacheEntry::new(
                vec![strata_oci::LayerRef {
                    blob,
                    diff_id,
                    size: layer.len() as u64,
                }],
                true,
                "attacker",
            ),
        )]
    };
    // An entry that says the blob is another layer (here, another diff
    // ID) would hand every build that layer under that name.
    let import = |entries| Request::Admin(AdminRequest::ImportCache(entries));
    let lie = ask(&admin, &import(entry(Sha256::of(b"other"), blob)));
    assert!(
        matches!(&lie, Reply::Refused(r @ Refusal::NotTheLayer { blob: b, .. })
            if *b == blob && r.to_string().contains("is not the layer its cache entry names")),
        "{lie:?}"
    );
    // One naming a blob nobody uploaded would be a hit for nothing.
    let never = Digest::of(b"never uploaded");
    let absent = ask(&admin, &import(entry(diff_id, never)));
    assert!(
        matches!(&absent, Reply::Refused(Refusal::NotUploaded(b)) if *b == never),
        "{absent:?}"
    );
    // A client certificate may not write the shared index at all.
    let client = ask(&cluster.client(), &import(entry(diff_id, blob)));
    assert!(
        matches!(&client, Reply::Refused(r @ Refusal::NotAllowed { needs: Role::Admin, .. })
            if r.to_string().contains("needs an admin certificate")),
        "{client:?}"
    );
    assert!(
        cluster.status().contains(" 0 cache entries"),
        "{}",
        cluster.status()
    );
    // The truth goes in, copied to the worker first.
    let honest = ask(&admin, &import(entry(diff_id, blob)));
    assert!(matches!(honest, Reply::Imported(1)), "{honest:?}");
    assert!(
        cluster.status().contains(" 1 cache entries"),
        "{}",
        cluster.status()
    );
}
