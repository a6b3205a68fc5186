//! An image's filesystem, as `--output type=local` and `type=tar` export
//! it: the tree its layers make together, not the layers. It is read from
//! a read-only overlay view of the node's snapshots, so nothing is copied
//! before it is written out.

use std::io::Write;
use std::path::Path;

use strata_oci::Image;
use strata_snapshot::TarKind;

use crate::node::Node;

/// Why an image's filesystem could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Mounting, reading or writing the tree failed.
    #[error(transparent)]
    Snapshot(#[from] strata_snapshot::Error),
    /// The pipe between reading and writing the tree failed.
    #[error("cannot export the image's files: {0}")]
    Pipe(std::io::Error),
}

/// Writes the image's filesystem to `out` as one tar (sorted, numeric
/// owners, hard links as links).
pub fn write_rootfs_tar(node: &Node, image: &Image, out: impl Write) -> Result<(), ExportError> {
    let blobs: Vec<_> = image.layers.iter().map(|l| l.blob).collect();
    let view = node.snapshots.view(&blobs)?;
    strata_snapshot::write_layer(&view.root(), out)?;
    Ok(())
}

/// Writes the image's filesystem into the directory `dest` (made if
/// missing; what is there stays unless the image has the same path). The
/// tree is extracted as `ADD` extracts an archive, so a symbolic link in
/// the image can never lead a write outside `dest`.
pub fn export_rootfs(node: &Node, image: &Image, dest: &Path) -> Result<u64, ExportError> {
    std::fs::create_dir_all(dest).map_err(|source| strata_snapshot::Error::Io {
        what: "cannot create",
        path: dest.to_path_buf(),
        source,
    })?;
    let (reader, writer) = std::io::pipe().map_err(ExportError::Pipe)?;
    std::thread::scope(|s| {
        let written = s.spawn(move || write_rootfs_tar(node, image, writer));
        // Returning drops the reader, so a writer left mid-tree stops.
        let applied = strata_snapshot::apply_tar_with(dest, reader, TarKind::Archive);
        let written = written
            .join()
            .unwrap_or_else(|_| Err(ExportError::Pipe(std::io::Error::other("the reader died"))));
        // The extraction's error says more than the broken pipe it causes.
        let stats = applied?;
        written?;
        Ok(stats.entries)
    })
}
