//! zmesh-waypoint's config loader: the node's `Config::parse` (which holds the waypoint
//! sections: `waypoint`, `routes`, `http_policies`, `request_authentication`) and then what
//! `zmesh-waypoint check-config` adds, `WpState::from_config` (JWKS parse, model, policies).
//!
//! Input: the config text (YAML). `jwks_file` entries are dropped before `from_config`, so the
//! fuzzer never makes the target read a file of its choosing (`/dev/zero`); inline `jwks` is
//! parsed as given; `grpc_transcoding` (which reads its descriptor set) is dropped the same way.
//! Properties: no panic, no hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh::config::Config;
use zmesh::waypoint::server::WpState;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut cfg) = Config::parse(text, "waypoint.yaml") else {
        return;
    };
    for a in &mut cfg.request_authentication {
        a.jwks_file = None;
    }
    // Nor a descriptor set of its choosing.
    for r in &mut cfg.routes {
        r.grpc_transcoding = None;
    }
    if let Err(e) = WpState::from_config(&cfg) {
        let _ = e.to_string();
    }
});
