//! Authorization policy evaluation against 10,000 policies (criterion).
//!
//! `cargo bench --bench policy`. Two shapes of the same 10,000 policies:
//! - spread: 1,000 namespaces with 9 policies each (namespace and selector scopes, ALLOW and
//!   DENY, every match field) plus 1,000 mesh-wide policies that never match: the realistic case,
//!   where scope bucketing means a decision only reads the policies that apply;
//! - one namespace: all 10,000 in the destination's namespace, the worst case (a linear scan).
//!
//! Each is measured for an allowed and a denied connection. Numbers are reported, never
//! asserted; the baseline is the cost of building the `Connection` value itself.

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use zmesh::identity::SpiffeId;
use zmesh::policy::{Connection, PolicySet, WorkloadRef};

const POLICIES: usize = 10_000;

/// One policy in YAML; `i` varies names, CIDRs and ports so no two are alike.
fn policy(out: &mut String, i: usize, ns: &str, scope: &str, action: &str, matched_sa: &str) {
    let octet = i % 250;
    writeln!(
        out,
        "- name: p{i}\n  namespace: {ns}\n  scope: {scope}\n  action: {action}\n  rules:\n    - clauses:\n        - matches:\n            - principals: [\"cluster.local/ns/{ns}/sa/{matched_sa}\", \"cluster.local/ns/other/*\"]\n              not_source_ips: [\"192.168.{octet}.0/24\"]\n              destination_ports: [{port}, 8080]\n        - matches:\n            - namespaces: [\"{ns}\", \"prod-*\"]\n              not_service_accounts: [\"{ns}/blocked-{i}\"]\n              destination_ips: [\"10.{octet}.0.0/16\", \"10.0.0.0/8\"]",
        port = 1000 + i % 60000,
    )
    .unwrap();
}

/// 1,000 namespaces × 9 policies + 1,000 global ones.
fn spread() -> PolicySet {
    let mut y = String::new();
    let mut i = 0;
    for n in 0..1000 {
        let ns = format!("ns{n}");
        for k in 0..9 {
            let (scope, action) = match k % 3 {
                0 => ("namespace", "allow"),
                1 => ("{workload_selector: {workloads: [api, web]}}", "allow"),
                _ => ("namespace", "deny"),
            };
            let sa = if action == "deny" {
                "attacker"
            } else {
                "client"
            };
            policy(&mut y, i, &ns, scope, action, sa);
            i += 1;
        }
    }
    while i < POLICIES {
        policy(&mut y, i, "istio-system", "global", "deny", "nobody");
        i += 1;
    }
    PolicySet::from_yaml_str(&y)
}

/// All 10,000 in one namespace: 9,999 ALLOWs that do not match and one that does, and the DENYs
/// interleaved, so the scan reads every policy.
fn one_namespace() -> PolicySet {
    let mut y = String::new();
    for i in 0..POLICIES {
        let action = if i % 2 == 0 { "allow" } else { "deny" };
        let sa = match (action, i) {
            ("allow", i) if i == POLICIES - 2 => "client".to_string(),
            ("allow", _) => format!("other-{i}"),
            _ => "attacker".to_string(),
        };
        policy(&mut y, i, "ns7", "namespace", action, &sa);
    }
    PolicySet::from_yaml_str(&y)
}

fn conn(sa: &str) -> Connection {
    Connection {
        src_identity: Some(SpiffeId::new("cluster.local", "ns7", sa).unwrap()),
        src_ip: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        dst_ip: IpAddr::V4(Ipv4Addr::new(10, 7, 0, 9)),
        dst_port: 8080,
        dst_workload: WorkloadRef {
            name: "api".into(),
            namespace: "ns7".into(),
        },
    }
}

fn bench(c: &mut Criterion) {
    let sets = [("spread", spread()), ("one_namespace", one_namespace())];
    for (_, set) in &sets {
        assert_eq!(set.len(), POLICIES);
        assert!(set.errors().is_empty(), "{:?}", set.errors());
    }
    let mut g = c.benchmark_group("policy_10k");
    g.bench_function("baseline_build_connection", |b| {
        b.iter(|| black_box(conn(black_box("client"))))
    });
    for (name, set) in &sets {
        let allowed = conn("client");
        let denied = conn("attacker");
        // The benchmark is only meaningful if the decisions are the intended ones.
        assert!(set.evaluate(&allowed).allowed, "{name}: client allowed");
        assert!(!set.evaluate(&denied).allowed, "{name}: attacker denied");
        g.bench_function(format!("{name}/allowed"), |b| {
            b.iter(|| black_box(set.evaluate(black_box(&allowed))))
        });
        g.bench_function(format!("{name}/denied"), |b| {
            b.iter(|| black_box(set.evaluate(black_box(&denied))))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
