//! The replicated cache index (a Raft group of three coordinators over
//! QUIC on loopback, each syncing its log to disk) against the one-machine
//! index (RocksDB, the same disk) in one run: writes and linearizable
//! lookups per second, and what the index adds to a fully cached build.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_cache::{CacheEntry, LocalCacheIndex};
use strata_cas::{Digest, MetaDb};
use strata_net::{ClusterCa, Endpoint, Role};
use strata_raft::{CommandV1, Member, Node, Tuning};

const WRITES: u64 = 500;
const READS: u64 = 2000;
const IN_FLIGHT: u64 = 16;
/// Lookups of a fully cached build of the fan-out example (8 steps).
const STEPS_PER_BUILD: usize = 8;

fn key(i: u64) -> Digest {
    Digest::of(&i.to_le_bytes())
}

fn entry(i: u64) -> CacheEntry {
    CacheEntry::new(Vec::new(), true, &format!("worker-{}", i % 3))
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("replicated_index: benchmark");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let root = tempfile::tempdir().unwrap();

    // Baseline: the one-machine index, synced writes as the store does.
    let db = MetaDb::open(&root.path().join("local"), &["cache"]).unwrap();
    let local = LocalCacheIndex::open(db).unwrap();
    let start = Instant::now();
    for i in 0..WRITES {
        local.put(&key(i), &entry(i)).unwrap();
    }
    let local_writes = WRITES as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for i in 0..READS {
        assert!(local.get(&key(i % WRITES)).unwrap().is_some());
    }
    let local_reads = READS as f64 / start.elapsed().as_secs_f64();

    rt.block_on(async {
        let ca = ClusterCa::create("bench").unwrap();
        let mut members = BTreeMap::new();
        let mut nodes = BTreeMap::new();
        for id in 1..=3u64 {
            let identity = ca.issue(Role::Coordinator, &format!("c{id}")).unwrap();
            let endpoint = Endpoint::listen("127.0.0.1:0".parse().unwrap(), &identity).unwrap();
            nodes.insert(
                id,
                Node {
                    addr: endpoint.local_addr().unwrap().to_string(),
                },
            );
            let m = Member::start(
                id,
                &root.path().join(format!("c{id}")),
                endpoint,
                &Tuning::default(),
            )
            .await
            .unwrap();
            members.insert(id, Arc::new(m));
        }
        members[&1].initialize(nodes).await.unwrap();
        let leader = loop {
            if let Some(l) = members[&1].leader().await {
                break l;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let follower = *members.keys().find(|id| **id != leader).unwrap();
        let (lead, follow) = (Arc::clone(&members[&leader]), Arc::clone(&members[&follower]));

        // Writes one at a time, then IN_FLIGHT at once (as concurrent
        // builds record steps).
        let start = Instant::now();
        for i in 0..WRITES {
            lead.write(CommandV1::Put { key: key(i), entry: entry(i) })
                .await
                .unwrap();
        }
        let serial_writes = WRITES as f64 / start.elapsed().as_secs_f64();
        // Through a follower: forwarded to the leader, and returned once
        // the follower's own copy has it (read your writes).
        let start = Instant::now();
        for i in 0..WRITES / 4 {
            follow
                .write(CommandV1::Put { key: key(i), entry: entry(i) })
                .await
                .unwrap();
        }
        let follower_writes = (WRITES / 4) as f64 / start.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..IN_FLIGHT {
            let m = Arc::clone(&lead);
            tasks.spawn(async move {
                let mut i = WRITES + lane;
                while i < 3 * WRITES {
                    m.write(CommandV1::Put { key: key(i), entry: entry(i) })
                        .await
                        .unwrap();
                    i += IN_FLIGHT;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let parallel_writes = (2 * WRITES) as f64 / start.elapsed().as_secs_f64();

        // Linearizable lookups on the leader and through a follower.
        let mut on_leader = Vec::new();
        for i in 0..READS {
            let t = Instant::now();
            assert!(lead.entry(&key(i % WRITES)).await.unwrap().is_some());
            on_leader.push(t.elapsed());
        }
        let mut via_follower = Vec::new();
        for i in 0..READS / 4 {
            let t = Instant::now();
            assert!(follow.entry(&key(i % WRITES)).await.unwrap().is_some());
            via_follower.push(t.elapsed());
        }
        let leader_reads = READS as f64 / on_leader.iter().sum::<Duration>().as_secs_f64();
        let follower_reads =
            via_follower.len() as f64 / via_follower.iter().sum::<Duration>().as_secs_f64();

        println!("\nreplicated cache index, 3 coordinators on loopback, against the one-machine index (RocksDB)");
        println!("{:<46} {:>12} {:>12} {:>8}", "case", "replicated", "one machine", "ratio");
        let row = |name: &str, a: f64, b: f64| {
            println!("{name:<46} {a:>10.0}/s {b:>10.0}/s {:>7.2}x", a / b);
        };
        row("writes, one at a time", serial_writes, local_writes);
        row("writes through a follower, one at a time", follower_writes, local_writes);
        row(&format!("writes, {IN_FLIGHT} in flight"), parallel_writes, local_writes);
        row("linearizable lookups on the leader", leader_reads, local_reads);
        row("linearizable lookups through a follower", follower_reads, local_reads);
        let p50 = percentile(on_leader.clone(), 0.5);
        let p99 = percentile(on_leader, 0.99);
        let f50 = percentile(via_follower, 0.5);
        println!(
            "lookup latency: p50 {:.3} ms, p99 {:.3} ms on the leader; p50 {:.3} ms through a follower",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            f50.as_secs_f64() * 1e3
        );
        // A build: one read-index round, then its lookups from the
        // member's own copy (what the solver does).
        let mut builds = Vec::new();
        for b in 0..READS / 4 {
            for m in [&lead, &follow] {
                let t = Instant::now();
                m.barrier().await.unwrap();
                for s in 0..STEPS_PER_BUILD as u64 {
                    let k = key((b * STEPS_PER_BUILD as u64 + s) % WRITES);
                    assert!(m.local().entry(&k).unwrap().is_some());
                }
                builds.push((m.id() == leader, t.elapsed()));
            }
        }
        let split = |on_leader: bool| {
            percentile(
                builds
                    .iter()
                    .filter(|(l, _)| *l == on_leader)
                    .map(|(_, d)| *d)
                    .collect(),
                0.5,
            )
        };
        println!(
            "added to a fully cached build (one read-index round, {STEPS_PER_BUILD} lookups): p50 {:.3} ms on the leader, {:.3} ms on a follower (goal: under 5 ms)",
            split(true).as_secs_f64() * 1e3,
            split(false).as_secs_f64() * 1e3
        );
        for m in members.values() {
            m.stop().await;
        }
    });
}
