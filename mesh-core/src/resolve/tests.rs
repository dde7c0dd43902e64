use std::collections::BTreeMap;

use super::*;
use crate::identity::TrustDomain;
use crate::model::{Endpoint, SplitBackend, TrafficSplit, Workload};
use crate::policy::HttpMatch;

// === fixtures ===

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").expect("valid trust domain")
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(&td(), ns, sa).expect("valid identity")
}

fn client() -> SpiffeId {
    id("shop", "frontend")
}

fn nn(name: &str) -> NamespacedName {
    NamespacedName::new("shop", name)
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("valid IPv4 address")
}

fn addr(s: &str) -> SocketAddrV4 {
    s.parse().expect("valid IPv4 socket address")
}

fn port(name: &str, port: u16, target_port: u16, protocol: Protocol) -> ServicePort {
    ServicePort {
        name: name.to_string(),
        port,
        target_port,
        protocol,
    }
}

/// A ready, meshed endpoint with identity `shop/<sa>` on `node`.
fn meshed(ip_: &str, sa: &str, node: &str) -> Endpoint {
    Endpoint {
        ip: ip(ip_),
        workload: Some(nn(&format!("{sa}-pod"))),
        identity: Some(id("shop", sa)),
        node: Some(node.to_string()),
        ready: true,
    }
}

fn unmeshed(ip_: &str) -> Endpoint {
    Endpoint {
        ip: ip(ip_),
        workload: None,
        identity: None,
        node: None,
        ready: true,
    }
}

fn not_ready(mut ep: Endpoint) -> Endpoint {
    ep.ready = false;
    ep
}

fn service(name: &str, vip: Option<&str>, ports: Vec<ServicePort>, eps: Vec<Endpoint>) -> Service {
    Service {
        name: nn(name),
        vip: vip.map(ip),
        ports,
        endpoints: eps,
    }
}

fn split(name: &str, root: &str, backends: &[(&str, u32)]) -> TrafficSplit {
    TrafficSplit {
        name: nn(name),
        root: nn(root),
        backends: backends
            .iter()
            .map(|(service, weight)| SplitBackend {
                service: nn(service),
                weight: *weight,
            })
            .collect(),
        matches: Vec::new(),
    }
}

fn snapshot(services: Vec<Service>, splits: Vec<TrafficSplit>) -> NodeSnapshot {
    NodeSnapshot {
        node: "n1".to_string(),
        services: Arc::new(
            services
                .into_iter()
                .map(|s| (s.name.clone(), Arc::new(s)))
                .collect(),
        ),
        splits: Arc::new(splits.into_iter().map(|s| (s.name.clone(), s)).collect()),
        ..NodeSnapshot::default()
    }
}

/// `web` on 10.96.0.10: `http` 80 -> 8080 and `grpc-api` 9000 -> 9090, one meshed endpoint.
fn web() -> Service {
    service(
        "web",
        Some("10.96.0.10"),
        vec![
            port("http", 80, 8080, Protocol::Http),
            port("grpc-api", 9000, 9090, Protocol::Grpc),
        ],
        vec![meshed("10.0.0.1", "web", "n1")],
    )
}

/// `web-v2` (no VIP needed to be a backend): `http` on 8000 -> 7070, and 9000 -> 9191 under
/// another name, so the addressed `grpc-api` port maps by number.
fn web_v2() -> Service {
    service(
        "web-v2",
        Some("10.96.0.20"),
        vec![
            port("http", 8000, 7070, Protocol::Http),
            port("other", 9000, 9191, Protocol::Tcp),
        ],
        vec![meshed("10.0.0.2", "web-v2", "n2")],
    )
}

fn resolve(r: &Resolver, dst: &str, pick: &mut impl Picker) -> Result<Resolution, Unresolved> {
    r.resolve(&client(), addr(dst), pick)
}

fn target(r: &Resolver, dst: &str, pick: &mut impl Picker) -> Target {
    resolve(r, dst, pick).expect("destination resolves").target
}

// === services ===

