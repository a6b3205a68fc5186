//! strata's replicated cache index: the coordinators of a cluster form a
//! Raft group (openraft) whose replicated state is the cache index (cache
//! key → layers) and where blobs are. Each member keeps its Raft log and
//! its copy of the state in RocksDB; members talk over strata-net (QUIC,
//! mutual TLS, coordinator certificates only).
//!
//! * [`Member`]: one coordinator's part of the group: start it on a state
//!   directory and an endpoint, write commands through the leader, read
//!   linearizably.
//! * [`Command`]: what the log carries, versioned; applying one is
//!   deterministic (times travel in the command, never read in apply).
//!
//! It knows nothing of builds beyond the cache entries it stores.

mod network;
mod store;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, Raft, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use strata_cache::CacheEntry;
use strata_cas::Digest;
use strata_net::Endpoint;
use tokio_util::sync::CancellationToken;

pub use network::Network;
pub use store::{LogStore, StateMachine};

/// A member's id in the group.
pub type NodeId = u64;

/// A member as the group knows it: where its Raft endpoint listens.
pub type Node = BasicNode;

openraft::declare_raft_types!(
    /// The types of strata's Raft group.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = Node,
);

/// A change to the replicated state. New kinds of change come as a new
/// version, so members of different versions never read a command
/// differently (version 1 is frozen from strata's first release on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Version 1.
    V1(CommandV1),
    /// Version 2: the images the cluster names.
    V2(CommandV2),
}

impl From<CommandV1> for Command {
    fn from(c: CommandV1) -> Command {
        Command::V1(c)
    }
}

impl From<CommandV2> for Command {
    fn from(c: CommandV2) -> Command {
        Command::V2(c)
    }
}

/// The changes of version 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV2 {
    /// Points the image name `name` (a normalized reference,
    /// `docker.io/library/app:1`) at `image`, whatever it named before.
    Tag {
        /// The name.
        name: String,
        /// The image.
        image: ClusterImage,
    },
    /// Drops the image name `name`.
    Untag {
        /// The name.
        name: String,
    },
}

/// An image the cluster built and names: its config and layers, which
/// live on the workers. Its manifest is
/// [`strata_oci::image_manifest`] of the two, the same bytes a client
/// storing it writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterImage {
    /// The image config, as its exact bytes (its sha256 is the image ID).
    pub config: Vec<u8>,
    /// Its layers, bottom first.
    pub layers: Vec<strata_oci::LayerRef>,
    /// When it was named (seconds since the epoch).
    pub tagged: u64,
}

/// The changes of version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV1 {
    /// Records a step's result.
    Put {
        /// The step's cache key.
        key: Digest,
        /// What it produced.
        entry: CacheEntry,
    },
    /// A build used the entry at `at` (seconds since the epoch).
    Touch {
        /// The cache key.
        key: Digest,
        /// When.
        at: u64,
    },
    /// Drops an entry.
    Remove {
        /// The cache key.
        key: Digest,
    },
    /// `worker` gained `blobs`, whichever registration it is in. Written
    /// by earlier versions, and applied as they did; new records are
    /// [`CommandV1::Held`].
    Located {
        /// The worker's name.
        worker: String,
        /// The blobs.
        blobs: Vec<Digest>,
    },
    /// `worker` has been gone so long that it is taken off the records:
    /// no longer registered, holding nothing (if it comes back, it
    /// registers afresh). Only the registration made at `registered`
    /// is forgotten: one the worker made since stands.
    Forget {
        /// The worker's name.
        worker: String,
        /// When the registration to forget was made (its record's
        /// `registered`).
        registered: u64,
    },
    /// A worker joined (or joined again): it serves blobs at `addr` and
    /// holds `blobs`. A new run replaces whatever was recorded for the
    /// worker before; the run recorded already (a [`CommandV1::Held`] of
    /// it came first) gains `blobs` and keeps what it gained since; an
    /// older run than the recorded one changes nothing.
    Registered {
        /// The worker's name.
        worker: String,
        /// Where it serves blobs.
        addr: String,
        /// The registration: the worker process's own id, its start time
        /// in microseconds since the epoch (earlier versions: the
        /// registration's time in seconds). A worker back from a restart,
        /// its store wiped or not, has a higher one.
        at: u64,
        /// Every blob in its store.
        blobs: Vec<Digest>,
    },
    /// `worker`, in registration `registration`, gained `blobs` (it ran a
    /// step, fetched, or took a copy). Dropped if a later registration of
    /// the worker is recorded: what a worker held before it came back is
    /// not what it holds now. One of a run not recorded yet starts that
    /// run's record (its registration may still be on its way).
    Held {
        /// The worker's name.
        worker: String,
        /// The registration the blobs were gained in (its `at`).
        registration: u64,
        /// The blobs.
        blobs: Vec<Digest>,
    },
    /// Member `member` of the group has taken part: it acknowledged log
    /// entries. A member that has, starting again with an empty state,
    /// lost it, and must not vote until taken out and added again.
    Joined {
        /// The member's id.
        member: NodeId,
    },
    /// `worker`, in registration `registration`, does not hold `blobs`
    /// though recorded to (asked, it said so). Applied only while that
    /// registration is the recorded one.
    Lost {
        /// The worker's name.
        worker: String,
        /// The registration it said so in.
        registration: u64,
        /// The blobs.
        blobs: Vec<Digest>,
    },
}

