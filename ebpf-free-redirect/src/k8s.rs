//! The Kubernetes API side of enrollment (docs/capture.md, "Enrollment"): the pods of this node
//! (field selector `spec.nodeName=<node>`) and all namespaces, watched with kube-runtime's
//! watcher into reflector stores, plus direct reads for the moments a store may lag or be wrong.
//! Which pods are meshed is decided by [`crate::enroll`]; this module only fetches.
//!
//! Two rules keep the API's failures from hurting pods:
//! - **fail closed on start**: a CNI ADD whose pod may be meshed is answered from the stores only
//!   when they say "meshed"; any other answer is confirmed with fresh GETs of the pod and its
//!   namespace, and an unreachable API fails the ADD (the pod is retried, never started
//!   uncaptured). `kube-system` is excluded by the plugin before the API is asked, so the
//!   cluster's own plumbing never waits on it.
//! - **never unmesh on doubt**: the stores only trigger work; releasing a pod (unlabelled, or
//!   deleted) is confirmed with fresh GETs first ([`K8s::confirm`]), so a watch that fails, lags
//!   or relists after a 410 never releases anything. Watch errors are logged and retried with
//!   kube-runtime's default backoff (exponential, 800 ms up to 30 s, with jitter).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, ResourceExt as _};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::enroll::{decide, Decision, PodFacts};

/// How long one direct read may take. A CNI ADD waits on it (kubelet's own CNI timeout is
/// minutes), and an API server that needs longer is as good as down for a pod's start.
pub const GET_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connect bound for every API request, watches included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the API is and which node this agent serves.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// An explicit API server URL (`--kube-api`); `None` uses the in-cluster service account or
    /// KUBECONFIG (kube's `Config::infer`).
    pub api_url: Option<String>,
    /// A bearer token file for `api_url` (the in-cluster config brings its own).
    pub token_file: Option<std::path::PathBuf>,
    /// This node's name: only its pods are watched.
    pub node_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("invalid Kubernetes API URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("token file {path}: {reason}")]
    TokenFile {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("no Kubernetes API configuration found: {0} (set --kube-api, KUBECONFIG, or run in a pod with a service account)")]
    Infer(String),
    #[error("cannot build the Kubernetes API client: {0}")]
    Client(#[source] kube::Error),
    #[error("reading {what} from the Kubernetes API failed: {source} (is the API server reachable, and may the agent's service account get pods and namespaces?)")]
    Get {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading {what} from the Kubernetes API timed out after {GET_TIMEOUT:?}")]
    Timeout { what: String },
    #[error(
        "pod {namespace}/{name} does not exist in the Kubernetes API (deleted while starting?)"
    )]
    PodMissing { namespace: String, name: String },
    #[error("pod {namespace}/{name} has uid {found:?} in the Kubernetes API, not {expected}: the sandbox belongs to a pod that was replaced")]
    UidMismatch {
        namespace: String,
        name: String,
        expected: String,
        found: Option<String>,
    },
}

/// What a fresh read says about an enrolled pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmed {
    /// The pod exists with this uid; the rule says this.
    Exists(Decision),
    /// No pod of that name, or one with another uid: the enrolled pod is gone.
    Gone,
}

