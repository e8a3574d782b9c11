//! The agent's workload credentials: a key pair made here (the private key never leaves
//! the process) and the certificate the control plane signed for it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Why a key pair or certificate request could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot make a key pair and certificate request: {0}")]
pub struct KeyError(#[from] rcgen::Error);

/// A fresh key pair and the certificate request for it.
pub struct PendingKey {
    key: KeyPair,
    csr_der: Vec<u8>,
}

impl std::fmt::Debug for PendingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingKey { .. }")
    }
}

impl PendingKey {
    /// A new ECDSA P-256 key and a request for it. The request names nothing: the
    /// control plane decides the name from the token, whatever a request says.
    pub fn generate() -> Result<Self, KeyError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr_der = CertificateParams::default()
            .serialize_request(&key)?
            .der()
            .to_vec();
        Ok(PendingKey { key, csr_der })
    }

    /// The certificate request, DER.
    pub fn csr_der(&self) -> &[u8] {
        &self.csr_der
    }

    /// Pairs the key with the certificate signed for it.
    pub fn into_credentials(self, signed: Signed) -> Credentials {
        Credentials {
            spiffe_id: signed.spiffe_id,
            chain: signed.chain,
            anchors: signed.anchors,
            not_after: signed.not_after,
            key: PrivatePkcs8KeyDer::from(self.key.serialize_der()),
        }
    }
}

/// What the control plane answered to a certificate request.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The workload's SPIFFE ID.
    pub spiffe_id: String,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The anchors to verify peers with.
    pub anchors: Vec<CertificateDer<'static>>,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

/// A key pair with its certificate: what TLS with peers presents.
pub struct Credentials {
    /// The workload's SPIFFE ID.
    pub spiffe_id: String,
    /// The certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The trust anchors of the mesh.
    pub anchors: Vec<CertificateDer<'static>>,
    /// When the leaf expires.
    pub not_after: SystemTime,
    key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for Credentials {
    // The private key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &unix_secs(self.not_after))
            .field("chain", &self.chain.len())
            .field("anchors", &self.anchors.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The private key, for a TLS configuration.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Time left until the certificate expires (zero once it has).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_a_new_key_and_no_name() {
        let a = PendingKey::generate().unwrap();
        let b = PendingKey::generate().unwrap();
        assert_ne!(a.csr_der(), b.csr_der(), "a new key each time");
        let parsed = rcgen::CertificateSigningRequestParams::from_der(
            &rustls::pki_types::CertificateSigningRequestDer::from(a.csr_der()),
        )
        .unwrap();
        assert!(parsed.params.subject_alt_names.is_empty());
        assert_eq!(format!("{a:?}"), "PendingKey { .. }");
    }

    #[test]
    fn credentials_hide_the_key() {
        let pending = PendingKey::generate().unwrap();
        let creds = pending.into_credentials(Signed {
            spiffe_id: "spiffe://td/ns/a/sa/b".into(),
            chain: vec![],
            anchors: vec![],
            not_after: UNIX_EPOCH + Duration::from_secs(100),
        });
        let shown = format!("{creds:?}");
        assert!(shown.contains("spiffe://td/ns/a/sa/b"), "{shown}");
        assert!(!shown.contains("key"), "{shown}");
        assert_eq!(
            creds.remaining(UNIX_EPOCH + Duration::from_secs(40)),
            Duration::from_secs(60)
        );
        assert_eq!(
            creds.remaining(UNIX_EPOCH + Duration::from_secs(400)),
            Duration::ZERO
        );
    }
}
