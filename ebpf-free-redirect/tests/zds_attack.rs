//! Netns attack suite, ZDS part (tier c; issue 11, finding 3; reliability case 39): the real agent
//! binary against a hostile local client. Descriptors sent where the agent never asks for any (a
//! hello, an ack, the admin socket), far more of them than a message can use, a connection flood,
//! and a FIFO where a netns path belongs. After each, the agent's own fd count (in /proc) is back
//! at its baseline while the attacker's connections are still open, and a well-formed tunnel and
//! `pod add` keep working. Root is required (netns, iptables) and asserted, never skipped.

mod support;

use std::io::{BufRead as _, BufReader, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    connect, recvmsg, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use support::{run_bin_within, text, Agent, FakeTunnel, Ns, Seen, GUARD};
use zmesh_redirect::zds::server::MAX_TUNNEL_CONNECTIONS;

/// The flood of the issue: 79 connections, each with a hello carrying 253 fds (SCM_MAX_FD).
const FLOOD_CONNECTIONS: usize = 79;
const FLOOD_FDS: usize = 253;

/// A low fd limit for the agent, so that on the old code the flood exhausts it within a few
/// connections (EMFILE, and MSG_CTRUNC with the fds that did arrive leaked).
const AGENT_NOFILE: u64 = 256;

fn assert_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the ZDS attack suite needs root (network namespaces, iptables): run it as root, as CI does"
    );
}

fn zds_connect(path: &Path) -> UnixStream {
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

fn send_with_fds(sock: &impl AsRawFd, bytes: &[u8], fds: &[RawFd]) {
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
}

/// One datagram from the agent: `None` at EOF, else its length and how many fds it carried.
fn zds_recv(sock: &UnixStream) -> Option<(usize, usize)> {
    let mut buf = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .expect("the agent neither answered nor closed in time");
    let mut fds = 0;
    for c in msg.cmsgs().unwrap() {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = c {
            fds += raw.len();
            for fd in raw {
                nix::unistd::close(fd).unwrap();
            }
        }
    }
    (msg.bytes > 0 || fds > 0).then_some((msg.bytes, fds))
}

/// ZdsHello{version: V1} and an empty Ack, hand-encoded as on the wire.
const HELLO_V1: [u8; 2] = [0x08, 0x01];
const ACK_OK: [u8; 2] = [0x0a, 0x00];

fn pod_add(agent: &Agent, ns: &Ns, uid: &str) -> std::process::Output {
    let (admin, netns) = (agent.admin.to_str().unwrap(), ns.path());
    let netns = netns.to_str().unwrap();
    run_bin_within(
        GUARD,
        &[
            "pod",
            "add",
            "--netns",
            netns,
            "--uid",
            uid,
            "--name",
            uid,
            "--namespace",
            "shop",
            "--service-account",
            "web",
            "--admin-socket",
            admin,
        ],
        &[],
        "",
    )
}

fn assert_acked(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "pod add failed: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains(r#""tunnel":"acked""#),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn zds_fd_flood_leaves_the_agent_whole() {
    assert_root();
    let agent = Agent::start_with_nofile("flood", AGENT_NOFILE);
    let tunnel = FakeTunnel::connect(&agent.zds, None);
    assert_eq!(tunnel.next(), Seen::SnapshotSent);
    agent.wait_for_tunnels(1);
    let baseline = agent.settled_fd_count();
    let ns_file = std::fs::File::open("/proc/self/ns/net").unwrap();
    let flood_fds = vec![ns_file.as_raw_fd(); FLOOD_FDS];

    // The flood: every connection is closed by the agent (refused at the cap, or dropped for
    // the fds on its hello) and none of the fds stays with it, while the attacker keeps all of
    // its connections open.
    let mut attackers = Vec::new();
    for i in 0..FLOOD_CONNECTIONS {
        let sock = zds_connect(&agent.zds);
        send_with_fds(&sock, &HELLO_V1, &flood_fds);
        assert_eq!(zds_recv(&sock), None, "flood connection {i} was served");
        attackers.push(sock);
    }
    agent.wait_for_fd_count(baseline, "after the hello flood");

    // Meanwhile the established tunnel and `pod add` work.
    let ns = Ns::create("flood");
    assert_acked(&pod_add(&agent, &ns, "uid-flood-0"));
    assert!(
        matches!(tunnel.next(), Seen::Add { uid, netns, .. } if uid == "uid-flood-0" && netns == ns.id())
    );
    // One more fd from now on: the agent caches the pod's netns.
    let baseline = baseline + 1;
    agent.wait_for_fd_count(baseline, "after pod add");

    // Fds on an ack: the connection gets the protocol's snapshot (one add, one fd), then is
    // dropped when its ack carries fds.
    let sock = zds_connect(&agent.zds);
    send_with_fds(&sock, &HELLO_V1, &[]);
    assert!(matches!(zds_recv(&sock), Some((_, 1))), "snapshot add");
    send_with_fds(&sock, &ACK_OK, &flood_fds);
    assert_eq!(
        zds_recv(&sock),
        None,
        "an ack with fds must end the connection"
    );
    agent.wait_for_fd_count(baseline, "after an ack with fds");
    attackers.push(sock);

    // Fds on the admin socket (a JSON line protocol): the request is still answered and the
    // kernel discards the fds, because the agent reads it without a control buffer.
    let admin = UnixStream::connect(&agent.admin).unwrap();
    admin.set_read_timeout(Some(GUARD)).unwrap();
    send_with_fds(&admin, b"{\"op\":\"list\"}\n", &flood_fds);
    let mut reply = String::new();
    BufReader::new(&admin).read_line(&mut reply).unwrap();
    assert!(
        reply.contains(r#""ok":true"#) && reply.contains("uid-flood-0"),
        "{reply}"
    );
    drop(admin);
    agent.wait_for_fd_count(baseline, "after fds on the admin socket");

    // A tunnel that (re)connects now still gets the full snapshot.
    let second = FakeTunnel::connect(&agent.zds, None);
    assert!(matches!(second.next(), Seen::Add { uid, .. } if uid == "uid-flood-0"));
    assert_eq!(second.next(), Seen::SnapshotSent);
    drop(attackers);
}

#[test]
fn connection_cap_refuses_the_excess_while_tunnel_and_pod_add_keep_working() {
    assert_root();
    let agent = Agent::start("cap");
    let tunnel = FakeTunnel::connect(&agent.zds, None);
    assert_eq!(tunnel.next(), Seen::SnapshotSent);
    agent.wait_for_tunnels(1);
    let baseline = agent.settled_fd_count();

    // Silent connections (no hello). The tunnel holds one slot; the next ones take the rest
    // until their hello deadline, and every further one is closed as soon as it is accepted.
    let flood = 8 * MAX_TUNNEL_CONNECTIONS;
    let socks: Vec<_> = (0..flood).map(|_| zds_connect(&agent.zds)).collect();
    let refused = flood - (MAX_TUNNEL_CONNECTIONS - 1);
    let mut closed = vec![false; flood];
    let deadline = Instant::now() + GUARD;
    let mut closed_count = 0;
    while closed_count < refused {
        assert!(
            Instant::now() < deadline,
            "the excess connections were not refused"
        );
        for (sock, closed) in socks.iter().zip(closed.iter_mut()) {
            sock.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 16];
            if let Ok(0) = nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                *closed = true;
            }
        }
        closed_count = closed.iter().filter(|c| **c).count();
        std::thread::sleep(Duration::from_millis(10));
    }
    // Exactly the excess: those within the cap stay open until their hello deadline. (Without a
    // cap nothing closes before that deadline, and then everything does.)
    assert_eq!(
        closed_count, refused,
        "the excess must be refused on accept, not time out together with the rest"
    );
    // The agent holds at most the capped connections (plus its own sockets) during the flood.
    assert!(
        agent.fd_count() <= baseline + MAX_TUNNEL_CONNECTIONS,
        "{} fds during the flood, baseline {baseline}",
        agent.fd_count()
    );
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(
        log.contains("refused a ZDS connection"),
        "no log line: {log}"
    );

    // Meanwhile: the established tunnel gets a pod.
    let ns = Ns::create("cap");
    assert_acked(&pod_add(&agent, &ns, "uid-cap-0"));
    assert!(matches!(tunnel.next(), Seen::Add { uid, .. } if uid == "uid-cap-0"));

    // The silent ones are dropped at the hello deadline; the agent is back to its baseline
    // (plus the cached pod's netns) although the attacker never closed anything.
    agent.wait_for_fd_count(baseline + 1, "after the silent connections' hello deadline");
    drop(socks);
}

