//! Blobs on a stream: a header message, then the raw bytes to the end of
//! the stream.

use std::io::Write as _;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use strata_cas::{ContentStore, Digest, Sha256, Stored};
use tokio::io::AsyncReadExt as _;

use crate::error::{Error, Result};
use crate::frame::{read_frame, write_frame};

/// What precedes a blob's bytes.
#[derive(Debug, Serialize, Deserialize)]
enum BlobHeader {
    /// The bytes follow.
    Found {
        /// How many.
        size: u64,
        /// Their sha256, as the sender's store records it; a sender that
        /// never stored them (a client sending a context file) has none.
        sha256: Option<Sha256>,
    },
    /// The sender does not hold it.
    Missing,
    /// The sender holds it or not, but will not send it to this peer, and
    /// says why.
    Refused(String),
}

/// What a sender announced of the blob that follows: read it with
/// [`read_blob_header`], decide whether to take it, then receive it with
/// [`recv_announced`].
#[derive(Debug, Clone, Copy)]
pub struct Announced {
    /// The bytes that follow, at most.
    pub size: u64,
    /// Their sha256, as the sender says: checked on receipt.
    sha256: Option<Sha256>,
}

const CHUNK: usize = 1 << 20;

/// The largest blob a node accepts from a peer or client (64 GiB): more
/// than any layer users build, and a bound on what one stream can make a
/// node write.
pub const MAX_BLOB: u64 = 64 << 30;

/// Sends blob `digest` from `cas`, or says it is missing. Returns the
/// bytes sent. The bytes go as they are on disk: the receiver checks them
/// against the blob's name and refuses a damaged blob, so the sender does
/// not hash them a second time.
pub async fn send_blob(
    send: &mut quinn::SendStream,
    cas: &ContentStore,
    digest: &Digest,
    peer: SocketAddr,
) -> Result<u64> {
    let missing = async |send: &mut quinn::SendStream| {
        write_frame(send, &BlobHeader::Missing, peer).await?;
        let _ = send.finish();
        Ok::<u64, Error>(0)
    };
    let Some((info, at)) = cas.stored(digest)? else {
        return missing(send).await;
    };
    let header = BlobHeader::Found {
        size: info.size,
        sha256: Some(info.sha256),
    };
    let path = match at {
        Stored::Inline(bytes) if bytes.len() as u64 != info.size => {
            tracing::error!(blob = %digest, "a recorded blob's bytes are not its size");
            return missing(send).await;
        }
        Stored::Inline(bytes) => {
            write_frame(send, &header, peer).await?;
            send.write_all(&bytes)
                .await
                .map_err(|e| Error::Connection {
                    peer,
                    detail: format!("sending blob {digest}: {e}"),
                })?;
            let _ = send.finish();
            return Ok(info.size);
        }
        Stored::File(path) => path,
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(blob = %digest, error = %e, "a recorded blob has no file");
            return missing(send).await;
        }
    };
    write_frame(send, &header, peer).await?;
    stream_file(send, &mut file, &path, digest, peer).await
}

/// Sends the file at `path` as blob `digest` of `size` bytes, as
/// [`send_blob`] sends a stored blob: the receiver computes its digests and
/// refuses it if it is not `digest` (or not `size` bytes, as when the file
/// changes while it is sent). Returns the bytes sent.
pub async fn send_file(
    send: &mut quinn::SendStream,
    path: &std::path::Path,
    digest: &Digest,
    size: u64,
    peer: SocketAddr,
) -> Result<u64> {
    let mut file = tokio::fs::File::open(path).await.map_err(|e| Error::Io {
        what: "cannot read",
        path: path.to_path_buf(),
        source: e,
    })?;
    write_frame(send, &BlobHeader::Found { size, sha256: None }, peer).await?;
    stream_file(send, &mut file, path, digest, peer).await
}

