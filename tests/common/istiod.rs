//! A fake istiod for tier (b): a real tonic server over TLS speaking delta ADS and Istio's
//! `CreateCertificate`, driven step by step by the test. It never answers on its own: the test
//! sees each request the node sends (with its `authorization` and `clusterid` headers), pushes
//! responses, breaks streams, stops and restarts. Its CA signs what it is asked (as istiod signs
//! for an authorized node) and records each CSR and its `ImpersonatedIdentity`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio::sync::{mpsc, Notify};
use zmesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use zmesh_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use zmesh_proto::istio::security as sec;
use zmesh_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use zmesh_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use zmesh_proto::istio::workload as wl;
use zmesh_proto::prost::Message;
use zmesh_proto::prost_types::Any;
use zmesh_proto::tonic::{self, Request, Response, Status, Streaming};
use zmesh_proto::type_url::{ADDRESS, AUTHORIZATION};

/// The TLS name the fake's serving certificate holds.
pub const SERVER_NAME: &str = "istiod.test";

/// One request a node sent, with the headers of its stream.
#[derive(Debug, Clone)]
pub struct Seen {
    pub stream: usize,
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
    pub req: DeltaDiscoveryRequest,
}

#[derive(Debug, Clone)]
pub struct SeenCsr {
    pub authorization: Option<String>,
    pub impersonated: Option<String>,
    pub csr: String,
}

type Out = mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>;

struct Inner {
    requests: Mutex<Vec<Seen>>,
    csrs: Mutex<Vec<SeenCsr>>,
    changed: Notify,
    /// Open streams by number; `push` goes to the newest.
    outs: Mutex<std::collections::BTreeMap<usize, Out>>,
    streams: AtomicUsize,
    nonce: AtomicU64,
    issuer: rcgen::Certificate,
    issuer_key: KeyPair,
}

pub struct FakeIstiod {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The mesh root (signs the server and every workload certificate).
    pub root: PathBuf,
    pub token: PathBuf,
    inner: Arc<Inner>,
    tls: Arc<rustls::ServerConfig>,
    server: Option<tokio::task::JoinHandle<()>>,
}

fn pem_file(dir: &std::path::Path, name: &str, pem: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p
}

impl FakeIstiod {
    /// Starts on 127.0.0.1 (a free port) with a fresh root and a token file.
    pub async fn start() -> FakeIstiod {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        FakeIstiod::start_on(l).await
    }

    /// Starts on `listener` (bound in whichever network namespace the node will reach it from).
    pub async fn start_on(listener: std::net::TcpListener) -> FakeIstiod {
        let dir = tempfile::tempdir().unwrap();
        let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::OrganizationName, "fake istiod");
        let issuer = ca.self_signed(&issuer_key).unwrap();
        let root = pem_file(dir.path(), "root-cert.pem", &issuer.pem());
        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let server = CertificateParams::new(vec![SERVER_NAME.to_string()])
            .unwrap()
            .signed_by(&server_key, &issuer, &issuer_key)
            .unwrap();
        let cert = pem_file(dir.path(), "server.pem", &server.pem());
        let key = pem_file(dir.path(), "server-key.pem", &server_key.serialize_pem());
        let token = pem_file(dir.path(), "istio-token", "token-one\n");
        let tls = Arc::new(zmesh::grpc::server_tls(&cert, &key).unwrap());
        // The server key is only needed to build the TLS config.
        std::fs::remove_file(&key).unwrap();
        let inner = Arc::new(Inner {
            requests: Mutex::new(Vec::new()),
            csrs: Mutex::new(Vec::new()),
            changed: Notify::new(),
            outs: Mutex::new(Default::default()),
            streams: AtomicUsize::new(0),
            nonce: AtomicU64::new(0),
            issuer,
            issuer_key,
        });
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut f = FakeIstiod {
            addr,
            dir,
            root,
            token,
            inner,
            tls,
            server: None,
        };
        f.serve(listener);
        f
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let incoming = zmesh::grpc::incoming(listener, self.tls.clone(), Default::default());
        let svc = Svc(self.inner.clone());
        self.server = Some(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(svc.clone()))
                .add_service(IstioCertificateServiceServer::new(svc))
                .serve_with_incoming(incoming)
                .await;
        }));
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The `node.control_plane` and `node.certificates` YAML for a node using this fake.
    pub fn node_settings(&self) -> String {
        format!(
            "  control_plane:\n    address: {url}\n    root_cert: {root}\n    server_name: {SERVER_NAME}\n    token_file: {token}\n    cluster_id: test-cluster\n    pod_name: ztunnel-x\n    pod_namespace: istio-system\n    instance_ip: 10.9.9.9\n  certificates:\n    ca_client: {{ ttl: 1h }}\n",
            url = self.url(),
            root = self.root.display(),
            token = self.token.display(),
        )
    }

    /// Stops serving: the listener closes and open streams end (an unreachable istiod).
    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
        self.outs().clear();
    }

    /// Serves again on the same address.
    pub async fn restart(&mut self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    fn outs(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<usize, Out>> {
        self.inner.outs.lock().unwrap()
    }

    /// Sends a response on the newest open stream; returns its nonce.
    pub fn push(&self, type_url: &str, resources: Vec<Resource>, removed: Vec<String>) -> String {
        let newest = *self.outs().keys().last().expect("no open stream");
        self.push_to(newest, type_url, resources, removed)
    }

    /// Sends a response on stream `stream`; returns its nonce.
    pub fn push_to(
        &self,
        stream: usize,
        type_url: &str,
        resources: Vec<Resource>,
        removed: Vec<String>,
    ) -> String {
        let nonce = format!("n{}", self.inner.nonce.fetch_add(1, Ordering::Relaxed));
        let resp = DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources,
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            removed_resources: removed,
        };
        let outs = self.outs();
        outs.get(&stream)
            .expect("no such stream")
            .send(Ok(resp))
            .expect("stream gone");
        nonce
    }

    /// Ends the newest stream with an error (istiod restarting, a proxy cutting it).
    pub fn break_stream(&self) {
        if let Some((_, out)) = self.outs().pop_last() {
            let _ = out.send(Err(Status::unavailable("fake istiod: stream broken")));
        }
    }

    pub fn streams(&self) -> usize {
        self.inner.streams.load(Ordering::Acquire)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.inner.requests.lock().unwrap().clone()
    }

    pub fn csrs(&self) -> Vec<SeenCsr> {
        self.inner.csrs.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) for a request matching `pred` and returns it.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.inner.changed.notified();
            if let Some(s) = self.requests().into_iter().find(|s| pred(s)) {
                return s;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "fake istiod: timed out waiting for {what}; saw {:#?}",
                self.requests()
            );
        }
    }

    /// Waits for the first request of `type_url` on stream `stream` (1-based).
    pub async fn subscribed(&self, stream: usize, type_url: &str) -> Seen {
        let t = type_url.to_string();
        self.wait_for(
            &format!("stream {stream} to subscribe to {type_url}"),
            |s| s.stream == stream && s.req.type_url == t && s.req.response_nonce.is_empty(),
        )
        .await
    }

    /// Waits for the answer (ACK or NACK) to `nonce`.
    pub async fn answer(&self, nonce: &str) -> DeltaDiscoveryRequest {
        let n = nonce.to_string();
        self.wait_for(&format!("the answer to {nonce}"), |s| {
            s.req.response_nonce == n
        })
        .await
        .req
    }
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Clone)]
struct Svc(Arc<Inner>);

