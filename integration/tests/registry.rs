//! Registries as users meet them: the real distribution registry
//! (Debian's `docker-registry`) on 127.0.0.1, plain and with htpasswd
//! auth, and skopeo on the other side.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use strata_integration::registry::{PASSWORD, Proxy, Registry, USER, docker_login};
use strata_integration::{Strata, cached, fails_with, repo_root, write_files};

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pushed_images_are_read_by_skopeo_and_pulled_back() {
    let reg = Registry::start(false);
    let name = format!("{}/demo/greeting:1", reg.host());
    let s = Strata::new().with_busybox(&[]);
    s.build(
        &repo_root().join("examples/multistage-busybox"),
        &["-t", &name, "--push"],
    );
    let inspect = skopeo(&["inspect", "--tls-verify=false", &format!("docker://{name}")]);
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["Architecture"], "amd64");
    assert_eq!(v["Layers"].as_array().unwrap().len(), 3);
    let copy = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{name}"),
        &format!("oci:{}:greeting", copy.path().display()),
    ]);
    assert!(copy.path().join("index.json").is_file());

    // Another machine pulls it and runs it; pulling again downloads nothing.
    let other = Strata::new();
    let pulled = other.ok(&["pull", "--progress", "plain", &name]);
    assert!(pulled.contains("3 of 3 layers downloaded"), "{pulled}");
    assert_eq!(
        other.ok(&["run", "--rm", &name]),
        "Hello, Docker Multi-Stage Build!\n"
    );
    let again = other.ok(&["pull", "--progress", "plain", &name]);
    assert!(again.contains("0 of 3 layers downloaded, 0B"), "{again}");
}

/// Pushes busybox, as `docker save` writes it, to each of `names` with
/// skopeo (the registry is plain HTTP).
fn push_busybox(names: &[&str]) {
    let s = Strata::new().with_busybox(&[]);
    let archive = tempfile::tempdir().unwrap();
    let tar = archive.path().join("busybox.tar");
    s.ok(&["save", "-o", tar.to_str().unwrap(), "busybox:latest"]);
    for name in names {
        skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("docker-archive:{}", tar.display()),
            &format!("docker://{name}"),
        ]);
    }
}

