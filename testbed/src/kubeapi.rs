//! A fake Kubernetes API server for the enrollment tests: plain HTTP/1.1 on a loopback address,
//! speaking the parts of the real protocol that kube-rs' watcher and `Api::get` use, with objects
//! serialized from k8s-openapi types (the real JSON shapes):
//! - `GET /api/v1/pods`, `/api/v1/namespaces/{ns}/pods`, `/api/v1/namespaces`: lists honouring
//!   `fieldSelector` (`metadata.name`, `metadata.namespace`, `spec.nodeName`; `=`, `==`, `!=`),
//!   `labelSelector` (`k=v`, `k!=v`, `k`, `!k`), `limit` and `continue`, with the list's
//!   `resourceVersion`;
//! - the same with `watch=true`: newline-delimited `WatchEvent`s (ADDED, MODIFIED, DELETED, and
//!   BOOKMARK when `allowWatchBookmarks=true`) in a chunked body, starting after the given
//!   `resourceVersion`; one older than the last [`FakeKube::compact`] gets an ERROR event with
//!   a `410 Gone` Status, as from the real server (kube-rs then lists again); the stream
//!   ends after `timeoutSeconds` or when the test calls [`FakeKube::break_watches`];
//! - `GET .../pods/{name}` and `/api/v1/namespaces/{name}`, 404 with a `Status` when absent.
//!
//! The test mutates objects ([`FakeKube::apply_pod`], [`FakeKube::label_namespace`],
//! [`FakeKube::delete_pod`], ...), each change getting the next resourceVersion and a watch event,
//! and can make every request fail ([`Fault`]). It runs on its own thread and runtime, so
//! blocking tests can use it; dropping it stops it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{json, Value};

/// How often an idle watch that asked for bookmarks gets one (the real server: about a minute;
/// short here so the tests exercise them).
const BOOKMARK_INTERVAL: Duration = Duration::from_millis(500);

/// A failure every request gets while it is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// This HTTP status with a `Status` body (e.g. 500, 503, 403).
    Status(u16),
    /// `200 OK` with a body that is not JSON.
    Garbage,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Pod,
    Namespace,
}

struct Logged {
    rv: u64,
    kind: Kind,
    event: &'static str,
    object: Value,
}

#[derive(Default)]
struct ApiState {
    rv: u64,
    /// Watches resuming from before this get 410.
    floor: u64,
    pods: BTreeMap<(String, String), Value>,
    namespaces: BTreeMap<String, Value>,
    log: Vec<Logged>,
    fault: Option<Fault>,
    requests: Vec<String>,
    /// The Authorization header of each request ("" when absent), in order.
    authorizations: Vec<String>,
}

struct Shared {
    state: Mutex<ApiState>,
    /// Bumped on every change, so open watches look at the log again.
    changed: tokio::sync::watch::Sender<u64>,
    /// Bumped by `break_watches`: open watch streams end.
    epoch: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ApiState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running fake; see the module docs.
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeKube {
    /// Listens on `addr` (a loopback address; port 0 picks one).
    pub fn start(addr: &str) -> Result<FakeKube> {
        let listener = std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(ApiState::default()),
            changed: tokio::sync::watch::channel(0).0,
            epoch: tokio::sync::watch::channel(0).0,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-kube-api".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(serve(listener, server, stopped));
            })?;
        Ok(FakeKube {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://ADDR:PORT`, what `--kube-api` takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn change(&self, kind: Kind, event: &'static str, object: Value) {
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        let mut object = object;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        match kind {
            Kind::Pod => {
                let key = (
                    object["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_owned(),
                    object["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
                if event == "DELETED" {
                    st.pods.remove(&key);
                } else {
                    st.pods.insert(key, object.clone());
                }
            }
            Kind::Namespace => {
                let key = object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if event == "DELETED" {
                    st.namespaces.remove(&key);
                } else {
                    st.namespaces.insert(key, object.clone());
                }
            }
        }
        st.log.push(Logged {
            rv,
            kind,
            event,
            object,
        });
        drop(st);
        self.shared.changed.send_modify(|n| *n += 1);
    }

    /// Creates or replaces a namespace with these labels.
    pub fn put_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let exists = self.shared.lock().namespaces.contains_key(name);
        let ns = Namespace {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.to_owned()),
                uid: Some(format!("ns-uid-{name}")),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let event = if exists { "MODIFIED" } else { "ADDED" };
        self.change(Kind::Namespace, event, to_json(&ns));
    }

    /// Sets (`Some`) or removes (`None`) one label of a namespace.
    pub fn label_namespace(&self, name: &str, key: &str, value: Option<&str>) {
        let Some(mut ns) = self.shared.lock().namespaces.get(name).cloned() else {
            panic!("no namespace {name}")
        };
        set_label(&mut ns, key, value);
        self.change(Kind::Namespace, "MODIFIED", ns);
    }

    /// Creates or replaces a pod (ADDED or MODIFIED).
    pub fn apply_pod(&self, pod: &Pod) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let exists = self.shared.lock().pods.contains_key(&(ns, name));
        let event = if exists { "MODIFIED" } else { "ADDED" };
        self.change(Kind::Pod, event, to_json(pod));
    }

    /// Sets (`Some`) or removes (`None`) one label of a pod.
    pub fn label_pod(&self, namespace: &str, name: &str, key: &str, value: Option<&str>) {
        let key_ = (namespace.to_owned(), name.to_owned());
        let Some(mut pod) = self.shared.lock().pods.get(&key_).cloned() else {
            panic!("no pod {namespace}/{name}")
        };
        set_label(&mut pod, key, value);
        self.change(Kind::Pod, "MODIFIED", pod);
    }

    /// Deletes a pod (DELETED, with its last state).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(pod) = self.shared.lock().pods.get(&key).cloned() else {
            panic!("no pod {namespace}/{name}")
        };
        self.change(Kind::Pod, "DELETED", pod);
    }

