use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;

use mesh_cni::{Op, PodRef, Request, Response};
use mesh_core::SpiffeId;
use mesh_core::model::{NamespacedName, NodePod, TlsMode, Workload};
use mesh_datapath::config::Mode;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

use super::*;

/// What the fake node was asked to do, in order.
type Log = Arc<Mutex<Vec<String>>>;

/// A node that records each change and fails to enroll the pods named in `broken`.
#[derive(Default)]
struct FakeNode {
    log: Log,
    broken: Arc<Mutex<BTreeSet<String>>>,
}

/// A served pod: says when it stops being served.
struct Served {
    name: String,
    log: Log,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.log
            .lock()
            .expect("lock")
            .push(format!("stop {}", self.name));
    }
}

impl Node for FakeNode {
    type Served = Served;

    fn enroll(&mut self, pod: &PodSpec) -> Result<Served, EnrollError> {
        if self.broken.lock().expect("lock").contains(&pod.name) {
            return Err(EnrollError::Proxy {
                pod: pod.name.clone(),
                source: mesh_proxy::proxy::ProxyError::Listener(std::io::Error::other(
                    "no listener for you",
                )),
            });
        }
        let ports: Vec<String> = pod.inbound_ports.iter().map(u16::to_string).collect();
        self.log.lock().expect("lock").push(format!(
            "enroll {} {} {}",
            pod.name,
            pod.ip,
            ports.join(",")
        ));
        Ok(Served {
            name: pod.name.clone(),
            log: self.log.clone(),
        })
    }

    fn unenroll(&mut self, pod: &PodSpec) -> Result<(), DatapathError> {
        self.log
            .lock()
            .expect("lock")
            .push(format!("unenroll {}", pod.name));
        Ok(())
    }

    fn set_capture(&mut self, cluster: &[Cidr]) -> Result<(), DatapathError> {
        let cidrs: Vec<String> = cluster.iter().map(ToString::to_string).collect();
        self.log
            .lock()
            .expect("lock")
            .push(format!("capture {}", cidrs.join(",")));
        Ok(())
    }
}

fn taken(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.lock().expect("lock"))
}

fn failures() -> Arc<EnrollFailures> {
    Arc::new(EnrollFailures::register(&mut Registry::default()))
}

fn spec(name: &str, ip: [u8; 4], ports: &[u16]) -> PodSpec {
    PodSpec {
        name: name.into(),
        cgroup: PathBuf::from(format!("/sys/fs/cgroup/{name}")),
        netns: PathBuf::from(format!("/run/netns/{name}")),
        ip: Ipv4Addr::from(ip),
        iface: "eth0".into(),
        inbound_ports: ports.to_vec(),
        excluded_inbound_ports: vec![],
        mode: Mode::Strict,
    }
}

/// A workload of node-1 that names its cgroup and network namespace
/// (`--enroll-from-config`).
fn located(name: &str, ip: [u8; 4], ports: &[u16]) -> Workload {
    Workload {
        name: NamespacedName::new("shop", name),
        uid: format!("uid-{name}"),
        service_account: name.into(),
        identity: format!("spiffe://cluster.local/ns/shop/sa/{name}")
            .parse::<SpiffeId>()
            .expect("id"),
        node: "node-1".into(),
        ips: vec![Ipv4Addr::from(ip)],
        mode: TlsMode::Strict,
        labels: Default::default(),
        cgroup: Some(format!("/sys/fs/cgroup/{name}")),
        netns: Some(format!("/run/netns/{name}")),
        ports: ports.to_vec(),
        excluded_inbound_ports: vec![],
    }
}

fn snapshot(workloads: Vec<Workload>, capture: &[&str]) -> NodeSnapshot {
    let mut s = NodeSnapshot::default();
    for w in workloads {
        s.workloads.insert(w.name.clone(), w);
    }
    s.capture = capture.iter().map(|c| c.to_string()).collect();
    s
}

