//! Tier (c): gRPC↔JSON transcoding with real processes in network namespaces (the three-node
//! topology of tests/netns_waypoint.rs). Node 3 runs a real tonic gRPC server (the testbed's
//! `Shelves`) behind its tunnel; node 2's zmesh-waypoint transcodes; pod A on node 1 calls the
//! service's VIP with curl, plain HTTP/1.1 JSON, and its node captures the connection.

mod common;

use std::path::Path;
use std::process::Command;

use common::http_app::{app_logged, RequestLog};
use serde_json::{json, Value};
use zmesh_testbed::shelf;
use zmesh_testbed::three::{
    ThreeNodes, N1_IP as A, N3_IP as GRPC, N3_IP2 as WEB, WAYPOINT_IP as WP,
};
use zmesh_testbed::{is_root, Netns};

const NODE: &str = env!("CARGO_BIN_EXE_zmesh-node");
const WAYPOINT: &str = env!("CARGO_BIN_EXE_zmesh-waypoint");
const SHELF_VIP: &str = "10.96.17.1";

fn config(node: &str, bind: &str, fds: &Path, extra: &str) -> String {
    format!(
        r#"node:
  name: {node}
  bind: {bind}
  certificates: {{ file_ca: {{ dir: CA_DIR }} }}
{extra}workloads:
  - {{ uid: a, name: pod-a, namespace: shop, service_account: client, addresses: [{A}], node: n1 }}
  - {{ uid: wp, name: waypoint, namespace: shop, service_account: waypoint, addresses: [{WP}], node: n2 }}
  - {{ uid: grpc, name: shelf, namespace: shop, service_account: shelf, addresses: [{GRPC}], node: n3, services: {{ shop/shelf: {{}} }} }}
  - {{ uid: web, name: web, namespace: shop, service_account: web, addresses: [{WEB}], node: n3, services: {{ shop/web: {{}} }} }}
services:
  - {{ name: shelf, namespace: shop, hostname: shelf, vips: [{SHELF_VIP}], ports: {{ 80: 8080 }}, waypoint: wp }}
  - {{ name: web, namespace: shop, hostname: web, vips: [10.96.17.2], ports: {{ 80: 8080 }}, waypoint: wp }}
routes:
  - name: shelf
    service: shop/shelf
    grpc_transcoding:
      descriptor_set: {fds}
      services: [zmesh.test.shelf.Shelves]
    rules:
      - timeout: 10s
      - matches: [{{ path: {{ prefix: /static }} }}]
        backends: [{{ service: shop/web }}]
"#,
        fds = fds.display()
    )
}

/// curl from pod A's namespace: `Ok((status, body))`, or `Err` with curl's exit code and
/// stderr when the transfer failed.
async fn curl(n1: &Netns, args: &[&str]) -> Result<(u16, String), String> {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        n1.name(),
        "curl",
        "-sS",
        "--max-time",
        "10",
    ])
    .args([
        "-H",
        "content-type: application/json",
        "-w",
        "\n%{http_code}",
    ])
    .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "curl exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    Ok((code.parse().unwrap(), body.to_string()))
}

fn url(path: &str) -> String {
    format!("http://{SHELF_VIP}{path}")
}

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_json_reaches_a_tonic_server_through_the_waypoint() {
    assert!(
        is_root(),
        "tier (c) tests build network namespaces and need root"
    );
    let dir = tempfile::tempdir().unwrap();
    let fds = dir.path().join("shelf.pb");
    std::fs::write(&fds, shelf::DESCRIPTOR_SET).unwrap();
    let t = ThreeNodes::start(
        Path::new(NODE),
        Path::new(WAYPOINT),
        [
            config("n1", "0.0.0.0", &fds, ""),
            config("n2", WP, &fds, "waypoint: { workload: wp }\n"),
            config("n3", "0.0.0.0", &fds, ""),
        ],
    )
    .unwrap();
    // The tonic server and a plain HTTP app, on node 3's captured app port.
    let l = t.n3.listen_tcp(format!("{GRPC}:8080")).unwrap();
    l.set_nonblocking(true).unwrap();
    tokio::spawn(shelf::serve(tokio::net::TcpListener::from_std(l).unwrap()));
    let log = RequestLog::default();
    let l = t.n3.listen_tcp(format!("{WEB}:8080")).unwrap();
    l.set_nonblocking(true).unwrap();
    tokio::spawn(app_logged(
        "web",
        tokio::net::TcpListener::from_std(l).unwrap(),
        log.clone(),
    ));
    let n1 = &t.n1;

    // Unary, with a path-template field.
    let (st, body) = curl(n1, &[&url("/v1/shelves/42")]).await.unwrap();
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        parse(&body),
        json!({"id": "42", "theme": "shelf-42", "genre": "FICTION"})
    );
    // Query parameters bound to fields (repeated, nested, enum by name) and a multi-segment
    // path variable.
    let (st, body) = curl(
        n1,
        &[&url(
            "/v1/shelves/s1/books?authors=ann&authors=bob&filter.minPages=300&filter.genre=SCIENCE",
        )],
    )
    .await
    .unwrap();
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        parse(&body),
        json!({"books": [
            {"name": "shelves/s1/books/0", "author": "ann", "pages": "300", "genre": "SCIENCE"},
            {"name": "shelves/s1/books/1", "author": "bob", "pages": "300", "genre": "SCIENCE"},
        ]})
    );
    // A JSON body (body: "*").
    let (st, body) = curl(
        n1,
        &[
            "-X",
            "POST",
            "-d",
            r#"{"text":"hi","count":2}"#,
            &url("/v1/echo"),
        ],
    )
    .await
    .unwrap();
    assert_eq!((st, parse(&body)), (200, json!({"text": "hi", "count": 2})));
    // A gRPC error status, mapped.
    let (st, body) = curl(n1, &[&url("/v1/shelves/1000")]).await.unwrap();
    assert_eq!(
        (st, parse(&body)),
        (404, json!({"code": 5, "message": "shelf 1000 not found"}))
    );
    // Server streaming as newline-delimited JSON.
    let (st, body) = curl(n1, &[&url("/v1/shelves/s9/books:stream?pageSize=4")])
        .await
        .unwrap();
    assert_eq!(st, 200, "{body}");
    let names: Vec<String> = body
        .lines()
        .map(|l| parse(l)["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        (0..4)
            .map(|n| format!("shelves/s9/books/{n}"))
            .collect::<Vec<_>>()
    );
    // A failure mid-stream: curl sees a failed transfer, not a complete response.
    let cut = curl(
        n1,
        &[&url(&format!(
            "/v1/shelves/s9/books:stream?pageSize=5&filter.minPages={}",
            shelf::FAIL_MID_STREAM
        ))],
    )
    .await;
    assert!(cut.is_err(), "{cut:?}");

    // Hostile: invalid JSON is a 400 naming the field; nothing reaches the server.
    let (st, body) = curl(
        n1,
        &["-X", "POST", "-d", r#"{"count":"many"}"#, &url("/v1/echo")],
    )
    .await
    .unwrap();
    assert_eq!(st, 400, "{body}");
    assert!(
        parse(&body)["message"]
            .as_str()
            .unwrap()
            .contains("\"count\""),
        "{body}"
    );
    // An unknown path falls through to normal routing (here to the plain HTTP app).
    let (st, body) = curl(n1, &[&url("/static/app.js")]).await.unwrap();
    assert_eq!((st, body.as_str()), (200, "web /static/app.js\n"));
    assert_eq!(log.lock().unwrap().as_slice(), ["GET /static/app.js"]);
}
