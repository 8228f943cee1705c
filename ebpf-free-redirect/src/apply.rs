//! Thin I/O that applies what `rules` generates, by running `iptables-restore`, `iptables` (and their
//! `ip6tables` twins), `nft` and `ip` in the caller's network namespace. In-pod capture is applied
//! the same way: the caller enters the pod netns first (a thread that setns'd, or `ip netns exec`),
//! and host and pod share every step below through [`Capture`]. All decisions about *what* the rules are live in `rules`;
//! this module only decides *how* to reach that state idempotently: install twice and the ruleset is
//! unchanged, uninstall removes exactly what install added and succeeds when nothing is installed.
//! The order of steps is chosen so a half-done run never captures traffic it cannot serve.

use std::io::{self, Write as _};
use std::process::{Command, ExitStatus, Output, Stdio};

use thiserror::Error;

use crate::rules::{Backend, Capture, Family, HostOptions, Jump, OptionsError, PodOptions};
use crate::rules::{IptablesRules, PolicyRouting};

const NFT: &str = "nft";
const IP: &str = "ip";
/// Wait for the xtables lock held by another writer (kube-proxy, Docker, firewalld) rather than fail
/// at once, but never hang forever. Ignored by the nf_tables flavour, which has no such lock.
const XTABLES_WAIT: &str = "--wait=10";
/// Bound on "delete every copy" loops: far above any plausible number of duplicates, it only exists
/// so that a delete that reports success without removing anything cannot spin forever.
const MAX_COPIES: usize = 64;

/// A failed install or uninstall, naming the command so the operator can rerun it by hand.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error("could not run `{command}`: {source} (is it installed and on PATH? run as root)")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed with {status}: {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("`{command}` left a copy behind after {MAX_COPIES} deletions; remove it by hand")]
    StuckDelete { command: String },
}

/// Installs host capture in the current netns; see [`install_capture`] for the steps.
pub fn install(opts: &HostOptions, backend: Backend) -> Result<(), ApplyError> {
    install_capture(opts.validate()?.capture(), backend)
}

/// Removes host capture. `opts` is needed only for the policy routing (connmark and table); the
/// chains and the nft table have fixed names.
pub fn uninstall(opts: &HostOptions, backend: Backend) -> Result<(), ApplyError> {
    uninstall_capture(opts.validate()?.capture(), backend)
}

/// Installs in-pod capture in the CURRENT network namespace, which must be the pod's: the caller
/// enters it first. Idempotent like [`install`].
pub fn install_pod(opts: &PodOptions, backend: Backend) -> Result<(), ApplyError> {
    install_capture(opts.validate()?.capture(), backend)
}

/// Removes in-pod capture from the current network namespace; succeeds when nothing is installed.
/// `opts` supplies the policy routing and whether the IPv6 rules are to be removed too (pass the
/// options the pod was installed with).
pub fn uninstall_pod(opts: &PodOptions, backend: Backend) -> Result<(), ApplyError> {
    uninstall_capture(opts.validate()?.capture(), backend)
}

/// Steps run in dependency order: policy routing first (inert until packets are marked), then the
/// chains, and the jumps into them last, so capture switches on only once every rule it relies on
/// is in place.
fn install_capture(capture: &Capture, backend: Backend) -> Result<(), ApplyError> {
    for routing in capture.routing() {
        install_routing(routing)?;
    }
    match backend {
        Backend::Iptables => {
            for ipt in capture.iptables() {
                install_iptables(&ipt)?;
            }
        }
        Backend::Nftables => {
            run_ok(NFT, &["-f".into(), "-".into()], Some(&capture.nftables()))?;
        }
    }
    Ok(())
}

fn install_iptables(ipt: &IptablesRules) -> Result<(), ApplyError> {
    let family = ipt.family;
    run_ok(
        family.iptables_restore(),
        &["--noflush".into(), XTABLES_WAIT.into()],
        Some(&ipt.restore),
    )?;
    for jump in &ipt.jumps {
        if !jump_exists(family, jump)? {
            run_ok(family.iptables(), &with_wait(jump.insert_args()), None)?;
        }
    }
    Ok(())
}

/// The reverse of [`install_capture`].
fn uninstall_capture(capture: &Capture, backend: Backend) -> Result<(), ApplyError> {
    match backend {
        Backend::Iptables => {
            for ipt in capture.iptables() {
                uninstall_iptables(&ipt)?;
            }
        }
        Backend::Nftables => {
            run_ok(
                NFT,
                &["-f".into(), "-".into()],
                Some(&capture.nft_uninstall()),
            )?;
        }
    }
    for routing in capture.routing() {
        uninstall_routing(routing)?;
    }
    Ok(())
}

