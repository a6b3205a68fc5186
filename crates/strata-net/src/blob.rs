//! Blobs on a stream: a header message, then the raw bytes to the end of
//! the stream.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use strata_cas::{ContentStore, Digest};

use crate::error::{Error, Result};
use crate::frame::{read_frame, write_frame};

/// What precedes a blob's bytes.
#[derive(Debug, Serialize, Deserialize)]
enum BlobHeader {
    /// The bytes follow.
    Found { size: u64 },
    /// The sender does not hold it.
    Missing,
}

const CHUNK: usize = 1 << 20;

/// Sends blob `digest` from `cas`, or says it is missing. The bytes are
/// verified as they are read: a blob damaged on this node's disk resets
/// the stream instead of finishing it, so the receiver never takes it.
/// Returns the bytes sent.
pub async fn send_blob(
    send: &mut quinn::SendStream,
    cas: &ContentStore,
    digest: &Digest,
    peer: SocketAddr,
) -> Result<u64> {
    let Some(info) = cas.info(digest)? else {
        write_frame(send, &BlobHeader::Missing, peer).await?;
        let _ = send.finish();
        return Ok(0);
    };
    write_frame(send, &BlobHeader::Found { size: info.size }, peer).await?;
    let mut reader = cas.open_blob(digest)?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = send.reset(1u32.into());
                tracing::error!(blob = %digest, error = %e, "refusing to send a damaged blob");
                return Err(Error::Blob {
                    peer,
                    digest: *digest,
                    detail: format!("cannot be sent: {e}"),
                });
            }
        };
        send.write_all(&buf[..n])
            .await
            .map_err(|e| Error::Connection {
                peer,
                detail: format!("sending blob {digest}: {e}"),
            })?;
        sent += n as u64;
    }
    let _ = send.finish();
    Ok(sent)
}

/// Receives the blob `digest` a peer sends with [`send_blob`] into `cas`;
/// `None` when the peer does not hold it. The blob is stored only if it
/// arrived whole and hashes to `digest`.
pub async fn recv_blob(
    recv: &mut quinn::RecvStream,
    cas: &ContentStore,
    digest: &Digest,
    peer: SocketAddr,
) -> Result<Option<u64>> {
    let blob_err = |detail: String| Error::Blob {
        peer,
        digest: *digest,
        detail,
    };
    let size = match read_frame::<BlobHeader>(recv, peer).await? {
        Some(BlobHeader::Found { size }) => size,
        Some(BlobHeader::Missing) => return Ok(None),
        None => return Err(blob_err("the stream ended before the blob".into())),
    };
    let mut w = cas.writer()?;
    loop {
        match recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => w
                .write_all(&chunk.bytes)
                .map_err(|e| blob_err(format!("cannot store: {e}")))?,
            Ok(None) => break,
            Err(e) => return Err(blob_err(format!("the transfer broke: {e}"))),
        }
    }
    if w.size() != size {
        return Err(blob_err(format!("{} of {size} bytes arrived", w.size())));
    }
    match w.commit_expecting(*digest) {
        Ok(_) => Ok(Some(size)),
        Err(strata_cas::Error::Unexpected { actual, .. }) => {
            Err(blob_err(format!("the bytes hash to {actual}: refused")))
        }
        Err(e) => Err(e.into()),
    }
}
