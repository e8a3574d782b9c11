//! The control plane's side that faces the agents: each agent's view of the index
//! (versioned, sent only when it changes), the proto messages it is made of, what an
//! agent of an older protocol revision may receive, the registry of connected agents,
//! and the gRPC discovery service that streams the views.

pub mod agents;
pub mod compat;
pub mod grpc;
pub mod view;
pub mod wire;
