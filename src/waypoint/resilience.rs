//! Circuit breaking and outlier ejection for the waypoint's upstream services (Istio
//! DestinationRule semantics, as Envoy implements them).
//!
//! - `max_requests` bounds requests in flight to a service; one more is refused at once (503,
//!   flag `UO`).
//! - `max_connections` bounds concurrent upstream exchanges (an HTTP/1.1 connection carries one
//!   at a time); a request beyond it waits for a slot, unless `max_pending_requests` are already
//!   waiting, in which case it is refused.
//! - Outlier detection counts consecutive 5xx (and connection failures) per endpoint and ejects
//!   the endpoint for `base_ejection_time` times the number of its ejections so far. At most
//!   `max_ejection_percent` of a service's endpoints are out at once, but always at least one
//!   may be (as in Envoy), so a two-endpoint service can still lose its bad half.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::config::TrafficPolicy;
use crate::model::{Service, Workload};

/// Why a request was refused before it left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overflow(pub &'static str);

#[derive(Default)]
struct ServiceState {
    in_flight: AtomicU32,
    pending: AtomicU32,
    connections: Option<Arc<Semaphore>>,
}

#[derive(Default, Clone, Copy)]
struct EndpointState {
    consecutive_errors: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// The waypoint-wide state, keyed by service (`namespace/hostname`) and endpoint uid.
#[derive(Default)]
pub struct Resilience {
    services: Mutex<HashMap<String, Arc<ServiceState>>>,
    endpoints: Mutex<HashMap<(String, String), EndpointState>>,
}

/// Held while a request is in flight; releases its slots on drop.
pub struct Admission {
    service: Option<Arc<ServiceState>>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(s) = &self.service {
            s.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Resilience {
    fn service(&self, svc: &Service, policy: &TrafficPolicy) -> Arc<ServiceState> {
        let mut map = self.services.lock().expect("poisoned");
        map.entry(svc.key())
            .or_insert_with(|| {
                Arc::new(ServiceState {
                    connections: policy
                        .max_connections
                        .map(|n| Arc::new(Semaphore::new(n as usize))),
                    ..ServiceState::default()
                })
            })
            .clone()
    }

    /// Admits one request to `svc`, waiting for a connection slot when allowed to.
    pub async fn admit(&self, svc: Option<&Service>) -> Result<Admission, Overflow> {
        let Some((svc, policy)) = svc.and_then(|s| s.traffic_policy.as_ref().map(|p| (s, p)))
        else {
            return Ok(Admission {
                service: None,
                _connection: None,
            });
        };
        let state = self.service(svc, policy);
        let n = state.in_flight.fetch_add(1, Ordering::AcqRel);
        let admission = Admission {
            service: Some(state.clone()),
            _connection: None,
        };
        if policy.max_requests.is_some_and(|max| n >= max) {
            return Err(Overflow("max_requests"));
        }
        let Some(sem) = state.connections.clone() else {
            return Ok(admission);
        };
        let permit = match sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let waiting = state.pending.fetch_add(1, Ordering::AcqRel);
                if policy
                    .max_pending_requests
                    .is_some_and(|max| waiting >= max)
                {
                    state.pending.fetch_sub(1, Ordering::AcqRel);
                    return Err(Overflow("max_pending_requests"));
                }
                let p = sem.acquire_owned().await;
                state.pending.fetch_sub(1, Ordering::AcqRel);
                p.expect("the semaphore is never closed")
            }
        };
        let mut admission = admission;
        admission._connection = Some(permit);
        Ok(admission)
    }

    /// Whether `w` is currently ejected from `svc`.
    pub fn is_ejected(&self, svc: &Service, w: &Workload, now: Instant) -> bool {
        self.endpoints
            .lock()
            .expect("poisoned")
            .get(&(svc.key(), w.uid.clone()))
            .and_then(|e| e.ejected_until)
            .is_some_and(|until| now < until)
    }

