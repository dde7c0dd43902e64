//! A simulated cluster on one Linux machine: every node and every pod is a network namespace,
//! every pod has its own cgroup v2, the controller runs on a directory of Kubernetes YAML, and
//! one agent per node runs inside that node's namespace.
//!
//! Topology (all addresses are private to the namespaces this module creates):
//!
//! ```text
//!   <p>-fabric: bridge br0 10.90.0.1/24, the controller on 10.90.0.1:15012
//!      |  veth per node
//!   <p>-<node>: eth0 10.90.0.(10+i)/24, bridge cni0 10.244.(i+1).1/24, forwarding on,
//!      |        a route to every other node's pod CIDR via that node's eth0, the agent
//!      |  veth per pod
//!   <p>-<node>-<pod>: eth0 10.244.(i+1).(10+j)/24, default via 10.244.(i+1).1, the app
//! ```
//!
//! Services get VIPs from 10.96.0.0/16 in their YAML; nothing routes them, only the mesh
//! resolves them. Everything carries the prefix `<p>` (namespaces, the cgroup subtree
//! `mesh-sim-<p>`, the agents' pinned state `<p>-<node>`, the state directory), so
//! [`cleanup`] removes what a killed run left behind.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader, Read},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::sched::{CloneFlags, setns};
use serde::Deserialize;

mod objects;

pub use objects::{PodObject, node_objects_yaml, pod_objects_yaml, write_atomic};

/// The fabric's address: the bridge joining the nodes, and the controller.
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 1);
/// The controller's gRPC port.
pub const CONTROLLER_PORT: u16 = 15012;
/// Where the agents' admin endpoint listens inside each node's namespace.
pub const AGENT_ADMIN: &str = "127.0.0.1:15000";
/// What the agents capture: pod CIDRs and service VIPs.
pub const CAPTURE: [&str; 2] = ["10.244.0.0/16", "10.96.0.0/16"];
/// The bootstrap token of every simulated node.
const TOKEN: &str = "mesh-sim-bootstrap-token-0123456789";
const MAX_NODES: usize = 200;
const MAX_PODS_PER_NODE: usize = 240;

// === The description ===

/// `cluster.yaml`: the nodes and their pods.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub nodes: Vec<NodeSpec>,
    /// How pods join the mesh; see [`Enrollment`].
    #[serde(default)]
    pub enrollment: Enrollment,
}

/// How the simulated pods join the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enrollment {
    /// The Pod objects name each pod's cgroup and network namespace (annotations) and the
    /// agents enroll them from the controller's configuration (`--enroll-from-config`).
    #[default]
    Config,
    /// As on a real node: each pod's cgroup is a kubelet's (named for its UID, below
    /// `kubepods.slice`), the Pod objects name no place and have no address until the pod's
    /// network is set up, and the simulator calls the `mesh-cni` plugin as a container runtime
    /// does (ADD before the pod's command starts, DEL when it goes). The agents run with
    /// `--discover-pods` and no `--capture`: what they capture comes from the cluster (Node
    /// objects with each node's pod CIDR, the controller's `--service-cidr`). A
    /// [`crate::runtime::RuntimeCluster`] runs its nodes so, with no simulated pods: a real
    /// container runtime starts its pods and runs the plugin.
    Cni,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    /// Defaults to `default`.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `strict` (default) or `permissive`: the pod's `mesh.io/tls-mode`.
    #[serde(default)]
    pub tls_mode: Option<String>,
    /// The ports the pod's application listens on (the containers' ports): inbound TCP to them
    /// is steered to the node proxy, which applies the pod's TLS mode and policy. The pod is
    /// started once each of them has a listening socket in the pod's network namespace.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// More annotations of the Pod object (e.g. `mesh.io/exclude-inbound-ports`).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// A port the kubelet would probe (a `tcpSocket` readiness probe in the Pod object).
    #[serde(default)]
    pub probe_port: Option<u16>,
    /// The command the pod runs (program and arguments), any program: `{pod}` and `{ip}` are
    /// replaced by the pod's name and address, its output goes to the pod's log. Empty: the
    /// pod runs nothing (a client shell).
    #[serde(default)]
    pub run: Vec<String>,
}

impl PodSpec {
    /// The pod's command (`run`) with `{pod}` and `{ip}` replaced by its name and `ip`.
    pub fn command(&self, ip: Ipv4Addr) -> Vec<String> {
        self.run
            .iter()
            .map(|a| {
                a.replace("{pod}", &self.name)
                    .replace("{ip}", &ip.to_string())
            })
            .collect()
    }
}

impl ClusterSpec {
    pub fn parse(yaml: &str) -> Result<ClusterSpec> {
        let spec: ClusterSpec =
            serde_yaml_ng::from_str(yaml).context("cluster description is not valid")?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<()> {
        ensure!(!self.nodes.is_empty(), "nodes: at least one node is needed");
        ensure!(
            self.nodes.len() <= MAX_NODES,
            "nodes: at most {MAX_NODES} nodes"
        );
        let mut nodes = BTreeSet::new();
        let mut pods = BTreeSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            dns_label(&node.name).with_context(|| format!("nodes[{i}].name"))?;
            ensure!(
                node.name.len() <= 20,
                "nodes[{i}].name: {:?} is longer than 20 characters",
                node.name
            );
            ensure!(
                nodes.insert(node.name.as_str()),
                "nodes[{i}].name: {:?} appears twice",
                node.name
            );
            ensure!(
                node.pods.len() <= MAX_PODS_PER_NODE,
                "nodes[{i}].pods: at most {MAX_PODS_PER_NODE} pods per node"
            );
            for (j, pod) in node.pods.iter().enumerate() {
                let at = format!("nodes[{i}].pods[{j}]");
                dns_label(&pod.namespace).with_context(|| format!("{at}.namespace"))?;
                dns_label(&pod.name).with_context(|| format!("{at}.name"))?;
                if let Some(sa) = &pod.service_account {
                    dns_label(sa).with_context(|| format!("{at}.serviceAccount"))?;
                }
                for port in &pod.ports {
                    ensure!(
                        *port != 0 && ![15001, 15006, 15008, 15000, 15020].contains(port),
                        "{at}.ports: {port} is 0 or a port the mesh uses"
                    );
                }
                if let Some(mode) = &pod.tls_mode {
                    ensure!(
                        mode == "strict" || mode == "permissive",
                        "{at}.tlsMode: {mode:?} is not strict or permissive"
                    );
                }
                ensure!(
                    pods.insert((pod.namespace.as_str(), pod.name.as_str())),
                    "{at}: pod {}/{} appears twice",
                    pod.namespace,
                    pod.name
                );
            }
        }
        Ok(())
    }
}

