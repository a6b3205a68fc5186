//! RUN: a step's process in the sandbox, with its mounts.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use strata_exec::{ExitStatus, Mount, Network, Runtime, Sandbox, Stream};
use strata_plan::{ExecOp, RunMountKind, Source};
use strata_snapshot::{OverlayMount, View, resolve_path};
use strata_solver::{Output, WorkerError};
use tokio_util::sync::CancellationToken;

use crate::error::{FileError, failed};
use crate::users;

/// What a RUN needs from its worker beyond the op.
pub struct RunContext<'a> {
    /// The step's root filesystem (an active overlay).
    pub rootfs: &'a Path,
    /// The step's upper dir, where mount stubs are cleaned up.
    pub upper: &'a Path,
    /// A private directory for the bundle and generated files.
    pub bundle: &'a Path,
    /// The build context on the host.
    pub context: &'a Path,
    /// Read-only views of stages and images the step mounts, by source.
    pub views: &'a dyn Fn(&Source) -> Result<View, WorkerError>,
    /// Persistent cache mounts live here.
    pub cache_mounts: &'a Path,
    /// Secrets given to the build.
    pub secrets: &'a BTreeMap<String, Vec<u8>>,
    /// SSH agents given to the build (`--ssh`): their sockets, by id.
    pub ssh_agents: &'a BTreeMap<String, PathBuf>,
    /// Where output goes.
    pub output: Output,
    /// Cancels the step.
    pub cancel: CancellationToken,
    /// A unique container id.
    pub id: &'a str,
}

/// What a RUN keeps alive while its process runs.
#[derive(Default)]
struct Held {
    views: Vec<View>,
    overlays: Vec<OverlayMount>,
    locks: Vec<nix::fcntl::Flock<fs::File>>,
    agents: Vec<AgentProxy>,
}

