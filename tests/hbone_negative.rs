//! Tier (b) negative tests against a node's :15008, driven by a hand-made HBONE client.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use zmesh::identity::{FileCa, SpiffeId};

/// Starts node B owning the server workload at 127.<net>.0.3 and an app on :8080.
async fn node_b(net: u8) -> (Mesh, TcpListener) {
    let mut mesh = Mesh::new(net);
    let other = W {
        uid: "other",
        sa: "other",
        host: 4,
        node: "node-c",
    };
    let w = client_server_workloads(net, "server", &[other]);
    mesh.node("node-b", 3, &w).await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    (mesh, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_for_bad_requests_keep_the_connection_usable() {
    let net = 21;
    let (mesh, app) = node_b(net).await;
    let hb = SocketAddr::new(ip(net, 3), 15008);
    let mut send = hbone(&mesh.ca_dir, &id("client"), &id("server"), hb)
        .await
        .unwrap();

    // Not CONNECT → 400 (reliability #1).
    let get = Request::builder()
        .method(Method::GET)
        .uri("https://x/")
        .body(())
        .unwrap();
    assert_eq!(status(&mut send, get).await, Ok(StatusCode::BAD_REQUEST));
    // Unknown local workload → 503.
    let unknown = format!("{}:8080", ip(net, 99));
    assert_eq!(
        status(&mut send, connect_req(&unknown)).await,
        Ok(StatusCode::SERVICE_UNAVAILABLE)
    );
    // A workload of another node is not ours either → 503.
    let elsewhere = format!("{}:8080", ip(net, 4));
    assert_eq!(
        status(&mut send, connect_req(&elsewhere)).await,
        Ok(StatusCode::SERVICE_UNAVAILABLE)
    );
    // Port with nothing listening → 503 (reliability #26).
    let closed = format!("{}:9", ip(net, 3));
    assert_eq!(
        status(&mut send, connect_req(&closed)).await,
        Ok(StatusCode::SERVICE_UNAVAILABLE)
    );

    // The same connection still carries a good CONNECT, and bytes flow.
    let good = format!("{}:8080", ip(net, 3));
    let (resp, mut stream) = send.send_request(connect_req(&good), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (mut s, peer) = app.accept().await.unwrap();
    // The app sees the HBONE client's address (this test dials from 127.0.0.1), not node B's.
    assert_eq!(peer.ip(), std::net::Ipv4Addr::LOCALHOST);
    stream.send_data(Bytes::from_static(b"ping"), true).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    assert_eq!(buf, b"ping");
    s.write_all(b"pong").await.unwrap();
    drop(s);
    let mut body = resp.into_body();
    let chunk = body.data().await.unwrap().unwrap();
    assert_eq!(&chunk[..], b"pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_client_certificate_is_rejected_in_the_handshake() {
    let net = 22;
    let (mesh, app) = node_b(net).await;
    let hb = SocketAddr::new(ip(net, 3), 15008);
    // A second CA the node does not trust, issuing the very identity the node would accept.
    let rogue = mesh.dir.path().join("rogue-ca");
    FileCa::init(&rogue, "cluster.local").unwrap();
    let (rogue_cert, _) = cert_from(&rogue, &id("client"));
    let (_, real) = cert_from(&mesh.ca_dir, &id("client"));
    let cfg = zmesh::tls::client_config(&rogue_cert, &real.trust(), vec![id("server")]).unwrap();
    let tcp = TcpStream::connect(hb).await.unwrap();
    let result = async {
        let tls = TlsConnector::from(Arc::new(cfg))
            .connect(zmesh::tls::placeholder_server_name(), tcp)
            .await?;
        // TLS 1.3: the server judges the client certificate after the client's Finished, so the
        // rejection surfaces on the first read.
        let (mut send, conn) = h2::client::handshake(tls)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let (resp, _) = send
            .send_request(connect_req(&format!("{}:8080", ip(net, 3))), false)
            .map_err(std::io::Error::other)?;
        resp.await.map_err(std::io::Error::other)
    }
    .await;
    let err = result.expect_err("an untrusted client got an HTTP/2 response");
    assert!(!err.to_string().is_empty());
    // No HTTP/2 frame was processed: the app never saw a connection.
    let accepted = tokio::time::timeout(std::time::Duration::from_millis(300), app.accept()).await;
    assert!(accepted.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_trust_domain_is_rejected_even_with_a_valid_chain() {
    let net = 23;
    let (mesh, _app) = node_b(net).await;
    let hb = SocketAddr::new(ip(net, 3), 15008);
    let foreign = SpiffeId::new("evil.example", "default", "client").unwrap();
    let r = match hbone(&mesh.ca_dir, &foreign, &id("server"), hb).await {
        // TLS 1.3: the server's verdict on the client arrives after the client's handshake.
        Ok(mut send) => status(&mut send, connect_req(&format!("{}:8080", ip(net, 3)))).await,
        Err(e) => Err(e),
    };
    assert!(
        r.is_err(),
        "trust-domain mismatch accepted (reliability #16): {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_with_the_wrong_identity() {
    let net = 24;
    let (mesh, _app) = node_b(net).await;
    let hb = SocketAddr::new(ip(net, 3), 15008);
    let err = hbone(&mesh.ca_dir, &id("client"), &id("someone-else"), hb)
        .await
        .unwrap_err();
    assert!(
        err.contains("spiffe://cluster.local/ns/default/sa/server")
            && err.contains("spiffe://cluster.local/ns/default/sa/someone-else"),
        "error names expected and received identity: {err}"
    );
}
