//! Pure L7 decisions: which route rule a request takes (Gateway API precedence), whether the
//! HTTP authorization policies admit it (Istio's decision order), the request path as routing
//! and authorization see it, and how the same policies read a flow relayed as plain TCP. No I/O.
//!
//! **Path normalization.** Routing and authorization match the path only after it has been
//! normalized as Istio does by default (`NORMALIZE_AND_MERGE_SLASHES`), and the backend receives
//! that same normalized path, so what was judged is what is served:
//! 1. percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded (`%61` → `a`,
//!    `%2e` → `.`); every other escape is kept, with its hex digits upper-cased;
//! 2. dot segments are removed (RFC 3986 §5.2.4), including those spelled `%2e`; `..` never
//!    climbs above the root;
//! 3. runs of slashes are merged into one.
//!
//! The query string is not touched. A path is refused (400, fail closed) when it holds an escaped
//! slash or backslash (`%2F`, `%5C`, any case: Istio's default would keep them, but a backend
//! that decodes them would see a different path than the one judged), a raw backslash, a
//! malformed escape (`%`, `%4`, `%zz`), a byte outside RFC 3986's path characters (controls,
//! space, non-ASCII), or does not start with `/` (the asterisk form `*` included). The empty
//! path is `/`.
//!
//! **Policies on TCP.** A flow the waypoint relays as opaque TCP (its port is declared `tcp`, or
//! the sniffer saw no HTTP: a server-first protocol, a client that waited past the sniff
//! timeout, other bytes) has no method, path, host, header or token, so the HTTP policies of its
//! service are read as Istio reads them on a TCP filter chain:
//! - an ALLOW rule that uses any HTTP-only field (`to.methods`, `to.paths`, `to.hosts`,
//!   `from.request_principals`, any `when` condition) cannot match;
//! - a DENY rule is matched on its other fields alone (its HTTP-only fields are ignored), so a
//!   DENY on a path denies every TCP flow its other fields match;
//! - a required JWT (RequestAuthentication with `required: true`) denies every TCP flow.
//!
//! A denied TCP flow is reset before anything is dialed upstream. A service that carries HTTP
//! policies therefore fails closed for traffic that does not speak HTTP promptly.

use std::net::IpAddr;

use http::HeaderMap;
use serde_json::{Map, Value};

use super::config::{
    HttpAction, HttpCondition, HttpFrom, HttpPolicyConfig, HttpRule, HttpTo, PathMatch,
    RequestMatch, RouteConfig, RouteRule, ValueMatch,
};
use crate::identity::SpiffeId;

/// What a request looks like to routing and authorization.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The Host (or :authority) the client used, without port.
    pub host: &'a str,
    pub port: u16,
    pub source: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    /// Claims of a validated JWT, and `iss/sub`.
    pub claims: Option<&'a Map<String, Value>>,
    pub request_principal: Option<&'a str>,
}

fn value_matches(m: &ValueMatch, v: Option<&str>) -> bool {
    match (v, &m.exact, &m.regex) {
        (None, _, _) => false,
        (Some(v), Some(e), _) => v == e,
        (Some(v), None, Some(r)) => r.0.is_match(v),
        (Some(_), None, None) => true,
    }
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

impl RequestMatch {
    fn matches(&self, r: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => r.path == p,
            // Gateway API: a prefix matches whole path segments (`/v2` matches `/v2/x`, not `/v20`).
            Some(PathMatch::Prefix(p)) => {
                let p = p.trim_end_matches('/');
                p.is_empty()
                    || r.path == p
                    || (r.path.starts_with(p) && r.path.as_bytes().get(p.len()) == Some(&b'/'))
            }
            Some(PathMatch::Regex(re)) => re.0.is_match(r.path),
        };
        path_ok
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(r.method))
            && self
                .headers
                .iter()
                .all(|h| value_matches(h, r.headers.get(&h.name).and_then(|v| v.to_str().ok())))
            && self
                .query
                .iter()
                .all(|q| value_matches(q, query_param(r.query, &q.name)))
    }

    /// Gateway API precedence: exact path, then the longest prefix (regex in between), then a
    /// method, then more header matches, then more query matches.
    fn rank(&self) -> Rank {
        let (kind, len) = match &self.path {
            Some(PathMatch::Exact(p)) => (3, p.len()),
            Some(PathMatch::Regex(_)) => (2, 0),
            Some(PathMatch::Prefix(p)) => (1, p.len()),
            None => (0, 0),
        };
        (
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }
}

