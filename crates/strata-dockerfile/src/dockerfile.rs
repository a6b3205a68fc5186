//! The Dockerfile as stages: which instructions belong to which stage, the
//! global `ARG`s, and how stages refer to each other.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, ErrorKind, Position, Result, Span};
use crate::instructions::{ArgDecl, Command, Instruction, Parsed, parse_node};
use crate::limits;
use crate::mount::csv_fields;
use crate::parser::{Ast, Directives, SourceMap, Warning, parse};
use crate::shell::{Env, EnvList, ExpandError, Lexer, NoEnv};

/// The image name that means "start from nothing".
pub const SCRATCH: &str = "scratch";

/// A parsed and checked Dockerfile.
#[derive(Debug, Clone)]
pub struct Dockerfile {
    /// Parser directives.
    pub directives: Directives,
    /// `ARG`s before the first `FROM`: visible to `FROM` lines, and to a
    /// stage that declares the same `ARG` without a default.
    pub global_args: Vec<Instruction>,
    /// The stages in order.
    pub stages: Vec<Stage>,
    /// Non-fatal findings from parsing.
    pub warnings: Vec<Warning>,
    source: SourceMap,
}

/// One `FROM` and the instructions after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Position among the stages, from 0; `COPY --from=0` refers to it.
    pub index: usize,
    /// `AS name`, lowercased: stage names are case-insensitive.
    pub name: Option<String>,
    /// The base as written (`golang:${GO_VERSION}`, `builder`, `scratch`).
    pub base: String,
    /// `--platform`, as written.
    pub platform: Option<String>,
    /// The lines of the `FROM` instruction.
    pub span: Span,
    /// The `FROM` line as written.
    pub original: String,
    /// The instructions of the stage, in order.
    pub instructions: Vec<Instruction>,
}

impl Stage {
    /// `name` if the stage has one, else `stage-N` as BuildKit names it.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", self.index))
    }
}

/// What a stage builds on, after its `FROM` is expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// `FROM scratch`: an empty filesystem.
    Scratch,
    /// An earlier stage of this Dockerfile.
    Stage(usize),
    /// An image reference, to be resolved by the image store or a registry.
    Image(String),
}

/// Where `COPY --from` or `RUN --mount=from=` takes files from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A stage of this Dockerfile.
    Stage(usize),
    /// An image reference.
    Image(String),
}

/// How the stages of one build depend on each other, for given build args.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageGraph {
    /// Each stage's expanded base.
    pub bases: Vec<Base>,
    /// Each stage's expanded `--platform`, if it has one.
    pub platforms: Vec<Option<String>>,
    /// For each stage, the sources of its instructions, keyed by
    /// instruction index (several for a RUN with several `--mount=from`).
    pub sources: Vec<BTreeMap<usize, Vec<Source>>>,
    /// The stage being built.
    pub target: usize,
    /// The stages the target needs, each after everything it needs.
    pub order: Vec<usize>,
}

impl Dockerfile {
    /// Parses and checks a Dockerfile's bytes.
    pub fn parse(input: &[u8]) -> Result<Dockerfile> {
        Dockerfile::from_ast(parse(input)?)
    }

