//! The replicated index checked the way Jepsen checks etcd: clients write
//! and read at random through every member of a group of real member
//! processes while a nemesis kills them with SIGKILL (the leader half the
//! time), cuts one off for longer than an election takes, and takes a
//! member out of the group, wipes it and adds it back; every member
//! snapshots every few dozen entries, so restarts and catch-ups come from
//! snapshots. The recorded history must be linearizable
//! (`model::linearizable`), object by object: each cache key, and each
//! worker's registration and holdings.
//!
//! Reads take the production path (a read-index round, then the member's
//! own copy, as a coordinator does at the start of a build) or the
//! leader's linearizable lookup. Writes mix every command a coordinator
//! writes: puts, touches and removes of entries; registrations, blobs
//! gained and lost, and forgets of workers.
//!
//! Each member keeps its state on a filesystem that forgets every write
//! not yet synced when the member is killed (`lossyfs`, a FUSE filesystem
//! in the driver, as Jepsen's LazyFS), and the nemesis also cuts the
//! power of the whole group at once: every member killed together, each
//! losing what it had not synced, then all started again. Nothing a
//! client was told is written may be lost. `STRATA_JEPSEN_FUSE=0` runs on
//! the plain disk instead, where no FUSE can be mounted.
//!
//! Then the read-index round's p50 and p99 on the leader and on a
//! follower, and how long a follower's reads wait while the leader is
//! killed: on loopback, and with 40 ms added each way between members (a
//! relay that holds each datagram, as netem would; this machine's kernel
//! has no netem).
//!
//! One binary plays both parts: run with `STRATA_JEPSEN_MEMBER` set, it is
//! a member process, which takes requests as JSON lines on stdin.
//! `STRATA_JEPSEN_SEEDS` (default 1), `STRATA_JEPSEN_SECONDS` (per seed,
//! default 40) and `STRATA_JEPSEN_SEED` (the first seed) size a run.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod lossyfs;
mod model;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use model::{Call, Entry, EntryOp, Version, Worker, WorkerOp, WorkerRet, linearizable};
use serde::{Deserialize, Serialize};
use strata_cache::CacheEntry;
use strata_cas::Digest;
use strata_net::{ClusterCa, Endpoint, Role};
use strata_raft::{CommandV1, Member, MembershipChange, Node, NodeId, Tuning};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

const KEYS: u64 = 6;
const WORKERS: u64 = 4;
const BLOBS: u32 = 6;
const CLIENTS: u64 = 10;
/// Members: three voters and one that is taken out and added back.
const MEMBERS: u64 = 4;
/// Entries between snapshots.
const SNAPSHOT_EVERY: u64 = 40;
/// How long a call may go unanswered before it counts as lost.
const CALL_TTL: Duration = Duration::from_secs(20);
/// Lines of the protocol start with this: anything else a member prints
/// is not an answer.
const TAG: &str = "@@ ";

/// What the driver asks a member process.
#[derive(Debug, Serialize, Deserialize)]
enum Ask {
    Write(CommandV1),
    /// The leader's linearizable lookup ([`Member::entry`]).
    Get(Digest),
    /// A read-index round, then the member's own copy, as a build reads.
    Read {
        key: Option<Digest>,
        worker: Option<String>,
    },
    /// A read-index round alone; answers how long it took.
    Barrier,
    Cut(Vec<NodeId>),
    Change(MembershipChange),
    /// The member's view of the group.
    View,
}

#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Written,
    Entry(Option<CacheEntry>),
    Worker {
        registered: Option<u64>,
        /// Bit `i`: it is among blob `i`'s holders.
        holds: u32,
    },
    Took(Duration),
    Done,
    View {
        leader: Option<NodeId>,
        voters: Vec<NodeId>,
        snapshot: Option<u64>,
    },
    Failed(String),
}

fn key(k: u64) -> Digest {
    Digest::of(format!("key-{k}").as_bytes())
}

fn blob(i: u32) -> Digest {
    Digest::of(format!("blob-{i}").as_bytes())
}

fn worker_name(w: u64) -> String {
    format!("w{w}")
}

fn blob_list(mask: u32) -> Vec<Digest> {
    (0..BLOBS)
        .filter(|i| mask & (1 << i) != 0)
        .map(blob)
        .collect()
}

// ---------------------------------------------------------------------------
// The member process.

