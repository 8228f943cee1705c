//! Installing the chained CNI plugin on a node, as istio-cni does: the plugin binary goes into
//! the CNI bin dir atomically (written beside, renamed over, so a running copy is never
//! overwritten in place: no "text file busy"), and a `zmesh-redirect` entry is appended as the
//! LAST plugin of the node's primary network config (the first config file by name, or the one
//! named), so the primary plugin still gives the pod its network and zmesh captures it after.
//! The primary CNI may rewrite its file at any time (Calico, Cilium and the cloud CNIs do on
//! upgrade); `watch` puts the entry back. `uninstall` removes exactly the entry, leaving the
//! primary's config as it was, byte for byte when the primary has not rewritten it meanwhile:
//! install keeps the primary's own text beside it in a dotfile no runtime reads
//! (docs/capture.md "CNI install").
//!
//! Pure parts (`insert`, `remove`, `primary`) are separate from the file operations so they are
//! tested on documents.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

/// The plugin `type` this crate's binary answers to.
pub const PLUGIN_TYPE: &str = "zmesh-redirect";
/// What the one-plugin config of earlier versions was called; removed on install.
pub const LEGACY_CONFLIST: &str = "05-zmesh.conflist";
/// Largest config file read (a CNI config is a few KiB).
const MAX_CONFIG: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no CNI network config in {0} yet (the primary CNI writes one; waiting for it)")]
    NoPrimary(String),
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// A config document as a conflist: a `.conf` (one plugin) becomes a conflist of that plugin.
fn as_conflist(doc: Value, path: &Path) -> Result<Map<String, Value>, InstallError> {
    let bad = |reason: &str| InstallError::Config {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    let Value::Object(mut m) = doc else {
        return Err(bad("not a JSON object"));
    };
    if m.contains_key("plugins") {
        if !m["plugins"].is_array() {
            return Err(bad("`plugins` is not a list"));
        }
        return Ok(m);
    }
    if !m.contains_key("type") {
        return Err(bad(
            "neither a conflist (`plugins`) nor a plugin config (`type`)",
        ));
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = m.remove(key) {
            list.insert(key.to_string(), v);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(m)]));
    Ok(list)
}

/// Appends `plugin` as the last plugin of the chain (moving an existing entry of ours there and
/// replacing it with `plugin`). Returns whether the document changed.
pub fn insert(conflist: &mut Map<String, Value>, plugin: &Value) -> bool {
    let plugins = conflist
        .entry("plugins")
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .expect("as_conflist checked `plugins` is a list");
    if plugins.last() == Some(plugin) && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
        return false;
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(plugin.clone());
    true
}

/// Removes every entry of ours. Returns whether the document changed.
pub fn remove(conflist: &mut Map<String, Value>) -> bool {
    let Some(plugins) = conflist.get_mut("plugins").and_then(Value::as_array_mut) else {
        return false;
    };
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    plugins.len() != before
}

/// Whether a config file holds nothing but our entry (the legacy one-plugin config).
fn only_ours(doc: &Value) -> bool {
    doc.get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|p| !p.is_empty() && p.iter().all(is_ours))
}

/// Where install keeps the primary's own text of `conflist`: a dotfile whose extension is none
/// of `.conf`/`.conflist`/`.json`, so no runtime (nor [`primary`]) takes it for a network.
fn saved_original(conflist: &Path) -> PathBuf {
    let name = conflist
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    conflist.with_file_name(format!(".{name}.zmesh-orig"))
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = read_text(path)?;
    parse_json(path, &text)
}

fn parse_json(path: &Path, text: &str) -> Result<Value, InstallError> {
    serde_json::from_str(text).map_err(|e| InstallError::Config {
        path: path.display().to_string(),
        reason: format!("not JSON: {e}"),
    })
}

fn read_text(path: &Path) -> Result<String, InstallError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.len() > MAX_CONFIG {
        return Err(InstallError::Config {
            path: path.display().to_string(),
            reason: format!("{} bytes is over the {MAX_CONFIG}-byte limit", meta.len()),
        });
    }
    std::fs::read_to_string(path).map_err(io(path))
}

