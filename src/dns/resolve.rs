//! What the proxy answers itself: a query for a name the mesh knows (a service hostname, or a
//! short form of it under the client's search domains) gets the service's addresses; anything
//! else is for the upstream resolvers. Pure: a parsed query and the model in, a decision out.
//!
//! Search domains follow a pod's resolv.conf (`search <ns>.svc.<cd> svc.<cd> <cd>`, ndots:5):
//! a stub resolver appends them before asking, so `postgres` arrives as
//! `postgres.data.svc.cluster.local`, and `api.example.com` as
//! `api.example.com.data.svc.cluster.local` first. Both are answered here under the name asked,
//! so the stub never reaches the upstream for a mesh name (no leak, no NXDOMAIN round trips).

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use crate::model::{Model, Service};

/// The UDP payload the proxy advertises and accepts with EDNS: the DNS flag day 2020 value,
/// which fits any path MTU without IP fragmentation.
pub const EDNS_PAYLOAD: u16 = 1232;
/// A UDP answer to a query without EDNS is at most this long (RFC 1035 4.2.1); longer answers
/// are sent truncated (TC) so the client retries over TCP.
pub const PLAIN_UDP_PAYLOAD: usize = 512;

/// `name` lower-cased and without its trailing dot, when it is a DNS name the proxy can look
/// up (at most 253 bytes, labels of 1-63 bytes of letters, digits, `-` and `_`).
pub fn normalize(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then(|| name.to_ascii_lowercase())
}

/// The search domains of a pod in `namespace` (unknown client: the cluster-wide two only).
pub fn search_domains(namespace: Option<&str>, cluster_domain: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(3);
    if let Some(ns) = namespace.filter(|ns| !ns.is_empty()) {
        out.push(format!("{ns}.svc.{cluster_domain}"));
    }
    out.push(format!("svc.{cluster_domain}"));
    out.push(cluster_domain.to_string());
    out
}

/// The service `qname` (normalized) names for a client with these search domains: the name as
/// a hostname or short form (`name.ns`, `name.ns.svc`), the name under a search domain (what a
/// client that does not expand search domains itself sends), or the name less a search domain
/// the client's stub resolver appended.
pub fn find_service<'m>(
    model: &'m Model,
    qname: &str,
    search: &[String],
) -> Option<&'m Arc<Service>> {
    if let Some(s) = model.service_by_host(qname) {
        return Some(s);
    }
    for d in search {
        if let Some(s) = model.service_by_host(&format!("{qname}.{d}")) {
            return Some(s);
        }
    }
    search.iter().find_map(|d| {
        let rest = qname.strip_suffix(d.as_str())?.strip_suffix('.')?;
        model.service_by_host(rest)
    })
}

/// The service's addresses of one family: its VIPs, else its auto-allocated one.
pub fn addresses(svc: &Service, qtype: RecordType) -> Vec<IpAddr> {
    svc.vips
        .iter()
        .chain(&svc.auto_vip)
        .copied()
        .filter(|ip| match qtype {
            RecordType::A => ip.is_ipv4(),
            RecordType::AAAA => ip.is_ipv6(),
            _ => false,
        })
        .collect()
}

/// What to do with a parsed message.
#[derive(Debug)]
pub enum Decision {
    /// Answer with this message.
    Answer(Message),
    /// Not a mesh name: send the query to the upstream resolvers.
    Forward,
    /// Not a query at all (a response sent to us, which could be a reflection attempt): say
    /// nothing.
    Ignore,
}

/// Decides how to answer `query`, a message a client sent.
pub fn decide(model: &Model, search: &[String], query: &Message, ttl: u32) -> Decision {
    if query.message_type() != MessageType::Query {
        return Decision::Ignore;
    }
    if query.op_code() != OpCode::Query {
        return Decision::Answer(reply(query, ResponseCode::NotImp));
    }
    let [q] = query.queries() else {
        // Every resolver sends exactly one question; more or none is malformed (RFC 9619).
        return Decision::Answer(reply(query, ResponseCode::FormErr));
    };
    if q.query_class() != DNSClass::IN {
        return Decision::Forward;
    }
    let Some(name) = normalize(&q.name().to_ascii()) else {
        return Decision::Forward;
    };
    let Some(svc) = find_service(model, &name, search) else {
        return Decision::Forward;
    };
    if svc.vips.is_empty() && svc.auto_vip.is_none() {
        // A headless Kubernetes service (or one the VIP range had no room for): only the
        // cluster's DNS knows its pod addresses.
        return Decision::Forward;
    }
    // A mesh name: answered here whatever the type, with no record when it has none of that
    // type (NODATA), so a mesh name never leaks to the upstream resolver.
    let mut m = reply(query, ResponseCode::NoError);
    m.set_authoritative(true);
    for ip in addresses(svc, q.query_type()) {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        m.add_answer(Record::from_rdata(q.name().clone(), ttl, rdata));
    }
    Decision::Answer(m)
}

