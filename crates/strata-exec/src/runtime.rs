//! Finding and driving the OCI runtime binary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::network::{Cni, PrivateNetwork};
use crate::spec::{Network, Sandbox};
use crate::{Error, Result};

/// Which output stream bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Receives the step's output as it is produced.
pub type Output = Arc<dyn Fn(Stream, &[u8]) + Send + Sync>;

/// How the step's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// The build was cancelled and the sandbox killed.
    Cancelled,
}

impl ExitStatus {
    /// True for exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

/// An OCI runtime (runc or crun) with its own state directory.
#[derive(Debug, Clone)]
pub struct Runtime {
    binary: PathBuf,
    state: PathBuf,
    /// What wires a step's own network; `None` when the plugins are
    /// missing (steps on the host's network, or none, still run).
    cni: Option<Cni>,
}

impl Runtime {
    /// Finds the runtime: `STRATA_RUNTIME` if set, else `runc`, then
    /// `crun` on `PATH`. Its state lives in `state`; the CNI plugins'
    /// (step networks) in `cni` beside it.
    pub fn discover(state: &Path) -> Result<Runtime> {
        let from_env = std::env::var_os("STRATA_RUNTIME").map(PathBuf::from);
        let binary = match from_env {
            Some(p) => Some(p).filter(|p| p.is_file()),
            None => ["runc", "crun"].iter().find_map(|name| find_on_path(name)),
        };
        let binary = binary.ok_or(Error::NoRuntime)?;
        let cni_state = state.parent().unwrap_or(state).join("cni");
        Ok(Runtime {
            binary,
            state: state.to_path_buf(),
            cni: Cni::discover(&cni_state),
        })
    }

    /// The runtime binary in use.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.state);
        c
    }

    /// Runs `sandbox` over `rootfs` as container `id`, with its bundle in
    /// `bundle` (a directory the caller owns). Output goes to `output` as
    /// it arrives. Cancelling `cancel` kills the sandbox.
    pub async fn run(
        &self,
        id: &str,
        rootfs: &Path,
        bundle: &Path,
        sandbox: &Sandbox,
        output: Output,
        cancel: &CancellationToken,
    ) -> Result<ExitStatus> {
        // Held until the sandbox is gone; dropping it releases the network.
        let network = match sandbox.network {
            Network::Private => Some(self.cni.as_ref().ok_or(Error::NoNetwork)?.attach(id)?),
            Network::Host | Network::None => None,
        };
        let spec = sandbox.spec(rootfs, network.as_ref().map(PrivateNetwork::path))?;
        let config = bundle.join("config.json");
        let json = serde_json::to_vec(&spec).map_err(|e| Error::Spec(e.to_string()))?;
        std::fs::write(&config, json).map_err(|source| Error::Bundle {
            path: config.clone(),
            source,
        })?;

        let spawn_err = |source| Error::Spawn {
            runtime: self.binary.display().to_string(),
            source,
        };
        // The runtime's own messages go to a log of their own, not into the
        // step's output: a warning about cgroup cleanup is not something
        // the build's command printed.
        let log = bundle.join("runtime.log");
        let mut child = self
            .command()
            .arg("--log")
            .arg(&log)
            .arg("--log-format")
            .arg("json")
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg("--no-new-keyring")
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let pumps: Vec<_> = [
            child.stdout.take().map(|s| {
                (
                    Stream::Stdout,
                    Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                )
            }),
            child.stderr.take().map(|s| {
                (
                    Stream::Stderr,
                    Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                )
            }),
        ]
        .into_iter()
        .flatten()
        .map(|(which, mut pipe)| {
            let output = Arc::clone(&output);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    output(which, &buf[..n]);
                }
            })
        })
        .collect();

        let status = tokio::select! {
            status = child.wait() => status.map_err(spawn_err)?,
            () = cancel.cancelled() => {
                self.kill(id).await;
                let _ = child.wait().await;
                for p in pumps {
                    let _ = p.await;
                }
                return Ok(ExitStatus::Cancelled);
            }
        };
        for p in pumps {
            let _ = p.await;
        }
        // `runc run` removes the container when its process ends: its
        // state directory is then gone, and starting the runtime again to
        // delete nothing would cost every step a process on its critical
        // path. Only a runtime that died first leaves one to remove.
        if self.state.join(id).exists() {
            let _ = self
                .command()
                .args(["delete", "--force", id])
                .output()
                .await;
        }
        use std::os::unix::process::ExitStatusExt;
        let status = match (status.code(), status.signal()) {
            (Some(c), _) => ExitStatus::Code(c),
            (None, Some(s)) => ExitStatus::Signal(s),
            (None, None) => ExitStatus::Code(-1),
        };
        // When the step failed, the runtime's errors belong with its output
        // (they say why a command could not start); otherwise they are
        // only worth a log line.
        for (level, msg) in read_runtime_log(&log) {
            if !status.success() && level == "error" {
                let name = self
                    .binary
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy();
                output(Stream::Stderr, format!("{name}: {msg}\n").as_bytes());
            } else {
                tracing::debug!(runtime = %self.binary.display(), level, "{msg}");
            }
        }
        Ok(status)
    }

    /// Kills and removes every container in this runtime's state: called
    /// by the one process that owns the state (it holds the state
    /// directory's lock), any container there was left by a process that
    /// died. Returns how many there were.
    pub fn clear_stale(&self) -> usize {
        // Containers first: they hold the networks' namespaces.
        let containers = self.clear_stale_containers();
        containers + self.cni.as_ref().map_or(0, Cni::clear_stale)
    }

    fn clear_stale_containers(&self) -> usize {
        let list = std::process::Command::new(&self.binary)
            .arg("--root")
            .arg(&self.state)
            .args(["list", "--quiet"])
            .output();
        let Ok(list) = list else { return 0 };
        let ids: Vec<String> = String::from_utf8_lossy(&list.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        for id in &ids {
            for args in [
                vec!["kill", id.as_str(), "KILL"],
                vec!["delete", "--force", id.as_str()],
            ] {
                let _ = std::process::Command::new(&self.binary)
                    .arg("--root")
                    .arg(&self.state)
                    .args(&args)
                    .output();
            }
            tracing::warn!(container = %id, "removed a container a dead strata process left running");
        }
        ids.len()
    }

    /// Kills and removes container `id`.
    pub async fn kill(&self, id: &str) {
        let _ = self.command().args(["kill", id, "KILL"]).output().await;
        let _ = self
            .command()
            .args(["delete", "--force", id])
            .output()
            .await;
    }
}

/// The entries of a runtime log in JSON lines form (runc and crun's
/// `--log-format json`): level and message. Lines that are not JSON are
/// kept whole as errors.
fn read_runtime_log(path: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(
            |line| match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) => (
                    v["level"].as_str().unwrap_or("error").to_string(),
                    v["msg"].as_str().unwrap_or(line).to_string(),
                ),
                Err(_) => ("error".to_string(), line.to_string()),
            },
        )
        .collect()
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
