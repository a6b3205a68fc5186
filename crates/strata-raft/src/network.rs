//! Raft's messages between coordinators, over the cluster's QUIC and
//! mutual TLS (strata-net): one stream per RPC, one frame each way. Only
//! peers with a coordinator's certificate are answered.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Raft, RaftNetwork, RaftNetworkFactory};
use serde::{Deserialize, Serialize};
use strata_net::{Connection, Endpoint, Role, read_frame, write_frame};
use tokio_util::sync::CancellationToken;

use openraft::error::{CheckIsLeaderError, ClientWriteError};
use strata_cache::CacheEntry;
use strata_cas::Digest;

use crate::{Command, MembershipChange, Node, NodeId, Response, StateMachine, TypeConfig};

/// A Raft RPC, or a member's write or read forwarded to the leader.
#[derive(Serialize, Deserialize)]
enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    Write(Command),
    Read(Digest),
    ReadIndex,
    Membership(MembershipChange),
    /// What a member knows of the group, for a member starting with an
    /// empty state.
    Probe,
}

/// Its answer.
#[derive(Serialize, Deserialize)]
enum RpcReply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// What applying it did, and its log index.
    Write(Result<(Response, u64), Forwarded>),
    Read(Result<Option<CacheEntry>, Forwarded>),
    ReadIndex(Result<Option<u64>, Forwarded>),
    Membership(Result<(), Forwarded>),
    Probe(crate::Probe),
}

/// Why a forwarded write or read failed on the member it reached.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Forwarded {
    /// It is not the leader (any more).
    NotLeader,
    /// It failed there.
    Failed(String),
}

/// Members a member sends nothing to: a partition injected for tests of
/// the group, shared by its [`Network`] and every [`Peer`] it makes.
#[derive(Clone, Default)]
pub(crate) struct CutOff(Arc<RwLock<BTreeSet<NodeId>>>);

impl CutOff {
    pub(crate) fn set(&self, peers: BTreeSet<NodeId>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = peers;
    }

    fn contains(&self, id: NodeId) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&id)
    }
}

/// How long dialing a member may take. A dial goes on in the background
/// whatever the time limit of the RPC that started it: a QUIC and TLS
/// handshake takes two round trips, longer than a heartbeat's time limit
/// between distant members, and a dial cut short by every heartbeat would
/// never finish (the member would stay unreachable for good).
const DIAL_TTL: Duration = Duration::from_secs(5);

/// Connections to other members, by address, shared by every [`Peer`] a
/// member makes: Raft makes a new one for each read-index round (and a
/// member forwarding makes one per request), and each reuses the
/// connection instead of a new TLS handshake; RPCs that find a dial under
/// way wait for it rather than start another.
#[derive(Clone, Default)]
pub(crate) struct Conns(Arc<std::sync::Mutex<std::collections::HashMap<String, Slot>>>);

