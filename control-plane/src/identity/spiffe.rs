//! A workload's SPIFFE ID: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Built only from validated parts, so a value of this type always renders to a URI
//! that other meshes' SPIFFE parsers accept and that names exactly one ServiceAccount.

use std::fmt;

/// Why a trust domain, namespace, service account or URI is not a valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    /// The trust domain has characters the SPIFFE spec does not allow, or is empty.
    #[error(
        "trust domain {0:?} must be 1 to 255 lowercase letters, digits, dots, dashes or \
         underscores"
    )]
    TrustDomain(String),
    /// The namespace is not a DNS label.
    #[error("namespace {0:?} is not a Kubernetes namespace name (a DNS label)")]
    Namespace(String),
    /// The service account is not a DNS subdomain.
    #[error("service account {0:?} is not a Kubernetes name (a DNS subdomain)")]
    ServiceAccount(String),
    /// The URI is not of the workload form.
    #[error("{0:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Uri(String),
}

/// A validated workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Whether `s` is a DNS label (RFC 1123): what namespace names are.
fn dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a DNS subdomain (RFC 1123): what ServiceAccount names are.
fn dns_subdomain(s: &str) -> bool {
    (1..=253).contains(&s.len()) && s.split('.').all(dns_label)
}

impl SpiffeId {
    /// The ID of `service_account` in `namespace` under `trust_domain`.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, InvalidId> {
        let td_ok = (1..=255).contains(&trust_domain.len())
            && trust_domain.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !td_ok {
            return Err(InvalidId::TrustDomain(trust_domain.to_owned()));
        }
        if !dns_label(namespace) {
            return Err(InvalidId::Namespace(namespace.to_owned()));
        }
        if !dns_subdomain(service_account) {
            return Err(InvalidId::ServiceAccount(service_account.to_owned()));
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Parses the workload form of a SPIFFE URI.
    pub fn parse(uri: &str) -> Result<Self, InvalidId> {
        let invalid = || InvalidId::Uri(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(invalid)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid());
        };
        SpiffeId::new(td, ns, sa)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The workload's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The workload's ServiceAccount.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_parses_the_workload_form() {
        let id = SpiffeId::new("cluster.local", "shop", "orders").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/orders");
        assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "orders");
    }

    #[test]
    fn refuses_what_could_name_something_else() {
        for uri in [
            "spiffe://td/ns/shop/sa/orders/extra",
            "spiffe://td/ns/shop",
            "spiffe://td/sa/orders/ns/shop",
            "https://td/ns/shop/sa/orders",
            "spiffe://TD/ns/shop/sa/orders",
            "spiffe://td/ns/Shop/sa/orders",
            "spiffe://td/ns/shop/sa/",
            "spiffe://td/ns/-shop/sa/orders",
            "spiffe:///ns/shop/sa/orders",
        ] {
            assert!(SpiffeId::parse(uri).is_err(), "{uri}");
        }
        assert_eq!(
            SpiffeId::new("td", "shop", "a..b").unwrap_err(),
            InvalidId::ServiceAccount("a..b".into())
        );
        assert!(SpiffeId::new("td", &"n".repeat(64), "sa").is_err());
    }
}
