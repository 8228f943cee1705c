//! Tier (b): nodes in this process fed by a fake istiod (tests/common/istiod.rs), a real tonic
//! server speaking delta ADS and CreateCertificate over TLS. Workloads, services and policies
//! appear, change and disappear; bad resources are NACKed while the good ones apply; a broken
//! stream resumes with initial_resource_versions; readiness follows the first sync; a pushed DENY
//! closes an open connection; certificates come over CSR.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::istiod::*;
use common::*;
use tokio::net::TcpListener;
use zmesh::config::Config;
use zmesh::proxy::{self, Node};
use zmesh_proto::istio::security as sec;
use zmesh_proto::istio::workload as wl;
use zmesh_proto::type_url::{ADDRESS, AUTHORIZATION};

const WAIT: Duration = Duration::from_secs(10);

/// A node with no workloads in its file: everything comes from `cp`.
async fn xds_node(mesh: &mut Mesh, cp: &FakeIstiod, name: &str, host: u8) -> Arc<Node> {
    let text = format!(
        "node:\n  name: {name}\n  bind: {bind}\n  access_log: text\n{cp}",
        bind = ip(mesh.net, host),
        cp = cp.node_settings()
    );
    let cfg = Config::parse(&text, name).unwrap();
    let node = Node::new(cfg).unwrap();
    mesh.nodes.push(proxy::start(node.clone()).await.unwrap());
    node
}

