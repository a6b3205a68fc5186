//! A step's own network, as Docker's default bridge gives a container: a
//! network namespace of its own, joined to a bridge on the host, with
//! outbound traffic masqueraded (NAT). The host's loopback services are
//! out of its reach.
//!
//! The wiring is done by the CNI reference plugins (Debian's
//! `containernetworking-plugins`, as buildah and podman use them):
//! `loopback` brings `lo` up, `bridge` makes the veth pair, the bridge and
//! the NAT rules, and `host-local` hands out the address, under a lock, so
//! steps side by side never share one.
//!
//! Wiring a namespace takes about a tenth of a second (the plugins and
//! their iptables calls), so a finished step's namespace is kept for the
//! next one, as BuildKit pools its CNI namespaces: at most
//! [`POOL_SIZE`] wait, and they are released when the node closes (or,
//! after a kill, when a node next opens that state directory, or any
//! node opens once that directory is gone). A
//! step cannot change its namespace (it has no `CAP_NET_ADMIN`) and its
//! processes die with its pid namespace, so nothing of it is left for the
//! next.

use std::io::Write;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::{Error, Result};

/// The bridge every step's network joins.
pub const BRIDGE: &str = "strata0";

/// The addresses steps get, unless `STRATA_BUILD_SUBNET` says otherwise.
pub const DEFAULT_SUBNET: &str = "10.89.0.0/16";

/// Finished steps' namespaces kept for the next steps.
pub const POOL_SIZE: usize = 16;

/// The CNI plugins and where their state lives.
#[derive(Debug, Clone)]
struct Plugins {
    plugins: PathBuf,
    /// Address leases (`ipam/`), beside the node's other state.
    state: PathBuf,
    /// The namespaces' mount points: under `/run`, never in the state
    /// directory, so a node killed with its namespaces still mounted
    /// leaves a state directory that can be removed.
    namespaces: PathBuf,
    subnet: String,
    /// Held while this node makes or removes its directory under `/run`
    /// (and the file naming its owner).
    dir: Arc<Mutex<()>>,
}

/// Step networks: made by the CNI plugins, pooled between steps.
#[derive(Debug, Clone)]
pub struct Cni {
    plugins: Plugins,
    pool: Arc<Mutex<Vec<Wired>>>,
}

/// A network namespace, wired; removed (and its address released) when
/// dropped.
#[derive(Debug)]
struct Wired {
    plugins: Plugins,
    id: String,
    path: PathBuf,
}

/// A step's network for as long as the step runs; it goes back to the
/// pool when dropped.
#[derive(Debug)]
pub struct PrivateNetwork {
    wired: Option<Wired>,
    pool: Arc<Mutex<Vec<Wired>>>,
}

impl Cni {
    /// Finds the plugins: `STRATA_CNI_PATH`, else `/usr/lib/cni` (Debian),
    /// else `/opt/cni/bin`. Their state (namespaces, address leases) lives
    /// in `state`.
    pub fn discover(state: &Path) -> Option<Cni> {
        let candidates: Vec<PathBuf> = match std::env::var_os("STRATA_CNI_PATH") {
            Some(p) => vec![PathBuf::from(p)],
            None => vec!["/usr/lib/cni".into(), "/opt/cni/bin".into()],
        };
        let plugins = candidates.into_iter().find(|d| {
            ["bridge", "host-local", "loopback"]
                .iter()
                .all(|p| d.join(p).is_file())
        })?;
        Some(Cni {
            plugins: Plugins {
                plugins,
                state: state.to_path_buf(),
                namespaces: namespaces_for(state),
                subnet: std::env::var("STRATA_BUILD_SUBNET")
                    .unwrap_or_else(|_| DEFAULT_SUBNET.into()),
                dir: Arc::default(),
            },
            pool: Arc::default(),
        })
    }

