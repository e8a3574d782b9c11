//! The certificate authority of the mesh: signs each workload's certificate from the
//! agent's certificate request, for the identity its token proved.
//!
//! The issuer's certificate and key come from a folder laid out as a
//! `kubernetes.io/tls` Secret (what cert-manager writes): `tls.crt` (the issuer, maybe
//! followed by intermediates), `tls.key` (its PKCS#8 key) and, optionally, `ca.crt`
//! (the trust anchors agents verify peers with; more than one while an anchor rotates;
//! absent: the last certificate of `tls.crt`). Without a folder, [`Authority::generate`]
//! makes a self-signed one for a local mesh.
//!
//! A request decides nothing but the public key: the certificate's only name is the
//! SPIFFE ID the caller proved, its lifetime is ours, and it can never sign others.
//!
//! A loaded authority re-reads its folder (every [`RELOAD_EVERY`]) and takes a changed
//! issuer or anchor bundle without a restart: that is how the trust anchor rotates
//! (see the README's identity section). A folder that no longer loads is logged and
//! the last good issuer keeps signing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};

use super::spiffe::SpiffeId;

/// Default lifetime of a workload certificate.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How far back a certificate's validity starts, for peers whose clocks run behind.
const BACKDATE: Duration = Duration::from_secs(60);
/// Largest certificate request accepted (a P-256 or RSA-4096 request is well below).
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// Why the authority could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error(
        "cannot read {path}: {source}; mount the issuer Secret (tls.crt, tls.key, ca.crt) there"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable PEM.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The key does not fit the certificate, or rcgen refused them.
    #[error("the issuer certificate and key in {dir} cannot sign: {source}")]
    Issuer {
        /// The folder.
        dir: PathBuf,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// `tls.key` is not the key of the first certificate of `tls.crt`.
    #[error(
        "the key in {dir}/tls.key is not the key of the issuer certificate in tls.crt (a Secret \
         updated halfway?); keeping the last good issuer"
    )]
    KeyMismatch {
        /// The folder.
        dir: PathBuf,
    },
    /// A generated authority could not be made.
    #[error("cannot generate a certificate authority: {0}")]
    Generate(#[source] rcgen::Error),
}

