//! Tier (b) tests of the ZDS netns hand-off (`docs/capture.md`), no root needed: any fd
//! stands in for a pod netns (`/proc/self/ns/net` of the test process).
//!
//! The interop tests talk to the crate through a protobuf codec written here by hand from the
//! spec's "ZDS message layout" table, NOT through the crate's prost types, so a wrong field number
//! in the crate (e.g. `DelWorkload.uid` must be 2, `keep` must be oneof field 5) fails them.
//! Every test runs under [`run`]: one counts `/proc/self/fd`, which the whole process shares.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    bind, connect, listen, recvmsg, sendmsg, socket, socketpair, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use zmesh_redirect::zds::server::{ACK_TIMEOUT, HELLO_TIMEOUT, MAX_TUNNEL_CONNECTIONS};
use zmesh_redirect::zds::wire::{self, Datagram, SeqpacketSocket};
use zmesh_redirect::zds::{Delivery, WorkloadInfo, ZdsClient, ZdsError, ZdsEvent, ZdsServer};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs one test on its own runtime while holding `SERIAL`, so that no other test's runtime,
/// sockets or fds exist while it counts `/proc/self/fd` (with `#[tokio::test]` the runtimes would
/// be built, and torn down, outside the lock).
fn run(test: impl std::future::Future<Output = ()>) {
    run_on(test, false);
}

/// [`run`] with tokio's clock paused: deadlines (hello, ack) pass as soon as the runtime is idle.
/// Only for tests whose peers all live on the runtime (no blocking threads).
fn run_paused(test: impl std::future::Future<Output = ()>) {
    run_on(test, true);
}

fn run_on(test: impl std::future::Future<Output = ()>, paused: bool) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(paused)
        .build()
        .unwrap();
    rt.block_on(test);
}

/// Upper bound on any single wait, so a protocol bug fails the test instead of hanging it.
const GUARD: Duration = Duration::from_secs(10);

/// Hand-written protobuf: tag = (field << 3) | wire type; 0 = varint, 2 = length-delimited.
mod pb {
    pub fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub fn varint_field(field: u32, v: u64, out: &mut Vec<u8>) {
        varint(u64::from(field) << 3, out);
        varint(v, out);
    }

