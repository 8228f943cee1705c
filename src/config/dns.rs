//! `node.dns`: the node's DNS proxy (docs/capture.md "DNS proxy"). Off by default; every field
//! has a default, so `dns: { enabled: true }` is a complete section.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Deserialize;

/// ztunnel's and istio-agent's DNS proxy port; the capture rules redirect port 53 to it.
pub const DEFAULT_PORT: u16 = 15053;
/// Istio's range for auto-allocated service addresses (class E, never routed on the Internet).
pub const DEFAULT_VIP_RANGE: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(240, 240, 0, 0), 16);

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Answer DNS on `bind:port` (host mode) and on `127.0.0.1:port` inside each pod (in-pod).
    #[serde(default)]
    pub enabled: bool,
    /// Host mode's listening address. Default 127.0.0.1: the capture rules REDIRECT to it.
    /// In-pod listeners always bind 127.0.0.1. Any other address needs `allow_remote_clients`.
    #[serde(default = "default_bind")]
    pub bind: IpAddr,
    /// Lets host mode's `bind` be a non-loopback address, serving other hosts. Off: an open
    /// UDP resolver is an amplifier for spoofed-source floods.
    #[serde(default)]
    pub allow_remote_clients: bool,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Resolvers for names the mesh does not know. Empty: the `nameserver` lines of
    /// `resolv_conf`, read at start.
    #[serde(default)]
    pub upstreams: Vec<SocketAddr>,
    /// Where the upstreams come from when `upstreams` is empty. Default /etc/resolv.conf.
    #[serde(default = "default_resolv_conf")]
    pub resolv_conf: PathBuf,
    /// Services without an address get one from here (an IPv4 range of at least 4 addresses).
    #[serde(default = "default_vip_range")]
    pub vip_range: Ipv4Net,
    /// The cluster's DNS domain: search domains are `<ns>.svc.<it>`, `svc.<it>`, `<it>`.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// How long one upstream may take to answer before the next is tried. Default 2s.
    #[serde(
        default = "default_upstream_timeout",
        deserialize_with = "super::de_duration"
    )]
    pub upstream_timeout: Duration,
    /// Queries forwarded at once per listener; beyond it queries are dropped and counted.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: usize,
    /// TCP clients served at once per listener; beyond it connections are closed and counted.
    #[serde(default = "default_max_tcp_connections")]
    pub max_tcp_connections: usize,
    /// A TCP client that sends nothing for this long is disconnected. Default 10s.
    #[serde(
        default = "default_tcp_idle_timeout",
        deserialize_with = "super::de_duration"
    )]
    pub tcp_idle_timeout: Duration,
    /// TTL of the answers the proxy gives for mesh names, in seconds. Default 30 (Istio's).
    #[serde(default = "default_ttl")]
    pub ttl: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: false,
            bind: default_bind(),
            allow_remote_clients: false,
            port: DEFAULT_PORT,
            upstreams: Vec::new(),
            resolv_conf: default_resolv_conf(),
            vip_range: DEFAULT_VIP_RANGE,
            cluster_domain: default_cluster_domain(),
            upstream_timeout: default_upstream_timeout(),
            max_inflight: default_max_inflight(),
            max_tcp_connections: default_max_tcp_connections(),
            tcp_idle_timeout: default_tcp_idle_timeout(),
            ttl: default_ttl(),
        }
    }
}

impl DnsConfig {
    /// Cross-field checks (`in_pod`: the node runs in in-pod mode); the error is (field under
    /// `node.dns`, value, reason).
    pub fn check(&self, in_pod: bool) -> Result<(), (&'static str, String, &'static str)> {
        if self.port == 0 {
            return Err(("port", "0".into(), "port 0 cannot be listened on"));
        }
        if !in_pod && !self.bind.is_loopback() && !self.allow_remote_clients {
            return Err((
                "bind",
                self.bind.to_string(),
                "a non-loopback DNS listener answers other hosts and amplifies spoofed UDP \
                 floods; set node.dns.allow_remote_clients: true if that is intended",
            ));
        }
        if in_pod {
            if let Some(a) = loopback_upstream(&self.upstreams) {
                return Err(("upstreams", a.to_string(), LOOPBACK_IN_POD));
            }
        }
        if self.vip_range.prefix_len() > 30 {
            return Err((
                "vip_range",
                self.vip_range.to_string(),
                "the range must hold at least 2 usable addresses (a prefix of /30 or shorter)",
            ));
        }
        if crate::dns::resolve::normalize(&self.cluster_domain).is_none() {
            return Err((
                "cluster_domain",
                self.cluster_domain.clone(),
                "not a DNS name (letters, digits, '-' and '.', labels of 1-63 bytes)",
            ));
        }
        if self.upstream_timeout.is_zero() {
            return Err((
                "upstream_timeout",
                "0s".into(),
                "a zero deadline would fail every forwarded query",
            ));
        }
        if self.max_inflight == 0 {
            return Err(("max_inflight", "0".into(), "0 would drop every query"));
        }
        if self.max_tcp_connections == 0 {
            return Err((
                "max_tcp_connections",
                "0".into(),
                "0 would refuse every TCP client",
            ));
        }
        if self.tcp_idle_timeout.is_zero() {
            return Err((
                "tcp_idle_timeout",
                "0s".into(),
                "a zero timeout would close every TCP client at once",
            ));
        }
        Ok(())
    }
}

