//! `strata pull`, `push`, `save`, `load`, and the registry flags every
//! command that reaches a registry shares.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use strata_dockerfile::Platform;
use strata_oci::{Compression, Reference};
use strata_registry::{Registry, RegistryOptions};

use crate::images::human_size;
use crate::progress::{Mode, Renderer};

/// How registries are reached (Docker daemon settings, per command).
#[derive(Debug, Clone, Args)]
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
    /// A client with these settings (credentials from Docker's config).
    pub fn registry(&self) -> Arc<Registry> {
        Arc::new(Registry::new(RegistryOptions {
            insecure: self.insecure.clone(),
            mirrors: self.mirrors.clone(),
            docker_config: None,
        }))
    }
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Platform to pull for (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    /// How to show progress.
    #[arg(long, value_enum, default_value = "auto")]
    progress: Mode,
    /// The image (`alpine`, `REGISTRY/NAME:TAG`, `NAME@sha256:…`).
    image: String,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Layer compression in the registry: gzip, zstd or uncompressed.
    #[arg(long, default_value = "gzip")]
    compression: Compression,
    /// How to show progress.
    #[arg(long, value_enum, default_value = "auto")]
    progress: Mode,
    /// The local image (name or ID).
    image: String,
    /// Where to push it (default: the image's own name).
    destination: Option<String>,
}

#[derive(Debug, Args)]
pub struct SaveArgs {
    /// The archive to write.
    #[arg(short, long)]
    output: PathBuf,
    /// The image (name or ID) and any more names of it to record.
    #[arg(required = true)]
    images: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The `docker save` archive to read.
    #[arg(short, long)]
    input: PathBuf,
}

pub fn pull(home: &Path, args: PullArgs, flags: &RegistryFlags) -> Result<ExitCode> {
    let reference: Reference = args.image.parse()?;
    let platform = match &args.platform {
        Some(p) => Platform::parse(p).map_err(anyhow::Error::msg)?,
        None => Platform::host(),
    };
    let node = crate::open_node(home)?;
    let registry = flags.registry();
    let renderer = Renderer::new(args.progress);
    let target = strata_registry::Platform {
        os: &platform.os,
        architecture: &platform.architecture,
        variant: platform.variant.as_deref(),
    };
    let pulled = crate::runtime()?.block_on(registry.pull(
        &reference,
        target,
        &node.images,
        renderer.as_ref(),
    ));
    renderer.finish();
    let pulled = pulled.with_context(|| format!("cannot pull {}", reference.familiar()))?;
    writeln!(
        std::io::stdout().lock(),
        "{}: pulled from {} ({} of {} downloaded, {}); digest {}",
        reference.familiar(),
        pulled.registry,
        pulled.layers_downloaded,
        plural(pulled.image.layers.len(), "layer"),
        human_size(pulled.bytes),
        pulled.digest
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Pushes a stored image; shared by `strata push` and `strata build --push`.
pub fn push_image(
    node: &strata_worker::Node,
    registry: &Registry,
    image: &strata_oci::Image,
    destination: &Reference,
    compression: Compression,
    renderer: &Renderer,
) -> Result<strata_registry::Pushed> {
    crate::runtime()?
        .block_on(registry.push(image, destination, &node.content, compression, renderer))
        .with_context(|| format!("cannot push {}", destination.familiar()))
}

pub fn push(home: &Path, args: PushArgs, flags: &RegistryFlags) -> Result<ExitCode> {
    let node = crate::open_node(home)?;
    let tagged = node
        .images
        .get(&args.image)?
        .with_context(|| format!("no image {} in the local image store", args.image))?;
    let destination: Reference = args.destination.as_deref().unwrap_or(&args.image).parse()?;
    let registry = flags.registry();
    let renderer = Renderer::new(args.progress);
    let pushed = push_image(
        &node,
        &registry,
        &tagged.image,
        &destination,
        args.compression,
        &renderer,
    );
    renderer.finish();
    let pushed = pushed?;
    report_push(&destination, &pushed)?;
    Ok(ExitCode::SUCCESS)
}

/// One line per push, as `docker push` ends.
pub fn report_push(destination: &Reference, pushed: &strata_registry::Pushed) -> Result<()> {
    writeln!(
        std::io::stdout().lock(),
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

pub fn save(home: &Path, args: SaveArgs) -> Result<ExitCode> {
    let node = crate::open_node(home)?;
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
    strata_oci::export_docker_archive(&node.content, &image, &names, &args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    Ok(ExitCode::SUCCESS)
}

pub fn load(home: &Path, args: LoadArgs) -> Result<ExitCode> {
    let names = strata_oci::archive_names(&args.input)?;
    let node = crate::open_node(home)?;
    let host = Platform::host();
    let (image, _) = strata_oci::import(
        &node.images,
        &args.input,
        &node.home().join("tmp"),
        &host.os,
        &host.architecture,
    )
    .with_context(|| format!("cannot load {}", args.input.display()))?;
    let mut out = std::io::stdout().lock();
    if names.is_empty() {
        writeln!(out, "Loaded image ID: {}", image.id)?;
    }
    for name in names {
        let reference: Reference = name
            .parse()
            .with_context(|| format!("{} names its image {name:?}", args.input.display()))?;
        node.images.tag(&reference, &image)?;
        writeln!(out, "Loaded image: {}", reference.familiar())?;
    }
    Ok(ExitCode::SUCCESS)
}
