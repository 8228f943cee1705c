//! Pure generation of the capture rules (docs/capture.md: "Mode 2: host" here, "Mode 1: in-pod" in
//! `pod`). Options are validated once into [`HostRules`] or [`PodRules`], each of which wraps a
//! [`Capture`]: the chains per IP family in the backend-neutral form of `model`, plus the policy
//! routing. The iptables and nftables renderings both derive from those chains, so they cannot drift
//! apart, and `apply` installs any `Capture` the same way. Nothing here touches the system: `apply`
//! runs the text produced here, and the golden tests compare it byte for byte.

use std::fmt::Write as _;

use ipnet::IpNet;
use thiserror::Error;

mod model;
mod pod;

use model::Scope;
use model::{chains, iptables_rules, nft_script, nft_uninstall_script, rule, Chain, Hook, Match};
pub use model::{Family, IptablesRules, Jump};
use model::{Table, Verdict};
pub use pod::{PodOptions, PodRules};

/// SO_MARK carried by every socket the tunnel creates (docs/capture.md: 1337). Matching it is how the
/// rules tell the tunnel's own traffic apart, so the tunnel never captures itself.
pub const TUNNEL_MARK: u32 = 0x539;
/// Connmark stamped on connections the tunnel dials from a spoofed (transparent) source, so that the
/// app's replies can be steered back to the tunnel (docs/capture.md: 0x111).
pub const CONNMARK: u32 = 0x111;
/// We own only the low 12 bits of the packet mark and connmark (docs/capture.md: mask 0xfff); the high bits
/// stay free for kube-proxy (0x4000/0x8000), Calico, Cilium and other users of the mark.
pub const MARK_MASK: u32 = 0xfff;
/// Routing table whose `local 0.0.0.0/0` route delivers replies to spoofed sockets (docs/capture.md: 100).
pub const ROUTE_TABLE: u32 = 100;
/// Preference of the fwmark rule (docs/capture.md: 32764): after `local` (0), before `main` (32766), so it
/// only decides for marked packets that are not already addressed to this host.
pub const RULE_PREF: u32 = 32764;
/// The tunnel's listeners (docs/capture.md, Mode 1): captured outbound, captured inbound plaintext, HBONE,
/// and the DNS proxy (with DNS capture).
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAIN_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;
pub const DNS_CAPTURE_PORT: u16 = 15053;
/// SSH is never captured in either direction, whatever the user configures, so that a crashed or
/// misconfigured tunnel still leaves a host one can log into (docs/capture.md, Mode 2).
pub const SSH_PORT: u16 = 22;
/// DNS, captured towards the DNS proxy when DNS capture is on.
pub const DNS_PORT: u16 = 53;

/// Which tool installs the rules. Both produce the same effect (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `iptables-restore`/`iptables`, whichever flavour (legacy or nf_tables) the host selected.
    #[default]
    Iptables,
    /// One table per family (`ip zmesh` for host, `ip istio-zmesh` and `ip6 istio-zmesh` in a pod),
    /// applied by `nft -f` as a single transaction.
    Nftables,
}

/// What happens to plaintext TCP arriving from outside for a captured inbound port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InboundPlaintext {
    /// Redirect it to the tunnel's plaintext inbound listener, which applies policy.
    #[default]
    Allow,
    /// Drop it: the service is reachable only through HBONE (mTLS) on the HBONE port.
    Deny,
}

