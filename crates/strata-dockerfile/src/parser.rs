//! The low-level parser: bytes in, a list of instruction nodes out.
//!
//! This stage knows the Dockerfile's line syntax (directives, comments,
//! continuations, heredocs, flags, JSON versus shell form) and splits each
//! instruction's arguments the way BuildKit's `parser.Parse` does, so its
//! [`Ast::dump`] is byte-for-byte BuildKit's parse-tree dump. It does not
//! validate instructions or expand variables; [`crate::instructions`] does.

use std::borrow::Cow;

use crate::error::{Error, ErrorKind, Position, Result, Span};
use crate::shell::{Lexer, NoEnv};
use crate::text::{go_quote, is_space, split_blank_runs, trim_left_space, trim_space};

/// BuildKit reads lines with Go's `bufio.Scanner`, whose token limit makes a
/// longer physical line an error.
pub const MAX_LINE_LEN: usize = 65_535;

/// A parsed Dockerfile: its directives and one node per instruction.
#[derive(Debug, Clone)]
pub struct Ast {
    /// The parser directives at the top of the file.
    pub directives: Directives,
    /// The instructions in source order.
    pub nodes: Vec<Node>,
    /// Non-fatal findings, such as empty continuation lines.
    pub warnings: Vec<Warning>,
    source: SourceMap,
}

/// Parser directives (`# syntax=`, `# escape=`, `# check=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directives {
    /// The escape token: `\` (default) or `` ` ``.
    pub escape: char,
    /// The `syntax` directive's value, if present.
    pub syntax: Option<String>,
    /// The `check` directive's value, if present.
    pub check: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            escape: '\\',
            syntax: None,
            check: None,
        }
    }
}

/// One instruction as written, its arguments split but not interpreted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The instruction keyword with its original case (`RUN`, `onBuild`).
    pub keyword: String,
    /// Leading `--flags`, each with its `--` and with quotes and escapes
    /// removed (`--mount=type=cache,target=/x`).
    pub flags: Vec<String>,
    /// The arguments, split by the keyword's rule.
    pub args: Vec<String>,
    /// For `ONBUILD`, the instruction it defers.
    pub trigger: Option<Box<Node>>,
    /// Whether the arguments were given in JSON (exec) form.
    pub json: bool,
    /// The logical line, continuations joined.
    pub original: String,
    /// Heredoc bodies attached to the instruction, in the order of their
    /// `<<` markers.
    pub heredocs: Vec<Heredoc>,
    /// The physical lines the instruction covers.
    pub span: Span,
    /// The lower-case instruction, looked up once.
    instruction: Option<&'static str>,
}

/// A here-document attached to `RUN`, `COPY` or `ADD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word with quotes removed; also the file name for COPY.
    pub name: String,
    /// The file descriptor in `3<<EOF`, 0 when none is given.
    pub fd: u64,
    /// Whether variables in the body are expanded (the delimiter was not quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from the body.
    pub chomp: bool,
    /// The body, every line with its newline, tabs not yet stripped.
    pub content: String,
}

impl Heredoc {
    /// The body as the instruction sees it: with leading tabs removed from
    /// each line for `<<-`.
    pub fn body(&self) -> Cow<'_, str> {
        if !self.chomp {
            return Cow::Borrowed(&self.content);
        }
        let mut out = String::with_capacity(self.content.len());
        for line in self.content.split_inclusive('\n') {
            out.push_str(line.trim_start_matches('\t'));
        }
        Cow::Owned(out)
    }
}

/// A non-fatal finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// What was found.
    pub message: String,
    /// The physical line it is about.
    pub line: usize,
}

/// The source text, kept to turn an instruction's line span and the text of
/// the offending token into a line and column.
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    text: String,
    line_starts: Vec<usize>,
}

impl SourceMap {
    /// The text of physical line `n` (1-based), without its line ending.
    pub fn line(&self, n: usize) -> Option<&str> {
        line_in(&self.text, &self.line_starts, n)
    }

    /// The position of `needle` within the lines of `span`, or the start
    /// of the span's first line when the needle is not found.
    pub fn position(&self, span: Span, needle: &str) -> Position {
        position_in(&self.text, &self.line_starts, span, needle)
    }
}

