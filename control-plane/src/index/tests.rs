use std::collections::BTreeMap;

use bulwark_proto::v1 as proto;

use super::*;
use crate::testing::{examples, model, with_document};

fn index(model: &Model) -> Index {
    Index::new(1_000, model, Arc::new(Metrics::new()))
}

fn service<'a>(state: &'a IndexState, name: &str) -> &'a proto::Service {
    state
        .outbound
        .services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

fn policy_source(state: &IndexState, service_name: &str, port: usize) -> Option<String> {
    service(state, service_name).ports[port]
        .resilience
        .as_ref()
        .map(|r| r.source.clone())
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
    spec:\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n\
    \x20 - {name: admin, port: 9000, targetPort: admin-port}\n";

fn resilience(name: &str, created: Option<&str>, target: &str) -> String {
    let created = created
        .map(|c| format!(", creationTimestamp: '{c}'"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: bulwark.io/v1alpha1\nkind: ResiliencePolicy\n\
         metadata: {{name: {name}, namespace: shop{created}}}\n\
         spec: {{targetRefs: [{target}], retry: {{}}}}\n"
    )
}

#[test]
fn endpoints_come_from_ready_endpoints_and_the_matching_slice_port() {
    let idx = index(&examples());
    let state = idx.state();
    let reviews = service(&state, "reviews");
    assert_eq!(reviews.namespace, "demo");
    assert_eq!(reviews.ports.len(), 1);
    assert_eq!(reviews.ports[0].port, 80);
    let addresses: Vec<_> = reviews.ports[0]
        .endpoints
        .iter()
        .map(|e| e.address.as_str())
        .collect();
    assert_eq!(
        addresses,
        ["127.0.0.21:8080", "127.0.0.22:8080", "127.0.0.23:8080"],
        "127.0.0.24 is not ready"
    );
    let catalog = service(&state, "catalog");
    assert_eq!(catalog.ports[0].app_protocol, "http");
    assert_eq!(catalog.ports[0].endpoints[0].pod, "demo/catalog-0");
}

#[test]
fn slices_without_the_port_name_contribute_nothing_and_ipv6_is_bracketed() {
    let m = model(&format!(
        "{SERVICE}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-v6, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv6\nports: [{{name: http, port: 8080}}, {{name: admin-port, port: 9001}}]\n\
         endpoints: [{{addresses: ['fd00::1']}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-other, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: metrics, port: 7000}}]\n\
         endpoints: [{{addresses: [10.0.0.9]}}]\n"
    ));
    let state = index(&m).state();
    let web = service(&state, "web");
    let http: Vec<_> = web.ports[0]
        .endpoints
        .iter()
        .map(|e| e.address.clone())
        .collect();
    assert_eq!(http, ["[fd00::1]:8080"]);
    assert!(
        web.ports[1].endpoints.is_empty(),
        "the admin port's slice port is named admin-port, not admin"
    );
}

#[test]
fn endpoints_get_their_pods_labels_by_target_ref_or_address() {
    let m = model(&format!(
        "{SERVICE}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints:\n- {{addresses: [10.0.0.1], targetRef: {{kind: Pod, name: web-a}}}}\n\
         - {{addresses: [10.0.0.2]}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-a, namespace: shop, labels: {{version: v1}}}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-b, namespace: shop, labels: {{version: v2}}}}\n\
         status: {{podIP: 10.0.0.2}}\n"
    ));
    let state = index(&m).state();
    let endpoints = &service(&state, "web").ports[0].endpoints;
    assert_eq!(endpoints[0].labels["version"], "v1");
    assert_eq!(endpoints[0].pod, "shop/web-a");
    assert_eq!(endpoints[1].labels["version"], "v2");
    assert_eq!(endpoints[1].pod, "shop/web-b");
    assert_eq!(endpoints[1].weight, 1);
}

#[test]
fn endpoints_of_meshed_pods_carry_their_spiffe_id_when_the_mesh_issues_identities() {
    let m = model(&format!(
        "{SERVICE}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints:\n- {{addresses: [10.0.0.1], targetRef: {{kind: Pod, name: web-a}}}}\n\
         - {{addresses: [10.0.0.2], targetRef: {{kind: Pod, name: web-b}}}}\n\
         - {{addresses: [10.0.0.3]}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-a, namespace: shop, \
         annotations: {{bulwark.io/injected: v1}}}}\nspec: {{serviceAccountName: web}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-b, namespace: shop}}\n"
    ));
    let with_identity =
        Index::with_trust_domain(1, &m, Arc::new(Metrics::new()), Some("td.test".into()));
    let state = with_identity.state();
    let identities: Vec<&str> = service(&state, "web").ports[0]
        .endpoints
        .iter()
        .map(|e| e.identity.as_str())
        .collect();
    // Meshed (annotated by the injector); not meshed; no pod known.
    assert_eq!(identities, ["spiffe://td.test/ns/shop/sa/web", "", ""]);
    // Without identities, nobody is asked for mutual TLS.
    let state = index(&m).state();
    assert!(
        service(&state, "web").ports[0]
            .endpoints
            .iter()
            .all(|e| e.identity.is_empty())
    );
}

#[test]
fn effective_policies_carry_exact_values_with_defaults() {
    let state = index(&examples()).state();
    let reviews = service(&state, "reviews").ports[0]
        .resilience
        .clone()
        .unwrap();
    assert_eq!(reviews.source, "demo/reviews");
    let retry = reviews.retry.unwrap();
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.grpc_codes, [14]);
    assert_eq!(retry.status_codes, [500]);
    let payments = service(&state, "payments").ports[0]
        .resilience
        .clone()
        .unwrap();
    let retry = payments.retry.unwrap();
    assert_eq!(retry.attempts, 1);
    assert_eq!(
        retry.retry_on,
        ["connect-failure", "reset", "gateway-error"],
        "default conditions"
    );
    assert_eq!(retry.budget.unwrap().min_per_second, 10);
    let breaker = payments.circuit_breaker.unwrap();
    assert_eq!(breaker.half_open_probes, 1);
    assert!(breaker.failure_ratio.is_none());
    assert_eq!(payments.bulkhead.unwrap().max_connections, 0);
    let catalog = service(&state, "catalog").ports[0]
        .resilience
        .clone()
        .unwrap();
    assert!(
        catalog.circuit_breaker.is_none(),
        "absent section stays absent"
    );
    assert!(catalog.load_balancer.is_none());
    assert_eq!(catalog.bulkhead.unwrap().max_pending, 50);
    assert_eq!(
        service(&state, "frontend").ports[0].resilience,
        None,
        "no policy targets frontend"
    );
}

#[test]
fn a_port_specific_policy_beats_a_whole_service_one() {
    let m = model(&format!(
        "{SERVICE}{}{}",
        resilience(
            "whole",
            Some("2020-01-01T00:00:00Z"),
            "{kind: Service, name: web}"
        ),
        resilience(
            "http-only",
            Some("2024-01-01T00:00:00Z"),
            "{kind: Service, name: web, sectionName: http}"
        ),
    ));
    let idx = index(&m);
    let state = idx.state();
    assert_eq!(
        policy_source(&state, "web", 0).as_deref(),
        Some("shop/http-only")
    );
    assert_eq!(
        policy_source(&state, "web", 1).as_deref(),
        Some("shop/whole")
    );
    let conflicts: Vec<_> = idx
        .diagnostics()
        .iter()
        .filter(|d| matches!(d, Diagnostic::Conflict { .. }))
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        conflicts,
        [
            "ResiliencePolicy shop/whole is not applied to shop/web port \"http\": shop/http-only wins"
        ]
    );
}

