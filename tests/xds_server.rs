//! Tier (b): the standalone xDS server (`zmesh::controlplane::xds_server`) in a real tonic server
//! on 127.0.0.1, spoken to by a raw delta ADS client: the subscription, ACK and NACK, a pushed
//! delta after the mesh file changes, a reconnect that resumes from the versions the client
//! holds, and requests the server must refuse.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use zmesh::config::Config;
use zmesh::controlplane::xds_server;
use zmesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use zmesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use zmesh_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node,
};
use zmesh_proto::google::rpc;
use zmesh_proto::istio::workload as wl;
use zmesh_proto::prost::Message;
use zmesh_proto::tonic::{self, Streaming};
use zmesh_proto::type_url::{ADDRESS, AUTHORIZATION};

/// Generous: a response is due at once; this only bounds a broken test.
const WAIT: Duration = Duration::from_secs(10);

const MESH: &str = r#"
node: { name: cp, certificates: { file_ca: { dir: /tmp/ca } } }
workloads:
  - { uid: w1, name: one, namespace: d, addresses: [10.0.0.1], node: n1, services: { d/s: { 80: 8080 } } }
  - { uid: w2, name: two, namespace: d, addresses: [10.0.0.2], node: n2 }
services:
  - { name: s, namespace: d, hostname: s, vips: [10.96.0.1], ports: { 80: 8080 } }
"#;

fn mesh(text: &str) -> Arc<Config> {
    Arc::new(Config::parse(text, "mesh.yaml").unwrap())
}

/// The server on an ephemeral port; it runs until the test's runtime ends.
async fn start(rx: watch::Receiver<Arc<Config>>) -> SocketAddr {
    serve(xds_server::service(rx)).await
}

async fn serve(svc: AggregatedDiscoveryServiceServer<xds_server::XdsServer>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = futures_util::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    addr
}

/// One delta ADS stream, driven by the test.
struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client::try_connect(addr).await.unwrap()
    }

    /// A new stream; `Err` is the status the server refused it with.
    async fn try_connect(addr: SocketAddr) -> Result<Client, tonic::Status> {
        let mut c = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let requests =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
            );
        let rx = c.delta_aggregated_resources(requests).await?.into_inner();
        Ok(Client { tx, rx })
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn subscribe(&self, type_url: &str, held: &[(String, String)]) {
        self.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "ztunnel~10.0.0.9~ztunnel-x.istio-system~istio-system.svc.cluster.local".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            initial_resource_versions: held.iter().cloned().collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> Result<DeltaDiscoveryResponse, tonic::Status> {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no response from the xDS server")
            .map(|r| r.expect("stream ended without a status"))
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|x| x.name.as_str()).collect()
}