fn line_in<'t>(text: &'t str, starts: &[usize], n: usize) -> Option<&'t str> {
    let start = *starts.get(n.checked_sub(1)?)?;
    let end = starts.get(n).copied().unwrap_or(text.len());
    Some(text[start..end].trim_end_matches(['\n', '\r']))
}

/// Where `needle` first appears in the lines of `span`; else the first
/// non-blank column of the span's first line.
fn position_in(text: &str, starts: &[usize], span: Span, needle: &str) -> Position {
    if !needle.is_empty() {
        for n in span.start..=span.end.max(span.start) {
            let Some(line) = line_in(text, starts, n) else {
                break;
            };
            if let Some(byte) = line.find(needle) {
                return Position {
                    line: n,
                    column: line[..byte].chars().count() + 1,
                };
            }
        }
    }
    let line = line_in(text, starts, span.start).unwrap_or_default();
    let indent = line.chars().take_while(|&c| is_space(c)).count();
    Position {
        line: span.start.max(1),
        column: indent + 1,
    }
}

impl Ast {
    /// BuildKit's parse-tree dump: one line per instruction, each ending
    /// with a newline, in the format of its parser tests' `result` files.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push('(');
            out.push_str(&n.dump());
            out.push_str(")\n");
        }
        out
    }

    /// The position of `needle` within the lines of `span`, or the start of
    /// the span's first line when the needle is not found. Errors found
    /// after parsing use this to point at the offending token.
    pub fn position(&self, span: Span, needle: &str) -> Position {
        self.source.position(span, needle)
    }

    /// The text of physical line `n` (1-based), without its line ending.
    pub fn line(&self, n: usize) -> Option<&str> {
        self.source.line(n)
    }

    /// The source text and its line index.
    pub fn source(&self) -> &SourceMap {
        &self.source
    }

    pub(crate) fn into_parts(self) -> (Directives, Vec<Node>, Vec<Warning>, SourceMap) {
        (self.directives, self.nodes, self.warnings, self.source)
    }
}

impl Node {
    /// This node's part of [`Ast::dump`].
    pub fn dump(&self) -> String {
        let mut s = self.keyword.to_lowercase();
        if !self.flags.is_empty() {
            let flags: Vec<String> = self.flags.iter().map(|f| go_quote(f)).collect();
            s.push_str(" [");
            s.push_str(&flags.join(" "));
            s.push(']');
        }
        if let Some(t) = &self.trigger {
            s.push_str(" (");
            s.push_str(&t.dump());
            s.push(')');
        }
        for a in &self.args {
            s.push(' ');
            s.push_str(&go_quote(a));
        }
        trim_space(&s).to_string()
    }

    /// The instruction in lower case, when the keyword is one
    /// (keywords are case-insensitive); `None` for anything else.
    pub fn instruction(&self) -> Option<&'static str> {
        self.instruction
    }

    fn can_contain_heredoc(&self) -> bool {
        let node = match (&self.trigger, self.instruction()) {
            (Some(t), Some("onbuild")) => t,
            _ => self,
        };
        matches!(node.instruction(), Some("add" | "copy" | "run")) && !node.json
    }
}

