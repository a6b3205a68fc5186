//! strata's images in the tools users already have: Docker loads and runs
//! them, skopeo inspects and copies them, umoci unpacks them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use strata_integration::docker::Docker;
use strata_integration::emulator::{Arm64Emulator, QEMU_AARCH64};
use strata_integration::http::{FileServer, LAST_MODIFIED_UNIX};
use strata_integration::{
    Background, COMMAND_LIMIT, Strata, fails_with, repo_root, run_bounded, succeed, write_files,
};

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

#[test]
fn add_from_a_url_gives_what_docker_build_gives() {
    let server = FileServer::start();
    server.put("/dist/tool.sh", b"#!/bin/sh\necho tool\n");
    let url = server.url("/dist/tool.sh");
    let dir = tempfile::tempdir().unwrap();
    write_files(
        dir.path(),
        &[(
            "Dockerfile",
            &format!(
                "FROM busybox:latest\nADD {url} /dl/\nADD {url} /renamed\nADD --chown=1:2 {url} /owned/\n"
            ),
        )],
    );
    let probe = [
        "stat",
        "-c",
        "%n %a %u:%g %Y %s",
        "/dl/tool.sh",
        "/renamed",
        "/owned/tool.sh",
    ];
    let docker = Docker::shared();
    docker.load_busybox(&["busybox:latest"]);
    docker.ok(&[
        "build",
        "-q",
        "-t",
        "strata-compat/add-url",
        dir.path().to_str().unwrap(),
    ]);
    let mut run = vec!["run", "--rm", "--network", "none", "strata-compat/add-url"];
    run.extend_from_slice(&probe);
    let docker_says = docker.ok(&run);
    docker.ok(&["rmi", "strata-compat/add-url"]);

    // Both keep the server's Last-Modified as the file's time.
    let s = Strata::new().with_busybox(&[]);
    s.build(dir.path(), &["-t", "add-url"]);
    let mut run = vec!["run", "--rm", "add-url"];
    run.extend_from_slice(&probe);
    assert_eq!(s.ok(&run), docker_says);
    assert!(
        docker_says.starts_with(&format!("/dl/tool.sh 600 0:0 {LAST_MODIFIED_UNIX} 20\n")),
        "{docker_says}"
    );
}

/// A Dockerfile with a label of its own and one build arg it consumes.
const LABELLED: &str =
    "FROM busybox:latest\nARG USED=x\nLABEL from.dockerfile=yes\nRUN echo $USED > /used\n";

