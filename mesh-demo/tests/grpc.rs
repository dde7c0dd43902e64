//! The gRPC demo service on 127.0.0.1: each call shape with its statuses and trailers, the
//! load generator's grpc mode, and `call`/`load --mode grpc` from the binary.

use std::{
    net::SocketAddr,
    process::{Command, Output},
    time::{Duration, Instant},
};

use futures::channel::mpsc;
use mesh_demo::{
    client::{Mode, Target},
    grpc::{
        GrpcServer, POD_TRAILER,
        proto::{CountRequest, Number, SayRequest, echo_client::EchoClient},
    },
    load::{self, LoadConfig},
};
use tokio::sync::oneshot;
use tonic::{Code, Request, metadata::MetadataMap, transport::Channel};

const CALLER: &str =
    "By=spiffe://cluster.local/ns/demo/sa/api;URI=spiffe://cluster.local/ns/demo/sa/client";

/// A server running in this process until the guard drops.
struct Running {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn grpc_server(name: &str) -> Running {
    let server = GrpcServer::bind("127.0.0.1:0".parse().expect("addr"), name)
        .await
        .expect("bind the grpc server");
    let addr = server.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    Running { addr, _stop: stop }
}

async fn connect(addr: SocketAddr) -> EchoClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    EchoClient::new(channel)
}

fn say(message: &str, fail_code: i32) -> SayRequest {
    SayRequest {
        message: message.into(),
        fail_code,
        delay_ms: 0,
    }
}

fn pod_in(metadata: &MetadataMap) -> Option<&str> {
    metadata.get(POD_TRAILER).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn grpc_say_echoes_the_message_and_the_caller() {
    let server = grpc_server("api-1").await;
    let mut client = connect(server.addr).await;

    let mut request = Request::new(say("hi there", 0));
    request
        .metadata_mut()
        .insert("x-forwarded-client-cert", CALLER.parse().expect("value"));
    let response = client.say(request).await.expect("an OK reply");
    // The trailer arrives merged into the metadata of a unary call.
    assert_eq!(pod_in(response.metadata()), Some("api-1"));
    let reply = response.into_inner();
    assert_eq!(reply.pod, "api-1");
    assert_eq!(reply.message, "hi there");
    assert_eq!(reply.caller, CALLER);

    // Without the metadata the caller is empty.
    let reply = client.say(say("again", 0)).await.expect("an OK reply");
    assert_eq!(reply.into_inner().caller, "");
}

#[tokio::test]
async fn grpc_say_answers_with_the_requested_status() {
    let server = grpc_server("api-2").await;
    let mut client = connect(server.addr).await;

    for (fail_code, code) in [
        (7, Code::PermissionDenied),
        (14, Code::Unavailable),
        (16, Code::Unauthenticated),
    ] {
        let status = client
            .say(say("no", fail_code))
            .await
            .expect_err("the status asked for");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains("api-2"), "{status:?}");
        // Trailers-only: the pod comes with the status.
        assert_eq!(pod_in(status.metadata()), Some("api-2"), "{status:?}");
    }

    let status = client
        .say(say("no", 99))
        .await
        .expect_err("not a status code");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let started = Instant::now();
    let mut slow = say("later", 0);
    slow.delay_ms = 100;
    let reply = client.say(slow).await.expect("an OK reply after the delay");
    assert_eq!(reply.into_inner().message, "later");
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn grpc_count_streams_n_replies_in_order_then_the_trailer() {
    let server = grpc_server("api-3").await;
    let mut client = connect(server.addr).await;

    let mut replies = client
        .count(CountRequest { n: 5, delay_ms: 5 })
        .await
        .expect("the stream starts")
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(reply) = replies.message().await.expect("a reply") {
        assert_eq!(reply.pod, "api-3");
        indexes.push(reply.index);
    }
    assert_eq!(indexes, [0, 1, 2, 3, 4]);
    let trailers = replies
        .trailers()
        .await
        .expect("trailers")
        .expect("trailers after the last reply");
    assert_eq!(pod_in(&trailers), Some("api-3"));

    // Zero replies is still a complete call.
    let mut replies = client
        .count(CountRequest { n: 0, delay_ms: 0 })
        .await
        .expect("the stream starts")
        .into_inner();
    assert!(replies.message().await.expect("the end").is_none());

    let status = client
        .count(CountRequest {
            n: 1_000_000,
            delay_ms: 0,
        })
        .await
        .expect_err("too many");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn grpc_sum_adds_up_a_client_stream() {
    let server = grpc_server("api-4").await;
    let mut client = connect(server.addr).await;

    let numbers = futures::stream::iter((1..=100).map(|value| Number { value }));
    let response = client.sum(numbers).await.expect("a total");
    assert_eq!(pod_in(response.metadata()), Some("api-4"));
    let total = response.into_inner();
    assert_eq!(total.pod, "api-4");
    assert_eq!(total.total, 5050);
    assert_eq!(total.count, 100);

    let total = client
        .sum(futures::stream::empty())
        .await
        .expect("an empty total")
        .into_inner();
    assert_eq!((total.total, total.count), (0, 0));

    let status = client
        .sum(futures::stream::iter([
            Number { value: i64::MAX },
            Number { value: 1 },
        ]))
        .await
        .expect_err("overflow");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
}

#[tokio::test]
async fn grpc_chat_answers_each_message_in_order() {
    let server = grpc_server("api-5").await;
    let mut client = connect(server.addr).await;

    let (asks, inbound) = mpsc::unbounded::<SayRequest>();
    let mut request = Request::new(inbound);
    request
        .metadata_mut()
        .insert("x-forwarded-client-cert", CALLER.parse().expect("value"));
    let mut replies = client
        .chat(request)
        .await
        .expect("the chat starts")
        .into_inner();
    // Each answer arrives before the next message is sent.
    for i in 0..5 {
        let message = format!("message {i}");
        asks.unbounded_send(say(&message, 0)).expect("send");
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.message())
            .await
            .expect("an answer per message")
            .expect("a reply")
            .expect("not the end yet");
        assert_eq!(reply.message, message);
        assert_eq!(reply.pod, "api-5");
        assert_eq!(reply.caller, CALLER);
    }
    drop(asks);
    assert!(replies.message().await.expect("the end").is_none());
    let trailers = replies
        .trailers()
        .await
        .expect("trailers")
        .expect("trailers after the last reply");
    assert_eq!(pod_in(&trailers), Some("api-5"));

    // A message asking for a status ends the chat with it, after the answers before it.
    let asked = futures::stream::iter([say("fine", 0), say("stop", 9), say("unheard", 0)]);
    let mut replies = client
        .chat(asked)
        .await
        .expect("the chat starts")
        .into_inner();
    let first = replies.message().await.expect("a reply").expect("one");
    assert_eq!(first.message, "fine");
    let status = replies.message().await.expect_err("the status asked for");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(pod_in(status.metadata()), Some("api-5"), "{status:?}");
}

#[tokio::test]
async fn grpc_load_counts_replies_by_pod_and_failures_by_status() {
    let server = grpc_server("api-6").await;
    let mut config = LoadConfig {
        target: Target::from(server.addr),
        mode: Mode::Grpc,
        requests: 30,
        concurrency: 3,
        path: "/".into(),
        fail_code: 0,
        timeout: Duration::from_secs(5),
    };
    let report = load::run(&config).await.expect("load runs");
    assert_eq!(report.pods.get("api-6"), Some(&30), "{report:?}");
    assert!(report.failures.is_empty(), "{report:?}");
    let latency = report.latency_us.expect("latency of 30 successes");
    assert!(latency.p50 > 0 && latency.p50 <= latency.p99, "{latency:?}");

    config.fail_code = 8;
    let report = load::run(&config).await.expect("load runs");
    assert_eq!(report.successes, 0, "{report:?}");
    assert_eq!(report.failures.get("grpc_8"), Some(&30), "{report:?}");
    assert!(
        report.failure_examples["grpc_8"].starts_with("ResourceExhausted: "),
        "{report:?}"
    );

    // Nothing listens on a port just freed.
    config.target = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        Target::from(listener.local_addr().expect("local addr"))
    };
    let report = load::run(&config).await.expect("load runs");
    assert_eq!(
        report.failures.get("connect_refused"),
        Some(&30),
        "{report:?}"
    );
}

