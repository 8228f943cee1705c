//! In-pod capture (docs/capture.md, "Mode 1: in-pod"): the rules the redirect agent installs inside each
//! enrolled pod's network namespace. They are istio-cni's in-pod rules, rule for rule and with the
//! same chain names, because the node tunnel must behave like ztunnel in a pod set up either way.
//! Unlike host mode nothing is scoped by port: the pod netns belongs to one workload, so all its TCP
//! goes through the tunnel except the tunnel's own sockets (mark 0x539), kubelet probes, and traffic
//! that stays on the pod's loopback. Options are validated into [`PodRules`], a [`Capture`] that
//! `apply::install_pod` installs exactly as it installs host capture.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::model::{chains, rule, Chain, Family, Hook, Match, Scope, Table, Verdict};
use super::{check_tunnel, Capture, OptionsError, CONNMARK, MARK_MASK, ROUTE_TABLE};
use super::{
    DNS_CAPTURE_PORT, DNS_PORT, HBONE_PORT, INBOUND_PLAIN_PORT, OUTBOUND_PORT, TUNNEL_MARK,
};

/// Source address kubelet probes arrive from once the node SNATs them (istio-cni's
/// `HOST_PROBE_SNAT_IP` default; docs/capture.md). Probes must reach the app directly, not via policy.
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// The IPv6 counterpart (istio-cni's `HOST_PROBE_V6_SNAT_IP` default).
pub const PROBE_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);
/// Conntrack zone of the tunnel's upstream DNS exchanges (istio uses 1). The app's query to
/// server:53 was redirected to the proxy, so its conntrack entry already owns that tuple; the
/// proxy's own query from the pod IP to the same server could clash with it in the default zone.
const DNS_CT_ZONE: u16 = 1;

/// Every (table, hook) the in-pod capture owns, in rendering order. All are declared even when empty
/// (raw without DNS capture, say), so reinstalling with other options converges and uninstall knows
/// the full list without options.
const POD_HOOKS: [(Table, Hook); 6] = [
    (Table::Mangle, Hook::Prerouting),
    (Table::Mangle, Hook::Output),
    (Table::Nat, Hook::Prerouting),
    (Table::Nat, Hook::Output),
    (Table::Raw, Hook::Prerouting),
    (Table::Raw, Hook::Output),
];

/// In-pod capture options, before validation. The defaults are docs/capture.md's constants and match
/// the tunnel's defaults; change marks, table or ports only together with the tunnel's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOptions {
    /// Redirect inbound TCP to the plaintext inbound listener; default true. False is the per-pod
    /// "inbound capture bypass" opt-out: inbound plaintext reaches the app directly (HBONE to 15008
    /// still works, since that port is the tunnel's own listener).
    pub inbound_capture: bool,
    /// Redirect the pod's DNS (UDP and TCP port 53) to the tunnel's DNS proxy; default false.
    pub dns_capture: bool,
    /// SO_MARK of the tunnel's sockets; default [`TUNNEL_MARK`]. Non-zero and within [`MARK_MASK`].
    pub tunnel_mark: u32,
    /// Connmark for spoofed connections; default [`CONNMARK`]. Same constraints as `tunnel_mark`.
    pub connmark: u32,
    /// Policy-routing table for replies to spoofed sockets; default [`ROUTE_TABLE`].
    pub route_table: u32,
    /// SNAT source of kubelet probes, never captured; default [`PROBE_SOURCE`].
    pub probe_source: Ipv4Addr,
    /// IPv6 SNAT source of kubelet probes (used only with `ipv6`); default [`PROBE_SOURCE_V6`].
    pub probe_source_v6: Ipv6Addr,
    /// Listener for captured outbound TCP; default [`OUTBOUND_PORT`].
    pub outbound_port: u16,
    /// Listener for captured inbound plaintext TCP; default [`INBOUND_PLAIN_PORT`].
    pub inbound_plain_port: u16,
    /// HBONE listener, never captured; default [`HBONE_PORT`].
    pub hbone_port: u16,
    /// DNS proxy listener (used only with `dns_capture`); default [`DNS_CAPTURE_PORT`].
    pub dns_port: u16,
    /// Also capture IPv6 (ip6tables or `table ip6`, and the `::/0` local route); default false.
    /// Enable it only for pods with IPv6 up: the v6 local route needs a working IPv6 stack.
    pub ipv6: bool,
}

