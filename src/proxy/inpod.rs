//! In-pod mode (docs/capture.md "Mode 1"): the redirect agent (or istio-cni) hands us each pod's
//! network namespace over ZDS, and we run one proxy per pod whose listeners (15001, 15006, 15008)
//! and upstream sockets live INSIDE that pod's namespace.
//!
//! ZDS sequence: hello; the agent replays every pod as `add`/`keep` (each acked); `snapshot_sent`
//! (we then stop proxies for pods not in the snapshot, and become ready); then incremental
//! `add`/`del`. A repeated `add` for the same namespace is a no-op, a different namespace for the
//! same uid replaces the proxy, and `del` tears the proxy and its connections down at once.
//!
//! An `add` is acked as soon as the pod's listeners are bound: it never waits for the model or a
//! CA (the CNI ADD behind it would fail and the pod never start). Each pod proxy follows the model
//! through `watch_binding`: while the model does not know the pod, its listeners fail closed
//! (`Scope::bound_workload`); when the workload arrives they serve with it; when it leaves they
//! fail closed again and its open connections are closed (docs/model.md, "In-pod mode").

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use zmesh_redirect::zds::{Backoff, WorkloadInfo, ZdsClient, ZdsEvent};

use super::{spawn_listeners, Node, PodBinding, Scope, Serves};
use crate::hbone::client::Pool;
use crate::identity::SpiffeId;
use crate::model::Workload;
use crate::netns::PodNetns;
use crate::socket::listen_in;

/// A running pod proxy. Dropping it stops its listeners and ends its connections.
struct PodProxy {
    netns_id: (u64, u64),
    /// The model's workload for the pod (None: failing closed), kept by `watch_binding`.
    binding: watch::Receiver<Option<Arc<Workload>>>,
    zds_identity: Option<SpiffeId>,
    pool: Arc<Pool>,
    tasks: Vec<JoinHandle<()>>,
    _kill: watch::Sender<bool>,
    _stop: watch::Sender<bool>,
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        // Accept loops end with the stop channel; connection tasks end with the kill channel
        // (its sender is dropped with us). Aborting makes both immediate.
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Number of pods currently proxied and whether the first snapshot is in (for readiness).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InPodState {
    pub pods: usize,
    pub snapshot_received: bool,
}

/// Connects to the ZDS socket (reconnecting with backoff) and runs pod proxies until shutdown.
pub async fn run(
    node: Arc<Node>,
    path: PathBuf,
    state: watch::Sender<InPodState>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Pod proxies survive agent reconnects: the agent replays its cache as a new snapshot.
    let mut pods: HashMap<String, PodProxy> = HashMap::new();
    let mut backoff = Backoff::default();
    loop {
        let mut client = tokio::select! {
            c = ZdsClient::connect_with_backoff(&path, &mut backoff) => c,
            _ = shutdown.changed() => return stop_accepting(&node, pods),
        };
        tracing::info!(path = %path.display(), "connected to the ZDS agent");
        let mut snapshot: Option<HashSet<String>> = Some(HashSet::new());
        loop {
            let event = tokio::select! {
                e = client.next_event() => e,
                _ = shutdown.changed() => return stop_accepting(&node, pods),
            };
            let reply = match event {
                Ok(Some(ZdsEvent::Add { uid, info, netns })) => {
                    if let Some(s) = snapshot.as_mut() {
                        s.insert(uid.clone());
                    }
                    add(&node, &mut pods, &uid, &info, netns).await
                }
                Ok(Some(ZdsEvent::Keep { uid })) => {
                    if let Some(s) = snapshot.as_mut() {
                        s.insert(uid.clone());
                    }
                    if pods.contains_key(&uid) {
                        Ok(())
                    } else {
                        Err(format!(
                            "keep for unknown pod uid {uid:?}: no proxy to keep"
                        ))
                    }
                }
                Ok(Some(ZdsEvent::Del { uid })) => match pods.remove(&uid) {
                    Some(_) => {
                        tracing::info!(uid, "pod deleted: proxy torn down");
                        Ok(())
                    }
                    None => Err(format!("del for unknown pod uid {uid:?}")),
                },
                Ok(Some(ZdsEvent::SnapshotSent)) => {
                    if let Some(keep) = snapshot.take() {
                        pods.retain(|uid, _| keep.contains(uid));
                    }
                    tracing::info!(pods = pods.len(), "ZDS snapshot complete");
                    Ok(())
                }
                Ok(None) => {
                    tracing::warn!("ZDS agent closed the connection; reconnecting");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ZDS connection failed; reconnecting");
                    break;
                }
            };
            if let Err(e) = &reply {
                tracing::warn!(error = %e, "ZDS request refused");
            }
            let snapshot_done = snapshot.is_none();
            *node.pods.lock().expect("pods lock poisoned") = pods
                .iter()
                .map(|(uid, p)| super::PodView {
                    uid: uid.clone(),
                    workload: p.binding.clone(),
                    zds_identity: p.zds_identity.clone(),
                    netns_id: p.netns_id,
                    pool: p.pool.clone(),
                })
                .collect();
            state.send_modify(|s| {
                s.pods = pods.len();
                s.snapshot_received |= snapshot_done;
            });
            if let Err(e) = client.ack(reply).await {
                tracing::warn!(error = %e, "cannot ack ZDS request; reconnecting");
                break;
            }
        }
    }
}

/// Shutdown (SIGTERM): close every pod's listeners, so a newer process bound beside us with
/// SO_REUSEPORT takes all new connections, but let accepted connections finish (drain).
fn stop_accepting(node: &Node, pods: HashMap<String, PodProxy>) {
    for (_, mut pod) in pods {
        for t in &pod.tasks {
            t.abort();
        }
        let (placeholder, _) = watch::channel(false);
        node.keep_draining(std::mem::replace(&mut pod._kill, placeholder));
    }
}

/// The workload the model holds for a pod that arrived over ZDS: by uid, else by name and
/// namespace among this node's workloads (istiod names workloads by its own uid, the agent by the
/// pod's). None while the model does not know the pod.
pub fn find_pod_workload(
    model: &crate::model::Model,
    uid: &str,
    info: &WorkloadInfo,
) -> Option<Arc<Workload>> {
    model
        .workload_by_uid(uid)
        .filter(|w| w.node == model.node)
        .or_else(|| {
            model.local_workloads().find(|w| {
                !info.name.is_empty() && w.name == info.name && w.namespace == info.namespace
            })
        })
        .cloned()
}

/// The identity a pod claims in its ZDS WorkloadInfo, under the node's trust domain. It is only
/// a first guess used to fetch a certificate early: traffic flows with the model's identity.
pub fn zds_identity(trust_domain: &str, info: &WorkloadInfo) -> Result<SpiffeId, String> {
    SpiffeId::new(trust_domain, &info.namespace, &info.service_account).map_err(|e| {
        format!(
            "no identity from the ZDS workload info (namespace {:?}, service account {:?}): {e}",
            info.namespace, info.service_account
        )
    })
}

/// How a pod's binding to the model changed between two states (what `watch_binding` logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingChange {
    /// Nothing a connection would notice.
    Same,
    /// The model now knows the pod: its proxy starts serving.
    Arrived,
    /// The model no longer knows the pod: its proxy fails closed again.
    Removed,
    /// Still known, with different details (identity, addresses, services...).
    Updated,
}