/// Parses a Dockerfile.
pub fn parse(input: &[u8]) -> Result<Ast> {
    if input.len() > crate::limits::MAX_DOCKERFILE_BYTES {
        return Err(Error::new(
            ErrorKind::Limit,
            format!(
                "the Dockerfile is {} bytes, over the limit of {} bytes",
                input.len(),
                crate::limits::MAX_DOCKERFILE_BYTES
            ),
        ));
    }
    let text = match std::str::from_utf8(input) {
        Ok(t) => t,
        Err(e) => {
            let before = &input[..e.valid_up_to()];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&before[line_start..])
                .chars()
                .count()
                + 1;
            return Err(Error::new(ErrorKind::Syntax, "file is not valid UTF-8")
                .at(Position { line, column }));
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    Parser::new(text).run()
}

struct Parser<'a> {
    text: &'a str,
    /// Byte offset of the next unread line.
    pos: usize,
    /// Start of every line read so far.
    line_starts: Vec<usize>,
    escape: char,
    directives: Directives,
    directives_done: bool,
    seen_directives: Vec<String>,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser {
            text,
            pos: 0,
            line_starts: Vec::with_capacity(text.len() / 32),
            escape: '\\',
            directives: Directives::default(),
            directives_done: false,
            seen_directives: Vec::new(),
        }
    }

    fn err_at(&self, msg: impl Into<String>, span: Span, needle: &str) -> Error {
        let at = position_in(self.text, &self.line_starts, span, needle);
        Error::new(ErrorKind::Syntax, msg).at(at)
    }

    /// The next physical line with its `\n`, checked against BuildKit's
    /// length limit.
    fn read_line(&mut self) -> Result<Option<&'a str>> {
        let rest = &self.text[self.pos..];
        if rest.is_empty() {
            return Ok(None);
        }
        let len = rest.find('\n').map_or(rest.len(), |i| i + 1);
        let line = &rest[..len];
        self.line_starts.push(self.pos);
        self.pos += len;
        if line.trim_end_matches('\n').len() > MAX_LINE_LEN {
            let at = Position {
                line: self.line_starts.len(),
                column: 1,
            };
            return Err(Error::new(
                ErrorKind::Syntax,
                format!("dockerfile line greater than max allowed size of {MAX_LINE_LEN}"),
            )
            .at(at));
        }
        Ok(Some(line))
    }

    fn run(mut self) -> Result<Ast> {
        let mut nodes = Vec::with_capacity(self.text.len() / 64);
        let mut warnings = Vec::new();
        let mut line_no = 0;
        while let Some(raw) = self.read_line()? {
            line_no += 1;
            let first = trim_left_space(trim_newline(raw));
            self.directive(first, line_no)?;
            let first = if is_comment(first) { "" } else { first };
            let start = line_no;
            let (first, mut complete) = self.trim_continuation(first);
            if complete && first.is_empty() {
                continue;
            }
            let mut line = first.into_owned();
            let mut empty_continuation = false;
            while !complete {
                let Some(raw) = self.read_line()? else { break };
                line_no += 1;
                if is_comment(raw) {
                    continue;
                }
                let body = trim_newline(raw);
                if trim_left_space(body).is_empty() {
                    empty_continuation = true;
                    continue;
                }
                let (body, done) = self.trim_continuation(body);
                complete = done;
                line.push_str(&body);
            }
            if empty_continuation {
                warnings.push(Warning {
                    message: format!("Empty continuation line found in: {line}"),
                    line: line_no,
                });
            }
            let span = Span {
                start,
                end: line_no,
            };
            let mut node = node_from_line(line, self.escape)
                .map_err(|e| self.err_at(e.message, span, &e.needle))?;
            if node.can_contain_heredoc() && node.original.contains("<<") {
                let heredocs = heredocs_from_line(&node.original)
                    .map_err(|e| self.err_at(e.message, span, &e.needle))?;
                for mut doc in heredocs {
                    let mut terminated = false;
                    while let Some(raw) = self.read_line()? {
                        line_no += 1;
                        let candidate = trim_newline(raw);
                        let candidate = if doc.chomp {
                            candidate.trim_start_matches('\t')
                        } else {
                            candidate
                        };
                        if candidate == doc.name {
                            terminated = true;
                            break;
                        }
                        doc.content.push_str(raw);
                    }
                    if !terminated {
                        let span = Span {
                            start,
                            end: line_no,
                        };
                        return Err(self.err_at(
                            format!("unterminated heredoc {}", go_quote(&doc.name)),
                            span,
                            "<<",
                        ));
                    }
                    node.heredocs.push(doc);
                }
            }
            node.span = Span {
                start,
                end: line_no,
            };
            nodes.push(node);
        }
        if nodes.is_empty() {
            let at = Position {
                line: line_no.max(1),
                column: 1,
            };
            return Err(Error::new(ErrorKind::Syntax, "file with no instructions").at(at));
        }
        let source = SourceMap {
            text: self.text.to_string(),
            line_starts: self.line_starts,
        };
        Ok(Ast {
            directives: self.directives,
            nodes,
            warnings,
            source,
        })
    }

    /// Parser directives live only in the unbroken run of comment lines at
    /// the very top of the file; the first other line ends them for good.
    fn directive(&mut self, line: &str, line_no: usize) -> Result<()> {
        if self.directives_done {
            return Ok(());
        }
        let parsed = line.strip_prefix('#').and_then(parse_directive);
        let Some((key, value)) = parsed else {
            self.directives_done = true;
            return Ok(());
        };
        let key = key.to_ascii_lowercase();
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            self.directives_done = true;
            return Ok(());
        }
        let span = Span {
            start: line_no,
            end: line_no,
        };
        if self.seen_directives.contains(&key) {
            let msg = format!("only one {key} parser directive can be used");
            return Err(self.err_at(msg, span, "#"));
        }
        match key.as_str() {
            "escape" => match value {
                "\\" => self.escape = '\\',
                "`" => self.escape = '`',
                _ => {
                    let msg = format!("invalid escape token '{value}' does not match ` or \\");
                    return Err(self.err_at(msg, span, value));
                }
            },
            "syntax" => self.directives.syntax = Some(value.to_string()),
            _ => self.directives.check = Some(value.to_string()),
        }
        self.directives.escape = self.escape;
        self.seen_directives.push(key);
        Ok(())
    }

    /// Removes a trailing escape token (and blanks after it) that continues
    /// the line. An escaped escape token (`\\`) does not continue it.
    fn trim_continuation(&self, line: &'a str) -> (Cow<'a, str>, bool) {
        let e = self.escape;
        let trimmed = line.trim_end_matches([' ', '\t']);
        let Some(before) = trimmed.strip_suffix(e) else {
            return (Cow::Borrowed(line), true);
        };
        if before.is_empty() || !before.ends_with(e) {
            return (Cow::Borrowed(before), false);
        }
        (Cow::Borrowed(line), true)
    }
}

