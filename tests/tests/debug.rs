//! The node debugging commands against live nodes of the single-machine mesh
//! (`mesh_tests::cluster`): each command runs as an operator would run it on the node, and the
//! test reads its `-o json` output. Privileged.
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mesh_tests::cluster::{Binaries, Cluster, ClusterSpec, demo_dir};
use mesh_tests::privileged;
use serde_json::Value;

const ECHO_VIP: &str = "10.96.0.20:9000";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const INTRUDER: &str = "spiffe://cluster.local/ns/demo/sa/intruder";

static SEQ: AtomicU32 = AtomicU32::new(0);

fn bins() -> Binaries {
    Binaries::with_apps_beside(
        env!("CARGO_BIN_EXE_mesh-agent").into(),
        env!("CARGO_BIN_EXE_mesh-controller").into(),
    )
    .expect("the binaries")
}

/// The demo cluster under a prefix unique to this test, once the client reaches echo.
fn up() -> Cluster {
    let prefix = format!(
        "{}d{}",
        mesh_tests::prefix(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let text = std::fs::read_to_string(demo_dir().join("cluster.yaml")).expect("cluster.yaml");
    let spec = ClusterSpec::parse(&text).expect("the demo description parses");
    let cluster = Cluster::up(
        &prefix,
        &spec,
        &demo_dir().join("resources"),
        bins(),
        &[],
        &[],
        &mut |step| eprintln!("[{prefix}] {step}"),
    )
    .unwrap_or_else(|e| panic!("cluster up: {e:#}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !call(&cluster, "demo/client", ECHO_VIP).status.success() {
        assert!(Instant::now() < deadline, "the client never reached echo");
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster
}

fn call(c: &Cluster, pod: &str, target: &str) -> Output {
    c.exec(
        pod,
        &["mesh-demo", "call", "--target", target, "--mode", "tcp"],
    )
    .expect("run the demo client")
}

/// `mesh-agent ARGS` on `node`, as an operator in the agent's pod would run it: in the
/// node's network namespace (where the admin endpoint listens), with the host's filesystems.
fn agent_cmd(c: &Cluster, node: &str, args: &[&str]) -> Output {
    let n = &c.nodes[c.node_index(node).expect("node")];
    let ns = File::open(PathBuf::from("/run/netns").join(&n.netns)).expect("node netns");
    let mut cmd = Command::new(&c.bins.agent);
    cmd.args(args);
    // SAFETY: only setns(2), async-signal-safe, on a descriptor opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    cmd.output().expect("run mesh-agent")
}

/// `mesh-agent ARGS -o json` on `node`: its exit status and JSON.
fn json_of(c: &Cluster, node: &str, args: &[&str]) -> (i32, Value) {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = agent_cmd(c, node, &all);
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "mesh-agent {args:?} on {node} (exit {code}) printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, v)
}

fn pod_health<'a>(status: &'a Value, pod: &str) -> &'a Value {
    status["pods"]
        .as_array()
        .and_then(|pods| pods.iter().find(|p| p["pod"] == pod))
        .unwrap_or_else(|| panic!("no {pod} in the status: {status:#}"))
}

fn failed_checks(pod: &Value) -> Vec<String> {
    pod["checks"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter(|c| c["ok"] != true)
                .map(|c| format!("{}: {}", c["name"], c["detail"]))
                .collect()
        })
        .unwrap_or_default()
}

/// Detaches the link pinned at `pin` from whatever it is attached to, leaving the pin in
/// place (`BPF_LINK_DETACH`): the program is gone from the kernel's hook, while everything the
/// agent keeps says it is there.
fn detach_link(pin: &Path) {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).expect("path");
    // bpf_attr's obj member: pathname, bpf_fd, file_flags, path_fd.
    let mut get = [0u64; 3];
    get[0] = path.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET reads the attribute (a pointer to a NUL-terminated path that lives
    // across the call) and returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            get.as_mut_ptr(),
            std::mem::size_of_val(&get) as libc::c_uint,
        )
    };
    assert!(
        fd >= 0,
        "open the link {}: {}",
        pin.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this descriptor to us.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // bpf_attr's link_detach member: link_fd.
    let mut detach = [0u64; 1];
    detach[0] = link.as_raw_fd() as u64;
    // SAFETY: BPF_LINK_DETACH reads the link descriptor from the attribute.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            detach.as_mut_ptr(),
            std::mem::size_of_val(&detach) as libc::c_uint,
        )
    };
    assert_eq!(
        rc,
        0,
        "detach {}: {}",
        pin.display(),
        std::io::Error::last_os_error()
    );
}

