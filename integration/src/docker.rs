//! A real dockerd (Debian's docker.io, with its BuildKit) for tests that
//! compare against `docker build` or load strata's images into Docker.
//!
//! One daemon serves every test on the machine: its socket is
//! `/run/strata-test-docker.sock` and its data lives under
//! `/var/cache/strata/docker`, so images loaded once stay loaded. It is
//! started on first use (or by `.ci/run`) and left running.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The test daemon's socket.
pub const SOCKET: &str = "/run/strata-test-docker.sock";

/// A client for the shared test daemon.
#[derive(Debug, Clone)]
pub struct Docker {
    host: String,
}

impl Docker {
    /// The shared daemon, started if it is not running.
    pub fn shared() -> Docker {
        static STARTED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
        let d = Docker {
            host: format!("unix://{SOCKET}"),
        };
        STARTED.get_or_init(|| {
            if d.ping() {
                return;
            }
            let data = Path::new("/var/cache/strata/docker");
            std::fs::create_dir_all(data).unwrap();
            let log = std::fs::File::create("/var/cache/strata/docker.log").unwrap();
            // `setsid -f` forks the daemon off and returns at once: the
            // daemon outlives the tests, and nothing is left to wait for.
            // It runs from `/`: a working directory in this checkout would
            // vanish with it, and BuildKit's git then fails in every later
            // run.
            let started = Command::new("setsid")
                .current_dir("/")
                .args([
                    "-f",
                    "dockerd",
                    "-H",
                    &d.host,
                    "--storage-driver=overlay2",
                    "--pidfile",
                    "/run/strata-test-docker.pid",
                ])
                .arg("--data-root")
                .arg(data)
                .args(["--exec-root", "/run/strata-test-docker"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .status()
                .expect("dockerd is installed (Debian's docker.io)");
            assert!(started.success(), "cannot start dockerd");
            let start = Instant::now();
            while !d.ping() {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "dockerd did not start; see /var/cache/strata/docker.log"
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        d
    }

    fn ping(&self) -> bool {
        self.cmd()
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Where the daemon listens (`unix://…`), as `DOCKER_HOST` names it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// A `docker` command for this daemon: Debian's 20.10 client, whose
    /// built-in BuildKit client works (`/usr/local/bin/docker` lacks buildx).
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("/usr/bin/docker");
        c.args(["-H", &self.host]).env("DOCKER_BUILDKIT", "1");
        c
    }

    /// Runs `docker ARGS`, failing the test unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "docker {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Loads busybox (the same rootfs strata tests use) as `names`.
    pub fn load_busybox(&self, names: &[&str]) {
        let tar = crate::busybox_tar();
        let first = names[0];
        let have = self
            .cmd()
            .args(["image", "inspect", first])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            self.ok(&["import", tar.to_str().unwrap(), first]);
        }
        for n in &names[1..] {
            self.ok(&["tag", first, n]);
        }
    }
}
