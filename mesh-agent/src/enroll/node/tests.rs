use super::*;
use mesh_cni::PodRef;
use mesh_core::SpiffeId;
use mesh_core::model::{TlsMode, Workload};

use mesh_datapath::config::Mode;

const UID: &str = "6f1c2b7e-3d4a-4b8c-9e0f-1a2b3c4d5e6f";
const OTHER_UID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

fn node_pod(name: &str, uid: &str, meshed: bool) -> NodePod {
    NodePod {
        name: NamespacedName::new("shop", name),
        uid: uid.into(),
        meshed,
        mode: TlsMode::Strict,
        ports: vec![8080],
        excluded_inbound_ports: vec![9100],
        probe_ports: vec![],
    }
}

fn snapshot(pods: &[NodePod]) -> NodeSnapshot {
    let mut s = NodeSnapshot::default();
    for p in pods {
        s.node_pods.insert(p.name.clone(), p.clone());
    }
    s
}

/// The pod has an address in its status: it runs.
fn running(s: &mut NodeSnapshot, pod: &NodePod, ip: [u8; 4]) {
    s.workloads.insert(
        pod.name.clone(),
        Workload {
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            service_account: "web".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/web"
                .parse::<SpiffeId>()
                .expect("id"),
            node: "node-1".into(),
            ips: vec![Ipv4Addr::from(ip)],
            mode: pod.mode,
            labels: Default::default(),
            cgroup: None,
            netns: None,
            ports: pod.ports.clone(),
            excluded_inbound_ports: pod.excluded_inbound_ports.clone(),
        },
    );
}

fn request(op: Op, name: &str, uid: Option<&str>) -> Request {
    Request {
        op,
        pod: PodRef {
            namespace: "shop".into(),
            name: name.into(),
            uid: uid.map(String::from),
        },
        container_id: "c0ffee".into(),
        netns: "/var/run/netns/cni-1234".into(),
        ifname: "eth0".into(),
        ips: vec!["fd00::5/64".into(), "10.244.1.5/24".into()],
    }
}

/// A cgroup tree in the systemd layout with pod `uid`'s cgroup; `procs` are written into a
/// container below it.
fn cgroups(uid: &str, procs: &[u32]) -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().expect("tempdir");
    let pod = root.path().join(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        uid.replace('-', "_")
    ));
    let container = pod.join("cri-containerd-0123.scope");
    std::fs::create_dir_all(&container).expect("mkdir");
    std::fs::write(pod.join("cgroup.procs"), "").expect("procs");
    let list: String = procs.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(container.join("cgroup.procs"), list).expect("procs");
    (root, pod)
}

#[test]
fn a_cni_add_waits_for_the_pod_then_passes_an_unmeshed_one_and_locates_a_meshed_one() {
    let (root, pod_cgroup) = cgroups(UID, &[]);
    let mut pods = NodePods::new(root.path().into(), vec![]);
    let add = request(Op::Add, "web-0", Some(UID));

    // Not announced yet, or announced under an earlier UID (recreated under the same name).
    assert_eq!(pods.call(&add, &NodeSnapshot::default()), Decision::Wait);
    let earlier = snapshot(&[node_pod("web-0", OTHER_UID, true)]);
    assert_eq!(pods.call(&add, &earlier), Decision::Wait);

    let unmeshed = snapshot(&[node_pod("web-0", UID, false)]);
    assert_eq!(
        pods.call(&add, &unmeshed),
        Decision::Answer(Response::NotMeshed)
    );
    assert!(pods.desired(&unmeshed, &[]).0.is_empty());

    let meshed = snapshot(&[node_pod("web-0", UID, true)]);
    assert_eq!(
        pods.call(&add, &meshed),
        Decision::Enroll {
            name: "shop/web-0".into()
        }
    );
    let (wanted, rejected) = pods.desired(&meshed, &[]);
    assert!(rejected.is_empty(), "{rejected:?}");
    let spec = &wanted["shop/web-0"];
    assert_eq!(spec.cgroup, pod_cgroup);
    assert_eq!(spec.netns, PathBuf::from("/var/run/netns/cni-1234"));
    assert_eq!(spec.ip, Ipv4Addr::new(10, 244, 1, 5));
    assert_eq!(spec.iface, "eth0");
    assert_eq!(spec.inbound_ports, [8080]);
    assert_eq!(spec.excluded_inbound_ports, [9100]);
    assert_eq!(spec.mode, Mode::Strict);

    // A runtime that gives no UID is matched by name.
    let mut fresh = NodePods::new(root.path().into(), vec![]);
    assert!(matches!(
        fresh.call(&request(Op::Add, "web-0", None), &meshed),
        Decision::Enroll { .. }
    ));
}

#[test]
fn a_cni_add_that_cannot_be_located_fails_with_the_reason() {
    let (root, _) = cgroups(OTHER_UID, &[]);
    let mut pods = NodePods::new(root.path().into(), vec![]);
    let meshed = snapshot(&[node_pod("web-0", UID, true)]);
    let failed = |d: Decision| match d {
        Decision::Answer(Response::Failed { message }) => message,
        other => panic!("expected a failure, got {other:?}"),
    };

    let message = failed(pods.call(&request(Op::Add, "web-0", Some(UID)), &meshed));
    assert!(message.contains("no cgroup of pod"), "{message}");

    let (root, _) = cgroups(UID, &[]);
    let mut pods = NodePods::new(root.path().into(), vec![]);
    let v6_only = Request {
        ips: vec!["fd00::5/64".into()],
        ..request(Op::Add, "web-0", Some(UID))
    };
    let message = failed(pods.call(&v6_only, &meshed));
    assert!(message.contains("no IPv4 address"), "{message}");

    let relative = Request {
        netns: "netns/cni-1".into(),
        ..request(Op::Add, "web-0", Some(UID))
    };
    let message = failed(pods.call(&relative, &meshed));
    assert!(message.contains("not an absolute path"), "{message}");
}

