//! Artifacts: manifests whose config is not an image's (strata's build
//! cache), kept in an OCI image layout directory under a tag.
//!
//! The layout is the one images use (`oci-layout`, `index.json`,
//! `blobs/sha256/`), so `skopeo`, `oras` and registries' tools read it;
//! only the config's media type says what the manifest is. Several tags
//! share one directory, as buildx's `type=local` cache does.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde_json::json;
use strata_cas::{ContentStore, Sha256};

use crate::compress::{Compression, compressed};
use crate::error::{Error, Result, io_err};
use crate::import::{VerifyingReader, blob_path};
use crate::store::{LayerRef, descriptor_sha256};

/// The largest manifest, config or index an artifact may have: they are
/// read whole, and a layout or registry is not trusted to be small.
pub const MAX_METADATA_BYTES: u64 = 64 << 20;

/// The annotation naming a manifest in a layout's index.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A manifest of layers and a config of some media type.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// The config's bytes.
    pub config: Vec<u8>,
    /// The config's media type: what the artifact is.
    pub media_type: String,
    /// The layers, in the manifest's order.
    pub layers: Vec<LayerRef>,
}

/// The manifest of an artifact whose layers are `layers` (sha256, size,
/// media type) and whose config is `config`.
pub fn artifact_manifest(
    media_type: &str,
    config: &[u8],
    layers: &[(Sha256, u64, &str)],
) -> Result<Vec<u8>> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(sha, size, media)| json!({"mediaType": media, "digest": sha.to_string(), "size": size}))
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": media_type,
        "config": {"mediaType": media_type, "digest": Sha256::of(config).to_string(), "size": config.len()},
        "layers": layers,
    }))
    .map_err(|e| Error::Format(format!("cannot encode a manifest: {e}")))
}

/// Writes `artifact` into the layout directory `dir` (made when missing)
/// as `tag`, its layers compressed with `compression`, and returns the
/// bytes of the blobs it wrote (a layer the layout has is not written
/// again). Blobs go in first, each written to a temporary file,
/// synced and renamed; then `index.json` is replaced the same way, so a
/// reader sees the old artifact or the new one, never half of one. Blobs
/// that no manifest of the new index references are removed afterwards:
/// the directory holds what its tags name, not every export ever made.
pub fn write_artifact_layout(
    cas: &ContentStore,
    artifact: &Artifact,
    dir: &Path,
    tag: &str,
    compression: Compression,
) -> Result<u64> {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).map_err(io_err("cannot create", &blobs))?;
    let mut layers = Vec::with_capacity(artifact.layers.len());
    let mut written = 0;
    for l in &artifact.layers {
        let (blob, sha, size) = compressed(cas, l, compression)?;
        let dest = blob_path(dir, &sha);
        layers.push((sha, size, compression.oci_media_type()));
        if fs::metadata(&dest).is_ok_and(|m| m.len() == size) {
            continue;
        }
        let mut src = cas.open_blob(&blob)?;
        write_atomically(&dest, &mut src)?;
        written += size;
    }
    let config_sha = Sha256::of(&artifact.config);
    write_atomically(
        &blob_path(dir, &config_sha),
        &mut artifact.config.as_slice(),
    )?;
    let manifest = artifact_manifest(&artifact.media_type, &artifact.config, &layers)?;
    let manifest_sha = Sha256::of(&manifest);
    write_atomically(&blob_path(dir, &manifest_sha), &mut manifest.as_slice())?;

    // The index: this tag's entry replaced, the others kept.
    let mut entries: Vec<serde_json::Value> = match read_index(dir) {
        Ok(Some(index)) => index
            .manifests()
            .iter()
            .filter(|d| ref_name(d) != Some(tag))
            .filter_map(|d| serde_json::to_value(d).ok())
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "replacing an unreadable index.json");
            Vec::new()
        }
    };
    entries.push(json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": artifact.media_type,
        "digest": manifest_sha.to_string(),
        "size": manifest.len(),
        "annotations": {REF_NAME: tag},
    }));
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .map_err(|e| Error::Format(format!("cannot encode index.json: {e}")))?;
    write_atomically(
        &dir.join("oci-layout"),
        &mut &br#"{"imageLayoutVersion":"1.0.0"}"#[..],
    )?;
    write_atomically(&dir.join("index.json"), &mut index.as_slice())?;
    remove_unreferenced(dir);
    Ok(written + artifact.config.len() as u64 + manifest.len() as u64)
}

