//! Typed instructions: the parse tree checked and turned into commands.
//!
//! Each [`Command`] carries its arguments as written (quotes and `$VAR`s
//! intact); [`crate::expand`] expands them once the variables in scope are
//! known. Validation here is what BuildKit's `instructions.Parse` checks.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Span};
use crate::flags::{FlagKind, Flags, parse_interval};
use crate::mount::MountSpec;
use crate::parser::{Heredoc, Node, SourceMap, parse_heredoc};
use crate::text::trim_space;

/// One instruction inside a stage, or a global `ARG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// The physical lines it covers.
    pub span: Span,
    /// The logical line as written, continuations joined.
    pub original: String,
    /// What it does.
    pub command: Command,
}

/// An instruction's meaning. `FROM` is not here: it starts a [`crate::Stage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `ADD`.
    Add(Box<Add>),
    /// `ARG name[=default] …`.
    Arg(Vec<ArgDecl>),
    /// `CMD`.
    Cmd(CommandLine),
    /// `COPY`.
    Copy(Box<Copy>),
    /// `ENTRYPOINT`.
    Entrypoint(CommandLine),
    /// `ENV k=v …` or the legacy `ENV k v`.
    Env(Vec<KeyValue>),
    /// `EXPOSE port[/proto] …`, sorted as BuildKit sorts them.
    Expose(Vec<String>),
    /// `HEALTHCHECK`.
    Healthcheck(Box<Healthcheck>),
    /// `LABEL k=v …`.
    Label(Vec<KeyValue>),
    /// `MAINTAINER name` (deprecated; sets the image author).
    Maintainer(String),
    /// `ONBUILD <instruction>`: the trigger, kept as source text for images
    /// built from this one.
    Onbuild(String),
    /// `RUN`.
    Run(Box<Run>),
    /// `SHELL ["exe", "arg"…]`.
    Shell(Vec<String>),
    /// `STOPSIGNAL sig`.
    StopSignal(String),
    /// `USER user[:group]`.
    User(String),
    /// `VOLUME path …`.
    Volume(Vec<String>),
    /// `WORKDIR path`.
    Workdir(String),
}

impl Command {
    /// The instruction keyword in upper case.
    pub fn keyword(&self) -> &'static str {
        match self {
            Command::Add(_) => "ADD",
            Command::Arg(_) => "ARG",
            Command::Cmd(_) => "CMD",
            Command::Copy(_) => "COPY",
            Command::Entrypoint(_) => "ENTRYPOINT",
            Command::Env(_) => "ENV",
            Command::Expose(_) => "EXPOSE",
            Command::Healthcheck(_) => "HEALTHCHECK",
            Command::Label(_) => "LABEL",
            Command::Maintainer(_) => "MAINTAINER",
            Command::Onbuild(_) => "ONBUILD",
            Command::Run(_) => "RUN",
            Command::Shell(_) => "SHELL",
            Command::StopSignal(_) => "STOPSIGNAL",
            Command::User(_) => "USER",
            Command::Volume(_) => "VOLUME",
            Command::Workdir(_) => "WORKDIR",
        }
    }
}

/// A `key=value` pair of ENV or LABEL, unexpanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key as written.
    pub key: String,
    /// The value as written, quotes included.
    pub value: String,
    /// True for the legacy `ENV key value` form.
    pub legacy: bool,
}

/// One name of an `ARG` instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// The argument's name.
    pub key: String,
    /// The default, unexpanded, if one is given.
    pub default: Option<String>,
}

/// A command line of RUN, CMD or ENTRYPOINT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    /// Exec form: the argv. Shell form: one string, the command.
    pub args: Vec<String>,
    /// True for the shell form, which runs under the stage's SHELL.
    pub shell_form: bool,
    /// Heredocs attached to the instruction.
    pub heredocs: Vec<Heredoc>,
}

/// `RUN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// What to run.
    pub command: CommandLine,
    /// `--mount` values, unexpanded; see [`crate::Mount::parse`].
    pub mounts: Vec<MountSpec>,
    /// `--network=default|none|host`.
    pub network: Option<String>,
    /// `--security=sandbox|insecure`.
    pub security: Option<String>,
}

