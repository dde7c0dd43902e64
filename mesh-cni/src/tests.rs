use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::mpsc;

use serde_json::json;

use super::*;

const UID: &str = "0f0e0d0c-1b1a-4c3d-8e5f-a1b2c3d4e5f6";

fn prev() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
        "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}],
    })
}

fn env(command: &str, namespace: &str) -> CniEnv {
    CniEnv {
        command: command.into(),
        container_id: "c0ffee".into(),
        netns: "/var/run/netns/cni-1".into(),
        ifname: "eth0".into(),
        args: format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID={UID}"
        ),
    }
}

fn stdin(socket: &Path, extra: Value) -> Vec<u8> {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "mesh-cni",
        "agentSocket": socket,
        "timeoutSeconds": 5,
        "prevResult": prev(),
    });
    if let (Value::Object(c), Value::Object(e)) = (&mut conf, extra) {
        c.extend(e);
    }
    serde_json::to_vec(&conf).expect("json")
}

/// A stand-in for the agent's socket: answers each request with `answer`, reports requests.
fn agent(dir: &Path, answer: Response) -> (PathBuf, mpsc::Receiver<Request>) {
    let path = dir.join("cni.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_err() {
                continue;
            }
            let Ok(req) = serde_json::from_str::<Request>(&line) else {
                continue;
            };
            let _ = tx.send(req);
            let mut out = serde_json::to_vec(&answer).expect("json");
            out.push(b'\n');
            let _ = conn.write_all(&out);
        }
    });
    (path, rx)
}

#[test]
fn add_hands_the_pod_to_the_agent_and_passes_the_primary_result_on() {
    let dir = tempfile::tempdir().expect("dir");
    let (socket, requests) = agent(dir.path(), Response::Enrolled);
    let out = run(&env("ADD", "shop"), &stdin(&socket, json!({})))
        .expect("add")
        .expect("a result");
    let out: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(out, prev(), "the primary plugin's result, unchanged");
    let req = requests.recv().expect("the agent was asked");
    assert_eq!(
        req,
        Request {
            op: Op::Add,
            pod: PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: Some(UID.into()),
            },
            container_id: "c0ffee".into(),
            netns: "/var/run/netns/cni-1".into(),
            ifname: "eth0".into(),
            ips: vec!["10.244.1.7".into()],
        }
    );
}

#[test]
fn a_meshed_pod_does_not_start_while_the_agent_is_unreachable_or_fails() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("nobody.sock");
    let e = run(&env("ADD", "shop"), &stdin(&missing, json!({}))).expect_err("unreachable");
    assert_eq!(e.code, CniError::TRY_AGAIN_LATER);
    assert!(
        e.msg.contains("shop/web-0") && e.msg.contains("retried"),
        "{e}"
    );
    let json: Value = serde_json::from_str(&e.to_json("1.0.0")).expect("json");
    assert_eq!(json["code"], 11);
    assert_eq!(json["cniVersion"], "1.0.0");

    let (socket, _requests) = agent(
        dir.path(),
        Response::Failed {
            message: "inbound map full".into(),
        },
    );
    let e = run(&env("ADD", "shop"), &stdin(&socket, json!({}))).expect_err("refused");
    assert_eq!(e.code, CniError::ENROLL_FAILED);
    assert_eq!(e.details, "inbound map full");
    // CHECK says the same.
    let e = run(&env("CHECK", "shop"), &stdin(&socket, json!({}))).expect_err("check");
    assert_eq!(e.code, CniError::ENROLL_FAILED);
}

#[test]
fn pods_outside_the_mesh_pass_at_once() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("nobody.sock");
    // An excluded namespace never waits for the agent, even one that is down.
    let out = run(
        &env("ADD", "kube-system"),
        &stdin(
            &missing,
            json!({"excludeNamespaces": ["kube-system", "mesh-system"]}),
        ),
    )
    .expect("excluded")
    .expect("a result");
    assert_eq!(serde_json::from_str::<Value>(&out).expect("json"), prev());
    // Not a Kubernetes pod at all.
    let mut plain = env("ADD", "x");
    plain.args = "IgnoreUnknown=1".into();
    assert!(run(&plain, &stdin(&missing, json!({}))).is_ok());
    // The agent says the pod is not meshed.
    let (socket, _r) = agent(dir.path(), Response::NotMeshed);
    assert!(run(&env("ADD", "shop"), &stdin(&socket, json!({}))).is_ok());
}

#[test]
fn del_never_holds_up_a_deletion() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("nobody.sock");
    let mut del = env("DEL", "shop");
    // The sandbox may be gone already: no namespace, no previous result.
    del.netns.clear();
    let conf =
        json!({"cniVersion": "1.0.0", "name": "n", "type": "mesh-cni", "agentSocket": missing});
    let conf = serde_json::to_vec(&conf).expect("json");
    assert_eq!(run(&del, &conf).expect("unreachable agent"), None);
    let (socket, requests) = agent(dir.path(), Response::Removed);
    let conf =
        json!({"cniVersion": "1.0.0", "name": "n", "type": "mesh-cni", "agentSocket": socket});
    assert_eq!(
        run(&del, &serde_json::to_vec(&conf).expect("json")).expect("del"),
        None
    );
    assert_eq!(requests.recv().expect("asked").op, Op::Del);
}

