//! Micro-benchmarks of what the proxy does on every connection, run with
//! `cargo bench -p mesh-proxy --bench hot`:
//!
//! - the copy under every proxied connection: [`copy_both`] between two in-memory duplex
//!   pipes, one standing for the application's socket and one for the upstream, so the figure
//!   is the copy loop's own cost (buffer growth, polling, half-close) without the kernel's;
//! - the declared protocol of the port a connection is for (is it L7?), on a configuration of
//!   a large cluster: asked on every inbound connection and every outbound one to a service.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh_core::SpiffeId;
use mesh_core::identity::TrustDomain;
use mesh_core::model::{
    Endpoint, NamespacedName, NodeSnapshot, Protocol, Service, ServicePort, TlsMode, Workload,
};
use mesh_proxy::copy::{MAX_BUF, copy_both};
use mesh_proxy::l7::PortIndex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;

/// Bytes sent each way per connection.
const PAYLOAD: usize = 1 << 20;

/// Capacity of each in-memory pipe: as much as the copy moves per read at most, roughly what
/// a loopback socket buffer holds.
const PIPE: usize = MAX_BUF;

/// One end of a connection: sends `send`, half-closes, and reads until the other side
/// half-closed. Returns the bytes read.
async fn peer(io: DuplexStream, send: &[u8], sink: &mut [u8]) -> io::Result<usize> {
    let (mut r, mut w) = tokio::io::split(io);
    let write = async {
        w.write_all(send).await?;
        w.shutdown().await
    };
    let read = async {
        let mut total = 0;
        loop {
            match r.read(sink).await? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    };
    let (written, read) = tokio::join!(write, read);
    written?;
    read
}

/// One proxied connection: the application sends `up`, the server answers `down`, the copy
/// carries both between them. Returns what the copy counted each way.
async fn connection(up: &[u8], down: &[u8], sinks: &mut [Vec<u8>; 2]) -> (u64, u64) {
    let (app, mut app_side) = tokio::io::duplex(PIPE);
    let (mut upstream_side, server) = tokio::io::duplex(PIPE);
    let [app_sink, server_sink] = sinks;
    let (copied, app_read, server_read) = tokio::join!(
        copy_both(&mut app_side, &mut upstream_side),
        peer(app, up, app_sink),
        peer(server, down, server_sink),
    );
    let copied = copied.expect("copy");
    assert_eq!(app_read.expect("application side"), down.len());
    assert_eq!(server_read.expect("server side"), up.len());
    copied
}

fn bench_copy(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let payload = vec![0x5a_u8; PAYLOAD];
    let mut sinks = [vec![0u8; PIPE], vec![0u8; PIPE]];
    let mut run = |rt: &Runtime, up: &[u8], down: &[u8]| {
        rt.block_on(connection(black_box(up), black_box(down), &mut sinks))
    };
    assert_eq!(run(&rt, &payload, &[]), (PAYLOAD as u64, 0));

    let mut group = c.benchmark_group("copy_both");
    group.throughput(Throughput::Bytes(PAYLOAD as u64));
    group.bench_function("one_way_1MiB", |b| b.iter(|| run(&rt, &payload, &[])));
    group.throughput(Throughput::Bytes(2 * PAYLOAD as u64));
    group.bench_function("both_ways_1MiB", |b| {
        b.iter(|| run(&rt, &payload, &payload))
    });
    group.finish();
}

/// Services in the cluster's configuration (every node gets all of them).
const SERVICES: u32 = 1_000;

/// The pods of this node, each behind one of the services.
const LOCAL_PODS: u32 = 20;

/// A service IP of the cluster.
fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 + i)
}

/// The `n`-th pod IP of service `i` (pods of this node are each service's first endpoint).
fn pod_ip(i: u32, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + (i << 8) + n + 1)
}

/// A node's configuration in a cluster of [`SERVICES`] services of 4 meshed endpoints and two
/// ports each (`http` 80 -> 8080, `tcp` 5432 -> 5432), the first endpoint of the first
/// [`LOCAL_PODS`] services being this node's pods.
fn large_snapshot() -> NodeSnapshot {
    let td = TrustDomain::new("cluster.local").expect("trust domain");
    let id = |i: u32| SpiffeId::workload(&td, "shop", &format!("sa-{i}")).expect("identity");
    let pod = |i: u32| NamespacedName::new("shop", format!("pod-{i}"));
    let services = (0..SERVICES).map(|i| Service {
        name: NamespacedName::new("shop", format!("svc-{i:04}")),
        vip: Some(vip(i)),
        ports: vec![
            ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                protocol: Protocol::Http,
            },
            ServicePort {
                name: "tcp".into(),
                port: 5432,
                target_port: 5432,
                protocol: Protocol::Tcp,
            },
        ],
        endpoints: (0..4)
            .map(|n| Endpoint {
                ip: pod_ip(i, n),
                workload: Some(pod(i)),
                identity: Some(id(i)),
                node: Some(format!("node-{n}")),
                ready: true,
            })
            .collect(),
    });
    let workloads = (0..LOCAL_PODS).map(|i| Workload {
        name: pod(i),
        uid: format!("uid-{i}"),
        service_account: format!("sa-{i}"),
        identity: id(i),
        node: "node-0".into(),
        ips: vec![pod_ip(i, 0)],
        mode: TlsMode::Strict,
        labels: BTreeMap::new(),
        cgroup: None,
        netns: None,
        ports: vec![8080, 5432],
        excluded_inbound_ports: Vec::new(),
    });
    NodeSnapshot {
        node: "node-0".into(),
        workloads: workloads.map(|w| (w.name.clone(), w)).collect(),
        services: Arc::new(services.map(|s| (s.name.clone(), Arc::new(s))).collect()),
        ..NodeSnapshot::default()
    }
}

fn bench_protocol(c: &mut Criterion) {
    let snapshot = large_snapshot();
    let local = NamespacedName::new("shop", "pod-7");
    let last_vip = SocketAddrV4::new(vip(SERVICES - 1), 80);
    let mut group = c.benchmark_group("protocol");
    group.bench_function("index_build", |b| {
        b.iter(|| PortIndex::new(black_box(&snapshot)))
    });
    let index = PortIndex::new(&snapshot);
    assert_eq!(index.pod_port(&local, 8080), Protocol::Http);
    assert_eq!(index.service_port(last_vip), Protocol::Http);
    group.bench_function("inbound_pod_port", |b| {
        b.iter(|| index.pod_port(black_box(&local), black_box(8080)))
    });
    group.bench_function("inbound_undeclared_port", |b| {
        b.iter(|| index.pod_port(black_box(&local), black_box(7000)))
    });
    group.bench_function("outbound_service_port", |b| {
        b.iter(|| index.service_port(black_box(last_vip)))
    });
    group.finish();
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
    targets = bench_copy, bench_protocol
}
criterion_main!(benches);
