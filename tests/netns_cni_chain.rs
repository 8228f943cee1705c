//! Tier (c): the CNI chain executed as a container runtime executes it, with Debian's reference
//! plugins (`containernetworking-plugins`: bridge + host-local) as the node's primary network and
//! `zmesh-redirect` chained last into that conflist by `zmesh-redirect cni install`. ADD gives
//! the pod its address from host-local AND captures it; the plugin hands the primary's result on
//! unchanged; CHECK passes; DEL releases both; `cni uninstall` leaves the conflist as it was.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use zmesh_testbed::{is_root, Netns};

/// Where Debian installs the reference plugins.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// Runs every plugin of `conflist` for `command` the way libcni does: in order for ADD and
/// CHECK, in reverse for DEL, each given the list's `cniVersion` and `name` and the previous
/// plugin's result as `prevResult`. Returns each plugin's result, in order (ADD).
fn run_chain(
    node: &Netns,
    path: &str,
    conflist: &Value,
    command: &str,
    pod: &Netns,
    prev: Option<Value>,
) -> Result<Vec<Value>, String> {
    let mut results = Vec::new();
    let mut plugins: Vec<Value> = conflist["plugins"].as_array().unwrap().clone();
    if command == "DEL" {
        plugins.reverse();
    }
    let mut result = prev;
    for p in plugins {
        let ty = p["type"].as_str().unwrap().to_string();
        let mut conf = p.clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        conf["name"] = conflist["name"].clone();
        if let Some(r) = &result {
            conf["prevResult"] = r.clone();
        }
        let exe = path
            .split(':')
            .map(|d| Path::new(d).join(&ty))
            .find(|p| p.exists())
            .ok_or_else(|| format!("plugin {ty} not found in {path}"))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", node.name()])
            .arg(&exe)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("ctr-{}", pod.name()))
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", path)
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=shop;K8S_POD_UID=uid-web;K8S_POD_SERVICE_ACCOUNT=web",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            return Err(format!(
                "{ty} {command}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if command == "ADD" {
            let r: Value = serde_json::from_slice(&out.stdout)
                .map_err(|e| format!("{ty}: result is not JSON: {e}"))?;
            results.push(r.clone());
            result = Some(r);
        }
    }
    Ok(results)
}

/// Runs a command that must succeed, showing its stderr when it does not.
fn ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rules(pod: &Netns) -> String {
    pod.exec(&["iptables-save"]).unwrap_or_default()
}

#[test]
fn the_reference_plugins_then_zmesh_give_the_pod_its_address_and_capture_it() {
    assert!(
        is_root(),
        "tier (c) tests build network namespaces and need root (CI runs as root)"
    );
    assert!(
        Path::new(REFERENCE_PLUGINS).join("bridge").exists(),
        "Debian's containernetworking-plugins are missing (scripts/setup.sh installs them)"
    );
    let node = Netns::new("zcn").unwrap();
    let pod = Netns::new("zcp").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (conf_dir, bin_dir) = (dir.path().join("net.d"), dir.path().join("bin"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(&bin_dir).unwrap();
    let primary = json!({"cniVersion": "1.0.0", "name": "test-net", "plugins": [{
        "type": "bridge", "bridge": "zcni0", "isGateway": true,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.218.0.0/24"}]],
                 "dataDir": dir.path().join("ipam").display().to_string()}
    }]});
    let conflist = conf_dir.join("10-test.conflist");
    std::fs::write(&conflist, primary.to_string()).unwrap();

    // The agent the plugin talks to (no tunnel yet: pods are captured and cached).
    let admin = dir.path().join("admin.sock");
    let zds = dir.path().join("zds.sock");
    let node_bin = Path::new(env!("CARGO_BIN_EXE_zmesh-node"));
    let bin = zmesh_testbed::mesh::redirect_bin(node_bin);
    let _agent = zmesh_testbed::mesh::start_agent(&node, node_bin, &zds, &admin).unwrap();
    let entry = dir.path().join("plugin.json");
    std::fs::write(
        &entry,
        json!({"type": "zmesh-redirect", "admin_socket": admin.display().to_string()}).to_string(),
    )
    .unwrap();
    ok(Command::new(&bin)
        .args(["cni", "install", "--conf-dir"])
        .arg(&conf_dir)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--plugin-config")
        .arg(&entry));
    let chained: Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(chained["plugins"][1]["type"], "zmesh-redirect");

    let path = format!("{REFERENCE_PLUGINS}:{}", bin_dir.display());
    // ADD through the whole chain.
    let results = run_chain(&node, &path, &chained, "ADD", &pod, None).unwrap();
    let result = results.last().cloned().expect("a result");
    // zmesh hands the primary's result on unchanged: the runtime sees what bridge said.
    assert_eq!(results[1], results[0], "zmesh changed the result");
    let ip = result["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(
        ip.starts_with("10.218.0."),
        "host-local's address: {result}"
    );
    let addr = pod.ip(&["-4", "addr", "show", "eth0"]).unwrap();
    assert!(addr.contains(ip.split('/').next().unwrap()), "{addr}");
    assert!(
        rules(&pod).contains("ISTIO_OUTPUT"),
        "the pod is captured:\n{}",
        rules(&pod)
    );
    run_chain(&node, &path, &chained, "CHECK", &pod, Some(result.clone())).unwrap();

    // DEL in reverse: the capture goes, then the address.
    run_chain(&node, &path, &chained, "DEL", &pod, Some(result)).unwrap();
    assert!(
        !rules(&pod).contains("ISTIO_OUTPUT"),
        "capture removed:\n{}",
        rules(&pod)
    );
    let leases = dir.path().join("ipam/test-net");
    let held: Vec<_> = std::fs::read_dir(&leases)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        held.iter()
            .all(|n| !n.to_string_lossy().starts_with("10.218.")),
        "host-local still holds an address: {held:?}"
    );

    // Uninstall leaves the node's config as it was.
    ok(Command::new(&bin)
        .args(["cni", "uninstall", "--conf-dir"])
        .arg(&conf_dir)
        .arg("--bin-dir")
        .arg(&bin_dir));
    let after: Value = serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(after, primary);
}
