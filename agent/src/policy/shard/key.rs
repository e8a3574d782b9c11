//! Where a request's shard key comes from.

use http::request::Parts;
use regex::Regex;

use bulwark_proto::v1::shard_key::Kind;

use super::InvalidTopology;

/// A validated key source.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A request header (also gRPC metadata, which travels as headers).
    Header(http::HeaderName),
    /// The 0-based path segment.
    PathSegment(usize),
    /// The named capture `key` of a pattern over the path.
    PathPattern(Regex),
    /// A query parameter.
    Query(String),
}

impl KeySource {
    /// Where the key comes from, for `/config`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            KeySource::Header(name) => serde_json::json!({"type": "Header", "name": name.as_str()}),
            KeySource::PathSegment(i) => serde_json::json!({"type": "Path", "segment": i}),
            KeySource::PathPattern(re) => {
                serde_json::json!({"type": "Path", "pattern": re.as_str()})
            }
            KeySource::Query(name) => serde_json::json!({"type": "Query", "name": name}),
        }
    }
}

impl TryFrom<&Kind> for KeySource {
    type Error = InvalidTopology;

    fn try_from(kind: &Kind) -> Result<Self, InvalidTopology> {
        let header = |name: &str| {
            http::HeaderName::try_from(name)
                .map(KeySource::Header)
                .map_err(|_| InvalidTopology::Key(format!("{name:?} is not a header name")))
        };
        match kind {
            Kind::Header(name) | Kind::GrpcMetadata(name) => header(name),
            Kind::PathSegment(i) => usize::try_from(*i)
                .map(KeySource::PathSegment)
                .map_err(|_| InvalidTopology::Key(format!("path segment {i} is out of range"))),
            Kind::PathPattern(p) => {
                let re = Regex::new(p)
                    .map_err(|e| InvalidTopology::Key(format!("path pattern {p:?}: {e}")))?;
                if !re.capture_names().flatten().any(|n| n == "key") {
                    return Err(InvalidTopology::Key(format!(
                        "path pattern {p:?} has no named capture `key`"
                    )));
                }
                Ok(KeySource::PathPattern(re))
            }
            Kind::Query(q) => Ok(KeySource::Query(q.clone())),
        }
    }
}

impl KeySource {
    /// The request's key, if it has a non-empty one.
    pub fn extract<'a>(&self, parts: &'a Parts) -> Option<&'a str> {
        let key = match self {
            KeySource::Header(name) => parts.headers.get(name)?.to_str().ok()?.trim(),
            KeySource::PathSegment(i) => parts
                .uri
                .path()
                .trim_start_matches('/')
                .split('/')
                .nth(*i)?,
            KeySource::PathPattern(re) => re.captures(parts.uri.path())?.name("key")?.as_str(),
            KeySource::Query(name) => parts.uri.query()?.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then_some(v)
            })?,
        };
        Some(key).filter(|k| !k.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, header: Option<(&str, &str)>) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        if let Some((k, v)) = header {
            b = b.header(k, v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn each_source_finds_its_key_and_empty_keys_count_as_missing() {
        let h = KeySource::try_from(&Kind::Header("x-tenant".into())).unwrap();
        assert_eq!(
            h.extract(&parts("/", Some(("x-tenant", "acme")))),
            Some("acme")
        );
        assert_eq!(h.extract(&parts("/", Some(("x-tenant", "")))), None);
        assert_eq!(h.extract(&parts("/", None)), None);

        let seg = KeySource::try_from(&Kind::PathSegment(1)).unwrap();
        assert_eq!(seg.extract(&parts("/users/42/orders", None)), Some("42"));
        assert_eq!(seg.extract(&parts("/users", None)), None);
        assert_eq!(seg.extract(&parts("/users/", None)), None);

        let pat = KeySource::try_from(&Kind::PathPattern("^/t/(?P<key>[^/]+)/".into())).unwrap();
        assert_eq!(pat.extract(&parts("/t/acme/items", None)), Some("acme"));
        assert_eq!(pat.extract(&parts("/x/acme/items", None)), None);

        let q = KeySource::try_from(&Kind::Query("user".into())).unwrap();
        assert_eq!(q.extract(&parts("/a?x=1&user=bob", None)), Some("bob"));
        assert_eq!(q.extract(&parts("/a?username=bob", None)), None);
        assert_eq!(q.extract(&parts("/a", None)), None);
    }

    #[test]
    fn a_pattern_without_a_key_capture_is_refused() {
        let err = KeySource::try_from(&Kind::PathPattern("^/t/([^/]+)".into())).unwrap_err();
        assert!(err.to_string().contains("named capture `key`"), "{err}");
        assert!(KeySource::try_from(&Kind::Header("bad header".into())).is_err());
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn config_shows_each_key_source_as_json_not_debug_text() {
        let cases = [
            (
                KeySource::Header(http::HeaderName::from_static("x-customer")),
                serde_json::json!({"type": "Header", "name": "x-customer"}),
            ),
            (
                KeySource::PathSegment(1),
                serde_json::json!({"type": "Path", "segment": 1}),
            ),
            (
                KeySource::PathPattern(Regex::new("^/t/(?P<key>[^/]+)").unwrap()),
                serde_json::json!({"type": "Path", "pattern": "^/t/(?P<key>[^/]+)"}),
            ),
            (
                KeySource::Query("tenant".into()),
                serde_json::json!({"type": "Query", "name": "tenant"}),
            ),
        ];
        for (source, json) in cases {
            assert_eq!(source.to_json(), json);
        }
    }
}
