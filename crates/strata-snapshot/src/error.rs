//! Errors of the snapshotter.

use std::io;
use std::path::PathBuf;

/// What went wrong applying, mounting or diffing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A layer entry would write outside the root it is applied to.
    #[error("refusing layer entry {entry:?}: {reason}")]
    Unsafe {
        /// The entry's name as it appears in the tar.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// The tar stream is malformed or truncated.
    #[error("layer tar is malformed: {0}")]
    Tar(String),
    /// Writing the layer tar being made failed (the disk is full, most
    /// likely).
    #[error("cannot write layer entry {entry}: {source}")]
    Write {
        /// The entry being written.
        entry: String,
        /// Why it failed; names the file written to.
        source: io::Error,
    },
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// Mounting or unmounting an overlay failed.
    #[error("cannot {what} {}: {source}", path.display())]
    Mount {
        /// `mount` or `unmount`.
        what: &'static str,
        /// The mount point.
        path: PathBuf,
        /// The kernel's answer.
        source: nix::Error,
    },
    /// The chain has more layers than one overlay mount can take.
    #[error("{layers} layers are more than one overlay mount can stack (at most {max})")]
    TooManyLayers {
        /// Layers in the chain.
        layers: usize,
        /// The most that fit.
        max: usize,
    },
    /// Reading or writing a blob failed.
    #[error(transparent)]
    Content(#[from] strata_cas::Error),
}

/// The snapshotter's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err<'p>(
    what: &'static str,
    path: &'p std::path::Path,
) -> impl FnOnce(io::Error) -> Error + 'p {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
