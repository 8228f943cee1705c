//! The waypoint's sections of the config file: `waypoint`, `routes`, `http_policies` and
//! `request_authentication`. Shaped after Gateway API's HTTPRoute and Istio's
//! AuthorizationPolicy / RequestAuthentication, with zmesh's strictness: unknown fields are
//! errors with line and column, and a value that cannot be used (a bad regex, a weight that is
//! not a number) refuses the file, so the last good config keeps running.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `waypoint:`: which workload of the model this process is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaypointSettings {
    /// uid of the waypoint's own workload: its identity is the waypoint's certificate, its
    /// address is where it listens.
    pub workload: String,
    /// Opt-in "sandwich" (docs/waypoint.md): the waypoint serves this plain TCP port instead
    /// of HBONE, and every connection starts with a PROXY v2 header from the node tunnel in
    /// front of it (which owns HBONE on the same address), naming the client and its
    /// identity. Istio uses 15088. Absent: HBONE on `node.ports.hbone`.
    #[serde(default)]
    pub proxy_protocol_port: Option<std::num::NonZeroU16>,
}

/// One HTTPRoute: rules for the requests addressed to `service`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// `namespace/hostname` of the service whose traffic this route handles.
    pub service: String,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
    /// gRPC↔JSON transcoding for this service (docs/waypoint.md): HTTP/1.1 JSON requests that
    /// match a method's `google.api.http` binding are sent to the service as gRPC calls.
    #[serde(default)]
    pub grpc_transcoding: Option<GrpcTranscoding>,
}

/// `routes[].grpc_transcoding`: which gRPC services of a descriptor set the waypoint offers
/// as JSON over HTTP, and how it prints their answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcTranscoding {
    /// A FileDescriptorSet with its imports, as `protoc --include_imports
    /// --descriptor_set_out` writes it; read (and re-read on reload) when the config loads.
    pub descriptor_set: PathBuf,
    /// Fully qualified gRPC services to transcode (`pkg.Service`); each must be in the set.
    pub services: Vec<String>,
    /// How a server-streaming method's messages are sent: `ndjson` (default) or `array`.
    #[serde(default)]
    pub streaming: StreamingFormat,
    /// A method without a `google.api.http` option is refused at load unless this is set;
    /// then it is offered as `POST /<pkg.Service>/<Method>` with body `*`.
    #[serde(default)]
    pub unannotated_methods: bool,
    /// Query parameters that name no field are refused (400) unless this is set.
    #[serde(default)]
    pub ignore_unknown_query_parameters: bool,
    #[serde(default)]
    pub print: JsonPrint,
    /// Largest JSON request body accepted (larger: 413). Default 1 MiB.
    #[serde(default = "default_json_body")]
    pub max_request_bytes: u32,
    /// Largest gRPC response message accepted from the service (larger: 502). Default 4 MiB,
    /// gRPC's own default receive limit.
    #[serde(default = "default_grpc_message")]
    pub max_response_message_bytes: u32,
}

fn default_json_body() -> u32 {
    1024 * 1024
}

fn default_grpc_message() -> u32 {
    4 * 1024 * 1024
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamingFormat {
    /// One JSON object per line (`application/x-ndjson`).
    #[default]
    Ndjson,
    /// One JSON array, its elements sent as they arrive (`application/json`).
    Array,
}

/// How response messages are printed (the proto3 JSON mapping's printer options).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonPrint {
    /// Field names as in the .proto (`shelf_id`) instead of lowerCamelCase (`shelfId`).
    #[serde(default)]
    pub use_proto_field_names: bool,
    /// Print fields that hold their default value (0, "", false, empty lists).
    #[serde(default)]
    pub emit_defaults: bool,
    /// Enums as numbers instead of their names.
    #[serde(default)]
    pub enums_as_ints: bool,
    /// 64-bit integers as JSON numbers instead of strings (the mapping's default is strings,
    /// since JavaScript loses precision above 2^53).
    #[serde(default)]
    pub int64_as_numbers: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// Any of these selects the rule; none means every request.
    #[serde(default)]
    pub matches: Vec<RequestMatch>,
    /// Weighted services to send to; none means the route's own service.
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub retries: Option<Retries>,
    #[serde(default)]
    pub fault: Option<Fault>,
    #[serde(default)]
    pub request_headers: HeaderOps,
    #[serde(default)]
    pub response_headers: HeaderOps,
    #[serde(default)]
    pub redirect: Option<Redirect>,
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query: Vec<ValueMatch>,
}

/// `{exact: /p}`, `{prefix: /p}` or `{regex: "..."}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawPathMatch")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

// A map with one key rather than a serde enum: serde_yaml 0.9 reads data-carrying enum
// variants only from `!tags`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPathMatch {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

impl TryFrom<RawPathMatch> for PathMatch {
    type Error = String;
    fn try_from(r: RawPathMatch) -> Result<Self, String> {
        let check = |p: String| {
            if p.starts_with('/') {
                Ok(p)
            } else {
                Err(format!("path {p:?} must start with '/'"))
            }
        };
        match (r.exact, r.prefix, r.regex) {
            (Some(p), None, None) => Ok(PathMatch::Exact(check(p)?)),
            (None, Some(p), None) => Ok(PathMatch::Prefix(check(p)?)),
            (None, None, Some(re)) => compile(&re).map(PathMatch::Regex),
            _ => Err("a path match needs exactly one of exact, prefix or regex".into()),
        }
    }
}

