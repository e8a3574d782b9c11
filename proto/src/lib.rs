//! Bulwark's agent <-> control-plane API, generated from `proto/bulwark/mesh/v1/discovery.proto`
//! (configuration) and `proto/bulwark/identity/v1/identity.proto` (certificates).

pub mod defaults;
pub mod delta;
pub mod tls;

/// Version 1 of the mesh discovery API.
pub mod mesh {
    /// Messages and the `Discovery` service.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("bulwark.mesh.v1");
    }
}

pub use mesh::v1;

/// Version 1 of the workload identity API.
pub mod identity {
    /// Messages and the `Identity` service.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("bulwark.identity.v1");
    }
}

/// The highest API revision this build understands (see `Identity.protocol_version`
/// in the .proto for what each adds).
pub const PROTOCOL_VERSION: u32 = 7;

/// The first protocol revision whose agents take deltas (`Snapshot.base_version`).
pub const INCREMENTAL_SINCE: u32 = 6;
