//! The protobuf messages and gRPC services zmesh speaks, generated at build time from `defs/`
//! (see build.rs). Module paths follow the protobuf packages, so generated code can refer across
//! packages (`super::super::...`) as prost writes it.
//!
//! - `envoy::service::discovery::v3`: delta ADS (the xDS client in `zmesh::xds`).
//! - `istio::workload`, `istio::security`: the resources istiod pushes to node tunnels.
//! - `istio::v1::auth`: the certificate service (`zmesh::identity` client, `zmesh-node ca serve`).
//! - `istio::workload::zds`: the pod hand-off between the node agent and the tunnel.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod google {
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
    }
}

pub mod istio {
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
        pub mod zds {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
        }
    }
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    pub mod v1 {
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}

/// Type URLs of the resources a node tunnel watches.
pub mod type_url {
    pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
    pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
}

pub use prost;
pub use prost_types;
pub use tonic;
