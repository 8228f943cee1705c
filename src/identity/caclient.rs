//! The CA client: leaves for the node's workloads from a remote CA (istiod, or
//! `zmesh-node ca serve`) over Istio's `CreateCertificate`.
//!
//! Each key is an ECDSA P-256 key generated here; only a CSR leaves the node. The CSR carries the
//! identity as its one URI SAN, and the request carries `ImpersonatedIdentity` (the node asks on
//! behalf of a pod, as ztunnel does), `authorization: Bearer <token>` and `clusterid`. The answer
//! is checked before use: the leaf must name exactly the identity asked for and hold the key
//! generated for it; anything else is refused (fail closed). Renewal at half-life and the retry
//! back-off are the certificate manager's, as for the file CA.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use zmesh_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use zmesh_proto::istio::v1::auth::IstioCertificateRequest;
use zmesh_proto::prost_types::{value::Kind, Struct, Value};

use super::ca::{CaError, Issued};
use super::manager::{Authority, CertSource};
use super::SpiffeId;
use crate::config::control_plane::GrpcTarget;

/// The metadata key naming the identity a node asks for on a pod's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// One CreateCertificate call, connect included.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest chain accepted from a CA.
const MAX_CHAIN: usize = 8;

/// A remote CA reached over gRPC.
pub struct CaClient {
    target: GrpcTarget,
    mark: Option<u32>,
    impersonate: bool,
}

impl CaClient {
    /// `impersonate`: send `ImpersonatedIdentity` (a node tunnel asking for its pods).
    pub fn new(target: GrpcTarget, mark: Option<u32>, impersonate: bool) -> CaClient {
        CaClient {
            target,
            mark,
            impersonate,
        }
    }
}

impl CertSource {
    /// Leaves from a remote CA, renewed at half-life. Sockets carry the tunnel's mark.
    pub fn ca_client(target: GrpcTarget, ttl: Duration, impersonate: bool) -> CertSource {
        CertSource::Ca {
            ca: std::sync::Arc::new(CaClient::new(
                target,
                Some(crate::socket::TUNNEL_MARK),
                impersonate,
            )),
            ttl,
        }
    }
}

/// A CSR for `id` signed by `key`: no subject, one URI SAN.
pub fn csr_pem(id: &SpiffeId, key: &KeyPair) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.serialize_request(key)?.pem()
}

/// The request sent for `id`; with `impersonate`, the metadata names `id` as the identity asked
/// for on a pod's behalf.
pub fn request(
    csr: String,
    id: &SpiffeId,
    ttl: Duration,
    impersonate: bool,
) -> IstioCertificateRequest {
    let metadata = impersonate.then(|| {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            IMPERSONATED_IDENTITY.to_string(),
            Value {
                kind: Some(Kind::StringValue(id.to_string())),
            },
        );
        Struct { fields }
    });
    IstioCertificateRequest {
        csr,
        validity_duration: ttl.as_secs() as i64,
        metadata,
    }
}

impl Authority for CaClient {
    fn issue(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<Issued, CaError> {
        let fail = |detail: String| CaError::Issue {
            identity: id.to_string(),
            detail,
        };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let csr = csr_pem(id, &key).map_err(|e| fail(e.to_string()))?;
        let req = request(csr, id, ttl, self.impersonate);
        // Issuance runs on a blocking thread (or at start-up); the call gets a runtime of its
        // own so it never depends on which runtime, if any, the caller is in.
        let (target, mark) = (self.target.clone(), self.mark);
        let chain = std::thread::scope(|s| {
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async move {
                    tokio::time::timeout(CALL_TIMEOUT, call(&target, mark, req))
                        .await
                        .map_err(|_| {
                            format!("no answer from {} in {CALL_TIMEOUT:?}", target.address)
                        })?
                })
            })
            .join()
            .unwrap_or_else(|_| Err("the CA call panicked".into()))
        })
        .map_err(fail)?;
        accept(id, &key, &chain, now).map_err(fail)
    }
}

async fn call(
    target: &GrpcTarget,
    mark: Option<u32>,
    req: IstioCertificateRequest,
) -> Result<Vec<String>, String> {
    let channel = crate::grpc::connect(target, mark)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = IstioCertificateServiceClient::new(channel);
    let mut req = zmesh_proto::tonic::Request::new(req);
    crate::grpc::authorize(&mut req, target).map_err(|e| e.to_string())?;
    let resp = client.create_certificate(req).await.map_err(|s| {
        format!(
            "CA {} refused: {:?}: {}",
            target.address,
            s.code(),
            s.message()
        )
    })?;
    Ok(resp.into_inner().cert_chain)
}

