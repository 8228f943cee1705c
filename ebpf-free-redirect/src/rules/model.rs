//! The backend-neutral rule model and its two renderings. A chain is a list of (matches, verdict)
//! rules; `iptables_rules` and `nft_script` turn the same chains into `iptables-restore` text and an
//! `nft -f` script, so the backends cannot drift apart and each new capture mode (host now, in-pod
//! next) only has to build chains.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use ipnet::IpNet;

/// The single nftables table we own; delete-and-recreate of it is the whole install.
const NFT_TABLE: &str = "zmesh";

/// The iptables rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesRules {
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

/// `nft -f` input that removes our table, and succeeds when it is absent (declaring an empty table
/// first creates it if needed; `destroy table` would need nft 1.0.8).
pub fn nft_uninstall_script() -> String {
    format!("table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Table {
    Mangle,
    Nat,
    Filter,
}

impl Table {
    pub(super) fn iptables(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Filter => "filter",
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

    /// Our iptables chain for this hook; the same shape as istio's ISTIO_PRERT/ISTIO_OUTPUT, and
    /// the same name in every table, as iptables namespaces chains per table.
    pub(super) fn chain_name(self) -> &'static str {
        match self {
            Hook::Prerouting => "ZMESH_PRERT",
            Hook::Input => "ZMESH_INPUT",
            Hook::Output => "ZMESH_OUTPUT",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Chain {
    pub(super) table: Table,
    pub(super) hook: Hook,
    pub(super) rules: Vec<Rule>,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Match {
    Tcp,
    /// Implies TCP, so renderers emit the protocol with it (iptables needs `-p tcp` before `--dport`).
    TcpDport(u16),
    Mark {
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    Return,
    Drop,
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

pub(super) fn iptables_rules(chains: &[Chain]) -> IptablesRules {
    let mut by_table: BTreeMap<Table, Vec<&Chain>> = BTreeMap::new();
    for chain in chains {
        by_table.entry(chain.table).or_default().push(chain);
    }
    let mut restore = String::new();
    for (table, chains) in &by_table {
        let _ = writeln!(restore, "*{}", table.iptables());
        for chain in chains {
            let _ = writeln!(restore, ":{} - [0:0]", chain.hook.chain_name());
        }
        for chain in chains {
            for rule in &chain.rules {
                let _ = write!(restore, "-A {}", chain.hook.chain_name());
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
            to: c.hook.chain_name(),
        })
        .collect();
    IptablesRules { restore, jumps }
}

fn iptables_match(m: &Match) -> String {
    match m {
        Match::Tcp => "-p tcp".into(),
        Match::TcpDport(p) => format!("-p tcp --dport {p}"),
        Match::Mark { value, mask } => format!("-m mark --mark {}/{}", Hex(*value), Hex(*mask)),
        Match::ConnMark { value, mask } => {
            format!("-m connmark --mark {}/{}", Hex(*value), Hex(*mask))
        }
        Match::Uid(uid) => format!("-m owner --uid-owner {uid}"),
        Match::OutIf(dev) => format!("-o {dev}"),
        Match::NotInIf(dev) => format!("! -i {dev}"),
        Match::Daddr(net) => format!("-d {net}"),
    }
}

fn iptables_verdict(v: &Verdict) -> String {
    match v {
        Verdict::Return => "RETURN".into(),
        Verdict::Drop => "DROP".into(),
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

pub(super) fn nft_script(chains: &[Chain]) -> String {
    // The empty declaration makes the delete succeed on a first install; all three statements are
    // one transaction, so the host never sees a moment without (or with half of) the rules.
    let mut out = nft_uninstall_script();
    let _ = writeln!(out, "table ip {NFT_TABLE} {{");
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
    out
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
    }
}

fn nft_match(m: &Match) -> String {
    match m {
        Match::Tcp => "meta l4proto tcp".into(),
        Match::TcpDport(p) => format!("tcp dport {p}"),
        Match::Mark { value, mask } => format!("meta mark & {} == {}", Hex(*mask), Hex(*value)),
        Match::ConnMark { value, mask } => format!("ct mark & {} == {}", Hex(*mask), Hex(*value)),
        Match::Uid(uid) => format!("meta skuid {uid}"),
        Match::OutIf(dev) => format!("oifname \"{dev}\""),
        Match::NotInIf(dev) => format!("iifname != \"{dev}\""),
        Match::Daddr(net) => format!("ip daddr {net}"),
    }
}

fn nft_verdict(v: &Verdict) -> String {
    match v {
        Verdict::Return => "return".into(),
        Verdict::Drop => "drop".into(),
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
