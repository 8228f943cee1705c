//! Compiles defs/ into Rust at build time with protox (a protobuf compiler written in Rust, so a
//! fresh machine needs no protoc) and tonic-build (messages via prost, gRPC clients and servers).

use std::path::PathBuf;

const FILES: &[&str] = &[
    "envoy/service/discovery/v3/discovery.proto",
    "istio/workload/workload.proto",
    "istio/workload/zds/zds.proto",
    "istio/security/authorization.proto",
    "istio/ca/ca.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("defs");
    let files: Vec<PathBuf> = FILES.iter().map(|f| root.join(f)).collect();
    println!("cargo:rerun-if-changed={}", root.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    tonic_build::configure()
        // Ordered, so a workload encodes to the same bytes every time: the xDS server versions
        // each resource by a hash of its encoding (a HashMap's order differs per instance).
        .btree_map([".istio.workload.Workload.services"])
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