#[test]
fn labels_iidfile_metadata_file_and_unconsumed_build_args_as_docker_build() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(ctx.path(), &[("Dockerfile", LABELLED)]);
    let files = tempfile::tempdir().unwrap();
    let (iid, meta, report) = (
        files.path().join("iid"),
        files.path().join("meta.json"),
        files.path().join("report.json"),
    );
    let flags = [
        "--label",
        "org.example.team=build",
        "--label",
        "from.dockerfile=overridden",
        "--build-arg",
        "USED=1",
        "--build-arg",
        "NOBODY=2",
    ];
    let out = s.run(
        &[
            &["build", "-t", "flags:1", "--progress", "plain"][..],
            &flags,
            &[
                "--iidfile",
                iid.to_str().unwrap(),
                "--metadata-file",
                meta.to_str().unwrap(),
                "--report",
                report.to_str().unwrap(),
                ctx.path().to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // BuildKit's words for an argument nothing declares.
    assert!(
        err.contains("[Warning] One or more build-args [NOBODY] were not consumed"),
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let id = std::fs::read_to_string(&iid).unwrap();
    assert_eq!(id, report["image"]["id"].as_str().unwrap());
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(meta["containerimage.config.digest"], id.as_str());
    assert_eq!(
        meta["containerimage.digest"],
        report["image"]["manifest_digest"]
    );
    assert_eq!(meta["image.name"], "docker.io/library/flags:1");
    assert_eq!(meta["buildx.build.ref"], report["id"]);

    // The labels, in the image Docker loads, are the ones docker build
    // gives for the same flags.
    let archive = files.path().join("flags.tar");
    s.ok(&["save", "-o", archive.to_str().unwrap(), "flags:1"]);
    let docker = Docker::shared();
    docker.load_busybox(&["busybox:latest"]);
    docker.ok(&["load", "-i", archive.to_str().unwrap()]);
    let ours = docker.ok(&["inspect", "--format", "{{json .Config.Labels}}", "flags:1"]);
    let mut theirs = docker.cmd();
    theirs
        .args(["build", "-q", "-t", "flags-docker:1"])
        .args(flags)
        .arg(ctx.path());
    let built = theirs.output().unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let theirs = docker.ok(&[
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        "flags-docker:1",
    ]);
    assert_eq!(ours, theirs);
    let labels: serde_json::Value = serde_json::from_str(&ours).unwrap();
    assert_eq!(labels["org.example.team"], "build");
    assert_eq!(labels["from.dockerfile"], "overridden");

    // A bad label is refused, naming it.
    let bad = s.run(&["build", "--label", "novalue", ctx.path().to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--label \"novalue\": expected KEY=VALUE")
    );
}

#[test]
fn rmi_of_an_id_with_several_names_needs_force_as_docker_s_does() {
    let s = Strata::new().with_busybox(&[]);
    s.ok(&["tag", "busybox:latest", "other:1"]);
    let ids = s.ok(&["images", "-q"]);
    let id = ids.lines().next().unwrap_or("").trim();
    assert!(!id.is_empty());
    let refused = s.run(&["rmi", id]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("(must be forced) - image is referenced in multiple repositories"),
        "{err}"
    );
    let names = s.ok(&["images"]);
    assert!(
        names.contains("other") && names.contains("busybox"),
        "{names}"
    );
    // A name goes alone.
    assert_eq!(s.ok(&["rmi", "other:1"]), "Untagged: other:1\n");
    // -f takes every name.
    s.ok(&["tag", "busybox:latest", "other:1"]);
    let untagged = s.ok(&["rmi", "-f", id]);
    assert!(
        untagged.contains("Untagged: busybox:latest") && untagged.contains("Untagged: other:1"),
        "{untagged}"
    );
    assert!(!s.ok(&["images"]).contains("busybox"));
}

#[test]
fn add_unpacks_every_archive_docker_unpacks() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_files(
        &src,
        &[("tree/a.txt", "alpha\n"), ("tree/sub/b.txt", "beta\n")],
    );
    let tar = dir.path().join("ctx").join("plain.tar");
    std::fs::create_dir_all(tar.parent().unwrap()).unwrap();
    tool(
        "tar",
        &[
            "-C",
            src.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            "tree",
        ],
    );
    let ctx = tar.parent().unwrap();
    for (program, ext) in [
        ("gzip", "gz"),
        ("bzip2", "bz2"),
        ("xz", "xz"),
        ("zstd", "zst"),
    ] {
        let out = ctx.join(format!("t.tar.{ext}"));
        let made = Command::new(program)
            .args(["-c", tar.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(made.status.success(), "{program}");
        std::fs::write(&out, made.stdout).unwrap();
    }
    let dockerfile = "FROM busybox:latest\n\
        ADD t.tar.gz /gz/\nADD t.tar.bz2 /bz2/\nADD t.tar.xz /xz/\nADD t.tar.zst /zst/\n";
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let probe = "for d in gz bz2 xz zst; do cat /$d/tree/a.txt /$d/tree/sub/b.txt; done";

    let s = Strata::new().with_busybox(&[]);
    s.build(ctx, &["-t", "add-archives"]);
    let ours = s.ok(&["run", "--rm", "add-archives", "sh", "-c", probe]);
    assert_eq!(ours, "alpha\nbeta\n".repeat(4));

    // Docker 20.10 unpacks gzip, bzip2 and xz the same way (zstd came to
    // ADD in a later Docker).
    let docker = Docker::shared();
    docker.load_busybox(&["busybox:latest"]);
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:latest\nADD t.tar.gz /gz/\nADD t.tar.bz2 /bz2/\nADD t.tar.xz /xz/\n",
    )
    .unwrap();
    docker.ok(&[
        "build",
        "-q",
        "-t",
        "strata-compat/add-archives",
        ctx.to_str().unwrap(),
    ]);
    let theirs = docker.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "strata-compat/add-archives",
        "sh",
        "-c",
        "for d in gz bz2 xz; do cat /$d/tree/a.txt /$d/tree/sub/b.txt; done",
    ]);
    assert_eq!(theirs, "alpha\nbeta\n".repeat(3));
}

/// Runs `strata ARGS` in `s`'s home with `input` on its standard input.
fn with_stdin(s: &Strata, args: &[&str], input: &[u8]) -> std::process::Output {
    use std::io::Write as _;
    let mut child = s
        .cmd()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeding = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    feeding.join().unwrap();
    out
}

#[test]
fn dockerfiles_contexts_and_archives_on_standard_input_and_output() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(ctx.path(), &[("data.txt", "from the context\n")]);

    // -f -: the Dockerfile from stdin, the context from the directory.
    let out = with_stdin(
        &s,
        &[
            "build",
            "-t",
            "stdin-file:1",
            "-f",
            "-",
            ctx.path().to_str().unwrap(),
        ],
        b"FROM busybox:latest\nCOPY data.txt /data.txt\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        s.ok(&["run", "--rm", "stdin-file:1", "cat", "/data.txt"]),
        "from the context\n"
    );

    // `-` as the context: a gzipped tar of it.
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nCOPY data.txt /copied.txt\n",
        )],
    );
    let packed = Command::new("sh")
        .args([
            "-c",
            &format!("tar -C {} -c . | gzip", ctx.path().display()),
        ])
        .output()
        .unwrap()
        .stdout;
    let out = with_stdin(&s, &["build", "-t", "stdin-ctx:1", "-"], &packed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        s.ok(&["run", "--rm", "stdin-ctx:1", "cat", "/copied.txt"]),
        "from the context\n"
    );

    // `-` with a lone Dockerfile: no context; errors name it `Dockerfile`.
    let out = with_stdin(&s, &["build", "-"], b"FROM busybox:latest\nRUN exit 4\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: Dockerfile:2: [stage-0 2/2] RUN exit 4"),
        "{err}"
    );

    // save to stdout, load from stdin, into another state directory.
    let saved = s.run(&["save", "stdin-ctx:1"]);
    assert!(saved.status.success());
    assert!(
        saved.stdout.len() > 1_000_000,
        "{} bytes",
        saved.stdout.len()
    );
    let other = Strata::new();
    let out = with_stdin(&other, &["load"], &saved.stdout);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Loaded image: stdin-ctx:1\n"
    );
    assert_eq!(
        other.ok(&["run", "--rm", "stdin-ctx:1", "cat", "/copied.txt"]),
        "from the context\n"
    );
    // Nothing on stdin is an error that says so.
    let out = with_stdin(&other, &["load"], b"");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("standard input is empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn inspect_and_image_history_show_what_docker_shows_of_the_same_image() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nENV GREETING=hi\nLABEL team=build\nWORKDIR /app\nRUN echo x > /app/x\nCMD [\"sh\"]\n",
        )],
    );
    s.build(ctx.path(), &["-t", "insp:1"]);
    s.ok(&["tag", "insp:1", "insp:2"]);
    let ours: serde_json::Value = serde_json::from_str(&s.ok(&["inspect", "insp:1"])).unwrap();
    let ours = &ours[0];
    let mut tags: Vec<&str> = ours["RepoTags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tags.sort_unstable();
    assert_eq!(tags, ["insp:1", "insp:2"]);

    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("insp.tar");
    s.ok(&["save", "-o", archive.to_str().unwrap(), "insp:1"]);
    let docker = Docker::shared();
    docker.ok(&["load", "-i", archive.to_str().unwrap()]);
    let theirs: serde_json::Value =
        serde_json::from_str(&docker.ok(&["image", "inspect", "insp:1"])).unwrap();
    let theirs = &theirs[0];
    for key in ["Id", "Created", "Architecture", "Os", "Author"] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    assert_eq!(ours["RootFS"], theirs["RootFS"]);
    for key in ["Env", "Cmd", "Labels", "WorkingDir", "Entrypoint"] {
        assert_eq!(ours["Config"][key], theirs["Config"][key], "Config.{key}");
    }
    assert_eq!(
        ours["Size"].as_u64().unwrap() > 0,
        theirs["Size"].as_u64().unwrap() > 0
    );

    // The history: the same entries, newest first.
    let ours = s.ok(&["image", "history", "--no-trunc", "insp:1"]);
    let theirs = docker.ok(&[
        "history",
        "--no-trunc",
        "--format",
        "{{.CreatedBy}}",
        "insp:1",
    ]);
    let rows: Vec<&str> = ours.lines().skip(1).collect();
    assert_eq!(rows.len(), theirs.lines().count(), "{ours}\n{theirs}");
    for (row, by) in rows.iter().zip(theirs.lines()) {
        assert!(row.contains(by.trim()), "{row:?} lacks {by:?}");
    }
    assert!(rows[0].starts_with(&ours_id(&s)), "{ours}");

    let missing = s.run(&["inspect", "nope:1"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("Error: No such image: nope:1"));
}

/// The short ID of `insp:1` as `strata images -q` prints it.
fn ours_id(s: &Strata) -> String {
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["inspect", "insp:1"])).unwrap();
    let id = v[0]["Id"].as_str().unwrap();
    id.strip_prefix("sha256:").unwrap()[..12].to_string()
}

