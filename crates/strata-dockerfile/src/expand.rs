//! Variable expansion of typed instructions.
//!
//! BuildKit expands most instruction arguments with the variables in scope
//! at that point of the stage (the base image's `ENV`, then the stage's
//! `ENV` and `ARG`s). The caller walks the stage and keeps that scope; this
//! module knows which fields of each instruction are expanded, and how.

use crate::error::Result;
use crate::instructions::{Command, Files, Instruction, KeyValue};
use crate::shell::{Env, ExpandError, Lexer};
use crate::{Dockerfile, Error};

impl Command {
    /// Expands the fields BuildKit expands for this instruction. `RUN`,
    /// `CMD`, `ENTRYPOINT`, `SHELL`, `HEALTHCHECK`, `ONBUILD` and
    /// `MAINTAINER` are left as written (the shell or the later build sees
    /// them); `ARG` defaults are expanded by the caller, which knows the
    /// build args. `RUN --mount` values are expanded by
    /// [`crate::MountSpec::resolve`].
    pub fn expand(&self, lexer: &Lexer, env: &dyn Env) -> Result<Command, ExpandError> {
        let word = |s: &str| lexer.process_word(s, env);
        let opt = |s: &Option<String>| s.as_deref().map(word).transpose();
        let kvs = |list: &[KeyValue]| -> Result<Vec<KeyValue>, ExpandError> {
            list.iter()
                .map(|kv| {
                    Ok(KeyValue {
                        key: word(&kv.key)?,
                        value: word(&kv.value)?,
                        legacy: kv.legacy,
                    })
                })
                .collect()
        };
        let files = |f: &Files| -> Result<Files, ExpandError> {
            // Heredoc bodies keep their quotes: only `$VAR`s and escapes apply.
            let raw = Lexer::new('\\').skip_quotes(true);
            let mut inline = f.inline.clone();
            for file in inline.iter_mut().filter(|i| i.expand) {
                file.data = raw.process_word(&file.data, env)?;
            }
            Ok(Files {
                sources: f
                    .sources
                    .iter()
                    .map(|s| word(s))
                    .collect::<Result<_, _>>()?,
                inline,
                dest: word(&f.dest)?,
            })
        };
        Ok(match self {
            Command::Env(list) => Command::Env(kvs(list)?),
            Command::Label(list) => Command::Label(kvs(list)?),
            Command::Workdir(p) => Command::Workdir(word(p)?),
            Command::User(u) => Command::User(word(u)?),
            Command::StopSignal(s) => Command::StopSignal(word(s)?),
            Command::Volume(v) => {
                Command::Volume(v.iter().map(|s| word(s)).collect::<Result<_, _>>()?)
            }
            Command::Expose(ports) => {
                let mut out = Vec::with_capacity(ports.len());
                for p in ports {
                    out.extend(lexer.process_words(p, env)?);
                }
                Command::Expose(out)
            }
            Command::Copy(c) => {
                let mut c = c.clone();
                c.files = files(&c.files)?;
                c.chown = opt(&c.chown)?;
                c.chmod = opt(&c.chmod)?;
                Command::Copy(c)
            }
            Command::Add(a) => {
                let mut a = a.clone();
                a.files = files(&a.files)?;
                a.chown = opt(&a.chown)?;
                a.chmod = opt(&a.chmod)?;
                a.checksum = opt(&a.checksum)?;
                Command::Add(a)
            }
            other => other.clone(),
        })
    }
}

impl Dockerfile {
    /// Expands `instr` with `env`, pointing any error at the instruction.
    pub fn expand(&self, instr: &Instruction, env: &dyn Env) -> Result<Instruction, Error> {
        let command = instr
            .command
            .expand(&self.lexer(), env)
            .map_err(|e| self.expand_error(instr.span, "$", e))?;
        Ok(Instruction {
            span: instr.span,
            original: instr.original.clone(),
            command,
        })
    }
}
