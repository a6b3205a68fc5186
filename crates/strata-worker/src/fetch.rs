//! `ADD <url>`: files downloaded over HTTP(S) into the content store.
//!
//! A download is a blob like any other, so a file fetched once is not
//! fetched again while it is stored: with `--checksum` the step's key comes
//! from the checksum alone (as in BuildKit), and a fully cached build needs
//! no network at all; without one, the content is downloaded to learn its
//! digest, which is what keys the step.

use std::io;

use strata_cas::{ContentStore, Digest, Sha256};
use strata_plan::RemoteFile;

use crate::error::AddError;

/// The label recording a download's `Last-Modified` time (seconds since
/// the epoch), which becomes the file's mtime as in BuildKit.
const LAST_MODIFIED: &str = "http.last-modified";

/// A downloaded file, in the content store (the caller leases it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Download {
    /// The blob holding the bytes.
    pub blob: Digest,
    /// The modification time the file gets.
    pub mtime: i64,
}

/// The file's content in the store: the stored blob with the expected
/// checksum if there is one, else downloaded now.
pub fn fetch(content: &ContentStore, file: &RemoteFile) -> Result<Download, AddError> {
    let store_err = |source| AddError::Store {
        url: file.url.clone(),
        source: Box::new(source),
    };
    if let Some(sha) = file
        .sha256
        .as_deref()
        .and_then(|h| Sha256::from_hex(h).ok())
        && let Some(blob) = content.by_sha256(&sha).map_err(store_err)?
        && let Some(info) = content.info(&blob).map_err(store_err)?
    {
        return Ok(Download {
            blob,
            mtime: mtime_label(&info.labels),
        });
    }
    let (blob, mtime) = download(content, file)?;
    if let Some(t) = mtime {
        content
            .set_label(&blob, LAST_MODIFIED, Some(&t.to_string()))
            .map_err(store_err)?;
    }
    check(
        content,
        file,
        Download {
            blob,
            mtime: mtime.unwrap_or(0),
        },
    )
}

/// `d` if its content has the checksum `file` names (or names none).
pub fn check(content: &ContentStore, file: &RemoteFile, d: Download) -> Result<Download, AddError> {
    let Some(hex) = &file.sha256 else {
        return Ok(d);
    };
    let info = content
        .info(&d.blob)
        .map_err(|source| AddError::Store {
            url: file.url.clone(),
            source: Box::new(source),
        })?
        .ok_or_else(|| AddError::Gone {
            url: file.url.clone(),
        })?;
    if info.sha256.hex() != *hex {
        return Err(AddError::Checksum {
            url: file.url.clone(),
            expected: hex.clone(),
            got: info.sha256.hex(),
        });
    }
    Ok(d)
}

fn mtime_label(labels: &std::collections::BTreeMap<String, String>) -> i64 {
    labels
        .get(LAST_MODIFIED)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// GETs the URL into the store; returns the blob and the `Last-Modified`
/// time, if the server sent one.
fn download(content: &ContentStore, file: &RemoteFile) -> Result<(Digest, Option<i64>), AddError> {
    // One crypto provider for the process (ring); installing it twice is
    // harmless, and a library cannot know whether its caller did.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = &file.url;
    // A client per download: a blocking client must be dropped outside the
    // async runtime, and downloads run on blocking threads.
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!("strata/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|source| AddError::Client {
            url: url.clone(),
            source,
        })?;
    tracing::debug!(%url, "downloading");
    let mut resp = client
        .get(url.as_str())
        .send()
        .map_err(|source| AddError::Get {
            url: url.clone(),
            source,
        })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(AddError::Status {
            url: url.clone(),
            status,
        });
    }
    let mtime = resp
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_secs()).ok());
    let store_err = |source| AddError::Store {
        url: url.clone(),
        source: Box::new(source),
    };
    let mut w = content.writer().map_err(store_err)?;
    io::copy(&mut resp, &mut w).map_err(|source| AddError::Body {
        url: url.clone(),
        source,
    })?;
    let blob = w.commit().map_err(store_err)?;
    Ok((blob, mtime))
}
