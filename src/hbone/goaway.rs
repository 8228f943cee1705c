//! Which abuse limit closed an HBONE connection (reliability #41: closes counted by reason).
//!
//! When one of h2's limits trips, h2 sends GOAWAY ENHANCE_YOUR_CALM with its reason in the
//! debug data (`too_many_resets`, `too_many_continuations`, ...), but the error it hands back
//! to the server carries only the code: h2 0.4 keeps the reason code, not the debug data, once
//! the connection is closing. So the server cannot tell a CONTINUATION flood from a rapid reset
//! by the error. [`GoAwayTap`] sits between h2 and TLS and reads the frame headers h2 writes (9
//! bytes each; payloads are skipped, never copied, except the first bytes of a GOAWAY), keeping
//! the last GOAWAY's code and debug data. It never changes or holds back a byte.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// RFC 9113 section 6.8.
const GOAWAY: u8 = 0x7;
const HEADER_LEN: usize = 9;
/// Last-stream-id and error code precede the debug data.
const GOAWAY_FIXED: usize = 8;
/// Debug data kept: h2's reasons are under 30 bytes; anything longer is not one of them.
const MAX_DEBUG: usize = 64;

/// The last GOAWAY the server sent on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentGoAway {
    pub code: u32,
    pub debug: Vec<u8>,
}

/// Which of h2's abuse limits a GOAWAY ENHANCE_YOUR_CALM names, by its debug data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    /// `too_many_resets`: streams reset by the client before the server accepted them.
    RapidReset,
    /// `too_many_internal_resets`: streams h2 itself had to reset (malformed requests,
    /// flow-control errors, streams past the concurrency limit).
    LocalResets,
    /// `too_many_continuations`: a header block kept open with CONTINUATION frames.
    Continuation,
    /// `header_list_way_too_large`: a header list (or an HPACK bomb) past 4 times the limit.
    HeaderList,
    /// `too_many_data_frames`: empty or tiny DATA frames.
    DataFrames,
    /// Some other reason, or no GOAWAY seen.
    Unknown,
}

impl Flood {
    pub fn from_debug(debug: &[u8]) -> Flood {
        match debug {
            b"too_many_resets" => Flood::RapidReset,
            b"too_many_internal_resets" => Flood::LocalResets,
            b"too_many_continuations" => Flood::Continuation,
            b"header_list_way_too_large" => Flood::HeaderList,
            b"too_many_data_frames" => Flood::DataFrames,
            _ => Flood::Unknown,
        }
    }

    /// The `zmesh_rejected_total{reason}` label.
    pub fn code(self) -> &'static str {
        match self {
            Flood::RapidReset => "rapid_reset",
            Flood::LocalResets => "local_reset_flood",
            Flood::Continuation => "continuation_flood",
            Flood::HeaderList => "header_list_too_large",
            Flood::DataFrames => "data_frame_flood",
            Flood::Unknown => "enhance_your_calm",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Flood::RapidReset => "too many streams reset before they were accepted",
            Flood::LocalResets => "too many streams the server had to reset",
            Flood::Continuation => "too many CONTINUATION frames in one header block",
            Flood::HeaderList => "a header list far past the limit",
            Flood::DataFrames => "too many empty or tiny DATA frames",
            Flood::Unknown => "an HTTP/2 abuse limit",
        }
    }
}

impl std::fmt::Display for Flood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Where a connection's tap leaves the last GOAWAY it saw; read after the connection ended.
#[derive(Clone, Default)]
pub struct GoAwaySeen(Arc<Mutex<Option<SentGoAway>>>);

impl GoAwaySeen {
    pub fn last(&self) -> Option<SentGoAway> {
        self.0.lock().expect("goaway lock poisoned").clone()
    }

    /// The flood named by the last GOAWAY sent, if it was ENHANCE_YOUR_CALM.
    pub fn flood(&self) -> Option<Flood> {
        let g = self.last()?;
        (g.code == u32::from(h2::Reason::ENHANCE_YOUR_CALM)).then(|| Flood::from_debug(&g.debug))
    }
}

/// Frame boundaries of a byte stream of HTTP/2 frames (no preface: the server's side).
#[derive(Default)]
struct Walker {
    head: [u8; HEADER_LEN],
    /// Bytes of the current frame header seen so far.
    have: usize,
    /// Payload bytes of the current frame still to come.
    skip: usize,
    /// The start of a GOAWAY payload being read.
    goaway: Option<Vec<u8>>,
}

impl Walker {
    /// Walks `bytes`; returns each GOAWAY completed in them.
    fn feed(&mut self, mut bytes: &[u8], mut done: impl FnMut(SentGoAway)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                if let Some(g) = &mut self.goaway {
                    let room = (GOAWAY_FIXED + MAX_DEBUG).saturating_sub(g.len());
                    g.extend_from_slice(&bytes[..n.min(room)]);
                }
                self.skip -= n;
                bytes = &bytes[n..];
                if self.skip == 0 {
                    self.finish(&mut done);
                }
                continue;
            }
            let n = (HEADER_LEN - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == HEADER_LEN {
                self.have = 0;
                let h = &self.head;
                self.skip = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                if h[3] == GOAWAY {
                    self.goaway = Some(Vec::with_capacity(GOAWAY_FIXED + MAX_DEBUG));
                }
                if self.skip == 0 {
                    self.finish(&mut done);
                }
            }
        }
    }

    fn finish(&mut self, done: &mut impl FnMut(SentGoAway)) {
        let Some(g) = self.goaway.take() else { return };
        if g.len() >= GOAWAY_FIXED {
            let code = u32::from_be_bytes([g[4], g[5], g[6], g[7]]);
            done(SentGoAway {
                code,
                debug: g[GOAWAY_FIXED..].to_vec(),
            });
        }
    }
}

