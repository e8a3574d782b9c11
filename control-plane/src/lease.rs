//! Leader election over a `coordination.k8s.io/v1` Lease, so that one control-plane
//! replica writes policy status while every replica serves agents.
//!
//! A small elector rather than a crate: the well-kept option (`kube-leader-election`)
//! pins its own kube version, and what we need is client-go's algorithm in a page:
//! take the Lease when it is free or when its record has not changed for a whole lease
//! duration (measured on our own clock, so clock skew between replicas does not matter),
//! renew it while we hold it, and step down when renewal has failed for a lease
//! duration. Every write carries the resourceVersion read, so two candidates cannot
//! both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Default lease duration: how long a silent holder keeps the lease.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(15);
/// Default interval between renewals and acquisition attempts.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(2);
/// The Lease's name (the chart's Role grants get and update on this name only).
pub const LEASE_NAME: &str = "bulwark-control-plane";

/// Which Lease, and who we are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// The Lease's namespace (the control plane's own).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a holder keeps the lease without renewing.
    pub duration: Duration,
    /// How often the holder renews and the others try to take it.
    pub retry: Duration,
}

impl LeaseSettings {
    /// Settings with the default durations.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseSettings {
            namespace: namespace.into(),
            name: LEASE_NAME.to_owned(),
            identity: identity.into(),
            duration: DEFAULT_DURATION,
            retry: DEFAULT_RETRY,
        }
    }
}

/// What we last saw of the lease, and when (on our clock).
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    resource_version: Option<String>,
    at: Instant,
}

struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Option<Observed>,
    last_renewed: Option<Instant>,
    /// Since when, and why, every request to the API server has failed.
    failing: Option<(Instant, String)>,
}

/// Whether the control plane can talk to the API server, as the elector sees it every
/// round: `/ready` fails once requests have failed for a whole lease duration, since
/// from then on policy status is not written and changes in the cluster are not seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiReach {
    /// The last request got an answer (a missing Lease or a lost race included).
    Answering,
    /// Every request has failed for at least a lease duration.
    Failing {
        /// How long, when it was published.
        for_secs: u64,
        /// What failed and what to check.
        why: String,
    },
}

/// What an operator should check when a request to the API server fails.
fn hint(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if status.code == 401 => format!(
            "the API server refuses our credentials ({} {}): is the ServiceAccount token valid \
             (deleted or rotated ServiceAccount, wrong audience)?",
            status.code, status.reason
        ),
        kube::Error::Api(status) if status.code == 403 => format!(
            "the API server forbids reading the Lease ({}): check the chart's Role and \
             RoleBinding for leases in this namespace",
            status.message
        ),
        other => format!("cannot reach the API server: {other}"),
    }
}

