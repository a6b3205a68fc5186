//! Configuration files of cluster nodes and clients (TOML). Every setting
//! has a default and an environment override (`STRATA_…`, named with
//! each field); relative paths are relative to the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_net::Identity;

/// Errors reading or writing configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{}: {detail}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// An environment override is not valid.
    #[error("{var}={value:?}: {detail}")]
    Env {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What is wrong.
        detail: String,
    },
    /// Credentials could not be read.
    #[error(transparent)]
    Tls(#[from] strata_net::Error),
}

/// Where to reach a node: `IP:PORT` or `HOST:PORT`. A host name is looked
/// up each time the node is dialed, so a coordinator behind a DNS name (a
/// Kubernetes Service) may move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeAddress {
    host: String,
    port: u16,
}

impl NodeAddress {
    /// The socket address to dial now.
    pub async fn resolve(&self) -> Result<SocketAddr, crate::ConnectError> {
        if let Ok(ip) = self.host.parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| crate::ConnectError::Lookup {
                addr: self.to_string(),
                source,
            })?
            .next()
            .ok_or_else(|| crate::ConnectError::NoAddress(self.to_string()))
    }

    /// Connects to the coordinator at this address: a connection to a
    /// coordinator, or why not.
    pub(crate) async fn connect(
        &self,
        endpoint: &strata_net::Endpoint,
    ) -> Result<strata_net::Connection, crate::ConnectError> {
        use crate::ConnectError;
        let a = self.resolve().await?;
        // A coordinator that is down may not answer at all: give up well
        // before QUIC's idle timeout.
        let within = crate::protocol::CONNECT_TIMEOUT;
        let conn = tokio::time::timeout(within, endpoint.connect(a))
            .await
            .map_err(|_| ConnectError::Timeout {
                addr: self.to_string(),
                within,
            })?
            .map_err(|source| ConnectError::Net {
                addr: self.to_string(),
                source,
            })?;
        if conn.peer.role == strata_net::Role::Coordinator {
            Ok(conn)
        } else {
            Err(ConnectError::NotCoordinator {
                addr: self.to_string(),
                peer: conn.peer.to_string(),
            })
        }
    }
}

/// A node address that is not `HOST:PORT` or `IP:PORT`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not HOST:PORT or IP:PORT")]
pub struct BadAddress(pub String);

impl std::str::FromStr for NodeAddress {
    type Err = BadAddress;
    fn from_str(s: &str) -> Result<NodeAddress, BadAddress> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a.into());
        }
        let bad = || BadAddress(s.to_string());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse().map_err(|_| bad())?;
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
        if host.is_empty() || !host.chars().all(valid) {
            return Err(bad());
        }
        Ok(NodeAddress {
            host: host.to_string(),
            port,
        })
    }
}

impl TryFrom<String> for NodeAddress {
    type Error = BadAddress;
    fn try_from(s: String) -> Result<NodeAddress, BadAddress> {
        s.parse()
    }
}

impl From<NodeAddress> for String {
    fn from(a: NodeAddress) -> String {
        a.to_string()
    }
}

impl From<SocketAddr> for NodeAddress {
    fn from(a: SocketAddr) -> NodeAddress {
        NodeAddress {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where a node's credentials are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The identity the files hold.
    pub fn identity(&self) -> Result<Identity, ConfigError> {
        Ok(Identity::load(&self.cert, &self.key, &self.ca)?)
    }

    fn resolve(&mut self, base: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            *p = base.join(&*p);
        }
    }
}

fn default_lease() -> u64 {
    5
}

fn tls_named(name: &str) -> TlsFiles {
    TlsFiles {
        ca: "ca.pem".into(),
        cert: format!("{name}.pem").into(),
        key: format!("{name}-key.pem").into(),
    }
}

fn default_coordinator_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7400))
}

fn default_coordinator_home() -> PathBuf {
    "coordinator".into()
}

fn default_coordinator_tls() -> TlsFiles {
    tls_named("coordinator")
}

fn default_coordinator() -> NodeAddress {
    SocketAddr::from(([127, 0, 0, 1], 7400)).into()
}

