//! Route status (Gateway API HTTPRoute and GRPCRoute, the same for both kinds): for
//! each Service parent, an entry in
//! `status.parents` with our `controllerName` and two conditions, `Accepted` (the route
//! is valid and its parent port exists) and `ResolvedRefs` (every backend exists).
//! Entries of other controllers (a Gateway implementation's) are kept as they are.

use serde_json::{Value as Json, json};

use crate::model::http_route::HttpRoute;
use crate::model::{Model, ObjectKey, ObjectName, Protocol};
use crate::source::kubernetes::RouteObservation;

/// Our `controllerName` in `status.parents[]`.
pub const CONTROLLER: &str = "bulwark.io/mesh";

/// One condition we set: type, status, reason, message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `Accepted` or `ResolvedRefs`.
    pub kind: &'static str,
    /// Whether it holds.
    pub ok: bool,
    /// The Gateway API reason.
    pub reason: &'static str,
    /// For `kubectl describe`.
    pub message: String,
}

impl Verdict {
    fn new(kind: &'static str, ok: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Verdict {
            kind,
            ok,
            reason,
            message: message.into(),
        }
    }
}

/// The conditions of one Service parent of a route.
pub fn judge(
    key: &ObjectKey,
    parent_ref: &Json,
    observation: &RouteObservation,
    model: &Model,
) -> Vec<Verdict> {
    if let Some(error) = &observation.error {
        let kept = if observation.kept_previous {
            "; the last accepted version stays in force"
        } else {
            "; it is not applied"
        };
        return vec![Verdict::new(
            "Accepted",
            false,
            "UnsupportedValue",
            format!("{error}{kept}"),
        )];
    }
    let name = &key.name;
    let Some(route) = model.routes(key.kind).and_then(|routes| routes.get(name)) else {
        return vec![Verdict::new(
            "Accepted",
            false,
            "Pending",
            "not in the model yet",
        )];
    };
    let service = parent_ref
        .get("name")
        .and_then(Json::as_str)
        .unwrap_or_default();
    let port = parent_ref.get("port").and_then(Json::as_u64);
    let section = parent_ref.get("sectionName").and_then(Json::as_str);
    let accepted = match model
        .services
        .get(&ObjectName::new(name.namespace.as_str(), service))
    {
        None => Verdict::new(
            "Accepted",
            false,
            "NoMatchingParent",
            format!(
                "Service {}/{service} does not exist; the route applies once it does",
                name.namespace
            ),
        ),
        Some(svc)
            if !svc.ports.iter().any(|p| {
                p.protocol == Protocol::Tcp
                    && port.is_none_or(|n| n == u64::from(p.port))
                    && section.is_none_or(|s| s == p.name)
            }) =>
        {
            Verdict::new(
                "Accepted",
                false,
                "NoMatchingParent",
                format!("Service {}/{service} has no such TCP port", name.namespace),
            )
        }
        Some(_) => Verdict::new("Accepted", true, "Accepted", "the route is in force"),
    };
    vec![accepted, resolved_refs(route, model)]
}

fn resolved_refs(route: &HttpRoute, model: &Model) -> Verdict {
    let namespace = route.name.namespace.as_str();
    let mut missing = Vec::new();
    for rule in &route.rules {
        for b in &rule.backends {
            let found = model
                .services
                .get(&ObjectName::new(namespace, b.service.as_str()))
                .is_some_and(|s| {
                    s.ports
                        .iter()
                        .any(|p| p.protocol == Protocol::Tcp && p.port == b.port)
                });
            let text = format!("{}:{}", b.service, b.port);
            if !found && !missing.contains(&text) {
                missing.push(text);
            }
        }
    }
    if missing.is_empty() {
        Verdict::new("ResolvedRefs", true, "ResolvedRefs", "every backend exists")
    } else {
        Verdict::new(
            "ResolvedRefs",
            false,
            "BackendNotFound",
            format!(
                "no such Service port in {namespace}: {}; its share of requests gets 500",
                missing.join(", ")
            ),
        )
    }
}

