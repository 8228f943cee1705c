//! Tier (b): the redirect agent's Kubernetes side ([`zmesh_redirect::k8s`]) against the fake API
//! server (`zmesh_testbed::kubeapi`) over loopback: kube-rs lists and watches it, the stores follow
//! label changes and deletions, a 410 after compaction relists, and a failing API (500, garbage)
//! is retried while the stores keep their last view; a CNI ADD that misses the stores and cannot
//! reach the API fails with a clear error. Addresses 127.81.0.x.

use std::time::Duration;

use zmesh_redirect::enroll::{Decision, MeshedBy, Reason};
use zmesh_redirect::k8s::{Confirmed, K8s, KubeSettings};
use zmesh_testbed::kubeapi::{pod, FakeKube, Fault};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const GUARD: Duration = Duration::from_secs(15);

async fn start(api: &FakeKube) -> K8s {
    let k8s = K8s::start(&KubeSettings {
        api_url: Some(api.url()),
        token_file: None,
        node_name: "node-1".into(),
    })
    .await
    .unwrap();
    assert!(k8s.wait_ready(GUARD).await, "the watches never listed");
    k8s
}

/// Polls `desired()` until `pred` holds for it.
async fn until(k8s: &K8s, what: &str, pred: impl Fn(&[(String, Decision)]) -> bool) {
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let now: Vec<(String, Decision)> = k8s
            .desired()
            .unwrap_or_default()
            .into_iter()
            .map(|(f, d)| (f.name, d))
            .collect();
        if pred(&now) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; stores say {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn decision_of(now: &[(String, Decision)], name: &str) -> Option<Decision> {
    now.iter().find(|(n, _)| n == name).map(|(_, d)| *d)
}

#[tokio::test]
async fn stores_follow_labels_deletions_and_relist_after_410() {
    let api = FakeKube::start("127.81.0.1:0").unwrap();
    api.put_namespace("shop", &[]);
    api.put_namespace("bank", &[AMBIENT]);
    api.apply_pod(&pod("shop", "web", "u-web", "node-1", "10.230.0.2", &[]));
    api.apply_pod(&pod(
        "bank",
        "ledger",
        "u-ledger",
        "node-1",
        "10.230.0.3",
        &[],
    ));
    api.apply_pod(&pod(
        "bank",
        "batch",
        "u-batch",
        "node-1",
        "10.230.0.4",
        &[("istio.io/dataplane-mode", "none")],
    ));
    // Another node's pod: the field selector keeps it out.
    api.apply_pod(&pod("bank", "far", "u-far", "node-2", "10.230.0.5", &[]));
    let k8s = start(&api).await;

    let now: Vec<_> = k8s
        .desired()
        .unwrap()
        .into_iter()
        .map(|(f, d)| (f.name, d))
        .collect();
    assert_eq!(now.len(), 3, "only node-1's pods: {now:?}");
    assert_eq!(
        decision_of(&now, "web"),
        Some(Decision::NotMeshed(Reason::NotLabelled))
    );
    assert_eq!(
        decision_of(&now, "ledger"),
        Some(Decision::Meshed(MeshedBy::NamespaceLabel))
    );
    assert_eq!(
        decision_of(&now, "batch"),
        Some(Decision::NotMeshed(Reason::OptedOut))
    );
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods?") && r.contains("spec.nodeName%3Dnode-1")),
        "the pod list carries the node's field selector: {requests:?}"
    );

    // Labelling the namespace reaches the store through the watch.
    api.label_namespace("shop", AMBIENT.0, Some(AMBIENT.1));
    until(&k8s, "shop labelled", |now| {
        decision_of(now, "web") == Some(Decision::Meshed(MeshedBy::NamespaceLabel))
    })
    .await;
    // A pod label opting out wins over the namespace.
    api.label_pod("shop", "web", "istio.io/dataplane-mode", Some("none"));
    until(&k8s, "web opted out", |now| {
        decision_of(now, "web") == Some(Decision::NotMeshed(Reason::OptedOut))
    })
    .await;
    api.delete_pod("bank", "ledger");
    until(&k8s, "ledger deleted", |now| {
        decision_of(now, "ledger").is_none()
    })
    .await;

    // History compacted and the watch broken: resuming gets 410, the client lists again and
    // sees a change made meanwhile.
    let before = api.requests().len();
    api.compact();
    let deadline = tokio::time::Instant::now() + GUARD;
    while !api.requests()[before..]
        .iter()
        .any(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no relist after 410: {:#?}",
            &api.requests()[before..]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.apply_pod(&pod("shop", "late", "u-late", "node-1", "10.230.0.6", &[]));
    until(&k8s, "the pod added across the relist", |now| {
        decision_of(now, "late").is_some()
    })
    .await;

    // Fresh reads for a release: the pod exists with its uid, or it is gone.
    assert_eq!(
        k8s.confirm("shop", "web", "u-web").await.unwrap(),
        Confirmed::Exists(Decision::NotMeshed(Reason::OptedOut))
    );
    assert_eq!(
        k8s.confirm("bank", "ledger", "u-ledger").await.unwrap(),
        Confirmed::Gone
    );
    assert_eq!(
        k8s.confirm("shop", "web", "another-uid").await.unwrap(),
        Confirmed::Gone,
        "a pod recreated under the same name is not the enrolled one"
    );
}

#[tokio::test]
async fn a_failing_api_keeps_the_last_view_and_fails_cache_misses_closed() {
    let api = FakeKube::start("127.81.0.2:0").unwrap();
    api.put_namespace("shop", &[AMBIENT]);
    api.apply_pod(&pod("shop", "web", "u-web", "node-1", "10.230.1.2", &[]));
    let k8s = start(&api).await;

    for fault in [Fault::Status(500), Fault::Garbage] {
        let before = api.requests().len();
        api.set_fault(Some(fault.clone()));
        api.break_watches();
        // The watches fail and retry (with a growing backoff, which may be long after the
        // previous fault); the stores keep the pod and its decision throughout.
        let deadline = tokio::time::Instant::now() + GUARD;
        while api.requests().len() < before + 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{fault:?}: the watches were not retried: {:#?}",
                &api.requests()[before..]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let window = api.requests().len();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let tries = api.requests().len() - window;
        assert!(
            tries < 10,
            "{fault:?}: {tries} requests in 2 s: retries must back off"
        );
        let now = k8s.desired().expect("still ready with the last view");
        assert_eq!(now.len(), 1, "{fault:?}: {now:?}");
        assert!(now[0].1.is_meshed());

        // The stores say meshed: a CNI ADD goes ahead without asking the API.
        let (decision, facts) = k8s.decide_add("shop", "web", "u-web").await.unwrap();
        assert!(decision.is_meshed());
        assert_eq!(facts.service_account, "web-sa");
        // A pod the stores have not seen needs the API, which fails: the ADD must fail, naming it.
        let err = k8s
            .decide_add("shop", "new", "u-new")
            .await
            .expect_err("a cache miss with a failing API must not be decided");
        let text = err.to_string();
        assert!(text.contains("pod shop/new"), "{fault:?}: {text}");
        // Releases are never confirmed by a failing API.
        assert!(
            k8s.confirm("shop", "web", "u-web").await.is_err(),
            "{fault:?}"
        );
        api.set_fault(None);
    }

    // Healthy again: a new pod in the store is seen, and a cache miss is answered by GETs.
    api.apply_pod(&pod("shop", "api", "u-api", "node-1", "10.230.1.3", &[]));
    // The watch retries on its backoff, which grew during the faults (up to 30 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !k8s
        .desired()
        .unwrap_or_default()
        .iter()
        .any(|(f, _)| f.name == "api")
    {
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.put_namespace("plain", &[]);
    api.apply_pod(&pod("plain", "job", "u-job", "node-1", "10.230.1.4", &[]));
    let (decision, _) = k8s.decide_add("plain", "job", "u-job").await.unwrap();
    assert_eq!(decision, Decision::NotMeshed(Reason::NotLabelled));
    let err = k8s.decide_add("plain", "job", "u-other").await.unwrap_err();
    assert!(err.to_string().contains("not u-other"), "{err}");
}

#[tokio::test]
async fn a_bad_token_file_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [("token\n", "trailing whitespace"), ("", "empty")];
    for (content, want) in cases {
        let path = dir.path().join("token");
        std::fs::write(&path, content).unwrap();
        let err = K8s::start(&KubeSettings {
            api_url: Some("http://127.81.0.6:1".into()),
            token_file: Some(path.clone()),
            node_name: "n".into(),
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("{content:?} accepted"));
        assert!(err.to_string().contains(want), "{err}");
        assert!(err.to_string().contains("token"), "{err}");
    }
    let err = K8s::start(&KubeSettings {
        api_url: Some("http://127.81.0.6:1".into()),
        token_file: Some(dir.path().join("missing")),
        node_name: "n".into(),
    })
    .await
    .err()
    .expect("a missing token file accepted");
    assert!(err.to_string().contains("cannot read it"), "{err}");
}

#[tokio::test]
async fn a_bad_api_url_is_refused_with_a_reason() {
    for url in ["not a url", "ftp://127.81.0.3/", "http://"] {
        let err = K8s::start(&KubeSettings {
            api_url: Some(url.into()),
            token_file: None,
            node_name: "n".into(),
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("{url:?} accepted"));
        assert!(
            err.to_string().contains("invalid Kubernetes API URL"),
            "{err}"
        );
    }
}

/// The agent's label-enrollment options are checked before it starts: no node name, or an API
/// URL that is not one, exits with the configuration exit code and says what is wrong.
#[test]
fn agent_options_for_label_enrollment_are_validated() {
    let bin =
        zmesh_testbed::mesh::redirect_bin(std::path::Path::new(env!("CARGO_BIN_EXE_zmesh-node")));
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(&bin)
            .arg("agent")
            .arg("--zds-socket")
            .arg(dir.path().join("zds.sock"))
            .arg("--admin-socket")
            .arg(dir.path().join("admin.sock"))
            .args(args)
            .env_remove("NODE_NAME")
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("ZMESH_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = run(&["--enroll", "labels"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NODE_NAME"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["--kube-api", "ftp://127.81.0.4/", "--node-name", "n1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid Kubernetes API URL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.path().join("admin.sock").exists(),
        "a refused agent must not take enrollment requests"
    );
}

/// The agent finds the API the ways a deployment gives it: KUBECONFIG (what `kube::Config::infer`
/// reads, as the in-cluster service account is) and `--kube-api` with `--kube-token-file`; both
/// send the token, and only this node's pods are asked for.
#[test]
fn the_agent_reaches_the_api_through_kubeconfig_or_flags_with_its_token() {
    let bin =
        zmesh_testbed::mesh::redirect_bin(std::path::Path::new(env!("CARGO_BIN_EXE_zmesh-node")));
    let api = FakeKube::start("127.81.0.5:0").unwrap();
    api.put_namespace("shop", &[]);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{ server: \"{}\" }}\nusers:\n- name: agent\n  user: {{ token: kubeconfig-token }}\ncontexts:\n- name: fake\n  context: {{ cluster: fake, user: agent }}\ncurrent-context: fake\n",
            api.url()
        ),
    )
    .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "file-token").unwrap();
    // (the Authorization header expected, agent arguments, agent environment)
    type Case<'a> = (&'a str, Vec<String>, Vec<(&'a str, String)>);
    let cases: [Case; 2] = [
        (
            "Bearer kubeconfig-token",
            vec![],
            vec![
                ("KUBECONFIG", kubeconfig.display().to_string()),
                ("NODE_NAME", "node-k".to_owned()),
            ],
        ),
        (
            "Bearer file-token",
            vec![
                "--kube-api".into(),
                api.url(),
                "--kube-token-file".into(),
                token_file.display().to_string(),
                "--node-name".into(),
                "node-f".into(),
            ],
            vec![],
        ),
    ];
    for (i, (bearer, args, envs)) in cases.into_iter().enumerate() {
        let admin = dir.path().join(format!("admin-{i}.sock"));
        let mut child = std::process::Command::new(&bin)
            .arg("agent")
            .arg("--zds-socket")
            .arg(dir.path().join(format!("zds-{i}.sock")))
            .arg("--admin-socket")
            .arg(&admin)
            .args(&args)
            .env_remove("NODE_NAME")
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .envs(envs)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + GUARD;
        while !admin.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "agent {i} never ready"
            );
            assert!(child.try_wait().unwrap().is_none(), "agent {i} exited");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let node = if i == 0 { "node-k" } else { "node-f" };
        let (requests, auths) = (api.requests(), api.authorizations());
        let pod_lists: Vec<_> = requests
            .iter()
            .zip(&auths)
            .filter(|(r, _)| r.contains(&format!("spec.nodeName%3D{node}")))
            .collect();
        assert!(
            !pod_lists.is_empty(),
            "agent {i} never listed its pods: {requests:#?}"
        );
        for (r, auth) in pod_lists {
            assert_eq!(auth, bearer, "{r}");
        }
    }
}
