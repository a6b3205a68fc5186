//! The command line itself: help, argument errors, `dockerfile check`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn strata(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_lists_the_commands() {
    let out = strata(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "build",
        "run",
        "images",
        "rmi",
        "prune",
        "image",
        "dockerfile",
    ] {
        assert!(text.contains(cmd), "{cmd} missing from:\n{text}");
    }
}

#[test]
fn check_points_at_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let df = dir.path().join("Dockerfile");
    std::fs::write(&df, "FROM alpine\nCOPY --form=x a b\n").unwrap();
    let out = strata(&["dockerfile", "check", "-f", df.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Dockerfile:2:6: unknown flag: --form (did you mean --from?)"),
        "{err}"
    );
    assert!(err.contains(" 2 | COPY --form=x a b\n   |      ^"), "{err}");
    std::fs::write(&df, "FROM alpine AS b\nRUN echo\n").unwrap();
    let out = strata(&["dockerfile", "check", "-f", df.to_str().unwrap()]);
    assert!(out.status.success());
}
