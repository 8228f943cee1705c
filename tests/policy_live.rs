//! Tier (b): authorization policy enforced at the destination, and policy changes reaching
//! connections that are already open (reliability #21, #31). Node B's config is a file that the
//! node watches; each test edits it the way an operator would.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::net::{TcpListener, TcpStream};
use zmesh::proxy::Node;

/// How long a policy change may take to close a connection: the watch interval plus slack for
/// a loaded CI machine. The spec asks for "within seconds".
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

const CLIENT_PRINCIPAL: &str = "cluster.local/ns/default/sa/client";

struct Setup {
    _mesh: Mesh,
    a: Arc<Node>,
    b: Arc<Node>,
    b_path: PathBuf,
    /// The base text of node B's config, before any policy.
    b_base: String,
    /// Where the client app connects (stands in for capture on node A).
    entry: SocketAddr,
    /// The echo app behind B.
    dst: SocketAddr,
}

/// Node A (client at .2) and node B (server at .3, config from a watched file), with an echo
/// app behind B.
async fn setup(net: u8, policies: &str) -> Setup {
    setup_with(net, policies, &[]).await
}

/// `setup` with `extra` workloads in both nodes' models.
async fn setup_with(net: u8, policies: &str, extra: &[W]) -> Setup {
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", extra);
    let a = mesh.node("node-a", 2, &w).await;
    let b_base = node_yaml(net, "node-b", 3, &mesh.ca_dir, &w);
    let (b, b_path) = mesh
        .node_from_file("node-b", &format!("{b_base}{policies}"))
        .await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let dst = app.local_addr().unwrap();
    spawn_echo(app);
    let entry = capture_to(a.clone(), ip(net, 2), dst).await;
    Setup {
        _mesh: mesh,
        a,
        b,
        b_path,
        b_base,
        entry,
        dst,
    }
}

fn policy(name: &str, scope: &str, action: &str, principals: &[&str]) -> String {
    format!(
        "  - name: {name}\n    namespace: default\n    scope: {scope}\n    action: {action}\n    rules:\n      - clauses:\n          - matches:\n              - principals: {principals:?}\n"
    )
}

async fn open(s: &Setup, net: u8) -> TcpStream {
    let mut c = connect_from(ip(net, 2), s.entry).await.unwrap();
    round_trip(&mut c, b"hello through the tunnel").await;
    c
}

