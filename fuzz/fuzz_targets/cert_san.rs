//! The SAN extraction from a peer certificate (`zmesh::identity::peer_identity`).
//!
//! Input, either:
//! - DER (starts with 0x30, an ASN.1 SEQUENCE): the certificate bytes as a peer would send them;
//! - text, one SAN a line, `U<uri>`, `D<dns name>`, `E<email>` or `I<ip>`: a certificate with
//!   those SANs is made (rcgen, one key per process) and then read back, which reaches the SAN
//!   walk that random DER rarely gets through to.
//!
//! Properties: no panic; for a made certificate the result is what its URI SANs call for:
//! none is `NoUriSan`, two or more `ManyUriSans`, exactly one is `SpiffeId::parse` of it.
//!
//! Seeds: certificates are never committed. With `ZMESH_FUZZ_CERT_SEEDS=<dir>` set (as
//! `scripts/fuzz.sh` does), the target writes freshly made DER certificates into `<dir>` at start,
//! before libFuzzer reads its corpus.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, Ia5String, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use zmesh::identity::{peer_identity, CertError, SpiffeId};

fn key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| KeyPair::generate().expect("generate a P-256 key"))
}

/// A self-signed certificate with these SAN lines, or None when rcgen refuses one of them.
fn make(lines: &str) -> Option<(Vec<u8>, Vec<String>)> {
    let mut params = CertificateParams::default();
    let mut uris = Vec::new();
    for line in lines.lines() {
        let mut chars = line.chars();
        let kind = chars.next()?;
        let value = chars.as_str();
        let san = match kind {
            'U' => {
                uris.push(value.to_string());
                SanType::URI(Ia5String::try_from(value).ok()?)
            }
            'D' => SanType::DnsName(Ia5String::try_from(value).ok()?),
            'E' => SanType::Rfc822Name(Ia5String::try_from(value).ok()?),
            'I' => SanType::IpAddress(value.parse::<IpAddr>().ok()?),
            _ => return None,
        };
        params.subject_alt_names.push(san);
    }
    let cert = params.self_signed(key()).ok()?;
    Some((cert.der().to_vec(), uris))
}

fn write_seeds(dir: &str) {
    let sets = [
        "Uspiffe://cluster.local/ns/default/sa/frontend",
        "Uspiffe://cluster.local/ns/a/sa/b\nUspiffe://cluster.local/ns/c/sa/d",
        "Dfrontend.default.svc.cluster.local\nI10.0.0.1",
        "Uspiffe://Cluster.local/ns/%61/sa/b\nEops@example.com",
        "",
    ];
    std::fs::create_dir_all(dir).expect("create the certificate seed directory");
    for (i, set) in sets.iter().enumerate() {
        let (der, _) = make(set).expect("seed certificate");
        let path = format!("{dir}/generated-cert-{i}.der");
        std::fs::write(&path, der).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
}

fuzz_target!(
    init: {
        if let Ok(dir) = std::env::var("ZMESH_FUZZ_CERT_SEEDS") {
            write_seeds(&dir);
        }
    },
    |data: &[u8]| {
        if data.first() == Some(&0x30) {
            let _ = peer_identity(&CertificateDer::from(data));
            return;
        }
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let Some((der, uris)) = make(text) else {
            return;
        };
        let got = peer_identity(&CertificateDer::from(der));
        match (uris.as_slice(), got) {
            ([], Err(CertError::NoUriSan)) => {}
            ([one], Ok(id)) => assert_eq!(SpiffeId::parse(one), Ok(id)),
            ([one], Err(CertError::BadSan { source, .. })) => {
                assert_eq!(SpiffeId::parse(one), Err(source))
            }
            (many, Err(CertError::ManyUriSans(n))) if many.len() > 1 => assert_eq!(n, many.len()),
            (uris, other) => panic!("SANs {uris:?} read back as {other:?}"),
        }
    }
);
