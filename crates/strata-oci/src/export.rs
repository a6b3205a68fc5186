//! Images out: an OCI image layout (tar or directory) or a `docker save`
//! archive that `docker load` accepts.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde_json::json;
use strata_cas::{ContentStore, Digest, Sha256};

use crate::compress::{Compression, compressed};
use crate::error::{Error, Result, io_err};
use crate::reference::Reference;
use crate::store::Image;

/// Where export entries go: a tar stream or a directory.
enum Sink {
    Tar(Box<tar::Builder<BufWriter<File>>>),
    Dir(std::path::PathBuf),
}

impl Sink {
    fn new(dest: &Path, as_tar: bool) -> Result<Sink> {
        if as_tar {
            if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
            }
            let f = File::create(dest).map_err(io_err("cannot create", dest))?;
            Ok(Sink::Tar(Box::new(tar::Builder::new(BufWriter::new(f)))))
        } else {
            fs::create_dir_all(dest).map_err(io_err("cannot create", dest))?;
            Ok(Sink::Dir(dest.to_path_buf()))
        }
    }

    fn bytes(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.reader(name, data.len() as u64, data)
    }

    fn reader(&mut self, name: &str, size: u64, data: impl io::Read) -> Result<()> {
        match self {
            Sink::Tar(b) => {
                let mut h = tar::Header::new_ustar();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_uid(0);
                h.set_gid(0);
                h.set_size(size);
                h.set_mtime(0);
                b.append_data(&mut h, name, data)
                    .map_err(|e| Error::Format(format!("cannot write {name}: {e}")))
            }
            Sink::Dir(root) => {
                let p = root.join(name);
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
                }
                let mut f = File::create(&p).map_err(io_err("cannot create", &p))?;
                let mut data = data;
                io::copy(&mut data, &mut f).map_err(io_err("cannot write", &p))?;
                Ok(())
            }
        }
    }

    fn blob(&mut self, cas: &ContentStore, name: &str, blob: &Digest, size: u64) -> Result<()> {
        let r = cas.open_blob(blob)?;
        self.reader(name, size, r)
    }

    fn finish(self) -> Result<()> {
        if let Sink::Tar(b) = self {
            let mut w = b
                .into_inner()
                .map_err(|e| Error::Format(format!("cannot finish the archive: {e}")))?;
            w.flush()
                .map_err(|e| Error::Format(format!("cannot finish the archive: {e}")))?;
        }
        Ok(())
    }
}

/// Writes `image` as an OCI image layout: a tar at `dest`, or a directory
/// when `as_tar` is false. The index names the image `reference`.
pub fn export_oci(
    cas: &ContentStore,
    image: &Image,
    reference: Option<&Reference>,
    dest: &Path,
    as_tar: bool,
    compression: Compression,
) -> Result<Sha256> {
    let mut sink = Sink::new(dest, as_tar)?;
    let mut desc = write_image(&mut sink, cas, image, compression)?;
    let manifest_sha = desc.digest;
    if let Some(r) = reference {
        desc.json["annotations"] = ref_annotations(r);
    }
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [desc.json]});
    finish_layout(sink, &index)?;
    Ok(manifest_sha)
}

/// Writes `images` (one per platform) as an OCI image layout whose
/// index.json names one image index listing them, as a multi-platform
/// build's layout is; returns the image index's digest.
pub fn export_oci_index(
    cas: &ContentStore,
    images: &[Image],
    reference: Option<&Reference>,
    dest: &Path,
    as_tar: bool,
    compression: Compression,
) -> Result<Sha256> {
    let mut sink = Sink::new(dest, as_tar)?;
    let mut manifests = Vec::new();
    for image in images {
        manifests.push(write_image(&mut sink, cas, image, compression)?.json);
    }
    let image_index = image_index(manifests)?;
    let index_sha = Sha256::of(&image_index);
    sink.bytes(&format!("blobs/sha256/{}", index_sha.hex()), &image_index)?;
    let mut desc = json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": index_sha.to_string(),
        "size": image_index.len(),
    });
    if let Some(r) = reference {
        desc["annotations"] = ref_annotations(r);
    }
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [desc]});
    finish_layout(sink, &index)?;
    Ok(index_sha)
}

/// An OCI image index listing `manifests` (descriptors with platforms).
pub fn image_index(manifests: Vec<serde_json::Value>) -> Result<Vec<u8>> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .map_err(|e| Error::Format(e.to_string()))
}

/// The platform of an image's descriptor in an index, from its config.
pub fn platform_of(image: &Image) -> serde_json::Value {
    let mut p = json!({"architecture": image.config.architecture, "os": image.config.os});
    if let Some(v) = image.config.variant.as_ref().filter(|v| !v.is_empty()) {
        p["variant"] = json!(v);
    }
    p
}

/// A manifest written to a layout: its descriptor and digest.
struct Written {
    json: serde_json::Value,
    digest: Sha256,
}

/// Writes an image's layers, config and manifest as blobs.
fn write_image(
    sink: &mut Sink,
    cas: &ContentStore,
    image: &Image,
    compression: Compression,
) -> Result<Written> {
    let config_bytes = cas.read(&image.config_blob)?;
    let mut layers = Vec::new();
    for l in &image.layers {
        let (blob, sha, size) = compressed(cas, l, compression)?;
        sink.blob(cas, &format!("blobs/sha256/{}", sha.hex()), &blob, size)?;
        layers.push(json!({"mediaType": compression.oci_media_type(), "digest": sha.to_string(), "size": size}));
    }
    sink.bytes(&format!("blobs/sha256/{}", image.id.hex()), &config_bytes)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": image.id.to_string(), "size": config_bytes.len()},
        "layers": layers,
    }))
    .map_err(|e| Error::Format(e.to_string()))?;
    let digest = Sha256::of(&manifest);
    sink.bytes(&format!("blobs/sha256/{}", digest.hex()), &manifest)?;
    Ok(Written {
        json: json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest.to_string(),
            "size": manifest.len(),
            "platform": platform_of(image),
        }),
        digest,
    })
}

fn ref_annotations(r: &Reference) -> serde_json::Value {
    json!({
        "io.containerd.image.name": r.normalized(),
        "org.opencontainers.image.ref.name": r.tag.clone().unwrap_or_else(|| "latest".into()),
    })
}

fn finish_layout(mut sink: Sink, index: &serde_json::Value) -> Result<()> {
    sink.bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    sink.bytes(
        "index.json",
        &serde_json::to_vec(index).map_err(|e| Error::Format(e.to_string()))?,
    )?;
    sink.finish()
}

/// Writes `image` as a `docker save` archive (uncompressed layers) that
/// `docker load` reads, named `tags`.
pub fn export_docker_archive(
    cas: &ContentStore,
    image: &Image,
    tags: &[Reference],
    dest: &Path,
) -> Result<()> {
    let mut sink = Sink::new(dest, true)?;
    let config_name = format!("{}.json", image.id.hex());
    sink.bytes(&config_name, &cas.read(&image.config_blob)?)?;
    let mut layer_names = Vec::new();
    for l in &image.layers {
        let name = format!("{}/layer.tar", l.diff_id.hex());
        sink.blob(cas, &name, &l.blob, l.size)?;
        layer_names.push(name);
    }
    let repo_tags: Vec<String> = tags.iter().map(Reference::familiar).collect();
    let manifest = json!([{"Config": config_name, "RepoTags": repo_tags, "Layers": layer_names}]);
    sink.bytes(
        "manifest.json",
        &serde_json::to_vec(&manifest).map_err(|e| Error::Format(e.to_string()))?,
    )?;
    sink.finish()
}
