//! Tier (b): hostile HTTP/2 at the frame level against a node's :15008 (reliability #5, #6, #8
//! and #10). The HBONE server (`src/hbone/server.rs`) is shared by the node and the waypoint,
//! so what holds here holds on both. A small frame writer/reader written in this file speaks
//! over a real mutual-TLS connection with a valid client certificate from the mesh CA, so every
//! frame reaches h2 and zmesh exactly as an attacker would send it. HPACK is encoded by hand
//! (literals without indexing, one literal with incremental indexing, indexed references).
//!
//! The tests take one lock and run one at a time, so each runs at full speed and counts its
//! own sockets (the in-process node's and the attacker's) undisturbed.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use zmesh::hbone::{MAX_FRAME_SIZE, SERVER_MAX_HEADER_LIST, SERVER_MAX_STREAMS};

/// One test at a time (descriptor counts are per process).
static SERIAL: Mutex<()> = Mutex::const_new(());

type Tls = TlsStream<TcpStream>;

// Frame types and flags (RFC 9113 §6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
// Error codes (RFC 9113 §7).
const PROTOCOL_ERROR: u32 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// How long any single answer from the node may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(len < 1 << 24, "frame payload too long");
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header block as HEADERS plus CONTINUATION frames of at most `chunk` bytes, END_HEADERS on
/// the last one.
fn header_frames(stream: u32, block: &[u8], chunk: usize) -> Vec<u8> {
    let parts: Vec<&[u8]> = block.chunks(chunk).collect();
    let mut out = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let flags = if i + 1 == parts.len() { END_HEADERS } else { 0 };
        out.extend(frame(kind, flags, stream, part));
    }
    out
}

// ---- HPACK by hand (RFC 7541) ----

/// An integer with an N-bit prefix (§5.1); `first` holds the representation's pattern bits.
fn hpack_int(dst: &mut Vec<u8>, first: u8, prefix_bits: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        dst.push(first | v as u8);
        return;
    }
    dst.push(first | max as u8);
    v -= max;
    while v >= 128 {
        dst.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    dst.push(v as u8);
}

/// A string literal without Huffman coding (§5.2).
fn hpack_str(dst: &mut Vec<u8>, s: &[u8]) {
    hpack_int(dst, 0x00, 7, s.len());
    dst.extend_from_slice(s);
}

/// Literal header field without indexing, new name (§6.2.2).
fn literal(dst: &mut Vec<u8>, name: &str, value: &[u8]) {
    dst.push(0x00);
    hpack_str(dst, name.as_bytes());
    hpack_str(dst, value);
}

/// Literal header field with incremental indexing, new name (§6.2.1): enters the dynamic table.
fn literal_indexed(dst: &mut Vec<u8>, name: &str, value: &[u8]) {
    dst.push(0x40);
    hpack_str(dst, name.as_bytes());
    hpack_str(dst, value);
}

/// Indexed header field (§6.1); 62 is the newest dynamic-table entry.
fn indexed(dst: &mut Vec<u8>, index: usize) {
    hpack_int(dst, 0x80, 7, index);
}

fn connect_block(authority: &str) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, ":method", b"CONNECT");
    literal(&mut b, ":authority", authority.as_bytes());
    b
}

/// Decodes the HPACK Huffman code of a string of decimal digits (RFC 7541 Appendix B: '0'-'2'
/// are 5-bit codes 0-2, '3'-'9' are 6-bit codes 0x19-0x1f), which is all a `:status` holds.
fn huffman_digits(raw: &[u8]) -> Option<String> {
    let total = raw.len() * 8;
    let bit = |i: usize| (raw[i / 8] >> (7 - i % 8)) & 1;
    let (mut i, mut out) = (0, String::new());
    while i < total {
        let rest = total - i;
        // Padding: the most significant bits of EOS, all ones, shorter than a byte.
        if rest < 8 && (i..total).all(|j| bit(j) == 1) {
            break;
        }
        if rest < 5 {
            return None;
        }
        let v5 = (0..5).fold(0u8, |a, k| a << 1 | bit(i + k));
        if v5 <= 2 {
            out.push(char::from(b'0' + v5));
            i += 5;
            continue;
        }
        if rest < 6 {
            return None;
        }
        let v6 = v5 << 1 | bit(i + 5);
        if !(0x19..=0x1f).contains(&v6) {
            return None;
        }
        out.push(char::from(b'3' + v6 - 0x19));
        i += 6;
    }
    Some(out)
}

/// Reads `:status` out of a response header block: the node's responses carry nothing else.
/// h2 encodes a status outside the static table as a Huffman literal with incremental
/// indexing, and refers to it by index afterwards, so the statuses it added are remembered.
#[derive(Default)]
struct StatusDecoder {
    /// Newest first: dynamic index 62 is `added[0]`.
    added: Vec<u16>,
}

