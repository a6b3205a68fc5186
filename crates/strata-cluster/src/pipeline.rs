//! A step's layer streamed, as it is written, to the workers that will
//! hold its copies (the pipeline HDFS writes its blocks through): the
//! copies are made while the step commits, not after it, so a build does
//! not wait at its end for its last layer to be copied.
//!
//! Best effort throughout. A taker that fails or falls behind is dropped
//! (its stream reset, so it stores nothing), and nothing is recorded from
//! what a worker was told: the coordinator's copy by digest, which follows
//! every new layer, asks each taker for the layer first, and one that took
//! it whole already has it (checked against the digests it computed on
//! receipt).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use strata_cas::Digest;
use strata_net::{read_frame, write_frame};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::peers::Peers;
use crate::protocol::{Holder, PeerRequest, Reply, Request};

/// Bytes gathered before they go to the takers.
const CHUNK: usize = 1 << 20;

/// Chunks queued for each taker before the step's writing waits for it.
const QUEUED: usize = 8;

/// How long a taker may keep the step's writing waiting, in all, before
/// it is dropped: one slower than the layer is written is left to the
/// copy after.
const LAG: Duration = Duration::from_secs(5);

/// How often a full queue is tried again.
const POLL: Duration = Duration::from_millis(1);

/// How long reaching a taker, or it taking one chunk, may take.
const STALL: Duration = Duration::from_secs(10);

/// How long the takers have, once the step is over, to store the layer.
const SETTLE: Duration = Duration::from_secs(30);

/// The takers of one step's layer.
pub(crate) struct Pipeline {
    takers: Vec<Taker>,
}

struct Taker {
    name: String,
    /// The layer's digest, once the step made it; dropped if it made none.
    verdict: oneshot::Sender<Digest>,
    task: JoinHandle<Result<Option<Digest>, String>>,
}

/// Where the step writes its layer's bytes: gathered into chunks, each
/// sent to every taker still keeping up. Write it from a blocking thread
/// only (it waits for a taker's queue).
pub(crate) struct Tee {
    buf: Vec<u8>,
    /// Each taker's queue, and how long it has kept the writing waiting.
    to: Vec<(mpsc::Sender<Bytes>, Duration)>,
}

impl Pipeline {
    /// Starts sending to each of `to`; nothing is opened until the first
    /// bytes, so a step that makes no layer sends nothing.
    pub(crate) fn start(peers: &Arc<Peers>, to: &[Holder]) -> (Pipeline, Tee) {
        let mut takers = Vec::new();
        let mut queues = Vec::new();
        for holder in to {
            let (tx, rx) = mpsc::channel(QUEUED);
            let (verdict, told) = oneshot::channel();
            let task =
                tokio::spawn(send(Arc::clone(peers), holder.clone(), rx, told).in_current_span());
            queues.push((tx, Duration::ZERO));
            takers.push(Taker {
                name: holder.name.clone(),
                verdict,
                task,
            });
        }
        (
            Pipeline { takers },
            Tee {
                buf: Vec::with_capacity(CHUNK),
                to: queues,
            },
        )
    }

    /// The step is over, its layer `layer` (none: it failed or changed
    /// nothing, and the takers drop what they got); waits for the takers
    /// to store it, [`SETTLE`] at most. Whether they did is the
    /// coordinator's to find out, by asking each for its copy.
    pub(crate) async fn end(self, layer: Option<Digest>) {
        let mut waiting = Vec::new();
        for Taker {
            name,
            verdict,
            task,
        } in self.takers
        {
            match layer {
                Some(d) => {
                    let _ = verdict.send(d);
                }
                None => drop(verdict),
            }
            waiting.push((name, task));
        }
        let deadline = tokio::time::Instant::now() + SETTLE;
        for (name, mut task) in waiting {
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(Ok(Some(d)))) => {
                    tracing::debug!(blob = %d, taker = %name, "a copy was taken as the layer was written");
                }
                Ok(Ok(Ok(None))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::debug!(taker = %name, error = %e, "the layer could not be sent as it was written; it is copied after");
                }
                Ok(Err(e)) => {
                    tracing::debug!(taker = %name, error = %e, "sending the layer stopped");
                }
                Err(_) => {
                    // Aborted, its stream is reset: the taker stores nothing.
                    task.abort();
                    tracing::debug!(taker = %name, "the taker did not store the layer in time");
                }
            }
        }
    }
}

impl Tee {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        // A taker whose task ended (failed or stalled) closes its queue;
        // one whose queue stays full past its lag is dropped.
        self.to.retain_mut(|(tx, waited)| {
            loop {
                match tx.try_send(chunk.clone()) {
                    Ok(()) => break true,
                    Err(mpsc::error::TrySendError::Closed(_)) => break false,
                    Err(mpsc::error::TrySendError::Full(_)) if *waited >= LAG => break false,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        std::thread::sleep(POLL);
                        *waited += POLL;
                    }
                }
            }
        });
        if self.to.is_empty() {
            return Err(io::Error::other("no worker is taking the layer"));
        }
        Ok(())
    }
}