fn uninstall_iptables(ipt: &IptablesRules) -> Result<(), ApplyError> {
    let family = ipt.family;
    // A jump can only exist while its target chain does; asking `-C` about a missing chain is an
    // error rather than "no", hence the chain check first.
    for jump in &ipt.jumps {
        if chain_exists(family, jump.table, jump.to)? {
            delete_all_jumps(family, jump)?;
        }
    }
    for jump in &ipt.jumps {
        if chain_exists(family, jump.table, jump.to)? {
            for op in ["-F", "-X"] {
                let args = ["-t", jump.table, op, jump.to].map(String::from).to_vec();
                run_ok(family.iptables(), &with_wait(args), None)?;
            }
        }
    }
    Ok(())
}

fn install_routing(routing: &PolicyRouting) -> Result<(), ApplyError> {
    if !rule_exists(routing)? {
        run_ok(IP, &routing.rule_args("add"), None)?;
    }
    // `replace` is idempotent by itself, so no existence check is needed for the route.
    run_ok(IP, &routing.route_args("replace"), None)?;
    Ok(())
}

fn uninstall_routing(routing: &PolicyRouting) -> Result<(), ApplyError> {
    let del = routing.rule_args("del");
    for _ in 0..MAX_COPIES {
        if !rule_exists(routing)? {
            break;
        }
        run_ok(IP, &del, None)?;
    }
    if rule_exists(routing)? {
        return Err(ApplyError::StuckDelete {
            command: command_line(IP, &del),
        });
    }
    if route_exists(routing)? {
        run_ok(IP, &routing.route_args("del"), None)?;
    }
    Ok(())
}

fn rule_exists(routing: &PolicyRouting) -> Result<bool, ApplyError> {
    let out = run_ok(IP, &routing.rule_args("list"), None)?;
    Ok(!out.stdout.trim_ascii().is_empty())
}

/// Asks across all tables because `ip route show table 100` fails outright while table 100 has
/// never held a route, which would be indistinguishable from a real failure.
fn route_exists(routing: &PolicyRouting) -> Result<bool, ApplyError> {
    let args = [
        routing.family.ip_flag(),
        "route",
        "show",
        "table",
        "all",
        "exact",
        routing.family.any(),
        "type",
        "local",
    ]
    .map(String::from)
    .to_vec();
    let out = run_ok(IP, &args, None)?;
    let table = routing.table.to_string();
    Ok(String::from_utf8_lossy(&out.stdout).lines().any(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.windows(2).any(|w| w == ["table", table.as_str()])
            && words.windows(2).any(|w| w == ["dev", "lo"])
    }))
}

/// `iptables -C` exits 1 for "no such rule"; anything else but 0 is a real failure.
fn jump_exists(family: Family, jump: &Jump) -> Result<bool, ApplyError> {
    exit_code_says(family.iptables(), &with_wait(jump.check_args()))
}

/// `iptables -S CHAIN` exits 1 when the chain (or, with nf_tables, the whole table) is missing.
fn chain_exists(family: Family, table: &str, chain: &str) -> Result<bool, ApplyError> {
    let args = ["-t", table, "-S", chain].map(String::from).to_vec();
    exit_code_says(family.iptables(), &with_wait(args))
}

fn delete_all_jumps(family: Family, jump: &Jump) -> Result<(), ApplyError> {
    let delete = with_wait(jump.delete_args());
    for _ in 0..MAX_COPIES {
        if !jump_exists(family, jump)? {
            return Ok(());
        }
        run_ok(family.iptables(), &delete, None)?;
    }
    Err(ApplyError::StuckDelete {
        command: command_line(family.iptables(), &delete),
    })
}

fn exit_code_says(program: &str, args: &[String]) -> Result<bool, ApplyError> {
    let out = run(program, args, None)?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(failed(program, args, &out)),
    }
}

fn with_wait(mut args: Vec<String>) -> Vec<String> {
    args.insert(0, XTABLES_WAIT.into());
    args
}

fn run_ok(program: &str, args: &[String], stdin: Option<&str>) -> Result<Output, ApplyError> {
    let out = run(program, args, stdin)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(failed(program, args, &out))
    }
}

fn run(program: &str, args: &[String], stdin: Option<&str>) -> Result<Output, ApplyError> {
    let spawn_error = |source| ApplyError::Spawn {
        command: command_line(program, args),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that rejects its input may exit before reading all of it; its exit status and
        // stderr then explain the failure better than our broken pipe would.
        match pipe.write_all(input.as_bytes()) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(spawn_error(e)),
            _ => {}
        }
    }
    child.wait_with_output().map_err(spawn_error)
}

fn failed(program: &str, args: &[String], out: &Output) -> ApplyError {
    ApplyError::Failed {
        command: command_line(program, args),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    }
}

fn command_line(program: &str, args: &[String]) -> String {
    std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}
