//! The HTTP details clients rely on, through both proxies: `Expect: 100-continue`, HTTP/1.0
//! clients, responses streamed chunk by chunk, uploads streamed with bounded buffering, gRPC
//! deadlines and cancellation, and trailers both ways.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ::http::HeaderMap;
use futures::StreamExt;

use super::*;

/// Reads from `conn` until what was read contains `pattern`.
async fn read_until(conn: &mut TcpStream, pattern: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let found = tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&got).contains(pattern) {
            let n = conn.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(found.is_ok(), "no {pattern:?} in time; got {got:?}");
    got
}

/// One HTTP/1.1 port served by [`echo`] at api-0, through HBONE.
async fn one_echo_port(seen: &Seen) -> Compat {
    let ports = vec![Port {
        port: 80,
        protocol: Protocol::Http,
        target: h1_app(API_IP, echo(seen.clone())).await,
    }];
    compat(ports, vec![], false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_its_interim_answer_and_the_body_reaches_the_application() {
    let seen: Seen = Arc::default();
    let mesh = one_echo_port(&seen).await;
    let mut conn = TcpStream::connect(mesh.capture(API_VIP, 80))
        .await
        .expect("connect");
    conn.write_all(
        b"POST /upload HTTP/1.1\r\nHost: api.shop\r\nContent-Length: 11\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .await
    .expect("head");
    // The client holds its body until told to go on, as curl does.
    let interim = read_until(&mut conn, "\r\n\r\n").await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    conn.write_all(b"hello world").await.expect("body");
    let answer = read_until(&mut conn, "hello world").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok /upload hello world"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_client_gets_a_whole_answer_and_its_connection_closed() {
    let seen: Seen = Arc::default();
    let mesh = one_echo_port(&seen).await;
    for (path, body) in [("/old", "ok /old"), ("/stream", "one two")] {
        let mut conn = TcpStream::connect(mesh.capture(API_VIP, 80))
            .await
            .expect("connect");
        conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .expect("request");
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, conn.read_to_end(&mut answer))
            .await
            .expect("the proxy closes an HTTP/1.0 connection after the answer")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer);
        // Answered in the client's version (hyper's server does), which it can read.
        assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with(&format!("\r\n\r\n{body}")), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("chunked"),
            "HTTP/1.0 has no chunked framing: {answer}"
        );
    }
    // The application got HTTP/1.1 with the address the client dialled as its Host.
    assert_eq!(
        *seen.lock().expect("seen"),
        vec![
            "HTTP/1.1 GET /old 10.96.0.30:80".to_string(),
            "HTTP/1.1 GET /stream 10.96.0.30:80".to_string(),
        ]
    );
}