fn trim_newline(line: &str) -> &str {
    line.trim_end_matches(['\r', '\n'])
}

fn is_comment(line: &str) -> bool {
    trim_left_space(line).starts_with('#')
}

/// Matches BuildKit's `^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$` against the
/// text after a directive's `#`, where `\s` is Go's ASCII class.
fn parse_directive(rest: &str) -> Option<(&str, &str)> {
    let is_s = |c: char| matches!(c, '\t' | '\n' | '\x0c' | '\r' | ' ');
    let rest = trim_left_space(rest);
    let key_len = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())))
        .map_or(rest.len(), |(i, _)| i);
    if key_len == 0 {
        return None;
    }
    let (key, after) = rest.split_at(key_len);
    let after = after.trim_start_matches(is_s).strip_prefix('=')?;
    if after.is_empty() {
        return None;
    }
    let value = after.trim_start_matches(is_s).trim_end_matches(is_s);
    if !value.is_empty() {
        return Some((key, value));
    }
    // The value is all blanks: the lazy `(.+?)` still takes the last one.
    let last = after.char_indices().last().map_or(0, |(i, _)| i);
    Some((key, &after[last..]))
}

/// A parse failure inside one logical line, with the text to point at.
pub(crate) struct LineError {
    message: String,
    needle: String,
}

impl LineError {
    fn new(message: impl Into<String>, needle: impl Into<String>) -> Self {
        LineError {
            message: message.into(),
            needle: needle.into(),
        }
    }
}

/// How one instruction's arguments are split.
struct Parsed {
    args: Vec<String>,
    trigger: Option<Box<Node>>,
    json: bool,
}

impl Parsed {
    fn args(args: Vec<String>) -> Self {
        Parsed {
            args,
            trigger: None,
            json: false,
        }
    }
}

/// The instructions BuildKit's parser knows, lower case.
const INSTRUCTIONS: &[&str] = &[
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
];