impl StatusDecoder {
    fn status(&mut self, block: &[u8]) -> Option<u16> {
        let first = *block.first()?;
        if first & 0x80 != 0 {
            return match (first & 0x7f) as usize {
                8 => Some(200),
                9 => Some(204),
                10 => Some(206),
                11 => Some(304),
                12 => Some(400),
                13 => Some(404),
                14 => Some(500),
                i if i >= 62 => self.added.get(i - 62).copied(),
                _ => None,
            };
        }
        let (name, add) = match first & 0xc0 {
            0x40 => (first & 0x3f, true),
            _ if first & 0xe0 == 0 => (first & 0x0f, false),
            _ => return None,
        };
        if !(8..=14).contains(&name) {
            return None;
        }
        let len_byte = *block.get(1)?;
        let raw = block.get(2..2 + (len_byte & 0x7f) as usize)?;
        let text = if len_byte & 0x80 != 0 {
            huffman_digits(raw)?
        } else {
            String::from_utf8(raw.to_vec()).ok()?
        };
        let code = text.parse().ok()?;
        if add {
            self.added.insert(0, code);
        }
        Some(code)
    }
}

/// What the raw client saw from the node.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    SettingsAck,
    Headers { stream: u32, status: Option<u16> },
    Data { stream: u32, len: usize },
    Reset { stream: u32, code: u32 },
    GoAway { code: u32, debug: String },
    Closed,
}

/// A hand-made HTTP/2 client over mutual TLS. A reader task turns the node's frames into
/// `Ev`s and answers SETTINGS and PING itself.
struct Raw {
    w: Arc<Mutex<WriteHalf<Tls>>>,
    ev: mpsc::UnboundedReceiver<Ev>,
    /// Set when a GOAWAY arrived or the connection ended.
    ended: Arc<AtomicBool>,
    /// Bytes of frames written so far (preface included).
    sent: usize,
    /// The reader task holds the read half: ended with the client, so the socket closes.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Raw {
    /// TLS with a valid client certificate, the preface, our SETTINGS (`settings`), and the
    /// exchange finished both ways: after it the node's own settings (1 MiB frames) apply.
    async fn connect(
        cfg: Arc<rustls::ClientConfig>,
        addr: SocketAddr,
        settings: &[(u16, u32)],
    ) -> Raw {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = TlsConnector::from(cfg)
            .connect(zmesh::tls::placeholder_server_name(), tcp)
            .await
            .unwrap();
        let mut payload = Vec::new();
        for (setting, value) in settings {
            payload.extend_from_slice(&setting.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &payload));
        // The preface goes out before the reader may acknowledge the node's SETTINGS.
        tls.write_all(&hello).await.unwrap();
        tls.flush().await.unwrap();
        let (r, w) = tokio::io::split(tls);
        let w = Arc::new(Mutex::new(w));
        let (tx, ev) = mpsc::unbounded_channel();
        let ended = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_frames(r, w.clone(), tx, ended.clone()));
        let mut raw = Raw {
            w,
            ev,
            ended,
            sent: hello.len(),
            reader,
        };
        assert_eq!(raw.next().await, Ev::SettingsAck);
        raw
    }

    /// Writes `bytes`; false once the node has closed the connection.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        let mut w = self.w.lock().await;
        let ok = w.write_all(bytes).await.is_ok() && w.flush().await.is_ok();
        if ok {
            self.sent += bytes.len();
        }
        ok
    }

    fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Waits up to `d` for a GOAWAY or the end of the connection.
    async fn ended_within(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while !self.ended() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.ended()
    }

    async fn next(&mut self) -> Ev {
        tokio::time::timeout(ANSWER_WITHIN, self.ev.recv())
            .await
            .expect("the node answered within 5 s")
            .unwrap_or(Ev::Closed)
    }

    /// The first response HEADERS or RST_STREAM on `stream`, or how the connection ended.
    async fn until_stream(&mut self, stream: u32) -> Ev {
        loop {
            match self.next().await {
                e @ (Ev::Headers { stream: s, .. } | Ev::Reset { stream: s, .. })
                    if s == stream =>
                {
                    return e
                }
                e @ (Ev::GoAway { .. } | Ev::Closed) => return e,
                _ => {}
            }
        }
    }

    /// Skips stream events until a GOAWAY or the end of the connection; counts the resets.
    async fn until_goaway(&mut self) -> (Ev, usize) {
        let mut resets = 0;
        loop {
            match self.next().await {
                e @ (Ev::GoAway { .. } | Ev::Closed) => return (e, resets),
                Ev::Reset { .. } => resets += 1,
                _ => {}
            }
        }
    }
}