#[test]
fn vip_resolves_to_a_ready_endpoint_on_the_target_port() {
    let r = Resolver::new(&snapshot(vec![web()], vec![]));
    let res = resolve(&r, "10.96.0.10:80", &mut FastPicker::with_seed(1)).expect("resolves");
    assert_eq!(
        res.target,
        Target::Mesh {
            addr: addr("10.0.0.1:8080"),
            identity: id("shop", "web"),
            node: Some("n1".to_string()),
            service: Some(nn("web")),
            backend: Some(nn("web")),
            protocol: Protocol::Http,
        }
    );
    assert_eq!(res.target.addr(), addr("10.0.0.1:8080"));
    assert_eq!(res.target.kind(), "mesh");
    let lease = res.lease.expect("a service endpoint is leased");
    assert_eq!(lease.addr(), addr("10.0.0.1:8080"));
    assert_eq!(r.load_balancer().outstanding(addr("10.0.0.1:8080")), 1);

    let grpc = target(&r, "10.96.0.10:9000", &mut FastPicker::with_seed(1));
    assert_eq!(grpc.addr(), addr("10.0.0.1:9090"));
    assert!(matches!(
        grpc,
        Target::Mesh {
            protocol: Protocol::Grpc,
            ..
        }
    ));
}

#[test]
fn split_backend_port_maps_by_name_then_by_number() {
    let snap = snapshot(
        vec![web(), web_v2()],
        vec![split("canary", "web", &[("web-v2", 1)])],
    );
    let r = Resolver::new(&snap);
    let mut pick = FastPicker::with_seed(7);

    // `http` is port 8000 on web-v2, not 80: the name decides, and its target port is used.
    let http = target(&r, "10.96.0.10:80", &mut pick);
    assert_eq!(
        http,
        Target::Mesh {
            addr: addr("10.0.0.2:7070"),
            identity: id("shop", "web-v2"),
            node: Some("n2".to_string()),
            service: Some(nn("web")),
            backend: Some(nn("web-v2")),
            // The protocol of the port the application addressed.
            protocol: Protocol::Http,
        }
    );
    // `grpc-api` has no namesake on web-v2; port 9000 there is named `other`.
    let grpc = target(&r, "10.96.0.10:9000", &mut pick);
    assert_eq!(grpc.addr(), addr("10.0.0.2:9191"));
    assert!(matches!(
        grpc,
        Target::Mesh {
            protocol: Protocol::Grpc,
            ..
        }
    ));
}

#[test]
fn unknown_port_on_a_vip_is_refused_with_the_ports_it_has() {
    let r = Resolver::new(&snapshot(vec![web()], vec![]));
    let err = resolve(&r, "10.96.0.10:81", &mut FastPicker::with_seed(1))
        .expect_err("port 81 is not a port of web");
    assert_eq!(
        err,
        Unresolved::NoSuchPort {
            service: nn("web"),
            vip: ip("10.96.0.10"),
            port: 81,
            ports: vec![80, 9000],
        }
    );
    assert_eq!(err.kind(), "no_such_port");
    assert_eq!(
        err.to_string(),
        "service shop/web (10.96.0.10) has no port 81; its ports are 80, 9000"
    );
}

#[test]
fn split_backend_without_the_port_is_refused() {
    let narrow = service(
        "narrow",
        None,
        vec![port("tcp", 5432, 5432, Protocol::Tcp)],
        vec![meshed("10.0.0.3", "narrow", "n1")],
    );
    let snap = snapshot(
        vec![web(), narrow],
        vec![split("s", "web", &[("narrow", 1)])],
    );
    let r = Resolver::new(&snap);
    let err = resolve(&r, "10.96.0.10:80", &mut FastPicker::with_seed(1))
        .expect_err("narrow has no http port and no port 80");
    assert_eq!(err.kind(), "no_backend_port");
    assert_eq!(
        err.to_string(),
        "TrafficSplit shop/s sends traffic for its root's port 80 (\"http\") to service \
         shop/narrow, which has no port of that name or number"
    );
}

