//! The command's side of the socket.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::wire::{
    DaemonStatus, FromDaemon, Greeting, Hello, Reader, Refusal, ToDaemon, Writer, split,
};

/// How long a started daemon has to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a command waits for a daemon of another version to finish
/// what it runs and stop.
const REPLACE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The daemon of one state directory, as a command reaches it.
#[derive(Debug, Clone)]
pub struct Client {
    home: PathBuf,
}

/// A connection the daemon has welcomed.
pub struct Connected {
    reader: Reader,
    writer: Writer,
    /// The daemon's process.
    pub pid: u32,
    home: PathBuf,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// With this exit code.
    Exit(u8),
    /// With this error.
    Failed(String),
}

enum Attempt {
    Nobody,
    Welcome(Box<Connected>),
    OtherVersion {
        version: String,
        pid: u32,
        running: usize,
    },
    Stopping,
}

impl Client {
    /// The daemon of `home`.
    pub fn new(home: &Path) -> Client {
        Client {
            home: home.to_path_buf(),
        }
    }

    async fn attempt(&self) -> Result<Attempt> {
        let socket = crate::socket_path(&self.home);
        let stream = match UnixStream::connect(&socket).await {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                return Ok(Attempt::Nobody);
            }
            Err(source) => {
                return Err(Error::Io {
                    what: "cannot connect to the strata daemon at",
                    path: socket,
                    source,
                });
            }
        };
        let (mut reader, mut writer) = split(stream);
        let greeting = async {
            writer
                .send(&Hello {
                    version: crate::version(),
                })
                .await?;
            reader.recv::<Greeting>().await
        };
        match greeting.await {
            // A daemon closing as we came.
            Ok(None) | Err(Error::Protocol(_)) => Ok(Attempt::Stopping),
            Err(e) => Err(e),
            Ok(Some(Greeting::Welcome { pid })) => Ok(Attempt::Welcome(Box::new(Connected {
                reader,
                writer,
                pid,
                home: self.home.clone(),
            }))),
            Ok(Some(Greeting::Refused(Refusal::OtherUser { owner, client }))) => {
                Err(Error::Refused(format!(
                    "the strata daemon of {} runs as uid {owner}, and this command as uid {client}: each user needs a state directory of their own (set STRATA_HOME)",
                    self.home.display()
                )))
            }
            Ok(Some(Greeting::Refused(Refusal::OtherVersion {
                version,
                pid,
                running,
            }))) => Ok(Attempt::OtherVersion {
                version,
                pid,
                running,
            }),
            Ok(Some(Greeting::Refused(Refusal::Stopping))) => Ok(Attempt::Stopping),
        }
    }

    /// Connects to the daemon, starting one with `start` when none
    /// answers, and waiting for one of another version to finish and stop
    /// (`notice` tells the user, once).
    pub async fn connect(
        &self,
        start: &dyn Fn() -> std::io::Result<Child>,
        notice: &dyn Fn(&str),
    ) -> Result<Connected> {
        let log = crate::log_path(&self.home);
        let mut started: Option<(Child, Instant)> = None;
        let mut exited_at: Option<Instant> = None;
        let mut replacing: Option<Instant> = None;
        loop {
            match self.attempt().await? {
                Attempt::Welcome(c) => return Ok(*c),
                Attempt::OtherVersion {
                    version,
                    pid,
                    running,
                } => {
                    let since = *replacing.get_or_insert_with(|| {
                        notice(&format!(
                            "the strata daemon serving {} (pid {pid}) is another build ({version}); it stops once the {running} command(s) it runs are done, and a new one starts",
                            self.home.display()
                        ));
                        Instant::now()
                    });
                    if since.elapsed() > REPLACE_TIMEOUT {
                        return Err(Error::Refused(format!(
                            "the strata daemon of another build (pid {pid}) did not stop within {} minutes; stop it with `strata daemon stop`",
                            REPLACE_TIMEOUT.as_secs() / 60
                        )));
                    }
                }
                Attempt::Stopping => {}
                Attempt::Nobody => match &mut started {
                    None => {
                        let child = start().map_err(|e| Error::Start {
                            home: self.home.clone(),
                            detail: e.to_string(),
                            log: log.clone(),
                        })?;
                        started = Some((child, Instant::now()));
                    }
                    Some((child, at)) => {
                        // A daemon that exits at once either lost the race
                        // to another (whose socket appears soon) or cannot
                        // run: its log says which.
                        if exited_at.is_none()
                            && let Ok(Some(status)) = child.try_wait()
                            && !status.success()
                        {
                            exited_at = Some(Instant::now());
                        }
                        let gave_up = exited_at
                            .is_some_and(|t| t.elapsed() > Duration::from_secs(2))
                            || at.elapsed() > START_TIMEOUT;
                        if gave_up {
                            return Err(Error::Start {
                                home: self.home.clone(),
                                detail: last_lines(&log, 5),
                                log,
                            });
                        }
                    }
                },
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The running daemon's state; `None` when none runs.
    pub async fn status(&self) -> Result<Option<DaemonStatus>> {
        match self.attempt().await? {
            Attempt::Welcome(mut c) => {
                c.writer.send(&ToDaemon::Status).await?;
                match c.reader.recv::<FromDaemon>().await? {
                    Some(FromDaemon::Status(s)) => Ok(Some(s)),
                    other => Err(Error::Protocol(format!(
                        "unexpected answer to status: {other:?}"
                    ))),
                }
            }
            Attempt::OtherVersion {
                version,
                pid,
                running,
            } => Err(Error::Refused(format!(
                "the strata daemon (pid {pid}) is another build ({version}), running {running} command(s); it stops once they are done"
            ))),
            Attempt::Nobody | Attempt::Stopping => Ok(None),
        }
    }

    /// Stops the running daemon (it cancels what it runs) and waits for
    /// it to be gone; returns its pid, or `None` when none ran.
    pub async fn stop(&self) -> Result<Option<u32>> {
        let pid = match self.attempt().await? {
            Attempt::Welcome(mut c) => {
                c.writer.send(&ToDaemon::Stop).await?;
                let _ = c.reader.recv::<FromDaemon>().await;
                c.pid
            }
            // Another build of strata stops at its next idle moment;
            // asking it needs its own version, so signal it.
            Attempt::OtherVersion { pid, .. } => {
                if let Ok(p) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                pid
            }
            Attempt::Nobody | Attempt::Stopping => return Ok(None),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(Some(pid))
    }
}

fn alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|p| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
    })
}