#[test]
fn an_image_pushed_by_skopeo_is_a_base_for_builds() {
    let reg = Registry::start(false);
    let base = format!("{}/base/busybox:1.36", reg.host());
    // Docker Hub names resolve through a mirror, as with dockerd's
    // registry-mirrors.
    let hub = format!("{}/library/busybox:1.36", reg.host());
    push_busybox(&[&base, &hub]);

    // A fresh state directory: the base comes from the registry.
    let fresh = Strata::new();
    let dir = tempfile::tempdir().unwrap();
    write_files(
        dir.path(),
        &[(
            "Dockerfile",
            &format!(
                "FROM {base}\nRUN echo built on the pulled base > /note\nCMD [\"cat\", \"/note\"]\n"
            ),
        )],
    );
    fresh.build(dir.path(), &["-t", "derived:1"]);
    assert_eq!(
        fresh.ok(&["run", "--rm", "derived:1"]),
        "built on the pulled base\n"
    );

    // A Docker Hub name, through the mirror.
    let mirrored = Strata::new();
    write_files(
        dir.path(),
        &[(
            "Dockerfile",
            "FROM busybox:1.36\nRUN echo via the mirror > /note\n",
        )],
    );
    let out = mirrored
        .cmd()
        .env("STRATA_REGISTRY_MIRRORS", format!("http://{}", reg.host()))
        .args(["build", "--progress", "plain", "-t", "m:1"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        mirrored.ok(&["run", "--rm", "m:1", "cat", "/note"]),
        "via the mirror\n"
    );
}

/// Planning names every base image it lacks (`FROM` and `COPY --from`) in
/// one pass; they are pulled together and planning starts again with all
/// of them; `--pull` fetches them again, a name two stages share once.
#[test]
fn a_build_on_several_pulled_bases_plans_with_all_of_them_and_pull_refreshes_them() {
    let reg = Registry::start(false);
    let bases: Vec<String> = ["one", "two", "three"]
        .iter()
        .map(|n| format!("{}/bases/{n}:1", reg.host()))
        .collect();
    push_busybox(&bases.iter().map(String::as_str).collect::<Vec<_>>());
    let dir = tempfile::tempdir().unwrap();
    write_files(
        dir.path(),
        &[(
            "Dockerfile",
            &format!(
                "FROM {one} AS a\nRUN echo from-a > /a\n\
                 FROM {two} AS b\nRUN echo from-b > /b\n\
                 FROM {one}\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n\
                 COPY --from={three} /bin/busybox /copied-busybox\n\
                 RUN cat /a /b > /both\n",
                one = bases[0],
                two = bases[1],
                three = bases[2],
            ),
        )],
    );
    let fresh = Strata::new();
    fresh.build(dir.path(), &["-t", "bases:1"]);
    assert_eq!(
        fresh.ok(&["run", "--rm", "bases:1", "cat", "/both"]),
        "from-a\nfrom-b\n"
    );
    let images = fresh.ok(&["images"]);
    for n in ["one", "two", "three"] {
        assert!(images.contains(&format!("bases/{n}")), "{images}");
    }
    // --pull: every name again, and the same image.
    let again = fresh.ok(&[
        "build",
        "--pull",
        "--progress",
        "plain",
        "-t",
        "bases:2",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!again.contains("vanished"), "{again}");
    assert_eq!(
        fresh.ok(&["run", "--rm", "bases:2", "cat", "/both"]),
        "from-a\nfrom-b\n"
    );
    // The registry gone: --pull fails, naming the image, rather than
    // building on what is stored; without it the stored bases serve.
    drop(reg);
    let out = fresh
        .cmd()
        .args(["build", "--pull", "-t", "bases:3"])
        .arg(dir.path())
        .output()
        .unwrap();
    fails_with(&out, &["cannot pull base image", &bases[0]]);
    fresh.build(dir.path(), &["-t", "bases:3"]);
}

#[test]
fn a_second_push_sends_no_layer_bytes() {
    let reg = Registry::start(false);
    let proxy = Proxy::start(reg.port());
    let s = Strata::new().with_busybox(&[]);
    let name = format!("{}/app/greeting:1", proxy.host());
    s.build(
        &repo_root().join("examples/multistage-busybox"),
        &["-t", &name],
    );
    let first = s.ok(&["push", "--progress", "plain", &name]);
    let after_first = proxy.bytes_up();
    assert!(first.contains("(4 blobs sent"), "{first}");
    assert!(
        after_first > 1_000_000,
        "the busybox layer went up: {after_first}"
    );
    let second = s.ok(&["push", "--progress", "plain", &name]);
    let sent = proxy.bytes_up() - after_first;
    assert!(
        second.contains("(0 blobs sent, 0B; 4 blobs already there)"),
        "{second}"
    );
    // HEAD requests and the manifest: far less than the smallest layer
    // plus its request.
    assert!(sent < 8_192, "the second push sent {sent} bytes");
    // Another repository of the same registry mounts what it has.
    let other = format!("{}/copy/greeting:1", proxy.host());
    let before = proxy.bytes_up();
    let third = s.ok(&["push", &name, &other]);
    assert!(
        third.contains("(0 blobs sent, 0B; 4 blobs already there)"),
        "{third}"
    );
    assert!(proxy.bytes_up() - before < 8_192);
    let copied = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{other}"),
    ]);
    assert!(copied.contains("\"Layers\""), "{copied}");
}

