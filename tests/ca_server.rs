//! Tier (b): the CA server of a standalone mesh (`zmesh-node ca serve`, docs/model.md
//! "Standalone CA server") with its clients: the node's CA client and certificate manager
//! in-process, and the real binaries for a VM joining with a bootstrap token. Every refusal
//! (token, node authorization, CSR rules) answers its own gRPC code with a message naming the
//! problem, and the server keeps serving after each; idle and slow TLS peers are cut at the
//! handshake deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use zmesh::config::control_plane::{GrpcTarget, TokenSource};
use zmesh::config::Config;
use zmesh::controlplane::ca_server::CaServer;
use zmesh::controlplane::{tokens, ControlPlane, ServeOptions};
use zmesh::grpc::ServerLimits;
use zmesh::identity::caclient::{csr_pem, request, CaClient, IMPERSONATED_IDENTITY};
use zmesh::identity::{
    Authority, CertManager, CertSource, FileCa, ManualClock, SpiffeId, SystemClock, Trust,
    ROOT_CERT_FILE,
};
use zmesh_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use zmesh_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use zmesh_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use zmesh_proto::prost_types::{value::Kind, Struct, Value};
use zmesh_proto::tonic::{self, Code, Status};

const NODE: &str = env!("CARGO_BIN_EXE_zmesh-node");
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// The model: shop/db runs on vm-1, shop/web on vm-2.
fn mesh_yaml(ca_dir: &Path) -> String {
    format!(
        "node:\n  name: control-plane\n  certificates:\n    file_ca: {{ dir: {} }}\nworkloads:\n  - {{ uid: db, name: db, namespace: shop, service_account: db, addresses: [10.1.0.1], node: vm-1 }}\n  - {{ uid: web, name: web, namespace: shop, service_account: web, addresses: [10.1.0.2], node: vm-2 }}\n",
        ca_dir.display()
    )
}

/// A CA server on its own runtime, so tests may call it from blocking code (the CA client
/// makes its own runtime per call).
struct Server {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Server {
    fn start() -> Server {
        Server::start_with(ServerLimits::default())
    }

    fn start_with(limits: ServerLimits) -> Server {
        Server::start_full(limits, false)
    }

    fn start_full(limits: ServerLimits, xds: bool) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        FileCa::init(&ca, "cluster.local").unwrap();
        let mesh = dir.path().join("mesh.yaml");
        std::fs::write(&mesh, mesh_yaml(&ca)).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut opts = ServeOptions::new(ca, mesh, "127.0.0.1:0".parse().unwrap());
        opts.limits = limits;
        opts.xds = xds;
        opts.reload_interval = Duration::from_millis(50);
        let cp = rt.block_on(ControlPlane::bind(opts)).unwrap();
        let addr = cp.local_addr();
        let _guard = rt.enter();
        let router = cp.router();
        rt.spawn(cp.serve(router, std::future::pending()));
        drop(_guard);
        Server {
            dir,
            addr,
            rt: Some(rt),
        }
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    fn token(&self, node: &str) -> String {
        tokens::create(&self.ca_dir(), node).unwrap()
    }

    fn target(&self, token: Option<&str>) -> GrpcTarget {
        GrpcTarget {
            address: format!("https://{}", self.addr),
            root_cert: self.ca_dir().join(ROOT_CERT_FILE),
            server_name: Some("zmesh-ca".into()),
            token: token.map_or(TokenSource::None, |t| TokenSource::Inline(t.into())),
            cluster_id: "Kubernetes".into(),
        }
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
}

fn csr(sans: Vec<SanType>) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(&p256()).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// One raw CreateCertificate call (metadata as the CA client sets it, from `target`).
fn call(target: &GrpcTarget, req: IstioCertificateRequest) -> Result<Vec<String>, Box<Status>> {
    on_channel(target, |channel| async move {
        let mut client = IstioCertificateServiceClient::new(channel);
        let mut req = tonic::Request::new(req);
        zmesh::grpc::authorize(&mut req, target).unwrap();
        Ok(client
            .create_certificate(req)
            .await?
            .into_inner()
            .cert_chain)
    })
}

/// Runs `f` on a channel to `target` (connected as a node connects), on a runtime of its own.
fn on_channel<T, F>(
    target: &GrpcTarget,
    f: impl FnOnce(tonic::transport::Channel) -> F,
) -> Result<T, Box<Status>>
where
    F: std::future::Future<Output = Result<T, Status>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = zmesh::grpc::connect(target, None)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        f(channel).await
    })
    .map_err(Box::new)
}

