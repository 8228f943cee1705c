//! L4 authorization policy: Istio's `AuthorizationPolicy` semantics, evaluated at the destination.
//!
//! The shape follows istio's `authorization.proto` as ztunnel consumes it: a policy's rules are
//! OR-ed, the clauses of one rule are AND-ed, the matches of one clause are OR-ed, and inside one
//! match every non-empty field must hold (a list field holds when ANY element matches, its `not_`
//! form when NO element matches). The decision order is Istio's (docs/model.md "Decision order"):
//! dry-run policies are evaluated and reported but never change the verdict; any applicable DENY
//! that matches rejects; with no applicable ALLOW the connection is allowed; otherwise some ALLOW
//! must match.
//!
//! Policy is security configuration, so this module fails closed: a policy that cannot be parsed
//! or validated is never dropped. It is kept as a *broken* policy that denies every connection in
//! the scope it was meant to cover (widened to its namespace, or the whole mesh, when even the
//! scope is unreadable), and its error is reported with the policy and field that caused it.
//!
//! Everything here is pure: no I/O, no clock. Policies are bucketed by scope (mesh-wide, per
//! namespace, per selected workload) so a decision only touches the policies that apply to the
//! destination workload, however many policies the mesh holds.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::identity::SpiffeId;

/// Bound on any one string in a policy, matching the config file's limit, so hostile input cannot
/// balloon memory.
const MAX_STRING: usize = 4096;
/// Kubernetes object names (RFC 1123 subdomains) are at most 253 bytes.
const MAX_NAME: usize = 253;
/// Istio writes principals without the URI scheme (`cluster.local/ns/a/sa/b`); users often paste
/// the full SPIFFE URI. Both are accepted and compared scheme-less.
const SPIFFE_SCHEME: &str = "spiffe://";

/// Which workloads a policy applies to. YAML: `global`, `namespace`, or
/// `{workload_selector: {workloads: [name, ...]}}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scope {
    /// Every workload in the mesh (Istio: a policy in the root namespace without a selector).
    Global,
    /// Every workload in the policy's namespace. The default, as in Istio when no selector is set.
    #[default]
    Namespace,
    /// The workloads of the policy's namespace whose `name` is listed. zmesh workloads carry no
    /// labels, so the selector is a list of workload names rather than Istio's `matchLabels`.
    WorkloadSelector { workloads: Vec<String> },
    /// These workloads, each as (namespace, name), in whatever namespace the policy is: what an
    /// Istio WORKLOAD_SELECTOR policy received over xDS means (each workload lists the policies
    /// that select it, and istiod's mesh-wide STRICT policy lives in the root namespace).
    /// Never read from YAML.
    Workloads(Vec<(String, String)>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    workloads: Vec<String>,
}

// Hand-written because serde_yaml 0.9 only reads data-carrying enum variants from `!tags`, and the
// `{workload_selector: ...}` map form is what the rest of the config file looks like.
impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        const EXPECTED: &str =
            "expected global, namespace or {workload_selector: {workloads: [<name>, ...]}}";
        match serde_yaml::Value::deserialize(d)? {
            serde_yaml::Value::String(s) => match s.as_str() {
                "global" => Ok(Scope::Global),
                "namespace" => Ok(Scope::Namespace),
                other => Err(D::Error::custom(format!(
                    "unknown scope {other:?}: {EXPECTED}"
                ))),
            },
            serde_yaml::Value::Mapping(m) if m.len() == 1 => {
                let (k, v) = m.into_iter().next().expect("length checked");
                if k.as_str() != Some("workload_selector") {
                    return Err(D::Error::custom(format!("unknown scope {k:?}: {EXPECTED}")));
                }
                let sel: RawSelector = serde_yaml::from_value(v)
                    .map_err(|e| D::Error::custom(format!("workload_selector: {e}")))?;
                Ok(Scope::WorkloadSelector {
                    workloads: sel.workloads,
                })
            }
            _ => Err(D::Error::custom(EXPECTED)),
        }
    }
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Istio's default action.
    #[default]
    Allow,
    Deny,
}