/// The watches, their stores, and a client for direct reads. Dropping it stops the watches.
pub struct K8s {
    client: kube::Client,
    node: String,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    pods_ready: Arc<AtomicBool>,
    namespaces_ready: Arc<AtomicBool>,
    changed: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for K8s {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl K8s {
    /// Builds the client and starts both watches on the current runtime. Does not wait for them:
    /// see [`K8s::wait_ready`].
    pub async fn start(settings: &KubeSettings) -> Result<K8s, K8sError> {
        let mut config = match &settings.api_url {
            Some(url) => {
                let uri: http::Uri =
                    url.parse()
                        .map_err(|e: http::uri::InvalidUri| K8sError::BadUrl {
                            url: url.clone(),
                            reason: e.to_string(),
                        })?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(K8sError::BadUrl {
                        url: url.clone(),
                        reason: "expected http(s)://HOST[:PORT]".into(),
                    });
                }
                let mut config = kube::Config::new(uri);
                if let Some(path) = &settings.token_file {
                    check_token_file(path)?;
                    // kube re-reads it every minute: a rotated (projected) token is picked up.
                    config.auth_info.token_file = Some(path.to_string_lossy().into_owned());
                }
                config
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| K8sError::Infer(e.to_string()))?,
        };
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        let client = kube::Client::try_from(config).map_err(K8sError::Client)?;
        let changed = Arc::new(Notify::new());
        let (pods, pods_ready, pod_task) = watch::<Pod>(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name)),
            "pods",
            changed.clone(),
        );
        let (namespaces, namespaces_ready, ns_task) = watch::<Namespace>(
            Api::all(client.clone()),
            watcher::Config::default(),
            "namespaces",
            changed.clone(),
        );
        Ok(K8s {
            client,
            node: settings.node_name.clone(),
            pods,
            namespaces,
            pods_ready,
            namespaces_ready,
            changed,
            tasks: vec![pod_task, ns_task],
        })
    }

    /// The node whose pods are watched.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether both watches have completed their first list.
    pub fn is_ready(&self) -> bool {
        self.pods_ready.load(Ordering::Acquire) && self.namespaces_ready.load(Ordering::Acquire)
    }

    /// Waits until [`K8s::is_ready`] or `limit` passes; returns readiness.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.is_ready() {
                return true;
            }
            // A change between the check and this wait is not lost: `notify_one` leaves a permit.
            if tokio::time::timeout_at(deadline, self.changed.notified())
                .await
                .is_err()
            {
                return self.is_ready();
            }
        }
    }

    /// Resolves when a watch delivered something since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Every pod of this node in the store with the rule's answer, or `None` before both watches
    /// have listed once (a partial view must not drive enrollment).
    pub fn desired(&self) -> Option<Vec<(PodFacts, Decision)>> {
        if !self.is_ready() {
            return None;
        }
        Some(
            self.pods
                .state()
                .iter()
                .filter_map(|pod| {
                    let facts = PodFacts::of(pod)?;
                    let ns = self.namespaces.get(&ObjectRef::new(&facts.namespace));
                    let decision = decide(pod, ns.as_deref());
                    Some((facts, decision))
                })
                .collect(),
        )
    }

    /// The decision for a pod a CNI ADD is starting: the stores when they say "meshed", else
    /// fresh reads (module docs: fail closed). The facts come from the pod object that decided.
    pub async fn decide_add(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<(Decision, PodFacts), K8sError> {
        let cached_pod = self
            .pods
            .get(&ObjectRef::new(name).within(namespace))
            .filter(|p| p.metadata.uid.as_deref() == Some(uid));
        let cached_ns = self.namespaces.get(&ObjectRef::new(namespace));
        if let Some(pod) = &cached_pod {
            let decision = decide(pod, cached_ns.as_deref());
            if let (true, Some(facts)) = (decision.is_meshed(), PodFacts::of(pod)) {
                return Ok((decision, facts));
            }
        }
        let pod = self
            .get_pod(namespace, name)
            .await?
            .ok_or_else(|| K8sError::PodMissing {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })?;
        if pod.metadata.uid.as_deref() != Some(uid) {
            return Err(K8sError::UidMismatch {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                expected: uid.to_owned(),
                found: pod.metadata.uid.clone(),
            });
        }
        let ns = self.get_namespace(namespace).await?;
        let decision = decide(&pod, ns.as_ref());
        let facts = PodFacts::of(&pod).ok_or_else(|| K8sError::PodMissing {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })?;
        Ok((decision, facts))
    }

    /// Fresh reads for an enrolled pod before it is released (module docs: never unmesh on doubt).
    pub async fn confirm(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<Confirmed, K8sError> {
        let Some(pod) = self.get_pod(namespace, name).await? else {
            return Ok(Confirmed::Gone);
        };
        if pod.metadata.uid.as_deref() != Some(uid) {
            return Ok(Confirmed::Gone);
        }
        let ns = self.get_namespace(namespace).await?;
        Ok(Confirmed::Exists(decide(&pod, ns.as_ref())))
    }

    async fn get_pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, K8sError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        bounded(format!("pod {namespace}/{name}"), api.get_opt(name)).await
    }

    async fn get_namespace(&self, name: &str) -> Result<Option<Namespace>, K8sError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        bounded(format!("namespace {name}"), api.get_opt(name)).await
    }
}

/// The token file must be readable and hold the token alone: kube sends its bytes verbatim (and
/// re-reads them every minute), so a trailing newline would make every request fail with an
/// invalid header far from its cause.
fn check_token_file(path: &std::path::Path) -> Result<(), K8sError> {
    let err = |reason: String| K8sError::TokenFile {
        path: path.to_owned(),
        reason,
    };
    let token = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    if token.trim().is_empty() {
        return Err(err("it is empty".into()));
    }
    if token.trim() != token {
        return Err(err(
            "the token has leading or trailing whitespace (a final newline?), which would be sent as part of the Authorization header; write it without (printf '%s' TOKEN)".into(),
        ));
    }
    Ok(())
}

async fn bounded<T>(
    what: String,
    request: impl std::future::Future<Output = Result<Option<T>, kube::Error>>,
) -> Result<Option<T>, K8sError> {
    match tokio::time::timeout(GET_TIMEOUT, request).await {
        Ok(Ok(found)) => Ok(found),
        Ok(Err(source)) => Err(K8sError::Get { what, source }),
        Err(_) => Err(K8sError::Timeout { what }),
    }
}

/// One watch into a store, driven by a task: readiness is set at the first complete list, every
/// event wakes the reconciler, and errors are logged (the stream itself retries with backoff;
/// the store keeps its last complete view meanwhile).
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    changed: Arc<Notify>,
) -> (Store<K>, Arc<AtomicBool>, JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let ready = Arc::new(AtomicBool::new(false));
    let stream = reflector::reflector(
        writer,
        watcher(api, config)
            // Managed fields are most of a pod's bytes and none of what we read.
            .map_ok(|event| event.modify(|o| o.managed_fields_mut().clear()))
            .default_backoff(),
    );
    let flag = ready.clone();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        tracing::info!(what, "watching the Kubernetes API works again");
                        failing = false;
                    }
                    if matches!(event, watcher::Event::InitDone) {
                        flag.store(true, Ordering::Release);
                        tracing::info!(what, "Kubernetes API listed");
                    }
                    changed.notify_one();
                }
                Err(e) => {
                    failing = true;
                    tracing::warn!(
                        what,
                        error = %e,
                        "watching the Kubernetes API failed; retrying with backoff (enrolled pods stay meshed meanwhile)"
                    );
                }
            }
        }
    });
    (reader, ready, task)
}
