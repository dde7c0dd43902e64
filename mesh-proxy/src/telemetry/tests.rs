use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex as StdMutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};

use super::testing::{encode, sample};
use super::*;
use crate::identity::testing::id;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn telemetry() -> (Registry, Telemetry) {
    let mut registry = Registry::default();
    let telemetry = Telemetry::new(&mut registry);
    (registry, telemetry)
}

/// web (a Deployment's pod) calling the api service, reported by web's proxy.
fn call() -> ConnMeta {
    let mut m = ConnMeta::new(
        NamespacedName::new("shop", "web-7d4b9c8f6d-x2k9p"),
        Reporter::Source,
        MeshPath::Hbone,
        "10.0.0.2:8080".parse().expect("addr"),
    );
    m.src = Peer::of_pod(&m.pod);
    m.src.identity = Some(id(WEB));
    m.dst = Peer {
        workload: Some("api".into()),
        ..Peer::of_identity(&id(API))
    };
    m.src_addr = Some("10.0.0.1:40000".parse().expect("addr"));
    m.service = Some(service_host(&NamespacedName::new("shop", "api")));
    m
}

/// Everything `mesh::access` events carry, field by field.
#[derive(Clone, Default)]
struct AccessLog(Arc<StdMutex<Vec<BTreeMap<String, String>>>>);

impl AccessLog {
    fn lines(&self) -> Vec<BTreeMap<String, String>> {
        self.0.lock().expect("log").clone()
    }
}

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AccessLog {
    fn on_event(&self, event: &tracing::Event<'_>, _: LayerContext<'_, S>) {
        if event.metadata().target() != ACCESS_LOG {
            return;
        }
        let mut fields = Fields(BTreeMap::new());
        event.record(&mut fields);
        self.0.lock().expect("log").push(fields.0);
    }
}

/// Runs `f` with the access log captured.
fn logged(f: impl FnOnce()) -> Vec<BTreeMap<String, String>> {
    let log = AccessLog::default();
    // With one registered dispatcher tracing decides whether a callsite is enabled with the
    // dispatcher of the thread that reaches it first (another test's, without one); with two
    // it asks every live dispatcher.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let capture = tracing::Dispatch::new(tracing_subscriber::registry().with(log.clone()));
    tracing::dispatcher::with_default(&capture, f);
    log.lines()
}

#[test]
fn a_connection_counts_opened_then_closed_and_leaves_the_table() {
    let (registry, telemetry) = telemetry();
    let guard = telemetry.open(call());
    let text = encode(&registry);
    assert_eq!(sample(&text, "istio_tcp_connections_opened_total", &[]), 1);
    assert_eq!(sample(&text, "istio_tcp_connections_closed_total", &[]), 0);
    let conns = telemetry.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].id, guard.id());
    assert_eq!(conns[0].pod, "shop/web-7d4b9c8f6d-x2k9p");
    assert_eq!(conns[0].direction, "outbound");
    assert_eq!(conns[0].dst_addr, "10.0.0.2:8080");
    assert_eq!(telemetry.live(), 1);

    drop(guard);
    let text = encode(&registry);
    let ok = [("response_flags", "-")];
    assert_eq!(sample(&text, "istio_tcp_connections_closed_total", &ok), 1);
    assert!(telemetry.connections().is_empty());
    assert_eq!(telemetry.live(), 0);
}

