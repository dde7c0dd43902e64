//! Compatibility: real, unmodified programs as a user would deploy them, on the single-machine
//! mesh. A client pod on node-1 calls servers in pods on node-2 through their Services, each
//! port declared as a real cluster would declare it (`http`, `http2` and `grpc` are carried at
//! L7, the rest as TCP). Every call is checked for its answer and for having crossed the mesh:
//! the destination agent counts the connection as an HBONE tunnel in mutual TLS from the
//! client's identity. Privileged; the programs come from Debian packages that `cargo xtask
//! prereqs` installs, and a test whose program is missing says which.
//!
//! The Python programs are in `tests/compat/`; they run with Debian's interpreter, which has
//! the Debian Python packages.
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

#[allow(dead_code, reason = "each suite uses a subset")]
mod common;

use mesh_tests::cluster::{Cluster, ClusterSpec, NodeSpec, PodSpec};
use mesh_tests::{installed, privileged};

/// Debian's interpreter (the Debian Python packages are installed for it).
const PYTHON: &str = "/usr/bin/python3";
const CLIENT: &str = "compat/client";
const SPIFFE_CLIENT: &str = "spiffe://cluster.local/ns/compat/sa/client";

const NGINX_VIP: &str = "10.96.1.10";
const REDIS_VIP: &str = "10.96.1.20";
const IPERF_VIP: &str = "10.96.1.30";
const GRPC_VIP: &str = "10.96.1.40";
const SMTP_VIP: &str = "10.96.1.50";
const WS_VIP: &str = "10.96.1.60";

/// The Services in front of the servers (ports named as a real cluster would name them), and
/// a TrafficTarget from the client to each server's service account.
const RESOURCES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: nginx, namespace: compat}
spec:
  clusterIP: 10.96.1.10
  selector: {app: nginx}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: http2, port: 81, targetPort: 8081}
---
apiVersion: v1
kind: Service
metadata: {name: redis, namespace: compat}
spec:
  clusterIP: 10.96.1.20
  selector: {app: redis}
  ports:
  - {name: tcp-redis, port: 6379, targetPort: 6379}
---
apiVersion: v1
kind: Service
metadata: {name: iperf, namespace: compat}
spec:
  clusterIP: 10.96.1.30
  selector: {app: iperf}
  ports:
  - {name: tcp-iperf, port: 5201, targetPort: 5201}
---
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: compat}
spec:
  clusterIP: 10.96.1.40
  selector: {app: grpc}
  ports:
  - {name: grpc, port: 50051, targetPort: 50051}
---
apiVersion: v1
kind: Service
metadata: {name: smtp, namespace: compat}
spec:
  clusterIP: 10.96.1.50
  selector: {app: smtp}
  ports:
  - {name: tcp-smtp, port: 25, targetPort: 2525}
---
apiVersion: v1
kind: Service
metadata: {name: ws, namespace: compat}
spec:
  clusterIP: 10.96.1.60
  selector: {app: ws}
  ports:
  - {name: http, port: 80, targetPort: 8765}
  - {name: tcp-ws, port: 81, targetPort: 8766}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: server-ports, namespace: compat}
spec:
  matches: {ports: [8080, 8081, 6379, 5201, 50051, 2525, 8765, 8766]}
"#;

const SERVERS: [&str; 6] = ["nginx", "redis", "iperf", "grpc", "smtp", "ws"];

fn resources() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("resources directory");
    let mut yaml = RESOURCES.to_string();
    for server in SERVERS {
        yaml.push_str(&format!(
            "---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: client-to-{server}, namespace: compat}}
spec:
  destination: {{kind: ServiceAccount, name: {server}, namespace: compat}}
  rules: [{{kind: TCPRoute, name: server-ports}}]
  sources: [{{kind: ServiceAccount, name: client, namespace: compat}}]
"
        ));
    }
    std::fs::write(dir.path().join("compat.yaml"), yaml).expect("write the resources");
    dir
}