impl io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        if self.buf.len() >= CHUNK {
            self.send_buf()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

/// A stream that is reset when dropped unless it was finished: quinn
/// finishes a dropped stream, and a taker would then store the part it got
/// as a blob.
struct Resetting(quinn::SendStream, bool);

impl Drop for Resetting {
    fn drop(&mut self) {
        if !self.1 {
            let _ = self.0.reset(0u32.into());
        }
    }
}

/// Sends what comes on `chunks` to `to`, then, told the layer's digest,
/// ends the stream and waits for the taker to store it; never told (the
/// step made no layer), or stopped on the way, it resets the stream and
/// the taker drops it.
async fn send(
    peers: Arc<Peers>,
    to: Holder,
    mut chunks: mpsc::Receiver<Bytes>,
    told: oneshot::Receiver<Digest>,
) -> Result<Option<Digest>, String> {
    let Some(first) = chunks.recv().await else {
        return Ok(None);
    };
    let opened = tokio::time::timeout(STALL, async {
        let conn = peers.connection(to.addr).await?;
        let (mut send, recv) = conn.open().await?;
        write_frame(&mut send, &Request::Peer(PeerRequest::Take), conn.addr).await?;
        Ok::<_, strata_net::Error>((conn, send, recv))
    })
    .await;
    let (conn, send, mut recv) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("{} did not answer within {STALL:?}", to.name)),
    };
    let mut send = Resetting(send, false);
    let mut next = Some(first);
    while let Some(chunk) = next {
        match tokio::time::timeout(STALL, send.0.write_chunk(chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("{} took no bytes for {STALL:?}", to.name)),
        }
        next = chunks.recv().await;
    }
    let Ok(layer) = told.await else {
        return Ok(None);
    };
    send.1 = true;
    let _ = send.0.finish();
    match read_frame::<Reply>(&mut recv, conn.addr).await {
        Ok(Some(Reply::Took(Ok(d)))) if d == layer => Ok(Some(d)),
        Ok(Some(Reply::Took(Ok(d)))) => Err(format!("it stored {d}, not the layer {layer}")),
        Ok(Some(Reply::Took(Err(f)))) => Err(f.to_string()),
        Ok(Some(other)) => Err(format!("unexpected reply {other:?}")),
        Ok(None) => Err("no reply".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn the_tee_sends_whole_chunks_in_order_and_fails_once_no_taker_is_left() {
        let (tx, mut rx) = mpsc::channel(QUEUED);
        let (gone, dropped) = mpsc::channel(QUEUED);
        drop(dropped);
        let mut tee = Tee {
            buf: Vec::new(),
            to: vec![(tx, Duration::ZERO), (gone, Duration::ZERO)],
        };
        let taker = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut chunks = 0;
            while let Some(c) = rx.blocking_recv() {
                got.extend_from_slice(&c);
                chunks += 1;
            }
            (got, chunks)
        });
        let data: Vec<u8> = (0..(3 * CHUNK + 100)).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(4096) {
            tee.write_all(piece).unwrap();
        }
        tee.flush().unwrap();
        // The taker whose queue closed was dropped at the first chunk.
        assert_eq!(tee.to.len(), 1);
        drop(tee);
        let (got, chunks) = taker.join().unwrap();
        assert_eq!(got, data);
        assert_eq!(chunks, 4, "three full chunks and the rest");

        let (lost, closed) = mpsc::channel(QUEUED);
        drop(closed);
        let mut tee = Tee {
            buf: Vec::new(),
            to: vec![(lost, Duration::ZERO)],
        };
        assert!(tee.write_all(&vec![0u8; CHUNK]).is_err());

        // A taker that keeps its queue full past its lag is dropped, and
        // the writing goes on without it.
        let (slow, _never_read) = mpsc::channel(1);
        let (fast, mut fast_rx) = mpsc::channel(QUEUED);
        let reader = std::thread::spawn(move || {
            let mut n = 0;
            while fast_rx.blocking_recv().is_some() {
                n += 1;
            }
            n
        });
        let mut tee = Tee {
            buf: Vec::new(),
            to: vec![(slow, LAG), (fast, Duration::ZERO)],
        };
        for _ in 0..3 {
            tee.write_all(&vec![1u8; CHUNK]).unwrap();
        }
        assert_eq!(tee.to.len(), 1, "the slow taker is still written to");
        drop(tee);
        assert_eq!(reader.join().unwrap(), 3);
    }
}
