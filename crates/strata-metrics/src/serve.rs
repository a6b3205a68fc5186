//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the
//! process answers), `/readyz` (the node can take work, or why not), and
//! a read-only dashboard: the page at `/` (compiled in; it needs nothing
//! from the network) and the JSON it polls, `/api/dashboard`.
//!
//! On a loopback address it is plain HTTP. Anywhere else it must be HTTPS
//! with a bearer token, which `/metrics` and `/api/dashboard` then ask
//! for (the page takes it after `#token=` in its address); the health
//! endpoints stay open, as Kubernetes probes expect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::Error;

/// Why a node cannot take work yet: its own error, shown on `/readyz`.
pub type NotReady = Box<dyn std::error::Error + Send + Sync>;

/// What a node says of itself on `/readyz`, and the gauges it brings up
/// to date before a scrape.
pub trait Health: Send + Sync + 'static {
    /// Whether the node can take work now; if not, why.
    fn ready(&self) -> Result<(), NotReady>;

    /// Sets the gauges read on demand (store sizes, Raft state). Called off
    /// the async threads before each scrape.
    fn refresh(&self) {}

    /// What the dashboard shows, as JSON: `node` (`name`, `role`,
    /// `version`), `workers`, `running` builds with their steps, `recent`
    /// builds, and `cache` (`entries`, `bytes`, `lookups_hour`,
    /// `hits_hour`). Called off the async threads. `None`: no dashboard.
    fn dashboard(&self) -> Option<serde_json::Value> {
        None
    }
}

/// The dashboard page.
const DASHBOARD: &str = include_str!("dashboard.html");

/// A running endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Serving {
    /// Where it listens (the port chosen when asked for port 0).
    pub addr: SocketAddr,
}

struct Shared {
    handle: PrometheusHandle,
    health: Arc<dyn Health>,
    token: Option<String>,
}

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// TLS handshakes in progress at most; more connections wait in the
/// kernel's backlog.
const MAX_TLS_HANDSHAKES: usize = 64;

/// Serves this process's metrics and `health` on `addr`, in the
/// background on the current runtime. A non-loopback address needs both
/// `tls` and `token`.
pub async fn serve(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    token: Option<String>,
    health: Arc<dyn Health>,
) -> Result<Serving, Error> {
    if !addr.ip().is_loopback() {
        if tls.is_none() {
            return Err(Error::Exposed { addr, what: "TLS" });
        }
        if token.as_deref().is_none_or(str::is_empty) {
            return Err(Error::Exposed {
                addr,
                what: "a token",
            });
        }
    }
    let handle = crate::install()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Listen { addr, source })?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        // Histograms are drained into their buckets here, so memory stays
        // bounded when nobody scrapes.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/", get(page))
        .route("/api/dashboard", get(dashboard))
        .with_state(Arc::new(Shared {
            handle,
            health,
            token: token.filter(|t| !t.is_empty()),
        }));
    spawn_router(listener, local, tls, app, "metrics");
    tracing::info!(addr = %local, "serving metrics and health");
    Ok(Serving { addr: local })
}

/// Serves `app` on `listener` (listening on `local`) in the background on
/// the current runtime: plain HTTP, or HTTPS with `tls`. `what` names the
/// endpoint in the log line of its end.
pub fn spawn_router(
    listener: TcpListener,
    local: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    what: &'static str,
) {
    match tls {
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(addr = %local, error = %e, endpoint = what, "an HTTP endpoint stopped");
                }
            });
        }
        Some(config) => {
            let listener = TlsListener::start(listener, config, local);
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(addr = %local, error = %e, endpoint = what, "an HTTP endpoint stopped");
                }
            });
        }
    }
}

/// Refuses a request without the endpoint's token, when it has one.
fn unauthorized(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    let token = s.token.as_ref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    (!same(given.as_bytes(), token.as_bytes())).then(|| {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is needed\n",
        )
            .into_response()
    })
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page runs its own script and reaches only this endpoint.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        DASHBOARD,
    )
        .into_response()
}