fn ders(pems: &[String]) -> Vec<CertificateDer<'static>> {
    pems.iter()
        .flat_map(|p| CertificateDer::pem_slice_iter(p.as_bytes()).map(Result::unwrap))
        .collect()
}

#[test]
fn a_node_gets_its_own_workloads_identity_leaf_first_root_last() {
    let server = Server::start();
    let target = server.target(Some(&server.token("vm-1")));
    let key = p256();
    let pem = csr_pem(&id(DB), &key).unwrap();
    let chain = call(&target, request(pem, &id(DB), HOUR, true)).unwrap();
    let chain = ders(&chain);
    assert_eq!(chain.len(), 2, "leaf then root");
    let root = std::fs::read(server.ca_dir().join(ROOT_CERT_FILE)).unwrap();
    let root = CertificateDer::from_pem_slice(&root).unwrap();
    assert_eq!(chain[1], root, "the root comes last");
    assert_eq!(zmesh::identity::peer_identity(&chain[0]).unwrap(), id(DB));
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let (_, root_cert) = x509_parser::parse_x509_certificate(&chain[1]).unwrap();
    leaf.verify_signature(Some(root_cert.public_key()))
        .expect("the root signed the leaf");
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the leaf certifies the CSR's key"
    );
    let curve = leaf.public_key().algorithm.parameters.as_ref().unwrap();
    assert_eq!(
        curve.as_oid().unwrap(),
        x509_parser::oid_registry::OID_EC_P256
    );
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(life, 3600 + 300, "the hour asked for, backdated 5 minutes");
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(sans.value.general_names.len(), 1, "one SAN");

    // More than a day is capped to a day; nothing asked means a day.
    for asked in [30 * 24 * 3600, 0] {
        let mut req = request(csr_pem(&id(DB), &key).unwrap(), &id(DB), HOUR, true);
        req.validity_duration = asked;
        let chain = ders(&call(&target, req).unwrap());
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(life, DAY.as_secs() as i64 + 300, "asked {asked}");
    }

    // The CA client does the same, and keeps the chain it presents (no root).
    let issued = CaClient::new(target, None, true)
        .issue(&id(DB), HOUR, SystemTime::now())
        .unwrap();
    assert_eq!(issued.chain.len(), 1);
    assert_eq!(
        zmesh::identity::peer_identity(&issued.chain[0]).unwrap(),
        id(DB)
    );
}

/// What a recording CA saw of one call.
#[derive(Debug, Clone)]
struct Seen {
    authorization: Option<String>,
    impersonated: Option<String>,
    csr_identity: String,
    csr_sans: usize,
}

/// Records each request, then lets the real CA service answer it.
struct Recorder {
    inner: CaServer,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[tonic::async_trait]
impl IstioCertificateService for Recorder {
    async fn create_certificate(
        &self,
        req: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, Status> {
        let r = req.get_ref();
        let checked = zmesh::identity::check_csr(&r.csr, "cluster.local")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(r.csr.as_bytes())
            .unwrap();
        let (_, parsed) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
                .unwrap();
        let csr_sans = parsed
            .requested_extensions()
            .into_iter()
            .flatten()
            .map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(s) => {
                    s.general_names.len()
                }
                _ => 0,
            })
            .sum();
        self.seen.lock().unwrap().push(Seen {
            authorization: req
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string()),
            impersonated: r
                .metadata
                .as_ref()
                .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
                .and_then(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                }),
            csr_identity: checked.identity.to_string(),
            csr_sans,
        });
        self.inner.create_certificate(req).await
    }
}

