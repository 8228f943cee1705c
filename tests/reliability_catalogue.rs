//! Tier (a): the table at the end of `docs/reliability.md` that maps each failure case to its
//! tests cannot rot. Every case 1..=59 has a row; every `path::function` a row names is a test
//! function defined in that file; and the cases with no test (`—`) or only a partial one
//! ("partly") are exactly the lists below. Adding a test for a case therefore means editing the
//! table and this file together, and deleting or renaming a listed test fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// How many cases docs/reliability.md numbers.
const CASES: u32 = 59;

/// Cases whose row says `—`: nothing automated yet (issue #14 takes them).
const NOT_YET_AUTOMATED: &[u32] = &[];

/// Cases whose row starts with "partly": a test exists, but its assertion does not cover the
/// whole case yet.
const PARTLY: &[u32] = &[];

/// The heading above the table, and the header row it must start with.
const SECTION: &str = "## Where the cases are tested";
const HEADER: &str = "| case | short name | tests |";

/// A row's verdict on its case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coverage {
    Covered,
    Partly,
    NotYetAutomated,
}

/// A test named in the table: the file (relative to the repository root) and the function.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TestRef {
    path: String,
    name: String,
}

#[derive(Debug)]
struct Row {
    coverage: Coverage,
    tests: Vec<TestRef>,
}

/// Parses the catalogue table out of the whole text of docs/reliability.md. Errors name the
/// line (1-based) and what is wrong with it.
fn parse_catalogue(doc: &str) -> Result<BTreeMap<u32, Row>, String> {
    let lines: Vec<&str> = doc.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == SECTION)
        .ok_or_else(|| format!("no `{SECTION}` heading"))?;
    let header = lines[start + 1..]
        .iter()
        .position(|l| l.trim_start().starts_with('|'))
        .map(|i| start + 1 + i)
        .ok_or_else(|| format!("no table under `{SECTION}`"))?;
    if squash(lines[header]) != squash(HEADER) {
        return Err(format!(
            "line {}: the table header must be `{HEADER}`, found `{}`",
            header + 1,
            lines[header]
        ));
    }
    let sep = lines.get(header + 1).copied().unwrap_or_default();
    if squash(sep) != "|---|---|---|" {
        return Err(format!(
            "line {}: expected the separator `|---|---|---|`, found `{sep}`",
            header + 2
        ));
    }
    let mut rows = BTreeMap::new();
    for (i, line) in lines.iter().enumerate().skip(header + 2) {
        if !line.trim_start().starts_with('|') {
            break;
        }
        let (case, row) = parse_row(line).map_err(|e| format!("line {}: {e}: `{line}`", i + 1))?;
        if rows.insert(case, row).is_some() {
            return Err(format!("line {}: case {case} has a second row", i + 1));
        }
    }
    Ok(rows)
}

/// One `| N | short name | tests |` row.
fn parse_row(line: &str) -> Result<(u32, Row), String> {
    let inner = line
        .trim()
        .strip_prefix('|')
        .and_then(|l| l.strip_suffix('|'))
        .ok_or("a row must start and end with `|`")?;
    let cells: Vec<&str> = inner.split('|').map(str::trim).collect();
    let [case, name, tests] = cells[..] else {
        return Err(format!("expected 3 cells, found {}", cells.len()));
    };
    let case: u32 = case
        .parse()
        .map_err(|_| format!("case `{case}` is not a number"))?;
    if !(1..=CASES).contains(&case) {
        return Err(format!("case {case} is outside 1..={CASES}"));
    }
    if name.is_empty() {
        return Err(format!("case {case} has no short name"));
    }
    let refs = test_refs(tests).map_err(|e| format!("case {case}: {e}"))?;
    let coverage = if tests.starts_with('—') {
        Coverage::NotYetAutomated
    } else if refs.is_empty() {
        return Err(format!(
            "case {case} names no `path::test` and does not start with `—`"
        ));
    } else if tests.starts_with("partly") {
        Coverage::Partly
    } else {
        Coverage::Covered
    };
    Ok((
        case,
        Row {
            coverage,
            tests: refs,
        },
    ))
}

/// The backtick-quoted `path.rs::function` references in a cell. Other code spans (header
/// names, `[::1`) are prose; a span that mentions `.rs::` must be a well-formed reference.
fn test_refs(cell: &str) -> Result<Vec<TestRef>, String> {
    let spans: Vec<&str> = cell.split('`').collect();
    if spans.len().is_multiple_of(2) {
        return Err("unbalanced backticks".into());
    }
    let mut refs = Vec::new();
    for span in spans.iter().skip(1).step_by(2) {
        if !span.contains(".rs::") {
            continue;
        }
        let (path, name) = span.split_once(".rs::").expect("checked above");
        let path = format!("{path}.rs");
        let path_ok = !path.starts_with('/')
            && !path.split('/').any(|c| c.is_empty() || c == "..")
            && path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c));
        let name_ok = name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !path_ok || !name_ok {
            return Err(format!(
                "`{span}` is not a reference of the form `relative/path.rs::test_function`"
            ));
        }
        refs.push(TestRef {
            path,
            name: name.to_string(),
        });
    }
    Ok(refs)
}

