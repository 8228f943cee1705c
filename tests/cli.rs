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
        // gRPC-JSON transcoding reads its descriptor set at load.
        (
            text.replace(
                "  # - name: ratings\n",
                "  - { name: ratings, service: shop/reviews-v1.shop.svc.cluster.local, grpc_transcoding: { descriptor_set: /nonexistent/ratings.pb, services: [a.B] } }\n",
            ),
            "routes ratings: grpc_transcoding: descriptor set /nonexistent/ratings.pb",
        ),
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

/// Hostile config files (reliability #40) and what both binaries must say about each: the
/// position (when there is one) and the limit by name.
fn hostile_files(
    dir: &std::path::Path,
) -> Vec<(std::path::PathBuf, Option<&'static str>, &'static str)> {
    let base = "node:\n  name: n\n  certificates:\n    file_ca: { dir: /tmp/x }\n";
    let n = 100_000;
    let mut bomb =
        format!("{base}waypoint:\n  workload: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        bomb.push_str(&format!("  l{i}: &a{i} [{refs}]\n"));
    }
    let files = [
        (
            "flow.yaml",
            format!("{base}policies: {}{}\n", "[".repeat(n), "]".repeat(n)),
            Some(":5:"),
            "nesting deeper than 64 levels (MAX_DEPTH)",
        ),
        (
            "maps.yaml",
            format!("{base}routes: {}1{}\n", "{a: ".repeat(n), "}".repeat(n)),
            Some(":5:"),
            "nesting deeper than 64 levels (MAX_DEPTH)",
        ),
        (
            "block.yaml",
            format!("{base}policies:\n{}x\n", "- ".repeat(n)),
            Some(":6:"),
            "nesting deeper than 64 levels (MAX_DEPTH)",
        ),
        (
            "bomb.yaml",
            bomb,
            Some(":6:13:"),
            "anchors and aliases are not accepted",
        ),
        (
            "huge.yaml",
            format!("{base}# {}\n", "x".repeat(16 << 20)),
            None,
            "16777216-byte limit (MAX_BYTES)",
        ),
    ];
    files
        .into_iter()
        .map(|(name, text, at, what)| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            (path, at, what)
        })
        .collect()
}

#[test]
fn check_config_of_both_binaries_refuses_deep_aliased_and_huge_files_fast_with_64() {
    let dir = tempfile::tempdir().unwrap();
    for (path, at, what) in hostile_files(dir.path()) {
        for bin in [BIN, WAYPOINT] {
            let started = std::time::Instant::now();
            let out = Command::new(bin)
                .arg("check-config")
                .arg(&path)
                .output()
                .unwrap();
            let took = started.elapsed();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(64),
                "{bin} {}: {err}",
                path.display()
            );
            // main: 23 s for flow.yaml, over 30 s for maps.yaml. Process start included.
            assert!(took < std::time::Duration::from_secs(2), "{bin}: {took:?}");
            let lead = format!("{}{}", path.display(), at.unwrap_or(":"));
            assert!(err.starts_with(&lead), "{bin}: wanted {lead}: {err}");
            assert!(err.contains(what), "{bin}: wanted {what}: {err}");
        }
    }
}

/// Kills the node when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// User plus system CPU time of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; the fields after it are plain.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A file CA in `dir` and a minimal config for a process bound to `bind` (a loopback address of
/// the test's own, so its listeners collide with no other test's); `extra` is appended.
fn live_config(dir: &std::path::Path, bind: &str, extra: &str) -> String {
    let ca = dir.join("ca");
    assert!(Command::new(BIN)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap()
        .status
        .success());
    format!(
        "node:\n  name: n\n  bind: {bind}\n  certificates:\n    file_ca: {{ dir: {} }}\n{extra}",
        ca.display()
    )
}

/// Reliability #21 and #40, tier (c): a running zmesh-node has hostile files written over its
/// config. Each reload is rejected with file:line:column in its log within a second of the watch
/// noticing it, the node keeps serving on the last good config, and its CPU is not pinned.
#[test]
fn a_running_node_rejects_hostile_config_files_without_pinning_a_core() {
    let dir = tempfile::tempdir().unwrap();
    let bind = "127.78.0.1";
    let good = live_config(dir.path(), bind, "");
    rejects_hostile_reloads(BIN, dir.path(), bind, &good);
}