/// Host-mode capture options, before validation. Every field has the default that matches the
/// tunnel's own defaults; change the marks, table or ports only together with the tunnel's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostOptions {
    /// SO_MARK of the tunnel's sockets; default [`TUNNEL_MARK`]. Must be non-zero and within [`MARK_MASK`].
    pub tunnel_mark: u32,
    /// Connmark for spoofed connections; default [`CONNMARK`]. Same constraints as `tunnel_mark`.
    pub connmark: u32,
    /// Policy-routing table for replies to spoofed sockets; default [`ROUTE_TABLE`].
    pub route_table: u32,
    /// The tunnel's uid, excluded from outbound capture as a second guard besides the mark; default none.
    pub tunnel_uid: Option<u32>,
    /// Listener for captured outbound TCP; default [`OUTBOUND_PORT`].
    pub outbound_port: u16,
    /// Listener for captured inbound plaintext TCP; default [`INBOUND_PLAIN_PORT`].
    pub inbound_plain_port: u16,
    /// HBONE listener, never captured; default [`HBONE_PORT`].
    pub hbone_port: u16,
    /// Local service ports whose inbound TCP from outside is captured; default empty (no inbound capture).
    pub inbound_ports: Vec<u16>,
    /// Redirect or drop plaintext to `inbound_ports`; default [`InboundPlaintext::Allow`].
    pub inbound_plaintext: InboundPlaintext,
    /// Destination ports never captured, in either direction; default `[22]`. 22 is always added.
    pub exclude_ports: Vec<u16>,
    /// Outbound destinations never captured (IPv4 only for now); default empty.
    pub exclude_cidrs: Vec<IpNet>,
    /// Redirect this host's DNS (UDP and TCP port 53) to `dns_servers` into the tunnel's DNS
    /// proxy; default false.
    pub dns_capture: bool,
    /// The DNS proxy's port (used only with `dns_capture`); default [`DNS_CAPTURE_PORT`].
    pub dns_port: u16,
    /// The resolvers whose queries are captured: the host's resolv.conf nameservers (IPv4).
    /// Only those, never all of port 53: a local caching resolver (systemd-resolved) asks its
    /// own upstreams on port 53 too, and capturing that would loop it through the proxy.
    /// Required with `dns_capture`; default empty.
    pub dns_servers: Vec<std::net::Ipv4Addr>,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            tunnel_mark: TUNNEL_MARK,
            connmark: CONNMARK,
            route_table: ROUTE_TABLE,
            tunnel_uid: None,
            outbound_port: OUTBOUND_PORT,
            inbound_plain_port: INBOUND_PLAIN_PORT,
            hbone_port: HBONE_PORT,
            inbound_ports: Vec::new(),
            inbound_plaintext: InboundPlaintext::Allow,
            exclude_ports: vec![SSH_PORT],
            exclude_cidrs: Vec::new(),
            dns_capture: false,
            dns_port: DNS_CAPTURE_PORT,
            dns_servers: Vec::new(),
        }
    }
}

/// Why a set of options cannot be turned into rules. Each message names the field and value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OptionsError {
    #[error("{field}: port 0 is not a valid TCP port")]
    ZeroPort { field: &'static str },
    #[error(
        "{field}: port {port} is also the tunnel's {other} port; \
         capturing it would loop traffic back into the tunnel"
    )]
    PortClash {
        field: &'static str,
        port: u16,
        other: &'static str,
    },
    #[error(
        "inbound port {port} is also an excluded port (excluded ports, and SSH 22 always, are never \
         captured); remove it from one of the two lists"
    )]
    InboundPortExcluded { port: u16 },
    #[error("{field}: mark {value:#x} must be non-zero and fit in the mask {MARK_MASK:#x}")]
    MarkOutOfRange { field: &'static str, value: u32 },
    #[error("tunnel mark and connmark are both {value:#x}; they must differ")]
    MarksEqual { value: u32 },
    #[error("route table {table} is reserved by the kernel (0 unspec, 253 default, 254 main, 255 local)")]
    ReservedRouteTable { table: u32 },
    #[error(
        "DNS capture needs the resolvers to capture (the host's resolv.conf nameservers, IPv4): \
         none given; pass --dns-servers"
    )]
    NoDnsServers,
    #[error("exclude CIDR {cidr} is IPv6; only IPv4 capture rules are generated so far")]
    Ipv6Cidr { cidr: IpNet },
    #[error(
        "{field}: {addr} cannot be the kubelet probe source (unspecified, loopback and multicast \
         addresses never arrive from the node); use the node's probe SNAT address, by default {default}"
    )]
    ProbeSource {
        field: &'static str,
        addr: std::net::IpAddr,
        default: std::net::IpAddr,
    },
}

