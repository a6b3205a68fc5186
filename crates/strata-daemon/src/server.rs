//! The daemon's side of the socket.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use strata_registry::Transfer;
use strata_solver::Progress;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::wire::{
    DaemonStatus, FromDaemon, Greeting, Hello, Refusal, ToDaemon, TransferEvent, split,
};

/// Runs the commands clients send.
pub trait Handler: Send + Sync + 'static {
    /// Runs `call` (as the CLI encoded it) for a client, as a task of the
    /// daemon's runtime: work that blocks a thread (a walk of the store,
    /// an export) goes to a blocking thread of its own. Resolves to the
    /// exit code, or the error to print.
    fn call(
        &self,
        call: Vec<u8>,
        session: Session,
    ) -> BoxFuture<'_, std::result::Result<u8, String>>;
}

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The state directory (already opened, and locked, by the caller).
    pub home: PathBuf,
    /// Exit after this long without a command; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Stops the daemon (a signal): running commands are cancelled.
    pub stop: CancellationToken,
    /// Where the caller serves its metrics, for `status` to say.
    pub metrics: Option<std::net::SocketAddr>,
}

/// A command running in the daemon, as it sees its client: where its
/// output goes, the client's environment and directory, and whether the
/// client is still there. Clones are the same session.
#[derive(Clone)]
pub struct Session {
    tx: mpsc::UnboundedSender<FromDaemon>,
    cancel: CancellationToken,
    env: BTreeMap<String, String>,
    cwd: PathBuf,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("cwd", &self.cwd)
            .finish_non_exhaustive()
    }
}

/// Bytes for one of the client's output streams.
pub struct Sink {
    tx: mpsc::UnboundedSender<FromDaemon>,
    stderr: bool,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let frame = if self.stderr {
            FromDaemon::Stderr(buf.to_vec())
        } else {
            FromDaemon::Stdout(buf.to_vec())
        };
        // A client that went away cancels the command; what it would have
        // printed has nowhere to go.
        let _ = self.tx.send(frame);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct RemoteTransfer(mpsc::UnboundedSender<FromDaemon>);

impl Transfer for RemoteTransfer {
    fn start(&self, id: &str, total: Option<u64>) {
        let _ = self.0.send(FromDaemon::Transfer(TransferEvent::Start {
            id: id.to_string(),
            total,
        }));
    }

    fn advance(&self, id: &str, bytes: u64) {
        let _ = self.0.send(FromDaemon::Transfer(TransferEvent::Advance {
            id: id.to_string(),
            bytes,
        }));
    }

    fn finish(&self, id: &str, how: &str) {
        let _ = self.0.send(FromDaemon::Transfer(TransferEvent::Finish {
            id: id.to_string(),
            how: how.to_string(),
        }));
    }
}

impl Session {
    /// The client's standard output.
    pub fn stdout(&self) -> Sink {
        Sink {
            tx: self.tx.clone(),
            stderr: false,
        }
    }

    /// The client's standard error.
    pub fn stderr(&self) -> Sink {
        Sink {
            tx: self.tx.clone(),
            stderr: true,
        }
    }

    /// Where build progress goes: the client draws it.
    pub fn progress(&self) -> Progress {
        let tx = self.tx.clone();
        Arc::new(move |e| {
            let _ = tx.send(FromDaemon::Progress(e));
        })
    }

    /// Where registry transfers report: the client draws them.
    pub fn transfer(&self) -> Arc<dyn Transfer> {
        Arc::new(RemoteTransfer(self.tx.clone()))
    }

    /// Ends the client's progress display.
    pub fn progress_done(&self) {
        let _ = self.tx.send(FromDaemon::ProgressDone);
    }

    /// Cancelled when the client goes away (Ctrl-C) or the daemon stops.
    pub fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }

    /// A variable of the client's environment.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    /// `path` as the client means it: relative to its working directory.
    pub fn path(&self, path: &Path) -> PathBuf {
        self.cwd.join(path)
    }
}

struct State {
    home: PathBuf,
    started: Instant,
    idle_timeout: Option<Duration>,
    metrics: Option<std::net::SocketAddr>,
    running: AtomicUsize,
    served: AtomicU64,
    last_activity: Mutex<Instant>,
    /// A client of another version came: exit once idle.
    retiring: AtomicBool,
    stop: CancellationToken,
    uid: u32,
}