fn dns_label(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    ensure!(
        ok,
        "{s:?} is not a DNS label (lowercase letters, digits, '-', at most 63)"
    );
    Ok(())
}

// === Names ===

/// The names of everything one cluster creates.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn fabric(&self) -> String {
        format!("{}-fabric", self.prefix)
    }
    pub fn node(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }
    pub fn pod(&self, node: &str, ns: &str, pod: &str) -> String {
        format!("{}-{node}-{ns}-{pod}", self.prefix)
    }
    pub fn instance(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }
    pub fn cgroup_root(&self, mount: &Path) -> PathBuf {
        mount.join(format!("mesh-sim-{}", self.prefix))
    }
    pub fn state_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("mesh-sim-{}", self.prefix))
    }
}

// === Commands ===

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {}", args[0]))?;
    ensure!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn ip(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["ip", "-n", ns];
    all.extend_from_slice(args);
    run(&all)
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ])
}

/// A command that runs inside `cgroup` (joined first) and the network namespace at `netns`.
pub fn command_in(program: &Path, cgroup: &Path, netns: &Path) -> Result<Command> {
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("open {}/cgroup.procs", cgroup.display()))?;
    let ns = fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec only write(2) and setns(2), both async-signal-safe, on
    // descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            use std::io::Write as _;
            use std::os::fd::AsFd as _;
            let mut f = &procs;
            f.write_all(b"0")?;
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    Ok(cmd)
}

/// A process of the cluster with its output going to a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if it still runs after `grace`: a clean exit when it can.
    pub fn stop(&mut self, grace: Duration) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Whether it has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Starts `cmd` with stderr to `log`, and waits for a stdout line starting with `ready`.
fn spawn_ready(mut cmd: Command, log: &Path, ready: &str, limit: Duration) -> Result<Proc> {
    let err = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(err)
        .stdin(Stdio::null())
        .spawn()
        .context("spawn")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let log_path = log.to_path_buf();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = tx.send(first.and_then(Result::ok));
        // Keep draining stdout into the log so the process never blocks on a full pipe.
        let mut rest = String::new();
        for line in lines.map_while(Result::ok) {
            rest.push_str(&line);
            rest.push('\n');
            if let Ok(mut f) = fs::OpenOptions::new().append(true).open(&log_path) {
                use std::io::Write as _;
                let _ = f.write_all(rest.as_bytes());
                rest.clear();
            }
        }
    });
    let mut proc = Proc {
        child,
        log: log.to_path_buf(),
    };
    match rx.recv_timeout(limit) {
        Ok(Some(line)) if line.starts_with(ready) => Ok(proc),
        other => {
            proc.kill();
            bail!(
                "did not report {ready:?} (got {other:?}); last lines of {}:\n{}",
                log.display(),
                proc.tail(30)
            )
        }
    }
}

/// How long a pod's application may take to listen on its declared ports.
const APP_READY_LIMIT: Duration = Duration::from_secs(20);

/// Starts a pod's command (or any long-running program) with stdout and stderr to `log`.
pub fn spawn_app(mut cmd: Command, log: &Path) -> Result<Proc> {
    let out = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone().context("the log's descriptor")?;
    let child = cmd
        .stdout(out)
        .stderr(err)
        .stdin(Stdio::null())
        .spawn()
        .context("spawn")?;
    Ok(Proc {
        child,
        log: log.to_path_buf(),
    })
}

/// Waits until every port `pod` declares has a listening TCP socket (IPv4 or IPv6) in the
/// pod's network namespace, whichever process of the pod opened it. With no port declared,
/// the command only has to be running. Kills the command on failure.
fn wait_listening(mut proc: Proc, pod: &Pod, limit: Duration) -> Result<Proc> {
    let netns = pod.netns_path();
    let wanted: BTreeSet<u16> = pod.spec.ports.iter().copied().collect();
    let deadline = Instant::now() + limit;
    let mut missing: BTreeSet<u16>;
    loop {
        if let Some(status) = proc.child.try_wait().context("wait for the application")? {
            bail!(
                "the application of pod {} exited ({status}) before listening on its ports {:?}; \
                 last lines of {}:\n{}",
                pod.key(),
                pod.spec.ports,
                proc.log.display(),
                proc.tail(30)
            );
        }
        if wanted.is_empty() {
            return Ok(proc);
        }
        let listening = listening_ports(&netns)?;
        missing = wanted.difference(&listening).copied().collect();
        if missing.is_empty() {
            return Ok(proc);
        }
        if Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    proc.kill();
    bail!(
        "the application of pod {} did not listen on its ports {:?} within {} s (not listening: \
         {missing:?}); last lines of {}:\n{}",
        pod.key(),
        pod.spec.ports,
        limit.as_secs(),
        proc.log.display(),
        proc.tail(30)
    )
}

/// The TCP ports with a listening socket in the network namespace at `netns`, from the
/// kernel's socket tables as a thread inside that namespace sees them.
pub fn listening_ports(netns: &Path) -> Result<BTreeSet<u16>> {
    let file = fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    thread::scope(|s| {
        s.spawn(|| -> Result<BTreeSet<u16>> {
            use std::os::fd::AsFd as _;
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("enter {}", netns.display()))?;
            let mut ports = BTreeSet::new();
            for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
                // A kernel without IPv6 has no tcp6 table.
                let Ok(text) = fs::read_to_string(table) else {
                    continue;
                };
                ports.extend(parse_listening(&text));
            }
            Ok(ports)
        })
        .join()
        .map_err(|_| anyhow!("the thread reading the socket tables panicked"))?
    })
}