#[test]
fn the_text_output_uses_istios_names_and_labels() {
    let (registry, telemetry) = telemetry();
    drop(telemetry.open(call()));
    telemetry.denied(call(), "no_traffic_target", "no TrafficTarget for web");
    let text = encode(&registry);

    let names: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('{').map(|(name, _)| name))
        .collect();
    let want: BTreeSet<&str> = [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "mesh_tcp_connections_denied_total",
    ]
    .into();
    assert_eq!(names, want, "{text}");
    for family in [
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_sent_bytes",
        "istio_tcp_received_bytes",
        "mesh_tcp_connections_denied",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} counter")),
            "{family}: {text}"
        );
    }
    let opened = "istio_tcp_connections_opened_total{reporter=\"source\",\
        source_workload=\"web\",source_workload_namespace=\"shop\",\
        source_principal=\"spiffe://cluster.local/ns/shop/sa/web\",\
        destination_service=\"api.shop.svc.cluster.local\",destination_workload=\"api\",\
        destination_workload_namespace=\"shop\",\
        destination_principal=\"spiffe://cluster.local/ns/shop/sa/api\",response_flags=\"-\",\
        connection_security_policy=\"mutual_tls\",mesh_path=\"hbone\"} 2";
    assert!(text.lines().any(|l| l == opened), "{text}");
    let denied = "mesh_tcp_connections_denied_total{reporter=\"source\",\
        source_principal=\"spiffe://cluster.local/ns/shop/sa/web\",destination_workload=\"api\",\
        destination_workload_namespace=\"shop\",reason=\"no_traffic_target\"} 1";
    assert!(text.lines().any(|l| l == denied), "{text}");
    let closed = [("response_flags", "DENY")];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &closed),
        1
    );
}

#[test]
fn what_is_not_known_is_unknown() {
    let (registry, telemetry) = telemetry();
    let meta = ConnMeta::new(
        NamespacedName::new("shop", "web-0"),
        Reporter::Destination,
        MeshPath::Plaintext,
        "10.0.0.2:8080".parse().expect("addr"),
    );
    drop(telemetry.open(meta));
    let text = encode(&registry);
    let labels = [
        ("source_workload", "unknown"),
        ("source_principal", "unknown"),
        ("destination_service", "unknown"),
        ("destination_principal", "unknown"),
        ("connection_security_policy", "none"),
        ("mesh_path", "plaintext"),
        ("reporter", "destination"),
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &labels),
        1,
        "{text}"
    );
}

#[test]
fn bytes_count_as_they_flow_through_the_metered_stream() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (registry, telemetry) = telemetry();
    rt.block_on(async {
        // The proxy's end of the application's socket, and the application's end.
        let (proxy_end, mut app) = tokio::io::duplex(64 * 1024);
        let mut metered = Metered::new(proxy_end, telemetry.open(call()), Side::Source);

        app.write_all(&[1u8; 3000]).await.expect("app writes");
        let mut buf = [0u8; 3000];
        metered.read_exact(&mut buf).await.expect("proxy reads");
        metered.write_all(&[2u8; 500]).await.expect("proxy writes");

        // Mid-connection: the table and the counters already show it.
        let c = &telemetry.connections()[0];
        assert_eq!((c.bytes_to_dst, c.bytes_to_src), (3000, 500));
        assert_eq!(metered.guard().bytes(), (3000, 500));
        let text = encode(&registry);
        assert_eq!(sample(&text, "istio_tcp_received_bytes_total", &[]), 3000);
        assert_eq!(sample(&text, "istio_tcp_sent_bytes_total", &[]), 500);

        // Facing the destination, reads are responses.
        let (proxy_end, mut app) = tokio::io::duplex(1024);
        let mut metered = Metered::new(proxy_end, telemetry.open(call()), Side::Destination);
        app.write_all(b"response").await.expect("app writes");
        let mut buf = [0u8; 8];
        metered.read_exact(&mut buf).await.expect("proxy reads");
        assert_eq!(metered.guard().bytes(), (0, 8));
    });
    let text = encode(&registry);
    assert_eq!(sample(&text, "istio_tcp_sent_bytes_total", &[]), 508);
}

