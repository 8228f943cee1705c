//! Tier (b): client → node A → HBONE → node B → server, all in this process over 127.0.0.0/8.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use zmesh_testbed::seeded_bytes;

const MIB: usize = 1024 * 1024;

/// Starts node A (client at .2) and node B (server at .3) and returns the mesh.
async fn two_nodes(net: u8) -> (Mesh, Arc<zmesh::proxy::Node>) {
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let a = mesh.node("node-a", 2, &w).await;
    mesh.node("node-b", 3, &w).await;
    (mesh, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_with_half_close_and_source_ip() {
    let net = 11;
    let (_mesh, a) = two_nodes(net).await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    let entry = capture_to(a, ip(net, 2), dst).await;

    let upload = seeded_bytes(1, 64 * MIB);
    let download = seeded_bytes(2, 64 * MIB);
    let want_up = Sha256::digest(&upload);
    let want_down = Sha256::digest(&download);

    let server = tokio::spawn(async move {
        let (mut s, peer) = app.accept().await.unwrap();
        let mut got = Vec::with_capacity(64 * MIB);
        // Reads to EOF: the client's half-close must arrive as FIN through both tunnels.
        s.read_to_end(&mut got).await.unwrap();
        // ...and the reply still flows after it (reliability #27).
        s.write_all(&download).await.unwrap();
        s.shutdown().await.unwrap();
        (peer, Sha256::digest(&got), got.len())
    });

    let mut c = connect_from(ip(net, 2), entry).await.unwrap();
    let (mut rd, mut wr) = c.split();
    let send = async {
        wr.write_all(&upload).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::with_capacity(64 * MIB);
        rd.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(send, recv);
    let (peer, server_hash, server_len) = server.await.unwrap();
    assert_eq!(server_len, 64 * MIB);
    assert_eq!(server_hash, want_up, "upload arrived intact");
    assert_eq!(got.len(), 64 * MIB);
    assert_eq!(Sha256::digest(&got), want_down, "download arrived intact");
    assert_eq!(
        peer.ip(),
        ip(net, 2),
        "the app sees the client workload's address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_share_the_pool() {
    let net = 12;
    let (mesh, a) = two_nodes(net).await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    spawn_echo(app);
    let entry = capture_to(a.clone(), ip(net, 2), dst).await;
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        tasks.push(tokio::spawn(async move {
            let data = seeded_bytes(100 + i, 64 * 1024 + i as usize);
            let mut c = connect_from(ip(net, 2), entry).await.unwrap();
            let got = exchange(&mut c, &data).await;
            assert_eq!(
                Sha256::digest(&got),
                Sha256::digest(&data),
                "connection {i}"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 200 streams at ≤100 per connection: the pool needed at least two connections, and
    // single-flight dialing kept it from opening one per stream.
    let conns = a.pool.connections();
    assert!((2..=10).contains(&conns), "pool holds {conns} connections");
    drop(mesh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_san_fails_without_plaintext_retry() {
    let net = 13;
    let mut mesh = Mesh::new(net);
    // Node A believes the server runs as "server"; node B gives it "impostor".
    let a = mesh
        .node("node-a", 2, &client_server_workloads(net, "server", &[]))
        .await;
    mesh.node("node-b", 3, &client_server_workloads(net, "impostor", &[]))
        .await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    let entry = capture_to(a, ip(net, 2), dst).await;

    // The reset can surface at connect, on the write or on the read (loopback is fast).
    let r = async {
        let mut c = connect_from(ip(net, 2), entry).await?;
        c.write_all(b"secret plaintext").await?;
        let mut buf = [0u8; 16];
        c.read(&mut buf).await
    }
    .await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the app must see a reset, got {r:?}"
    );
    // Nothing reached the server app, in plaintext or otherwise.
    let accepted = tokio::time::timeout(std::time::Duration::from_millis(300), app.accept()).await;
    assert!(accepted.is_err(), "server app got a connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_refusing_gives_the_app_a_reset() {
    let net = 14;
    let (_mesh, a) = two_nodes(net).await;
    // Nothing listens on the server's port 9 (reliability #26).
    let entry = capture_to(a, ip(net, 2), SocketAddr::new(ip(net, 3), 9)).await;
    let r = async {
        // The reset can arrive before connect() even returns on loopback.
        let mut c = connect_from(ip(net, 2), entry).await?;
        let mut buf = [0u8; 1];
        c.read(&mut buf).await
    }
    .await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "got {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_answers_200_once_started_and_404_elsewhere() {
    let net = 15;
    let (_mesh, _a) = two_nodes(net).await;
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(SocketAddr::new(ip(net, 2), 15021))
            .await
            .unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let ready = get("/healthz/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let other = get("/nope").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_do_not_starve_a_busy_sibling_of_connection_window() {
    // Regression: streams that reserved send window while idle hoarded the shared 16 MiB
    // connection window, so past ~64 idle streams a busy one stalled forever.
    let net = 16;
    let (_mesh, a) = two_nodes(net).await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    spawn_echo(app);
    let entry = capture_to(a, ip(net, 2), dst).await;
    let mut idle = Vec::new();
    for _ in 0..99 {
        let mut c = connect_from(ip(net, 2), entry).await.unwrap();
        c.write_all(b"h").await.unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.unwrap();
        idle.push(c);
    }
    let data = seeded_bytes(9, 16 * MIB);
    let mut c = connect_from(ip(net, 2), entry).await.unwrap();
    let got = exchange(&mut c, &data).await;
    assert_eq!(Sha256::digest(&got), Sha256::digest(&data));
    drop(idle);
}