/// The local ports of the LISTEN (state `0A`) rows of a `/proc/net/tcp` or `tcp6` table.
fn parse_listening(table: &str) -> impl Iterator<Item = u16> + '_ {
    table.lines().skip(1).filter_map(|row| {
        let mut fields = row.split_whitespace();
        let local = fields.nth(1)?;
        let state = fields.nth(1)?;
        (state == "0A").then_some(())?;
        let port = local.rsplit_once(':')?.1;
        u16::from_str_radix(port, 16).ok()
    })
}

// === The cluster ===

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub agent: PathBuf,
    pub controller: PathBuf,
    /// The CNI plugin (`enrollment: cni`).
    pub cni: PathBuf,
    /// Directory a pod command's program (its first word) is looked up in before PATH (the
    /// demo applications); a program the command itself runs is looked up in PATH only.
    pub apps: PathBuf,
}

impl Binaries {
    /// Every binary in `dir` (a target directory's profile directory).
    pub fn in_dir(dir: &Path) -> Binaries {
        Binaries {
            agent: dir.join("mesh-agent"),
            controller: dir.join("mesh-controller"),
            cni: dir.join("mesh-cni"),
            apps: dir.to_path_buf(),
        }
    }

    /// The agent and controller given, the demo applications beside them: the `mesh-demo`
    /// package builds its binary into the same target directory.
    pub fn with_apps_beside(agent: PathBuf, controller: PathBuf) -> Result<Binaries> {
        let apps = agent
            .parent()
            .context("the agent binary's directory")?
            .to_path_buf();
        ensure!(
            apps.join("mesh-demo").exists(),
            "{} is missing: build it with `cargo build -p mesh-demo`",
            apps.join("mesh-demo").display()
        );
        Ok(Binaries {
            cni: apps.join("mesh-cni"),
            agent,
            controller,
            apps,
        })
    }
}

/// The demo cluster's description: `deploy/demo/`.
pub fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo")
}

pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    pub cgroup: PathBuf,
    pub spec: PodSpec,
    pub app: Option<Proc>,
    /// `metadata.uid`.
    pub uid: String,
    /// Whether its network is set up (its Pod object has its address).
    pub wired: bool,
}

impl Pod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }
}

pub struct Node {
    pub name: String,
    pub index: usize,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub agent: Option<Proc>,
    pub agent_cgroup: PathBuf,
    /// The last octet of the next pod address (never reused while the cluster runs).
    next_host: u8,
}

pub struct Cluster {
    pub names: Names,
    pub bins: Binaries,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub controller: Option<Proc>,
    pub state: PathBuf,
    cgroup_root: PathBuf,
    pub enrollment: Enrollment,
    /// Extra arguments for every agent, and for the controller.
    agent_args: Vec<String>,
    controller_args: Vec<String>,
    /// Agents replaced by [`Cluster::replace_agent`], draining or exited.
    retired: Vec<Proc>,
    torn_down: bool,
}

impl Cluster {
    /// Brings the cluster up: removes leftovers of the same prefix, builds the network, writes
    /// the controller's directory (the user's `resources` plus a Pod and a Namespace object per
    /// simulated pod), starts the controller, the agents and the pods' applications.
    /// `progress` is told each step.
    pub fn up(
        prefix: &str,
        spec: &ClusterSpec,
        resources: &Path,
        bins: Binaries,
        agent_args: &[String],
        controller_args: &[String],
        progress: &mut dyn FnMut(&str),
    ) -> Result<Cluster> {
        let names = Names {
            prefix: prefix.into(),
        };
        let removed = cleanup(prefix)?;
        if removed > 0 {
            progress(&format!(
                "removed {removed} leftovers of an earlier run ({prefix})"
            ));
        }
        let mount = mesh_datapath::cgroup::v2_mount().context("cgroup v2")?;
        let cgroup_root = names.cgroup_root(&mount);
        fs::create_dir(&cgroup_root)
            .with_context(|| format!("create {}", cgroup_root.display()))?;
        let state = names.state_dir();
        fs::create_dir_all(state.join("resources"))?;
        fs::create_dir_all(state.join("logs"))?;
        let mut cluster = Cluster {
            names,
            bins,
            nodes: vec![],
            pods: vec![],
            controller: None,
            state,
            cgroup_root,
            enrollment: spec.enrollment,
            agent_args: agent_args.to_vec(),
            controller_args: controller_args.to_vec(),
            retired: Vec::new(),
            torn_down: false,
        };
        progress(&format!(
            "network: fabric + {} nodes + {} pods",
            spec.nodes.len(),
            spec.nodes.iter().map(|n| n.pods.len()).sum::<usize>()
        ));
        cluster.build_network(spec)?;
        cluster.write_resources(resources)?;
        progress("controller (local directory source)");
        cluster.start_controller()?;
        for i in 0..cluster.nodes.len() {
            progress(&format!("agent on {}", cluster.nodes[i].name));
            cluster.start_agent(i)?;
        }
        progress("applications");
        for j in 0..cluster.pods.len() {
            cluster.wire(j)?;
            cluster.start_app(j)?;
        }
        Ok(cluster)
    }

