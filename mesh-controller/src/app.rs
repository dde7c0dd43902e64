//! The composition root: CA, index and sources, gRPC server, admin endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tracing::info;

use crate::admin::{self, AdminState};
use crate::auth::Authenticator;
use crate::ca::{self, Ca, CaError};
use crate::config::{Bootstrap, CaSource, Config, Source};
use crate::index::SharedIndex;
use crate::leader::{self, Election, Leadership};
use crate::metrics::Metrics;
use crate::server::Server;
use crate::source;
use crate::trust_bundle;

/// Lifetime of the controller's own serving certificate; it is reissued at every start.
const SERVING_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving certificate: {0}")]
    Serving(String),
    #[error("local source: {0}")]
    Source(String),
}

/// A running controller.
pub struct Controller {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub server: Arc<Server>,
    pub index: SharedIndex,
    /// PEM of the trust roots agents need to verify the controller.
    pub roots_pem: String,
    shutdown: Option<oneshot::Sender<()>>,
    grpc_task: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Controller {
    /// Stops serving: the gRPC server closes its streams, the sources and admin stop.
    pub async fn shutdown(mut self) {
        self.server.close();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Streams end at once; give connections a moment to close cleanly.
        if let Some(grpc) = self.grpc_task.take() {
            let abort = grpc.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), grpc)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.server.close();
        if let Some(t) = &self.grpc_task {
            t.abort();
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The labels of the objects the controller creates (the CA Secret, the trust bundle).
pub fn part_of_mesh() -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([(
        "app.kubernetes.io/part-of".to_string(),
        "mesh".to_string(),
    )])
}

async fn kube_client() -> Result<kube::Client, StartError> {
    Ok(kube::Client::try_default().await?)
}

async fn load_ca(config: &Config) -> Result<Ca, StartError> {
    let td = &config.trust_domain;
    Ok(match &config.ca {
        CaSource::Dir(dir) => Ca::load_or_create_dir(dir, td)?,
        CaSource::Files { cert, key, roots } => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|source| CaError::Read {
                    path: p.to_path_buf(),
                    source,
                })
            };
            let roots = roots.as_deref().map(read).transpose()?;
            Ca::from_pem(td, &read(cert)?, &read(key)?, roots.as_deref())?
        }
        CaSource::Secret { namespace, name } => {
            let api = kube::Api::<Secret>::namespaced(kube_client().await?, namespace);
            ca::secret::load_or_create(&api, name, td).await?
        }
    })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Starts the controller and returns once it serves.
pub async fn start(config: Config) -> Result<Controller, StartError> {
    info!(config = %serde_json::to_string(&config).unwrap_or_default(), "starting");
    let ca = Arc::new(load_ca(&config).await?);
    let roots_pem = ca.roots_pem().concat();
    let auth = match &config.bootstrap {
        Bootstrap::TokenFile { path, wildcards } => Authenticator::token_file(path, *wildcards),
        Bootstrap::TokenReview {
            namespace,
            service_account,
            audiences,
        } => Authenticator::token_review(
            kube_client().await?,
            namespace,
            service_account,
            audiences.clone(),
        ),
    };

    let index = SharedIndex::new();
    let mut tasks = Vec::new();
    match &config.source {
        Source::Local(dir) => {
            // The directory is the operator's own description: it may locate pods.
            index.update(|i| i.set_locates_pods(true));
            let (ready_tx, ready_rx) = oneshot::channel();
            let (dir, idx) = (dir.clone(), index.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = source::local::run(dir, idx, Some(ready_tx)).await {
                    tracing::error!(error = %e, "local source stopped");
                }
            }));
            ready_rx
                .await
                .map_err(|_| StartError::Source("the directory could not be read".into()))?;
        }
        Source::Kubernetes => {
            let client = kube_client().await?;
            let leadership = match &config.leader_election {
                Some(election) => {
                    let api =
                        kube::Api::<Lease>::namespaced(client.clone(), &election.lease.namespace);
                    let (leadership, task) = Election::new(
                        api,
                        &election.lease.name,
                        &election.holder,
                        leader::LEASE_DURATION,
                    )
                    .start();
                    tasks.push(task);
                    leadership
                }
                None => Leadership::always(),
            };
            if let Some(bundle) = &config.trust_bundle {
                let api = kube::Api::<ConfigMap>::namespaced(client.clone(), &bundle.namespace);
                tasks.push(tokio::spawn(trust_bundle::keep(
                    api,
                    bundle.name.clone(),
                    roots_pem.clone(),
                    leadership.clone(),
                )));
            }
            tasks.push(tokio::spawn({
                let client = client.clone();
                async move {
                    source::gateway_api::check(client).await;
                }
            }));
            let idx = index.clone();
            tasks.push(tokio::spawn(async move {
                source::kube::run(client, idx, leadership).await;
            }));
        }
    }

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let server = Server::new(
        ca.clone(),
        auth,
        index.clone(),
        config.compile_options(),
        config.server.clone(),
        metrics,
    );

    let (issued, key) = ca
        .issue_server(&config.server_names, SERVING_CERT_VALIDITY)
        .map_err(|e| StartError::Serving(e.to_string()))?;
    let chain_pem: String = issued.chain.iter().map(ca::der_to_pem).collect();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(chain_pem, key.serialize_pem()))
        .client_ca_root(Certificate::from_pem(&roots_pem))
        .client_auth_optional(true);
    let grpc = bind(config.listen).await?;
    let grpc_addr = grpc.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(|e| StartError::Serving(e.to_string()))?
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(server.identity_service())
        .add_service(server.config_service());
    let grpc_task = tokio::spawn(async move {
        let stop = async {
            let _ = shutdown_rx.await;
        };
        if let Err(e) = router
            .serve_with_incoming_shutdown(TcpIncoming::from(grpc), stop)
            .await
        {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    });

    let admin_listener = bind(config.admin).await?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin,
            source,
        })?;
    let admin_state = Arc::new(AdminState {
        config,
        index: index.clone(),
        server: server.clone(),
        registry,
    });
    tasks.push(tokio::spawn(admin::serve(admin_listener, admin_state)));
    info!(%grpc_addr, %admin_addr, "controller serving");
    Ok(Controller {
        grpc_addr,
        admin_addr,
        server,
        index,
        roots_pem,
        shutdown: Some(shutdown_tx),
        grpc_task: Some(grpc_task),
        tasks,
    })
}
