//! The backend-neutral rule model and its two renderings. A chain is a list of (matches, verdict)
//! rules; `iptables_rules` and `nft_script` turn the same chains into `iptables-restore` text and an
//! `nft -f` script, so the backends cannot drift apart and each capture mode (host, in-pod) only has
//! to build chains. A [`Scope`] names what a mode owns (chain and table names), a [`Family`] says
//! which IP version a set of chains is for.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Which capture mode owns a set of chains. The names differ so each mode can only ever touch its
/// own rules, and uninstall knows them without options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Host mode: `ZMESH_*` chains and `table ip zmesh`, in a host netns that other software shares.
    Host,
    /// In-pod mode: `ISTIO_PRERT`/`ISTIO_OUTPUT`, the names istio-cni uses inside the pod netns
    /// (docs/capture.md, Mode 1), so tooling that inspects a pod finds them where it expects, and zmesh and
    /// istio-cni replace rather than stack on each other. The nft table is `istio-zmesh`: istio-cni's
    /// own nft tables are named differently, so the name says "istio-compatible, installed by zmesh".
    Pod,
}

impl Scope {
    /// The nftables table we own; delete-and-recreate of it is the whole install.
    pub(super) fn nft_table(self) -> &'static str {
        match self {
            Scope::Host => "zmesh",
            Scope::Pod => "istio-zmesh",
        }
    }

    /// Our iptables chain for a hook; the same name in every table, as iptables namespaces chains
    /// per table.
    pub(super) fn chain_name(self, hook: Hook) -> &'static str {
        match (self, hook) {
            (Scope::Host, Hook::Prerouting) => "ZMESH_PRERT",
            (Scope::Host, Hook::Input) => "ZMESH_INPUT",
            (Scope::Host, Hook::Output) => "ZMESH_OUTPUT",
            (Scope::Pod, Hook::Prerouting) => "ISTIO_PRERT",
            (Scope::Pod, Hook::Input) => "ISTIO_INPUT",
            (Scope::Pod, Hook::Output) => "ISTIO_OUTPUT",
        }
    }
}

/// The IP version a rendering is for: iptables and nftables keep separate rulesets per family, and
/// policy routing is per family too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// `iptables` or `ip6tables`.
    pub fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// `iptables-restore` or `ip6tables-restore`.
    pub fn iptables_restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The nftables family of our table.
    pub fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// The `ip` command's family flag.
    pub fn ip_flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    /// The whole address space, for the "everything is local" route.
    pub fn any(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }

    /// The loopback address (not the whole 127/8: istio's in-pod rules exclude exactly 127.0.0.1).
    pub fn localhost(self) -> IpNet {
        let addr: IpAddr = match self {
            Family::V4 => Ipv4Addr::LOCALHOST.into(),
            Family::V6 => Ipv6Addr::LOCALHOST.into(),
        };
        addr.into()
    }
}

/// The iptables rendering for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesRules {
    /// Which tools apply it: `iptables*` or `ip6tables*`.
    pub family: Family,
    /// Input for `iptables-restore --noflush`. It declares every `ZMESH_*` chain, which creates it or
    /// flushes it, so the chains always end up holding exactly these rules.
    pub restore: String,
    /// Jumps from the built-in chains into ours. `iptables-restore` cannot say "add if missing",
    /// so these are checked with `iptables -C` and inserted one by one.
    pub jumps: Vec<Jump>,
}

/// A jump from a built-in chain into one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub from: &'static str,
    pub to: &'static str,
}

impl Jump {
    /// Inserted at the top, not appended: capture must win over rules the host already has (a
    /// firewall ACCEPT ahead of our DROP would otherwise let refused plaintext in).
    pub fn insert_args(&self) -> Vec<String> {
        self.args(&["-I", self.from, "1"])
    }

    /// Arguments for `iptables -C`, which exits 0 if the jump exists and 1 if it does not.
    pub fn check_args(&self) -> Vec<String> {
        self.args(&["-C", self.from])
    }

    pub fn delete_args(&self) -> Vec<String> {
        self.args(&["-D", self.from])
    }

    fn args(&self, op: &[&str]) -> Vec<String> {
        let mut args = vec!["-t", self.table];
        args.extend_from_slice(op);
        args.extend_from_slice(&["-j", self.to]);
        args.into_iter().map(String::from).collect()
    }
}

