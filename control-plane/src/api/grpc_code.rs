//! gRPC status codes in policies: a name (`unavailable`, `resource-exhausted`,
//! `DEADLINE_EXCEEDED`) or the number.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Visitor};

/// The canonical gRPC status names, indexed by code, in kebab case.
const NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// In a CRD: a name or a number (`x-kubernetes-int-or-string`).
impl schemars::JsonSchema for GrpcCode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GrpcCode".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
        })
    }
}

/// Serialized as its kebab-case name.
impl serde::Serialize for GrpcCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match NAMES.get(self.0 as usize) {
            Some(name) => serializer.serialize_str(name),
            None => serializer.serialize_u32(self.0),
        }
    }
}

/// A gRPC status code, 0..=16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrpcCode(u32);

impl GrpcCode {
    /// The numeric code, as carried in `grpc-status`.
    pub const fn code(self) -> u32 {
        self.0
    }

    /// The code for a name in kebab or snake case, any letter case, or a decimal number.
    pub fn parse(s: &str) -> Option<GrpcCode> {
        if let Ok(n) = s.parse::<u32>() {
            return GrpcCode::from_number(n.into());
        }
        let normalized = s.trim().to_ascii_lowercase().replace('_', "-");
        // The American spelling is common in client libraries.
        let normalized = if normalized == "canceled" {
            "cancelled".to_owned()
        } else {
            normalized
        };
        let code = NAMES.iter().position(|n| *n == normalized)?;
        u32::try_from(code).ok().map(GrpcCode)
    }

    fn from_number(n: u64) -> Option<GrpcCode> {
        u32::try_from(n)
            .ok()
            .filter(|n| (*n as usize) < NAMES.len())
            .map(GrpcCode)
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = NAMES.get(self.0 as usize).copied().unwrap_or("?");
        write!(f, "{name} ({})", self.0)
    }
}

impl<'de> Deserialize<'de> for GrpcCode {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CodeVisitor;

        impl Visitor<'_> for CodeVisitor {
            type Value = GrpcCode;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a gRPC status code: a name such as unavailable or resource-exhausted, \
                     or a number 0..=16",
                )
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<GrpcCode, E> {
                GrpcCode::from_number(v).ok_or_else(|| {
                    E::custom(format!("unknown gRPC status code {v}: codes are 0..=16"))
                })
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<GrpcCode, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "unknown gRPC status code {v}: codes are 0..=16"
                    ))),
                }
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<GrpcCode, E> {
                GrpcCode::parse(v).ok_or_else(|| {
                    E::custom(format!(
                        "unknown gRPC status code {v:?}: use a name such as unavailable, \
                         resource-exhausted or deadline-exceeded, or a number 0..=16"
                    ))
                })
            }
        }

        deserializer.deserialize_any(CodeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(yaml: &str) -> Result<u32, String> {
        serde_yaml_ng::from_str::<GrpcCode>(yaml)
            .map(GrpcCode::code)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_names_in_any_case_style_and_numbers() {
        assert_eq!(code("unavailable"), Ok(14));
        assert_eq!(code("resource-exhausted"), Ok(8));
        assert_eq!(code("resource_exhausted"), Ok(8));
        assert_eq!(code("DEADLINE_EXCEEDED"), Ok(4));
        assert_eq!(code("canceled"), Ok(1));
        assert_eq!(code("ok"), Ok(0));
        assert_eq!(code("unauthenticated"), Ok(16));
        assert_eq!(code("14"), Ok(14));
        assert_eq!(code("'14'"), Ok(14));
    }

    #[test]
    fn rejects_unknown_codes_with_guidance() {
        assert!(
            code("17")
                .unwrap_err()
                .contains("unknown gRPC status code 17")
        );
        assert!(
            code("-1")
                .unwrap_err()
                .contains("unknown gRPC status code -1")
        );
        assert!(
            code("unavailabel")
                .unwrap_err()
                .contains("use a name such as unavailable")
        );
        assert!(code("[1]").is_err());
    }

    #[test]
    fn displays_name_and_number() {
        assert_eq!(GrpcCode(14).to_string(), "unavailable (14)");
    }
}
