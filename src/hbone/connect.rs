//! Building and validating the HBONE CONNECT request (docs/hbone.md, docs/reliability.md #1-#4).
//!
//! Pure functions over `http` values, so every rule is a vector in the tests below.

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use http::{Method, Request, StatusCode};

use crate::model::Workload;

/// A host name of at most 253 bytes (`valid_hostname`), `:` and a port of at most 5 digits; an
/// `ip:port` authority is far shorter.
const MAX_AUTHORITY_LEN: usize = 253 + 6;

/// Why a CONNECT is refused, and the status it maps to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("method {0} is not CONNECT")]
    NotConnect(String),
    #[error("extended CONNECT (:protocol) is not HBONE")]
    ExtendedConnect,
    #[error("CONNECT must not carry :scheme or :path")]
    SchemeOrPath,
    #[error("missing :authority")]
    NoAuthority,
    #[error("invalid :authority {0:?}: expected ip:port, [ipv6]:port or hostname:port")]
    BadAuthority(String),
    #[error(":authority {0:?} names a host; only ip:port is served here")]
    HostAuthority(String),
}

impl ConnectError {
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }

    /// The metric label for this refusal (`zmesh_rejected_total{reason}`).
    pub fn code(&self) -> &'static str {
        match self {
            ConnectError::NotConnect(_) => "not_connect",
            ConnectError::ExtendedConnect => "extended_connect",
            ConnectError::SchemeOrPath => "connect_scheme_or_path",
            ConnectError::NoAuthority
            | ConnectError::BadAuthority(_)
            | ConnectError::HostAuthority(_) => "bad_authority",
        }
    }
}

/// Source details carried in the CONNECT headers.
#[derive(Debug, Clone)]
pub struct ConnectHeaders<'a> {
    pub source: &'a Workload,
    pub client_addr: SocketAddr,
    /// The Service hostname, when the application addressed a Service.
    pub service_host: Option<&'a str>,
    pub trace_id: u128,
    pub span_id: u64,
}

/// The `baggage` header: empty fields are omitted (docs/hbone.md).
pub fn baggage(w: &Workload) -> String {
    let mut out = String::new();
    let mut push = |k: &str, v: &str| {
        if !v.is_empty() {
            if !out.is_empty() {
                out.push(',');
            }
            let _ = write!(out, "{k}={v}");
        }
    };
    push("k8s.cluster.name", &w.cluster);
    push("k8s.namespace.name", &w.namespace);
    let kind = match w.workload_type.as_str() {
        k @ ("deployment" | "pod" | "job" | "cronjob") => k,
        _ => "deployment",
    };
    push(&format!("k8s.{kind}.name"), &w.name);
    push("service.name", &w.canonical_name);
    push("service.version", &w.canonical_revision);
    out
}

/// `host:port` with IPv6 in brackets, as `:authority` and `forwarded` want it.
pub fn authority_string(addr: SocketAddr) -> String {
    addr.to_string()
}

/// Builds the classic CONNECT request a client sends for `authority`.
pub fn build_connect(authority: SocketAddr, h: &ConnectHeaders<'_>) -> Request<()> {
    request(&authority_string(authority), h, None).expect("a socket address is a valid authority")
}

/// A CONNECT for `host:port` (through an east-west gateway, docs/hbone.md "Double HBONE");
/// `forwarded_network` adds `x-forwarded-network` (the inner CONNECT). A host that the
/// receiving side would refuse is refused here, before anything is sent.
pub fn build_connect_host(
    host: &str,
    port: u16,
    h: &ConnectHeaders<'_>,
    forwarded_network: Option<&str>,
) -> Result<Request<()>, ConnectError> {
    let authority = format!("{host}:{port}");
    if !valid_hostname(host) || port == 0 {
        return Err(ConnectError::BadAuthority(
            authority.chars().take(64).collect(),
        ));
    }
    request(&authority, h, forwarded_network)
}