/// Why an in-pod proxy cannot forward to a loopback resolver (config check and start).
pub const LOOPBACK_IN_POD: &str = "in in-pod mode upstream queries leave from inside each pod's \
     network namespace, where the node's loopback resolver (e.g. systemd-resolved's 127.0.0.53) \
     does not exist; set node.dns.upstreams to kube-dns's ClusterIP (e.g. 10.96.0.10:53)";

/// The first loopback address of `upstreams` (what an in-pod proxy cannot reach).
pub fn loopback_upstream(upstreams: &[SocketAddr]) -> Option<SocketAddr> {
    upstreams.iter().copied().find(|a| a.ip().is_loopback())
}

fn default_bind() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}
fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_resolv_conf() -> PathBuf {
    PathBuf::from("/etc/resolv.conf")
}
fn default_vip_range() -> Ipv4Net {
    DEFAULT_VIP_RANGE
}
fn default_cluster_domain() -> String {
    "cluster.local".into()
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(2)
}
/// Bounds the sockets and tasks a flood of forwarded queries can hold (ztunnel has no bound;
/// 256 is far above a pod's steady query rate times a 2s deadline).
fn default_max_inflight() -> usize {
    256
}
fn default_max_tcp_connections() -> usize {
    64
}
fn default_tcp_idle_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_ttl() -> u32 {
    30
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn parse(dns: &str) -> Result<Config, String> {
        let text = format!(
            "node:\n  name: n1\n  certificates: {{ file_ca: {{ dir: /tmp/ca }} }}\n  dns: {dns}\n"
        );
        Config::parse(&text, "node.yaml").map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_ztunnels_and_a_bare_enable_is_complete() {
        let c = parse("{ enabled: true }").unwrap();
        let d = &c.node.dns;
        assert!(d.enabled);
        assert_eq!((d.bind.to_string(), d.port), ("127.0.0.1".into(), 15053));
        assert_eq!(d.vip_range.to_string(), "240.240.0.0/16");
        assert_eq!(d.cluster_domain, "cluster.local");
        assert_eq!(d.upstream_timeout, std::time::Duration::from_secs(2));
        assert!(d.upstreams.is_empty());
        let c = parse("{ upstreams: ['10.0.0.53:53'], vip_range: 240.1.0.0/24 }").unwrap();
        assert!(!c.node.dns.enabled, "off unless enabled");
        assert_eq!(c.node.dns.upstreams[0].to_string(), "10.0.0.53:53");
    }

    #[test]
    fn bad_settings_are_refused_naming_the_field() {
        for (dns, want) in [
            ("{ port: 0 }", "node.dns.port"),
            ("{ vip_range: 240.0.0.0/31 }", "node.dns.vip_range"),
            (
                "{ cluster_domain: 'bad domain' }",
                "node.dns.cluster_domain",
            ),
            ("{ upstream_timeout: 0s }", "node.dns.upstream_timeout"),
            ("{ max_inflight: 0 }", "node.dns.max_inflight"),
            ("{ max_tcp_connections: 0 }", "node.dns.max_tcp_connections"),
            ("{ tcp_idle_timeout: 0s }", "node.dns.tcp_idle_timeout"),
            ("{ upstreams: [10.0.0.53] }", "upstreams"),
            ("{ vip_range: 'fd00::/64' }", "vip_range"),
            ("{ enable: true }", "unknown field `enable`"),
            ("{ bind: 0.0.0.0 }", "node.dns.bind"),
            ("{ bind: 10.1.2.3 }", "allow_remote_clients"),
        ] {
            let e = parse(dns).unwrap_err();
            assert!(e.contains(want), "{dns}: {e}");
        }
    }

    #[test]
    fn a_remote_bind_needs_the_explicit_opt_in() {
        let c = parse("{ bind: 0.0.0.0, allow_remote_clients: true }").unwrap();
        assert_eq!(c.node.dns.bind.to_string(), "0.0.0.0");
        assert!(parse("{ bind: '::1' }").is_ok(), "loopback needs no opt-in");
    }

    fn parse_in_pod(dns: &str) -> Result<Config, String> {
        let text = format!(
            "node:\n  name: n1\n  mode: in_pod\n  certificates: {{ file_ca: {{ dir: /tmp/ca }} }}\n  dns: {dns}\n"
        );
        Config::parse(&text, "node.yaml").map_err(|e| e.to_string())
    }

    #[test]
    fn in_pod_refuses_loopback_upstreams_naming_the_field_and_the_fix() {
        for up in ["127.0.0.53:53", "127.0.0.1:53", "'[::1]:53'"] {
            let e = parse_in_pod(&format!("{{ enabled: true, upstreams: [{up}] }}")).unwrap_err();
            assert!(e.contains("node.dns.upstreams"), "{e}");
            assert!(e.contains("kube-dns"), "{e}");
        }
        assert!(parse_in_pod("{ enabled: true, upstreams: ['10.96.0.10:53'] }").is_ok());
        // In-pod listeners bind 127.0.0.1 whatever `bind` says: no opt-in asked there.
        assert!(parse_in_pod("{ enabled: true, bind: 0.0.0.0 }").is_ok());
        // Host mode forwards from the node's namespace, where a loopback resolver is fine.
        assert!(parse("{ enabled: true, upstreams: ['127.0.0.53:53'] }").is_ok());
    }
}
