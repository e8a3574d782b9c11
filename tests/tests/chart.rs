//! The Helm chart: `helm lint` and `helm template` with the default values and several
//! overrides; every rendered manifest parses into its `k8s-openapi` type with no unknown
//! fields; the ClusterRole is exactly the generated rules and covers every CRD the chart
//! installs; the injection settings parse;
//! and the generated certificate works with the webhook under the Service's name.
//! Workload identity is on by default: the generated issuer Secret loads as the mesh's
//! certificate authority and serves the control plane's gRPC port under the Service's
//! names, the injected agents dial it over TLS, and the identity RBAC rules are granted;
//! with `identity.enabled=false` none of it is rendered, and a Secret of the user's
//! replaces the generated one.
//!
//! `helm` comes from `HELM` or `.tools/bin/helm` (installed by `hack/install-helm.sh`,
//! which `make test` runs through `hack/setup.sh`, and which these tests run too).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bulwark_control_plane::crds::{IDENTITY_RBAC_RULES, NAMESPACE_RBAC_RULES, RBAC_RULES, Rule};
use bulwark_control_plane::webhook::{self, InjectConfig, Webhook};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::de::DeserializeOwned;
use serde_json::Value;

const NAMESPACE: &str = "mesh";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The helm binary, installed on first use.
fn helm() -> PathBuf {
    if let Some(helm) = std::env::var_os("HELM") {
        return PathBuf::from(helm);
    }
    let helm = root().join(".tools/bin/helm");
    if !helm.exists() {
        let status = Command::new(root().join("hack/install-helm.sh"))
            .status()
            .expect("running hack/install-helm.sh");
        assert!(status.success(), "hack/install-helm.sh failed");
    }
    helm
}

fn run_helm(args: &[&str]) -> String {
    let output = Command::new(helm())
        .args(args)
        .current_dir(root())
        .output()
        .expect("running helm");
    assert!(
        output.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("running helm")
}

/// The manifests `helm template` renders with `--set` overrides, CRDs included.
fn render(sets: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "template",
        "bulwark",
        "charts/bulwark",
        "--namespace",
        NAMESPACE,
        "--include-crds",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    let text = run_helm(&args);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("helm renders YAML"))
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

/// Parses `doc` as `T` and checks that nothing was dropped: re-serialized, it is the same.
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let parsed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} does not parse: {e}\n{doc:#}", name_of(doc)));
    let back = serde_json::to_value(&parsed).expect("serializing a k8s-openapi value");
    assert_eq!(
        &back,
        doc,
        "{} has fields its type does not know",
        name_of(doc)
    );
    parsed
}

fn name_of(doc: &Value) -> String {
    format!("{} {}", doc["kind"], doc["metadata"]["name"])
}

