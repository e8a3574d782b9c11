//! The validated domain model: what every source (the local folder today, Kubernetes
//! later) hands to the index. Nothing here knows about YAML or the wire format; values
//! are checked and policy defaults are already applied.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::timestamp::Timestamp;

pub mod authorization;
pub mod http_route;
pub mod peer_authentication;
pub mod policy;
pub mod shard;

pub use authorization::AuthorizationPolicy;
pub use http_route::HttpRoute;
pub use peer_authentication::PeerAuthentication;
pub use policy::{RateLimitPolicy, ResiliencePolicy, TargetRef};
pub use shard::ShardTopology;

/// A namespaced object name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectName {
    /// The namespace (`default` when a manifest leaves it out).
    pub namespace: String,
    /// The object's name.
    pub name: String,
}

impl ObjectName {
    /// Builds a name from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// `namespace/name`.
impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The kinds of object the control plane understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    /// Core `v1/Service`.
    Service,
    /// `discovery.k8s.io/v1/EndpointSlice`.
    EndpointSlice,
    /// Core `v1/Pod` (only its labels and IPs are used).
    Pod,
    /// `bulwark.io/v1alpha1/ResiliencePolicy`.
    ResiliencePolicy,
    /// `bulwark.io/v1alpha1/RateLimitPolicy`.
    RateLimitPolicy,
    /// `bulwark.io/v1alpha1/ShardTopology` (validated; routing comes with issue 6).
    ShardTopology,
    /// `gateway.networking.k8s.io/v1/HTTPRoute` with Service parents (traffic splitting).
    HttpRoute,
    /// `gateway.networking.k8s.io/v1/GRPCRoute` with Service parents, translated to the
    /// HTTP requests gRPC makes (traffic splitting of gRPC services).
    GrpcRoute,
    /// `bulwark.io/v1alpha1/AuthorizationPolicy`: who may call a workload.
    AuthorizationPolicy,
    /// `bulwark.io/v1alpha1/PeerAuthentication`: whether a workload takes plaintext callers.
    PeerAuthentication,
}

impl Kind {
    /// Every kind, for metrics that report zero counts too.
    pub const ALL: [Kind; 10] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::ResiliencePolicy,
        Kind::RateLimitPolicy,
        Kind::ShardTopology,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
    ];

    /// The Kubernetes kind name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::ResiliencePolicy => "ResiliencePolicy",
            Kind::RateLimitPolicy => "RateLimitPolicy",
            Kind::ShardTopology => "ShardTopology",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
        }
    }
}

impl Kind {
    /// The Gateway API route kinds, in the order they rank on a precedence tie.
    pub const ROUTES: [Kind; 2] = [Kind::HttpRoute, Kind::GrpcRoute];

