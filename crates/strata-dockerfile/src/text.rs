//! Character classes and trimming with Go's semantics.
//!
//! BuildKit's parser is written in Go, and the exact characters it treats as
//! whitespace, letters or digits decide how a Dockerfile splits into words.
//! These helpers pin those definitions in one place.

use unicode_general_category::{GeneralCategory, get_general_category};

/// Go's `unicode.IsSpace`: the Unicode `White_Space` property, which is also
/// what Rust's `char::is_whitespace` implements.
pub(crate) fn is_space(c: char) -> bool {
    c.is_whitespace()
}

/// Go's `unicode.IsLetter`: general category L.
pub(crate) fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    matches!(
        get_general_category(c),
        GeneralCategory::UppercaseLetter
            | GeneralCategory::LowercaseLetter
            | GeneralCategory::TitlecaseLetter
            | GeneralCategory::ModifierLetter
            | GeneralCategory::OtherLetter
    )
}

/// Go's `unicode.IsDigit`: general category Nd.
pub(crate) fn is_digit(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    get_general_category(c) == GeneralCategory::DecimalNumber
}

/// Go's `strings.TrimSpace`.
pub(crate) fn trim_space(s: &str) -> &str {
    s.trim_matches(is_space)
}

/// Go's `strings.TrimLeftFunc(s, unicode.IsSpace)`.
pub(crate) fn trim_left_space(s: &str) -> &str {
    s.trim_start_matches(is_space)
}

/// Splits at runs of `[\t\v\f\r ]`, like Go's `regexp.Split(s, n)` with the
/// pattern BuildKit uses for whitespace-delimited arguments. `limit` of
/// `None` splits everywhere; `Some(2)` splits once.
pub(crate) fn split_blank_runs(s: &str, limit: Option<usize>) -> Vec<&str> {
    let is_blank = |c: char| matches!(c, '\t' | '\x0b' | '\x0c' | '\r' | ' ');
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        if limit.is_some_and(|n| out.len() + 1 >= n) {
            out.push(rest);
            return out;
        }
        match rest.find(is_blank) {
            Some(start) => {
                let run = rest[start..]
                    .find(|c: char| !is_blank(c))
                    .map_or(rest.len(), |n| start + n);
                out.push(&rest[..start]);
                rest = &rest[run..];
            }
            None => {
                out.push(rest);
                return out;
            }
        }
    }
}

/// Go's `strconv.Quote` for a valid UTF-8 string: printable characters
/// (categories L, M, N, P, S and the ASCII space) stay literal, the rest is
/// escaped. BuildKit's parse-tree dump is defined in these terms.
pub fn go_quote(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if is_printable(c) => out.push(c),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x0b' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

/// Go's `unicode.IsPrint`.
fn is_printable(c: char) -> bool {
    if c.is_ascii() {
        return (' '..='~').contains(&c);
    }
    use GeneralCategory as G;
    matches!(
        get_general_category(c),
        G::UppercaseLetter
            | G::LowercaseLetter
            | G::TitlecaseLetter
            | G::ModifierLetter
            | G::OtherLetter
            | G::NonspacingMark
            | G::SpacingMark
            | G::EnclosingMark
            | G::DecimalNumber
            | G::LetterNumber
            | G::OtherNumber
            | G::ConnectorPunctuation
            | G::DashPunctuation
            | G::OpenPunctuation
            | G::ClosePunctuation
            | G::InitialPunctuation
            | G::FinalPunctuation
            | G::OtherPunctuation
            | G::MathSymbol
            | G::CurrencySymbol
            | G::ModifierSymbol
            | G::OtherSymbol
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_matches_go() {
        assert_eq!(go_quote("foo"), r#""foo""#);
        assert_eq!(go_quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(go_quote("\u{0}\t\n\x7f"), r#""\x00\t\n\x7f""#);
        assert_eq!(go_quote("♥ 한"), "\"♥ 한\"");
        assert_eq!(go_quote("\u{a0}"), r#""\u00a0""#);
        assert_eq!(go_quote("\u{e0001}"), r#""\U000e0001""#);
    }

    #[test]
    fn split_blank_runs_like_go_regexp_split() {
        assert_eq!(split_blank_runs("a  b\tc", None), ["a", "b", "c"]);
        assert_eq!(split_blank_runs("a  b c", Some(2)), ["a", "b c"]);
        assert_eq!(split_blank_runs("", None), [""]);
        assert_eq!(split_blank_runs("a ", None), ["a", ""]);
        assert_eq!(split_blank_runs("abc", Some(2)), ["abc"]);
        assert_eq!(split_blank_runs("a\nb", None), ["a\nb"]);
    }

    #[test]
    fn go_character_classes() {
        assert!(is_letter('é') && is_letter('한') && !is_letter('_'));
        assert!(is_digit('٣') && !is_digit('Ⅻ'));
        assert_eq!(trim_space("\u{85} a \u{a0}"), "a");
    }
}