/// Why a certificate request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// Larger than any real request.
    #[error("the certificate request is {0} bytes; at most {MAX_CSR_BYTES}")]
    TooLarge(usize),
    /// Not a PKCS#10 request with a valid self-signature.
    #[error("the certificate request is not a valid PKCS#10 request: {0}")]
    Malformed(#[source] rcgen::Error),
    /// Signing failed.
    #[error("cannot sign the certificate: {0}")]
    Sign(#[source] rcgen::Error),
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, then the issuer's chain (without the anchor).
    pub chain: Vec<CertificateDer<'static>>,
    /// When it stops being valid.
    pub not_after: SystemTime,
}

/// How often a loaded authority looks for a changed issuer or anchor bundle.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// The mesh's certificate authority.
pub struct Authority {
    signing: ArcSwap<Signing>,
    /// The folder it was loaded from (none: generated, never reloaded).
    dir: Option<PathBuf>,
    reload_every: Duration,
    trust_domain: String,
    lifetime: Duration,
}

/// One issuer and anchor bundle.
struct Signing {
    issuer: Issuer<'static, KeyPair>,
    /// The issuer's certificate and intermediates, sent after every leaf.
    issuer_chain: Vec<CertificateDer<'static>>,
    anchors: Vec<CertificateDer<'static>>,
    /// The files' bytes, to tell a change from a re-read of the same files.
    files: Vec<u8>,
}

impl std::fmt::Debug for Authority {
    // The issuer's key stays out of every log and dump.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .field("anchors", &self.signing.load().anchors.len())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| LoadError::Pem {
            path: path.to_owned(),
            what: format!("unreadable PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(LoadError::Pem {
            path: path.to_owned(),
            what: "holds no CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

/// The bytes of the folder's files (`ca.crt` may be absent).
fn files(dir: &Path) -> Result<Vec<u8>, LoadError> {
    let mut bytes = read(&dir.join("tls.crt"))?;
    bytes.extend(read(&dir.join("tls.key"))?);
    let anchors = dir.join("ca.crt");
    if anchors.exists() {
        bytes.extend(read(&anchors)?);
    }
    Ok(bytes)
}

impl Signing {
    fn load(dir: &Path) -> Result<Self, LoadError> {
        let chain = certificates(&dir.join("tls.crt"))?;
        let files = files(dir)?;
        let key_path = dir.join("tls.key");
        let key_pem = read(&key_path)?;
        // Parsed with rustls first so the error names the file, not rcgen's internals.
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| LoadError::Pem {
            path: key_path.clone(),
            what: format!("no private key: {e}"),
        })?;
        let key = KeyPair::try_from(&key_der).map_err(|source| LoadError::Issuer {
            dir: dir.to_owned(),
            source,
        })?;
        let spki = x509_parser::parse_x509_certificate(&chain[0])
            .map(|(_, cert)| cert.public_key().subject_public_key.data.to_vec())
            .map_err(|e| LoadError::Pem {
                path: dir.join("tls.crt"),
                what: format!("not an X.509 certificate: {e}"),
            })?;
        if spki != key.public_key_raw() {
            return Err(LoadError::KeyMismatch {
                dir: dir.to_owned(),
            });
        }
        let issuer =
            Issuer::from_ca_cert_der(&chain[0], key).map_err(|source| LoadError::Issuer {
                dir: dir.to_owned(),
                source,
            })?;
        let anchors_path = dir.join("ca.crt");
        let anchors = if anchors_path.exists() {
            certificates(&anchors_path)?
        } else {
            chain.last().cloned().into_iter().collect()
        };
        // The anchors are what peers trust; they are not sent in the chain.
        let issuer_chain = chain.into_iter().filter(|c| !anchors.contains(c)).collect();
        Ok(Signing {
            issuer,
            issuer_chain,
            anchors,
            files,
        })
    }
}

impl Authority {
    /// Loads the issuer from `dir` (see the module doc for the files).
    pub fn load(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<Self, LoadError> {
        Ok(Authority {
            signing: ArcSwap::from_pointee(Signing::load(dir)?),
            dir: Some(dir.to_owned()),
            reload_every: RELOAD_EVERY,
            trust_domain: trust_domain.to_owned(),
            lifetime,
        })
    }

    /// Looks for a changed folder every `every` instead of [`RELOAD_EVERY`].
    pub fn reload_every(mut self, every: Duration) -> Self {
        self.reload_every = every;
        self
    }

    /// Re-reads the folder; true when the issuer or anchors changed (and now sign).
    pub fn reload(&self) -> Result<bool, LoadError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        if files(dir)? == self.signing.load().files {
            return Ok(false);
        }
        let next = Signing::load(dir)?;
        info!(
            dir = %dir.display(),
            anchors = next.anchors.len(),
            "the mesh's issuer or trust anchors changed; signing with the new ones"
        );
        self.signing.store(Arc::new(next));
        Ok(true)
    }

    /// Reloads the folder every [`Authority::reload_every`] until `shutdown`, calling
    /// `changed` after each change (e.g. to re-sign the serving certificate). A folder
    /// that fails to load is logged once per error and the last good issuer stays.
    pub fn spawn_reload(
        self: &Arc<Self>,
        changed: impl Fn() + Send + 'static,
        mut shutdown: watch::Receiver<bool>,
    ) -> Option<JoinHandle<()>> {
        self.dir.as_ref()?;
        let this = Arc::clone(self);
        Some(tokio::spawn(async move {
            let mut last_error = None;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(this.reload_every) => {}
                    _ = crate::stopped(&mut shutdown) => return,
                }
                match this.reload() {
                    Ok(true) => {
                        last_error = None;
                        changed();
                    }
                    Ok(false) => last_error = None,
                    Err(error) => {
                        let text = error.to_string();
                        if last_error.as_ref() != Some(&text) {
                            warn!(%error, "cannot reload the mesh's issuer; the last good one keeps signing");
                            last_error = Some(text);
                        }
                    }
                }
            }
        }))
    }

    /// A new self-signed authority, for a mesh without a cluster (the folder source,
    /// the demo and tests). Its anchor is returned by [`Authority::anchors`].
    pub fn generate(trust_domain: &str, lifetime: Duration) -> Result<Self, LoadError> {
        let key = KeyPair::generate().map_err(LoadError::Generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("bulwark mesh CA ({trust_domain})"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 24 * 3600)).into();
        let cert = params.self_signed(&key).map_err(LoadError::Generate)?;
        Ok(Authority {
            signing: ArcSwap::from_pointee(Signing {
                issuer: Issuer::new(params, key),
                issuer_chain: Vec::new(),
                anchors: vec![cert.der().clone()],
                files: Vec::new(),
            }),
            dir: None,
            reload_every: RELOAD_EVERY,
            trust_domain: trust_domain.to_owned(),
            lifetime,
        })
    }

    /// The trust anchors agents verify peers with.
    pub fn anchors(&self) -> Vec<CertificateDer<'static>> {
        self.signing.load().anchors.clone()
    }

    /// The trust domain of every identity this authority signs.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The lifetime of the certificates it signs.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Signs a certificate for `id` with the public key of `csr_der`; nothing else of
    /// the request is used.
    pub fn sign(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        now: SystemTime,
    ) -> Result<Issued, SignError> {
        if csr_der.len() > MAX_CSR_BYTES {
            return Err(SignError::TooLarge(csr_der.len()));
        }
        let request =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(SignError::Malformed)?;
        let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(SignError::Sign)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let not_after = now + self.lifetime;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let signing = self.signing.load();
        let leaf = params
            .signed_by(&request.public_key, &signing.issuer)
            .map_err(SignError::Sign)?;
        let mut chain = Vec::with_capacity(1 + signing.issuer_chain.len());
        chain.push(leaf.der().clone());
        chain.extend(signing.issuer_chain.iter().cloned());
        Ok(Issued { chain, not_after })
    }

    /// A serving certificate for the control plane itself (its gRPC and identity
    /// endpoint), for `dns_names` and IP addresses, with its new key as PKCS#8 DER.
    pub fn serving(
        &self,
        names: &[String],
        now: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), SignError> {
        let key = KeyPair::generate().map_err(SignError::Sign)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(SignError::Sign)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "bulwark-control-plane");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + self.lifetime).into();
        let signing = self.signing.load();
        let cert = params
            .signed_by(&key, &signing.issuer)
            .map_err(SignError::Sign)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(signing.issuer_chain.iter().cloned());
        let key = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| SignError::Sign(rcgen::Error::PemError(e.to_owned())))?;
        Ok((chain, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

    fn csr(sans: Vec<String>) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(sans).unwrap();
        let der = params.serialize_request(&key).unwrap().der().to_vec();
        (key, der)
    }

    fn uris(der: &[u8]) -> Vec<String> {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        let mut out = Vec::new();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => out.push((*u).to_owned()),
                        other => out.push(format!("{other:?}")),
                    }
                }
            }
        }
        out
    }

    #[test]
    fn signs_only_the_proven_identity_whatever_the_request_asks() {
        let ca = Authority::generate("cluster.local", DEFAULT_LIFETIME).unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "orders").unwrap();
        // The request asks for another workload's ID and a DNS name: ignored.
        let (key, request) = csr(vec![
            "spiffe://cluster.local/ns/kube-system/sa/admin".into(),
            "payments.shop.svc".into(),
        ]);
        let now = SystemTime::now();
        let issued = ca.sign(&request, &id, now).unwrap();
        assert_eq!(issued.chain.len(), 1, "a root signs directly");
        assert_eq!(uris(&issued.chain[0]), vec![id.to_string()]);
        let (_, cert) = X509Certificate::from_der(&issued.chain[0]).unwrap();
        assert!(!cert.is_ca());
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw(),
            "the requester's key, not a new one"
        );
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, (DEFAULT_LIFETIME + BACKDATE).as_secs() as i64);
        let anchors = ca.anchors();
        let (_, anchor) = X509Certificate::from_der(&anchors[0]).unwrap();
        assert_eq!(cert.issuer(), anchor.subject());
        assert!(cert.verify_signature(Some(anchor.public_key())).is_ok());
    }

    #[test]
    fn malformed_or_forged_requests_are_refused_with_a_reason() {
        let ca = Authority::generate("td", DEFAULT_LIFETIME).unwrap();
        let id = SpiffeId::new("td", "a", "b").unwrap();
        let now = SystemTime::now();
        assert!(matches!(
            ca.sign(b"not a csr", &id, now),
            Err(SignError::Malformed(_))
        ));
        assert!(matches!(
            ca.sign(&vec![0x30; MAX_CSR_BYTES + 1], &id, now),
            Err(SignError::TooLarge(_))
        ));
        // A valid request with one byte of its signature changed.
        let (_, mut request) = csr(vec![]);
        let last = request.len() - 1;
        request[last] ^= 0x01;
        let error = ca.sign(&request, &id, now).unwrap_err();
        assert!(matches!(error, SignError::Malformed(_)), "{error}");
        assert!(error.to_string().contains("not a valid PKCS#10"));
    }

    #[test]
    fn loads_a_cert_manager_secret_with_an_intermediate_and_two_anchors() {
        // root -> intermediate (the issuer); a second root is trusted too (rotation).
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = CertificateParams::default();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params
            .distinguished_name
            .push(DnType::CommonName, "root");
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);
        let int_key = KeyPair::generate().unwrap();
        let mut int_params = CertificateParams::default();
        int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int_params
            .distinguished_name
            .push(DnType::CommonName, "intermediate");
        let intermediate = int_params.signed_by(&int_key, &root_issuer).unwrap();
        let next = Authority::generate("td", DEFAULT_LIFETIME).unwrap();

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tls.crt"),
            format!("{}{}", intermediate.pem(), root.pem()),
        )
        .unwrap();
        std::fs::write(dir.path().join("tls.key"), int_key.serialize_pem()).unwrap();
        let anchors = format!("{}{}", root.pem(), pem_of(&next.anchors()[0]));
        std::fs::write(dir.path().join("ca.crt"), anchors).unwrap();

        let ca = Authority::load(dir.path(), "td", DEFAULT_LIFETIME).unwrap();
        assert_eq!(ca.anchors().len(), 2);
        let id = SpiffeId::new("td", "a", "b").unwrap();
        let (_, request) = csr(vec![]);
        let issued = ca.sign(&request, &id, SystemTime::now()).unwrap();
        assert_eq!(
            issued.chain.len(),
            2,
            "leaf and intermediate, without the root"
        );
        assert_eq!(issued.chain[1], *intermediate.der());
        let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).unwrap();
        let (_, int) = X509Certificate::from_der(intermediate.der()).unwrap();
        assert!(leaf.verify_signature(Some(int.public_key())).is_ok());
        assert!(format!("{ca:?}").contains("trust_domain"));
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    /// A self-signed CA named `name`: its certificate PEM and key PEM.
    fn root(name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn issuer_cn(der: &[u8]) -> String {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        cert.issuer().to_string()
    }

    #[test]
    fn a_rotated_folder_is_taken_and_a_broken_one_leaves_the_last_good_issuer() {
        let (old_cert, old_key) = root("old");
        let (new_cert, new_key) = root("new");
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("tls.crt", &old_cert);
        write("tls.key", &old_key);
        let ca = Authority::load(dir.path(), "td", DEFAULT_LIFETIME).unwrap();
        let id = SpiffeId::new("td", "a", "b").unwrap();
        let sign = || {
            ca.sign(&csr(vec![]).1, &id, SystemTime::now())
                .unwrap()
                .chain[0]
                .to_vec()
        };
        assert!(!ca.reload().unwrap(), "nothing changed");

        // 1. Both anchors trusted, the old issuer still signs.
        write("ca.crt", &format!("{old_cert}{new_cert}"));
        assert!(ca.reload().unwrap());
        assert_eq!(ca.anchors().len(), 2);
        assert_eq!(issuer_cn(&sign()), "CN=old");
        // 2. The new issuer signs.
        write("tls.crt", &new_cert);
        write("tls.key", &new_key);
        assert!(ca.reload().unwrap());
        assert_eq!(issuer_cn(&sign()), "CN=new");
        // A half-written Secret (key of the other issuer) is refused; signing goes on.
        write("tls.key", &old_key);
        assert!(ca.reload().is_err());
        assert_eq!(issuer_cn(&sign()), "CN=new");
        write("tls.key", &new_key);
        // 3. The old anchor goes.
        write("ca.crt", &new_cert);
        assert!(ca.reload().unwrap());
        assert_eq!(ca.anchors().len(), 1);
    }

    fn pem_of(der: &CertificateDer<'_>) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn a_missing_or_empty_secret_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let error = Authority::load(dir.path(), "td", DEFAULT_LIFETIME).unwrap_err();
        assert!(error.to_string().contains("tls.crt"), "{error}");
        std::fs::write(dir.path().join("tls.crt"), "nothing here").unwrap();
        let error = Authority::load(dir.path(), "td", DEFAULT_LIFETIME).unwrap_err();
        assert!(error.to_string().contains("no CERTIFICATE"), "{error}");
    }
}