/// A source given inline as a heredoc (`COPY <<EOF /dest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineFile {
    /// The file name (the heredoc delimiter).
    pub name: String,
    /// The contents, leading tabs already removed for `<<-`.
    pub data: String,
    /// Whether `$VAR`s in the contents are expanded.
    pub expand: bool,
}

/// Sources and destination of COPY or ADD, unexpanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// Paths (COPY, ADD) or URLs (ADD).
    pub sources: Vec<String>,
    /// Heredoc sources.
    pub inline: Vec<InlineFile>,
    /// The destination path.
    pub dest: String,
}

/// `COPY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// What to copy and where.
    pub files: Files,
    /// `--from=stage|index|image`.
    pub from: Option<String>,
    /// `--chown=user[:group]`.
    pub chown: Option<String>,
    /// `--chmod=mode`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude=pattern`, repeated.
    pub excludes: Vec<String>,
}

/// `ADD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Add {
    /// What to add and where.
    pub files: Files,
    /// `--chown=user[:group]`.
    pub chown: Option<String>,
    /// `--chmod=mode`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--keep-git-dir`, when given.
    pub keep_git_dir: Option<bool>,
    /// `--checksum=sha256:…` for URL sources.
    pub checksum: Option<String>,
    /// `--unpack`, when given.
    pub unpack: Option<bool>,
    /// `--exclude=pattern`, repeated.
    pub excludes: Vec<String>,
}

/// `HEALTHCHECK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: turn off the base image's check.
    None,
    /// `HEALTHCHECK [options] CMD …`.
    Cmd {
        /// `["CMD", argv…]` (exec form) or `["CMD-SHELL", command]`.
        test: Vec<String>,
        /// `--interval`.
        interval: Option<Duration>,
        /// `--timeout`.
        timeout: Option<Duration>,
        /// `--start-period`.
        start_period: Option<Duration>,
        /// `--start-interval`.
        start_interval: Option<Duration>,
        /// `--retries`.
        retries: u32,
    },
}

/// All instruction keywords, for suggestions.
pub(crate) const KEYWORDS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// What a node turned into: a stage header or a command.
pub(crate) enum Parsed {
    From {
        base: String,
        name: Option<String>,
        platform: Option<String>,
    },
    Command(Command),
}

/// Turns one parse-tree node into a typed instruction.
/// The node's arguments are moved out, not copied.
pub(crate) fn parse_node(source: &SourceMap, node: &mut Node) -> Result<Parsed, Error> {
    let span = node.span;
    parse_node_inner(node).map_err(|(message, needle)| {
        Error::new(ErrorKind::Instruction, message).at(source.position(span, &needle))
    })
}

type NodeResult<T> = Result<T, (String, String)>;