/// A socket standing in for an SSH agent while a step runs: each
/// connection to it is forwarded to the agent's own socket, which the step
/// never sees and whose owner and mode stay as they are (the proxy's are
/// the mount's), as BuildKit's session proxy does. Stops accepting when
/// dropped; a forwarded connection ends when the step's end closes it.
struct AgentProxy {
    accept: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for AgentProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl AgentProxy {
    /// Listens on a socket in a private directory (socket paths are short:
    /// at most 107 bytes), owned by `uid:gid` with `mode`.
    fn start(
        agent: &Path,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> std::io::Result<(AgentProxy, PathBuf)> {
        let dir = tempfile::Builder::new().prefix("strata-ssh-").tempdir()?;
        let path = dir.path().join("agent.sock");
        let handle = tokio::runtime::Handle::current();
        let listener = {
            let _runtime = handle.enter();
            tokio::net::UnixListener::bind(&path)?
        };
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        let agent = agent.to_path_buf();
        let accept = handle.spawn(async move {
            while let Ok((mut step, _)) = listener.accept().await {
                let agent = agent.clone();
                tokio::spawn(async move {
                    match tokio::net::UnixStream::connect(&agent).await {
                        Ok(mut upstream) => {
                            let _ = tokio::io::copy_bidirectional(&mut step, &mut upstream).await;
                        }
                        Err(e) => {
                            tracing::warn!(agent = %agent.display(), error = %e, "cannot reach the SSH agent");
                        }
                    }
                });
            }
        });
        Ok((AgentProxy { accept, _dir: dir }, path))
    }
}

/// The hostname steps see, as in BuildKit.
const HOSTNAME: &str = "buildkitsandbox";

fn err(message: impl Into<String>) -> WorkerError {
    WorkerError::new(message)
}

/// A [`FileError::Io`] maker for `map_err`, as a step's failure.
fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError {
    let io = FileError::io(what, path);
    move |e| failed(io(e))
}

/// The step's `/etc/resolv.conf`: the host's, except that on a network of
/// its own a name server on the host's loopback is out of reach, so those
/// lines go, and with none left the step gets Docker's fallback servers.
fn resolv_conf(host: &str, network: Network) -> Vec<u8> {
    if network != Network::Private {
        return host.as_bytes().to_vec();
    }
    let loopback = |l: &str| {
        l.split_whitespace().next() == Some("nameserver")
            && l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.starts_with("127.") || a == "::1")
    };
    let mut out: Vec<&str> = host.lines().filter(|l| !loopback(l)).collect();
    let servers = out
        .iter()
        .filter(|l| l.split_whitespace().next() == Some("nameserver"))
        .count();
    if servers == 0 {
        out.extend(["nameserver 8.8.8.8", "nameserver 8.8.4.4"]);
    }
    let mut text = out.join("\n");
    text.push('\n');
    text.into_bytes()
}

/// A sandbox's `/etc/hosts`: BuildKit's, then `extra` (a build's
/// `--add-host`s).
fn hosts_file(extra: &[strata_plan::ExtraHost]) -> String {
    let mut text = String::from(
        "127.0.0.1\tlocalhost buildkitsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    for h in extra {
        text.push_str(&format!("{}\t{}\n", h.ip, h.name));
    }
    text
}

/// Writes a sandbox's `/etc/hosts` (with `extra_hosts`) and
/// `/etc/resolv.conf` (the host's, as `network` can reach it) into
/// `bundle`, and returns their read-only bind mounts: the one way every
/// sandbox gets them ([`sandbox`]).
fn etc_mounts(
    bundle: &Path,
    extra_hosts: &[strata_plan::ExtraHost],
    network: Network,
) -> Result<Vec<Mount>, WorkerError> {
    Ok(vec![
        bind_file(
            bundle,
            "hosts",
            hosts_file(extra_hosts).as_bytes(),
            "/etc/hosts",
        )?,
        bind_file(
            bundle,
            "resolv.conf",
            &resolv_conf(
                &fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
                network,
            ),
            "/etc/resolv.conf",
        )?,
    ])
}

/// A RUN step made ready to start: its sandbox, and what stays held
/// while its process runs (views, overlays, cache locks, agent proxies).
pub(crate) struct Prepared {
    sandbox: Sandbox,
    held: Held,
    /// Mount points the runtime makes, and their missing ancestors: not
    /// part of the step's result.
    missing: Vec<String>,
    missing_parents: Vec<String>,
    /// The last lines of output, for the error of a failed process.
    tail: Arc<Mutex<Tail>>,
    output: strata_exec::Output,
    command: String,
    id: String,
    rootfs: PathBuf,
    upper: PathBuf,
    bundle: PathBuf,
    cancel: CancellationToken,
}

impl Prepared {
    /// The container's id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Runs the process and waits for it to end, as a task: no thread
    /// waits for it.
    pub(crate) async fn wait(&self, runtime: &Runtime) -> Result<ExitStatus, WorkerError> {
        runtime
            .run(
                &self.id,
                &self.rootfs,
                &self.bundle,
                &self.sandbox,
                Arc::clone(&self.output),
                &self.cancel,
            )
            .await
            .map_err(failed)
    }

    /// After the process: lets go of what it held, removes the mount
    /// stubs it left in the upper dir, and says how it ended (`Ok` only
    /// for exit code 0). Blocking.
    pub(crate) fn finish(self, status: ExitStatus) -> Result<(), WorkerError> {
        drop(self.held);
        remove_stubs(&self.upper, &self.missing, &self.missing_parents);
        let command = self.command;
        let tail = self
            .tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lines();
        match status {
            ExitStatus::Code(0) => Ok(()),
            ExitStatus::Code(c) => Err(WorkerError::new(format!(
                "process {command} did not complete successfully: exit code: {c}"
            ))
            .with_tail(tail)),
            ExitStatus::Signal(s) => Err(WorkerError::new(format!(
                "process {command} was killed by signal {s}"
            ))
            .with_tail(tail)),
            ExitStatus::Cancelled => Err(WorkerError::cancelled().with_tail(tail)),
        }
    }
}

/// A process to run in a container over a root filesystem: what a `RUN`
/// step and `strata run` both start from.
#[derive(Debug)]
pub struct Process<'a> {
    /// The container's root filesystem.
    pub rootfs: &'a Path,
    /// The container's own folder, for the files it binds in.
    pub bundle: &'a Path,
    /// The command and its arguments.
    pub args: Vec<String>,
    /// Its environment (`NAME=value`).
    pub env: Vec<String>,
    /// Its working directory in the container (made if missing).
    pub cwd: &'a str,
    /// Its user, as an image's `USER` names it (`name`, `uid:gid`, …).
    pub user: &'a str,
    /// The network it joins.
    pub network: Network,
    /// Names `/etc/hosts` maps beside localhost.
    pub extra_hosts: &'a [strata_plan::ExtraHost],
    /// The container's hostname.
    pub hostname: String,
}