#[test]
fn between_equals_the_oldest_then_the_name_wins() {
    let target = "{kind: Service, name: web}";
    let m = model(&format!(
        "{SERVICE}{}{}{}",
        resilience("a-new", Some("2024-06-01T00:00:00Z"), target),
        resilience("b-old", Some("2020-06-01T00:00:00Z"), target),
        resilience("c-unknown-age", None, target),
    ));
    assert_eq!(
        policy_source(&index(&m).state(), "web", 0).as_deref(),
        Some("shop/b-old")
    );

    let m = model(&format!(
        "{SERVICE}{}{}",
        resilience("zeta", None, target),
        resilience("alpha", None, target),
    ));
    assert_eq!(
        policy_source(&index(&m).state(), "web", 0).as_deref(),
        Some("shop/alpha")
    );
}

#[test]
fn a_policy_for_a_missing_service_waits_for_it() {
    let policy = resilience("early", None, "{kind: Service, name: web}");
    let mut idx = index(&model(&policy));
    assert!(idx.diagnostics().iter().any(|d| matches!(
        d,
        Diagnostic::MissingService { service, .. } if service == "web"
    )));
    assert!(idx.apply(&model(&format!("{SERVICE}{policy}"))));
    assert_eq!(
        policy_source(&idx.state(), "web", 0).as_deref(),
        Some("shop/early")
    );
    assert!(idx.diagnostics().is_empty());
}

