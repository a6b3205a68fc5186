//! `strata coordinator`: plans builds, places their stages on workers, keeps
//! the cache index and knows which node holds which blob.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use strata_cas::Digest;
use strata_dockerfile::Platform;
use strata_net::{Connection, Endpoint, Role, write_frame};
use strata_oci::LayerRef;
use strata_raft::{Member, ReplicatedIndex, Tuning};
use strata_registry::Registry;
use strata_solver::{Event, Flights, SolveOptions};
use strata_worker::history::{Dashboard, NodeView, WorkerView};
use strata_worker::{BaseImages, Node};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::access::ReadRights;
use crate::config::CoordinatorConfig;
use crate::desk::WorkerDesk;
use crate::error::{ImageError, LayerError, StartError, SubmitError};
use crate::names::Names;
use crate::placement::{Placement, Selections};
use crate::protocol::{
    AdminRequest, AnyRequest, BuildDone, BuildEvent, BuildFailed, BuildSpec, ClientRequest,
    ClusterStatus, CoordinatorRequest, Failed, FailureKind, Grant, GroupStatus, Holder,
    MAX_HISTORY, MAX_TAGS, Refusal, Reply, Request, SubmitBuild, WorkerStatus,
};
use crate::replicas::Replicas;
use crate::roster::Roster;
use crate::uploads::Uploads;

/// The coordinator process.
pub struct Coordinator {
    pub(crate) node: Arc<Node>,
    /// Its member of the group that replicates the cache index.
    pub(crate) member: Arc<Member>,
    /// The cache index builds use, through `member`.
    index: Arc<ReplicatedIndex>,
    pub(crate) name: String,
    listen: SocketAddr,
    endpoint: Endpoint,
    registry: Arc<Registry>,
    lease: Duration,
    /// The registered workers, and where the group records blobs.
    roster: Arc<Roster>,
    /// Copies of built layers, and the records of workers.
    replicas: Arc<Replicas>,
    /// What workers ask and report.
    desk: WorkerDesk,
    /// The images the cluster names.
    names: Arc<Names>,
    next_build: AtomicU64,
    builds_running: AtomicUsize,
    /// Steps running for any build: concurrent builds run identical
    /// steps once.
    flights: Flights,
    /// The blobs each client may read here: its builds' layers.
    reads: Mutex<ReadRights>,
    /// The build contexts clients uploaded: the trees held whole, those
    /// kept for builds, the store's bounds, each client's quota.
    uploads: Arc<Uploads>,
    /// Connections to workers, for the layers its image endpoint serves.
    peers: Arc<crate::peers::Peers>,
    /// What COPY steps selected from build contexts, as workers measured
    /// it.
    selections: Arc<Selections>,
    /// When it started.
    started: Instant,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl crate::Service for Coordinator {
    fn handle<'a>(
        self: &'a Arc<Self>,
        conn: &'a Connection,
        req: Request,
        send: &'a mut quinn::SendStream,
        recv: &'a mut quinn::RecvStream,
    ) -> impl std::future::Future<Output = Result<(), strata_net::Error>> + Send + 'a {
        self.answer(conn, req, send, recv)
    }
}

/// Whether a submitted build's id and names are ones to take: they end up
/// in log lines and the history.
fn check_submitted(submit: &SubmitBuild) -> Result<(), SubmitError> {
    if !strata_solver::valid_build_id(&submit.build_id) {
        return Err(SubmitError::BadId(
            submit.build_id.chars().take(80).collect::<String>(),
        ));
    }
    let (most, longest) = MAX_TAGS;
    if submit.tags.len() > most || submit.tags.iter().any(|t| t.len() > longest) {
        return Err(SubmitError::TooManyNames { most, longest });
    }
    for tag in &submit.tags {
        let name: strata_oci::Reference = tag.parse().map_err(|source| SubmitError::BadName {
            name: tag.clone(),
            source,
        })?;
        if name.digest.is_some() {
            return Err(SubmitError::Digest(tag.clone()));
        }
    }
    Ok(())
}

/// Starts this coordinator's member of the group; the member with the
/// lowest id makes the group on its first start.
async fn join_group(
    config: &CoordinatorConfig,
    id: &strata_net::Identity,
) -> Result<Member, StartError> {
    let endpoint = Endpoint::listen(config.raft_listen, id).map_err(StartError::listen(
        "the replicated index",
        config.raft_listen,
    ))?;
    let raft_addr = endpoint.local_addr().map_err(StartError::listen(
        "the replicated index",
        config.raft_listen,
    ))?;
    let dir = config.home.join("raft");
    std::fs::create_dir_all(&dir).map_err(|source| StartError::Dir {
        path: dir.clone(),
        source,
    })?;
    let group: BTreeMap<u64, strata_raft::Node> = config
        .group
        .iter()
        .map(|m| {
            (
                m.id,
                strata_raft::Node {
                    addr: m.raft.to_string(),
                },
            )
        })
        .collect();
    let raft = group
        .get(&config.id)
        .map_or_else(|| raft_addr.to_string(), |n| n.addr.clone());
    match Member::join(config.id, &dir, endpoint, group, &Tuning::default()).await {
        Err(strata_raft::Error::LostItsState { voters }) => Err(StartError::LostItsState {
            id: config.id,
            dir,
            voters,
            raft,
        }),
        joined => joined.map_err(StartError::Group),
    }
}

