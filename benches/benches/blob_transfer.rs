//! Blob transfer between two nodes on loopback against raw quinn with the
//! same certificates, in one run.
//!
//! * raw quinn: the sender writes 512 MiB from memory on one stream, the
//!   receiver reads and drops it: the transport's ceiling here;
//! * strata: a worker serves a 512 MiB blob from its content store
//!   (reading and verifying it) and a peer receives it with `recv_blob`
//!   (hashing it, blake3 and sha256, and writing it to its store, fsync
//!   included): what fetching a layer from a peer costs.
//!
//! Prints MiB/s for each and the ratio. `STRATA_BENCH_RUNS` sets runs
//! (default 3).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use common::{median, runs};
use strata_cas::ContentStore;
use strata_net::{ClusterCa, Endpoint, Role, recv_blob, send_blob};

const SIZE: usize = 512 << 20;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Raw quinn; with `sink`, the receiver writes what arrives to a file and
/// syncs it, as any transfer that stores must.
async fn raw(ca: &ClusterCa, sink: Option<&std::path::Path>) -> f64 {
    let server = Endpoint::listen(loopback(), &ca.issue(Role::Worker, "a").unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let payload = Arc::new(vec![0x5au8; 1 << 20]);
    tokio::spawn(async move {
        let conn = server.accept().await.unwrap();
        let (mut send, _recv) = conn.accept().await.unwrap();
        for _ in 0..SIZE / payload.len() {
            send.write_all(&payload).await.unwrap();
        }
        send.finish().unwrap();
        let _ = send.stopped().await;
    });
    let client = Endpoint::dialer(&ca.issue(Role::Worker, "b").unwrap()).unwrap();
    let conn = client.connect(addr).await.unwrap();
    let start = Instant::now();
    let (mut send, mut recv) = conn.open().await.unwrap();
    send.write_all(b"go").await.unwrap();
    let mut total = 0usize;
    let mut file = sink.map(|p| std::fs::File::create(p).unwrap());
    while let Some(chunk) = recv.read_chunk(1 << 20, true).await.unwrap() {
        total += chunk.bytes.len();
        if let Some(f) = &mut file {
            std::io::Write::write_all(f, &chunk.bytes).unwrap();
        }
    }
    if let Some(f) = file {
        f.sync_all().unwrap();
    }
    assert_eq!(total, SIZE);
    start.elapsed().as_secs_f64()
}

async fn strata(ca: &ClusterCa, src: Arc<ContentStore>, blob: strata_cas::Digest) -> f64 {
    let server = Endpoint::listen(loopback(), &ca.issue(Role::Worker, "a").unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        let conn = server.accept().await.unwrap();
        let (mut send, _recv) = conn.accept().await.unwrap();
        send_blob(&mut send, &src, &blob, conn.addr).await.unwrap();
        let _ = send.stopped().await;
    });
    let dst_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let dst = Arc::new(ContentStore::open(dst_dir.path()).unwrap());
    let client = Endpoint::dialer(&ca.issue(Role::Worker, "b").unwrap()).unwrap();
    let conn = client.connect(addr).await.unwrap();
    let start = Instant::now();
    let (mut send, mut recv) = conn.open().await.unwrap();
    send.write_all(b"go").await.unwrap();
    let got = recv_blob(&mut recv, &dst, &blob, conn.addr).await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, Some(SIZE as u64));
    secs
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("blob_transfer: benchmark");
        return;
    }
    let runs = runs(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = ClusterCa::create("bench").unwrap();
    let src_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = Arc::new(ContentStore::open(src_dir.path()).unwrap());
    // Incompressible, like a compressed layer.
    let data: Vec<u8> = (0..SIZE as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();
    let blob = src.put(&data).unwrap();
    drop(data);
    let sink_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let sink = sink_dir.path().join("blob");
    let (mut r, mut f, mut s) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("  run {}/{runs}", i + 1);
        r.push(rt.block_on(raw(&ca, None)));
        f.push(rt.block_on(raw(&ca, Some(&sink))));
        s.push(rt.block_on(strata(&ca, Arc::clone(&src), blob)));
    }
    let mib = SIZE as f64 / (1 << 20) as f64;
    let (raw_s, file_s, strata_s) = (median(r), median(f), median(s));
    println!(
        "\nblob transfer on loopback, QUIC + mutual TLS, 512 MiB, medians of {runs} runs\n\
         raw quinn, memory to memory             {:>8.0} MiB/s\n\
         raw quinn, into a synced file           {:>8.0} MiB/s\n\
         strata, store to store, verified        {:>8.0} MiB/s\n\
         strata / raw quinn into a file          {:>8.2}x\n\
         strata / raw quinn in memory            {:>8.2}x",
        mib / raw_s,
        mib / file_s,
        mib / strata_s,
        file_s / strata_s,
        raw_s / strata_s
    );
}