/// Checks every manifest against its type; returns the kinds in order.
fn check_types(docs: &[Value]) -> Vec<String> {
    let mut kinds = Vec::new();
    for doc in docs {
        let kind = doc["kind"]
            .as_str()
            .expect("a rendered manifest has a kind")
            .to_owned();
        match kind.as_str() {
            "ServiceAccount" => drop(typed::<ServiceAccount>(doc)),
            "ConfigMap" => drop(typed::<ConfigMap>(doc)),
            "Secret" => drop(typed::<Secret>(doc)),
            "Service" => drop(typed::<Service>(doc)),
            "Deployment" => drop(typed::<Deployment>(doc)),
            "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(doc)),
            "ClusterRole" => drop(typed::<ClusterRole>(doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(doc)),
            "Role" => drop(typed::<Role>(doc)),
            "NetworkPolicy" => drop(typed::<NetworkPolicy>(doc)),
            "RoleBinding" => drop(typed::<RoleBinding>(doc)),
            "MutatingWebhookConfiguration" => drop(typed::<MutatingWebhookConfiguration>(doc)),
            "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(doc)),
            "ServiceMonitor" => {
                // prometheus-operator's type is not in k8s-openapi: check its shape.
                assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1");
                assert_eq!(doc["spec"]["endpoints"][0]["port"], "admin-http");
                assert_eq!(doc["spec"]["endpoints"][0]["path"], "/metrics");
            }
            other => panic!("unexpected kind {other} rendered"),
        }
        let labels = &doc["metadata"]["labels"];
        if kind != "CustomResourceDefinition" {
            for key in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
            ] {
                assert!(
                    labels.get(key).is_some(),
                    "{} lacks label {key}",
                    name_of(doc)
                );
            }
        }
        kinds.push(kind);
    }
    kinds
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

#[test]
fn the_chart_lints_clean_with_default_and_overridden_values() {
    run_helm(&["lint", "--strict", "charts/bulwark"]);
    run_helm(&[
        "lint",
        "--strict",
        "charts/bulwark",
        "--set",
        "webhook.sidecarMode=Container,controlPlane.replicas=1,metrics.serviceMonitor.enabled=true",
    ]);
}

/// What `helm template` says when it refuses `--set set` (it must refuse).
fn refused(set: &str) -> String {
    let output = Command::new(helm())
        .args(["template", "bulwark", "charts/bulwark", "--set", set])
        .current_dir(root())
        .output()
        .expect("running helm");
    assert!(!output.status.success(), "{set} was accepted");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn values_outside_the_schema_are_refused_with_the_field() {
    let stderr = refused("webhook.failurePolicy=Sometimes");
    assert!(stderr.contains("/webhook/failurePolicy"), "{stderr}");
    assert!(refused("agent.imagee=x").contains("imagee"));
}

#[test]
fn default_manifests_parse_into_their_types_with_no_unknown_fields() {
    let docs = render(&[]);
    let mut kinds = check_types(&docs);
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "MutatingWebhookConfiguration",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Secret",
            "Secret",
            "Service",
            "Service",
            "ServiceAccount",
        ]
    );
    let deployment: Deployment = typed(find(&docs, "Deployment", "bulwark-control-plane"));
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    let sc = pod.security_context.unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    let container = &pod.containers[0];
    let csc = container.security_context.as_ref().unwrap();
    assert_eq!(csc.read_only_root_filesystem, Some(true));
    assert_eq!(csc.allow_privilege_escalation, Some(false));
    assert!(container.readiness_probe.is_some() && container.liveness_probe.is_some());
    assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
    let args = container.args.as_ref().unwrap();
    assert!(
        args.contains(&"--webhook-addr=0.0.0.0:9443".to_owned()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--grpc-addr=0.0.0.0:9990".to_owned()),
        "{args:?}"
    );
}

#[test]
fn overridden_manifests_parse_into_their_types_too() {
    for sets in [
        &[
            "controlPlane.replicas=1",
            "metrics.serviceMonitor.enabled=true",
            "serviceAccount.create=false",
        ][..],
        &[
            "webhook.sidecarMode=Container",
            "fullnameOverride=mesh",
            "controlPlane.ports.grpc=7000",
            "agent.ipv6=true",
            "agent.skipOutboundCIDRs={169.254.169.254/32}",
        ][..],
        &[
            "controlPlane.podAntiAffinity=false",
            "controlPlane.nodeSelector.disk=ssd",
            "imagePullSecrets[0].name=regcred",
            "webhook.failurePolicy=Ignore",
            "agent.image.pullPolicy=Always",
        ][..],
    ] {
        let docs = render(sets);
        let kinds = check_types(&docs);
        let single = sets.contains(&"controlPlane.replicas=1");
        assert_eq!(
            kinds.contains(&"PodDisruptionBudget".to_owned()),
            !single,
            "{sets:?}"
        );
        assert_eq!(
            kinds.contains(&"ServiceMonitor".to_owned()),
            single,
            "{sets:?}"
        );
        assert_eq!(
            kinds.contains(&"ServiceAccount".to_owned()),
            !single,
            "{sets:?}"
        );
    }
}

/// The generated rules as a Role's or ClusterRole's rules.
fn policy_rules<'r>(rules: impl IntoIterator<Item = &'r Rule>) -> Vec<PolicyRule> {
    let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    rules
        .into_iter()
        .map(|rule| PolicyRule {
            api_groups: Some(strings(rule.api_groups)),
            resources: Some(strings(rule.resources)),
            resource_names: (!rule.resource_names.is_empty()).then(|| strings(rule.resource_names)),
            verbs: strings(rule.verbs),
            ..PolicyRule::default()
        })
        .collect()
}

