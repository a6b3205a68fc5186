//! A real distribution registry (Debian's `docker-registry`) on 127.0.0.1
//! for one test, plain or behind htpasswd auth, and a TCP proxy to put in
//! front of it that counts bytes and can break a transfer.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A registry process; stopped on drop.
pub struct Registry {
    _server: crate::Background,
    port: u16,
    _dir: tempfile::TempDir,
}

/// The user and password of a registry started with auth.
pub const USER: &str = "strata";
/// See [`USER`].
pub const PASSWORD: &str = "s3cret-pass";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    /// Starts a registry with empty storage; with `auth`, it wants
    /// [`USER`]/[`PASSWORD`] (HTTP basic, htpasswd with bcrypt).
    pub fn start(auth: bool) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", USER, PASSWORD])
                .output()
                .expect("htpasswd is installed (Debian's apache2-utils)");
            assert!(out.status.success());
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: strata-test\n    path: {}\n",
                path.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let server = crate::Background::start(
            Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path),
            &format!("the registry (Debian's docker-registry) on port {port}"),
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        Registry {
            _server: server,
            port,
            _dir: dir,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Writes a Docker `config.json` holding `user:password` for `host` into
/// `dir`, as `docker login` would.
pub fn docker_login(dir: &Path, host: &str, user: &str, password: &str) {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let json = format!(r#"{{"auths": {{"{host}": {{"auth": "{encoded}"}}}}}}"#);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), json).unwrap();
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`: counts the bytes each
/// way, and on request cuts one response off after some bytes.
pub struct Proxy {
    port: u16,
    to_upstream: Arc<AtomicU64>,
    cut_after: Arc<AtomicU64>,
    armed: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
}

impl Proxy {
    /// Starts proxying to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let to_upstream = Arc::new(AtomicU64::new(0));
        let cut_after = Arc::new(AtomicU64::new(0));
        let armed = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let (up, cut, arm, cut_count) = (
            Arc::clone(&to_upstream),
            Arc::clone(&cut_after),
            Arc::clone(&armed),
            Arc::clone(&cuts),
        );
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = Arc::clone(&up);
                std::thread::spawn(move || pump(client, server, &up, None));
                let down = Arc::new(AtomicU64::new(0));
                let cutter = Cutter {
                    armed: Arc::clone(&arm),
                    after: Arc::clone(&cut),
                    count: Arc::clone(&cut_count),
                };
                std::thread::spawn(move || pump(s2, c2, &down, Some(&cutter)));
            }
        });
        Proxy {
            port,
            to_upstream,
            cut_after,
            armed,
            cuts,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes clients sent through so far.
    pub fn bytes_up(&self) -> u64 {
        self.to_upstream.load(Ordering::SeqCst)
    }

    /// Responses cut off so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::SeqCst)
    }

    /// The first response from now on (on any connection) to pass `bytes`
    /// is cut there.
    pub fn cut_next_response_after(&self, bytes: u64) {
        self.cut_after.store(bytes, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }
}

/// Cuts the first response, on any connection, that passes `after` bytes
/// while `armed`: clients open connections in their own order.
struct Cutter {
    armed: Arc<AtomicBool>,
    after: Arc<AtomicU64>,
    count: Arc<AtomicU64>,
}

/// Copies `from` → `to`, counting; with a cutter, stops where it says and
/// closes both sides (a connection dropped mid-transfer).
fn pump(mut from: TcpStream, mut to: TcpStream, count: &AtomicU64, cutter: Option<&Cutter>) {
    let mut buf = [0u8; 64 * 1024];
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(c) = cutter {
            let limit = c.after.load(Ordering::SeqCst);
            if sent + n as u64 > limit
                && c.armed.load(Ordering::SeqCst)
                && c.armed.swap(false, Ordering::SeqCst)
            {
                let keep = limit.saturating_sub(sent) as usize;
                let _ = to.write_all(&buf[..keep.min(n)]);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                c.count.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        count.fetch_add(n as u64, Ordering::SeqCst);
    }
    let _ = to.shutdown(Shutdown::Write);
}
