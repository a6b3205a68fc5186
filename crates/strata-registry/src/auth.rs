//! Credentials from Docker's `config.json`, so `docker login` works for
//! strata too.
//!
//! Only the `auths` section is read (`auth`, base64 of `user:password`, or
//! `username` and `password`); credential helpers (`credsStore`,
//! `credHelpers`) are programs strata does not run, and a warning says so.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The key Docker files Docker Hub's credentials under.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// `HOST[:PORT]` of an `auths` key (`https://host/v2/`, `host:port`, …).
fn key_host(key: &str) -> &str {
    let rest = key.split_once("://").map_or(key, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// The credentials for `registry` (`HOST[:PORT]`; `docker.io` for Docker
/// Hub) in the config file at `path`; anonymous when the file or an entry
/// is absent.
pub fn credentials(path: Option<&Path>, registry: &str) -> Result<RegistryAuth> {
    let Some(path) = path else {
        return Ok(RegistryAuth::Anonymous);
    };
    let raw = match std::fs::read(path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => {
            return Err(Error::Config(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let config: DockerConfig = serde_json::from_slice(&raw)
        .map_err(|e| Error::Config(format!("{} is not valid JSON: {e}", path.display())))?;
    let is_hub = registry == "docker.io" || registry == "index.docker.io";
    let entry = config.auths.iter().find(|(k, _)| {
        if is_hub {
            k.as_str() == DOCKER_HUB_KEY || matches!(key_host(k), "docker.io" | "index.docker.io")
        } else {
            key_host(k) == registry
        }
    });
    let Some((key, entry)) = entry else {
        if config.creds_store.is_some() || config.cred_helpers.contains_key(registry) {
            tracing::warn!(
                registry,
                config = %path.display(),
                "credentials are kept by a credential helper, which strata does not run; using no credentials"
            );
        }
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(encoded) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                Error::Config(format!(
                    "{}: the auth of {key} is not base64 of user:password",
                    path.display()
                ))
            })?;
        let (user, password) = decoded.split_once(':').ok_or_else(|| {
            Error::Config(format!(
                "{}: the auth of {key} is not user:password",
                path.display()
            ))
        })?;
        return Ok(RegistryAuth::Basic(user.to_string(), password.to_string()));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.clone(), p.clone())),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: RegistryAuth) -> Option<(String, String)> {
        match a {
            RegistryAuth::Basic(u, p) => Some((u, p)),
            _ => None,
        }
    }

    #[test]
    fn reads_docker_login_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths": {
                "127.0.0.1:5001": {"auth": "YWxpY2U6czNjcmV0"},
                "https://registry.example.com/v2/": {"username": "bob", "password": "pw"},
                "https://index.docker.io/v1/": {"auth": "aHViOmh1YnB3"}
            }}"#,
        )
        .unwrap();
        let get = |r: &str| basic(credentials(Some(&path), r).unwrap());
        assert_eq!(
            get("127.0.0.1:5001"),
            Some(("alice".into(), "s3cret".into()))
        );
        assert_eq!(
            get("registry.example.com"),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(get("docker.io"), Some(("hub".into(), "hubpw".into())));
        assert_eq!(get("127.0.0.1:5000"), None);
        assert_eq!(
            basic(credentials(Some(&dir.path().join("none")), "x").unwrap()),
            None
        );

        std::fs::write(&path, r#"{"auths": {"h": {"auth": "%%%"}}}"#).unwrap();
        let e = credentials(Some(&path), "h").unwrap_err().to_string();
        assert!(e.contains("not base64"), "{e}");
        std::fs::write(&path, "{").unwrap();
        let e = credentials(Some(&path), "h").unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }
}