    pub fn len_field(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
        varint((u64::from(field) << 3) | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    #[derive(Debug, PartialEq)]
    pub enum Val {
        Varint(u64),
        Bytes(Vec<u8>),
    }

    fn read_varint(bytes: &[u8], pos: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = bytes[*pos];
            *pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
        }
    }

    /// Parses one message level into (field, value) pairs; panics on anything but varint/LEN.
    pub fn parse(bytes: &[u8]) -> Vec<(u32, Val)> {
        let mut pos = 0;
        let mut fields = Vec::new();
        while pos < bytes.len() {
            let key = read_varint(bytes, &mut pos);
            let field = (key >> 3) as u32;
            match key & 7 {
                0 => fields.push((field, Val::Varint(read_varint(bytes, &mut pos)))),
                2 => {
                    let len = read_varint(bytes, &mut pos) as usize;
                    fields.push((field, Val::Bytes(bytes[pos..pos + len].to_vec())));
                    pos += len;
                }
                other => panic!("unexpected wire type {other} in {bytes:02x?}"),
            }
        }
        fields
    }

    /// The single field of a message that must contain exactly one.
    pub fn only(bytes: &[u8]) -> (u32, Val) {
        let mut fields = parse(bytes);
        assert_eq!(
            fields.len(),
            1,
            "expected exactly one field in {bytes:02x?}"
        );
        fields.remove(0)
    }

    /// The string in `field`, or "" if absent (proto3 default).
    pub fn string(bytes: &[u8], field: u32) -> String {
        parse(bytes)
            .into_iter()
            .find(|(f, _)| *f == field)
            .map(|(_, v)| match v {
                Val::Bytes(b) => String::from_utf8(b).unwrap(),
                Val::Varint(_) => panic!("field {field} is not a string"),
            })
            .unwrap_or_default()
    }

    pub fn bytes_of(val: Val) -> Vec<u8> {
        match val {
            Val::Bytes(b) => b,
            Val::Varint(v) => panic!("expected a LEN field, got varint {v}"),
        }
    }

    // --- the messages of the spec table ---

    pub fn hello_v1() -> Vec<u8> {
        let mut out = Vec::new();
        varint_field(1, 1, &mut out); // ZdsHello.version = V1
        out
    }

    pub fn workload_info(name: &str, namespace: &str, sa: &str) -> Vec<u8> {
        let mut out = Vec::new();
        len_field(1, name.as_bytes(), &mut out);
        len_field(2, namespace.as_bytes(), &mut out);
        len_field(3, sa.as_bytes(), &mut out);
        out
    }

    /// WorkloadRequest{add = 1: AddWorkload{uid = 1, workload_info = 2}}
    pub fn add(uid: &str, info: &[u8]) -> Vec<u8> {
        let mut inner = Vec::new();
        len_field(1, uid.as_bytes(), &mut inner);
        len_field(2, info, &mut inner);
        let mut out = Vec::new();
        len_field(1, &inner, &mut out);
        out
    }

    /// WorkloadRequest{del = 2: DelWorkload{uid = 2}}
    pub fn del(uid: &str) -> Vec<u8> {
        let mut inner = Vec::new();
        len_field(2, uid.as_bytes(), &mut inner);
        let mut out = Vec::new();
        len_field(2, &inner, &mut out);
        out
    }

    /// WorkloadRequest{keep = 5: KeepWorkload{uid = 1}}
    pub fn keep(uid: &str) -> Vec<u8> {
        let mut inner = Vec::new();
        len_field(1, uid.as_bytes(), &mut inner);
        let mut out = Vec::new();
        len_field(5, &inner, &mut out);
        out
    }

    /// WorkloadRequest{snapshot_sent = 3: SnapshotSent{}}
    pub fn snapshot_sent() -> Vec<u8> {
        let mut out = Vec::new();
        len_field(3, &[], &mut out);
        out
    }

    /// WorkloadResponse{ack = 1: Ack{error = 1}}; an empty error is omitted (proto3).
    pub fn ack(error: &str) -> Vec<u8> {
        let mut inner = Vec::new();
        if !error.is_empty() {
            len_field(1, error.as_bytes(), &mut inner);
        }
        let mut out = Vec::new();
        len_field(1, &inner, &mut out);
        out
    }

    /// The error text of a WorkloadResponse, checking it is an ack (field 1).
    pub fn ack_error(bytes: &[u8]) -> String {
        let (field, val) = only(bytes);
        assert_eq!(field, 1, "WorkloadResponse payload must be ack = 1");
        string(&bytes_of(val), 1)
    }
}

// --- blocking raw SEQPACKET peers, independent of the crate's wire module ---

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zmesh-zds-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn raw_listener(path: &Path) -> UnixListener {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&fd, Backlog::new(4).unwrap()).unwrap();
    UnixListener::from(fd)
}

fn raw_connect(path: &Path) -> UnixStream {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    let sock = UnixStream::from(fd);
    sock.set_read_timeout(Some(GUARD)).unwrap();
    sock
}

fn raw_send(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    assert_eq!(n, bytes.len());
}

/// Receives one datagram; returns its bytes and how many fds came with it (closing them).
fn raw_recv(sock: &UnixStream) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; 65536];
    let mut cmsg = nix::cmsg_space!([RawFd; 16]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .expect("receive from the crate (timed out?)");
    let mut count = 0;
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            count += fds.len();
            for fd in fds {
                nix::unistd::close(fd).unwrap();
            }
        }
    }
    let n = msg.bytes;
    buf.truncate(n);
    (buf, count)
}

fn netns() -> OwnedFd {
    File::open("/proc/self/ns/net").unwrap().into()
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "default".into(),
        service_account: "sa".into(),
    }
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn next(client: &mut ZdsClient) -> ZdsEvent {
    tokio::time::timeout(GUARD, client.next_event())
        .await
        .expect("no event in time")
        .expect("client error")
        .expect("agent closed the connection")
}

/// Waits until `n` tunnels have acked their snapshot: only those get new pods. The ack is on its
/// way when the client returns from `ack`, so this is a few polls at most.
async fn wait_ready(server: &ZdsServer, n: usize) {
    tokio::time::timeout(GUARD, async {
        while server.connected_tunnels() != n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{n} ready tunnel(s) expected, have {}",
            server.connected_tunnels()
        )
    });
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::time::timeout(GUARD, tokio::task::spawn_blocking(f))
        .await
        .expect("fake peer timed out")
        .expect("fake peer panicked")
}