#[test]
fn fifo_or_file_at_the_netns_path_fails_fast() {
    let agent = Agent::start("fifo");
    let baseline = agent.settled_fd_count();
    let dir = support::TempDir::new("fifo-netns");
    let fifo = dir.join("netns");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRUSR).unwrap();
    let file = dir.join("file");
    std::fs::write(&file, b"").unwrap();
    let admin = agent.admin.to_str().unwrap();
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"k","type":"zmesh-redirect","admin_socket":"{admin}"}}"#
    );

    for (path, expected) in [(&fifo, "it is a FIFO"), (&file, "outside nsfs")] {
        let netns = path.to_str().unwrap();
        // As the container runtime runs the plugin...
        let out = run_bin_within(
            GUARD,
            &[],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c-fifo"),
                ("CNI_NETNS", netns),
            ],
            &conf,
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains(expected) && stdout.contains(netns),
            "{stdout}"
        );
        // ...and as an operator does.
        let out = run_bin_within(
            GUARD,
            &[
                "pod",
                "add",
                "--netns",
                netns,
                "--uid",
                "u",
                "--name",
                "n",
                "--namespace",
                "ns",
                "--service-account",
                "sa",
                "--admin-socket",
                admin,
            ],
            &[],
            "",
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            text(&out.stderr).contains(expected),
            "{}",
            text(&out.stderr)
        );
    }
    assert!(agent.list().is_empty(), "nothing enrolled");
    agent.wait_for_fd_count(baseline, "after the refused paths");
}