#[test]
fn split_to_a_missing_service_is_refused() {
    let snap = snapshot(vec![web()], vec![split("s", "web", &[("gone", 1)])]);
    let r = Resolver::new(&snap);
    let err = resolve(&r, "10.96.0.10:80", &mut FastPicker::with_seed(1))
        .expect_err("the backend does not exist");
    assert_eq!(
        err,
        Unresolved::NoSuchBackend {
            split: nn("s"),
            backend: nn("gone"),
        }
    );
    assert_eq!(err.kind(), "no_such_backend");
}

#[test]
fn service_without_ready_endpoints_has_nowhere_to_go() {
    let empty = service(
        "empty",
        Some("10.96.0.30"),
        vec![port("http", 80, 8080, Protocol::Http)],
        vec![],
    );
    let draining = service(
        "draining",
        Some("10.96.0.31"),
        vec![port("http", 80, 8080, Protocol::Http)],
        vec![not_ready(meshed("10.0.0.5", "draining", "n1"))],
    );
    let r = Resolver::new(&snapshot(vec![empty, draining], vec![]));
    for (dst, name) in [("10.96.0.30:80", "empty"), ("10.96.0.31:80", "draining")] {
        let err = resolve(&r, dst, &mut FastPicker::with_seed(1)).expect_err("no ready endpoint");
        assert_eq!(
            err,
            Unresolved::NoEndpoints {
                service: nn(name),
                port: 8080,
            }
        );
        assert_eq!(err.kind(), "no_endpoints");
        assert_eq!(
            err.to_string(),
            format!("service shop/{name} has no ready endpoint for port 8080")
        );
    }
}

#[test]
fn not_ready_endpoints_are_skipped() {
    let svc = service(
        "web",
        Some("10.96.0.10"),
        vec![port("http", 80, 8080, Protocol::Http)],
        vec![
            not_ready(meshed("10.0.0.1", "web", "n1")),
            meshed("10.0.0.2", "web", "n1"),
            not_ready(meshed("10.0.0.3", "web", "n1")),
            meshed("10.0.0.4", "web", "n2"),
        ],
    );
    let r = Resolver::new(&snapshot(vec![svc], vec![]));
    let mut pick = FastPicker::with_seed(3);
    let mut seen = BTreeMap::new();
    for _ in 0..1000 {
        let t = target(&r, "10.96.0.10:80", &mut pick);
        *seen.entry(t.addr()).or_insert(0u32) += 1;
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        vec![addr("10.0.0.2:8080"), addr("10.0.0.4:8080")],
        "only ready endpoints are chosen, and both of them are"
    );
}

#[test]
fn endpoints_without_identity_resolve_to_plain() {
    let legacy = service(
        "legacy",
        Some("10.96.0.40"),
        vec![port("http", 80, 8080, Protocol::Http)],
        vec![unmeshed("10.0.0.9")],
    );
    let r = Resolver::new(&snapshot(vec![legacy], vec![]));
    let res = resolve(&r, "10.96.0.40:80", &mut FastPicker::with_seed(1)).expect("resolves");
    assert_eq!(
        res.target,
        Target::Plain {
            addr: addr("10.0.0.9:8080"),
            service: Some(nn("legacy")),
        }
    );
    assert_eq!(res.target.kind(), "plain");
    assert!(res.lease.is_some(), "plain endpoints are load balanced too");
}

// === pods and passthrough ===