/// Decoded WorkloadRequest.add as seen on the wire.
fn expect_add(bytes: &[u8]) -> (String, String, String, String) {
    let (field, val) = pb::only(bytes);
    assert_eq!(
        field, 1,
        "add must be WorkloadRequest field 1: {bytes:02x?}"
    );
    let add = pb::bytes_of(val);
    let info = pb::parse(&add)
        .into_iter()
        .find(|(f, _)| *f == 2)
        .map(|(_, v)| pb::bytes_of(v))
        .expect("AddWorkload.workload_info = 2");
    (
        pb::string(&add, 1),
        pb::string(&info, 1),
        pb::string(&info, 2),
        pb::string(&info, 3),
    )
}

#[test]
fn interop_hand_encoded_tunnel_against_server() {
    run(async {
        let dir = test_dir("server");
        let path = dir.join("ztunnel.sock");
        let server = ZdsServer::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // No tunnel yet: cached, Ok at once.
        server
            .add_pod("uid-a", info("pod-a"), netns())
            .await
            .unwrap();
        server
            .add_pod("uid-b", info("pod-b"), netns())
            .await
            .unwrap();

        let p = path.clone();
        let (tunnel, adds) = blocking(move || {
            let sock = raw_connect(&p);
            raw_send(&sock, &pb::hello_v1(), &[]);
            let mut adds = Vec::new();
            for _ in 0..2 {
                let (bytes, fds) = raw_recv(&sock);
                assert_eq!(fds, 1, "a snapshot add carries exactly the pod netns");
                adds.push(expect_add(&bytes));
                raw_send(&sock, &pb::ack(""), &[]);
            }
            let (bytes, fds) = raw_recv(&sock);
            assert_eq!(fds, 0);
            assert_eq!(
                bytes,
                pb::snapshot_sent(),
                "snapshot_sent is field 3, empty"
            );
            raw_send(&sock, &pb::ack(""), &[]);
            (sock, adds)
        })
        .await;
        wait_ready(&server, 1).await;
        let names: Vec<_> = adds.iter().map(|a| (a.0.as_str(), a.1.as_str())).collect();
        assert_eq!(names, [("uid-a", "pod-a"), ("uid-b", "pod-b")]);
        assert_eq!(adds[0].2, "default");
        assert_eq!(adds[0].3, "sa");

        // Incremental del: DelWorkload.uid is field 2 inside oneof field 2; the ack error comes back
        // verbatim.
        let fake = blocking(move || {
            let (bytes, fds) = raw_recv(&tunnel);
            assert_eq!(fds, 0);
            assert_eq!(bytes, pb::del("uid-a"));
            let (field, val) = pb::only(&bytes);
            assert_eq!(field, 2);
            assert_eq!(pb::string(&pb::bytes_of(val), 2), "uid-a");
            raw_send(&tunnel, &pb::ack("proxy for uid-a already gone"), &[]);
            tunnel
        });
        let (del, tunnel) = tokio::join!(server.del_pod("uid-a"), fake);
        match del {
            Err(ZdsError::Rejected {
                request,
                uid,
                error,
            }) => {
                assert_eq!((request, uid.as_str()), ("del", "uid-a"));
                assert_eq!(error, "proxy for uid-a already gone");
            }
            other => panic!("expected the tunnel's error, got {other:?}"),
        }
        assert_eq!(server.cached_pods(), ["uid-b"]);

        // Incremental add: one fd, acked.
        let fake = blocking(move || {
            let (bytes, fds) = raw_recv(&tunnel);
            assert_eq!(fds, 1);
            assert_eq!(expect_add(&bytes).0, "uid-c");
            raw_send(&tunnel, &pb::ack(""), &[]);
            tunnel
        });
        let (add, _tunnel) = tokio::join!(server.add_pod("uid-c", info("pod-c"), netns()), fake);
        add.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    });
}

