use super::*;
use crate::Scope;
use crate::instructions::Healthcheck;

fn df(s: &str) -> Dockerfile {
    match Dockerfile::parse(s.as_bytes()) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

fn err(s: &str) -> Error {
    match Dockerfile::parse(s.as_bytes()) {
        Ok(_) => panic!("expected an error for {s:?}"),
        Err(e) => e,
    }
}

fn no_args() -> BTreeMap<String, String> {
    BTreeMap::new()
}

const MULTISTAGE: &str = "\
ARG GO_VERSION=1.21
ARG BASE=alpine
FROM golang:${GO_VERSION} AS Builder
WORKDIR /src
COPY . .
RUN go build -o /out/app
FROM ${BASE}:latest
COPY --from=builder /out/app /app
CMD [\"/app\"]
";

#[test]
fn stages_names_and_global_args() {
    let d = df(MULTISTAGE);
    assert_eq!(d.global_args.len(), 2);
    assert_eq!(d.stages.len(), 2);
    assert_eq!(d.stages[0].name.as_deref(), Some("builder"));
    assert_eq!(d.stages[0].instructions.len(), 3);
    assert_eq!(d.stages[1].display_name(), "stage-1");
    assert_eq!(d.stage_by_name("BUILDER").map(|s| s.index), Some(0));

    let scope = d.global_scope(&no_args(), &EnvList::new()).unwrap();
    let g = d.graph(&scope, None).unwrap();
    assert_eq!(
        g.bases,
        [
            Base::Image("golang:1.21".into()),
            Base::Image("alpine:latest".into())
        ]
    );
    assert_eq!(g.target, 1);
    assert_eq!(g.order, [0, 1]);
    assert_eq!(g.sources[1].get(&0), Some(&vec![Source::Stage(0)]));

    let mut args = no_args();
    args.insert("GO_VERSION".into(), "1.22".into());
    let scope = d.global_scope(&args, &EnvList::new()).unwrap();
    let g = d.graph(&scope, Some("builder")).unwrap();
    assert_eq!(g.bases[0], Base::Image("golang:1.22".into()));
    assert_eq!(g.order, [0]);
}

#[test]
fn from_refers_only_to_earlier_stages() {
    let d = df("FROM later AS first\nFROM scratch AS later\nFROM first\n");
    let g = d.graph(&EnvList::new(), None).unwrap();
    assert_eq!(
        g.bases,
        [Base::Image("later".into()), Base::Scratch, Base::Stage(0)]
    );
    assert_eq!(g.order, [0, 2]);
}

#[test]
fn copy_from_index_name_or_image() {
    let d = df(
        "FROM a AS x\nFROM b\nCOPY --from=0 /a /a\nCOPY --from=X /b /b\nCOPY --from=nginx:1 /c /c\n",
    );
    let g = d.graph(&EnvList::new(), None).unwrap();
    assert_eq!(g.sources[1][&0], [Source::Stage(0)]);
    assert_eq!(g.sources[1][&1], [Source::Stage(0)]);
    assert_eq!(g.sources[1][&2], [Source::Image("nginx:1".into())]);
    let e = df("FROM a\nCOPY --from=5 /a /a\n")
        .graph(&EnvList::new(), None)
        .unwrap_err();
    assert_eq!(e.message(), "invalid stage index 5");
    assert_eq!(
        e.position(),
        Some(Position {
            line: 2,
            column: 13
        })
    );
}

#[test]
fn cycles_are_rejected() {
    let d = df("FROM a AS one\nCOPY --from=two /x /x\nFROM b AS two\nCOPY --from=one /y /y\n");
    let e = d.graph(&EnvList::new(), Some("two")).unwrap_err();
    assert!(
        e.message()
            .starts_with("circular dependency detected on stage"),
        "{e}"
    );
    let e = df("FROM a AS me\nCOPY --from=me /x /x\n")
        .graph(&EnvList::new(), None)
        .unwrap_err();
    assert_eq!(e.message(), "circular dependency detected on stage: me");
}

#[test]
fn run_mount_from_is_a_source() {
    let d = df(
        "FROM a AS deps\nFROM b\nRUN --mount=type=bind,from=deps,target=/d --mount=type=cache,target=/c make\n",
    );
    let g = d.graph(&EnvList::new(), None).unwrap();
    assert_eq!(g.sources[1][&0], [Source::Stage(0)]);
    assert_eq!(g.order, [0, 1]);
}

#[test]
fn stage_errors_name_the_place() {
    let e = err("FROM a AS x\nRUN a\nFROM b AS X\n");
    assert!(e.message().starts_with("duplicate stage name \"x\""), "{e}");
    assert_eq!(
        e.position(),
        Some(Position {
            line: 3,
            column: 11
        })
    );
    let e = err("RUN echo\nFROM a\n");
    assert_eq!(e.message(), "no build stage in current context");
    assert_eq!(
        err("ARG A=1\n").message(),
        "dockerfile contains no stages to build"
    );
    let e = err("FROM a\nCOPY --from=$X /a /b\n");
    assert!(
        e.message()
            .contains("variable expansion is not supported for --from")
    );
    let e = df(MULTISTAGE)
        .graph(&EnvList::new(), Some("bulder"))
        .unwrap_err();
    assert_eq!(
        e.message(),
        "target stage \"bulder\" could not be found (did you mean builder?)"
    );
    let e = df("ARG X\nFROM ${X}\n")
        .graph(&EnvList::new(), None)
        .unwrap_err();
    assert_eq!(e.message(), "base name (${X}) should not be blank");
    let e = df("ARG X\nFROM ${X:?required}\n")
        .graph(&EnvList::new(), None)
        .unwrap_err();
    assert!(e.message().ends_with("X: required"), "{e}");
    assert_eq!(e.kind(), ErrorKind::RequiredVariable);
}

#[test]
fn instruction_errors_point_at_the_token() {
    let e = err("FROM a\nFORM b\n");
    assert_eq!(
        e.to_string(),
        "Dockerfile:2:1: unknown instruction: FORM (did you mean FROM?)"
    );
    let e = err("FROM a\nCOPY --form=x a b\n");
    assert_eq!(
        e.to_string(),
        "Dockerfile:2:6: unknown flag: --form (did you mean --from?)"
    );
    assert!(
        err("FROM a AS 1x\n")
            .message()
            .starts_with("invalid name for build stage")
    );
    assert_eq!(
        err("FROM a b\n").message(),
        "FROM requires either one or three arguments"
    );
    assert!(
        err("FROM a\nCOPY a\n")
            .message()
            .starts_with("COPY requires at least two arguments")
    );
    assert_eq!(
        err("FROM a\nCOPY a <<EOF\nx\nEOF\n").message(),
        "COPY cannot accept a heredoc as a destination"
    );
    assert_eq!(
        err("FROM a\nSHELL sh -c\n").message(),
        "SHELL requires the arguments to be in JSON form"
    );
    assert_eq!(
        err("FROM a\nUSER\n").message(),
        "USER requires exactly one argument"
    );
    assert_eq!(
        err("FROM a\nONBUILD ONBUILD RUN x\n").message(),
        "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"
    );
    assert_eq!(
        err("FROM a\nONBUILD FROM b\n").message(),
        "FROM isn't allowed as an ONBUILD trigger"
    );
    assert_eq!(
        err("FROM a\nRUN --network=bridge x\n").message(),
        "invalid network mode \"bridge\""
    );
    assert_eq!(
        err("FROM a\nHEALTHCHECK NONE x\n").message(),
        "HEALTHCHECK NONE takes no arguments"
    );
    assert_eq!(
        err("FROM a\nHEALTHCHECK CMD\n").message(),
        "Missing command after HEALTHCHECK CMD"
    );
    assert_eq!(
        err("FROM a\nHEALTHCHECK --retries=-1 CMD x\n").message(),
        "--retries cannot be negative (-1)"
    );
    assert_eq!(
        err("FROM a\nARG =x\n").message(),
        "ARG names can not be blank"
    );
    assert_eq!(
        err("FROM a\nRUN --mount=from=$X x\n").message(),
        "'from' doesn't support variable expansion, define alias stage instead"
    );
}

#[test]
fn typed_commands() {
    let d = df(concat!(
        "FROM a\n",
        "COPY --chown=1:1 --chmod=755 --link --parents --exclude=*.md --exclude=x a b /dst/\n",
        "ADD --checksum=sha256:abc --keep-git-dir=false https://x/y.tgz /\n",
        "ENV A=1 B=\"2 3\"\n",
        "ARG X Y=2\n",
        "EXPOSE 8080/tcp 80\n",
        "HEALTHCHECK --interval=5s --retries=3 CMD curl -f http://localhost/\n",
        "ONBUILD RUN echo hi\n",
        "ENTRYPOINT []\n",
        "COPY <<-EOF /x.sh\n\techo $A\nEOF\n",
    ));
    let cmds: Vec<&Command> = d.stages[0]
        .instructions
        .iter()
        .map(|i| &i.command)
        .collect();
    let Command::Copy(c) = cmds[0] else {
        panic!("{:?}", cmds[0])
    };
    assert_eq!(c.files.sources, ["a", "b"]);
    assert_eq!(c.files.dest, "/dst/");
    assert_eq!(
        (c.chown.as_deref(), c.chmod.as_deref(), c.link, c.parents),
        (Some("1:1"), Some("755"), true, true)
    );
    assert_eq!(c.excludes, ["*.md", "x"]);
    let Command::Add(a) = cmds[1] else { panic!() };
    assert_eq!(
        (a.checksum.as_deref(), a.keep_git_dir),
        (Some("sha256:abc"), Some(false))
    );
    let Command::Env(e) = cmds[2] else { panic!() };
    assert_eq!(e[1].value, "\"2 3\"");
    let Command::Arg(args) = cmds[3] else {
        panic!()
    };
    assert_eq!(args[1].default.as_deref(), Some("2"));
    assert_eq!(args[0].default, None);
    assert_eq!(
        cmds[4],
        &Command::Expose(vec!["80".into(), "8080/tcp".into()])
    );
    let Command::Healthcheck(h) = cmds[5] else {
        panic!()
    };
    let Healthcheck::Cmd {
        test,
        interval,
        retries,
        ..
    } = h.as_ref()
    else {
        panic!()
    };
    assert_eq!(test, &["CMD-SHELL", "curl -f http://localhost/"]);
    assert_eq!(
        (*interval, *retries),
        (Some(std::time::Duration::from_secs(5)), 3)
    );
    assert_eq!(cmds[6], &Command::Onbuild("RUN echo hi".into()));
    let Command::Entrypoint(ep) = cmds[7] else {
        panic!()
    };
    assert!(ep.args.is_empty() && !ep.shell_form);
    let Command::Copy(h) = cmds[8] else { panic!() };
    assert_eq!(h.files.inline[0].data, "echo $A\n");
    assert!(h.files.inline[0].expand);
}

#[test]
fn expansion_follows_buildkit() {
    let d = df(
        "FROM a\nENV A=\"x y\" B=$HOME\nCOPY --chown=$U <<EOF ${DIR:-/d}/\n'$A'\nEOF\nEXPOSE ${P}/tcp $Q\nRUN echo $A\n",
    );
    let mut env = EnvList::new();
    for (k, v) in [
        ("HOME", "/root"),
        ("U", "app"),
        ("P", "80"),
        ("Q", "81 82"),
        ("A", "v"),
    ] {
        env.set(k, v);
    }
    let e: Vec<Command> = d.stages[0]
        .instructions
        .iter()
        .map(|i| d.expand(i, &env).unwrap().command)
        .collect();
    let Command::Env(kv) = &e[0] else { panic!() };
    assert_eq!(
        (kv[0].value.as_str(), kv[1].value.as_str()),
        ("x y", "/root")
    );
    let Command::Copy(c) = &e[1] else { panic!() };
    assert_eq!(c.chown.as_deref(), Some("app"));
    assert_eq!(c.files.dest, "/d/");
    assert_eq!(c.files.inline[0].data, "'v'\n");
    // Ports are sorted as written, before expansion, as BuildKit does.
    assert_eq!(
        e[2],
        Command::Expose(vec!["81".into(), "82".into(), "80/tcp".into()])
    );
    assert_eq!(
        e[3], d.stages[0].instructions[3].command,
        "RUN is left to the shell"
    );
    let bad = df("FROM a\nWORKDIR ${A:?must set A}\n");
    let err = bad
        .expand(&bad.stages[0].instructions[0], &EnvList::new())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RequiredVariable);
    assert_eq!(err.position().map(|p| p.line), Some(2));
}

#[test]
fn scope_follows_buildkit_arg_rules() {
    let d = df(concat!(
        "ARG G=global\nARG ONLY_GLOBAL=g2\n",
        "FROM a AS base\n",
        "ARG ONLY_GLOBAL\nARG G\nARG LOCAL=${ONLY_GLOBAL}-x\nARG UNSET\nENV E=$LOCAL\n",
        "FROM base\nARG BUILT=default\nWORKDIR /$E/$LOCAL/${UNSET-none}/$BUILT\n",
    ));
    let mut build_args = no_args();
    build_args.insert("G".into(), "from-cli".into());
    build_args.insert("BUILT".into(), "cli".into());
    let global = d.global_scope(&build_args, &EnvList::new()).unwrap();
    let mut scope = Scope::from_image_env(&["PATH=/bin"]);
    for i in &d.stages[0].instructions {
        d.apply_in_scope(i, &mut scope, &build_args, &global)
            .unwrap();
    }
    assert_eq!(scope.config_env.to_entries(), ["PATH=/bin", "E=g2-x"]);
    assert_eq!(scope.run_env.get("G"), Some("from-cli"));
    assert_eq!(
        scope
            .args
            .iter()
            .find(|(k, _)| k == "UNSET")
            .map(|(_, v)| v.clone()),
        Some(None)
    );
    let mut child = scope.clone();
    let out: Vec<Instruction> = d.stages[1]
        .instructions
        .iter()
        .map(|i| {
            d.apply_in_scope(i, &mut child, &build_args, &global)
                .unwrap()
        })
        .collect();
    assert_eq!(
        out[1].command,
        Command::Workdir("/g2-x/g2-x/none/cli".into())
    );
}

#[test]
fn check_reports_what_can_be_known_without_images() {
    let ok = df("FROM a\nWORKDIR ${NEEDS_BASE_ENV:?}\nRUN --mount=type=cache,target=$HOME x\n");
    assert!(ok.check(&no_args(), &EnvList::new(), None).is_ok());
    let bad = df("FROM a\nWORKDIR ${A:x}\n");
    let e = bad.check(&no_args(), &EnvList::new(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Expansion);
    let bad = df("FROM a\nRUN --mount=type=bogus,target=/x true\n");
    let e = bad.check(&no_args(), &EnvList::new(), None).unwrap_err();
    assert_eq!(e.message(), "unsupported mount type \"bogus\"");
    assert_eq!(e.position(), Some(Position { line: 2, column: 5 }));
}

/// What checking `text` for a build with no arguments says, as the error a
/// user sees.
fn check_err(text: &str) -> Error {
    let d = match Dockerfile::parse(text.as_bytes()) {
        Ok(d) => d,
        Err(e) => return e,
    };
    match d.check(&no_args(), &EnvList::new(), None) {
        Ok(_) => panic!("expected {:.60}... to be refused", text),
        Err(e) => e,
    }
}

#[test]
fn nested_expansions_are_bounded_not_a_stack_overflow() {
    // 10,000 levels fit on one line, as an attacker would send them.
    let depth = 10_000;
    let word = format!("{}x{}", "${a:-".repeat(depth), "}".repeat(depth));
    let e = check_err(&format!("FROM scratch\nARG a\nENV v={word}\n"));
    assert_eq!(e.kind(), ErrorKind::Limit, "{e}");
    assert!(e.to_string().contains("nested more than 64 deep"), "{e}");
    assert_eq!(e.position().map(|p| p.line), Some(3));
    // The message quotes only the start of the word.
    assert!(e.to_string().len() < 400, "{}", e.to_string().len());

    // Real nesting still works.
    let word = format!("{}x{}", "${a:-".repeat(60), "}".repeat(60));
    let d = df(&format!("FROM scratch\nARG a\nENV v={word}\n"));
    let mut scope = Scope::default();
    for i in &d.stages[0].instructions {
        d.apply_in_scope(i, &mut scope, &no_args(), &EnvList::new())
            .unwrap();
    }
    assert_eq!(scope.run_env.get("v"), Some("x"));
}

#[test]
fn doubling_args_stop_at_the_expansion_limit() {
    let mut text = String::from("FROM scratch\nARG a0=xxxxxxxxxxxxxxxx\n");
    for i in 1..64 {
        text.push_str(&format!("ARG a{i}=${{a{}}}${{a{}}}\n", i - 1, i - 1));
    }
    let e = check_err(&text);
    assert_eq!(e.kind(), ErrorKind::Limit, "{e}");
    assert!(e.to_string().contains("limit of 1048576 bytes"), "{e}");

    // Many values each under the expansion limit: the scope's own bound.
    let mut text = String::from("FROM scratch\nARG a0=xxxxxxxxxxxxxxxx\n");
    for i in 1..=16 {
        text.push_str(&format!("ARG a{i}=${{a{}}}${{a{}}}\n", i - 1, i - 1));
    }
    for i in 0..64 {
        text.push_str(&format!("ARG b{i}=$a16\n"));
    }
    let e = check_err(&text);
    assert_eq!(e.kind(), ErrorKind::Limit, "{e}");
    assert!(e.to_string().contains("variables in scope"), "{e}");

    // The same among global ARGs, before any stage.
    let mut text = String::from("ARG a0=xxxxxxxxxxxxxxxx\n");
    for i in 1..64 {
        text.push_str(&format!("ARG a{i}=${{a{}}}${{a{}}}\n", i - 1, i - 1));
    }
    text.push_str("FROM scratch\n");
    let e = check_err(&text);
    assert_eq!(e.kind(), ErrorKind::Limit, "{e}");
}

#[test]
fn substitution_cannot_multiply_past_the_limit() {
    let mut text = String::from("FROM scratch\nARG a=");
    text.push_str(&"y".repeat(2000));
    text.push('\n');
    // Every one of 2,001 empty matches replaced by the 2,000-byte value.
    text.push_str("ENV b=${a//*/$a}\nENV c=${a//\"\"/$a}\n");
    let e = check_err(&text);
    assert_eq!(e.kind(), ErrorKind::Limit, "{e}");
}

#[test]
fn size_stages_and_instructions_are_bounded() {
    let big = format!("FROM scratch\n{}", "# padding\n".repeat(300_000));
    let e = err(&big);
    assert_eq!(e.kind(), ErrorKind::Limit);
    assert!(
        e.to_string().contains("over the limit of 2097152 bytes"),
        "{e}"
    );

    let e = err(&"FROM scratch\n".repeat(limits::MAX_STAGES + 1));
    assert_eq!(e.kind(), ErrorKind::Limit);
    assert!(e.to_string().contains("more than 256 stages"), "{e}");
    assert_eq!(e.position().map(|p| p.line), Some(limits::MAX_STAGES + 1));

    let e = err(&format!(
        "FROM scratch\n{}",
        "USER a\n".repeat(limits::MAX_INSTRUCTIONS)
    ));
    assert_eq!(e.kind(), ErrorKind::Limit);
    assert!(e.to_string().contains("10001 instructions"), "{e}");
}
