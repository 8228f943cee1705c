//! `zmesh-redirect cni install|uninstall` as a node's installer container runs it: the real
//! binary against a CNI config dir holding a primary conflist (as Calico or containerd write
//! one). The entry goes last in the primary's chain, comes back when the primary rewrites its
//! file (`--watch`), and uninstall leaves the primary's config as it was and removes the binary.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_zmesh-redirect");

fn primary() -> Value {
    json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": true,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]]}},
        {"type": "portmap", "capabilities": {"portMappings": true}}
    ]})
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn types(doc: &Value) -> Vec<String> {
    doc["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect()
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn install_chains_last_watch_restores_and_uninstall_leaves_the_node_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let calico = conf.join("10-calico.conflist");
    std::fs::write(&calico, primary().to_string()).unwrap();
    let entry = json!({"type": "zmesh-redirect", "admin_socket": "/run/x.sock", "exclude_namespaces": ["kube-system"]});
    let entry_file = dir.path().join("plugin.json");
    std::fs::write(&entry_file, entry.to_string()).unwrap();
    let args = |extra: &[&str]| {
        let mut a = vec![
            "cni".to_string(),
            "install".into(),
            "--conf-dir".into(),
            conf.display().to_string(),
            "--bin-dir".into(),
            bin.display().to_string(),
            "--plugin-config".into(),
            entry_file.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    let out = Command::new(BIN).args(args(&[])).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        types(&read(&calico)),
        ["bridge", "portmap", "zmesh-redirect"]
    );
    assert_eq!(read(&calico)["plugins"][2], entry);
    assert_eq!(
        std::fs::read(bin.join("zmesh-redirect")).unwrap(),
        std::fs::read(BIN).unwrap(),
        "the plugin binary is this binary"
    );

    // The primary CNI rewrites its config (an upgrade): the watcher chains the entry again.
    let _watch = Kill(
        Command::new(BIN)
            .args(args(&["--watch", "--no-binary"]))
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&calico, primary().to_string()).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while types(&read(&calico)).last().map(String::as_str) != Some("zmesh-redirect") {
        assert!(Instant::now() < end, "the entry was not put back");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(_watch);

    let out = Command::new(BIN)
        .args(["cni", "uninstall", "--conf-dir"])
        .arg(&conf)
        .arg("--bin-dir")
        .arg(&bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read(&calico), primary(), "the primary's config as it was");
    assert!(!bin.join("zmesh-redirect").exists());
}

#[test]
fn broken_input_is_refused_with_a_clear_error_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("net.d");
    std::fs::create_dir_all(&conf).unwrap();
    let wrong = dir.path().join("plugin.json");
    std::fs::write(&wrong, r#"{"type": "bridge"}"#).unwrap();
    let run = |plugin: &Path| {
        Command::new(BIN)
            .args(["cni", "install", "--no-binary", "--conf-dir"])
            .arg(&conf)
            .arg("--plugin-config")
            .arg(plugin)
            .output()
            .unwrap()
    };
    let out = run(&wrong);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("type must be \"zmesh-redirect\""), "{err}");
    // No primary config yet: an error that says so (the installer is retried).
    std::fs::write(&wrong, r#"{"type": "zmesh-redirect"}"#).unwrap();
    let out = run(&wrong);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no CNI network config"), "{err}");
    assert_eq!(
        std::fs::read_dir(&conf).unwrap().count(),
        0,
        "nothing written"
    );
}