#[test]
fn interop_hand_encoded_agent_against_client() {
    run(async {
        let dir = test_dir("client");
        let path = dir.join("ztunnel.sock");
        let listener = raw_listener(&path);
        let ns_file = File::open("/proc/self/ns/net").unwrap();
        let ns_meta = ns_file.metadata().unwrap();

        let agent = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            sock.set_read_timeout(Some(GUARD)).unwrap();
            let (hello, _) = raw_recv(&sock);
            assert_eq!(pb::only(&hello), (1, pb::Val::Varint(1)), "ZdsHello{{V1}}");
            let mut acks = Vec::new();
            let info = pb::workload_info("pod-a", "ns-a", "sa-a");
            let requests: [(Vec<u8>, bool); 5] = [
                (pb::add("uid-a", &info), true),
                (pb::keep("uid-k"), false),
                (pb::del("uid-a"), false),
                (pb::snapshot_sent(), false),
                (pb::add("uid-b", &info), true),
            ];
            for (request, with_fd) in requests {
                let fds = if with_fd {
                    vec![ns_file.as_raw_fd()]
                } else {
                    vec![]
                };
                raw_send(&sock, &request, &fds);
                let (ack, fds) = raw_recv(&sock);
                assert_eq!(fds, 0);
                acks.push(ack);
            }
            acks
        });

        let mut client = ZdsClient::connect(&path).await.unwrap();
        match next(&mut client).await {
            ZdsEvent::Add { uid, info, netns } => {
                assert_eq!(uid, "uid-a");
                assert_eq!(
                    (info.name.as_str(), info.namespace.as_str()),
                    ("pod-a", "ns-a")
                );
                assert_eq!(info.service_account, "sa-a");
                let got = File::from(netns).metadata().unwrap();
                assert_eq!((got.dev(), got.ino()), (ns_meta.dev(), ns_meta.ino()));
            }
            other => panic!("expected add, got {other:?}"),
        }
        client.ack(Ok(())).await.unwrap();
        assert!(matches!(next(&mut client).await, ZdsEvent::Keep { uid } if uid == "uid-k"));
        client.ack(Ok(())).await.unwrap();
        assert!(matches!(next(&mut client).await, ZdsEvent::Del { uid } if uid == "uid-a"));
        client.ack(Ok(())).await.unwrap();
        assert!(matches!(next(&mut client).await, ZdsEvent::SnapshotSent));
        client.ack(Ok(())).await.unwrap();
        assert!(matches!(next(&mut client).await, ZdsEvent::Add { uid, .. } if uid == "uid-b"));
        client
            .ack(Err("cannot bind 15001 in pod".into()))
            .await
            .unwrap();

        let acks = blocking(move || agent.join().unwrap()).await;
        for ack in &acks[..4] {
            assert_eq!(ack, &[0x0a, 0x00], "success is ack = 1 with an empty Ack");
        }
        assert_eq!(pb::ack_error(&acks[4]), "cannot bind 15001 in pod");
        assert!(client.next_event().await.unwrap().is_none(), "agent closed");
        std::fs::remove_dir_all(dir).unwrap();
    });
}

