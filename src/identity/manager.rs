//! The certificate manager: one certificate per SPIFFE identity of the node's local workloads.
//!
//! Certificates are cached and renewed at half-life, the point istiod and ztunnel use, so a CA
//! outage of up to half a lifetime never expires a serving certificate. Renewal happens both in a
//! background loop and lazily on fetch, so a missed wake-up can never serve an expired leaf.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::ca::{CaError, FileCa};
use super::cert::{peer_identity, CertError};
use super::SpiffeId;

/// A leaf the node can present, with the validity it was issued for.
pub struct WorkloadCert {
    pub identity: SpiffeId,
    pub certified: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

impl WorkloadCert {
    /// The moment this certificate should be replaced: half of its lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// A certificate provisioned outside zmesh (Vault, cert-manager): used as is, never renewed here.
pub struct StaticCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Where leaf certificates come from.
pub enum CertSource {
    FileCa { ca: Box<FileCa>, ttl: Duration },
    Static(Vec<StaticCert>),
}

#[derive(Debug, thiserror::Error)]
pub enum CertManagerError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(
        "no certificate is configured for {0}: add it under node.certificates.static.identities"
    )]
    NoStaticCert(String),
    #[error("key for {identity} is unusable: {detail}")]
    Key { identity: String, detail: String },
    #[error("trust bundle holds no usable root: {0}")]
    Roots(String),
}

pub struct CertManager {
    source: CertSource,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    cache: Mutex<HashMap<SpiffeId, Arc<WorkloadCert>>>,
}

