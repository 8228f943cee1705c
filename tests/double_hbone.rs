//! Tier (b): double HBONE (docs/hbone.md "Double HBONE") layer by layer, in process.
//!
//! 1. A zmesh node sends to a service on another network through a stand-in gateway built
//!    here from rustls and h2: the gateway decodes the OUTER CONNECT, then plays the
//!    destination inside the stream and decodes the INNER one; both are checked header by
//!    header. A gateway that tries to terminate the inner session with its own certificate is
//!    refused by the client, and the application sees a reset.
//! 2. A real zmesh east-west gateway and destination node: a client speaks both layers by hand,
//!    and every malformed or unservable outer CONNECT gets its status without a dial.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{cert_from, connect_req, hbone, id, ip, status, Mesh};
use http::{HeaderMap, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use zmesh::hbone::io::H2Io;
use zmesh::identity::SpiffeId;

fn gw_id() -> SpiffeId {
    SpiffeId::new("cluster.local", "istio-system", "eastwest").unwrap()
}

fn db_id() -> SpiffeId {
    SpiffeId::new("cluster.local", "data", "db").unwrap()
}

/// What the stand-in gateway saw of one CONNECT: the authority, the headers and the client
/// certificate's identity.
#[derive(Debug)]
struct Seen {
    authority: String,
    scheme_or_path: bool,
    headers: HeaderMap,
    client: SpiffeId,
}

/// Accepts one TLS + HTTP/2 connection on `io` presenting `cert_id`'s certificate, reports its
/// first CONNECT and answers 200; returns the stream as I/O.
async fn accept_connect<IO>(
    io: IO,
    ca_dir: &std::path::Path,
    cert_id: &SpiffeId,
    seen: &mpsc::UnboundedSender<Seen>,
) -> Option<H2Io>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (cert, mgr) = cert_from(ca_dir, cert_id);
    let cfg = zmesh::tls::server_config(&cert, &mgr.trust()).unwrap();
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        .accept(io)
        .await
        .ok()?;
    let der = tls.get_ref().1.peer_certificates()?[0].clone();
    let client = zmesh::identity::peer_identity(&der).unwrap();
    let mut conn = h2::server::handshake(tls).await.ok()?;
    let (req, mut respond) = conn.accept().await?.ok()?;
    tokio::spawn(async move { while let Some(Ok(_)) = conn.accept().await {} });
    let _ = seen.send(Seen {
        authority: req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        scheme_or_path: req.uri().scheme().is_some() || req.uri().path_and_query().is_some(),
        headers: req.headers().clone(),
        client,
    });
    let send = respond.send_response(Response::new(()), false).ok()?;
    Some(H2Io::new(send, req.into_body()))
}