    /// Every request fails this way from now on (`None`: serve normally again).
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.shared.lock().fault = fault;
        // Open watches notice at their next event.
        self.shared.changed.send_modify(|n| *n += 1);
    }

    /// Forgets the event history and ends every open watch (as an API server restarting after
    /// an etcd compaction does): resuming from any resourceVersion seen so far gets `410 Gone`,
    /// so the client must list again.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        // A revision of its own, so lists from now on return a resourceVersion a watch may start
        // from, while every earlier one is too old.
        st.rv += 1;
        st.floor = st.rv;
        st.log.clear();
        // Under the lock: no stream reads the new revision (for a bookmark) before it is told to
        // end (its select prefers the epoch).
        self.shared.epoch.send_modify(|n| *n += 1);
    }

    /// Ends every open watch stream (as an API server restart or a load balancer would).
    pub fn break_watches(&self) {
        self.shared.epoch.send_modify(|n| *n += 1);
    }

    /// Requests served so far, as `GET /path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// The Authorization header of every request so far ("" when it had none).
    pub fn authorizations(&self) -> Vec<String> {
        self.shared.lock().authorizations.clone()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A pod on `node` with one IP, running, in the shape the API server returns it.
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    ip: &str,
    labels: &[(&str, &str)],
) -> Pod {
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            uid: Some(uid.to_owned()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            service_account_name: Some(format!("{name}-sa")),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            pod_ip: Some(ip.to_owned()),
            pod_ips: Some(vec![PodIP { ip: ip.to_owned() }]),
            ..Default::default()
        }),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("k8s-openapi objects serialize")
}

fn set_label(object: &mut Value, key: &str, value: Option<&str>) {
    let labels = &mut object["metadata"]["labels"];
    if !labels.is_object() {
        *labels = json!({});
    }
    let map = labels.as_object_mut().expect("an object");
    match value {
        Some(v) => {
            map.insert(key.to_owned(), json!(v));
        }
        None => {
            map.remove(key);
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(req, shared).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = conns.join_next() => {}
        }
    }
    conns.shutdown().await;
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()).boxed())
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    full(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body.to_string(),
    )
}

/// The query string as key → value (percent-decoded).
fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `fieldSelector` and `labelSelector` as predicates over an object.
struct Selectors {
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelReq>,
}

enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

impl Selectors {
    fn parse(q: &BTreeMap<String, String>) -> Result<Selectors, String> {
        let mut fields = Vec::new();
        for term in q
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (key, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            if !matches!(
                key,
                "metadata.name" | "metadata.namespace" | "spec.nodeName"
            ) {
                return Err(format!("field label not supported: {key}"));
            }
            fields.push((key.to_owned(), eq, value.to_owned()));
        }
        let mut labels = Vec::new();
        for term in q
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
        {
            labels.push(if let Some((k, v)) = term.split_once("!=") {
                LabelReq::Ne(k.to_owned(), v.to_owned())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelReq::Eq(k.to_owned(), v.to_owned())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelReq::Absent(k.to_owned())
            } else {
                LabelReq::Exists(term.to_owned())
            });
        }
        Ok(Selectors { fields, labels })
    }