/// A registered worker, as the group records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Where it serves blobs.
    pub addr: String,
    /// When it last registered (seconds since the epoch).
    pub registered: u64,
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the state changed.
    pub changed: bool,
}

/// Errors of a member.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Its database could not be opened.
    #[error("Raft state at {}: {source}", path.display())]
    Db {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: rocksdb::Error,
    },
    /// No leader answered in time: fewer than a majority of members are
    /// up, or they cannot reach each other.
    #[error("the replicated cache index has no leader: {0}")]
    Unavailable(String),
    /// Raft failed.
    #[error("Raft: {0}")]
    Raft(String),
    /// Reading the local state failed.
    #[error("reading the replicated state: {0}")]
    State(String),
    /// This member starts with an empty state, but the group counts it
    /// as a voter that took part: it lost its state, and voting with an
    /// empty log could lose acknowledged writes.
    #[error(
        "this member's state is empty, but the group (voters {voters:?}) counts it as a voter that took part: it lost its state"
    )]
    LostItsState {
        /// The group's voters, as a member that answered knows them.
        voters: Vec<NodeId>,
    },
}

/// How long a write or read waits for a leader before it fails: an
/// election takes well under this.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);

/// The longest pause between asks of a leader that is not known yet.
const LEADER_PAUSE_MAX: Duration = Duration::from_millis(100);

/// The pauses between asks while a leader is elected: from 20 ms,
/// doubling, jittered (members and clients asking at once spread out), up
/// to [`LEADER_PAUSE_MAX`]; the caller stops at its deadline.
fn leader_pauses() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(LEADER_PAUSE_MAX / 2)
        .without_max_times()
        .with_jitter()
        .build()
}

/// How long adding or removing a member may take, a new member's catching
/// up included.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(60);

/// How long a forwarded write or read may take.
const FORWARD_TTL: Duration = Duration::from_secs(5);

/// Applies `change` on `raft`, if it leads: an added member is made a
/// learner and caught up before it votes.
/// Why a change of the group's voters was not made.
pub(crate) enum Unchanged {
    /// Raft refused it (this member does not lead, or the change failed).
    Raft(RaftError<NodeId, ClientWriteError<NodeId, Node>>),
    /// The change would leave the group without a majority that answers,
    /// or adds a member that does not answer.
    Refused(String),
    /// It took longer than [`MEMBERSHIP_WAIT`]: what was begun is undone.
    TimedOut,
}

impl std::fmt::Display for Unchanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unchanged::Raft(e) => write!(f, "{e}"),
            Unchanged::Refused(why) => write!(f, "{why}"),
            Unchanged::TimedOut => write!(
                f,
                "the change was not made within {MEMBERSHIP_WAIT:?} (the new member could not catch up, or no majority answered); it was undone"
            ),
        }
    }
}

/// Which voters of a group would answer: a majority of `voters` among
/// `answering`, or why not.
fn majority_answers(
    what: &str,
    voters: &std::collections::BTreeSet<NodeId>,
    answering: &std::collections::BTreeSet<NodeId>,
) -> Result<(), String> {
    let up: Vec<NodeId> = voters.intersection(answering).copied().collect();
    if up.len() * 2 > voters.len() {
        return Ok(());
    }
    let down: Vec<NodeId> = voters.difference(answering).copied().collect();
    Err(format!(
        "{what} would be voters {voters:?}, of which only {up:?} answer ({down:?} do not): \
         the group could commit nothing, and every build would stop. Bring the members that \
         do not answer back first"
    ))
}