fn instruction_of(keyword: &str) -> Option<&'static str> {
    // Keywords are short: lower-case into a stack buffer and compare bytes.
    let mut buf = [0u8; 11];
    let lower = buf.get_mut(..keyword.len())?;
    lower.copy_from_slice(keyword.as_bytes());
    lower.make_ascii_lowercase();
    INSTRUCTIONS.iter().copied().find(|i| i.as_bytes() == lower)
}

fn node_from_line(line: String, escape: char) -> Result<Node, LineError> {
    let (keyword, flags, args) = split_command(&line, escape);
    let instruction = instruction_of(keyword);
    let parsed = match instruction {
        Some("add" | "copy" | "volume") => parse_maybe_json_to_list(args)?,
        Some("arg") => Parsed::args(
            parse_words(args, escape)
                .into_iter()
                .map(str::to_string)
                .collect(),
        ),
        Some("cmd" | "entrypoint" | "run" | "shell") => parse_maybe_json(args)?,
        Some("env") => Parsed::args(parse_name_val(args, "ENV", escape)?),
        Some("label") => Parsed::args(parse_name_val(args, "LABEL", escape)?),
        Some("expose" | "from") => Parsed::args(whitespace_delimited(args)),
        Some("healthcheck") => parse_health_config(args)?,
        Some("maintainer" | "stopsignal" | "user" | "workdir") => {
            Parsed::args(if args.is_empty() {
                vec![]
            } else {
                vec![args.to_string()]
            })
        }
        Some("onbuild") => Parsed {
            args: vec![],
            trigger: if args.is_empty() {
                None
            } else {
                Some(Box::new(node_from_line(args.to_string(), escape)?))
            },
            json: false,
        },
        // Unknown instructions keep their keyword and drop their arguments;
        // the instruction layer reports them.
        _ => Parsed::args(vec![String::new()]),
    };
    let keyword = keyword.to_string();
    Ok(Node {
        keyword,
        flags,
        args: parsed.args,
        trigger: parsed.trigger,
        json: parsed.json,
        original: line,
        heredocs: Vec::new(),
        span: Span::default(),
        instruction,
    })
}

/// Splits a logical line into keyword, leading flags and the rest.
fn split_command(line: &str, escape: char) -> (&str, Vec<String>, &str) {
    let line = trim_space(line);
    let is_blank = |c: char| matches!(c, '\t' | '\x0b' | '\x0c' | '\r' | ' ');
    let Some(end) = line.find(is_blank) else {
        return (line, Vec::new(), "");
    };
    let rest = line[end..].trim_start_matches(is_blank);
    let (args, flags) = extract_flags(rest, escape);
    (&line[..end], flags, trim_space(args))
}

/// Takes the leading `--flag` words off `line`. Quote characters are
/// dropped and the escape token makes the next character literal; a bare
/// `--` ends the flags.
///
/// BuildKit walks this text byte by byte and re-encodes each byte as a
/// Latin-1 character, which mangles non-ASCII flag values; strata walks
/// characters, so `--chown=josé` stays `josé`.
fn extract_flags(line: &str, escape: char) -> (&str, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote(char),
    }
    let mut flags = Vec::new();
    let mut word = String::new();
    let mut blank_ok = false;
    let mut phase = Phase::Spaces;
    let mut chars = line.char_indices().peekable();
    while let Some((pos, c)) = chars.next() {
        match phase {
            Phase::Spaces => {
                if is_space(c) {
                    continue;
                }
                if !line[pos..].starts_with("--") {
                    return (&line[pos..], flags);
                }
                phase = Phase::Word;
                word.push(c);
            }
            Phase::Word => {
                if is_space(c) {
                    if word == "--" {
                        return (&line[pos..], flags);
                    }
                    if blank_ok || !word.is_empty() {
                        flags.push(std::mem::take(&mut word));
                    }
                    word.clear();
                    blank_ok = false;
                    phase = Phase::Spaces;
                } else if c == '\'' || c == '"' {
                    blank_ok = true;
                    phase = Phase::Quote(c);
                } else if c == escape {
                    if let Some((_, n)) = chars.next() {
                        word.push(n);
                    }
                } else {
                    word.push(c);
                }
            }
            Phase::Quote(q) => {
                if c == q {
                    phase = Phase::Word;
                } else if c == escape {
                    match chars.next() {
                        Some((_, n)) => word.push(n),
                        None => phase = Phase::Word,
                    }
                } else {
                    word.push(c);
                }
            }
        }
    }
    if phase != Phase::Spaces && word != "--" && (blank_ok || !word.is_empty()) {
        flags.push(word);
    }
    ("", flags)
}