#[derive(Clone)]
enum Slot {
    Up(Connection),
    /// A dial under way: its outcome, once known (`Err`: why it failed).
    Dialing(tokio::sync::watch::Receiver<Option<Result<Connection, String>>>),
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Slot>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection to `addr` (member `target`), dialing it from
    /// `endpoint` if there is none, or waiting for the dial under way.
    async fn get_or_dial(
        &self,
        endpoint: &Endpoint,
        target: NodeId,
        addr: &str,
    ) -> Result<Connection, Failed> {
        let mut outcome = {
            let mut slots = self.lock();
            match slots.get(addr) {
                Some(Slot::Up(c)) if !c.is_closed() => return Ok(c.clone()),
                Some(Slot::Dialing(rx)) => rx.clone(),
                _ => {
                    let sock: SocketAddr = addr.parse().map_err(|e| {
                        Failed::Unreachable(format!("member {target} at {addr:?}: {e}"))
                    })?;
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    slots.insert(addr.to_string(), Slot::Dialing(rx.clone()));
                    let (conns, endpoint, addr) =
                        (self.clone(), endpoint.clone(), addr.to_string());
                    tokio::spawn(async move {
                        let dialed =
                            match tokio::time::timeout(DIAL_TTL, endpoint.connect(sock)).await {
                                Err(_) => Err(format!("no handshake within {DIAL_TTL:?}")),
                                Ok(Err(e)) => Err(e.to_string()),
                                Ok(Ok(c)) if c.peer.role != Role::Coordinator => {
                                    Err(format!("{sock} is {}, not a coordinator", c.peer))
                                }
                                Ok(Ok(c)) => Ok(c),
                            };
                        {
                            let mut slots = conns.lock();
                            match &dialed {
                                Ok(c) => slots.insert(addr, Slot::Up(c.clone())),
                                Err(_) => slots.remove(&addr),
                            };
                        }
                        let _ = tx.send(Some(dialed));
                    });
                    rx
                }
            }
        };
        let outcome = outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| {
                Failed::Unreachable(format!("member {target} at {addr}: the dial was dropped"))
            })?
            .clone();
        match outcome {
            Some(Ok(c)) => Ok(c),
            Some(Err(why)) => Err(Failed::Unreachable(format!(
                "member {target} at {addr}: {why}"
            ))),
            None => Err(Failed::Unreachable(format!(
                "member {target} at {addr}: the dial ended without an outcome"
            ))),
        }
    }

    /// Forgets the connection to `addr` if it is `conn` (a newer one
    /// stays).
    fn drop_conn(&self, addr: &str, conn: &Connection) {
        let mut slots = self.lock();
        if matches!(slots.get(addr), Some(Slot::Up(c)) if c.quic.stable_id() == conn.quic.stable_id())
        {
            slots.remove(addr);
        }
    }
}

/// Makes a [`Peer`] per member Raft talks to.
#[derive(Clone)]
pub struct Network {
    endpoint: Endpoint,
    cut: CutOff,
    conns: Conns,
}

impl Network {
    /// Dials members from `endpoint` (a coordinator's).
    pub fn new(endpoint: Endpoint) -> Network {
        Network {
            endpoint,
            cut: CutOff::default(),
            conns: Conns::default(),
        }
    }

    pub(crate) fn cut_off(&self) -> CutOff {
        self.cut.clone()
    }

