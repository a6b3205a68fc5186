//! The platforms a node can run steps for: its own, the ones its CPU runs
//! natively besides (`linux/386` on amd64, `linux/arm/v7` on arm64, as
//! BuildKit counts them), and each one a binfmt_misc emulator is
//! registered for with the `F` flag (the kernel opens the emulator when it
//! is registered, so it works inside a sandbox whose root lacks it, as
//! Debian's `qemu-user-static` registers them).

use std::path::Path;

use strata_dockerfile::Platform;
use strata_plan::{Op, Plan};

use crate::error::BuildError;

const BINFMT: &str = "/proc/sys/fs/binfmt_misc";

/// The platforms this machine runs without an emulator: its own, and
/// those its CPU runs as well (386 on amd64, 32-bit arm on arm64).
pub fn native() -> Vec<Platform> {
    let host = Platform::host();
    let mut all = vec![host.clone()];
    let also: &[&str] = match host.architecture.as_str() {
        "amd64" => &["linux/386"],
        "arm64" => &["linux/arm/v7", "linux/arm/v6"],
        _ => &[],
    };
    all.extend(also.iter().filter_map(|p| Platform::parse(p).ok()));
    all
}

/// What this machine runs.
pub fn runnable() -> Vec<Platform> {
    let mut all = native();
    all.extend(emulated(Path::new(BINFMT)));
    all.sort();
    all.dedup();
    all
}

/// The platforms of the enabled `F`-flagged emulators registered under
/// `binfmt` (a binfmt_misc mount), by the names `qemu-user-static` gives
/// them (`qemu-aarch64`).
fn emulated(binfmt: &Path) -> Vec<Platform> {
    let enabled =
        |p: &Path| std::fs::read_to_string(p).is_ok_and(|s| s.lines().next() == Some("enabled"));
    if !enabled(&binfmt.join("status")) {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(binfmt) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(arch) = name.strip_prefix("qemu-") else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let fixed = text
            .lines()
            .any(|l| l.strip_prefix("flags: ").is_some_and(|f| f.contains('F')));
        if text.lines().next() != Some("enabled") || !fixed {
            continue;
        }
        let platforms: &[&str] = match arch {
            "aarch64" => &["linux/arm64"],
            "arm" => &["linux/arm/v7", "linux/arm/v6"],
            "x86_64" => &["linux/amd64"],
            "i386" => &["linux/386"],
            "ppc64le" => &["linux/ppc64le"],
            "s390x" => &["linux/s390x"],
            "riscv64" => &["linux/riscv64"],
            "mips64el" => &["linux/mips64le"],
            "mips64" => &["linux/mips64"],
            "loongarch64" => &["linux/loong64"],
            _ => &[],
        };
        found.extend(platforms.iter().filter_map(|p| Platform::parse(p).ok()));
    }
    found
}

/// Refuses a plan with a `RUN` for a platform not in `runs` (a stage of
/// only COPY and metadata builds for any platform), naming the stage.
pub fn check_runnable(plan: &Plan, runs: &[Platform], node: &str) -> Result<(), BuildError> {
    for stage in &plan.stages {
        if !stage.steps.iter().any(|s| matches!(s.op, Op::Exec(_))) {
            continue;
        }
        let Ok(platform) = Platform::parse(&stage.platform) else {
            continue;
        };
        let ok = runs.iter().any(|r| {
            r.matches(
                &platform.os,
                &platform.architecture,
                platform.variant.as_deref(),
            )
        });
        if !ok {
            let list: Vec<String> = runs.iter().map(Platform::to_string).collect();
            return Err(BuildError::Input(format!(
                "stage {} runs steps for {platform}, which {node} cannot run (runnable there: {}); \
                 register an emulator for it (Debian's qemu-user-static, with binfmt_misc \
                 mounted at {BINFMT}) or build for one of those",
                stage.name,
                list.join(", ")
            )));
        }
    }
    Ok(())
}

/// `platform` as a registry chooses an image of an index by it.
pub fn registry_target(platform: &Platform) -> strata_registry::Platform<'_> {
    strata_registry::Platform {
        os: &platform.os,
        architecture: &platform.architecture,
        variant: platform.variant.as_deref(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulators_count_when_enabled_and_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("status"), "enabled\n").unwrap();
        let entry = |name: &str, state: &str, flags: &str| {
            std::fs::write(
                d.join(name),
                format!(
                    "{state}\ninterpreter /usr/libexec/qemu-binfmt/x\nflags: {flags}\noffset 0\n"
                ),
            )
            .unwrap();
        };
        entry("qemu-aarch64", "enabled", "OCF");
        entry("qemu-s390x", "disabled", "OCF");
        entry("qemu-riscv64", "enabled", "OC");
        entry("python3.11", "enabled", "F");
        let names: Vec<String> = emulated(d).iter().map(Platform::to_string).collect();
        assert_eq!(names, ["linux/arm64"]);

        std::fs::write(d.join("status"), "disabled\n").unwrap();
        assert!(emulated(d).is_empty());
        assert!(emulated(&d.join("absent")).is_empty());
    }
}
