//! A real container runtime under the single-machine mesh: the pods of a [`RuntimeCluster`]
//! are started by containerd (its CRI plugin, runc, the reference CNI plugins and `mesh-cni`
//! chained after them), driven through the CRI API as a kubelet drives it.
//!
//! The nodes, the controller and the agents are the simulator's ([`Cluster`] in `enrollment:
//! cni` with no simulated pods: agents with `--discover-pods`); each node also runs its own
//! containerd *inside the node's network namespace*, so the bridge plugin plugs the pods'
//! veths into the node's `cni0` bridge (10.244.(i+1).1/24, routed to the other nodes as
//! before) and the node's agent sees them. Per node, under the cluster's state directory
//! (`rt-<node>/`): containerd's root and state, its CRI socket, the CNI configuration
//! directory (a conflist of `bridge` with `host-local` addresses from the node's pod CIDR,
//! written here as a network add-on would write it; `mesh-cni` is added to it with
//! [`mesh_cni::install`]) and the CNI binary directory (links to Debian's plugins in
//! /usr/lib/cni and the installed `mesh-cni`). Network namespaces are pinned under the state
//! directory (`netns_mounts_under_state_dir`) and the agents are told to look there.
//!
//! The harness plays the kubelet with the cgroupfs driver and `--cgroup-root=/mesh-sim-<p>`:
//! before a pod's sandbox it writes the Pod object (Pending, with its UID) and creates the
//! pod's cgroup `kubepods/besteffort/pod<uid>` in the cgroup v2 hierarchy; it passes that as
//! the sandbox's cgroup parent, writes the pod's address into the Pod object once the sandbox
//! has it, then creates and starts the pod's container. runc's cgroupfs driver on a hybrid
//! host puts every container process into the same path in the v2 hierarchy as in the v1
//! ones, which is where the agent finds the pod by its UID.
//!
//! What the runtime needs here, found by running it (containerd 1.6, runc 1.1, plugins 1.1):
//! - `restrict_oom_score_adj`: sandboxes ask for oom_score_adj -998, which needs
//!   CAP_SYS_RESOURCE; without it runc's init dies ("can't get final child's PID from pipe").
//! - One CNI binary directory (1.6 takes a single `bin_dir`): links to the reference plugins.
//! - runc's cgroupfs driver on a hybrid host (v1 controllers, v2 at /sys/fs/cgroup/unified)
//!   joins the v2 hierarchy too, at the same path; it creates the pod's cgroups in every v1
//!   hierarchy as well, which cleanup removes.
//! - containerd passes `K8S_POD_UID` in `CNI_ARGS`, so the agent matches the call by UID.
//!
//! Everything is removed on drop: the runtime's pods through CRI (so CNI DEL runs), containerd
//! and its shims (by cgroup), the mounts under the state directory, then the cluster.
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::json;

use crate::cluster::{
    Binaries, Cluster, ClusterSpec, Enrollment, Names, NodeSpec, PodObject, PodSpec,
    listening_ports, pod_objects_yaml, pod_uid, write_atomic,
};

pub mod containerd;
pub mod cri;
pub mod image;
mod node;

pub use node::{CNI_PLUGINS, CONFLIST, NodeRuntime, network_name, remove_cni_cache};

/// How long a pod's application may take to listen on its declared ports.
const LISTEN_LIMIT: Duration = Duration::from_secs(30);

// === Pods ===

/// A pod the runtime runs.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The runtime's sandbox ID.
    pub id: String,
    /// The pod's address (the primary plugin's, from PodSandboxStatus).
    pub ip: Ipv4Addr,
    /// The network namespace the runtime created (and passed to the CNI plugins).
    pub netns: PathBuf,
    config: cri::PodSandboxConfig,
    /// Its containers' IDs by name.
    pub containers: std::collections::BTreeMap<String, String>,
}

