//! strata's Dockerfile frontend.
//!
//! It turns Dockerfile bytes into a typed model the planner consumes, and
//! reads `.dockerignore`. It matches BuildKit's parser and word expansion
//! case for case, checked against BuildKit's own test data
//! (`tests/conformance.rs`), because a Dockerfile must mean the same thing
//! to strata as to `docker build`.
//!
//! Three layers, each usable on its own:
//!
//! * [`parse`] → [`Ast`]: line syntax (directives, continuations, heredocs,
//!   flags, JSON versus shell form). [`Ast::dump`] prints BuildKit's
//!   parse-tree format.
//! * [`Dockerfile`]: typed [`Instruction`]s grouped into [`Stage`]s, with
//!   global `ARG`s; [`Dockerfile::graph`] resolves bases, `--from` sources
//!   and the target for one build's arguments.
//! * [`Lexer`]: `$VAR` expansion and word splitting;
//!   [`Command::expand`] applies it to the fields BuildKit expands.
//! * [`lint`]: BuildKit's build checks, under the `check` directive.
//!
//! The crate does no I/O beyond reading the file it is given
//! ([`Dockerfile::parse_file`]); it knows nothing of images, layers or
//! caches.

mod dockerfile;
mod dockerignore;
mod error;
mod expand;
mod flags;
pub mod instructions;
pub mod limits;
pub mod lint;
mod mount;
mod parser;
mod platform;
mod scope;
mod shell;
mod text;

pub use dockerfile::{Base, Dockerfile, SCRATCH, Source, Stage, StageGraph, parse_instructions};
pub use dockerignore::{IgnoreMatcher, clean_path, read_patterns};
pub use error::{Error, ErrorKind, Position, Result, Span};
pub use flags::parse_go_duration;
pub use instructions::{
    Add, ArgDecl, Command, CommandLine, Copy, Files, Healthcheck, InlineFile, Instruction,
    KeyValue, Run,
};
pub use mount::{Mount, MountSpec, MountType, Sharing};
pub use parser::{
    Ast, Directives, Heredoc, MAX_LINE_LEN, Node, SourceMap, Warning, is_heredoc_marker, parse,
};
pub use platform::{Platform, predefined_args};
pub use scope::Scope;
pub use shell::{Env, EnvList, ExpandError, Expansion, Lexer, NoEnv};
pub use text::go_quote;

/// The candidate closest to `word` (case-insensitive edit distance), if it
/// is close enough to be a likely typo.
pub(crate) fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_lowercase();
    let max = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (edit_distance(&word, &c.to_lowercase()), *c))
        .filter(|(d, _)| *d <= max)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal-string-alignment distance: edits and adjacent swaps cost one,
/// so `FORM` is one step from `FROM`.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_only() {
        assert_eq!(suggest("FORM", instructions::KEYWORDS), Some("FROM"));
        assert_eq!(suggest("COPPY", instructions::KEYWORDS), Some("COPY"));
        assert_eq!(suggest("XYZZY", instructions::KEYWORDS), None);
    }
}
