//! The chained CNI plugin (CNI spec 1.0): the binary acts as one when the container runtime runs it
//! with `CNI_COMMAND` set. It runs after the cluster's primary CNI, which keeps full ownership of
//! pod networking; this plugin only asks the agent ([`crate::agent`]) to capture the new pod, and
//! passes the primary plugin's `prevResult` through unchanged.
//!
//! ADD fails (and with it the pod sandbox) when the agent cannot capture the pod: a pod must never
//! start uncaptured. DEL always succeeds, as the spec requires it to be idempotent and the pod is
//! going away anyway. CHECK succeeds when the agent has the pod.
//!
//! Which pods are captured is the agent's decision (`"by_labels":true`): with the Kubernetes API
//! configured it reads the pod's and its namespace's `istio.io/dataplane-mode` labels and answers
//! `"enrolled":false` for a pod that is not meshed, which then starts uncaptured with the
//! primary's result unchanged; an API it cannot reach fails the ADD. Excluded namespaces
//! (`kube-system` by default) are decided here, before the agent or the API is asked.
//!
//! The pod's service account is not in the CNI arguments kubelet passes. With the API the agent
//! takes it from the pod spec; without, it comes from a `K8S_POD_SERVICE_ACCOUNT` CNI arg when a
//! runtime provides one, else `default`.
//!
//! Everything here is a function of the environment, stdin and the agent's replies ([`run`]), so it
//! is tested without a container runtime; `main` only wires in the real process environment.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent::{self, AddRequest, ClientError, Reply, Request};

/// The environment variable whose presence switches the binary into CNI plugin mode.
pub const COMMAND_ENV: &str = "CNI_COMMAND";
/// CNI versions whose config and result format this plugin understands (it never rewrites the
/// result, so every version with `prevResult` chaining works).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The version this plugin reports and uses in its errors when the config does not say.
pub const CNI_VERSION: &str = "1.0.0";
/// Namespaces never captured unless the config says otherwise: the cluster's own plumbing (DNS,
/// the CNI itself) must come up before the mesh can.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 1] = ["kube-system"];
/// Identity used when the runtime passes no service account (see the module docs).
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// CNI spec error codes used here.
mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variable: an unknown `CNI_COMMAND`, a missing `CNI_NETNS`
    /// or container id.
    pub const INVALID_ENV: u32 = 4;
    /// Failed to decode content (the network config on stdin).
    pub const DECODE: u32 = 6;
    /// Plugin-specific: the agent could not capture (or does not know) the pod.
    pub const AGENT: u32 = 999;
}

/// The network configuration on stdin: the standard fields we need plus our own options.
#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
    /// Agent admin socket; default [`agent::DEFAULT_ADMIN_SOCKET`].
    admin_socket: Option<PathBuf>,
    /// Namespaces whose pods are never captured; default [`DEFAULT_EXCLUDED_NAMESPACES`].
    exclude_namespaces: Option<Vec<String>>,
}

/// A CNI error result (printed on stdout, with a non-zero exit).
#[derive(Debug, Serialize)]
struct CniError {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    code: u32,
    msg: String,
    details: String,
}

/// What the plugin prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    /// Diagnostics for the runtime's log (stderr); not part of the CNI protocol.
    pub stderr: String,
    pub exit_code: u8,
}

impl Outcome {
    fn success(stdout: String) -> Self {
        Outcome {
            stdout,
            stderr: String::new(),
            exit_code: 0,
        }
    }

    fn error(version: &str, code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        let err = CniError {
            cni_version: if version.is_empty() {
                CNI_VERSION.to_owned()
            } else {
                version.to_owned()
            },
            code,
            msg: msg.into(),
            details: details.into(),
        };
        Outcome {
            stdout: serde_json::to_string(&err).unwrap_or_default(),
            stderr: format!("zmesh-redirect (CNI): {}: {}", err.msg, err.details),
            exit_code: 1,
        }
    }
}

/// Whether the command needs stdin: VERSION may be run without a config.
pub fn reads_stdin(command: &str) -> bool {
    command != "VERSION"
}