async fn read_frames(
    mut r: ReadHalf<Tls>,
    w: Arc<Mutex<WriteHalf<Tls>>>,
    tx: mpsc::UnboundedSender<Ev>,
    ended: Arc<AtomicBool>,
) {
    let mut statuses = StatusDecoder::default();
    loop {
        let mut head = [0u8; 9];
        if r.read_exact(&mut head).await.is_err() {
            break;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if r.read_exact(&mut payload).await.is_err() {
            break;
        }
        let ev = match kind {
            SETTINGS if flags & ACK != 0 => Ev::SettingsAck,
            SETTINGS => {
                let mut w = w.lock().await;
                let _ = w.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
                let _ = w.flush().await;
                continue;
            }
            PING if flags & ACK == 0 => {
                let mut w = w.lock().await;
                let _ = w.write_all(&frame(PING, ACK, 0, &payload)).await;
                let _ = w.flush().await;
                continue;
            }
            HEADERS => Ev::Headers {
                stream,
                status: statuses.status(&payload),
            },
            DATA => Ev::Data { stream, len },
            RST_STREAM if len == 4 => Ev::Reset {
                stream,
                code: u32::from_be_bytes(payload[..4].try_into().unwrap()),
            },
            GOAWAY if len >= 8 => {
                ended.store(true, Ordering::SeqCst);
                Ev::GoAway {
                    code: u32::from_be_bytes(payload[4..8].try_into().unwrap()),
                    debug: String::from_utf8_lossy(&payload[8..]).into_owned(),
                }
            }
            _ => continue,
        };
        if tx.send(ev).is_err() {
            break;
        }
    }
    ended.store(true, Ordering::SeqCst);
    let _ = tx.send(Ev::Closed);
}

// ---- the node under attack ----

struct Target {
    mesh: Mesh,
    node: Arc<zmesh::proxy::Node>,
    hbone: SocketAddr,
    net: u8,
    /// `ip:8080` of the local workload: a CONNECT the node accepts.
    good: String,
    /// Connections the node opened to the app (each is one dial).
    dials: Arc<AtomicUsize>,
    /// A valid client certificate (`client`) from the mesh CA, made once.
    client: Arc<rustls::ClientConfig>,
}

/// Node B owning the server workload at 127.<net>.0.3, with an app on :8080 that counts the
/// node's dials and holds each connection until the node closes it (so a tunnel stays open
/// while it is attacked, and a leaked upstream socket shows in the descriptor count).
async fn target(net: u8) -> Target {
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let node = mesh.node("node-b", 3, &w).await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dials = Arc::new(AtomicUsize::new(0));
    let counted = dials.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    // The counter sees this node: its :15008 and the app's listener at least.
    assert!(net_sockets(net) >= 2, "sockets on 127.{net}/16 not found");
    let (cert, mgr) = cert_from(&mesh.ca_dir, &id("client"));
    let client = zmesh::tls::client_config(&cert, &mgr.trust(), vec![id("server")]).unwrap();
    Target {
        client: Arc::new(client),
        mesh,
        node,
        hbone: SocketAddr::new(ip(net, 3), 15008),
        net,
        good: format!("{}:8080", ip(net, 3)),
        dials,
    }
}

impl Target {
    async fn raw(&self) -> Raw {
        Raw::connect(self.client.clone(), self.hbone, &[]).await
    }

    fn dials(&self) -> usize {
        self.dials.load(Ordering::SeqCst)
    }

    /// Every rejection the node counted, all reasons and listeners.
    fn rejections(&self) -> f64 {
        self.node.rejections.series().iter().map(|(_, n)| n).sum()
    }

    /// The node stays healthy: a normal client on a new connection gets its 200 and a dial.
    async fn assert_serves_a_normal_client(&self) {
        let before = self.dials();
        let mut send = hbone(&self.mesh.ca_dir, &id("client"), &id("server"), self.hbone)
            .await
            .expect("a normal client connects after the attack");
        assert_eq!(
            status(&mut send, connect_req(&self.good)).await,
            Ok(StatusCode::OK)
        );
        wait_until("the normal CONNECT's dial", ANSWER_WITHIN, || {
            self.dials() == before + 1
        })
        .await;
    }
}

/// This process's TCP sockets (descriptors) with an end on 127.<net>.0.0/16: the node's and
/// the attacker's for one test. Scoped to the net because other tests' nodes start and stop
/// their own listeners (on their own threads) at any time.
fn net_sockets(net: u8) -> usize {
    let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let in_net = |hex_addr: &str| {
        let ip = hex_addr.split(':').next().unwrap_or("");
        // /proc/net/tcp prints the address as a native-endian u32.
        let b = u32::from_str_radix(ip, 16).unwrap_or(0).to_le_bytes();
        b[0] == 127 && b[1] == net
    };
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 9 && (in_net(f[1]) || in_net(f[2])) && ours.contains(f[9])
        })
        .count()
}