/// Compares the workload a pod was bound to with the one the model now gives it.
pub fn binding_change(old: Option<&Workload>, new: Option<&Workload>) -> BindingChange {
    match (old, new) {
        (None, None) => BindingChange::Same,
        (None, Some(_)) => BindingChange::Arrived,
        (Some(_), None) => BindingChange::Removed,
        (Some(a), Some(b)) if a == b => BindingChange::Same,
        (Some(_), Some(_)) => BindingChange::Updated,
    }
}

/// Fetches `id`'s certificate off the ZDS loop, so the ack never waits for a CA. A failure is
/// logged; the connection that needs the certificate asks again (and fails closed if it must).
fn prefetch_certificate(node: &Arc<Node>, uid: &str, id: SpiffeId) {
    let certs = node.certs.clone();
    let uid = uid.to_string();
    tokio::spawn(async move {
        if let Err(e) = certs.fetch_async(&id).await {
            tracing::warn!(uid, identity = %id, error = %e, "cannot fetch the pod's certificate yet; its connections will ask again");
        }
    });
}

/// Follows the model for one pod: publishes the pod's workload (None while unknown) to the
/// pod's listeners whenever a reload or an xDS push changes it, and logs each change. Ends when
/// the pod proxy is dropped (the receivers go with it) or the node is gone.
fn watch_binding(
    node: &Arc<Node>,
    uid: &str,
    info: &WorkloadInfo,
    claimed: Option<SpiffeId>,
    tx: watch::Sender<Option<Arc<Workload>>>,
) -> JoinHandle<()> {
    let node = node.clone();
    let (uid, info) = (uid.to_string(), info.clone());
    let mut states = node.subscribe_state();
    tokio::spawn(async move {
        loop {
            let found = find_pod_workload(&states.borrow_and_update().model, &uid, &info);
            let change = binding_change(tx.borrow().as_deref(), found.as_deref());
            match (&change, &found) {
                (BindingChange::Arrived | BindingChange::Updated, Some(w)) => {
                    if claimed.as_ref().is_some_and(|c| *c != w.identity) {
                        tracing::warn!(uid, workload = %w.name, zds_identity = %claimed.as_ref().map(|c| c.to_string()).unwrap_or_default(), identity = %w.identity, "the model's identity for the pod differs from its ZDS workload info; using the model's");
                    }
                    prefetch_certificate(&node, &uid, w.identity.clone());
                    let what = if change == BindingChange::Arrived {
                        "pod's workload arrived: proxy serving"
                    } else {
                        "pod's workload changed in the model"
                    };
                    tracing::info!(uid, workload = %w.name, namespace = %w.namespace, identity = %w.identity, "{what}");
                }
                (BindingChange::Removed, _) => {
                    tracing::warn!(uid, pod = %info.name, namespace = %info.namespace, "pod's workload removed from the model: proxy fails closed, its open connections are closed");
                }
                _ => {}
            }
            if change != BindingChange::Same && tx.send(found).is_err() {
                return;
            }
            tokio::select! {
                r = states.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    })
}

async fn add(
    node: &Arc<Node>,
    pods: &mut HashMap<String, PodProxy>,
    uid: &str,
    info: &WorkloadInfo,
    fd: OwnedFd,
) -> Result<(), String> {
    let netns = PodNetns::open(fd, &info.name)
        .await
        .map_err(|e| format!("cannot enter the network namespace of pod {uid:?}: {e}"))?;
    if let Some(existing) = pods.get(uid) {
        if existing.netns_id == netns.id() {
            return Ok(());
        }
        tracing::info!(uid, "pod network namespace changed: replacing its proxy");
        pods.remove(uid);
    }
    // The ack never waits for the model or a CA: a pod the model does not know yet still gets
    // its listeners (so nothing it sends bypasses the mesh), which fail closed until it arrives.
    let claimed = zds_identity(&node.cfg.node.trust_domain, info)
        .map_err(|e| tracing::warn!(uid, error = %e, "pod proxy starts without a claimed identity"))
        .ok();
    let initial = find_pod_workload(&node.model(), uid, info);
    let cert_for = initial
        .as_ref()
        .map(|w| w.identity.clone())
        .or(claimed.clone());
    if let Some(id) = cert_for {
        prefetch_certificate(node, uid, id);
    }
    let netns = Arc::new(netns);
    // Restart hand-over: when the old process closes its SO_REUSEPORT listeners, connections
    // still in their accept queues migrate to the new process's listeners instead of being reset
    // (Linux 5.14+). Best effort: older kernels lose only connections queued at that instant.
    if let Err(e) = netns
        .run_async(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"))
        .await
    {
        tracing::debug!(uid, error = %e, "cannot enable tcp_migrate_req in the pod netns");
    }
    let p = &node.cfg.node.ports;
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let bind = |port| SocketAddr::new(any, port);
    let listen_err = |role: &'static str| {
        move |e: std::io::Error| format!("pod {uid:?}: cannot listen on {role}: {e}")
    };
    let outbound_l = listen_in(&netns, bind(p.outbound), true)
        .await
        .map_err(listen_err("outbound"))?;
    let plain_l = listen_in(&netns, bind(p.inbound_plaintext), true)
        .await
        .map_err(listen_err("inbound plaintext"))?;
    let hbone_l = listen_in(&netns, bind(p.hbone), false)
        .await
        .map_err(listen_err("HBONE"))?;
    let d = &node.cfg.node.dns;
    let dns_l = if d.enabled {
        // Only the pod's own processes ask it (`node.dns.bind` is host mode's address).
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), d.port);
        Some(
            crate::dns::DnsListeners::bind_in(&netns, addr)
                .await
                .map_err(listen_err("DNS"))?,
        )
    } else {
        None
    };
    let (kill_tx, kill) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let pool = Pool::new(
        node.certs.clone(),
        node.mark(),
        Some(netns.clone()),
        node.cfg.node.connect_timeout,
        node.cfg.node.keepalive(),
    );
    let (binding_tx, binding) = watch::channel(initial.clone());
    let scope = Arc::new(Scope {
        pool: pool.clone(),
        netns: Some(netns.clone()),
        serves: Serves::Pod(PodBinding {
            uid: uid.into(),
            pod: format!("{}/{}", info.namespace, info.name),
            workload: binding.clone(),
            closed: node.stats.unbound_closed.clone(),
        }),
        kill,
        active: node.active.clone(),
    });
    let mut tasks = spawn_listeners(node, scope.clone(), outbound_l, plain_l, hbone_l, &stop);
    if let Some(dns_l) = dns_l {
        tasks.push(super::spawn_dns(node, scope, dns_l, &stop));
    }
    match &initial {
        Some(w) => {
            tracing::info!(uid, workload = %w.name, identity = %w.identity, "pod proxy started")
        }
        None => tracing::info!(
            uid,
            pod = %info.name,
            namespace = %info.namespace,
            zds_identity = %claimed.as_ref().map(|c| c.to_string()).unwrap_or_default(),
            "pod proxy started before its workload is in the model: failing closed until it arrives"
        ),
    }
    tasks.push(watch_binding(node, uid, info, claimed.clone(), binding_tx));
    pods.insert(
        uid.to_string(),
        PodProxy {
            netns_id: netns.id(),
            binding,
            zds_identity: claimed,
            pool,
            tasks,
            _kill: kill_tx,
            _stop: stop_tx,
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::Model;

    fn model(workloads: &str) -> Model {
        let text = format!(
            "node: {{ name: node-1, certificates: {{ file_ca: {{ dir: /tmp/ca }} }} }}\nworkloads:\n{workloads}"
        );
        Model::from_config(&Config::parse(&text, "test").unwrap())
    }

    fn info(name: &str, namespace: &str, sa: &str) -> WorkloadInfo {
        WorkloadInfo {
            name: name.into(),
            namespace: namespace.into(),
            service_account: sa.into(),
        }
    }

    #[test]
    fn a_pod_is_found_by_uid_or_by_name_and_namespace_on_this_node() {
        let m = model(
            "  - { uid: pod-a, name: client, namespace: shop, addresses: [10.0.0.1], node: node-1 }
  - { uid: istiod-b, name: server, namespace: shop, addresses: [10.0.0.2], node: node-1 }
  - { uid: pod-c, name: far, namespace: shop, addresses: [10.0.0.3], node: node-2 }
",
        );
        let found = |uid, i: &WorkloadInfo| find_pod_workload(&m, uid, i).map(|w| w.uid.clone());
        assert_eq!(found("pod-a", &info("", "", "")), Some("pod-a".into()));
        assert_eq!(
            found("k8s-uid-b", &info("server", "shop", "x")),
            Some("istiod-b".into()),
            "istiod's uid differs from the pod's: matched by name"
        );
        // Not known: another namespace, an empty name, or a workload of another node.
        assert_eq!(found("k8s-uid-b", &info("server", "other", "x")), None);
        assert_eq!(found("nope", &info("", "shop", "x")), None);
        assert_eq!(found("pod-c", &info("far", "shop", "x")), None);
    }

    #[test]
    fn the_claimed_identity_comes_from_the_zds_info_or_names_what_is_wrong() {
        let id = zds_identity("cluster.local", &info("p", "shop", "frontend")).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/frontend");
        let e = zds_identity("cluster.local", &info("p", "shop", "")).unwrap_err();
        assert!(e.contains("service account \"\""), "{e}");
        let e = zds_identity("cluster.local", &info("p", "../x", "sa")).unwrap_err();
        assert!(e.contains("namespace \"../x\""), "{e}");
    }

    #[test]
    fn binding_changes_are_told_apart() {
        let m = model(
            "  - { uid: a, name: a, namespace: shop, service_account: one, addresses: [10.0.0.1], node: node-1 }
",
        );
        let w = m.workload_by_uid("a").unwrap().as_ref().clone();
        let mut other = w.clone();
        other.identity = SpiffeId::new("cluster.local", "shop", "two").unwrap();
        use BindingChange::*;
        for (old, new, want) in [
            (None, None, Same),
            (None, Some(&w), Arrived),
            (Some(&w), None, Removed),
            (Some(&w), Some(&w.clone()), Same),
            (Some(&w), Some(&other), Updated),
        ] {
            assert_eq!(binding_change(old, new), want, "{old:?} -> {new:?}");
        }
    }
}
