//! Shell-word processing: quote removal, escapes and `$VAR` expansion, the way
//! BuildKit's `shell.Lex` does it.
//!
//! This is not a shell. It implements exactly the subset of POSIX word
//! expansion that Dockerfile instructions get: `$V`, `${V}`, `${V:-w}`,
//! `${V-w}`, `${V:+w}`, `${V+w}`, `${V:?m}`, `${V?m}`, the pattern forms
//! `${V#p}`, `${V##p}`, `${V%p}`, `${V%%p}`, `${V/p/r}`, `${V//p/r}`, single
//! and double quotes, and the escape token (`\` or `` ` ``). Results match
//! BuildKit's, quirks included, because a Dockerfile must mean the same
//! thing to strata as to `docker build`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use regex::Regex;

use crate::limits::{MAX_EXPANSION_BYTES, MAX_NESTING};
use crate::text::{is_digit, is_letter, is_space};

/// Where variables come from during expansion.
pub trait Env {
    /// The value of `name`, if it is set (an empty value is set).
    fn get(&self, name: &str) -> Option<&str>;
}

impl Env for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        HashMap::get(self, name).map(String::as_str)
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        BTreeMap::get(self, name).map(String::as_str)
    }
}

impl<E: Env + ?Sized> Env for &E {
    fn get(&self, name: &str) -> Option<&str> {
        (**self).get(name)
    }
}

/// An ordered variable list, as an image config holds it (`KEY=value`
/// entries, a later `set` replacing the earlier value in place).
///
/// Names compare exactly on Linux. With [`EnvList::windows`] they compare
/// case-insensitively, as Windows containers treat them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvList {
    vars: Vec<(String, String)>,
    fold_case: bool,
}

impl EnvList {
    /// An empty list with Linux (case-sensitive) names.
    pub fn new() -> Self {
        EnvList::default()
    }

    /// An empty list with Windows (case-insensitive) names.
    pub fn windows() -> Self {
        EnvList {
            vars: Vec::new(),
            fold_case: true,
        }
    }

    /// Builds a list from `KEY=value` strings; an entry without `=` has an
    /// empty value.
    pub fn from_entries<I, S>(entries: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = EnvList::new();
        for e in entries {
            let (k, v) = e.as_ref().split_once('=').unwrap_or((e.as_ref(), ""));
            list.set(k, v);
        }
        list
    }

    fn same(&self, a: &str, b: &str) -> bool {
        if self.fold_case {
            a.to_uppercase() == b.to_uppercase()
        } else {
            a == b
        }
    }

    /// Sets `key`, replacing an existing value in its original place.
    pub fn set(&mut self, key: &str, value: &str) {
        match self.vars.iter().position(|(k, _)| self.same(k, key)) {
            Some(i) => self.vars[i].1 = value.to_string(),
            None => self.vars.push((key.to_string(), value.to_string())),
        }
    }

    /// Removes `key` if present.
    pub fn remove(&mut self, key: &str) {
        let fold = self.fold_case;
        self.vars.retain(|(k, _)| {
            if fold {
                k.to_uppercase() != key.to_uppercase()
            } else {
                k != key
            }
        });
    }

    /// The entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The entries as `KEY=value` strings, the image-config form.
    pub fn to_entries(&self) -> Vec<String> {
        self.vars.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// True when no variable is set.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// The bytes of every name and value.
    pub fn bytes(&self) -> usize {
        self.vars.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

impl Env for EnvList {
    fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .rev()
            .find(|(k, _)| self.same(k, name))
            .map(|(_, v)| v.as_str())
    }
}

/// An environment with nothing set.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEnv;

impl Env for NoEnv {
    fn get(&self, _: &str) -> Option<&str> {
        None
    }
}

/// A failed expansion; the message says what and in which word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExpandError {
    message: String,
    required: bool,
    limit: bool,
}

impl ExpandError {
    /// The message, naming the word that failed.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True when a `${V?msg}` or `${V:?msg}` check failed: the text is well
    /// formed but a variable it requires is unset or empty.
    pub fn is_required_variable(&self) -> bool {
        self.required
    }

