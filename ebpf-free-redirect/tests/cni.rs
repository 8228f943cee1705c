//! The CNI plugin mode of the binary, driven as a container runtime drives it: CNI_* variables in
//! the environment and the network config on stdin. Version negotiation, validation and the
//! namespace exclusion need nothing else; the happy path runs against the real agent, a fake
//! tunnel and a real pod netns (root only; without root that test prints why and passes).

mod support;

use serde_json::{json, Value};
use support::{require_root, run_bin, text, Agent, FakeTunnel, Ns, Seen, TempDir};

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/var/run/netns/x"}],
        "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]}
    })
}

fn conf(admin: &str, prev: Option<Value>) -> String {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "zmesh-redirect",
        "admin_socket": admin,
    });
    if let Some(prev) = prev {
        conf["prevResult"] = prev;
    }
    conf.to_string()
}

fn json_out(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", text(&out.stdout)))
}

#[test]
fn version_lists_supported_versions() {
    let out = run_bin(&[], &[("CNI_COMMAND", "VERSION")], "");
    assert!(out.status.success());
    assert_eq!(
        json_out(&out),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
    );
}

#[test]
fn add_without_netns_is_a_cni_error() {
    let out = run_bin(
        &[],
        &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1")],
        &conf("/nonexistent/redirect.sock", None),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = json_out(&out);
    // CNI spec: 4 = invalid necessary environment variables.
    assert_eq!(err["code"], 4);
    assert_eq!(err["cniVersion"], "1.0.0");
    assert!(err["msg"].as_str().unwrap().contains("CNI_NETNS"), "{err}");
}

#[test]
fn excluded_namespace_passes_through_without_the_agent() {
    // The admin socket does not exist: contacting the agent would fail the ADD.
    let dir = TempDir::new("cni-excl");
    let admin = dir.join("redirect.sock");
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/whatever"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns",
        ),
    ];
    let out = run_bin(
        &[],
        &env,
        &conf(admin.to_str().unwrap(), Some(prev_result())),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json_out(&out), prev_result());

    // Not excluded: the missing agent fails the ADD, so the pod never starts uncaptured.
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/whatever"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"),
    ];
    let out = run_bin(
        &[],
        &env,
        &conf(admin.to_str().unwrap(), Some(prev_result())),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = json_out(&out);
    assert_eq!(err["code"], 999);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains(admin.to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn del_succeeds_when_the_agent_is_down() {
    let dir = TempDir::new("cni-del");
    let admin = dir.join("redirect.sock");
    let env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_UID=u1"),
    ];
    let out = run_bin(&[], &env, &conf(admin.to_str().unwrap(), None));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "DEL prints nothing");
}

#[test]
fn add_check_del_against_the_agent() {
    require_root();
    let agent = Agent::start("cni");
    let tunnel = FakeTunnel::connect(&agent.zds, None);
    assert_eq!(tunnel.next(), Seen::SnapshotSent);
    agent.wait_for_tunnels(1);
    let ns = Ns::create("cni");
    let netns = ns.path().to_str().unwrap().to_owned();
    let admin = agent.admin.to_str().unwrap().to_owned();
    let env = |command| {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "0123abcd"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=5f1c-uid",
            ),
        ]
    };
    let config = conf(&admin, Some(prev_result()));

    let out = run_bin(&[], &env("ADD"), &config);
    assert!(
        out.status.success(),
        "ADD failed: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        json_out(&out),
        prev_result(),
        "prevResult must pass through unchanged"
    );
    assert_eq!(
        tunnel.next(),
        Seen::Add {
            uid: "5f1c-uid".into(),
            name: "web-0".into(),
            namespace: "shop".into(),
            service_account: "default".into(),
            netns: ns.id(),
        }
    );
    assert!(ns.iptables_save().contains("ISTIO_OUTPUT"));

    let out = run_bin(&[], &env("CHECK"), &config);
    assert!(out.status.success(), "CHECK failed: {}", text(&out.stdout));

    let out = run_bin(&[], &env("DEL"), &config);
    assert!(out.status.success());
    assert_eq!(tunnel.next(), Seen::Del("5f1c-uid".into()));

    let out = run_bin(&[], &env("CHECK"), &config);
    assert_eq!(
        out.status.code(),
        Some(1),
        "CHECK of a deleted pod must fail"
    );
}
