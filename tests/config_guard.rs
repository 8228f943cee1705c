//! Reliability #24 and #40: the config pre-scan (`zmesh::config::guard`) compared with libyaml
//! itself on generated text. Here rather than in the library because reading libyaml's event
//! stream takes `unsafe`, which the library forbids.

use zmesh::config::guard::{check, MAX_DEPTH};

/// What libyaml works through in `text` before it finishes or fails: the deepest nesting it
/// reaches and the aliases it resolves (errors after that point do not undo either).
#[allow(unsafe_code)]
fn libyaml_reads(text: &str) -> (usize, usize) {
    use std::mem::MaybeUninit;
    use unsafe_libyaml as unsafe_y;
    // SAFETY: libyaml initializes the parser and each event before they are read, each is
    // deleted exactly once, and `text` outlives the parser that reads it.
    unsafe {
        let mut parser = MaybeUninit::<unsafe_y::yaml_parser_t>::uninit();
        assert!(unsafe_y::yaml_parser_initialize(parser.as_mut_ptr()).ok);
        let parser = parser.as_mut_ptr();
        unsafe_y::yaml_parser_set_input_string(parser, text.as_ptr(), text.len() as _);
        let (mut depth, mut deepest, mut aliases) = (0usize, 0usize, 0usize);
        loop {
            let mut event = MaybeUninit::<unsafe_y::yaml_event_t>::uninit();
            if !unsafe_y::yaml_parser_parse(parser, event.as_mut_ptr()).ok {
                break;
            }
            let event = event.as_mut_ptr();
            let kind = (*event).type_;
            if kind == unsafe_y::YAML_SEQUENCE_START_EVENT
                || kind == unsafe_y::YAML_MAPPING_START_EVENT
            {
                depth += 1;
                deepest = deepest.max(depth);
            } else if kind == unsafe_y::YAML_SEQUENCE_END_EVENT
                || kind == unsafe_y::YAML_MAPPING_END_EVENT
            {
                depth = depth.saturating_sub(1);
            } else if kind == unsafe_y::YAML_ALIAS_EVENT {
                aliases += 1;
            }
            unsafe_y::yaml_event_delete(event);
            if kind == unsafe_y::YAML_STREAM_END_EVENT {
                break;
            }
        }
        unsafe_y::yaml_parser_delete(parser);
        (deepest, aliases)
    }
}

#[test]
fn the_oracle_counts_what_libyaml_nests() {
    assert_eq!(libyaml_reads("a: [1, {b: [2]}]\n").0, 4);
    assert_eq!(libyaml_reads("- - - x\n").0, 3);
    assert_eq!(libyaml_reads("a: &x 1\nb: *x\n").1, 1);
    // Depth reached before a syntax error still counts.
    assert_eq!(libyaml_reads("a: [[[[ x\n]]]] ]").0, 5);
}

/// Reliability #24 (fuzzed): random YAML-ish text around a deep core. Whenever the scan lets
/// text through, libyaml must reach no more than [`MAX_DEPTH`] levels in it, even on the way
/// to a syntax error: the scan may be stricter than YAML, never laxer.
#[test]
fn the_scan_is_never_laxer_than_libyaml() {
    use rand::{Rng, SeedableRng};
    const PIECES: &[&str] = &[
        "a: ",
        "- ",
        "? ",
        ": ",
        "'",
        "\"",
        "#",
        " #",
        "|",
        ">",
        "|2",
        "|-",
        ">+1",
        "\n",
        "  ",
        "\n  ",
        "\n    ",
        "k: |\n",
        "k: >\n  ",
        "\u{2028}",
        "\u{85}",
        "\r",
        "\r\n",
        "!t ",
        "!!str ",
        "x",
        "y z",
        ", ",
        "[",
        "]",
        "{",
        "}",
        "\\",
        "'x'",
        "\"y\"",
        "---\n",
        "--- ",
        "...\n",
        "\t",
        "- - ",
        "-\n",
        "?\n",
        "k:\n",
        "k:\n- ",
        "\u{feff}",
        "é",
        "&",
        "*",
        "%",
        "a: x\n  ",
        "\n ",
        "[#",
        "'#'",
        "\t#",
        "%YAML 1.1\n",
        "!<t> ",
        "? |\n",
        "'a\n b'",
        "\"a\\\n b\"",
        "|\n",
        "- |\n  ",
        "k: >-\n   ",
        ",#",
        "]#",
        ":#",
        "x:y",
        "- ? ",
        "&a ",
        "*a ",
    ];
    for seed in 40..44u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut passed = 0;
        for case in 0..20_000 {
            let mut text = String::new();
            for _ in 0..rng.gen_range(0..20) {
                text.push_str(PIECES[rng.gen_range(0..PIECES.len())]);
            }
            let n = 70 + rng.gen_range(0..80);
            match rng.gen_range(0..4) {
                0 => text.push_str(&"[".repeat(n)),
                1 => text.push_str(&"{a: ".repeat(n)),
                2 => text.push_str(&"- ".repeat(n)),
                _ => {
                    for i in 0..n {
                        text.push('\n');
                        text.push_str(&" ".repeat(i));
                        text.push_str("k:");
                    }
                }
            }
            for _ in 0..rng.gen_range(0..6) {
                text.push_str(PIECES[rng.gen_range(0..PIECES.len())]);
            }
            if check(&text).is_err() {
                continue;
            }
            passed += 1;
            let (depth, aliases) = libyaml_reads(&text);
            assert!(
                depth <= MAX_DEPTH,
                "seed {seed} case {case}: libyaml reached depth {depth} in text the scan passed: {text:?}"
            );
            assert_eq!(
                aliases, 0,
                "seed {seed} case {case}: libyaml resolved an alias in text the scan passed: {text:?}"
            );
        }
        // The generator must also produce text the scan lets through, or this tests nothing.
        assert!(passed > 1000, "{passed}");
    }
}

/// Every YAML file the project ships (configs, and the Kubernetes manifests that carry them) passes
/// the scan: the limits refuse attacks, not the files operators write.
#[test]
fn every_shipped_yaml_file_passes_the_scan() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    let mut dirs = vec![root.join("examples"), root.join("daemonset")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert_eq!(check(&text), Ok(()), "{}", path.display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 10, "{seen}");
}
