//! Lowering typed instructions into steps and image configs.

use std::collections::BTreeMap;

use strata_cas::Sha256;
use strata_dockerfile::{
    Base as DfBase, Command, CommandLine, Dockerfile, EnvList, Error as DfError, ErrorKind,
    Healthcheck, Instruction, Lexer, MountType, Platform, Scope, Source as DfSource, Span,
    parse_instructions, predefined_args,
};
use strata_oci::{
    DEFAULT_PATH, Empty, HealthConfig, History, ImageConfig, LayerRef, rfc3339, unix_from_rfc3339,
};

use crate::ops::{
    CopyOp, ExecOp, ImageSource, InlineFile, MkdirOp, Op, RemoteFile, RunMount, RunMountKind,
    Source,
};

/// What the planner needs to know about the build.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--build-arg`s.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// The platform being built for.
    pub platform: Platform,
    /// The platform building.
    pub build_platform: Platform,
    /// `--label`s: set on the image the target stage makes, over the
    /// Dockerfile's own.
    pub labels: BTreeMap<String, String>,
    /// What every `RUN` gets from the build's flags.
    pub run: crate::RunSettings,
}

/// A base image as the resolver found it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedImage {
    /// The normalized reference.
    pub reference: String,
    /// Its manifest's sha256.
    pub manifest: Sha256,
    /// Its config.
    pub config: ImageConfig,
    /// Its layers, bottom first.
    pub layers: Vec<LayerRef>,
}

/// Why a resolver found no image: its own error, kept whole, so a plan
/// that fails on it shows every cause.
pub type ResolveError = Box<dyn std::error::Error + Send + Sync>;

/// Finds base images (`FROM`, `COPY --from=image`).
pub trait ImageResolver {
    /// Resolves `reference` for `platform`; the error says why not.
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, ResolveError>;
}

/// Why a `FROM` or `COPY --from` image cannot be built on.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// The resolver found none.
    #[error(transparent)]
    Unresolved(ResolveError),
    /// The image is for another platform than the stage's: built on as
    /// if it were the stage's, its programs would not run.
    #[error(
        "it is for {found}, not {wanted}: pull the {wanted} image (--pull) or import it \
         (`strata image import --platform {wanted} {reference} FILE`)"
    )]
    OtherPlatform {
        /// The image, as the Dockerfile names it.
        reference: String,
        /// Its platform.
        found: Platform,
        /// The stage's.
        wanted: Platform,
    },
}

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The Dockerfile is wrong; the error says where.
    #[error(transparent)]
    Dockerfile(#[from] DfError),
    /// A base image could not be resolved.
    #[error(
        "{file}:{line}: cannot use image {reference}{}",
        if *no_stage { format!(" (and no stage is named {reference})") } else { String::new() }
    )]
    Base {
        /// The Dockerfile's name.
        file: String,
        /// The `FROM` or `COPY --from` line.
        line: usize,
        /// The image, as the line names it.
        reference: String,
        /// A `COPY --from` whose name could be a misspelt stage as well.
        no_stage: bool,
        /// Why.
        source: Box<BaseError>,
    },
}

/// A build: the stages the target needs, in an order where every stage
/// comes after those it uses.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The stages.
    pub stages: Vec<StagePlan>,
    /// The stage whose result is the image.
    pub target: usize,
    /// Build checks only planning can make (BuildKit's UndefinedVar,
    /// which needs the base images' environments), in line order.
    pub lint: Vec<strata_dockerfile::lint::Finding>,
}

impl Plan {
    /// How many of stage `i`'s layers, the bottom ones, come from a base
    /// image (through the stages it is built on) rather than from steps.
    pub fn image_layers(&self, i: usize) -> usize {
        let mut at = i;
        // A stage's base is an earlier stage: at most one hop per stage.
        for _ in 0..self.stages.len() {
            match self.stages.get(at).map(|s| &s.base) {
                Some(Base::Image(img)) => return img.layers.len(),
                Some(Base::Stage(p)) => at = *p,
                Some(Base::Scratch) | None => return 0,
            }
        }
        0
    }
}

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum Base {
    /// Nothing.
    Scratch,
    /// An image.
    Image(ImageSource),
    /// Another stage's result, by plan index.
    Stage(usize),
}

/// One stage of the plan.
#[derive(Debug, Clone)]
pub struct StagePlan {
    /// `builder`, or `stage-N` for an unnamed stage.
    pub name: String,
    /// Its index among the Dockerfile's stages.
    pub dockerfile_index: usize,
    /// What it starts from.
    pub base: Base,
    /// The `FROM` line, for progress.
    pub from_label: String,
    /// The filesystem steps, in order.
    pub steps: Vec<Step>,
    /// The config the stage ends with. `rootfs` and `history` are filled
    /// in when the layers are known.
    pub config: ImageConfig,
    /// History entries of this stage's instructions, after the base's.
    pub history: Vec<HistoryEntry>,
    /// The history an image base brought (a stage base's comes from its
    /// result).
    pub base_history: Vec<History>,
    /// The platform string the stage is for (`linux/amd64`).
    pub platform: String,
}

