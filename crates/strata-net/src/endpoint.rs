//! QUIC endpoints with mutual TLS and the strata handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::frame::{read_frame, write_frame};
use crate::identity::{Identity, Peer, SERVER_NAME};
use crate::{ALPN, PROTOCOL_VERSION};

/// The first message on a connection.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    version: u32,
}

/// The answer to [`Hello`].
#[derive(Debug, Serialize, Deserialize)]
enum HelloReply {
    Welcome,
    Refused(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls(what: &str) -> impl FnOnce(rustls::Error) -> Error + '_ {
    move |e| Error::Tls(format!("{what}: {e}"))
}

struct Credentials {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// A TLS server configuration for HTTPS with the node's certificate (its
/// name: `strata-node`), asking nothing of clients: a node's metrics
/// endpoint, whose clients are scrapers holding a bearer token rather
/// than cluster certificates.
pub fn https_config(id: &Identity) -> Result<rustls::ServerConfig> {
    let c = credentials(id)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(tls("TLS versions"))?
        .with_no_client_auth()
        .with_single_cert(c.chain, c.key)
        .map_err(tls("the node certificate"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Like [`https_config`], asking each client for a certificate the
/// cluster's CA signed: an endpoint for the cluster's own clients and
/// nodes (its image endpoint).
pub fn https_config_mutual(id: &Identity) -> Result<rustls::ServerConfig> {
    let c = credentials(id)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&c.roots), provider())
        .build()
        .map_err(|e| Error::Tls(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(tls("TLS versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(c.chain, c.key)
        .map_err(tls("the node certificate"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn credentials(id: &Identity) -> Result<Credentials> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(id.ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| Error::Tls(format!("unreadable CA certificate: {e}")))?;
        roots
            .add(ca)
            .map_err(tls("the CA certificate cannot be trusted"))?;
    }
    let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("unreadable certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| Error::Tls(format!("unreadable private key: {e}")))?;
    Ok(Credentials {
        roots: Arc::new(roots),
        chain,
        key,
    })
}

/// What one stream may have in flight unread.
pub const STREAM_WINDOW: u32 = 8 << 20;

/// What one connection may have in flight unread, all streams together:
/// the most one peer can make this node buffer.
pub const CONNECTION_WINDOW: u32 = 64 << 20;

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Idle connections between nodes stay up; a dead peer is noticed
    // within the idle timeout.
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(10)) {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(1024u32.into());
    // Windows sized for a fast network or loopback: a blob stream keeps
    // sending while its receiver hashes and writes (store to store, 512 MiB
    // on loopback: 270 MiB/s with quinn's 1.25 MB stream window, about 330
    // with 8 MiB; `benches/blob_transfer`). The connection's window bounds what
    // one peer can make this node buffer across all its streams, which
    // quinn leaves unbounded.
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
    t.send_window(u64::from(CONNECTION_WINDOW));
    Arc::new(t)
}

/// Handshakes in progress at once, from all peers together.
pub const MAX_HANDSHAKES: usize = 512;

/// Handshakes in progress at once from one IP address.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 64;

/// How long a peer has to finish TLS and the version handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshakes under way, run concurrently so one slow or silent peer
/// never delays another.
#[derive(Default)]
struct Accepting {
    pending: tokio::task::JoinSet<(std::net::IpAddr, SocketAddr, Result<Connection>)>,
    per_address: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// A QUIC endpoint of this node: it dials peers, and accepts them when it
/// listens.
#[derive(Clone)]
pub struct Endpoint {
    quic: quinn::Endpoint,
    client: quinn::ClientConfig,
    me: Peer,
    version: u32,
    accepting: Arc<tokio::sync::Mutex<Accepting>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    fn client_config(c: &Credentials) -> Result<quinn::ClientConfig> {
        let mut tls_config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls("TLS versions"))?
            .with_root_certificates(Arc::clone(&c.roots))
            .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
            .map_err(tls("the node certificate"))?;
        tls_config.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls_config)
            .map_err(|e| Error::Tls(format!("QUIC client: {e}")))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport());
        Ok(config)
    }

    fn server_config(c: &Credentials) -> Result<quinn::ServerConfig> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&c.roots), provider())
                .build()
                .map_err(|e| Error::Tls(format!("client verifier: {e}")))?;
        let mut tls_config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls("TLS versions"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(c.chain.clone(), c.key.clone_key())
            .map_err(tls("the node certificate"))?;
        tls_config.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls_config)
            .map_err(|e| Error::Tls(format!("QUIC server: {e}")))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(transport());
        Ok(config)
    }

    /// An endpoint that listens on `addr` (and dials from it).
    pub fn listen(addr: SocketAddr, id: &Identity) -> Result<Endpoint> {
        let c = credentials(id)?;
        let quic = quinn::Endpoint::server(Self::server_config(&c)?, addr).map_err(|e| {
            Error::Connection {
                peer: addr,
                detail: format!("cannot listen: {e}"),
            }
        })?;
        Self::dialing_with(quic, &c, id)
    }

    /// An endpoint that only dials.
    pub fn dialer(id: &Identity) -> Result<Endpoint> {
        let c = credentials(id)?;
        let any: SocketAddr = ([0, 0, 0, 0], 0).into();
        let quic = quinn::Endpoint::client(any).map_err(|e| Error::Connection {
            peer: any,
            detail: format!("cannot open a UDP socket: {e}"),
        })?;
        Self::dialing_with(quic, &c, id)
    }

    /// `quic`, dialing as `id` with its credentials `c`.
    fn dialing_with(quic: quinn::Endpoint, c: &Credentials, id: &Identity) -> Result<Endpoint> {
        Ok(Endpoint {
            client: Self::client_config(c)?,
            quic,
            me: id.peer()?,
            version: PROTOCOL_VERSION,
            accepting: Arc::default(),
        })
    }

    /// Dials announcing protocol `version` instead of this build's, to see
    /// how peers of another version are met.
    #[doc(hidden)]
    pub fn announcing_version(mut self, version: u32) -> Endpoint {
        self.version = version;
        self
    }

    /// Who this node is.
    pub fn me(&self) -> &Peer {
        &self.me
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.quic.local_addr().map_err(|e| Error::Connection {
            peer: ([0, 0, 0, 0], 0).into(),
            detail: format!("no local address: {e}"),
        })
    }

    /// Connects to the node at `addr`: TLS both ways, then the version
    /// handshake.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Connection> {
        let conn_err = |detail: String| Error::Connection { peer: addr, detail };
        let connecting = self
            .quic
            .connect_with(self.client.clone(), addr, SERVER_NAME)
            .map_err(|e| conn_err(format!("cannot connect: {e}")))?;
        let quic = connecting
            .await
            .map_err(|e| conn_err(format!("cannot connect: {}", describe(&e))))?;
        let peer = peer_of(&quic, addr)?;
        let (mut send, mut recv) = quic
            .open_bi()
            .await
            .map_err(|e| conn_err(format!("handshake: {e}")))?;
        write_frame(
            &mut send,
            &Hello {
                version: self.version,
            },
            addr,
        )
        .await?;
        match read_frame::<HelloReply>(&mut recv, addr).await? {
            Some(HelloReply::Welcome) => Ok(Connection { quic, peer, addr }),
            Some(HelloReply::Refused(why)) => Err(Error::Refused {
                peer: addr,
                detail: why,
            }),
            None => Err(conn_err("closed during the handshake".into())),
        }
    }

    /// The next peer that connects and passes the handshake; `None` once
    /// the endpoint is closed. A peer that fails is logged and skipped.
    ///
    /// Handshakes run concurrently, each within [`HANDSHAKE_TIMEOUT`], at
    /// most [`MAX_HANDSHAKES`] at once and [`MAX_HANDSHAKES_PER_ADDRESS`]
    /// from one address (more are refused): a peer that starts handshakes
    /// and never finishes them costs others nothing.
    pub async fn accept(&self) -> Option<Connection> {
        let mut accepting = self.accepting.lock().await;
        let Accepting {
            pending,
            per_address,
        } = &mut *accepting;
        loop {
            tokio::select! {
                incoming = self.quic.accept(), if pending.len() < MAX_HANDSHAKES => {
                    let incoming = incoming?;
                    let addr = incoming.remote_address();
                    let ip = addr.ip();
                    let from_there = per_address.entry(ip).or_default();
                    if *from_there >= MAX_HANDSHAKES_PER_ADDRESS {
                        tracing::warn!(peer = %addr, "refused a connection: too many handshakes from this address");
                        strata_metrics::handshake_error("too_many");
                        incoming.refuse();
                        continue;
                    }
                    *from_there += 1;
                    pending.spawn(async move {
                        let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::handshake(incoming, addr))
                            .await
                            .unwrap_or_else(|_| {
                                Err(Error::Refused {
                                    peer: addr,
                                    detail: format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
                                })
                            });
                        (ip, addr, done)
                    });
                }
                Some(joined) = pending.join_next() => {
                    let Ok((ip, addr, done)) = joined else { continue };
                    if let Some(n) = per_address.get_mut(&ip) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            per_address.remove(&ip);
                        }
                    }
                    match done {
                        Ok(c) => return Some(c),
                        Err(e) => {
                            strata_metrics::handshake_error(e.kind());
                            tracing::warn!(peer = %addr, error = %e, "refused a connection");
                        }
                    }
                }
            }
        }
    }

    async fn handshake(incoming: quinn::Incoming, addr: SocketAddr) -> Result<Connection> {
        let quic = incoming.await.map_err(|e| Error::Refused {
            peer: addr,
            detail: describe(&e),
        })?;
        let peer = peer_of(&quic, addr)?;
        let (mut send, mut recv) = quic.accept_bi().await.map_err(|e| Error::Connection {
            peer: addr,
            detail: format!("handshake: {e}"),
        })?;
        let hello =
            read_frame::<Hello>(&mut recv, addr)
                .await?
                .ok_or_else(|| Error::Connection {
                    peer: addr,
                    detail: "closed during the handshake".into(),
                })?;
        if hello.version != PROTOCOL_VERSION {
            let why = format!(
                "{peer} speaks strata protocol version {}, this node version {PROTOCOL_VERSION}",
                hello.version
            );
            write_frame(&mut send, &HelloReply::Refused(why.clone()), addr).await?;
            let _ = send.finish();
            // Give the refusal time to arrive before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            return Err(Error::Refused {
                peer: addr,
                detail: why,
            });
        }
        write_frame(&mut send, &HelloReply::Welcome, addr).await?;
        let _ = send.finish();
        Ok(Connection { quic, peer, addr })
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.quic.close(0u32.into(), b"closing");
    }

    /// Waits until every connection is closed.
    pub async fn wait_idle(&self) {
        self.quic.wait_idle().await;
    }
}

