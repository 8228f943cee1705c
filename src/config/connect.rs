//! The `connect:` section: client-only mesh access (`zmesh-node connect`, docs/capture.md
//! "Client-only access"). A VM or laptop runs the tunnel without capture rules and without root;
//! applications reach mesh services through local port maps and a SOCKS5 listener, and every
//! connection leaves with the certificate of `workload`, this machine's entry in `workloads:`.
//!
//! The section is parsed with the rest of the file (unknown fields refused); `resolve` turns it,
//! plus the subcommand's flags, into [`ConnectSettings`] with every address parsed and every
//! reference checked, naming the offending field on error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde::Deserialize;

use super::BoundedString;

/// At most this many port maps: each is a listening socket, and a config is not a port scanner.
pub const MAX_FORWARDS: usize = 256;
/// At most this many `allow_from` entries; the check is a linear scan on every accept.
pub const MAX_ALLOW_FROM: usize = 256;
/// A DNS name is at most 253 characters (RFC 1035 2.3.4, without the trailing dot).
const MAX_HOST: usize = 253;

/// The file's `connect:` section, as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConnectConfig {
    /// uid of the workload in `workloads:` that is this machine (its `node` must be this
    /// node's name): the source identity of every connection.
    pub workload: BoundedString,
    /// Port maps: `{ listen: 127.0.0.1:5432, to: "postgres.data.svc.cluster.local:5432" }`.
    #[serde(default)]
    pub forward: Vec<ForwardConfig>,
    /// A SOCKS5 (RFC 1928, CONNECT only, no authentication) listener.
    #[serde(default)]
    pub socks5: Option<SocketAddr>,
    /// Sources allowed on every listener (CIDRs or addresses). Empty: loopback only.
    #[serde(default)]
    pub allow_from: Vec<BoundedString>,
    /// Also relay, as plain TCP, to destinations the mesh model does not know. Off by default:
    /// connect reaches the mesh, and is no open relay to arbitrary addresses.
    #[serde(default)]
    pub passthrough: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    pub listen: SocketAddr,
    /// `host:port`: a service hostname (or `name.namespace[.svc]`), or an IP.
    pub to: BoundedString,
}

/// Where a port map or a SOCKS5 request goes, before the model resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An address: handed to destination selection as it is (a VIP, a workload IP, ...).
    Addr(SocketAddr),
    /// A service name, resolved through the mesh model (never system DNS).
    Host { host: String, port: u16 },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// One resolved port map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub listen: SocketAddr,
    pub to: Target,
}

/// The `connect:` section and the subcommand's flags, checked and typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectSettings {
    pub workload: String,
    pub forwards: Vec<Forward>,
    pub socks5: Option<SocketAddr>,
    pub allow_from: Vec<IpNet>,
    /// `connect.passthrough`.
    pub passthrough: bool,
}

impl ConnectSettings {
    /// Whether `ip` may use the listeners. IPv4-mapped IPv6 sources (a dual-stack listener)
    /// are judged as the IPv4 address they carry.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allow_from.iter().any(|net| net.contains(&ip))
    }
}

/// The allow-list when none is given: this machine only.
pub fn default_allow_from() -> Vec<IpNet> {
    vec![
        IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("valid prefix"),
        IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]
}

/// A CIDR, or a bare address meaning exactly that host.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net = match s.parse::<IpAddr>() {
        Ok(ip) => IpNet::from(ip),
        Err(_) => s.parse::<IpNet>().map_err(|_| {
            "not an IP address or CIDR (e.g. 10.0.0.0/24, fd00::/64; prefix at most 32 for IPv4, 128 for IPv6)"
                .to_string()
        })?,
    };
    // Sources are judged as IPv4 when they are IPv4-mapped: an entry written that way would
    // never match, so it is refused rather than silently inert.
    if let IpNet::V6(v6) = net {
        if v6.addr().to_ipv4_mapped().is_some() && v6.prefix_len() >= 96 {
            return Err(format!(
                "{s} is IPv4-mapped: write it as IPv4 (sources are compared as IPv4)"
            ));
        }
    }
    Ok(net)
}

/// `host:port` (a service name) or `ip:port` (`[v6]:port`), as `forward[].to` and
/// `--forward LISTEN=HOST:PORT` take it.
pub fn parse_target(s: &str) -> Result<Target, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err("port 0 is not a port".into());
        }
        return Ok(Target::Addr(a));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or("expected HOST:PORT (e.g. postgres.data.svc.cluster.local:5432)")?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err("port 0 is not a port".into());
    }
    Ok(Target::Host {
        host: parse_host(host)?,
        port,
    })
}

