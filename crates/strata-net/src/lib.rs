//! strata's transport: every connection in a cluster is QUIC (quinn) with
//! mutual TLS (rustls, ring) under the cluster's own CA.
//!
//! * [`ClusterCa`] and [`Identity`]: the CA `strata cluster init` makes and
//!   the certificates it issues. A certificate names the node's [`Role`]
//!   (coordinator, worker or client) and name in a URI
//!   (`strata://worker/w1`); a peer is known by its certificate, never by
//!   what it says.
//! * [`Endpoint`] and [`Connection`]: listening and dialing. A peer whose
//!   certificate is not from the cluster CA, or that has none, fails the
//!   TLS handshake; one that speaks another protocol (ALPN `strata/1`, then
//!   a version in the first message) is refused with a message saying which.
//! * [`write_frame`]/[`read_frame`]: serde + bincode messages, length
//!   prefixed, bounded in size, on QUIC streams.
//! * [`send_blob`]/[`recv_blob`]: content-store blobs on a stream of their
//!   own; the receiver hashes the bytes as it writes them, and a blob that
//!   does not hash to its name is never stored.
//!
//! It knows nothing of builds: the messages are the cluster's.

mod blob;
mod endpoint;
mod error;
mod frame;
mod identity;

pub use blob::{
    Announced, read_blob_header, recv_announced, recv_blob, recv_blob_limited, recv_unnamed,
    refuse_blob, send_blob, send_file,
};
pub use blob::{
    BATCHED_UP_TO, BatchReceived, BatchSource, MAX_BATCH, MAX_BATCH_BYTES, MAX_BLOB, batches,
    end_batch, largest_first, recv_batch, send_batch, send_batch_part,
};
pub use endpoint::{
    CONNECTION_WINDOW, Connection, Endpoint, STREAM_WINDOW, https_config, https_config_mutual,
};
pub use error::{Error, Result};
pub use frame::{MAX_FRAME, decode_frame, read_frame, write_frame};
pub use identity::{ClusterCa, Identity, Peer, Role};

/// The application protocol (TLS ALPN) every strata endpoint speaks.
pub const ALPN: &[u8] = b"strata/1";

/// The version of the messages within [`ALPN`]; peers that differ are
/// refused at the handshake.
pub const PROTOCOL_VERSION: u32 = 13;