async fn dashboard(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(refused) = unauthorized(&s, &headers) {
        return refused;
    }
    let health = Arc::clone(&s.health);
    match tokio::task::spawn_blocking(move || health.dashboard()).await {
        Ok(Some(v)) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(v)).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no dashboard on this node\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn metrics(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(refused) = unauthorized(&s, &headers) {
        return refused;
    }
    let health = Arc::clone(&s.health);
    if let Err(e) = tokio::task::spawn_blocking(move || health.refresh()).await {
        tracing::warn!(error = %e, "refreshing the metrics failed");
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.handle.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let health = Arc::clone(&s.health);
    match tokio::task::spawn_blocking(move || health.ready()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Ok(Err(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}

/// Compares in time independent of where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// TCP connections after their TLS handshake. Handshakes run in tasks of
/// their own, each bounded in time, so a client that stalls holds up
/// nobody else.
struct TlsListener {
    ready: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn start(
        tcp: TcpListener,
        config: Arc<rustls::ServerConfig>,
        local: SocketAddr,
    ) -> TlsListener {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (tx, ready) = mpsc::channel(MAX_TLS_HANDSHAKES);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_TLS_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "HTTPS endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "HTTPS endpoint: TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer, "HTTPS endpoint: TLS handshake timed out");
                        }
                    }
                });
            }
        });
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task ended: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NotYet;

    impl Health for NotYet {
        fn ready(&self) -> Result<(), NotReady> {
            Err("no leader elected".into())
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
        assert!(!same(b"", b"a"));
    }

    #[tokio::test]
    async fn an_exposed_address_needs_tls_and_a_token() {
        let addr: SocketAddr = ([0, 0, 0, 0], 0).into();
        let refused = serve(addr, None, Some("t".into()), Arc::new(NotYet)).await;
        assert!(
            matches!(refused, Err(Error::Exposed { what: "TLS", .. })),
            "{refused:?}"
        );
    }

    fn client() -> reqwest::blocking::ClientBuilder {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::blocking::Client::builder()
    }

    #[tokio::test]
    async fn health_and_readiness_answer_over_http() {
        let served = serve(([127, 0, 0, 1], 0).into(), None, None, Arc::new(NotYet)).await;
        let Ok(Serving { addr }) = served else {
            panic!("{served:?}")
        };
        let (healthz, readyz, metrics) = tokio::task::spawn_blocking(move || {
            let get = |path: &str| {
                let r = client()
                    .build()?
                    .get(format!("http://{addr}{path}"))
                    .send()?;
                Ok::<_, reqwest::Error>((r.status().as_u16(), r.text()?))
            };
            (get("/healthz"), get("/readyz"), get("/metrics"))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(healthz.ok(), Some((200, "ok\n".to_string())));
        assert_eq!(
            readyz.ok(),
            Some((503, "not ready: no leader elected\n".to_string()))
        );
        let Ok((status, text)) = metrics else {
            panic!("{metrics:?}")
        };
        assert_eq!(status, 200);
        assert!(text.contains("strata_build_info{version="), "{text}");
    }

    #[tokio::test]
    async fn exposed_metrics_are_https_and_ask_for_the_token() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let Ok(cert) = rcgen::generate_simple_self_signed(vec!["localhost".into()]) else {
            panic!("no certificate")
        };
        let chain = vec![cert.cert.der().clone()];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap_or_else(|e| panic!("{e}"));
        // Served on every address, as an exposed node is; reached over
        // loopback.
        let served = serve(
            ([0, 0, 0, 0], 0).into(),
            Some(Arc::new(config)),
            Some("s3cret".into()),
            Arc::new(NotYet),
        )
        .await;
        let Ok(Serving { addr }) = served else {
            panic!("{served:?}")
        };
        let pem = cert.cert.pem();
        let port = addr.port();
        let answers = tokio::task::spawn_blocking(move || {
            let ca = reqwest::Certificate::from_pem(pem.as_bytes())?;
            let c = client().add_root_certificate(ca).build()?;
            let url = format!("https://localhost:{port}/metrics");
            let status = |r: reqwest::blocking::Response| r.status().as_u16();
            let plain = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics")).is_ok();
            Ok::<_, reqwest::Error>((
                status(c.get(&url).send()?),
                status(c.get(&url).bearer_auth("wrong").send()?),
                status(c.get(&url).bearer_auth("s3cret").send()?),
                status(c.get(format!("https://localhost:{port}/healthz")).send()?),
                plain,
            ))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answers.ok(), Some((401, 401, 200, 200, false)));
    }
}