fn default_worker_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7401))
}

fn default_worker_home() -> PathBuf {
    "worker".into()
}

fn default_worker_tls() -> TlsFiles {
    tls_named("worker")
}

/// A single address or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<NodeAddress>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let all = match OneOrMany::deserialize(d)? {
        OneOrMany::One(a) => vec![a],
        OneOrMany::Many(v) if v.is_empty() => {
            return Err(serde::de::Error::custom("no coordinator listed"));
        }
        OneOrMany::Many(v) => v,
    };
    all.iter()
        .map(|a| a.parse().map_err(serde::de::Error::custom))
        .collect()
}

fn default_coordinators() -> Vec<NodeAddress> {
    vec![default_coordinator()]
}

fn default_client_tls() -> TlsFiles {
    tls_named("client")
}

fn default_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A coordinator of the Raft group, as the others reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupMember {
    /// Its id in the group.
    pub id: u64,
    /// Its `raft_listen` address, as the others dial it.
    pub raft: SocketAddr,
}

fn default_id() -> u64 {
    1
}

fn default_replication() -> usize {
    CoordinatorConfig::DEFAULT_REPLICATION
}

fn default_repair_rate() -> u64 {
    CoordinatorConfig::DEFAULT_REPAIR_RATE
}

fn default_upload_quota() -> u64 {
    CoordinatorConfig::DEFAULT_UPLOAD_QUOTA
}

fn default_raft_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7500))
}

/// `[metrics]`: where a coordinator or worker serves Prometheus metrics,
/// `/healthz` and `/readyz` over HTTP (TCP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Whether it serves them at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The address. Unset: 127.0.0.1 on the TCP port of the same number
    /// as the node's `listen` (which is UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// A file holding the bearer token `/metrics` asks for. Needed on an
    /// address other than loopback, where the endpoint is HTTPS with the
    /// node's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl MetricsConfig {
    /// Served, on the default address.
    pub fn on() -> MetricsConfig {
        MetricsConfig {
            enabled: true,
            listen: None,
            token_file: None,
        }
    }

    fn is_default(&self) -> bool {
        *self == MetricsConfig::on()
    }

    /// Where to serve for a node listening (QUIC) on `node`; `None` when
    /// disabled.
    pub fn address(&self, node: SocketAddr) -> Option<SocketAddr> {
        self.enabled
            .then(|| self.listen.unwrap_or(([127, 0, 0, 1], node.port()).into()))
    }

    /// The bearer token, read from `token_file`.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.clone(),
                detail: "the metrics token file is empty".into(),
            });
        }
        Ok(Some(token))
    }

    fn load_overrides(&mut self, base: &Path) -> Result<(), ConfigError> {
        if std::env::var_os("STRATA_METRICS_LISTEN").is_some_and(|v| v == "off") {
            self.enabled = false;
        } else if std::env::var_os("STRATA_METRICS_LISTEN").is_some() {
            let mut addr = self.listen.unwrap_or(([127, 0, 0, 1], 0).into());
            override_with("STRATA_METRICS_LISTEN", &mut addr)?;
            self.listen = Some(addr);
            self.enabled = true;
        }
        if let Some(path) = std::env::var_os("STRATA_METRICS_TOKEN_FILE") {
            self.token_file = Some(PathBuf::from(path));
        }
        if let Some(p) = &mut self.token_file {
            *p = base.join(&*p);
        }
        Ok(())
    }
}

/// `[registry]`: where a coordinator serves the cluster's images,
/// read-only, over the OCI distribution API (HTTP over TCP).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The address. Unset: not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// HTTPS with the coordinator's certificate, a client showing a
    /// certificate the cluster's CA signed. Unset: plain HTTP on
    /// loopback, HTTPS anywhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
}

impl RegistryConfig {
    /// Whether it is served over HTTPS.
    pub fn serves_tls(&self) -> bool {
        self.tls
            .unwrap_or_else(|| self.listen.is_some_and(|a| !a.ip().is_loopback()))
    }

    fn is_default(&self) -> bool {
        self.listen.is_none() && self.tls.is_none()
    }

