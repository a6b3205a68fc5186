//! What a benchmark found: per target and phase, throughput, latency
//! percentiles, cache hit rate, bytes moved and how busy each worker was;
//! as JSON, and as one HTML page with its plots drawn in (inline SVG, no
//! script, nothing fetched).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::run::Measured;
use crate::workload::Workload;

/// One target's run of the workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetRun {
    /// The target.
    pub target: String,
    /// `cold` (the first pass) or `warm` (the same builds again).
    pub phase: String,
    /// The numbers.
    pub summary: Summary,
    /// Every build.
    pub builds: Vec<Measured>,
}

/// A run's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Builds.
    pub builds: usize,
    /// Of which failed.
    pub failed: usize,
    /// Seconds from the first build's start to the last one's end.
    pub wall_seconds: f64,
    /// Builds that succeeded, per minute of wall time.
    pub builds_per_minute: f64,
    /// Build latency percentiles, seconds.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Steps found in the cache, of all steps (`None`: none reported).
    pub hit_rate: Option<f64>,
    /// Mean bytes moved to the client per build.
    pub bytes_per_build: f64,
    /// Per worker, the mean number of steps it ran at once over the run.
    pub busy_slots: BTreeMap<String, f64>,
    /// Builds per minute in consecutive windows of `window_seconds`.
    pub throughput: Vec<f64>,
    /// The width of those windows.
    pub window_seconds: f64,
    /// Why the first failed build failed.
    pub first_error: Option<String>,
}

/// The `q` quantile of sorted `v` (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Summary {
    /// The hit rate as shown: `48%`, or `-` when no steps were reported.
    fn hit_text(&self) -> String {
        self.hit_rate
            .map_or_else(|| "-".into(), |h| format!("{:.0}%", h * 100.0))
    }

    /// The numbers of `builds`, run in `wall` seconds.
    pub fn of(builds: &[Measured], wall: f64) -> Summary {
        let ok: Vec<&Measured> = builds.iter().filter(|b| b.error.is_none()).collect();
        let mut lat: Vec<f64> = ok.iter().map(|b| b.seconds).collect();
        lat.sort_by(f64::total_cmp);
        let (run, cached) = ok
            .iter()
            .fold((0, 0), |(r, c), b| (r + b.steps_run, c + b.steps_cached));
        let mut busy: BTreeMap<String, f64> = BTreeMap::new();
        for s in ok.iter().flat_map(|b| &b.steps).filter(|s| !s.cached) {
            *busy.entry(s.worker.clone()).or_default() += (s.finished - s.started).max(0.0);
        }
        for v in busy.values_mut() {
            *v /= wall.max(1e-9);
        }
        let window = (wall / 20.0).max(1.0);
        let windows = (wall / window).ceil().max(1.0) as usize;
        let mut counts = vec![0usize; windows];
        for b in &ok {
            let w = ((b.start + b.seconds) / window) as usize;
            counts[w.min(windows - 1)] += 1;
        }
        Summary {
            builds: builds.len(),
            failed: builds.len() - ok.len(),
            wall_seconds: wall,
            builds_per_minute: ok.len() as f64 * 60.0 / wall.max(1e-9),
            p50: quantile(&lat, 0.50),
            p95: quantile(&lat, 0.95),
            p99: quantile(&lat, 0.99),
            hit_rate: (run + cached > 0).then(|| cached as f64 / (run + cached) as f64),
            bytes_per_build: ok.iter().map(|b| b.bytes_moved as f64).sum::<f64>()
                / ok.len().max(1) as f64,
            busy_slots: busy,
            throughput: counts.iter().map(|c| *c as f64 * 60.0 / window).collect(),
            window_seconds: window,
            first_error: builds.iter().find_map(|b| b.error.clone()),
        }
    }
}

/// A whole benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The workload.
    pub workload: Workload,
    /// Its ideal cold wall time, when known.
    pub ideal_seconds: Option<f64>,
    /// When the benchmark started, seconds since the epoch.
    pub started: f64,
    /// Each target's runs, in the order they ran.
    pub runs: Vec<TargetRun>,
}

impl Report {
    /// The run of BuildKit in the same phase as `run`, if one was made.
    fn baseline(&self, run: &TargetRun) -> Option<&TargetRun> {
        self.runs.iter().find(|r| {
            r.phase == run.phase && r.target.starts_with("docker") && r.summary.failed == 0
        })
    }

