//! Copies of built layers: a step's result enters the cache index only
//! once `replication` workers hold its layer, and the leader of the group
//! copies again, at a bounded rate, the layers a lost worker left short.
//! Where blobs are is replicated state (`strata_raft`); whether a worker
//! is alive is each coordinator's own view of its connections.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use strata_cas::Digest;
use strata_raft::CommandV1;
use tokio::sync::mpsc;

use crate::coordinator::Coordinator;
use crate::protocol::{CopyBlob, Holder, Reply, Request};

/// How often the leader looks for layers short of copies when nothing
/// wakes it sooner.
const REPAIR_EVERY: Duration = Duration::from_secs(2);

/// Commands about workers waiting to be written to the group, in order: a
/// worker's `Forget` and its `Registered` when it comes back must not
/// swap, nor its `Registered` and the `Located` of a heartbeat after it.
pub(crate) struct Records {
    tx: mpsc::UnboundedSender<CommandV1>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<CommandV1>>>,
}

impl Default for Records {
    fn default() -> Records {
        let (tx, rx) = mpsc::unbounded_channel();
        Records {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Records {
    /// Queues `command` behind those pushed before it.
    pub(crate) fn push(&self, command: CommandV1) {
        // The receiver lives as long as the coordinator runs.
        let _ = self.tx.send(command);
    }
}

/// A layer of a cached result and the live workers holding it.
pub(crate) struct Short {
    pub blob: Digest,
    pub live: usize,
}

impl Coordinator {
    /// Copies of a layer to aim for now: `replication`, or every live
    /// worker when fewer are up.
    fn copies_wanted(&self) -> usize {
        let live = self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|w| w.alive)
            .count();
        self.replication.min(live)
    }

    /// The layers cached results made that have fewer live copies than
    /// wanted, as this coordinator sees the workers.
    pub(crate) fn under_replicated(&self) -> Result<Vec<Short>, String> {
        let want = self.copies_wanted();
        if want == 0 {
            return Ok(Vec::new());
        }
        let entries = self.member.local().entries().map_err(|e| e.to_string())?;
        let made: HashSet<Digest> = entries
            .iter()
            .filter(|(_, e)| e.made_layer)
            .filter_map(|(_, e)| e.layers.last().map(|l| l.blob))
            .collect();
        let mut short = Vec::new();
        for blob in made {
            let recorded = self.recorded_holders(&blob);
            let workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
            let live = recorded
                .iter()
                .filter(|n| workers.get(*n).is_some_and(|w| w.alive))
                .count();
            if live < want {
                short.push(Short { blob, live });
            }
        }
        Ok(short)
    }

    /// Makes sure `blob` has the wanted number of live copies on workers,
    /// asking the least loaded workers that lack it (and are not
    /// cordoned) to fetch it from its holders, no faster than
    /// `bytes_per_second` if given. Returns the copies made.
    pub(crate) async fn replicate(
        &self,
        blob: Digest,
        bytes_per_second: Option<u64>,
    ) -> Result<usize, String> {
        let lock = Arc::clone(
            self.copying
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(blob)
                .or_default(),
        );
        let made = {
            let _copying = lock.lock().await;
            self.copy_until_enough(blob, bytes_per_second).await
        };
        self.copying
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&blob);
        made
    }

    async fn copy_until_enough(
        &self,
        blob: Digest,
        bytes_per_second: Option<u64>,
    ) -> Result<usize, String> {
        let want = self.copies_wanted();
        let recorded = self.recorded_holders(&blob);
        let (mut sources, targets) = {
            let workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
            let sources: Vec<Holder> = recorded
                .iter()
                .filter_map(|n| {
                    workers.get(n).filter(|w| w.alive).map(|w| Holder {
                        name: n.clone(),
                        addr: w.addr,
                    })
                })
                .collect();
            let mut targets: Vec<_> = workers
                .iter()
                .filter(|(n, w)| w.alive && !recorded.contains(n) && !self.is_cordoned(n))
                .map(|(n, w)| (w.running * 1000 / w.slots.max(1), n.clone(), w.conn.clone()))
                .collect();
            targets.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            (sources, targets)
        };
        let mut have = sources.len();
        if have >= want {
            return Ok(0);
        }
        if self.node.content.contains(&blob).unwrap_or(false) {
            sources.push(self.holder());
        }
        if sources.is_empty() {
            return Err(format!("no live node holds blob {blob}"));
        }
        let mut made = 0;
        let mut why = Vec::new();
        for (_, name, conn) in targets {
            if have >= want {
                break;
            }
            let copy = Request::Copy(Box::new(CopyBlob {
                blob,
                holders: sources.clone(),
                bytes_per_second,
            }));
            match crate::worker::request(&conn, &copy).await {
                Ok(Reply::Ok) => {
                    self.located(&name, vec![blob]).await?;
                    tracing::debug!(%blob, worker = %name, "copied");
                    have += 1;
                    made += 1;
                }
                Ok(Reply::Error(e)) => why.push(format!("{name}: {e}")),
                Ok(other) => why.push(format!("{name} answered {other:?}")),
                Err(e) => why.push(format!("{name}: {e}")),
            }
        }
        if have < want && !why.is_empty() {
            return Err(format!(
                "blob {blob} has {have} of {want} copies: {}",
                why.join("; ")
            ));
        }
        Ok(made)
    }

    /// Writes the queued [`Records`] to the group, one after another, until
    /// the coordinator stops.
    pub(crate) async fn write_records(self: Arc<Self>) {
        let Some(mut rx) = self
            .records
            .rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        while let Some(command) = rx.recv().await {
            let worker = match &command {
                CommandV1::Registered { worker, .. }
                | CommandV1::Located { worker, .. }
                | CommandV1::Forget { worker } => worker.clone(),
                _ => String::new(),
            };
            if let Err(e) = self.member.write(command).await {
                tracing::warn!(%worker, error = %e, "cannot record a change of a worker in the group");
            }
        }
    }

    /// Queues the record that worker `name` is registered, with every blob
    /// it told this coordinator of.
    pub(crate) fn record_registration(&self, name: &str) {
        let Some((addr, blobs)) = self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .filter(|w| w.alive)
            .map(|w| (w.addr, w.blobs.iter().copied().collect::<Vec<_>>()))
        else {
            return;
        };
        self.records.push(CommandV1::Registered {
            worker: name.to_string(),
            addr: addr.to_string(),
            at: strata_cas::now_unix(),
            blobs,
        });
    }

    /// On the leader, until the coordinator stops: records live workers
    /// the group does not know (they registered while another member led,
    /// or none did), then copies the layers short of copies, one at a
    /// time and at the repair rate.
    pub(crate) async fn repair(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(REPAIR_EVERY) => {}
                () = self.repair_wanted.notified() => {}
            }
            if !self.member.is_leader() {
                continue;
            }
            let known: HashSet<String> = match self.member.local().workers() {
                Ok(w) => w.into_iter().map(|(n, _)| n).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the registered workers");
                    continue;
                }
            };
            let unrecorded: Vec<String> = self
                .workers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter(|(n, w)| w.alive && !known.contains(*n))
                .map(|(n, _)| n.clone())
                .collect();
            for name in unrecorded {
                self.record_registration(&name);
            }
            let short = match self.under_replicated() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the cached layers");
                    continue;
                }
            };
            for s in short.into_iter().filter(|s| s.live > 0) {
                if !self.member.is_leader() {
                    break;
                }
                match self.replicate(s.blob, Some(self.repair_rate)).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(blob = %s.blob, copies = n, "copied a layer a lost worker left short")
                    }
                    Err(e) => tracing::warn!(blob = %s.blob, error = %e, "cannot copy the layer"),
                }
            }
        }
    }
}