fn member_main(id: NodeId) {
    // Its log, in the group's directory: `RUST_LOG` picks what it says.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let env = |k: &str| std::env::var(k).unwrap();
    let dir = PathBuf::from(env("STRATA_JEPSEN_DIR"));
    let ca = ClusterCa::load(Path::new(&env("STRATA_JEPSEN_CA"))).unwrap();
    let group: BTreeMap<NodeId, Node> = env("STRATA_JEPSEN_GROUP")
        .split(',')
        .map(|m| {
            let (i, a) = m.split_once('=').unwrap();
            (i.parse().unwrap(), Node { addr: a.into() })
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let identity = ca.issue(Role::Coordinator, &format!("c{id}")).unwrap();
        let addr: SocketAddr = env("STRATA_JEPSEN_LISTEN").parse().unwrap();
        let endpoint = Endpoint::listen(addr, &identity).unwrap();
        let tuning = Tuning {
            snapshot_every: SNAPSHOT_EVERY,
            ..Tuning::default()
        };
        let member = match Member::join(id, &dir, endpoint, group, &tuning).await {
            Ok(m) => Arc::new(m),
            Err(e) => {
                eprintln!("member {id}: {e}");
                std::process::exit(3);
            }
        };
        {
            let member = Arc::clone(&member);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = member.record_joined().await;
                }
            });
        }
        let out = Arc::new(tokio::sync::Mutex::new(tokio::io::stdout()));
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let Some(json) = line.strip_prefix(TAG) else {
                continue;
            };
            let (n, ask): (u64, Ask) = serde_json::from_str(json).unwrap();
            let (member, out) = (Arc::clone(&member), Arc::clone(&out));
            tokio::spawn(async move {
                let answer = answer(&member, ask).await;
                let line = format!("{TAG}{}\n", serde_json::to_string(&(n, answer)).unwrap());
                let mut out = out.lock().await;
                let _ = out.write_all(line.as_bytes()).await;
                let _ = out.flush().await;
            });
        }
        // The driver is gone.
        std::process::exit(0);
    });
}

