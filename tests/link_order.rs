//! The node's code layout (`link/zmesh-node.ld`, built in by build.rs): the binary these tests
//! run was linked with it, it holds only part of the code, and the profile behind it still
//! names the code.
//!
//! The script's globs name Rust functions by path. When code is renamed or rewritten they stop
//! matching one by one, and the node's RSS creeps back up without any other test failing; this
//! test fails once too many are gone (new code the profile never saw does not fail it: rerun
//! the profile after a large change anyway). The fix is `scripts/link-order.sh` (as root), which
//! profiles the current code and rewrites the script. A build with `ZMESH_NO_LINK_ORDER=1`, or
//! with mold or gold, has no layout, and these tests say so.

use std::process::Command;

use zmesh_testbed::link_order::{glob_match, script_patterns, HOT_SECTION};
use zmesh_testbed::run_ok;

const BIN: &str = env!("CARGO_BIN_EXE_zmesh-node");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/link/zmesh-node.ld");

/// Below this share of the script's Rust globs placed in the hot section, the profile is
/// stale. A fresh one places about 96 % in a debug build (the rest are functions a debug build
/// names apart) and all of them in a release build.
const MIN_PLACED: f64 = 0.85;

/// A binutils tool's output.
fn tool(name: &str, args: &[&str]) -> String {
    run_ok(Command::new(name).args(args))
}

/// A section's address and size, from `readelf -SW`: `[Nr] Name Type Address Off Size ...`.
fn section(sections: &str, name: &str) -> Option<(u64, u64)> {
    let line = sections
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == name))?;
    let fields: Vec<&str> = line.split(']').nth(1)?.split_whitespace().collect();
    assert_eq!(fields[1], "PROGBITS", "{line}");
    let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
    Some((hex(fields[2]), hex(fields[4])))
}

#[test]
fn the_node_is_linked_with_its_code_layout() {
    let sections = tool("readelf", &["-SW", BIN]);
    let (_, hot) = section(&sections, HOT_SECTION).unwrap_or_else(|| {
        panic!("{BIN} has no {HOT_SECTION}: build.rs did not give the linker {SCRIPT} (ZMESH_NO_LINK_ORDER set, or mold/gold?)\n{sections}")
    });
    let (_, rest) = section(&sections, ".text").expect(".text");
    // C and assembly alone (jemalloc, ring) put about 320 KiB there; the Rust functions about
    // 3 MiB (debug) to 4 MiB (release).
    assert!(
        hot > 1024 * 1024,
        "{HOT_SECTION} holds only {hot} bytes: the script's patterns no longer find the code"
    );
    // A pattern gone wide (say `_ZN*`) would move everything and gain nothing. A fresh
    // profile's section is about 22 % (debug) to 48 % (release) of the text.
    let share = hot as f64 / (hot + rest) as f64;
    assert!(
        share < 0.7,
        "{HOT_SECTION} holds {hot} bytes against {rest} left in .text: the patterns take in too much"
    );
}

#[test]
fn the_code_layout_profile_still_names_the_code() {
    let script = std::fs::read_to_string(SCRIPT).unwrap();
    assert!(
        script.contains("INSERT BEFORE .text;"),
        "{SCRIPT} must only add a section to the linker's default layout"
    );
    // The Rust globs: the exact symbols are another build's (they match only in the build the
    // profile was taken of), and C names do not change with the code.
    let globs: Vec<String> = script_patterns(&script)
        .into_iter()
        .filter(|p| p.contains('*') && (p.starts_with("_ZN") || p.starts_with("_R")))
        .collect();
    assert!(globs.len() > 500, "{SCRIPT}: {} Rust globs", globs.len());
    let (start, size) = section(&tool("readelf", &["-SW", BIN]), HOT_SECTION).expect("hot");
    // The symbols placed in the hot section, sorted by name.
    let mut placed: Vec<String> = tool("nm", &["--defined-only", BIN])
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (addr, kind, name) = (f.next()?, f.next()?, f.next()?);
            let addr = u64::from_str_radix(addr, 16).ok()?;
            (matches!(kind, "t" | "T" | "W" | "w") && (start..start + size).contains(&addr))
                .then(|| name.to_string())
        })
        .collect();
    placed.sort();
    let found = globs
        .iter()
        .filter(|p| {
            // Every glob starts with a literal prefix: look only at the symbols carrying it.
            let prefix = p.split('*').next().unwrap();
            let from = placed.partition_point(|s| s.as_str() < prefix);
            placed[from..]
                .iter()
                .take_while(|s| s.starts_with(prefix))
                .any(|s| glob_match(p, s))
        })
        .count();
    let share = found as f64 / globs.len() as f64;
    assert!(
        share >= MIN_PLACED,
        "only {found} of the {} Rust functions in {SCRIPT} are placed in {HOT_SECTION} ({:.0} %): \
         regenerate it with scripts/link-order.sh",
        globs.len(),
        share * 100.0
    );
}
