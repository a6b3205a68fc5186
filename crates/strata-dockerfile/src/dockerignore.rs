//! `.dockerignore`: which context paths a build may not see.
//!
//! The matching rules are Docker's (moby/patternmatcher), not gitignore's:
//! `*` and `?` stay within a path component, `**` crosses components, a
//! pattern also excludes everything under a directory it matches, later
//! `!pattern` lines re-include, and patterns are cleaned like paths.
//! `globset` implements other `**` rules (it rejects `a**` and treats
//! `**` inside a component as `*`), so the translation to a regular
//! expression is done here, with the `regex` crate doing the matching.

use regex::Regex;

use crate::error::{Error, ErrorKind, Result};

/// A compiled list of ignore patterns.
#[derive(Debug, Clone, Default)]
pub struct IgnoreMatcher {
    patterns: Vec<Pattern>,
    has_exclusions: bool,
}

#[derive(Debug, Clone)]
struct Pattern {
    text: String,
    exclusion: bool,
    kind: MatchKind,
}

#[derive(Debug, Clone)]
enum MatchKind {
    Exact,
    /// `dir/**`: the text before the trailing `**`.
    Prefix(String),
    /// `**/name`: the text after the leading `**`.
    Suffix(String),
    Regex(Regex),
}

impl IgnoreMatcher {
    /// Reads a `.dockerignore` file's bytes and compiles its patterns.
    pub fn from_dockerignore(bytes: &[u8]) -> Result<IgnoreMatcher> {
        IgnoreMatcher::new(&read_patterns(bytes))
    }

    /// Compiles patterns (each optionally prefixed with `!`).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<IgnoreMatcher> {
        let mut m = IgnoreMatcher::default();
        for p in patterns {
            let p = p.as_ref().trim();
            if p.is_empty() {
                continue;
            }
            let p = clean_path(p);
            let (exclusion, body) = match p.strip_prefix('!') {
                Some("") => {
                    return Err(Error::new(
                        ErrorKind::Ignore,
                        "illegal exclusion pattern: \"!\"",
                    ));
                }
                Some(rest) => (true, rest.to_string()),
                None => (false, p),
            };
            validate(&body).map_err(|e| {
                Error::new(
                    ErrorKind::Ignore,
                    format!("invalid pattern {}: {e}", crate::go_quote(&body)),
                )
            })?;
            let kind = compile(&body).map_err(|e| {
                Error::new(
                    ErrorKind::Ignore,
                    format!("invalid pattern {}: {e}", crate::go_quote(&body)),
                )
            })?;
            m.has_exclusions |= exclusion;
            m.patterns.push(Pattern {
                text: body,
                exclusion,
                kind,
            });
        }
        Ok(m)
    }

    /// True when some pattern starts with `!`: then an excluded directory
    /// may still hold included files and must be walked.
    pub fn has_exclusions(&self) -> bool {
        self.has_exclusions
    }

    /// Whether a directory that [`IgnoreMatcher::matches`] may still hold
    /// re-included paths: some `!pattern` starts with the directory's path.
    /// Docker's context walker (fsutil) descends into an ignored directory
    /// only then, and sends the directory itself when it does.
    pub fn may_include_below(&self, dir: &str) -> bool {
        let prefix = format!("{}/", clean_path(dir));
        self.patterns
            .iter()
            .any(|p| p.exclusion && format!("{}/", p.text).starts_with(&prefix))
    }

    /// True when there are no patterns at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The cleaned patterns, `!` included, in order.
    pub fn patterns(&self) -> impl Iterator<Item = String> + '_ {
        self.patterns.iter().map(|p| {
            if p.exclusion {
                format!("!{}", p.text)
            } else {
                p.text.clone()
            }
        })
    }

    /// Whether `path` (slash-separated, relative to the context) is
    /// ignored: the last pattern that matches it or one of its parent
    /// directories decides.
    pub fn matches(&self, path: &str) -> bool {
        let path = clean_path(path);
        if path == "." {
            return false;
        }
        let parents: Vec<&str> = match path.rfind('/') {
            Some(i) => path[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for p in &self.patterns {
            if p.exclusion != matched {
                continue;
            }
            let mut hit = p.matches(&path);
            if !hit {
                let mut prefix = String::new();
                for (i, dir) in parents.iter().enumerate() {
                    if i > 0 {
                        prefix.push('/');
                    }
                    prefix.push_str(dir);
                    if p.matches(&prefix) {
                        hit = true;
                        break;
                    }
                }
            }
            if hit {
                matched = !p.exclusion;
            }
        }
        matched
    }
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            MatchKind::Exact => path == self.text,
            MatchKind::Prefix(prefix) => path.starts_with(prefix.as_str()),
            MatchKind::Suffix(suffix) => {
                path.ends_with(suffix.as_str())
                    || suffix.strip_prefix('/').is_some_and(|s| path == s)
            }
            MatchKind::Regex(re) => re.is_match(path),
        }
    }
}

