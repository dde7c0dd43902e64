//! The demo apps on 127.0.0.1: what a caller sees from the servers, the load report and the
//! binary's command line.

use std::{
    io::{BufRead, BufReader as StdBufReader},
    net::SocketAddr,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_demo::{
    client::{Mode, Target},
    http::HttpServer,
    load::{self, LoadConfig},
    tcp::EchoServer,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::oneshot,
};

const CALLER: &str =
    "By=spiffe://cluster.local/ns/demo/sa/web;URI=spiffe://cluster.local/ns/demo/sa/client";

/// A server running in this process until the guard drops.
struct Running {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn http_server(name: &str) -> Running {
    let server = HttpServer::bind("127.0.0.1:0".parse().expect("addr"), name)
        .await
        .expect("bind the http server");
    let addr = server.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    Running { addr, _stop: stop }
}

async fn echo_server(name: &str) -> Running {
    let server = EchoServer::bind("127.0.0.1:0".parse().expect("addr"), name)
        .await
        .expect("bind the echo server");
    let addr = server.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    Running { addr, _stop: stop }
}

/// Sends `request` over HTTP/1.1 or h2c and returns the status and the body.
async fn send<B>(addr: SocketAddr, h2: bool, request: Request<B>) -> (StatusCode, Bytes)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.expect("connect");
    let io = TokioIo::new(stream);
    let response = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2c handshake");
        tokio::spawn(conn);
        sender.send_request(request).await.expect("h2c response")
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("http/1.1 handshake");
        tokio::spawn(conn);
        sender
            .send_request(request)
            .await
            .expect("http/1.1 response")
    };
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes();
    (status, body)
}

fn get(addr: SocketAddr, h2: bool, path: &str) -> Request<Empty<Bytes>> {
    let builder = if h2 {
        Request::get(format!("http://{addr}{path}"))
    } else {
        Request::get(path).header("host", addr.to_string())
    };
    builder.body(Empty::new()).expect("request")
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).expect("a JSON body")
}

#[tokio::test]
async fn http_server_answers_http1_and_h2c_on_one_port() {
    let server = http_server("web-1").await;
    for (h2, version) in [(false, "HTTP/1.1"), (true, "HTTP/2.0")] {
        let mut request = get(server.addr, h2, "/hello/there?x=1");
        request
            .headers_mut()
            .insert("x-forwarded-client-cert", CALLER.parse().expect("value"));
        request
            .headers_mut()
            .insert("x-demo", "yes".parse().expect("value"));
        let (status, body) = send(server.addr, h2, request).await;
        assert_eq!(status, StatusCode::OK, "{version}");
        let echo = json(&body);
        assert_eq!(echo["pod"], "web-1", "{echo}");
        assert_eq!(echo["version"], version, "{echo}");
        assert_eq!(echo["method"], "GET", "{echo}");
        assert_eq!(echo["path"], "/hello/there", "{echo}");
        assert_eq!(echo["caller"], CALLER, "{echo}");
        assert_eq!(echo["headers"]["x-demo"], "yes", "{echo}");
        assert_eq!(echo["body_bytes"], 0, "{echo}");
        let peer: SocketAddr = echo["peer"]
            .as_str()
            .expect("peer is a string")
            .parse()
            .expect("peer is an address");
        assert_eq!(peer.ip(), server.addr.ip(), "{echo}");
    }

    // Without the header the caller is null, not an empty string.
    let (_, body) = send(server.addr, false, get(server.addr, false, "/")).await;
    assert!(json(&body)["caller"].is_null(), "{}", json(&body));
}

/// A request body of `left` chunks, made as the connection asks for them, with no length
/// announced (chunked on HTTP/1.1).
struct Upload {
    chunk: Bytes,
    left: usize,
}

impl Body for Upload {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }
}

#[tokio::test]
async fn http_server_counts_a_streamed_10_mib_upload() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 160; // 10 MiB
    let server = http_server("upload").await;
    for h2 in [false, true] {
        let uri = if h2 {
            format!("http://{}/upload", server.addr)
        } else {
            "/upload".to_owned()
        };
        let request = Request::post(uri)
            .header("host", server.addr.to_string())
            .body(Upload {
                chunk: Bytes::from(vec![0x5a; CHUNK]),
                left: CHUNKS,
            })
            .expect("request");
        let (status, reply) = send(server.addr, h2, request).await;
        assert_eq!(status, StatusCode::OK);
        let echo = json(&reply);
        assert_eq!(
            echo["body_bytes"],
            (CHUNK * CHUNKS) as u64,
            "h2={h2}: {echo}"
        );
        assert_eq!(echo["method"], "POST", "{echo}");
    }
}

