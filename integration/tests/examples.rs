//! The examples the README shows, built from base images pulled through a
//! local registry seeded the way `scripts/demo` seeds it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_integration::registry::Registry;
use strata_integration::{Strata, base_image_tar, copy_tree, repo_root};

/// A registry holding `images` (`name:tag` = base image) under
/// `library/`, as Docker Hub would.
fn seeded(images: &[(&str, &str)]) -> Registry {
    let reg = Registry::start(false);
    let seed = Strata::new();
    for (name, base) in images {
        let target = format!("{}/library/{name}", reg.host());
        let tar = base_image_tar(base);
        seed.ok(&["image", "import", &target, tar.to_str().unwrap()]);
        seed.ok(&["push", "--progress", "quiet", &target]);
    }
    reg
}

fn build_through(s: &Strata, reg: &Registry, args: &[&str]) {
    let out = s
        .cmd()
        .env("STRATA_REGISTRY_MIRRORS", format!("http://{}", reg.host()))
        .args(["build", "--progress", "plain"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fetch(url: &str) -> Option<String> {
    let out = Command::new("curl").args(["-sf", url]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the example's nginx listens.
const SITE: &str = "http://127.0.0.1:8080/";

/// Runs the site `image` of `s`, waits (bounded) for nginx to answer, runs
/// `visit` while it serves, then stops it.
fn serving<T>(s: &Strata, image: &str, visit: impl FnOnce() -> T) -> T {
    assert!(
        fetch(SITE).is_none(),
        "something already answers on {SITE}; the example's nginx needs that port"
    );
    let mut server = s
        .cmd()
        .args(["run", "--rm", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while fetch(SITE).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nginx did not answer on {SITE}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = visit();
    Command::new("kill")
        .args(["-INT", &server.id().to_string()])
        .status()
        .unwrap();
    let _ = server.wait();
    // The port is free again before the next server starts.
    let start = Instant::now();
    while fetch(SITE).is_some() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    seen
}

/// A GET of the site's page as a browser revalidating makes it: with
/// `If-None-Match` when it has an ETag. Returns the status, the ETag and
/// `Last-Modified` headers, and the body.
fn get_page(if_none_match: Option<&str>) -> (u16, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let mut curl = Command::new("curl");
    curl.args(["-s", "-D"]).arg(&head).arg("-o").arg(&body);
    if let Some(tag) = if_none_match {
        curl.args(["-H", &format!("If-None-Match: {tag}")]);
    }
    assert!(curl.arg(SITE).status().unwrap().success());
    let head = std::fs::read_to_string(head).unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        header("ETag"),
        header("Last-Modified"),
        std::fs::read_to_string(body).unwrap(),
    )
}

#[test]
fn the_node_site_is_served_by_nginx_and_carries_no_node() {
    let reg = seeded(&[("node:18", "node"), ("nginx:1.22", "nginx")]);
    let s = Strata::new();
    build_through(
        &s,
        &reg,
        &[
            "-t",
            "site:multistage",
            repo_root()
                .join("examples/multistage-node")
                .to_str()
                .unwrap(),
        ],
    );

    let (page, css) = serving(&s, "site:multistage", || {
        (
            fetch(SITE).unwrap_or_default(),
            fetch(&format!("{SITE}style.css")),
        )
    });
    assert!(
        page.contains("<h1>Hello, Docker Multi-Stage Build!</h1>"),
        "{page}"
    );
    assert!(page.contains("<li><b>builder</b>"), "{page}");
    assert!(page.contains("Built with Node.js v18"), "{page}");
    assert!(css.is_some_and(|c| c.contains("font-family")));

    // The runtime image has nginx and the built files, and no Node.js.
    let probe = s.ok(&[
        "run",
        "--rm",
        "site:multistage",
        "sh",
        "-c",
        "command -v node nodejs npm || echo no node; cat /var/www/html/style.css",
    ]);
    assert_eq!(
        probe,
        format!(
            "no node\n{}",
            std::fs::read_to_string(repo_root().join("examples/multistage-node/src/style.css"))
                .unwrap()
        )
    );
}

#[test]
fn the_go_example_is_far_smaller_in_two_stages() {
    let reg = seeded(&[("golang:1.19", "golang"), ("alpine:latest", "busybox")]);
    let s = Strata::new();
    let ctx = repo_root().join("examples/multistage-go");
    build_through(&s, &reg, &["-t", "myapp:multistage", ctx.to_str().unwrap()]);
    build_through(
        &s,
        &reg,
        &[
            "-t",
            "myapp:single",
            "-f",
            ctx.join("Dockerfile.single").to_str().unwrap(),
            ctx.to_str().unwrap(),
        ],
    );
    assert_eq!(
        s.ok(&["run", "--rm", "myapp:multistage"]),
        "Hello, Docker Multi-Stage Build!\n"
    );
    assert_eq!(
        s.ok(&["run", "--rm", "myapp:single"]),
        "Hello, Docker Multi-Stage Build!\n"
    );
    let images = s.ok(&["images"]);
    let size = |tag: &str| -> String {
        images
            .lines()
            .find(|l| l.starts_with("myapp") && l.split_whitespace().nth(1) == Some(tag))
            .and_then(|l| l.split_whitespace().last())
            .unwrap()
            .to_string()
    };
    assert!(
        size("multistage").ends_with("MB") && size("single").ends_with("MB"),
        "{images}"
    );
    let mb = |s: String| s.trim_end_matches("MB").parse::<f64>().unwrap();
    assert!(
        mb(size("single")) > 50.0 * mb(size("multistage")),
        "{images}"
    );
}

#[test]
fn a_same_length_edit_of_the_site_is_served_with_a_new_etag() {
    // nginx derives a page's ETag and Last-Modified from its file's time
    // and size: a rebuilt page must carry a new time, or browsers and CDNs
    // revalidating keep the old page.
    let reg = seeded(&[("node:18", "node"), ("nginx:1.22", "nginx")]);
    let s = Strata::new();
    let site = tempfile::tempdir().unwrap();
    copy_tree(&repo_root().join("examples/multistage-node"), site.path());
    let ctx = site.path().to_str().unwrap();
    build_through(&s, &reg, &["-t", "site:1", ctx]);
    let (status, etag, modified, page) = serving(&s, "site:1", || get_page(None));
    assert_eq!(status, 200);
    assert!(page.contains("<h1>Hello, Docker"), "{page}");
    assert!(!etag.is_empty() && !modified.is_empty());

    // The same number of bytes, other words: as a version string 1.2.3 →
    // 1.2.4 would be.
    let index = site.path().join("src/index.html");
    let html = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, html.replace("<h1>Hello,", "<h1>Howdy,")).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    build_through(&s, &reg, &["-t", "site:2", ctx]);
    let ((status, new_etag, new_modified, new_page), revalidated) =
        serving(&s, "site:2", || (get_page(None), get_page(Some(&etag))));
    assert_eq!(status, 200);
    assert_eq!(new_page.len(), page.len());
    assert!(new_page.contains("<h1>Howdy, Docker"), "{new_page}");
    assert_ne!(new_etag, etag, "the edited page kept its ETag");
    assert_ne!(new_modified, modified);
    // A browser holding the old page gets the new one, not 304.
    assert_eq!(revalidated.0, 200);
    assert!(revalidated.3.contains("<h1>Howdy, Docker"));
}
