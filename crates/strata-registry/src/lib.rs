//! Registries: the OCI distribution API, as a client of the image store.
//!
//! * [`Registry::pull`] resolves a reference (an index picks the platform),
//!   fetches the config and the layers in parallel (sha256 checked as they
//!   stream, broken downloads resumed, layers already stored skipped) and
//!   stores the image as the image store keeps every image: uncompressed
//!   layers, the compressed forms kept beside them for pushing again.
//! * [`Registry::push`] sends an image: blobs the registry has are skipped
//!   (a HEAD, or a cross-repository mount), the manifest goes last.
//! * [`RegistryOptions`]: plain-HTTP registries, mirrors for Docker Hub,
//!   and Docker's credentials file ([`auth`]).
//!
//! The protocol itself (token flow, chunked uploads, range requests) is
//! oci-client's; this crate decides what to fetch and send and where it
//! goes. It knows nothing of builds.

pub mod auth;
mod error;
mod options;
mod progress;
mod pull;
mod push;
mod registry;

pub use error::{Error, Result, error_chain};
pub use options::{Credential, RegistryOptions, docker_config_in};
pub use progress::Transfer;
pub use pull::{Platform, Pulled};
pub use push::Pushed;
pub use registry::Registry;
