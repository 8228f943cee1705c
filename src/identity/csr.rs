//! What a CA accepts as a certificate signing request, checked before anything is signed.
//!
//! A CSR is hostile input from a node that has only proved it holds a bootstrap token, so the
//! checks fail closed and each names what was wrong: one PEM `CERTIFICATE REQUEST` block of at
//! most [`MAX_CSR_BYTES`], a signature that verifies with the key it carries (proof the node
//! holds that key), exactly one subject alternative name which is a URI and a SPIFFE identity
//! in the CA's trust domain, and an ECDSA P-256 key (the only key type nodes generate, as
//! istiod's workload certificates). The CSR's subject, key usages and other requested
//! extensions are ignored: the CA decides the certificate's shape, the CSR only contributes the
//! key and the name asked for (which the caller still has to be authorized for).

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use super::SpiffeId;

/// Largest CSR accepted, PEM text included. A P-256 CSR with one SPIFFE URI is under 600 bytes;
/// 16 KiB leaves room for a long identity and odd encoders, and bounds the parse.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is {0} bytes; the limit is {MAX_CSR_BYTES}")]
    TooLarge(usize),
    #[error("the CSR is not one PEM CERTIFICATE REQUEST block: {0}")]
    Pem(String),
    #[error("the CSR is not a PKCS#10 request: {0}")]
    Parse(String),
    #[error("the CSR's signature does not verify with the key it carries")]
    Signature,
    #[error("the CSR must carry exactly one subject alternative name (the identity); it has {0}")]
    SanCount(usize),
    #[error("the CSR's subject alternative name must be a URI (the identity), not {0}")]
    SanType(String),
    #[error("the CSR's URI SAN {uri:?} is not a SPIFFE identity: {reason}")]
    Spiffe { uri: String, reason: String },
    #[error("the CSR asks for {identity}, outside this CA's trust domain {trust_domain}")]
    TrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error("the CSR's key must be ECDSA P-256; it is {0}")]
    KeyType(String),
    #[error("the CSR carries an extension this CA does not accept: {0}")]
    Extension(String),
}

/// A CSR that passed every check: the identity it asks for and the key to certify.
pub struct CheckedCsr {
    pub identity: SpiffeId,
    pub(crate) public_key: rcgen::PublicKey,
}

impl std::fmt::Debug for CheckedCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckedCsr")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Checks a PEM CSR for a CA of `trust_domain` (see the module doc for the rules).
pub fn check_csr(pem: &str, trust_domain: &str) -> Result<CheckedCsr, CsrError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(pem.len()));
    }
    let mut blocks = CertificateSigningRequestDer::pem_slice_iter(pem.as_bytes());
    let der = match (blocks.next(), blocks.next()) {
        (Some(Ok(der)), None) => der,
        (Some(Err(e)), _) => return Err(CsrError::Pem(e.to_string())),
        (None, _) => return Err(CsrError::Pem("no such block found".into())),
        (Some(Ok(_)), Some(_)) => return Err(CsrError::Pem("more than one block".into())),
    };
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Parse("trailing bytes after the request".into()));
    }
    csr.verify_signature().map_err(|_| CsrError::Signature)?;

    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve.as_ref() != Some(&OID_EC_P256)
    {
        let what = match curve {
            Some(c) => format!("{} on curve {}", spki.algorithm.algorithm, c),
            None => format!("algorithm {}", spki.algorithm.algorithm),
        };
        return Err(CsrError::KeyType(what));
    }

    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            names.extend(san.general_names.iter());
        }
    }
    let uri = match names.as_slice() {
        [GeneralName::URI(uri)] => *uri,
        [other] => return Err(CsrError::SanType(general_name_kind(other))),
        _ => return Err(CsrError::SanCount(names.len())),
    };
    let identity = SpiffeId::parse(uri).map_err(|e| CsrError::Spiffe {
        uri: uri.to_string(),
        reason: e.to_string(),
    })?;
    if identity.trust_domain != trust_domain {
        return Err(CsrError::TrustDomain {
            identity: identity.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }
    // rcgen re-parses (and re-verifies) to hand back the key in the form it signs with; it
    // refuses extensions it does not know, which is right for a CA too.
    let params = rcgen::CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| CsrError::Extension(e.to_string()))?;
    Ok(CheckedCsr {
        identity,
        public_key: params.public_key,
    })
}

