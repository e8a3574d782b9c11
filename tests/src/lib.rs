//! Bulwark's test kit: the test upstream, an HTTP client, a Prometheus text
//! reader, mesh folders and `eventually`, shared by the end-to-end tests and the demo.
//!
//! ```ignore
//! use bulwark_tests::{assert_eventually, client, Knobs, Mesh, Metrics, Upstream};
//!
//! let up = Upstream::start("127.0.0.1:0".parse()?, "reviews-1", Knobs::failing(0.3, 503)).await?;
//! let mesh = Mesh::with_services([("reviews", vec![up.addr()])])?;
//! mesh.write_policy("reviews-policy.yaml", POLICY)?;
//! // ... start a control plane on mesh.path() and an agent ...
//! let response = client::proxy_get(agent.outbound_addr(), "http://reviews.test/", &[]).await?;
//! assert_eventually!(Metrics::scrape(agent.admin_addr()).await
//!     .is_ok_and(|m| m.get("bulwark_retries_total", &[("dst", "reviews.test:80")]) > 0.0));
//! ```

pub mod apiserver;
pub mod canary;
pub mod client;
pub mod eventually;
pub mod grpc;
pub mod harness;
pub mod mesh;
pub mod metrics;
#[cfg(target_os = "linux")]
pub mod netns;
pub mod upstream;

pub use client::{
    ClientError, HttpClient, Response, get, h2_get, h2_request, proxy_get, proxy_request, request,
};
pub use eventually::{TimedOut, eventually, eventually_named, poll_until};
pub use mesh::Mesh;
pub use metrics::{Metrics, MetricsError, Sample};
pub use upstream::{InvalidKnobs, Knobs, Reply, Stats, Upstream};
