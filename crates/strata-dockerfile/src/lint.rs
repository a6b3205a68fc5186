//! Build checks: the findings BuildKit's Dockerfile linter reports about a
//! Dockerfile that still builds, by the same rule names and words, so a CI
//! script that reads or gates on them (`# check=error=true`) sees the same
//! thing. The `check` directive (or the `BUILDKIT_DOCKERFILE_CHECK` build
//! argument) skips rules (`skip=A,B` or `skip=all`) and turns findings into
//! an error (`error=true`).
//!
//! `UndefinedVar` needs the base images' environments: the planner finds
//! it ([`undefined_var`] makes the finding). `InvalidBaseImagePlatform` is
//! not a warning here: a base of another platform is refused. BuildKit's
//! experimental rules are not checked.

use std::collections::{BTreeMap, BTreeSet};

use crate::instructions::Command;
use crate::{Dockerfile, EnvList, Lexer, SCRATCH};

/// The build argument that overrides the `check` directive, as BuildKit's.
pub const CHECK_BUILD_ARG: &str = "BUILDKIT_DOCKERFILE_CHECK";

/// Every rule checked, with where BuildKit documents it.
pub const RULES: &[(&str, &str)] = &[
    ("StageNameCasing", "stage-name-casing"),
    ("FromAsCasing", "from-as-casing"),
    ("NoEmptyContinuation", "no-empty-continuation"),
    (
        "ConsistentInstructionCasing",
        "consistent-instruction-casing",
    ),
    ("ReservedStageName", "reserved-stage-name"),
    ("JSONArgsRecommended", "json-args-recommended"),
    ("MaintainerDeprecated", "maintainer-deprecated"),
    ("UndefinedArgInFrom", "undefined-arg-in-from"),
    ("WorkdirRelativePath", "workdir-relative-path"),
    (
        "MultipleInstructionsDisallowed",
        "multiple-instructions-disallowed",
    ),
    ("LegacyKeyValueFormat", "legacy-key-value-format"),
    ("RedundantTargetPlatform", "redundant-target-platform"),
    ("SecretsUsedInArgOrEnv", "secrets-used-in-arg-or-env"),
    ("InvalidDefaultArgInFrom", "invalid-default-arg-in-from"),
    (
        "FromPlatformFlagConstDisallowed",
        "from-platform-flag-const-disallowed",
    ),
    ("UndefinedVar", "undefined-var"),
];

/// Stage names BuildKit reserves.
const RESERVED_STAGE_NAMES: &[&str] = &[SCRATCH, "context"];

/// Variables every `FROM` may use without declaring them.
const PREDEFINED: &[&str] = &[
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDOSVERSION",
    "BUILDARCH",
    "BUILDVARIANT",
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETOSVERSION",
    "TARGETARCH",
    "TARGETVARIANT",
    "TARGETSTAGE",
];

/// Words in an `ARG` or `ENV` name that say it holds a secret.
const SECRET_WORDS: &[&str] = &[
    "apikey",
    "auth",
    "credential",
    "credentials",
    "key",
    "password",
    "pword",
    "passwd",
    "secret",
    "token",
];

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The rule's name (`JSONArgsRecommended`).
    pub rule: &'static str,
    /// What was found, in BuildKit's words.
    pub message: String,
    /// The line it is about, from 1.
    pub line: usize,
}

/// As a build lists it: `Rule: message (line N)`.
impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (line {})", self.rule, self.message, self.line)
    }
}

/// BuildKit's words for a build that `error=true` refuses: the rules
/// `findings` broke, and the Dockerfile (`file`) whose directive said so.
pub fn violation<'a>(findings: impl IntoIterator<Item = &'a Finding>, file: &str) -> String {
    let rules: BTreeSet<&str> = findings.into_iter().map(|f| f.rule).collect();
    format!(
        "lint violation found for rules: {} ({file}'s check directive says error=true)",
        rules.into_iter().collect::<Vec<_>>().join(", ")
    )
}

impl Finding {
    /// Where the rule is documented.
    pub fn url(&self) -> String {
        let slug = RULES
            .iter()
            .find(|(name, _)| *name == self.rule)
            .map_or("", |(_, slug)| slug);
        format!("https://docs.docker.com/go/dockerfile/rule/{slug}/")
    }
}

