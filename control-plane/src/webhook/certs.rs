//! The webhook's serving certificate: read from a folder (`tls.crt`, `tls.key`, as a
//! Kubernetes TLS Secret mounts them) and re-read when the files change, so a rotated
//! Secret is served without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tracing::{info, warn};

/// The certificate file in the folder.
pub const CERT_FILE: &str = "tls.crt";
/// The private key file in the folder.
pub const KEY_FILE: &str = "tls.key";

/// Why the certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The PEM bytes of a certificate chain and its key, as last read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pems {
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn read_pems(dir: &Path) -> Result<Pems, CertError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| CertError::Read { path, source })
    };
    Ok(Pems {
        cert: read(CERT_FILE)?,
        key: read(KEY_FILE)?,
    })
}

fn certified_key(dir: &Path, pems: &Pems) -> Result<CertifiedKey, CertError> {
    let pem_error = |name: &str, reason: String| CertError::Pem {
        path: dir.join(name),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&pems.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(CERT_FILE, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_error(CERT_FILE, "no CERTIFICATE block".to_owned()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(&pems.key).map_err(|e| pem_error(KEY_FILE, e.to_string()))?;
    let key = bulwark_proto::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| pem_error(KEY_FILE, e.to_string()))?;
    let certified = CertifiedKey::new(chain, key);
    certified
        .keys_match()
        .map_err(|e| pem_error(KEY_FILE, format!("does not match {CERT_FILE}: {e}")))?;
    Ok(certified)
}

/// Serves the certificate last read from the folder.
#[derive(Debug)]
pub struct ReloadingCert {
    dir: PathBuf,
    current: ArcSwap<CertifiedKey>,
    pems: std::sync::Mutex<Pems>,
}

impl ReloadingCert {
    /// Reads the certificate once; a missing or invalid one is an error at start.
    pub fn load(dir: &Path) -> Result<Arc<Self>, CertError> {
        let pems = read_pems(dir)?;
        let key = certified_key(dir, &pems)?;
        Ok(Arc::new(ReloadingCert {
            dir: dir.to_owned(),
            current: ArcSwap::from_pointee(key),
            pems: std::sync::Mutex::new(pems),
        }))
    }

    /// Re-reads the folder; returns whether a new certificate is now served. A broken
    /// file (e.g. half-written during rotation) keeps the last good certificate.
    pub fn reload(&self) -> Result<bool, CertError> {
        let pems = read_pems(&self.dir)?;
        let mut last = match self.pems.lock() {
            Ok(last) => last,
            Err(poisoned) => poisoned.into_inner(),
        };
        if *last == pems {
            return Ok(false);
        }
        let key = certified_key(&self.dir, &pems)?;
        self.current.store(Arc::new(key));
        *last = pems;
        Ok(true)
    }

    /// Re-reads the folder every `interval` until `shutdown` turns true.
    pub async fn watch(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = super::stopped(&mut shutdown) => return,
            }
            match self.reload() {
                Ok(true) => info!(dir = %self.dir.display(), "serving a new webhook certificate"),
                Ok(false) => {}
                Err(error) => warn!(
                    %error,
                    "cannot reload the webhook certificate; the last good one stays in use"
                ),
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
