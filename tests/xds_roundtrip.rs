//! Round trip (tier a): the xDS server's resources (`controlplane::xds_server::resources`), read
//! back by the node's xDS client (`xds::convert`, `xds::state::Store`), build the same model and
//! the same policy decisions as the file they came from. What Istio's resources cannot carry is
//! set aside: workload kinds other than Istio's four, and a service's waypoint-only settings.

use zmesh::config::Config;
use zmesh::controlplane::xds_server::resources;
use zmesh::identity::SpiffeId;
use zmesh::model::{Model, Service, Workload};
use zmesh::policy::{Connection, WorkloadRef};
use zmesh::xds::convert;
use zmesh::xds::state::{Held, Store};
use zmesh_proto::istio::security as sec;
use zmesh_proto::istio::workload as wl;
use zmesh_proto::prost::Message;

const MESH: &str = r#"
node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }
workloads:
  - { uid: wp, name: waypoint, namespace: shop, service_account: waypoint, addresses: [10.0.9.9, "fd00::9"], node: w, application_tunnel: { protocol: PROXY, port: 15088 } }
  - uid: web-1
    name: web
    namespace: shop
    service_account: web
    trust_domain: example.org
    addresses: [10.0.0.1]
    node: n1
    workload_type: pod
    canonical_revision: v2
    status: unhealthy
    capacity: 0
    locality: { region: r, zone: z }
    services: { shop/web.shop.svc.cluster.local: { 80: 8080 }, shop/other: {} }
    waypoint: wp
  - { uid: legacy, name: legacy, namespace: shop, addresses: ["fd00::1"], node: n2, protocol: TCP, workload_type: job }
services:
  - name: web
    namespace: shop
    hostname: web.shop.svc.cluster.local
    vips: [10.96.0.1, "fd00::96"]
    ports: { 80: 8080, 443: 8443 }
    subject_alt_names: ["spiffe://cluster.local/ns/shop/sa/web-canary"]
    load_balancing: { mode: strict, routing_preference: [zone, node] }
    waypoint: wp
  - { name: other, namespace: shop, hostname: other, vips: [10.96.0.2], ports: { 80: 80 }, load_balancing: { mode: failover } }
policies:
  - name: strict
    namespace: shop
    action: deny
    dry_run: true
    rules: [{ clauses: [{ matches: [{ not_principals: ["*"] }] }] }]
  - name: to-web
    namespace: shop
    scope: { workload_selector: { workloads: [web] } }
    rules:
      - clauses:
          - matches:
              - principals: ["spiffe://cluster.local/ns/shop/sa/*", "*/sa/x", "exact"]
                namespaces: [shop]
                service_accounts: [shop/a]
                not_service_accounts: [shop/b]
                source_ips: [10.0.0.0/8, "fd00::1"]
                destination_ports: [80]
                not_destination_ports: [81]
  - name: everywhere
    namespace: istio-system
    scope: global
"#;

fn sorted_workloads(m: &Model) -> Vec<Workload> {
    let mut v: Vec<Workload> = m.workloads().iter().map(|w| (**w).clone()).collect();
    v.sort_by(|a, b| a.uid.cmp(&b.uid));
    v
}

fn sorted_services(m: &Model) -> Vec<Service> {
    let mut v: Vec<Service> = m
        .services()
        .iter()
        .map(|s| {
            let mut s = (**s).clone();
            s.endpoints.sort_by(|a, b| a.uid.cmp(&b.uid));
            // No field in Istio's Service: not served.
            s.traffic_policy = None;
            s.app_protocols.clear();
            s
        })
        .collect();
    v.sort_by_key(|s| s.key());
    v
}