fn pod(name: &str, ports: &[u16], run: Vec<String>) -> PodSpec {
    PodSpec {
        namespace: "compat".into(),
        name: name.into(),
        service_account: Some(name.into()),
        labels: [("app".to_string(), name.to_string())].into(),
        tls_mode: None,
        ports: ports.to_vec(),
        annotations: Default::default(),
        probe_port: None,
        run,
    }
}

/// The client on node-1 and `server` on node-2, every agent started with `agent_args`.
fn up(server: PodSpec, agent_args: &[&str]) -> (Cluster, tempfile::TempDir) {
    let spec = ClusterSpec {
        nodes: vec![
            NodeSpec {
                name: "node-1".into(),
                pods: vec![pod("client", &[], vec![])],
            },
            NodeSpec {
                name: "node-2".into(),
                pods: vec![server],
            },
        ],
        enrollment: Default::default(),
    };
    let dir = resources();
    let c = common::up_spec(&spec, dir.path(), agent_args, &[]);
    (c, dir)
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// A script of `tests/compat/`.
fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("compat")
        .join(name)
        .display()
        .to_string()
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `args` in the client pod.
fn exec(c: &Cluster, args: &[&str]) -> Output {
    c.exec(CLIENT, args)
        .unwrap_or_else(|e| panic!("run {args:?} in the client pod: {e:#}"))
}

/// Runs `args` in the client pod until it succeeds: the first call of a fresh cluster may come
/// before the agents have their configuration and certificates.
fn exec_until_ok(c: &Cluster, args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = exec(c, args);
        if out.status.success() {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{args:?} from the client pod never succeeded:\n{}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The sum of the samples of metric `name` in node-2's agent that it reported as the
/// destination of HBONE tunnels in mutual TLS from the client, to `workload`.
fn meshed(c: &Cluster, name: &str, workload: &str) -> u64 {
    let metrics = c
        .agent_admin("node-2", "/metrics")
        .expect("node-2's metrics");
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            [
                ("reporter", "destination"),
                ("destination_workload", workload),
                ("source_principal", SPIFFE_CLIENT),
                ("connection_security_policy", "mutual_tls"),
                ("mesh_path", "hbone"),
            ]
            .iter()
            .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Connections node-2 accepted for `workload` over HBONE in mutual TLS from the client.
fn tunnels(c: &Cluster, workload: &str) -> u64 {
    meshed(c, "istio_tcp_connections_opened_total", workload)
}

/// Requests node-2 passed to `workload` that came over HBONE in mutual TLS from the client
/// (on an L7 port the source proxy reuses its tunnels, so requests, not connections, count).
fn requests(c: &Cluster, workload: &str) -> u64 {
    meshed(c, "istio_requests_total", workload)
}

/// Asserts that node-2 counted at least `at_least` more tunnels to `workload` than `before`;
/// the new count.
fn assert_crossed(c: &Cluster, workload: &str, before: u64, at_least: u64, what: &str) -> u64 {
    assert_counted(c, tunnels, "tunnels", workload, before, at_least, what)
}

/// As [`assert_crossed`], for requests on an L7 port.
fn assert_requests(c: &Cluster, workload: &str, before: u64, at_least: u64, what: &str) -> u64 {
    assert_counted(c, requests, "requests", workload, before, at_least, what)
}

fn assert_counted(
    c: &Cluster,
    count: fn(&Cluster, &str) -> u64,
    unit: &str,
    workload: &str,
    before: u64,
    at_least: u64,
    what: &str,
) -> u64 {
    // The destination counts when the connection or the request ends; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = count(c, workload);
        if now >= before + at_least {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: node-2 counted {} new {unit} in mutual TLS from the client to {workload}, \
             expected at least {at_least}",
            now - before
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// === nginx ===

/// Stock nginx in the foreground: HTTP/1.1 on 8080, HTTP/2 without TLS (h2c) on 8081, a
/// generated file to download, everything else in `dir`.
fn nginx(dir: &Path) -> PodSpec {
    let www = dir.join("www");
    std::fs::create_dir_all(&www).expect("nginx's root");
    let blob: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(www.join("blob.bin"), blob).expect("nginx's file");
    let d = dir.display();
    let conf = format!(
        r#"user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    server {{
        listen 8080;
        listen 8081 http2;
        root {d}/www;
        location = /hello {{
            default_type text/plain;
            return 200 "nginx $server_protocol\n";
        }}
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    pod(
        "nginx",
        &[8080, 8081],
        argv(&[
            "nginx",
            "-p",
            &dir.display().to_string(),
            "-e",
            &dir.join("error.log").display().to_string(),
            "-c",
            &path.display().to_string(),
            "-g",
            "daemon off;",
        ]),
    )
}

#[test]
fn curl_talks_http1_and_http2_to_nginx() {
    let test = "curl_talks_http1_and_http2_to_nginx";
    if !privileged(test)
        || !installed(
            test,
            &[
                ("nginx", &["-v"], "nginx"),
                ("curl", &["--version"], "curl"),
            ],
        )
    {
        return;
    }
    let dir = tempfile::tempdir().expect("nginx's directory");
    let (c, _resources) = up(nginx(dir.path()), &[]);

    // HTTP/1.1 on the `http` port, with the simulator's own `exec` (what a user types).
    let before = requests(&c, "nginx");
    let url = format!("http://{NGINX_VIP}/hello");
    let out = exec_until_ok(&c, &["curl", "-sS", "--fail", &url]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "nginx HTTP/1.1\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-sim"))
        .args(["exec", "--prefix", &c.names.prefix, CLIENT, "--"])
        .args(["curl", "-sS", "--fail", &url])
        .output()
        .expect("run mesh-sim exec");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "nginx HTTP/1.1\n",
        "{}",
        text(&out)
    );
    // The command's exit status comes back through `mesh-sim exec`: 22 is curl's for a 404.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-sim"))
        .args(["exec", "--prefix", &c.names.prefix, CLIENT, "--"])
        .args([
            "curl",
            "-sS",
            "--fail",
            &format!("http://{NGINX_VIP}/absent"),
        ])
        .output()
        .expect("run mesh-sim exec");
    assert_eq!(out.status.code(), Some(22), "{}", text(&out));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-sim"))
        .args(["exec", "--prefix", &c.names.prefix, CLIENT, "--"])
        .arg("no-such-program-anywhere")
        .output()
        .expect("run mesh-sim exec");
    assert_eq!(out.status.code(), Some(127), "{}", text(&out));
    let before = assert_requests(&c, "nginx", before, 3, "curl HTTP/1.1");

    // 4 MiB in one HTTP/1.1 response, every byte.
    let download = |extra: &[&str], url: &str| -> String {
        let mut args = vec![
            "curl",
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{size_download}",
        ];
        args.extend_from_slice(extra);
        args.push(url);
        let out = exec(&c, &args);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let size = 4u64 << 20;
    assert_eq!(
        download(&[], &format!("http://{NGINX_VIP}/blob.bin")),
        format!("1.1 {size}")
    );
    let before = assert_requests(&c, "nginx", before, 1, "a 4 MiB HTTP/1.1 download");

    // HTTP/2 with prior knowledge (h2c) on the `http2` port, nginx answering in HTTP/2.
    let url = format!("http://{NGINX_VIP}:81/hello");
    let out = exec(
        &c,
        &["curl", "-sS", "--fail", "--http2-prior-knowledge", &url],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "nginx HTTP/2.0\n");
    assert_eq!(
        download(
            &["--http2-prior-knowledge"],
            &format!("http://{NGINX_VIP}:81/blob.bin")
        ),
        format!("2 {size}")
    );
    let before = assert_requests(&c, "nginx", before, 2, "curl --http2-prior-knowledge");

    // HTTP/2 with prior knowledge to the `http` port, where nginx speaks only HTTP/1.1: the
    // declared protocol is what the application gets, whatever the client spoke.
    let out = exec(
        &c,
        &[
            "curl",
            "-sS",
            "--fail",
            "--http2-prior-knowledge",
            &format!("http://{NGINX_VIP}/hello"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "nginx HTTP/1.1\n");
    assert_eq!(
        download(
            &["--http2-prior-knowledge"],
            &format!("http://{NGINX_VIP}/blob.bin")
        ),
        format!("2 {size}")
    );
    assert_requests(&c, "nginx", before, 2, "HTTP/2 to an HTTP/1.1 port");
    c.down().expect("teardown");
}

// === Redis ===

#[test]
fn redis_cli_and_redis_benchmark_talk_to_redis_server() {
    let test = "redis_cli_and_redis_benchmark_talk_to_redis_server";
    if !privileged(test)
        || !installed(
            test,
            &[
                ("redis-server", &["--version"], "redis-server"),
                ("redis-cli", &["--version"], "redis-tools"),
                ("redis-benchmark", &["--version"], "redis-tools"),
            ],
        )
    {
        return;
    }
    let dir = tempfile::tempdir().expect("redis's directory");
    let server = pod(
        "redis",
        &[6379],
        argv(&[
            "redis-server",
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.path().display().to_string(),
        ]),
    );
    let (c, _resources) = up(server, &[]);
    let before = tunnels(&c, "redis");
    let cli = |args: &[&str]| -> String {
        let mut all = vec!["redis-cli", "-h", REDIS_VIP, "-p", "6379"];
        all.extend_from_slice(args);
        let out = exec_until_ok(&c, &all);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["SET", "compat-key", "through the mesh"]), "OK");
    assert_eq!(cli(&["GET", "compat-key"]), "through the mesh");
    let before = assert_crossed(&c, "redis", before, 2, "redis-cli SET and GET");

    // 50 clients (redis-benchmark's default), each test in turn.
    let out = exec(
        &c,
        &[
            "redis-benchmark",
            "-h",
            REDIS_VIP,
            "-p",
            "6379",
            "-n",
            "20000",
            "-q",
            "-t",
            "set,get,incr,lpush,lpop,mset",
        ],
    );
    let report = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(out.status.success(), "{}", text(&out));
    for name in ["SET", "GET", "INCR", "LPUSH", "LPOP", "MSET"] {
        assert!(
            report.lines().any(|l| l
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([':', ' ']))
                && l.contains("requests per second")),
            "no result for {name} in redis-benchmark's report:\n{report}\n{}",
            text(&out)
        );
    }
    assert!(
        !report.to_lowercase().contains("error"),
        "redis-benchmark reports an error:\n{report}"
    );
    assert_crossed(&c, "redis", before, 50, "redis-benchmark");
    assert_eq!(cli(&["GET", "compat-key"]), "through the mesh");
    c.down().expect("teardown");
}

// === iperf3 ===

/// `iperf3 -c` for `seconds`, 4 streams each way at once (`--bidir`); asserts it completed
/// without error, moved data both ways, and crossed the mesh.
fn iperf3_bulk(test: &str, agent_args: &[&str], seconds: u32) {
    if !privileged(test) || !installed(test, &[("iperf3", &["--version"], "iperf3")]) {
        return;
    }
    // One bulk run at a time: two of them at once (8 streams each) starve a small machine's
    // other tests and each other.
    static BULK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BULK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (c, _resources) = up(pod("iperf", &[5201], argv(&["iperf3", "-s"])), agent_args);
    let before = tunnels(&c, "iperf");
    // A short run first: it waits for the mesh's configuration and certificates.
    exec_until_ok(&c, &["iperf3", "-c", IPERF_VIP, "-t", "1"]);
    let before = assert_crossed(&c, "iperf", before, 2, "a 1 s iperf3 run");

    let secs = seconds.to_string();
    let started = Instant::now();
    let out = exec(
        &c,
        &[
            "iperf3", "-c", IPERF_VIP, "-t", &secs, "-P", "4", "--bidir", "-J",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3's JSON report: {e}\n{}", text(&out)));
    assert!(
        out.status.success() && report.get("error").is_none(),
        "iperf3 -t {secs} -P 4 --bidir failed after {:.1} s: {}\n{}",
        started.elapsed().as_secs_f64(),
        report["error"],
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = |key: &str| report["end"][key]["bytes"].as_u64().unwrap_or(0);
    let (up, down) = (bytes("sum_received"), bytes("sum_received_bidir_reverse"));
    let least = 10u64 << 20;
    assert!(
        up > least && down > least,
        "iperf3 moved {up} bytes to the server and {down} back in {secs} s\n\
         its summary: {}\nits first interval: {}\nstderr: {}\ntunnels: {:?}",
        report["end"],
        report["intervals"][0],
        String::from_utf8_lossy(&out.stderr),
        tunnels(&c, "iperf")
    );
    eprintln!(
        "[{test}] iperf3 {secs} s, 4 streams each way: {:.1} Mbit/s to the server, {:.1} back",
        report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6,
        report["end"]["sum_received_bidir_reverse"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6
    );
    // The control connection and the 8 data streams.
    assert_crossed(&c, "iperf", before, 9, "iperf3 --bidir -P 4");
    c.down().expect("teardown");
}

#[test]
fn iperf3_bulk_both_ways_with_sk_msg() {
    iperf3_bulk("iperf3_bulk_both_ways_with_sk_msg", &[], 60);
}

#[test]
fn iperf3_bulk_both_ways_without_sk_msg() {
    iperf3_bulk("iperf3_bulk_both_ways_without_sk_msg", &["--no-skmsg"], 20);
}

// === gRPC ===

#[test]
fn python_grpcio_unary_streaming_and_deadline() {
    let test = "python_grpcio_unary_streaming_and_deadline";
    if !privileged(test) || !installed(test, &[(PYTHON, &["-c", "import grpc"], "python3-grpcio")])
    {
        return;
    }
    let server = pod(
        "grpc",
        &[50051],
        argv(&[PYTHON, &script("grpc_server.py"), "50051"]),
    );
    let (c, _resources) = up(server, &[]);
    let before = requests(&c, "grpc");
    let target = format!("{GRPC_VIP}:50051");
    let out = exec_until_ok(&c, &[PYTHON, &script("grpc_client.py"), &target]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("slow with a 0.5 s deadline: StatusCode.DEADLINE_EXCEEDED"),
        "{report}"
    );
    // 2 unary, 1 streaming, 1 past its deadline, 1 unary again.
    assert_requests(&c, "grpc", before, 4, "the grpcio client");
    let grpc_requests = c
        .agent_admin("node-2", "/metrics")
        .expect("node-2's metrics")
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("destination_workload=\"grpc\"")
                && l.contains("request_protocol=\"grpc\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
        .count();
    assert!(grpc_requests > 0, "node-2 counts no gRPC request");
    // grpcio connects from a dual-stack IPv6 socket to `::ffff:<VIP>`: connect6 captured it.
    let out = std::process::Command::new(&c.bins.agent)
        .args([
            "counters",
            "--instance",
            &c.names.instance("node-1"),
            "-o",
            "json",
        ])
        .output()
        .expect("run mesh-agent counters");
    let counters: std::collections::BTreeMap<String, u64> =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert!(
        counters.get("connect6_redirected").copied().unwrap_or(0) > 0,
        "node-1's connect6 redirected nothing: {counters:?}"
    );
    c.down().expect("teardown");
}

// === SMTP: the server speaks first ===

#[test]
fn curl_sends_mail_to_aiosmtpd_and_a_silent_client_gets_the_greeting() {
    let test = "curl_sends_mail_to_aiosmtpd_and_a_silent_client_gets_the_greeting";
    if !privileged(test)
        || !installed(
            test,
            &[
                (PYTHON, &["-c", "import aiosmtpd"], "python3-aiosmtpd"),
                ("curl", &["--version"], "curl"),
            ],
        )
    {
        return;
    }
    // The default handler prints each message it receives (unbuffered: into the pod's log).
    let server = pod(
        "smtp",
        &[2525],
        argv(&[PYTHON, "-u", "-m", "aiosmtpd", "-n", "-l", "0.0.0.0:2525"]),
    );
    let (c, _resources) = up(server, &[]);
    let before = tunnels(&c, "smtp");

    // A client that never speaks still gets the greeting.
    let out = exec_until_ok(&c, &[PYTHON, &script("greeting.py"), SMTP_VIP, "25"]);
    let greeting = String::from_utf8_lossy(&out.stdout);
    assert!(greeting.starts_with("220 "), "{}", text(&out));
    let before = assert_crossed(&c, "smtp", before, 1, "the greeting");

    // curl as a mail client.
    let token = format!("compat-{}", std::process::id());
    let mail = tempfile::NamedTempFile::new().expect("the mail");
    std::fs::write(
        mail.path(),
        format!(
            "From: a@example.org\r\nTo: b@example.org\r\nSubject: {token}\r\n\r\nthrough the mesh\r\n"
        ),
    )
    .expect("write the mail");
    let mail_path = mail.path().display().to_string();
    let out = exec(
        &c,
        &[
            "curl",
            "-sS",
            &format!("smtp://{SMTP_VIP}:25"),
            "--mail-from",
            "a@example.org",
            "--mail-rcpt",
            "b@example.org",
            "-T",
            &mail_path,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let log: PathBuf = c
        .pod("compat/smtp")
        .expect("the smtp pod")
        .app
        .as_ref()
        .expect("its application")
        .log
        .clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(&format!("Subject: {token}"))
    {
        assert!(
            Instant::now() < deadline,
            "the server did not receive the mail; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_crossed(&c, "smtp", before, 1, "curl smtp://");
    c.down().expect("teardown");
}

// === WebSocket ===

#[test]
fn python_websockets_through_a_tcp_port_and_an_http_port() {
    let test = "python_websockets_through_a_tcp_port_and_an_http_port";
    if !privileged(test)
        || !installed(
            test,
            &[(PYTHON, &["-c", "import websockets"], "python3-websockets")],
        )
    {
        return;
    }
    // The same server twice: 8765 behind an `http` service port, 8766 behind a TCP one.
    let ws = script("ws_server.py");
    let server = pod(
        "ws",
        &[8765, 8766],
        argv(&[
            "sh",
            "-c",
            &format!("{PYTHON} {ws} 8766 & exec {PYTHON} {ws} 8765"),
        ]),
    );
    let (c, _resources) = up(server, &[]);
    let before = tunnels(&c, "ws");
    let client = script("ws_client.py");
    // Through the TCP port: bytes only.
    let out = exec_until_ok(&c, &[PYTHON, &client, &format!("{WS_VIP}:81")]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok   binary echo"),
        "{}",
        text(&out)
    );
    assert_crossed(&c, "ws", before, 1, "WebSocket through a TCP port");
    // Through the HTTP port: the Upgrade handshake goes through the proxies' HTTP handling.
    let out = exec(&c, &[PYTHON, &client, &format!("{WS_VIP}:80")]);
    assert!(
        out.status.success(),
        "WebSocket through an `http` service port:\n{}",
        text(&out)
    );
    assert_requests(&c, "ws", 0, 1, "WebSocket through an HTTP port");
    c.down().expect("teardown");
}