#[test]
fn each_connection_writes_one_access_log_line() {
    let (_registry, telemetry) = telemetry();
    let lines = logged(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (proxy_end, mut app) = tokio::io::duplex(1024);
            let mut metered = Metered::new(proxy_end, telemetry.open(call()), Side::Source);
            app.write_all(b"hello").await.expect("write");
            let mut buf = [0u8; 5];
            metered.read_exact(&mut buf).await.expect("read");
            metered.write_all(b"hi").await.expect("write");
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        telemetry.denied(call(), "port_not_covered", "port 8080 is not covered");
    });
    assert_eq!(lines.len(), 2, "one line per connection: {lines:?}");
    let allowed = &lines[0];
    let field = |line: &BTreeMap<String, String>, k: &str| line.get(k).cloned().unwrap_or_default();
    for (k, v) in [
        ("pod", "shop/web-7d4b9c8f6d-x2k9p"),
        ("direction", "outbound"),
        ("path", "hbone"),
        ("src.addr", "10.0.0.1:40000"),
        ("src.workload", "web"),
        ("src.identity", WEB),
        ("dst.addr", "10.0.0.2:8080"),
        ("dst.identity", API),
        ("dst.service", "api.shop.svc.cluster.local"),
        ("bytes.to_dst", "5"),
        ("bytes.to_src", "2"),
        ("verdict", "allowed"),
        ("flags", "-"),
        ("reason", "-"),
    ] {
        assert_eq!(field(allowed, k), v, "{k} in {allowed:?}");
    }
    let ms: u64 = field(allowed, "duration_ms").parse().expect("duration_ms");
    assert!(ms >= 20, "{ms} ms");

    let denied = &lines[1];
    assert_eq!(field(denied, "verdict"), "denied");
    assert_eq!(field(denied, "reason"), "port_not_covered");
    assert_eq!(field(denied, "flags"), "DENY");
    assert_eq!(field(denied, "detail"), "port 8080 is not covered");
    assert_ne!(field(denied, "conn.id"), field(allowed, "conn.id"));
}

#[test]
fn failures_keep_their_first_outcome() {
    let (registry, telemetry) = telemetry();
    let mut guard = telemetry.open(call());
    guard.fail(ResponseFlag::ConnectFailed, "tunnel", "refused");
    guard.fail(ResponseFlag::Io, "copy", "reset");
    drop(guard);
    telemetry.failed(
        call(),
        ResponseFlag::NoRoute,
        "no_endpoints",
        "no endpoints",
    );
    let text = encode(&registry);
    let closed = |flag| {
        sample(
            &text,
            "istio_tcp_connections_closed_total",
            &[("response_flags", flag)],
        )
    };
    assert_eq!((closed("CONNECT"), closed("IO"), closed("NR")), (1, 0, 1));
    assert_eq!(sample(&text, "mesh_tcp_connections_denied_total", &[]), 0);
}

#[tokio::test]
async fn the_watchdog_fires_after_the_idle_time_and_not_while_bytes_flow() {
    let (_registry, telemetry) = telemetry();
    let (proxy_end, mut app) = tokio::io::duplex(1024);
    let mut metered = Metered::new(proxy_end, telemetry.open(call()), Side::Source);
    let idle = Duration::from_millis(150);
    let watchdog = tokio::spawn({
        let activity = metered.guard().activity();
        async move { activity.watchdog(idle).await }
    });
    let mut buf = [0u8; 1];
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        app.write_all(b"x").await.expect("write");
        metered.read_exact(&mut buf).await.expect("read");
    }
    assert!(!watchdog.is_finished(), "bytes every 50 ms keep it open");
    let quiet = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), watchdog)
        .await
        .expect("fires")
        .expect("task");
    assert_eq!(ended, Ended::Idle(idle));
    assert!(
        quiet.elapsed() >= Duration::from_millis(100),
        "{:?}",
        quiet.elapsed()
    );
}