/// Makes `change` on the leader `raft`, after checking with the members
/// (dialed from `endpoint`) that the group keeps a majority that answers,
/// both during the change (the old voters) and after it (the new ones),
/// and that a member being added answers. Bounded by
/// [`MEMBERSHIP_WAIT`]; an addition that times out is undone, so a member
/// that catches up later is not made a voter behind the operator's back.
pub(crate) async fn apply_membership(
    raft: &Raft<TypeConfig>,
    endpoint: &Endpoint,
    change: MembershipChange,
) -> Result<(), Unchanged> {
    let metrics = raft.metrics().borrow().clone();
    if metrics.current_leader == Some(metrics.id) {
        let membership = metrics.membership_config.membership();
        let old: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut nodes: BTreeMap<NodeId, Node> =
            membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let mut new = old.clone();
        match &change {
            MembershipChange::Add { id, node } => {
                new.insert(*id);
                nodes.insert(*id, node.clone());
            }
            MembershipChange::Remove { id } => {
                new.remove(id);
            }
        }
        if new.is_empty() {
            return Err(Unchanged::Refused(
                "the group cannot lose its last member".into(),
            ));
        }
        let asked: BTreeMap<NodeId, Node> = nodes
            .into_iter()
            .filter(|(id, _)| old.contains(id) || new.contains(id))
            .collect();
        let mut answering: std::collections::BTreeSet<NodeId> =
            probe_group(endpoint, metrics.id, &asked, Duration::from_secs(2))
                .await
                .into_iter()
                .filter(|(_, p)| p.is_some())
                .map(|(id, _)| id)
                .collect();
        answering.insert(metrics.id);
        if let MembershipChange::Add { id, node } = &change
            && !answering.contains(id)
        {
            return Err(Unchanged::Refused(format!(
                "coordinator {id} at {} does not answer: start it with its configuration first",
                node.addr
            )));
        }
        majority_answers("the group during the change", &old, &answering)
            .and_then(|()| majority_answers("the group after the change", &new, &answering))
            .map_err(Unchanged::Refused)?;
    }
    let made = tokio::time::timeout(MEMBERSHIP_WAIT, async {
        match &change {
            MembershipChange::Add { id, node } => {
                raft.add_learner(*id, node.clone(), true).await?;
                raft.change_membership(openraft::ChangeMembers::AddVoterIds([*id].into()), false)
                    .await?;
            }
            MembershipChange::Remove { id } => {
                raft.change_membership(openraft::ChangeMembers::RemoveVoters([*id].into()), false)
                    .await?;
            }
        }
        Ok::<(), RaftError<NodeId, ClientWriteError<NodeId, Node>>>(())
    })
    .await;
    match made {
        Ok(r) => r.map_err(Unchanged::Raft),
        Err(_) => {
            if let MembershipChange::Add { id, .. } = &change {
                // Still a learner: it leaves, and is never promoted.
                let undo = raft
                    .change_membership(openraft::ChangeMembers::RemoveNodes([*id].into()), false);
                if let Ok(Err(e)) = tokio::time::timeout(LEADER_WAIT, undo).await {
                    tracing::warn!(member = id, error = %e, "cannot undo a timed-out addition");
                }
            }
            Err(Unchanged::TimedOut)
        }
    }
}

/// What a member is asked, by a caller or a follower forwarding.
enum Ask {
    Write(Command),
    Read(Digest),
    ReadIndex,
    Membership(MembershipChange),
}

/// A change to the group's voters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembershipChange {
    /// A new member: it first catches up as a learner, then votes.
    Add {
        /// Its id.
        id: NodeId,
        /// Its Raft address.
        node: Node,
    },
    /// A member leaves the group.
    Remove {
        /// Its id.
        id: NodeId,
    },
}

/// What it answers.
#[derive(Debug)]
enum Answer {
    /// What applying it did, and its log index.
    Written(Response, u64),
    Entry(Option<CacheEntry>),
    /// The log index to have applied; none when asked of the leader.
    Index(Option<u64>),
    Changed,
}

/// Why a member did not answer itself.
enum Here {
    /// Another member leads (this one, if known).
    Elsewhere(Option<(NodeId, Node)>),
    /// It failed for good.
    Failed(Error),
}

/// What a member knows of its group, as it tells a member starting with
/// an empty state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Whether the group has been made (this member has a membership).
    pub initialized: bool,
    /// The group's voters, as this member knows them.
    pub voters: Vec<NodeId>,
    /// The members that have taken part ([`CommandV1::Joined`]), as this
    /// member has applied them.
    pub joined: Vec<NodeId>,
}

/// What a member starting with an empty state concludes from what the
/// other members of its configured group answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Nobody has made the group, and a majority says so: a first start.
    Fresh,
    /// The group exists and counts this member as a voter that has taken
    /// part: it lost its state. Voting with an empty log could elect a
    /// member missing acknowledged writes, so it must not start until an
    /// operator has removed it from the group (and adds it again).
    LostItsState {
        /// The voters, as a member that answered knows them.
        voters: Vec<NodeId>,
    },
    /// The group exists, and this member never took part in it (it is not
    /// a voter, or is one that was down since the group was made): it
    /// starts empty and catches up, or waits to be added.
    New,
    /// Too few members answered to tell.
    Unsure,
}

/// Judges, for member `me` of a configured group of `size`, what the
/// other members answered (`None`: no answer).
pub fn standing(me: NodeId, size: usize, answers: &[(NodeId, Option<Probe>)]) -> Standing {
    let known: Vec<&Probe> = answers
        .iter()
        .filter_map(|(_, p)| p.as_ref())
        .filter(|p| p.initialized)
        .collect();
    if let Some(p) = known.first() {
        // Any member that has applied this one's Joined knows it took part.
        let took_part = known.iter().any(|p| p.joined.contains(&me));
        return if p.voters.contains(&me) && took_part {
            Standing::LostItsState {
                voters: p.voters.clone(),
            }
        } else {
            Standing::New
        };
    }
    let empty = 1 + answers.iter().filter(|(_, p)| p.is_some()).count();
    if empty > size / 2 {
        Standing::Fresh
    } else {
        Standing::Unsure
    }
}