fn versions(r: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
    r.resources
        .iter()
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_ack_push_and_resume() {
    let (mesh_tx, mesh_rx) = watch::channel(mesh(MESH));
    let addr = start(mesh_rx).await;
    let mut c = Client::connect(addr).await;

    // Both types on one stream: every address, and an empty answer for the empty type.
    c.subscribe(ADDRESS, &[]).await;
    c.subscribe(AUTHORIZATION, &[]).await;
    let addresses = c.recv().await.unwrap();
    assert_eq!(addresses.type_url, ADDRESS);
    assert_eq!(names(&addresses), ["d/s", "w1", "w2"]);
    assert!(addresses.removed_resources.is_empty());
    let authz = c.recv().await.unwrap();
    assert_eq!(authz.type_url, AUTHORIZATION);
    assert!(authz.resources.is_empty() && authz.removed_resources.is_empty());
    assert_ne!(addresses.nonce, authz.nonce);
    let r = &addresses.resources[1];
    let any = r.resource.as_ref().unwrap();
    assert_eq!(any.type_url, ADDRESS);
    let Some(wl::address::Type::Workload(w1)) =
        wl::Address::decode(any.value.as_slice()).unwrap().r#type
    else {
        panic!("w1 is not a workload")
    };
    assert_eq!(w1.addresses, vec![vec![10, 0, 0, 1]]);

    // ACKs and a NACK are taken without an answer: the next response is the one a later
    // on-demand request asks for (requests are handled in order).
    c.ack(&addresses).await;
    c.ack(&authz).await;
    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        response_nonce: addresses.nonce.clone(),
        error_detail: Some(rpc::Status {
            code: tonic::Code::InvalidArgument as i32,
            message: "client could not apply w2".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        resource_names_subscribe: vec!["probe".into()],
        ..Default::default()
    })
    .await;
    let probe = c.recv().await.unwrap();
    assert_eq!(probe.removed_resources, ["probe"]);
    assert!(probe.resources.is_empty());
    c.ack(&probe).await;

    // The mesh file changes: w1 edited, w2 gone, a policy appears. Only that is pushed.
    let changed = MESH.replace("node: n1,", "node: n3,").replace(
        "  - { uid: w2, name: two, namespace: d, addresses: [10.0.0.2], node: n2 }\n",
        "",
    ) + "policies:\n  - { name: p, namespace: d, action: deny }\n";
    mesh_tx.send(mesh(&changed)).unwrap();
    let delta = c.recv().await.unwrap();
    assert_eq!(delta.type_url, ADDRESS);
    assert_eq!(names(&delta), ["w1"]);
    assert_eq!(delta.removed_resources, ["w2"]);
    let policy = c.recv().await.unwrap();
    assert_eq!(policy.type_url, AUTHORIZATION);
    assert_eq!(names(&policy), ["d/p"]);
    c.ack(&delta).await;
    c.ack(&policy).await;
    let mut held_addresses = versions(&addresses);
    held_addresses.retain(|(n, _)| n != "w2" && n != "w1");
    held_addresses.extend(versions(&delta));
    let held_policies = versions(&policy);
    drop(c);

    // While the client is away the service goes. Reconnecting with what it holds: nothing
    // unchanged is resent, the service is removed.
    let without_service = changed.replace(
        "  - { name: s, namespace: d, hostname: s, vips: [10.96.0.1], ports: { 80: 8080 } }\n",
        "",
    );
    mesh_tx.send(mesh(&without_service)).unwrap();
    let mut c = Client::connect(addr).await;
    c.subscribe(ADDRESS, &held_addresses).await;
    c.subscribe(AUTHORIZATION, &held_policies).await;
    let a = c.recv().await.unwrap();
    assert_eq!(a.type_url, ADDRESS);
    assert!(
        a.resources.is_empty(),
        "unchanged w1 resent: {:?}",
        names(&a)
    );
    assert_eq!(a.removed_resources, ["d/s"]);
    let p = c.recv().await.unwrap();
    assert_eq!(p.type_url, AUTHORIZATION);
    assert!(p.resources.is_empty() && p.removed_resources.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_end_the_stream_with_a_clear_status_and_the_server_lives_on() {
    let (_mesh_tx, mesh_rx) = watch::channel(mesh(MESH));
    let addr = start(mesh_rx).await;

    let mut c = Client::connect(addr).await;
    c.subscribe("type.googleapis.com/envoy.config.cluster.v3.Cluster", &[])
        .await;
    let e = c.recv().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("is not served here"),
        "{}",
        e.message()
    );

    // Over the request size bound: refused by the decoder, nothing buffered beyond it.
    let mut c = Client::connect(addr).await;
    let huge: Vec<(String, String)> = (0..120_000)
        .map(|i| (format!("workload-{i:040}"), "v".into()))
        .collect();
    c.subscribe(ADDRESS, &huge).await;
    let e = c.recv().await.unwrap_err();
    assert!(
        e.message().contains("message length too large")
            || e.code() == tonic::Code::OutOfRange
            || e.code() == tonic::Code::ResourceExhausted,
        "{e:?}"
    );

    // Another node is served as before.
    let mut c = Client::connect(addr).await;
    c.subscribe(ADDRESS, &[]).await;
    assert_eq!(names(&c.recv().await.unwrap()), ["d/s", "w1", "w2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_the_config_source() {
    let (mesh_tx, mesh_rx) = watch::channel(mesh(MESH));
    let addr = start(mesh_rx).await;
    let mut c = Client::connect(addr).await;
    drop(mesh_tx);
    c.subscribe(ADDRESS, &[]).await;
    let r = c.recv().await.unwrap();
    assert_eq!(names(&r), ["d/s", "w1", "w2"]);
    // Still answering requests after the watch closed (it is not polled in a loop).
    c.send(DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        resource_names_subscribe: vec!["probe".into()],
        ..Default::default()
    })
    .await;
    assert_eq!(c.recv().await.unwrap().removed_resources, ["probe"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_cap_are_refused_until_one_closes() {
    let (_mesh_tx, mesh_rx) = watch::channel(mesh(MESH));
    let addr = serve(
        xds_server::XdsServer::new(mesh_rx)
            .with_max_streams(1)
            .into_service(),
    )
    .await;
    let mut first = Client::connect(addr).await;
    first.subscribe(ADDRESS, &[]).await;
    first.recv().await.unwrap();
    let e = Client::try_connect(addr)
        .await
        .err()
        .expect("a second stream");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("1 xDS streams are open"), "{e:?}");
    // The slot comes back when the first stream ends (polled: the server sees the reset soon).
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut c = loop {
        match Client::try_connect(addr).await {
            Ok(c) => break c,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the slot never came back: {e:?}"),
        }
    };
    c.subscribe(ADDRESS, &[]).await;
    assert_eq!(names(&c.recv().await.unwrap()), ["d/s", "w1", "w2"]);
}

/// Paused time: the runtime jumps to the server's deadline as soon as everything is idle.
#[tokio::test(start_paused = true)]
async fn a_stream_that_never_asks_is_closed_after_the_first_request_deadline() {
    let (_mesh_tx, mesh_rx) = watch::channel(mesh(MESH));
    let addr = start(mesh_rx).await;
    let mut c = Client::connect(addr).await;
    let opened = tokio::time::Instant::now();
    let e = c.rx.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("no DeltaDiscoveryRequest"), "{e:?}");
    assert!(opened.elapsed() >= xds_server::FIRST_REQUEST_TIMEOUT);
}
