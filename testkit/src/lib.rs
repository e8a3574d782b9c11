//! Bulwark's test kit: the test upstream (also the `bulwark-upstream` binary), an HTTP
//! client, a Prometheus text reader, `eventually` and the replay of fuzz corpora. The
//! end-to-end tests (`bulwark-tests`, which re-exports all of it) and the demo both use
//! it, so the demo does not depend on the tests.

pub mod client;
pub mod corpus;
pub mod eventually;
pub mod grpc;
pub mod metrics;
pub mod upstream;

pub use client::{
    ClientError, HttpClient, Response, get, h2_get, h2_request, proxy_get, proxy_request, request,
};
pub use eventually::{TimedOut, eventually, eventually_named, poll_until};
pub use metrics::{Metrics, MetricsError, Sample};
pub use upstream::{InvalidKnobs, Knobs, Reply, Stats, Upstream};
