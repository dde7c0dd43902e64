//! The gRPC server the agents talk to: identity (bootstrap and workload signing) and the
//! per-node configuration stream.
//!
//! Authorization: `Bootstrap` takes a bootstrap credential, for a first certificate and for
//! every renewal alike (a node certificate alone never earns the next one, so a stolen node
//! key lapses with its certificate); every other call needs a client certificate whose only URI SAN
//! is a node identity of this trust domain. The TLS layer has already verified that chain
//! against the CA; here the identity is read from it.
//!
//! The configuration stream keeps one version in flight per node: the controller sends a
//! version, the agent answers ACK or NACK, and only then does the next change go out, as a
//! delta from the version the agent holds. Per-node ACK state outlives streams, so a
//! reconnecting agent that names the version it applied gets a delta; a controller restart
//! changes the epoch, and agents get a full snapshot.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::Stream;
use mesh_api::convert;
use mesh_api::v1;
use mesh_core::SpiffeId;
use mesh_core::identity::dns_subdomain;
use mesh_core::model::NodeSnapshot;
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::auth::{Authenticator, Credential};
use crate::ca::{Ca, Issued};
use crate::compile::{CompileOptions, compile_node};
use crate::index::SharedIndex;
use crate::metrics::Metrics;

/// Settings of the server's decisions.
#[derive(Debug, Clone, Serialize)]
pub struct ServerSettings {
    /// Lifetime of workload certificates.
    pub workload_validity: Duration,
    /// Lifetime of node certificates.
    pub node_validity: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            workload_validity: Duration::from_secs(24 * 3600),
            node_validity: Duration::from_secs(24 * 3600),
        }
    }
}

pub use mesh_api::Version;

/// What the controller knows about one node's configuration.
#[derive(Debug, Clone, Serialize, Default)]
pub struct NodeStatus {
    pub connected: bool,
    /// The version in flight, not yet answered.
    pub pending: Option<Version>,
    pub acked: Option<Version>,
    pub nacked: Option<(Version, String)>,
    pub updates_sent: u64,
    #[serde(skip)]
    acked_snapshot: Option<Arc<NodeSnapshot>>,
    #[serde(skip)]
    seq: u64,
}

/// Shared state of the gRPC services.
pub struct Server {
    ca: Arc<Ca>,
    auth: Authenticator,
    index: SharedIndex,
    compile: CompileOptions,
    settings: ServerSettings,
    epoch: u64,
    nodes: Mutex<BTreeMap<String, NodeStatus>>,
    metrics: Arc<Metrics>,
    /// Set when the controller stops: every configuration stream ends.
    closing: tokio::sync::watch::Sender<bool>,
}

// === impl Server ===