#[test]
fn images_filters_and_formats_as_docker_images() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest\nLABEL tier=web\nRUN echo a > /a\n",
        )],
    );
    s.build(
        ctx.path(),
        &["-t", "web:1", "--build-arg", "SOURCE_DATE_EPOCH=1800000000"],
    );
    s.ok(&["tag", "web:1", "web:2"]);
    let names = |args: &[&str]| {
        let mut v: Vec<String> = s
            .ok(&[
                &["images", "--format", "{{.Repository}}:{{.Tag}}"][..],
                args,
            ]
            .concat())
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&[]), ["busybox:latest", "web:1", "web:2"]);
    assert_eq!(names(&["web"]), ["web:1", "web:2"]);
    assert_eq!(names(&["web:2"]), ["web:2"]);
    assert_eq!(names(&["-f", "reference=bu*"]), ["busybox:latest"]);
    assert_eq!(names(&["-f", "label=tier=web"]), ["web:1", "web:2"]);
    assert_eq!(names(&["-f", "label=tier=db"]), Vec::<String>::new());
    assert_eq!(names(&["-f", "since=busybox:latest"]), ["web:1", "web:2"]);
    assert_eq!(names(&["-f", "dangling=true"]), Vec::<String>::new());

    let table = s.ok(&[
        "images",
        "web:1",
        "--format",
        "table {{.Repository}}\\t{{.Tag}}\\t{{.ID}}",
    ]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].starts_with("REPOSITORY   TAG   IMAGE ID"),
        "{table}"
    );
    let row: serde_json::Value =
        serde_json::from_str(&s.ok(&["images", "web:1", "--format", "{{json .}}"])).unwrap();
    assert_eq!(row["Repository"], "web");
    assert_eq!(row["CreatedAt"], "2027-01-15 08:00:00 +0000 UTC");
    assert!(row["Digest"].as_str().unwrap().starts_with("sha256:"));

    let bad = s.run(&["images", "-f", "colour=red"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid filter 'colour'"));
    let bad = s.run(&["images", "--format", "{{.Nope}}"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("can't evaluate field Nope"));
}

#[test]
fn no_cache_filter_runs_only_the_named_stages_again() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox:latest AS Builder\nRUN echo built > /out\n\
             FROM busybox:latest\nCOPY --from=builder /out /out\nRUN cat /out > /copy\n",
        )],
    );
    s.build(ctx.path(), &[]);
    let report = s.build(ctx.path(), &["--no-cache-filter", "BUILDER"]);
    let cached: Vec<(String, bool)> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| {
            (
                st["stage"].as_str().unwrap().to_string(),
                st["cached"].as_bool().unwrap(),
            )
        })
        .collect();
    // The builder ran again; what follows it made the same bytes, so the
    // steps after it still come from the cache (their keys are content's).
    assert!(
        cached.contains(&("builder".to_string(), false)),
        "{cached:?}"
    );
    assert!(
        cached
            .iter()
            .filter(|(st, _)| st != "builder")
            .all(|(_, c)| *c),
        "{cached:?}"
    );
}

/// A build whose result is files, as CI jobs export binaries.
const EXPORTED: &str = "FROM busybox AS build\nRUN mkdir -p /out/bin && echo built > /out/bin/app && chmod 755 /out/bin/app && ln -s bin/app /out/link\nFROM scratch\nCOPY --from=build /out /\n";

/// What a tar archive holds: `(name, kind, link target)` sorted.
fn tar_listing(bytes: &[u8]) -> Vec<(String, char, String)> {
    let mut a = tar::Archive::new(bytes);
    let mut out: Vec<(String, char, String)> = a
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_string();
            let kind = match e.header().entry_type() {
                tar::EntryType::Directory => 'd',
                tar::EntryType::Symlink => 'l',
                _ => 'f',
            };
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, kind, link)
        })
        .filter(|(n, _, _)| !n.is_empty() && n != ".")
        .collect();
    out.sort();
    out
}