/// Answers the two subscriptions of stream `stream` with `addresses` and `policies`.
async fn sync(
    cp: &FakeIstiod,
    stream: usize,
    addresses: Vec<zmesh_proto::envoy::service::discovery::v3::Resource>,
    policies: Vec<zmesh_proto::envoy::service::discovery::v3::Resource>,
) {
    cp.subscribed(stream, ADDRESS).await;
    cp.subscribed(stream, AUTHORIZATION).await;
    let a = cp.push_to(stream, ADDRESS, addresses, vec![]);
    let p = cp.push_to(stream, AUTHORIZATION, policies, vec![]);
    assert!(cp.answer(&a).await.error_detail.is_none());
    assert!(cp.answer(&p).await.error_detail.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_appear_change_and_disappear_and_readiness_follows_the_first_sync() {
    let net = 71;
    let cp = FakeIstiod::start().await;
    let mut mesh = Mesh::new(net);
    let a = xds_node(&mut mesh, &cp, "node-a", 1).await;

    // The subscription: both types on one stream, ztunnel's node id and metadata, the token
    // (trailing newline trimmed) and the cluster id.
    let first = cp.subscribed(1, ADDRESS).await;
    let node = first.req.node.as_ref().expect("node in the first request");
    assert_eq!(
        node.id,
        "ztunnel~10.9.9.9~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    );
    let md = &node.metadata.as_ref().unwrap().fields;
    for k in ["NAME", "NAMESPACE", "INSTANCE_IPS", "NODE_NAME"] {
        assert!(md.contains_key(k), "metadata {k} missing: {md:?}");
    }
    assert_eq!(first.authorization.as_deref(), Some("Bearer token-one"));
    assert_eq!(first.cluster_id.as_deref(), Some("test-cluster"));
    assert!(first.req.initial_resource_versions.is_empty());
    cp.subscribed(1, AUTHORIZATION).await;
    assert!(!a.is_ready(), "ready before any xDS response");

    let client = workload("client", "client", ip(net, 2), "node-a");
    let server = workload("server", "server", ip(net, 3), "node-b");
    let mut svc = wl::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![wl::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
        }],
        ports: vec![wl::Port {
            service_port: 80,
            target_port: 8080,
        }],
        ..Default::default()
    };
    let mut server_backs = server.clone();
    server_backs.services.insert(
        "default/echo.default.svc.cluster.local".into(),
        wl::PortList {
            ports: vec![wl::Port {
                service_port: 80,
                target_port: 8080,
            }],
        },
    );
    let n = cp.push(
        ADDRESS,
        vec![
            address_resource(&client, "1"),
            address_resource(&server_backs, "1"),
            service_resource(&svc, "1"),
        ],
        vec![],
    );
    let ack = cp.answer(&n).await;
    assert_eq!(ack.type_url, ADDRESS);
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    let m = a.model();
    assert_eq!(m.workloads().len(), 2);
    assert_eq!(m.local_workloads().count(), 1);
    let echo = m
        .service_by_host("echo.default.svc.cluster.local")
        .expect("service");
    assert_eq!(echo.endpoints.len(), 1);
    assert_eq!(echo.ports.get(&80), Some(&8080));
    assert!(!a.is_ready(), "ready before the Authorization type synced");
    // A type with nothing in it still gets a response; readiness waits for it.
    let n = cp.push(AUTHORIZATION, vec![], vec![]);
    assert!(cp.answer(&n).await.error_detail.is_none());
    // The local workload's certificate comes over CSR from the fake CA, asked for on its behalf.
    wait_until("readiness", WAIT, || a.is_ready()).await;
    let csr = cp.csrs().pop().expect("a CSR");
    assert_eq!(
        csr.impersonated.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/client")
    );
    assert_eq!(csr.authorization.as_deref(), Some("Bearer token-one"));

    // A change: the server moves to another address; the service gains a port.
    let mut moved = server_backs.clone();
    moved.addresses = vec![vec![127, net, 0, 4]];
    svc.ports.push(wl::Port {
        service_port: 443,
        target_port: 8443,
    });
    let n = cp.push(
        ADDRESS,
        vec![address_resource(&moved, "2"), service_resource(&svc, "2")],
        vec![],
    );
    assert!(cp.answer(&n).await.error_detail.is_none());
    let m = a.model();
    assert!(m.workload_by_ip(ip(net, 3)).is_none());
    assert_eq!(m.workload_by_ip(ip(net, 4)).unwrap().uid, "server");
    assert_eq!(
        m.service_by_host("echo.default.svc.cluster.local")
            .unwrap()
            .ports
            .len(),
        2
    );

    // Removal: the workload and the service go; the client stays.
    let n = cp.push(
        ADDRESS,
        vec![],
        vec![
            "server".into(),
            "default/echo.default.svc.cluster.local".into(),
        ],
    );
    assert!(cp.answer(&n).await.error_detail.is_none());
    let m = a.model();
    assert_eq!(m.workloads().len(), 1);
    assert!(m
        .service_by_host("echo.default.svc.cluster.local")
        .is_none());

    // The Istio metric names and the config dump show the stream.
    let text = a.metrics_text();
    for family in [
        "istio_xds_message_total{url=\"type.googleapis.com/istio.workload.Address\"} 3",
        "istio_xds_message_bytes_total",
        "istio_xds_connection_terminations_total",
    ] {
        assert!(text.contains(family), "{family} missing from:\n{text}");
    }
    let dump = zmesh::proxy::admin::config_dump(&a);
    assert_eq!(dump["xds"]["resources"][ADDRESS]["client"], "1");
    assert_eq!(dump["xds"]["types"][1]["synced"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resources_are_nacked_by_name_and_field_while_the_good_ones_apply() {
    let net = 72;
    let cp = FakeIstiod::start().await;
    let mut mesh = Mesh::new(net);
    let a = xds_node(&mut mesh, &cp, "node-a", 1).await;
    sync(&cp, 1, vec![], vec![]).await;

    let good = workload("good", "good", ip(net, 2), "node-b");
    let mut five_bytes = workload("five-bytes", "x", ip(net, 3), "node-b");
    five_bytes.addresses = vec![vec![1, 2, 3, 4, 5]];
    let mut bad_sa = workload("bad-sa", "Not/Valid", ip(net, 4), "node-b");
    bad_sa.service_account = "no/slashes".into();
    let mut garbage = address_resource(&good, "1");
    garbage.name = "garbage".into();
    garbage.resource.as_mut().unwrap().value = vec![0xff, 0xff, 0xff];
    let mut wrong_type = address_resource(&good, "1");
    wrong_type.name = "wrong-type".into();
    wrong_type.resource.as_mut().unwrap().type_url = AUTHORIZATION.into();
    let n = cp.push(
        ADDRESS,
        vec![
            address_resource(&five_bytes, "1"),
            address_resource(&good, "1"),
            address_resource(&bad_sa, "1"),
            garbage,
            wrong_type,
        ],
        vec![],
    );
    let nack = cp.answer(&n).await;
    let detail = nack.error_detail.expect("a NACK");
    assert_eq!(detail.code, 3, "INVALID_ARGUMENT");
    for needle in [
        "five-bytes: addresses[0]: 5 bytes",
        "bad-sa: service_account",
        "garbage: resource: cannot decode",
        "wrong-type: resource.type_url",
    ] {
        assert!(
            detail.message.contains(needle),
            "{needle:?} not in {:?}",
            detail.message
        );
    }
    let m = a.model();
    assert_eq!(m.workloads().len(), 1, "only the good workload applied");
    assert_eq!(m.workloads()[0].uid, "good");

    // A refused update keeps the version that was applied before it (nothing lost).
    let mut broken_good = good.clone();
    broken_good.addresses = vec![vec![]];
    let n = cp.push(ADDRESS, vec![address_resource(&broken_good, "2")], vec![]);
    assert!(cp.answer(&n).await.error_detail.is_some());
    assert_eq!(a.model().workload_by_ip(ip(net, 2)).unwrap().uid, "good");
    assert_eq!(
        zmesh::proxy::admin::config_dump(&a)["xds"]["resources"][ADDRESS]["good"],
        "1"
    );

    // A policy that cannot be enforced as written is NACKed and enforced as deny-all over its
    // scope: a bad DENY never opens what it meant to close.
    let mut bad = principal_policy("bad-deny", sec::Action::Deny, "a*b");
    bad.rules[0].clauses[0].matches[0].source_ips = vec![sec::Address {
        address: vec![10, 0, 0, 0],
        length: 8,
    }];
    let ok = principal_policy(
        "ok-allow",
        sec::Action::Allow,
        "cluster.local/ns/default/sa/x",
    );
    let n = cp.push(
        AUTHORIZATION,
        vec![policy_resource(&bad, "1"), policy_resource(&ok, "1")],
        vec![],
    );
    let nack = cp.answer(&n).await.error_detail.expect("a NACK");
    assert!(
        nack.message.contains("default/bad-deny"),
        "{}",
        nack.message
    );
    let summary = a.state().policies.summary();
    assert!(
        summary.contains(&("default/bad-deny".to_string(), false)),
        "{summary:?}"
    );
    assert!(
        summary.contains(&("default/ok-allow".to_string(), true)),
        "{summary:?}"
    );

    // An unsubscribed type is refused, and the stream goes on.
    let n = cp.push(
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        vec![],
        vec![],
    );
    assert!(cp
        .answer(&n)
        .await
        .error_detail
        .unwrap()
        .message
        .contains("not subscribed"));
    assert_eq!(cp.streams(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_resumes_with_initial_resource_versions_and_a_fresh_token() {
    let net = 73;
    let cp = FakeIstiod::start().await;
    let mut mesh = Mesh::new(net);
    let a = xds_node(&mut mesh, &cp, "node-a", 1).await;
    let w1 = workload("w1", "s1", ip(net, 2), "node-b");
    let w2 = workload("w2", "s2", ip(net, 3), "node-b");
    let deny = principal_policy("d", sec::Action::Deny, "cluster.local/ns/x/sa/y");
    sync(
        &cp,
        1,
        vec![address_resource(&w1, "v1"), address_resource(&w2, "v7")],
        vec![policy_resource(&deny, "p3")],
    )
    .await;
    assert_eq!(a.model().workloads().len(), 2);

    // The projected token rotates; the stream breaks.
    std::fs::write(&cp.token, "token-two\n").unwrap();
    cp.break_stream();
    let again = cp.subscribed(2, ADDRESS).await;
    let versions: std::collections::BTreeMap<_, _> =
        again.req.initial_resource_versions.into_iter().collect();
    assert_eq!(
        versions,
        [
            ("w1".to_string(), "v1".to_string()),
            ("w2".into(), "v7".into())
        ]
        .into_iter()
        .collect()
    );
    assert_eq!(again.authorization.as_deref(), Some("Bearer token-two"));
    let p = cp.subscribed(2, AUTHORIZATION).await;
    assert_eq!(
        p.req
            .initial_resource_versions
            .get("default/d")
            .map(String::as_str),
        Some("p3")
    );
    // While the stream was down nothing was dropped.
    assert_eq!(a.model().workloads().len(), 2);
    assert_eq!(a.state().policies.len(), 1);
    assert!(
        a.is_ready(),
        "a node that synced once stays ready through a reconnect"
    );
    // The server answers with just the difference.
    let n = cp.push(ADDRESS, vec![], vec!["w2".into()]);
    assert!(cp.answer(&n).await.error_detail.is_none());
    assert_eq!(a.model().workloads().len(), 1);
    let terminations = a.metrics_text();
    assert!(
        terminations.contains("istio_xds_connection_terminations_total{reason=\"Error\"} 1"),
        "{terminations}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_control_plane_changes_nothing_and_it_is_retried_with_backoff() {
    let net = 74;
    let mut cp = FakeIstiod::start().await;
    let mut mesh = Mesh::new(net);
    let a = xds_node(&mut mesh, &cp, "node-a", 1).await;
    let w = workload("w", "s", ip(net, 2), "node-b");
    sync(&cp, 1, vec![address_resource(&w, "1")], vec![]).await;
    cp.stop();
    // Several connection attempts fail; none of them loses state or readiness.
    wait_until("failed reconnects", WAIT, || {
        a.metrics_text()
            .contains("istio_xds_connection_terminations_total{reason=\"ConnectionError\"} 2")
    })
    .await;
    assert_eq!(a.model().workloads().len(), 1);
    assert!(a.is_ready());
    cp.restart().await;
    let again = cp
        .wait_for("a new stream", |s| {
            s.req.type_url == ADDRESS && s.stream >= 2
        })
        .await;
    assert_eq!(
        again
            .req
            .initial_resource_versions
            .get("w")
            .map(String::as_str),
        Some("1")
    );
}

/// Both nodes subscribe on their own streams (1 and 2, in either order) and get `resources`
/// and no policy; once both are ready, an echo app listens at 127.<net>.0.3:8080 (its address
/// is returned).
async fn both_synced_with_an_echo_app(
    cp: &FakeIstiod,
    nodes: [&Arc<Node>; 2],
    net: u8,
    resources: impl Fn() -> Vec<zmesh_proto::envoy::service::discovery::v3::Resource>,
) -> SocketAddr {
    for stream in [1, 2] {
        sync(cp, stream, resources(), vec![]).await;
    }
    wait_until("both ready", WAIT, || nodes.iter().all(|n| n.is_ready())).await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    spawn_echo(app);
    dst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_deny_closes_an_open_connection() {
    let net = 75;
    let cp = FakeIstiod::start().await;
    let mut mesh = Mesh::new(net);
    let a = xds_node(&mut mesh, &cp, "node-a", 1).await;
    let b = xds_node(&mut mesh, &cp, "node-b", 3).await;
    let client = workload("client", "client", ip(net, 2), "node-a");
    let server = workload("server", "server", ip(net, 3), "node-b");
    let resources = || {
        vec![
            address_resource(&client, "1"),
            address_resource(&server, "1"),
        ]
    };
    let dst = both_synced_with_an_echo_app(&cp, [&a, &b], net, resources).await;
    let entry = capture_to(a.clone(), ip(net, 2), dst).await;
    let mut c = connect_from(ip(net, 2), entry).await.unwrap();
    round_trip(&mut c, b"hello over xDS-configured HBONE").await;

    // An unrelated policy re-judges the connection and keeps it.
    let other = principal_policy("deny-other", sec::Action::Deny, "cluster.local/ns/x/sa/y");
    for stream in [1, 2] {
        let n = cp.push_to(
            stream,
            AUTHORIZATION,
            vec![policy_resource(&other, "1")],
            vec![],
        );
        assert!(cp.answer(&n).await.error_detail.is_none());
    }
    round_trip(&mut c, b"still open after an unrelated push").await;

    // The DENY for the client closes it at node B, and new connections are refused.
    let deny = principal_policy(
        "deny-client",
        sec::Action::Deny,
        "cluster.local/ns/default/sa/client",
    );
    for stream in [1, 2] {
        let n = cp.push_to(
            stream,
            AUTHORIZATION,
            vec![policy_resource(&deny, "1")],
            vec![],
        );
        assert!(cp.answer(&n).await.error_detail.is_none());
    }
    assert_cut(&mut c).await;
    assert_eq!(
        b.stats
            .policy_closed
            .load(std::sync::atomic::Ordering::Acquire),
        1
    );
    assert_refused(ip(net, 2), entry).await;

    // Removing the DENY opens the path again.
    for stream in [1, 2] {
        let n = cp.push_to(
            stream,
            AUTHORIZATION,
            vec![],
            vec!["default/deny-client".into()],
        );
        assert!(cp.answer(&n).await.error_detail.is_none());
    }
    let mut c = connect_from(ip(net, 2), entry).await.unwrap();
    round_trip(&mut c, b"allowed again").await;
}

/// The mesh-wide scope over xDS: an Authorization of scope GLOBAL in the root namespace
/// (`istio-system`, where istiod puts mesh-wide policy) closes an open connection to a workload
/// of another namespace; the same policy with scope NAMESPACE does not. A client it does not
/// name keeps its open connection and opens new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_global_deny_closes_the_open_connection_it_names() {
    let net = 164;
    let cp = FakeIstiod::start().await;
    let mut mesh = Mesh::new(net);
    let a = xds_node(&mut mesh, &cp, "node-a", 1).await;
    let b = xds_node(&mut mesh, &cp, "node-b", 3).await;
    let resources = || {
        vec![
            address_resource(&workload("client", "client", ip(net, 2), "node-a"), "1"),
            address_resource(
                &workload("bystander", "bystander", ip(net, 4), "node-a"),
                "1",
            ),
            address_resource(&workload("server", "server", ip(net, 3), "node-b"), "1"),
        ]
    };
    let dst = both_synced_with_an_echo_app(&cp, [&a, &b], net, resources).await;
    let entry = capture_to(a.clone(), ip(net, 2), dst).await;
    let other_entry = capture_to(a.clone(), ip(net, 4), dst).await;
    let mut c = connect_from(ip(net, 2), entry).await.unwrap();
    round_trip(&mut c, b"hello over xDS-configured HBONE").await;
    let mut other = connect_from(ip(net, 4), other_entry).await.unwrap();
    round_trip(&mut other, b"a client no policy names").await;

    let root = |scope: sec::Scope| sec::Authorization {
        namespace: "istio-system".into(),
        scope: scope as i32,
        ..principal_policy(
            "deny-client",
            sec::Action::Deny,
            "cluster.local/ns/default/sa/client",
        )
    };
    let push = |p: sec::Authorization, version: &'static str| {
        let cp = &cp;
        async move {
            for stream in [1, 2] {
                let n = cp.push_to(
                    stream,
                    AUTHORIZATION,
                    vec![policy_resource(&p, version)],
                    vec![],
                );
                assert!(cp.answer(&n).await.error_detail.is_none());
            }
        }
    };
    let closed = || {
        b.stats
            .policy_closed
            .load(std::sync::atomic::Ordering::Acquire)
    };
    // Scope NAMESPACE in the root namespace: no workload there, nothing changes.
    push(root(sec::Scope::Namespace), "1").await;
    round_trip(&mut c, b"a root-namespace policy of namespace scope").await;
    assert_eq!(closed(), 0);

    // The same policy, now GLOBAL: the client's connection is closed, new ones refused.
    push(root(sec::Scope::Global), "2").await;
    assert_cut(&mut c).await;
    assert_eq!(closed(), 1);
    assert_refused(ip(net, 2), entry).await;
    round_trip(&mut other, b"still open under the global deny").await;
    let mut fresh = connect_from(ip(net, 4), other_entry).await.unwrap();
    round_trip(&mut fresh, b"new connection of the bystander").await;
    assert_eq!(closed(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_fails_tls_verification_is_never_used() {
    let net = 76;
    let cp = FakeIstiod::start().await;
    let other = FakeIstiod::start().await;
    let mut mesh = Mesh::new(net);
    // The node trusts another root than the one that signed the server: every connect fails
    // verification; nothing is sent to the server, nothing is applied, the node is not ready.
    let settings = cp.node_settings().replace(
        &cp.root.display().to_string(),
        &other.root.display().to_string(),
    );
    let text = format!(
        "node:\n  name: node-a\n  bind: {}\n  access_log: text\n{settings}",
        ip(net, 1)
    );
    let a = Node::new(Config::parse(&text, "a").unwrap()).unwrap();
    mesh.nodes.push(proxy::start(a.clone()).await.unwrap());
    wait_until("two refused connects", WAIT, || {
        a.metrics_text()
            .contains("istio_xds_connection_terminations_total{reason=\"ConnectionError\"} 2")
    })
    .await;
    assert!(
        cp.requests().is_empty(),
        "a request reached an unverified server"
    );
    assert!(!a.is_ready());
    assert!(a.pending().iter().any(|p| p.contains("first xDS response")));

    // A wrong TLS name is refused the same way.
    let settings = cp
        .node_settings()
        .replace("server_name: istiod.test", "server_name: evil.test");
    let text = format!(
        "node:\n  name: node-b\n  bind: {}\n  access_log: text\n{settings}",
        ip(net, 2)
    );
    let b = Node::new(Config::parse(&text, "b").unwrap()).unwrap();
    mesh.nodes.push(proxy::start(b.clone()).await.unwrap());
    wait_until("a refused connect", WAIT, || {
        b.metrics_text()
            .contains("istio_xds_connection_terminations_total{reason=\"ConnectionError\"} 1")
    })
    .await;
    assert!(cp.requests().is_empty());

    // Plaintext is never a fallback: an http:// address is an error naming it.
    let e = zmesh::grpc::parse_address("http://istiod:15010")
        .unwrap_err()
        .to_string();
    assert!(e.contains("https://"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_the_model_comes_from_cannot_change_by_reload() {
    let net = 77;
    let cp = FakeIstiod::start().await;
    let mut mesh = Mesh::new(net);
    let a = xds_node(&mut mesh, &cp, "node-a", 1).await;
    let w = workload("w", "s", ip(net, 2), "node-b");
    sync(&cp, 1, vec![address_resource(&w, "1")], vec![]).await;
    // A file without the control plane would publish its (empty) model over the pushed one.
    let file = node_yaml(net, "node-a", 1, &mesh.ca_dir, "");
    let e = a.reload(Config::parse(&file, "a").unwrap()).unwrap_err();
    assert!(e.to_string().contains("restart"), "{e}");
    assert_eq!(a.model().workloads().len(), 1, "the pushed model stays");
    // Nor can a file-fed node switch to a control plane by reload.
    let b = mesh.node("node-b", 3, &workloads_yaml(net, &[])).await;
    let text = format!(
        "node:\n  name: node-b\n  bind: {}\n{}",
        ip(net, 3),
        cp.node_settings()
    );
    let e = b.reload(Config::parse(&text, "b").unwrap()).unwrap_err();
    assert!(e.to_string().contains("node.control_plane"), "{e}");
}