/// A validated authorization policy.
///
/// YAML (all fields but `name` and `namespace` optional; defaults as in Istio):
/// ```yaml
/// name: strict-mtls
/// namespace: payments
/// scope: namespace            # global | namespace | {workload_selector: {workloads: [api]}}
/// action: deny                # allow (default) | deny
/// dry_run: false
/// rules:
///   - clauses:
///       - matches:
///           - not_principals: ["*"]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawPolicy")]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    pub dry_run: bool,
    /// OR-ed. No rules means the policy matches nothing: an ALLOW without rules is Istio's
    /// "allow nothing" (it applies, so everything not allowed elsewhere is denied).
    pub rules: Vec<Rule>,
}

/// Matches when ALL its clauses match (so a rule with no clauses matches every connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// Matches when ANY of its matches matches. Never empty (refused at load: it could match nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// All non-empty fields must hold. An all-empty match holds for every connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// Istio's string match for principals and namespaces: `exact`, `prefix*`, `*suffix`, or `*`
/// ("any value is present", i.e. the peer has an identity at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    fn parse(s: &str) -> Result<StringMatch, String> {
        if s.is_empty() {
            return Err("empty string: use \"*\" to match any value".into());
        }
        if s == "*" {
            return Ok(StringMatch::Presence);
        }
        let (make, inner): (fn(String) -> StringMatch, &str) =
            if let Some(rest) = s.strip_prefix('*') {
                (StringMatch::Suffix, rest)
            } else if let Some(rest) = s.strip_suffix('*') {
                (StringMatch::Prefix, rest)
            } else {
                (StringMatch::Exact, s)
            };
        if inner.contains('*') {
            return Err("'*' is only allowed alone, as a prefix or as a suffix".into());
        }
        Ok(make(inner.to_string()))
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(v) => value == v,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// `namespace/service-account`, compared exactly against the peer identity (trust domain ignored,
/// as Istio does for `serviceAccounts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

impl ServiceAccountMatch {
    fn parse(s: &str) -> Result<ServiceAccountMatch, String> {
        match s.split_once('/') {
            Some((ns, sa)) if valid_name(ns) && valid_name(sa) => Ok(ServiceAccountMatch {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }),
            _ => Err(
                "expected <namespace>/<service-account> (lower-case names, no wildcards)".into(),
            ),
        }
    }

    fn matches(&self, id: &SpiffeId) -> bool {
        id.namespace == self.namespace && id.service_account == self.service_account
    }
}

/// Why a policy was refused. Every variant names the policy (`namespace/name`, `?` for a part that
/// could not be read) so an operator can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The YAML text itself could not be read (for a policy list: every connection is denied).
    #[error("cannot parse policy YAML{}: {message}", at(*.line, *.column))]
    Document {
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// An entry does not fit the schema (unknown field, wrong type, missing name...).
    #[error("policy {policy} (policies[{index}]): {message}")]
    Syntax {
        policy: String,
        index: usize,
        message: String,
    },
    /// A value that parsed but makes no sense: bad CIDR, port 0, malformed principal...
    #[error("policy {policy}: {field} = {value:?}: {reason}")]
    Invalid {
        policy: String,
        field: String,
        value: String,
        reason: String,
    },
}

fn at(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" at line {l} column {c}"),
        _ => String::new(),
    }
}

/// One policy as loaded: usable, or broken and enforced as deny-all over its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyEntry {
    Valid(AuthorizationPolicy),
    Broken(BrokenPolicy),
}

impl PolicyEntry {
    /// Each YAML value as a policy, in order: valid, or broken with its error (for callers that
    /// need the policies themselves, such as the xDS server, rather than a [`PolicySet`]).
    pub fn from_yaml_values(values: Vec<serde_yaml::Value>) -> Vec<PolicyEntry> {
        values
            .into_iter()
            .enumerate()
            .map(|(index, v)| parse_value(index, v))
            .collect()
    }
}

/// A policy that failed to load, with what could be salvaged of where it applies. It is enforced
/// as deny-all over that scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenPolicy {
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// `None` when the scope itself was unreadable: the deny then widens to the namespace, or to
    /// the whole mesh when the namespace is unknown too.
    pub scope: Option<Scope>,
    pub error: PolicyError,
}

