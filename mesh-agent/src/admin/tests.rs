use std::net::SocketAddr;

use mesh_core::model::{NamespacedName, NodeSnapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::config::{DatapathConfig, ProxyConfig};
use crate::telemetry::{ConnMeta, MeshPath, Metered, Peer, Reporter, Side};

fn config() -> Config {
    Config {
        datapath: DatapathConfig::new("admin-test").expect("instance"),
        controller: None,
        cgroup: None,
        pods: Vec::new(),
        unenroll_on_exit: false,
        enroll_from_config: false,
        proxy: ProxyConfig::default(),
        admin: AdminConfig::default(),
    }
}

/// One HTTP/1.1 request over a fresh TCP connection: (status, body).
async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!("{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_string(&mut raw),
    )
    .await
    .expect("an answer in time")
    .expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_string())
}

async fn serving(state: &Arc<AdminState>, pages: Pages) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(listener, state.clone(), pages));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_serves_metrics_the_connection_table_and_the_config() {
    let mut registry = Registry::default();
    let telemetry = Telemetry::new(&mut registry);
    let snapshot = NodeSnapshot {
        node: "node-a".into(),
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    };
    let state = Arc::new(AdminState::new(
        config(),
        Some(crate::state::holding(&snapshot)),
        None,
        telemetry.clone(),
        registry,
    ));
    let admin = serving(&state, Pages::Admin).await;

    // An open connection that carried 3 bytes.
    let mut meta = ConnMeta::new(
        NamespacedName::new("shop", "web-0"),
        Reporter::Source,
        MeshPath::Direct,
        "10.0.0.9:443".parse().expect("addr"),
    );
    meta.src = Peer::of_pod(&meta.pod);
    let (proxy_end, mut app) = tokio::io::duplex(1024);
    let mut conn = Metered::new(proxy_end, telemetry.open(meta), Side::Source);
    app.write_all(b"abc").await.expect("write");
    let mut buf = [0u8; 3];
    conn.read_exact(&mut buf).await.expect("read");

    assert_eq!(
        request(admin, "GET", "/healthz").await,
        (200, "ok\n".into())
    );

    let (status, body) = request(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    let received = body
        .lines()
        .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
        .expect("the received bytes");
    assert!(received.contains("source_workload=\"web-0\""), "{received}");
    assert!(received.ends_with(" 3"), "{received}");

    let (status, body) = request(admin, "GET", "/debug/conns").await;
    assert_eq!(status, 200);
    let conns: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(conns.as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(conns[0]["pod"], "shop/web-0");
    assert_eq!(conns[0]["path"], "direct");
    assert_eq!(conns[0]["dst_addr"], "10.0.0.9:443");
    assert_eq!(conns[0]["bytes_to_dst"], 3);

    let (status, body) = request(admin, "GET", "/debug/config").await;
    assert_eq!(status, 200);
    let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(view["agent"]["proxy"]["idle_timeout"], "1h", "{body}");
    assert_eq!(view["agent"]["datapath"]["instance"], "admin-test");
    assert!(!view["mesh"]["version"].is_null(), "{body}");
    assert_eq!(view["mesh"]["store"]["applied"], 1, "{body}");

    let (status, body) = request(admin, "GET", "/debug/certs").await;
    assert_eq!((status, body.trim()), (200, "[]"));

    assert_eq!(request(admin, "GET", "/debug/nope").await.0, 404);
    assert_eq!(request(admin, "POST", "/metrics").await.0, 405);

    // The metrics listener serves the metrics only.
    let metrics = serving(&state, Pages::Metrics).await;
    let (status, body) = request(metrics, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("istio_tcp_connections_opened_total{"),
        "{body}"
    );
    assert_eq!(request(metrics, "GET", "/debug/conns").await.0, 404);

    state.set_draining();
    assert_eq!(
        request(admin, "GET", "/healthz").await,
        (503, "draining\n".into())
    );
    drop(conn);
}

#[tokio::test]
async fn a_taken_default_address_is_skipped_and_a_taken_given_one_is_an_error() {
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = taken.local_addr().expect("addr");
    let default = Listen {
        addr,
        explicit: false,
    };
    assert!(bind(&default, "admin").await.expect("not fatal").is_none());
    let given = Listen {
        addr,
        explicit: true,
    };
    let e = bind(&given, "admin").await.expect_err("fatal");
    assert_eq!(e.kind(), "bind");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}
