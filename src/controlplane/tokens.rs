//! Node bootstrap tokens: how the CA server knows which node is calling.
//!
//! `zmesh-node ca token --node NAME` makes a token (32 random bytes, base64url) and prints it
//! once; the CA directory keeps only its SHA-256 and the node name, one per line in
//! [`TOKENS_FILE`] (mode 0600). A stolen token file therefore lets nobody ask for certificates,
//! and a node's token is worth only the identities of that node's workloads (the server's
//! authorization, not this module, decides that). A presented token is hashed and compared with
//! every entry in constant time, so the time taken says nothing about how close a guess was.
//! The file is re-read when it changes, so `ca token` and `ca token --revoke` take effect on a
//! running server.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;

/// The token store inside the CA directory.
pub const TOKENS_FILE: &str = "node-tokens";
/// Token entropy: 256 bits, as a bearer secret that never expires must not be guessable.
const TOKEN_BYTES: usize = 32;
/// Node names are Kubernetes node names (DNS subdomains) or host names.
const MAX_NODE_NAME: usize = 253;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable or writable by group or others (mode {mode:o}); chmod 600 it")]
    Mode { path: String, mode: u32 },
    #[error("{path}:{line}: not a `<sha256 hex> <node>` entry")]
    Entry { path: String, line: usize },
    #[error("node name {0:?} must be 1-{MAX_NODE_NAME} characters of [A-Za-z0-9._-]")]
    NodeName(String),
    #[error("no random bytes for a token: the system RNG failed")]
    Random,
}

type Digest = [u8; 32];

/// One token's hash and the node it names.
#[derive(Clone)]
struct Entry {
    hash: Digest,
    node: String,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TokenError + '_ {
    move |source| TokenError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn check_node_name(node: &str) -> Result<(), TokenError> {
    let ok = !node.is_empty()
        && node.len() <= MAX_NODE_NAME
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(TokenError::NodeName(node.to_string()))
    }
}

fn sha256(token: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Digest> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Equal without an early exit: every byte is looked at whatever the first difference.
fn same(a: &Digest, b: &Digest) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Refuses a store anyone but its owner can read or write.
fn check_mode(path: &Path) -> Result<(), TokenError> {
    let mode = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Mode {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

fn read_entries(path: &Path) -> Result<Vec<Entry>, TokenError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        // No store yet: no node can authenticate.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    check_mode(path)?;
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || TokenError::Entry {
            path: path.display().to_string(),
            line: i + 1,
        };
        let (h, node) = line.split_once(' ').ok_or_else(bad)?;
        let hash = unhex(h).ok_or_else(bad)?;
        check_node_name(node).map_err(|_| bad())?;
        entries.push(Entry {
            hash,
            node: node.to_string(),
        });
    }
    Ok(entries)
}

/// Makes a token for `node`, records its hash in `dir`'s store and returns the token (which is
/// stored nowhere: show it once).
pub fn create(dir: &Path, node: &str) -> Result<String, TokenError> {
    check_node_name(node)?;
    let mut raw = [0u8; TOKEN_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| TokenError::Random)?;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let path = dir.join(TOKENS_FILE);
    // Existing entries must parse, so a damaged store is noticed now, not by a node later.
    read_entries(&path)?;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    check_mode(&path)?;
    writeln!(f, "{} {node}", hex(&sha256(&token))).map_err(io(&path))?;
    f.sync_all().map_err(io(&path))?;
    Ok(token)
}

/// Removes every token of `node`; returns how many there were.
pub fn revoke(dir: &Path, node: &str) -> Result<usize, TokenError> {
    check_node_name(node)?;
    let path = dir.join(TOKENS_FILE);
    let entries = read_entries(&path)?;
    let kept: Vec<&Entry> = entries.iter().filter(|e| e.node != node).collect();
    let body: String = kept
        .iter()
        .map(|e| format!("{} {}\n", hex(&e.hash), e.node))
        .collect();
    // Written beside and renamed over, so a running server never reads half a file.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(body.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(entries.len() - kept.len())
}

/// What identifies one version of the store: content (size, mtime, inode) and also its mode and
/// ctime, so a `chmod` that exposes it is seen at the next call, not only at the next edit.
type Stamp = Option<(u64, i64, i64, u64, u32)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.mtime(), m.ctime(), m.ino(), m.mode()))
}

/// The server's view of the store, re-read when the file changes.
pub struct NodeTokens {
    path: PathBuf,
    cache: Mutex<Option<(Stamp, Arc<Vec<Entry>>)>>,
}

impl NodeTokens {
    pub fn new(dir: &Path) -> NodeTokens {
        NodeTokens {
            path: dir.join(TOKENS_FILE),
            cache: Mutex::new(None),
        }
    }

