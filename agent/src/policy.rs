//! The policies an agent enforces, each a small type with a narrow interface and
//! its own unit tests. A policy never imports the proxy or the config: the proxy
//! calls the policies in order, the config builds them from the control plane's
//! snapshot.

pub mod authorization;
pub mod balance;
pub mod breaker;
pub mod bulkhead;
pub mod duration;
pub mod endpoint;
pub mod hash;
pub mod peer_authentication;
pub mod ratelimit;
pub mod retry;
pub mod route;
pub mod shard;
pub mod timeout;
pub mod window;
