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
    assert_eq!(c.until_stream_end(3).await, RawEnd::Status(200));
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
    /// A response HEADERS frame arrived with this `:status`.
    Status(u16),
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
    raw_h2_as(mesh, addr, "client").await
}

/// `raw_h2` with a client certificate for service account `sa`.
async fn raw_h2_as(mesh: &Mesh, addr: SocketAddr, sa: &str) -> RawH2 {
    let (cert, mgr) = cert_from(&mesh.ca_dir, &id(sa));
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
    /// and with literal names, so any name and any length can be sent.
    async fn headers(&mut self, stream: u32, fields: &[(&str, &str)]) {
        self.tls
            .write_all(&headers_frame(stream, fields))
            .await
            .unwrap();
    }

    /// A HEADERS frame and a DATA frame (no END_STREAM) in one write, so the payload is on the
    /// wire before the server can answer the request.
    async fn headers_and_data(&mut self, stream: u32, fields: &[(&str, &str)], data: &[u8]) {
        let mut both = headers_frame(stream, fields);
        both.extend_from_slice(&frame(0, 0, stream, data));
        self.tls.write_all(&both).await.unwrap();
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
                    1 if id == stream => return RawEnd::Status(response_status(&payload)),
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

fn headers_frame(stream: u32, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (n, v) in fields {
        block.push(0x00);
        hpack_string(&mut block, n.as_bytes());
        hpack_string(&mut block, v.as_bytes());
    }
    frame(1, 0x4, stream, &block)
}

/// An HPACK string literal without Huffman coding: a 7-bit-prefix length (RFC 7541 §5.1),
/// then the bytes.
fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    let mut len = s.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}

/// The `:status` of a response header block as h2 encodes it: the first field, either fully
/// indexed in the static table (200, 204, 206, 304, 400, 404, 500) or a literal with the
/// static `:status` name and a Huffman-coded value (RFC 7541 §6.1, §6.2, Appendix A and B).
fn response_status(block: &[u8]) -> u16 {
    let first = *block.first().expect("an empty response header block");
    if first & 0x80 != 0 {
        return match first & 0x7f {
            8 => 200,
            9 => 204,
            10 => 206,
            11 => 304,
            12 => 400,
            13 => 404,
            14 => 500,
            i => panic!("response starts with table index {i}: not a static :status entry"),
        };
    }
    // Literal with incremental indexing (01xxxxxx, 6-bit name index) or without indexing /
    // never indexed (000xxxxx, 4-bit name index); :status is static name 8.
    let name = if first & 0x40 != 0 {
        first & 0x3f
    } else {
        first & 0x0f
    };
    assert_eq!(
        name, 8,
        "the response's first field is not :status: {block:02x?}"
    );
    let head = block[1];
    let len = usize::from(head & 0x7f);
    let value = &block[2..2 + len];
    let digits = if head & 0x80 != 0 {
        huffman_digits(value)
    } else {
        String::from_utf8(value.to_vec()).expect("an ASCII :status")
    };
    digits.parse().expect(":status is three digits")
}

/// Decodes a Huffman-coded string of ASCII digits (RFC 7541 Appendix B: '0'-'2' are the
/// 5-bit codes 0-2, '3'-'9' the 6-bit codes 0x19-0x1f; the tail is padded with 1 bits).
fn huffman_digits(coded: &[u8]) -> String {
    let bits: Vec<u8> = coded
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let take = |at: usize, n: usize| -> Option<u8> {
        bits.get(at..at + n)
            .map(|b| b.iter().fold(0, |acc, bit| acc << 1 | bit))
    };
    let mut out = String::new();
    let mut at = 0;
    while at < bits.len() {
        if bits.len() - at < 8 && bits[at..].iter().all(|b| *b == 1) {
            break; // padding
        }
        match (take(at, 5), take(at, 6)) {
            (Some(c @ 0..=2), _) => {
                out.push(char::from(b'0' + c));
                at += 5;
            }
            (_, Some(c @ 0x19..=0x1f)) => {
                out.push(char::from(b'3' + c - 0x19));
                at += 6;
            }
            _ => panic!("not a Huffman-coded digit string: {coded:02x?}"),
        }
    }
    out
}

/// The header fields of a classic CONNECT to `authority`.
fn connect_to(authority: &str) -> [(&'static str, &str); 2] {
    [(":method", "CONNECT"), (":authority", authority)]
}

/// What one upstream listener saw: how many connections it accepted and every byte they sent.
#[derive(Default)]
struct Upstream {
    accepted: std::sync::atomic::AtomicUsize,
    bytes: std::sync::Mutex<Vec<u8>>,
}

/// Accepts every connection to `listener` and records it and its bytes.
fn count_upstream(listener: TcpListener) -> Arc<Upstream> {
    let seen = Arc::new(Upstream::default());
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            record
                .accepted
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    record.bytes.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    seen
}

impl Upstream {
    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }
}

/// How long a test waits to be sure that a dial it expects NOT to happen has not happened.
const NO_DIAL_WINDOW: std::time::Duration = std::time::Duration::from_millis(300);

/// Reliability #2 on the wire: every bad `:authority` form, one stream each on one connection.
/// The forms that are a syntactically valid authority reach zmesh and get 400; the forms h2
/// cannot parse as an authority at all (empty, `[::1`, non-ASCII) get h2's own RST_STREAM
/// PROTOCOL_ERROR (docs/hbone.md, "What h2 decides"). Either way nothing is dialed: the
/// upstream listener accepts only the good CONNECT sent last on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_authority_on_the_wire_is_refused_and_never_dialed() {
    let net = 101;
    let (mesh, app) = node_b(net).await;
    let node = mesh.nodes[0].node.clone();
    let upstream = count_upstream(app);
    let hb = SocketAddr::new(ip(net, 3), 15008);
    let host = ip(net, 3);
    let too_long = format!("{}:8080", "1".repeat(300));
    let by_zmesh = [
        format!("{host}"),              // no port
        format!("{host}:0"),            // port 0
        format!("{host}:65536"),        // port > 65535
        format!("{host}:99999"),        // port > 65535
        format!("user@{host}:8080"),    // userinfo
        format!("user:pw@{host}:8080"), // userinfo with a password
        "localhost:8080".to_string(),   // a host name, not an IP
        "[::1]".to_string(),            // IPv6 without a port
        too_long,                       // > 255 bytes
    ];
    let by_h2 = [
        "".to_string(),
        "[::1".to_string(),
        format!("{host}:80\u{e9}"),
    ];

    let mut c = raw_h2(&mesh, hb).await;
    let mut stream = 1;
    for authority in &by_zmesh {
        c.headers(stream, &[(":method", "CONNECT"), (":authority", authority)])
            .await;
        assert_eq!(
            c.until_stream_end(stream).await,
            RawEnd::Status(400),
            "{authority:?}"
        );
        stream += 2;
    }
    for authority in &by_h2 {
        c.headers(stream, &[(":method", "CONNECT"), (":authority", authority)])
            .await;
        assert_eq!(
            c.until_stream_end(stream).await,
            RawEnd::Reset(1), // PROTOCOL_ERROR
            "{authority:?}"
        );
        stream += 2;
    }
    // A CONNECT with no :authority at all reaches zmesh and is refused the same way.
    c.headers(stream, &[(":method", "CONNECT")]).await;
    assert_eq!(c.until_stream_end(stream).await, RawEnd::Status(400));
    stream += 2;

    tokio::time::sleep(NO_DIAL_WINDOW).await;
    assert_eq!(upstream.accepted(), 0, "a bad :authority was dialed");
    assert_eq!(
        node.rejections.count("hbone", "bad_authority"),
        by_zmesh.len() as u64 + 1
    );
    // The same connection still carries a good CONNECT, and that one dial is seen: the
    // counter above would have seen a dial of any of the bad ones.
    let good = format!("{host}:8080");
    c.headers(stream, &[(":method", "CONNECT"), (":authority", &good)])
        .await;
    assert_eq!(c.until_stream_end(stream).await, RawEnd::Status(200));
    wait_until(
        "the good CONNECT to be dialed",
        std::time::Duration::from_secs(5),
        || upstream.accepted() == 1,
    )
    .await;
}

