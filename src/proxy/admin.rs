//! The admin server, on the loopback interface only (:15000): never reachable from a pod or
//! another machine, because it shows the node's whole configuration.
//!
//! - `GET /config_dump`: JSON with the effective node settings, workloads, services, policies,
//!   certificates (identity, serial, validity: never keys), pooled connections and counters.
//! - `GET /logging` shows the log filter; `POST /logging?level=<filter>` replaces it.
//! - `POST /quitquitquit` asks the process to stop (the same drain as SIGTERM).
//! - `GET /debug/memory`: the process's memory as text: which allocator serves (jemalloc in the
//!   binaries, built without statistics; glibc's `mallinfo2` counters where glibc serves) and
//!   the kernel's VmRSS/VmHWM/VmData/RssAnon/RssFile. No heap profiler is built in, so there is no pprof
//!   profile: `GET /debug/pprof/heap` (ztunnel's path, a jemalloc profile there) answers 501 and
//!   points here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::Node;

type Body = http_body_util::Full<Bytes>;

/// Changes the process's log filter at runtime (the binary owns the subscriber).
pub trait LogControl: Send + Sync {
    fn current(&self) -> String;
    fn set(&self, filter: &str) -> Result<(), String>;
}

/// Where the admin server listens: loopback only. A node bound to a loopback address (tests,
/// several nodes on one machine) keeps its admin on that address; any other node uses
/// 127.0.0.1.
pub fn admin_addr(bind: IpAddr, port: u16) -> SocketAddr {
    let ip = if bind.is_loopback() {
        bind
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    };
    SocketAddr::new(ip, port)
}

fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The node's state as JSON. Certificates appear by identity, serial and validity only.
pub fn config_dump(node: &Node) -> serde_json::Value {
    let state = node.state();
    let n = &node.cfg.node;
    let workloads: Vec<_> = state
        .model
        .workloads()
        .iter()
        .map(|w| {
            json!({
                "uid": w.uid, "name": w.name, "namespace": w.namespace,
                "identity": w.identity.to_string(), "addresses": w.addresses,
                "node": w.node, "protocol": format!("{:?}", w.protocol),
                "healthy": w.healthy, "capacity": w.capacity, "waypoint": w.waypoint,
                "proxy_tunnel_port": w.proxy_tunnel.map(|t| t.port.unwrap_or(0)),
                "services": w.services.keys().collect::<Vec<_>>(),
            })
        })
        .collect();
    let services: Vec<_> = state
        .model
        .services()
        .iter()
        .map(|s| {
            json!({
                "name": s.name, "namespace": s.namespace, "hostname": s.hostname,
                "vips": s.vips, "auto_vip": s.auto_vip, "ports": s.ports, "waypoint": s.waypoint,
                "endpoints": s.endpoints.iter().map(|w| w.uid.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let policies: Vec<_> = state
        .policies
        .summary()
        .into_iter()
        .map(|(name, valid)| json!({"name": name, "enforced_as": if valid { "written" } else { "deny-all (broken)" }}))
        .collect();
    let errors: Vec<_> = state
        .policies
        .errors()
        .iter()
        .map(|e| e.to_string())
        .collect();
    let certificates: Vec<_> = node
        .certs
        .cached()
        .iter()
        .map(|c| {
            json!({
                "identity": c.identity.to_string(), "serial": c.serial,
                "not_before": rfc3339(c.not_before), "not_after": rfc3339(c.not_after),
            })
        })
        .collect();
    let trust = node.certs.trust();
    let pool: Vec<_> = node
        .pool
        .connection_serials()
        .into_iter()
        .map(|(peer, serial, draining)| json!({"peer": peer, "cert_serial": serial, "draining": draining}))
        .collect();
    let pods: Vec<_> = node
        .pods
        .lock()
        .expect("pods lock poisoned")
        .iter()
        .map(|p| {
            let w = p.workload.borrow().clone();
            let w = w.as_ref();
            json!({
                "uid": p.uid, "workload": w.map(|w| w.name.clone()),
                "namespace": w.map(|w| w.namespace.clone()),
                "identity": w.map(|w| w.identity.to_string()),
                "zds_identity": p.zds_identity.as_ref().map(|i| i.to_string()),
                "state": if w.is_some() { "serving" } else { "waiting_for_workload" },
                "netns": format!("{}:{}", p.netns_id.0, p.netns_id.1),
                "pool_connections": p.pool.connections(),
            })
        })
        .collect();
    json!({
        "pod_proxies": pods,
        "node": {
            "name": n.name.0, "trust_domain": n.trust_domain.0, "cluster": n.cluster.0,
            "bind": n.bind, "mode": format!("{:?}", n.mode),
            "ports": {"hbone": n.ports.hbone, "outbound": n.ports.outbound,
                      "inbound_plaintext": n.ports.inbound_plaintext,
                      "readiness": n.ports.readiness, "metrics": n.ports.metrics, "admin": n.ports.admin},
            "inbound_plaintext": format!("{:?}", n.inbound_plaintext),
            "registry_only": n.registry_only, "original_source": n.original_source,
            "network": n.network.0,
            "east_west_gateway": n.east_west_gateway.as_ref().map(|g| serde_json::json!({
                "workload": g.workload.0, "expose": g.expose.iter().map(|e| e.0.clone()).collect::<Vec<_>>()})),
            "access_log": format!("{:?}", n.access_log),
            "worker_threads": n.worker_threads, "drain_timeout_s": n.drain_timeout.as_secs_f64(),
            "handshake_timeout_s": n.handshake_timeout.as_secs_f64(),
            "ping_interval_s": n.ping_interval.as_secs_f64(),
            "ping_timeout_s": n.ping_timeout.as_secs_f64(),
            "crl": n.crl,
            "dns": {"enabled": n.dns.enabled, "bind": n.dns.bind, "port": n.dns.port,
                    "upstreams": n.dns.upstreams, "resolv_conf": n.dns.resolv_conf,
                    "vip_range": n.dns.vip_range.to_string(), "cluster_domain": n.dns.cluster_domain,
                    "upstream_timeout_s": n.dns.upstream_timeout.as_secs_f64(),
                    "max_inflight": n.dns.max_inflight, "max_tcp_connections": n.dns.max_tcp_connections,
                    "tcp_idle_timeout_s": n.dns.tcp_idle_timeout.as_secs_f64(), "ttl": n.dns.ttl},
        },
        "ready": node.is_ready(),
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "policy_errors": errors,
        "certificates": certificates,
        "trust": {"roots": trust.roots().len(), "crls": trust.crl_count(), "generation": trust.generation},
        "pool": pool,
        "xds": node.xds.get().map(|x| x.dump()),
        "active_connections": node.active_connections(),
    })
}

/// The `/proc/self/status` lines about memory, as the kernel writes them.
const STATUS_KEYS: [&str; 6] = ["VmRSS", "VmHWM", "VmData", "RssAnon", "RssFile", "VmSwap"];

/// `/debug/memory`: allocator statistics and the kernel's memory lines for this process.
pub fn memory_report() -> String {
    let mut out =
        String::from("# zmesh memory (not a pprof profile: no heap profiler is built in)\n");
    match crate::alloc::in_use() {
        crate::alloc::Allocator::System => glibc_stats(&mut out),
        crate::alloc::Allocator::Jemalloc => jemalloc_section(&mut out),
        crate::alloc::Allocator::Mimalloc => {
            out.push_str("## allocator statistics unavailable (mimalloc)\n")
        }
    }
    out.push_str("## kernel (/proc/self/status)\n");
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in status.lines() {
        if let Some((k, v)) = line.split_once(':') {
            if STATUS_KEYS.contains(&k) {
                out.push_str(&format!("{k} {}\n", v.trim()));
            }
        }
    }
    out
}

/// jemalloc is built without its statistics (they cost data-path CPU, benches/RESULTS.md), so
/// the kernel's lines are the measure; glibc's counters would describe an allocator that serves
/// almost nothing here.
fn jemalloc_section(out: &mut String) {
    out.push_str(
        "## allocator: jemalloc, built without its statistics (RssAnon below is the heap's measure)\n",
    );
    out.push_str(&format!(
        "thread_cache_trims {}\nworkers_pending_trim {}\n",
        crate::alloc::trims(),
        crate::alloc::pending_workers()
    ));
}

fn glibc_stats(out: &mut String) {
    match zmesh_redirect::allocator_stats() {
        Some(m) => {
            out.push_str("## allocator (glibc mallinfo2), bytes unless counted\n");
            for (k, v) in [
                ("arena_bytes", m.arena),
                ("in_use_bytes", m.in_use),
                ("free_bytes", m.free),
                ("releasable_bytes", m.releasable),
                ("free_chunks", m.free_chunks),
                ("mmap_chunks", m.mmap_chunks),
                ("mmap_bytes", m.mmap_bytes),
            ] {
                out.push_str(&format!("{k} {v}\n"));
            }
        }
        None => out.push_str("## allocator statistics unavailable (not glibc)\n"),
    }
}

fn reply(status: StatusCode, ctype: &'static str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Body::new(Bytes::from(body)))
        .expect("static response")
}

fn respond(node: &Node, logs: Option<&dyn LogControl>, req: &Request<Incoming>) -> Response<Body> {
    let text = "text/plain";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => {
            let body = serde_json::to_string_pretty(&config_dump(node)).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        (&Method::GET, "/logging") => match logs {
            Some(l) => reply(StatusCode::OK, text, format!("{}\n", l.current())),
            None => reply(
                StatusCode::NOT_IMPLEMENTED,
                text,
                "log control unavailable\n".into(),
            ),
        },
        (&Method::POST, "/logging") => {
            let level = req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("level="))
                    .map(str::to_string)
            });
            match (logs, level) {
                (None, _) => reply(
                    StatusCode::NOT_IMPLEMENTED,
                    text,
                    "log control unavailable\n".into(),
                ),
                (_, None) => reply(
                    StatusCode::BAD_REQUEST,
                    text,
                    "use POST /logging?level=<filter>, e.g. level=info,zmesh=debug\n".into(),
                ),
                (Some(l), Some(level)) => match l.set(&level) {
                    Ok(()) => reply(StatusCode::OK, text, format!("{}\n", l.current())),
                    Err(e) => reply(
                        StatusCode::BAD_REQUEST,
                        text,
                        format!("bad filter {level:?}: {e}\n"),
                    ),
                },
            }
        }
        (&Method::GET, "/debug/memory") => reply(StatusCode::OK, text, memory_report()),
        (&Method::GET, "/debug/pprof/heap") => reply(
            StatusCode::NOT_IMPLEMENTED,
            text,
            "no heap profile: zmesh has no heap profiler built in; allocator statistics are at GET /debug/memory\n".into(),
        ),
        (&Method::POST, "/quitquitquit") => {
            node.quit.notify_one();
            reply(StatusCode::OK, text, "stopping\n".into())
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            text,
            "GET /config_dump, GET|POST /logging, GET /debug/memory, POST /quitquitquit\n".into(),
        ),
    }
}

/// Serves the admin endpoints for the life of the process, within the operator endpoints'
/// limits (header deadline, connection cap). Log control comes from the binary
/// (`Node::log_control`), when it installed one.
pub async fn serve(node: Arc<Node>, listener: tokio::net::TcpListener) {
    let handler = move |req: Request<Incoming>| {
        let logs = node.log_control.get().map(|l| l.as_ref());
        let resp = respond(&node, logs, &req);
        async move { resp }
    };
    super::operator::serve(
        listener,
        super::operator::Limits::default(),
        handler,
        std::future::pending(),
    )
    .await;
}
