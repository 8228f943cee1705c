//! What a node trusts, and what time it is.
//!
//! A `Trust` is one immutable snapshot of the trust bundle (every root the mesh accepts, several
//! during a root rotation), the certificate revocation lists, the crypto provider and the clock.
//! Reloading the config builds a new snapshot and swaps it in; connections made under the old one
//! are re-checked against the new one (`verify_chain` at their original handshake time), so a
//! peer whose chain has just been revoked is cut while one whose certificate merely expired is not.
//!
//! The clock is injectable so certificate rotation and expiry are tested with a stepped clock
//! instead of sleeps: the same clock decides renewal, stamps issued certificates and drives
//! rustls' validity checks, so every part of a node agrees on "now".

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

/// Where "now" comes from.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to (tests): starts at the real time of its creation.
#[derive(Debug)]
pub struct ManualClock {
    start: SystemTime,
    offset_ms: AtomicU64,
}

impl ManualClock {
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock {
            start: SystemTime::now(),
            offset_ms: AtomicU64::new(0),
        })
    }

    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as u64, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.start + Duration::from_millis(self.offset_ms.load(Ordering::Acquire))
    }
}

/// Lets rustls check certificate validity with the node's clock.
#[derive(Debug)]
pub(crate) struct RustlsTime(pub Arc<dyn Clock>);

impl rustls::time_provider::TimeProvider for RustlsTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(unix_time(self.0.now()))
    }
}

pub fn unix_time(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default())
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("trust bundle holds no usable root: {0}")]
    Roots(String),
    #[error("cannot read CRL file {path}: {detail}")]
    Crl { path: String, detail: String },
}

/// Intermediates a peer may send with its leaf. webpki builds paths of at most six
/// intermediates and a peer may add its root too, so a longer chain can never verify; yet each
/// extra certificate that names a plausible issuer multiplies the paths webpki would try
/// (reliability #20: sixty intermediates sharing one subject spend webpki's whole budget of
/// 200,000 path-building calls on one handshake). Refused before any path is built.
pub const MAX_PEER_INTERMEDIATES: usize = 7;

/// A peer chain longer than [`MAX_PEER_INTERMEDIATES`].
#[derive(thiserror::Error)]
#[error("peer sent {0} intermediate certificates; at most {MAX_PEER_INTERMEDIATES} are accepted")]
pub struct ChainTooLong(pub usize);

// rustls prints `OtherError` with `{:?}`: make that the sentence too.
impl fmt::Debug for ChainTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Which end of a connection a chain is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The peer is a server (we dialed it): the leaf needs the serverAuth EKU.
    Server,
    /// The peer is a client (it dialed us): the leaf needs the clientAuth EKU.
    Client,
}

/// One snapshot of roots, CRLs, provider and clock.
pub struct Trust {
    roots: Arc<RootCertStore>,
    crls: Vec<CertRevocationList<'static>>,
    provider: Arc<CryptoProvider>,
    clock: Arc<dyn Clock>,
    /// The DER of every root and CRL, to tell whether a reload changed anything.
    inputs: Vec<Vec<u8>>,
    /// Bumped by every reload that changed roots or CRLs, so caches built on an older
    /// snapshot can tell.
    pub generation: u64,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("roots", &self.roots.len())
            .field("crls", &self.crls.len())
            .field("generation", &self.generation)
            .finish()
    }
}

impl Trust {
    /// Every parsable certificate in `roots` becomes a trust anchor; at least one must.
    pub fn new(
        roots: &[CertificateDer<'static>],
        crls: Vec<CertificateRevocationListDer<'static>>,
        provider: Arc<CryptoProvider>,
        clock: Arc<dyn Clock>,
    ) -> Result<Trust, TrustError> {
        let parsed = crls
            .iter()
            .enumerate()
            .map(|(i, d)| parse_crl(i, d.as_ref()).map(CertRevocationList::from))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|detail| TrustError::Crl {
                path: "<CRL>".into(),
                detail,
            })?;
        let mut store = RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(roots.iter().cloned());
        if added == 0 {
            return Err(TrustError::Roots(format!(
                "{ignored} certificate(s) could not be parsed as trust anchors"
            )));
        }
        let inputs = roots
            .iter()
            .map(|r| r.to_vec())
            .chain(crls.iter().map(|c| c.to_vec()))
            .collect();
        Ok(Trust {
            roots: Arc::new(store),
            crls: parsed,
            provider,
            clock,
            inputs,
            generation: 0,
        })
    }

