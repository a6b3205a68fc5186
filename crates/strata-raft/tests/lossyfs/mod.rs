//! A filesystem that forgets what was not synced, as a machine that loses
//! power does (in the way Jepsen's LazyFS does): a FUSE filesystem held in
//! this process's memory, where each file keeps what was written to it
//! and, apart, what was last made durable by `fsync` or `fdatasync`.
//! [`Mounted::lose_unsynced`] throws away every write since a file's last
//! sync, so a member process killed and started again on it sees only what
//! a real disk would have kept.
//!
//! Names (create, rename, unlink, mkdir) are durable at once, as on a
//! journaling filesystem that orders metadata; file contents and sizes
//! (`write`, `ftruncate`, `fallocate`) are durable only once synced.
//! Every open is direct I/O, so the kernel's page cache never serves data
//! the filesystem has since forgotten.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// The most all files together may hold, written and synced copies
/// counted once: past it, writes fail with `ENOSPC`, as a full disk does.
const CAPACITY: u64 = 2 << 30;

/// Attributes and names are never cached by the kernel: what the
/// filesystem forgets, the kernel must not remember.
const TTL: Duration = Duration::ZERO;

enum Kind {
    Dir {
        parent: u64,
        entries: BTreeMap<OsString, u64>,
    },
    File {
        /// What reads see.
        data: Vec<u8>,
        /// What survives a loss of power.
        synced: Vec<u8>,
        /// The bytes written since the last sync, as one range.
        dirty: Option<(usize, usize)>,
    },
}

