//! The client side: `strata build --cluster` and `strata cluster status`.

use std::sync::Arc;
use std::time::Duration;

use strata_cas::{ContentStore, Digest};
use strata_net::{Connection, Endpoint, Role, read_frame, send_blob, write_frame};
use strata_oci::{Image, ImageConfig};
use strata_solver::Event;
use strata_worker::{Node, Timestamps, store_image};

use crate::config::ClientConfig;
use crate::peers::Peers;
use crate::protocol::{BuildDone, BuildEvent, ClusterStatus, Reply, Request, SubmitBuild};
use crate::worker::request;

/// Why a cluster build failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The build ran and a step (or the plan) failed.
    #[error("{message}")]
    Build {
        /// What the coordinator said, as a local build says it.
        message: String,
        /// The failing step's last output lines.
        tail: Vec<String>,
    },
    /// The cluster could not be reached or misbehaved.
    #[error("{0}")]
    Cluster(String),
    /// A finished build's layer is held by none of the nodes the cluster
    /// named (they lost it); the coordinator has been told, and a build
    /// submitted again makes it anew.
    #[error("{0}")]
    LayersLost(String),
}

/// A connection to a cluster.
pub struct Client {
    coordinator: Connection,
    peers: Arc<Peers>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("coordinator", &self.coordinator.peer)
            .finish_non_exhaustive()
    }
}

fn cluster(e: impl std::fmt::Display) -> ClientError {
    ClientError::Cluster(e.to_string())
}

/// How long a coordinator has to answer a client's connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a client waits on one coordinator before trying the next
/// one too.
pub const STAGGER: Duration = Duration::from_millis(250);

/// Connects to the coordinator at `addr`: a connection to a coordinator,
/// or why not.
async fn attempt(
    endpoint: Endpoint,
    addr: crate::config::NodeAddress,
) -> Result<Connection, String> {
    let a = addr.resolve().await?;
    // A coordinator that is down may not answer at all: give up well
    // before QUIC's idle timeout.
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect(a))
        .await
        .map_err(|_| format!("{addr}: no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    if conn.peer.role == Role::Coordinator {
        Ok(conn)
    } else {
        Err(format!("{addr}: {} is not a coordinator", conn.peer))
    }
}

impl Client {
    /// Connects to the first coordinator of `config` that answers.
    pub async fn connect(config: &ClientConfig) -> Result<Client, ClientError> {
        let id = config.tls.identity().map_err(cluster)?;
        let endpoint = Endpoint::dialer(&id).map_err(cluster)?;
        // Coordinators are tried in order, the next one starting when the
        // one before has failed or has not answered within STAGGER, as
        // browsers try addresses: one that is down costs a client a
        // fraction of a second, not a connect timeout.
        let mut why = Vec::new();
        let mut waiting = config.coordinators.iter().cloned();
        let mut attempts = tokio::task::JoinSet::new();
        loop {
            if attempts.is_empty() {
                match waiting.next() {
                    Some(addr) => {
                        attempts.spawn(attempt(endpoint.clone(), addr));
                    }
                    None => break,
                }
            }
            tokio::select! {
                joined = attempts.join_next() => {
                    match joined {
                        Some(Ok(Ok(conn))) => {
                            return Ok(Client {
                                coordinator: conn,
                                peers: Arc::new(Peers::new(endpoint)),
                            });
                        }
                        Some(Ok(Err(e))) => why.push(e),
                        Some(Err(e)) => why.push(e.to_string()),
                        None => {}
                    }
                }
                () = tokio::time::sleep(STAGGER) => {
                    if let Some(addr) = waiting.next() {
                        attempts.spawn(attempt(endpoint.clone(), addr));
                    }
                }
            }
        }
        Err(ClientError::Cluster(format!(
            "no coordinator answered: {}",
            why.join("; ")
        )))
    }