    /// True when the word went over a bound of [`crate::limits`]: nested
    /// too deep, or expanding to too much.
    pub fn is_limit(&self) -> bool {
        self.limit
    }
}

/// The result of expanding one word, with the variables it referred to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expansion {
    /// The expanded text.
    pub value: String,
    /// Variables referenced and set.
    pub matched: BTreeSet<String>,
    /// Variables referenced but not set.
    pub unmatched: BTreeSet<String>,
}

/// A configured word processor. Cheap to build; holds no state between calls.
#[derive(Debug, Clone, Copy)]
pub struct Lexer {
    escape: char,
    raw_quotes: bool,
    raw_escapes: bool,
    skip_unset: bool,
    skip_quotes: bool,
}

impl Lexer {
    /// A lexer for the given escape token (`\` or `` ` ``), removing quotes
    /// and escapes and expanding unset variables to the empty string.
    pub fn new(escape: char) -> Self {
        Lexer {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_unset: false,
            skip_quotes: false,
        }
    }

    /// Treat quote characters as ordinary text. Heredoc bodies are expanded
    /// this way: `$VAR`s and escapes apply, quotes stay as written.
    pub fn skip_quotes(mut self, on: bool) -> Self {
        self.skip_quotes = on;
        self
    }

    /// Keep quote characters in the output.
    pub fn raw_quotes(mut self, on: bool) -> Self {
        self.raw_quotes = on;
        self
    }

    /// Keep escape tokens in the output.
    pub fn raw_escapes(mut self, on: bool) -> Self {
        self.raw_escapes = on;
        self
    }

    /// Leave references to unset variables as written instead of expanding
    /// them to the empty string.
    pub fn skip_unset(mut self, on: bool) -> Self {
        self.skip_unset = on;
        self
    }

    /// Expands `word` into one string, keeping inner whitespace.
    pub fn process_word(&self, word: &str, env: &dyn Env) -> Result<String, ExpandError> {
        self.run(word, env, false)
            .map(|(expansion, _)| expansion.value)
    }

    /// Expands `word` and reports which variables it used.
    pub fn process_word_with_matches(
        &self,
        word: &str,
        env: &dyn Env,
    ) -> Result<Expansion, ExpandError> {
        self.run(word, env, true).map(|(expansion, _)| expansion)
    }

    /// Expands `word` and splits the result into words: unquoted whitespace,
    /// including whitespace produced by an unquoted expansion, separates
    /// words; quoted and escaped whitespace does not.
    pub fn process_words(&self, word: &str, env: &dyn Env) -> Result<Vec<String>, ExpandError> {
        self.run(word, env, false).map(|(_, words)| words)
    }

    fn run(
        &self,
        word: &str,
        env: &dyn Env,
        capture: bool,
    ) -> Result<(Expansion, Vec<String>), ExpandError> {
        let mut sw = ShellWord {
            lex: self,
            env,
            src: word,
            pos: 0,
            raw_escapes: self.raw_escapes,
            words_buf: String::new(),
            capture,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
            required_failed: false,
            limit_hit: false,
            depth: 0,
        };
        let raw = sw.raw_escapes;
        match sw.stop_on(None, raw) {
            Ok((value, words)) => Ok((
                Expansion {
                    value,
                    matched: sw.matched,
                    unmatched: sw.unmatched,
                },
                words,
            )),
            Err(e) => Err(ExpandError {
                message: format!("failed to process {}: {}", crate::go_quote(&shown(word)), e),
                required: sw.required_failed,
                limit: sw.limit_hit,
            }),
        }
    }
}

/// Accumulates the words of a `process_words` call.
#[derive(Default)]
struct Words {
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, buf: &mut String, c: char) {
        if is_space(c) {
            if self.in_word && !buf.is_empty() {
                self.words.push(std::mem::take(buf));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(buf, c);
        }
    }

    fn add_raw_char(&mut self, buf: &mut String, c: char) {
        buf.push(c);
        self.in_word = true;
    }

    fn add_str(&mut self, buf: &mut String, s: &str) {
        for c in s.chars() {
            self.add_char(buf, c);
        }
    }

    fn add_raw_str(&mut self, buf: &mut String, s: &str) {
        buf.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self, buf: &mut String) -> Vec<String> {
        if !buf.is_empty() {
            self.words.push(std::mem::take(buf));
        }
        self.words
    }
}

