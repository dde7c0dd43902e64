use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::testing::{
    TestCa, TestSigner, eventually, id, manager, not_after, rotations, serial, sleep_past,
};

const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const HOUR: Duration = Duration::from_secs(3600);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What one side saw of its peer after the handshake.
#[derive(Debug, Clone)]
struct Seen {
    peer: SpiffeId,
    serial: String,
    alpn: Option<Vec<u8>>,
}

fn seen(certs: Option<&[CertificateDer<'static>]>, alpn: Option<&[u8]>) -> Result<Seen, String> {
    let certs = certs.ok_or("no peer certificate")?;
    Ok(Seen {
        peer: peer_identity(certs).map_err(|e| e.to_string())?,
        serial: serial(&certs[0]),
        alpn: alpn.map(<[u8]>::to_vec),
    })
}

/// An HBONE-like echo server: every accepted handshake is recorded, then bytes are echoed.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Result<Seen, String>>>>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    async fn start(config: Arc<ServerConfig>) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let acceptor = TlsAcceptor::from(config);
        let record = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let record = record.clone();
                tokio::spawn(async move {
                    let mut tls = match timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            return record.lock().expect("record").push(Err(e.to_string()));
                        }
                        Err(_) => {
                            return record.lock().expect("record").push(Err("timeout".into()));
                        }
                    };
                    let (_, conn) = tls.get_ref();
                    let s = seen(conn.peer_certificates(), conn.alpn_protocol());
                    record.lock().expect("record").push(s);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        let _ = tls.flush().await;
                    }
                });
            }
        });
        Echo {
            addr,
            accepted,
            task,
        }
    }

    /// The outcome of the `n`th handshake (0-based), waiting for it.
    async fn accepted(&self, n: usize) -> Result<Seen, String> {
        eventually("the server side of the handshake", IO_TIMEOUT, || {
            self.accepted.lock().expect("accepted").get(n).cloned()
        })
        .await
    }
}

