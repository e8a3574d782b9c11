//! Durations as the policies read them: protobuf durations from the control plane
//! (validated once, in each policy's `TryFrom`), and the `"250ms"` form of `/config`.

use std::time::Duration;

/// A protobuf duration that cannot be used as a [`Duration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDuration {
    /// Seconds or nanos are negative.
    #[error("duration {seconds}s {nanos}ns is negative; durations must be zero or positive")]
    Negative {
        /// The message's `seconds`.
        seconds: i64,
        /// The message's `nanos`.
        nanos: i32,
    },
    /// Nanos outside `0..1_000_000_000`.
    #[error(
        "duration nanos {nanos} is outside 0..=999999999; the control plane sent a malformed duration"
    )]
    NanosOutOfRange {
        /// The message's `nanos`.
        nanos: i32,
    },
    /// Longer than [`MAX_DURATION`].
    #[error(
        "duration {seconds}s is longer than the {max}s a policy may set; the control plane sent a malformed duration",
        max = MAX_DURATION.as_secs()
    )]
    TooLong {
        /// The message's `seconds`.
        seconds: i64,
    },
}

/// The longest duration a policy may set: 100 years, far beyond what the control plane
/// accepts (four components of five digits, under 46 years). Without a bound, a deadline
/// or a breaker's reopening time (now plus the duration) would overflow the clock and
/// panic on the request path.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Converts a protobuf `Duration` into a [`Duration`], rejecting negative, malformed or
/// too long values.
pub fn duration(d: &prost_types::Duration) -> Result<Duration, InvalidDuration> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(InvalidDuration::Negative {
            seconds: d.seconds,
            nanos: d.nanos,
        });
    }
    let nanos = u32::try_from(d.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or(InvalidDuration::NanosOutOfRange { nanos: d.nanos })?;
    let duration = Duration::new(d.seconds.unsigned_abs(), nanos);
    if duration > MAX_DURATION {
        return Err(InvalidDuration::TooLong { seconds: d.seconds });
    }
    Ok(duration)
}

/// Serialises `Duration` as `"250ms"`.
pub mod duration_ms {
    use std::time::Duration;

    /// Serialises `d`.
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

/// Serialises `Option<Duration>` as `"250ms"` or null.
pub mod opt_duration_ms {
    use std::time::Duration;

    /// Serialises `d`.
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(seconds: i64, nanos: i32) -> prost_types::Duration {
        prost_types::Duration { seconds, nanos }
    }

    #[test]
    fn converts_proto_durations() {
        assert_eq!(
            duration(&proto(1, 500_000_000)),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(duration(&proto(0, 0)), Ok(Duration::ZERO));
        assert!(matches!(
            duration(&proto(-1, 0)),
            Err(InvalidDuration::Negative { .. })
        ));
        assert!(matches!(
            duration(&proto(0, -5)),
            Err(InvalidDuration::Negative { .. })
        ));
        assert_eq!(
            duration(&proto(0, 1_000_000_000)),
            Err(InvalidDuration::NanosOutOfRange {
                nanos: 1_000_000_000
            })
        );
        assert_eq!(
            duration(&proto(i64::MAX, 0)),
            Err(InvalidDuration::TooLong { seconds: i64::MAX })
        );
    }

    #[test]
    fn a_duration_that_would_overflow_the_clock_is_refused() {
        // Found by the config_snapshot fuzz target: a request timeout of i64::MAX seconds
        // was accepted, and every request's deadline (now + timeout) then panicked.
        let max = i64::try_from(MAX_DURATION.as_secs()).unwrap();
        let longest = duration(&proto(max, 0)).unwrap();
        let _ = tokio::time::Instant::now() + longest;
        assert_eq!(
            duration(&proto(max, 1)),
            Err(InvalidDuration::TooLong { seconds: max })
        );
        assert!(duration(&proto(max + 1, 0)).is_err());
    }
}
