//! BuildKit's own parser and shell-lexer test data, run against strata's
//! frontend.
//!
//! The data lives outside the repository (it is BuildKit's, Apache-2.0):
//! `STRATA_BUILDKIT_CONFORMANCE` points at it, defaulting to
//! `../shared/conformance/buildkit` next to the checkout. Missing data is a
//! failure, never a silent pass. Each kind prints `N passed, M failed`;
//! no case is skipped.

// Test helpers report failures by panicking and print tallies.
#![allow(
    clippy::panic,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::fs;
use std::path::{Path, PathBuf};

use strata_dockerfile::{EnvList, Lexer, Span, parse};

mod common;

fn data_dir() -> PathBuf {
    let dir = common::buildkit_data();
    assert!(
        dir.join("parser/testfiles").is_dir() && dir.join("shell/envVarTest").is_file(),
        "\n\n*** BuildKit conformance data not found at {} ***\n\
         Set STRATA_BUILDKIT_CONFORMANCE to the folder holding parser/ and shell/.\n",
        dir.display()
    );
    dir
}

#[derive(Default)]
struct Tally {
    kind: &'static str,
    passed: usize,
    failures: Vec<String>,
}

impl Tally {
    fn new(kind: &'static str) -> Self {
        Tally {
            kind,
            ..Default::default()
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
        } else {
            self.failures.push(what());
        }
    }

    fn report(self) -> Vec<String> {
        eprintln!(
            "{}: {} passed, {} failed",
            self.kind,
            self.passed,
            self.failures.len()
        );
        assert!(
            self.passed + self.failures.len() > 0,
            "{}: no cases found",
            self.kind
        );
        self.failures
    }
}

fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn parser_positive(dir: &Path) -> Vec<String> {
    let mut t = Tally::new("parser positive cases");
    for case in sorted_dirs(&dir.join("parser/testfiles")) {
        let want = String::from_utf8_lossy(&read(&case.join("result"))).into_owned();
        let bytes = read(&case.join("Dockerfile"));
        // Every Dockerfile that builds is checked too: the checks must
        // hold on whatever BuildKit's parser takes.
        if let Ok(df) = strata_dockerfile::Dockerfile::parse(&bytes) {
            let _ = strata_dockerfile::lint::lint(&df);
        }
        let got = parse(&bytes).map(|ast| ast.dump());
        let name = case
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        t.check(got.as_deref().ok() == Some(want.as_str()), || match &got {
            Ok(g) => format!("{name}: dump differs\n--- want\n{want}--- got\n{g}"),
            Err(e) => format!("{name}: parse failed: {e}"),
        });
    }
    t.report()
}

fn parser_negative(dir: &Path) -> Vec<String> {
    let mut t = Tally::new("parser negative cases");
    for case in sorted_dirs(&dir.join("parser/testfiles-negative")) {
        let got = parse(&read(&case.join("Dockerfile")));
        let name = case
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        t.check(got.is_err(), || {
            format!("{name}: parsed, but BuildKit rejects it")
        });
    }
    t.report()
}

fn parser_lines(dir: &Path) -> Vec<String> {
    let mut t = Tally::new("parser line-number case");
    let ast = parse(&read(&dir.join("parser/testfile-line/Dockerfile")));
    let spans: Option<Vec<Span>> = ast.ok().map(|a| a.nodes.iter().map(|n| n.span).collect());
    let want = vec![
        Span { start: 5, end: 5 },
        Span { start: 11, end: 12 },
        Span { start: 17, end: 31 },
    ];
    t.check(spans.as_ref() == Some(&want), || {
        format!("spans {spans:?}, want {want:?}")
    });
    t.report()
}

/// `shell/envVarTest`: `platform | input | expected` rows, run once with
/// Linux rules (A and U rows) and once with Windows rules (A and W rows).
fn env_var_table(dir: &Path) -> Vec<String> {
    let text = String::from_utf8_lossy(&read(&dir.join("shell/envVarTest"))).into_owned();
    let mut failures = Vec::new();
    for (label, windows) in [
        ("envVarTest (Linux rules)", false),
        ("envVarTest (Windows rules)", true),
    ] {
        let mut env = if windows {
            EnvList::windows()
        } else {
            EnvList::new()
        };
        for (k, v) in [
            ("PWD", "/home"),
            ("SHELL", "bash"),
            ("KOREAN", "한국어"),
            ("NULL", ""),
        ] {
            env.set(k, v);
        }
        let lexer = Lexer::new('\\');
        let mut t = Tally::new(label);
        for (n, raw) in text.lines().enumerate() {
            if raw.starts_with('#') || raw.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = raw.trim().split('|').map(str::trim).collect();
            let [platform, input, expected] = fields.as_slice() else {
                t.check(false, || format!("line {}: malformed row {raw:?}", n + 1));
                continue;
            };
            let applies = match *platform {
                "A" => true,
                "U" => !windows,
                "W" => windows,
                _ => {
                    t.check(false, || {
                        format!("line {}: unknown platform {platform:?}", n + 1)
                    });
                    continue;
                }
            };
            if !applies {
                continue;
            }
            let got = lexer.process_word(input, &env);
            let ok = match (*expected, &got) {
                ("error", r) => r.is_err(),
                (want, Ok(g)) => g == want,
                (_, Err(_)) => false,
            };
            t.check(ok, || {
                format!("line {}: {input:?} -> {got:?}, want {expected:?}", n + 1)
            });
        }
        failures.extend(t.report());
    }
    failures
}

/// `shell/wordsTest`: `input | word,word` rows with `ENV k=v` lines that
/// accumulate.
fn words_table(dir: &Path) -> Vec<String> {
    let text = String::from_utf8_lossy(&read(&dir.join("shell/wordsTest"))).into_owned();
    let mut env = EnvList::new();
    let lexer = Lexer::new('\\');
    let mut t = Tally::new("wordsTest");
    for (n, raw) in text.lines().enumerate() {
        if raw.starts_with('#') {
            continue;
        }
        if let Some(def) = raw.strip_prefix("ENV ") {
            let def = def.trim_start_matches(' ');
            let (k, v) = def.split_once('=').unwrap_or((def, ""));
            env.set(k, v);
            continue;
        }
        let Some((input, expected)) = raw.split_once('|') else {
            t.check(false, || format!("line {}: malformed row {raw:?}", n + 1));
            continue;
        };
        let input = input.trim();
        let expected: Vec<&str> = expected.trim_start_matches(' ').split(',').collect();
        let got = lexer.process_words(input, &env);
        let ok = match (expected.as_slice(), &got) {
            (["error"], r) => r.is_err(),
            (want, Ok(g)) => g.iter().map(String::as_str).eq(want.iter().copied()),
            (_, Err(_)) => false,
        };
        t.check(ok, || {
            format!("line {}: {input:?} -> {got:?}, want {expected:?}", n + 1)
        });
    }
    t.report()
}

#[test]
fn buildkit_conformance() {
    let dir = data_dir();
    let mut failures = Vec::new();
    failures.extend(parser_positive(&dir));
    failures.extend(parser_negative(&dir));
    failures.extend(parser_lines(&dir));
    failures.extend(env_var_table(&dir));
    failures.extend(words_table(&dir));
    assert!(
        failures.is_empty(),
        "{} conformance failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