async fn stream_file(
    send: &mut quinn::SendStream,
    file: &mut tokio::fs::File,
    path: &std::path::Path,
    digest: &Digest,
    peer: SocketAddr,
) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    loop {
        let n = file.read(&mut buf).await.map_err(|e| Error::Io {
            what: "cannot read",
            path: path.to_path_buf(),
            source: e,
        })?;
        if n == 0 {
            break;
        }
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

/// Tells the peer asking for a blob that it may not have it, and why
/// (the receiver's error is [`Error::Refused`]).
pub async fn refuse_blob(send: &mut quinn::SendStream, why: &str, peer: SocketAddr) -> Result<()> {
    write_frame(send, &BlobHeader::Refused(why.to_string()), peer).await?;
    let _ = send.finish();
    Ok(())
}

/// Reads what a peer sending blob `digest` with [`send_blob`] announces:
/// `None` when the peer does not hold it, [`Error::Refused`] when it will
/// not send it, and [`Error::Forged`] when it announces more than
/// [`MAX_BLOB`].
pub async fn read_blob_header(
    recv: &mut quinn::RecvStream,
    digest: &Digest,
    peer: SocketAddr,
) -> Result<Option<Announced>> {
    match read_frame::<BlobHeader>(recv, peer).await? {
        Some(BlobHeader::Found { size, .. }) if size > MAX_BLOB => Err(Error::Forged {
            peer,
            digest: *digest,
            detail: format!("announced as {size} bytes, over the {MAX_BLOB} byte limit"),
        }),
        Some(BlobHeader::Found { size, sha256 }) => Ok(Some(Announced { size, sha256 })),
        Some(BlobHeader::Missing) => Ok(None),
        Some(BlobHeader::Refused(why)) => Err(Error::Refused {
            peer,
            detail: format!("blob {digest}: {why}"),
        }),
        None => Err(Error::Blob {
            peer,
            digest: *digest,
            detail: "the stream ended before the blob".into(),
        }),
    }
}

/// Receives the blob `digest` a peer sends with [`send_blob`] into `cas`;
/// `None` when the peer does not hold it. The blob is stored only if it
/// arrived whole, no longer than announced, and its blake3 and sha256,
/// both computed here, are the ones the peer named; otherwise the error is
/// [`Error::Forged`] and nothing is stored.
pub async fn recv_blob(
    recv: &mut quinn::RecvStream,
    cas: &std::sync::Arc<ContentStore>,
    digest: &Digest,
    peer: SocketAddr,
) -> Result<Option<u64>> {
    recv_blob_limited(recv, cas, digest, peer, None).await
}

/// [`recv_blob`], reading no faster than `bytes_per_second` on average
/// when given: QUIC's flow control then slows the sender, so background
/// copies leave the link to builds.
pub async fn recv_blob_limited(
    recv: &mut quinn::RecvStream,
    cas: &std::sync::Arc<ContentStore>,
    digest: &Digest,
    peer: SocketAddr,
    bytes_per_second: Option<u64>,
) -> Result<Option<u64>> {
    match read_blob_header(recv, digest, peer).await? {
        Some(announced) => recv_announced(recv, cas, digest, peer, announced, bytes_per_second)
            .await
            .map(Some),
        None => Ok(None),
    }
}

/// Receives the bytes of blob `digest` after [`read_blob_header`]
/// announced them, as [`recv_blob_limited`] does. Returns their size.
pub async fn recv_announced(
    recv: &mut quinn::RecvStream,
    cas: &std::sync::Arc<ContentStore>,
    digest: &Digest,
    peer: SocketAddr,
    announced: Announced,
    bytes_per_second: Option<u64>,
) -> Result<u64> {
    let blob_err = |detail: String| Error::Blob {
        peer,
        digest: *digest,
        detail,
    };
    let forged = |detail: String| Error::Forged {
        peer,
        digest: *digest,
        detail,
    };
    let Announced { size, sha256 } = announced;
    let mut w = cas.writer()?;
    let started = tokio::time::Instant::now();
    loop {
        match recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                if w.size() + chunk.bytes.len() as u64 > size {
                    return Err(forged(format!("more than the {size} bytes announced")));
                }
                w.write_all(&chunk.bytes)
                    .map_err(|e| blob_err(format!("cannot store: {e}")))?;
            }
            Ok(None) => break,
            Err(e) => return Err(blob_err(format!("the transfer broke: {e}"))),
        }
        if let Some(rate) = bytes_per_second.filter(|r| *r > 0) {
            // Ahead of the allowed rate: wait until the bytes so far are
            // due.
            let due = std::time::Duration::from_secs_f64(w.size() as f64 / rate as f64);
            tokio::time::sleep_until(started + due).await;
        }
    }
    if w.size() != size {
        return Err(blob_err(format!("{} of {size} bytes arrived", w.size())));
    }
    if let Some(claimed) = sha256
        && claimed != w.sha256()
    {
        return Err(forged(format!(
            "sent as {claimed}, but the bytes hash to {}: refused",
            w.sha256()
        )));
    }
    // A batch of one: its commit (a sync of the blob) runs on a blocking
    // thread, never on the runtime's.
    let mut batch = cas.batch();
    match w.finish_into(&mut batch, *digest) {
        Ok(_) => {}
        Err(strata_cas::Error::Unexpected { actual, .. }) => {
            return Err(forged(format!("the bytes hash to {actual}: refused")));
        }
        Err(e) => return Err(e.into()),
    }
    commit(cas, batch).await?;
    Ok(size)
}

