//! TLS with SPIFFE identities: the configurations an agent uses to originate mutual TLS
//! to a meshed peer and to terminate it from one, built from its current credentials.
//!
//! Peers are verified against the mesh's trust anchors. Their names are SPIFFE IDs in a
//! URI SAN, not DNS names, so the server side of a connection is verified by
//! [`SpiffeServerVerifier`]: the chain as WebPKI checks it, then a SPIFFE ID of our
//! trust domain. Which workload is expected is the caller's to compare after the
//! handshake ([`peer_identity`]), because one client configuration serves every
//! destination.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::credentials::Credentials;

/// The TLS counters of the agent (labels: direction, group, reason).
#[derive(Clone, Debug, Default)]
pub struct TlsCounters {
    /// Handshakes completed, by direction (`inbound`, `outbound`) and key-exchange group
    /// (`X25519MLKEM768`; `X25519` with a peer of an older, *ring*-based build).
    pub handshakes: Family<Vec<(&'static str, String)>, Counter>,
    /// Handshakes failed, by direction and reason.
    pub failures: Family<Vec<(&'static str, String)>, Counter>,
    /// Plaintext connections refused by a Strict inbound port.
    pub plaintext_refused: Counter,
    /// When the workload certificate in use expires (Unix seconds; 0: none in use).
    pub expiry: Gauge,
}

impl TlsCounters {
    /// Counts a finished handshake and the key-exchange group it used
    /// ([`bulwark_proto::tls::group_label`]: a handful of values).
    pub fn handshake(&self, direction: &'static str, group: &'static str) {
        self.handshakes
            .get_or_create(&vec![
                ("direction", direction.to_owned()),
                ("group", group.to_owned()),
            ])
            .inc();
    }

    /// Counts a failed handshake.
    pub fn failure(&self, direction: &'static str, reason: &'static str) {
        self.failures
            .get_or_create(&vec![
                ("direction", direction.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The anchors are unusable.
    #[error("the mesh's trust anchors are unusable: {0}")]
    Anchors(String),
    /// rustls refused the certificate, key or settings.
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The SPIFFE ID (URI SAN starting `spiffe://`) of a certificate, if it has exactly one.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    let mut found = None;
    for ext in parsed.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name
                    && uri.starts_with("spiffe://")
                {
                    if found.is_some() {
                        // Two identities in one certificate name nobody.
                        return None;
                    }
                    found = Some((*uri).to_owned());
                }
            }
        }
    }
    found
}

/// The issuer's distinguished name of a certificate (e.g. `CN=bulwark mesh CA`), to show
/// which issuer signed it while an anchor rotates.
pub fn issuer(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    Some(parsed.issuer().to_string())
}

/// The trust domain of a SPIFFE ID (`spiffe://<td>/...`).
fn trust_domain(id: &str) -> Option<&str> {
    id.strip_prefix("spiffe://")?.split('/').next()
}

/// The verified identity of the peer of a finished handshake.
pub fn peer_identity(peer_certificates: Option<&[CertificateDer<'_>]>) -> Option<String> {
    peer_certificates
        .and_then(|chain| chain.first())
        .and_then(spiffe_id)
}

fn roots(anchors: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut store = RootCertStore::empty();
    let (added, ignored) = store.add_parsable_certificates(anchors.iter().cloned());
    if added == 0 {
        return Err(TlsConfigError::Anchors(format!(
            "none of {} anchors parses ({ignored} ignored)",
            anchors.len()
        )));
    }
    Ok(Arc::new(store))
}

/// Verifies a server's chain against the mesh's anchors and requires a SPIFFE ID of our
/// trust domain instead of a DNS name.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match spiffe_id(end_entity) {
            Some(id) if trust_domain(&id) == Some(self.trust_domain.as_str()) => {
                Ok(ServerCertVerified::assertion())
            }
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The configuration to originate mutual TLS to meshed peers with `credentials`,
/// offering `alpn` (e.g. `h2`, `http/1.1`).
pub fn client_config(
    credentials: &Credentials,
    provider: Arc<CryptoProvider>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsConfigError> {
    let own_domain = trust_domain(&credentials.spiffe_id)
        .ok_or_else(|| {
            TlsConfigError::Anchors(format!("{} is not a SPIFFE ID", credentials.spiffe_id))
        })?
        .to_owned();
    let verifier = SpiffeServerVerifier {
        roots: roots(&credentials.anchors)?,
        provider: Arc::clone(&provider),
        trust_domain: own_domain,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(credentials.chain.clone(), credentials.key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The configuration to terminate mutual TLS from meshed peers: a client certificate
/// chaining to the mesh's anchors is required; its SPIFFE ID is the caller's identity.
pub fn server_config(
    credentials: &Credentials,
    provider: Arc<CryptoProvider>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsConfigError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(
        roots(&credentials.anchors)?,
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| TlsConfigError::Anchors(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(credentials.chain.clone(), credentials.key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::identity::credentials::{PendingKey, Signed};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        anchor: CertificateDer<'static>,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            issuer: Issuer::new(params, key),
            anchor: cert.der().clone(),
        }
    }

    /// Credentials for `id` signed by `signer`, trusting `trusted`'s anchor; valid now
    /// for an hour, or `expired` an hour ago.
    fn credentials(id: &str, signer: &Ca, trusted: &Ca, expired: bool) -> Credentials {
        let pending = PendingKey::generate().unwrap();
        let request = rcgen::CertificateSigningRequestParams::from_der(
            &rustls::pki_types::CertificateSigningRequestDer::from(pending.csr_der()),
        )
        .unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        let (from, until) = if expired {
            (
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
        } else {
            (
                now - Duration::from_secs(60),
                now + Duration::from_secs(3600),
            )
        };
        params.not_before = from.into();
        params.not_after = until.into();
        let leaf = params
            .signed_by(&request.public_key, &signer.issuer)
            .unwrap();
        pending.into_credentials(Signed {
            spiffe_id: id.to_owned(),
            chain: vec![leaf.der().clone()],
            anchors: vec![trusted.anchor.clone()],
            not_after: until,
        })
    }

    /// The mesh's provider, as `MeshTls` builds its configurations with.
    fn provider() -> Arc<CryptoProvider> {
        Arc::new(bulwark_proto::tls::provider())
    }

    /// A peer of an older build, whose *ring* provider has no post-quantum group:
    /// X25519 alone (ring also lists the NIST curves after it; X25519 alone is stricter).
    fn x25519_only() -> Arc<CryptoProvider> {
        Arc::new(CryptoProvider {
            kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
            ..bulwark_proto::tls::provider()
        })
    }

    /// What one side learnt from a finished handshake.
    #[derive(Debug)]
    struct Seen {
        peer: Option<String>,
        group: Option<rustls::NamedGroup>,
        kind: Option<rustls::HandshakeKind>,
    }

    fn seen(tls: &rustls::CommonState) -> Seen {
        Seen {
            peer: peer_identity(tls.peer_certificates()),
            group: tls.negotiated_key_exchange_group().map(|g| g.name()),
            kind: tls.handshake_kind(),
        }
    }

    /// One handshake over an in-memory pipe and a byte each way; each side's view of
    /// the other's identity, or the first error.
    async fn handshake(
        client: &Credentials,
        server: &Credentials,
    ) -> Result<(Option<String>, Option<String>), String> {
        let (client, server) = handshake_with(client, provider(), server, provider()).await?;
        Ok((client.peer, server.peer))
    }

    /// [`handshake`] with each side's own provider; what each side saw.
    async fn handshake_with(
        client: &Credentials,
        client_provider: Arc<CryptoProvider>,
        server: &Credentials,
        server_provider: Arc<CryptoProvider>,
    ) -> Result<(Seen, Seen), String> {
        let connector = TlsConnector::from(Arc::new(
            client_config(client, client_provider, &[b"http/1.1"]).unwrap(),
        ));
        let acceptor = TlsAcceptor::from(Arc::new(
            server_config(server, server_provider, &[b"http/1.1"]).unwrap(),
        ));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server_side = tokio::spawn(async move {
            let mut tls = acceptor.accept(b).await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            tls.write_all(&byte).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(seen(tls.get_ref().1))
        });
        let name = ServerName::try_from("peer.bulwark.invalid").unwrap();
        let client_side = async {
            let mut tls = connector
                .connect(name, a)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(seen(tls.get_ref().1))
        };
        let client_view = client_side.await;
        let server_view = server_side.await.unwrap();
        Ok((client_view?, server_view?))
    }

    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
    const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";

    #[tokio::test]
    async fn each_side_learns_the_others_spiffe_id() {
        let mesh = ca("mesh");
        let client = credentials(ORDERS, &mesh, &mesh, false);
        let server = credentials(PAYMENTS, &mesh, &mesh, false);
        let (client_sees, server_sees) = handshake(&client, &server).await.unwrap();
        assert_eq!(client_sees.as_deref(), Some(PAYMENTS));
        assert_eq!(server_sees.as_deref(), Some(ORDERS));
    }

    #[tokio::test]
    async fn two_agents_agree_on_the_post_quantum_hybrid_key_exchange() {
        let mesh = ca("mesh");
        let client = credentials(ORDERS, &mesh, &mesh, false);
        let server = credentials(PAYMENTS, &mesh, &mesh, false);
        let (client_saw, server_saw) = handshake_with(&client, provider(), &server, provider())
            .await
            .unwrap();
        for side in [&client_saw, &server_saw] {
            assert_eq!(
                side.group,
                Some(rustls::NamedGroup::X25519MLKEM768),
                "{side:?}"
            );
            assert_eq!(side.kind, Some(rustls::HandshakeKind::Full), "{side:?}");
        }
        assert_eq!(client_saw.peer.as_deref(), Some(PAYMENTS));
        assert_eq!(server_saw.peer.as_deref(), Some(ORDERS));
    }

    /// A rolling upgrade: an agent of an older build (X25519 only) and one of this build
    /// agree on X25519 whichever side calls, in one round trip: no HelloRetryRequest,
    /// which would cost a round trip, and no failed handshake.
    #[tokio::test]
    async fn a_peer_offering_only_x25519_connects_either_way_without_a_retry() {
        let mesh = ca("mesh");
        let client = credentials(ORDERS, &mesh, &mesh, false);
        let server = credentials(PAYMENTS, &mesh, &mesh, false);
        for (older, client_provider, server_provider) in [
            ("client", x25519_only(), provider()),
            ("server", provider(), x25519_only()),
        ] {
            let (client_saw, server_saw) =
                handshake_with(&client, client_provider, &server, server_provider)
                    .await
                    .unwrap_or_else(|e| panic!("older {older}: {e}"));
            for side in [&client_saw, &server_saw] {
                assert_eq!(
                    side.group,
                    Some(rustls::NamedGroup::X25519),
                    "older {older}: {side:?}"
                );
                assert_eq!(
                    side.kind,
                    Some(rustls::HandshakeKind::Full),
                    "older {older}: {side:?}"
                );
            }
            assert_eq!(client_saw.peer.as_deref(), Some(PAYMENTS));
            assert_eq!(server_saw.peer.as_deref(), Some(ORDERS));
        }
    }

    #[tokio::test]
    async fn a_peer_of_another_mesh_or_domain_or_an_expired_one_is_refused() {
        let mesh = ca("mesh");
        let other = ca("other");
        let client = credentials(ORDERS, &mesh, &mesh, false);
        // Signed by a CA the client does not trust.
        let stranger = credentials(PAYMENTS, &other, &mesh, false);
        assert!(handshake(&client, &stranger).await.is_err());
        // Trusted CA, but another trust domain.
        let foreign = credentials(
            "spiffe://elsewhere/ns/shop/sa/payments",
            &mesh,
            &mesh,
            false,
        );
        assert!(handshake(&client, &foreign).await.is_err());
        // Expired.
        let expired = credentials(PAYMENTS, &mesh, &mesh, true);
        assert!(handshake(&client, &expired).await.is_err());
        // A client the server cannot verify.
        let server = credentials(PAYMENTS, &mesh, &mesh, false);
        let forged_client = credentials(ORDERS, &other, &mesh, false);
        assert!(handshake(&forged_client, &server).await.is_err());
    }

    #[test]
    fn a_certificate_with_two_spiffe_ids_names_nobody() {
        let mesh = ca("mesh");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(ORDERS.try_into().unwrap()),
            SanType::URI(PAYMENTS.try_into().unwrap()),
        ];
        let cert = params.signed_by(&key, &mesh.issuer).unwrap();
        assert_eq!(spiffe_id(cert.der()), None);
        assert_eq!(spiffe_id(&mesh.anchor), None);
    }
}
