//! The DNS proxy's handling of a client's message (`zmesh::dns::respond`): hickory-proto's parse,
//! the mesh decision against a small model, and the encoding of the answer.
//!
//! Input: one DNS message as a client sends it. The first byte's low bit picks the transport
//! (0: UDP, 1: TCP); the rest is the message.
//! Properties: no panic; a reply parses back as a response to the same id and question; a UDP
//! reply is never longer than 512 bytes (or the EDNS size the query asked for, up to 1232), and
//! a reply is never sent for anything that was not a query.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use zmesh::config::Config;
use zmesh::dns::resolve::{search_domains, udp_limit};
use zmesh::dns::{respond, Response};
use zmesh::model::Model;

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let text = "node:
  name: n1
  certificates: { file_ca: { dir: /nonexistent } }
  dns: { enabled: true }
workloads:
  - { uid: p, name: pg, namespace: data, addresses: [10.0.0.2], node: n1,
      services: { data/postgres.data.svc.cluster.local: { 5432: 5432 } } }
services:
  - { name: postgres, namespace: data, hostname: postgres.data.svc.cluster.local,
      vips: [10.96.0.10, 'fd00::10'], ports: { 5432: 5432 } }
  - { name: api, namespace: data, hostname: api.example.com, ports: { 443: 443 } }
";
        Model::from_config(&Config::parse(text, "fuzz").expect("fuzz model parses"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, msg)) = data.split_first() else {
        return;
    };
    let udp = mode & 1 == 0;
    let search = search_domains(Some("data"), "cluster.local");
    let (_, response) = respond(model(), &search, 30, msg, udp);
    let Response::Reply(Some(reply)) = response else {
        return;
    };
    // Whatever was answered was a query hickory parsed.
    let query = hickory_proto::op::Message::from_vec(msg).expect("answered an unparsable message");
    let back = hickory_proto::op::Message::from_vec(&reply).expect("our reply does not parse");
    assert_eq!(back.id(), query.id());
    assert_eq!(
        back.message_type(),
        hickory_proto::op::MessageType::Response
    );
    assert_eq!(back.queries(), query.queries());
    if udp {
        assert!(
            reply.len() <= udp_limit(&query),
            "{} bytes over UDP",
            reply.len()
        );
    }
});
