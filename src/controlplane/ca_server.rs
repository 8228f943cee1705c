//! The CA server: Istio's `CreateCertificate` backed by a [`FileCa`], so a standalone mesh's
//! nodes get their workloads' certificates without any of them holding the CA key.
//!
//! Each call is judged in this order, and the first failure answers (docs/model.md
//! "Standalone CA server"):
//! 1. authentication: `authorization: Bearer <node bootstrap token>` must name a node
//!    ([`NodeTokens`]); else UNAUTHENTICATED;
//! 2. the CSR: [`check_csr`] (PEM PKCS#10 of at most 16 KiB, signature, one URI SAN that is a
//!    SPIFFE identity of the CA's trust domain, P-256 key); else INVALID_ARGUMENT. When the
//!    request's metadata carries `ImpersonatedIdentity` (the CA client always sends it) it must
//!    name the CSR's identity; else INVALID_ARGUMENT;
//! 3. node authorization, as istiod checks a node tunnel that asks on a pod's behalf: some
//!    workload of the mesh model whose `node` is the caller's node must have that identity;
//!    else PERMISSION_DENIED, naming the identity and the node, and a rate-limited warning.
//!
//! Then the leaf is signed for the CSR's key, valid for the requested duration capped at
//! [`MAX_TTL`] (24 h when none is asked), and answered as `[leaf, intermediates..., root]`.
//! Tokens are never logged; the model is read from the shared watch channel on every call, so
//! a workload moved to another node stops being issued there at the next reload.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use zmesh_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use zmesh_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use zmesh_proto::prost_types::value::Kind;
use zmesh_proto::tonic::{self, Request, Response, Status};

use super::tokens::NodeTokens;
use crate::config::Config;
use crate::identity::caclient::IMPERSONATED_IDENTITY;
use crate::identity::{check_csr, CheckedCsr, Clock, FileCa, SpiffeId};
use crate::rejections::{LogLimiter, LOG_BURST, LOG_WINDOW};

/// Longest leaf the server signs, whatever is asked: istiod's default workload certificate
/// lifetime. Nodes renew at half-life, so a revoked node's certificates die within a day.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Largest request message accepted (tonic's default is 4 MiB). A CSR is at most 16 KiB; the
/// rest is a little metadata.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why a call is refused: the gRPC code and a message naming the problem (kept small here;
/// a `Status` is made only at the edge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: tonic::Code,
    pub message: String,
}

impl Refused {
    fn new(code: tonic::Code, message: impl Into<String>) -> Refused {
        Refused {
            code,
            message: message.into(),
        }
    }
}

impl From<Refused> for Status {
    fn from(r: Refused) -> Status {
        Status::new(r.code, r.message)
    }
}

/// The `IstioCertificateService` implementation.
pub struct CaServer {
    ca: Arc<FileCa>,
    tokens: Arc<NodeTokens>,
    mesh: watch::Receiver<Arc<Config>>,
    clock: Arc<dyn Clock>,
    denied: LogLimiter,
}

impl CaServer {
    pub fn new(
        ca: Arc<FileCa>,
        tokens: Arc<NodeTokens>,
        mesh: watch::Receiver<Arc<Config>>,
        clock: Arc<dyn Clock>,
    ) -> CaServer {
        CaServer {
            ca,
            tokens,
            mesh,
            clock,
            denied: LogLimiter::new(LOG_BURST, LOG_WINDOW),
        }
    }

