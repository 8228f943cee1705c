//! Stamps the build with the git commit it was made from (`ZMESH_GIT_SHA`, read by
//! `zmesh_redirect::GIT_SHA` and so by every zmesh binary's `--version`, start line and
//! `zmesh_build_info`).
//!
//! Sources, in order: a `ZMESH_GIT_SHA` set by whoever builds (a release pipeline building from
//! a tarball, where there is no `.git`); `git rev-parse --short HEAD`; else `unknown`. The
//! script asks git itself where HEAD and its branch ref live, so it also reruns after a commit
//! in a linked worktree (whose `.git` is a file, not a directory) and after `git gc` packs the
//! refs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the build reports when it cannot tell: no git binary, no repository (tarball).
const UNKNOWN: &str = "unknown";

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env_dir())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn env_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
}

/// `p` as git printed it (relative to the crate directory, or absolute).
fn from_crate(p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        env_dir().join(p)
    }
}

/// Watches `p` when it exists: cargo reruns a script on every build while a watched path is
/// missing, which would rebuild every crate above this one each time.
fn watch(p: &Path) {
    if p.exists() {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ZMESH_GIT_SHA");
    let given = std::env::var("ZMESH_GIT_SHA")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let sha = given.or_else(|| {
        let sha = git(&["rev-parse", "--short", "HEAD"])?;
        // Rerun when HEAD moves: HEAD itself (checkout), the branch ref it names (commit), and
        // packed-refs (where that ref lives after `git gc`).
        if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
            watch(&from_crate(&dir).join("HEAD"));
        }
        if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
            let common = from_crate(&common);
            watch(&common.join("packed-refs"));
            if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watch(&common.join(r));
            }
        }
        Some(sha)
    });
    // Only characters a label value and a version string can carry unescaped.
    let sha: String = sha
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(40)
        .collect();
    let sha = if sha.is_empty() { UNKNOWN.into() } else { sha };
    println!("cargo:rustc-env=ZMESH_GIT_SHA={sha}");
}