/// Reliability #3 on the wire: a CONNECT arriving at the server workload's address but naming
/// an address that workload does not own is 400, counted by reason, and never dialed:
/// listeners bound at exactly those addresses see no connection. Three forms: an address that
/// is no workload at all, a workload of another node, and another workload of this same node
/// (the listener was reached at the server's address, so the CONNECT may only name the server,
/// as ztunnel's destination validation). A good CONNECT on the same connection is dialed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_no_local_workload_owns_is_400_and_never_dialed() {
    let net = 102;
    let mut mesh = Mesh::new(net);
    let other = W {
        uid: "other",
        sa: "other",
        host: 4,
        node: "node-c",
    };
    let neighbour = W {
        uid: "neighbour",
        sa: "neighbour",
        host: 5,
        node: "node-b",
    };
    let w = client_server_workloads(net, "server", &[other, neighbour]);
    let node = mesh.node("node-b", 3, &w).await;
    let hb = SocketAddr::new(ip(net, 3), 15008);
    let listen = |host| async move {
        count_upstream(
            TcpListener::bind(SocketAddr::new(ip(net, host), 8080))
                .await
                .unwrap(),
        )
    };
    let ours = listen(3).await;
    let nobody = listen(99).await; // no workload at all
    let other_node = listen(4).await; // "other", a workload of node-c
    let same_node = listen(5).await; // "neighbour", node-b's other workload
    let mut c = raw_h2(&mesh, hb).await;
    for (stream, host) in [(1, 99), (3, 4), (5, 5)] {
        let authority = format!("{}:8080", ip(net, host));
        c.headers(stream, &connect_to(&authority)).await;
        assert_eq!(
            c.until_stream_end(stream).await,
            RawEnd::Status(400),
            "{authority}"
        );
    }
    tokio::time::sleep(NO_DIAL_WINDOW).await;
    for (what, seen) in [
        ("nobody", &nobody),
        ("node-c's workload", &other_node),
        ("node-b's other workload", &same_node),
        ("ours", &ours),
    ] {
        assert_eq!(seen.accepted(), 0, "{what} was dialed");
    }
    assert_eq!(node.rejections.count("hbone", "authority_not_local"), 2);
    assert_eq!(node.rejections.count("hbone", "authority_not_owned"), 1);
    let good = format!("{}:8080", ip(net, 3));
    c.headers(7, &connect_to(&good)).await;
    assert_eq!(c.until_stream_end(7).await, RawEnd::Status(200));
    wait_until(
        "the good CONNECT to be dialed",
        std::time::Duration::from_secs(5),
        || ours.accepted() == 1,
    )
    .await;
    assert_eq!(
        nobody.accepted() + other_node.accepted() + same_node.accepted(),
        0
    );
}

