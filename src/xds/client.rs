//! The delta ADS stream: connect, subscribe, apply, answer, reconnect with back-off.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zmesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use zmesh_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node as XdsNode,
};
use zmesh_proto::google::rpc::Status;
use zmesh_proto::istio::security::Authorization;
use zmesh_proto::istio::workload::Address;
use zmesh_proto::prost::Message;
use zmesh_proto::prost_types::{value::Kind, Struct, Value};
use zmesh_proto::tonic;
use zmesh_proto::type_url::{ADDRESS, AUTHORIZATION};

use super::convert::{self, PolicyItem, ResourceError};
use super::state::{Held, Store};
use crate::config::control_plane::ControlPlaneConfig;
use crate::proxy::Node;

/// The types one stream subscribes to, in subscription order.
const TYPES: [&str; 2] = [ADDRESS, AUTHORIZATION];
/// First reconnect delay and its cap; each failure doubles it, with up to 50% jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Largest response accepted (10,000 workloads are about 3 MiB).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Longest NACK message sent back.
const MAX_ERROR_DETAIL: usize = 4096;
/// google.rpc.Code INVALID_ARGUMENT.
const INVALID_ARGUMENT: i32 = 3;

/// Counters in Istio's metric names (istio_xds_*), by type URL.
#[derive(Debug, Default)]
pub struct XdsStats {
    pub messages: [AtomicU64; 2],
    pub bytes: [AtomicU64; 2],
    pub acks: [AtomicU64; 2],
    pub nacks: [AtomicU64; 2],
    /// Streams ended, by reason: connect failed, stream error, closed by the server.
    pub terminations_connect: AtomicU64,
    pub terminations_error: AtomicU64,
    pub terminations_closed: AtomicU64,
    pub connected: AtomicBool,
    /// Whether each type's first response has been applied and answered.
    pub synced: [AtomicBool; 2],
}

/// The client of one node.
pub struct XdsClient {
    node: Arc<Node>,
    cp: ControlPlaneConfig,
    store: Mutex<Store>,
    pub stats: XdsStats,
    /// The last refused resources, for the config dump.
    last_nack: Mutex<Option<String>>,
}

/// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`: istiod gives a node id of
/// this shape the node-tunnel treatment (it pushes every workload and policy, and authorizes
/// the CA calls it makes for the pods of its node).
pub fn node_id(cp: &ControlPlaneConfig) -> String {
    let ip = cp
        .instance_ip
        .map_or_else(|| "0.0.0.0".to_string(), |i| i.to_string());
    format!(
        "ztunnel~{ip}~{}.{}~{}.svc.cluster.local",
        cp.pod_name, cp.pod_namespace, cp.pod_namespace
    )
}

