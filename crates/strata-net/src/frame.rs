//! Messages on QUIC streams: a 4-byte little-endian length, then the
//! message in bincode (standard configuration).

use std::net::SocketAddr;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// The largest message accepted. Blobs never travel as messages; a
/// message this large is a bug or an attack.
pub const MAX_FRAME: usize = 16 << 20;

/// Writes one message.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
    peer: SocketAddr,
) -> Result<()> {
    let body = bincode::serde::encode_to_vec(msg, bincode::config::standard()).map_err(|e| {
        Error::Malformed {
            peer,
            detail: format!("cannot encode: {e}"),
        }
    })?;
    if body.len() > MAX_FRAME {
        return Err(Error::Malformed {
            peer,
            detail: format!(
                "a {} byte message is over the {MAX_FRAME} byte limit",
                body.len()
            ),
        });
    }
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes();
    let io = |e: quinn::WriteError| Error::Connection {
        peer,
        detail: format!("cannot send: {e}"),
    };
    send.write_all(&len).await.map_err(io)?;
    send.write_all(&body).await.map_err(io)
}

/// Reads one message; `None` when the stream ended cleanly before it.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    peer: SocketAddr,
) -> Result<Option<T>> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            return Err(Error::Malformed {
                peer,
                detail: "the stream ended inside a length".into(),
            });
        }
        Err(quinn::ReadExactError::ReadError(e)) => {
            return Err(Error::Connection {
                peer,
                detail: format!("cannot receive: {e}"),
            });
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(Error::Malformed {
            peer,
            detail: format!("a {len} byte message is over the {MAX_FRAME} byte limit"),
        });
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| Error::Malformed {
            peer,
            detail: format!("the stream ended inside a message: {e}"),
        })?;
    decode_frame(&body)
        .map(Some)
        .map_err(|detail| Error::Malformed { peer, detail })
}

/// Decodes one message body as [`read_frame`] reads it: bincode, nothing
/// left over, and no collection it holds claiming more than
/// [`MAX_FRAME`] bytes (a length prefix is never trusted to size an
/// allocation).
pub fn decode_frame<T: DeserializeOwned>(body: &[u8]) -> std::result::Result<T, String> {
    let config = bincode::config::standard().with_limit::<MAX_FRAME>();
    let (msg, used) = bincode::serde::decode_from_slice(body, config).map_err(|e| e.to_string())?;
    if used != body.len() {
        return Err(format!("{} trailing bytes", body.len() - used));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_length_beyond_the_body_is_an_error() {
        // A list claiming 2^60 elements, in nine bytes.
        let claim = [0xFD, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let e = decode_frame::<Vec<u64>>(&claim).unwrap_err();
        assert!(!e.is_empty());
        let e = decode_frame::<String>(&claim).unwrap_err();
        assert!(!e.is_empty());
        // What fits decodes, and nothing may be left over.
        let body =
            bincode::serde::encode_to_vec(vec![1u64, 2], bincode::config::standard()).unwrap();
        assert_eq!(decode_frame::<Vec<u64>>(&body).unwrap(), [1, 2]);
        let mut longer = body.clone();
        longer.push(0);
        assert!(
            decode_frame::<Vec<u64>>(&longer)
                .unwrap_err()
                .contains("trailing")
        );
    }
}
