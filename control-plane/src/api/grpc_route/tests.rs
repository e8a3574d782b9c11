use super::*;
use crate::api::{Decoded, decode};
use crate::model::Object;
use crate::model::http_route::{Backend, HttpRoute, PathMatch, ValueMatch};

fn route(spec: &str) -> Result<HttpRoute, FieldError> {
    let yaml = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
         metadata: {{name: greeter-canary, namespace: shop}}\nspec:\n{spec}"
    );
    match decode(serde_yaml_ng::from_str(&yaml).unwrap()) {
        Ok(Decoded::Object(Object::GrpcRoute(r))) => Ok(r),
        Ok(other) => panic!("not a GRPCRoute: {other:?}"),
        Err(e) => Err(e.error),
    }
}

const PARENT: &str = "  parentRefs: [{group: '', kind: Service, name: greeter, port: 50051}]\n";

fn with_rules(rules: &str) -> Result<HttpRoute, FieldError> {
    route(&format!("{PARENT}  rules:\n{rules}"))
}

fn path_of(method: &str) -> Result<PathMatch, FieldError> {
    with_rules(&format!("  - matches: [{{method: {method}}}]\n"))
        .map(|r| r.rules[0].matches[0].path.clone())
}

fn err(result: Result<impl std::fmt::Debug, FieldError>) -> (String, String) {
    let e = result.unwrap_err();
    (e.path, e.reason)
}

#[test]
fn a_weighted_split_decodes_and_matches_every_call_by_default() {
    let r = with_rules(
        "  - backendRefs: [{name: greeter-v1, port: 50051, weight: 90}, \
         {name: greeter-v2, port: 50051, weight: 10}]\n",
    )
    .unwrap();
    assert_eq!(r.parents[0].service, "greeter");
    assert_eq!(r.parents[0].port, Some(50051));
    assert_eq!(r.rules[0].matches.len(), 1);
    assert_eq!(r.rules[0].matches[0].path, PathMatch::Prefix("/".into()));
    assert_eq!(
        r.rules[0].backends,
        [
            Backend {
                service: "greeter-v1".into(),
                port: 50051,
                weight: 90
            },
            Backend {
                service: "greeter-v2".into(),
                port: 50051,
                weight: 10
            },
        ]
    );
    // No rules at all: one rule for every call, to the parent.
    let r = route(PARENT).unwrap();
    assert_eq!(r.rules.len(), 1);
    assert!(r.rules[0].backends.is_empty());
}

#[test]
fn method_matches_become_the_paths_grpc_calls_use() {
    assert_eq!(
        path_of("{service: helloworld.Greeter, method: SayHello}").unwrap(),
        PathMatch::Exact("/helloworld.Greeter/SayHello".into())
    );
    assert_eq!(
        path_of("{type: Exact, service: helloworld.Greeter}").unwrap(),
        PathMatch::Prefix("/helloworld.Greeter".into())
    );
    assert_eq!(
        path_of("{method: SayHello}").unwrap(),
        PathMatch::Regex("/[^/]+/SayHello".into())
    );
    assert_eq!(
        path_of("{type: RegularExpression, service: 'helloworld\\.Greet.*', method: 'Say.+'}")
            .unwrap(),
        PathMatch::Regex("/(?:helloworld\\.Greet.*)/(?:Say.+)".into())
    );
    assert_eq!(
        path_of("{type: RegularExpression, method: 'Say.+'}").unwrap(),
        PathMatch::Regex("/[^/]+/(?:Say.+)".into())
    );
}

#[test]
fn the_translated_regexes_match_the_calls_they_should() {
    let anchored = |p: PathMatch| match p {
        PathMatch::Regex(r) => regex::Regex::new(&format!("^(?:{r})$")).unwrap(),
        other => panic!("not a regex: {other:?}"),
    };
    let only_method = anchored(path_of("{method: SayHello}").unwrap());
    assert!(only_method.is_match("/helloworld.Greeter/SayHello"));
    assert!(!only_method.is_match("/helloworld.Greeter/SayHelloAgain"));
    assert!(!only_method.is_match("/SayHello"));
    let both = anchored(
        path_of("{type: RegularExpression, service: 'a\\.B', method: 'Get|List'}").unwrap(),
    );
    assert!(both.is_match("/a.B/Get") && both.is_match("/a.B/List"));
    assert!(!both.is_match("/a.B/Delete") && !both.is_match("/a.C/Get"));
}