/// A service hostname: DNS letters, digits, `-` and `.`, lower-cased (names are
/// case-insensitive; the model's are lower case).
pub fn parse_host(host: &str) -> Result<String, String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err("empty host name".into());
    }
    if host.len() > MAX_HOST {
        return Err(format!(
            "host name of {} bytes is over the {MAX_HOST}-byte DNS limit",
            host.len()
        ));
    }
    if host.contains(':') {
        return Err("an IPv6 address needs brackets: [fd00::1]:80".into());
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        || host.split('.').any(str::is_empty)
    {
        return Err(format!(
            "{host:?} is not a host name (letters, digits, '-' and '.' only, no empty label)"
        ));
    }
    Ok(host.to_ascii_lowercase())
}

/// `LISTEN=HOST:PORT`, as `--forward` takes it.
pub fn parse_forward_flag(s: &str) -> Result<Forward, String> {
    let (listen, to) = s.split_once('=').ok_or(
        "expected LISTEN=HOST:PORT (e.g. 127.0.0.1:5432=postgres.data.svc.cluster.local:5432)",
    )?;
    let listen: SocketAddr = listen
        .parse()
        .map_err(|_| format!("listen address {listen:?} is not IP:PORT"))?;
    Ok(Forward {
        listen,
        to: parse_target(to).map_err(|e| format!("{to:?}: {e}"))?,
    })
}

/// What the subcommand's flags add to the file's section.
#[derive(Debug, Clone, Default)]
pub struct ConnectFlags {
    pub forwards: Vec<Forward>,
    pub socks5: Option<SocketAddr>,
    pub allow_from: Vec<IpNet>,
}

/// A failed check: the field (`connect.forward[2].to`), its value and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub value: String,
    pub reason: String,
}