impl Default for PodOptions {
    fn default() -> Self {
        Self {
            inbound_capture: true,
            dns_capture: false,
            tunnel_mark: TUNNEL_MARK,
            connmark: CONNMARK,
            route_table: ROUTE_TABLE,
            probe_source: PROBE_SOURCE,
            probe_source_v6: PROBE_SOURCE_V6,
            outbound_port: OUTBOUND_PORT,
            inbound_plain_port: INBOUND_PLAIN_PORT,
            hbone_port: HBONE_PORT,
            dns_port: DNS_CAPTURE_PORT,
            ipv6: false,
        }
    }
}

impl PodOptions {
    /// Validates the options with the same checks as host mode (marks, table, distinct non-zero
    /// listener ports) plus a usable probe source.
    pub fn validate(&self) -> Result<PodRules, OptionsError> {
        check_tunnel(
            self.tunnel_mark,
            self.connmark,
            self.route_table,
            &[
                ("outbound_port", "outbound", self.outbound_port),
                (
                    "inbound_plain_port",
                    "inbound plaintext",
                    self.inbound_plain_port,
                ),
                ("hbone_port", "HBONE", self.hbone_port),
                ("dns_port", "DNS", self.dns_port),
            ],
        )?;
        // 53 is what gets redirected; a proxy listening there would capture its own replies.
        if self.dns_port == DNS_PORT {
            return Err(OptionsError::PortClash {
                field: "dns_port",
                port: DNS_PORT,
                other: "captured DNS",
            });
        }
        check_probe(
            "probe_source",
            self.probe_source.into(),
            PROBE_SOURCE.into(),
        )?;
        check_probe(
            "probe_source_v6",
            self.probe_source_v6.into(),
            PROBE_SOURCE_V6.into(),
        )?;

        let mut families = vec![(Family::V4, pod_chains(self, Family::V4))];
        if self.ipv6 {
            families.push((Family::V6, pod_chains(self, Family::V6)));
        }
        Ok(PodRules {
            capture: Capture::new(Scope::Pod, families, self.connmark, self.route_table),
            options: self.clone(),
        })
    }
}

fn check_probe(field: &'static str, addr: IpAddr, default: IpAddr) -> Result<(), OptionsError> {
    if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() {
        return Err(OptionsError::ProbeSource {
            field,
            addr,
            default,
        });
    }
    Ok(())
}

/// The validated in-pod capture: the options and the [`Capture`] they produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRules {
    options: PodOptions,
    capture: Capture,
}

impl PodRules {
    pub fn options(&self) -> &PodOptions {
        &self.options
    }

    /// What `apply::install_pod` installs; also renders it (`capture().render(backend)`).
    pub fn capture(&self) -> &Capture {
        &self.capture
    }
}

