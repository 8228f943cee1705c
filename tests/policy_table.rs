//! Table-driven tests of the L4 authorization engine (`zmesh::policy`): each row is a policy list
//! in YAML, one connection, and the expected verdict and deciding policy. The rows walk every
//! match field and its `not_` form, the principal wildcard forms, CIDRs, ports, scope resolution,
//! Istio's decision order, dry-run, plaintext peers, STRICT mTLS and fail-closed loading.

use std::net::IpAddr;

use zmesh::identity::SpiffeId;
use zmesh::policy::{Connection, PolicySet, WorkloadRef};

/// The default connection: `client/app` in cluster.local, 10.0.0.1 → 10.0.1.1:8080, to `ns1/api`.
#[derive(Clone)]
struct Conn {
    id: Option<&'static str>,
    src: &'static str,
    dst: &'static str,
    port: u16,
    ns: &'static str,
    wl: &'static str,
}

const BASE: Conn = Conn {
    id: Some("spiffe://cluster.local/ns/client/sa/app"),
    src: "10.0.0.1",
    dst: "10.0.1.1",
    port: 8080,
    ns: "ns1",
    wl: "api",
};
/// The same connection in plaintext (arrived on 15006, no peer identity).
const PLAIN: Conn = Conn { id: None, ..BASE };

impl Conn {
    fn build(&self) -> Connection {
        Connection {
            src_identity: self.id.map(|s| SpiffeId::parse(s).unwrap()),
            src_ip: self.src.parse::<IpAddr>().unwrap(),
            dst_ip: self.dst.parse::<IpAddr>().unwrap(),
            dst_port: self.port,
            dst_workload: WorkloadRef {
                name: self.wl.into(),
                namespace: self.ns.into(),
            },
        }
    }
}

struct Case {
    name: &'static str,
    policies: String,
    conn: Conn,
    allowed: bool,
    decided_by: Option<&'static str>,
}

/// One policy `ns1/p` with one rule, one clause and one match written in YAML flow style.
fn one(action: &str, m: &str) -> String {
    format!("- {{name: p, namespace: ns1, action: {action}, rules: [{{clauses: [{{matches: [{{{m}}}]}}]}}]}}\n")
}
fn allow(m: &str) -> String {
    one("allow", m)
}
fn deny(m: &str) -> String {
    one("deny", m)
}

fn case(
    name: &'static str,
    policies: impl Into<String>,
    conn: Conn,
    allowed: bool,
    decided_by: Option<&'static str>,
) -> Case {
    Case {
        name,
        policies: policies.into(),
        conn,
        allowed,
        decided_by,
    }
}

const P: Option<&str> = Some("ns1/p");

fn c(f: impl FnOnce(&mut Conn)) -> Conn {
    let mut conn = BASE.clone();
    f(&mut conn);
    conn
}