#[test]
fn policies_attach_only_within_their_namespace() {
    let m = model(&format!(
        "{SERVICE}---\napiVersion: bulwark.io/v1alpha1\nkind: ResiliencePolicy\n\
         metadata: {{name: elsewhere, namespace: other}}\n\
         spec: {{targetRefs: [{{kind: Service, name: web}}]}}\n"
    ));
    let idx = index(&m);
    assert_eq!(policy_source(&idx.state(), "web", 0), None);
}

#[test]
fn a_section_that_matches_no_port_is_reported() {
    let m = model(&format!(
        "{SERVICE}{}",
        resilience(
            "typo",
            None,
            "{kind: Service, name: web, sectionName: htpp}"
        )
    ));
    let idx = index(&m);
    assert_eq!(policy_source(&idx.state(), "web", 0), None);
    assert!(idx.diagnostics().iter().any(|d| matches!(
        d,
        Diagnostic::MissingSection { section, .. } if section == "htpp"
    )));
}

/// The inbound part an agent in `namespace` with `labels` gets, and when it changed.
fn for_agent(m: &Model, namespace: &str, labels: &[(&str, &str)]) -> (proto::Inbound, u64) {
    let labels: BTreeMap<_, _> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    index(m).state().inbound.for_agent(namespace, &labels)
}

fn rate_limits(m: &Model, labels: &[(&str, &str)]) -> Vec<proto::RateLimit> {
    for_agent(m, "shop", labels).0.rate_limits
}

fn rate_limit_policy(target: &str) -> String {
    format!(
        "---\napiVersion: bulwark.io/v1alpha1\nkind: RateLimitPolicy\n\
         metadata: {{name: web, namespace: shop}}\n\
         spec: {{targetRefs: [{target}], limits: [{{name: all, rate: {{requests: 5, per: 1s}}}}]}}\n"
    )
}

const ADMIN_SLICE: &str = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
    metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
    addressType: IPv4\nports: [{name: admin, port: 9100}, {name: http, port: 8080}]\n\
    endpoints: [{addresses: [10.0.0.1]}]\n";

#[test]
fn rate_limits_apply_to_target_ports_of_matching_pods() {
    let m = model(&format!(
        "{SERVICE}{ADMIN_SLICE}{}",
        rate_limit_policy("{kind: Service, name: web}")
    ));
    let limits = rate_limits(&m, &[("app", "web"), ("pod-template-hash", "x")]);
    assert_eq!(limits.len(), 1);
    assert_eq!(limits[0].source, "shop/web");
    assert_eq!(limits[0].name, "all");
    assert_eq!(
        limits[0].ports,
        [8080, 9100],
        "named targetPort resolved through the slice"
    );
    assert_eq!(limits[0].burst, 5, "burst defaults to the rate");
    assert!(
        rate_limits(&m, &[("app", "api")]).is_empty(),
        "selector does not match"
    );
}

