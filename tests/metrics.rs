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
    assert!(text.contains("zmesh_build_info{version="), "{text}");
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
