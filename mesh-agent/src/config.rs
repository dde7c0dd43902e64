//! The agent's configuration: read from flags, constructed as plain values, validated. The
//! datapath's part is [`mesh_datapath::config`].
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use mesh_datapath::config::{DatapathConfig, PodSpec, validate_instance, validate_pods};
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(transparent)]
    Datapath(#[from] mesh_datapath::config::ConfigError),
    #[error(transparent)]
    Proxy(#[from] mesh_proxy::config::ConfigError),
    #[error("{0}")]
    Controller(String),
    #[error("duration {value:?}: {reason} (write it like 30s, 5m or 1h)")]
    Duration { value: String, reason: String },
    #[error("listen address {0:?}: expected IP:PORT (like 127.0.0.1:15000) or off")]
    Listen(String),
    #[error("{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
}

impl ConfigError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigError::Datapath(e) => e.kind(),
            ConfigError::Proxy(e) => e.kind(),
            ConfigError::Controller(_) => "controller",
            ConfigError::Duration { .. } => "duration",
            ConfigError::Listen(_) => "listen",
            ConfigError::Flag { .. } => "flag",
        }
    }
}

/// Default admin endpoint: localhost only.
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15000));
/// Default Prometheus endpoint.
pub const DEFAULT_METRICS: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15020));
/// A duration as on the command line: `30s`, `5m`, `1h`, `1h 30m`, `200ms`.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| ConfigError::Duration {
        value: s.into(),
        reason: e.to_string(),
    })
}

/// `IP:PORT`, or `off` for no listener.
pub fn parse_optional_listen(s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| ConfigError::Listen(s.into()))
}

/// An address the agent serves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Listen {
    pub addr: SocketAddr,
    /// Given on the command line: failing to bind it stops the agent. A default that cannot
    /// be bound (another agent on the node holds it) is logged and skipped.
    pub explicit: bool,
}

/// The agent's own HTTP endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    /// Health, metrics and the debug pages (`/debug/conns`, `/debug/config`, `/debug/certs`).
    pub admin: Listen,
    /// `/metrics` only, for Prometheus; `None` when off.
    pub metrics: Option<Listen>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            admin: Listen {
                addr: DEFAULT_ADMIN,
                explicit: false,
            },
            metrics: Some(Listen {
                addr: DEFAULT_METRICS,
                explicit: false,
            }),
        }
    }
}

/// The whole agent configuration for `mesh-agent run`.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub datapath: DatapathConfig,
    /// The controller connection; without it the agent runs the datapath and a transparent
    /// proxy only.
    pub controller: Option<ControllerSettings>,
    /// The cgroup the agent moves itself into (its sockets are never captured); default
    /// `<cgroup v2 mount>/mesh-agent-<instance>` when the agent starts in the root cgroup.
    pub cgroup: Option<PathBuf>,
    pub pods: Vec<PodSpec>,
    /// Unenroll every pod on a clean shutdown (otherwise capture survives restarts).
    pub unenroll_on_exit: bool,
    /// The downward API annotations file that may ask for the mesh's removal from the node
    /// ([`crate::uninstall`]).
    pub uninstall_signal: Option<PathBuf>,
    /// Where the running agent hands its listening sockets to a successor
    /// ([`crate::handover`]); `None`: never.
    pub handover_socket: Option<PathBuf>,
    /// Also enroll the pods the controller's configuration places on this node with a cgroup
    /// and a network namespace ([`crate::enroll`]), following them as they come and go.
    pub enroll_from_config: bool,
    /// Enroll the meshed pods the controller places on this node, found on the node itself
    /// ([`crate::enroll::node`]): handed over by the CNI plugin at `cni_socket` when the
    /// runtime creates them, adopted from the cgroup hierarchy when already running.
    pub discover_pods: Option<DiscoverPods>,
    pub proxy: mesh_proxy::config::ProxyConfig,
    pub admin: AdminConfig,
    /// Threads of the runtime; `None`: one per CPU the agent may run on.
    pub worker_threads: Option<usize>,
}