    pub(crate) fn conns(&self) -> Conns {
        self.conns.clone()
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Peer {
        Peer::new(
            self.endpoint.clone(),
            self.cut.clone(),
            self.conns.clone(),
            target,
            node.addr.clone(),
        )
    }
}

/// Another member, as Raft (or a member forwarding to the leader) sends
/// to it.
pub struct Peer {
    endpoint: Endpoint,
    cut: CutOff,
    target: NodeId,
    addr: String,
    conns: Conns,
}

/// Why an RPC did not get an answer.
enum Failed {
    /// The member cannot be reached: Raft backs off.
    Unreachable(String),
    /// No answer within the time limit: the connection stays (a slow or
    /// cut-off member answers again on it once it can).
    Network(String),
    /// The exchange broke on this connection, which is dropped.
    Broken(String, Connection),
}

impl Failed {
    fn into_message(self, conns: &Conns, addr: &str) -> String {
        match self {
            Failed::Unreachable(m) | Failed::Network(m) => m,
            Failed::Broken(m, conn) => {
                conns.drop_conn(addr, &conn);
                m
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Why(String);

impl Peer {
    /// A member at `addr`, dialed from `endpoint` on first use.
    pub(crate) fn new(
        endpoint: Endpoint,
        cut: CutOff,
        conns: Conns,
        target: NodeId,
        addr: String,
    ) -> Peer {
        Peer {
            endpoint,
            cut,
            target,
            addr,
            conns,
        }
    }

    /// Has the member (the leader) apply `command`.
    pub(crate) async fn write(
        &mut self,
        command: Command,
        ttl: Duration,
    ) -> Result<(Response, u64), Forwarded> {
        self.forward(&Rpc::Write(command), ttl, |r| match r {
            RpcReply::Write(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Reads `key` on the member (the leader), linearizably.
    pub(crate) async fn read(
        &mut self,
        key: Digest,
        ttl: Duration,
    ) -> Result<Option<CacheEntry>, Forwarded> {
        self.forward(&Rpc::Read(key), ttl, |r| match r {
            RpcReply::Read(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// The leader's read index: the log index a read must have applied to
    /// see every write acknowledged before now.
    pub(crate) async fn read_index(&mut self, ttl: Duration) -> Result<Option<u64>, Forwarded> {
        self.forward(&Rpc::ReadIndex, ttl, |r| match r {
            RpcReply::ReadIndex(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// What the member knows of the group.
    pub(crate) async fn probe(&mut self, ttl: Duration) -> Result<crate::Probe, Forwarded> {
        self.forward(&Rpc::Probe, ttl, |r| match r {
            RpcReply::Probe(p) => Some(Ok(p)),
            _ => None,
        })
        .await
    }

    /// Has the member (the leader) change the group's voters.
    pub(crate) async fn change_membership(
        &mut self,
        change: MembershipChange,
        ttl: Duration,
    ) -> Result<(), Forwarded> {
        self.forward(&Rpc::Membership(change), ttl, |r| match r {
            RpcReply::Membership(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Sends a forwarded request; `answer` picks its reply.
    async fn forward<T>(
        &mut self,
        rpc: &Rpc,
        ttl: Duration,
        answer: impl FnOnce(RpcReply) -> Option<Result<T, Forwarded>>,
    ) -> Result<T, Forwarded> {
        match self.call(rpc, ttl).await {
            Ok(reply) => answer(reply)
                .unwrap_or_else(|| Err(Forwarded::Failed("answered another RPC".into()))),
            Err(f) => Err(Forwarded::Failed(f.into_message(&self.conns, &self.addr))),
        }
    }

    async fn call(&mut self, rpc: &Rpc, ttl: Duration) -> Result<RpcReply, Failed> {
        if self.cut.contains(self.target) {
            return Err(Failed::Unreachable(format!(
                "member {} is cut off",
                self.target
            )));
        }
        // Waiting for the connection counts against the time limit too (a
        // member that is down may not answer a handshake at all); the dial
        // itself goes on for the next RPC.
        let exchange = async {
            let conn = self
                .conns
                .get_or_dial(&self.endpoint, self.target, &self.addr)
                .await?;
            let broken = |e: String| Failed::Broken(e, conn.clone());
            let (mut send, mut recv) = conn.open().await.map_err(|e| broken(e.to_string()))?;
            write_frame(&mut send, rpc, conn.addr)
                .await
                .map_err(|e| broken(e.to_string()))?;
            let _ = send.finish();
            read_frame::<RpcReply>(&mut recv, conn.addr)
                .await
                .map_err(|e| broken(e.to_string()))?
                .ok_or_else(|| broken(format!("{} closed the stream", conn.peer)))
        };
        match tokio::time::timeout(ttl, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Failed::Network(format!(
                "member {} did not answer within {ttl:?}",
                self.target
            ))),
        }
    }

    fn rpc_error<E: std::error::Error>(&mut self, f: Failed) -> RPCError<NodeId, Node, E> {
        match f {
            Failed::Unreachable(why) => RPCError::Unreachable(Unreachable::new(&Why(why))),
            f => RPCError::Network(NetworkError::new(&Why(
                f.into_message(&self.conns, &self.addr)
            ))),
        }
    }

    /// Sends one of Raft's own RPCs; `answer` picks its reply, whose
    /// error is the remote member's.
    async fn raft_call<T, E: std::error::Error>(
        &mut self,
        rpc: &Rpc,
        option: RPCOption,
        answer: impl FnOnce(RpcReply) -> Option<Result<T, E>>,
    ) -> Result<T, RPCError<NodeId, Node, E>> {
        match self.call(rpc, option.hard_ttl()).await {
            Ok(reply) => match answer(reply) {
                Some(Ok(r)) => Ok(r),
                Some(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
                None => Err(self.unexpected()),
            },
            Err(f) => Err(self.rpc_error(f)),
        }
    }

    fn unexpected<E: std::error::Error>(&self) -> RPCError<NodeId, Node, E> {
        RPCError::Network(NetworkError::new(&Why(format!(
            "member {} answered another RPC",
            self.target
        ))))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.raft_call(&Rpc::Append(rpc), option, |r| match r {
            RpcReply::Append(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.raft_call(&Rpc::Snapshot(rpc), option, |r| match r {
            RpcReply::Snapshot(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.raft_call(&Rpc::Vote(rpc), option, |r| match r {
            RpcReply::Vote(r) => Some(r),
            _ => None,
        })
        .await
    }
}

/// Until `stop`, answers other coordinators' probes on `endpoint` as a
/// member with an empty state, and nothing else: it takes no part in
/// elections or replication while it has not decided whether it may.
pub(crate) async fn answer_probes_only(endpoint: Endpoint, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            c = endpoint.accept() => match c {
                Some(c) => c,
                None => return,
            },
            () = stop.cancelled() => return,
        };
        if conn.peer.role != Role::Coordinator {
            conn.quic.close(1u32.into(), b"not a coordinator");
            continue;
        }
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut send, mut recv) = tokio::select! {
                    s = conn.accept() => match s {
                        Some(s) => s,
                        None => return,
                    },
                    () = stop.cancelled() => {
                        conn.quic.close(0u32.into(), b"starting");
                        return;
                    }
                };
                if let Ok(Some(Rpc::Probe)) = read_frame::<Rpc>(&mut recv, conn.addr).await {
                    let empty = RpcReply::Probe(crate::Probe {
                        initialized: false,
                        voters: Vec::new(),
                        joined: Vec::new(),
                    });
                    let _ = write_frame(&mut send, &empty, conn.addr).await;
                }
                let _ = send.finish();
            }
        });
    }
}

/// Answers the Raft RPCs (and forwarded writes and reads) other
/// coordinators send to `endpoint` until `shutdown`.
pub(crate) async fn serve(
    raft: Raft<TypeConfig>,
    state: StateMachine,
    endpoint: Endpoint,
    shutdown: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            c = endpoint.accept() => match c {
                Some(c) => c,
                None => return,
            },
            () = shutdown.cancelled() => return,
        };
        if conn.peer.role != Role::Coordinator {
            tracing::warn!(peer = %conn.peer, "refusing Raft traffic from a node that is not a coordinator");
            conn.quic.close(1u32.into(), b"not a coordinator");
            continue;
        }
        let (raft, state, endpoint) = (raft.clone(), state.clone(), endpoint.clone());
        tokio::spawn(async move {
            while let Some((mut send, mut recv)) = conn.accept().await {
                let (raft, state, conn, endpoint) =
                    (raft.clone(), state.clone(), conn.clone(), endpoint.clone());
                tokio::spawn(async move {
                    let rpc = match read_frame::<Rpc>(&mut recv, conn.addr).await {
                        Ok(Some(r)) => r,
                        Ok(None) => return,
                        Err(e) => {
                            tracing::warn!(peer = %conn.peer, error = %e, "bad Raft message");
                            return;
                        }
                    };
                    let reply = match rpc {
                        Rpc::Append(r) => RpcReply::Append(raft.append_entries(r).await),
                        Rpc::Vote(r) => RpcReply::Vote(raft.vote(r).await),
                        Rpc::Snapshot(r) => RpcReply::Snapshot(raft.install_snapshot(r).await),
                        Rpc::Write(c) => RpcReply::Write(
                            match tokio::time::timeout(crate::LEADER_WAIT, raft.client_write(c))
                                .await
                            {
                                Err(_) => Err(Forwarded::Failed(
                                    "the leader reached no majority in time".into(),
                                )),
                                Ok(Ok(r)) => Ok((r.data, r.log_id.index)),
                                Ok(Err(RaftError::APIError(
                                    ClientWriteError::ForwardToLeader(_),
                                ))) => Err(Forwarded::NotLeader),
                                Ok(Err(e)) => Err(Forwarded::Failed(e.to_string())),
                            },
                        ),
                        Rpc::Membership(change) => RpcReply::Membership(
                            match crate::apply_membership(&raft, &endpoint, change).await {
                                Ok(()) => Ok(()),
                                Err(crate::Unchanged::Raft(RaftError::APIError(
                                    ClientWriteError::ForwardToLeader(_),
                                ))) => Err(Forwarded::NotLeader),
                                Err(e) => Err(Forwarded::Failed(e.to_string())),
                            },
                        ),
                        Rpc::Probe => {
                            let metrics = raft.metrics().borrow().clone();
                            let voters: Vec<NodeId> =
                                metrics.membership_config.membership().voter_ids().collect();
                            RpcReply::Probe(crate::Probe {
                                initialized: !voters.is_empty(),
                                voters,
                                joined: state.joined().unwrap_or_default(),
                            })
                        }
                        Rpc::ReadIndex => {
                            RpcReply::ReadIndex(match raft.ensure_linearizable().await {
                                Ok(id) => Ok(id.map(|l| l.index)),
                                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(
                                    _,
                                ))) => Err(Forwarded::NotLeader),
                                Err(e) => Err(Forwarded::Failed(e.to_string())),
                            })
                        }
                        Rpc::Read(key) => RpcReply::Read(match raft.ensure_linearizable().await {
                            Ok(_) => state
                                .entry(&key)
                                .map_err(|e| Forwarded::Failed(e.to_string())),
                            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                                Err(Forwarded::NotLeader)
                            }
                            Err(e) => Err(Forwarded::Failed(e.to_string())),
                        }),
                    };
                    if let Err(e) = write_frame(&mut send, &reply, conn.addr).await {
                        tracing::debug!(peer = %conn.peer, error = %e, "cannot answer a Raft message");
                    }
                    let _ = send.finish();
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use strata_net::ClusterCa;

    /// Between distant members a handshake takes longer than a heartbeat
    /// may wait: the dial an RPC starts must finish after that RPC gave
    /// up, or the member could never be reached again.
    #[tokio::test]
    async fn a_dial_outlives_the_rpc_that_started_it() {
        let ca = ClusterCa::create("dial").unwrap();
        let id = |name| ca.issue(Role::Coordinator, name).unwrap();
        let server = Endpoint::listen("127.0.0.1:0".parse().unwrap(), &id("c2")).unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        let serving = tokio::spawn(answer_probes_only(server, stop.clone()));
        let client = Endpoint::listen("127.0.0.1:0".parse().unwrap(), &id("c1")).unwrap();
        let conns = Conns::default();
        let mut peer = Peer::new(client, CutOff::default(), conns.clone(), 2, addr.clone());

        // Far shorter than a QUIC and TLS handshake.
        assert!(peer.probe(Duration::from_micros(1)).await.is_err());
        let begun = std::time::Instant::now();
        while !matches!(conns.lock().get(&addr), Some(Slot::Up(_))) {
            assert!(
                begun.elapsed() < DIAL_TTL,
                "the dial ended with the RPC that started it"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The next RPC finds the connection, and a timeout keeps it.
        let probe = peer.probe(Duration::from_secs(5)).await;
        assert!(matches!(probe, Ok(p) if !p.initialized));
        let _ = peer.probe(Duration::from_micros(1)).await;
        assert!(matches!(conns.lock().get(&addr), Some(Slot::Up(_))));
        stop.cancel();
        serving.await.unwrap();
    }
}
