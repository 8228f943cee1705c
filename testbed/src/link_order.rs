//! The node binary's code layout (`link/zmesh-node.ld`, README "Performance"): which
//! functions run at all, from callgrind profiles, turned into a linker script that puts them
//! side by side at the front of the text.
//!
//! Why it pays: the kernel maps a binary's code into a process 64 KiB at a time around each page
//! it touches ("fault-around"), and all of it counts in RSS. Startup and the data path run about
//! 1,900 of the node's 12,000 functions, spread over nearly all of its 10 MiB of text, so most
//! of the text ended up resident.
//!
//! The script names input sections: `-ffunction-sections` gives every function its own,
//! `.text.<symbol>` (or `.text.unlikely.`, `.text.startup.`, `.text.hot.`), and the first
//! statement a section matches decides where it goes. Each function comes twice:
//! - first by its exact symbol, in the order the profile ranked them (startup first). That is
//!   the layout of the build the profile was taken of, and of any build whose symbol hashes are
//!   the same: the same toolchain, `Cargo.lock`, features and profile. Other code changes leave
//!   the hashes of the functions they do not touch alone.
//! - then by a glob without what varies between builds: the legacy mangling's hash
//!   (`17h<16 hex>E`), the v0 mangling's crate disambiguators (`Cs<base-62>_`) and
//!   back-references (`B<base-62>_`, byte offsets that move with them), LLVM's local suffixes
//!   (`.llvm.<n>`, `.<n>`) and ring's version in its C and assembly names. Another toolchain,
//!   profile or lock file still gets the same functions at the front, with every other instance
//!   of a generic function beside them (about twice the size).
//!
//! ring's hand-written assembly keeps all of an object's code in one `.text` (no function
//! sections), so its `*x86_64*-elf.o` objects are taken whole (about 120 KiB). A renamed
//! function stops matching; `tests/link_order.rs` watches how many still do.

use std::collections::HashMap;

/// The output section the script creates, placed before `.text`.
pub const HOT_SECTION: &str = ".text.zmesh_hot";

/// The prefixes a function's section can carry (LLVM and GCC with `-ffunction-sections`).
const SECTION_PREFIXES: [&str; 4] = [".text.", ".text.unlikely.", ".text.startup.", ".text.hot."];

/// ring's perlasm objects, taken whole: their code is all in `.text`.
const ASSEMBLY_OBJECTS: &str = "*x86_64*-elf.o(.text)";

/// A function name as callgrind reports it, as a symbol the script can name exactly: `None`
/// for what is not a symbol of the binary (`0x...` addresses, `(below main)`) or holds a
/// character that could change the script's meaning (only `[A-Za-z0-9_$.]` pass, which can
/// form no wildcard, comment or keyword).
pub fn exact(symbol: &str) -> Option<&str> {
    // Callgrind marks recursion levels with `'N`.
    let name = strip_suffix_digits(symbol, '\'').unwrap_or(symbol);
    let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b == b'.';
    (!name.is_empty() && !name.starts_with("0x") && name.bytes().all(plain)).then_some(name)
}

/// The build-independent glob for one function name (see the module's doc), or `None` as for
/// [`exact`].
pub fn pattern(symbol: &str) -> Option<String> {
    let name = exact(symbol)?;
    if name.starts_with("_ZN") {
        if let Some(stem) = legacy_stem(name) {
            // Whatever follows the hash (`.llvm.N`, `.cold`) goes with it.
            return Some(format!("{stem}17h*"));
        }
    }
    if name.starts_with("_R") {
        // LLVM's suffixes go, and a trailing `*` takes those of other builds.
        let mut mangled = name.find(".llvm.").map_or(name, |i| &name[..i]);
        while let Some(base) = strip_suffix_digits(mangled, '.') {
            mangled = base;
        }
        return Some(format!("{}*", v0_generic(mangled)));
    }
    // C and assembly symbols keep their names, compiler suffixes (`.constprop.0`) included:
    // they are part of the section's name. ring puts its version in them.
    if let Some(rest) = name.strip_prefix("ring_core_") {
        if let Some((_, function)) = rest.split_once("__") {
            return Some(format!("ring_core_*__{function}"));
        }
    }
    Some(name.to_string())
}

/// `name` without a trailing `<sep><digits>`, if it has one.
fn strip_suffix_digits(name: &str, sep: char) -> Option<&str> {
    let (base, digits) = name.rsplit_once(sep)?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && !base.is_empty())
        .then_some(base)
}

