//! The node tunnel's ZDS decoder: one datagram with its SCM_RIGHTS fds goes through the real
//! wire (`zds::wire::send`/`recv` over a SOCK_SEQPACKET socketpair), then through what
//! `ZdsClient::next_event` makes of it (`zds::fuzzing::decode_request`: protobuf decode, payload
//! and fd-count checks, the netns check of an `add`'s fd).
//!
//! Input: byte 0 is the number of fds to attach (`& 7`: up to 7, more than the 4 a datagram may
//! carry, so truncation is reached), byte 1 a mask of which of them are a network namespace
//! (`/proc/self/ns/net`) rather than `/dev/null`, the rest the datagram's bytes (a
//! `WorkloadRequest`).
//! Properties: no panic; an `add` is accepted only with exactly one fd, a netns; the other
//! requests only with none; and no fd is leaked, whatever the outcome (the process's fd count
//! is the same after every input).
#![no_main]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use zmesh_redirect::zds::fuzzing::decode_request;
use zmesh_redirect::zds::wire::{self, Datagram, SeqpacketSocket};
use zmesh_redirect::zds::ZdsEvent;

struct Rig {
    rt: tokio::runtime::Runtime,
    tx: SeqpacketSocket,
    rx: SeqpacketSocket,
    netns: File,
    null: File,
    open_fds: Vec<String>,
}

/// The fds open on what the target passes (`/dev/null`, a netns), numbered, for the leak check
/// and its message. Other fds come and go with libFuzzer itself (the pipes of the symbolizer it
/// starts to name newly covered functions).
fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .expect("list /proc/self/fd")
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_string_lossy().into_owned();
            let passed = target == "/dev/null" || target.starts_with("net:");
            passed.then(|| format!("{} -> {target}", e.file_name().to_string_lossy()))
        })
        .collect();
    fds.sort();
    fds
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("SEQPACKET socketpair");
        let (tx, rx) = {
            let _guard = rt.enter();
            (
                SeqpacketSocket::from_fd(a).expect("tx"),
                SeqpacketSocket::from_fd(b).expect("rx"),
            )
        };
        let netns = File::open("/proc/self/ns/net").expect("open /proc/self/ns/net");
        let null = File::open("/dev/null").expect("open /dev/null");
        let mut rig = Rig {
            rt,
            tx,
            rx,
            netns,
            null,
            open_fds: Vec::new(),
        };
        rig.open_fds = open_fds();
        rig
    })
}

fuzz_target!(|data: &[u8]| {
    let r = rig();
    let (count, mask, bytes) = match data {
        [c, m, rest @ ..] => (usize::from(c & 7), *m, rest),
        _ => return,
    };
    let fds: Vec<BorrowedFd<'_>> = (0..count)
        .map(|i| {
            if mask & (1 << i) != 0 {
                r.netns.as_fd()
            } else {
                r.null.as_fd()
            }
        })
        .collect();
    let netns_sent = (0..count).filter(|i| mask & (1 << i) != 0).count();

    r.rt.block_on(async {
        if wire::send(&r.tx, bytes, &fds).await.is_err() {
            // Too large to send: nothing reached the receiver.
            assert!(bytes.len() > wire::MAX_DATAGRAM);
            return;
        }
        let datagram = match wire::recv(&r.rx).await {
            Ok(d) => d,
            Err(e) => {
                assert!(count > wire::MAX_FDS_PER_DATAGRAM, "recv refused: {e}");
                return;
            }
        };
        let Datagram::Message { bytes: got, fds } = datagram else {
            assert!(
                bytes.is_empty() && count == 0,
                "EOF for a datagram with content"
            );
            return;
        };
        assert_eq!(got, bytes);
        assert_eq!(fds.len(), count);
        match decode_request(&got, fds) {
            Ok(ZdsEvent::Add { netns, .. }) => {
                assert!(
                    count == 1 && netns_sent == 1,
                    "add accepted with {count} fds"
                );
                drop(netns);
            }
            Ok(_) => assert_eq!(count, 0, "a request other than add accepted with fds"),
            Err(reason) => assert!(!reason.is_empty()),
        }
    });
    let now = open_fds();
    assert!(
        now == r.open_fds,
        "an fd was leaked: {now:#?}, before {:#?}",
        r.open_fds
    );
});
