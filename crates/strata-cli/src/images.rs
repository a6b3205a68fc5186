//! `strata images`, `inspect`, `rmi`, `tag`, `du`, `prune`, `image import`, `image history`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use strata_dockerfile::Platform;
use strata_oci::{ImportFormat, Reference};

use crate::cx::Cx;
use crate::units::{ago, human_size, parse_size};

#[derive(Debug, Args, Serialize, Deserialize)]
pub struct ImagesArgs {
    /// Only show image IDs.
    #[arg(short, long)]
    quiet: bool,
    /// Only images of this repository (and tag): `REPOSITORY[:TAG]`.
    repository: Option<String>,
    /// Filter as `docker images` does: `reference=PATTERN`,
    /// `label=KEY[=VALUE]`, `before=IMAGE`, `since=IMAGE`,
    /// `dangling=true|false`; repeatable (all must hold).
    #[arg(short, long = "filter", value_name = "FILTER")]
    filters: Vec<String>,
    /// Print with a Go-like template: `{{.Repository}}`, `{{.Tag}}`,
    /// `{{.ID}}`, `{{.Digest}}`, `{{.CreatedSince}}`, `{{.CreatedAt}}`,
    /// `{{.Size}}`, `{{json .}}`; `table …` for a header.
    #[arg(long)]
    format: Option<String>,
}

/// A `--filter` of `strata images`.
enum ImageFilter {
    Reference(globset::GlobMatcher),
    Label(String, Option<String>),
    Before(u64),
    Since(u64),
    Dangling(bool),
}

#[derive(Debug, Args, Serialize, Deserialize)]
pub struct RmiArgs {
    /// Image names (or IDs) to remove.
    #[arg(required = true)]
    images: Vec<String>,
    /// Remove an image given by ID even when several names refer to it
    /// (all of them go).
    #[arg(short, long)]
    force: bool,
}

#[derive(Debug, Args, Serialize, Deserialize)]
pub struct DuArgs {}

#[derive(Debug, Args, Serialize, Deserialize)]
pub struct TagArgs {
    /// The image (name or ID).
    source: String,
    /// The new name.
    target: String,
}

#[derive(Debug, Args, Serialize, Deserialize)]
pub struct InspectArgs {
    /// Images (names or IDs).
    #[arg(required = true)]
    images: Vec<String>,
}

#[derive(Debug, Args, Serialize, Deserialize)]
pub struct PruneArgs {
    /// Keep up to this much build cache (e.g. `10GB`, `500MB`); default: none.
    #[arg(long, value_name = "SIZE")]
    keep_storage: Option<String>,
}

