//! Tier (b): the node's Prometheus endpoint after real traffic: exact counters, bytes included,
//! on both ends, and the series of a departed workload removed.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zmesh::config::Config;

async fn scrape(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the one sample of `name` whose labels contain every `want` pair.
fn sample(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            want.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .collect();
    assert!(
        lines.len() <= 1,
        "{name} {want:?} matches several series: {lines:?}"
    );
    lines
        .first()
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_metrics_count_a_known_transfer_exactly_on_both_ends() {
    let net = 61;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let a = mesh.node("node-a", 2, &w).await;
    let b = mesh.node("node-b", 3, &w).await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = app.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 1000);
        s.write_all(&[7u8; 2345]).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let entry = capture_to(a.clone(), ip(net, 2), dst).await;
    let mut c = connect_from(ip(net, 2), entry).await.unwrap();
    let reply = exchange(&mut c, &[1u8; 1000]).await;
    assert_eq!(reply.len(), 2345);
    drop(c);

    let labels = [
        ("source_workload", "client"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/client",
        ),
        ("destination_workload", "server"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/server",
        ),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (node_addr, reporter) in [(ip(net, 2), "source"), (ip(net, 3), "destination")] {
        let mut want = labels.to_vec();
        want.push(("reporter", reporter));
        let metrics_addr = SocketAddr::new(node_addr, 15020);
        // The destination logs (and counts) when its side of the stream closes, a moment later.
        let mut text = String::new();
        for _ in 0..100 {
            text = scrape(metrics_addr, "/metrics").await;
            if sample(&text, "istio_tcp_connections_closed_total", &want) == Some(1.0) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let get = |name| sample(&text, name, &want);
        assert_eq!(
            get("istio_tcp_connections_opened_total"),
            Some(1.0),
            "{reporter}: {text}"
        );
        assert_eq!(
            get("istio_tcp_connections_closed_total"),
            Some(1.0),
            "{reporter}"
        );
        assert_eq!(
            get("istio_tcp_received_bytes_total"),
            Some(1000.0),
            "{reporter}: request bytes"
        );
        assert_eq!(
            get("istio_tcp_sent_bytes_total"),
            Some(2345.0),
            "{reporter}: response bytes"
        );
        assert_eq!(
            get("istio_tcp_connections_failed_total"),
            None,
            "{reporter}"
        );
        // The same text under Istio's other path.
        assert!(scrape(metrics_addr, "/stats/prometheus")
            .await
            .contains("istio_tcp_sent_bytes_total"));
    }
    let text = scrape(SocketAddr::new(ip(net, 3), 15020), "/metrics").await;
    assert!(
        text.contains("zmesh_policy_decisions_total{decision=\"allow\"} 1"),
        "{text}"
    );
    assert!(text.contains("zmesh_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/default/sa/server\""), "{text}");
    assert!(
        text.contains(&format!(
            "zmesh_build_info{{version=\"{}\",git_sha=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            zmesh_redirect::GIT_SHA
        )),
        "{text}"
    );
    for family in [
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "zmesh_zds_pods ",
        "zmesh_access_log_dropped_total ",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(family))
            .unwrap_or_else(|| panic!("{family}: {text}"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v >= 0.0, "{line}");
    }
    let rss: f64 = text
        .lines()
        .find(|l| l.starts_with("process_resident_memory_bytes "))
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        rss > 1_000_000.0,
        "a running process has more than 1 MB resident: {rss}"
    );

    // The client workload leaves node A's model: its series go with it.
    let text = node_yaml(net, "node-a", 2, &mesh.ca_dir, &client_server_workloads(net, "server", &[]))
        .replace(&format!("  - {{ uid: client, name: client, namespace: default, service_account: client, addresses: [{}], node: node-a }}\n", ip(net, 2)), "");
    assert!(!text.contains("uid: client"), "the edit applied");
    a.reload(Config::parse(&text, "node-a").unwrap()).unwrap();
    let after = scrape(SocketAddr::new(ip(net, 2), 15020), "/metrics").await;
    assert!(!after.contains("source_workload=\"client\""), "{after}");
    let _ = b;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_is_json_without_key_material_and_admin_controls_work() {
    let net = 62;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let a = mesh.node("node-a", 2, &w).await;
    // A loopback-bound node keeps its admin on its own address (several nodes per machine).
    let admin = zmesh::proxy::admin::admin_addr(ip(net, 2), 15000);
    assert_eq!(admin, SocketAddr::new(ip(net, 2), 15000));
    assert_eq!(
        zmesh::proxy::admin::admin_addr("10.1.2.3".parse().unwrap(), 15000),
        "127.0.0.1:15000".parse().unwrap(),
        "any other bind keeps admin on localhost"
    );
    let text = scrape(admin, "/config_dump").await;
    let body = text.split_once("\r\n\r\n").unwrap().1;
    let dump: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(dump["node"]["name"], "node-a");
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 2);
    let cert = &dump["certificates"][0];
    assert_eq!(
        cert["identity"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(
        cert["serial"].as_str().unwrap(),
        a.certs.cached()[0].serial,
        "serial as the node holds it"
    );
    assert!(
        !body.contains("PRIVATE KEY") && !body.contains("BEGIN"),
        "{body}"
    );

    // Without a log control (in-process nodes) /logging says so; /quitquitquit notifies.
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /logging HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 501"), "{out}");
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(
        b"POST /quitquitquit HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    tokio::time::timeout(std::time::Duration::from_secs(1), a.quit.notified())
        .await
        .expect("quit was requested");
}

/// ztunnel's label names for its four `istio_tcp_*` families, in the order it encodes them:
/// `CommonTrafficLabels` in istio/ztunnel src/proxy/metrics.rs, which are Istio's standard
/// metric labels ("Istio Standard Metrics", istio.io docs/reference/config/metrics). Newer
/// ztunnel releases may append four locality labels (source_region, source_zone,
/// destination_region, destination_zone); zmesh does not emit them (docs/telemetry.md "Metrics").
const ZTUNNEL_TCP_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// The label names and values of one exposition line `name{k="v",...} value`, in order.
fn labels_of(line: &str) -> Vec<(String, String)> {
    let inner = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "{line}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.push(chars.next().unwrap()),
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key, value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

/// The label sets of every series of `name`.
fn series<'a>(text: &'a str, name: &str) -> Vec<(&'a str, Vec<(String, String)>)> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| (l, labels_of(l)))
        .collect()
}

/// Issue #13: the node's `istio_tcp_*` series after real traffic carry exactly ztunnel's label
/// names in ztunnel's order, with ztunnel's values for what zmesh knows (app and version from
/// the canonical names, the cluster, `tcp`, `-`, `mutual_tls`); `istio_tcp_sockets_open` (a
/// zmesh addition) has the same labels and counts the connection while it is open only; a
/// connection whose far side refuses counts as failed with `response_flags="CONNECT"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_metric_labels_are_ztunnels_and_sockets_open_follows_the_connection() {
    let net = 65;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]).replace(
        "{ uid: server, name: server,",
        "{ uid: server, name: server, canonical_name: shop-server, canonical_revision: v2,",
    );
    assert!(w.contains("canonical_revision: v2"), "the edit applied");
    let a = mesh.node("node-a", 2, &w).await;
    let b = mesh.node("node-b", 3, &w).await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = app.accept().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"world").await.unwrap();
        // Held open until the test has seen the gauge at 1.
        let _ = released.await;
    });
    let entry = capture_to(a.clone(), ip(net, 2), dst).await;
    let mut c = connect_from(ip(net, 2), entry).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    c.read_exact(&mut got).await.unwrap();

    let nodes = [(ip(net, 2), "source"), (ip(net, 3), "destination")];
    let open_on = |text: &str, reporter: &str| {
        sample(
            text,
            "istio_tcp_sockets_open",
            &[("reporter", reporter), ("destination_workload", "server")],
        )
    };
    for (node_ip, reporter) in nodes {
        let text = scrape(SocketAddr::new(node_ip, 15020), "/metrics").await;
        assert_eq!(open_on(&text, reporter), Some(1.0), "{reporter}: {text}");
        assert!(
            text.contains("# TYPE istio_tcp_sockets_open gauge"),
            "{text}"
        );
    }
    let _ = release.send(());
    drop(c);

    for (node_ip, reporter) in nodes {
        let addr = SocketAddr::new(node_ip, 15020);
        let mut text = String::new();
        for _ in 0..100 {
            text = scrape(addr, "/metrics").await;
            if open_on(&text, reporter) == Some(0.0) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(open_on(&text, reporter), Some(0.0), "{reporter}: {text}");
        for family in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
            "istio_tcp_received_bytes_total",
            "istio_tcp_sent_bytes_total",
            "istio_tcp_sockets_open",
        ] {
            let all = series(&text, family);
            assert!(!all.is_empty(), "{reporter}: no {family}: {text}");
            for (line, labels) in all {
                let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
                assert_eq!(names, ZTUNNEL_TCP_LABELS, "{reporter}: {line}");
            }
        }
        let (_, labels) = series(&text, "istio_tcp_connections_opened_total")
            .into_iter()
            .next()
            .unwrap();
        let get = |k: &str| {
            labels
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .unwrap()
        };
        for (k, want) in [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_canonical_service", "client"),
            ("source_canonical_revision", "latest"),
            ("source_workload_namespace", "default"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
            ("source_app", "client"),
            ("source_version", "latest"),
            ("source_cluster", "Kubernetes"),
            ("destination_service", "unknown"),
            ("destination_service_namespace", "unknown"),
            ("destination_service_name", "unknown"),
            ("destination_workload", "server"),
            ("destination_canonical_service", "shop-server"),
            ("destination_canonical_revision", "v2"),
            ("destination_workload_namespace", "default"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/default/sa/server",
            ),
            ("destination_app", "shop-server"),
            ("destination_version", "v2"),
            ("destination_cluster", "Kubernetes"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ] {
            assert_eq!(get(k), want, "{reporter}: {k}");
        }
        let want = [("reporter", reporter), ("destination_workload", "server")];
        assert_eq!(
            sample(&text, "istio_tcp_received_bytes_total", &want),
            Some(5.0)
        );
        assert_eq!(
            sample(&text, "istio_tcp_sent_bytes_total", &want),
            Some(5.0)
        );
    }

    // Nothing listens on this port of the server: B answers 503, A counts a failure.
    let refused = SocketAddr::new(ip(net, 3), 8081);
    let entry = capture_to(a.clone(), ip(net, 2), refused).await;
    // The node resets the client once it is counted; on loopback the reset can reach the
    // client before its connect call returns, so an error there is the same outcome.
    if let Ok(mut c) = connect_from(ip(net, 2), entry).await {
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
    }
    let text = scrape(SocketAddr::new(ip(net, 2), 15020), "/metrics").await;
    assert_eq!(
        sample(
            &text,
            "istio_tcp_connections_failed_total",
            &[("reporter", "source"), ("response_flags", "CONNECT")]
        ),
        Some(1.0),
        "{text}"
    );
    for (line, labels) in series(&text, "istio_tcp_connections_failed_total") {
        let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ZTUNNEL_TCP_LABELS, "{line}");
    }
    let _ = b;
}