/// The sandbox `process` runs in: its user resolved in the root
/// filesystem, its working directory made, its `/etc/hosts` and
/// `/etc/resolv.conf` bound in, and nothing more (no other mount, no
/// extra privilege or limit). The one set-up every container starts
/// from. Blocking.
pub fn sandbox(process: Process<'_>) -> Result<Sandbox, WorkerError> {
    let Process {
        rootfs,
        bundle,
        args,
        env,
        cwd,
        user,
        network,
        extra_hosts,
        hostname,
    } = process;
    let id = users::resolve(rootfs, user, true).map_err(failed)?;
    // runc needs the working directory to exist.
    let dir = resolve_path(rootfs, cwd, true).map_err(|e| failed(FileError::resolve(cwd)(e)))?;
    if !dir.exists() {
        fs::create_dir_all(&dir).map_err(io("create the working directory", &dir))?;
    }
    Ok(Sandbox {
        args,
        env,
        cwd: cwd.to_string(),
        uid: id.uid,
        gid: id.gid,
        additional_gids: id.groups,
        hostname,
        network,
        mounts: etc_mounts(bundle, extra_hosts, network)?,
        insecure: false,
        shm_size: None,
        rlimits: Vec::new(),
    })
}

/// Makes the op's sandbox ready (its user, working directory, `/etc`
/// files and mounts). Blocking.
pub(crate) fn prepare(op: &ExecOp, ctx: &RunContext<'_>) -> Result<Prepared, WorkerError> {
    let network = if op.no_network {
        Network::None
    } else if op.host_network {
        Network::Host
    } else {
        Network::Private
    };
    let mut sandbox = sandbox(Process {
        rootfs: ctx.rootfs,
        bundle: ctx.bundle,
        args: op.args.clone(),
        env: op.env.clone(),
        cwd: &op.cwd,
        user: &op.user,
        network,
        extra_hosts: &op.extra_hosts,
        hostname: HOSTNAME.into(),
    })?;
    let mut held = Held::default();
    let mut env = std::mem::take(&mut sandbox.env);
    let mut mounts = std::mem::take(&mut sandbox.mounts);
    if !op.files.is_empty() {
        let pipes = ctx.bundle.join("pipes");
        fs::create_dir_all(&pipes).map_err(io("create", &pipes))?;
        for f in &op.files {
            let p = pipes.join(&f.name);
            fs::write(&p, &f.data).map_err(io("write", &p))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(f.mode)).map_err(io("chmod", &p))?;
        }
        mounts.push(Mount::Bind {
            source: pipes,
            destination: "/dev/pipes".into(),
            read_only: true,
        });
    }
    for (n, m) in op.mounts.iter().enumerate() {
        match &m.kind {
            RunMountKind::Bind {
                from,
                source,
                read_write,
            } => {
                let (root, view) = match from {
                    Source::Context => (ctx.context.to_path_buf(), None),
                    other => {
                        let v = (ctx.views)(other)?;
                        (v.root(), Some(v))
                    }
                };
                let host = resolve_path(&root, source, true)
                    .map_err(|e| failed(FileError::resolve(source)(e)))?;
                if !host.exists() {
                    return Err(err(format!("mount source {source:?} not found")));
                }
                held.views.extend(view);
                let host = if *read_write && host.is_dir() {
                    // Writes to a read-write bind land in a throwaway upper dir.
                    let dir = ctx.bundle.join(format!("rw-{n}"));
                    for sub in ["upper", "work", "merged"] {
                        let at = dir.join(sub);
                        fs::create_dir_all(&at).map_err(io("create", &at))?;
                    }
                    let base = host.parent().unwrap_or(Path::new("/")).to_path_buf();
                    let name = PathBuf::from(host.file_name().unwrap_or_default());
                    let mount = OverlayMount::mount(
                        &base,
                        &[name],
                        Some((&dir.join("upper"), &dir.join("work"))),
                        &dir.join("merged"),
                    )
                    .map_err(failed)?;
                    held.overlays.push(mount);
                    dir.join("merged")
                } else if *read_write {
                    // A read-write bind of a file gets a copy: its writes
                    // are thrown away too, and the source stays as it was.
                    let copy = ctx.bundle.join(format!("rw-{n}"));
                    fs::copy(&host, &copy).map_err(io("copy the mount source", &host))?;
                    copy
                } else {
                    host
                };
                mounts.push(Mount::Bind {
                    source: host,
                    destination: m.target.clone(),
                    read_only: !*read_write,
                });
            }
            RunMountKind::Cache {
                id,
                sharing,
                mode,
                uid,
                gid,
                read_only,
            } => {
                let name = blake3::hash(id.as_bytes()).to_hex().to_string();
                let dir = ctx.cache_mounts.join(&name);
                if !dir.exists() {
                    fs::create_dir_all(&dir).map_err(io("create the cache mount", &dir))?;
                    std::os::unix::fs::lchown(&dir, Some(*uid), Some(*gid))
                        .map_err(io("chown", &dir))?;
                    fs::set_permissions(&dir, fs::Permissions::from_mode(*mode))
                        .map_err(io("chmod", &dir))?;
                }
                if sharing == "locked" {
                    let lock = ctx.cache_mounts.join(format!("{name}.lock"));
                    let f = fs::File::create(&lock).map_err(io("lock the cache mount", &lock))?;
                    let l = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                        .map_err(|(_, e)| io("lock the cache mount", &lock)(e.into()))?;
                    held.locks.push(l);
                }
                mounts.push(Mount::Bind {
                    source: dir,
                    destination: m.target.clone(),
                    read_only: *read_only,
                });
            }
            RunMountKind::Tmpfs { size } => mounts.push(Mount::Tmpfs {
                destination: m.target.clone(),
                size: *size,
            }),
            RunMountKind::Secret {
                id,
                required,
                env: as_env,
                mode,
                uid,
                gid,
            } => {
                let Some(value) = ctx.secrets.get(id) else {
                    if *required {
                        return Err(err(format!(
                            "secret {id:?} is required but was not given (strata build --secret id={id},src=FILE)"
                        )));
                    }
                    continue;
                };
                if let Some(var) = as_env {
                    env.push(format!("{var}={}", String::from_utf8_lossy(value)));
                }
                let dir = ctx.bundle.join("secrets");
                fs::create_dir_all(&dir).map_err(io("create", &dir))?;
                let p = dir.join(n.to_string());
                fs::write(&p, value).map_err(io("write", &p))?;
                std::os::unix::fs::lchown(&p, Some(*uid), Some(*gid)).map_err(io("chown", &p))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(*mode))
                    .map_err(io("chmod", &p))?;
                mounts.push(Mount::Bind {
                    source: p,
                    destination: m.target.clone(),
                    read_only: true,
                });
            }
            RunMountKind::Ssh {
                id,
                required,
                mode,
                uid,
                gid,
            } => {
                let Some(agent) = ctx.ssh_agents.get(id) else {
                    if *required {
                        return Err(err(format!(
                            "SSH agent {id:?} is required but was not given (strata build --ssh {})",
                            if id == "default" {
                                "default".to_string()
                            } else {
                                format!("{id}=SOCKET")
                            }
                        )));
                    }
                    continue;
                };
                let (proxy, socket) = AgentProxy::start(agent, *uid, *gid, *mode).map_err(|e| {
                    err(format!(
                        "cannot forward SSH agent {id:?} ({}): {e}",
                        agent.display()
                    ))
                })?;
                held.agents.push(proxy);
                mounts.push(Mount::Bind {
                    source: socket,
                    destination: m.target.clone(),
                    read_only: false,
                });
            }
        }
    }

    // Mount points the runtime has to create for the step's own mounts are
    // not part of its result: note which are missing, and remove what is
    // left of them, as BuildKit does. `/proc`, `/dev` and `/sys` stay.
    let stubs: Vec<String> = mounts.iter().map(|m| m.destination().to_string()).collect();
    let missing: Vec<String> = stubs
        .into_iter()
        .filter(|d| !exists_in(ctx.rootfs, d))
        .collect();
    let missing_parents = missing_ancestors(ctx.rootfs, &missing);

    let sandbox = Sandbox {
        env,
        mounts,
        insecure: op.insecure,
        shm_size: op.shm_size,
        rlimits: op
            .ulimits
            .iter()
            .map(|u| strata_exec::Rlimit {
                name: u.rlimit().to_string(),
                soft: u.soft,
                hard: u.hard,
            })
            .collect(),
        ..sandbox
    };
    let tail = Arc::new(Mutex::new(Tail::default()));
    let sink = Arc::clone(&tail);
    let out = Arc::clone(&ctx.output);
    let output: strata_exec::Output = Arc::new(move |_: Stream, bytes: &[u8]| {
        sink.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(bytes);
        out(bytes);
    });
    Ok(Prepared {
        sandbox,
        held,
        missing,
        missing_parents,
        tail,
        output,
        command: quote_command(&op.args),
        id: ctx.id.to_string(),
        rootfs: ctx.rootfs.to_path_buf(),
        upper: ctx.upper.to_path_buf(),
        bundle: ctx.bundle.to_path_buf(),
        cancel: ctx.cancel.clone(),
    })
}

