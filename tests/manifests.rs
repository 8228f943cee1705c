//! The Kubernetes manifests in daemonset/, rendered with `kubectl kustomize` for every overlay:
//! the security-relevant fields are what they must be (schema validity is checked by
//! scripts/validate-manifests.sh in CI). The ECS example (host/) is checked the same way, and its
//! health check is run under dash as ECS would run it.

use serde_yaml::Value;

fn render(overlay: &str) -> Vec<Value> {
    render_dir(&format!(
        concat!(env!("CARGO_MANIFEST_DIR"), "/daemonset/overlays/{}"),
        overlay
    ))
}

/// `kubectl kustomize DIR`, one value per object.
fn render_dir(dir: &str) -> Vec<Value> {
    let out = std::process::Command::new("kubectl")
        .args(["kustomize", dir])
        .output()
        .expect("kubectl is installed (scripts/setup.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

use serde::Deserialize;

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} missing"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn node_daemonset_security_fields_in_every_overlay() {
    for overlay in ["dev", "production", "istio-cni"] {
        let objs = render(overlay);
        let ds = find(&objs, "DaemonSet", "zmesh-node");
        let spec = &ds["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        let caps = &c["securityContext"]["capabilities"];
        assert_eq!(
            strings(&caps["add"]),
            ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"],
            "{overlay}"
        );
        assert_eq!(strings(&caps["drop"]), ["ALL"], "{overlay}");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        // Kubernetes refuses allowPrivilegeEscalation: false beside CAP_SYS_ADMIN.
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], true);
        // No memory limit on the node tunnel: an OOM kill drops the node's traffic.
        assert!(c["resources"].get("limits").is_none(), "{overlay}");
        // The config is a directory mount (Kubernetes updates it; a subPath is never updated).
        let cfg_mount = c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "config")
            .unwrap();
        assert!(cfg_mount.get("subPath").is_none(), "{overlay}");
        assert_eq!(c["args"][2], "/etc/zmesh/node.yaml");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15021);
        let ru = &ds["spec"]["updateStrategy"]["rollingUpdate"];
        assert_eq!(
            (ru["maxSurge"].as_u64(), ru["maxUnavailable"].as_u64()),
            (Some(1), Some(0))
        );
        assert!(
            spec.get("hostNetwork").is_none() || spec["hostNetwork"] == false,
            "{overlay}: no hostNetwork"
        );
        assert_eq!(spec["priorityClassName"], "system-node-critical");
        assert_eq!(spec["terminationGracePeriodSeconds"], 30);
        let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/port"], "15020");
        let zds = spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "zds")
            .expect("the ZDS socket volume");
        assert_eq!(zds["hostPath"]["path"], "/var/run/ztunnel");
        // Nothing else from the host: the socket directory is the only hostPath.
        let host_paths = spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|v| v.get("hostPath").is_some())
            .count();
        assert_eq!(host_paths, 1, "{overlay}");
        // The waypoint runs without any capability, as non-root.
        let wp = find(&objs, "Deployment", "zmesh-waypoint");
        let wc = &wp["spec"]["template"]["spec"]["containers"][0]["securityContext"];
        assert_eq!(strings(&wc["capabilities"]["drop"]), ["ALL"]);
        assert!(wc["capabilities"].get("add").is_none());
        assert_eq!(wc["runAsNonRoot"], true);
        for kind in ["PodDisruptionBudget", "HorizontalPodAutoscaler", "Service"] {
            find(&objs, kind, "zmesh-waypoint");
        }
        for (kind, name) in [
            ("DaemonSet", "zmesh-node"),
            ("DaemonSet", "zmesh-redirect"),
            ("Deployment", "zmesh-waypoint"),
        ] {
            if overlay == "istio-cni" && name == "zmesh-redirect" {
                continue; // istio-cni captures there (its own test below)
            }
            let spec = &find(&objs, kind, name)["spec"]["template"]["spec"];
            assert_eq!(spec["nodeSelector"]["kubernetes.io/os"], "linux", "{name}");
            for c in spec["containers"].as_sequence().unwrap() {
                let sc = &c["securityContext"];
                let sys_admin = strings(&sc["capabilities"]["add"]).contains(&"SYS_ADMIN");
                assert_eq!(
                    sc["allowPrivilegeEscalation"],
                    sys_admin,
                    "{name}/{}",
                    c["name"].as_str().unwrap()
                );
            }
        }
        // The system-node-critical pods are admitted outside kube-system.
        let quota = find(&objs, "ResourceQuota", "zmesh-node-critical");
        let expr = &quota["spec"]["scopeSelector"]["matchExpressions"][0];
        assert_eq!(expr["scopeName"], "PriorityClass");
        assert_eq!(strings(&expr["values"]), ["system-node-critical"]);
    }
}

