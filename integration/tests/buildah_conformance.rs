//! buildah's docker-versus-builder conformance cases, run against
//! `docker build` (BuildKit, from Debian's dockerd) and strata.
//!
//! Every case that needs only `scratch`, busybox or an earlier stage
//! (class a) is built by both from the same context and the same busybox
//! base, and the images are compared: the config (every key docker writes
//! must be in strata's, equal) and the flattened filesystem (path, type,
//! mode with set-user-ID/set-group-ID/sticky, owner, content digest, link
//! target, extended attributes; not modification times). Cases that must
//! fail must fail on both. Docker's results are cached by input digest.
//!
//! The data is buildah's (Apache-2.0): `STRATA_BUILDAH_CONFORMANCE`,
//! default `../shared/conformance/buildah`. Missing data fails loudly.
//! Prints `N passed, M failed`, and every skipped case with its reason.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use strata_integration::docker::Docker;
use strata_integration::image_model::{Model, compare, read_docker_archive};
use strata_integration::{Strata, busybox_tar, repo_root};

const BUSYBOX: &str = "mirror.gcr.io/busybox:latest";

fn data_dir() -> PathBuf {
    let dir = std::env::var_os("STRATA_BUILDAH_CONFORMANCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/conformance/buildah"));
    assert!(
        dir.join("cases.json").is_file(),
        "\n\n*** buildah conformance data not found at {} ***\nSet STRATA_BUILDAH_CONFORMANCE.\n",
        dir.display()
    );
    dir
}

/// Cases where docker 20.10's BuildKit (0.8) and current BuildKit differ,
/// and strata does what current BuildKit does.
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[(
    "177",
    "BuildKit 0.8 (docker 20.10) leaves the empty mount point of a RUN --mount in the image; BuildKit 0.9 and later remove it (executor/stubs.go), as strata does",
)];

/// Why a class-a case is not compared, when it is not.
fn skip_reason(case: &Value, dockerfile: &[u8]) -> Option<String> {
    if let Some((_, why)) = KNOWN_DIFFERENCES.iter().find(|(id, _)| case["id"] == *id) {
        return Some(format!("known difference: {why}"));
    }
    if case["without_docker"] == true {
        return Some("buildah-only upstream (no docker reference exists)".into());
    }
    if dockerfile.starts_with(b"# syntax=") || dockerfile.windows(9).any(|w| w == b"\n# syntax") {
        return Some(
            "`# syntax=` line: docker 20.10 would pull the frontend image from a registry".into(),
        );
    }
    if case["base_images"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b.as_str().unwrap().contains('@'))
    {
        return Some("pins the public busybox by digest, which no local image can have".into());
    }
    None
}

fn perm(v: &Value) -> u32 {
    u32::from_str_radix(v.as_str().unwrap_or("0644"), 8).unwrap()
}