/// Specificity of a match: path kind (exact > regex > prefix > none), prefix length, has a
/// method, header count, query count.
type Rank = (u8, usize, bool, usize, usize);

/// The rule of `routes` a request takes, and the path match that selected it (for rewrites).
/// Among rules whose matches hold, the most specific match wins; ties go to the earlier rule.
pub fn select_rule<'a>(
    routes: &[&'a RouteConfig],
    r: &RequestView<'_>,
) -> Option<(&'a RouteRule, Option<&'a PathMatch>)> {
    let mut best: Option<(Rank, &'a RouteRule, Option<&'a PathMatch>)> = None;
    for route in routes {
        for rule in &route.rules {
            if rule.matches.is_empty() {
                let rank = (0, 0, false, 0, 0);
                if best.as_ref().is_none_or(|(b, _, _)| rank > *b) {
                    best = Some((rank, rule, None));
                }
                continue;
            }
            for m in &rule.matches {
                if m.matches(r) {
                    let rank = m.rank();
                    if best.as_ref().is_none_or(|(b, _, _)| rank > *b) {
                        best = Some((rank, rule, m.path.as_ref()));
                    }
                }
            }
        }
    }
    best.map(|(_, rule, path)| (rule, path))
}

/// Istio string match: exact, `prefix*`, `*suffix`, `*`.
fn glob(pattern: &str, v: &str) -> bool {
    if pattern == "*" {
        return !v.is_empty();
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return v.ends_with(suffix);
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return v.starts_with(prefix);
    }
    pattern == v
}

fn any_glob(patterns: &[String], v: Option<&str>) -> bool {
    patterns.is_empty() || v.is_some_and(|v| patterns.iter().any(|p| glob(p, v)))
}

impl HttpFrom {
    fn matches(&self, r: &RequestView<'_>) -> bool {
        self.matches_l4(r.source, r.source_ip)
            && any_glob(&self.request_principals, r.request_principal)
    }

    /// The fields a TCP flow has too: principals, namespaces, ip blocks.
    fn matches_l4(&self, source: Option<&SpiffeId>, source_ip: IpAddr) -> bool {
        let principal = source.map(|id| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain, id.namespace, id.service_account
            )
        });
        let principals: Vec<String> = self
            .principals
            .iter()
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p).to_string())
            .collect();
        any_glob(&principals, principal.as_deref())
            && any_glob(&self.namespaces, source.map(|id| id.namespace.as_str()))
            && (self.ip_blocks.is_empty()
                || self
                    .ip_blocks
                    .iter()
                    .any(|n| n.contains(&source_ip.to_canonical())))
    }
}

impl HttpTo {
    fn matches(&self, r: &RequestView<'_>) -> bool {
        (self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(r.method)))
            && any_glob(&self.paths, Some(r.path))
            && (self.ports.is_empty() || self.ports.contains(&r.port))
            && any_glob(&self.hosts, Some(r.host))
    }
}

impl HttpCondition {
    fn matches(&self, r: &RequestView<'_>) -> bool {
        let inner = |prefix: &str| {
            self.key
                .strip_prefix(prefix)
                .and_then(|k| k.strip_suffix(']'))
        };
        let value: Option<String> = if let Some(h) = inner("request.headers[") {
            r.headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        } else if let Some(c) = inner("request.auth.claims[") {
            match r.claims.and_then(|m| m.get(c)) {
                Some(Value::String(s)) => Some(s.clone()),
                // A list claim (groups, scopes) matches when any element does.
                Some(Value::Array(a)) => {
                    return a
                        .iter()
                        .filter_map(Value::as_str)
                        .any(|s| self.values.iter().any(|p| glob(p, s)))
                }
                Some(v) => Some(v.to_string()),
                None => None,
            }
        } else {
            // Unknown keys never match: with an ALLOW that means deny, with a DENY it is
            // refused at load (see `validate_condition`).
            None
        };
        value.is_some_and(|v| self.values.iter().any(|p| glob(p, &v)))
    }
}

impl HttpTo {
    fn has_http_fields(&self) -> bool {
        !(self.methods.is_empty() && self.paths.is_empty() && self.hosts.is_empty())
    }
}