fn cases() -> Vec<Case> {
    vec![
        // ---- no policy at all
        case("empty set allows", "[]", BASE, true, None),
        case("empty set allows plaintext", "[]", PLAIN, true, None),
        // ---- namespaces
        case("namespaces exact hit", allow("namespaces: [client]"), BASE, true, P),
        case("namespaces exact miss", allow("namespaces: [other]"), BASE, false, None),
        case("namespaces prefix", allow("namespaces: [\"cli*\"]"), BASE, true, P),
        case("namespaces suffix", allow("namespaces: [\"*ent\"]"), BASE, true, P),
        case("namespaces any element", allow("namespaces: [x, client]"), BASE, true, P),
        case("namespaces plaintext never matches", allow("namespaces: [\"*\"]"), PLAIN, false, None),
        case("not_namespaces excludes", deny("not_namespaces: [client]"), BASE, true, None),
        case("not_namespaces holds", deny("not_namespaces: [other]"), BASE, false, P),
        case("not_namespaces plaintext holds", deny("not_namespaces: [client]"), PLAIN, false, P),
        // ---- principals
        case("principal exact", allow("principals: [cluster.local/ns/client/sa/app]"), BASE, true, P),
        case("principal exact with scheme", allow("principals: [\"spiffe://cluster.local/ns/client/sa/app\"]"), BASE, true, P),
        case("principal exact miss", allow("principals: [cluster.local/ns/client/sa/other]"), BASE, false, None),
        case("principal prefix", allow("principals: [\"cluster.local/ns/client/*\"]"), BASE, true, P),
        case("principal prefix miss", allow("principals: [\"cluster.local/ns/x/*\"]"), BASE, false, None),
        case("principal suffix", allow("principals: [\"*/sa/app\"]"), BASE, true, P),
        case("principal suffix miss", allow("principals: [\"*/sa/db\"]"), BASE, false, None),
        case("principal presence", allow("principals: [\"*\"]"), BASE, true, P),
        case("principal presence plaintext", allow("principals: [\"*\"]"), PLAIN, false, None),
        case("principal other trust domain", allow("principals: [cluster.local/ns/client/sa/app]"), c(|c| c.id = Some("spiffe://other.td/ns/client/sa/app")), false, None),
        case("not_principals excludes", deny("not_principals: [cluster.local/ns/client/sa/app]"), BASE, true, None),
        case("not_principals holds", deny("not_principals: [cluster.local/ns/x/sa/y]"), BASE, false, P),
        case("not_principals prefix excludes", deny("not_principals: [\"cluster.local/*\"]"), BASE, true, None),
        // ---- STRICT mTLS: DENY + not_principals ["*"]
        case("STRICT mTLS denies plaintext", deny("not_principals: [\"*\"]"), PLAIN, false, P),
        case("STRICT mTLS allows any identity", deny("not_principals: [\"*\"]"), BASE, true, None),
        case("STRICT mTLS allows foreign identity", deny("not_principals: [\"*\"]"), c(|c| c.id = Some("spiffe://x.y/ns/z/sa/w")), true, None),
        // ---- service accounts
        case("service_accounts hit", allow("service_accounts: [client/app]"), BASE, true, P),
        case("service_accounts wrong sa", allow("service_accounts: [client/db]"), BASE, false, None),
        case("service_accounts wrong ns", allow("service_accounts: [other/app]"), BASE, false, None),
        case("service_accounts ignore trust domain", allow("service_accounts: [client/app]"), c(|c| c.id = Some("spiffe://other.td/ns/client/sa/app")), true, P),
        case("service_accounts plaintext", allow("service_accounts: [client/app]"), PLAIN, false, None),
        case("not_service_accounts excludes", deny("not_service_accounts: [client/app]"), BASE, true, None),
        case("not_service_accounts holds", deny("not_service_accounts: [client/db]"), BASE, false, P),
        // ---- source IPs
        case("source_ips v4 cidr", allow("source_ips: [10.0.0.0/24]"), BASE, true, P),
        case("source_ips v4 miss", allow("source_ips: [10.9.0.0/16]"), BASE, false, None),
        case("source_ips bare ip", allow("source_ips: [10.0.0.1]"), BASE, true, P),
        case("source_ips bare ip is /32", allow("source_ips: [10.0.0.2]"), BASE, false, None),
        case("source_ips v6 cidr", allow("source_ips: [\"fd00::/8\"]"), c(|c| c.src = "fd00::1"), true, P),
        case("source_ips v6 bare", allow("source_ips: [\"fd00::1\"]"), c(|c| c.src = "fd00::2"), false, None),
        case("source_ips v4 rule vs v6 peer", allow("source_ips: [0.0.0.0/0]"), c(|c| c.src = "fd00::1"), false, None),
        case("source_ips v4-mapped peer", allow("source_ips: [10.0.0.0/8]"), c(|c| c.src = "::ffff:10.0.0.1"), true, P),
        case("source_ips plaintext still matches", allow("source_ips: [10.0.0.0/8]"), PLAIN, true, P),
        case("not_source_ips excludes", deny("not_source_ips: [10.0.0.0/8]"), BASE, true, None),
        case("not_source_ips holds", deny("not_source_ips: [192.168.0.0/16]"), BASE, false, P),
        // ---- destination IPs
        case("destination_ips hit", allow("destination_ips: [10.0.1.0/24]"), BASE, true, P),
        case("destination_ips miss", allow("destination_ips: [10.0.2.0/24]"), BASE, false, None),
        case("destination_ips v6", allow("destination_ips: [\"2001:db8::/32\"]"), c(|c| c.dst = "2001:db8::5"), true, P),
        case("not_destination_ips excludes", deny("not_destination_ips: [10.0.1.1]"), BASE, true, None),
        case("not_destination_ips holds", deny("not_destination_ips: [10.0.2.1]"), BASE, false, P),
        // ---- ports
        case("destination_ports hit", allow("destination_ports: [80, 8080]"), BASE, true, P),
        case("destination_ports miss", allow("destination_ports: [80]"), BASE, false, None),
        case("not_destination_ports excludes", deny("not_destination_ports: [8080]"), BASE, true, None),
        case("not_destination_ports holds", deny("not_destination_ports: [80]"), BASE, false, P),
        case("deny one port only", deny("destination_ports: [9090]"), BASE, true, None),
        // ---- AND within a match, OR across matches, AND across clauses, OR across rules
        case("match fields AND: all hold", allow("namespaces: [client], destination_ports: [8080], source_ips: [10.0.0.0/8]"), BASE, true, P),
        case("match fields AND: one fails", allow("namespaces: [client], destination_ports: [80]"), BASE, false, None),
        case("empty match matches all", allow(""), PLAIN, true, P),
        case(
            "matches OR within clause",
            "- {name: p, namespace: ns1, rules: [{clauses: [{matches: [{destination_ports: [80]}, {namespaces: [client]}]}]}]}",
            BASE, true, P,
        ),
        case(
            "clauses AND within rule: both hold",
            "- {name: p, namespace: ns1, rules: [{clauses: [{matches: [{namespaces: [client]}]}, {matches: [{destination_ports: [8080]}]}]}]}",
            BASE, true, P,
        ),
        case(
            "clauses AND within rule: one fails",
            "- {name: p, namespace: ns1, rules: [{clauses: [{matches: [{namespaces: [client]}]}, {matches: [{destination_ports: [80]}]}]}]}",
            BASE, false, None,
        ),
        case(
            "rules OR",
            "- {name: p, namespace: ns1, rules: [{clauses: [{matches: [{destination_ports: [80]}]}]}, {clauses: [{matches: [{namespaces: [client]}]}]}]}",
            BASE, true, P,
        ),
        case("rule with no clauses matches all", "- {name: p, namespace: ns1, rules: [{}]}", PLAIN, true, P),
        case("allow with no rules allows nothing", "- {name: p, namespace: ns1}", BASE, false, None),
        case("deny with no rules denies nothing", "- {name: p, namespace: ns1, action: deny}", BASE, true, None),
        // ---- scope resolution
        case("global scope applies anywhere", "- {name: g, namespace: istio-system, scope: global, action: deny, rules: [{}]}", c(|c| c.ns = "elsewhere"), false, Some("istio-system/g")),
        case("namespace scope other namespace", deny(""), c(|c| c.ns = "ns2"), true, None),
        case("namespace scope same namespace", deny(""), BASE, false, P),
        case(
            "selector selects workload",
            "- {name: p, namespace: ns1, action: deny, scope: {workload_selector: {workloads: [db, api]}}, rules: [{}]}",
            BASE, false, P,
        ),
        case(
            "selector not matching workload",
            "- {name: p, namespace: ns1, action: deny, scope: {workload_selector: {workloads: [db]}}, rules: [{}]}",
            BASE, true, None,
        ),
        case(
            "selector same name other namespace",
            "- {name: p, namespace: ns1, action: deny, scope: {workload_selector: {workloads: [api]}}, rules: [{}]}",
            c(|c| c.ns = "ns2"), true, None,
        ),
        case(
            "allow on another workload does not apply",
            "- {name: p, namespace: ns1, scope: {workload_selector: {workloads: [db]}}, rules: [{clauses: [{matches: [{destination_ports: [1]}]}]}]}",
            BASE, true, None,
        ),
        // ---- decision order
        case(
            "deny beats allow",
            "- {name: a, namespace: ns1, rules: [{}]}\n- {name: d, namespace: ns1, action: deny, rules: [{}]}",
            BASE, false, Some("ns1/d"),
        ),
        case(
            "global deny beats workload allow",
            "- {name: a, namespace: ns1, scope: {workload_selector: {workloads: [api]}}, rules: [{}]}\n- {name: g, namespace: root, scope: global, action: deny, rules: [{clauses: [{matches: [{destination_ports: [8080]}]}]}]}",
            BASE, false, Some("root/g"),
        ),
        case(
            "no allow applies → allow",
            "- {name: d, namespace: ns1, action: deny, rules: [{clauses: [{matches: [{destination_ports: [22]}]}]}]}",
            BASE, true, None,
        ),
        case(
            "allow present but unmatched → deny",
            "- {name: a, namespace: ns1, rules: [{clauses: [{matches: [{destination_ports: [22]}]}]}]}",
            BASE, false, None,
        ),
        case(
            "second allow matches",
            "- {name: a, namespace: ns1, rules: [{clauses: [{matches: [{destination_ports: [22]}]}]}]}\n- {name: b, namespace: ns1, rules: [{clauses: [{matches: [{destination_ports: [8080]}]}]}]}",
            BASE, true, Some("ns1/b"),
        ),
        case(
            "allow in other namespace makes no allow applicable",
            "- {name: a, namespace: ns2, rules: [{clauses: [{matches: [{destination_ports: [22]}]}]}]}",
            BASE, true, None,
        ),
        case(
            "unmatched deny then matched allow",
            "- {name: d, namespace: ns1, action: deny, rules: [{clauses: [{matches: [{namespaces: [evil]}]}]}]}\n- {name: a, namespace: ns1, rules: [{clauses: [{matches: [{namespaces: [client]}]}]}]}",
            BASE, true, Some("ns1/a"),
        ),
        // ---- dry run never changes the verdict
        case("dry-run deny does not deny", "- {name: d, namespace: ns1, action: deny, dry_run: true, rules: [{}]}", BASE, true, None),
        case("dry-run allow does not make allow applicable", "- {name: a, namespace: ns1, dry_run: true, rules: [{clauses: [{matches: [{destination_ports: [1]}]}]}]}", BASE, true, None),
        case(
            "dry-run allow does not rescue",
            "- {name: a, namespace: ns1, dry_run: true, rules: [{}]}\n- {name: b, namespace: ns1, rules: [{clauses: [{matches: [{destination_ports: [1]}]}]}]}",
            BASE, false, None,
        ),
        // ---- fail closed
        case(
            "invalid CIDR denies its namespace",
            "- {name: bad, namespace: ns1, rules: [{clauses: [{matches: [{source_ips: [10.0.0.0/33]}]}]}]}",
            BASE, false, Some("ns1/bad"),
        ),
        case(
            "broken allow denies even what it would allow",
            "- {name: bad, namespace: ns1, rules: [{}], extra: 1}",
            BASE, false, Some("ns1/bad"),
        ),
        case(
            "broken policy does not leak to other namespace",
            "- {name: bad, namespace: ns1, rules: [{clauses: [{matches: [{source_ips: [garbage]}]}]}]}",
            c(|c| c.ns = "ns2"), true, None,
        ),
        case(
            "broken selector policy scoped to its workloads",
            "- {name: bad, namespace: ns1, scope: {workload_selector: {workloads: [db]}}, rules: [{clauses: [{matches: [{destination_ports: [0]}]}]}]}",
            BASE, true, None,
        ),
        case(
            "broken dry-run policy still denies",
            "- {name: bad, namespace: ns1, dry_run: true, rules: [{clauses: [{matches: [{destination_ips: [nope]}]}]}]}",
            BASE, false, Some("ns1/bad"),
        ),
        case(
            "broken policy with unreadable scope widens to namespace",
            "- {name: bad, namespace: ns1, scope: {workload_selector: {wrkloads: [db]}}}",
            BASE, false, Some("ns1/bad"),
        ),
        case(
            "broken policy without namespace is mesh-wide",
            "- {name: bad, rules: [{}]}",
            c(|c| c.ns = "anything"), false, Some("?/bad"),
        ),
        case(
            "broken policy beats a matching allow",
            "- {name: a, namespace: ns1, rules: [{}]}\n- {name: bad, namespace: ns1, action: sometimes}",
            BASE, false, Some("ns1/bad"),
        ),
        case("unparseable list denies all", "{not: a list}", BASE, false, Some("?/?")),
    ]
}

