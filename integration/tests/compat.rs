//! strata's images in the tools users already have: Docker loads and runs
//! them, skopeo inspects and copies them, umoci unpacks them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use strata_integration::docker::Docker;
use strata_integration::{Strata, repo_root};

fn tool(name: &str, args: &[&str]) -> String {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn docker_loads_and_runs_the_image() {
    let s = Strata::new().with_busybox(&[]);
    let out = tempfile::tempdir().unwrap();
    let archive = out.path().join("myapp.tar");
    let dest = format!("type=docker,dest={}", archive.display());
    s.build(
        &repo_root().join("examples/multistage-busybox"),
        &["-t", "strata-compat/myapp:multistage", "--output", &dest],
    );
    let strata_says = s.ok(&["run", "--rm", "strata-compat/myapp:multistage"]);
    let docker = Docker::shared();
    docker.ok(&["load", "-i", archive.to_str().unwrap()]);
    let docker_says = docker.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "strata-compat/myapp:multistage",
    ]);
    assert_eq!(docker_says, strata_says);
    assert_eq!(docker_says, "Hello, Docker Multi-Stage Build!\n");
    docker.ok(&["rmi", "strata-compat/myapp:multistage"]);
}

#[test]
fn skopeo_and_umoci_read_the_oci_layout() {
    let s = Strata::new().with_busybox(&[]);
    let out = tempfile::tempdir().unwrap();
    let tarball = out.path().join("myapp-oci.tar");
    let layout = out.path().join("layout");
    let r = s.build(
        &repo_root().join("examples/multistage-busybox"),
        &[
            "-t",
            "myapp:oci",
            "--output",
            &format!("type=oci,dest={}", tarball.display()),
            "--output",
            &format!(
                "type=oci,dest={},tar=false,compression=zstd",
                layout.display()
            ),
        ],
    );
    let inspect = tool(
        "skopeo",
        &["inspect", &format!("oci-archive:{}", tarball.display())],
    );
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["Architecture"], "amd64");
    assert_eq!(v["Os"], "linux");
    let layers = v["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "busybox plus two COPY layers");
    assert!(r["image"]["size"].as_u64().unwrap() > 0);
    let config = tool(
        "skopeo",
        &[
            "inspect",
            "--config",
            &format!("oci:{}:oci", layout.display()),
        ],
    );
    assert!(config.contains("\"myapp\""), "{config}");

    // skopeo copies it into another layout, and umoci unpacks that.
    let copy = out.path().join("copied");
    tool(
        "skopeo",
        &[
            "copy",
            &format!("oci-archive:{}", tarball.display()),
            &format!("oci:{}:latest", copy.display()),
        ],
    );
    let bundle = out.path().join("bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:latest", copy.display()),
            bundle.to_str().unwrap(),
        ],
    );
    let greeting =
        std::fs::read_to_string(bundle.join("rootfs/usr/share/myapp/greeting.txt")).unwrap();
    assert_eq!(greeting, "Hello, Docker Multi-Stage Build!\n");
    assert!(bundle.join("rootfs/usr/local/bin/myapp").is_file());
}