async fn answer(member: &Member, ask: Ask) -> Answer {
    let failed = |e: strata_raft::Error| Answer::Failed(e.to_string());
    match ask {
        Ask::Write(c) => member
            .write(c)
            .await
            .map_or_else(failed, |_| Answer::Written),
        Ask::Get(k) => member.entry(&k).await.map_or_else(failed, Answer::Entry),
        Ask::Read { key, worker } => {
            if let Err(e) = member.barrier().await {
                return failed(e);
            }
            let local = member.local();
            if let Some(k) = key {
                return local
                    .entry(&k)
                    .map_or_else(|e| Answer::Failed(e.to_string()), Answer::Entry);
            }
            let name = worker.unwrap_or_default();
            let registered = match local.worker(&name) {
                Ok(r) => r.map(|r| r.registered),
                Err(e) => return Answer::Failed(e.to_string()),
            };
            let mut holds = 0;
            for i in 0..BLOBS {
                match local.holders(&blob(i)) {
                    Ok(h) if h.contains(&name) => holds |= 1 << i,
                    Ok(_) => {}
                    Err(e) => return Answer::Failed(e.to_string()),
                }
            }
            Answer::Worker { registered, holds }
        }
        Ask::Barrier => {
            let begun = Instant::now();
            match member.barrier().await {
                Ok(()) => Answer::Took(begun.elapsed()),
                Err(e) => failed(e),
            }
        }
        Ask::Cut(peers) => {
            member.cut_off(peers);
            Answer::Done
        }
        Ask::Change(c) => member
            .change_membership(c)
            .await
            .map_or_else(failed, |()| Answer::Done),
        Ask::View => {
            let m = member.raft().metrics().borrow().clone();
            Answer::View {
                leader: m.current_leader,
                voters: m.membership_config.membership().voter_ids().collect(),
                snapshot: m.snapshot.map(|s| s.index),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The driver's side of a member process.

struct Proc {
    child: Mutex<Option<tokio::process::Child>>,
    tx: mpsc::UnboundedSender<String>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>,
    /// Its output ended: it is gone.
    gone: Arc<std::sync::atomic::AtomicBool>,
    next: AtomicU64,
}

impl Proc {
    /// Asks; `None`: no answer (the process died, or `CALL_TTL` passed).
    async fn ask(&self, ask: &Ask) -> Option<Answer> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(n, tx);
        if self.gone.load(Ordering::SeqCst) {
            return None;
        }
        let line = format!("{TAG}{}\n", serde_json::to_string(&(n, ask)).unwrap());
        if self.tx.send(line).is_err() {
            return None;
        }
        let answer = tokio::time::timeout(CALL_TTL, rx).await.ok()?.ok();
        self.pending.lock().unwrap().remove(&n);
        answer
    }

    /// SIGKILL, without waiting.
    fn signal(&self) {
        if let Some(child) = self.child.lock().unwrap().as_mut() {
            let _ = child.start_kill();
        }
    }

    /// SIGKILL, and waits for it to be gone.
    async fn kill(&self) {
        let child = self.child.lock().unwrap().take();
        if let Some(mut child) = child {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

/// Where the group lives and how its processes start.
struct Group {
    root: PathBuf,
    ca: PathBuf,
    /// Where the group reaches each member.
    addrs: BTreeMap<NodeId, SocketAddr>,
    /// Where each member listens: its address, or behind a relay that
    /// delays what it forwards.
    listen: BTreeMap<NodeId, SocketAddr>,
    live: Mutex<BTreeMap<NodeId, Arc<Proc>>>,
    /// Each member's lossy filesystem, when the run has them.
    disks: BTreeMap<NodeId, lossyfs::Mounted>,
    /// What the lossy filesystems forgot: files, bytes.
    lost: (AtomicUsize, AtomicU64),
}

impl Group {
    /// A group of fixed ports, so a member comes back where the group
    /// knows it; with `delay`, each member is reached through a relay
    /// that holds every datagram that long, each way; with `lossy`, each
    /// member's state lives on a filesystem that forgets unsynced writes.
    async fn new(root: &Path, delay: Option<Duration>, lossy: bool) -> Group {
        let ca = root.join("ca");
        std::fs::create_dir_all(&ca).unwrap();
        ClusterCa::create("jepsen").unwrap().save(&ca).unwrap();
        let free = || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let listen: BTreeMap<NodeId, SocketAddr> = (1..=MEMBERS).map(|id| (id, free())).collect();
        let mut addrs = listen.clone();
        if let Some(delay) = delay {
            for (id, to) in &listen {
                addrs.insert(*id, relay(delay, *to).await);
            }
        }
        let mut disks = BTreeMap::new();
        for id in 1..=MEMBERS {
            let at = root.join(format!("m{id}"));
            std::fs::create_dir_all(&at).unwrap();
            if lossy {
                let disk = lossyfs::Mounted::mount(&at).unwrap_or_else(|e| {
                    panic!(
                        "cannot mount a FUSE filesystem at {}: {e} (run as root with /dev/fuse, \
                         or set STRATA_JEPSEN_FUSE=0 to keep state on the plain disk)",
                        at.display()
                    )
                });
                disks.insert(id, disk);
            }
        }
        Group {
            root: root.to_path_buf(),
            ca,
            addrs,
            listen,
            live: Mutex::default(),
            disks,
            lost: Default::default(),
        }
    }

    /// Member `id`'s state directory: on its lossy filesystem if it has one.
    fn dir(&self, id: NodeId) -> PathBuf {
        self.root.join(format!("m{id}")).join("state")
    }

    /// Starts member `id`, configured with the group of `of`.
    fn start(&self, id: NodeId, of: &[NodeId]) -> Arc<Proc> {
        let group: Vec<String> = of
            .iter()
            .map(|i| format!("{i}={}", self.addrs[i]))
            .collect();
        let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.root.join(format!("m{id}.log")))
            .unwrap();
        let mut child = cmd
            .env("STRATA_JEPSEN_MEMBER", id.to_string())
            .env("STRATA_JEPSEN_DIR", self.dir(id))
            .env("STRATA_JEPSEN_LISTEN", self.listen[&id].to_string())
            .env("STRATA_JEPSEN_CA", &self.ca)
            .env("STRATA_JEPSEN_GROUP", group.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let mut stdin = child.stdin.take().unwrap();
        tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if stdin.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>> = Arc::default();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let waiting = Arc::clone(&pending);
        let gone: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let ended = Arc::clone(&gone);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Some(json) = line.strip_prefix(TAG) else {
                    continue;
                };
                let (n, answer): (u64, Answer) = serde_json::from_str(json).unwrap();
                if let Some(tx) = waiting.lock().unwrap().remove(&n) {
                    let _ = tx.send(answer);
                }
            }
            // Gone: every call still waiting has no answer.
            ended.store(true, Ordering::SeqCst);
            waiting.lock().unwrap().clear();
        });
        let proc = Arc::new(Proc {
            child: Mutex::new(Some(child)),
            tx,
            pending,
            gone,
            next: AtomicU64::new(0),
        });
        self.live.lock().unwrap().insert(id, Arc::clone(&proc));
        proc
    }

    fn get(&self, id: NodeId) -> Option<Arc<Proc>> {
        self.live.lock().unwrap().get(&id).cloned()
    }

    fn live(&self) -> Vec<(NodeId, Arc<Proc>)> {
        self.live
            .lock()
            .unwrap()
            .iter()
            .map(|(i, p)| (*i, Arc::clone(p)))
            .collect()
    }

    /// SIGKILL; on a lossy filesystem, the member's unsynced writes are
    /// lost with it, as when its machine loses power.
    async fn kill(&self, id: NodeId) {
        let proc = self.live.lock().unwrap().remove(&id);
        if let Some(p) = proc {
            p.kill().await;
        }
        if let Some(disk) = self.disks.get(&id) {
            let lost = disk.lose_unsynced();
            self.lost
                .0
                .fetch_add(lost.files as usize, Ordering::Relaxed);
            self.lost.1.fetch_add(lost.bytes, Ordering::Relaxed);
        }
    }

    /// The leader's view of the group, as the first member that knows a
    /// leader and is it says.
    async fn view(&self) -> Option<(NodeId, Vec<NodeId>, Option<u64>)> {
        for (id, p) in self.live() {
            if let Some(Answer::View {
                leader: Some(l),
                voters,
                snapshot,
            }) = p.ask(&Ask::View).await
                && l == id
            {
                return Some((l, voters, snapshot));
            }
        }
        None
    }

    /// Waits (up to a minute) for a leader every live member knows.
    async fn settled(&self) -> (NodeId, Vec<NodeId>) {
        let begun = Instant::now();
        loop {
            if let Some((l, voters, _)) = self.view().await {
                return (l, voters);
            }
            assert!(
                begun.elapsed() < Duration::from_secs(60),
                "no leader within a minute; member logs in {}",
                self.root.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills every live member at once, as a power cut does.
    async fn stop_all(&self) -> Vec<NodeId> {
        let live = self.live();
        for (_, p) in &live {
            p.signal();
        }
        for (id, _) in &live {
            self.kill(*id).await;
        }
        live.into_iter().map(|(id, _)| id).collect()
    }
}

// ---------------------------------------------------------------------------
// The history.

/// Calls on one object.
#[derive(Default)]
struct History {
    entries: BTreeMap<u64, Vec<Call<EntryOp, Option<Version>>>>,
    workers: BTreeMap<u64, Vec<Call<WorkerOp, WorkerRet>>>,
}

/// What a run did, for its report.
#[derive(Default, Debug)]
struct Tally {
    calls: AtomicUsize,
    answered_writes: AtomicUsize,
    unanswered_writes: AtomicUsize,
    reads: AtomicUsize,
    leader_reads: AtomicUsize,
    failed_reads: AtomicUsize,
    kills: AtomicUsize,
    leader_kills: AtomicUsize,
    partitions: AtomicUsize,
    removals: AtomicUsize,
    additions: AtomicUsize,
    refused_changes: AtomicUsize,
    power_cuts: AtomicUsize,
    snapshot: AtomicU64,
}

fn count(c: &AtomicUsize) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + Duration::from_millis(self.below((hi - lo).as_millis() as u64 + 1))
    }
}

struct Run {
    group: Group,
    t0: Instant,
    history: Mutex<History>,
    tally: Tally,
    /// Unique values: entry versions and touch times, registrations.
    unique: AtomicU64,
    /// Every registration made of each worker.
    registrations: Mutex<BTreeMap<u64, Vec<u64>>>,
    /// The group's voters as the nemesis last saw them: clients ask only
    /// them, as a member waiting to be added serves no builds.
    voters: Mutex<Vec<NodeId>>,
}

impl Run {
    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn record_entry(&self, k: u64, call: Call<EntryOp, Option<Version>>) {
        let mut h = self.history.lock().unwrap();
        h.entries.entry(k).or_default().push(call);
    }

    fn record_worker(&self, w: u64, call: Call<WorkerOp, WorkerRet>) {
        let mut h = self.history.lock().unwrap();
        h.workers.entry(w).or_default().push(call);
    }

    fn unique(&self) -> u64 {
        self.unique.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn pick(&self, rng: &mut Rng) -> Option<Arc<Proc>> {
        let voters = self.voters.lock().unwrap().clone();
        let live: Vec<(NodeId, Arc<Proc>)> = self
            .group
            .live()
            .into_iter()
            .filter(|(id, _)| voters.contains(id))
            .collect();
        (!live.is_empty()).then(|| Arc::clone(&live[rng.below(live.len() as u64) as usize].1))
    }

    /// One client: random calls through random members until `done`.
    async fn client(self: Arc<Self>, mut rng: Rng, done: tokio_util::sync::CancellationToken) {
        while !done.is_cancelled() {
            // Paced as on a disk: on the lossy filesystem an fsync costs
            // nothing, and unpaced clients make histories of ten thousand
            // calls an object, past what the search can decide.
            tokio::time::sleep(Duration::from_millis(20 + rng.below(40))).await;
            let Some(p) = self.pick(&mut rng) else {
                continue;
            };
            count(&self.tally.calls);
            match rng.below(100) {
                0..35 => self.write_entry(&p, &mut rng).await,
                35..55 => self.write_worker(&p, &mut rng).await,
                _ => self.read(&p, &mut rng).await,
            }
        }
    }

    async fn write(&self, p: &Proc, c: CommandV1) -> (u64, Option<u64>) {
        let start = self.now();
        let answered = matches!(p.ask(&Ask::Write(c)).await, Some(Answer::Written));
        if answered {
            count(&self.tally.answered_writes);
        } else {
            count(&self.tally.unanswered_writes);
        }
        (start, answered.then(|| self.now()))
    }

    async fn write_entry(&self, p: &Proc, rng: &mut Rng) {
        let k = rng.below(KEYS);
        let (command, op) = match rng.below(10) {
            0..7 => {
                let v = self.unique();
                let entry = CacheEntry {
                    layers: Vec::new(),
                    made_layer: false,
                    created: v,
                    last_used: v,
                    producer: "jepsen".into(),
                };
                (CommandV1::Put { key: key(k), entry }, EntryOp::Put(v))
            }
            7..9 => {
                let at = self.unique();
                (CommandV1::Touch { key: key(k), at }, EntryOp::Touch(at))
            }
            _ => (CommandV1::Remove { key: key(k) }, EntryOp::Remove),
        };
        let (start, end) = self.write(p, command).await;
        self.record_entry(
            k,
            Call {
                start,
                end,
                op,
                ret: None,
            },
        );
    }

    async fn write_worker(&self, p: &Proc, rng: &mut Rng) {
        let w = rng.below(WORKERS);
        let worker = worker_name(w);
        let mask = (rng.next() as u32) & ((1 << BLOBS) - 1);
        // A registration of the worker: mostly its latest, sometimes an
        // older one, as a message delayed across a restart carries.
        let registration = {
            let r = self.registrations.lock().unwrap();
            let made = r.get(&w).map(Vec::as_slice).unwrap_or_default();
            match made.len() {
                0 => 0,
                n if rng.below(10) < 7 => made[n - 1],
                n => made[rng.below(n as u64) as usize],
            }
        };
        // A registration is used by later commands once it is answered:
        // a location of a run whose registration is not applied yet
        // records that run itself, and a read seeing it would not tell
        // which of the two it saw.
        let mut made = None;
        let (command, op) = match rng.below(20) {
            0..3 => {
                let at = self.unique();
                made = Some(at);
                (
                    CommandV1::Registered {
                        worker,
                        addr: "127.0.0.1:1".into(),
                        at,
                        blobs: blob_list(mask),
                    },
                    WorkerOp::Registered { at, blobs: mask },
                )
            }
            3..12 => (
                CommandV1::Held {
                    worker,
                    registration,
                    blobs: blob_list(mask),
                },
                WorkerOp::Held {
                    registration,
                    blobs: mask,
                },
            ),
            12..18 => (
                CommandV1::Lost {
                    worker,
                    registration,
                    blobs: blob_list(mask),
                },
                WorkerOp::Lost {
                    registration,
                    blobs: mask,
                },
            ),
            _ => (
                CommandV1::Forget {
                    worker,
                    registered: registration,
                },
                WorkerOp::Forget {
                    registered: registration,
                },
            ),
        };
        let (start, end) = self.write(p, command).await;
        if let (Some(at), Some(_)) = (made, end) {
            self.registrations
                .lock()
                .unwrap()
                .entry(w)
                .or_default()
                .push(at);
        }
        self.record_worker(
            w,
            Call {
                start,
                end,
                op,
                ret: None,
            },
        );
    }

    async fn read(&self, p: &Proc, rng: &mut Rng) {
        if rng.below(2) == 0 {
            self.read_entry(p, rng.below(KEYS), rng.below(4) == 0).await;
        } else {
            self.read_worker(p, rng.below(WORKERS)).await;
        }
    }

    async fn read_entry(&self, p: &Proc, k: u64, through_leader: bool) {
        let start = self.now();
        let ask = if through_leader {
            count(&self.tally.leader_reads);
            Ask::Get(key(k))
        } else {
            Ask::Read {
                key: Some(key(k)),
                worker: None,
            }
        };
        let Some(Answer::Entry(e)) = p.ask(&ask).await else {
            count(&self.tally.failed_reads);
            return;
        };
        count(&self.tally.reads);
        let end = self.now();
        self.record_entry(
            k,
            Call {
                start,
                end: Some(end),
                op: EntryOp::Read,
                ret: Some(e.map(|e| Version {
                    created: e.created,
                    last_used: e.last_used,
                })),
            },
        );
    }

    async fn read_worker(&self, p: &Proc, w: u64) {
        let start = self.now();
        let Some(Answer::Worker { registered, holds }) = p
            .ask(&Ask::Read {
                key: None,
                worker: Some(worker_name(w)),
            })
            .await
        else {
            count(&self.tally.failed_reads);
            return;
        };
        count(&self.tally.reads);
        let end = Some(self.now());
        // The record and each blob's holders are read one after another
        // from the member's copy: each is a read of its own.
        let mut h = self.history.lock().unwrap();
        let calls = h.workers.entry(w).or_default();
        calls.push(Call {
            start,
            end,
            op: WorkerOp::ReadRecord,
            ret: Some(WorkerRet::Record(registered)),
        });
        for i in 0..BLOBS {
            calls.push(Call {
                start,
                end,
                op: WorkerOp::ReadHolds(i),
                ret: Some(WorkerRet::Holds(holds & (1 << i) != 0)),
            });
        }
    }

    /// One fault at a time, in turn: a kill (the leader's half the time),
    /// a partition longer than an election, a membership change, a power
    /// cut of the whole group.
    async fn nemesis(self: Arc<Self>, mut rng: Rng, done: tokio_util::sync::CancellationToken) {
        let all: Vec<NodeId> = (1..=MEMBERS).collect();
        let mut turn = 0u64;
        while !done.is_cancelled() {
            tokio::time::sleep(
                rng.between(Duration::from_millis(500), Duration::from_millis(1500)),
            )
            .await;
            if done.is_cancelled() {
                return;
            }
            let view = self.group.view().await;
            if let Some((_, voters, s)) = &view {
                self.tally
                    .snapshot
                    .fetch_max(s.unwrap_or(0), Ordering::Relaxed);
                *self.voters.lock().unwrap() = voters.clone();
            }
            turn += 1;
            match turn % 4 {
                0 => {
                    let live = self.group.live();
                    if live.is_empty() {
                        continue;
                    }
                    let victim = match &view {
                        Some((leader, _, _)) if rng.below(2) == 0 => {
                            count(&self.tally.leader_kills);
                            *leader
                        }
                        _ => live[rng.below(live.len() as u64) as usize].0,
                    };
                    self.group.kill(victim).await;
                    count(&self.tally.kills);
                    tokio::time::sleep(
                        rng.between(Duration::from_millis(300), Duration::from_millis(2000)),
                    )
                    .await;
                    self.group.start(victim, &all);
                }
                1 => {
                    let victim = 1 + rng.below(MEMBERS);
                    let live = self.group.live();
                    for (id, p) in &live {
                        let cut = if *id == victim {
                            all.iter().copied().filter(|o| *o != victim).collect()
                        } else {
                            vec![victim]
                        };
                        p.ask(&Ask::Cut(cut)).await;
                    }
                    count(&self.tally.partitions);
                    // Longer than the longest election timeout (1 s): a
                    // cut-off leader is replaced.
                    tokio::time::sleep(
                        rng.between(Duration::from_millis(1500), Duration::from_millis(3000)),
                    )
                    .await;
                    for (_, p) in self.group.live() {
                        p.ask(&Ask::Cut(Vec::new())).await;
                    }
                }
                2 => self.change_membership(&mut rng, view).await,
                _ => {
                    let were = self.group.stop_all().await;
                    count(&self.tally.power_cuts);
                    tokio::time::sleep(
                        rng.between(Duration::from_millis(300), Duration::from_millis(1000)),
                    )
                    .await;
                    for id in were {
                        self.group.start(id, &all);
                    }
                }
            }
        }
    }

    /// Four voters: one leaves, is killed, wiped and started empty (it
    /// waits to be added, as an operator's replacement does). Three: the
    /// one not a voter is added back.
    async fn change_membership(
        &self,
        rng: &mut Rng,
        view: Option<(NodeId, Vec<NodeId>, Option<u64>)>,
    ) {
        let Some((_, voters, _)) = view else {
            return;
        };
        let live = self.group.live();
        let Some((_, via)) = live.get(rng.below(live.len() as u64) as usize).cloned() else {
            return;
        };
        let all: Vec<NodeId> = (1..=MEMBERS).collect();
        if voters.len() as u64 == MEMBERS {
            let out = voters[rng.below(voters.len() as u64) as usize];
            let asked = via
                .ask(&Ask::Change(MembershipChange::Remove { id: out }))
                .await;
            if !matches!(asked, Some(Answer::Done)) {
                count(&self.tally.refused_changes);
                return;
            }
            count(&self.tally.removals);
            self.voters.lock().unwrap().retain(|v| *v != out);
            self.group.kill(out).await;
            std::fs::remove_dir_all(self.group.dir(out)).unwrap();
            self.group.start(out, &all);
        } else if let Some(spare) = all.iter().find(|i| !voters.contains(i)) {
            if self.group.get(*spare).is_none() {
                return;
            }
            let node = Node {
                addr: self.group.addrs[spare].to_string(),
            };
            let asked = via
                .ask(&Ask::Change(MembershipChange::Add { id: *spare, node }))
                .await;
            if matches!(asked, Some(Answer::Done)) {
                count(&self.tally.additions);
            } else {
                count(&self.tally.refused_changes);
            }
        }
    }
}

/// One seeded run; returns its anomalies.
async fn run(
    seed: u64,
    length: Duration,
    root: &Path,
    lossy: bool,
) -> (Vec<String>, Tally, usize, (usize, u64)) {
    let group = Group::new(root, None, lossy).await;
    // Three voters make the group; the fourth starts as a member to add.
    for id in 1..=3 {
        group.start(id, &[1, 2, 3]);
    }
    group.start(4, &[1, 2, 3, 4]);
    let (_, voters) = group.settled().await;
    let run = Arc::new(Run {
        group,
        t0: Instant::now(),
        history: Mutex::default(),
        tally: Tally::default(),
        unique: AtomicU64::new(0),
        registrations: Mutex::default(),
        voters: Mutex::new(voters),
    });
    let done = tokio_util::sync::CancellationToken::new();
    let nemesis = tokio::spawn(Arc::clone(&run).nemesis(Rng::new(seed ^ 0xdead), done.clone()));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        clients.spawn(Arc::clone(&run).client(Rng::new(seed.wrapping_add(c * 7919)), done.clone()));
    }
    tokio::time::sleep(length).await;
    done.cancel();
    while clients.join_next().await.is_some() {}
    nemesis.await.unwrap();

    // Healed, every member up: the last word on every object, read
    // through each member.
    let all: Vec<NodeId> = (1..=MEMBERS).collect();
    for id in 1..=MEMBERS {
        if run.group.get(id).is_none() {
            run.group.start(id, &all);
        }
    }
    for (_, p) in run.group.live() {
        p.ask(&Ask::Cut(Vec::new())).await;
    }
    let (_, voters) = run.group.settled().await;
    for id in voters {
        let p = run.group.get(id).unwrap();
        for k in 0..KEYS {
            run.read_entry(&p, k, false).await;
        }
        for w in 0..WORKERS {
            run.read_worker(&p, w).await;
        }
    }
    if let Some((_, _, Some(s))) = run.group.view().await {
        run.tally.snapshot.fetch_max(s, Ordering::Relaxed);
    }
    run.group.stop_all().await;
    let lost = (
        run.group.lost.0.load(Ordering::Relaxed),
        run.group.lost.1.load(Ordering::Relaxed),
    );

    let run = Arc::into_inner(run).unwrap();
    let history = run.history.into_inner().unwrap();
    let mut anomalies = Vec::new();
    let mut calls = 0;
    for (k, h) in &history.entries {
        calls += h.len();
        if let Err(e) = linearizable(&Entry, h) {
            anomalies.push(format!("seed {seed}, cache key {k}: {e}"));
        }
    }
    for (w, h) in &history.workers {
        calls += h.len();
        if let Err(e) = linearizable(&Worker, h) {
            anomalies.push(format!("seed {seed}, worker w{w}: {e}"));
        }
    }
    (anomalies, run.tally, calls, lost)
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

/// Read-index rounds on the leader and on a follower, then the longest a
/// follower's read waits while the leader is killed, every datagram
/// between members held `delay` each way if given.
async fn latency(root: &Path, delay: Option<Duration>) -> String {
    let group = Group::new(root, delay, false).await;
    for id in 1..=3 {
        group.start(id, &[1, 2, 3]);
    }
    let (leader, voters) = group.settled().await;
    let follower = *voters.iter().find(|v| **v != leader).unwrap();
    // 100 rounds each, within 30 s.
    let rounds = |id| {
        let p = group.get(id).unwrap();
        async move {
            let (mut took, mut failed) = (Vec::new(), Vec::new());
            let begun = Instant::now();
            while took.len() + failed.len() < 100 && begun.elapsed() < Duration::from_secs(30) {
                match p.ask(&Ask::Barrier).await {
                    Some(Answer::Took(d)) => took.push(d),
                    other => failed.push(format!("{other:?}")),
                }
            }
            assert!(
                failed.is_empty() && !took.is_empty(),
                "member {id}: {} read-index rounds, {} failed: {failed:?}",
                took.len(),
                failed.len()
            );
            took
        }
    };
    let mut on_leader = rounds(leader).await;
    let mut on_follower = rounds(follower).await;
    // A follower reads in a loop while the leader is killed.
    let p = group.get(follower).unwrap();
    let reading = tokio::spawn(async move {
        let mut longest = Duration::ZERO;
        let begun = Instant::now();
        while begun.elapsed() < Duration::from_secs(6) {
            let t = Instant::now();
            let _ = p.ask(&Ask::Barrier).await;
            longest = longest.max(t.elapsed());
        }
        longest
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    group.kill(leader).await;
    let longest = reading.await.unwrap();
    group.stop_all().await;
    format!(
        "read-index round: leader p50 {:.1} ms p99 {:.1} ms; follower p50 {:.1} ms p99 {:.1} ms; \
         longest follower read while the leader was killed: {:.2} s",
        percentile(&mut on_leader, 0.5).as_secs_f64() * 1e3,
        percentile(&mut on_leader, 0.99).as_secs_f64() * 1e3,
        percentile(&mut on_follower, 0.5).as_secs_f64() * 1e3,
        percentile(&mut on_follower, 0.99).as_secs_f64() * 1e3,
        longest.as_secs_f64(),
    )
}

/// Relays UDP datagrams to `to` and its answers back, each held `delay`
/// first: a userspace netem for the members' QUIC (this machine's kernel
/// has no netem). Each sender gets a socket of its own towards `to`, so
/// answers find their way back. Returns where it listens; it runs until
/// the process ends.
async fn relay(delay: Duration, to: SocketAddr) -> SocketAddr {
    let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let at = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut backs: HashMap<SocketAddr, Arc<tokio::net::UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else {
                continue;
            };
            let back = match backs.get(&from) {
                Some(b) => Arc::clone(b),
                None => {
                    let b = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    b.connect(to).await.unwrap();
                    // Answers: held, then sent back from the front.
                    let (b2, front) = (Arc::clone(&b), Arc::clone(&front));
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        loop {
                            // An error is an ICMP answer to an earlier
                            // datagram (the member was not up yet).
                            let Ok(n) = b2.recv(&mut buf).await else {
                                continue;
                            };
                            let datagram = buf[..n].to_vec();
                            let front = Arc::clone(&front);
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = front.send_to(&datagram, from).await;
                            });
                        }
                    });
                    backs.insert(from, Arc::clone(&b));
                    b
                }
            };
            let datagram = buf[..n].to_vec();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = back.send(&datagram).await;
            });
        }
    });
    at
}