    /// Reads the store now (at start, so a broken one stops the server before it serves).
    pub fn check(&self) -> Result<usize, TokenError> {
        Ok(self.entries()?.len())
    }

    fn entries(&self) -> Result<Arc<Vec<Entry>>, TokenError> {
        let now = stamp(&self.path);
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((seen, entries)) = cache.as_ref() {
            if *seen == now {
                return Ok(entries.clone());
            }
        }
        let entries = Arc::new(read_entries(&self.path)?);
        *cache = Some((now, entries.clone()));
        Ok(entries)
    }

    /// The node `token` belongs to, or None for an unknown token. An unreadable or damaged
    /// store is an error (every caller is refused until it is fixed).
    pub fn node_of(&self, token: &str) -> Result<Option<String>, TokenError> {
        let presented = sha256(token);
        let entries = self.entries()?;
        let mut found = None;
        for e in entries.iter() {
            if same(&e.hash, &presented) {
                found = Some(e.node.clone());
            }
        }
        Ok(found)
    }
}

/// The node whose bootstrap token a request carries (`authorization: Bearer <token>`), or the
/// gRPC code and reason it is refused with. Every service of the control plane asks this first.
pub fn caller_node<T>(
    tokens: &NodeTokens,
    req: &zmesh_proto::tonic::Request<T>,
) -> Result<String, (zmesh_proto::tonic::Code, &'static str)> {
    use zmesh_proto::tonic::Code::{Unauthenticated, Unavailable};
    let token = crate::grpc::bearer(req).ok_or((
        Unauthenticated,
        "no `authorization: Bearer <node token>` header",
    ))?;
    match tokens.node_of(token.trim()) {
        Ok(Some(node)) => Ok(node),
        Ok(None) => Err((
            Unauthenticated,
            "the bearer token is not a node token of this CA (zmesh-node ca token)",
        )),
        Err(e) => {
            tracing::error!(error = %e, "the node token store cannot be read; refusing every call");
            Err((
                Unavailable,
                "the control plane cannot read its node token store",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_node_and_only_its_hash_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let t1 = create(dir.path(), "vm-1").unwrap();
        let t2 = create(dir.path(), "vm-2").unwrap();
        assert_eq!(t1.len(), 43, "32 bytes in unpadded base64url: {t1}");
        assert!(t1
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let path = dir.path().join(TOKENS_FILE);
        let stored = std::fs::read_to_string(&path).unwrap();
        assert!(!stored.contains(&t1) && !stored.contains(&t2), "{stored}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let tokens = NodeTokens::new(dir.path());
        assert_eq!(tokens.node_of(&t1).unwrap().as_deref(), Some("vm-1"));
        assert_eq!(tokens.node_of(&t2).unwrap().as_deref(), Some("vm-2"));
        assert_eq!(tokens.node_of("guess").unwrap(), None);
        assert_eq!(tokens.node_of("").unwrap(), None);
        // A hash is not a token.
        let hash = stored.split(' ').next().unwrap();
        assert_eq!(tokens.node_of(hash).unwrap(), None);
    }

    #[test]
    fn revoking_a_node_takes_effect_on_a_running_store() {
        let dir = tempfile::tempdir().unwrap();
        let t1 = create(dir.path(), "vm-1").unwrap();
        let t1b = create(dir.path(), "vm-1").unwrap();
        let t2 = create(dir.path(), "vm-2").unwrap();
        let tokens = NodeTokens::new(dir.path());
        assert_eq!(tokens.check().unwrap(), 3);
        assert_eq!(revoke(dir.path(), "vm-1").unwrap(), 2);
        assert_eq!(tokens.node_of(&t1).unwrap(), None);
        assert_eq!(tokens.node_of(&t1b).unwrap(), None);
        assert_eq!(tokens.node_of(&t2).unwrap().as_deref(), Some("vm-2"));
    }

    #[test]
    fn a_damaged_or_exposed_store_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "a b", "../x", "vm\n1", &"x".repeat(254)] {
            let e = create(dir.path(), bad).unwrap_err().to_string();
            assert!(e.contains("node name"), "{bad:?}: {e}");
        }
        let tokens = NodeTokens::new(dir.path());
        assert_eq!(tokens.check().unwrap(), 0, "no store: nobody");
        let path = dir.path().join(TOKENS_FILE);
        std::fs::write(&path, "abc vm-1\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = tokens.node_of("x").unwrap_err().to_string();
        assert!(e.contains("node-tokens:1"), "{e}");
        let t = {
            std::fs::write(&path, "").unwrap();
            create(dir.path(), "vm-1").unwrap()
        };
        // Cached while private; a chmod alone (no edit) is seen at the next call.
        assert_eq!(tokens.node_of(&t).unwrap().as_deref(), Some("vm-1"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = tokens.node_of(&t).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let e = create(dir.path(), "vm-2").unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
