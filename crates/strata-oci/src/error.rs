//! Errors of the image layer.

use std::io;
use std::path::PathBuf;

/// What went wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No image by that name or ID.
    #[error("image {0} not found in the local image store (see `strata images`)")]
    NotFound(String),
    /// The name is not an image reference.
    #[error(transparent)]
    Reference(#[from] crate::ParseReferenceError),
    /// An archive, manifest or config is not what it claims to be.
    #[error("{0}")]
    Format(String),
    /// An archive could not be unpacked (or is unsafe to).
    #[error("cannot unpack {}", path.display())]
    Unpack {
        /// The archive.
        path: PathBuf,
        /// Why.
        source: Box<strata_snapshot::Error>,
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
    /// The image database failed.
    #[error("image store at {}: {source}", path.display())]
    Db {
        /// The database directory.
        path: PathBuf,
        /// Why it failed.
        source: rocksdb::Error,
    },
    /// A blob could not be read or written.
    #[error(transparent)]
    Content(#[from] strata_cas::Error),
}

/// The image layer's result type.
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
