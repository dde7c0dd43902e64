use std::io;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;

fn io_error(kind: io::ErrorKind) -> io::Error {
    io::Error::new(kind, "test")
}

#[test]
fn io_errors_by_kind() {
    use io::ErrorKind as K;
    let cases = [
        (
            CallError::Connect(io_error(K::ConnectionRefused)),
            "connect_refused",
        ),
        (CallError::Connect(io_error(K::TimedOut)), "timeout"),
        (
            CallError::Connect(io_error(K::PermissionDenied)),
            "connect_failed",
        ),
        (
            CallError::Connect(io_error(K::HostUnreachable)),
            "connect_failed",
        ),
        (CallError::Io(io_error(K::ConnectionReset)), "reset"),
        (CallError::Io(io_error(K::BrokenPipe)), "reset"),
        (CallError::Io(io_error(K::ConnectionAborted)), "reset"),
        (CallError::Io(io_error(K::UnexpectedEof)), "eof"),
        (CallError::Io(io_error(K::PermissionDenied)), "other"),
    ];
    for (err, kind) in cases {
        assert_eq!(classify(&err).to_string(), kind, "{err:?}");
    }
}

#[test]
fn replies_by_kind() {
    let status = CallError::Status {
        status: StatusCode::SERVICE_UNAVAILABLE,
        body: String::new(),
    };
    assert_eq!(classify(&status), ErrorKind::Http(503));
    assert_eq!(classify(&status).to_string(), "http_503");
    assert_eq!(
        classify(&CallError::BadReply("x".into())).to_string(),
        "bad_reply"
    );
    assert_eq!(
        classify(&CallError::Timeout(Duration::from_secs(2))).to_string(),
        "timeout"
    );
}

#[test]
fn targets_parse_and_print() {
    let t: Target = "127.0.0.1:8080".parse().expect("v4");
    assert_eq!((t.host(), t.port()), ("127.0.0.1", 8080));
    assert_eq!(t.to_string(), "127.0.0.1:8080");
    let t: Target = "[::1]:80".parse().expect("v6");
    assert_eq!((t.host(), t.port()), ("::1", 80));
    assert_eq!(t.to_string(), "[::1]:80");
    let t: Target = "web.demo.svc:80".parse().expect("name");
    assert_eq!(t.host(), "web.demo.svc");
    for bad in [
        "127.0.0.1",
        ":80",
        "a:0",
        "a:70000",
        "::1:80",
        "[::1:80",
        "a b:1",
    ] {
        assert!(bad.parse::<Target>().is_err(), "{bad} was accepted");
    }
}

/// A server that takes one connection and does `then` with it.
async fn one_shot<F, Fut>(then: F) -> Target
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        then(stream).await;
    });
    Target::from(addr)
}

/// Reads until the end of the request head.
async fn read_head(stream: &mut tokio::net::TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.expect("read request");
        assert!(n > 0, "client closed before sending a request");
        head.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn http_close_before_reply_is_eof() {
    let target = one_shot(|mut s| async move {
        read_head(&mut s).await;
    })
    .await;
    let err = call_http1(&target, "/").await.expect_err("no reply");
    assert_eq!(classify(&err), ErrorKind::Eof, "{err}");
}

#[tokio::test]
async fn http_garbage_is_bad_reply() {
    let target = one_shot(|mut s| async move {
        read_head(&mut s).await;
        s.write_all(b"SSH-2.0-nope\r\n\r\n").await.expect("write");
    })
    .await;
    let err = call_http1(&target, "/").await.expect_err("not HTTP");
    assert_eq!(classify(&err), ErrorKind::BadReply, "{err}");
}

#[tokio::test]
async fn http_non_json_is_bad_reply() {
    let target = one_shot(|mut s| async move {
        read_head(&mut s).await;
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
            .await
            .expect("write");
    })
    .await;
    let err = call_http1(&target, "/").await.expect_err("not JSON");
    assert_eq!(classify(&err), ErrorKind::BadReply, "{err}");
}

#[tokio::test]
async fn tcp_reset_is_reset() {
    let target = one_shot(|mut s| async move {
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf).await;
        s.set_zero_linger().expect("SO_LINGER 0");
        drop(s);
    })
    .await;
    let err = call_tcp(&target).await.expect_err("reset");
    assert_eq!(classify(&err), ErrorKind::Reset, "{err}");
}

