//! `strata build`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use strata_dockerfile::{Platform, lint};
use strata_oci::{Compression, Reference};
use strata_plan::{Entitlement, ExtraHost, Grants, NetworkMode, RunSettings, ShmSize, Ulimit};
use strata_registry::Registry;
use strata_solver::StepRecord;
use strata_worker::{
    BuildError, BuildRecord, BuildRequest, BuildStatus, CacheFrom, CacheLocation, CacheMode,
    CacheTo, NamedContext, PlanInputs, SOURCE_DATE_EPOCH, Timestamps, build, export_cache,
    exported_keys, import_cache, parse_cache_from, parse_cache_to, parse_named_context,
};
use tracing::Instrument as _;

use crate::cx::Cx;
use crate::dockerfile::parse_build_args;
use crate::progress::Mode;
use crate::registry::RegistryFlags;
use crate::units::human_size;

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct BuildArgs {
    /// Name (and tag) for the image; repeatable.
    #[arg(short = 't', long = "tag")]
    tags: Vec<String>,
    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// A build argument; `KEY` alone takes its value from the environment.
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    build_args: Vec<String>,
    /// The stage to build (default: the last).
    #[arg(long)]
    target: Option<String>,
    /// Do not use the cache.
    #[arg(long)]
    no_cache: bool,
    /// Do not use the cache for these stages' steps (by name);
    /// repeatable or comma-separated.
    #[arg(long = "no-cache-filter", value_name = "STAGE", value_delimiter = ',')]
    no_cache_filter: Vec<String>,
    /// Pull base images again even when they are stored.
    #[arg(long)]
    pull: bool,
    /// Push the image to its registry under every `-t` name (the same as
    /// `--output type=registry`).
    #[arg(long)]
    push: bool,
    /// Load the image into the Docker engine (`DOCKER_HOST`, else
    /// `/var/run/docker.sock`), as buildx does; the same as `--output
    /// type=docker`.
    #[arg(long)]
    load: bool,
    /// How to show progress.
    #[arg(long, value_enum, default_value = "auto")]
    progress: Mode,
    /// Print nothing but the image ID (as `docker build -q`; the same as
    /// `--progress quiet`).
    #[arg(short, long, conflicts_with = "progress")]
    quiet: bool,
    /// Also write the image: `type=local,dest=DIR` or `type=tar,dest=FILE`
    /// (its files; `-o DIR` and `-o -` for short),
    /// `type=oci,dest=PATH[,compression=gzip|zstd|uncompressed][,tar=false]`,
    /// `type=docker[,dest=PATH]` (without dest: into the Docker engine),
    /// `type=registry` or `type=image` (the local store only). A dest of
    /// `-` is standard output. Any of them takes `rewrite-timestamp=true`:
    /// with SOURCE_DATE_EPOCH, clamp the base image's files' times too.
    #[arg(long = "output", short = 'o')]
    outputs: Vec<String>,
    /// A secret for `RUN --mount=type=secret`: `id=ID,src=PATH` or `id=ID,env=VAR`.
    #[arg(long = "secret")]
    secrets: Vec<String>,
    /// An SSH agent for `RUN --mount=type=ssh`: `default` (the client's
    /// SSH_AUTH_SOCK), `ID` or `ID=SOCKET`. The agent is forwarded; no key
    /// enters the build.
    #[arg(long = "ssh", value_name = "default|ID[=SOCKET]")]
    ssh: Vec<String>,
    /// Run BuildKit's build checks on the Dockerfile instead of building:
    /// print what they find and exit 1 if anything is (buildx's `--check`).
    #[arg(long)]
    check: bool,
    /// Write a JSON report of the build (every step, its key, cached or not, times).
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Most steps to run at once (default: the number of CPUs).
    #[arg(long)]
    jobs: Option<usize>,
    /// Platform to build for (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    /// Build on a cluster: its client configuration (`DIR/client.toml`).
    #[arg(long, env = "STRATA_CLUSTER", value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// Let the build have an entitlement: `network.host` (for `RUN
    /// --network=host`) or `security.insecure` (for `RUN
    /// --security=insecure`). Repeatable or comma-separated. The node
    /// that runs the build must grant it too.
    #[arg(long = "allow", value_name = "ENTITLEMENT", value_delimiter = ',')]
    allow: Vec<Entitlement>,
    /// The entitlements this machine grants its local builds (as
    /// buildkitd's flag of the same name); none by default. A cluster's
    /// nodes grant them in their own configuration.
    #[arg(
        long = "allow-insecure-entitlement",
        env = "STRATA_INSECURE_ENTITLEMENTS",
        value_name = "ENTITLEMENT",
        value_delimiter = ','
    )]
    grant: Vec<Entitlement>,
    /// Set metadata on the image: `KEY=VALUE`; repeatable (over the
    /// Dockerfile's `LABEL`s).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Write the image ID to this file (as `docker build --iidfile`).
    #[arg(long, value_name = "FILE")]
    iidfile: Option<PathBuf>,
    /// Write the build's result as JSON to this file, with buildx's keys
    /// (`containerimage.digest`, `containerimage.config.digest`,
    /// `image.name`, `buildx.build.ref`).
    #[arg(long = "metadata-file", value_name = "FILE")]
    metadata_file: Option<PathBuf>,
    /// The network of every `RUN` without a `--network` of its own:
    /// `default`, `none` or `host` (which asks for the `network.host`
    /// entitlement, as buildx does).
    #[arg(long, value_name = "MODE", default_value = "default")]
    network: NetworkMode,
    /// A line for every step's `/etc/hosts`: `HOST:IP`; repeatable.
    #[arg(long = "add-host", value_name = "HOST:IP")]
    add_hosts: Vec<ExtraHost>,
    /// Size of every step's `/dev/shm` (`64m`, `1g`; default 64 MiB).
    #[arg(long = "shm-size", value_name = "SIZE")]
    shm_size: Option<ShmSize>,
    /// A resource limit for every step: `NAME=SOFT[:HARD]` (`nofile=1024:2048`);
    /// repeatable.
    #[arg(long = "ulimit", value_name = "NAME=SOFT[:HARD]")]
    ulimits: Vec<Ulimit>,
    /// Another context, by name: `NAME=docker-image://REF`,
    /// `NAME=oci-layout://PATH` or `NAME=DIR`. `FROM NAME`,
    /// `COPY --from=NAME` and `RUN --mount=from=NAME` use it instead of the
    /// image of that name; repeatable.
    #[arg(long = "build-context", value_name = "NAME=VALUE")]
    build_contexts: Vec<String>,
    /// Import a build cache before building: `type=registry,ref=REF`,
    /// `type=local,src=DIR[,tag=TAG]`, or `REF`; repeatable. A cache that
    /// cannot be read is a warning, as in buildx.
    #[arg(long = "cache-from", value_name = "SPEC")]
    cache_from: Vec<String>,
    /// Export the build's cache: `type=registry,ref=REF` or
    /// `type=local,dest=DIR[,tag=TAG]`, with `mode=min|max` (the image's
    /// stages, or every stage), `compression=gzip|zstd|uncompressed` and
    /// `ignore-error=true`; repeatable.
    #[arg(long = "cache-to", value_name = "SPEC")]
    cache_to: Vec<String>,
    /// The build context: a directory, a git repository
    /// (`https://host/repo.git#REF:DIR`, `git@host:repo`, `git://…`,
    /// `github.com/org/repo`) or `-`: a tar archive (or a lone Dockerfile)
    /// on standard input.
    context: PathBuf,
    /// How messages name the Dockerfile when it came from standard input
    /// or a git repository.
    #[arg(skip)]
    #[serde(default)]
    shown_dockerfile: Option<String>,
    /// The context was fetched from a git repository.
    #[arg(skip)]
    #[serde(default)]
    remote_context: bool,
    /// One platform of a multi-platform build: its image ID is not the
    /// build's answer to `-q`.
    #[arg(skip)]
    #[serde(default)]
    one_of_platforms: bool,
}