#[test]
fn the_plan_unenrolls_what_is_gone_or_changed_and_enrolls_what_is_missing() {
    let enrolled: BTreeMap<String, PodSpec> = [
        ("kept", spec("kept", [10, 0, 0, 1], &[80])),
        ("moved", spec("moved", [10, 0, 0, 2], &[80])),
        ("gone", spec("gone", [10, 0, 0, 3], &[80])),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    let wanted: BTreeMap<String, PodSpec> = [
        ("kept", spec("kept", [10, 0, 0, 1], &[80])),
        ("moved", spec("moved", [10, 0, 0, 2], &[80, 443])),
        ("new", spec("new", [10, 0, 0, 4], &[80])),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    assert_eq!(
        plan(&wanted, &enrolled),
        Plan {
            unenroll: vec!["gone".into(), "moved".into()],
            enroll: vec!["moved".into(), "new".into()],
        }
    );
    assert_eq!(plan(&wanted, &wanted), Plan::default());
}

#[test]
fn a_cni_call_is_answered_with_what_became_of_its_pod() {
    assert_eq!(cni_answer(Op::Add, true, None), Response::Enrolled);
    assert_eq!(cni_answer(Op::Check, true, None), Response::Enrolled);
    assert_eq!(
        cni_answer(Op::Add, false, Some("no cgroup".into())),
        Response::Failed {
            message: "no cgroup".into()
        }
    );
    assert_eq!(
        cni_answer(Op::Check, false, None),
        Response::Failed {
            message: "not enrolled".into()
        }
    );
    assert_eq!(cni_answer(Op::Del, false, None), Response::Removed);
    assert_eq!(
        cni_answer(Op::Del, true, None),
        Response::Failed {
            message: "still enrolled".into()
        }
    );
}

#[test]
fn rounds_follow_the_configuration_and_stop_a_pod_s_proxy_before_unenrolling_it() {
    let node = FakeNode::default();
    let log = node.log.clone();
    let mut pods = Reconciler::new(
        node,
        Wanted::Config {
            node: "node-1".into(),
        },
        failures(),
        false,
    );
    pods.enroll_fixed(&[spec("shop/fixed", [10, 0, 0, 9], &[22])])
        .expect("fixed pods enroll");
    assert_eq!(taken(&log), ["enroll shop/fixed 10.0.0.9 22"]);

    // Before the first configuration: capture left as it is.
    let web = located("web", [10, 0, 0, 1], &[8080]);
    let wanted = pods.round(&snapshot(vec![web.clone()], &["10.244.0.0/16"]), false);
    assert_eq!(wanted.len(), 1);
    assert_eq!(taken(&log), ["enroll shop/web 10.0.0.1 8080"]);

    // The same configuration again changes nothing, capture once.
    let first = snapshot(vec![web.clone()], &["10.244.0.0/16"]);
    pods.round(&first, true);
    pods.round(&first, true);
    assert_eq!(taken(&log), ["capture 10.244.0.0/16"]);

    // A changed port: the old proxy stops, then the pod is unenrolled and enrolled anew.
    let changed = located("web", [10, 0, 0, 1], &[8080, 9090]);
    pods.round(&snapshot(vec![changed], &["10.244.0.0/16"]), true);
    assert_eq!(
        taken(&log),
        [
            "stop shop/web",
            "unenroll shop/web",
            "enroll shop/web 10.0.0.1 8080,9090"
        ]
    );

    // Gone from the configuration; a fixed pod is never reconciled away.
    pods.round(&snapshot(vec![], &["10.244.0.0/16"]), true);
    assert_eq!(taken(&log), ["stop shop/web", "unenroll shop/web"]);
    assert!(pods.enrolled().is_empty());
    assert_eq!(pods.served().count(), 1, "the fixed pod is still served");

    pods.finish(true);
    assert_eq!(taken(&log), ["stop shop/fixed", "unenroll shop/fixed"]);
}

#[test]
fn a_failed_enrollment_is_recorded_retried_and_forgotten_when_the_pod_goes() {
    let node = FakeNode::default();
    let (log, broken) = (node.log.clone(), node.broken.clone());
    let failed = failures();
    let mut pods = Reconciler::new(
        node,
        Wanted::Config {
            node: "node-1".into(),
        },
        failed.clone(),
        true,
    );
    broken.lock().expect("lock").insert("shop/web".into());
    let s = snapshot(vec![located("web", [10, 0, 0, 1], &[8080])], &[]);
    pods.round(&s, true);
    assert!(pods.retrying());
    let why = failed.get("shop/web").expect("recorded");
    assert!(
        why.contains("start the proxy of shop/web") && why.contains("no listener for you"),
        "{why}"
    );
    assert_eq!(taken(&log), ["capture "]);

    // The next round tries again; once it works the failure is cleared.
    pods.round(&s, true);
    assert!(failed.get("shop/web").is_some());
    broken.lock().expect("lock").clear();
    pods.round(&s, true);
    assert!(!pods.retrying());
    assert_eq!(taken(&log), ["enroll shop/web 10.0.0.1 8080"]);

    // A pod that never enrolled and is gone leaves nothing to retry.
    broken.lock().expect("lock").insert("shop/api".into());
    pods.round(
        &snapshot(vec![located("api", [10, 0, 0, 2], &[80])], &[]),
        true,
    );
    assert!(pods.retrying());
    pods.round(&snapshot(vec![], &[]), true);
    assert!(!pods.retrying());
}

/// A cgroup tree in the systemd layout holding pod `uid`'s cgroup.
fn cgroups(uid: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let pod = root.path().join(format!(
        "kubepods.slice/kubepods-pod{}.slice",
        uid.replace('-', "_")
    ));
    std::fs::create_dir_all(&pod).expect("mkdir");
    std::fs::write(pod.join("cgroup.procs"), "").expect("procs");
    root
}

fn cni(op: Op, name: &str, uid: &str) -> (CniCall, oneshot::Receiver<Response>) {
    let (reply, answer) = oneshot::channel();
    let request = Request {
        op,
        pod: PodRef {
            namespace: "shop".into(),
            name: name.into(),
            uid: Some(uid.into()),
        },
        container_id: "c0ffee".into(),
        netns: format!("/var/run/netns/cni-{name}"),
        ifname: "eth0".into(),
        ips: vec!["10.244.1.5/24".into()],
    };
    (CniCall { request, reply }, answer)
}

fn meshed(name: &str, uid: &str) -> NodeSnapshot {
    let mut s = NodeSnapshot::default();
    let nn = NamespacedName::new("shop", name);
    s.node_pods.insert(
        nn.clone(),
        NodePod {
            name: nn,
            uid: uid.into(),
            meshed: true,
            mode: TlsMode::Strict,
            ports: vec![8080],
            excluded_inbound_ports: vec![],
            probe_ports: vec![],
        },
    );
    s
}

#[test]
fn a_cni_add_waits_for_the_controller_and_is_answered_once_its_pod_is_enrolled() {
    const UID: &str = "6f1c2b7e-3d4a-4b8c-9e0f-1a2b3c4d5e6f";
    let root = cgroups(UID);
    let node = FakeNode::default();
    let (log, broken) = (node.log.clone(), node.broken.clone());
    let mut pods = Reconciler::new(
        node,
        Wanted::Discovered(NodePods::new(root.path().into(), vec![])),
        failures(),
        true,
    );

    // The controller has not announced the pod: the call waits, unanswered.
    let (call, mut answer) = cni(Op::Add, "web-0", UID);
    pods.hold(call);
    pods.round(&NodeSnapshot::default(), true);
    assert!(pods.waiting());
    assert!(answer.try_recv().is_err(), "no answer yet");

    // Announced: enrolled in this same round, then answered.
    let s = meshed("web-0", UID);
    pods.round(&s, true);
    assert!(!pods.waiting());
    assert_eq!(answer.try_recv().expect("answered"), Response::Enrolled);
    assert_eq!(
        taken(&log),
        ["capture ", "enroll shop/web-0 10.244.1.5 8080"]
    );

    // DEL: unenrolled, then answered.
    let (call, mut answer) = cni(Op::Del, "web-0", UID);
    pods.hold(call);
    pods.round(&s, true);
    assert_eq!(answer.try_recv().expect("answered"), Response::Removed);
    assert_eq!(taken(&log), ["stop shop/web-0", "unenroll shop/web-0"]);

    // An ADD whose enrollment fails is answered with why; its containers never start.
    const OTHER: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    let root = cgroups(OTHER);
    let mut pods = Reconciler::new(
        FakeNode {
            log: log.clone(),
            broken: broken.clone(),
        },
        Wanted::Discovered(NodePods::new(root.path().into(), vec![])),
        failures(),
        true,
    );
    broken.lock().expect("lock").insert("shop/api-0".into());
    let (call, mut answer) = cni(Op::Add, "api-0", OTHER);
    pods.hold(call);
    pods.round(&meshed("api-0", OTHER), true);
    match answer.try_recv().expect("answered") {
        Response::Failed { message } => {
            assert!(message.contains("no listener for you"), "{message}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }

    // A plugin that gave up is dropped without an answer.
    let (call, answer) = cni(Op::Add, "late-0", OTHER);
    drop(answer);
    pods.hold(call);
    pods.round(&NodeSnapshot::default(), true);
    assert!(!pods.waiting());
}
