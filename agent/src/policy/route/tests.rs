use std::collections::HashMap;

use http::HeaderValue;

use super::*;
use crate::config::Config;
use crate::policy::balance::MAX_SCHEDULE;

fn metrics() -> Metrics {
    Metrics::new(Arc::new(arc_swap::ArcSwap::from_pointee(Config::default())))
}

fn path(kind: v1::http_path_match::Type, value: &str) -> Option<v1::HttpPathMatch> {
    Some(v1::HttpPathMatch {
        r#type: kind as i32,
        value: value.into(),
    })
}

fn backend(name: &str, weight: u32) -> v1::HttpBackend {
    v1::HttpBackend {
        namespace: "shop".into(),
        name: name.into(),
        port: 80,
        weight,
    }
}

fn rule(
    index: u32,
    m: Option<v1::HttpRouteMatch>,
    backends: Vec<v1::HttpBackend>,
) -> v1::HttpRouteRule {
    v1::HttpRouteRule {
        source: "shop/orders".into(),
        rule_index: index,
        matches: m.into_iter().collect(),
        backends,
        request_header_modifier: None,
    }
}

fn table(rules: &[v1::HttpRouteRule]) -> RouteTable {
    RouteTable::build(rules, "orders.shop:80", None, &metrics()).unwrap()
}

/// The index of the rule that takes a request, if any.
fn selected(t: &RouteTable, method: &str, p: &str, headers: &[(&str, &str)]) -> Option<u32> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    t.select(&Method::from_bytes(method.as_bytes()).unwrap(), p, &map)
        .map(|r| r.index)
}

#[test]
fn path_prefixes_match_whole_segments() {
    use v1::http_path_match::Type;
    let t = table(&[rule(
        0,
        Some(v1::HttpRouteMatch {
            path: path(Type::Prefix, "/foo/"),
            ..Default::default()
        }),
        vec![backend("a", 1)],
    )]);
    assert_eq!(selected(&t, "GET", "/foo", &[]), Some(0));
    assert_eq!(selected(&t, "GET", "/foo/", &[]), Some(0));
    assert_eq!(selected(&t, "GET", "/foo/bar", &[]), Some(0));
    assert_eq!(selected(&t, "GET", "/foobar", &[]), None);
    assert_eq!(selected(&t, "GET", "/", &[]), None);

    let root = table(&[rule(
        0,
        Some(v1::HttpRouteMatch {
            path: path(Type::Prefix, "/"),
            ..Default::default()
        }),
        vec![backend("a", 1)],
    )]);
    assert_eq!(selected(&root, "GET", "/anything/at/all", &[]), Some(0));
}

#[test]
fn exact_and_regex_paths_match_the_whole_path() {
    use v1::http_path_match::Type;
    let t = table(&[
        rule(
            0,
            Some(v1::HttpRouteMatch {
                path: path(Type::Exact, "/v2"),
                ..Default::default()
            }),
            vec![backend("a", 1)],
        ),
        rule(
            1,
            Some(v1::HttpRouteMatch {
                path: path(Type::RegularExpression, "/items/[0-9]+"),
                ..Default::default()
            }),
            vec![backend("b", 1)],
        ),
    ]);
    assert_eq!(selected(&t, "GET", "/v2", &[]), Some(0));
    assert_eq!(selected(&t, "GET", "/v2/x", &[]), None);
    assert_eq!(selected(&t, "GET", "/items/42", &[]), Some(1));
    assert_eq!(selected(&t, "GET", "/items/42/x", &[]), None, "anchored");
    assert_eq!(selected(&t, "GET", "/x/items/42", &[]), None, "anchored");
}

