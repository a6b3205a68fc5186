//! The cluster: a coordinator that plans builds and places their stages on
//! workers, workers that run them with the same engine as the embedded
//! build, and the client that submits builds and fetches the result.
//!
//! * [`coordinator::Coordinator`]: plans each build (the same planner as
//!   the embedded build), solves it with the same solver, and places each
//!   stage on a worker through `placement`, the solver's `Worker` for a
//!   cluster. It keeps the cache index and knows which node holds which
//!   blob; workers whose heartbeats stop lose their stages, which start
//!   over elsewhere.
//! * [`worker::WorkerNode`]: receives a build (context and the resolved
//!   base images), plans it too and checks it planned the same, runs the
//!   steps placed on it with the embedded build's `LocalWorker`, and
//!   fetches the blobs a step needs from the nodes that hold them.
//! * [`client::Client`]: uploads the context, submits the build, streams
//!   its progress, and fetches the image's layers from the workers.
//! * [`local`]: the files of a cluster and a cluster of processes on one
//!   machine.
//!
//! * `access`: what a client may read (the layers of its own builds) and
//!   upload (a quota of bytes an hour).
//!
//! Every connection is QUIC with mutual TLS ([`strata_net`]); the messages
//! are in [`protocol`].

mod access;
pub mod client;
pub mod config;
pub mod context;
pub mod coordinator;
mod desk;
pub mod distribution;
mod error;

pub use access::OverQuota;
pub use error::{ConnectError, StartError};
pub mod local;
mod names;
mod observe;
mod peers;
mod pipeline;
mod placement;
mod plan;
pub mod protocol;
mod replicas;
mod roster;
mod uploads;
pub mod worker;

/// A node answering the requests peers open streams for.
pub(crate) trait Service: Send + Sync + 'static {
    /// Answers `req`, the first frame on the stream `send`/`recv` that
    /// `conn`'s peer opened, once its role is checked: `req` is one the
    /// peer's certificate may ask.
    fn handle<'a>(
        self: &'a std::sync::Arc<Self>,
        conn: &'a strata_net::Connection,
        req: protocol::Request,
        send: &'a mut quinn::SendStream,
        recv: &'a mut quinn::RecvStream,
    ) -> impl std::future::Future<Output = Result<(), strata_net::Error>> + Send + 'a;
}

/// Answers every stream `conn`'s peer opens, each in a task of its own,
/// until the peer closes the connection.
pub(crate) async fn serve_requests<S: Service>(
    service: &std::sync::Arc<S>,
    conn: &strata_net::Connection,
) {
    while let Some((mut send, mut recv)) = conn.accept().await {
        let (service, conn) = (std::sync::Arc::clone(service), conn.clone());
        tokio::spawn(async move {
            let req = match strata_net::read_frame::<protocol::Request>(&mut recv, conn.addr).await
            {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    strata_metrics::request_error(e.kind());
                    tracing::warn!(peer = %conn.peer, error = %e, "bad request");
                    return;
                }
            };
            let handled = if req.may_come_from(conn.peer.role) {
                service.handle(&conn, req, &mut send, &mut recv).await
            } else {
                strata_metrics::request_error("not_allowed");
                let refusal = protocol::Reply::Refused(req.not_allowed(&conn.peer));
                strata_net::write_frame(&mut send, &refusal, conn.addr).await
            };
            if let Err(e) = handled {
                strata_metrics::request_error(e.kind());
                if !conn.close_if_forged(&e) {
                    tracing::warn!(peer = %conn.peer, error = %e, "request failed");
                }
            }
            let _ = send.finish();
        });
    }
}

/// What a coordinator or worker opens first: its credentials, whose
/// certificate must name `role`, and its state directory.
pub(crate) fn open_node(
    tls: &config::TlsFiles,
    role: strata_net::Role,
    home: &std::path::Path,
) -> Result<(strata_net::Identity, strata_net::Peer, strata_worker::Node), error::StartError> {
    let id = tls.identity()?;
    let me = id.peer().map_err(error::StartError::Certificate)?;
    if me.role != role {
        return Err(error::StartError::Role {
            cert: tls.cert.clone(),
            found: me.role,
            wanted: role,
        });
    }
    let node = strata_worker::Node::open(home).map_err(|source| error::StartError::Node {
        home: home.to_path_buf(),
        source,
    })?;
    Ok((id, me, node))
}
