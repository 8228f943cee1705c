//! Tier (c): sockets made through `PodNetns` live in the pod's network namespace.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zmesh::netns::PodNetns;
use zmesh::socket::{dial_in, listen_in, DialOptions};
use zmesh_testbed::{is_root, Netns};

mod common;

fn open_ns(ns: &Netns) -> OwnedFd {
    std::fs::File::open(ns.path()).unwrap().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_and_dials_are_created_inside_the_pod_netns() {
    assert!(is_root(), "needs root to create network namespaces");
    let pod = Netns::new("zip").unwrap();
    let pod_ns = PodNetns::new(open_ns(&pod), "pod").unwrap();

    // A listener made through PodNetns is reachable from inside the pod...
    let l = listen_in(&pod_ns, "127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let inside = pod.connect_tcp(addr).map(|mut s| s.write_all(b"in"));
    let (mut s, _) = l.accept().await.unwrap();
    inside.unwrap().unwrap();
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"in");
    // ...and not from ours: nothing of the pod's loopback exists here.
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "pod listener reachable from the node netns"
    );

    // A dial made through PodNetns originates inside the pod.
    let app = pod.listen_tcp("127.0.0.1:0").unwrap();
    let app_addr: SocketAddr = app.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = app.accept().unwrap();
        let mut b = [0u8; 3];
        s.read_exact(&mut b).unwrap();
        b
    });
    let mut c = dial_in(Some(&pod_ns), app_addr, DialOptions::default())
        .await
        .unwrap();
    c.write_all(b"out").await.unwrap();
    assert_eq!(&server.join().unwrap(), b"out");
}

#[test]
fn namespace_identity_is_device_and_inode() {
    assert!(is_root(), "needs root to create network namespaces");
    let a = Netns::new("zid").unwrap();
    let b = Netns::new("zid").unwrap();
    let a1 = PodNetns::new(open_ns(&a), "a1").unwrap();
    let a2 = PodNetns::new(open_ns(&a), "a2").unwrap();
    let b1 = PodNetns::new(open_ns(&b), "b1").unwrap();
    assert_eq!(
        a1.id(),
        a2.id(),
        "two fds of one netns are the same pod netns"
    );
    assert_ne!(a1.id(), b1.id());
    // A PodNetns whose fd is not a namespace fails to enter it, with an error.
    let not_ns: OwnedFd = std::fs::File::open("/proc/self/stat").unwrap().into();
    assert!(PodNetns::new(not_ns, "bad").is_err());
}

mod inpod_node {
    //! A node netns with a bridge and two pod netns; zmesh-node in in-pod mode, driven over ZDS
    //! by the crate's agent-side server, with the real in-pod capture rules in each pod.

    use std::io::{Read, Write};
    use std::net::{IpAddr, Shutdown};
    use std::path::Path;
    use std::time::Duration;

    use zmesh_redirect::zds::{WorkloadInfo, ZdsServer};
    use zmesh_redirect::{install_pod, Backend, PodOptions};
    use zmesh_testbed::{attach_to_bridge, is_root, seeded_bytes, sha256, Netns};

    const POD_A: &str = "10.216.0.2";
    const POD_B: &str = "10.216.0.3";

    fn config(ca: &Path, zds: &Path) -> String {
        format!(
            "node:
  name: node-1
  mode: in_pod
  zds_socket: {zds}
  access_log: json
  certificates:
    file_ca: {{ dir: {ca} }}
workloads:
  - {{ uid: pod-a, name: client, namespace: shop, service_account: frontend, addresses: [{POD_A}], node: node-1 }}
  - {{ uid: pod-b, name: server, namespace: shop, service_account: backend, addresses: [{POD_B}], node: node-1 }}
",
            zds = zds.display(),
            ca = ca.display()
        )
    }

    /// A node netns with a bridge, pods A and B attached with the in-pod rules installed, a CA,
    /// an agent-side ZDS server, and the node's config file.
    struct Topology {
        // Namespaces are dropped last: they outlive the processes spawned in them.
        agent: ZdsServer,
        cfg: std::path::PathBuf,
        dir: tempfile::TempDir,
        pod_a: Netns,
        pod_b: Netns,
        node: Netns,
    }