/// Reliability #11: DATA sent in the same write as the CONNECT, before any answer, to a target
/// the policy denies (401) and to a port nothing listens on (503): not one byte reaches an
/// upstream. The control: the same early DATA on an allowed CONNECT is delivered exactly, so
/// the upstream counter would have seen a leak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_before_the_answer_to_a_denied_or_unreachable_target_reaches_no_upstream() {
    let net = 103;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let deny = "policies:\n  - name: deny-client\n    namespace: default\n    scope: namespace\n    action: deny\n    rules:\n      - clauses:\n          - matches:\n              - principals: [\"cluster.local/ns/default/sa/client\"]\n";
    let text = node_yaml(net, "node-b", 3, &mesh.ca_dir, &format!("{w}{deny}"));
    let (node, _) = mesh.node_from_file("node-b", &text).await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let upstream = count_upstream(app);
    let hb = SocketAddr::new(ip(net, 3), 15008);
    let app_addr = format!("{}:8080", ip(net, 3));
    let closed = format!("{}:9", ip(net, 3));
    let early = vec![0x5a; 16 * 1024];

    // Denied: the policy names the "client" identity.
    let mut denied = raw_h2_as(&mesh, hb, "client").await;
    denied
        .headers_and_data(1, &connect_to(&app_addr), &early)
        .await;
    assert_eq!(denied.until_stream_end(1).await, RawEnd::Status(401));
    // Unreachable: an allowed identity, a port with nothing behind it.
    let mut allowed = raw_h2_as(&mesh, hb, "other").await;
    allowed
        .headers_and_data(1, &connect_to(&closed), &early)
        .await;
    assert_eq!(allowed.until_stream_end(1).await, RawEnd::Status(503));

    tokio::time::sleep(NO_DIAL_WINDOW).await;
    assert_eq!(upstream.accepted(), 0, "a refused CONNECT was dialed");
    assert!(upstream.bytes().is_empty(), "early bytes reached the app");
    assert_eq!(node.rejections.count("hbone", "denied_by_policy"), 1);

    // The control: allowed and reachable, the early bytes arrive, exactly.
    allowed
        .headers_and_data(3, &connect_to(&app_addr), b"early and allowed")
        .await;
    assert_eq!(allowed.until_stream_end(3).await, RawEnd::Status(200));
    wait_until(
        "the allowed early bytes to reach the app",
        std::time::Duration::from_secs(5),
        || upstream.bytes() == b"early and allowed",
    )
    .await;
    assert_eq!(upstream.accepted(), 1);
}

