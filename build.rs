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
//!
//! Code layout (`link/zmesh-node.ld`). The kernel maps code into a process 64 KiB at a time
//! around each page that runs, and all of it counts in RSS; the functions the node runs at
//! startup and on the data path were spread over nearly all of its text. The script, generated
//! from a profile by `scripts/link-order.sh`, puts them side by side at the front (GNU ld and lld
//! read it alike; mold and gold do not, and link without it; `zmesh_testbed::link_order` has the
//! details). Every profile links zmesh-node with it, so the binary every test runs is laid out
//! by the same script (by its globs: only the profiled build's own hashes match its exact
//! symbols), and `tests/link_order.rs` checks that it was. `ZMESH_NO_LINK_ORDER=1` leaves it
//! out.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ZMESH_NO_RELR");
    println!("cargo:rerun-if-env-changed=ZMESH_NO_LINK_ORDER");
    // The directory, not the file: a missing file would count as changed at every build.
    println!("cargo:rerun-if-changed=link");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    let linux_gnu = linux && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    let cross = std::env::var("TARGET").ok() != std::env::var("HOST").ok();
    if std::env::var_os("ZMESH_NO_RELR").is_none()
        && linux_gnu
        && !cross
        && host_glibc().is_some_and(|v| v >= (2, 36))
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    // mold and gold take no SECTIONS/INSERT script: such a build goes without the layout.
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let other_linker = flags.split('\x1f').find(|f| {
        (f.contains("fuse-ld=") || f.contains("ld-path="))
            && (f.ends_with("mold") || f.ends_with("gold"))
    });
    if let Some(linker) = other_linker {
        println!("cargo:warning=zmesh-node is linked without its code layout ({LINK_ORDER}): {linker} does not read it");
    } else if std::env::var_os("ZMESH_NO_LINK_ORDER").is_none() && linux {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        let script = std::path::Path::new(&dir).join(LINK_ORDER);
        // A checkout without the script builds with the default layout, as before it existed.
        if script.is_file() {
            // -Xlinker pairs, not -Wl, which would split a path at its commas.
            for arg in ["-Xlinker", "-T", "-Xlinker", &script.display().to_string()] {
                println!("cargo:rustc-link-arg-bin=zmesh-node={arg}");
            }
        }
    }
}

/// The node's code-layout script, relative to the package.
const LINK_ORDER: &str = "link/zmesh-node.ld";

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
