//! Sizes and ages as Docker's commands show them, and sizes as users
//! write them in flags and configuration.

use anyhow::{Context, Result, bail};

/// Docker's sizes: three significant digits, decimal units (`3.81MB`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{v:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[u])
}

/// Parses `10GB`, `500MiB`, `1024` into bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("invalid size {s:?}: unknown unit {other:?}"),
    };
    Ok((n * mult) as u64)
}

/// `3 minutes ago`, as `docker images` shows it.
pub fn ago(secs: u64) -> String {
    let now = strata_cas::now_unix();
    let d = now.saturating_sub(secs);
    let (n, unit) = match d {
        0..=59 => return "Less than a minute ago".into(),
        60..=3599 => (d / 60, "minute"),
        3600..=86_399 => (d / 3600, "hour"),
        86_400..=1_209_599 => (d / 86_400, "day"),
        1_209_600..=5_183_999 => (d / 604_800, "week"),
        5_184_000..=31_535_999 => (d / 2_592_000, "month"),
        _ => (d / 31_536_000, "year"),
    };
    if n == 1 {
        format!(
            "About a{} {unit} ago",
            if unit == "hour" { "n" } else { "" }
        )
    } else {
        format!("{n} {unit}s ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_docker() {
        assert_eq!(human_size(3_810_000), "3.81MB");
        assert_eq!(human_size(586_000_000), "586MB");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_200_000_000), "1.2GB");
        assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert!(parse_size("ten").is_err());
    }
}