/// What the `check` directive asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckConfig {
    /// `skip=all`.
    pub skip_all: bool,
    /// `skip=A,B`: rule names.
    pub skip: BTreeSet<String>,
    /// `error=true`: a finding fails the build.
    pub error: bool,
}

impl CheckConfig {
    /// Parses `skip=A,B;error=true` (either part optional).
    pub fn parse(s: &str) -> Result<CheckConfig, String> {
        let mut config = CheckConfig::default();
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                format!("check directive {s:?}: {part:?} is not key=value (skip=RULES;error=BOOL)")
            })?;
            match k.trim().to_ascii_lowercase().as_str() {
                "skip" => {
                    for rule in v.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                        if rule.eq_ignore_ascii_case("all") {
                            config.skip_all = true;
                        } else {
                            config.skip.insert(rule.to_string());
                        }
                    }
                }
                "error" => {
                    config.error = match v.trim().to_ascii_lowercase().as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        other => {
                            return Err(format!(
                                "check directive {s:?}: error={other} is not true or false"
                            ));
                        }
                    }
                }
                // Experimental rules are not checked, so none is enabled.
                "experimental" => {}
                other => {
                    return Err(format!(
                        "check directive {s:?}: unknown key {other:?} (skip, error, experimental)"
                    ));
                }
            }
        }
        Ok(config)
    }

    /// The configuration of a build: the `BUILDKIT_DOCKERFILE_CHECK` build
    /// argument if given, else the Dockerfile's `check` directive.
    pub fn of(
        df: &Dockerfile,
        build_args: &BTreeMap<String, String>,
    ) -> Result<CheckConfig, String> {
        match build_args
            .get(CHECK_BUILD_ARG)
            .or(df.directives.check.as_ref())
        {
            Some(s) => CheckConfig::parse(s),
            None => Ok(CheckConfig::default()),
        }
    }

    /// Whether `rule` is checked.
    pub fn checks(&self, rule: &str) -> bool {
        !self.skip_all && !self.skip.contains(rule)
    }
}

/// The findings `config` does not skip, in line order.
pub fn check(df: &Dockerfile, config: &CheckConfig) -> Vec<Finding> {
    let mut findings: Vec<Finding> = lint(df)
        .into_iter()
        .filter(|f| config.checks(f.rule))
        .collect();
    findings.sort_by_key(|f| f.line);
    findings
}

