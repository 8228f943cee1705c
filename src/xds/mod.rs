//! The xDS client: workloads, services and L4 policies from Istio's control plane (istiod, or
//! `zmesh-node ca serve --xds`), as ztunnel receives them (docs/model.md "Control plane").
//!
//! One delta ADS stream (`DeltaAggregatedResources`) carries both types,
//! `istio.workload.Address` and `istio.security.Authorization`. Every response is answered: an
//! ACK with its nonce, or a NACK whose `error_detail` names each refused resource and field
//! while the valid resources of the same response are applied (reliability #23). Accepted
//! resources are held by name and version; on reconnect the first request of each type lists
//! them in `initial_resource_versions`, so the control plane sends only what changed. Between
//! streams nothing is dropped: a node whose control plane is unreachable keeps serving what it
//! last knew. Readiness waits for the first response of each type (reliability #34).
//!
//! What is held is converted (`convert`) into the file's structs and built into the same `Model`
//! and `PolicySet` the file builds (`state`), then published to the node like a file reload, so
//! open connections re-judge themselves against a pushed policy.

mod client;
pub mod convert;
pub mod state;

pub use client::{node_id, XdsClient, XdsStats};

use std::sync::Arc;

/// Starts the node's xDS client on the control runtime when `node.control_plane` is set (once).
pub fn spawn(node: &Arc<crate::proxy::Node>) {
    let Some(cp) = node.cfg.node.control_plane.clone() else {
        return;
    };
    let client = XdsClient::new(node.clone(), cp);
    if node.xds.set(client.clone()).is_ok() {
        crate::proxy::control().spawn(client.run());
    }
}
