//! The certificate manager: one certificate per SPIFFE identity of the node's local workloads.
//!
//! Certificates are cached and renewed at half-life, the point istiod and ztunnel use, so a CA
//! outage of up to half a lifetime never expires a serving certificate. Renewal happens both in a
//! background loop and lazily on fetch, so a missed wake-up can never serve an expired leaf. A
//! failed renewal is retried with exponential backoff and jitter (500 ms to 150 s) while the
//! current certificate keeps being served until it expires. The trust snapshot (roots, CRLs,
//! clock) lives here too and is swapped on reload; subscribers re-check their live connections.
//!
//! Issuing a leaf (key generation, CA signing) is CPU work that may also wait on a remote CA, so
//! the async paths (`fetch_async`, the renewal loop) never run it on an async worker: it runs on
//! the blocking pool, once per identity at a time (single flight), and every caller that needs
//! the same identity meanwhile awaits that one issuance. A cached, fresh certificate is returned
//! without leaving the caller's task.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use tokio::sync::{watch, Notify};

use super::ca::{CaError, FileCa, Issued};
use super::cert::{peer_identity, CertError};
use super::trust::{SystemClock, Trust, TrustError, Usage};
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

/// A certificate authority the node can ask for leaves: the built-in file CA, or (later) istiod.
pub trait Authority: Send + Sync {
    /// Issues a leaf for `id`, valid from `now` (backdated) for `ttl`.
    fn issue(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<Issued, CaError>;
}

impl Authority for FileCa {
    fn issue(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<Issued, CaError> {
        self.issue_at(id, ttl, now)
    }
}

/// Where leaf certificates come from.
pub enum CertSource {
    /// Issued on the node by a CA, renewed at half-life.
    Ca {
        ca: Arc<dyn Authority>,
        ttl: Duration,
    },
    /// Provisioned by the operator, used as is.
    Static(Vec<StaticCert>),
}

impl CertSource {
    /// The built-in file CA.
    pub fn file_ca(ca: FileCa, ttl: Duration) -> CertSource {
        CertSource::Ca {
            ca: Arc::new(ca),
            ttl,
        }
    }
}

/// First retry after a failed renewal. Istio's agents start their CSR retries at 500 ms too.
const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest wait between renewal attempts, so a recovered CA is used within minutes.
const RETRY_CAP: Duration = Duration::from_secs(150);

/// Delay before renewal attempt `failures + 1`: 500 ms doubling to 150 s, stretched by up to
/// 25% of jitter (`jitter` in [0, 1)) so nodes that lost their CA together do not retry in step.
pub fn retry_backoff(failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = RETRY_BASE.saturating_mul(1 << exp).min(RETRY_CAP);
    base.mul_f64(1.0 + 0.25 * jitter.clamp(0.0, 1.0))
        .min(RETRY_CAP)
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
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("certificate for {identity} expired and could not be renewed: {detail}")]
    Expired { identity: String, detail: String },
    /// The outcome of an issuance another caller started and this one awaited.
    #[error(transparent)]
    Shared(Arc<CertManagerError>),
    #[error("certificate issuance for {identity} ended without a result (the issuing task panicked or the runtime is shutting down)")]
    IssuanceLost { identity: String },
}

/// One issuance in progress: its result, published to every caller that awaits it.
type Flight = watch::Receiver<Option<Result<Arc<WorkloadCert>, Arc<CertManagerError>>>>;

/// What the cache alone can answer for an identity.
enum Cached {
    /// A usable certificate (fresh, or backing off from a failed renewal and not yet expired),
    /// or a definite answer that needs no CA (a static source).
    Ready(Result<Arc<WorkloadCert>, CertManagerError>),
    /// Missing, or due for (re)issuance: the CA must be asked.
    Issue,
}

/// Ends an identity's flight when its issuance returns, panics, or never runs (a runtime that
/// is shutting down drops the job), so the next caller that finds the certificate missing or
/// due starts a new one instead of awaiting a finished one.
struct FlightDone(Arc<CertManager>, SpiffeId);

impl Drop for FlightDone {
    fn drop(&mut self) {
        if let Ok(mut inflight) = self.0.inflight.lock() {
            inflight.remove(&self.1);
        }
    }
}

struct Entry {
    cert: Arc<WorkloadCert>,
    /// Renewal attempts that failed since the last success.
    failures: u32,
    /// No renewal is attempted before this (backoff after a CA failure).
    retry_at: Option<SystemTime>,
}

pub struct CertManager {
    source: RwLock<Arc<CertSource>>,
    trust: watch::Sender<Arc<Trust>>,
    cache: Mutex<HashMap<SpiffeId, Entry>>,
    /// Issuances running on the blocking pool, one per identity (single flight).
    inflight: Mutex<HashMap<SpiffeId, Flight>>,
    /// Wakes the renewal loop when the schedule may have moved earlier.
    changed: Notify,
}

impl CertManager {
    /// A manager on the real clock with no CRL.
    pub fn new(
        source: CertSource,
        roots: &[CertificateDer<'static>],
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, CertManagerError> {
        let trust = Trust::new(roots, Vec::new(), provider, Arc::new(SystemClock))?;
        CertManager::with_trust(source, trust)
    }

    pub fn with_trust(source: CertSource, trust: Trust) -> Result<Self, CertManagerError> {
        let mgr = CertManager {
            source: RwLock::new(Arc::new(source)),
            trust: watch::Sender::new(Arc::new(trust)),
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        };
        mgr.load_static_certs()?;
        Ok(mgr)
    }

    /// Loads every static certificate now, so a bad file fails at start (or reload), not at
    /// first use.
    fn load_static_certs(&self) -> Result<(), CertManagerError> {
        let source = self.source();
        if let CertSource::Static(certs) = &*source {
            let loaded = certs
                .iter()
                .map(|c| self.load_static(c))
                .collect::<Result<Vec<_>, _>>()?;
            let mut cache = self.cache.lock().expect("cert cache poisoned");
            cache.clear();
            for wc in loaded {
                cache.insert(
                    wc.identity.clone(),
                    Entry {
                        cert: Arc::new(wc),
                        failures: 0,
                        retry_at: None,
                    },
                );
            }
        }
        Ok(())
    }

    fn source(&self) -> Arc<CertSource> {
        self.source.read().expect("cert source poisoned").clone()
    }

    /// The current trust snapshot.
    pub fn trust(&self) -> Arc<Trust> {
        self.trust.borrow().clone()
    }

    /// Notified whenever the trust snapshot is replaced (roots or CRLs reloaded).
    pub fn subscribe_trust(&self) -> watch::Receiver<Arc<Trust>> {
        self.trust.subscribe()
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.trust().roots().clone()
    }

    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.trust().provider().clone()
    }

    pub fn now(&self) -> SystemTime {
        self.trust().now()
    }

    /// Swaps in a new certificate source and trust snapshot (config reload). Static
    /// certificates are re-read; an issued certificate the new bundle no longer accepts (the CA
    /// moved to a root that is not trusted together with the old one) is dropped, so the next
    /// fetch issues one from the new CA. Everything else is kept until its normal renewal.
    pub fn replace(&self, source: CertSource, mut trust: Trust) -> Result<(), CertManagerError> {
        let old = self.trust();
        let trust_changed = !old.same_material(&trust);
        let trust = if trust_changed {
            trust.generation = old.generation + 1;
            Arc::new(trust)
        } else {
            old
        };
        let old_source = std::mem::replace(
            &mut *self.source.write().expect("cert source poisoned"),
            Arc::new(source),
        );
        if let Err(e) = self.load_static_certs() {
            *self.source.write().expect("cert source poisoned") = old_source;
            return Err(e);
        }
        if matches!(*self.source(), CertSource::Ca { .. }) {
            let at = super::trust::unix_time(trust.now());
            self.cache
                .lock()
                .expect("cert cache poisoned")
                .retain(|id, e| {
                    let chain = &e.cert.certified.cert;
                    let ok = trust
                        .verify_chain(&chain[0], &chain[1..], at, Usage::Client)
                        .is_ok();
                    if !ok {
                        tracing::info!(identity = %id, "certificate not trusted by the new bundle; reissuing");
                    }
                    ok
                });
        }
        if trust_changed {
            tracing::info!(
                roots = trust.roots().len(),
                crls = trust.crl_count(),
                "trust bundle replaced; re-checking live connections"
            );
            self.trust.send_replace(trust);
        }
        self.changed.notify_one();
        Ok(())
    }

    fn certified(
        &self,
        identity: &SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'static>,
    ) -> Result<Arc<CertifiedKey>, CertManagerError> {
        let signer = self
            .provider()
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

    /// The current certificate for `id`, issuing or renewing it when needed, on the calling
    /// thread. For start-up and tools; async code on the data path uses `fetch_async`.
    pub fn fetch(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, CertManagerError> {
        self.fetch_at(id, self.now())
    }

    /// What the cache can answer for `id` at `now` without asking the CA.
    fn lookup(&self, id: &SpiffeId, now: SystemTime) -> Cached {
        let is_static = matches!(*self.source(), CertSource::Static(_));
        let cache = self.cache.lock().expect("cert cache poisoned");
        let entry = cache.get(id);
        if is_static {
            // Nothing to renew from: keep serving what the operator provisioned.
            return Cached::Ready(
                entry
                    .map(|e| e.cert.clone())
                    .ok_or_else(|| CertManagerError::NoStaticCert(id.to_string())),
            );
        }
        match entry {
            Some(e) if now < e.cert.refresh_at() => Cached::Ready(Ok(e.cert.clone())),
            Some(e) if e.retry_at.is_some_and(|r| now < r) && !e.cert.is_expired(now) => {
                Cached::Ready(Ok(e.cert.clone()))
            }
            _ => Cached::Issue,
        }
    }

    /// `fetch` for async callers (accept paths, the HBONE pool). A cached certificate is
    /// returned at once; otherwise the issuance runs on the blocking pool, at most one per
    /// identity at a time, and this call awaits it: a burst of connections for a cold identity
    /// causes one signing, and a slow CA never holds up an async worker (or other identities).
    pub async fn fetch_async(
        self: &Arc<Self>,
        id: &SpiffeId,
    ) -> Result<Arc<WorkloadCert>, CertManagerError> {
        match self.lookup(id, self.now()) {
            Cached::Ready(r) => r,
            Cached::Issue => self.issue_once(id).await,
        }
    }

    /// Joins the issuance in flight for `id`, or starts one on the blocking pool.
    async fn issue_once(
        self: &Arc<Self>,
        id: &SpiffeId,
    ) -> Result<Arc<WorkloadCert>, CertManagerError> {
        let mut flight = {
            let mut inflight = self.inflight.lock().expect("inflight lock poisoned");
            match inflight.get(id) {
                Some(f) => f.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(id.clone(), rx.clone());
                    let done = FlightDone(self.clone(), id.clone());
                    // Detached: the issuance completes and is cached even if every caller
                    // that waited for it has gone away meanwhile.
                    tokio::task::spawn_blocking(move || {
                        let FlightDone(mgr, id) = &done;
                        let r = mgr.fetch_at(id, mgr.now()).map_err(Arc::new);
                        // The flight is over before anyone hears its result: a caller that
                        // wakes on it finds no stale entry (and a new fetch starts afresh).
                        drop(done);
                        tx.send_replace(Some(r));
                    });
                    rx
                }
            }
        };
        let outcome = flight
            .wait_for(Option::is_some)
            .await
            .map(|r| r.clone())
            .ok()
            .flatten();
        match outcome {
            Some(Ok(cert)) => Ok(cert),
            Some(Err(e)) => Err(CertManagerError::Shared(e)),
            None => Err(CertManagerError::IssuanceLost {
                identity: id.to_string(),
            }),
        }
    }

    /// `fetch` as of `now`. Past half-life a renewal is attempted (unless a failed one is still
    /// backing off); when the CA fails, the current certificate is served until it expires.
    pub fn fetch_at(
        &self,
        id: &SpiffeId,
        now: SystemTime,
    ) -> Result<Arc<WorkloadCert>, CertManagerError> {
        if let Cached::Ready(r) = self.lookup(id, now) {
            return r;
        }
        let source = self.source();
        let CertSource::Ca { ca, ttl } = &*source else {
            // The source was swapped to static since the lookup: answer from its cache.
            return match self.lookup(id, now) {
                Cached::Ready(r) => r,
                Cached::Issue => Err(CertManagerError::NoStaticCert(id.to_string())),
            };
        };
        let ttl = *ttl;
        let current = self
            .cache
            .lock()
            .expect("cert cache poisoned")
            .get(id)
            .map(|e| (e.cert.clone(), e.failures));
        match ca.issue(id, ttl, now) {
            Ok(issued) => {
                let wc = Arc::new(WorkloadCert {
                    certified: self.certified(id, issued.chain, &issued.key)?,
                    identity: id.clone(),
                    not_before: issued.not_before,
                    not_after: issued.not_after,
                    serial: issued.serial,
                });
                tracing::info!(identity = %id, serial = %wc.serial, "issued workload certificate");
                self.cache.lock().expect("cert cache poisoned").insert(
                    id.clone(),
                    Entry {
                        cert: wc.clone(),
                        failures: 0,
                        retry_at: None,
                    },
                );
                self.changed.notify_one();
                Ok(wc)
            }
            Err(e) => {
                let Some((cert, failures)) = current else {
                    return Err(e.into());
                };
                let failures = failures + 1;
                let wait = retry_backoff(failures, rand::random::<f64>());
                if let Some(entry) = self.cache.lock().expect("cert cache poisoned").get_mut(id) {
                    entry.failures = failures;
                    entry.retry_at = Some(now + wait);
                }
                if cert.is_expired(now) {
                    return Err(CertManagerError::Expired {
                        identity: id.to_string(),
                        detail: e.to_string(),
                    });
                }
                tracing::warn!(
                    identity = %id,
                    serial = %cert.serial,
                    attempt = failures,
                    retry_in = ?wait,
                    error = %e,
                    "certificate renewal failed; serving the current certificate until it expires"
                );
                Ok(cert)
            }
        }
    }

    /// Forgets certificates of identities that no longer run on this node (issued ones only:
    /// static certificates are the operator's).
    pub fn retain(&self, keep: &HashSet<SpiffeId>) {
        if matches!(*self.source(), CertSource::Ca { .. }) {
            self.cache
                .lock()
                .expect("cert cache poisoned")
                .retain(|id, _| keep.contains(id));
        }
    }

    /// Snapshot of the cached certificates, for logs and the admin config dump.
    pub fn cached(&self) -> Vec<Arc<WorkloadCert>> {
        let mut v: Vec<_> = self
            .cache
            .lock()
            .expect("cert cache poisoned")
            .values()
            .map(|e| e.cert.clone())
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    /// When each cached certificate is next due for a renewal attempt.
    fn schedule(&self) -> Vec<(SpiffeId, SystemTime)> {
        self.cache
            .lock()
            .expect("cert cache poisoned")
            .iter()
            .map(|(id, e)| {
                let due = e
                    .retry_at
                    .map_or(e.cert.refresh_at(), |r| r.max(e.cert.refresh_at()));
                (id.clone(), due)
            })
            .collect()
    }

    /// Renews issued certificates at half-life (retrying with backoff while the CA fails) until
    /// the task is dropped.
    pub async fn run_renewals(self: Arc<Self>) {
        /// Re-check at least this often, in case the clock jumped (suspend, NTP step).
        const MAX_SLEEP: Duration = Duration::from_secs(60);
        loop {
            let schedule = match &*self.source() {
                CertSource::Ca { .. } => self.schedule(),
                CertSource::Static(_) => Vec::new(),
            };
            let now = self.now();
            for (id, due) in &schedule {
                if *due <= now {
                    // Through the single flight: the signing runs on the blocking pool, and a
                    // connection asking for the same identity meanwhile waits for this one.
                    if let Err(e) = self.fetch_async(id).await {
                        tracing::error!(identity = %id, error = %e, "no valid certificate");
                    }
                }
            }
            let next = self
                .schedule()
                .iter()
                .map(|(_, due)| *due)
                .filter(|due| *due > now)
                .min();
            let wait = next
                .and_then(|t| t.duration_since(now).ok())
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.changed.notified() => {}
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
            CertSource::file_ca(ca, Duration::from_secs(24 * 3600)),
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
        assert!(matches!(r, Err(CertManagerError::Trust(_))));
    }

    /// A CA that can be switched off, counting issuance attempts.
    struct FlakyCa {
        inner: FileCa,
        down: std::sync::atomic::AtomicBool,
        attempts: std::sync::atomic::AtomicUsize,
    }

    impl Authority for FlakyCa {
        fn issue(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<Issued, CaError> {
            use std::sync::atomic::Ordering::SeqCst;
            self.attempts.fetch_add(1, SeqCst);
            if self.down.load(SeqCst) {
                return Err(CaError::Issue {
                    identity: id.to_string(),
                    detail: "CA unreachable".into(),
                });
            }
            self.inner.issue_at(id, ttl, now)
        }
    }

    fn flaky(
        dir: &std::path::Path,
        clock: Arc<dyn super::super::Clock>,
    ) -> (Arc<FlakyCa>, CertManager) {
        FileCa::init(dir, "cluster.local").unwrap();
        let inner = FileCa::load(dir).unwrap();
        let roots = inner.roots().to_vec();
        let ca = Arc::new(FlakyCa {
            inner,
            down: false.into(),
            attempts: 0.into(),
        });
        let trust = Trust::new(&roots, Vec::new(), crate::tls::provider(), clock).unwrap();
        let m = CertManager::with_trust(
            CertSource::Ca {
                ca: ca.clone(),
                ttl: Duration::from_secs(24 * 3600),
            },
            trust,
        )
        .unwrap();
        (ca, m)
    }

    #[test]
    fn backoff_doubles_from_500ms_to_150s_with_bounded_jitter() {
        let ms = |f, j| retry_backoff(f, j).as_millis();
        assert_eq!(ms(1, 0.0), 500);
        assert_eq!(ms(2, 0.0), 1000);
        assert_eq!(ms(3, 0.0), 2000);
        assert_eq!(ms(9, 0.0), 128_000);
        assert_eq!(ms(10, 0.0), 150_000, "capped");
        assert_eq!(
            ms(1000, 0.99),
            150_000,
            "cap holds with jitter and huge counts"
        );
        assert_eq!(ms(1, 1.0), 625, "jitter stretches by at most a quarter");
        assert!(ms(4, 0.5) > ms(4, 0.0));
    }

    #[test]
    fn with_the_ca_down_the_current_certificate_is_served_until_it_expires() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let clock = crate::identity::ManualClock::new();
        let (ca, m) = flaky(dir.path(), clock.clone());
        let first = m.fetch(&id("a")).unwrap();
        ca.down.store(true, SeqCst);

        // Past half-life: renewal fails, the current certificate is still served...
        let t = first.refresh_at() + Duration::from_secs(1);
        assert_eq!(m.fetch_at(&id("a"), t).unwrap().serial, first.serial);
        let tried = ca.attempts.load(SeqCst);
        // ...and the next fetch inside the backoff window does not hammer the CA.
        assert_eq!(
            m.fetch_at(&id("a"), t + Duration::from_millis(100))
                .unwrap()
                .serial,
            first.serial
        );
        assert_eq!(
            ca.attempts.load(SeqCst),
            tried,
            "no attempt inside the backoff"
        );
        // After the backoff it tries again, and still serves the current certificate.
        assert_eq!(
            m.fetch_at(&id("a"), t + Duration::from_secs(1))
                .unwrap()
                .serial,
            first.serial
        );
        assert_eq!(ca.attempts.load(SeqCst), tried + 1);

        // At expiry there is nothing valid left to serve: an error naming the identity.
        let Err(err) = m.fetch_at(&id("a"), first.not_after + Duration::from_secs(200)) else {
            panic!("an expired certificate was served");
        };
        assert!(matches!(err, CertManagerError::Expired { .. }), "{err}");
        assert!(err
            .to_string()
            .contains("spiffe://cluster.local/ns/default/sa/a"));

        // The CA comes back: the next attempt after the backoff issues a new certificate.
        ca.down.store(false, SeqCst);
        let later = first.not_after + Duration::from_secs(400);
        let renewed = m.fetch_at(&id("a"), later).unwrap();
        assert_ne!(renewed.serial, first.serial);
    }

    /// The clock a paused tokio runtime drives: wall time at creation plus tokio's elapsed time.
    #[derive(Debug)]
    struct TokioClock {
        base: SystemTime,
        start: tokio::time::Instant,
    }

    impl super::super::Clock for TokioClock {
        fn now(&self) -> SystemTime {
            self.base + self.start.elapsed()
        }
    }

    /// The background loop with paused time: renewal at half-life, then retries at 0.5 s, 1 s,
    /// 2 s... while the CA is down, and a new certificate as soon as it is back.
    #[tokio::test(start_paused = true)]
    async fn renewal_loop_renews_at_half_life_and_backs_off_while_the_ca_is_down() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(TokioClock {
            base: SystemTime::now(),
            start: tokio::time::Instant::now(),
        });
        let (ca, m) = flaky(dir.path(), clock);
        let m = Arc::new(m);
        let first = m.fetch(&id("a")).unwrap();
        let half = first.refresh_at().duration_since(m.now()).unwrap();
        let task = tokio::spawn(m.clone().run_renewals());

        tokio::time::sleep(half + Duration::from_secs(1)).await;
        let second = m.cached()[0].clone();
        assert_ne!(second.serial, first.serial, "renewed at half-life");

        ca.down.store(true, SeqCst);
        let half = second.refresh_at().duration_since(m.now()).unwrap();
        tokio::time::sleep(half).await;
        let before = ca.attempts.load(SeqCst);
        // Jitter stretches each wait by up to 25%: 0.5+1+2+4+8 s is at most 19.4 s.
        tokio::time::sleep(Duration::from_millis(19_400)).await;
        let retries = ca.attempts.load(SeqCst) - before;
        assert!((4..=6).contains(&retries), "{retries} retries in 19.4 s");
        assert_eq!(
            m.cached()[0].serial,
            second.serial,
            "still serving the current one"
        );

        ca.down.store(false, SeqCst);
        // The next retry is at most 16 s * 1.25 away.
        tokio::time::sleep(Duration::from_secs(21)).await;
        assert_ne!(
            m.cached()[0].serial,
            second.serial,
            "renewed once the CA is back"
        );
        task.abort();
    }

    /// A CA that holds every signing until the test opens its gate, counting signings.
    struct GatedCa {
        inner: FileCa,
        open: std::sync::Mutex<bool>,
        opened: std::sync::Condvar,
        signed: std::sync::atomic::AtomicUsize,
        entered: tokio::sync::Notify,
    }

    impl GatedCa {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    impl Authority for GatedCa {
        fn issue(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<Issued, CaError> {
            self.signed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.entered.notify_one();
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            drop(open);
            self.inner.issue_at(id, ttl, now)
        }
    }

    fn gated(dir: &std::path::Path) -> (Arc<GatedCa>, Arc<CertManager>) {
        FileCa::init(dir, "cluster.local").unwrap();
        let inner = FileCa::load(dir).unwrap();
        let roots = inner.roots().to_vec();
        let ca = Arc::new(GatedCa {
            inner,
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
            signed: 0.into(),
            entered: tokio::sync::Notify::new(),
        });
        let m = CertManager::new(
            CertSource::Ca {
                ca: ca.clone(),
                ttl: Duration::from_secs(24 * 3600),
            },
            &roots,
            crate::tls::provider(),
        )
        .unwrap();
        (ca, Arc::new(m))
    }

    /// Opens the gate after `after` of wall time unless the test did: a guard against a
    /// signing that blocks the runtime the test itself runs on. Reports whether it fired.
    fn failsafe(ca: &Arc<GatedCa>, after: Duration) -> Arc<std::sync::atomic::AtomicBool> {
        let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ca, f) = (ca.clone(), fired.clone());
        std::thread::spawn(move || {
            std::thread::sleep(after);
            if !*ca.open.lock().unwrap() {
                f.store(true, std::sync::atomic::Ordering::SeqCst);
                ca.open();
            }
        });
        fired
    }

    /// Finding 10 (issue #11): 50 connections arriving together for a cold identity cause
    /// exactly one signing, and all of them get that certificate. Four workers, so signings
    /// done inline on the accept path would overlap and be counted here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fifty_concurrent_fetches_for_a_cold_identity_sign_once() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (ca, m) = gated(dir.path());
        let fired = failsafe(&ca, Duration::from_secs(10));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let m = m.clone();
                tokio::spawn(async move { m.fetch_async(&id("cold")).await })
            })
            .collect();
        ca.entered.notified().await;
        // Give every caller the chance to reach the CA while the first signing is held.
        tokio::time::sleep(Duration::from_millis(200)).await;
        ca.open();
        let mut serials = HashSet::new();
        for t in tasks {
            serials.insert(t.await.unwrap().unwrap().serial.clone());
        }
        assert_eq!(ca.signed.load(SeqCst), 1, "one signing for 50 callers");
        assert_eq!(serials.len(), 1, "every caller got the one certificate");
        assert!(!fired.load(SeqCst));
        assert!(
            m.inflight.lock().unwrap().is_empty(),
            "the flight ended with its issuance"
        );
        // Later callers are served from the cache, without another signing.
        m.fetch_async(&id("cold")).await.unwrap();
        assert_eq!(ca.signed.load(SeqCst), 1);
    }

    /// Finding 10 (issue #11): on a single-worker runtime, a signing held by a stuck CA does not
    /// stop the worker from serving an identity whose certificate is cached. Were the signing
    /// run on the worker, this test could not reach `fetch_async(cached)` before the failsafe.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stuck_ca_does_not_block_an_unrelated_cached_identity() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (ca, m) = gated(dir.path());
        ca.open();
        let cached = m.fetch_async(&id("warm")).await.unwrap();
        // Consumes the permit that signing left, so the wait below is for the cold one.
        ca.entered.notified().await;
        *ca.open.lock().unwrap() = false;
        let fired = failsafe(&ca, Duration::from_secs(10));

        let cold = {
            let m = m.clone();
            tokio::spawn(async move { m.fetch_async(&id("cold")).await })
        };
        ca.entered.notified().await;
        let again = m.fetch_async(&id("warm")).await.unwrap();
        assert!(Arc::ptr_eq(&again, &cached));
        assert!(
            !cold.is_finished(),
            "the cold identity is still being signed"
        );
        ca.open();
        let cold = cold.await.unwrap().unwrap();
        assert_eq!(cold.identity, id("cold"));
        assert!(!fired.load(SeqCst), "the worker was blocked by the signing");
    }

    /// A failed issuance reaches every waiter as an error and ends the flight, so the next
    /// caller tries the CA again.
    #[tokio::test]
    async fn a_failed_issuance_is_shared_then_retried() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let clock = crate::identity::ManualClock::new();
        let (ca, m) = flaky(dir.path(), clock);
        let m = Arc::new(m);
        ca.down.store(true, SeqCst);
        let Err(err) = m.fetch_async(&id("a")).await else {
            panic!("issued while the CA is down");
        };
        assert!(err.to_string().contains("CA unreachable"), "{err}");
        assert!(m.inflight.lock().unwrap().is_empty());
        ca.down.store(false, SeqCst);
        m.fetch_async(&id("a")).await.unwrap();
        assert_eq!(ca.attempts.load(SeqCst), 2);
    }
}