fn check(cfg: &Config, what: &str) {
    let snap = resources(cfg);
    let mut store = Store::default();
    for (name, v) in &snap.addresses {
        let a = wl::Address::decode(v.resource.value.as_slice()).unwrap();
        let e = convert::address(name, &a).unwrap_or_else(|e| panic!("{what}: {e}"));
        store.addresses.insert(
            name.clone(),
            Held {
                version: v.version.clone(),
                value: e,
            },
        );
    }
    for (name, v) in &snap.authorizations {
        let a = sec::Authorization::decode(v.resource.value.as_slice()).unwrap();
        let (item, e) = convert::authorization(name, &a);
        assert!(e.is_none(), "{what}: {e:?}");
        store.policies.insert(
            name.clone(),
            Held {
                version: v.version.clone(),
                value: item,
            },
        );
    }
    let (from_xds, policies) = store.build(&cfg.node);
    let from_file = Model::from_config(cfg);
    let (a, b) = (sorted_workloads(&from_file), sorted_workloads(&from_xds));
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(&b) {
        let mut x = x.clone();
        // Istio has four workload kinds; the others are sent as DEPLOYMENT.
        if !["deployment", "pod", "job", "cronjob"].contains(&x.workload_type.as_str()) {
            x.workload_type = "deployment".into();
        }
        assert_eq!(&x, y, "{what}");
    }
    assert_eq!(
        sorted_services(&from_file),
        sorted_services(&from_xds),
        "{what}"
    );
    let mut fs = cfg.policy_set().summary();
    let mut xs = policies.summary();
    fs.retain(|(_, valid)| *valid);
    fs.sort();
    xs.sort();
    assert_eq!(fs, xs, "{what}");
    // Same decisions over a grid of peers, destinations and ports.
    let file_set = cfg.policy_set();
    let ids = [
        None,
        Some("spiffe://cluster.local/ns/shop/sa/a"),
        Some("spiffe://cluster.local/ns/shop/sa/b"),
        Some("spiffe://cluster.local/ns/shop/sa/x"),
        Some("spiffe://cluster.local/ns/other/sa/exact"),
        Some("spiffe://example.org/ns/shop/sa/web"),
    ];
    let mut n = 0;
    for w in from_file.workloads() {
        for id in ids {
            for src in ["10.0.0.7", "192.168.1.1", "fd00::1"] {
                for port in [80, 81, 5432] {
                    let conn = Connection {
                        src_identity: id.map(|i| SpiffeId::parse(i).unwrap()),
                        src_ip: src.parse().unwrap(),
                        dst_ip: w.addresses[0],
                        dst_port: port,
                        dst_workload: WorkloadRef {
                            name: w.name.clone(),
                            namespace: w.namespace.clone(),
                        },
                    };
                    let (a, b) = (file_set.evaluate(&conn), policies.evaluate(&conn));
                    assert_eq!(a.allowed, b.allowed, "{what}: {conn:?}");
                    assert_eq!(a.decided_by, b.decided_by, "{what}: {conn:?}");
                    n += 1;
                }
            }
        }
    }
    eprintln!(
        "{what}: {} workloads, {} services, {} policies, {n} decisions",
        a.len(),
        from_file.services().len(),
        xs.len()
    );
}

#[test]
fn server_resources_build_the_files_model_through_the_client() {
    check(&Config::parse(MESH, "mesh.yaml").unwrap(), "MESH");
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        check(&cfg, &path.display().to_string());
    }
}

/// Istio's `application_tunnel` (Workload field 23) reaches the model from xDS: PROXY with a
/// port, PROXY with port 0 (the CONNECT's own port), NONE (as if absent); an unknown protocol
/// or a port above 65535 refuses the resource, naming the field.
#[test]
fn application_tunnel_from_xds_and_its_bad_forms() {
    let base = |protocol: i32, port: u32| wl::Workload {
        uid: "u".into(),
        name: "n".into(),
        namespace: "ns".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        application_tunnel: Some(wl::ApplicationTunnel { protocol, port }),
        ..Default::default()
    };
    let proxy = wl::application_tunnel::Protocol::Proxy as i32;
    let none = wl::application_tunnel::Protocol::None as i32;
    let tunnel = |w: &wl::Workload| {
        let cfg = Config::parse(
            "node: { name: n, certificates: { file_ca: { dir: /tmp/ca } } }\n",
            "t",
        )
        .unwrap();
        let mut c = convert::workload("u", w).unwrap().config;
        c.node = "n".into();
        let mut cfg = cfg;
        cfg.workloads.push(c);
        Model::from_config(&cfg).workloads()[0].proxy_tunnel
    };
    use zmesh::model::ProxyTunnel;
    assert_eq!(
        tunnel(&base(proxy, 15088)),
        Some(ProxyTunnel { port: Some(15088) })
    );
    assert_eq!(tunnel(&base(proxy, 0)), Some(ProxyTunnel { port: None }));
    assert_eq!(tunnel(&base(none, 15088)), None);
    let e = convert::workload("u", &base(7, 0)).err().unwrap();
    assert_eq!(e.field, "application_tunnel.protocol", "{e:?}");
    let e = convert::workload("u", &base(proxy, 70_000)).err().unwrap();
    assert_eq!(e.field, "application_tunnel.port", "{e:?}");
}