impl BrokenPolicy {
    fn label(&self) -> String {
        label(self.namespace.as_deref(), self.name.as_deref())
    }
}

fn label(namespace: Option<&str>, name: Option<&str>) -> String {
    format!("{}/{}", namespace.unwrap_or("?"), name.unwrap_or("?"))
}

/// The destination workload as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadRef {
    pub name: String,
    pub namespace: String,
}

/// One inbound connection being judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The peer's mTLS identity; `None` for plaintext received on 15006.
    pub src_identity: Option<SpiffeId>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    /// The real target port (the `:authority` port), never 15008.
    pub dst_port: u16,
    pub dst_workload: WorkloadRef,
}

/// The verdict, with what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the DENY (or broken) policy that rejected, or the ALLOW policy that
    /// admitted; `None` when no policy applies or no ALLOW matched.
    pub decided_by: Option<String>,
    /// Each applicable dry-run policy and what it alone would have done: `true` = allow (an ALLOW
    /// that matches, a DENY that does not), `false` = deny.
    pub dry_run_results: Vec<(String, bool)>,
}

// ---- YAML schema: strings as written, converted and checked by `validate` so errors can name
// the exact field path (serde errors from a `Value` carry no path or position).

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: String,
    namespace: String,
    #[serde(default)]
    scope: Scope,
    #[serde(default)]
    action: Action,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    clauses: Vec<RawClause>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClause {
    matches: Vec<RawMatch>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<String>,
    #[serde(default)]
    not_service_accounts: Vec<String>,
    #[serde(default)]
    source_ips: Vec<String>,
    #[serde(default)]
    not_source_ips: Vec<String>,
    #[serde(default)]
    destination_ips: Vec<String>,
    #[serde(default)]
    not_destination_ips: Vec<String>,
    // i64 rather than u16 so an out-of-range port gets a field path, not a bare serde message.
    #[serde(default)]
    destination_ports: Vec<i64>,
    #[serde(default)]
    not_destination_ports: Vec<i64>,
}

impl TryFrom<RawPolicy> for AuthorizationPolicy {
    type Error = PolicyError;

    fn try_from(raw: RawPolicy) -> Result<Self, PolicyError> {
        let policy = label(Some(&raw.namespace), Some(&raw.name));
        let invalid = |field: String, value: &str, reason: String| PolicyError::Invalid {
            policy: policy.clone(),
            field,
            value: value.to_string(),
            reason,
        };
        for (field, value) in [("name", &raw.name), ("namespace", &raw.namespace)] {
            if !valid_name(value) {
                return Err(invalid(
                    field.into(),
                    value,
                    format!("must be 1-{MAX_NAME} characters of [a-z0-9.-_]"),
                ));
            }
        }
        if let Scope::WorkloadSelector { workloads } = &raw.scope {
            if workloads.is_empty() {
                // An empty selector selecting nothing would silently disable the policy.
                return Err(invalid(
                    "scope.workload_selector.workloads".into(),
                    "[]",
                    "list at least one workload name (or use scope: namespace)".into(),
                ));
            }
            for (i, w) in workloads.iter().enumerate() {
                if w.is_empty() || w.len() > MAX_NAME {
                    return Err(invalid(
                        format!("scope.workload_selector.workloads[{i}]"),
                        w,
                        format!("workload name must be 1-{MAX_NAME} bytes"),
                    ));
                }
            }
        }

        let mut rules = Vec::with_capacity(raw.rules.len());
        for (ri, rule) in raw.rules.into_iter().enumerate() {
            let mut clauses = Vec::with_capacity(rule.clauses.len());
            for (ci, clause) in rule.clauses.into_iter().enumerate() {
                let path = format!("rules[{ri}].clauses[{ci}]");
                if clause.matches.is_empty() {
                    return Err(invalid(
                        format!("{path}.matches"),
                        "[]",
                        "a clause with no matches can never match; add a match or drop the clause"
                            .into(),
                    ));
                }
                let mut matches = Vec::with_capacity(clause.matches.len());
                for (mi, m) in clause.matches.into_iter().enumerate() {
                    matches.push(
                        convert_match(m, &format!("{path}.matches[{mi}]"))
                            .map_err(|(field, value, reason)| invalid(field, &value, reason))?,
                    );
                }
                clauses.push(Clause { matches });
            }
            rules.push(Rule { clauses });
        }

        Ok(AuthorizationPolicy {
            name: raw.name,
            namespace: raw.namespace,
            scope: raw.scope,
            action: raw.action,
            dry_run: raw.dry_run,
            rules,
        })
    }
}

