//! In-pod scale: node RSS per added pod and the time from a ZDS `add` to its ack (the pod proxy
//! is up: listeners bound inside the pod's netns), for N pods (default 50).
//!
//! `cargo bench --bench pods [-- N]`. The pods here are bare network namespaces: the figure
//! is the tunnel's own cost per pod (listeners, pool, netns thread), not the pod's traffic.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use zmesh_redirect::zds::{WorkloadInfo, ZdsServer};
use zmesh_testbed::Netns;

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()
        .context("VmRSS value")
}

// Multi-thread: the agent side must keep serving while this thread blocks on process logs.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    ensure!(
        zmesh_testbed::is_root(),
        "creates network namespaces: run as root"
    );
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50);
    let node = Netns::new("zsn")?;
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    zmesh::identity::FileCa::init(&ca, "cluster.local")?;
    let zds = dir.path().join("zds.sock");
    let agent = ZdsServer::bind(&zds)?;
    let mut cfg = format!(
        "node:\n  name: node-1\n  mode: in_pod\n  zds_socket: {}\n  access_log: off\n  certificates:\n    file_ca: {{ dir: {} }}\nworkloads:\n",
        zds.display(),
        ca.display()
    );
    for i in 0..n {
        cfg += &format!(
            "  - {{ uid: pod-{i}, name: p{i}, namespace: scale, service_account: sa{}, addresses: [10.219.{}.{}], node: node-1 }}\n",
            i % 10,
            i / 200,
            i % 200 + 2
        );
    }
    let cfg_path = dir.path().join("node.yaml");
    std::fs::write(&cfg_path, cfg)?;
    let zn = node.spawn(
        env!("CARGO_BIN_EXE_zmesh-node"),
        &["run", "--config", cfg_path.to_str().context("path")?],
        &[],
    )?;
    zn.wait_for_log("ZDS snapshot complete", Duration::from_secs(10))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(zn.pid())?;
    let mut pods = Vec::new();
    let mut add_times = Vec::new();
    for i in 0..n {
        let ns = Netns::new("zsp")?;
        let fd: std::os::fd::OwnedFd = std::fs::File::open(ns.path())?.into();
        let info = WorkloadInfo {
            name: format!("p{i}"),
            namespace: "scale".into(),
            service_account: format!("sa{}", i % 10),
        };
        let t = Instant::now();
        agent.add_pod(format!("pod-{i}"), info, fd).await?;
        add_times.push(t.elapsed());
        pods.push(ns);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(zn.pid())?;
    add_times.sort();
    println!("| pods | node RSS before | after | per pod | ZDS add→ack p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {n} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:?} | {:?} |",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after - before) as f64 / n as f64,
        add_times[n / 2],
        add_times[(n * 99 / 100).min(n - 1)]
    );
    drop(zn);
    Ok(())
}
