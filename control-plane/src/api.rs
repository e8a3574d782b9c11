//! The policy and topology API as written in YAML: serde types for each kind, and their
//! validation into the domain [`model`](crate::model).
//!
//! Policy `spec`s reject unknown fields (like `kubectl --validate=strict`); the
//! Kubernetes core kinds ignore fields we do not use, since real manifests carry many.
//! Every error names the field path it is about (`spec.retry.backoff`).

use std::fmt;

use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use crate::model::{Kind, Object, ObjectKey, ObjectName};

pub mod authorization;
pub mod endpoint_slice;
pub mod grpc_code;
pub mod grpc_route;
pub mod http_route;
pub mod meta;
pub mod peer_authentication;
pub mod pod;
pub mod ratelimit;
pub mod resilience;
pub mod service;
pub mod shard;
pub mod status;
pub mod target;

/// The API group and version of Bulwark's policy kinds.
pub const POLICY_API_VERSION: &str = "bulwark.io/v1alpha1";
/// The API group of Bulwark's policy kinds.
pub const POLICY_GROUP: &str = "bulwark.io";
/// The namespace of an object whose manifest names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A problem with one field of an object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    /// Where: `spec.retry.attempts`, `spec.targetRefs[0].kind`; empty for the whole object.
    pub path: String,
    /// Why, in words an operator can act on.
    pub reason: String,
}

impl FieldError {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// A required field is missing.
    pub fn required(path: impl Into<String>) -> Self {
        FieldError::new(path, "required")
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Joins a field path and a child field: `field("spec.retry", "attempts")`.
pub(crate) fn field(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_owned()
    } else {
        format!("{base}.{name}")
    }
}

/// Joins a field path and a list index: `item("spec.targetRefs", 0)`.
pub(crate) fn item(base: &str, index: usize) -> String {
    format!("{base}[{index}]")
}

/// What one YAML document turned out to be.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    /// A valid object of a kind the control plane uses.
    Object(Object),
    /// A Kubernetes object of another kind; a folder may hold other manifests.
    Skipped {
        /// Its `apiVersion`.
        api_version: String,
        /// Its `kind`.
        kind: String,
    },
    /// An empty document (only comments, or nothing between two `---`).
    Empty,
}

/// A document that could not be used, and which object it was meant to be, if that is known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct DecodeError {
    /// The object the document describes, when its kind and name could be read.
    pub key: Option<ObjectKey>,
    /// What is wrong.
    pub error: FieldError,
}

/// Turns one parsed YAML document into a validated object, logging each invalid field
/// that was ignored rather than rejecting the object (see [`decode_noting`]) at every
/// call. A caller that decodes the same object again and again should use
/// [`decode_noting`] and report each ignored field once.
pub fn decode(value: Value) -> Result<Decoded, DecodeError> {
    let mut ignored = Vec::new();
    let decoded = decode_noting(value, &mut ignored)?;
    if let Decoded::Object(object) = &decoded {
        for error in &ignored {
            tracing::warn!(
                object = %object.key(),
                path = %error.path,
                reason = %error.reason,
                "ignoring an invalid field; the object is used without it"
            );
        }
    }
    Ok(decoded)
}

/// Turns one parsed YAML document into a validated object. Invalid fields that cost
/// the object nothing but themselves (a pod's bad weight annotation) do not reject it:
/// they are added to `ignored`.
pub fn decode_noting(value: Value, ignored: &mut Vec<FieldError>) -> Result<Decoded, DecodeError> {
    let value = match value {
        Value::Null => return Ok(Decoded::Empty),
        Value::Mapping(_) => value,
        other => {
            return Err(DecodeError {
                key: None,
                error: FieldError::new(
                    "",
                    format!(
                        "expected a Kubernetes object (a mapping with apiVersion and kind), found {}",
                        describe(&other)
                    ),
                ),
            });
        }
    };
    let text = |name: &str| -> Result<String, DecodeError> {
        match value.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) | None => Err(DecodeError {
                key: None,
                error: FieldError::new(name, "required: every Kubernetes object has one"),
            }),
            Some(other) => Err(DecodeError {
                key: None,
                error: FieldError::new(
                    name,
                    format!("expected a string, found {}", describe(other)),
                ),
            }),
        }
    };
    let api_version = text("apiVersion")?;
    let kind_name = text("kind")?;
    let Some(kind) = kind_of(&api_version, &kind_name)? else {
        return Ok(Decoded::Skipped {
            api_version,
            kind: kind_name,
        });
    };
    let key = key_of(kind, &value);
    let object = match kind {
        Kind::Service => typed::<service::Service>(value)
            .and_then(TryInto::try_into)
            .map(Object::Service),
        Kind::EndpointSlice => typed::<endpoint_slice::EndpointSlice>(value)
            .and_then(TryInto::try_into)
            .map(Object::EndpointSlice),
        Kind::Pod => typed::<pod::Pod>(value)
            .and_then(|pod| pod.into_model(ignored))
            .map(Object::Pod),
        Kind::ResiliencePolicy => typed::<resilience::ResiliencePolicyDocument>(value)
            .and_then(TryInto::try_into)
            .map(|policy| Object::ResiliencePolicy(Box::new(policy))),
        Kind::RateLimitPolicy => typed::<ratelimit::RateLimitPolicyDocument>(value)
            .and_then(TryInto::try_into)
            .map(Object::RateLimitPolicy),
        Kind::ShardTopology => typed::<shard::ShardTopologyDocument>(value)
            .and_then(TryInto::try_into)
            .map(|topology| Object::ShardTopology(Box::new(topology))),
        Kind::HttpRoute => typed::<http_route::HttpRouteDocument>(value)
            .and_then(TryInto::try_into)
            .map(Object::HttpRoute),
        Kind::GrpcRoute => typed::<grpc_route::GrpcRouteDocument>(value)
            .and_then(TryInto::try_into)
            .map(Object::GrpcRoute),
        Kind::AuthorizationPolicy => typed::<authorization::AuthorizationPolicyDocument>(value)
            .and_then(TryInto::try_into)
            .map(Object::AuthorizationPolicy),
        Kind::PeerAuthentication => typed::<peer_authentication::PeerAuthenticationDocument>(value)
            .and_then(TryInto::try_into)
            .map(Object::PeerAuthentication),
    };
    object
        .map(Decoded::Object)
        .map_err(|error| DecodeError { key, error })
}

