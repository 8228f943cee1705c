//! Tier (b) tests of the ZDS netns hand-off (`shared/spec/capture.md`), no root needed: any fd
//! stands in for a pod netns (`/proc/self/ns/net` of the test process).
//!
//! The interop tests talk to the crate through a protobuf codec written here by hand from the
//! spec's "ZDS message layout" table, NOT through the crate's prost types, so a wrong field number
//! in the crate (e.g. `DelWorkload.uid` must be 2, `keep` must be oneof field 5) fails them.
//! Every test runs under [`run`]: one counts `/proc/self/fd`, which the whole process shares.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    bind, connect, listen, recvmsg, sendmsg, socket, socketpair, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use zmesh_redirect::zds::{WorkloadInfo, ZdsClient, ZdsError, ZdsEvent, ZdsServer};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs one test on its own runtime while holding `SERIAL`, so that no other test's runtime,
/// sockets or fds exist while it counts `/proc/self/fd` (with `#[tokio::test]` the runtimes would
/// be built, and torn down, outside the lock).
fn run(test: impl std::future::Future<Output = ()>) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
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
                    "cannot be used as a network namespace",
                ),
            ];
            for (name, bytes, fds, expected) in cases {
                raw_send(&sock, &bytes, &fds);
                let (ack, _) = raw_recv(&sock);
                let error = pb::ack_error(&ack);
                assert!(error.contains(expected), "{name}: ack error {error:?}");
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
        let mut new = ZdsClient::connect(&path).await.unwrap();
        assert_eq!(snapshot(&mut new).await, ["uid-1"]);
        assert_eq!(server.connected_tunnels(), 2);

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