async fn change_policies(s: &Setup, policies: &str) {
    let applied = s.b.stats.reloads_applied.load(Ordering::Acquire);
    rewrite(&s.b_path, &format!("{}{policies}", s.b_base));
    wait_until("the reload", CLOSE_WITHIN, || {
        s.b.stats.reloads_applied.load(Ordering::Acquire) > applied
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_deny_added_to_the_file_closes_the_open_tunnel() {
    let net = 31;
    let s = setup(net, "").await;
    let mut c = open(&s, net).await;
    // An unrelated policy change re-judges the connection and keeps it.
    let unrelated = policy(
        "deny-other",
        "namespace",
        "deny",
        &["cluster.local/ns/x/sa/y"],
    );
    change_policies(&s, &format!("policies:\n{unrelated}")).await;
    round_trip(&mut c, b"still open after an unrelated change").await;
    assert_eq!(s.b.stats.policy_closed.load(Ordering::Acquire), 0);

    let deny = policy("deny-client", "namespace", "deny", &[CLIENT_PRINCIPAL]);
    change_policies(&s, &format!("policies:\n{deny}")).await;
    assert_cut(&mut c).await;
    assert_eq!(s.b.stats.policy_closed.load(Ordering::Acquire), 1);
    assert_refused(ip(net, 2), s.entry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_selector_deny_closes_the_open_tunnel() {
    // ztunnel misses this scope when re-judging open connections; zmesh re-judges every one.
    let net = 32;
    let s = setup(net, "").await;
    let mut c = open(&s, net).await;
    // A selector naming another workload does not touch this connection.
    let elsewhere = policy(
        "deny-elsewhere",
        "{workload_selector: {workloads: [not-server]}}",
        "deny",
        &[CLIENT_PRINCIPAL],
    );
    change_policies(&s, &format!("policies:\n{elsewhere}")).await;
    round_trip(&mut c, b"a selector for another workload").await;

    let here = policy(
        "deny-server",
        "{workload_selector: {workloads: [server]}}",
        "deny",
        &[CLIENT_PRINCIPAL],
    );
    change_policies(&s, &format!("policies:\n{here}")).await;
    assert_cut(&mut c).await;
    assert_refused(ip(net, 2), s.entry).await;
}

/// The mesh-wide scope: a policy in the root namespace (`istio-system`, as Istio's) with
/// `scope: global` reaches a connection to a workload of another namespace. The same policy
/// scoped to its own namespace does not, so it is the scope that closes the tunnel; a second
/// client the DENY does not name keeps its open tunnel and can open new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_deny_in_the_root_namespace_closes_the_open_tunnel_it_names() {
    let net = 163;
    let bystander = W {
        uid: "bystander",
        sa: "bystander",
        host: 4,
        node: "node-a",
    };
    let s = setup_with(net, "", &[bystander]).await;
    let mut c = open(&s, net).await;
    let other_entry = capture_to(s.a.clone(), ip(net, 4), s.dst).await;
    let mut other = connect_from(ip(net, 4), other_entry).await.unwrap();
    round_trip(&mut other, b"a client no policy names").await;

    let root = |scope: &str| {
        policy("deny-client", scope, "deny", &[CLIENT_PRINCIPAL])
            .replace("namespace: default", "namespace: istio-system")
    };
    // Scoped to its own namespace, where no workload lives here: nothing changes.
    change_policies(&s, &format!("policies:\n{}", root("namespace"))).await;
    round_trip(&mut c, b"a root-namespace policy of namespace scope").await;
    assert_eq!(s.b.stats.policy_closed.load(Ordering::Acquire), 0);

    change_policies(&s, &format!("policies:\n{}", root("global"))).await;
    assert_cut(&mut c).await;
    assert_eq!(s.b.stats.policy_closed.load(Ordering::Acquire), 1);
    assert_refused(ip(net, 2), s.entry).await;
    // The other client's tunnel was re-judged, allowed and kept; new ones are served.
    round_trip(&mut other, b"still open under the global deny").await;
    let mut fresh = connect_from(ip(net, 4), other_entry).await.unwrap();
    round_trip(&mut fresh, b"new connection of the bystander").await;
    assert_eq!(s.b.stats.policy_closed.load(Ordering::Acquire), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_that_excludes_the_open_connection_closes_it() {
    let net = 33;
    let allow_client = policy("allow-client", "namespace", "allow", &[CLIENT_PRINCIPAL]);
    let s = setup(net, &format!("policies:\n{allow_client}")).await;
    let mut c = open(&s, net).await;
    let allow_other = policy(
        "allow-other",
        "namespace",
        "allow",
        &["cluster.local/ns/default/sa/someone-else"],
    );
    change_policies(&s, &format!("policies:\n{allow_other}")).await;
    assert_cut(&mut c).await;
    assert_refused(ip(net, 2), s.entry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_is_rejected_and_traffic_keeps_flowing() {
    let net = 34;
    let s = setup(net, "").await;
    let mut c = open(&s, net).await;
    for bad in [
        "node: [unclosed\n".to_string(),
        format!("{}unknown_top_level: 1\n", s.b_base),
        // A policy list that is not a list: the whole file is refused, not the policies.
        format!("{}policies: 7\n", s.b_base),
    ] {
        let rejected = s.b.stats.reloads_rejected.load(Ordering::Acquire);
        rewrite(&s.b_path, &bad);
        wait_until("the rejection", CLOSE_WITHIN, || {
            s.b.stats.reloads_rejected.load(Ordering::Acquire) > rejected
        })
        .await;
        round_trip(&mut c, b"open connection unaffected").await;
        let mut fresh = open(&s, net).await;
        round_trip(&mut fresh, b"new connection served").await;
    }
    // The watcher survived the bad files: a good one still applies.
    let deny = policy("deny-client", "namespace", "deny", &[CLIENT_PRINCIPAL]);
    change_policies(&s, &format!("policies:\n{deny}")).await;
    assert_cut(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_policy_fails_closed_over_its_scope() {
    let net = 35;
    let s = setup(net, "").await;
    let mut c = open(&s, net).await;
    // A DENY whose CIDR is invalid must deny (its whole scope), never be skipped.
    let broken = "policies:\n  - name: typo\n    namespace: default\n    action: deny\n    rules:\n      - clauses:\n          - matches:\n              - source_ips: [10.0.0.0/33]\n";
    change_policies(&s, broken).await;
    assert_cut(&mut c).await;
    assert_refused(ip(net, 2), s.entry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_connect_gets_401_and_the_app_sees_nothing() {
    let net = 36;
    let deny = policy("deny-client", "namespace", "deny", &[CLIENT_PRINCIPAL]);
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let text = node_yaml(
        net,
        "node-b",
        3,
        &mesh.ca_dir,
        &format!("{w}policies:\n{deny}"),
    );
    let (b, _) = mesh.node_from_file("node-b", &text).await;
    let app = TcpListener::bind(SocketAddr::new(ip(net, 3), 8080))
        .await
        .unwrap();
    let hbone_addr = SocketAddr::new(ip(net, 3), 15008);
    let authority = format!("{}:8080", ip(net, 3));

    let mut send = hbone(&mesh.ca_dir, &id("client"), &id("server"), hbone_addr)
        .await
        .unwrap();
    let st = status(&mut send, connect_req(&authority)).await.unwrap();
    assert_eq!(st, http::StatusCode::UNAUTHORIZED);
    // Another identity is not named by the DENY: allowed, on a fresh connection.
    let mut other = hbone(&mesh.ca_dir, &id("other"), &id("server"), hbone_addr)
        .await
        .unwrap();
    let st = status(&mut other, connect_req(&authority)).await.unwrap();
    assert_eq!(st, http::StatusCode::OK);
    let _allowed = tokio::time::timeout(Duration::from_secs(5), app.accept())
        .await
        .expect("the allowed client reached the app")
        .unwrap();
    // Exactly one connection reached the app: the allowed one's.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), app.accept())
            .await
            .is_err(),
        "the denied CONNECT never dialed the app"
    );
    assert_eq!(b.stats.policy_denied.load(Ordering::Acquire), 1);
    assert_eq!(b.stats.policy_allowed.load(Ordering::Acquire), 1);
}

/// Reliability #40, tier (b): hostile files written over a running node's config. Each is refused
/// at its line and column within a second of being noticed, the last good config keeps running,
/// and a connection through the node works during and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_and_alias_bomb_files_are_rejected_fast_and_traffic_keeps_flowing() {
    let net = 37;
    let s = setup(net, "").await;
    let mut c = open(&s, net).await;
    let n = 100_000;
    let mut bomb =
        "policies:\n  - l0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n".to_string();
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        bomb.push_str(&format!("    l{i}: &a{i} [{refs}]\n"));
    }
    let base_lines = s.b_base.lines().count();
    for (attack, line) in [
        (
            format!("policies:\n  - x: {}{}\n", "[".repeat(n), "]".repeat(n)),
            base_lines + 2,
        ),
        (
            format!("policies:\n  - x: {}1{}\n", "{a: ".repeat(n), "}".repeat(n)),
            base_lines + 2,
        ),
        (
            format!("policies:\n  -\n{}x\n", "    - ".repeat(n)),
            base_lines + 3,
        ),
        (bomb, base_lines + 2),
    ] {
        let text = format!("{}{attack}", s.b_base);
        let rejected = s.b.stats.reloads_rejected.load(Ordering::Acquire);
        let applied = s.b.stats.reloads_applied.load(Ordering::Acquire);
        let written = std::time::Instant::now();
        rewrite(&s.b_path, &text);
        wait_until("the rejection", CLOSE_WITHIN, || {
            s.b.stats.reloads_rejected.load(Ordering::Acquire) > rejected
        })
        .await;
        // Noticed within one watch interval, refused in well under a second (main: 4-23 s of a
        // pinned core, and never refused for the alias bomb's position).
        let took = written.elapsed();
        assert!(
            took < TEST_WATCH_INTERVAL + Duration::from_secs(1),
            "{took:?}"
        );
        assert_eq!(
            s.b.stats.reloads_applied.load(Ordering::Acquire),
            applied,
            "nothing of the hostile file was applied"
        );
        // The error the log shows names the file, line and column.
        let e = zmesh::config::Config::load(&s.b_path).unwrap_err();
        assert_eq!(e.location().map(|l| l.0), Some(line), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("{}:{line}:", s.b_path.display())),
            "{e}"
        );
        round_trip(&mut c, b"open connection unaffected").await;
        let mut fresh = open(&s, net).await;
        round_trip(&mut fresh, b"new connection served").await;
    }
    // The last good config is still the one running, and the watcher still applies a good file.
    let deny = policy("deny-client", "namespace", "deny", &[CLIENT_PRINCIPAL]);
    change_policies(&s, &format!("policies:\n{deny}")).await;
    assert_cut(&mut c).await;
}

/// Reliability #40: parsing and validating a reloaded file never runs on a data-plane worker.
/// With ONE worker thread carrying both the tunnel and the watcher, a large (valid) file that
/// takes a while to parse must not hold up a connection through the node. On main the watcher
/// parsed inline, and a round trip in flight waited for the whole parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_slow_reload_never_holds_the_data_plane() {
    let net = 38;
    let s = setup(net, "").await;
    let mut c = open(&s, net).await;
    // Policies of a namespace with no workloads here: they change nothing for the client.
    let many: String = (0..20_000)
        .map(|i| {
            format!("  - {{name: p{i}, namespace: elsewhere, action: deny, rules: [{{clauses: [{{matches: [{{principals: [cluster.local/ns/x/sa/s{i}]}}]}}]}}]}}\n")
        })
        .collect();
    let text = format!("{}policies:\n{many}", s.b_base);
    // What the reload costs, measured here on the test's own thread.
    let started = std::time::Instant::now();
    let cfg = zmesh::config::Config::parse(&text, "probe").unwrap();
    assert!(cfg.policy_set().errors().is_empty());
    let cost = started.elapsed();
    assert!(
        cost >= Duration::from_millis(200),
        "the file must take a while to load for this test to mean anything ({cost:?})"
    );
    let applied = s.b.stats.reloads_applied.load(Ordering::Acquire);
    rewrite(&s.b_path, &text);
    let mut worst = Duration::ZERO;
    let mut trips = 0;
    while s.b.stats.reloads_applied.load(Ordering::Acquire) == applied {
        assert!(started.elapsed() < Duration::from_secs(60), "no reload");
        // A stall shows in the round trip or in the timer, whichever the parse holds up.
        let t = std::time::Instant::now();
        round_trip(&mut c, b"during the reload").await;
        tokio::time::sleep(Duration::from_millis(2)).await;
        worst = worst.max(t.elapsed());
        trips += 1;
    }
    eprintln!("reload cost {cost:?}; slowest of {trips} round trips (each + 2 ms sleep) during it: {worst:?}");
    assert!(
        worst < cost / 4,
        "a round trip (and 2 ms sleep) took {worst:?} while a {cost:?} reload ran ({trips} round trips)"
    );
    round_trip(&mut c, b"after the reload").await;
}

/// A ConfigMap mounted as a directory is updated by Kubernetes with an atomic symlink swap
/// (`node.yaml -> ..data/node.yaml`, `..data -> ..<timestamp>`): the watcher sees it and reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_is_reloaded() {
    use std::os::unix::fs::symlink;
    let net = 64;
    let mut mesh = Mesh::new(net);
    let w = client_server_workloads(net, "server", &[]);
    let base = node_yaml(net, "node-b", 3, &mesh.ca_dir, &w);
    let cm = mesh.dir.path().join("configmap");
    let version = |name: &str, text: &str| {
        let d = cm.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("node.yaml"), text).unwrap();
    };
    version("..v1", &base);
    symlink("..v1", cm.join("..data")).unwrap();
    symlink("..data/node.yaml", cm.join("node.yaml")).unwrap();
    let path = cm.join("node.yaml");
    let loaded = zmesh::proxy::reload::stamp(&path);
    let node = Node::new(zmesh::config::Config::load(&path).unwrap()).unwrap();
    mesh.nodes
        .push(zmesh::proxy::start(node.clone()).await.unwrap());
    tokio::spawn(zmesh::proxy::reload::watch(
        node.clone(),
        path,
        loaded,
        TEST_WATCH_INTERVAL,
        Arc::new(tokio::sync::Notify::new()),
    ));
    assert_eq!(node.state().policies.len(), 0);
    // Kubernetes writes the new version beside, points a new link at it, renames it over ..data.
    // Once: the watcher compares against the file as it was read, even if it has not looked yet.
    let deny = policy("deny-client", "namespace", "deny", &[CLIENT_PRINCIPAL]);
    version("..v2", &format!("{base}policies:\n{deny}"));
    symlink("..v2", cm.join("..data_tmp")).unwrap();
    std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).unwrap();
    let end = tokio::time::Instant::now() + CLOSE_WITHIN;
    while node.stats.reloads_applied.load(Ordering::Acquire) == 0 {
        assert!(
            tokio::time::Instant::now() < end,
            "no reload; rejected {}",
            node.stats.reloads_rejected.load(Ordering::Acquire)
        );
        tokio::time::sleep(TEST_WATCH_INTERVAL).await;
    }
    assert_eq!(node.state().policies.len(), 1);
}
