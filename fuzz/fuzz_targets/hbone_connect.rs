//! HBONE on the server side: what a caller sends on an HBONE connection once TLS is up,
//! HTTP/2 frames (the client preface is prepended), served with the HBONE server's HTTP/2
//! settings; each stream's request then goes through the server's CONNECT check.
//!
//! Invariants: nothing panics; a request is accepted only as a CONNECT whose `:authority` is
//! the canonical text of the IPv4 socket address it names, with a non-zero port.
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use mesh_proxy::hbone::{ServerConfig, connect_target};
use tokio::io::AsyncWriteExt;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bounds one input; a stuck connection is a finding (libFuzzer's -timeout sees it).
const DEADLINE: Duration = Duration::from_secs(5);

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let input = [PREFACE, data].concat();
        // The caller writes everything and closes; the server's answers are drained so that
        // it never blocks on a full pipe.
        let caller = tokio::spawn(async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let _ = tokio::io::copy(&mut client, &mut tokio::io::sink()).await;
        });
        let _ = tokio::time::timeout(DEADLINE, serve(server)).await;
        caller.abort();
    });
});

async fn serve(io: tokio::io::DuplexStream) {
    let Ok(mut h2) = ServerConfig::default()
        .h2_builder()
        .handshake::<_, Bytes>(io)
        .await
    else {
        return;
    };
    while let Some(Ok((request, _respond))) = h2.accept().await {
        check(&request);
    }
}

fn check<B>(request: &Request<B>) {
    let Ok(addr) = connect_target(request) else {
        return;
    };
    assert_eq!(request.method(), Method::CONNECT, "accepted another method");
    let authority = request
        .uri()
        .authority()
        .expect("an accepted CONNECT has an authority");
    assert_eq!(
        authority.as_str(),
        addr.to_string(),
        "accepted a non-canonical authority"
    );
    assert!(matches!(addr, SocketAddr::V4(a) if a.port() != 0));
}