    fn load_overrides(&mut self) -> Result<(), ConfigError> {
        match std::env::var_os("STRATA_REGISTRY_LISTEN") {
            Some(v) if v == "off" => self.listen = None,
            Some(_) => {
                let mut addr = self.listen.unwrap_or(([127, 0, 0, 1], 0).into());
                override_with("STRATA_REGISTRY_LISTEN", &mut addr)?;
                self.listen = Some(addr);
            }
            None => {}
        }
        Ok(())
    }
}

/// `coordinator.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Where workers and clients reach it (QUIC, UDP).
    #[serde(default = "default_coordinator_listen")]
    pub listen: SocketAddr,
    /// Its state directory: cache index, base images, uploaded contexts.
    #[serde(default = "default_coordinator_home")]
    pub home: PathBuf,
    /// Seconds a worker may stay silent before its stages are placed
    /// elsewhere.
    #[serde(default = "default_lease")]
    pub lease_seconds: u64,
    /// Its id in the group of coordinators.
    #[serde(default = "default_id")]
    pub id: u64,
    /// Where the other coordinators reach its part of the replicated cache
    /// index (QUIC, UDP).
    #[serde(default = "default_raft_listen")]
    pub raft_listen: SocketAddr,
    /// Every coordinator of the group, this one included. Empty: this
    /// coordinator is a group of one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group: Vec<GroupMember>,
    /// Workers each layer a build makes is kept on: a result enters the
    /// cache index once that many hold its layer (or every live worker,
    /// when fewer are up), and layers left with fewer copies when a
    /// worker goes are copied again.
    #[serde(default = "default_replication")]
    pub replication: usize,
    /// The highest rate, in MiB per second, at which lost copies are made
    /// again in the background (0: no bound).
    #[serde(default = "default_repair_rate")]
    pub repair_mib_per_second: u64,
    /// MiB each client certificate may upload (build contexts) in any
    /// hour; an upload that would pass it is refused whole.
    #[serde(default = "default_upload_quota")]
    pub upload_quota_mib_per_hour: u64,
    /// Bytes of uploaded build contexts it keeps at most: past that, the
    /// least recently used go (never one a build uses now, or one a
    /// client uploaded or asked about in the last ten minutes). Unset: a
    /// tenth of the filesystem its state directory is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_storage: Option<u64>,
    /// Seconds an uploaded context no build used is kept at most. Unset:
    /// no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_duration: Option<u64>,
    /// Its metrics and health endpoint.
    #[serde(
        default = "MetricsConfig::on",
        skip_serializing_if = "MetricsConfig::is_default"
    )]
    pub metrics: MetricsConfig,
    /// Its endpoint serving the cluster's images.
    #[serde(default, skip_serializing_if = "RegistryConfig::is_default")]
    pub registry: RegistryConfig,
    /// Its credentials.
    #[serde(default = "default_coordinator_tls")]
    pub tls: TlsFiles,
}

/// `worker.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// The coordinators it may serve, tried in order (`coordinator = "…"`
    /// or a list): when the one it serves goes, it registers with the
    /// next.
    #[serde(
        rename = "coordinator",
        default = "default_coordinators",
        deserialize_with = "one_or_many"
    )]
    pub coordinators: Vec<NodeAddress>,
    /// Where peers and clients fetch its blobs (QUIC, UDP).
    #[serde(default = "default_worker_listen")]
    pub listen: SocketAddr,
    /// The address peers dial, when it is not `listen` (behind NAT, or
    /// `listen` is a wildcard and the coordinator should not take the
    /// address the worker's connection comes from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<SocketAddr>,
    /// Its state directory.
    #[serde(default = "default_worker_home")]
    pub home: PathBuf,
    /// Steps it runs at once.
    #[serde(default = "default_slots")]
    pub slots: usize,
    /// Entitlements it grants steps whose build asks for them (`--allow`):
    /// `network.host`, `security.insecure`. None by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub insecure_entitlements: Vec<strata_plan::Entitlement>,
    /// Whether it takes steps for platforms it runs only through an
    /// emulator (a qemu-user-static binfmt_misc entry): true by default;
    /// false keeps slow emulated steps on other workers.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub emulation: bool,
    /// Bytes of blobs (layers, copies, contexts) it keeps at most: past
    /// that, the least recently used go, spare copies first. Unset: a
    /// tenth of the filesystem its state directory is on, as buildkitd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_storage: Option<u64>,
    /// Seconds a blob no build used is kept at most. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_duration: Option<u64>,
    /// Its metrics and health endpoint.
    #[serde(
        default = "MetricsConfig::on",
        skip_serializing_if = "MetricsConfig::is_default"
    )]
    pub metrics: MetricsConfig,
    /// Its credentials.
    #[serde(default = "default_worker_tls")]
    pub tls: TlsFiles,
}

