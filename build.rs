//! Link flags for the shipped binaries (issue #15, idle memory; figures in benches/RESULTS.md).
//!
//! Packed relative relocations (`-z pack-relative-relocs`, DT_RELR). A position-independent Rust
//! binary carries one 24-byte relocation per pointer in its read-only data (vtables, panic
//! locations): about 500 KiB for zmesh-node, which the dynamic loader reads in full at every
//! start, so it stays in the node's RSS. DT_RELR stores the same relocations as bitmaps, a few
//! KiB. The binary then needs glibc 2.36 or later at run time (GLIBC_ABI_DT_RELR), so the flag
//! is used only when the glibc of the machine building it is that new: the images build and run
//! on the same Debian release, and a host build runs where it was built. To build on a new
//! machine for an older host (say, glibc 2.31), set `ZMESH_NO_RELR=1`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ZMESH_NO_RELR");
    if std::env::var_os("ZMESH_NO_RELR").is_some() {
        return;
    }
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    let cross = std::env::var("TARGET").ok() != std::env::var("HOST").ok();
    if linux_gnu && !cross && host_glibc().is_some_and(|v| v >= (2, 36)) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The build machine's glibc version, from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn host_glibc() -> Option<(u32, u32)> {
    let out = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.trim().strip_prefix("glibc ")?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}
