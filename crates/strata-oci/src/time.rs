//! The times image configs carry: RFC 3339 in UTC, whole seconds.

use chrono::{DateTime, SecondsFormat, Utc};

/// `secs` since the Unix epoch as RFC 3339 in UTC (`2017-01-26T16:59:13Z`);
/// a time chrono cannot represent becomes the epoch itself.
pub fn rfc3339(secs: i64) -> String {
    DateTime::<Utc>::from_timestamp(secs, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Seconds since the Unix epoch of an RFC 3339 time (any offset, any
/// fraction, which is dropped); `None` when `s` is not one.
pub fn unix_from_rfc3339(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_whole_seconds_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_485_449_953), "2017-01-26T16:59:13Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn parses_what_images_carry() {
        assert_eq!(
            unix_from_rfc3339("2017-01-26T16:59:13Z"),
            Some(1_485_449_953)
        );
        assert_eq!(
            unix_from_rfc3339("2026-12-04T16:55:04.337654087Z"),
            Some(1_796_403_304)
        );
        assert_eq!(
            unix_from_rfc3339("2017-01-26T18:59:13+02:00"),
            Some(1_485_449_953)
        );
        assert_eq!(unix_from_rfc3339("yesterday"), None);
        assert_eq!(unix_from_rfc3339(""), None);
    }
}