/// Every finding of every rule.
pub fn lint(df: &Dockerfile) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut push = |rule: &'static str, line: usize, message: String| {
        out.push(Finding {
            rule,
            message,
            line,
        })
    };

    for w in &df.warnings {
        if w.message.starts_with("Empty continuation line") {
            push(
                "NoEmptyContinuation",
                w.line,
                "Empty continuation line".into(),
            );
        }
    }

    // Keyword casing: the majority of all-lower and all-upper keywords
    // decides; every keyword not in it is reported.
    let keywords: Vec<(&str, usize)> = df
        .stages
        .iter()
        .flat_map(|s| {
            std::iter::once((first_word(&s.original), s.span.start)).chain(
                s.instructions
                    .iter()
                    .map(|i| (first_word(&i.original), i.span.start)),
            )
        })
        .chain(
            df.global_args
                .iter()
                .map(|i| (first_word(&i.original), i.span.start)),
        )
        .collect();
    let lower = keywords
        .iter()
        .filter(|(k, _)| *k == k.to_lowercase())
        .count();
    let upper = keywords
        .iter()
        .filter(|(k, _)| *k == k.to_uppercase())
        .count();
    let majority_lower = lower > upper;
    for (k, line) in &keywords {
        let fits = if majority_lower {
            *k == k.to_lowercase()
        } else {
            *k == k.to_uppercase()
        };
        if !fits {
            let casing = if majority_lower {
                "lowercase"
            } else {
                "uppercase"
            };
            push(
                "ConsistentInstructionCasing",
                *line,
                format!("Command '{k}' should match the case of the command majority ({casing})"),
            );
        }
    }

    // Global ARGs: what FROM lines may use, and their defaults.
    let mut globals = EnvList::new();
    let mut declared: BTreeSet<String> = PREDEFINED.iter().map(|s| s.to_string()).collect();
    for instr in &df.global_args {
        if let Command::Arg(decls) = &instr.command {
            for d in decls {
                declared.insert(d.key.clone());
                if let Some(v) = &d.default {
                    globals.set(&d.key, v);
                }
            }
        }
    }
    let lexer = Lexer::new(df.directives.escape);
    let candidates: Vec<&str> = declared.iter().map(String::as_str).collect();

    // Whether a stage (by name) set an absolute WORKDIR, for the stages
    // built on it.
    let mut absolute_workdir: BTreeMap<String, bool> = BTreeMap::new();
    for stage in &df.stages {
        let line = stage.span.start;
        let words: Vec<&str> = stage.original.split_whitespace().collect();
        if let (Some(name), [.., as_kw, written]) = (&stage.name, words.as_slice()) {
            let from_kw = first_word(&stage.original);
            let from_upper = from_kw == from_kw.to_uppercase();
            let from_lower = from_kw == from_kw.to_lowercase();
            if (from_upper && *as_kw != as_kw.to_uppercase())
                || (from_lower && *as_kw != as_kw.to_lowercase())
            {
                push(
                    "FromAsCasing",
                    line,
                    format!("'{as_kw}' and '{from_kw}' keywords' casing do not match"),
                );
            }
            if *written != written.to_lowercase() {
                push(
                    "StageNameCasing",
                    line,
                    format!("Stage name '{written}' should be lowercase"),
                );
            }
            if RESERVED_STAGE_NAMES.contains(&name.as_str()) {
                push(
                    "ReservedStageName",
                    line,
                    format!("Stage name should not use the same name as reserved stage {name:?}"),
                );
            }
        }

        // FROM's words: undeclared arguments, defaults that leave no name.
        let mut undeclared = BTreeSet::new();
        for word in std::iter::once(&stage.base).chain(stage.platform.as_ref()) {
            if let Ok(e) = lexer.process_word_with_matches(word, &NoDefaults(&declared)) {
                undeclared.extend(e.unmatched);
            }
        }
        for arg in &undeclared {
            let mut message = format!("FROM argument '{arg}' is not declared");
            if let Some(s) = crate::suggest(arg, &candidates) {
                message.push_str(&format!(" (did you mean {s}?)"));
            }
            push("UndefinedArgInFrom", line, message);
        }
        if stage.base.contains('$')
            && undeclared.is_empty()
            && let Ok(base) = lexer.process_word(&stage.base, &globals)
            && !valid_base_name(&base)
        {
            push(
                "InvalidDefaultArgInFrom",
                line,
                format!(
                    "Default value for ARG {} results in empty or invalid base image name",
                    stage.base
                ),
            );
        }
        if let Some(p) = &stage.platform {
            if p == "$TARGETPLATFORM" || p == "${TARGETPLATFORM}" {
                push(
                    "RedundantTargetPlatform",
                    line,
                    format!(
                        "Setting platform to predefined {p} in FROM is redundant as this is the default behavior"
                    ),
                );
            } else if !p.contains('$') && !names_platform(stage.name.as_deref(), p) {
                push(
                    "FromPlatformFlagConstDisallowed",
                    line,
                    format!("FROM --platform flag should not use constant value {p:?}"),
                );
            }
        }

        let mut has_absolute = absolute_workdir
            .get(&stage.base.to_lowercase())
            .copied()
            .unwrap_or(false);
        let mut custom_shell = false;
        let mut last: BTreeMap<&'static str, usize> = BTreeMap::new();
        for instr in &stage.instructions {
            let line = instr.span.start;
            match &instr.command {
                Command::Cmd(c) | Command::Entrypoint(c) => {
                    let kw = instr.command.keyword();
                    if c.shell_form && !custom_shell {
                        push(
                            "JSONArgsRecommended",
                            line,
                            format!(
                                "JSON arguments recommended for {kw} to prevent unintended behavior related to OS signals"
                            ),
                        );
                    }
                    if let Some(prev) = last.insert(kw, line) {
                        push("MultipleInstructionsDisallowed", prev, multiple(kw));
                    }
                }
                Command::Healthcheck(_) => {
                    if let Some(prev) = last.insert("HEALTHCHECK", line) {
                        push(
                            "MultipleInstructionsDisallowed",
                            prev,
                            multiple("HEALTHCHECK"),
                        );
                    }
                }
                Command::Shell(_) => custom_shell = true,
                Command::Maintainer(_) => push(
                    "MaintainerDeprecated",
                    line,
                    "Maintainer instruction is deprecated in favor of using label".into(),
                ),
                Command::Workdir(w) => {
                    if w.starts_with('/') || w.starts_with('$') {
                        has_absolute = true;
                    } else if !has_absolute {
                        push(
                            "WorkdirRelativePath",
                            line,
                            format!(
                                "Relative workdir {w:?} can have unexpected results if the base image changes"
                            ),
                        );
                    }
                }
                Command::Env(kvs) | Command::Label(kvs) => {
                    let kw = instr.command.keyword();
                    if kvs.iter().any(|kv| kv.legacy) {
                        push(
                            "LegacyKeyValueFormat",
                            line,
                            format!(
                                "\"{kw} key=value\" should be used instead of legacy \"{kw} key value\" format"
                            ),
                        );
                    }
                    if matches!(instr.command, Command::Env(_)) {
                        for kv in kvs.iter().filter(|kv| looks_secret(&kv.key)) {
                            push("SecretsUsedInArgOrEnv", line, secret("ENV", &kv.key));
                        }
                    }
                }
                Command::Arg(decls) => {
                    for d in decls.iter().filter(|d| looks_secret(&d.key)) {
                        push("SecretsUsedInArgOrEnv", line, secret("ARG", &d.key));
                    }
                }
                _ => {}
            }
        }
        if let Some(name) = &stage.name {
            absolute_workdir.insert(name.clone(), has_absolute);
        }
    }
    for instr in &df.global_args {
        if let Command::Arg(decls) = &instr.command {
            for d in decls.iter().filter(|d| looks_secret(&d.key)) {
                push(
                    "SecretsUsedInArgOrEnv",
                    instr.span.start,
                    secret("ARG", &d.key),
                );
            }
        }
    }
    out
}