#[test]
fn the_cluster_role_is_exactly_the_generated_rules() {
    let docs = render(&[]);
    let role: ClusterRole = typed(find(&docs, "ClusterRole", "bulwark-control-plane"));
    // Identity is on by default: its rules come after the others.
    assert_eq!(
        role.rules.unwrap(),
        policy_rules(RBAC_RULES.iter().chain(IDENTITY_RBAC_RULES))
    );
    let off = render(&["identity.enabled=false"]);
    let role: ClusterRole = typed(find(&off, "ClusterRole", "bulwark-control-plane"));
    assert_eq!(role.rules.unwrap(), policy_rules(RBAC_RULES));
    assert!(
        !RBAC_RULES.iter().any(|r| r.resources.contains(&"leases")),
        "no lease rights cluster-wide"
    );
    // The Lease: a Role in the release's namespace only.
    let namespaced: Role = typed(find(&docs, "Role", "bulwark-control-plane"));
    assert_eq!(namespaced.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        namespaced.rules.unwrap(),
        policy_rules(NAMESPACE_RBAC_RULES)
    );
    let role_binding: RoleBinding = typed(find(&docs, "RoleBinding", "bulwark-control-plane"));
    assert_eq!(
        (
            role_binding.role_ref.kind.as_str(),
            role_binding.role_ref.name.as_str()
        ),
        ("Role", "bulwark-control-plane")
    );
    let binding: ClusterRoleBinding =
        typed(find(&docs, "ClusterRoleBinding", "bulwark-control-plane"));
    assert_eq!(binding.role_ref.name, "bulwark-control-plane");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("bulwark-control-plane", Some(NAMESPACE))
    );
}

/// Every CRD the chart installs is one the ClusterRole lets the control plane list,
/// watch and patch the status of, and nothing more: a kind it cannot watch would keep
/// it from ever syncing, and its spec is the user's.
#[test]
fn the_cluster_role_covers_every_crd_the_chart_installs() {
    let docs = render(&[]);
    let role: ClusterRole = typed(find(&docs, "ClusterRole", "bulwark-control-plane"));
    let rules = role.rules.unwrap_or_default();
    let allows = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    let crds: Vec<CustomResourceDefinition> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .map(typed)
        .collect();
    let mut kinds: Vec<&str> = crds.iter().map(|c| c.spec.names.kind.as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "AuthorizationPolicy",
            "PeerAuthentication",
            "RateLimitPolicy",
            "ResiliencePolicy",
            "ShardTopology"
        ]
    );
    for crd in &crds {
        let (group, plural) = (crd.spec.group.as_str(), crd.spec.names.plural.as_str());
        for verb in ["list", "watch"] {
            assert!(allows(group, plural, verb), "{verb} {plural}");
        }
        assert!(
            allows(group, &format!("{plural}/status"), "patch"),
            "{plural}/status"
        );
        for verb in ["create", "update", "patch", "delete"] {
            assert!(!allows(group, plural, verb), "{verb} {plural}");
        }
    }
    let peer = crds
        .iter()
        .find(|c| c.spec.names.kind == "PeerAuthentication")
        .map(|c| &c.spec.names);
    assert_eq!(
        peer.and_then(|n| n.short_names.clone()),
        Some(vec!["peerauthn".to_owned()])
    );
}

