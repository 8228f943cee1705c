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
    // An address that is no workload at all → 400, never dialed (reliability #3).
    let unknown = format!("{}:8080", ip(net, 99));
    assert_eq!(
        status(&mut send, connect_req(&unknown)).await,
        Ok(StatusCode::BAD_REQUEST)
    );
    // A workload of another node is not ours either → 400.
    let elsewhere = format!("{}:8080", ip(net, 4));
    assert_eq!(
        status(&mut send, connect_req(&elsewhere)).await,
        Ok(StatusCode::BAD_REQUEST)
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

/// Reliability #38: a CONNECT naming one of the node's own listener ports on a local workload
/// is refused with 400 and never dialed; the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_the_nodes_own_listeners_is_400_and_never_dialed() {
    let net = 25;
    let (mesh, app) = node_b(net).await;
    let node = mesh.nodes[0].node.clone();
    let hb = SocketAddr::new(ip(net, 3), 15008);
    let mut send = hbone(&mesh.ca_dir, &id("client"), &id("server"), hb)
        .await
        .unwrap();
    for port in [15000, 15001, 15006, 15008, 15020, 15021] {
        let authority = format!("{}:{port}", ip(net, 3));
        assert_eq!(
            status(&mut send, connect_req(&authority)).await,
            Ok(StatusCode::BAD_REQUEST),
            "{authority}"
        );
    }
    assert_eq!(node.rejections.count("hbone", "self_target"), 6);
    assert!(node
        .metrics_text()
        .contains("zmesh_rejected_total{listener=\"hbone\",reason=\"self_target\"} 6"));
    // The same connection still carries a good CONNECT.
    let good = format!("{}:8080", ip(net, 3));
    let (resp, _stream) = send.send_request(connect_req(&good), false).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK);
    let _ = app.accept().await.unwrap();
}

/// Reliability #1: an extended CONNECT (`:protocol`) is answered 400 on its stream, and the
/// connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_connect_is_400_on_its_stream() {
    let net = 26;
    let (mesh, app) = node_b(net).await;
    let hb = SocketAddr::new(ip(net, 3), 15008);
    let mut send = hbone(&mesh.ca_dir, &id("client"), &id("server"), hb)
        .await
        .unwrap();
    let mut ext = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://{}:8080/", ip(net, 3)))
        .body(())
        .unwrap();
    ext.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    assert_eq!(status(&mut send, ext).await, Ok(StatusCode::BAD_REQUEST));
    let good = format!("{}:8080", ip(net, 3));
    assert_eq!(
        status(&mut send, connect_req(&good)).await,
        Ok(StatusCode::OK)
    );
    let _ = app.accept().await.unwrap();
}

/// What h2 itself decides before zmesh sees a request (recorded in docs/hbone.md): a header
/// block h2's HPACK decoder rejects (an upper-case name, an unknown pseudo-header) ends the
/// connection with GOAWAY PROTOCOL_ERROR; an `:authority` that is not an authority at all is
/// a stream error (RST_STREAM PROTOCOL_ERROR) and the connection stays usable. Neither dials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_header_blocks_get_h2s_answer_and_nothing_is_dialed() {
    let net = 27;
    let (mesh, app) = node_b(net).await;
    let hb = SocketAddr::new(ip(net, 3), 15008);
    let good = format!("{}:8080", ip(net, 3));

    // An unparsable authority: RST_STREAM on stream 1, then stream 3 (a good CONNECT) works.
    let mut c = raw_h2(&mesh, hb).await;
    c.headers(1, &[(":method", "CONNECT"), (":authority", "[::1")])
        .await;
    c.headers(3, &[(":method", "CONNECT"), (":authority", &good)])
        .await;
    assert_eq!(c.until_stream_end(1).await, RawEnd::Reset(1)); // PROTOCOL_ERROR
    assert_eq!(c.until_stream_end(3).await, RawEnd::Headers);
    let _ = app.accept().await.unwrap();

    // An upper-case header name, then an unknown pseudo-header: GOAWAY PROTOCOL_ERROR.
    for bad in [("Forwarded", "x"), (":bogus", "x")] {
        let mut c = raw_h2(&mesh, hb).await;
        c.headers(1, &[(":method", "CONNECT"), (":authority", &good), bad])
            .await;
        assert_eq!(c.until_stream_end(1).await, RawEnd::GoAway(1), "{bad:?}");
    }
    let accepted = tokio::time::timeout(std::time::Duration::from_millis(300), app.accept()).await;
    assert!(accepted.is_err(), "a malformed request reached the app");
}

