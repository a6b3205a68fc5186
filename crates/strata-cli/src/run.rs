//! `strata run`: a container from an image, in the same sandbox builds use.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use clap::Args;
use strata_dockerfile::Platform;
use strata_exec::{ExitStatus, Network, Stream};
use strata_oci::Reference;

use crate::cx::Cx;
use crate::registry::RegistryFlags;

#[derive(Debug, Args, serde::Serialize, serde::Deserialize)]
pub struct RunArgs {
    /// Remove the container when it exits (containers are never kept; accepted for compatibility).
    #[arg(long)]
    rm: bool,
    /// Set an environment variable.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Override the user.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Override the working directory.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// Override the entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// No network (default: the host's).
    #[arg(long)]
    no_network: bool,
    /// The image.
    image: String,
    /// Command (replaces the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Numbers the containers of this process: the daemon runs many at once.
static CONTAINER_SEQ: AtomicU64 = AtomicU64::new(0);

pub async fn run(cx: &Cx, args: RunArgs, flags: &RegistryFlags) -> Result<u8> {
    let node = &cx.node;
    let image = match node.images.get(&args.image)? {
        Some(tagged) => tagged.image,
        // As `docker run`: an image that is not here is pulled.
        None => {
            let reference: Reference = args
                .image
                .parse()
                .with_context(|| format!("image {} not found (see `strata images`)", args.image))?;
            let host = Platform::host();
            let target = strata_worker::registry_target(&host);
            let transfer = cx.session.transfer();
            let pulled = flags
                .registry_for(cx)
                .pull(&reference, target, &node.images, transfer.as_ref())
                .await;
            cx.session.progress_done();
            pulled
                .with_context(|| {
                    format!("image {} is not stored and cannot be pulled", args.image)
                })?
                .image
        }
    };
    let cfg = &image.config.config;
    let mut argv: Vec<String> = match &args.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => cfg.entrypoint.clone().unwrap_or_default(),
    };
    if args.command.is_empty() {
        if args.entrypoint.is_none() {
            argv.extend(cfg.cmd.clone().unwrap_or_default());
        }
    } else {
        argv.extend(args.command.iter().cloned());
    }
    if argv.is_empty() {
        bail!(
            "image {} has no command: give one after the image name",
            args.image
        );
    }
    let blobs: Vec<_> = image.layers.iter().map(|l| l.blob).collect();
    let user = args.user.clone().unwrap_or_else(|| cfg.user.clone());
    let mut env = cfg.env.clone();
    for e in &args.env {
        let k = e.split('=').next().unwrap_or_default();
        env.retain(|x| x.split('=').next() != Some(k));
        env.push(e.clone());
    }
    let cwd = args.workdir.clone().unwrap_or_else(|| {
        if cfg.working_dir.is_empty() {
            "/".into()
        } else {
            cfg.working_dir.clone()
        }
    });
    let cid = format!(
        "strata-run-{}-{}",
        std::process::id(),
        CONTAINER_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let bundle = node.home().join("run").join(&cid);
    let network = if args.no_network {
        Network::None
    } else {
        Network::Host
    };
    let hostname = cid.chars().take(12).collect();
    let name = args.image.clone();
    let at = bundle.clone();
    // Layers not yet unpacked are unpacked here; the container is set up
    // as a step's is.
    let (active, sandbox) = cx
        .blocking(move |cx| {
            let active = cx
                .node
                .snapshots
                .active(&blobs)
                .context("cannot prepare the container's filesystem")?;
            std::fs::create_dir_all(&at)
                .with_context(|| format!("cannot create {}", at.display()))?;
            let sandbox = strata_worker::sandbox(strata_worker::Process {
                rootfs: &active.rootfs(),
                bundle: &at,
                args: argv,
                env,
                cwd: &cwd,
                user: &user,
                network,
                extra_hosts: &[],
                hostname,
            })
            .with_context(|| format!("cannot set up a container of {name}"))?;
            Ok((active, sandbox))
        })
        .await?;
    let rootfs = active.rootfs();
    let runtime = node.runtime()?;
    let (out, err) = (
        std::sync::Mutex::new(cx.out()),
        std::sync::Mutex::new(cx.err()),
    );
    let output: strata_exec::Output = Arc::new(move |s: Stream, bytes: &[u8]| {
        let sink = match s {
            Stream::Stdout => &out,
            Stream::Stderr => &err,
        };
        let _ = sink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .write_all(bytes);
    });
    let status = runtime
        .run(
            &cid,
            &rootfs,
            &bundle,
            &sandbox,
            output,
            cx.session.cancel(),
        )
        .await;
    drop(active);
    let _ = std::fs::remove_dir_all(&bundle);
    Ok(match status? {
        ExitStatus::Code(c) => c.clamp(0, 255) as u8,
        ExitStatus::Signal(s) => (128 + s).clamp(0, 255) as u8,
        ExitStatus::Cancelled => 130,
    })
}