    /// Whether the kind is a Gateway API route (HTTPRoute or GRPCRoute).
    pub const fn is_route(self) -> bool {
        matches!(self, Kind::HttpRoute | Kind::GrpcRoute)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one object across all kinds: `Kind namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    /// The object's kind.
    pub kind: Kind,
    /// The object's namespace and name.
    pub name: ObjectName,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// One validated object of any kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A Service.
    Service(Service),
    /// An EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// A Pod.
    Pod(Pod),
    /// A ResiliencePolicy (boxed: it is much larger than the other kinds).
    ResiliencePolicy(Box<ResiliencePolicy>),
    /// A RateLimitPolicy.
    RateLimitPolicy(RateLimitPolicy),
    /// A ShardTopology (boxed: it is large).
    ShardTopology(Box<ShardTopology>),
    /// An HTTPRoute.
    HttpRoute(HttpRoute),
    /// A GRPCRoute, as the HTTPRoute it translates to.
    GrpcRoute(HttpRoute),
    /// An AuthorizationPolicy.
    AuthorizationPolicy(AuthorizationPolicy),
    /// A PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
}

impl Object {
    /// The object's identity.
    pub fn key(&self) -> ObjectKey {
        let (kind, name) = match self {
            Object::Service(o) => (Kind::Service, &o.name),
            Object::EndpointSlice(o) => (Kind::EndpointSlice, &o.name),
            Object::Pod(o) => (Kind::Pod, &o.name),
            Object::ResiliencePolicy(o) => (Kind::ResiliencePolicy, &o.name),
            Object::RateLimitPolicy(o) => (Kind::RateLimitPolicy, &o.name),
            Object::ShardTopology(o) => (Kind::ShardTopology, &o.name),
            Object::HttpRoute(o) => (Kind::HttpRoute, &o.name),
            Object::GrpcRoute(o) => (Kind::GrpcRoute, &o.name),
            Object::AuthorizationPolicy(o) => (Kind::AuthorizationPolicy, &o.name),
            Object::PeerAuthentication(o) => (Kind::PeerAuthentication, &o.name),
        };
        ObjectKey {
            kind,
            name: name.clone(),
        }
    }
}

/// Everything a source currently knows: a complete, consistent set of valid objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    /// Services by name.
    pub services: BTreeMap<ObjectName, Service>,
    /// EndpointSlices by name.
    pub endpoint_slices: BTreeMap<ObjectName, EndpointSlice>,
    /// Pods by name.
    pub pods: BTreeMap<ObjectName, Pod>,
    /// ResiliencePolicies by name.
    pub resilience_policies: BTreeMap<ObjectName, ResiliencePolicy>,
    /// RateLimitPolicies by name.
    pub rate_limit_policies: BTreeMap<ObjectName, RateLimitPolicy>,
    /// ShardTopologies by name.
    pub shard_topologies: BTreeMap<ObjectName, ShardTopology>,
    /// HTTPRoutes by name.
    pub http_routes: BTreeMap<ObjectName, HttpRoute>,
    /// GRPCRoutes by name, translated to HTTP routes.
    pub grpc_routes: BTreeMap<ObjectName, HttpRoute>,
    /// AuthorizationPolicies by name.
    pub authorization_policies: BTreeMap<ObjectName, AuthorizationPolicy>,
    /// PeerAuthentications by name.
    pub peer_authentications: BTreeMap<ObjectName, PeerAuthentication>,
}

impl Model {
    /// Adds or replaces an object.
    pub fn insert(&mut self, object: Object) {
        match object {
            Object::Service(o) => {
                self.services.insert(o.name.clone(), o);
            }
            Object::EndpointSlice(o) => {
                self.endpoint_slices.insert(o.name.clone(), o);
            }
            Object::Pod(o) => {
                self.pods.insert(o.name.clone(), o);
            }
            Object::ResiliencePolicy(o) => {
                self.resilience_policies.insert(o.name.clone(), *o);
            }
            Object::RateLimitPolicy(o) => {
                self.rate_limit_policies.insert(o.name.clone(), o);
            }
            Object::ShardTopology(o) => {
                self.shard_topologies.insert(o.name.clone(), *o);
            }
            Object::HttpRoute(o) => {
                self.http_routes.insert(o.name.clone(), o);
            }
            Object::GrpcRoute(o) => {
                self.grpc_routes.insert(o.name.clone(), o);
            }
            Object::AuthorizationPolicy(o) => {
                self.authorization_policies.insert(o.name.clone(), o);
            }
            Object::PeerAuthentication(o) => {
                self.peer_authentications.insert(o.name.clone(), o);
            }
        }
    }

    /// How many objects of a kind the model holds.
    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Service => self.services.len(),
            Kind::EndpointSlice => self.endpoint_slices.len(),
            Kind::Pod => self.pods.len(),
            Kind::ResiliencePolicy => self.resilience_policies.len(),
            Kind::RateLimitPolicy => self.rate_limit_policies.len(),
            Kind::ShardTopology => self.shard_topologies.len(),
            Kind::HttpRoute => self.http_routes.len(),
            Kind::GrpcRoute => self.grpc_routes.len(),
            Kind::AuthorizationPolicy => self.authorization_policies.len(),
            Kind::PeerAuthentication => self.peer_authentications.len(),
        }
    }

    /// The routes of a route kind (HTTPRoutes or GRPCRoutes); none for other kinds.
    pub fn routes(&self, kind: Kind) -> Option<&BTreeMap<ObjectName, HttpRoute>> {
        match kind {
            Kind::HttpRoute => Some(&self.http_routes),
            Kind::GrpcRoute => Some(&self.grpc_routes),
            _ => None,
        }
    }
}

impl FromIterator<Object> for Model {
    fn from_iter<I: IntoIterator<Item = Object>>(iter: I) -> Self {
        let mut model = Model::default();
        for object in iter {
            model.insert(object);
        }
        model
    }
}

/// A transport protocol of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP, the default; the only protocol the agent proxies.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// A Service: a name, a pod selector and ports.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    /// Namespace and name.
    pub name: ObjectName,
    /// `spec.selector`; `None` for a service without one (its endpoints are managed by hand).
    pub selector: Option<BTreeMap<String, String>>,
    /// Cluster IPs (none for headless services).
    pub cluster_ips: Vec<IpAddr>,
    /// Ports, in manifest order.
    pub ports: Vec<ServicePort>,
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    /// The port's name (empty for an unnamed single port).
    pub name: String,
    /// The port clients connect to.
    pub port: u16,
    /// The port on the pods.
    pub target_port: TargetPort,
    /// Transport protocol.
    pub protocol: Protocol,
    /// The `appProtocol` hint, if any.
    pub app_protocol: Option<String>,
}

/// A Service's `targetPort`: a number, or the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    /// A port number on the pod.
    Number(u16),
    /// A named container port, resolved through the EndpointSlices.
    Name(String),
}

/// An EndpointSlice: some endpoints of one Service.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointSlice {
    /// Namespace and name.
    pub name: ObjectName,
    /// The Service it belongs to (label `kubernetes.io/service-name`), same namespace.
    pub service: String,
    /// The ports every endpoint of the slice serves.
    pub ports: Vec<EndpointPort>,
    /// The endpoints, in manifest order.
    pub endpoints: Vec<Endpoint>,
}

/// A named port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPort {
    /// Matches the Service port of the same name.
    pub name: String,
    /// The port number on the endpoints.
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
}

/// One endpoint (pod) of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The endpoint's address (the first of `addresses`, which Kubernetes treats as fungible).
    pub address: IpAddr,
    /// `conditions.ready`, absent read as ready.
    pub ready: bool,
    /// The pod behind it, from `targetRef`, if it names a Pod.
    pub pod: Option<ObjectName>,
}

/// A Pod, for the labels of the endpoints it backs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Namespace and name.
    pub name: ObjectName,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `status.podIP` and `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// `spec.serviceAccountName` (`default` when absent): the agent's identity.
    pub service_account: String,
    /// The [`WEIGHT_ANNOTATION`], when it is a valid weight.
    pub weight: Option<u32>,
    /// The pod carries an agent (its [`INJECTED_ANNOTATION`]): callers speak mutual TLS
    /// to it.
    pub meshed: bool,
}

/// The annotation the injector writes on every pod it adds the agent to (the agent's
/// version): the mark of a meshed pod.
pub const INJECTED_ANNOTATION: &str = "bulwark.io/injected";

/// The pod annotation giving its endpoints' weight for WeightedRoundRobin (an integer
/// from 1 to [`MAX_WEIGHT`]).
pub const WEIGHT_ANNOTATION: &str = "bulwark.io/weight";

/// The largest endpoint weight (from a policy, an annotation or a label). Agents
/// scale weight sums down to at most this, so a larger one would buy nothing.
pub const MAX_WEIGHT: u32 = 10_000;

/// When an object was created, for ordering conflicting policies (oldest wins).
pub type CreationTime = Option<Timestamp>;
