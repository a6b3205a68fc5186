use super::*;
use crate::ops::Read;
use std::collections::HashMap;

struct Images(HashMap<String, ResolvedImage>);

impl ImageResolver for Images {
    fn resolve(&self, reference: &str, _: &Platform) -> Result<ResolvedImage, ResolveError> {
        self.0
            .get(reference)
            .cloned()
            .ok_or_else(|| format!("base image {reference} not found").into())
    }
}

fn images() -> Images {
    let mut m = HashMap::new();
    let mut golang = ImageConfig::scratch("linux", "amd64", None);
    golang.config.env = vec![
        "PATH=/usr/local/go/bin:/usr/bin:/bin".into(),
        "GOPATH=/go".into(),
    ];
    golang.config.working_dir = "/go".into();
    m.insert(
        "golang:1.19".into(),
        ResolvedImage {
            reference: "docker.io/library/golang:1.19".into(),
            manifest: Sha256::of(b"golang"),
            config: golang,
            layers: vec![],
        },
    );
    let mut onbuild = ImageConfig::scratch("linux", "amd64", None);
    onbuild.config.env.clear();
    onbuild.config.on_build = vec!["COPY . /app".into(), "RUN make".into()];
    m.insert(
        "onbuild".into(),
        ResolvedImage {
            reference: "docker.io/library/onbuild:latest".into(),
            manifest: Sha256::of(b"ob"),
            config: onbuild,
            layers: vec![],
        },
    );
    Images(m)
}

fn opts() -> Options {
    let p = Platform::parse("linux/amd64").unwrap();
    Options {
        build_args: BTreeMap::new(),
        target: None,
        platform: p.clone(),
        build_platform: p,
        labels: BTreeMap::new(),
        run: Default::default(),
    }
}

