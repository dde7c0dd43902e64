//! Durations on the command line: a whole number followed by a unit, `2s`, `500ms`, `1m`,
//! `250us`. A bare number is refused, so `--timeout 2` can't silently mean two milliseconds.

use std::time::Duration;

/// Why a duration did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration (expected e.g. `2s` or `500ms`)")]
    Empty,
    #[error("`{0}` has no number (expected e.g. `2s` or `500ms`)")]
    NoNumber(String),
    #[error("`{0}` has no unit (use us, ms, s or m)")]
    NoUnit(String),
    #[error("`{input}`: unknown unit `{unit}` (use us, ms, s or m)")]
    UnknownUnit { input: String, unit: String },
    #[error("`{0}` is too large")]
    Overflow(String),
}

/// Parses `<digits><unit>` with unit `us`, `ms`, `s` or `m`.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(DurationError::NoNumber(input.to_owned()));
    }
    if unit.is_empty() {
        return Err(DurationError::NoUnit(input.to_owned()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| DurationError::Overflow(input.to_owned()))?;
    let overflow = || DurationError::Overflow(input.to_owned());
    match unit {
        "us" => Ok(Duration::from_micros(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(overflow),
        _ => Err(DurationError::UnknownUnit {
            input: input.to_owned(),
            unit: unit.to_owned(),
        }),
    }
}

/// Formats a duration the way [`parse`] reads it, in the largest exact unit.
pub fn format(d: Duration) -> String {
    let us = d.as_micros();
    if us > 0 && us.is_multiple_of(60_000_000) {
        format!("{}m", us / 60_000_000)
    } else if us.is_multiple_of(1_000_000) {
        format!("{}s", us / 1_000_000)
    } else if us.is_multiple_of(1_000) {
        format!("{}ms", us / 1_000)
    } else {
        format!("{us}us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse(" 0s "), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_what_is_ambiguous_or_wrong() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert_eq!(parse("2"), Err(DurationError::NoUnit("2".into())));
        assert_eq!(parse("ms"), Err(DurationError::NoNumber("ms".into())));
        assert!(matches!(
            parse("2h"),
            Err(DurationError::UnknownUnit { unit, .. }) if unit == "h"
        ));
        assert!(matches!(
            parse("1.5s"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(parse("-1s"), Err(DurationError::NoNumber(_))));
        assert!(matches!(
            parse("99999999999999999999s"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn format_round_trips() {
        for s in ["2s", "500ms", "250us", "3m", "0s", "1500ms"] {
            let d = parse(s).expect("valid duration");
            assert_eq!(format(d), s);
            assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
