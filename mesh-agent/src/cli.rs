//! The `mesh-agent` command line: `run` and the node debugging commands.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use mesh_common::FlowVerdict;

use crate::{
    config::{
        AdminConfig, BPFFS_ROOT, Cidr, Config, ConfigError, ControllerSettings, CredentialSource,
        DEFAULT_ADMIN, DEFAULT_METRICS, DatapathConfig, Listen, PodSpec, ProxyConfig, SameNode,
    },
    ebpf, features,
};

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
    egress: crate::outbound::Egress,
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
        }
    }
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    /// A pod to enroll: name=NS/POD,cgroup=PATH,netns=PATH,ip=A.B.C.D[,iface=eth0]
    /// [,inbound=PORT+PORT][,mode=strict|permissive]. Repeatable.
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
    /// cgroup v2 directory the agent moves itself into.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Unenroll every pod on SIGTERM (by default capture survives agent restarts).
    #[arg(long)]
    unenroll_on_exit: bool,
    /// Also enroll the pods the controller places on this node with a cgroup and network
    /// namespace (annotations mesh.io/cgroup and mesh.io/netns, as the single-machine mesh
    /// writes them), and unenroll them when they go. Needs --controller.
    #[arg(long)]
    enroll_from_config: bool,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    controller: ControllerArgs,
}

impl RunArgs {
    /// Constructs and validates the configuration.
    fn config(self) -> Result<Config, Failure> {
        let mut datapath = self.instance.datapath().map_err(usage)?;
        datapath.capture = self.capture;
        datapath.excluded_ports = self.excluded_ports;
        datapath.skmsg = !self.no_skmsg;
        let cfg = Config {
            datapath,
            controller: self.controller.settings()?,
            cgroup: self.cgroup,
            pods: self.pods,
            unenroll_on_exit: self.unenroll_on_exit,
            enroll_from_config: self.enroll_from_config,
            proxy: self.serve.proxy(),
            admin: self.serve.admin(),
        };
        cfg.validate().map_err(usage)?;
        Ok(cfg)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the datapath, enroll pods and run the proxy until SIGTERM.
    Run(Box<RunArgs>),
    /// Check the kernel for everything the datapath needs.
    Doctor {
        /// Skip loading the programs into the kernel.
        #[arg(long)]
        no_load: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Datapath counters by reason.
    Counters {
        #[command(flatten)]
        instance: InstanceArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Drain and print the kernel's flow events.
    Flows {
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
        .init();
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
    }
}

enum Failure {
    Usage(String),
    Runtime(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Runtime(e.into())
    }
}

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure::Usage(e.to_string())
}

fn dispatch(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::Run(args) => {
            crate::app::run(args.config()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { no_load, output } => {
            let checks = features::check(!no_load);
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for c in &checks {
                    let mark = if c.ok { "ok  " } else { "FAIL" };
                    println!("{mark} {:<34} {}", c.name, c.detail);
                }
            }
            Ok(if checks.iter().all(|c| c.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
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
        Command::Flows { instance, output } => {
            let events = ebpf::drain_flows(&instance.datapath().map_err(usage)?.pin_dir())?;
            for e in events {
                let verdict = FlowVerdict::from_u32(e.verdict).map_or("unknown", |v| v.name());
                let src = ebpf::ip_from_key(e.src_ip);
                let dst = ebpf::ip_from_key(e.dst_ip);
                if output == Output::Json {
                    let v = serde_json::json!({
                        "ktime_ns": e.ktime_ns,
                        "src": format!("{src}:{}", e.src_port),
                        "dst": format!("{dst}:{}", e.dst_port),
                        "verdict": verdict,
                    });
                    println!("{v}");
                } else {
                    println!("{src}:{} -> {dst}:{} {verdict}", e.src_port, e.dst_port);
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
        })
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
        ])
        .expect("flags");
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
    fn same_node_traffic_stays_in_the_agent_unless_told_otherwise() {
        let cfg = run(&[]).expect("defaults");
        assert_eq!(cfg.proxy.same_node, SameNode::InProcess);
        let cfg = run(&["--same-node=hbone"]).expect("hbone");
        assert_eq!(cfg.proxy.same_node, SameNode::Hbone);
        let cfg = run(&["--same-node", "in-process"]).expect("in-process");
        assert_eq!(cfg.proxy.same_node, SameNode::InProcess);
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
}