    fn build_network(&mut self, spec: &ClusterSpec) -> Result<()> {
        let fabric = self.names.fabric();
        netns_add(&fabric)?;
        ip(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        ip(
            &fabric,
            &["addr", "add", &format!("{CONTROLLER_IP}/24"), "dev", "br0"],
        )?;
        ip(&fabric, &["link", "set", "br0", "up"])?;
        for (i, n) in spec.nodes.iter().enumerate() {
            let ns = self.names.node(&n.name);
            netns_add(&ns)?;
            let node_ip = Ipv4Addr::new(10, 90, 0, 10 + i as u8);
            let port = format!("n{i}");
            ip(
                &ns,
                &[
                    "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &fabric,
                ],
            )?;
            ip(&fabric, &["link", "set", &port, "master", "br0", "up"])?;
            ip(
                &ns,
                &["addr", "add", &format!("{node_ip}/24"), "dev", "eth0"],
            )?;
            ip(&ns, &["link", "set", "eth0", "up"])?;
            ip(&ns, &["link", "add", "cni0", "type", "bridge"])?;
            ip(
                &ns,
                &[
                    "addr",
                    "add",
                    &format!("10.244.{}.1/24", i + 1),
                    "dev",
                    "cni0",
                ],
            )?;
            ip(&ns, &["link", "set", "cni0", "up"])?;
            sysctl(&ns, "net.ipv4.ip_forward", "1")?;
            for (k, _) in spec.nodes.iter().enumerate().filter(|(k, _)| *k != i) {
                ip(
                    &ns,
                    &[
                        "route",
                        "add",
                        &format!("10.244.{}.0/24", k + 1),
                        "via",
                        &format!("10.90.0.{}", 10 + k),
                    ],
                )?;
            }
            let agent_cgroup = self.cgroup_root.join(format!("agent-{}", n.name));
            fs::create_dir(&agent_cgroup)?;
            self.nodes.push(Node {
                name: n.name.clone(),
                index: i,
                netns: ns,
                ip: node_ip,
                agent: None,
                agent_cgroup,
                next_host: 10,
            });
            for p in &n.pods {
                self.add_pod_network(i, p)?;
            }
        }
        Ok(())
    }

    fn add_pod_network(&mut self, i: usize, p: &PodSpec) -> Result<()> {
        ensure!(
            self.nodes[i].next_host < 250,
            "node {} has no pod address left",
            self.nodes[i].name
        );
        let j = usize::from(self.nodes[i].next_host);
        self.nodes[i].next_host += 1;
        let node = &self.nodes[i];
        let ns = self.names.pod(&node.name, &p.namespace, &p.name);
        netns_add(&ns)?;
        let pod_ip = Ipv4Addr::new(10, 244, i as u8 + 1, j as u8);
        let port = format!("p{j}");
        ip(
            &ns,
            &[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &node.netns,
            ],
        )?;
        ip(&node.netns, &["link", "set", &port, "master", "cni0", "up"])?;
        ip(
            &ns,
            &["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"],
        )?;
        ip(&ns, &["link", "set", "eth0", "up"])?;
        ip(
            &ns,
            &[
                "route",
                "add",
                "default",
                "via",
                &format!("10.244.{}.1", i + 1),
            ],
        )?;
        let uid = pod_uid(&self.names.prefix, &node.name, &p.namespace, &p.name);
        let cgroup = match self.enrollment {
            Enrollment::Config => self
                .cgroup_root
                .join(format!("pod-{}-{}-{}", node.name, p.namespace, p.name)),
            // The kubelet's layout (systemd driver, best-effort class), under the prefix.
            Enrollment::Cni => self
                .cgroup_root
                .join(format!("kubepods-{}.slice", node.name))
                .join(format!("kubepods-{}-besteffort.slice", node.name))
                .join(format!(
                    "kubepods-besteffort-pod{}.slice",
                    uid.replace('-', "_")
                )),
        };
        fs::create_dir_all(&cgroup)?;
        self.pods.push(Pod {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            node: node.name.clone(),
            ip: pod_ip,
            netns: ns,
            cgroup,
            spec: p.clone(),
            app: None,
            uid,
            wired: self.enrollment == Enrollment::Config,
        });
        Ok(())
    }

    /// With `enrollment: cni`, what the runtime does once the pod's network exists: the CNI
    /// plugin's ADD (which returns once the node agent has enrolled a meshed pod), then the
    /// pod's address in its status. Nothing to do otherwise.
    fn wire(&mut self, j: usize) -> Result<()> {
        if self.pods[j].wired {
            return Ok(());
        }
        self.cni(j, "ADD")?;
        self.pods[j].wired = true;
        self.write_pods()
    }

    /// Runs the CNI plugin for pod `j` as a container runtime does, after the primary plugin
    /// (whose result names the pod's address). Its JSON error object on failure.
    pub fn cni(&self, j: usize, command: &str) -> Result<String> {
        let pod = &self.pods[j];
        let node = &self.nodes[self.node_index(&pod.node)?];
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "mesh-sim",
            "type": "mesh-cni",
            "agentSocket": self.cni_socket(&node.name),
            "timeoutSeconds": 20,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": pod.netns_path()}],
                "ips": [{"address": format!("{}/24", pod.ip), "interface": 0}],
            },
        });
        let mut child = Command::new(&self.bins.cni)
            .env("CNI_COMMAND", command)
            .env(
                "CNI_CONTAINERID",
                format!("{}-{}", self.names.prefix, pod.uid),
            )
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
                     K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                    pod.namespace, pod.name, pod.uid, pod.uid
                ),
            )
            .env("CNI_PATH", self.bins.cni.parent().unwrap_or(Path::new("/")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {}", self.bins.cni.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            stdin.write_all(conf.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        ensure!(
            out.status.success(),
            "CNI {command} of {}: {stdout}{}",
            pod.key(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }

    /// Where node `node`'s agent listens for the CNI plugin.
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.state.join(format!("cni-{node}.sock"))
    }

    /// The controller's directory: the user's resources, then generated Namespaces and Pods.
    fn write_resources(&self, resources: &Path) -> Result<()> {
        let dir = self.state.join("resources");
        for entry in
            fs::read_dir(resources).with_context(|| format!("read {}", resources.display()))?
        {
            let path = entry?.path();
            let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if yaml && let Some(name) = path.file_name() {
                fs::copy(&path, dir.join(name))
                    .with_context(|| format!("copy {}", path.display()))?;
            }
        }
        self.write_pods()?;
        fs::write(
            self.state.join("tokens"),
            format!("{TOKEN} * 2999-01-01T00:00:00Z\n"),
        )?;
        fs::write(self.state.join("token"), TOKEN)?;
        Ok(())
    }

    /// Writes the pods' objects into the controller's directory (atomically: the controller
    /// never reads half a file).
    fn write_pods(&self) -> Result<()> {
        write_atomic(
            &self.state.join("resources/zz-cluster-pods.yaml"),
            &self.pods_yaml(),
        )?;
        // Where each pod lives, for `mesh-sim exec` in another process ([`running_pods`]).
        let places: String = self
            .pods
            .iter()
            .map(|p| {
                format!(
                    "{}\t{}\t{}\n",
                    p.key(),
                    p.cgroup.display(),
                    p.netns_path().display()
                )
            })
            .collect();
        write_atomic(&self.state.join(PLACES), &places)
    }

    /// Adds a pod to `node` while the cluster runs: its namespace, cgroup and address, its
    /// Pod object for the controller (the node's agent enrolls it from there), its command.
    pub fn add_pod(&mut self, node: &str, spec: PodSpec) -> Result<()> {
        let i = self.node_index(node)?;
        ensure!(
            self.pod(&format!("{}/{}", spec.namespace, spec.name))
                .is_err(),
            "pod {}/{} exists",
            spec.namespace,
            spec.name
        );
        let one = ClusterSpec {
            nodes: vec![NodeSpec {
                name: node.into(),
                pods: vec![spec.clone()],
            }],
            enrollment: self.enrollment,
        };
        one.validate()?;
        self.add_pod_network(i, &spec)?;
        self.write_pods()?;
        let j = self.pods.len() - 1;
        if let Err(e) = self.wire(j) {
            // As a runtime does: the sandbox goes, the Pod object stays (it retries).
            let _ = run(&["ip", "netns", "del", &self.pods[j].netns]);
            crate::remove_cgroup(&self.pods[j].cgroup);
            let pod = self.pods.remove(j);
            self.write_pods()?;
            return Err(e.context(format!("set up the network of {}", pod.key())));
        }
        self.start_app(j)
    }

    /// Removes a pod while the cluster runs: its Pod object first (the agent unenrolls it and
    /// the service forgets it), then its command, namespace and cgroup.
    pub fn remove_pod(&mut self, key: &str) -> Result<()> {
        let j = self
            .pods
            .iter()
            .position(|p| p.key() == key)
            .ok_or_else(|| anyhow!("no pod {key:?} in the cluster"))?;
        if self.enrollment == Enrollment::Cni {
            if let Some(app) = self.pods[j].app.as_mut() {
                app.kill();
            }
            // The runtime tears the network down before the API server forgets the pod.
            self.cni(j, "DEL")?;
        }
        let mut pod = self.pods.remove(j);
        self.write_pods()?;
        if let Some(mut app) = pod.app.take() {
            app.kill();
        }
        run(&["ip", "netns", "del", &pod.netns])?;
        crate::remove_cgroup(&pod.cgroup);
        Ok(())
    }

    /// Namespace (enrolled) and Pod objects for the simulated pods, as the API server would
    /// hold them.
    pub fn pods_yaml(&self) -> String {
        // The Node objects, with the pod CIDR each node's bridge serves: what the agents
        // capture.
        let nodes = match self.enrollment {
            Enrollment::Cni => node_objects_yaml(
                self.nodes
                    .iter()
                    .map(|n| (n.name.as_str(), format!("10.244.{}.0/24", n.index + 1))),
            ),
            Enrollment::Config => String::new(),
        };
        nodes
            + &pod_objects_yaml(self.pods.iter().map(|p| PodObject {
                namespace: &p.namespace,
                name: &p.name,
                uid: &p.uid,
                node: &p.node,
                spec: &p.spec,
                // Only the simulator's own shortcut names where a pod lives.
                place: match self.enrollment {
                    Enrollment::Config => Some((p.cgroup.clone(), p.netns_path())),
                    Enrollment::Cni => None,
                },
                ip: p.wired.then_some(p.ip),
            }))
    }

    /// The cgroup v2 directory all of this cluster's cgroups are below (`mesh-sim-<prefix>`):
    /// the `--cgroup-root` of a kubelet on any of its nodes.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    pub fn controller_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(CONTROLLER_IP, CONTROLLER_PORT)
    }

    /// Starts (or restarts) the controller in the fabric namespace.
    pub fn start_controller(&mut self) -> Result<()> {
        let cgroup = self.cgroup_root.join("controller");
        if !cgroup.exists() {
            fs::create_dir(&cgroup)?;
        }
        let mut cmd = command_in(
            &self.bins.controller,
            &cgroup,
            &PathBuf::from("/run/netns").join(self.names.fabric()),
        )?;
        cmd.args(["--local-dir"])
            .arg(self.state.join("resources"))
            .arg("--ca-dir")
            .arg(self.state.join("ca"))
            .arg("--bootstrap-tokens")
            .arg(self.state.join("tokens"))
            .args(["--listen", &self.controller_addr().to_string()])
            .args(&self.controller_args);
        if self.enrollment == Enrollment::Cni {
            cmd.arg(format!("--service-cidr={}", CAPTURE[1]));
        }
        let log = self.state.join("logs/controller.log");
        self.controller = Some(
            spawn_ready(cmd, &log, "READY", Duration::from_secs(30))
                .context("start the controller")?,
        );
        Ok(())
    }

    pub fn stop_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            c.kill();
        }
    }

    fn agent_command(&self, i: usize) -> Result<Command> {
        let node = &self.nodes[i];
        let mut cmd = command_in(
            &self.bins.agent,
            &node.agent_cgroup,
            &PathBuf::from("/run/netns").join(&node.netns),
        )?;
        cmd.args(["run", "--instance", &self.names.instance(&node.name)])
            .arg("--cgroup")
            .arg(&node.agent_cgroup)
            .arg(format!("--node={}", node.name))
            .arg(format!("--controller=https://{}", self.controller_addr()))
            .arg(format!(
                "--controller-ca={}",
                self.state.join("ca/ca.crt").display()
            ))
            .arg(format!(
                "--bootstrap-token-file={}",
                self.state.join("token").display()
            ));
        // As on a real node, the cluster says what to capture (the Nodes' pod CIDRs and the
        // controller's service CIDR) with `enrollment: cni`.
        if self.enrollment == Enrollment::Config {
            for c in CAPTURE {
                cmd.arg(format!("--capture={c}"));
            }
        }
        match self.enrollment {
            // The pods come from the controller's configuration (their Pod objects name the
            // cgroup and network namespace), so pods added and removed later follow too.
            Enrollment::Config => {
                cmd.arg("--enroll-from-config");
            }
            Enrollment::Cni => {
                cmd.arg("--discover-pods")
                    .arg("--cni-socket")
                    .arg(self.cni_socket(&node.name));
            }
        }
        cmd.arg("--handover-socket")
            .arg(self.state.join(format!("handover/{}.sock", node.name)));
        cmd.args(&self.agent_args);
        Ok(cmd)
    }

    /// Replaces the agent of node `i` as an upgrade does: a new agent starts beside the
    /// running one and takes its listening sockets over; once the old one says the new one
    /// serves every pod, it is stopped (SIGTERM) and left to drain its open connections
    /// ([`Cluster::wait_retired`]).
    pub fn replace_agent(&mut self, i: usize) -> Result<()> {
        self.replace_agent_with(i, &[])
    }

    /// [`Cluster::replace_agent`] with a new agent started with `extra` arguments besides
    /// the usual ones (other datapath parameters take the path of a new build's programs).
    pub fn replace_agent_with(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let name = self.nodes[i].name.clone();
        let mut old = self.nodes[i]
            .agent
            .take()
            .with_context(|| format!("no agent runs on {name}"))?;
        // The old agent's log moves aside; the new one writes the usual file.
        let aside = self
            .state
            .join(format!("logs/agent-{name}.{}.log", self.retired.len()));
        fs::rename(&old.log, &aside).context("move the old agent's log aside")?;
        old.log = aside;
        let mut cmd = self.agent_command(i)?;
        cmd.args(extra);
        if let Err(e) = self.spawn_agent(i, cmd) {
            self.retired.push(old);
            return Err(e);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fs::read_to_string(&old.log)
            .unwrap_or_default()
            .contains("the successor serves every pod")
        {
            if old.exited().is_some() || Instant::now() > deadline {
                let tail = old.tail(30);
                self.retired.push(old);
                bail!("the old agent of {name} did not hand over; its last lines:\n{tail}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.retired.push(old);
        Ok(())
    }

    /// Waits until every agent replaced so far has exited; their exit statuses and logs.
    pub fn wait_retired(
        &mut self,
        limit: Duration,
    ) -> Result<Vec<(std::process::ExitStatus, PathBuf)>> {
        let deadline = Instant::now() + limit;
        let mut done = Vec::new();
        for old in &mut self.retired {
            loop {
                if let Some(status) = old.exited() {
                    done.push((status, old.log.clone()));
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "a replaced agent still runs; its last lines:\n{}",
                        old.tail(30)
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(done)
    }

    /// Starts (or restarts) the agent of node `i` and waits until it is ready.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let cmd = self.agent_command(i)?;
        self.spawn_agent(i, cmd)
    }

    fn spawn_agent(&mut self, i: usize, cmd: Command) -> Result<()> {
        let log = self
            .state
            .join(format!("logs/agent-{}.log", self.nodes[i].name));
        let proc = spawn_ready(cmd, &log, "READY", Duration::from_secs(60))
            .with_context(|| format!("start the agent of {}", self.nodes[i].name))?;
        self.nodes[i].agent = Some(proc);
        Ok(())
    }

    /// Stops the agent of node `i` as a restart in place does: SIGTERM, then SIGKILL if it
    /// still runs after `grace`.
    pub fn stop_agent(&mut self, i: usize, grace: Duration) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            a.stop(grace);
        }
    }

    /// Kills the agent of node `i` (SIGKILL: its datapath stays pinned, as after a crash).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            a.kill();
        }
    }

    /// Starts pod `j`'s command and waits until it is ready: every declared port has a
    /// listening socket in the pod's network namespace (or, with no port declared, the command
    /// is still running once started). Stock servers need no wrapper.
    fn start_app(&mut self, j: usize) -> Result<()> {
        let pod = &self.pods[j];
        if pod.spec.run.is_empty() {
            return Ok(());
        }
        let argv = pod.spec.command(pod.ip);
        let program = self.program(&argv[0]);
        let mut cmd = command_in(&program, &pod.cgroup, &pod.netns_path())?;
        cmd.args(&argv[1..]);
        let log = self
            .state
            .join(format!("logs/pod-{}-{}.log", pod.namespace, pod.name));
        let proc = spawn_app(cmd, &log)
            .with_context(|| format!("start the application of {}", pod.key()))?;
        let proc = wait_listening(proc, pod, APP_READY_LIMIT)?;
        self.pods[j].app = Some(proc);
        Ok(())
    }

    /// A program name resolved against the applications' directory first.
    fn program(&self, name: &str) -> PathBuf {
        let local = self.bins.apps.join(name);
        if local.exists() {
            local
        } else {
            PathBuf::from(name)
        }
    }

    pub fn pod(&self, key: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.key() == key || p.name == key)
            .ok_or_else(|| anyhow!("no pod {key:?} in the cluster"))
    }

    pub fn node_index(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name:?} in the cluster"))
    }

    /// Runs a command inside a pod (its cgroup and network namespace) and waits for it.
    pub fn exec(&self, pod: &str, argv: &[&str]) -> Result<Output> {
        let p = self.pod(pod)?;
        let mut cmd = command_in(&self.program(argv[0]), &p.cgroup, &p.netns_path())?;
        cmd.args(&argv[1..]);
        cmd.output()
            .with_context(|| format!("run {argv:?} in {}", p.key()))
    }

    /// Runs a command inside a node's namespace (not in any pod).
    pub fn exec_on_node(&self, node: &str, argv: &[&str]) -> Result<Output> {
        let n = &self.nodes[self.node_index(node)?];
        let mut all = vec!["ip", "netns", "exec", &n.netns];
        all.extend_from_slice(argv);
        Command::new(all[0])
            .args(&all[1..])
            .output()
            .with_context(|| format!("run {argv:?} on {node}"))
    }

    /// `GET path` on a node agent's admin endpoint.
    pub fn agent_admin(&self, node: &str, path: &str) -> Result<String> {
        let n = &self.nodes[self.node_index(node)?];
        http_get_in(&n.netns, AGENT_ADMIN, path)
    }

    /// Leaves the cluster running after this process exits; [`cleanup`] removes it.
    pub fn detach(mut self) {
        self.torn_down = true;
    }

    /// Tears everything down; also done on drop.
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    pub(crate) fn teardown(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Ok(());
        }
        for p in &mut self.pods {
            if let Some(mut a) = p.app.take() {
                a.kill();
            }
        }
        for n in &mut self.nodes {
            if let Some(mut a) = n.agent.take() {
                a.stop(Duration::from_secs(3));
            }
        }
        for mut a in self.retired.drain(..) {
            a.stop(Duration::from_secs(3));
        }
        self.stop_controller();
        cleanup(&self.names.prefix).map(|_| ())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("mesh-sim: teardown: {e:#}");
        }
    }
}

