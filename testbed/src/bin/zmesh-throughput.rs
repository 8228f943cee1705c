//! One bulk stream across the two-node host mesh, through both tunnels and over direct TCP on the
//! same veth, in one run. Prints Gbit/s for each and the ratio.
//!
//! Usage: zmesh-throughput [PATH-TO-zmesh-node] [MiB]   (default: next to this binary, 1024 MiB)
//!        zmesh-throughput PATH-TO-zmesh-node conns N    (N new connections, 1 byte each way, 4 clients)
//!        zmesh-throughput PATH-TO-zmesh-node plain MiB  (non-mesh client -> B's :15006 -> app: TCP-to-TCP)

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use zmesh_testbed::mesh::{connect_uncaptured, HostMesh, APP_PORT, B_IP};
use zmesh_testbed::Netns;

/// Direct TCP uses a port the capture rules leave alone, from a socket carrying the tunnel's
/// mark so node A's outbound capture skips it too.
const DIRECT_PORT: u16 = 9000;
const CHUNK: usize = 256 * 1024;

fn sink(ns: &Netns, port: u16) -> Result<std::thread::JoinHandle<u64>> {
    let l = ns.listen_tcp(format!("{B_IP}:{port}"))?;
    Ok(std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        let _ = s.write_all(b"k");
        n
    }))
}

fn send(mut c: TcpStream, bytes: u64) -> Result<f64> {
    let buf = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        c.write_all(&buf[..k])?;
        left -= k as u64;
    }
    c.shutdown(Shutdown::Write)?;
    // Wait for the receiver's acknowledgement: the clock stops when every byte has arrived.
    let mut ack = [0u8; 1];
    c.read_exact(&mut ack)?;
    Ok(start.elapsed().as_secs_f64())
}

/// utime + stime of a process, in clock ticks (USER_HZ, 100 on Linux).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let f: Vec<&str> = stat[stat.rfind(')').context("stat")? + 2..]
        .split_whitespace()
        .collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let bin = match args.next() {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?
            .parent()
            .context("no dir")?
            .join("zmesh-node"),
    };
    let second = args.next();
    if second.as_deref() == Some("plain") {
        let mib: u64 = args.next().context("plain MiB")?.parse()?;
        return plaintext(&bin, mib << 20);
    }
    if second.as_deref() == Some("conns") {
        let n: usize = args.next().context("conns N")?.parse()?;
        return conn_rate(&bin, n);
    }
    let mib: u64 = second.map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let bytes = mib << 20;
    let mesh = HostMesh::start(&bin, "off")?;

    let t = sink(&mesh.b, APP_PORT)?;
    let c = mesh.a.connect_tcp(format!("{B_IP}:{APP_PORT}"))?;
    let cpu_before = (cpu_ticks(mesh.node_a.pid())?, cpu_ticks(mesh.node_b.pid())?);
    let tunnel_s = send(c, bytes)?;
    let cpu_after = (cpu_ticks(mesh.node_a.pid())?, cpu_ticks(mesh.node_b.pid())?);
    ensure!(t.join().expect("sink") == bytes, "tunnel lost bytes");

    let t = sink(&mesh.b, DIRECT_PORT)?;
    let c = connect_uncaptured(&mesh.a, format!("{B_IP}:{DIRECT_PORT}").parse()?)?;
    let direct_s = send(c, bytes)?;
    ensure!(t.join().expect("sink") == bytes, "direct lost bytes");

    let gbps = |s: f64| bytes as f64 * 8.0 / s / 1e9;
    println!("| path | MiB | seconds | Gbit/s |");
    println!("|---|---|---|---|");
    println!(
        "| two tunnels (HBONE) | {mib} | {tunnel_s:.2} | {:.2} |",
        gbps(tunnel_s)
    );
    println!(
        "| direct TCP, same veth | {mib} | {direct_s:.2} | {:.2} |",
        gbps(direct_s)
    );
    println!("\nratio tunnel/direct: {:.2}", direct_s / tunnel_s);
    let gb = bytes as f64 / 1e9;
    println!(
        "node CPU-seconds per GB: A {:.3}, B {:.3}",
        (cpu_after.0 - cpu_before.0) as f64 / 100.0 / gb,
        (cpu_after.1 - cpu_before.1) as f64 / 100.0 / gb
    );
    Ok(())
}

/// New connections through the tunnel as fast as 4 clients can make them, for profiling the
/// per-connection cost (the system benchmark reports the same figure side by side).
fn conn_rate(bin: &std::path::Path, n: usize) -> Result<()> {
    let mesh = HostMesh::start(bin, "off")?;
    for ns in [&mesh.a, &mesh.b] {
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    let l = mesh.b.listen_tcp(format!("{B_IP}:{APP_PORT}"))?;
    for _ in 0..4 {
        let l = l.try_clone()?;
        std::thread::spawn(move || loop {
            let Ok((mut s, _)) = l.accept() else { return };
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {
                let _ = s.read(&mut b);
            }
        });
    }
    let done = std::sync::atomic::AtomicUsize::new(0);
    let before = (cpu_ticks(mesh.node_a.pid())?, cpu_ticks(mesh.node_b.pid())?);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let mut c = mesh
                        .a
                        .connect_tcp(format!("{B_IP}:{APP_PORT}"))
                        .expect("connect");
                    let mut b = [1u8; 1];
                    c.write_all(&b).expect("write");
                    c.read_exact(&mut b).expect("read");
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let after = (cpu_ticks(mesh.node_a.pid())?, cpu_ticks(mesh.node_b.pid())?);
    println!("{n} connections in {secs:.2} s: {:.0}/s", n as f64 / secs);
    println!(
        "node CPU per connection: A {:.0} µs, B {:.0} µs",
        (after.0 - before.0) as f64 * 1e4 / n as f64,
        (after.1 - before.1) as f64 * 1e4 / n as f64
    );
    Ok(())
}

/// A non-mesh client (a socket node A's capture skips) sends to B's app port, which B captures to
/// its plaintext inbound listener: the TCP-to-TCP relay path.
fn plaintext(bin: &std::path::Path, bytes: u64) -> Result<()> {
    let mesh = HostMesh::start(bin, "off")?;
    let t = sink(&mesh.b, APP_PORT)?;
    let c = connect_uncaptured(&mesh.a, format!("{B_IP}:{APP_PORT}").parse()?)?;
    let before = cpu_ticks(mesh.node_b.pid())?;
    let secs = send(c, bytes)?;
    let after = cpu_ticks(mesh.node_b.pid())?;
    ensure!(
        t.join().expect("sink") == bytes,
        "plaintext relay lost bytes"
    );
    let gb = bytes as f64 / 1e9;
    println!(
        "plaintext inbound relay: {:.2} Gbit/s, node B {:.3} CPU-s/GB",
        bytes as f64 * 8.0 / secs / 1e9,
        (after - before) as f64 / 100.0 / gb
    );
    Ok(())
}