/// A legacy-mangled name (`_ZN...17h<16 hex>E[suffix]`) up to its hash.
fn legacy_stem(name: &str) -> Option<&str> {
    let mut search = name.len();
    while let Some(i) = name[..search].rfind("17h") {
        let hash = name.get(i + 3..i + 19)?;
        if hash.bytes().all(|b| b.is_ascii_hexdigit()) && name[i + 19..].starts_with('E') {
            return Some(&name[..i]);
        }
        search = i;
    }
    None
}

/// A v0-mangled name with each crate root's disambiguator (`Cs<base-62>_`) and each
/// back-reference (`B<base-62>_`) made a glob. A rewrite inside an identifier (`9Buffer_in`)
/// only widens the glob.
fn v0_generic(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = String::with_capacity(name.len());
    let mut i = 0;
    while i < bytes.len() {
        let tag = if name[i..].starts_with("Cs") {
            Some(2)
        } else if bytes[i] == b'B' && i > 0 {
            Some(1)
        } else {
            None
        };
        if let Some(tag) = tag {
            let run = bytes[i + tag..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric())
                .count();
            if bytes.get(i + tag + run) == Some(&b'_') {
                out.push_str(&name[i..i + tag]);
                out.push_str("*_");
                i += tag + run + 1;
                continue;
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// Whether `text` matches `glob`, where `*` stands for any run of characters (the only
/// wildcard the script's patterns use).
pub fn glob_match(glob: &str, text: &str) -> bool {
    let mut parts = glob.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The functions of `object` (the file name of an `ob=` path) that a callgrind profile saw
/// run, with their own instruction counts.
///
/// The format (valgrind's "Callgrind Format Specification"): `ob=`, `fn=` and their `c`/`j`
/// forms name objects and functions, as `(id) name` the first time and `(id)` after when
/// compressed, or as the plain name; cost lines start with the `positions:` columns (one by
/// default; a number, `+n`, `-n` or `*`) and the cost after them; the line after a `calls=`
/// line is the call's inclusive cost, not the function's own.
pub fn executed_functions(profile: &str, object: &str) -> Result<HashMap<String, u64>, String> {
    let mut objects: HashMap<String, String> = HashMap::new();
    let mut functions: HashMap<String, String> = HashMap::new();
    let mut out: HashMap<String, u64> = HashMap::new();
    let (mut in_object, mut after_calls, mut positions) = (false, false, 1);
    let mut current: Option<String> = None;
    for (n, line) in profile.lines().enumerate() {
        let named = |key: &str| -> Result<Option<Named>, String> {
            let Some(value) = line.strip_prefix(key) else {
                return Ok(None);
            };
            let Some(value) = value.strip_prefix('(') else {
                // Uncompressed (`--compress-strings=no`).
                let value = value.trim();
                return Ok(Some((None, (!value.is_empty()).then(|| value.to_string()))));
            };
            let (id, name) = value
                .split_once(')')
                .ok_or_else(|| format!("line {}: {key} id is not closed", n + 1))?;
            let name = name.trim();
            Ok(Some((
                Some(id.to_string()),
                (!name.is_empty()).then(|| name.to_string()),
            )))
        };
        if let Some(columns) = line.strip_prefix("positions:") {
            positions = columns.split_whitespace().count().max(1);
        } else if let Some((id, name)) = named("ob=")? {
            let path = resolve(&mut objects, id, name, n)?;
            in_object = path.rsplit('/').next() == Some(object);
        } else if let Some((id, name)) = named("cob=")? {
            resolve(&mut objects, id, name, n)?;
        } else if let Some((id, name)) = named("fn=")? {
            let name = resolve(&mut functions, id, name, n)?;
            current = in_object.then(|| {
                out.entry(name.clone()).or_insert(0);
                name
            });
        } else if let Some((id, name)) = named("cfn=")?.or(named("jfn=")?) {
            resolve(&mut functions, id, name, n)?;
        } else if line.starts_with("calls=") {
            after_calls = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
            if std::mem::take(&mut after_calls) {
                continue;
            }
            if let Some(total) = current.as_ref().and_then(|f| out.get_mut(f)) {
                *total += line
                    .split_whitespace()
                    .nth(positions)
                    .and_then(|c| c.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Ok(out)
}

/// A name line's compressed id and name: `(id) name`, `(id)` or a plain name.
type Named = (Option<String>, Option<String>);

/// Records or looks up a name, compressed (`id`) or not.
fn resolve(
    table: &mut HashMap<String, String>,
    id: Option<String>,
    name: Option<String>,
    line: usize,
) -> Result<String, String> {
    match (id, name) {
        (Some(id), Some(name)) => {
            table.insert(id, name.clone());
            Ok(name)
        }
        (None, Some(name)) => Ok(name),
        (Some(id), None) => table
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("line {}: id ({id}) used before it was named", line + 1)),
        (None, None) => Err(format!("line {}: a name is missing", line + 1)),
    }
}

/// The order the functions are laid out in, from when each first ran (the earliest profile it
/// appears in: callgrind's `--dump-every-bb` writes one every few million basic blocks) and its
/// cost: first to run first, then hottest first. The nodes a profiling run starts first sit
/// idle before any traffic, so startup comes first, and a node that has only started maps
/// mostly that part; the data path follows. (A profile is written when its basic-block count
/// is reached, so the end of startup can share one with the first traffic.)
pub fn rank(functions: &HashMap<String, (u128, u64)>) -> Vec<&str> {
    let mut ranked: Vec<(&String, &(u128, u64))> = functions.iter().collect();
    ranked.sort_by(|a, b| {
        let ((ta, ca), (tb, cb)) = (a.1, b.1);
        ta.cmp(tb).then(cb.cmp(ca)).then(a.0.cmp(b.0))
    });
    ranked.into_iter().map(|(n, _)| n.as_str()).collect()
}

/// The linker script for functions in the order given: their exact symbols, then their globs,
/// then ring's assembly, in one output section before `.text`. `INSERT` keeps the linker's
/// default layout for everything else (GNU ld and lld; mold and gold do not take such scripts).
pub fn script<'a>(functions: impl IntoIterator<Item = &'a str>, header: &str) -> String {
    let functions: Vec<&str> = functions.into_iter().collect();
    let mut seen = std::collections::HashSet::new();
    let mut out = String::new();
    let mut statement = |out: &mut String, p: &str| {
        if seen.insert(p.to_string()) {
            let alternatives: Vec<String> =
                SECTION_PREFIXES.iter().map(|s| format!("{s}{p}")).collect();
            out.push_str(&format!("    *({})\n", alternatives.join(" ")));
        }
    };
    for line in header.lines() {
        out.push_str(&format!("/* {} */\n", line.replace("*/", "* /")));
    }
    out.push_str(&format!("SECTIONS\n{{\n  {HOT_SECTION} :\n  {{\n"));
    out.push_str("    /* the profiled build's symbols */\n");
    for p in functions.iter().filter_map(|f| exact(f)) {
        statement(&mut out, p);
    }
    out.push_str("    /* the same functions in any build */\n");
    for p in functions.iter().filter_map(|f| pattern(f)) {
        statement(&mut out, &p);
    }
    out.push_str(&format!(
        "    /* ring's assembly */\n    {ASSEMBLY_OBJECTS}\n"
    ));
    out.push_str("  }\n}\nINSERT BEFORE .text;\n");
    out
}

/// The function patterns of a script written by [`script`]: exact symbols and globs.
pub fn script_patterns(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("*(.text."))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_drop_what_changes_between_builds() {
        let cases = [
            // legacy mangling: the hash goes, a local suffix with it
            (
                "_ZN5zmesh5proxy8outbound10proxy_from17h0123456789abcdefE",
                Some("_ZN5zmesh5proxy8outbound10proxy_from17h*"),
            ),
            (
                "_ZN5tokio7runtime4task3raw4poll17hfedcba9876543210E.llvm.12345'2",
                Some("_ZN5tokio7runtime4task3raw4poll17h*"),
            ),
            // v0: every crate disambiguator, and LLVM's numbered copies
            (
                "_RNvXs2_NtNtCsgEmfK2I1SDS_3std4hash6randomNtB5_13DefaultHasherNtNtCsjrHSEGnQ3l9_4core4hash6Hasher5write.8439",
                Some("_RNvXs2_NtNtCs*_3std4hash6randomNtB*_13DefaultHasherNtNtCs*_4core4hash6Hasher5write*"),
            ),
            // a suffix after a legacy hash goes with it
            (
                "_ZN4core3fmt5write17h0123456789abcdefE.cold",
                Some("_ZN4core3fmt5write17h*"),
            ),
            // v0 back-references move with the disambiguators before them
            (
                "_RNvMs0_NtCs1a2B_3std4syncNtB5_4Once4call",
                Some("_RNvMs0_NtCs*_3std4syncNtB*_4Once4call*"),
            ),
            // a back-reference after a closure's empty name (`0`) too; an identifier starting
            // with B and no `_` after it is left alone
            ("_RNCNvCs1a_4main0B3_", Some("_RNCNvCs*_4main0B*_*")),
            ("_RNvCs1a_5bytes8BytesMut", Some("_RNvCs*_5bytes8BytesMut*")),
            // C and assembly keep their names, but for ring's version
            (
                "ring_core_0_17_14__sha256_block_data_order_avx",
                Some("ring_core_*__sha256_block_data_order_avx"),
            ),
            (
                "init_cpu_features.constprop.0",
                Some("init_cpu_features.constprop.0"),
            ),
            // not symbols
            ("0x00000000002224a0", None),
            ("(below main)", None),
            // could change the script's meaning
            ("evil) } /DISCARD/ : { *(.text", None),
            ("a*b", None),
        ];
        for (symbol, want) in cases {
            assert_eq!(pattern(symbol).as_deref(), want, "{symbol}");
        }
        // A legacy-looking name whose "hash" is not one keeps its name.
        assert_eq!(
            pattern("_ZN3foo17hnothexnothexnothE").as_deref(),
            Some("_ZN3foo17hnothexnothexnothE")
        );
    }

    #[test]
    fn globs_match_like_the_linker() {
        assert!(glob_match(
            "_ZN3foo3bar17h*",
            "_ZN3foo3bar17h0123456789abcdefE"
        ));
        assert!(glob_match(
            "_RNvCs*_4core3fmt*",
            "_RNvCsXyZ_4core3fmt5write"
        ));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(!glob_match(
            "_ZN3foo3bar17h*",
            "_ZN3foo3baz17h0123456789abcdefE"
        ));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(glob_match("a*b*c", "a-b-b-c"));
    }

    #[test]
    fn callgrind_profiles_give_the_functions_of_one_object() {
        let profile = "\
version: 1
events: Ir
ob=(1) /lib/libc.so.6
fn=(1) memcpy
0 50
ob=(2) /usr/bin/zmesh-node
fn=(2) main
0 10
+2 5
cob=(1)
cfn=(1)
calls=1 0
0 999
fn=(3) _ZN5zmesh3run17h0123456789abcdefE
0 7
fn=(2)
0 1
";
        let f = executed_functions(profile, "zmesh-node").unwrap();
        assert_eq!(f.len(), 2, "{f:?}");
        // main's own cost, without the call's 999
        assert_eq!(f["main"], 16);
        assert_eq!(f["_ZN5zmesh3run17h0123456789abcdefE"], 7);
        let s = script(
            ["main", "_ZN5zmesh3run17h0123456789abcdefE", "main"],
            "test",
        );
        assert!(s.starts_with("/* test */\nSECTIONS"), "{s}");
        assert!(s.ends_with("INSERT BEFORE .text;\n"), "{s}");
        // exact symbols first, then the globs that differ from them, each once
        assert_eq!(
            script_patterns(&s),
            [
                "main",
                "_ZN5zmesh3run17h0123456789abcdefE",
                "_ZN5zmesh3run17h*"
            ]
        );
        assert!(
            s.contains("    *(.text.main .text.unlikely.main .text.startup.main .text.hot.main)\n"),
            "{s}"
        );
        assert!(s.contains(ASSEMBLY_OBJECTS), "{s}");
    }

    #[test]
    fn startup_comes_first_then_the_hottest() {
        let f: HashMap<String, (u128, u64)> = [
            ("relay", (20, 900)),
            ("parse_config", (10, 5)),
            ("main", (10, 50)),
            ("drain", (30, 1000)),
            ("poll", (20, 900)),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        assert_eq!(rank(&f), ["main", "parse_config", "poll", "relay", "drain"]);
    }

    #[test]
    fn callgrind_variants_are_read() {
        // two position columns (--dump-instr=yes), uncompressed names, a name first given by jfn=
        let profile = "\
positions: instr line
ob=/usr/bin/zmesh-node
fn=main
0x10 3 4
jfn=(9) helper
fn=(9)
0x20 5 6
";
        let f = executed_functions(profile, "zmesh-node").unwrap();
        assert_eq!(f["main"], 4);
        assert_eq!(f["helper"], 6);
    }

    #[test]
    fn broken_profiles_are_refused_with_the_line() {
        let err = executed_functions("ob=(1) /x/zmesh-node\nfn=(7)\n", "zmesh-node").unwrap_err();
        assert!(err.contains("line 2") && err.contains("(7)"), "{err}");
        let err = executed_functions("fn=(7 main\n", "zmesh-node").unwrap_err();
        assert!(
            err.contains("line 1") && err.contains("not closed"),
            "{err}"
        );
        let err = executed_functions("fn=\n", "zmesh-node").unwrap_err();
        assert!(err.contains("line 1") && err.contains("missing"), "{err}");
    }
}
