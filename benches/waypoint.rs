//! Waypoint benchmark: HTTP/1.1 keep-alive requests per second, p50/p99 latency, and the
//! waypoint's CPU per 10k requests, side by side in one run for three paths between the same
//! two namespaces (docs/waypoint.md; the three-node topology of `tests/netns_waypoint.rs`):
//!
//! 1. direct: the client in node 1 to the app in node 3, plain TCP, no zmesh on the path;
//! 2. mesh without waypoint: client → node 1 tunnel → HBONE → node 3 tunnel → app;
//! 3. mesh with waypoint: client → node 1 → HBONE → waypoint (L7) → HBONE → node 3 → app.
//!
//! `cargo bench --bench waypoint` (add `-- --quick` for a smoke run). Needs root (network
//! namespaces). Every process shares this machine's cores, so compare the columns of one run.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use zmesh_testbed::mesh::connect_uncaptured;
use zmesh_testbed::three::{ThreeNodes, N1_IP, N3_IP, WAYPOINT_IP};
use zmesh_testbed::{is_root, Child};

/// A port on node 3 the capture rules leave alone: the direct baseline.
const DIRECT_PORT: u16 = 8081;
const CONNECTIONS: usize = 4;

fn config(node: &str, bind: &str, extra: &str) -> String {
    format!(
        r#"node:
  name: {node}
  bind: {bind}
  access_log: off
  certificates: {{ file_ca: {{ dir: CA_DIR }} }}
{extra}workloads:
  - {{ uid: a, name: client, namespace: bench, service_account: client, addresses: [{N1_IP}], node: n1 }}
  - {{ uid: wp, name: waypoint, namespace: bench, service_account: waypoint, addresses: [{WAYPOINT_IP}], node: n2 }}
  - {{ uid: app, name: app, namespace: bench, service_account: app, addresses: [{N3_IP}], node: n3, services: {{ bench/l7: {{}}, bench/l4: {{}} }} }}
services:
  - {{ name: l7, namespace: bench, hostname: l7, vips: [10.96.30.1], ports: {{ 80: 8080 }}, waypoint: wp }}
  - {{ name: l4, namespace: bench, hostname: l4, vips: [10.96.30.2], ports: {{ 80: 8080 }} }}
"#
    )
}

/// The app: a 2-byte answer to every request, on the captured and the direct port.
fn start_app(t: &ThreeNodes) -> Result<()> {
    for port in [8080, DIRECT_PORT] {
        let l = t.n3.listen_tcp(format!("{N3_IP}:{port}"))?;
        l.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(l)?;
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
    }
    Ok(())
}

struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: usize,
}

/// `CONNECTIONS` keep-alive connections, each sending `per_conn` sequential GETs.
async fn run(
    streams: Vec<std::net::TcpStream>,
    host: &'static str,
    per_conn: usize,
) -> Result<Run> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in streams {
        s.set_nonblocking(true)?;
        s.set_nodelay(true)?;
        let tcp = tokio::net::TcpStream::from_std(s)?;
        tasks.push(tokio::spawn(async move {
            let (mut send, conn) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            let mut lat = Vec::with_capacity(per_conn);
            for _ in 0..per_conn {
                let t = Instant::now();
                send.ready().await?;
                let req = Request::get("/")
                    .header("host", host)
                    .body(Full::new(Bytes::new()))?;
                let resp = send.send_request(req).await?;
                anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
                resp.into_body().collect().await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed();
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e6;
    Ok(Run {
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        requests: all.len(),
    })
}

fn cpu_ticks(c: &Child) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.pid())).unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// The binary to run: `ZMESH_NODE_BIN` / `ZMESH_WAYPOINT_BIN` when set (another build measured
/// on the same topology, say the release build under a quick-release harness), else the one
/// built with this bench.
fn bin(name: &str) -> Result<PathBuf> {
    let var = match name {
        "zmesh-node" => "ZMESH_NODE_BIN",
        "zmesh-waypoint" => "ZMESH_WAYPOINT_BIN",
        _ => anyhow::bail!("no binary named {name} in this bench"),
    };
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        anyhow::ensure!(p.exists(), "{var}={} does not exist", p.display());
        return Ok(p);
    }
    // Benches live in target/<profile>/deps; the binaries one level up.
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).context("bench path")?;
    let p = dir.join(name);
    anyhow::ensure!(
        p.exists(),
        "{} not built (cargo build --profile <same> --bins)",
        p.display()
    );
    Ok(p)
}