/// A response to `query` with `code`, echoing its id, question and recursion-desired flag.
pub fn reply(query: &Message, code: ResponseCode) -> Message {
    let mut m = Message::error_msg(query.id(), query.op_code(), code);
    m.set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .add_queries(query.queries().iter().cloned());
    if query.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(edns);
    }
    m
}

/// The largest UDP answer the client of `query` accepts.
pub fn udp_limit(query: &Message) -> usize {
    match query.extensions() {
        Some(e) => usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD)),
        None => PLAIN_UDP_PAYLOAD,
    }
}

/// `answer` encoded for a UDP client that accepts `limit` bytes: as is when it fits, else its
/// question alone with TC set, so the client asks again over TCP.
pub fn fit_udp(answer: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = answer.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    answer.truncate().to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn model() -> Model {
        let text = "node:
  name: n1
  certificates: { file_ca: { dir: /tmp/ca } }
  dns: { enabled: true }
workloads:
  - { uid: c, name: client, namespace: shop, addresses: [10.0.0.1], node: n1 }
  - { uid: p, name: pg, namespace: data, addresses: [10.0.0.2], node: n1,
      services: { data/postgres.data.svc.cluster.local: { 5432: 5432 } } }
services:
  - { name: postgres, namespace: data, hostname: postgres.data.svc.cluster.local,
      vips: [10.96.0.10], ports: { 5432: 5432 } }
  - { name: cart, namespace: shop, hostname: cart.shop.svc.cluster.local,
      vips: [10.96.0.20, 'fd00::20'], ports: { 80: 8080 } }
  - { name: api, namespace: shop, hostname: api.example.com, ports: { 443: 443 } }
  - { name: kafka, namespace: data, hostname: kafka.data.svc.cluster.local, ports: { 9092: 9092 } }
";
        Model::from_config(&Config::parse(text, "test").unwrap())
    }

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(7)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m
    }

    fn answered(m: &Model, ns: Option<&str>, name: &str, t: RecordType) -> Option<Vec<IpAddr>> {
        let search = search_domains(ns, "cluster.local");
        match decide(m, &search, &query(name, t), 30) {
            Decision::Answer(a) => {
                assert_eq!(a.id(), 7);
                assert_eq!(a.response_code(), ResponseCode::NoError);
                assert!(a.authoritative());
                Some(
                    a.answers()
                        .iter()
                        .map(|r| {
                            assert_eq!(r.name(), &Name::from_ascii(name).unwrap(), "asked name");
                            assert_eq!(r.ttl(), 30);
                            match r.data() {
                                RData::A(a) => IpAddr::V4(a.0),
                                RData::AAAA(a) => IpAddr::V6(a.0),
                                other => panic!("{other:?}"),
                            }
                        })
                        .collect(),
                )
            }
            Decision::Forward => None,
            Decision::Ignore => panic!("a query was ignored"),
        }
    }

    #[test]
    fn mesh_names_are_answered_under_every_form_a_pod_resolver_sends() {
        let m = model();
        let pg: Vec<IpAddr> = vec!["10.96.0.10".parse().unwrap()];
        let a = RecordType::A;
        let table: &[(Option<&str>, &str)] = &[
            // FQDN and the short forms, with or without the trailing dot.
            (Some("shop"), "postgres.data.svc.cluster.local."),
            (Some("shop"), "postgres.data."),
            (Some("shop"), "postgres.data.svc"),
            (None, "POSTGRES.Data.svc.cluster.local"),
            // A short name in the client's own namespace, as dig sends it and as the stub
            // sends it after appending the first search domain.
            (Some("data"), "postgres"),
            (Some("data"), "postgres.data.svc.cluster.local"),
            // `name.ns` with the stub's second and third search domains appended.
            (
                Some("shop"),
                "postgres.data.svc.cluster.local.svc.cluster.local",
            ),
            (Some("shop"), "postgres.data.cluster.local"),
        ];
        for (ns, name) in table {
            assert_eq!(
                answered(&m, *ns, name, a).as_ref(),
                Some(&pg),
                "{ns:?} {name}"
            );
        }
        // An external hostname with the stub's first search domain appended.
        let api = answered(
            &m,
            Some("shop"),
            "api.example.com.shop.svc.cluster.local.",
            a,
        )
        .unwrap();
        assert_eq!(api.len(), 1);
        // A short name of another namespace's service is not the client's.
        assert_eq!(answered(&m, Some("shop"), "postgres", a), None);
        // Names the mesh does not know go upstream.
        for name in [
            "example.org.",
            "kubernetes.default.svc.cluster.local.",
            "svc.cluster.local.",
        ] {
            assert_eq!(answered(&m, Some("shop"), name, a), None, "{name}");
        }
    }

    #[test]
    fn each_family_gets_its_records_and_other_types_get_nodata() {
        let m = model();
        let cart = "cart.shop.svc.cluster.local.";
        assert_eq!(
            answered(&m, None, cart, RecordType::A),
            Some(vec!["10.96.0.20".parse().unwrap()])
        );
        assert_eq!(
            answered(&m, None, cart, RecordType::AAAA),
            Some(vec!["fd00::20".parse().unwrap()])
        );
        // IPv4-only: AAAA is NOERROR with no answer, never forwarded.
        assert_eq!(
            answered(&m, None, "postgres.data.", RecordType::AAAA),
            Some(vec![])
        );
        assert_eq!(answered(&m, None, cart, RecordType::TXT), Some(vec![]));
    }

    #[test]
    fn a_service_without_vips_answers_with_its_auto_allocated_address() {
        let m = model();
        let svc = m.service_by_host("api.example.com").unwrap();
        let vip = svc.auto_vip.expect("allocated");
        assert!(crate::config::dns::DEFAULT_VIP_RANGE.contains(&match vip {
            IpAddr::V4(v) => v,
            IpAddr::V6(_) => panic!("v6"),
        }));
        assert_eq!(
            answered(&m, None, "api.example.com.", RecordType::A),
            Some(vec![vip])
        );
        // ...and the outbound path takes that address for the service.
        assert_eq!(m.service_by_vip(vip).unwrap().hostname, "api.example.com");
        // Services with their own VIPs get none.
        assert_eq!(
            m.service_by_host("cart.shop.svc.cluster.local")
                .unwrap()
                .auto_vip,
            None
        );
    }

    #[test]
    fn a_headless_cluster_service_gets_no_auto_vip_and_is_forwarded() {
        let m = model();
        let kafka = m.service_by_host("kafka.data.svc.cluster.local").unwrap();
        assert_eq!(kafka.auto_vip, None, "kube-dns answers it with pod IPs");
        let s = search_domains(Some("data"), "cluster.local");
        for (name, t) in [
            ("kafka.data.svc.cluster.local.", RecordType::A),
            ("kafka.", RecordType::A),
            ("kafka.data.", RecordType::AAAA),
        ] {
            let d = decide(&m, &s, &query(name, t), 30);
            assert!(matches!(d, Decision::Forward), "{name}: {d:?}");
        }
    }

    #[test]
    fn odd_queries_get_a_clear_code_and_responses_are_ignored() {
        let m = model();
        let s = search_domains(None, "cluster.local");
        let mut two = query("a.", RecordType::A);
        two.add_query(Query::query(Name::from_ascii("b.").unwrap(), RecordType::A));
        let code = |d: Decision| match d {
            Decision::Answer(a) => a.response_code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(code(decide(&m, &s, &two, 30)), ResponseCode::FormErr);
        let mut none = query("a.", RecordType::A);
        none.take_queries();
        assert_eq!(code(decide(&m, &s, &none, 30)), ResponseCode::FormErr);
        let mut update = query("a.", RecordType::A);
        update.set_op_code(OpCode::Update);
        assert_eq!(code(decide(&m, &s, &update, 30)), ResponseCode::NotImp);
        let mut response = query("postgres.data.", RecordType::A);
        response.set_message_type(MessageType::Response);
        assert!(matches!(decide(&m, &s, &response, 30), Decision::Ignore));
    }

    #[test]
    fn names_are_normalized_or_refused() {
        assert_eq!(normalize("Foo.Bar."), Some("foo.bar".into()));
        assert_eq!(normalize("."), None);
        assert_eq!(normalize("a..b"), None);
        assert_eq!(normalize(&"a".repeat(64)), None);
        assert_eq!(
            normalize(&["a"; 128].join(".")),
            None,
            "255 bytes is over 253"
        );
        assert!(
            normalize(&["a"; 127].join(".")).is_some(),
            "253 bytes is fine"
        );
        assert_eq!(normalize("a b"), None);
    }

    #[test]
    fn long_udp_answers_are_truncated_for_the_client_limit() {
        let mut q = query("many.example.", RecordType::A);
        let mut a = reply(&q, ResponseCode::NoError);
        for i in 0..60u8 {
            a.add_answer(Record::from_rdata(
                Name::from_ascii("many.example.").unwrap(),
                30,
                RData::A(A::new(10, 0, 0, i)),
            ));
        }
        assert_eq!(udp_limit(&q), 512);
        let fitted = fit_udp(&a, udp_limit(&q)).unwrap();
        let back = Message::from_vec(&fitted).unwrap();
        assert!(back.truncated() && back.answers().is_empty() && fitted.len() <= 512);
        // With EDNS (up to our 1232) the whole answer fits.
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        q.set_edns(edns);
        assert_eq!(udp_limit(&q), usize::from(EDNS_PAYLOAD));
        let whole = Message::from_vec(&fit_udp(&a, udp_limit(&q)).unwrap()).unwrap();
        assert!(!whole.truncated());
        assert_eq!(whole.answers().len(), 60);
    }
}