fn request(
    authority: &str,
    h: &ConnectHeaders<'_>,
    forwarded_network: Option<&str>,
) -> Result<Request<()>, ConnectError> {
    let bad = || ConnectError::BadAuthority(authority.chars().take(64).collect());
    let mut forwarded = format!("for=\"{}\"", h.client_addr);
    if let Some(host) = h.service_host {
        let _ = write!(forwarded, ";host={host}");
    }
    let uri = http::Uri::builder()
        .authority(authority)
        .build()
        .map_err(|_| bad())?;
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .header("baggage", baggage(h.source))
        .header("forwarded", forwarded)
        .header(
            "traceparent",
            format!("00-{:032x}-{:016x}-00", h.trace_id, h.span_id),
        );
    if let Some(n) = forwarded_network {
        req = req.header("x-forwarded-network", n);
    }
    req.body(()).map_err(|_| bad())
}

/// What a CONNECT asks for: an address, or a service's `hostname:port` (double HBONE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    Host { host: String, port: u16 },
}

/// A DNS name as service hostnames are written: lowercase letters, digits, `-` and `.`,
/// labels of 1-63 bytes not starting or ending with `-`, at most 253 bytes, and at least one
/// letter (so a mistyped IP address is never taken for a name).
pub fn valid_hostname(h: &str) -> bool {
    h.len() <= 253
        && h.bytes().any(|b| b.is_ascii_lowercase())
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// Validates an incoming CONNECT whose target may be a `hostname:port` (the node's inbound,
/// which serves double HBONE); `parse_connect` for listeners that serve addresses only.
pub fn parse_connect_target<B>(req: &Request<B>) -> Result<Target, ConnectError> {
    match parse_connect(req) {
        Ok(a) => Ok(Target::Addr(a)),
        Err(ConnectError::HostAuthority(s)) => {
            let (host, port) = s.rsplit_once(':').expect("checked by parse_authority");
            Ok(Target::Host {
                host: host.to_string(),
                port: port.parse().expect("checked by parse_authority"),
            })
        }
        Err(e) => Err(e),
    }
}

/// Validates an incoming CONNECT and returns its target.
pub fn parse_connect<B>(req: &Request<B>) -> Result<SocketAddr, ConnectError> {
    if req.method() != Method::CONNECT {
        return Err(ConnectError::NotConnect(req.method().to_string()));
    }
    if req.extensions().get::<h2::ext::Protocol>().is_some() {
        return Err(ConnectError::ExtendedConnect);
    }
    let uri = req.uri();
    if uri.scheme().is_some()
        || uri
            .path_and_query()
            .is_some_and(|p| !p.as_str().is_empty() && p.as_str() != "/")
    {
        return Err(ConnectError::SchemeOrPath);
    }
    let auth = uri.authority().ok_or(ConnectError::NoAuthority)?;
    parse_authority(auth.as_str())
}

/// Strict `ip:port` parsing: no userinfo, port 1-65535 (reliability #2). A well-formed
/// `hostname:port` is `HostAuthority`, which `parse_connect_target` accepts and others refuse.
pub fn parse_authority(s: &str) -> Result<SocketAddr, ConnectError> {
    let bad = || ConnectError::BadAuthority(s.chars().take(64).collect());
    if s.is_empty() || s.len() > MAX_AUTHORITY_LEN || !s.is_ascii() || s.contains('@') {
        return Err(bad());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        let ip: std::net::Ipv6Addr = h.parse().map_err(|_| bad())?;
        (IpAddr::V6(ip), p)
    } else {
        let (h, p) = s.rsplit_once(':').ok_or_else(bad)?;
        match h.parse::<std::net::Ipv4Addr>() {
            Ok(ip) => (IpAddr::V4(ip), p),
            Err(_) if valid_hostname(h) && valid_port(p) => {
                return Err(ConnectError::HostAuthority(s.to_string()))
            }
            Err(_) => return Err(bad()),
        }
    };
    if !valid_port(port) {
        return Err(bad());
    }
    Ok(SocketAddr::new(host, port.parse().map_err(|_| bad())?))
}

/// Decimal 1-65535, no sign, no leading `+`, at most 5 digits.
fn valid_port(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n))
}

