use super::*;
use crate::api::{Decoded, decode};
use crate::model::Object;
use crate::model::http_route::{Backend, HttpRoute, PathMatch, ValueMatch};

fn route(spec: &str) -> Result<HttpRoute, FieldError> {
    let yaml = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: orders-canary, namespace: shop}}\nspec:\n{spec}"
    );
    match decode(serde_yaml_ng::from_str(&yaml).unwrap()) {
        Ok(Decoded::Object(Object::HttpRoute(r))) => Ok(r),
        Ok(other) => panic!("not a route: {other:?}"),
        Err(e) => Err(e.error),
    }
}

const PARENT: &str = "  parentRefs: [{group: '', kind: Service, name: orders}]\n";

fn with_rules(rules: &str) -> Result<HttpRoute, FieldError> {
    route(&format!("{PARENT}  rules:\n{rules}"))
}

#[test]
fn a_canary_route_decodes_with_the_api_defaults() {
    let r = route(&format!(
        "{PARENT}  rules:\n  - backendRefs: [{{name: orders-v1, port: 80, weight: 90}}, \
         {{name: orders-v2, port: 80, weight: 10}}, {{name: orders-v3, port: 8080}}]\n"
    ))
    .unwrap();
    assert_eq!(r.parents.len(), 1);
    assert_eq!(r.parents[0].service, "orders");
    assert_eq!(r.parents[0].port, None);
    let rule = &r.rules[0];
    assert_eq!(rule.matches.len(), 1, "no matches: PathPrefix /");
    assert_eq!(rule.matches[0].path, PathMatch::Prefix("/".into()));
    assert_eq!(
        rule.backends,
        [
            Backend {
                service: "orders-v1".into(),
                port: 80,
                weight: 90
            },
            Backend {
                service: "orders-v2".into(),
                port: 80,
                weight: 10
            },
            Backend {
                service: "orders-v3".into(),
                port: 8080,
                weight: 1
            },
        ]
    );
}

#[test]
fn matches_are_read_and_normalised() {
    let r = with_rules(
        "  - matches:\n    - path: {type: PathPrefix, value: /api/}\n      method: POST\n\
         \x20     headers: [{name: X-Canary, value: 'true'}, {type: RegularExpression, name: x-user, value: 'a.*'}]\n\
         \x20   - path: {type: Exact, value: /health}\n    - path: {type: RegularExpression, value: '/items/[0-9]+'}\n",
    )
    .unwrap();
    let m = &r.rules[0].matches;
    assert_eq!(m[0].path, PathMatch::Prefix("/api".into()));
    assert_eq!(m[0].method.as_deref(), Some("POST"));
    assert_eq!(m[0].headers[0].name, "x-canary");
    assert_eq!(m[0].headers[0].value, ValueMatch::Exact("true".into()));
    assert_eq!(m[0].headers[1].value, ValueMatch::Regex("a.*".into()));
    assert_eq!(m[1].path, PathMatch::Exact("/health".into()));
    assert_eq!(m[2].path, PathMatch::Regex("/items/[0-9]+".into()));
    assert!(
        r.rules[0].backends.is_empty(),
        "no backendRefs: the parent (in the index)"
    );
}

#[test]
fn invalid_routes_are_rejected_with_the_field_path() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "  - matches: [{path: {type: RegularExpression, value: '/(x'}}]\n",
            "spec.rules[0].matches[0].path.value",
            "invalid regular expression",
        ),
        (
            "  - matches: [{path: {value: 'api'}}]\n",
            "spec.rules[0].matches[0].path.value",
            "must start with \"/\"",
        ),
        (
            "  - matches: [{path: {value: '/a//b'}}]\n",
            "spec.rules[0].matches[0].path.value",
            "must not contain",
        ),
        (
            "  - matches: [{path: {type: Prefix, value: '/a'}}]\n",
            "spec.rules[0].matches[0].path.type",
            "must be Exact, PathPrefix or RegularExpression",
        ),
        (
            "  - matches: [{method: FETCH}]\n",
            "spec.rules[0].matches[0].method",
            "must be one of",
        ),
        (
            "  - matches: [{headers: [{name: x, value: a}, {name: X, value: b}]}]\n",
            "spec.rules[0].matches[0].headers[1].name",
            "matched twice",
        ),
        (
            "  - matches: [{headers: [{name: 'bad name', value: a}]}]\n",
            "spec.rules[0].matches[0].headers[0].name",
            "HTTP header name",
        ),
        (
            "  - matches: [{queryParams: [{name: a, value: b}]}]\n",
            "spec.rules[0].matches[0].queryParams",
            "not supported",
        ),
        (
            "  - backendRefs: [{name: v2, port: 80, weight: 1000001}]\n",
            "spec.rules[0].backendRefs[0].weight",
            "between 0 and 1000000",
        ),
        (
            "  - backendRefs: [{name: v2, port: 80, weight: -1}]\n",
            "spec.rules[0].backendRefs[0].weight",
            "between 0 and 1000000",
        ),
        (
            "  - backendRefs: [{name: v2}]\n",
            "spec.rules[0].backendRefs[0].port",
            "required",
        ),
        (
            "  - backendRefs: [{name: v2, port: 80, namespace: other}]\n",
            "spec.rules[0].backendRefs[0].namespace",
            "ReferenceGrant",
        ),
        (
            "  - backendRefs: [{kind: ServiceImport, name: v2, port: 80}]\n",
            "spec.rules[0].backendRefs[0].kind",
            "must be Service",
        ),
        (
            "  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}]\n",
            "spec.rules[0].filters[0].type",
            "filter RequestRedirect is not supported",
        ),
        (
            "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}, {name: A, value: c}]}}]\n",
            "spec.rules[0].filters[0].requestHeaderModifier.set[1].name",
            "listed twice",
        ),
        (
            "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {sett: []}}]\n",
            "spec.rules[0].filters[0].requestHeaderModifier.sett",
            "unknown field",
        ),
        (
            "  - filters: [{type: RequestHeaderModifier}]\n",
            "spec.rules[0].filters[0].requestHeaderModifier",
            "required",
        ),
        (
            "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}, urlRewrite: {}}]\n",
            "spec.rules[0].filters[0].urlRewrite",
            "only requestHeaderModifier",
        ),
        (
            "  - timeouts: {request: 1s}\n",
            "spec.rules[0].timeouts",
            "ResiliencePolicy",
        ),
        (
            "  - backendRefs: [{name: v2, port: 80, bogus: 1}]\n",
            "spec.rules[0].backendRefs[0].bogus",
            "unknown field `bogus`",
        ),
    ];
    for (rules, path, reason) in cases {
        let err = with_rules(rules).unwrap_err();
        assert_eq!(err.path, *path, "{rules}: {err}");
        assert!(err.reason.contains(reason), "{rules}: {err}");
    }
}

