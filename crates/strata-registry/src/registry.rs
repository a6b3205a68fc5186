//! The client: which registry an image lives in, over which protocol, with
//! which credentials.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use strata_oci::{DEFAULT_DOMAIN, Reference};

use crate::auth::credentials;
use crate::error::Result;
use crate::options::{Credential, RegistryOptions};

/// Talks to registries on behalf of the image store.
pub struct Registry {
    options: RegistryOptions,
    /// One HTTP client per registry host and protocol, so connections and
    /// tokens are reused across requests.
    clients: Mutex<HashMap<(String, bool), oci_client::Client>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// One place to fetch an image from (or push it to).
pub(crate) struct Endpoint {
    /// `HOST[:PORT]`, for messages (`docker.io` for Docker Hub).
    pub host: String,
    /// The image there.
    pub oci: oci_client::Reference,
    /// A client speaking the right protocol to it.
    pub client: oci_client::Client,
    /// Its credentials.
    pub auth: RegistryAuth,
    /// A Docker Hub mirror, which may lack the image.
    pub mirror: bool,
}

impl Endpoint {
    /// The repository path (`library/alpine`).
    pub fn repository(&self) -> &str {
        self.oci.repository()
    }

    /// The same repository at another digest.
    pub fn at_digest(&self, digest: &str) -> oci_client::Reference {
        oci_client::Reference::with_digest(
            self.oci.registry().to_string(),
            self.oci.repository().to_string(),
            digest.to_string(),
        )
    }
}

impl Registry {
    /// A client with these settings.
    pub fn new(options: RegistryOptions) -> Registry {
        // One crypto provider for the process (ring); installing it again is
        // harmless, and a library cannot know whether its caller did.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Registry {
            options,
            clients: Mutex::default(),
        }
    }

    /// The settings in use.
    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    fn client(&self, host: &str, insecure: bool) -> oci_client::Client {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients
            .entry((host.to_string(), insecure))
            .or_insert_with(|| {
                oci_client::Client::new(ClientConfig {
                    protocol: if insecure {
                        ClientProtocol::Http
                    } else {
                        ClientProtocol::Https
                    },
                    // Blobs go up in one request: the size and digest are
                    // known, and a round trip per chunk only costs time.
                    use_monolithic_push: true,
                    connect_timeout: Some(Duration::from_secs(30)),
                    // A stalled transfer is an error (and retried), not a hang.
                    read_timeout: Some(Duration::from_secs(60)),
                    user_agent: concat!("strata/", env!("CARGO_PKG_VERSION")),
                    ..ClientConfig::default()
                })
            })
            .clone()
    }

    fn endpoint(
        &self,
        host: &str,
        insecure: bool,
        reference: &Reference,
        mirror: bool,
    ) -> Result<Endpoint> {
        let tag = reference
            .tag
            .clone()
            .unwrap_or_else(|| "latest".to_string());
        let oci = match &reference.digest {
            Some(d) => oci_client::Reference::with_digest(
                host.to_string(),
                reference.path.clone(),
                d.clone(),
            ),
            None => oci_client::Reference::with_tag(host.to_string(), reference.path.clone(), tag),
        };
        let auth = match &self.options.given {
            Some(given) => match given.get(host) {
                Some(Credential::Basic { username, password }) => {
                    RegistryAuth::Basic(username.clone(), password.clone())
                }
                Some(Credential::Bearer(token)) => RegistryAuth::Bearer(token.clone()),
                None => RegistryAuth::Anonymous,
            },
            None => credentials(
                self.options.docker_config_path().as_deref(),
                host,
                self.options.helper_path.as_deref(),
            )?,
        };
        Ok(Endpoint {
            host: host.to_string(),
            client: self.client(host, insecure),
            oci,
            auth,
            mirror,
        })
    }

    /// The credentials this client would use for the registry `reference`
    /// names (`None`: anonymous), to hand to a node that pushes for it.
    pub fn credential_for(&self, reference: &Reference) -> Result<Option<Credential>> {
        Ok(match self.home(reference)?.auth {
            RegistryAuth::Anonymous => None,
            RegistryAuth::Basic(username, password) => {
                Some(Credential::Basic { username, password })
            }
            RegistryAuth::Bearer(token) => Some(Credential::Bearer(token)),
        })
    }

    /// The registry `reference` names.
    pub(crate) fn home(&self, reference: &Reference) -> Result<Endpoint> {
        let host = &reference.domain;
        self.endpoint(host, self.options.is_insecure(host), reference, false)
    }

    /// Where to pull `reference` from, in order: for Docker Hub images the
    /// mirrors first, then the registry the name says.
    pub(crate) fn sources(&self, reference: &Reference) -> Result<Vec<Endpoint>> {
        let mut out = Vec::new();
        if reference.domain == DEFAULT_DOMAIN {
            for (host, insecure) in self.options.mirror_hosts() {
                out.push(self.endpoint(&host, insecure, reference, true)?);
            }
        }
        out.push(self.home(reference)?);
        Ok(out)
    }
}