#[test]
fn client_rejects_bad_input_and_closes_extra_fds() {
    run(async {
        let dir = test_dir("bad");
        let path = dir.join("ztunnel.sock");
        let baseline = fd_count();
        let listener = raw_listener(&path);

        let agent = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            sock.set_read_timeout(Some(GUARD)).unwrap();
            let _hello = raw_recv(&sock);
            let ns_a = File::open("/proc/self/ns/net").unwrap();
            let ns_b = File::open("/proc/self/ns/net").unwrap();
            let (not_a_netns, _peer) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .unwrap();
            // Files that are not network namespaces, passed where the netns goes. The FIFO is
            // opened read-only and non-blocking, so it has no writer: a receiver that reopened it
            // (as /proc/self/fd/N) would wait forever.
            let fifo_path =
                std::env::temp_dir().join(format!("zmesh-zds-fifo-{}", std::process::id()));
            let _ = std::fs::remove_file(&fifo_path);
            nix::unistd::mkfifo(&fifo_path, nix::sys::stat::Mode::S_IRWXU).unwrap();
            let fifo = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&fifo_path)
                .unwrap();
            std::fs::remove_file(&fifo_path).unwrap();
            let regular = File::open("/proc/self/stat").unwrap();
            let uts = File::open("/proc/self/ns/uts").unwrap();
            let info = pb::workload_info("p", "ns", "sa");
            let (a, b) = (ns_a.as_raw_fd(), ns_b.as_raw_fd());
            let mut oversized = pb::add("uid-big", &info);
            oversized.resize(8192, 0);
            let cases: Vec<(&str, Vec<u8>, Vec<RawFd>, &str)> = vec![
                ("add, 0 fds", pb::add("u0", &info), vec![], "carried 0 fds"),
                (
                    "add, 2 fds",
                    pb::add("u2", &info),
                    vec![a, b],
                    "carried 2 fds",
                ),
                ("truncated", oversized, vec![a], "truncated"),
                ("garbage", vec![0xff, 0xff, 0xff], vec![a], "malformed"),
                (
                    "unknown oneof 4",
                    vec![0x22, 0x00],
                    vec![],
                    "no known payload",
                ),
                ("del with an fd", pb::del("u"), vec![a], "expected none"),
                (
                    "socket as netns",
                    pb::add("us", &info),
                    vec![not_a_netns.as_raw_fd()],
                    "it is a socket, not a network namespace",
                ),
                (
                    "FIFO as netns",
                    pb::add("uf", &info),
                    vec![fifo.as_raw_fd()],
                    "it is a FIFO, not a network namespace",
                ),
                (
                    "regular file as netns",
                    pb::add("ur", &info),
                    vec![regular.as_raw_fd()],
                    "regular file outside nsfs",
                ),
                (
                    "UTS namespace as netns",
                    pb::add("uu", &info),
                    vec![uts.as_raw_fd()],
                    "UTS namespace, not a network namespace",
                ),
                // More fds than the receiver has room for: MSG_CTRUNC, every installed fd closed.
                (
                    "add, 250 fds",
                    pb::add("u250", &info),
                    vec![a; 250],
                    "fds truncated: true",
                ),
            ];
            for (name, bytes, fds, expected) in cases {
                // This thread holds the same fds before the send and after the ack, so any
                // difference is an fd the client kept.
                let before = fd_count();
                raw_send(&sock, &bytes, &fds);
                let (ack, _) = raw_recv(&sock);
                let error = pb::ack_error(&ack);
                assert!(error.contains(expected), "{name}: ack error {error:?}");
                assert_eq!(fd_count(), before, "{name}: the client kept received fds");
            }
            // A valid request still works on the same connection.
            raw_send(&sock, &pb::del("uid-x"), &[]);
            let (ack, _) = raw_recv(&sock);
            assert_eq!(pb::ack_error(&ack), "");
        });

        let mut client = ZdsClient::connect(&path).await.unwrap();
        // Every bad request is acked inside the client; the caller sees only the valid one.
        assert!(matches!(next(&mut client).await, ZdsEvent::Del { uid } if uid == "uid-x"));
        assert!(matches!(
            client.next_event().await,
            Err(ZdsError::Protocol(_))
        ));
        client.ack(Ok(())).await.unwrap();
        assert!(client.ack(Ok(())).await.is_err(), "double ack refused");
        blocking(move || agent.join().unwrap()).await;
        assert!(client.next_event().await.unwrap().is_none());
        drop(client);
        assert_eq!(fd_count(), baseline, "every received fd was closed");
        std::fs::remove_dir_all(dir).unwrap();
    });
}

