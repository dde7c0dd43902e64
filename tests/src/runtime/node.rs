//! One node's container runtime: containerd with its CRI plugin, run inside the node's network
//! namespace with everything of its own under `<state>/rt-<node>/` (root, state, socket, log,
//! CNI configuration and binary directories, pinned network namespaces), in its own cgroup.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;

use super::cri::Cri;
use super::image;
use crate::cluster::{Cluster, Node, Proc, command_in, spawn_app};

/// Where the reference CNI plugins are (Debian's `containernetworking-plugins`).
pub const CNI_PLUGINS: &str = "/usr/lib/cni";
/// The reference plugins each node's configuration uses (`loopback`: the runtime's own).
const PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];
/// The primary network configuration's file, in each node's CNI configuration directory.
pub const CONFLIST: &str = "10-bridge.conflist";
/// How long the runtime may take to answer CRI calls after it starts.
const START_LIMIT: Duration = Duration::from_secs(30);

/// The name of the pods' CNI network in the cluster `prefix` (the primary conflist's `name`).
pub fn network_name(prefix: &str) -> String {
    format!("{prefix}-pods")
}

/// Where libcni caches the plugins' results, per network, sandbox and interface.
const CNI_CACHE: &str = "/var/lib/cni/results";

/// Removes the CNI results cached for sandboxes of the cluster `prefix`, which the runtime
/// leaves when a sandbox is never torn down (a killed run): those of its pod network, and the
/// runtime's loopback network's of the same sandboxes. How many files.
pub fn remove_cni_cache(prefix: &str) -> usize {
    remove_cached_results(Path::new(CNI_CACHE), prefix)
}

fn remove_cached_results(cache: &Path, prefix: &str) -> usize {
    let own = format!("{}-", network_name(prefix));
    let Ok(entries) = std::fs::read_dir(cache) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        // "<network>-<sandbox id>-<interface>"
        let Some((sandbox, _)) = name
            .strip_prefix(&own)
            .and_then(|rest| rest.rsplit_once('-'))
        else {
            continue;
        };
        for file in [e.path(), cache.join(format!("cni-loopback-{sandbox}-lo"))] {
            if std::fs::remove_file(&file).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

// === impl NodeRuntime ===

/// containerd on one node, with its CNI configuration.
pub struct NodeRuntime {
    /// The node's name.
    pub node: String,
    /// Its own directory (`<state>/rt-<node>`).
    pub dir: PathBuf,
    /// The CNI configuration directory it reads.
    pub conf_dir: PathBuf,
    /// The CNI binary directory it runs plugins from.
    pub bin_dir: PathBuf,
    /// Its CRI (and containerd API) socket.
    pub socket: PathBuf,
    /// Where it pins the pods' network namespaces.
    pub netns_dir: PathBuf,
    proc: Option<Proc>,
    /// Its CRI client.
    pub cri: Cri,
}

impl NodeRuntime {
    /// The runtime directory of `node` under the cluster's state directory `state`, and where
    /// the runtime pins network namespaces in it.
    pub(crate) fn paths(state: &Path, node: &str) -> (PathBuf, PathBuf) {
        let dir = state.join(format!("rt-{node}"));
        // containerd's CRI plugin keeps its state in <state>/io.containerd.grpc.v1.cri.
        let netns = dir.join("state/io.containerd.grpc.v1.cri/netns");
        (dir, netns)
    }

    /// Starts containerd on `node` of `cluster` inside the node's network namespace, with
    /// its primary CNI configuration, and imports the image archive `images`.
    pub(crate) fn start(cluster: &Cluster, node: &Node, images: &Path) -> Result<NodeRuntime> {
        let (dir, netns_dir) = NodeRuntime::paths(&cluster.state, &node.name);
        let conf_dir = dir.join("net.d");
        let bin_dir = dir.join("bin");
        for d in [&dir, &conf_dir, &bin_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        // containerd 1.6's CRI plugin runs plugins from one directory (`bin_dir`): the
        // reference plugins are linked into it, `mesh-cni` is installed there.
        for plugin in PLUGINS {
            let src = Path::new(CNI_PLUGINS).join(plugin);
            ensure!(
                src.exists(),
                "{} is missing (Debian package containernetworking-plugins)",
                src.display()
            );
            std::os::unix::fs::symlink(&src, bin_dir.join(plugin))
                .with_context(|| format!("link {}", src.display()))?;
        }
        // The network add-on's configuration: the node's pod CIDR on its cni0 bridge.
        let subnet = format!("10.244.{}", node.index + 1);
        let primary = json!({
            "cniVersion": "1.0.0",
            "name": network_name(&cluster.names.prefix),
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "isDefaultGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.join("ipam"),
                    "ranges": [[{"subnet": format!("{subnet}.0/24"), "gateway": format!("{subnet}.1")}]],
                },
            }],
        });
        std::fs::write(conf_dir.join(CONFLIST), primary.to_string())?;

        let cgroup = cluster.cgroup_root().join(format!("runtime-{}", node.name));
        std::fs::create_dir_all(&cgroup)?;
        let mut rt = NodeRuntime {
            node: node.name.clone(),
            socket: dir.join("containerd.sock"),
            cri: Cri::connect(&dir.join("containerd.sock"))?,
            dir,
            conf_dir,
            bin_dir,
            netns_dir,
            proc: None,
        };
        let config = rt.dir.join("config.toml");
        std::fs::write(&config, containerd_config(&rt, snapshotter()))?;
        let mut cmd = command_in(
            Path::new("containerd"),
            &cgroup,
            &PathBuf::from("/run/netns").join(&node.netns),
        )?;
        cmd.arg("--config").arg(&config);
        rt.proc = Some(
            spawn_app(cmd, &rt.dir.join("containerd.log"))
                .with_context(|| format!("start containerd on {}", node.name))?,
        );
        // Ready once it answers CRI calls.
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = rt.proc.as_mut().and_then(Proc::exited) {
                bail!(
                    "containerd on {} exited ({status}); its log:\n{}",
                    rt.node,
                    rt.log_tail(30)
                );
            }
            match rt.cri.version() {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "containerd on {} does not answer CRI calls after {} s: {e:#}\nits log:\n{}",
                        rt.node,
                        START_LIMIT.as_secs(),
                        rt.log_tail(30)
                    )
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&rt.socket)
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(format!("--snapshotter={}", snapshotter()))
            .arg(images)
            .output()
            .context("run ctr (Debian package containerd)")?;
        ensure!(
            out.status.success(),
            "ctr images import into the runtime of {}: {}\ncontainerd's log:\n{}",
            rt.node,
            String::from_utf8_lossy(&out.stderr).trim(),
            rt.log_tail(20)
        );
        rt.wait_cni_config(false)?;
        Ok(rt)
    }

    /// The last `n` lines of containerd's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.proc.as_ref().map(|p| p.tail(n)).unwrap_or_default()
    }

    /// Waits until the runtime has loaded a CNI configuration that does (`true`) or does not
    /// name `mesh-cni`: it watches its configuration directory and reloads on its own.
    pub fn wait_cni_config(&self, with_mesh: bool) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let info = self.cri.status_info()?;
            let config = info.get("cniconfig").cloned().unwrap_or_default();
            // The primary network (host-local addresses) with or without the mesh's plugin.
            if config.contains(mesh_cni::PLUGIN_TYPE) == with_mesh && config.contains("host-local")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the runtime of {} did not load a CNI configuration {} mesh-cni within {} s; \
                     it has: {config}\ncontainerd's log:\n{}",
                    self.node,
                    if with_mesh { "with" } else { "without" },
                    START_LIMIT.as_secs(),
                    self.log_tail(20)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Removes every pod sandbox (stopped first: CNI DEL) and stops containerd.
    pub(crate) fn stop(&mut self) {
        if let Ok(ids) = self.cri.list_pod_sandboxes() {
            for id in ids {
                let _ = self.cri.stop_pod_sandbox(&id);
                let _ = self.cri.remove_pod_sandbox(&id);
            }
        }
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }
}