// === A cluster another process started ===

/// A pod of a running cluster, as its Pod object in the controller's directory names it.
#[derive(Debug, Clone)]
pub struct RunningPod {
    pub namespace: String,
    pub name: String,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
}

impl RunningPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The simulator's record of where each pod lives (`namespace/name`, cgroup and network
/// namespace, tab-separated), in the state directory.
const PLACES: &str = "places";

/// The pods of the cluster `prefix` that another process brought up (`mesh-sim up`), from the
/// record it keeps of them.
pub fn running_pods(prefix: &str) -> Result<Vec<RunningPod>> {
    let names = Names {
        prefix: prefix.into(),
    };
    let path = names.state_dir().join(PLACES);
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "no simulated cluster {prefix:?} is running here (cannot read {})",
            path.display()
        )
    })?;
    text.lines()
        .map(|line| {
            let mut f = line.split('\t');
            let (Some(key), Some(cgroup), Some(netns), None) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                bail!("{}: malformed line {line:?}", path.display());
            };
            let (namespace, name) = key
                .split_once('/')
                .with_context(|| format!("{}: {key:?} is not namespace/name", path.display()))?;
            Ok(RunningPod {
                namespace: namespace.into(),
                name: name.into(),
                cgroup: cgroup.into(),
                netns: netns.into(),
            })
        })
        .collect()
}