    /// Reads and parses a file; errors name the file.
    pub fn parse_file(path: &Path) -> Result<Dockerfile> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Dockerfile::parse(&bytes).map_err(|e| e.with_file(path))
    }

    /// Groups a parse tree's instructions into stages.
    pub fn from_ast(ast: Ast) -> Result<Dockerfile> {
        let (directives, nodes, warnings, source) = ast.into_parts();
        let last_line = nodes.last().map_or(1, |n| n.span.start);
        let mut global_args = Vec::new();
        let mut stages: Vec<Stage> = Vec::new();
        if nodes.len() > limits::MAX_INSTRUCTIONS {
            let at = source.position(nodes[limits::MAX_INSTRUCTIONS].span, "");
            return Err(Error::new(
                ErrorKind::Limit,
                format!(
                    "the Dockerfile has {} instructions, over the limit of {}",
                    nodes.len(),
                    limits::MAX_INSTRUCTIONS
                ),
            )
            .at(at));
        }
        for mut node in nodes {
            let parsed = parse_node(&source, &mut node)?;
            let instr = match parsed {
                Parsed::From {
                    base,
                    name,
                    platform,
                } => {
                    if let Some(n) = &name
                        && let Some(prev) = stages.iter().find(|s| s.name.as_ref() == Some(n))
                    {
                        let written = node.args.last().map_or(n.as_str(), String::as_str);
                        let at = source.position(node.span, written);
                        return Err(Error::new(
                            ErrorKind::Stage,
                            format!(
                                "duplicate stage name {}: already defined on line {}",
                                crate::go_quote(n),
                                prev.span.start
                            ),
                        )
                        .at(at));
                    }
                    if stages.len() == limits::MAX_STAGES {
                        return Err(Error::new(
                            ErrorKind::Limit,
                            format!("the Dockerfile has more than {} stages", limits::MAX_STAGES),
                        )
                        .at(source.position(node.span, "")));
                    }
                    stages.push(Stage {
                        index: stages.len(),
                        name,
                        base,
                        platform,
                        span: node.span,
                        original: node.original,
                        instructions: Vec::new(),
                    });
                    continue;
                }
                Parsed::Command(command) => Instruction {
                    span: node.span,
                    original: node.original,
                    command,
                },
            };
            match stages.last_mut() {
                Some(stage) => stage.instructions.push(instr),
                None if matches!(instr.command, Command::Arg(_)) => global_args.push(instr),
                None => {
                    return Err(
                        Error::new(ErrorKind::Stage, "no build stage in current context")
                            .at(source.position(instr.span, "")),
                    );
                }
            }
        }
        if stages.is_empty() {
            let at = Position {
                line: last_line,
                column: 1,
            };
            return Err(
                Error::new(ErrorKind::Stage, "dockerfile contains no stages to build").at(at),
            );
        }
        let df = Dockerfile {
            directives,
            global_args,
            stages,
            warnings,
            source,
        };
        df.check_copy_from()?;
        Ok(df)
    }

    /// The source text and its line index, for messages that quote it.
    pub fn source(&self) -> &SourceMap {
        &self.source
    }

    /// The position of `needle` in the lines of `span`; see [`SourceMap::position`].
    pub fn position(&self, span: Span, needle: &str) -> Position {
        self.source.position(span, needle)
    }

    /// An error of `kind` pointing at `needle` within `span`.
    pub fn error_at(
        &self,
        kind: ErrorKind,
        span: Span,
        needle: &str,
        msg: impl Into<String>,
    ) -> Error {
        Error::new(kind, msg).at(self.position(span, needle))
    }

    /// An expansion error pointing at `needle` within `span`.
    pub(crate) fn expand_error(&self, span: Span, needle: &str, e: ExpandError) -> Error {
        let kind = if e.is_required_variable() {
            ErrorKind::RequiredVariable
        } else if e.is_limit() {
            ErrorKind::Limit
        } else {
            ErrorKind::Expansion
        };
        self.error_at(kind, span, needle, e.message())
    }

    /// The lexer for this file's escape token.
    pub fn lexer(&self) -> Lexer {
        Lexer::new(self.directives.escape)
    }

    /// The stage named `name` (case-insensitive).
    pub fn stage_by_name(&self, name: &str) -> Option<&Stage> {
        let name = name.to_lowercase();
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name.as_str()))
    }

    /// `COPY --from` takes no variables: BuildKit resolves it before any
    /// are known.
    fn check_copy_from(&self) -> Result<()> {
        for instr in self.stages.iter().flat_map(|s| &s.instructions) {
            if let Command::Copy(c) = &instr.command
                && let Some(from) = &c.from
                && self.lexer().process_word(from, &NoEnv).ok().as_deref() != Some(from.as_str())
            {
                return Err(self.error_at(
                    ErrorKind::Stage,
                    instr.span,
                    from,
                    "variable expansion is not supported for --from, define a new stage with FROM using ARG from global scope as a workaround",
                ));
            }
        }
        Ok(())
    }

    /// The global arguments for a build: `predefined` (the platform
    /// arguments), then each global `ARG` in order, its value from
    /// `build_args` or else its default expanded with those before it.
    /// Every `ARG` name the Dockerfile declares, globally or in a stage:
    /// a `--build-arg` of any other is not consumed (BuildKit warns).
    pub fn declared_args(&self) -> std::collections::BTreeSet<String> {
        self.global_args
            .iter()
            .chain(self.stages.iter().flat_map(|s| &s.instructions))
            .filter_map(|i| match &i.command {
                Command::Arg(decls) => Some(decls.iter().map(|d| d.key.clone())),
                _ => None,
            })
            .flatten()
            .collect()
    }

    pub fn global_scope(
        &self,
        build_args: &BTreeMap<String, String>,
        predefined: &EnvList,
    ) -> Result<EnvList> {
        let mut scope = predefined.clone();
        for instr in &self.global_args {
            let Command::Arg(decls) = &instr.command else {
                continue;
            };
            for ArgDecl { key, default } in decls {
                let value = match (build_args.get(key), default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(d)) => Some(
                        self.lexer()
                            .process_word(d, &scope)
                            .map_err(|e| self.expand_error(instr.span, d, e))?,
                    ),
                    (None, None) => None,
                };
                if let Some(v) = value {
                    scope.set(key, &v);
                }
            }
            crate::scope::check_scope(self, instr, &scope)?;
        }
        Ok(scope)
    }

    /// Resolves bases, `--from` sources and the target for one build.
    /// `scope` is the result of [`Dockerfile::global_scope`].
    pub fn graph(&self, scope: &dyn Env, target: Option<&str>) -> Result<StageGraph> {
        let mut bases = Vec::with_capacity(self.stages.len());
        let mut platforms = Vec::with_capacity(self.stages.len());
        for (i, stage) in self.stages.iter().enumerate() {
            let lexer = self.lexer();
            let base = lexer
                .process_word(&stage.base, scope)
                .map_err(|e| self.expand_error(stage.span, &stage.base, e))?;
            if base.is_empty() {
                return Err(self.error_at(
                    ErrorKind::Stage,
                    stage.span,
                    &stage.base,
                    format!("base name ({}) should not be blank", stage.base),
                ));
            }
            let lower = base.to_lowercase();
            let earlier = self.stages[..i]
                .iter()
                .position(|s| s.name.as_deref() == Some(&lower));
            bases.push(match earlier {
                Some(j) => Base::Stage(j),
                None if base == SCRATCH => Base::Scratch,
                None => Base::Image(base),
            });
            let platform = match &stage.platform {
                None => None,
                Some(p) => {
                    let v = lexer
                        .process_word(p, scope)
                        .map_err(|e| self.expand_error(stage.span, p, e))?;
                    if v.is_empty() {
                        return Err(self.error_at(
                            ErrorKind::Stage,
                            stage.span,
                            p,
                            format!("empty platform value from expression {p}"),
                        ));
                    }
                    Some(v)
                }
            };
            platforms.push(platform);
        }

        let mut sources = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let mut by_instr = BTreeMap::new();
            for (j, instr) in stage.instructions.iter().enumerate() {
                let found = self.instruction_sources(instr)?;
                if !found.is_empty() {
                    by_instr.insert(j, found);
                }
            }
            sources.push(by_instr);
        }

        let target = match target {
            None => self.stages.len() - 1,
            Some(t) => match self.stage_by_name(t) {
                Some(s) => s.index,
                None => {
                    let names: Vec<&str> = self
                        .stages
                        .iter()
                        .filter_map(|s| s.name.as_deref())
                        .collect();
                    let hint = crate::suggest(&t.to_lowercase(), &names)
                        .map(|s| format!(" (did you mean {s}?)"))
                        .unwrap_or_default();
                    return Err(Error::new(
                        ErrorKind::Stage,
                        format!(
                            "target stage {} could not be found{hint}",
                            crate::go_quote(t)
                        ),
                    ));
                }
            },
        };
        let mut graph = StageGraph {
            bases,
            platforms,
            sources,
            target,
            order: Vec::new(),
        };
        graph.order = self.dependency_order(&graph)?;
        Ok(graph)
    }

    fn instruction_sources(&self, instr: &Instruction) -> Result<Vec<Source>> {
        let mut out = Vec::new();
        match &instr.command {
            Command::Copy(c) => {
                if let Some(from) = &c.from {
                    out.push(
                        self.copy_source(from)
                            .map_err(|m| self.error_at(ErrorKind::Stage, instr.span, from, m))?,
                    );
                }
            }
            Command::Run(r) => {
                for m in &r.mounts {
                    let from = csv_fields(m.as_str())
                        .unwrap_or_default()
                        .into_iter()
                        .find_map(|f| {
                            let (k, v) = f.split_once('=')?;
                            k.eq_ignore_ascii_case("from").then(|| v.to_string())
                        });
                    if let Some(from) = from {
                        out.push(match self.stage_by_name(&from) {
                            Some(s) => Source::Stage(s.index),
                            None => Source::Image(from),
                        });
                    }
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// `COPY --from`: a stage index, a stage name, or an image.
    pub fn copy_source(&self, from: &str) -> std::result::Result<Source, String> {
        if let Some(index) = parse_go_int(from) {
            return match usize::try_from(index) {
                Ok(i) if i < self.stages.len() => Ok(Source::Stage(i)),
                _ => Err(format!("invalid stage index {index}")),
            };
        }
        Ok(match self.stage_by_name(from) {
            Some(s) => Source::Stage(s.index),
            None => Source::Image(from.to_string()),
        })
    }

    /// Depth-first from the target; a stage reached again while still on
    /// the path is a cycle.
    fn dependency_order(&self, graph: &StageGraph) -> Result<Vec<usize>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let mut marks = vec![Mark::New; self.stages.len()];
        let mut order = Vec::new();
        // Explicit stack: (stage, next dependency to visit).
        let deps = |s: usize| -> Vec<(usize, Option<usize>)> {
            let mut d: Vec<(usize, Option<usize>)> = Vec::new();
            if let Base::Stage(b) = graph.bases[s] {
                d.push((b, None));
            }
            for (&instr, sources) in &graph.sources[s] {
                for src in sources {
                    if let Source::Stage(t) = src {
                        d.push((*t, Some(instr)));
                    }
                }
            }
            d
        };
        let mut stack = vec![(graph.target, deps(graph.target), 0usize)];
        marks[graph.target] = Mark::OnPath;
        while let Some(top) = stack.last_mut() {
            let stage = top.0;
            let item = top.1.get(top.2).copied();
            top.2 += 1;
            let Some((dep, instr)) = item else {
                marks[stage] = Mark::Done;
                order.push(stage);
                stack.pop();
                continue;
            };
            match marks[dep] {
                Mark::Done => {}
                Mark::OnPath => {
                    let (span, needle) = match instr {
                        Some(i) => (self.stages[stage].instructions[i].span, "--"),
                        None => (self.stages[stage].span, ""),
                    };
                    return Err(self.error_at(
                        ErrorKind::Stage,
                        span,
                        needle,
                        format!(
                            "circular dependency detected on stage: {}",
                            self.stages[dep].display_name()
                        ),
                    ));
                }
                Mark::New => {
                    marks[dep] = Mark::OnPath;
                    stack.push((dep, deps(dep), 0));
                }
            }
        }
        Ok(order)
    }
}

/// Go's `strconv.Atoi`: an optional sign and ASCII digits.
fn parse_go_int(s: &str) -> Option<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Out of range still reads as an index (an invalid one), as in Go.
    Some(s.parse::<i64>().unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;

/// Parses a snippet of instructions that belongs to no stage, such as the
/// `ONBUILD` triggers a base image carries. `FROM` is refused; every
/// instruction gets `span`, the place the snippet is attributed to.
pub fn parse_instructions(text: &str, span: Span) -> Result<Vec<Instruction>> {
    let (_, nodes, _, source) = parse(text.as_bytes())?.into_parts();
    let mut out = Vec::with_capacity(nodes.len());
    for mut node in nodes {
        match parse_node(&source, &mut node)? {
            Parsed::Command(command) => out.push(Instruction {
                span,
                original: node.original,
                command,
            }),
            Parsed::From { .. } => {
                return Err(Error::new(
                    ErrorKind::Instruction,
                    "FROM isn't allowed as an ONBUILD trigger",
                )
                .at(Position {
                    line: span.start,
                    column: 1,
                }));
            }
        }
    }
    Ok(out)
}
