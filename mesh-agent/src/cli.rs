//! The `mesh-agent` command line: `run` and the node debugging commands.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};

use mesh_datapath::{
    config::{BPFFS_ROOT, Cidr, DatapathConfig, PodSpec},
    ebpf,
};

use mesh_proxy::{
    config::{ProxyConfig, SameNode},
    l7::HttpConfig,
};

use crate::{
    config::{
        AdminConfig, Config, ConfigError, ControllerSettings, CredentialSource, DEFAULT_ADMIN,
        DEFAULT_METRICS, Listen,
    },
    debug::commands,
};
use mesh_core::http_path::{EscapedSlashes, PathNormalization};

/// Exit status for bad configuration or arguments (EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(name = "mesh-agent", version, about = "Node agent of the mesh")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Debug)]
struct InstanceArgs {
    /// Name of the agent instance (its pinned state is /sys/fs/bpf/mesh/<instance>).
    #[arg(long, default_value = "node")]
    instance: String,
    /// Root of the pinned state.
    #[arg(long, default_value = BPFFS_ROOT)]
    bpffs_root: PathBuf,
}

impl InstanceArgs {
    fn datapath(&self) -> Result<DatapathConfig, crate::config::ConfigError> {
        let mut d = DatapathConfig::new(&self.instance)?;
        d.bpffs_root = self.bpffs_root.clone();
        Ok(d)
    }
}

#[derive(clap::Args, Debug)]
struct ControllerArgs {
    /// The controller, `https://host:port`. Without it the agent runs the datapath and a
    /// transparent proxy only.
    #[arg(long, requires_all = ["node", "controller_ca"])]
    controller: Option<String>,
    /// PEM file of the roots that verify the controller.
    #[arg(long)]
    controller_ca: Option<PathBuf>,
    /// The name in the controller's certificate.
    #[arg(long, default_value = "mesh-controller.mesh-system.svc")]
    controller_name: String,
    /// This node's name.
    #[arg(long)]
    node: Option<String>,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Local mode: file holding the bootstrap token.
    #[arg(long, conflicts_with = "service_account_token_file")]
    bootstrap_token_file: Option<PathBuf>,
    /// Cluster mode: the projected ServiceAccount token.
    #[arg(long)]
    service_account_token_file: Option<PathBuf>,
    /// Whether meshed pods may reach destinations outside the mesh (allow or deny).
    #[arg(long, value_enum, default_value = "allow")]
    egress: mesh_proxy::outbound::Egress,
}

impl ControllerArgs {
    fn settings(&self) -> Result<Option<ControllerSettings>, Failure> {
        let Some(address) = &self.controller else {
            return Ok(None);
        };
        let credential = match (&self.bootstrap_token_file, &self.service_account_token_file) {
            (Some(f), None) => CredentialSource::BootstrapTokenFile(f.clone()),
            (None, Some(f)) => CredentialSource::ServiceAccountTokenFile(f.clone()),
            _ => {
                return Err(usage(
                    "--controller needs --bootstrap-token-file or --service-account-token-file",
                ));
            }
        };
        Ok(Some(ControllerSettings {
            address: address.clone(),
            server_name: self.controller_name.clone(),
            ca_file: self.controller_ca.clone().unwrap_or_default(),
            node: self.node.clone().unwrap_or_default(),
            trust_domain: self.trust_domain.clone(),
            credential,
            egress: self.egress,
        }))
    }
}

/// `--max-inbound-ports-per-pod`: 1 to 4096.
fn max_inbound_ports(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=4096).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number from 1 to 4096")),
    }
}

/// `--skmsg-budget`: bytes, optionally with a binary suffix (`K`, `M`, `G`).
fn skmsg_budget(s: &str) -> Result<u64, String> {
    const MIN: u64 = 64 * 1024;
    const MAX: u64 = 1024 * 1024 * 1024;
    let bad = || format!("{s:?} is not a size from 64K to 1G (bytes, or with a K, M or G suffix)");
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    match n.checked_mul(1 << shift) {
        Some(bytes) if (MIN..=MAX).contains(&bytes) => Ok(bytes),
        _ => Err(bad()),
    }
}

/// `--metrics`: an address or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MetricsListen(Option<SocketAddr>);

