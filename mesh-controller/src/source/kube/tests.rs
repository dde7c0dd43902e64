use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use kube::api::DynamicObject;
use kube::runtime::watcher::Event;
use mesh_core::identity::{SpiffeId, TrustDomain};
use mesh_core::model::NamespacedName;
use mesh_core::policy::{RouteMatch, TrafficPolicyMode};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::*;
use crate::compile::{CompileOptions, compile_node};
use crate::index::ENROLLED_LABEL;
use crate::leader::Leadership;

mod mock;

use mock::{MockApi, path};

// === Fixtures ===

fn namespace(name: &str, enrolled: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {ENROLLED_LABEL: enrolled.to_string()}},
    })
}

fn pod(namespace: &str, name: &str, node: &str, service_account: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "uid": format!("uid-{name}")},
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "containers": [{"name": "app", "image": "app:1"}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn tcp_route(namespace: &str, name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "TCPRoute",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"matches": {"ports": [port]}},
    })
}

fn traffic_target(namespace: &str, name: &str, rule: (&str, &str), from: &str, to: &str) -> Value {
    json!({
        "apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": to, "namespace": namespace},
            "rules": [{"kind": rule.0, "name": rule.1}],
            "sources": [{"kind": "ServiceAccount", "name": from, "namespace": namespace}],
        },
    })
}

fn traffic_split(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"service": "api", "backends": [{"service": "api-v1", "weight": 100}]},
    })
}

fn dynamic(value: Value) -> DynamicObject {
    serde_json::from_value(value).expect("a DynamicObject")
}

fn key(kind: Kind, namespace: &str, name: &str) -> ResourceKey {
    ResourceKey::new(kind, namespace, name)
}

fn options() -> CompileOptions {
    CompileOptions {
        service_cidrs: vec![],
        trust_domain: TrustDomain::new("cluster.local").expect("trust domain"),
        traffic_policy: TrafficPolicyMode::DefaultDeny,
    }
}

fn workload_id(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::workload(&options().trust_domain, namespace, service_account).expect("identity")
}

