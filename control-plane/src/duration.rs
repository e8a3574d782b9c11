//! Gateway API durations (GEP-2257): `1h`, `30s`, `250ms`, `1m30s`.
//!
//! A duration is one to four components, each one to five decimal digits followed by a
//! unit (`h`, `m`, `s` or `ms`), matching `^([0-9]{1,5}(h|m|s|ms)){1,4}$`; components are
//! summed as Go's `time.ParseDuration` does (`1m30s` is 90 seconds, `1s1s` is 2 seconds).
//! We parse it ourselves because the CRDs of a later issue must accept exactly this format.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Most components a duration may have.
const MAX_COMPONENTS: usize = 4;
/// Most digits one component may have.
const MAX_DIGITS: usize = 5;

const MS_PER_SECOND: u64 = 1_000;
const MS_PER_MINUTE: u64 = 60 * MS_PER_SECOND;
const MS_PER_HOUR: u64 = 60 * MS_PER_MINUTE;

/// A Gateway API duration (millisecond precision), as written in policies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

/// Why a string is not a Gateway API duration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {reason}; expected one to four number+unit pairs \
     (units h, m, s, ms) such as 1h, 30s, 250ms or 1m30s"
)]
pub struct ParseDurationError {
    input: String,
    reason: Reason,
}

/// The specific defect of a rejected duration string.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum Reason {
    #[error("it is empty")]
    Empty,
    #[error("expected a number at position {0}")]
    MissingNumber(usize),
    #[error("a number has more than {MAX_DIGITS} digits")]
    TooManyDigits,
    #[error("the number at position {0} has no unit")]
    MissingUnit(usize),
    #[error("unknown unit at position {0} (fractions, spaces and signs are not allowed)")]
    UnknownUnit(usize),
    #[error("more than {MAX_COMPONENTS} components")]
    TooManyComponents,
}

impl Duration {
    /// Zero.
    pub const ZERO: Duration = Duration(std::time::Duration::ZERO);

    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }

    /// A duration of `s` seconds.
    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }

    /// The standard-library value.
    pub const fn as_std(self) -> std::time::Duration {
        self.0
    }

    /// Whether this is zero.
    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        parse_millis(input)
            .map(Duration::from_millis)
            .map_err(|reason| ParseDurationError {
                input: input.to_owned(),
                reason,
            })
    }
}

fn parse_millis(input: &str) -> Result<u64, Reason> {
    let bytes = input.as_bytes();
    if bytes.is_empty() {
        return Err(Reason::Empty);
    }
    let mut total: u64 = 0;
    let mut components = 0;
    let mut pos = 0;
    while pos < bytes.len() {
        if components == MAX_COMPONENTS {
            return Err(Reason::TooManyComponents);
        }
        let digits_start = pos;
        while pos < bytes.len() && bytes[pos].is_ascii_digit() {
            pos += 1;
        }
        let digits = &input[digits_start..pos];
        if digits.is_empty() {
            return Err(Reason::MissingNumber(digits_start));
        }
        if digits.len() > MAX_DIGITS {
            return Err(Reason::TooManyDigits);
        }
        // At most five digits, so this always fits; the error arm is unreachable.
        let value: u64 = digits.parse().map_err(|_| Reason::TooManyDigits)?;
        let rest = &input[pos..];
        let (unit_ms, unit_len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (MS_PER_HOUR, 1)
        } else if rest.starts_with('m') {
            (MS_PER_MINUTE, 1)
        } else if rest.starts_with('s') {
            (MS_PER_SECOND, 1)
        } else if rest.is_empty() {
            return Err(Reason::MissingUnit(digits_start));
        } else {
            return Err(Reason::UnknownUnit(pos));
        };
        pos += unit_len;
        // 4 components of at most 99999h each stay far below u64::MAX milliseconds.
        total += value * unit_ms;
        components += 1;
    }
    Ok(total)
}

/// The canonical form: each unit at most once, largest first, `0s` for zero.
impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [
            ("h", MS_PER_HOUR),
            ("m", MS_PER_MINUTE),
            ("s", MS_PER_SECOND),
            ("ms", 1),
        ] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The CRD regex of a duration, the same one Gateway API uses (GEP-2257).
pub const PATTERN: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// In a CRD: a string matching [`PATTERN`].
impl schemars::JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": PATTERN,
            // Bounds the API server's CEL cost estimate for rules that parse it.
            "maxLength": 32,
        })
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as 30s, 250ms or 1m30s")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(DurationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> u64 {
        let d: Duration = s.parse().unwrap();
        u64::try_from(d.as_std().as_millis()).unwrap()
    }

    #[test]
    fn parses_every_unit_and_combinations() {
        assert_eq!(ms("1h"), 3_600_000);
        assert_eq!(ms("5m"), 300_000);
        assert_eq!(ms("30s"), 30_000);
        assert_eq!(ms("250ms"), 250);
        assert_eq!(ms("1m30s"), 90_000);
        assert_eq!(ms("1h30m30s500ms"), 5_430_500);
        assert_eq!(ms("0s"), 0);
        // Leading zeros are decimal, not octal.
        assert_eq!(ms("00060m"), 3_600_000);
        // Components are summed like Go's ParseDuration, in any order.
        assert_eq!(ms("1s1s"), 2_000);
        assert_eq!(ms("500ms1h"), 3_600_500);
        assert_eq!(ms("99999h"), 99_999 * 3_600_000);
    }

    #[test]
    fn rejects_everything_outside_the_gep_format() {
        for bad in [
            "",
            "1",
            "s",
            "1.5s",
            "-1s",
            "+1s",
            "1 s",
            " 1s",
            "1s ",
            "1d",
            "1us",
            "1ns",
            "100000s",
            "1h1m1s1ms1h",
            "1S",
            "1H",
            "ms",
            "1m s",
        ] {
            let err = bad.parse::<Duration>().unwrap_err();
            assert!(
                err.to_string().contains("expected one to four"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Duration>().unwrap_err().to_string();
        assert!(err("").contains("it is empty"));
        assert!(err("5").contains("has no unit"));
        assert!(err("5d").contains("unknown unit at position 1"));
        assert!(err("123456s").contains("more than 5 digits"));
        assert!(err("1h1m1s1ms1s").contains("more than 4 components"));
        assert!(err("1s.5").contains("expected a number at position 2"));
        assert!(err("2x").starts_with("invalid duration \"2x\""));
    }

    #[test]
    fn displays_canonically() {
        let show = |s: &str| s.parse::<Duration>().unwrap().to_string();
        assert_eq!(show("90s"), "1m30s");
        assert_eq!(show("0ms"), "0s");
        assert_eq!(show("1500ms"), "1s500ms");
        assert_eq!(show("1h"), "1h");
        assert_eq!(show("61m"), "1h1m");
    }

    #[test]
    fn deserializes_from_yaml_with_a_clear_error() {
        let d: Duration = serde_yaml_ng::from_str("250ms").unwrap();
        assert_eq!(d, Duration::from_millis(250));
        let err = serde_yaml_ng::from_str::<Duration>("5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid duration \"5\""), "{err}");
        let number = serde_yaml_ng::Value::from(5);
        let err = serde_yaml_ng::from_value::<Duration>(number)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected a duration string"), "{err}");
        let err = serde_yaml_ng::from_str::<Duration>("5 s")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid duration \"5 s\""), "{err}");
    }
}