#[tokio::test]
async fn tcp_close_without_reply_is_eof_and_wrong_line_is_bad_reply() {
    let target = one_shot(|mut s| async move {
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf).await;
        s.shutdown().await.expect("shutdown");
        let _ = s.read(&mut buf).await;
    })
    .await;
    let err = call_tcp(&target).await.expect_err("closed");
    assert_eq!(classify(&err), ErrorKind::Eof, "{err}");

    let target = one_shot(|mut s| async move {
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf).await;
        s.write_all(b"goodbye\n").await.expect("write");
        let _ = s.read(&mut buf).await;
    })
    .await;
    let err = call_tcp(&target).await.expect_err("wrong line");
    assert_eq!(classify(&err), ErrorKind::BadReply, "{err}");
}

#[tokio::test]
async fn h2_stream_reset_is_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = Target::from(listener.local_addr().expect("local addr"));
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut conn = h2::server::handshake(stream).await.expect("h2 handshake");
        if let Some(Ok((_, mut respond))) = conn.accept().await {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
        // Keep the connection up until the client is done.
        while conn.accept().await.is_some() {}
    });
    let client = Http2Client::connect(&target).await.expect("connect");
    let err = client.get("/").await.expect_err("reset");
    assert_eq!(classify(&err), ErrorKind::Reset, "{err}");
}

#[tokio::test]
async fn closed_port_is_connect_refused_and_silence_is_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = Target::from(listener.local_addr().expect("local addr"));
    drop(listener);
    for mode in [Mode::Tcp, Mode::Http1, Mode::Http2, Mode::Grpc] {
        let err = call(mode, &target, "/", 0, Duration::from_secs(2))
            .await
            .expect_err("nothing listens");
        assert_eq!(classify(&err), ErrorKind::ConnectRefused, "{mode}: {err}");
    }

    // Accepts and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = Target::from(listener.local_addr().expect("local addr"));
    for mode in [Mode::Http1, Mode::Grpc] {
        let err = call(mode, &target, "/", 0, Duration::from_millis(200))
            .await
            .expect_err("no answer");
        assert_eq!(classify(&err), ErrorKind::Timeout, "{mode}: {err}");
    }
    drop(listener);
}

#[test]
fn grpc_statuses_by_code_and_cause() {
    // A status that came over the wire counts by its code.
    let err = CallError::from(tonic::Status::permission_denied("not you"));
    assert_eq!(classify(&err), ErrorKind::Grpc(7));
    assert_eq!(err.kind().to_string(), "grpc_7");
    assert_eq!(err.summary(), "grpc_7 (PermissionDenied): not you");
    assert_eq!(err.to_string(), "PermissionDenied: not you");

    // One the client made from a transport failure counts by that failure.
    let err = CallError::from(tonic::Status::from_error(Box::new(io_error(
        io::ErrorKind::ConnectionReset,
    ))));
    assert_eq!(classify(&err), ErrorKind::Reset, "{err}");
    assert!(err.summary().starts_with("reset: "), "{}", err.summary());

    // Other kinds keep their plain line.
    let err = CallError::BadReply("nope".into());
    assert_eq!(err.summary(), "bad_reply: unexpected reply: nope");
}

#[tokio::test]
async fn grpc_stream_reset_is_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = Target::from(listener.local_addr().expect("local addr"));
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut conn = h2::server::handshake(stream).await.expect("h2 handshake");
        while let Some(Ok((_, mut respond))) = conn.accept().await {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
    });
    let client = GrpcClient::connect(&target).await.expect("connect");
    let err = client.say(say_probe(0)).await.expect_err("reset");
    assert_eq!(classify(&err), ErrorKind::Reset, "{err}");
}