const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `check` until it holds; fails the test with `what` after [`DEADLINE`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the source against the mock until dropped.
struct Running {
    index: SharedIndex,
    source: JoinHandle<()>,
    server: JoinHandle<()>,
}

impl Running {
    fn start(api: &MockApi) -> Self {
        Running::start_with(api, Leadership::always())
    }

    fn start_with(api: &MockApi, leadership: Leadership) -> Self {
        let (client, server) = api.client();
        let index = SharedIndex::new();
        let source = tokio::spawn(run(client, index.clone(), leadership));
        Running {
            index,
            source,
            server,
        }
    }

    fn contains(&self, key: &ResourceKey) -> bool {
        self.index.read().contains(key)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.source.abort();
        self.server.abort();
    }
}

// === Through the mocked API server ===

#[tokio::test]
async fn watch_events_become_node_snapshots() {
    let api = MockApi::new();
    api.seed([
        namespace("shop", true),
        pod("shop", "api-1", "node-a", "api", "10.0.0.11"),
        pod("shop", "web-1", "node-b", "web", "10.0.1.12"),
        tcp_route("shop", "tcp-8080", 8080),
        traffic_target("shop", "web-to-api", ("TCPRoute", "tcp-8080"), "web", "api"),
    ]);
    let running = Running::start(&api);
    let opts = options();
    let api_1 = NamespacedName::new("shop", "api-1");
    let snapshot = |node: &str| compile_node(&running.index.read(), &opts, node);

    eventually("node-a runs api-1 with the TrafficTarget's rule", || {
        snapshot("node-a")
            .policies
            .get(&api_1)
            .is_some_and(|p| !p.rules.is_empty())
    })
    .await;
    let a = snapshot("node-a");
    assert_eq!(
        a.workloads.keys().cloned().collect::<Vec<_>>(),
        vec![api_1.clone()]
    );
    assert_eq!(a.workloads[&api_1].ips, vec![Ipv4Addr::new(10, 0, 0, 11)]);
    assert_eq!(a.workloads[&api_1].identity, workload_id("shop", "api"));
    let rules = &a.policies[&api_1].rules;
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(
        rules[0].traffic_target,
        NamespacedName::new("shop", "web-to-api")
    );
    assert_eq!(rules[0].sources, vec![workload_id("shop", "web")]);
    assert_eq!(rules[0].ports, vec![8080]);
    assert_eq!(rules[0].route, RouteMatch::Tcp);
    let b = snapshot("node-b");
    assert_eq!(
        b.workloads.keys().cloned().collect::<Vec<_>>(),
        vec![NamespacedName::new("shop", "web-1")]
    );
    assert!(running.index.read().rejections().is_empty());

    // Later events on the open watch.
    eventually("the pod watch is open", || api.watching(Kind::Pod)).await;
    api.send(
        "MODIFIED",
        pod("shop", "api-1", "node-a", "api", "10.0.0.99"),
    );
    eventually("api-1's new address reaches node-a", || {
        snapshot("node-a")
            .workloads
            .get(&api_1)
            .is_some_and(|w| w.ips == vec![Ipv4Addr::new(10, 0, 0, 99)])
    })
    .await;

    api.send("ADDED", pod("shop", "api-2", "node-a", "api", "10.0.0.12"));
    api.send(
        "DELETED",
        pod("shop", "api-1", "node-a", "api", "10.0.0.99"),
    );
    let api_2 = NamespacedName::new("shop", "api-2");
    eventually("node-a runs api-2 instead of api-1", || {
        snapshot("node-a")
            .workloads
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            == vec![api_2.clone()]
    })
    .await;
    let a = snapshot("node-a");
    assert_eq!(a.policies[&api_2].rules.len(), 1);
    assert!(!a.policies.contains_key(&api_1));
    assert!(!running.contains(&key(Kind::Pod, "shop", "api-1")));
}

#[tokio::test]
async fn only_the_leading_replica_writes_status_conditions() {
    let api = MockApi::new();
    api.seed([
        namespace("shop", true),
        traffic_target(
            "shop",
            "dangling",
            ("HTTPRouteGroup", "routes"),
            "web",
            "api",
        ),
    ]);
    let (leads, rx) = tokio::sync::watch::channel(false);
    let running = Running::start_with(&api, crate::leader::testing(rx));
    let path = "/apis/access.smi-spec.io/v1alpha3/namespaces/shop/traffictargets/dangling/status";
    eventually("the TrafficTarget is rejected", || {
        !running.index.read().rejections().is_empty()
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(api.patches(path).is_empty(), "a follower wrote a condition");
    leads.send(true).expect("leading");
    eventually("the leader writes the condition", || {
        !api.patches(path).is_empty()
    })
    .await;
}

#[tokio::test]
async fn invalid_traffic_targets_get_an_accepted_false_condition() {
    let api = MockApi::new();
    api.seed([
        namespace("shop", true),
        // Names an HTTPRouteGroup that does not exist.
        traffic_target(
            "shop",
            "dangling",
            ("HTTPRouteGroup", "routes"),
            "web",
            "api",
        ),
    ]);
    let mut malformed = traffic_target("shop", "malformed", ("TCPRoute", "tcp"), "web", "api");
    malformed["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("sources");
    api.seed([malformed]);
    let running = Running::start(&api);

    let status_path = |name: &str| {
        format!("/apis/access.smi-spec.io/v1alpha3/namespaces/shop/traffictargets/{name}/status")
    };
    let reason_of = |name: &str| {
        let wanted = key(Kind::TrafficTarget, "shop", name);
        running
            .index
            .read()
            .rejections()
            .into_iter()
            .find(|r| r.key.as_ref() == Some(&wanted))
    };
    for name in ["dangling", "malformed"] {
        eventually(&format!("a PATCH of {name}'s status"), || {
            !api.patches(&status_path(name)).is_empty()
        })
        .await;
        let rejection = reason_of(name).expect("a rejection in the index");
        assert_eq!(rejection.origin, ORIGIN);
        let patches = api.patches(&status_path(name));
        let condition = &patches[0]["status"]["conditions"][0];
        assert_eq!(condition["type"], "Accepted");
        assert_eq!(condition["status"], "False");
        assert_eq!(condition["reason"], "Invalid");
        assert_eq!(condition["message"], rejection.reason.as_str());
        assert!(
            condition["lastTransitionTime"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z') && t.contains('T')),
            "{condition}"
        );
    }
    assert!(
        reason_of("dangling")
            .expect("rejected")
            .reason
            .contains("routes"),
        "the reason names the missing HTTPRouteGroup"
    );
    assert!(
        reason_of("malformed")
            .expect("rejected")
            .reason
            .contains("spec.sources"),
        "the reason names the missing field"
    );

    // An unrelated change does not write the condition again; creating the missing
    // HTTPRouteGroup makes the TrafficTarget valid, which is written once.
    eventually("the watches are open", || {
        api.watching(Kind::Pod) && api.watching(Kind::HttpRouteGroup)
    })
    .await;
    api.send("ADDED", pod("shop", "api-1", "node-a", "api", "10.0.0.11"));
    eventually("the pod is indexed", || {
        running.contains(&key(Kind::Pod, "shop", "api-1"))
    })
    .await;
    let routes = json!({
        "apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "HTTPRouteGroup",
        "metadata": {"namespace": "shop", "name": "routes"},
        "spec": {"matches": [{"name": "all", "pathRegex": ".*"}]},
    });
    api.send("ADDED", routes);
    eventually("an Accepted=True patch of dangling", || {
        api.patches(&status_path("dangling")).len() >= 2
    })
    .await;
    let patches = api.patches(&status_path("dangling"));
    assert_eq!(patches.len(), 2, "one False, then one True: {patches:?}");
    assert_eq!(patches[1]["status"]["conditions"][0]["status"], "True");
    assert!(reason_of("dangling").is_none());
    assert_eq!(api.patches(&status_path("malformed")).len(), 1);
}

#[tokio::test]
async fn a_missing_crd_does_not_stop_the_other_watchers() {
    let api = MockApi::new();
    for kind in [Kind::TrafficSplit, Kind::HttpRouteGroup] {
        api.set_missing(kind, true);
    }
    api.seed([
        namespace("shop", true),
        pod("shop", "api-1", "node-a", "api", "10.0.0.11"),
        traffic_split("shop", "api-split"),
    ]);
    let running = Running::start(&api);

    eventually("the pod is indexed", || {
        running.contains(&key(Kind::Pod, "shop", "api-1"))
    })
    .await;
    eventually("the TrafficSplit list is retried", || {
        api.lists(Kind::TrafficSplit) >= 2
    })
    .await;
    assert!(!running.contains(&key(Kind::TrafficSplit, "shop", "api-split")));

    // Later pod events still arrive.
    eventually("the pod watch is open", || api.watching(Kind::Pod)).await;
    api.send("ADDED", pod("shop", "api-2", "node-a", "api", "10.0.0.12"));
    eventually("the new pod is indexed", || {
        running.contains(&key(Kind::Pod, "shop", "api-2"))
    })
    .await;

    // Once the CRD is installed its watcher catches up.
    api.set_missing(Kind::TrafficSplit, false);
    eventually("the TrafficSplit is indexed", || {
        running.contains(&key(Kind::TrafficSplit, "shop", "api-split"))
    })
    .await;
}

#[tokio::test]
async fn a_relist_removes_objects_deleted_while_disconnected() {
    let api = MockApi::new();
    api.seed([
        pod("shop", "kept", "node-a", "api", "10.0.0.11"),
        pod("shop", "gone", "node-a", "api", "10.0.0.12"),
    ]);
    let running = Running::start(&api);
    let gone = key(Kind::Pod, "shop", "gone");
    eventually("both pods are indexed", || {
        running.contains(&gone) && running.contains(&key(Kind::Pod, "shop", "kept"))
    })
    .await;

    eventually("the pod watch is open", || api.watching(Kind::Pod)).await;
    let lists = api.lists(Kind::Pod);
    api.forget(Kind::Pod, "shop", "gone");
    api.expire(Kind::Pod);
    eventually("the pods are listed again", || api.lists(Kind::Pod) > lists).await;
    eventually("the missed deletion is applied", || {
        !running.contains(&gone)
    })
    .await;
    assert!(running.contains(&key(Kind::Pod, "shop", "kept")));
}

// === The event feed ===

#[test]
fn a_relist_is_one_batch_that_removes_what_it_did_not_list() {
    let mut feed = Feed::new(Kind::Pod);
    feed.event(Event::Init);
    feed.event(Event::InitApply(dynamic(pod(
        "shop", "a", "n", "sa", "10.0.0.1",
    ))));
    assert_eq!(
        feed.take(),
        None,
        "a relist is held back until it is complete"
    );
    feed.event(Event::InitApply(dynamic(pod(
        "shop", "b", "n", "sa", "10.0.0.2",
    ))));
    feed.event(Event::InitDone);
    let changes = feed.take().expect("the relist");
    assert_eq!(changes.len(), 3);
    assert!(matches!(&changes[0], Change::Apply(r) if r.key() == key(Kind::Pod, "shop", "a")));
    assert!(matches!(&changes[1], Change::Apply(r) if r.key() == key(Kind::Pod, "shop", "b")));
    let listed = BTreeSet::from([key(Kind::Pod, "shop", "a"), key(Kind::Pod, "shop", "b")]);
    assert_eq!(changes[2], Change::Resync(listed));
    assert_eq!(feed.take(), None);
}

#[test]
fn a_restarted_relist_drops_the_unfinished_one() {
    let mut feed = Feed::new(Kind::Pod);
    feed.event(Event::Apply(dynamic(pod(
        "shop", "early", "n", "sa", "10.0.0.1",
    ))));
    feed.event(Event::Init);
    feed.event(Event::InitApply(dynamic(pod(
        "shop", "a", "n", "sa", "10.0.0.2",
    ))));
    feed.event(Event::Init);
    feed.event(Event::InitApply(dynamic(pod(
        "shop", "b", "n", "sa", "10.0.0.3",
    ))));
    feed.event(Event::InitDone);
    let changes = feed.take().expect("changes");
    let keys: Vec<ResourceKey> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Apply(r) => Some(r.key()),
            _ => None,
        })
        .collect();
    assert_eq!(
        keys,
        vec![key(Kind::Pod, "shop", "early"), key(Kind::Pod, "shop", "b")]
    );
    assert_eq!(
        changes.last(),
        Some(&Change::Resync(BTreeSet::from([key(
            Kind::Pod,
            "shop",
            "b"
        )])))
    );
}

#[test]
fn list_items_without_type_meta_parse_and_bad_ones_are_rejected() {
    let mut feed = Feed::new(Kind::TrafficTarget);
    let mut item = traffic_target("shop", "ok", ("TCPRoute", "tcp"), "web", "api");
    let map = item.as_object_mut().expect("object");
    map.remove("apiVersion");
    map.remove("kind");
    feed.event(Event::Apply(dynamic(item)));
    let mut bad = traffic_target("shop", "bad", ("Foo", "tcp"), "web", "api");
    bad["metadata"]["namespace"] = Value::Null;
    // In `default`, the destination is `default/api`.
    bad["spec"]["destination"]
        .as_object_mut()
        .expect("destination")
        .remove("namespace");
    feed.event(Event::Apply(dynamic(bad)));
    feed.event(Event::Delete(dynamic(json!({"metadata": {"name": "old"}}))));
    let changes = feed.take().expect("changes");
    assert!(
        matches!(&changes[0], Change::Apply(r) if r.key() == key(Kind::TrafficTarget, "shop", "ok"))
    );
    match &changes[1] {
        Change::Reject { key: k, reason } => {
            assert_eq!(*k, key(Kind::TrafficTarget, "default", "bad"));
            assert!(reason.contains("spec.rules[0].kind"), "{reason}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        changes[2],
        Change::Remove(key(Kind::TrafficTarget, "default", "old"))
    );
}

#[test]
fn a_resync_removes_only_this_kinds_unlisted_objects_and_rejections() {
    let mut index = Index::new();
    let parse = |v| resource::parse(v).expect("valid");
    index.apply(ORIGIN, parse(pod("shop", "a", "n", "sa", "10.0.0.1")));
    index.apply(ORIGIN, parse(pod("shop", "b", "n", "sa", "10.0.0.2")));
    index.apply(ORIGIN, parse(namespace("shop", true)));
    let bad = key(Kind::Pod, "shop", "bad");
    index.record_rejection(ORIGIN, Some(bad.clone()), "broken");
    let listed = BTreeSet::from([key(Kind::Pod, "shop", "a")]);
    apply_changes(&mut index, Kind::Pod, vec![Change::Resync(listed)]);
    assert!(index.contains(&key(Kind::Pod, "shop", "a")));
    assert!(!index.contains(&key(Kind::Pod, "shop", "b")));
    assert!(index.contains(&key(Kind::Namespace, "", "shop")));
    assert!(
        index
            .rejections()
            .iter()
            .all(|r| r.key.as_ref() != Some(&bad))
    );
}

#[test]
fn a_rejected_update_keeps_the_last_good_version() {
    let mut index = Index::new();
    let good = traffic_target("shop", "tt", ("TCPRoute", "tcp"), "web", "api");
    let mut feed = Feed::new(Kind::TrafficTarget);
    feed.event(Event::Apply(dynamic(good)));
    let mut bad = traffic_target("shop", "tt", ("TCPRoute", "tcp"), "web", "api");
    bad["spec"]["sources"] = json!([]);
    feed.event(Event::Apply(dynamic(bad)));
    let changes = feed.take().expect("changes");
    apply_changes(&mut index, Kind::TrafficTarget, changes);
    let tt = key(Kind::TrafficTarget, "shop", "tt");
    assert!(index.contains(&tt));
    assert!(
        index
            .rejections()
            .iter()
            .any(|r| r.key.as_ref() == Some(&tt))
    );
}

// === Status conditions ===

#[test]
fn status_conditions_are_planned_once_per_reason() {
    let mut index = Index::new();
    let mut writer = StatusWriter::default();
    let now = Instant::now();
    let tt = key(Kind::TrafficTarget, "shop", "tt");
    let pod_key = key(Kind::Pod, "shop", "p");
    index.record_rejection(ORIGIN, Some(tt.clone()), "first");
    index.record_rejection(ORIGIN, Some(pod_key), "not an SMI kind");
    index.record_rejection(
        "/etc/mesh/x.yaml",
        Some(key(Kind::TcpRoute, "a", "b")),
        "local",
    );
    index.record_rejection(ORIGIN, None, "no key");

    let first = Verdict::Rejected("first".into());
    assert_eq!(writer.plan(&index, now), vec![(tt.clone(), first.clone())]);
    writer.done(tt.clone(), first, PatchResult::Written);
    assert_eq!(writer.plan(&index, now), vec![], "written once");

    index.record_rejection(ORIGIN, Some(tt.clone()), "second");
    let second = Verdict::Rejected("second".into());
    assert_eq!(writer.plan(&index, now), vec![(tt.clone(), second.clone())]);
    writer.done(tt.clone(), second, PatchResult::Written);

    // Valid again: the object is in the index without a rejection.
    let valid = traffic_target("shop", "tt", ("TCPRoute", "tcp"), "web", "api");
    index.apply(ORIGIN, resource::parse(valid).expect("valid"));
    assert_eq!(
        writer.plan(&index, now),
        vec![(tt.clone(), Verdict::Accepted)]
    );
    writer.done(tt.clone(), Verdict::Accepted, PatchResult::Written);
    assert_eq!(writer.plan(&index, now), vec![]);

    // Deleted: forgotten, so a new object of the same name starts afresh.
    index.remove(&tt);
    assert_eq!(writer.plan(&index, now), vec![]);
    index.record_rejection(ORIGIN, Some(tt.clone()), "second");
    assert_eq!(
        writer.plan(&index, now),
        vec![(tt, Verdict::Rejected("second".into()))]
    );
}

#[test]
fn failed_status_writes_are_retried_with_backoff() {
    let mut index = Index::new();
    let mut writer = StatusWriter::default();
    let now = Instant::now();
    let tt = key(Kind::TrafficTarget, "shop", "tt");
    index.record_rejection(ORIGIN, Some(tt.clone()), "bad");
    let verdict = Verdict::Rejected("bad".into());

    writer.done(tt.clone(), verdict.clone(), PatchResult::Failed(now));
    let first = writer.next_retry().expect("a retry");
    assert!(first > now);
    assert_eq!(
        writer.plan(&index, now),
        vec![],
        "not before the retry is due"
    );
    assert_eq!(
        writer.plan(&index, first),
        vec![(tt.clone(), verdict.clone())]
    );
    writer.done(tt.clone(), verdict.clone(), PatchResult::Failed(first));
    let second = writer.next_retry().expect("a retry");
    assert!(second - first > first - now, "the delay grows");

    // Once the rejection is gone, the failed write is not retried.
    index.clear_rejection(ORIGIN, Some(&tt));
    assert_eq!(writer.plan(&index, second), vec![]);
    assert_eq!(writer.next_retry(), None);

    // 404 is final.
    index.record_rejection(ORIGIN, Some(tt.clone()), "bad");
    writer.done(tt.clone(), verdict, PatchResult::Gone);
    assert_eq!(writer.plan(&index, second), vec![]);
}

#[test]
fn the_status_patch_sets_the_accepted_condition() {
    let now = Timestamp::from_second(1_700_000_000).expect("timestamp");
    let patch = status_patch(
        &Verdict::Rejected("spec.rules: must not be empty".into()),
        now,
    );
    assert_eq!(
        patch,
        json!({"status": {"conditions": [{
            "type": "Accepted",
            "status": "False",
            "reason": "Invalid",
            "message": "spec.rules: must not be empty",
            "lastTransitionTime": "2023-11-14T22:13:20Z",
        }]}})
    );
    let accepted = status_patch(&Verdict::Accepted, now);
    assert_eq!(accepted["status"]["conditions"][0]["status"], "True");
}

#[test]
fn every_kind_has_its_api_resource() {
    assert_eq!(path(Kind::Pod), "/api/v1/pods");
    assert_eq!(
        path(Kind::EndpointSlice),
        "/apis/discovery.k8s.io/v1/endpointslices"
    );
    assert_eq!(
        path(Kind::TrafficTarget),
        "/apis/access.smi-spec.io/v1alpha3/traffictargets"
    );
    assert_eq!(
        path(Kind::HttpRouteGroup),
        "/apis/specs.smi-spec.io/v1alpha4/httproutegroups"
    );
    assert_eq!(
        path(Kind::TcpRoute),
        "/apis/specs.smi-spec.io/v1alpha4/tcproutes"
    );
    assert_eq!(
        path(Kind::TrafficSplit),
        "/apis/split.smi-spec.io/v1alpha4/trafficsplits"
    );
    assert_eq!(
        path(Kind::HttpRoute),
        "/apis/gateway.networking.k8s.io/v1/httproutes"
    );
    assert_eq!(
        path(Kind::GrpcRoute),
        "/apis/gateway.networking.k8s.io/v1/grpcroutes"
    );
    for kind in Kind::ALL {
        assert_eq!(api_resource(kind).kind, kind.as_str());
    }
}