impl BuildArgs {
    /// How progress is shown: `-q` is `--progress quiet`.
    pub fn progress_mode(&self) -> Mode {
        if self.quiet {
            Mode::Quiet
        } else {
            self.progress
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Output {
    /// An OCI layout (`dest` of `-`: a tar on standard output).
    Oci {
        dest: Dest,
        compression: Compression,
        tar: bool,
    },
    /// A `docker save` archive; with no `dest`, loaded into the Docker
    /// engine (`--load`).
    Docker { dest: Option<Dest> },
    /// Push to the registry each tag names.
    Registry { compression: Compression },
    /// The local image store, where every build's image goes anyway.
    Image,
    /// The image's files, into a directory.
    Local { dest: PathBuf },
    /// The image's files as one tar.
    Tar { dest: Dest },
}

impl Output {
    /// The output with its paths the client's.
    fn resolved(self, cx: &Cx) -> Output {
        match self {
            Output::Oci {
                dest,
                compression,
                tar,
            } => Output::Oci {
                dest: dest.resolved(cx),
                compression,
                tar,
            },
            Output::Docker { dest } => Output::Docker {
                dest: dest.map(|d| d.resolved(cx)),
            },
            Output::Local { dest } => Output::Local {
                dest: cx.path(&dest),
            },
            Output::Tar { dest } => Output::Tar {
                dest: dest.resolved(cx),
            },
            other => other,
        }
    }
}

/// Where an output is written: a path, or `-` for standard output.
#[derive(Debug, Clone, PartialEq)]
enum Dest {
    Path(PathBuf),
    Stdout,
}

impl Dest {
    fn parse(s: &str) -> Dest {
        if s == "-" {
            Dest::Stdout
        } else {
            Dest::Path(PathBuf::from(s))
        }
    }

    fn resolved(self, cx: &Cx) -> Dest {
        match self {
            Dest::Path(p) => Dest::Path(cx.path(&p)),
            Dest::Stdout => Dest::Stdout,
        }
    }
}

/// An `--output`: where the image goes, and whether it asks for
/// `rewrite-timestamp=true`. As buildx, a value with no `=` is a
/// directory for `type=local`, and `-` is `type=tar` to standard output.
fn parse_output(s: &str) -> Result<(Output, bool)> {
    if !s.contains('=') {
        return Ok(match s {
            "" => bail!("--output: give a directory, - or type=…"),
            "-" => (Output::Tar { dest: Dest::Stdout }, false),
            dir => (
                Output::Local {
                    dest: PathBuf::from(dir),
                },
                false,
            ),
        });
    }
    let mut kv = BTreeMap::new();
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("--output {s:?}: expected key=value, got {part:?}"))?;
        kv.insert(k.trim().to_string(), v.trim().to_string());
    }
    let compression = kv
        .get("compression")
        .map(|c| c.parse())
        .transpose()
        .map_err(anyhow::Error::msg)?
        .unwrap_or_default();
    let dest = || {
        kv.get("dest")
            .map(|d| Dest::parse(d))
            .with_context(|| format!("--output {s:?}: dest=PATH is required"))
    };
    let rewrite = match kv.get("rewrite-timestamp").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => bail!("--output {s:?}: rewrite-timestamp is true or false, not {other:?}"),
    };
    let output = match kv.get("type").map(String::as_str) {
        Some("oci") => Output::Oci {
            dest: dest()?,
            compression,
            tar: kv.get("tar").is_none_or(|t| t != "false"),
        },
        Some("docker") => Output::Docker {
            dest: kv.get("dest").map(|d| Dest::parse(d)),
        },
        Some("registry") => Output::Registry { compression },
        Some("image") => match kv.get("push").map(String::as_str) {
            Some("true") => Output::Registry { compression },
            _ => Output::Image,
        },
        Some("local") => match dest()? {
            Dest::Path(dest) => Output::Local { dest },
            Dest::Stdout => bail!(
                "--output {s:?}: type=local writes a directory; use type=tar for standard output"
            ),
        },
        Some("tar") => Output::Tar { dest: dest()? },
        Some(other) => {
            bail!(
                "--output type={other} is not supported: use type=local, tar, oci, docker, registry or image"
            )
        }
        None => {
            bail!("--output {s:?}: type=local, tar, oci, docker, registry or image is required")
        }
    };
    if let Output::Oci {
        dest: Dest::Stdout,
        tar: false,
        ..
    } = output
    {
        bail!("--output {s:?}: tar=false writes a directory, not standard output");
    }
    Ok((output, rewrite))
}

/// `--ssh`s: agent sockets by id, as buildx spells them; the client's
/// SSH_AUTH_SOCK when no socket is named.
fn parse_ssh(cx: &Cx, raw: &[String]) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for s in raw {
        let (id, paths) = match s.split_once('=') {
            Some((id, paths)) => (id, Some(paths)),
            None => (s.as_str(), None),
        };
        if id.is_empty() {
            bail!("--ssh {s:?}: expected default, ID or ID=SOCKET");
        }
        let socket = match paths {
            None | Some("") => cx
                .session
                .env("SSH_AUTH_SOCK")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .with_context(|| {
                    format!(
                        "--ssh {s}: SSH_AUTH_SOCK is not set; start an agent (eval $(ssh-agent); ssh-add) \
                         or name its socket with --ssh {id}=SOCKET"
                    )
                })?,
            Some(p) if p.contains(',') => bail!(
                "--ssh {s}: one agent socket per id (strata forwards agents; it does not load key files)"
            ),
            Some(p) => cx.path(Path::new(p)),
        };
        let meta = std::fs::metadata(&socket)
            .with_context(|| format!("--ssh {id}: cannot use {}", socket.display()))?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            bail!(
                "--ssh {id}: {} is not an agent socket; strata forwards SSH agents and never \
                 reads keys: load the key into an agent (ssh-add {}) and give --ssh {id}",
                socket.display(),
                socket.display()
            );
        }
        if out.insert(id.to_string(), socket).is_some() {
            bail!("--ssh {id}: given twice");
        }
    }
    Ok(out)
}

/// `--secret`s, their files and variables the client's.
fn parse_secrets(cx: &Cx, raw: &[String]) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for s in raw {
        let mut kv = BTreeMap::new();
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("--secret {s:?}: expected key=value"))?;
            kv.insert(k, v);
        }
        let id = kv
            .get("id")
            .with_context(|| format!("--secret {s:?}: id=ID is required"))?;
        let value = if let Some(src) = kv.get("src").or_else(|| kv.get("source")) {
            std::fs::read(cx.path(Path::new(src)))
                .with_context(|| format!("--secret id={id}: cannot read {src}"))?
        } else if let Some(var) = kv.get("env") {
            cx.session
                .env(var)
                .with_context(|| {
                    format!("--secret id={id}: environment variable {var} is not set")
                })?
                .as_bytes()
                .to_vec()
        } else {
            cx.session
                .env(&id.to_uppercase())
                .map(|v| v.as_bytes().to_vec())
                .with_context(|| format!("--secret {s:?}: give src=PATH or env=VAR"))?
        };
        out.insert(id.to_string(), value);
    }
    Ok(out)
}

#[derive(Serialize)]
struct Report<'a> {
    /// The build's id, as its log lines name it.
    id: &'a str,
    image: ReportImage,
    duration_seconds: f64,
    /// Bytes of layers a cluster build fetched from its workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_fetched: Option<u64>,
    steps: &'a [StepRecord],
}

#[derive(Serialize)]
struct ReportImage {
    id: String,
    manifest_digest: String,
    tags: Vec<String>,
    size: u64,
}