#[test]
fn credentials_come_from_docker_login_and_a_wrong_password_says_so() {
    let reg = Registry::start(true);
    let s = Strata::new().with_busybox(&[]);
    let name = format!("{}/private/app:1", reg.host());
    s.ok(&[
        "image",
        "import",
        &name,
        strata_integration::busybox_tar().to_str().unwrap(),
    ]);
    let config = tempfile::tempdir().unwrap();
    let push = |who: &str| {
        s.cmd()
            .env("DOCKER_CONFIG", config.path().join(who))
            .args(["push", "--progress", "quiet", &name])
            .output()
            .unwrap()
    };
    let anonymous = push("nobody");
    fails_with(
        &anonymous,
        &[
            "refused access to private/app",
            &format!("docker login {}", reg.host()),
        ],
    );
    docker_login(
        &config.path().join("wrong"),
        &reg.host(),
        USER,
        "not-the-password",
    );
    fails_with(
        &push("wrong"),
        &[&reg.host(), "refused access", "check the password"],
    );
    docker_login(&config.path().join("right"), &reg.host(), USER, PASSWORD);
    let ok = push("right");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let inspect = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            &format!("{USER}:{PASSWORD}"),
            &format!("docker://{name}"),
        ])
        .output()
        .unwrap();
    assert!(inspect.status.success());

    // A credential helper on the client's PATH (as ECR's and GCR's are),
    // named by credHelpers: strata runs it, and the push goes through.
    use std::os::unix::fs::PermissionsExt as _;
    let bin = config.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-testhelper");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\n[ \"$1\" = get ] && [ \"$server\" = \"{}\" ] || exit 1\necho '{{\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}'\n",
            reg.host()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let helped = config.path().join("helped");
    std::fs::create_dir_all(&helped).unwrap();
    std::fs::write(
        helped.join("config.json"),
        format!(r#"{{"credHelpers": {{"{}": "testhelper"}}}}"#, reg.host()),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let pushed = s
        .cmd()
        .env("DOCKER_CONFIG", &helped)
        .env("PATH", path)
        .args(["push", "--progress", "quiet", &name])
        .output()
        .unwrap();
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
}

#[test]
fn a_dropped_connection_is_resumed_and_nothing_corrupt_is_stored() {
    let reg = Registry::start(false);
    let s = Strata::new().with_busybox(&[]);
    let dir = tempfile::tempdir().unwrap();
    write_files(
        dir.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nRUN head -c 8000000 /dev/urandom > /blob && sha256sum /blob > /blob.sum\n",
        )],
    );
    let name = format!("{}/big/blob:1", reg.host());
    s.build(dir.path(), &["-t", &name, "--push"]);
    let want = s.ok(&["run", "--rm", &name, "cat", "/blob.sum"]);

    let proxy = Proxy::start(reg.port());
    let through = format!("{}/big/blob:1", proxy.host());
    // The first connection dies after 1 MB: inside the big layer, after
    // the manifest and config.
    proxy.cut_next_response_after(1_000_000);
    let fresh = Strata::new();
    let pulled = fresh.ok(&["pull", "--progress", "plain", &through]);
    assert_eq!(proxy.cuts(), 1, "the transfer was cut once");
    assert!(pulled.contains("2 of 2 layers downloaded"), "{pulled}");
    assert_eq!(
        fresh.ok(&["run", "--rm", &through, "sha256sum", "-c", "/blob.sum"]),
        "/blob: OK\n"
    );
    assert_eq!(
        fresh.ok(&["run", "--rm", &through, "cat", "/blob.sum"]),
        want
    );
    let ingest = fresh.home().join("content/ingest");
    assert_eq!(std::fs::read_dir(&ingest).unwrap().count(), 0);
}

#[test]
fn missing_images_and_unreachable_registries_are_named() {
    let reg = Registry::start(false);
    let s = Strata::new();
    let missing = format!("{}/no/such:1", reg.host());
    fails_with(
        &s.run(&["pull", &missing]),
        &[&missing, "not found in", &reg.host()],
    );
    fails_with(
        &s.run(&["pull", "127.0.0.1:1/app:1"]),
        &["127.0.0.1:1", "Connection refused"],
    );
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), &[("Dockerfile", &format!("FROM {missing}\n"))]);
    fails_with(
        &s.run(&["build", "--progress", "plain", dir.path().to_str().unwrap()]),
        &["Dockerfile:1", "cannot pull base image", "not found"],
    );
}

