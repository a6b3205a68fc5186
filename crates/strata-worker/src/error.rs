//! What goes wrong in the file operations of a step, by kind: each error
//! names the path or argument it is about, and keeps what caused it as
//! its source, so a failed step shows the whole chain.

use std::io;
use std::path::{Path, PathBuf};

/// What goes wrong with the files of a step: choosing them from a source
/// (the build context, a stage, an image) and writing them into the
/// step's filesystem (COPY, ADD, WORKDIR), the digests that key them, and
/// what a RUN step's mounts are made of.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A source argument names nothing (a wildcard that matches nothing
    /// is no error, as in BuildKit).
    #[error("{spec:?}: not found")]
    NotFound {
        /// The argument, as written.
        spec: String,
    },
    /// A path could not be resolved inside its root.
    #[error("{path:?} cannot be resolved")]
    Resolve {
        /// The path, relative to the root.
        path: String,
        /// Why.
        source: Box<strata_snapshot::Error>,
    },
    /// A wildcard in a source argument does not parse.
    #[error("bad wildcard {pattern:?}")]
    Wildcard {
        /// The path component holding it.
        pattern: String,
        /// Why.
        source: globset::Error,
    },
    /// An `--exclude` pattern does not parse.
    #[error("bad --exclude pattern")]
    Exclude(#[source] strata_dockerfile::Error),
    /// The destination names no file.
    #[error("invalid destination {0:?}")]
    Destination(String),
    /// A directory on the way to a destination is something else.
    #[error("cannot make directory {dest}: {blocked} exists and is not a directory")]
    NotADirectory {
        /// The directory to make.
        dest: String,
        /// The part of its path that is not a directory.
        blocked: String,
    },
    /// `--chown` names a user or group the image does not have.
    #[error(transparent)]
    Owner(#[from] crate::users::UserError),
    /// A file system call failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done ("read", "create", "chmod", ...).
        what: &'static str,
        /// To what.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Setting a time or unpacking an archive failed.
    #[error("cannot {what} {}", path.display())]
    Snapshot {
        /// What was being done.
        what: &'static str,
        /// To what.
        path: PathBuf,
        /// Why.
        source: Box<strata_snapshot::Error>,
    },
}

/// What goes wrong with `ADD <url>`.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// No HTTP client could be made.
    #[error("ADD {url}: cannot start an HTTP client")]
    Client {
        /// The URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The request failed (no connection, TLS, a bad answer).
    #[error("ADD {url}: cannot download")]
    Get {
        /// The URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("ADD {url}: the server answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// Its answer.
        status: reqwest::StatusCode,
    },
    /// The body stopped or could not be stored.
    #[error("ADD {url}: download failed")]
    Body {
        /// The URL.
        url: String,
        /// Why.
        source: io::Error,
    },
    /// The content is not what `--checksum` says.
    #[error(
        "ADD {url}: checksum mismatch: expected sha256:{expected}, downloaded content is sha256:{got}"
    )]
    Checksum {
        /// The URL.
        url: String,
        /// What `--checksum` names.
        expected: String,
        /// What was downloaded.
        got: String,
    },
    /// The download was dropped from the store meanwhile.
    #[error("ADD {url}: the download is no longer stored")]
    Gone {
        /// The URL.
        url: String,
    },
    /// The content store failed.
    #[error("ADD {url}")]
    Store {
        /// The URL.
        url: String,
        /// Why.
        source: Box<strata_cas::Error>,
    },
}