/// The pod `key` (`namespace/name`, or a name no other namespace has) of the running cluster
/// `prefix`.
pub fn running_pod(prefix: &str, key: &str) -> Result<RunningPod> {
    let pods = running_pods(prefix)?;
    let found: Vec<&RunningPod> = pods
        .iter()
        .filter(|p| p.key() == key || p.name == key)
        .collect();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!(
            "no pod {key:?} in the simulated cluster {prefix:?} (its pods: {})",
            pods.iter()
                .map(RunningPod::key)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        more => bail!(
            "{key:?} names {} pods of the simulated cluster {prefix:?}: say namespace/name",
            more.len()
        ),
    }
}

/// A pod's `metadata.uid`: a UUID derived from its names (the same in every run).
pub fn pod_uid(prefix: &str, node: &str, ns: &str, name: &str) -> String {
    use std::hash::{Hash, Hasher};
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (salt, prefix, node, ns, name).hash(&mut h);
        h.finish()
    };
    let (a, b) = (half(1), half(2));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

fn netns_add(name: &str) -> Result<()> {
    run(&["ip", "netns", "add", name])?;
    ip(name, &["link", "set", "lo", "up"])
}

/// A plain HTTP/1.1 GET to `addr` from inside the network namespace `netns`.
pub fn http_get_in(netns: &str, addr: &str, path: &str) -> Result<String> {
    let file = fs::File::open(PathBuf::from("/run/netns").join(netns))
        .with_context(|| format!("open netns {netns}"))?;
    let addr: std::net::SocketAddr = addr.parse().context("address")?;
    let path = path.to_string();
    thread::scope(|s| {
        s.spawn(|| -> Result<String> {
            use std::io::Write as _;
            use std::os::fd::AsFd as _;
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .with_context(|| format!("connect to {addr}"))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                c,
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )?;
            let mut raw = String::new();
            c.read_to_string(&mut raw)?;
            let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
            let status = head.lines().next().unwrap_or_default();
            ensure!(status.contains(" 200 "), "GET {path}: {status}");
            Ok(body.to_string())
        })
        .join()
        .map_err(|_| anyhow!("the request thread panicked"))?
    })
}