#[test]
fn bad_method_matches_are_refused_by_field_path() {
    let at = "spec.rules[0].matches[0].method";
    let (path, reason) = err(path_of("{type: Exact}"));
    assert_eq!(path, at);
    assert!(reason.contains("service, method or both"), "{reason}");
    let (path, _) = err(path_of("{service: 'hello world'}"));
    assert_eq!(path, format!("{at}.service"));
    let (path, _) = err(path_of("{method: 'Say/Hello'}"));
    assert_eq!(path, format!("{at}.method"));
    let (path, reason) = err(path_of("{type: RegularExpression, method: 'Say('}"));
    assert_eq!(path, format!("{at}.method"));
    assert!(reason.contains("invalid regular expression"), "{reason}");
    let (path, reason) = err(path_of("{type: Prefix, method: Say}"));
    assert_eq!(path, format!("{at}.type"));
    assert!(reason.contains("Exact or RegularExpression"), "{reason}");
    let long = "a".repeat(MAX_NAME_LEN + 1);
    let (path, _) = err(path_of(&format!("{{method: {long}}}")));
    assert_eq!(path, format!("{at}.method"));
    // Unknown fields are named, as kubectl --validate=strict does.
    let (path, reason) = err(path_of("{service: a.B, verb: Get}"));
    assert!(reason.contains("unknown field `verb`"), "{path}: {reason}");
}

#[test]
fn headers_and_the_request_header_modifier_are_the_http_route_ones() {
    let r = with_rules(
        "  - matches: [{headers: [{name: X-Canary, value: 'true'}, \
         {type: RegularExpression, name: x-user, value: 'beta-.*'}]}]\n\
         \x20   filters: [{type: RequestHeaderModifier, requestHeaderModifier: \
         {set: [{name: x-route, value: canary}]}}]\n\
         \x20   backendRefs: [{name: greeter-v2, port: 50051}]\n",
    )
    .unwrap();
    let m = &r.rules[0].matches[0];
    assert_eq!(m.path, PathMatch::Prefix("/".into()));
    assert_eq!(m.headers[0].name, "x-canary");
    assert_eq!(m.headers[0].value, ValueMatch::Exact("true".into()));
    assert_eq!(m.headers[1].value, ValueMatch::Regex("beta-.*".into()));
    let modifier = r.rules[0].request_headers.as_ref().unwrap();
    assert_eq!(modifier.set, [("x-route".into(), "canary".into())]);

    let (path, reason) = err(with_rules(
        "  - matches: [{headers: [{name: a, value: '1'}, {name: A, value: '2'}]}]\n",
    ));
    assert_eq!(path, "spec.rules[0].matches[0].headers[1].name");
    assert!(reason.contains("matched twice"), "{reason}");
}

#[test]
fn unsupported_filters_and_fields_are_refused_with_a_reason() {
    let (path, reason) = err(with_rules(
        "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 1}}}]\n",
    ));
    assert_eq!(path, "spec.rules[0].filters[0].type");
    assert!(
        reason.contains("RequestMirror is not supported"),
        "{reason}"
    );
    let (path, _) = err(with_rules(
        "  - backendRefs: [{name: v2, port: 50051, filters: [{type: RequestHeaderModifier}]}]\n",
    ));
    assert_eq!(path, "spec.rules[0].backendRefs[0].filters");
    let (path, _) = err(with_rules("  - sessionPersistence: {sessionName: s}\n"));
    assert_eq!(path, "spec.rules[0].sessionPersistence");
    let (path, _) = err(with_rules(
        "  - backendRefs: [{name: v2, port: 50051, weight: -1}]\n",
    ));
    assert_eq!(path, "spec.rules[0].backendRefs[0].weight");
    let (path, _) = err(with_rules("  - backendRefs: [{name: v2}]\n"));
    assert_eq!(path, "spec.rules[0].backendRefs[0].port");
    let (_, reason) = err(with_rules("  - timeouts: {request: 1s}\n"));
    assert!(reason.contains("unknown field `timeouts`"), "{reason}");
}

#[test]
fn a_gateway_route_is_not_ours() {
    let r = route("  parentRefs: [{name: my-gateway}]\n  rules: [{matches: [{method: {}}]}]\n")
        .unwrap();
    assert!(r.parents.is_empty() && r.rules.is_empty());
}

#[test]
fn the_readme_example_decodes() {
    let r = route(
        "  parentRefs:
    - {group: \"\", kind: Service, name: greeter, port: 50051}
  rules:
    - matches:                       # one method to v2
        - method: {service: helloworld.Greeter, method: SayHelloAgain}
      backendRefs: [{name: greeter-v2, port: 50051}]
    - matches:                       # callers that send this metadata to v2
        - headers: [{name: x-canary, value: \"true\"}]
      backendRefs: [{name: greeter-v2, port: 50051}]
    - backendRefs:                   # everything else 90/10
        - {name: greeter-v1, port: 50051, weight: 90}
        - {name: greeter-v2, port: 50051, weight: 10}
",
    )
    .unwrap();
    assert_eq!(r.rules.len(), 3);
    assert_eq!(
        r.rules[0].matches[0].path,
        PathMatch::Exact("/helloworld.Greeter/SayHelloAgain".into())
    );
    assert_eq!(r.rules[2].backends[0].weight, 90);
}