fn flags(node: &Node, spec: &[(&'static str, FlagKind)]) -> NodeResult<Flags> {
    Flags::parse(&node.flags, spec).map_err(|e| (e.message, e.needle))
}

fn at_least_one(node: &Node, name: &str) -> NodeResult<()> {
    if node.args.is_empty() {
        return Err((
            format!("{name} requires at least one argument"),
            String::new(),
        ));
    }
    Ok(())
}

fn exactly_one(node: &Node, name: &str) -> NodeResult<String> {
    match node.args.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err((
            format!("{name} requires exactly one argument"),
            String::new(),
        )),
    }
}

fn parse_node_inner(node: &mut Node) -> NodeResult<Parsed> {
    let cmd = |c| Ok(Parsed::Command(c));
    match node.instruction().unwrap_or_default() {
        "from" => {
            let f = flags(node, &[("platform", FlagKind::String)])?;
            let name = match node.args.as_slice() {
                [_] => None,
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
                    let lower = name.to_lowercase();
                    if !valid_stage_name(&lower) {
                        return Err((
                            format!(
                                "invalid name for build stage: {}, name can't start with a number or contain symbols",
                                crate::go_quote(name)
                            ),
                            name.clone(),
                        ));
                    }
                    Some(lower)
                }
                _ => {
                    return Err((
                        "FROM requires either one or three arguments".into(),
                        String::new(),
                    ));
                }
            };
            let base = std::mem::take(&mut node.args[0]);
            Ok(Parsed::From {
                base,
                name,
                platform: f.string("platform"),
            })
        }
        "env" => {
            flags(node, &[])?;
            cmd(Command::Env(key_values(node, "ENV")?))
        }
        "label" => {
            flags(node, &[])?;
            cmd(Command::Label(key_values(node, "LABEL")?))
        }
        "maintainer" => {
            let m = exactly_one(node, "MAINTAINER")?;
            flags(node, &[])?;
            cmd(Command::Maintainer(m))
        }
        "add" => {
            let f = flags(
                node,
                &[
                    ("chown", FlagKind::String),
                    ("chmod", FlagKind::String),
                    ("link", FlagKind::Bool),
                    ("keep-git-dir", FlagKind::Bool),
                    ("checksum", FlagKind::String),
                    ("unpack", FlagKind::Bool),
                    ("exclude", FlagKind::Strings),
                ],
            )?;
            let files = files(node, "ADD")?;
            cmd(Command::Add(Box::new(Add {
                files,
                chown: f.string("chown"),
                chmod: f.string("chmod"),
                link: f.bool("link"),
                keep_git_dir: f.opt_bool("keep-git-dir"),
                checksum: f.string("checksum"),
                unpack: f.opt_bool("unpack"),
                excludes: f.strings("exclude"),
            })))
        }
        "copy" => {
            let f = flags(
                node,
                &[
                    ("chown", FlagKind::String),
                    ("from", FlagKind::String),
                    ("chmod", FlagKind::String),
                    ("link", FlagKind::Bool),
                    ("exclude", FlagKind::Strings),
                    ("parents", FlagKind::Bool),
                ],
            )?;
            let files = files(node, "COPY")?;
            cmd(Command::Copy(Box::new(Copy {
                files,
                from: f.string("from"),
                chown: f.string("chown"),
                chmod: f.string("chmod"),
                link: f.bool("link"),
                parents: f.bool("parents"),
                excludes: f.strings("exclude"),
            })))
        }
        "onbuild" => {
            let Some(trigger) = &node.trigger else {
                return Err((
                    "ONBUILD requires at least one argument".into(),
                    String::new(),
                ));
            };
            flags(node, &[])?;
            match trigger.instruction().unwrap_or_default() {
                "onbuild" => {
                    return Err((
                        "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into(),
                        trigger.keyword.clone(),
                    ));
                }
                "maintainer" | "from" => {
                    return Err((
                        format!(
                            "{} isn't allowed as an ONBUILD trigger",
                            trigger.keyword.to_uppercase()
                        ),
                        trigger.keyword.clone(),
                    ));
                }
                _ => {}
            }
            // The trigger is kept as source text: it is parsed again, in the
            // stage that builds FROM this image.
            let mut expr = strip_onbuild(&node.original).to_string();
            for doc in &node.heredocs {
                expr.push('\n');
                expr.push_str(&doc.content);
                expr.push_str(&doc.name);
            }
            cmd(Command::Onbuild(expr))
        }
        "workdir" => {
            let p = exactly_one(node, "WORKDIR")?;
            flags(node, &[])?;
            cmd(Command::Workdir(p))
        }
        "run" => {
            let f = flags(
                node,
                &[
                    ("mount", FlagKind::Strings),
                    ("network", FlagKind::String),
                    ("security", FlagKind::String),
                ],
            )?;
            let mounts = f
                .strings("mount")
                .into_iter()
                .map(|m| MountSpec::new(&m).map_err(|e| (e, m.clone())))
                .collect::<NodeResult<Vec<_>>>()?;
            let network = f.string("network");
            if let Some(n) = &network
                && !matches!(n.as_str(), "default" | "none" | "host")
            {
                return Err((
                    format!("invalid network mode {}", crate::go_quote(n)),
                    n.clone(),
                ));
            }
            let security = f.string("security");
            if let Some(s) = &security
                && !matches!(s.as_str(), "sandbox" | "insecure")
            {
                return Err((
                    format!("security {} is not valid", crate::go_quote(s)),
                    s.clone(),
                ));
            }
            cmd(Command::Run(Box::new(Run {
                command: command_line(node),
                mounts,
                network,
                security,
            })))
        }
        "cmd" => {
            flags(node, &[])?;
            cmd(Command::Cmd(command_line(node)))
        }
        "entrypoint" => {
            flags(node, &[])?;
            cmd(Command::Entrypoint(command_line(node)))
        }
        "healthcheck" => {
            healthcheck(node).map(|h| Parsed::Command(Command::Healthcheck(Box::new(h))))
        }
        "expose" => {
            at_least_one(node, "EXPOSE")?;
            flags(node, &[])?;
            let mut ports = std::mem::take(&mut node.args);
            ports.sort();
            cmd(Command::Expose(ports))
        }
        "user" => {
            let u = exactly_one(node, "USER")?;
            flags(node, &[])?;
            cmd(Command::User(u))
        }
        "volume" => {
            at_least_one(node, "VOLUME")?;
            flags(node, &[])?;
            let mut volumes = Vec::with_capacity(node.args.len());
            for v in &node.args {
                let v = trim_space(v);
                if v.is_empty() {
                    return Err((
                        "VOLUME specified can not be an empty string".into(),
                        String::new(),
                    ));
                }
                volumes.push(v.to_string());
            }
            cmd(Command::Volume(volumes))
        }
        // BuildKit reads no flags for STOPSIGNAL and ARG; any given are ignored.
        "stopsignal" => cmd(Command::StopSignal(exactly_one(node, "STOPSIGNAL")?)),
        "arg" => {
            at_least_one(node, "ARG")?;
            let mut decls = Vec::with_capacity(node.args.len());
            for a in &node.args {
                let decl = match a.split_once('=') {
                    Some(("", _)) => {
                        return Err(("ARG names can not be blank".into(), a.clone()));
                    }
                    Some((k, v)) => ArgDecl {
                        key: k.to_string(),
                        default: Some(v.to_string()),
                    },
                    None => ArgDecl {
                        key: a.clone(),
                        default: None,
                    },
                };
                decls.push(decl);
            }
            cmd(Command::Arg(decls))
        }
        "shell" => {
            flags(node, &[])?;
            if node.args.is_empty() {
                return Err(("SHELL requires at least one argument".into(), String::new()));
            }
            if !node.json {
                return Err((
                    "SHELL requires the arguments to be in JSON form".into(),
                    String::new(),
                ));
            }
            cmd(Command::Shell(std::mem::take(&mut node.args)))
        }
        _ if node.keyword.is_empty() => Err(("empty instruction".into(), String::new())),
        _ => {
            let hint = crate::suggest(&node.keyword.to_uppercase(), KEYWORDS)
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_default();
            Err((
                format!("unknown instruction: {}{hint}", node.keyword),
                node.keyword.clone(),
            ))
        }
    }
}

fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// Removes a leading `ONBUILD` keyword and the blanks around it.
fn strip_onbuild(original: &str) -> &str {
    let s = original.trim_start();
    match s.get(..7) {
        Some(kw) if kw.eq_ignore_ascii_case("onbuild") => s[7..].trim_start(),
        _ => original,
    }
}

fn key_values(node: &mut Node, name: &str) -> NodeResult<Vec<KeyValue>> {
    at_least_one(node, name)?;
    let mut out = Vec::with_capacity(node.args.len() / 3);
    let mut args = std::mem::take(&mut node.args).into_iter();
    while let Some(key) = args.next() {
        let (Some(value), Some(sep)) = (args.next(), args.next()) else {
            return Err((
                format!("Bad input to {name}, too many arguments"),
                String::new(),
            ));
        };
        if key.is_empty() {
            return Err((format!("{name} names can not be blank"), String::new()));
        }
        out.push(KeyValue {
            key,
            value,
            legacy: sep.is_empty(),
        });
    }
    Ok(out)
}

fn files(node: &mut Node, name: &str) -> NodeResult<Files> {
    if node.args.len() < 2 {
        return Err((
            format!(
                "{name} requires at least two arguments, but only one was provided. Destination could not be determined"
            ),
            String::new(),
        ));
    }
    let heredoc = |s: &str| parse_heredoc(s).ok().flatten();
    let mut sources = std::mem::take(&mut node.args);
    let dest = sources.pop().unwrap_or_default();
    if heredoc(&dest).is_some() {
        return Err((
            format!("{name} cannot accept a heredoc as a destination"),
            dest,
        ));
    }
    let mut files = Files {
        sources: Vec::with_capacity(sources.len()),
        inline: Vec::new(),
        dest,
    };
    for src in sources {
        match heredoc(&src) {
            Some(marker) => {
                let body = node
                    .heredocs
                    .iter()
                    .find(|d| d.name == marker.name)
                    .map(|d| d.body().into_owned())
                    .unwrap_or_default();
                files.inline.push(InlineFile {
                    name: marker.name,
                    data: body,
                    expand: marker.expand,
                });
            }
            None => files.sources.push(src),
        }
    }
    Ok(files)
}