/// A pod as the kubelet knows it.
#[derive(Debug, Clone)]
pub struct RuntimePod {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The node it is scheduled to.
    pub node: String,
    /// `metadata.uid`.
    pub uid: String,
    /// Its service account, labels, ports and command, as the simulator describes pods.
    pub spec: PodSpec,
    /// Its pod-level cgroup in the v2 hierarchy (`.../kubepods/besteffort/pod<uid>`).
    pub cgroup: PathBuf,
    /// The same, relative to the hierarchies' roots: the sandbox's cgroup parent.
    cgroup_parent: String,
    /// Where the runtime writes its containers' logs.
    pub log_dir: PathBuf,
    /// Once the runtime has started it.
    pub sandbox: Option<Sandbox>,
    attempts: u32,
}

impl RuntimePod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The running sandbox, or an error naming the pod.
    pub fn sandbox(&self) -> Result<&Sandbox> {
        self.sandbox
            .as_ref()
            .ok_or_else(|| anyhow!("pod {} has no sandbox", self.key()))
    }
}

/// How a container that ran to completion ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Its exit status.
    pub exit_code: i32,
    /// What it wrote to stdout, from its log.
    pub stdout: String,
    /// What it wrote to stderr, from its log.
    pub stderr: String,
}

/// The stdout and stderr lines of a CRI container log (`<time> <stream> <tag> <line>`).
fn parse_cri_log(text: &str) -> (String, String) {
    let (mut out, mut err) = (String::new(), String::new());
    for line in text.lines() {
        let mut f = line.splitn(4, ' ');
        let (Some(_time), Some(stream), Some(tag), message) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let target = if stream == "stderr" {
            &mut err
        } else {
            &mut out
        };
        target.push_str(message.unwrap_or(""));
        // `F`: the line is complete; `P`: a partial line continues in the next record.
        if tag == "F" {
            target.push('\n');
        }
    }
    (out, err)
}

// === The cluster ===

/// The simulator's nodes, controller and agents, with the pods run by a containerd per node.
pub struct RuntimeCluster {
    /// The network, controller and agents.
    pub cluster: Cluster,
    /// Each node's containerd, in node order.
    pub runtimes: Vec<NodeRuntime>,
    /// The pods as the kubelet knows them.
    pub pods: Vec<RuntimePod>,
    /// The image archive every node's runtime imported.
    pub images: PathBuf,
    /// The cgroup v2 mount and the cgroup v1 hierarchies (runc creates pods' cgroups in all).
    hierarchies: Vec<PathBuf>,
    torn_down: bool,
}

impl RuntimeCluster {
    /// Brings up the simulator's network, controller and agents for `nodes` (none with pods),
    /// builds the images once, and starts a containerd on every node with the primary network
    /// configuration (bridge + host-local). The `mesh-cni` plugin is not installed yet: see
    /// [`RuntimeCluster::install_plugin`]. `progress` is told each step.
    pub fn up(
        prefix: &str,
        nodes: &[&str],
        resources: &Path,
        bins: Binaries,
        progress: &mut dyn FnMut(&str),
    ) -> Result<RuntimeCluster> {
        let spec = ClusterSpec {
            nodes: nodes
                .iter()
                .map(|n| NodeSpec {
                    name: n.to_string(),
                    pods: vec![],
                })
                .collect(),
            enrollment: Enrollment::Cni,
        };
        // The agents look for pinned network namespaces where the runtimes pin them.
        let state = Names {
            prefix: prefix.into(),
        }
        .state_dir();
        let agent_args: Vec<String> = nodes
            .iter()
            .map(|n| {
                let (_, netns) = NodeRuntime::paths(&state, n);
                format!("--netns-dir={}", netns.display())
            })
            .collect();
        let cluster = Cluster::up(prefix, &spec, resources, bins, &agent_args, &[], progress)?;
        let mut hierarchies = vec![mesh_datapath::cgroup::v2_mount().context("cgroup v2")?];
        hierarchies.extend(crate::cluster::cgroup_v1_mounts());
        let mut rc = RuntimeCluster {
            images: cluster.state.join("images/images.tar"),
            cluster,
            runtimes: vec![],
            pods: vec![],
            hierarchies,
            torn_down: false,
        };
        progress("images (mesh-demo and its pause image)");
        image::build(
            &rc.cluster.bins.apps.join("mesh-demo"),
            &rc.cluster.state.join("images"),
        )
        .context("build the test images")?;
        for node in &rc.cluster.nodes {
            progress(&format!("containerd on {}", node.name));
            let rt = NodeRuntime::start(&rc.cluster, node, &rc.images)?;
            rc.runtimes.push(rt);
        }
        Ok(rc)
    }