    /// Whether `other` holds the same roots and CRLs.
    pub fn same_material(&self, other: &Trust) -> bool {
        self.inputs == other.inputs
    }

    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    pub fn crl_count(&self) -> usize {
        self.crls.len()
    }

    /// Checks that `end_entity` chains to one of our roots for `usage` at `at`, and that no
    /// certificate of the chain is revoked by our CRLs. The SPIFFE identity is checked by the
    /// callers (tls.rs), on top of this.
    pub fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        at: UnixTime,
        usage: Usage,
    ) -> Result<(), rustls::Error> {
        if intermediates.len() > MAX_PEER_INTERMEDIATES {
            let e = ChainTooLong(intermediates.len());
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(e)),
            )));
        }
        let cert = EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let crl_refs: Vec<&CertRevocationList<'static>> = self.crls.iter().collect();
        // Certificates a CRL does not cover (another issuer's) are not failed for it; an expired
        // CRL is still applied: a stale revocation is better than none.
        let revocation = RevocationOptionsBuilder::new(&crl_refs).ok().map(|b| {
            b.with_depth(RevocationCheckDepth::Chain)
                .with_status_policy(UnknownStatusPolicy::Allow)
                .with_expiration_policy(ExpirationPolicy::Ignore)
                .build()
        });
        let eku = match usage {
            Usage::Server => KeyUsage::server_auth(),
            Usage::Client => KeyUsage::client_auth(),
        };
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            at,
            eku,
            revocation,
            None,
        )
        .map(|_| ())
        .map_err(pki_error)
    }
}

/// rustls keeps its webpki error mapping private; this is the part a peer can trigger.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let c = match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::CertRevoked => CertificateError::Revoked,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(rustls::OtherError(Arc::new(PkiError(other)))),
    };
    rustls::Error::InvalidCertificate(c)
}

#[derive(Debug)]
struct PkiError(webpki::Error);

impl fmt::Display for PkiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::error::Error for PkiError {}

fn parse_crl(index: usize, der: &[u8]) -> Result<OwnedCertRevocationList, String> {
    OwnedCertRevocationList::from_der(der)
        .map_err(|e| format!("CRL #{} is not a valid CRL: {e:?}", index + 1))
}