/// The pinned connect4 link of `pod` in the agent instance of `node`.
fn connect4_pin(c: &Cluster, node: &str, pod: &str) -> PathBuf {
    let dir = Path::new(mesh_datapath::config::BPFFS_ROOT)
        .join(c.names.instance(node))
        .join("links")
        .join(mesh_datapath::config::pin_name(pod));
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|build| build.path().join(mesh_common::PROG_CONNECT4))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no connect4 link pinned under {}", dir.display()))
}

/// Flow records of `node` until one satisfies `want`.
fn wait_for_flow(c: &Cluster, node: &str, args: &[&str], want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, page) = json_of(c, node, args);
        assert_eq!(code, 0, "flows on {node}: {page:#}");
        if let Some(r) = page["records"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| want(r)))
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no such flow on {node}: {page:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_node_commands_report_what_the_kernel_and_the_proxy_do() {
    if !privileged("the_node_commands_report_what_the_kernel_and_the_proxy_do") {
        return;
    }
    let c = up();

    // status: every pod of both nodes is checked healthy, the controller connected.
    for node in ["node-1", "node-2"] {
        let (code, status) = json_of(&c, node, &["status"]);
        assert_eq!(code, 0, "status of {node}: {status:#}");
        assert_eq!(status["healthy"], true, "{status:#}");
        assert_eq!(status["controller"]["connected"], true);
        let pods = status["pods"].as_array().expect("pods");
        assert!(!pods.is_empty(), "{status:#}");
        for p in pods {
            assert!(failed_checks(p).is_empty(), "{p:#}");
            let capture = p["checks"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"] == "capture"))
                .expect("a capture check");
            assert!(
                capture["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("127.0.0.1:15001")),
                "{capture:#}"
            );
        }
        assert!(
            status["maps"]
                .as_array()
                .expect("maps")
                .iter()
                .any(|m| m["name"] == "PODS_V1" && m["entries"] == pods.len()),
            "{status:#}"
        );
        // Every hook of every pod is listed from the kernel, IPv6 ones included.
        let programs = status["programs"].as_array().expect("programs");
        let attached = |pod: &Value, program: &str| {
            programs
                .iter()
                .any(|a| a["owner"] == *pod && a["program"] == program && a["attached"] == true)
        };
        for p in pods {
            for program in ["mesh_connect4", "mesh_connect6", "mesh_sk_lookup"] {
                assert!(
                    attached(&p["pod"], program),
                    "{program} of {}: {programs:#?}",
                    p["pod"]
                );
            }
            // IPv6 inbound is refused for STRICT pods only (demo/legacy is PERMISSIVE).
            let strict = p["pod"] != "demo/legacy";
            assert_eq!(
                attached(&p["pod"], "mesh_sk_lookup6"),
                strict,
                "{}: {programs:#?}",
                p["pod"]
            );
        }
    }

    // pods: identity from the configuration, the kernel's entry.
    let (code, pods) = json_of(&c, "node-2", &["pods"]);
    assert_eq!(code, 0);
    let echo = pods
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "demo/echo"))
        .unwrap_or_else(|| panic!("no demo/echo: {pods:#}"));
    assert_eq!(echo["identity"], "spiffe://cluster.local/ns/demo/sa/echo");
    assert_eq!(echo["mode"], "STRICT");
    assert!(echo["kernel"]["cgroup_id"].as_u64().is_some(), "{echo:#}");

    // certs: the node's identities, valid.
    let (code, certs) = json_of(&c, "node-2", &["certs"]);
    assert_eq!(code, 0, "{certs:#}");
    assert!(
        certs
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["identity"]
                == "spiffe://cluster.local/ns/demo/sa/echo"
                && c["state"] == "valid")),
        "{certs:#}"
    );

    // conns: a connection held open, as both ends' proxies carry it.
    let client = c.pod("demo/client").expect("client");
    let mut held = mesh_tests::cluster::command_in(
        Path::new(env!("CARGO_BIN_EXE_mesh-probe")),
        &client.cgroup,
        &client.netns_path(),
    )
    .expect("command in the client pod");
    let mut held = held
        .args([ECHO_VIP, "hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("hold a connection");
    let mut line = String::new();
    BufReader::new(held.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the held connection's address");
    assert!(line.starts_with("local="), "{line}");
    let (code, conns) = json_of(&c, "node-1", &["conns", "--pod", "demo/client"]);
    assert_eq!(code, 0);
    assert!(
        conns
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["direction"] == "outbound"
                && c["path"] == "hbone"
                && c["protocol"] == "tcp"
                && c["dst"]["workload"] == "echo"
                && c["service"] == "echo.demo.svc.cluster.local")),
        "{conns:#}"
    );
    let (_, conns) = json_of(&c, "node-2", &["conns", "--pod", "echo"]);
    assert!(
        conns.as_array().is_some_and(|cs| cs
            .iter()
            .any(|c| c["direction"] == "inbound" && c["src"]["identity"] == CLIENT)),
        "{conns:#}"
    );
    drop(held.stdin.take());
    let _ = held.wait();

    // A call the policy allows and one it denies; flows on both ends say so, with the reason.
    assert!(call(&c, "demo/client", ECHO_VIP).status.success());
    assert!(!call(&c, "demo/intruder", ECHO_VIP).status.success());
    let denied = wait_for_flow(&c, "node-2", &["flows", "--pod", "demo/echo"], |r| {
        r["proxy"]["verdict"] == "denied" && r["proxy"]["src_identity"] == INTRUDER
    });
    let reason = denied["proxy"]["reason"]
        .as_str()
        .expect("a reason")
        .to_string();
    assert_eq!(reason, "no_traffic_target", "{denied:#}");
    assert_eq!(denied["proxy"]["path"], "hbone");
    wait_for_flow(&c, "node-2", &["flows", "--pod", "demo/echo"], |r| {
        r["proxy"]["verdict"] == "allowed" && r["proxy"]["src_identity"] == CLIENT
    });
    wait_for_flow(&c, "node-1", &["flows", "--pod", "demo/intruder"], |r| {
        r["proxy"]["direction"] == "outbound" && r["proxy"]["reason"] == "destination_denied"
    });

    // Plaintext from the node to a STRICT pod: the kernel steered it, the proxy refused it;
    // flows shows both on one record.
    let echo_ip = c.pod("demo/echo").expect("echo").ip;
    let plain = c
        .exec_on_node(
            "node-2",
            &[
                c.bins.apps.join("mesh-demo").to_str().expect("path"),
                "call",
                "--target",
                &format!("{echo_ip}:9000"),
                "--mode",
                "tcp",
            ],
        )
        .expect("plaintext call");
    assert!(!plain.status.success(), "plaintext reached a STRICT pod");
    let joined = wait_for_flow(&c, "node-2", &["flows", "--pod", "demo/echo"], |r| {
        r["kernel"]["verdict"] == "steered" && r["proxy"]["reason"] == "plaintext_strict"
    });
    assert_eq!(joined["kernel"]["dst"], format!("{echo_ip}:9000"));
    assert_eq!(joined["proxy"]["path"], "plaintext");

    // policy check: the same authorize as the proxy, the same verdict and reason.
    let (code, check) = json_of(
        &c,
        "node-2",
        &[
            "policy",
            "check",
            "--from",
            INTRUDER,
            "--to",
            "demo/echo:9000",
        ],
    );
    assert_eq!(code, 1, "denied exits 1: {check:#}");
    assert_eq!(check["verdict"], "denied");
    assert_eq!(check["decisions"][0]["kind"], reason.as_str(), "{check:#}");
    let (code, check) = json_of(
        &c,
        "node-2",
        &[
            "policy",
            "check",
            "--from",
            CLIENT,
            "--to",
            "demo/echo:9000",
        ],
    );
    assert_eq!(code, 0, "{check:#}");
    assert_eq!(check["verdict"], "allowed");
    assert_eq!(
        check["decisions"][0]["traffic_target"], "demo/client-to-echo",
        "{check:#}"
    );
    // Through the service VIP, from a pod of this node the configuration knows.
    let (code, check) = json_of(
        &c,
        "node-1",
        &[
            "policy",
            "check",
            "--from",
            "demo/intruder",
            "--to",
            "10.96.0.21:9000",
        ],
    );
    assert_eq!(
        (code, &check["verdict"]),
        (1, &Value::from("denied")),
        "{check:#}"
    );
    let (code, policy) = json_of(&c, "node-2", &["policy", "demo/echo"]);
    assert_eq!(code, 0);
    assert_eq!(
        policy["policy"]["rules"][0]["traffic_target"]["name"],
        "client-to-echo"
    );

    // Clear errors: no agent there, a pod nobody knows, a map that does not exist.
    let out = agent_cmd(&c, "node-1", &["status", "--admin", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent answers at 127.0.0.1:1"));
    let out = agent_cmd(&c, "node-1", &["pods", "demo/nope"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown pod demo/nope"));
    let instance = c.names.instance("node-1");
    let out = agent_cmd(&c, "node-1", &["bpf", "nope", "--instance", &instance]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");

    // bpf: the pod table decoded, a counter by name.
    let (code, table) = json_of(&c, "node-1", &["bpf", "pods", "--instance", &instance]);
    assert_eq!(code, 0, "{table:#}");
    let client_ip = c.pod("demo/client").expect("client").ip.to_string();
    assert!(
        table["entries"]
            .as_array()
            .is_some_and(|es| es.iter().any(|e| e["key"] == client_ip.as_str())),
        "{table:#}"
    );
    let (code, counter) = json_of(
        &c,
        "node-1",
        &[
            "bpf",
            "counters",
            "get",
            "connect4_redirected",
            "--instance",
            &instance,
        ],
    );
    assert_eq!(code, 0);
    assert!(counter["entries"][0]["value_fields"]["value"].as_u64() > Some(0));

    // Every command's human output fits 100 columns.
    let human: [&[&str]; 9] = [
        &["status"],
        &["pods"],
        &["pods", "demo/client"],
        &["conns"],
        &["certs"],
        &["policy", "demo/echo-local"],
        &[
            "policy",
            "check",
            "--from",
            "demo/client",
            "--to",
            "demo/echo-local:9000",
        ],
        &["flows", "--probes"],
        &["bpf", "--instance", &instance],
    ];
    for args in human {
        let out = agent_cmd(&c, "node-1", args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.trim().is_empty(), "{args:?} printed nothing: {out:?}");
        for line in text.lines() {
            assert!(
                line.chars().count() <= 100,
                "{args:?}: wider than 100: {line}"
            );
        }
    }
    let out = Command::new(&c.bins.agent)
        .args(["doctor", "--no-load", "-o", "json"])
        .output()
        .expect("doctor");
    let checks: Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert!(
        checks
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == "cgroup layout")),
        "{checks:#}"
    );
    // Another mesh's redirect rules deserve a warning, not a failed preflight.
    assert!(
        checks.as_array().is_some_and(|cs| cs
            .iter()
            .any(|c| c["name"] == "redirect rules" && c["required"] == false)),
        "{checks:#}"
    );

    // Behind the agent's back: the client's connect4 program is detached from its cgroup.
    // The agent's pins still say it is there; status must not believe them.
    detach_link(&connect4_pin(&c, "node-1", "demo/client"));
    let (code, status) = json_of(&c, "node-1", &["status"]);
    assert_eq!(code, 1, "an unhealthy status exits 1: {status:#}");
    assert_eq!(status["healthy"], false);
    let client = pod_health(&status, "demo/client");
    assert_eq!(client["healthy"], false, "{client:#}");
    let failed = failed_checks(client);
    assert!(
        failed.iter().any(|f| f.starts_with("\"connect4\"")),
        "{failed:?}"
    );
    assert!(
        failed.iter().any(|f| f.starts_with("\"capture\"")),
        "the probe connection must find capture broken: {failed:?}"
    );
    let intruder = pod_health(&status, "demo/intruder");
    assert!(failed_checks(intruder).is_empty(), "{intruder:#}");
    // And the human output says which pod and why.
    let out = agent_cmd(&c, "node-1", &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAILING"), "{text}");
    assert!(
        text.contains("demo/client: connect4: mesh_connect4 is not attached"),
        "{text}"
    );
    for line in text.lines() {
        assert!(
            line.chars().count() <= 100,
            "wider than 100 columns: {line}"
        );
    }
    c.down().expect("teardown");
}