fn plan_of(src: &str, opts: &Options) -> Plan {
    let df = Dockerfile::parse(src.as_bytes()).unwrap();
    match plan(&df, "Dockerfile", opts, &images()) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

const MULTI: &str = "\
FROM golang:1.19 AS builder
WORKDIR src
COPY go.mod main.go ./
RUN go build -o /out/app .
FROM scratch
COPY --from=builder /out/app /app
ENTRYPOINT [\"/app\"]
";

#[test]
fn multistage_plan_and_config() {
    let p = plan_of(MULTI, &opts());
    assert_eq!(p.stages.len(), 2);
    let b = &p.stages[0];
    assert_eq!(b.name, "builder");
    assert!(matches!(b.base, Base::Image(_)));
    assert_eq!(b.steps.len(), 3);
    assert_eq!(
        b.steps[0].op,
        Op::Mkdir(MkdirOp {
            path: "/go/src".into(),
            user: String::new()
        })
    );
    let Op::Copy(c) = &b.steps[1].op else {
        panic!()
    };
    assert_eq!((c.dest.as_str(), c.sources.len()), ("/go/src/", 2));
    let Op::Exec(e) = &b.steps[2].op else {
        panic!()
    };
    assert_eq!(e.args, ["/bin/sh", "-c", "go build -o /out/app ."]);
    assert_eq!(e.cwd, "/go/src");
    assert!(e.env.contains(&"GOPATH=/go".to_string()));
    assert_eq!(b.steps[2].number, 4, "FROM counts as step 1");
    assert_eq!(b.steps[2].label, "RUN go build -o /out/app .");

    let f = &p.stages[1];
    assert_eq!(p.target, 1);
    let Op::Copy(c) = &f.steps[0].op else {
        panic!()
    };
    assert_eq!(c.from, Source::Stage(0));
    assert_eq!(
        f.config.config.entrypoint.as_deref(),
        Some(&["/app".to_string()][..])
    );
    assert_eq!(f.config.config.working_dir, "/");
    assert!(f.config.config.env.iter().any(|e| e.starts_with("PATH=")));
}

#[test]
fn target_prunes_unneeded_stages() {
    let mut o = opts();
    o.target = Some("builder".into());
    let p = plan_of(MULTI, &o);
    assert_eq!(p.stages.len(), 1);
    assert_eq!(p.stages[p.target].name, "builder");
}

#[test]
fn config_fields_follow_buildkit() {
    let p = plan_of(
        "FROM scratch\nCMD echo hi\nENTRYPOINT [\"/e\"]\nEXPOSE 80 53/udp 8000-8001\nVOLUME /data\nUSER app\nLABEL a=b\nSTOPSIGNAL SIGTERM\nHEALTHCHECK --interval=5s CMD true\nSHELL [\"/bin/bash\", \"-c\"]\nONBUILD RUN x\nMAINTAINER me\n",
        &opts(),
    );
    let c = &p.stages[0].config;
    assert_eq!(
        c.config.cmd.as_deref(),
        Some(&["/bin/sh".to_string(), "-c".into(), "echo hi".into()][..])
    );
    assert!(c.config.args_escaped);
    assert_eq!(
        c.config.entrypoint.as_deref(),
        Some(&["/e".to_string()][..])
    );
    let ports: Vec<&String> = c.config.exposed_ports.keys().collect();
    assert_eq!(ports, ["53/udp", "80/tcp", "8000/tcp", "8001/tcp"]);
    assert!(c.config.volumes.contains_key("/data"));
    assert_eq!(c.config.user, "app");
    assert_eq!(c.config.labels["a"], "b");
    assert_eq!(c.config.stop_signal.as_deref(), Some("SIGTERM"));
    let h = c.config.healthcheck.as_ref().unwrap();
    assert_eq!(
        (h.test.clone(), h.interval),
        (vec!["CMD-SHELL".to_string(), "true".into()], 5_000_000_000)
    );
    assert_eq!(c.config.shell, ["/bin/bash", "-c"]);
    assert_eq!(c.config.on_build, ["RUN x"]);
    assert_eq!(c.author.as_deref(), Some("me"));
    assert!(p.stages[0].steps.is_empty());
    assert_eq!(
        p.stages[0].history.len(),
        10,
        "ONBUILD records no history, as in BuildKit"
    );
}

#[test]
fn entrypoint_clears_inherited_cmd() {
    let p = plan_of(
        "FROM scratch AS a\nCMD [\"x\"]\nFROM a\nENTRYPOINT [\"/e\"]\n",
        &opts(),
    );
    assert_eq!(p.stages[1].config.config.cmd, None);
    let p = plan_of("FROM scratch\nCMD [\"x\"]\nENTRYPOINT [\"/e\"]\n", &opts());
    assert!(p.stages[0].config.config.cmd.is_some());
}

#[test]
fn onbuild_triggers_run_first() {
    let p = plan_of("FROM onbuild\nRUN after\n", &opts());
    let labels: Vec<&str> = p.stages[0].steps.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(labels, ["COPY . /app", "RUN make", "RUN after"]);
    assert!(p.stages[0].config.config.on_build.is_empty());
}

#[test]
fn heredocs_and_mounts() {
    let p = plan_of(
        "FROM scratch\nRUN <<EOF\necho one\necho two\nEOF\nRUN <<EOF\n#!/bin/python\nprint(1)\nEOF\nRUN python3 <<EOF\nprint(2)\nEOF\nRUN --mount=type=cache,target=/root/.cache --mount=type=secret,id=tok --network=none true\n",
        &opts(),
    );
    let ops: Vec<&ExecOp> = p.stages[0]
        .steps
        .iter()
        .map(|s| match &s.op {
            Op::Exec(e) => e,
            _ => panic!(),
        })
        .collect();
    assert_eq!(ops[0].args[2], "echo one\necho two\n");
    assert_eq!(ops[1].args[2], "/dev/pipes/EOF");
    assert_eq!(ops[1].files[0].mode, 0o755);
    assert_eq!(ops[2].args[2], "python3 <<EOF\nprint(2)\nEOF");
    assert!(ops[3].no_network);
    assert_eq!(ops[3].mounts[0].target, "/root/.cache");
    assert!(
        matches!(&ops[3].mounts[0].kind, RunMountKind::Cache { id, .. } if id == "/root/.cache")
    );
    assert_eq!(ops[3].mounts[1].target, "/run/secrets/tok");
}

#[test]
fn ssh_mounts_take_buildkit_s_targets_and_the_first_is_ssh_auth_sock() {
    let p = plan_of(
        "FROM scratch\nRUN --mount=type=ssh --mount=type=ssh,id=deploy,required=true,uid=1000 a\nENV SSH_AUTH_SOCK=/mine\nRUN --mount=type=ssh,target=/agent b\nRUN c\n",
        &opts(),
    );
    let ops: Vec<&ExecOp> = p.stages[0]
        .steps
        .iter()
        .filter_map(|s| match &s.op {
            Op::Exec(e) => Some(e),
            _ => None,
        })
        .collect();
    let targets: Vec<&str> = ops[0].mounts.iter().map(|m| m.target.as_str()).collect();
    assert_eq!(
        targets,
        ["/run/buildkit/ssh_agent.0", "/run/buildkit/ssh_agent.1"]
    );
    assert!(matches!(
        &ops[0].mounts[0].kind,
        RunMountKind::Ssh { id, required: false, mode: 0o600, uid: 0, .. } if id == "default"
    ));
    assert!(matches!(
        &ops[0].mounts[1].kind,
        RunMountKind::Ssh { id, required: true, uid: 1000, .. } if id == "deploy"
    ));
    assert!(
        ops[0]
            .env
            .contains(&"SSH_AUTH_SOCK=/run/buildkit/ssh_agent.0".to_string())
    );
    // The step's own SSH_AUTH_SOCK wins; a step with no agent gets none.
    assert_eq!(ops[1].mounts[0].target, "/agent");
    assert!(ops[1].env.contains(&"SSH_AUTH_SOCK=/mine".to_string()));
    assert!(!ops[1].env.iter().any(|e| e == "SSH_AUTH_SOCK=/agent"));
    assert!(
        ops[2]
            .env
            .iter()
            .all(|e| e != "SSH_AUTH_SOCK=/run/buildkit/ssh_agent.0")
    );
}

#[test]
fn build_flags_reach_every_run_and_a_run_s_own_network_wins() {
    let src = "FROM scratch\nRUN a\nRUN --network=default b\nCOPY x /x\n";
    let mut o = opts();
    o.run = crate::RunSettings {
        network: crate::NetworkMode::None,
        extra_hosts: vec!["db:10.0.0.5".parse().unwrap()],
        shm_size: Some(1 << 30),
        ulimits: vec!["nofile=100:200".parse().unwrap()],
    };
    let p = plan_of(src, &o);
    let exec = |i: usize| match &p.stages[0].steps[i].op {
        Op::Exec(e) => e.clone(),
        _ => panic!(),
    };
    assert!(exec(0).no_network);
    assert!(!exec(1).no_network && !exec(1).host_network);
    for i in [0, 1] {
        assert_eq!(exec(i).extra_hosts[0].name, "db");
        assert_eq!(exec(i).shm_size, Some(1 << 30));
        assert_eq!(exec(i).ulimits[0].hard, 200);
    }
    // They are part of the step, so of its cache key.
    let plain = plan_of(src, &opts());
    assert_ne!(plain.stages[0].steps[1].op, p.stages[0].steps[1].op);
    assert_eq!(plain.stages[0].steps[2].op, p.stages[0].steps[2].op);
}

#[test]
fn build_args_reach_only_steps_that_declare_them() {
    let src = "FROM scratch\nARG USED\nRUN echo $USED\n";
    let mut o = opts();
    o.build_args.insert("USED".into(), "1".into());
    let with = plan_of(src, &o);
    o.build_args.insert("UNUSED".into(), "2".into());
    let with_extra = plan_of(src, &o);
    assert_eq!(
        with.stages[0].steps[0].op, with_extra.stages[0].steps[0].op,
        "an undeclared build arg changes nothing"
    );
    o.build_args.insert("USED".into(), "3".into());
    assert_ne!(
        with.stages[0].steps[0].op,
        plan_of(src, &o).stages[0].steps[0].op
    );
}

#[test]
fn errors_name_the_line() {
    let df = Dockerfile::parse(b"FROM scratch\nCOPY --chmod=999 a b\n").unwrap();
    let e = plan(&df, "Dockerfile", &opts(), &images()).unwrap_err();
    assert!(e.to_string().starts_with("Dockerfile:2:"), "{e}");
    let df = Dockerfile::parse(b"FROM nosuch:1\n").unwrap();
    let e = plan(&df, "df", &opts(), &images()).unwrap_err();
    assert_eq!(e.to_string(), "df:1: cannot use image nosuch:1");
    let cause = std::error::Error::source(&e).map(ToString::to_string);
    assert_eq!(cause.as_deref(), Some("base image nosuch:1 not found"));
}

#[test]
fn paths_against_the_working_directory() {
    assert_eq!(normalize_workdir("/a", "b/../c"), "/a/c");
    assert_eq!(normalize_workdir("/a", "/x"), "/x");
    assert_eq!(normalize_workdir("/a", "/tmp/"), "/tmp/");
    assert_eq!(normalize_workdir("/a", "/tmp/"), "/tmp/");
    assert_eq!(normalize_workdir("", "x"), "/x");
    assert_eq!(relative_to_workdir("/app", "."), "/app/");
    assert_eq!(relative_to_workdir("/app", "bin/"), "/app/bin/");
    assert_eq!(relative_to_workdir("/app", "f"), "/app/f");
    assert_eq!(relative_to_workdir("/", "/etc/x"), "/etc/x");
    assert_eq!(expand_port("80").unwrap(), ["80/tcp"]);
    assert!(expand_port("80/xyz").is_err());
}

#[test]
fn add_downloads_urls_and_checks_their_checksums() {
    let sum = "a".repeat(64);
    let p = plan_of(
        &format!(
            "FROM scratch\nADD --checksum=sha256:{} https://example.com/dl/tool.tar.gz?x=1 /opt/\nADD https://example.com/ local.txt /both/\n",
            sum.to_uppercase()
        ),
        &opts(),
    );
    let steps = &p.stages[0].steps;
    let Op::Copy(one) = &steps[0].op else {
        panic!("{:?}", steps[0].op)
    };
    assert!(one.sources.is_empty());
    assert_eq!(
        one.urls,
        [RemoteFile {
            url: "https://example.com/dl/tool.tar.gz?x=1".into(),
            name: "tool.tar.gz".into(),
            sha256: Some(sum.clone()),
        }]
    );
    let Op::Copy(two) = &steps[1].op else {
        panic!("{:?}", steps[1].op)
    };
    assert_eq!(two.sources, ["local.txt"]);
    assert_eq!(two.urls[0].name, "__unnamed__");
    assert_eq!(two.urls[0].sha256, None);

    for (df, want) in [
        (
            "FROM scratch\nADD --checksum=sha256:00 https://e.com/f /\n",
            "64 hex digits",
        ),
        (
            &format!("FROM scratch\nADD --checksum=md5:{sum} https://e.com/f /\n"),
            "unsupported checksum algorithm \"md5\"",
        ),
        (
            &format!("FROM scratch\nADD --checksum=sha256:{sum} local /\n"),
            "single HTTP(S) source",
        ),
        (
            "FROM scratch\nADD https://github.com/o/r.git#main /src\n",
            "Git repository",
        ),
    ] {
        let parsed = Dockerfile::parse(df.as_bytes()).unwrap();
        let e = plan(&parsed, "Dockerfile", &opts(), &images()).unwrap_err();
        assert!(e.to_string().starts_with("Dockerfile:2:"), "{e}");
        assert!(e.to_string().contains(want), "{df}: {e}");
    }
}

#[test]
fn history_is_dated_by_when_each_steps_result_was_made() {
    let p = plan_of(
        "FROM golang:1.19\nENV A=1\nCOPY a /a\nENV B=2\nRUN make\n",
        &opts(),
    );
    let stage = &p.stages[0];
    let base = vec![History {
        created: Some("2020-01-01T00:00:00.5Z".into()),
        created_by: Some("base".into()),
        ..Default::default()
    }];
    let made = [
        StepMade {
            layer: true,
            created: 1_700_000_000,
        },
        StepMade {
            layer: false,
            created: 1_700_000_100,
        },
    ];
    let h = history_with_layers(stage, base.clone(), &made, None, 1_800_000_000);
    let dates: Vec<(&str, &str, bool)> = h
        .iter()
        .map(|e| {
            (
                e.created_by.as_deref().unwrap_or(""),
                e.created.as_deref().unwrap_or(""),
                e.empty_layer,
            )
        })
        .collect();
    assert_eq!(
        dates,
        [
            ("base", "2020-01-01T00:00:00.5Z", false),
            // A config-only entry carries the latest date before it.
            ("ENV A=1", "2020-01-01T00:00:00Z", true),
            ("COPY a /a # buildkit", "2023-11-14T22:13:20Z", false),
            ("ENV B=2", "2023-11-14T22:13:20Z", true),
            // A step that changed no file still carries its result's date.
            (
                "RUN /bin/sh -c make # buildkit",
                "2023-11-14T22:15:00Z",
                true
            ),
        ]
    );
    // The image is as old as its newest entry: a build taken wholly from
    // the cache gets the same date, and the same image ID.
    assert_eq!(
        image_created(&h, None).as_deref(),
        Some("2023-11-14T22:15:00Z")
    );

    // SOURCE_DATE_EPOCH dates every new entry and the image; the base's
    // entries keep theirs.
    let h = history_with_layers(stage, base, &made, Some(1_000_000_000), 1_800_000_000);
    assert_eq!(h[0].created.as_deref(), Some("2020-01-01T00:00:00.5Z"));
    assert!(
        h[1..]
            .iter()
            .all(|e| e.created.as_deref() == Some("2001-09-09T01:46:40Z")),
        "{h:?}"
    );
    assert_eq!(
        image_created(&h, Some(1_000_000_000)).as_deref(),
        Some("2001-09-09T01:46:40Z")
    );
}

#[test]
fn a_stage_with_no_date_before_its_first_step_takes_that_steps() {
    let p = plan_of("FROM scratch\nENV A=1\nCOPY a /a\n", &opts());
    let made = [StepMade {
        layer: true,
        created: 1_700_000_000,
    }];
    let h = history_with_layers(&p.stages[0], vec![], &made, None, 1_800_000_000);
    assert_eq!(h[0].created.as_deref(), Some("2023-11-14T22:13:20Z"));
    // With no step at all, the stage is dated now.
    let p = plan_of("FROM scratch\nENV A=1\n", &opts());
    let h = history_with_layers(&p.stages[0], vec![], &[], None, 1_800_000_000);
    assert_eq!(h[0].created.as_deref(), Some("2027-01-15T08:00:00Z"));
}

#[test]
fn image_layers_count_through_stage_bases() {
    let mut p = plan_of(
        "FROM golang:1.19 AS a\nRUN x\nFROM a AS b\nRUN y\nFROM scratch\nCOPY --from=b /x /x\n",
        &opts(),
    );
    if let Base::Image(img) = &mut p.stages[0].base {
        img.layers = vec![
            LayerRef {
                blob: strata_cas::Digest::of(b"1"),
                diff_id: Sha256::of(b"1"),
                size: 1,
            };
            3
        ];
    }
    assert_eq!(p.image_layers(0), 3);
    assert_eq!(p.image_layers(1), 3);
    assert_eq!(p.image_layers(2), 0);
    assert_eq!(p.image_layers(9), 0);
}

#[test]
fn label_flags_set_the_target_s_labels_over_the_dockerfile_s() {
    let mut o = opts();
    o.labels = BTreeMap::from([
        ("team".to_string(), "build".to_string()),
        ("kept".to_string(), "flag".to_string()),
    ]);
    let p = plan_of(
        "FROM golang:1.19 AS dep\nLABEL dep=1\nFROM golang:1.19\nLABEL kept=dockerfile other=2\n",
        &o,
    );
    let target = &p.stages[p.target].config.config.labels;
    assert_eq!(target["team"], "build");
    assert_eq!(target["kept"], "flag");
    assert_eq!(target["other"], "2");
    let dep = p
        .stages
        .iter()
        .find(|s| s.name == "dep")
        .map(|s| &s.config.config.labels);
    assert_eq!(dep.and_then(|l| l.get("team")), None);
}

#[test]
fn undefined_variables_are_found_with_the_base_image_s_environment() {
    let p = plan_of(
        "FROM golang:1.19\nARG DECLARED\nENV X=$DECLARED Y=$GOPATH\nWORKDIR /$NOPE\nLABEL a=${MAYBE:-x} b=$GOPAHT\nRUN echo $NOT_EXPANDED\n",
        &opts(),
    );
    let found: Vec<(usize, &str)> = p
        .lint
        .iter()
        .map(|f| (f.line, f.message.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (4, "Usage of undefined variable '$NOPE'"),
            (
                5,
                "Usage of undefined variable '$GOPAHT' (did you mean $GOPATH?)"
            ),
        ]
    );
    assert!(p.lint.iter().all(|f| f.rule == "UndefinedVar"));
}

#[test]
fn what_each_step_reads_is_named_once_in_measuring_order() {
    let plan = plan_of(
        "FROM golang:1.19 AS deps\nRUN true\n\
         FROM golang:1.19\n\
         COPY --exclude=*.md a b /src/\n\
         ADD --checksum=sha256:0000000000000000000000000000000000000000000000000000000000000000 https://example.com/x.tgz /x\n\
         COPY --from=deps /go /go\n\
         RUN --mount=type=bind,from=deps,source=/go,target=/d --mount=type=cache,target=/c --mount=type=bind,source=.,target=/ctx true\n\
         WORKDIR /w\n",
        &opts(),
    );
    let last = &plan.stages[1];
    let reads: Vec<String> = last
        .steps
        .iter()
        .map(|s| {
            s.op.reads()
                .iter()
                .map(|r| match r {
                    Read::Paths {
                        from,
                        paths,
                        excludes,
                    } => format!("{from:?} {paths:?} {excludes:?}"),
                    Read::Url(f) => f.url.clone(),
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .collect();
    assert_eq!(
        reads,
        [
            r#"Context ["a", "b"] ["*.md"]"#.to_string(),
            "https://example.com/x.tgz".into(),
            r#"Stage(0) ["/go"] []"#.into(),
            r#"Stage(0) ["/go"] []; Context ["."] []"#.into(),
            String::new(),
        ]
    );
    let stages: Vec<Vec<usize>> = last.steps.iter().map(|s| s.op.stage_inputs()).collect();
    assert_eq!(stages, [vec![], vec![], vec![0], vec![0], vec![]]);
}