/// Keys a `when` condition may use.
pub fn validate_condition(key: &str) -> Result<(), String> {
    let ok = ["request.headers[", "request.auth.claims["]
        .iter()
        .any(|p| key.starts_with(p) && key.ends_with(']') && key.len() > p.len() + 1);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "unsupported condition key {key:?}: use request.headers[<name>] or request.auth.claims[<claim>]"
        ))
    }
}

impl HttpRule {
    fn matches(&self, r: &RequestView<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|f| f.matches(r)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.matches(r)))
            && self.when.iter().all(|c| c.matches(r))
    }
}

impl HttpRule {
    /// Whether the rule names anything only an HTTP request has.
    fn has_http_fields(&self) -> bool {
        !self.when.is_empty()
            || self.from.iter().any(|f| !f.request_principals.is_empty())
            || self.to.iter().any(HttpTo::has_http_fields)
    }

    /// The rule's L4 fields alone against a TCP flow.
    fn matches_l4(&self, t: &TcpView<'_>) -> bool {
        (self.from.is_empty()
            || self
                .from
                .iter()
                .any(|f| f.matches_l4(t.source, t.source_ip)))
            && (self.to.is_empty()
                || self
                    .to
                    .iter()
                    .any(|to| to.ports.is_empty() || to.ports.contains(&t.port)))
    }
}

/// What a flow relayed as TCP shows authorization: no HTTP, only who sent it and to which port.
pub struct TcpView<'a> {
    pub source: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub port: u16,
}

/// The HTTP policies that apply to a service, read for a TCP flow (module docs: "Policies on
/// TCP"): a DENY rule matches on its L4 fields alone; an ALLOW rule with an HTTP-only field
/// never matches. Otherwise Istio's order, as in [`authorize`].
pub fn authorize_tcp(policies: &[&HttpPolicyConfig], t: &TcpView<'_>) -> HttpDecision {
    decide(
        policies,
        |rule| rule.matches_l4(t),
        |rule| !rule.has_http_fields() && rule.matches_l4(t),
    )
}

/// The verdict on one request, with the policy that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpDecision {
    pub allowed: bool,
    pub policy: Option<String>,
}

/// Istio's order over the policies that apply: any matching DENY rejects; with no ALLOW the
/// request passes; otherwise an ALLOW must match. A policy without rules matches nothing.
pub fn authorize(policies: &[&HttpPolicyConfig], r: &RequestView<'_>) -> HttpDecision {
    decide(policies, |rule| rule.matches(r), |rule| rule.matches(r))
}

/// Istio's decision order, with how a DENY rule and an ALLOW rule match given by the caller
/// (a request, or a TCP flow's reading of the same rules).
fn decide(
    policies: &[&HttpPolicyConfig],
    deny_matches: impl Fn(&HttpRule) -> bool,
    allow_matches: impl Fn(&HttpRule) -> bool,
) -> HttpDecision {
    let label = |p: &HttpPolicyConfig| format!("{}/{}", p.namespace, p.name);
    for p in policies.iter().filter(|p| p.action == HttpAction::Deny) {
        if p.rules.iter().any(&deny_matches) {
            return HttpDecision {
                allowed: false,
                policy: Some(label(p)),
            };
        }
    }
    let mut allows = policies
        .iter()
        .filter(|p| p.action == HttpAction::Allow)
        .peekable();
    if allows.peek().is_none() {
        return HttpDecision {
            allowed: true,
            policy: None,
        };
    }
    for p in allows {
        if p.rules.iter().any(&allow_matches) {
            return HttpDecision {
                allowed: true,
                policy: Some(label(p)),
            };
        }
    }
    HttpDecision {
        allowed: false,
        policy: None,
    }
}

/// Why a request path cannot be judged (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("an escaped slash or backslash (%2F, %5C) in the path is refused")]
    EscapedSlash,
    #[error("a backslash in the path is refused")]
    Backslash,
    #[error("malformed percent-escape at byte {0}")]
    BadEscape(usize),
    #[error("byte 0x{0:02x} is not allowed in a path")]
    BadByte(u8),
}