#[tokio::test]
async fn cutting_ends_the_watchdogs_and_closes_with_drain() {
    let (registry, telemetry) = telemetry();
    let guard = telemetry.open(call());
    let watchdog = tokio::spawn({
        let activity = guard.activity();
        async move { activity.watchdog(Duration::from_secs(3600)).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(telemetry.cut_all(), 1);
    let ended = tokio::time::timeout(Duration::from_secs(5), watchdog)
        .await
        .expect("ends at once")
        .expect("task");
    assert_eq!(ended, Ended::Cut);
    drop(guard);
    let text = encode(&registry);
    let drained = [("response_flags", "DRAIN")];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &drained),
        1
    );
}

#[tokio::test]
async fn idle_waits_for_open_and_pending_connections() {
    let (_registry, telemetry) = telemetry();
    tokio::time::timeout(Duration::from_secs(1), telemetry.idle())
        .await
        .expect("nothing open: idle at once");
    let pending = telemetry.pending();
    let guard = telemetry.open(call());
    let waiter = tokio::spawn({
        let telemetry = telemetry.clone();
        async move { telemetry.idle().await }
    });
    drop(pending);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "a connection is still open");
    drop(guard);
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("idle once it closed")
        .expect("task");
}

#[test]
fn owner_names_drop_generated_suffixes_only() {
    for (pod, owner) in [
        ("web-7d4b9c8f6d-x2k9p", "web"),
        ("my-api-5c9f8b7d6-bx7kq", "my-api"),
        ("fluentd-8z2qx", "fluentd"),
        ("web-0", "web-0"),
        ("client", "client"),
        ("my-app", "my-app"),
        ("api-proxy", "api-proxy"),
        ("-x2k9p", "-x2k9p"),
    ] {
        assert_eq!(owner_name(pod), owner, "{pod}");
    }
}

#[tokio::test]
async fn revoking_cuts_only_admitted_connections_and_counts_each_once() {
    let (registry, telemetry) = telemetry();
    let mut inbound = call();
    inbound.reporter = Reporter::Destination;
    inbound.admission = Some(Admission {
        caller: Some(id(WEB)),
        requests_checked: false,
        node_probe: false,
    });
    let mut revoked = telemetry.open(inbound.clone());
    let gone_caller = inbound.src_addr;
    inbound.src_addr = Some("10.0.0.9:40000".parse().expect("addr"));
    let kept = telemetry.open(inbound);
    // An outbound connection records no admission: nothing to decide on.
    let outbound = telemetry.open(call());
    let cut = tokio::spawn({
        let activity = revoked.activity();
        async move { activity.cut().await }
    });
    let revoked_id = revoked.id();
    let mut asked = Vec::new();
    let n = telemetry.revoke_where(|meta, admission| {
        assert_eq!(admission.caller, Some(id(WEB)));
        asked.push(meta.reporter.as_str());
        (meta.src_addr == gone_caller).then(|| "no longer allowed".to_string())
    });
    assert_eq!(n, 1);
    assert_eq!(asked, ["destination", "destination"]);
    let mut again = 0;
    telemetry.revoke_where(|_, _| {
        again += 1;
        None
    });
    assert_eq!(again, 1, "a connection cut already is not decided again");
    let ended = tokio::time::timeout(Duration::from_secs(5), cut)
        .await
        .expect("ends at once")
        .expect("task");
    assert_eq!(ended, Ended::Revoked);
    assert_eq!(revoked.activity().revoked(), Some("no longer allowed"));
    assert_eq!(kept.activity().revoked(), None);
    // What the loop records on its way out (a copy error caused by the cut) gives way to the
    // revocation; recorded twice, it still counts once.
    revoked.fail(ResponseFlag::Io, "copy", "reset");
    revoked.record_cut();
    drop(revoked);
    drop((kept, outbound));
    let text = encode(&registry);
    let denied = [("reporter", "destination"), ("reason", "policy_revoked")];
    assert_eq!(
        sample(&text, "mesh_tcp_connections_denied_total", &denied),
        1,
        "{text}"
    );
    let closed = [("reporter", "destination"), ("response_flags", "DENY")];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &closed),
        1,
        "{text}"
    );
    let events = telemetry.recent(0);
    let event = events
        .iter()
        .find(|e| e.id == revoked_id)
        .expect("the revoked connection's record");
    assert_eq!(
        (event.reason, event.flags, event.verdict),
        (Some(POLICY_REVOKED), "DENY", "denied")
    );
    assert_eq!(event.detail.as_deref(), Some("no longer allowed"));
}