/// The same for a running zmesh-waypoint.
#[test]
fn a_running_waypoint_rejects_hostile_config_files_without_pinning_a_core() {
    let dir = tempfile::tempdir().unwrap();
    let bind = "127.79.0.1";
    let good = live_config(
        dir.path(),
        bind,
        &format!("waypoint: {{ workload: wp }}\nworkloads:\n  - {{ uid: wp, name: wp, namespace: shop, service_account: waypoint, addresses: [{bind}], node: n }}\n"),
    );
    rejects_hostile_reloads(WAYPOINT, dir.path(), bind, &good);
}

/// Runs `bin` on `good`, writes each hostile file over its config, and checks the log, the CPU
/// used and that readiness (:15021 on `bind`) still answers; finally the good file applies again.
fn rejects_hostile_reloads(bin: &str, dir: &std::path::Path, bind: &str, good: &str) {
    use std::io::{BufRead, BufReader};
    let path = dir.join("live.yaml");
    std::fs::write(&path, good).unwrap();
    let mut child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&path)
        .env("ZMESH_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let node = Running(child);
    let pid = node.0.id();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let serving = || std::net::TcpStream::connect((bind, 15021)).is_ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !serving() {
        assert!(std::time::Instant::now() < deadline, "{bin} never listened");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for (hostile, at, what) in hostile_files(dir) {
        let before = cpu_ticks(pid);
        let written = std::time::Instant::now();
        let tmp = dir.join("next.tmp");
        std::fs::copy(&hostile, &tmp).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        // The watch looks once a second (WATCH_INTERVAL); the rejection follows at once. On
        // main, flow.yaml pinned a core for 23 s first.
        let limit = std::time::Duration::from_millis(2500);
        let rejection = loop {
            let left = limit.saturating_sub(written.elapsed());
            match lines.recv_timeout(left) {
                Ok(l) if l.contains("config reload rejected") => break l,
                Ok(_) => continue,
                Err(_) => panic!(
                    "no rejection logged within {limit:?} for {}",
                    hostile.display()
                ),
            }
        };
        let lead = format!("{}{}", path.display(), at.unwrap_or(":"));
        assert!(rejection.contains(&lead), "wanted {lead}: {rejection}");
        assert!(rejection.contains(what), "wanted {what}: {rejection}");
        // At most half a second of CPU over the whole episode (ticks are 1/100 s), watch polls
        // and reading the file included.
        let used = cpu_ticks(pid) - before;
        assert!(used <= 50, "{used} ticks of CPU for {}", hostile.display());
        assert!(serving(), "{bin} still answers");
    }
    // Still running, and still on the last good config: restoring it applies cleanly.
    let tmp = dir.join("next.tmp");
    std::fs::write(&tmp, good).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let limit = std::time::Duration::from_secs(5);
    let written = std::time::Instant::now();
    loop {
        let left = limit.saturating_sub(written.elapsed());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains("config reloaded from") => break,
            Ok(_) => continue,
            Err(_) => panic!("the good file was not applied again"),
        }
    }
    let mut node = node;
    assert!(
        node.0.try_wait().unwrap().is_none(),
        "{bin} is still running"
    );
}

#[test]
fn a_missing_file_ca_says_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.yaml");
    let ca = dir.path().join("no-ca-here");
    std::fs::write(
        &path,
        format!(
            "node:\n  name: n\n  bind: 127.0.0.1\n  ports: {{hbone: 1, outbound: 2, inbound_plaintext: 3, readiness: 4, metrics: 5, admin: 6}}\n  certificates:\n    file_ca: {{ dir: {} }}\n",
            ca.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("zmesh-node ca init --dir") && err.contains("no-ca-here"),
        "{err}"
    );
}

#[test]
fn check_config_warns_when_the_certificate_material_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.yaml");
    std::fs::write(
        &path,
        format!(
            "node:\n  name: n\n  certificates:\n    file_ca: {{ dir: {} }}\n",
            dir.path().join("no-ca").display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    // The file itself is valid: ok, with a warning naming what the node will miss.
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("ca init") && err.contains("will not start"),
        "{err}"
    );
}

/// Reads `child`'s stderr until a line containing `needle` (10 s at most).
fn stderr_line(child: &mut std::process::Child, needle: &str) -> String {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => continue,
            Err(_) => panic!("{needle:?} not logged within 10 s"),
        }
    }
}

