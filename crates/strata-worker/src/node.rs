//! The state directory and its stores.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_cache::LocalCacheIndex;
use strata_cas::{ContentStore, MetaDb};
use strata_oci::ImageStore;
use strata_snapshot::Snapshotter;

use crate::memo::SelectionMemo;

/// Why a node could not open.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The state directory is unusable.
    #[error("state directory {}: {source}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the state directory and did not let go.
    #[error("cannot lock {}: {detail}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// A store failed to open.
    #[error("{0}")]
    Store(String),
    /// Another process holds the state directory (and the caller would
    /// not wait).
    #[error("another strata process holds the state directory {}", .0.display())]
    Busy(PathBuf),
}

/// `$STRATA_HOME`, else `~/.local/share/strata`.
pub fn default_home() -> PathBuf {
    if let Some(h) = std::env::var_os("STRATA_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    base.join("strata")
}

/// Steps a node runs at once across all its builds, unless told
/// otherwise: `STRATA_JOBS`, else four per CPU. Steps that wait (on the
/// network, on a disk, on `sleep`) must overlap, as BuildKit runs every
/// ready step; CPU-bound ones share the CPUs either way.
pub fn default_slots() -> usize {
    // The CPUs this process may use, read once: finding them reads the
    // cgroup's quota files, which every build asked again.
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    std::env::var("STRATA_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .filter(|j| *j > 0)
        .unwrap_or_else(|| {
            *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get())) * 4
        })
}