/// Waits for this test's sockets (the node's included) to come back to `base`: the node
/// closed its end of every attacking connection and of every tunnel's upstream.
async fn assert_sockets_back_to(net: u8, base: usize) {
    let end = Instant::now() + ANSWER_WITHIN;
    while net_sockets(net) > base {
        assert!(
            Instant::now() < end,
            "sockets on 127.{net}/16: {base} -> {} after the attack",
            net_sockets(net)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_calm(ev: &Ev, what: &str) {
    assert!(
        matches!(ev, Ev::GoAway { code, .. } if *code == ENHANCE_YOUR_CALM),
        "{what}: expected GOAWAY ENHANCE_YOUR_CALM, got {ev:?}"
    );
}

/// `assert_calm` for one of h2's own limits, named by the GOAWAY's debug data.
fn assert_calm_because(ev: &Ev, what: &str, why: &str) {
    assert_calm(ev, what);
    assert!(
        matches!(ev, Ev::GoAway { debug, .. } if debug == why),
        "{what}: expected h2's reason {why:?}, got {ev:?}"
    );
}

/// Waits until the node counted `n` closes for `reason` on its HBONE listener (and the label
/// the GOAWAY's reason maps to is that one).
async fn assert_counted(t: &Target, reason: &'static str, n: u64) {
    let counted = || t.node.rejections.count("hbone", reason);
    let end = Instant::now() + ANSWER_WITHIN;
    while counted() < n && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        counted(),
        n,
        "closes counted as {reason:?}; all: {:?}",
        t.node.rejections.series()
    );
}

// ---- reliability #5: oversized header lists and HPACK amplification ----

/// Between SERVER_MAX_HEADER_LIST (64 KiB) and h2's abuse limit (4 times that), a header list
/// is refused on its own stream with 431 and nothing is dialed; the connection and its HPACK
/// state stay usable. Both a plain 80 KiB header and a small block that references one
/// dynamic-table entry 20 times (~84 KB decoded from ~4 KB) take that path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_list_over_the_limit_is_431_on_its_stream_and_the_connection_goes_on() {
    let _one = SERIAL.lock().await;
    let t = target(111).await;
    let fds = net_sockets(t.net);
    let limit = SERVER_MAX_HEADER_LIST as usize;
    let mut c = t.raw().await;

    // A single 80 KiB value, in 16 KiB HEADERS + CONTINUATION frames.
    let mut big = connect_block(&t.good);
    literal(&mut big, "x-big", &vec![b'a'; limit + 16 * 1024]);
    assert!(c.send(&header_frames(1, &big, 16 * 1024)).await);
    assert_eq!(
        c.until_stream(1).await,
        Ev::Headers {
            stream: 1,
            status: Some(431)
        }
    );
    // The same connection carries a good CONNECT.
    assert!(
        c.send(&header_frames(3, &connect_block(&t.good), 1 << 14))
            .await
    );
    assert_eq!(
        c.until_stream(3).await,
        Ev::Headers {
            stream: 3,
            status: Some(200)
        }
    );

    // Amplification within the abuse limit: one 4,000-byte entry, then 20 one-byte references.
    let mut amp = connect_block(&t.good);
    literal_indexed(&mut amp, "x-amp", &[b'b'; 4000]);
    for _ in 0..20 {
        indexed(&mut amp, 62);
    }
    assert!(amp.len() < 4200);
    assert!(c.send(&header_frames(5, &amp, 1 << 14)).await);
    assert_eq!(
        c.until_stream(5).await,
        Ev::Headers {
            stream: 5,
            status: Some(431)
        }
    );
    // HPACK state survived (the entry is still indexed for the next block).
    let mut after = connect_block(&t.good);
    indexed(&mut after, 62);
    assert!(c.send(&header_frames(7, &after, 1 << 14)).await);
    assert_eq!(
        c.until_stream(7).await,
        Ev::Headers {
            stream: 7,
            status: Some(200)
        }
    );
    wait_until("the two good CONNECTs' dials", ANSWER_WITHIN, || {
        t.dials() == 2
    })
    .await;
    assert!(!c.ended(), "a stream-level refusal ended the connection");
    drop(c);
    assert_sockets_back_to(t.net, fds).await;
    t.assert_serves_a_normal_client().await;
    assert_eq!(t.dials(), 3, "an oversized request was dialed");
}

/// Past four times the limit (h2's abuse limit, 256 KiB decoded) the connection is closed with
/// GOAWAY ENHANCE_YOUR_CALM: a 300 KiB literal, and an HPACK bomb whose 100 KB block would
/// decode to 400 MB (one 4,000-byte entry referenced 100,000 times). Decoding stops at the
/// limit, so the bomb is refused as fast as the plain form; nothing is dialed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_list_past_the_abuse_limit_and_hpack_bombs_close_the_connection() {
    let _one = SERIAL.lock().await;
    let t = target(112).await;
    let fds = net_sockets(t.net);
    let rejected = t.rejections();
    let limit = SERVER_MAX_HEADER_LIST as usize;

    let mut huge = connect_block(&t.good);
    literal(&mut huge, "x-huge", &vec![b'a'; 4 * limit + 44 * 1024]);
    let mut bomb = connect_block(&t.good);
    literal_indexed(&mut bomb, "x-amp", &[b'b'; 4000]);
    for _ in 0..100_000 {
        indexed(&mut bomb, 62);
    }
    for (what, block) in [("300 KiB literal", huge), ("HPACK bomb", bomb)] {
        assert!(block.len() < MAX_FRAME_SIZE as usize);
        let mut c = t.raw().await;
        let start = Instant::now();
        // One HEADERS frame: the node's 1 MiB frame size applies after the SETTINGS exchange.
        assert!(c.send(&header_frames(1, &block, block.len())).await);
        let (end, _) = c.until_goaway().await;
        assert_calm_because(&end, what, "header_list_way_too_large");
        eprintln!("{what}: {end:?} after {:?}", start.elapsed());
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{what}: refused only after {:?}",
            start.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(t.dials(), 0, "an oversized request was dialed");
    assert_sockets_back_to(t.net, fds).await;
    wait_until("both closes counted", ANSWER_WITHIN, || {
        t.rejections() == rejected + 2.0
    })
    .await;
    eprintln!("rejections: {:?}", t.node.rejections.series());
    assert_counted(&t, "header_list_too_large", 2).await;
    t.assert_serves_a_normal_client().await;
}

// ---- reliability #6: CONTINUATION flood ----

/// HEADERS without END_HEADERS, then CONTINUATION frames that never end the block. h2 allows
/// five CONTINUATION frames per block at the node's settings (64 KiB header list, 1 MiB frames)
/// and then closes with GOAWAY ENHANCE_YOUR_CALM. Three forms, each on its own connection:
/// empty frames (which never grow the header list), 1 KiB frames of small headers, and 1 MiB
/// frames carrying one string that never completes (h2 must buffer it whole to decode it).
/// The flood is paced (a short wait for the GOAWAY after each batch) so that "bytes sent before
/// the close" measures the node, not the socket buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_closed_within_a_bounded_number_of_bytes() {
    let _one = SERIAL.lock().await;
    let t = target(113).await;
    let fds = net_sockets(t.net);
    const MIB: usize = 1024 * 1024;

    struct Flood {
        what: &'static str,
        /// The header block's start (HEADERS, no END_HEADERS).
        first: Vec<u8>,
        /// One batch of CONTINUATION frames.
        batch: Vec<u8>,
        /// The close must come before this many bytes were sent.
        bound: usize,
        /// How long to wait for the GOAWAY after each batch.
        pause: Duration,
    }
    let mut small = Vec::new();
    literal(&mut small, "x-c", &[b'c'; 1000]);
    // A value that announces 64 MiB: h2 can only buffer until the frame count stops it.
    let mut unfinished = connect_block(&t.good);
    unfinished.extend([0x00, 3, b'x', b'-', b'c']);
    hpack_int(&mut unfinished, 0x00, 7, 64 * MIB);
    let floods = [
        Flood {
            what: "empty CONTINUATION frames",
            first: frame(HEADERS, 0, 1, &connect_block(&t.good)),
            batch: frame(CONTINUATION, 0, 1, &[]).repeat(1000),
            bound: MIB,
            pause: Duration::from_millis(20),
        },
        Flood {
            what: "1 KiB CONTINUATION frames",
            first: frame(HEADERS, 0, 1, &connect_block(&t.good)),
            batch: frame(CONTINUATION, 0, 1, &small),
            bound: MIB,
            pause: Duration::from_millis(20),
        },
        Flood {
            what: "1 MiB CONTINUATION frames of one unfinished string",
            first: frame(HEADERS, 0, 1, &unfinished),
            batch: frame(CONTINUATION, 0, 1, &vec![b'a'; MAX_FRAME_SIZE as usize]),
            // Five whole frames are buffered before the sixth is refused.
            bound: 16 * MIB,
            pause: Duration::from_millis(100),
        },
    ];
    for f in floods {
        let mut c = t.raw().await;
        let start = Instant::now();
        assert!(c.send(&f.first).await);
        while !c.ended() && c.sent < f.bound {
            if !c.send(&f.batch).await {
                break;
            }
            c.ended_within(f.pause).await;
        }
        let sent = c.sent;
        let (end, _) = c.until_goaway().await;
        eprintln!(
            "{}: {end:?} after {sent} bytes, {:?}",
            f.what,
            start.elapsed()
        );
        assert_calm_because(&end, f.what, "too_many_continuations");
        assert!(sent < f.bound, "{}: still open after {sent} bytes", f.what);
    }
    assert_eq!(t.dials(), 0, "an unfinished header block was dialed");
    assert_counted(&t, "continuation_flood", 3).await;
    assert_sockets_back_to(t.net, fds).await;
    t.assert_serves_a_normal_client().await;
}