fn string(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn type_index(type_url: &str) -> Option<usize> {
    TYPES.iter().position(|t| *t == type_url)
}

impl XdsClient {
    pub fn new(node: Arc<Node>, cp: ControlPlaneConfig) -> Arc<XdsClient> {
        Arc::new(XdsClient {
            node,
            cp,
            store: Mutex::new(Store::default()),
            stats: XdsStats::default(),
            last_nack: Mutex::new(None),
        })
    }

    /// The store; a panic while it was held (a bug) leaves it as it was, not unusable.
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the first response of every type has been applied.
    pub fn synced(&self) -> bool {
        self.stats.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    /// The node description sent in every request.
    fn xds_node(&self) -> XdsNode {
        let mut fields = BTreeMap::new();
        fields.insert("NAME".into(), string(&self.cp.pod_name));
        fields.insert("NAMESPACE".into(), string(&self.cp.pod_namespace));
        if let Some(ip) = self.cp.instance_ip {
            fields.insert("INSTANCE_IPS".into(), string(ip.to_string()));
        }
        fields.insert("NODE_NAME".into(), string(&self.node.cfg.node.name.0));
        fields.insert("CLUSTER_ID".into(), string(&self.cp.target.cluster_id));
        for (k, v) in &self.cp.metadata {
            fields.insert(k.clone(), json_value(v));
        }
        XdsNode {
            id: node_id(&self.cp),
            cluster: String::new(),
            metadata: Some(Struct { fields }),
            user_agent_name: "zmesh".into(),
        }
    }

    /// Runs the client for the life of the process: one stream at a time, reconnecting with
    /// exponential back-off and jitter. What was received stays applied between streams.
    pub async fn run(self: Arc<Self>) {
        let mut failures: u32 = 0;
        loop {
            match self.stream_once().await {
                Ok(got_response) => {
                    self.stats
                        .terminations_closed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(address = %self.cp.target.address, "xDS stream closed by the control plane; reconnecting");
                    if got_response {
                        failures = 0;
                    }
                }
                Err(StreamError::Connect(e)) => {
                    self.stats
                        .terminations_connect
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot reach the xDS control plane; serving what is known");
                }
                Err(StreamError::Stream(e, got_response)) => {
                    self.stats
                        .terminations_error
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "xDS stream failed; serving what is known");
                    if got_response {
                        failures = 0;
                    }
                }
            }
            self.stats.connected.store(false, Ordering::Release);
            failures = failures.saturating_add(1);
            tokio::time::sleep(backoff(failures, rand::random::<f64>())).await;
        }
    }

    /// One stream, until it ends. `Ok(true)`: the server closed it after at least one response.
    async fn stream_once(self: &Arc<Self>) -> Result<bool, StreamError> {
        let channel = crate::grpc::connect(&self.cp.target, self.node.mark())
            .await
            .map_err(|e| StreamError::Connect(e.to_string()))?;
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let (tx, rx) = tokio::sync::mpsc::channel::<DeltaDiscoveryRequest>(8);
        // The first request of each type on this stream: the node, and what is already held.
        for t in TYPES {
            let initial = self.store().versions(t);
            let req = DeltaDiscoveryRequest {
                node: Some(self.xds_node()),
                type_url: t.into(),
                initial_resource_versions: initial,
                ..Default::default()
            };
            tx.send(req).await.expect("receiver held below");
        }
        let outbound =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
            );
        let mut req = tonic::Request::new(outbound);
        crate::grpc::authorize(&mut req, &self.cp.target)
            .map_err(|e| StreamError::Connect(e.to_string()))?;
        let mut inbound = client
            .delta_aggregated_resources(req)
            .await
            .map_err(|s| StreamError::Connect(status_text(&s)))?
            .into_inner();
        self.stats.connected.store(true, Ordering::Release);
        tracing::info!(address = %self.cp.target.address, node_id = %node_id(&self.cp), "xDS stream open");
        let mut got_response = false;
        loop {
            let resp = match inbound.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(got_response),
                Err(s) => return Err(StreamError::Stream(status_text(&s), got_response)),
            };
            got_response = true;
            let answer = self.clone().handle(resp).await;
            if tx.send(answer).await.is_err() {
                return Err(StreamError::Stream(
                    "the request stream closed".into(),
                    true,
                ));
            }
        }
    }

    /// Applies one response and returns its ACK or NACK.
    async fn handle(self: Arc<Self>, resp: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let idx = type_index(&resp.type_url);
        if let Some(i) = idx {
            self.stats.messages[i].fetch_add(1, Ordering::Relaxed);
            self.stats.bytes[i].fetch_add(resp.encoded_len() as u64, Ordering::Relaxed);
        }
        let nonce = resp.nonce.clone();
        let type_url = resp.type_url.clone();
        // Decoding, converting and building the model are CPU work proportional to the mesh:
        // off the control runtime's only thread.
        let me = self.clone();
        let (errors, applied) = match tokio::task::spawn_blocking(move || me.apply(&resp)).await {
            Ok(errors) => (errors, true),
            Err(e) => (vec![format!("applying the response failed: {e}")], false),
        };
        let error_detail = (!errors.is_empty()).then(|| {
            let mut message = errors.join("; ");
            if message.len() > MAX_ERROR_DETAIL {
                let suffix = format!("... ({} refused in all)", errors.len());
                let mut cut = MAX_ERROR_DETAIL - suffix.len();
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                message.truncate(cut);
                message.push_str(&suffix);
            }
            Status {
                code: INVALID_ARGUMENT,
                message,
                details: vec![],
            }
        });
        if let Some(i) = idx {
            let counter = if error_detail.is_some() {
                &self.stats.nacks[i]
            } else {
                &self.stats.acks[i]
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if applied && !self.stats.synced[i].swap(true, Ordering::AcqRel) {
                tracing::info!(type_url = %type_url, "first xDS response of this type applied");
            }
        }
        if let Some(s) = &error_detail {
            tracing::warn!(type_url = %type_url, error = %s.message, "xDS resources refused (NACK); the valid ones are applied");
            *self
                .last_nack
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(s.message.clone());
        }
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: nonce,
            error_detail,
            ..Default::default()
        }
    }

    /// Applies a response to the store and publishes the result; returns what was refused.
    fn apply(&self, resp: &DeltaDiscoveryResponse) -> Vec<String> {
        let mut errors = Vec::new();
        let mut store = self.store();
        match resp.type_url.as_str() {
            ADDRESS => {
                for r in &resp.resources {
                    match decode::<Address>(&r.name, ADDRESS, r.resource.as_ref())
                        .and_then(|a| convert::address(&r.name, &a))
                    {
                        Ok(entry) => {
                            store.addresses.insert(
                                r.name.clone(),
                                Held {
                                    version: r.version.clone(),
                                    value: entry,
                                },
                            );
                        }
                        // The previous version, if any, stays: nothing applied is lost.
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                for name in &resp.removed_resources {
                    store.addresses.remove(name);
                }
            }
            AUTHORIZATION => {
                for r in &resp.resources {
                    let (item, e) = match decode::<Authorization>(
                        &r.name,
                        AUTHORIZATION,
                        r.resource.as_ref(),
                    ) {
                        Ok(a) => convert::authorization(&r.name, &a),
                        Err(e) => (unreadable_policy(&r.name, &e), Some(e)),
                    };
                    errors.extend(e.map(|e| e.to_string()));
                    store.policies.insert(
                        r.name.clone(),
                        Held {
                            version: r.version.clone(),
                            value: item,
                        },
                    );
                }
                for name in &resp.removed_resources {
                    store.policies.remove(name);
                }
            }
            other => {
                errors.push(format!("type {other:?} was not subscribed to"));
                return errors;
            }
        }
        // A policy push leaves the model as it is: only the policy set is rebuilt.
        let model = if resp.type_url == ADDRESS {
            Arc::new(store.model(&self.node.cfg.node))
        } else {
            self.node.model()
        };
        let policies = store.policy_set();
        drop(store);
        self.node.publish(crate::proxy::State {
            model: model.clone(),
            policies: Arc::new(policies),
        });
        self.refresh_certificates(&model);
        errors
    }

    /// Forgets certificates of identities no longer local and fetches those of new local
    /// workloads in the background (a slow CA never holds up the ACK).
    fn refresh_certificates(&self, model: &crate::model::Model) {
        let local: std::collections::HashSet<_> = model
            .local_workloads()
            .map(|w| w.identity.clone())
            .collect();
        self.node.certs.retain(&local);
        let certs = self.node.certs.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for id in local {
                    if let Err(e) = certs.fetch_async(&id).await {
                        tracing::warn!(identity = %id, error = %e, "no certificate yet for a workload of this node");
                    }
                }
            });
        }
    }

    /// The held resources and the stream's state, for the admin config dump.
    pub fn dump(&self) -> serde_json::Value {
        let store = self.store();
        let s = &self.stats;
        let per_type = |i: usize| {
            serde_json::json!({
                "type_url": TYPES[i],
                "synced": s.synced[i].load(Ordering::Acquire),
                "messages": s.messages[i].load(Ordering::Relaxed),
                "acks": s.acks[i].load(Ordering::Relaxed),
                "nacks": s.nacks[i].load(Ordering::Relaxed),
            })
        };
        let versions = |m: std::collections::HashMap<String, String>| {
            m.into_iter().collect::<BTreeMap<_, _>>()
        };
        serde_json::json!({
            "address": self.cp.target.address,
            "node_id": node_id(&self.cp),
            "connected": s.connected.load(Ordering::Acquire),
            "types": [per_type(0), per_type(1)],
            "last_nack": *self.last_nack.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            "resources": {
                ADDRESS: versions(store.versions(ADDRESS)),
                AUTHORIZATION: versions(store.versions(AUTHORIZATION)),
            },
        })
    }

    /// The Prometheus families, in Istio's names.
    pub fn metrics(&self) -> Vec<crate::metrics::Extra<'static>> {
        let s = &self.stats;
        let by_type = |c: &[AtomicU64; 2]| {
            (0..2)
                .map(|i| {
                    (
                        format!("{{url=\"{}\"}}", TYPES[i]),
                        c[i].load(Ordering::Relaxed) as f64,
                    )
                })
                .collect::<Vec<_>>()
        };
        vec![
            (
                "istio_xds_connection_terminations_total",
                "counter",
                "xDS streams ended, by reason",
                vec![
                    (
                        "{reason=\"ConnectionError\"}".into(),
                        s.terminations_connect.load(Ordering::Relaxed) as f64,
                    ),
                    (
                        "{reason=\"Error\"}".into(),
                        s.terminations_error.load(Ordering::Relaxed) as f64,
                    ),
                    (
                        "{reason=\"Reconnect\"}".into(),
                        s.terminations_closed.load(Ordering::Relaxed) as f64,
                    ),
                ],
            ),
            (
                "istio_xds_message_total",
                "counter",
                "xDS responses received, by type",
                by_type(&s.messages),
            ),
            (
                "istio_xds_message_bytes_total",
                "counter",
                "Bytes of xDS responses received, by type",
                by_type(&s.bytes),
            ),
            (
                "zmesh_xds_nacks_total",
                "counter",
                "xDS responses answered with a NACK (some resource refused), by type",
                by_type(&s.nacks),
            ),
        ]
    }
}