/// Both binaries log their data-plane worker count and where it came from at start: the
/// config's `worker_threads` when set, else the cgroup CPU limit or the available CPUs.
#[test]
fn the_worker_count_and_its_source_are_logged_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let bind = "127.96.0.1";
    let node_cfg = dir.path().join("node.yaml");
    std::fs::write(
        &node_cfg,
        live_config(dir.path(), bind, "").replace("  bind:", "  worker_threads: 3\n  bind:"),
    )
    .unwrap();
    let wp_cfg = dir.path().join("wp.yaml");
    let wp_bind = "127.96.0.2";
    std::fs::write(
        &wp_cfg,
        live_config(
            &dir.path().join("w"),
            wp_bind,
            &format!("waypoint: {{ workload: wp }}\nworkloads:\n  - {{ uid: wp, name: wp, namespace: shop, service_account: waypoint, addresses: [{wp_bind}], node: n }}\n"),
        ),
    )
    .unwrap();
    for (bin, cfg, count, source) in [
        (
            BIN,
            &node_cfg,
            Some(3),
            vec!["config (node.worker_threads)"],
        ),
        (
            WAYPOINT,
            &wp_cfg,
            None,
            vec!["cgroup v2 cpu.max", "cgroup v1", "available CPUs"],
        ),
    ] {
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(cfg)
            .env("ZMESH_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut running = Running(child);
        let line = stderr_line(&mut running.0, "data-plane worker threads");
        if let Some(n) = count {
            assert!(
                line.contains(&format!("workers={n}"))
                    || line.contains(&format!("\"workers\":{n}")),
                "{bin}: {line}"
            );
        }
        assert!(source.iter().any(|s| line.contains(s)), "{bin}: {line}");
    }
}

/// `zmesh-node connect` refuses a broken `connect:` section with exit 64 and the field's name,
/// before binding anything: a workload on another node, a bad `--forward`, a file without the
/// section, nothing to listen on.
#[test]
fn connect_refuses_broken_settings_with_exit_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let base = "node:\n  name: laptop\n  certificates:\n    file_ca: { dir: /nonexistent }\nworkloads:\n  - { uid: me, name: me, namespace: dev, addresses: [10.0.0.1], node: laptop }\n  - { uid: db, name: db, namespace: data, addresses: [10.0.0.2], node: db-node }\n";
    let other_node = write("other.yaml", &format!("{base}connect:\n  workload: db\n"));
    let no_section = write("none.yaml", base);
    let ok = write("ok.yaml", &format!("{base}connect:\n  workload: me\n"));
    for (args, field) in [
        (
            vec![
                "--config",
                other_node.to_str().unwrap(),
                "--socks5",
                "127.0.0.1:1",
            ],
            "connect.workload",
        ),
        (
            vec![
                "--config",
                no_section.to_str().unwrap(),
                "--socks5",
                "127.0.0.1:1",
            ],
            "connect",
        ),
        (
            vec!["--config", ok.to_str().unwrap()],
            "nothing to listen on",
        ),
        (
            vec![
                "--config",
                ok.to_str().unwrap(),
                "--forward",
                "127.0.0.1:1=postgres",
            ],
            "--forward",
        ),
        (
            vec![
                "--config",
                ok.to_str().unwrap(),
                "--allow-from",
                "10.0.0.0/40",
            ],
            "--allow-from",
        ),
    ] {
        let out = Command::new(BIN)
            .arg("connect")
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(field), "{args:?}: {err}");
        if !field.starts_with("--") {
            assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        }
    }
}