use x509_parser::prelude::FromDer;

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_ca_client_sends_impersonated_identity_its_token_and_a_one_san_csr() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    FileCa::init(&ca_dir, "cluster.local").unwrap();
    let token = tokens::create(&ca_dir, "vm-1").unwrap();
    let ca = Arc::new(FileCa::load(&ca_dir).unwrap());
    let mesh = Config::parse(&mesh_yaml(&ca_dir), "mesh").unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(mesh));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder {
        inner: CaServer::new(
            ca.clone(),
            Arc::new(tokens::NodeTokens::new(&ca_dir)),
            rx,
            Arc::new(SystemClock),
        ),
        seen: seen.clone(),
    };
    let issued = ca
        .issue_server_at(&["zmesh-ca".to_string()], HOUR, SystemTime::now())
        .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(zmesh::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(issued.chain, issued.key)
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(recorder))
            .serve_with_incoming(zmesh::grpc::incoming(
                listener,
                Arc::new(tls),
                ServerLimits::default(),
            )),
    );
    let target = GrpcTarget {
        address: format!("https://{addr}"),
        root_cert: ca_dir.join(ROOT_CERT_FILE),
        server_name: Some("zmesh-ca".into()),
        token: TokenSource::Inline(token.clone()),
        cluster_id: "Kubernetes".into(),
    };
    let issued = tokio::task::spawn_blocking(move || {
        CaClient::new(target, None, true).issue(&id(DB), HOUR, SystemTime::now())
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        zmesh::identity::peer_identity(&issued.chain[0]).unwrap(),
        id(DB)
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].impersonated.as_deref(), Some(DB));
    assert_eq!(seen[0].csr_identity, DB);
    assert_eq!(seen[0].csr_sans, 1);
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {token}").as_str())
    );
}

/// The request the CA client would send for `id`, with `metadata_id` as ImpersonatedIdentity.
fn request_for(csr: String, metadata_id: Option<&str>) -> IstioCertificateRequest {
    let mut fields = std::collections::BTreeMap::new();
    if let Some(m) = metadata_id {
        fields.insert(
            IMPERSONATED_IDENTITY.to_string(),
            Value {
                kind: Some(Kind::StringValue(m.into())),
            },
        );
    }
    IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata: Some(Struct { fields }),
    }
}