/// An application streaming `data: 1` at once and `data: 2` only once `gate` opens (or after
/// a while, so a proxy that holds the first chunk is caught by the test, not hung).
fn events(
    gate: Arc<tokio::sync::Notify>,
    second: Arc<AtomicBool>,
) -> impl Fn(HttpRequest<Incoming>) -> BoxedResponse + Clone + Send + Sync {
    move |_request| {
        let (gate, second) = (gate.clone(), second.clone());
        Box::pin(async move {
            let stream = futures::stream::unfold(0u8, move |step| {
                let (gate, second) = (gate.clone(), second.clone());
                async move {
                    let chunk = match step {
                        0 => "data: 1\n\n",
                        1 => {
                            let _ = tokio::time::timeout(WAIT, gate.notified()).await;
                            second.store(true, Ordering::SeqCst);
                            "data: 2\n\n"
                        }
                        _ => return None,
                    };
                    Some((
                        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(chunk))),
                        step + 1,
                    ))
                }
            });
            let mut r = HttpResponse::new(
                StreamBody::new(stream)
                    .map_err(|never| match never {})
                    .boxed(),
            );
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().expect("value"));
            r
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_responses_reach_the_client_chunk_by_chunk() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let second = Arc::new(AtomicBool::new(false));
    let ports = vec![
        Port {
            port: 80,
            protocol: Protocol::Http,
            target: h1_app(API_IP, events(gate.clone(), second.clone())).await,
        },
        Port {
            port: 81,
            protocol: Protocol::Http2,
            target: h2_app(API_IP, events(gate.clone(), second.clone())).await,
        },
    ];
    let mesh = compat(ports, vec![], false).await;
    for (port, version) in [
        (80, Version::HTTP_11),
        (81, Version::HTTP_2),
        (80, Version::HTTP_2),
    ] {
        second.store(false, Ordering::SeqCst);
        let addr = mesh.capture(API_VIP, port);
        let response = if version == Version::HTTP_2 {
            h2_client(addr)
                .await
                .send_request(get(version, "http://api.shop/events"))
                .await
        } else {
            h1_client(addr)
                .await
                .send_request(get(version, "/events"))
                .await
        }
        .expect("response");
        let mut body = response.into_body();
        let first = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("the first chunk in time")
            .expect("a frame")
            .expect("data");
        assert_eq!(first.into_data().expect("data"), "data: 1\n\n");
        assert!(
            !second.load(Ordering::SeqCst),
            "port {port} {version:?}: the first chunk arrived before the second was sent"
        );
        gate.notify_one();
        let rest = tokio::time::timeout(WAIT, body.collect())
            .await
            .expect("in time")
            .expect("rest")
            .to_bytes();
        assert_eq!(rest, "data: 2\n\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_streams_with_bounded_memory() {
    const TOTAL: u64 = 64 << 20;
    const CHUNK: usize = 64 << 10;
    let gate = Arc::new(tokio::sync::Notify::new());
    let app_gate = gate.clone();
    // The application reads nothing before the gate opens, then counts the body.
    let counting = move |request: HttpRequest<Incoming>| {
        let gate = app_gate.clone();
        Box::pin(async move {
            let _ = tokio::time::timeout(WAIT, gate.notified()).await;
            let mut body = request.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.expect("frame").into_data() {
                    n += data.len() as u64;
                }
            }
            HttpResponse::new(crate::l7::full(format!("got {n}")))
        }) as BoxedResponse
    };
    let ports = vec![Port {
        port: 80,
        protocol: Protocol::Http,
        target: h1_app(API_IP, counting).await,
    }];
    let mesh = compat(ports, vec![], false).await;
    let produced = Arc::new(AtomicU64::new(0));
    let counter = produced.clone();
    let chunks = futures::stream::iter(0..TOTAL / CHUNK as u64).map(move |_| {
        counter.fetch_add(CHUNK as u64, Ordering::SeqCst);
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'x'; CHUNK])))
    });
    let request = HttpRequest::post("/upload")
        .header("host", "api.shop")
        .header("content-length", TOTAL)
        .body(
            StreamBody::new(chunks)
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("request");
    let mut c = h1_client(mesh.capture(API_VIP, 80)).await;
    let sending = tokio::spawn(async move { c.send_request(request).await });
    // While the application reads nothing, the client can only send what the buffers on the
    // way hold: the proxies take the body as it is read, they never store it whole.
    let mut last = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = produced.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let held = produced.load(Ordering::SeqCst);
    assert!(
        held < TOTAL / 2,
        "{held} bytes of {TOTAL} taken while the application read nothing"
    );
    gate.notify_one();
    let response = tokio::time::timeout(Duration::from_secs(120), sending)
        .await
        .expect("the upload in time")
        .expect("task")
        .expect("response");
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, format!("got {TOTAL}"));
}

/// What the gRPC application saw of its calls' ends.
#[derive(Default)]
struct Calls {
    /// A `Hang` call's handler was dropped: its stream was cancelled before it answered.
    hang_cancelled: AtomicBool,
    /// A `Stream` call's answer was dropped: its stream was cancelled while streaming.
    stream_cancelled: AtomicBool,
}