/// What goes wrong collecting a node's garbage or measuring its store.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The content store failed.
    #[error("the content store")]
    Content(#[from] strata_cas::Error),
    /// The image store failed.
    #[error("the image store")]
    Images(#[from] strata_oci::Error),
    /// The cache index failed.
    #[error("the cache index")]
    Cache(#[from] strata_cache::Error),
    /// The snapshots failed.
    #[error("the snapshots")]
    Snapshots(#[from] strata_snapshot::Error),
    /// The size of the disk the store is on could not be read.
    #[error("cannot measure the disk of {}", path.display())]
    Disk {
        /// The state directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl FileError {
    /// An [`FileError::Io`] maker for `map_err`: `what` on `path`.
    pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
        let path = path.to_path_buf();
        move |source| FileError::Io { what, path, source }
    }

    /// A [`FileError::Snapshot`] maker for `map_err`: `what` on `path`.
    pub(crate) fn snapshot(
        what: &'static str,
        path: &Path,
    ) -> impl FnOnce(strata_snapshot::Error) -> FileError {
        let path = path.to_path_buf();
        move |source| FileError::Snapshot {
            what,
            path,
            source: Box::new(source),
        }
    }

    /// A [`FileError::Resolve`] maker for `map_err`: resolving `path`.
    pub(crate) fn resolve(path: &str) -> impl FnOnce(strata_snapshot::Error) -> FileError {
        let path = path.to_string();
        move |source| FileError::Resolve {
            path,
            source: Box::new(source),
        }
    }
}

/// A step failed with `e`: its causes are kept, as the step's.
pub(crate) fn failed(e: impl std::error::Error + 'static) -> strata_solver::WorkerError {
    strata_solver::WorkerError::from_error(&e)
}

/// A `--cache-to`, `--cache-from` or `--build-context` value that cannot
/// be taken.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {value}: {problem}")]
pub struct FlagError {
    /// The flag.
    pub flag: &'static str,
    /// Its value, as given.
    pub value: String,
    /// What is wrong with it.
    pub problem: FlagProblem,
}

/// What is wrong with a flag's value.
#[derive(Debug, thiserror::Error)]
pub enum FlagProblem {
    /// A part that is not `KEY=VALUE`.
    #[error("{0:?} is not KEY=VALUE")]
    NotKeyValue(String),
    /// A boolean attribute that is neither `true` nor `false`.
    #[error("{key}={value:?} is neither true nor false")]
    NotBoolean {
        /// The attribute.
        key: String,
        /// Its value.
        value: String,
    },
    /// A cache `mode` other than `min` or `max`.
    #[error("mode {0:?} is neither min nor max")]
    Mode(String),
    /// A cache `compression` strata does not write.
    #[error("compression {0:?} is not gzip, zstd or uncompressed")]
    Compression(String),
    /// An attribute strata does not know.
    #[error("unknown attribute {0:?}")]
    UnknownAttribute(String),
    /// A registry cache with no `ref=`.
    #[error("type=registry needs ref=REF")]
    NeedsRef,
    /// A local cache with no directory.
    #[error("type=local needs {0}=DIR")]
    NeedsDir(&'static str),
    /// A name that is no image reference.
    #[error(transparent)]
    Reference(#[from] strata_oci::ParseReferenceError),
    /// A cache type buildx has and strata does not.
    #[error("cache type {0} is not supported by strata; use type=registry or type=local")]
    UnsupportedCache(String),
    /// A cache type nobody has.
    #[error("unknown cache type {0:?} (type=registry or type=local)")]
    UnknownCache(String),
    /// A `--build-context` with no `=`.
    #[error("expected NAME=VALUE")]
    NotNameValue,
    /// A context name with other characters.
    #[error("{0:?} is not a context name (lower-case letters, digits, '.', '_', '-', '/', ':')")]
    ContextName(String),
    /// An OCI layout's image chosen by digest.
    #[error(
        "choosing an OCI layout's image by digest is not supported; give a layout holding the image"
    )]
    LayoutDigest,
    /// A bake target as a context.
    #[error("target: contexts are for bake files, not for a build")]
    BakeTarget,
    /// A URL as a context.
    #[error(
        "a URL context is not supported; give docker-image://REF, oci-layout://PATH or a directory"
    )]
    UrlContext,
    /// Nothing after the `=`.
    #[error("no value")]
    NoValue,
}

/// Why a base image (`FROM`, `COPY --from`) could not be had.
#[derive(Debug, thiserror::Error)]
pub enum BaseImageError {
    /// It is not stored and there is no registry to pull it from.
    #[error("cannot pull {reference}: no registry")]
    NoRegistry {
        /// The image.
        reference: String,
    },
    /// Its name does not parse.
    #[error("{reference:?} is not an image reference")]
    Reference {
        /// The name.
        reference: String,
        /// Why.
        source: strata_oci::ParseReferenceError,
    },
    /// The registry did not give it.
    #[error("cannot pull base image {reference}")]
    Pull {
        /// The image.
        reference: String,
        /// Why.
        source: Box<strata_registry::Error>,
    },
    /// The image store could not be read.
    #[error("cannot read base image {reference}")]
    Store {
        /// The image.
        reference: String,
        /// Why.
        source: Box<strata_oci::Error>,
    },
    /// It was pulled, and is not stored now.
    #[error("base image {reference} vanished after its pull")]
    Vanished {
        /// The image.
        reference: String,
    },
    /// It is not stored, and pulling was not asked for.
    #[error(
        "base image {reference} not found in the local image store; pull it, or add it with \
         `strata image import {reference} FILE` (a rootfs tar, docker save archive or OCI layout)"
    )]
    NotFound {
        /// The image.
        reference: String,
    },
}

