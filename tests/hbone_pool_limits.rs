//! Tier (b), reliability #9 from the client side: node A's HBONE pool against a peer that
//! allows only a few streams per connection. The peer is an HBONE server built here (mutual
//! TLS with the destination's certificate, ALPN h2, h2 with SETTINGS_MAX_CONCURRENT_STREAMS 3)
//! standing in for node B, so the limit is the peer's own, not the pool's cap of 100.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{Method, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const NET: u8 = 188;
/// Streams the stand-in peer allows per connection.
const LIMIT: usize = 3;
const TUNNELS: usize = 10;
/// Bytes each tunnel carries each way after it is open.
const BYTES: usize = 256 * 1024;

/// What the stand-in peer saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    streams: AtomicUsize,
    /// Most streams open at once on any one connection.
    most_at_once: AtomicUsize,
    /// Requests that were not CONNECT (answered with nothing).
    not_connect: Mutex<Vec<String>>,
}

/// Echoes one CONNECT stream: 200, then every byte back, END_STREAM after the client's.
async fn echo(mut recv: h2::RecvStream, mut send: h2::SendStream<Bytes>) {
    while let Some(chunk) = recv.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = recv.flow_control().release_capacity(chunk.len());
        if send.send_data(chunk, false).is_err() {
            return;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// An HBONE peer at `addr` presenting `server`'s certificate from the mesh CA, allowing LIMIT
/// streams per connection.
async fn peer(mesh: &Mesh, addr: SocketAddr, seen: Arc<Seen>) {
    let (cert, mgr) = mesh.cert(&id("server"));
    let cfg = Arc::new(zmesh::tls::server_config(&cert, &mgr.trust()).unwrap());
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            seen.connections.fetch_add(1, Ordering::SeqCst);
            let (cfg, seen) = (cfg.clone(), seen.clone());
            tokio::spawn(async move {
                let tls = tokio_rustls::TlsAcceptor::from(cfg)
                    .accept(tcp)
                    .await
                    .unwrap();
                let mut h2 = h2::server::Builder::new()
                    .max_concurrent_streams(LIMIT as u32)
                    .handshake::<_, Bytes>(tls)
                    .await
                    .unwrap();
                let open = Arc::new(AtomicUsize::new(0));
                while let Some(Ok((req, mut respond))) = h2.accept().await {
                    seen.streams.fetch_add(1, Ordering::SeqCst);
                    if req.method() != Method::CONNECT {
                        seen.not_connect.lock().unwrap().push(req.uri().to_string());
                        continue;
                    }
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.most_at_once.fetch_max(now, Ordering::SeqCst);
                    let resp = Response::builder().status(StatusCode::OK).body(()).unwrap();
                    let send = respond.send_response(resp, false).unwrap();
                    let open = open.clone();
                    tokio::spawn(async move {
                        echo(req.into_body(), send).await;
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
        }
    });
}

/// TUNNELS applications connect through node A at once; each tunnel is open (its first bytes
/// came back) before any of them goes on, so the peer's limit of LIMIT streams per connection
/// is what the pool must work with. The pool opens ceil(TUNNELS / LIMIT) connections, never
/// more than LIMIT streams on one, and every tunnel carries its bytes both ways intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_opens_more_connections_to_a_peer_with_few_streams_and_every_tunnel_completes() {
    let mut mesh = Mesh::new(NET);
    let w = client_server_workloads(NET, "server", &[]);
    let node_a = mesh.node("node-a", 2, &w).await;
    let seen = Arc::new(Seen::default());
    peer(&mesh, SocketAddr::new(ip(NET, 3), 15008), seen.clone()).await;
    let entry = capture_to(
        node_a.clone(),
        ip(NET, 2),
        SocketAddr::new(ip(NET, 3), 8080),
    )
    .await;

    let all_open = Arc::new(tokio::sync::Barrier::new(TUNNELS));
    let tunnels: Vec<_> = (0..TUNNELS)
        .map(|i| {
            let all_open = all_open.clone();
            tokio::spawn(async move {
                let mut c = connect_from(ip(NET, 2), entry).await.unwrap();
                let hello = format!("tunnel {i:02}");
                c.write_all(hello.as_bytes()).await.unwrap();
                let mut back = vec![0u8; hello.len()];
                c.read_exact(&mut back).await.unwrap();
                assert_eq!(back, hello.as_bytes());
                all_open.wait().await;
                let data: Vec<u8> = (0..BYTES).map(|n| (n * 31 + i * 7) as u8).collect();
                let got = exchange(&mut c, &data).await;
                assert_eq!(got.len(), BYTES, "tunnel {i}: bytes back");
                assert_eq!(Sha256::digest(&got), Sha256::digest(&data), "tunnel {i}");
            })
        })
        .collect();
    for t in tunnels {
        t.await.unwrap();
    }
    let want = TUNNELS.div_ceil(LIMIT);
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        want,
        "{TUNNELS} tunnels at once over connections of {LIMIT} streams"
    );
    assert_eq!(seen.streams.load(Ordering::SeqCst), TUNNELS);
    assert!(seen.not_connect.lock().unwrap().is_empty());
    assert!(seen.most_at_once.load(Ordering::SeqCst) <= LIMIT);
    assert_eq!(node_a.pool.connections(), want);
}
