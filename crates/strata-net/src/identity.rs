//! The cluster CA and node identities.

use std::fmt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

use crate::error::{Error, Result};

/// The DNS name every node certificate carries and every dialer checks:
/// nodes are told apart by role and name, not by host names.
pub(crate) const SERVER_NAME: &str = "strata-node";

/// What a node may do, written in its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// Plans builds, schedules stages, keeps the cache index.
    Coordinator,
    /// Runs stages and holds blobs.
    Worker,
    /// Submits builds and fetches results.
    Client,
    /// Administers the cluster: the group of coordinators, cordons.
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "coordinator" => Ok(Role::Coordinator),
            "worker" => Ok(Role::Worker),
            "client" => Ok(Role::Client),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: coordinator, worker, client or admin"
            )),
        }
    }
}

/// Who is at the other end of a connection, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Its role.
    pub role: Role,
    /// Its name within the cluster.
    pub name: String,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

fn uri_of(role: Role, name: &str) -> String {
    format!("strata://{role}/{name}")
}

impl Peer {
    /// The role and name a certificate (already verified against the CA)
    /// was issued for.
    pub fn of_certificate(der: &CertificateDer<'_>) -> Result<Peer> {
        let cert = webpki::EndEntityCert::try_from(der)
            .map_err(|e| Error::Tls(format!("unreadable peer certificate: {e}")))?;
        cert.valid_uri_names()
            .find_map(|uri| {
                let rest = uri.strip_prefix("strata://")?;
                let (role, name) = rest.split_once('/')?;
                Some(Peer {
                    role: role.parse().ok()?,
                    name: name.to_string(),
                })
            })
            .ok_or_else(|| Error::Tls("the peer certificate names no strata role".into()))
    }
}

fn tls(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::Tls(format!("{what}: {e}"))
}

/// Writes `data` to `path` as a new file (mode 0600 when `private`),
/// synced, then renamed over whatever was there: a symlink planted at
/// `path` is replaced, never written through, and an old file's looser
/// mode is never kept.
fn write_file(path: &Path, data: &str, private: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| Error::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&tmp)?;
        f.write_all(data.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        what: "cannot read",
        path: path.to_path_buf(),
        source,
    })
}

/// The cluster's certificate authority: a self-signed CA whose key signs
/// every node certificate. Whoever holds its key can add nodes.
pub struct ClusterCa {
    name: String,
    cert_pem: String,
    key: KeyPair,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    fn params(name: &str) -> Result<CertificateParams> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(tls("CA parameters"))?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(p)
    }

    /// A new CA named `name`.
    pub fn create(name: &str) -> Result<ClusterCa> {
        let key = KeyPair::generate().map_err(tls("CA key"))?;
        let cert = Self::params(name)?
            .self_signed(&key)
            .map_err(tls("CA certificate"))?;
        Ok(ClusterCa {
            name: name.to_string(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Writes `ca.pem` (public), `ca-key.pem` (private, mode 0600) and
    /// `ca-name` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        write_file(&dir.join("ca.pem"), &self.cert_pem, false)?;
        write_file(&dir.join("ca-key.pem"), &self.key.serialize_pem(), true)?;
        write_file(&dir.join("ca-name"), &self.name, false)
    }

    /// The CA [`ClusterCa::save`] wrote into `dir`.
    pub fn load(dir: &Path) -> Result<ClusterCa> {
        let key_path = dir.join("ca-key.pem");
        let key = KeyPair::from_pem(&read_file(&key_path)?)
            .map_err(|e| Error::Tls(format!("{}: {e}", key_path.display())))?;
        Ok(ClusterCa {
            name: read_file(&dir.join("ca-name"))?.trim().to_string(),
            cert_pem: read_file(&dir.join("ca.pem"))?,
            key,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for node `name` in `role`, signed by this CA.
    pub fn issue(&self, role: Role, name: &str) -> Result<Identity> {
        self.issue_for(role, name, &[])
    }

    /// A certificate for node `name` in `role` that also names `hosts`
    /// (IP addresses or DNS names): what HTTPS clients that know nothing
    /// of strata (a container engine pulling from a coordinator's image
    /// endpoint) check the server against.
    pub fn issue_for(&self, role: Role, name: &str, hosts: &[String]) -> Result<Identity> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(Error::Tls(format!(
                "node name {name:?}: use letters, digits, '-', '_' and '.'"
            )));
        }
        let mut p = CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(tls("node parameters"))?;
        p.subject_alt_names.push(SanType::URI(
            uri_of(role, name).try_into().map_err(tls("node name"))?,
        ));
        for host in hosts {
            p.subject_alt_names
                .push(match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(host.as_str().try_into().map_err(|e| {
                        Error::Tls(format!("host name {host:?} for a certificate: {e}"))
                    })?),
                });
        }
        p.distinguished_name
            .push(DnType::CommonName, format!("{role} {name}"));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(tls("node key"))?;
        let issuer = Issuer::new(Self::params(&self.name)?, &self.key);
        let cert = p
            .signed_by(&key, &issuer)
            .map_err(tls("node certificate"))?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// A node's credentials: its certificate and key, and the CA it trusts.
#[derive(Clone)]
pub struct Identity {
    /// The node certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    /// Writes `NAME.pem` and `NAME-key.pem` (mode 0600) into `dir`.
    pub fn save(&self, dir: &Path, name: &str) -> Result<()> {
        write_file(&dir.join(format!("{name}.pem")), &self.cert_pem, false)?;
        write_file(&dir.join(format!("{name}-key.pem")), &self.key_pem, true)
    }

    /// Reads a certificate, its key and the CA certificate.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Identity> {
        Ok(Identity {
            cert_pem: read_file(cert)?,
            key_pem: read_file(key)?,
            ca_pem: read_file(ca)?,
        })
    }

    /// Who this identity says it is.
    pub fn peer(&self) -> Result<Peer> {
        use rustls_pki_types::pem::PemObject as _;
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| Error::Tls(format!("unreadable certificate: {e}")))?;
        Peer::of_certificate(&der)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_replace_symlinks_and_loose_modes() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "not a key").unwrap();
        let key = dir.path().join("node-key.pem");
        std::os::unix::fs::symlink(&elsewhere, &key).unwrap();
        write_file(&key, "KEY", true).unwrap();
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "not a key");
        assert!(
            !std::fs::symlink_metadata(&key)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&key, "KEY2", true).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "KEY2");
    }

    #[test]
    fn certificates_carry_role_and_name_and_survive_saving() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create("test cluster").unwrap();
        ca.save(dir.path()).unwrap();
        let ca = ClusterCa::load(dir.path()).unwrap();
        let id = ca.issue(Role::Worker, "w-1").unwrap();
        assert_eq!(
            id.peer().unwrap(),
            Peer {
                role: Role::Worker,
                name: "w-1".into()
            }
        );
        id.save(dir.path(), "w-1").unwrap();
        let back = Identity::load(
            &dir.path().join("w-1.pem"),
            &dir.path().join("w-1-key.pem"),
            &dir.path().join("ca.pem"),
        )
        .unwrap();
        assert_eq!(back.peer().unwrap().role, Role::Worker);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(ca.issue(Role::Client, "bad name").is_err());
    }
}