    impl Topology {
        fn new() -> Topology {
            assert!(is_root(), "needs root to create network namespaces");
            let node = Netns::new("zpn").unwrap();
            node.add_bridge("zbr0", "10.216.0.1/24").unwrap();
            let pod_a = Netns::new("zpa").unwrap();
            let pod_b = Netns::new("zpb").unwrap();
            for (pod, ip) in [(&pod_a, POD_A), (&pod_b, POD_B)] {
                attach_to_bridge(
                    &node,
                    "zbr0",
                    pod,
                    "eth0",
                    &format!("{ip}/24"),
                    "10.216.0.1",
                )
                .unwrap();
                pod.run(|| install_pod(&PodOptions::default(), Backend::Iptables))
                    .unwrap();
            }
            let dir = tempfile::tempdir().unwrap();
            let ca = dir.path().join("ca");
            zmesh::identity::FileCa::init(&ca, "cluster.local").unwrap();
            let zds_path = dir.path().join("zds.sock");
            let agent = ZdsServer::bind(&zds_path).unwrap();
            let cfg = dir.path().join("node.yaml");
            std::fs::write(&cfg, config(&ca, &zds_path)).unwrap();
            Topology {
                agent,
                cfg,
                dir,
                pod_a,
                pod_b,
                node,
            }
        }
    }

