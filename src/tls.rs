//! rustls configuration for HBONE: TLS 1.3 only, the two AES-GCM suites, ALPN h2, no SNI, no
//! resumption, and SPIFFE-aware verification on both sides (docs/hbone.md "TLS").
//!
//! The client checks the chain AND that the server's single URI SAN is one of the identities it
//! expected. The server checks the chain AND that the client is in its trust domain; which
//! identity may do what is authorization's job, not TLS's.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::hbone::ALPN_H2;
use crate::identity::{peer_identity, RustlsTime, SpiffeId, Trust, Usage, WorkloadCert};

/// The crypto provider, chosen explicitly and limited to TLS 1.3 AES-GCM: ring by default,
/// aws-lc-rs with the `aws-lc` feature (benches/ compares them). AES-256 comes first as Istio
/// orders it; on AES-NI/VAES hardware both suites cost about the same per byte.
pub fn provider() -> Arc<CryptoProvider> {
    #[cfg(feature = "aws-lc")]
    use rustls::crypto::aws_lc_rs as backend;
    #[cfg(not(feature = "aws-lc"))]
    use rustls::crypto::ring as backend;
    let mut p = backend::default_provider();
    p.cipher_suites = vec![
        backend::cipher_suite::TLS13_AES_256_GCM_SHA384,
        backend::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(p)
}

/// Why a peer certificate was refused, in words an operator can act on.
#[derive(thiserror::Error)]
pub enum VerifyError {
    #[error("server identity {received} is not one of the expected [{}]", expected.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", "))]
    UnexpectedServer {
        expected: Vec<SpiffeId>,
        received: SpiffeId,
    },
    #[error("client trust domain {received:?} differs from ours ({ours:?})")]
    TrustDomain { ours: String, received: String },
    #[error("peer certificate has no acceptable SPIFFE identity: {0}")]
    Identity(String),
}

// rustls prints `OtherError` with `{:?}`; make that the operator-facing sentence too.
impl std::fmt::Debug for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn reject(e: VerifyError) -> rustls::Error {
    tracing::debug!(error = %e, "peer certificate rejected");
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn identity_of(der: &CertificateDer<'_>) -> Result<SpiffeId, rustls::Error> {
    peer_identity(der).map_err(|e| reject(VerifyError::Identity(e.to_string())))
}

/// Client side: the chain (with CRLs) and the server's identity, which must be one we expected.
#[derive(Debug)]
struct SpiffeServerVerifier {
    trust: Arc<Trust>,
    expected: Vec<SpiffeId>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.trust
            .verify_chain(end_entity, intermediates, now, Usage::Server)?;
        let received = identity_of(end_entity)?;
        if self.expected.contains(&received) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(reject(VerifyError::UnexpectedServer {
                expected: self.expected.clone(),
                received,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs(&self.trust))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs(&self.trust))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algs(&self.trust).supported_schemes()
    }
}

fn algs(trust: &Trust) -> WebPkiSupportedAlgorithms {
    trust.provider().signature_verification_algorithms
}

/// Server side: the chain (with CRLs), and a client identity in our trust domain. Which identity
/// may do what is authorization's job (policy.rs), not TLS's.
#[derive(Debug)]
struct TrustDomainClientVerifier {
    trust: Arc<Trust>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust
            .verify_chain(end_entity, intermediates, now, Usage::Client)?;
        let id = identity_of(end_entity)?;
        if id.trust_domain == self.trust_domain {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(reject(VerifyError::TrustDomain {
                ours: self.trust_domain.clone(),
                received: id.trust_domain,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs(&self.trust))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs(&self.trust))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algs(&self.trust).supported_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build TLS config: {0}")]
pub struct TlsConfigError(String);

/// The HBONE server config presenting `cert`, verifying clients against `trust` on its clock.
pub fn server_config(
    cert: &WorkloadCert,
    trust: &Arc<Trust>,
) -> Result<ServerConfig, TlsConfigError> {
    let verifier = Arc::new(TrustDomainClientVerifier {
        trust: trust.clone(),
        trust_domain: cert.identity.trust_domain.clone(),
    });
    let time = Arc::new(RustlsTime(trust.clock().clone()));
    let mut cfg = ServerConfig::builder_with_details(trust.provider().clone(), time)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsConfigError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCert(cert.certified.clone())));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Every HBONE connection is a fresh full handshake: resumption would skip the client
    // certificate check that identity and revocation depend on.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// The HBONE client config presenting `cert` and accepting only a server in `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    trust: &Arc<Trust>,
    expected: Vec<SpiffeId>,
) -> Result<ClientConfig, TlsConfigError> {
    let verifier = Arc::new(SpiffeServerVerifier {
        trust: trust.clone(),
        expected,
    });
    let time = Arc::new(RustlsTime(trust.clock().clone()));
    let mut cfg = ClientConfig::builder_with_details(trust.provider().clone(), time)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsConfigError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCert(cert.certified.clone())));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The name handed to rustls on dial. Nobody checks it: SNI is off and the verifier ignores it.
pub fn placeholder_server_name() -> ServerName<'static> {
    ServerName::try_from("hbone.zmesh.invalid").expect("static valid DNS name")
}

#[derive(Debug)]
struct SingleCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for SingleCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for SingleCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}