/// Runs one CNI command. `env` reads the CNI_* variables, `stdin` is the network config, and
/// `call` sends a request to the agent (normally [`agent::request`]).
pub fn run(
    env: impl Fn(&str) -> Option<String>,
    stdin: &str,
    mut call: impl FnMut(&Path, &Request) -> Result<Reply, ClientError>,
) -> Outcome {
    let command = env(COMMAND_ENV).unwrap_or_default();
    if command == "VERSION" {
        return Outcome::success(version_json());
    }
    let conf: NetConf = match serde_json::from_str(stdin) {
        Ok(conf) => conf,
        // DEL must succeed whatever happens; there is nothing to undo without a config anyway.
        Err(_) if command == "DEL" => return Outcome::success(String::new()),
        Err(e) => {
            return Outcome::error(
                "",
                code::DECODE,
                "failed to decode the network configuration",
                format!("stdin is not a CNI network config: {e}"),
            )
        }
    };
    let version = conf.cni_version.clone();
    if command != "DEL" && !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Outcome::error(
            "",
            code::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {version:?}"),
            format!("this plugin supports {}", SUPPORTED_VERSIONS.join(", ")),
        );
    }
    let args = parse_args(&env("CNI_ARGS").unwrap_or_default());
    let arg = |key: &str| {
        args.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let pod_namespace = arg("K8S_POD_NAMESPACE");
    let excluded = pod_namespace.as_ref().is_some_and(|ns| {
        conf.exclude_namespaces
            .as_ref()
            .map_or(DEFAULT_EXCLUDED_NAMESPACES.contains(&ns.as_str()), |list| {
                list.contains(ns)
            })
    });
    let container_id = env("CNI_CONTAINERID").filter(|v| !v.is_empty());
    let uid = arg("K8S_POD_UID").or_else(|| container_id.clone());
    let socket = conf
        .admin_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(agent::DEFAULT_ADMIN_SOCKET));

    match command.as_str() {
        "ADD" => {
            let Some(netns) = env("CNI_NETNS").filter(|v| !v.is_empty()) else {
                return Outcome::error(
                    &version,
                    code::INVALID_ENV,
                    "missing CNI_NETNS",
                    "ADD needs the pod's network namespace path in CNI_NETNS; the container runtime sets it",
                );
            };
            if excluded {
                return Outcome::success(result_json(&conf));
            }
            let Some(uid) = uid else {
                return Outcome::error(
                    &version,
                    code::INVALID_ENV,
                    "missing CNI_CONTAINERID",
                    "ADD needs K8S_POD_UID in CNI_ARGS or CNI_CONTAINERID to identify the pod",
                );
            };
            let request = Request::Add(AddRequest {
                netns: PathBuf::from(netns),
                name: arg("K8S_POD_NAME").unwrap_or_else(|| uid.clone()),
                namespace: pod_namespace.unwrap_or_else(|| "default".to_owned()),
                service_account: arg("K8S_POD_SERVICE_ACCOUNT")
                    .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned()),
                uid,
                inbound_capture: true,
                dns_capture: false,
                by_labels: true,
            });
            match agent_result(call(&socket, &request)) {
                // Captured, or not meshed by its labels (`"enrolled":false`): either way the
                // primary's result goes on unchanged.
                Ok(_) => Outcome::success(result_json(&conf)),
                Err(msg) => Outcome::error(
                    &version,
                    code::AGENT,
                    msg,
                    "the redirect agent could not capture the pod; it must not start uncaptured",
                ),
            }
        }
        "DEL" => {
            let mut outcome = Outcome::success(String::new());
            if let (Some(uid), false) = (uid, excluded) {
                if let Err(msg) = agent_result(call(&socket, &Request::Del { uid })) {
                    // Best effort: report it for the runtime's log, but succeed.
                    outcome.stderr = format!("zmesh-redirect (CNI): DEL ignored an error: {msg}");
                }
            }
            outcome
        }
        "CHECK" => {
            if excluded {
                return Outcome::success(String::new());
            }
            let Some(uid) = uid else {
                return Outcome::error(
                    &version,
                    code::INVALID_ENV,
                    "missing CNI_CONTAINERID",
                    "CHECK needs K8S_POD_UID in CNI_ARGS or CNI_CONTAINERID to identify the pod",
                );
            };
            let request = Request::Check {
                uid,
                name: arg("K8S_POD_NAME").unwrap_or_default(),
                namespace: pod_namespace.unwrap_or_default(),
            };
            match agent_result(call(&socket, &request)) {
                Ok(_) => Outcome::success(String::new()),
                Err(msg) => Outcome::error(&version, code::AGENT, msg, "CHECK asks the agent"),
            }
        }
        other => Outcome::error(
            &version,
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK or VERSION",
        ),
    }
}