#[test]
fn every_refusal_has_its_code_and_names_the_problem_and_the_server_keeps_serving() {
    let server = Server::start();
    let vm1 = server.token("vm-1");
    let revoked = server.token("vm-9");
    tokens::revoke(&server.ca_dir(), "vm-9").unwrap();
    let good = server.target(Some(&vm1));
    let good_req = || request_for(csr(vec![uri(DB)]), Some(DB));
    let big = format!("{}{}", csr(vec![uri(DB)]), " ".repeat(17 * 1024));
    #[rustfmt::skip]
    let cases: Vec<(&str, GrpcTarget, IstioCertificateRequest, Code, Vec<&str>)> = vec![
        ("another node's workload", good.clone(), request_for(csr(vec![uri(WEB)]), Some(WEB)),
            Code::PermissionDenied, vec![WEB, "node vm-1"]),
        ("an identity not in the model", good.clone(),
            request_for(csr(vec![uri("spiffe://cluster.local/ns/shop/sa/ghost")]), None),
            Code::PermissionDenied, vec!["shop/sa/ghost", "node vm-1"]),
        ("no token", server.target(None), good_req(), Code::Unauthenticated,
            vec!["no `authorization: Bearer"]),
        ("a wrong token", server.target(Some("not-a-token")), good_req(),
            Code::Unauthenticated, vec!["not a node token"]),
        ("a revoked token", server.target(Some(&revoked)), good_req(),
            Code::Unauthenticated, vec!["not a node token"]),
        ("CSR SAN differs from ImpersonatedIdentity", good.clone(),
            request_for(csr(vec![uri(DB)]), Some(WEB)),
            Code::InvalidArgument, vec![DB, WEB, IMPERSONATED_IDENTITY]),
        ("two SANs", good.clone(), request_for(csr(vec![uri(DB), uri(DB)]), None),
            Code::InvalidArgument, vec!["exactly one subject alternative name", "it has 2"]),
        ("a DNS SAN", good.clone(),
            request_for(csr(vec![SanType::DnsName("db.shop".try_into().unwrap())]), None),
            Code::InvalidArgument, vec!["must be a URI", "db.shop"]),
        ("another trust domain", good.clone(),
            request_for(csr(vec![uri("spiffe://evil.example/ns/shop/sa/db")]), None),
            Code::InvalidArgument, vec!["outside this CA's trust domain cluster.local"]),
        ("an oversized CSR", good.clone(), request_for(big, Some(DB)),
            Code::InvalidArgument, vec!["the limit is 16384"]),
        ("garbage", good.clone(), request_for("garbage".into(), Some(DB)),
            Code::InvalidArgument, vec!["not one PEM CERTIFICATE REQUEST block"]),
        ("a message past the size cap", good.clone(),
            request_for("x".repeat(200 * 1024), Some(DB)),
            Code::OutOfRange, vec!["message length too large"]),
    ];
    for (what, target, req, code, words) in cases {
        let status = call(&target, req).expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        for w in words {
            assert!(
                status.message().contains(w),
                "{what}: {:?} lacks {w:?}",
                status.message()
            );
        }
        // Still serving, to the same node and connection settings.
        let chain = call(&good, good_req()).unwrap_or_else(|e| panic!("after {what}: {e:?}"));
        assert_eq!(
            zmesh::identity::peer_identity(&ders(&chain)[0]).unwrap(),
            id(DB)
        );
    }
    // A token never shows up in what the server answers.
    let status = call(&server.target(Some("secret-guess-123")), good_req()).unwrap_err();
    assert!(!status.message().contains("secret-guess-123"));
}

#[test]
fn moving_a_workload_in_the_mesh_file_moves_who_may_have_its_identity() {
    let server = Server::start();
    let vm1 = server.target(Some(&server.token("vm-1")));
    let vm2 = server.target(Some(&server.token("vm-2")));
    let req = || request_for(csr(vec![uri(DB)]), Some(DB));
    assert!(call(&vm1, req()).is_ok());
    assert_eq!(
        call(&vm2, req()).unwrap_err().code(),
        Code::PermissionDenied
    );
    let mesh = server.dir.path().join("mesh.yaml");
    let moved = mesh_yaml(&server.ca_dir()).replace(
        "addresses: [10.1.0.1], node: vm-1",
        "addresses: [10.1.0.1], node: vm-2",
    );
    std::fs::write(&mesh, moved).unwrap();
    // The watcher polls every 50 ms; allow it generously, without depending on its speed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&vm2, req()).is_err() {
        assert!(Instant::now() < deadline, "the reload was not picked up");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        call(&vm1, req()).unwrap_err().code(),
        Code::PermissionDenied
    );
    // A broken file is refused and the last good model stays (several watch intervals).
    std::fs::write(&mesh, "node: [").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(call(&vm2, req()).is_ok());
    // The watcher survived it: the next good file is applied.
    std::fs::write(&mesh, mesh_yaml(&server.ca_dir())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&vm1, req()).is_err() {
        assert!(
            Instant::now() < deadline,
            "the reload after a broken file was not picked up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        call(&vm2, req()).unwrap_err().code(),
        Code::PermissionDenied
    );
}