/// The `status.parents` to write, or `None` when ours already say this (for the
/// current generation). Other controllers' entries are kept; a condition keeps its
/// `lastTransitionTime` while its status does not change.
pub fn desired(
    key: &ObjectKey,
    observation: &RouteObservation,
    model: &Model,
    now: &str,
) -> Option<Vec<Json>> {
    let ours =
        |entry: &&Json| entry.get("controllerName").and_then(Json::as_str) == Some(CONTROLLER);
    let previous: Vec<&Json> = observation.status_parents.iter().filter(ours).collect();
    let mut entries: Vec<Json> = Vec::new();
    let mut changed = previous.len() != observation.parent_refs.len();
    for parent_ref in &observation.parent_refs {
        let before = previous
            .iter()
            .find(|e| e.get("parentRef") == Some(parent_ref))
            .and_then(|e| e.get("conditions"))
            .and_then(Json::as_array);
        let conditions: Vec<Json> = judge(key, parent_ref, observation, model)
            .into_iter()
            .map(|v| {
                let status = if v.ok { "True" } else { "False" };
                let old = before.and_then(|cs| {
                    cs.iter()
                        .find(|c| c.get("type").and_then(Json::as_str) == Some(v.kind))
                });
                let same = old.is_some_and(|c| {
                    c.get("status").and_then(Json::as_str) == Some(status)
                        && c.get("reason").and_then(Json::as_str) == Some(v.reason)
                        && c.get("message").and_then(Json::as_str) == Some(v.message.as_str())
                        && c.get("observedGeneration").and_then(Json::as_i64)
                            == observation.generation
                });
                if !same {
                    changed = true;
                }
                let transition = old
                    .filter(|c| c.get("status").and_then(Json::as_str) == Some(status))
                    .and_then(|c| c.get("lastTransitionTime").cloned())
                    .unwrap_or_else(|| Json::String(now.to_owned()));
                json!({
                    "type": v.kind,
                    "status": status,
                    "reason": v.reason,
                    "message": v.message,
                    "observedGeneration": observation.generation,
                    "lastTransitionTime": transition,
                })
            })
            .collect();
        if before.is_some_and(|b| b.len() != conditions.len()) {
            changed = true;
        }
        entries.push(json!({
            "parentRef": parent_ref,
            "controllerName": CONTROLLER,
            "conditions": conditions,
        }));
    }
    if !changed {
        return None;
    }
    let others = observation
        .status_parents
        .iter()
        .filter(|e| !ours(e))
        .cloned();
    Some(others.chain(entries).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::FieldError;
    use crate::model::Kind;
    use crate::testing::model;

    const YAML: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: orders, namespace: shop}\n\
        spec: {ports: [{name: http, port: 80}]}\n---\n\
        apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
        metadata: {name: canary, namespace: shop}\n\
        spec:\n  parentRefs: [{group: '', kind: Service, name: orders}]\n\
        \x20 rules: [{backendRefs: [{name: orders, port: 80}, {name: orders-v2, port: 80}]}]\n";

    fn observation(status_parents: Vec<Json>) -> RouteObservation {
        RouteObservation {
            generation: Some(3),
            parent_refs: vec![json!({"group": "", "kind": "Service", "name": "orders"})],
            status_parents,
            error: None,
            kept_previous: false,
        }
    }

    #[test]
    fn each_service_parent_gets_accepted_and_resolved_refs_and_other_controllers_are_kept() {
        let name = ObjectKey {
            kind: Kind::HttpRoute,
            name: ObjectName::new("shop", "canary"),
        };
        let gateway = json!({"parentRef": {"name": "gw"}, "controllerName": "example.com/gw", "conditions": []});
        let obs = observation(vec![gateway.clone()]);
        let m = model(YAML);
        let parents = desired(&name, &obs, &m, "2024-01-01T00:00:00Z").unwrap();
        assert_eq!(parents[0], gateway);
        let ours = &parents[1];
        assert_eq!(ours["controllerName"], CONTROLLER);
        assert_eq!(ours["conditions"][0]["type"], "Accepted");
        assert_eq!(ours["conditions"][0]["status"], "True");
        assert_eq!(ours["conditions"][1]["type"], "ResolvedRefs");
        assert_eq!(ours["conditions"][1]["status"], "False");
        assert_eq!(ours["conditions"][1]["reason"], "BackendNotFound");
        assert!(
            ours["conditions"][1]["message"]
                .as_str()
                .unwrap()
                .contains("orders-v2:80")
        );
        assert_eq!(ours["conditions"][1]["observedGeneration"], 3);

        // Written and seen back: nothing more to write.
        let again = observation(parents.clone());
        assert_eq!(desired(&name, &again, &m, "2024-02-01T00:00:00Z"), None);
    }

    #[test]
    fn an_invalid_route_or_a_missing_parent_is_not_accepted() {
        let name = ObjectKey {
            kind: Kind::HttpRoute,
            name: ObjectName::new("shop", "canary"),
        };
        let mut obs = observation(Vec::new());
        obs.error = Some(FieldError::new("spec.rules[0].filters", "not supported"));
        obs.kept_previous = true;
        let v = judge(&name, &obs.parent_refs[0], &obs, &model(YAML));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].reason, "UnsupportedValue");
        assert!(
            v[0].message
                .contains("spec.rules[0].filters: not supported; the last")
        );

        let obs = observation(Vec::new());
        let missing = json!({"group": "", "kind": "Service", "name": "payments"});
        let v = judge(&name, &missing, &obs, &model(YAML));
        assert_eq!((v[0].ok, v[0].reason), (false, "NoMatchingParent"));
        let wrong_port = json!({"group": "", "kind": "Service", "name": "orders", "port": 81});
        let v = judge(&name, &wrong_port, &obs, &model(YAML));
        assert_eq!((v[0].ok, v[0].reason), (false, "NoMatchingParent"));
    }

    #[test]
    fn a_grpc_route_is_judged_from_the_grpc_routes_of_the_model() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: orders, namespace: shop}\n\
            spec: {ports: [{name: grpc, port: 9090}]}\n---\n\
            apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
            metadata: {name: canary, namespace: shop}\n\
            spec:\n  parentRefs: [{group: '', kind: Service, name: orders}]\n\
            \x20 rules: [{backendRefs: [{name: orders, port: 9090}]}]\n";
        let grpc = ObjectKey {
            kind: Kind::GrpcRoute,
            name: ObjectName::new("shop", "canary"),
        };
        let obs = observation(Vec::new());
        let v = judge(&grpc, &obs.parent_refs[0], &obs, &model(yaml));
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|v| v.ok), "{v:?}");
        // No HTTPRoute of that name: that one is not in the model.
        let http = ObjectKey {
            kind: Kind::HttpRoute,
            ..grpc
        };
        let v = judge(&http, &obs.parent_refs[0], &obs, &model(yaml));
        assert_eq!((v[0].ok, v[0].reason), (false, "Pending"));
    }
}