/// The configuration of a node's containerd: its own directories and socket, the CRI
/// plugin's sandbox image, snapshotter, runc with the cgroupfs driver, and CNI directories.
fn containerd_config(rt: &NodeRuntime, snapshotter: &str) -> String {
    let dir = rt.dir.display();
    let base = super::containerd::config_toml(&rt.dir, &rt.socket, true);
    format!(
        r#"{base}
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  # Pinned network namespaces under the state directory, not /var/run/netns: everything of
  # this runtime is below its own directory.
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  # The kubelet asks for oom_score_adj -998 for sandboxes; lowering it needs
  # CAP_SYS_RESOURCE, which a test machine may not grant (runc's init then dies with "can't
  # get final child's PID from pipe"). Restricted, no container goes below containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # runc's cgroupfs driver, matching the kubelet layout the harness creates (it needs
        # no systemd; this machine's PID 1 is not systemd).
        SystemdCgroup = false
        Root = "{dir}/state/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        sandbox = image::SANDBOX_IMAGE,
        bin = rt.bin_dir.display(),
        conf = rt.conf_dir.display(),
    )
}

/// The snapshotter this kernel supports: overlayfs where it has overlay, else native.
pub(crate) fn snapshotter() -> &'static str {
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("\toverlay"))
    {
        "overlayfs"
    } else {
        "native"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_cluster_s_cached_cni_results_are_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = [
            "mt1c1-pods-aaa-eth0",
            "cni-loopback-aaa-lo",
            "mt1c10-pods-bbb-eth0",
            "cni-loopback-bbb-lo",
            "other-ccc-eth0",
        ];
        for f in files {
            std::fs::write(dir.path().join(f), "{}").expect("write");
        }
        assert_eq!(remove_cached_results(dir.path(), "mt1c1"), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "cni-loopback-bbb-lo",
                "mt1c10-pods-bbb-eth0",
                "other-ccc-eth0"
            ]
        );
    }

    #[test]
    fn the_runtime_configuration_names_its_own_places() {
        let dir = Path::new("/tmp/mesh-sim-x/rt-node-1");
        let rt = NodeRuntime {
            node: "node-1".into(),
            dir: dir.into(),
            conf_dir: dir.join("net.d"),
            bin_dir: dir.join("bin"),
            socket: dir.join("containerd.sock"),
            netns_dir: dir.join("state/io.containerd.grpc.v1.cri/netns"),
            proc: None,
            cri: Cri::connect(&dir.join("containerd.sock")).expect("a lazy client"),
        };
        let text = containerd_config(&rt, "overlayfs");
        for needle in [
            "root = \"/tmp/mesh-sim-x/rt-node-1/root\"",
            "address = \"/tmp/mesh-sim-x/rt-node-1/containerd.sock\"",
            "sandbox_image = \"mesh.test/pause:local\"",
            "snapshotter = \"overlayfs\"",
            "SystemdCgroup = false",
            "conf_dir = \"/tmp/mesh-sim-x/rt-node-1/net.d\"",
            "netns_mounts_under_state_dir = true",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