/// BuildKit's UndefinedVar finding for `name` at `line`, suggesting the
/// closest of `known` (the names set or declared there).
pub fn undefined_var(name: &str, line: usize, known: &[&str]) -> Finding {
    let mut message = format!("Usage of undefined variable '${name}'");
    if let Some(s) = crate::suggest(name, known) {
        message.push_str(&format!(" (did you mean ${s}?)"));
    }
    Finding {
        rule: "UndefinedVar",
        message,
        line,
    }
}

/// Declared names count as set (to nothing) so that only undeclared ones
/// come back unmatched.
struct NoDefaults<'a>(&'a BTreeSet<String>);

impl crate::Env for NoDefaults<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.contains(key).then_some("x")
    }
}

fn first_word(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or("")
}

fn multiple(kw: &str) -> String {
    format!(
        "Multiple {kw} instructions should not be used in the same stage because only the last one will be used"
    )
}

fn secret(kw: &str, key: &str) -> String {
    format!("Do not use ARG or ENV instructions for sensitive data ({kw} {key:?})")
}

/// Whether a name says it holds a secret: one of its `_`-separated words
/// is a secret word, and none says `public`.
fn looks_secret(key: &str) -> bool {
    let words: Vec<String> = key.split('_').map(str::to_ascii_lowercase).collect();
    words.iter().any(|w| SECRET_WORDS.contains(&w.as_str())) && !words.iter().any(|w| w == "public")
}

/// A stage named for its platform (`build-arm64`) may pin one.
fn names_platform(stage: Option<&str>, platform: &str) -> bool {
    let Some(stage) = stage else { return false };
    platform
        .split('/')
        .skip(1)
        .any(|part| !part.is_empty() && stage.contains(&part.to_lowercase()))
}