    /// The runtime of `node`.
    pub fn runtime(&self, node: &str) -> Result<&NodeRuntime> {
        self.runtimes
            .iter()
            .find(|r| r.node == node)
            .ok_or_else(|| anyhow!("no runtime on node {node:?}"))
    }

    /// What `mesh-cni install` does on `node`: the plugin's binary into the runtime's CNI
    /// binary directory, its entry (the node agent's socket) appended to the conflist the
    /// runtime reads. Returns once the runtime has loaded the new configuration.
    pub fn install_plugin(&self, node: &str) -> Result<PathBuf> {
        let rt = self.runtime(node)?;
        mesh_cni::install::install_binary(&self.cluster.bins.cni, &rt.bin_dir)
            .context("install the mesh-cni binary")?;
        let entry = json!({
            "type": mesh_cni::PLUGIN_TYPE,
            "agentSocket": self.cluster.cni_socket(node),
            "timeoutSeconds": 20,
        });
        let file = mesh_cni::install(&rt.conf_dir, &entry).context("install mesh-cni")?;
        rt.wait_cni_config(true)?;
        Ok(file)
    }

    /// What `mesh-cni uninstall` does on `node`; the files it changed. Returns once the
    /// runtime has loaded the configuration without the plugin.
    pub fn uninstall_plugin(&self, node: &str) -> Result<Vec<PathBuf>> {
        let rt = self.runtime(node)?;
        let changed = mesh_cni::uninstall(&rt.conf_dir).context("uninstall mesh-cni")?;
        rt.wait_cni_config(false)?;
        Ok(changed)
    }

    /// The pod `key` (`namespace/name`).
    pub fn pod(&self, key: &str) -> Result<&RuntimePod> {
        self.pods
            .iter()
            .find(|p| p.key() == key)
            .ok_or_else(|| anyhow!("no pod {key:?} in the cluster"))
    }

    fn pod_index(&self, key: &str) -> Result<usize> {
        self.pods
            .iter()
            .position(|p| p.key() == key)
            .ok_or_else(|| anyhow!("no pod {key:?} in the cluster"))
    }

    /// Writes the pods' Namespace and Pod objects into the controller's directory.
    fn write_pods(&self) -> Result<()> {
        let objects = self.pods.iter().map(|p| PodObject {
            namespace: &p.namespace,
            name: &p.name,
            uid: &p.uid,
            node: &p.node,
            spec: &p.spec,
            place: None,
            ip: p.sandbox.as_ref().map(|s| s.ip),
        });
        write_atomic(
            &self.cluster.state.join("resources/zz-runtime-pods.yaml"),
            &pod_objects_yaml(objects),
        )
    }

    /// What the API server and the kubelet do before a pod's sandbox: the Pod object
    /// (scheduled to `node`, Pending) and the pod's cgroup.
    pub fn add_pod(&mut self, node: &str, spec: PodSpec) -> Result<()> {
        self.runtime(node)?;
        let key = format!("{}/{}", spec.namespace, spec.name);
        ensure!(self.pod(&key).is_err(), "pod {key} exists");
        let uid = pod_uid(
            &self.cluster.names.prefix,
            node,
            &spec.namespace,
            &spec.name,
        );
        let v2 = &self.hierarchies[0];
        let cgroup = self
            .cluster
            .cgroup_root()
            .join(format!("kubepods/besteffort/pod{uid}"));
        let relative = cgroup
            .strip_prefix(v2)
            .with_context(|| format!("{} is not below {}", cgroup.display(), v2.display()))?;
        std::fs::create_dir_all(&cgroup).with_context(|| format!("create {}", cgroup.display()))?;
        self.pods.push(RuntimePod {
            log_dir: self
                .cluster
                .state
                .join(format!("pods/{}_{}_{uid}", spec.namespace, spec.name)),
            cgroup_parent: format!("/{}", relative.display()),
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            node: node.to_string(),
            uid,
            spec,
            cgroup,
            sandbox: None,
            attempts: 0,
        });
        self.write_pods()
    }