// ---- reliability #8: local-reset flood with the window held at 0 ----

/// The client advertises a stream window of 0 and never opens it, then opens stream after
/// stream that h2 itself must reset (an `:authority` that is no authority: RST_STREAM
/// PROTOCOL_ERROR before zmesh sees it). Past MAX_LOCAL_ERROR_RESETS (1,024) such resets the
/// connection is closed with GOAWAY ENHANCE_YOUR_CALM; nothing is dialed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_reset_flood_with_the_window_at_zero_is_closed_with_enhance_your_calm() {
    let _one = SERIAL.lock().await;
    let t = target(116).await;
    let fds = net_sockets(t.net);
    let mut c = Raw::connect(
        t.client.clone(),
        t.hbone,
        &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)],
    )
    .await;
    let mut bad = Vec::new();
    literal(&mut bad, ":method", b"CONNECT");
    literal(&mut bad, ":authority", b"[::1");
    // The first one shows the answer is a stream error.
    assert!(c.send(&frame(HEADERS, END_HEADERS, 1, &bad)).await);
    assert_eq!(
        c.until_stream(1).await,
        Ev::Reset {
            stream: 1,
            code: PROTOCOL_ERROR
        }
    );
    let mut stream = 3u32;
    let mut flood = Vec::new();
    for _ in 0..2000 {
        flood.extend(frame(HEADERS, END_HEADERS, stream, &bad));
        stream += 2;
    }
    for batch in flood.chunks(100 * 9 + 100 * bad.len()) {
        if c.ended() || !c.send(batch).await {
            break;
        }
    }
    let (end, resets) = c.until_goaway().await;
    eprintln!("local-reset flood: {end:?} after {} more resets", resets);
    assert_calm_because(&end, "local-reset flood", "too_many_internal_resets");
    assert!(
        resets < 1024,
        "{resets} resets sent after the first, the limit is 1,024"
    );
    assert_eq!(t.dials(), 0);
    drop(c);
    assert_sockets_back_to(t.net, fds).await;
    assert_counted(&t, "local_reset_flood", 1).await;
    t.assert_serves_a_normal_client().await;
}