struct ShellWord<'a> {
    lex: &'a Lexer,
    env: &'a dyn Env,
    src: &'a str,
    pos: usize,
    raw_escapes: bool,
    /// The pending word of `process_words`. It is shared by nested scans
    /// (the word inside `${V:-word}`), and each scan clears it when it
    /// starts: BuildKit shares its buffer the same way, so text before a
    /// `${V:-w}` in the same word is dropped from the word list. Keeping the
    /// quirk keeps EXPOSE and heredoc detection identical to BuildKit.
    words_buf: String,
    capture: bool,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
    /// Set when a `${V?}` check is what failed.
    required_failed: bool,
    /// Set when a bound of [`crate::limits`] is what failed.
    limit_hit: bool,
    /// How many scans are open: the word itself, then one per `${...}`
    /// being expanded inside it.
    depth: usize,
}

/// A word as an error message quotes it: at most 80 characters of it.
fn shown(word: &str) -> String {
    match word.char_indices().nth(80) {
        Some((end, _)) => format!("{}...", &word[..end]),
        None => word.to_string(),
    }
}

/// An error when `len` bytes of expansion are over the limit; `hit` is
/// set when it is.
fn check_len(len: usize, hit: &mut bool) -> Result<(), String> {
    if len > MAX_EXPANSION_BYTES {
        *hit = true;
        return Err(format!(
            "the expansion is over the limit of {MAX_EXPANSION_BYTES} bytes"
        ));
    }
    Ok(())
}