/// The lossy filesystem keeps what was synced and forgets the rest, as
/// the nemesis needs it to: a synced file, an unsynced one, a file synced
/// then written again, a rename.
fn lossyfs_forgets_what_was_not_synced() {
    use std::io::Write;
    let root = tempfile::tempdir().unwrap();
    let disk = lossyfs::Mounted::mount(root.path()).unwrap_or_else(|e| {
        panic!(
            "cannot mount a FUSE filesystem at {}: {e} (run as root with /dev/fuse, \
             or set STRATA_JEPSEN_FUSE=0 to keep state on the plain disk)",
            root.path().display()
        )
    });
    let at = |n: &str| root.path().join(n);
    let mut synced = std::fs::File::create(at("synced")).unwrap();
    synced.write_all(b"kept").unwrap();
    synced.sync_data().unwrap();
    synced.write_all(b" and lost").unwrap();
    drop(synced);
    std::fs::write(at("unsynced"), b"lost").unwrap();
    let mut moved = std::fs::File::create(at("tmp")).unwrap();
    moved.write_all(b"renamed").unwrap();
    moved.sync_all().unwrap();
    drop(moved);
    std::fs::rename(at("tmp"), at("renamed")).unwrap();
    assert_eq!(std::fs::read(at("synced")).unwrap(), b"kept and lost");
    let lost = disk.lose_unsynced();
    assert_eq!(std::fs::read(at("synced")).unwrap(), b"kept");
    assert_eq!(std::fs::read(at("unsynced")).unwrap(), b"");
    assert_eq!(std::fs::read(at("renamed")).unwrap(), b"renamed");
    assert_eq!((lost.files, lost.bytes), (2, 13));
    drop(disk);
    println!("lossyfs: a synced write survives a power cut, an unsynced one does not");
}

