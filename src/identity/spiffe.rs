//! SPIFFE identities as Istio uses them: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsing is deliberately strict. TLS verification and authorization policy must never see two
//! different identities for one certificate, so anything a lenient parser might normalize
//! (upper-case scheme, percent-encoding, extra path segments, NUL bytes) is refused instead.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID we accept. The SPIFFE spec caps URIs at 2048 bytes; anything near that in a
/// mesh is an attack, not an identity.
const MAX_SPIFFE_LEN: usize = 2048;
/// DNS label limits bound namespace and service-account names in Kubernetes (RFC 1123, 253 for
/// subdomain names used by service accounts).
const MAX_NAME_LEN: usize = 253;

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a string is not an acceptable SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("SPIFFE ID is {0} bytes long; the limit is {MAX_SPIFFE_LEN}")]
    TooLong(usize),
    #[error("SPIFFE ID must start with the lower-case scheme \"spiffe://\"")]
    Scheme,
    #[error("SPIFFE ID contains a NUL byte, a control character or '%' (percent-encoding is not accepted)")]
    BadCharacter,
    #[error("invalid trust domain {0:?}: use lower-case letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error("SPIFFE ID path must be exactly /ns/<namespace>/sa/<service-account>, got {0:?}")]
    Path(String),
    #[error(
        "invalid {field} {value:?} in SPIFFE ID: use 1-{MAX_NAME_LEN} characters of [a-z0-9.-_]"
    )]
    Name { field: &'static str, value: String },
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each one.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        validate_trust_domain(trust_domain)?;
        validate_name("namespace", namespace)?;
        validate_name("service account", service_account)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// Parses a URI SAN. Accepts exactly the canonical form produced by `Display`.
    pub fn parse(s: &str) -> Result<Self, SpiffeError> {
        if s.len() > MAX_SPIFFE_LEN {
            return Err(SpiffeError::TooLong(s.len()));
        }
        if s.bytes()
            .any(|b| b == b'%' || b.is_ascii_control() || !b.is_ascii())
        {
            return Err(SpiffeError::BadCharacter);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeError::Scheme)?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeError::Path(String::new()))?;
        validate_trust_domain(td)?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(SpiffeError::Path(format!("/{path}"))),
        }
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::TrustDomain(td.to_string()))
    }
}

fn validate_name(field: &'static str, value: &str) -> Result<(), SpiffeError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::Name {
            field,
            value: value.to_string(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_canonical_ids() {
        let id =
            SpiffeId::parse("spiffe://cluster.local/ns/default/sa/bookinfo-productpage").unwrap();
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.namespace, "default");
        assert_eq!(id.service_account, "bookinfo-productpage");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
    }

    #[test]
    fn rejects_every_ambiguous_form() {
        // docs/reliability.md #17: each of these must be refused, never normalized.
        let cases: &[(&str, &str)] = &[
            ("SPIFFE://cluster.local/ns/a/sa/b", "upper-case scheme"),
            ("Spiffe://cluster.local/ns/a/sa/b", "mixed-case scheme"),
            ("spiffe://cluster.local/ns//sa/b", "empty namespace"),
            ("spiffe://cluster.local/ns/a/sa/", "empty service account"),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                "extra path segment",
            ),
            ("spiffe://cluster.local/ns/a/sa/b/", "trailing slash"),
            (
                "spiffe://cluster.local/ns/a%2Fsa/sa/b",
                "percent-encoded slash",
            ),
            ("spiffe://cluster.local/ns/a\0/sa/b", "NUL byte"),
            ("spiffe://cluster.local/ns/a/sa/b\n", "newline"),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            (
                "spiffe://Cluster.Local/ns/a/sa/b",
                "upper-case trust domain",
            ),
            ("spiffe://cluster.local/sa/b/ns/a", "swapped segments"),
            ("spiffe://cluster.local", "no path"),
            ("spiffe://cluster.local/ns/A/sa/b", "upper-case namespace"),
            ("http://cluster.local/ns/a/sa/b", "other scheme"),
            ("spiffe://cluster.local/ns/ä/sa/b", "non-ASCII"),
            ("", "empty"),
        ];
        for (input, why) in cases {
            assert!(
                SpiffeId::parse(input).is_err(),
                "{why}: {input:?} was accepted"
            );
        }
        let long = format!("spiffe://cluster.local/ns/{}/sa/b", "a".repeat(3000));
        assert_eq!(
            SpiffeId::parse(&long),
            Err(SpiffeError::TooLong(long.len()))
        );
    }

    #[test]
    fn round_trips_through_display() {
        let id = SpiffeId::new("example.org", "ns-1", "sa.x_y").unwrap();
        assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
    }
}
