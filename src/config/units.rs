//! Parsing of the unit-bearing values in the policy file: durations (`30s`, `5m`, `500ms`),
//! sizes (`25MiB`, `10MB`, bare bytes) and rates (`60/min`).
//!
//! Owns only the text → number step and its error messages; which values are allowed where
//! (zero, ranges) is decided by the compiler in `mod.rs`. Overflow is an error, never a panic.

use std::time::Duration;

use super::Rate;

/// Why a duration, size or rate could not be parsed. The `Display` text is what the operator
/// reads after the key, so it quotes the value and gives an example of the right form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not of the form `<integer><unit>` with a known duration unit.
    #[error("{0:?} is not a duration (use e.g. 30s, 5m, 1h, 5d)")]
    NotDuration(String),
    /// Not a byte count or `<integer><unit>` with a known size unit.
    #[error("{0:?} is not a size (use e.g. 1048576, 512KiB, 25MiB, 1GiB, 10MB)")]
    NotSize(String),
    /// Not of the form `N/s`, `N/min` or `N/hour` with N ≥ 1.
    #[error("{0:?} is not a rate (use e.g. 10/s, 60/min, 600/hour; the count must be at least 1)")]
    NotRate(String),
    /// Well formed but too large to represent.
    #[error("{0:?} is too large")]
    Overflow(String),
    /// A size written as a negative TOML integer.
    #[error("{0} is negative")]
    Negative(i64),
}

/// Splits `"25MiB"` into `("25", "MiB")`, allowing blanks between number and unit.
fn split_number(text: &str) -> Option<(&str, &str)> {
    let text = text.trim();
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if end == 0 {
        return None;
    }
    Some((&text[..end], text[end..].trim_start()))
}

/// Parses an unsigned decimal that `split_number` found; `None` means it overflowed.
fn parse_digits(digits: &str) -> Option<u64> {
    digits.parse::<u64>().ok()
}

/// Parses a duration: an integer followed by `ms`, `s`, `m`, `h` or `d` (case-insensitive),
/// e.g. `500ms`, `30s`, `5m`, `1h`, `5d`, `0s`. A unit is required: a bare `30` is ambiguous.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let bad = || UnitError::NotDuration(text.to_owned());
    let overflow = || UnitError::Overflow(text.to_owned());
    let (digits, unit) = split_number(text).ok_or_else(bad)?;
    let millis_per_unit: u64 = match unit.to_ascii_lowercase().as_str() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let n = parse_digits(digits).ok_or_else(overflow)?;
    let millis = n.checked_mul(millis_per_unit).ok_or_else(overflow)?;
    Ok(Duration::from_millis(millis))
}

/// Parses a size in bytes from a string: a bare integer (bytes), or an integer followed by
/// `B`, `KiB`/`MiB`/`GiB`/`TiB` (1024-based) or `KB`/`MB`/`GB`/`TB` (1000-based); the suffix
/// is case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::NotSize(text.to_owned());
    let overflow = || UnitError::Overflow(text.to_owned());
    let (digits, unit) = split_number(text).ok_or_else(bad)?;
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let n = parse_digits(digits).ok_or_else(overflow)?;
    n.checked_mul(multiplier).ok_or_else(overflow)
}