/// Which kind an `apiVersion`/`kind` pair is: `Ok(None)` for kinds we do not use.
fn kind_of(api_version: &str, kind: &str) -> Result<Option<Kind>, DecodeError> {
    let known = match (api_version, kind) {
        ("v1", "Service") => Some(Kind::Service),
        ("v1", "Pod") => Some(Kind::Pod),
        ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
        (POLICY_API_VERSION, "ResiliencePolicy") => Some(Kind::ResiliencePolicy),
        (POLICY_API_VERSION, "RateLimitPolicy") => Some(Kind::RateLimitPolicy),
        (POLICY_API_VERSION, "ShardTopology") => Some(Kind::ShardTopology),
        (POLICY_API_VERSION, "AuthorizationPolicy") => Some(Kind::AuthorizationPolicy),
        (POLICY_API_VERSION, "PeerAuthentication") => Some(Kind::PeerAuthentication),
        // v1beta1 has the same schema for what we read; clusters still serve both.
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
            Some(Kind::HttpRoute)
        }
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => Some(Kind::GrpcRoute),
        _ => None,
    };
    // Our own group is never "someone else's manifest": a typo there must be reported.
    if known.is_none() && api_version.split('/').next() == Some(POLICY_GROUP) {
        return Err(DecodeError {
            key: None,
            error: FieldError::new(
                "",
                format!(
                    "unsupported kind {kind} in {api_version}: this control plane understands \
                     ResiliencePolicy, RateLimitPolicy, ShardTopology, AuthorizationPolicy and \
                     PeerAuthentication in {POLICY_API_VERSION}"
                ),
            ),
        });
    }
    Ok(known)
}

/// The object's key, read leniently so that even an invalid document can be identified.
fn key_of(kind: Kind, value: &Value) -> Option<ObjectKey> {
    let metadata = value.get("metadata")?;
    let name = metadata.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = match metadata.get("namespace") {
        None | Some(Value::Null) => DEFAULT_NAMESPACE,
        Some(ns) => ns.as_str().filter(|ns| !ns.is_empty())?,
    };
    Some(ObjectKey {
        kind,
        name: ObjectName::new(namespace, name),
    })
}

/// Deserializes with the path of the first offending field.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        FieldError::new(path, err.into_inner().to_string())
    })
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_str(yaml: &str) -> Result<Decoded, DecodeError> {
        decode(serde_yaml_ng::from_str(yaml).unwrap())
    }

    #[test]
    fn other_kinds_are_skipped_and_empty_documents_ignored() {
        let skipped = decode_str("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n");
        assert_eq!(
            skipped.unwrap(),
            Decoded::Skipped {
                api_version: "apps/v1".into(),
                kind: "Deployment".into()
            }
        );
        assert_eq!(decode_str("# only a comment\n").unwrap(), Decoded::Empty);
        // A Knative Service is not a core Service.
        assert!(matches!(
            decode_str("apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: x}\n"),
            Ok(Decoded::Skipped { .. })
        ));
    }

    #[test]
    fn unknown_bulwark_kinds_and_versions_are_errors() {
        let err =
            decode_str("apiVersion: bulwark.io/v1beta1\nkind: ResiliencePolicy\n").unwrap_err();
        assert!(
            err.error
                .reason
                .contains("unsupported kind ResiliencePolicy in bulwark.io/v1beta1")
        );
        let err = decode_str("apiVersion: bulwark.io/v1alpha1\nkind: RetryPolicy\n").unwrap_err();
        assert!(err.error.reason.contains("unsupported kind RetryPolicy"));
    }

    #[test]
    fn documents_that_are_not_objects_are_errors() {
        let err = decode_str("- a\n- b\n").unwrap_err();
        assert!(err.error.reason.contains("found a list"), "{err}");
        let err = decode_str("kind: Service\n").unwrap_err();
        assert_eq!(err.error.path, "apiVersion");
        let err = decode_str("apiVersion: v1\nkind: 3\n").unwrap_err();
        assert_eq!(
            err.error.to_string(),
            "kind: expected a string, found a number"
        );
    }

    #[test]
    fn invalid_documents_still_name_their_object() {
        let err = decode_str(
            "apiVersion: bulwark.io/v1alpha1\nkind: ResiliencePolicy\n\
             metadata: {name: reviews, namespace: demo}\nspec: {targetRefs: [], bogus: 1}\n",
        )
        .unwrap_err();
        assert_eq!(
            err.key.as_ref().unwrap().to_string(),
            "ResiliencePolicy demo/reviews"
        );
        assert_eq!(err.error.path, "spec.bogus");
        assert!(err.error.reason.contains("unknown field `bogus`"), "{err}");

        let err =
            decode_str("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: 3}\n")
                .unwrap_err();
        assert_eq!(err.key.unwrap().to_string(), "Service default/web");
        assert_eq!(err.error.path, "spec.ports");
    }
}