fn metrics_listen(s: &str) -> Result<MetricsListen, ConfigError> {
    crate::config::parse_optional_listen(s).map(MetricsListen)
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Admin endpoint: /healthz, /metrics, /debug/conns, /debug/config, /debug/certs. Keep it
    /// on localhost. [default: 127.0.0.1:15000]
    #[arg(long, value_name = "IP:PORT")]
    admin: Option<SocketAddr>,
    /// Prometheus endpoint (/metrics only), or `off`. [default: 0.0.0.0:15020]
    #[arg(long, value_name = "IP:PORT|off", value_parser = metrics_listen)]
    metrics: Option<MetricsListen>,
    /// Close a proxied connection that carried no byte either way for this long.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = crate::config::parse_duration)]
    idle_timeout: Duration,
    /// On SIGTERM, how long open connections get to finish before they are cut.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::config::parse_duration)]
    drain_grace: Duration,
    /// How a connection between two pods of this agent is carried: `in-process` (admitted by
    /// the same identity and policy check, then copied inside the agent, unencrypted since it
    /// never leaves the node) or `hbone` (an mTLS tunnel, as between nodes).
    #[arg(long, value_enum, default_value = "in-process")]
    same_node: SameNode,
    /// On HTTP ports, write the access-log line of one request in N (metrics count every
    /// request; connections are always logged).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    access_log_every: u64,
    /// On HTTP ports, match and forward request paths as sent: no decoding of encoded
    /// unreserved characters, no dot-segment removal (invalid encodings and encoded NUL are
    /// still refused). Loosens security: `/public/../admin/` then passes a `/public/.*` rule.
    #[arg(long)]
    no_normalize_path: bool,
    /// On HTTP ports, keep runs of `/` in request paths instead of merging them.
    #[arg(long)]
    no_merge_slashes: bool,
    /// On HTTP ports, what to do with an encoded `/` or `\` (`%2F`, `%5C`) in a request path:
    /// `reject` (400), `keep` (left encoded, not a separator for policy or routes) or
    /// `unescape` (decoded, then normalized).
    #[arg(long, value_enum, value_name = "ACTION", default_value = "reject")]
    escaped_slashes: EscapedSlashesArg,
    /// Tell refused callers why (TrafficTarget, service account, pod names) in 403 bodies,
    /// gRPC messages and HBONE refusals; by default they get a plain `access denied` and the
    /// reason stays in the access log and metrics. For debugging only.
    #[arg(long)]
    expose_refusal_reasons: bool,
    /// Threads of the agent's runtime: the control loops', and the proxy's unless
    /// --proxy-threads gives it its own. [default: one per CPU the agent may run on]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
    /// Threads of the proxy's own, each serving the connections dealt to it with all their
    /// tasks (fewer cross-thread wake-ups per request); 0: the agent's runtime serves them.
    /// [default: one per CPU the agent may run on]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=1024))]
    proxy_threads: Option<u16>,
    /// Send every L7 request to a pod of another node in a CONNECT tunnel (HTTP nested in
    /// HBONE), never as a stream of the HBONE connection itself, even when the pod's proxy
    /// takes requests so (the default; docs/proxy.md). For comparisons and for debugging.
    #[arg(long)]
    no_request_streams: bool,
}

/// `--escaped-slashes` (mesh-core's type has no clap derive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum EscapedSlashesArg {
    Reject,
    Keep,
    Unescape,
}

impl From<EscapedSlashesArg> for EscapedSlashes {
    fn from(a: EscapedSlashesArg) -> EscapedSlashes {
        match a {
            EscapedSlashesArg::Reject => EscapedSlashes::Reject,
            EscapedSlashesArg::Keep => EscapedSlashes::Keep,
            EscapedSlashesArg::Unescape => EscapedSlashes::Unescape,
        }
    }
}

impl ServeArgs {
    fn admin(&self) -> AdminConfig {
        let listen = |given: Option<SocketAddr>, default| match given {
            Some(addr) => Listen {
                addr,
                explicit: true,
            },
            None => Listen {
                addr: default,
                explicit: false,
            },
        };
        AdminConfig {
            admin: listen(self.admin, DEFAULT_ADMIN),
            metrics: match self.metrics {
                None => Some(listen(None, DEFAULT_METRICS)),
                Some(MetricsListen(given)) => given.map(|a| listen(Some(a), DEFAULT_METRICS)),
            },
        }
    }