/// Parses a rate `N/s`, `N/min` or `N/hour` (unit case-insensitive) with `1 ≤ N ≤ u32::MAX`.
pub fn parse_rate(text: &str) -> Result<Rate, UnitError> {
    let bad = || UnitError::NotRate(text.to_owned());
    let (count, per) = text.split_once('/').ok_or_else(bad)?;
    let count = count.trim();
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let count: u32 = count
        .parse()
        .map_err(|_| UnitError::Overflow(text.to_owned()))?;
    if count == 0 {
        return Err(bad());
    }
    let per = match per.trim().to_ascii_lowercase().as_str() {
        "s" => Duration::from_secs(1),
        "min" => Duration::from_secs(60),
        "hour" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    Ok(Rate { count, per })
}

/// Formats a duration the way the policy file writes it (`90s`, `5m`, `500ms`), for the
/// summary.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    for (unit, per) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// Formats a byte count with the largest binary unit that divides it exactly (`25MiB`).
pub fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_owned();
    }
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// Formats a rate as the policy file writes it (`60/min`).
pub fn format_rate(rate: Rate) -> String {
    let per = match rate.per.as_secs() {
        1 => "s".to_owned(),
        60 => "min".to_owned(),
        3600 => "hour".to_owned(),
        _ => format_duration(rate.per),
    };
    format!("{}/{per}", rate.count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let good: &[(&str, u64)] = &[
            ("0s", 0),
            ("500ms", 500),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("5d", 432_000_000),
            ("5M", 300_000),
            ("10 s", 10_000),
        ];
        for (text, ms) in good {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(*ms)),
                "{text}"
            );
        }
        let bad = [
            "",
            "5",
            "5 minutes",
            "m5",
            "-1s",
            "1.5h",
            "5w",
            "s",
            "1h30m",
        ];
        for text in bad {
            assert_eq!(
                parse_duration(text),
                Err(UnitError::NotDuration(text.to_owned())),
                "{text}"
            );
        }
        for text in ["99999999999999999999s", "18446744073709551615d"] {
            assert_eq!(
                parse_duration(text),
                Err(UnitError::Overflow(text.to_owned())),
                "{text}"
            );
        }
    }

    #[test]
    fn duration_message_names_the_forms() {
        let err = parse_duration("5 minutes").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#""5 minutes" is not a duration (use e.g. 30s, 5m, 1h, 5d)"#
        );
    }

    #[test]
    fn sizes() {
        let good: &[(&str, u64)] = &[
            ("0", 0),
            ("1024", 1024),
            ("100B", 100),
            ("512KiB", 512 * 1024),
            ("25MiB", 25 << 20),
            ("25mib", 25 << 20),
            ("1GiB", 1 << 30),
            ("10KB", 10_000),
            ("10MB", 10_000_000),
            ("1gb", 1_000_000_000),
            ("2 MiB", 2 << 20),
        ];
        for (text, bytes) in good {
            assert_eq!(parse_size(text), Ok(*bytes), "{text}");
        }
        for text in ["", "MiB", "25 megabytes", "-5", "1.5MiB", "25Mi"] {
            assert_eq!(
                parse_size(text),
                Err(UnitError::NotSize(text.to_owned())),
                "{text}"
            );
        }
        for text in [
            "18446744073709551616",
            "17179869184GiB",
            "99999999999999999999TB",
        ] {
            assert_eq!(
                parse_size(text),
                Err(UnitError::Overflow(text.to_owned())),
                "{text}"
            );
        }
    }

    #[test]
    fn rates() {
        let good: &[(&str, u32, u64)] = &[
            ("1/s", 1, 1),
            ("60/min", 60, 60),
            ("600/hour", 600, 3600),
            ("10/MIN", 10, 60),
            ("5 / s", 5, 1),
        ];
        for (text, count, secs) in good {
            assert_eq!(
                parse_rate(text),
                Ok(Rate {
                    count: *count,
                    per: Duration::from_secs(*secs)
                }),
                "{text}"
            );
        }
        for text in [
            "0/s",
            "60",
            "60/day",
            "/min",
            "-1/s",
            "1.5/s",
            "60/minute",
            "x/s",
        ] {
            assert_eq!(
                parse_rate(text),
                Err(UnitError::NotRate(text.to_owned())),
                "{text}"
            );
        }
        assert_eq!(
            parse_rate("4294967296/s"),
            Err(UnitError::Overflow("4294967296/s".to_owned()))
        );
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["0s", "500ms", "90s", "5m", "1h", "5d"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
        for text in ["25MiB", "512KiB", "1GiB"] {
            assert_eq!(format_size(parse_size(text).unwrap()), text);
        }
        assert_eq!(format_size(1000), "1000 bytes");
        for text in ["60/min", "1/s", "600/hour"] {
            assert_eq!(format_rate(parse_rate(text).unwrap()), text);
        }
    }
}
