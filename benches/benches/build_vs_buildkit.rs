//! `strata build` against `docker build` (dockerd 20.10 with BuildKit), in
//! the same run, on the same base images (both imported from the same root
//! filesystem tars):
//!
//! * the seed example (Go builder → busybox runtime) and the fan-out
//!   Dockerfile (four CPU-bound builders → one final stage);
//! * cold (no build cache; base images present and unpacked), warm
//!   (nothing changed) and after editing one source file;
//! * four stages that each wait 2 s (as downloads do), cold;
//! * a CI host: 24 builds of 8 services, 4 at a time, sharing one 3 s
//!   dependency stage, cold and warm (strata's through its one daemon);
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

/// Runs every build, four at a time; returns the wall time. A failed
/// build fails the benchmark.
fn four_at_a_time(
    contexts: &[(String, PathBuf)],
    build: &(dyn Fn(&str, &Path) -> Command + Sync),
) -> f64 {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some((tag, dir)) = contexts.get(i) else {
                        break;
                    };
                    time(build(tag, dir));
                }
            });
        }
    });
    start.elapsed().as_secs_f64()
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

    // Four stages that wait 2 s each (downloads, sleeps), then one final
    // stage: waiting steps must overlap.
    let waits = work.path().join("waits");
    std::fs::create_dir_all(&waits).unwrap();
    let mut df = String::new();
    for n in ["a", "b", "c", "d"] {
        df.push_str(&format!(
            "FROM busybox:latest AS {n}\nRUN sleep 2 && echo {n} > /{n}\n"
        ));
    }
    df.push_str("FROM busybox:latest\n");
    for n in ["a", "b", "c", "d"] {
        df.push_str(&format!("COPY --from={n} /{n} /{n}\n"));
    }
    std::fs::write(waits.join("Dockerfile"), df).unwrap();
    eprintln!("four waiting stages");
    let (mut ws, mut wd) = (Vec::new(), Vec::new());
    for _ in 0..runs.min(3) {
        ws.push(time(t.strata_build(&waits, &["--no-cache"])));
        let mut c = t.docker.cmd();
        c.args(["build", "-q", "--no-cache", "-t", "bench:waits"])
            .arg(&waits);
        wd.push(time(c));
    }
    rows.push(Row {
        name: "four stages waiting 2 s each, cold".into(),
        strata: median(ws),
        baseline: median(wd),
    });

    // A CI host: 8 services x 3 commits = 24 builds, 4 at a time, each
    // sharing one 3 s dependency stage and running its own 1 s stage.
    eprintln!("CI workload");
    let ci = work.path().join("ci");
    let contexts: Vec<(String, PathBuf)> = (0..24)
        .map(|i| {
            let (service, commit) = (i % 8, i / 8);
            let dir = ci.join(format!("s{service}-c{commit}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("Dockerfile"),
                format!(
                    "FROM busybox:latest AS deps\nRUN sleep 3 && echo deps > /deps\nFROM busybox:latest\nCOPY --from=deps /deps /deps\nRUN sleep 1 && echo service {service} commit {commit} > /app\n"
                ),
            )
            .unwrap();
            (format!("ci-s{service}:c{commit}"), dir)
        })
        .collect();
    let strata_ci = |tag: &str, dir: &Path| {
        let mut c = Command::new(&t.bin);
        c.env("STRATA_HOME", t.strata.home())
            .args(["build", "--progress", "quiet", "-t", tag])
            .arg(dir);
        c
    };
    let docker_ci = |tag: &str, dir: &Path| {
        let mut c = t.docker.cmd();
        c.args(["build", "-q", "-t", tag]).arg(dir);
        c
    };
    t.strata_cold();
    t.docker_cold();
    let s_cold = four_at_a_time(&contexts, &strata_ci);
    let d_cold = four_at_a_time(&contexts, &docker_ci);
    let s_warm = four_at_a_time(&contexts, &strata_ci);
    let d_warm = four_at_a_time(&contexts, &docker_ci);
    println!(
        "\nCI workload, 24 builds 4 at a time (ideal cold: 3 s + 24 x 1 s / 4 = 9 s): strata {s_cold:.1} s cold ({:.0} builds/min), {s_warm:.2} s warm ({:.0} builds/min); BuildKit {d_cold:.1} s cold ({:.0} builds/min), {d_warm:.2} s warm ({:.0} builds/min)",
        24.0 * 60.0 / s_cold,
        24.0 * 60.0 / s_warm,
        24.0 * 60.0 / d_cold,
        24.0 * 60.0 / d_warm,
    );
    rows.push(Row {
        name: "CI workload (24 builds, 4 at once), cold".into(),
        strata: s_cold,
        baseline: d_cold,
    });
    rows.push(Row {
        name: "CI workload (24 builds, 4 at once), warm".into(),
        strata: s_warm,
        baseline: d_warm,
    });

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