#[test]
fn policy_table() {
    let cases = cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let set = PolicySet::from_yaml_str(&case.policies);
        let d = set.evaluate(&case.conn.build());
        if d.allowed != case.allowed || d.decided_by.as_deref() != case.decided_by {
            failures.push(format!(
                "{}: got allowed={} by {:?}, want allowed={} by {:?} (errors: {:?})",
                case.name,
                d.allowed,
                d.decided_by,
                case.allowed,
                case.decided_by,
                set.errors()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn valid_tables_load_without_errors() {
    // Rows not about broken policies must load cleanly, so they test matching, not fail-closed.
    for case in cases() {
        let set = PolicySet::from_yaml_str(&case.policies);
        let expect_broken = case.name.contains("broken")
            || case.name.contains("invalid")
            || case.name.contains("unparseable");
        assert_eq!(
            !set.errors().is_empty(),
            expect_broken,
            "{}: {:?}",
            case.name,
            set.errors()
        );
    }
}

#[test]
fn dry_run_results_are_reported() {
    let set = PolicySet::from_yaml_str(
        "- {name: d, namespace: ns1, action: deny, dry_run: true, rules: [{}]}\n\
         - {name: a, namespace: ns1, dry_run: true, rules: [{clauses: [{matches: [{destination_ports: [8080]}]}]}]}\n\
         - {name: n, namespace: ns1, action: deny, dry_run: true, rules: [{clauses: [{matches: [{destination_ports: [1]}]}]}]}\n\
         - {name: real, namespace: ns1, rules: [{}]}",
    );
    assert!(set.errors().is_empty(), "{:?}", set.errors());
    let d = set.evaluate(&BASE.build());
    assert!(d.allowed);
    assert_eq!(d.decided_by.as_deref(), Some("ns1/real"));
    assert_eq!(
        d.dry_run_results,
        vec![
            ("ns1/d".to_string(), false),
            ("ns1/a".to_string(), true),
            ("ns1/n".to_string(), true),
        ]
    );
}

#[test]
fn errors_name_policy_and_field() {
    let set = PolicySet::from_yaml_str(
        "- {name: good, namespace: ns1}\n\
         - {name: bad, namespace: ns1, rules: [{clauses: [{matches: [{not_destination_ips: [10.0.0.0/33]}]}]}]}\n\
         - {name: typo, namespace: ns2, rules: [{clauses: [{matches: [{sorce_ips: [10.0.0.1]}]}]}]}",
    );
    assert_eq!(set.len(), 3);
    let msgs: Vec<String> = set.errors().iter().map(ToString::to_string).collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(
        msgs[0].contains("ns1/bad")
            && msgs[0].contains("rules[0].clauses[0].matches[0].not_destination_ips[0]")
            && msgs[0].contains("10.0.0.0/33"),
        "{}",
        msgs[0]
    );
    assert!(
        msgs[1].contains("ns2/typo")
            && msgs[1].contains("sorce_ips")
            && msgs[1].contains("policies[2]"),
        "{}",
        msgs[1]
    );
}

#[test]
fn many_policies_only_touch_applicable_buckets() {
    // 10,000 policies over 1,000 namespaces: the verdict for one workload depends only on its own
    // namespace's policies (functional check; speed is measured in benches/).
    let mut yaml = String::new();
    for i in 0..10_000 {
        yaml.push_str(&format!(
            "- {{name: p{i}, namespace: ns{}, action: deny, rules: [{{clauses: [{{matches: [{{destination_ports: [{}]}}]}}]}}]}}\n",
            i % 1000,
            1 + i % 7
        ));
    }
    let set = PolicySet::from_yaml_str(&yaml);
    assert!(set.errors().is_empty());
    assert_eq!(set.len(), 10_000);
    let d = set.evaluate(
        &c(|c| {
            c.ns = "ns3";
            c.port = 4;
        })
        .build(),
    );
    assert!(!d.allowed);
    assert_eq!(d.decided_by.as_deref(), Some("ns3/p3"));
    assert!(set.evaluate(&c(|c| c.ns = "ns3").build()).allowed);
}

#[test]
fn strict_mtls_denies_plaintext_and_allows_any_identity() {
    // docs/model.md: STRICT mTLS is a DENY with `not_principals: ["*"]`. A plaintext peer has no
    // principal for `*` to match, so the negation holds and the DENY fires; any identity matches
    // `*`, so the negation fails and the DENY stays out of the way.
    let set = PolicySet::from_yaml_str(
        "- {name: strict, namespace: ns1, action: deny, rules: [{clauses: [{matches: [{not_principals: [\"*\"]}]}]}]}",
    );
    assert!(set.errors().is_empty(), "{:?}", set.errors());
    let plain = set.evaluate(&PLAIN.build());
    assert!(!plain.allowed);
    assert_eq!(plain.decided_by.as_deref(), Some("ns1/strict"));
    for id in [
        "spiffe://cluster.local/ns/client/sa/app",
        "spiffe://other.td/ns/x/sa/y",
    ] {
        let d = set.evaluate(&c(|c| c.id = Some(id)).build());
        assert!(d.allowed, "{id}");
        assert_eq!(d.decided_by, None);
    }
    // Other namespaces are untouched by a namespace-scoped STRICT policy.
    assert!(
        set.evaluate(
            &c(|c| {
                c.id = None;
                c.ns = "ns2";
            })
            .build()
        )
        .allowed
    );
}
