//! In-process HBONE fixtures: two identities from one test CA, an HBONE server on loopback
//! whose connection tasks the tests can join, and plain TCP applications behind it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mesh_core::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::super::*;
use crate::identity::CertManager;
use crate::identity::testing::{TestCa, TestSigner, eventually, id, manager};
use crate::tls;

pub(super) const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
pub(super) const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
pub(super) const OTHER: &str = "spiffe://cluster.local/ns/default/sa/other";
/// Bound on anything a test waits for: failing beats hanging.
pub(super) const WAIT: Duration = Duration::from_secs(20);
const HOUR: Duration = Duration::from_secs(3600);

/// The identities of one test: the server's and the client's managers share a CA.
pub(super) struct Mesh {
    pub(super) server_id: SpiffeId,
    pub(super) client_id: SpiffeId,
    pub(super) server: Arc<CertManager>,
    pub(super) client: Arc<CertManager>,
}

impl Mesh {
    pub(super) async fn new() -> Mesh {
        let ca = TestCa::new("hbone-test-ca");
        let (server_id, client_id) = (id(SERVER), id(CLIENT));
        let (server, _) = manager(&TestSigner::new(ca.clone(), HOUR));
        let (client, _) = manager(&TestSigner::new(ca, HOUR));
        server.fetch(&server_id).await.expect("server certificate");
        client.fetch(&client_id).await.expect("client certificate");
        Mesh {
            server_id,
            client_id,
            server,
            client,
        }
    }

    pub(super) fn pool(&self, config: PoolConfig) -> HbonePool {
        HbonePool::new(self.client.clone(), config).expect("valid pool configuration")
    }

    /// Opens a tunnel from the client identity to `authority` through `server`.
    pub(super) async fn connect<H>(
        &self,
        pool: &HbonePool,
        server: &Server<H>,
        authority: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        let connect = pool.connect(&self.client_id, server.addr, &self.server_id, authority);
        timeout(WAIT, connect).await.expect("connect returns")
    }
}

/// The tasks serving accepted connections, in order; `None` once a test took one.
type ConnTasks = Arc<Mutex<Vec<Option<JoinHandle<Result<(), HboneError>>>>>>;

/// An [`HboneServer`] on 127.0.0.1, each accepted connection served on a task kept here.
pub(super) struct Server<H> {
    pub(super) hbone: Arc<HboneServer<H>>,
    pub(super) addr: SocketAddr,
    conns: ConnTasks,
    accept: JoinHandle<()>,
}

impl<H> Drop for Server<H> {
    fn drop(&mut self) {
        self.accept.abort();
        self.abort_connections();
    }
}

impl<H: ConnectHandler> Server<H> {
    pub(super) async fn start(mesh: &Mesh, handler: H, config: ServerConfig) -> Server<H> {
        let tls = tls::server_config(mesh.server.clone(), mesh.server_id.clone())
            .expect("server TLS configuration");
        let hbone = Arc::new(HboneServer::new(tls, handler, config).expect("valid configuration"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (server, tasks) = (hbone.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let server = server.clone();
                let task = tokio::spawn(async move { server.serve_tcp(tcp).await });
                tasks.lock().expect("connection tasks").push(Some(task));
            }
        });
        Server {
            hbone,
            addr,
            conns,
            accept,
        }
    }
}

impl<H> Server<H> {
    /// The outcome of the `n`th accepted connection (0-based), failing the test if its task
    /// does not end in time (a stuck task) or panicked.
    pub(super) async fn finished(&self, n: usize) -> Result<(), HboneError> {
        let take = || {
            let mut conns = self.conns.lock().expect("connection tasks");
            conns
                .get_mut(n)
                .map(|t| t.take().expect("each connection is finished once"))
        };
        let task = eventually("the connection to be accepted", WAIT, take).await;
        timeout(WAIT, task)
            .await
            .expect("the connection task ends")
            .expect("the connection task did not panic")
    }

    pub(super) fn accepted(&self) -> usize {
        self.conns.lock().expect("connection tasks").len()
    }

