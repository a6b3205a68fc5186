//! How a build dates its image and the files in it.
//!
//! By default as Docker: files keep the times they have (a COPY'd file
//! its source's, a file a RUN wrote the time it was written), and the
//! image is dated by when its steps ran. With `SOURCE_DATE_EPOCH` the image
//! and its history carry that date, and the layers the build made get
//! copies with no file time later than it, so the same inputs give the
//! same image digest on any machine, from any checkout, at any time;
//! `rewrite-timestamp=true` clamps the base image's layers too. Cache
//! entries keep the layers as their steps wrote them: the epoch is
//! applied to the image, not to the cache, so changing it re-runs nothing.

use std::sync::Arc;

use strata_cas::{ContentStore, Digest};
use strata_oci::{Image, ImageConfig, LayerRef};

use crate::error::BuildError;
use crate::node::Node;

/// The build arg (and environment variable) naming the epoch.
pub const SOURCE_DATE_EPOCH: &str = "SOURCE_DATE_EPOCH";

/// The label a layer blob carries naming its copy clamped to an epoch
/// (`strata.clamped.<epoch>` → the copy's blake3).
const CLAMPED_LABEL: &str = "strata.clamped.";

/// What dates an image and clamps its files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timestamps {
    /// `SOURCE_DATE_EPOCH`, seconds since the Unix epoch.
    pub source_date_epoch: Option<i64>,
    /// `rewrite-timestamp=true`: clamp the base image's layers too.
    pub rewrite_base: bool,
}

impl Timestamps {
    /// The policy of a build with `source_date_epoch`, clamping its base
    /// image's layers too when `rewrite_base`, which needs the epoch.
    pub fn new(
        source_date_epoch: Option<i64>,
        rewrite_base: bool,
    ) -> Result<Timestamps, BuildError> {
        if rewrite_base && source_date_epoch.is_none() {
            return Err(BuildError::Input(
                "rewrite-timestamp=true needs SOURCE_DATE_EPOCH: give --build-arg SOURCE_DATE_EPOCH=SECONDS or set it in the environment".into(),
            ));
        }
        Ok(Timestamps {
            source_date_epoch,
            rewrite_base,
        })
    }
}

/// Parses a `SOURCE_DATE_EPOCH` value: whole seconds since 1970, as the
/// reproducible-builds specification defines it.
pub fn parse_source_date_epoch(value: &str) -> Result<i64, BuildError> {
    value
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| {
            BuildError::Input(format!(
                "SOURCE_DATE_EPOCH must be a whole number of seconds since 1970-01-01, not {value:?}"
            ))
        })
}

/// Stores the image of a finished build: `config` over `layers`, of which
/// the bottom `image_layers` came from its base image. With an epoch, the
/// layers the build made (and with `rewrite_base` the base's too) are
/// replaced by copies clamped to it, and the config names their diff_ids.
/// Writing layers anew and the store's writes block, so it runs on a
/// blocking thread.
pub async fn store_image(
    node: &Arc<Node>,
    config: ImageConfig,
    layers: &[LayerRef],
    image_layers: usize,
    stamps: Timestamps,
) -> Result<Image, BuildError> {
    let (node, layers) = (Arc::clone(node), layers.to_vec());
    crate::worker::off_runtime(
        move || store_image_here(&node, config, &layers, image_layers, stamps),
        BuildError::Stopped,
    )
    .await
}

/// [`store_image`], on the calling thread.
fn store_image_here(
    node: &Node,
    mut config: ImageConfig,
    layers: &[LayerRef],
    image_layers: usize,
    stamps: Timestamps,
) -> Result<Image, BuildError> {
    let Some(epoch) = stamps.source_date_epoch else {
        return Ok(node.images.create(&config, layers)?);
    };
    let from = if stamps.rewrite_base { 0 } else { image_layers };
    let mut lease = node.content.lease();
    let mut out = layers.to_vec();
    for layer in out.iter_mut().skip(from) {
        *layer = clamped(&node.content, *layer, epoch)?;
        lease.hold(layer.blob);
    }
    config.rootfs.diff_ids = out.iter().map(|l| l.diff_id.to_string()).collect();
    let image = node.images.create(&config, &out)?;
    drop(lease);
    Ok(image)
}

/// `layer` with no time after `epoch`: the copy made before if it is still
/// stored, else a new one.
fn clamped(content: &ContentStore, layer: LayerRef, epoch: i64) -> Result<LayerRef, BuildError> {
    let fail = |detail: String| BuildError::Timestamps {
        layer: layer.diff_id.to_string(),
        detail,
    };
    let label = format!("{CLAMPED_LABEL}{epoch}");
    let source = content
        .info(&layer.blob)
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail("the layer is not stored".into()))?;
    if let Some(copy) = source
        .labels
        .get(&label)
        .and_then(|d| d.parse::<Digest>().ok())
        && let Some(info) = content.info(&copy).map_err(|e| fail(e.to_string()))?
    {
        return Ok(LayerRef {
            blob: copy,
            diff_id: info.sha256,
            size: info.size,
        });
    }
    let reader = content
        .open_blob(&layer.blob)
        .map_err(|e| fail(e.to_string()))?;
    let mut writer = content.writer().map_err(|e| fail(e.to_string()))?;
    let changed = strata_snapshot::clamp_times(reader, &mut writer, epoch)
        .map_err(|e| fail(e.to_string()))?;
    let (size, diff_id) = (writer.size(), writer.sha256());
    let copy = writer.commit().map_err(|e| fail(e.to_string()))?;
    content
        .set_label(&layer.blob, &label, Some(&copy.to_string()))
        .map_err(|e| fail(e.to_string()))?;
    tracing::debug!(layer = %layer.diff_id, clamped = %diff_id, changed, epoch, "clamped a layer's times");
    Ok(LayerRef {
        blob: copy,
        diff_id,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_date_epoch_is_whole_seconds() {
        assert_eq!(parse_source_date_epoch("0").unwrap(), 0);
        assert_eq!(
            parse_source_date_epoch("1700000000").unwrap(),
            1_700_000_000
        );
        assert_eq!(parse_source_date_epoch(" 42 ").unwrap(), 42);
        for bad in ["", "-1", "1.5", "yesterday", "1e9"] {
            let e = parse_source_date_epoch(bad).unwrap_err().to_string();
            assert!(e.contains("SOURCE_DATE_EPOCH must be"), "{bad}: {e}");
        }
    }
}