/// Reads the lines of a `.dockerignore`: `#` comments (only at the very
/// start of a line), surrounding whitespace trimmed, paths cleaned, and a
/// leading `/` dropped, so `/a` and `a` are the same pattern.
pub fn read_patterns(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut p = line.trim();
        if p.is_empty() {
            continue;
        }
        let invert = p.starts_with('!');
        if invert {
            p = p[1..].trim();
        }
        let mut cleaned = if p.is_empty() {
            String::new()
        } else {
            clean_path(p)
        };
        if cleaned.len() > 1 && cleaned.starts_with('/') {
            cleaned.remove(0);
        }
        out.push(if invert {
            format!("!{cleaned}")
        } else {
            cleaned
        });
    }
    out
}

/// Go's `path.Clean`: the shortest equivalent slash path.
pub fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// The syntax checks of Go's `filepath.Match`: well-formed `[...]` classes
/// and no trailing `\`.
fn validate(p: &str) -> std::result::Result<(), &'static str> {
    const BAD: &str = "syntax error in pattern";
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next().ok_or(BAD)?;
            }
            '[' => {
                if chars.peek() == Some(&'^') {
                    chars.next();
                }
                let mut ranges = 0;
                loop {
                    if chars.peek() == Some(&']') && ranges > 0 {
                        chars.next();
                        break;
                    }
                    class_char(&mut chars).ok_or(BAD)?;
                    if chars.peek() == Some(&'-') {
                        chars.next();
                        class_char(&mut chars).ok_or(BAD)?;
                    }
                    ranges += 1;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// One (possibly escaped) character of a class; it may not be `-` or `]`,
/// and something must follow it.
fn class_char(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<()> {
    let c = chars.next()?;
    if c == '-' || c == ']' {
        return None;
    }
    if c == '\\' {
        chars.next()?;
    }
    chars.peek().map(|_| ())
}

fn compile(p: &str) -> std::result::Result<MatchKind, regex::Error> {
    #[derive(PartialEq)]
    enum Kind {
        Exact,
        Prefix,
        Suffix,
        Regex,
    }
    let mut re = String::from("^");
    let mut kind = Kind::Exact;
    let mut chars = p.chars().peekable();
    let mut first = true;
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                // `**/` is treated as `**`.
                if chars.peek() == Some(&'/') {
                    chars.next();
                }
                if chars.peek().is_none() {
                    if kind == Kind::Exact {
                        kind = Kind::Prefix;
                    } else {
                        re.push_str(".*");
                        kind = Kind::Regex;
                    }
                } else {
                    re.push_str("(.*/)?");
                    kind = Kind::Regex;
                }
                if first {
                    kind = Kind::Suffix;
                }
            }
            '*' => {
                re.push_str("[^/]*");
                kind = Kind::Regex;
            }
            '?' => {
                re.push_str("[^/]");
                kind = Kind::Regex;
            }
            '.' | '+' | '(' | ')' | '|' | '{' | '}' | '$' => {
                re.push('\\');
                re.push(c);
            }
            '\\' => match chars.next() {
                Some(n) => {
                    re.push('\\');
                    re.push(n);
                    kind = Kind::Regex;
                }
                None => re.push_str("\\\\"),
            },
            '[' | ']' => {
                re.push(c);
                kind = Kind::Regex;
            }
            c => re.push(c),
        }
        first = false;
    }
    Ok(match kind {
        Kind::Exact => MatchKind::Exact,
        Kind::Prefix => MatchKind::Prefix(p[..p.len() - 2].to_string()),
        Kind::Suffix => MatchKind::Suffix(p[2..].to_string()),
        Kind::Regex => {
            re.push('$');
            MatchKind::Regex(Regex::new(&re)?)
        }
    })
}

#[cfg(test)]
mod tests;