/// A GET that returns the status line and body, whatever the status.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The heap endpoint: allocator statistics and the kernel's memory lines as text on the admin
/// listener; ztunnel's pprof path says it has no profile and where the statistics are; neither
/// is served on the metrics port, which other machines can reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_serves_memory_statistics_only_on_the_admin_listener() {
    let net = 66;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let _a = mesh.node("node-a", 2, &w).await;
    let admin = zmesh::proxy::admin::admin_addr(ip(net, 2), 15000);
    let (status, body) = get(admin, "/debug/memory").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(body.contains("not a pprof profile"), "{body}");
    let value = |key: &str| memory_value(&body, key);
    // A running node has allocated: the allocator holds more than nothing, and the kernel
    // counts resident memory (in kB) at least as high as that at its peak.
    assert!(value("in_use_bytes") > 0, "{body}");
    assert!(value("arena_bytes") >= value("in_use_bytes"), "{body}");
    let (rss, hwm) = (value("VmRSS"), value("VmHWM"));
    assert!(rss > 1000 && hwm >= rss, "{body}");

    let (status, body) = get(admin, "/debug/pprof/heap").await;
    assert!(status.starts_with("HTTP/1.1 501"), "{status}");
    assert!(body.contains("/debug/memory"), "{body}");

    for path in ["/debug/memory", "/debug/pprof/heap"] {
        let (status, _) = get(SocketAddr::new(ip(net, 2), 15020), path).await;
        assert!(
            status.starts_with("HTTP/1.1 404"),
            "{path} on :15020: {status}"
        );
    }
}