/// Splits words on whitespace, keeping quotes and escapes in the words.
/// ENV, LABEL and ARG use it; quotes are removed later, at expansion.
///
/// Every word is a slice of `rest`: quotes and escapes are kept verbatim,
/// and the only character ever dropped, an escape at the very end of the
/// input, is also the last character of the last word.
pub(crate) fn parse_words(rest: &str, escape: char) -> Vec<&str> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote(char),
    }
    let mut words = Vec::new();
    let mut start = 0;
    let mut blank_ok = false;
    let mut phase = Phase::Spaces;
    let mut chars = rest.char_indices();
    let mut end_override = None;
    while let Some((pos, c)) = chars.next() {
        match phase {
            Phase::Spaces if is_space(c) => continue,
            Phase::Spaces | Phase::Word => {
                if phase == Phase::Spaces {
                    phase = Phase::Word;
                    start = pos;
                } else if is_space(c) {
                    if blank_ok || pos > start {
                        words.push(&rest[start..pos]);
                    }
                    blank_ok = false;
                    phase = Phase::Spaces;
                    continue;
                }
                if c == '\'' || c == '"' {
                    blank_ok = true;
                    phase = Phase::Quote(c);
                } else if c == escape && chars.next().is_none() {
                    // Outside quotes an escape keeps the next character
                    // with it; one at the very end is dropped.
                    end_override = Some(pos);
                }
            }
            Phase::Quote(q) => {
                if c == q {
                    phase = Phase::Word;
                } else if c == escape && q != '\'' && chars.next().is_none() {
                    // Inside double quotes likewise; single quotes escape nothing.
                    end_override = Some(pos);
                    phase = Phase::Word;
                }
            }
        }
    }
    let end = end_override.unwrap_or(rest.len());
    if phase != Phase::Spaces && (blank_ok || end > start) {
        words.push(&rest[start..end]);
    }
    words
}

fn whitespace_delimited(rest: &str) -> Vec<String> {
    if rest.is_empty() {
        return Vec::new();
    }
    split_blank_runs(rest, None)
        .into_iter()
        .map(str::to_string)
        .collect()
}

const NOT_STRING_ARRAY: &str =
    "when using JSON array syntax, arrays must be comprised of strings only";

