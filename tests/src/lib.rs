//! Bulwark's end-to-end test kit: mesh folders, harnesses (control plane and agent in
//! process), a fake API server and network namespaces, plus everything of
//! `bulwark-testkit` (the upstream, the client, the metrics reader, `eventually`).
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
pub mod harness;
pub mod identity_mesh;
pub mod mesh;
#[cfg(target_os = "linux")]
pub mod netns;
pub mod redis;

// The upstream, client, metrics reader and `eventually` live in `bulwark-testkit`, which
// the demo uses too; re-exported here so that tests keep one import path.
pub use bulwark_testkit::{
    ClientError, HttpClient, InvalidKnobs, Knobs, Metrics, MetricsError, Reply, Response, Sample,
    Stats, TimedOut, Upstream, assert_eventually, client, eventually, eventually_named, get, grpc,
    h2_get, h2_request, metrics, poll_until, proxy_get, proxy_request, request, upstream,
};
pub use mesh::Mesh;
