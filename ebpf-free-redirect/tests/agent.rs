//! The node agent end to end: the real binary with its real sockets, a fake node tunnel (the
//! crate's own `ZdsClient`) and a real pod netns. `pod add` must install the in-pod rules inside
//! that netns and hand the very same netns to the tunnel, replying only after the tunnel's ack;
//! a tunnel's rejection must reach the operator verbatim; `pod del` must reach the tunnel and
//! remove the rules. Needs root (netns, iptables); without it the tests that need it fail saying so.

mod support;

use support::{require_root, run_bin, text, Agent, FakeTunnel, Ns, Seen};

fn pod_add(agent: &Agent, ns: &Ns, uid: &str) -> std::process::Output {
    let admin = agent.admin.to_str().unwrap().to_owned();
    let netns = ns.path().to_str().unwrap().to_owned();
    run_bin(
        &[
            "pod",
            "add",
            "--netns",
            &netns,
            "--uid",
            uid,
            "--name",
            "web-0",
            "--namespace",
            "shop",
            "--service-account",
            "web",
            "--admin-socket",
            &admin,
        ],
        &[],
        "",
    )
}

fn pod_del(agent: &Agent, uid: &str) -> std::process::Output {
    let admin = agent.admin.to_str().unwrap().to_owned();
    run_bin(
        &["pod", "del", "--uid", uid, "--admin-socket", &admin],
        &[],
        "",
    )
}

fn has_outbound_redirect(rules: &str) -> bool {
    rules
        .lines()
        .any(|l| l.starts_with("-A ISTIO_OUTPUT") && l.contains("REDIRECT --to-ports 15001"))
}

#[test]
fn pod_add_captures_and_hands_off_then_del_undoes_it() {
    require_root();
    let mut agent = Agent::start("add");
    let tunnel = FakeTunnel::connect(&agent.zds, None);
    assert_eq!(
        tunnel.next(),
        Seen::SnapshotSent,
        "empty agent: empty snapshot"
    );
    agent.wait_for_tunnels(1);
    let ns = Ns::create("pod");

    let out = pod_add(&agent, &ns, "uid-web-0");
    assert!(
        out.status.success(),
        "pod add failed: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains(r#""tunnel":"acked""#),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        tunnel.next(),
        Seen::Add {
            uid: "uid-web-0".into(),
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            netns: ns.id(),
        },
        "the tunnel must get the pod's own netns"
    );
    // The reply came after the ack, and the rules were in place before the hand-off.
    assert!(
        has_outbound_redirect(&ns.iptables_save()),
        "no ISTIO_OUTPUT REDIRECT 15001 in the pod netns:\n{}",
        ns.iptables_save()
    );
    assert_eq!(agent.list(), vec!["uid-web-0".to_owned()]);

    let out = pod_del(&agent, "uid-web-0");
    assert!(
        out.status.success(),
        "pod del failed: {}",
        text(&out.stderr)
    );
    assert_eq!(tunnel.next(), Seen::Del("uid-web-0".into()));
    assert!(
        !ns.iptables_save().contains("ISTIO_OUTPUT"),
        "the netns still exists, so del must remove the rules"
    );
    assert!(agent.list().is_empty());

    assert!(
        agent.stop().success(),
        "SIGTERM must stop the agent cleanly"
    );
    assert!(
        !agent.admin.exists(),
        "a clean stop removes the admin socket"
    );
}

#[test]
fn tunnel_rejection_fails_pod_add_with_its_error() {
    require_root();
    let agent = Agent::start("reject");
    let tunnel = FakeTunnel::connect(&agent.zds, Some("cannot bind 15001 in pod"));
    assert_eq!(tunnel.next(), Seen::SnapshotSent);
    agent.wait_for_tunnels(1);
    let ns = Ns::create("rej");

    let out = pod_add(&agent, &ns, "uid-rejected");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    for needle in [
        "cannot bind 15001 in pod",
        "uid-rejected",
        ns.path().to_str().unwrap(),
    ] {
        assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    }
    assert!(matches!(tunnel.next(), Seen::Add { uid, .. } if uid == "uid-rejected"));
}

#[test]
fn pod_without_tunnel_is_pending_then_replayed() {
    require_root();
    let agent = Agent::start("pending");
    let ns = Ns::create("pend");

    let out = pod_add(&agent, &ns, "uid-early");
    assert!(
        out.status.success(),
        "pod add failed: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains(r#""tunnel":"pending""#),
        "{}",
        text(&out.stdout)
    );
    assert!(
        has_outbound_redirect(&ns.iptables_save()),
        "a pending pod is still captured"
    );

    let tunnel = FakeTunnel::connect(&agent.zds, None);
    assert!(
        matches!(tunnel.next(), Seen::Add { uid, netns, .. } if uid == "uid-early" && netns == ns.id()),
        "the snapshot replays the cached pod"
    );
    assert_eq!(tunnel.next(), Seen::SnapshotSent);
}

#[test]
fn bad_netns_path_is_named_in_the_error() {
    let agent = Agent::start("badns");
    let admin = agent.admin.to_str().unwrap().to_owned();
    let out = run_bin(
        &[
            "pod",
            "add",
            "--netns",
            "/var/run/netns/does-not-exist-zmesh",
            "--uid",
            "uid-x",
            "--name",
            "x",
            "--namespace",
            "ns",
            "--service-account",
            "sa",
            "--admin-socket",
            &admin,
        ],
        &[],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("/var/run/netns/does-not-exist-zmesh") && stderr.contains("uid-x"),
        "{stderr}"
    );
    assert!(agent.list().is_empty(), "a failed add enrolls nothing");
}

#[test]
fn pod_command_without_agent_fails_with_the_socket_path() {
    let dir = support::TempDir::new("noagent");
    let admin = dir.join("redirect.sock");
    let out = run_bin(
        &[
            "pod",
            "del",
            "--uid",
            "u",
            "--admin-socket",
            admin.to_str().unwrap(),
        ],
        &[],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(admin.to_str().unwrap()));
}
