//! The controller's configuration: flags -> [`Args`] -> [`Config::from_args`] (pure, validated).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_core::identity::TrustDomain;
use mesh_core::policy::TrafficPolicyMode;
use serde::Serialize;

use crate::compile::CompileOptions;
use crate::server::ServerSettings;

/// A configuration the controller refuses to start with.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub reason: String,
}

fn bad(flag: &'static str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        flag,
        reason: reason.to_string(),
    }
}

/// Command-line flags of `mesh-controller run`.
#[derive(Debug, Clone, Parser)]
pub struct Args {
    /// Read cluster state from this directory of Kubernetes/SMI YAML (local mode).
    #[arg(long, conflicts_with = "kubernetes")]
    pub local_dir: Option<PathBuf>,
    /// Read cluster state from the Kubernetes API (cluster mode).
    #[arg(long)]
    pub kubernetes: bool,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// gRPC listen address (agents connect here).
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Admin listen address (localhost only: index, nodes, rejected resources, metrics).
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub admin: SocketAddr,
    /// Local mode: directory holding the CA (created on first start).
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Cluster mode: `namespace/name` of the Secret holding the CA.
    #[arg(long, default_value = "mesh-system/mesh-ca")]
    pub ca_secret: String,
    /// Use an existing CA (for example an intermediate) instead: certificate PEM ...
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// ... its private key PEM ...
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// ... and the roots to distribute (default: the CA certificate itself).
    #[arg(long, requires = "ca_cert")]
    pub ca_roots: Option<PathBuf>,
    /// Bootstrap token file (`<token> <node|*> <RFC 3339 expiry>` per line). Required in
    /// local mode; in cluster mode it replaces TokenReview and `*` (any node) is refused.
    #[arg(long)]
    pub bootstrap_tokens: Option<PathBuf>,
    /// Cluster mode: `namespace/name` of the agents' ServiceAccount.
    #[arg(long, default_value = "mesh-system/mesh-agent")]
    pub agent_service_account: String,
    /// Cluster mode: the audiences TokenReview checks agents' tokens for, comma-separated
    /// (the agents' projected token must request one of them).
    #[arg(long, default_value = crate::auth::AGENT_TOKEN_AUDIENCE, value_delimiter = ',')]
    pub token_audiences: Vec<String>,
    /// Lifetime of workload certificates (e.g. 24h, 30m, 4s).
    #[arg(long, default_value = "24h")]
    pub workload_cert_ttl: String,
    /// Lifetime of node certificates. Each renewal needs a fresh proof (bootstrap token or
    /// TokenReview), so a node credential lapses this long after its last proof.
    #[arg(long, default_value = "24h")]
    pub node_cert_ttl: String,
    /// SMI traffic policy: default-deny (a TrafficTarget is needed) or permissive.
    #[arg(long, default_value = "default-deny")]
    pub traffic_policy: String,
    /// The cluster's service CIDR (IPv4 a.b.c.d/n), for clusters whose API serves no
    /// networking.k8s.io/v1 ServiceCIDR (before Kubernetes 1.33); the agents capture it with the nodes' pod
    /// CIDRs. Repeatable. ServiceCIDR objects, where there are any, are used as well.
    #[arg(long = "service-cidr", value_name = "CIDR")]
    pub service_cidrs: Vec<String>,
    /// Cluster mode: `namespace/name` of the ConfigMap the controller publishes its trust
    /// roots in (key `ca.crt`), which the agents mount.
    #[arg(long, default_value = "mesh-system/mesh-ca-root")]
    pub trust_bundle: String,
    /// Cluster mode: do not publish the trust bundle (the operator distributes the roots).
    #[arg(long, conflicts_with = "trust_bundle")]
    pub no_trust_bundle: bool,
    /// Cluster mode: run replicas, of which the one holding the Lease `--lease` writes to the
    /// API (SMI status, the trust bundle); every replica serves agents.
    #[arg(long)]
    pub leader_elect: bool,
    /// The Lease of `--leader-elect`, `namespace/name`.
    #[arg(
        long,
        default_value = "mesh-system/mesh-controller",
        requires = "leader_elect"
    )]
    pub lease: String,
    /// This replica's name in the Lease (default: `$POD_NAME`, else the host name).
    #[arg(long, requires = "leader_elect")]
    pub lease_holder: Option<String>,
    /// Names and addresses in the controller's serving certificate, comma-separated.
    #[arg(
        long,
        default_value = "mesh-controller.mesh-system.svc,mesh-controller,localhost,127.0.0.1",
        value_delimiter = ','
    )]
    pub server_names: Vec<String>,
}