/// `client.toml`, what `strata build --cluster` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Coordinators, all dialled at once.
    #[serde(default = "default_coordinators")]
    pub coordinators: Vec<NodeAddress>,
    /// The client's credentials.
    #[serde(default = "default_client_tls")]
    pub tls: TlsFiles,
    /// Where the client remembers the coordinator it prefers (the leader
    /// when last seen, else the one that answered): not part of the file;
    /// [`ClientConfig::load`] puts it beside the file.
    #[serde(skip)]
    pub memory: Option<PathBuf>,
}

fn override_with<T: std::str::FromStr>(var: &str, field: &mut T) -> Result<(), ConfigError>
where
    T::Err: std::fmt::Display,
{
    if let Ok(value) = std::env::var(var) {
        *field = value.parse().map_err(|e: T::Err| ConfigError::Env {
            var: var.to_string(),
            value: value.clone(),
            detail: e.to_string(),
        })?;
    }
    Ok(())
}

/// `STRATA_KEEP_STORAGE` and `STRATA_KEEP_DURATION` over a node's store
/// bounds.
fn override_keep(storage: &mut Option<u64>, duration: &mut Option<u64>) -> Result<(), ConfigError> {
    for (var, field) in [
        ("STRATA_KEEP_STORAGE", storage),
        ("STRATA_KEEP_DURATION", duration),
    ] {
        if std::env::var_os(var).is_some() {
            let mut v = field.unwrap_or_default();
            override_with(var, &mut v)?;
            *field = Some(v);
        }
    }
    Ok(())
}

fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn base_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

impl CoordinatorConfig {
    /// Workers each built layer is kept on, unless configured.
    pub const DEFAULT_REPLICATION: usize = 2;
    /// MiB per second for background copies, unless configured.
    pub const DEFAULT_REPAIR_RATE: u64 = 64;
    /// MiB a client may upload in an hour, unless configured: 64 GiB,
    /// the largest blob a node takes.
    pub const DEFAULT_UPLOAD_QUOTA: u64 = 64 << 10;

    /// Reads `path`, then `STRATA_LISTEN`, `STRATA_HOME`,
    /// `STRATA_LEASE_SECONDS`, `STRATA_RAFT_LISTEN`, `STRATA_REPLICATION`,
    /// `STRATA_REPAIR_MIB_PER_SECOND`, `STRATA_UPLOAD_QUOTA_MIB_PER_HOUR`,
    /// `STRATA_KEEP_STORAGE`, `STRATA_KEEP_DURATION`, the `[metrics]` ones
    /// and `STRATA_REGISTRY_LISTEN` (an address, or `off`).
    pub fn load(path: &Path) -> Result<CoordinatorConfig, ConfigError> {
        let mut c: CoordinatorConfig = load(path)?;
        override_with("STRATA_LISTEN", &mut c.listen)?;
        override_with("STRATA_HOME", &mut c.home)?;
        override_with("STRATA_LEASE_SECONDS", &mut c.lease_seconds)?;
        override_with("STRATA_RAFT_LISTEN", &mut c.raft_listen)?;
        override_with("STRATA_REPLICATION", &mut c.replication)?;
        override_with("STRATA_REPAIR_MIB_PER_SECOND", &mut c.repair_mib_per_second)?;
        override_with(
            "STRATA_UPLOAD_QUOTA_MIB_PER_HOUR",
            &mut c.upload_quota_mib_per_hour,
        )?;
        override_keep(&mut c.keep_storage, &mut c.keep_duration)?;
        c.metrics.load_overrides(&base_of(path))?;
        c.registry.load_overrides()?;
        if c.replication == 0 {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                detail: "replication must be at least 1".into(),
            });
        }
        if !c.group.is_empty() && !c.group.iter().any(|m| m.id == c.id) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                detail: format!("the group does not list this coordinator (id {})", c.id),
            });
        }
        let base = base_of(path);
        c.home = base.join(&c.home);
        c.tls.resolve(&base);
        Ok(c)
    }
}