/// Passes every byte through to `io`, noting the GOAWAYs written (see the module docs).
pub struct GoAwayTap<T> {
    io: T,
    walker: Walker,
    seen: GoAwaySeen,
}

impl<T> GoAwayTap<T> {
    pub fn new(io: T) -> (GoAwayTap<T>, GoAwaySeen) {
        let seen = GoAwaySeen::default();
        let tap = GoAwayTap {
            io,
            walker: Walker::default(),
            seen: seen.clone(),
        };
        (tap, seen)
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    fn written(&mut self, bytes: &[u8]) {
        let seen = &self.seen;
        self.walker.feed(bytes, |g| {
            *seen.0.lock().expect("goaway lock poisoned") = Some(g);
        });
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GoAwayTap<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GoAwayTap<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written(&buf[..n]);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = r {
            for b in bufs {
                if n == 0 {
                    break;
                }
                let take = n.min(b.len());
                self.written(&b[..take]);
                n -= take;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    fn goaway(code: u32, debug: &[u8]) -> Vec<u8> {
        let mut p = 7u32.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(debug);
        frame(GOAWAY, &p)
    }

    /// Every GOAWAY in `wire`, fed in pieces of `step` bytes.
    fn walk(wire: &[u8], step: usize) -> Vec<SentGoAway> {
        let mut w = Walker::default();
        let mut out = Vec::new();
        for piece in wire.chunks(step) {
            w.feed(piece, |g| out.push(g));
        }
        out
    }

    /// h2's reasons are found wherever the writes split the frames, after SETTINGS, DATA and
    /// empty frames; each maps to its label.
    #[test]
    fn the_goaway_after_other_frames_is_found_at_any_split() {
        let cases = [
            (&b"too_many_resets"[..], Flood::RapidReset, "rapid_reset"),
            (
                b"too_many_internal_resets",
                Flood::LocalResets,
                "local_reset_flood",
            ),
            (
                b"too_many_continuations",
                Flood::Continuation,
                "continuation_flood",
            ),
            (
                b"header_list_way_too_large",
                Flood::HeaderList,
                "header_list_too_large",
            ),
            (
                b"too_many_data_frames",
                Flood::DataFrames,
                "data_frame_flood",
            ),
            (b"", Flood::Unknown, "enhance_your_calm"),
        ];
        for (debug, flood, label) in cases {
            let mut wire = frame(0x4, &[0, 3, 0, 0, 0, 200]);
            wire.extend(frame(0x0, &[]));
            wire.extend(frame(0x0, &vec![b'x'; 70_000]));
            wire.extend(goaway(0xb, debug));
            for step in [1, 2, 7, 9, 10, 4096, wire.len()] {
                let got = walk(&wire, step);
                assert_eq!(got.len(), 1, "{debug:?} in steps of {step}");
                assert_eq!(got[0].code, 0xb);
                assert_eq!(Flood::from_debug(&got[0].debug), flood);
            }
            assert_eq!(flood.code(), label);
        }
    }

    /// Bytes inside a DATA payload that look like a GOAWAY are payload, not a frame: only the
    /// frame headers h2 wrote are read. A GOAWAY's oversized debug data is cut at 64 bytes and
    /// names no flood; a GOAWAY too short to hold its code is ignored.
    #[test]
    fn payloads_and_malformed_goaways_are_not_taken_for_a_reason() {
        let fake = goaway(0xb, b"too_many_resets");
        let mut wire = frame(0x0, &fake);
        assert!(walk(&wire, 3).is_empty(), "a GOAWAY inside DATA was read");
        wire.extend(goaway(0xb, &vec![b'd'; 10_000]));
        let got = walk(&wire, 5);
        assert_eq!(got[0].debug.len(), MAX_DEBUG);
        assert_eq!(Flood::from_debug(&got[0].debug), Flood::Unknown);
        assert!(walk(&frame(GOAWAY, &[0, 0, 0]), 1).is_empty());
    }

    /// Through the wrapper: the bytes reach the far end unchanged, and `GoAwaySeen` names the
    /// flood only for ENHANCE_YOUR_CALM.
    #[tokio::test]
    async fn the_tap_passes_every_byte_and_keeps_the_last_goaway() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let (mut tap, seen) = GoAwayTap::new(near);
        let mut wire = frame(0x0, b"hello");
        wire.extend(goaway(0x0, b""));
        tap.write_all(&wire).await.unwrap();
        assert_eq!(seen.flood(), None, "GOAWAY NO_ERROR is no flood");
        let calm = goaway(0xb, b"too_many_continuations");
        tap.write_all(&calm).await.unwrap();
        drop(tap);
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [wire, calm].concat());
        assert_eq!(seen.flood(), Some(Flood::Continuation));
    }
}