/// RFC 3986 unreserved characters: their escapes mean the same as the character.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters RFC 3986 allows in a path besides unreserved ones and `%`: sub-delims, `:`, `@`
/// and `/`.
fn path_char(b: u8) -> bool {
    unreserved(b) || b"!$&'()*+,;=:@/".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The path routing, authorization and the backend see (module docs: "Path normalization").
/// `path` is the request's path without the query string.
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    if path.is_empty() {
        return Ok("/".into());
    }
    let raw = path.as_bytes();
    if raw[0] != b'/' {
        return Err(PathError::NotAbsolute);
    }
    // 1. Escapes: unreserved ones decoded, slashes refused, the rest kept in upper case.
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    raw.get(i + 1).copied().and_then(hex),
                    raw.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape(i));
                };
                let c = h << 4 | l;
                if c == b'/' || c == b'\\' {
                    return Err(PathError::EscapedSlash);
                }
                if unreserved(c) {
                    decoded.push(c as char);
                } else {
                    decoded.push_str(&format!("%{c:02X}"));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            _ if path_char(b) => {
                decoded.push(b as char);
                i += 1;
            }
            _ => return Err(PathError::BadByte(b)),
        }
    }
    // 2. Dot segments (RFC 3986 §5.2.4, on a path that starts with '/'): each segment is
    // pushed, `.` dropped, `..` pops; a final `.` or `..` leaves a trailing slash.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    out.pop();
                }
                if n == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    // 3. Merge slashes: empty segments vanish, except a trailing one (the trailing slash).
    let mut merged = String::with_capacity(decoded.len());
    let last = out.len().saturating_sub(1);
    for (n, seg) in out.iter().enumerate() {
        if seg.is_empty() && n != last {
            continue;
        }
        merged.push('/');
        merged.push_str(seg);
    }
    if merged.is_empty() {
        merged.push('/');
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_like_istio_or_refused() {
        use PathError::*;
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/", Ok("/")),
            ("", Ok("/")),
            ("/admin", Ok("/admin")),
            ("//admin", Ok("/admin")),
            ("///admin", Ok("/admin")),
            ("/./admin", Ok("/admin")),
            ("/x/../admin", Ok("/admin")),
            ("/%61dmin", Ok("/admin")),
            ("/%2e/admin", Ok("/admin")),
            ("/%2E%2E/admin", Ok("/admin")),
            ("/ok/%2e%2e/admin", Ok("/admin")),
            ("/ok/..%2Fadmin", Err(EscapedSlash)),
            ("/ok/..%2fadmin", Err(EscapedSlash)),
            ("/ok%5Cadmin", Err(EscapedSlash)),
            ("/ok%5cadmin", Err(EscapedSlash)),
            ("/ok\\admin", Err(Backslash)),
            ("/..", Ok("/")),
            ("/../admin", Ok("/admin")),
            ("/a/b/../../..", Ok("/")),
            ("/a/b/../../../admin", Ok("/admin")),
            ("/a/b/..", Ok("/a/")),
            ("/a/.", Ok("/a/")),
            ("/admin/", Ok("/admin/")),
            ("/admin//", Ok("/admin/")),
            ("/a//b///c", Ok("/a/b/c")),
            ("/a//../admin", Ok("/a/admin")),
            ("/admin/..", Ok("/")),
            ("/.admin", Ok("/.admin")),
            ("/...", Ok("/...")),
            ("/%7Euser", Ok("/~user")),
            ("/a%20b", Ok("/a%20b")),
            ("/a%3fb", Ok("/a%3Fb")),
            ("/caf%c3%a9", Ok("/caf%C3%A9")),
            ("/%", Err(BadEscape(1))),
            ("/%4", Err(BadEscape(1))),
            ("/%zz", Err(BadEscape(1))),
            ("/a%g1", Err(BadEscape(2))),
            ("/caf\u{e9}", Err(BadByte(0xc3))),
            ("/a b", Err(BadByte(b' '))),
            ("/a\tb", Err(BadByte(b'\t'))),
            ("*", Err(NotAbsolute)),
            ("admin", Err(NotAbsolute)),
            ("/v1;x=1/items", Ok("/v1;x=1/items")),
        ];
        for (input, want) in cases {
            let got = normalize_path(input);
            assert_eq!(
                got.as_deref().map_err(Clone::clone),
                want.clone(),
                "{input:?}"
            );
        }
        // Normalizing twice changes nothing.
        for (input, want) in cases {
            if let Ok(p) = want {
                assert_eq!(normalize_path(p).as_deref(), Ok(*p), "{input:?}");
            }
        }
    }

    fn routes(yaml: &str) -> Vec<RouteConfig> {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn view<'a>(
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method,
            path,
            query,
            headers,
            host: "s.shop",
            port: 80,
            source: None,
            source_ip: [10, 0, 0, 1].into(),
            claims: None,
            request_principal: None,
        }
    }

    fn backend(rule: Option<(&RouteRule, Option<&PathMatch>)>) -> String {
        rule.map(|(r, _)| r.backends[0].service.clone())
            .unwrap_or_default()
    }

    #[test]
    fn precedence_exact_then_longest_prefix_then_method_headers_query() {
        let rs = routes(
            r#"
- name: r
  service: shop/s
  rules:
    - matches: [{ path: { prefix: / } }]
      backends: [{ service: root }]
    - matches: [{ path: { prefix: /v2 } }]
      backends: [{ service: v2 }]
    - matches: [{ path: { prefix: /v2/api } }]
      backends: [{ service: v2api }]
    - matches: [{ path: { exact: /v2/api/health } }]
      backends: [{ service: health }]
    - matches: [{ path: { prefix: /v2 }, method: POST }]
      backends: [{ service: v2post }]
    - matches: [{ path: { prefix: /v2 }, headers: [{ name: x-canary, exact: "1" }] }]
      backends: [{ service: canary }]
    - matches: [{ path: { regex: "/items/[0-9]+" } }]
      backends: [{ service: items }]
    - matches: [{ path: { prefix: /q }, query: [{ name: debug, exact: "1" }] }]
      backends: [{ service: debug }]
"#,
        );
        let refs: Vec<&RouteConfig> = rs.iter().collect();
        let h = HeaderMap::new();
        let mut canary = HeaderMap::new();
        canary.insert("x-canary", "1".parse().unwrap());
        let pick = |m, p, q, h| backend(select_rule(&refs, &view(m, p, q, h)));
        assert_eq!(pick("GET", "/", None, &h), "root");
        assert_eq!(pick("GET", "/v2/x", None, &h), "v2");
        assert_eq!(
            pick("GET", "/v20", None, &h),
            "root",
            "prefixes match whole segments"
        );
        assert_eq!(
            pick("GET", "/v2/api/x", None, &h),
            "v2api",
            "longest prefix"
        );
        assert_eq!(
            pick("GET", "/v2/api/health", None, &h),
            "health",
            "exact beats prefix"
        );
        assert_eq!(
            pick("POST", "/v2/x", None, &h),
            "v2post",
            "a method beats none"
        );
        assert_eq!(
            pick("GET", "/v2/x", None, &canary),
            "canary",
            "a header beats none"
        );
        assert_eq!(
            pick("GET", "/items/42", None, &h),
            "items",
            "regex beats prefix"
        );
        assert_eq!(
            pick("GET", "/items/4x", None, &h),
            "root",
            "regexes are anchored"
        );
        assert_eq!(pick("GET", "/q", Some("a=2&debug=1"), &h), "debug");
        assert_eq!(pick("GET", "/q", Some("debug=0"), &h), "root");
    }

    #[test]
    fn authorization_follows_istio_order_with_http_fields() {
        let ps: Vec<HttpPolicyConfig> = serde_yaml::from_str(
            r#"
- name: deny-admin
  namespace: shop
  action: deny
  rules: [{ to: [{ paths: ["/admin*"] }] }]
- name: allow-frontend-get
  namespace: shop
  action: allow
  rules:
    - from: [{ principals: ["cluster.local/ns/shop/sa/frontend"] }]
      to: [{ methods: [GET] }]
    - when: [{ key: "request.auth.claims[groups]", values: [admins] }]
"#,
        )
        .unwrap();
        let refs: Vec<&HttpPolicyConfig> = ps.iter().collect();
        let fe = SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
        let other = SpiffeId::new("cluster.local", "shop", "other").unwrap();
        let h = HeaderMap::new();
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"groups": ["dev", "admins"]}"#).unwrap();
        let check = |m, p, src: Option<&SpiffeId>, claims| {
            let mut v = view(m, p, None, &h);
            v.source = src;
            v.claims = claims;
            authorize(&refs, &v)
        };
        let d = check("GET", "/admin/x", Some(&fe), None);
        assert_eq!(
            (d.allowed, d.policy.as_deref()),
            (false, Some("shop/deny-admin"))
        );
        let d = check("GET", "/items", Some(&fe), None);
        assert_eq!(
            (d.allowed, d.policy.as_deref()),
            (true, Some("shop/allow-frontend-get"))
        );
        assert!(
            !check("POST", "/items", Some(&fe), None).allowed,
            "method not allowed"
        );
        assert!(
            !check("GET", "/items", Some(&other), None).allowed,
            "principal not allowed"
        );
        assert!(
            check("POST", "/items", Some(&other), Some(&claims)).allowed,
            "JWT claim allows"
        );
        assert!(
            authorize(&[], &view("GET", "/", None, &h)).allowed,
            "no policy: allowed"
        );
    }

    #[test]
    fn tcp_flows_read_http_policies_as_istio_does() {
        let policy = |yaml: &str| -> HttpPolicyConfig { serde_yaml::from_str(yaml).unwrap() };
        let fe = SpiffeId::new("cluster.local", "shop", "frontend").unwrap();
        let other = SpiffeId::new("cluster.local", "shop", "other").unwrap();
        fn flow(src: &SpiffeId, port: u16) -> TcpView<'_> {
            TcpView {
                source: Some(src),
                source_ip: [10, 0, 0, 1].into(),
                port,
            }
        }
        let (fe, other) = (&fe, &other);
        // (policy, flow, allowed?, why)
        let cases: Vec<(HttpPolicyConfig, TcpView<'_>, bool, &str)> = vec![
            (
                policy("{name: p, namespace: shop, action: deny, rules: [{to: [{paths: [\"/admin*\"]}]}]}"),
                flow(fe, 80),
                false,
                "a DENY on a path denies every TCP flow",
            ),
            (
                policy("{name: p, namespace: shop, action: deny, rules: [{to: [{paths: [\"/admin*\"], ports: [81]}]}]}"),
                flow(fe, 80),
                true,
                "a DENY's L4 fields still narrow it",
            ),
            (
                policy("{name: p, namespace: shop, action: deny, rules: [{from: [{request_principals: [\"*\"]}]}]}"),
                flow(fe, 80),
                false,
                "a DENY on request principals denies TCP",
            ),
            (
                policy("{name: p, namespace: shop, action: deny, rules: [{when: [{key: \"request.headers[x]\", values: [a]}]}]}"),
                flow(fe, 80),
                false,
                "a DENY on a header denies TCP",
            ),
            (
                policy("{name: p, namespace: shop, action: deny, rules: [{from: [{principals: [\"cluster.local/ns/shop/sa/other\"]}], to: [{methods: [GET]}]}]}"),
                flow(fe, 80),
                true,
                "a DENY for another source does not touch this one",
            ),
            (
                policy("{name: p, namespace: shop, action: allow, rules: [{to: [{methods: [GET]}]}]}"),
                flow(fe, 80),
                false,
                "an ALLOW on a method cannot match TCP",
            ),
            (
                policy("{name: p, namespace: shop, action: allow, rules: [{to: [{hosts: [s]}]}]}"),
                flow(fe, 80),
                false,
                "an ALLOW on a host cannot match TCP",
            ),
            (
                policy("{name: p, namespace: shop, action: allow, rules: [{from: [{principals: [\"cluster.local/ns/shop/sa/frontend\"]}]}]}"),
                flow(fe, 80),
                true,
                "an ALLOW on L4 fields only matches TCP",
            ),
            (
                policy("{name: p, namespace: shop, action: allow, rules: [{from: [{principals: [\"cluster.local/ns/shop/sa/frontend\"]}]}]}"),
                flow(other, 80),
                false,
                "an L4 ALLOW for someone else",
            ),
            (
                policy("{name: p, namespace: shop, action: allow, rules: [{to: [{ports: [80]}]}, {to: [{paths: [/x]}]}]}"),
                flow(other, 80),
                true,
                "one L4-only rule of an ALLOW is enough",
            ),
        ];
        for (p, t, allowed, why) in &cases {
            assert_eq!(authorize_tcp(&[p], t).allowed, *allowed, "{why}");
        }
        assert!(
            authorize_tcp(&[], &flow(fe, 80)).allowed,
            "no policy: allowed"
        );
    }

    #[test]
    fn condition_keys_are_checked() {
        assert!(validate_condition("request.headers[x-id]").is_ok());
        assert!(validate_condition("request.auth.claims[sub]").is_ok());
        assert!(validate_condition("source.ip").is_err());
        assert!(validate_condition("request.headers[]").is_err());
    }
}