fn quote_command(args: &[String]) -> String {
    format!("\"{}\"", args.join(" ").replace('"', "\\\""))
}

fn bind_file(bundle: &Path, name: &str, content: &[u8], dest: &str) -> Result<Mount, WorkerError> {
    let p = bundle.join(name);
    fs::write(&p, content).map_err(io("write", &p))?;
    Ok(Mount::Bind {
        source: p,
        destination: dest.into(),
        read_only: true,
    })
}

fn exists_in(root: &Path, path: &str) -> bool {
    resolve_path(root, path, false)
        .map(|p| p.symlink_metadata().is_ok())
        .unwrap_or(false)
}

/// For each missing mount point, its ancestors that are missing too.
fn missing_ancestors(root: &Path, missing: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for m in missing {
        let mut p = Path::new(m).parent();
        while let Some(dir) = p.filter(|d| d != &Path::new("/")) {
            let s = dir.to_string_lossy().into_owned();
            if exists_in(root, &s) {
                break;
            }
            out.push(s);
            p = dir.parent();
        }
    }
    out
}

/// Removes mount points the runtime created, if they are still empty.
fn remove_stubs(upper: &Path, missing: &[String], parents: &[String]) {
    let in_upper = |p: &str| upper.join(p.trim_start_matches('/'));
    for m in missing {
        let p = in_upper(m);
        match fs::symlink_metadata(&p) {
            Ok(meta) if meta.is_dir() => {
                let _ = fs::remove_dir(&p);
            }
            Ok(meta) if meta.is_file() && meta.len() == 0 => {
                let _ = fs::remove_file(&p);
            }
            _ => {}
        }
    }
    let mut parents = parents.to_vec();
    parents.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in parents {
        let _ = fs::remove_dir(in_upper(&p));
    }
}

/// The last lines a step printed, for the error message.
#[derive(Default)]
struct Tail {
    partial: Vec<u8>,
    lines: std::collections::VecDeque<String>,
}

impl Tail {
    const KEEP: usize = 10;

    fn push(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.lines
                .push_back(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
            if self.lines.len() > Self::KEEP {
                self.lines.pop_front();
            }
        }
    }

    fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            v.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_network_never_gets_a_loopback_name_server() {
        let host = "search lan\nnameserver 127.0.0.53\nnameserver 10.0.0.2\n";
        assert_eq!(
            String::from_utf8(resolv_conf(host, Network::Private)).unwrap(),
            "search lan\nnameserver 10.0.0.2\n"
        );
        assert_eq!(
            String::from_utf8(resolv_conf("nameserver 127.0.0.53\n", Network::Private)).unwrap(),
            "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"
        );
        assert_eq!(resolv_conf(host, Network::Host), host.as_bytes());
    }
}
