//! Build contexts clients upload to a coordinator: which trees it holds
//! whole, which it keeps for the builds about to use them, the files
//! still arriving, the bounds of its store, and what each client may
//! upload in an hour.
//!
//! A build may start while its context's files are still on their way:
//! a client uploads the tree's directories, submits the build, and sends
//! the files beside it. The blobs the coordinator answered as missing are
//! *expected*; a worker fetching one gets it as soon as it lands, so the
//! worker's fetch overlaps the client's upload instead of following it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use strata_cas::{Digest, Lease};
use strata_net::{Connection, read_blob_header, recv_announced, write_frame};
use strata_worker::Node;

use crate::access::UploadQuota;
use crate::context::{Closure, ContextError, Pins};
use crate::protocol::{Failed, Refusal, Reply};

/// Closures of build contexts a coordinator remembers at most (a few
/// MiB each at 30,000 files).
const MAX_TREES: usize = 16;

/// How long a blob answered as missing stays expected: a build may use
/// it, and a worker fetching it waits for it, until then at most.
pub(crate) const EXPECTED_FOR: Duration = Duration::from_secs(600);

/// A worker waits for an expected blob only while the connection it was
/// asked of is sending something, or has within this long.
pub(crate) const ARRIVAL_STALL: Duration = Duration::from_secs(10);

/// Blobs expected at most; past that, the oldest expectations go.
const MAX_EXPECTED: usize = 1 << 20;

/// The connection asked for blob `d` within [`EXPECTED_FOR`] of `now`.
fn asked_of(
    expected: &HashMap<Digest, (tokio::time::Instant, Uploader)>,
    d: &Digest,
    now: tokio::time::Instant,
) -> Option<Uploader> {
    expected
        .get(d)
        .filter(|(at, _)| now.duration_since(*at) < EXPECTED_FOR)
        .map(|(_, from)| *from)
}

/// Why a build's context cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// Blobs of its tree are not here.
    #[error("build context {root} was not uploaded whole ({absent} of its blobs are missing)")]
    NotWhole {
        /// Its root.
        root: Digest,
        /// Blobs missing.
        absent: usize,
    },
    /// Its tree could not be read.
    #[error("build context")]
    Tree(#[source] ContextError),
    /// Reading it stopped.
    #[error("reading the build context stopped")]
    Stopped(#[source] tokio::task::JoinError),
}

/// A coordinator's uploaded build contexts.
pub(crate) struct Uploads {
    node: Arc<Node>,
    /// Closures of build contexts found whole, by root, each with the
    /// store's count of removals when it was: a context built again is
    /// not walked again, nor looked up again while nothing was removed.
    trees: Mutex<HashMap<Digest, (Arc<Closure>, u64)>>,
    /// Contexts a build is about to use.
    pins: Mutex<Pins>,
    /// What each client uploaded in the last hour.
    quota: Mutex<UploadQuota>,
    /// Bounds of the store.
    keep: strata_sched::Keep,
    /// Blobs answered as missing and not landed yet, each with when, and
    /// the connection that was asked for it.
    expected: Mutex<HashMap<Digest, (tokio::time::Instant, Uploader)>>,
    /// Connections asked for blobs: uploads each is sending now, and when
    /// it was last asked for some or one of its uploads ended. A
    /// connection that closes is forgotten.
    uploaders: Mutex<HashMap<Uploader, (usize, tokio::time::Instant)>>,
    /// Bumped as uploads end and connections go: wakes the waiters.
    landed: tokio::sync::watch::Sender<()>,
}

/// A client's connection, as it uploads (quinn's id for it).
pub(crate) type Uploader = usize;

/// Counts an upload being received on a connection for as long as it
/// lives, and wakes the blobs' waiters when it ends.
struct Receiving<'a>(&'a Uploads, Uploader);