#[test]
fn meshed_pod_ip_goes_to_that_pod_on_the_same_port() {
    let mut snap = snapshot(vec![web()], vec![]);
    snap.workloads.insert(
        nn("local-pod"),
        Workload {
            name: nn("local-pod"),
            uid: "uid-1".to_string(),
            service_account: "local".to_string(),
            identity: id("shop", "local"),
            node: "n1".to_string(),
            ips: vec![ip("10.0.1.7")],
            mode: Default::default(),
            labels: BTreeMap::new(),
            cgroup: None,
            netns: None,
            ports: vec![],
            excluded_inbound_ports: vec![],
        },
    );
    let r = Resolver::new(&snap);
    let mut pick = ScriptedPicker::new([]);

    // An endpoint of web, on its target port: the protocol of the service port applies.
    let res = resolve(&r, "10.0.0.1:8080", &mut pick).expect("resolves");
    assert_eq!(
        res.target,
        Target::Mesh {
            addr: addr("10.0.0.1:8080"),
            identity: id("shop", "web"),
            node: Some("n1".to_string()),
            service: None,
            backend: None,
            protocol: Protocol::Http,
        }
    );
    assert!(res.lease.is_some());
    // Another port on the same pod: TCP.
    let other = target(&r, "10.0.0.1:1234", &mut pick);
    assert!(matches!(
        other,
        Target::Mesh {
            protocol: Protocol::Tcp,
            ..
        }
    ));
    assert_eq!(other.addr(), addr("10.0.0.1:1234"));
    // A workload of the node that backs no service.
    let local = target(&r, "10.0.1.7:5000", &mut pick);
    assert_eq!(
        local,
        Target::Mesh {
            addr: addr("10.0.1.7:5000"),
            identity: id("shop", "local"),
            node: Some("n1".to_string()),
            service: None,
            backend: None,
            protocol: Protocol::Tcp,
        }
    );
    assert_eq!(
        pick.draws(),
        0,
        "a pod addressed directly needs no random choice"
    );
}

#[test]
fn destinations_outside_the_mesh_pass_through() {
    let legacy = service(
        "legacy",
        None,
        vec![port("http", 80, 8080, Protocol::Http)],
        vec![unmeshed("10.0.0.9")],
    );
    let r = Resolver::new(&snapshot(vec![web(), legacy], vec![]));
    for dst in ["93.184.216.34:443", "10.0.0.9:8080", "10.96.0.99:80"] {
        let res = resolve(&r, dst, &mut FastPicker::with_seed(1)).expect("passthrough resolves");
        assert_eq!(res.target, Target::Passthrough { addr: addr(dst) }, "{dst}");
        assert_eq!(res.target.kind(), "passthrough");
        assert!(res.lease.is_none());
    }
}

// === splits ===

#[test]
fn split_90_10_over_10000_connections() {
    let snap = snapshot(
        vec![web(), web_v2()],
        vec![split("canary", "web", &[("web", 90), ("web-v2", 10)])],
    );
    let r = Resolver::new(&snap);
    let mut pick = FastPicker::with_seed(0x5eed);
    let mut v1 = 0u32;
    let mut v2 = 0u32;
    for _ in 0..10_000 {
        match target(&r, "10.96.0.10:80", &mut pick) {
            Target::Mesh {
                backend: Some(b), ..
            } if b == nn("web") => v1 += 1,
            Target::Mesh {
                backend: Some(b), ..
            } if b == nn("web-v2") => v2 += 1,
            other => panic!("unexpected target {other:?}"),
        }
    }
    assert_eq!(v1 + v2, 10_000);
    // Binomial(10000, 0.1) has a standard deviation of 30: 3% is ten of them.
    assert!((700..=1300).contains(&v2), "web-v2 got {v2} of 10000");
}

#[test]
fn split_backend_equal_to_root_uses_the_roots_own_endpoints() {
    let snap = snapshot(
        vec![web(), web_v2()],
        vec![split("canary", "web", &[("web", 50), ("web-v2", 50)])],
    );
    let r = Resolver::new(&snap);
    // The draw over a total weight of 100: below 50 is web, from 50 on web-v2. Each backend
    // has one endpoint, so the load balancer draws nothing.
    let mut pick = ScriptedPicker::new([49, 50]);
    let first = target(&r, "10.96.0.10:80", &mut pick);
    assert_eq!(first.addr(), addr("10.0.0.1:8080"));
    assert!(matches!(first, Target::Mesh { backend: Some(ref b), .. } if *b == nn("web")));
    let second = target(&r, "10.96.0.10:80", &mut pick);
    assert_eq!(second.addr(), addr("10.0.0.2:7070"));
    assert_eq!(pick.draws(), 2);
}

