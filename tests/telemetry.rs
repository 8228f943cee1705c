//! Tier (b): the telemetry contract of the three real binaries: `--version` carries the git
//! commit, `LOG_FORMAT=json` makes every binary log one JSON object per line with one key
//! scheme, and a `LOG_FORMAT` that is neither text nor json is named in the log and falls back
//! to text (docs/telemetry.md "Logs").

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const NODE: &str = env!("CARGO_BIN_EXE_zmesh-node");
const WAYPOINT: &str = env!("CARGO_BIN_EXE_zmesh-waypoint");
/// The redirect binary is another package's; tier (c) tests find it beside ours the same way.
fn redirect_bin() -> std::path::PathBuf {
    zmesh_testbed::mesh::redirect_bin(std::path::Path::new(NODE))
}

/// Keys every JSON log line of every binary has (zmesh_redirect::logging).
const JSON_KEYS: [&str; 4] = ["timestamp", "level", "target", "message"];

/// Kills the child when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with its stderr read line by line on a thread.
fn spawn(mut cmd: Command) -> (Running, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("ZMESH_LOG")
        .env_remove("RUST_LOG")
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    (Running(child), rx)
}

/// Lines from `rx` until one contains `until` (included), within 20 s.
fn lines_until(rx: &mpsc::Receiver<String>, until: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = l.contains(until);
                got.push(l);
                if done {
                    return got;
                }
            }
            Err(_) => panic!("no line with {until:?} within 20 s; got: {got:#?}"),
        }
    }
}

/// Every line parses as one JSON object with the shared keys; returns them parsed.
fn assert_json_lines(bin: &str, lines: &[String]) -> Vec<serde_json::Value> {
    assert!(!lines.is_empty(), "{bin}: no log lines");
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{bin}: not a JSON line ({e}): {l}"));
            for k in JSON_KEYS {
                assert!(
                    v.get(k).is_some_and(|x| x.is_string()),
                    "{bin}: no {k}: {l}"
                );
            }
            // RFC 3339 in UTC: 2026-11-28T22:41:11.123456Z.
            let ts = v["timestamp"].as_str().unwrap();
            assert!(
                ts.len() >= 20
                    && ts.as_bytes()[4] == b'-'
                    && ts.as_bytes()[10] == b'T'
                    && ts.ends_with('Z'),
                "{bin}: timestamp not RFC 3339 UTC: {l}"
            );
            assert!(
                ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&v["level"].as_str().unwrap()),
                "{bin}: {l}"
            );
            assert!(
                v.get("fields").is_none(),
                "{bin}: fields are flattened: {l}"
            );
            v
        })
        .collect()
}

/// The start line: binary, version and the commit the build was made from.
fn assert_start_line(bin: &str, lines: &[serde_json::Value]) {
    let start = lines
        .iter()
        .find(|v| v["message"] == "starting")
        .unwrap_or_else(|| panic!("{bin}: no start line: {lines:#?}"));
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"), "{bin}");
    assert_eq!(start["git_sha"], zmesh_redirect::GIT_SHA, "{bin}");
}

/// A file CA and a config for a node or waypoint on `bind` (a loopback address no other test
/// uses).
fn live_config(dir: &std::path::Path, bind: &str, extra: &str) -> std::path::PathBuf {
    let ca = dir.join("ca");
    assert!(Command::new(NODE)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap()
        .status
        .success());
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "node:\n  name: n\n  bind: {bind}\n  certificates:\n    file_ca: {{ dir: {} }}\n{extra}",
            ca.display()
        ),
    )
    .unwrap();
    path
}

/// The short commit `git` reports for this checkout, or `unknown` where there is none (a
/// tarball) or no git.
fn expected_sha() -> String {
    if let Ok(given) = std::env::var("ZMESH_GIT_SHA") {
        return given;
    }
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

#[test]
fn every_binary_reports_version_and_git_commit() {
    let sha = expected_sha();
    assert_eq!(zmesh_redirect::GIT_SHA, sha, "the build's commit is git's");
    let redirect = redirect_bin();
    for (bin, name) in [
        (NODE.as_ref(), "zmesh-node"),
        (WAYPOINT.as_ref(), "zmesh-waypoint"),
        (redirect.as_path(), "zmesh-redirect"),
    ] {
        let out = Command::new(bin).arg("--version").output().unwrap();
        assert!(out.status.success(), "{name}");
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            format!("{name} {} (git {sha})", env!("CARGO_PKG_VERSION")),
        );
    }
}

#[test]
fn log_format_json_makes_the_node_log_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = live_config(dir.path(), "127.93.0.1", "");
    let mut cmd = Command::new(NODE);
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("LOG_FORMAT", "json");
    let (_node, rx) = spawn(cmd);
    let lines = assert_json_lines("zmesh-node", &lines_until(&rx, "zmesh node ready"));
    assert_start_line("zmesh-node", &lines);
    assert!(lines.iter().any(|v| v["message"] == "effective config"
        && v["node"] == "n"
        && v["target"] == "zmesh_node"));
}