/// Why a `--build-context` directory or OCI layout could not be made an
/// image.
#[derive(Debug, thiserror::Error)]
pub enum ContextImageError {
    /// The given name is an image reference: it is resolved, not made.
    #[error("is an image reference, not made")]
    IsImage,
    /// The path is no OCI layout.
    #[error("{} is not an OCI layout (no oci-layout file)", path.display())]
    NotLayout {
        /// The path.
        path: PathBuf,
    },
    /// The path is no directory.
    #[error("{} is not a directory", path.display())]
    NotDirectory {
        /// The path.
        path: PathBuf,
    },
    /// The layout's image could not be imported.
    #[error("cannot import the OCI layout {}", path.display())]
    Import {
        /// The layout.
        path: PathBuf,
        /// Why.
        source: Box<strata_oci::Error>,
    },
    /// The directory's `.dockerignore` could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The directory's `.dockerignore` does not parse.
    #[error(transparent)]
    Ignore(#[from] strata_dockerfile::Error),
    /// Its files could not be chosen or packed.
    #[error(transparent)]
    Files(#[from] FileError),
    /// A scratch file could not be made or read back.
    #[error("cannot use a scratch file in {}", dir.display())]
    Scratch {
        /// Its folder.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The layer or image could not be stored.
    #[error("cannot store the context's image")]
    Store(#[source] Box<strata_oci::Error>),
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Reading the Dockerfile or context failed.
    #[error("{0}")]
    Input(String),
    /// The Dockerfile is invalid.
    #[error(transparent)]
    Dockerfile(#[from] strata_dockerfile::Error),
    /// A `--build-context` could not be made an image.
    #[error("--build-context {name}")]
    NamedContext {
        /// The context's name.
        name: String,
        /// Why.
        source: Box<ContextImageError>,
    },
    /// Planning failed.
    #[error(transparent)]
    Plan(#[from] strata_plan::PlanError),
    /// The build asks for, or a step needs, an entitlement it may not have.
    #[error(transparent)]
    Entitlement(#[from] strata_plan::EntitlementError),
    /// A step failed.
    #[error(transparent)]
    Solve(#[from] strata_solver::SolveError),
    /// Storing the image failed.
    #[error(transparent)]
    Image(#[from] strata_oci::Error),
    /// A layer's times could not be clamped to `SOURCE_DATE_EPOCH`.
    #[error("cannot clamp the times of layer {layer} to SOURCE_DATE_EPOCH: {detail}")]
    Timestamps {
        /// The layer's diff_id.
        layer: String,
        /// Why.
        detail: String,
    },
    /// A thread doing the build's file work stopped (it panicked).
    #[error("the build's file work stopped")]
    Stopped(#[source] tokio::task::JoinError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_failure_keeps_the_os_error_as_its_cause() {
        let e = FileError::io("read", Path::new("/ctx/a"))(io::Error::from_raw_os_error(13));
        assert_eq!(e.to_string(), "cannot read /ctx/a");
        let cause = std::error::Error::source(&e).map(ToString::to_string);
        assert!(
            cause
                .as_deref()
                .is_some_and(|c| c.contains("Permission denied")),
            "{cause:?}"
        );
    }
}