    /// What the kubelet does to start pod `key`: RunPodSandbox (the CNI plugins run in it,
    /// `mesh-cni` last), the pod's address into its Pod object, then the pod's command (if it
    /// has one) as its container, waiting until it listens on the pod's declared ports. On
    /// failure the pod stays Pending and can be started again.
    pub fn start_pod(&mut self, key: &str) -> Result<()> {
        let j = self.pod_index(key)?;
        self.pods[j].attempts += 1;
        let pod = &self.pods[j];
        let rt = self.runtime(&pod.node)?;
        std::fs::create_dir_all(&pod.log_dir)?;
        let config = cri::sandbox_config(
            &pod.namespace,
            &pod.name,
            &pod.uid,
            pod.attempts - 1,
            &pod.log_dir,
            &pod.cgroup_parent,
        );
        let id = rt
            .cri
            .run_pod_sandbox(&config)
            .with_context(|| format!("start pod {key} on {}", pod.node))?;
        let status = rt.cri.pod_sandbox_status(&id)?;
        ensure!(
            status.ready,
            "the sandbox of {key} is not ready after RunPodSandbox"
        );
        let ip: Ipv4Addr = status.ip.parse().with_context(|| {
            format!("the sandbox of {key} has no IPv4 address ({:?})", status.ip)
        })?;
        let netns = status
            .netns
            .with_context(|| format!("the runtime does not say where {key}'s netns is"))?;
        self.pods[j].sandbox = Some(Sandbox {
            id,
            ip,
            netns,
            config,
            containers: Default::default(),
        });
        // The kubelet reports the address; the controller makes it an endpoint.
        self.write_pods()?;
        let pod = &self.pods[j];
        if pod.spec.run.is_empty() {
            return Ok(());
        }
        let argv = pod.spec.command(ip);
        let container = self.run_container(key, "app", &argv)?;
        self.wait_listening(key, &container)
    }

    /// [`RuntimeCluster::add_pod`], then [`RuntimeCluster::start_pod`].
    pub fn run_pod(&mut self, node: &str, spec: PodSpec) -> Result<()> {
        let key = format!("{}/{}", spec.namespace, spec.name);
        self.add_pod(node, spec)?;
        self.start_pod(&key)
    }

    /// Creates and starts a container named `name` running `argv` in pod `key`; its ID.
    pub fn run_container(&mut self, key: &str, name: &str, argv: &[String]) -> Result<String> {
        let j = self.pod_index(key)?;
        let pod = &self.pods[j];
        let sandbox = pod.sandbox()?;
        ensure!(
            !sandbox.containers.contains_key(name),
            "pod {key} already has a container {name}"
        );
        let rt = self.runtime(&pod.node)?;
        let config = cri::container_config(name, image::APP_IMAGE, argv, &format!("{name}.log"));
        let id = rt
            .cri
            .create_container(&sandbox.id, &config, &sandbox.config)
            .with_context(|| format!("create container {name} of {key}"))?;
        rt.cri
            .start_container(&id)
            .with_context(|| format!("start container {name} of {key}"))?;
        if let Some(sandbox) = self.pods[j].sandbox.as_mut() {
            sandbox.containers.insert(name.to_string(), id.clone());
        }
        Ok(id)
    }