/// Asks each of `members` (not `me`) what it knows of the group, within
/// `ttl` each.
pub async fn probe_group(
    endpoint: &Endpoint,
    me: NodeId,
    members: &BTreeMap<NodeId, Node>,
    ttl: Duration,
) -> Vec<(NodeId, Option<Probe>)> {
    let mut asks = tokio::task::JoinSet::new();
    for (id, node) in members.iter().filter(|(id, _)| **id != me) {
        let mut peer = network::Peer::new(
            endpoint.clone(),
            network::CutOff::default(),
            network::Conns::default(),
            *id,
            node.addr.clone(),
        );
        let id = *id;
        asks.spawn(async move { (id, peer.probe(ttl).await.ok()) });
    }
    let mut out = Vec::new();
    while let Some(Ok(answer)) = asks.join_next().await {
        out.push(answer);
    }
    out.sort_by_key(|(id, _)| *id);
    out
}

/// For member `me` starting with an empty state in a configured group of
/// `members`: asks the others (every second, answering their own probes
/// meanwhile, as an empty member that takes no part in elections) until
/// it can tell whether the group is new, exists without it, or lost it,
/// or until `patience` has passed (then [`Standing::Unsure`]; `None`:
/// no end).
pub async fn find_standing(
    endpoint: &Endpoint,
    me: NodeId,
    members: &BTreeMap<NodeId, Node>,
    patience: Option<Duration>,
) -> Standing {
    let stop = CancellationToken::new();
    let answering = tokio::spawn(network::answer_probes_only(endpoint.clone(), stop.clone()));
    let started = Instant::now();
    let found = loop {
        let answers = probe_group(endpoint, me, members, Duration::from_secs(2)).await;
        match standing(me, members.len(), &answers) {
            Standing::Unsure if patience.is_some_and(|p| started.elapsed() >= p) => {
                break Standing::Unsure;
            }
            Standing::Unsure => {
                let answered: Vec<NodeId> = answers
                    .iter()
                    .filter(|(_, p)| p.is_some())
                    .map(|(id, _)| *id)
                    .collect();
                tracing::info!(member = me, ?answered, waited = ?started.elapsed(), "this member's state is empty; waiting for a majority of the group to answer before taking part");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            found => break found,
        }
    };
    stop.cancel();
    let _ = answering.await;
    found
}

/// Timing and compaction of the group.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How often the leader reassures followers.
    pub heartbeat: Duration,
    /// A follower that hears nothing for a random time in this range
    /// stands for election.
    pub election_timeout: (Duration, Duration),
    /// Entries applied since the last snapshot before a new one is taken
    /// and the log before it purged.
    pub snapshot_every: u64,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(500), Duration::from_millis(1000)),
            snapshot_every: 5000,
        }
    }
}

/// One coordinator's member of the group.
pub struct Member {
    id: NodeId,
    raft: Raft<TypeConfig>,
    state: StateMachine,
    endpoint: Endpoint,
    /// Its connections to other members, shared with Raft's own.
    conns: network::Conns,
    /// Members it sends nothing to (fault injection).
    cut: network::CutOff,
    shutdown: CancellationToken,
}

impl Member {
    /// Takes member `id`'s place in its configured `group` (every member's
    /// id and Raft address, this one's among them; empty or itself alone:
    /// a group of one), from its state directory `dir` and its Raft
    /// endpoint. A member with a state starts from it. One with an empty
    /// state first finds its standing ([`find_standing`]): the member with
    /// the lowest id makes a group a majority says is new (it waits for
    /// that majority however long it takes: it could not lead without
    /// one); a member the group never counted starts empty and catches up
    /// or waits to be added; one the group counts as a voter that took
    /// part lost its state, and is refused ([`Error::LostItsState`]).
    pub async fn join(
        id: NodeId,
        dir: &Path,
        endpoint: Endpoint,
        group: BTreeMap<NodeId, Node>,
        tuning: &Tuning,
    ) -> Result<Member, Error> {
        let group = if group.is_empty() {
            let addr = endpoint
                .local_addr()
                .map_err(|e| Error::Raft(format!("the Raft endpoint: {e}")))?;
            BTreeMap::from([(
                id,
                Node {
                    addr: addr.to_string(),
                },
            )])
        } else {
            group
        };
        let mut fresh = group.len() <= 1;
        let first = group.keys().next().copied();
        if !fresh && !Member::has_state(dir)? {
            // The others wait a while, then start: one whose configured
            // group does not answer is most likely being added to a group
            // under other addresses.
            let patience = (first != Some(id)).then_some(Duration::from_secs(5));
            match find_standing(&endpoint, id, &group, patience).await {
                Standing::Fresh => fresh = true,
                Standing::New => {
                    tracing::info!(
                        member = id,
                        "the group exists without this member: waiting to be added"
                    );
                }
                Standing::LostItsState { voters } => return Err(Error::LostItsState { voters }),
                Standing::Unsure => {
                    tracing::warn!(
                        member = id,
                        "no majority of the configured group answered; starting with an empty state"
                    );
                }
            }
        }
        let member = Member::start(id, dir, endpoint, tuning).await?;
        let initialized = member
            .raft
            .is_initialized()
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        if first == Some(id) && !initialized && fresh {
            member.initialize(group).await?;
        }
        Ok(member)
    }

