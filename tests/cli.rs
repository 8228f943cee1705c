//! The zmesh-node command line: check-config exit codes and messages, and `ca init`.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_zmesh-node");

#[test]
fn check_config_accepts_every_shipped_example() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(BIN)
                .arg("check-config")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn check_config_refuses_unknown_field_with_exit_64_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "node:\n  name: n\n  certificates:\n    file_ca: { dir: /tmp/x }\n  listen_everywhere: true\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:5:3", path.display())), "{err}");
    assert!(err.contains("unknown field `listen_everywhere`"), "{err}");
}

#[test]
fn ca_init_writes_a_ca_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let run = || {
        Command::new(BIN)
            .args(["ca", "init", "--dir"])
            .arg(&ca)
            .args(["--trust-domain", "example.org"])
            .output()
            .unwrap()
    };
    assert!(run().status.success());
    for f in ["ca-cert.pem", "ca-key.pem", "root-cert.pem"] {
        assert!(ca.join(f).exists(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ca.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "CA key must not be readable by others");
    let again = run();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn check_config_reports_a_broken_policy_by_name_and_field_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(
        &path,
        "node:\n  name: n\n  certificates:\n    file_ca: { dir: /tmp/x }\npolicies:\n  - name: typo\n    namespace: shop\n    rules:\n      - clauses:\n          - matches:\n              - source_ips: [10.0.0.0/33]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shop/typo"), "{err}");
    assert!(err.contains("source_ips"), "{err}");
    assert!(err.contains("10.0.0.0/33"), "{err}");
}

#[test]
fn ca_crl_writes_a_crl_the_node_can_load() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let init = Command::new(BIN)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(init.status.success());
    let crl = dir.path().join("crl.pem");
    let out = Command::new(BIN)
        .args(["ca", "crl", "--dir"])
        .arg(&ca)
        .args(["--revoke", "0a1b2c", "--revoke", "ff00", "--out"])
        .arg(&crl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(zmesh::identity::load_crls(&crl).unwrap().len(), 1);
    // An odd-length serial is not a serial.
    let bad = Command::new(BIN)
        .args(["ca", "crl", "--dir"])
        .arg(&ca)
        .args(["--revoke", "abc", "--out"])
        .arg(&crl)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"abc\""));
}

const WAYPOINT: &str = env!("CARGO_BIN_EXE_zmesh-waypoint");

#[test]
fn waypoint_check_config_accepts_the_example_and_refuses_bad_l7_config_with_64() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/waypoint.yaml");
    let ok = Command::new(WAYPOINT)
        .args(["check-config", example])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let text = std::fs::read_to_string(example).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (bad, want) in [
        (
            text.replace("regex: \"[01]\"", "regex: \"[01\""),
            "invalid regex",
        ),
        (
            text.replace("percent: 5, status: 503", "percent: 500, status: 503"),
            "fault.abort.percent",
        ),
        (
            text.replace(
                "service: shop/reviews-v2.shop.svc.cluster.local }]",
                "service: shop/nope }]",
            ),
            "shop/nope",
        ),
        (
            text.replace("workload: shop-waypoint", "workload: ghost"),
            "waypoint.workload",
        ),
        (
            text.replace("request.auth.claims[groups]", "source.ip"),
            "unsupported condition key",
        ),
        (text.replace("\"kty\": \"EC\"", "\"kty\": \"oct\""), "JWKS"),
    ] {
        assert_ne!(bad, text, "the edit for {want:?} applied");
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, bad).unwrap();
        let out = Command::new(WAYPOINT)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{want}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn waypoint_reads_jwks_from_a_file_and_names_a_missing_one() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/waypoint.yaml");
    let text = std::fs::read_to_string(example).unwrap();
    let start = text.find("    jwks: '").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    let jwks = text[start + "    jwks: '".len()..end - 1].to_string();
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, &jwks).unwrap();
    let cfg = dir.path().join("wp.yaml");
    let with_file = |p: &std::path::Path| {
        format!(
            "{}    jwks_file: {}{}",
            &text[..start],
            p.display(),
            &text[end..]
        )
    };
    std::fs::write(&cfg, with_file(&jwks_path)).unwrap();
    let ok = Command::new(WAYPOINT)
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let missing = dir.path().join("missing.json");
    std::fs::write(&cfg, with_file(&missing)).unwrap();
    let bad = Command::new(WAYPOINT)
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("missing.json"));
}