/// `zmesh_tokio_alive_tasks{runtime="data_plane"}` counts the tasks of the runtime the node was
/// built on (served from the control runtime, which has a series of its own): 200 parked tasks
/// raise it by at least 200, and once they finish it comes back to where it was. This is what
/// the leak checks of the netns tests read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alive_tasks_follow_the_data_plane_runtime_up_and_back_down() {
    let net = 165;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let _a = mesh.node("node-a", 2, &w).await;
    let addr = SocketAddr::new(ip(net, 2), 15020);
    let tasks = |text: &str, runtime: &str| {
        sample(text, "zmesh_tokio_alive_tasks", &[("runtime", runtime)])
            .unwrap_or_else(|| panic!("no {runtime} series: {text}"))
    };
    let text = scrape(addr, "/metrics").await;
    assert!(
        text.contains("# TYPE zmesh_tokio_alive_tasks gauge"),
        "{text}"
    );
    let before = tasks(&text, "data_plane");
    assert!(before >= 1.0, "the node's own tasks: {before}");
    // The control runtime is serving this very scrape.
    assert!(tasks(&text, "control") >= 1.0, "{text}");

    let (release, parked) = tokio::sync::watch::channel(false);
    let held: Vec<_> = (0..200)
        .map(|_| {
            let mut parked = parked.clone();
            tokio::spawn(async move {
                let _ = parked.wait_for(|go| *go).await;
            })
        })
        .collect();
    let during = tasks(&scrape(addr, "/metrics").await, "data_plane");
    assert!(
        during >= before + 200.0,
        "before {before}, with 200 parked: {during}"
    );

    release.send(true).unwrap();
    for t in held {
        t.await.unwrap();
    }
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let after = tasks(&scrape(addr, "/metrics").await, "data_plane");
        if after <= before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "before {before}, after the 200 finished: {after}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
