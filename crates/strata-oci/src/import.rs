//! `strata image import`: a root filesystem tar, a `docker save` archive
//! or an OCI layout (directory or tar) into the image store.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde::Deserialize;
use sha2::Digest as _;
use strata_cas::{ContentStore, Sha256};

use crate::compress::{decompressing, read_full};
use crate::config::ImageConfig;
use crate::error::{Error, Result, io_err};
use crate::store::{Image, ImageStore, LayerRef, descriptor_sha256};

/// What kind of input an import read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    /// A tar of a root filesystem: it becomes the image's only layer.
    RootfsTar,
    /// `docker save` output (`manifest.json` at the top).
    DockerArchive,
    /// An OCI image layout (`oci-layout`, `index.json`, `blobs/`).
    OciLayout,
}

/// Imports `source` into `store`. `scratch` is a directory for unpacking
/// archives; `os`/`architecture` describe a root filesystem tar and choose
/// among the platforms of a multi-platform layout.
pub fn import(
    store: &ImageStore,
    source: &Path,
    scratch: &Path,
    os: &str,
    architecture: &str,
) -> Result<(Image, ImportFormat)> {
    if source.is_dir() {
        return import_dir(store, source, os, architecture);
    }
    let names = top_level_names(source)?;
    let archive = names.contains("manifest.json") || names.contains("oci-layout");
    if !archive {
        let file = File::open(source).map_err(io_err("cannot open", source))?;
        let layer = ingest_layer(store, file, source)?;
        let mut config = ImageConfig::scratch(os, architecture, None);
        config.config.working_dir.clear();
        config.rootfs.diff_ids = vec![layer.diff_id.to_string()];
        config.history = vec![crate::config::History {
            created_by: Some(format!("strata image import {}", source.display())),
            comment: Some("imported from a root filesystem tar".into()),
            ..Default::default()
        }];
        return Ok((store.create(&config, &[layer])?, ImportFormat::RootfsTar));
    }
    fs::create_dir_all(scratch).map_err(io_err("cannot create", scratch))?;
    let dir = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(scratch)
        .map_err(io_err("cannot create a temporary directory in", scratch))?;
    let file = File::open(source).map_err(io_err("cannot open", source))?;
    let reader = decompressing(file).map_err(io_err("cannot read", source))?;
    // Unpacked as `ADD` unpacks an archive: nothing leaves the directory,
    // whatever its names and links say.
    let unpacked =
        strata_snapshot::apply_tar_with(dir.path(), reader, strata_snapshot::TarKind::Archive)
            .map(drop)
            .map_err(|e| Error::Unpack {
                path: source.to_path_buf(),
                source: Box::new(e),
            });
    let result = unpacked.and_then(|()| import_dir(store, dir.path(), os, architecture));
    drop(dir);
    result
}

fn import_dir(
    store: &ImageStore,
    dir: &Path,
    os: &str,
    arch: &str,
) -> Result<(Image, ImportFormat)> {
    if dir.join("oci-layout").is_file() {
        return import_oci_layout(store, dir, os, arch).map(|i| (i, ImportFormat::OciLayout));
    }
    if dir.join("manifest.json").is_file() {
        return import_docker_archive(store, dir).map(|i| (i, ImportFormat::DockerArchive));
    }
    Err(Error::Format(format!(
        "{} is neither an OCI layout (no oci-layout file) nor a docker archive (no manifest.json)",
        dir.display()
    )))
}

/// The names of the top level of a tar, so the format can be told before
/// reading it for real.
fn top_level_names(path: &Path) -> Result<HashSet<String>> {
    let file = File::open(path).map_err(io_err("cannot open", path))?;
    let reader = decompressing(file).map_err(io_err("cannot read", path))?;
    let mut archive = tar::Archive::new(reader);
    let mut names = HashSet::new();
    let entries = archive
        .entries()
        .map_err(|e| Error::Format(format!("{} is not a tar: {e}", path.display())))?;
    for e in entries {
        let e =
            e.map_err(|e| Error::Format(format!("{} is not a readable tar: {e}", path.display())))?;
        let name = String::from_utf8_lossy(&e.path_bytes())
            .trim_start_matches("./")
            .to_string();
        if !name.contains('/') || name.starts_with("blobs/") {
            names.insert(name);
        }
    }
    Ok(names)
}

fn ingest_layer(
    store: &ImageStore,
    reader: impl Read + Send + 'static,
    what: &Path,
) -> Result<LayerRef> {
    store_layer(store.content(), reader, &what.display().to_string(), None)
}