    /// `run`'s wall time against BuildKit's in the same phase, as `0.81×`.
    fn ratio(&self, run: &TargetRun) -> Option<String> {
        let b = self.baseline(run).filter(|b| b.target != run.target)?;
        Some(format!(
            "{:.2}×",
            run.summary.wall_seconds / b.summary.wall_seconds.max(1e-9)
        ))
    }

    /// A text table for the terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<44} {:<5} {:>7} {:>8} {:>9} {:>7} {:>7} {:>7} {:>6} {:>9}",
            "TARGET",
            "PHASE",
            "BUILDS",
            "WALL",
            "BUILDS/MIN",
            "P50",
            "P95",
            "P99",
            "HITS",
            "VS BUILDKIT"
        );
        for r in &self.runs {
            let s = &r.summary;
            let ratio = self.ratio(r).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:<44} {:<5} {:>4}/{:<2} {:>7.1}s {:>10.1} {:>6.2}s {:>6.2}s {:>6.2}s {:>6} {:>9}",
                r.target.chars().take(44).collect::<String>(),
                r.phase,
                s.builds - s.failed,
                s.builds,
                s.wall_seconds,
                s.builds_per_minute,
                s.p50,
                s.p95,
                s.p99,
                s.hit_text(),
                ratio
            );
        }
        if let Some(ideal) = self.ideal_seconds {
            let _ = writeln!(
                out,
                "ideal cold wall time: {ideal:.1}s (the shared stage once, then every build stage over {} slots)",
                self.workload.concurrency
            );
        }
        let _ = writeln!(
            out,
            "wall ratios are against BuildKit's run of the same phase"
        );
        out
    }

    /// The report as one self-contained HTML page.
    pub fn html(&self) -> String {
        let w = &self.workload;
        let mut h = String::new();
        h.push_str(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>strata bench: ",
        );
        h.push_str(&esc(&w.name));
        h.push_str("</title><style>body{font:14px/1.45 system-ui,sans-serif;color:#1d2330;margin:24px;max-width:1100px}\
            table{border-collapse:collapse}th,td{padding:4px 10px;border-bottom:1px solid #e3e6ee;text-align:right}\
            th:first-child,td:first-child{text-align:left}h2{margin-top:28px;font-size:16px}\
            .muted{color:#687086}svg{display:block;margin:8px 0}</style></head><body>");
        let _ = write!(
            h,
            "<h1>strata bench: {}</h1><p class=\"muted\">{} services × {} commits = {} builds, {} at a time; \
             a shared dependency stage of {} s, a build stage of {} s per service; contexts of {} files, {} bytes; seed {}; \
             ideal cold wall time {}.</p>",
            esc(&w.name),
            w.services,
            w.commits,
            w.builds(),
            w.concurrency,
            w.dependency_seconds,
            w.build_seconds,
            w.context_files,
            w.context_bytes,
            w.seed,
            self.ideal_seconds.map_or_else(
                || "unknown (real Dockerfiles)".into(),
                |s| format!("{s:.1} s")
            )
        );
        h.push_str("<h2>Summary</h2><table id=\"summary\"><tr><th>Target</th><th>Phase</th><th>Builds</th><th>Wall</th>\
            <th>Builds/min</th><th>p50</th><th>p95</th><th>p99</th><th>Cache hits</th><th>Bytes/build</th><th>Wall vs BuildKit</th></tr>");
        for r in &self.runs {
            let s = &r.summary;
            let ratio = self.ratio(r).unwrap_or_else(|| "–".into());
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}/{}</td><td>{:.1} s</td><td>{:.1}</td><td>{:.2} s</td><td>{:.2} s</td>\
                 <td>{:.2} s</td><td>{}</td><td>{:.0}</td><td>{}</td></tr>",
                esc(&r.target),
                r.phase,
                s.builds - s.failed,
                s.builds,
                s.wall_seconds,
                s.builds_per_minute,
                s.p50,
                s.p95,
                s.p99,
                s.hit_text(),
                s.bytes_per_build,
                ratio
            );
        }
        h.push_str("</table>");
        for r in self.runs.iter().filter(|r| r.summary.failed > 0) {
            let _ = write!(
                h,
                "<p><b>{} ({}): {} failed.</b> First: <pre>{}</pre></p>",
                esc(&r.target),
                r.phase,
                r.summary.failed,
                esc(r.summary.first_error.as_deref().unwrap_or(""))
            );
        }
        let label = |r: &TargetRun| format!("{} ({})", r.target, r.phase);
        h.push_str("<h2>Builds per minute over time</h2>");
        h.push_str(&lines(
            "throughput",
            &self
                .runs
                .iter()
                .map(|r| {
                    let win = r.summary.window_seconds;
                    (
                        label(r),
                        r.summary
                            .throughput
                            .iter()
                            .enumerate()
                            .map(|(i, v)| ((i as f64 + 1.0) * win, *v))
                            .collect(),
                    )
                })
                .collect::<Vec<_>>(),
            "seconds into the run",
            "builds per minute",
        ));
        h.push_str("<h2>Latency distribution</h2>");
        h.push_str(&lines(
            "latency",
            &self
                .runs
                .iter()
                .map(|r| {
                    let mut lat: Vec<f64> = r
                        .builds
                        .iter()
                        .filter(|b| b.error.is_none())
                        .map(|b| b.seconds)
                        .collect();
                    lat.sort_by(f64::total_cmp);
                    let n = lat.len().max(1) as f64;
                    (
                        label(r),
                        lat.iter()
                            .enumerate()
                            .map(|(i, s)| (*s, 100.0 * (i as f64 + 1.0) / n))
                            .collect(),
                    )
                })
                .collect::<Vec<_>>(),
            "build latency, seconds",
            "% of builds done within",
        ));
        h.push_str("<h2>Cache hit rate</h2>");
        h.push_str(&bars(
            "hit-rate",
            &self
                .runs
                .iter()
                .map(|r| {
                    let v = r.summary.hit_rate.unwrap_or(0.0) * 100.0;
                    (label(r), v, format!("{v:.0}%"))
                })
                .collect::<Vec<_>>(),
        ));
        h.push_str("<h2>Bytes moved per build</h2>");
        h.push_str(&bars(
            "bytes",
            &self
                .runs
                .iter()
                .map(|r| {
                    let v = r.summary.bytes_per_build;
                    (label(r), v, format!("{v:.0} B"))
                })
                .collect::<Vec<_>>(),
        ));
        h.push_str("<h2>Slot utilization per worker</h2><p class=\"muted\">Steps running at once on each node, on average over the run (from the steps each build reports; BuildKit does not report them).</p>");
        h.push_str(&bars(
            "slots",
            &self
                .runs
                .iter()
                .flat_map(|r| {
                    r.summary
                        .busy_slots
                        .iter()
                        .map(move |(w, v)| (format!("{} · {w}", label(r)), *v, format!("{v:.2}")))
                })
                .collect::<Vec<_>>(),
        ));
        h.push_str("</body></html>\n");
        h
    }
}