#[test]
fn a_section_narrows_rate_limits_to_one_port() {
    let m = model(&format!(
        "{SERVICE}{ADMIN_SLICE}{}",
        rate_limit_policy("{kind: Service, name: web, sectionName: http}")
    ));
    assert_eq!(rate_limits(&m, &[("app", "web")])[0].ports, [8080]);
}

#[test]
fn unresolvable_ports_never_widen_a_limit_to_every_port() {
    // Without the slice, the admin port's name cannot be resolved: the limit must not
    // be sent with an empty port list, which would mean "every port".
    let m = model(&format!(
        "{SERVICE}{}",
        rate_limit_policy("{kind: Service, name: web, sectionName: admin}")
    ));
    assert!(rate_limits(&m, &[("app", "web")]).is_empty());
    let idx = index(&m);
    assert!(
        idx.diagnostics()
            .iter()
            .any(|d| matches!(d, Diagnostic::UnresolvedTargetPort { .. }))
    );
}

#[test]
fn publishes_a_new_revision_only_when_something_visible_changed() {
    let mut idx = index(&examples());
    let mut updates = idx.subscribe();
    updates.borrow_and_update();
    assert!(!idx.apply(&examples()));
    assert!(!updates.has_changed().unwrap());

    let outbound_before = idx.state().outbound.clone();
    let edited = with_document(
        examples(),
        "apiVersion: bulwark.io/v1alpha1\nkind: RateLimitPolicy\n\
         metadata: {name: frontend, namespace: demo}\n\
         spec: {targetRefs: [{kind: Service, name: frontend}], limits: [{name: t, rate: {requests: 1, per: 1s}}]}\n",
    );
    assert!(idx.apply(&edited));
    assert!(updates.has_changed().unwrap());
    let state = idx.state();
    assert_eq!(state.revision, 1_001);
    assert!(
        Arc::ptr_eq(&outbound_before, &state.outbound),
        "an unchanged outbound part is shared, not rebuilt"
    );

    // A change to outbound policy only: the inbound part is shared, so what agents'
    // views computed from it (their limits, per label set) stays valid.
    let inbound_before = state.inbound.clone();
    let retried = with_document(
        edited,
        "apiVersion: bulwark.io/v1alpha1\nkind: ResiliencePolicy\n\
         metadata: {name: reviews, namespace: demo}\n\
         spec: {targetRefs: [{kind: Service, name: reviews}], retry: {attempts: 5}}\n",
    );
    assert!(idx.apply(&retried));
    let state = idx.state();
    assert!(
        Arc::ptr_eq(&inbound_before, &state.inbound),
        "an unchanged inbound part is shared, not rebuilt"
    );
    let changed: Vec<_> = state
        .outbound
        .services
        .iter()
        .filter(|s| s.version == state.revision)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        changed,
        ["reviews"],
        "only the changed service has a new version"
    );
}

fn authorization(m: &Model, labels: &[(&str, &str)]) -> (Vec<proto::AuthorizationPolicy>, u64) {
    let (inbound, changed_at) = for_agent(m, "shop", labels);
    (inbound.authorization, changed_at)
}

fn authorization_policy(name: &str, attach: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: bulwark.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  {attach}\n{extra}\
         \x20 rules: [{{from: [{{serviceAccount: orders}}], to: [{{methods: [POST], paths: ['/charge', '/refund/*']}}]}}]\n"
    )
}

