use http::{Method, Request, StatusCode};
use mesh_core::http_path::{EscapedSlashes, PathNormalization};

use super::*;

fn parts(method: Method, uri: &str) -> http::request::Parts {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .expect("request")
        .into_parts()
        .0
}

fn normalized(method: Method, uri: &str) -> Result<String, BadPath> {
    let mut p = parts(method, uri);
    normalize_path(&mut p, &PathNormalization::default())?;
    Ok(p.uri.to_string())
}

#[test]
fn the_request_leaves_with_the_normalized_path_and_its_query_untouched() {
    assert_eq!(
        normalized(Method::GET, "/public/%2e%2e/admin/?next=/../%2e&x").expect("normal"),
        "/admin/?next=/../%2e&x"
    );
    // Absolute-form (a forward proxy's request, and how HTTP/2 requests arrive): the scheme
    // and authority stay.
    assert_eq!(
        normalized(Method::GET, "http://web.demo:80/a/./b//c").expect("normal"),
        "http://web.demo:80/a/b/c"
    );
    // gRPC's `:path` is a path like any other.
    assert_eq!(
        normalized(Method::POST, "/mesh.demo.v1.Echo/Say").expect("normal"),
        "/mesh.demo.v1.Echo/Say"
    );
}

#[test]
fn asterisk_and_authority_forms_are_taken_where_they_belong_only() {
    assert_eq!(normalized(Method::OPTIONS, "*").expect("OPTIONS *"), "*");
    let e = normalized(Method::GET, "*").expect_err("GET *");
    assert_eq!(e.kind(), "path_asterisk");
    assert!(e.to_string().contains("GET"), "{e}");
    assert_eq!(
        normalized(Method::CONNECT, "10.0.0.1:443").expect("CONNECT"),
        "10.0.0.1:443"
    );
}

#[test]
fn a_path_that_cannot_be_normalized_safely_is_refused_and_left_as_it_was() {
    let mut p = parts(Method::GET, "/public/..%2fadmin/");
    let e = normalize_path(&mut p, &PathNormalization::default()).expect_err("escaped slash");
    assert_eq!(e.kind(), "path_escaped_slash");
    assert_eq!(
        p.uri, "/public/..%2fadmin/",
        "the record shows what was sent"
    );
    // Unescaped on request, it is a separator like any other.
    let unescape = PathNormalization {
        escaped_slashes: EscapedSlashes::Unescape,
        ..PathNormalization::default()
    };
    normalize_path(&mut p, &unescape).expect("unescaped");
    assert_eq!(p.uri, "/admin/");
}

#[test]
fn refusals_are_plain_unless_the_reason_is_exposed() {
    let detail = "no HTTP match for GET /admin from spiffe://cluster.local/ns/demo/sa/client";
    let plain = refusal(false, StatusCode::FORBIDDEN, 7, detail, false);
    assert_eq!(plain.status(), StatusCode::FORBIDDEN);
    assert_eq!(plain.headers()["x-mesh-proxy"], "refused");
    let grpc = refusal(true, StatusCode::FORBIDDEN, 7, detail, false);
    assert_eq!(grpc.headers()["grpc-status"], "7");
    assert_eq!(grpc.headers()["grpc-message"], "access denied");
    let exposed = refusal(true, StatusCode::FORBIDDEN, 7, detail, true);
    assert_eq!(exposed.headers()["grpc-message"], detail);
    for (status, words) in [
        (StatusCode::NOT_FOUND, "no route"),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (StatusCode::BAD_REQUEST, "bad request"),
        (StatusCode::GATEWAY_TIMEOUT, "upstream timeout"),
    ] {
        assert_eq!(plain_refusal(status), words);
    }
}

mod port_index {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use mesh_core::SpiffeId;
    use mesh_core::identity::TrustDomain;
    use mesh_core::model::{Endpoint, Service, ServicePort, TlsMode, Workload};

    use super::*;

    fn nn(name: &str) -> NamespacedName {
        NamespacedName::new("shop", name)
    }

    fn port(port: u16, target_port: u16, protocol: Protocol) -> ServicePort {
        ServicePort {
            name: format!("p{port}"),
            port,
            target_port,
            protocol,
        }
    }

    fn service(
        name: &str,
        vip: Option<[u8; 4]>,
        ips: &[[u8; 4]],
        ports: Vec<ServicePort>,
    ) -> Service {
        Service {
            name: nn(name),
            vip: vip.map(Ipv4Addr::from),
            ports,
            endpoints: ips
                .iter()
                .map(|ip| Endpoint {
                    ip: Ipv4Addr::from(*ip),
                    workload: None,
                    identity: None,
                    node: None,
                    ready: true,
                })
                .collect(),
        }
    }

    fn workload(name: &str, ips: &[[u8; 4]]) -> Workload {
        let td = TrustDomain::new("cluster.local").expect("trust domain");
        Workload {
            name: nn(name),
            uid: name.into(),
            service_account: name.into(),
            identity: SpiffeId::workload(&td, "shop", name).expect("identity"),
            node: "node-1".into(),
            ips: ips.iter().map(|ip| Ipv4Addr::from(*ip)).collect(),
            mode: TlsMode::Strict,
            labels: BTreeMap::new(),
            cgroup: None,
            netns: None,
            ports: Vec::new(),
            excluded_inbound_ports: Vec::new(),
        }
    }