#[test]
fn the_injection_settings_point_agents_at_the_rendered_control_plane() {
    let docs = render(&[
        "controlPlane.ports.grpc=7000",
        "agent.image.tag=v9",
        "webhook.sidecarMode=Container",
        "agent.skipOutboundCIDRs={169.254.169.254/32}",
    ]);
    let config: ConfigMap = typed(find(&docs, "ConfigMap", "bulwark-inject"));
    let text = &config.data.unwrap()["inject.yaml"];
    let inject = InjectConfig::parse(text).unwrap();
    assert_eq!(inject.image, "ghcr.io/bulwark-mesh/agent:v9");
    assert_eq!(
        inject.control_plane_address,
        "https://bulwark-control-plane.mesh.svc:7000"
    );
    assert_eq!(inject.control_plane_namespace, NAMESPACE);
    assert_eq!(inject.sidecar_mode, webhook::SidecarMode::Container);
    assert_eq!(inject.skip_outbound_cidrs, ["169.254.169.254/32"]);
    assert_eq!(inject.resources.limits.unwrap()["memory"].0, "128Mi");
    // The Service exposes that port to agents.
    let service: Service = typed(find(&docs, "Service", "bulwark-control-plane"));
    let ports = service.spec.unwrap().ports.unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p.port == 7000 && p.name.as_deref() == Some("grpc"))
    );
}

#[test]
fn the_webhook_configuration_calls_the_webhook_service_and_spares_system_namespaces() {
    let docs = render(&["webhook.annotatedPodsFailurePolicy=Ignore"]);
    let config: MutatingWebhookConfiguration = typed(find(
        &docs,
        "MutatingWebhookConfiguration",
        "bulwark-webhook",
    ));
    let hooks = config.webhooks.unwrap();
    assert_eq!(hooks.len(), 2);
    let paths: Vec<_> = hooks
        .iter()
        .map(|h| {
            h.client_config
                .service
                .as_ref()
                .unwrap()
                .path
                .clone()
                .unwrap()
        })
        .collect();
    assert_eq!(paths, [webhook::ENABLED_NAMESPACE_PATH, webhook::PATH]);
    assert_eq!(hooks[0].failure_policy.as_deref(), Some("Fail"));
    assert_eq!(hooks[1].failure_policy.as_deref(), Some("Ignore"));
    let service: Service = typed(find(&docs, "Service", "bulwark-webhook"));
    for hook in &hooks {
        let target = hook.client_config.service.as_ref().unwrap();
        assert_eq!(
            (target.name.as_str(), target.namespace.as_str(), target.port),
            ("bulwark-webhook", NAMESPACE, Some(443))
        );
        let rule = &hook.rules.as_ref().unwrap()[0];
        assert_eq!(rule.operations.as_deref(), Some(&["CREATE".to_owned()][..]));
        assert_eq!(rule.resources.as_deref(), Some(&["pods".to_owned()][..]));
        let selector = hook
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_expressions
            .as_ref()
            .unwrap();
        let excluded = selector
            .iter()
            .find(|e| e.key == "kubernetes.io/metadata.name")
            .unwrap();
        assert_eq!(excluded.operator, "NotIn");
        let values = excluded.values.as_ref().unwrap();
        for ns in [NAMESPACE, "kube-system"] {
            assert!(
                values.iter().any(|v| v == ns),
                "{ns} not excluded: {values:?}"
            );
        }
        assert_eq!(hook.side_effects, "None");
    }
    let ports = service.spec.unwrap().ports.unwrap();
    assert_eq!(ports[0].port, 443);
}

/// A TLS client that trusts only the certificates in `pem`.
fn connector_trusting(pem: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(cert.expect("the bundle is PEM"))
            .expect("a usable anchor");
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        // rustls's own defaults, as a client that is not ours (the API server) would offer.
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("aws-lc-rs supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(client))
}

/// The chart's generated certificate, served by the webhook, verifies against the
/// MutatingWebhookConfiguration's caBundle under the Service's DNS name, as the API
/// server dials it.
#[tokio::test]
async fn the_generated_certificate_is_trusted_under_the_service_name() {
    let docs = render(&[]);
    let secret: Secret = typed(find(&docs, "Secret", "bulwark-webhook-tls"));
    let data = secret.data.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), &data["tls.crt"].0).unwrap();
    std::fs::write(dir.path().join("tls.key"), &data["tls.key"].0).unwrap();
    let config: MutatingWebhookConfiguration = typed(find(
        &docs,
        "MutatingWebhookConfiguration",
        "bulwark-webhook",
    ));
    let ca_bundle = config.webhooks.unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .unwrap()
        .0;
    assert_eq!(ca_bundle, data["ca.crt"].0);

    let webhook = Webhook::start(webhook::Settings {
        addr: "127.0.0.1:0".parse().unwrap(),
        cert_dir: dir.path().to_owned(),
        cert_reload: webhook::DEFAULT_CERT_RELOAD,
        inject: InjectConfig::new("agent:1", "http://cp:9990", NAMESPACE),
        native: true,
    })
    .await
    .unwrap();
    let connector = connector_trusting(&ca_bundle);
    for name in [
        "bulwark-webhook.mesh.svc",
        "bulwark-webhook.mesh.svc.cluster.local",
    ] {
        let tcp = tokio::net::TcpStream::connect(webhook.addr())
            .await
            .unwrap();
        let connect = connector.connect(ServerName::try_from(name).unwrap(), tcp);
        tokio::time::timeout(Duration::from_secs(30), connect)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let tcp = tokio::net::TcpStream::connect(webhook.addr())
        .await
        .unwrap();
    let wrong = connector
        .connect(ServerName::try_from("other.mesh.svc").unwrap(), tcp)
        .await;
    assert!(
        wrong.is_err(),
        "a certificate for another name was accepted"
    );
}