/// A gRPC application over HTTP/2 only: `Timeout` answers the `grpc-timeout` it got (in
/// `x-seen-timeout`), `Hang` never answers, `Stream` sends one message and then nothing.
fn grpc_app(
    calls: Arc<Calls>,
) -> impl Fn(HttpRequest<Incoming>) -> BoxedResponse + Clone + Send + Sync {
    struct OnDrop(Arc<Calls>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.hang_cancelled.store(true, Ordering::SeqCst);
        }
    }
    move |request| {
        let calls = calls.clone();
        Box::pin(async move {
            let ok = |body: Body| {
                let mut r = HttpResponse::new(body);
                r.headers_mut()
                    .insert("content-type", "application/grpc".parse().expect("value"));
                r
            };
            match request.uri().path() {
                "/t.Svc/Timeout" => {
                    let seen = request.headers().get("grpc-timeout").cloned();
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().expect("value"));
                    let mut r = ok(frames(vec![Frame::trailers(trailers)]));
                    if let Some(v) = seen {
                        r.headers_mut().insert("x-seen-timeout", v);
                    }
                    r
                }
                "/t.Svc/Hang" => {
                    let _guard = OnDrop(calls);
                    futures::future::pending::<()>().await;
                    unreachable!("never answers")
                }
                _ => {
                    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
                    tokio::spawn(async move {
                        let _ = tx.send(Bytes::from_static(b"\0\0\0\0\x01m")).await;
                        tx.closed().await;
                        calls.stream_cancelled.store(true, Ordering::SeqCst);
                    });
                    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
                        .map(|b| Ok::<_, std::convert::Infallible>(Frame::data(b)));
                    ok(StreamBody::new(stream)
                        .map_err(|never| match never {})
                        .boxed())
                }
            }
        })
    }
}

fn grpc_call(path: &str, timeout: Option<&str>) -> HttpRequest<Body> {
    let mut b = HttpRequest::post(format!("http://api.shop{path}"))
        .version(Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        b = b.header("grpc-timeout", t);
    }
    b.body(crate::l7::full(&b"\0\0\0\0\0"[..]))
        .expect("request")
}

/// Waits until `flag` is set, or fails with `what`.
async fn eventually(flag: &AtomicBool, what: &str) {
    for _ in 0..100 {
        if flag.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}");
}