/// The primary network config: `explicit` (a file name in `dir`), else the first file by name
/// ending in `.conflist`, `.conf` or `.json`, as the container runtime picks it; our own
/// legacy one-plugin file never counts.
pub fn primary(dir: &Path, explicit: Option<&str>) -> Result<PathBuf, InstallError> {
    if let Some(name) = explicit {
        let p = dir.join(name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(InstallError::NoPrimary(p.display().to_string()))
        };
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    names.sort();
    for p in names {
        if p.file_name().is_some_and(|n| n == LEGACY_CONFLIST) {
            continue;
        }
        if read_json(&p).is_ok_and(|d| only_ours(&d)) {
            continue;
        }
        return Ok(p);
    }
    Err(InstallError::NoPrimary(dir.display().to_string()))
}

/// Writes `text` to `path` through a temporary file in the same directory and a rename, so a
/// reader (the container runtime, kubelet) never sees half a file.
fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), InstallError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.zmesh-tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if let Some(m) = mode {
        opts.mode(m);
    }
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Copies the plugin binary `src` to `bin_dir/zmesh-redirect`, atomically (a node's running
/// plugin is replaced by a rename, never written over).
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let bytes = std::fs::read(src).map_err(io(src))?;
    let dst = bin_dir.join(PLUGIN_TYPE);
    if std::fs::read(&dst).is_ok_and(|old| old == bytes) {
        return Ok(dst);
    }
    write_atomic(&dst, &bytes, Some(0o755))?;
    Ok(dst)
}

/// What `install_config` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Installed {
    /// The conflist that now holds the entry.
    pub conflist: PathBuf,
    /// Whether anything was written (false: it was already in place).
    pub changed: bool,
}

/// Puts `plugin` last in the primary config's chain (converting a `.conf` into a `.conflist`
/// beside it) and removes the legacy one-plugin file. Idempotent.
pub fn install_config(
    dir: &Path,
    explicit: Option<&str>,
    plugin: &Value,
) -> Result<Installed, InstallError> {
    let legacy = dir.join(LEGACY_CONFLIST);
    let mut changed = false;
    if legacy.exists() {
        std::fs::remove_file(&legacy).map_err(io(&legacy))?;
        changed = true;
    }
    let path = primary(dir, explicit)?;
    let original = read_text(&path)?;
    let mut list = as_conflist(parse_json(&path, &original)?, &path)?;
    let is_conf = path.extension().is_some_and(|e| e != "conflist");
    let target = if is_conf {
        path.with_extension("conflist")
    } else {
        path.clone()
    };
    let primary_own = !list["plugins"]
        .as_array()
        .is_some_and(|p| p.iter().any(is_ours));
    if insert(&mut list, plugin) || is_conf {
        // Text without our entry is the primary's own (its first, or a rewrite `watch` is
        // answering): uninstall puts exactly these bytes back. A converted `.conf` has no
        // conflist text to go back to.
        if primary_own && !is_conf {
            write_atomic(&saved_original(&target), original.as_bytes(), None)?;
        }
        let text = serde_json::to_string_pretty(&Value::Object(list)).expect("JSON values encode");
        write_atomic(&target, text.as_bytes(), None)?;
        if is_conf {
            // The runtime must see one config: the converted one.
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        changed = true;
    }
    Ok(Installed {
        conflist: target,
        changed,
    })
}

/// Removes our entry from every config file in `dir` (and the legacy file), leaving the rest of
/// each as it was: the primary's own bytes, saved at install, when they still say the same
/// thing, else the document re-encoded. Returns the files changed.
pub fn uninstall_config(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    let legacy = dir.join(LEGACY_CONFLIST);
    if legacy.exists() {
        std::fs::remove_file(&legacy).map_err(io(&legacy))?;
        changed.push(legacy);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    files.sort();
    for p in files {
        let saved = saved_original(&p);
        let Ok(Value::Object(mut m)) = read_json(&p) else {
            continue;
        };
        if remove(&mut m) {
            let doc = Value::Object(m);
            // The saved text counts only if it is what is left after removing our entry (the
            // primary may have changed its config since install; then its change wins).
            let text = match read_text(&saved) {
                Ok(t) if parse_json(&saved, &t).is_ok_and(|v| v == doc) => t,
                _ => serde_json::to_string_pretty(&doc).expect("JSON values encode"),
            };
            write_atomic(&p, text.as_bytes(), None)?;
            changed.push(p);
        }
        match std::fs::remove_file(&saved) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(&saved)(e));
            }
            _ => {}
        }
    }
    Ok(changed)
}

