//! Layer compression: recognizing it on the way in, applying it on the
//! way out, and keeping compressed forms for reuse.

use std::io::{self, BufRead, BufReader, Read, Write};

use strata_cas::{ContentStore, Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::LayerRef;

/// How layers are compressed in an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (the OCI default, and what every client reads).
    #[default]
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The label that records a layer's compressed form of this kind.
    fn label(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Gzip => Some("ref.gzip"),
            Compression::Zstd => Some("ref.zstd"),
        }
    }

    /// The OCI media type of a layer compressed this way.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "uncompressed" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!(
                "unknown compression {other:?}: expected gzip, zstd or uncompressed"
            )),
        }
    }
}

/// A reader that undoes gzip or zstd when the stream starts with their
/// magic bytes, and passes anything else through.
pub fn decompressing(reader: impl Read + 'static) -> io::Result<Box<dyn Read>> {
    let mut buf = BufReader::with_capacity(256 * 1024, reader);
    let head = buf.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(buf))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(buf)?)
    } else {
        Box::new(buf)
    })
}

/// Records `blob` as `layer`'s compressed form of kind `how` (a pulled
/// layer as the registry had it), so an export or push sends those bytes
/// again instead of compressing anew.
pub fn record_compressed(
    cas: &ContentStore,
    layer: &LayerRef,
    how: Compression,
    blob: &Digest,
) -> Result<()> {
    if let Some(label) = how.label() {
        cas.set_label(&layer.blob, label, Some(&blob.to_string()))?;
    }
    Ok(())
}

/// The compression an OCI or Docker layer media type names, if any.
pub fn compression_of(media_type: &str) -> Option<Compression> {
    if media_type.ends_with("+zstd") {
        Some(Compression::Zstd)
    } else if media_type.ends_with("gzip") {
        Some(Compression::Gzip)
    } else if media_type.ends_with(".tar") {
        Some(Compression::None)
    } else {
        None
    }
}

/// The compressed blob of `layer` (made once, then reused): its blob
/// digest, sha256 and size. For [`Compression::None`] the layer itself.
pub fn compressed(
    cas: &ContentStore,
    layer: &LayerRef,
    how: Compression,
) -> Result<(Digest, Sha256, u64)> {
    let Some(label) = how.label() else {
        return Ok((layer.blob, layer.diff_id, layer.size));
    };
    if let Some(info) = cas.info(&layer.blob)?
        && let Some(d) = info
            .labels
            .get(label)
            .and_then(|v| v.parse::<Digest>().ok())
        && let Some(ci) = cas.info(&d)?
    {
        return Ok((d, ci.sha256, ci.size));
    }
    let mut src = cas.open_blob(&layer.blob)?;
    let mut w = cas.writer()?;
    let io_fail =
        |e: io::Error| Error::Format(format!("cannot compress layer {}: {e}", layer.blob));
    match how {
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(&mut w, flate2::Compression::default());
            io::copy(&mut src, &mut enc).map_err(|e| cas.read_error(&layer.blob, e))?;
            enc.finish().map_err(io_fail)?;
        }
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(&mut w, 3).map_err(io_fail)?;
            io::copy(&mut src, &mut enc).map_err(|e| cas.read_error(&layer.blob, e))?;
            enc.finish().map_err(io_fail)?;
        }
        Compression::None => {}
    }
    w.flush().map_err(io_fail)?;
    let (sha, size) = (w.sha256(), w.size());
    let d = w.commit()?;
    cas.set_label(&layer.blob, label, Some(&d.to_string()))?;
    Ok((d, sha, size))
}