impl WorkerConfig {
    /// Reads `path`, then `STRATA_COORDINATOR`, `STRATA_LISTEN`,
    /// `STRATA_ADVERTISE`, `STRATA_HOME`, `STRATA_SLOTS`,
    /// `STRATA_KEEP_STORAGE` and `STRATA_KEEP_DURATION`.
    pub fn load(path: &Path) -> Result<WorkerConfig, ConfigError> {
        let mut c: WorkerConfig = load(path)?;
        if let Ok(value) = std::env::var("STRATA_COORDINATOR") {
            c.coordinators = value
                .split(',')
                .map(|a| a.trim().parse())
                .collect::<Result<_, BadAddress>>()
                .map_err(|e| ConfigError::Env {
                    var: "STRATA_COORDINATOR".into(),
                    value: value.clone(),
                    detail: e.to_string(),
                })?;
        }
        override_with("STRATA_LISTEN", &mut c.listen)?;
        if std::env::var_os("STRATA_ADVERTISE").is_some() {
            let mut addr = c.advertise.unwrap_or(c.listen);
            override_with("STRATA_ADVERTISE", &mut addr)?;
            c.advertise = Some(addr);
        }
        override_with("STRATA_HOME", &mut c.home)?;
        override_with("STRATA_SLOTS", &mut c.slots)?;
        override_keep(&mut c.keep_storage, &mut c.keep_duration)?;
        c.metrics.load_overrides(&base_of(path))?;
        if c.slots == 0 {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                detail: "slots must be at least 1".into(),
            });
        }
        let base = base_of(path);
        c.home = base.join(&c.home);
        c.tls.resolve(&base);
        Ok(c)
    }
}

impl ClientConfig {
    /// Reads `path`.
    pub fn load(path: &Path) -> Result<ClientConfig, ConfigError> {
        let mut c: ClientConfig = load(path)?;
        if c.coordinators.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                detail: "no coordinators listed".into(),
            });
        }
        let base = base_of(path);
        c.tls.resolve(&base);
        let name = path.file_name().map_or_else(
            || "client.toml".into(),
            |n| n.to_string_lossy().into_owned(),
        );
        c.memory = Some(base.join(format!(".{name}.coordinator")));
        Ok(c)
    }

    /// The same client, with `addr` its only coordinator (and nothing
    /// remembered).
    pub fn only(&self, addr: &NodeAddress) -> ClientConfig {
        ClientConfig {
            coordinators: vec![addr.clone()],
            tls: self.tls.clone(),
            memory: None,
        }
    }

    /// The coordinator the client remembered, if it is still listed.
    pub fn remembered(&self) -> Option<usize> {
        let text = std::fs::read_to_string(self.memory.as_ref()?).ok()?;
        let text = text.trim();
        self.coordinators.iter().position(|a| a.to_string() == text)
    }

    /// Remembers `addr` as the coordinator to prefer. Best effort: a
    /// client whose directory is read-only just does not remember.
    pub fn remember(&self, addr: &NodeAddress) {
        let Some(path) = &self.memory else { return };
        if std::fs::read_to_string(path).is_ok_and(|t| t.trim() == addr.to_string()) {
            return;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let done =
            std::fs::write(&tmp, format!("{addr}\n")).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = done {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(path = %path.display(), error = %e, "could not remember the coordinator");
        }
    }
}

