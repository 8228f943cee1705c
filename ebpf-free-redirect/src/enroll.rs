//! Which pods are meshed: the label rules of ambient mode, as pure functions over the Kubernetes
//! objects (docs/capture.md, "Enrollment"). A pod is meshed when it or its namespace carries
//! `istio.io/dataplane-mode=ambient`; the pod's own `istio.io/dataplane-mode=none` opts it out
//! whatever its namespace says; a hostNetwork pod is never meshed (it has no netns of its own to
//! capture, and capturing in the node's netns would capture the node). The I/O that feeds these
//! functions lives in [`crate::k8s`]; [`PodFacts`] is the part of a pod the agent acts on.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};

/// The label that opts a namespace or a pod into (or, on a pod, out of) the mesh; Istio's name,
/// so a namespace labelled for Istio ambient is meshed by zmesh alike.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// [`DATAPLANE_MODE_LABEL`] value that meshes.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// [`DATAPLANE_MODE_LABEL`] value that opts a pod out even in an ambient namespace.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// The service account a pod runs as when its spec names none (the API server fills it in, so
/// this only matters for objects that never went through admission).
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Whether a pod is meshed, and why (the reason is logged and returned to the CNI plugin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Meshed(MeshedBy),
    NotMeshed(Reason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshedBy {
    PodLabel,
    NamespaceLabel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    HostNetwork,
    /// The pod says `dataplane-mode=none`.
    OptedOut,
    /// Neither the pod nor its namespace says `ambient`.
    NotLabelled,
}

impl Decision {
    pub fn is_meshed(self) -> bool {
        matches!(self, Decision::Meshed(_))
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decision::Meshed(MeshedBy::PodLabel) => "meshed: the pod is labelled ambient",
            Decision::Meshed(MeshedBy::NamespaceLabel) => {
                "meshed: its namespace is labelled ambient"
            }
            Decision::NotMeshed(Reason::HostNetwork) => "not meshed: hostNetwork pod",
            Decision::NotMeshed(Reason::OptedOut) => {
                "not meshed: the pod is labelled istio.io/dataplane-mode=none"
            }
            Decision::NotMeshed(Reason::NotLabelled) => {
                "not meshed: neither the pod nor its namespace is labelled istio.io/dataplane-mode=ambient"
            }
        })
    }
}

fn mode(labels: Option<&BTreeMap<String, String>>) -> Option<&str> {
    labels?.get(DATAPLANE_MODE_LABEL).map(String::as_str)
}

/// The ambient rule. `namespace` is the pod's namespace object, `None` when it does not exist
/// (then only the pod's own label counts).
pub fn decide(pod: &Pod, namespace: Option<&Namespace>) -> Decision {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Decision::NotMeshed(Reason::HostNetwork);
    }
    match mode(pod.metadata.labels.as_ref()) {
        Some(DATAPLANE_MODE_NONE) => return Decision::NotMeshed(Reason::OptedOut),
        Some(DATAPLANE_MODE_AMBIENT) => return Decision::Meshed(MeshedBy::PodLabel),
        _ => {}
    }
    match namespace.and_then(|ns| mode(ns.metadata.labels.as_ref())) {
        Some(DATAPLANE_MODE_AMBIENT) => Decision::Meshed(MeshedBy::NamespaceLabel),
        _ => Decision::NotMeshed(Reason::NotLabelled),
    }
}

/// What the agent needs of a pod to capture it and hand it to the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// status.podIPs (else status.podIP); empty until the pod has its network.
    pub ips: Vec<IpAddr>,
    /// The pod has started and not finished: only such a pod has a netns worth entering.
    pub running: bool,
}

impl PodFacts {
    /// `None` for an object without uid or name (never the case for a pod from the API server).
    pub fn of(pod: &Pod) -> Option<PodFacts> {
        let uid = pod.metadata.uid.clone().filter(|u| !u.is_empty())?;
        let name = pod.metadata.name.clone().filter(|n| !n.is_empty())?;
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(
                status
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        let phase = status.and_then(|s| s.phase.as_deref());
        Some(PodFacts {
            uid,
            name,
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned()),
            ips,
            running: phase == Some("Running") && pod.metadata.deletion_timestamp.is_none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn labels(mode: Option<&str>) -> Option<BTreeMap<String, String>> {
        mode.map(|m| BTreeMap::from([(DATAPLANE_MODE_LABEL.to_owned(), m.to_owned())]))
    }

    fn pod(mode: Option<&str>, host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("u1".into()),
                labels: labels(mode),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                host_network: Some(host_network),
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    fn ns(mode: Option<&str>) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                labels: labels(mode),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    #[test]
    fn the_ambient_rule() {
        use Decision::*;
        // (pod label, hostNetwork, namespace (None: absent) with its label, expected)
        type Case<'a> = (Option<&'a str>, bool, Option<Option<&'a str>>, Decision);
        let cases: &[Case] = &[
            (None, false, Some(None), NotMeshed(Reason::NotLabelled)),
            (None, false, None, NotMeshed(Reason::NotLabelled)),
            (
                None,
                false,
                Some(Some("ambient")),
                Meshed(MeshedBy::NamespaceLabel),
            ),
            (
                Some("ambient"),
                false,
                Some(None),
                Meshed(MeshedBy::PodLabel),
            ),
            (Some("ambient"), false, None, Meshed(MeshedBy::PodLabel)),
            (
                Some("none"),
                false,
                Some(Some("ambient")),
                NotMeshed(Reason::OptedOut),
            ),
            (
                Some("ambient"),
                true,
                Some(Some("ambient")),
                NotMeshed(Reason::HostNetwork),
            ),
            // Values other than the two known ones mean nothing (as in Istio).
            (
                Some("sidecar"),
                false,
                Some(Some("ambient")),
                Meshed(MeshedBy::NamespaceLabel),
            ),
            (
                None,
                false,
                Some(Some("Ambient")),
                NotMeshed(Reason::NotLabelled),
            ),
            (
                None,
                false,
                Some(Some("none")),
                NotMeshed(Reason::NotLabelled),
            ),
        ];
        for (pod_mode, host, ns_mode, want) in cases {
            let namespace = ns_mode.map(ns);
            assert_eq!(
                decide(&pod(*pod_mode, *host), namespace.as_ref()),
                *want,
                "pod {pod_mode:?} hostNetwork {host} namespace {ns_mode:?}"
            );
        }
    }

    #[test]
    fn facts_prefer_pod_ips_and_default_the_service_account() {
        let mut p = pod(None, false);
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.9".into()),
            pod_ips: Some(vec![
                PodIP {
                    ip: "10.0.0.1".into(),
                },
                PodIP {
                    ip: "fd00::1".into(),
                },
                PodIP {
                    ip: "garbage".into(),
                },
            ]),
            ..PodStatus::default()
        });
        let f = PodFacts::of(&p).unwrap();
        assert_eq!(
            f.ips,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(f.service_account, "default");
        assert!(f.running);

        p.status.as_mut().unwrap().pod_ips = None;
        p.status.as_mut().unwrap().phase = Some("Pending".into());
        p.spec.as_mut().unwrap().service_account_name = Some("web".into());
        let f = PodFacts::of(&p).unwrap();
        assert_eq!(f.ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(f.service_account, "web");
        assert!(!f.running);

        p.metadata.uid = None;
        assert_eq!(PodFacts::of(&p), None, "no uid, nothing to key the pod by");
    }
}