/// `ca csr` / `ca sign`: the signer signs only the identity the operator names, never writes
/// over a file or into the CA directory, and caps the lifetime; the key stays private.
#[test]
fn ca_sign_signs_only_the_named_identity_and_never_writes_over_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let run = |args: &[&std::ffi::OsStr]| Command::new(BIN).args(args).output().unwrap();
    let os = |s: &str| std::ffi::OsString::from(s);
    assert!(run(&[&os("ca"), &os("init"), &os("--dir"), ca.as_os_str()])
        .status
        .success());
    let (key, csr) = (dir.path().join("key.pem"), dir.path().join("a.csr"));
    let out = run(&[
        &os("ca"),
        &os("csr"),
        &os("--identity"),
        &os("dev/alice"),
        &os("--key-out"),
        key.as_os_str(),
        &os("--csr-out"),
        csr.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second csr never replaces the key or the request.
    let again = run(&[
        &os("ca"),
        &os("csr"),
        &os("--identity"),
        &os("dev/alice"),
        &os("--key-out"),
        dir.path().join("key2.pem").as_os_str(),
        &os("--csr-out"),
        csr.as_os_str(),
    ]);
    assert!(!again.status.success());
    assert!(
        !dir.path().join("key2.pem").exists(),
        "the new key is taken back"
    );
    let sign = |identity: &str, out: &std::path::Path, ttl: &str| {
        run(&[
            &os("ca"),
            &os("sign"),
            &os("--dir"),
            ca.as_os_str(),
            &os("--csr"),
            csr.as_os_str(),
            &os("--identity"),
            &os(identity),
            &os("--out"),
            out.as_os_str(),
            &os("--ttl"),
            &os(ttl),
        ])
    };
    let cert = dir.path().join("cert.pem");
    // Another identity than the CSR's: nothing signed, nothing written.
    let wrong = sign("dev/bob", &cert, "24h");
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("not spiffe://cluster.local/ns/dev/sa/bob")
    );
    assert!(!cert.exists());
    // Over a year, or into the CA directory: refused.
    assert!(!sign("dev/alice", &cert, "9000h").status.success());
    let inside = sign("dev/alice", &ca.join("evil.pem"), "24h");
    assert!(String::from_utf8_lossy(&inside.stderr).contains("inside the CA directory"));
    assert!(!ca.join("evil.pem").exists());
    // The right one is signed once; a second run does not write over it.
    let ok = sign("dev/alice", &cert, "24h");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let first = std::fs::read(&cert).unwrap();
    assert!(!sign("dev/alice", &cert, "24h").status.success());
    assert_eq!(std::fs::read(&cert).unwrap(), first);
}

/// `join --istio-vm-dir` with broken or incomplete VM files: a clear error naming the file and
/// fault, and nothing written; without `--name` (the token's node) it is refused by the parser.
#[test]
fn join_from_broken_istio_vm_files_names_the_fault_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("vm");
    std::fs::create_dir(&vm).unwrap();
    let etc = dir.path().join("etc");
    let units = dir.path().join("units");
    let join = |extra: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["join", "--istio-vm-dir"])
            .arg(&vm)
            .arg("--config-dir")
            .arg(&etc)
            .arg("--unit-dir")
            .arg(&units)
            .args(["--no-systemctl", "--address", "192.0.2.9"])
            .args(extra);
        cmd.output().unwrap()
    };
    let write = |name: &str, body: &str| std::fs::write(vm.join(name), body).unwrap();
    write(
        "cluster.env",
        "ISTIO_NAMESPACE='finance'\nSERVICE_ACCOUNT='billing-sa'\nISTIO_META_AUTO_REGISTER_GROUP='billing'\n",
    );
    write(
        "mesh.yaml",
        "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n",
    );
    write("root-cert.pem", "not checked here");
    // No istio-token: named.
    let out = join(&["--name", "vm-1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("istio-token"),
        "{err}"
    );
    write("istio-token", "token");
    // An unterminated quote: the file and line are named.
    write("cluster.env", "ISTIO_NAMESPACE='finance\n");
    let out = join(&["--name", "vm-1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cluster.env:1: unterminated quote"),
        "{err}"
    );
    // A metadata name the control plane would not take: refused before anything is written.
    write(
        "cluster.env",
        "ISTIO_NAMESPACE='finance'\nSERVICE_ACCOUNT='billing-sa'\nISTIO_META_='x'\n",
    );
    let out = join(&["--name", "vm-1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cluster.env: ISTIO_META_: the metadata name"),
        "{err}"
    );
    // A value with a control character gets past neither the file nor the config check.
    write(
        "cluster.env",
        "ISTIO_NAMESPACE='finance'\nSERVICE_ACCOUNT='billing-sa'\nISTIO_META_X='a\u{7f}b'\n",
    );
    let out = join(&["--name", "vm-1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cluster.env:3: a value may not hold control"),
        "{err}"
    );
    // Without --name the parser refuses it.
    let out = join(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--name"), "{err}");
    assert!(!etc.exists() && !units.exists(), "join wrote something");
}