/// Reads the artifact tagged `tag` in the layout at `dir` into `cas`. Its
/// config must have media type `media_type`; `diff_ids` reads from the
/// config what each layer must unpack to. Every blob is checked against
/// its digest as it is read, and every layer against its diff_id; a
/// layer already stored under its diff_id is not read at all.
pub fn read_artifact_layout(
    cas: &ContentStore,
    dir: &Path,
    tag: &str,
    media_type: &str,
    diff_ids: impl FnOnce(&[u8]) -> Result<Vec<Sha256>>,
) -> Result<Artifact> {
    let index = read_index(dir)?.ok_or_else(|| {
        Error::Format(format!(
            "{} is not an OCI layout (it has no index.json)",
            dir.display()
        ))
    })?;
    let entry = index
        .manifests()
        .iter()
        .find(|d| ref_name(d) == Some(tag))
        .ok_or_else(|| {
            Error::Format(format!(
                "the layout at {} has nothing tagged {tag}",
                dir.display()
            ))
        })?;
    let manifest_bytes = read_metadata_blob(dir, &descriptor_sha256(entry)?)?;
    let manifest = ImageManifest::from_reader(manifest_bytes.as_slice()).map_err(|e| {
        Error::Format(format!(
            "the manifest tagged {tag} in {} is malformed: {e}",
            dir.display()
        ))
    })?;
    let have = manifest.config().media_type().to_string();
    if have != media_type {
        return Err(Error::Format(format!(
            "{tag} in {} is {have}, not {media_type}",
            dir.display()
        )));
    }
    let config = read_metadata_blob(dir, &descriptor_sha256(manifest.config())?)?;
    let want = diff_ids(&config)?;
    check_layer_count(&manifest, &want)?;
    let mut layers = Vec::with_capacity(want.len());
    for (desc, diff_id) in manifest.layers().iter().zip(&want) {
        if let Some(stored) = stored_layer(cas, diff_id)? {
            layers.push(stored);
            continue;
        }
        let sha = descriptor_sha256(desc)?;
        let p = blob_path(dir, &sha);
        let f = File::open(&p).map_err(io_err("cannot open", &p))?;
        let verified = VerifyingReader::new(f, sha, p.clone());
        layers.push(crate::store_layer(
            cas,
            verified,
            &p.display().to_string(),
            Some(diff_id),
        )?);
    }
    Ok(Artifact {
        config,
        media_type: have,
        layers,
    })
}

/// The layer stored under `diff_id`, if any.
pub fn stored_layer(cas: &ContentStore, diff_id: &Sha256) -> Result<Option<LayerRef>> {
    if let Some(blob) = cas.by_sha256(diff_id)?
        && let Some(info) = cas.info(&blob)?
    {
        return Ok(Some(LayerRef {
            blob,
            diff_id: *diff_id,
            size: info.size,
        }));
    }
    Ok(None)
}

/// An artifact's config must name as many layers as its manifest lists.
pub fn check_layer_count(manifest: &ImageManifest, diff_ids: &[Sha256]) -> Result<()> {
    if manifest.layers().len() != diff_ids.len() {
        return Err(Error::Format(format!(
            "the manifest lists {} layers, its config {}",
            manifest.layers().len(),
            diff_ids.len()
        )));
    }
    Ok(())
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME))
        .map(String::as_str)
}

fn read_index(dir: &Path) -> Result<Option<ImageIndex>> {
    let path = dir.join("index.json");
    let bytes = match read_limited(&path) {
        Ok(b) => b,
        Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    ImageIndex::from_reader(bytes.as_slice())
        .map(Some)
        .map_err(|e| Error::Format(format!("{} is malformed: {e}", path.display())))
}

/// A manifest or config blob of the layout, checked against its digest.
fn read_metadata_blob(dir: &Path, sha: &Sha256) -> Result<Vec<u8>> {
    let p = blob_path(dir, sha);
    let bytes = read_limited(&p)?;
    let got = Sha256::of(&bytes);
    if got != *sha {
        return Err(Error::Format(format!(
            "{} hashes to {got}, not {sha}",
            p.display()
        )));
    }
    Ok(bytes)
}

fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let f = File::open(path).map_err(io_err("cannot open", path))?;
    let mut bytes = Vec::new();
    f.take(MAX_METADATA_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("cannot read", path))?;
    if bytes.len() as u64 > MAX_METADATA_BYTES {
        return Err(Error::Format(format!(
            "{} is larger than {} MiB",
            path.display(),
            MAX_METADATA_BYTES >> 20
        )));
    }
    Ok(bytes)
}

/// Writes `dest` from `src` through a temporary file beside it: synced,
/// renamed into place, the directory synced.
fn write_atomically(dest: &Path, src: &mut dyn Read) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io_err("cannot create a temporary file in", dir))?;
    io::copy(src, &mut tmp).map_err(io_err("cannot write", dest))?;
    tmp.flush().map_err(io_err("cannot write", dest))?;
    tmp.as_file()
        .sync_all()
        .map_err(io_err("cannot sync", dest))?;
    tmp.persist(dest).map_err(|e| Error::Io {
        what: "cannot move into place",
        path: dest.to_path_buf(),
        source: e.error,
    })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync", dir))
}