/// Reads CRLs from a file of PEM `X509 CRL` blocks, or one DER CRL, checking that each parses.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TrustError> {
    use rustls_pki_types::pem::PemObject;
    let fail = |detail: String| TrustError::Crl {
        path: path.display().to_string(),
        detail,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let ders: Vec<CertificateRevocationListDer<'static>> = if bytes.starts_with(b"-----") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| fail(format!("bad PEM: {e}")))?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    if ders.is_empty() {
        return Err(fail("no X509 CRL block found".into()));
    }
    for (i, d) in ders.iter().enumerate() {
        parse_crl(i, d.as_ref()).map_err(fail)?;
    }
    Ok(ders)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{FileCa, SpiffeId};

    fn ca(dir: &Path, name: &str) -> FileCa {
        let d = dir.join(name);
        FileCa::init(&d, "cluster.local").unwrap();
        FileCa::load(&d).unwrap()
    }

    fn crl(ca: &FileCa, serials: &[String]) -> CertificateRevocationListDer<'static> {
        use rustls_pki_types::pem::PemObject;
        let pem = ca
            .crl_pem(serials, SystemTime::now(), Duration::from_secs(3600))
            .unwrap();
        CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn chains_are_checked_against_every_root_and_every_crl() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (ca(dir.path(), "one"), ca(dir.path(), "two"));
        let id = SpiffeId::new("cluster.local", "ns", "sa").unwrap();
        let leaf1 = one.issue(&id, Duration::from_secs(3600)).unwrap();
        let leaf2 = two.issue(&id, Duration::from_secs(3600)).unwrap();
        let now = unix_time(SystemTime::now());
        let roots: Vec<_> = one.roots().iter().chain(two.roots()).cloned().collect();
        let trust =
            |crls| Trust::new(&roots, crls, crate::tls::provider(), Arc::new(SystemClock)).unwrap();
        let check = |t: &Trust, leaf: &crate::identity::Issued, usage| {
            t.verify_chain(&leaf.chain[0], &leaf.chain[1..], now, usage)
        };

        // Two roots: leaves of both verify, for both usages.
        let plain = trust(vec![]);
        for leaf in [&leaf1, &leaf2] {
            assert!(check(&plain, leaf, Usage::Client).is_ok());
            assert!(check(&plain, leaf, Usage::Server).is_ok());
        }
        // Only the first root: the second CA's leaf is unknown.
        let only_one = Trust::new(
            one.roots(),
            vec![],
            crate::tls::provider(),
            Arc::new(SystemClock),
        )
        .unwrap();
        assert!(
            matches!(
                check(&only_one, &leaf2, Usage::Client),
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer
                ))
            ),
            "{:?}",
            check(&only_one, &leaf2, Usage::Client)
        );

        // CA one revokes its leaf: only that leaf fails; CA two's leaf (not covered) passes.
        let revoking = trust(vec![
            crl(&one, std::slice::from_ref(&leaf1.serial)),
            crl(&two, &[]),
        ]);
        assert!(matches!(
            check(&revoking, &leaf1, Usage::Client),
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
        ));
        assert!(check(&revoking, &leaf2, Usage::Client).is_ok());
        // A CRL revoking other serials changes nothing.
        let other = trust(vec![crl(&one, &["0badc0de".into()])]);
        assert!(check(&other, &leaf1, Usage::Server).is_ok());
        // Change detection compares material, not object identity.
        assert!(plain.same_material(&trust(vec![])));
        assert!(!plain.same_material(&other));
    }

    /// A one-hour leaf of CA "one" in `dir`, and a trust holding only that CA's roots.
    fn leaf_and_trust(dir: &std::path::Path) -> (crate::identity::ca::Issued, Trust) {
        let one = ca(dir, "one");
        let id = SpiffeId::new("cluster.local", "ns", "sa").unwrap();
        let leaf = one.issue(&id, Duration::from_secs(3600)).unwrap();
        let t = Trust::new(
            one.roots(),
            vec![],
            crate::tls::provider(),
            Arc::new(SystemClock),
        )
        .unwrap();
        (leaf, t)
    }

    #[test]
    fn expiry_is_judged_at_the_time_given() {
        let dir = tempfile::tempdir().unwrap();
        let (leaf, t) = leaf_and_trust(dir.path());
        let later = unix_time(leaf.not_after + Duration::from_secs(1));
        assert!(matches!(
            t.verify_chain(&leaf.chain[0], &[], later, Usage::Client),
            Err(rustls::Error::InvalidCertificate(CertificateError::Expired))
        ));
        let during = unix_time(leaf.not_before + Duration::from_secs(60));
        assert!(t
            .verify_chain(&leaf.chain[0], &[], during, Usage::Client)
            .is_ok());
    }

    #[test]
    fn chains_longer_than_the_cap_are_refused_before_path_building() {
        let dir = tempfile::tempdir().unwrap();
        let (leaf, t) = leaf_and_trust(dir.path());
        let now = unix_time(SystemTime::now());
        // Unneeded extras up to the cap are ignored by path building: the chain verifies.
        let extras = vec![leaf.chain[0].clone(); MAX_PEER_INTERMEDIATES];
        assert!(t
            .verify_chain(&leaf.chain[0], &extras, now, Usage::Client)
            .is_ok());
        // One more and the chain is refused, saying why.
        let extras = vec![leaf.chain[0].clone(); MAX_PEER_INTERMEDIATES + 1];
        let e = t
            .verify_chain(&leaf.chain[0], &extras, now, Usage::Client)
            .unwrap_err();
        assert!(
            format!("{e}").contains("peer sent 8 intermediate certificates; at most 7"),
            "{e}"
        );
    }

    #[test]
    fn crl_files_that_are_not_crls_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("crl.pem");
        std::fs::write(
            &p,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load_crls(&p).unwrap_err().to_string();
        assert!(e.contains("crl.pem") && e.contains("no X509 CRL"), "{e}");
        std::fs::write(&p, [0x30u8, 0x03, 0x02, 0x01, 0x01]).unwrap();
        let e = load_crls(&p).unwrap_err().to_string();
        assert!(e.contains("not a valid CRL"), "{e}");
        let e = load_crls(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
