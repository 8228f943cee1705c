//! The agent's probe and metrics endpoints (`health`): in process around `agent::run_with`, and
//! on the real binary with its flags. Addresses are on 127.95.0.x (no root needed).

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use zmesh_redirect::agent::{self, AgentConfig, Request};
use zmesh_redirect::health::{self, Health, Role};
use zmesh_redirect::Backend;

/// One HTTP/1.1 GET; the status code and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

async fn get_async(addr: SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || get(addr, path))
        .await
        .unwrap()
}

async fn listen(ip: &str) -> (tokio::net::TcpListener, SocketAddr) {
    let l = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// A metric's value in Prometheus text.
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_readiness_follows_the_sockets_and_metrics_count_requests() {
    let health = Health::new();
    let (probes, probes_addr) = listen("127.95.0.1").await;
    let (metrics, metrics_addr) = listen("127.95.0.1").await;
    tokio::spawn(health::serve(probes, Role::Probes, health.clone()));
    tokio::spawn(health::serve(metrics, Role::Metrics, health.clone()));

    // Before the agent's sockets are bound: alive, not ready, and it says why.
    let (status, body) = get_async(probes_addr, "/readyz").await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("waiting for: the ZDS and admin sockets to be bound"),
        "{body}"
    );
    assert_eq!(get_async(probes_addr, "/healthz").await.0, 200);
    let (_, text) = get_async(metrics_addr, "/metrics").await;
    assert_eq!(sample(&text, "zmesh_redirect_ready"), 0);

    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig {
        zds_socket: dir.path().join("ztunnel.sock"),
        admin_socket: dir.path().join("redirect.sock"),
        backend: Backend::Iptables,
        kube: None,
        state_file: None,
        exclude_namespaces: Vec::new(),
    };
    let admin = config.admin_socket.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let h = health.clone();
    let agent = tokio::spawn(agent::run_with(
        config,
        async {
            let _ = stopped.await;
        },
        move |a| h.set_ready(a),
    ));
    let end = Instant::now() + Duration::from_secs(5);
    while get_async(probes_addr, "/readyz").await.0 != 200 {
        assert!(
            Instant::now() < end,
            "not ready after the sockets were bound"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get_async(probes_addr, "/readyz").await.1, "ready\n");

    // Requests through the admin socket are counted by kind and result.
    let requests = [
        Request::Del { uid: String::new() }, // refused: empty uid
        Request::Del { uid: "gone".into() }, // nothing to delete: ok
        Request::List,                       // not counted
    ];
    for r in requests {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || agent::request(&admin, &r).unwrap())
            .await
            .unwrap();
    }
    let (status, text) = get_async(metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "zmesh_redirect_ready"), 1);
    assert_eq!(sample(&text, "zmesh_redirect_pods_enrolled"), 0);
    assert_eq!(sample(&text, "zmesh_redirect_tunnels_connected"), 0);
    assert_eq!(
        sample(
            &text,
            "zmesh_redirect_requests_total{op=\"del\",result=\"error\"}"
        ),
        1
    );
    assert_eq!(
        sample(
            &text,
            "zmesh_redirect_requests_total{op=\"del\",result=\"ok\"}"
        ),
        1
    );
    assert_eq!(
        sample(
            &text,
            "zmesh_redirect_requests_total{op=\"add\",result=\"ok\"}"
        ),
        0
    );

    // Unknown paths, and each port's paths on the other, are 404.
    for (addr, path) in [
        (probes_addr, "/nope"),
        (probes_addr, "/metrics"),
        (metrics_addr, "/readyz"),
    ] {
        let (status, body) = get_async(addr, path).await;
        assert_eq!((status, body.as_str()), (404, "not found\n"), "{path}");
    }
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

/// The binary serves them on the addresses its flags name; `off` turns one off; a bad flag is
/// refused naming the value.
#[test]
fn the_agent_binary_serves_its_endpoints_where_its_flags_say() {
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("redirect.sock");
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let probes: SocketAddr = "127.95.0.2:18000".parse().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_zmesh-redirect"))
        .args(["agent", "--zds-socket"])
        .arg(dir.path().join("ztunnel.sock"))
        .arg("--admin-socket")
        .arg(&admin)
        .args(["--health-addr", "127.95.0.2:18000", "--metrics-addr", "off"])
        .stderr(log)
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let r = std::net::TcpStream::connect(probes)
            .ok()
            .map(|_| get(probes, "/readyz"));
        match r {
            Some((200, body)) => break body,
            _ if Instant::now() > end => {
                let _ = child.kill();
                panic!(
                    "not ready: {r:?}\n{}",
                    std::fs::read_to_string(dir.path().join("agent.log")).unwrap()
                )
            }
            _ => std::thread::sleep(Duration::from_millis(25)),
        }
    };
    assert_eq!(ready, "ready\n");
    assert!(admin.exists(), "ready only once the admin socket is bound");
    assert_eq!(get(probes, "/healthz").0, 200);
    // Metrics are off: nothing listens on the default port of this address.
    assert!(std::net::TcpStream::connect("127.95.0.2:15014").is_err());
    child.kill().unwrap();
    child.wait().unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zmesh-redirect"))
        .args(["agent", "--health-addr", "8000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"8000\" is not an address"), "{err}");
}