/// A fresh gRPC application behind a `grpc` port of api-0, through HBONE.
async fn grpc_mesh() -> (Compat, Arc<Calls>) {
    let calls = Arc::new(Calls::default());
    let ports = vec![Port {
        port: 82,
        protocol: Protocol::Grpc,
        target: h2_app(API_IP, grpc_app(calls.clone())).await,
    }];
    (compat(ports, vec![], false).await, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_timeout_reaches_the_application_and_its_deadline_is_kept_by_the_proxy() {
    let (mesh, calls) = grpc_mesh().await;
    let mut c = h2_client(mesh.capture(API_VIP, 82)).await;
    let response = c
        .send_request(grpc_call("/t.Svc/Timeout", Some("5S")))
        .await
        .expect("response");
    assert_eq!(response.headers()["x-seen-timeout"], "5S");

    // The application never answers: the proxy does, once the deadline passed, and cancels
    // the application's stream.
    let started = std::time::Instant::now();
    let response =
        tokio::time::timeout(WAIT, c.send_request(grpc_call("/t.Svc/Hang", Some("300m"))))
            .await
            .expect("an answer at the deadline, not never")
            .expect("response");
    assert_eq!(response.status(), StatusCode::OK, "trailers-only");
    assert_eq!(response.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    eventually(
        &calls.hang_cancelled,
        "the application's call was not cancelled",
    )
    .await;

    // An answer still streaming at the deadline ends with DEADLINE_EXCEEDED.
    let response = c
        .send_request(grpc_call("/t.Svc/Stream", Some("500m")))
        .await
        .expect("response");
    let collected = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("the answer ends at the deadline")
        .expect("body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "4");
    assert_eq!(
        collected.to_bytes(),
        &b"\0\0\0\0\x01m"[..],
        "what came before"
    );
    eventually(
        &calls.stream_cancelled,
        "the application's stream was not cancelled",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_client_cancels_is_cancelled_at_the_application() {
    // Before the answer: the client resets the stream while the application works.
    let (mesh, calls) = grpc_mesh().await;
    let mut c = h2_client(mesh.capture(API_VIP, 82)).await;
    let pending = tokio::spawn(c.send_request(grpc_call("/t.Svc/Hang", None)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!calls.hang_cancelled.load(Ordering::SeqCst));
    pending.abort();
    eventually(
        &calls.hang_cancelled,
        "the application's call outlived its client",
    )
    .await;

    // While the answer streams: the client drops it.
    let response = c
        .send_request(grpc_call("/t.Svc/Stream", None))
        .await
        .expect("response");
    let mut body = response.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("a message in time")
        .expect("frame")
        .expect("data");
    assert!(first.is_data());
    assert!(!calls.stream_cancelled.load(Ordering::SeqCst));
    drop(body);
    eventually(
        &calls.stream_cancelled,
        "the application's stream outlived its client",
    )
    .await;
}

/// An application answering `got <body>` with trailers: `x-echo`, the request's
/// `x-req-trailer` trailer (or `none`), declared in `Trailer` as HTTP/1.1 needs.
fn trailing(request: HttpRequest<Incoming>) -> BoxedResponse {
    Box::pin(async move {
        let collected = request.into_body().collect().await.expect("body");
        let echoed = collected
            .trailers()
            .and_then(|t| t.get("x-req-trailer").cloned())
            .unwrap_or_else(|| "none".parse().expect("value"));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-echo", echoed);
        let body = collected.to_bytes();
        let mut r = HttpResponse::new(frames(vec![
            Frame::data(Bytes::from([&b"got "[..], &body[..]].concat())),
            Frame::trailers(trailers),
        ]));
        r.headers_mut()
            .insert("trailer", "x-echo".parse().expect("value"));
        r
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_both_ways() {
    let ports = vec![
        Port {
            port: 80,
            protocol: Protocol::Http,
            target: h1_app(API_IP, trailing).await,
        },
        Port {
            port: 81,
            protocol: Protocol::Http2,
            target: h2_app(API_IP, trailing).await,
        },
    ];
    let mesh = compat(ports, vec![], false).await;
    let with_trailer = || {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-req-trailer", "sent".parse().expect("value"));
        frames(vec![
            Frame::data(Bytes::from_static(b"abc")),
            Frame::trailers(trailers),
        ])
    };
    // HTTP/1.1 end to end (chunked, the trailer declared), HTTP/2 end to end, and an HTTP/2
    // client of an HTTP/1.1 application (which sends trailers since the proxy asks for them).
    for (port, version, send_trailer, echoed) in [
        (80, Version::HTTP_11, true, "sent"),
        (81, Version::HTTP_2, true, "sent"),
        (80, Version::HTTP_2, false, "none"),
    ] {
        let addr = mesh.capture(API_VIP, port);
        let body = if send_trailer {
            with_trailer()
        } else {
            crate::l7::full("abc")
        };
        let mut request = HttpRequest::post(if version == Version::HTTP_2 {
            "http://api.shop/t"
        } else {
            "/t"
        })
        .version(version)
        .header("te", "trailers");
        if version != Version::HTTP_2 {
            request = request
                .header("host", "api.shop")
                .header("trailer", "x-req-trailer");
        }
        let request = request.body(body).expect("request");
        let response = if version == Version::HTTP_2 {
            h2_client(addr).await.send_request(request).await
        } else {
            h1_client(addr).await.send_request(request).await
        }
        .expect("response");
        assert_eq!(response.status(), StatusCode::OK, "port {port} {version:?}");
        let collected = tokio::time::timeout(WAIT, response.into_body().collect())
            .await
            .expect("in time")
            .expect("body");
        let trailers = collected.trailers().cloned();
        assert_eq!(collected.to_bytes(), "got abc", "port {port} {version:?}");
        let trailers = trailers.unwrap_or_else(|| panic!("port {port} {version:?}: no trailers"));
        assert_eq!(trailers["x-echo"], echoed, "port {port} {version:?}");
    }
}
