//! The xDS resource conversion (`zmesh::xds::convert`): bytes decoded as the protobuf message of
//! one resource type (prost), then converted to the config structs the model and the policy
//! engine use.
//!
//! Input: byte 0 selects the type (`% 4`: 0 `istio.workload.Address`, 1 `Workload`, 2
//! `Service`, 3 `istio.security.Authorization`), the rest is the encoded message. Each resource
//! is converted under the name it gives itself (a workload's uid, a service's
//! `namespace/hostname`, a policy's `namespace/name`), so the checks past the name are reached.
//! Properties: no panic; a policy that cannot be read comes back `Broken` (enforced as
//! deny-all) with the error for the NACK, never as a valid policy with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use zmesh::xds::convert::{self, PolicyItem};
use zmesh_proto::istio::security::Authorization;
use zmesh_proto::istio::workload::{address, Address, Service, Workload};

fn service_name(s: &Service) -> String {
    format!("{}/{}", s.namespace, s.hostname)
}

fuzz_target!(|data: &[u8]| {
    let Some((kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            let Ok(a) = Address::decode(bytes) else {
                return;
            };
            let name = match &a.r#type {
                Some(address::Type::Workload(w)) => w.uid.clone(),
                Some(address::Type::Service(s)) => service_name(s),
                None => String::new(),
            };
            let _ = convert::address(&name, &a);
        }
        1 => {
            if let Ok(w) = Workload::decode(bytes) {
                let _ = convert::workload(&w.uid.clone(), &w);
            }
        }
        2 => {
            if let Ok(s) = Service::decode(bytes) {
                let _ = convert::service(&service_name(&s), &s);
            }
        }
        _ => {
            if let Ok(a) = Authorization::decode(bytes) {
                let name = format!("{}/{}", a.namespace, a.name);
                match convert::authorization(&name, &a) {
                    (PolicyItem::Valid(_), None) | (PolicyItem::Broken(_), Some(_)) => {}
                    (PolicyItem::Valid(_), Some(e)) => panic!("valid policy with an error: {e}"),
                    (PolicyItem::Broken(_), None) => panic!("broken policy without an error"),
                }
            }
        }
    }
});
