//! The mesh's trust anchors where injected agents read them: a ConfigMap
//! [`TRUST_ANCHORS_CONFIGMAP`] (key [`TRUST_ANCHORS_KEY`], PEM) in every namespace whose
//! pods may be injected, kept equal to the issuer's anchors (its Secret's `ca.crt`).
//!
//! Why a ConfigMap in each namespace: a pod can mount only ConfigMaps of its own
//! namespace; the kubelet rewrites a mounted ConfigMap in place when it changes; and the
//! agent re-reads its anchors file at every new connection to the control plane. So when
//! the issuer Secret's `ca.crt` changes (a trust-anchor rotation) the control plane
//! re-reads it ([`Authority`]), this task copies it into every namespace, and every agent
//! follows without a restart. Writing the PEM into the pod at injection, as Linkerd's
//! injector does with its trust-roots ConfigMap, would freeze each pod's anchors at
//! creation: a rotation would then need every meshed pod restarted during the overlap.
//! (Istio's `istio-ca-root-cert` ConfigMap works as this one does.)
//!
//! RBAC cannot name the object of a `create`, so the control plane may create
//! ConfigMaps in any namespace, and patch only those named [`TRUST_ANCHORS_CONFIGMAP`];
//! it never reads or lists ConfigMaps. Every replica writes the same content, so they
//! need no coordination.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use rustls::pki_types::CertificateDer;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::identity::authority::Authority;

/// The ConfigMap holding the mesh's trust anchors in each namespace.
pub const TRUST_ANCHORS_CONFIGMAP: &str = "bulwark-trust-anchors";
/// Its key: the anchors as PEM.
pub const TRUST_ANCHORS_KEY: &str = "ca.crt";
/// How often the issuer's anchors are compared with what was written.
pub const CHECK_EVERY: Duration = crate::identity::authority::RELOAD_EVERY;
/// How often every namespace is written again, in case someone deleted or edited a
/// ConfigMap (a write of unchanged content changes nothing on the server).
const RESYNC_EVERY: Duration = Duration::from_secs(600);
/// Namespaces written at once.
const CONCURRENT_WRITES: usize = 8;
/// The label that tells the ConfigMaps this task owns (`kubectl delete configmap -A -l`).
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "bulwark-control-plane");

