//! Pulling and pushing a large image through a real registry (Debian's
//! docker-registry on 127.0.0.1), strata against skopeo, in the same run:
//!
//! * pull: `strata pull` into an empty state directory against
//!   `skopeo copy docker://… oci:DIR` into an empty directory;
//! * push of layers already compressed (kept from the pull) against
//!   skopeo copying its OCI layout, each to an empty registry;
//! * push with compression: an image whose layers have no gzip form yet
//!   (loaded from a `docker save` archive) against `skopeo copy
//!   docker-archive:… docker://…`, which compresses too.
//!
//! The image: Debian with golang-go (one 600 MB layer) plus three layers
//! of 40 MB of random bytes. Prints medians and strata/skopeo ratios.
//! Needs root, docker-registry and skopeo; run it with `scripts/bench`.
//! `STRATA_BENCH_RUNS` sets the runs per case (default 3).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Row, median, print_table, runs, strata_release_bin, time};
use strata_integration::registry::Registry;
use strata_integration::{Strata, base_image_tar, write_files};

fn strata(bin: &Path, home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.env("STRATA_HOME", home).args(args);
    c
}

fn skopeo(args: &[&str]) -> Command {
    let mut c = Command::new("skopeo");
    c.args(args);
    c
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("registry_vs_skopeo: benchmark");
        return;
    }
    let runs = runs(3);
    let bin = strata_release_bin();
    let source = Registry::start(false);
    let image = format!("{}/bench/big:1", source.host());

    // The image, built once and pushed to the source registry.
    let builder = Strata::new();
    let golang = base_image_tar("golang");
    time(strata(
        &bin,
        builder.home(),
        &["image", "import", "golang:1.19", golang.to_str().unwrap()],
    ));
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM golang:1.19\n\
             RUN head -c 40000000 /dev/urandom > /data-1\n\
             RUN head -c 40000000 /dev/urandom > /data-2\n\
             RUN head -c 40000000 /dev/urandom > /data-3\n",
        )],
    );
    time(strata(
        &bin,
        builder.home(),
        &[
            "build",
            "--progress",
            "quiet",
            "-t",
            &image,
            ctx.path().to_str().unwrap(),
        ],
    ));
    time(strata(
        &bin,
        builder.home(),
        &["push", "--progress", "quiet", &image],
    ));
    let archive = ctx.path().join("big.tar");
    time(strata(
        &bin,
        builder.home(),
        &["save", "-o", archive.to_str().unwrap(), &image],
    ));
    eprintln!("image: 4 layers, {} MB uncompressed", {
        let out = Command::new(&bin)
            .env("STRATA_HOME", builder.home())
            .args(["images"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains("bench/big"))
            .and_then(|l| l.split_whitespace().last().map(str::to_string))
            .unwrap_or_default()
    });

    let (mut pull_s, mut pull_k, mut push_s, mut push_k, mut zpush_s, mut zpush_k) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        eprintln!("  run {}/{runs}", i + 1);
        // Pull.
        let home = Strata::new();
        pull_s.push(time(strata(
            &bin,
            home.home(),
            &["pull", "--progress", "quiet", &image],
        )));
        let layout = tempfile::tempdir().unwrap();
        let oci = format!("oci:{}:big", layout.path().display());
        pull_k.push(time(skopeo(&[
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &oci,
        ])));

        // Push what was pulled, to empty registries.
        let target = Registry::start(false);
        let dest = format!("{}/bench/big:1", target.host());
        push_s.push(time(strata(
            &bin,
            home.home(),
            &["push", "--progress", "quiet", &image, &dest],
        )));
        let target = Registry::start(false);
        push_k.push(time(skopeo(&[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &oci,
            &format!("docker://{}/bench/big:1", target.host()),
        ])));

        // Push layers that have to be compressed first.
        let fresh = Strata::new();
        time(strata(
            &bin,
            fresh.home(),
            &["load", "-i", archive.to_str().unwrap()],
        ));
        let target = Registry::start(false);
        let dest = format!("{}/bench/big:1", target.host());
        zpush_s.push(time(strata(
            &bin,
            fresh.home(),
            &["push", "--progress", "quiet", &image, &dest],
        )));
        let target = Registry::start(false);
        zpush_k.push(time(skopeo(&[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("docker-archive:{}", archive.display()),
            &format!("docker://{}/bench/big:1", target.host()),
        ])));
    }
    let rows = [
        Row {
            name: "pull (4 layers, gzip)".into(),
            strata: median(pull_s),
            baseline: median(pull_k),
        },
        Row {
            name: "push, layers already compressed".into(),
            strata: median(push_s),
            baseline: median(push_k),
        },
        Row {
            name: "push, compressing the layers".into(),
            strata: median(zpush_s),
            baseline: median(zpush_k),
        },
    ];
    print_table(
        &format!(
            "strata against skopeo through docker-registry on 127.0.0.1, medians of {runs} runs"
        ),
        "skopeo",
        &rows,
    );
}