#[test]
fn a_cert_manager_renews_from_the_ca_server_past_half_life() {
    // CertSource::ca_client marks its sockets (SO_MARK needs CAP_NET_ADMIN).
    zmesh_testbed::require_root();
    let server = Server::start();
    let target = server.target(Some(&server.token("vm-1")));
    let clock = ManualClock::new();
    let roots = zmesh::identity::load_certs_pem(&target.root_cert).unwrap();
    let trust = Trust::new(&roots, Vec::new(), zmesh::tls::provider(), clock.clone()).unwrap();
    let manager = CertManager::with_trust(CertSource::ca_client(target, DAY, true), trust).unwrap();
    let first = manager.fetch(&id(DB)).unwrap();
    clock.advance(HOUR);
    assert_eq!(
        manager.fetch(&id(DB)).unwrap().serial,
        first.serial,
        "cached"
    );
    clock.advance(12 * HOUR);
    let renewed = manager.fetch(&id(DB)).unwrap();
    assert_ne!(renewed.serial, first.serial, "re-issued past half-life");
    assert_eq!(renewed.identity, id(DB));
    // Another node's workload is refused through the manager as well.
    let e = manager.fetch(&id(WEB)).err().expect("refused").to_string();
    assert!(e.contains("PermissionDenied") && e.contains("vm-1"), "{e}");
}

/// Opens a TCP connection and returns how long until the server closes it.
fn time_to_close(mut s: std::net::TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return start.elapsed(),
            Ok(_) => {}
        }
        assert!(start.elapsed() < limit, "not closed within {limit:?}");
    }
}

#[test]
fn idle_and_slow_tls_peers_are_cut_at_the_handshake_deadline() {
    const DEADLINE: Duration = Duration::from_millis(500);
    let server = Server::start_with(ServerLimits {
        handshake_timeout: DEADLINE,
        max_connections: 6,
        max_per_source: 64,
    });
    let good = server.target(Some(&server.token("vm-1")));
    let req = || request_for(csr(vec![uri(DB)]), Some(DB));
    let connect = || std::net::TcpStream::connect(server.addr).unwrap();
    // Four peers that say nothing, one that starts a ClientHello and stalls.
    let mut idle: Vec<_> = (0..4).map(|_| connect()).collect();
    let mut slow = connect();
    slow.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    idle.push(slow);
    // Below the cap, an honest node is served meanwhile.
    assert!(call(&good, req()).is_ok());
    for s in idle {
        let took = time_to_close(s, Duration::from_secs(10));
        assert!(took < Duration::from_secs(5), "cut after {took:?}");
    }
    // At the cap, new connections are closed at once; once the squatters hit the deadline,
    // the server takes calls again.
    let squatters: Vec<_> = (0..6).map(|_| connect()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let refused = time_to_close(connect(), Duration::from_secs(10));
    assert!(refused < DEADLINE, "closed at accept, took {refused:?}");
    for s in squatters {
        time_to_close(s, Duration::from_secs(10));
    }
    assert!(call(&good, req()).is_ok());
}

#[test]
fn one_source_cannot_take_every_connection() {
    let server = Server::start_with(ServerLimits {
        handshake_timeout: Duration::from_secs(10),
        max_connections: 100,
        max_per_source: 3,
    });
    let from = |src: [u8; 4]| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&std::net::SocketAddr::from((src, 0)).into())
            .unwrap();
        s.connect(&server.addr.into()).unwrap();
        std::net::TcpStream::from(s)
    };
    let _squat: Vec<_> = (0..3).map(|_| from([127, 0, 0, 1])).collect();
    std::thread::sleep(Duration::from_millis(100));
    // The fourth from the same host is closed at accept...
    let refused = time_to_close(from([127, 0, 0, 1]), Duration::from_secs(5));
    assert!(refused < Duration::from_secs(1), "took {refused:?}");
    // ...while another host still gets a connection (held open, waiting for its handshake).
    let mut other = from([127, 0, 0, 2]);
    other
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let r = other.read(&mut [0u8; 1]);
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "another source was not served: {r:?}"
    );
}