/// docs/capture.md's rule block for one family. The order inside each chain is the spec's and matters:
/// the ACCEPTs must precede the catch-all REDIRECTs they carve exceptions out of.
fn pod_chains(o: &PodOptions, family: Family) -> Vec<Chain> {
    let localhost = family.localhost();
    let probe: IpAddr = match family {
        Family::V4 => o.probe_source.into(),
        Family::V6 => o.probe_source_v6.into(),
    };
    let tunnel = Match::Mark {
        value: o.tunnel_mark,
        mask: MARK_MASK,
    };
    let not_tunnel = || Match::NotMark {
        value: o.tunnel_mark,
        mask: MARK_MASK,
    };

    // Source-IP preservation, as in host mode: tag connections the tunnel dials from a spoofed
    // source, and restore the tag onto the app's replies so table 100 routes them to the tunnel.
    let mangle_prerouting = vec![rule(
        [tunnel.clone()],
        Verdict::SetConnMark {
            value: o.connmark,
            mask: MARK_MASK,
        },
    )];
    let mangle_output = vec![rule(
        [Match::ConnMark {
            value: o.connmark,
            mask: MARK_MASK,
        }],
        Verdict::RestoreMark {
            value: o.connmark,
            mask: MARK_MASK,
        },
    )];

    // Kubelet probes go straight to the app, without policy or the tunnel being up.
    let mut nat_prerouting = vec![rule(
        [Match::Saddr(probe.into()), Match::Tcp],
        Verdict::Accept,
    )];
    if o.inbound_capture {
        // HBONE to 15008 is already addressed to the tunnel; the tunnel's own spoofed dials to the
        // app loop over lo carrying its mark and must reach the app.
        nat_prerouting.push(rule(
            [
                Match::NotDaddr(localhost),
                Match::NotTcpDport(o.hbone_port),
                not_tunnel(),
            ],
            Verdict::Redirect(o.inbound_plain_port),
        ));
    }

    let mut nat_output = vec![rule(
        [Match::Daddr(probe.into()), Match::Tcp],
        Verdict::Accept,
    )];
    if o.dns_capture {
        nat_output.extend([
            rule(
                [Match::UdpDport(DNS_PORT), not_tunnel()],
                Verdict::Redirect(o.dns_port),
            ),
            rule(
                [Match::TcpDport(DNS_PORT), not_tunnel()],
                Verdict::Redirect(o.dns_port),
            ),
        ]);
    }
    nat_output.extend([
        // Replies on tunnel-spoofed connections.
        rule(
            [
                Match::Tcp,
                Match::Mark {
                    value: o.connmark,
                    mask: MARK_MASK,
                },
            ],
            Verdict::Accept,
        ),
        // The pod talking to its own IP is routed over lo and stays inside the pod.
        rule(
            [Match::NotDaddr(localhost), Match::OutIf("lo")],
            Verdict::Accept,
        ),
        rule(
            [Match::NotDaddr(localhost), Match::Tcp, not_tunnel()],
            Verdict::Redirect(o.outbound_port),
        ),
    ]);

    // The DNS proxy's upstream queries (marked) and the answers to them get their own zone.
    let (raw_prerouting, raw_output) = if o.dns_capture {
        (
            vec![rule(
                [Match::UdpSport(DNS_PORT), not_tunnel()],
                Verdict::CtZone(DNS_CT_ZONE),
            )],
            vec![rule(
                [Match::UdpDport(DNS_PORT), tunnel],
                Verdict::CtZone(DNS_CT_ZONE),
            )],
        )
    } else {
        (Vec::new(), Vec::new())
    };

    chains(
        POD_HOOKS,
        [
            mangle_prerouting,
            mangle_output,
            nat_prerouting,
            nat_output,
            raw_prerouting,
            raw_output,
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Backend;

    fn restore(o: &PodOptions) -> String {
        let ipt = o.validate().unwrap().capture().iptables();
        ipt.iter().map(|r| r.restore.as_str()).collect()
    }

    #[test]
    fn default_rules_are_the_spec_block() {
        let text = restore(&PodOptions::default());
        for line in [
            "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
            "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xfff --ctmask 0xfff",
            "-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -j ACCEPT",
            "-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -j ACCEPT",
            "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
            "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
        assert!(!text.contains("15053") && !text.contains("CT --zone"));
        // Raw chains are declared (so a DNS -> no-DNS reinstall flushes them) but empty.
        assert!(text.contains("*raw\n:ISTIO_PRERT - [0:0]\n:ISTIO_OUTPUT - [0:0]\nCOMMIT\n"));
    }

    #[test]
    fn exceptions_precede_the_catch_all_redirects() {
        let text = restore(&PodOptions {
            dns_capture: true,
            ..PodOptions::default()
        });
        let at = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("{needle}"));
        let outbound = at("--to-ports 15001");
        for before in [
            "-d 169.254.7.127/32 -p tcp -j ACCEPT",
            "-p udp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053",
            "-p tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053",
            "-o lo -j ACCEPT",
        ] {
            assert!(at(before) < outbound, "{before}");
        }
        assert!(at("-s 169.254.7.127/32") < at("--to-ports 15006"));
        assert!(text.contains(
            "-A ISTIO_PRERT -p udp --sport 53 -m mark ! --mark 0x539/0xfff -j CT --zone 1"
        ));
        assert!(text.contains(
            "-A ISTIO_OUTPUT -p udp --dport 53 -m mark --mark 0x539/0xfff -j CT --zone 1"
        ));
    }

    #[test]
    fn inbound_bypass_drops_only_the_inbound_redirect() {
        let text = restore(&PodOptions {
            inbound_capture: false,
            ..PodOptions::default()
        });
        assert!(!text.contains("15006"));
        assert!(text.contains("-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -j ACCEPT"));
        assert!(text.contains("--to-ports 15001"));
    }

    #[test]
    fn ipv6_adds_a_second_family_everywhere() {
        let rules = PodOptions {
            ipv6: true,
            ..PodOptions::default()
        }
        .validate()
        .unwrap();
        let capture = rules.capture();
        let ipt = capture.iptables();
        assert_eq!(ipt.len(), 2);
        assert_eq!(ipt[1].family, Family::V6);
        assert!(ipt[1].restore.contains(
            "-A ISTIO_PRERT ! -d ::1/128 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006"
        ));
        assert!(ipt[1].restore.contains(
            "-A ISTIO_PRERT -s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -j ACCEPT"
        ));
        assert!(!ipt[1].restore.contains("127.0.0.1"));
        let nft = capture.nftables();
        assert!(nft.contains("table ip6 istio-zmesh {\n"));
        assert!(nft.contains(
            "ip6 daddr != ::1/128 meta l4proto tcp meta mark & 0xfff != 0x539 redirect to :15001"
        ));
        let routes: Vec<String> = capture
            .routing()
            .iter()
            .map(|r| r.route_args("replace").join(" "))
            .collect();
        assert_eq!(
            routes,
            [
                "-4 route replace local 0.0.0.0/0 dev lo table 100",
                "-6 route replace local ::/0 dev lo table 100"
            ]
        );
        assert!(capture
            .render(Backend::Iptables)
            .contains("# ip6tables -t nat -I OUTPUT 1 -j ISTIO_OUTPUT"));
    }

    #[test]
    fn options_are_validated_like_host_options() {
        let bad = |edit: fn(&mut PodOptions)| {
            let mut o = PodOptions::default();
            edit(&mut o);
            o.validate().unwrap_err()
        };
        assert_eq!(
            bad(|o| o.dns_port = 15001),
            OptionsError::PortClash {
                field: "dns_port",
                port: 15001,
                other: "outbound"
            }
        );
        assert_eq!(
            bad(|o| o.dns_port = 53),
            OptionsError::PortClash {
                field: "dns_port",
                port: 53,
                other: "captured DNS"
            }
        );
        assert_eq!(
            bad(|o| o.connmark = TUNNEL_MARK),
            OptionsError::MarksEqual { value: TUNNEL_MARK }
        );
        assert_eq!(
            bad(|o| o.route_table = 255),
            OptionsError::ReservedRouteTable { table: 255 }
        );
        assert_eq!(
            bad(|o| o.outbound_port = 0),
            OptionsError::ZeroPort {
                field: "outbound_port"
            }
        );
        assert!(matches!(
            bad(|o| o.probe_source = Ipv4Addr::LOCALHOST),
            OptionsError::ProbeSource {
                field: "probe_source",
                ..
            }
        ));
    }
}