/// Receives a blob the sender names only by its bytes, to the end of the
/// stream, at most `limit` bytes (a layer a peer pushes as it writes it):
/// it is stored under the digest computed here. A stream that breaks, is
/// reset, runs over `limit` or sends nothing for `idle` stores nothing.
/// Returns the digest and the size.
pub async fn recv_unnamed(
    recv: &mut quinn::RecvStream,
    cas: &std::sync::Arc<ContentStore>,
    peer: SocketAddr,
    limit: u64,
    idle: std::time::Duration,
) -> Result<(Digest, u64)> {
    let broke = |detail: String| Error::Connection { peer, detail };
    let mut w = cas.writer()?;
    loop {
        let Ok(read) = tokio::time::timeout(idle, recv.read_chunk(CHUNK, true)).await else {
            return Err(broke(format!("a pushed blob sent nothing for {idle:?}")));
        };
        match read {
            Ok(Some(chunk)) => {
                if w.size() + chunk.bytes.len() as u64 > limit {
                    return Err(Error::Malformed {
                        peer,
                        detail: format!("a pushed blob over the {limit} byte limit"),
                    });
                }
                w.write_all(&chunk.bytes)
                    .map_err(|e| broke(format!("cannot store a pushed blob: {e}")))?;
            }
            Ok(None) => break,
            Err(e) => return Err(broke(format!("a pushed blob broke off: {e}"))),
        }
    }
    let (digest, size) = (w.digest(), w.size());
    let mut batch = cas.batch();
    w.finish_into(&mut batch, digest)?;
    commit(cas, batch).await?;
    Ok((digest, size))
}

/// Commits `batch` on a blocking thread.
async fn commit(cas: &ContentStore, batch: strata_cas::Batch) -> Result<usize> {
    tokio::task::spawn_blocking(move || batch.commit())
        .await
        .map_err(|e| Error::Io {
            what: "cannot store blobs in",
            path: cas.root().to_path_buf(),
            source: std::io::Error::other(e),
        })?
        .map_err(Error::from)
}