    /// Two local pods (one with two addresses), a pod of another node, and services that
    /// disagree about a port: `a-web` sorts before `b-web`.
    fn snapshot() -> NodeSnapshot {
        let services = [
            service(
                "b-web",
                Some([10, 96, 0, 2]),
                &[[10, 0, 1, 1], [10, 0, 9, 9]],
                vec![
                    port(80, 8080, Protocol::Tcp),
                    port(81, 9090, Protocol::Grpc),
                ],
            ),
            service(
                "a-web",
                Some([10, 96, 0, 1]),
                &[[10, 0, 1, 1]],
                vec![
                    port(80, 8080, Protocol::Http),
                    port(82, 8080, Protocol::Http2),
                ],
            ),
            // The second address of `api`, behind a service of the same VIP as `a-web`.
            service(
                "c-api",
                Some([10, 96, 0, 1]),
                &[[10, 0, 1, 3]],
                vec![
                    port(80, 7000, Protocol::Grpc),
                    port(90, 7001, Protocol::Http),
                ],
            ),
            service(
                "headless",
                None,
                &[[10, 0, 1, 2]],
                vec![port(5000, 5000, Protocol::Http2)],
            ),
        ];
        NodeSnapshot {
            node: "node-1".into(),
            workloads: [
                workload("web", &[[10, 0, 1, 1]]),
                workload("api", &[[10, 0, 1, 2], [10, 0, 1, 3]]),
            ]
            .into_iter()
            .map(|w| (w.name.clone(), w))
            .collect(),
            services: Arc::new(
                services
                    .into_iter()
                    .map(|s| (s.name.clone(), Arc::new(s)))
                    .collect(),
            ),
            trust_bundle: vec!["root".into()],
            ..NodeSnapshot::default()
        }
    }

    #[test]
    fn a_pods_port_has_the_protocol_of_the_first_service_by_name_that_targets_it() {
        let index = PortIndex::new(&snapshot());
        let (web, api) = (nn("web"), nn("api"));
        // `a-web` says HTTP (its first port targeting 8080), `b-web` says TCP: `a-web` wins.
        assert_eq!(index.pod_port(&web, 8080), Protocol::Http);
        // Only `b-web` targets 9090.
        assert_eq!(index.pod_port(&web, 9090), Protocol::Grpc);
        // Either address of a pod counts.
        assert_eq!(index.pod_port(&api, 5000), Protocol::Http2);
        assert_eq!(index.pod_port(&api, 7000), Protocol::Grpc);
        assert_eq!(index.pod_port(&api, 7001), Protocol::Http);
        // Undeclared ports, ports of another pod, pods that are not this node's: TCP.
        assert_eq!(index.pod_port(&web, 7000), Protocol::Tcp);
        assert_eq!(index.pod_port(&api, 8080), Protocol::Tcp);
        assert_eq!(index.pod_port(&nn("elsewhere"), 8080), Protocol::Tcp);
    }

    #[test]
    fn a_service_port_has_the_protocol_of_the_first_service_by_name_at_that_vip() {
        let index = PortIndex::new(&snapshot());
        let at = |vip: [u8; 4], port: u16| SocketAddrV4::new(Ipv4Addr::from(vip), port);
        // `a-web` and `c-api` share 10.96.0.1: port 80 is `a-web`'s, 90 only `c-api`'s.
        assert_eq!(index.service_port(at([10, 96, 0, 1], 80)), Protocol::Http);
        assert_eq!(index.service_port(at([10, 96, 0, 1], 82)), Protocol::Http2);
        assert_eq!(index.service_port(at([10, 96, 0, 1], 90)), Protocol::Http);
        assert_eq!(index.service_port(at([10, 96, 0, 2], 81)), Protocol::Grpc);
        assert_eq!(index.service_port(at([10, 96, 0, 2], 80)), Protocol::Tcp);
        // An undeclared port, a pod's address, an unknown address: TCP.
        assert_eq!(index.service_port(at([10, 96, 0, 2], 9999)), Protocol::Tcp);
        assert_eq!(index.service_port(at([10, 0, 1, 1], 8080)), Protocol::Tcp);
        assert_eq!(index.service_port(at([10, 96, 0, 3], 80)), Protocol::Tcp);
        assert_eq!(
            index.service_name([10, 96, 0, 1].into()),
            Some("a-web.shop.svc.cluster.local")
        );
        assert_eq!(
            index.service_name([10, 96, 0, 2].into()),
            Some("b-web.shop.svc.cluster.local")
        );
        assert_eq!(index.service_name([10, 0, 1, 1].into()), None);
    }

    #[test]
    fn every_configuration_version_carries_its_own_index() {
        let store = crate::state::holding(&snapshot());
        let applied = store.current();
        assert_eq!(applied.ports.pod_port(&nn("web"), 8080), Protocol::Http);
        let empty = crate::state::StateStore::new("node-1").current();
        assert_eq!(empty.ports.pod_port(&nn("web"), 8080), Protocol::Tcp);
    }
}