/// Runs the elector until `shutdown`; the receiver says whether we hold the lease.
/// On shutdown the holder releases the lease so another replica takes over at once.
/// The third receiver says whether the API server answers (for `/ready`).
pub fn spawn(
    client: Client,
    settings: LeaseSettings,
    mut shutdown: watch::Receiver<bool>,
) -> (
    JoinHandle<()>,
    watch::Receiver<bool>,
    watch::Receiver<ApiReach>,
) {
    let (leader, is_leader) = watch::channel(false);
    let (reach, api_reach) = watch::channel(ApiReach::Answering);
    let api = Api::namespaced(client, &settings.namespace);
    let mut elector = Elector {
        api,
        settings,
        observed: None,
        last_renewed: None,
        failing: None,
    };
    let task = tokio::spawn(async move {
        loop {
            let leading = elector.step().await;
            let now_reach = elector.reach(Instant::now());
            reach.send_if_modified(|current| {
                if *current == now_reach {
                    return false;
                }
                // The duration inside changes every round: publish only the change of state.
                let changed = std::mem::discriminant(current) != std::mem::discriminant(&now_reach);
                *current = now_reach.clone();
                changed
            });
            leader.send_if_modified(|current| {
                if *current == leading {
                    return false;
                }
                if leading {
                    info!(lease = %elector.settings.name, identity = %elector.settings.identity, "took the status lease; this replica writes policy status");
                } else if let Some((_, why)) = &elector.failing {
                    warn!(lease = %elector.settings.name, %why, "gave up the status lease: the API server has not answered for a lease duration; policy status is not written and /ready fails until it does");
                } else {
                    info!(lease = %elector.settings.name, "not the status lease holder; another replica writes policy status");
                }
                *current = leading;
                true
            });
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => break,
                _ = tokio::time::sleep(elector.settings.retry) => {}
            }
        }
        if *leader.borrow() {
            elector.release().await;
            leader.send_replace(false);
        }
    });
    (task, is_leader, api_reach)
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl Elector {
    /// Whether the API server answers, as of `now`.
    fn reach(&self, now: Instant) -> ApiReach {
        match &self.failing {
            Some((since, why)) if now.duration_since(*since) >= self.settings.duration => {
                ApiReach::Failing {
                    for_secs: now.duration_since(*since).as_secs(),
                    why: why.clone(),
                }
            }
            _ => ApiReach::Answering,
        }
    }

    /// Notes a failed request: logged once per failing run, not every round.
    fn failed(&mut self, now: Instant, error: &kube::Error) {
        let why = hint(error);
        if self.failing.is_none() {
            warn!(%error, lease = %self.settings.name, "{why}");
        }
        let since = self.failing.take().map_or(now, |(since, _)| since);
        self.failing = Some((since, why));
    }

    /// Notes an answer from the API server.
    fn answered(&mut self) {
        if let Some((since, _)) = self.failing.take() {
            info!(
                failed_for_secs = since.elapsed().as_secs(),
                "the API server answers again"
            );
        }
    }

    /// One round: returns whether we hold the lease afterwards.
    async fn step(&mut self) -> bool {
        let now = Instant::now();
        let current = match self.api.get_opt(&self.settings.name).await {
            Ok(current) => {
                self.answered();
                current
            }
            Err(error) => {
                self.failed(now, &error);
                return self.still_leading(now);
            }
        };
        let Some(lease) = current else {
            return self.create().await;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let record_changed = self.observed.as_ref().is_none_or(|o| {
            o.holder != spec.holder_identity
                || o.renew_time != spec.renew_time
                || o.resource_version != lease.metadata.resource_version
        });
        if record_changed {
            self.observed = Some(Observed {
                holder: spec.holder_identity.clone(),
                renew_time: spec.renew_time.clone(),
                resource_version: lease.metadata.resource_version.clone(),
                at: now,
            });
        }
        let ours = spec.holder_identity.as_deref() == Some(self.settings.identity.as_str());
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.settings.duration, Duration::from_secs);
        let expired = self
            .observed
            .as_ref()
            .is_some_and(|o| now.duration_since(o.at) >= duration);
        if !(ours || free || expired) {
            debug!(holder = ?spec.holder_identity, "the status lease is held by another replica");
            self.last_renewed = None;
            return false;
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let now_time = MicroTime(Timestamp::now());
        let mut next = lease;
        next.spec = Some(LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(seconds(self.settings.duration)),
            acquire_time: if ours {
                spec.acquire_time.clone()
            } else {
                Some(now_time.clone())
            },
            renew_time: Some(now_time),
            lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
            ..spec
        });
        // `replace` sends the resourceVersion we read: a concurrent writer makes it fail.
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => {
                self.last_renewed = Some(now);
                true
            }
            Err(error) => {
                debug!(%error, "could not take or renew the status lease");
                self.still_leading(now)
            }
        }
    }

    /// After a failed round: we keep leading until a lease duration has passed since
    /// our last renewal, as the others will not take it over before that either.
    fn still_leading(&mut self, now: Instant) -> bool {
        match self.last_renewed {
            Some(at) if now.duration_since(at) < self.settings.duration => true,
            _ => {
                self.last_renewed = None;
                false
            }
        }
    }

    async fn create(&mut self) -> bool {
        let now = MicroTime(Timestamp::now());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.settings.name.clone()),
                namespace: Some(self.settings.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.settings.identity.clone()),
                lease_duration_seconds: Some(seconds(self.settings.duration)),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => {
                self.last_renewed = Some(Instant::now());
                true
            }
            Err(error) => {
                debug!(%error, "could not create the status lease (another replica may have)");
                false
            }
        }
    }

    /// Gives the lease up (clears the holder), so a standby takes it at its next round.
    async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!("released the status lease"),
            Err(error) => warn!(%error, "could not release the status lease; it expires by itself"),
        }
    }
}