/// The stand-in east-west gateway: outer session as `gw_id()`, inner session as `inner_as`,
/// then an echo of the inner stream.
async fn fake_gateway(
    l: TcpListener,
    ca_dir: std::path::PathBuf,
    inner_as: SpiffeId,
    outer_seen: mpsc::UnboundedSender<Seen>,
    inner_seen: mpsc::UnboundedSender<Seen>,
) {
    loop {
        let Ok((tcp, _)) = l.accept().await else {
            return;
        };
        let (ca, inner_as) = (ca_dir.clone(), inner_as.clone());
        let (o, i) = (outer_seen.clone(), inner_seen.clone());
        tokio::spawn(async move {
            let Some(outer) = accept_connect(tcp, &ca, &gw_id(), &o).await else {
                return;
            };
            let Some(inner) = accept_connect(outer, &ca, &inner_as, &i).await else {
                return;
            };
            let (mut r, mut w) = tokio::io::split(inner);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

const NET: u8 = 141;

/// A node on network-a whose config sends `db` (endpoints only on network-b) through the
/// gateway at `gw`.
fn client_node_yaml(ca: &std::path::Path, gw: SocketAddr) -> String {
    format!(
        r#"node:
  name: node-a
  bind: {a}
  network: network-a
  access_log: text
  certificates: {{ file_ca: {{ dir: {ca} }} }}
networks:
  - name: network-b
    gateways: [{{ address: {gip}, port: {gport}, identity: "{gid}" }}]
workloads:
  - {{ uid: client, name: client, namespace: default, service_account: client, addresses: [{c}], node: node-a }}
  - {{ uid: db-b, name: db-b, namespace: data, service_account: db, addresses: [10.207.141.3], node: node-b, network: network-b, services: {{ "data/db.data.svc.cluster.local": {{ 80: 8080 }} }} }}
services:
  - {{ name: db, namespace: data, hostname: db.data.svc.cluster.local, vips: [10.96.141.1], ports: {{ 80: 8080 }} }}
"#,
        a = ip(NET, 1),
        c = ip(NET, 2),
        ca = ca.display(),
        gip = gw.ip(),
        gport = gw.port(),
        gid = gw_id(),
    )
}

#[tokio::test]
async fn outer_and_inner_connects_match_the_contract_and_the_inner_identity_is_verified() {
    let mut mesh = Mesh::new(NET);
    let (outer_tx, mut outer_rx) = mpsc::unbounded_channel();
    let (inner_tx, mut inner_rx) = mpsc::unbounded_channel();
    let honest = TcpListener::bind((ip(NET, 9), 0)).await.unwrap();
    let honest_addr = honest.local_addr().unwrap();
    tokio::spawn(fake_gateway(
        honest,
        mesh.ca_dir.clone(),
        db_id(),
        outer_tx.clone(),
        inner_tx.clone(),
    ));
    let (node, path) = mesh
        .node_from_file("node-a", &client_node_yaml(&mesh.ca_dir, honest_addr))
        .await;
    let entry =
        common::capture_to(node.clone(), ip(NET, 2), "10.96.141.1:80".parse().unwrap()).await;

    let mut app = common::connect_from(ip(NET, 2), entry).await.unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let back = common::exchange(&mut app, &data).await;
    assert_eq!(back, data, "bytes exact through both layers");
    let client_port = app.local_addr().unwrap().port();

    let outer = outer_rx.recv().await.unwrap();
    let inner = inner_rx.recv().await.unwrap();
    for (layer, s) in [("outer", &outer), ("inner", &inner)] {
        assert_eq!(s.authority, "db.data.svc.cluster.local:80", "{layer}");
        assert!(
            !s.scheme_or_path,
            "{layer}: classic CONNECT has no :scheme or :path"
        );
        assert_eq!(
            s.client,
            id("client"),
            "{layer}: the source workload's own certificate"
        );
        let h = |n: &str| {
            s.headers
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            h("forwarded"),
            format!(
                "for=\"{}:{client_port}\";host=db.data.svc.cluster.local",
                ip(NET, 2)
            ),
            "{layer}"
        );
        assert!(
            h("baggage").contains("k8s.namespace.name=default")
                && h("baggage").contains("k8s.deployment.name=client"),
            "{layer}: {}",
            h("baggage")
        );
        let tp = h("traceparent");
        assert!(
            tp.len() == 55 && tp.starts_with("00-") && tp.ends_with("-00"),
            "{layer}: {tp}"
        );
    }
    assert!(outer.headers.get("x-forwarded-network").is_none());
    assert_eq!(inner.headers["x-forwarded-network"], "network-a");
    assert_eq!(outer.headers["traceparent"], inner.headers["traceparent"]);

    // A gateway that answers the inner handshake with its own certificate (a relay trying to
    // read the traffic) is refused: the application gets a reset, nothing is echoed.
    let mitm = TcpListener::bind((ip(NET, 10), 0)).await.unwrap();
    let mitm_addr = mitm.local_addr().unwrap();
    tokio::spawn(fake_gateway(
        mitm,
        mesh.ca_dir.clone(),
        gw_id(),
        outer_tx,
        inner_tx,
    ));
    common::rewrite(&path, &client_node_yaml(&mesh.ca_dir, mitm_addr));
    common::wait_until(
        "the config naming the second gateway",
        Duration::from_secs(10),
        || {
            node.model()
                .gateways("network-b")
                .iter()
                .any(|g| g.addr == mitm_addr)
        },
    )
    .await;
    let mut app = common::connect_from(ip(NET, 2), entry).await.unwrap();
    app.write_all(b"secret").await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), app.read(&mut buf))
        .await
        .expect("the application is told");
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected a reset, got {r:?}"
    );
    let outer = outer_rx.recv().await.unwrap();
    assert_eq!(outer.authority, "db.data.svc.cluster.local:80");
    assert!(
        inner_rx.try_recv().is_err(),
        "an inner CONNECT reached a gateway holding the wrong identity"
    );
}

const NET2: u8 = 142;

/// The gateway node (network-b's edge) and the destination node share this file but for the
/// node section.
fn gateway_mesh_yaml() -> String {
    format!(
        r#"workloads:
  - {{ uid: gw, name: eastwest, namespace: istio-system, service_account: eastwest, addresses: [{gw}], node: gw }}
  - {{ uid: db-b, name: db-b, namespace: data, service_account: db, addresses: [{db}], node: node-b, services: {{ "data/db.data.svc.cluster.local": {{ 80: 8080 }}, "data/hidden.data.svc.cluster.local": {{ 80: 8080 }} }} }}
  - {{ uid: sick, name: sick, namespace: data, addresses: [{sick}], node: node-b, status: unhealthy, services: {{ "data/sick.data.svc.cluster.local": {{}} }} }}
  - {{ uid: side, name: side, namespace: data, service_account: side, addresses: [{side}], node: gw, services: {{ "data/local-only.data.svc.cluster.local": {{}} }} }}
  - {{ uid: gw2, name: eastwest-2, namespace: istio-system, service_account: eastwest, addresses: [{gw2}], node: gw2, services: {{ "data/chain.data.svc.cluster.local": {{}} }} }}
  - {{ uid: wp, name: wp, namespace: data, service_account: wp, addresses: [{wp}], node: node-b, services: {{ "data/fronted.data.svc.cluster.local": {{}} }} }}
services:
  - {{ name: db, namespace: data, hostname: db.data.svc.cluster.local, vips: [10.96.142.1], ports: {{ 80: 8080 }} }}
  - {{ name: hidden, namespace: data, hostname: hidden.data.svc.cluster.local, vips: [10.96.142.2], ports: {{ 80: 8080 }} }}
  - {{ name: sick, namespace: data, hostname: sick.data.svc.cluster.local, vips: [10.96.142.3], ports: {{ 80: 8080 }} }}
  - {{ name: other, namespace: data, hostname: other.data.svc.cluster.local, vips: [10.96.142.4], ports: {{ 80: 8080 }} }}
  - {{ name: local-only, namespace: data, hostname: local-only.data.svc.cluster.local, vips: [10.96.142.5], ports: {{ 80: 8080 }} }}
  - {{ name: chain, namespace: data, hostname: chain.data.svc.cluster.local, vips: [10.96.142.6], ports: {{ 80: 8080 }} }}
  - {{ name: fronted, namespace: data, hostname: fronted.data.svc.cluster.local, vips: [10.96.142.7], ports: {{ 80: 8080 }}, waypoint: wp }}
"#,
        gw = ip(NET2, 9),
        db = ip(NET2, 3),
        sick = ip(NET2, 4),
        side = ip(NET2, 10),
        gw2 = ip(NET2, 11),
        wp = ip(NET2, 5),
    )
}

#[tokio::test]
async fn a_real_gateway_relays_the_inner_session_and_refuses_what_it_cannot_serve() {
    let mut mesh = Mesh::new(NET2);
    let ca = mesh.ca_dir.clone();
    let gw_yaml = common::node_yaml_with(
        NET2,
        "gw",
        9,
        &ca,
        "  network: network-b\n  east_west_gateway: { workload: gw, expose: [db.data.svc.cluster.local, data/sick.data.svc.cluster.local, local-only.data.svc.cluster.local, chain.data.svc.cluster.local, fronted.data.svc.cluster.local] }\n",
        &gateway_mesh_yaml(),
    );
    mesh.node_from_file("gw", &gw_yaml).await;
    // The same gateway node's listener on its other workload's address (a host-mode node in
    // process binds one address: a second instance of the node stands for it).
    let side_yaml = common::node_yaml_with(
        NET2,
        "gw",
        10,
        &ca,
        "  network: network-b\n  east_west_gateway: { workload: gw }\n",
        &gateway_mesh_yaml(),
    );
    mesh.node_from_file("gw-side", &side_yaml).await;
    let b_yaml = common::node_yaml_with(
        NET2,
        "node-b",
        3,
        &ca,
        "  network: network-b\n",
        &gateway_mesh_yaml(),
    );
    mesh.node_from_file("node-b", &b_yaml).await;
    // The app behind db-b, counting its connections.
    let app = TcpListener::bind((ip(NET2, 3), 8080)).await.unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = app.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let gw_addr = SocketAddr::new(ip(NET2, 9), 15008);
    let client = SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
    let mut outer = hbone(&ca, &client, &gw_id(), gw_addr).await.unwrap();

    // What the gateway cannot or must not serve: answered, never dialed.
    for (authority, want) in [
        ("nope.data.svc.cluster.local:80", StatusCode::BAD_REQUEST), // no such service
        ("hidden.data.svc.cluster.local:80", StatusCode::BAD_REQUEST), // not exposed
        ("db.data.svc.cluster.local:81", StatusCode::BAD_REQUEST),   // no such port
        (
            "sick.data.svc.cluster.local:80",
            StatusCode::SERVICE_UNAVAILABLE,
        ), // no healthy endpoint
        ("DB.data.svc.cluster.local:80", StatusCode::BAD_REQUEST),   // not a host name as written
        ("gw.local:15008", StatusCode::BAD_REQUEST),                 // no such service either
        // Its only endpoint is on the gateway's own node: never relayed to itself.
        (
            "local-only.data.svc.cluster.local:80",
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        // Its only endpoint is another gateway (the same identity): no gateway chains.
        (
            "chain.data.svc.cluster.local:80",
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        // Its L7 policy is in a waypoint, which a relay would skip.
        ("fronted.data.svc.cluster.local:80", StatusCode::BAD_REQUEST),
    ] {
        assert_eq!(
            status(&mut outer, connect_req(authority)).await,
            Ok(want),
            "{authority}"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a refused CONNECT reached the app"
    );
    // Another workload on the gateway's node is no gateway: it refuses a service it does not
    // back instead of relaying it (the gateway workload's policies would be skipped).
    let side = SpiffeId::new("cluster.local", "data", "side").unwrap();
    let mut other = hbone(&ca, &client, &side, SocketAddr::new(ip(NET2, 10), 15008))
        .await
        .unwrap();
    assert_eq!(
        status(&mut other, connect_req("db.data.svc.cluster.local:80")).await,
        Ok(StatusCode::BAD_REQUEST)
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 0);

    // The real thing, by hand: outer CONNECT, then mTLS with the destination inside it (the
    // client verifies db's identity; the gateway holds none of its keys), inner CONNECT.
    let (resp, send) = outer
        .send_request(connect_req("db.data.svc.cluster.local:80"), false)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let io = H2Io::new(send, resp.into_body());
    let (cert, mgr) = cert_from(&ca, &client);
    let mut inner = common::hbone_with_io(io, &cert, &mgr, &db_id())
        .await
        .unwrap();
    let mut req = connect_req("db.data.svc.cluster.local:80");
    req.headers_mut()
        .insert("x-forwarded-network", "network-a".parse().unwrap());
    let (resp, mut send) = inner.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    send.send_data(Bytes::from_static(b"through two layers"), true)
        .unwrap();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"through two layers");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // At the destination node (not a gateway), a service its workload does not back is refused.
    let mut direct = hbone(&ca, &client, &db_id(), SocketAddr::new(ip(NET2, 3), 15008))
        .await
        .unwrap();
    assert_eq!(
        status(&mut direct, connect_req("other.data.svc.cluster.local:80")).await,
        Ok(StatusCode::BAD_REQUEST)
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}
