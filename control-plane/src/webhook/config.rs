//! What the webhook injects: the agent's image, ports, identity and resources, read from
//! a YAML file (the chart renders it from `values.yaml` into a ConfigMap).

use std::path::Path;

use k8s_openapi::api::core::v1::ResourceRequirements;
use serde::Deserialize;

/// How the agent goes into a pod.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub enum SidecarMode {
    /// Native when the API server is 1.29 or later, else a container.
    #[default]
    Auto,
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+).
    Native,
    /// An ordinary container listed first, with a `postStart` hook that waits for it.
    Container,
}

/// The agent's ports in an injected pod.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ports {
    /// Outbound listener (the pod's outbound TCP is redirected here).
    pub outbound: u16,
    /// Transparent inbound listener (the pod's inbound TCP is redirected here).
    pub inbound: u16,
    /// Admin listener (`/ready`, `/metrics`); the readiness probe uses it.
    pub admin: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: 4140,
            inbound: 4143,
            admin: 4191,
        }
    }
}

/// Workload identity in injected pods: what the agent needs to prove who it is and to
/// verify the control plane.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityInjection {
    /// How long the projected ServiceAccount token the kubelet writes for the agent is
    /// valid; the kubelet replaces it at 80 % of that, and the agent reads it at every
    /// request.
    #[serde(default = "default_token_expiration")]
    pub token_expiration_seconds: i64,
}

impl Default for IdentityInjection {
    fn default() -> Self {
        IdentityInjection {
            token_expiration_seconds: default_token_expiration(),
        }
    }
}

/// Default [`IdentityInjection::token_expiration_seconds`]: one hour.
pub const DEFAULT_TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// The shortest token Kubernetes projects (`expirationSeconds` must be at least 10 min).
pub const MIN_TOKEN_EXPIRATION_SECONDS: i64 = 600;

fn default_token_expiration() -> i64 {
    DEFAULT_TOKEN_EXPIRATION_SECONDS
}

/// The injection settings, as the chart writes them.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InjectConfig {
    /// The agent image (it also runs `bulwark-agent init`).
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`; unset leaves Kubernetes' default.
    #[serde(default)]
    pub image_pull_policy: Option<String>,
    /// The control plane's gRPC address as agents dial it.
    pub control_plane_address: String,
    /// The control plane's namespace: its pods are never injected.
    pub control_plane_namespace: String,
    /// The version recorded in the `bulwark.io/injected` annotation.
    #[serde(default = "default_version")]
    pub version: String,
    /// Native sidecar or ordinary container.
    #[serde(default)]
    pub sidecar_mode: SidecarMode,
    /// The agent's UID and GID (its own traffic is never redirected).
    #[serde(default = "default_uid")]
    pub uid: i64,
    /// The agent's ports.
    #[serde(default)]
    pub ports: Ports,
    /// The agent's `RUST_LOG`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// The agent's requests and limits (annotations override single values).
    #[serde(default)]
    pub resources: ResourceRequirements,
    /// The init container's requests and limits.
    #[serde(default)]
    pub init_resources: ResourceRequirements,
    /// Outbound ranges never redirected in any pod (e.g. the cloud metadata address).
    #[serde(default)]
    pub skip_outbound_cidrs: Vec<String>,
    /// Redirect IPv6 too (ip6tables rules and IPv6 listeners); off for IPv4-only pods.
    #[serde(default)]
    pub ipv6: bool,
    /// Workload identity: the agent gets a projected token and the mesh's trust anchors
    /// and dials an `https://` control plane. Absent: plaintext, as without identity.
    #[serde(default)]
    pub identity: Option<IdentityInjection>,
    /// Namespaces the webhook configuration never sends (besides the control plane's and
    /// `kube-system`): they get no trust-anchor ConfigMap either.
    #[serde(default)]
    pub excluded_namespaces: Vec<String>,
    /// The rate-limit store (Redis) of Shared rate limits; absent: agents have none, and
    /// Shared limits apply their onStoreUnavailable mode.
    #[serde(default)]
    pub rate_limit_store: Option<RateLimitStoreInjection>,
}

/// How injected agents reach the rate-limit store.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitStoreInjection {
    /// `redis://HOST:PORT[/DB]`, or `rediss://` for TLS; no credentials in it.
    pub url: String,
    /// A Secret in each meshed namespace holding the credentials (optional: a pod
    /// whose namespace lacks it starts without them, and the store refuses it).
    #[serde(default)]
    pub secret_name: Option<String>,
    /// The Secret's key of the password.
    #[serde(default = "default_password_key")]
    pub password_key: String,
    /// The Secret's key of the ACL user name (optional in the Secret).
    #[serde(default = "default_username_key")]
    pub username_key: String,
}

fn default_password_key() -> String {
    "password".to_owned()
}

fn default_username_key() -> String {
    "username".to_owned()
}

fn default_version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}

fn default_uid() -> i64 {
    1337
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// Why the injection settings were rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the injection settings {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not match the settings' shape.
    #[error("invalid injection settings {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with the field path.
        source: serde_path_to_error::Error<serde_yaml_ng::Error>,
    },
    /// A value is out of range.
    #[error("invalid injection settings: {0}")]
    Invalid(String),
}