#[test]
fn all_conditions_of_a_match_must_hold_and_matches_are_ored() {
    use v1::http_header_match::Type as H;
    use v1::http_path_match::Type as P;
    let both = v1::HttpRouteMatch {
        path: path(P::Prefix, "/api"),
        headers: vec![
            v1::HttpHeaderMatch {
                r#type: H::Exact as i32,
                name: "x-canary".into(),
                value: "true".into(),
            },
            v1::HttpHeaderMatch {
                r#type: H::RegularExpression as i32,
                name: "x-user".into(),
                value: "(alice|bob)".into(),
            },
        ],
        method: "POST".into(),
    };
    let mut r = rule(0, Some(both), vec![backend("a", 1)]);
    r.matches.push(v1::HttpRouteMatch {
        method: "DELETE".into(),
        ..Default::default()
    });
    let t = table(&[r]);
    let canary = [("x-canary", "true"), ("x-user", "alice")];
    assert_eq!(selected(&t, "POST", "/api/orders", &canary), Some(0));
    assert_eq!(selected(&t, "GET", "/api/orders", &canary), None, "method");
    assert_eq!(selected(&t, "POST", "/other", &canary), None, "path");
    assert_eq!(
        selected(
            &t,
            "POST",
            "/api",
            &[("x-canary", "TRUE"), ("x-user", "bob")]
        ),
        None,
        "exact values are case-sensitive"
    );
    assert_eq!(
        selected(
            &t,
            "POST",
            "/api",
            &[("x-canary", "true"), ("x-user", "alicex")]
        ),
        None,
        "regex values are anchored"
    );
    assert_eq!(
        selected(
            &t,
            "POST",
            "/api",
            &[("X-Canary", "true"), ("x-user", "bob")]
        ),
        Some(0),
        "header names are case-insensitive"
    );
    assert_eq!(
        selected(&t, "DELETE", "/anything", &[]),
        Some(0),
        "the second match"
    );
}

#[test]
fn a_rule_without_matches_takes_everything_and_the_first_rule_wins() {
    use v1::http_path_match::Type;
    let t = table(&[
        rule(
            3,
            Some(v1::HttpRouteMatch {
                path: path(Type::Exact, "/special"),
                ..Default::default()
            }),
            vec![backend("a", 1)],
        ),
        rule(7, None, vec![backend("b", 1)]),
    ]);
    assert_eq!(selected(&t, "GET", "/special", &[]), Some(3));
    assert_eq!(selected(&t, "PUT", "/whatever", &[]), Some(7));
}

#[test]
fn weighted_picks_follow_the_weights_exactly_and_smoothly() {
    let t = table(&[rule(
        0,
        None,
        vec![backend("v1", 90), backend("v2", 10), backend("off", 0)],
    )]);
    let r = &t.rules[0];
    let mut counts: HashMap<String, u32> = HashMap::new();
    let mut longest_v1_run = 0;
    let mut run = 0;
    for _ in 0..1000 {
        let b = r.pick().unwrap();
        *counts.entry(b.key.name.clone()).or_default() += 1;
        if b.key.name == "v1" {
            run += 1;
            longest_v1_run = longest_v1_run.max(run);
        } else {
            run = 0;
        }
    }
    assert_eq!(counts["v1"], 900);
    assert_eq!(counts["v2"], 100);
    assert!(!counts.contains_key("off"), "weight 0 gets nothing");
    assert!(
        longest_v1_run <= 9,
        "smooth: v2 every 10th request, got a run of {longest_v1_run}"
    );
}

#[test]
fn all_zero_weights_pick_nothing_and_huge_weights_are_scaled() {
    let zero = table(&[rule(0, None, vec![backend("a", 0), backend("b", 0)])]);
    assert!(zero.rules[0].pick().is_none());
    let none = table(&[rule(0, None, vec![])]);
    assert!(none.rules[0].pick().is_none());

    let huge = table(&[rule(
        0,
        None,
        vec![backend("a", 1_000_000), backend("b", 1)],
    )]);
    let r = &huge.rules[0];
    assert!(r.schedule.len() <= MAX_SCHEDULE as usize + 1);
    assert!(r.schedule.contains(&1), "a non-zero weight keeps a turn");
}