/// How far the CA's clock may run ahead of ours.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Checks a CA's answer for `id` and our `key` at `now`: a PEM chain, leaf first; the leaf
/// names exactly `id`, certifies `key` and is valid now (allowing the CA's clock to be a few
/// minutes ahead). A self-issued last certificate is the root the peers already hold, and is
/// not presented.
pub fn accept(
    id: &SpiffeId,
    key: &KeyPair,
    pems: &[String],
    now: SystemTime,
) -> Result<Issued, String> {
    if pems.is_empty() {
        return Err("the CA answered with an empty chain".into());
    }
    let mut ders = Vec::new();
    for p in pems {
        for der in CertificateDer::pem_slice_iter(p.as_bytes()) {
            ders.push(
                der.map_err(|e| format!("the CA's chain holds an unreadable certificate: {e}"))?,
            );
        }
    }
    if ders.is_empty() {
        return Err("the CA's chain holds no PEM certificate".into());
    }
    if ders.len() > MAX_CHAIN {
        return Err(format!(
            "the CA's chain has {} certificates (limit {MAX_CHAIN})",
            ders.len()
        ));
    }
    let (_, leaf) = x509_parser::parse_x509_certificate(&ders[0])
        .map_err(|e| format!("the CA's leaf does not parse: {e}"))?;
    let got = super::cert::peer_identity(&ders[0]).map_err(|e| format!("the CA's leaf: {e}"))?;
    if &got != id {
        return Err(format!("the CA issued {got}, not the {id} asked for"));
    }
    if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("the CA's leaf does not certify the key this node generated".into());
    }
    let validity = leaf.validity();
    let secs = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let (not_before, not_after) = (
        secs(validity.not_before.timestamp()),
        secs(validity.not_after.timestamp()),
    );
    if not_before > now + CLOCK_SKEW || now >= not_after {
        return Err(format!(
            "the CA's leaf is not valid now (valid {} to {})",
            validity.not_before, validity.not_after
        ));
    }
    let serial = leaf
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let self_issued = |der: &CertificateDer<'_>| {
        x509_parser::parse_x509_certificate(der)
            .map(|(_, c)| c.issuer().as_raw() == c.subject().as_raw())
            .unwrap_or(false)
    };
    let last = ders.len() - 1;
    let presented = if last > 0 && self_issued(&ders[last]) {
        ders[..last].to_vec()
    } else {
        ders.clone()
    };
    Ok(Issued {
        chain: presented,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_before,
        not_after,
        serial,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, IsCa};

    fn ca(
        name: &str,
        issuer: Option<(&rcgen::Certificate, &KeyPair)>,
    ) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = match issuer {
            None => p.self_signed(&key).unwrap(),
            Some((c, k)) => p.signed_by(&key, c, k).unwrap(),
        };
        (cert, key)
    }

    fn leaf(
        id: &SpiffeId,
        key: &KeyPair,
        by: (&rcgen::Certificate, &KeyPair),
        life: (i64, i64),
    ) -> String {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::seconds(life.0);
        p.not_after = now + time::Duration::seconds(life.1);
        p.signed_by(key, by.0, by.1).unwrap().pem()
    }

    /// The error of a refused answer (an accepted one holds a key: it is never printed).
    fn refused(r: Result<Issued, String>) -> String {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn the_answer_is_checked_and_only_a_self_issued_root_is_dropped() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let other = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/c").unwrap();
        let (root, root_key) = ca("root", None);
        let (mid, mid_key) = ca("intermediate", Some((&root, &root_key)));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let now = SystemTime::now();
        let good = leaf(&id, &key, (&mid, &mid_key), (-60, 3600));
        // leaf, intermediate, root: the root is not presented.
        let i = accept(&id, &key, &[good.clone(), mid.pem(), root.pem()], now).unwrap();
        assert_eq!(i.chain.len(), 2);
        // leaf, intermediate (no root sent): the intermediate stays.
        let i = accept(&id, &key, &[good.clone(), mid.pem()], now).unwrap();
        assert_eq!(i.chain.len(), 2);
        // Refused: another identity, another key, expired, not yet valid, empty.
        let e = refused(accept(&other, &key, std::slice::from_ref(&good), now));
        assert!(
            e.contains("not the spiffe://cluster.local/ns/a/sa/c"),
            "{e}"
        );
        let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let e = refused(accept(&id, &stranger, &[good], now));
        assert!(e.contains("does not certify the key"), "{e}");
        let expired = leaf(&id, &key, (&mid, &mid_key), (-7200, -3600));
        assert!(refused(accept(&id, &key, &[expired], now)).contains("not valid now"));
        let future = leaf(&id, &key, (&mid, &mid_key), (3600, 7200));
        assert!(refused(accept(&id, &key, &[future], now)).contains("not valid now"));
        refused(accept(&id, &key, &[], now));
    }
}