    /// The tonic service, with the request size bounded.
    pub fn into_service(self) -> IstioCertificateServiceServer<CaServer> {
        IstioCertificateServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Step 1: the caller's node.
    fn authenticate<T>(&self, req: &Request<T>) -> Result<String, Refused> {
        super::tokens::caller_node(&self.tokens, req).map_err(|(code, why)| Refused::new(code, why))
    }

    /// Steps 2 and 3 for an authenticated `node`: the checked CSR and the lifetime to sign.
    pub fn judge(
        &self,
        node: &str,
        req: &IstioCertificateRequest,
    ) -> Result<(CheckedCsr, Duration), Refused> {
        use tonic::Code::{InvalidArgument, PermissionDenied};
        let mesh = self.mesh.borrow().clone();
        let trust_domain = &mesh.node.trust_domain.0;
        let csr = check_csr(&req.csr, trust_domain)
            .map_err(|e| Refused::new(InvalidArgument, e.to_string()))?;
        if let Some(asked) = impersonated(req)? {
            if asked != csr.identity.to_string() {
                return Err(Refused::new(
                    InvalidArgument,
                    format!(
                        "the CSR asks for {} but {IMPERSONATED_IDENTITY} names {asked:?}",
                        csr.identity
                    ),
                ));
            }
        }
        if !node_runs(&mesh, node, &csr.identity) {
            if let Some(suppressed) = self.denied.allow() {
                tracing::warn!(%node, identity = %csr.identity, suppressed, "certificate refused: no workload with this identity runs on the calling node");
            }
            return Err(Refused::new(PermissionDenied, format!(
                "node {node} may not have a certificate for {}: no workload with that identity runs on it in the mesh model",
                csr.identity
            )));
        }
        Ok((csr, ttl_for(req.validity_duration)))
    }
}

/// The lifetime to sign for a requested `validity_duration` (seconds): at most [`MAX_TTL`],
/// and [`MAX_TTL`] when none (or nonsense) is asked.
pub fn ttl_for(requested_secs: i64) -> Duration {
    if requested_secs <= 0 {
        return MAX_TTL;
    }
    Duration::from_secs(requested_secs as u64).min(MAX_TTL)
}

/// The request's `ImpersonatedIdentity`, when present; a non-string value is refused.
fn impersonated(req: &IstioCertificateRequest) -> Result<Option<String>, Refused> {
    let Some(v) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &v.kind {
        Some(Kind::StringValue(s)) => Ok(Some(s.clone())),
        _ => Err(Refused::new(
            tonic::Code::InvalidArgument,
            format!("metadata {IMPERSONATED_IDENTITY} must be a string"),
        )),
    }
}

/// Whether some workload of `mesh` on `node` has `id`, or a workload group that admits `node`
/// has it (the node registers that group's VM once its xDS stream opens, and needs the
/// certificate for it; docs/model.md "VM auto-registration").
pub fn node_runs(mesh: &Config, node: &str, id: &SpiffeId) -> bool {
    let td = &mesh.node.trust_domain;
    mesh.workloads.iter().any(|w| {
        let td = w.trust_domain.as_ref().unwrap_or(td);
        w.node.0 == node
            && td.0 == id.trust_domain
            && w.namespace.0 == id.namespace
            && w.service_account.0 == id.service_account
    }) || mesh.workload_groups.iter().any(|g| {
        g.admits(node)
            && td.0 == id.trust_domain
            && g.namespace.0 == id.namespace
            && g.service_account.0 == id.service_account
    })
}

#[tonic::async_trait]
impl IstioCertificateService for CaServer {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let node = self.authenticate(&req)?;
        let (csr, ttl) = self.judge(&node, req.get_ref())?;
        let signed = self.ca.sign_csr(&csr, ttl, self.clock.now()).map_err(|e| {
            tracing::error!(error = %e, "signing failed");
            Status::internal(e.to_string())
        })?;
        let mut cert_chain: Vec<String> = signed.chain.iter().map(|c| pem(c)).collect();
        if let Some(root) = self.ca.anchor() {
            cert_chain.push(pem(root));
        }
        tracing::info!(%node, identity = %csr.identity, serial = %signed.serial, ?ttl, "certificate issued");
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> Config {
        Config::parse(
            "node:\n  name: ca\n  certificates:\n    file_ca: { dir: /ca }\nworkloads:\n  - { uid: a, name: a, namespace: shop, service_account: db, addresses: [10.0.0.1], node: vm-1 }\n  - { uid: b, name: b, namespace: shop, service_account: web, addresses: [10.0.0.2], node: vm-2 }\n  - { uid: c, name: c, namespace: shop, service_account: x, trust_domain: other.td, addresses: [10.0.0.3], node: vm-1 }\n",
            "t",
        )
        .unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn a_node_may_have_only_its_own_workloads_identities() {
        let m = mesh();
        assert!(node_runs(
            &m,
            "vm-1",
            &id("spiffe://cluster.local/ns/shop/sa/db")
        ));
        assert!(!node_runs(
            &m,
            "vm-1",
            &id("spiffe://cluster.local/ns/shop/sa/web")
        ));
        assert!(node_runs(
            &m,
            "vm-2",
            &id("spiffe://cluster.local/ns/shop/sa/web")
        ));
        assert!(!node_runs(
            &m,
            "vm-3",
            &id("spiffe://cluster.local/ns/shop/sa/db")
        ));
        assert!(!node_runs(
            &m,
            "vm-1",
            &id("spiffe://cluster.local/ns/shop/sa/nope")
        ));
        // A workload's own trust domain counts, not the node's.
        assert!(!node_runs(
            &m,
            "vm-1",
            &id("spiffe://cluster.local/ns/shop/sa/x")
        ));
        assert!(node_runs(&m, "vm-1", &id("spiffe://other.td/ns/shop/sa/x")));
        // A workload group's identity goes to the nodes it admits, and to no other.
        let g = Config::parse(
            "node:\n  name: ca\n  certificates:\n    file_ca: { dir: /ca }\nworkload_groups:\n  - { name: billing, namespace: finance, service_account: billing-sa, nodes: [\"vm-billing-*\"] }\n",
            "t",
        )
        .unwrap();
        let billing = id("spiffe://cluster.local/ns/finance/sa/billing-sa");
        assert!(node_runs(&g, "vm-billing-3", &billing));
        assert!(!node_runs(&g, "laptop", &billing));
        assert!(!node_runs(
            &g,
            "vm-billing-3",
            &id("spiffe://cluster.local/ns/finance/sa/payroll")
        ));
    }

    #[test]
    fn impersonated_identity_must_be_a_string() {
        use zmesh_proto::prost_types::{Struct, Value};
        let mut req = IstioCertificateRequest::default();
        assert_eq!(impersonated(&req).unwrap(), None);
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            IMPERSONATED_IDENTITY.to_string(),
            Value {
                kind: Some(Kind::NumberValue(1.0)),
            },
        );
        req.metadata = Some(Struct { fields });
        let e = impersonated(&req).unwrap_err();
        assert_eq!(e.code, tonic::Code::InvalidArgument);
        assert!(e.message.contains("must be a string"), "{e:?}");
    }

    #[test]
    fn the_lifetime_is_capped_at_a_day() {
        assert_eq!(ttl_for(0), MAX_TTL);
        assert_eq!(ttl_for(-5), MAX_TTL);
        assert_eq!(ttl_for(3600), Duration::from_secs(3600));
        assert_eq!(ttl_for(i64::MAX), MAX_TTL);
    }

    #[test]
    fn chains_are_pem_that_round_trips() {
        use rustls_pki_types::pem::PemObject;
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x01];
        let text = pem(&der);
        let back = rustls_pki_types::CertificateDer::from_pem_slice(text.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), der.as_slice());
    }
}
