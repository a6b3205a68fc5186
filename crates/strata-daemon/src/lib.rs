//! The local strata daemon: one engine per state directory.
//!
//! A state directory's stores (RocksDB, the content store, snapshots) are
//! owned by one process. The daemon is that process for every command on
//! the machine: it listens on `daemon.sock` in the state directory (mode
//! 0600, and a client of another user is refused by its credentials),
//! runs each command it is sent with the one open node, and streams the
//! command's output, progress and exit code back. Concurrent builds thus
//! share one solver, one cache and one limit on running steps.
//!
//! * [`wire`]: the frames on the socket.
//! * [`serve`]: the daemon's side: the socket, the handshake, sessions
//!   ([`Session`]: what a command running in the daemon writes to and
//!   reads from its client), idle exit, `stop`.
//! * [`Client`]: the command's side: connecting (starting a daemon when
//!   none answers), the version check, a call and its frames.
//!
//! It knows nothing of what the commands are: they arrive as bytes the
//! CLI encodes and decodes.

mod client;
mod error;
mod server;
pub mod wire;

pub use client::{Client, Connected, Ended};
pub use error::{Error, Result};
pub use server::{Handler, Options, Session, Sink, serve};

use std::path::{Path, PathBuf};

/// The daemon's socket in a state directory.
pub fn socket_path(home: &Path) -> PathBuf {
    home.join("daemon.sock")
}

/// The daemon's log in a state directory.
pub fn log_path(home: &Path) -> PathBuf {
    home.join("daemon.log")
}

/// The daemon's process id file in a state directory.
pub fn pid_path(home: &Path) -> PathBuf {
    home.join("daemon.pid")
}

/// This build of strata, as client and daemon compare it: the release and
/// the executable's size and modification time, so a rebuilt binary is
/// another version even when the release number is the same.
pub fn version() -> String {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION
        .get_or_init(|| {
            let exe = std::env::current_exe()
                .and_then(std::fs::metadata)
                .ok()
                .map(|m| {
                    use std::os::unix::fs::MetadataExt as _;
                    format!(" ({} bytes, {})", m.len(), m.mtime())
                })
                .unwrap_or_default();
            format!("{}{exe}", env!("CARGO_PKG_VERSION"))
        })
        .clone()
}
