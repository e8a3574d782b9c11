//! The agent's Prometheus metrics.
//!
//! Request-path counters are resolved once per destination when a config is
//! built ([`DstMetrics`]), so a request touches only atomics, never the
//! registry's family locks. Breaker and bulkhead state is read at scrape time
//! from the config in force (through [`PolicyState`], which the config implements,
//! so that this module imports neither the config nor a policy), so it costs
//! nothing per request and never shows endpoints that are gone.
//!
//! Inbound series carry the caller's identity (`caller`, [`CallerLabel`]), bounded: the
//! first `--max-caller-labels` distinct `namespace/serviceaccount` values of the agent's
//! life get their own label, later ones share `other`, and callers without a mesh
//! identity are `unauthenticated`. The labelled handles are resolved once per
//! connection, when its TLS handshake names the caller ([`Metrics::from_caller`]); a
//! plaintext connection uses handles resolved when the port was first used. Outbound
//! series have no peer label: the server's identity is a function of `dst` (the control
//! plane names the one identity each endpoint must prove and the handshake refuses any
//! other), and a request's tries may reach several endpoints.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::identity::tls::TlsCounters;
use crate::limits::{ListenerCounters, refused};

/// Which listener a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the local app to the mesh.
    Outbound,
    /// From the mesh to the local app.
    Inbound,
}

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// What an authorization decision was about: the `protocol` label of
/// `bulwark_unauthorized_total` and `bulwark_shadow_unauthorized_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP request (answered 403).
    Http,
    /// An opaque TCP connection (closed before it reaches the app).
    Tcp,
}

impl Protocol {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        }
    }
}

/// Default of `--max-caller-labels`: distinct caller identities with a label of their own.
pub const DEFAULT_MAX_CALLER_LABELS: usize = 100;
/// The `caller` of a connection without a mesh identity.
pub const CALLER_UNAUTHENTICATED: &str = "unauthenticated";
/// The `caller` of identities beyond the cap.
pub const CALLER_OTHER: &str = "other";

/// A caller's identity as the value of a `caller` label, made only by
/// [`Metrics::caller_label`], so every one is within the cap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerLabel(Arc<str>);

impl CallerLabel {
    /// The label value: `namespace/serviceaccount`, `other` or `unauthenticated`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The caller identities that have a label of their own, at most `max` for the agent's
/// life: a counter must keep its series, so none is ever given up for another.
struct CallerLabels {
    max: usize,
    admitted: Mutex<HashSet<Arc<str>>>,
    unauthenticated: CallerLabel,
    other: CallerLabel,
    overflow: Counter,
}

impl CallerLabels {
    fn new(max: usize, overflow: Counter) -> Self {
        Self {
            max,
            admitted: Mutex::new(HashSet::new()),
            unauthenticated: CallerLabel(CALLER_UNAUTHENTICATED.into()),
            other: CallerLabel(CALLER_OTHER.into()),
            overflow,
        }
    }