#[test]
fn a_config_push_keeps_the_split_position_of_an_unchanged_rule() {
    let m = metrics();
    let rules = [rule(0, None, vec![backend("v1", 1), backend("v2", 1)])];
    let first = RouteTable::build(&rules, "orders.shop:80", None, &m).unwrap();
    assert_eq!(first.rules[0].pick().unwrap().key.name, "v1");
    let second = RouteTable::build(&rules, "orders.shop:80", Some(&first), &m).unwrap();
    assert_eq!(
        second.rules[0].pick().unwrap().key.name,
        "v2",
        "continues where the old config stopped"
    );
    let changed = [rule(0, None, vec![backend("v1", 1), backend("v2", 3)])];
    let third = RouteTable::build(&changed, "orders.shop:80", Some(&second), &m).unwrap();
    assert!(
        Arc::strong_count(&third.rules[0].cursor) == 1,
        "a changed rule starts afresh"
    );
}

#[test]
fn rules_the_agent_cannot_enforce_are_refused_with_the_route_named() {
    use v1::http_path_match::Type;
    let bad_regex = [rule(
        2,
        Some(v1::HttpRouteMatch {
            path: path(Type::RegularExpression, "/(unclosed"),
            ..Default::default()
        }),
        vec![backend("a", 1)],
    )];
    let err = RouteTable::build(&bad_regex, "d", None, &metrics()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("shop/orders") && text.contains("rule 2"),
        "{text}"
    );
    assert!(text.contains("regular expression"), "{text}");

    let bad_header = [rule(
        0,
        Some(v1::HttpRouteMatch {
            headers: vec![v1::HttpHeaderMatch {
                r#type: 0,
                name: "bad header".into(),
                value: "x".into(),
            }],
            ..Default::default()
        }),
        vec![],
    )];
    let err = RouteTable::build(&bad_header, "d", None, &metrics()).unwrap_err();
    assert!(err.to_string().contains("invalid header name"), "{err}");

    let mut bad_port = rule(0, None, vec![backend("a", 1)]);
    bad_port.backends[0].port = 70_000;
    let err = RouteTable::build(&[bad_port], "d", None, &metrics()).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
}

#[test]
fn a_backend_naming_the_parent_port_is_recognised() {
    let t = table(&[rule(
        0,
        None,
        vec![backend("orders", 1), backend("orders-v2", 1)],
    )]);
    assert!(t.rules[0].backends[0].is_parent);
    assert!(!t.rules[0].backends[1].is_parent);
}

#[test]
fn a_header_modifier_removes_then_sets_then_adds() {
    let mut r = rule(0, None, vec![backend("a", 1)]);
    let h = |name: &str, value: &str| v1::HttpHeader {
        name: name.into(),
        value: value.into(),
    };
    r.request_header_modifier = Some(v1::HttpHeaderModifier {
        set: vec![h("x-version", "v2")],
        add: vec![h("x-via", "canary")],
        remove: vec!["x-debug".into()],
    });
    let t = table(&[r]);
    let mut headers = HeaderMap::new();
    headers.insert("x-debug", HeaderValue::from_static("1"));
    headers.append("x-version", HeaderValue::from_static("v1"));
    headers.append("x-version", HeaderValue::from_static("v0"));
    headers.insert("x-via", HeaderValue::from_static("client"));
    t.rules[0].modify(&mut headers);
    assert!(headers.get("x-debug").is_none());
    assert_eq!(
        headers.get_all("x-version").iter().collect::<Vec<_>>(),
        ["v2"]
    );
    assert_eq!(
        headers.get_all("x-via").iter().collect::<Vec<_>>(),
        ["client", "canary"]
    );

    let mut bad = rule(0, None, vec![]);
    bad.request_header_modifier = Some(v1::HttpHeaderModifier {
        set: vec![h("x-a", "bad\nvalue")],
        ..Default::default()
    });
    assert!(RouteTable::build(&[bad], "d", None, &metrics()).is_err());
}
