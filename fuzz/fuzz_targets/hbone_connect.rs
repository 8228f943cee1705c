//! The HBONE CONNECT parser (`zmesh::hbone::connect`): `parse_connect` on a request made from
//! the input, and `parse_authority` on the raw authority text.
//!
//! Input: `METHOD URI` (text). A leading `+` marks the request as an extended CONNECT (an
//! h2 `:protocol`), which must always be refused.
//! Properties: no panic; an accepted authority is an `ip:port` that survives the round trip
//! through `authority_string`; only a plain CONNECT is ever accepted, and it names the same
//! target as its authority alone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh::hbone::connect::{authority_string, parse_authority, parse_connect};

fuzz_target!(|data: &[u8]| {
    let (extended, data) = match data.strip_prefix(b"+") {
        Some(rest) => (true, rest),
        None => (false, data),
    };
    let (method, uri) = match data.iter().position(|&b| b == b' ') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"CONNECT"[..], data),
    };

    if let Ok(text) = std::str::from_utf8(uri) {
        if let Ok(addr) = parse_authority(text) {
            assert!(text.is_ascii() && !text.contains('@'), "accepted {text:?}");
            assert_eq!(
                parse_authority(&authority_string(addr)),
                Ok(addr),
                "{text:?}"
            );
        }
    }

    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(uri) else {
        return;
    };
    let Ok(mut req) = http::Request::builder()
        .method(method.clone())
        .uri(uri.clone())
        .body(())
    else {
        return;
    };
    if extended {
        req.extensions_mut()
            .insert(h2::ext::Protocol::from_static("websocket"));
    }
    if let Ok(addr) = parse_connect(&req) {
        assert_eq!(method, http::Method::CONNECT);
        assert!(!extended, "an extended CONNECT was accepted");
        let authority = uri.authority().expect("accepted without an authority");
        assert_eq!(parse_authority(authority.as_str()), Ok(addr));
    }
});