/// A header or query parameter: `name` plus `exact` or `regex` (neither: present).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default, deserialize_with = "de_opt_regex")]
    pub regex: Option<Regex>,
}

/// A compiled, anchored regex that still compares and prints as written.
#[derive(Debug, Clone)]
pub struct Regex(pub regex::Regex);

fn compile(s: &str) -> Result<Regex, String> {
    // Anchored, as Gateway API and Envoy match the whole value.
    regex::Regex::new(&format!("^(?:{s})$"))
        .map(Regex)
        .map_err(|e| format!("invalid regex {s:?}: {e}"))
}

fn de_opt_regex<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Regex>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| compile(&s).map_err(serde::de::Error::custom))
        .transpose()
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| crate::config::parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    crate::config::parse_duration(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// `namespace/hostname`.
    pub service: String,
    /// The service port; default: the port the client addressed.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    FiveXx,
    /// The upstream stream or connection was reset mid-request.
    Reset,
    /// No connection could be made (dial, TLS, CONNECT refused).
    ConnectFailure,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first try (Istio's `attempts`).
    pub attempts: u32,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::ConnectFailure, RetryOn::Reset, RetryOn::FiveXx]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    pub percent: f64,
    #[serde(deserialize_with = "de_duration")]
    pub fixed: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    pub percent: f64,
    pub status: u16,
}

/// Header edits: `set` replaces, `add` appends, `remove` deletes (applied remove, set, add).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default = "default_redirect_status")]
    pub status: u16,
}

fn default_redirect_status() -> u16 {
    302
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the matched path prefix (with a `prefix` path match) or the whole path.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
}

/// An L7 authorization policy (Istio AuthorizationPolicy with HTTP fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPolicyConfig {
    pub name: String,
    pub namespace: String,
    /// `namespace/hostname` of the service it applies to; none: every service of `namespace`.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub action: HttpAction,
    #[serde(default)]
    pub rules: Vec<HttpRule>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpAction {
    #[default]
    Allow,
    Deny,
}

/// All of `from`, `to` and `when` must hold (each list: any element).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRule {
    #[serde(default)]
    pub from: Vec<HttpFrom>,
    #[serde(default)]
    pub to: Vec<HttpTo>,
    #[serde(default)]
    pub when: Vec<HttpCondition>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFrom {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<ipnet::IpNet>,
    /// `issuer/subject` of a validated JWT; `*` = any valid token.
    #[serde(default)]
    pub request_principals: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTo {
    #[serde(default)]
    pub methods: Vec<String>,
    /// Exact, `prefix*` or `*suffix`.
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// `key` is `request.headers[<name>]` or `request.auth.claims[<claim>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCondition {
    pub key: String,
    pub values: Vec<String>,
}

/// JWT validation for a service's requests (Istio RequestAuthentication).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestAuthConfig {
    pub name: String,
    /// `namespace/hostname`.
    pub service: String,
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    /// A JWKS document (`{"keys": [...]}`), inline.
    #[serde(default)]
    pub jwks: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Refuse requests without a token (401), not only those with a bad one.
    #[serde(default)]
    pub required: bool,
    /// Claims copied into request headers for the backend: claim → header.
    #[serde(default)]
    pub claims_to_headers: BTreeMap<String, String>,
}

/// Per-service limits a waypoint enforces on its upstream traffic (Istio DestinationRule
/// `connectionPool` and `outlierDetection`). Absent limits are unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficPolicy {
    /// Concurrent upstream connections (with HTTP/1.1: requests in flight) to the service.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Requests allowed to wait for a connection when `max_connections` is reached; more get
    /// 503 at once.
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
    /// Concurrent requests to the service, on any protocol.
    #[serde(default)]
    pub max_requests: Option<u32>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx (or connect failures) that eject an endpoint.
    pub consecutive_5xx: u32,
    /// First ejection length; each further ejection of the same endpoint lasts one more.
    #[serde(default = "default_ejection", deserialize_with = "de_duration")]
    pub base_ejection_time: Duration,
    /// At most this share of the service's endpoints is ejected at once.
    #[serde(default = "default_max_ejection")]
    pub max_ejection_percent: u32,
}

fn default_ejection() -> Duration {
    Duration::from_secs(30)
}

fn default_max_ejection() -> u32 {
    10
}

#[cfg(test)]
mod tests {
    use super::compile;

    /// Route regexes are anchored and take Unicode classes and case folding, as Envoy's RE2
    /// does: `regex` is built with its Unicode tables (the workspace's Cargo.toml), which the
    /// node and the waypoint once got only through the Kubernetes client's dependencies. A test
    /// build still has those dependencies (the enrollment tests), so this checks the behaviour;
    /// the workspace's declaration is what keeps the tables in a binary built alone.
    #[test]
    fn regexes_are_anchored_and_take_unicode_classes() {
        let r = compile(r"\p{Greek}+/\d+").expect("a Unicode class compiles");
        assert!(r.0.is_match("αβγ/42"));
        assert!(!r.0.is_match("abc/42"));
        assert!(!r.0.is_match("x αβγ/42"), "anchored at the start");
        assert!(!r.0.is_match("αβγ/42 x"), "anchored at the end");
        assert!(compile("(?i)δ").expect("case folding").0.is_match("Δ"));
        let e = compile("(").expect_err("an unclosed group is refused");
        assert!(e.contains("invalid regex \"(\""), "{e}");
    }
}
