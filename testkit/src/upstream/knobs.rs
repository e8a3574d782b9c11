//! The knobs that decide how a test upstream answers, and their JSON form.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a test upstream answers its requests; change it at any time with
/// [`Upstream::set_knobs`](super::Upstream::set_knobs) or `PUT /_upstream/knobs`.
///
/// The JSON form (used by the control endpoint and printed by it) has the same
/// field names in snake case, with `latency_ms` in milliseconds; missing fields
/// take their defaults and unknown fields are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Knobs {
    /// Share of requests, from 0 to 1, answered with `fail_status` (or, for
    /// gRPC requests, with `grpc-status: 14` in the trailers).
    pub fail_ratio: f64,
    /// The HTTP status of a failed answer (default 503).
    pub fail_status: u16,
    /// Delay before every answer.
    #[serde(rename = "latency_ms", with = "millis")]
    pub latency: Duration,
    /// Never answer: hold each request until the client goes away.
    pub hang: bool,
    /// Close the connection without answering (TCP reset: `SO_LINGER` 0). Every
    /// request on that connection, and on an HTTP/2 connection every stream,
    /// fails.
    pub reset: bool,
    /// For gRPC requests (`content-type: application/grpc...`): answer every one
    /// with HTTP 200, a body, and this `grpc-status` in the trailers, whatever
    /// `fail_ratio` draws. `None`: `0` (OK), or `14` (UNAVAILABLE) when
    /// `fail_ratio` fails the request.
    pub grpc_status: Option<u32>,
    /// Seed of the failure draws: the same seed and the same order of requests
    /// give the same failures. Setting knobs restarts the sequence.
    pub seed: u64,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            fail_ratio: 0.0,
            fail_status: 503,
            latency: Duration::ZERO,
            hang: false,
            reset: false,
            grpc_status: None,
            seed: 0,
        }
    }
}

impl Knobs {
    /// Knobs of a healthy upstream: every request answered 200 at once.
    pub fn healthy() -> Self {
        Self::default()
    }

    /// Knobs of an upstream that fails `ratio` of its requests with `status`.
    pub fn failing(ratio: f64, status: u16) -> Self {
        Self {
            fail_ratio: ratio,
            fail_status: status,
            ..Self::default()
        }
    }

    /// Knobs of an upstream that never answers.
    pub fn hanging() -> Self {
        Self {
            hang: true,
            ..Self::default()
        }
    }

    /// Checks that the knobs describe something a server can do.
    pub fn validate(&self) -> Result<(), InvalidKnobs> {
        if !(0.0..=1.0).contains(&self.fail_ratio) {
            return Err(InvalidKnobs::FailRatio(self.fail_ratio));
        }
        if !(100..=599).contains(&self.fail_status) {
            return Err(InvalidKnobs::FailStatus(self.fail_status));
        }
        if let Some(code) = self.grpc_status
            && code > 16
        {
            return Err(InvalidKnobs::GrpcStatus(code));
        }
        Ok(())
    }
}

/// Knobs a server cannot follow.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidKnobs {
    /// `fail_ratio` outside 0..=1.
    #[error("fail_ratio must be between 0 and 1, got {0}")]
    FailRatio(f64),
    /// `fail_status` is not an HTTP status.
    #[error("fail_status must be an HTTP status from 100 to 599, got {0}")]
    FailStatus(u16),
    /// `grpc_status` is not a gRPC status code.
    #[error("grpc_status must be a gRPC status code from 0 to 16, got {0}")]
    GrpcStatus(u32),
}

/// Serialises a `Duration` as whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        value: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_uses_milliseconds_and_defaults_missing_fields() {
        let knobs: Knobs =
            serde_json::from_str(r#"{"fail_ratio": 0.5, "latency_ms": 250}"#).unwrap();
        assert_eq!(
            knobs,
            Knobs {
                fail_ratio: 0.5,
                latency: Duration::from_millis(250),
                ..Knobs::default()
            }
        );
        let json = serde_json::to_value(&knobs).unwrap();
        assert_eq!(json["latency_ms"], 250);
        assert_eq!(json["fail_status"], 503);
    }

    #[test]
    fn json_rejects_unknown_fields() {
        let err = serde_json::from_str::<Knobs>(r#"{"fail_rate": 0.5}"#).unwrap_err();
        assert!(err.to_string().contains("fail_rate"), "{err}");
    }

    #[test]
    fn validation_names_the_bad_knob() {
        assert_eq!(
            Knobs::failing(1.5, 503).validate(),
            Err(InvalidKnobs::FailRatio(1.5))
        );
        assert_eq!(
            Knobs::failing(0.5, 42).validate(),
            Err(InvalidKnobs::FailStatus(42))
        );
        let grpc = Knobs {
            grpc_status: Some(17),
            ..Knobs::default()
        };
        assert_eq!(grpc.validate(), Err(InvalidKnobs::GrpcStatus(17)));
        assert!(Knobs::failing(f64::NAN, 503).validate().is_err());
        assert_eq!(Knobs::hanging().validate(), Ok(()));
    }
}