    /// Starts member `id` on its state directory `dir` (created, or
    /// reopened with its log and state) and its Raft endpoint, which
    /// it serves.
    pub async fn start(
        id: NodeId,
        dir: &Path,
        endpoint: Endpoint,
        tuning: &Tuning,
    ) -> Result<Member, Error> {
        let db = store::open(dir).map_err(|source| Error::Db {
            path: dir.to_path_buf(),
            source,
        })?;
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let config = openraft::Config {
            cluster_name: "strata".into(),
            heartbeat_interval: millis(tuning.heartbeat),
            election_timeout_min: millis(tuning.election_timeout.0),
            election_timeout_max: millis(tuning.election_timeout.1),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_every),
            // Entries per append: a worker's registration may be large, and
            // an append must fit one frame.
            max_payload_entries: 64,
            max_in_snapshot_log_to_keep: 0,
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Raft(e.to_string()))?;
        // A state directory belongs to one member for good: pointing
        // another member's configuration at it would make one voter of two.
        store::LogStore::new(Arc::clone(&db))
            .claim(id)
            .map_err(|e| Error::Raft(format!("{}: {e}", dir.display())))?;
        let state = StateMachine::new(Arc::clone(&db));
        let network = Network::new(endpoint.clone());
        let cut = network.cut_off();
        let conns = network.conns();
        let raft = Raft::new(
            id,
            Arc::new(config),
            network,
            LogStore::new(db),
            state.clone(),
        )
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(network::serve(
            raft.clone(),
            state.clone(),
            endpoint.clone(),
            shutdown.clone(),
        ));
        Ok(Member {
            id,
            raft,
            state,
            endpoint,
            conns,
            cut,
            shutdown,
        })
    }

    /// Whether the state directory `dir` holds a member's state (it has
    /// voted or holds log entries), as opposed to one never started or
    /// wiped.
    pub fn has_state(dir: &Path) -> Result<bool, Error> {
        let db = store::open(dir).map_err(|source| Error::Db {
            path: dir.to_path_buf(),
            source,
        })?;
        store::LogStore::new(db)
            .has_state()
            .map_err(|e| Error::Raft(e.to_string()))
    }

    /// Leading, records ([`CommandV1::Joined`]) every member that has
    /// acknowledged log entries and is not yet recorded as having taken
    /// part: one that comes back with an empty state then knows it lost
    /// it. Does nothing when not leading; the leader does it now and then.
    /// One member's record failing does not keep the others from theirs;
    /// the last failure is returned.
    pub async fn record_joined(&self) -> Result<(), Error> {
        let mut failed = Ok(());
        for member in self.newly_joined() {
            if let Err(e) = self.write(CommandV1::Joined { member }).await {
                failed = Err(e);
            }
        }
        failed
    }

    /// Leading, the members that have acknowledged log entries (this one
    /// among them) and are not yet recorded as having taken part.
    fn newly_joined(&self) -> Vec<NodeId> {
        let metrics = self.raft.metrics().borrow().clone();
        let Some(replication) = metrics.replication else {
            return Vec::new();
        };
        let joined = self.state.joined().unwrap_or_default();
        std::iter::once(self.id)
            .chain(
                replication
                    .into_iter()
                    .filter(|(_, matched)| matched.is_some())
                    .map(|(id, _)| id),
            )
            .filter(|id| !joined.contains(id))
            .collect()
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The Raft handle, for metrics and membership changes.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Records the group's state in this process's metrics as it changes
    /// (term, leader, commit and applied index, leader changes), until
    /// the member shuts down.
    pub fn report_metrics(&self) -> tokio::task::JoinHandle<()> {
        let mut rx = self.raft.metrics();
        tokio::spawn(async move {
            let mut leader = None;
            loop {
                let m = rx.borrow_and_update().clone();
                if m.current_leader.is_some() && m.current_leader != leader {
                    if leader.is_some() {
                        strata_metrics::leader_changed();
                    }
                    leader = m.current_leader;
                }
                let applied = m.last_applied.map_or(0, |l| l.index);
                strata_metrics::raft(strata_metrics::RaftState {
                    term: m.current_term,
                    leader: m.current_leader,
                    is_leader: m.current_leader == Some(m.id),
                    committed: m.replication.as_ref().map_or(applied, |r| {
                        let voters: Vec<NodeId> =
                            m.membership_config.membership().voter_ids().collect();
                        let matched = voters.iter().map(|v| {
                            if *v == m.id {
                                m.last_log_index
                            } else {
                                r.get(v).copied().flatten().map(|l| l.index)
                            }
                        });
                        quorum_index(matched)
                    }),
                    applied,
                });
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// Makes the group of `members` (this one among them). Only on a
    /// group's first start; a member already initialized says so.
    pub async fn initialize(&self, members: BTreeMap<NodeId, Node>) -> Result<(), Error> {
        self.raft
            .initialize(members)
            .await
            .map_err(|e| Error::Raft(e.to_string()))
    }

    /// The leader, as this member knows it.
    pub async fn leader(&self) -> Option<NodeId> {
        self.raft.current_leader().await
    }

    /// Whether this member leads, as far as it knows: for work one member
    /// of the group should do (it may have just lost the lead).
    pub fn is_leader(&self) -> bool {
        self.leading_term().is_some()
    }

    /// The term this member leads in, if it leads: a new term is a new
    /// lead, even if the same member won it.
    pub fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics().borrow().clone();
        (m.current_leader == Some(self.id)).then_some(m.current_term)
    }

    /// Applies `command` through the group, from any member: returns once
    /// a majority has it in their logs and the leader applied it, and
    /// normally once this member applied it too, so its local reads see
    /// it (a member that cannot catch up within [`LEADER_WAIT`] returns
    /// anyway: the write is committed). A follower forwards it to the
    /// leader; during an election it waits for one (up to
    /// [`LEADER_WAIT`]).
    pub async fn write(&self, command: impl Into<Command>) -> Result<Response, Error> {
        match self.via_leader(Ask::Write(command.into())).await? {
            // Read your writes: this member's own copy has it too before
            // the write returns. It is committed either way: a member that
            // cannot catch up in time (removed from the group, or far
            // behind) only reads its older copy for a while.
            Answer::Written(r, index) => {
                if let Err(e) = self
                    .raft
                    .wait(Some(LEADER_WAIT))
                    .applied_index_at_least(Some(index), "own write")
                    .await
                {
                    tracing::warn!(member = self.id, index, error = %e, "a write committed but this member has not applied it yet");
                }
                Ok(r)
            }
            other => Err(Error::Raft(format!("a write answered {other:?}"))),
        }
    }

    /// The cache entry under `key`, linearizably: the leader answers once
    /// it has confirmed it still leads and applied everything committed
    /// before the call (read-index), so the read sees every write
    /// acknowledged before it. A follower asks the leader.
    pub async fn entry(&self, key: &Digest) -> Result<Option<CacheEntry>, Error> {
        match self.via_leader(Ask::Read(*key)).await? {
            Answer::Entry(e) => Ok(e),
            other => Err(Error::Raft(format!("a read answered {other:?}"))),
        }
    }

    /// Waits until this member's copy of the state has every write
    /// acknowledged before the call (a read-index round through the
    /// leader): local reads after it are linearizable as of the call.
    pub async fn barrier(&self) -> Result<(), Error> {
        match self.via_leader(Ask::ReadIndex).await? {
            // This member leads: it has applied the index already.
            Answer::Index(None) => Ok(()),
            Answer::Index(Some(index)) => self
                .raft
                .wait(Some(LEADER_WAIT))
                .applied_index_at_least(Some(index), "read index")
                .await
                .map(|_| ())
                .map_err(|e| Error::Unavailable(e.to_string())),
            other => Err(Error::Raft(format!("a read index answered {other:?}"))),
        }
    }

    /// Adds a member to the group or removes one, from any member: returns
    /// once the change is committed (an added member has caught up first).
    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), Error> {
        match self.via_leader(Ask::Membership(change)).await? {
            Answer::Changed => Ok(()),
            other => Err(Error::Raft(format!(
                "a membership change answered {other:?}"
            ))),
        }
    }

    /// Answers `ask` here if this member leads, else on the leader; while
    /// no leader is known, tries again, up to [`LEADER_WAIT`].
    async fn via_leader(&self, ask: Ask) -> Result<Answer, Error> {
        let deadline = Instant::now() + LEADER_WAIT;
        let mut pauses = leader_pauses();
        loop {
            let leader = match self.here(&ask).await {
                Ok(answer) => return Ok(answer),
                Err(Here::Failed(e)) => return Err(e),
                Err(Here::Elsewhere(leader)) => leader,
            };
            let why = match leader {
                Some((id, node)) => {
                    // A peer of its own per request, on the connection all
                    // share: requests forwarded at once go at once.
                    let mut peer = network::Peer::new(
                        self.endpoint.clone(),
                        self.cut.clone(),
                        self.conns.clone(),
                        id,
                        node.addr.clone(),
                    );
                    // A leader that died may take a connect timeout to be
                    // found out; one elected meanwhile is asked at once.
                    let mut metrics = self.raft.metrics();
                    let replaced = async move {
                        loop {
                            if metrics
                                .borrow_and_update()
                                .current_leader
                                .is_some_and(|l| l != id)
                            {
                                return;
                            }
                            if metrics.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                    };
                    let forward = async {
                        let p = &mut peer;
                        match &ask {
                            Ask::Write(c) => p
                                .write(c.clone(), FORWARD_TTL)
                                .await
                                .map(|(r, index)| Answer::Written(r, index)),
                            Ask::Read(k) => p.read(*k, FORWARD_TTL).await.map(Answer::Entry),
                            Ask::ReadIndex => p
                                .read_index(FORWARD_TTL)
                                .await
                                .map(|i| Answer::Index(i.or(Some(0)))),
                            // A new member may need a while to catch up.
                            Ask::Membership(c) => p
                                .change_membership(c.clone(), MEMBERSHIP_WAIT + LEADER_WAIT)
                                .await
                                .map(|()| Answer::Changed),
                        }
                    };
                    let forwarded = tokio::select! {
                        forwarded = forward => Some(forwarded),
                        () = replaced => None,
                    };
                    match forwarded {
                        Some(Ok(answer)) => return Ok(answer),
                        Some(Err(e)) => format!("the leader, member {id}: {e:?}"),
                        None => format!("member {id} is no longer the leader"),
                    }
                }
                None => "no leader is known yet".into(),
            };
            if Instant::now() > deadline {
                return Err(Error::Unavailable(why));
            }
            tracing::debug!(member = self.id, %why, "asking the leader again");
            let pause = pauses.next().unwrap_or(LEADER_PAUSE_MAX);
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// Answers `ask` if this member leads.
    async fn here(&self, ask: &Ask) -> Result<Answer, Here> {
        let elsewhere = |f: openraft::error::ForwardToLeader<NodeId, Node>| {
            Here::Elsewhere(f.leader_id.zip(f.leader_node))
        };
        let failed = |e: String| Here::Failed(Error::Raft(e));
        // A leader cut off from the majority stays leader until it hears
        // of a newer term, and what it is asked never commits meanwhile.
        let no_majority = || {
            Here::Failed(Error::Unavailable(format!(
                "member {} leads but reached no majority within {LEADER_WAIT:?}",
                self.id
            )))
        };
        match ask {
            Ask::Write(c) => {
                match tokio::time::timeout(LEADER_WAIT, self.raft.client_write(c.clone())).await {
                    Err(_) => Err(no_majority()),
                    Ok(Ok(r)) => Ok(Answer::Written(r.data, r.log_id.index)),
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                        Err(elsewhere(f))
                    }
                    Ok(Err(e)) => Err(failed(e.to_string())),
                }
            }
            Ask::Membership(change) => {
                match apply_membership(&self.raft, &self.endpoint, change.clone()).await {
                    Ok(()) => Ok(Answer::Changed),
                    Err(Unchanged::Raft(RaftError::APIError(
                        ClientWriteError::ForwardToLeader(f),
                    ))) => Err(elsewhere(f)),
                    Err(Unchanged::TimedOut) => Err(Here::Failed(Error::Unavailable(
                        Unchanged::TimedOut.to_string(),
                    ))),
                    Err(e) => Err(failed(e.to_string())),
                }
            }
            Ask::Read(_) | Ask::ReadIndex => {
                match tokio::time::timeout(LEADER_WAIT, self.raft.ensure_linearizable())
                    .await
                    .map_err(|_| no_majority())?
                {
                    Ok(_) => match ask {
                        Ask::Read(k) => self
                            .state
                            .entry(k)
                            .map(Answer::Entry)
                            .map_err(|e| Here::Failed(Error::State(e.to_string()))),
                        _ => Ok(Answer::Index(None)),
                    },
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                        Err(elsewhere(f))
                    }
                    Err(e) => Err(failed(e.to_string())),
                }
            }
        }
    }

    /// Fault injection, for tests of the group: from now on this member
    /// sends nothing to `peers` (Raft messages and forwarded requests
    /// alike), as if the network between them were cut; an empty set
    /// heals it. Cutting both sides makes a two-way partition.
    pub fn cut_off(&self, peers: impl IntoIterator<Item = NodeId>) {
        self.cut.set(peers.into_iter().collect());
    }

    /// This member's applied copy of the state, read without asking the
    /// group: possibly behind the leader.
    pub fn local(&self) -> &StateMachine {
        &self.state
    }

    /// Stops the member: its Raft task ends and its connections close.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        let _ = self.raft.shutdown().await;
        self.endpoint.close();
        // Its port is free for a restart once its connections are gone.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle()).await;
    }
}

// `declare_raft_types!` names `Cursor` for the default snapshot data.
const _: Option<Cursor<Vec<u8>>> = None;

/// The cache index as a solver uses it, replicated through a [`Member`]:
/// reads come from this member's copy, writes go through the group.
pub struct ReplicatedIndex {
    member: Arc<Member>,
}

impl ReplicatedIndex {
    /// The index of `member`.
    pub fn new(member: Arc<Member>) -> ReplicatedIndex {
        ReplicatedIndex { member }
    }

    async fn write(&self, command: CommandV1) -> strata_cache::Result<()> {
        self.member
            .write(command)
            .await
            .map(|_| ())
            .map_err(|e| strata_cache::Error::Unavailable(e.to_string()))
    }

    fn entry(&self, key: &Digest) -> strata_cache::Result<Option<CacheEntry>> {
        self.member
            .local()
            .entry(key)
            .map_err(|e| strata_cache::Error::Unavailable(e.to_string()))
    }
}

#[async_trait::async_trait]
impl strata_cache::CacheIndex for ReplicatedIndex {
    /// One read-index round: the reads that follow see every write
    /// acknowledged before it.
    async fn sync(&self) -> strata_cache::Result<()> {
        self.member
            .barrier()
            .await
            .map_err(|e| strata_cache::Error::Unavailable(e.to_string()))
    }

    /// This member's copy, as of the last [`sync`](Self::sync) or newer.
    async fn get(&self, key: &Digest) -> strata_cache::Result<Option<CacheEntry>> {
        self.entry(key)
    }

    async fn put(&self, key: &Digest, entry: &CacheEntry) -> strata_cache::Result<()> {
        self.write(CommandV1::Put {
            key: *key,
            entry: entry.clone(),
        })
        .await
    }

    async fn touch(&self, key: &Digest) -> strata_cache::Result<()> {
        // Read locally: a touch that a lagging copy makes twice changes
        // nothing, since Touch only moves last use forward.
        let Some(e) = self.entry(key)? else {
            return Ok(());
        };
        let now = strata_cas::now_unix();
        if strata_cas::last_used_is_stale(e.last_used, now) {
            self.write(CommandV1::Touch { key: *key, at: now }).await?;
        }
        Ok(())
    }
}

/// The highest log index a majority holds, given each voter's highest
/// matched index (`None`: nothing yet).
fn quorum_index(matched: impl Iterator<Item = Option<u64>>) -> u64 {
    let mut m: Vec<u64> = matched.map(|i| i.unwrap_or(0)).collect();
    if m.is_empty() {
        return 0;
    }
    m.sort_unstable_by(|a, b| b.cmp(a));
    m[m.len() / 2]
}

#[cfg(test)]
mod standing_tests {
    use super::*;

    #[test]
    fn the_commit_index_is_what_a_majority_holds() {
        assert_eq!(quorum_index([Some(9), Some(7), None].into_iter()), 7);
        assert_eq!(
            quorum_index([Some(9), Some(7), Some(3), None, None].into_iter()),
            3
        );
        assert_eq!(quorum_index([Some(4)].into_iter()), 4);
        assert_eq!(quorum_index(std::iter::empty()), 0);
    }

    fn probe(initialized: bool, voters: &[NodeId]) -> Option<Probe> {
        Some(Probe {
            initialized,
            voters: voters.to_vec(),
            joined: voters.to_vec(),
        })
    }

    #[test]
    fn an_empty_member_learns_whether_the_group_is_new_exists_or_lost_it() {
        // Both others answer, empty: a first start.
        assert_eq!(
            standing(1, 3, &[(2, probe(false, &[])), (3, probe(false, &[]))]),
            Standing::Fresh
        );
        // One answers empty: with this member, a majority of three.
        assert_eq!(
            standing(1, 3, &[(2, probe(false, &[])), (3, None)]),
            Standing::Fresh
        );
        // Nobody answers: it cannot tell.
        assert_eq!(standing(1, 3, &[(2, None), (3, None)]), Standing::Unsure);
        // One member has the group, with this one a voter: it lost its
        // state, whatever the others say.
        assert_eq!(
            standing(
                1,
                3,
                &[(2, probe(false, &[])), (3, probe(true, &[1, 2, 3]))]
            ),
            Standing::LostItsState {
                voters: vec![1, 2, 3]
            }
        );
        // The group exists without it: a new member, to be added.
        assert_eq!(
            standing(4, 4, &[(1, probe(true, &[1, 2, 3])), (2, None), (3, None)]),
            Standing::New
        );
        // A voter that never took part (down since the group was made,
        // or slower to start than the member that made it) starts.
        let made_without_3 = Some(Probe {
            initialized: true,
            voters: vec![1, 2, 3],
            joined: vec![1, 2],
        });
        assert_eq!(
            standing(3, 3, &[(1, made_without_3.clone()), (2, None)]),
            Standing::New
        );
        // One member that has applied its Joined is enough to tell.
        assert_eq!(
            standing(3, 3, &[(1, made_without_3), (2, probe(true, &[1, 2, 3]))]),
            Standing::LostItsState {
                voters: vec![1, 2, 3]
            }
        );
        // Of five, two answering empty are not a majority with this one.
        assert_eq!(
            standing(
                1,
                5,
                &[(2, probe(false, &[])), (3, None), (4, None), (5, None)]
            ),
            Standing::Unsure
        );
    }
}