impl<'a> Receiving<'a> {
    fn new(uploads: &'a Uploads, from: Uploader) -> Receiving<'a> {
        let now = tokio::time::Instant::now();
        uploads
            .uploaders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(from)
            .or_insert((0, now))
            .0 += 1;
        Receiving(uploads, from)
    }
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        let now = tokio::time::Instant::now();
        if let Some(u) = self
            .0
            .uploaders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&self.1)
        {
            *u = (u.0.saturating_sub(1), now);
        }
        self.0.landed.send_replace(());
    }
}

impl Uploads {
    pub(crate) fn new(node: Arc<Node>, keep: strata_sched::Keep, bytes_per_hour: u64) -> Uploads {
        Uploads {
            node,
            trees: Mutex::default(),
            pins: Mutex::default(),
            quota: Mutex::new(UploadQuota::new(bytes_per_hour)),
            keep,
            expected: Mutex::default(),
            uploaders: Mutex::default(),
            landed: tokio::sync::watch::Sender::new(()),
        }
    }

    /// Notes that the client on connection `from` was told it should
    /// upload `blobs`.
    fn expect(&self, blobs: &[Digest], from: Uploader, now: tokio::time::Instant) {
        if blobs.is_empty() {
            return;
        }
        {
            let mut uploaders = self
                .uploaders
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if uploaders.len() >= MAX_EXPECTED {
                uploaders.retain(|_, (n, at)| *n > 0 || now.duration_since(*at) < EXPECTED_FOR);
            }
            let u = uploaders.entry(from).or_insert((0, now));
            u.1 = now;
        }
        let mut expected = self.expected.lock().unwrap_or_else(PoisonError::into_inner);
        if expected.len() + blobs.len() > MAX_EXPECTED {
            expected.retain(|_, (at, _)| now.duration_since(*at) < EXPECTED_FOR);
            if expected.len() + blobs.len() > MAX_EXPECTED {
                // Bounded as the trees are: a build whose expectation went
                // fails as a context not uploaded whole, and is built again.
                expected.clear();
            }
        }
        for d in blobs {
            expected.insert(*d, (now, from));
        }
    }

