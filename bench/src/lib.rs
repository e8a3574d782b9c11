//! `make bench`: the agent and the control plane measured side by side with a peer.
//!
//! - [`load`]: an open-loop load generator free of coordinated omission, with HDR
//!   histograms, over HTTP/1.1 and HTTP/2; and a closed loop for saturation.
//! - [`upstream`]: the fixed upstream (1 KiB answers) and a TCP sink.
//! - [`sut`]: the paths under test as processes: upstream, control plane + agent, HAProxy.
//! - [`run`]: the runner that drives each path and samples CPU and memory from `/proc`.
//! - [`cpscale`]: the control plane under N simulated agents on real gRPC streams.
//! - [`mtls`]: two agents in a row, plaintext and mutual TLS between them side by side.
//! - [`certs`]: the control plane issuing certificates to N simulated agents.
//! - [`identity`]: a control plane with workload identity on, for those two.
//! - [`ratelimit`]: issue 21's rows: agents sharing one limit (Redis, or split), and
//!   what a Shared limit costs.
//! - [`faults`]: `make faults`, the agent under faults (control plane or an endpoint
//!   killed, policy rewrites, SIGTERM, slowloris, idle connections).
//! - [`report`]: the Markdown tables.

pub mod certs;
pub mod cpscale;
pub mod faults;
pub mod identity;
pub mod instructions;
pub mod load;
pub mod machine;
pub mod mtls;
pub mod procstat;
pub mod ratelimit;
pub mod report;
pub mod run;
pub mod sut;
pub mod tcp;
pub mod upstream;
