//! Compiles the transcoding test service (proto/zmesh/test/shelf.proto) with protox (no protoc
//! on the machine) into a tonic server and client, and writes its FileDescriptorSet (imports
//! included, as `protoc --include_imports --descriptor_set_out` would) into OUT_DIR for the
//! waypoint's config in the tests and the benchmark. Nothing generated is checked in.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", root.display());
    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true);
    compiler.open_file(root.join("zmesh/test/shelf.proto"))?;
    // The encoded set keeps the methods' `google.api.http` options (extension fields that
    // prost_types' MethodOptions would drop).
    std::fs::write(out.join("shelf.fds"), compiler.encode_file_descriptor_set())?;
    let fds = compiler.file_descriptor_set();
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