/// What a directory holds, in [`tar_listing`]'s terms.
fn dir_listing(root: &std::path::Path) -> Vec<(String, char, String)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let name = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                let to = std::fs::read_link(&p).unwrap();
                out.push((name, 'l', to.to_string_lossy().into_owned()));
            } else if ft.is_dir() {
                out.push((name, 'd', String::new()));
                todo.push(p);
            } else {
                out.push((name, 'f', String::new()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn outputs_of_files_to_a_directory_a_tar_and_standard_output_as_docker_build() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(ctx.path(), &[("Dockerfile", EXPORTED)]);
    let out = tempfile::tempdir().unwrap();
    let ctx_arg = ctx.path().to_str().unwrap();

    // -o DIR is type=local.
    let dir = out.path().join("dir");
    s.ok(&["build", "-q", "-o", dir.to_str().unwrap(), ctx_arg]);
    assert_eq!(
        std::fs::read_to_string(dir.join("bin/app")).unwrap(),
        "built\n"
    );
    let ours = dir_listing(&dir);
    assert_eq!(
        ours,
        [
            ("bin".to_string(), 'd', String::new()),
            ("bin/app".to_string(), 'f', String::new()),
            ("link".to_string(), 'l', "bin/app".to_string()),
        ]
    );

    // type=tar,dest=FILE and -o - give the same tree as one archive.
    let file = out.path().join("files.tar");
    s.ok(&[
        "build",
        "--output",
        &format!("type=tar,dest={}", file.display()),
        ctx_arg,
    ]);
    assert_eq!(tar_listing(&std::fs::read(&file).unwrap()), ours);
    let piped = s.run(&["build", "-o", "-", ctx_arg]);
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert_eq!(tar_listing(&piped.stdout), ours);

    // docker build -o writes the same files.
    let docker = Docker::shared();
    docker.load_busybox(&["busybox:latest"]);
    let theirs = out.path().join("docker");
    let built = docker
        .cmd()
        .args(["build", "-q", "-o"])
        .arg(format!("type=local,dest={}", theirs.display()))
        .arg(ctx.path())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    assert_eq!(dir_listing(&theirs), ours);

    // Nonsense is refused, naming it.
    let bad = s.run(&["build", "--output", "type=local,dest=-", ctx_arg]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("type=local writes a directory"));
    let two = s.run(&[
        "build",
        "-o",
        "-",
        "--output",
        "type=docker,dest=-",
        ctx_arg,
    ]);
    assert!(!two.status.success());
    assert!(
        String::from_utf8_lossy(&two.stderr)
            .contains("only one --output can go to standard output")
    );
}

#[test]
fn load_puts_the_image_into_the_docker_engine() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox\nRUN echo loaded > /greeting\nCMD [\"cat\", \"/greeting\"]\n",
        )],
    );
    let docker = Docker::shared();
    let built = s
        .cmd()
        .env("DOCKER_HOST", docker.host())
        .args(["build", "--load", "-t", "strata-compat/loaded:1"])
        .arg(ctx.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{err}");
    assert!(
        err.contains("Loaded image: strata-compat/loaded:1"),
        "{err}"
    );
    let said = docker.ok(&["run", "--rm", "--network", "none", "strata-compat/loaded:1"]);
    assert_eq!(said, "loaded\n");
    docker.ok(&["rmi", "strata-compat/loaded:1"]);

    // With no engine there, the build says so and fails; the image stays
    // in strata's store.
    let gone = s
        .cmd()
        .env("DOCKER_HOST", "unix:///run/no-such-docker.sock")
        .args(["build", "--load", "-t", "strata-compat/loaded:2"])
        .arg(ctx.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(!gone.status.success());
    assert!(
        err.contains("unix:///run/no-such-docker.sock") && err.contains("strata images"),
        "{err}"
    );
    assert!(s.ok(&["images"]).contains("strata-compat/loaded"));
}

#[test]
fn network_add_host_shm_size_and_ulimit_reach_every_run() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox AS probe\nRUN mkdir /out && cp /etc/hosts /out/hosts && ulimit -Sn > /out/nofile && grep ' /dev/shm ' /proc/mounts > /out/shm && cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' > /out/net\nFROM scratch\nCOPY --from=probe /out /\n",
        )],
    );
    let ctx_arg = ctx.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("flags");
    s.ok(&[
        "build",
        "--add-host",
        "db.internal:10.1.2.3",
        "--ulimit",
        "nofile=512:1024",
        "--shm-size",
        "128m",
        "--network",
        "none",
        "-o",
        dir.to_str().unwrap(),
        ctx_arg,
    ]);
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
    assert!(
        read("hosts").contains("10.1.2.3\tdb.internal\n"),
        "{}",
        read("hosts")
    );
    assert_eq!(read("nofile"), "512\n");
    assert!(read("shm").contains("size=131072k"), "{}", read("shm"));
    assert_eq!(read("net"), "lo\n");

    // The defaults differ, so nothing above came from the cache.
    let plain = out.path().join("plain");
    s.ok(&["build", "-o", plain.to_str().unwrap(), ctx_arg]);
    let plain_read = |n: &str| std::fs::read_to_string(plain.join(n)).unwrap();
    assert!(!plain_read("hosts").contains("db.internal"));
    assert!(plain_read("shm").contains("size=65536k"));

    // --network host asks for its entitlement, which this machine must grant.
    let refused = s.run(&["build", "--network", "host", ctx_arg]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("network.host"), "{err}");
    let host = out.path().join("host");
    s.ok(&[
        "build",
        "--network",
        "host",
        "--allow-insecure-entitlement",
        "network.host",
        "-o",
        host.to_str().unwrap(),
        ctx_arg,
    ]);
    let host_net = std::fs::read_to_string(host.join("net")).unwrap();
    assert!(
        host_net.lines().count() > 1,
        "the host's interfaces: {host_net}"
    );

    // Nonsense is refused, naming it.
    for (flag, value, says) in [
        ("--ulimit", "files=1", "unknown limit"),
        ("--add-host", "db", "expected NAME:IP"),
        ("--shm-size", "lots", "expected a size"),
        ("--network", "bridge", "default, none or host"),
    ] {
        let bad = s.run(&["build", flag, value, ctx_arg]);
        assert!(!bad.status.success());
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
}

