//! Transport errors, naming the peer or file involved.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a connection, message or transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificates or keys could not be made, read or used.
    #[error("{0}")]
    Tls(String),
    /// A file of the cluster's credentials could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A peer could not be reached, or the connection broke.
    #[error("{peer}: {detail}")]
    Connection {
        /// The peer's address.
        peer: SocketAddr,
        /// What happened.
        detail: String,
    },
    /// The peer is not one this node talks to.
    #[error("{peer}: refused: {detail}")]
    Refused {
        /// The peer's address.
        peer: SocketAddr,
        /// Why.
        detail: String,
    },
    /// A message was malformed or too large.
    #[error("{peer}: malformed message: {detail}")]
    Malformed {
        /// The peer's address.
        peer: SocketAddr,
        /// What was wrong.
        detail: String,
    },
    /// A blob did not arrive whole or did not hash to its name.
    #[error("{peer}: blob {digest}: {detail}")]
    Blob {
        /// The peer's address.
        peer: SocketAddr,
        /// The blob.
        digest: strata_cas::Digest,
        /// What was wrong.
        detail: String,
    },
    /// A peer sent a blob that is not what it named: other bytes, another
    /// sha256, or more than it announced. Whoever receives it drops the
    /// blob and the connection.
    #[error("{peer}: blob {digest} forged: {detail}")]
    Forged {
        /// The peer's address.
        peer: SocketAddr,
        /// The blob it named.
        digest: strata_cas::Digest,
        /// What did not match.
        detail: String,
    },
    /// The local content store failed.
    #[error(transparent)]
    Store(#[from] strata_cas::Error),
}

impl Error {
    /// A word for what went wrong, as metrics label it: one of `tls`,
    /// `io`, `connection`, `refused`, `malformed`, `blob`, `forged`,
    /// `store`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Tls(_) => "tls",
            Error::Io { .. } => "io",
            Error::Connection { .. } => "connection",
            Error::Refused { .. } => "refused",
            Error::Malformed { .. } => "malformed",
            Error::Blob { .. } => "blob",
            Error::Forged { .. } => "forged",
            Error::Store(_) => "store",
        }
    }
}

/// The transport's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