impl State {
    fn touch(&self) {
        *self
            .last_activity
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    fn status(&self) -> DaemonStatus {
        DaemonStatus {
            pid: std::process::id(),
            version: crate::version(),
            home: self.home.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
            running: self.running.load(Ordering::SeqCst),
            served: self.served.load(Ordering::SeqCst),
            idle_timeout_seconds: self.idle_timeout.map_or(0, |d| d.as_secs()),
            metrics: self.metrics,
        }
    }
}

/// Serves `opts.home` until stopped, idle for too long, or replaced by
/// another version: binds `daemon.sock` (a stale one is removed: the
/// caller holds the state directory's lock, so no other daemon uses it),
/// records the pid, and runs each client's command on `handler`.
pub async fn serve(opts: Options, handler: Arc<dyn Handler>) -> Result<()> {
    let socket = crate::socket_path(&opts.home);
    match std::fs::remove_file(&socket) {
        Ok(()) => tracing::info!(socket = %socket.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Io {
                what: "cannot remove the stale socket",
                path: socket,
                source,
            });
        }
    }
    let listener = UnixListener::bind(&socket).map_err(|source| Error::Io {
        what: "cannot listen on",
        path: socket.clone(),
        source,
    })?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(
        |source| Error::Io {
            what: "cannot restrict",
            path: socket.clone(),
            source,
        },
    )?;
    let pid_file = crate::pid_path(&opts.home);
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).map_err(|source| Error::Io {
        what: "cannot write",
        path: pid_file.clone(),
        source,
    })?;
    let state = Arc::new(State {
        home: opts.home.clone(),
        started: Instant::now(),
        idle_timeout: opts.idle_timeout,
        metrics: opts.metrics,
        running: AtomicUsize::new(0),
        served: AtomicU64::new(0),
        last_activity: Mutex::new(Instant::now()),
        retiring: AtomicBool::new(false),
        stop: opts.stop.clone(),
        uid: nix::unistd::geteuid().as_raw(),
    });
    tracing::info!(home = %opts.home.display(), pid = std::process::id(), version = %crate::version(), "strata daemon serving");
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, _)) => {
                        let (state, handler) = (Arc::clone(&state), Arc::clone(&handler));
                        tokio::spawn(async move {
                            if let Err(e) = connection(stream, &state, handler).await {
                                tracing::debug!(error = %e, "a client connection ended badly");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot accept a client"),
                }
            }
            _ = tick.tick() => {
                let idle = state.running.load(Ordering::SeqCst) == 0;
                let quiet_for = state.last_activity.lock().unwrap_or_else(PoisonError::into_inner).elapsed();
                if idle && state.retiring.load(Ordering::SeqCst) {
                    tracing::info!("a client of another version is waiting; stopping");
                    break;
                }
                if idle && state.idle_timeout.is_some_and(|t| quiet_for >= t) {
                    tracing::info!(idle = ?quiet_for, "idle; stopping");
                    break;
                }
            }
            _ = state.stop.cancelled() => break,
        }
    }
    // No new clients; running commands are cancelled and given time to
    // stop cleanly (their writes are atomic either way).
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    state.stop.cancel();
    let deadline = Instant::now() + Duration::from_secs(30);
    while state.running.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_file(&pid_file);
    tracing::info!("strata daemon stopped");
    Ok(())
}

async fn connection(
    stream: UnixStream,
    state: &Arc<State>,
    handler: Arc<dyn Handler>,
) -> Result<()> {
    let peer = stream
        .peer_cred()
        .map_err(|e| Error::Protocol(format!("cannot read the client's credentials: {e}")))?;
    let (mut reader, mut writer) = split(stream);
    let Some(hello) = reader.recv::<Hello>().await? else {
        return Ok(());
    };
    let refusal = if peer.uid() != state.uid {
        Some(Refusal::OtherUser {
            owner: state.uid,
            client: peer.uid(),
        })
    } else if state.stop.is_cancelled() {
        Some(Refusal::Stopping)
    } else if hello.version != crate::version() {
        state.retiring.store(true, Ordering::SeqCst);
        Some(Refusal::OtherVersion {
            version: crate::version(),
            pid: std::process::id(),
            running: state.running.load(Ordering::SeqCst),
        })
    } else {
        None
    };
    if let Some(r) = refusal {
        tracing::info!(refusal = ?r, client_pid = ?peer.pid(), "refused a client");
        return writer.send(&Greeting::Refused(r)).await;
    }
    writer
        .send(&Greeting::Welcome {
            pid: std::process::id(),
        })
        .await?;
    let Some(request) = reader.recv::<ToDaemon>().await? else {
        return Ok(());
    };
    state.touch();
    match request {
        ToDaemon::Status => writer.send(&FromDaemon::Status(state.status())).await,
        ToDaemon::Stop => {
            tracing::info!(client_pid = ?peer.pid(), "asked to stop");
            state.stop.cancel();
            writer.send(&FromDaemon::Stopping).await
        }
        ToDaemon::Call { call, env, cwd } => {
            state.running.fetch_add(1, Ordering::SeqCst);
            state.served.fetch_add(1, Ordering::SeqCst);
            let result = run_call(call, env, cwd, reader, writer, state, handler).await;
            state.running.fetch_sub(1, Ordering::SeqCst);
            state.touch();
            result
        }
    }
}

async fn run_call(
    call: Vec<u8>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    mut reader: crate::wire::Reader,
    mut writer: crate::wire::Writer,
    state: &Arc<State>,
    handler: Arc<dyn Handler>,
) -> Result<()> {
    let cancel = state.stop.child_token();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let session = Session {
        tx: tx.clone(),
        cancel: cancel.clone(),
        env: env.into_iter().collect(),
        cwd,
    };
    // The client closing its end (Ctrl-C, a kill) cancels its command
    // and nothing else.
    let gone = cancel.clone();
    let watch = tokio::spawn(async move {
        while let Ok(Some(_)) = reader.recv::<ToDaemon>().await {}
        gone.cancel();
    });
    let work = tokio::spawn(async move {
        let result = handler.call(call, session).await;
        let last = match result {
            Ok(code) => FromDaemon::Exit(code),
            Err(message) => FromDaemon::Failed(message),
        };
        let _ = tx.send(last);
    });
    let mut sent = Ok(());
    let mut ended = false;
    while let Some(frame) = rx.recv().await {
        ended = matches!(frame, FromDaemon::Exit(_) | FromDaemon::Failed(_));
        if sent.is_ok() {
            sent = writer.send(&frame).await;
            if sent.is_err() {
                cancel.cancel();
            }
        }
        if ended {
            break;
        }
    }
    if let Err(e) = work.await {
        tracing::error!(error = %e, "a command's task failed");
        if !ended && sent.is_ok() {
            sent = writer
                .send(&FromDaemon::Failed(format!(
                    "the strata daemon failed running this command: {e}"
                )))
                .await;
        }
    }
    watch.abort();
    sent
}
