//! Whether a pod gets the agent, and the JSON patch that adds it.
//!
//! The patch is minimal: it adds the init container (and, in native mode, the agent as an
//! init container with `restartPolicy: Always`) in front of the pod's own init containers,
//! the agent as the first container in container mode, one `emptyDir` for the init
//! container's iptables lock, and the `bulwark.io/injected` annotation. Nothing the pod
//! already has is replaced.
//!
//! With workload identity on (the settings' `identity`), the agent also gets one projected
//! volume, mounted read-only at [`IDENTITY_DIR`]: a ServiceAccount token for audience
//! `bulwark` (bound to the pod, short-lived, renewed by the kubelet) and the mesh's trust
//! anchors from the namespace's [`TRUST_ANCHORS_CONFIGMAP`] (see [`super::anchors`]); and
//! it dials the control plane over TLS with both.

use std::collections::BTreeMap;
use std::net::IpAddr;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler,
    ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::anchors::{TRUST_ANCHORS_CONFIGMAP, TRUST_ANCHORS_KEY};
use super::config::{IdentityInjection, InjectConfig};
use crate::identity::token::AUDIENCE;

/// Annotation (pod) and label (namespace) that ask for injection: `enabled` or `disabled`.
pub const INJECT: &str = "bulwark.io/inject";
/// Annotation recording what was injected (the version); a pod carrying it is skipped.
pub const INJECTED: &str = crate::model::INJECTED_ANNOTATION;
/// Annotation: inbound ports not redirected to the agent (comma-separated).
pub const SKIP_INBOUND_PORTS: &str = "bulwark.io/skip-inbound-ports";
/// Annotation: outbound ports not redirected to the agent (comma-separated).
pub const SKIP_OUTBOUND_PORTS: &str = "bulwark.io/skip-outbound-ports";
/// Annotation: outbound CIDRs not redirected to the agent (comma-separated).
pub const SKIP_OUTBOUND_CIDRS: &str = "bulwark.io/skip-outbound-cidrs";
/// Annotations overriding the agent's resources.
pub const RESOURCE_ANNOTATIONS: [(&str, &str, &str); 4] = [
    ("bulwark.io/agent-cpu-request", "requests", "cpu"),
    ("bulwark.io/agent-cpu-limit", "limits", "cpu"),
    ("bulwark.io/agent-memory-request", "requests", "memory"),
    ("bulwark.io/agent-memory-limit", "limits", "memory"),
];
/// The agent container's name.
pub const AGENT_CONTAINER: &str = "bulwark-agent";
/// The init container's name.
pub const INIT_CONTAINER: &str = "bulwark-init";
/// The init container's scratch volume (iptables' lock file lives in /run).
pub const INIT_VOLUME: &str = "bulwark-init-run";
/// Namespace whose pods are never injected, besides the control plane's.
pub const KUBE_SYSTEM: &str = "kube-system";
/// The agent's projected volume: its ServiceAccount token and the mesh's trust anchors.
pub const IDENTITY_VOLUME: &str = "bulwark-identity";
/// Where the agent finds them: the layout of Kubernetes' own ServiceAccount mount, and
/// the agent's default token path.
pub const IDENTITY_DIR: &str = "/var/run/secrets/bulwark.io/serviceaccount";
/// The token's file in [`IDENTITY_DIR`].
pub const TOKEN_FILE: &str = "token";
/// The trust anchors' file in [`IDENTITY_DIR`].
pub const ANCHORS_FILE: &str = "ca.crt";

/// Why a pod is left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The pod is in `kube-system` or the control plane's namespace.
    SystemNamespace(String),
    /// The pod shares the node's network; redirecting it would redirect the node.
    HostNetwork,
    /// The pod already carries the agent or the `bulwark.io/injected` annotation.
    AlreadyInjected,
    /// The pod's annotation says `disabled`.
    OptedOut,
    /// Neither the pod nor its namespace asks for injection.
    NotRequested,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::SystemNamespace(ns) => write!(f, "pods in namespace {ns} are never injected"),
            Skip::HostNetwork => f.write_str("hostNetwork pods are never injected"),
            Skip::AlreadyInjected => f.write_str("the pod already carries the agent"),
            Skip::OptedOut => write!(f, "the pod's {INJECT} annotation is disabled"),
            Skip::NotRequested => {
                write!(f, "neither the pod nor its namespace sets {INJECT}=enabled")
            }
        }
    }
}

/// An annotation the pod asked for cannot be honoured; the pod is denied with this.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {reason}")]
pub struct InvalidAnnotation {
    /// The annotation's key.
    pub annotation: &'static str,
    /// What is wrong with its value.
    pub reason: String,
}

