//! Golden tests: the exact text `render` produces for a few option sets, per backend. A change to
//! the rules shows up as a reviewable diff of `tests/golden/*.txt`; regenerate them with
//! `UPDATE_GOLDEN=1 cargo test -p zmesh-redirect --test golden` and read the diff before committing.

use std::path::PathBuf;

use zmesh_redirect::{Backend, Capture, HostOptions, InboundPlaintext, PodOptions};

fn host_cases() -> Vec<(&'static str, HostOptions)> {
    vec![
        // Outbound capture only: what a developer machine gets with no flags.
        ("host-default", HostOptions::default()),
        // A VM serving two ports, with the cloud metadata endpoint and a cluster range bypassed.
        (
            "host-inbound-allow",
            HostOptions {
                tunnel_uid: Some(997),
                inbound_ports: vec![8080, 9090],
                exclude_cidrs: vec![
                    "169.254.169.254/32".parse().unwrap(),
                    "10.96.0.0/12".parse().unwrap(),
                ],
                ..HostOptions::default()
            },
        ),
        // HBONE-only service; the user's exclusion list forgot SSH, which must still be excluded.
        (
            "host-inbound-deny",
            HostOptions {
                inbound_ports: vec![8443],
                inbound_plaintext: InboundPlaintext::Deny,
                exclude_ports: vec![2222],
                ..HostOptions::default()
            },
        ),
        // A VM whose DNS goes to its local stub resolver and a second one: both captured.
        (
            "host-dns",
            HostOptions {
                dns_capture: true,
                dns_servers: vec!["127.0.0.53".parse().unwrap(), "10.0.0.2".parse().unwrap()],
                ..HostOptions::default()
            },
        ),
    ]
}

fn pod_cases() -> Vec<(&'static str, PodOptions)> {
    vec![
        // What an enrolled pod gets with no opt-outs: docs/capture.md's block, IPv4 only.
        ("pod-default", PodOptions::default()),
        // Both per-pod opt-outs flipped: inbound plaintext bypasses the tunnel, DNS is captured.
        (
            "pod-bypass-inbound-dns",
            PodOptions {
                inbound_capture: false,
                dns_capture: true,
                ..PodOptions::default()
            },
        ),
        // A dual-stack pod with DNS capture: every rule twice, v6 with ::1 and the v6 probe source.
        (
            "pod-dual-stack-dns",
            PodOptions {
                dns_capture: true,
                ipv6: true,
                ..PodOptions::default()
            },
        ),
    ]
}

fn cases() -> Vec<(&'static str, Capture)> {
    let host = host_cases().into_iter().map(|(name, options)| {
        let rules = options.validate().expect("golden options are valid");
        (name, rules.capture().clone())
    });
    let pod = pod_cases().into_iter().map(|(name, options)| {
        let rules = options.validate().expect("golden options are valid");
        (name, rules.capture().clone())
    });
    host.chain(pod).collect()
}

#[test]
fn renderings_match_golden_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for (name, rules) in cases() {
        for (backend, suffix) in [(Backend::Iptables, "iptables"), (Backend::Nftables, "nft")] {
            let path = dir.join(format!("{name}.{suffix}.txt"));
            let got = rules.render(backend);
            if update {
                std::fs::write(&path, &got).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_GOLDEN=1", path.display()));
            if got != want {
                mismatches.push(format!(
                    "--- {}\n{want}\n+++ rendered\n{got}",
                    path.display()
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "renderings differ from golden files (UPDATE_GOLDEN=1 to accept):\n{}",
        mismatches.join("\n")
    );
}