impl Server {
    pub fn new(
        ca: Arc<Ca>,
        auth: Authenticator,
        index: SharedIndex,
        compile: CompileOptions,
        settings: ServerSettings,
        metrics: Arc<Metrics>,
    ) -> Arc<Server> {
        // The epoch tells versions of this process apart from those of an earlier one.
        let epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_else(|_| rand::random());
        Arc::new(Server {
            ca,
            auth,
            index,
            compile,
            settings,
            epoch,
            nodes: Mutex::new(BTreeMap::new()),
            metrics,
            closing: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Ends every configuration stream (the agents reconnect to whoever serves next).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Per-node configuration state, for the admin endpoint.
    pub fn node_status(&self) -> BTreeMap<String, NodeStatus> {
        self.nodes.lock().map(|n| n.clone()).unwrap_or_default()
    }

    pub fn identity_service(
        self: &Arc<Self>,
    ) -> v1::identity_server::IdentityServer<IdentityService> {
        v1::identity_server::IdentityServer::new(IdentityService(self.clone()))
    }

    pub fn config_service(self: &Arc<Self>) -> v1::config_server::ConfigServer<ConfigService> {
        v1::config_server::ConfigServer::new(ConfigService(self.clone()))
    }

    /// The configuration compiled for `node` from the index as it is now.
    pub fn current_snapshot(&self, node: &str) -> NodeSnapshot {
        self.snapshot(node)
    }

    fn snapshot(&self, node: &str) -> NodeSnapshot {
        let index = self.index.read();
        let mut snap = compile_node(&index, &self.compile, node);
        snap.trust_bundle = self.ca.roots_pem();
        snap
    }

    fn with_node<T>(&self, node: &str, f: impl FnOnce(&mut NodeStatus) -> T) -> T {
        let mut nodes = match self.nodes.lock() {
            Ok(n) => n,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(nodes.entry(node.to_string()).or_default())
    }

    /// The node named by a verified client certificate.
    fn caller_node(
        &self,
        certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    ) -> Result<String, Status> {
        let certs = certs.ok_or_else(|| {
            Status::unauthenticated("this call needs the agent's node certificate (mTLS)")
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let id = mesh_core::identity::from_certificate(leaf)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        if id.trust_domain() != self.ca.trust_domain() {
            return Err(Status::unauthenticated(format!(
                "{id} is not in trust domain {}",
                self.ca.trust_domain()
            )));
        }
        id.node_name()
            .map(str::to_string)
            .ok_or_else(|| Status::permission_denied(format!("{id} is not a node identity")))
    }
}

fn certificate_response(issued: Issued) -> v1::CertificateResponse {
    v1::CertificateResponse {
        chain_der: issued.chain.into_iter().map(|c| c.to_vec()).collect(),
        trust_bundle_der: issued.roots.into_iter().map(|c| c.to_vec()).collect(),
    }
}

// === Identity ===

pub struct IdentityService(Arc<Server>);

#[tonic::async_trait]
impl v1::identity_server::Identity for IdentityService {
    async fn bootstrap(
        &self,
        request: Request<v1::BootstrapRequest>,
    ) -> Result<Response<v1::CertificateResponse>, Status> {
        let server = &self.0;
        let renewing = server.caller_node(request.peer_certs()).ok();
        let req = request.into_inner();
        dns_subdomain(&req.node).map_err(|why| {
            Status::invalid_argument(format!("node name {:?} is invalid: {why}", req.node))
        })?;
        // A renewal proves the node again: the current certificate is no credential.
        let credential = match &req.credential {
            Some(v1::bootstrap_request::Credential::BootstrapToken(t)) => {
                Some(Credential::BootstrapToken(t))
            }
            Some(v1::bootstrap_request::Credential::ServiceAccountToken(t)) => {
                Some(Credential::ServiceAccountToken(t))
            }
            None => None,
        };
        if let Err(e) = server.auth.authenticate(&req.node, credential).await {
            warn!(node = %req.node, renewal = renewing.is_some(), reason = %e, "bootstrap refused");
            server.metrics.refused("bootstrap", e.kind());
            return Err(if e.is_denial() {
                Status::unauthenticated(e.to_string())
            } else {
                Status::unavailable(e.to_string())
            });
        }
        let id = SpiffeId::node(server.ca.trust_domain(), &req.node)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let issued = server
            .ca
            .sign_csr(&req.csr_der, &id, server.settings.node_validity)
            .map_err(|e| {
                server.metrics.refused("bootstrap", e.kind());
                Status::invalid_argument(e.to_string())
            })?;
        let renewal = renewing.as_deref() == Some(req.node.as_str());
        info!(node = %req.node, renewal, "node certificate issued");
        server.metrics.issued("node");
        Ok(Response::new(certificate_response(issued)))
    }

    async fn sign_workload(
        &self,
        request: Request<v1::SignWorkloadRequest>,
    ) -> Result<Response<v1::CertificateResponse>, Status> {
        let server = &self.0;
        let node = server.caller_node(request.peer_certs())?;
        let req = request.into_inner();
        let id: SpiffeId = req.spiffe_id.parse().map_err(|e| {
            server.metrics.refused("workload", "bad_identity");
            Status::invalid_argument(format!("{e}"))
        })?;
        if id.workload_parts().is_none() {
            server.metrics.refused("workload", "not_workload");
            return Err(Status::permission_denied(format!(
                "{id} is not a workload identity"
            )));
        }
        if !server.index.read().pod_on_node(&id, &node) {
            warn!(%node, identity = %id, "signing refused: no such pod on the node");
            server.metrics.refused("workload", "node_authorization");
            return Err(Status::permission_denied(format!(
                "no meshed pod with identity {id} is scheduled on node {node}"
            )));
        }
        let issued = server
            .ca
            .sign_csr(&req.csr_der, &id, server.settings.workload_validity)
            .map_err(|e| {
                server.metrics.refused("workload", e.kind());
                Status::invalid_argument(e.to_string())
            })?;
        info!(%node, identity = %id, "workload certificate issued");
        server.metrics.issued("workload");
        Ok(Response::new(certificate_response(issued)))
    }
}

// === Config ===

pub struct ConfigService(Arc<Server>);

type UpdateStream = Pin<Box<dyn Stream<Item = Result<v1::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl v1::config_server::Config for ConfigService {
    type StreamStream = UpdateStream;

    async fn stream(
        &self,
        request: Request<Streaming<v1::ConfigRequest>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let server = self.0.clone();
        let node = server.caller_node(request.peer_certs())?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream closed before subscribing"))?;
        let Some(v1::config_request::Kind::Subscribe(sub)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message must be Subscribe",
            ));
        };
        if sub.node != node {
            return Err(Status::permission_denied(format!(
                "node {node} cannot subscribe to the configuration of node {}",
                sub.node
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let resume = sub.last_applied.map(Version::from);
            server.with_node(&node, |s| s.connected = true);
            info!(%node, ?resume, "agent subscribed");
            if let Err(e) = serve_node(&server, &node, resume, &mut inbound, &tx).await {
                warn!(%node, error = %e, "configuration stream ended");
                let _ = tx.send(Err(e)).await;
            }
            server.with_node(&node, |s| {
                s.connected = false;
                s.pending = None;
            });
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Streams one node's configuration until the agent goes away.
async fn serve_node(
    server: &Server,
    node: &str,
    resume: Option<Version>,
    inbound: &mut Streaming<v1::ConfigRequest>,
    tx: &mpsc::Sender<Result<v1::ConfigUpdate, Status>>,
) -> Result<(), Status> {
    let mut changes = server.index.subscribe();
    let mut closing = server.closing.subscribe();
    if *closing.borrow_and_update() {
        return Err(Status::unavailable("the controller is shutting down"));
    }
    // What the agent holds: the snapshot it ACKed, when it names that version on resume.
    let mut base: Option<(Version, Arc<NodeSnapshot>)> =
        server.with_node(node, |s| match (resume, s.acked, &s.acked_snapshot) {
            (Some(r), Some(a), Some(snap)) if r == a => Some((a, snap.clone())),
            _ => None,
        });
    // The version in flight and the snapshot it carries.
    let mut pending: Option<(Version, Arc<NodeSnapshot>)> = None;
    // The last snapshot the agent refused: not sent again until the configuration changes.
    let mut refused: Option<Arc<NodeSnapshot>> = None;
    // The index generation last compiled: an ACK or NACK alone changes nothing to compile.
    let mut compiled: Option<u64> = None;
    loop {
        // Nothing in flight and the index moved: send what changed since the version the
        // agent holds.
        let generation = *changes.borrow_and_update();
        if pending.is_none() && compiled != Some(generation) {
            compiled = Some(generation);
            let snap = Arc::new(server.snapshot(node));
            let unchanged = base.as_ref().is_some_and(|(_, b)| **b == *snap)
                || refused.as_ref().is_some_and(|r| **r == *snap);
            if !unchanged {
                let (upserts, removals) = convert::diff(base.as_ref().map(|(_, b)| &**b), &snap);
                let seq = server.with_node(node, |s| {
                    s.seq += 1;
                    s.updates_sent += 1;
                    s.seq
                });
                let version = Version {
                    epoch: server.epoch,
                    seq,
                };
                let update = v1::ConfigUpdate {
                    version: Some(version.into()),
                    full: base.is_none(),
                    base: base.as_ref().map(|(v, _)| (*v).into()),
                    upserts,
                    removals,
                };
                server.metrics.pushed(update.full);
                tx.send(Ok(update))
                    .await
                    .map_err(|_| Status::cancelled("the agent went away"))?;
                server.with_node(node, |s| s.pending = Some(version));
                pending = Some((version, snap));
            }
        }
        tokio::select! {
            _ = closing.changed() => {
                return Err(Status::unavailable("the controller is shutting down"));
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    return Err(Status::unavailable("the controller is shutting down"));
                }
            }
            msg = inbound.message() => {
                let Some(msg) = msg? else { return Ok(()) };
                let (answered, nack) = match msg.kind {
                    Some(v1::config_request::Kind::Ack(a)) => (a.version, None),
                    Some(v1::config_request::Kind::Nack(n)) => (n.version, Some(n.reason)),
                    _ => return Err(Status::invalid_argument("expected ACK or NACK")),
                };
                let Some((version, snap)) = pending.take() else {
                    return Err(Status::invalid_argument("ACK or NACK with no version in flight"));
                };
                let answered = answered.map(Version::from);
                if answered != Some(version) {
                    return Err(Status::invalid_argument(format!(
                        "answer for {answered:?}, but {version:?} is in flight"
                    )));
                }
                match nack {
                    None => {
                        server.with_node(node, |s| {
                            s.pending = None;
                            s.acked = Some(version);
                            s.acked_snapshot = Some(snap.clone());
                        });
                        base = Some((version, snap));
                        refused = None;
                    }
                    Some(reason) => {
                        warn!(%node, seq = version.seq, %reason, "agent refused a configuration");
                        server.metrics.nacked();
                        server.with_node(node, |s| {
                            s.pending = None;
                            s.nacked = Some((version, reason));
                        });
                        refused = Some(snap);
                    }
                }
                // Changes that arrived while a version was in flight go out now.
            }
        }
    }
}
