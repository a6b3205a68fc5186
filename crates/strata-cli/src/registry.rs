//! `strata pull`, `push`, `save`, `load`, and the registry flags every
//! command that reaches a registry shares.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use strata_dockerfile::Platform;
use strata_oci::{Compression, Reference};
use strata_registry::{Registry, RegistryOptions};

use crate::cx::Cx;
use crate::progress::Mode;
use crate::units::human_size;

/// How registries are reached (Docker daemon settings, per command).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct RegistryFlags {
    /// A registry spoken to over plain HTTP (`HOST:PORT`); repeatable.
    /// Loopback registries always are.
    #[arg(
        long = "insecure-registry",
        global = true,
        value_name = "HOST:PORT",
        env = "STRATA_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure: Vec<String>,
    /// A mirror tried before Docker Hub for `docker.io` images
    /// (`http://HOST:PORT` or `HOST`); repeatable.
    #[arg(
        long = "registry-mirror",
        global = true,
        value_name = "URL",
        env = "STRATA_REGISTRY_MIRRORS",
        value_delimiter = ','
    )]
    mirrors: Vec<String>,
}

impl RegistryFlags {
    /// A client with these settings, its credentials from Docker's config
    /// as this process's environment names it.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry_with(None, None)
    }

    /// A client with these settings for a command the daemon runs: its
    /// credentials are those of the user's environment, not the daemon's.
    pub fn registry_for(&self, cx: &Cx) -> Arc<Registry> {
        let env = |k: &str| cx.session.env(k).map(str::to_string);
        self.registry_with(
            strata_registry::docker_config_in(&env),
            cx.session.env("PATH").map(std::ffi::OsString::from),
        )
    }

    fn registry_with(
        &self,
        docker_config: Option<PathBuf>,
        helper_path: Option<std::ffi::OsString>,
    ) -> Arc<Registry> {
        Arc::new(Registry::new(RegistryOptions {
            insecure: self.insecure.clone(),
            mirrors: self.mirrors.clone(),
            docker_config,
            helper_path,
            given: None,
        }))
    }
}

#[derive(Debug, Args, Serialize, Deserialize)]
pub struct PullArgs {
    /// Platform to pull for (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    /// How to show progress.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: Mode,
    /// The image (`alpine`, `REGISTRY/NAME:TAG`, `NAME@sha256:…`).
    image: String,
}

#[derive(Debug, Args, Serialize, Deserialize)]
pub struct PushArgs {
    /// Layer compression in the registry: gzip, zstd or uncompressed.
    #[arg(long, default_value = "gzip")]
    compression: Compression,
    /// How to show progress.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: Mode,
    /// The local image (name or ID).
    image: String,
    /// Where to push it (default: the image's own name).
    destination: Option<String>,
}

#[derive(Debug, Args, Serialize, Deserialize)]
pub struct SaveArgs {
    /// The archive to write (default: standard output).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// The image (name or ID) and any more names of it to record.
    #[arg(required = true)]
    images: Vec<String>,
}

#[derive(Debug, Args, Serialize, Deserialize)]
pub struct LoadArgs {
    /// The `docker save` archive to read (default: standard input).
    #[arg(short, long)]
    input: Option<PathBuf>,
}

/// `strata save` without `-o` writes to standard output, which must not be
/// a terminal (as Docker refuses).
pub fn save_checked(args: &SaveArgs) -> Result<()> {
    if args.output.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        bail!("cowardly refusing to save to a terminal. Use the -o flag or redirect");
    }
    Ok(())
}

/// `strata load` without `-i` reads standard input: spooled to a file for
/// the daemon, kept until the returned handle drops.
pub fn load_from_stdin(
    home: &std::path::Path,
    mut args: LoadArgs,
) -> Result<(LoadArgs, Option<tempfile::NamedTempFile>)> {
    if args.input.is_some() {
        return Ok((args, None));
    }
    let spooled = crate::stdio::spool(home, "the archive to load")?;
    args.input = Some(spooled.path().to_path_buf());
    Ok((args, Some(spooled)))
}