/// Whether `source` defines `fn name(` as a test: a `#[...test...]` attribute (`#[test]`,
/// `#[tokio::test(...)]`, not `#[cfg(test)]`) among the lines just above it, up to a blank line
/// or a line that opens or closes a block.
fn defines_test(source: &str, name: &str) -> bool {
    let needle = format!("fn {name}(");
    let lines: Vec<&str> = source.lines().collect();
    lines.iter().enumerate().any(|(i, l)| {
        let l = l.trim_start();
        if !(l.starts_with(&needle) || l.starts_with(&format!("async {needle}"))) {
            return false;
        }
        lines[..i]
            .iter()
            .rev()
            .map(|l| l.trim())
            .take_while(|l| !l.is_empty() && !l.ends_with('}') && !l.ends_with('{'))
            .any(|l| l.starts_with("#[") && (l.contains("test]") || l.contains("test(")))
    })
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn catalogue() -> BTreeMap<u32, Row> {
    let path = repo_root().join("docs/reliability.md");
    let doc = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    parse_catalogue(&doc).unwrap_or_else(|e| panic!("docs/reliability.md: {e}"))
}

#[test]
fn every_case_has_a_row_and_every_listed_test_exists() {
    let rows = catalogue();
    let missing: Vec<u32> = (1..=CASES).filter(|c| !rows.contains_key(c)).collect();
    assert!(missing.is_empty(), "cases without a row: {missing:?}");

    let mut problems = Vec::new();
    let mut sources = BTreeMap::new();
    for (case, row) in &rows {
        for t in &row.tests {
            let source = sources.entry(t.path.clone()).or_insert_with(|| {
                std::fs::read_to_string(repo_root().join(&t.path)).map_err(|e| e.to_string())
            });
            match source {
                Err(e) => problems.push(format!("case {case}: {} cannot be read: {e}", t.path)),
                Ok(text) if !defines_test(text, &t.name) => problems.push(format!(
                    "case {case}: {} defines no test `fn {}(`",
                    t.path, t.name
                )),
                Ok(_) => {}
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_uncovered_and_partly_covered_cases_are_the_expected_ones() {
    let rows = catalogue();
    let with = |c: Coverage| -> BTreeSet<u32> {
        rows.iter()
            .filter(|(_, r)| r.coverage == c)
            .map(|(n, _)| *n)
            .collect()
    };
    let uncovered = with(Coverage::NotYetAutomated);
    let partly = with(Coverage::Partly);
    println!("not yet automated (—): {uncovered:?}");
    println!("partly covered: {partly:?}");
    assert_eq!(
        uncovered,
        NOT_YET_AUTOMATED.iter().copied().collect(),
        "the `—` rows of docs/reliability.md changed: update NOT_YET_AUTOMATED with the table"
    );
    assert_eq!(
        partly,
        PARTLY.iter().copied().collect(),
        "the \"partly\" rows of docs/reliability.md changed: update PARTLY with the table"
    );
}

/// The lookup must not be fooled by a name that is a prefix of another, by a helper that is
/// no test, or by a mention in a comment.
#[test]
fn a_test_is_found_only_where_it_is_defined_as_a_test() {
    let src = "#[cfg(test)]\nmod tests {\n    fn first_helper() {}\n\nfn helper() {}\n\n#[test]\nfn real_one() {}\n\n\
               #[tokio::test(flavor = \"multi_thread\")]\nasync fn async_one() {}\n\n\
               // fn in_a_comment() {}\n#[test]\nfn real_one_longer() {}\n";
    assert!(defines_test(src, "real_one"));
    assert!(defines_test(src, "async_one"));
    assert!(defines_test(src, "real_one_longer"));
    assert!(!defines_test(src, "helper"));
    assert!(!defines_test(src, "first_helper"));
    assert!(!defines_test(src, "in_a_comment"));
    assert!(!defines_test(src, "real"));
}

/// Hostile tables: each is refused with an error that names the line and the fault.
#[test]
fn malformed_tables_are_refused_naming_the_line_and_fault() {
    let doc = |rows: &str| format!("# x\n\n{SECTION}\nprose\n\n{HEADER}\n|---|---|---|\n{rows}\n");
    let cases: &[(&str, &str)] = &[
        ("| 1 | a |", "expected 3 cells, found 2"),
        ("| 1 | a | `x.rs::t` | extra |", "expected 3 cells, found 4"),
        ("| one | a | `x.rs::t` |", "case `one` is not a number"),
        ("| 0 | a | `x.rs::t` |", "case 0 is outside 1..=59"),
        ("| 60 | a | `x.rs::t` |", "case 60 is outside 1..=59"),
        ("| 3 |  | `x.rs::t` |", "case 3 has no short name"),
        ("| 3 | a | see the tests |", "names no `path::test`"),
        ("| 3 | a | `x.rs::t |", "unbalanced backticks"),
        ("| 3 | a | `../x.rs::t` |", "is not a reference"),
        ("| 3 | a | `/abs/x.rs::t` |", "is not a reference"),
        ("| 3 | a | `x.rs::Bad-Name` |", "is not a reference"),
        ("| 3 | a | `x.rs::` |", "is not a reference"),
        ("| 3 | a | `x.rs::t`", "must start and end with `|`"),
        (
            "| 3 | a | `x.rs::t` |\n| 3 | b | `y.rs::u` |",
            "case 3 has a second row",
        ),
    ];
    for (rows, want) in cases {
        let err = parse_catalogue(&doc(rows)).expect_err(rows);
        assert!(err.contains(want), "{rows:?}: {err}");
        assert!(
            err.starts_with("line 8:") || err.starts_with("line 9:"),
            "{err}"
        );
    }
    let no_section = parse_catalogue("# nothing here\n").unwrap_err();
    assert!(no_section.contains(SECTION), "{no_section}");
    let wrong_header =
        parse_catalogue(&format!("{SECTION}\n| cases | tests |\n|---|---|\n")).unwrap_err();
    assert!(wrong_header.contains("table header"), "{wrong_header}");
}

/// What a well-formed table reads as: `—` rows may cite related tests (they are still checked
/// to exist) without counting as covered; prose code spans are not references.
#[test]
fn a_well_formed_table_reads_as_written() {
    let doc = format!(
        "{SECTION}\n\n{HEADER}\n|---|---|---|\n\
         | 1 | a | `tests/a.rs::one`, `src/b.rs::two` |\n\
         | 2 | bad `:authority` | partly (only `[::1`): `tests/a.rs::three` |\n\
         | 3 | c | — not yet automated (`src/c.rs::near` is related) |\n\
         \nafter the table\n| 9 | not | part of it |\n"
    );
    let rows = parse_catalogue(&doc).unwrap();
    assert_eq!(rows.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(rows[&1].coverage, Coverage::Covered);
    assert_eq!(
        rows[&1].tests,
        [
            TestRef {
                path: "tests/a.rs".into(),
                name: "one".into()
            },
            TestRef {
                path: "src/b.rs".into(),
                name: "two".into()
            }
        ]
    );
    assert_eq!(rows[&2].coverage, Coverage::Partly);
    assert_eq!(rows[&2].tests.len(), 1);
    assert_eq!(rows[&3].coverage, Coverage::NotYetAutomated);
    assert_eq!(rows[&3].tests[0].name, "near");
}

/// A table line with the spaces around its cells removed, so padded forms compare equal.
fn squash(line: &str) -> String {
    line.trim()
        .split('|')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("|")
}

/// The `fuzz/fuzz_targets/<name>.rs` spans in a cell: fuzz targets a case is covered by.
fn fuzz_refs(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("fuzz/fuzz_targets/") && s.ends_with(".rs"))
        .map(str::to_string)
        .collect()
}

/// Case 24 says "(fuzzed)": its row must name fuzz targets, and every fuzz target any row names
/// must exist and be a `[[bin]]` of `fuzz/Cargo.toml`, which `scripts/fuzz.sh` (and so CI) runs.
#[test]
fn the_fuzzed_cases_name_fuzz_targets_that_ci_runs() {
    let doc = std::fs::read_to_string(repo_root().join("docs/reliability.md")).unwrap();
    let manifest = std::fs::read_to_string(repo_root().join("fuzz/Cargo.toml")).unwrap();
    let mut named = BTreeMap::new();
    for line in doc.lines().filter(|l| l.trim_start().starts_with('|')) {
        let case = line.split('|').nth(1).map(str::trim).unwrap_or("");
        for target in fuzz_refs(line) {
            named.insert(target, case.to_string());
        }
    }
    assert!(
        named.values().any(|case| case == "24"),
        "case 24 (fuzzed) names no `fuzz/fuzz_targets/<target>.rs`"
    );
    for (target, case) in &named {
        assert!(
            repo_root().join(target).is_file(),
            "case {case}: {target} does not exist"
        );
        let entry = format!("path = \"{}\"", target.trim_start_matches("fuzz/"));
        assert!(
            manifest.contains(&entry),
            "case {case}: {target} is not a [[bin]] of fuzz/Cargo.toml (no `{entry}`)"
        );
    }
}

#[test]
fn fuzz_refs_are_the_target_spans_only() {
    assert_eq!(
        fuzz_refs("`src/a.rs::t`, `fuzz/fuzz_targets/jwt.rs` and `fuzz/README.md`"),
        vec!["fuzz/fuzz_targets/jwt.rs".to_string()]
    );
}
