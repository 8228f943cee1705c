//! In-pod mode (docs/capture.md "Mode 1"): the redirect agent (or istio-cni) hands us each pod's
//! network namespace over ZDS, and we run one proxy per pod whose listeners (15001, 15006, 15008)
//! and upstream sockets live INSIDE that pod's namespace.
//!
//! ZDS sequence: hello; the agent replays every pod as `add`/`keep` (each acked); `snapshot_sent`
//! (we then stop proxies for pods not in the snapshot, and become ready); then incremental
//! `add`/`del`. A repeated `add` for the same namespace is a no-op, a different namespace for the
//! same uid replaces the proxy, and `del` tears the proxy and its connections down at once.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use zmesh_redirect::zds::{Backoff, WorkloadInfo, ZdsClient, ZdsEvent};

use super::{spawn_listeners, Node, Scope};
use crate::hbone::client::Pool;
use crate::model::Workload;
use crate::netns::PodNetns;
use crate::socket::listen_in;

/// A running pod proxy. Dropping it stops its listeners and ends its connections.
struct PodProxy {
    netns_id: (u64, u64),
    workload: Arc<crate::model::Workload>,
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
                    workload: p.workload.clone(),
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

/// The workload of a pod that arrived over ZDS: by uid, else by name and namespace among this
/// node's workloads (istiod names workloads by its own uid, the agent by the pod's). With a
/// control plane, a pod may arrive before its workload does: the proxy then waits for it, up to
/// `control_plane.workload_wait`, rather than refusing a pod it is about to learn of.
async fn pod_workload(
    node: &Arc<Node>,
    uid: &str,
    info: &WorkloadInfo,
) -> Result<Arc<Workload>, String> {
    let find = |model: &crate::model::Model| {
        model
            .workload_by_uid(uid)
            .filter(|w| w.node == model.node)
            .or_else(|| {
                model.local_workloads().find(|w| {
                    !info.name.is_empty() && w.name == info.name && w.namespace == info.namespace
                })
            })
            .cloned()
    };
    let mut states = node.subscribe_state();
    let found = find(&states.borrow_and_update().model);
    if let Some(w) = found {
        return Ok(w);
    }
    let unknown = |model: &crate::model::Model| {
        format!(
            "pod uid {uid:?} ({}/{}) is not a workload of node {:?}; refusing to proxy an unknown pod",
            info.namespace, info.name, model.node
        )
    };
    let Some(cp) = &node.cfg.node.control_plane else {
        return Err(unknown(&node.model()));
    };
    // Once the control plane has answered, a pod whose workload is not known yet is one it is
    // about to send: wait up to `workload_wait` for it. Before the first answer (a control
    // plane down at start), the wait is one `workload_wait` from the node's start shared by
    // every pod, so a replayed snapshot of many pods cannot hold the ZDS loop for long.
    let synced = node.xds.get().is_some_and(|x| x.synced());
    let limit = if synced {
        cp.workload_wait
    } else {
        cp.workload_wait.saturating_sub(node.started.elapsed())
    };
    tracing::info!(uid, pod = %info.name, namespace = %info.namespace, wait = ?limit, synced, "pod arrived before its workload; waiting for it over xDS");
    let wait = async {
        loop {
            if states.changed().await.is_err() {
                return None;
            }
            if let Some(w) = find(&states.borrow_and_update().model) {
                return Some(w);
            }
        }
    };
    match tokio::time::timeout(limit, wait).await {
        Ok(Some(w)) => Ok(w),
        _ if synced => Err(format!(
            "{} (waited {limit:?} for it over xDS)",
            unknown(&node.model())
        )),
        _ => Err(format!(
            "{} (the control plane has not answered since the node started)",
            unknown(&node.model())
        )),
    }
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
    let workload = pod_workload(node, uid, info).await?;
    node.certs
        .fetch_async(&workload.identity)
        .await
        .map_err(|e| format!("no certificate for {}: {e}", workload.identity))?;
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
    let (kill_tx, kill) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let pool = Pool::new(
        node.certs.clone(),
        node.mark(),
        Some(netns.clone()),
        node.cfg.node.connect_timeout,
    );
    let scope = Arc::new(Scope {
        pool: pool.clone(),
        netns: Some(netns.clone()),
        workload: Some(workload.clone()),
        kill,
        active: node.active.clone(),
    });
    let tasks = spawn_listeners(node, scope, outbound_l, plain_l, hbone_l, &stop);
    tracing::info!(uid, workload = %workload.name, identity = %workload.identity, "pod proxy started");
    pods.insert(
        uid.to_string(),
        PodProxy {
            netns_id: netns.id(),
            workload: workload.clone(),
            pool,
            tasks,
            _kill: kill_tx,
            _stop: stop_tx,
        },
    );
    Ok(())
}