#[derive(Debug, Subcommand, Serialize, Deserialize)]
pub enum ImageCommand {
    /// Show how an image was made: a line per history entry, newest first.
    History {
        /// The image (name or ID).
        image: String,
        /// Show whole instructions.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Show images as JSON, in `docker image inspect`'s shape.
    Inspect(InspectArgs),
    /// Import a root filesystem tar, a `docker save` archive or an OCI layout.
    Import {
        /// The platform a root filesystem tar is for, or to take from an
        /// OCI layout (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        /// Name for the image.
        name: String,
        /// The file (or OCI layout directory).
        file: PathBuf,
    },
}

/// A time as Docker's `CreatedAt` shows it: `2026-12-05 08:29:00 +0000 UTC`.
fn created_at(secs: u64) -> String {
    let t = chrono::DateTime::<chrono::Utc>::from_timestamp(i64::try_from(secs).unwrap_or(0), 0)
        .unwrap_or_default();
    t.format("%Y-%m-%d %H:%M:%S +0000 UTC").to_string()
}

pub fn images(cx: &Cx, args: ImagesArgs) -> Result<u8> {
    let node = &cx.node;
    let mut list = node.images.list()?;
    // As `docker images`: an image is as old as its config says (when it
    // says nothing, as an imported root filesystem, when it was named).
    let created = |t: &strata_oci::Tagged| {
        t.image
            .config
            .created
            .as_deref()
            .and_then(strata_oci::unix_from_rfc3339)
            .map_or(t.created, |c| u64::try_from(c).unwrap_or(0))
    };
    // Each date parsed once, not once per comparison.
    list.sort_by_cached_key(|t| (std::cmp::Reverse(created(t)), t.reference.clone()));
    let filters = args
        .filters
        .iter()
        .map(|f| {
            let (key, value) = f
                .split_once('=')
                .with_context(|| format!("invalid filter '{f}': expected KEY=VALUE"))?;
            let when = |name: &str| -> Result<u64> {
                let t = node
                    .images
                    .get(name)?
                    .with_context(|| format!("invalid filter '{f}': no such image: {name}"))?;
                Ok(created(&t))
            };
            Ok(match key {
                "reference" => ImageFilter::Reference(
                    globset::Glob::new(value)
                        .with_context(|| format!("invalid filter '{f}'"))?
                        .compile_matcher(),
                ),
                "label" => match value.split_once('=') {
                    Some((k, v)) => ImageFilter::Label(k.into(), Some(v.into())),
                    None => ImageFilter::Label(value.into(), None),
                },
                "before" => ImageFilter::Before(when(value)?),
                "since" => ImageFilter::Since(when(value)?),
                "dangling" => ImageFilter::Dangling(match value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => bail!("invalid filter '{f}': dangling is true or false"),
                }),
                _ => bail!("invalid filter '{key}'"),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    list.retain(|t| {
        let repo = t.reference.familiar_repository();
        let tag = t.reference.tag.clone().unwrap_or_default();
        let wanted = args
            .repository
            .as_deref()
            .is_none_or(|r| match r.rsplit_once(':') {
                Some((name, want)) if !want.contains('/') => name == repo && want == tag,
                _ => r == repo,
            });
        wanted
            && filters.iter().all(|f| match f {
                ImageFilter::Reference(g) => {
                    g.is_match(&repo) || g.is_match(format!("{repo}:{tag}"))
                }
                ImageFilter::Label(k, v) => t
                    .image
                    .config
                    .config
                    .labels
                    .get(k)
                    .is_some_and(|have| v.as_ref().is_none_or(|v| v == have)),
                ImageFilter::Before(c) => created(t) < *c,
                ImageFilter::Since(c) => created(t) > *c,
                // Every image listed has a name: none dangles.
                ImageFilter::Dangling(d) => !d,
            })
    });
    let mut out = cx.out();
    if let Some(format) = &args.format {
        let template = crate::template::Template::parse(format)?;
        let rows: Vec<crate::template::Row> = list
            .iter()
            .map(|t| crate::template::Row {
                fields: BTreeMap::from([
                    ("ID", serde_json::json!(&t.image.id.hex()[..12])),
                    (
                        "Repository",
                        serde_json::json!(t.reference.familiar_repository()),
                    ),
                    (
                        "Tag",
                        serde_json::json!(
                            t.reference.tag.clone().unwrap_or_else(|| "<none>".into())
                        ),
                    ),
                    (
                        "Digest",
                        serde_json::json!(t.image.manifest_digest.to_string()),
                    ),
                    ("CreatedSince", serde_json::json!(ago(created(t)))),
                    ("CreatedAt", serde_json::json!(created_at(created(t)))),
                    ("Size", serde_json::json!(human_size(t.image.size()))),
                ]),
            })
            .collect();
        let headers = BTreeMap::from([
            ("ID", "IMAGE ID"),
            ("Repository", "REPOSITORY"),
            ("Tag", "TAG"),
            ("Digest", "DIGEST"),
            ("CreatedSince", "CREATED"),
            ("CreatedAt", "CREATED AT"),
            ("Size", "SIZE"),
        ]);
        for line in template.lines(&rows, &headers)? {
            writeln!(out, "{line}")?;
        }
        return Ok(0);
    }
    if args.quiet {
        for t in &list {
            writeln!(out, "{}", &t.image.id.hex()[..12])?;
        }
        return Ok(0);
    }
    let rows: Vec<[String; 5]> = list
        .iter()
        .map(|t| {
            [
                t.reference.familiar_repository(),
                t.reference.tag.clone().unwrap_or_else(|| "<none>".into()),
                t.image.id.hex()[..12].to_string(),
                ago(created(t)),
                human_size(t.image.size()),
            ]
        })
        .collect();
    let header = ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let print = |out: &mut dyn Write, cells: &[&str]| -> std::io::Result<()> {
        let mut line = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 < cells.len() {
                line.push_str(&format!("{c:<w$}   ", w = widths[i]));
            } else {
                line.push_str(c);
            }
        }
        writeln!(out, "{line}")
    };
    print(&mut out, &header)?;
    for r in &rows {
        print(&mut out, &r.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(0)
}

pub fn rmi(cx: &Cx, args: RmiArgs) -> Result<u8> {
    let node = &cx.node;
    let mut failed = false;
    for name in &args.images {
        match node.images.get(name)? {
            Some(t) => {
                // As Docker: a name goes alone; an ID takes every name of
                // its image, and needs -f when there are several.
                let by_id = name
                    .parse::<Reference>()
                    .map_or(true, |r| r.normalized() != t.reference.normalized());
                let names: Vec<Reference> = if by_id {
                    node.images
                        .list()?
                        .into_iter()
                        .filter(|o| o.image.id == t.image.id)
                        .map(|o| o.reference)
                        .collect()
                } else {
                    vec![t.reference.clone()]
                };
                if by_id && names.len() > 1 && !args.force {
                    writeln!(
                        cx.err(),
                        "Error response from daemon: conflict: unable to delete {} (must be forced) - image is referenced in multiple repositories",
                        &t.image.id.hex()[..12]
                    )?;
                    failed = true;
                    continue;
                }
                for r in names {
                    node.images.untag(&r)?;
                    writeln!(cx.out(), "Untagged: {}", r.familiar())?;
                }
            }
            None => {
                writeln!(cx.err(), "error: no such image: {name}")?;
                failed = true;
            }
        }
    }
    Ok(u8::from(failed))
}

/// `strata inspect`: images as `docker image inspect` shows them: a JSON
/// array, one object per image, with Docker's keys.
pub fn inspect(cx: &Cx, args: InspectArgs) -> Result<u8> {
    let node = &cx.node;
    let all = node.images.list()?;
    let mut shown = Vec::new();
    let mut failed = false;
    for name in &args.images {
        let Some(t) = node.images.get(name)? else {
            writeln!(cx.err(), "Error: No such image: {name}")?;
            failed = true;
            continue;
        };
        let config: serde_json::Value =
            serde_json::from_slice(&node.content.read(&t.image.config_blob)?)
                .with_context(|| format!("the config of {name} is not JSON"))?;
        let tags: Vec<String> = all
            .iter()
            .filter(|o| o.image.id == t.image.id)
            .map(|o| o.reference.familiar())
            .collect();
        let size = t.image.size();
        shown.push(serde_json::json!({
            "Id": t.image.id.to_string(),
            "RepoTags": tags,
            "RepoDigests": [],
            "Parent": "",
            "Comment": "",
            "Created": config.get("created").cloned().unwrap_or(serde_json::Value::Null),
            "DockerVersion": "",
            "Author": config.get("author").cloned().unwrap_or_else(|| "".into()),
            "Config": config.get("config").cloned().unwrap_or_else(|| serde_json::json!({})),
            "Architecture": config.get("architecture").cloned().unwrap_or_else(|| "".into()),
            "Variant": config.get("variant").cloned(),
            "Os": config.get("os").cloned().unwrap_or_else(|| "".into()),
            "Size": size,
            "VirtualSize": size,
            "RootFS": {
                "Type": "layers",
                "Layers": t.image.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
            },
            "Metadata": { "LastTagTime": "0001-01-01T00:00:00Z" },
        }));
        // Docker leaves out a variant an image does not have.
        if let Some(obj) = shown.last_mut().and_then(|v| v.as_object_mut())
            && obj.get("Variant").is_some_and(serde_json::Value::is_null)
        {
            obj.remove("Variant");
        }
    }
    let mut out = cx.out();
    serde_json::to_writer_pretty(&mut out, &shown)?;
    writeln!(out)?;
    Ok(u8::from(failed))
}

/// `strata image history`: the image's history, newest first, as
/// `docker history` prints it.
fn history(cx: &Cx, image: &str, no_trunc: bool) -> Result<u8> {
    let t = cx
        .node
        .images
        .get(image)?
        .with_context(|| format!("no such image: {image}"))?;
    let mut layers = t.image.layers.iter().rev();
    let mut rows: Vec<[String; 4]> = Vec::new();
    let history = &t.image.config.history;
    for (i, h) in history.iter().enumerate().rev() {
        let size = if h.empty_layer {
            0
        } else {
            layers.next().map_or(0, |l| l.size)
        };
        let id = if i + 1 == history.len() {
            t.image.id.hex()[..12].to_string()
        } else {
            "<missing>".to_string()
        };
        let created = h
            .created
            .as_deref()
            .and_then(strata_oci::unix_from_rfc3339)
            .map_or_else(
                || "<unknown>".into(),
                |c| ago(u64::try_from(c).unwrap_or(0)),
            );
        let by = h.created_by.clone().unwrap_or_default();
        let by = if no_trunc || by.chars().count() <= 45 {
            by
        } else {
            format!("{}…", by.chars().take(44).collect::<String>())
        };
        rows.push([id, created, by, human_size(size)]);
    }
    let mut out = cx.out();
    writeln!(
        out,
        "{:<14}{:<24}{:<48}SIZE",
        "IMAGE", "CREATED", "CREATED BY"
    )?;
    for [id, created, by, size] in rows {
        writeln!(out, "{id:<14}{created:<24}{by:<48}{size}")?;
    }
    Ok(0)
}

/// `strata tag`: another name for a stored image.
pub fn tag(cx: &Cx, args: TagArgs) -> Result<u8> {
    let tagged = cx
        .node
        .images
        .get(&args.source)?
        .with_context(|| format!("no image {} in the local image store", args.source))?;
    let target: Reference = args.target.parse()?;
    cx.node.images.tag(&target, &tagged.image)?;
    Ok(0)
}

/// `strata du`: what the state directory holds, as `docker system df`.
pub fn du(cx: &Cx, _args: DuArgs) -> Result<u8> {
    let u = strata_worker::usage(&cx.node)?;
    let mut out = cx.out();
    writeln!(out, "{:<14}{:>8}{:>12}", "TYPE", "TOTAL", "SIZE")?;
    for (kind, (count, size)) in [
        ("Images", u.images),
        ("Build cache", u.cache),
        ("Contexts", u.contexts),
        ("Other blobs", u.other),
        ("Snapshots", u.snapshots),
    ] {
        writeln!(out, "{kind:<14}{count:>8}{:>12}", human_size(size))?;
    }
    writeln!(
        out,
        "{:<14}{:>8}{:>12}",
        "Cache mounts",
        "",
        human_size(u.cache_mounts)
    )?;
    writeln!(
        out,
        "All blobs: {}; reclaimable (neither an image's nor a running build's): {}",
        human_size(u.total),
        human_size(u.reclaimable)
    )?;
    Ok(0)
}

pub fn prune(cx: &Cx, args: PruneArgs) -> Result<u8> {
    let keep = args.keep_storage.as_deref().map(parse_size).transpose()?;
    let r = strata_worker::prune(&cx.node, keep)?;
    writeln!(
        cx.out(),
        "Removed {} cache entries, {} blobs ({}), {} snapshots; {} of blobs remain",
        r.cache_entries,
        r.blobs,
        human_size(r.bytes),
        r.snapshots,
        human_size(r.remaining)
    )?;
    Ok(0)
}

pub fn image(cx: &Cx, cmd: ImageCommand) -> Result<u8> {
    match cmd {
        ImageCommand::History { image, no_trunc } => history(cx, &image, no_trunc),
        ImageCommand::Inspect(a) => inspect(cx, a),
        ImageCommand::Import {
            name,
            file,
            platform,
        } => {
            let reference: Reference = name.parse()?;
            let shown = file.clone();
            let file = cx.path(&file);
            if !file.exists() {
                bail!("{} does not exist", shown.display());
            }
            let node = &cx.node;
            let platform = match &platform {
                Some(p) => Platform::parse(p).map_err(anyhow::Error::msg)?,
                None => Platform::host(),
            };
            let (image, format) = strata_oci::import(
                &node.images,
                &file,
                &node.home().join("tmp"),
                &platform.os,
                &platform.architecture,
            )
            .with_context(|| format!("cannot import {}", shown.display()))?;
            node.images.tag(&reference, &image)?;
            let kind = match format {
                ImportFormat::RootfsTar => "root filesystem tar",
                ImportFormat::DockerArchive => "docker archive",
                ImportFormat::OciLayout => "OCI layout",
            };
            writeln!(
                cx.out(),
                "Imported {} as {} ({kind}, {} layer(s), {})",
                shown.display(),
                reference.familiar(),
                image.layers.len(),
                human_size(image.size())
            )?;
            Ok(0)
        }
    }
}