#[test]
fn zero_weight_backends_never_receive_traffic() {
    let snap = snapshot(
        vec![web(), web_v2()],
        vec![split("canary", "web", &[("web-v2", 0), ("web", 1)])],
    );
    let r = Resolver::new(&snap);
    let mut pick = FastPicker::with_seed(11);
    for _ in 0..200 {
        assert_eq!(
            target(&r, "10.96.0.10:80", &mut pick).addr(),
            addr("10.0.0.1:8080")
        );
    }
}

#[test]
fn split_with_http_matches_is_not_applied_at_l4() {
    // Matches restrict a split to some HTTP requests; the L7 proxy applies them per request.
    // A connection is not a request, so it goes to the root's own endpoints.
    let mut only_api = split("api-canary", "web", &[("web-v2", 1)]);
    only_api.matches = vec![HttpMatch {
        name: "api".to_string(),
        path: None,
        methods: vec!["GET".to_string()],
        headers: Vec::new(),
    }];
    let r = Resolver::new(&snapshot(vec![web(), web_v2()], vec![only_api]));
    let mut pick = FastPicker::with_seed(5);
    for _ in 0..100 {
        let t = target(&r, "10.96.0.10:80", &mut pick);
        assert_eq!(t.addr(), addr("10.0.0.1:8080"));
        assert!(matches!(t, Target::Mesh { backend: Some(ref b), .. } if *b == nn("web")));
    }
}

#[test]
fn first_split_by_name_wins_when_several_share_a_root() {
    let snap = snapshot(
        vec![web(), web_v2()],
        vec![
            split("b-to-web", "web", &[("web", 1)]),
            split("a-to-v2", "web", &[("web-v2", 1)]),
        ],
    );
    let r = Resolver::new(&snap);
    let t = target(&r, "10.96.0.10:80", &mut FastPicker::with_seed(1));
    assert_eq!(t.addr(), addr("10.0.0.2:7070"));
}

// === load balancing ===

fn three_endpoints() -> Resolver {
    let svc = service(
        "web",
        Some("10.96.0.10"),
        vec![port("http", 80, 8080, Protocol::Http)],
        vec![
            meshed("10.0.0.1", "web", "n1"),
            meshed("10.0.0.2", "web", "n1"),
            meshed("10.0.0.3", "web", "n2"),
        ],
    );
    Resolver::new(&snapshot(vec![svc], vec![]))
}

#[test]
fn p2c_prefers_the_less_loaded_of_two_and_leases_decrement_on_drop() {
    let r = three_endpoints();
    let lb = Arc::clone(r.load_balancer());
    let a = addr("10.0.0.1:8080");
    let b = addr("10.0.0.2:8080");
    let busy: Vec<Lease> = (0..3).map(|_| lb.acquire(a)).collect();
    assert_eq!(lb.outstanding(a), 3);

    // Draws 0 then 0: candidates 0 and (0 skipped) 1, i.e. a and b. b is idle.
    let mut pick = ScriptedPicker::new([0, 0]);
    let first = resolve(&r, "10.96.0.10:80", &mut pick).expect("resolves");
    assert_eq!(first.target.addr(), b);
    assert_eq!(lb.outstanding(b), 1);
    assert_eq!(pick.draws(), 2, "two distinct candidates are drawn");

    // Draws 1 then 0: b (1 outstanding) first, a (3) second: still b.
    let mut pick = ScriptedPicker::new([1, 0]);
    let second = resolve(&r, "10.96.0.10:80", &mut pick).expect("resolves");
    assert_eq!(second.target.addr(), b);
    assert_eq!(lb.outstanding(b), 2);

    // Once a's connections close, it is the lighter one.
    drop(busy);
    assert_eq!(lb.outstanding(a), 0);
    let mut pick = ScriptedPicker::new([1, 0]);
    let third = resolve(&r, "10.96.0.10:80", &mut pick).expect("resolves");
    assert_eq!(third.target.addr(), a);

    drop(first);
    drop(second);
    drop(third);
    assert_eq!(lb.outstanding(a), 0);
    assert_eq!(lb.outstanding(b), 0);
}