/// The agent's reply as a result, with failures (transport or agent) as one message.
fn agent_result(reply: Result<Reply, ClientError>) -> Result<Reply, String> {
    match reply {
        Ok(reply) if reply.ok => Ok(reply),
        Ok(reply) => Err(reply
            .error
            .unwrap_or_else(|| "the redirect agent refused without saying why".to_owned())),
        Err(e) => Err(e.to_string()),
    }
}

/// `prevResult` unchanged, or an empty result when this plugin is first in the chain.
fn result_json(conf: &NetConf) -> String {
    match &conf.prev_result {
        Some(prev) => prev.to_string(),
        None => serde_json::json!({ "cniVersion": conf.cni_version }).to_string(),
    }
}

fn version_json() -> String {
    serde_json::json!({ "cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
        .to_string()
}

/// `CNI_ARGS` is `K=V;K=V`; entries without `=` are ignored.
fn parse_args(raw: &str) -> Vec<(String, String)> {
    raw.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn unreachable_agent(_: &Path, req: &Request) -> Result<Reply, ClientError> {
        panic!("the agent must not be contacted, got {req:?}")
    }

    #[test]
    fn args_parse() {
        assert_eq!(
            parse_args("IgnoreUnknown=1;K8S_POD_NAME=web;junk"),
            vec![
                ("IgnoreUnknown".to_owned(), "1".to_owned()),
                ("K8S_POD_NAME".to_owned(), "web".to_owned())
            ]
        );
    }

    #[test]
    fn add_sends_identity_from_args() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", "/var/run/netns/p"),
            ("CNI_CONTAINERID", "c1"),
            (
                "CNI_ARGS",
                "K8S_POD_NAME=web;K8S_POD_NAMESPACE=shop;K8S_POD_UID=u-1",
            ),
        ];
        let mut seen = None;
        let out = run(env(&vars), r#"{"cniVersion":"1.0.0"}"#, |_, req| {
            seen = Some(req.clone());
            Ok(Reply {
                ok: true,
                ..Reply::default()
            })
        });
        assert_eq!(out.exit_code, 0, "{out:?}");
        assert_eq!(out.stdout, r#"{"cniVersion":"1.0.0"}"#);
        let Some(Request::Add(add)) = seen else {
            panic!("no add sent")
        };
        assert_eq!(
            (
                add.uid.as_str(),
                add.name.as_str(),
                add.namespace.as_str(),
                add.service_account.as_str()
            ),
            ("u-1", "web", "shop", "default")
        );
    }

    #[test]
    fn agent_refusal_fails_add_with_its_message() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", "/x"),
            ("CNI_CONTAINERID", "c1"),
        ];
        let out = run(env(&vars), r#"{"cniVersion":"0.4.0"}"#, |_, _| {
            Ok(Reply::error("no iptables"))
        });
        assert_eq!(out.exit_code, 1);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["code"], 999);
        assert_eq!(v["msg"], "no iptables");
        assert_eq!(v["cniVersion"], "0.4.0");
    }

    #[test]
    fn unsupported_version_and_bad_config_are_rejected() {
        let vars = [("CNI_COMMAND", "ADD"), ("CNI_NETNS", "/x")];
        let out = run(env(&vars), r#"{"cniVersion":"9.9.9"}"#, unreachable_agent);
        assert_eq!(
            (out.exit_code, out.stdout.contains(r#""code":1"#)),
            (1, true)
        );
        let out = run(env(&vars), "not json", unreachable_agent);
        assert_eq!(
            (out.exit_code, out.stdout.contains(r#""code":6"#)),
            (1, true)
        );
        let del = [("CNI_COMMAND", "DEL")];
        assert_eq!(run(env(&del), "not json", unreachable_agent).exit_code, 0);
    }

    #[test]
    fn check_asks_the_agent() {
        let vars = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/x"),
        ];
        let conf = r#"{"cniVersion":"1.0.0"}"#;
        let mut asked = None;
        let out = run(env(&vars), conf, |_, req| {
            asked = Some(req.clone());
            Ok(Reply {
                enrolled: Some(true),
                ..Reply::ok()
            })
        });
        assert_eq!(out.exit_code, 0);
        assert_eq!(
            asked,
            Some(Request::Check {
                uid: "c1".into(),
                name: String::new(),
                namespace: String::new()
            })
        );
        let out = run(env(&vars), conf, |_, _| {
            Ok(Reply::error("pod c1: is meshed but not enrolled"))
        });
        assert_eq!(out.exit_code, 1);
        assert!(out.stdout.contains("not enrolled"), "{}", out.stdout);
    }
}
