//! A small HTTP/1.1 file server on 127.0.0.1 for `ADD <url>` tests: fixed
//! bodies by path, a `Last-Modified` header, and a count of requests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The server; it stops with the test process.
pub struct FileServer {
    port: u16,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    requests: Arc<AtomicUsize>,
}

/// What every response says the files' modification time is.
pub const LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";
/// The same time in seconds since the epoch.
pub const LAST_MODIFIED_UNIX: i64 = 1_445_412_480;

impl FileServer {
    /// Starts serving on a free port.
    pub fn start() -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let (f, r) = (Arc::clone(&files), Arc::clone(&requests));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream);
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                // Headers up to the blank line; bodies are not expected.
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                r.fetch_add(1, Ordering::SeqCst);
                let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
                // A query is ignored unless a body was put with it, as a
                // static server does (git's dumb protocol asks for
                // `info/refs?service=…`).
                let body = {
                    let files = f.lock().unwrap();
                    files
                        .get(&path)
                        .or_else(|| files.get(path.split('?').next().unwrap_or("")))
                        .cloned()
                };
                let mut stream = reader.into_inner();
                let _ = match body {
                    Some(b) => write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: {LAST_MODIFIED}\r\nConnection: close\r\n\r\n",
                        b.len()
                    )
                    .and_then(|()| stream.write_all(&b)),
                    None => write!(
                        stream,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    ),
                };
            }
        });
        FileServer {
            port,
            files,
            requests,
        }
    }

    /// Serves `body` at `path` (which starts with `/`).
    pub fn put(&self, path: &str, body: &[u8]) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), body.to_vec());
    }

    /// The URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// `GET http://ADDR/PATH` with nothing but the standard library: the
/// status code and the body.
pub fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
