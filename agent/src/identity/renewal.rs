//! Keeps the agent's certificate fresh: a new key and certificate at start, then again
//! at 70 % of each certificate's lifetime, without dropping what is in use.
//!
//! When the control plane is away at renewal time, the agent keeps presenting the
//! certificate it has until that one expires, retrying with backoff meanwhile; past
//! expiry it presents none (peers would refuse it anyway) until a renewal succeeds.
//! Every change is published on a watch channel: TLS configurations and readiness
//! read the latest value, never wait for it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::credentials::{Credentials, PendingKey, Signed};
use crate::policy::retry::backoff::{BackoffConfig, ExponentialBackoff};

/// Renew when this share of a certificate's lifetime has passed.
pub const RENEW_AT: f64 = 0.7;
/// First wait after a failed renewal.
pub const RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Longest wait between renewal attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// Why the control plane did not sign.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CertifyError(pub String);

/// Something that signs a certificate request: the control plane's `Identity` service.
pub trait Certifier: Send + Sync + 'static {
    /// Sends `csr_der` and returns the signed certificate.
    fn certify(
        &self,
        csr_der: Vec<u8>,
    ) -> impl Future<Output = Result<Signed, CertifyError>> + Send;
}

/// What the agent's identity is right now.
#[derive(Debug, Clone, Default)]
pub struct IdentityState {
    /// The credentials in use; none before the first certificate or after expiry.
    pub credentials: Option<Arc<Credentials>>,
    /// Why the last renewal failed, while renewals fail.
    pub last_error: Option<String>,
}

/// Starts the renewal task; the receiver always holds the current state.
pub fn spawn<C: Certifier>(
    certifier: C,
    mut shutdown: watch::Receiver<bool>,
) -> (JoinHandle<()>, watch::Receiver<IdentityState>) {
    let (state, current) = watch::channel(IdentityState::default());
    let task = tokio::spawn(async move {
        let mut backoff = ExponentialBackoff::new(
            BackoffConfig {
                base: RETRY_INITIAL,
                max: RETRY_MAX,
            },
            fastrand::Rng::new(),
        );
        // When the credentials in use expire (None: nothing in use).
        let mut expires: Option<Instant> = None;
        loop {
            let next = match renew_once(&certifier).await {
                Ok(credentials) => {
                    backoff.reset();
                    let left = credentials.remaining(SystemTime::now());
                    info!(
                        spiffe_id = %credentials.spiffe_id,
                        expires_in_secs = left.as_secs(),
                        "workload certificate issued"
                    );
                    let now = Instant::now();
                    expires = Some(now + left);
                    state.send_replace(IdentityState {
                        credentials: Some(Arc::new(credentials)),
                        last_error: None,
                    });
                    now + left.mul_f64(RENEW_AT)
                }
                Err(error) => {
                    let first = state.borrow().last_error.is_none();
                    if first {
                        warn!(%error, "cannot renew the workload certificate; keeping the current one while it lasts and retrying");
                    }
                    state.send_modify(|s| s.last_error = Some(error));
                    Instant::now() + backoff.next_delay()
                }
            };
            // Sleep until the next attempt, dropping the credentials if they expire first.
            loop {
                let wake = match expires {
                    Some(at) if at < next => at,
                    _ => next,
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                if expires.is_some_and(|at| at <= Instant::now()) {
                    warn!(
                        "the workload certificate expired before it could be renewed; presenting none until renewal succeeds"
                    );
                    expires = None;
                    state.send_modify(|s| s.credentials = None);
                }
                if Instant::now() >= next {
                    break;
                }
            }
        }
    });
    (task, current)
}

/// One attempt: a new key, signed.
async fn renew_once<C: Certifier>(certifier: &C) -> Result<Credentials, String> {
    let pending = PendingKey::generate().map_err(|e| e.to_string())?;
    let signed = certifier
        .certify(pending.csr_der().to_vec())
        .await
        .map_err(|e| e.to_string())?;
    if signed.chain.is_empty() {
        return Err("the control plane answered without a certificate".to_owned());
    }
    if signed.not_after <= SystemTime::now() {
        return Err("the control plane signed a certificate that has already expired (are the clocks apart?)".to_owned());
    }
    Ok(pending.into_credentials(signed))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A control plane that signs for `lifetime` while `up`, and counts requests.
    struct FakeAuthority {
        lifetime: Duration,
        up: Arc<Mutex<bool>>,
        calls: Arc<AtomicUsize>,
    }

    impl Certifier for FakeAuthority {
        async fn certify(&self, csr_der: Vec<u8>) -> Result<Signed, CertifyError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            assert!(!csr_der.is_empty());
            if !*self.up.lock().unwrap() {
                return Err(CertifyError("control plane unavailable".into()));
            }
            Ok(Signed {
                spiffe_id: "spiffe://td/ns/a/sa/b".into(),
                chain: vec![rustls::pki_types::CertificateDer::from(vec![1, 2, 3])],
                anchors: vec![],
                // SystemTime does not follow the paused clock: the lifetime is measured
                // from the moment of issue, which is what the task schedules from.
                not_after: SystemTime::now() + self.lifetime,
            })
        }
    }

    fn fake(lifetime: Duration) -> (FakeAuthority, Arc<Mutex<bool>>, Arc<AtomicUsize>) {
        let up = Arc::new(Mutex::new(true));
        let calls = Arc::new(AtomicUsize::new(0));
        (
            FakeAuthority {
                lifetime,
                up: Arc::clone(&up),
                calls: Arc::clone(&calls),
            },
            up,
            calls,
        )
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renews_at_seventy_percent_of_the_lifetime() {
        let (authority, _up, calls) = fake(Duration::from_secs(100));
        let (_stop, shutdown) = watch::channel(false);
        let (_task, mut state) = spawn(authority, shutdown);
        state.changed().await.unwrap();
        let first = state.borrow().credentials.clone().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(69)).await;
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "not before 70 s");
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "renewed at 70 s");
        let second = state.borrow().credentials.clone().unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "new credentials in use");
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_certificate_while_the_control_plane_is_away_until_it_expires() {
        let (authority, up, calls) = fake(Duration::from_secs(100));
        let (_stop, shutdown) = watch::channel(false);
        let (_task, mut state) = spawn(authority, shutdown);
        state.changed().await.unwrap();
        *up.lock().unwrap() = false;
        // Renewal at 70 s fails; retries back off, the old certificate stays in use.
        tokio::time::sleep(Duration::from_secs(80)).await;
        settle().await;
        assert!(calls.load(Ordering::SeqCst) >= 3, "retried");
        let now = state.borrow().clone();
        assert!(now.credentials.is_some(), "kept while valid");
        assert_eq!(now.last_error.as_deref(), Some("control plane unavailable"));
        // Past expiry (100 s) nothing is presented.
        tokio::time::sleep(Duration::from_secs(25)).await;
        settle().await;
        assert!(state.borrow().credentials.is_none(), "dropped at expiry");
        // The control plane comes back: a retry (at most RETRY_MAX later) succeeds.
        *up.lock().unwrap() = true;
        tokio::time::sleep(RETRY_MAX + Duration::from_secs(1)).await;
        settle().await;
        let back = state.borrow().clone();
        assert!(back.credentials.is_some());
        assert!(back.last_error.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn stops_on_shutdown() {
        let (authority, _up, _calls) = fake(Duration::from_secs(100));
        let (stop, shutdown) = watch::channel(false);
        let (task, mut state) = spawn(authority, shutdown);
        state.changed().await.unwrap();
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }
}