/// DER certificates as one PEM bundle.
pub fn certificates_pem(certs: &[CertificateDer<'_>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for cert in certs {
        let text = base64::engine::general_purpose::STANDARD.encode(cert);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in text.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Keeps the trust-anchor ConfigMaps in step; stops when dropped.
#[derive(Debug)]
pub struct AnchorSync {
    task: JoinHandle<()>,
}

impl Drop for AnchorSync {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AnchorSync {
    /// Writes `authority`'s anchors into every namespace but `excluded` (and those being
    /// deleted), looking for changed anchors every `check_every`.
    pub fn spawn(
        client: kube::Client,
        authority: Arc<Authority>,
        excluded: BTreeSet<String>,
        check_every: Duration,
    ) -> Self {
        let task = tokio::spawn(run(client, authority, excluded, check_every));
        AnchorSync { task }
    }
}

/// What is known of the cluster's namespaces and what each was given.
#[derive(Default)]
struct Namespaces {
    current: BTreeSet<String>,
    /// While a (re)list is under way: the namespaces listed so far.
    listing: Option<BTreeSet<String>>,
    /// The PEM last written to each namespace.
    written: BTreeMap<String, Arc<str>>,
    /// The last error of each namespace whose write failed, logged once.
    failing: BTreeMap<String, String>,
}

impl Namespaces {
    fn apply(&mut self, event: watcher::Event<Namespace>, excluded: &BTreeSet<String>) {
        let wanted = |ns: &Namespace| {
            let name = ns.metadata.name.clone().unwrap_or_default();
            let wanted = !name.is_empty()
                && !excluded.contains(&name)
                && ns.metadata.deletion_timestamp.is_none();
            (name, wanted)
        };
        match event {
            watcher::Event::Init => self.listing = Some(BTreeSet::new()),
            watcher::Event::InitApply(ns) => {
                if let (name, true) = wanted(&ns) {
                    self.listing.get_or_insert_with(BTreeSet::new).insert(name);
                }
            }
            watcher::Event::InitDone => {
                self.current = self.listing.take().unwrap_or_default();
                // After a relist, write every namespace once more: a ConfigMap may have
                // been deleted while the watch was away.
                self.written.clear();
                self.failing.retain(|ns, _| self.current.contains(ns));
            }
            watcher::Event::Apply(ns) => match wanted(&ns) {
                (name, true) => {
                    self.current.insert(name);
                }
                (name, false) => self.forget(&name),
            },
            watcher::Event::Delete(ns) => {
                let (name, _) = wanted(&ns);
                self.forget(&name);
            }
        }
    }

    fn forget(&mut self, name: &str) {
        self.current.remove(name);
        self.written.remove(name);
        self.failing.remove(name);
    }

    /// The namespaces that do not have `pem` yet.
    fn stale(&self, pem: &Arc<str>) -> Vec<String> {
        self.current
            .iter()
            .filter(|ns| self.written.get(*ns) != Some(pem))
            .cloned()
            .collect()
    }
}

async fn run(
    client: kube::Client,
    authority: Arc<Authority>,
    excluded: BTreeSet<String>,
    check_every: Duration,
) {
    let namespaces_api: Api<Namespace> = Api::all(client.clone());
    let stream = watcher::watcher(namespaces_api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut namespaces = Namespaces::default();
    let mut pem: Arc<str> = Arc::from(certificates_pem(&authority.anchors()));
    let mut check = tokio::time::interval(check_every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    loop {
        tokio::select! {
            next = stream.next() => match next {
                None => return,
                Some(Ok(event)) => namespaces.apply(event, &excluded),
                Some(Err(error)) => warn!(
                    %error,
                    "cannot watch namespaces for the trust-anchor ConfigMaps; retrying (the \
                     control plane needs list and watch on namespaces)"
                ),
            },
            _ = check.tick() => {
                let now = certificates_pem(&authority.anchors());
                if *now != *pem {
                    info!(
                        configmap = TRUST_ANCHORS_CONFIGMAP,
                        namespaces = namespaces.current.len(),
                        "the mesh's trust anchors changed; writing them to every namespace"
                    );
                    pem = Arc::from(now);
                }
            }
            _ = resync.tick() => namespaces.written.clear(),
        }
        // Only once the first list is complete: before, `current` is empty anyway.
        let stale = namespaces.stale(&pem);
        if stale.is_empty() {
            continue;
        }
        let results: Vec<(String, Result<(), kube::Error>)> = futures::stream::iter(stale)
            .map(|ns| {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
                let pem = Arc::clone(&pem);
                async move {
                    let result = write(&api, &pem).await;
                    (ns, result)
                }
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;
        for (ns, result) in results {
            match result {
                Ok(()) => {
                    debug!(namespace = %ns, configmap = TRUST_ANCHORS_CONFIGMAP, "trust anchors written");
                    namespaces.failing.remove(&ns);
                    namespaces.written.insert(ns, Arc::clone(&pem));
                }
                Err(error) => {
                    let text = error.to_string();
                    if namespaces.failing.get(&ns) != Some(&text) {
                        warn!(
                            namespace = %ns,
                            configmap = TRUST_ANCHORS_CONFIGMAP,
                            %error,
                            "cannot write the trust anchors; injected pods there wait for \
                             them (retrying; the control plane needs create on configmaps \
                             and patch on this one)"
                        );
                        namespaces.failing.insert(ns, text);
                    }
                }
            }
        }
    }
}

/// Sets the namespace's ConfigMap to `pem`, creating it when absent.
async fn write(api: &Api<ConfigMap>, pem: &str) -> Result<(), kube::Error> {
    let labels = BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        ("app.kubernetes.io/part-of".to_owned(), "bulwark".to_owned()),
    ]);
    let data = BTreeMap::from([(TRUST_ANCHORS_KEY.to_owned(), pem.to_owned())]);
    let patch = Patch::Merge(serde_json::json!({"metadata": {"labels": labels}, "data": data}));
    let params = PatchParams::default();
    let merge = || api.patch(TRUST_ANCHORS_CONFIGMAP, &params, &patch);
    match merge().await {
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        other => return other.map(drop),
    }
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(TRUST_ANCHORS_CONFIGMAP.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    };
    match api.create(&PostParams::default(), &config_map).await {
        // Another replica created it in between: make it ours.
        Err(kube::Error::Api(status)) if status.code == 409 => merge().await.map(drop),
        other => other.map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(name: &str, deleting: bool) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                deletion_timestamp: deleting.then_some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                    ),
                ),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    #[test]
    fn every_namespace_but_the_excluded_and_the_deleted_gets_the_anchors() {
        let excluded = BTreeSet::from(["kube-system".to_owned()]);
        let mut namespaces = Namespaces::default();
        namespaces.apply(watcher::Event::Init, &excluded);
        for name in ["default", "kube-system", "shop"] {
            namespaces.apply(watcher::Event::InitApply(namespace(name, false)), &excluded);
        }
        namespaces.apply(watcher::Event::InitApply(namespace("old", true)), &excluded);
        assert!(
            namespaces.current.is_empty(),
            "nothing before the list ends"
        );
        namespaces.apply(watcher::Event::InitDone, &excluded);
        let pem: Arc<str> = Arc::from("PEM");
        assert_eq!(namespaces.stale(&pem), ["default", "shop"]);
        namespaces
            .written
            .insert("default".to_owned(), Arc::clone(&pem));
        assert_eq!(namespaces.stale(&pem), ["shop"]);
        // A new anchor bundle: every namespace again.
        assert_eq!(namespaces.stale(&Arc::from("PEM2")), ["default", "shop"]);
        // Deleted, or being deleted: forgotten.
        namespaces.apply(watcher::Event::Apply(namespace("shop", true)), &excluded);
        namespaces.apply(
            watcher::Event::Delete(namespace("default", false)),
            &excluded,
        );
        namespaces.apply(watcher::Event::Apply(namespace("new", false)), &excluded);
        assert_eq!(namespaces.stale(&pem), ["new"]);
        assert!(namespaces.written.is_empty());
    }

    #[test]
    fn the_bundle_is_pem_a_reader_parses_back() {
        use rustls::pki_types::pem::PemObject as _;
        let certs = [
            CertificateDer::from(vec![1u8; 100]),
            CertificateDer::from(vec![2u8; 3]),
        ];
        let pem = certificates_pem(&certs);
        let parsed: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(parsed, certs);
        assert!(pem.lines().all(|l| l.len() <= 64));
    }
}