    fn proxy(&self) -> ProxyConfig {
        ProxyConfig {
            idle_timeout: self.idle_timeout,
            drain_grace: self.drain_grace,
            same_node: self.same_node,
            access_log_every: self.access_log_every,
            threads: self
                .proxy_threads
                .map_or_else(mesh_proxy::serving::default_threads, usize::from),
            request_streams: !self.no_request_streams,
            http: HttpConfig {
                paths: PathNormalization {
                    normalize_path: !self.no_normalize_path,
                    merge_slashes: !self.no_merge_slashes,
                    escaped_slashes: self.escaped_slashes.into(),
                },
                expose_refusal_reasons: self.expose_refusal_reasons,
            },
        }
    }
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    /// A pod to enroll: name=NS/POD,cgroup=PATH,netns=PATH,ip=A.B.C.D[,iface=eth0]
    /// [,inbound=PORT+PORT][,exclude=PORT+PORT][,mode=strict|permissive]. Repeatable.
    #[arg(long = "pod")]
    pods: Vec<PodSpec>,
    /// Destination prefix the mesh captures (pod CIDRs, service VIPs). Repeatable.
    #[arg(long = "capture")]
    capture: Vec<Cidr>,
    /// Destination port never captured (15008 never is). Repeatable.
    #[arg(long = "exclude-port")]
    excluded_ports: Vec<u16>,
    /// Turn off sk_msg acceleration of the app <-> proxy hop.
    #[arg(long)]
    no_skmsg: bool,
    /// Bytes each direction of an app <-> proxy connection hands over by sk_msg before it
    /// moves to TCP's own path, with TCP's flow control (64 KiB - 1 GiB; suffixes K, M, G).
    #[arg(long, default_value = "4M", value_parser = skmsg_budget)]
    skmsg_budget: u64,
    /// Most inbound port entries (declared plus excluded ports) one pod may take in the
    /// node-wide inbound map (1-4096); a pod asking for more is refused enrollment.
    #[arg(long, default_value_t = mesh_datapath::config::DEFAULT_MAX_INBOUND_PORTS,
          value_parser = max_inbound_ports)]
    max_inbound_ports_per_pod: usize,
    /// cgroup v2 directory the agent moves itself into.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Unenroll every pod on SIGTERM (by default capture survives agent restarts).
    #[arg(long)]
    unenroll_on_exit: bool,
    /// The downward API file of this pod's annotations: once it says
    /// mesh.io/uninstall="true" (set by the chart's pre-delete hook), the agent lets every pod
    /// go, removes everything it pinned and idles (see the uninstall module).
    #[arg(long, value_name = "FILE")]
    uninstall_signal: Option<PathBuf>,
    /// The unix socket through which a running agent hands its listening sockets to the next
    /// one (an upgrade or a restart where the new agent starts first), so no pod is ever
    /// without a listener; `off` to never hand over.
    /// [default: /var/run/mesh/handover/<instance>.sock]
    #[arg(long, value_name = "PATH|off", value_parser = handover_socket)]
    handover_socket: Option<HandoverSocket>,
    /// Also enroll the pods the controller places on this node with a cgroup and network
    /// namespace (annotations mesh.io/cgroup and mesh.io/netns, as the single-machine mesh
    /// writes them), and unenroll them when they go. Needs --controller.
    #[arg(long)]
    enroll_from_config: bool,
    /// Enroll the meshed pods the controller places on this node, found on the node: the CNI
    /// plugin (mesh-cni) hands over each pod the container runtime creates and waits until it
    /// is enrolled; pods already running are found by their UID in the cgroup hierarchy.
    /// What a real node runs. Needs --controller.
    #[arg(long)]
    discover_pods: bool,
    /// The unix socket the CNI plugin asks (with --discover-pods).
    #[arg(long, value_name = "PATH", default_value = mesh_cni::DEFAULT_AGENT_SOCKET)]
    cni_socket: PathBuf,
    /// Where the runtime pins pods' network namespaces (with --discover-pods). Repeatable.
    #[arg(long = "netns-dir", value_name = "DIR", default_values = ["/var/run/netns", "/run/netns"])]
    netns_dirs: Vec<PathBuf>,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    controller: ControllerArgs,
}

/// `--handover-socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HandoverSocket {
    Off,
    At(PathBuf),
}

fn handover_socket(s: &str) -> Result<HandoverSocket, String> {
    if s == "off" {
        return Ok(HandoverSocket::Off);
    }
    let path = PathBuf::from(s);
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(format!(
            "{s:?} is not an absolute path to a socket (or `off`)"
        ));
    }
    Ok(HandoverSocket::At(path))
}

impl RunArgs {
    /// Constructs and validates the configuration.
    fn config(self) -> Result<Config, Failure> {
        let mut datapath = self.instance.datapath().map_err(usage)?;
        datapath.capture = self.capture;
        datapath.excluded_ports = self.excluded_ports;
        datapath.skmsg = !self.no_skmsg;
        datapath.skmsg_budget = self.skmsg_budget;
        datapath.max_inbound_ports = self.max_inbound_ports_per_pod;
        datapath.refuse_native_ipv6 = self.controller.controller.is_some()
            && self.controller.egress == mesh_proxy::outbound::Egress::Deny;
        let cfg = Config {
            datapath,
            controller: self.controller.settings()?,
            cgroup: self.cgroup,
            pods: self.pods,
            unenroll_on_exit: self.unenroll_on_exit,
            uninstall_signal: self.uninstall_signal,
            handover_socket: match self.handover_socket {
                Some(HandoverSocket::Off) => None,
                Some(HandoverSocket::At(path)) => Some(path),
                None => Some(crate::handover::default_socket(&self.instance.instance)),
            },
            enroll_from_config: self.enroll_from_config,
            discover_pods: self.discover_pods.then_some(crate::config::DiscoverPods {
                cni_socket: self.cni_socket,
                netns_dirs: self.netns_dirs,
            }),
            proxy: self.serve.proxy(),
            admin: self.serve.admin(),
            worker_threads: self.serve.worker_threads.map(usize::from),
        };
        cfg.validate().map_err(usage)?;
        Ok(cfg)
    }
}

