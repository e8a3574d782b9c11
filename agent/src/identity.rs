//! The agent's workload identity: its own key pair, a certificate signed by the control
//! plane for the SPIFFE ID its ServiceAccount token proves, and renewal before expiry.

pub mod channel;
pub mod client;
pub mod credentials;
pub mod renewal;
pub mod tls;