/// Decides whether the pod gets the agent. `namespace` is the request's namespace (a
/// pod's own is often empty on CREATE); `namespace_enabled` says whether the namespace
/// carries `bulwark.io/inject=enabled` (the webhook configuration tells, see `webhook`).
pub fn decide(
    pod: &Pod,
    namespace: &str,
    namespace_enabled: bool,
    config: &InjectConfig,
) -> Result<(), Skip> {
    if namespace == KUBE_SYSTEM || namespace == config.control_plane_namespace {
        return Err(Skip::SystemNamespace(namespace.to_owned()));
    }
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Err(Skip::HostNetwork);
    }
    let annotations = pod.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    let has_agent = spec.is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == AGENT_CONTAINER || c.name == INIT_CONTAINER)
    });
    if annotation(INJECTED).is_some() || has_agent {
        return Err(Skip::AlreadyInjected);
    }
    match annotation(INJECT) {
        Some("disabled") => Err(Skip::OptedOut),
        Some("enabled") => Ok(()),
        _ if namespace_enabled => Ok(()),
        _ => Err(Skip::NotRequested),
    }
}

/// A warning for a `bulwark.io/inject` annotation that is neither `enabled` nor
/// `disabled` (such a value is ignored, as if the annotation were not there).
pub fn unknown_inject_value(pod: &Pod) -> Option<String> {
    let value = pod.metadata.annotations.as_ref()?.get(INJECT)?;
    (value != "enabled" && value != "disabled").then(|| {
        format!("annotation {INJECT}: {value:?} is neither \"enabled\" nor \"disabled\"; ignored")
    })
}

/// The JSON patch that injects the agent into `pod`. `native` puts the agent in as a
/// native sidecar; otherwise it is the first container with a `postStart` wait.
pub fn patch(pod: &Pod, config: &InjectConfig, native: bool) -> Result<Patch, InvalidAnnotation> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let init = init_container(&annotations, config)?;
    let agent = agent_container(pod, &annotations, config, native)?;
    let spec = pod.spec.clone().unwrap_or_default();
    let mut ops = Vec::new();

    let has_init = spec.init_containers.as_ref().is_some_and(|c| !c.is_empty());
    let mut front = vec![init];
    if native {
        front.push(agent.clone());
    }
    if has_init {
        for (i, container) in front.into_iter().enumerate() {
            ops.push(add(
                &["spec", "initContainers", &i.to_string()],
                to_value(container),
            ));
        }
    } else {
        ops.push(add(&["spec", "initContainers"], to_value(front)));
    }
    if !native {
        ops.push(add(&["spec", "containers", "0"], to_value(agent)));
    }

    let volume = Volume {
        name: INIT_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".to_owned()),
            size_limit: Some(Quantity("1Mi".to_owned())),
        }),
        ..Volume::default()
    };
    let mut volumes = vec![volume];
    volumes.extend(config.identity.as_ref().map(identity_volume));
    if spec.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
        for volume in volumes {
            ops.push(add(&["spec", "volumes", "-"], to_value(volume)));
        }
    } else {
        ops.push(add(&["spec", "volumes"], to_value(volumes)));
    }

    if pod.metadata.annotations.is_some() {
        ops.push(add(
            &["metadata", "annotations", INJECTED],
            Value::String(config.version.clone()),
        ));
    } else {
        ops.push(add(
            &["metadata", "annotations"],
            serde_json::json!({ INJECTED: config.version }),
        ));
    }
    Ok(Patch(ops))
}

fn add(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    })
}

fn to_value<T: serde::Serialize>(value: T) -> Value {
    // k8s-openapi types serialize into JSON objects without fail: string keys only.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// An environment variable from a key of a Secret in the pod's namespace; optional, so
/// that a namespace without the Secret does not keep its pods from starting.
fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: Some(true),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: path.to_owned(),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// Parses a comma-separated port list; empty items are ignored.
fn ports(annotation: &'static str, value: &str) -> Result<Vec<u16>, InvalidAnnotation> {
    split(value)
        .map(|item| match item.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(InvalidAnnotation {
                annotation,
                reason: format!("{item:?} is not a port (1-65535)"),
            }),
        })
        .collect()
}

/// Checks a comma-separated CIDR list.
fn cidrs(annotation: &'static str, value: &str) -> Result<Vec<String>, InvalidAnnotation> {
    split(value)
        .map(|item| {
            let bad = || InvalidAnnotation {
                annotation,
                reason: format!("{item:?} is not a CIDR such as 10.0.0.0/8 or fd00::/8"),
            };
            let (addr, len) = item.split_once('/').ok_or_else(bad)?;
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let len: u8 = len.parse().map_err(|_| bad())?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if len > max {
                return Err(bad());
            }
            Ok(item.to_owned())
        })
        .collect()
}

