//! In-process HBONE tests: a pool and a server on loopback, certificates from the test CA,
//! plain TCP applications behind the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use http::Method;
use http_body_util::BodyExt;
use mesh_core::SpiffeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::testing::{eventually, id};
use crate::tls;

mod harness;

use harness::*;

/// An address nothing listens on: the handler's connect is refused.
const CLOSED_PORT: &str = "127.0.0.1:1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_flows_end_to_end() {
    let mesh = Mesh::new().await;
    let (handler, seen) = forward(&[CLIENT]);
    let server = Server::start(&mesh, handler, ServerConfig::default()).await;
    let app = echo_app().await;
    let pool = mesh.pool(PoolConfig::default());

    let data = payload(1 << 20, 1);
    let stream = mesh
        .connect(&pool, &server, app)
        .await
        .expect("tunnel opens");
    let back = round_trip(stream, &data).await.expect("echoed");
    assert_eq!(back.len(), data.len());
    assert_eq!(
        checksum(&back),
        checksum(&data),
        "the bytes came back intact"
    );

    assert_eq!(*seen.lock().expect("seen"), vec![mesh.client_id.clone()]);
    let client = pool.stats().snapshot();
    assert_eq!(
        (client.bytes_sent, client.bytes_received),
        (1 << 20, 1 << 20)
    );
    assert_eq!((client.streams_opened, client.streams_closed), (1, 1));
    assert_eq!(client.connections_opened, 1);
    let stats = server.hbone.stats().clone();
    let done = eventually("the server's tunnel to end", WAIT, || {
        let s = stats.snapshot();
        (s.streams_closed == 1).then_some(s)
    })
    .await;
    assert_eq!((done.bytes_received, done.bytes_sent), (1 << 20, 1 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_still_reads_the_answer() {
    let mesh = Mesh::new().await;
    // Reads to EOF, then answers with what it read.
    let app = app(|mut tcp| async move {
        let mut got = Vec::new();
        if tcp.read_to_end(&mut got).await.is_ok() {
            let answer = format!("read {} bytes, sum {}", got.len(), checksum(&got));
            let _ = tcp.write_all(answer.as_bytes()).await;
        }
    })
    .await;
    let server = Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await;
    let pool = mesh.pool(PoolConfig::default());

    let data = payload(300_000, 2);
    let mut stream = mesh
        .connect(&pool, &server, app)
        .await
        .expect("tunnel opens");
    stream.write_all(&data).await.expect("write");
    stream.shutdown().await.expect("END_STREAM");
    assert!(
        stream.write_all(b"late").await.is_err(),
        "no writes after shutdown"
    );
    let mut answer = String::new();
    timeout(WAIT, stream.read_to_string(&mut answer))
        .await
        .expect("the answer in time")
        .expect("read after our shutdown");
    assert_eq!(
        answer,
        format!("read 300000 bytes, sum {}", checksum(&data)),
        "the application saw EOF after all the bytes, and its answer came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_half_close_lets_the_client_keep_sending() {
    let mesh = Mesh::new().await;
    // Greets, closes its write side at once, then counts what it reads.
    let (app, mut counts) = counting_app(|mut tcp: TcpStream| async move {
        let _ = tcp.write_all(b"bye for now").await;
        let _ = tcp.shutdown().await;
        tcp
    })
    .await;
    let server = Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await;
    let pool = mesh.pool(PoolConfig::default());

    let mut stream = mesh
        .connect(&pool, &server, app)
        .await
        .expect("tunnel opens");
    let mut greeting = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut greeting))
        .await
        .expect("EOF in time")
        .expect("read");
    assert_eq!(
        greeting, b"bye for now",
        "the application's close reads as EOF"
    );

    let data = payload(500_000, 3);
    stream
        .write_all(&data)
        .await
        .expect("still writable after the peer's EOF");
    stream.shutdown().await.expect("END_STREAM");
    let n = timeout(WAIT, counts.recv())
        .await
        .expect("the application finishes")
        .expect("a count");
    assert_eq!(n, data.len(), "everything sent after the far close arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_denial_is_refused_promptly() {
    let mesh = Mesh::new().await;
    let (handler, seen) = forward(&[OTHER]);
    let server = Server::start(&mesh, handler, ServerConfig::default()).await;
    let app = echo_app().await;
    let pool = mesh.pool(PoolConfig::default());

    let refused = timeout(
        Duration::from_secs(5),
        pool.connect(&mesh.client_id, server.addr, &mesh.server_id, app),
    )
    .await
    .expect("a refusal, not a hang");
    match refused {
        Err(HboneError::Refused {
            status: 403,
            reason,
        }) => {
            assert!(
                reason.contains(&format!("{CLIENT} may not connect")),
                "{reason}"
            )
        }
        other => panic!("expected 403, got {other:?}"),
    }
    // The handler judged the identity of the certificate the client proved, not a claim.
    assert_eq!(*seen.lock().expect("seen"), vec![mesh.client_id.clone()]);
    assert_eq!(pool.stats().snapshot().streams_refused, 1);
    assert_eq!(server.hbone.stats().snapshot().streams_refused, 1);

    // The connection survives a refusal: the next tunnel reuses it.
    let again = mesh.connect(&pool, &server, app).await;
    assert!(matches!(
        again,
        Err(HboneError::Refused { status: 403, .. })
    ));
    assert_eq!(pool.stats().snapshot().connections_opened, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_expecting_another_identity_fails_the_handshake() {
    let mesh = Mesh::new().await;
    let server = Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await;
    let app = echo_app().await;
    let pool = mesh.pool(PoolConfig::default());

    let admin = id("spiffe://cluster.local/ns/default/sa/admin");
    let result = timeout(
        WAIT,
        pool.connect(&mesh.client_id, server.addr, &admin, app),
    )
    .await
    .expect("connect returns");
    match result {
        Err(HboneError::Dial { source, .. }) => {
            assert!(matches!(*source, DialError::Tls(_)), "{source}");
            assert!(
                source
                    .to_string()
                    .contains(&format!("peer is {SERVER}, expected {admin}")),
                "{source}"
            );
        }
        other => panic!("expected a TLS failure, got {other:?}"),
    }
    assert!(
        server.finished(0).await.is_err(),
        "the server saw no tunnel"
    );
    assert_eq!(server.hbone.stats().snapshot().streams_opened, 0);
    assert_eq!(pool.stats().snapshot().connections_failed, 1);
    assert_eq!(pool.connections(), 0, "the failed connection is not pooled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tunnels_share_few_connections() {
    const TUNNELS: usize = 1000;
    const MAX_STREAMS: usize = 250;
    let mesh = Mesh::new().await;
    let server = Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await;
    let app = echo_app().await;
    let pool = mesh.pool(PoolConfig {
        max_streams_per_connection: MAX_STREAMS,
        ..PoolConfig::default()
    });
    let mesh = Arc::new(mesh);
    let server = Arc::new(server);

    let mut tunnels = JoinSet::new();
    for i in 0..TUNNELS {
        let (mesh, server, pool) = (mesh.clone(), server.clone(), pool.clone());
        tunnels.spawn(async move {
            let data = payload(4096 + i, i as u64);
            let stream = mesh
                .connect(&pool, &server, app)
                .await
                .expect("tunnel opens");
            let back = round_trip(stream, &data).await.expect("echoed");
            back == data
        });
    }
    let mut intact = 0;
    timeout(Duration::from_secs(120), async {
        while let Some(ok) = tunnels.join_next().await {
            intact += usize::from(ok.expect("tunnel task"));
        }
    })
    .await
    .expect("all tunnels finish");
    assert_eq!(intact, TUNNELS, "every tunnel carried its own bytes back");

    let stats = pool.stats().snapshot();
    let most = TUNNELS.div_ceil(MAX_STREAMS) as u64;
    assert!(stats.connections_opened <= most, "{stats:?}");
    assert!(
        server.accepted() as u64 <= most,
        "{} accepted",
        server.accepted()
    );
    assert_eq!(stats.streams_opened, TUNNELS as u64);
    assert_eq!(stats.streams_retried, 0);
}

/// Callers that hang up while the application is still sending (an aborted download) reset
/// their tunnel with data in flight; the pooled connection carries on, however many do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_dropped_mid_download_do_not_cost_the_pooled_connection() {
    const TUNNELS: usize = 1500;
    let mesh = Mesh::new().await;
    let server = Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await;
    let firehose = app(|mut tcp| async move {
        let chunk = vec![7u8; 16 * 1024];
        while tcp.write_all(&chunk).await.is_ok() {}
    })
    .await;
    // An application that answers a little and hangs up: its end of stream is on its way
    // when the caller lets go.
    let short = app(|mut tcp| async move {
        let _ = tcp.write_all(&[7u8; 1024]).await;
        let _ = tcp.shutdown().await;
    })
    .await;
    let pool = mesh.pool(PoolConfig::default());
    for i in 0..TUNNELS {
        let target = if i % 2 == 0 { firehose } else { short };
        let mut stream = mesh
            .connect(&pool, &server, target)
            .await
            .unwrap_or_else(|e| panic!("tunnel {i} opens: {e}"));
        let mut first = [0u8; 1024];
        timeout(WAIT, stream.read_exact(&mut first))
            .await
            .expect("the download starts")
            .unwrap_or_else(|e| panic!("tunnel {i} reads: {e}"));
        drop(stream);
    }
    let stats = pool.stats().snapshot();
    assert_eq!(
        stats.connections_opened, 1,
        "the pooled connection was lost along the way: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_certificateless_clients_are_dropped() {
    let mesh = Mesh::new().await;
    let server = Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await;

    // Not TLS at all.
    let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff garbage")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let _ = timeout(WAIT, tcp.read_to_end(&mut rest))
        .await
        .expect("closed");
    let err = server.finished(0).await.expect_err("not TLS");
    assert!(matches!(err, HboneError::Accept(_)), "{err}");

    // TLS without a client certificate.
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::from(server.addr.ip());
    let connector = TlsConnector::from(client_without_certificate());
    if let Ok(Ok(mut tls)) = timeout(WAIT, connector.connect(name, tcp)).await {
        // TLS 1.3 clients finish first; the server's refusal arrives as an alert.
        let mut buf = [0u8; 16];
        let read = timeout(WAIT, tls.read(&mut buf))
            .await
            .expect("refused in time");
        assert!(matches!(read, Err(_) | Ok(0)), "{read:?}");
    }
    let err = server.finished(1).await.expect_err("no certificate");
    assert!(err.to_string().contains("no certificates"), "{err}");
    assert_eq!(server.hbone.stats().snapshot().connections_failed, 2);
    assert_eq!(server.hbone.stats().snapshot().connections_opened, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_dropped_after_the_handshake_timeout() {
    let mesh = Mesh::new().await;
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = Server::start(&mesh, forward(&[CLIENT]).0, config).await;

    // Connects and sends nothing.
    let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
    let err = server.finished(0).await.expect_err("silent TCP");
    assert!(err.to_string().contains("TLS handshake timed out"), "{err}");
    let read = timeout(WAIT, tcp.read(&mut [0u8; 1]))
        .await
        .expect("closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // Completes TLS, then never sends the HTTP/2 preface.
    let cc = tls::client_config(
        mesh.client.clone(),
        mesh.client_id.clone(),
        mesh.server_id.clone(),
    )
    .expect("client TLS configuration");
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let _tls = TlsConnector::from(cc)
        .connect(rustls::pki_types::ServerName::from(server.addr.ip()), tcp)
        .await
        .expect("TLS handshake");
    let err = server.finished(1).await.expect_err("no preface");
    assert!(
        err.to_string().contains("HTTP/2 preface timed out"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clean_refusals() {
    let mesh = Mesh::new().await;
    let server = Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await;
    let app = echo_app().await;

    let send = raw_h2(&mesh, server.addr).await;
    let (status, reason) = raw_request(&send, Method::GET, "https://10.1.2.3/").await;
    assert_eq!((status, reason.as_deref()), (405, Some("only CONNECT")));
    for bad in [
        "example.com:80",
        "10.1.2.3:0",
        "user@10.1.2.3:80",
        "010.1.2.3:80",
    ] {
        let (status, reason) = raw_request(&send, Method::CONNECT, bad).await;
        assert_eq!(status, 400, "{bad}: {reason:?}");
    }
    let (status, reason) = raw_request(&send, Method::CONNECT, CLOSED_PORT).await;
    assert_eq!(status, 503, "{reason:?}");
    assert!(reason.expect("a reason").starts_with("connect 127.0.0.1:1"));
    // The connection still serves a proper tunnel after all that.
    let (status, _) = raw_request(&send, Method::CONNECT, &app.to_string()).await;
    assert_eq!(status, 200);

    drop(send);
    server
        .finished(0)
        .await
        .expect("the connection ends cleanly");
    let stats = server.hbone.stats().snapshot();
    assert_eq!((stats.streams_refused, stats.streams_opened), (6, 1));

    // Through the pool, the handler's 503 is a refusal with its status.
    let pool = mesh.pool(PoolConfig::default());
    let closed: SocketAddr = CLOSED_PORT.parse().expect("address");
    match mesh.connect(&pool, &server, closed).await {
        Err(HboneError::Refused { status: 503, .. }) => {}
        other => panic!("expected 503, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_retires_the_connection_but_not_its_streams() {
    let mesh = Mesh::new().await;
    let server = Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await;
    let app = echo_app().await;
    let pool = mesh.pool(PoolConfig::default());

    let mut old = mesh
        .connect(&pool, &server, app)
        .await
        .expect("tunnel opens");
    assert_eq!(pool.connections(), 1);
    server.hbone.drain_connections();
    eventually("the pool to drop the connection", WAIT, || {
        (pool.stats().snapshot().goaways == 1 && pool.connections() == 0).then_some(())
    })
    .await;

    // The open tunnel goes on over the draining connection.
    old.write_all(b"still here").await.expect("write");
    let mut buf = [0u8; 10];
    timeout(WAIT, old.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(&buf, b"still here");

    // A new tunnel gets a new connection.
    let new = mesh
        .connect(&pool, &server, app)
        .await
        .expect("tunnel opens");
    assert_eq!(pool.stats().snapshot().connections_opened, 2);
    assert_eq!(round_trip(new, b"fresh").await.expect("echo"), b"fresh");

    // Once its last stream ended, the drained connection closes.
    assert_eq!(round_trip(old, b"").await.expect("close"), b"");
    server
        .finished(0)
        .await
        .expect("the drained connection ends cleanly");
    let stats = pool.stats().clone();
    eventually("the pool to see it close", WAIT, || {
        (stats.snapshot().connections_closed == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_stream_is_retried_once_on_a_fresh_connection() {
    let mesh = Mesh::new().await;
    // A server that refuses every stream of its first connection with REFUSED_STREAM and
    // answers 200 on later ones.
    let tls = tls::server_config(mesh.server.clone(), mesh.server_id.clone()).expect("config");
    let acceptor = TlsAcceptor::from(tls);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.expect("TLS");
                let mut h2 = h2::server::handshake(tls).await.expect("HTTP/2");
                while let Some(Ok((request, mut respond))) = h2.accept().await {
                    if n == 0 {
                        respond.send_reset(Reason::REFUSED_STREAM);
                        continue;
                    }
                    // 200, then END_STREAM once the client ended its side.
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        let mut send = respond
                            .send_response(http::Response::new(()), false)
                            .expect("respond");
                        while let Some(Ok(_)) = body.data().await {}
                        let _ = send.send_data(bytes::Bytes::new(), true);
                    });
                }
            });
        }
    });

    let pool = mesh.pool(PoolConfig::default());
    let authority: SocketAddr = "10.0.0.1:80".parse().expect("address");
    let connect = pool.connect(&mesh.client_id, addr, &mesh.server_id, authority);
    let stream = timeout(WAIT, connect)
        .await
        .expect("connect returns")
        .expect("retried and answered");
    assert_eq!(round_trip(stream, b"").await.expect("EOF"), b"");
    let stats = pool.stats().snapshot();
    assert_eq!((stats.streams_retried, stats.connections_opened), (1, 2));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_connections_are_replaced() {
    let mesh = Mesh::new().await;
    let server = Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await;
    let app = echo_app().await;
    let pool = mesh.pool(PoolConfig::default());

    let mut old = mesh
        .connect(&pool, &server, app)
        .await
        .expect("tunnel opens");
    server.abort_connections();
    let mut buf = Vec::new();
    let read = timeout(WAIT, old.read_to_end(&mut buf))
        .await
        .expect("ends");
    assert!(
        read.is_err(),
        "a killed connection is an error, not a clean EOF: {read:?}"
    );
    eventually("the pool to drop the dead connection", WAIT, || {
        (pool.connections() == 0).then_some(())
    })
    .await;

    let new = mesh
        .connect(&pool, &server, app)
        .await
        .expect("tunnel opens");
    assert_eq!(round_trip(new, b"again").await.expect("echo"), b"again");
    assert_eq!(pool.stats().snapshot().connections_opened, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_says_so() {
    let mesh = Mesh::new().await;
    let server = Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await;
    let app = echo_app().await;
    let pool = mesh.pool(PoolConfig {
        max_streams_per_connection: 2,
        max_connections_per_key: 1,
        ..PoolConfig::default()
    });

    let first = mesh.connect(&pool, &server, app).await.expect("first");
    let _second = mesh.connect(&pool, &server, app).await.expect("second");
    match mesh.connect(&pool, &server, app).await {
        Err(e @ HboneError::PoolExhausted { .. }) => assert_eq!(e.kind(), "pool_exhausted"),
        other => panic!("expected PoolExhausted, got {other:?}"),
    }
    drop(first);
    mesh.connect(&pool, &server, app)
        .await
        .expect("a released place is reused");
    assert_eq!(pool.stats().snapshot().connections_opened, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_are_reset() {
    let mesh = Mesh::new().await;
    let config = ServerConfig {
        idle_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = Server::start(&mesh, forward(&[CLIENT]).0, config).await;
    let app = echo_app().await;
    let pool = mesh.pool(PoolConfig::default());

    let mut stream = mesh
        .connect(&pool, &server, app)
        .await
        .expect("tunnel opens");
    let mut buf = Vec::new();
    let read = timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("reset in time");
    assert!(read.is_err(), "{read:?}");
}

#[test]
fn only_a_connect_to_a_canonical_address_is_a_target() {
    let request = |method: Method, uri: &str| {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .expect("a request")
    };
    let target = connect_target(&request(Method::CONNECT, "10.1.2.3:8080")).expect("valid");
    assert_eq!(target, "10.1.2.3:8080".parse::<SocketAddr>().expect("addr"));

    let e = connect_target(&request(Method::GET, "http://10.1.2.3:8080/")).expect_err("GET");
    assert_eq!((e.kind(), e.status().as_u16()), ("not_connect", 405));
    for uri in ["10.1.2.3:080", "localhost:80", "[::1]:80", "10.1.2.3:0"] {
        let e = connect_target(&request(Method::CONNECT, uri)).expect_err(uri);
        assert_eq!((e.kind(), e.status().as_u16()), ("authority", 400), "{uri}");
    }
}

#[test]
fn configurations_are_validated() {
    let bad_pool = PoolConfig {
        stream_window: u32::MAX,
        ..PoolConfig::default()
    };
    assert!(matches!(bad_pool.validate(), Err(HboneError::Config(_))));
    assert!(PoolConfig::default().validate().is_ok());
    let bad_server = ServerConfig {
        max_concurrent_streams: 0,
        ..ServerConfig::default()
    };
    assert!(matches!(bad_server.validate(), Err(HboneError::Config(_))));
    assert!(ServerConfig::default().validate().is_ok());
}

/// A TCP relay to `upstream` that stops forwarding, without closing anything, once `frozen`
/// is set: what a vanished peer looks like.
async fn freezable_relay(upstream: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        frozen: Arc<AtomicBool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if frozen.load(Ordering::SeqCst) {
                // Hold both sockets open and silent.
                return futures::future::pending().await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = listener.local_addr().expect("relay address");
    let frozen = Arc::new(AtomicBool::new(false));
    let flag = frozen.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let up = TcpStream::connect(upstream)
                .await
                .expect("relay to upstream");
            let ((down_r, down_w), (up_r, up_w)) = (down.into_split(), up.into_split());
            tokio::spawn(pump(down_r, up_w, flag.clone()));
            tokio::spawn(pump(up_r, down_w, flag.clone()));
        }
    });
    (addr, frozen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresponsive_connections_are_dropped_by_keepalive() {
    let mesh = Mesh::new().await;
    let server = Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await;
    let app = echo_app().await;
    let (relay, frozen) = freezable_relay(server.addr).await;
    let pool = mesh.pool(PoolConfig {
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    });
    let connect = || {
        let connect = pool.connect(&mesh.client_id, relay, &mesh.server_id, app);
        async { timeout(WAIT, connect).await.expect("connect returns") }
    };

    let mut old = connect().await.expect("tunnel opens");
    old.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    old.read_exact(&mut buf)
        .await
        .expect("echo before the freeze");
    frozen.store(true, Ordering::SeqCst);
    let mut rest = Vec::new();
    let read = timeout(WAIT, old.read_to_end(&mut rest))
        .await
        .expect("fails in time");
    assert!(read.is_err(), "{read:?}");
    assert_eq!(pool.connections(), 0, "the silent connection left the pool");

    frozen.store(false, Ordering::SeqCst);
    let new = connect().await.expect("tunnel opens");
    assert_eq!(round_trip(new, b"pong").await.expect("echo"), b"pong");
    assert_eq!(pool.stats().snapshot().connections_opened, 2);
}

/// Tunnels opened from the proxy's own threads: each thread dials and keeps connections of
/// its own, so a tunnel's tasks and its connection's run on one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_proxy_thread_keeps_connections_of_its_own() {
    const TUNNELS: usize = 6;
    let mesh = Arc::new(Mesh::new().await);
    let server =
        Arc::new(Server::start(&mesh, forward(&[CLIENT]).0, ServerConfig::default()).await);
    let app = echo_app().await;
    let pool = mesh.pool(PoolConfig::default());
    let serving = crate::serving::Serving::pinned(2).expect("threads");
    // `Serving` serves accepted connections: these only carry the tunnels' tasks to a thread.
    let carrier = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let mut callers = Vec::new();
    for i in 0..TUNNELS {
        callers.push(
            TcpStream::connect(carrier.local_addr().expect("addr"))
                .await
                .expect("connect"),
        );
        let (conn, _) = carrier.accept().await.expect("accept");
        let (mesh, server, pool, done_tx) =
            (mesh.clone(), server.clone(), pool.clone(), done_tx.clone());
        serving.spawn(conn, move |_conn| async move {
            let data = payload(1024, i as u64);
            let stream = mesh
                .connect(&pool, &server, app)
                .await
                .expect("tunnel opens");
            let back = round_trip(stream, &data).await.expect("echoed");
            let _ = done_tx.send((crate::serving::current(), back == data));
        });
    }
    drop(done_tx);
    let mut threads = std::collections::BTreeSet::new();
    let mut intact = 0;
    timeout(WAIT, async {
        while let Some((thread, ok)) = done.recv().await {
            threads.insert(thread);
            intact += usize::from(ok);
        }
    })
    .await
    .expect("every tunnel finishes");
    assert_eq!(intact, TUNNELS, "every tunnel carried its bytes back");
    assert_eq!(
        threads,
        [Some(0), Some(1)].into(),
        "tunnels on both threads"
    );
    assert_eq!(
        pool.stats().snapshot().connections_opened,
        2,
        "one connection per thread, shared by that thread's tunnels"
    );
}

/// A handler whose request streams are answered by the server itself: 200, with the caller,
/// the target, the request's path and body in the answer's body.
struct Answering;

struct Answers {
    peer: SpiffeId,
}

impl ConnectHandler for Answering {
    type Io = TcpStream;

    async fn connect(&self, _peer: SpiffeId, authority: SocketAddr) -> Result<TcpStream, Refusal> {
        TcpStream::connect(authority)
            .await
            .map_err(|e| Refusal::new(503, e.to_string()))
    }

    fn requests(&self, peer: &SpiffeId) -> Option<Arc<dyn requests::RequestHandler>> {
        Some(Arc::new(Answers { peer: peer.clone() }))
    }
}

impl requests::RequestHandler for Answers {
    fn handle(
        self: Arc<Self>,
        target: SocketAddr,
        request: http::Request<requests::RecvBody>,
    ) -> futures::future::BoxFuture<'static, http::Response<requests::ResponseBody>> {
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let leaked = request.headers().contains_key(requests::TARGET_HEADER);
            let body = request.into_body().collect().await.expect("request body");
            let text = format!(
                "{} {target} {path} leaked={leaked} {}",
                self.peer,
                String::from_utf8_lossy(&body.to_bytes())
            );
            http::Response::new(
                http_body_util::Full::new(Bytes::from(text))
                    .map_err(|never| match never {})
                    .boxed(),
            )
        })
    }
}

/// Sends a request stream with `target` (or none) as its target header on `send`: the
/// status, and the body.
async fn raw_request_stream(
    send: &h2::client::SendRequest<Bytes>,
    target: Option<&str>,
) -> (u16, String) {
    let mut request = http::Request::post("http://api.shop/things");
    if let Some(t) = target {
        request = request.header(requests::TARGET_HEADER, t);
    }
    let request = request.body(()).expect("request");
    let mut send = send.clone().ready().await.expect("connection ready");
    let (response, mut body) = send.send_request(request, false).expect("send request");
    body.send_data(Bytes::from_static(b"hello"), true)
        .expect("send the body");
    let response = timeout(WAIT, response)
        .await
        .expect("response in time")
        .expect("a response, not a reset");
    let status = response.status().as_u16();
    let mut received = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = received.data().await {
        let chunk = chunk.expect("response body");
        let _ = received.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_streams_need_the_negotiation_and_a_canonical_target() {
    let mesh = Mesh::new().await;
    let server = Server::start(&mesh, Answering, ServerConfig::default()).await;

    // tls::client_config offers request streams: the server picks them.
    let send = raw_h2(&mesh, server.addr).await;
    let (status, body) = raw_request_stream(&send, Some("10.1.2.3:8080")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!("{CLIENT} 10.1.2.3:8080 /things leaked=false hello"),
        "the handler sees the proven caller and the target, never the target header"
    );
    for bad in [
        None,
        Some("example.com:80"),
        Some("10.1.2.3:0"),
        Some("010.1.2.3:80"),
    ] {
        let (status, body) = raw_request_stream(&send, bad).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
    }

    // A client that offers only h2 (a proxy without request streams) gets tunnels only.
    let mut config = (*tls::client_config(
        mesh.client.clone(),
        mesh.client_id.clone(),
        mesh.server_id.clone(),
    )
    .expect("client TLS configuration"))
    .clone();
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(rustls::pki_types::ServerName::from(server.addr.ip()), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(tls::ALPN_H2));
    let (h2_only, conn) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let (status, _) = raw_request_stream(&h2_only, Some("10.1.2.3:8080")).await;
    assert_eq!(
        status, 405,
        "a request stream on a connection that did not negotiate them"
    );

    let stats = server.hbone.stats().snapshot();
    assert_eq!(stats.requests, 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_sends_requests_as_streams_only_where_they_were_negotiated() {
    let mesh = Mesh::new().await;
    let server = Server::start(&mesh, Answering, ServerConfig::default()).await;
    let request = || {
        http::Request::post("http://api.shop/things")
            .version(http::Version::HTTP_2)
            .body(http_body_util::Full::new(Bytes::from_static(b"hello")))
            .expect("request")
    };
    let target: std::net::SocketAddrV4 = "10.1.2.3:8080".parse().expect("address");
    let pool = mesh.pool(PoolConfig::default());
    let response = pool
        .request(
            &mesh.client_id,
            server.addr,
            &mesh.server_id,
            target,
            request(),
        )
        .await
        .expect("sent")
        .expect("negotiated");
    assert_eq!(response.status(), 200);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("{CLIENT} 10.1.2.3:8080 /things leaked=false hello")
    );

    // A pool that does not offer them hands the request back untouched.
    let tunnels = mesh.pool(PoolConfig {
        requests: false,
        ..PoolConfig::default()
    });
    let back = tunnels
        .request(
            &mesh.client_id,
            server.addr,
            &mesh.server_id,
            target,
            request(),
        )
        .await
        .expect("no error")
        .expect_err("not sent as a stream");
    assert_eq!(back.uri().path(), "/things");
    assert_eq!(server.hbone.stats().snapshot().requests, 1);
}
