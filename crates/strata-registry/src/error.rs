//! Errors of registry operations, worded for the user who has to act.

use oci_client::errors::OciDistributionError;

/// Why a pull or push failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry refused the credentials, or wants some.
    #[error(
        "{registry} refused access to {repository} ({detail}): log in with `docker login {registry}` (strata reads ~/.docker/config.json) or check the password"
    )]
    Unauthorized {
        /// `HOST[:PORT]`.
        registry: String,
        /// The repository.
        repository: String,
        /// What the registry said.
        detail: String,
    },
    /// The image or tag is not in the registry.
    #[error("{reference} not found in {registry}: check the name and tag")]
    NotFound {
        /// The image asked for.
        reference: String,
        /// `HOST[:PORT]`.
        registry: String,
    },
    /// The registry could not be reached or answered with an error.
    #[error("{registry}: {detail}")]
    Registry {
        /// `HOST[:PORT]`.
        registry: String,
        /// What went wrong.
        detail: String,
    },
    /// What the registry sent is not a usable image.
    #[error("{reference}: {detail}")]
    Format {
        /// The image.
        reference: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Settings or credentials could not be read.
    #[error("{0}")]
    Config(String),
    /// The local stores failed.
    #[error(transparent)]
    Store(#[from] strata_oci::Error),
}

impl From<strata_cas::Error> for Error {
    fn from(e: strata_cas::Error) -> Self {
        Error::Store(strata_oci::Error::from(e))
    }
}

/// The registry operations' result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line. HTTP clients (reqwest under
/// oci-client, and under `ADD <url>`) keep the useful part ("connection
/// refused", "dns error") in the sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

/// Words an oci-client error for the user, given what was being done.
pub(crate) fn from_oci(
    e: OciDistributionError,
    registry: &str,
    repository: &str,
    reference: &str,
) -> Error {
    use OciDistributionError as E;
    let status = match &e {
        E::ServerError { code, .. } => Some(*code),
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => Some(401),
        E::RequestError(r) => r.status().map(|s| s.as_u16()),
        E::RegistryError { envelope, .. } => {
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|x| format!("{:?}", x.code))
                .collect();
            if codes.iter().any(|c| c == "Unauthorized" || c == "Denied") {
                Some(401)
            } else if codes
                .iter()
                .any(|c| c.contains("Unknown") && (c.contains("Manifest") || c.contains("Name")))
            {
                Some(404)
            } else {
                None
            }
        }
        E::ImageManifestNotFoundError(_) => Some(404),
        _ => None,
    };
    match status {
        Some(401 | 403) => Error::Unauthorized {
            registry: registry.to_string(),
            repository: repository.to_string(),
            detail: error_chain(&e),
        },
        Some(404) => Error::NotFound {
            reference: reference.to_string(),
            registry: registry.to_string(),
        },
        _ => Error::Registry {
            registry: registry.to_string(),
            detail: error_chain(&e),
        },
    }
}