/// One topology with the waypoint on `workers` runtime threads (0 = its default: one per CPU
/// here), all three paths measured on it: (path name, run, CPU-s per 10k requests per process).
fn measure(workers: usize, per_conn: usize) -> Result<Vec<(&'static str, Run, [f64; 3])>> {
    let t = ThreeNodes::start(
        &bin("zmesh-node")?,
        &bin("zmesh-waypoint")?,
        [
            config("n1", "0.0.0.0", ""),
            config("n2", WAYPOINT_IP, "waypoint: { workload: wp }\n").replace(
                "access_log: off\n",
                &format!("access_log: off\n  worker_threads: {workers}\n"),
            ),
            config("n3", "0.0.0.0", ""),
        ],
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tck = clk_tck();
    rt.block_on(async {
        start_app(&t)?;
        let mut rows = Vec::new();
        for (name, host, dial) in [
            (
                "direct TCP (no zmesh)",
                "app",
                format!("{N3_IP}:{DIRECT_PORT}"),
            ),
            ("mesh, no waypoint (L4)", "l4", "10.96.30.2:80".to_string()),
            ("mesh via waypoint (L7)", "l7", "10.96.30.1:80".to_string()),
        ] {
            let connect = || {
                (0..CONNECTIONS)
                    .map(|_| {
                        if name.starts_with("direct") {
                            connect_uncaptured(&t.n1, dial.parse()?)
                        } else {
                            t.n1.connect_tcp(dial.clone())
                        }
                    })
                    .collect::<Result<Vec<_>>>()
            };
            // Warm pools and caches on connections of their own, then measure on fresh ones.
            run(connect()?, host, 50).await?;
            let streams = connect()?;
            let before = [
                cpu_ticks(&t.node1),
                cpu_ticks(&t.waypoint),
                cpu_ticks(&t.node3),
            ];
            let r = run(streams, host, per_conn).await?;
            let after = [
                cpu_ticks(&t.node1),
                cpu_ticks(&t.waypoint),
                cpu_ticks(&t.node3),
            ];
            let n = r.requests as f64;
            let per10k = |i: usize| (after[i] - before[i]) as f64 / tck * 10_000.0 / n;
            rows.push((name, r, [per10k(0), per10k(1), per10k(2)]));
        }
        anyhow::Ok(rows)
    })
}

/// The transcoding comparison's model: a tonic `Shelves` server behind service `shelf`, whose
/// route offers it as JSON (`grpc_transcoding`, descriptor set at `fds`).
fn transcode_config(node: &str, bind: &str, fds: &Path, extra: &str) -> String {
    format!(
        r#"node:
  name: {node}
  bind: {bind}
  access_log: off
  certificates: {{ file_ca: {{ dir: CA_DIR }} }}
{extra}workloads:
  - {{ uid: a, name: client, namespace: bench, service_account: client, addresses: [{N1_IP}], node: n1 }}
  - {{ uid: wp, name: waypoint, namespace: bench, service_account: waypoint, addresses: [{WAYPOINT_IP}], node: n2 }}
  - {{ uid: grpc, name: grpc, namespace: bench, service_account: grpc, addresses: [{N3_IP}], node: n3, services: {{ bench/shelf: {{}} }} }}
services:
  - {{ name: shelf, namespace: bench, hostname: shelf, vips: [{SHELF_VIP}], ports: {{ 80: 8080 }}, waypoint: wp }}
routes:
  - name: shelf
    service: bench/shelf
    grpc_transcoding: {{ descriptor_set: {fds}, services: [zmesh.test.shelf.Shelves] }}
"#,
        fds = fds.display()
    )
}

const SHELF_VIP: &str = "10.96.30.3";

/// Unary calls, `per_conn` sequential ones on each of `CONNECTIONS` connections: plain gRPC
/// (tonic's client, HTTP/2) or the same call as HTTP/1.1 JSON (`GET /v1/shelves/42`), both
/// through the waypoint. Returns the run and the waypoint's CPU-s per 10k calls.
async fn grpc_or_json(t: &ThreeNodes, json: bool, per_conn: usize) -> Result<(Run, f64)> {
    use zmesh_testbed::shelf::pb;
    let connect = || -> Result<Vec<std::net::TcpStream>> {
        (0..CONNECTIONS)
            .map(|_| t.n1.connect_tcp(format!("{SHELF_VIP}:80")))
            .collect()
    };
    let one_run = |streams: Vec<std::net::TcpStream>, n: usize| async move {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for s in streams {
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            let tcp = tokio::net::TcpStream::from_std(s)?;
            if json {
                tasks.push(tokio::spawn(async move {
                    let (mut send, conn) =
                        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
                            .await?;
                    tokio::spawn(conn);
                    let mut lat = Vec::with_capacity(n);
                    for _ in 0..n {
                        let t = Instant::now();
                        send.ready().await?;
                        let req = Request::get("/v1/shelves/42")
                            .header("host", "shelf")
                            .body(Full::new(Bytes::new()))?;
                        let resp = send.send_request(req).await?;
                        anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
                        resp.into_body().collect().await?;
                        lat.push(t.elapsed());
                    }
                    anyhow::Ok(lat)
                }));
            } else {
                let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(tcp)));
                let channel = tonic::transport::Endpoint::from_static("http://shelf")
                    .connect_with_connector(tower::service_fn(move |_| {
                        let tcp = slot.lock().expect("poisoned").take();
                        async move {
                            tcp.map(TokioIo::new)
                                .ok_or_else(|| std::io::Error::other("one connection per channel"))
                        }
                    }))
                    .await?;
                tasks.push(tokio::spawn(async move {
                    let mut client = pb::shelves_client::ShelvesClient::new(channel);
                    let mut lat = Vec::with_capacity(n);
                    for _ in 0..n {
                        let t = Instant::now();
                        let r = client
                            .get_shelf(pb::GetShelfRequest { shelf_id: 42 })
                            .await?;
                        anyhow::ensure!(r.get_ref().id == 42);
                        lat.push(t.elapsed());
                    }
                    anyhow::Ok(lat)
                }));
            }
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let elapsed = start.elapsed();
        all.sort();
        let pct =
            |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e6;
        anyhow::Ok(Run {
            rps: all.len() as f64 / elapsed.as_secs_f64(),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            requests: all.len(),
        })
    };
    one_run(connect()?, 50).await?;
    let streams = connect()?;
    let before = cpu_ticks(&t.waypoint);
    let r = one_run(streams, per_conn).await?;
    let cpu = (cpu_ticks(&t.waypoint) - before) as f64 / clk_tck() * 10_000.0 / r.requests as f64;
    Ok((r, cpu))
}