impl InjectConfig {
    /// Settings for `image` and a control plane, with every default.
    pub fn new(image: &str, control_plane_address: &str, control_plane_namespace: &str) -> Self {
        InjectConfig {
            image: image.to_owned(),
            image_pull_policy: None,
            control_plane_address: control_plane_address.to_owned(),
            control_plane_namespace: control_plane_namespace.to_owned(),
            version: default_version(),
            sidecar_mode: SidecarMode::Auto,
            uid: default_uid(),
            ports: Ports::default(),
            log_level: default_log_level(),
            resources: ResourceRequirements::default(),
            init_resources: ResourceRequirements::default(),
            skip_outbound_cidrs: Vec::new(),
            ipv6: false,
            identity: None,
            excluded_namespaces: Vec::new(),
            rate_limit_store: None,
        }
    }

    /// Reads and validates the settings file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: shown,
                source,
            },
            other => other,
        })
    }

    /// Parses and validates settings from YAML.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let config: InjectConfig =
            serde_path_to_error::deserialize(de).map_err(|source| ConfigError::Parse {
                path: "<inline>".to_owned(),
                source,
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.image.trim().is_empty() {
            return invalid("image must not be empty");
        }
        if self.control_plane_address.trim().is_empty() {
            return invalid("controlPlaneAddress must not be empty");
        }
        if self.uid <= 0 {
            return invalid("uid must be a non-root UID (more than 0)");
        }
        let Ports {
            outbound,
            inbound,
            admin,
        } = self.ports;
        if outbound == 0 || inbound == 0 || admin == 0 {
            return invalid("ports must be more than 0");
        }
        if outbound == inbound || outbound == admin || inbound == admin {
            return invalid("ports.outbound, ports.inbound and ports.admin must differ");
        }
        if let Some(policy) = &self.image_pull_policy
            && !matches!(policy.as_str(), "Always" | "IfNotPresent" | "Never")
        {
            return invalid("imagePullPolicy must be Always, IfNotPresent or Never");
        }
        // The agent verifies an https:// control plane with the anchors only identity
        // mounts, and presents its token only over TLS: the two go together.
        let tls = self.control_plane_address.starts_with("https://");
        match &self.identity {
            Some(_) if !tls => {
                return invalid(
                    "with identity, controlPlaneAddress must be https:// (agents present their \
                     token over TLS only)",
                );
            }
            None if tls => {
                return invalid(
                    "an https:// controlPlaneAddress needs identity (the agent verifies the \
                     control plane with the trust anchors identity mounts)",
                );
            }
            Some(identity) if identity.token_expiration_seconds < MIN_TOKEN_EXPIRATION_SECONDS => {
                return invalid(
                    "identity.tokenExpirationSeconds must be at least 600 (Kubernetes' minimum)",
                );
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        let config = InjectConfig::parse(
            "image: bulwark/agent:1\ncontrolPlaneAddress: http://cp:9990\ncontrolPlaneNamespace: bulwark\n",
        )
        .unwrap();
        assert_eq!(config.ports, Ports::default());
        assert_eq!(config.uid, 1337);
        assert_eq!(config.sidecar_mode, SidecarMode::Auto);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected_with_a_reason() {
        let base = "image: a\ncontrolPlaneAddress: b\ncontrolPlaneNamespace: c\n";
        let err = InjectConfig::parse(&format!("{base}imagePullPolice: Always\n")).unwrap_err();
        assert!(err.to_string().contains("imagePullPolice"), "{err}");
        let err = InjectConfig::parse(&format!("{base}uid: 0\n")).unwrap_err();
        assert!(err.to_string().contains("non-root"), "{err}");
        let err = InjectConfig::parse(&format!(
            "{base}ports: {{outbound: 1, inbound: 1, admin: 2}}\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("must differ"), "{err}");
        let err = InjectConfig::parse(&format!("{base}sidecarMode: Sometimes\n")).unwrap_err();
        assert!(err.to_string().contains("sidecarMode"), "{err}");
    }

    #[test]
    fn identity_goes_with_an_https_control_plane() {
        let with = |address: &str, identity: &str| {
            InjectConfig::parse(&format!(
                "image: a\ncontrolPlaneAddress: {address}\ncontrolPlaneNamespace: c\n{identity}"
            ))
        };
        let config = with("https://cp:9990", "identity: {}\n").unwrap();
        assert_eq!(
            config.identity,
            Some(IdentityInjection {
                token_expiration_seconds: 3600
            })
        );
        let err = with("http://cp:9990", "identity: {}\n").unwrap_err();
        assert!(err.to_string().contains("must be https://"), "{err}");
        let err = with("https://cp:9990", "").unwrap_err();
        assert!(err.to_string().contains("needs identity"), "{err}");
        let err = with(
            "https://cp:9990",
            "identity: {tokenExpirationSeconds: 60}\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("at least 600"), "{err}");
        let err = with("https://cp:9990", "identity: {audience: x}\n").unwrap_err();
        assert!(err.to_string().contains("audience"), "{err}");
    }
}
