//! Instruction flags (`--from=…`, `--link`, `--mount=…`): which ones each
//! instruction accepts and how their values are read.

use std::time::Duration;

/// How a flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlagKind {
    /// `--link` or `--link=true|false`.
    Bool,
    /// `--from=x`, at most once.
    String,
    /// `--mount=…`, any number of times.
    Strings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Bool(bool),
    String(String),
    Strings(Vec<String>),
}

/// The flags of one instruction after checking them against its spec.
/// Instructions have a handful of flags at most, so a list beats a map.
#[derive(Debug, Default)]
pub(crate) struct Flags {
    values: Vec<(&'static str, Value)>,
}

/// A flag error with the text to point at.
#[derive(Debug)]
pub(crate) struct FlagError {
    pub message: String,
    pub needle: String,
}

impl Flags {
    /// Checks `args` (each `--name[=value]`) against `spec`.
    pub(crate) fn parse(
        args: &[String],
        spec: &[(&'static str, FlagKind)],
    ) -> Result<Flags, FlagError> {
        let mut flags = Flags::default();
        for arg in args {
            if arg == "--" {
                // POSIX: `--` ends the options.
                break;
            }
            let err = |message: String| FlagError {
                message,
                needle: arg.clone(),
            };
            let Some(body) = arg.strip_prefix("--") else {
                return Err(err(format!("arg should start with -- : {arg}")));
            };
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let Some(&(name, kind)) = spec.iter().find(|(n, _)| *n == name) else {
                let names: Vec<&str> = spec.iter().map(|(n, _)| *n).collect();
                let hint = crate::suggest(name, &names)
                    .map(|s| format!(" (did you mean --{s}?)"))
                    .unwrap_or_default();
                return Err(err(format!("unknown flag: --{name}{hint}")));
            };
            let existing = flags.values.iter().position(|(n, _)| *n == name);
            if kind != FlagKind::Strings && existing.is_some() {
                return Err(err(format!("duplicate flag specified: --{name}")));
            }
            let value = match (kind, value) {
                (FlagKind::Bool, Some("")) => {
                    return Err(err(format!("missing a value on flag: --{name}")));
                }
                (FlagKind::Bool, None) => Value::Bool(true),
                (FlagKind::Bool, Some(v)) => match v.to_ascii_lowercase().as_str() {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    _ => {
                        return Err(err(format!(
                            "expecting boolean value for flag --{name}, not: {v}"
                        )));
                    }
                },
                (_, None) => return Err(err(format!("missing a value on flag: --{name}"))),
                (FlagKind::String, Some(v)) => Value::String(v.to_string()),
                (FlagKind::Strings, Some(v)) => {
                    if let Some(i) = existing
                        && let (_, Value::Strings(all)) = &mut flags.values[i]
                    {
                        all.push(v.to_string());
                        continue;
                    }
                    Value::Strings(vec![v.to_string()])
                }
            };
            flags.values.push((name, value));
        }
        Ok(flags)
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.values.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    pub(crate) fn bool(&self, name: &str) -> bool {
        matches!(self.get(name), Some(Value::Bool(true)))
    }

    /// `Some(b)` only when the flag was given.
    pub(crate) fn opt_bool(&self, name: &str) -> Option<bool> {
        match self.get(name) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub(crate) fn string(&self, name: &str) -> Option<String> {
        match self.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    pub(crate) fn strings(&self, name: &str) -> Vec<String> {
        match self.get(name) {
            Some(Value::Strings(v)) => v.clone(),
            _ => Vec::new(),
        }
    }
}

/// Parses a duration the way Go's `time.ParseDuration` does (`1m30s`,
/// `1.5h`, `300ms`, `-2s`), returning nanoseconds.
pub fn parse_go_duration(s: &str) -> Result<i64, String> {
    let invalid = || format!("time: invalid duration {}", crate::go_quote(s));
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.bytes().take_while(u8::is_ascii_digit).count();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(invalid());
        }
        let unit_len = after
            .char_indices()
            .find(|&(_, c)| c == '.' || c.is_ascii_digit())
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => {
                return Err(format!(
                    "time: missing unit in duration {}",
                    crate::go_quote(s)
                ));
            }
            u => {
                return Err(format!(
                    "time: unknown unit {} in duration {}",
                    crate::go_quote(u),
                    crate::go_quote(s)
                ));
            }
        };
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| invalid())?
        };
        let mut part = whole.checked_mul(scale).ok_or_else(invalid)?;
        // Fractions keep nanosecond precision, truncating beyond it.
        let mut unit_frac = scale;
        for d in frac.bytes().take(30) {
            unit_frac /= 10;
            part += u128::from(d - b'0') * unit_frac;
        }
        total = total.checked_add(part).ok_or_else(invalid)?;
        if total > i64::MAX as u128 {
            return Err(invalid());
        }
        rest = after;
    }
    let total = total as i64;
    Ok(if neg { -total } else { total })
}

/// A HEALTHCHECK interval option: empty is unset (0), anything else must be
/// at least one millisecond.
pub(crate) fn parse_interval(flag: &str, value: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let nanos = parse_go_duration(value)?;
    if nanos == 0 {
        return Ok(None);
    }
    if nanos < 1_000_000 {
        return Err(format!("Interval \"{flag}\" cannot be less than 1ms"));
    }
    Ok(Some(Duration::from_nanos(nanos as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &[(&str, FlagKind)] = &[
        ("from", FlagKind::String),
        ("link", FlagKind::Bool),
        ("exclude", FlagKind::Strings),
    ];

    fn parse(args: &[&str]) -> Result<Flags, FlagError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Flags::parse(&args, SPEC)
    }

    #[test]
    fn reads_each_kind() {
        let f = parse(&["--from=a", "--link", "--exclude=x", "--exclude=y"]).unwrap();
        assert_eq!(f.string("from").as_deref(), Some("a"));
        assert!(f.bool("link"));
        assert_eq!(f.strings("exclude"), ["x", "y"]);
        assert!(!parse(&["--link=FALSE"]).unwrap().bool("link"));
        assert_eq!(
            parse(&["--link=false"]).unwrap().opt_bool("link"),
            Some(false)
        );
        assert!(parse(&["--", "--bogus"]).is_ok());
    }

    #[test]
    fn rejects_bad_flags() {
        let msg = |a: &[&str]| parse(a).err().map(|e| e.message).unwrap_or_default();
        assert_eq!(
            msg(&["--form=a"]),
            "unknown flag: --form (did you mean --from?)"
        );
        assert_eq!(
            msg(&["--from=a", "--from=b"]),
            "duplicate flag specified: --from"
        );
        assert_eq!(msg(&["--from"]), "missing a value on flag: --from");
        assert_eq!(msg(&["--link="]), "missing a value on flag: --link");
        assert_eq!(
            msg(&["--link=yes"]),
            "expecting boolean value for flag --link, not: yes"
        );
        assert_eq!(msg(&["-x"]), "arg should start with -- : -x");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1m30s"), Ok(90_000_000_000));
        assert_eq!(parse_go_duration("1.5h"), Ok(5_400_000_000_000));
        assert_eq!(parse_go_duration("300ms"), Ok(300_000_000));
        assert_eq!(parse_go_duration("-2s"), Ok(-2_000_000_000));
        assert_eq!(parse_go_duration(".5s"), Ok(500_000_000));
        assert_eq!(parse_go_duration("1µs"), Ok(1_000));
        assert_eq!(parse_go_duration("0"), Ok(0));
        assert!(parse_go_duration("5").unwrap_err().contains("missing unit"));
        assert!(
            parse_go_duration("5x")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration("99999999999h").is_err());
        assert!(parse_interval("interval", Some("10us")).is_err());
        assert_eq!(parse_interval("interval", Some("0s")), Ok(None));
        assert_eq!(
            parse_interval("interval", Some("5s")),
            Ok(Some(Duration::from_secs(5)))
        );
    }
}