/// Writes a config file with a comment on top.
pub(crate) fn write(path: &Path, comment: &str, value: &impl Serialize) -> Result<(), ConfigError> {
    let body = toml::to_string_pretty(value).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let text = format!("{comment}\n{body}");
    std::fs::write(path, text).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// `config/NAME`, and an empty file, side by side.
    fn example_and_empty(name: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let example = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../config")
            .join(name);
        let (dir, empty) = file("");
        let copy = dir.path().join(name);
        std::fs::copy(&example, &copy).unwrap();
        (dir, copy, empty)
    }

    // The examples in config/ show every default: reading one gives what
    // an empty file gives.
    #[test]
    fn the_examples_parse_and_show_the_defaults() {
        let (_d, example, empty) = example_and_empty("coordinator.toml");
        assert_eq!(
            CoordinatorConfig::load(&example).unwrap(),
            CoordinatorConfig::load(&empty).unwrap()
        );
        let (_d, example, empty) = example_and_empty("worker.toml");
        assert_eq!(
            WorkerConfig::load(&example).unwrap(),
            WorkerConfig::load(&empty).unwrap()
        );
        let (_d, example, empty) = example_and_empty("client.toml");
        let forget = |mut c: ClientConfig| {
            c.memory = None;
            c
        };
        assert_eq!(
            forget(ClientConfig::load(&example).unwrap()),
            forget(ClientConfig::load(&empty).unwrap())
        );
    }

    #[test]
    fn addresses_are_ips_or_host_names_with_a_port() {
        for ok in [
            "10.0.0.1:7400",
            "[::1]:7400",
            "strata-coordinator.build.svc:7400",
        ] {
            let a: NodeAddress = ok.parse().unwrap();
            assert_eq!(a.to_string(), ok);
        }
        for bad in [
            "10.0.0.1",
            "host:",
            "host:99999",
            ":7400",
            "a b:1",
            "http://h:1",
        ] {
            assert!(bad.parse::<NodeAddress>().is_err(), "{bad}");
        }
        let (_d, path) = file("coordinator = [\"10.0.0.1:7400\", \"c2.example:7400\"]\n");
        let w = WorkerConfig::load(&path).unwrap();
        assert_eq!(w.coordinators.len(), 2);
        let (_d, path) = file("coordinator = \"nowhere\"\n");
        let e = WorkerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("\"nowhere\" is not HOST:PORT"), "{e}");
    }

    #[tokio::test]
    async fn host_names_are_looked_up_when_dialed() {
        let a: NodeAddress = "localhost:7400".parse().unwrap();
        assert_eq!(a.resolve().await.unwrap().port(), 7400);
        assert!(a.resolve().await.unwrap().ip().is_loopback());
        let gone: NodeAddress = "no-such-host.invalid:7400".parse().unwrap();
        let e = gone.resolve().await.unwrap_err();
        assert!(
            matches!(&e, crate::ConnectError::Lookup { addr, .. } | crate::ConnectError::NoAddress(addr)
                if addr == "no-such-host.invalid:7400"),
            "{e}"
        );
    }

    #[test]
    fn paths_are_relative_to_the_file() {
        let (dir, path) = file(
            "home = \"state\"\n[tls]\nca = \"c/ca.pem\"\ncert = \"/abs.pem\"\nkey = \"k.pem\"\n",
        );
        let c = CoordinatorConfig::load(&path).unwrap();
        assert_eq!(c.home, dir.path().join("state"));
        assert_eq!(c.tls.ca, dir.path().join("c/ca.pem"));
        assert_eq!(c.tls.cert, PathBuf::from("/abs.pem"));
    }

    #[test]
    fn mistakes_name_the_file_and_the_setting() {
        let (_d, path) = file("listen = \"0.0.0.0:7401\"\nslot = 4\n");
        let e = WorkerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("node.toml") && e.contains("slot"), "{e}");

        let (_d, path) = file("slots = 0\n");
        let e = WorkerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("slots must be at least 1"), "{e}");

        let (_d, path) = file("coordinators = []\n");
        let e = ClientConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("no coordinators"), "{e}");

        let missing = Path::new("/nonexistent/worker.toml");
        let e = WorkerConfig::load(missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/worker.toml"), "{e}");
    }
}