/// The last `n` lines of a log, for an error message.
fn last_lines(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(n)..].join(" / ");
    if tail.is_empty() {
        "it exited without a word".into()
    } else {
        format!("it said: {tail}")
    }
}

impl Connected {
    /// Runs `call` in the daemon with the client's `env` and `cwd`;
    /// `on` sees every frame of output and progress as it comes.
    /// Cancelling `cancel` (Ctrl-C) closes this side of the connection:
    /// the daemon cancels the command, and the call returns once the
    /// daemon has said how it ended.
    pub async fn call(
        mut self,
        call: Vec<u8>,
        env: Vec<(String, String)>,
        cwd: PathBuf,
        cancel: &CancellationToken,
        on: &mut (dyn FnMut(FromDaemon) + Send),
    ) -> Result<Ended> {
        self.writer.send(&ToDaemon::Call { call, env, cwd }).await?;
        let mut closed = false;
        loop {
            let frame = tokio::select! {
                frame = self.reader.recv::<FromDaemon>() => frame,
                () = cancel.cancelled(), if !closed => {
                    closed = true;
                    let _ = self.writer.close().await;
                    continue;
                }
            };
            match frame {
                Ok(Some(FromDaemon::Exit(code))) => return Ok(Ended::Exit(code)),
                Ok(Some(FromDaemon::Failed(message))) => return Ok(Ended::Failed(message)),
                Ok(Some(frame)) => on(frame),
                Ok(None) | Err(_) => {
                    return Err(Error::Died {
                        pid: self.pid,
                        log: crate::log_path(&self.home),
                    });
                }
            }
        }
    }
}