/// A child process killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str]) -> String {
    let out = std::process::Command::new(NODE)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "zmesh-node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn a_vm_joins_with_a_token_and_gets_its_identity_from_the_ca_server() {
    // The joined node's CA client marks its sockets (SO_MARK needs CAP_NET_ADMIN).
    zmesh_testbed::require_root();
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let ca = p("ca");
    run(&["ca", "init", "--dir", &s(&ca)]);
    let token = run(&["ca", "token", "--dir", &s(&ca), "--node", "vm-test"]);
    let token = token.trim();
    assert_eq!(token.len(), 43, "{token}");
    let stored = std::fs::read_to_string(ca.join(tokens::TOKENS_FILE)).unwrap();
    assert!(!stored.contains(token), "the CA dir keeps only the hash");
    let token_file = p("join-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mesh = p("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml(&ca).replace("node: vm-1", "node: vm-test")).unwrap();

    let mut child = std::process::Command::new(NODE)
        .args(["ca", "serve", "--dir", &s(&ca), "--mesh", &s(&mesh)])
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Child(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_string();

    let (etc, units) = (p("etc"), p("units"));
    let out = run(&[
        "join",
        "--identity",
        "shop/db",
        "--name",
        "vm-test",
        "--address",
        "10.1.0.1",
        "--ca-address",
        &format!("https://{addr}"),
        "--ca-root",
        &s(&ca.join(ROOT_CERT_FILE)),
        "--join-token-file",
        &s(&token_file),
        "--config-dir",
        &s(&etc),
        "--unit-dir",
        &s(&units),
        "--redirect-bin",
        "/bin/true",
        "--no-systemctl",
    ]);
    assert!(out.contains("node.yaml"), "{out}");
    // No CA key, and no private key at all, on the node.
    let mut files = Vec::new();
    files_under(&etc, &mut files);
    for f in &files {
        assert_ne!(f.file_name().unwrap(), "ca-key.pem");
        let body = std::fs::read_to_string(f).unwrap();
        assert!(!body.contains("PRIVATE KEY"), "{}", f.display());
    }
    let cfg = Config::load(&etc.join("node.yaml")).unwrap();
    let clock: Arc<dyn zmesh::identity::Clock> = Arc::new(SystemClock);
    let (source, trust) = zmesh::proxy::load_certificates(&cfg, clock).unwrap();
    let manager = CertManager::with_trust(source, trust).unwrap();
    let cert = manager.fetch(&id(DB)).unwrap();
    assert_eq!(cert.identity, id(DB));
    // The node's token does not reach another node's identity.
    let e = manager.fetch(&id(WEB)).err().expect("refused").to_string();
    assert!(e.contains("PermissionDenied"), "{e}");
    drop(server);
}