/// How often [`Node::usage`] walks the directories it measures.
pub const WALK_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The disk space a tree takes (allocated blocks; a file with several
/// links once), walked without recursion; what cannot be read counts 0.
pub(crate) fn dir_bytes(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.nlink() < 2 || seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// One machine's stores, opened by one process at a time.
pub struct Node {
    home: PathBuf,
    /// Blobs.
    pub content: Arc<ContentStore>,
    /// Extracted layers and step mounts.
    pub snapshots: Arc<Snapshotter>,
    /// Named images.
    pub images: Arc<ImageStore>,
    /// Finished steps.
    pub cache: Arc<LocalCacheIndex>,
    /// Checksums of what steps select from stages and images.
    pub selections: SelectionMemo,
    /// Content digests of context files by their stat, for this process.
    pub file_digests: crate::select::FileDigests,
    /// The builds it ran or coordinated, newest kept.
    pub history: crate::History,
    /// The builds running now, step by step.
    pub live: crate::history::Live,
    /// Steps in flight, shared by every build this node runs at once, so
    /// identical steps of concurrent builds run once.
    pub flights: strata_solver::Flights,
    /// Steps running at once across every build of this node.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The OCI runtime, with the step networks it keeps between steps.
    runtime: Result<strata_exec::Runtime, Arc<strata_exec::Error>>,
    /// The last walk of the snapshot and cache-mount directories (when,
    /// and their bytes), for [`Node::usage`].
    walked: std::sync::Mutex<Option<(std::time::Instant, u64, u64)>>,
    /// Held until everything above has closed: fields drop in order, and
    /// the next process must not open the database before it is shut.
    _lock: nix::fcntl::Flock<fs::File>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("home", &self.home)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Opens the node in `home`, waiting while another strata process
    /// uses it.
    pub fn open(home: &Path) -> Result<Node, NodeError> {
        Node::open_with(home, true)
    }

    /// Opens the node in `home`; with `wait` false, another process using
    /// it is an error ([`NodeError::Busy`]) instead of a wait.
    pub fn open_with(home: &Path, wait: bool) -> Result<Node, NodeError> {
        fs::create_dir_all(home).map_err(|source| NodeError::Dir {
            path: home.to_path_buf(),
            source,
        })?;
        // The state directory is its owner's alone: snapshots hold whatever
        // layers hold (setuid-root files, device nodes), and no other user
        // of the host may reach them.
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(home, fs::Permissions::from_mode(0o700)).map_err(|source| {
                NodeError::Dir {
                    path: home.to_path_buf(),
                    source,
                }
            })?;
        }
        let lock_path = home.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| NodeError::Dir {
                path: lock_path.clone(),
                source,
            })?;
        let lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(l) => l,
            Err((_, nix::Error::EWOULDBLOCK)) if !wait => {
                return Err(NodeError::Busy(home.to_path_buf()));
            }
            Err((file, nix::Error::EWOULDBLOCK)) => {
                tracing::warn!(home = %home.display(), "another strata process is using the state directory; waiting");
                nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(
                    |(_, e)| NodeError::Lock {
                        path: lock_path.clone(),
                        detail: e.to_string(),
                    },
                )?
            }
            Err((_, e)) => {
                return Err(NodeError::Lock {
                    path: lock_path,
                    detail: e.to_string(),
                });
            }
        };
        // Sandboxes a killed process left still hold its mounts: they go
        // before the snapshotter clears those.
        let runtime = strata_exec::Runtime::discover(&home.join("runc")).map_err(Arc::new);
        if let Ok(runtime) = &runtime {
            runtime.clear_stale();
        }
        let store = |e: &dyn std::fmt::Display| NodeError::Store(e.to_string());
        let meta_path = home.join("meta");
        let meta = MetaDb::open(
            &meta_path,
            &[
                ContentStore::COLUMN_FAMILIES,
                ImageStore::COLUMN_FAMILIES,
                LocalCacheIndex::COLUMN_FAMILIES,
                SelectionMemo::COLUMN_FAMILIES,
                crate::History::COLUMN_FAMILIES,
            ]
            .concat(),
        )
        .map_err(|e| NodeError::Store(format!("{}: {e}", meta_path.display())))?;
        let content = Arc::new(
            ContentStore::open_in(&home.join("content"), Arc::clone(&meta))
                .map_err(|e| store(&e))?,
        );
        let snapshots =
            Arc::new(Snapshotter::open(home, Arc::clone(&content)).map_err(|e| store(&e))?);
        let images = Arc::new(
            ImageStore::open(Arc::clone(&meta), Arc::clone(&content)).map_err(|e| store(&e))?,
        );
        let cache = Arc::new(LocalCacheIndex::open(Arc::clone(&meta)).map_err(|e| store(&e))?);
        let selections = SelectionMemo::open(Arc::clone(&meta)).map_err(|e| store(&e))?;
        let history = crate::History::open(meta).map_err(|e| store(&e))?;
        for dir in ["cache-mounts", "runc", "tmp"] {
            let p = home.join(dir);
            fs::create_dir_all(&p).map_err(|source| NodeError::Dir { path: p, source })?;
        }
        Ok(Node {
            home: home.to_path_buf(),
            content,
            snapshots,
            images,
            cache,
            selections,
            file_digests: crate::select::FileDigests::default(),
            history,
            live: crate::history::Live::default(),
            flights: strata_solver::Flights::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(default_slots())),
            runtime,
            walked: std::sync::Mutex::new(None),
            _lock: lock,
        })
    }

    /// Bytes the state directory holds, by kind: `blobs` (from the
    /// store's records), `snapshots` and `cache_mounts` (walked on disk,
    /// at most once every [`WALK_EVERY`], as `du` counts them).
    pub fn usage(&self) -> Vec<(&'static str, u64)> {
        let blobs = self.content.total_size().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot measure the content store");
            0
        });
        let (snapshots, mounts) = {
            let mut walked = self
                .walked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match *walked {
                Some((at, s, m)) if at.elapsed() < WALK_EVERY => (s, m),
                _ => {
                    let s = dir_bytes(&self.home.join("snapshots"));
                    let m = dir_bytes(&self.home.join("cache-mounts"));
                    *walked = Some((std::time::Instant::now(), s, m));
                    (s, m)
                }
            }
        };
        vec![
            ("blobs", blobs),
            ("snapshots", snapshots),
            ("cache_mounts", mounts),
        ]
    }

    /// The state directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The OCI runtime steps and `strata run` use; why there is none.
    pub fn runtime(&self) -> Result<&strata_exec::Runtime, Arc<strata_exec::Error>> {
        self.runtime.as_ref().map_err(Arc::clone)
    }
}
