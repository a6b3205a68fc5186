//! A real browser for testing strata's web pages: Debian's headless
//! Chromium (`scripts/setup` installs it), driven from its command line.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::run_bounded;

/// How long a page may take to load and run its script.
const PAGE_LIMIT: Duration = Duration::from_secs(90);

fn chromium() -> Command {
    let mut cmd = Command::new("chromium");
    // Root has no user namespace sandbox to give it; the page is ours.
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        // Lets the page's script fetch and render (virtual time waits for
        // its requests) before the DOM is read or the screenshot taken.
        "--virtual-time-budget=4000",
    ]);
    cmd
}

/// Loads `url` in headless Chromium, saves a screenshot to `screenshot`
/// and returns the DOM once its scripts have run.
pub fn render(url: &str, screenshot: &Path) -> String {
    assert!(
        Command::new("chromium").arg("--version").output().is_ok(),
        "chromium is not installed: run scripts/setup"
    );
    let shot = run_bounded(
        chromium()
            .arg(format!("--screenshot={}", screenshot.display()))
            .arg(url),
        PAGE_LIMIT,
    );
    assert!(
        shot.status.success() && screenshot.exists(),
        "chromium took no screenshot of {url}:\n{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let dom = run_bounded(chromium().arg("--dump-dom").arg(url), PAGE_LIMIT);
    assert!(
        dom.status.success(),
        "chromium could not load {url}:\n{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    String::from_utf8_lossy(&dom.stdout).into_owned()
}
