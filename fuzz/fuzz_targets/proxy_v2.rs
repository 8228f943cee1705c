//! The PROXY v2 header decoder (`zmesh::hbone::proxy_protocol::decode`).
//!
//! Input: the bytes at the start of a connection.
//! Properties: no panic; a decoded header says how many bytes it took (never more than were
//! given, exactly the fixed 16 plus its declared length), and a header that encodes again
//! decodes back to itself from exactly the bytes the encoder wrote.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zmesh::hbone::proxy_protocol::{decode, FIXED_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok((header, used)) = decode(data) {
        assert!(used <= data.len(), "took {used} of {} bytes", data.len());
        let declared = u16::from_be_bytes([data[14], data[15]]) as usize;
        assert_eq!(used, FIXED_LEN + declared, "took other than the declared length");
        if let Ok(bytes) = header.encode() {
            let again = decode(&bytes).expect("an encoded header decodes");
            assert_eq!(again, (header, bytes.len()));
        }
    }
});