/// Keeps the entry installed: checks every `interval` and re-inserts it when the primary CNI
/// rewrote its config (or wrote its first one). Runs until the process ends.
pub fn watch(dir: &Path, explicit: Option<&str>, plugin: &Value, interval: Duration) -> ! {
    let mut last_error = String::new();
    loop {
        match install_config(dir, explicit, plugin) {
            Ok(Installed {
                conflist,
                changed: true,
            }) => {
                tracing::info!(conflist = %conflist.display(), "zmesh-redirect chained as the last CNI plugin");
                last_error.clear();
            }
            Ok(_) => last_error.clear(),
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!(error = %text, "cannot chain the CNI plugin yet; retrying");
                    last_error = text;
                }
            }
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ours() -> Value {
        json!({"type": "zmesh-redirect", "admin_socket": "/var/run/zmesh/redirect.sock"})
    }

    fn primary_doc() -> Value {
        json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]]}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]})
    }

    #[test]
    fn the_entry_goes_last_once_and_comes_out_leaving_the_rest() {
        let Value::Object(original) = primary_doc() else {
            unreachable!()
        };
        let mut m = original.clone();
        assert!(insert(&mut m, &ours()));
        let plugins = m["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2], ours());
        assert!(!insert(&mut m, &ours()), "idempotent");
        // An entry of ours that is not last (a primary that appended after it) moves last.
        m["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "tuning"}));
        assert!(insert(&mut m, &ours()));
        let types: Vec<_> = m["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "tuning", "zmesh-redirect"]);
        assert!(remove(&mut m));
        m["plugins"].as_array_mut().unwrap().pop();
        assert_eq!(m, original, "removal leaves the primary's config as it was");
        assert!(!remove(&mut m));
    }

    #[test]
    fn install_chains_into_the_first_config_by_name_and_uninstall_restores_it() {
        let dir = tempfile::tempdir().unwrap();
        let calico = dir.path().join("10-calico.conflist");
        std::fs::write(&calico, primary_doc().to_string()).unwrap();
        std::fs::write(
            dir.path().join("99-other.conflist"),
            primary_doc().to_string(),
        )
        .unwrap();
        // The one-plugin file of earlier versions goes.
        std::fs::write(
            dir.path().join(LEGACY_CONFLIST),
            json!({"cniVersion": "1.0.0", "name": "zmesh", "plugins": [ours()]}).to_string(),
        )
        .unwrap();
        let got = install_config(dir.path(), None, &ours()).unwrap();
        assert_eq!(got.conflist, calico);
        assert!(got.changed);
        assert!(!dir.path().join(LEGACY_CONFLIST).exists());
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&calico).unwrap()).unwrap();
        assert_eq!(doc["plugins"][2], ours());
        assert!(!install_config(dir.path(), None, &ours()).unwrap().changed);
        // The primary CNI rewrites its file: the next pass puts the entry back.
        std::fs::write(&calico, primary_doc().to_string()).unwrap();
        assert!(install_config(dir.path(), None, &ours()).unwrap().changed);
        assert_eq!(uninstall_config(dir.path()).unwrap(), vec![calico.clone()]);
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&calico).unwrap()).unwrap();
        assert_eq!(doc, primary_doc());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("zmesh-tmp")), "{names:?}");
    }

    /// A conflist as an operator writes it: key order, spacing and final newline of its own.
    const HAND_WRITTEN: &str = "{\n    \"name\": \"k8s-pod-network\",\n    \"cniVersion\": \"1.0.0\",\n    \"plugins\": [ { \"type\": \"bridge\", \"bridge\": \"cni0\" } ]\n}\n";

    #[test]
    fn uninstall_gives_back_the_primarys_own_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("10-net.conflist");
        std::fs::write(&conf, HAND_WRITTEN).unwrap();
        install_config(dir.path(), None, &ours()).unwrap();
        // Installing again (the entry is there) keeps the primary's text, not ours.
        let other = json!({"type": "zmesh-redirect", "admin_socket": "/other.sock"});
        assert!(install_config(dir.path(), None, &other).unwrap().changed);
        // The saved text is no network config: install still chains into the primary.
        assert_eq!(primary(dir.path(), None).unwrap(), conf);
        assert_eq!(uninstall_config(dir.path()).unwrap(), vec![conf.clone()]);
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), HAND_WRITTEN);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["10-net.conflist"], "nothing of ours is left");
    }

    #[test]
    fn a_primary_rewrite_or_a_broken_saved_copy_wins_over_the_saved_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("10-net.conflist");
        std::fs::write(&conf, HAND_WRITTEN).unwrap();
        install_config(dir.path(), None, &ours()).unwrap();
        // The primary changes its config while chained (keeping our entry, as some CNIs do).
        let mut changed: Value =
            serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
        changed["plugins"][0]["bridge"] = json!("cni1");
        std::fs::write(&conf, changed.to_string()).unwrap();
        uninstall_config(dir.path()).unwrap();
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
        assert_eq!(
            doc["plugins"][0]["bridge"], "cni1",
            "the primary's change kept"
        );
        assert_eq!(doc["plugins"].as_array().unwrap().len(), 1);
        assert!(!saved_original(&conf).exists());
        // A saved copy that is not JSON (damaged by hand) is ignored, not an error.
        std::fs::write(&conf, HAND_WRITTEN).unwrap();
        install_config(dir.path(), None, &ours()).unwrap();
        std::fs::write(saved_original(&conf), "{garbage").unwrap();
        assert_eq!(uninstall_config(dir.path()).unwrap(), vec![conf.clone()]);
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
        assert_eq!(doc, serde_json::from_str::<Value>(HAND_WRITTEN).unwrap());
        assert!(!saved_original(&conf).exists());
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("10-containerd-net.conf");
        std::fs::write(
            &conf,
            json!({"cniVersion": "0.4.0", "name": "containerd-net", "type": "bridge",
                   "ipam": {"type": "host-local", "subnet": "10.88.0.0/16"}})
            .to_string(),
        )
        .unwrap();
        let got = install_config(dir.path(), None, &ours()).unwrap();
        assert_eq!(got.conflist, dir.path().join("10-containerd-net.conflist"));
        assert!(!conf.exists());
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(&got.conflist).unwrap()).unwrap();
        assert_eq!(doc["name"], "containerd-net");
        assert_eq!(doc["cniVersion"], "0.4.0");
        assert_eq!(doc["plugins"][0]["type"], "bridge");
        assert_eq!(doc["plugins"][1], ours());
    }

    #[test]
    fn broken_or_missing_configs_are_errors_that_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = install_config(dir.path(), None, &ours())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no CNI network config"), "{e}");
        let bad = dir.path().join("10-bad.conflist");
        std::fs::write(&bad, "{not json").unwrap();
        let e = install_config(dir.path(), None, &ours())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10-bad.conflist") && e.contains("not JSON"),
            "{e}"
        );
        std::fs::write(&bad, r#"{"plugins": 7}"#).unwrap();
        let e = install_config(dir.path(), None, &ours())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a list"), "{e}");
        let e = install_config(dir.path(), Some("20-named.conflist"), &ours())
            .unwrap_err()
            .to_string();
        assert!(e.contains("20-named.conflist"), "{e}");
    }

    #[test]
    fn the_binary_is_replaced_by_rename_not_written_in_place() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"new plugin").unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join(PLUGIN_TYPE), b"old plugin").unwrap();
        let old_inode = std::fs::metadata(bin.join(PLUGIN_TYPE)).unwrap().ino();
        let dst = install_binary(&src, &bin).unwrap();
        let meta = std::fs::metadata(&dst).unwrap();
        assert_ne!(
            meta.ino(),
            old_inode,
            "a new file, renamed over the running one"
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read(&dst).unwrap(), b"new plugin");
        // Unchanged content: nothing is written.
        let inode = meta.ino();
        install_binary(&src, &bin).unwrap();
        assert_eq!(std::fs::metadata(&dst).unwrap().ino(), inode);
    }
}