/// Checks every mode shares: the marks, the routing table, and the tunnel's listener ports, which
/// must be non-zero and distinct (`listeners` holds field name, human name, port).
fn check_tunnel(
    tunnel_mark: u32,
    connmark: u32,
    route_table: u32,
    listeners: &[(&'static str, &'static str, u16)],
) -> Result<(), OptionsError> {
    check_mark("tunnel_mark", tunnel_mark)?;
    check_mark("connmark", connmark)?;
    if tunnel_mark == connmark {
        return Err(OptionsError::MarksEqual { value: tunnel_mark });
    }
    if matches!(route_table, 0 | 253..=255) {
        return Err(OptionsError::ReservedRouteTable { table: route_table });
    }
    for (i, &(field, _, port)) in listeners.iter().enumerate() {
        nonzero(field, port)?;
        if let Some(&(_, other, _)) = listeners[..i].iter().find(|l| l.2 == port) {
            return Err(OptionsError::PortClash { field, port, other });
        }
    }
    Ok(())
}

impl HostOptions {
    /// Validates and normalises the options: 22 is added to the excluded ports, duplicates are
    /// dropped (first occurrence kept), and CIDRs lose their host bits.
    pub fn validate(&self) -> Result<HostRules, OptionsError> {
        let mut listeners = vec![
            ("outbound_port", "outbound", self.outbound_port),
            (
                "inbound_plain_port",
                "inbound plaintext",
                self.inbound_plain_port,
            ),
            ("hbone_port", "HBONE", self.hbone_port),
        ];
        if self.dns_capture {
            listeners.push(("dns_port", "DNS", self.dns_port));
            if self.dns_servers.is_empty() {
                return Err(OptionsError::NoDnsServers);
            }
        }
        check_tunnel(
            self.tunnel_mark,
            self.connmark,
            self.route_table,
            &listeners,
        )?;

        let mut exclude_ports = vec![SSH_PORT];
        for &port in &self.exclude_ports {
            nonzero("exclude_ports", port)?;
            push_unique(&mut exclude_ports, port);
        }

        let mut inbound_ports = Vec::new();
        for &port in &self.inbound_ports {
            nonzero("inbound_ports", port)?;
            if let Some(&(_, other, _)) = listeners.iter().find(|l| l.2 == port) {
                return Err(OptionsError::PortClash {
                    field: "inbound_ports",
                    port,
                    other,
                });
            }
            if exclude_ports.contains(&port) {
                return Err(OptionsError::InboundPortExcluded { port });
            }
            push_unique(&mut inbound_ports, port);
        }

        let mut exclude_cidrs = Vec::new();
        for &cidr in &self.exclude_cidrs {
            if let IpNet::V6(_) = cidr {
                return Err(OptionsError::Ipv6Cidr { cidr });
            }
            push_unique(&mut exclude_cidrs, cidr.trunc());
        }

        let opts = HostOptions {
            inbound_ports,
            exclude_ports,
            exclude_cidrs,
            ..self.clone()
        };
        Ok(HostRules {
            capture: Capture::new(
                Scope::Host,
                vec![(Family::V4, host_chains(&opts))],
                opts.connmark,
                opts.route_table,
            ),
            options: opts,
        })
    }
}

fn check_mark(field: &'static str, value: u32) -> Result<(), OptionsError> {
    if value == 0 || value & !MARK_MASK != 0 {
        return Err(OptionsError::MarkOutOfRange { field, value });
    }
    Ok(())
}

fn nonzero(field: &'static str, port: u16) -> Result<(), OptionsError> {
    if port == 0 {
        return Err(OptionsError::ZeroPort { field });
    }
    Ok(())
}

