//! `strata build` against `docker build` (dockerd 20.10 with BuildKit), in
//! the same run, on the same base images (both imported from the same root
//! filesystem tars):
//!
//! * the seed example (Go builder → busybox runtime) and the fan-out
//!   Dockerfile (four CPU-bound builders → one final stage);
//! * cold (no build cache; base images present and unpacked), warm
//!   (nothing changed) and after editing one source file;
//! * the sandbox overhead of one `RUN`: twenty `RUN true` steps, uncached.
//!
//! Prints medians and strata/BuildKit ratios. Needs root, dockerd, runc and
//! the Go root filesystem (`scripts/base-image golang`); run it with
//! `scripts/bench`. `STRATA_BENCH_RUNS` sets the runs per case (default 5).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
)]

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{Row, median, print_table, runs, strata_release_bin, time};
use strata_integration::docker::Docker;
use strata_integration::{Strata, base_image_tar, busybox_tar, copy_tree, repo_root};

struct Tools {
    strata: Strata,
    bin: PathBuf,
    docker: Docker,
}

impl Tools {
    fn strata_build(&self, ctx: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("STRATA_HOME", self.strata.home())
            .args(["build", "--progress", "quiet", "-t", "bench:latest"])
            .args(extra)
            .arg(ctx);
        c
    }

    fn docker_build(&self, ctx: &Path) -> Command {
        let mut c = self.docker.cmd();
        c.args(["build", "-q", "-t", "bench:latest"]).arg(ctx);
        c
    }

    fn strata_cold(&self) {
        let out = Command::new(&self.bin)
            .env("STRATA_HOME", self.strata.home())
            .arg("prune")
            .output()
            .unwrap();
        assert!(out.status.success());
    }

    fn docker_cold(&self) {
        let _ = self
            .docker
            .cmd()
            .args(["rmi", "-f", "bench:latest"])
            .output();
        self.docker.ok(&["builder", "prune", "-af"]);
    }
}

fn case(t: &Tools, name: &str, ctx: &Path, edit: Option<&str>, runs: usize, rows: &mut Vec<Row>) {
    let (mut cold_s, mut cold_d, mut warm_s, mut warm_d, mut edit_s, mut edit_d) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        eprintln!("  {name}: run {}/{runs}", i + 1);
        t.strata_cold();
        cold_s.push(time(t.strata_build(ctx, &[])));
        t.docker_cold();
        cold_d.push(time(t.docker_build(ctx)));
        // Warm builds alternate, three each: the first process to start
        // after a cold build pays for memory the cold build left behind
        // (both tools pay it), and one sample per side would hand that
        // cost to whichever went first.
        for _ in 0..3 {
            warm_s.push(time(t.strata_build(ctx, &[])));
            warm_d.push(time(t.docker_build(ctx)));
        }
        if let Some(file) = edit {
            let p = ctx.join(file);
            let mut text = std::fs::read_to_string(&p).unwrap();
            text.push_str(&format!("\n// edit {i}\n"));
            std::fs::write(&p, &text).unwrap();
            edit_s.push(time(t.strata_build(ctx, &[])));
            // Same edit for docker: its cache still has the previous version.
            edit_d.push(time(t.docker_build(ctx)));
        }
    }
    rows.push(Row {
        name: format!("{name}: cold"),
        strata: median(cold_s),
        baseline: median(cold_d),
    });
    rows.push(Row {
        name: format!("{name}: warm"),
        strata: median(warm_s),
        baseline: median(warm_d),
    });
    if edit.is_some() {
        rows.push(Row {
            name: format!("{name}: after editing main.go"),
            strata: median(edit_s),
            baseline: median(edit_d),
        });
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("build_vs_buildkit: benchmark");
        return;
    }
    let runs = runs(5);
    let bin = strata_release_bin();
    let strata = Strata::new();
    let docker = Docker::shared();
    let import = |name: &str, tar: &Path| {
        let out = Command::new(&bin)
            .env("STRATA_HOME", strata.home())
            .args(["image", "import", name])
            .arg(tar)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if docker
            .cmd()
            .args(["image", "inspect", name])
            .output()
            .is_ok_and(|o| !o.status.success())
        {
            docker.ok(&["import", tar.to_str().unwrap(), name]);
        }
    };
    import("busybox:latest", &busybox_tar());
    import("alpine:latest", &busybox_tar());
    import("golang:1.19", &base_image_tar("golang"));
    let t = Tools {
        strata,
        bin,
        docker,
    };

    let work = tempfile::tempdir().unwrap();
    let seed = work.path().join("seed");
    copy_tree(&repo_root().join("examples/multistage-go"), &seed);
    let fan = work.path().join("fanout");
    copy_tree(&repo_root().join("examples/fanout"), &fan);
    // Unpack the base images once on both sides before timing anything.
    time(t.strata_build(&seed, &[]));
    time(t.docker_build(&seed));

    let mut rows = Vec::new();
    eprintln!("seed example (multistage-go)");
    case(&t, "seed", &seed, Some("main.go"), runs, &mut rows);
    eprintln!("fan-out");
    case(&t, "fan-out", &fan, None, runs.min(3), &mut rows);

    // Sandbox overhead: 20 trivial RUNs, uncached, minus one.
    let runs_dir = work.path().join("runs");
    std::fs::create_dir_all(&runs_dir).unwrap();
    let many = format!("FROM busybox:latest\n{}", "RUN true\n".repeat(20));
    let one = "FROM busybox:latest\nRUN true\n";
    let per_run = |df: &str, strata: bool| -> f64 {
        std::fs::write(runs_dir.join("Dockerfile"), df).unwrap();
        let mut v = Vec::new();
        for _ in 0..runs {
            if strata {
                v.push(time(t.strata_build(&runs_dir, &["--no-cache"])));
            } else {
                let mut c = t.docker.cmd();
                c.args(["build", "-q", "--no-cache", "-t", "bench:runs"])
                    .arg(&runs_dir);
                v.push(time(c));
            }
        }
        median(v)
    };
    let s_over = (per_run(&many, true) - per_run(one, true)) / 19.0;
    let d_over = (per_run(&many, false) - per_run(one, false)) / 19.0;
    rows.push(Row {
        name: "one RUN step (sandbox overhead)".into(),
        strata: s_over,
        baseline: d_over,
    });

    print_table(
        &format!(
            "strata build vs docker build (BuildKit, dockerd 20.10), medians of {runs} runs (fan-out: {}; warm: three per run)",
            runs.min(3)
        ),
        "BuildKit",
        &rows,
    );
}