    /// A network for step `id`: a pooled one, else a new namespace wired
    /// to the bridge.
    pub fn attach(&self, id: &str) -> Result<PrivateNetwork> {
        let pooled = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let wired = match pooled {
            Some(w) => w,
            None => self.plugins.wire(id)?,
        };
        Ok(PrivateNetwork {
            wired: Some(wired),
            pool: Arc::clone(&self.pool),
        })
    }

    /// Undoes the networks of steps a killed process left: their
    /// addresses, NAT rules and namespaces; this node's, and those of any
    /// node whose state directory is gone (a CI job's temporary home,
    /// removed after its node was killed), which no one else would ever
    /// release: each holds a veth on the bridge and an address a new
    /// state directory's leases know nothing of. Only the one process
    /// holding the state directory calls this, before any step of its own
    /// runs.
    pub fn clear_stale(&self) -> usize {
        let own = self.plugins.release_all(&self.plugins.namespaces);
        let orphaned = self.clear_orphans();
        if own + orphaned > 0 {
            tracing::warn!(
                networks = own,
                orphaned,
                "removed step networks a dead strata process left"
            );
        }
        own + orphaned
    }

    /// Releases the namespaces of nodes whose state directory is gone.
    fn clear_orphans(&self) -> usize {
        let Some(root) = self.plugins.namespaces.parent() else {
            return 0;
        };
        let Ok(dirs) = std::fs::read_dir(root) else {
            return 0;
        };
        let mut n = 0;
        for d in dirs.flatten() {
            let dir = d.path();
            if dir == self.plugins.namespaces || !orphaned(&dir) {
                continue;
            }
            // Released with this node's plugins and leases: the owner's
            // leases went with its state directory (and the address
            // plugin would make that directory again).
            n += self.plugins.release_all(&dir);
            let _ = std::fs::remove_file(dir.join(OWNER));
            let _ = std::fs::remove_dir(&dir);
        }
        n
    }
}

/// The file in a node's directory under `/run` naming its state.
const OWNER: &str = "owner";

/// How long a directory under `/run` with no owner named may be one a
/// node is still making (or one an older strata made, which named none).
const UNNAMED_GRACE: Duration = Duration::from_secs(60);

/// Whether the namespaces in `dir` belong to no node: the state
/// directory it names is gone, or it names none and is not new.
fn orphaned(dir: &Path) -> bool {
    match std::fs::read(dir.join(OWNER)) {
        Ok(owner) => !Path::new(std::ffi::OsStr::from_bytes(&owner)).exists(),
        Err(_) => std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > UNNAMED_GRACE),
    }
}

impl Plugins {
    fn namespaces(&self) -> PathBuf {
        self.namespaces.clone()
    }

