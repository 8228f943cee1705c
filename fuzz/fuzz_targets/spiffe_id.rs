//! The SPIFFE id parser (`zmesh::identity::SpiffeId::parse`).
//!
//! Input: the id text (any bytes; non-UTF-8 is passed lossily, so it must be refused).
//! Properties: no panic; only the canonical form is accepted, so an accepted id prints back as
//! exactly the input, and `SpiffeId::new` accepts its parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh::identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(id) = SpiffeId::parse(&text) {
        assert_eq!(id.to_string(), text, "a non-canonical id was accepted");
        assert_eq!(
            SpiffeId::new(&id.trust_domain, &id.namespace, &id.service_account),
            Ok(id.clone())
        );
    }
});