    /// Kills every connection: their TCP sockets close without GOAWAY.
    pub(super) fn abort_connections(&self) {
        for task in self
            .conns
            .lock()
            .expect("connection tasks")
            .iter()
            .flatten()
        {
            task.abort();
        }
    }
}

/// A handler that lets `allowed` connect to the authority over TCP, 403 for anyone else, 503
/// when the application refuses. Records every caller it was asked about.
pub(super) fn forward(
    allowed: &[&str],
) -> (
    impl ConnectHandler<Io = TcpStream>,
    Arc<Mutex<Vec<SpiffeId>>>,
) {
    let allowed: Arc<Vec<SpiffeId>> = Arc::new(allowed.iter().map(|s| id(s)).collect());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let handler = move |peer: SpiffeId, authority: SocketAddr| {
        let allowed = allowed.clone();
        let record = record.clone();
        async move {
            record.lock().expect("seen").push(peer.clone());
            if !allowed.contains(&peer) {
                return Err(Refusal::new(403, format!("{peer} may not connect")));
            }
            TcpStream::connect(authority)
                .await
                .map_err(|e| Refusal::new(503, format!("connect {authority}: {e}")))
        }
    };
    (handler, seen)
}

/// An application that echoes each connection, then half-closes after its client did.
pub(super) async fn echo_app() -> SocketAddr {
    app(|mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
    })
    .await
}

/// An application that runs `serve` on every connection it accepts.
pub(super) async fn app<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // A backlog that holds a burst of a thousand connects: an overflowing accept queue
    // answers with resets under load.
    let socket = tokio::net::TcpSocket::new_v4().expect("app socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind app");
    let listener = socket.listen(4096).expect("listen");
    let addr = listener.local_addr().expect("app address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp));
        }
    });
    addr
}

/// An application that reports, for each connection, the bytes it read before EOF, after
/// running `greet` on the connection.
pub(super) async fn counting_app<F, Fut>(greet: F) -> (SocketAddr, mpsc::UnboundedReceiver<usize>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = TcpStream> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = app(move |tcp| {
        let (greet, tx) = (greet.clone(), tx.clone());
        async move {
            let mut tcp = greet(tcp).await;
            let mut n = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(k) = tcp.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                n += k;
            }
            let _ = tx.send(n);
        }
    })
    .await;
    (addr, rx)
}

/// Writes `data` and shuts down while reading everything the other side sends.
pub(super) async fn round_trip<S>(stream: S, data: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let read = async {
        let mut back = Vec::with_capacity(data.len());
        r.read_to_end(&mut back).await.map(|_| back)
    };
    let (written, back) = timeout(WAIT, async { tokio::join!(write, read) })
        .await
        .expect("round trip ends");
    written?;
    back
}

/// Deterministic pseudo-random bytes.
pub(super) fn payload(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// FNV-1a, to compare large payloads by checksum.
pub(super) fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A raw HTTP/2 client over the client identity's mTLS, to send what the pool never would.
pub(super) async fn raw_h2(mesh: &Mesh, addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let cc = tls::client_config(
        mesh.client.clone(),
        mesh.client_id.clone(),
        mesh.server_id.clone(),
    )
    .expect("client TLS configuration");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::from(addr.ip());
    let tls = TlsConnector::from(cc)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (send, conn) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Sends a request head and returns the response status and reason header.
pub(super) async fn raw_request(
    send: &h2::client::SendRequest<Bytes>,
    method: http::Method,
    uri: &str,
) -> (u16, Option<String>) {
    let request = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .expect("valid request");
    let mut send = send.clone().ready().await.expect("connection ready");
    let (response, _stream) = send.send_request(request, false).expect("send request");
    let response = timeout(WAIT, response)
        .await
        .expect("response in time")
        .expect("a response, not a reset");
    let reason = response
        .headers()
        .get(REASON_HEADER)
        .map(|v| v.to_str().expect("ASCII reason").to_string());
    (response.status().as_u16(), reason)
}

/// A TLS client that presents no certificate (and trusts any server).
pub(super) fn client_without_certificate() -> Arc<ClientConfig> {
    let provider = Arc::new(ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    Arc::new(config)
}

#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