#[test]
fn the_network_policy_admits_only_the_control_planes_ports() {
    let docs = render(&[]);
    let policy: NetworkPolicy = typed(find(&docs, "NetworkPolicy", "bulwark-control-plane"));
    let spec = policy.spec.unwrap();
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_owned()][..])
    );
    let ports: Vec<String> = spec.ingress.unwrap()[0]
        .ports
        .iter()
        .flatten()
        .map(|p| match &p.port {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name)) => {
                name.clone()
            }
            other => panic!("a named port, got {other:?}"),
        })
        .collect();
    assert_eq!(ports, ["grpc", "webhook", "admin-http"]);
    let deployment: Deployment = typed(find(&docs, "Deployment", "bulwark-control-plane"));
    let named: Vec<String> = deployment.spec.unwrap().template.spec.unwrap().containers[0]
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    for port in &ports {
        assert!(named.contains(port), "the container names port {port}");
    }
    let off = render(&["networkPolicy.enabled=false"]);
    assert!(!off.iter().any(|d| d["kind"] == "NetworkPolicy"));
}

/// The issuer Secret and the names of the control plane's serving certificate, as the
/// chart renders them with `sets`; None without identity.
fn issuer(docs: &[Value]) -> Option<(Secret, Vec<String>)> {
    let deployment: Deployment = typed(find(docs, "Deployment", "bulwark-control-plane"));
    let pod = deployment
        .spec
        .and_then(|s| s.template.spec)
        .expect("the Deployment has a pod spec");
    let args = pod.containers[0].args.clone().unwrap_or_default();
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_owned))
    };
    let dir = flag("identity-dir")?;
    let mount = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .expect("the identity folder is a mount");
    assert_eq!(mount.read_only, Some(true));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mount's volume");
    let secret_name = volume
        .secret
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .expect("the identity folder is a Secret");
    let names = flag("tls-name")
        .expect("--tls-name with identity")
        .split(',')
        .map(str::to_owned)
        .collect();
    let secret = docs
        .iter()
        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == secret_name.as_str())
        .map(typed)
        .unwrap_or_else(|| Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(secret_name),
                ..Default::default()
            },
            ..Secret::default()
        });
    Some((secret, names))
}

