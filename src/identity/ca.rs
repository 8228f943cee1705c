//! The built-in file CA, for standalone use (VMs, demos, tests) where no Istio CA is reachable.
//!
//! A directory holds the CA certificate and key plus the trust bundle. The node issues short-lived
//! ECDSA P-256 leaf certificates, one per SPIFFE identity of its local workloads, exactly in the
//! shape istiod issues them: one URI SAN, client+server auth EKUs, no CN that anyone checks.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::cert::{load_certs_pem, CertError};
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

/// A CA loaded from a directory.
pub struct FileCa {
    dir: PathBuf,
    issuer: rcgen::Certificate,
    issuer_key: KeyPair,
    /// Sent after the leaf when the CA is an intermediate (empty when the CA is a root itself).
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
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
        let intermediates = ca_chain
            .into_iter()
            .filter(|c| !roots.iter().any(|r| r == c))
            .collect();
        Ok(FileCa {
            dir: dir.to_path_buf(),
            issuer,
            issuer_key,
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

    /// Issues a leaf for `id`, valid for `ttl` from `now` (the node's clock).
    pub fn issue_at(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        let fail = |e: rcgen::Error| CaError::Issue {
            identity: id.to_string(),
            detail: e.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(fail)?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serial: [u8; 16] = rand::random();
        // A positive serial: clear the top bit so DER does not need a sign byte.
        let mut serial = serial.to_vec();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let not_before = now - BACKDATE;
        let not_after = now + ttl;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&key, &self.issuer, &self.issuer_key)
            .map_err(fail)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(Issued {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}
