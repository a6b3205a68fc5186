//! The client side: `strata build --cluster` and `strata cluster status`.

use std::sync::Arc;
use std::time::Duration;

use strata_cas::{ContentStore, Digest};
use strata_net::{
    BatchSource, Connection, Endpoint, read_frame, send_batch, send_blob, send_file, write_frame,
};
use strata_oci::{Image, ImageConfig};
use strata_solver::Event;
use strata_worker::{Node, Timestamps, store_image};

use crate::config::ClientConfig;
use crate::peers::Peers;
use crate::protocol::request;
use crate::protocol::{
    AdminRequest, BuildDone, BuildEvent, ClientRequest, ClusterStatus, Failed, Refusal, Reply,
    Request, SubmitBuild,
};

/// Why a cluster build failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The build was taken on and failed: its kind, the error as a local
    /// build reports it (its causes its chain), a failed step's output.
    #[error(transparent)]
    Build(Box<crate::protocol::BuildFailed>),
    /// The cluster answered with something else than the request's
    /// answer, or of a build something the client cannot use.
    #[error("{0}")]
    Cluster(String),
    /// The cluster refused the request: why, by kind.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The cluster took the request on and it failed there: what, with
    /// its causes.
    #[error(transparent)]
    Failed(#[from] Failed),
    /// The client's configuration or credentials could not be read.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The connection or a stream to the coordinator failed.
    #[error(transparent)]
    Net(#[from] strata_net::Error),
    /// A request to the coordinator got no answer.
    #[error(transparent)]
    Request(#[from] crate::protocol::RequestError),
    /// Blobs could not be fetched from the nodes holding them.
    #[error(transparent)]
    Fetch(#[from] crate::peers::FetchError),
    /// The client's own store failed.
    #[error("the client's store")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A finished build's layer is held by none of the nodes the cluster
    /// named (they lost it); the coordinator has been told, and a build
    /// submitted again makes it anew.
    #[error("{0}")]
    LayersLost(String),
}

/// Streams sent at once when uploading a context.
pub const UPLOAD_STREAMS: usize = 8;

/// What an upload sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Uploaded {
    /// Blobs sent.
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// What an upload under way has sent so far.
#[derive(Debug, Default)]
pub struct Sending {
    blobs: std::sync::atomic::AtomicUsize,
    bytes: std::sync::atomic::AtomicU64,
}

impl Sending {
    fn add(&self, blobs: usize, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.blobs.fetch_add(blobs, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }

    /// What was sent so far.
    pub fn sent(&self) -> Uploaded {
        use std::sync::atomic::Ordering::Relaxed;
        Uploaded {
            blobs: self.blobs.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
        }
    }
}

/// Files of a context the coordinator lacks: each blob, where it is and
/// its size.
#[derive(Debug, Default)]
pub struct FilesToSend(Vec<(Digest, std::path::PathBuf, u64)>);

impl FilesToSend {
    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Where a blob being uploaded is read from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The client's store.
    Store(&'a ContentStore),
    /// A file of the context, of this size.
    File(&'a std::path::Path, u64),
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

/// What the cluster said, as the error.
fn cluster(said: impl Into<String>) -> ClientError {
    ClientError::Cluster(said.into())
}

/// `reply`, unless it is a refusal or a failure: those as errors.
fn answered(reply: Reply) -> Result<Reply, ClientError> {
    match reply {
        Reply::Refused(refusal) => Err(refusal.into()),
        Reply::Failed(failed) => Err(failed.into()),
        other => Ok(other),
    }
}

/// An answer that is not one to the request asked.
fn unexpected(reply: Reply) -> ClientError {
    cluster(format!("unexpected answer: {reply:?}"))
}

/// How long a client that has a coordinator answering waits for the one
/// it remembered (the leader when last seen) before going on without it.
pub const PREFERRED_GRACE: Duration = Duration::from_millis(30);

/// Which answer a client goes on with, as the attempts to reach the
/// coordinators of its list end: sans-IO, so it is tested without a
/// network.
#[derive(Debug)]
struct Choice {
    /// The coordinator remembered, if listed.
    preferred: Option<usize>,
    /// Attempts not yet ended.
    pending: usize,
    /// The first coordinator that answered, while waiting for the
    /// preferred one.
    fallback: Option<usize>,
}

/// What a client does next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Go on with this coordinator (remembered for the next time).
    Take(usize),
    /// Wait for the preferred coordinator, at most [`PREFERRED_GRACE`].
    Grace,
    /// Wait for more attempts to end.
    Wait,
    /// None answered.
    Fail,
}

impl Choice {
    fn new(listed: usize, preferred: Option<usize>) -> Choice {
        Choice {
            preferred: preferred.filter(|&p| p < listed),
            pending: listed,
            fallback: None,
        }
    }

    /// The attempt to reach coordinator `i` ended, `answered` or not.
    fn ended(&mut self, i: usize, answered: bool) -> Next {
        self.pending = self.pending.saturating_sub(1);
        let preferred_pending = self.preferred.is_some_and(|p| p != i) && self.pending > 0;
        if answered {
            if self.preferred.is_none_or(|p| p == i) {
                return Next::Take(i);
            }
            if self.fallback.is_none() {
                self.fallback = Some(i);
                return if preferred_pending {
                    Next::Grace
                } else {
                    Next::Take(i)
                };
            }
        } else if self.preferred == Some(i) {
            // The preferred one is down: go on with any that answered.
            self.preferred = None;
            if let Some(f) = self.fallback {
                return Next::Take(f);
            }
        }
        match (self.fallback, self.pending) {
            (Some(f), 0) => Next::Take(f),
            (None, 0) => Next::Fail,
            _ => Next::Wait,
        }
    }

    /// The grace for the preferred coordinator ran out.
    fn grace_over(&self) -> Option<usize> {
        self.fallback
    }
}

impl Client {
    /// Connects to a coordinator of `config`: every one is dialled at
    /// once and the first that answers serves, unless the one the client
    /// remembered answers within [`PREFERRED_GRACE`] after it. A
    /// coordinator that is down costs nothing when another answers.
    pub async fn connect(config: &ClientConfig) -> Result<Client, ClientError> {
        let id = config.tls.identity()?;
        let endpoint = Endpoint::dialer(&id)?;
        let mut choice = Choice::new(config.coordinators.len(), config.remembered());
        let mut attempts = tokio::task::JoinSet::new();
        for (i, addr) in config.coordinators.iter().enumerate() {
            let endpoint = endpoint.clone();
            let addr = addr.clone();
            attempts.spawn(async move { (i, addr.connect(&endpoint).await) });
        }
        let mut answered: Vec<Option<Connection>> =
            config.coordinators.iter().map(|_| None).collect();
        let mut why = Vec::new();
        let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let chosen = loop {
            let ended = match &mut grace {
                Some(sleep) => tokio::select! {
                    ended = attempts.join_next() => ended,
                    () = sleep.as_mut() => match choice.grace_over() {
                        Some(f) => break f,
                        None => continue,
                    },
                },
                None => attempts.join_next().await,
            };
            let (i, result) = match ended {
                Some(Ok(ended)) => ended,
                Some(Err(e)) => {
                    why.push(e.to_string());
                    continue;
                }
                None => break usize::MAX,
            };
            let ok = result.is_ok();
            match result {
                Ok(conn) => answered[i] = Some(conn),
                Err(e) => why.push(strata_registry::error_chain(&e)),
            }
            match choice.ended(i, ok) {
                Next::Take(t) => break t,
                Next::Grace => {
                    grace = Some(Box::pin(tokio::time::sleep(PREFERRED_GRACE)));
                }
                Next::Wait => {}
                Next::Fail => break usize::MAX,
            }
        };
        // Attempts still under way are dropped, and with them their
        // connections.
        attempts.abort_all();
        match answered.get_mut(chosen).and_then(Option::take) {
            Some(conn) => {
                if let Some(addr) = config.coordinators.get(chosen) {
                    config.remember(addr);
                }
                Ok(Client {
                    coordinator: conn,
                    peers: Arc::new(Peers::new(endpoint)),
                })
            }
            None => Err(ClientError::Cluster(format!(
                "no coordinator answered: {}",
                why.join("; ")
            ))),
        }
    }

    /// Uploads the directories of context `tree` the coordinator lacks,
    /// and says which of its files to send ([`Client::upload_files`]): it
    /// asks which blobs are missing (as REAPI's FindMissingBlobs). With
    /// its directories there, the context's tree is whole on the
    /// coordinator from its root down, and a build of it may start while
    /// the files arrive. Directory blobs are stored in `cas` to be sent.
    pub async fn upload_tree(
        &self,
        cas: &ContentStore,
        tree: &crate::context::Hashed,
        sending: &Sending,
    ) -> Result<FilesToSend, ClientError> {
        let all = tree.blobs();
        let mut missing = Vec::new();
        for chunk in all.chunks(crate::protocol::MAX_MISSING_ASKED) {
            let ask = ClientRequest::Missing {
                context: tree.root,
                blobs: chunk.to_vec(),
            };
            match self.ask(ask).await? {
                Reply::Missing(lacks) => missing.extend(lacks),
                other => return Err(unexpected(other)),
            }
        }
        // Only what was asked about can be sent.
        let asked: std::collections::HashSet<&Digest> = all.iter().collect();
        missing.retain(|d| asked.contains(d));
        let dirs: std::collections::HashMap<Digest, &Vec<u8>> =
            tree.dirs.iter().map(|(d, b)| (*d, b)).collect();
        let (mut dir_blobs, mut files) = (Vec::new(), FilesToSend::default());
        for d in missing {
            if let Some(bytes) = dirs.get(&d) {
                cas.put(bytes).map_err(|e| ClientError::Store(e.into()))?;
                dir_blobs.push(d);
            } else if let Some((path, size)) = tree.files.get(&d) {
                files.0.push((d, path.clone(), *size));
            }
        }
        // Small blobs go many to a stream, made durable together.
        let dirs: Vec<(Digest, BatchSource<'_>)> = dir_blobs
            .iter()
            .map(|d| (*d, BatchSource::Store(cas)))
            .collect();
        for batch in strata_net::batches(&dirs, |(_, s)| s.size()) {
            let bytes = self.put_batch(batch).await?;
            sending.add(batch.len(), bytes);
        }
        Ok(files)
    }

    /// Uploads the files [`Client::upload_tree`] found missing, straight
    /// from the context directory: large ones first, each on its own
    /// stream, and small ones many to a stream beside them, made durable
    /// together; [`UPLOAD_STREAMS`] at once, counted in `sending`.
    pub async fn upload_files(
        &self,
        files: &FilesToSend,
        sending: &Sending,
    ) -> Result<(), ClientError> {
        use futures_util::StreamExt as _;
        use futures_util::TryStreamExt as _;
        let (small, mut large): (Vec<_>, Vec<_>) = files
            .0
            .iter()
            .partition(|(_, _, size)| *size <= strata_net::BATCHED_UP_TO);
        strata_net::largest_first(&mut large, |(_, _, size)| *size);
        let small: Vec<(Digest, BatchSource<'_>)> = small
            .into_iter()
            .map(|(d, path, size)| (*d, BatchSource::File(path, *size)))
            .collect();
        let batched = strata_net::batches(&small, |(_, s)| s.size());
        // Collected, so the future holds the puts and not the closures
        // that made them: a caller's future stays provably `Send`.
        let puts: Vec<_> = large
            .iter()
            .map(|(d, path, size)| {
                futures_util::future::Either::Right(async move {
                    let n = self.put(d, Source::File(path, *size)).await?;
                    sending.add(1, n);
                    Ok::<_, ClientError>(())
                })
            })
            .chain(batched.iter().map(|b| {
                futures_util::future::Either::Left(async move {
                    let n = self.put_batch(b).await?;
                    sending.add(b.len(), n);
                    Ok(())
                })
            }))
            .collect();
        futures_util::stream::iter(puts)
            .buffer_unordered(UPLOAD_STREAMS)
            .try_collect::<()>()
            .await
    }

    /// Sends a batch of small blobs to the coordinator on one stream.
    /// Returns their bytes.
    async fn put_batch(&self, blobs: &[(Digest, BatchSource<'_>)]) -> Result<u64, ClientError> {
        let c = &self.coordinator;
        let (mut send, mut recv) = c.open().await?;
        let names = blobs.iter().map(|(d, _)| *d).collect();
        write_frame(
            &mut send,
            &Request::Client(ClientRequest::PutBlobs(names)),
            c.addr,
        )
        .await?;
        let sent = send_batch(&mut send, blobs, c.addr).await;
        let answer = read_frame::<Reply>(&mut recv, c.addr).await;
        match (sent, answer) {
            (Ok(n), Ok(Some(Reply::Ok))) => Ok(n),
            // A file that hashes to another digest than it did moments
            // ago changed while it was sent.
            (_, Ok(Some(Reply::Refused(refusal @ Refusal::BlobMismatch { blob, .. })))) => {
                let changed = blobs.iter().find_map(|(d, source)| match source {
                    BatchSource::File(path, _) if *d == blob => Some(path),
                    _ => None,
                });
                Err(cluster(match changed {
                    Some(path) => format!(
                        "{} changed while it was uploaded; build again ({refusal})",
                        path.display()
                    ),
                    None => refusal.to_string(),
                }))
            }
            (_, Ok(Some(Reply::Refused(refusal)))) => Err(refusal.into()),
            (_, Ok(Some(Reply::Failed(failed)))) => Err(failed.into()),
            (Err(e), _) => Err(e.into()),
            (Ok(_), Err(e)) => Err(e.into()),
            (Ok(_), Ok(other)) => Err(cluster(format!(
                "unexpected answer to an upload: {other:?}"
            ))),
        }
    }

    /// Makes sure the coordinator holds `blob`, uploading it from `cas`,
    /// and keeps it there for a while (asking about a blob pins it).
    pub async fn upload(&self, cas: &ContentStore, blob: &Digest) -> Result<(), ClientError> {
        let has = || async {
            match self.ask(ClientRequest::HasBlob(*blob)).await? {
                Reply::Bool(b) => Ok(b),
                other => Err(unexpected(other)),
            }
        };
        if has().await? {
            return Ok(());
        }
        self.put(blob, Source::Store(cas)).await?;
        if has().await? {
            Ok(())
        } else {
            Err(cluster(format!("blob {blob} was uploaded, then missing")))
        }
    }

    /// Sends one blob to the coordinator. Returns its size.
    async fn put(&self, blob: &Digest, from: Source<'_>) -> Result<u64, ClientError> {
        let c = &self.coordinator;
        let (mut send, mut recv) = c.open().await?;
        write_frame(
            &mut send,
            &Request::Client(ClientRequest::PutBlob(*blob)),
            c.addr,
        )
        .await?;
        // A coordinator that refuses the upload (over the client's quota)
        // stops reading and says why: its answer is the error to show.
        let sent = match from {
            Source::Store(cas) => send_blob(&mut send, cas, blob, c.addr).await,
            Source::File(path, size) => send_file(&mut send, path, blob, size, c.addr).await,
        };
        let answer = read_frame::<Reply>(&mut recv, c.addr).await;
        if let (Err(_), Ok(Some(Reply::Ok)) | Err(_) | Ok(None)) = (&sent, &answer)
            && let Err(e) = sent
        {
            return Err(e.into());
        }
        match answer? {
            Some(Reply::Ok) => Ok(sent.unwrap_or(0)),
            Some(Reply::Refused(refusal)) => Err(refusal.into()),
            Some(Reply::Failed(failed)) => Err(failed.into()),
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
        let (mut send, mut recv) = c.open().await?;
        let build = Request::Client(ClientRequest::Build(Box::new(submit)));
        write_frame(&mut send, &build, c.addr).await?;
        let _ = send.finish();
        loop {
            match read_frame::<BuildEvent>(&mut recv, c.addr).await? {
                Some(BuildEvent::Progress(e)) => on_event(e),
                Some(BuildEvent::Done(done)) => return Ok(*done),
                Some(BuildEvent::Failed(failed)) => return Err(ClientError::Build(failed)),
                None => return Err(cluster("the coordinator ended the build without a result")),
            }
        }
    }

    /// Fetches the layers of a finished build that `node` lacks, from the
    /// workers that hold them, and stores the image, its times as `stamps`
    /// asks. Returns it and the bytes fetched.
    pub async fn fetch_image(
        &self,
        node: &Arc<Node>,
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
                    return Err(e.into());
                }
                crate::peers::report_lacking(&e, &self.coordinator).await;
                return Err(ClientError::LayersLost(e.to_string()));
            }
        };
        let config: ImageConfig = serde_json::from_slice(&done.config_json)
            .map_err(|e| cluster(format!("the image config is unreadable: {e}")))?;
        let image = store_image(node, config, &done.layers, done.image_layers, stamps)
            .await
            .map_err(|e| ClientError::Store(e.into()))?;
        Ok((image, fetched))
    }

    /// Keeps new stages off `worker` (`cordoned`), or lets them back.
    pub async fn cordon(&self, worker: &str, cordoned: bool) -> Result<(), ClientError> {
        self.done(Request::Admin(AdminRequest::Cordon {
            worker: worker.to_string(),
            cordoned,
        }))
        .await
    }

    /// The images the cluster names.
    pub async fn images(&self) -> Result<Vec<crate::protocol::NamedImage>, ClientError> {
        match self.ask(ClientRequest::Images).await? {
            Reply::Images(i) => Ok(i),
            other => Err(unexpected(other)),
        }
    }

    /// Has a worker push the image the cluster names `push.name`.
    pub async fn push(
        &self,
        push: crate::protocol::PushRequest,
    ) -> Result<strata_registry::Pushed, ClientError> {
        match self.ask(ClientRequest::Push(push)).await? {
            Reply::Pushed(Ok(p)) => Ok(p),
            Reply::Pushed(Err(failed)) => Err(failed.into()),
            other => Err(unexpected(other)),
        }
    }

    /// Drops the cluster's image name `name`.
    pub async fn untag(&self, name: &str) -> Result<(), ClientError> {
        self.done(Request::Client(ClientRequest::Untag(name.to_string())))
            .await
    }

    /// Where each node's bytes are.
    pub async fn du(&self) -> Result<Vec<crate::protocol::NodeUsage>, ClientError> {
        match self.ask(ClientRequest::Du).await? {
            Reply::Usage(u) => Ok(u),
            other => Err(unexpected(other)),
        }
    }

    /// Imports cache entries into the cluster's index (an admin's
    /// certificate only), their layers uploaded first from `cas`; sent in
    /// as many requests as the protocol's limits ask. Returns the entries
    /// the index did not have.
    pub async fn import_cache(
        &self,
        cas: &ContentStore,
        entries: Vec<(Digest, strata_cache::CacheEntry)>,
    ) -> Result<usize, ClientError> {
        let mut uploaded = std::collections::HashSet::new();
        for (_, entry) in &entries {
            for l in &entry.layers {
                if uploaded.insert(l.blob) {
                    self.upload(cas, &l.blob).await?;
                }
            }
        }
        let mut added = 0;
        let mut batch: Vec<(Digest, strata_cache::CacheEntry)> = Vec::new();
        let mut layers = 0;
        let mut entries = entries.into_iter().peekable();
        while let Some(e) = entries.next() {
            layers += e.1.layers.len();
            batch.push(e);
            let full = entries.peek().is_none_or(|next| {
                batch.len() >= crate::protocol::MAX_IMPORTED
                    || layers + next.1.layers.len() > crate::protocol::MAX_IMPORTED_LAYERS
            });
            if full {
                let import = Request::Admin(AdminRequest::ImportCache(std::mem::take(&mut batch)));
                layers = 0;
                match answered(request(&self.coordinator, &import).await?)? {
                    Reply::Imported(n) => added += n,
                    other => return Err(unexpected(other)),
                }
            }
        }
        Ok(added)
    }

    /// Adds a coordinator to the group, or removes one.
    pub async fn change_group(
        &self,
        change: strata_raft::MembershipChange,
    ) -> Result<(), ClientError> {
        self.done(Request::Admin(AdminRequest::ChangeGroup(change)))
            .await
    }

    /// Asks the coordinator for something it answers with done or why not.
    async fn done(&self, req: Request) -> Result<(), ClientError> {
        match answered(request(&self.coordinator, &req).await?)? {
            Reply::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the coordinator what a client may; its answer, unless it
    /// refused or failed.
    async fn ask(&self, req: ClientRequest) -> Result<Reply, ClientError> {
        answered(request(&self.coordinator, &Request::Client(req)).await?)
    }

    /// The builds this coordinator coordinated for this client (for an
    /// admin, for everyone), newest first: at most `limit`, or the one
    /// whose id is or starts with `id`.
    pub async fn history(
        &self,
        id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<strata_worker::BuildRecord>, ClientError> {
        let ask = ClientRequest::History {
            id: id.map(str::to_string),
            limit,
        };
        match self.ask(ask).await? {
            Reply::History(h) => Ok(h),
            other => Err(unexpected(other)),
        }
    }

    /// The cluster's state.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        match self.ask(ClientRequest::Status).await? {
            Reply::Status(s) => Ok(*s),
            other => Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Choice, Next};

    #[test]
    fn with_nothing_remembered_the_first_answer_serves() {
        let mut c = Choice::new(3, None);
        assert_eq!(c.ended(0, false), Next::Wait);
        assert_eq!(c.ended(2, true), Next::Take(2));
    }

    #[test]
    fn the_remembered_coordinator_gets_a_grace_and_wins_within_it() {
        let mut c = Choice::new(3, Some(1));
        assert_eq!(c.ended(0, true), Next::Grace);
        assert_eq!(c.ended(2, true), Next::Wait);
        assert_eq!(c.ended(1, true), Next::Take(1));
    }

    #[test]
    fn a_remembered_coordinator_that_is_down_costs_no_grace() {
        let mut c = Choice::new(3, Some(0));
        assert_eq!(c.ended(0, false), Next::Wait);
        assert_eq!(c.ended(2, true), Next::Take(2));
        let mut c = Choice::new(3, Some(0));
        assert_eq!(c.ended(1, true), Next::Grace);
        assert_eq!(c.ended(0, false), Next::Take(1));
        let mut c = Choice::new(2, Some(0));
        assert_eq!(c.ended(1, true), Next::Grace);
        assert_eq!(c.grace_over(), Some(1));
    }

    #[test]
    fn a_remembered_coordinator_no_longer_listed_is_ignored() {
        let mut c = Choice::new(2, Some(5));
        assert_eq!(c.ended(1, true), Next::Take(1));
    }

    #[test]
    fn when_none_answers_the_client_fails_once_all_ended() {
        let mut c = Choice::new(2, Some(1));
        assert_eq!(c.ended(1, false), Next::Wait);
        assert_eq!(c.ended(0, false), Next::Fail);
        let mut c = Choice::new(1, None);
        assert_eq!(c.ended(0, true), Next::Take(0));
    }

    #[test]
    fn the_last_answer_after_a_lone_fallback_is_taken_when_all_ended() {
        let mut c = Choice::new(2, Some(1));
        assert_eq!(c.ended(0, true), Next::Grace);
        assert_eq!(c.ended(1, false), Next::Take(0));
    }
}
