//! Reading identities out of X.509 certificates and loading PEM files.
//!
//! The peer identity is the certificate's one URI SAN. A certificate carrying two URI SANs is
//! ambiguous (which one would policy see?) and is refused, as is any SAN that `SpiffeId::parse`
//! would not produce itself.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;

use super::{SpiffeError, SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate is not valid DER X.509: {0}")]
    Parse(String),
    #[error(
        "certificate carries no URI SAN: a mesh certificate needs exactly one spiffe:// URI SAN"
    )]
    NoUriSan,
    #[error("certificate carries {0} URI SANs: exactly one is allowed, so the identity is never ambiguous")]
    ManyUriSans(usize),
    #[error("certificate URI SAN {san:?} is not a valid SPIFFE ID: {source}")]
    BadSan {
        san: String,
        #[source]
        source: SpiffeError,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}: {detail}")]
    Pem {
        path: String,
        what: &'static str,
        detail: String,
    },
}

/// The SPIFFE identity a certificate proves.
pub fn peer_identity(der: &CertificateDer<'_>) -> Result<SpiffeId, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(CertError::NoUriSan),
        [one] => SpiffeId::parse(one).map_err(|source| CertError::BadSan {
            san: one.escape_debug().to_string(),
            source,
        }),
        many => Err(CertError::ManyUriSans(many.len())),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// All certificates in a PEM file, in order (leaf first for a chain; any order for a bundle).
pub fn load_certs_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            path: path.display().to_string(),
            what: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            path: path.display().to_string(),
            what: "certificate",
            detail: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key_pem(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| CertError::Pem {
        path: path.display().to_string(),
        what: "private key",
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with_sans(sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn one_uri_san_is_the_identity() {
        let der = cert_with_sans(vec![
            SanType::DnsName("ignored.example".try_into().unwrap()),
            uri("spiffe://cluster.local/ns/a/sa/b"),
        ]);
        assert_eq!(
            peer_identity(&der).unwrap().to_string(),
            "spiffe://cluster.local/ns/a/sa/b"
        );
    }

    #[test]
    fn san_edge_cases_are_rejected() {
        // docs/reliability.md #17.
        let two = cert_with_sans(vec![
            uri("spiffe://cluster.local/ns/a/sa/b"),
            uri("spiffe://cluster.local/ns/a/sa/c"),
        ]);
        assert!(matches!(
            peer_identity(&two),
            Err(CertError::ManyUriSans(2))
        ));
        assert!(matches!(
            peer_identity(&cert_with_sans(vec![])),
            Err(CertError::NoUriSan)
        ));
        for bad in [
            "SPIFFE://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns/a%2Fb/sa/c",
        ] {
            let der = cert_with_sans(vec![uri(bad)]);
            assert!(
                matches!(peer_identity(&der), Err(CertError::BadSan { .. })),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn nul_in_san_is_rejected() {
        // IA5String admits NUL, so a certificate can carry one; it must not become an identity.
        let der = cert_with_sans(vec![uri("spiffe://cluster.local/ns/a\0x/sa/b")]);
        assert!(matches!(peer_identity(&der), Err(CertError::BadSan { .. })));
    }
}