const COLOURS: &[&str] = &[
    "#2f6fde", "#1f9d55", "#d64545", "#b7791f", "#805ad5", "#319795", "#d53f8c", "#4a5568",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Horizontal bars, one per item: (label, value, shown value).
fn bars(id: &str, items: &[(String, f64, String)]) -> String {
    let max = items.iter().map(|i| i.1).fold(0.0_f64, f64::max).max(1e-9);
    let (lw, bw, row) = (360.0, 420.0, 22.0);
    let height = row * items.len().max(1) as f64 + 4.0;
    let mut s = format!(
        "<svg id=\"{id}\" width=\"{}\" height=\"{height}\" role=\"img\">",
        lw + bw + 80.0
    );
    for (i, (label, v, shown)) in items.iter().enumerate() {
        let y = i as f64 * row;
        let _ = write!(
            s,
            "<text x=\"0\" y=\"{:.1}\" font-size=\"12\">{}</text><rect x=\"{lw}\" y=\"{:.1}\" width=\"{:.1}\" height=\"14\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{}</text>",
            y + 14.0,
            esc(label),
            y + 3.0,
            (v / max * bw).max(1.0),
            COLOURS[i % COLOURS.len()],
            lw + (v / max * bw).max(1.0) + 6.0,
            y + 14.0,
            esc(shown)
        );
    }
    s.push_str("</svg>");
    s
}

/// Lines on shared axes, one per series of (x, y) points, with a legend.
fn lines(id: &str, series: &[(String, Vec<(f64, f64)>)], xlabel: &str, ylabel: &str) -> String {
    let (w, h, left, bottom) = (760.0, 260.0, 56.0, 36.0);
    let pts = series.iter().flat_map(|(_, p)| p);
    let xmax = pts.clone().map(|p| p.0).fold(0.0_f64, f64::max).max(1e-9);
    let ymax = pts.map(|p| p.1).fold(0.0_f64, f64::max).max(1e-9);
    let legend = 18.0 * series.len() as f64;
    let mut s = format!(
        "<svg id=\"{id}\" width=\"{w}\" height=\"{:.0}\" role=\"img\">",
        h + legend + 8.0
    );
    let (pw, ph) = (w - left - 10.0, h - bottom - 10.0);
    let _ = write!(
        s,
        "<line x1=\"{left}\" y1=\"10\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"#687086\"/>\
         <line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#687086\"/>\
         <text x=\"{left}\" y=\"{:.1}\" font-size=\"11\">0</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{:.1}</text>\
         <text x=\"{:.1}\" y=\"20\" font-size=\"11\" text-anchor=\"end\">{:.1}</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">{}</text>\
         <text x=\"12\" y=\"{:.1}\" font-size=\"12\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{}</text>",
        10.0 + ph,
        10.0 + ph,
        left + pw,
        10.0 + ph,
        10.0 + ph + 14.0,
        left + pw,
        10.0 + ph + 14.0,
        xmax,
        left - 4.0,
        ymax,
        left + pw / 2.0,
        h - 4.0,
        esc(xlabel),
        10.0 + ph / 2.0,
        10.0 + ph / 2.0,
        esc(ylabel)
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    left + x / xmax * pw,
                    10.0 + ph - y / ymax * ph
                )
            })
            .collect();
        // A dot per point, so a series of one point shows too.
        for p in &path {
            if let Some((x, y)) = p.split_once(',') {
                let _ = write!(
                    s,
                    "<circle cx=\"{x}\" cy=\"{y}\" r=\"2.5\" fill=\"{colour}\"/>"
                );
            }
        }
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\
             <rect x=\"{left}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" class=\"legend\">{}</text>",
            path.join(" "),
            h + 4.0 + i as f64 * 18.0,
            left + 18.0,
            h + 14.0 + i as f64 * 18.0,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Step;

    fn build(index: usize, start: f64, seconds: f64, cached: usize, error: bool) -> Measured {
        Measured {
            index,
            tag: format!("t{index}"),
            start,
            seconds,
            error: error.then(|| "boom".to_string()),
            steps_run: 2 - cached,
            steps_cached: cached,
            bytes_moved: 1000,
            steps: vec![Step {
                worker: "worker-1".into(),
                started: 100.0,
                finished: 102.0,
                cached: false,
            }],
        }
    }

    #[test]
    fn percentiles_rates_and_utilization_come_from_the_builds() {
        let builds: Vec<Measured> = (0..10)
            .map(|i| build(i, i as f64, 1.0 + i as f64, usize::from(i % 2 == 0), i == 9))
            .collect();
        let s = Summary::of(&builds, 20.0);
        assert_eq!((s.builds, s.failed), (10, 1));
        assert_eq!(s.p50, 5.0);
        assert_eq!(s.p99, 9.0);
        assert_eq!(s.builds_per_minute, 9.0 * 3.0);
        // 5 of the 9 good builds had a cached step: 5 of 18 steps.
        assert_eq!(s.hit_rate, Some(5.0 / 18.0));
        assert_eq!(s.busy_slots["worker-1"], 9.0 * 2.0 / 20.0);
        assert_eq!(
            s.throughput.iter().sum::<f64>() * s.window_seconds / 60.0,
            9.0
        );
        assert_eq!(s.first_error.as_deref(), Some("boom"));
    }

    #[test]
    fn the_page_has_every_run_and_escapes_names() {
        let w = Workload {
            name: "<ci>".into(),
            services: 2,
            commits: 1,
            dependency_seconds: 1.0,
            build_seconds: 1.0,
            context_files: 1,
            context_bytes: 1,
            concurrency: 1,
            seed: 0,
            base: "busybox:latest".into(),
            dockerfiles: None,
            edit: None,
        };
        let run = |target: &str| TargetRun {
            target: target.into(),
            phase: "cold".into(),
            summary: Summary::of(&[build(0, 0.0, 2.0, 0, false)], 2.0),
            builds: vec![build(0, 0.0, 2.0, 0, false)],
        };
        let r = Report {
            ideal_seconds: w.ideal_seconds(),
            workload: w,
            started: 0.0,
            runs: vec![run("strata (local daemon)"), run("docker build (BuildKit)")],
        };
        let page = r.html();
        assert!(page.contains("&lt;ci&gt;") && !page.contains("<ci>"));
        assert!(page.contains("strata (local daemon) (cold)"));
        for id in ["throughput", "latency", "hit-rate", "bytes", "slots"] {
            assert!(page.contains(&format!("<svg id=\"{id}\"")), "{id}");
        }
        assert!(r.table().contains("1.00×"));
    }
}
