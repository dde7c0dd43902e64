//! Policy compiler benchmark on a synthetic cluster: 10,000 pods, 1,000 services, 500 nodes,
//! 2,000 TrafficTargets (plus their routes and 100 TrafficSplits).
//!
//! Prints the time to build the index, to compile every node's snapshot, to apply one pod
//! change and recompile the affected node, and the process's peak RSS.
//!
//! `cargo bench -p mesh-controller --bench compile`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_controller::compile::{CompileOptions, compile_all, compile_node};
use mesh_controller::index::SharedIndex;
use mesh_controller::resource::Resource;
use mesh_core::identity::TrustDomain;
use mesh_core::policy::TrafficPolicyMode;
use serde_json::json;

const PODS: usize = 10_000;
const SERVICES: usize = 1_000;
const NODES: usize = 500;
const TRAFFIC_TARGETS: usize = 2_000;
const SPLITS: usize = 100;
const NAMESPACES: usize = 10;

fn main() {
    let opts = CompileOptions {
        service_cidrs: vec![],
        trust_domain: TrustDomain::new("cluster.local").expect("valid trust domain"),
        traffic_policy: TrafficPolicyMode::DefaultDeny,
    };

    let start = Instant::now();
    let resources = cluster();
    let generate = start.elapsed();
    let count = resources.len();
    let index = SharedIndex::new();
    let start = Instant::now();
    index.update(|ix| {
        for r in resources {
            ix.apply("bench", r);
        }
    });
    let build = start.elapsed();
    let rejections = index.read().rejections().len();
    assert_eq!(rejections, 0, "the synthetic cluster is valid");

    let start = Instant::now();
    let all = compile_all(&index.read(), &opts);
    let compile_all_time = start.elapsed();
    let nodes = all.len();
    let workloads: usize = all.values().map(|s| s.workloads.len()).sum();
    let rules: usize = all
        .values()
        .flat_map(|s| s.policies.values())
        .map(|p| p.rules.len())
        .sum();
    let services = all
        .values()
        .next()
        .map(|s| s.services.len())
        .unwrap_or_default();
    let endpoints: usize = all
        .values()
        .next()
        .map(|s| s.services.values().map(|s| s.endpoints.len()).sum())
        .unwrap_or_default();
    black_box(&all);

    // One pod changes (its labels move it to another service): apply it, recompile its node.
    let mut moved = pod(4_242);
    moved
        .metadata
        .labels
        .get_or_insert_default()
        .insert("app".into(), "svc-7".into());
    let node = node_of(4_242);
    let mut change = Vec::new();
    let mut recompile = Vec::new();
    let mut second_node = Vec::new();
    for round in 0..10 {
        let mut p = moved.clone();
        p.metadata
            .annotations
            .get_or_insert_default()
            .insert("round".into(), round.to_string());
        let start = Instant::now();
        index.update(|ix| ix.apply("bench", Resource::Pod(p)));
        change.push(start.elapsed());
        let start = Instant::now();
        let snapshot = compile_node(&index.read(), &opts, &node);
        recompile.push(start.elapsed());
        black_box(snapshot);
        // Another node after the same change: the shared part is cached per revision.
        let start = Instant::now();
        black_box(compile_node(&index.read(), &opts, &node_of(4_243)));
        second_node.push(start.elapsed());
    }

    // What the server does after a change: every node's stream recompiles its snapshot and
    // diffs it against the version its agent holds; only changed nodes get an update.
    let mut held = all;
    let mut p = moved.clone();
    p.metadata
        .labels
        .get_or_insert_default()
        .insert("app".into(), "svc-8".into());
    index.update(|ix| ix.apply("bench", Resource::Pod(p)));
    let start = Instant::now();
    let mut updated = 0;
    let mut resources_sent = 0;
    for (node, old) in held.iter_mut() {
        let new = compile_node(&index.read(), &opts, node);
        let (upserts, removals) = mesh_api::convert::diff(Some(old), &new);
        if !upserts.is_empty() || !removals.is_empty() {
            updated += 1;
            resources_sent += upserts.len() + removals.len();
        }
        *old = new;
    }
    let push_all = start.elapsed();
    black_box(&held);
    drop(held);

    println!(
        "synthetic cluster: {PODS} pods, {SERVICES} services, {NODES} nodes, {TRAFFIC_TARGETS} TrafficTargets, {SPLITS} TrafficSplits ({count} resources)"
    );
    println!("  generate resources             {:>10}", ms(generate));
    println!("  build index (apply+revalidate) {:>10}", ms(build));
    println!(
        "  compile all node snapshots     {:>10}  ({nodes} nodes, {workloads} workloads, {rules} rules, {services} services / {endpoints} endpoints per node)",
        ms(compile_all_time)
    );
    println!(
        "  apply one pod change           {:>10}  (median of 10)",
        ms(median(change))
    );
    println!(
        "  recompile the affected node    {:>10}  (median of 10)",
        ms(median(recompile))
    );
    println!(
        "  compile one more node (cached) {:>10}  (median of 10)",
        ms(median(second_node))
    );
    println!(
        "  push one pod change to all     {:>10}  ({updated} of {nodes} nodes changed, {resources_sent} resources sent)",
        ms(push_all)
    );
    println!("  peak RSS (VmHWM)               {:>10}", peak_rss());
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn namespace_of(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

fn node_of(pod: usize) -> String {
    format!("node-{}", pod % NODES)
}

/// Pod `i` belongs to service `i % SERVICES` and runs as its service account.
fn pod(i: usize) -> Pod {
    let svc = i % SERVICES;
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("pod-{i}")),
            namespace: Some(namespace_of(svc)),
            uid: Some(format!("uid-{i}")),
            labels: Some(BTreeMap::from([("app".to_string(), format!("svc-{svc}"))])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(format!("sa-{svc}")),
            node_name: Some(node_of(i)),
            containers: vec![Container {
                name: "app".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: 8080,
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(format!(
                "10.{}.{}.{}",
                1 + i / 65_536,
                (i / 256) % 256,
                i % 256
            )),
            ..PodStatus::default()
        }),
    }
}

fn cluster() -> Vec<Resource> {
    let mut out = Vec::new();
    for n in 0..NAMESPACES {
        out.push(Resource::Namespace(Namespace {
            metadata: ObjectMeta {
                name: Some(format!("ns-{n}")),
                labels: Some(BTreeMap::from([(
                    "mesh.io/enrolled".to_string(),
                    "true".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }));
        let ns = format!("ns-{n}");
        out.push(smi_doc(json!({
            "apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "HTTPRouteGroup",
            "metadata": {"name": "routes", "namespace": ns},
            "spec": {"matches": [
                {"name": "read", "pathRegex": "/api/.*", "methods": ["GET", "HEAD"]},
                {"name": "metrics", "pathRegex": "/metrics", "methods": ["GET"],
                 "headers": {"x-scrape": "yes|true"}},
            ]}
        })));
        out.push(smi_doc(json!({
            "apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "TCPRoute",
            "metadata": {"name": "app-port", "namespace": ns},
            "spec": {"matches": {"ports": [8080]}}
        })));
    }
    for s in 0..SERVICES {
        out.push(Resource::Service(Service {
            metadata: ObjectMeta {
                name: Some(format!("svc-{s}")),
                namespace: Some(namespace_of(s)),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(format!("10.96.{}.{}", s / 256, s % 256)),
                selector: Some(BTreeMap::from([("app".to_string(), format!("svc-{s}"))])),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::String("http".into())),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }));
    }
    out.extend((0..PODS).map(|i| Resource::Pod(pod(i))));
    for t in 0..TRAFFIC_TARGETS {
        // Destination service account sa-d in its namespace; three callers from anywhere.
        let d = t % SERVICES;
        let ns = namespace_of(d);
        let sources: Vec<_> = [7, 31, 113]
            .iter()
            .map(|k| {
                let s = (d + k * (t + 1)) % SERVICES;
                json!({"kind": "ServiceAccount", "name": format!("sa-{s}"), "namespace": namespace_of(s)})
            })
            .collect();
        let rules = if t % 2 == 0 {
            json!([{"kind": "TCPRoute", "name": "app-port"}])
        } else {
            json!([{"kind": "HTTPRouteGroup", "name": "routes", "matches": ["read"]}])
        };
        out.push(smi_doc(json!({
            "apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
            "metadata": {"name": format!("tt-{t}"), "namespace": ns},
            "spec": {
                "destination": {"kind": "ServiceAccount", "name": format!("sa-{d}"), "namespace": ns},
                "rules": rules,
                "sources": sources,
            }
        })));
    }
    for s in 0..SPLITS {
        // Root svc-s split over two services of the same namespace.
        let (a, b) = (s + NAMESPACES, s + 2 * NAMESPACES);
        out.push(smi_doc(json!({
            "apiVersion": "split.smi-spec.io/v1alpha2", "kind": "TrafficSplit",
            "metadata": {"name": format!("split-{s}"), "namespace": namespace_of(s)},
            "spec": {"service": format!("svc-{s}"), "backends": [
                {"service": format!("svc-{a}"), "weight": 90},
                {"service": format!("svc-{b}"), "weight": 10},
            ]}
        })));
    }
    out
}

fn smi_doc(value: serde_json::Value) -> Resource {
    mesh_controller::resource::parse(value).expect("valid synthetic SMI document")
}