#[tokio::test]
async fn http_server_special_paths() {
    let server = http_server("web").await;
    for h2 in [false, true] {
        let (status, body) = send(server.addr, h2, get(server.addr, h2, "/status/503")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["pod"], "web");

        let (status, body) = send(server.addr, h2, get(server.addr, h2, "/healthz")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"ok");

        let started = Instant::now();
        let (status, body) = send(server.addr, h2, get(server.addr, h2, "/delay/150")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&body)["path"], "/delay/150");
        assert!(started.elapsed() >= Duration::from_millis(150));
    }
    let (status, _) = send(server.addr, false, get(server.addr, false, "/status/42")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn tcp_echo_replies_per_line_and_half_closes() {
    let server = echo_server("echo-a").await;
    let stream = TcpStream::connect(server.addr).await.expect("connect");
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();

    // One reply per line, each before the next line is sent.
    for word in ["one", "two words", ""] {
        write
            .write_all(format!("{word}\n").as_bytes())
            .await
            .expect("write a line");
        line.clear();
        tokio::time::timeout(Duration::from_secs(5), read.read_line(&mut line))
            .await
            .expect("a reply per line")
            .expect("read a reply");
        assert_eq!(line, format!("echo-a {word}\n"));
    }

    // Two lines, the last without a newline, then our half-close: both are answered, then
    // the server closes its side.
    write.write_all(b"three\nfour").await.expect("write");
    write.shutdown().await.expect("half-close");
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(5), read.read_to_string(&mut rest))
        .await
        .expect("the server closes after the last reply")
        .expect("read to EOF");
    assert_eq!(rest, "echo-a three\necho-a four\n");
}

#[tokio::test]
async fn load_counts_replies_by_pod_and_refusals() {
    let a = echo_server("pod-a").await;
    let b = echo_server("pod-b").await;
    let config = |addr: SocketAddr, mode: Mode| LoadConfig {
        target: Target::from(addr),
        mode,
        requests: 40,
        concurrency: 4,
        path: "/".into(),
        fail_code: 0,
        timeout: Duration::from_secs(5),
    };
    for (server, pod) in [(&a, "pod-a"), (&b, "pod-b")] {
        let report = load::run(&config(server.addr, Mode::Tcp))
            .await
            .expect("load runs");
        assert_eq!(report.total, 40, "{report:?}");
        assert_eq!(report.successes, 40, "{report:?}");
        assert!(report.failures.is_empty(), "{report:?}");
        assert_eq!(report.pods.len(), 1, "{report:?}");
        assert_eq!(report.pods[pod], 40, "{report:?}");
        let latency = report.latency_us.expect("latency of 40 successes");
        assert!(latency.p50 > 0 && latency.p50 <= latency.p99, "{latency:?}");
    }

    // Nothing listens on a port just freed.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("local addr")
    };
    for mode in [Mode::Tcp, Mode::Http1, Mode::Http2, Mode::Grpc] {
        let report = load::run(&config(closed, mode)).await.expect("load runs");
        assert_eq!(report.total, 40, "{mode}: {report:?}");
        assert_eq!(report.successes, 0, "{mode}: {report:?}");
        assert_eq!(
            report.failures.get("connect_refused"),
            Some(&40),
            "{mode}: {report:?}"
        );
        assert!(report.pods.is_empty(), "{mode}: {report:?}");
        assert_eq!(report.latency_us, None, "{mode}: {report:?}");
    }
}

#[tokio::test]
async fn load_over_http1_and_h2c_reads_pod_and_status() {
    let server = http_server("web-2").await;
    let mut config = LoadConfig {
        target: Target::from(server.addr),
        mode: Mode::Http1,
        requests: 30,
        concurrency: 3,
        path: "/".into(),
        fail_code: 0,
        timeout: Duration::from_secs(5),
    };
    for mode in [Mode::Http1, Mode::Http2] {
        config.mode = mode;
        config.path = "/".into();
        let report = load::run(&config).await.expect("load runs");
        assert_eq!(report.pods.get("web-2"), Some(&30), "{mode}: {report:?}");
        assert!(report.failures.is_empty(), "{mode}: {report:?}");

        config.path = "/status/503".into();
        let report = load::run(&config).await.expect("load runs");
        assert_eq!(report.successes, 0, "{mode}: {report:?}");
        assert_eq!(
            report.failures.get("http_503"),
            Some(&30),
            "{mode}: {report:?}"
        );
    }

    // A timeout shorter than the server's delay.
    config.path = "/delay/1000".into();
    config.timeout = Duration::from_millis(100);
    config.requests = 2;
    let report = load::run(&config).await.expect("load runs");
    assert_eq!(report.failures.get("timeout"), Some(&2), "{report:?}");
}