pub async fn pull(cx: &Cx, args: PullArgs, flags: &RegistryFlags) -> Result<u8> {
    let reference: Reference = args.image.parse()?;
    let platform = match &args.platform {
        Some(p) => Platform::parse(p).map_err(anyhow::Error::msg)?,
        None => Platform::host(),
    };
    let registry = flags.registry_for(cx);
    let transfer = cx.session.transfer();
    let target = strata_worker::registry_target(&platform);
    let pulled = registry
        .pull(&reference, target, &cx.node.images, transfer.as_ref())
        .await;
    cx.session.progress_done();
    let pulled = pulled.with_context(|| format!("cannot pull {}", reference.familiar()))?;
    writeln!(
        cx.out(),
        "{}: pulled from {} ({} of {} downloaded, {}); digest {}",
        reference.familiar(),
        pulled.registry,
        pulled.layers_downloaded,
        plural(pulled.image.layers.len(), "layer"),
        human_size(pulled.bytes),
        pulled.digest
    )?;
    Ok(0)
}

/// Pushes a stored image; shared by `strata push` and `strata build --push`.
pub async fn push_image(
    cx: &Cx,
    registry: &Registry,
    image: &strata_oci::Image,
    destination: &Reference,
    compression: Compression,
) -> Result<strata_registry::Pushed> {
    let transfer = cx.session.transfer();
    registry
        .push(
            image,
            destination,
            &cx.node.content,
            compression,
            transfer.as_ref(),
        )
        .await
        .with_context(|| format!("cannot push {}", destination.familiar()))
}

pub async fn push(cx: &Cx, args: PushArgs, flags: &RegistryFlags) -> Result<u8> {
    let tagged = cx
        .node
        .images
        .get(&args.image)?
        .with_context(|| format!("no image {} in the local image store", args.image))?;
    let destination: Reference = args.destination.as_deref().unwrap_or(&args.image).parse()?;
    let registry = flags.registry_for(cx);
    let pushed = push_image(cx, &registry, &tagged.image, &destination, args.compression).await;
    cx.session.progress_done();
    let pushed = pushed?;
    report_push(cx, &destination, &pushed)?;
    Ok(0)
}

/// One line per push, as `docker push` ends.
pub fn report_push(
    cx: &Cx,
    destination: &Reference,
    pushed: &strata_registry::Pushed,
) -> Result<()> {
    writeln!(
        cx.out(),
        "{}: digest: {} ({} sent, {}; {} already there)",
        destination.familiar(),
        pushed.digest,
        plural(pushed.blobs_sent, "blob"),
        human_size(pushed.bytes_sent),
        plural(pushed.blobs_skipped, "blob")
    )?;
    Ok(())
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

pub fn save(cx: &Cx, args: SaveArgs) -> Result<u8> {
    let node = &cx.node;
    let mut image = None;
    let mut names = Vec::new();
    for name in &args.images {
        let tagged = node
            .images
            .get(name)?
            .with_context(|| format!("no image {name} in the local image store"))?;
        if image
            .as_ref()
            .is_some_and(|i: &strata_oci::Image| i.id != tagged.image.id)
        {
            bail!("strata save writes one image at a time: {name} is another image");
        }
        if name.parse::<Reference>().is_ok() && !name.starts_with("sha256:") {
            names.push(tagged.reference.clone());
        }
        image = Some(tagged.image);
    }
    let Some(image) = image else {
        bail!("no image named");
    };
    match &args.output {
        Some(output) => {
            strata_oci::export_docker_archive(&node.content, &image, &names, &cx.path(output))
                .with_context(|| format!("cannot write {}", output.display()))?;
        }
        None => crate::stdio::send_made(cx, "the archive", |file| {
            strata_oci::export_docker_archive(&node.content, &image, &names, file)
                .map_err(anyhow::Error::from)
        })?,
    }
    Ok(0)
}

pub fn load(cx: &Cx, args: LoadArgs) -> Result<u8> {
    let Some(given) = &args.input else {
        bail!("no archive to load");
    };
    let input = cx.path(given);
    let names = strata_oci::archive_names(&input)?;
    let node = &cx.node;
    let host = Platform::host();
    let (image, _) = strata_oci::import(
        &node.images,
        &input,
        &node.home().join("tmp"),
        &host.os,
        &host.architecture,
    )
    .with_context(|| format!("cannot load {}", given.display()))?;
    let mut out = cx.out();
    if names.is_empty() {
        writeln!(out, "Loaded image ID: {}", image.id)?;
    }
    for name in names {
        let reference: Reference = name
            .parse()
            .with_context(|| format!("{} names its image {name:?}", given.display()))?;
        node.images.tag(&reference, &image)?;
        writeln!(out, "Loaded image: {}", reference.familiar())?;
    }
    Ok(0)
}
