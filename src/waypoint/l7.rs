//! Pure L7 decisions: which route rule a request takes (Gateway API precedence) and whether
//! the HTTP authorization policies admit it (Istio's decision order). No I/O.

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
                .map_or(true, |m| m.eq_ignore_ascii_case(r.method))
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
                if best.as_ref().map_or(true, |(b, _, _)| rank > *b) {
                    best = Some((rank, rule, None));
                }
                continue;
            }
            for m in &rule.matches {
                if m.matches(r) {
                    let rank = m.rank();
                    if best.as_ref().map_or(true, |(b, _, _)| rank > *b) {
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
        let principal = r.source.map(|id| {
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
            && any_glob(&self.namespaces, r.source.map(|id| id.namespace.as_str()))
            && (self.ip_blocks.is_empty()
                || self
                    .ip_blocks
                    .iter()
                    .any(|n| n.contains(&r.source_ip.to_canonical())))
            && any_glob(&self.request_principals, r.request_principal)
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

/// The verdict on one request, with the policy that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpDecision {
    pub allowed: bool,
    pub policy: Option<String>,
}

/// Istio's order over the policies that apply: any matching DENY rejects; with no ALLOW the
/// request passes; otherwise an ALLOW must match. A policy without rules matches nothing.
pub fn authorize(policies: &[&HttpPolicyConfig], r: &RequestView<'_>) -> HttpDecision {
    let label = |p: &HttpPolicyConfig| format!("{}/{}", p.namespace, p.name);
    for p in policies.iter().filter(|p| p.action == HttpAction::Deny) {
        if p.rules.iter().any(|rule| rule.matches(r)) {
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
        if p.rules.iter().any(|rule| rule.matches(r)) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn condition_keys_are_checked() {
        assert!(validate_condition("request.headers[x-id]").is_ok());
        assert!(validate_condition("request.auth.claims[sub]").is_ok());
        assert!(validate_condition("source.ip").is_err());
        assert!(validate_condition("request.headers[]").is_err());
    }
}