impl StagePlan {
    /// Progress numbering: the base counts as one step when it is an image.
    pub fn total(&self) -> usize {
        self.steps.len() + usize::from(matches!(self.base, Base::Image(_)))
    }
}

/// One filesystem step.
#[derive(Debug, Clone)]
pub struct Step {
    /// What it does.
    pub op: Op,
    /// The instruction as shown in progress (`RUN go build -o app .`).
    pub label: String,
    /// Its first line in the Dockerfile.
    pub line: usize,
    /// Its number within the stage, counting from 1 (after the base).
    pub number: usize,
}

/// One history entry of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The instruction as recorded (`RUN /bin/sh -c make # buildkit`).
    pub created_by: String,
    /// The step whose layer it describes; `None` for config-only entries.
    pub step: Option<usize>,
}

const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];
const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";

/// Plans a build of `df` (read from `file`, for messages).
pub fn plan(
    df: &Dockerfile,
    file: &str,
    opts: &Options,
    images: &dyn ImageResolver,
) -> Result<Plan, PlanError> {
    let with_file = |e: DfError| PlanError::Dockerfile(e.with_file(file));
    let target_name = opts
        .target
        .as_deref()
        .or_else(|| df.stages.last().and_then(|s| s.name.as_deref()));
    let predefined = predefined_args(&opts.build_platform, &opts.platform, target_name);
    let global = df
        .global_scope(&opts.build_args, &predefined)
        .map_err(with_file)?;
    let graph = df
        .graph(&global, opts.target.as_deref())
        .map_err(with_file)?;

    let mut planner = Planner {
        df,
        file,
        opts,
        images,
        global,
        plan_index: BTreeMap::new(),
        stages: Vec::new(),
        scopes: Vec::new(),
        onbuild: Vec::new(),
        lint: Vec::new(),
    };
    for &i in &graph.order {
        planner
            .stage(i, &graph.bases[i], graph.platforms[i].as_deref())
            .map_err(|e| match e {
                PlanError::Dockerfile(d) => with_file(d),
                other => other,
            })?;
    }
    let target = planner.plan_index[&graph.target];
    let mut lint = planner.lint;
    lint.sort_by_key(|f| f.line);
    lint.dedup();
    let mut stages = planner.stages;
    if let Some(t) = stages.get_mut(target) {
        t.config
            .config
            .labels
            .extend(opts.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    Ok(Plan {
        stages,
        target,
        lint,
    })
}

struct Planner<'a> {
    df: &'a Dockerfile,
    file: &'a str,
    opts: &'a Options,
    images: &'a dyn ImageResolver,
    global: EnvList,
    /// Dockerfile stage index → plan index.
    plan_index: BTreeMap<usize, usize>,
    stages: Vec<StagePlan>,
    /// The variable scope each planned stage ended with.
    scopes: Vec<Scope>,
    /// The ONBUILD instructions each planned stage declared.
    onbuild: Vec<Vec<String>>,
    /// Build checks found while planning.
    lint: Vec<strata_dockerfile::lint::Finding>,
}

/// What a stage keeps track of while its instructions are lowered.
struct StageState {
    config: ImageConfig,
    scope: Scope,
    steps: Vec<Step>,
    history: Vec<HistoryEntry>,
    onbuild: Vec<String>,
    cmd_set: bool,
    number_offset: usize,
}

impl Planner<'_> {
    fn base_error(
        &self,
        span: Span,
        reference: &str,
        no_stage: bool,
        source: Box<BaseError>,
    ) -> PlanError {
        PlanError::Base {
            file: self.file.to_string(),
            line: span.start,
            reference: reference.to_string(),
            no_stage,
            source,
        }
    }

    fn resolve_image(
        &self,
        reference: &str,
        platform: &Platform,
        span: Span,
    ) -> Result<ResolvedImage, PlanError> {
        self.image_for(reference, platform)
            .map_err(|e| self.base_error(span, reference, false, e))
    }

    /// The image `reference` names for `platform`; one for another
    /// platform is refused rather than built on as if it were this one.
    fn image_for(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<ResolvedImage, Box<BaseError>> {
        let img = self
            .images
            .resolve(reference, platform)
            .map_err(|e| Box::new(BaseError::Unresolved(e)))?;
        let c = &img.config;
        if !c.architecture.is_empty()
            && !platform.matches(&c.os, &c.architecture, c.variant.as_deref())
        {
            let found = Platform {
                os: c.os.clone(),
                architecture: c.architecture.clone(),
                variant: c.variant.clone(),
            };
            return Err(Box::new(BaseError::OtherPlatform {
                reference: reference.to_string(),
                found,
                wanted: platform.clone(),
            }));
        }
        Ok(img)
    }

    fn stage(
        &mut self,
        index: usize,
        base: &DfBase,
        platform: Option<&str>,
    ) -> Result<(), PlanError> {
        let df = self.df;
        let st = &df.stages[index];
        let platform = match platform {
            Some(p) => {
                Platform::parse(p).map_err(|m| df.error_at(ErrorKind::Stage, st.span, p, m))?
            }
            None => self.opts.platform.clone(),
        };
        let platform_str = platform.to_string();
        let (plan_base, mut config, scope, triggers, base_history) = match base {
            DfBase::Scratch => {
                let c = ImageConfig::scratch(
                    &platform.os,
                    &platform.architecture,
                    platform.variant.as_deref(),
                );
                (Base::Scratch, c, None, Vec::new(), Vec::new())
            }
            DfBase::Image(reference) => {
                let img = self.resolve_image(reference, &platform, st.span)?;
                let mut c = img.config.clone();
                let triggers = std::mem::take(&mut c.config.on_build);
                let history = std::mem::take(&mut c.history);
                let src = ImageSource {
                    reference: img.reference,
                    manifest: img.manifest.hex(),
                    layers: img.layers,
                };
                (Base::Image(src), c, None, triggers, history)
            }
            DfBase::Stage(j) => {
                let p = self.plan_index[j];
                let mut c = self.stages[p].config.clone();
                c.config.on_build.clear();
                // The base stage's history is only known once it has run.
                (
                    Base::Stage(p),
                    c,
                    Some(self.scopes[p].clone()),
                    self.onbuild[p].clone(),
                    Vec::new(),
                )
            }
        };
        // Every stage's environment has a PATH, as BuildKit ensures.
        if !config.config.env.iter().any(|e| e.starts_with("PATH=")) && platform.os != "windows" {
            config.config.env.push(DEFAULT_PATH.to_string());
        }
        let scope = scope.unwrap_or_else(|| Scope::from_image_env(&config.config.env));
        // Dated once the stage's steps are done (`image_created`).
        config.created = None;

        let mut instructions = Vec::new();
        for t in &triggers {
            let parsed = parse_instructions(t, st.span).map_err(|e| {
                df.error_at(
                    ErrorKind::Instruction,
                    st.span,
                    "",
                    format!("ONBUILD trigger {t:?} of the base: {}", e.message()),
                )
            })?;
            instructions.extend(parsed);
        }
        let from_base = instructions.len();
        instructions.extend(st.instructions.iter().cloned());

        let mut state = StageState {
            config,
            scope,
            steps: Vec::new(),
            history: Vec::new(),
            onbuild: Vec::new(),
            cmd_set: false,
            number_offset: usize::from(matches!(plan_base, Base::Image(_))),
        };
        for (n, instr) in instructions.iter().enumerate() {
            // Triggers came from the base image, not from this Dockerfile.
            if n >= from_base {
                for name in df.undefined_vars(instr, &state.scope) {
                    let known: Vec<&str> = state
                        .scope
                        .run_env
                        .iter()
                        .map(|(k, _)| k)
                        .chain(state.scope.args.iter().map(|(k, _)| k.as_str()))
                        .collect();
                    self.lint.push(strata_dockerfile::lint::undefined_var(
                        &name,
                        instr.span.start,
                        &known,
                    ));
                }
            }
            self.instruction(instr, &mut state, &platform)?;
        }
        let from_label = st.original.trim().to_string();
        self.plan_index.insert(index, self.stages.len());
        self.scopes.push(state.scope);
        self.onbuild.push(state.onbuild);
        self.stages.push(StagePlan {
            name: st.display_name(),
            dockerfile_index: index,
            base: plan_base,
            from_label,
            steps: state.steps,
            config: state.config,
            history: state.history,
            base_history,
            platform: platform_str,
        });
        Ok(())
    }

    fn history(&self, state: &mut StageState, created_by: String, step: Option<usize>) {
        state.history.push(HistoryEntry { created_by, step });
    }

    fn step(&self, state: &mut StageState, op: Op, instr: &Instruction, label: String) -> usize {
        let n = state.steps.len();
        state.steps.push(Step {
            op,
            label,
            line: instr.span.start,
            number: state.number_offset + n + 1,
        });
        n
    }

    fn instruction(
        &mut self,
        raw: &Instruction,
        state: &mut StageState,
        platform: &Platform,
    ) -> Result<(), PlanError> {
        let df = self.df;
        let instr =
            df.apply_in_scope(raw, &mut state.scope, &self.opts.build_args, &self.global)?;
        let c = &mut state.config.config;
        let label = instruction_label(&raw.original);
        match &instr.command {
            Command::Env(kvs) => {
                c.env = state.scope.config_env.to_entries();
                let desc: Vec<String> = kvs
                    .iter()
                    .map(|kv| format!("{}={}", kv.key, kv.value))
                    .collect();
                self.history(state, format!("ENV {}", desc.join(" ")), None);
            }
            Command::Arg(decls) => {
                let desc: Vec<String> = decls
                    .iter()
                    .map(
                        |d| match state.scope.args.iter().find(|(k, _)| *k == d.key) {
                            Some((k, Some(v))) => format!("{k}={v}"),
                            _ => d.key.clone(),
                        },
                    )
                    .collect();
                self.history(state, format!("ARG {}", desc.join(" ")), None);
            }
            Command::Label(kvs) => {
                let mut desc = Vec::new();
                for kv in kvs {
                    c.labels.insert(kv.key.clone(), kv.value.clone());
                    desc.push(format!("{}={}", kv.key, kv.value));
                }
                self.history(state, format!("LABEL {}", desc.join(" ")), None);
            }
            Command::Maintainer(m) => {
                state.config.author = Some(m.clone());
                self.history(state, format!("MAINTAINER {m}"), None);
            }
            Command::Workdir(p) => {
                let wd = normalize_workdir(&c.working_dir, p);
                c.working_dir = wd.clone();
                if wd == "/" {
                    self.history(state, format!("WORKDIR {wd}"), None);
                } else {
                    let op = Op::Mkdir(MkdirOp {
                        path: wd.clone(),
                        user: c.user.clone(),
                    });
                    let n = self.step(state, op, &instr, label);
                    self.history(state, format!("WORKDIR {wd}"), Some(n));
                }
            }
            Command::User(u) => {
                c.user = u.clone();
                self.history(state, format!("USER {u}"), None);
            }
            Command::Shell(sh) => {
                c.shell = sh.clone();
                self.history(state, format!("SHELL [{}]", sh.join(" ")), None);
            }
            Command::Cmd(cl) => {
                let args = self.with_shell(&state.config, cl);
                let c = &mut state.config.config;
                c.cmd = Some(args.clone());
                c.args_escaped = true;
                state.cmd_set = true;
                self.history(state, format!("CMD {}", go_quote_list(&args)), None);
            }
            Command::Entrypoint(cl) => {
                let args = self.with_shell(&state.config, cl);
                let c = &mut state.config.config;
                c.entrypoint = Some(args.clone());
                if !state.cmd_set {
                    c.cmd = None;
                }
                self.history(state, format!("ENTRYPOINT {}", go_quote_list(&args)), None);
            }
            Command::Healthcheck(h) => {
                let cfg = match h.as_ref() {
                    Healthcheck::None => HealthConfig {
                        test: vec!["NONE".into()],
                        ..Default::default()
                    },
                    Healthcheck::Cmd {
                        test,
                        interval,
                        timeout,
                        start_period,
                        start_interval,
                        retries,
                    } => {
                        let ns =
                            |d: &Option<std::time::Duration>| d.map_or(0, |d| d.as_nanos() as i64);
                        HealthConfig {
                            test: test.clone(),
                            interval: ns(interval),
                            timeout: ns(timeout),
                            start_period: ns(start_period),
                            start_interval: ns(start_interval),
                            retries: i64::from(*retries),
                        }
                    }
                };
                c.healthcheck = Some(cfg);
                self.history(state, format!("HEALTHCHECK {label}"), None);
            }
            Command::Expose(ports) => {
                let mut desc = Vec::new();
                for p in ports {
                    for port in expand_port(p)
                        .map_err(|m| df.error_at(ErrorKind::Instruction, instr.span, p, m))?
                    {
                        desc.push(port.clone());
                        c.exposed_ports.insert(port, Empty {});
                    }
                }
                self.history(state, format!("EXPOSE map[{}]", desc.join(" ")), None);
            }
            Command::Volume(vols) => {
                for v in vols {
                    c.volumes.insert(v.clone(), Empty {});
                }
                self.history(state, format!("VOLUME [{}]", vols.join(" ")), None);
            }
            Command::StopSignal(s) => {
                if !valid_signal(s) {
                    return Err(df
                        .error_at(
                            ErrorKind::Instruction,
                            instr.span,
                            s,
                            format!("invalid signal: {s}"),
                        )
                        .into());
                }
                c.stop_signal = Some(s.clone());
                self.history(state, format!("STOPSIGNAL {s}"), None);
            }
            Command::Onbuild(expr) => {
                c.on_build.push(expr.clone());
                state.onbuild.push(expr.clone());
            }
            Command::Run(run) => {
                let op = self.exec_op(&instr, run, state, platform)?;
                let created_by = match &op {
                    Op::Exec(e) => format!(
                        "RUN {} # buildkit",
                        run_command_string(&e.args, &state.scope)
                    ),
                    _ => String::new(),
                };
                let n = self.step(state, op, &instr, label);
                self.history(state, created_by, Some(n));
            }
            Command::Copy(cp) => {
                let from = match &cp.from {
                    None => Source::Context,
                    Some(f) => self.source(f, instr.span, platform)?,
                };
                let op = self.copy_op(
                    &instr,
                    state,
                    from,
                    &cp.files,
                    cp.chown.clone(),
                    cp.chmod.as_deref(),
                    cp.parents,
                    &cp.excludes,
                    false,
                )?;
                let n = self.step(state, op, &instr, label.clone());
                self.history(state, format!("{label} # buildkit"), Some(n));
            }
            Command::Add(add) => {
                if let Some(git) = add.files.sources.iter().find(|s| is_git_source(s)) {
                    return Err(df
                        .error_at(
                            ErrorKind::Instruction,
                            instr.span,
                            git,
                            format!("ADD from a Git repository ({git}) is not supported; clone it in a RUN step"),
                        )
                        .into());
                }
                let (remote, local): (Vec<&String>, Vec<&String>) =
                    add.files.sources.iter().partition(|s| is_http_source(s));
                let sha256 =
                    match &add.checksum {
                        None => None,
                        Some(c) => {
                            if local.len() + remote.len() != 1 || remote.is_empty() {
                                return Err(df
                                    .error_at(
                                        ErrorKind::Instruction,
                                        instr.span,
                                        "--checksum",
                                        "checksum requires a single HTTP(S) source",
                                    )
                                    .into());
                            }
                            Some(parse_sha256(c).map_err(|m| {
                                df.error_at(ErrorKind::Instruction, instr.span, c, m)
                            })?)
                        }
                    };
                let urls = remote
                    .iter()
                    .map(|u| RemoteFile {
                        url: u.to_string(),
                        name: url_file_name(u),
                        sha256: sha256.clone(),
                    })
                    .collect::<Vec<_>>();
                let files = strata_dockerfile::Files {
                    sources: local.into_iter().cloned().collect(),
                    inline: add.files.inline.clone(),
                    dest: add.files.dest.clone(),
                };
                let unpack = add.unpack.unwrap_or(true);
                let mut op = self.copy_op(
                    &instr,
                    state,
                    Source::Context,
                    &files,
                    add.chown.clone(),
                    add.chmod.as_deref(),
                    false,
                    &add.excludes,
                    unpack,
                )?;
                if let Op::Copy(c) = &mut op {
                    c.urls = urls;
                }
                let n = self.step(state, op, &instr, label.clone());
                self.history(state, format!("{label} # buildkit"), Some(n));
            }
        }
        Ok(())
    }

    /// The stage's shell in front of a shell-form command line.
    fn with_shell(&self, config: &ImageConfig, cl: &CommandLine) -> Vec<String> {
        if !cl.shell_form {
            return cl.args.clone();
        }
        let mut shell = if config.config.shell.is_empty() {
            DEFAULT_SHELL.iter().map(|s| s.to_string()).collect()
        } else {
            config.config.shell.clone()
        };
        shell.push(cl.args.join(" "));
        shell
    }

    /// `--from` of COPY or of a RUN mount: a stage of the plan, or an image.
    fn source(&self, from: &str, span: Span, platform: &Platform) -> Result<Source, PlanError> {
        match self.df.copy_source(from) {
            Ok(DfSource::Stage(i)) => Ok(Source::Stage(self.plan_index[&i])),
            Ok(DfSource::Image(r)) => {
                let img = self.image_for(&r, platform).map_err(|e| {
                    // `--from=buidler` is more often a misspelt stage
                    // than an image; say both were looked for.
                    let plain = !r.contains(['/', ':', '@', '.']);
                    self.base_error(span, &r, plain, e)
                })?;
                Ok(Source::Image(ImageSource {
                    reference: img.reference,
                    manifest: img.manifest.hex(),
                    layers: img.layers,
                }))
            }
            Err(m) => Err(self.df.error_at(ErrorKind::Stage, span, from, m).into()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_op(
        &self,
        instr: &Instruction,
        state: &StageState,
        from: Source,
        files: &strata_dockerfile::Files,
        chown: Option<String>,
        chmod: Option<&str>,
        parents: bool,
        excludes: &[String],
        unpack: bool,
    ) -> Result<Op, PlanError> {
        let chmod = match chmod {
            None => None,
            Some(m) => match u32::from_str_radix(m, 8) {
                Ok(v) if v <= 0o7777 => Some(v),
                _ => {
                    return Err(self
                        .df
                        .error_at(
                            ErrorKind::Instruction,
                            instr.span,
                            m,
                            format!("invalid chmod parameter: '{m}'. it should be octal string and between 0 and 07777"),
                        )
                        .into());
                }
            },
        };
        let dest = relative_to_workdir(&state.config.config.working_dir, &files.dest);
        let inline = files
            .inline
            .iter()
            .map(|f| InlineFile {
                name: f.name.clone(),
                data: f.data.clone(),
                mode: 0o644,
            })
            .collect();
        Ok(Op::Copy(CopyOp {
            from,
            sources: files.sources.clone(),
            inline,
            dest,
            chown: chown.filter(|c| !c.is_empty()),
            chmod,
            parents,
            excludes: excludes.to_vec(),
            unpack,
            urls: Vec::new(),
        }))
    }

    fn exec_op(
        &self,
        instr: &Instruction,
        run: &strata_dockerfile::Run,
        state: &StageState,
        platform: &Platform,
    ) -> Result<Op, PlanError> {
        let df = self.df;
        let opts = self.opts;
        // The RUN's own `--network` (validated by the parser), else the
        // build's.
        let network = match run.network.as_deref() {
            Some(n) => n.parse().unwrap_or_default(),
            None => opts.run.network,
        };
        let mut files = Vec::new();
        let cl = &run.command;
        let mut args = cl.args.clone();
        if !cl.heredocs.is_empty() {
            if args.len() != 1 || !cl.shell_form {
                return Err(df
                    .error_at(
                        ErrorKind::Instruction,
                        instr.span,
                        "<<",
                        "a RUN heredoc needs the shell form",
                    )
                    .into());
            }
            let whole_is_heredoc = strata_dockerfile::is_heredoc_marker(&args[0]);
            if whole_is_heredoc {
                let doc = &cl.heredocs[0];
                let data = doc.body().into_owned();
                if data.starts_with("#!") {
                    files.push(InlineFile {
                        name: doc.name.clone(),
                        data,
                        mode: 0o755,
                    });
                    args = vec![format!("/dev/pipes/{}", doc.name)];
                } else {
                    args = vec![data];
                }
            } else {
                let mut b = args[0].clone();
                for doc in &cl.heredocs {
                    b.push('\n');
                    b.push_str(&doc.content);
                    b.push_str(&doc.name);
                }
                args = vec![b];
            }
        }
        let args = self.with_shell(
            &state.config,
            &CommandLine {
                args,
                shell_form: cl.shell_form,
                heredocs: vec![],
            },
        );
        let lexer = Lexer::new(df.directives.escape);
        let env = &state.scope.run_env;
        let mut mounts = Vec::new();
        for spec in &run.mounts {
            let m = spec
                .resolve(&mut |v| {
                    lexer
                        .process_word(v, env)
                        .map_err(|e| e.message().to_string())
                })
                .map_err(|m| df.error_at(ErrorKind::Instruction, instr.span, "--mount", m))?;
            let target = |m: &strata_dockerfile::Mount| -> Result<String, PlanError> {
                let t = m.target.clone().ok_or_else(|| {
                    df.error_at(
                        ErrorKind::Instruction,
                        instr.span,
                        "--mount",
                        format!("{} mount target is required", m.kind.as_str()),
                    )
                })?;
                Ok(relative_to_workdir(&state.config.config.working_dir, &t))
            };
            let kind = match m.kind {
                MountType::Bind => {
                    let from = match &m.from {
                        None => Source::Context,
                        Some(f) => self.source(f, instr.span, platform)?,
                    };
                    let t = target(&m)?;
                    mounts.push(RunMount {
                        target: t,
                        kind: RunMountKind::Bind {
                            from,
                            source: m.source.clone().unwrap_or_else(|| "/".into()),
                            read_write: !m.read_only,
                        },
                    });
                    continue;
                }
                MountType::Cache => {
                    let t = target(&m)?;
                    RunMount {
                        kind: RunMountKind::Cache {
                            id: m.id.clone().unwrap_or_else(|| t.clone()),
                            sharing: match m.sharing {
                                Some(strata_dockerfile::Sharing::Private) => "private",
                                Some(strata_dockerfile::Sharing::Locked) => "locked",
                                _ => "shared",
                            }
                            .into(),
                            mode: m.mode.unwrap_or(0o755),
                            uid: m.uid.unwrap_or(0),
                            gid: m.gid.unwrap_or(0),
                            read_only: m.read_only,
                        },
                        target: t,
                    }
                }
                MountType::Tmpfs => RunMount {
                    target: target(&m)?,
                    kind: RunMountKind::Tmpfs { size: m.size_limit },
                },
                MountType::Secret => {
                    let id =
                        m.id.clone()
                            .or_else(|| {
                                m.target
                                    .as_deref()
                                    .and_then(|t| t.rsplit('/').next())
                                    .map(str::to_string)
                            })
                            .unwrap_or_default();
                    let t = m
                        .target
                        .clone()
                        .unwrap_or_else(|| format!("/run/secrets/{id}"));
                    RunMount {
                        target: relative_to_workdir(&state.config.config.working_dir, &t),
                        kind: RunMountKind::Secret {
                            id,
                            required: m.required,
                            env: m.env.clone(),
                            mode: m.mode.unwrap_or(0o400),
                            uid: m.uid.unwrap_or(0),
                            gid: m.gid.unwrap_or(0),
                        },
                    }
                }
                MountType::Ssh => {
                    // As BuildKit: the n-th agent of the step defaults to
                    // /run/buildkit/ssh_agent.n.
                    let n = mounts
                        .iter()
                        .filter(|m: &&RunMount| matches!(m.kind, RunMountKind::Ssh { .. }))
                        .count();
                    let t = m
                        .target
                        .clone()
                        .unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{n}"));
                    RunMount {
                        target: relative_to_workdir(&state.config.config.working_dir, &t),
                        kind: RunMountKind::Ssh {
                            id: m.id.clone().unwrap_or_else(|| "default".into()),
                            required: m.required,
                            mode: m.mode.unwrap_or(0o600),
                            uid: m.uid.unwrap_or(0),
                            gid: m.gid.unwrap_or(0),
                        },
                    }
                }
            };
            mounts.push(kind);
        }
        let c = &state.config.config;
        let mut env = state.scope.run_env.to_entries();
        if !env.iter().any(|e| e.starts_with("PATH=")) && platform.os != "windows" {
            env.push(DEFAULT_PATH.to_string());
        }
        // The first agent is the one `ssh` finds, unless the step's
        // environment names another.
        if let Some(agent) = mounts
            .iter()
            .find(|m| matches!(m.kind, RunMountKind::Ssh { .. }))
            && !env.iter().any(|e| e.starts_with("SSH_AUTH_SOCK="))
        {
            env.push(format!("SSH_AUTH_SOCK={}", agent.target));
        }
        Ok(Op::Exec(ExecOp {
            args,
            env,
            cwd: if c.working_dir.is_empty() {
                "/".into()
            } else {
                c.working_dir.clone()
            },
            user: c.user.clone(),
            no_network: network == crate::NetworkMode::None,
            host_network: network == crate::NetworkMode::Host,
            insecure: run.security.as_deref() == Some("insecure"),
            mounts,
            extra_hosts: opts.run.extra_hosts.clone(),
            shm_size: opts.run.shm_size,
            ulimits: opts.run.ulimits.clone(),
            files,
        }))
    }
}

/// The instruction as progress shows it: the original line, continuations
/// joined, blanks collapsed, keyword upper-cased.
fn instruction_label(original: &str) -> String {
    let joined: Vec<&str> = original.split_whitespace().collect();
    let mut s = joined.join(" ");
    if let Some(i) = s.find(' ') {
        let kw = s[..i].to_uppercase();
        s.replace_range(..i, &kw);
    } else {
        s = s.to_uppercase();
    }
    s
}

/// BuildKit's history string for RUN: build args in scope, then argv.
fn run_command_string(args: &[String], scope: &Scope) -> String {
    let declared: Vec<String> = scope
        .args
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
    let mut parts = Vec::new();
    if !declared.is_empty() {
        parts.push(format!("|{}", declared.len()));
        parts.extend(declared);
    }
    parts.extend(args.iter().cloned());
    parts.join(" ")
}

fn go_quote_list(args: &[String]) -> String {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| strata_dockerfile::go_quote(a))
        .collect();
    format!("[{}]", quoted.join(" "))
}

/// `WORKDIR p` after `current`: an absolute path is taken as written (a
/// trailing slash included, as BuildKit keeps it); a relative one is joined
/// to the current directory and cleaned.
pub(crate) fn normalize_workdir(current: &str, p: &str) -> String {
    if p.starts_with('/') {
        return p.to_string();
    }
    let base = if current.is_empty() { "/" } else { current };
    let cleaned = strata_dockerfile::clean_path(&format!("{base}/{p}"));
    if cleaned.starts_with('/') {
        cleaned
    } else {
        format!("/{cleaned}")
    }
}

/// A COPY destination or mount target against the working directory:
/// absolute stays, relative joins, `.` means the directory itself, and a
/// trailing `/` (meaning "a directory") is kept.
pub(crate) fn relative_to_workdir(workdir: &str, p: &str) -> String {
    let wants_dir = p.ends_with('/') || p == "." || p.is_empty() || p.ends_with("/.");
    let base = if workdir.is_empty() { "/" } else { workdir };
    let joined = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{base}/{p}")
    };
    let mut cleaned = strata_dockerfile::clean_path(&joined);
    if !cleaned.starts_with('/') {
        cleaned.insert(0, '/');
    }
    if wants_dir && !cleaned.ends_with('/') {
        cleaned.push('/');
    }
    cleaned
}

/// `EXPOSE 80`, `80/udp`, `8000-8002/tcp` → `port/proto` keys.
fn expand_port(spec: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid proto: {proto}"));
    }
    let parse = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| format!("invalid containerPort: {s}"))
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => {
            let p = parse(ports)?;
            (p, p)
        }
    };
    if hi < lo {
        return Err(format!("invalid port range: {ports}"));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

fn valid_signal(s: &str) -> bool {
    if let Ok(n) = s.parse::<u32>() {
        return (1..=64).contains(&n);
    }
    let name = s.strip_prefix("SIG").unwrap_or(s).to_uppercase();
    matches!(
        name.as_str(),
        "HUP"
            | "INT"
            | "QUIT"
            | "ILL"
            | "TRAP"
            | "ABRT"
            | "IOT"
            | "BUS"
            | "FPE"
            | "KILL"
            | "USR1"
            | "SEGV"
            | "USR2"
            | "PIPE"
            | "ALRM"
            | "TERM"
            | "STKFLT"
            | "CHLD"
            | "CONT"
            | "STOP"
            | "TSTP"
            | "TTIN"
            | "TTOU"
            | "URG"
            | "XCPU"
            | "XFSZ"
            | "VTALRM"
            | "PROF"
            | "WINCH"
            | "IO"
            | "POLL"
            | "PWR"
            | "SYS"
    ) || name.starts_with("RTMIN")
        || name.starts_with("RTMAX")
}

/// What one step of a finished stage left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepMade {
    /// Whether it added a layer (false: it changed no file).
    pub layer: bool,
    /// When its result was made (seconds since the epoch): now for a step
    /// that ran, the cache entry's time for one taken from the cache.
    pub created: i64,
}