#[test]
fn bad_calls_get_the_spec_s_error_codes() {
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("nobody.sock");
    let good = stdin(&socket, json!({}));
    let cases: Vec<(CniEnv, Vec<u8>, u32)> = vec![
        (
            env("ADD", "shop"),
            b"{not json".to_vec(),
            CniError::DECODING,
        ),
        (
            env("ADD", "shop"),
            stdin(&socket, json!({"cniVersion": "0.2.0"})),
            CniError::INCOMPATIBLE_VERSION,
        ),
        (
            env("ADD", "shop"),
            stdin(&socket, json!({"type": "bridge"})),
            CniError::INVALID_CONFIG,
        ),
        (
            env("ADD", "shop"),
            stdin(&socket, json!({"prevResult": null})),
            CniError::INVALID_CONFIG,
        ),
        (
            env("ADD", "shop"),
            stdin(&socket, json!({"timeoutSeconds": 0})),
            CniError::INVALID_CONFIG,
        ),
        (env("FROB", "shop"), good.clone(), CniError::INVALID_ENV),
        (env("", "shop"), good.clone(), CniError::INVALID_ENV),
        (
            CniEnv {
                netns: String::new(),
                ..env("ADD", "shop")
            },
            good.clone(),
            CniError::INVALID_ENV,
        ),
        (
            CniEnv {
                args: "K8S_POD_NAME".into(),
                ..env("ADD", "shop")
            },
            good.clone(),
            CniError::INVALID_ENV,
        ),
    ];
    for (i, (env, input, code)) in cases.into_iter().enumerate() {
        let e = run(&env, &input).expect_err(&format!("case {i}"));
        assert_eq!(e.code, code, "case {i}: {e}");
    }
}

#[test]
fn version_lists_what_the_plugin_speaks() {
    let out = run(&env("VERSION", ""), b"")
        .expect("version")
        .expect("out");
    let v: Value = serde_json::from_str(&out).expect("json");
    let versions = v["supportedVersions"].as_array().expect("list");
    assert!(versions.iter().any(|x| x == "0.4.0") && versions.iter().any(|x| x == "1.0.0"));
}

#[test]
fn cni_args_name_the_pod_or_nothing() {
    assert_eq!(
        pod_from_args("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b").expect("ok"),
        Some(PodRef {
            namespace: "a".into(),
            name: "b".into(),
            uid: None
        })
    );
    assert_eq!(pod_from_args("").expect("ok"), None);
    assert_eq!(pod_from_args("K8S_POD_NAMESPACE=a").expect("ok"), None);
    assert_eq!(
        pod_from_args("K8S_POD_NAMESPACE=;K8S_POD_NAME=b").expect("ok"),
        None
    );
    assert!(pod_from_args("a=b;junk").is_err());
    assert_eq!(
        result_ips(&json!({"ips": [{"address": "10.0.0.2/24"}, {"address": "fd00::2/64"}]})),
        ["10.0.0.2", "fd00::2"]
    );
    assert!(result_ips(&json!({})).is_empty());
}

// === Installation ===

fn entry() -> Value {
    json!({"type": "mesh-cni", "excludeNamespaces": ["kube-system"]})
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
}

#[test]
fn install_chains_into_the_runtime_s_first_conflist_once_and_uninstall_restores_it() {
    let dir = tempfile::tempdir().expect("dir");
    let primary = json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    let first = dir.path().join("10-bridge.conflist");
    std::fs::write(&first, serde_json::to_vec(&primary).expect("json")).expect("write");
    // A later file is not the one the runtime uses.
    let later = dir.path().join("99-other.conflist");
    std::fs::write(&later, br#"{"name":"x","plugins":[{"type":"loopback"}]}"#).expect("write");

    assert_eq!(install(dir.path(), &entry()).expect("install"), first);
    let conf = read(&first);
    let plugins = conf["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.len(), 3);
    assert_eq!(
        plugins[..2],
        primary["plugins"].as_array().expect("list")[..]
    );
    assert_eq!(plugins[2], entry());
    assert_eq!(read(&later)["plugins"].as_array().expect("list").len(), 1);

    // Installing again (an agent restart, a new setting) replaces its entry, never adds one.
    let newer = json!({"type": "mesh-cni", "timeoutSeconds": 10});
    install(dir.path(), &newer).expect("again");
    let plugins = read(&first)["plugins"].as_array().expect("list").clone();
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[2], newer);

    assert_eq!(
        uninstall(dir.path()).expect("uninstall"),
        vec![first.clone()]
    );
    assert_eq!(read(&first), primary);
    assert!(uninstall(dir.path()).expect("again").is_empty());
    // No temporary file left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist() {
    let dir = tempfile::tempdir().expect("dir");
    let conf = json!({"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "br0"});
    let path = dir.path().join("10-net.conf");
    std::fs::write(&path, serde_json::to_vec(&conf).expect("json")).expect("write");
    let list = install(dir.path(), &entry()).expect("install");
    assert_eq!(list, dir.path().join("10-net.conflist"));
    assert!(
        !path.exists(),
        "the .conf would be read before the conflist"
    );
    let got = read(&list);
    assert_eq!(got["cniVersion"], "0.4.0");
    assert_eq!(got["name"], "net");
    assert_eq!(got["plugins"], json!([conf, entry()]));
}

#[test]
fn install_refuses_what_it_cannot_understand_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let e = install(dir.path(), &entry()).expect_err("empty dir");
    assert!(matches!(e, install::InstallError::NoConfig { .. }), "{e}");
    let path = dir.path().join("10-bad.conflist");
    std::fs::write(&path, b"{\"plugins\": 5}").expect("write");
    let e = install(dir.path(), &entry()).expect_err("bad list");
    assert!(e.to_string().contains("not a list"), "{e}");
    std::fs::write(&path, b"{nope").expect("write");
    assert!(install(dir.path(), &entry()).is_err());
    assert_eq!(std::fs::read(&path).expect("read"), b"{nope");
    let e = install(dir.path(), &json!({"type": "bridge"})).expect_err("not ours");
    assert!(matches!(e, install::InstallError::BadEntry), "{e}");
}
