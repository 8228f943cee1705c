//! Building and validating the HBONE CONNECT request (docs/hbone.md, docs/reliability.md #1-#4).
//!
//! Pure functions over `http` values, so every rule is a vector in the tests below.

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use http::{Method, Request, StatusCode};

use crate::model::Workload;

/// RFC 1035 bounds host names at 255 bytes; an `ip:port` authority is far shorter.
const MAX_AUTHORITY_LEN: usize = 255;

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
    #[error("invalid :authority {0:?}: expected ip:port or [ipv6]:port")]
    BadAuthority(String),
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
            ConnectError::NoAuthority | ConnectError::BadAuthority(_) => "bad_authority",
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
    let mut forwarded = format!("for=\"{}\"", h.client_addr);
    if let Some(host) = h.service_host {
        let _ = write!(forwarded, ";host={host}");
    }
    let uri = http::Uri::builder()
        .authority(authority_string(authority))
        .build()
        .expect("a socket address is a valid authority");
    Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .header("baggage", baggage(h.source))
        .header("forwarded", forwarded)
        .header(
            "traceparent",
            format!("00-{:032x}-{:016x}-00", h.trace_id, h.span_id),
        )
        .body(())
        .expect("static header names and ASCII values")
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

/// Strict `ip:port` parsing: no host names, no userinfo, port 1-65535 (reliability #2).
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
        let ip: std::net::Ipv4Addr = h.parse().map_err(|_| bad())?;
        (IpAddr::V4(ip), p)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
        return Err(bad());
    }
    let port: u32 = port.parse().map_err(|_| bad())?;
    if port == 0 || port > 65535 {
        return Err(bad());
    }
    Ok(SocketAddr::new(host, port as u16))
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

        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("svc.local:80")
            .body(())
            .unwrap();
        assert!(matches!(
            parse_connect(&req),
            Err(ConnectError::BadAuthority(_))
        ));
    }
}