    /// Records the outcome of a request to endpoint `w` of `svc`: `failed` for a 5xx or a
    /// connection failure. Returns true when this outcome ejected the endpoint.
    pub fn record(&self, svc: &Service, w: &Workload, failed: bool, now: Instant) -> bool {
        let Some(od) = svc
            .traffic_policy
            .as_ref()
            .and_then(|p| p.outlier_detection.as_ref())
        else {
            return false;
        };
        let mut map = self.endpoints.lock().expect("poisoned");
        let ejected_now = svc
            .endpoints
            .iter()
            .filter(|e| {
                map.get(&(svc.key(), e.uid.clone()))
                    .and_then(|s| s.ejected_until)
                    .is_some_and(|u| now < u)
            })
            .count();
        let total = svc.endpoints.len().max(1);
        let allowed = (total * od.max_ejection_percent as usize / 100).max(1);
        let e = map.entry((svc.key(), w.uid.clone())).or_default();
        if !failed {
            e.consecutive_errors = 0;
            return false;
        }
        e.consecutive_errors += 1;
        if e.consecutive_errors < od.consecutive_5xx || ejected_now >= allowed {
            return false;
        }
        e.ejections += 1;
        e.consecutive_errors = 0;
        e.ejected_until = Some(now + od.base_ejection_time * e.ejections);
        tracing::info!(service = %svc.key(), endpoint = %w.uid, until_secs = (od.base_ejection_time * e.ejections).as_secs(), "outlier ejected");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::Model;
    use std::time::Duration;

    fn model(policy: &str) -> Model {
        let text = format!(
            "node: {{ name: n, certificates: {{ file_ca: {{ dir: /tmp/x }} }} }}\nworkloads:\n  - {{ uid: a, name: a, namespace: d, addresses: [10.0.0.1], node: m, services: {{ d/s: {{}} }} }}\n  - {{ uid: b, name: b, namespace: d, addresses: [10.0.0.2], node: m, services: {{ d/s: {{}} }} }}\nservices:\n  - {{ name: s, namespace: d, hostname: s, vips: [10.9.0.1], ports: {{ 80: 80 }}, traffic_policy: {policy} }}\n"
        );
        Model::from_config(&Config::parse(&text, "t").unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn max_requests_and_pending_limits_refuse_the_excess() {
        let m = model("{ max_connections: 1, max_pending_requests: 1, max_requests: 3 }");
        let svc = m.services()[0].clone();
        let r = Arc::new(Resilience::default());
        let first = r.admit(Some(&svc)).await.unwrap();
        // The second waits for the only connection slot; the third finds the queue full.
        let waiter = {
            let (r, svc) = (r.clone(), svc.clone());
            tokio::spawn(async move { r.admit(Some(&svc)).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        assert_eq!(
            r.admit(Some(&svc)).await.err(),
            Some(Overflow("max_pending_requests"))
        );
        drop(first);
        assert_eq!(
            waiter.await.unwrap(),
            Ok(()),
            "the waiter got the freed slot"
        );
        // Nothing left in flight: the counters went back down.
        let again = r.admit(Some(&svc)).await;
        assert!(again.is_ok());
    }

    #[test]
    fn consecutive_errors_eject_with_growing_time_and_a_cap() {
        let m = model("{ outlier_detection: { consecutive_5xx: 3, base_ejection_time: 10s, max_ejection_percent: 10 } }");
        let svc = m.services()[0].clone();
        let (a, b) = (svc.endpoints[0].clone(), svc.endpoints[1].clone());
        let r = Resilience::default();
        let t0 = Instant::now();
        assert!(!r.record(&svc, &a, true, t0));
        assert!(!r.record(&svc, &a, false, t0), "a success resets the count");
        assert!(!r.record(&svc, &a, true, t0));
        assert!(!r.record(&svc, &a, true, t0));
        assert!(r.record(&svc, &a, true, t0), "third consecutive 5xx ejects");
        assert!(r.is_ejected(&svc, &a, t0 + Duration::from_secs(9)));
        assert!(!r.is_ejected(&svc, &a, t0 + Duration::from_secs(11)));
        // While a is out, b cannot be ejected too: 10% of 2 endpoints still allows one.
        for _ in 0..3 {
            assert!(!r.record(&svc, &b, true, t0));
        }
        // A second ejection of a lasts twice as long.
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..2 {
            r.record(&svc, &a, true, t1);
        }
        assert!(r.record(&svc, &a, true, t1));
        assert!(r.is_ejected(&svc, &a, t1 + Duration::from_secs(19)));
        assert!(!r.is_ejected(&svc, &a, t1 + Duration::from_secs(21)));
    }
}