#[test]
fn log_format_json_makes_the_waypoint_log_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = live_config(
        dir.path(),
        "127.94.0.1",
        "waypoint: { workload: wp }\nworkloads:\n  - { uid: wp, name: wp, namespace: shop, service_account: waypoint, addresses: [127.94.0.1], node: n }\n",
    );
    let mut cmd = Command::new(WAYPOINT);
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("LOG_FORMAT", "json");
    let (_wp, rx) = spawn(cmd);
    let lines = assert_json_lines("zmesh-waypoint", &lines_until(&rx, "zmesh waypoint ready"));
    assert_start_line("zmesh-waypoint", &lines);

    // A config it refuses is a JSON line too, with the reason, and exit 64.
    let out = Command::new(WAYPOINT)
        .args(["run", "--config"])
        .arg(dir.path().join("missing.yaml"))
        .env("LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let lines: Vec<String> = String::from_utf8(out.stderr)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let parsed = assert_json_lines("zmesh-waypoint", &lines);
    let refused = parsed
        .iter()
        .find(|v| v["level"] == "ERROR")
        .expect("an error line");
    assert!(
        refused["error"].as_str().unwrap().contains("missing.yaml"),
        "{refused}"
    );
}

#[test]
fn log_format_json_makes_the_redirect_agent_log_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(redirect_bin());
    cmd.args(["agent", "--zds-socket"])
        .arg(dir.path().join("zds.sock"))
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .env("LOG_FORMAT", "json");
    let (agent, rx) = spawn(cmd);
    let lines = assert_json_lines("zmesh-redirect", &lines_until(&rx, "redirect agent ready"));
    assert_start_line("zmesh-redirect", &lines);
    drop(agent);

    // An agent that cannot start says why in JSON, and fails.
    let out = Command::new(redirect_bin())
        .args([
            "agent",
            "--zds-socket",
            "/dev/null/zds.sock",
            "--admin-socket",
            "/dev/null/admin.sock",
        ])
        .env("LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let lines: Vec<String> = String::from_utf8(out.stderr)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let parsed = assert_json_lines("zmesh-redirect", &lines);
    let stopped = parsed
        .iter()
        .find(|v| v["level"] == "ERROR")
        .expect("an error line");
    assert!(
        stopped["error"].as_str().unwrap().contains("/dev/null/"),
        "{stopped}"
    );
}

/// Hostile: a `LOG_FORMAT` that is no format. The process still starts (a typo must not take
/// a node down), logs as text, and its first line names the bad value and the fallback.
#[test]
fn an_unknown_log_format_is_named_and_falls_back_to_text() {
    let dir = tempfile::tempdir().unwrap();
    let config = live_config(dir.path(), "127.95.0.1", "");
    let mut cmd = Command::new(NODE);
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("LOG_FORMAT", "yaml\"; rm -rf");
    let (_node, rx) = spawn(cmd);
    let lines = lines_until(&rx, "zmesh node ready");
    assert!(
        lines[0].contains("WARN")
            && lines[0].contains(r#"LOG_FORMAT="yaml\"; rm -rf""#)
            && lines[0].contains("logging as text"),
        "{lines:#?}"
    );
    for l in &lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_err(),
            "text, not JSON: {l}"
        );
    }

    // The same for the agent.
    let mut cmd = Command::new(redirect_bin());
    cmd.args(["agent", "--zds-socket"])
        .arg(dir.path().join("zds.sock"))
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .env("LOG_FORMAT", "JSONL");
    let (_agent, rx) = spawn(cmd);
    let lines = lines_until(&rx, "redirect agent ready");
    assert!(
        lines[0].contains("LOG_FORMAT=\"JSONL\"") && lines[0].contains("logging as text"),
        "{lines:#?}"
    );
}

/// The build script alone, compiled and run as cargo would run it, in three places: this
/// checkout (git's commit, and HEAD watched so a commit rebuilds), a directory without `.git`
/// (a release tarball: `unknown`, and nothing watched that does not exist), and with the
/// commit given by the builder (hostile characters dropped, so it cannot break a label or the
/// version line).
#[test]
fn the_build_script_stamps_git_or_unknown_or_what_the_builder_gives() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("build-script");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/ebpf-free-redirect/build.rs");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let built = Command::new(rustc)
        .args(["--edition", "2021", "-o"])
        .arg(&script)
        .arg(source)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = |manifest_dir: &std::path::Path, given: Option<&str>| {
        let mut cmd = Command::new(&script);
        cmd.env("CARGO_MANIFEST_DIR", manifest_dir)
            .env_remove("ZMESH_GIT_SHA")
            .env_remove("GIT_DIR")
            // git must not find a repository above the tarball directory either.
            .env("GIT_CEILING_DIRECTORIES", dir.path());
        if let Some(v) = given {
            cmd.env("ZMESH_GIT_SHA", v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };

    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ebpf-free-redirect");
    if std::env::var_os("ZMESH_GIT_SHA").is_none() && expected_sha() != "unknown" {
        let here = run(&crate_dir, None);
        assert!(
            here.contains(&format!(
                "cargo:rustc-env=ZMESH_GIT_SHA={}\n",
                expected_sha()
            )),
            "{here}"
        );
        let watched: Vec<&str> = here
            .lines()
            .filter_map(|l| l.strip_prefix("cargo:rerun-if-changed="))
            .collect();
        assert!(watched.iter().any(|p| p.ends_with("HEAD")), "{here}");
        for p in watched {
            assert!(std::path::Path::new(p).exists() || p == "build.rs", "{p}");
        }
    }

    let tarball = dir.path().join("zmesh-0.1.0");
    std::fs::create_dir(&tarball).unwrap();
    let out = run(&tarball, None);
    assert!(
        out.contains("cargo:rustc-env=ZMESH_GIT_SHA=unknown\n"),
        "{out}"
    );
    assert!(!out.contains("HEAD"), "{out}");

    let out = run(&tarball, Some("v1.2.3-rc1\"} evil{x=\"1\n"));
    assert!(
        out.contains("cargo:rustc-env=ZMESH_GIT_SHA=v1.2.3-rc1evilx1\n"),
        "{out}"
    );
}
