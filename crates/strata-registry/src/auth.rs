//! Credentials from Docker's `config.json`, so `docker login` works for
//! strata too.
//!
//! As Docker resolves them: a registry's own helper (`credHelpers`), else
//! the store every registry uses (`credsStore`), else the `auths` entry
//! (`auth`, base64 of `user:password`, or `username` and `password`).
//! A helper is the program `docker-credential-NAME` on the client's
//! `PATH`, asked with `get`: the ECR, GCR and desktop keychain helpers
//! work unchanged. Nothing a helper returns is stored.

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

/// How long a credential helper may take.
const HELPER_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The most a helper may print: a bound on what a broken one costs.
const HELPER_OUTPUT: u64 = 1 << 20;

/// Asks the credential helper `name` (the program `docker-credential-NAME`
/// on `search`, a `PATH`) for `server`'s credentials: `None` when it has
/// none.
fn from_helper(
    name: &str,
    server: &str,
    search: Option<&std::ffi::OsStr>,
) -> Result<Option<RegistryAuth>> {
    use std::io::{Read as _, Write as _};
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(Error::Config(format!(
            "credential helper {name:?} is not a helper's name"
        )));
    }
    let program = format!("docker-credential-{name}");
    let found = search
        .map(std::borrow::ToOwned::to_owned)
        .or_else(|| std::env::var_os("PATH"))
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(&program))
                .find(|c| c.is_file())
        })
        .ok_or_else(|| {
            Error::Config(format!(
                "the credential helper {program} for {server} is not on PATH"
            ))
        })?;
    let mut child = std::process::Command::new(&found)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::Config(format!("cannot run {}: {e}", found.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let reading = std::thread::spawn(move || {
        if let Some(s) = stdout {
            let _ = s.take(HELPER_OUTPUT).read_to_end(&mut out);
        }
        if let Some(s) = stderr {
            let _ = s.take(HELPER_OUTPUT).read_to_end(&mut err);
        }
        (out, err)
    });
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < HELPER_LIMIT => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Config(format!(
                    "the credential helper {program} did not answer within {HELPER_LIMIT:?}"
                )));
            }
            Err(e) => return Err(Error::Config(format!("{program}: {e}"))),
        }
    };
    let (out, err) = reading.join().unwrap_or_default();
    if !status.success() {
        let said = String::from_utf8_lossy(if out.is_empty() { &err } else { &out })
            .trim()
            .to_string();
        // Docker's helpers say this for a registry they hold nothing for.
        if said.contains("credentials not found") {
            return Ok(None);
        }
        return Err(Error::Config(format!(
            "the credential helper {program} failed for {server}: {said}"
        )));
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let a: Answer = serde_json::from_slice(&out).map_err(|e| {
        Error::Config(format!(
            "the credential helper {program} gave no credentials it can read: {e}"
        ))
    })?;
    Ok(Some(RegistryAuth::Basic(a.username, a.secret)))
}

/// The credentials for `registry` (`HOST[:PORT]`; `docker.io` for Docker
/// Hub) in the config file at `path`, helpers searched on `search` (a
/// `PATH`; this process's when `None`); anonymous when the file or an
/// entry is absent.
pub fn credentials(
    path: Option<&Path>,
    registry: &str,
    search: Option<&std::ffi::OsStr>,
) -> Result<RegistryAuth> {
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
    // Helpers name Docker Hub by its old address, as `docker login` did.
    let server = if is_hub { DOCKER_HUB_KEY } else { registry };
    let helper = config
        .cred_helpers
        .iter()
        .find(|(k, _)| key_host(k) == registry || (is_hub && key_host(k) == "index.docker.io"))
        .map(|(_, v)| v)
        .or(config.creds_store.as_ref());
    if let Some(name) = helper {
        return Ok(from_helper(name, server, search)?.unwrap_or(RegistryAuth::Anonymous));
    }
    let entry = config.auths.iter().find(|(k, _)| {
        if is_hub {
            k.as_str() == DOCKER_HUB_KEY || matches!(key_host(k), "docker.io" | "index.docker.io")
        } else {
            key_host(k) == registry
        }
    });
    let Some((key, entry)) = entry else {
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

    #[test]
    fn credential_helpers_come_first_as_in_docker() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        // A helper answering for one server, as the ECR and GCR ones do.
        let helper = |name: &str, body: &str| {
            let p = bin.join(format!("docker-credential-{name}"));
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        helper(
            "ecr",
            r#"read s; [ "$1" = get ] && [ "$s" = "123.dkr.ecr.example.com" ] && echo '{"ServerURL":"x","Username":"AWS","Secret":"tok"}' && exit 0; echo "credentials not found in native keychain"; exit 1"#,
        );
        helper(
            "desktop",
            r#"read s; [ "$s" = "https://index.docker.io/v1/" ] && echo '{"Username":"me","Secret":"hub"}' && exit 0; echo "credentials not found in native keychain"; exit 1"#,
        );
        helper("broken", "echo 'the keychain is locked' >&2; exit 1");
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths": {"other.example.com": {"auth": "dTpw"}, "123.dkr.ecr.example.com": {}},
                "credHelpers": {"123.dkr.ecr.example.com": "ecr", "locked.example.com": "broken"},
                "credsStore": "desktop"}"#,
        )
        .unwrap();
        let search = bin.clone().into_os_string();
        let get = |r: &str| credentials(Some(&path), r, Some(&search));
        assert_eq!(
            basic(get("123.dkr.ecr.example.com").unwrap()),
            Some(("AWS".into(), "tok".into()))
        );
        assert_eq!(
            basic(get("docker.io").unwrap()),
            Some(("me".into(), "hub".into()))
        );
        // The store answers for every registry without a helper of its
        // own, even one with an auths entry (Docker's order).
        assert_eq!(basic(get("other.example.com").unwrap()), None);
        let e = get("locked.example.com").unwrap_err().to_string();
        assert!(
            e.contains("docker-credential-broken") && e.contains("the keychain is locked"),
            "{e}"
        );
        // A helper that is not there is named.
        let e = credentials(
            Some(&path),
            "docker.io",
            Some(std::ffi::OsStr::new("/nonexistent")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("docker-credential-desktop") && e.contains("not on PATH"),
            "{e}"
        );
    }

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
        let get = |r: &str| basic(credentials(Some(&path), r, None).unwrap());
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
            basic(credentials(Some(&dir.path().join("none")), "x", None).unwrap()),
            None
        );

        std::fs::write(&path, r#"{"auths": {"h": {"auth": "%%%"}}}"#).unwrap();
        let e = credentials(Some(&path), "h", None).unwrap_err().to_string();
        assert!(e.contains("not base64"), "{e}");
        std::fs::write(&path, "{").unwrap();
        let e = credentials(Some(&path), "h", None).unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }
}