/// Removes the cgroup at `path` and every cgroup below it, deepest first; how many.
fn remove_cgroup_tree(path: &Path) -> usize {
    let mut removed = 0;
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                removed += remove_cgroup_tree(&entry.path());
            }
        }
    }
    crate::remove_cgroup(path);
    removed + 1
}

/// The mount points of this process's mount namespace and their file system types.
fn mounts() -> Vec<(PathBuf, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> ..."
            let (left, right) = line.split_once(" - ")?;
            let point = left.split_whitespace().nth(4)?.replace("\\040", " ");
            Some((
                PathBuf::from(point),
                right.split_whitespace().next()?.to_string(),
            ))
        })
        .collect()
}

/// Where the cgroup v1 hierarchies are mounted (none on a cgroup v2 host; every controller's
/// on a hybrid one).
pub fn cgroup_v1_mounts() -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|(_, t)| t == "cgroup")
        .map(|(p, _)| p)
        .collect()
}

/// Unmounts everything mounted below `dir` (a container runtime's root file systems, shared
/// memory and network namespace pins), deepest first; how many.
fn unmount_below(dir: &Path) -> usize {
    let mut points: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in &points {
        if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("could not unmount {}: {e}", p.display());
        }
    }
    points.len()
}

/// The prefixes of the clusters whose state is on this machine and whose prefix starts with
/// `prefix` (a ladder run's steps: `mbench1`, `mbench2`, ...).
pub fn prefixes_starting(prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let own = name.strip_prefix("mesh-sim-")?;
            own.starts_with(prefix).then(|| own.to_string())
        })
        .collect();
    found.sort();
    found
}

