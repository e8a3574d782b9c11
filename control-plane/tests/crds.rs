//! The committed CRDs and RBAC rules are exactly what the Rust types generate, and they
//! are CRDs a cluster takes: every field described, printer columns, short names.

use std::path::Path;

use bulwark_control_plane::crds;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the repository")
}

#[test]
fn committed_files_match_the_types() {
    let files = crds::files().unwrap();
    assert_eq!(
        files.len(),
        crds::definitions().len() + 3,
        "the CRDs, the ClusterRole's, the Role's and identity's rules"
    );
    for (path, generated) in files {
        let committed = std::fs::read_to_string(root().join(&path))
            .unwrap_or_else(|e| panic!("{path}: {e}; run `make crds`"));
        assert!(
            committed == generated,
            "{path} differs from what the types in control-plane/src/api/ generate; run `make crds`"
        );
    }
}

fn committed(name: &str) -> CustomResourceDefinition {
    let text = std::fs::read_to_string(root().join(crds::CRD_DIR).join(name))
        .expect("the CRD is committed; run `make crds`");
    serde_yaml_ng::from_str(&text).expect("the committed CRD parses as a CustomResourceDefinition")
}

/// Paths of schema properties without a description.
fn undescribed(schema: &JSONSchemaProps, path: &str, out: &mut Vec<String>) {
    for (name, prop) in schema.properties.iter().flatten() {
        let at = format!("{path}.{name}");
        if prop.description.as_deref().unwrap_or("").trim().is_empty() {
            out.push(at.clone());
        }
        undescribed(prop, &at, out);
        if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items)) = &prop.items {
            undescribed(items, &format!("{at}[]"), out);
        }
    }
}

#[test]
fn every_crd_installs_with_names_columns_and_described_fields() {
    // Policies attached to Services show them; a PeerAuthentication selects pods.
    const TARGETED: &[&str] = &["Targets", "Accepted", "Age"];
    for (file, kind, short, wanted) in [
        (
            "resiliencepolicies.yaml",
            "ResiliencePolicy",
            "rp",
            TARGETED,
        ),
        ("ratelimitpolicies.yaml", "RateLimitPolicy", "rlp", TARGETED),
        ("shardtopologies.yaml", "ShardTopology", "st", TARGETED),
        (
            "authorizationpolicies.yaml",
            "AuthorizationPolicy",
            "azp",
            TARGETED,
        ),
        (
            "peerauthentications.yaml",
            "PeerAuthentication",
            "peerauthn",
            &["Mode", "Accepted", "Age"],
        ),
    ] {
        let crd = committed(file);
        assert_eq!(crd.spec.group, "bulwark.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&[short.to_owned()][..])
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["bulwark".to_owned()][..]),
            "`kubectl get bulwark` lists {kind}"
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        for column in wanted {
            assert!(columns.contains(column), "{kind} lacks column {column}");
        }
        let schema = version
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap();
        let spec = &schema.properties.as_ref().unwrap()["spec"];
        let mut missing = Vec::new();
        undescribed(spec, "spec", &mut missing);
        assert!(
            missing.is_empty(),
            "{kind}: fields without a description: {missing:?}"
        );
    }
}

#[test]
fn cross_field_rules_are_cel_and_durations_have_the_gateway_pattern() {
    let text = std::fs::read_to_string(root().join(crds::CRD_DIR).join("resiliencepolicies.yaml"))
        .unwrap();
    assert!(text.contains("duration(self.base) <= duration(self.max)"));
    assert!(text.contains("self.consecutiveFailures > 0 || has(self.failureRatio)"));
    assert!(text.contains("pattern: ^([0-9]{1,5}(h|m|s|ms)){1,4}$"));
}

/// A new CRD cannot be forgotten in the ClusterRole: the control plane watches every
/// kind it defines (and would never sync without), and writes only their status.
#[test]
fn every_crd_is_listed_and_watched_and_only_its_status_patched() {
    for crd in crds::definitions() {
        let (group, plural) = (crd.spec.group.as_str(), crd.spec.names.plural.as_str());
        for verb in ["list", "watch"] {
            assert!(crds::allows(group, plural, verb), "{verb} {plural}");
        }
        assert!(crds::allows(group, &format!("{plural}/status"), "patch"));
        for verb in ["create", "update", "patch", "delete"] {
            assert!(!crds::allows(group, plural, verb), "{verb} {plural}");
        }
    }
}

#[test]
fn rbac_rules_cover_what_the_control_plane_does_and_no_writes_to_the_mesh() {
    assert!(crds::allows("bulwark.io", "resiliencepolicies", "watch"));
    assert!(crds::allows(
        "bulwark.io",
        "ratelimitpolicies/status",
        "patch"
    ));

    // The Lease only in the control plane's namespace, and only ours by name.
    assert!(!crds::allows("coordination.k8s.io", "leases", "update"));
    assert!(!crds::allows("coordination.k8s.io", "leases", "create"));
    assert!(crds::allows_in_own_namespace(
        "coordination.k8s.io",
        "leases",
        "update",
        Some(bulwark_control_plane::lease::LEASE_NAME)
    ));
    assert!(!crds::allows_in_own_namespace(
        "coordination.k8s.io",
        "leases",
        "update",
        Some("kube-controller-manager")
    ));
    assert!(crds::allows_in_own_namespace(
        "coordination.k8s.io",
        "leases",
        "create",
        None
    ));
    assert!(crds::allows_in_own_namespace(
        "bulwark.io",
        "resiliencepolicies",
        "watch",
        None
    ));
    assert!(
        !crds::allows("bulwark.io", "resiliencepolicies", "patch"),
        "spec is the user's"
    );
    assert!(!crds::allows("", "pods", "delete"));
    assert!(!crds::allows("", "secrets", "get"));
}