/// Stores one layer from `reader` (a tar, gzip or zstd), uncompressed, as
/// the image store keeps layers; `what` names it in errors. With
/// `diff_id`, a layer that does not hash to it is an error and is not
/// stored.
///
/// Inflating and hashing (sha256 for the diff_id, blake3 for the blob)
/// cost about the same, so they run on two threads: one decompresses into
/// chunks, this one hashes and writes them.
pub fn store_layer(
    cas: &ContentStore,
    reader: impl Read + Send + 'static,
    what: &str,
    diff_id: Option<&Sha256>,
) -> Result<LayerRef> {
    let read_err = |e: io::Error| Error::Format(format!("cannot read layer {what}: {e}"));
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
    let inflate = move || {
        let mut src = match decompressing(reader) {
            Ok(src) => src,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        loop {
            let mut chunk = vec![0u8; 1 << 20];
            match read_full(&mut src, &mut chunk) {
                Ok(0) => return,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.send(Ok(chunk)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    };
    std::thread::scope(|scope| {
        scope.spawn(inflate);
        let mut w = cas.writer()?;
        for chunk in rx {
            w.write_all(&chunk.map_err(read_err)?)
                .map_err(|e| Error::Format(format!("cannot store layer {what}: {e}")))?;
        }
        w.flush()
            .map_err(|e| Error::Format(format!("cannot store layer {what}: {e}")))?;
        let (size, got) = (w.size(), w.sha256());
        if let Some(want) = diff_id
            && got != *want
        {
            return Err(Error::Format(format!(
                "layer {what} unpacks to {got}, but the image config says {want}"
            )));
        }
        let blob = w.commit()?;
        Ok(LayerRef {
            blob,
            diff_id: got,
            size,
        })
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
}

/// The names (`RepoTags`) a `docker save` archive gives its image, read
/// from its `manifest.json` without unpacking the rest.
pub fn archive_names(source: &Path) -> Result<Vec<String>> {
    let file = File::open(source).map_err(io_err("cannot open", source))?;
    let reader = decompressing(file).map_err(io_err("cannot read", source))?;
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| Error::Format(format!("{} is not a tar: {e}", source.display())))?;
    for e in entries {
        let mut e = e.map_err(|e| Error::Format(format!("{}: {e}", source.display())))?;
        if e.path_bytes().as_ref() != b"manifest.json"
            && e.path_bytes().as_ref() != b"./manifest.json"
        {
            continue;
        }
        let mut raw = Vec::new();
        e.read_to_end(&mut raw)
            .map_err(|err| Error::Format(format!("{}: {err}", source.display())))?;
        let entries: Vec<ArchiveEntry> = serde_json::from_slice(&raw).map_err(|err| {
            Error::Format(format!(
                "manifest.json of {} is malformed: {err}",
                source.display()
            ))
        })?;
        return Ok(entries
            .into_iter()
            .next()
            .and_then(|e| e.repo_tags)
            .unwrap_or_default());
    }
    Err(Error::Format(format!(
        "{} is not a docker archive (no manifest.json)",
        source.display()
    )))
}

fn inside(dir: &Path, rel: &str) -> Result<PathBuf> {
    if rel.split('/').any(|c| c == "..") || rel.starts_with('/') {
        return Err(Error::Format(format!(
            "archive path {rel:?} leaves the archive"
        )));
    }
    Ok(dir.join(rel))
}

fn import_docker_archive(store: &ImageStore, dir: &Path) -> Result<Image> {
    let manifest_path = dir.join("manifest.json");
    let raw = fs::read(&manifest_path).map_err(io_err("cannot read", &manifest_path))?;
    let entries: Vec<ArchiveEntry> = serde_json::from_slice(&raw).map_err(|e| {
        Error::Format(format!(
            "manifest.json of the docker archive is malformed: {e}"
        ))
    })?;
    let entry = entries
        .first()
        .ok_or_else(|| Error::Format("the docker archive holds no image".into()))?;
    let config_path = inside(dir, &entry.config)?;
    let config_bytes = fs::read(&config_path).map_err(io_err("cannot read", &config_path))?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        let p = inside(dir, l)?;
        let f = File::open(&p).map_err(io_err("cannot open", &p))?;
        layers.push(ingest_layer(store, f, &p)?);
    }
    check_diff_ids(&config_bytes, &layers)?;
    store.create_with_config_bytes(&config_bytes, &layers)
}

fn check_diff_ids(config: &[u8], layers: &[LayerRef]) -> Result<()> {
    let parsed: ImageConfig = serde_json::from_slice(config)
        .map_err(|e| Error::Format(format!("image config is malformed: {e}")))?;
    let got: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    if parsed.rootfs.diff_ids != got {
        return Err(Error::Format(format!(
            "the layers do not match the config: config lists {:?}, layers hash to {:?}",
            parsed.rootfs.diff_ids, got
        )));
    }
    Ok(())
}

pub(crate) fn blob_path(dir: &Path, sha: &Sha256) -> PathBuf {
    dir.join("blobs").join("sha256").join(sha.hex())
}

/// Reads an OCI layout blob and checks its sha256.
fn read_blob(dir: &Path, sha: &Sha256) -> Result<Vec<u8>> {
    let p = blob_path(dir, sha);
    let bytes = fs::read(&p).map_err(io_err("cannot read", &p))?;
    if Sha256::of(&bytes) != *sha {
        return Err(Error::Format(format!(
            "blob {} does not match its digest",
            p.display()
        )));
    }
    Ok(bytes)
}

fn import_oci_layout(store: &ImageStore, dir: &Path, os: &str, arch: &str) -> Result<Image> {
    let index_path = dir.join("index.json");
    let index = ImageIndex::from_file(&index_path)
        .map_err(|e| Error::Format(format!("{} is malformed: {e}", index_path.display())))?;
    let mut manifest = pick_manifest(dir, &index, os, arch)?;
    // Nested indexes (a multi-platform image inside the layout).
    for _ in 0..4 {
        let bytes = read_blob(dir, &manifest)?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Format(format!("blob {manifest} is not JSON: {e}")))?;
        if value.get("manifests").is_none() {
            break;
        }
        let nested = ImageIndex::from_reader(bytes.as_slice())
            .map_err(|e| Error::Format(format!("index {manifest} is malformed: {e}")))?;
        manifest = pick_manifest(dir, &nested, os, arch)?;
    }
    let bytes = read_blob(dir, &manifest)?;
    let m = ImageManifest::from_reader(bytes.as_slice())
        .map_err(|e| Error::Format(format!("manifest {manifest} is malformed: {e}")))?;
    let config_bytes = read_blob(dir, &descriptor_sha256(m.config())?)?;
    let mut layers = Vec::new();
    for d in m.layers() {
        let sha = descriptor_sha256(d)?;
        let p = blob_path(dir, &sha);
        let f = File::open(&p).map_err(io_err("cannot open", &p))?;
        let verified = VerifyingReader::new(f, sha, p.clone());
        layers.push(ingest_layer(store, verified, &p)?);
    }
    check_diff_ids(&config_bytes, &layers)?;
    store.create_with_config_bytes(&config_bytes, &layers)
}

fn pick_manifest(dir: &Path, index: &ImageIndex, os: &str, arch: &str) -> Result<Sha256> {
    let chosen = select_manifest(index.manifests(), os, arch, None)
        .or_else(|| index.manifests().first())
        .ok_or_else(|| {
            Error::Format(format!(
                "{} lists no manifests",
                dir.join("index.json").display()
            ))
        })?;
    descriptor_sha256(chosen)
}

/// The manifest of an index for a platform, as Docker picks it: os and
/// architecture must match, and the variant too when both name one; an
/// entry without a platform serves any.
pub fn select_manifest<'a>(
    manifests: &'a [Descriptor],
    os: &str,
    arch: &str,
    variant: Option<&str>,
) -> Option<&'a Descriptor> {
    let fits = |d: &&Descriptor| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == os
                && p.architecture().to_string() == arch
                && match (variant, p.variant().as_deref()) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
        })
    };
    manifests
        .iter()
        .find(fits)
        .or_else(|| manifests.iter().find(|d| d.platform().is_none()))
}