/// Removes everything a cluster with `prefix` created: its pods' and agents' processes (by
/// cgroup), network namespaces, cgroups, pinned datapath state and state directory, and what
/// a container runtime run for it left there (processes in the cluster's cgroups, mounts in
/// its state directory, the same cgroup subtree in cgroup v1 hierarchies of a hybrid host).
/// Returns how many objects it removed. Safe to run when nothing is left.
pub fn cleanup(prefix: &str) -> Result<usize> {
    let names = Names {
        prefix: prefix.into(),
    };
    let mut removed = 0;
    if let Ok(mount) = mesh_datapath::cgroup::v2_mount() {
        let root = names.cgroup_root(&mount);
        if root.exists() {
            removed += remove_cgroup_tree(&root);
        }
    }
    // runc (cgroupfs driver) creates a container's cgroups in every v1 hierarchy too; their
    // processes went with the v2 tree.
    for mount in cgroup_v1_mounts() {
        let root = names.cgroup_root(&mount);
        if root.exists() {
            removed += remove_cgroup_tree(&root);
        }
    }
    let own = format!("{prefix}-");
    if let Ok(entries) = fs::read_dir("/sys/fs/bpf/mesh") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&own) {
                mesh_datapath::ebpf::remove_instance(&e.path())
                    .with_context(|| format!("remove {}", e.path().display()))?;
                removed += 1;
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(&own) {
                match run(&["ip", "netns", "del", &name]) {
                    Ok(()) => removed += 1,
                    // Removed meanwhile by the cluster's own teardown.
                    Err(_) if !e.path().exists() => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    removed += crate::runtime::remove_cni_cache(prefix);
    let state = names.state_dir();
    if state.exists() {
        removed += unmount_below(&state);
        fs::remove_dir_all(&state).with_context(|| format!("remove {}", state.display()))?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_with_mistakes_is_refused_with_the_place() {
        for (yaml, expect) in [
            ("nodes: []", "at least one node"),
            ("nodes: [{name: Node1}]", "nodes[0].name"),
            ("nodes: [{name: a}, {name: a}]", "appears twice"),
            (
                "nodes: [{name: a, pods: [{namespace: d, name: x, tlsMode: lax}]}]",
                "tlsMode",
            ),
            (
                "nodes: [{name: a, pods: [{namespace: d, name: x}, {namespace: d, name: x}]}]",
                "pod d/x appears twice",
            ),
            ("nodes: [{name: a, colour: red}]", "not valid"),
        ] {
            let err = format!("{:#}", ClusterSpec::parse(yaml).expect_err(yaml));
            assert!(err.contains(expect), "{yaml}: {err}");
        }
        let ok = ClusterSpec::parse(
            "nodes:\n- name: node-1\n  pods:\n  - {namespace: demo, name: web, serviceAccount: web, labels: {app: web}, run: [mesh-demo, http]}\n",
        )
        .expect("valid");
        assert_eq!(ok.nodes[0].pods[0].run, ["mesh-demo", "http"]);
    }

    #[test]
    fn only_listening_sockets_count_as_a_pod_s_ports() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0A00010A:1F90 0A00010B:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0A00010A:2328 0A00010B:C351 06 00000000:00000000 00:00000000 00000000     0        0 0 3 0 0 0 0 0 0
";
        let v4: Vec<u16> = parse_listening(table).collect();
        assert_eq!(v4, [8080, 15001]);
        let table6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
";
        assert_eq!(parse_listening(table6).collect::<Vec<_>>(), [80]);
    }
}
