//! The examples the README shows, built from base images pulled through a
//! local registry seeded the way `scripts/demo` seeds it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_integration::registry::Registry;
use strata_integration::{Strata, base_image_tar, repo_root};

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

#[test]
fn the_node_site_is_served_by_nginx_and_carries_no_node() {
    const SITE: &str = "http://127.0.0.1:8080/";
    assert!(
        fetch(SITE).is_none(),
        "something already answers on {SITE}; the example's nginx needs that port"
    );
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

    let mut server = s
        .cmd()
        .args(["run", "--rm", "site:multistage"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let page = loop {
        if let Some(page) = fetch(SITE) {
            break page;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nginx did not answer on {SITE}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let css = fetch(&format!("{SITE}style.css"));
    Command::new("kill")
        .args(["-INT", &server.id().to_string()])
        .status()
        .unwrap();
    let _ = server.wait();
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
