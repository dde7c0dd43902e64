//! The listeners of a pod without a controller, on loopback: every connection goes to one
//! echo application, as the pod's network namespace would send it.

use std::net::Ipv4Addr;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::telemetry::testing::{encode, sample};

const WAIT: Duration = Duration::from_secs(10);

struct Pod {
    proxy: PodProxy,
    outbound: SocketAddr,
    inbound: SocketAddr,
    telemetry: Telemetry,
    registry: Registry,
}

async fn echo_app() -> SocketAddr {
    let app = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = app.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn transparent_pod() -> Pod {
    transparent_pod_serving(Serving::shared()).await
}

/// A pod without a controller whose connections are served where `serving` says.
async fn transparent_pod_serving(serving: Serving) -> Pod {
    let listener = || {
        let l = StdListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        l
    };
    transparent_pod_on_serving(listener(), listener(), serving).await
}

/// A pod without a controller serving on the given listeners.
async fn transparent_pod_on(outbound: StdListener, inbound: StdListener) -> Pod {
    transparent_pod_on_serving(outbound, inbound, Serving::shared()).await
}

async fn transparent_pod_on_serving(
    outbound: StdListener,
    inbound: StdListener,
    serving: Serving,
) -> Pod {
    let app = echo_app().await;
    let addrs = (
        outbound.local_addr().expect("addr"),
        inbound.local_addr().expect("addr"),
    );
    let net = PodNet {
        connect: Arc::new(move |_| Box::pin(TcpStream::connect(app))),
        listen: Arc::new(|addr| Box::pin(TcpListener::bind(addr))),
    };
    let mut registry = Registry::default();
    let telemetry = Telemetry::new(&mut registry);
    let proxy = start(
        "shop/api-0",
        Ipv4Addr::LOCALHOST,
        net,
        PodSockets {
            outbound,
            inbound,
            hbone: None,
        },
        None,
        telemetry.clone(),
        &ProxyConfig::default(),
        &serving,
    )
    .expect("start");
    Pod {
        proxy,
        outbound: addrs.0,
        inbound: addrs.1,
        telemetry,
        registry,
    }
}

async fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(buf, msg);
}

/// Whether a new connection to `addr` is refused: not accepted, or reset before any answer.
async fn refused(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return true;
    };
    let _ = s.write_all(b"x").await;
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_refuses_new_connections_and_lets_open_ones_finish() {
    drain_refuses_new_connections_and_lets_open_ones_finish(Serving::shared()).await;
}

/// The same with the connections on the proxy's own threads: carried, counted and drained
/// there as on the agent's runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_served_on_the_proxys_own_threads_are_carried_and_drained_alike() {
    drain_refuses_new_connections_and_lets_open_ones_finish(Serving::pinned(2).expect("threads"))
        .await;
}