/// Sends a few bytes and expects them back.
async fn ping(tls: &mut TlsStream<TcpStream>, msg: &[u8]) -> Result<(), String> {
    let round_trip = async {
        tls.write_all(msg).await?;
        tls.flush().await?;
        let mut back = vec![0u8; msg.len()];
        tls.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    match timeout(IO_TIMEOUT, round_trip).await {
        Ok(Ok(back)) if back == msg => Ok(()),
        Ok(Ok(back)) => Err(format!("echoed {back:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".into()),
    }
}

/// Handshakes with the server at `addr` and checks that data flows.
async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<(TlsStream<TcpStream>, Seen), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    // SPIFFE certificates carry no DNS name; the verifier ignores this one.
    let name = ServerName::try_from("hbone.mesh.invalid").expect("valid name");
    let mut tls = timeout(IO_TIMEOUT, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| "handshake timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    let s = seen(conn.peer_certificates(), conn.alpn_protocol())?;
    ping(&mut tls, b"hello").await?;
    Ok((tls, s))
}

fn mgr_for(
    ca: &Arc<TestCa>,
    lifetime: Duration,
) -> (
    Arc<CertManager>,
    TestSigner,
    prometheus_client::registry::Registry,
) {
    let signer = TestSigner::new(ca.clone(), lifetime);
    let (mgr, registry) = manager(&signer);
    (mgr, signer, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_carries_identities_and_data() {
    let (mgr, _signer, _registry) = mgr_for(&TestCa::new("ca-a"), HOUR);
    let (server, client) = (id(SERVER), id(CLIENT));
    let server_key = mgr.fetch(&server).await.expect("server cert");
    let client_key = mgr.fetch(&client).await.expect("client cert");

    let echo =
        Echo::start(server_config(mgr.clone(), server.clone()).expect("server config")).await;
    let cc = client_config(mgr.clone(), client.clone(), server.clone()).expect("client config");
    let (_tls, at_client) = connect(echo.addr, cc).await.expect("handshake and echo");
    assert_eq!(at_client.peer, server);
    assert_eq!(at_client.serial, serial(&server_key.cert[0]));
    assert_eq!(
        at_client.alpn.as_deref(),
        Some(ALPN_REQUESTS),
        "both sides prefer request streams"
    );
    let at_server = echo.accepted(0).await.expect("server accepted");
    assert_eq!(
        at_server.peer, client,
        "the server sees the client's verified identity"
    );
    assert_eq!(at_server.serial, serial(&client_key.cert[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_signed_by_another_ca() {
    let (ours, _s1, _r1) = mgr_for(&TestCa::new("ca-a"), HOUR);
    let (theirs, _s2, _r2) = mgr_for(&TestCa::new("ca-b"), HOUR);
    let (server, client) = (id(SERVER), id(CLIENT));
    theirs.fetch(&server).await.expect("server cert from ca-b");
    theirs
        .fetch(&client)
        .await
        .expect("so the server can verify clients of ca-b");
    ours.fetch(&client).await.expect("client cert from ca-a");

    let echo = Echo::start(server_config(theirs, server.clone()).expect("server config")).await;
    let cc = client_config(ours, client, server).expect("client config");
    let err = connect(echo.addr, cc).await.expect_err("unknown CA");
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_a_client_signed_by_another_ca() {
    let (ours, _s1, _r1) = mgr_for(&TestCa::new("ca-a"), HOUR);
    let (theirs, _s2, _r2) = mgr_for(&TestCa::new("ca-b"), HOUR);
    let (server, client) = (id(SERVER), id(CLIENT));
    ours.fetch(&server).await.expect("server cert from ca-a");
    theirs.fetch(&client).await.expect("client cert from ca-b");
    // The client trusts ca-a too, so only the server's check can fail.
    theirs
        .set_trust_bundle(vec![ours.trust_bundle()[0].clone()])
        .expect("client trusts ca-a");

    let echo = Echo::start(server_config(ours, server.clone()).expect("server config")).await;
    let cc = client_config(theirs, client, server).expect("client config");
    assert!(connect(echo.addr, cc).await.is_err(), "no data flows");
    let err = echo.accepted(0).await.expect_err("server refuses");
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_trust_domains_are_refused_both_ways() {
    let (mgr, _signer, _registry) = mgr_for(&TestCa::new("ca-a"), HOUR);
    let (server, client) = (id(SERVER), id(CLIENT));
    let foreign_server = id("spiffe://other.example/ns/default/sa/server");
    let foreign_client = id("spiffe://other.example/ns/default/sa/client");
    for i in [&server, &client, &foreign_server, &foreign_client] {
        mgr.fetch(i)
            .await
            .expect("the same CA signs both trust domains");
    }

    // A server of another trust domain is not the server we expect.
    let echo = Echo::start(server_config(mgr.clone(), foreign_server).expect("config")).await;
    let cc = client_config(mgr.clone(), client.clone(), server.clone()).expect("config");
    let err = connect(echo.addr, cc).await.expect_err("foreign server");
    let want = format!("peer is spiffe://other.example/ns/default/sa/server, expected {SERVER}");
    assert!(err.contains(&want), "{err}");

    // A client of another trust domain is refused by our server.
    let echo = Echo::start(server_config(mgr.clone(), server.clone()).expect("config")).await;
    let cc = client_config(mgr.clone(), foreign_client, server.clone()).expect("config");
    assert!(connect(echo.addr, cc).await.is_err());
    let err = echo.accepted(0).await.expect_err("foreign client");
    assert!(
        err.contains("is not in trust domain cluster.local"),
        "{err}"
    );

    // Any workload of our trust domain is accepted at the TLS level.
    let cc = client_config(mgr.clone(), client, server).expect("config");
    connect(echo.addr, cc).await.expect("our own client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_an_unexpected_server_identity() {
    let (mgr, _signer, _registry) = mgr_for(&TestCa::new("ca-a"), HOUR);
    let (server, client) = (id(SERVER), id(CLIENT));
    let admin = id("spiffe://cluster.local/ns/default/sa/admin");
    mgr.fetch(&server).await.expect("server cert");
    mgr.fetch(&client).await.expect("client cert");

    let echo = Echo::start(server_config(mgr.clone(), server).expect("config")).await;
    let cc = client_config(mgr.clone(), client, admin).expect("config");
    let err = connect(echo.addr, cc)
        .await
        .expect_err("server is not admin");
    let want = format!("peer is {SERVER}, expected spiffe://cluster.local/ns/default/sa/admin");
    assert!(err.contains(&want), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_outlive_rotations_and_new_handshakes_see_new_certs() {
    let (mgr, _signer, registry) = mgr_for(&TestCa::new("ca-a"), Duration::from_secs(4));
    let (server, client) = (id(SERVER), id(CLIENT));
    let first = mgr.fetch(&server).await.expect("server cert");
    mgr.fetch(&client).await.expect("client cert");
    let first_expiry = not_after(&first.cert[0]);

    let echo = Echo::start(server_config(mgr.clone(), server.clone()).expect("config")).await;
    let cc = client_config(mgr.clone(), client.clone(), server.clone()).expect("config");
    let (mut long_lived, seen) = connect(echo.addr, cc.clone())
        .await
        .expect("first connection");

    let mut server_serials = BTreeSet::from([seen.serial]);
    let mut client_serials = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while server_serials.len() < 3 || client_serials.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "two rotations within 40 s"
        );
        let (_tls, seen) = connect(echo.addr, cc.clone()).await.expect("new handshake");
        assert_eq!(seen.peer, server);
        server_serials.insert(seen.serial);
        let n = echo.accepted.lock().expect("accepted").len();
        let at_server = echo.accepted(n - 1).await.expect("accepted");
        client_serials.insert(at_server.serial);
        ping(&mut long_lived, b"still here")
            .await
            .expect("the first connection carries data");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Hold it past the expiry of the certificate it was established with.
    sleep_past(first_expiry, Duration::from_millis(200)).await;
    ping(&mut long_lived, b"after expiry")
        .await
        .expect("established connections are untouched");
    assert!(rotations(&registry, &server, "success") >= 3.0);
    assert!(rotations(&registry, &client, "success") >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_signer_leaves_the_cert_in_use_until_it_expires() {
    let (mgr, signer, registry) = mgr_for(&TestCa::new("ca-a"), Duration::from_secs(6));
    let (server, client) = (id(SERVER), id(CLIENT));
    let key = mgr.fetch(&server).await.expect("server cert");
    mgr.fetch(&client).await.expect("client cert");
    let expiry = not_after(&key.cert[0]);
    signer.set_failing(true);

    let echo = Echo::start(server_config(mgr.clone(), server.clone()).expect("config")).await;
    let cc = client_config(mgr.clone(), client, server.clone()).expect("config");
    eventually("failed renewals", Duration::from_secs(10), || {
        (rotations(&registry, &server, "failure") >= 1.0).then_some(())
    })
    .await;
    let (_tls, seen) = connect(echo.addr, cc.clone())
        .await
        .expect("the old cert still works");
    assert_eq!(seen.serial, serial(&key.cert[0]));

    sleep_past(expiry, Duration::from_millis(500)).await;
    assert!(mgr.current(&server).is_none());
    assert!(
        connect(echo.addr, cc).await.is_err(),
        "no handshake after expiry"
    );
    assert!(rotations(&registry, &server, "failure") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_trust_bundle_applies_to_new_handshakes() {
    let a = TestCa::new("ca-a");
    let b = TestCa::new("ca-b");
    let (mgr, signer, _registry) = mgr_for(&a, HOUR);
    let (server, client) = (id(SERVER), id(CLIENT));
    mgr.fetch(&server).await.expect("server cert from a");
    mgr.fetch(&client).await.expect("client cert from a");

    // Built once; never rebuilt below.
    let echo = Echo::start(server_config(mgr.clone(), server.clone()).expect("config")).await;
    let cc = client_config(mgr.clone(), client.clone(), server.clone()).expect("config");
    connect(echo.addr, cc.clone()).await.expect("all from a");

    // The CA moves to b; the server gets a cert from b before the bundle says so.
    signer.set_ca(b.clone());
    mgr.forget(&server);
    mgr.fetch(&server).await.expect("server cert from b");
    let err = connect(echo.addr, cc.clone())
        .await
        .expect_err("b is not trusted yet");
    assert!(err.contains("UnknownIssuer"), "{err}");

    mgr.set_trust_bundle(vec![a.root(), b.root()])
        .expect("both roots");
    connect(echo.addr, cc.clone())
        .await
        .expect("server from b, client from a");

    mgr.set_trust_bundle(vec![b.root()]).expect("only b");
    assert!(
        connect(echo.addr, cc.clone()).await.is_err(),
        "client from a refused"
    );
    let last = echo.accepted.lock().expect("accepted").len() - 1;
    let err = echo.accepted(last).await.expect_err("server refuses a");
    assert!(err.contains("UnknownIssuer"), "{err}");

    mgr.forget(&client);
    mgr.fetch(&client).await.expect("client cert from b");
    let (_tls, seen) = connect(echo.addr, cc).await.expect("all from b");
    assert_eq!(seen.peer, server);
}

#[test]
fn peer_identity_needs_exactly_one_uri_san() {
    assert_eq!(
        peer_identity(&[]).expect_err("empty").kind(),
        "no_certificate"
    );
    let garbage = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff]);
    assert_eq!(
        peer_identity(&[garbage]).expect_err("garbage").kind(),
        "bad_certificate"
    );

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert_with = |sans: Vec<rcgen::SanType>| {
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = sans;
        p.self_signed(&key).expect("self-signed").der().clone()
    };
    let uri = |s: &str| rcgen::SanType::URI(s.to_string().try_into().expect("ia5"));
    let dns = rcgen::SanType::DnsName("web.example".to_string().try_into().expect("ia5"));

    let one = cert_with(vec![uri(SERVER), dns.clone()]);
    assert_eq!(peer_identity(&[one]).expect("one URI SAN"), id(SERVER));
    let none = cert_with(vec![dns]);
    assert_eq!(
        peer_identity(&[none]).expect_err("no URI").kind(),
        "uri_san_count"
    );
    let two = cert_with(vec![uri(SERVER), uri(CLIENT)]);
    assert_eq!(
        peer_identity(&[two]).expect_err("two URIs").kind(),
        "uri_san_count"
    );
    let bad = cert_with(vec![uri("spiffe://cluster.local/not/a/workload")]);
    assert_eq!(
        peer_identity(&[bad]).expect_err("not a mesh ID").kind(),
        "bad_id"
    );
}