#[test]
fn authorization_reaches_the_pods_of_its_target_with_their_ports() {
    let m = model(&format!(
        "{SERVICE}{ADMIN_SLICE}{}",
        authorization_policy(
            "web",
            "targetRefs: [{kind: Service, name: web, sectionName: http}]",
            ""
        )
    ));
    let (policies, _) = authorization(&m, &[("app", "web")]);
    assert_eq!(policies.len(), 1);
    let p = &policies[0];
    assert_eq!(
        (p.source.as_str(), &p.ports[..], p.shadow),
        ("shop/web", &[8080][..], false)
    );
    assert_eq!(
        p.rules[0].from[0],
        proto::SourceMatch {
            trust_domain: "*".into(),
            namespace: "shop".into(),
            service_account: "orders".into(),
        }
    );
    assert_eq!(
        p.rules[0].to[0].paths[1].kind,
        Some(proto::path_match::Kind::Prefix("/refund/".into()))
    );
    assert!(authorization(&m, &[("app", "api")]).0.is_empty());
}

#[test]
fn a_selector_policy_reaches_matching_pods_on_every_port_and_shadow_is_kept() {
    let m = model(&format!(
        "{SERVICE}{}{}",
        authorization_policy(
            "by-label",
            "selector: {matchLabels: {tier: payments}}",
            "  mode: Shadow\n"
        ),
        authorization_policy(
            "web",
            "targetRefs: [{kind: Service, name: web, sectionName: http}]",
            ""
        )
    ));
    let (policies, _) = authorization(&m, &[("app", "web"), ("tier", "payments")]);
    let sources: Vec<_> = policies
        .iter()
        .map(|p| (p.source.as_str(), p.ports.clone(), p.shadow))
        .collect();
    assert_eq!(
        sources,
        vec![
            ("shop/by-label", vec![], true),
            ("shop/web", vec![8080], false)
        ]
    );
    let (only_label, _) = authorization(&m, &[("tier", "payments")]);
    assert_eq!(only_label.len(), 1);
}

#[test]
fn an_authorization_policy_for_a_missing_service_is_diagnosed_not_sent() {
    let m = model(&authorization_policy(
        "ghost",
        "targetRefs: [{kind: Service, name: nowhere}]",
        "",
    ));
    let idx = index(&m);
    assert!(idx.diagnostics().iter().any(|d| matches!(
        d,
        Diagnostic::MissingService {
            kind: crate::model::Kind::AuthorizationPolicy,
            ..
        }
    )));
    assert!(authorization(&m, &[("app", "web")]).0.is_empty());
}

fn peer_authentication(name: &str, created: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
         metadata: {{name: {name}, namespace: shop, creationTimestamp: '{created}'}}\n\
         spec: {spec}\n"
    )
}

fn pod(name: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {labels}}}\n"
    )
}

/// The PeerAuthentication an agent in `namespace` with `labels` gets.
fn mtls(m: &Model, namespace: &str, labels: &[(&str, &str)]) -> Option<proto::PeerAuthentication> {
    for_agent(m, namespace, labels).0.peer_authentication
}

fn mtls_source(m: &Model, labels: &[(&str, &str)]) -> Option<String> {
    mtls(m, "shop", labels).map(|p| p.source)
}

#[test]
fn a_pod_no_peer_authentication_covers_gets_none_and_is_permissive() {
    let m = model(&format!(
        "{SERVICE}{}",
        peer_authentication(
            "web",
            "2024-01-01T00:00:00Z",
            "{selector: {matchLabels: {app: web}}, mode: Strict}"
        )
    ));
    assert_eq!(mtls(&m, "shop", &[("app", "api")]), None);
    assert_eq!(
        mtls(&m, "prod", &[("app", "web")]),
        None,
        "another namespace"
    );
    assert!(
        mtls(&examples(), "demo", &[("app", "frontend")]).is_none(),
        "the demo has none: its callers stay plaintext"
    );
}