/// History entries of a finished stage: `base` (the base's history), then
/// the stage's own, given what each step left.
///
/// Dates are BuildKit's: with `source_date_epoch` every new entry carries
/// it; otherwise a step's entry carries when its result was made, so a
/// build taken wholly from the cache dates (and names) its image as the
/// first build did, and a config-only entry (`ENV`, `LABEL`) carries the
/// latest date before it (the first step's, at the start of a stage that
/// has no earlier date; `now` when the stage has no date at all).
pub fn history_with_layers(
    stage: &StagePlan,
    base: Vec<History>,
    steps: &[StepMade],
    source_date_epoch: Option<i64>,
    now: i64,
) -> Vec<History> {
    let mut latest = base
        .iter()
        .filter_map(|h| h.created.as_deref().and_then(unix_from_rfc3339))
        .max();
    let first_step = steps.iter().map(|s| s.created).min();
    let mut out = base;
    for h in &stage.history {
        let made = h.step.and_then(|s| steps.get(s));
        let created = match (source_date_epoch, made) {
            (Some(epoch), _) => epoch,
            (None, Some(m)) => m.created,
            (None, None) => latest.or(first_step).unwrap_or(now),
        };
        latest = latest.max(Some(created));
        out.push(History {
            created: Some(rfc3339(created)),
            created_by: Some(h.created_by.clone()),
            comment: Some(HISTORY_COMMENT.to_string()),
            empty_layer: !made.is_some_and(|m| m.layer),
            ..Default::default()
        });
    }
    out
}