/// Reliability #7: a HEADERS+RST_STREAM flood on one connection, ten times over. The dials it
/// causes are bounded by zmesh (in-flight cap + early-reset budget), every run, and the
/// connection is closed with GOAWAY (ENHANCE_YOUR_CALM); a normal client is served afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_floods_cost_a_bounded_number_of_dials() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let net = 28;
    let (mesh, app) = node_b(net).await;
    let node = mesh.nodes[0].node.clone();
    let hb = SocketAddr::new(ip(net, 3), 15008);
    let target = format!("{}:8080", ip(net, 3));
    let dials = Arc::new(AtomicUsize::new(0));
    let counted = dials.clone();
    tokio::spawn(async move {
        // Every connection the node makes to the app is one dial; close it at once.
        while let Ok((s, _)) = app.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let fds = open_fds();
    for run in 0..10 {
        let e = assert_flood_bounded(&format!("run {run}"), &dials, async {
            let send = hbone(&mesh.ca_dir, &id("client"), &id("server"), hb)
                .await
                .unwrap();
            reset_flood(send, &target, 10_000).await
        })
        .await;
        assert!(
            e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || e.is_io() || e.is_go_away(),
            "run {run}: {e}"
        );
    }
    // The slow form h2's own pending-reset limit cannot see: each stream is reset only after
    // its 200, so every one cost a dial. zmesh's budget ends it with ENHANCE_YOUR_CALM.
    // The floods' connections have ended by now (each flood saw its connection end).
    let counted_before = node.rejections.count("hbone", "rapid_reset");
    let e = assert_flood_bounded("slow form", &dials, async {
        let send = hbone(&mesh.ca_dir, &id("client"), &id("server"), hb)
            .await
            .unwrap();
        reset_after_200(send, &target, 1_000).await
    })
    .await;
    // The GOAWAY may be read, or the close may win the race to the client.
    assert!(
        e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || e.is_io(),
        "{e}"
    );
    wait_until(
        "the node to count the slow form's rapid reset",
        std::time::Duration::from_secs(5),
        || node.rejections.count("hbone", "rapid_reset") == counted_before + 1,
    )
    .await;
    // Nothing held on to: descriptors back where they were (a little slack for the pool).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(open_fds() <= fds + 4, "fds {fds} -> {}", open_fds());
    // A well-behaved client is served as before.
    let mut send = hbone(&mesh.ca_dir, &id("client"), &id("server"), hb)
        .await
        .unwrap();
    assert_eq!(
        status(&mut send, connect_req(&target)).await,
        Ok(StatusCode::OK)
    );
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// How a stream ended, as a raw HTTP/2 client saw it.
#[derive(Debug, PartialEq, Eq)]
enum RawEnd {
    /// A response HEADERS frame arrived.
    Headers,
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    Closed,
}

/// A hand-made HTTP/2 client over TLS, for header blocks the h2 crate refuses to send.
struct RawH2 {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
}

async fn raw_h2(mesh: &Mesh, addr: SocketAddr) -> RawH2 {
    let (cert, mgr) = cert_from(&mesh.ca_dir, &id("client"));
    let cfg = zmesh::tls::client_config(&cert, &mgr.trust(), vec![id("server")]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = TlsConnector::from(Arc::new(cfg))
        .connect(zmesh::tls::placeholder_server_name(), tcp)
        .await
        .unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&frame(4, 0, 0, &[])).await.unwrap(); // empty SETTINGS
    RawH2 { tls }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

impl RawH2 {
    /// One HEADERS frame (END_HEADERS, no END_STREAM) of HPACK literals without indexing
    /// and with literal names, so any name can be sent.
    async fn headers(&mut self, stream: u32, fields: &[(&str, &str)]) {
        let mut block = Vec::new();
        for (n, v) in fields {
            assert!(n.len() < 127 && v.len() < 127);
            block.push(0x00);
            block.push(n.len() as u8);
            block.extend_from_slice(n.as_bytes());
            block.push(v.len() as u8);
            block.extend_from_slice(v.as_bytes());
        }
        self.tls
            .write_all(&frame(1, 0x4, stream, &block))
            .await
            .unwrap();
    }

    /// Reads frames until `stream` gets response headers or a reset, or the connection ends.
    async fn until_stream_end(&mut self, stream: u32) -> RawEnd {
        let read = async {
            loop {
                let mut head = [0u8; 9];
                if self.tls.read_exact(&mut head).await.is_err() {
                    return RawEnd::Closed;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let (kind, flags) = (head[3], head[4]);
                let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                if self.tls.read_exact(&mut payload).await.is_err() {
                    return RawEnd::Closed;
                }
                match kind {
                    // SETTINGS without ACK: acknowledge it.
                    4 if flags & 1 == 0 => {
                        let _ = self.tls.write_all(&frame(4, 1, 0, &[])).await;
                    }
                    1 if id == stream => return RawEnd::Headers,
                    3 if id == stream => {
                        return RawEnd::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()))
                    }
                    7 => {
                        return RawEnd::GoAway(u32::from_be_bytes(
                            payload[4..8].try_into().unwrap(),
                        ))
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("an answer within 5 s")
    }
}
