//! What the daemon and its clients say: length-delimited bincode frames on
//! the Unix socket, one connection per command.
//!
//! A client sends a [`Hello`], is answered with a [`Greeting`], then sends
//! one [`ToDaemon`]. For a call, the daemon answers with [`FromDaemon`]
//! frames until `Exit` or `Failed`; closing the connection before then
//! cancels the call.

use std::path::PathBuf;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use strata_solver::Event;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::error::{Error, Result};

/// The largest frame either side accepts: output comes in small pieces,
/// and nothing else is large.
pub const MAX_FRAME: usize = 16 << 20;

/// The first frame of a connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The client's build of strata ([`crate::version`]).
    pub version: String,
}

/// The daemon's answer to a [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Greeting {
    /// Go on.
    Welcome {
        /// The daemon's process.
        pid: u32,
    },
    /// Not served, and why.
    Refused(Refusal),
}

/// Why a daemon turns a client away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The client runs as another user than the daemon.
    OtherUser {
        /// The daemon's user.
        owner: u32,
        /// The client's.
        client: u32,
    },
    /// The daemon is another build of strata; it stops once the commands
    /// it runs are done.
    OtherVersion {
        /// The daemon's build.
        version: String,
        /// Its process.
        pid: u32,
        /// Commands it still runs.
        running: usize,
    },
    /// The daemon is stopping.
    Stopping,
}

/// What a client asks, after its [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToDaemon {
    /// Run a command: `call` is the command as the CLI encodes it; `env`
    /// and `cwd` are the client's, for what the command reads from them.
    Call {
        /// The command.
        call: Vec<u8>,
        /// The client's environment.
        env: Vec<(String, String)>,
        /// The client's working directory.
        cwd: PathBuf,
    },
    /// The daemon's state ([`FromDaemon::Status`]).
    Status,
    /// Stop: cancel what runs and exit ([`FromDaemon::Stopping`]).
    Stop,
}

/// A blob moving to or from a registry, as [`strata_registry::Transfer`]
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferEvent {
    /// It starts; `total` bytes when known.
    Start {
        /// The blob.
        id: String,
        /// Its size.
        total: Option<u64>,
    },
    /// `bytes` more moved.
    Advance {
        /// The blob.
        id: String,
        /// How many.
        bytes: u64,
    },
    /// It is done, `how`.
    Finish {
        /// The blob.
        id: String,
        /// `pulled`, `exists`, `pushed`, …
        how: String,
    },
}

/// What the daemon sends back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromDaemon {
    /// Bytes for the client's standard output.
    Stdout(Vec<u8>),
    /// Bytes for the client's standard error.
    Stderr(Vec<u8>),
    /// Build progress.
    Progress(Event),
    /// Registry transfer progress.
    Transfer(TransferEvent),
    /// The progress display is done: what follows prints below it.
    ProgressDone,
    /// The command failed: the error, printed as the CLI prints errors.
    Failed(String),
    /// The command ended with this exit code.
    Exit(u8),
    /// The daemon's state.
    Status(DaemonStatus),
    /// The daemon stops.
    Stopping,
}

/// The daemon's state, for `strata daemon status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Its process.
    pub pid: u32,
    /// Its build of strata.
    pub version: String,
    /// The state directory it serves.
    pub home: PathBuf,
    /// Seconds it has run.
    pub uptime_seconds: u64,
    /// Commands running now.
    pub running: usize,
    /// Commands served since it started.
    pub served: u64,
    /// Seconds without a command after which it exits (0: never).
    pub idle_timeout_seconds: u64,
    /// Where it serves metrics and health over HTTP, if it does.
    pub metrics: Option<std::net::SocketAddr>,
}

/// The reading half of a connection.
pub struct Reader(FramedRead<OwnedReadHalf, LengthDelimitedCodec>);

/// The writing half of a connection.
pub struct Writer(FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>);

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Splits a connection into framed halves.
pub fn split(stream: UnixStream) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (
        Reader(FramedRead::new(r, codec())),
        Writer(FramedWrite::new(w, codec())),
    )
}

impl Reader {
    /// The next message; `None` when the other side closed cleanly.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        let Some(frame) = self.0.next().await else {
            return Ok(None);
        };
        let frame = frame.map_err(|e| Error::Protocol(format!("cannot read a frame: {e}")))?;
        decode(&frame).map(Some)
    }
}

/// Decodes one frame as [`Reader::recv`] reads it: bincode, nothing left
/// over, no collection claiming more than [`MAX_FRAME`] bytes.
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T> {
    let config = bincode::config::standard().with_limit::<MAX_FRAME>();
    let (msg, used) = bincode::serde::decode_from_slice(frame, config)
        .map_err(|e| Error::Protocol(format!("a malformed frame: {e}")))?;
    if used != frame.len() {
        return Err(Error::Protocol(format!(
            "a frame with {} trailing bytes",
            frame.len() - used
        )));
    }
    Ok(msg)
}

impl Writer {
    /// Closes the writing direction: the other side reads the end.
    pub async fn close(&mut self) -> Result<()> {
        SinkExt::<Bytes>::close(&mut self.0)
            .await
            .map_err(|e| Error::Protocol(format!("cannot close: {e}")))
    }

    /// Sends one message.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        let body = bincode::serde::encode_to_vec(msg, bincode::config::standard())
            .map_err(|e| Error::Protocol(format!("cannot encode a frame: {e}")))?;
        self.0
            .send(Bytes::from(body))
            .await
            .map_err(|e| Error::Protocol(format!("cannot send a frame: {e}")))
    }
}