// === the binary ===

fn demo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-demo"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Runs the binary off the async runtime, so servers in this process keep answering.
async fn run(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || demo().args(&args).output().expect("run mesh-demo"))
        .await
        .expect("join")
}

#[tokio::test]
async fn load_binary_prints_json_and_a_table() {
    let server = echo_server("pod-a").await;
    let target = server.addr.to_string();
    let out = run(&[
        "load",
        "--target",
        &target,
        "--mode",
        "tcp",
        "--requests",
        "12",
        "--concurrency",
        "3",
        "--json",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["total"], 12, "{report}");
    assert_eq!(report["successes"], 12, "{report}");
    assert_eq!(report["pods"]["pod-a"], 12, "{report}");
    assert!(report["latency_us"]["p99"].as_u64().is_some(), "{report}");

    // Failures still exit 0: the caller judges the report.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("local addr").to_string()
    };
    let out = run(&[
        "load",
        "--target",
        &closed,
        "--mode",
        "tcp",
        "--requests",
        "3",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("3 total, 0 ok, 3 failed"), "{table}");
    assert!(table.contains("connect_refused"), "{table}");
}

#[tokio::test]
async fn call_binary_exits_0_on_a_reply_and_1_on_a_refusal() {
    let http = http_server("web-3").await;
    let echo = echo_server("echo-3").await;
    for mode in ["http1", "http2"] {
        let out = run(&["call", "--target", &http.addr.to_string(), "--mode", mode]).await;
        assert!(out.status.success(), "{out:?}");
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the JSON reply");
        assert_eq!(reply["pod"], "web-3", "{reply}");
    }
    let out = run(&["call", "--target", &echo.addr.to_string(), "--mode", "tcp"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "echo-3 hello\n");

    let out = run(&[
        "call",
        "--target",
        &http.addr.to_string(),
        "--path",
        "/status/403",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("http_403: "),
        "{out:?}"
    );

    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("local addr").to_string()
    };
    let out = run(&["call", "--target", &closed, "--mode", "tcp"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("connect_refused: "),
        "{out:?}"
    );
}

#[tokio::test]
async fn bad_arguments_exit_64_with_a_message() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "Usage"),
        (
            &["load", "--target", "127.0.0.1:9", "--requests", "0"],
            "--requests",
        ),
        (
            &["load", "--target", "127.0.0.1:9", "--concurrency", "0"],
            "--concurrency",
        ),
        (&["load", "--target", "127.0.0.1"], "HOST:PORT"),
        (
            &["call", "--target", "127.0.0.1:9", "--timeout", "2"],
            "no unit",
        ),
        (&["call", "--target", "127.0.0.1:9", "--mode", "udp"], "udp"),
        (
            &["call", "--target", "127.0.0.1:9", "--path", "nope"],
            "must start with",
        ),
        (&["http", "--listen", "127.0.0.1:0"], "--name"),
        (&["tcp-echo", "--name", "x", "--listen", "here"], "--listen"),
        (&["grpc", "--name", ""], "--name"),
        (
            &["call", "--target", "127.0.0.1:9", "--fail-code", "17"],
            "--fail-code",
        ),
        (&["dance"], "dance"),
    ];
    for (args, needle) in cases {
        let out = run(args).await;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let out = run(&["--help"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("tcp-echo"));
}

#[test]
fn binary_servers_announce_and_stop_on_sigterm() {
    for (sub, probe) in [("http", "http2"), ("tcp-echo", "tcp"), ("grpc", "grpc")] {
        let mut child = demo()
            .args([sub, "--listen", "127.0.0.1:0", "--name", "proc"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the server");
        let mut stdout = StdBufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the first line");
        let addr = line
            .strip_prefix("listening ")
            .expect("`listening ADDR` first")
            .trim()
            .to_owned();
        let port = addr.parse::<SocketAddr>().expect("an address").port();
        assert_ne!(port, 0, "the bound port, not the asked one");

        let out = demo()
            .args(["call", "--target", &addr, "--mode", probe])
            .output()
            .expect("run call");
        assert!(out.status.success(), "{sub}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("proc"),
            "{out:?}"
        );

        sigterm_and_wait(&mut child, sub);
    }
}

/// Sends SIGTERM to `child` and asserts it exits 0 within 10 s.
fn sigterm_and_wait(child: &mut std::process::Child, what: &str) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "{what} still runs after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{what} exited with {status}");
}

#[test]
fn pause_runs_until_sigterm_and_exits_0() {
    let mut child = demo()
        .arg("pause")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pause");
    // Time to install its signal handlers; it must still be waiting after it.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "pause exited on its own"
    );
    sigterm_and_wait(&mut child, "pause");
}