    /// Releases every namespace mounted in `dir`; returns how many.
    fn release_all(&self, dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut n = 0;
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if id == OWNER {
                continue;
            }
            drop(Wired {
                plugins: self.clone(),
                id,
                path: e.path(),
            });
            n += 1;
        }
        n
    }

    fn bridge_config(&self) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "strata",
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": self.subnet }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": self.state.join("ipam"),
            },
        })
        .to_string()
    }

    fn loopback_config() -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "strata-lo",
            "type": "loopback",
        })
        .to_string()
    }

    /// Runs `plugin` for container `id` in namespace `ns` (the CNI
    /// protocol: the command in the environment, the config on stdin).
    fn plugin(&self, plugin: &str, command: &str, id: &str, ns: &Path, config: &str) -> Result<()> {
        let binary = self.plugins.join(plugin);
        let fail = |detail: String| Error::Network {
            step: id.to_string(),
            detail,
        };
        let mut child = Command::new(&binary)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", ns)
            .env(
                "CNI_IFNAME",
                if plugin == "loopback" { "lo" } else { "eth0" },
            )
            .env("CNI_PATH", &self.plugins)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", binary.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(config.as_bytes())
                .map_err(|e| fail(format!("cannot configure {plugin}: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| fail(format!("{plugin}: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        // A failing plugin answers with a JSON error on stdout.
        let said = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| {
                let msg = v["msg"].as_str()?.to_string();
                Some(match v["details"].as_str() {
                    Some(d) if !d.is_empty() => format!("{msg}: {d}"),
                    _ => msg,
                })
            })
            .unwrap_or_else(|| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            });
        Err(fail(format!(
            "the CNI {plugin} plugin failed ({command}): {said}"
        )))
    }

    /// A new network namespace, named after step `id`, wired to the
    /// bridge.
    fn wire(&self, id: &str) -> Result<Wired> {
        let dir = self.namespaces();
        let path = dir.join(id);
        {
            let _dir = self.dir.lock().unwrap_or_else(PoisonError::into_inner);
            let bundle = |source| Error::Bundle {
                path: dir.clone(),
                source,
            };
            std::fs::create_dir_all(&dir).map_err(bundle)?;
            // Named, and what it names made, before any namespace is in
            // it, so another node never takes it for an orphan's.
            std::fs::create_dir_all(&self.state).map_err(|source| Error::Bundle {
                path: self.state.clone(),
                source,
            })?;
            std::fs::write(dir.join(OWNER), self.state.as_os_str().as_bytes()).map_err(bundle)?;
            create_namespace(&path).map_err(|e| Error::Network {
                step: id.to_string(),
                detail: format!("cannot make a network namespace at {}: {e}", path.display()),
            })?;
        }
        // From here on, dropping it undoes whatever was done.
        let wired = Wired {
            plugins: self.clone(),
            id: id.to_string(),
            path,
        };
        self.plugin("loopback", "ADD", id, &wired.path, &Self::loopback_config())?;
        self.plugin("bridge", "ADD", id, &wired.path, &self.bridge_config())?;
        Ok(wired)
    }
}

impl PrivateNetwork {
    /// The namespace, for the runtime spec to join.
    pub fn path(&self) -> &Path {
        self.wired.as_ref().map_or(Path::new(""), |w| &w.path)
    }
}

impl Drop for PrivateNetwork {
    fn drop(&mut self) {
        let Some(wired) = self.wired.take() else {
            return;
        };
        let spare = {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            if pool.len() < POOL_SIZE {
                pool.push(wired);
                None
            } else {
                Some(wired)
            }
        };
        // Released outside the lock: that runs the plugins.
        drop(spare);
    }
}

impl Drop for Wired {
    fn drop(&mut self) {
        let config = self.plugins.bridge_config();
        if let Err(e) = self
            .plugins
            .plugin("bridge", "DEL", &self.id, &self.path, &config)
        {
            tracing::warn!(step = %self.id, error = %e, "cannot release a step's network");
        }
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _dir = self
            .plugins
            .dir
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let _ = std::fs::remove_file(&self.path);
        // The node's directory under /run goes with its last namespace.
        if let Some(dir) = self.path.parent() {
            let empty = std::fs::read_dir(dir)
                .map(|mut entries| entries.all(|e| e.is_ok_and(|e| e.file_name() == OWNER)))
                .unwrap_or(false);
            if empty {
                let _ = std::fs::remove_file(dir.join(OWNER));
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// Where the namespaces of the node whose state is `state` are mounted:
/// `/run/strata/netns/` and a name derived from the state directory's
/// path, the same for every process that opens it.
fn namespaces_for(state: &Path) -> PathBuf {
    // The state directory's parent exists (the node made it); the
    // directory itself may not yet.
    let key = match (state.parent(), state.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| state.to_path_buf()),
        _ => state.to_path_buf(),
    };
    let digest = blake3::hash(key.as_os_str().as_encoded_bytes());
    PathBuf::from("/run/strata/netns").join(&digest.to_hex()[..16])
}

/// Makes a network namespace and keeps it alive by bind-mounting it at
/// `path` (as `ip netns add` does): a thread of its own enters it, so this
/// process's network stays the host's.
fn create_namespace(path: &Path) -> std::io::Result<()> {
    std::fs::File::create(path)?;
    let target = path.to_path_buf();
    let made = std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
        nix::mount::mount(
            Some(own.as_str()),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread failed"))?;
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}