fn invalid(
    field: impl Into<String>,
    value: impl std::fmt::Display,
    reason: impl Into<String>,
) -> Invalid {
    Invalid {
        field: field.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Checks the section against the file's workloads and node, and adds `flags`. `workloads`
/// yields (uid, node) of `workloads:`; `None` when they come from a control plane, in which case
/// the workload is checked on each connection instead.
pub fn resolve<'a>(
    section: &ConnectConfig,
    node_name: &str,
    workloads: Option<impl IntoIterator<Item = (&'a str, &'a str)>>,
    flags: &ConnectFlags,
) -> Result<ConnectSettings, Invalid> {
    let uid = section.workload.0.as_str();
    if uid.is_empty() {
        return Err(invalid(
            "connect.workload",
            "",
            "name the uid of this machine's entry in `workloads:`",
        ));
    }
    if let Some(workloads) = workloads {
        match workloads.into_iter().find(|(u, _)| *u == uid) {
            None => {
                return Err(invalid(
                    "connect.workload",
                    uid,
                    "no workload in `workloads:` has this uid",
                ))
            }
            Some((_, node)) if node != node_name => {
                return Err(invalid(
                    "connect.workload",
                    uid,
                    format!(
                        "this workload runs on node {node:?}, not on this one ({node_name:?}): connect speaks for this machine's own workload only"
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    let mut forwards = Vec::new();
    for (i, f) in section.forward.iter().enumerate() {
        let to = parse_target(&f.to)
            .map_err(|e| invalid(format!("connect.forward[{i}].to"), &f.to, e))?;
        forwards.push(Forward {
            listen: f.listen,
            to,
        });
    }
    forwards.extend(flags.forwards.iter().cloned());
    if forwards.len() > MAX_FORWARDS {
        return Err(invalid(
            "connect.forward",
            forwards.len(),
            format!("at most {MAX_FORWARDS} port maps"),
        ));
    }
    let socks5 = match (section.socks5, flags.socks5) {
        (Some(file), Some(flag)) if file != flag => {
            return Err(invalid(
                "connect.socks5",
                file,
                format!("--socks5 {flag} asks for a second SOCKS5 listener; one is supported"),
            ))
        }
        (file, flag) => file.or(flag),
    };
    let mut listens: Vec<(String, SocketAddr)> = forwards
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("connect.forward[{i}].listen"), f.listen))
        .collect();
    if let Some(s) = socks5 {
        listens.push(("connect.socks5".into(), s));
    }
    for (i, (field, addr)) in listens.iter().enumerate() {
        if addr.port() == 0 {
            return Err(invalid(
                field.clone(),
                addr,
                "port 0 cannot be listened on (clients could not find it)",
            ));
        }
        if let Some((other, _)) = listens[..i].iter().find(|(_, a)| a == addr) {
            return Err(invalid(
                field.clone(),
                addr,
                format!("{other} already listens there"),
            ));
        }
    }
    let mut allow_from = Vec::new();
    for (i, s) in section.allow_from.iter().enumerate() {
        allow_from
            .push(parse_cidr(s).map_err(|e| invalid(format!("connect.allow_from[{i}]"), s, e))?);
    }
    allow_from.extend(flags.allow_from.iter().copied());
    if allow_from.len() > MAX_ALLOW_FROM {
        return Err(invalid(
            "connect.allow_from",
            allow_from.len(),
            format!("at most {MAX_ALLOW_FROM} entries"),
        ));
    }
    if allow_from.is_empty() {
        allow_from = default_allow_from();
    }
    Ok(ConnectSettings {
        workload: uid.to_string(),
        forwards,
        socks5,
        allow_from,
        passthrough: section.passthrough,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_from_entries_written_ipv4_mapped_are_refused_not_silently_inert() {
        assert!(parse_cidr("192.168.7.0/24").is_ok());
        assert!(parse_cidr("fd00::/64").is_ok());
        let e = parse_cidr("::ffff:192.168.7.0/120").unwrap_err();
        assert!(e.contains("IPv4-mapped"), "{e}");
        assert!(parse_cidr("::ffff:10.0.0.1").is_err());
    }

    fn section(yaml: &str) -> ConnectConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    const WL: [(&str, &str); 2] = [("laptop", "laptop-node"), ("db-1", "db-node")];

    fn check(yaml: &str) -> Result<ConnectSettings, Invalid> {
        resolve(
            &section(yaml),
            "laptop-node",
            Some(WL),
            &ConnectFlags::default(),
        )
    }

    #[test]
    fn a_full_section_resolves_with_loopback_as_the_default_allow_list() {
        let s = check(
            "workload: laptop\nforward:\n  - { listen: 127.0.0.1:5432, to: postgres.data.svc.cluster.local:5432 }\n  - { listen: 127.0.0.1:8443, to: \"10.96.0.10:443\" }\n  - { listen: \"[::1]:9000\", to: \"[fd00::7]:9000\" }\nsocks5: 127.0.0.1:1080\n",
        )
        .unwrap();
        assert_eq!(s.workload, "laptop");
        assert_eq!(
            s.forwards[0].to,
            Target::Host {
                host: "postgres.data.svc.cluster.local".into(),
                port: 5432
            }
        );
        assert_eq!(
            s.forwards[1].to,
            Target::Addr("10.96.0.10:443".parse().unwrap())
        );
        assert_eq!(
            s.forwards[2].to,
            Target::Addr("[fd00::7]:9000".parse().unwrap())
        );
        assert_eq!(s.socks5, Some("127.0.0.1:1080".parse().unwrap()));
        assert!(s.allows("127.0.0.1".parse().unwrap()));
        assert!(s.allows("127.8.9.10".parse().unwrap()));
        assert!(s.allows("::1".parse().unwrap()));
        assert!(
            s.allows("::ffff:127.0.0.1".parse().unwrap()),
            "v4-mapped loopback"
        );
        assert!(!s.allows("10.0.0.5".parse().unwrap()));
        assert!(!s.allows("::ffff:10.0.0.5".parse().unwrap()));
    }

    #[test]
    fn flags_add_to_the_file_and_a_given_allow_list_replaces_the_default() {
        let flags = ConnectFlags {
            forwards: vec![parse_forward_flag("127.0.0.1:5432=pg.data:5432").unwrap()],
            socks5: Some("127.0.0.1:1080".parse().unwrap()),
            allow_from: vec![parse_cidr("192.168.7.0/24").unwrap()],
        };
        let s = resolve(
            &section("workload: laptop\nallow_from: [10.1.2.3]\n"),
            "laptop-node",
            Some(WL),
            &flags,
        )
        .unwrap();
        assert_eq!(s.forwards.len(), 1);
        assert_eq!(s.socks5, flags.socks5);
        assert!(s.allows("10.1.2.3".parse().unwrap()));
        assert!(s.allows("192.168.7.200".parse().unwrap()));
        assert!(!s.allows("10.1.2.4".parse().unwrap()));
        assert!(
            !s.allows("127.0.0.1".parse().unwrap()),
            "explicit list, loopback not implied"
        );
    }

    fn field_of(yaml: &str) -> (String, String) {
        let e = check(yaml).unwrap_err();
        assert!(!e.reason.is_empty());
        (e.field, e.value)
    }

    #[test]
    fn hostile_and_broken_sections_name_the_field() {
        assert_eq!(
            field_of("workload: nobody\n"),
            ("connect.workload".into(), "nobody".into()),
            "unknown workload"
        );
        let e = check("workload: db-1\n").unwrap_err();
        assert_eq!(e.field, "connect.workload", "workload on another node");
        assert!(e.reason.contains("db-node"), "{}", e.reason);
        assert_eq!(field_of("workload: \"\"\n").0, "connect.workload");
        assert_eq!(
            field_of("workload: laptop\nallow_from: [10.0.0.0/33]\n"),
            ("connect.allow_from[0]".into(), "10.0.0.0/33".into()),
            "bad CIDR"
        );
        assert_eq!(
            field_of("workload: laptop\nallow_from: [127.0.0.1, lan]\n").0,
            "connect.allow_from[1]"
        );
        for (to, why) in [
            ("postgres", "no port"),
            ("postgres:0", "port 0"),
            ("postgres:99999", "port out of range"),
            (":5432", "empty host"),
            ("bad_name:80", "underscore"),
            ("a..b:80", "empty label"),
            ("fd00::1:80", "IPv6 without brackets"),
            ("[fd00::1]:0", "IP with port 0"),
        ] {
            let yaml =
                format!("workload: laptop\nforward:\n  - {{ listen: 127.0.0.1:1, to: {to:?} }}\n");
            assert_eq!(
                field_of(&yaml),
                ("connect.forward[0].to".into(), to.into()),
                "{why}"
            );
        }
        let long = format!("{}:80", "a".repeat(254));
        let yaml =
            format!("workload: laptop\nforward:\n  - {{ listen: 127.0.0.1:1, to: {long:?} }}\n");
        assert_eq!(field_of(&yaml).0, "connect.forward[0].to", "over-long host");
        assert_eq!(
            field_of("workload: laptop\nforward:\n  - { listen: 127.0.0.1:0, to: a:1 }\n").0,
            "connect.forward[0].listen",
            "port 0 listen"
        );
        let e = check("workload: laptop\nforward:\n  - { listen: 127.0.0.1:7, to: a:1 }\nsocks5: 127.0.0.1:7\n")
            .unwrap_err();
        assert_eq!(e.field, "connect.socks5", "two listeners on one address");
        assert!(
            e.reason.contains("connect.forward[0].listen"),
            "{}",
            e.reason
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_yaml::from_str::<ConnectConfig>("workload: a\nforwards: []\n").is_err());
        assert!(serde_yaml::from_str::<ConnectConfig>(
            "workload: a\nforward:\n  - { listen: 127.0.0.1:1, to: a:1, via: x }\n"
        )
        .is_err());
    }

    #[test]
    fn limits_bound_the_section() {
        let mut flags = ConnectFlags::default();
        for p in 1..=(MAX_FORWARDS as u16 + 1) {
            flags
                .forwards
                .push(parse_forward_flag(&format!("127.0.0.1:{p}=a:1")).unwrap());
        }
        let e = resolve(
            &section("workload: laptop\n"),
            "laptop-node",
            Some(WL),
            &flags,
        )
        .unwrap_err();
        assert_eq!(e.field, "connect.forward");
    }

    #[test]
    fn forward_flags_parse_or_say_what_is_wrong() {
        let f = parse_forward_flag("127.0.0.1:5432=Postgres.Data.svc.cluster.local.:5432").unwrap();
        assert_eq!(f.listen, "127.0.0.1:5432".parse().unwrap());
        assert_eq!(
            f.to,
            Target::Host {
                host: "postgres.data.svc.cluster.local".into(),
                port: 5432
            }
        );
        for bad in [
            "127.0.0.1:5432",
            "localhost:5432=a:1",
            "127.0.0.1:5432=a",
            "=a:1",
        ] {
            assert!(parse_forward_flag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_control_plane_model_defers_the_workload_check() {
        let none: Option<[(&str, &str); 0]> = None;
        let s = resolve(
            &section("workload: from-xds\n"),
            "n",
            none,
            &ConnectFlags::default(),
        )
        .unwrap();
        assert_eq!(s.workload, "from-xds");
    }
}