#[test]
fn the_wire_form_spells_every_mode_out_with_the_port_overrides() {
    let m = model(&peer_authentication(
        "mesh",
        "2024-01-01T00:00:00Z",
        "{portLevelMtls: [{port: 8443, mode: Strict}, {port: 15021, mode: Permissive}]}",
    ));
    let p = mtls(&m, "shop", &[]).unwrap();
    assert_eq!(p.source, "shop/mesh");
    assert_eq!(
        p.mode,
        i32::from(proto::MtlsMode::Permissive),
        "not UNSPECIFIED"
    );
    let mut ports: Vec<_> = p.port_modes.into_iter().collect();
    ports.sort_unstable();
    assert_eq!(
        ports,
        [
            (8443, i32::from(proto::MtlsMode::Strict)),
            (15021, i32::from(proto::MtlsMode::Permissive))
        ]
    );
}

#[test]
fn a_matching_selector_policy_beats_the_namespace_wide_one_and_the_older_wide_one_wins() {
    let m = model(&format!(
        "{}{}{}",
        peer_authentication("newer-wide", "2024-01-02T00:00:00Z", "{mode: Permissive}"),
        peer_authentication("older-wide", "2024-01-01T00:00:00Z", "{mode: Strict}"),
        // Younger than both namespace-wide ones, and still first where it matches.
        peer_authentication(
            "web",
            "2024-06-01T00:00:00Z",
            "{selector: {matchLabels: {app: web}}, mode: Permissive}"
        ),
    ));
    assert_eq!(
        mtls_source(&m, &[("app", "web")]).as_deref(),
        Some("shop/web")
    );
    let other = mtls(&m, "shop", &[("app", "api")]).unwrap();
    assert_eq!(other.source, "shop/older-wide");
    assert_eq!(other.mode, i32::from(proto::MtlsMode::Strict));
    let conflicts: Vec<_> = index(&m)
        .diagnostics()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        conflicts,
        [
            "PeerAuthentication shop/newer-wide is not applied to every pod of namespace shop: \
          shop/older-wide wins"
        ],
        "a selector policy overriding a namespace-wide one is no conflict"
    );
}

#[test]
fn two_selectors_conflict_where_a_pod_of_the_model_matches_both() {
    let policies = format!(
        "{}{}",
        peer_authentication(
            "by-tier",
            "2024-01-02T00:00:00Z",
            "{selector: {matchLabels: {tier: front}}, mode: Permissive}"
        ),
        peer_authentication(
            "by-app",
            "2024-01-01T00:00:00Z",
            "{selector: {matchLabels: {app: web}}, mode: Strict}"
        ),
    );
    // The selectors could meet, but no pod has both labels: each is in force on its own.
    let apart = model(&format!(
        "{policies}{}{}",
        pod("web-0", "{app: web}"),
        pod("cdn-0", "{tier: front}")
    ));
    assert!(index(&apart).diagnostics().is_empty());
    let both = [("app", "web"), ("tier", "front")];
    assert_eq!(
        mtls_source(&apart, &both).as_deref(),
        Some("shop/by-app"),
        "the older"
    );

    let meeting = with_document(apart, &pod("web-1", "{app: web, tier: front}"));
    assert_eq!(
        index(&meeting).diagnostics().iter().collect::<Vec<_>>(),
        [&Diagnostic::PeerAuthenticationConflict {
            winner: ObjectName::new("shop", "by-app"),
            loser: ObjectName::new("shop", "by-tier"),
            namespace_wide: false,
        }]
    );
    assert_eq!(
        mtls_source(&meeting, &[("tier", "front")]).as_deref(),
        Some("shop/by-tier")
    );
}