#[test]
fn restart_hand_over_routes_adds_to_newest_and_dels_to_all() {
    run(async {
        let dir = test_dir("restart");
        let path = dir.join("ztunnel.sock");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            ZdsServer::bind(&path),
            Err(ZdsError::NotASocket { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        // A stale socket left by a previous agent is replaced.
        drop(ZdsServer::bind(&path).unwrap());
        let server = ZdsServer::bind(&path).unwrap();
        server
            .add_pod("uid-1", info("pod-1"), netns())
            .await
            .unwrap();

        async fn snapshot(client: &mut ZdsClient) -> Vec<String> {
            let mut uids = Vec::new();
            loop {
                match next(client).await {
                    ZdsEvent::Add { uid, .. } => uids.push(uid),
                    ZdsEvent::SnapshotSent => {
                        client.ack(Ok(())).await.unwrap();
                        return uids;
                    }
                    other => panic!("unexpected {other:?} in snapshot"),
                }
                client.ack(Ok(())).await.unwrap();
            }
        }
        async fn expect(client: &mut ZdsClient, ack: Result<(), String>) -> ZdsEvent {
            let event = next(client).await;
            client.ack(ack).await.unwrap();
            event
        }

        let mut old = ZdsClient::connect(&path).await.unwrap();
        assert_eq!(snapshot(&mut old).await, ["uid-1"]);
        wait_ready(&server, 1).await;
        let mut new = ZdsClient::connect(&path).await.unwrap();
        assert_eq!(snapshot(&mut new).await, ["uid-1"]);
        wait_ready(&server, 2).await;

        // add → newest only.
        let (added, event) = tokio::join!(
            server.add_pod("uid-2", info("pod-2"), netns()),
            expect(&mut new, Ok(()))
        );
        added.unwrap();
        assert!(matches!(event, ZdsEvent::Add { uid, .. } if uid == "uid-2"));

        // del → both; the old tunnel's next event is this del, so it never saw uid-2.
        let (deleted, on_old, on_new) = tokio::join!(
            server.del_pod("uid-1"),
            expect(&mut old, Ok(())),
            expect(&mut new, Ok(()))
        );
        deleted.unwrap();
        assert!(matches!(on_old, ZdsEvent::Del { uid } if uid == "uid-1"));
        assert!(matches!(on_new, ZdsEvent::Del { uid } if uid == "uid-1"));

        // The newest tunnel's rejection reaches the agent verbatim; the pod stays cached.
        let (added, _) = tokio::join!(
            server.add_pod("uid-3", info("pod-3"), netns()),
            expect(&mut new, Err("no room in pod-3".into()))
        );
        assert!(
            matches!(added, Err(ZdsError::Rejected { error, .. }) if error == "no room in pod-3")
        );

        // The newest tunnel restarts: its successor gets the cache replayed.
        drop(new);
        let mut newer = ZdsClient::connect(&path).await.unwrap();
        assert_eq!(snapshot(&mut newer).await, ["uid-2", "uid-3"]);
        wait_ready(&server, 2).await;
        let (added, event) = tokio::join!(
            server.add_pod("uid-4", info("pod-4"), netns()),
            expect(&mut newer, Ok(()))
        );
        added.unwrap();
        assert!(matches!(event, ZdsEvent::Add { uid, .. } if uid == "uid-4"));
        let (deleted, on_old, on_newer) = tokio::join!(
            server.del_pod("uid-4"),
            expect(&mut old, Ok(())),
            expect(&mut newer, Ok(()))
        );
        deleted.unwrap();
        assert!(matches!(on_old, ZdsEvent::Del { uid } if uid == "uid-4"));
        assert!(matches!(on_newer, ZdsEvent::Del { uid } if uid == "uid-4"));
        assert_eq!(server.cached_pods(), ["uid-2", "uid-3"]);
        std::fs::remove_dir_all(dir).unwrap();
    });
}

// --- hostile tunnels against the agent side (issue 11, finding 3; reliability case 39) ---

/// A raw tunnel-side socket on the runtime. Non-blocking connect: when the agent's backlog is full
/// a blocking one would wait for an accept that this same runtime has to run.
async fn async_connect(path: &Path) -> SeqpacketSocket {
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        match connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()) {
            Ok(()) => return SeqpacketSocket::from_fd(fd).unwrap(),
            Err(nix::errno::Errno::EAGAIN) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(e) => panic!("connect to the agent: {e}"),
        }
    }
}

/// Next datagram as (bytes, number of fds), the fds closed; `None` at EOF.
async fn async_recv(sock: &SeqpacketSocket) -> Option<(Vec<u8>, usize)> {
    match tokio::time::timeout(GUARD, wire::recv(sock))
        .await
        .expect("nothing from the agent in time")
        .expect("receive from the agent")
    {
        Datagram::Message { bytes, fds } => Some((bytes, fds.len())),
        Datagram::Eof => None,
    }
}

/// A well-behaved tunnel on the runtime: acks everything, reports each add's uid.
fn good_tunnel(path: &Path) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let path = path.to_owned();
    tokio::spawn(async move {
        let mut client = ZdsClient::connect(&path).await.unwrap();
        while let Ok(Some(event)) = client.next_event().await {
            if let ZdsEvent::Add { uid, .. } = event {
                let _ = tx.send(uid);
            }
            client.ack(Ok(())).await.unwrap();
        }
    });
    rx
}

