//! The ZDS messages, hand-written as prost derives from the "ZDS message layout" table in
//! `docs/capture.md` (proto3, package `istio.workload.zds`). The field numbers are the wire
//! contract with istio-cni and ztunnel; note the two surprises inherited from istio's `zds.proto`:
//! `DelWorkload.uid` is field **2**, and `keep` is oneof field **5** (4 was used by a removed message).
//! No `protoc`/prost-build step: seven small messages do not justify a build script.

/// Protocol version announced by the node tunnel in [`ZdsHello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    /// proto3 zero value; a hello carrying it is rejected.
    NotUsed = 0,
    V1 = 1,
}

/// First message on every connection, tunnel → agent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// Identity of the pod whose netns is handed over. Field number 4 is reserved (a removed field in
/// istio's schema) and must never be reused.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// Start (or replace) the proxy of a pod; the datagram carries exactly one fd, the pod netns.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// Keep a pod the tunnel already serves (snapshot only, no fd).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// The pod is gone. `uid` is field 2 on the wire, as in istio's schema.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// End of the initial snapshot: the tunnel stops proxies for pods that were not in it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

/// Reply to every request; an empty `error` means success.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

/// Agent → tunnel.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "workload_request::Payload", tags = "1, 2, 3, 5")]
    pub payload: Option<workload_request::Payload>,
}

pub mod workload_request {
    /// The request kinds; tag 4 is unused on the wire.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Add(super::AddWorkload),
        #[prost(message, tag = "2")]
        Del(super::DelWorkload),
        #[prost(message, tag = "3")]
        SnapshotSent(super::SnapshotSent),
        #[prost(message, tag = "5")]
        Keep(super::KeepWorkload),
    }
}

/// Tunnel → agent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

pub mod workload_response {
    /// The only response kind.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}

impl WorkloadResponse {
    /// The ack for one request: `Ok` encodes as an empty error string.
    pub fn ack(result: Result<(), String>) -> Self {
        let error = result.err().unwrap_or_default();
        Self {
            payload: Some(workload_response::Payload::Ack(Ack { error })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::workload_request::Payload;
    use super::*;
    use prost::Message;

    /// Byte vectors written by hand from the spec table (tag = field << 3 | wire type).
    #[test]
    fn encodings_match_the_table() {
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        assert_eq!(hello.encode_to_vec(), [0x08, 0x01]);

        let del = WorkloadRequest {
            payload: Some(Payload::Del(DelWorkload { uid: "u".into() })),
        };
        // field 2 LEN { field 2 LEN "u" }
        assert_eq!(del.encode_to_vec(), [0x12, 0x03, 0x12, 0x01, b'u']);

        let keep = WorkloadRequest {
            payload: Some(Payload::Keep(KeepWorkload { uid: "u".into() })),
        };
        // field 5 LEN { field 1 LEN "u" }
        assert_eq!(keep.encode_to_vec(), [0x2a, 0x03, 0x0a, 0x01, b'u']);

        let snap = WorkloadRequest {
            payload: Some(Payload::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(snap.encode_to_vec(), [0x1a, 0x00]);

        assert_eq!(WorkloadResponse::ack(Ok(())).encode_to_vec(), [0x0a, 0x00]);
        assert_eq!(
            WorkloadResponse::ack(Err("x".into())).encode_to_vec(),
            [0x0a, 0x03, 0x0a, 0x01, b'x']
        );
    }

    #[test]
    fn add_round_trips_with_workload_info() {
        let add = WorkloadRequest {
            payload: Some(Payload::Add(AddWorkload {
                uid: "uid-1".into(),
                workload_info: Some(WorkloadInfo {
                    name: "p".into(),
                    namespace: "ns".into(),
                    service_account: "sa".into(),
                }),
            })),
        };
        let bytes = add.encode_to_vec();
        assert_eq!(WorkloadRequest::decode(bytes.as_slice()).unwrap(), add);
    }

    #[test]
    fn unknown_oneof_field_decodes_to_no_payload() {
        // field 4 LEN {} is not a known payload: prost skips it, leaving `payload` empty.
        let req = WorkloadRequest::decode(&[0x22, 0x00][..]).unwrap();
        assert!(req.payload.is_none());
    }
}
