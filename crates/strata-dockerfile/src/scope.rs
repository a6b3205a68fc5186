//! The variables in scope while a stage's instructions are processed.
//!
//! BuildKit keeps two lists per stage: the environment that `RUN` and
//! expansion see (the base image's `ENV`, then the stage's `ENV` and `ARG`
//! values, a later one replacing an earlier one of the same name) and the
//! image config's `Env` (only `ENV`). A stage built on another stage starts
//! from that stage's scope, `ARG`s included.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use crate::Dockerfile;
use crate::error::{ErrorKind, Result};
use crate::instructions::{ArgDecl, Command, Instruction};
use crate::shell::{Env, EnvList};

/// Variables in scope at one point of a stage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// What expansion and `RUN` see.
    pub run_env: EnvList,
    /// The image config's `Env`.
    pub config_env: EnvList,
    /// `ARG`s declared so far, with the value each took (`None`: unset).
    pub args: Vec<(String, Option<String>)>,
}

impl Scope {
    /// The scope at the start of a stage whose base image has `env`
    /// (`KEY=value` entries).
    pub fn from_image_env<S: AsRef<str>>(env: &[S]) -> Scope {
        let list = EnvList::from_entries(env);
        Scope {
            run_env: list.clone(),
            config_env: list,
            args: Vec::new(),
        }
    }

    /// Declares `ARG`s: a build arg wins, else the default expanded in this
    /// scope, else a global `ARG` of the same name; otherwise it stays unset.
    fn declare(
        &mut self,
        df: &Dockerfile,
        instr: &Instruction,
        decls: &[ArgDecl],
        build_args: &BTreeMap<String, String>,
        global: &dyn Env,
    ) -> Result<()> {
        for ArgDecl { key, default } in decls {
            let value = match (build_args.get(key), default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(d)) => Some(
                    df.lexer()
                        .process_word(d, &self.run_env)
                        .map_err(|e| df.expand_error(instr.span, d, e))?,
                ),
                (None, None) => global.get(key).map(str::to_string),
            };
            if let Some(v) = &value {
                self.run_env.set(key, v);
            }
            self.args.retain(|(k, _)| k != key);
            self.args.push((key.clone(), value));
        }
        Ok(())
    }
}

/// An error unless the variables of `env` fit in
/// [`MAX_SCOPE_BYTES`](crate::limits::MAX_SCOPE_BYTES); `instr` is where
/// they grew.
pub(crate) fn check_scope(df: &Dockerfile, instr: &Instruction, env: &EnvList) -> Result<()> {
    let bytes = env.bytes();
    if bytes > crate::limits::MAX_SCOPE_BYTES {
        return Err(df.error_at(
            ErrorKind::Limit,
            instr.span,
            "",
            format!(
                "the variables in scope come to {bytes} bytes, over the limit of {} bytes",
                crate::limits::MAX_SCOPE_BYTES
            ),
        ));
    }
    Ok(())
}

impl Dockerfile {
    /// Expands `instr` in `scope` and applies its effect on the scope:
    /// `ARG` declares, `ENV` sets. Returns the expanded instruction.
    pub fn apply_in_scope(
        &self,
        instr: &Instruction,
        scope: &mut Scope,
        build_args: &BTreeMap<String, String>,
        global: &dyn Env,
    ) -> Result<Instruction> {
        if let Command::Arg(decls) = &instr.command {
            scope.declare(self, instr, decls, build_args, global)?;
            check_scope(self, instr, &scope.run_env)?;
            return Ok(instr.clone());
        }
        let expanded = self.expand(instr, &scope.run_env)?;
        if let Command::Env(kvs) = &expanded.command {
            for kv in kvs {
                scope.run_env.set(&kv.key, &kv.value);
                scope.config_env.set(&kv.key, &kv.value);
            }
            check_scope(self, instr, &scope.run_env)?;
        }
        Ok(expanded)
    }

    /// Checks everything that can be checked without images: stage
    /// references, the target, and the expansion of every instruction and
    /// `RUN --mount` of the stages the target needs. A `${V:?}` that fails
    /// is not reported, since the base image may set `V`.
    pub fn check(
        &self,
        build_args: &BTreeMap<String, String>,
        predefined: &EnvList,
        target: Option<&str>,
    ) -> Result<crate::StageGraph> {
        let global = self.global_scope(build_args, predefined)?;
        let graph = self.graph(&global, target)?;
        let mut scopes: Vec<Option<Scope>> = vec![None; self.stages.len()];
        for &i in &graph.order {
            let mut scope = match graph.bases[i] {
                crate::Base::Stage(b) => scopes[b].clone().unwrap_or_default(),
                _ => Scope::default(),
            };
            for instr in &self.stages[i].instructions {
                match self.apply_in_scope(instr, &mut scope, build_args, &global) {
                    Ok(expanded) => {
                        if let Command::Run(run) = &expanded.command {
                            for m in &run.mounts {
                                let lexer = self.lexer();
                                let env = scope.run_env.clone();
                                m.resolve(&mut |v| {
                                    lexer
                                        .process_word(v, &env)
                                        .map_err(|e| e.message().to_string())
                                })
                                .map_err(|e| {
                                    self.error_at(ErrorKind::Instruction, instr.span, "--mount", e)
                                })?;
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::RequiredVariable => {}
                    Err(e) => return Err(e),
                }
            }
            scopes[i] = Some(scope);
        }
        Ok(graph)
    }
}

impl Dockerfile {
    /// The variables `instr` uses, in the fields BuildKit expands, that
    /// `scope` neither sets nor declares as an `ARG` (BuildKit's
    /// UndefinedVar). One given a default or an alternative where it is
    /// used (`${V:-x}`, `${V:+x}`, `${V-x}`) is not counted.
    pub fn undefined_vars(&self, instr: &Instruction, scope: &Scope) -> Vec<String> {
        if matches!(instr.command, Command::Arg(_)) {
            return Vec::new();
        }
        let seen = Missing {
            env: &scope.run_env,
            missing: RefCell::default(),
        };
        let _ = instr.command.expand(&self.lexer(), &seen);
        let declared = |name: &str| scope.args.iter().any(|(k, _)| k == name);
        let defaulted = |name: &str| {
            ["-", ":-", "+", ":+", "=", ":="]
                .iter()
                .any(|m| instr.original.contains(&format!("${{{name}{m}")))
        };
        seen.missing
            .into_inner()
            .into_iter()
            .filter(|n| !declared(n) && !defaulted(n))
            .collect()
    }
}

/// An environment that notes the names asked for and not set.
struct Missing<'a> {
    env: &'a dyn Env,
    missing: RefCell<BTreeSet<String>>,
}

impl Env for Missing<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        let v = self.env.get(name);
        if v.is_none() {
            self.missing.borrow_mut().insert(name.to_string());
        }
        v
    }
}