/// `Some(args)` when `rest` is a JSON array of strings, `None` when it is
/// not JSON at all (the shell form), and an error for a JSON array holding
/// anything but strings.
fn parse_json(rest: &str) -> Result<Option<Vec<String>>, LineError> {
    let rest = trim_left_space(rest);
    if !rest.starts_with('[') {
        return Ok(None);
    }
    // Nearly every JSON form is an array of strings; decode that directly
    // and only look closer when it fails.
    if let Ok(args) = serde_json::from_str::<Vec<String>>(rest) {
        return Ok(Some(args));
    }
    let Ok(values) = serde_json::from_str::<Vec<serde_json::Value>>(rest) else {
        return Ok(None);
    };
    values
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            _ => Err(LineError::new(NOT_STRING_ARRAY, "[")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn parse_maybe_json(rest: &str) -> Result<Parsed, LineError> {
    if rest.is_empty() {
        return Ok(Parsed::args(vec![]));
    }
    Ok(match parse_json(rest)? {
        Some(args) => Parsed {
            args,
            trigger: None,
            json: true,
        },
        None => Parsed::args(vec![rest.to_string()]),
    })
}

fn parse_maybe_json_to_list(rest: &str) -> Result<Parsed, LineError> {
    Ok(match parse_json(rest)? {
        Some(args) => Parsed {
            args,
            trigger: None,
            json: true,
        },
        None => Parsed::args(whitespace_delimited(rest)),
    })
}

/// ENV and LABEL: either the legacy `KEY value…` form or `k=v` words,
/// as `key value separator` triples.
fn parse_name_val(rest: &str, instruction: &str, escape: char) -> Result<Vec<String>, LineError> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else {
        return Ok(vec![]);
    };
    if !first.contains('=') {
        let parts = split_blank_runs(rest, Some(2));
        let [key, value] = parts.as_slice() else {
            return Err(LineError::new(
                format!("{instruction} must have two arguments"),
                "",
            ));
        };
        return Ok(vec![key.to_string(), value.to_string(), String::new()]);
    }
    let mut out = Vec::with_capacity(words.len() * 3);
    for word in words {
        let Some((k, v)) = word.split_once('=') else {
            return Err(LineError::new(
                format!(
                    "Syntax error - can't find = in {}. Must be of the form: name=value",
                    go_quote(word)
                ),
                word,
            ));
        };
        out.extend([k.to_string(), v.to_string(), "=".to_string()]);
    }
    Ok(out)
}

/// HEALTHCHECK: the type word (`CMD`, `NONE`), then a command in JSON or
/// shell form.
fn parse_health_config(rest: &str) -> Result<Parsed, LineError> {
    let sep = rest.find(is_space).unwrap_or(rest.len());
    if sep == 0 {
        return Ok(Parsed::args(vec![]));
    }
    let (kind, cmd) = rest.split_at(sep);
    let mut parsed = parse_maybe_json(trim_left_space(cmd))?;
    parsed.args.insert(0, kind.to_string());
    Ok(parsed)
}

/// Finds `<<WORD` markers in a RUN/COPY/ADD line.
fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, LineError> {
    let lexer = Lexer::new('\\')
        .raw_quotes(true)
        .raw_escapes(true)
        .skip_unset(true);
    // A line the lexer cannot split (an unbalanced quote) has no heredocs.
    let words = lexer.process_words(line, &NoEnv).unwrap_or_default();
    let mut docs = Vec::new();
    for word in words {
        if let Some(doc) = parse_heredoc(&word)? {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// Whether `s` is, as a whole, a heredoc marker such as `<<EOF` or `<<-'X'`.
pub fn is_heredoc_marker(s: &str) -> bool {
    matches!(parse_heredoc(s), Ok(Some(_)))
}

/// Parses one `[fd]<<[-]WORD` token; `Ok(None)` when it is not a heredoc.
pub(crate) fn parse_heredoc(src: &str) -> Result<Option<Heredoc>, LineError> {
    let digits = src.bytes().take_while(u8::is_ascii_digit).count();
    let Some(after) = src[digits..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, after) = match after.strip_prefix('-') {
        Some(a) => (true, a),
        None => (false, after),
    };
    let rest = after.trim_start_matches(['\t', '\n', '\x0c', '\r', ' ']);
    if rest.is_empty() || rest.contains('<') {
        return Ok(None);
    }
    let fd = match &src[..digits] {
        "" => 0,
        d => d.parse::<u64>().unwrap_or(u64::MAX),
    };
    let lexer = Lexer::new('\\').skip_unset(true);
    let words = lexer
        .process_words(rest, &NoEnv)
        .map_err(|e| LineError::new(e.message(), src.to_string()))?;
    let [word] = words.as_slice() else {
        return Ok(None);
    };
    let raw = lexer
        .raw_quotes(true)
        .process_words(rest, &NoEnv)
        .map_err(|e| LineError::new(e.message(), src.to_string()))?;
    let [raw_word] = raw.as_slice() else {
        return Err(LineError::new(
            format!("internal lexing of heredoc produced inconsistent results: {rest}"),
            src.to_string(),
        ));
    };
    // A quote anywhere in the delimiter turns expansion off, as in sh.
    let quotes = |s: &str| s.chars().filter(|&c| c == '\'' || c == '"').count();
    Ok(Some(Heredoc {
        name: word.clone(),
        fd,
        expand: quotes(word) == quotes(raw_word),
        chomp,
        content: String::new(),
    }))
}

#[cfg(test)]
mod tests;