/// Where cluster state comes from.
#[derive(Debug, Clone, Serialize)]
pub enum Source {
    Local(PathBuf),
    Kubernetes,
}

/// Where the CA lives.
#[derive(Debug, Clone, Serialize)]
pub enum CaSource {
    Dir(PathBuf),
    Secret {
        namespace: String,
        name: String,
    },
    Files {
        cert: PathBuf,
        key: PathBuf,
        roots: Option<PathBuf>,
    },
}

/// How agents bootstrap.
#[derive(Debug, Clone, Serialize)]
pub enum Bootstrap {
    TokenFile {
        path: PathBuf,
        /// `*` (any node) tokens are accepted: local mode only.
        wildcards: bool,
    },
    TokenReview {
        namespace: String,
        service_account: String,
        audiences: Vec<String>,
    },
}

/// The validated configuration, logged at start and served by the admin endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub source: Source,
    pub trust_domain: TrustDomain,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub ca: CaSource,
    pub bootstrap: Bootstrap,
    pub traffic_policy: TrafficPolicyMode,
    pub service_cidrs: Vec<String>,
    pub server: ServerSettings,
    pub server_names: Vec<String>,
    /// Cluster mode: the ConfigMap the trust roots are published in.
    pub trust_bundle: Option<NamespacedRef>,
    /// Cluster mode: the election among replicas, when there is one.
    pub leader_election: Option<LeaderElection>,
}

/// A namespaced object's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespacedRef {
    pub namespace: String,
    pub name: String,
}

/// The election among controller replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaderElection {
    pub lease: NamespacedRef,
    /// This replica's name in the Lease.
    pub holder: String,
}

fn duration(flag: &'static str, s: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s).map_err(|e| bad(flag, format!("{s:?}: {e}")))?;
    if d < Duration::from_secs(2) {
        return Err(bad(flag, "must be at least 2s"));
    }
    Ok(d)
}

/// A replica's name when none is given: its pod's (`POD_NAME`, from the downward API), else
/// the host's (a pod's host name is its name).
fn default_holder() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default()
}

fn namespaced(flag: &'static str, s: &str) -> Result<(String, String), ConfigError> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(bad(flag, format!("{s:?} is not namespace/name"))),
    }
}

// === impl Config ===