#[test]
fn zstd_and_uncompressed_layers_pull_and_save_load_round_trip() {
    let reg = Registry::start(false);
    let s = Strata::new().with_busybox(&[]);
    s.build(
        &repo_root().join("examples/multistage-busybox"),
        &["-t", "greeting:1"],
    );
    for how in ["zstd", "uncompressed"] {
        let name = format!("{}/formats/{how}:1", reg.host());
        s.ok(&["push", "--compression", how, "greeting:1", &name]);
        let raw = skopeo(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{name}"),
        ]);
        let want = if how == "zstd" {
            "tar+zstd"
        } else {
            "layer.v1.tar\""
        };
        assert!(raw.contains(want), "{raw}");
        let fresh = Strata::new();
        fresh.ok(&["pull", &name]);
        assert_eq!(
            fresh.ok(&["run", "--rm", &name]),
            "Hello, Docker Multi-Stage Build!\n"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("greeting.tar");
    s.ok(&["save", "-o", tar.to_str().unwrap(), "greeting:1"]);
    let other = Strata::new();
    assert_eq!(
        other.ok(&["load", "-i", tar.to_str().unwrap()]),
        "Loaded image: greeting:1\n"
    );
    assert_eq!(
        other.ok(&["run", "--rm", "greeting:1"]),
        "Hello, Docker Multi-Stage Build!\n"
    );
}

#[test]
fn pull_re_resolves_a_tag_that_moved() {
    let reg = Registry::start(false);
    let s = Strata::new().with_busybox(&[]);
    let base = format!("{}/base/moving:latest", reg.host());
    let dir = tempfile::tempdir().unwrap();
    let publish = |text: &str| {
        write_files(
            dir.path(),
            &[(
                "Dockerfile",
                &format!("FROM busybox:latest\nRUN echo {text} > /version\n"),
            )],
        );
        s.build(dir.path(), &["-t", &base, "--push"]);
    };
    publish("one");
    let user = Strata::new();
    let app = tempfile::tempdir().unwrap();
    write_files(
        app.path(),
        &[(
            "Dockerfile",
            &format!("FROM {base}\nCMD [\"cat\", \"/version\"]\n"),
        )],
    );
    user.build(app.path(), &["-t", "app:1"]);
    assert_eq!(user.ok(&["run", "--rm", "app:1"]), "one\n");
    publish("two");
    // Without --pull the stored base is used, as docker build does.
    user.build(app.path(), &["-t", "app:1"]);
    assert_eq!(user.ok(&["run", "--rm", "app:1"]), "one\n");
    user.build(app.path(), &["-t", "app:1", "--pull"]);
    assert_eq!(user.ok(&["run", "--rm", "app:1"]), "two\n");
}

#[test]
fn an_index_gives_each_platform_its_own_image() {
    // An OCI layout holding a two-platform index (the same layers, a
    // config per architecture), copied to the registry with skopeo --all.
    let s = Strata::new().with_busybox(&[]);
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    s.build(
        &repo_root().join("examples/multistage-busybox"),
        &[
            "-t",
            "greeting:1",
            "--output",
            &format!("type=oci,dest={},tar=false", layout.display()),
        ],
    );
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let read_json = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index = read_json(&layout.join("index.json"));
    let amd64 = index["manifests"][0].clone();
    let manifest = read_json(&blob(amd64["digest"].as_str().unwrap()));
    let mut config = read_json(&blob(manifest["config"]["digest"].as_str().unwrap()));
    config["architecture"] = "arm64".into();
    config["variant"] = "v8".into();
    let write_blob = |v: &serde_json::Value| -> (String, usize) {
        let bytes = serde_json::to_vec(v).unwrap();
        let digest = format!(
            "sha256:{:x}",
            <sha2::Sha256 as sha2::Digest>::digest(&bytes)
        );
        std::fs::write(blob(&digest), &bytes).unwrap();
        (digest, bytes.len())
    };
    let (config_digest, config_size) = write_blob(&config);
    let mut arm = manifest.clone();
    arm["config"]["digest"] = config_digest.into();
    arm["config"]["size"] = config_size.into();
    let (arm_digest, arm_size) = write_blob(&arm);
    let mut amd = amd64.clone();
    amd["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let arm_entry = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": arm_digest,
        "size": arm_size,
        "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}
    });
    let inner = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [amd, arm_entry]
    });
    let (inner_digest, inner_size) = write_blob(&inner);
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": inner_digest,
            "size": inner_size,
            "annotations": {"org.opencontainers.image.ref.name": "multi"}
        }]
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();

    let reg = Registry::start(false);
    let name = format!("{}/multi/greeting:1", reg.host());
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.display()),
        &format!("docker://{name}"),
    ]);
    let arch = |platform: Option<&str>| -> String {
        let fresh = Strata::new();
        let mut args = vec!["pull"];
        if let Some(p) = platform {
            args.extend(["--platform", p]);
        }
        args.push(&name);
        fresh.ok(&args);
        let dest = tempfile::tempdir().unwrap();
        let tar = dest.path().join("x.tar");
        fresh.ok(&["save", "-o", tar.to_str().unwrap(), &name]);
        let model = strata_integration::image_model::read_docker_archive(&tar).unwrap();
        model.config["architecture"].as_str().unwrap().to_string()
    };
    assert_eq!(arch(None), "amd64");
    assert_eq!(arch(Some("linux/arm64/v8")), "arm64");
    let fresh = Strata::new();
    fails_with(
        &fresh.run(&["pull", "--platform", "linux/s390x", &name]),
        &["no image for linux/s390x", "linux/amd64", "linux/arm64"],
    );
}