/// Reliability #4 on the wire: a CONNECT carrying `:path` or `:scheme`, a repeated
/// pseudo-header, or a pseudo-header after a regular one is a stream error (RST_STREAM
/// PROTOCOL_ERROR, h2's answer before zmesh sees the request); the connection carries a good
/// CONNECT afterwards, which is the only dial. (An upper-case name is h2's connection error,
/// recorded in `malformed_header_blocks_get_h2s_answer_and_nothing_is_dialed`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_connect_pseudo_headers_are_stream_errors_and_never_dialed() {
    let net = 104;
    let (mesh, app) = node_b(net).await;
    let upstream = count_upstream(app);
    let hb = SocketAddr::new(ip(net, 3), 15008);
    let good = format!("{}:8080", ip(net, 3));
    let g = good.as_str();
    let bad: [&[(&str, &str)]; 6] = [
        &[(":method", "CONNECT"), (":authority", g), (":path", "/")],
        &[
            (":method", "CONNECT"),
            (":authority", g),
            (":scheme", "https"),
        ],
        &[(":method", "CONNECT"), (":authority", g), (":authority", g)],
        &[
            (":method", "CONNECT"),
            (":method", "CONNECT"),
            (":authority", g),
        ],
        &[(":method", "CONNECT"), ("x-early", "1"), (":authority", g)],
        &[(":authority", g)], // no :method
    ];
    let mut c = raw_h2(&mesh, hb).await;
    let mut stream = 1;
    for fields in bad {
        c.headers(stream, fields).await;
        assert_eq!(
            c.until_stream_end(stream).await,
            RawEnd::Reset(1), // PROTOCOL_ERROR, on the stream only
            "{fields:?}"
        );
        stream += 2;
    }
    tokio::time::sleep(NO_DIAL_WINDOW).await;
    assert_eq!(upstream.accepted(), 0, "a malformed CONNECT was dialed");
    c.headers(stream, &connect_to(g)).await;
    assert_eq!(c.until_stream_end(stream).await, RawEnd::Status(200));
    wait_until(
        "the good CONNECT to be dialed",
        std::time::Duration::from_secs(5),
        || upstream.accepted() == 1,
    )
    .await;
}