/// Checks a blob's sha256 as it is read; a mismatch is an error at the end.
pub(crate) struct VerifyingReader {
    inner: File,
    hasher: sha2::Sha256,
    want: Sha256,
    path: PathBuf,
}

impl VerifyingReader {
    /// Reads `inner` (the file at `path`), which must hash to `want`.
    pub(crate) fn new(inner: File, want: Sha256, path: PathBuf) -> VerifyingReader {
        VerifyingReader {
            inner,
            hasher: sha2::Sha256::new(),
            want,
            path,
        }
    }
}

impl Read for VerifyingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if n == 0 {
            let got = Sha256(self.hasher.clone().finalize().into());
            if got != self.want {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} hashes to {got}, not {}", self.path.display(), self.want),
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{Arch, DescriptorBuilder, MediaType, Os, PlatformBuilder};

    fn entry(arch: Arch, variant: Option<&str>, n: u8) -> Descriptor {
        let mut p = PlatformBuilder::default().os(Os::Linux).architecture(arch);
        if let Some(v) = variant {
            p = p.variant(v);
        }
        DescriptorBuilder::default()
            .media_type(MediaType::ImageManifest)
            .size(1u64)
            .digest(
                format!("{:064x}", n)
                    .parse::<oci_spec::image::Sha256Digest>()
                    .unwrap(),
            )
            .platform(p.build().unwrap())
            .build()
            .unwrap()
    }

    #[test]
    fn platforms_are_chosen_as_docker_chooses_them() {
        let index = [
            entry(Arch::ARM, Some("v6"), 1),
            entry(Arch::ARM, Some("v7"), 2),
            entry(Arch::Amd64, None, 3),
            entry(Arch::ARM64, Some("v8"), 4),
        ];
        let pick = |arch, variant| {
            select_manifest(&index, "linux", arch, variant).map(|d| d.digest().to_string())
        };
        let digest = |n: u8| Some(format!("sha256:{n:064x}"));
        assert_eq!(pick("amd64", None), digest(3));
        assert_eq!(pick("arm", Some("v7")), digest(2));
        assert_eq!(pick("arm", None), digest(1));
        assert_eq!(pick("arm64", Some("v8")), digest(4));
        assert_eq!(pick("s390x", None), None);
        assert_eq!(select_manifest(&index, "windows", "amd64", None), None);
    }
}