#[test]
fn identity_is_on_by_default_and_off_with_its_value() {
    let docs = render(&[
        "identity.trustDomain=example.org",
        "identity.certLifetime=12h",
    ]);
    let deployment: Deployment = typed(find(&docs, "Deployment", "bulwark-control-plane"));
    let args = deployment.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    for arg in [
        "--identity-dir=/var/run/bulwark/identity",
        "--trust-domain=example.org",
        "--cert-lifetime=12h",
        "--tls-name=bulwark-control-plane,bulwark-control-plane.mesh,\
         bulwark-control-plane.mesh.svc,bulwark-control-plane.mesh.svc.cluster.local",
    ] {
        assert!(args.iter().any(|a| a == arg), "{arg} missing from {args:?}");
    }
    let (secret, _) = issuer(&docs).unwrap();
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some("bulwark-identity-issuer")
    );
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.unwrap();
    assert_eq!(
        data["ca.crt"], data["tls.crt"],
        "the generated issuer is its own anchor"
    );
    let config: ConfigMap = typed(find(&docs, "ConfigMap", "bulwark-inject"));
    let inject = InjectConfig::parse(&config.data.unwrap()["inject.yaml"]).unwrap();
    assert_eq!(
        inject.control_plane_address,
        "https://bulwark-control-plane.mesh.svc:9990"
    );
    assert_eq!(
        inject.identity.map(|i| i.token_expiration_seconds),
        Some(3600)
    );
    assert_eq!(
        inject.excluded_namespaces,
        ["kube-system", "kube-public", "kube-node-lease"]
    );

    // Off: plaintext as before, no issuer, no identity rules (checked above).
    let off = render(&["identity.enabled=false"]);
    assert!(issuer(&off).is_none());
    let secrets: Vec<_> = off
        .iter()
        .filter(|d| d["kind"] == "Secret")
        .map(|d| d["metadata"]["name"].clone())
        .collect();
    assert_eq!(secrets, ["bulwark-webhook-tls"]);
    let config: ConfigMap = typed(find(&off, "ConfigMap", "bulwark-inject"));
    let inject = InjectConfig::parse(&config.data.unwrap()["inject.yaml"]).unwrap();
    assert_eq!(
        inject.control_plane_address,
        "http://bulwark-control-plane.mesh.svc:9990"
    );
    assert_eq!(inject.identity, None);
}

#[test]
fn a_users_issuer_secret_replaces_the_generated_one() {
    let docs = render(&["identity.issuer.secretName=mesh-issuer"]);
    let (secret, _) = issuer(&docs).unwrap();
    assert_eq!(secret.metadata.name.as_deref(), Some("mesh-issuer"));
    assert!(
        secret.data.is_none(),
        "the chart does not render the user's Secret"
    );
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["name"] == "bulwark-identity-issuer"),
        "no generated issuer"
    );
    for bad in [
        "identity.tokenExpirationSeconds=60",
        "identity.trustDomain=Example.org",
        "identity.certLifetime=1day",
    ] {
        let output = Command::new(helm())
            .args(["template", "bulwark", "charts/bulwark", "--set", bad])
            .current_dir(root())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{bad} was accepted");
        let field = bad.split('=').next().unwrap().replace('.', "/");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("/{field}")), "{bad}: {stderr}");
    }
}

