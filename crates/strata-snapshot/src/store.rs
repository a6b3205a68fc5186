//! The snapshotter: extracted layer chains on disk, and the writable views
//! steps run in.
//!
//! A chain is identified like Docker's ChainID: the digest of the parent
//! chain and the layer's digest. Each chain's extracted directory is the
//! layer in overlay's lower-dir form, written through an overlay of its
//! parents, so it is only valid on top of exactly that parent chain.
//!
//! Snapshots are either committed (under `snapshots/`, immutable, usable as
//! lowers) or active (under `run/`, a mount with a fresh upper dir). An
//! active snapshot becomes committed only by [`Active::commit`], which
//! writes the layer blob first and then moves the directory into place.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use strata_cas::{ContentStore, Digest, Sha256};

use crate::apply::apply_tar;
use crate::diff::{is_empty_dir, strip_overlay_attrs, write_layer};
use crate::error::{Error, Result, io_err};
use crate::mount::{OverlayMount, mounts_under, unmount};

/// The identity of a stack of layers: its parent chain and its top layer.
pub fn chain_id(parent: Option<&Digest>, layer: &Digest) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"strata.chain.v1\0");
    if let Some(p) = parent {
        h.update(&p.0);
    }
    h.update(&layer.0);
    Digest(*h.finalize().as_bytes())
}

/// A layer a commit produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer {
    /// The uncompressed layer tar's blob.
    pub digest: Digest,
    /// Its sha256: the OCI `diff_id`.
    pub diff_id: Sha256,
    /// Its size in bytes.
    pub size: u64,
    /// The chain it tops.
    pub chain: Digest,
}

/// Committed chains under `snapshots/`, active views under `run/`.
#[derive(Debug)]
pub struct Snapshotter {
    root: PathBuf,
    run: PathBuf,
    cas: Arc<ContentStore>,
    seq: AtomicU64,
    /// The chains each mount (and the extraction before it) uses now,
    /// counted: [`Snapshotter::remove_chains_of`] leaves them.
    in_use: InUse,
}

type InUse = Arc<Mutex<HashMap<Digest, usize>>>;

/// Chains marked in use until this drops.
#[derive(Debug)]
struct Using {
    in_use: InUse,
    chains: Vec<Digest>,
}

impl Drop for Using {
    fn drop(&mut self) {
        let mut m = self.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        for c in &self.chains {
            if let Some(n) = m.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    m.remove(c);
                }
            }
        }
    }
}