impl Coordinator {
    /// Opens the state directory, starts listening, and joins (or makes)
    /// the group of coordinators that keeps the cache index.
    pub async fn start(
        config: &CoordinatorConfig,
        registry: Arc<Registry>,
    ) -> Result<Arc<Coordinator>, StartError> {
        let (id, me, node) = crate::open_node(&config.tls, Role::Coordinator, &config.home)?;
        let endpoint = Endpoint::listen(config.listen, &id)
            .map_err(StartError::listen("peers", config.listen))?;
        let listen = endpoint
            .local_addr()
            .map_err(StartError::listen("peers", config.listen))?;
        let member = Arc::new(join_group(config, &id).await?);
        let index = Arc::new(ReplicatedIndex::new(Arc::clone(&member)));
        let node = Arc::new(node);
        let me_holder = Holder {
            name: me.name.clone(),
            addr: listen,
        };
        let lease = Duration::from_secs(config.lease_seconds.max(1));
        let roster = Arc::new(Roster::new(
            Arc::clone(&member),
            Arc::clone(&node.content),
            me_holder,
            lease,
        ));
        let replicas = Arc::new(Replicas::new(
            Arc::clone(&roster),
            Arc::clone(&member),
            config.replication.max(1),
            config.repair_mib_per_second.saturating_mul(1 << 20),
        ));
        let uploads = Arc::new(Uploads::new(
            Arc::clone(&node),
            strata_worker::keep_within(&config.home, config.keep_storage, config.keep_duration)?,
            config.upload_quota_mib_per_hour.saturating_mul(1 << 20),
        ));
        let names = Arc::new(Names::new(Arc::clone(&member)));
        let desk = WorkerDesk {
            roster: Arc::clone(&roster),
            replicas: Arc::clone(&replicas),
            member: Arc::clone(&member),
            names: Arc::clone(&names),
            uploads: Arc::clone(&uploads),
        };
        Ok(Arc::new(Coordinator {
            node,
            member,
            index,
            name: me.name,
            listen,
            registry,
            lease,
            roster,
            replicas,
            desk,
            names,
            // Ids a restarted coordinator hands out differ from those of
            // its previous run, which workers may still hold.
            next_build: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(1)),
            ),
            builds_running: AtomicUsize::new(0),
            flights: Flights::default(),
            reads: Mutex::default(),
            started: Instant::now(),
            uploads,
            peers: Arc::new(crate::peers::Peers::new(endpoint.clone())),
            selections: Arc::default(),
            endpoint,
        }))
    }

    /// Serves the cluster's images as `config` says (`[registry]`):
    /// plain HTTP on loopback, HTTPS asking for a cluster certificate
    /// anywhere else. Returns where, or `None` when not configured.
    pub async fn serve_images(
        self: &Arc<Self>,
        config: &CoordinatorConfig,
    ) -> Result<Option<SocketAddr>, StartError> {
        let Some(addr) = config.registry.listen else {
            return Ok(None);
        };
        let tls = if !config.registry.serves_tls() {
            None
        } else {
            let id = config.tls.identity()?;
            Some(Arc::new(
                strata_net::https_config_mutual(&id).map_err(StartError::Certificate)?,
            ))
        };
        let served = crate::distribution::serve(Arc::clone(self) as Arc<dyn crate::distribution::Images>, addr, tls)
            .await
            .map_err(|e| StartError::Serve {
                what: "images",
                addr,
                hint: "set [registry] listen in the coordinator's config, or STRATA_REGISTRY_LISTEN=off",
                source: Box::new(e),
            })?;
        Ok(Some(served.addr))
    }

    /// Pushes the image the cluster names `req.name` from the live worker
    /// holding the most bytes of its layers, which fetches the rest from
    /// their holders.
    async fn push(
        &self,
        req: crate::protocol::PushRequest,
    ) -> Result<strata_registry::Pushed, ImageError> {
        crate::names::reference(&req.destination)?;
        let (_, image) = self.names.named_image(&req.name)?;
        let layers: Vec<(LayerRef, Vec<Holder>)> = image
            .layers
            .iter()
            .map(|l| (*l, self.roster.holders(&l.blob, None)))
            .collect();
        let mut held: HashMap<&str, u64> = HashMap::new();
        for (l, holders) in &layers {
            for h in holders {
                *held.entry(h.name.as_str()).or_default() += l.size;
            }
        }
        let (worker, conn) = {
            let workers = self.roster.lock();
            workers
                .iter()
                .filter(|(_, w)| w.alive())
                .max_by_key(|(name, _)| (held.get(name).copied().unwrap_or(0), *name))
                .map(|(name, w)| (name.to_string(), w.link.conn.clone()))
                .ok_or(ImageError::NoWorker)?
        };
        tracing::info!(image = %req.name, destination = %req.destination, %worker, "pushing from a worker");
        let spec = crate::protocol::PushSpec {
            config: image.config,
            layers,
            request: req,
        };
        let push = Request::Coordinator(CoordinatorRequest::PushImage(Box::new(spec)));
        let failed = match crate::protocol::request(&conn, &push).await {
            Ok(Reply::Pushed(Ok(pushed))) => return Ok(pushed),
            Ok(Reply::Pushed(Err(failed)) | Reply::Failed(failed)) => failed,
            Ok(Reply::Refused(refusal)) => Failed::of(&refusal),
            Ok(other) => Failed::new(format!("unexpected answer {other:?}")),
            Err(e) => Failed::of(&e),
        };
        Err(ImageError::Push {
            worker,
            source: failed,
        })
    }

    /// Serves its metrics, `/healthz` and `/readyz` as `config` says
    /// (ready: a leader of the replicated index is known), and records
    /// the group's state as it changes; returns where.
    pub async fn serve_metrics(
        self: &Arc<Self>,
        config: &CoordinatorConfig,
    ) -> Result<Option<SocketAddr>, StartError> {
        let health = Arc::new(CoordinatorHealth {
            coordinator: Arc::downgrade(self),
            status: std::sync::Mutex::default(),
        });
        let served =
            crate::observe::serve(&config.metrics, self.listen, &config.tls, health).await?;
        if served.is_some() {
            drop(self.member.report_metrics());
        }
        Ok(served)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// Serves workers and clients until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let reaper = {
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    me.roster.expire_leases();
                }
            })
        };
        let repair = tokio::spawn(Arc::clone(&self.replicas).repair());
        let reconcile = tokio::spawn(Arc::clone(&self.replicas).reconcile());
        let recorder = tokio::spawn(Arc::clone(&self.replicas).write_records());
        let evicting = tokio::spawn(Arc::clone(&self.uploads).evict_forever());
        loop {
            tokio::select! {
                conn = self.endpoint.accept() => {
                    let Some(conn) = conn else { break };
                    tokio::spawn(Arc::clone(&self).serve(conn));
                }
                () = shutdown.cancelled() => break,
            }
        }
        reaper.abort();
        repair.abort();
        reconcile.abort();
        recorder.abort();
        evicting.abort();
        self.endpoint.close();
    }

    async fn serve(self: Arc<Self>, conn: Connection) {
        crate::serve_requests(&self, &conn).await;
        match conn.peer.role {
            Role::Worker => self.roster.lose(&conn.peer.name, &conn),
            // What it was asked to upload is no longer waited for.
            _ => self.uploads.gone(conn.quic.stable_id()),
        }
    }

    async fn answer(
        self: &Arc<Self>,
        conn: &Connection,
        req: Request,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), strata_net::Error> {
        let reply = match req {
            Request::Any(AnyRequest::GetBlob(d)) => {
                // A worker fetching a context's file may ask before the
                // client's upload of it has landed.
                if conn.peer.role == Role::Worker {
                    self.uploads.arrived(&d).await;
                }
                return crate::access::serve_blob(&self.reads, &self.node.content, conn, &d, send)
                    .await;
            }
            Request::Any(AnyRequest::Lacking(reported)) => self.desk.check_lacking(reported).await,
            Request::Client(r) => return self.answer_client(conn, r, send, recv).await,
            Request::Admin(r) => self.answer_admin(r).await,
            Request::Worker(r) => return self.desk.answer(conn, r, send).await,
            other @ (Request::Coordinator(_) | Request::Peer(_)) => {
                strata_metrics::request_error("not_served");
                Reply::Refused(other.not_served(Role::Coordinator))
            }
        };
        write_frame(send, &reply, conn.addr).await
    }

    /// Answers what a client (or an admin) asks.
    async fn answer_client(
        self: &Arc<Self>,
        conn: &Connection,
        req: ClientRequest,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), strata_net::Error> {
        let reply = match req {
            ClientRequest::HasBlob(d) => {
                let has = self.node.content.contains(&d).unwrap_or(false);
                if has {
                    self.uploads.pin(d);
                }
                Reply::Bool(has)
            }
            ClientRequest::Missing { context, blobs } => {
                if blobs.len() > crate::protocol::MAX_MISSING_ASKED {
                    Reply::over_limit(
                        "blobs asked about at once",
                        blobs.len(),
                        crate::protocol::MAX_MISSING_ASKED,
                    )
                } else {
                    self.uploads.pin(context);
                    self.uploads
                        .missing(context, blobs, conn.quic.stable_id())
                        .await
                }
            }
            ClientRequest::PutBlobs(blobs) => {
                return self.uploads.receive_batch(conn, blobs, send, recv).await;
            }
            ClientRequest::PutBlob(d) => {
                return self.uploads.receive_upload(conn, d, send, recv).await;
            }
            ClientRequest::Build(submit) => {
                return self.build(*submit, conn, send).await;
            }
            ClientRequest::History { id, limit } => {
                // A client sees the builds it asked for; an admin, all.
                let who = (conn.peer.role == Role::Client).then(|| conn.peer.name.clone());
                let node = Arc::clone(&self.node);
                let found = tokio::task::spawn_blocking(move || {
                    let all = node.history.list(strata_worker::history::MAX_RECORDS)?;
                    let mine = all.into_iter().filter(|r| who.is_none() || r.client == who);
                    match id {
                        Some(id) => {
                            strata_worker::history::find(mine.collect(), &id).map(|r| vec![r])
                        }
                        None => Ok::<_, strata_worker::HistoryError>(
                            mine.take(limit.min(MAX_HISTORY)).collect(),
                        ),
                    }
                })
                .await;
                match found {
                    Ok(Ok(records)) => Reply::History(records),
                    Ok(Err(e)) => Reply::Failed(Failed::of(&e)),
                    Err(e) => Reply::failed("reading the history stopped", &e),
                }
            }
            ClientRequest::Du => Reply::Usage(self.usage().await),
            ClientRequest::Images => match self.names.named_images() {
                Ok(images) => Reply::Images(images),
                Err(e) => Reply::Failed(Failed::of(&e)),
            },
            ClientRequest::Push(push) => {
                Reply::Pushed(self.push(push).await.map_err(|e| Failed::of(&e)))
            }
            ClientRequest::Untag(name) => match self.names.untag(&name).await {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Failed(Failed::of(&e)),
            },
            ClientRequest::Status => {
                // It reads the whole cache index.
                let me = Arc::clone(self);
                match tokio::task::spawn_blocking(move || me.status()).await {
                    Ok(status) => Reply::Status(Box::new(status)),
                    Err(e) => Reply::failed("reading the status stopped", &e),
                }
            }
        };
        write_frame(send, &reply, conn.addr).await
    }

    /// Answers what only an admin asks.
    async fn answer_admin(self: &Arc<Self>, req: AdminRequest) -> Reply {
        match req {
            AdminRequest::ImportCache(entries) => self.import_cache(entries).await,
            AdminRequest::ChangeGroup(change) => {
                tracing::info!(?change, "changing the group of coordinators");
                match self.member.change_membership(change).await {
                    Ok(()) => Reply::Ok,
                    Err(e) => Reply::Failed(Failed::of(&e)),
                }
            }
            AdminRequest::Cordon { worker, cordoned } => self.desk.cordon(&worker, cordoned),
        }
    }

    fn group_status(&self) -> GroupStatus {
        let m = self.member.raft().metrics().borrow().clone();
        GroupStatus {
            id: m.id,
            leader: m.current_leader,
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index),
            members: m
                .membership_config
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            joined: self.member.local().joined().unwrap_or_default(),
        }
    }

    pub(crate) fn status(&self) -> ClusterStatus {
        let state = self.member.local();
        let loc = state.locations().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read where blobs are");
            Vec::new()
        });
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (_, holders) in &loc {
            for h in holders {
                *counts.entry(h.as_str()).or_default() += 1;
            }
        }
        let census = self.replicas.census().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the cache index");
            crate::replicas::Census {
                entries: 0,
                short: Vec::new(),
                orphans: Vec::new(),
            }
        });
        let workers = self.roster.lock();
        let mut list: Vec<WorkerStatus> = workers
            .iter()
            .map(|(name, w)| WorkerStatus {
                name: name.to_string(),
                addr: w.link.addr,
                alive: w.alive(),
                cordoned: workers.is_cordoned(name),
                slots: w.slots(),
                running: w.running(),
                blobs: counts.get(name).copied().unwrap_or(0),
                platforms: {
                    let (native, all) = (&w.spec().native, &w.spec().platforms);
                    let mut p: Vec<&Platform> = native.iter().collect();
                    p.extend(all.iter().filter(|x| !native.contains(x)));
                    p.iter().map(|x| x.to_string()).collect()
                },
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        ClusterStatus {
            coordinator: self.name.clone(),
            pid: std::process::id(),
            workers: list,
            cache_entries: census.entries,
            group: self.group_status(),
            blobs_located: loc.len(),
            replication: self.replicas.replication,
            under_replicated: census.short.len(),
            workers_registered: state.workers().map_or(0, |w| w.len()),
            builds_running: self.builds_running.load(Ordering::Relaxed),
        }
    }

    /// Just started, a coordinator has not heard yet from every worker the
    /// group records: their layers would look held by nobody, and cached
    /// steps would run again. A build waits for them, for one lease at
    /// most from the start.
    async fn await_known_workers(&self) {
        let deadline = self.started + self.lease;
        while Instant::now() < deadline {
            let recorded = self.member.local().workers().unwrap_or_default();
            let missing = {
                let workers = self.roster.lock();
                recorded
                    .iter()
                    .any(|(name, _)| workers.live(name).is_none())
            };
            if !missing {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where this coordinator's bytes are and, asked at once (each within
    /// 30 s), every live worker's.
    async fn usage(&self) -> Vec<crate::protocol::NodeUsage> {
        let mine = crate::protocol::NodeUsage::measure(&self.node, &self.name, "coordinator").await;
        let workers: Vec<(String, Connection)> = {
            let workers = self.roster.lock();
            let mut list: Vec<(String, Connection)> = workers
                .iter()
                .filter(|(_, w)| w.alive())
                .map(|(n, w)| (n.to_string(), w.link.conn.clone()))
                .collect();
            list.sort_by(|a, b| a.0.cmp(&b.0));
            list
        };
        let asked = workers.into_iter().map(|(name, conn)| async move {
            let answer = tokio::time::timeout(
                Duration::from_secs(30),
                crate::protocol::request(&conn, &Request::Coordinator(CoordinatorRequest::Du)),
            )
            .await;
            let usage = match answer {
                Ok(Ok(Reply::Usage(mut u))) if u.len() == 1 => u.remove(0).usage,
                Ok(Ok(Reply::Failed(e))) => Err(e),
                Ok(Ok(Reply::Refused(e))) => Err(Failed::of(&e)),
                Ok(Ok(other)) => Err(Failed::new(format!("answered {other:?}"))),
                Ok(Err(e)) => Err(Failed::of(&e)),
                Err(_) => Err(Failed::new("no answer within 30 s")),
            };
            crate::protocol::NodeUsage {
                name,
                role: "worker".into(),
                usage,
            }
        });
        let mut out = vec![mine];
        out.extend(futures_util::future::join_all(asked).await);
        out
    }

    /// Adds an exported cache's entries to the index: each layer checked
    /// against what this node computed when it was uploaded, copied to
    /// workers as a built layer is, and only then the entries naming it
    /// put; keys the index has are kept.
    async fn import_cache(&self, entries: Vec<(Digest, strata_cache::CacheEntry)>) -> Reply {
        if entries.len() > crate::protocol::MAX_IMPORTED {
            return Reply::over_limit(
                "cache entries",
                entries.len(),
                crate::protocol::MAX_IMPORTED,
            );
        }
        let named: usize = entries.iter().map(|(_, e)| e.layers.len()).sum();
        if named > crate::protocol::MAX_IMPORTED_LAYERS {
            return Reply::over_limit(
                "layers named by the cache entries",
                named,
                crate::protocol::MAX_IMPORTED_LAYERS,
            );
        }
        let mut layers: Vec<LayerRef> = Vec::new();
        let mut seen = HashSet::new();
        for (key, entry) in &entries {
            if entry.layers.len() > crate::protocol::MAX_IMPORTED_CHAIN {
                return Reply::over_limit(
                    &format!("layers in cache entry {key}"),
                    entry.layers.len(),
                    crate::protocol::MAX_IMPORTED_CHAIN,
                );
            }
            for l in &entry.layers {
                if seen.insert(l.blob) {
                    layers.push(*l);
                }
            }
        }
        for l in &layers {
            match self.node.content.info(&l.blob) {
                Ok(Some(info)) if info.sha256 == l.diff_id && info.size == l.size => {}
                Ok(Some(info)) => {
                    return Reply::Refused(Refusal::NotTheLayer {
                        blob: l.blob,
                        detail: format!(
                            "its sha256 is {} ({} bytes), the entry says {} ({} bytes)",
                            info.sha256, info.size, l.diff_id, l.size
                        ),
                    });
                }
                Ok(None) => return Reply::Refused(Refusal::NotUploaded(l.blob)),
                Err(e) => return Reply::failed(&format!("cannot read layer {}", l.blob), &e),
            }
        }
        for l in &layers {
            if let Err(e) = self.replicas.replicate(*l, None).await {
                return Reply::failed(&format!("cannot copy layer {} to workers", l.blob), &e);
            }
        }
        if let Err(e) = self.member.barrier().await {
            return Reply::failed("the cache index cannot be read", &e);
        }
        let mut added = 0;
        for (key, entry) in entries {
            match self.member.local().entry(&key) {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => return Reply::failed("the cache index cannot be read", &e),
            }
            if let Err(e) = self
                .member
                .write(strata_raft::CommandV1::Put { key, entry })
                .await
            {
                return Reply::failed(&format!("cannot record cache entry {key}"), &e);
            }
            added += 1;
        }
        tracing::info!(added, layers = layers.len(), "cache imported");
        Reply::Imported(added)
    }

    /// Lets `client` read the layers of its build where they are: here,
    /// and on each worker holding one. A worker that misses the grant
    /// refuses the client, which fetches from the next holder.
    async fn grant_reads(&self, client: &str, holders: &[(Digest, Vec<Holder>)]) {
        let now = Instant::now();
        let blobs: Vec<Digest> = holders.iter().map(|(b, _)| *b).collect();
        self.reads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .grant(client, &blobs, now);
        let mut per_worker: BTreeMap<&str, Vec<Digest>> = BTreeMap::new();
        for (blob, hs) in holders {
            for h in hs.iter().filter(|h| h.name != self.name) {
                per_worker.entry(&h.name).or_default().push(*blob);
            }
        }
        let conns: Vec<(String, Connection, Vec<Digest>)> = {
            let workers = self.roster.lock();
            per_worker
                .into_iter()
                .filter_map(|(name, blobs)| {
                    workers
                        .get(name)
                        .map(|w| (name.to_string(), w.link.conn.clone(), blobs))
                })
                .collect()
        };
        let mut asks = tokio::task::JoinSet::new();
        for (name, conn, blobs) in conns {
            let grant = Request::Coordinator(CoordinatorRequest::Grant(Box::new(Grant {
                client: client.to_string(),
                blobs,
            })));
            asks.spawn(async move { (name, crate::protocol::request(&conn, &grant).await) });
        }
        while let Some(done) = asks.join_next().await {
            match done {
                Ok((_, Ok(Reply::Ok))) => {}
                Ok((name, other)) => {
                    tracing::warn!(worker = %name, answer = ?other, %client, "a worker did not take a client's read grant");
                }
                Err(e) => tracing::warn!(error = %e, "granting reads stopped"),
            }
        }
    }

    /// Runs a client's build, streaming its progress back.
    async fn build(
        self: &Arc<Self>,
        submit: SubmitBuild,
        client: &Connection,
        send: &mut quinn::SendStream,
    ) -> Result<(), strata_net::Error> {
        let peer = client.addr;
        self.builds_running.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<BuildEvent>();
        let cancel = CancellationToken::new();
        if let Err(e) = check_submitted(&submit) {
            strata_metrics::request_error("malformed");
            let refused = BuildEvent::Failed(Box::new(BuildFailed::new(
                FailureKind::Request,
                Failed::of(&e),
            )));
            self.builds_running.fetch_sub(1, Ordering::Relaxed);
            return write_frame(send, &refused, peer).await;
        }
        let mut record =
            strata_worker::BuildRecord::begin(&submit.build_id, submit.tags.clone(), &self.name);
        record.client = Some(client.peer.name.clone());
        let begun = Instant::now();
        self.node
            .live
            .begin(&submit.build_id, &submit.tags, Some(&client.peer.name));
        let run = {
            let (me, tx, cancel) = (Arc::clone(self), tx.clone(), cancel.clone());
            let client_name = client.peer.name.clone();
            let span = tracing::info_span!("build", id = %submit.build_id, client = %client_name);
            tokio::spawn(
                async move { me.solve(submit, &client_name, tx, cancel).await }.instrument(span),
            )
        };
        drop(tx);
        // A client that goes away (killed, Ctrl-C) takes its build with it,
        // whether or not there is progress to send at the time.
        let gone = client.quic.closed();
        tokio::pin!(gone);
        // Cancelled unless it ends otherwise: its client gone, or Ctrl-C.
        // (A failing step cancels the rest of its build too, but fails it.)
        record.status = strata_worker::BuildStatus::Cancelled;
        let mut client_gone = false;
        loop {
            tokio::select! {
                event = rx.recv() => match event {
                    Some(event) => {
                        match &event {
                            BuildEvent::Progress(e) => self.node.live.event(&record.id, e),
                            BuildEvent::Done(done) => {
                                record.status = strata_worker::BuildStatus::Succeeded;
                                record.steps.clone_from(&done.steps);
                            }
                            BuildEvent::Failed(failed) if !client_gone => {
                                record.status = strata_worker::BuildStatus::Failed;
                                record.error = Some(failed.text());
                            }
                            _ => {}
                        }
                        if write_frame(send, &event, peer).await.is_err() {
                            client_gone = true;
                            cancel.cancel();
                        }
                    }
                    None => break,
                },
                _ = &mut gone, if !client_gone => {
                    client_gone = true;
                    cancel.cancel();
                }
            }
        }
        let _ = run.await;
        self.builds_running.fetch_sub(1, Ordering::Relaxed);
        self.node.live.end(&record.id);
        record.duration_seconds = begun.elapsed().as_secs_f64();
        let node = Arc::clone(&self.node);
        let recorded = tokio::task::spawn_blocking(move || node.history.record(&record)).await;
        if let Ok(Err(e)) = recorded {
            tracing::warn!(error = %e, "the build is not in the history");
        }
        Ok(())
    }

    async fn solve(
        self: Arc<Self>,
        submit: SubmitBuild,
        client: &str,
        events: tokio::sync::mpsc::UnboundedSender<BuildEvent>,
        cancel: CancellationToken,
    ) {
        let fail = |failed: BuildFailed| {
            let _ = events.send(BuildEvent::Failed(Box::new(failed)));
        };
        // A failure of `kind`: the error, its sources its causes.
        let failed =
            |kind, e: &(dyn std::error::Error + 'static)| BuildFailed::new(kind, Failed::of(e));
        let begun = Instant::now();
        // Held for the whole build, every blob of its tree: workers fetch
        // them from here.
        let _context_lease = match self.uploads.hold(submit.context).await {
            Ok(lease) => lease,
            Err(e) => return fail(failed(FailureKind::Request, &e)),
        };
        self.await_known_workers().await;
        tracing::debug!(elapsed = ?begun.elapsed(), "workers known");
        // Each stage that runs steps needs a live worker that runs its
        // platform; with none, the build is refused now rather than left
        // waiting for one.
        let runnable: Vec<Platform> = {
            let workers = self.roster.lock();
            let mut all: Vec<Platform> = workers
                .iter()
                .filter(|(_, w)| w.alive())
                .flat_map(|(_, w)| w.spec().platforms.iter().cloned())
                .collect();
            all.sort();
            all.dedup();
            all
        };
        let grants = self.desk.grants();
        let engine = strata_worker::Engine {
            grants: &grants,
            runnable: &runnable,
            runs_on: "the cluster's live workers",
            index: Arc::clone(&self.index) as Arc<dyn strata_cache::CacheIndex>,
            flights: &self.flights,
        };
        if let Err(e) = engine.admit(&submit.inputs.allow) {
            return fail(failed(FailureKind::Request, &e));
        }
        let id = self.next_build.fetch_add(1, Ordering::Relaxed);
        let inputs = submit.inputs.clone();
        let resolver = BaseImages::new(
            &self.node.images,
            Some(&self.registry),
            submit.pull,
            &crate::plan::Quiet,
        );
        // Each pass records what it resolved afresh: the last pass's
        // images are the ones workers get.
        let planned = engine
            .plan(&resolver, || {
                let recording = crate::plan::Recording {
                    inner: &resolver,
                    seen: Mutex::default(),
                };
                let plan = inputs.plan(&recording)?;
                let wire = recording.wire()?;
                Ok::<_, crate::error::PlanningError>((plan, wire))
            })
            .await;
        let (plan, bases) = match planned {
            Ok(p) => p,
            Err(e) => return fail(failed(FailureKind::Request, &e)),
        };
        // Held for the whole build: workers fetch their layers from here.
        let _bases_lease = self.uploads.hold_bases(&bases, &resolver.pulled());
        let source_date_epoch = match submit.inputs.source_date_epoch() {
            Ok(e) => e,
            Err(e) => return fail(failed(FailureKind::Request, &e)),
        };
        let plan = Arc::new(plan);
        let spec = Arc::new(BuildSpec {
            id,
            build_id: submit.build_id.clone(),
            inputs: submit.inputs.clone(),
            bases,
            context: submit.context,
            secrets: submit.secrets,
            plan: crate::plan::digest(&plan),
        });
        let placement = Arc::new(Placement::new(
            Arc::clone(&self.roster),
            Arc::clone(&self.replicas),
            Arc::clone(&self.selections),
            Arc::clone(&spec),
            Arc::clone(&plan),
            cancel.clone(),
        ));
        let progress_tx = events.clone();
        let opts = SolveOptions {
            no_cache: submit.no_cache,
            no_cache_stages: submit.no_cache_stages.clone(),
            // Worker slots bound how much runs at once.
            jobs: 1024,
            slots: None,
            cancel,
            progress: Arc::new(move |e: Event| {
                let _ = progress_tx.send(BuildEvent::Progress(e));
            }),
            source_date_epoch,
        };
        tracing::debug!(build = id, elapsed = ?begun.elapsed(), "planned");
        let solved = engine
            .solve(
                &plan,
                Arc::clone(&placement) as Arc<dyn strata_solver::Worker>,
                opts,
            )
            .await;
        placement.end().await;
        tracing::debug!(build = id, elapsed = ?begun.elapsed(), "solved");
        match solved {
            Ok(solved) => {
                let target = &solved.stages[plan.target];
                // The bytes a client storing the image writes, so the
                // image has one ID wherever it is.
                let config_json = target.config.to_json();
                // A build with SOURCE_DATE_EPOCH is named once its client
                // has rewritten its times: its layers here are not its
                // image's.
                let tagged = if source_date_epoch.is_none() {
                    match self
                        .names
                        .name_image(&submit.tags, &config_json, &target.layers)
                        .await
                    {
                        Ok(t) => t,
                        Err(e) => return fail(failed(FailureKind::Cluster, &e)),
                    }
                } else {
                    Vec::new()
                };
                let holders: Vec<(Digest, Vec<Holder>)> = target
                    .layers
                    .iter()
                    .map(|l: &LayerRef| (l.blob, self.roster.holders(&l.blob, None)))
                    .collect();
                self.grant_reads(client, &holders).await;
                tracing::debug!(build = id, elapsed = ?begun.elapsed(), "reads granted");
                let _ = events.send(BuildEvent::Done(Box::new(BuildDone {
                    config_json,
                    layers: target.layers.clone(),
                    image_layers: plan.image_layers(plan.target),
                    holders,
                    steps: solved.steps,
                    tagged,
                })));
            }
            Err(e) => fail(BuildFailed::of_solve(&e, &submit.inputs.dockerfile_name)),
        }
    }
}

#[async_trait::async_trait]
impl crate::distribution::Images for Coordinator {
    fn catalog(&self) -> Result<crate::distribution::Catalog, ImageError> {
        self.names.catalog()
    }

    /// Opens `layer` from this coordinator's store, fetching it (verified)
    /// from a worker that holds it first if it is not there.
    async fn open_layer(&self, layer: &LayerRef) -> Result<crate::distribution::Layer, LayerError> {
        // Held until the file is open: from then on eviction cannot take
        // the bytes from under the reader.
        let mut lease = self.node.content.lease();
        lease.hold(layer.blob);
        let holders = self.roster.holders(&layer.blob, Some(&self.name));
        let needed = [(*layer, holders)];
        if let Err(e) = self.peers.ensure(&self.node.content, &needed).await {
            if !e.lacking.is_empty() {
                drop(self.desk.check_lacking(e.lacking.clone()).await);
            }
            return Err(LayerError::Fetch {
                diff_id: layer.diff_id,
                source: e,
            });
        }
        if let Err(e) = self.node.content.touch(&layer.blob) {
            tracing::debug!(blob = %layer.blob, error = %e, "cannot mark the layer used");
        }
        let stored = self
            .node
            .content
            .stored(&layer.blob)
            .map_err(|source| LayerError::Store {
                diff_id: layer.diff_id,
                source,
            })?;
        let bytes: crate::distribution::Layer = match stored {
            Some((_, strata_cas::Stored::Inline(bytes))) => Box::new(std::io::Cursor::new(bytes)),
            Some((_, strata_cas::Stored::File(path))) => Box::new(
                tokio::fs::File::open(&path)
                    .await
                    .map_err(|source| LayerError::Open { path, source })?,
            ),
            None => return Err(LayerError::Gone(layer.diff_id)),
        };
        drop(lease);
        Ok(bytes)
    }
}

/// How often the dashboard's view of the cluster (workers, cache entries)
/// is read again: reading it scans the cache index.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// A coordinator is ready once it knows a leader of the replicated index:
/// before that, no lookup or write can be answered.
pub(crate) struct CoordinatorHealth {
    pub(crate) coordinator: std::sync::Weak<Coordinator>,
    /// The last view of the cluster, and when it was read.
    pub(crate) status: Mutex<Option<(Instant, Vec<WorkerView>, usize)>>,
}

impl strata_metrics::Health for CoordinatorHealth {
    fn ready(&self) -> Result<(), strata_metrics::NotReady> {
        let c = self
            .coordinator
            .upgrade()
            .ok_or(crate::observe::NotReady::ShuttingDown)?;
        let m = c.member.raft().metrics().borrow().clone();
        match m.current_leader {
            Some(_) => Ok(()),
            None => Err(crate::observe::NotReady::NoLeader(m.current_term).into()),
        }
    }

    fn refresh(&self) {
        if let Some(c) = self.coordinator.upgrade() {
            crate::observe::store_bytes(&c.node);
        }
    }

    fn dashboard(&self) -> Option<serde_json::Value> {
        let c = self.coordinator.upgrade()?;
        let (workers, entries) = {
            let mut cached = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            match &*cached {
                Some((at, workers, entries)) if at.elapsed() < STATUS_EVERY => {
                    (workers.clone(), *entries)
                }
                _ => {
                    let s = c.status();
                    let workers: Vec<WorkerView> = s
                        .workers
                        .iter()
                        .map(|w| WorkerView {
                            name: w.name.clone(),
                            address: w.addr.to_string(),
                            state: if !w.alive {
                                "gone"
                            } else if w.cordoned {
                                "cordoned"
                            } else {
                                "up"
                            },
                            slots: w.slots,
                            running: w.running,
                            blobs: w.blobs,
                        })
                        .collect();
                    *cached = Some((Instant::now(), workers.clone(), s.cache_entries));
                    (workers, s.cache_entries)
                }
            }
        };
        let about = NodeView {
            name: c.name.clone(),
            role: "coordinator",
            version: env!("CARGO_PKG_VERSION"),
        };
        serde_json::to_value(Dashboard::of(&c.node, about, workers, entries)).ok()
    }
}
