//! The built-in file CA, for standalone use (VMs, demos, tests) where no Istio CA is reachable.
//!
//! A directory holds the CA certificate and key plus the trust bundle. The node issues short-lived
//! ECDSA P-256 leaf certificates, one per SPIFFE identity of its local workloads, exactly in the
//! shape istiod issues them: one URI SAN, client+server auth EKUs, no CN that anyone checks.
//!
//! Either each node holds the directory and issues its own leaves (`file_ca`: dev only, the CA
//! key is on every node), or one `zmesh-node ca serve` holds it and signs the nodes' checked
//! CSRs ([`FileCa::sign_csr`], `controlplane::ca_server`), so no node holds the key.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::cert::{load_certs_pem, CertError};
use super::csr::CheckedCsr;
use super::SpiffeId;

pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The trust bundle. It may hold several roots so a root can be rotated without an outage.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Leaf certificates are backdated so that a peer whose clock is slightly behind still accepts
/// them; istiod uses the same grace.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// The dev CA lives ten years: it is for standalone meshes, not for production PKI.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a CA (remove it first)")]
    Exists { path: String },
    #[error("CA key {path} is not a usable PEM key: {detail}")]
    Key { path: String, detail: String },
    #[error("CA certificate {path} cannot be used for signing: {detail}")]
    Cert { path: String, detail: String },
    #[error(transparent)]
    Pem(#[from] CertError),
    #[error("issuing a certificate for {identity} failed: {detail}")]
    Issue { identity: String, detail: String },
}

/// A leaf certificate freshly issued by the CA.
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

/// A leaf signed for a key held elsewhere (a CSR's).
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    /// The leaf, then the intermediates (the root is not included).
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

impl SignedLeaf {
    fn with_key(self, key: &KeyPair) -> Issued {
        Issued {
            chain: self.chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: self.not_before,
            not_after: self.not_after,
            serial: self.serial,
        }
    }
}

/// What a leaf certifies.
enum Leaf<'a> {
    /// A workload identity (URI SAN), for mTLS both ways.
    Workload(&'a SpiffeId),
    /// DNS names, for a TLS server.
    Server(&'a [String]),
}

fn new_key(label: &str) -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Issue {
        identity: label.to_string(),
        detail: e.to_string(),
    })
}

/// A CA loaded from a directory.
pub struct FileCa {
    dir: PathBuf,
    issuer: rcgen::Certificate,
    issuer_key: KeyPair,
    /// The CA's own certificate (the first of ca-cert.pem).
    ca_cert: CertificateDer<'static>,
    /// Sent after the leaf when the CA is an intermediate (empty when the CA is a root itself).
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for FileCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("FileCa")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CaError + 'a {
    move |source| CaError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

impl FileCa {
    /// Creates a new self-signed dev CA in `dir` (`zmesh-node ca init`).
    pub fn init(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        for f in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE] {
            let p = dir.join(f);
            if p.exists() {
                return Err(CaError::Exists {
                    path: p.display().to_string(),
                });
            }
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Issue {
            identity: "CA".into(),
            detail: e.to_string(),
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        // A random tag makes every CA's name unique: during a root rotation two roots are
        // trusted at once, and chain building and CRL matching go by issuer name.
        let tag: u32 = rand::random();
        dn.push(
            DnType::CommonName,
            format!("zmesh root CA ({trust_domain}) {tag:08x}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_LIFETIME).into();
        let cert = params.self_signed(&key).map_err(|e| CaError::Issue {
            identity: "CA".into(),
            detail: e.to_string(),
        })?;
        let write = |name: &str, body: &str, mode: u32| -> Result<(), CaError> {
            use std::os::unix::fs::OpenOptionsExt;
            let p = dir.join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&p)
                .map_err(io_err("create", &p))?;
            std::io::Write::write_all(&mut f, body.as_bytes()).map_err(io_err("write", &p))
        };
        write(CA_KEY_FILE, &key.serialize_pem(), 0o600)?;
        write(CA_CERT_FILE, &cert.pem(), 0o644)?;
        write(ROOT_CERT_FILE, &cert.pem(), 0o644)?;
        Ok(())
    }

    /// Loads a CA directory written by `init` (or by hand, with an intermediate CA and a bundle).
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err("read", &cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err("read", &key_path))?;
        let issuer_key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Key {
            path: key_path.display().to_string(),
            detail: e.to_string(),
        })?;
        let ca_chain = load_certs_pem(&cert_path)?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| CaError::Cert {
            path: cert_path.display().to_string(),
            detail: e.to_string(),
        })?;
        // rcgen needs an issuer `Certificate` value for its name and key id; re-signing the
        // parameters yields one whose subject equals the real CA's. Only its DN and key are used.
        let issuer = params.self_signed(&issuer_key).map_err(|e| CaError::Cert {
            path: cert_path.display().to_string(),
            detail: e.to_string(),
        })?;
        let roots = load_certs_pem(&dir.join(ROOT_CERT_FILE))?;
        let ca_cert = ca_chain.first().cloned().ok_or_else(|| CaError::Cert {
            path: cert_path.display().to_string(),
            detail: "no certificate in the file".into(),
        })?;
        let intermediates = ca_chain
            .into_iter()
            .filter(|c| !roots.iter().any(|r| r == c))
            .collect();
        Ok(FileCa {
            dir: dir.to_path_buf(),
            issuer,
            issuer_key,
            ca_cert,
            intermediates,
            roots,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The trust bundle every node of this mesh verifies peers against.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// A CRL signed by this CA revoking the leaves with these serials (hex, as logged and shown
    /// in the admin dump), valid for `validity` from `now`. `zmesh-node ca crl` writes one.
    pub fn crl_pem(
        &self,
        serials: &[String],
        now: SystemTime,
        validity: Duration,
    ) -> Result<String, CaError> {
        let fail = |detail: String| CaError::Issue {
            identity: "CRL".into(),
            detail,
        };
        let mut revoked = Vec::new();
        for s in serials {
            let bytes = (0..s.len())
                .step_by(2)
                .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
                .collect::<Option<Vec<u8>>>()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| fail(format!("serial {s:?} is not an even-length hex string")))?;
            revoked.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: now.into(),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
        let number: [u8; 8] = rand::random();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now.into(),
            next_update: (now + validity).into(),
            crl_number: SerialNumber::from_slice(&number[..]),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: self.issuer.params().key_identifier_method.clone(),
        };
        let crl = params
            .signed_by(&self.issuer, &self.issuer_key)
            .map_err(|e| fail(e.to_string()))?;
        crl.pem().map_err(|e| fail(e.to_string()))
    }

    /// Issues a leaf for `id`, valid for `ttl` from now.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Issued, CaError> {
        self.issue_at(id, ttl, SystemTime::now())
    }