    fn matches(&self, o: &Value) -> bool {
        let fields_ok = self.fields.iter().all(|(key, eq, value)| {
            let actual = match key.as_str() {
                "metadata.name" => &o["metadata"]["name"],
                "metadata.namespace" => &o["metadata"]["namespace"],
                _ => &o["spec"]["nodeName"],
            };
            (actual.as_str().unwrap_or_default() == value) == *eq
        });
        let label = |k: &str| o["metadata"]["labels"][k].as_str().map(str::to_owned);
        fields_ok
            && self.labels.iter().all(|r| match r {
                LabelReq::Eq(k, v) => label(k).as_deref() == Some(v.as_str()),
                LabelReq::Ne(k, v) => label(k).as_deref() != Some(v.as_str()),
                LabelReq::Exists(k) => label(k).is_some(),
                LabelReq::Absent(k) => label(k).is_none(),
            })
    }
}

/// Which collection (and namespace) a list/watch path names, or which object a GET names.
enum Route {
    List(Kind, Option<String>),
    GetPod(String, String),
    GetNamespace(String),
}

fn route(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "pods"] => Some(Route::List(Kind::Pod, None)),
        ["api", "v1", "namespaces"] => Some(Route::List(Kind::Namespace, None)),
        ["api", "v1", "namespaces", ns, "pods"] => {
            Some(Route::List(Kind::Pod, Some(ns.to_string())))
        }
        ["api", "v1", "namespaces", ns, "pods", name] => {
            Some(Route::GetPod(ns.to_string(), name.to_string()))
        }
        ["api", "v1", "namespaces", name] => Some(Route::GetNamespace(name.to_string())),
        _ => None,
    }
}

async fn handle(req: Request<hyper::body::Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let q = query(&req);
    let fault = {
        let mut st = shared.lock();
        st.requests.push(format!(
            "{} {}",
            req.method(),
            req.uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        ));
        let auth = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        st.authorizations.push(auth);
        st.fault.clone()
    };
    match fault {
        Some(Fault::Status(code)) => {
            return status(
                code,
                "InternalError",
                "the fake API server was told to fail",
            )
        }
        Some(Fault::Garbage) => return full(StatusCode::OK, "<html>this is not JSON{{{"),
        None => {}
    }
    if req.method() != hyper::Method::GET {
        return status(
            405,
            "MethodNotAllowed",
            "the fake API server only serves GET",
        );
    }
    let Some(route) = route(req.uri().path()) else {
        return status(
            404,
            "NotFound",
            &format!("no route for {}", req.uri().path()),
        );
    };
    match route {
        Route::GetPod(ns, name) => match shared.lock().pods.get(&(ns.clone(), name.clone())) {
            Some(p) => full(StatusCode::OK, p.to_string()),
            None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
        },
        Route::GetNamespace(name) => match shared.lock().namespaces.get(&name) {
            Some(n) => full(StatusCode::OK, n.to_string()),
            None => status(404, "NotFound", &format!("namespaces \"{name}\" not found")),
        },
        Route::List(kind, ns) => {
            let selectors = match Selectors::parse(&q) {
                Ok(s) => s,
                Err(e) => return status(400, "BadRequest", &e),
            };
            let in_ns = move |o: &Value| {
                ns.as_deref()
                    .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
            };
            if q.get("watch").map(String::as_str) == Some("true") {
                watch(kind, q, selectors, in_ns, shared)
            } else {
                list(kind, &q, &selectors, in_ns, &shared)
            }
        }
    }
}

fn list(
    kind: Kind,
    q: &BTreeMap<String, String>,
    selectors: &Selectors,
    in_ns: impl Fn(&Value) -> bool,
    shared: &Shared,
) -> Response<Body> {
    let st = shared.lock();
    let all: Vec<&Value> = match kind {
        Kind::Pod => st.pods.values().collect(),
        Kind::Namespace => st.namespaces.values().collect(),
    };
    let matching: Vec<Value> = all
        .into_iter()
        .filter(|o| in_ns(o) && selectors.matches(o))
        .map(|o| {
            // List items carry no kind/apiVersion in the real API.
            let mut o = o.clone();
            if let Some(map) = o.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            o
        })
        .collect();
    let start: usize = match q.get("continue").filter(|c| !c.is_empty()) {
        None => 0,
        Some(c) => match c.parse() {
            Ok(n) => n,
            Err(_) => return status(400, "BadRequest", &format!("invalid continue token {c:?}")),
        },
    };
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let end = start.saturating_add(limit).min(matching.len());
    let page = matching.get(start..end).unwrap_or_default().to_vec();
    let mut metadata = json!({ "resourceVersion": st.rv.to_string() });
    if end < matching.len() {
        metadata["continue"] = json!(end.to_string());
        metadata["remainingItemCount"] = json!(matching.len() - end);
    }
    let list_kind = match kind {
        Kind::Pod => "PodList",
        Kind::Namespace => "NamespaceList",
    };
    full(
        StatusCode::OK,
        json!({ "kind": list_kind, "apiVersion": "v1", "metadata": metadata, "items": page })
            .to_string(),
    )
}