#[test]
fn a_request_header_modifier_is_read() {
    let r = with_rules(
        "  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n\
         \x20       set: [{name: X-Version, value: v2}]\n        add: [{name: x-via, value: canary}]\n\
         \x20       remove: [X-Debug, x-debug]\n",
    )
    .unwrap();
    let m = r.rules[0].request_headers.as_ref().unwrap();
    assert_eq!(m.set, [("x-version".to_owned(), "v2".to_owned())]);
    assert_eq!(m.add, [("x-via".to_owned(), "canary".to_owned())]);
    assert_eq!(m.remove, ["x-debug"]);
}

#[test]
fn limits_are_enforced() {
    let rules = "  - {}\n".repeat(MAX_RULES + 1);
    let err = with_rules(&rules).unwrap_err();
    assert_eq!(err.path, "spec.rules");
    assert!(err.reason.contains("at most 16 rules"), "{err}");

    let backends = vec!["{name: b, port: 80}"; MAX_BACKENDS + 1].join(", ");
    let err = with_rules(&format!("  - backendRefs: [{backends}]\n")).unwrap_err();
    assert_eq!(err.path, "spec.rules[0].backendRefs");

    let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
    let err = with_rules(&format!("  - matches: [{{path: {{value: '{long}'}}}}]\n")).unwrap_err();
    assert!(err.reason.contains("at most 1024 characters"), "{err}");
}

#[test]
fn parents_other_than_services_belong_to_someone_else() {
    // A north-south route of some Gateway, with a filter we would reject: not ours.
    let r = route(
        "  parentRefs: [{name: public-gateway}]\n  rules:\n  - filters: [{type: RequestRedirect}]\n",
    )
    .unwrap();
    assert!(r.parents.is_empty());
    assert!(r.rules.is_empty());

    let r = route(
        "  parentRefs: [{name: gw}, {group: core, kind: Service, name: orders, port: 8080}, \
         {group: '', kind: Service, name: orders, sectionName: grpc}]\n",
    )
    .unwrap();
    assert_eq!(r.parents.len(), 2);
    assert_eq!(r.parents[0].port, Some(8080));
    assert!(r.parents[0].covers(8080, "http") && !r.parents[0].covers(80, "http"));
    assert!(r.parents[1].covers(9090, "grpc") && !r.parents[1].covers(9090, "web"));

    let err = route("  parentRefs: [{group: '', kind: Service, name: orders, namespace: other}]\n")
        .unwrap_err();
    assert_eq!(err.path, "spec.parentRefs[0].namespace");
    assert!(err.reason.contains("producer routes"), "{err}");
    let err =
        route("  parentRefs: [{group: '', kind: Service, name: orders, port: 0}]\n").unwrap_err();
    assert_eq!(err.path, "spec.parentRefs[0].port");
}

#[test]
fn v1beta1_is_read_too_and_other_gateway_kinds_are_skipped() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\n\
                metadata: {name: r}\nspec: {parentRefs: [{group: '', kind: Service, name: s}]}\n";
    assert!(matches!(
        decode(serde_yaml_ng::from_str(yaml).unwrap()),
        Ok(Decoded::Object(Object::HttpRoute(_)))
    ));
    let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: TLSRoute\nmetadata: {name: r}\n";
    assert!(matches!(
        decode(serde_yaml_ng::from_str(yaml).unwrap()),
        Ok(Decoded::Skipped { .. })
    ));
}