/// The same flood where every reset comes after a dial ("MadeYouReset"): each stream is a good
/// CONNECT that gets its 200, then two WINDOW_UPDATEs overflow its send window, so h2 resets
/// it with FLOW_CONTROL_ERROR; the window stays at 0, so no byte ever reached the client.
/// docs/hbone.md bounds what one connection can make the node dial for nothing at
/// 32 + 100 + (seconds elapsed); the connection is closed with GOAWAY ENHANCE_YOUR_CALM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_the_node_is_made_to_send_after_its_dials_stay_under_the_dial_bound() {
    let _one = SERIAL.lock().await;
    let t = target(117).await;
    let fds = net_sockets(t.net);
    let start = Instant::now();
    let mut c = Raw::connect(
        t.client.clone(),
        t.hbone,
        &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)],
    )
    .await;
    let overflow = |stream: u32| {
        let mut f = frame(WINDOW_UPDATE, 0, stream, &0x7fff_ffffu32.to_be_bytes());
        f.extend(frame(
            WINDOW_UPDATE,
            0,
            stream,
            &0x7fff_ffffu32.to_be_bytes(),
        ));
        f
    };
    let block = connect_block(&t.good);
    let mut stream = 1u32;
    let mut streams = 0;
    while !c.ended() && streams < 3000 {
        let mut batch = Vec::new();
        for _ in 0..20 {
            batch.extend(frame(HEADERS, END_HEADERS, stream, &block));
            stream += 2;
        }
        if !c.send(&batch).await {
            break;
        }
        // Let the 200s come back (each a dial), then make the node reset those streams.
        c.ended_within(Duration::from_millis(5)).await;
        let mut resets = Vec::new();
        for s in (stream - 40..stream).step_by(2) {
            resets.extend(overflow(s));
        }
        if !c.send(&resets).await {
            break;
        }
        streams += 20;
    }
    let (end, resets) = c.until_goaway().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dials = t.dials();
    let bound = reset_dial_bound(start.elapsed());
    eprintln!("made-you-reset: {streams} streams, {resets} resets, {dials} dials (bound {bound}), {end:?}");
    assert!(
        dials <= bound,
        "{streams} streams cost {dials} dials, bound {bound}"
    );
    // zmesh's own early-reset budget trips first (a GOAWAY without h2's debug data).
    assert_calm_because(&end, "made-you-reset flood", "");
    drop(c);
    assert_sockets_back_to(t.net, fds).await;
    assert_counted(&t, "rapid_reset", 1).await;
    t.assert_serves_a_normal_client().await;
}

// ---- reliability #9: more streams than the node allows ----