/// What the client gathers before the build goes to the daemon: a git
/// repository given as the context, fetched with the user's own git, then
/// what `-` stands for, read from standard input: the Dockerfile (`-f -`)
/// or the context (`strata build -`). The returned handles keep the files
/// until the build is over.
pub fn client_inputs(
    home: &Path,
    args: Box<BuildArgs>,
) -> Result<(Box<BuildArgs>, Vec<crate::stdio::Spooled>)> {
    let (args, repo) = from_git(home, args)?;
    let (args, stdin) = from_stdin(home, args)?;
    Ok((args, repo.into_iter().chain(stdin).collect()))
}

/// A git URL as the context: the repository fetched into the state
/// directory, the context its directory there; a relative `-f` is a file
/// of the repository, as buildx takes it.
fn from_git(
    home: &Path,
    mut args: Box<BuildArgs>,
) -> Result<(Box<BuildArgs>, Option<crate::stdio::Spooled>)> {
    let Some(url) = args.context.to_str().filter(|s| crate::git::is_git_url(s)) else {
        return Ok((args, None));
    };
    let repo = crate::git::GitContext::parse(url)?;
    let tmp = home.join("tmp");
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot make {}", tmp.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("git-context-")
        .tempdir_in(&tmp)
        .context("cannot make a directory for the git context")?;
    let context = repo.fetch(dir.path())?;
    let shown = match args.file.clone().as_deref() {
        Some(f) if f == Path::new("-") => None,
        Some(f) if f.is_relative() => {
            let inside = context.join(f);
            let resolved = inside.canonicalize().with_context(|| {
                format!(
                    "git context {repo}: no file {} in the repository",
                    f.display()
                )
            })?;
            if !resolved.starts_with(&context) {
                bail!(
                    "git context {repo}: {} is not inside the context",
                    f.display()
                );
            }
            args.file = Some(resolved);
            Some(f.display().to_string())
        }
        Some(_) => None,
        None => Some("Dockerfile".to_string()),
    };
    if shown.is_some() {
        args.shown_dockerfile = shown;
    }
    args.context = context;
    args.remote_context = true;
    Ok((args, Some(crate::stdio::Spooled::Dir(dir))))
}

/// `-` in a build's arguments, read from standard input.
fn from_stdin(
    home: &Path,
    mut args: Box<BuildArgs>,
) -> Result<(Box<BuildArgs>, Option<crate::stdio::Spooled>)> {
    let to_stdout = args.outputs.iter().any(|o| {
        matches!(
            parse_output(o),
            Ok((
                Output::Oci {
                    dest: Dest::Stdout,
                    ..
                } | Output::Docker {
                    dest: Some(Dest::Stdout)
                } | Output::Tar { dest: Dest::Stdout },
                _
            ))
        )
    });
    if to_stdout && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        bail!(
            "an --output to standard output was asked for, but standard output is a terminal: redirect it, or give dest=FILE"
        );
    }
    let dash = Path::new("-");
    match (args.file.as_deref() == Some(dash), args.context == dash) {
        (true, true) => {
            bail!("the Dockerfile and the context cannot both come from standard input")
        }
        (true, false) => {
            let spooled = crate::stdio::Spooled::File(crate::stdio::spool(home, "the Dockerfile")?);
            args.file = Some(spooled.path().to_path_buf());
            args.shown_dockerfile = Some("Dockerfile".into());
            Ok((args, Some(spooled)))
        }
        (false, true) => {
            let dir = crate::stdio::Spooled::Dir(crate::stdio::context(home)?);
            args.context = dir.path().to_path_buf();
            args.shown_dockerfile = Some("Dockerfile".into());
            Ok((args, Some(dir)))
        }
        (false, false) => Ok((args, None)),
    }
}

/// `strata build`: the build, then its record in the history.
pub async fn run(cx: &Cx, args: BuildArgs, flags: &RegistryFlags) -> Result<u8> {
    // Every log line of the build, here and on the nodes it runs on,
    // names it by this id, as its report, history and last line do.
    let build_id = strata_solver::new_build_id();
    let span = tracing::info_span!("build", id = %build_id);
    recorded(cx, args, flags, &build_id).instrument(span).await
}

/// The build `build_id`, recorded in the node's history and its view of
/// running builds.
async fn recorded(cx: &Cx, args: BuildArgs, flags: &RegistryFlags, build_id: &str) -> Result<u8> {
    let on = if args.cluster.is_some() {
        "cluster"
    } else {
        "local"
    };
    let mut record = BuildRecord::begin(build_id, args.tags.clone(), on);
    let started = Instant::now();
    cx.node.live.begin(build_id, &args.tags, None);
    let result = build_and_output(cx, args, flags, build_id, &mut record).await;
    cx.node.live.end(build_id);
    record.duration_seconds = started.elapsed().as_secs_f64();
    match &result {
        Ok(_) => record.status = BuildStatus::Succeeded,
        Err(e) if cancelled(e) => record.status = BuildStatus::Cancelled,
        Err(e) => {
            record.status = BuildStatus::Failed;
            record.error = Some(crate::error_text(e));
        }
    }
    if let Err(e) = cx.node.history.record(&record) {
        tracing::warn!(error = %e, "the build is not in the history");
    }
    result
}

/// Stage names as the plan has them (`AS` names are case-insensitive).
fn stage_names(given: &[String]) -> Vec<String> {
    given.iter().map(|s| s.to_lowercase()).collect()
}

/// `--label KEY=VALUE`s.
fn parse_labels(given: &[String]) -> Result<BTreeMap<String, String>> {
    given
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("--label {l:?}: expected KEY=VALUE"),
        })
        .collect()
}

/// `--build-context`s by name, their paths the client's; a name given
/// twice is an error, as in buildx.
fn parse_contexts(cx: &Cx, given: &[String]) -> Result<BTreeMap<String, NamedContext>> {
    let mut contexts = BTreeMap::new();
    for g in given {
        let (name, context) = parse_named_context(g)?;
        let context = match context {
            NamedContext::Dir(p) => NamedContext::Dir(cx.path(&p)),
            NamedContext::Layout(p) => NamedContext::Layout(cx.path(&p)),
            image => image,
        };
        if contexts.insert(name.clone(), context).is_some() {
            bail!("--build-context {name} is given twice");
        }
    }
    Ok(contexts)
}

