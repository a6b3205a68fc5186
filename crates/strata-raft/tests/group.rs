//! Three members over real QUIC on loopback: election, replication, a
//! leader lost and replaced, a member restarted and caught up, a member
//! caught up from a snapshot after the log was compacted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use strata_cache::CacheEntry;
use strata_cas::Digest;
use strata_net::{ClusterCa, Endpoint, Role};
use strata_raft::{CommandV1, Member, Node, NodeId, Tuning};

struct Group {
    ca: ClusterCa,
    _root: tempfile::TempDir,
    dirs: BTreeMap<NodeId, PathBuf>,
    addrs: BTreeMap<NodeId, SocketAddr>,
    members: BTreeMap<NodeId, Member>,
    tuning: Tuning,
}

fn key(i: u64) -> Digest {
    Digest::of(&i.to_le_bytes())
}

fn entry(i: u64) -> CacheEntry {
    CacheEntry {
        layers: Vec::new(),
        made_layer: false,
        created: i,
        last_used: i,
        producer: format!("worker-{}", i % 3),
    }
}

async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Group {
    async fn start(n: u64, tuning: Tuning) -> Group {
        let root = tempfile::tempdir().unwrap();
        let mut g = Group {
            ca: ClusterCa::create("raft test").unwrap(),
            dirs: BTreeMap::new(),
            addrs: BTreeMap::new(),
            members: BTreeMap::new(),
            tuning,
            _root: root,
        };
        for id in 1..=n {
            g.dirs.insert(id, g._root.path().join(format!("c{id}")));
            g.addrs.insert(id, "127.0.0.1:0".parse().unwrap());
            g.up(id).await;
        }
        let nodes = g
            .addrs
            .iter()
            .map(|(id, a)| {
                (
                    *id,
                    Node {
                        addr: a.to_string(),
                    },
                )
            })
            .collect();
        g.members[&1].initialize(nodes).await.unwrap();
        g
    }

    /// Starts member `id` on its directory and address (the address it
    /// had, once it has had one).
    async fn up(&mut self, id: NodeId) {
        let identity = self.ca.issue(Role::Coordinator, &format!("c{id}")).unwrap();
        let endpoint = eventually("the member's port", async || {
            Endpoint::listen(self.addrs[&id], &identity).ok()
        })
        .await;
        self.addrs.insert(id, endpoint.local_addr().unwrap());
        let m = Member::start(id, &self.dirs[&id], endpoint, &self.tuning)
            .await
            .unwrap();
        self.members.insert(id, m);
    }

    async fn down(&mut self, id: NodeId) {
        self.members.remove(&id).unwrap().stop().await;
    }

    async fn leader(&self) -> NodeId {
        eventually("a leader", async || {
            for m in self.members.values() {
                if let Some(l) = m.leader().await
                    && self.members.contains_key(&l)
                    && self.members[&l].raft().metrics().borrow().current_leader == Some(l)
                {
                    return Some(l);
                }
            }
            None
        })
        .await
    }

    /// Writes through whichever member leads.
    async fn write(&self, command: CommandV1) {
        eventually("a write to be accepted", async || {
            let l = self.leader().await;
            match self.members[&l].write(command.clone()).await {
                Ok(_) => Some(()),
                Err(e) => panic!("write failed: {e}"),
            }
        })
        .await;
    }

    async fn applied_everywhere(&self, count: usize) {
        for (id, m) in &self.members {
            eventually(
                &format!("member {id} to hold {count} entries"),
                async || (m.local().entries().unwrap().len() == count).then_some(()),
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_replicates_survives_its_leader_and_catches_up_a_restarted_member() {
    let mut g = Group::start(3, Tuning::default()).await;
    let first = g.leader().await;
    for i in 0..50 {
        g.write(CommandV1::Put {
            key: key(i),
            entry: entry(i),
        })
        .await;
    }
    g.applied_everywhere(50).await;

    // The leader dies: the others elect one of themselves and lose nothing.
    let lost = Instant::now();
    g.down(first).await;
    let second = g.leader().await;
    eprintln!("new leader {second} after {:?}", lost.elapsed());
    assert_ne!(second, first);
    for i in 0..50 {
        assert_eq!(
            g.members[&second].entry(&key(i)).await.unwrap(),
            Some(entry(i))
        );
    }
    for i in 50..60 {
        g.write(CommandV1::Put {
            key: key(i),
            entry: entry(i),
        })
        .await;
    }
    // Any member answers linearizable reads and takes writes: a follower
    // asks the leader.
    let follower = *g.members.keys().find(|id| **id != second).unwrap();
    assert_eq!(
        g.members[&follower].entry(&key(55)).await.unwrap(),
        Some(entry(55))
    );
    g.members[&follower]
        .write(CommandV1::Put {
            key: key(60),
            entry: entry(60),
        })
        .await
        .unwrap();
    assert_eq!(
        g.members[&second].entry(&key(60)).await.unwrap(),
        Some(entry(60))
    );
    // After a barrier, a follower's own copy has every acknowledged write.
    g.members[&second]
        .write(CommandV1::Remove { key: key(0) })
        .await
        .unwrap();
    g.members[&follower].barrier().await.unwrap();
    assert_eq!(g.members[&follower].local().entry(&key(0)).unwrap(), None);

    // The old leader comes back from its own disk and catches up.
    g.up(first).await;
    g.applied_everywhere(60).await;
    g.write(CommandV1::Touch {
        key: key(3),
        at: 1_000,
    })
    .await;
    g.write(CommandV1::Located {
        worker: "worker-2".into(),
        blobs: vec![key(7)],
    })
    .await;
    let l = g.leader().await;
    assert_eq!(
        g.members[&l]
            .entry(&key(3))
            .await
            .unwrap()
            .unwrap()
            .last_used,
        1_000
    );
    eventually("the restarted member to apply the location", async || {
        (g.members[&first].local().holders(&key(7)).unwrap() == ["worker-2"]).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_a_compacted_log_catches_up_from_a_snapshot() {
    let tuning = Tuning {
        snapshot_every: 20,
        ..Tuning::default()
    };
    let mut g = Group::start(3, tuning).await;
    let leader = g.leader().await;
    let behind = *g.members.keys().find(|id| **id != leader).unwrap();
    g.down(behind).await;
    for i in 0..100 {
        g.write(CommandV1::Put {
            key: key(i),
            entry: entry(i),
        })
        .await;
    }
    g.write(CommandV1::Forget {
        worker: "worker-1".into(),
        registered: 0,
    })
    .await;
    // The leader snapshotted and dropped the log the member missed.
    eventually("the leader to purge its log", async || {
        let m = g.members[&leader].raft().metrics().borrow().clone();
        m.purged.filter(|p| p.index > 50).map(|_| ())
    })
    .await;
    g.up(behind).await;
    g.applied_everywhere(100).await;
    let snap = g.members[&behind].raft().metrics().borrow().snapshot;
    assert!(snap.is_some(), "the member caught up without a snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_coordinators_take_part() {
    let g = Group::start(1, Tuning::default()).await;
    g.leader().await;
    // A worker's certificate from the same CA is turned away.
    let worker = Endpoint::dialer(&g.ca.issue(Role::Worker, "w1").unwrap()).unwrap();
    if let Ok(conn) = worker.connect(g.addrs[&1]).await {
        tokio::time::timeout(Duration::from_secs(5), conn.quic.closed())
            .await
            .expect("the member kept a worker's connection open");
    }
    // The member still leads, unbothered.
    assert_eq!(g.leader().await, 1);
}