#[test]
fn p2c_takes_the_first_drawn_on_a_tie() {
    let r = three_endpoints();
    let mut pick = ScriptedPicker::new([2, 0]);
    let t = target(&r, "10.96.0.10:80", &mut pick);
    assert_eq!(t.addr(), addr("10.0.0.3:8080"));
}

#[test]
fn p2c_spreads_concurrent_connections_evenly() {
    let r = three_endpoints();
    let mut pick = FastPicker::with_seed(99);
    let held: Vec<Resolution> = (0..300)
        .map(|_| resolve(&r, "10.96.0.10:80", &mut pick).expect("resolves"))
        .collect();
    let lb = r.load_balancer();
    for ip_ in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        let n = lb.outstanding(SocketAddrV4::new(ip(ip_), 8080));
        // Random choice would be off by ~8 either way; two choices keep it within a few.
        assert!((95..=105).contains(&n), "{ip_} has {n} of 300 outstanding");
    }
    drop(held);
}

#[test]
fn load_balancer_outlives_snapshots_and_prunes_unused_counters() {
    let first = three_endpoints();
    let held =
        resolve(&first, "10.96.0.10:80", &mut ScriptedPicker::new([0, 0])).expect("resolves");
    let idle =
        resolve(&first, "10.96.0.10:80", &mut ScriptedPicker::new([2, 1])).expect("resolves");
    let lb = Arc::clone(first.load_balancer());
    assert_eq!(lb.len(), 2);
    drop(idle);

    let next = Resolver::with_load_balancer(
        &snapshot(vec![web()], vec![]),
        Arc::clone(first.load_balancer()),
    );
    assert!(Arc::ptr_eq(next.load_balancer(), &lb));
    assert_eq!(lb.len(), 1, "only the counter with a live lease is kept");
    assert_eq!(lb.outstanding(held.target.addr()), 1);
    drop(held);
    lb.prune();
    assert!(lb.is_empty());
}

// === pickers ===

#[test]
fn fast_picker_stays_in_range_and_covers_it() {
    let mut pick = FastPicker::new();
    let mut seen = [0u32; 7];
    for _ in 0..7000 {
        let v = pick.below(7);
        seen[v as usize] += 1;
    }
    assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    assert_eq!(pick.below(1), 0);
    assert_eq!(pick.below(0), 0);

    let a: Vec<u32> = {
        let mut p = FastPicker::with_seed(42);
        (0..8).map(|_| p.below(1000)).collect()
    };
    let b: Vec<u32> = {
        let mut p = FastPicker::with_seed(42);
        (0..8).map(|_| p.below(1000)).collect()
    };
    assert_eq!(a, b, "a seed fixes the sequence");
}

#[test]
fn scripted_picker_replays_its_values_modulo_n() {
    let mut pick = ScriptedPicker::new([3, 10]);
    assert_eq!(pick.below(5), 3);
    assert_eq!(pick.below(4), 2);
    assert_eq!(pick.below(2), 1);
    assert_eq!(pick.draws(), 3);
    assert_eq!(ScriptedPicker::new([]).below(9), 0);
}

#[test]
fn split_weights_past_u32_max_still_pick_by_weight() {
    let snap = snapshot(
        vec![web(), web_v2()],
        vec![split(
            "big",
            "web",
            &[("web", u32::MAX), ("web-v2", u32::MAX)],
        )],
    );
    let r = Resolver::new(&snap);
    let mut pick = FastPicker::with_seed(8);
    let v2 = (0..2000)
        .filter(|_| target(&r, "10.96.0.10:80", &mut pick).addr() == addr("10.0.0.2:7070"))
        .count();
    assert!((800..=1200).contains(&v2), "web-v2 got {v2} of 2000");
}

#[test]
fn resolver_and_leases_can_be_shared_across_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Resolver>();
    assert_send_sync::<LoadBalancer>();
    assert_send_sync::<Lease>();
    assert_send_sync::<Resolution>();
}

mod routes;