    fn label(&self, identity: Option<(&str, &str)>) -> CallerLabel {
        let Some((namespace, service_account)) = identity else {
            return self.unauthenticated.clone();
        };
        let value = format!("{namespace}/{service_account}");
        let mut admitted = self
            .admitted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(known) = admitted.get(value.as_str()) {
            return CallerLabel(Arc::clone(known));
        }
        if admitted.len() >= self.max {
            drop(admitted);
            self.overflow.inc();
            return self.other.clone();
        }
        let label: Arc<str> = value.into();
        admitted.insert(Arc::clone(&label));
        CallerLabel(label)
    }
}

type Labels = Vec<(&'static str, String)>;

/// Latency buckets in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric family the agent exports.
pub struct Metrics {
    registry: Registry,
    /// The families of destinations' series (their handles, shared with every
    /// [`DstMetrics`]).
    dst_families: Arc<DstFamilies>,
    rate_limited: Family<Labels, Counter>,
    unauthorized: Family<Labels, Counter>,
    shadow_unauthorized: Family<Labels, Counter>,
    passthrough: Counter,
    passthrough_connections: Counter,
    config_version: Gauge,
    config_updates: Family<Labels, Counter>,
    shard: ShardFamilies,
    route_requests: Family<Labels, Counter>,
    connections: ConnectionFamilies,
    tls: TlsCounters,
    callers: CallerLabels,
}

/// Per listener connection metric families: the limits against hostile clients.
#[derive(Default)]
struct ConnectionFamilies {
    open: Family<Labels, Gauge>,
    refused: Family<Labels, Counter>,
    closed: Family<Labels, Counter>,
    refused_requests: Family<Labels, Counter>,
    http2_goaways: Family<Vec<(&'static str, String)>, Counter>,
}

/// Per shard and role metric families (issue 6).
#[derive(Default)]
struct ShardFamilies {
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    fallbacks: Family<Labels, Counter>,
}

/// Request-path metric handles of one shard of a destination.
#[derive(Clone, Debug)]
pub struct ShardMetrics {
    /// Tries to, and failures at, the shard's primary.
    pub primary: RoleMetrics,
    /// Tries to, and failures at, the shard's replicas.
    pub replica: RoleMetrics,
    fallbacks: Counter,
}

impl ShardMetrics {
    /// Counts a read sent to the primary because no replica admitted it.
    pub fn fallback(&self) {
        self.fallbacks.inc();
    }
}

/// Request-path metric handles of one role (primary or replicas) of a shard.
#[derive(Clone, Debug)]
pub struct RoleMetrics {
    requests: Counter,
    /// Failed tries (5xx, connect failure, reset, timeout) or refusals.
    errors: Counter,
}

impl RoleMetrics {
    /// Counts a try sent to this role.
    pub fn request(&self) {
        self.requests.inc();
    }

    /// Counts a failed try or a refusal at this role.
    pub fn error(&self) {
        self.errors.inc();
    }
}

/// Breaker and bulkhead state, read at scrape time. The config in force implements
/// it; metrics only render what it reports.
pub trait PolicyState: Send + Sync + 'static {
    /// The state of every destination and endpoint now.
    fn policy_state(&self) -> StateSnapshot;
}

/// What [`PolicyState`] reports at one scrape.
#[derive(Debug, Default)]
pub struct StateSnapshot {
    /// One row per endpoint of every destination.
    pub endpoints: Vec<EndpointState>,
    /// One row per destination.
    pub destinations: Vec<DestinationState>,
    /// The rate-limit store, if the agent has one.
    pub store: Option<StoreState>,
    /// One row per Shared rate limit (inbound and outbound).
    pub shared_limits: Vec<SharedLimitState>,
}

/// The rate-limit store's state.
#[derive(Debug)]
pub struct StoreState {
    /// Whether Shared limits can use it now.
    pub up: bool,
    /// Script calls so far (round trips on the request path).
    pub round_trips: u64,
    /// Failed or late calls and pings.
    pub errors: u64,
}

/// One Shared rate limit's store mode.
#[derive(Debug)]
pub struct SharedLimitState {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// The limit's name.
    pub limit: String,
    /// Its onStoreUnavailable mode.
    pub mode: &'static str,
    /// Whether the mode is in force now (the store is unavailable).
    pub active: bool,
    /// Requests the mode decided.
    pub decisions: u64,
}

/// One endpoint's circuit breaker.
#[derive(Debug)]
pub struct EndpointState {
    /// The destination label.
    pub dst: Arc<str>,
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker: i64,
    /// Times the breaker opened.
    pub trips: u64,
}

/// One destination's bulkhead.
#[derive(Debug)]
pub struct DestinationState {
    /// The destination label.
    pub dst: Arc<str>,
    /// Requests holding a slot.
    pub in_flight: usize,
    /// Requests waiting for a slot.
    pub queued: usize,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Metrics {
    /// Creates the registry; `state` (the config in force) is read at scrape time for
    /// breaker and bulkhead state. Callers get [`DEFAULT_MAX_CALLER_LABELS`] labels.
    pub fn new<S: PolicyState>(state: Arc<S>) -> Self {
        Self::with_caller_labels(state, DEFAULT_MAX_CALLER_LABELS)
    }

    /// Like [`Metrics::new`], with at most `max_callers` distinct caller identities
    /// labelled as themselves (`--max-caller-labels`).
    pub fn with_caller_labels<S: PolicyState>(state: Arc<S>, max_callers: usize) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let durations = Family::<Labels, Histogram>::new_with_constructor(histogram as fn() -> _);
        let local_responses = Family::<Labels, Counter>::default();
        let retries = Family::<Labels, Counter>::default();
        let recovered = Family::<Labels, Counter>::default();
        let budget_exhausted = Family::<Labels, Counter>::default();
        let bulkhead_rejected = Family::<Labels, Counter>::default();
        let rate_limited = Family::<Labels, Counter>::default();
        let unauthorized = Family::<Labels, Counter>::default();
        let shadow_unauthorized = Family::<Labels, Counter>::default();
        let passthrough = Counter::default();
        let tcp_connections = Family::<Labels, Counter>::default();
        let passthrough_connections = Counter::default();
        let config_version = Gauge::default();
        let config_updates = Family::<Labels, Counter>::default();
        registry.register(
            "bulwark_requests",
            "Requests by direction, destination and response status class",
            requests.clone(),
        );
        registry.register(
            "bulwark_request_duration_seconds",
            "Request latency until the response headers, by direction and destination",
            durations.clone(),
        );
        registry.register(
            "bulwark_local_responses",
            "Responses the agent made itself, by reason (x-bulwark-reason)",
            local_responses.clone(),
        );
        registry.register(
            "bulwark_retries",
            "Retries sent (tries after the first)",
            retries.clone(),
        );
        registry.register(
            "bulwark_retries_recovered",
            "Requests whose first try failed and a retry succeeded",
            recovered.clone(),
        );
        registry.register(
            "bulwark_retry_budget_exhausted",
            "Retries not sent because the retry budget was spent",
            budget_exhausted.clone(),
        );
        registry.register(
            "bulwark_bulkhead_rejected",
            "Requests rejected by a full bulkhead (queue full or queue timeout)",
            bulkhead_rejected.clone(),
        );
        registry.register(
            "bulwark_rate_limited",
            "Inbound requests answered 429 by a rate limit",
            rate_limited.clone(),
        );
        registry.register(
            "bulwark_unauthorized",
            "Inbound requests answered 403 (protocol=\"http\") and opaque TCP connections closed \
             (protocol=\"tcp\") because no AuthorizationPolicy rule allows them, by policy and caller",
            unauthorized.clone(),
        );
        registry.register(
            "bulwark_shadow_unauthorized",
            "Inbound requests and opaque TCP connections a Shadow AuthorizationPolicy would deny \
             (and let through), by policy, caller and protocol",
            shadow_unauthorized.clone(),
        );
        registry.register(
            "bulwark_passthrough_requests",
            "Outbound requests to destinations outside the mesh, proxied without policy",
            passthrough.clone(),
        );
        registry.register(
            "bulwark_tcp_connections",
            "Opaque TCP connections proxied, by direction and destination",
            tcp_connections.clone(),
        );
        registry.register(
            "bulwark_passthrough_connections",
            "Redirected connections to destinations outside the mesh, relayed without policy",
            passthrough_connections.clone(),
        );
        registry.register(
            "bulwark_config_version",
            "Version of the config in force",
            config_version.clone(),
        );
        registry.register(
            "bulwark_config_updates",
            "Snapshots from the control plane, by result (ack or nack)",
            config_updates.clone(),
        );
        let shard = ShardFamilies::default();
        registry.register(
            "bulwark_shard_requests",
            "Tries sent to a sharded destination, by shard and role (primary or replica)",
            shard.requests.clone(),
        );
        registry.register(
            "bulwark_shard_errors",
            "Failed tries and refusals (primary unavailable) of a sharded destination, by shard and role",
            shard.errors.clone(),
        );
        registry.register(
            "bulwark_shard_fallbacks",
            "Reads sent to a shard's primary because no replica admitted them",
            shard.fallbacks.clone(),
        );
        let route_requests = Family::<Labels, Counter>::default();
        registry.register(
            "bulwark_route_requests",
            "Requests an HTTPRoute rule sent to a backend (backend=\"none\": the rule's weights \
             are all 0), counted before the backend's own policy",
            route_requests.clone(),
        );
        let connections = ConnectionFamilies::default();
        registry.register(
            "bulwark_connections_open",
            "Connections a listener holds open now",
            connections.open.clone(),
        );
        registry.register(
            "bulwark_connections_refused",
            "Connections a listener closed as soon as accepted because it held its maximum \
             (--max-connections)",
            connections.refused.clone(),
        );
        registry.register(
            "bulwark_connections_closed",
            "Connections the agent closed because the client was too slow: reason=\"header-timeout\" \
             (no whole request head in time) or \"idle-timeout\" (no request in flight for too long)",
            connections.closed.clone(),
        );
        registry.register(
            "bulwark_refused_requests",
            "Requests refused before reaching any destination, by listener and reason: malformed \
             (cl-te, bad-chunked) or to a target the agent does not proxy to (connect-denied, \
             absolute-form-denied)",
            connections.refused_requests.clone(),
        );
        registry.register(
            "bulwark_http2_goaways",
            "HTTP/2 connections the agent closed with GOAWAY because the client broke a limit or \
             the protocol, by HTTP/2 error code (enhance-your-calm: rapid resets, CONTINUATION \
             floods)",
            connections.http2_goaways.clone(),
        );
        let tls = TlsCounters::default();
        registry.register(
            "bulwark_tls_handshakes",
            "Mutual-TLS handshakes with other agents that succeeded, by direction and key-exchange \
             group (X25519MLKEM768; X25519 with an agent of an older build)",
            tls.handshakes.clone(),
        );
        registry.register(
            "bulwark_tls_handshake_failures",
            "Mutual-TLS handshakes that failed, by direction and reason (expired, \
             unknown-issuer, wrong-trust-domain, wrong-identity, no-certificate, timeout, ...)",
            tls.failures.clone(),
        );
        registry.register(
            "bulwark_inbound_plaintext_refused",
            "Plaintext connections closed because the port is Strict (PeerAuthentication)",
            tls.plaintext_refused.clone(),
        );
        registry.register(
            "bulwark_identity_certificate_expiry_timestamp_seconds",
            "When the workload certificate in use expires, in Unix seconds (0: none in use); \
             seconds left = this - time()",
            tls.expiry.clone(),
        );
        let caller_overflow = Counter::default();
        registry.register(
            "bulwark_caller_labels_overflow",
            "Inbound connections whose caller is labelled caller=\"other\" because \
             --max-caller-labels distinct callers already have a label of their own",
            caller_overflow.clone(),
        );
        registry.register_collector(Box::new(StateCollector { state }));
        Self {
            callers: CallerLabels::new(max_callers, caller_overflow),
            tls,
            registry,
            dst_families: Arc::new(DstFamilies {
                requests,
                durations,
                tcp_connections,
                retries,
                recovered,
                budget_exhausted,
                bulkhead_rejected,
                local_responses,
                refused_requests: connections.refused_requests.clone(),
            }),
            rate_limited,
            unauthorized,
            shadow_unauthorized,
            passthrough,
            passthrough_connections,
            config_version,
            config_updates,
            shard,
            route_requests,
            connections,
        }
    }

    /// The mutual-TLS counters (cheap clones of the registered ones).
    pub fn tls(&self) -> TlsCounters {
        self.tls.clone()
    }

    /// Resolves the connection counters of listener `name` (`outbound`, `inbound`, `admin`, …).
    pub fn listener(&self, name: &'static str) -> ListenerCounters {
        let labels = || vec![("listener", name.to_owned())];
        let closed = |reason: &str| {
            let mut l = labels();
            l.push(("reason", reason.to_owned()));
            self.connections.closed.get_or_create(&l).clone()
        };
        ListenerCounters {
            open: self.connections.open.get_or_create(&labels()).clone(),
            refused: self.connections.refused.get_or_create(&labels()).clone(),
            header_timeouts: closed("header-timeout"),
            idle_timeouts: closed("idle-timeout"),
            cl_te: self.refused_request_counter(name, refused::CL_TE),
            http2_goaways: self.connections.http2_goaways.clone(),
            listener: name,
        }
    }

    fn refused_request_counter(&self, listener: &str, reason: &str) -> Counter {
        self.connections
            .refused_requests
            .get_or_create(&vec![
                ("listener", listener.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .clone()
    }

    /// Counts a request refused on `listener` before it reached any destination
    /// (reasons in [`refused`]); rare, so the family lookup is affordable.
    pub fn refused_request(&self, listener: &str, reason: &'static str) {
        self.refused_request_counter(listener, reason).inc();
    }

    /// The request counter of one backend of an HTTPRoute rule on destination `dst`.
    pub fn route_backend(&self, dst: &str, route: &str, rule: &str, backend: &str) -> Counter {
        self.route_requests
            .get_or_create(&vec![
                ("dst", dst.to_owned()),
                ("route", route.to_owned()),
                ("rule", rule.to_owned()),
                ("backend", backend.to_owned()),
            ])
            .clone()
    }

    /// Resolves the handles of one shard's metrics.
    pub fn shard(&self, dst: &str, shard: &str) -> ShardMetrics {
        let labels = |role: Option<&str>| {
            let mut l = vec![("dst", dst.to_owned()), ("shard", shard.to_owned())];
            if let Some(role) = role {
                l.push(("role", role.to_owned()));
            }
            l
        };
        // One `get_or_create` at a time: its guard holds the family's lock, and a
        // second call while it lives would wait for a write lock forever.
        let role = |role: &str| {
            let requests = self
                .shard
                .requests
                .get_or_create(&labels(Some(role)))
                .clone();
            let errors = self.shard.errors.get_or_create(&labels(Some(role))).clone();
            RoleMetrics { requests, errors }
        };
        ShardMetrics {
            primary: role("primary"),
            replica: role("replica"),
            fallbacks: self.shard.fallbacks.get_or_create(&labels(None)).clone(),
        }
    }

    /// The handles of one destination's request-path metrics (no series made yet).
    pub fn destination(&self, direction: Direction, dst: &str) -> DstMetrics {
        DstMetrics::new(&self.dst_families, direction, dst)
    }

    /// The handles of an inbound destination's (`localhost:PORT`) metrics for
    /// requests and connections from `caller`.
    pub fn inbound(&self, dst: &str, caller: &CallerLabel) -> DstMetrics {
        self.destination(Direction::Inbound, dst).for_caller(caller)
    }

    /// The handles of `base`'s destination for requests and connections from `caller`:
    /// only the series labelled by caller are its own (made on first use).
    pub fn from_caller(&self, base: &DstMetrics, caller: &CallerLabel) -> DstMetrics {
        base.for_caller(caller)
    }

    /// The `caller` label of an identity (`namespace`, `serviceaccount`), or of a
    /// caller without one (`None`): its own while fewer than the cap have one, `other`
    /// beyond it. Takes a lock: once per connection, never per request.
    pub fn caller_label(&self, identity: Option<(&str, &str)>) -> CallerLabel {
        self.callers.label(identity)
    }

    /// Counts a 429 from one rate limit.
    pub fn rate_limited(&self, policy: &str, limit: &str) {
        self.rate_limited
            .get_or_create(&vec![
                ("policy", policy.to_owned()),
                ("limit", limit.to_owned()),
            ])
            .inc();
    }

    /// Counts a denial by the authorization policies (a 403, or a TCP connection
    /// closed), or with `shadow` one a Shadow policy would make. Denials are the rare
    /// path, so the family lookup here is affordable.
    pub fn unauthorized(
        &self,
        policy: &str,
        caller: &CallerLabel,
        protocol: Protocol,
        shadow: bool,
    ) {
        let family = if shadow {
            &self.shadow_unauthorized
        } else {
            &self.unauthorized
        };
        family
            .get_or_create(&vec![
                ("policy", policy.to_owned()),
                ("caller", caller.as_str().to_owned()),
                ("protocol", protocol.as_str().to_owned()),
            ])
            .inc();
    }

    /// Counts a request proxied without policy.
    pub fn passthrough(&self) {
        self.passthrough.inc();
    }

    /// Counts a redirected connection relayed without policy.
    pub fn passthrough_connection(&self) {
        self.passthrough_connections.inc();
    }

    /// Records the outcome of applying a snapshot.
    pub fn config_update(&self, version: u64, acked: bool) {
        let result = if acked { "ack" } else { "nack" };
        self.config_updates
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
        if acked {
            self.config_version
                .set(i64::try_from(version).unwrap_or(i64::MAX));
        }
    }

    /// Renders the Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Request-path metric handles of one destination (cheap clones). No series exists
/// until it is first used, so a destination never called costs the agent nothing in
/// the metrics registry and `/metrics` no lines; once made, a series is one atomic load
/// away.
#[derive(Clone, Debug)]
pub struct DstMetrics {
    direction: Direction,
    dst: Arc<str>,
    caller: Option<CallerLabel>,
    families: Arc<DstFamilies>,
    /// The series labelled by the caller (if any), made on first use.
    by_caller: Arc<OnceLock<CallerSeries>>,
    /// The series of the destination alone, made on first use, shared by its callers.
    by_dst: Arc<OnceLock<DstSeries>>,
}

/// The metric families a destination's series live in (handles to the registered ones).
#[derive(Debug, Clone)]
struct DstFamilies {
    requests: Family<Labels, Counter>,
    durations: Family<Labels, Histogram>,
    tcp_connections: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    recovered: Family<Labels, Counter>,
    budget_exhausted: Family<Labels, Counter>,
    bulkhead_rejected: Family<Labels, Counter>,
    local_responses: Family<Labels, Counter>,
    refused_requests: Family<Labels, Counter>,
}

/// A destination's series that carry the caller, when there is one.
#[derive(Debug)]
struct CallerSeries {
    status: [Counter; 5],
    duration: Histogram,
    tcp_connections: Counter,
}

/// A destination's series that carry no caller.
#[derive(Debug)]
struct DstSeries {
    retries: Counter,
    recovered: Counter,
    budget_exhausted: Counter,
    bulkhead_rejected: Counter,
}

impl DstMetrics {
    fn new(families: &Arc<DstFamilies>, direction: Direction, dst: &str) -> Self {
        Self {
            direction,
            dst: dst.into(),
            caller: None,
            families: Arc::clone(families),
            by_caller: Arc::default(),
            by_dst: Arc::default(),
        }
    }

    /// These handles for requests and connections from `caller`: the series labelled
    /// by caller are its own, the others shared.
    fn for_caller(&self, caller: &CallerLabel) -> Self {
        Self {
            caller: Some(caller.clone()),
            by_caller: Arc::default(),
            ..self.clone()
        }
    }

    /// The `direction`, `dst` and (if any) `caller` labels.
    fn caller_labels(&self) -> Labels {
        let mut l = vec![
            ("direction", self.direction.as_str().to_owned()),
            ("dst", self.dst.to_string()),
        ];
        if let Some(caller) = &self.caller {
            l.push(("caller", caller.as_str().to_owned()));
        }
        l
    }

    fn by_caller(&self) -> &CallerSeries {
        self.by_caller.get_or_init(|| {
            let f = &self.families;
            let by_class = |class: &str| {
                let mut l = self.caller_labels();
                l.push(("status_class", class.to_owned()));
                f.requests.get_or_create(&l).clone()
            };
            CallerSeries {
                status: [
                    by_class("1xx"),
                    by_class("2xx"),
                    by_class("3xx"),
                    by_class("4xx"),
                    by_class("5xx"),
                ],
                duration: f.durations.get_or_create(&self.caller_labels()).clone(),
                tcp_connections: f
                    .tcp_connections
                    .get_or_create(&self.caller_labels())
                    .clone(),
            }
        })
    }

    fn by_dst(&self) -> &DstSeries {
        self.by_dst.get_or_init(|| {
            let f = &self.families;
            let l = vec![("dst", self.dst.to_string())];
            DstSeries {
                retries: f.retries.get_or_create(&l).clone(),
                recovered: f.recovered.get_or_create(&l).clone(),
                budget_exhausted: f.budget_exhausted.get_or_create(&l).clone(),
                bulkhead_rejected: f.bulkhead_rejected.get_or_create(&l).clone(),
            }
        })
    }

    /// Counts an opaque TCP connection proxied to this destination.
    pub fn tcp_connection(&self) {
        self.by_caller().tcp_connections.inc();
    }

    /// The destination label (`reviews.demo:80`).
    pub fn dst(&self) -> &Arc<str> {
        &self.dst
    }

    /// Records a finished request (response headers sent downstream).
    pub fn response(&self, status: http::StatusCode, elapsed: std::time::Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        let series = self.by_caller();
        series.status[class].inc();
        series.duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a response the agent made itself. Reasons are few, so the
    /// family lookup here is rare and bounded.
    pub fn local_response(&self, reason: &'static str) {
        self.families
            .local_responses
            .get_or_create(&vec![
                ("direction", self.direction.as_str().to_owned()),
                ("dst", self.dst.to_string()),
                ("reason", reason.to_owned()),
            ])
            .inc();
        if reason == crate::reason::BULKHEAD_FULL {
            self.by_dst().bulkhead_rejected.inc();
        }
    }

    /// Counts a request of this destination refused as the client's fault (e.g. a
    /// broken chunked body), on the listener of its direction.
    pub fn refused_request(&self, reason: &'static str) {
        self.families
            .refused_requests
            .get_or_create(&vec![
                ("listener", self.direction.as_str().to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    /// Counts one retry sent.
    pub fn retry(&self) {
        self.by_dst().retries.inc();
    }

    /// Counts a request that succeeded after a failed try.
    pub fn recovered(&self) {
        self.by_dst().recovered.inc();
    }

    /// Counts a retry the budget refused.
    pub fn budget_exhausted(&self) {
        self.by_dst().budget_exhausted.inc();
    }
}

/// Reads breaker and bulkhead state from the config in force at scrape time.
struct StateCollector<S> {
    state: Arc<S>,
}

impl<S> fmt::Debug for StateCollector<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

impl<S: PolicyState> Collector for StateCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let state = self.state.policy_state();
        {
            let mut family = encoder.encode_descriptor(
                "bulwark_breaker_state",
                "Circuit breaker state per endpoint: 0 closed, 1 open, 2 half-open",
                None,
                MetricType::Gauge,
            )?;
            for ep in &state.endpoints {
                let addr = ep.endpoint.to_string();
                let labels = [("dst", ep.dst.as_ref()), ("endpoint", addr.as_str())];
                ConstGauge::new(ep.breaker).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "bulwark_breaker_trips",
                "Times an endpoint's circuit breaker opened",
                None,
                MetricType::Counter,
            )?;
            for ep in &state.endpoints {
                let addr = ep.endpoint.to_string();
                let labels = [("dst", ep.dst.as_ref()), ("endpoint", addr.as_str())];
                ConstCounter::new(ep.trips).encode(family.encode_family(&labels)?)?;
            }
        }
        if let Some(store) = &state.store {
            let family = encoder.encode_descriptor(
                "bulwark_rate_limit_store_up",
                "Whether the rate-limit store (Redis) answers: 1 yes, 0 no (Shared limits apply their onStoreUnavailable mode)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(store.up)).encode(family)?;
            for (name, help, value) in [
                (
                    "bulwark_rate_limit_store_round_trips",
                    "Script calls to the rate-limit store made on the request path",
                    store.round_trips,
                ),
                (
                    "bulwark_rate_limit_store_errors",
                    "Rate-limit store calls and pings that failed or timed out",
                    store.errors,
                ),
            ] {
                let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(value).encode(family)?;
            }
        }
        for (name, help, kind) in [
            (
                "bulwark_rate_limit_store_mode",
                "Per Shared limit: 1 while its onStoreUnavailable mode is in force (the store is unavailable), else 0",
                MetricType::Gauge,
            ),
            (
                "bulwark_rate_limit_store_mode_decisions",
                "Per Shared limit: requests its onStoreUnavailable mode decided while the store was unavailable",
                MetricType::Counter,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for limit in &state.shared_limits {
                let labels = [
                    ("policy", limit.policy.as_str()),
                    ("limit", limit.limit.as_str()),
                    ("mode", limit.mode),
                ];
                let metric = family.encode_family(&labels)?;
                match kind {
                    MetricType::Gauge => ConstGauge::new(i64::from(limit.active)).encode(metric)?,
                    _ => ConstCounter::new(limit.decisions).encode(metric)?,
                }
            }
        }
        for (name, help, read) in [
            (
                "bulwark_bulkhead_in_flight",
                "Requests holding a bulkhead slot",
                (|d| d.in_flight) as fn(&DestinationState) -> usize,
            ),
            (
                "bulwark_bulkhead_queued",
                "Requests waiting for a bulkhead slot",
                |d| d.queued,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for dst in &state.destinations {
                let labels = [("dst", dst.dst.as_ref())];
                let value = i64::try_from(read(dst)).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoState;

    impl PolicyState for NoState {
        fn policy_state(&self) -> StateSnapshot {
            StateSnapshot::default()
        }
    }

    #[test]
    fn caller_labels_are_bounded_and_kept_for_the_agents_life() {
        let metrics = Metrics::with_caller_labels(Arc::new(NoState), 2);
        let label = |id: Option<(&str, &str)>| metrics.caller_label(id).as_str().to_owned();
        assert_eq!(label(Some(("shop", "orders"))), "shop/orders");
        assert_eq!(label(Some(("shop", "reviews"))), "shop/reviews");
        assert_eq!(label(Some(("shop", "audit"))), "other", "beyond the cap");
        assert_eq!(label(Some(("web", "checkout"))), "other");
        assert_eq!(
            label(Some(("shop", "orders"))),
            "shop/orders",
            "an admitted caller keeps its label"
        );
        assert_eq!(label(None), "unauthenticated", "not counted in the cap");
        assert!(
            metrics
                .encode()
                .contains("bulwark_caller_labels_overflow_total 2\n"),
            "{}",
            metrics.encode()
        );
    }

    #[test]
    fn inbound_series_carry_the_caller_and_outbound_ones_do_not() {
        let metrics = Metrics::new(Arc::new(NoState));
        let plaintext = metrics.caller_label(None);
        let base = metrics.inbound("localhost:8080", &plaintext);
        let orders = metrics.caller_label(Some(("shop", "orders")));
        let from_orders = metrics.from_caller(&base, &orders);
        from_orders.response(http::StatusCode::OK, std::time::Duration::from_millis(3));
        from_orders.tcp_connection();
        base.response(http::StatusCode::FORBIDDEN, std::time::Duration::ZERO);
        metrics
            .destination(Direction::Outbound, "payments.shop:80")
            .response(http::StatusCode::OK, std::time::Duration::ZERO);
        let text = metrics.encode();
        for line in [
            "bulwark_requests_total{direction=\"inbound\",dst=\"localhost:8080\",caller=\"shop/orders\",status_class=\"2xx\"} 1",
            "bulwark_requests_total{direction=\"inbound\",dst=\"localhost:8080\",caller=\"unauthenticated\",status_class=\"4xx\"} 1",
            "bulwark_tcp_connections_total{direction=\"inbound\",dst=\"localhost:8080\",caller=\"shop/orders\"} 1",
            "bulwark_request_duration_seconds_count{direction=\"inbound\",dst=\"localhost:8080\",caller=\"shop/orders\"} 1",
            "bulwark_requests_total{direction=\"outbound\",dst=\"payments.shop:80\",status_class=\"2xx\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(
            !text.contains("direction=\"inbound\",dst=\"localhost:8080\",status_class"),
            "no inbound series without a caller"
        );
    }

    #[test]
    fn a_destination_has_no_series_until_it_is_used() {
        let metrics = Metrics::new(Arc::new(NoState));
        let idle = metrics.destination(Direction::Outbound, "idle.shop:80");
        let used = metrics.destination(Direction::Outbound, "used.shop:80");
        used.response(http::StatusCode::OK, std::time::Duration::ZERO);
        // A clone (the handles carried to the next config version) counts in the same
        // series, which are made once.
        used.clone()
            .response(http::StatusCode::OK, std::time::Duration::ZERO);
        used.retry();
        let text = metrics.encode();
        assert!(!text.contains("idle.shop"), "{text}");
        for line in [
            "bulwark_requests_total{direction=\"outbound\",dst=\"used.shop:80\",status_class=\"2xx\"} 2",
            "bulwark_requests_total{direction=\"outbound\",dst=\"used.shop:80\",status_class=\"5xx\"} 0",
            "bulwark_retries_total{dst=\"used.shop:80\"} 1",
            "bulwark_retries_recovered_total{dst=\"used.shop:80\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        drop(idle);
    }
}
