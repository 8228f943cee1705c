//! Tier (c): sockets made through `PodNetns` live in the pod's network namespace.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zmesh::netns::PodNetns;
use zmesh::socket::{dial_in, listen_in, DialOptions};
use zmesh_testbed::{is_root, Netns};

fn open_ns(ns: &Netns) -> OwnedFd {
    std::fs::File::open(ns.path()).unwrap().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_and_dials_are_created_inside_the_pod_netns() {
    assert!(is_root(), "needs root to create network namespaces");
    let pod = Netns::new("zip").unwrap();
    let pod_ns = PodNetns::new(open_ns(&pod), "pod").unwrap();

    // A listener made through PodNetns is reachable from inside the pod...
    let l = listen_in(&pod_ns, "127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let inside = pod.connect_tcp(addr).map(|mut s| s.write_all(b"in"));
    let (mut s, _) = l.accept().await.unwrap();
    inside.unwrap().unwrap();
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"in");
    // ...and not from ours: nothing of the pod's loopback exists here.
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "pod listener reachable from the node netns"
    );

    // A dial made through PodNetns originates inside the pod.
    let app = pod.listen_tcp("127.0.0.1:0").unwrap();
    let app_addr: SocketAddr = app.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = app.accept().unwrap();
        let mut b = [0u8; 3];
        s.read_exact(&mut b).unwrap();
        b
    });
    let mut c = dial_in(Some(&pod_ns), app_addr, DialOptions::default())
        .await
        .unwrap();
    c.write_all(b"out").await.unwrap();
    assert_eq!(&server.join().unwrap(), b"out");
}

#[test]
fn namespace_identity_is_device_and_inode() {
    assert!(is_root(), "needs root to create network namespaces");
    let a = Netns::new("zid").unwrap();
    let b = Netns::new("zid").unwrap();
    let a1 = PodNetns::new(open_ns(&a), "a1").unwrap();
    let a2 = PodNetns::new(open_ns(&a), "a2").unwrap();
    let b1 = PodNetns::new(open_ns(&b), "b1").unwrap();
    assert_eq!(
        a1.id(),
        a2.id(),
        "two fds of one netns are the same pod netns"
    );
    assert_ne!(a1.id(), b1.id());
    // A PodNetns whose fd is not a namespace fails to enter it, with an error.
    let not_ns: OwnedFd = std::fs::File::open("/proc/self/stat").unwrap().into();
    assert!(PodNetns::new(not_ns, "bad").is_err());
}