#[test]
fn changing_a_peer_authentication_is_a_change_for_the_pods_it_covers_only() {
    let strict = |mode: &str| {
        with_document(
            examples(),
            &format!(
                "apiVersion: bulwark.io/v1alpha1\nkind: PeerAuthentication\n\
                 metadata: {{name: frontend, namespace: demo}}\n\
                 spec: {{selector: {{matchLabels: {{app: frontend}}}}, mode: {mode}}}\n"
            ),
        )
    };
    let mut idx = index(&strict("Permissive"));
    let labels = |app: &str| BTreeMap::from([("app".to_owned(), app.to_owned())]);
    let before = idx.state();
    let (_, catalog_at) = before.inbound.for_agent("demo", &labels("catalog"));
    assert!(idx.apply(&strict("Strict")));
    let after = idx.state();
    let (frontend, frontend_at) = after.inbound.for_agent("demo", &labels("frontend"));
    assert_eq!(frontend_at, after.revision);
    assert_eq!(
        frontend.peer_authentication.map(|p| p.mode),
        Some(i32::from(proto::MtlsMode::Strict))
    );
    assert_eq!(
        after.inbound.for_agent("demo", &labels("catalog")).1,
        catalog_at
    );
}

#[test]
fn the_strict_example_makes_the_demo_strict_but_the_frontends_edge_port() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/strict/peer-authentication.yaml");
    let m = with_document(examples(), &std::fs::read_to_string(path).unwrap());
    let strict = i32::from(proto::MtlsMode::Strict);
    let catalog = mtls(&m, "demo", &[("app", "catalog")]).unwrap();
    assert_eq!(
        (catalog.source.as_str(), catalog.mode),
        ("demo/default", strict)
    );
    let frontend = mtls(&m, "demo", &[("app", "frontend")]).unwrap();
    assert_eq!(
        (frontend.source.as_str(), frontend.mode),
        ("demo/frontend", strict)
    );
    assert_eq!(
        frontend.port_modes.get(&8080).copied(),
        Some(i32::from(proto::MtlsMode::Permissive))
    );
    assert!(
        !index(&m)
            .diagnostics()
            .iter()
            .any(|d| matches!(d, Diagnostic::PeerAuthenticationConflict { .. }))
    );
}

/// An EndpointSlice of `web` with these endpoints (`address`, ready).
fn web_slice(endpoints: &[(&str, bool)]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|(a, ready)| format!("{{addresses: [{a}], conditions: {{ready: {ready}}}}}"))
        .collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints: [{}]\n",
        endpoints.join(", ")
    )
}

fn limit_policy(limit: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: bulwark.io/v1alpha1\nkind: RateLimitPolicy\n\
         metadata: {{name: web, namespace: shop}}\n\
         spec: {{targetRefs: [{{kind: Service, name: web}}]{extra}, limits: [{limit}]}}\n"
    )
}

#[test]
fn a_service_limit_is_split_over_the_ready_pods_as_they_scale() {
    let limit = "{name: all, rate: {requests: 300, per: 1s}, burst: 90}";
    let share = |endpoints: &[(&str, bool)]| {
        let m = model(&format!(
            "{SERVICE}{}{}",
            web_slice(endpoints),
            limit_policy(limit, "")
        ));
        let l = rate_limits(&m, &[("app", "web")]).remove(0);
        let per = l.period.unwrap();
        (l.requests, per.seconds, l.burst, l.split)
    };
    assert_eq!(share(&[]), (300, 1, 90, 1), "no ready pod: the whole limit");
    assert_eq!(share(&[("10.0.0.1", true)]), (300, 1, 90, 1));
    assert_eq!(
        share(&[("10.0.0.1", true), ("10.0.0.2", false)]),
        (300, 1, 90, 1),
        "a pod that is not ready takes no share"
    );
    let four = [
        ("10.0.0.1", true),
        ("10.0.0.2", true),
        ("10.0.0.3", true),
        ("10.0.0.4", true),
    ];
    assert_eq!(share(&four), (75, 1, 22, 4));
    let seven: Vec<(String, bool)> = (1..=7).map(|i| (format!("10.0.0.{i}"), true)).collect();
    let seven: Vec<(&str, bool)> = seven.iter().map(|(a, r)| (a.as_str(), *r)).collect();
    assert_eq!(share(&seven), (300, 7, 12, 7), "300/7 per second, exactly");
}