fn watch(
    kind: Kind,
    q: BTreeMap<String, String>,
    selectors: Selectors,
    in_ns: impl Fn(&Value) -> bool + Send + 'static,
    shared: Arc<Shared>,
) -> Response<Body> {
    let since: u64 = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => shared.lock().rv,
        Some(rv) => match rv.parse() {
            Ok(rv) => rv,
            Err(_) => {
                return status(
                    400,
                    "BadRequest",
                    &format!("invalid resourceVersion {rv:?}"),
                )
            }
        },
    };
    let floor = shared.lock().floor;
    if since < floor {
        // What the real API server does: the watch starts (200), and its one event is an ERROR
        // carrying a 410 Status; the client must list again.
        let line = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
            "message": format!("too old resource version: {since} ({floor})")}});
        return full(StatusCode::OK, format!("{line}\n"));
    }
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let mut changed = shared.changed.subscribe();
    let mut epoch = shared.epoch.subscribe();
    epoch.mark_unchanged();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut sent = since;
        loop {
            changed.mark_unchanged();
            let (lines, fault, rv) = {
                let st = shared.lock();
                let lines: Vec<(u64, Bytes)> = st
                    .log
                    .iter()
                    .filter(|e| e.kind == kind && e.rv > sent)
                    .filter(|e| in_ns(&e.object) && selectors.matches(&e.object))
                    .map(|e| {
                        let line = json!({ "type": e.event, "object": e.object });
                        (e.rv, Bytes::from(format!("{line}\n")))
                    })
                    .collect();
                (lines, st.fault.clone(), st.rv)
            };
            if let Some(fault) = fault {
                let line = match fault {
                    Fault::Garbage => "{\"type\":\"ADDED\",\"object\":not-json\n".to_owned(),
                    Fault::Status(code) => format!(
                        "{}\n",
                        json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                            "status": "Failure", "code": code, "reason": "InternalError",
                            "message": "the fake API server was told to fail"}})
                    ),
                };
                let _ = tx.send(Bytes::from(line)).await;
                return;
            }
            for (rv, line) in lines {
                if tx.send(line).await.is_err() {
                    return;
                }
                sent = rv;
            }
            sent = sent.max(rv);
            tokio::select! {
                biased;
                _ = epoch.changed() => return,
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tokio::time::sleep(BOOKMARK_INTERVAL), if bookmarks => {
                    let kind_name = match kind { Kind::Pod => "Pod", Kind::Namespace => "Namespace" };
                    let line = json!({"type": "BOOKMARK", "object": {"kind": kind_name, "apiVersion": "v1",
                        "metadata": {"resourceVersion": sent.to_string()}}});
                    if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    }));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(body.boxed())
        .expect("response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_and_selectors() {
        assert_eq!(decode("spec.nodeName%3Dnode-1"), "spec.nodeName=node-1");
        assert_eq!(decode("a%2"), "a%2");
        let q = BTreeMap::from([
            ("fieldSelector".to_owned(), "spec.nodeName=n1".to_owned()),
            ("labelSelector".to_owned(), "app=web,!skip".to_owned()),
        ]);
        let s = Selectors::parse(&q).unwrap();
        let p = to_json(&pod(
            "shop",
            "web",
            "u",
            "n1",
            "10.0.0.1",
            &[("app", "web")],
        ));
        assert!(s.matches(&p));
        let other = to_json(&pod(
            "shop",
            "web",
            "u",
            "n2",
            "10.0.0.1",
            &[("app", "web")],
        ));
        assert!(!s.matches(&other));
        let bad = BTreeMap::from([(
            "fieldSelector".to_owned(),
            "status.phase=Running".to_owned(),
        )]);
        assert!(Selectors::parse(&bad).is_err());
    }
}