/// A QUIC connection error, with the TLS alert spelled out when there
/// is one (an unknown CA, a missing certificate).
fn describe(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ConnectionClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            format!(
                "the peer closed the connection ({}{})",
                c.error_code,
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            )
        }
        other => other.to_string(),
    }
}

fn peer_of(quic: &quinn::Connection, addr: SocketAddr) -> Result<Peer> {
    let certs = quic
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| Error::Refused {
            peer: addr,
            detail: "no certificate".into(),
        })?;
    let first = certs.first().ok_or_else(|| Error::Refused {
        peer: addr,
        detail: "an empty certificate chain".into(),
    })?;
    Peer::of_certificate(first)
}

/// A connection to a peer whose certificate and protocol version passed.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The QUIC connection.
    pub quic: quinn::Connection,
    /// Who the peer is.
    pub peer: Peer,
    /// Where it is.
    pub addr: SocketAddr,
}

impl Connection {
    /// Opens a request stream.
    pub async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        self.quic.open_bi().await.map_err(|e| Error::Connection {
            peer: self.addr,
            detail: describe(&e),
        })
    }

    /// The next stream the peer opens; `None` when the connection ends.
    pub async fn accept(&self) -> Option<(quinn::SendStream, quinn::RecvStream)> {
        self.quic.accept_bi().await.ok()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.quic.close_reason().is_some()
    }

    /// Ends the connection when `e` says the peer forged a blob: nothing
    /// more is taken from a peer that lied about what it sent. True if it
    /// was ended.
    pub fn close_if_forged(&self, e: &Error) -> bool {
        if !matches!(e, Error::Forged { .. }) {
            return false;
        }
        tracing::warn!(peer = %self.peer, addr = %self.addr, error = %e, "closing the connection of a peer that forged a blob");
        self.quic
            .close(FORGED.into(), b"a blob did not hash to its name");
        true
    }
}

/// The application close code for a peer that forged a blob.
pub const FORGED: u32 = 3;