/// (field path, offending value, reason)
type FieldError = (String, String, String);

fn convert_match(m: RawMatch, path: &str) -> Result<Match, FieldError> {
    // Each list is converted element by element so an error names the exact index.
    fn each<T>(
        path: &str,
        field: &str,
        values: &[String],
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, FieldError> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let err = |reason: String| (format!("{path}.{field}[{i}]"), v.clone(), reason);
                if v.len() > MAX_STRING {
                    return Err(err(format!("longer than {MAX_STRING} bytes")));
                }
                f(v).map_err(err)
            })
            .collect()
    }
    fn ports(path: &str, field: &str, values: &[i64]) -> Result<Vec<u16>, FieldError> {
        values
            .iter()
            .enumerate()
            .map(|(i, &p)| match u16::try_from(p) {
                Ok(p) if p != 0 => Ok(p),
                _ => Err((
                    format!("{path}.{field}[{i}]"),
                    p.to_string(),
                    "port must be 1-65535".into(),
                )),
            })
            .collect()
    }
    let principal = |s: &str| StringMatch::parse(s.strip_prefix(SPIFFE_SCHEME).unwrap_or(s));
    Ok(Match {
        namespaces: each(path, "namespaces", &m.namespaces, StringMatch::parse)?,
        not_namespaces: each(
            path,
            "not_namespaces",
            &m.not_namespaces,
            StringMatch::parse,
        )?,
        principals: each(path, "principals", &m.principals, principal)?,
        not_principals: each(path, "not_principals", &m.not_principals, principal)?,
        service_accounts: each(
            path,
            "service_accounts",
            &m.service_accounts,
            ServiceAccountMatch::parse,
        )?,
        not_service_accounts: each(
            path,
            "not_service_accounts",
            &m.not_service_accounts,
            ServiceAccountMatch::parse,
        )?,
        source_ips: each(path, "source_ips", &m.source_ips, parse_cidr)?,
        not_source_ips: each(path, "not_source_ips", &m.not_source_ips, parse_cidr)?,
        destination_ips: each(path, "destination_ips", &m.destination_ips, parse_cidr)?,
        not_destination_ips: each(
            path,
            "not_destination_ips",
            &m.not_destination_ips,
            parse_cidr,
        )?,
        destination_ports: ports(path, "destination_ports", &m.destination_ports)?,
        not_destination_ports: ports(path, "not_destination_ports", &m.not_destination_ports)?,
    })
}

/// A CIDR, or a bare address meaning exactly that host (/32 or /128), as Istio accepts.
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    s.parse::<IpNet>().map_err(|_| {
        "not an IP address or CIDR (e.g. 10.0.0.0/8, 2001:db8::/32; prefix at most 32 for IPv4, 128 for IPv6)"
            .into()
    })
}

/// Kubernetes-style names, the same alphabet SPIFFE IDs accept, so a name that can never match a
/// peer identity is refused instead of silently never matching.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

pub(crate) fn yaml_message(e: &serde_yaml::Error) -> String {
    yaml_error(e)
}

fn yaml_error(e: &serde_yaml::Error) -> String {
    // serde_yaml appends " at line L column C"; callers report the location themselves.
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}

impl AuthorizationPolicy {
    /// Parses one policy document strictly.
    pub fn from_yaml_str(text: &str) -> Result<AuthorizationPolicy, PolicyError> {
        serde_yaml::from_str(text).map_err(|e| PolicyError::Document {
            line: e.location().map(|l| l.line()),
            column: e.location().map(|l| l.column()),
            message: yaml_error(&e),
        })
    }

    fn label(&self) -> String {
        label(Some(&self.namespace), Some(&self.name))
    }
}

// ---- Evaluation ----