/// The `created` date of an image with `history`: `source_date_epoch` when
/// given, else its latest history date (as BuildKit dates an image).
pub fn image_created(history: &[History], source_date_epoch: Option<i64>) -> Option<String> {
    source_date_epoch
        .or_else(|| {
            history
                .iter()
                .filter_map(|h| h.created.as_deref().and_then(unix_from_rfc3339))
                .max()
        })
        .map(rfc3339)
}

/// An `ADD` source BuildKit downloads.
fn is_http_source(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// An `ADD` source BuildKit clones: `git@…`, `git://…`, or a URL whose path
/// ends in `.git` (optionally with a `#ref`).
fn is_git_source(s: &str) -> bool {
    let path = s.split('#').next().unwrap_or(s);
    s.starts_with("git@")
        || s.starts_with("git://")
        || (is_http_source(s) && path.ends_with(".git"))
}

/// The name a downloaded file gets: the last segment of the URL's path,
/// else `__unnamed__` (BuildKit's Dockerfile frontend names it so).
fn url_file_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .split_once('/')
        .map_or("", |(_, p)| p);
    match path.rsplit('/').next() {
        Some(base) if !base.is_empty() && base != "." && base != ".." => base.to_string(),
        _ => "__unnamed__".to_string(),
    }
}

/// `--checksum=sha256:HEX` → HEX. Other algorithms are named in the error.
fn parse_sha256(c: &str) -> Result<String, String> {
    let Some((alg, hex)) = c.split_once(':') else {
        return Err(format!(
            "invalid checksum {c:?}: expected sha256:<64 hex digits>"
        ));
    };
    if alg != "sha256" {
        return Err(format!(
            "unsupported checksum algorithm {alg:?} (strata checks sha256)"
        ));
    }
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "invalid checksum {c:?}: expected 64 hex digits after sha256:"
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

#[cfg(test)]
mod tests;