/// `--admin`: where the commands that ask the running agent find it.
#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// The agent's admin endpoint (what `mesh-agent run --admin` serves).
    #[arg(long, value_name = "IP:PORT", default_value_t = DEFAULT_ADMIN)]
    admin: SocketAddr,
}

#[derive(clap::Args, Debug)]
struct OutputArgs {
    /// `table` for people (fits 100 columns), `json` for machines
    /// (what the admin API answers, so `curl` sees the same).
    #[arg(short, long, value_enum, default_value = "table", verbatim_doc_comment)]
    output: Output,
}

impl OutputArgs {
    fn json(&self) -> bool {
        self.output == Output::Json
    }
}

const EXIT_CODES: &str =
    "Exit status: 0 good news; 1 bad news (unhealthy, denied, failed, not found);
64 bad arguments or a name the agent does not know; 69 no agent answers at --admin; 77 needs root.";

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the datapath, enroll pods and run the proxy until SIGTERM.
    Run(Box<RunArgs>),
    /// Is this node's mesh working? Checked now, not remembered.
    ///
    /// Asks the running agent (GET /debug/status): its version, the kernel and the same
    /// feature check the agent runs at start, the programs attached (asked of the kernel, per
    /// cgroup, namespace and interface), the pinned maps with their entries and capacity, the
    /// controller connection and configuration version, the certificates and the nearest
    /// expiry, and a verdict per enrolled pod. A pod is healthy when the datapath's pod table
    /// has it, the kernel lists the mesh's programs on its cgroup and namespace (the ones the
    /// agent's pinned links hold), a connection from inside the pod's cgroup and network
    /// namespace to a captured destination lands on the proxy's listener, and the proxy
    /// records that connection with the destination it was addressed to. The probe is a real
    /// connection: the proxy refuses it at once (NR, no_such_port); `flows --probes` shows it.
    /// Without an agent, it shows what the kernel still holds (as root).
    #[command(after_help = EXIT_CODES, verbatim_doc_comment)]
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        instance: InstanceArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// The enrolled pods: address, mode, identity, cgroup, netns, counters.
    ///
    /// Each pod as the agent enrolled it, as the datapath's pod table holds it (cgroup id,
    /// netns cookie, mode, packets and bytes received) and as the configuration names it
    /// (identity), with the connections its proxy carries now. Give a pod for all of it.
    #[command(after_help = EXIT_CODES, verbatim_doc_comment)]
    Pods {
        /// One pod, NAMESPACE/NAME (or NAME when unique).
        pod: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Connections the proxy carries now.
    ///
    /// Source and destination (workload, identity or address), direction, path (hbone,
    /// same_node, plaintext, direct), bytes each way and age.
    #[command(after_help = EXIT_CODES, verbatim_doc_comment)]
    Conns {
        /// Only this pod's, NAMESPACE/NAME (or NAME when unique).
        #[arg(long)]
        pod: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// The workload certificates the agent holds.
    ///
    /// Identity, state, serial, issuer, validity and the next rotation of each. Exits 1 when
    /// one is not valid (issuing, failed, expired).
    #[command(after_help = EXIT_CODES, verbatim_doc_comment)]
    Certs {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// A pod's compiled inbound policy, or `policy check`: would a call be allowed?
    ///
    /// `policy POD` shows the rules the controller compiled for the pod from the TrafficTargets
    /// that name it (sources, ports, TCP or HTTP routes), its traffic policy and TLS mode.
    /// `policy check --from F --to T` asks whether a call would be allowed, and why
    /// (see `mesh-agent policy check --help`).
    #[command(
        args_conflicts_with_subcommands = true,
        after_help = EXIT_CODES,
        verbatim_doc_comment
    )]
    Policy {
        #[command(subcommand)]
        check: Option<PolicyCommand>,
        /// The pod whose policy to show, NAMESPACE/NAME (or NAME when unique).
        pod: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Connections as the kernel and the proxy saw them, one line each.
    ///
    /// The kernel's flow events (every inbound connection attempt to an enrolled pod: steered
    /// to the proxy, HBONE, passthrough) and the proxy's record of every connection it ended
    /// (who called whom, the path, bytes, the verdict and the reason of a refusal), joined:
    /// a connection the kernel steered and the proxy carried is one line. With --follow, new
    /// lines as they come until Ctrl-C (with -o json, one JSON record per line).
    #[command(after_help = EXIT_CODES, verbatim_doc_comment)]
    Flows {
        /// Keep printing new records until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Only this pod's, NAMESPACE/NAME (or NAME when unique).
        #[arg(long)]
        pod: Option<String>,
        /// How many of the latest records to start with.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Also show the connections of `status`'s capture probes.
        #[arg(long)]
        probes: bool,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// The datapath's pinned maps, decoded (needs root).
    ///
    /// Without a map: every map with its kind, entries and capacity. With one (its pin name
    /// like PODS_V1, or pods, capture, orig_dst, orig_peer, excluded_ports, socks, inbound,
    /// listeners, pod_counters, counters, sock_budget): its entries, keys and values decoded (addresses,
    /// ports, original destinations, counter names). `get KEY` shows one entry; keys are
    /// written as `list` shows them (IP, IP:PORT, A.B.C.D/LEN, a counter name, ...).
    #[command(after_help = EXIT_CODES, verbatim_doc_comment)]
    Bpf {
        /// The map.
        map: Option<String>,
        #[command(subcommand)]
        action: Option<BpfAction>,
        /// Name of the agent instance (its pinned state is /sys/fs/bpf/mesh/<instance>).
        #[arg(long, default_value = "node", global = true)]
        instance: String,
        /// Root of the pinned state.
        #[arg(long, default_value = BPFFS_ROOT, global = true)]
        bpffs_root: PathBuf,
        /// `table` for people (fits 100 columns), `json` for machines.
        #[arg(short, long, value_enum, default_value = "table", global = true)]
        output: Output,
    },
    /// Preflight of a node: can the datapath run here, and what stands in its way?
    ///
    /// The kernel version, BTF, cgroup v2 and its layout, bpffs, root, the program types and
    /// helpers the programs use (and the verifier's word on every program), the locked-memory
    /// limit, iptables or nftables rules of another mesh, and other programs on the same
    /// hooks. Each failure comes with a fix. Exits 1 when a check fails.
    #[command(after_help = EXIT_CODES, verbatim_doc_comment)]
    Doctor {
        /// Skip loading the programs into the kernel.
        #[arg(long)]
        no_load: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Datapath counters by reason.
    Counters {
        #[command(flatten)]
        instance: InstanceArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Unenroll a pod using the pinned state only.
    Unenroll {
        #[command(flatten)]
        instance: InstanceArgs,
        /// NS/POD as enrolled.
        #[arg(long)]
        name: String,
        #[arg(long)]
        ip: Ipv4Addr,
    },
    /// Remove everything an instance pinned (detaching its programs).
    Clean {
        #[command(flatten)]
        instance: InstanceArgs,
    },
    /// The capture probe of `status`, run inside a pod's cgroup and network namespace.
    #[command(name = "probe-connect", hide = true)]
    ProbeConnect {
        #[arg(long)]
        target: std::net::SocketAddrV4,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Would a call be allowed? The verdict of the proxy's own decision function.
    ///
    /// Evaluates `authorize`, the function the destination's proxy calls, on the compiled
    /// policy of each destination pod on this node, and names the rule that allowed (the
    /// TrafficTarget, the HTTP match) or why none did (the denial's kind is the reason the
    /// proxy's access log and `flows` carry). A service is checked for each of its endpoints
    /// (through its TrafficSplit, if any); pods of other nodes are decided by their agent.
    /// Exits 1 when denied.
    #[command(after_help = EXIT_CODES, verbatim_doc_comment)]
    Check {
        /// The caller: a pod (NAMESPACE/NAME or IP) the configuration knows,
        /// a SPIFFE ID (spiffe://TD/ns/NS/sa/SA), or `plaintext` for a caller outside the mesh.
        #[arg(long, verbatim_doc_comment)]
        from: String,
        /// The destination: a pod or service (NAMESPACE/NAME or IP) with :PORT
        /// (optional for a service with one port).
        #[arg(long, verbatim_doc_comment)]
        to: String,
        /// Check one HTTP request with this path (without the query).
        #[arg(long)]
        path: Option<String>,
        /// The request's method [default: GET].
        #[arg(long)]
        method: Option<String>,
        /// A request header, NAME:VALUE. Repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Subcommand, Debug)]
enum BpfAction {
    /// Every entry (the default).
    List,
    /// One entry.
    Get {
        /// The key, written as `list` shows it.
        key: String,
    },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !matches!(cli.command, Command::Run(_)) {
        // A debugging command piped into `head` ends quietly when the reader goes, as Unix
        // tools do, instead of failing on the write.
        // SAFETY: restoring the default disposition of a signal is always sound; no handler
        // runs Rust code.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(Failure::Usage(msg)) => {
            eprintln!("mesh-agent: {msg}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("mesh-agent: {e:#}");
            ExitCode::FAILURE
        }
        Err(Failure::Exit(e)) => {
            eprintln!("mesh-agent: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

/// The configuration `mesh-agent run ARGS` runs with, checked as the command checks it: for
/// running the agent in-process ([`crate::app::start`]).
pub fn run_config<S: AsRef<str>>(args: &[S]) -> anyhow::Result<Config> {
    let argv = ["mesh-agent", "run"]
        .into_iter()
        .chain(args.iter().map(AsRef::as_ref));
    let cli = Cli::try_parse_from(argv).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Command::Run(args) = cli.command else {
        anyhow::bail!("not `mesh-agent run`");
    };
    args.config().map_err(|f| match f {
        Failure::Usage(msg) => anyhow::anyhow!(msg),
        Failure::Runtime(e) => e,
        Failure::Exit(e) => anyhow::anyhow!(e.message),
    })
}

enum Failure {
    Usage(String),
    Runtime(anyhow::Error),
    Exit(commands::CommandError),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Runtime(e.into())
    }
}

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure::Usage(e.to_string())
}

/// The exit status of a debugging command.
fn done(r: Result<u8, commands::CommandError>) -> Result<ExitCode, Failure> {
    r.map(ExitCode::from).map_err(Failure::Exit)
}

fn dispatch(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::Run(args) => {
            crate::app::run(args.config()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            admin,
            instance,
            output,
        } => {
            let pin_dir = instance.datapath().map_err(usage)?.pin_dir();
            done(commands::status(admin.admin, &pin_dir, output.json()))
        }
        Command::Pods { pod, admin, output } => {
            done(commands::pods(admin.admin, pod.as_deref(), output.json()))
        }
        Command::Conns { pod, admin, output } => {
            done(commands::conns(admin.admin, pod.as_deref(), output.json()))
        }
        Command::Certs { admin, output } => done(commands::certs(admin.admin, output.json())),
        Command::Policy {
            check:
                Some(PolicyCommand::Check {
                    from,
                    to,
                    path,
                    method,
                    headers,
                    admin,
                    output,
                }),
            ..
        } => {
            let args = commands::CheckArgs {
                from,
                to,
                method,
                path,
                headers,
            };
            done(commands::policy_check(admin.admin, &args, output.json()))
        }
        Command::Policy {
            check: None,
            pod: Some(pod),
            admin,
            output,
        } => done(commands::policy(admin.admin, &pod, output.json())),
        Command::Policy { .. } => Err(usage(
            "policy needs a pod (`policy NS/POD`) or `policy check --from F --to T`",
        )),
        Command::Flows {
            follow,
            pod,
            limit,
            probes,
            admin,
            output,
        } => {
            let args = commands::FlowArgs {
                pod,
                follow,
                limit,
                probes,
            };
            done(commands::flows(admin.admin, &args, output.json()))
        }
        Command::Bpf {
            map,
            action,
            instance,
            bpffs_root,
            output,
        } => {
            let instance = InstanceArgs {
                instance,
                bpffs_root,
            };
            let pin_dir = instance.datapath().map_err(usage)?.pin_dir();
            let key = match &action {
                Some(BpfAction::Get { key }) => Some(key.as_str()),
                _ => None,
            };
            if map.is_none() && action.is_some() {
                return Err(usage("bpf list|get needs a map: `bpf MAP list`"));
            }
            done(commands::bpf(
                &pin_dir,
                map.as_deref(),
                key,
                output == Output::Json,
            ))
        }
        Command::Doctor { no_load, output } => done(commands::doctor(!no_load, output.json())),
        Command::Counters { instance, output } => {
            let maps = ebpf::Maps::open(&instance.datapath().map_err(usage)?.pin_dir())?;
            let counters = maps.counters()?;
            if output == Output::Json {
                let obj: serde_json::Map<String, serde_json::Value> = counters
                    .iter()
                    .map(|(c, v)| (c.name().to_string(), (*v).into()))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&obj)?);
            } else {
                for (c, v) in counters {
                    println!("{:<28} {v}", c.name());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Unenroll { instance, name, ip } => {
            ebpf::unenroll_pinned(&instance.datapath().map_err(usage)?.pin_dir(), &name, ip)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Clean { instance } => {
            ebpf::remove_instance(&instance.datapath().map_err(usage)?.pin_dir())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ProbeConnect { target, timeout_ms } => {
            let report = crate::admin::probe::helper(target, Duration::from_millis(timeout_ms));
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, String> {
        let argv = ["mesh-agent", "run"].iter().chain(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| {
            assert!(e.use_stderr(), "a usage error, exit status 64: {e}");
            e.to_string()
        })?;
        let Command::Run(args) = cli.command else {
            unreachable!("parsed `run`")
        };
        args.config().map_err(|f| match f {
            Failure::Usage(msg) => msg,
            Failure::Runtime(e) => panic!("not a usage error: {e}"),
            Failure::Exit(e) => panic!("not a usage error: {}", e.message),
        })
    }

    #[test]
    fn the_handover_socket_is_per_instance_a_path_or_off() {
        let cfg = run(&["--instance=edge"]).expect("default");
        assert_eq!(
            cfg.handover_socket.as_deref(),
            Some(std::path::Path::new("/var/run/mesh/handover/edge.sock"))
        );
        let cfg = run(&["--handover-socket=/run/x/h.sock"]).expect("a path");
        assert_eq!(
            cfg.handover_socket.as_deref(),
            Some(std::path::Path::new("/run/x/h.sock"))
        );
        assert_eq!(
            run(&["--handover-socket=off"])
                .expect("off")
                .handover_socket,
            None
        );
        for bad in ["h.sock", "", "/"] {
            let err = run(&[&format!("--handover-socket={bad}")]).expect_err(bad);
            assert!(err.contains("absolute path"), "{bad}: {err}");
        }
    }

    #[test]
    fn serving_flags_have_defaults_that_may_be_taken_elsewhere() {
        let cfg = run(&[]).expect("defaults");
        assert_eq!(cfg.admin, AdminConfig::default());
        assert!(
            !cfg.admin.admin.explicit,
            "a busy default port is not fatal"
        );
        assert_eq!(cfg.proxy, ProxyConfig::default());

        let cfg = run(&[
            "--admin=127.0.0.1:9901",
            "--metrics=off",
            "--idle-timeout=90s",
            "--drain-grace=0s",
            "--access-log-every=100",
        ])
        .expect("flags");
        assert_eq!(cfg.proxy.access_log_every, 100);
        assert!(
            run(&["--access-log-every=0"]).is_err(),
            "0 would log nothing"
        );
        assert_eq!(
            cfg.admin.admin,
            Listen {
                addr: "127.0.0.1:9901".parse().expect("addr"),
                explicit: true
            }
        );
        assert_eq!(cfg.admin.metrics, None);
        assert_eq!(cfg.proxy.idle_timeout, Duration::from_secs(90));
        assert_eq!(cfg.proxy.drain_grace, Duration::ZERO);
    }

    #[test]
    fn requests_go_as_streams_unless_turned_off() {
        assert!(run(&[]).expect("defaults").proxy.request_streams);
        let off = run(&["--no-request-streams"]).expect("--no-request-streams");
        assert!(!off.proxy.request_streams);
    }

    #[test]
    fn the_runtime_has_as_many_threads_as_asked_else_one_per_cpu() {
        let defaults = run(&[]).expect("defaults");
        assert_eq!(defaults.worker_threads, None);
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(
            defaults.proxy.threads, cpus,
            "the proxy's own threads: one per CPU"
        );
        for (arg, threads) in [("0", 0), ("1", 1), ("16", 16)] {
            let cfg = run(&[&format!("--proxy-threads={arg}")]).expect("proxy threads");
            assert_eq!(cfg.proxy.threads, threads, "--proxy-threads={arg}");
        }
        for bad in ["-1", "many", "1025"] {
            assert!(
                run(&[&format!("--proxy-threads={bad}")]).is_err(),
                "--proxy-threads={bad} accepted"
            );
        }
        assert_eq!(
            run(&["--worker-threads=1"]).expect("one").worker_threads,
            Some(1)
        );
        for bad in ["0", "-1", "two", "1025"] {
            assert!(
                run(&[&format!("--worker-threads={bad}")]).is_err(),
                "--worker-threads={bad} accepted"
            );
        }
    }

    #[test]
    fn the_skmsg_budget_takes_sizes_and_refuses_nonsense() {
        let cfg = run(&[]).expect("defaults");
        assert_eq!(cfg.datapath.skmsg_budget, mesh_common::DEFAULT_SKMSG_BUDGET);
        for (arg, bytes) in [
            ("65536", 65536),
            ("256K", 256 << 10),
            ("8m", 8 << 20),
            ("1G", 1 << 30),
        ] {
            let cfg = run(&[&format!("--skmsg-budget={arg}")]).expect(arg);
            assert_eq!(cfg.datapath.skmsg_budget, bytes, "{arg}");
        }
        for bad in [
            "0",
            "1K",
            "2G",
            "",
            "4MB",
            "-1M",
            "M",
            "99999999999999999999G",
        ] {
            let e = run(&[&format!("--skmsg-budget={bad}")]).expect_err(bad);
            assert!(e.contains("64K to 1G"), "{bad}: {e}");
        }
    }

    #[test]
    fn same_node_traffic_stays_in_the_agent_unless_told_otherwise() {
        let cfg = run(&[]).expect("defaults");
        assert_eq!(cfg.proxy.same_node, SameNode::InProcess);
        let cfg = run(&["--same-node=hbone"]).expect("hbone");
        assert_eq!(cfg.proxy.same_node, SameNode::Hbone);
        let cfg = run(&["--same-node", "in-process"]).expect("in-process");
        assert_eq!(cfg.proxy.same_node, SameNode::InProcess);
    }

    #[test]
    fn the_inbound_cap_and_the_ipv6_egress_refusal_come_from_the_flags() {
        let cfg = run(&[]).expect("defaults");
        assert_eq!(
            cfg.datapath.max_inbound_ports,
            mesh_datapath::config::DEFAULT_MAX_INBOUND_PORTS
        );
        assert!(
            !cfg.datapath.refuse_native_ipv6,
            "egress allowed by default"
        );
        let cfg = run(&["--max-inbound-ports-per-pod=200"]).expect("cap");
        assert_eq!(cfg.datapath.max_inbound_ports, 200);
        for bad in ["0", "4097", "many"] {
            let e = run(&[&format!("--max-inbound-ports-per-pod={bad}")]).expect_err(bad);
            assert!(e.contains("--max-inbound-ports-per-pod"), "{e}");
            assert!(e.contains("1 to 4096"), "{e}");
        }
        let controller = [
            "--controller=https://127.0.0.1:15012",
            "--bootstrap-token-file=/dev/null",
            "--controller-ca=/dev/null",
            "--node=n1",
        ];
        let cfg = run(&controller).expect("egress allowed");
        assert!(!cfg.datapath.refuse_native_ipv6);
        let deny: Vec<&str> = controller
            .iter()
            .copied()
            .chain(["--egress=deny"])
            .collect();
        let cfg = run(&deny).expect("egress denied");
        assert!(
            cfg.datapath.refuse_native_ipv6,
            "denied egress must cover native IPv6"
        );
    }

    #[test]
    fn bad_serving_flags_are_usage_errors() {
        for (flag, want) in [
            ("--admin=localhost", "--admin"),
            ("--metrics=15020", "IP:PORT"),
            ("--idle-timeout=soon", "30s"),
            ("--idle-timeout=0s", "longer than 0s"),
            ("--same-node=tls", "in-process"),
            ("--same-node=", "hbone"),
        ] {
            let e = run(&[flag]).expect_err(flag);
            assert!(e.contains(want), "{flag}: {e}");
        }
    }

    #[test]
    fn http_paths_are_normalized_and_refusals_plain_unless_told_otherwise() {
        let cfg = run(&[]).expect("defaults");
        assert_eq!(cfg.proxy.http.paths, PathNormalization::default());
        assert!(cfg.proxy.http.paths.normalize_path && cfg.proxy.http.paths.merge_slashes);
        assert_eq!(cfg.proxy.http.paths.escaped_slashes, EscapedSlashes::Reject);
        assert!(!cfg.proxy.http.expose_refusal_reasons);

        let cfg = run(&[
            "--no-normalize-path",
            "--no-merge-slashes",
            "--escaped-slashes=unescape",
            "--expose-refusal-reasons",
        ])
        .expect("valid flags");
        assert_eq!(
            cfg.proxy.http.paths,
            PathNormalization {
                normalize_path: false,
                merge_slashes: false,
                escaped_slashes: EscapedSlashes::Unescape,
            }
        );
        assert!(cfg.proxy.http.expose_refusal_reasons);
        let text = serde_json::to_string(&cfg.proxy).expect("serializes");
        assert!(text.contains(r#""expose_refusal_reasons":true"#), "{text}");

        let err = run(&["--escaped-slashes=decode"]).expect_err("not an action");
        assert!(err.contains("--escaped-slashes"), "{err}");
    }

    /// The DaemonSet's arguments are ones the agent accepts, and its CNI plugin asks the
    /// socket the agent listens on.
    #[test]
    fn the_daemonset_runs_the_agent_with_arguments_it_accepts() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.yaml");
        let text = std::fs::read_to_string(path).expect("deploy/agent.yaml");
        let ds: serde_json::Value = serde_yaml_ng::from_str(&text).expect("YAML");
        let spec = &ds["spec"]["template"]["spec"];
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .expect("a list")
                .iter()
                .map(|a| {
                    a.as_str()
                        .expect("a string")
                        .replace("$(NODE_NAME)", "node-1")
                })
                .collect()
        };
        let container = |name: &str| {
            spec["containers"]
                .as_array()
                .expect("containers")
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("{path}: no container {name}"))
                .clone()
        };
        let args = strings(&container("agent")["args"]);
        assert_eq!(args[0], "run");
        let argv: Vec<&str> = args[1..].iter().map(String::as_str).collect();
        let cfg = run(&argv).unwrap_or_else(|e| panic!("{path}: {e}"));
        let discover = cfg.discover_pods.expect("--discover-pods");
        let install = strings(&spec["initContainers"][0]["command"]);
        assert_eq!(install[..2], ["mesh-cni", "install"]);
        let setup = mesh_cni::cli::parse_setup(&install[2..], true)
            .unwrap_or_else(|e| panic!("{path}: the CNI installer's arguments: {e}"));
        assert_eq!(
            setup.agent_socket.clone().map(PathBuf::from),
            Some(discover.cni_socket),
            "the plugin asks another socket than the agent listens on"
        );
        // The watcher keeps exactly what the init container installed.
        let watch = strings(&container("cni-watch")["command"]);
        assert_eq!(watch[..2], ["mesh-cni", "install"]);
        let watching = mesh_cni::cli::parse_setup(&watch[2..], true)
            .unwrap_or_else(|e| panic!("{path}: the CNI watcher's arguments: {e}"));
        assert!(
            watching.watch.is_some(),
            "{path}: cni-watch without --watch"
        );
        assert_eq!(
            mesh_cni::cli::Setup {
                watch: None,
                ..watching
            },
            setup,
            "{path}: the watcher would install another entry than the init container"
        );
    }
}