/// Per-connection facts computed once, not per policy.
struct Peer<'a> {
    id: Option<&'a SpiffeId>,
    /// `trust-domain/ns/<ns>/sa/<sa>`: the form Istio principals are written in.
    principal: Option<String>,
    src_ip: IpAddr,
    dst_ip: IpAddr,
    dst_port: u16,
}

impl Match {
    fn matches(&self, p: &Peer<'_>) -> bool {
        // Identity fields: without a peer identity a positive field never holds, and a `not_`
        // field always holds (there is nothing to exclude). That is Istio's behaviour, and it is
        // what makes STRICT mTLS (`DENY` + `not_principals: ["*"]`) reject plaintext.
        if !self.namespaces.is_empty()
            && !p
                .id
                .is_some_and(|id| self.namespaces.iter().any(|m| m.matches(&id.namespace)))
        {
            return false;
        }
        if p.id
            .is_some_and(|id| self.not_namespaces.iter().any(|m| m.matches(&id.namespace)))
        {
            return false;
        }
        let principal = p.principal.as_deref();
        if !self.principals.is_empty()
            && !principal.is_some_and(|s| self.principals.iter().any(|m| m.matches(s)))
        {
            return false;
        }
        if principal.is_some_and(|s| self.not_principals.iter().any(|m| m.matches(s))) {
            return false;
        }
        if !self.service_accounts.is_empty()
            && !p
                .id
                .is_some_and(|id| self.service_accounts.iter().any(|m| m.matches(id)))
        {
            return false;
        }
        if p.id
            .is_some_and(|id| self.not_service_accounts.iter().any(|m| m.matches(id)))
        {
            return false;
        }
        let in_any = |nets: &[IpNet], ip: &IpAddr| nets.iter().any(|n| n.contains(ip));
        if !self.source_ips.is_empty() && !in_any(&self.source_ips, &p.src_ip) {
            return false;
        }
        if in_any(&self.not_source_ips, &p.src_ip) {
            return false;
        }
        if !self.destination_ips.is_empty() && !in_any(&self.destination_ips, &p.dst_ip) {
            return false;
        }
        if in_any(&self.not_destination_ips, &p.dst_ip) {
            return false;
        }
        if !self.destination_ports.is_empty() && !self.destination_ports.contains(&p.dst_port) {
            return false;
        }
        !self.not_destination_ports.contains(&p.dst_port)
    }
}

impl AuthorizationPolicy {
    fn matches(&self, p: &Peer<'_>) -> bool {
        self.rules.iter().any(|r| {
            r.clauses
                .iter()
                .all(|c| c.matches.iter().any(|m| m.matches(p)))
        })
    }
}

#[derive(Debug)]
enum Body {
    Valid(AuthorizationPolicy),
    /// Denies everything in its scope, whatever action or dry-run flag it claimed: a malformed
    /// document's `dry_run: true` is no more trustworthy than the rest of it.
    Broken,
}

#[derive(Debug)]
struct Entry {
    label: String,
    body: Body,
}

/// All policies, bucketed by scope for fast lookup by destination workload.
#[derive(Debug, Default)]
pub struct PolicySet {
    entries: Vec<Entry>,
    global: Vec<usize>,
    by_namespace: HashMap<String, Vec<usize>>,
    /// namespace → workload name → policies selecting it.
    by_workload: HashMap<String, HashMap<String, Vec<usize>>>,
    errors: Vec<PolicyError>,
}

impl PolicySet {
    /// Builds the set from loaded entries; every broken entry denies all connections in its scope.
    pub fn new(policies: Vec<PolicyEntry>) -> PolicySet {
        let mut set = PolicySet::default();
        for p in policies {
            match p {
                PolicyEntry::Valid(p) => {
                    let (ns, scope) = (p.namespace.clone(), p.scope.clone());
                    set.insert(p.label(), Some(&ns), Some(&scope), Body::Valid(p));
                }
                PolicyEntry::Broken(b) => {
                    let label = b.label();
                    set.insert(
                        label,
                        b.namespace.as_deref(),
                        b.scope.as_ref(),
                        Body::Broken,
                    );
                    set.errors.push(b.error);
                }
            }
        }
        set
    }

