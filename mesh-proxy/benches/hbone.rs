//! Micro-benchmark of opening an HBONE tunnel on a connection the pool already holds: the
//! CONNECT request, the server's handler and the 200 answer, over mutual TLS on loopback.
//!
//! Client pool and server run in this process with certificates from the test CA of the
//! `testing` feature. The handler answers with an in-memory stream, so no connection to an
//! application is counted; only the opening is timed, each tunnel being closed gracefully
//! after it. Run with
//! `cargo bench -p mesh-proxy --features testing --bench hbone`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_core::SpiffeId;
use mesh_proxy::hbone::{HbonePool, HboneServer, HboneStream, PoolConfig, Refusal, ServerConfig};
use mesh_proxy::identity::testing::{TestCa, TestSigner, id, manager};
use mesh_proxy::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/api";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const CERT_LIFETIME: Duration = Duration::from_secs(3600);

/// The original destination the tunnels carry (the handler does not connect to it).
const AUTHORITY: &str = "10.1.0.3:8080";

/// A client pool and an HBONE server on 127.0.0.1, sharing a CA.
struct Tunnels {
    pool: HbonePool,
    client_id: SpiffeId,
    server_id: SpiffeId,
    server_addr: SocketAddr,
    authority: SocketAddr,
}

/// Admits every caller. The application is an in-memory pipe whose far end reads until the
/// tunnel's END_STREAM and then closes, so each tunnel ends gracefully both ways.
async fn admit(_peer: SpiffeId, _authority: SocketAddr) -> Result<DuplexStream, Refusal> {
    let (app, mut far_end) = tokio::io::duplex(1024);
    tokio::spawn(async move {
        let mut sink = [0u8; 1024];
        while let Ok(1..) = far_end.read(&mut sink).await {}
    });
    Ok(app)
}

impl Tunnels {
    async fn start() -> Tunnels {
        let ca = TestCa::new("bench-ca");
        let (server_id, client_id) = (id(SERVER), id(CLIENT));
        let (server_mgr, _) = manager(&TestSigner::new(ca.clone(), CERT_LIFETIME));
        let (client_mgr, _) = manager(&TestSigner::new(ca, CERT_LIFETIME));
        server_mgr
            .fetch(&server_id)
            .await
            .expect("server certificate");
        client_mgr
            .fetch(&client_id)
            .await
            .expect("client certificate");

        let tls = tls::server_config(server_mgr, server_id.clone()).expect("server TLS config");
        let server =
            Arc::new(HboneServer::new(tls, admit, ServerConfig::default()).expect("HBONE server"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = listener.local_addr().expect("listener address");
        tokio::spawn(server.serve(listener));

        let pool = HbonePool::new(client_mgr, PoolConfig::default()).expect("HBONE pool");
        Tunnels {
            pool,
            client_id,
            server_id,
            server_addr,
            authority: AUTHORITY.parse().expect("authority"),
        }
    }

    /// Opens one tunnel.
    async fn open(&self) -> HboneStream {
        self.pool
            .connect(
                &self.client_id,
                self.server_addr,
                &self.server_id,
                self.authority,
            )
            .await
            .expect("tunnel opens")
    }
}

/// Closes a tunnel as a finished connection does: END_STREAM, then the server's END_STREAM.
async fn close(mut stream: HboneStream) {
    stream.shutdown().await.expect("END_STREAM sent");
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .await
        .expect("the server ends the tunnel");
}

fn bench_hbone(c: &mut Criterion) {
    let rt: Runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let tunnels = rt.block_on(Tunnels::start());
    // The first tunnel establishes the pooled connection (TCP, TLS, HTTP/2).
    rt.block_on(async { close(tunnels.open().await).await });

    let mut group = c.benchmark_group("hbone");
    // Only the opening is timed: the CONNECT, the handler, the 200. Each tunnel is then
    // closed gracefully, untimed, so streams do not pile up on the connection.
    group.bench_function("open_stream_pooled", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut opening = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let stream = tunnels.open().await;
                    opening += start.elapsed();
                    close(stream).await;
                }
                opening
            })
        })
    });
    group.finish();

    // Every tunnel went over the one connection: the figure is not a handshake's.
    let stats = tunnels.pool.stats().snapshot();
    assert_eq!(
        stats.connections_opened, 1,
        "tunnels opened new connections: {stats:?}"
    );
}

/// Short runs: a regression check to run before and after a change.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_hbone
}
criterion_main!(benches);