struct Inode {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    nlink: u32,
    /// Open handles: an unlinked file lives until the last is closed.
    open: u32,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Inode {
    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, size) = match &self.kind {
            Kind::Dir { entries, .. } => (FileType::Directory, entries.len() as u64),
            Kind::File { data, .. } => (FileType::RegularFile, data.len() as u64),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.ctime,
            kind,
            perm: self.perm,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

fn mark(dirty: &mut Option<(usize, usize)>, lo: usize, hi: usize) {
    *dirty = Some(match *dirty {
        Some((a, b)) => (a.min(lo), b.max(hi)),
        None => (lo, hi),
    });
}

/// What a loss of power took.
#[derive(Debug, Default, Clone, Copy)]
pub struct Lost {
    /// Files whose contents went back to their last sync.
    pub files: u64,
    /// Bytes written and never synced.
    pub bytes: u64,
}

#[derive(Default)]
struct Tree {
    nodes: HashMap<u64, Inode>,
    next: u64,
    /// Bytes held by every file, both copies.
    held: u64,
}

impl Tree {
    fn new(uid: u32, gid: u32) -> Tree {
        let now = SystemTime::now();
        let mut nodes = HashMap::new();
        nodes.insert(
            INodeNo::ROOT.0,
            Inode {
                kind: Kind::Dir {
                    parent: INodeNo::ROOT.0,
                    entries: BTreeMap::new(),
                },
                perm: 0o755,
                uid,
                gid,
                nlink: 2,
                open: 0,
                mtime: now,
                ctime: now,
            },
        );
        Tree {
            nodes,
            next: INodeNo::ROOT.0 + 1,
            held: 0,
        }
    }

    fn entries(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&dir).map(|n| &mut n.kind) {
            Some(Kind::Dir { entries, .. }) => Ok(entries),
            Some(Kind::File { .. }) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn child(&mut self, dir: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(dir)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    fn add(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        perm: u32,
        kind: Kind,
    ) -> Result<u64, Errno> {
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        let now = SystemTime::now();
        let nlink = if matches!(kind, Kind::Dir { .. }) {
            2
        } else {
            1
        };
        self.nodes.insert(
            ino,
            Inode {
                kind,
                perm: (perm & 0o7777) as u16,
                uid: req.uid(),
                gid: req.gid(),
                nlink,
                open: 0,
                mtime: now,
                ctime: now,
            },
        );
        self.entries(parent)?.insert(name.to_os_string(), ino);
        Ok(ino)
    }

    /// Drops a name of `ino`; the inode goes with its last name and handle.
    fn unlinked(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.nlink = node.nlink.saturating_sub(1);
            node.ctime = SystemTime::now();
            if matches!(node.kind, Kind::Dir { .. }) {
                node.nlink = 0;
            }
        }
        self.collect(ino);
    }

    fn collect(&mut self, ino: u64) {
        let gone = self
            .nodes
            .get(&ino)
            .is_some_and(|n| n.nlink == 0 && n.open == 0);
        if gone
            && let Some(Inode {
                kind: Kind::File { data, synced, .. },
                ..
            }) = self.nodes.remove(&ino)
        {
            self.held -= (data.len() + synced.len()) as u64;
        }
    }

    /// Resizes a file's written copy, keeping the count of bytes held.
    fn resize(&mut self, ino: u64, len: u64) -> Result<(), Errno> {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return Err(Errno::ENOENT);
        };
        let Kind::File { data, dirty, .. } = &mut node.kind else {
            return Err(Errno::EISDIR);
        };
        let old = data.len() as u64;
        if len > old && self.held + (len - old) > CAPACITY {
            return Err(Errno::ENOSPC);
        }
        let len = usize::try_from(len).map_err(|_| Errno::EFBIG)?;
        let (lo, hi) = (data.len().min(len), data.len().max(len));
        data.resize(len, 0);
        mark(dirty, lo, hi);
        node.mtime = SystemTime::now();
        self.held = self.held - old + len as u64;
        Ok(())
    }
}

/// The filesystem as FUSE serves it.
struct LossyFs {
    tree: Arc<Mutex<Tree>>,
}

impl LossyFs {
    fn tree(&self) -> MutexGuard<'_, Tree> {
        // A panic while serving one request must not stop the others.
        self.tree.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn reply_entry(tree: &Tree, ino: Result<u64, Errno>, reply: ReplyEntry) {
    match ino.and_then(|i| tree.nodes.get(&i).map(|n| n.attr(i)).ok_or(Errno::ENOENT)) {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_attr(tree: &Tree, ino: u64, reply: ReplyAttr) {
    match tree.nodes.get(&ino) {
        Some(n) => reply.attr(&TTL, &n.attr(ino)),
        None => reply.error(Errno::ENOENT),
    }
}

fn done(result: Result<(), Errno>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for LossyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut tree = self.tree();
        let ino = tree.child(parent.0, name);
        reply_entry(&tree, ino, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(&self.tree(), ino.0, reply);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut tree = self.tree();
        if let Some(len) = size
            && let Err(e) = tree.resize(ino.0, len)
        {
            return reply.error(e);
        }
        let Some(node) = tree.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(mode) = mode {
            node.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            node.uid = uid;
        }
        if let Some(gid) = gid {
            node.gid = gid;
        }
        match mtime {
            Some(TimeOrNow::SpecificTime(t)) => node.mtime = t,
            Some(TimeOrNow::Now) => node.mtime = SystemTime::now(),
            None => {}
        }
        node.ctime = SystemTime::now();
        reply_attr(&tree, ino.0, reply);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let mut tree = self.tree();
        let ino = tree.add(req, parent.0, name, mode & !umask, new_file());
        reply_entry(&tree, ino, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut tree = self.tree();
        let kind = Kind::Dir {
            parent: parent.0,
            entries: BTreeMap::new(),
        };
        let ino = tree.add(req, parent.0, name, mode & !umask, kind);
        reply_entry(&tree, ino, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut tree = self.tree();
        let result = (|| {
            let ino = tree.child(parent.0, name)?;
            if matches!(
                tree.nodes.get(&ino).map(|n| &n.kind),
                Some(Kind::Dir { .. })
            ) {
                return Err(Errno::EISDIR);
            }
            tree.entries(parent.0)?.remove(name);
            tree.unlinked(ino);
            Ok(())
        })();
        done(result, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut tree = self.tree();
        let result = (|| {
            let ino = tree.child(parent.0, name)?;
            if !tree.entries(ino)?.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            tree.entries(parent.0)?.remove(name);
            tree.unlinked(ino);
            Ok(())
        })();
        done(result, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut tree = self.tree();
        let result = (|| {
            if flags.contains(RenameFlags::RENAME_EXCHANGE)
                || flags.contains(RenameFlags::RENAME_WHITEOUT)
            {
                return Err(Errno::EINVAL);
            }
            let ino = tree.child(parent.0, name)?;
            let moving_dir = matches!(
                tree.nodes.get(&ino).map(|n| &n.kind),
                Some(Kind::Dir { .. })
            );
            let replaced = tree.entries(newparent.0)?.get(newname).copied();
            if let Some(old) = replaced {
                if old == ino {
                    return Ok(());
                }
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                match (moving_dir, tree.entries(old)) {
                    (true, Ok(e)) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
                    (true, Ok(_)) | (false, Err(_)) => {}
                    (true, Err(_)) => return Err(Errno::ENOTDIR),
                    (false, Ok(_)) => return Err(Errno::EISDIR),
                }
            }
            tree.entries(parent.0)?.remove(name);
            tree.entries(newparent.0)?
                .insert(newname.to_os_string(), ino);
            if let Some(Kind::Dir { parent: p, .. }) = tree.nodes.get_mut(&ino).map(|n| &mut n.kind)
            {
                *p = newparent.0;
            }
            if let Some(old) = replaced {
                tree.unlinked(old);
            }
            Ok(())
        })();
        done(result, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut tree = self.tree();
        match tree.nodes.get_mut(&ino.0) {
            Some(node) => {
                node.open += 1;
                reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut tree = self.tree();
        let made = tree.add(req, parent.0, name, mode & !umask, new_file());
        match made {
            Ok(ino) => {
                let Some(node) = tree.nodes.get_mut(&ino) else {
                    return reply.error(Errno::ENOENT);
                };
                node.open += 1;
                let attr = node.attr(ino);
                reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(0),
                    FopenFlags::FOPEN_DIRECT_IO,
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let tree = self.tree();
        match tree.nodes.get(&ino.0).map(|n| &n.kind) {
            Some(Kind::File { data, .. }) => {
                let from = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let to = from.saturating_add(size as usize).min(data.len());
                reply.data(&data[from..to]);
            }
            Some(Kind::Dir { .. }) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut tree = self.tree();
        let result = (|| {
            let end = offset.checked_add(bytes.len() as u64).ok_or(Errno::EFBIG)?;
            let len = match tree.nodes.get(&ino.0).map(|n| &n.kind) {
                Some(Kind::File { data, .. }) => data.len() as u64,
                Some(Kind::Dir { .. }) => return Err(Errno::EISDIR),
                None => return Err(Errno::ENOENT),
            };
            if end > len {
                tree.resize(ino.0, end)?;
            }
            let Some(node) = tree.nodes.get_mut(&ino.0) else {
                return Err(Errno::ENOENT);
            };
            let Kind::File { data, dirty, .. } = &mut node.kind else {
                return Err(Errno::EISDIR);
            };
            let (lo, hi) = (offset as usize, end as usize);
            data[lo..hi].copy_from_slice(bytes);
            mark(dirty, lo, hi);
            node.mtime = SystemTime::now();
            Ok(bytes.len() as u32)
        })();
        match result {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Closing a file makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut tree = self.tree();
        if let Some(node) = tree.nodes.get_mut(&ino.0) {
            node.open = node.open.saturating_sub(1);
        }
        tree.collect(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut tree = self.tree();
        let Tree { nodes, held, .. } = &mut *tree;
        let result = match nodes.get_mut(&ino.0).map(|n| &mut n.kind) {
            Some(Kind::File {
                data,
                synced,
                dirty,
            }) => {
                let before = synced.len();
                synced.resize(data.len(), 0);
                if let Some((lo, hi)) = dirty.take() {
                    let hi = hi.min(data.len());
                    if lo < hi {
                        synced[lo..hi].copy_from_slice(&data[lo..hi]);
                    }
                }
                *held = *held - before as u64 + synced.len() as u64;
                Ok(())
            }
            Some(Kind::Dir { .. }) => Ok(()),
            None => Err(Errno::ENOENT),
        };
        done(result, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree().nodes.get(&ino.0).map(|n| &n.kind) {
            Some(Kind::Dir { .. }) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(Kind::File { .. }) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let tree = self.tree();
        let Some(Kind::Dir { parent, entries }) = tree.nodes.get(&ino.0).map(|n| &n.kind) else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots = [
            (ino.0, FileType::Directory, OsString::from(".")),
            (*parent, FileType::Directory, OsString::from("..")),
        ];
        let children = entries.iter().map(|(name, i)| {
            let kind = match tree.nodes.get(i).map(|n| &n.kind) {
                Some(Kind::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            (*i, kind, name.clone())
        });
        for (n, (i, kind, name)) in dots
            .into_iter()
            .chain(children)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(INodeNo(i), n as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Names are durable at once.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let held = self.tree().held;
        let blocks = CAPACITY / 4096;
        let free = CAPACITY.saturating_sub(held) / 4096;
        reply.statfs(blocks, free, free, 1 << 20, 1 << 20, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut tree = self.tree();
        let result = match mode {
            // Space reserved past the end: nothing a reader sees.
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            0 => {
                let end = offset.saturating_add(length);
                match tree.nodes.get(&ino.0).map(|n| &n.kind) {
                    Some(Kind::File { data, .. }) if (data.len() as u64) < end => {
                        tree.resize(ino.0, end)
                    }
                    Some(Kind::File { .. }) => Ok(()),
                    Some(Kind::Dir { .. }) => Err(Errno::EISDIR),
                    None => Err(Errno::ENOENT),
                }
            }
            _ => Err(Errno::EOPNOTSUPP),
        };
        done(result, reply);
    }
}

fn new_file() -> Kind {
    Kind::File {
        data: Vec::new(),
        synced: Vec::new(),
        dirty: None,
    }
}

/// A lossy filesystem mounted at a folder until dropped.
pub struct Mounted {
    tree: Arc<Mutex<Tree>>,
    _session: fuser::BackgroundSession,
}

impl Mounted {
    /// Mounts an empty lossy filesystem at `at` (an existing, empty
    /// folder); needs root, or the right to mount FUSE filesystems.
    pub fn mount(at: &Path) -> io::Result<Mounted> {
        // The root belongs to whoever owns the folder it covers.
        let (uid, gid) = owner(at)?;
        let tree = Arc::new(Mutex::new(Tree::new(uid, gid)));
        let fs = LossyFs {
            tree: Arc::clone(&tree),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("strata-lossyfs".into()),
            MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(fs, at, &config)?;
        Ok(Mounted {
            tree,
            _session: session,
        })
    }

    /// Every file's contents go back to what was last synced, as after a
    /// loss of power; call it only once every process that had the
    /// filesystem's files open is gone.
    pub fn lose_unsynced(&self) -> Lost {
        let mut tree = self.tree.lock().unwrap_or_else(|p| p.into_inner());
        let mut lost = Lost::default();
        let mut held = 0u64;
        for node in tree.nodes.values_mut() {
            if let Kind::File {
                data,
                synced,
                dirty,
            } = &mut node.kind
            {
                if dirty.take().is_some() || data.len() != synced.len() {
                    lost.files += 1;
                    lost.bytes += differing(data, synced);
                    data.clone_from(synced);
                }
                held += (data.len() + synced.len()) as u64;
            }
        }
        tree.held = held;
        lost
    }
}

/// How many bytes of `now` differ from `synced`, counting a difference
/// in length as that many bytes.
fn differing(now: &[u8], synced: &[u8]) -> u64 {
    let common = now.len().min(synced.len());
    let changed = now[..common]
        .iter()
        .zip(&synced[..common])
        .filter(|(a, b)| a != b)
        .count();
    (changed + now.len().max(synced.len()) - common) as u64
}

fn owner(at: &Path) -> io::Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(at)?;
    Ok((m.uid(), m.gid()))
}
