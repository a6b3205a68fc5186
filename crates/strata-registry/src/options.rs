//! Where registries are and how to talk to them.

use std::path::PathBuf;

/// How to reach registries, as Docker's daemon settings say it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryOptions {
    /// `HOST[:PORT]` of registries spoken to over plain HTTP
    /// (`--insecure-registry`). Loopback registries always are, as in
    /// Docker.
    pub insecure: Vec<String>,
    /// Registries to try before Docker Hub for `docker.io` images
    /// (`--registry-mirror`), as `http://HOST:PORT`, `https://HOST` or
    /// `HOST:PORT`. A mirror that lacks an image is passed over.
    pub mirrors: Vec<String>,
    /// Docker's `config.json` (credentials); default `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Where credential helpers (`docker-credential-*`) are looked for: the
    /// client's `PATH`; this process's when unset.
    pub helper_path: Option<std::ffi::OsString>,
    /// Credentials handed over by `HOST[:PORT]`, used instead of Docker's
    /// config file (none of which is read): a push a client asked another
    /// node to make, with the client's credentials for that push only.
    pub given: Option<std::collections::BTreeMap<String, Credential>>,
}

/// Credentials for one registry, as a client hands them to the node that
/// pushes for it. Never printed: its `Debug` says only which kind it is.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Credential {
    /// HTTP basic: a user name and password (or identity token).
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: String,
    },
    /// A bearer token.
    Bearer(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { username, .. } => {
                write!(f, "Basic {{ username: {username:?}, password: <hidden> }}")
            }
            Credential::Bearer(_) => f.write_str("Bearer(<hidden>)"),
        }
    }
}

impl RegistryOptions {
    /// Whether `host` (`HOST[:PORT]`) is spoken to over plain HTTP.
    pub fn is_insecure(&self, host: &str) -> bool {
        let name = host_name(host);
        name == "localhost"
            || name.starts_with("127.")
            || name == "[::1]"
            || self.insecure.iter().any(|i| i == host || i == name)
    }

    /// The mirrors as `HOST[:PORT]`, with the ones given as `http://`
    /// counted as insecure.
    pub(crate) fn mirror_hosts(&self) -> Vec<(String, bool)> {
        self.mirrors
            .iter()
            .map(|m| {
                let (plain, rest) = match m.split_once("://") {
                    Some(("http", r)) => (true, r),
                    Some((_, r)) => (false, r),
                    None => (false, m.as_str()),
                };
                let host = rest.trim_end_matches('/').to_string();
                let insecure = plain || self.is_insecure(&host);
                (host, insecure)
            })
            .collect()
    }

    /// Docker's credentials file.
    pub fn docker_config_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.docker_config {
            return Some(p.clone());
        }
        docker_config_in(&|k| std::env::var(k).ok())
    }
}

/// Docker's credentials file as the environment `env` names it:
/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn docker_config_in(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(dir) = env("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    env("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// `HOST` of `HOST[:PORT]` (IPv6 literals keep their brackets).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()]);
    }
    host.split(':').next().unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_over_credential_never_prints_its_secret() {
        let basic = Credential::Basic {
            username: "ci".into(),
            password: "hunter2".into(),
        };
        let bearer = Credential::Bearer("tok3n".into());
        let shown = format!("{basic:?} {bearer:?}");
        assert!(shown.contains("ci"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok3n"),
            "{shown}"
        );
    }

    #[test]
    fn loopback_and_listed_registries_are_plain_http() {
        let o = RegistryOptions {
            insecure: vec!["registry.lan:5000".into(), "build-cache".into()],
            mirrors: vec!["http://127.0.0.1:5000/".into(), "mirror.example.com".into()],
            docker_config: None,
            helper_path: None,
            given: None,
        };
        assert!(o.is_insecure("127.0.0.1:5000"));
        assert!(o.is_insecure("localhost:5000"));
        assert!(o.is_insecure("[::1]:5000"));
        assert!(o.is_insecure("registry.lan:5000"));
        assert!(o.is_insecure("build-cache:443"));
        assert!(!o.is_insecure("registry.lan:5001"));
        assert!(!o.is_insecure("ghcr.io"));
        assert_eq!(
            o.mirror_hosts(),
            [
                ("127.0.0.1:5000".to_string(), true),
                ("mirror.example.com".to_string(), false)
            ]
        );
    }
}