fn push_unique<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// The validated host capture: normalised options and the [`Capture`] they produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRules {
    options: HostOptions,
    capture: Capture,
}

impl HostRules {
    /// The options after normalisation (22 included, duplicates removed, CIDRs truncated).
    pub fn options(&self) -> &HostOptions {
        &self.options
    }

    /// What `apply` installs.
    pub fn capture(&self) -> &Capture {
        &self.capture
    }

    /// The `ip rule`/`ip route` pair both backends install (host capture is IPv4 only, so one).
    pub fn routing(&self) -> &PolicyRouting {
        &self.capture.routing[0]
    }

    /// The iptables rendering: restore text plus the jumps from the built-in chains.
    pub fn iptables(&self) -> IptablesRules {
        self.capture.iptables().remove(0)
    }

    /// The nftables rendering: an `nft -f` script that atomically replaces `table ip zmesh`.
    pub fn nftables(&self) -> String {
        self.capture.nftables()
    }

    /// Everything `install` would do with `backend`, as text for people (and the golden files).
    pub fn render(&self, backend: Backend) -> String {
        self.capture.render(backend)
    }
}

/// A validated capture, whatever the mode: the chains for each IP family it covers and the policy
/// routing per family. `apply` installs and removes any `Capture` with the same steps, so host and
/// in-pod mode share them (and their idempotence) instead of each having their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    scope: Scope,
    families: Vec<(Family, Vec<Chain>)>,
    routing: Vec<PolicyRouting>,
}

impl Capture {
    /// One policy-routing pair per family, all with the same connmark and table.
    fn new(
        scope: Scope,
        families: Vec<(Family, Vec<Chain>)>,
        connmark: u32,
        table: u32,
    ) -> Capture {
        let routing = families
            .iter()
            .map(|&(family, _)| PolicyRouting {
                family,
                fwmark: connmark,
                mask: MARK_MASK,
                table,
                pref: RULE_PREF,
            })
            .collect();
        Capture {
            scope,
            families,
            routing,
        }
    }

    /// The `ip rule`/`ip route` pairs, one per family.
    pub fn routing(&self) -> &[PolicyRouting] {
        &self.routing
    }

    /// The iptables rendering per family (IPv4 first): restore text plus the jumps.
    pub fn iptables(&self) -> Vec<IptablesRules> {
        self.families
            .iter()
            .map(|(family, chains)| iptables_rules(self.scope, *family, chains))
            .collect()
    }

    /// An `nft -f` script that atomically replaces our table in every family.
    pub fn nftables(&self) -> String {
        nft_script(self.scope, &self.families)
    }

    /// An `nft -f` script that removes our table in every family, and succeeds if it is absent.
    pub fn nft_uninstall(&self) -> String {
        nft_uninstall_script(self.scope, self.families.iter().map(|(f, _)| *f))
    }

    /// Everything `install` would do with `backend`, as text for people (and the golden files). The
    /// tool input comes first and stays valid input; the follow-up commands are comments.
    pub fn render(&self, backend: Backend) -> String {
        let mode = match self.scope {
            Scope::Host => "host",
            Scope::Pod => "in-pod",
        };
        let mut out = String::new();
        match backend {
            Backend::Iptables => {
                let _ = writeln!(out, "# zmesh {mode} capture, iptables backend.");
                for ipt in self.iptables() {
                    let _ = writeln!(
                        out,
                        "# Input for `{} --noflush`: declaring a chain flushes it, so reapplying \
                         replaces rather than duplicates.",
                        ipt.family.iptables_restore()
                    );
                    out.push_str(&ipt.restore);
                    let tool = ipt.family.iptables();
                    let _ = writeln!(
                        out,
                        "# Jumps from the built-in chains, each added only if `{tool} -C` finds it missing:"
                    );
                    for jump in &ipt.jumps {
                        let _ = writeln!(out, "# {tool} {}", jump.insert_args().join(" "));
                    }
                }
            }
            Backend::Nftables => {
                let tables = if self.families.len() > 1 {
                    "tables"
                } else {
                    "table"
                };
                let _ = writeln!(
                    out,
                    "# zmesh {mode} capture, nftables backend.\n\
                     # Input for `nft -f`: one transaction that deletes and recreates the {tables}."
                );
                out.push_str(&self.nftables());
            }
        }
        out.push_str(
            "# Policy routing for source-IP preservation (the rule only if absent; replace is idempotent):\n",
        );
        for routing in &self.routing {
            let _ = writeln!(out, "# ip {}", routing.rule_args("add").join(" "));
            let _ = writeln!(out, "# ip {}", routing.route_args("replace").join(" "));
        }
        out
    }
}