#[test]
fn server_closes_fds_it_never_asked_for_and_drops_the_sender() {
    run(async {
        let dir = test_dir("unasked");
        let path = dir.join("ztunnel.sock");
        let server = ZdsServer::bind(&path).unwrap();
        let ns = netns();
        let baseline = fd_count();

        // Fds on the hello: a few, and more than the agent's room (MSG_CTRUNC).
        for count in [3, 250] {
            let sock = async_connect(&path).await;
            let fds = vec![ns.as_fd(); count];
            wire::send(&sock, &pb::hello_v1(), &fds).await.unwrap();
            assert_eq!(
                async_recv(&sock).await,
                None,
                "a hello with {count} fds must get the connection closed, not a snapshot"
            );
            drop(sock);
            assert_eq!(fd_count(), baseline, "hello with {count} fds: fds kept");
        }

        // Fds on an ack, then fds sent unsolicited by an established tunnel.
        for unsolicited in [false, true] {
            let sock = async_connect(&path).await;
            wire::send(&sock, &pb::hello_v1(), &[]).await.unwrap();
            let (bytes, fds) = async_recv(&sock).await.expect("snapshot_sent");
            assert_eq!((bytes, fds), (pb::snapshot_sent(), 0));
            let with_fds = vec![ns.as_fd(); 2];
            if unsolicited {
                wire::send(&sock, &pb::ack(""), &[]).await.unwrap();
                wait_ready(&server, 1).await;
                wire::send(&sock, &pb::ack(""), &with_fds).await.unwrap();
            } else {
                wire::send(&sock, &pb::ack(""), &with_fds).await.unwrap();
            }
            assert_eq!(async_recv(&sock).await, None, "unsolicited={unsolicited}");
            drop(sock);
            wait_ready(&server, 0).await;
            assert_eq!(fd_count(), baseline, "unsolicited={unsolicited}: fds kept");
        }

        // The agent is still whole: a good tunnel gets a pod.
        let mut adds = good_tunnel(&path);
        wait_ready(&server, 1).await;
        assert_eq!(
            server.add_pod("uid-ok", info("ok"), netns()).await.unwrap(),
            Delivery::Acked
        );
        assert_eq!(adds.recv().await.unwrap(), "uid-ok");
        std::fs::remove_dir_all(dir).unwrap();
    });
}