#[test]
fn progress_rawjson_is_buildkit_s_solve_status_a_line_each() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM busybox\nRUN echo hello-rawjson\n")],
    );
    let out = s.run(&[
        "build",
        "--progress",
        "rawjson",
        ctx.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let statuses: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let vertexes: Vec<&serde_json::Value> = statuses
        .iter()
        .filter_map(|s| s["vertexes"].as_array())
        .flatten()
        .collect();
    let run = vertexes
        .iter()
        .find(|v| {
            v["name"]
                .as_str()
                .unwrap()
                .contains("RUN echo hello-rawjson")
                && v["completed"].is_string()
        })
        .expect("the RUN step completes");
    assert!(run["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(run["started"].is_string());
    let logs: Vec<u8> = statuses
        .iter()
        .filter_map(|s| s["logs"].as_array())
        .flatten()
        .filter(|l| l["vertex"] == run["digest"])
        .flat_map(|l| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(l["data"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    assert_eq!(String::from_utf8_lossy(&logs), "hello-rawjson\n");
}

#[test]
fn build_contexts_stand_for_images_directories_layouts_and_stages() {
    let s = Strata::new().with_busybox(&[]);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // An image to use as a layout: built and written as one.
    write_files(
        &w.join("lay"),
        &[
            ("Dockerfile", "FROM scratch\nCOPY hello /hello\n"),
            ("hello", "from a layout\n"),
        ],
    );
    let layout = w.join("layout");
    s.ok(&[
        "build",
        "--output",
        &format!("type=oci,dest={},tar=false", layout.display()),
        w.join("lay").to_str().unwrap(),
    ]);

    // A directory with its own .dockerignore.
    write_files(
        &w.join("docs"),
        &[
            ("a.txt", "first\n"),
            ("secret.txt", "kept out\n"),
            (".dockerignore", "secret.txt\n"),
        ],
    );

    write_files(
        &w.join("ctx"),
        &[(
            "Dockerfile",
            "FROM base\n\
             COPY --from=docs / /docs/\n\
             COPY --from=lay /hello /hello\n\
             RUN --mount=from=docs,target=/m cat /m/a.txt > /from-mount\n\
             FROM busybox AS tools\n\
             RUN echo built > /tool\n\
             FROM scratch\n\
             COPY --from=0 /docs /docs\n\
             COPY --from=0 /hello /from-mount /\n\
             COPY --from=tools /tool /tool\n",
        )],
    );
    let ctx = w.join("ctx");
    let out = w.join("out");
    let build = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "build".to_string(),
            "--build-context".into(),
            "base=docker-image://busybox:latest".into(),
            "--build-context".into(),
            format!("docs={}", w.join("docs").display()),
            "--build-context".into(),
            format!("lay=oci-layout://{}", layout.display()),
            "-o".into(),
            out.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(ctx.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        s.ok(&args)
    };
    build(&out, &[]);
    let read = |dir: &std::path::Path, n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
    assert_eq!(read(&out, "docs/a.txt"), "first\n");
    assert!(!out.join("docs/secret.txt").exists());
    assert_eq!(read(&out, "hello"), "from a layout\n");
    assert_eq!(read(&out, "from-mount"), "first\n");
    assert_eq!(read(&out, "tool"), "built\n");

    // A directory context is read again each build: an edit reaches it.
    std::fs::write(w.join("docs/a.txt"), "second\n").unwrap();
    let again = w.join("again");
    build(&again, &[]);
    assert_eq!(read(&again, "docs/a.txt"), "second\n");
    assert_eq!(read(&again, "from-mount"), "second\n");

    // A context named as a stage replaces the stage, as in buildx.
    let replaced = w.join("replaced");
    let tool = w.join("lay/tool");
    std::fs::write(&tool, "from a directory\n").unwrap();
    build(
        &replaced,
        &[
            "--build-context",
            &format!("tools={}", w.join("lay").display()),
        ],
    );
    assert_eq!(read(&replaced, "tool"), "from a directory\n");

    // Without the contexts, the names are images nobody has.
    let missing = s.run(&["build", ctx.to_str().unwrap()]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("base"), "{err}");

    // Nonsense is refused, naming it.
    for (arg, says) in [
        ("docs", "expected NAME=VALUE"),
        ("docs=https://example.com/docs.git", "URL context"),
        (
            "docs=/nonexistent/dir",
            "/nonexistent/dir is not a directory",
        ),
        ("lay=oci-layout:///nonexistent", "not an OCI layout"),
    ] {
        let bad = s.run(&["build", "--build-context", arg, ctx.to_str().unwrap()]);
        assert!(!bad.status.success(), "{arg}");
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains(says), "{arg}: {err}");
    }
}

#[test]
fn platforms_are_built_as_asked_or_refused() {
    let s = Strata::new().with_busybox(&[]);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let run_ctx = w.join("run");
    write_files(
        &run_ctx,
        &[("Dockerfile", "FROM base\nRUN uname -m > /m\n")],
    );
    let copy_ctx = w.join("copy");
    write_files(
        &copy_ctx,
        &[
            (
                "Dockerfile",
                "FROM scratch\nARG TARGETPLATFORM\nCOPY f /f\n",
            ),
            ("f", "x\n"),
        ],
    );
    let refused = |args: &[&str], says: &str| {
        let out = s.run(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    };
    let copy = copy_ctx.to_str().unwrap();
    let run = run_ctx.to_str().unwrap();

    refused(
        &["build", "--platform", "foo/bar", copy],
        "unknown operating system or architecture",
    );
    // Several platforms make an index, which neither the local store nor
    // the Docker engine holds under one name.
    refused(
        &[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "--load",
            copy,
        ],
        "--load (the Docker engine) takes one platform",
    );
    refused(
        &[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            "type=docker,dest=/tmp/x.tar",
            copy,
        ],
        "--output type=docker takes one platform",
    );
    refused(
        &[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "--push",
            copy,
        ],
        "pushing needs a name",
    );

    // Files and config build for any platform, and the image says which.
    s.ok(&[
        "build",
        "--platform",
        "linux/arm64",
        "-t",
        "files:arm64",
        copy,
    ]);
    let inspect: serde_json::Value =
        serde_json::from_str(&s.ok(&["inspect", "files:arm64"])).unwrap();
    assert_eq!(inspect[0]["Architecture"], "arm64");
    assert_eq!(inspect[0]["Os"], "linux");

    // A base image of another platform is not built on as if it were this one.
    refused(
        &[
            "build",
            "--platform",
            "linux/arm64",
            "--build-context",
            "base=docker-image://busybox:latest",
            run,
        ],
        "cannot use image base\n  caused by: it is for linux/amd64, not linux/arm64",
    );

    // An arm64 busybox: its steps run only where an emulator is registered.
    let arm = strata_integration::base_image_tar("busybox-arm64");
    s.ok(&[
        "image",
        "import",
        "--platform",
        "linux/arm64",
        "busybox-arm:latest",
        arm.to_str().unwrap(),
    ]);
    let build_arm = [
        "build",
        "--platform",
        "linux/arm64",
        "--build-context",
        "base=docker-image://busybox-arm:latest",
        "-t",
        "uname:arm64",
        run,
    ];
    if !std::path::Path::new(QEMU_AARCH64).exists() {
        eprintln!("no arm64 emulator on this machine ({QEMU_AARCH64}): checking the refusal only");
    }
    if !Arm64Emulator::already() {
        refused(
            &build_arm,
            "stage stage-0 runs steps for linux/arm64, which this machine cannot run",
        );
    }
    if !std::path::Path::new(QEMU_AARCH64).exists() {
        return;
    }
    let _emulator = Arm64Emulator::register();
    s.ok(&build_arm);
    assert_eq!(
        s.ok(&["run", "--rm", "uname:arm64", "cat", "/m"]),
        "aarch64\n"
    );

    // --platform a,b: a multi-platform base made from the two busybox
    // trees and pushed as an index, then an image built on it for both
    // platforms, each RUN on its own (arm64 emulated), as an index in a
    // registry and in an OCI layout, and each platform's files apart.
    let reg = strata_integration::registry::Registry::start(false);
    let base_ctx = w.join("multi-base");
    std::fs::create_dir_all(&base_ctx).unwrap();
    std::fs::copy(
        strata_integration::busybox_tar(),
        base_ctx.join("busybox-amd64.tar"),
    )
    .unwrap();
    std::fs::copy(&arm, base_ctx.join("busybox-arm64.tar")).unwrap();
    write_files(
        &base_ctx,
        &[(
            "Dockerfile",
            "FROM scratch\nARG TARGETARCH\nADD busybox-${TARGETARCH}.tar /\n",
        )],
    );
    let base = format!("{}/multi/busybox:1", reg.host());
    s.ok(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        &base,
        "--push",
        base_ctx.to_str().unwrap(),
    ]);
    let raw: serde_json::Value = serde_json::from_str(&tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--raw",
            &format!("docker://{base}"),
        ],
    ))
    .unwrap();
    assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json");
    let arches: Vec<&str> = raw["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(arches, ["amd64", "arm64"]);

    let app_ctx = w.join("multi-app");
    write_files(
        &app_ctx,
        &[(
            "Dockerfile",
            &format!(
                "FROM {base}\nARG TARGETPLATFORM\nRUN echo \"$TARGETPLATFORM $(uname -m)\" > /m\n"
            ),
        )],
    );
    let fresh = Strata::new();
    let app = format!("{}/multi/app:1", reg.host());
    let layout = w.join("app-oci.tar");
    let files = w.join("app-files");
    let iid = w.join("app.iid");
    let out = fresh.run(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        &app,
        "--push",
        "-o",
        &format!("type=oci,dest={}", layout.display()),
        "-o",
        &format!("type=local,dest={}", files.display()),
        "--iidfile",
        iid.to_str().unwrap(),
        "--cache-to",
        &format!("type=local,dest={},mode=max", w.join("app-cache").display()),
        app_ctx.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("built 2 platforms (linux/amd64, linux/arm64); image index sha256:"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(files.join("linux_amd64/m")).unwrap(),
        "linux/amd64 x86_64\n"
    );
    assert_eq!(
        std::fs::read_to_string(files.join("linux_arm64/m")).unwrap(),
        "linux/arm64 aarch64\n"
    );
    // skopeo takes each platform from the pushed index and from the layout.
    for source in [
        format!("docker://{app}"),
        format!("oci-archive:{}", layout.display()),
    ] {
        for (arch, uname) in [("amd64", "x86_64"), ("arm64", "aarch64")] {
            let dir = w.join(format!("copied-{arch}-{}", source.len()));
            tool(
                "skopeo",
                &[
                    "copy",
                    "--src-tls-verify=false",
                    "--override-arch",
                    arch,
                    &source,
                    &format!("dir:{}", dir.display()),
                ],
            );
            let manifest: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
            let top = manifest["layers"].as_array().unwrap().last().unwrap()["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string();
            let listing = Command::new("tar")
                .arg("-xzOf")
                .arg(dir.join(&top))
                .arg("m")
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&listing.stdout),
                format!("linux/{arch} {uname}\n"),
                "{source} {arch}"
            );
        }
    }
    // One cache holds every platform's steps: a fresh state imports it
    // once and builds both platforms from it.
    assert!(err.contains("exported cache to "), "{err}");
    let third = Strata::new();
    let again = third.run(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "--cache-from",
        &format!("type=local,src={}", w.join("app-cache").display()),
        app_ctx.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert_eq!(err.matches("imported cache from ").count(), 1, "{err}");
    let per_platform: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("built image in "))
        .collect();
    assert_eq!(per_platform.len(), 2, "{err}");
    for line in per_platform {
        assert!(line.contains(": 1 steps, 1 cached;"), "{line}");
    }

    // The ID file holds the index's digest, which the registry serves.
    let digest = std::fs::read_to_string(&iid).unwrap();
    let served = tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--raw",
            &format!("docker://{app}"),
        ],
    );
    assert_eq!(
        format!(
            "sha256:{:x}",
            <sha2::Sha256 as sha2::Digest>::digest(served.as_bytes())
        ),
        digest
    );
}

/// An `ssh-agent` of the test's own, stopped when dropped.
struct Agent {
    _server: Background,
    socket: std::path::PathBuf,
}

impl Agent {
    fn start(dir: &std::path::Path) -> Agent {
        let socket = dir.join("agent.sock");
        let server = Background::start(
            Command::new("ssh-agent").arg("-D").arg("-a").arg(&socket),
            "ssh-agent (Debian's openssh-client)",
            || socket.exists(),
        );
        Agent {
            _server: server,
            socket,
        }
    }
}

/// `ssh-add` and the libraries it loads, flat in `dir`, with the loader
/// as `dir/ld.so`, so a busybox step can run it.
fn ssh_add_into(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy("/usr/bin/ssh-add", dir.join("ssh-add")).unwrap();
    let ldd = tool("ldd", &["/usr/bin/ssh-add"]);
    for line in ldd.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let name = std::path::Path::new(path).file_name().unwrap();
        let to = if path.contains("/ld-linux") {
            dir.join("ld.so")
        } else {
            dir.join(name)
        };
        std::fs::copy(path, to).unwrap();
    }
}

#[test]
fn ssh_agents_reach_run_mount_ssh_and_no_key_enters_the_build() {
    let s = Strata::new().with_busybox(&[]);
    let keys = tempfile::tempdir().unwrap();
    let agent = Agent::start(keys.path());
    let key = keys.path().join("id_ed25519");
    tool(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "strata-ssh-test",
            "-f",
            key.to_str().unwrap(),
        ],
    );
    succeed(
        Command::new("ssh-add")
            .arg(&key)
            .env("SSH_AUTH_SOCK", &agent.socket),
    );

    let ctx = tempfile::tempdir().unwrap();
    ssh_add_into(&ctx.path().join("tools"));
    let list = "/tools/ld.so --library-path /tools /tools/ssh-add -l";
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            &format!(
                "FROM busybox\n\
                 RUN --mount=type=bind,source=tools,target=/tools --mount=type=ssh {list} > /keys && echo \"sock=$SSH_AUTH_SOCK\" >> /keys\n\
                 USER 1000\n\
                 RUN --mount=type=bind,source=tools,target=/tools --mount=type=ssh,id=deploy,required=true,uid=1000,target=/tmp/agent {list} > /tmp/deploy\n"
            ),
        )],
    );
    let ctx_arg = ctx.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("files");
    let deploy = format!("deploy={}", agent.socket.display());
    let built = run_bounded(
        s.cmd()
            .env("SSH_AUTH_SOCK", &agent.socket)
            .args(["build", "--ssh", "default", "--ssh", &deploy, "-o"])
            .arg(&dest)
            .arg(ctx_arg),
        COMMAND_LIMIT,
    );
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    // Root and user 1000 (the mount's uid) both reach the agent and see its key.
    let listed = std::fs::read_to_string(dest.join("keys")).unwrap();
    assert!(listed.contains("strata-ssh-test (ED25519)"), "{listed}");
    assert!(
        listed.contains("sock=/run/buildkit/ssh_agent.0"),
        "{listed}"
    );
    let as_user = std::fs::read_to_string(dest.join("tmp/deploy")).unwrap();
    assert!(as_user.contains("strata-ssh-test (ED25519)"), "{as_user}");
    // Neither the socket nor the directory made for it is in the image.
    assert!(!dest.join("run/buildkit").exists());
    assert!(!dest.join("tmp/agent").exists());
    // No byte of the key is anywhere in the state directory.
    let private = std::fs::read_to_string(&key).unwrap();
    let secret_line = private.lines().nth(2).unwrap().to_string();
    let grep = Command::new("grep")
        .args(["-rqF", &secret_line])
        .arg(s.home())
        .status()
        .unwrap();
    assert!(
        !grep.success(),
        "the private key reached the state directory"
    );

    // The agent is no part of a step's key: the same build without it is
    // taken from the cache, as BuildKit's is.
    let again = s.build(ctx.path(), &[]);
    assert_eq!(strata_integration::cached(&again), (2, 2));
    // A step that runs needs a required agent, and names it; an optional
    // one is skipped, as BuildKit skips it.
    let other = tempfile::tempdir().unwrap();
    write_files(
        other.path(),
        &[
            (
                "required.Dockerfile",
                "FROM busybox\nRUN --mount=type=ssh,id=deploy,required=true true\n",
            ),
            (
                "optional.Dockerfile",
                "FROM busybox\nRUN --mount=type=ssh test -S \"$SSH_AUTH_SOCK\" || echo none > /none\n",
            ),
        ],
    );
    let other_arg = other.path().to_str().unwrap();
    let required = other.path().join("required.Dockerfile");
    let refused = s.run(&["build", "-f", required.to_str().unwrap(), other_arg]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("SSH agent \"deploy\" is required"), "{err}");
    assert!(err.contains("--ssh deploy=SOCKET"), "{err}");
    let optional = other.path().join("optional.Dockerfile");
    let skipped = out.path().join("skipped");
    s.ok(&[
        "build",
        "-f",
        optional.to_str().unwrap(),
        "-o",
        skipped.to_str().unwrap(),
        other_arg,
    ]);
    assert!(skipped.join("none").exists());

    // What cannot be forwarded is refused by name.
    let unset = run_bounded(
        s.cmd()
            .env_remove("SSH_AUTH_SOCK")
            .args(["build", "--ssh", "default", ctx_arg]),
        COMMAND_LIMIT,
    );
    fails_with(&unset, &["SSH_AUTH_SOCK is not set"]);
    let key_file = format!("default={}", key.display());
    let not_socket = s.run(&["build", "--ssh", &key_file, ctx_arg]);
    fails_with(&not_socket, &["is not an agent socket"]);
    let cluster = s.run(&[
        "build",
        "--ssh",
        &deploy,
        "--cluster",
        "/nonexistent",
        ctx_arg,
    ]);
    fails_with(&cluster, &["drop --cluster"]);
}

