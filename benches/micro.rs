//! Micro-benchmarks of the data path's pure pieces and in-memory relays (criterion).
//!
//! `cargo bench --bench micro`. Nothing here is a test: numbers are reported, never asserted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};
use zmesh::config::Config;
use zmesh::copy::{stream_to_h2, stream_to_stream};
use zmesh::hbone::connect::{build_connect, parse_connect, ConnectHeaders};
use zmesh::identity::{peer_identity, CertManager, CertSource, FileCa, SpiffeId};
use zmesh::model::Model;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A model with `n` services, two endpoints each, plus the client workload.
fn big_model(n: u32) -> Model {
    let mut y = String::from(
        "node: { name: node-a, certificates: { file_ca: { dir: /x } } }\nworkloads:\n  - { uid: client, name: client, namespace: default, addresses: [10.0.0.1], node: node-a }\n",
    );
    for i in 0..n {
        for e in 0..2 {
            let ip = Ipv4Addr::from(0x0a80_0000 + i * 2 + e);
            y += &format!(
                "  - {{ uid: w{i}-{e}, name: w{i}-{e}, namespace: default, addresses: [{ip}], node: n{e}, services: {{ \"default/s{i}.default.svc\": {{}} }} }}\n"
            );
        }
    }
    y += "services:\n";
    for i in 0..n {
        let vip = Ipv4Addr::from(0x0a60_0000 + i);
        y += &format!(
            "  - {{ name: s{i}, namespace: default, hostname: s{i}.default.svc, vips: [{vip}], ports: {{ 80: 8080 }} }}\n"
        );
    }
    Model::from_config(&Config::parse(&y, "bench").unwrap())
}

fn cert_manager() -> (tempfile::TempDir, Arc<CertManager>) {
    let dir = tempfile::tempdir().unwrap();
    FileCa::init(dir.path(), "cluster.local").unwrap();
    let ca = FileCa::load(dir.path()).unwrap();
    let roots = ca.roots().to_vec();
    let m = CertManager::new(
        CertSource::file_ca(ca, std::time::Duration::from_secs(3600)),
        &roots,
        zmesh::tls::provider(),
    )
    .unwrap();
    (dir, Arc::new(m))
}

fn connect_and_spiffe(c: &mut Criterion) {
    let model = big_model(1);
    let src = model
        .workload_by_ip("10.0.0.1".parse().unwrap())
        .unwrap()
        .clone();
    let dst: SocketAddr = "10.0.1.7:8080".parse().unwrap();
    let headers = ConnectHeaders {
        source: &src,
        client_addr: "10.0.0.1:40000".parse().unwrap(),
        service_host: Some("s0.default.svc"),
        trace_id: 0x1234,
        span_id: 0x56,
    };
    c.bench_function("connect/build", |b| b.iter(|| build_connect(dst, &headers)));
    let req = build_connect(dst, &headers);
    c.bench_function("connect/parse", |b| b.iter(|| parse_connect(&req).unwrap()));

    let s = "spiffe://cluster.local/ns/bookinfo/sa/productpage";
    c.bench_function("spiffe/parse", |b| b.iter(|| SpiffeId::parse(s).unwrap()));
    let (_dir, m) = cert_manager();
    let cert = m.fetch(&SpiffeId::parse(s).unwrap()).unwrap();
    let der = cert.certified.cert[0].clone();
    c.bench_function("spiffe/from_certificate", |b| {
        b.iter(|| peer_identity(&der).unwrap())
    });
}

fn selection(c: &mut Criterion) {
    let model = big_model(10_000);
    let src = model
        .workload_by_ip("10.0.0.1".parse().unwrap())
        .unwrap()
        .clone();
    let mut rng = rand::thread_rng();
    let mut i = 0u32;
    c.bench_function("select/vip_of_10k_services", |b| {
        b.iter(|| {
            i = (i + 7919) % 10_000;
            let vip = IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i));
            model
                .select(&src, SocketAddr::new(vip, 80), &mut rng)
                .unwrap()
        })
    });
}

const COPY_BYTES: usize = 16 << 20;

