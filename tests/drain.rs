//! Tier (b): draining a node (what SIGTERM does). New connections are refused at once, a
//! transfer in flight finishes within the deadline, and at the deadline what is still open is
//! closed.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_transfers_refuses_new_ones_and_cuts_at_the_deadline() {
    let net = 63;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let a = mesh.node("node-a", 2, &w).await;
    let b = mesh.node("node-b", 3, &w).await;
    let b_running = mesh.nodes.pop().expect("node B is the last started");
    // The app: "L" gets 10 KB in ten 100 ms steps then EOF; "I" is kept open and silent.
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            let arrived_tx = arrived_tx.clone();
            tokio::spawn(async move {
                let mut kind = [0u8; 1];
                if s.read_exact(&mut kind).await.is_err() {
                    return;
                }
                let _ = arrived_tx.send(kind[0]);
                if kind[0] == b'L' {
                    for _ in 0..10 {
                        s.write_all(&[9u8; 1000]).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    s.shutdown().await.unwrap();
                } else {
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                }
            });
        }
    });
    let entry = capture_to(a.clone(), ip(net, 2), dst).await;
    let mut long = connect_from(ip(net, 2), entry).await.unwrap();
    long.write_all(b"L").await.unwrap();
    let mut idle = connect_from(ip(net, 2), entry).await.unwrap();
    idle.write_all(b"I").await.unwrap();
    // Both reached the app, over the one pooled HBONE connection node B holds for them (drain
    // counts connections, and a connection lives while any of its streams does).
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(5), arrived.recv())
            .await
            .expect("both connections reach the app");
    }
    assert_eq!(b.active_connections(), 1);
    let transfer = tokio::spawn(async move {
        let mut got = Vec::new();
        long.read_to_end(&mut got).await.map(|_| got.len())
    });

    // Drain: stop accepting, then wait up to 2 s.
    b_running.stop().await;
    let refused = TcpStream::connect(SocketAddr::new(ip(net, 3), 15008)).await;
    assert!(
        refused.is_err(),
        "node B still accepts HBONE while draining"
    );
    let t = Instant::now();
    assert_refused(ip(net, 2), entry).await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "refused at once, not after {:?}",
        t.elapsed()
    );

    let start = Instant::now();
    let cut = zmesh::proxy::drain(&b, Duration::from_secs(2)).await;
    let took = start.elapsed();
    assert_eq!(
        cut, 1,
        "the connection still carrying the idle stream was cut"
    );
    assert!(
        took >= Duration::from_secs(2),
        "the deadline was kept: {took:?}"
    );
    assert_eq!(
        transfer.await.unwrap().unwrap(),
        10_000,
        "the transfer finished in full"
    );
    // At the deadline the idle one is closed: its app sees a reset, promptly.
    assert_cut(&mut idle).await;
}