/// Removes the blobs no manifest of the layout's index references. Any
/// manifest it cannot read keeps every blob (nothing is removed on a
/// guess).
fn remove_unreferenced(dir: &Path) {
    let Ok(Some(index)) = read_index(dir) else {
        return;
    };
    let mut keep: HashSet<PathBuf> = HashSet::new();
    for entry in index.manifests() {
        let Ok(sha) = descriptor_sha256(entry) else {
            return;
        };
        let Ok(bytes) = read_metadata_blob(dir, &sha) else {
            return;
        };
        keep.insert(blob_path(dir, &sha));
        let Ok(m) = ImageManifest::from_reader(bytes.as_slice()) else {
            return;
        };
        for d in std::iter::once(m.config()).chain(m.layers()) {
            let Ok(sha) = descriptor_sha256(d) else {
                return;
            };
            keep.insert(blob_path(dir, &sha));
        }
    }
    let blobs = dir.join("blobs").join("sha256");
    let Ok(entries) = fs::read_dir(&blobs) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if !keep.contains(&path)
            && e.file_type().is_ok_and(|t| t.is_file())
            && let Err(err) = fs::remove_file(&path)
        {
            tracing::warn!(blob = %path.display(), error = %err, "cannot remove an unreferenced blob");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(cas: &ContentStore, name: &str, body: &[u8]) -> LayerRef {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, body).unwrap();
        let bytes = b.into_inner().unwrap();
        crate::store_layer(cas, std::io::Cursor::new(bytes), name, None).unwrap()
    }

    fn diff_ids(config: &[u8]) -> Result<Vec<Sha256>> {
        let v: Vec<String> = serde_json::from_slice(config).unwrap();
        Ok(v.iter().map(|s| s.parse().unwrap()).collect())
    }

    fn artifact(layers: Vec<LayerRef>) -> Artifact {
        let ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
        Artifact {
            config: serde_json::to_vec(&ids).unwrap(),
            media_type: "application/vnd.example+json".into(),
            layers,
        }
    }

    #[test]
    fn artifacts_round_trip_through_a_layout_and_tags_share_it() {
        let from = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(from.path()).unwrap();
        let (a, b) = (layer(&cas, "a", b"alpha"), layer(&cas, "b", b"beta"));
        let out = tempfile::tempdir().unwrap();
        let first = artifact(vec![a, b]);
        write_artifact_layout(&cas, &first, out.path(), "one", Compression::Gzip).unwrap();
        write_artifact_layout(
            &cas,
            &artifact(vec![b]),
            out.path(),
            "two",
            Compression::Gzip,
        )
        .unwrap();

        let to = tempfile::tempdir().unwrap();
        let cas2 = ContentStore::open(to.path()).unwrap();
        let media = "application/vnd.example+json";
        let read = read_artifact_layout(&cas2, out.path(), "one", media, diff_ids).unwrap();
        assert_eq!(read.layers, first.layers);
        assert_eq!(read.config, first.config);
        assert_eq!(cas2.read(&a.blob).unwrap(), cas.read(&a.blob).unwrap());

        // Replacing "one" with a single layer drops blobs only it used.
        let blobs = || {
            fs::read_dir(out.path().join("blobs/sha256"))
                .unwrap()
                .count()
        };
        let before = blobs();
        write_artifact_layout(
            &cas,
            &artifact(vec![b]),
            out.path(),
            "one",
            Compression::Gzip,
        )
        .unwrap();
        assert!(blobs() < before, "{} blobs, before {before}", blobs());
        let two = read_artifact_layout(&cas2, out.path(), "two", media, diff_ids).unwrap();
        assert_eq!(two.layers, vec![b]);

        let e = read_artifact_layout(&cas2, out.path(), "three", media, diff_ids).unwrap_err();
        assert!(e.to_string().contains("nothing tagged three"), "{e}");
        let e = read_artifact_layout(&cas2, out.path(), "one", "application/other", diff_ids)
            .unwrap_err();
        assert!(e.to_string().contains("not application/other"), "{e}");
    }

    #[test]
    fn a_tampered_layer_is_refused_and_not_stored() {
        let from = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(from.path()).unwrap();
        let a = layer(&cas, "a", b"alpha");
        let out = tempfile::tempdir().unwrap();
        write_artifact_layout(&cas, &artifact(vec![a]), out.path(), "t", Compression::None)
            .unwrap();
        // The layer blob is the uncompressed tar: flip a byte of its content.
        let p = blob_path(out.path(), &a.diff_id);
        let mut bytes = fs::read(&p).unwrap();
        bytes[512] ^= 1;
        fs::write(&p, bytes).unwrap();
        let to = tempfile::tempdir().unwrap();
        let cas2 = ContentStore::open(to.path()).unwrap();
        let e = read_artifact_layout(
            &cas2,
            out.path(),
            "t",
            "application/vnd.example+json",
            diff_ids,
        )
        .unwrap_err();
        assert!(e.to_string().contains("hashes to"), "{e}");
        assert!(cas2.by_sha256(&a.diff_id).unwrap().is_none());
    }
}