/// The generated issuer is one the control plane loads: with it, the gRPC port serves
/// TLS that verifies against the Secret's `ca.crt` under each name the chart gives, and
/// an agent's certificate request is signed under the chart's trust domain.
#[tokio::test]
async fn the_generated_issuer_serves_the_control_plane_under_its_service_names() {
    use bulwark_agent::identity::client::{Claims, GrpcCertifier};
    use bulwark_agent::identity::credentials::PendingKey;
    use bulwark_agent::identity::renewal::Certifier as _;
    use bulwark_control_plane::identity::IdentitySettings;
    use bulwark_control_plane::identity::authority::{Authority, DEFAULT_LIFETIME};
    use bulwark_control_plane::identity::token::TokenReviewer;

    let docs = render(&["identity.trustDomain=example.org"]);
    let (secret, names) = issuer(&docs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (file, bytes) in secret.data.unwrap() {
        std::fs::write(dir.path().join(file), bytes.0).unwrap();
    }
    let anchors = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let authority = Arc::new(Authority::load(dir.path(), "example.org", DEFAULT_LIFETIME).unwrap());
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        "tokens: [{token: orders-0-token-0123456789, namespace: shop, serviceAccount: orders, pod: orders-0}]\n",
    )
    .unwrap();
    let mesh = tempfile::tempdir().unwrap();
    let mut settings =
        bulwark_control_plane::Settings::new(bulwark_control_plane::Source::Dir(vec![
            mesh.path().to_owned(),
        ]));
    settings.grpc_addr = "127.0.0.1:0".parse().unwrap();
    settings.admin_addr = "127.0.0.1:0".parse().unwrap();
    settings.identity = Some(IdentitySettings {
        authority: Arc::clone(&authority),
        reviewer: TokenReviewer::from_file(&tokens).unwrap(),
        // The chart's names, and the address the certificate request below dials.
        serving_names: names
            .iter()
            .cloned()
            .chain(["127.0.0.1".to_owned()])
            .collect(),
    });
    let cp = bulwark_control_plane::ControlPlane::start(settings)
        .await
        .unwrap();

    let connector = connector_trusting(&anchors);
    assert!(names.contains(&"bulwark-control-plane.mesh.svc".to_owned()));
    for name in names.iter().chain(["other.mesh.svc".to_owned()].iter()) {
        let tcp = tokio::net::TcpStream::connect(cp.grpc_addr())
            .await
            .unwrap();
        let connect = connector.connect(ServerName::try_from(name.clone()).unwrap(), tcp);
        let result = tokio::time::timeout(Duration::from_secs(30), connect)
            .await
            .unwrap();
        assert_eq!(
            result.is_ok(),
            name != "other.mesh.svc",
            "{name}: {result:?}"
        );
    }

    // An agent's certificate request, signed by the chart's issuer under its trust
    // domain (dialled by address here: the Service's names do not resolve in a test).
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "orders-0-token-0123456789").unwrap();
    let certifier = GrpcCertifier::new(
        bulwark_agent::identity::channel::connect(
            &format!("https://127.0.0.1:{}", cp.grpc_addr().port()),
            Some(&authority.anchors()),
        )
        .unwrap(),
        token_file,
        Claims {
            namespace: "shop".into(),
            pod_name: "orders-0".into(),
            service_account: "orders".into(),
        },
    );
    let key = PendingKey::generate().unwrap();
    let signed = certifier.certify(key.csr_der().to_vec()).await.unwrap();
    assert_eq!(signed.spiffe_id, "spiffe://example.org/ns/shop/sa/orders");
    let parsed: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&anchors)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        signed.anchors, parsed,
        "the agent's anchors are the Secret's ca.crt"
    );
    cp.shutdown().await;
}

#[test]
fn the_rate_limit_store_reaches_injected_agents_with_its_secret() {
    // Off by default: agents get no store.
    let docs = render(&[]);
    let config: ConfigMap = typed(find(&docs, "ConfigMap", "bulwark-inject"));
    let inject = InjectConfig::parse(&config.data.unwrap()["inject.yaml"]).unwrap();
    assert_eq!(inject.rate_limit_store, None);
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["name"] == "bulwark-redis")
    );

    // The bundled Redis for trying it out: a Deployment and Service, and agents pointed at it.
    let docs = render(&[
        "rateLimitStore.bundled.enabled=true",
        "rateLimitStore.existingSecret=redis-auth",
    ]);
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        typed(find(&docs, "Deployment", "bulwark-redis"));
    assert_eq!(deployment.spec.unwrap().replicas, Some(1));
    let _: k8s_openapi::api::core::v1::Service = typed(find(&docs, "Service", "bulwark-redis"));
    let config: ConfigMap = typed(find(&docs, "ConfigMap", "bulwark-inject"));
    let inject = InjectConfig::parse(&config.data.unwrap()["inject.yaml"]).unwrap();
    let store = inject.rate_limit_store.expect("a store");
    assert_eq!(store.url, "redis://bulwark-redis.mesh.svc:6379");
    assert_eq!(store.secret_name.as_deref(), Some("redis-auth"));
    assert_eq!(store.password_key, "password");

    // A managed one over TLS; a URL with credentials in it is refused by the schema.
    let docs = render(&["rateLimitStore.url=rediss://redis.example.internal:6380"]);
    let config: ConfigMap = typed(find(&docs, "ConfigMap", "bulwark-inject"));
    let inject = InjectConfig::parse(&config.data.unwrap()["inject.yaml"]).unwrap();
    assert_eq!(
        inject.rate_limit_store.map(|s| s.url),
        Some("rediss://redis.example.internal:6380".to_owned())
    );
    let stderr = refused("rateLimitStore.url=redis://:secret@redis:6379");
    assert!(stderr.contains("/rateLimitStore/url"), "{stderr}");
}