    /// Starts zmesh-node in the node's namespace with `cfg` and waits until it has connected
    /// to the agent's ZDS socket.
    async fn start_node(
        node: &Netns,
        cfg: &std::path::Path,
        agent: &ZdsServer,
    ) -> zmesh_testbed::Child {
        let zn = node
            .spawn(
                env!("CARGO_BIN_EXE_zmesh-node"),
                &["run", "--config", cfg.to_str().unwrap()],
                &[("ZMESH_LOG", "info")],
            )
            .unwrap();
        for _ in 0..200 {
            if agent.connected_tunnels() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(
            agent.connected_tunnels(),
            1,
            "zmesh-node did not connect: {}",
            zn.read_log()
        );
        zn
    }

    fn netns_fd(ns: &Netns) -> std::os::fd::OwnedFd {
        std::fs::File::open(ns.path()).unwrap().into()
    }

    /// Hands a pod to the tunnel as the agent would, with the identity the config gives it.
    async fn enroll(agent: &ZdsServer, uid: &str, pod: &Netns) {
        let (name, sa) = match uid {
            "pod-a" => ("client", "frontend"),
            _ => ("server", "backend"),
        };
        agent
            .add_pod(uid, info(name, sa), netns_fd(pod))
            .await
            .unwrap();
    }

    fn info(name: &str, sa: &str) -> WorkloadInfo {
        WorkloadInfo {
            name: name.into(),
            namespace: "shop".into(),
            service_account: sa.into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_node_pods_talk_through_their_pod_proxies_and_deletion_tears_down() {
        let Topology {
            node,
            pod_a,
            pod_b,
            dir: _dir,
            cfg,
            agent,
        } = Topology::new();
        let zn = start_node(&node, &cfg, &agent).await;
        enroll(&agent, "pod-a", &pod_a).await;
        enroll(&agent, "pod-b", &pod_b).await;
        // A repeated add of the same namespace is a no-op (acked, proxy kept).
        enroll(&agent, "pod-b", &pod_b).await;
        // Bad input gets an ack carrying a clear error, and nothing else changes.
        let e = agent.del_pod("pod-unknown").await.unwrap_err().to_string();
        assert!(e.contains("unknown pod uid"), "{e}");
        // The node's metrics count the two pods it proxies.
        let metrics = node.http_get("127.0.0.1:15020", "/metrics");
        assert!(metrics.contains("\nzmesh_zds_pods 2\n"), "{metrics}");
        assert!(
            metrics.contains("\nzmesh_zds_snapshot_received 1\n"),
            "{metrics}"
        );
        // ...and the admin dump shows each pod proxy.
        let dump = node.http_get("127.0.0.1:15000", "/config_dump");
        let body = dump.split_once("\r\n\r\n").unwrap().1;
        let dump: serde_json::Value = serde_json::from_str(body).unwrap();
        let mut uids: Vec<&str> = dump["pod_proxies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["uid"].as_str().unwrap())
            .collect();
        uids.sort();
        assert_eq!(uids, ["pod-a", "pod-b"]);

        // The app in pod B; the client in pod A dials it by pod IP, knowing nothing of the mesh.
        let app = pod_b.listen_tcp(format!("{POD_B}:8080")).unwrap();
        let data = seeded_bytes(5, 2 << 20);
        let want = sha256(&data);
        let server = std::thread::spawn(move || {
            let (mut s, peer) = app.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(b"done").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            // Keep accepting: the deletion check below expects nothing more to arrive.
            (peer, got, app)
        });
        // Blocking socket calls are fine here: the test body is not on a runtime worker.
        let mut c = pod_a.connect_tcp(format!("{POD_B}:8080")).unwrap();
        c.write_all(&data).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"done");
        let (peer, got, app) = server.join().unwrap();
        drop(app);
        assert_eq!(sha256(&got), want, "bytes arrived exactly");
        assert_eq!(
            peer.ip(),
            POD_A.parse::<IpAddr>().unwrap(),
            "the app sees the source pod's IP"
        );
        // The access line is written when the node's side of the connection settles, which
        // can be a moment after the client read its EOF.
        let logged = |log: &str| {
            log.contains("\"direction\":\"inbound\"")
                && log.contains("\"src.identity\":\"spiffe://cluster.local/ns/shop/sa/frontend\"")
                && log.contains("\"dst.identity\":\"spiffe://cluster.local/ns/shop/sa/backend\"")
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut log = zn.read_log();
        while !logged(&log) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            log = zn.read_log();
        }
        assert!(logged(&log), "node log: {log}");

        // Deleting pod B tears its proxy down: pod A's next connection gets a reset, never a
        // plaintext bypass.
        agent.del_pod("pod-b").await.unwrap();
        let _app_again = pod_b.listen_tcp(format!("{POD_B}:8080")).unwrap();
        // Pod A's own proxy accepts (capture is local), then finds nobody at B's 15008 and
        // resets; on a fast machine the reset can already arrive while connect() returns.
        let r = pod_a
            .connect_tcp(format!("{POD_B}:8080"))
            .map_err(|e| e.to_string())
            .and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(5)))
                    .map_err(|e| e.to_string())?;
                let sent = c.write_all(b"x").and_then(|()| c.read(&mut [0u8; 1]));
                match sent {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        Err("reset".into())
                    }
                    other => Ok(format!("{other:?}")),
                }
            });
        assert!(
            r.is_err(),
            "after deletion the connection must fail, got {r:?}"
        );
    }

    /// The proxy ports a pod's namespace holds a LISTEN socket on (outbound, plaintext
    /// inbound, HBONE), read from the namespace's own `/proc/net/tcp{,6}` (as seen by a thread
    /// inside it), so a socket the node still holds open there shows even if nothing could
    /// reach it.
    fn proxy_listeners(pod: &Netns) -> Vec<u16> {
        const LISTEN: &str = "0A";
        let mut ports: Vec<u16> = pod.run(|| {
            ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
                .iter()
                .flat_map(|f| {
                    let text = std::fs::read_to_string(f).unwrap();
                    text.lines()
                        .skip(1)
                        .filter_map(|l| {
                            let cols: Vec<&str> = l.split_whitespace().collect();
                            let port = cols.get(1)?.rsplit_once(':')?.1;
                            (cols.get(3) == Some(&LISTEN))
                                .then(|| u16::from_str_radix(port, 16).unwrap())
                        })
                        .collect::<Vec<_>>()
                })
                .filter(|p| [15001, 15006, 15008].contains(p))
                .collect()
        });
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Waits (up to 2 s: an aborted accept loop drops its socket when the runtime next gets to
    /// it) until `pod`'s proxy ports are exactly `want`.
    async fn wait_for_listeners(pod: &Netns, want: &[u16]) {
        let end = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let now = proxy_listeners(pod);
            if now == want {
                return;
            }
            assert!(
                std::time::Instant::now() < end,
                "{}: proxy ports {now:?}, expected {want:?}",
                pod.name()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What could leak from the node process: its open descriptors and the tasks alive on each
    /// of its runtimes (`zmesh_tokio_alive_tasks`, docs/telemetry.md).
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Held {
        fds: usize,
        data_plane_tasks: f64,
        control_tasks: f64,
    }

    fn held(node: &Netns, zn: &zmesh_testbed::Child) -> Held {
        let m = metrics(node);
        let tasks = |runtime: &str| -> f64 {
            let key = format!("zmesh_tokio_alive_tasks{{runtime=\"{runtime}\"}} ");
            m.lines()
                .find_map(|l| l.strip_prefix(&key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key}in {m}"))
        };
        // After the scrape, whose own connection is then closed on both sides.
        let fds = std::fs::read_dir(format!("/proc/{}/fd", zn.pid()))
            .unwrap()
            .count();
        Held {
            fds,
            data_plane_tasks: tasks("data_plane"),
            control_tasks: tasks("control"),
        }
    }

    /// Reliability #33, the leaks: pods are added, a connection between them is open, and the
    /// pods are deleted over ZDS. The connection is closed at once, each pod's proxy ports stop
    /// listening in its namespace as its `del` is acked (the other pod's stay), and the
    /// node process comes back to the descriptors and tasks it held before the pods arrived.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleting_pods_mid_connection_leaves_no_descriptor_task_or_listener_behind() {
        let Topology {
            node,
            pod_a,
            pod_b,
            dir: _dir,
            cfg,
            agent,
        } = Topology::new();
        let zn = start_node(&node, &cfg, &agent).await;
        zn.wait_for_log("ZDS snapshot complete", Duration::from_secs(10))
            .unwrap();
        // One scrape first, so whatever the first scrape sets up is in the baseline.
        let _ = metrics(&node);
        let before = held(&node, &zn);
        assert!(proxy_listeners(&pod_a).is_empty() && proxy_listeners(&pod_b).is_empty());

        enroll(&agent, "pod-a", &pod_a).await;
        enroll(&agent, "pod-b", &pod_b).await;
        let all = vec![15001, 15006, 15008];
        assert_eq!(proxy_listeners(&pod_a), all);
        assert_eq!(proxy_listeners(&pod_b), all);
        let _app = recording_echo(&pod_b, POD_B);
        let mut open = round_trip(&pod_a, POD_B, b"mid-connection");
        // The counts see the pods: what is checked below is not a measure that cannot move.
        let during = held(&node, &zn);
        assert!(
            during.fds > before.fds && during.data_plane_tasks > before.data_plane_tasks,
            "before the pods {before:?}, with them {during:?}"
        );

        // Pod B goes while the connection is open: the client's side is closed promptly.
        agent.del_pod("pod-b").await.unwrap();
        let closed = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let r = open.read(&mut [0u8; 1]);
            (r, t.elapsed())
        })
        .await
        .unwrap();
        assert!(
            matches!(&closed.0, Ok(0))
                || matches!(&closed.0, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "the open connection must be closed with its pod, got {closed:?}"
        );
        assert!(
            closed.1 < Duration::from_secs(2),
            "closed after {:?}",
            closed.1
        );
        wait_for_listeners(&pod_b, &[]).await;
        assert_eq!(proxy_listeners(&pod_a), all, "pod A is still proxied");
        let refused = node.connect_tcp(format!("{POD_B}:15008"));
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| format!("{e:#}").contains("refused")),
            "pod B's HBONE port after deletion: {refused:?}"
        );

        agent.del_pod("pod-a").await.unwrap();
        wait_for_listeners(&pod_a, &[]).await;
        let m = metrics(&node);
        assert!(m.contains("\nzmesh_zds_pods 0\n"), "{m}");

        // Back to the baseline: every socket, namespace handle, connection and accept loop of
        // the two pods is gone. (Polled: a closing task may need a moment to be reaped.)
        let end = std::time::Instant::now() + Duration::from_secs(5);
        let mut after = held(&node, &zn);
        while !(after.fds <= before.fds
            && after.data_plane_tasks <= before.data_plane_tasks
            && after.control_tasks <= before.control_tasks)
        {
            assert!(
                std::time::Instant::now() < end,
                "leaked: before the pods {before:?}, with them {during:?}, 5 s after deleting them {after:?}\n{}",
                zn.read_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            after = held(&node, &zn);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_hands_over_without_failing_a_connection() {
        let Topology {
            node,
            pod_a,
            pod_b,
            dir: _dir,
            cfg,
            agent,
        } = Topology::new();
        let start = |n: usize| {
            node.spawn(
                env!("CARGO_BIN_EXE_zmesh-node"),
                &["run", "--config", cfg.to_str().unwrap()],
                &[("ZMESH_LOG", "info")],
            )
            .unwrap_or_else(|e| panic!("start node {n}: {e}"))
        };
        let old = start(1);
        old.wait_for_log("connected to the ZDS agent", Duration::from_secs(10))
            .unwrap();
        enroll(&agent, "pod-a", &pod_a).await;
        enroll(&agent, "pod-b", &pod_b).await;

        // A tiny request/response app in pod B.
        let app = pod_b.listen_tcp(format!("{POD_B}:8080")).unwrap();
        std::thread::spawn(move || {
            while let Ok((mut s, _)) = app.accept() {
                std::thread::spawn(move || {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).is_ok() {
                        let _ = s.write_all(&b);
                    }
                });
            }
        });
        // A client opening a new connection every 20 ms for 10 s.
        let pod_a = std::sync::Arc::new(pod_a);
        let client = {
            let pod_a = pod_a.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, Vec::new());
                let t0 = std::time::Instant::now();
                while t0.elapsed() < Duration::from_secs(10) {
                    let r = pod_a
                        .connect_tcp(format!("{POD_B}:8080"))
                        .and_then(|mut c| {
                            c.set_read_timeout(Some(Duration::from_secs(5)))?;
                            c.write_all(b"r")?;
                            let mut b = [0u8; 1];
                            c.read_exact(&mut b)?;
                            Ok(())
                        });
                    match r {
                        Ok(()) => ok += 1,
                        Err(e) => failed.push(format!("{:?}: {e:#}", t0.elapsed())),
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (ok, failed)
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The new process connects, takes the snapshot and binds beside the old one...
        let new = start(2);
        new.wait_for_log("ZDS snapshot complete", Duration::from_secs(10))
            .unwrap();
        // ...then the old one is told to go: it stops accepting and drains.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let (ok, failed) = tokio::task::spawn_blocking(move || client.join().unwrap())
            .await
            .unwrap();
        assert!(
            failed.is_empty(),
            "{} of {} connections failed: {failed:?}\nold: {}\nnew: {}",
            failed.len(),
            ok as usize + failed.len(),
            old.read_log(),
            new.read_log()
        );
        // 10 s at one connection per ~20 ms (plus the round trip): a few hundred, all served.
        assert!(ok >= 200, "only {ok} connections in 10 s");
        old.wait_for_log("drain finished", Duration::from_secs(30))
            .unwrap();
    }

    /// One HTTP/1.1 GET from inside `ns`; the whole response, or the error as text.
    fn readiness(ns: &Netns) -> String {
        ns.http_get("127.0.0.1:15021", "/healthz/ready")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readiness_waits_for_the_zds_snapshot() {
        assert!(is_root(), "needs root to create network namespaces");
        let node = Netns::new("zrd").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        zmesh::identity::FileCa::init(&ca, "cluster.local").unwrap();
        let zds_path = dir.path().join("zds.sock");
        let cfg = dir.path().join("node.yaml");
        std::fs::write(&cfg, config(&ca, &zds_path)).unwrap();
        // No agent yet: the tunnel runs, retries ZDS with backoff, and is not ready.
        let zn = node
            .spawn(
                env!("CARGO_BIN_EXE_zmesh-node"),
                &["run", "--config", cfg.to_str().unwrap()],
                &[],
            )
            .unwrap();
        zn.wait_for_log("waiting for the ZDS snapshot", Duration::from_secs(10))
            .unwrap();
        let before = readiness(&node);
        assert!(
            before.starts_with("HTTP/1.1 500"),
            "ready before any snapshot: {before}"
        );
        assert!(
            before.contains("waiting for: the first ZDS snapshot"),
            "says what is pending: {before}"
        );
        let _agent = ZdsServer::bind(&zds_path).unwrap();
        let mut after = String::new();
        for _ in 0..100 {
            after = readiness(&node);
            if after.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            after.starts_with("HTTP/1.1 200"),
            "not ready after the snapshot: {after}"
        );
    }

    /// In-pod under a control plane: nothing about the pods is in the file. A pod handed over
    /// before its workload arrives over xDS is acked at once and fails closed; once the workload
    /// arrives (matched by name and namespace: istiod's uid is not the pod's) it is proxied,
    /// without being handed over again. Certificates come over CSR on the pods' behalf. The
    /// deprecated `workload_wait` still loads, with a warning.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pod_that_arrives_before_its_workload_is_served_once_xds_sends_it() {
        use zmesh_proto::type_url::{ADDRESS, AUTHORIZATION};
        let Topology {
            node,
            pod_a,
            pod_b,
            dir: _dir,
            cfg,
            agent,
        } = Topology::new();
        // The control plane listens inside the node's namespace, where the tunnel runs.
        let cp =
            crate::common::istiod::FakeIstiod::start_on(node.listen_tcp("127.0.0.1:0").unwrap())
                .await;
        let zds = cfg.with_file_name("zds.sock");
        std::fs::write(
            &cfg,
            format!(
                "node:\n  name: node-1\n  mode: in_pod\n  zds_socket: {}\n  access_log: json\n{}",
                zds.display(),
                cp.node_settings().replace(
                    "pod_name: ztunnel-x",
                    "pod_name: ztunnel-x\n    workload_wait: 2s"
                )
            ),
        )
        .unwrap();
        let zn = start_node(&node, &cfg, &agent).await;
        zn.wait_for_log(
            "workload_wait is deprecated and ignored",
            Duration::from_secs(10),
        )
        .unwrap();
        cp.subscribed(1, ADDRESS).await;
        cp.subscribed(1, AUTHORIZATION).await;
        let wl = |uid: &str, name: &str, sa: &str, ip: &str| {
            let mut w = crate::common::istiod::workload(uid, sa, ip.parse().unwrap(), "node-1");
            w.name = name.into();
            w.namespace = "shop".into();
            crate::common::istiod::address_resource(&w, "1")
        };
        // The control plane has answered (pod B's workload is known; pod A's is not yet).
        let n = cp.push(
            ADDRESS,
            vec![wl(
                "Kubernetes//Pod/shop/server",
                "server",
                "backend",
                POD_B,
            )],
            vec![],
        );
        cp.answer(&n).await;
        let n = cp.push(AUTHORIZATION, vec![], vec![]);
        cp.answer(&n).await;

        // Pod A is handed over first and acked at once; its connections fail closed.
        let started = std::time::Instant::now();
        enroll(&agent, "pod-a", &pod_a).await;
        enroll(&agent, "pod-b", &pod_b).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the ack waited for the model: {:?}",
            started.elapsed()
        );
        let app = pod_b.listen_tcp(format!("{POD_B}:8080")).unwrap();
        assert_refused(&pod_a, POD_B, b"before");
        // Then its workload arrives over xDS: the same proxy starts serving.
        let n = cp.push(
            ADDRESS,
            vec![wl(
                "Kubernetes//Pod/shop/client",
                "client",
                "frontend",
                POD_A,
            )],
            vec![],
        );
        assert!(cp.answer(&n).await.error_detail.is_none());
        zn.wait_for_log("pod's workload arrived", Duration::from_secs(10))
            .unwrap();
        // Traffic between the two xDS-described pods flows through their proxies.
        let server = std::thread::spawn(move || {
            let (mut s, peer) = app.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(b"ok").unwrap();
            peer
        });
        let mut c = pod_a.connect_tcp(format!("{POD_B}:8080")).unwrap();
        c.write_all(b"hello").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"ok");
        assert_eq!(
            server.join().unwrap().ip(),
            POD_A.parse::<IpAddr>().unwrap()
        );

        // Each pod's identity was asked for on its behalf (in the background: by the time both
        // proxies have carried traffic, both certificates are in).
        let mut asked: Vec<String> = cp
            .csrs()
            .into_iter()
            .filter_map(|c| c.impersonated)
            .collect();
        asked.sort();
        asked.dedup();
        assert_eq!(
            asked,
            [
                "spiffe://cluster.local/ns/shop/sa/backend",
                "spiffe://cluster.local/ns/shop/sa/frontend"
            ]
        );
    }

    /// Connects from `from` to `to` (port 8080 unless it names one), sends `msg` and expects
    /// the connection to fail (refused or reset), never to be answered.
    fn assert_refused(from: &Netns, to: &str, msg: &[u8]) {
        let to = if to.contains(':') {
            to.to_string()
        } else {
            format!("{to}:8080")
        };
        let r = from
            .connect_tcp(&to)
            .map_err(|e| format!("connect: {e:#}"))
            .and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(5)))
                    .map_err(|e| e.to_string())?;
                let mut b = [0u8; 1];
                match c.write_all(msg).and_then(|()| c.read(&mut b)) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        Err("reset".into())
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                        Err("broken pipe".into())
                    }
                    other => Ok(format!("{other:?}")),
                }
            });
        assert!(
            r.is_err(),
            "{to} from {}: expected a reset or refusal, got {r:?}",
            from.name()
        );
    }

    /// An app on `ip`:8080 inside `ns` that echoes what it reads and records every byte it was
    /// ever sent (to prove nothing reached it while its pod failed closed).
    fn recording_echo(ns: &Netns, ip: &str) -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let app = ns.listen_tcp(format!("{ip}:8080")).unwrap();
        let record = seen.clone();
        std::thread::spawn(move || {
            for s in app.incoming() {
                let Ok(mut s) = s else { return };
                let record = record.clone();
                std::thread::spawn(move || {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 {
                            return;
                        }
                        // Recorded before the echo: a client that has its echo back finds
                        // the bytes recorded.
                        record.lock().unwrap().extend_from_slice(&b[..n]);
                        if s.write_all(&b[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        seen
    }

    /// Sends `msg` from `from` to `to`:8080 and expects it echoed back.
    fn round_trip(from: &Netns, to: &str, msg: &[u8]) -> std::net::TcpStream {
        let mut c = from.connect_tcp(format!("{to}:8080")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
        c
    }

    fn signal(child: &zmesh_testbed::Child, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.pid() as i32), sig).unwrap();
    }

    /// The node's Prometheus text (read from inside the node's namespace).
    fn metrics(node: &Netns) -> String {
        node.http_get("127.0.0.1:15020", "/metrics")
    }

    /// The ZDS contract for a pod the model does not know (issue #13): the add is acked at once;
    /// the pod's proxy fails closed on all three of its listeners (outbound from it, HBONE and
    /// plaintext to it: reset, counted, logged, and no byte reaches an app); a file reload that
    /// adds its workload makes the same proxy serve, without handing the pod over again; a
    /// reload that removes it again closes its open connection and fails closed again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pod_unknown_to_the_model_fails_closed_until_a_reload_adds_it() {
        let Topology {
            node,
            pod_a,
            pod_b,
            dir: _dir,
            cfg,
            agent,
        } = Topology::new();
        let with_a = std::fs::read_to_string(&cfg).unwrap();
        let without_a: String = with_a
            .lines()
            .filter(|l| !l.contains("uid: pod-a"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_ne!(with_a, without_a);
        std::fs::write(&cfg, &without_a).unwrap();
        let zn = start_node(&node, &cfg, &agent).await;

        // Acked at once, with no error, though the model does not know pod A.
        let started = std::time::Instant::now();
        enroll(&agent, "pod-a", &pod_a).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the ack waited: {:?}",
            started.elapsed()
        );
        enroll(&agent, "pod-b", &pod_b).await;
        zn.wait_for_log(
            "pod proxy started before its workload is in the model",
            Duration::from_secs(10),
        )
        .unwrap();
        let dump = node.http_get("127.0.0.1:15000", "/config_dump");
        let body = dump.split_once("\r\n\r\n").unwrap().1;
        let dump: serde_json::Value = serde_json::from_str(body).unwrap();
        let a = dump["pod_proxies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["uid"] == "pod-a")
            .unwrap();
        assert_eq!(a["state"], "waiting_for_workload", "{a}");
        assert_eq!(
            a["zds_identity"], "spiffe://cluster.local/ns/shop/sa/frontend",
            "{a}"
        );
        assert!(a["identity"].is_null(), "{a}");

        let at_a = recording_echo(&pod_a, POD_A);
        let at_b = recording_echo(&pod_b, POD_B);
        // Outbound from A (its outbound listener); to A from B (the model does not know A's
        // address, so B's proxy passes it through and it meets A's plaintext inbound listener);
        // and straight at A's HBONE port from the node's namespace: all refused.
        assert_refused(&pod_a, POD_B, b"secret-outbound");
        assert_refused(&pod_b, POD_A, b"secret-plaintext");
        assert_refused(&node, &format!("{POD_A}:15008"), b"secret-hbone");
        let m = metrics(&node);
        for listener in ["outbound", "hbone", "plaintext"] {
            let series = format!(
                "zmesh_rejected_total{{listener=\"{listener}\",reason=\"pod_workload_unknown\"}} "
            );
            assert!(m.contains(&series), "no {series}in {m}");
        }
        zn.wait_for_log(
            "pod shop/client (uid \\\"pod-a\\\") is not a workload in the model yet",
            Duration::from_secs(10),
        )
        .unwrap();

        // A reload that adds pod A's workload: the same proxy serves, both ways.
        std::fs::write(&cfg, &with_a).unwrap();
        signal(&zn, nix::sys::signal::Signal::SIGHUP);
        zn.wait_for_log("pod's workload arrived", Duration::from_secs(10))
            .unwrap();
        let open = round_trip(&pod_a, POD_B, b"hello-b");
        drop(round_trip(&pod_b, POD_A, b"hello-a"));
        for (app, name) in [(&at_a, "A"), (&at_b, "B")] {
            let got = String::from_utf8_lossy(&app.lock().unwrap()).into_owned();
            assert!(
                !got.contains("secret"),
                "bytes reached the app in pod {name} while its proxy failed closed: {got:?}"
            );
        }
        assert_eq!(&*at_b.lock().unwrap(), b"hello-b");
        assert_eq!(&*at_a.lock().unwrap(), b"hello-a");

        // A reload that removes it again: the open connection is closed, new ones refused.
        std::fs::write(&cfg, &without_a).unwrap();
        signal(&zn, nix::sys::signal::Signal::SIGHUP);
        zn.wait_for_log(
            "pod's workload removed from the model",
            Duration::from_secs(10),
        )
        .unwrap();
        let closed = tokio::task::spawn_blocking(move || {
            let mut open = open;
            let mut b = [0u8; 1];
            open.read(&mut b)
        })
        .await
        .unwrap();
        assert!(
            matches!(&closed, Ok(0))
                || matches!(&closed, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "the open connection must be closed, got {closed:?}"
        );
        // The client's connection, and the pooled HBONE connection B's proxy kept to A.
        let m = metrics(&node);
        let closed: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix("zmesh_pod_unbound_connections_closed_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no closed-connection count in {m}"));
        assert!(closed >= 1.0, "{m}");
        assert_refused(&pod_a, POD_B, b"secret-again");
        assert!(!String::from_utf8_lossy(&at_b.lock().unwrap()).contains("secret"));
    }
}