    /// Issues a leaf for `id`, valid for `ttl` from `now` (the node's clock). The key is
    /// generated here, for a node that holds the CA itself (the dev-only file CA).
    pub fn issue_at(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        let key = new_key(&id.to_string())?;
        let leaf = self.sign_leaf(&id.to_string(), Leaf::Workload(id), &key, ttl, now)?;
        Ok(leaf.with_key(&key))
    }

    /// Signs a checked CSR (`check_csr`): the certificate has the same shape as `issue_at`'s,
    /// for the CSR's identity and key, valid for `ttl` from `now`. The CSR only contributes
    /// its key and identity; whether the caller may have that identity is the caller's check.
    pub fn sign_csr(
        &self,
        csr: &CheckedCsr,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<SignedLeaf, CaError> {
        let label = csr.identity.to_string();
        self.sign_leaf(
            &label,
            Leaf::Workload(&csr.identity),
            &csr.public_key,
            ttl,
            now,
        )
    }

    /// A TLS server certificate for `dns_names` with a key generated here (the CA server's
    /// own serving certificate: it never leaves the process).
    pub fn issue_server_at(
        &self,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        let label = dns_names.join(",");
        let key = new_key(&label)?;
        let leaf = self.sign_leaf(&label, Leaf::Server(dns_names), &key, ttl, now)?;
        Ok(leaf.with_key(&key))
    }

    /// The root that anchors this CA's chain: the CA certificate itself when it is a root,
    /// else the bundle root whose subject issued the top of the chain (during a root
    /// rotation the bundle holds several).
    pub fn anchor(&self) -> Option<&CertificateDer<'static>> {
        if let Some(r) = self.roots.iter().find(|r| *r == &self.ca_cert) {
            return Some(r);
        }
        let top = self.intermediates.last().unwrap_or(&self.ca_cert);
        let issuer = x509_parser::parse_x509_certificate(top)
            .ok()
            .map(|(_, c)| c.issuer().as_raw().to_vec())?;
        self.roots.iter().find(|r| {
            x509_parser::parse_x509_certificate(r)
                .map(|(_, c)| c.subject().as_raw() == issuer.as_slice())
                .unwrap_or(false)
        })
    }

    /// The one place a leaf's shape is decided: no subject, one SAN, a random positive
    /// 128-bit serial, backdated by [`BACKDATE`], signed by the CA; the chain is the leaf then
    /// the intermediates.
    fn sign_leaf(
        &self,
        label: &str,
        leaf: Leaf<'_>,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<SignedLeaf, CaError> {
        let fail = |e: rcgen::Error| CaError::Issue {
            identity: label.to_string(),
            detail: e.to_string(),
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        match leaf {
            Leaf::Workload(id) => {
                params.subject_alt_names =
                    vec![SanType::URI(id.to_string().try_into().map_err(fail)?)];
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }
            Leaf::Server(names) => {
                for n in names {
                    params
                        .subject_alt_names
                        .push(SanType::DnsName(n.clone().try_into().map_err(fail)?));
                }
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
        }
        let serial = positive_serial(rand::random());
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let not_before = now - BACKDATE;
        let not_after = now + ttl;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(public_key, &self.issuer, &self.issuer_key)
            .map_err(fail)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(SignedLeaf {
            chain,
            not_before,
            not_after,
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

/// A 16-byte serial DER encodes as exactly these bytes: the top bit is cleared (no sign byte)
/// and the first byte is never zero (DER drops a leading zero, and the hex string logged, shown
/// and revoked by would then not match the one in the certificate).
fn positive_serial(random: [u8; 16]) -> Vec<u8> {
    let mut serial = random.to_vec();
    serial[0] = (serial[0] & 0x7f).max(1);
    serial
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serial_reported_is_the_serial_in_the_certificate_even_with_a_zero_first_byte() {
        for first in [0x00, 0x01, 0x7f, 0x80, 0xff] {
            let mut random = [0xa5u8; 16];
            random[0] = first;
            let serial = positive_serial(random);
            let mut params = CertificateParams::default();
            params.serial_number = Some(SerialNumber::from_slice(&serial));
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let (_, x) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
            assert_eq!(x.raw_serial(), serial.as_slice(), "first byte {first:#04x}");
            assert_eq!(serial.len(), 16);
        }
    }
}
