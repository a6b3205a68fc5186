//! The local Docker engine, for `strata build --load`: the image goes to it
//! as `docker load` sends one (`POST /images/load` with a `docker save`
//! archive), at `DOCKER_HOST` or `/var/run/docker.sock`, as buildx finds
//! it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures_util::TryStreamExt as _;
use http_body_util::BodyExt as _;
use strata_oci::{Image, Reference};

use crate::cx::Cx;

/// Where the engine listens when `DOCKER_HOST` does not say.
const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";
/// How long reaching the engine may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of the engine's answer that is read.
const MAX_ANSWER: usize = 1 << 20;

/// Where the engine is.
#[derive(Debug, Clone, PartialEq)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    fn parse(host: &str) -> Result<Endpoint> {
        if let Some(path) = host.strip_prefix("unix://") {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = host.strip_prefix("tcp://") {
            let addr = addr.trim_end_matches('/');
            if addr.is_empty() {
                bail!("DOCKER_HOST={host:?} names no address");
            }
            return Ok(Endpoint::Tcp(addr.to_string()));
        }
        bail!(
            "DOCKER_HOST={host:?}: --load reaches a Docker engine at unix://PATH or tcp://HOST:PORT"
        )
    }
}

/// Loads `image`, named `tags`, into the Docker engine the client's
/// environment names.
pub async fn load(cx: &Cx, image: &Image, tags: &[Reference]) -> Result<()> {
    let host = cx
        .session
        .env("DOCKER_HOST")
        .filter(|h| !h.is_empty())
        .unwrap_or(DEFAULT_HOST)
        .to_string();
    let endpoint = Endpoint::parse(&host)?;
    if matches!(endpoint, Endpoint::Tcp(_))
        && cx
            .session
            .env("DOCKER_TLS_VERIFY")
            .is_some_and(|v| !v.is_empty())
    {
        bail!(
            "--load: DOCKER_HOST={host} asks for TLS (DOCKER_TLS_VERIFY), which strata does not speak to a Docker engine; use its unix socket"
        );
    }
    let (image, tags) = (image.clone(), tags.to_vec());
    let (tmp, archive) = cx
        .blocking(move |cx| {
            let tmp = tempfile::Builder::new()
                .prefix("load-")
                .tempdir_in(cx.node.home().join("tmp"))
                .context("cannot make a scratch directory")?;
            let archive = tmp.path().join("image.tar");
            strata_oci::export_docker_archive(&cx.node.content, &image, &tags, &archive)
                .context("cannot write the image for the Docker engine")?;
            Ok((tmp, archive))
        })
        .await?;
    let answer = post_archive(&endpoint, &archive)
        .await
        .with_context(|| {
            format!(
                "cannot load the image into the Docker engine at {host} (it is in strata's image store: strata images)"
            )
        })?;
    drop(tmp);
    let mut err = cx.err();
    for line in answer {
        writeln!(err, "{line}")?;
    }
    Ok(())
}

/// Sends the archive to the engine; its messages (`Loaded image: …`).
async fn post_archive(endpoint: &Endpoint, archive: &Path) -> Result<Vec<String>> {
    match endpoint {
        Endpoint::Unix(path) => {
            let stream =
                tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(path))
                    .await
                    .context("no answer in 10 s")?
                    .with_context(|| format!("cannot connect to {}", path.display()))?;
            send(stream, archive).await
        }
        Endpoint::Tcp(addr) => {
            let stream =
                tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                    .context("no answer in 10 s")?
                    .with_context(|| format!("cannot connect to {addr}"))?;
            send(stream, archive).await
        }
    }
}

async fn send<S>(stream: S, archive: &Path) -> Result<Vec<String>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("the engine did not answer as an HTTP server")?;
    let driver = tokio::spawn(connection);
    let file = tokio::fs::File::open(archive)
        .await
        .with_context(|| format!("cannot read {}", archive.display()))?;
    let len = file.metadata().await?.len();
    let body = http_body_util::StreamBody::new(
        tokio_util::io::ReaderStream::new(file).map_ok(hyper::body::Frame::data),
    );
    let request = hyper::Request::post("/images/load")
        .header(hyper::header::HOST, "docker")
        .header(hyper::header::CONTENT_TYPE, "application/x-tar")
        .header(hyper::header::CONTENT_LENGTH, len)
        .body(body)?;
    let response = sender
        .send_request(request)
        .await
        .context("the engine closed the connection")?;
    let status = response.status();
    let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the engine's answer: {e}"))?
        .to_bytes();
    driver.abort();
    let messages = messages(&bytes)?;
    if !status.is_success() {
        bail!(
            "the engine answered {status}: {}",
            String::from_utf8_lossy(&bytes).trim()
        );
    }
    Ok(messages)
}

/// The engine's answer to a load: JSON messages, one a line, with
/// `stream` text or an `error`.
fn messages(answer: &[u8]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for line in answer.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            bail!("the engine refused the image: {e}");
        }
        if let Some(text) = v.get("stream").and_then(|s| s.as_str()) {
            out.extend(text.lines().filter(|l| !l.is_empty()).map(str::to_string));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_as_docker_names_them() {
        assert_eq!(
            Endpoint::parse("unix:///run/docker.sock").unwrap(),
            Endpoint::Unix("/run/docker.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:2375").unwrap(),
            Endpoint::Tcp("127.0.0.1:2375".into())
        );
        assert!(Endpoint::parse("ssh://host").is_err());
        assert!(Endpoint::parse("tcp://").is_err());
    }

    #[test]
    fn the_engine_s_messages_and_errors() {
        let ok = b"{\"stream\":\"Loaded image: app:1\\n\"}\r\n";
        assert_eq!(messages(ok).unwrap(), ["Loaded image: app:1"]);
        let refused = b"{\"errorDetail\":{\"message\":\"bad\"},\"error\":\"bad\"}\n";
        assert!(messages(refused).unwrap_err().to_string().contains("bad"));
    }
}