/// Transcoded JSON next to plain gRPC, both through the waypoint to the same tonic server.
fn measure_transcoding(per_conn: usize) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let fds = dir.path().join("shelf.pb");
    std::fs::write(&fds, zmesh_testbed::shelf::DESCRIPTOR_SET)?;
    let t = ThreeNodes::start(
        &bin("zmesh-node")?,
        &bin("zmesh-waypoint")?,
        [
            transcode_config("n1", "0.0.0.0", &fds, ""),
            transcode_config("n2", WAYPOINT_IP, &fds, "waypoint: { workload: wp }\n"),
            transcode_config("n3", "0.0.0.0", &fds, ""),
        ],
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let l = t.n3.listen_tcp(format!("{N3_IP}:8080"))?;
        l.set_nonblocking(true)?;
        tokio::spawn(zmesh_testbed::shelf::serve(tokio::net::TcpListener::from_std(l)?));
        let (grpc, grpc_cpu) = grpc_or_json(&t, false, per_conn).await?;
        let (json, json_cpu) = grpc_or_json(&t, true, per_conn).await?;
        let mut out = String::from(
            "\n### gRPC↔JSON transcoding\n\nUnary `GetShelf` to a tonic server on node 3, through the waypoint, \
{CONNECTIONS} connections × {per_conn} sequential calls: plain gRPC (tonic client, HTTP/2) vs the same \
call as HTTP/1.1 JSON (`GET /v1/shelves/42`) transcoded by the waypoint.\n\n",
        )
        .replace("{CONNECTIONS}", &CONNECTIONS.to_string())
        .replace("{per_conn}", &per_conn.to_string());
        out += "| path | requests/s | vs gRPC | p50 µs | p99 µs | waypoint CPU-s per 10k |\n|---|---|---|---|---|---|\n";
        for (name, r, cpu) in [("gRPC via waypoint", &grpc, grpc_cpu), ("JSON transcoded by waypoint", &json, json_cpu)] {
            out += &format!(
                "| {name} | {:.0} | {:.2} | {:.0} | {:.0} | {:.3} |\n",
                r.rps,
                r.rps / grpc.rps,
                r.p50_us,
                r.p99_us,
                cpu
            );
        }
        anyhow::Ok(out)
    })
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    anyhow::ensure!(
        is_root(),
        "the waypoint benchmark builds network namespaces: run it as root"
    );
    let per_conn = if quick { 500 } else { 5000 };
    let mut out = String::from("## Waypoint benchmark (`cargo bench --bench waypoint`)\n\n");
    out += &format!(
        "HTTP/1.1 keep-alive, {CONNECTIONS} connections × {per_conn} sequential GETs (2-byte answers), \
three namespaces on a bridge (client node, waypoint, app node), one run per waypoint runtime size; \
mode: {}. Requests/s per waypoint core = 10,000 / the waypoint's CPU-s per 10k requests.\n\n",
        if quick { "quick" } else { "full" }
    );
    for var in ["ZMESH_NODE_BIN", "ZMESH_WAYPOINT_BIN"] {
        if let Ok(p) = std::env::var(var) {
            out += &format!("{var}={p}\n\n");
        }
    }
    out += "| waypoint threads | path | requests/s | vs direct | p50 µs | p99 µs | CPU-s per 10k requests: node 1 / waypoint / node 3 | requests/s per waypoint core |\n";
    out += "|---|---|---|---|---|---|---|---|\n";
    // The default (a thread per CPU, as a Deployment without a CPU limit gets) and one thread
    // (a Deployment limited to one CPU).
    for (label, workers) in [("2 (default here)", 0usize), ("1", 1)] {
        let rows = measure(workers, per_conn)?;
        let base = rows[0].1.rps;
        for (name, r, cpu) in &rows {
            out += &format!(
                "| {label} | {name} | {:.0} | {:.2} | {:.0} | {:.0} | {:.3} / {:.3} / {:.3} | {} |\n",
                r.rps,
                r.rps / base,
                r.p50_us,
                r.p99_us,
                cpu[0],
                cpu[1],
                cpu[2],
                if cpu[1] > 0.0 {
                    format!("{:.0}", 10_000.0 / cpu[1])
                } else {
                    String::new()
                }
            );
        }
    }
    out += &measure_transcoding(per_conn)?;
    println!("{out}");
    if !quick {
        // Replaces this section of benches/RESULTS.md (the system benchmark keeps it).
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/RESULTS.md");
        let old = std::fs::read_to_string(path).unwrap_or_default();
        let head = "## Waypoint benchmark";
        let text = match old.find(head) {
            Some(i) => {
                let end = old[i + head.len()..]
                    .find("\n## ")
                    .map_or(old.len(), |j| i + head.len() + j + 1);
                let rest = &old[end..];
                let gap = if rest.is_empty() { "" } else { "\n" };
                format!("{}{out}{gap}{rest}", &old[..i])
            }
            None => format!("{}\n\n{out}", old.trim_end()),
        };
        std::fs::write(path, text)?;
        eprintln!("wrote the waypoint section of benches/RESULTS.md");
    }
    Ok(())
}