async fn drain_refuses_new_connections_and_lets_open_ones_finish(serving: Serving) {
    let pod = transparent_pod_serving(serving).await;
    let mut open = TcpStream::connect(pod.inbound).await.expect("connect");
    echo(&mut open, b"before").await;
    assert!(!refused(pod.inbound).await, "accepting before the drain");
    tokio::time::timeout(WAIT, async {
        while pod.telemetry.live() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the probe connection closes");

    let grace = Duration::from_secs(20);
    let drained = drain([&pod.proxy], Stop::Refuse, &pod.telemetry, grace);
    let client = async {
        // The drain stops the listeners as it starts.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(refused(pod.inbound).await, "inbound: reset while draining");
        assert!(
            TcpStream::connect(pod.outbound).await.is_err(),
            "outbound: the listener is closed"
        );
        // The open connection still carries bytes both ways, then ends on its own.
        echo(&mut open, b"during the drain").await;
        open.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        open.read_to_end(&mut rest).await.expect("read to the end");
        assert!(rest.is_empty());
    };
    let (drained, ()) = tokio::join!(drained, client);
    assert_eq!((drained.open, drained.cut), (1, 0), "{drained:?}");
    assert!(drained.elapsed < grace, "{drained:?}");
    let text = encode(&pod.registry);
    let finished = [
        ("reporter", "destination"),
        ("mesh_path", "plaintext"),
        ("destination_workload", "api-0"),
        ("response_flags", "-"),
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &finished),
        2,
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &finished[..3]),
        23
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_pod_leaves_its_listeners_to_the_successor() {
    let old = transparent_pod().await;
    let mut open = TcpStream::connect(old.inbound).await.expect("connect");
    echo(&mut open, b"before").await;
    // The successor serves the same sockets, as a handover passes them.
    let fds = old.proxy.listening().expect("dup").expect("listening");
    assert!(
        fds.hbone.is_none(),
        "no HBONE listener without a controller"
    );
    let new = transparent_pod_on(fds.outbound.into(), fds.inbound.into()).await;
    assert_eq!((new.outbound, new.inbound), (old.outbound, old.inbound));

    let drained = drain([&old.proxy], Stop::Release, &old.telemetry, WAIT);
    let client = async {
        // Not one new connection is refused: the old proxy accepts none any more (with
        // `Stop::Refuse` it would reset those it takes from the shared queue).
        for i in 0..20u8 {
            let mut s = TcpStream::connect(old.inbound).await.expect("connect");
            echo(&mut s, &[b'a' + i]).await;
        }
        echo(&mut open, b"during the drain").await;
        open.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        open.read_to_end(&mut rest).await.expect("read to the end");
    };
    let (drained, ()) = tokio::join!(drained, client);
    assert_eq!((drained.open, drained.cut), (1, 0), "{drained:?}");
    let served = [("reporter", "destination"), ("mesh_path", "plaintext")];
    assert_eq!(
        sample(
            &encode(&new.registry),
            "istio_tcp_connections_opened_total",
            &served
        ),
        20
    );
    // The old proxy gone, the sockets stay with the successor.
    drop(old);
    let mut s = TcpStream::connect(new.inbound).await.expect("connect");
    echo(&mut s, b"after").await;
    // Accepted, then reset at once (no original destination on loopback): not refused.
    match TcpStream::connect(new.outbound).await {
        Ok(_) => {}
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "the outbound listener closed with the old proxy"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_cuts_a_stuck_connection() {
    let pod = transparent_pod().await;
    let mut stuck = TcpStream::connect(pod.inbound).await.expect("connect");
    echo(&mut stuck, b"hello").await;

    let grace = Duration::from_millis(300);
    let drained = drain([&pod.proxy], Stop::Refuse, &pod.telemetry, grace).await;
    assert_eq!((drained.open, drained.cut), (1, 1), "{drained:?}");
    assert!(drained.elapsed >= grace, "{drained:?}");
    assert!(drained.elapsed < WAIT, "{drained:?}");

    // The proxy closed it: the client reads the end.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, stuck.read_to_end(&mut rest))
        .await
        .expect("closed promptly");
    assert!(read.is_err() || rest.is_empty(), "{rest:?}");
    assert_eq!(pod.telemetry.live(), 0);
    let text = encode(&pod.registry);
    let cut = [("response_flags", "DRAIN")];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &cut),
        1,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshed_pod_is_in_the_node_registry_while_its_proxy_runs() {
    let ca = crate::identity::testing::TestCa::new("proxy-test-ca");
    let signer = crate::identity::testing::TestSigner::new(ca, Duration::from_secs(3600));
    let (certs, _) = crate::identity::testing::manager(&signer);
    let local = Arc::new(LocalPods::default());
    let mesh = Mesh {
        // No workload configured yet: the pod serves no HBONE, but it is a pod of this node.
        store: crate::state::holding(&mesh_core::model::NodeSnapshot {
            node: "node-a".into(),
            trust_bundle: vec!["root".into()],
            ..Default::default()
        }),
        certs,
        egress: Egress::Allow,
        local: local.clone(),
    };
    let listener = || {
        let l = StdListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        l
    };
    let net = PodNet {
        connect: Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
        listen: Arc::new(|_| Box::pin(TcpListener::bind("127.0.0.1:0"))),
    };
    let mut registry = Registry::default();
    let ip = Ipv4Addr::new(127, 0, 0, 9);
    let proxy = start(
        "shop/api-0",
        ip,
        net,
        PodSockets {
            outbound: listener(),
            inbound: listener(),
            hbone: None,
        },
        Some(mesh),
        Telemetry::new(&mut registry),
        &ProxyConfig::default(),
        &Serving::shared(),
    )
    .expect("start");
    let pod = local.get(ip).expect("registered under its IP");
    assert_eq!(pod.name(), &NamespacedName::new("shop", "api-0"));
    assert_eq!(pod.identity(), None, "not configured yet");
    drop(pod);
    drop(proxy);
    assert!(local.get(ip).is_none(), "gone with its proxy");
    assert!(local.is_empty());
}
