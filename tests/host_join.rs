//! Tier (c): host packaging. `zmesh-node join` writes a config that loads and a systemd unit that
//! passes `systemd-analyze verify`; the unit's ExecStartPre installs the capture rules and
//! `zmesh-node leave` removes them and every file join wrote, in a scratch namespace.

use std::path::{Path, PathBuf};

use zmesh_testbed::{is_root, Netns};

const NODE: &str = env!("CARGO_BIN_EXE_zmesh-node");

fn redirect_bin() -> PathBuf {
    // Built by the workspace build (scripts/test.sh) next to zmesh-node.
    let p = Path::new(NODE).with_file_name("zmesh-redirect");
    assert!(
        p.exists(),
        "{} is built by `cargo build --workspace`",
        p.display()
    );
    p
}

fn rules(ns: &Netns) -> String {
    let v4 = ns.exec(&["iptables-save"]).unwrap();
    let nft = ns.exec(&["nft", "list", "ruleset"]).unwrap_or_default();
    format!("{v4}{nft}")
}

#[test]
fn join_then_leave_leaves_no_rules_and_no_files_behind() {
    assert!(
        is_root(),
        "tier (c) tests build network namespaces and need root"
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let out = std::process::Command::new(NODE)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(out.status.success());
    let (etc, units) = (dir.path().join("etc"), dir.path().join("units"));
    let redirect = redirect_bin();
    let ns = Netns::new("zjn").unwrap();
    let before = rules(&ns);
    assert!(!before.contains("ZMESH"), "{before}");

    let join = ns
        .exec(&[
            NODE,
            "join",
            "--identity",
            "shop/db",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--address",
            "10.219.0.5",
            "--name",
            "vm-test",
            "--inbound-ports",
            "5432",
            "--config-dir",
            etc.to_str().unwrap(),
            "--unit-dir",
            units.to_str().unwrap(),
            "--redirect-bin",
            redirect.to_str().unwrap(),
            "--no-systemctl",
        ])
        .unwrap();
    assert!(join.contains("node.yaml"), "{join}");
    let unit = units.join("zmesh-node.service");
    let check = std::process::Command::new(NODE)
        .arg("check-config")
        .arg(etc.join("node.yaml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze is installed (scripts/setup.sh)");
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // What systemd would run before starting the tunnel: the capture rules go in.
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    let pre = unit_text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre="))
        .unwrap();
    let args: Vec<&str> = pre.split_whitespace().collect();
    ns.exec(&args).unwrap();
    assert!(
        rules(&ns).contains("ZMESH"),
        "ExecStartPre installed the capture rules"
    );

    let leave = ns
        .exec(&[
            NODE,
            "leave",
            "--config-dir",
            etc.to_str().unwrap(),
            "--redirect-bin",
            redirect.to_str().unwrap(),
            "--no-systemctl",
        ])
        .unwrap();
    assert!(leave.contains("zmesh-node.service"), "{leave}");
    let after = rules(&ns);
    assert!(!after.contains("ZMESH"), "rules left behind: {after}");
    assert!(!unit.exists() && !etc.exists(), "files left behind");
}