fn general_name_kind(n: &GeneralName) -> String {
    match n {
        GeneralName::DNSName(d) => format!("the DNS name {d:?}"),
        GeneralName::RFC822Name(m) => format!("the e-mail address {m:?}"),
        GeneralName::IPAddress(_) => "an IP address".into(),
        GeneralName::DirectoryName(_) => "a directory name".into(),
        _ => "an unsupported name type".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256,
        PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    };

    const TD: &str = "cluster.local";

    fn csr(sans: Vec<SanType>, key: &KeyPair) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn p256() -> KeyPair {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/db";

    #[test]
    fn the_node_clients_csr_passes() {
        // The CSR the CA client sends is exactly what this CA accepts.
        let key = p256();
        let id = SpiffeId::parse(ID).unwrap();
        let pem = crate::identity::caclient::csr_pem(&id, &key).unwrap();
        let checked = check_csr(&pem, TD).unwrap();
        assert_eq!(checked.identity, id);
        assert_eq!(
            rcgen::PublicKeyData::der_bytes(&checked.public_key),
            key.public_key_raw()
        );
    }

    #[test]
    fn each_broken_csr_is_refused_naming_the_problem() {
        let key = p256();
        let big = format!("{}{}", csr(vec![uri(ID)], &key), " ".repeat(MAX_CSR_BYTES));
        let two = csr(vec![uri(ID), uri(ID)], &key);
        let dns = csr(vec![SanType::DnsName("db.shop".try_into().unwrap())], &key);
        let none = csr(vec![], &key);
        let not_spiffe = csr(vec![uri("https://cluster.local/ns/shop/sa/db")], &key);
        let other_td = csr(vec![uri("spiffe://evil.example/ns/shop/sa/db")], &key);
        let p384 = csr(
            vec![uri(ID)],
            &KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap(),
        );
        let ed = csr(
            vec![uri(ID)],
            &KeyPair::generate_for(&PKCS_ED25519).unwrap(),
        );
        let twice = format!("{}{}", csr(vec![uri(ID)], &key), csr(vec![uri(ID)], &key));
        let cert_block = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let garbage_body =
            "-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE REQUEST-----\n";
        let cases: Vec<(&str, String, &str)> = vec![
            ("oversized", big, "limit is 16384"),
            ("two SANs", two, "(the identity); it has 2"),
            ("no SAN", none, "it has 0"),
            ("DNS SAN", dns, "not the DNS name \"db.shop\""),
            ("not SPIFFE", not_spiffe, "is not a SPIFFE identity"),
            (
                "other trust domain",
                other_td,
                "outside this CA's trust domain cluster.local",
            ),
            ("P-384 key", p384, "must be ECDSA P-256"),
            ("Ed25519 key", ed, "must be ECDSA P-256"),
            ("two blocks", twice, "more than one block"),
            ("no CSR block", cert_block.into(), "no such block"),
            (
                "garbage",
                "hello".into(),
                "not one PEM CERTIFICATE REQUEST block",
            ),
            ("garbage body", garbage_body.into(), "not a PKCS#10 request"),
        ];
        for (what, pem, want) in cases {
            let e = check_csr(&pem, TD).unwrap_err().to_string();
            assert!(e.contains(want), "{what}: {e}");
        }
    }

    #[test]
    fn a_tampered_csr_fails_its_signature_check() {
        // Same key and signature, another name: the signature no longer covers the request.
        let key = p256();
        let good = csr(vec![uri(ID)], &key);
        let der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let needle = b"ns/shop/sa/db";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap();
        bytes[at..at + needle.len()].copy_from_slice(b"ns/shop/sa/dc");
        let tampered = to_pem(&bytes);
        assert_eq!(check_csr(&tampered, TD).unwrap_err(), CsrError::Signature);
        // rcgen's own parser (used for the key) verifies it as well.
        assert!(rcgen::CertificateSigningRequestParams::from_pem(&tampered).is_err());
        assert!(rcgen::CertificateSigningRequestParams::from_pem(&good).is_ok());
    }

    fn to_pem(der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE REQUEST-----\n");
        out
    }
}