/// `nft -f` input that removes our table in each family, and succeeds when it is absent (declaring
/// an empty table first creates it if needed; `destroy table` would need nft 1.0.8).
pub(super) fn nft_uninstall_script(
    scope: Scope,
    families: impl IntoIterator<Item = Family>,
) -> String {
    let table = scope.nft_table();
    let mut out = String::new();
    for family in families {
        let family = family.nft();
        let _ = writeln!(
            out,
            "table {family} {table} {{}}\ndelete table {family} {table}"
        );
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Table {
    Mangle,
    Nat,
    Filter,
    /// Runs before conntrack; only used to put DNS traffic into its own conntrack zone.
    Raw,
}

impl Table {
    pub(super) fn iptables(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Filter => "filter",
            Table::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hook {
    Prerouting,
    Input,
    Output,
}

impl Hook {
    pub(super) fn builtin(self) -> &'static str {
        match self {
            Hook::Prerouting => "PREROUTING",
            Hook::Input => "INPUT",
            Hook::Output => "OUTPUT",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Chain {
    pub(super) table: Table,
    pub(super) hook: Hook,
    pub(super) rules: Vec<Rule>,
}

/// Pairs each (table, hook) a mode owns with its rules, in order. Every pair yields a chain, even
/// with no rules: iptables then still declares (and so flushes) it, which is how a reinstall with
/// other options drops rules the new options no longer want.
pub(super) fn chains<const N: usize>(
    hooks: [(Table, Hook); N],
    rules: [Vec<Rule>; N],
) -> Vec<Chain> {
    hooks
        .into_iter()
        .zip(rules)
        .map(|((table, hook), rules)| Chain { table, hook, rules })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rule {
    matches: Vec<Match>,
    verdict: Verdict,
}

pub(super) fn rule(matches: impl Into<Vec<Match>>, verdict: Verdict) -> Rule {
    Rule {
        matches: matches.into(),
        verdict,
    }
}

/// One condition of a rule. Addresses carry their family, so the renderers pick `ip`/`ip6` from
/// the address itself; `Not*` variants are the negations istio's in-pod rules need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Match {
    Tcp,
    /// Port matches imply their protocol, so renderers emit it with them (iptables needs `-p tcp`
    /// before `--dport`).
    TcpDport(u16),
    NotTcpDport(u16),
    UdpDport(u16),
    UdpSport(u16),
    Mark {
        value: u32,
        mask: u32,
    },
    NotMark {
        value: u32,
        mask: u32,
    },
    ConnMark {
        value: u32,
        mask: u32,
    },
    Uid(u32),
    OutIf(&'static str),
    NotInIf(&'static str),
    Daddr(IpNet),
    NotDaddr(IpNet),
    Saddr(IpNet),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    Return,
    Accept,
    Drop,
    /// Put the connection in this conntrack zone (only valid in the raw table).
    CtZone(u16),
    Redirect(u16),
    SetConnMark {
        value: u32,
        mask: u32,
    },
    /// Copy the masked connmark into the packet mark. The rule must also match `ct mark & mask ==
    /// value`: nftables cannot mix the packet mark and connmark in one expression on older kernels,
    /// so it writes the known value instead, which is the same result under that match.
    RestoreMark {
        value: u32,
        mask: u32,
    },
}

// ---- iptables rendering ----------------------------------------------------------------------

struct Hex(u32);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

pub(super) fn iptables_rules(scope: Scope, family: Family, chains: &[Chain]) -> IptablesRules {
    let mut by_table: BTreeMap<Table, Vec<&Chain>> = BTreeMap::new();
    for chain in chains {
        by_table.entry(chain.table).or_default().push(chain);
    }
    let mut restore = String::new();
    for (table, chains) in &by_table {
        let _ = writeln!(restore, "*{}", table.iptables());
        for chain in chains {
            let _ = writeln!(restore, ":{} - [0:0]", scope.chain_name(chain.hook));
        }
        for chain in chains {
            for rule in &chain.rules {
                let _ = write!(restore, "-A {}", scope.chain_name(chain.hook));
                for m in &rule.matches {
                    restore.push(' ');
                    restore.push_str(&iptables_match(m));
                }
                let _ = writeln!(restore, " -j {}", iptables_verdict(&rule.verdict));
            }
        }
        restore.push_str("COMMIT\n");
    }
    let jumps = chains
        .iter()
        .map(|c| Jump {
            table: c.table.iptables(),
            from: c.hook.builtin(),
            to: scope.chain_name(c.hook),
        })
        .collect();
    IptablesRules {
        family,
        restore,
        jumps,
    }
}

fn iptables_match(m: &Match) -> String {
    match m {
        Match::Tcp => "-p tcp".into(),
        Match::TcpDport(p) => format!("-p tcp --dport {p}"),
        Match::NotTcpDport(p) => format!("-p tcp ! --dport {p}"),
        Match::UdpDport(p) => format!("-p udp --dport {p}"),
        Match::UdpSport(p) => format!("-p udp --sport {p}"),
        Match::Mark { value, mask } => format!("-m mark --mark {}/{}", Hex(*value), Hex(*mask)),
        Match::NotMark { value, mask } => {
            format!("-m mark ! --mark {}/{}", Hex(*value), Hex(*mask))
        }
        Match::ConnMark { value, mask } => {
            format!("-m connmark --mark {}/{}", Hex(*value), Hex(*mask))
        }
        Match::Uid(uid) => format!("-m owner --uid-owner {uid}"),
        Match::OutIf(dev) => format!("-o {dev}"),
        Match::NotInIf(dev) => format!("! -i {dev}"),
        Match::Daddr(net) => format!("-d {net}"),
        Match::NotDaddr(net) => format!("! -d {net}"),
        Match::Saddr(net) => format!("-s {net}"),
    }
}

fn iptables_verdict(v: &Verdict) -> String {
    match v {
        Verdict::Return => "RETURN".into(),
        Verdict::Accept => "ACCEPT".into(),
        Verdict::Drop => "DROP".into(),
        Verdict::CtZone(zone) => format!("CT --zone {zone}"),
        Verdict::Redirect(p) => format!("REDIRECT --to-ports {p}"),
        Verdict::SetConnMark { value, mask } => {
            format!("CONNMARK --set-xmark {}/{}", Hex(*value), Hex(*mask))
        }
        Verdict::RestoreMark { mask, .. } => format!(
            "CONNMARK --restore-mark --nfmask {} --ctmask {}",
            Hex(*mask),
            Hex(*mask)
        ),
    }
}

// ---- nftables rendering ----------------------------------------------------------------------

pub(super) fn nft_script(scope: Scope, families: &[(Family, Vec<Chain>)]) -> String {
    // The empty declaration makes the delete succeed on a first install; all the statements are
    // one transaction, so the netns never sees a moment without (or with half of) the rules.
    let mut out = nft_uninstall_script(scope, families.iter().map(|(f, _)| *f));
    for (family, chains) in families {
        nft_table(&mut out, scope, *family, chains);
    }
    out
}

fn nft_table(out: &mut String, scope: Scope, family: Family, chains: &[Chain]) {
    let _ = writeln!(out, "table {} {} {{", family.nft(), scope.nft_table());
    // An empty base chain would only cost a hook traversal; the table is rebuilt whole each time, so
    // leaving it out cannot strand stale rules the way it could with iptables.
    for chain in chains.iter().filter(|c| !c.rules.is_empty()) {
        let (kind, priority) = nft_base_chain(chain.table, chain.hook);
        let _ = writeln!(
            out,
            "\tchain {}_{} {{",
            chain.table.iptables(),
            chain.hook.builtin().to_lowercase()
        );
        let _ = writeln!(
            out,
            "\t\ttype {kind} hook {} priority {priority}; policy accept;",
            chain.hook.builtin().to_lowercase()
        );
        for rule in &chain.rules {
            out.push_str("\t\t");
            for m in &rule.matches {
                out.push_str(&nft_match(m));
                out.push(' ');
            }
            out.push_str(&nft_verdict(&rule.verdict));
            out.push('\n');
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
}

/// Chain type and priority that put each base chain where the iptables table of the same name runs.
fn nft_base_chain(table: Table, hook: Hook) -> (&'static str, &'static str) {
    match (table, hook) {
        // `route` re-runs the routing decision when the mark changes, as iptables' mangle OUTPUT
        // does; without it the restored mark would never reach the fwmark rule.
        (Table::Mangle, Hook::Output) => ("route", "mangle"),
        (Table::Mangle, _) => ("filter", "mangle"),
        // nft only accepts the name `dstnat` on prerouting; -100 is the same value on output.
        (Table::Nat, Hook::Prerouting) => ("nat", "dstnat"),
        (Table::Nat, _) => ("nat", "-100"),
        (Table::Filter, _) => ("filter", "filter"),
        // Before conntrack (-200), so a zone set here applies to the lookup of this very packet.
        (Table::Raw, _) => ("filter", "raw"),
    }
}

fn nft_match(m: &Match) -> String {
    match m {
        Match::Tcp => "meta l4proto tcp".into(),
        Match::TcpDport(p) => format!("tcp dport {p}"),
        Match::NotTcpDport(p) => format!("tcp dport != {p}"),
        Match::UdpDport(p) => format!("udp dport {p}"),
        Match::UdpSport(p) => format!("udp sport {p}"),
        Match::Mark { value, mask } => format!("meta mark & {} == {}", Hex(*mask), Hex(*value)),
        Match::NotMark { value, mask } => {
            format!("meta mark & {} != {}", Hex(*mask), Hex(*value))
        }
        Match::ConnMark { value, mask } => format!("ct mark & {} == {}", Hex(*mask), Hex(*value)),
        Match::Uid(uid) => format!("meta skuid {uid}"),
        Match::OutIf(dev) => format!("oifname \"{dev}\""),
        Match::NotInIf(dev) => format!("iifname != \"{dev}\""),
        Match::Daddr(net) => format!("{} daddr {net}", nft_ip(net)),
        Match::NotDaddr(net) => format!("{} daddr != {net}", nft_ip(net)),
        Match::Saddr(net) => format!("{} saddr {net}", nft_ip(net)),
    }
}

/// The nft payload keyword for an address of this family.
fn nft_ip(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    }
}

fn nft_verdict(v: &Verdict) -> String {
    match v {
        Verdict::Return => "return".into(),
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::CtZone(zone) => format!("ct zone set {zone}"),
        Verdict::Redirect(p) => format!("redirect to :{p}"),
        // set-xmark is (ctmark & ~mask) ^ value; with value inside mask that is the same as `|`.
        Verdict::SetConnMark { value, mask } => {
            format!("ct mark set ct mark & {} | {}", Hex(!mask), Hex(*value))
        }
        Verdict::RestoreMark { value, mask } => {
            format!("meta mark set meta mark & {} | {}", Hex(!mask), Hex(*value))
        }
    }
}
