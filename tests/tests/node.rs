//! Privileged tests of what the agent finds on a node by itself: pods' cgroups and network
//! namespaces, laid out as the kubelet lays them out (both cgroup drivers, every QoS class), in
//! the real cgroup v2 hierarchy with real processes and namespaces.
use std::path::{Path, PathBuf};
use std::process::Child;

use mesh_datapath::discovery::{self, DiscoveryError};
use mesh_tests::{Cgroup, Netns, command_in, privileged};

const BURSTABLE: &str = "0f0e0d0c-1b1a-4c3d-8e5f-a1b2c3d4e5f6";
const GUARANTEED: &str = "1f0e0d0c-1b1a-4c3d-8e5f-a1b2c3d4e5f6";
const BESTEFFORT: &str = "2f0e0d0c-1b1a-4c3d-8e5f-a1b2c3d4e5f6";
const NOT_STARTED: &str = "3f0e0d0c-1b1a-4c3d-8e5f-a1b2c3d4e5f6";

/// A nested cgroup made for the test, removed (deepest first) with what runs in it.
struct Tree {
    dirs: Vec<PathBuf>,
}

impl Tree {
    fn dir(&mut self, root: &Path, rel: &str) -> PathBuf {
        let mut path = root.to_path_buf();
        for part in rel.split('/') {
            path.push(part);
            if !path.exists() {
                std::fs::create_dir(&path).expect("create cgroup");
                self.dirs.push(path.clone());
            }
        }
        path
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            mesh_tests::remove_cgroup(dir);
        }
    }
}

/// `sleep` in a container cgroup and a network namespace, as a pod's sandbox runs.
fn sandbox(cgroup: &Path, netns: &Netns) -> Child {
    let cg = Cgroup {
        path: cgroup.to_path_buf(),
    };
    let child = command_in(Path::new("sleep"), &cg, netns)
        .arg("60")
        .spawn()
        .expect("run sleep");
    // The cgroup is the tree's to remove.
    std::mem::forget(cg);
    child
}

fn ns_id(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).expect("netns");
    (m.dev(), m.ino())
}

#[test]
fn pods_are_found_from_the_kernel_in_every_cgroup_layout() {
    if !privileged("pods_are_found_from_the_kernel_in_every_cgroup_layout") {
        return;
    }
    let mount = mesh_datapath::cgroup::v2_mount().expect("v2 mount");
    let root = Cgroup::new("node");
    let mut tree = Tree { dirs: Vec::new() };
    let systemd = |uid: &str| uid.replace('-', "_");
    let burstable_pod = tree.dir(
        &root.path,
        &format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            systemd(BURSTABLE)
        ),
    );
    let burstable_box = tree.dir(&burstable_pod, "cri-containerd-0a1b2c.scope");
    let burstable_app = tree.dir(&burstable_pod, "cri-containerd-3d4e5f.scope");
    let guaranteed_pod = tree.dir(&root.path, &format!("kubepods/pod{GUARANTEED}"));
    let guaranteed_box = tree.dir(&guaranteed_pod, "0a1b2c3d");
    let besteffort_pod = tree.dir(&root.path, &format!("kubepods/besteffort/pod{BESTEFFORT}"));
    // The kubelet creates a pod's cgroup before its sandbox: found by UID while empty.
    let not_started = tree.dir(
        &root.path,
        &format!("kubepods.slice/kubepods-pod{}.slice", systemd(NOT_STARTED)),
    );

    let (net_a, net_b) = (Netns::new("da"), Netns::new("db"));
    let mut children = vec![
        sandbox(&burstable_box, &net_a),
        sandbox(&burstable_app, &net_a),
        sandbox(&guaranteed_box, &net_b),
    ];

    // By UID, whatever the driver and class (the UID's case does not matter).
    for (uid, want) in [
        (BURSTABLE, &burstable_pod),
        (GUARANTEED, &guaranteed_pod),
        (BESTEFFORT, &besteffort_pod),
        (NOT_STARTED, &not_started),
    ] {
        let found = discovery::find_pod_cgroup(&root.path, &uid.to_ascii_uppercase())
            .unwrap_or_else(|e| panic!("{uid}: {e}"));
        assert_eq!(&found, want);
    }
    let e = discovery::find_pod_cgroup(&root.path, "4f0e0d0c-1b1a-4c3d-8e5f-a1b2c3d4e5f6")
        .expect_err("no such pod");
    assert!(matches!(e, DiscoveryError::NoPodCgroup { .. }), "{e}");

    // By process: the pod-level cgroup above the container's, and the pod's UID.
    let (cg, uid) = discovery::pod_cgroup_of(&mount, children[1].id()).expect("burstable pod");
    assert_eq!((cg, uid.as_str()), (burstable_pod.clone(), BURSTABLE));
    let (cg, uid) = discovery::pod_cgroup_of(&mount, children[2].id()).expect("guaranteed pod");
    assert_eq!((cg, uid.as_str()), (guaranteed_pod.clone(), GUARANTEED));
    let e = discovery::pod_cgroup_of(&mount, std::process::id()).expect_err("the test is no pod");
    assert!(matches!(e, DiscoveryError::NotInPod { .. }), "{e}");

    // The pod's network namespace, from its processes; and the processes, from a namespace.
    let ns = discovery::netns_of_pod(&burstable_pod).expect("netns of the burstable pod");
    assert_eq!(ns_id(&ns), ns_id(&net_a.path));
    let ns = discovery::netns_of_pod(&guaranteed_pod).expect("netns of the guaranteed pod");
    assert_eq!(ns_id(&ns), ns_id(&net_b.path));
    let mut in_a = discovery::processes_in_netns(&net_a.path).expect("processes");
    in_a.sort_unstable();
    let mut want = vec![children[0].id(), children[1].id()];
    want.sort_unstable();
    assert_eq!(in_a, want);
    let e = discovery::netns_of_pod(&not_started).expect_err("nothing runs yet");
    assert!(matches!(e, DiscoveryError::NoProcess { .. }), "{e}");

    // A pod whose processes sit in two namespaces is refused, not guessed.
    children.push(sandbox(&burstable_app, &net_b));
    let e = discovery::netns_of_pod(&burstable_pod).expect_err("split");
    assert!(
        matches!(e, DiscoveryError::SplitNetns { count: 2, .. }),
        "{e}"
    );

    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(tree);
    drop(root);
}
