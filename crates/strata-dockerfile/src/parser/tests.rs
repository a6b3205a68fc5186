use super::*;

fn parse_str(s: &str) -> Ast {
    match parse(s.as_bytes()) {
        Ok(ast) => ast,
        Err(e) => panic!("parse failed: {e}"),
    }
}

fn err(s: &str) -> Error {
    match parse(s.as_bytes()) {
        Ok(ast) => panic!("expected an error, got {}", ast.dump()),
        Err(e) => e,
    }
}

fn doc(name: &str, content: &str, expand: bool, chomp: bool, fd: u64) -> Heredoc {
    Heredoc {
        name: name.into(),
        fd,
        expand,
        chomp,
        content: content.into(),
    }
}

#[test]
fn heredocs_are_extracted() {
    let ast = parse_str(concat!(
        "FROM alpine:3.6\n",
        "RUN <<EMPTY\nEMPTY\n",
        "RUN 3<<EMPTY2\nEMPTY2\n",
        "RUN \"<<NOHEREDOC\"\n",
        "RUN <<INDENT\n\tfoo\n\tbar\nINDENT\n",
        "RUN <<-UNINDENT\n\tbaz\n\tquux\n\tUNINDENT\n",
        "RUN <<-'NOEXPAND'\n\tdon't expand $NAME\nNOEXPAND\n",
        "RUN --mount=type=cache,target=/foo <<MOUNT\necho hello\nMOUNT\n",
        "COPY <<FILE1 <<FILE2 /dest\ncontent 1\nFILE1\ncontent 2\nFILE2\n",
        "COPY <<X <<Y /dest\nY\nX\nX\nY\n",
        "RUN <<eo'f'\necho foo\neof\n",
        "RUN <<eo\\'f\necho foo\neo'f\n",
        "RUN <<'one two'\necho bar\none two\n",
        "RUN <<$EOF\n$EOF\n",
        "RUN <<  EOF  > foo\nEOF\n",
        "USER <<INVALID\n",
        "RUN [\"<<EOF\"]\n",
    ));
    let docs: Vec<Vec<Heredoc>> = ast.nodes.iter().map(|n| n.heredocs.clone()).collect();
    assert_eq!(docs[1], [doc("EMPTY", "", true, false, 0)]);
    assert_eq!(docs[2], [doc("EMPTY2", "", true, false, 3)]);
    assert!(docs[3].is_empty());
    assert_eq!(docs[4], [doc("INDENT", "\tfoo\n\tbar\n", true, false, 0)]);
    assert_eq!(docs[5], [doc("UNINDENT", "\tbaz\n\tquux\n", true, true, 0)]);
    assert_eq!(docs[5][0].body(), "baz\nquux\n");
    assert_eq!(
        docs[6],
        [doc("NOEXPAND", "\tdon't expand $NAME\n", false, true, 0)]
    );
    assert_eq!(docs[7], [doc("MOUNT", "echo hello\n", true, false, 0)]);
    assert_eq!(
        docs[8],
        [
            doc("FILE1", "content 1\n", true, false, 0),
            doc("FILE2", "content 2\n", true, false, 0)
        ]
    );
    assert_eq!(
        docs[9],
        [
            doc("X", "Y\n", true, false, 0),
            doc("Y", "X\n", true, false, 0)
        ]
    );
    assert_eq!(docs[10], [doc("eof", "echo foo\n", false, false, 0)]);
    assert_eq!(docs[11], [doc("eo'f", "echo foo\n", true, false, 0)]);
    assert_eq!(docs[12], [doc("one two", "echo bar\n", false, false, 0)]);
    assert_eq!(docs[13], [doc("$EOF", "", true, false, 0)]);
    assert_eq!(docs[14], [doc("EOF", "", true, false, 0)]);
    // USER cannot take a heredoc: the marker stays an argument and the
    // next line is an instruction.
    assert!(docs[15].is_empty());
    assert!(docs[16].is_empty());
    assert_eq!(ast.nodes.len(), 17);
}

#[test]
fn heredoc_markers() {
    for ok in [
        "<<EOF",
        "<<'EOF'",
        "<<\"EOF\"",
        "<<-EOF",
        "<<-'EOF'",
        "<<EO\"F\"",
        "<< EOF",
        "<<- EOF",
    ] {
        let h = parse_heredoc(ok).ok().flatten().map(|h| h.name);
        assert_eq!(h.as_deref(), Some("EOF"), "{ok}");
    }
    for bad in ["<<'EOF", "<<\"EOF", "<<EOF'", "<<EOF\""] {
        assert!(parse_heredoc(bad).is_err(), "{bad}");
    }
    for not in ["", "EOF", "<<", "<<-", "<EOF", "<<<EOF", "<<EOF sh"] {
        assert!(matches!(parse_heredoc(not), Ok(None)), "{not}");
    }
}

#[test]
fn unterminated_heredoc_points_at_marker() {
    let e = err("FROM a\nRUN cat <<EOF\nhello\n");
    assert_eq!(e.message(), "unterminated heredoc \"EOF\"");
    assert_eq!(e.position(), Some(Position { line: 2, column: 9 }));
}

#[test]
fn line_spans_include_continuations_and_skipped_lines() {
    let ast = parse_str("# escape=\\\n\nFROM a\nRUN a \\\n\n# c\n  b\nCMD x\n");
    let spans: Vec<(usize, usize)> = ast
        .nodes
        .iter()
        .map(|n| (n.span.start, n.span.end))
        .collect();
    assert_eq!(spans, [(3, 3), (4, 7), (8, 8)]);
    assert_eq!(ast.nodes[1].args, ["a   b"]);
    assert_eq!(ast.warnings.len(), 1);
    assert_eq!(ast.warnings[0].line, 7);
}