fn command_line(node: &mut Node) -> CommandLine {
    let mut args = std::mem::take(&mut node.args);
    if !node.json && args.len() > 1 {
        args = vec![args.join(" ")];
    }
    CommandLine {
        args,
        shell_form: !node.json,
        heredocs: std::mem::take(&mut node.heredocs),
    }
}

fn healthcheck(node: &mut Node) -> NodeResult<Healthcheck> {
    let Some((kind, rest)) = node.args.split_first() else {
        return Err((
            "HEALTHCHECK requires at least one argument".into(),
            String::new(),
        ));
    };
    let kind_upper = kind.to_uppercase();
    if kind_upper == "NONE" {
        if !rest.is_empty() {
            return Err(("HEALTHCHECK NONE takes no arguments".into(), String::new()));
        }
        return Ok(Healthcheck::None);
    }
    let f = flags(
        node,
        &[
            ("interval", FlagKind::String),
            ("timeout", FlagKind::String),
            ("start-period", FlagKind::String),
            ("start-interval", FlagKind::String),
            ("retries", FlagKind::String),
        ],
    )?;
    if kind_upper != "CMD" {
        return Err((
            format!("Unknown type \"{kind_upper}\" in HEALTHCHECK (try CMD)"),
            kind.clone(),
        ));
    }
    let cmd: Vec<String> = match (node.json, rest.is_empty()) {
        (_, true) => Vec::new(),
        (true, false) => rest.to_vec(),
        (false, false) => vec![rest.join(" ")],
    };
    if cmd.is_empty() {
        return Err((
            "Missing command after HEALTHCHECK CMD".into(),
            String::new(),
        ));
    }
    let mut test = vec![if node.json {
        "CMD".to_string()
    } else {
        "CMD-SHELL".to_string()
    }];
    test.extend(cmd);
    let interval = |name: &str| {
        let v = f.string(name);
        parse_interval(name, v.as_deref()).map_err(|e| (e, v.unwrap_or_default()))
    };
    let retries = match f.string("retries").filter(|r| !r.is_empty()) {
        None => 0,
        Some(r) => match r.parse::<i64>() {
            Ok(n) if n < 0 => return Err((format!("--retries cannot be negative ({n})"), r)),
            Ok(n) if n <= i64::from(i32::MAX) => n as u32,
            _ => {
                return Err((
                    format!(
                        "strconv.ParseInt: parsing {}: invalid syntax",
                        crate::go_quote(&r)
                    ),
                    r,
                ));
            }
        },
    };
    Ok(Healthcheck::Cmd {
        test,
        interval: interval("interval")?,
        timeout: interval("timeout")?,
        start_period: interval("start-period")?,
        start_interval: interval("start-interval")?,
        retries,
    })
}