    /// The client on connection `from` is gone: nothing it was asked for
    /// is waited for any more.
    pub(crate) fn gone(&self, from: Uploader) {
        let known = self
            .uploaders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&from);
        if known.is_some() {
            self.landed.send_replace(());
        }
    }

    /// Whether blob `d`, not here, is worth waiting for at `now`: a
    /// client was told to upload it, and that client's connection is
    /// still there and sending, or was within [`ARRIVAL_STALL`]. Another
    /// client's uploads never keep a wait going.
    fn arriving(&self, d: &Digest, now: tokio::time::Instant) -> bool {
        let asked = asked_of(
            &self.expected.lock().unwrap_or_else(PoisonError::into_inner),
            d,
            now,
        );
        asked.is_some_and(|from| {
            self.uploaders
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&from)
                .is_some_and(|(n, at)| *n > 0 || now.duration_since(*at) < ARRIVAL_STALL)
        })
    }

    /// Blobs that landed are no longer expected. Returns how many were.
    fn landed(&self, blobs: impl IntoIterator<Item = Digest>) -> usize {
        let mut expected = self.expected.lock().unwrap_or_else(PoisonError::into_inner);
        blobs
            .into_iter()
            .filter(|d| expected.remove(d).is_some())
            .count()
    }

    /// Sends `blobs` to a worker on `send` in one batch (as
    /// [`strata_net::send_batch`]), each as soon as it is here: one a
    /// client is still uploading is sent once it lands, one no longer
    /// [`arriving`](Self::arriving) is sent as missing. Returns the bytes
    /// sent.
    pub(crate) async fn send_arriving(
        &self,
        send: &mut quinn::SendStream,
        blobs: &[Digest],
        peer: std::net::SocketAddr,
    ) -> Result<u64, strata_net::Error> {
        let cas = &self.node.content;
        let mut landings = self.landed.subscribe();
        let mut left: Vec<Digest> = blobs.to_vec();
        let mut sent = 0u64;
        loop {
            landings.borrow_and_update();
            // Looked up in one batch; should the lookup fail, each is
            // sent as the store then says (missing, if it is).
            let lacking: HashSet<Digest> =
                cas.absent(&left).unwrap_or_default().into_iter().collect();
            let (absent, here): (Vec<Digest>, Vec<Digest>) =
                left.iter().partition(|d| lacking.contains(d));
            let now = tokio::time::Instant::now();
            let (waiting, gone): (Vec<Digest>, Vec<Digest>) =
                absent.into_iter().partition(|d| self.arriving(d, now));
            let ready: Vec<(Digest, strata_net::BatchSource<'_>)> = here
                .iter()
                .chain(&gone)
                .map(|d| (*d, strata_net::BatchSource::Store(cas)))
                .collect();
            if !ready.is_empty() {
                sent += strata_net::send_batch_part(send, &ready, peer).await?;
            }
            if waiting.is_empty() {
                strata_net::end_batch(send, peer).await?;
                return Ok(sent);
            }
            left = waiting;
            Self::next_landing(&mut landings).await;
        }
    }

    /// Waits until blob `d` is here, or no longer
    /// [`arriving`](Self::arriving): a worker fetching a large file of a
    /// context gets it once the client's upload of it lands.
    pub(crate) async fn arrived(&self, d: &Digest) {
        let mut landings = self.landed.subscribe();
        loop {
            landings.borrow_and_update();
            if self.node.content.contains(d).unwrap_or(false)
                || !self.arriving(d, tokio::time::Instant::now())
            {
                return;
            }
            Self::next_landing(&mut landings).await;
        }
    }

    /// Woken as an upload ends; woken after a stall either way, when
    /// waiting may have stopped being worth it.
    async fn next_landing(landings: &mut tokio::sync::watch::Receiver<()>) {
        let _ = tokio::time::timeout(ARRIVAL_STALL, landings.changed()).await;
    }

    /// Keeps the store within its bounds, every [`strata_worker::EVICT_EVERY`]
    /// ([`Uploads::evict_once`]).
    pub(crate) async fn evict_forever(self: Arc<Self>) {
        let mut pace = strata_sched::evict::Pace::default();
        loop {
            tokio::time::sleep(strata_worker::EVICT_EVERY).await;
            // Read before the store is listed: a blob added meanwhile
            // makes the next round look again.
            let (changes, now) = (self.node.content.changes(), strata_cas::now_unix());
            if !pace.due(changes, now, &self.keep) {
                continue;
            }
            let me = Arc::clone(&self);
            let pinned = self
                .pins
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pinned(Instant::now());
            let evicted = tokio::task::spawn_blocking(move || me.evict_once(&pinned, now)).await;
            if let Ok(Ok(r)) = &evicted {
                pace.checked(changes, now, r.stored, &self.keep);
            }
            match evicted {
                Ok(Ok(report)) if report.blobs > 0 => tracing::info!(
                    blobs = report.blobs,
                    bytes = report.bytes,
                    "evicted contexts and base images to stay within keep_storage / keep_duration"
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot evict from the coordinator's store")
                }
                Err(e) => tracing::warn!(error = %e, "eviction stopped"),
            }
        }
    }

    /// One round of keeping the store within its bounds at `now`: the
    /// least recently used uploaded contexts go, never one a build holds
    /// or a client is about to build from (`pinned`); base images this
    /// coordinator pulled to plan builds are a cache too
    /// ([`strata_worker::PULLED_LABEL`]): one unused for `keep_duration`, or the least
    /// recently used while the store stays over `keep_storage` with every
    /// other candidate gone, loses its names and then its blobs. Never
    /// one a running build holds ([`Uploads::hold_bases`]); images an
    /// operator imported or pulled by hand stay.
    pub(crate) fn evict_once(
        &self,
        pinned: &HashSet<Digest>,
        now: u64,
    ) -> Result<strata_worker::EvictReport, strata_worker::GcError> {
        // A pinned context keeps every blob its tree names.
        let mut keep = HashSet::new();
        for root in pinned {
            keep.insert(*root);
            match crate::context::closure(&self.node.content, root) {
                Ok(c) => keep.extend(c.all().copied()),
                Err(e) => {
                    tracing::warn!(context = %root, error = %e, "cannot read a pinned context's tree")
                }
            }
        }
        let (mut total, mut candidates) = strata_worker::candidates(&self.node, now)?;
        candidates.retain(|c| !keep.contains(&c.blob));
        if self.retire_bases(total, &candidates, now)? > 0 {
            (total, candidates) = strata_worker::candidates(&self.node, now)?;
            candidates.retain(|c| !keep.contains(&c.blob));
        }
        let victims = strata_sched::evict::choose(total, &candidates, &self.keep, now, &|_| false);
        strata_worker::evict(&self.node, &victims).map(|report| strata_worker::EvictReport {
            stored: total,
            ..report
        })
    }

    /// Takes the names off the base images [`strata_sched::evict::retire`]
    /// picks among those this coordinator pulled and no build holds; their
    /// blobs become candidates. Returns how many went.
    fn retire_bases(
        &self,
        total: u64,
        candidates: &[strata_sched::Candidate],
        now: u64,
    ) -> Result<usize, strata_worker::GcError> {
        let cas = &self.node.content;
        let leased = cas.leased();
        let mut images: HashMap<Digest, (Vec<strata_oci::Reference>, strata_oci::Image)> =
            HashMap::new();
        for t in self.node.images.list()? {
            images
                .entry(t.image.manifest_blob)
                .or_insert_with(|| (Vec::new(), t.image.clone()))
                .0
                .push(t.reference);
        }
        // How many images keep each blob.
        let mut keepers: HashMap<Digest, usize> = HashMap::new();
        for (_, image) in images.values() {
            for b in image.blobs() {
                *keepers.entry(b).or_default() += 1;
            }
        }
        let mut cached = Vec::new();
        let mut shapes = Vec::new();
        for (manifest, (names, image)) in &images {
            let Some(info) = cas.info(manifest)? else {
                continue;
            };
            if !info.labels.contains_key(strata_worker::PULLED_LABEL)
                || leased.contains_key(manifest)
            {
                continue;
            }
            let mut bytes = 0;
            for b in image.blobs() {
                if keepers.get(&b) == Some(&1) {
                    bytes += cas.info(&b)?.map_or(0, |i| i.size);
                }
            }
            cached.push((names, manifest));
            shapes.push(strata_sched::evict::CachedImage {
                last_used: info.last_used.max(info.created),
                bytes,
            });
        }
        let reclaimable = candidates.iter().map(|c| c.size).sum();
        let retired = strata_sched::evict::retire(&shapes, total, reclaimable, &self.keep, now);
        for &i in &retired {
            let (names, manifest) = cached[i];
            for name in names {
                self.node.images.untag(name)?;
            }
            tracing::info!(image = %manifest, names = ?names.iter().map(ToString::to_string).collect::<Vec<_>>(), "dropped a base image pulled for planning");
        }
        Ok(retired.len())
    }

    /// Holds the base images of a build while it runs (workers fetch their
    /// layers from here), marks them used, and labels those this build
    /// pulled ([`strata_worker::PULLED_LABEL`]), which the store keeps as a cache.
    pub(crate) fn hold_bases(
        &self,
        bases: &[crate::protocol::WireImage],
        pulled: &[String],
    ) -> Lease {
        let cas = &self.node.content;
        let mut lease = cas.lease();
        for w in bases {
            for l in &w.layers {
                lease.hold(l.blob);
            }
            let image = match self.node.images.get(&w.name) {
                Ok(Some(t)) => t.image,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(image = %w.name, error = %e, "cannot read a base image");
                    continue;
                }
            };
            lease.hold(image.manifest_blob);
            lease.hold(image.config_blob);
            let marked = if pulled.contains(&w.name) {
                cas.set_label(&image.manifest_blob, strata_worker::PULLED_LABEL, Some("1"))
            } else {
                Ok(())
            };
            if let Err(e) = marked.and_then(|()| cas.touch(&image.manifest_blob)) {
                tracing::warn!(image = %w.name, error = %e, "cannot mark a base image used");
            }
        }
        lease
    }

    /// Which of `blobs` of context tree `context` are not here: none,
    /// without looking, when a build found the tree whole and no blob has
    /// gone since.
    /// The client on connection `from` is then expected to send them.
    pub(crate) async fn missing(
        &self,
        context: Digest,
        blobs: Vec<Digest>,
        from: Uploader,
    ) -> Reply {
        if self.known_whole(&context) {
            return Reply::Missing(Vec::new());
        }
        let node = Arc::clone(&self.node);
        match tokio::task::spawn_blocking(move || node.content.absent(&blobs)).await {
            Ok(Ok(lacks)) => {
                self.expect(&lacks, from, tokio::time::Instant::now());
                Reply::Missing(lacks)
            }
            Ok(Err(e)) => Reply::failed("cannot look blobs up", &e),
            Err(e) => Reply::failed("looking blobs up stopped", &e),
        }
    }

    /// Whether every blob of context tree `root` is here: a build of it
    /// found it whole, and no blob was removed since.
    fn known_whole(&self, root: &Digest) -> bool {
        self.trees
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(root)
            .is_some_and(|(_, at)| *at == self.node.content.removals())
    }

    /// A client uploaded `context` or asked about it: it stays for the
    /// build the client submits next.
    pub(crate) fn pin(&self, context: Digest) {
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pin(context, Instant::now());
    }

    /// Holds every blob of context tree `root` for a build (workers fetch
    /// them from here), or says which are missing; marks it used. Its
    /// directories must all be here; a file may still be arriving (see
    /// [`Uploads::send_arriving`]).
    pub(crate) async fn hold(&self, root: Digest) -> Result<Lease, TreeError> {
        let mut context_lease = self.node.content.lease();
        context_lease.hold(root);
        let node = Arc::clone(&self.node);
        let known = self
            .trees
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&root)
            .cloned();
        let tree = tokio::task::spawn_blocking(move || {
            let (c, whole_at) = match known {
                Some((c, at)) => (c, Some(at)),
                None => (
                    Arc::new(crate::context::closure(&node.content, &root)?),
                    None,
                ),
            };
            // Held before they are counted: no blob of the tree can go
            // from here on, and one gone since it was found whole moved
            // the count.
            for d in c.all() {
                context_lease.hold(*d);
            }
            let removals = node.content.removals();
            if whole_at == Some(removals) {
                return Ok((c, Vec::new(), removals, context_lease));
            }
            let all: Vec<Digest> = c.all().copied().collect();
            let absent = node.content.absent(&all)?;
            Ok::<_, ContextError>((c, absent, removals, context_lease))
        })
        .await
        .map_err(TreeError::Stopped)?
        .map_err(TreeError::Tree)?;
        let lease = match tree {
            (c, absent, removals, lease) if absent.is_empty() => {
                // A tree's closure is fixed by its root's digest: the next
                // build of it checks only that no blob went meanwhile.
                let mut trees = self.trees.lock().unwrap_or_else(PoisonError::into_inner);
                if trees.len() >= MAX_TREES {
                    trees.clear();
                }
                trees.insert(root, (c, removals));
                lease
            }
            (c, absent, _, lease) => {
                let now = tokio::time::Instant::now();
                let expected = self.expected.lock().unwrap_or_else(PoisonError::into_inner);
                let arriving = |d: &Digest| asked_of(&expected, d, now).is_some();
                let dirs: HashSet<&Digest> = c.dirs.iter().chain(&c.absent).collect();
                // One no longer expected may have landed since it was
                // looked up: an expectation ends once its blob is stored.
                let lost = absent
                    .iter()
                    .filter(|d| dirs.contains(d) || !arriving(d))
                    .filter(|d| !self.node.content.contains(d).unwrap_or(false))
                    .count();
                if lost > 0 {
                    return Err(TreeError::NotWhole { root, absent: lost });
                }
                lease
            }
        };
        self.pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .used(&root);
        if let Err(e) = self.node.content.touch(&root) {
            tracing::debug!(context = %root, error = %e, "cannot mark the context used");
        }
        Ok(lease)
    }

    /// Receives a client's upload of blob `d`, within its hourly quota.
    /// Receives a batch of small blobs a client uploads, each counted
    /// against its quota as it is announced.
    pub(crate) async fn receive_batch(
        &self,
        conn: &Connection,
        blobs: Vec<Digest>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), strata_net::Error> {
        let client = conn.peer.name.clone();
        if blobs.len() > strata_net::MAX_BATCH {
            let _ = recv.stop(crate::access::OVER_QUOTA.into());
            let reply = Reply::over_limit("blobs in one batch", blobs.len(), strata_net::MAX_BATCH);
            return write_frame(send, &reply, conn.addr).await;
        }
        let wanted: HashSet<Digest> = blobs.into_iter().collect();
        let receiving = Receiving::new(self, conn.quic.stable_id());
        let mut reserved: Vec<u64> = Vec::new();
        let quota = &self.quota;
        let mut over_quota = None;
        let mut admit = |size: u64| {
            let r = quota
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .reserve(&client, size, Instant::now());
            match r {
                Ok(()) => {
                    reserved.push(size);
                    Ok(())
                }
                Err(over) => {
                    let said = over.to_string();
                    over_quota = Some(over);
                    Err(said)
                }
            }
        };
        let got = strata_net::recv_batch(
            recv,
            &self.node.content,
            &wanted,
            conn.addr,
            Some((crate::context::CONTEXT_LABEL, "1")),
            &mut admit,
        )
        .await;
        let reply = match got {
            Ok(got) => {
                strata_metrics::transferred(strata_metrics::Transfer::Uploaded, got.bytes);
                self.landed(got.stored);
                drop(receiving);
                Reply::Ok
            }
            Err(e) => {
                strata_metrics::request_error(e.kind());
                let mut quota = self.quota.lock().unwrap_or_else(PoisonError::into_inner);
                for size in reserved {
                    quota.refund(&client, size);
                }
                drop(quota);
                tracing::warn!(client = %conn.peer.name, error = %e, "a batch upload failed");
                if matches!(e, strata_net::Error::Refused { .. }) {
                    let _ = recv.stop(crate::access::OVER_QUOTA.into());
                }
                match over_quota {
                    Some(over) => Reply::Refused(Refusal::OverQuota(over)),
                    None => Refusal::of_transfer(&e)
                        .map_or_else(|| Reply::Failed(Failed::of(&e)), Reply::Refused),
                }
            }
        };
        write_frame(send, &reply, conn.addr).await
    }

    pub(crate) async fn receive_upload(
        &self,
        conn: &Connection,
        d: Digest,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), strata_net::Error> {
        let client = &conn.peer.name;
        let reply = match read_blob_header(recv, &d, conn.addr).await? {
            None => Reply::Failed(Failed::new(format!("blob {d} did not come"))),
            Some(announced) => {
                let reserved = self
                    .quota
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .reserve(client, announced.size, Instant::now());
                match reserved {
                    Err(over) => {
                        tracing::warn!(%client, blob = %d, error = %over, "upload refused");
                        // Reading no further stops the sender.
                        let _ = recv.stop(crate::access::OVER_QUOTA.into());
                        Reply::Refused(Refusal::OverQuota(over))
                    }
                    Ok(()) => {
                        let receiving = Receiving::new(self, conn.quic.stable_id());
                        let got = recv_announced(
                            recv,
                            &self.node.content,
                            &d,
                            conn.addr,
                            announced,
                            None,
                        )
                        .await;
                        match &got {
                            Ok(n) => {
                                strata_metrics::transferred(strata_metrics::Transfer::Uploaded, *n)
                            }
                            Err(e) => strata_metrics::request_error(e.kind()),
                        }
                        if got.is_err() {
                            self.quota
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .refund(client, announced.size);
                        }
                        // A blob that is not what it was named is a lie
                        // (or a file that changed while it was sent): the
                        // connection goes with it.
                        got?;
                        // A file of a context (not a layer an admin
                        // imports): it was asked for by a `Missing`.
                        if self.landed([d]) > 0
                            && let Err(e) = self.node.content.set_label(
                                &d,
                                crate::context::CONTEXT_LABEL,
                                Some("1"),
                            )
                        {
                            tracing::warn!(blob = %d, error = %e, "cannot mark a context blob");
                        }
                        drop(receiving);
                        Reply::Ok
                    }
                }
            }
        };
        write_frame(send, &reply, conn.addr).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_dockerfile::IgnoreMatcher;

    /// A coordinator's uploads, and a context of two files whose
    /// directories (only) it holds, as a client's `upload_tree` leaves it.
    fn setup() -> (tempfile::TempDir, Uploads, crate::context::Hashed) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(ctx.join("src")).unwrap();
        std::fs::write(ctx.join("src/a.txt"), "alpha").unwrap();
        std::fs::write(ctx.join("b.txt"), "beta").unwrap();
        let tree = crate::context::hash(
            &ctx,
            &IgnoreMatcher::default(),
            &mut crate::context::StatCache::default(),
        )
        .unwrap();
        let node = Arc::new(Node::open(&dir.path().join("home")).unwrap());
        for (_, bytes) in &tree.dirs {
            node.content.put(bytes).unwrap();
        }
        let uploads = Uploads::new(node, strata_sched::Keep::default(), u64::MAX);
        (dir, uploads, tree)
    }

    fn file_blob(tree: &crate::context::Hashed, content: &[u8]) -> Digest {
        let d = Digest::of(content);
        assert!(tree.files.contains_key(&d));
        d
    }

    /// An image of one layer of `bytes` random-ish bytes, named `name`.
    fn image(node: &Node, name: &str, bytes: usize, seed: u8) -> crate::protocol::WireImage {
        let data: Vec<u8> = (0..bytes).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let blob = node.content.put(&data).unwrap();
        let layer = strata_oci::LayerRef {
            blob,
            diff_id: strata_cas::Sha256::of(&data),
            size: data.len() as u64,
        };
        let config = strata_oci::ImageConfig::scratch("linux", "amd64", None);
        let image = node.images.create(&config, &[layer]).unwrap();
        node.images.tag(&name.parse().unwrap(), &image).unwrap();
        crate::protocol::WireImage {
            name: name.to_string(),
            reference: name.to_string(),
            manifest: image.manifest_digest,
            config_json: Vec::new(),
            layers: vec![layer],
        }
    }

    #[test]
    fn base_images_pulled_for_planning_are_a_cache_and_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let node = Arc::new(Node::open(&dir.path().join("home")).unwrap());
        let keep = strata_sched::Keep {
            storage: Some(1 << 20),
            duration: None,
        };
        let uploads = Uploads::new(Arc::clone(&node), keep, u64::MAX);
        let pulled = image(&node, "pulled:1", 1 << 20, 3);
        let imported = image(&node, "imported:1", 1 << 20, 5);
        // A build used both, and pulled the first.
        drop(uploads.hold_bases(&[pulled.clone(), imported.clone()], &["pulled:1".into()]));
        // `du` counts the pulled one as reclaimable, the imported one not.
        let reclaimable = strata_worker::usage(&node).unwrap().reclaimable;
        assert!(
            ((1 << 20)..(2 << 20)).contains(&reclaimable),
            "{reclaimable}"
        );
        let later = strata_cas::now_unix() + 3600;
        let gone =
            |w: &crate::protocol::WireImage| !node.content.contains(&w.layers[0].blob).unwrap();

        // Held by a running build: both stay, over budget as the store is.
        let held = uploads.hold_bases(std::slice::from_ref(&pulled), &[]);
        uploads.evict_once(&HashSet::new(), later).unwrap();
        assert!(node.images.get("pulled:1").unwrap().is_some());
        drop(held);

        // 2 MiB over a 1 MiB budget: the pulled image loses its name and
        // its blobs; the imported one stays.
        let report = uploads.evict_once(&HashSet::new(), later).unwrap();
        assert!(node.images.get("pulled:1").unwrap().is_none());
        assert!(gone(&pulled), "{report:?}");
        assert!(node.images.get("imported:1").unwrap().is_some());
        assert!(!gone(&imported));
    }

    #[tokio::test]
    async fn a_build_may_start_on_files_a_client_was_told_to_send_and_on_no_others() {
        let (_dir, uploads, tree) = setup();
        // Files no client was asked for: the context is not whole.
        match uploads.hold(tree.root).await {
            Err(TreeError::NotWhole { absent, .. }) => assert_eq!(absent, 2),
            other => panic!("held a context missing its files: {:?}", other.map(drop)),
        }
        // Asked which blobs it lacks, the coordinator expects the files.
        match uploads.missing(tree.root, tree.blobs(), 1).await {
            Reply::Missing(lacks) => assert_eq!(lacks.len(), 2),
            other => panic!("{other:?}"),
        }
        uploads.hold(tree.root).await.unwrap();
        // A directory is never waited for: it must be here.
        let sub = tree.dirs[0].0;
        assert_ne!(sub, tree.root);
        assert!(uploads.node.content.delete(&sub).unwrap());
        uploads.expect(&[sub], 1, tokio::time::Instant::now());
        assert!(matches!(
            uploads.hold(tree.root).await,
            Err(TreeError::NotWhole { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_waits_for_an_expected_file_while_its_client_sends_and_no_longer() {
        let (_dir, uploads, tree) = setup();
        let (a, b) = (file_blob(&tree, b"alpha"), file_blob(&tree, b"beta"));
        let (client, other) = (1, 2);
        let Reply::Missing(_) = uploads.missing(tree.root, tree.blobs(), client).await else {
            panic!("no answer")
        };

        // While the client sends, the fetch of `a` waits; it ends as `a`
        // lands.
        let receiving = Receiving::new(&uploads, client);
        let waiting = uploads.arrived(&a);
        tokio::pin!(waiting);
        tokio::time::sleep(ARRIVAL_STALL * 3).await;
        assert!(futures_util::poll!(&mut waiting).is_pending());
        uploads.node.content.put(b"alpha").unwrap();
        uploads.landed([a]);
        drop(receiving);
        waiting.await;

        // `b` never comes, though another client keeps sending: once the
        // client it was asked of has sent nothing for ARRIVAL_STALL, the
        // wait ends (and the worker is told it is missing).
        let _busy = Receiving::new(&uploads, other);
        let begun = tokio::time::Instant::now();
        uploads.arrived(&b).await;
        assert!(begun.elapsed() >= ARRIVAL_STALL - Duration::from_millis(1));
        assert!(!uploads.node.content.contains(&b).unwrap());

        // A client that goes ends the wait for what it was asked at once.
        let Reply::Missing(_) = uploads.missing(tree.root, tree.blobs(), client).await else {
            panic!("no answer")
        };
        let _sending = Receiving::new(&uploads, client);
        let waiting = uploads.arrived(&b);
        tokio::pin!(waiting);
        assert!(futures_util::poll!(&mut waiting).is_pending());
        let begun = tokio::time::Instant::now();
        uploads.gone(client);
        waiting.await;
        assert_eq!(begun.elapsed(), Duration::ZERO);

        // A blob no client was told to send is not waited for at all.
        let begun = tokio::time::Instant::now();
        uploads.arrived(&Digest::of(b"nobody sends this")).await;
        assert_eq!(begun.elapsed(), Duration::ZERO);
    }
}