#[test]
fn scaling_reaches_the_pods_as_a_new_inbound_part() {
    let limit = "{name: all, rate: {requests: 100, per: 1s}}";
    let one = model(&format!(
        "{SERVICE}{}{}",
        web_slice(&[("10.0.0.1", true)]),
        limit_policy(limit, "")
    ));
    let mut idx = index(&one);
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let (before, _) = idx.state().inbound.for_agent("shop", &labels);
    assert_eq!(before.rate_limits[0].requests, 100);
    let two = model(&format!(
        "{SERVICE}{}{}",
        web_slice(&[("10.0.0.1", true), ("10.0.0.2", true)]),
        limit_policy(limit, "")
    ));
    assert!(idx.apply(&two), "a new ready pod is a change for the pods");
    let (after, changed_at) = idx.state().inbound.for_agent("shop", &labels);
    assert_eq!(
        (after.rate_limits[0].requests, after.rate_limits[0].burst),
        (50, 50)
    );
    assert_eq!(changed_at, idx.state().revision);
}

#[test]
fn pod_and_shared_scopes_go_with_the_whole_limit() {
    let ready = web_slice(&[("10.0.0.1", true), ("10.0.0.2", true)]);
    let m = model(&format!(
        "{SERVICE}{ready}{}",
        limit_policy(
            "{name: pod, scope: Pod, rate: {requests: 100, per: 1s}}, \
             {name: shared, scope: Shared, onStoreUnavailable: FailOpen, rate: {requests: 100, per: 1s}, \
              cost: {rules: [{method: POST, cost: 3}]}}",
            ", responseHeaders: true"
        )
    ));
    let limits = rate_limits(&m, &[("app", "web")]);
    let pod = &limits[0];
    assert_eq!(
        (pod.name.as_str(), pod.requests, pod.split),
        ("pod", 100, 0)
    );
    assert_eq!(pod.scope, i32::from(proto::RateLimitScope::Pod));
    let shared = &limits[1];
    assert_eq!(
        (shared.requests, shared.burst),
        (50, 50),
        "the share it falls back to"
    );
    let whole = shared.shared.as_ref().unwrap();
    assert_eq!((whole.requests, whole.burst), (100, 100));
    assert_eq!(whole.bucket, "in/shop/web/shared");
    assert_eq!(
        whole.on_store_unavailable,
        i32::from(proto::StoreUnavailable::FailOpen)
    );
    assert_eq!(shared.cost.as_ref().unwrap().rules[0].cost, 3);
    assert!(shared.response_headers && pod.response_headers);
    assert!(pod.cost.is_none(), "the default cost is not sent");
}

#[test]
fn outbound_limits_go_to_the_callers_on_the_targets_port_and_never_inbound() {
    let m = model(&format!(
        "{SERVICE}{}{}",
        web_slice(&[("10.0.0.1", true)]),
        limit_policy(
            "{name: calls, scope: Shared, rate: {requests: 10, per: 1s}}",
            ", direction: Outbound"
        )
    ));
    assert!(
        rate_limits(&m, &[("app", "web")]).is_empty(),
        "not the target's pods"
    );
    let idx = index(&m);
    let web = service(&idx.state(), "web").clone();
    for port in &web.ports {
        assert_eq!(port.rate_limits.len(), 1, "port {}", port.port);
        let limit = &port.rate_limits[0];
        assert!(limit.ports.is_empty());
        assert_eq!(limit.shared.as_ref().unwrap().bucket, "out/shop/web/calls");
    }
    let missing = model(&limit_policy(
        "{name: calls, rate: {requests: 10, per: 1s}}",
        ", direction: Outbound",
    ));
    assert!(index(&missing).diagnostics().iter().any(|d| matches!(
        d,
        Diagnostic::MissingService {
            kind: crate::model::Kind::RateLimitPolicy,
            ..
        }
    )));
}