impl Snapshotter {
    /// Opens the snapshotter in `state`, clearing what a killed process
    /// left: mounts and half-made directories.
    pub fn open(state: &Path, cas: Arc<ContentStore>) -> Result<Snapshotter> {
        let root = state.join("snapshots");
        let run = state.join("run");
        for dir in [&root, &run, &root.join("empty").join("fs")] {
            fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        }
        for m in mounts_under(&run) {
            if let Err(e) = unmount(&m) {
                tracing::warn!(mount = %m.display(), error = %e, "cannot clear a stale mount");
            }
        }
        for e in fs::read_dir(&run)
            .map_err(io_err("cannot list", &run))?
            .flatten()
        {
            let _ = fs::remove_dir_all(e.path());
        }
        for e in fs::read_dir(&root)
            .map_err(io_err("cannot list", &root))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("tmp-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(Snapshotter {
            root,
            run,
            cas,
            seq: AtomicU64::new(0),
            in_use: InUse::default(),
        })
    }

    /// Marks the chains of `layers` in use, before they are looked for:
    /// a chain removed meanwhile is extracted again, and one not yet
    /// removed stays.
    fn using(&self, layers: &[Digest]) -> Using {
        let mut chains: Vec<Digest> = Vec::with_capacity(layers.len());
        for layer in layers {
            chains.push(chain_id(chains.last(), layer));
        }
        let mut m = self.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        for c in &chains {
            *m.entry(*c).or_default() += 1;
        }
        Using {
            in_use: Arc::clone(&self.in_use),
            chains,
        }
    }

    /// The content store layers are read from and written to.
    pub fn content(&self) -> &Arc<ContentStore> {
        &self.cas
    }

    fn short(chain: &Digest) -> String {
        chain.hex()[..32].to_string()
    }

    /// The extracted directory of a committed chain.
    pub fn chain_dir(&self, chain: &Digest) -> PathBuf {
        self.root.join(Self::short(chain)).join("fs")
    }

    fn fresh_dir(&self, kind: &str) -> Result<PathBuf> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let dir = self.run.join(format!("{kind}-{}-{n}", std::process::id()));
        for sub in ["upper", "work", "merged"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?;
        }
        Ok(dir)
    }

    /// Extracts every prefix of `layers` that is not on disk yet and returns
    /// the chain ids, bottom first.
    pub fn prepare(&self, layers: &[Digest]) -> Result<Vec<Digest>> {
        let mut chains: Vec<Digest> = Vec::with_capacity(layers.len());
        for layer in layers {
            let chain = chain_id(chains.last(), layer);
            if !self.chain_dir(&chain).is_dir() {
                self.extract(&chains, layer, &chain)?;
            }
            chains.push(chain);
        }
        Ok(chains)
    }

    /// Lower-dir paths relative to `snapshots/`, top-most first.
    fn lowers(&self, chains: &[Digest]) -> Vec<PathBuf> {
        chains
            .iter()
            .rev()
            .map(|c| PathBuf::from(Self::short(c)).join("fs"))
            .collect()
    }

    fn extract(&self, below: &[Digest], layer: &Digest, chain: &Digest) -> Result<()> {
        let dir = self.fresh_dir("extract")?;
        let upper = dir.join("upper");
        let mut reader = self.cas.open_blob(layer)?;
        let applied = if below.is_empty() {
            apply_tar(&upper, &mut reader)
        } else {
            let merged = dir.join("merged");
            let mount = OverlayMount::mount(
                &self.root,
                &self.lowers(below),
                Some((&upper, &dir.join("work"))),
                &merged,
            )?;
            let r = apply_tar(&merged, &mut reader);
            mount.unmount()?;
            r
        };
        let finished = applied.and_then(|_| {
            // The tar may end before the blob does; reading to the end is
            // what checks the blob's digest.
            io::copy(&mut reader, &mut io::sink()).map_err(|e| self.cas.read_error(layer, e).into())
        });
        if let Err(e) = finished {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        strip_overlay_attrs(&upper)?;
        self.publish(&upper, chain, below.last(), layer)?;
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }

    /// Moves a finished layer directory into place as `chain`, layer
    /// `layer` on `parent`. If another build got there first, theirs is
    /// kept.
    fn publish(
        &self,
        fs_dir: &Path,
        chain: &Digest,
        parent: Option<&Digest>,
        layer: &Digest,
    ) -> Result<()> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let staging = self.root.join(format!("tmp-{}-{n}", std::process::id()));
        fs::create_dir(&staging).map_err(io_err("cannot create", &staging))?;
        fs::rename(fs_dir, staging.join("fs")).map_err(io_err("cannot move", fs_dir))?;
        let mut ids = vec![("chain", chain.hex()), ("layer", layer.hex())];
        if let Some(p) = parent {
            ids.push(("parent", p.hex()));
        }
        for (name, hex) in ids {
            let file = staging.join(name);
            fs::write(&file, hex).map_err(io_err("cannot write", &file))?;
        }
        // Everything the snapshot holds reaches the disk before its name
        // does: a crash never leaves a published snapshot with files cut
        // short. One syncfs instead of a sync per file.
        let dir = fs::File::open(&staging).map_err(io_err("cannot open", &staging))?;
        nix::unistd::syncfs(&dir).map_err(|e| Error::Io {
            what: "cannot sync",
            path: staging.clone(),
            source: e.into(),
        })?;
        let dest = self.root.join(Self::short(chain));
        match fs::rename(&staging, &dest) {
            Ok(()) => {
                // The new name itself is durable once its directory is.
                if let Ok(root) = fs::File::open(&self.root) {
                    let _ = root.sync_all();
                }
                Ok(())
            }
            Err(_) if dest.join("fs").is_dir() => {
                let _ = fs::remove_dir_all(&staging);
                Ok(())
            }
            Err(e) => Err(Error::Io {
                what: "cannot move snapshot to",
                path: dest,
                source: e,
            }),
        }
    }

    /// A writable view on top of `layers` for one step. It holds the
    /// snapshotter, so it may outlive the borrow it was made from (a
    /// step's process runs between two threads' work on it).
    pub fn active(self: &Arc<Self>, layers: &[Digest]) -> Result<Active> {
        let using = self.using(layers);
        let chains = self.prepare(layers)?;
        let dir = self.fresh_dir("active")?;
        let merged = dir.join("merged");
        let mut lowers = self.lowers(&chains);
        if lowers.is_empty() {
            lowers.push(PathBuf::from("empty/fs"));
        }
        let mount = OverlayMount::mount(
            &self.root,
            &lowers,
            Some((&dir.join("upper"), &dir.join("work"))),
            &merged,
        );
        match mount {
            Ok(mount) => Ok(Active {
                snap: Arc::clone(self),
                dir,
                mount: Some(mount),
                parent: chains.last().copied(),
                _using: using,
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// A read-only view of `layers`, for reading files out of an image or
    /// stage.
    pub fn view(&self, layers: &[Digest]) -> Result<View> {
        let using = self.using(layers);
        let chains = self.prepare(layers)?;
        let dir = self.fresh_dir("view")?;
        let mut lowers = self.lowers(&chains);
        // A read-only overlay needs two lowers; the empty one is harmless.
        lowers.push(PathBuf::from("empty/fs"));
        let merged = dir.join("merged");
        match OverlayMount::mount(&self.root, &lowers, None, &merged) {
            Ok(mount) => Ok(View {
                dir,
                mount: Some(mount),
                _using: using,
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Removes the committed chains that extract a layer in `dropped`, and
    /// those on top of them; returns how many. A chain a mount uses now is
    /// left, as is one made before chains recorded their layer.
    pub fn remove_chains_of(&self, dropped: &std::collections::HashSet<Digest>) -> Result<usize> {
        // Held throughout: a mount starting meanwhile waits, then finds
        // what it needs gone and extracts it again.
        let in_use = self.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        let read = |dir: &Path, name: &str| {
            fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|hex| Digest::from_hex(hex.trim()).ok())
        };
        // (chain, its parent, its layer, its directory)
        let mut chains = Vec::new();
        for e in fs::read_dir(&self.root)
            .map_err(io_err("cannot list", &self.root))?
            .flatten()
        {
            let dir = e.path();
            if let (Some(chain), Some(layer)) = (read(&dir, "chain"), read(&dir, "layer")) {
                chains.push((chain, read(&dir, "parent"), layer, dir));
            }
        }
        let mut gone: std::collections::HashSet<Digest> = std::collections::HashSet::new();
        // Parents before children, however the directory lists them:
        // rounds until nothing more goes (a chain's depth bounds them).
        loop {
            let before = gone.len();
            for (chain, parent, layer, _) in &chains {
                if !in_use.contains_key(chain)
                    && (dropped.contains(layer) || parent.is_some_and(|p| gone.contains(&p)))
                {
                    gone.insert(*chain);
                }
            }
            if gone.len() == before {
                break;
            }
        }
        let mut removed = 0;
        for (chain, _, _, dir) in &chains {
            if gone.contains(chain) {
                fs::remove_dir_all(dir).map_err(io_err("cannot remove", dir))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// How many committed chains are on disk.
    pub fn count(&self) -> Result<usize> {
        Ok(fs::read_dir(&self.root)
            .map_err(io_err("cannot list", &self.root))?
            .flatten()
            .filter(|e| e.path().join("chain").is_file())
            .count())
    }

    /// Removes committed chains not in `keep`; returns how many.
    pub fn remove_except(&self, keep: &std::collections::HashSet<Digest>) -> Result<usize> {
        let mut removed = 0;
        for e in fs::read_dir(&self.root)
            .map_err(io_err("cannot list", &self.root))?
            .flatten()
        {
            let Ok(hex) = fs::read_to_string(e.path().join("chain")) else {
                continue;
            };
            let Ok(chain) = Digest::from_hex(hex.trim()) else {
                continue;
            };
            if !keep.contains(&chain) {
                fs::remove_dir_all(e.path()).map_err(io_err("cannot remove", &e.path()))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// A mounted writable snapshot: a fresh upper dir over committed layers.
/// Dropped without commit, it leaves nothing behind.
#[derive(Debug)]
pub struct Active {
    snap: Arc<Snapshotter>,
    dir: PathBuf,
    mount: Option<OverlayMount>,
    parent: Option<Digest>,
    _using: Using,
}

impl Active {
    /// Where the step sees its root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("merged")
    }

    /// The upper dir: everything the step changed.
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }

    /// The chain this view is on top of.
    pub fn parent(&self) -> Option<Digest> {
        self.parent
    }

    /// Unmounts and turns the changes into a layer: the tar goes to the
    /// content store, then the upper dir becomes the new chain's extracted
    /// directory. `None` when the step changed nothing.
    pub fn commit(self) -> Result<Option<Layer>> {
        self.commit_teeing(None)
    }

    /// [`Active::commit`], the layer's bytes also written to `tee` as they
    /// are made (a cluster worker sends them to the workers that will hold
    /// copies). Best effort: once `tee` fails it is written no more, and
    /// the commit goes on.
    pub fn commit_teeing(mut self, tee: Option<&mut dyn io::Write>) -> Result<Option<Layer>> {
        if let Some(m) = self.mount.take() {
            m.unmount()?;
        }
        let upper = self.upper();
        if is_empty_dir(&upper)? {
            return Ok(None);
        }
        let cas = &self.snap.cas;
        let mut w = cas.writer()?;
        match tee {
            Some(also) => {
                let mut tee = Tee {
                    to: &mut w,
                    also: Some(also),
                };
                write_layer(&upper, &mut tee)?;
                io::Write::flush(&mut tee).map_err(io_err("cannot write the layer of", &upper))?;
            }
            None => {
                write_layer(&upper, &mut w)?;
            }
        }
        let (size, diff_id) = (w.size(), w.sha256());
        let digest = w.commit()?;
        let chain = chain_id(self.parent.as_ref(), &digest);
        if !self.snap.chain_dir(&chain).is_dir() {
            self.snap
                .publish(&upper, &chain, self.parent.as_ref(), &digest)?;
        }
        Ok(Some(Layer {
            digest,
            diff_id,
            size,
            chain,
        }))
    }
}

/// Writes to `to`, and to `also` while it takes the bytes.
struct Tee<'a, W: io::Write> {
    to: W,
    also: Option<&'a mut dyn io::Write>,
}

impl<W: io::Write> io::Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.to.write(buf)?;
        if let Some(also) = &mut self.also
            && also.write_all(&buf[..n]).is_err()
        {
            self.also = None;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.to.flush()?;
        if let Some(also) = &mut self.also
            && also.flush().is_err()
        {
            self.also = None;
        }
        Ok(())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        drop(self.mount.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A mounted read-only snapshot.
#[derive(Debug)]
pub struct View {
    dir: PathBuf,
    mount: Option<OverlayMount>,
    _using: Using,
}

impl View {
    /// Where the files are.
    pub fn root(&self) -> PathBuf {
        self.dir.join("merged")
    }
}

impl Drop for View {
    fn drop(&mut self) {
        drop(self.mount.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}