    /// Waits until every port pod `key` declares has a listening socket in its network
    /// namespace, while its container `container` runs.
    fn wait_listening(&self, key: &str, container: &str) -> Result<()> {
        let pod = self.pod(key)?;
        let netns = &pod.sandbox()?.netns;
        let rt = self.runtime(&pod.node)?;
        let deadline = Instant::now() + LISTEN_LIMIT;
        loop {
            let listening = listening_ports(netns)?;
            let missing: Vec<u16> = pod
                .spec
                .ports
                .iter()
                .copied()
                .filter(|p| !listening.contains(p))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            let status = rt.cri.container_status(container)?;
            if cri::exited(&status) || Instant::now() > deadline {
                let log = std::fs::read_to_string(pod.log_dir.join("app.log")).unwrap_or_default();
                bail!(
                    "the container of pod {key} {} without listening on {missing:?}; its log:\n{}",
                    if cri::exited(&status) {
                        format!("exited ({})", status.exit_code)
                    } else {
                        format!("ran for {} s", LISTEN_LIMIT.as_secs())
                    },
                    parse_cri_log(&log).0 + &parse_cri_log(&log).1
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to `limit`) until container `name` of pod `key` exits; how it ended.
    pub fn wait_finished(&self, key: &str, name: &str, limit: Duration) -> Result<Finished> {
        let pod = self.pod(key)?;
        let id = pod
            .sandbox()?
            .containers
            .get(name)
            .with_context(|| format!("pod {key} has no container {name}"))?;
        let rt = self.runtime(&pod.node)?;
        let deadline = Instant::now() + limit;
        let status = loop {
            let status = rt.cri.container_status(id)?;
            if cri::exited(&status) {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "container {name} of {key} still runs after {} s",
                limit.as_secs()
            );
            thread::sleep(Duration::from_millis(50));
        };
        let log_path = pod.log_dir.join(format!("{name}.log"));
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let (stdout, stderr) = parse_cri_log(&log);
        Ok(Finished {
            exit_code: status.exit_code,
            stdout,
            stderr,
        })
    }

    /// What the kubelet does when pod `key` is deleted: StopPodSandbox (the containers stop,
    /// the CNI plugins' DEL runs), RemovePodSandbox, the pod's cgroups; then the API server
    /// forgets the Pod object.
    pub fn delete_pod(&mut self, key: &str) -> Result<()> {
        let j = self.pod_index(key)?;
        let pod = &self.pods[j];
        let rt = self.runtime(&pod.node)?;
        if let Some(sandbox) = &pod.sandbox {
            rt.cri.stop_pod_sandbox(&sandbox.id)?;
            rt.cri.remove_pod_sandbox(&sandbox.id)?;
        }
        for mount in &self.hierarchies {
            crate::remove_cgroup(&mount.join(pod.cgroup_parent.trim_start_matches('/')));
        }
        self.pods.remove(j);
        self.write_pods()
    }

    /// The last lines of `node`'s containerd log, for failure messages.
    pub fn runtime_log(&self, node: &str) -> String {
        self.runtime(node)
            .map(|r| r.log_tail(30))
            .unwrap_or_default()
    }

    /// Tears everything down; also done on drop.
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Ok(());
        }
        for rt in &mut self.runtimes {
            rt.stop();
        }
        // The cluster's teardown kills what is left in its cgroups (shims, containers),
        // unmounts what the runtimes left under the state directory and removes it.
        self.cluster.teardown()
    }
}

impl Drop for RuntimeCluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("runtime cluster: teardown: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_logs_are_split_by_stream_and_joined_across_partial_records() {
        let log = "2026-01-01T00:00:00.1Z stdout F echo hello\n\
                   2026-01-01T00:00:00.2Z stderr P connect_refused: \n\
                   2026-01-01T00:00:00.3Z stderr F refused\n\
                   2026-01-01T00:00:00.4Z stdout F \n";
        let (out, err) = parse_cri_log(log);
        assert_eq!(out, "echo hello\n\n");
        assert_eq!(err, "connect_refused: refused\n");
    }
}