/// `--cache-to` / `--cache-from` as CI uses them: one runner exports, a
/// fresh one imports and builds with every step cached; a tampered or
/// missing cache is a warning and stores nothing.
#[test]
fn a_cache_exported_by_one_state_gives_a_fresh_one_every_step() {
    let reg = Registry::start(false);
    let example = repo_root().join("examples/multistage-busybox");
    let cache_ref = format!("{}/ci/greeting:buildcache", reg.host());
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("cache");
    let local = local.to_str().unwrap();

    let first = Strata::new().with_busybox(&[]);
    let report_path = first.home().join("first.json");
    let out = first.run(&[
        "build",
        "--progress",
        "plain",
        "--report",
        report_path.to_str().unwrap(),
        "-t",
        "greeting:1",
        "--cache-to",
        &format!("type=registry,ref={cache_ref},mode=max"),
        "--cache-to",
        &format!("type=local,dest={local}"),
        example.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // mode=max: both stages' five steps; the default (min): the image's
    // own stage, its two COPY steps.
    assert!(
        err.contains(&format!("exported cache to {cache_ref}: 5 steps")),
        "{err}"
    );
    assert!(
        err.contains("exported cache to") && err.contains(":latest: 2 steps"),
        "{err}"
    );
    let first_report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    let image = first_report["image"]["id"].as_str().unwrap().to_string();

    // The registry holds an OCI manifest whose config says what it is.
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{cache_ref}"),
    ]);
    let manifest: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.strata.cache.v1+json"
    );

    // A fresh runner imports it: every step cached, the same image.
    let second = Strata::new().with_busybox(&[]);
    let report = second.build(&example, &["-t", "greeting:1", "--cache-from", &cache_ref]);
    assert_eq!(cached(&report), (5, 5));
    assert_eq!(report["image"]["id"], image.as_str());
    assert_eq!(
        second.ok(&["run", "--rm", "greeting:1"]),
        "Hello, Docker Multi-Stage Build!\n"
    );

    // From the directory (mode=min): the builder stage runs again, makes
    // the same files, and the image's steps are cached.
    let third = Strata::new().with_busybox(&[]);
    let report = third.build(
        &example,
        &["--cache-from", &format!("type=local,src={local}")],
    );
    assert_eq!(cached(&report), (2, 5));
    assert_eq!(report["image"]["id"], image.as_str());

    // A layer changed on disk (the image's top one: busybox's own layer is
    // stored already and not read again): refused, nothing recorded, the
    // build runs.
    let layout = std::path::Path::new(local);
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let victim = blob(
        manifest["layers"].as_array().unwrap().last().unwrap()["digest"]
            .as_str()
            .unwrap(),
    );
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let fourth = Strata::new().with_busybox(&[]);
    let report_path = fourth.home().join("fourth.json");
    let out = fourth.run(&[
        "build",
        "--progress",
        "plain",
        "--report",
        report_path.to_str().unwrap(),
        "--cache-from",
        &format!("type=local,src={local}"),
        "--cache-from",
        &format!("{}/ci/nothing:here", reg.host()),
        example.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "[Warning] cannot import cache from {local}:latest"
        )) && err.contains(&format!("cannot read layer {}", victim.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "[Warning] cannot import cache from {}/ci/nothing:here",
            reg.host()
        )),
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(cached(&report), (0, 5));

    // What is not a strata cache is named as such.
    let out = fourth.run(&["build", "--cache-to", "type=gha", example.to_str().unwrap()]);
    fails_with(&out, &["cache type gha is not supported"]);
}