/// What precedes each blob of a batch stream ([`send_batch`]).
#[derive(Debug, Serialize, Deserialize)]
enum BatchItem {
    /// Exactly `size` bytes of blob `digest` follow.
    Blob {
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// The sender does not hold this blob.
    Missing(Digest),
    /// No more blobs.
    End,
}

/// The most blobs one batch stream carries.
pub const MAX_BATCH: usize = 4096;

/// The most bytes one batch stream carries: a batch is for small blobs
/// (a context's files); large ones go on streams of their own.
pub const MAX_BATCH_BYTES: u64 = 256 << 20;

/// Blobs this large or smaller go many to a stream; larger ones each on
/// a stream of its own.
pub const BATCHED_UP_TO: u64 = 1 << 20;

/// Orders blobs sent or fetched one to a stream, largest first: with a
/// bound on streams at once, the longest transfers start at once and the
/// rest fill the streams beside them, rather than the largest being left
/// to run alone at the end.
pub fn largest_first<T>(items: &mut [T], size: impl Fn(&T) -> u64) {
    items.sort_by_key(|item| std::cmp::Reverse(size(item)));
}

/// Splits `items` into batches of at most a quarter of [`MAX_BATCH`]
/// blobs and 32 MiB (as `size` counts them), so several batches go at
/// once; an item larger than that is a batch of its own.
pub fn batches<T>(items: &[T], size: impl Fn(&T) -> u64) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        if i > start && (i - start >= MAX_BATCH / 4 || bytes + n > 32 << 20) {
            out.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Where a blob of a batch is read from.
#[derive(Debug, Clone, Copy)]
pub enum BatchSource<'a> {
    /// A content store, which may lack it.
    Store(&'a ContentStore),
    /// A file of this size (a client's context file).
    File(&'a std::path::Path, u64),
}

impl BatchSource<'_> {
    /// The size it was said to have (a stored blob's is looked up when
    /// sent: counted as nothing here).
    pub fn size(&self) -> u64 {
        match self {
            BatchSource::File(_, n) => *n,
            BatchSource::Store(_) => 0,
        }
    }
}

/// Sends many small blobs on one stream, each announced by its digest and
/// size, then [`BatchItem::End`]; a blob the store lacks is announced
/// missing. Returns the bytes sent. A file that is not the size it was
/// said to be (changed while sent) resets the stream and is an error.
pub async fn send_batch(
    send: &mut quinn::SendStream,
    blobs: &[(Digest, BatchSource<'_>)],
    peer: SocketAddr,
) -> Result<u64> {
    let sent = send_batch_part(send, blobs, peer).await?;
    end_batch(send, peer).await?;
    Ok(sent)
}

/// Ends a batch [`send_batch_part`] sent in parts.
pub async fn end_batch(send: &mut quinn::SendStream, peer: SocketAddr) -> Result<()> {
    write_frame(send, &BatchItem::End, peer).await?;
    let _ = send.finish();
    Ok(())
}

/// Sends part of a batch, as [`send_batch`] does, without ending it: a
/// sender with blobs still to come sends them as they come, then
/// [`end_batch`].
pub async fn send_batch_part(
    send: &mut quinn::SendStream,
    blobs: &[(Digest, BatchSource<'_>)],
    peer: SocketAddr,
) -> Result<u64> {
    let mut sent = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for (digest, source) in blobs {
        let (at, size) = match source {
            BatchSource::Store(cas) => match cas.stored(digest)? {
                Some((info, at)) => (at, info.size),
                None => {
                    write_frame(send, &BatchItem::Missing(*digest), peer).await?;
                    continue;
                }
            },
            BatchSource::File(path, size) => (Stored::File(path.to_path_buf()), *size),
        };
        let broke = |e| Error::Connection {
            peer,
            detail: format!("sending blob {digest}: {e}"),
        };
        let header = BatchItem::Blob {
            digest: *digest,
            size,
        };
        let path = match at {
            Stored::Inline(bytes) if bytes.len() as u64 != size => {
                tracing::error!(blob = %digest, "a recorded blob's bytes are not its size");
                write_frame(send, &BatchItem::Missing(*digest), peer).await?;
                continue;
            }
            Stored::Inline(bytes) => {
                write_frame(send, &header, peer).await?;
                send.write_all(&bytes).await.map_err(broke)?;
                sent += size;
                continue;
            }
            Stored::File(path) => path,
        };
        let io = |e| Error::Io {
            what: "cannot read",
            path: path.clone(),
            source: e,
        };
        let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
        write_frame(send, &header, peer).await?;
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = file.read(&mut buf[..want]).await.map_err(io)?;
            if n == 0 {
                let _ = send.reset(0u32.into());
                return Err(Error::Io {
                    what: "cannot send",
                    path: path.clone(),
                    source: std::io::Error::other(format!(
                        "it is {} bytes, not the {size} it was when hashed: it changed",
                        size - left
                    )),
                });
            }
            send.write_all(&buf[..n]).await.map_err(broke)?;
            left -= n as u64;
        }
        sent += size;
    }
    Ok(sent)
}

/// What a batch brought.
#[derive(Debug, Default)]
pub struct BatchReceived {
    /// Blobs received, checked and stored.
    pub stored: Vec<Digest>,
    /// Blobs the sender said it does not hold.
    pub missing: Vec<Digest>,
    /// Bytes received.
    pub bytes: u64,
}

/// Receives a batch [`send_batch`] sends into `cas`: only blobs in
/// `wanted`, each once, at most [`MAX_BATCH`] blobs and
/// [`MAX_BATCH_BYTES`]; `admit` may refuse a blob by its size (a quota),
/// which ends the batch with its reason as [`Error::Refused`]. Each blob
/// is checked against its name as it arrives; all are made durable and
/// stored together at the end ([`strata_cas::Batch`]), each new one with
/// `label` if given, and nothing is stored if any is refused or forged.
/// The commit (a sync of the disk) runs on a blocking thread, never on the
/// runtime's.
pub async fn recv_batch(
    recv: &mut quinn::RecvStream,
    cas: &std::sync::Arc<ContentStore>,
    wanted: &std::collections::HashSet<Digest>,
    peer: SocketAddr,
    label: Option<(&str, &str)>,
    admit: &mut (dyn FnMut(u64) -> std::result::Result<(), String> + Send),
) -> Result<BatchReceived> {
    let mut batch = cas.batch();
    if let Some((key, value)) = label {
        batch.label(key, value);
    }
    let mut got = BatchReceived::default();
    let mut seen = std::collections::HashSet::new();
    loop {
        let item = read_frame::<BatchItem>(recv, peer)
            .await?
            .ok_or_else(|| Error::Connection {
                peer,
                detail: "a batch of blobs ended before its end".into(),
            })?;
        let (digest, size) = match item {
            BatchItem::End => {
                // A blob asked for and neither sent nor said missing is
                // missing all the same.
                let said: std::collections::HashSet<&Digest> = got.missing.iter().collect();
                let unsaid: Vec<Digest> = wanted
                    .iter()
                    .filter(|d| !seen.contains(*d) && !said.contains(d))
                    .copied()
                    .collect();
                got.missing.extend(unsaid);
                break;
            }
            BatchItem::Missing(d) => {
                if seen.len() + got.missing.len() >= MAX_BATCH {
                    return Err(Error::Forged {
                        peer,
                        digest: d,
                        detail: format!("a batch of more than {MAX_BATCH} blobs"),
                    });
                }
                got.missing.push(d);
                continue;
            }
            BatchItem::Blob { digest, size } => (digest, size),
        };
        let forged = |detail: String| Error::Forged {
            peer,
            digest,
            detail,
        };
        if !wanted.contains(&digest) || !seen.insert(digest) {
            return Err(forged("not asked for in this batch, or sent twice".into()));
        }
        if seen.len() > MAX_BATCH || got.bytes + size > MAX_BATCH_BYTES {
            return Err(forged(format!(
                "a batch over {MAX_BATCH} blobs or {MAX_BATCH_BYTES} bytes"
            )));
        }
        admit(size).map_err(|why| Error::Refused {
            peer,
            detail: format!("blob {digest}: {why}"),
        })?;
        let mut w = cas.writer()?;
        let mut left = size;
        while left > 0 {
            let want = CHUNK.min(usize::try_from(left).unwrap_or(usize::MAX));
            match recv.read_chunk(want, true).await {
                Ok(Some(chunk)) => {
                    w.write_all(&chunk.bytes).map_err(|e| Error::Blob {
                        peer,
                        digest,
                        detail: format!("cannot store: {e}"),
                    })?;
                    left -= chunk.bytes.len() as u64;
                }
                Ok(None) => {
                    return Err(Error::Blob {
                        peer,
                        digest,
                        detail: format!("{} of {size} bytes arrived", size - left),
                    });
                }
                Err(e) => {
                    return Err(Error::Blob {
                        peer,
                        digest,
                        detail: format!("the transfer broke: {e}"),
                    });
                }
            }
        }
        match w.finish_into(&mut batch, digest) {
            Ok(_) => {}
            Err(strata_cas::Error::Unexpected { actual, .. }) => {
                return Err(forged(format!("the bytes hash to {actual}: refused")));
            }
            Err(e) => return Err(e.into()),
        }
        got.bytes += size;
        got.stored.push(digest);
    }
    commit(cas, batch).await?;
    Ok(got)
}