impl<'a> ShellWord<'a> {
    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), String> {
        // Each `${...}` inside a word scans its own word, so the nesting
        // of the input is the depth of this recursion: bound it.
        if self.depth >= MAX_NESTING {
            self.limit_hit = true;
            return Err(format!(
                "expansions are nested more than {MAX_NESTING} deep"
            ));
        }
        self.depth += 1;
        let saved = std::mem::replace(&mut self.raw_escapes, raw_escapes);
        let out = self.scan_until(stop);
        self.raw_escapes = saved;
        self.depth -= 1;
        out
    }

    fn scan_until(&mut self, stop: Option<char>) -> Result<(String, Vec<String>), String> {
        let mut result = String::new();
        self.words_buf.clear();
        let mut words = Words::default();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.next();
                return Ok((result, words.finish(&mut self.words_buf)));
            }
            match c {
                '$' => {
                    let s = self.dollar()?;
                    check_len(result.len() + s.len(), &mut self.limit_hit)?;
                    result.push_str(&s);
                    words.add_str(&mut self.words_buf, &s);
                }
                '<' => {
                    let s = self.possible_heredoc();
                    result.push_str(s);
                    words.add_raw_str(&mut self.words_buf, s);
                }
                '\'' if !self.lex.skip_quotes => {
                    let s = self.single_quote()?;
                    result.push_str(&s);
                    words.add_raw_str(&mut self.words_buf, &s);
                }
                '"' if !self.lex.skip_quotes => {
                    let s = self.double_quote()?;
                    result.push_str(&s);
                    words.add_raw_str(&mut self.words_buf, &s);
                }
                _ => {
                    self.next();
                    if c == self.lex.escape {
                        if self.raw_escapes {
                            words.add_raw_char(&mut self.words_buf, c);
                            result.push(c);
                        }
                        // An escape at the very end is dropped.
                        let Some(escaped) = self.next() else { break };
                        words.add_raw_char(&mut self.words_buf, escaped);
                        result.push(escaped);
                    } else {
                        words.add_char(&mut self.words_buf, c);
                        result.push(c);
                    }
                }
            }
        }
        if let Some(stop) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((result, words.finish(&mut self.words_buf)))
    }

    fn single_quote(&mut self) -> Result<String, String> {
        // Everything up to the closing quote is literal; a single quote
        // cannot be escaped inside single quotes.
        let mut out = String::new();
        let open = self.next();
        if self.lex.raw_quotes {
            out.extend(open);
        }
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    );
                }
                Some('\'') => {
                    if self.lex.raw_quotes {
                        out.push('\'');
                    }
                    return Ok(out);
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quote(&mut self) -> Result<String, String> {
        // Inside double quotes only `$` is special, and the escape token
        // escapes just `"`, `$` and itself; before anything else it stays.
        let mut out = String::new();
        let open = self.next();
        if self.lex.raw_quotes {
            out.extend(open);
        }
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    );
                }
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        out.push('"');
                    }
                    return Ok(out);
                }
                Some('$') => {
                    let s = self.dollar()?;
                    check_len(out.len() + s.len(), &mut self.limit_hit)?;
                    out.push_str(&s);
                }
                Some(_) => {
                    let Some(mut c) = self.next() else { continue };
                    if c == self.lex.escape {
                        if self.raw_escapes {
                            out.push(c);
                        }
                        match self.peek() {
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.lex.escape => {
                                self.next();
                                c = n;
                            }
                            Some(_) => {}
                        }
                    }
                    out.push(c);
                }
            }
        }
    }

    fn dollar(&mut self) -> Result<String, String> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset => format!("${name}"),
                None => String::new(),
            });
        }
        self.next();
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            Some(_) => {}
        }
        let name = self.name();
        let Some(c) = self.next() else {
            return Err("syntax error: missing '}'".into());
        };
        match c {
            '}' => Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset => format!("${{{name}}}"),
                None => String::new(),
            }),
            ':' => {
                let op = self.next();
                let mut written = String::from(':');
                written.extend(op);
                self.modifier(&name, op, &written, true)
            }
            '+' | '-' | '?' | '#' | '%' => self.modifier(&name, Some(c), &c.to_string(), false),
            '/' => self.substitute(&name),
            other => Err(format!("unsupported modifier ({other}) in substitution")),
        }
    }

    /// `${name<op>word}` for the operators that take one word.
    fn modifier(
        &mut self,
        name: &str,
        op: Option<char>,
        written: &str,
        null_is_unset: bool,
    ) -> Result<String, String> {
        let pattern_op = matches!(op, Some('#' | '%'));
        if null_is_unset && pattern_op {
            return Err(format!("unsupported modifier ({written}) in substitution"));
        }
        let word = match self.stop_on(Some('}'), pattern_op) {
            Ok((word, _)) => word,
            Err(_) if self.peek().is_none() => return Err("syntax error: missing '}'".into()),
            Err(e) => return Err(e),
        };
        let value = self.get_env(name);
        if self.lex.skip_unset && value.is_none() {
            return Ok(format!("${{{name}{written}{word}}}"));
        }
        let unset_or_null = match &value {
            None => true,
            Some(v) => null_is_unset && v.is_empty(),
        };
        match op {
            Some('-') => Ok(if unset_or_null {
                word
            } else {
                value.unwrap_or_default()
            }),
            Some('+') => Ok(if unset_or_null { String::new() } else { word }),
            Some('?') if unset_or_null => {
                self.required_failed = true;
                match value {
                    None => Err(format!(
                        "{name}: {}",
                        if word.is_empty() {
                            "is not allowed to be unset"
                        } else {
                            &word
                        }
                    )),
                    Some(_) => Err(format!(
                        "{name}: {}",
                        if word.is_empty() {
                            "is not allowed to be empty"
                        } else {
                            &word
                        }
                    )),
                }
            }
            Some('?') => Ok(value.unwrap_or_default()),
            Some(c @ ('#' | '%')) => {
                let (greedy, pattern) = match word.strip_prefix(c) {
                    Some(rest) => (true, rest),
                    None => (false, word.as_str()),
                };
                let value = value.unwrap_or_default();
                if c == '%' {
                    trim_suffix(pattern, &value, greedy)
                } else {
                    trim_prefix(pattern, &value, greedy)
                }
            }
            _ => Err(format!("unsupported modifier ({written}) in substitution")),
        }
    }

    /// `${name/pattern/replacement}` and `${name//pattern/replacement}`.
    fn substitute(&mut self, name: &str) -> Result<String, String> {
        let all = self.peek() == Some('/');
        if all {
            self.next();
        }
        let pattern = match self.stop_on(Some('/'), true) {
            Ok((p, _)) => p,
            Err(_) if self.peek().is_none() => {
                return Err("syntax error: missing '/' in ${}".into());
            }
            Err(e) => return Err(e),
        };
        let replacement = match self.stop_on(Some('}'), true) {
            Ok((r, _)) => r,
            Err(_) if self.peek().is_none() => return Err("syntax error: missing '}'".into()),
            Err(e) => return Err(e),
        };
        let Some(value) = self.get_env(name) else {
            if self.lex.skip_unset {
                return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
            }
            return substitute_in(&pattern, &replacement, "", all, &mut self.limit_hit);
        };
        substitute_in(&pattern, &replacement, &value, all, &mut self.limit_hit)
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && is_digit(c) {
                while let Some(d) = self.peek().filter(|&d| is_digit(d)) {
                    self.next();
                    name.push(d);
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return c.to_string();
            }
            if !is_letter(c) && !is_digit(c) && c != '_' {
                break;
            }
            self.next();
            name.push(c);
        }
        name
    }

    /// `<` is literal, but `<<` followed by blanks stays together with the
    /// blanks, so `<< EOF` is one word for heredoc detection.
    fn possible_heredoc(&mut self) -> &'a str {
        let start = self.pos;
        self.next();
        if self.peek() == Some('<') {
            self.next();
            while matches!(self.peek(), Some(' ' | '\t' | '\r')) {
                self.next();
            }
        }
        &self.src[start..self.pos]
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        let v = self.env.get(name).map(str::to_owned);
        if self.capture {
            if v.is_some() {
                self.matched.insert(name.to_owned());
            } else {
                self.unmatched.insert(name.to_owned());
            }
        }
        v
    }
}