/// A random W3C trace id and span id for a new connection.
pub fn new_trace_ids() -> (u128, u64) {
    // All-zero ids are invalid in W3C trace context.
    (rand::random::<u128>() | 1, rand::random::<u64>() | 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Locality, TunnelProtocol};
    use crate::identity::SpiffeId;

    fn workload() -> Workload {
        Workload {
            uid: "u".into(),
            name: "productpage-v1".into(),
            namespace: "bookinfo".into(),
            service_account: "pp".into(),
            identity: SpiffeId::parse("spiffe://cluster.local/ns/bookinfo/sa/pp").unwrap(),
            addresses: vec![],
            node: "n".into(),
            cluster: "Kubernetes".into(),
            protocol: TunnelProtocol::Hbone,
            workload_type: "deployment".into(),
            canonical_name: "productpage".into(),
            canonical_revision: "v1".into(),
            healthy: true,
            capacity: 1,
            locality: Locality::default(),
            services: Default::default(),
            waypoint: None,
            proxy_tunnel: None,
            network: String::new(),
        }
    }

    #[test]
    fn builds_classic_connect_with_istio_headers() {
        let w = workload();
        let h = ConnectHeaders {
            source: &w,
            client_addr: "10.0.0.1:40000".parse().unwrap(),
            service_host: Some("reviews.bookinfo.svc.cluster.local"),
            trace_id: 0xabc,
            span_id: 0x12,
        };
        let req = build_connect("10.0.0.9:9080".parse().unwrap(), &h);
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "10.0.0.9:9080");
        assert!(req.uri().scheme().is_none());
        assert_eq!(
            req.headers()["baggage"],
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=bookinfo,k8s.deployment.name=productpage-v1,service.name=productpage,service.version=v1"
        );
        assert_eq!(
            req.headers()["forwarded"],
            "for=\"10.0.0.1:40000\";host=reviews.bookinfo.svc.cluster.local"
        );
        assert_eq!(
            req.headers()["traceparent"],
            "00-00000000000000000000000000000abc-0000000000000012-00"
        );
        assert_eq!(parse_connect(&req), Ok("10.0.0.9:9080".parse().unwrap()));

        let v6 = build_connect("[fd00::1]:80".parse().unwrap(), &h);
        assert_eq!(v6.uri().to_string(), "[fd00::1]:80");
        assert_eq!(parse_connect(&v6), Ok("[fd00::1]:80".parse().unwrap()));
    }

    #[test]
    fn baggage_omits_empty_fields() {
        let mut w = workload();
        w.canonical_revision.clear();
        w.cluster.clear();
        w.workload_type = "job".into();
        assert_eq!(
            baggage(&w),
            "k8s.namespace.name=bookinfo,k8s.job.name=productpage-v1,service.name=productpage"
        );
    }

    #[test]
    fn authority_vectors() {
        let good = [
            ("10.0.0.1:80", "10.0.0.1:80"),
            ("10.0.0.1:65535", "10.0.0.1:65535"),
            ("[::1]:1", "[::1]:1"),
            ("[fd00::a:b]:8080", "[fd00::a:b]:8080"),
        ];
        for (s, want) in good {
            assert_eq!(parse_authority(s), Ok(want.parse().unwrap()), "{s}");
        }
        let bad = [
            "",
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "10.0.0.1:99999999",
            "[::1",
            "[::1]",
            "::1:80",
            "user@10.0.0.1:80",
            "example.com:80",
            "10.0.0.1:8a",
            "10.0.0.1:+80",
            "1.2.3.4.5:80",
            "ünï:80",
            "10.0.0.1:080808",
        ];
        for s in bad {
            assert!(parse_authority(s).is_err(), "{s:?} accepted");
        }
        assert!(parse_authority(&format!("{}:80", "1".repeat(300))).is_err());
    }

    #[test]
    fn non_connect_and_malformed_requests_are_refused() {
        let req = Request::builder()
            .method(Method::GET)
            .uri("http://10.0.0.1:80/")
            .body(())
            .unwrap();
        assert_eq!(
            parse_connect(&req),
            Err(ConnectError::NotConnect("GET".into()))
        );
        assert_eq!(
            ConnectError::NotConnect("GET".into()).status(),
            StatusCode::BAD_REQUEST
        );

        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("http://10.0.0.1:80/x")
            .body(())
            .unwrap();
        assert_eq!(parse_connect(&req), Err(ConnectError::SchemeOrPath));

        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
        assert_eq!(parse_connect(&req), Err(ConnectError::ExtendedConnect));

        // A hostname is refused where only addresses are served, and is a target where
        // double HBONE is.
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("svc.local:80")
            .body(())
            .unwrap();
        assert_eq!(
            parse_connect(&req),
            Err(ConnectError::HostAuthority("svc.local:80".into()))
        );
        assert_eq!(
            parse_connect_target(&req),
            Ok(Target::Host {
                host: "svc.local".into(),
                port: 80
            })
        );
    }

    #[test]
    fn hostname_authorities_are_strict() {
        let host = |a: &str| {
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(a)
                .body(())
                .unwrap();
            parse_connect_target(&req)
        };
        assert_eq!(
            host("db.data.svc.cluster.local:5432"),
            Ok(Target::Host {
                host: "db.data.svc.cluster.local".into(),
                port: 5432
            })
        );
        assert_eq!(
            host("10.0.0.1:80"),
            Ok(Target::Addr("10.0.0.1:80".parse().unwrap()))
        );
        let label64 = format!("{}.svc:80", "a".repeat(64));
        for bad in [
            "DB.data:80",     // uppercase: names are matched exactly, lowercase
            "db.data:0",      // port 0
            "db.data:65536",  // port out of range
            "db.data:+80",    // sign
            "db..data:80",    // empty label
            "-db.data:80",    // label starting with '-'
            "db-.data:80",    // label ending with '-'
            "db_data:80",     // '_' is not in a host name
            "10.0.0.300:80",  // a mistyped IP is not a name
            "db.data",        // no port
            label64.as_str(), // label over 63 bytes
        ] {
            assert!(
                matches!(host(bad), Err(ConnectError::BadAuthority(_))),
                "{bad}: {:?}",
                host(bad)
            );
        }
        assert!(!valid_hostname(&format!("{}.x", "a.".repeat(130))));
    }

    #[test]
    fn host_connects_carry_the_forwarded_network_only_when_asked() {
        let w = workload();
        let h = ConnectHeaders {
            source: &w,
            client_addr: "10.0.0.1:5555".parse().unwrap(),
            service_host: Some("db.data.svc.cluster.local"),
            trace_id: 1,
            span_id: 1,
        };
        let outer = build_connect_host("db.data.svc.cluster.local", 80, &h, None).unwrap();
        assert_eq!(outer.uri().to_string(), "db.data.svc.cluster.local:80");
        assert!(outer.headers().get("x-forwarded-network").is_none());
        let inner =
            build_connect_host("db.data.svc.cluster.local", 80, &h, Some("network-a")).unwrap();
        assert_eq!(inner.headers()["x-forwarded-network"], "network-a");
        assert_eq!(
            inner.headers()["forwarded"],
            "for=\"10.0.0.1:5555\";host=db.data.svc.cluster.local"
        );
        // A service hostname the far side would refuse is refused before anything is sent.
        assert!(matches!(
            build_connect_host("Bad Host", 80, &h, None),
            Err(ConnectError::BadAuthority(_))
        ));
    }
}