/// `--cache-from`s and `--cache-to`s, their directories the client's.
fn parse_caches(cx: &Cx, from: &[String], to: &[String]) -> Result<(Vec<CacheFrom>, Vec<CacheTo>)> {
    let local = |location: CacheLocation| match location {
        CacheLocation::Local { dir, tag } => CacheLocation::Local {
            dir: cx.path(&dir),
            tag,
        },
        registry => registry,
    };
    let from = from
        .iter()
        .map(|s| {
            let c = parse_cache_from(s)?;
            Ok(CacheFrom {
                location: local(c.location),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let to = to
        .iter()
        .map(|s| {
            let c = parse_cache_to(s)?;
            Ok(CacheTo {
                location: local(c.location.clone()),
                ..c
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((from, to))
}

/// Imports each `--cache-from`; one that cannot be read is a warning and
/// the build goes on without it, as in buildx.
async fn import_caches(
    cx: &Cx,
    registry: &Arc<Registry>,
    from: &[CacheFrom],
    progress: Mode,
) -> Result<()> {
    for c in from {
        let transfer = cx.session.transfer();
        let imported = import_cache(&cx.node, registry, c, transfer.as_ref()).await;
        cx.session.progress_done();
        match imported {
            Ok(i) if !matches!(progress, Mode::Quiet | Mode::Rawjson) => {
                let downloaded = match c.location {
                    CacheLocation::Registry(_) => format!("; {} downloaded", human_size(i.bytes)),
                    CacheLocation::Local { .. } => String::new(),
                };
                writeln!(
                    cx.err(),
                    "imported cache from {}: {} steps, {} new{downloaded}",
                    c.location,
                    i.records,
                    i.added,
                )?
            }
            Ok(_) => {}
            Err(e) => writeln!(
                cx.err(),
                "[Warning] cannot import cache from {}: {}; building without it",
                c.location,
                strata_registry::error_chain(&e)
            )?,
        }
    }
    Ok(())
}

/// Exports the build's cache to each `--cache-to`; a failure fails the
/// build unless the export said `ignore-error=true`.
async fn export_caches(
    cx: &Cx,
    registry: &Arc<Registry>,
    to: &[CacheTo],
    keys_of: impl Fn(CacheMode) -> Vec<strata_cas::Digest>,
    progress: Mode,
) -> Result<()> {
    for c in to {
        let keys = keys_of(c.mode);
        let transfer = cx.session.transfer();
        let exported = export_cache(&cx.node, registry, c, keys, transfer.as_ref()).await;
        cx.session.progress_done();
        match exported {
            Ok(e) if !matches!(progress, Mode::Quiet | Mode::Rawjson) => writeln!(
                cx.err(),
                "exported cache to {}: {} steps, {} layers; {} sent",
                c.location,
                e.records,
                e.layers,
                human_size(e.bytes)
            )?,
            Ok(_) => {}
            Err(e) if c.ignore_error => writeln!(
                cx.err(),
                "[Warning] cannot export cache to {}: {}",
                c.location,
                strata_registry::error_chain(&e)
            )?,
            Err(e) => {
                return Err(anyhow::Error::from(e))
                    .with_context(|| format!("cannot export cache to {}", c.location));
            }
        }
    }
    Ok(())
}

/// BuildKit's warning for `--build-arg`s nothing consumes.
fn warn_unused(cx: &Cx, inputs: &PlanInputs) -> Result<()> {
    let unused = inputs.unused_build_args();
    if !unused.is_empty() {
        writeln!(
            cx.err(),
            "[Warning] One or more build-args [{}] were not consumed",
            unused.join(" ")
        )?;
    }
    Ok(())
}

/// A Dockerfile's build checks (BuildKit's linter): the configuration its
/// `check` directive (or `BUILDKIT_DOCKERFILE_CHECK`) gives, what it shows
/// on its own, then what planning adds (`UndefinedVar`).
struct Checks {
    config: lint::CheckConfig,
    findings: Vec<lint::Finding>,
    source: String,
    shown: String,
}

impl Checks {
    /// The Dockerfile's own findings; `None` when it does not parse (the
    /// build says why).
    fn of(
        path: &Path,
        shown: &str,
        build_args: &BTreeMap<String, String>,
    ) -> Result<Option<Checks>> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read Dockerfile {shown}"))?;
        let Ok(df) = strata_dockerfile::Dockerfile::parse(&bytes) else {
            return Ok(None);
        };
        let config =
            lint::CheckConfig::of(&df, build_args).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
        let findings = lint::check(&df, &config);
        Ok(Some(Checks {
            config,
            findings,
            source: String::from_utf8_lossy(&bytes).into_owned(),
            shown: shown.to_string(),
        }))
    }

    /// Adds the planner's findings the configuration does not skip.
    fn with_plan(&mut self, planned: &[lint::Finding]) {
        self.findings.extend(
            planned
                .iter()
                .filter(|f| self.config.checks(f.rule))
                .cloned(),
        );
        self.findings.sort_by_key(|f| f.line);
        self.findings.dedup();
    }

    /// Refuses the build, listing the findings, when the directive says
    /// `error=true` and there is any.
    fn enforce(&self, cx: &Cx) -> Result<()> {
        if !self.config.error || self.findings.is_empty() {
            return Ok(());
        }
        self.print_warnings(cx)?;
        bail!("{}", lint::violation(&self.findings, &self.shown));
    }

    /// The list a build prints, as buildx does.
    fn print_warnings(&self, cx: &Cx) -> Result<()> {
        if self.findings.is_empty() {
            return Ok(());
        }
        let mut err = cx.err();
        let n = self.findings.len();
        writeln!(err, " {n} warning{} found:", if n == 1 { "" } else { "s" })?;
        for f in &self.findings {
            writeln!(err, " - {f}")?;
        }
        Ok(())
    }

    /// `--check`'s report, as buildx's; the exit code (1 with findings).
    fn print_check(&self, cx: &Cx) -> Result<u8> {
        let mut err = cx.err();
        let source: Vec<&str> = self.source.lines().collect();
        match self.findings.len() {
            0 => writeln!(err, "Check complete, no warnings found.")?,
            1 => writeln!(err, "Check complete, 1 warning has been found!")?,
            n => writeln!(err, "Check complete, {n} warnings have been found!")?,
        }
        for f in &self.findings {
            writeln!(
                err,
                "\nWARN: {} - {}\n{}\n{}:{}",
                f.rule,
                f.url(),
                f.message,
                self.shown,
                f.line
            )?;
            writeln!(err, "--------------------")?;
            let first = f.line.saturating_sub(2).max(1);
            for n in first..=f.line.min(source.len()) {
                let marker = if n == f.line { ">>> " } else { "    " };
                writeln!(err, " {n:>3} | {marker}{}", source[n - 1])?;
            }
            writeln!(err, "--------------------")?;
        }
        Ok(u8::from(!self.findings.is_empty()))
    }
}

/// Whether a build ended because its client cancelled it (a failing step
/// also cancels the rest of its build, but fails it).
fn cancelled(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<BuildError>(),
            Some(BuildError::Solve(strata_solver::SolveError::Cancelled))
        ) || matches!(
            c.downcast_ref::<strata_solver::SolveError>(),
            Some(strata_solver::SolveError::Cancelled)
        )
    })
}

async fn build_and_output(
    cx: &Cx,
    args: BuildArgs,
    flags: &RegistryFlags,
    build_id: &str,
    record: &mut BuildRecord,
) -> Result<u8> {
    match args.platform.clone() {
        Some(list) if list.contains(',') => {
            build_platforms(cx, args, &list, flags, build_id, record).await
        }
        _ => build_one(cx, args, flags, build_id, record)
            .await
            .map(|(code, _)| code),
    }
}

/// `--platform a,b,…`: each platform built in turn (on this machine, or
/// on a cluster, whose placement sends each platform's steps to workers
/// that run it), with its own `TARGETPLATFORM` and friends (a platform
/// nothing can run, natively or emulated, refused as for one), then the
/// images as one
/// OCI image index where the outputs take one: pushed (`--push`), an OCI
/// layout (`-o type=oci`), or each platform's files in a directory of its
/// own (`-o type=local`, `linux_arm64/`), as buildx writes them. The local
/// image store and the Docker engine hold one platform per name, so
/// `--load` and `type=docker` are refused, as buildx refuses them.
async fn build_platforms(
    cx: &Cx,
    args: BuildArgs,
    list: &str,
    flags: &RegistryFlags,
    build_id: &str,
    record: &mut BuildRecord,
) -> Result<u8> {
    let mut platforms: Vec<Platform> = Vec::new();
    for p in list.split(',').map(str::trim) {
        let p = Platform::parse(p).map_err(|e| anyhow::anyhow!("--platform {list}: {e}"))?;
        if !platforms.contains(&p) {
            platforms.push(p);
        }
    }
    let refuse = |what: &str| -> Result<u8> {
        bail!(
            "--platform {list}: {what} takes one platform; a multi-platform build goes to \
             --push or -o type=oci|local (or build each platform with its own --platform)"
        )
    };
    if args.cluster.is_some() && !args.cache_to.is_empty() {
        bail!(
            "--cache-to builds on this machine (drop --cluster): a cluster keeps and shares its cache already"
        );
    }
    if args.load {
        return refuse("--load (the Docker engine)");
    }
    if args.report.is_some() {
        return refuse("--report");
    }
    let (_, cache_to) = parse_caches(cx, &[], &args.cache_to)?;
    let mut outputs = Vec::new();
    for o in &args.outputs {
        match parse_output(o)?.0.resolved(cx) {
            o @ (Output::Oci { .. } | Output::Local { .. } | Output::Registry { .. }) => {
                outputs.push(o)
            }
            Output::Docker { .. } => return refuse("--output type=docker"),
            Output::Tar { .. } => return refuse("--output type=tar"),
            Output::Image => return refuse("--output type=image (the local image store)"),
        }
    }
    if args.push {
        outputs.push(Output::Registry {
            compression: Compression::Gzip,
        });
    }
    let tags = parse_tags(&args.tags)?;
    check_push_named(&outputs, &tags)?;
    let indexed = outputs
        .iter()
        .any(|o| matches!(o, Output::Oci { .. } | Output::Registry { .. }));
    if (args.iidfile.is_some() || args.metadata_file.is_some()) && !indexed {
        return refuse(
            "--iidfile and --metadata-file without --push or -o type=oci (the index's digest is what they record)",
        );
    }

    let mut images = Vec::new();
    let mut solved = Vec::new();
    for (n, p) in platforms.iter().enumerate() {
        let mut one = args.clone();
        one.platform = Some(p.to_string());
        one.outputs.clear();
        one.tags.clear();
        one.push = false;
        one.iidfile = None;
        one.metadata_file = None;
        one.one_of_platforms = true;
        // A cache is imported once, before the first platform, and
        // exported once, with every platform's steps.
        one.cache_to.clear();
        if n > 0 {
            one.cache_from.clear();
        }
        let (code, built) = build_one(cx, one, flags, build_id, record).await?;
        match built {
            Some(b) if code == 0 => {
                images.push(b.image);
                solved.extend(b.solved);
            }
            _ => return Ok(code),
        }
    }
    let registry = flags.registry_for(cx);
    export_caches(
        cx,
        &registry,
        &cache_to,
        |mode| {
            let mut keys: Vec<strata_cas::Digest> = solved
                .iter()
                .flat_map(|(plan, s)| exported_keys(plan, s, mode))
                .collect();
            keys.sort();
            keys.dedup();
            keys
        },
        args.progress_mode(),
    )
    .await?;

    let node = Arc::clone(&cx.node);
    let mut index: Option<String> = None;
    for o in &outputs {
        match o {
            Output::Oci {
                dest,
                compression,
                tar,
            } => {
                let (dest, compression, tar) = (dest.clone(), *compression, *tar);
                let (images, tag) = (images.clone(), tags.first().cloned());
                let digest = cx
                    .blocking(move |cx| {
                        let mut digest = None;
                        write_to(cx, &dest, "the OCI layout", |path| {
                            let made = strata_oci::export_oci_index(
                                &cx.node.content,
                                &images,
                                tag.as_ref(),
                                path,
                                tar,
                                compression,
                            )?;
                            digest = Some(made);
                            Ok(())
                        })?;
                        Ok(digest)
                    })
                    .await?;
                if let Some(digest) = digest {
                    index.get_or_insert(digest.to_string());
                }
            }
            Output::Local { dest } => {
                for image in &images {
                    let one = Output::Local {
                        dest: dest.join(platform_dir(image)),
                    };
                    let image = image.clone();
                    cx.blocking(move |cx| write_output(cx, &one, &image, &[]))
                        .await?;
                }
            }
            Output::Registry { compression } => {
                for tag in &tags {
                    let transfer = cx.session.transfer();
                    let pushed = registry
                        .push_index(&images, tag, &node.content, *compression, transfer.as_ref())
                        .await
                        .with_context(|| format!("cannot push {}", tag.familiar()));
                    cx.session.progress_done();
                    let pushed = pushed?;
                    crate::registry::report_push(cx, tag, &pushed)?;
                    // What the registry serves is the digest others see.
                    index = Some(pushed.digest);
                }
            }
            Output::Docker { .. } | Output::Tar { .. } | Output::Image => {}
        }
    }
    if let Some(digest) = &index {
        record.image = Some(digest.clone());
        if let Some(path) = &args.iidfile {
            let path = cx.path(path);
            std::fs::write(&path, digest)
                .with_context(|| format!("cannot write the image ID to {}", path.display()))?;
        }
        if let Some(path) = &args.metadata_file {
            let path = cx.path(path);
            let meta = serde_json::json!({
                "buildx.build.ref": build_id,
                "containerimage.digest": digest,
                "containerimage.descriptor": {
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "digest": digest,
                },
                "image.name": tags.iter().map(Reference::normalized).collect::<Vec<_>>().join(","),
            });
            std::fs::write(&path, serde_json::to_vec_pretty(&meta)?)
                .with_context(|| format!("cannot write the metadata file {}", path.display()))?;
        }
    }
    let shown: Vec<String> = platforms.iter().map(Platform::to_string).collect();
    if !matches!(args.progress_mode(), Mode::Quiet | Mode::Rawjson) {
        writeln!(
            cx.err(),
            "built {} platforms ({}){}",
            platforms.len(),
            shown.join(", "),
            match &index {
                Some(d) => format!("; image index {d}"),
                None if outputs.is_empty() => {
                    "; no output asked for: the results stay in the cache (give --push or -o)"
                        .to_string()
                }
                None => String::new(),
            }
        )?;
    }
    if args.progress_mode() == Mode::Quiet
        && let Some(d) = &index
    {
        writeln!(cx.out(), "{d}")?;
    }
    Ok(0)
}

/// `-t` names.
fn parse_tags(given: &[String]) -> Result<Vec<Reference>> {
    given
        .iter()
        .map(|t| t.parse::<Reference>().map_err(anyhow::Error::from))
        .collect()
}

/// A push goes to the registries its names say: it needs one.
fn check_push_named(outputs: &[Output], tags: &[Reference]) -> Result<()> {
    if outputs.iter().any(|o| matches!(o, Output::Registry { .. })) && tags.is_empty() {
        bail!("pushing needs a name: give one with -t REGISTRY/NAME:TAG");
    }
    Ok(())
}

/// The directory buildx gives a platform's files: `linux_arm64`,
/// `linux_arm_v7`.
fn platform_dir(image: &strata_oci::Image) -> String {
    let c = &image.config;
    match c.variant.as_deref().filter(|v| !v.is_empty()) {
        Some(v) => format!("{}_{}_{v}", c.os, c.architecture),
        None => format!("{}_{}", c.os, c.architecture),
    }
}

/// What one build made.
struct Built {
    image: strata_oci::Image,
    /// The plan and what solving it did, for an embedded build: what a
    /// cache export of several builds takes its keys from.
    solved: Option<(Arc<strata_plan::Plan>, strata_solver::Solved)>,
}

/// One platform's build and outputs; the exit code and what it made.
async fn build_one(
    cx: &Cx,
    mut args: BuildArgs,
    flags: &RegistryFlags,
    build_id: &str,
    record: &mut BuildRecord,
) -> Result<(u8, Option<Built>)> {
    let started = Instant::now();
    args.progress = args.progress_mode();
    // Messages name the Dockerfile as the user did.
    let given_file = args.file.clone();
    let shown_dockerfile = match &args.shown_dockerfile {
        Some(shown) => shown.clone(),
        None => given_file
            .clone()
            .unwrap_or_else(|| args.context.join("Dockerfile"))
            .display()
            .to_string(),
    };
    // A failed step names the Dockerfile as BuildKit does: as `-f` gave
    // it, else `Dockerfile`.
    let step_file = match &args.shown_dockerfile {
        Some(shown) => shown.clone(),
        None => given_file
            .as_deref()
            .unwrap_or(Path::new("Dockerfile"))
            .display()
            .to_string(),
    };
    args.context = cx.path(&args.context);
    args.file = args.file.as_deref().map(|f| cx.path(f));
    args.report = args.report.as_deref().map(|f| cx.path(f));
    args.iidfile = args.iidfile.as_deref().map(|f| cx.path(f));
    args.metadata_file = args.metadata_file.as_deref().map(|f| cx.path(f));
    let labels = parse_labels(&args.labels)?;
    let run_settings = RunSettings {
        network: args.network,
        extra_hosts: args.add_hosts.clone(),
        shm_size: args.shm_size.map(|s| s.0),
        ulimits: args.ulimits.clone(),
    };
    // As buildx does: `--network host` asks for its entitlement.
    if args.network == NetworkMode::Host && !args.allow.contains(&Entitlement::NetworkHost) {
        args.allow.push(Entitlement::NetworkHost);
    }
    args.cluster = args.cluster.as_deref().map(|f| cx.path(f));
    let contexts = parse_contexts(cx, &args.build_contexts)?;
    let (cache_from, cache_to) = parse_caches(cx, &args.cache_from, &args.cache_to)?;
    let tags = parse_tags(&args.tags)?;
    let (outputs, rewrites): (Vec<Output>, Vec<bool>) = args
        .outputs
        .iter()
        .map(|o| parse_output(o))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .map(|(o, rewrite)| (o.resolved(cx), rewrite))
        .unzip();
    // Every output is the one image the build stores.
    let rewrite_timestamp = rewrites.contains(&true);
    let secrets = parse_secrets(cx, &args.secrets)?;
    let ssh = parse_ssh(cx, &args.ssh)?;
    let mut build_args =
        parse_build_args(&args.build_args, &|k| cx.session.env(k).map(str::to_string))?;
    // As buildx does: the client's SOURCE_DATE_EPOCH is the build's unless
    // a --build-arg gives one.
    if let Some(epoch) = cx.session.env(SOURCE_DATE_EPOCH)
        && !epoch.is_empty()
    {
        build_args
            .entry(SOURCE_DATE_EPOCH.to_string())
            .or_insert_with(|| epoch.to_string());
    }
    let platform = match &args.platform {
        Some(p) => Platform::parse(p).map_err(anyhow::Error::msg)?,
        None => Platform::host(),
    };
    let dockerfile = args
        .file
        .clone()
        .unwrap_or_else(|| args.context.join("Dockerfile"));
    if !dockerfile.is_file() {
        bail!("Dockerfile {shown_dockerfile} not found (use -f to name another)");
    }
    let mut checks = Checks::of(&dockerfile, &shown_dockerfile, &build_args)?;
    match &checks {
        // A cluster plans on its coordinator: what the Dockerfile shows.
        Some(c) if args.check && args.cluster.is_some() => return Ok((c.print_check(cx)?, None)),
        Some(c) if !args.check => c.enforce(cx)?,
        _ => {}
    }
    let mut outputs = outputs;
    if args.load {
        outputs.push(Output::Docker { dest: None });
    }
    let to_stdout = outputs
        .iter()
        .filter(|o| {
            matches!(
                o,
                Output::Oci {
                    dest: Dest::Stdout,
                    ..
                } | Output::Docker {
                    dest: Some(Dest::Stdout)
                } | Output::Tar { dest: Dest::Stdout }
            )
        })
        .count();
    if to_stdout > 1 {
        bail!("only one --output can go to standard output");
    }
    if to_stdout == 1 && args.progress == Mode::Quiet {
        bail!(
            "-q prints the image ID on standard output, where an --output goes: give the output a dest=FILE"
        );
    }
    if args.push {
        outputs.push(Output::Registry {
            compression: Compression::Gzip,
        });
    }
    check_push_named(&outputs, &tags)?;
    let registry = flags.registry_for(cx);
    let node = Arc::clone(&cx.node);
    let cancel = cx.session.cancel().clone();
    // The node's slots bound every build together; a build may ask for
    // fewer of them.
    let jobs = args.jobs.unwrap_or_else(strata_worker::default_slots);
    // The cluster whose image this is, when it stays there.
    let mut in_cluster: Option<PathBuf> = None;
    let (image, steps, fetched, solved) = match &args.cluster {
        Some(cluster) => {
            // The coordinator locates a failed step in it by this name.
            let inputs = PlanInputs::read(
                &dockerfile,
                step_file.clone(),
                build_args,
                args.target.clone(),
                &platform,
                args.allow.iter().copied().collect(),
            )?
            .labeled(labels)
            .running(run_settings)
            .with_contexts(&contexts);
            if !ssh.is_empty() {
                bail!(
                    "--ssh forwards an agent on this machine to the steps that run here \
                     (drop --cluster): a cluster's workers cannot reach it"
                );
            }
            if !cache_from.is_empty() {
                bail!(
                    "--cache-from builds on this machine (drop --cluster): a cluster's cache is \
                     shared by every client, so a cache enters it through its admin: \
                     strata cluster import-cache --cluster DIR/admin.toml SPEC"
                );
            }
            if !cache_to.is_empty() {
                bail!(
                    "--cache-to builds on this machine (drop --cluster): a cluster keeps and \
                     shares its cache already"
                );
            }
            if let Some((name, _)) = contexts
                .iter()
                .find(|(_, c)| !matches!(c, NamedContext::Image(_)))
            {
                bail!(
                    "--build-context {name}: a cluster build takes docker-image:// contexts only; \
                     a directory or OCI layout context builds on this machine (drop --cluster)"
                );
            }
            warn_unused(cx, &inputs)?;
            // The image stays in the cluster, named by its tags, unless
            // an output needs its bytes here (one platform's image goes
            // into the index the outputs take); a worker pushes it.
            let download = outputs
                .iter()
                .any(|o| !matches!(o, Output::Registry { .. }))
                || args.one_of_platforms;
            let outcome = cluster_build(
                cx,
                cluster,
                ClusterBuild {
                    build_id: build_id.to_string(),
                    inputs,
                    dockerfile: &dockerfile,
                    context: &args.context,
                    secrets,
                    no_cache: args.no_cache,
                    no_cache_stages: stage_names(&args.no_cache_filter),
                    pull: args.pull,
                    rewrite_timestamp,
                    remote_context: args.remote_context,
                    report: !matches!(args.progress_mode(), Mode::Quiet | Mode::Rawjson),
                    download,
                },
                &tags,
            )
            .await;
            cx.session.progress_done();
            let (image, steps, fetched, here) = outcome?;
            if !here {
                in_cluster = Some(cluster.clone());
            }
            (image, steps, Some(fetched), None)
        }
        None => {
            let req = BuildRequest {
                dockerfile,
                dockerfile_name: shown_dockerfile.clone(),
                context: args.context.clone(),
                build_args,
                target: args.target.clone(),
                no_cache: args.no_cache,
                no_cache_stages: stage_names(&args.no_cache_filter),
                jobs,
                secrets,
                ssh,
                remote_context: args.remote_context,
                checks: checks
                    .as_ref()
                    .map(|c| c.config.clone())
                    .unwrap_or_default(),
                tags: tags.clone(),
                platform,
                progress: live_progress(cx, build_id),
                cancel: cancel.clone(),
                registry: Some(Arc::clone(&registry)),
                always_pull: args.pull,
                pull_progress: cx.session.transfer(),
                allow: args.allow.iter().copied().collect(),
                grants: Grants {
                    granted: args.grant.iter().copied().collect(),
                    node: "this machine".into(),
                    setting:
                        "`--allow-insecure-entitlement {}` (or STRATA_INSECURE_ENTITLEMENTS={})"
                            .into(),
                },
                rewrite_timestamp,
                labels,
                run: run_settings,
                contexts,
            };
            let unused = PlanInputs::read(
                &req.dockerfile,
                req.dockerfile_name.clone(),
                req.build_args.clone(),
                None,
                &req.platform,
                Default::default(),
            )?;
            if args.check {
                // Planning finds what needs the base images (UndefinedVar).
                let plan = strata_worker::plan_only(&node, &req).await?;
                return match checks.as_mut() {
                    Some(c) => {
                        c.with_plan(&plan.lint);
                        Ok((c.print_check(cx)?, None))
                    }
                    None => Ok((0, None)),
                };
            }
            warn_unused(cx, &unused)?;
            if !args.no_cache {
                import_caches(cx, &registry, &cache_from, args.progress).await?;
            }
            let result = build(node.clone(), req).await;
            cx.session.progress_done();
            match result {
                Ok(r) => {
                    export_caches(
                        cx,
                        &registry,
                        &cache_to,
                        |mode| exported_keys(&r.plan, &r.solved, mode),
                        args.progress,
                    )
                    .await?;
                    let steps = r.solved.steps.clone();
                    if let Some(c) = checks.as_mut() {
                        c.with_plan(&r.plan.lint);
                    }
                    (r.image, steps, None, Some((r.plan, r.solved)))
                }
                Err(BuildError::Solve(e)) if e.step_title().is_some() => {
                    print_tail(cx, e.step_title().as_deref(), e.tail())?;
                    let located = e.located(&step_file);
                    return Err(match e.causes() {
                        Some(causes) => anyhow::Error::new(causes.clone()).context(located),
                        None => anyhow::anyhow!(located),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    record.steps.clone_from(&steps);
    record.image = Some(image.id.to_string());
    record.bytes_moved = fetched.unwrap_or(0);
    let image = &image;
    for o in &outputs {
        match o {
            Output::Image => {}
            Output::Docker { dest: None } => crate::engine::load(cx, image, &tags).await?,
            Output::Registry { compression } => {
                for tag in &tags {
                    let pushed = match &in_cluster {
                        Some(cluster) => {
                            crate::cluster::push_from(cluster, &registry, tag, *compression).await
                        }
                        None => {
                            crate::registry::push_image(cx, &registry, image, tag, *compression)
                                .await
                        }
                    };
                    cx.session.progress_done();
                    crate::registry::report_push(cx, tag, &pushed?)?;
                }
            }
            written => {
                let (o, image, tags) = (written.clone(), image.clone(), tags.clone());
                cx.blocking(move |cx| write_output(cx, &o, &image, &tags))
                    .await?;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let steps = &steps;
    let cached = steps.iter().filter(|s| s.cached).count();
    if let Some(path) = &args.report {
        let report = Report {
            id: build_id,
            image: ReportImage {
                id: image.id.to_string(),
                manifest_digest: image.manifest_digest.to_string(),
                tags: tags.iter().map(Reference::familiar).collect(),
                size: image.size(),
            },
            duration_seconds: elapsed,
            bytes_fetched: fetched,
            steps,
        };
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write report {}", path.display()))?;
    }
    let names: Vec<String> = tags.iter().map(Reference::familiar).collect();
    if let Some(path) = &args.iidfile {
        std::fs::write(path, image.id.to_string())
            .with_context(|| format!("cannot write the image ID to {}", path.display()))?;
    }
    if let Some(path) = &args.metadata_file {
        let meta = serde_json::json!({
            "buildx.build.ref": build_id,
            "containerimage.config.digest": image.id.to_string(),
            "containerimage.digest": image.manifest_digest.to_string(),
            "image.name": tags.iter().map(Reference::normalized).collect::<Vec<_>>().join(","),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&meta)?)
            .with_context(|| format!("cannot write the metadata file {}", path.display()))?;
    }
    if let Some(c) = &checks {
        c.print_warnings(cx)?;
    }
    let mut err = cx.err();
    if !matches!(args.progress, Mode::Quiet | Mode::Rawjson) {
        writeln!(
            err,
            "built {} in {elapsed:.2}s: {} steps, {cached} cached; image {} ({}); build {build_id}",
            if names.is_empty() {
                "image".to_string()
            } else {
                names.join(", ")
            },
            steps.len(),
            &image.id.to_string()[..19],
            human_size(image.size())
        )?;
    }
    if args.progress == Mode::Quiet && !args.one_of_platforms {
        writeln!(cx.out(), "{}", image.id)?;
    }
    Ok((
        0,
        Some(Built {
            image: image.clone(),
            solved,
        }),
    ))
}

/// Writes an output that is files (an OCI layout, an archive, the
/// image's files): on a blocking thread, as its caller runs it.
fn write_output(
    cx: &Cx,
    output: &Output,
    image: &strata_oci::Image,
    tags: &[Reference],
) -> Result<()> {
    let node = &cx.node;
    match output {
        Output::Oci {
            dest,
            compression,
            tar,
        } => write_to(cx, dest, "the OCI layout", |path| {
            strata_oci::export_oci(&node.content, image, tags.first(), path, *tar, *compression)
                .map(drop)
                .map_err(anyhow::Error::from)
        }),
        Output::Docker { dest: Some(dest) } => write_to(cx, dest, "the docker archive", |path| {
            strata_oci::export_docker_archive(&node.content, image, tags, path)
                .map_err(anyhow::Error::from)
        }),
        Output::Local { dest } => strata_worker::export_rootfs(node, image, dest)
            .map(drop)
            .with_context(|| format!("cannot write the image's files to {}", dest.display())),
        Output::Tar {
            dest: Dest::Path(path),
        } => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            strata_worker::write_rootfs_tar(node, image, &mut out)
                .map_err(anyhow::Error::from)
                .and_then(|()| out.flush().map_err(anyhow::Error::from))
                .with_context(|| format!("cannot write {}", path.display()))
        }
        // Streamed: a tar cut short by an error has no end-of-archive
        // blocks, so no reader takes it as whole.
        Output::Tar { dest: Dest::Stdout } => {
            strata_worker::write_rootfs_tar(node, image, cx.out())
                .context("cannot write the image's files to standard output")
        }
        Output::Docker { dest: None } | Output::Image | Output::Registry { .. } => Ok(()),
    }
}

/// Runs `write` to make an output at `dest`; for standard output, into a
/// scratch file first, so the client gets a whole archive or nothing.
fn write_to(
    cx: &Cx,
    dest: &Dest,
    what: &str,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    match dest {
        Dest::Path(path) => {
            write(path).with_context(|| format!("cannot write {what} {}", path.display()))
        }
        Dest::Stdout => crate::stdio::send_made(cx, what, write),
    }
}

/// The client's progress display, and the node's view of running builds
/// (its dashboard), both fed with the build's events.
fn live_progress(cx: &Cx, build_id: &str) -> strata_solver::Progress {
    let (client, node, id) = (
        cx.session.progress(),
        Arc::clone(&cx.node),
        build_id.to_string(),
    );
    Arc::new(move |e: strata_solver::Event| {
        node.live.event(&id, &e);
        client(e);
    })
}

/// A failing step's last output, framed as BuildKit frames it.
fn print_tail(cx: &Cx, title: Option<&str>, tail: &[String]) -> Result<()> {
    if tail.is_empty() {
        return Ok(());
    }
    let mut err = cx.err();
    match title {
        Some(t) => writeln!(err, "------\n > {t}:")?,
        None => writeln!(err, "------")?,
    }
    for l in tail {
        writeln!(err, "{l}")?;
    }
    writeln!(err, "------")?;
    Ok(())
}

/// What a cluster build sends besides the plan inputs.
struct ClusterBuild<'a> {
    build_id: String,
    inputs: PlanInputs,
    dockerfile: &'a Path,
    context: &'a Path,
    secrets: BTreeMap<String, Vec<u8>>,
    no_cache: bool,
    no_cache_stages: Vec<String>,
    pull: bool,
    rewrite_timestamp: bool,
    remote_context: bool,
    /// Say what the context upload read and sent.
    report: bool,
    /// Fetch the image into the local store (an output needs it).
    download: bool,
}

/// A build the cluster took on that failed: its failed step's output
/// printed, as a local build prints it, and the error returned with its
/// causes; a cancelled one as cancelled, as a local one is.
fn cluster_failure(cx: &Cx, failed: strata_cluster::protocol::BuildFailed) -> anyhow::Error {
    if let Err(e) = print_tail(cx, failed.title.as_deref(), &failed.tail) {
        return e;
    }
    match failed.kind {
        strata_cluster::protocol::FailureKind::Cancelled => {
            strata_solver::SolveError::Cancelled.into()
        }
        _ => anyhow::Error::new(failed),
    }
}

/// `strata build --cluster`: packs and uploads the context, runs the build
/// on the cluster with its progress shown here, then fetches the image's
/// layers from the workers and names it. Returns the image, the steps and
/// the bytes fetched.
async fn cluster_build(
    cx: &Cx,
    cluster: &Path,
    b: ClusterBuild<'_>,
    tags: &[Reference],
) -> Result<(strata_oci::Image, Vec<StepRecord>, u64, bool)> {
    let node = &cx.node;
    let stamps = Timestamps::new(b.inputs.source_date_epoch()?, b.rewrite_timestamp)?;
    // A build with SOURCE_DATE_EPOCH has its times rewritten here, so it
    // is stored here.
    let download = b.download || stamps.source_date_epoch.is_some();
    let ignore = strata_worker::ignore_for(b.dockerfile, b.context, b.remote_context)?;
    // The context's tree, reading only files whose stat changed since the
    // last build of this directory.
    let hashing = std::time::Instant::now();
    let dir = b.context.to_path_buf();
    let tree = cx
        .blocking(move |cx| {
            let cache_at = strata_cluster::context::StatCache::path(cx.node.home(), &dir);
            let mut cache = cx.contexts.take(&cache_at);
            let tree = strata_cluster::context::hash(&dir, &ignore, &mut cache)
                .with_context(|| format!("cannot read the build context {}", dir.display()))?;
            match cache.save(&cache_at) {
                Ok(()) => cx.contexts.keep(&cache_at, cache),
                Err(e) => {
                    tracing::warn!(path = %cache_at.display(), error = %e, "cannot save the context's stat cache")
                }
            }
            Ok(tree)
        })
        .await?;
    tracing::debug!(
        entries = tree.entries,
        read = tree.read,
        elapsed = ?hashing.elapsed(),
        "hashed the build context"
    );
    let context = tree.root;
    let coordinators = strata_cluster::config::ClientConfig::load(cluster)
        .map(|c| c.coordinators.len())
        .unwrap_or(1);
    let progress = live_progress(cx, &b.build_id);
    let on_event = move |e| progress(e);
    // A coordinator lost mid-build takes the build with it; another
    // coordinator of the group takes it up again, finding in the
    // replicated cache every step already done.
    let mut attempt = 1;
    let mut rebuilt = false;
    let (done, image, fetched) = loop {
        let started = std::time::Instant::now();
        let client = crate::cluster::connect(cluster).await?;
        tracing::debug!(?client, elapsed = ?started.elapsed(), "connected to the cluster");
        let submit = strata_cluster::protocol::SubmitBuild {
            build_id: b.build_id.clone(),
            tags: tags.iter().map(Reference::familiar).collect(),
            inputs: b.inputs.clone(),
            context,
            secrets: b.secrets.clone(),
            no_cache: b.no_cache,
            no_cache_stages: b.no_cache_stages.clone(),
            pull: b.pull,
        };
        // The build starts once the context's tree is there, and its
        // files are sent beside it: a worker takes each as it lands.
        // A build that ends first (cached, or failed) stops the rest.
        let sending = strata_cluster::client::Sending::default();
        let done = async {
            let files = client.upload_tree(&node.content, &tree, &sending).await?;
            let upload = client.upload_files(&files, &sending);
            let build = client.build(submit, &on_event);
            tokio::pin!(upload, build);
            let mut uploading = true;
            let done = loop {
                tokio::select! {
                    sent = &mut upload, if uploading => {
                        sent?;
                        uploading = false;
                        tracing::debug!(
                            sent = ?sending.sent(),
                            elapsed = ?started.elapsed(),
                            "context uploaded"
                        );
                    }
                    done = &mut build => break done,
                }
            };
            if uploading {
                tracing::debug!(
                    sent = ?sending.sent(),
                    files = files.len(),
                    "the build ended before its context's files were all sent"
                );
            }
            if b.report && attempt == 1 {
                let size: u64 = tree.files.values().map(|(_, n)| n).sum();
                let sent = sending.sent();
                let _ = writeln!(
                    cx.err(),
                    "context: {} entries, {} in {} distinct files; read {}, sent {} in {} blobs",
                    tree.entries,
                    crate::units::human_size(size),
                    tree.files.len(),
                    crate::units::human_size(tree.read),
                    crate::units::human_size(sent.bytes),
                    sent.blobs,
                );
            }
            tracing::debug!(elapsed = ?started.elapsed(), "build done");
            done
        };
        let done = tokio::select! {
            done = done => done,
            _ = cx.session.cancel().cancelled() => {
                return Err(strata_solver::SolveError::Cancelled.into());
            }
        };
        match done {
            Ok(d) if !download => {
                let (image, _) = strata_oci::Image::described(&d.config_json, &d.layers)
                    .map_err(|e| anyhow::anyhow!("the cluster's image: {e}"))?;
                break (d, image, 0);
            }
            Ok(d) => match client.fetch_image(node, &d, stamps).await {
                Ok((image, fetched)) => break (d, image, fetched),
                // A holder had lost a layer the cache named: the
                // coordinator has corrected its records, and building
                // again makes the layer anew.
                Err(strata_cluster::client::ClientError::LayersLost(e)) if !rebuilt => {
                    tracing::warn!(error = %e, "a layer of the image was lost; building again");
                    rebuilt = true;
                }
                Err(e) => return Err(e.into()),
            },
            Err(strata_cluster::client::ClientError::Build(failed)) => {
                return Err(cluster_failure(cx, *failed));
            }
            Err(e) if coordinators > 1 && attempt < coordinators.min(3) => {
                tracing::warn!(error = %e, "lost the coordinator; submitting the build to another");
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    };
    if download {
        for tag in tags {
            node.images.tag(tag, &image)?;
        }
    } else if b.report && !done.tagged.is_empty() {
        let names: Vec<String> = tags.iter().map(Reference::familiar).collect();
        let _ = writeln!(
            cx.err(),
            "{} in the cluster, not downloaded: pull it from a coordinator's image \
             endpoint, or build with --load or -o type=image to have it here",
            names.join(", ")
        );
    }
    Ok((image, done.steps, fetched, download))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs() {
        assert_eq!(
            parse_output("type=oci,dest=/x.tar,compression=zstd").unwrap(),
            (
                Output::Oci {
                    dest: Dest::Path("/x.tar".into()),
                    compression: Compression::Zstd,
                    tar: true
                },
                false
            )
        );
        assert_eq!(
            parse_output("type=docker,dest=a.tar,rewrite-timestamp=true").unwrap(),
            (
                Output::Docker {
                    dest: Some(Dest::Path("a.tar".into()))
                },
                true
            )
        );
        assert_eq!(
            parse_output("type=registry").unwrap(),
            (
                Output::Registry {
                    compression: Compression::Gzip
                },
                false
            )
        );
        assert_eq!(
            parse_output("type=image,rewrite-timestamp=true").unwrap(),
            (Output::Image, true)
        );
        assert_eq!(
            parse_output("type=tar,dest=x").unwrap().0,
            Output::Tar {
                dest: Dest::Path("x".into())
            }
        );
        assert_eq!(
            parse_output("-").unwrap().0,
            Output::Tar { dest: Dest::Stdout }
        );
        assert_eq!(
            parse_output("out").unwrap().0,
            Output::Local { dest: "out".into() }
        );
        assert_eq!(
            parse_output("type=docker").unwrap().0,
            Output::Docker { dest: None }
        );
        assert!(parse_output("type=local,dest=-").is_err());
        assert!(parse_output("type=local").is_err());
        assert!(parse_output("type=oci,dest=-,tar=false").is_err());
        assert!(parse_output("type=cacheonly").is_err());
        assert!(parse_output("type=oci").is_err());
        assert!(parse_output("type=image,rewrite-timestamp=yes").is_err());
    }
}
