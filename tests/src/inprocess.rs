//! In-process control plane: a controller on a temporary directory of YAML and agents'
//! controller clients, talking gRPC over 127.0.0.1. No privileges needed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mesh_agent::control::{BootstrapCredential, ControlClient, ControlConfig};
use mesh_controller::app::{self, Controller};
use mesh_controller::config::{Args, Config};
use mesh_core::identity::TrustDomain;
use mesh_proxy::state::StateStore;

/// The bootstrap token every test node gets.
pub const TOKEN: &str = "test-bootstrap-token-0123456789";

pub fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").expect("trust domain")
}

/// A temporary cluster description: YAML directory, CA directory, token file.
pub struct ClusterDir {
    pub dir: tempfile::TempDir,
}

impl ClusterDir {
    pub fn new() -> ClusterDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("resources")).expect("resources dir");
        std::fs::write(
            dir.path().join("tokens"),
            format!(
                "{TOKEN} * 2999-01-01T00:00:00Z\nexpired-token-0123456789 * 2020-01-01T00:00:00Z\n"
            ),
        )
        .expect("token file");
        ClusterDir { dir }
    }

    pub fn resources(&self) -> PathBuf {
        self.dir.path().join("resources")
    }

    /// Writes (or replaces) one YAML file of the cluster description.
    pub fn write(&self, name: &str, yaml: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write yaml");
        std::fs::rename(&tmp, self.resources().join(name)).expect("rename yaml");
    }

    pub fn config(&self, listen: SocketAddr, extra: &[&str]) -> Config {
        let listen = listen.to_string();
        let mut argv = vec![
            "mesh-controller".to_string(),
            "--local-dir".into(),
            self.resources().display().to_string(),
            "--ca-dir".into(),
            self.dir.path().join("ca").display().to_string(),
            "--bootstrap-tokens".into(),
            self.dir.path().join("tokens").display().to_string(),
            "--listen".into(),
            listen,
            "--admin".into(),
            "127.0.0.1:0".into(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        Config::from_args(&Args::try_parse_from(argv).expect("flags")).expect("config")
    }

    pub async fn start(&self, listen: SocketAddr, extra: &[&str]) -> Controller {
        app::start(self.config(listen, extra))
            .await
            .expect("controller starts")
    }
}

impl Default for ClusterDir {
    fn default() -> Self {
        ClusterDir::new()
    }
}

/// Controller client settings for `node`.
pub fn control_config(controller: &Controller, node: &str, token: &str) -> ControlConfig {
    ControlConfig {
        address: format!("https://{}", controller.grpc_addr),
        server_name: "mesh-controller.mesh-system.svc".into(),
        controller_roots_pem: controller.roots_pem.clone(),
        node: node.into(),
        trust_domain: td(),
        credential: BootstrapCredential::Token(token.into()),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
    }
}

/// An agent's control-plane half: its controller client and configuration store.
pub struct TestAgent {
    pub client: Arc<ControlClient>,
    pub store: Arc<StateStore>,
    task: tokio::task::JoinHandle<()>,
}

impl TestAgent {
    pub async fn start(controller: &Controller, node: &str) -> TestAgent {
        let client = ControlClient::new(control_config(controller, node, TOKEN));
        client.bootstrap().await.expect("bootstrap");
        let store = Arc::new(StateStore::new(node));
        let task = tokio::spawn(client.clone().run_config(store.clone()));
        TestAgent {
            client,
            store,
            task,
        }
    }
}

impl TestAgent {
    /// Drops the agent's stream (as a network failure would) and follows again with the same
    /// store, so the agent resumes from the version it holds.
    pub fn reconnect(&mut self) {
        self.task.abort();
        self.task = tokio::spawn(self.client.clone().run_config(self.store.clone()));
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free port on 127.0.0.1, for a controller that must come back on the same address.
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// YAML of an enrolled namespace.
pub fn namespace(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    mesh.io/enrolled: \"true\"\n"
    )
}

/// YAML of a running pod on `node` with `ip`, service account `sa` and labels.
pub fn pod(
    ns: &str,
    name: &str,
    node: &str,
    ip: &str,
    sa: &str,
    app: &str,
    annotations: &str,
) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  uid: uid-{name}
  labels:
    app: {app}
  annotations: {{{annotations}}}
spec:
  nodeName: {node}
  serviceAccountName: {sa}
  containers:
  - name: app
    image: app
status:
  phase: Running
  podIP: {ip}
  podIPs:
  - ip: {ip}
"
    )
}
