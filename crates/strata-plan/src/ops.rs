//! The operations a step performs: run a process, copy files, make a
//! directory. They carry fully resolved arguments (expanded, absolute
//! paths) and nothing host-specific, so their encoding is key material.

use serde::{Deserialize, Serialize};
use strata_oci::LayerRef;

/// What a step does to its stage's filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `RUN`.
    Exec(ExecOp),
    /// `COPY` and `ADD`.
    Copy(CopyOp),
    /// The directory `WORKDIR` creates.
    Mkdir(MkdirOp),
}

/// A process to run in the stage's filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOp {
    /// argv, the stage's shell already prepended for the shell form.
    pub args: Vec<String>,
    /// Environment: the stage's `ENV` and declared `ARG` values.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// `USER` (name or ID, `user[:group]`), resolved in the filesystem.
    pub user: String,
    /// `--network=none`.
    pub no_network: bool,
    /// `--network=host`: needs [`crate::Entitlement::NetworkHost`].
    pub host_network: bool,
    /// `--security=insecure`: needs
    /// [`crate::Entitlement::SecurityInsecure`].
    pub insecure: bool,
    /// `--mount`s.
    pub mounts: Vec<RunMount>,
    /// `--add-host`s: lines of `/etc/hosts`.
    pub extra_hosts: Vec<crate::ExtraHost>,
    /// `--shm-size`: of `/dev/shm`, bytes.
    pub shm_size: Option<u64>,
    /// `--ulimit`s.
    pub ulimits: Vec<crate::Ulimit>,
    /// Files the command needs (a heredoc script with a `#!` line),
    /// mounted read-only under `/dev/pipes/`.
    pub files: Vec<InlineFile>,
}

/// A `RUN --mount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMount {
    /// Where it appears.
    pub target: String,
    /// What it is.
    pub kind: RunMountKind,
}

/// The kinds of `RUN --mount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunMountKind {
    /// Files from the context, a stage or an image.
    Bind {
        /// Where from.
        from: Source,
        /// The path within it.
        source: String,
        /// Writes are allowed (and thrown away).
        read_write: bool,
    },
    /// A persistent cache directory.
    Cache {
        /// Its identity across builds; not part of the cache key.
        id: String,
        /// `shared`, `private` or `locked`.
        sharing: String,
        /// Mode of the directory when first made.
        mode: u32,
        /// Owner when first made.
        uid: u32,
        /// Group when first made.
        gid: u32,
        /// Read-only.
        read_only: bool,
    },
    /// An empty tmpfs.
    Tmpfs {
        /// Size limit.
        size: Option<u64>,
    },
    /// A secret given to the build (`--secret id=…`); its content is never
    /// part of a key or a layer.
    Secret {
        /// The secret's name.
        id: String,
        /// Fail when the build was not given it.
        required: bool,
        /// Also expose it as this environment variable.
        env: Option<String>,
        /// File mode.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// An SSH agent forwarded from the client (`--ssh ID=SOCKET`): a
    /// socket at the mount's target; no key ever enters the build.
    Ssh {
        /// The agent's name (`default` unless `id=` says).
        id: String,
        /// Fail when the build was not given it.
        required: bool,
        /// The socket's mode.
        mode: u32,
        /// Its owner.
        uid: u32,
        /// Its group.
        gid: u32,
    },
}

/// Where files come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// The build context (after `.dockerignore`).
    Context,
    /// Another stage of the plan, by its index in [`crate::Plan::stages`].
    Stage(usize),
    /// An image.
    Image(ImageSource),
}

/// An image used as a source, pinned to its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSource {
    /// The normalized reference it was resolved from.
    pub reference: String,
    /// The manifest's sha256, hex.
    pub manifest: String,
    /// Its layers.
    pub layers: Vec<LayerRef>,
}

/// Copying files into the stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyOp {
    /// Where files come from.
    pub from: Source,
    /// Source paths (wildcards allowed), relative to the source's root.
    pub sources: Vec<String>,
    /// Inline sources (heredocs), written as files named after them.
    pub inline: Vec<InlineFile>,
    /// Absolute destination; a trailing `/` means "a directory".
    pub dest: String,
    /// `--chown`, resolved in the destination's filesystem.
    pub chown: Option<String>,
    /// `--chmod` (octal).
    pub chmod: Option<u32>,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude` patterns.
    pub excludes: Vec<String>,
    /// `ADD`: unpack local tar archives.
    pub unpack: bool,
    /// `ADD`: files to download (never unpacked).
    pub urls: Vec<RemoteFile>,
}

/// A file `ADD` downloads over HTTP(S).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteFile {
    /// The URL.
    pub url: String,
    /// The name it gets in the destination: the last segment of the URL's
    /// path, or `__unnamed__`, as BuildKit names it.
    pub name: String,
    /// `--checksum`: the sha256 the content must have (64 hex digits).
    /// With it the step's key needs no download.
    pub sha256: Option<String>,
}

/// A file whose content is part of the Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlineFile {
    /// File name.
    pub name: String,
    /// Content.
    pub data: String,
    /// Mode.
    pub mode: u32,
}

/// `WORKDIR`: make the directory (and parents), owned by the stage's user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirOp {
    /// Absolute path.
    pub path: String,
    /// Owner (`USER`), resolved in the filesystem; empty for root.
    pub user: String,
}

/// One thing a step reads ([`Op::reads`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read<'a> {
    /// Paths selected from a source: a COPY's sources, a bind mount's.
    Paths {
        /// Where from.
        from: &'a Source,
        /// What, in it.
        paths: &'a [String],
        /// Patterns left out (`COPY --exclude`).
        excludes: &'a [String],
    },
    /// A file an ADD downloads.
    Url(&'a RemoteFile),
}

impl Op {
    /// Short name for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Exec(_) => "exec",
            Op::Copy(_) => "copy",
            Op::Mkdir(_) => "mkdir",
        }
    }

    /// Everything this op reads besides its own stage's filesystem, in
    /// the order its inputs are measured: a COPY's selection (one), then
    /// its URLs; a RUN's bind mounts, one each. The one answer to "what
    /// does this step read" for keys, placement and fetching.
    pub fn reads(&self) -> Vec<Read<'_>> {
        match self {
            Op::Copy(c) => {
                let selection = (!c.sources.is_empty()).then_some(Read::Paths {
                    from: &c.from,
                    paths: &c.sources,
                    excludes: &c.excludes,
                });
                selection
                    .into_iter()
                    .chain(c.urls.iter().map(Read::Url))
                    .collect()
            }
            Op::Exec(e) => e
                .mounts
                .iter()
                .filter_map(|m| match &m.kind {
                    RunMountKind::Bind { from, source, .. } => Some(Read::Paths {
                        from,
                        paths: std::slice::from_ref(source),
                        excludes: &[],
                    }),
                    _ => None,
                })
                .collect(),
            Op::Mkdir(_) => Vec::new(),
        }
    }

    /// The stages this op reads from, besides its own.
    pub fn stage_inputs(&self) -> Vec<usize> {
        self.reads()
            .iter()
            .filter_map(|r| match r {
                Read::Paths {
                    from: Source::Stage(s),
                    ..
                } => Some(*s),
                _ => None,
            })
            .collect()
    }
}