fn main() {
    if let Ok(id) = std::env::var("STRATA_JEPSEN_MEMBER") {
        member_main(id.parse().unwrap());
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        println!("jepsen: test");
        return;
    }
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let (first, seeds, length) = (
        env("STRATA_JEPSEN_SEED", 1),
        env("STRATA_JEPSEN_SEEDS", 1),
        Duration::from_secs(env("STRATA_JEPSEN_SECONDS", 40)),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let lossy = std::env::var("STRATA_JEPSEN_FUSE").map_or(true, |v| v != "0");
    if lossy {
        lossyfs_forgets_what_was_not_synced();
    } else {
        println!(
            "STRATA_JEPSEN_FUSE=0: members keep their state on the plain disk, and lose nothing when killed"
        );
    }
    rt.block_on(async {
        let mut failed = Vec::new();
        for seed in first..first + seeds {
            let root = tempfile::tempdir().unwrap();
            let begun = Instant::now();
            let (anomalies, t, calls, lost) = run(seed, length, root.path(), lossy).await;
            let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
            println!(
                "jepsen seed {seed} (STRATA_JEPSEN_SEED={seed} STRATA_JEPSEN_SEEDS=1 replays it): \
                 {} client calls in {:.1} s, {} calls checked; writes {} answered, {} unanswered; \
                 reads {} ({} through the leader's lookup, {} failed); faults: {} kills ({} of the leader), \
                 {} partitions, {} members removed and wiped, {} added back, {} changes refused, \
                 {} power cuts of the whole group; unsynced writes lost: {} bytes in {} files; \
                 snapshots up to entry {}; {} anomalies",
                n(&t.calls),
                begun.elapsed().as_secs_f64(),
                calls,
                n(&t.answered_writes),
                n(&t.unanswered_writes),
                n(&t.reads),
                n(&t.leader_reads),
                n(&t.failed_reads),
                n(&t.kills),
                n(&t.leader_kills),
                n(&t.partitions),
                n(&t.removals),
                n(&t.additions),
                n(&t.refused_changes),
                n(&t.power_cuts),
                lost.1,
                lost.0,
                t.snapshot.load(Ordering::Relaxed),
                anomalies.len(),
            );
            assert!(
                n(&t.answered_writes) > 0
                    && n(&t.reads) > 0
                    && n(&t.kills) > 0
                    && n(&t.partitions) > 0
                    && n(&t.power_cuts) > 0,
                "seed {seed}: a history with nothing to check"
            );
            if !anomalies.is_empty() {
                // Keep the member logs of a failed run.
                let kept = root.keep();
                eprintln!("member logs: {}", kept.display());
            }
            failed.extend(anomalies);
        }
        let root = tempfile::tempdir().unwrap();
        println!("loopback: {}", latency(root.path(), None).await);
        let root = tempfile::tempdir().unwrap();
        println!(
            "40 ms added each way between members: {}",
            latency(root.path(), Some(Duration::from_millis(40))).await
        );
        for a in &failed {
            eprintln!("{a}");
        }
        assert!(failed.is_empty(), "{} anomalies", failed.len());
        println!("jepsen: ok");
    });
}