    /// Builds the set from YAML values (e.g. the config file's `policies:` list kept as
    /// `serde_yaml::Value` so one bad entry cannot hide the others).
    pub fn from_yaml_values(values: Vec<serde_yaml::Value>) -> PolicySet {
        PolicySet::new(PolicyEntry::from_yaml_values(values))
    }

    /// Builds the set from a YAML sequence of policies. If the text is not a sequence at all the
    /// set holds one mesh-wide broken policy (named `?/?`): nothing is allowed until it is fixed.
    pub fn from_yaml_str(text: &str) -> PolicySet {
        match serde_yaml::from_str::<Vec<serde_yaml::Value>>(text) {
            Ok(values) => PolicySet::from_yaml_values(values),
            Err(e) => PolicySet::new(vec![PolicyEntry::Broken(BrokenPolicy {
                name: None,
                namespace: None,
                scope: None,
                error: PolicyError::Document {
                    line: e.location().map(|l| l.line()),
                    column: e.location().map(|l| l.column()),
                    message: yaml_error(&e),
                },
            })]),
        }
    }

    /// Why each broken policy was refused, in load order. Empty when every policy loaded.
    pub fn errors(&self) -> &[PolicyError] {
        &self.errors
    }

    /// `namespace/name` of every policy held, with whether it is enforced as written (`false`:
    /// broken, enforced as deny-all), in load order (for the admin config dump).
    pub fn summary(&self) -> Vec<(String, bool)> {
        self.entries
            .iter()
            .map(|e| (e.label.clone(), matches!(e.body, Body::Valid(_))))
            .collect()
    }

    /// Number of policies held, broken ones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn insert(
        &mut self,
        label: String,
        namespace: Option<&str>,
        scope: Option<&Scope>,
        body: Body,
    ) {
        let idx = self.entries.len();
        self.entries.push(Entry { label, body });
        // An unknown namespace or scope widens a (necessarily broken) policy: fail closed.
        match (scope, namespace) {
            (Some(Scope::Global), _) | (_, None) => self.global.push(idx),
            (Some(Scope::Namespace), Some(ns)) | (None, Some(ns)) => self
                .by_namespace
                .entry(ns.to_string())
                .or_default()
                .push(idx),
            (Some(Scope::Workloads(pairs)), Some(_)) => {
                for (ns, name) in pairs {
                    let bucket = self.by_workload.entry(ns.clone()).or_default();
                    let slot = bucket.entry(name.clone()).or_default();
                    if !slot.contains(&idx) {
                        slot.push(idx);
                    }
                }
            }
            (Some(Scope::WorkloadSelector { workloads }), Some(ns)) => {
                let bucket = self.by_workload.entry(ns.to_string()).or_default();
                for w in dedup(workloads) {
                    bucket.entry(w.clone()).or_default().push(idx);
                }
            }
        }
    }

    /// Judges one inbound connection (docs/model.md "Decision order").
    pub fn evaluate(&self, conn: &Connection) -> Decision {
        let peer = Peer {
            id: conn.src_identity.as_ref(),
            principal: conn.src_identity.as_ref().map(|id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain, id.namespace, id.service_account
                )
            }),
            // A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; policies say a.b.c.d.
            src_ip: conn.src_ip.to_canonical(),
            dst_ip: conn.dst_ip.to_canonical(),
            dst_port: conn.dst_port,
        };
        let wl = &conn.dst_workload;
        let empty: &[usize] = &[];
        let ns_bucket = self
            .by_namespace
            .get(&wl.namespace)
            .map_or(empty, Vec::as_slice);
        let wl_bucket = self
            .by_workload
            .get(&wl.namespace)
            .and_then(|m| m.get(&wl.name))
            .map_or(empty, Vec::as_slice);

        let mut denied_by: Option<&str> = None;
        let mut allowed_by: Option<&str> = None;
        let mut any_allow = false;
        let mut dry_run_results = Vec::new();
        for &i in self.global.iter().chain(ns_bucket).chain(wl_bucket) {
            let entry = &self.entries[i];
            let policy = match &entry.body {
                Body::Broken => {
                    denied_by.get_or_insert(&entry.label);
                    continue;
                }
                Body::Valid(p) => p,
            };
            if policy.dry_run {
                let matched = policy.matches(&peer);
                let would_allow = match policy.action {
                    Action::Allow => matched,
                    Action::Deny => !matched,
                };
                dry_run_results.push((entry.label.clone(), would_allow));
                continue;
            }
            // Once a DENY has decided, or an ALLOW matched, further policies of that kind cannot
            // change the outcome, so their rules are not evaluated.
            match policy.action {
                Action::Deny if denied_by.is_none() && policy.matches(&peer) => {
                    denied_by = Some(&entry.label);
                }
                Action::Allow => {
                    any_allow = true;
                    if allowed_by.is_none() && denied_by.is_none() && policy.matches(&peer) {
                        allowed_by = Some(&entry.label);
                    }
                }
                Action::Deny => {}
            }
        }

        let (allowed, decided_by) = match (denied_by, any_allow, allowed_by) {
            (Some(d), _, _) => (false, Some(d)),
            (None, false, _) => (true, None),
            (None, true, Some(a)) => (true, Some(a)),
            (None, true, None) => (false, None),
        };
        Decision {
            allowed,
            decided_by: decided_by.map(str::to_string),
            dry_run_results,
        }
    }
}