/// The install is a drop-in for ztunnel under istiod: ztunnel's environment names, the projected
/// istio-ca token and the mesh root mounted where the config reads them, and no CA key in any
/// pod (no Secret volume at all).
#[test]
fn node_and_waypoint_join_istiod_and_hold_no_ca_key() {
    for overlay in ["dev", "production", "istio-cni"] {
        let objs = render(overlay);
        for (kind, name) in [
            ("DaemonSet", "zmesh-node"),
            ("Deployment", "zmesh-waypoint"),
        ] {
            let spec = &find(&objs, kind, name)["spec"]["template"]["spec"];
            let volumes = spec["volumes"].as_sequence().unwrap();
            assert!(
                volumes.iter().all(|v| v.get("secret").is_none()),
                "{overlay} {name}: a Secret volume (a CA key?) is mounted"
            );
            let token = volumes
                .iter()
                .find(|v| v["name"] == "istio-token")
                .expect("the istio-token volume");
            let src = &token["projected"]["sources"][0]["serviceAccountToken"];
            assert_eq!(src["audience"], "istio-ca", "{overlay} {name}");
            assert_eq!(src["path"], "istio-token");
            let root = volumes
                .iter()
                .find(|v| v["name"] == "istiod-ca-cert")
                .expect("the mesh root volume");
            assert_eq!(root["configMap"]["name"], "istio-ca-root-cert");
            let mounts = spec["containers"][0]["volumeMounts"].as_sequence().unwrap();
            let mounted_at = |v: &str| {
                mounts
                    .iter()
                    .find(|m| m["name"] == v)
                    .and_then(|m| m["mountPath"].as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            assert_eq!(mounted_at("istio-token"), "/var/run/secrets/tokens");
            assert_eq!(mounted_at("istiod-ca-cert"), "/var/run/secrets/istio");
        }
        let node =
            &find(&objs, "DaemonSet", "zmesh-node")["spec"]["template"]["spec"]["containers"][0];
        let env: Vec<&str> = node["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        for name in [
            "NODE_NAME",
            "POD_NAME",
            "POD_NAMESPACE",
            "INSTANCE_IP",
            "XDS_ADDRESS",
            "CA_ADDRESS",
            "CLUSTER_ID",
        ] {
            assert!(env.contains(&name), "{overlay}: env {name} missing");
        }
    }
}

/// The CNI plugin is chained into the node's primary conflist (never a config of its own that
/// would become the node's default network), and kept there by a watcher.
#[test]
fn the_cni_plugin_is_chained_not_installed_as_its_own_network() {
    for overlay in ["dev", "production"] {
        let objs = render(overlay);
        let spec = &find(&objs, "DaemonSet", "zmesh-redirect")["spec"]["template"]["spec"];
        fn args(c: &Value) -> Vec<&str> {
            strings(&c["args"])
        }
        let init = &spec["initContainers"][0];
        assert_eq!(args(init)[..2], ["cni", "install"], "{overlay}");
        let watch = spec["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "cni-watch")
            .expect("a cni-watch container");
        assert!(args(watch).contains(&"--watch"), "{overlay}");
        // The agent is probed on its health port (ebpf-free-redirect/src/health.rs).
        let agent = spec["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "agent")
            .expect("an agent container");
        assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(agent[probe]["httpGet"]["port"], 8000, "{overlay} {probe}");
        }
        let a = args(agent);
        let flag = |f: &str| a[a.iter().position(|x| *x == f).unwrap() + 1];
        assert_eq!(flag("--health-addr"), "0.0.0.0:8000");
        assert_eq!(flag("--metrics-addr"), "0.0.0.0:15014");
        let text = serde_yaml::to_string(spec).unwrap();
        assert!(
            !text.contains("05-zmesh"),
            "{overlay}: a one-plugin conflist of its own"
        );
        // The agent enrolls by label: it knows its node, and sees the host's pids to find the
        // netns of a pod that becomes meshed while running.
        let agent = spec["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "agent")
            .expect("an agent container");
        assert!(
            args(agent).contains(&"labels"),
            "{overlay}: {:?}",
            args(agent)
        );
        let node_name = agent["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "NODE_NAME")
            .expect("NODE_NAME in the agent's env");
        assert_eq!(
            node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
            "{overlay}"
        );
        assert_eq!(spec["hostPID"], true, "{overlay}");
        let entry = find(&objs, "ConfigMap", "zmesh-cni")["data"]["plugin.json"]
            .as_str()
            .unwrap();
        let entry: serde_json::Value = serde_json::from_str(entry).unwrap();
        assert_eq!(entry["type"], "zmesh-redirect");
    }
}

/// Beside Istio's own CNI agent, zmesh-node serves the ZDS socket istio-cni dials (ztunnel's
/// path, on the host), and zmesh's own capture is left out so two agents never race for a pod.
#[test]
fn the_istio_cni_overlay_keeps_the_node_on_ztunnels_zds_path_without_a_second_agent() {
    let objs = render("istio-cni");
    assert!(
        !objs
            .iter()
            .any(|o| o["kind"] == "DaemonSet" && o["metadata"]["name"] == "zmesh-redirect"),
        "zmesh-redirect must not run beside istio-cni"
    );
    assert!(!objs.iter().any(|o| o["metadata"]["name"] == "zmesh-cni"));
    let spec = &find(&objs, "DaemonSet", "zmesh-node")["spec"]["template"]["spec"];
    let zds = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "zds")
        .expect("a zds volume");
    assert_eq!(zds["hostPath"]["path"], "/var/run/ztunnel");
    let cfg = find(&objs, "ConfigMap", "zmesh-node")["data"]["node.yaml"]
        .as_str()
        .unwrap();
    assert!(
        cfg.contains("zds_socket: /var/run/ztunnel/ztunnel.sock"),
        "{cfg}"
    );
}

/// The uninstall kustomization takes the chain entry and the binary out of the host's CNI dirs
/// (the same paths the install mounted) and holds nothing once done.
#[test]
fn the_uninstall_daemonset_removes_the_chain_entry_and_binary_from_the_install_paths() {
    let objs = render_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/daemonset/uninstall"));
    let spec = &find(&objs, "DaemonSet", "zmesh-uninstall")["spec"]["template"]["spec"];
    let init = &spec["initContainers"][0];
    let args = strings(&init["args"]);
    assert_eq!(args[..2], ["cni", "uninstall"]);
    let install = render("production");
    let redirect = &find(&install, "DaemonSet", "zmesh-redirect")["spec"]["template"]["spec"];
    // The uninstall sees the host's CNI dirs where the install wrote them.
    for (flag, volume) in [("--conf-dir", "cni-conf"), ("--bin-dir", "cni-bin")] {
        let at = args
            .iter()
            .position(|a| *a == flag)
            .unwrap_or_else(|| panic!("{flag}"));
        let mount = init["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == args[at + 1])
            .unwrap_or_else(|| panic!("{flag} {} is not a mount", args[at + 1]));
        let host = |spec: &Value, name: &Value| {
            spec["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| &v["name"] == name)
                .map(|v| v["hostPath"]["path"].clone())
                .unwrap()
        };
        assert_eq!(mount["name"], volume);
        assert_eq!(
            host(spec, &mount["name"]),
            host(redirect, &mount["name"]),
            "{flag}"
        );
    }
    assert_eq!(init["securityContext"]["allowPrivilegeEscalation"], false);
    // Its own namespace, so deleting the install's (zmesh-system) does not take it along.
    find(&objs, "Namespace", "zmesh-uninstall");
    assert_eq!(
        find(&objs, "DaemonSet", "zmesh-uninstall")["metadata"]["namespace"],
        "zmesh-uninstall"
    );
}

#[test]
fn shipped_configmaps_are_valid_configs_once_the_downward_api_fills_them() {
    let objs = render("production");
    let env = |k: &str| match k {
        "NODE_NAME" => Some("worker-1".to_string()),
        "POD_IP" => Some("10.244.1.7".to_string()),
        _ => None,
    };
    for (cm, key) in [
        ("zmesh-node", "node.yaml"),
        ("zmesh-waypoint", "waypoint.yaml"),
    ] {
        let text = find(&objs, "ConfigMap", cm)["data"][key]
            .as_str()
            .unwrap()
            .to_string();
        let text = zmesh::config::expand_env(&text, env).unwrap();
        let cfg = zmesh::config::Config::parse(&text, cm).unwrap_or_else(|e| panic!("{cm}: {e}"));
        if cm == "zmesh-node" {
            assert_eq!(&*cfg.node.name, "worker-1");
            let cp = cfg.node.control_plane.as_ref().expect("fed by istiod");
            assert_eq!(cp.target.address, "https://istiod.istio-system.svc:15012");
            assert!(cfg.workloads.is_empty());
            assert!(matches!(
                cfg.node.certificates,
                zmesh::config::CertificatesConfig::CaClient {
                    impersonate: true,
                    ..
                }
            ));
        } else {
            assert!(matches!(
                cfg.node.certificates,
                zmesh::config::CertificatesConfig::CaClient {
                    impersonate: false,
                    ..
                }
            ));
            assert_eq!(cfg.waypoint.unwrap().workload, "waypoint");
            assert_eq!(cfg.node.bind.to_string(), "10.244.1.7");
        }
    }
}

#[test]
fn the_grafana_dashboard_only_queries_metrics_zmesh_exports() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/daemonset/grafana-dashboard.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // Every family the node (:15020) and the waypoint export.
    let exported = [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_connections_failed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sockets_open",
        "zmesh_policy_decisions_total",
        "zmesh_policy_closed_connections_total",
        "zmesh_certificate_expiry_seconds",
        "zmesh_active_connections",
        "zmesh_hbone_pool_connections",
        "zmesh_config_reloads_total",
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_bytes_sum",
        "istio_response_bytes_sum",
    ];
    let mut used = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("istio_") || w.starts_with("zmesh_"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                assert!(
                    exported.contains(&n),
                    "the dashboard queries {n}, which nothing exports"
                );
                used += 1;
            }
        }
    }
    assert!(used >= 10, "the dashboard covers the main metrics");
}

#[test]
fn the_ecs_example_runs_the_tunnel_as_a_sidecar_with_two_capabilities() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/host/ecs-task-definition.json");
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(task["networkMode"], "awsvpc");
    let containers = task["containerDefinitions"].as_array().unwrap();
    let node = containers
        .iter()
        .find(|c| c["name"] == "zmesh-node")
        .unwrap();
    let caps = &node["linuxParameters"]["capabilities"];
    assert_eq!(caps["add"], serde_json::json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
    assert_eq!(node["readonlyRootFilesystem"], true);
    let app = containers.iter().find(|c| c["name"] == "orders").unwrap();
    let deps: Vec<_> = app["dependsOn"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["containerName"].as_str().unwrap())
        .collect();
    assert_eq!(
        deps,
        ["zmesh-capture", "zmesh-node"],
        "the app starts after capture and a ready tunnel"
    );
}

/// The ECS example's health check, run exactly as ECS runs `CMD-SHELL` in the debian-slim image
/// (`/bin/sh -c`, and Debian's /bin/sh is dash), in scratch namespaces whose 127.0.0.1:15021 is
/// in turn: a ready zmesh-node (exit 0), a not-ready one (an in-pod node with no ZDS snapshot
/// yet answers 500), a port nobody listens on, and a listener that never answers. Only the first
/// passes, and none takes longer than ECS's 3 s health-check timeout.
#[test]
fn the_ecs_health_check_passes_under_dash_only_when_the_tunnel_is_ready() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    use zmesh_testbed::{require_root, Netns};

    require_root();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/host/ecs-task-definition.json");
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let node_def = task["containerDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "zmesh-node")
        .unwrap();
    let command = node_def["healthCheck"]["command"].as_array().unwrap();
    assert_eq!(command.len(), 2, "{command:?}");
    assert_eq!(command[0], "CMD-SHELL");
    let script = command[1].as_str().unwrap().to_string();
    let ecs_timeout = Duration::from_secs(node_def["healthCheck"]["timeout"].as_u64().unwrap());
    let check = |ns: &Netns| {
        let start = Instant::now();
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), "dash", "-c", &script])
            .output()
            .expect("dash is installed (scripts/setup.sh)");
        let took = start.elapsed();
        assert!(took < ecs_timeout, "the check took {took:?}");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let get_ready = |ns: &Netns| {
        let mut s = ns.connect_tcp("127.0.0.1:15021").unwrap();
        s.write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    zmesh::identity::FileCa::init(&ca, "cluster.local").unwrap();
    let node_bin = env!("CARGO_BIN_EXE_zmesh-node");
    let start_node = |ns: &Netns, name: &str, node_settings: &str| {
        let cfg = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "node:\n  name: {name}\n{node_settings}  certificates:\n    file_ca: {{ dir: {} }}\n",
                ca.display()
            ),
        )
        .unwrap();
        let child = ns
            .spawn(node_bin, &["run", "--config", cfg.to_str().unwrap()], &[])
            .unwrap();
        ns.wait_for_tcp("127.0.0.1:15021", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", child.read_log()));
        child
    };

    let ready = Netns::new("zecs").unwrap();
    let ready_node = start_node(&ready, "ecs-ready", "");
    ready_node
        .wait_for_log("zmesh node ready", Duration::from_secs(30))
        .unwrap();
    let answer = get_ready(&ready);
    assert!(answer.contains(" 200 "), "{answer}");
    let (code, err) = check(&ready);
    assert_eq!(code, Some(0), "a ready tunnel passes: {err}");

    let pending = Netns::new("zecs").unwrap();
    let zds = dir.path().join("nobody-serves-this.sock");
    let _pending_node = start_node(
        &pending,
        "ecs-pending",
        &format!("  mode: in_pod\n  zds_socket: {}\n", zds.display()),
    );
    let answer = get_ready(&pending);
    assert!(answer.contains(" 500 "), "{answer}");
    let (code, err) = check(&pending);
    assert_ne!(code, Some(0), "a tunnel that answers 500 fails: {err}");

    let closed = Netns::new("zecs").unwrap();
    let (code, err) = check(&closed);
    assert_ne!(code, Some(0), "nothing on :15021 fails: {err}");

    // Accepts (the kernel completes the handshake) but never answers.
    let silent = Netns::new("zecs").unwrap();
    let _held = silent.listen_tcp("127.0.0.1:15021").unwrap();
    let (code, err) = check(&silent);
    assert_ne!(code, Some(0), "a tunnel that never answers fails: {err}");
}
