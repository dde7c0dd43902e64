use std::collections::BTreeSet;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::*;

/// Accepts `n` connections on `serving`; each task answers with the name of the thread it
/// runs on and of the thread of a task it spawned itself.
async fn served_on(serving: &Serving, n: usize) -> Vec<(String, String)> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(b"ping").await.expect("write");
            let mut answer = [0u8; 4];
            c.read_exact(&mut answer).await.expect("read the echo");
            assert_eq!(&answer, b"ping");
        }));
        let (conn, _) = listener.accept().await.expect("accept");
        let tx = tx.clone();
        serving.spawn(conn, move |mut conn| async move {
            let here = thread_name();
            let index = current().map(|i| format!("mesh-proxy-{i}"));
            assert_eq!(index.is_some(), here.starts_with("mesh-proxy-"), "{here}");
            assert!(
                index.as_ref().is_none_or(|i| *i == here),
                "{here} says it is {index:?}"
            );
            let child = tokio::spawn(async { thread_name() }).await.expect("child");
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).await.expect("read");
            conn.write_all(&buf).await.expect("echo");
            let _ = tx.send((here, child));
        });
    }
    drop(tx);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("served in time")
            .expect("client");
    }
    let mut seen = Vec::new();
    while let Some(s) = rx.recv().await {
        seen.push(s);
    }
    seen
}

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("-").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_connections_spread_over_the_threads_and_keep_their_tasks_on_theirs() {
    let serving = Serving::pinned(3).expect("threads");
    assert_eq!(serving.threads(), 3);
    let seen = served_on(&serving, 6).await;
    assert_eq!(seen.len(), 6, "every connection served");
    for (conn, child) in &seen {
        assert!(conn.starts_with("mesh-proxy-"), "served on {conn}");
        assert_eq!(
            conn, child,
            "a connection's own task went to another thread"
        );
    }
    let threads: BTreeSet<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        threads,
        BTreeSet::from(["mesh-proxy-0", "mesh-proxy-1", "mesh-proxy-2"]),
        "connections are dealt to every thread in turn"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_connections_stay_on_the_accepting_runtime() {
    let serving = Serving::shared();
    assert_eq!(serving.threads(), 0);
    for (conn, _) in served_on(&serving, 2).await {
        assert!(conn.starts_with("tokio-rt-worker"), "served on {conn}");
    }
}

#[tokio::test]
async fn the_threads_stop_with_the_last_holder_and_close_what_they_served() {
    let serving = Serving::pinned(1).expect("threads");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (conn, _) = listener.accept().await.expect("accept");
    let (started_tx, started) = oneshot::channel();
    serving.spawn(conn, move |conn| async move {
        let _ = started_tx.send(());
        // Holds the connection open for as long as the thread runs.
        std::future::pending::<()>().await;
        drop(conn);
    });
    started.await.expect("served");
    drop(serving);
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
        .await
        .expect("the connection closed when its thread stopped");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