/// Builds the case's context in `ctx`, following the data's conventions.
fn make_context(data: &Path, case: &Value, ctx: &Path) -> Vec<u8> {
    std::fs::create_dir_all(ctx).unwrap();
    let df_name = case["dockerfile"].as_str().unwrap_or("Dockerfile");
    if let Some(dir) = case["context_dir"].as_str() {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", data.join(dir).display()))
            .arg(ctx)
            .status()
            .unwrap();
        assert!(status.success());
    }
    // Contexts keep the checkout's owners and times; make them neutral so
    // both builders (and the cached reference) see the same thing.
    std::process::Command::new("chown")
        .args(["-hR", "0:0"])
        .arg(ctx)
        .status()
        .unwrap();
    let epoch = 1_485_449_953_i64;
    let tm = |p: &Path| {
        std::process::Command::new("touch")
            .args(["-h", "-d", &format!("@{epoch}")])
            .arg(p)
            .status()
            .unwrap();
    };
    for e in walk(ctx) {
        tm(&e);
    }
    for op in case["context_tweak"].as_array().unwrap() {
        let p = ctx.join(op["path"].as_str().unwrap_or(""));
        match op["op"].as_str().unwrap() {
            "mkdir" => {
                std::fs::create_dir_all(&p).unwrap();
                std::fs::set_permissions(
                    &p,
                    std::fs::Permissions::from_mode(perm(&op["perm"]) & !0o022),
                )
                .unwrap();
            }
            "write" => {
                let existed = p.exists();
                std::fs::write(&p, op["content"].as_str().unwrap()).unwrap();
                if !existed {
                    std::fs::set_permissions(
                        &p,
                        std::fs::Permissions::from_mode(perm(&op["perm"]) & !0o022),
                    )
                    .unwrap();
                }
            }
            "chmod" => {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(perm(&op["mode"])))
                    .unwrap()
            }
            "chown" => std::os::unix::fs::lchown(
                &p,
                op["uid"].as_u64().map(|u| u as u32),
                op["gid"].as_u64().map(|g| g as u32),
            )
            .unwrap(),
            "setxattr" => {
                for (k, v) in op["xattrs"].as_object().unwrap() {
                    xattr::set(&p, k, v.as_str().unwrap().as_bytes()).unwrap();
                }
            }
            "mtime" => tm(&p),
            "tar" => {
                let mut b = tar::Builder::new(Vec::new());
                for e in op["entries"].as_array().unwrap() {
                    let mut h = tar::Header::new_ustar();
                    let dir = e["type"] == "dir";
                    h.set_entry_type(if dir {
                        tar::EntryType::Directory
                    } else {
                        tar::EntryType::Regular
                    });
                    h.set_mode(perm(&e["mode"]));
                    h.set_uid(e["uid"].as_u64().unwrap());
                    h.set_gid(e["gid"].as_u64().unwrap());
                    h.set_mtime(e["mtime"].as_u64().unwrap());
                    if let Some(pax) = e["pax"].as_object() {
                        let recs: Vec<(&str, &[u8])> = pax
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str().unwrap().as_bytes()))
                            .collect();
                        b.append_pax_extensions(recs).unwrap();
                    }
                    let content = e["content"].as_str().unwrap_or("");
                    h.set_size(content.len() as u64);
                    b.append_data(&mut h, e["name"].as_str().unwrap(), content.as_bytes())
                        .unwrap();
                }
                std::fs::write(&p, b.into_inner().unwrap()).unwrap();
                std::fs::set_permissions(
                    &p,
                    std::fs::Permissions::from_mode(perm(&op["perm"]) & !0o022),
                )
                .unwrap();
            }
            "provide_true_binary" => {
                std::fs::copy("/bin/busybox", &p).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            "require_xattrs" => {}
            other => panic!("unknown context tweak {other}"),
        }
    }
    let df_path = ctx.join(df_name);
    let bytes = std::fs::read(data.join(case["dockerfile_source"].as_str().unwrap())).unwrap();
    let existed = df_path.exists();
    std::fs::create_dir_all(df_path.parent().unwrap()).unwrap();
    std::fs::write(&df_path, &bytes).unwrap();
    if !existed {
        std::fs::set_permissions(&df_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    tm(&df_path);
    tm(ctx);
    bytes
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// A digest of everything a build of the context sees, for the reference cache.
fn context_digest(ctx: &Path, case: &Value, extra: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut h = blake3::Hasher::new();
    h.update(extra.as_bytes());
    h.update(case["id"].as_str().unwrap().as_bytes());
    h.update(case["build_args"].to_string().as_bytes());
    let mut entries = walk(ctx);
    entries.sort();
    for p in entries {
        let m = std::fs::symlink_metadata(&p).unwrap();
        h.update(
            format!(
                "{} {:o} {} {} {}",
                p.strip_prefix(ctx).unwrap().display(),
                m.mode(),
                m.uid(),
                m.gid(),
                m.len()
            )
            .as_bytes(),
        );
        if m.is_file() {
            h.update(&std::fs::read(&p).unwrap());
        } else if m.file_type().is_symlink() {
            h.update(
                std::fs::read_link(&p)
                    .unwrap()
                    .as_os_str()
                    .as_encoded_bytes(),
            );
        }
    }
    h.finalize().to_hex().to_string()
}

/// Docker's result for a case: `Ok(model)` or `Err(log)` if it failed.
fn docker_reference(docker: &Docker, case: &Value, ctx: &Path, key: &str) -> Result<Model, String> {
    let cache = PathBuf::from("/var/cache/strata/conformance-refs");
    std::fs::create_dir_all(&cache).unwrap();
    let entry = cache.join(format!("{key}.json"));
    if let Ok(raw) = std::fs::read(&entry) {
        let v: Value = serde_json::from_slice(&raw).unwrap();
        return match v["error"].as_str() {
            Some(e) => Err(e.to_string()),
            None => Ok(Model {
                config: v["config"].clone(),
                fs: v["fs"].clone(),
            }),
        };
    }
    let tag = format!("strata-conformance/case-{}", case["id"].as_str().unwrap());
    let mut cmd = docker.cmd();
    cmd.args(["build", "--no-cache", "-q", "-t", &tag, "-f"])
        .arg(ctx.join(case["dockerfile"].as_str().unwrap_or("Dockerfile")));
    for (k, v) in case["build_args"].as_object().unwrap() {
        cmd.args(["--build-arg", &format!("{k}={}", v.as_str().unwrap())]);
    }
    let out = cmd.arg(ctx).output().unwrap();
    let result = if out.status.success() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("ref.tar");
        docker.ok(&["save", "-o", archive.to_str().unwrap(), &tag]);
        let _ = docker.cmd().args(["rmi", "-f", &tag]).output();
        Ok(read_docker_archive(&archive).unwrap())
    } else {
        let log = String::from_utf8_lossy(&out.stderr);
        Err(log
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string())
    };
    let stored = match &result {
        Ok(m) => serde_json::json!({"config": m.config, "fs": m.fs}),
        Err(e) => serde_json::json!({"error": e}),
    };
    std::fs::write(&entry, serde_json::to_vec(&stored).unwrap()).unwrap();
    result
}

fn strata_result(strata: &Strata, case: &Value, ctx: &Path) -> Result<Model, String> {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("strata.tar");
    let mut args = vec![
        "build".to_string(),
        "--progress".into(),
        "quiet".into(),
        "--no-cache".into(),
        "-t".into(),
        "conformance:case".into(),
        "-f".into(),
        ctx.join(case["dockerfile"].as_str().unwrap_or("Dockerfile"))
            .display()
            .to_string(),
        "--output".into(),
        format!("type=docker,dest={}", archive.display()),
    ];
    for (k, v) in case["build_args"].as_object().unwrap() {
        args.push("--build-arg".into());
        args.push(format!("{k}={}", v.as_str().unwrap()));
    }
    args.push(ctx.display().to_string());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = strata.run(&argv);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    read_docker_archive(&archive)
}

const CONFIG_SKIPS: &[&str] = &[
    "created",
    "container",
    "docker_version",
    "history",
    "rootfs:diff_ids",
    "moby.buildkit.buildinfo.v1",
    "config:hostname",
    "config:image",
    "container_config:hostname",
    "container_config:cmd",
    "container_config:image",
];

/// The fs-model keys a case skips, minus modification times (never compared).
fn fs_skips(case: &Value) -> Vec<String> {
    case["compare"]["fs_skip"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .filter(|s| !s.ends_with(":mtime"))
        .collect()
}

/// Removes `mtime` attributes everywhere in an fs model.
fn drop_mtimes(v: &mut Value) {
    if let Value::Object(m) = v {
        m.remove("mtime");
        for child in m.values_mut() {
            drop_mtimes(child);
        }
    }
}

#[test]
fn buildah_conformance_against_docker() {
    let data = data_dir();
    let cases: Value =
        serde_json::from_slice(&std::fs::read(data.join("cases.json")).unwrap()).unwrap();
    let docker = Docker::shared();
    let strata = Strata::new().with_busybox(&[BUSYBOX]);
    // Docker gets the very image strata has, config and layers alike.
    let base = tempfile::tempdir().unwrap();
    let base_tar = base.path().join("busybox.tar");
    strata.ok(&[
        "build",
        "--progress",
        "quiet",
        "-t",
        BUSYBOX,
        "--output",
        &format!("type=docker,dest={}", base_tar.display()),
        &write_from(base.path()),
    ]);
    docker.ok(&["load", "-i", base_tar.to_str().unwrap()]);
    let docker_version = docker.ok(&["version", "--format", "{{.Server.Version}}"]);
    let base_digest = std::fs::read(busybox_tar())
        .map(|b| blake3::hash(&b).to_hex().to_string())
        .unwrap();

    let only: Option<Vec<String>> = std::env::var("STRATA_CONFORMANCE_CASES")
        .ok()
        .map(|s| s.split(',').map(str::to_string).collect());
    let (mut passed, mut failed, mut skipped) = (Vec::new(), Vec::new(), BTreeMap::new());
    for case in cases["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        if only.as_ref().is_some_and(|o| !o.iter().any(|x| x == id)) {
            continue;
        }
        let label = format!("{id} {}", case["name"].as_str().unwrap());
        let df_bytes = std::fs::read(data.join(case["dockerfile_source"].as_str().unwrap()))
            .unwrap_or_default();
        if case["class"] != "a" {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("context");
        if let Some(why) = skip_reason(case, &df_bytes) {
            // No reference to compare with; still say what strata does.
            let outcome = if case["without_docker"] == true || why.contains("by digest") {
                String::new()
            } else {
                make_context(&data, case, &ctx);
                match strata_result(&strata, case, &ctx) {
                    Ok(_) => "; strata builds it".to_string(),
                    Err(e) => format!("; strata fails: {}", e.lines().next_back().unwrap_or("")),
                }
            };
            skipped.insert(label, format!("{why}{outcome}"));
            continue;
        }
        make_context(&data, case, &ctx);
        let key = context_digest(&ctx, case, &format!("{docker_version}{base_digest}"));
        let must_fail = case["expect"]["fail_at_line"].as_u64().unwrap_or(0) != 0;
        let reference = docker_reference(&docker, case, &ctx, &key);
        let ours = strata_result(&strata, case, &ctx);
        match (must_fail, reference, ours) {
            (true, Err(_), Err(_)) => passed.push(label),
            (true, Ok(_), ours) => {
                let what = if ours.is_ok() {
                    "builds it too"
                } else {
                    "fails, as the case says"
                };
                skipped.insert(
                    label,
                    format!("docker 20.10 builds what the case says must fail; strata {what}"),
                );
            }
            (true, Err(_), Ok(_)) => failed.push(format!("{label}: must fail, strata built it")),
            (false, Err(e), ours) => {
                let what = match ours {
                    Ok(_) => "strata builds it".to_string(),
                    Err(x) => format!("strata fails: {}", x.lines().next_back().unwrap_or("")),
                };
                skipped.insert(label, format!("docker 20.10 cannot build it ({e}); {what}"));
            }
            (false, Ok(_), Err(e)) => failed.push(format!("{label}: strata failed: {e}")),
            (false, Ok(d), Ok(s)) => {
                let mut diffs = Vec::new();
                let skips: Vec<String> = CONFIG_SKIPS.iter().map(|s| s.to_string()).collect();
                compare(&d.config, &s.config, &skips, false, "config", &mut diffs);
                let (mut dfs, mut sfs) = (d.fs, s.fs);
                drop_mtimes(&mut dfs);
                drop_mtimes(&mut sfs);
                let strict = case["compare"]["fail_on_extra_fs_content"] == true;
                compare(&dfs, &sfs, &fs_skips(case), strict, "fs", &mut diffs);
                if diffs.is_empty() {
                    passed.push(label);
                } else {
                    failed.push(format!("{label}:\n    {}", diffs.join("\n    ")));
                }
            }
        }
    }
    for (case, why) in &skipped {
        eprintln!("skipped {case}: {why}");
    }
    for f in &failed {
        eprintln!("FAILED {f}");
    }
    eprintln!(
        "buildah conformance, class a: {} passed, {} failed, {} skipped (listed above with their reasons)",
        passed.len(),
        failed.len(),
        skipped.len()
    );
    assert!(
        failed.is_empty(),
        "{} conformance cases differ from docker build",
        failed.len()
    );
}

/// A context whose Dockerfile re-exports busybox unchanged.
fn write_from(dir: &Path) -> String {
    let ctx = dir.join("base");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox:latest\n").unwrap();
    ctx.display().to_string()
}