/// A selector listing a workload twice must not evaluate the policy twice.
fn dedup(workloads: &[String]) -> Vec<&String> {
    let mut seen: Vec<&String> = workloads.iter().collect();
    seen.sort();
    seen.dedup();
    seen
}

/// Parses one entry, salvaging its name, namespace and scope on failure so the broken policy
/// covers the right workloads and the error names it.
fn parse_value(index: usize, v: serde_yaml::Value) -> PolicyEntry {
    let get_str = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let name = get_str("name");
    let namespace = get_str("namespace");
    let scope = match v.get("scope") {
        None => Some(Scope::default()),
        Some(s) => serde_yaml::from_value::<Scope>(s.clone()).ok(),
    };
    let raw = serde_yaml::from_value::<RawPolicy>(v).map_err(|e| PolicyError::Syntax {
        policy: label(namespace.as_deref(), name.as_deref()),
        index,
        message: yaml_error(&e),
    });
    match raw.and_then(AuthorizationPolicy::try_from) {
        Ok(p) => PolicyEntry::Valid(p),
        Err(error) => PolicyEntry::Broken(BrokenPolicy {
            name,
            namespace,
            scope,
            error,
        }),
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_is_refused_with_its_name() {
        let text = "name: a\nnamespace: b\nrules:\n  - clauses:\n      - matches:\n          - sorce_ips: [10.0.0.1]\n";
        let err = AuthorizationPolicy::from_yaml_str(text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sorce_ips"), "{msg}");
        assert!(msg.contains("line 6"), "{msg}");
    }

    #[test]
    fn unknown_top_level_field_is_refused() {
        let err = AuthorizationPolicy::from_yaml_str("name: a\nnamespace: b\nactoin: deny\n")
            .unwrap_err();
        assert!(err.to_string().contains("actoin"), "{err}");
    }

    #[test]
    fn invalid_cidr_names_policy_and_field() {
        for bad in ["10.0.0.0/33", "garbage", "2001:db8::/129", "10.0.0.256"] {
            let text = format!(
                "name: p\nnamespace: ns\nrules:\n  - clauses:\n      - matches:\n          - source_ips: [10.0.0.0/8, \"{bad}\"]\n"
            );
            let set =
                PolicySet::from_yaml_str(&format!("- {}", text.replace('\n', "\n  ").trim_end()));
            assert_eq!(set.errors().len(), 1, "{bad}");
            match &set.errors()[0] {
                PolicyError::Invalid {
                    policy,
                    field,
                    value,
                    ..
                } => {
                    assert_eq!(policy, "ns/p");
                    assert_eq!(field, "rules[0].clauses[0].matches[0].source_ips[1]");
                    assert_eq!(value, bad);
                }
                other => panic!("{bad}: unexpected {other:?}"),
            }
            // The strict single-document path reports the same, with a position.
            let msg = AuthorizationPolicy::from_yaml_str(&text)
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("ns/p") && msg.contains("source_ips[1]"),
                "{msg}"
            );
        }
    }

    #[test]
    fn field_errors_name_each_field() {
        let cases: &[(&str, &str)] = &[
            ("destination_ports: [0]", "destination_ports[0]"),
            ("not_destination_ports: [70000]", "not_destination_ports[0]"),
            ("principals: [\"a*b\"]", "principals[0]"),
            ("not_principals: [\"\"]", "not_principals[0]"),
            ("namespaces: [\"**\"]", "namespaces[0]"),
            ("service_accounts: [\"nosep\"]", "service_accounts[0]"),
            ("not_service_accounts: [\"a/*\"]", "not_service_accounts[0]"),
            ("destination_ips: [\"1.2.3.4/40\"]", "destination_ips[0]"),
            ("not_destination_ips: [\"x\"]", "not_destination_ips[0]"),
            ("not_source_ips: [\"::1/200\"]", "not_source_ips[0]"),
        ];
        for (m, field) in cases {
            let text =
                format!("name: p\nnamespace: ns\nrules: [{{clauses: [{{matches: [{{{m}}}]}}]}}]\n");
            let msg = AuthorizationPolicy::from_yaml_str(&text)
                .unwrap_err()
                .to_string();
            assert!(msg.contains(field) && msg.contains("ns/p"), "{m}: {msg}");
        }
    }

    #[test]
    fn names_and_selectors_are_validated() {
        for (text, needle) in [
            ("name: \"\"\nnamespace: ns\n", "name"),
            ("name: p\nnamespace: Bad\n", "namespace"),
            (
                "name: p\nnamespace: ns\nscope: {workload_selector: {workloads: []}}\n",
                "workloads",
            ),
            (
                "name: p\nnamespace: ns\nrules: [{clauses: [{matches: []}]}]\n",
                "rules[0].clauses[0].matches",
            ),
            ("namespace: ns\n", "name"),
        ] {
            let msg = AuthorizationPolicy::from_yaml_str(text)
                .unwrap_err()
                .to_string();
            assert!(msg.contains(needle), "{text:?}: {msg}");
        }
    }

    #[test]
    fn yaml_shape_parses() {
        let p = AuthorizationPolicy::from_yaml_str(
            "name: p\nnamespace: ns\nscope:\n  workload_selector:\n    workloads: [api]\naction: deny\ndry_run: true\nrules:\n  - clauses:\n      - matches:\n          - principals: [\"spiffe://cluster.local/ns/a/sa/*\"]\n            source_ips: [10.1.2.3, \"fd00::/8\"]\n            destination_ports: [8080]\n",
        )
        .unwrap();
        assert_eq!(
            p.scope,
            Scope::WorkloadSelector {
                workloads: vec!["api".into()]
            }
        );
        assert_eq!(p.action, Action::Deny);
        assert!(p.dry_run);
        let m = &p.rules[0].clauses[0].matches[0];
        assert_eq!(
            m.principals,
            vec![StringMatch::Prefix("cluster.local/ns/a/sa/".into())]
        );
        assert_eq!(
            m.source_ips,
            vec![
                "10.1.2.3/32".parse::<IpNet>().unwrap(),
                "fd00::/8".parse().unwrap()
            ]
        );
        assert_eq!(m.destination_ports, vec![8080]);
        for s in ["global", "namespace"] {
            let p = AuthorizationPolicy::from_yaml_str(&format!(
                "name: p\nnamespace: ns\nscope: {s}\n"
            ))
            .unwrap();
            assert_eq!(p.action, Action::Allow);
            assert!(!p.dry_run && p.rules.is_empty());
        }
    }

    #[test]
    fn unparseable_list_denies_everything() {
        let set = PolicySet::from_yaml_str("name: not-a-list\n");
        assert_eq!(set.errors().len(), 1);
        let d = set.evaluate(&Connection {
            src_identity: None,
            src_ip: [10, 0, 0, 1].into(),
            dst_ip: [10, 0, 0, 2].into(),
            dst_port: 80,
            dst_workload: WorkloadRef {
                name: "w".into(),
                namespace: "ns".into(),
            },
        });
        assert!(!d.allowed);
        assert_eq!(d.decided_by.as_deref(), Some("?/?"));
    }
}