fn substitute_in(
    pattern: &str,
    replacement: &str,
    value: &str,
    all: bool,
    limit_hit: &mut bool,
) -> Result<String, String> {
    let re = shell_pattern_regex(pattern, true, false)
        .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
    // What replacing every match could make, before making it: `$0` in a
    // replacement stands for the whole match, so it may add the value.
    let matches = if all { re.find_iter(value).count() } else { 1 };
    let per_match = replacement.len()
        + if replacement.contains('$') {
            value.len()
        } else {
            0
        };
    check_len(
        value
            .len()
            .saturating_add(matches.saturating_mul(per_match)),
        limit_hit,
    )?;
    if all {
        return Ok(re.replace_all(value, replacement).into_owned());
    }
    Ok(match re.find(value) {
        Some(m) => format!(
            "{}{}{}",
            &value[..m.start()],
            replacement,
            &value[m.end()..]
        ),
        None => value.to_string(),
    })
}

/// Converts a shell wildcard pattern (`*`, `?`, `\` escapes, no brackets)
/// into a regular expression.
fn shell_pattern_regex(pattern: &str, greedy: bool, anchored: bool) -> Result<Regex, String> {
    let mut out = String::with_capacity(pattern.len() + 4);
    if anchored {
        out.push('^');
    }
    let star = if greedy { ".*" } else { ".*?" };
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push_str(star),
            '?' => out.push('.'),
            '\\' => {
                // `\}` and `\/` only protect the `${}` syntax; they are not
                // part of the pattern.
                if matches!(chars.peek(), Some('}' | '/')) {
                    continue;
                }
                match chars.next() {
                    Some(e @ ('*' | '?' | '\\')) => {
                        out.push('\\');
                        out.push(e);
                    }
                    Some(e) => return Err(format!("invalid escape '\\{e}'")),
                    None => return Err("invalid escape at end of pattern".into()),
                }
            }
            '[' | ']' | '{' | '}' | '.' | '+' | '(' | ')' | '|' | '^' | '$' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    Regex::new(&out).map_err(|e| e.to_string())
}

fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Result<String, String> {
    let re = shell_pattern_regex(pattern, greedy, true)
        .map_err(|e| format!("invalid pattern ({pattern}) in substitution: {e}"))?;
    Ok(match re.find(value) {
        Some(m) => value[m.end()..].to_string(),
        None => value.to_string(),
    })
}

/// Regular expressions find the leftmost match, so the shortest or longest
/// suffix is found by reversing both the value and the pattern (keeping each
/// `\x` escape pair in order).
fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Result<String, String> {
    let reversed: String = value.chars().rev().collect();
    let trimmed = trim_prefix(&reverse_pattern(pattern), &reversed, greedy)?;
    Ok(trimmed.chars().rev().collect())
}

fn reverse_pattern(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = vec!['\0'; chars.len()];
    let last = chars.len().saturating_sub(1);
    let mut i = 0;
    while i < chars.len() {
        let at = last - i;
        if chars[i] == '\\' && i != last {
            out[at - 1] = '\\';
            out[at] = chars[i + 1];
            i += 2;
        } else {
            out[at] = chars[i];
            i += 1;
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> EnvList {
        let mut e = EnvList::new();
        for (k, v) in pairs {
            e.set(k, v);
        }
        e
    }

    fn word(s: &str, e: &EnvList) -> Result<String, ExpandError> {
        Lexer::new('\\').process_word(s, e)
    }

    #[test]
    fn pattern_operators() {
        let e = env(&[("V", "foo.tar.gz"), ("P", "/a/b/c")]);
        assert_eq!(word("${V%.*}", &e).unwrap(), "foo.tar");
        assert_eq!(word("${V%%.*}", &e).unwrap(), "foo");
        assert_eq!(word("${V#*.}", &e).unwrap(), "tar.gz");
        assert_eq!(word("${V##*.}", &e).unwrap(), "gz");
        assert_eq!(word("${P/\\//-}", &e).unwrap(), "-a/b/c");
        assert_eq!(word("${P//\\//-}", &e).unwrap(), "-a-b-c");
        assert_eq!(word("${V/tar/zip}", &e).unwrap(), "foo.zip.gz");
        assert_eq!(word("${V/x*/y}", &e).unwrap(), "foo.tar.gz");
        assert!(word("${V:#x}", &e).is_err());
        assert!(word("${V/\\q/x}", &e).is_err());
    }

    #[test]
    fn reverse_pattern_keeps_escapes() {
        assert_eq!(reverse_pattern("a\\*c"), "c\\*a");
        assert_eq!(reverse_pattern(""), "");
        assert_eq!(reverse_pattern("\\"), "\\");
    }

    #[test]
    fn matches_are_reported() {
        let e = env(&[("A", "1")]);
        let x = Lexer::new('\\')
            .process_word_with_matches("$A ${B:-x}", &e)
            .unwrap();
        assert_eq!(x.value, "1 x");
        assert!(x.matched.contains("A"));
        assert!(x.unmatched.contains("B"));
    }

    #[test]
    fn skip_unset_keeps_references() {
        let lex = Lexer::new('\\').skip_unset(true);
        let e = env(&[]);
        assert_eq!(
            lex.process_word("$A ${B} ${C:-d}", &e).unwrap(),
            "$A ${B} ${C:-d}"
        );
    }

    #[test]
    fn nested_modifier_drops_pending_word_like_buildkit() {
        let e = env(&[]);
        let words = Lexer::new('\\').process_words("pre${X:-a} b", &e).unwrap();
        assert_eq!(words, ["a", "b"]);
    }

    #[test]
    fn windows_names_fold_case() {
        let mut e = EnvList::windows();
        e.set("Path", "C:\\");
        assert_eq!(word("$PATH", &e).unwrap(), "C:\\");
        let mut u = EnvList::new();
        u.set("Path", "x");
        assert_eq!(word("$PATH", &u).unwrap(), "");
    }

    #[test]
    fn env_list_replaces_in_place() {
        let mut e = EnvList::from_entries(["A=1", "B=2"]);
        e.set("A", "3");
        assert_eq!(e.to_entries(), ["A=3", "B=2"]);
        e.remove("A");
        assert_eq!(e.to_entries(), ["B=2"]);
    }
}