// === the binary ===

/// Runs the binary off the async runtime, so servers in this process keep answering.
async fn run(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_mesh-demo"))
            .env_remove("RUST_LOG")
            .args(&args)
            .output()
            .expect("run mesh-demo")
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn grpc_call_and_load_binaries_report_the_pod_and_failure_kinds() {
    let server = grpc_server("api-7").await;
    let target = server.addr.to_string();

    let out = run(&["call", "--target", &target, "--mode", "grpc"]).await;
    assert!(out.status.success(), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the JSON reply");
    assert_eq!(reply["pod"], "api-7", "{reply}");
    assert_eq!(reply["message"], "hello", "{reply}");
    assert_eq!(reply["caller"], "", "{reply}");
    assert_eq!(reply["trailer_pod"], "api-7", "{reply}");

    let out = run(&[
        "call",
        "--target",
        &target,
        "--mode",
        "grpc",
        "--fail-code",
        "7",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("grpc_7 (PermissionDenied): "),
        "{out:?}"
    );

    let out = run(&[
        "load",
        "--target",
        &target,
        "--mode",
        "grpc",
        "--requests",
        "20",
        "--concurrency",
        "4",
        "--json",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["mode"], "grpc", "{report}");
    assert_eq!(report["successes"], 20, "{report}");
    assert_eq!(report["pods"]["api-7"], 20, "{report}");

    let out = run(&[
        "load",
        "--target",
        &target,
        "--mode",
        "grpc",
        "--requests",
        "5",
        "--fail-code",
        "14",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("5 total, 0 ok, 5 failed"), "{table}");
    assert!(table.contains("grpc_14"), "{table}");
}
