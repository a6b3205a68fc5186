//! Errors of the daemon and its clients.

use std::path::PathBuf;

/// Why talking to (or being) the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A frame was malformed or the connection broke.
    #[error("strata daemon protocol: {0}")]
    Protocol(String),
    /// The daemon turned the client away.
    #[error("{0}")]
    Refused(String),
    /// The daemon went away in the middle of a command.
    #[error(
        "the strata daemon (pid {pid}) stopped in the middle of this command; its log is {}",
        log.display()
    )]
    Died {
        /// Its process.
        pid: u32,
        /// Its log.
        log: PathBuf,
    },
    /// A daemon could not be started.
    #[error("cannot start the strata daemon for {}: {detail}; its log is {}", home.display(), log.display())]
    Start {
        /// The state directory.
        home: PathBuf,
        /// Why.
        detail: String,
        /// Its log.
        log: PathBuf,
    },
}

/// The daemon's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