/// Whether an expanded `FROM` base could name an image.
fn valid_base_name(base: &str) -> bool {
    !base.is_empty()
        && !base.starts_with([':', '@', '/'])
        && !base.ends_with([':', '@', '/'])
        && !base.contains(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(src: &str) -> Vec<(&'static str, usize, String)> {
        let df = Dockerfile::parse(src.as_bytes()).unwrap();
        check(&df, &CheckConfig::of(&df, &BTreeMap::new()).unwrap())
            .into_iter()
            .map(|f| (f.rule, f.line, f.message))
            .collect()
    }

    #[test]
    fn a_clean_dockerfile_has_no_findings() {
        let src = "ARG BASE=busybox\nFROM ${BASE} AS build\nWORKDIR /app\nWORKDIR src\nENV PATH=/x API_URL=y\nCMD [\"run\"]\nFROM --platform=$BUILDPLATFORM build AS tools\nFROM --platform=linux/arm64 build AS build-arm64\n";
        assert_eq!(rules(src), vec![]);
    }

    #[test]
    fn each_rule_in_buildkit_s_words() {
        let src = "\
ARG VERSION
FROM busybox:${VERSION} as Builder
maintainer me
WORKDIR app
ENV DB_PASSWORD secret
ARG GITHUB_TOKEN
CMD run
CMD [\"run\"]
FROM --platform=linux/amd64 alpine:${VERSON} AS scratch
FROM --platform=$TARGETPLATFORM alpine
";
        let found = rules(src);
        let has = |rule: &str, line: usize, message: &str| {
            assert!(
                found
                    .iter()
                    .any(|(r, l, m)| *r == rule && *l == line && m == message),
                "{rule} at {line}: {message:?} not in {found:#?}"
            );
        };
        has(
            "FromAsCasing",
            2,
            "'as' and 'FROM' keywords' casing do not match",
        );
        has(
            "StageNameCasing",
            2,
            "Stage name 'Builder' should be lowercase",
        );
        has(
            "ConsistentInstructionCasing",
            3,
            "Command 'maintainer' should match the case of the command majority (uppercase)",
        );
        has(
            "MaintainerDeprecated",
            3,
            "Maintainer instruction is deprecated in favor of using label",
        );
        has(
            "WorkdirRelativePath",
            4,
            "Relative workdir \"app\" can have unexpected results if the base image changes",
        );
        has(
            "LegacyKeyValueFormat",
            5,
            "\"ENV key=value\" should be used instead of legacy \"ENV key value\" format",
        );
        has(
            "SecretsUsedInArgOrEnv",
            5,
            "Do not use ARG or ENV instructions for sensitive data (ENV \"DB_PASSWORD\")",
        );
        has(
            "SecretsUsedInArgOrEnv",
            6,
            "Do not use ARG or ENV instructions for sensitive data (ARG \"GITHUB_TOKEN\")",
        );
        has(
            "JSONArgsRecommended",
            7,
            "JSON arguments recommended for CMD to prevent unintended behavior related to OS signals",
        );
        has(
            "MultipleInstructionsDisallowed",
            7,
            "Multiple CMD instructions should not be used in the same stage because only the last one will be used",
        );
        has(
            "UndefinedArgInFrom",
            9,
            "FROM argument 'VERSON' is not declared (did you mean VERSION?)",
        );
        has(
            "ReservedStageName",
            9,
            "Stage name should not use the same name as reserved stage \"scratch\"",
        );
        has(
            "FromPlatformFlagConstDisallowed",
            9,
            "FROM --platform flag should not use constant value \"linux/amd64\"",
        );
        has(
            "RedundantTargetPlatform",
            10,
            "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior",
        );
        has(
            "InvalidDefaultArgInFrom",
            2,
            "Default value for ARG busybox:${VERSION} results in empty or invalid base image name",
        );
        assert_eq!(found.len(), 15, "{found:#?}");
    }

    #[test]
    fn the_check_directive_and_build_arg_skip_and_gate() {
        let df = Dockerfile::parse(
            b"# check=skip=JSONArgsRecommended;error=true\nFROM busybox\nMAINTAINER me\nCMD run\n",
        )
        .unwrap();
        let config = CheckConfig::of(&df, &BTreeMap::new()).unwrap();
        assert!(config.error);
        let found: Vec<&str> = check(&df, &config).iter().map(|f| f.rule).collect();
        assert_eq!(found, ["MaintainerDeprecated"]);
        let all = BTreeMap::from([(CHECK_BUILD_ARG.to_string(), "skip=all".to_string())]);
        let config = CheckConfig::of(&df, &all).unwrap();
        assert!(!config.error);
        assert!(check(&df, &config).is_empty());
        assert!(CheckConfig::parse("skip").is_err());
        assert!(CheckConfig::parse("error=maybe").is_err());
        assert!(CheckConfig::parse("colour=red").is_err());
    }
}