fn copy(c: &mut Criterion) {
    let rt = rt();
    let mut g = c.benchmark_group("copy");
    g.throughput(Throughput::Bytes(COPY_BYTES as u64));
    g.sample_size(20);
    g.bench_function("stream_to_stream_16MiB", |b| {
        b.to_async(&rt).iter(|| async {
            let (mut app_a, mut pa) = duplex(256 * 1024);
            let (mut pb, mut app_b) = duplex(256 * 1024);
            let relay = tokio::spawn(async move { stream_to_stream(&mut pa, &mut pb).await });
            let w = tokio::spawn(async move {
                let buf = vec![7u8; 64 * 1024];
                for _ in 0..COPY_BYTES / buf.len() {
                    app_a.write_all(&buf).await.unwrap();
                }
                app_a.shutdown().await.unwrap();
                app_a
            });
            let mut sink = vec![0u8; 64 * 1024];
            let mut n = 0;
            loop {
                let k = app_b.read(&mut sink).await.unwrap();
                if k == 0 {
                    break;
                }
                n += k;
            }
            assert_eq!(n, COPY_BYTES);
            drop(app_b);
            drop(w.await.unwrap());
            relay.await.unwrap()
        })
    });
    g.finish();
}

/// An HBONE client and server over an in-memory pipe: TLS 1.3 + HTTP/2 + CONNECT.
async fn h2_pair(m: &Arc<CertManager>) -> h2::client::SendRequest<Bytes> {
    let client_id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/client").unwrap();
    let server_id = SpiffeId::parse("spiffe://cluster.local/ns/b/sa/server").unwrap();
    let ccfg = zmesh::tls::client_config(
        &m.fetch(&client_id).unwrap(),
        &m.trust(),
        vec![server_id.clone()],
    )
    .unwrap();
    let scfg = zmesh::tls::server_config(&m.fetch(&server_id).unwrap(), &m.trust()).unwrap();
    let (c, s) = duplex(1 << 20);
    let server = tokio::spawn(async move {
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(scfg))
            .accept(s)
            .await
            .unwrap();
        let mut conn = zmesh::hbone::server::handshake(tls).await.unwrap();
        while let Some(Ok((req, respond))) = conn.accept().await {
            tokio::spawn(async move {
                let send = zmesh::hbone::server::respond_ok(respond).unwrap();
                // An echo "app" on the far side of the tunnel.
                let (mut app, mut far) = duplex(256 * 1024);
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(&mut far);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
                stream_to_h2(&mut app, send, req.into_body()).await
            });
        }
    });
    let tls = tokio_rustls::TlsConnector::from(Arc::new(ccfg))
        .connect(zmesh::tls::placeholder_server_name(), c)
        .await
        .unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(zmesh::hbone::STREAM_WINDOW)
        .initial_connection_window_size(zmesh::hbone::CONNECTION_WINDOW)
        .max_frame_size(zmesh::hbone::MAX_FRAME_SIZE)
        .handshake(tls)
        .await
        .unwrap();
    tokio::spawn(conn);
    std::mem::forget(server);
    send.ready().await.unwrap()
}

fn tls_h2(c: &mut Criterion) {
    let rt = rt();
    let (_dir, m) = cert_manager();
    let send = rt.block_on(h2_pair(&m));
    let authority: SocketAddr = "10.0.0.9:80".parse().unwrap();
    let req = || {
        http::Request::builder()
            .method("CONNECT")
            .uri(authority.to_string())
            .body(())
            .unwrap()
    };
    // One established stream: 1 KiB out and back through TLS + HTTP/2 both ways.
    let (mut tx, mut rx) = rt.block_on(async {
        let mut s = send.clone().ready().await.unwrap();
        let (resp, tx) = s.send_request(req(), false).unwrap();
        (tx, resp.await.unwrap().into_body())
    });
    let payload = Bytes::from(vec![1u8; 1024]);
    c.bench_function("tls_h2/stream_round_trip_1KiB", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    tx.send_data(payload.clone(), false).unwrap();
                    let mut got = 0;
                    while got < 1024 {
                        let chunk = rx.data().await.unwrap().unwrap();
                        got += chunk.len();
                        let _ = rx.flow_control().release_capacity(chunk.len());
                    }
                }
                start.elapsed()
            })
        })
    });
    c.bench_function("tls_h2/connect_stream_open_close", |b| {
        b.to_async(&rt).iter_batched(
            || send.clone(),
            |s| async move {
                let mut s = s.ready().await.unwrap();
                let (resp, mut tx) = s.send_request(req(), false).unwrap();
                let mut body = resp.await.unwrap().into_body();
                tx.send_data(Bytes::from_static(b"x"), true).unwrap();
                while let Some(c) = body.data().await {
                    let _ = c.unwrap();
                }
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, connect_and_spiffe, selection, copy, tls_h2);
criterion_main!(benches);