/// Join refuses CA-server arguments that cannot work, naming them.
#[test]
fn join_refuses_a_broken_ca_server_setup() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    run(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    let root = ca.join(ROOT_CERT_FILE);
    let empty = tmp.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let base = |extra: &[&str]| {
        let mut args = vec![
            "join",
            "--identity",
            "shop/db",
            "--name",
            "vm-x",
            "--address",
            "10.1.0.1",
            "--no-systemctl",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let etc = tmp.path().join("etc");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            base(&[
                "--ca-address",
                "https://ca:15012",
                "--ca-root",
                root.to_str().unwrap(),
            ]),
            "needs --join-token-file",
        ),
        (
            base(&[
                "--ca-address",
                "https://ca:15012",
                "--ca-root",
                root.to_str().unwrap(),
                "--join-token-file",
                empty.to_str().unwrap(),
            ]),
            "empty",
        ),
        (
            base(&[
                "--ca-address",
                "http://ca:15012",
                "--ca-root",
                root.to_str().unwrap(),
                "--join-token",
                "t",
            ]),
            "https://",
        ),
        (base(&["--ca-address", "https://ca:15012"]), "--ca-root"),
    ];
    for (mut args, want) in cases {
        args.extend(["--config-dir".into(), etc.to_str().unwrap().into()]);
        let out = std::process::Command::new(NODE)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(!etc.exists(), "nothing written");
}

/// `ca token` and `ca serve` refuse what cannot work, naming it, before serving anything.
#[test]
fn ca_token_and_ca_serve_refuse_broken_input() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    run(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    let mesh = tmp.path().join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml(&ca)).unwrap();
    let fails = |args: &[&str], want: &str| {
        let out = std::process::Command::new(NODE)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
    };
    let ca_s = ca.to_str().unwrap();
    let mesh_s = mesh.to_str().unwrap();
    fails(
        &["ca", "token", "--dir", ca_s, "--node", "a b"],
        "node name",
    );
    let listen = ["--listen", "127.0.0.1:0"];
    let serve = |extra: &[&str]| {
        let mut v = vec!["ca", "serve"];
        v.extend_from_slice(extra);
        v.extend_from_slice(&listen);
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let missing = tmp.path().join("none.yaml");
    let args = serve(&["--dir", ca_s, "--mesh", missing.to_str().unwrap()]);
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "none.yaml",
    );
    let not_ca = tmp.path().join("empty");
    std::fs::create_dir(&not_ca).unwrap();
    let args = serve(&["--dir", not_ca.to_str().unwrap(), "--mesh", mesh_s]);
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "ca-cert.pem",
    );
    run(&["ca", "token", "--dir", ca_s, "--node", "vm-1"]);
    let store = ca.join(tokens::TOKENS_FILE);
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o644)).unwrap();
    let args = serve(&["--dir", ca_s, "--mesh", mesh_s]);
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "chmod 600",
    );
}

/// Opens a delta ADS stream with `target`'s headers and returns the type URLs of the first two
/// responses, or the status the server refused the stream with.
fn xds_types(target: &GrpcTarget) -> Result<Vec<String>, Box<Status>> {
    use zmesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use zmesh_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    on_channel(target, |channel| async move {
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let reqs: Vec<DeltaDiscoveryRequest> = [
            zmesh_proto::type_url::ADDRESS,
            zmesh_proto::type_url::AUTHORIZATION,
        ]
        .into_iter()
        .map(|t| DeltaDiscoveryRequest {
            type_url: t.into(),
            ..Default::default()
        })
        .collect();
        // Keep the request stream open while the answers come.
        let outbound = futures_util::StreamExt::chain(
            futures_util::stream::iter(reqs),
            futures_util::stream::pending(),
        );
        let mut req = tonic::Request::new(outbound);
        zmesh::grpc::authorize(&mut req, target).unwrap();
        let mut inbound = client.delta_aggregated_resources(req).await?.into_inner();
        let mut types = Vec::new();
        while types.len() < 2 {
            let r = inbound.message().await?.expect("a response");
            types.push(r.type_url);
        }
        Ok(types)
    })
}

#[test]
fn xds_streams_open_only_for_node_tokens() {
    let server = Server::start_full(ServerLimits::default(), true);
    for (token, why) in [
        (None, "no `authorization"),
        (Some("not-a-token"), "not a node token"),
    ] {
        let e = xds_types(&server.target(token)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains(why), "{e:?}");
    }
    let t = server.token("vm-1");
    let mut types = xds_types(&server.target(Some(&t))).unwrap();
    types.sort();
    assert_eq!(
        types,
        [
            zmesh_proto::type_url::AUTHORIZATION,
            zmesh_proto::type_url::ADDRESS
        ]
    );
    // Without --xds the service is not there at all.
    let plain = Server::start();
    let t = plain.token("vm-1");
    let e = xds_types(&plain.target(Some(&t))).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
}