/// A raw client ignores the node's SETTINGS_MAX_CONCURRENT_STREAMS (SERVER_MAX_STREAMS, 200):
/// it opens 200 good CONNECTs that each get their 200 and stay open, then five more. h2 answers
/// each of the five with RST_STREAM REFUSED_STREAM before zmesh sees it: nothing is dialed for
/// them and nothing is counted as a rejection. The connection goes on: no GOAWAY, the open
/// tunnels stay, and once the client resets one of them a new stream is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_max_concurrent_streams_are_refused_and_the_connection_goes_on() {
    let _one = SERIAL.lock().await;
    let t = target(187).await;
    let fds = net_sockets(t.net);
    let rejected = t.rejections();
    let mut c = t.raw().await;
    let block = connect_block(&t.good);
    let open = SERVER_MAX_STREAMS;
    let mut batch = Vec::new();
    for i in 0..open {
        batch.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i, &block));
    }
    assert!(c.send(&batch).await);
    let mut served = 0;
    while served < open {
        match c.next().await {
            Ev::Headers {
                status: Some(200), ..
            } => served += 1,
            e => panic!("{e:?} after {served} streams were served"),
        }
    }
    wait_until("a dial per open stream", ANSWER_WITHIN, || {
        t.dials() == open as usize
    })
    .await;

    // Five past the limit, each refused on its own stream.
    let extra: Vec<u32> = (0..5).map(|i| 1 + 2 * (open + i)).collect();
    let mut batch = Vec::new();
    for &s in &extra {
        batch.extend(frame(HEADERS, END_HEADERS, s, &block));
    }
    assert!(c.send(&batch).await);
    for &s in &extra {
        assert_eq!(
            c.until_stream(s).await,
            Ev::Reset {
                stream: s,
                code: REFUSED_STREAM
            },
            "stream {s} past the limit"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(t.dials(), open as usize, "a refused stream was dialed");
    assert!(
        !c.ended(),
        "the connection was closed for five refused streams"
    );
    assert_eq!(
        t.rejections(),
        rejected,
        "h2's refusals are not zmesh's to count"
    );

    // The client closes one tunnel; a new stream is served as soon as h2 has released it.
    assert!(
        c.send(&frame(RST_STREAM, 0, 1, &CANCEL.to_be_bytes()))
            .await
    );
    let mut next = 1 + 2 * (open + 5);
    let deadline = Instant::now() + ANSWER_WITHIN;
    loop {
        assert!(c.send(&frame(HEADERS, END_HEADERS, next, &block)).await);
        match c.until_stream(next).await {
            Ev::Headers {
                status: Some(200), ..
            } => break,
            Ev::Reset {
                code: REFUSED_STREAM,
                ..
            } if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                next += 2;
            }
            e => panic!("stream {next} after a slot was freed: {e:?}"),
        }
    }
    wait_until("the new stream's dial", ANSWER_WITHIN, || {
        t.dials() == open as usize + 1
    })
    .await;
    assert!(!c.ended());
    drop(c);
    assert_sockets_back_to(t.net, fds).await;
    t.assert_serves_a_normal_client().await;
}

// ---- reliability #10: empty-DATA flood, and its paired regression ----

/// Zero-length DATA frames (without END_STREAM) on an open tunnel: h2 tolerates 100 on a
/// connection and then closes it with GOAWAY ENHANCE_YOUR_CALM. The tunnel's upstream
/// connection is closed with it, and the close is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_flood_on_an_open_tunnel_is_closed_with_enhance_your_calm() {
    let _one = SERIAL.lock().await;
    let t = target(114).await;
    let fds = net_sockets(t.net);
    let rejected = t.rejections();
    let mut c = t.raw().await;
    assert!(
        c.send(&header_frames(1, &connect_block(&t.good), 1 << 14))
            .await
    );
    assert_eq!(
        c.until_stream(1).await,
        Ev::Headers {
            stream: 1,
            status: Some(200)
        }
    );
    let batch = frame(DATA, 0, 1, &[]).repeat(50);
    let mut frames = 0;
    while !c.ended() && frames < 5000 {
        if !c.send(&batch).await {
            break;
        }
        frames += 50;
        c.ended_within(Duration::from_millis(10)).await;
    }
    let (end, _) = c.until_goaway().await;
    eprintln!("empty-DATA flood: {end:?} after {frames} frames");
    assert_calm_because(&end, "empty-DATA flood", "too_many_data_frames");
    assert!(
        frames <= 1000,
        "still open after {frames} empty DATA frames"
    );
    drop(c);
    assert_sockets_back_to(t.net, fds).await;
    wait_until("the close counted", ANSWER_WITHIN, || {
        t.rejections() == rejected + 1.0
    })
    .await;
    eprintln!("rejections: {:?}", t.node.rejections.series());
    assert_counted(&t, "data_frame_flood", 1).await;
    t.assert_serves_a_normal_client().await;
}