#[test]
fn directives() {
    let ast = parse_str(
        "# syntax=docker/dockerfile:1\n#check=skip=all\n# escape=`\nFROM a\nRUN x `\n  y\n",
    );
    assert_eq!(
        ast.directives.syntax.as_deref(),
        Some("docker/dockerfile:1")
    );
    assert_eq!(ast.directives.check.as_deref(), Some("skip=all"));
    assert_eq!(ast.directives.escape, '`');
    assert_eq!(ast.nodes[1].args, ["x   y"]);
    // After any other line, a directive is only a comment.
    assert_eq!(
        parse_str("FROM a\n# escape=`\nRUN x \\\n y")
            .directives
            .escape,
        '\\'
    );
    assert_eq!(parse_str("\n# escape=`\nFROM a").directives.escape, '\\');
    let e = err("# escape=`\n# escape=\\\nFROM a");
    assert_eq!(e.message(), "only one escape parser directive can be used");
    assert_eq!(e.position().map(|p| p.line), Some(2));
    assert!(
        err("# escape=x\nFROM a")
            .message()
            .contains("invalid escape token")
    );
}

#[test]
fn escaped_escape_does_not_continue() {
    let ast = parse_str("FROM a\nRUN echo foo\\\\\nRUN echo bar\n");
    assert_eq!(ast.nodes.len(), 3);
    assert_eq!(ast.nodes[1].args, ["echo foo\\\\"]);
}

#[test]
fn flags_and_forms() {
    let ast = parse_str(concat!(
        "FROM --platform=$BUILDPLATFORM golang AS build\n",
        "COPY --from=build --chown=\"a b\" --link /x /y\n",
        "RUN --mount=type=cache,target=/c --mount=type=tmpfs,target=/t -- --not-a-flag\n",
        "CMD [\"a\", \"b\"]\n",
        "CMD ['a']\n",
        "ENTRYPOINT []\n",
        "ENV A=1 B=\"two words\"\n",
        "ENV LEGACY some value\n",
        "ONBUILD --x RUN --y echo\n",
        "HEALTHCHECK --interval=5s CMD [\"true\"]\n",
        "WHATEVER foo bar\n",
    ));
    let dumps: Vec<String> = ast.nodes.iter().map(Node::dump).collect();
    assert_eq!(
        dumps,
        [
            r#"from ["--platform=$BUILDPLATFORM"] "golang" "AS" "build""#,
            r#"copy ["--from=build" "--chown=a b" "--link"] "/x" "/y""#,
            r#"run ["--mount=type=cache,target=/c" "--mount=type=tmpfs,target=/t"] "--not-a-flag""#,
            r#"cmd "a" "b""#,
            r#"cmd "['a']""#,
            "entrypoint",
            r#"env "A" "1" "=" "B" "\"two words\"" "=""#,
            r#"env "LEGACY" "some value" """#,
            r#"onbuild ["--x"] (run ["--y"] "echo")"#,
            r#"healthcheck ["--interval=5s"] "CMD" "true""#,
            r#"whatever """#,
        ]
    );
    assert!(ast.nodes[3].json && !ast.nodes[4].json);
}

#[test]
fn syntax_errors_have_positions() {
    let e = err("FROM a\n  CMD [\"a\", [\"b\"]]\n");
    assert_eq!(e.message(), NOT_STRING_ARRAY);
    assert_eq!(e.position(), Some(Position { line: 2, column: 7 }));
    assert_eq!(err("").message(), "file with no instructions");
    assert_eq!(err("# only\n\n").message(), "file with no instructions");
    assert!(
        err("FROM a\nENV PATH\n")
            .message()
            .contains("ENV must have two arguments")
    );
    let e = err("FROM a\nENV a=1 b\n");
    assert_eq!(e.position(), Some(Position { line: 2, column: 9 }));
    let e = parse(b"FROM a\nRUN \xff\n").err();
    assert_eq!(
        e.and_then(|e| e.position()),
        Some(Position { line: 2, column: 5 })
    );
}

#[test]
fn long_lines_are_rejected() {
    let mut s = String::from("FROM a\nRUN ");
    s.push_str(&"x".repeat(MAX_LINE_LEN));
    let e = err(&s);
    assert!(e.message().contains("max allowed size"));
    assert_eq!(e.position().map(|p| p.line), Some(2));
    let ok = format!("FROM a\nRUN {}\n", "x".repeat(MAX_LINE_LEN - 4));
    assert_eq!(parse_str(&ok).nodes.len(), 2);
}

#[test]
fn bom_and_crlf() {
    let ast = parse_str("\u{feff}FROM a\r\nRUN b \\\r\n c\r\n");
    assert_eq!(ast.dump(), "(from \"a\")\n(run \"b  c\")\n");
}

#[test]
fn parse_words_keeps_quotes() {
    assert_eq!(
        parse_words("abc=\"123 456\" def", '\\'),
        ["abc=\"123 456\"", "def"]
    );
    assert_eq!(
        parse_words("a\\ b 'c d' \"\"", '\\'),
        ["a\\ b", "'c d'", "\"\""]
    );
    assert_eq!(parse_words("x\\", '\\'), ["x"]);
    assert_eq!(parse_words("\"unterminated", '\\'), ["\"unterminated"]);
    assert_eq!(parse_words("a \"b\\", '\\'), ["a", "\"b"]);
    assert_eq!(parse_words("'a\\", '\\'), ["'a\\"]);
    assert_eq!(parse_words("  ", '\\'), Vec::<&str>::new());
    assert_eq!(parse_words("\"\" x", '\\'), ["\"\"", "x"]);
}