fn header<T>(req: &Request<T>, name: &str) -> Option<String> {
    req.metadata()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Svc {
    type DeltaAggregatedResourcesStream =
        Pin<Box<dyn futures_util::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let stream = self.0.streams.fetch_add(1, Ordering::AcqRel) + 1;
        let authorization = header(&req, "authorization");
        let cluster_id = header(&req, "clusterid");
        let (tx, rx) = mpsc::unbounded_channel();
        self.0.outs.lock().unwrap().insert(stream, tx);
        let inner = self.0.clone();
        let mut incoming = req.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(r)) = incoming.message().await {
                inner.requests.lock().unwrap().push(Seen {
                    stream,
                    authorization: authorization.clone(),
                    cluster_id: cluster_id.clone(),
                    req: r,
                });
                inner.changed.notify_waiters();
            }
        });
        let out =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
            );
        Ok(Response::new(Box::pin(out)))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Svc {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let authorization = header(&req, "authorization");
        let r = req.into_inner();
        let impersonated = r.metadata.as_ref().and_then(|m| {
            match m.fields.get("ImpersonatedIdentity")?.kind.as_ref()? {
                zmesh_proto::prost_types::value::Kind::StringValue(s) => Some(s.clone()),
                _ => None,
            }
        });
        self.0.csrs.lock().unwrap().push(SeenCsr {
            authorization,
            impersonated,
            csr: r.csr.clone(),
        });
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(&r.csr)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - time::Duration::minutes(5);
        csr.params.not_after = now + time::Duration::seconds(r.validity_duration.max(60));
        csr.params.serial_number = Some(rcgen::SerialNumber::from_slice(
            &rand::random::<[u8; 8]>().map(|b| b & 0x7f),
        ));
        let leaf = csr
            .signed_by(&self.0.issuer, &self.0.issuer_key)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf.pem(), self.0.issuer.pem()],
        }))
    }
}

/// A resource as istiod sends it: named, versioned, the message in an Any of `type_url`.
pub fn resource(name: &str, version: &str, type_url: &str, msg: &impl Message) -> Resource {
    Resource {
        name: name.to_string(),
        version: version.to_string(),
        resource: Some(Any {
            type_url: type_url.to_string(),
            value: msg.encode_to_vec(),
        }),
        ..Default::default()
    }
}

/// A workload on `node` at `ip`, with service account `sa` in namespace `default`.
pub fn workload(uid: &str, sa: &str, ip: std::net::IpAddr, node: &str) -> wl::Workload {
    let addr = match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    wl::Workload {
        uid: uid.to_string(),
        name: uid.to_string(),
        namespace: "default".into(),
        addresses: vec![addr],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        service_account: sa.to_string(),
        node: node.to_string(),
        ..Default::default()
    }
}

pub fn address_resource(w: &wl::Workload, version: &str) -> Resource {
    let a = wl::Address {
        r#type: Some(wl::address::Type::Workload(w.clone())),
    };
    resource(&w.uid, version, ADDRESS, &a)
}

pub fn service_resource(s: &wl::Service, version: &str) -> Resource {
    let a = wl::Address {
        r#type: Some(wl::address::Type::Service(s.clone())),
    };
    resource(
        &format!("{}/{}", s.namespace, s.hostname),
        version,
        ADDRESS,
        &a,
    )
}

/// A namespace-scoped policy in `default` matching one exact principal (written without the
/// `spiffe://` scheme, as istiod writes it).
pub fn principal_policy(name: &str, action: sec::Action, principal: &str) -> sec::Authorization {
    sec::Authorization {
        name: name.to_string(),
        namespace: "default".into(),
        scope: sec::Scope::Namespace as i32,
        action: action as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    principals: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Exact(
                            principal.to_string(),
                        )),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

pub fn policy_resource(p: &sec::Authorization, version: &str) -> Resource {
    resource(
        &format!("{}/{}", p.namespace, p.name),
        version,
        AUTHORIZATION,
        p,
    )
}