/// The paired regression: the empty-DATA guard must not touch real traffic made of tiny writes.
/// An app writes 1,000,000 single bytes through node A's pool to node B (each write its own
/// syscall; node A sends what each read got, so DATA frames as small as one byte). Every byte
/// arrives (SHA-256), the tunnel ends with a clean FIN, and nothing was refused.
///
/// Then a raw h2 client sends SMALL_FRAMES one-byte DATA frames on one stream straight to node
/// B. h2 charges each DATA frame under 256 bytes against a per-connection budget of half the
/// connection window (8 MiB) until the frame is read, so at most ~32,900 one-byte frames may sit
/// unread; 30,000 always fit whatever the node's pace. (A peer that sends many more one-byte
/// frames than the node drains is closed with GOAWAY ENHANCE_YOUR_CALM: see docs/hbone.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_one_byte_writes_through_one_tunnel_arrive_intact() {
    const WRITES: usize = 1_000_000;
    const SMALL_FRAMES: usize = 30_000;
    let _one = SERIAL.lock().await;
    let net = 115;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let a = mesh.node("node-a", 2, &w).await;
    let b = mesh.node("node-b", 3, &w).await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    let (done, mut results) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Two tunnels under test, and one to show the raw connection still takes streams.
        for _ in 0..3 {
            let (mut s, _) = app.accept().await.unwrap();
            let mut got = Vec::new();
            // A clean end of stream: a reset (GOAWAY, guard) fails the read.
            let end = s.read_to_end(&mut got).await.map_err(|e| e.kind());
            let _ = done.send((end.map(|_| got.len()), Sha256::digest(&got)));
        }
    });
    let data = zmesh_testbed::seeded_bytes(10, WRITES);
    let start = Instant::now();

    let entry = capture_to(a.clone(), ip(net, 2), dst).await;
    let mut app_conn = connect_from(ip(net, 2), entry).await.unwrap();
    for byte in data.chunks(1) {
        app_conn.write_all(byte).await.unwrap();
    }
    app_conn.shutdown().await.unwrap();
    let pooled = start.elapsed();
    let pooled_result = tokio::time::timeout(Duration::from_secs(30), results.recv())
        .await
        .expect("the tunnel ended")
        .unwrap();
    eprintln!("pooled: {:?}", pooled_result.0);
    eprintln!(
        "after the pooled writes ({pooled:?}): node A {:?}, node B {:?}",
        a.rejections.series(),
        b.rejections.series()
    );

    let mut send = hbone(&mesh.ca_dir, &id("client"), &id("server"), ip_port(net))
        .await
        .unwrap();
    let (resp, mut stream) = send
        .send_request(connect_req(&dst.to_string()), false)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Held, so the stream's receive side stays open while the frames go out.
    let mut body = resp.into_body();
    for (i, byte) in data[..SMALL_FRAMES].chunks(1).enumerate() {
        stream.reserve_capacity(1);
        let capacity = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await;
        let sent = match capacity {
            Some(Ok(n)) if n >= 1 => stream.send_data(bytes::Bytes::copy_from_slice(byte), false),
            _ => Err(h2::Error::from(h2::Reason::NO_ERROR)),
        };
        if let Err(e) = sent {
            let closed = tokio::time::timeout(Duration::from_secs(1), body.data()).await;
            let conn = send.clone().ready().await.err();
            panic!(
                "frame {i}: capacity {capacity:?}, {e}; stream {closed:?}; connection {conn:?}; node B {:?}",
                b.rejections.series()
            );
        }
    }
    stream.send_data(bytes::Bytes::new(), true).unwrap();

    let direct_result = tokio::time::timeout(Duration::from_secs(30), results.recv())
        .await
        .expect("the tunnel ended")
        .unwrap();
    eprintln!(
        "{WRITES} writes through the pool in {pooled:?}, {SMALL_FRAMES} frames in {:?}",
        start.elapsed() - pooled
    );
    assert_eq!(pooled_result, (Ok(WRITES), Sha256::digest(&data)));
    assert_eq!(
        direct_result,
        (Ok(SMALL_FRAMES), Sha256::digest(&data[..SMALL_FRAMES]))
    );
    // No GOAWAY: the raw h2 connection still takes new streams.
    assert_eq!(
        status(&mut send, connect_req(&dst.to_string())).await,
        Ok(StatusCode::OK)
    );
    for node in [&a, &b] {
        assert!(
            node.rejections.series().iter().all(|(_, n)| *n == 0.0),
            "refused: {:?}",
            node.rejections.series()
        );
    }
}

fn ip_port(net: u8) -> SocketAddr {
    SocketAddr::new(ip(net, 3), 15008)
}

#[test]
fn huffman_digits_decode_rfc_7541_codes() {
    // "431": 011010 011001 00001 + seven padding ones.
    assert_eq!(huffman_digits(&[0x69, 0x90, 0xff]).as_deref(), Some("431"));
    // "200": 00010 00000 00000 + one padding one.
    assert_eq!(huffman_digits(&[0x10, 0x01]).as_deref(), Some("200"));
    assert_eq!(
        huffman_digits(&[0xff, 0xff]),
        None,
        "padding longer than 7 bits"
    );
}