fn split(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn join<T: ToString>(items: &[T]) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

fn init_container(
    annotations: &BTreeMap<String, String>,
    config: &InjectConfig,
) -> Result<Container, InvalidAnnotation> {
    let get = |key: &str| annotations.get(key).map(String::as_str).unwrap_or("");
    let inbound = ports(SKIP_INBOUND_PORTS, get(SKIP_INBOUND_PORTS))?;
    let outbound = ports(SKIP_OUTBOUND_PORTS, get(SKIP_OUTBOUND_PORTS))?;
    let mut ranges = cidrs(SKIP_OUTBOUND_CIDRS, get(SKIP_OUTBOUND_CIDRS))?;
    for range in &config.skip_outbound_cidrs {
        if !ranges.contains(range) {
            ranges.push(range.clone());
        }
    }
    let uid = config.uid.to_string();
    let mut env_vars = Vec::new();
    for (name, value) in [
        ("BULWARK_EXCLUDE_INBOUND_PORTS", join(&inbound)),
        ("BULWARK_EXCLUDE_OUTBOUND_PORTS", join(&outbound)),
        ("BULWARK_EXCLUDE_OUTBOUND_CIDRS", ranges.join(",")),
    ] {
        if !value.is_empty() {
            env_vars.push(env(name, value));
        }
    }
    Ok(Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        args: Some(vec![
            "init".to_owned(),
            format!("--agent-uid={uid}"),
            format!("--agent-gid={uid}"),
            format!("--outbound-port={}", config.ports.outbound),
            format!("--inbound-port={}", config.ports.inbound),
            format!("--agent-ports={}", config.ports.admin),
            format!("--ipv6={}", config.ipv6),
        ]),
        env: (!env_vars.is_empty()).then_some(env_vars),
        resources: non_empty(config.init_resources.clone()),
        security_context: Some(SecurityContext {
            // iptables needs root with NET_ADMIN and NET_RAW, and nothing more.
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: INIT_VOLUME.to_owned(),
            mount_path: "/run".to_owned(),
            ..VolumeMount::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    })
}

/// The projected volume of the agent's token and the mesh's trust anchors. Both are
/// rewritten in place by the kubelet (the token before it expires, the anchors when the
/// ConfigMap changes), and the agent reads them at each use, so neither needs a restart.
fn identity_volume(identity: &IdentityInjection) -> Volume {
    Volume {
        name: IDENTITY_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(AUDIENCE.to_owned()),
                        expiration_seconds: Some(identity.token_expiration_seconds),
                        path: TOKEN_FILE.to_owned(),
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    // Not optional: the kubelet holds the pod until the control plane has
                    // written the namespace's anchors, rather than start an agent that
                    // cannot verify the control plane.
                    config_map: Some(ConfigMapProjection {
                        name: TRUST_ANCHORS_CONFIGMAP.to_owned(),
                        items: Some(vec![KeyToPath {
                            key: TRUST_ANCHORS_KEY.to_owned(),
                            path: ANCHORS_FILE.to_owned(),
                            mode: None,
                        }]),
                        optional: Some(false),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            default_mode: None,
        }),
        ..Volume::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

fn non_empty(resources: ResourceRequirements) -> Option<ResourceRequirements> {
    let empty = resources.requests.as_ref().is_none_or(BTreeMap::is_empty)
        && resources.limits.as_ref().is_none_or(BTreeMap::is_empty);
    (!empty).then_some(resources)
}

/// A resource quantity as Kubernetes writes them: a number and an optional suffix.
fn quantity(annotation: &'static str, value: &str) -> Result<Quantity, InvalidAnnotation> {
    let value = value.trim();
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &value[digits.len()..];
    let number_ok = !digits.is_empty() && digits.parse::<f64>().is_ok_and(|n| n >= 0.0);
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    );
    if number_ok && suffix_ok {
        Ok(Quantity(value.to_owned()))
    } else {
        Err(InvalidAnnotation {
            annotation,
            reason: format!("{value:?} is not a quantity such as 100m, 0.5 or 64Mi"),
        })
    }
}

/// The agent's runtime threads for a CPU limit of `limit`: one per whole core when
/// the agent is given two or more (none below that: the agent's own default is one, as
/// a thread per request hand-off costs more than it gains on a core or less).
fn worker_threads(limit: &Quantity) -> Option<usize> {
    let value = limit.0.trim();
    let cores = match value.strip_suffix('m') {
        Some(millis) => millis.parse::<f64>().ok()? / 1000.0,
        None => value.parse::<f64>().ok()?,
    };
    // `as` saturates: an absurd limit gives many threads, never a wrap.
    let threads = cores.floor() as usize;
    (threads >= 2).then_some(threads)
}

fn agent_container(
    pod: &Pod,
    annotations: &BTreeMap<String, String>,
    config: &InjectConfig,
    native: bool,
) -> Result<Container, InvalidAnnotation> {
    let mut resources = config.resources.clone();
    for (annotation, kind, resource) in RESOURCE_ANNOTATIONS {
        if let Some(value) = annotations.get(annotation) {
            let quantity = quantity(annotation, value)?;
            let map = if kind == "requests" {
                resources.requests.get_or_insert_with(BTreeMap::new)
            } else {
                resources.limits.get_or_insert_with(BTreeMap::new)
            };
            map.insert(resource.to_owned(), quantity);
        }
    }
    let ports = &config.ports;
    let mut env_vars = vec![
        env(
            "BULWARK_CONTROL_PLANE",
            config.control_plane_address.clone(),
        ),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env(
            "BULWARK_OUTBOUND_ADDR",
            format!("127.0.0.1:{}", ports.outbound),
        ),
        env("BULWARK_ADMIN_ADDR", format!("0.0.0.0:{}", ports.admin)),
        env("RUST_LOG", config.log_level.clone()),
    ];
    if let Some(threads) = resources
        .limits
        .as_ref()
        .and_then(|limits| limits.get("cpu"))
        .and_then(worker_threads)
    {
        env_vars.push(env("BULWARK_WORKER_THREADS", threads.to_string()));
    }
    if config.ipv6 {
        env_vars.push(env(
            "BULWARK_OUTBOUND_ADDR_V6",
            format!("[::1]:{}", ports.outbound),
        ));
        env_vars.push(env(
            "BULWARK_INBOUND_TRANSPARENT",
            format!("[::]:{}", ports.inbound),
        ));
    } else {
        env_vars.push(env(
            "BULWARK_INBOUND_TRANSPARENT",
            format!("0.0.0.0:{}", ports.inbound),
        ));
    }
    if config.identity.is_some() {
        env_vars.push(env(
            "BULWARK_CONTROL_PLANE_CA",
            format!("{IDENTITY_DIR}/{ANCHORS_FILE}"),
        ));
        env_vars.push(env(
            "BULWARK_TOKEN_FILE",
            format!("{IDENTITY_DIR}/{TOKEN_FILE}"),
        ));
    }
    if let Some(store) = &config.rate_limit_store {
        env_vars.push(env("BULWARK_RATE_LIMIT_STORE_URL", store.url.clone()));
        if let Some(secret) = &store.secret_name {
            env_vars.push(secret_env(
                "BULWARK_RATE_LIMIT_STORE_USERNAME",
                secret,
                &store.username_key,
            ));
            env_vars.push(secret_env(
                "BULWARK_RATE_LIMIT_STORE_PASSWORD",
                secret,
                &store.password_key,
            ));
        }
    }
    // The agent's identity labels: the pod's labels as created (the agent reports them
    // to the control plane, which matches policy targets against them).
    let args: Vec<String> = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .map(|(key, value)| format!("--label={key}={value}"))
        .collect();
    let uid = config.uid;
    let admin = IntOrString::Int(i32::from(ports.admin));
    Ok(Container {
        name: AGENT_CONTAINER.to_owned(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        args: (!args.is_empty()).then_some(args),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("bulwark-admin".to_owned()),
            container_port: i32::from(ports.admin),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".to_owned()),
                port: admin,
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(2),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        restart_policy: native.then(|| "Always".to_owned()),
        lifecycle: (!native).then(|| Lifecycle {
            // Kubernetes starts the next container only once this hook returns, so the
            // app does not start before the agent is ready.
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "bulwark-agent".to_owned(),
                        "wait-ready".to_owned(),
                        format!("--admin-addr=127.0.0.1:{}", ports.admin),
                    ]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        resources: non_empty(resources),
        volume_mounts: config.identity.as_ref().map(|_| {
            vec![VolumeMount {
                name: IDENTITY_VOLUME.to_owned(),
                mount_path: IDENTITY_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(uid),
            run_as_group: Some(uid),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(runtime_default()),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_cores_of_two_or_more_become_worker_threads() {
        let threads = |q: &str| worker_threads(&Quantity(q.to_owned()));
        assert_eq!(threads("2"), Some(2));
        assert_eq!(threads("3500m"), Some(3));
        assert_eq!(threads("2.9"), Some(2));
        // A core or less keeps the agent's default of one.
        assert_eq!(threads("1"), None);
        assert_eq!(threads("1999m"), None);
        assert_eq!(threads("500m"), None);
        assert_eq!(threads("lots"), None);
    }
}