impl CertManager {
    pub fn new(
        source: CertSource,
        roots: &[CertificateDer<'static>],
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, CertManagerError> {
        let mut store = RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(roots.iter().cloned());
        if added == 0 {
            return Err(CertManagerError::Roots(format!(
                "{ignored} certificate(s) could not be parsed as trust anchors"
            )));
        }
        let mgr = CertManager {
            source,
            roots: Arc::new(store),
            provider,
            cache: Mutex::new(HashMap::new()),
        };
        if let CertSource::Static(certs) = &mgr.source {
            // Load every static certificate now, so a bad file fails at start, not at first use.
            for c in certs {
                let wc = mgr.load_static(c)?;
                mgr.cache
                    .lock()
                    .expect("cert cache poisoned")
                    .insert(wc.identity.clone(), Arc::new(wc));
            }
        }
        Ok(mgr)
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    fn certified(
        &self,
        identity: &SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'static>,
    ) -> Result<Arc<CertifiedKey>, CertManagerError> {
        let signer = self
            .provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| CertManagerError::Key {
                identity: identity.to_string(),
                detail: e.to_string(),
            })?;
        Ok(Arc::new(CertifiedKey::new(chain, signer)))
    }

    fn load_static(&self, c: &StaticCert) -> Result<WorkloadCert, CertManagerError> {
        let leaf = c.chain.first().ok_or(CertError::NoUriSan)?;
        let identity = peer_identity(leaf)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| CertError::Parse(e.to_string()))?;
        let to_system = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        let serial = parsed.raw_serial_as_string().replace(':', "");
        Ok(WorkloadCert {
            certified: self.certified(&identity, c.chain.clone(), &c.key)?,
            not_before: to_system(parsed.validity().not_before),
            not_after: to_system(parsed.validity().not_after),
            identity,
            serial,
        })
    }

    /// The current certificate for `id`, issuing or renewing it when needed.
    pub fn fetch(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, CertManagerError> {
        self.fetch_at(id, SystemTime::now())
    }

    /// `fetch` as of `now`: lets tests step the clock instead of sleeping.
    pub fn fetch_at(
        &self,
        id: &SpiffeId,
        now: SystemTime,
    ) -> Result<Arc<WorkloadCert>, CertManagerError> {
        if let Some(c) = self.cache.lock().expect("cert cache poisoned").get(id) {
            let fresh = match self.source {
                CertSource::FileCa { .. } => now < c.refresh_at(),
                // Nothing to renew from: keep serving what the operator provisioned.
                CertSource::Static(_) => true,
            };
            if fresh {
                return Ok(c.clone());
            }
        }
        match &self.source {
            CertSource::FileCa { ca, ttl } => {
                let issued = ca.issue(id, *ttl)?;
                let wc = Arc::new(WorkloadCert {
                    certified: self.certified(id, issued.chain, &issued.key)?,
                    identity: id.clone(),
                    not_before: issued.not_before,
                    not_after: issued.not_after,
                    serial: issued.serial,
                });
                tracing::info!(identity = %id, serial = %wc.serial, "issued workload certificate");
                self.cache
                    .lock()
                    .expect("cert cache poisoned")
                    .insert(id.clone(), wc.clone());
                Ok(wc)
            }
            CertSource::Static(_) => Err(CertManagerError::NoStaticCert(id.to_string())),
        }
    }

    /// Forgets certificates of identities that no longer run on this node (file-CA mode).
    pub fn retain(&self, keep: &HashSet<SpiffeId>) {
        if matches!(self.source, CertSource::FileCa { .. }) {
            self.cache
                .lock()
                .expect("cert cache poisoned")
                .retain(|id, _| keep.contains(id));
        }
    }

    /// Snapshot of the cached certificates, for logs and (later) the admin config dump.
    pub fn cached(&self) -> Vec<Arc<WorkloadCert>> {
        let mut v: Vec<_> = self
            .cache
            .lock()
            .expect("cert cache poisoned")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    /// Renews cached certificates at half-life until the task is dropped.
    pub async fn run_renewals(self: Arc<Self>) {
        if !matches!(self.source, CertSource::FileCa { .. }) {
            return;
        }
        loop {
            let next = self
                .cached()
                .iter()
                .map(|c| c.refresh_at())
                .min()
                .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(60));
            let wait = next
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            for c in self.cached() {
                if SystemTime::now() >= c.refresh_at() {
                    if let Err(e) = self.fetch(&c.identity) {
                        tracing::warn!(identity = %c.identity, error = %e, "certificate renewal failed; serving the current one");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{FileCa, ROOT_CERT_FILE};

    fn manager(dir: &std::path::Path) -> CertManager {
        FileCa::init(dir, "cluster.local").unwrap();
        let ca = FileCa::load(dir).unwrap();
        let roots = ca.roots().to_vec();
        CertManager::new(
            CertSource::FileCa {
                ca: Box::new(ca),
                ttl: Duration::from_secs(24 * 3600),
            },
            &roots,
            crate::tls::provider(),
        )
        .unwrap()
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    #[test]
    fn file_ca_issues_one_p256_leaf_per_identity_and_caches_it() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        let a = m.fetch(&id("a")).unwrap();
        let again = m.fetch(&id("a")).unwrap();
        assert!(Arc::ptr_eq(&a, &again), "cached until half-life");
        assert_ne!(m.fetch(&id("b")).unwrap().serial, a.serial);

        let leaf = &a.certified.cert[0];
        assert_eq!(peer_identity(leaf).unwrap(), id("a"));
        let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        assert_eq!(
            x.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let life = a.not_after.duration_since(a.not_before).unwrap();
        // 24 h plus the 5-minute backdate.
        assert_eq!(life.as_secs(), 24 * 3600 + 300);
    }

    #[test]
    fn renews_at_half_life_and_forgets_departed_identities() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        let first = m.fetch(&id("a")).unwrap();
        let before_half = first.refresh_at() - Duration::from_secs(1);
        assert_eq!(
            m.fetch_at(&id("a"), before_half).unwrap().serial,
            first.serial
        );
        let after_half = first.refresh_at() + Duration::from_secs(1);
        let renewed = m.fetch_at(&id("a"), after_half).unwrap();
        assert_ne!(renewed.serial, first.serial, "renewed at half-life");
        assert_eq!(m.fetch(&id("a")).unwrap().serial, renewed.serial);

        m.fetch(&id("b")).unwrap();
        m.retain(&[id("b")].into_iter().collect());
        let left: Vec<_> = m.cached().iter().map(|c| c.identity.clone()).collect();
        assert_eq!(left, vec![id("b")]);
    }

    #[test]
    fn static_certificates_are_loaded_once_and_never_invented() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        FileCa::init(&ca_dir, "cluster.local").unwrap();
        let ca = FileCa::load(&ca_dir).unwrap();
        let issued = ca.issue(&id("vm"), Duration::from_secs(3600)).unwrap();
        let roots = crate::identity::load_certs_pem(&ca_dir.join(ROOT_CERT_FILE)).unwrap();
        let m = CertManager::new(
            CertSource::Static(vec![StaticCert {
                chain: issued.chain,
                key: issued.key,
            }]),
            &roots,
            crate::tls::provider(),
        )
        .unwrap();
        let c = m.fetch(&id("vm")).unwrap();
        assert_eq!(c.serial, issued.serial);
        // Long past half-life a static certificate is still served: nothing can renew it here.
        let later = c.refresh_at() + Duration::from_secs(60);
        assert_eq!(m.fetch_at(&id("vm"), later).unwrap().serial, issued.serial);
        assert!(matches!(
            m.fetch(&id("other")),
            Err(CertManagerError::NoStaticCert(_))
        ));
    }

    #[test]
    fn roots_must_parse() {
        let junk = vec![CertificateDer::from(vec![1u8, 2, 3])];
        let r = CertManager::new(CertSource::Static(vec![]), &junk, crate::tls::provider());
        assert!(matches!(r, Err(CertManagerError::Roots(_))));
    }
}