    /// Makes sure the coordinator holds `blob` (uploading it from `cas`).
    pub async fn upload(&self, cas: &ContentStore, blob: &Digest) -> Result<(), ClientError> {
        match request(&self.coordinator, &Request::HasBlob(*blob)).await {
            Ok(Reply::Bool(true)) => return Ok(()),
            Ok(Reply::Bool(false)) => {}
            Ok(other) => return Err(cluster(format!("unexpected answer: {other:?}"))),
            Err(e) => return Err(cluster(e)),
        }
        let c = &self.coordinator;
        let (mut send, mut recv) = c.open().await.map_err(cluster)?;
        write_frame(&mut send, &Request::PutBlob(*blob), c.addr)
            .await
            .map_err(cluster)?;
        // A coordinator that refuses the upload (over the client's quota)
        // stops reading and says why: its answer is the error to show.
        let sent = send_blob(&mut send, cas, blob, c.addr).await;
        let answer = read_frame::<Reply>(&mut recv, c.addr).await;
        if let (Err(e), Ok(Some(Reply::Ok)) | Err(_) | Ok(None)) = (&sent, &answer) {
            return Err(cluster(e));
        }
        match answer.map_err(cluster)? {
            Some(Reply::Ok) => Ok(()),
            Some(Reply::Error(e)) => Err(cluster(e)),
            other => Err(cluster(format!(
                "unexpected answer to an upload: {other:?}"
            ))),
        }
    }

    /// Runs a build; `on_event` sees its progress as it happens.
    pub async fn build(
        &self,
        submit: SubmitBuild,
        on_event: &(dyn Fn(Event) + Send + Sync),
    ) -> Result<BuildDone, ClientError> {
        let c = &self.coordinator;
        let (mut send, mut recv) = c.open().await.map_err(cluster)?;
        write_frame(&mut send, &Request::Build(Box::new(submit)), c.addr)
            .await
            .map_err(cluster)?;
        let _ = send.finish();
        loop {
            match read_frame::<BuildEvent>(&mut recv, c.addr)
                .await
                .map_err(cluster)?
            {
                Some(BuildEvent::Progress(e)) => on_event(e),
                Some(BuildEvent::Done(done)) => return Ok(*done),
                Some(BuildEvent::Failed { message, tail }) => {
                    return Err(ClientError::Build { message, tail });
                }
                None => return Err(cluster("the coordinator ended the build without a result")),
            }
        }
    }

    /// Fetches the layers of a finished build that `node` lacks, from the
    /// workers that hold them, and stores the image, its times as `stamps`
    /// asks. Returns it and the bytes fetched.
    pub async fn fetch_image(
        &self,
        node: &Node,
        done: &BuildDone,
        stamps: Timestamps,
    ) -> Result<(Image, u64), ClientError> {
        let holders: std::collections::HashMap<Digest, _> = done.holders.iter().cloned().collect();
        let needed: Vec<_> = done
            .layers
            .iter()
            .map(|l| (*l, holders.get(&l.blob).cloned().unwrap_or_default()))
            .collect();
        let fetched = match self.peers.ensure(&node.content, &needed).await {
            Ok(n) => n,
            Err(e) => {
                // The coordinator checks and corrects its records, so
                // the next build of this image runs what is lost.
                if e.lacking.is_empty() {
                    return Err(cluster(e));
                }
                crate::worker::report_lacking(&e, &self.coordinator).await;
                return Err(ClientError::LayersLost(e.to_string()));
            }
        };
        let config: ImageConfig = serde_json::from_slice(&done.config_json)
            .map_err(|e| cluster(format!("the image config is unreadable: {e}")))?;
        let image =
            store_image(node, config, &done.layers, done.image_layers, stamps).map_err(cluster)?;
        Ok((image, fetched))
    }

    /// Keeps new stages off `worker` (`cordoned`), or lets them back.
    pub async fn cordon(&self, worker: &str, cordoned: bool) -> Result<(), ClientError> {
        self.done(&Request::Cordon {
            worker: worker.to_string(),
            cordoned,
        })
        .await
    }

    /// Adds a coordinator to the group, or removes one.
    pub async fn change_group(
        &self,
        change: strata_raft::MembershipChange,
    ) -> Result<(), ClientError> {
        self.done(&Request::ChangeGroup(change)).await
    }

    /// Asks the coordinator for something it answers with done or why not.
    async fn done(&self, req: &Request) -> Result<(), ClientError> {
        match request(&self.coordinator, req).await {
            Ok(Reply::Ok) => Ok(()),
            Ok(Reply::Error(e)) => Err(cluster(e)),
            Ok(other) => Err(cluster(format!("unexpected answer: {other:?}"))),
            Err(e) => Err(cluster(e)),
        }
    }

    /// The cluster's state.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        match request(&self.coordinator, &Request::Status).await {
            Ok(Reply::Status(s)) => Ok(*s),
            Ok(other) => Err(cluster(format!("unexpected answer: {other:?}"))),
            Err(e) => Err(cluster(e)),
        }
    }
}