/// `git ARGS` in `dir`, as a fixed author.
fn git_in(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=strata",
            "-c",
            "user.email=strata@example.com",
        ])
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "protocol.file.allow=always",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `git daemon` serving `base` on a free loopback port; stopped when dropped.
struct GitDaemon {
    _server: Background,
    port: u16,
}

impl GitDaemon {
    fn start(base: &std::path::Path) -> GitDaemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // git-daemon itself, not `git daemon`, which forks it: killing the
        // child must stop the server.
        let exec_path = tool("git", &["--exec-path"]);
        let server = Background::start(
            Command::new(std::path::Path::new(exec_path.trim()).join("git-daemon"))
                .arg("--reuseaddr")
                .arg("--export-all")
                .arg("--listen=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(format!("--base-path={}", base.display()))
                .arg(base),
            "git daemon",
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        GitDaemon {
            _server: server,
            port,
        }
    }
}

#[test]
fn git_repositories_are_contexts_at_a_branch_a_tag_a_commit_and_a_directory() {
    let s = Strata::new();
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git_in(&work, &["init", "-q"]);
    let copy_all = "FROM scratch\nCOPY . /\n";
    write_files(
        &work,
        &[
            ("Dockerfile", copy_all),
            ("version", "1"),
            ("sub/Dockerfile", copy_all),
            ("sub/only-sub", "sub 1"),
            (".dockerignore", "ignored\n"),
            ("ignored", "x"),
        ],
    );
    git_in(&work, &["add", "-A"]);
    git_in(&work, &["commit", "-q", "-m", "one"]);
    git_in(&work, &["tag", "v1"]);
    let first = git_in(&work, &["rev-parse", "HEAD"]);
    git_in(&work, &["checkout", "-q", "-b", "feature"]);
    write_files(&work, &[("version", "feature")]);
    git_in(&work, &["commit", "-q", "-am", "feature"]);
    git_in(&work, &["checkout", "-q", "main"]);
    write_files(&work, &[("version", "2"), ("sub/only-sub", "sub 2")]);
    std::os::unix::fs::symlink("/etc", work.join("escape")).unwrap();
    git_in(&work, &["add", "-A"]);
    git_in(&work, &["commit", "-q", "-m", "two"]);
    let repos = root.path().join("repos");
    std::fs::create_dir_all(&repos).unwrap();
    git_in(
        root.path(),
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            "repos/app.git",
        ],
    );
    let daemon = GitDaemon::start(&repos);
    let url = format!("git://127.0.0.1:{}/app.git", daemon.port);