#[test]
fn never_acking_tunnel_gets_no_netns_and_cannot_hold_pod_adds() {
    run_paused(async {
        let dir = test_dir("silent");
        let path = dir.join("ztunnel.sock");
        let server = ZdsServer::bind(&path).unwrap();
        let mut adds = good_tunnel(&path);
        wait_ready(&server, 1).await;

        // 1. Silent from the first request on: it gets snapshot_sent (no fd) and nothing else,
        //    while a pod added meanwhile goes to the good tunnel at once.
        let silent = async_connect(&path).await;
        wire::send(&silent, &pb::hello_v1(), &[]).await.unwrap();
        assert_eq!(async_recv(&silent).await, Some((pb::snapshot_sent(), 0)));
        let start = tokio::time::Instant::now();
        let delivery = server.add_pod("uid-1", info("pod-1"), netns()).await;
        assert_eq!(delivery.unwrap(), Delivery::Acked);
        assert!(
            start.elapsed() < ACK_TIMEOUT,
            "the silent tunnel held the add"
        );
        assert_eq!(adds.recv().await.unwrap(), "uid-1");
        assert_eq!(
            async_recv(&silent).await,
            None,
            "dropped, having received no fd"
        );
        assert!(
            start.elapsed() <= ACK_TIMEOUT,
            "dropped by its ack deadline"
        );

        // 2. Silent after the hello with a pod cached: the protocol gives it that one snapshot
        //    add (one fd) and nothing more; later pods go to the good tunnel.
        let silent = async_connect(&path).await;
        wire::send(&silent, &pb::hello_v1(), &[]).await.unwrap();
        let (bytes, fds) = async_recv(&silent).await.unwrap();
        assert_eq!((expect_add(&bytes).0, fds), ("uid-1".to_owned(), 1));
        let start = tokio::time::Instant::now();
        let delivery = server.add_pod("uid-2", info("pod-2"), netns()).await;
        assert_eq!(delivery.unwrap(), Delivery::Acked);
        assert!(start.elapsed() < ACK_TIMEOUT);
        assert_eq!(adds.recv().await.unwrap(), "uid-2");
        assert_eq!(
            async_recv(&silent).await,
            None,
            "nothing beyond the first add"
        );

        // 3. Acks its snapshot, then goes silent: as the newest ready tunnel it is tried first,
        //    dropped at the ack deadline, and the pod goes to the good tunnel.
        let stalled = async_connect(&path).await;
        wire::send(&stalled, &pb::hello_v1(), &[]).await.unwrap();
        for _ in 0..3 {
            async_recv(&stalled).await.expect("snapshot request");
            wire::send(&stalled, &pb::ack(""), &[]).await.unwrap();
        }
        wait_ready(&server, 2).await;
        let start = tokio::time::Instant::now();
        let delivery = server.add_pod("uid-3", info("pod-3"), netns()).await;
        assert_eq!(delivery.unwrap(), Delivery::Acked);
        assert!(start.elapsed() >= ACK_TIMEOUT && start.elapsed() < 2 * ACK_TIMEOUT);
        assert_eq!(adds.recv().await.unwrap(), "uid-3");
        assert_eq!(server.connected_tunnels(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    });
}

#[test]
fn connections_beyond_the_cap_are_closed_and_the_good_tunnel_keeps_working() {
    run_paused(async {
        let dir = test_dir("cap");
        let path = dir.join("ztunnel.sock");
        let server = ZdsServer::bind(&path).unwrap();
        let mut adds = good_tunnel(&path);
        wait_ready(&server, 1).await;
        let baseline = fd_count();

        // Connections that never say hello: the good tunnel holds one slot, these get the rest
        // and every further one is closed on accept.
        let flood = 4 * MAX_TUNNEL_CONNECTIONS;
        let mut socks = Vec::new();
        for _ in 0..flood {
            socks.push(async_connect(&path).await);
        }
        let mut closed = 0;
        for sock in &socks {
            if let Ok(datagram) =
                tokio::time::timeout(Duration::from_millis(100), wire::recv(sock)).await
            {
                assert!(matches!(datagram, Ok(Datagram::Eof)), "{datagram:?}");
                closed += 1;
            }
        }
        assert_eq!(closed, flood - (MAX_TUNNEL_CONNECTIONS - 1));

        // Meanwhile the established tunnel still gets pods.
        let delivery = server.add_pod("uid-1", info("pod-1"), netns()).await;
        assert_eq!(delivery.unwrap(), Delivery::Acked);
        assert_eq!(adds.recv().await.unwrap(), "uid-1");

        // The silent ones lose their slots at the hello deadline; a new tunnel then gets in.
        tokio::time::sleep(HELLO_TIMEOUT).await;
        for sock in &socks {
            assert!(matches!(wire::recv(sock).await, Ok(Datagram::Eof)));
        }
        drop(socks);
        assert_eq!(
            fd_count(),
            baseline + 1,
            "the flood left fds behind (the one more is uid-1's cached netns)"
        );
        let mut second = good_tunnel(&path);
        assert_eq!(
            second.recv().await.unwrap(),
            "uid-1",
            "snapshot of the new tunnel"
        );
        wait_ready(&server, 2).await;
        std::fs::remove_dir_all(dir).unwrap();
    });
}

/// A restarting agent rebuilds its pods behind the gate: a tunnel that connects meanwhile is held
/// after its hello, and its snapshot, once the gate opens, holds every pod added before.
#[test]
fn a_gated_server_holds_the_snapshot_until_the_pods_are_rebuilt() {
    run(async {
        let dir = test_dir("gate");
        let path = dir.join("zds.sock");
        let server = ZdsServer::bind_gated(&path).unwrap();
        let mut client = ZdsClient::connect(&path).await.unwrap();
        // Nothing arrives while the gate is closed (a partial snapshot would be the bug).
        let early = tokio::time::timeout(Duration::from_millis(300), client.next_event()).await;
        assert!(early.is_err(), "the held tunnel got {early:?}");
        assert_eq!(server.connected_tunnels(), 0);
        for (uid, name) in [("u1", "a"), ("u2", "b")] {
            let delivery = server.add_pod(uid, info(name), netns()).await.unwrap();
            assert_eq!(
                delivery,
                Delivery::Cached,
                "no tunnel is ready behind the gate"
            );
        }
        server.open_gate();
        for want in ["u1", "u2"] {
            match next(&mut client).await {
                ZdsEvent::Add { uid, .. } => assert_eq!(uid, want),
                other => panic!("expected the add of {want}, got {other:?}"),
            }
            client.ack(Ok(())).await.unwrap();
        }
        assert!(matches!(next(&mut client).await, ZdsEvent::SnapshotSent));
        client.ack(Ok(())).await.unwrap();
        wait_ready(&server, 1).await;
        drop(client);
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    });
}