impl Config {
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let trust_domain =
            TrustDomain::new(&args.trust_domain).map_err(|e| bad("--trust-domain", e))?;
        let source = match (&args.local_dir, args.kubernetes) {
            (Some(dir), false) => Source::Local(dir.clone()),
            (None, true) => Source::Kubernetes,
            _ => return Err(bad("--local-dir/--kubernetes", "choose exactly one source")),
        };
        let ca = match (&args.ca_cert, &args.ca_key, &source) {
            (Some(cert), Some(key), _) => CaSource::Files {
                cert: cert.clone(),
                key: key.clone(),
                roots: args.ca_roots.clone(),
            },
            (_, _, Source::Local(dir)) => {
                CaSource::Dir(args.ca_dir.clone().unwrap_or_else(|| dir.join(".mesh-ca")))
            }
            (_, _, Source::Kubernetes) => {
                let (namespace, name) = namespaced("--ca-secret", &args.ca_secret)?;
                CaSource::Secret { namespace, name }
            }
        };
        let bootstrap = match (&source, &args.bootstrap_tokens) {
            (source, Some(file)) => Bootstrap::TokenFile {
                path: file.clone(),
                wildcards: matches!(source, Source::Local(_)),
            },
            (Source::Local(_), None) => {
                return Err(bad(
                    "--bootstrap-tokens",
                    "local mode needs a bootstrap token file",
                ));
            }
            (Source::Kubernetes, None) => {
                let (namespace, service_account) =
                    namespaced("--agent-service-account", &args.agent_service_account)?;
                let audiences: Vec<String> = args
                    .token_audiences
                    .iter()
                    .map(|a| a.trim().to_string())
                    .filter(|a| !a.is_empty())
                    .collect();
                if audiences.is_empty() {
                    return Err(bad("--token-audiences", "at least one audience is needed"));
                }
                Bootstrap::TokenReview {
                    namespace,
                    service_account,
                    audiences,
                }
            }
        };
        let traffic_policy = match args.traffic_policy.as_str() {
            "default-deny" => TrafficPolicyMode::DefaultDeny,
            "permissive" => TrafficPolicyMode::Permissive,
            other => {
                return Err(bad(
                    "--traffic-policy",
                    format!("{other:?} is not default-deny or permissive"),
                ));
            }
        };
        for cidr in &args.service_cidrs {
            mesh_api::convert::ipv4_cidr(cidr).map_err(|e| bad("--service-cidr", e))?;
        }
        let kubernetes = matches!(source, Source::Kubernetes);
        let trust_bundle = match (kubernetes, args.no_trust_bundle) {
            (true, false) => {
                let (namespace, name) = namespaced("--trust-bundle", &args.trust_bundle)?;
                Some(NamespacedRef { namespace, name })
            }
            _ => None,
        };
        let leader_election = match (args.leader_elect, kubernetes) {
            (false, _) => None,
            (true, false) => {
                return Err(bad("--leader-elect", "only in cluster mode (--kubernetes)"));
            }
            (true, true) => {
                let (namespace, name) = namespaced("--lease", &args.lease)?;
                let holder = match &args.lease_holder {
                    Some(h) => h.trim().to_string(),
                    None => default_holder(),
                };
                if holder.is_empty() {
                    return Err(bad(
                        "--lease-holder",
                        "empty; name this replica (its pod's name)",
                    ));
                }
                Some(LeaderElection {
                    lease: NamespacedRef { namespace, name },
                    holder,
                })
            }
        };
        if args.server_names.iter().all(|n| n.trim().is_empty()) {
            return Err(bad("--server-names", "at least one name is needed"));
        }
        Ok(Config {
            source,
            trust_domain,
            listen: args.listen,
            admin: args.admin,
            ca,
            bootstrap,
            traffic_policy,
            service_cidrs: args.service_cidrs.clone(),
            server: ServerSettings {
                workload_validity: duration("--workload-cert-ttl", &args.workload_cert_ttl)?,
                node_validity: duration("--node-cert-ttl", &args.node_cert_ttl)?,
            },
            server_names: args.server_names.clone(),
            trust_bundle,
            leader_election,
        })
    }

    /// Checks the files the configuration names that decide what it means (run once at
    /// start, after [`Config::from_args`]): in cluster mode a bootstrap token file must not
    /// hold `*` (any node) tokens. The file is read again at each bootstrap, where the same
    /// rule holds.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let Bootstrap::TokenFile {
            path,
            wildcards: false,
        } = &self.bootstrap
        else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            bad(
                "--bootstrap-tokens",
                format!("read {}: {e}", path.display()),
            )
        })?;
        let lines = crate::auth::wildcard_lines(&text)
            .map_err(|e| bad("--bootstrap-tokens", format!("{}: {e}", path.display())))?;
        match lines.as_slice() {
            [] => Ok(()),
            lines => Err(bad(
                "--bootstrap-tokens",
                format!(
                    "{}: line {}: tokens for any node (`*`) are accepted in local mode only; \
                     name each token's node",
                    path.display(),
                    lines
                        .iter()
                        .map(|l| l.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    pub fn compile_options(&self) -> CompileOptions {
        CompileOptions {
            trust_domain: self.trust_domain.clone(),
            traffic_policy: self.traffic_policy,
            service_cidrs: self.service_cidrs.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["mesh-controller"];
        argv.extend_from_slice(extra);
        Config::from_args(&Args::try_parse_from(argv).expect("flags parse"))
    }

    #[test]
    fn local_mode_defaults() {
        let c = args(&["--local-dir", "/cfg", "--bootstrap-tokens", "/t"]).expect("valid");
        assert!(matches!(c.ca, CaSource::Dir(ref d) if d == &PathBuf::from("/cfg/.mesh-ca")));
        assert_eq!(c.server.workload_validity, Duration::from_secs(86400));
        assert_eq!(c.traffic_policy, TrafficPolicyMode::DefaultDeny);
    }

    #[test]
    fn wildcard_tokens_only_in_local_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::write(
            &tokens,
            "0123456789abcdef0123 node-1 2999-01-01T00:00:00Z\n\
             0123456789abcdef0124 * 2999-01-01T00:00:00Z\n",
        )
        .expect("write tokens");
        let t = tokens.to_str().expect("utf-8 path");
        let local = args(&["--local-dir", "/cfg", "--bootstrap-tokens", t]).expect("valid");
        assert!(matches!(
            local.bootstrap,
            Bootstrap::TokenFile {
                wildcards: true,
                ..
            }
        ));
        local
            .check_files()
            .expect("wildcards are fine in local mode");

        let cluster = args(&["--kubernetes", "--bootstrap-tokens", t]).expect("valid flags");
        let e = cluster.check_files().expect_err("wildcard in cluster mode");
        assert_eq!(e.flag, "--bootstrap-tokens");
        assert!(e.reason.contains("line 2: tokens for any node"), "{e}");

        std::fs::write(
            &tokens,
            "0123456789abcdef0123 node-1 2999-01-01T00:00:00Z\n",
        )
        .expect("rewrite tokens");
        cluster.check_files().expect("named nodes only");
    }

    #[test]
    fn token_review_audiences_default_to_the_controller() {
        let c = args(&["--kubernetes"]).expect("valid");
        let Bootstrap::TokenReview { audiences, .. } = &c.bootstrap else {
            panic!("cluster mode reviews tokens: {:?}", c.bootstrap);
        };
        assert_eq!(audiences, &["mesh-controller"]);
        let c = args(&["--kubernetes", "--token-audiences", "a, b"]).expect("valid");
        let Bootstrap::TokenReview { audiences, .. } = &c.bootstrap else {
            panic!("cluster mode reviews tokens");
        };
        assert_eq!(audiences, &["a", "b"]);
    }

    #[test]
    fn cluster_mode_publishes_the_trust_bundle_and_elects_a_leader_when_asked() {
        let c = args(&["--kubernetes"]).expect("valid");
        let bundle = NamespacedRef {
            namespace: "mesh-system".into(),
            name: "mesh-ca-root".into(),
        };
        assert_eq!(c.trust_bundle, Some(bundle));
        assert_eq!(c.leader_election, None);
        let c = args(&["--kubernetes", "--no-trust-bundle"]).expect("valid");
        assert_eq!(c.trust_bundle, None);
        let local = args(&["--local-dir", "/c", "--bootstrap-tokens", "/t"]).expect("valid");
        assert_eq!(
            local.trust_bundle, None,
            "local mode has no API to publish to"
        );

        let c = args(&[
            "--kubernetes",
            "--trust-bundle=mesh/roots",
            "--leader-elect",
            "--lease=mesh/controller",
            "--lease-holder=controller-0",
        ])
        .expect("valid");
        assert_eq!(
            c.trust_bundle
                .map(|b| format!("{}/{}", b.namespace, b.name)),
            Some("mesh/roots".to_string())
        );
        let election = c.leader_election.expect("an election");
        assert_eq!(election.lease.namespace, "mesh");
        assert_eq!(election.lease.name, "controller");
        assert_eq!(election.holder, "controller-0");
        // Without a name given, the pod's (or the host's).
        let c = args(&["--kubernetes", "--leader-elect"]).expect("valid");
        assert!(!c.leader_election.expect("an election").holder.is_empty());
    }

    #[test]
    fn bad_flags_name_the_flag() {
        for (argv, flag) in [
            (vec!["--local-dir", "/c"], "--bootstrap-tokens"),
            (vec![], "--local-dir/--kubernetes"),
            (vec!["--kubernetes", "--ca-secret", "nope"], "--ca-secret"),
            (
                vec!["--kubernetes", "--trust-domain", "Bad"],
                "--trust-domain",
            ),
            (
                vec!["--kubernetes", "--workload-cert-ttl", "soon"],
                "--workload-cert-ttl",
            ),
            (
                vec!["--kubernetes", "--node-cert-ttl", "1s"],
                "--node-cert-ttl",
            ),
            (
                vec!["--kubernetes", "--traffic-policy", "allow"],
                "--traffic-policy",
            ),
            (
                vec!["--kubernetes", "--token-audiences", ","],
                "--token-audiences",
            ),
            (
                vec!["--kubernetes", "--trust-bundle", "mesh-ca-root"],
                "--trust-bundle",
            ),
            (
                vec![
                    "--local-dir",
                    "/c",
                    "--bootstrap-tokens",
                    "/t",
                    "--leader-elect",
                ],
                "--leader-elect",
            ),
            (
                vec!["--kubernetes", "--leader-elect", "--lease", "x/"],
                "--lease",
            ),
            (
                vec!["--kubernetes", "--leader-elect", "--lease-holder", " "],
                "--lease-holder",
            ),
        ] {
            let e = args(&argv).expect_err(&format!("{argv:?}"));
            assert_eq!(e.flag, flag, "{e}");
        }
    }
}