/// `--discover-pods`: where pods come from on a real node.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DiscoverPods {
    /// The unix socket the CNI plugin asks (`mesh-cni`'s `agentSocket`).
    pub cni_socket: PathBuf,
    /// Where pinned network namespaces live (the runtime's `CNI_NETNS` paths); an adopted
    /// pod's namespace is named by its pin there when it has one, else by a process.
    pub netns_dirs: Vec<PathBuf>,
}

/// How the agent proves its node to the controller at bootstrap.
#[derive(Debug, Clone, Serialize)]
pub enum CredentialSource {
    /// Local mode: a file holding a bootstrap token.
    BootstrapTokenFile(PathBuf),
    /// Cluster mode: the projected ServiceAccount token file.
    ServiceAccountTokenFile(PathBuf),
}

/// Where the controller is and how to trust and authenticate to it.
#[derive(Debug, Clone, Serialize)]
pub struct ControllerSettings {
    /// `https://host:port`.
    pub address: String,
    /// Name in the controller's certificate.
    pub server_name: String,
    /// PEM roots that verify the controller.
    pub ca_file: PathBuf,
    pub node: String,
    pub trust_domain: String,
    pub credential: CredentialSource,
    /// Whether meshed pods may reach destinations outside the mesh.
    pub egress: mesh_proxy::outbound::Egress,
}

impl ControllerSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.address.starts_with("https://") {
            return Err(ConfigError::Controller(format!(
                "--controller {:?} must be an https:// URL",
                self.address
            )));
        }
        mesh_core::identity::dns_subdomain(&self.node).map_err(|why| {
            ConfigError::Controller(format!("--node {:?} is not a node name: {why}", self.node))
        })?;
        mesh_core::identity::TrustDomain::new(&self.trust_domain)
            .map_err(|e| ConfigError::Controller(format!("--trust-domain: {e}")))?;
        Ok(())
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_instance(&self.datapath.instance)?;
        if let Some(c) = &self.controller {
            c.validate()?;
        }
        self.proxy.validate()?;
        if self.enroll_from_config && self.controller.is_none() {
            return Err(ConfigError::Flag {
                flag: "--enroll-from-config",
                reason: "needs --controller (the pods come from its configuration)".into(),
            });
        }
        if let Some(d) = &self.discover_pods {
            if self.controller.is_none() {
                return Err(ConfigError::Flag {
                    flag: "--discover-pods",
                    reason: "needs --controller (it says which pods are meshed)".into(),
                });
            }
            if self.enroll_from_config {
                return Err(ConfigError::Flag {
                    flag: "--discover-pods",
                    reason: "and --enroll-from-config are two ways to find the same pods: \
                             choose one"
                        .into(),
                });
            }
            if !d.cni_socket.is_absolute() {
                return Err(ConfigError::Flag {
                    flag: "--cni-socket",
                    reason: format!("{} is not an absolute path", d.cni_socket.display()),
                });
            }
        }
        Ok(validate_pods(&self.pods)?)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_listen_addresses_parse_like_the_flags_say() {
        assert_eq!(parse_duration("1h").expect("1h"), Duration::from_secs(3600));
        assert_eq!(
            parse_duration("200ms").expect("200ms"),
            Duration::from_millis(200)
        );
        let e = parse_duration("soon").expect_err("not a duration");
        assert_eq!(e.kind(), "duration");
        assert!(e.to_string().contains("30s"), "{e}");

        assert_eq!(parse_optional_listen("off").expect("off"), None);
        assert_eq!(
            parse_optional_listen("127.0.0.1:9").expect("addr"),
            Some(SocketAddr::from(([127, 0, 0, 1], 9)))
        );
        let e = parse_optional_listen("localhost").expect_err("no port");
        assert_eq!(e.kind(), "listen");
    }
}