#[test]
fn a_running_pod_is_adopted_from_its_cgroup_and_named_by_the_runtime_s_pin() {
    let me = std::process::id();
    let (root, pod_cgroup) = cgroups(UID, &[me]);
    let pins = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink("/proc/self/ns/uts", pins.path().join("cni-other"))
        .expect("symlink");
    std::os::unix::fs::symlink(format!("/proc/{me}/ns/net"), pins.path().join("cni-5678"))
        .expect("symlink");
    let mut pods = NodePods::new(root.path().into(), vec![pins.path().into()]);
    let pod = node_pod("web-0", UID, true);
    let mut s = snapshot(std::slice::from_ref(&pod));

    // Not running yet (no address): nothing to adopt, and nothing wrong either.
    let (wanted, rejected) = pods.desired(&s, &[]);
    assert!(wanted.is_empty() && rejected.is_empty());

    running(&mut s, &pod, [10, 244, 1, 9]);
    let (wanted, rejected) = pods.desired(&s, &[]);
    assert!(rejected.is_empty(), "{rejected:?}");
    let spec = &wanted["shop/web-0"];
    assert_eq!(spec.cgroup, pod_cgroup);
    assert_eq!(spec.netns, pins.path().join("cni-5678"));
    assert_eq!(spec.ip, Ipv4Addr::new(10, 244, 1, 9));

    // Without a pin, a process names it; the spec stays the same from one round to the next.
    let mut unpinned = NodePods::new(root.path().into(), vec![]);
    let first = unpinned.desired(&s, &[]).0;
    assert_eq!(
        first["shop/web-0"].netns,
        PathBuf::from(format!("/proc/{me}/ns/net"))
    );
    assert_eq!(unpinned.desired(&s, &[]).0, first);

    // Pods given on the command line are theirs.
    let mut fixed = NodePods::new(root.path().into(), vec![]);
    assert!(fixed.desired(&s, &["shop/web-0".into()]).0.is_empty());
}

#[test]
fn a_running_pod_that_cannot_be_found_is_reported() {
    let (root, _) = cgroups(UID, &[]);
    let mut pods = NodePods::new(root.path().into(), vec![]);
    let pod = node_pod("web-0", UID, true);
    let mut s = snapshot(std::slice::from_ref(&pod));
    running(&mut s, &pod, [10, 244, 1, 9]);
    let (wanted, rejected) = pods.desired(&s, &[]);
    assert!(wanted.is_empty());
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0].1.to_string().contains("no process runs"),
        "{rejected:?}"
    );
}

#[test]
fn del_and_the_pod_s_removal_take_it_out_and_it_is_not_adopted_again() {
    let me = std::process::id();
    let (root, _) = cgroups(UID, &[me]);
    let mut pods = NodePods::new(root.path().into(), vec![]);
    let pod = node_pod("web-0", UID, true);
    let mut s = snapshot(std::slice::from_ref(&pod));
    running(&mut s, &pod, [10, 244, 1, 9]);
    assert!(matches!(
        pods.call(&request(Op::Add, "web-0", Some(UID)), &s),
        Decision::Enroll { .. }
    ));
    assert_eq!(
        pods.call(&request(Op::Check, "web-0", Some(UID)), &s),
        Decision::Enroll {
            name: "shop/web-0".into()
        }
    );
    assert_eq!(pods.desired(&s, &[]).0.len(), 1);

    // The runtime tears the sandbox down while the Pod object still exists: its processes
    // may linger a moment, but it is not found again.
    assert_eq!(
        pods.call(&request(Op::Del, "web-0", Some(UID)), &s),
        Decision::Unenroll {
            name: "shop/web-0".into()
        }
    );
    assert!(pods.desired(&s, &[]).0.is_empty());
    assert!(matches!(
        pods.call(&request(Op::Check, "web-0", Some(UID)), &s),
        Decision::Answer(Response::Failed { .. })
    ));

    // A new ADD (the runtime retried the sandbox) enrolls it again.
    assert!(matches!(
        pods.call(&request(Op::Add, "web-0", Some(UID)), &s),
        Decision::Enroll { .. }
    ));
    assert_eq!(pods.desired(&s, &[]).0.len(), 1);

    // The pod leaves the controller's view: forgotten, and not enrolled.
    assert!(pods.desired(&NodeSnapshot::default(), &[]).0.is_empty());
    assert!(pods.located("shop/web-0").is_none());
    // Turned unmeshed while running: out too.
    assert!(matches!(
        pods.call(&request(Op::Add, "web-0", Some(UID)), &s),
        Decision::Enroll { .. }
    ));
    let unmeshed = snapshot(&[node_pod("web-0", UID, false)]);
    assert!(pods.desired(&unmeshed, &[]).0.is_empty());
    assert!(pods.located("shop/web-0").is_none());
}
