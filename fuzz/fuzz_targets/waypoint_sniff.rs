//! The waypoint's protocol sniffer: the first bytes of a CONNECT stream decide HTTP (hyper) or
//! opaque TCP (`looks_like_http`), and the sniffed bytes are replayed in front of the rest of the
//! stream (`Rewind`).
//!
//! Input: byte 0 is how many bytes the sniff read (`% 17`, the sniffer reads at most 16), byte 1
//! the reader's buffer size (`1 + b % 64`), the rest the stream.
//! Properties: no panic; a stream taken for HTTP starts with 3-7 upper-case letters and a space
//! (so `GET `, `PRI ` of the HTTP/2 preface); the replayed stream is byte for byte the original,
//! whatever the read sizes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;
use zmesh::waypoint::server::fuzzing::{looks_like_http, rewind};

fuzz_target!(|data: &[u8]| {
    let (sniffed, buf_len, stream) = match data {
        [s, b, rest @ ..] => (
            usize::from(s % 17).min(rest.len()),
            1 + usize::from(b % 64),
            rest,
        ),
        _ => return,
    };
    let first = &stream[..sniffed];
    if looks_like_http(first) {
        let method = first.iter().take_while(|c| c.is_ascii_uppercase()).count();
        assert!(
            (3..=7).contains(&method) && first[method] == b' ',
            "{first:?}"
        );
    }

    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    });
    let out = rt.block_on(async {
        let mut io = rewind(first.to_vec(), &stream[sniffed..]);
        let mut out = Vec::with_capacity(stream.len());
        let mut buf = vec![0u8; buf_len];
        loop {
            let n = io.read(&mut buf).await.expect("in-memory read");
            if n == 0 {
                break out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    });
    assert_eq!(out, stream);
});