    let out = tempfile::tempdir().unwrap();
    let mut n = 0;
    let mut files_of = |context: &str, extra: &[&str]| {
        n += 1;
        let dest = out.path().join(n.to_string());
        let mut args = vec!["build", "-o", dest.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.push(context);
        s.ok(&args);
        dest
    };
    let read = |d: &std::path::Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();

    // The remote's HEAD, without .git; as BuildKit, which applies
    // .dockerignore only to a client's own files, it hides nothing.
    let head = files_of(&url, &[]);
    assert_eq!(read(&head, "version"), "2");
    assert!(!head.join(".git").exists());
    assert!(head.join("ignored").exists());
    assert_eq!(read(&files_of(&format!("{url}#v1"), &[]), "version"), "1");
    assert_eq!(
        read(&files_of(&format!("{url}#feature"), &[]), "version"),
        "feature"
    );
    assert_eq!(
        read(&files_of(&format!("{url}#{first}"), &[]), "version"),
        "1"
    );
    let sub = files_of(&format!("{url}#main:sub"), &[]);
    assert_eq!(read(&sub, "only-sub"), "sub 2");
    assert!(!sub.join("version").exists());
    // -f names a file of the repository; the context stays its root.
    let with_file = files_of(&format!("{url}#v1"), &["-f", "sub/Dockerfile"]);
    assert_eq!(read(&with_file, "version"), "1");

    // docker build takes the same URLs to the same files (docker 20.10's
    // BuildKit takes no directory, "subdir not supported yet", and takes
    // `master` for the remote's HEAD, so the branch is named).
    let docker = Docker::shared();
    let tagged = files_of(&format!("{url}#v1"), &[]);
    for (fragment, ours) in [("#v1", &tagged), ("#main", &head)] {
        let theirs = out.path().join(format!("docker{fragment}"));
        let built = docker
            .cmd()
            .args(["build", "-q", "-o"])
            .arg(format!("type=local,dest={}", theirs.display()))
            .arg(format!("{url}{fragment}"))
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        assert_eq!(dir_listing(&theirs), dir_listing(ours), "{fragment}");
    }

    // The same over a dumb HTTP server, which serves no shallow fetch.
    let bare = repos.join("app.git");
    git_in(&bare, &["update-server-info"]);
    let http = FileServer::start();
    for entry in walk_files(&bare) {
        let name = entry.strip_prefix(&bare).unwrap().to_str().unwrap();
        http.put(&format!("/app.git/{name}"), &std::fs::read(&entry).unwrap());
    }
    let over_http = files_of(&format!("{}#v1:sub", http.url("/app.git")), &[]);
    assert_eq!(read(&over_http, "only-sub"), "sub 1");

    // What cannot be a context is named.
    for (context, says) in [
        (format!("{url}#nope"), "nope"),
        (
            format!("{url}#main:escape"),
            "not a directory inside the repository",
        ),
        (
            format!("{url}#main:../x"),
            "plain path inside the repository",
        ),
        (format!("{url}#main:missing"), "no directory \"missing\""),
        (
            format!("git://127.0.0.1:{}/none.git", daemon.port),
            "none.git",
        ),
    ] {
        let bad = s.run(&["build", &context]);
        assert!(!bad.status.success(), "{context}");
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains(says), "{context}: {err}");
    }
    // A fetched context leaves nothing behind in the state directory.
    let tmp = s.home().join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !left
            .iter()
            .any(|n| n.to_string_lossy().starts_with("git-context-")),
        "{left:?}"
    );
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn build_checks_warn_in_buildkit_s_words_and_the_check_directive_gates_them() {
    let s = Strata::new().with_busybox(&[]);
    let ctx = tempfile::tempdir().unwrap();
    let flawed = "FROM busybox as Build\nCMD echo hi\n";
    write_files(ctx.path(), &[("Dockerfile", flawed)]);
    let ctx_arg = ctx.path().to_str().unwrap();

    // A build warns and goes on.
    let built = s.run(&["build", "-t", "app:1", ctx_arg]);
    let err = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{err}");
    for line in [
        " 3 warnings found:",
        " - FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)",
        " - StageNameCasing: Stage name 'Build' should be lowercase (line 1)",
        " - JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended behavior related to OS signals (line 2)",
    ] {
        assert!(err.contains(line), "{line:?} not in {err}");
    }

    // --check checks instead of building, as buildx's: exit 1 with findings.
    let checked = s.run(&["build", "--check", "-t", "checked:1", ctx_arg]);
    assert_eq!(checked.status.code(), Some(1));
    let err = String::from_utf8_lossy(&checked.stderr);
    assert!(
        err.contains("Check complete, 3 warnings have been found!"),
        "{err}"
    );
    assert!(
        err.contains(
            "WARN: JSONArgsRecommended - https://docs.docker.com/go/dockerfile/rule/json-args-recommended/"
        ),
        "{err}"
    );
    assert!(err.contains("   2 | >>> CMD echo hi"), "{err}");
    assert!(s.ok(&["images", "-q", "checked"]).trim().is_empty());

    // error=true in the check directive refuses the build; the build
    // argument BuildKit reads overrides the directive.
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            &format!("# check=skip=StageNameCasing;error=true\n{flawed}"),
        )],
    );
    let refused = s.run(&["build", ctx_arg]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("lint violation found for rules: FromAsCasing, JSONArgsRecommended"),
        "{err}"
    );
    let skipped = s.run(&[
        "build",
        "--build-arg",
        "BUILDKIT_DOCKERFILE_CHECK=skip=all",
        ctx_arg,
    ]);
    let err = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "{err}");
    assert!(!err.contains("warning"), "{err}");

    // A clean Dockerfile checks clean.
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox AS build\nCMD [\"echo\", \"hi\"]\n",
        )],
    );
    let clean = s.run(&["build", "--check", ctx_arg]);
    assert_eq!(clean.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&clean.stderr).contains("Check complete, no warnings found."));

    // UndefinedVar needs the base image's environment (busybox sets PATH):
    // planning finds it, for --check, for a build's warnings, and for
    // error=true before any step runs.
    let undefined = "FROM busybox AS build\nENV X=$PATH:/x Y=$UNDEFINED_THING\nRUN echo ran\n";
    write_files(ctx.path(), &[("Dockerfile", undefined)]);
    let checked = s.run(&["build", "--check", ctx_arg]);
    assert_eq!(checked.status.code(), Some(1));
    let err = String::from_utf8_lossy(&checked.stderr);
    assert!(
        err.contains("Check complete, 1 warning has been found!"),
        "{err}"
    );
    assert!(
        err.contains("WARN: UndefinedVar - https://docs.docker.com/go/dockerfile/rule/undefined-var/\nUsage of undefined variable '$UNDEFINED_THING'"),
        "{err}"
    );
    let built = s.run(&["build", ctx_arg]);
    let err = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{err}");
    assert!(
        err.contains(" - UndefinedVar: Usage of undefined variable '$UNDEFINED_THING' (line 2)"),
        "{err}"
    );
    write_files(
        ctx.path(),
        &[("Dockerfile", &format!("# check=error=true\n{undefined}"))],
    );
    let refused = s.run(&["build", "--no-cache", ctx_arg]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("lint violation found for rules: UndefinedVar"),
        "{err}"
    );
    assert!(!err.contains("ran"), "a step ran: {err}");
}