/// `ip rule` + `ip route` that route replies on tunnel-spoofed connections back to the tunnel: the
/// app replies to the remote client's IP, OUTPUT restores the connmark into the packet mark, and this
/// rule sends marked packets to a table whose only route says "every address is local".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRouting {
    pub family: Family,
    pub fwmark: u32,
    pub mask: u32,
    pub table: u32,
    pub pref: u32,
}

impl PolicyRouting {
    /// `ip` arguments for the rule with `verb` (`add`, `del`, `list`).
    pub fn rule_args(&self, verb: &str) -> Vec<String> {
        [
            self.family.ip_flag(),
            "rule",
            verb,
            "fwmark",
            &format!("{:#x}/{:#x}", self.fwmark, self.mask),
            "lookup",
            &self.table.to_string(),
            "pref",
            &self.pref.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// `ip` arguments for the route with `verb` (`replace`, `del`).
    pub fn route_args(&self, verb: &str) -> Vec<String> {
        [
            self.family.ip_flag(),
            "route",
            verb,
            "local",
            self.family.any(),
            "dev",
            "lo",
            "table",
            &self.table.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }
}

/// Every (table, hook) the host capture owns. The iptables chains are always all declared, even if
/// empty, so reinstalling with different options (say Deny, then Allow) converges to the new rules
/// instead of leaving stale ones behind, and uninstall knows the full list without options.
const ALL_HOOKS: [(Table, Hook); 5] = [
    (Table::Mangle, Hook::Prerouting),
    (Table::Mangle, Hook::Output),
    (Table::Nat, Hook::Prerouting),
    (Table::Nat, Hook::Output),
    (Table::Filter, Hook::Input),
];

fn host_chains(o: &HostOptions) -> Vec<Chain> {
    let tunnel_mark = Match::Mark {
        value: o.tunnel_mark,
        mask: MARK_MASK,
    };
    let connmark = |value| Match::ConnMark {
        value,
        mask: MARK_MASK,
    };
    let excluded = || {
        o.exclude_ports
            .iter()
            .map(|&p| rule([Match::TcpDport(p)], Verdict::Return))
    };

    // Source-IP preservation: the tunnel's SYN to a local app loops over lo carrying the tunnel mark;
    // tag the connection so the app's replies can be marked and routed back to the tunnel.
    let mangle_prerouting = vec![rule(
        [tunnel_mark.clone()],
        Verdict::SetConnMark {
            value: o.connmark,
            mask: MARK_MASK,
        },
    )];
    let mangle_output = vec![rule(
        [connmark(o.connmark)],
        Verdict::RestoreMark {
            value: o.connmark,
            mask: MARK_MASK,
        },
    )];

    let mut nat_prerouting = vec![
        rule([tunnel_mark.clone()], Verdict::Return),
        rule([Match::TcpDport(o.hbone_port)], Verdict::Return),
    ];
    nat_prerouting.extend(excluded());
    if o.inbound_plaintext == InboundPlaintext::Allow {
        nat_prerouting.extend(o.inbound_ports.iter().map(|&p| {
            rule(
                [Match::TcpDport(p)],
                Verdict::Redirect(o.inbound_plain_port),
            )
        }));
    }

    let mut nat_output = vec![rule([tunnel_mark], Verdict::Return)];
    if let Some(uid) = o.tunnel_uid {
        nat_output.push(rule([Match::Uid(uid)], Verdict::Return));
    }
    // DNS to the host's resolvers goes to the DNS proxy; before the loopback return, since a
    // local stub resolver (127.0.0.53) is the usual one. The proxy's own queries carry the mark.
    if o.dns_capture {
        for &server in &o.dns_servers {
            let to = Match::Daddr(IpNet::V4(ipnet::Ipv4Net::from(server)));
            nat_output.push(rule(
                [to.clone(), Match::UdpDport(DNS_PORT)],
                Verdict::Redirect(o.dns_port),
            ));
            nat_output.push(rule(
                [to, Match::TcpDport(DNS_PORT)],
                Verdict::Redirect(o.dns_port),
            ));
        }
    }
    // Loopback and the host's own addresses (routed via lo) are local traffic, never mesh traffic.
    nat_output.push(rule([Match::OutIf("lo")], Verdict::Return));
    nat_output.extend(
        o.exclude_cidrs
            .iter()
            .map(|&c| rule([Match::Daddr(c)], Verdict::Return)),
    );
    nat_output.extend(excluded());
    // Replies on tunnel-spoofed connections (docs/capture.md: "tcp mark 0x111/0xfff -> ACCEPT").
    nat_output.push(rule(
        [
            Match::Tcp,
            Match::Mark {
                value: o.connmark,
                mask: MARK_MASK,
            },
        ],
        Verdict::Return,
    ));
    nat_output.push(rule([Match::Tcp], Verdict::Redirect(o.outbound_port)));

    let mut filter_input = Vec::new();
    if o.inbound_plaintext == InboundPlaintext::Deny && !o.inbound_ports.is_empty() {
        filter_input.extend(excluded());
        // Not from lo: the tunnel delivers decapsulated HBONE traffic to the app over lo.
        filter_input.extend(
            o.inbound_ports
                .iter()
                .map(|&p| rule([Match::NotInIf("lo"), Match::TcpDport(p)], Verdict::Drop)),
        );
    }

    chains(
        ALL_HOOKS,
        [
            mangle_prerouting,
            mangle_output,
            nat_prerouting,
            nat_output,
            filter_input,
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> HostOptions {
        HostOptions::default()
    }

    fn restore(o: &HostOptions) -> String {
        o.validate().unwrap().iptables().restore
    }

    #[test]
    fn zero_ports_are_refused_in_every_port_field() {
        type Edit = fn(&mut HostOptions);
        let cases: [(&str, Edit); 5] = [
            ("outbound_port", |o| o.outbound_port = 0),
            ("inbound_plain_port", |o| o.inbound_plain_port = 0),
            ("hbone_port", |o| o.hbone_port = 0),
            ("inbound_ports", |o| o.inbound_ports = vec![8080, 0]),
            ("exclude_ports", |o| o.exclude_ports = vec![0]),
        ];
        for (field, edit) in cases {
            let mut o = opts();
            edit(&mut o);
            assert_eq!(
                o.validate(),
                Err(OptionsError::ZeroPort { field }),
                "{field}"
            );
        }
    }

    #[test]
    fn host_dns_capture_redirects_only_the_resolvers_before_loopback_and_needs_them() {
        let o = HostOptions {
            dns_capture: true,
            ..opts()
        };
        assert_eq!(o.validate(), Err(OptionsError::NoDnsServers));
        let o = HostOptions {
            dns_capture: true,
            dns_port: 15001,
            dns_servers: vec!["127.0.0.53".parse().unwrap()],
            ..opts()
        };
        assert!(matches!(
            o.validate(),
            Err(OptionsError::PortClash {
                field: "dns_port",
                other: "outbound",
                ..
            })
        ));
        let o = HostOptions {
            dns_capture: true,
            dns_servers: vec!["127.0.0.53".parse().unwrap(), "10.0.0.2".parse().unwrap()],
            ..opts()
        };
        let text = restore(&o);
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("no {needle:?} in\n{text}"))
        };
        let udp =
            at("-A ZMESH_OUTPUT -d 127.0.0.53/32 -p udp --dport 53 -j REDIRECT --to-ports 15053");
        at("-A ZMESH_OUTPUT -d 127.0.0.53/32 -p tcp --dport 53 -j REDIRECT --to-ports 15053");
        at("-A ZMESH_OUTPUT -d 10.0.0.2/32 -p udp --dport 53 -j REDIRECT --to-ports 15053");
        assert!(
            at("-A ZMESH_OUTPUT -m mark --mark 0x539/0xfff -j RETURN") < udp,
            "the proxy's own queries pass"
        );
        assert!(
            udp < at("-A ZMESH_OUTPUT -o lo -j RETURN"),
            "before the loopback return"
        );
        // Without DNS capture, no port-53 rule at all.
        assert!(!restore(&opts()).contains("--dport 53"));
        let nft = o.validate().unwrap().nftables();
        assert!(
            nft.contains("ip daddr 127.0.0.53/32 udp dport 53 redirect to :15053"),
            "{nft}"
        );
    }

    #[test]
    fn ssh_is_always_excluded_even_when_the_user_drops_it() {
        let o = HostOptions {
            exclude_ports: vec![2222],
            ..opts()
        };
        let rules = o.validate().unwrap();
        assert_eq!(rules.options().exclude_ports, vec![22, 2222]);
        let text = rules.iptables().restore;
        assert!(text.contains("-A ZMESH_OUTPUT -p tcp --dport 22 -j RETURN"));
        assert!(text.contains("-A ZMESH_PRERT -p tcp --dport 22 -j RETURN"));
        assert!(rules.nftables().contains("tcp dport 22 return"));

        let o = HostOptions {
            exclude_ports: vec![],
            ..opts()
        };
        assert_eq!(o.validate().unwrap().options().exclude_ports, vec![22]);
    }

    #[test]
    fn inbound_ports_may_not_be_excluded_or_tunnel_ports() {
        let o = HostOptions {
            inbound_ports: vec![22],
            ..opts()
        };
        assert_eq!(
            o.validate(),
            Err(OptionsError::InboundPortExcluded { port: 22 })
        );
        let o = HostOptions {
            inbound_ports: vec![15008],
            ..opts()
        };
        assert!(matches!(
            o.validate(),
            Err(OptionsError::PortClash {
                port: 15008,
                other: "HBONE",
                ..
            })
        ));
        let o = HostOptions {
            inbound_plain_port: 15001,
            ..opts()
        };
        assert!(matches!(
            o.validate(),
            Err(OptionsError::PortClash {
                field: "inbound_plain_port",
                other: "outbound",
                ..
            })
        ));
    }

    #[test]
    fn marks_and_table_are_range_checked() {
        for (o, want) in [
            (
                HostOptions {
                    tunnel_mark: 0x1000,
                    ..opts()
                },
                OptionsError::MarkOutOfRange {
                    field: "tunnel_mark",
                    value: 0x1000,
                },
            ),
            (
                HostOptions {
                    connmark: 0,
                    ..opts()
                },
                OptionsError::MarkOutOfRange {
                    field: "connmark",
                    value: 0,
                },
            ),
            (
                HostOptions {
                    connmark: TUNNEL_MARK,
                    ..opts()
                },
                OptionsError::MarksEqual { value: TUNNEL_MARK },
            ),
            (
                HostOptions {
                    route_table: 254,
                    ..opts()
                },
                OptionsError::ReservedRouteTable { table: 254 },
            ),
        ] {
            assert_eq!(o.validate(), Err(want));
        }
    }

    #[test]
    fn exclude_cidrs_are_honoured_normalised_and_ipv4_only() {
        let o = HostOptions {
            exclude_cidrs: vec![
                "10.1.2.3/8".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
                "169.254.169.254/32".parse().unwrap(),
            ],
            ..opts()
        };
        let rules = o.validate().unwrap();
        let text = rules.iptables().restore;
        assert_eq!(text.matches("-d 10.0.0.0/8 -j RETURN").count(), 1);
        assert!(text.contains("-A ZMESH_OUTPUT -d 169.254.169.254/32 -j RETURN"));
        // Exclusions must come before the catch-all redirect to take effect.
        assert!(
            text.find("-d 10.0.0.0/8").unwrap() < text.find("REDIRECT --to-ports 15001").unwrap()
        );
        assert!(rules.nftables().contains("ip daddr 10.0.0.0/8 return"));

        let o = HostOptions {
            exclude_cidrs: vec!["fd00::/8".parse().unwrap()],
            ..opts()
        };
        assert!(matches!(o.validate(), Err(OptionsError::Ipv6Cidr { .. })));
    }

    #[test]
    fn deny_drops_instead_of_redirecting_and_ssh_comes_first() {
        let o = HostOptions {
            inbound_ports: vec![8080],
            inbound_plaintext: InboundPlaintext::Deny,
            ..opts()
        };
        let text = restore(&o);
        assert!(!text.contains("--to-ports 15006"));
        let ssh = text
            .find("-A ZMESH_INPUT -p tcp --dport 22 -j RETURN")
            .unwrap();
        let drop = text
            .find("-A ZMESH_INPUT ! -i lo -p tcp --dport 8080 -j DROP")
            .unwrap();
        assert!(ssh < drop);

        let allow = restore(&HostOptions {
            inbound_ports: vec![8080],
            ..opts()
        });
        assert!(allow.contains("-A ZMESH_PRERT -p tcp --dport 8080 -j REDIRECT --to-ports 15006"));
        assert!(!allow.contains("DROP"));
        // Declared even when empty, so a Deny -> Allow reinstall flushes the old drops.
        assert!(allow.contains(":ZMESH_INPUT - [0:0]"));
    }

    #[test]
    fn tunnel_uid_is_excluded_only_when_set() {
        assert!(!restore(&opts()).contains("--uid-owner"));
        let text = restore(&HostOptions {
            tunnel_uid: Some(997),
            ..opts()
        });
        assert!(text.contains("-A ZMESH_OUTPUT -m owner --uid-owner 997 -j RETURN"));
    }

    #[test]
    fn jumps_and_routing_commands() {
        let rules = opts().validate().unwrap();
        let jumps = rules.iptables().jumps;
        assert_eq!(jumps.len(), 5);
        assert_eq!(
            jumps[3].insert_args().join(" "),
            "-t nat -I OUTPUT 1 -j ZMESH_OUTPUT"
        );
        assert_eq!(
            jumps[3].check_args().join(" "),
            "-t nat -C OUTPUT -j ZMESH_OUTPUT"
        );
        assert_eq!(
            rules.routing().rule_args("add").join(" "),
            "-4 rule add fwmark 0x111/0xfff lookup 100 pref 32764"
        );
        assert_eq!(
            rules.routing().route_args("replace").join(" "),
            "-4 route replace local 0.0.0.0/0 dev lo table 100"
        );
    }

    #[test]
    fn nft_script_replaces_the_table_in_one_transaction() {
        let script = opts().validate().unwrap().nftables();
        assert!(script.starts_with("table ip zmesh {}\ndelete table ip zmesh\ntable ip zmesh {\n"));
        assert!(script.contains("type route hook output priority mangle;"));
        assert!(script.contains("type nat hook output priority -100;"));
        // Allow mode with no inbound ports has no filter rules, so no filter chain.
        assert!(!script.contains("filter_input"));
    }
}