/// A policy whose bytes cannot be decoded: deny-all over the namespace its name gives (fail
/// closed), or over the whole mesh when the name says nothing.
fn unreadable_policy(name: &str, e: &ResourceError) -> PolicyItem {
    let (namespace, pname) = match name.split_once('/') {
        Some((ns, n)) if !ns.is_empty() => (Some(ns.to_string()), Some(n.to_string())),
        _ => (None, None),
    };
    PolicyItem::Broken(crate::policy::BrokenPolicy {
        name: pname,
        namespace,
        scope: None,
        error: crate::policy::PolicyError::Invalid {
            policy: name.to_string(),
            field: e.field.clone(),
            value: String::new(),
            reason: e.reason.clone(),
        },
    })
}

fn decode<T: Message + Default>(
    name: &str,
    type_url: &str,
    any: Option<&zmesh_proto::prost_types::Any>,
) -> Result<T, ResourceError> {
    let bad = |field: &str, reason: String| ResourceError {
        resource: name.to_string(),
        field: field.to_string(),
        reason,
    };
    let any = any.ok_or_else(|| bad("resource", "no resource body".into()))?;
    if any.type_url != type_url {
        return Err(bad(
            "resource.type_url",
            format!("{:?} in a response of type {type_url:?}", any.type_url),
        ));
    }
    T::decode(any.value.as_slice()).map_err(|e| bad("resource", format!("cannot decode: {e}")))
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn json_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(a) => Kind::ListValue(zmesh_proto::prost_types::ListValue {
            values: a.iter().map(json_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), json_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

enum StreamError {
    Connect(String),
    /// The stream failed; whether a response had arrived on it.
    Stream(String, bool),
}

/// Delay before reconnect attempt `failures + 1`: 500 ms doubling to 30 s, plus up to 50%
/// jitter (`jitter` in [0, 1)) so nodes that lost istiod together do not return in step.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_CAP);
    base.mul_f64(1.0 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter() {
        assert_eq!(backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(2, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(50, 0.0), BACKOFF_CAP);
        assert_eq!(backoff(50, 0.999).as_secs(), 44);
        assert!(backoff(3, 0.5) > backoff(3, 0.0));
    }
}
