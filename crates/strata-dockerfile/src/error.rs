//! Errors of the frontend, each pointing at the file, line and column it is about.

use std::fmt;
use std::path::{Path, PathBuf};

/// A 1-based position in a Dockerfile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Physical line, counting from 1.
    pub line: usize,
    /// Character (not byte) column in that line, counting from 1.
    pub column: usize,
}

/// The physical lines an instruction spans, both ends inclusive and 1-based.
///
/// A span includes continuation lines, blank and comment lines skipped inside
/// a continuation, and heredoc bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    /// First physical line.
    pub start: usize,
    /// Last physical line.
    pub end: usize,
}

/// What went wrong, for callers that branch on it.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The bytes do not form a Dockerfile: bad directive, unterminated
    /// heredoc, malformed JSON form, no instructions, invalid UTF-8.
    Syntax,
    /// An instruction is well formed but invalid: unknown instruction or
    /// flag, wrong number of arguments, bad flag value.
    Instruction,
    /// Variable expansion failed: bad substitution, invalid pattern.
    Expansion,
    /// A `${V:?msg}` or `${V?msg}` check failed: `V` must be set for this
    /// build (by a build arg or the base image).
    RequiredVariable,
    /// The stages do not fit together: duplicate names, unknown or cyclic
    /// stage references, unknown target.
    Stage,
    /// A `.dockerignore` pattern is malformed.
    Ignore,
    /// The Dockerfile goes over one of the frontend's bounds
    /// ([`crate::limits`]): its size, its instructions or stages, the
    /// nesting or size of an expansion, the variables in scope.
    Limit,
    /// The file could not be read.
    Io,
}

/// An error from parsing or validating a Dockerfile or `.dockerignore`.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    position: Option<Position>,
    file: Option<PathBuf>,
    io: Option<std::io::Error>,
}

/// The frontend's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            position: None,
            file: None,
            io: None,
        }
    }

    pub(crate) fn at(mut self, position: Position) -> Self {
        self.position = Some(position);
        self
    }

    pub(crate) fn io(path: &Path, err: std::io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            message: format!("cannot read: {err}"),
            position: None,
            file: Some(path.to_path_buf()),
            io: Some(err),
        }
    }

    /// Names the file this error is about; the frontend itself reads only
    /// bytes, so callers that know the path attach it.
    pub fn with_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.file = Some(file.into());
        self
    }

    /// The class of error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without location.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Where in the file the error is, when it is about a place.
    pub fn position(&self) -> Option<Position> {
        self.position
    }

    /// The file, when known.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.as_deref().unwrap_or(Path::new("Dockerfile"));
        match self.position {
            Some(p) => write!(
                f,
                "{}:{}:{}: {}",
                file.display(),
                p.line,
                p.column,
                self.message
            ),
            None => write!(f, "{}: {}", file.display(), self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.io.as_ref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_line_and_column() {
        let e = Error::new(ErrorKind::Syntax, "boom").at(Position { line: 3, column: 7 });
        assert_eq!(e.to_string(), "Dockerfile:3:7: boom");
        let e = e.with_file("app/Dockerfile.dev");
        assert_eq!(e.to_string(), "app/Dockerfile.dev:3:7: boom");
    }
}
