//! zmesh: an ambient service-mesh node tunnel that speaks Istio's HBONE.
//!
//! Where things live:
//! - `accesslog`: the bounded, never-blocking access-log writer of the node and the waypoint;
//! - `config`: the local YAML file, parsed once into typed structs;
//! - `controlplane`: what zmesh serves to other nodes in place of istiod (the xDS server);
//! - `dns`: the DNS proxy (15053): mesh names from the model, the rest forwarded upstream;
//! - `model`: workloads and services, and outbound destination selection;
//! - `identity`: SPIFFE IDs, the built-in file CA and the certificate manager;
//! - `controlplane`: `zmesh-node ca serve`, the CA server of a standalone mesh;
//! - `tls`: rustls configuration and SPIFFE-aware verification;
//! - `hbone`: the CONNECT protocol, the pooled client and the server settings;
//! - `proxy`: the node's listeners (15001, 15006, 15008, 15021);
//! - `copy`: moving bytes between sockets and HTTP/2 streams;
//! - `socket`: socket options (SO_MARK, IP_TRANSPARENT, SO_ORIGINAL_DST);
//! - `netns`: making sockets inside a pod's network namespace (in-pod mode);
//! - `policy`: L4 authorization (Istio semantics, fail closed); not yet enforced on the data path.
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod alloc;
pub mod config;
pub mod controlplane;
pub mod copy;
pub mod dns;
pub mod grpc;
pub mod hbone;
pub mod host;
pub mod identity;
pub mod istio_vm;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod rejections;
pub mod socket;
pub mod tls;
pub mod waypoint;
pub mod workers;
pub mod xds;
