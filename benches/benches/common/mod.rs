//! What the end-to-end benchmarks share: the release binary, timing a
//! command, medians and the ratio table.

// Each benchmark uses its part.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// The release `strata` next to the benchmark executable.
pub fn strata_release_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("strata");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build --release -p strata-cli` (scripts/bench does)",
        bin.display()
    );
    bin
}

/// Runs per case: `STRATA_BENCH_RUNS`, default `default`.
pub fn runs(default: usize) -> usize {
    std::env::var("STRATA_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of some timings: the middle one, or the mean of the two
/// middle ones when there is an even number (of two rounds, not the
/// slower one).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Runs `cmd`, failing the benchmark unless it succeeds; returns seconds.
pub fn time(mut cmd: Command) -> f64 {
    let start = Instant::now();
    let out = cmd.output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

/// One line of the result table.
pub struct Row {
    /// What was measured.
    pub name: String,
    /// strata's median, seconds.
    pub strata: f64,
    /// The baseline's median, seconds.
    pub baseline: f64,
}

/// Prints the table: medians and strata/baseline ratios.
pub fn print_table(title: &str, baseline: &str, rows: &[Row]) {
    println!("\n{title}");
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "case", "strata", baseline, "ratio"
    );
    for r in rows {
        println!(
            "{:<44} {:>9.3}s {:>9.3}s {:>7.2}x",
            r.name,
            r.strata,
            r.baseline,
            r.strata / r.baseline
        );
    }
}
