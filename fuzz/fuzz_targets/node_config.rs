//! zmesh-node's config loader: `${NAME}` expansion, the pre-scan (`config::guard::check`), then
//! `Config::parse` (YAML, typed fields, cross-checks), then what the node derives from an
//! accepted config at start (warnings, the policy set, the model).
//!
//! Input: the config text (YAML). `${NODE_NAME}` expands to `node-a`; any other `${NAME}` is
//! unset, as an unset environment variable is for `Config::load`.
//! Properties: no panic, no hang (the guard keeps nesting and aliases bounded), and text the
//! guard refuses is never accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh::config::{expand_env, guard, Config};
use zmesh::model::Model;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(text) = expand_env(text, |k| (k == "NODE_NAME").then(|| "node-a".to_string())) else {
        return;
    };
    let guarded = guard::check(&text);
    match Config::parse(&text, "fuzz.yaml") {
        Ok(cfg) => {
            assert!(
                guarded.is_ok(),
                "the guard refused text the parser accepted"
            );
            let _ = cfg.warnings();
            let _ = cfg.policy_set();
            let _ = Model::from_config(&cfg);
        }
        Err(e) => {
            let _ = e.to_string();
            let _ = e.location();
        }
    }
});
