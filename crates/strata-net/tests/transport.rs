//! Endpoints on loopback: who may connect, messages, blobs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_cas::ContentStore;
use strata_net::{
    BatchSource, ClusterCa, Endpoint, Error, Role, read_frame, recv_batch, recv_blob, send_batch,
    send_blob, write_frame,
};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Msg {
    Ping(u64),
    Text(String),
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A listening coordinator that answers each message with the same one,
/// and serves blobs from `cas` when asked with `Text("blob:<digest>")`.
fn server(ca: &ClusterCa, cas: Arc<ContentStore>) -> SocketAddr {
    let ep = Endpoint::listen(loopback(), &ca.issue(Role::Coordinator, "c1").unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(conn) = ep.accept().await {
            let cas = Arc::clone(&cas);
            tokio::spawn(async move {
                while let Some((mut send, mut recv)) = conn.accept().await {
                    // A stream reset before its first frame is read asks
                    // nothing.
                    let Ok(Some(msg)) = read_frame::<Msg>(&mut recv, conn.addr).await else {
                        continue;
                    };
                    match &msg {
                        Msg::Text(t) if t.starts_with("blob:") => {
                            let d = t[5..].parse().unwrap();
                            let _ = send_blob(&mut send, &cas, &d, conn.addr).await;
                        }
                        // Blobs from the store, many to the stream.
                        Msg::Text(t) if t.starts_with("batch:") => {
                            let blobs: Vec<(strata_cas::Digest, BatchSource<'_>)> = t[6..]
                                .split(',')
                                .map(|d| (d.parse().unwrap(), BatchSource::Store(&cas)))
                                .collect();
                            let _ = send_batch(&mut send, &blobs, conn.addr).await;
                        }
                        // A blob named by its bytes only, at most the
                        // limit given: its digest, or why not.
                        Msg::Text(t) if t.starts_with("take:") => {
                            let limit: u64 = t[5..].parse().unwrap();
                            let took = strata_net::recv_unnamed(
                                &mut recv,
                                &cas,
                                conn.addr,
                                limit,
                                std::time::Duration::from_secs(5),
                            )
                            .await;
                            let reply = match took {
                                Ok((d, _)) => Msg::Text(d.to_string()),
                                Err(e) => Msg::Text(format!("refused: {e}")),
                            };
                            let _ = write_frame(&mut send, &reply, conn.addr).await;
                            let _ = send.finish();
                        }
                        // A file's bytes under another blob's name.
                        Msg::Text(t) if t.starts_with("forge:") => {
                            let (d, path) = t[6..].split_once('=').unwrap();
                            let size = std::fs::metadata(path).unwrap().len();
                            let path = std::path::Path::new(path);
                            let blobs = [(d.parse().unwrap(), BatchSource::File(path, size))];
                            let _ = send_batch(&mut send, &blobs, conn.addr).await;
                        }
                        _ => {
                            let reply = match msg {
                                Msg::Text(_) => Msg::Text(format!("{}", conn.peer)),
                                other => other,
                            };
                            write_frame(&mut send, &reply, conn.addr).await.unwrap();
                            let _ = send.finish();
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn members_of_the_cluster_talk_and_know_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let cas = Arc::new(ContentStore::open(dir.path()).unwrap());
    let ca = ClusterCa::create("test").unwrap();
    let addr = server(&ca, cas);
    let client = Endpoint::dialer(&ca.issue(Role::Client, "me").unwrap()).unwrap();
    let conn = client.connect(addr).await.unwrap();
    assert_eq!(conn.peer.role, Role::Coordinator);
    assert_eq!(conn.peer.name, "c1");
    let (mut send, mut recv) = conn.open().await.unwrap();
    write_frame(&mut send, &Msg::Ping(7), addr).await.unwrap();
    assert_eq!(
        read_frame::<Msg>(&mut recv, addr).await.unwrap(),
        Some(Msg::Ping(7))
    );
    let (mut send, mut recv) = conn.open().await.unwrap();
    write_frame(&mut send, &Msg::Text(String::new()), addr)
        .await
        .unwrap();
    assert_eq!(
        read_frame::<Msg>(&mut recv, addr).await.unwrap(),
        Some(Msg::Text("client me".into())),
        "the server knows the client by its certificate"
    );
}

#[tokio::test]
async fn strangers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cas = Arc::new(ContentStore::open(dir.path()).unwrap());
    let ca = ClusterCa::create("test").unwrap();
    let addr = server(&ca, cas);

    // A certificate from another CA.
    let other = ClusterCa::create("other").unwrap();
    let stranger = Endpoint::dialer(&other.issue(Role::Client, "x").unwrap()).unwrap();
    let e = stranger.connect(addr).await.unwrap_err();
    assert!(matches!(e, Error::Connection { .. }), "{e}");

    // No certificate at all: a plain TLS client with the right ALPN.
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject as _;
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![strata_net::ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let raw = quinn::Endpoint::client(loopback()).unwrap();
    let refused = async {
        let conn = raw
            .connect_with(config, addr, "strata-node")
            .unwrap()
            .await?;
        // TLS 1.3 may finish the client side first; the refusal comes
        // when the server checks the (missing) certificate.
        conn.open_bi().await?;
        conn.accept_bi().await?;
        Ok::<_, quinn::ConnectionError>(())
    };
    assert!(
        refused.await.is_err(),
        "a client without a certificate got through"
    );

    // Another protocol version.
    let future = Endpoint::dialer(&ca.issue(Role::Client, "newer").unwrap())
        .unwrap()
        .announcing_version(99);
    let e = future.connect(addr).await.unwrap_err().to_string();
    assert!(
        e.contains("refused")
            && e.contains("version 99")
            && e.contains(&format!("version {}", strata_net::PROTOCOL_VERSION)),
        "{e}"
    );
}

#[tokio::test]
async fn blobs_arrive_verified_and_damaged_ones_never_do() {
    let src_dir = tempfile::tempdir().unwrap();
    let src = Arc::new(ContentStore::open(src_dir.path()).unwrap());
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let good = src.put(&data).unwrap();
    // Large enough to be kept as a file, which can be damaged.
    let bad = src.put(&[7u8; 100_000]).unwrap();
    std::fs::write(src.blob_path(&bad), b"damaged bytes").unwrap();
    let ca = ClusterCa::create("test").unwrap();
    let addr = server(&ca, Arc::clone(&src));

    let dst_dir = tempfile::tempdir().unwrap();
    let dst = Arc::new(ContentStore::open(dst_dir.path()).unwrap());
    let client = Endpoint::dialer(&ca.issue(Role::Worker, "w").unwrap()).unwrap();
    let conn = client.connect(addr).await.unwrap();
    let fetch = |d: strata_cas::Digest| {
        let conn = conn.clone();
        let dst = &dst;
        async move {
            let (mut send, mut recv) = conn.open().await.unwrap();
            write_frame(&mut send, &Msg::Text(format!("blob:{d}")), addr)
                .await
                .unwrap();
            recv_blob(&mut recv, dst, &d, addr).await
        }
    };
    assert_eq!(fetch(good).await.unwrap(), Some(data.len() as u64));
    assert_eq!(dst.read(&good).unwrap(), data);
    assert!(fetch(bad).await.is_err());
    assert!(!dst.contains(&bad).unwrap(), "a damaged blob was stored");
    let missing = strata_cas::Digest::of(b"nobody has this");
    assert_eq!(fetch(missing).await.unwrap(), None);
}

#[tokio::test]
async fn a_blob_pushed_unnamed_is_stored_under_the_digest_its_taker_computes_within_a_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cas = Arc::new(ContentStore::open(dir.path()).unwrap());
    let ca = ClusterCa::create("test").unwrap();
    let addr = server(&ca, Arc::clone(&cas));
    let client = Endpoint::dialer(&ca.issue(Role::Worker, "w").unwrap()).unwrap();
    let conn = client.connect(addr).await.unwrap();
    let push = |data: Vec<u8>, limit: u64| {
        let conn = conn.clone();
        async move {
            let (mut send, mut recv) = conn.open().await.unwrap();
            write_frame(&mut send, &Msg::Text(format!("take:{limit}")), addr)
                .await
                .unwrap();
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
            match read_frame::<Msg>(&mut recv, addr).await.unwrap() {
                Some(Msg::Text(t)) => t,
                other => panic!("{other:?}"),
            }
        }
    };
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let digest = strata_cas::Digest::of(&data);
    assert_eq!(push(data.clone(), 4_000_000).await, digest.to_string());
    assert_eq!(cas.read(&digest).unwrap(), data);
    // Over the limit: refused, and nothing stored.
    let before = cas.list().unwrap().len();
    let over = push(vec![1u8; 2_000_001], 2_000_000).await;
    assert!(over.contains("over the 2000000 byte limit"), "{over}");
    assert_eq!(cas.list().unwrap().len(), before);
    // Reset part way (the pusher's step failed): nothing stored, no temp
    // file left.
    let (mut send, mut recv) = conn.open().await.unwrap();
    write_frame(&mut send, &Msg::Text("take:4000000".into()), addr)
        .await
        .unwrap();
    send.write_all(&[2u8; 1_000_000]).await.unwrap();
    // Most often the taker is reading the bytes by now; either way it
    // must store nothing.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    send.reset(0u32.into()).unwrap();
    // Refused, or (reset before the taker read the request) never taken.
    match read_frame::<Msg>(&mut recv, addr).await {
        Ok(Some(Msg::Text(t))) => assert!(t.starts_with("refused"), "{t}"),
        Ok(None) | Err(_) => {}
        Ok(Some(other)) => panic!("{other:?}"),
    }
    assert_eq!(cas.list().unwrap().len(), before);
    let ingest = dir.path().join("ingest");
    let left = std::fs::read_dir(&ingest).map_or(0, |d| d.count());
    assert_eq!(left, 0, "temp files left in {}", ingest.display());
}

/// ClientHellos that will never be finished: the first datagram of `n`
/// real connection attempts, caught on a socket that never answers.
async fn captured_client_hellos(ca: &ClusterCa, n: usize) -> Vec<Vec<u8>> {
    let tap = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
    let tap_addr = tap.local_addr().unwrap();
    let dialer = Endpoint::dialer(&ca.issue(Role::Client, "replayer").unwrap()).unwrap();
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
}

#[tokio::test]
async fn handshakes_that_never_finish_do_not_hold_up_other_peers() {
    let dir = tempfile::tempdir().unwrap();
    let cas = Arc::new(ContentStore::open(dir.path()).unwrap());
    let ca = ClusterCa::create("test").unwrap();
    let addr = server(&ca, cas);
    // Twenty stalled handshakes, each from its own port, kept open.
    let mut stalled = Vec::new();
    for hello in captured_client_hellos(&ca, 20).await {
        let s = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
        s.send_to(&hello, addr).await.unwrap();
        stalled.push(s);
    }
    // A member keeps working meanwhile: each of its connections is
    // served long before a stalled handshake could time out (a node that
    // awaited them in turn answered after every one of them had).
    let client = Endpoint::dialer(&ca.issue(Role::Client, "me").unwrap()).unwrap();
    for i in 0..5 {
        let served = tokio::time::timeout(std::time::Duration::from_secs(4), async {
            let conn = client.connect(addr).await.unwrap();
            let (mut send, mut recv) = conn.open().await.unwrap();
            write_frame(&mut send, &Msg::Ping(i), addr).await.unwrap();
            read_frame::<Msg>(&mut recv, addr).await.unwrap()
        })
        .await;
        assert_eq!(served, Ok(Some(Msg::Ping(i))), "connection {i} was held up");
    }
    drop(stalled);
}

#[tokio::test]
async fn a_batch_brings_what_was_asked_checked_or_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cas = Arc::new(ContentStore::open(dir.path()).unwrap());
    let (a, b) = (cas.put(b"alpha").unwrap(), cas.put(b"beta").unwrap());
    let absent = strata_cas::Digest::of(b"nobody has it");
    let ca = ClusterCa::create("test").unwrap();
    let addr = server(&ca, Arc::clone(&cas));
    let client = Endpoint::dialer(&ca.issue(Role::Worker, "w").unwrap()).unwrap();
    let conn = client.connect(addr).await.unwrap();
    let mine = tempfile::tempdir().unwrap();
    let local = Arc::new(ContentStore::open(mine.path()).unwrap());
    let ask = |text: String| {
        let conn = &conn;
        async move {
            let (mut send, recv) = conn.open().await.unwrap();
            write_frame(&mut send, &Msg::Text(text), addr)
                .await
                .unwrap();
            let _ = send.finish();
            recv
        }
    };
    let wanted = |ds: &[strata_cas::Digest]| ds.iter().copied().collect();

    // Two blobs and one the sender lacks.
    let mut recv = ask(format!("batch:{a},{b},{absent}")).await;
    let got = recv_batch(
        &mut recv,
        &local,
        &wanted(&[a, b, absent]),
        addr,
        None,
        &mut |_| Ok(()),
    )
    .await
    .unwrap();
    assert_eq!(
        (got.stored, got.missing, got.bytes),
        (vec![a, b], vec![absent], 9)
    );
    assert_eq!(local.read(&b).unwrap(), b"beta");

    // A sender that ends the batch without a word of one blob asked for:
    // that blob is missing, not taken as received.
    let quiet = tempfile::tempdir().unwrap();
    let quiet = Arc::new(ContentStore::open(quiet.path()).unwrap());
    let mut recv = ask(format!("batch:{a}")).await;
    let got = recv_batch(&mut recv, &quiet, &wanted(&[a, b]), addr, None, &mut |_| {
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!((got.stored, got.missing), (vec![a], vec![b]));

    // A blob not asked for: the batch is refused, nothing of it stored.
    let fresh = tempfile::tempdir().unwrap();
    let other = Arc::new(ContentStore::open(fresh.path()).unwrap());
    let mut recv = ask(format!("batch:{a},{b}")).await;
    let e = recv_batch(
        &mut recv,
        &other,
        &wanted(&[a]),
        addr,
        None,
        &mut |_| Ok(()),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Forged { .. }), "{e}");
    assert!(!other.contains(&a).unwrap(), "nothing is stored");

    // Bytes that are not the blob named.
    let liar = mine.path().join("liar");
    std::fs::write(&liar, b"not alpha").unwrap();
    let mut recv = ask(format!("forge:{a}={}", liar.display())).await;
    let e = recv_batch(
        &mut recv,
        &other,
        &wanted(&[a]),
        addr,
        None,
        &mut |_| Ok(()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, Error::Forged { .. }) && e.to_string().contains("hash to"),
        "{e}"
    );
    assert!(!other.contains(&a).unwrap());

    // A receiver over its quota refuses, with its reason.
    let mut recv = ask(format!("batch:{a},{b}")).await;
    let e = recv_batch(&mut recv, &other, &wanted(&[a, b]), addr, None, &mut |n| {
        if n > 4 {
            Err("over quota".into())
        } else {
            Ok(())
        }
    })
    .await
    .unwrap_err();
    assert!(
        matches!(e, Error::Refused { .. }) && e.to_string().contains("over quota"),
        "{e}"
    );
    assert!(!other.contains(&a).unwrap());
}

#[tokio::test]
async fn a_peer_whose_streams_are_never_read_can_make_a_node_buffer_one_connection_window() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    let ca = ClusterCa::create("test").unwrap();
    let ep = Endpoint::listen(loopback(), &ca.issue(Role::Worker, "w1").unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    // The node takes the streams and reads nothing from them.
    let held = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap();
        let mut streams = Vec::new();
        while let Some(s) = conn.accept().await {
            streams.push(s);
        }
        streams.len()
    });
    let peer = Endpoint::dialer(&ca.issue(Role::Worker, "w2").unwrap()).unwrap();
    let conn = peer.connect(addr).await.unwrap();
    // 64 streams, each with its own window, could hold 8 times the
    // connection's.
    let streams = 64;
    assert!(
        u64::from(strata_net::STREAM_WINDOW) * streams
            > 4 * u64::from(strata_net::CONNECTION_WINDOW)
    );
    let accepted = Arc::new(AtomicU64::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let (mut send, _recv) = conn.open().await.unwrap();
        let accepted = Arc::clone(&accepted);
        writers.spawn(async move {
            let chunk = vec![7u8; 256 << 10];
            // Writes until the node's flow control stops them for a second.
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(1), send.write(&chunk)).await
            {
                accepted.fetch_add(n as u64, Ordering::Relaxed);
            }
            send
        });
    }
    let mut open = Vec::new();
    while let Some(send) = writers.join_next().await {
        open.push(send.unwrap());
    }
    let accepted = accepted.load(Ordering::Relaxed);
    assert!(
        accepted <= u64::from(strata_net::CONNECTION_WINDOW),
        "the peer got {accepted} bytes accepted unread, over the connection window"
    );
    assert!(
        accepted >= u64::from(strata_net::STREAM_WINDOW),
        "one stream's window was not even accepted: {accepted} bytes"
    );
    conn.quic.close(0u32.into(), b"done");
    drop(open);
    assert!(held.await.unwrap() >= 1);
}
