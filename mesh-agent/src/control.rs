//! The agent's connection to the controller: bootstrap, the node certificate, workload
//! signing and the configuration stream.
//!
//! The agent first proves its node with a bootstrap credential (a token in local mode, its
//! projected ServiceAccount token in cluster mode) and receives a node certificate for a key it
//! generated itself. Every later call is authenticated by that certificate (mTLS). The node
//! certificate is renewed at half life with a fresh proof, the bootstrap credential read
//! again (the controller takes no certificate as proof of itself, so node credentials lapse
//! with the credential they were issued for); the current certificate is still presented
//! over mTLS while it is valid.
//!
//! The configuration stream reconnects with jittered exponential backoff; while the
//! controller is away the agent keeps serving its last good configuration, and on reconnect it
//! names the version it holds so the controller can resume with a delta.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use mesh_api::v1;
use mesh_core::SpiffeId;
use mesh_core::identity::TrustDomain;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::{info, warn};

use mesh_proxy::state::StateStore;

/// How the agent proves its node at bootstrap.
#[derive(Debug, Clone)]
pub enum BootstrapCredential {
    /// Local mode: a token from the controller's token file.
    Token(String),
    /// Local mode: a file holding that token, re-read at each use so that a rotated token
    /// takes effect at the next renewal.
    TokenFile(PathBuf),
    /// Cluster mode: a file holding the projected ServiceAccount token, re-read at each use
    /// because the kubelet rotates it.
    ServiceAccountTokenFile(PathBuf),
}

/// The controller connection's settings.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// `https://host:port` of the controller.
    pub address: String,
    /// The name the controller's certificate must carry.
    pub server_name: String,
    /// PEM roots that verify the controller.
    pub controller_roots_pem: String,
    pub node: String,
    pub trust_domain: TrustDomain,
    pub credential: BootstrapCredential,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

/// Why a call to the controller failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    #[error("controller address {0:?}: {1}")]
    Address(String, String),
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("key or CSR: {0}")]
    Key(String),
    #[error("read the bootstrap credential {0}: {1}")]
    Credential(String, String),
    #[error("the controller refused {call}: {message}")]
    Refused { call: &'static str, message: String },
    #[error("the controller is unreachable for {call}: {message}")]
    Unreachable { call: &'static str, message: String },
    #[error("the controller returned an unusable certificate: {0}")]
    BadCertificate(String),
    #[error("no node certificate yet: bootstrap first")]
    NotBootstrapped,
}

impl ControlError {
    pub fn kind(&self) -> &'static str {
        match self {
            ControlError::Address(..) => "address",
            ControlError::Tls(_) => "tls",
            ControlError::Key(_) => "key",
            ControlError::Credential(..) => "credential",
            ControlError::Refused { .. } => "refused",
            ControlError::Unreachable { .. } => "unreachable",
            ControlError::BadCertificate(_) => "bad_certificate",
            ControlError::NotBootstrapped => "not_bootstrapped",
        }
    }

    fn from_status(call: &'static str, s: tonic::Status) -> ControlError {
        use tonic::Code;
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                ControlError::Unreachable {
                    call,
                    message: s.message().to_string(),
                }
            }
            _ => ControlError::Refused {
                call,
                message: s.message().to_string(),
            },
        }
    }
}

/// The agent's node certificate.
#[derive(Clone)]
pub struct NodeCertificate {
    pub chain_pem: String,
    key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl NodeCertificate {
    /// When to renew: half way through the lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }

    pub fn expired(&self) -> bool {
        SystemTime::now() >= self.not_after
    }
}

/// The connection's state, for the debugging commands.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlStatus {
    pub connected: bool,
    pub node_cert_not_after: Option<u64>,
    pub last_error: Option<String>,
    pub reconnects: u64,
}

/// A leaf and chain signed by the controller, DER, leaf first; and the trust roots.
pub struct Signed {
    pub chain: Vec<Vec<u8>>,
    pub roots: Vec<Vec<u8>>,
}

/// The agent's client of the controller.
pub struct ControlClient {
    config: ControlConfig,
    node_cert: RwLock<Option<NodeCertificate>>,
    channel: RwLock<Option<Channel>>,
    status: Mutex<ControlStatus>,
}

// === impl ControlClient ===

impl ControlClient {
    pub fn new(config: ControlConfig) -> Arc<ControlClient> {
        Arc::new(ControlClient {
            config,
            node_cert: RwLock::new(None),
            channel: RwLock::new(None),
            status: Mutex::new(ControlStatus::default()),
        })
    }

    pub fn node(&self) -> &str {
        &self.config.node
    }

    pub fn status(&self) -> ControlStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn node_certificate(&self) -> Option<NodeCertificate> {
        self.node_cert.read().ok().and_then(|c| c.clone())
    }

    fn set_status(&self, f: impl FnOnce(&mut ControlStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    fn endpoint(&self, identity: Option<&NodeCertificate>) -> Result<Endpoint, ControlError> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.config.controller_roots_pem))
            .domain_name(self.config.server_name.clone());
        if let Some(cert) = identity {
            tls = tls.identity(Identity::from_pem(&cert.chain_pem, &cert.key_pem));
        }
        Endpoint::from_shared(self.config.address.clone())
            .map_err(|e| ControlError::Address(self.config.address.clone(), e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .tls_config(tls)
            .map_err(|e| ControlError::Tls(e.to_string()))
    }

    /// The channel authenticated by the node certificate.
    fn channel(&self) -> Result<Channel, ControlError> {
        if let Some(c) = self.channel.read().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        let cert = self
            .node_certificate()
            .ok_or(ControlError::NotBootstrapped)?;
        let channel = self.endpoint(Some(&cert))?.connect_lazy();
        if let Ok(mut slot) = self.channel.write() {
            *slot = Some(channel.clone());
        }
        Ok(channel)
    }

    fn credential(&self) -> Result<v1::bootstrap_request::Credential, ControlError> {
        use v1::bootstrap_request::Credential as C;
        Ok(match &self.config.credential {
            BootstrapCredential::Token(t) => C::BootstrapToken(t.clone()),
            BootstrapCredential::TokenFile(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    ControlError::Credential(path.display().to_string(), e.to_string())
                })?;
                C::BootstrapToken(token.trim().to_string())
            }
            BootstrapCredential::ServiceAccountTokenFile(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    ControlError::Credential(path.display().to_string(), e.to_string())
                })?;
                C::ServiceAccountToken(token.trim().to_string())
            }
        })
    }

    /// Obtains (or renews) the node certificate, proving the node with the bootstrap
    /// credential each time.
    pub async fn bootstrap(&self) -> Result<(), ControlError> {
        let id = SpiffeId::node(&self.config.trust_domain, &self.config.node)
            .map_err(|e| ControlError::Key(e.to_string()))?;
        let (key, csr) = new_key_and_csr(&id)?;
        let current = self.node_certificate().filter(|c| !c.expired());
        let credential = Some(self.credential()?);
        let channel = self.endpoint(current.as_ref())?.connect_lazy();
        let response = v1::identity_client::IdentityClient::new(channel)
            .bootstrap(v1::BootstrapRequest {
                node: self.config.node.clone(),
                csr_der: csr,
                credential,
            })
            .await
            .map_err(|s| ControlError::from_status("bootstrap", s))?
            .into_inner();
        let cert = node_certificate(&id, &key, &response)?;
        info!(node = %self.config.node, renewal = current.is_some(), "node certificate received");
        let not_after = cert
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok();
        if let Ok(mut slot) = self.node_cert.write() {
            *slot = Some(cert);
        }
        // The next call opens a channel with the new certificate.
        if let Ok(mut slot) = self.channel.write() {
            *slot = None;
        }
        self.set_status(|s| s.node_cert_not_after = not_after);
        Ok(())
    }

    /// Asks the controller to sign a workload certificate.
    pub async fn sign_workload(
        &self,
        id: &SpiffeId,
        csr_der: Vec<u8>,
    ) -> Result<Signed, ControlError> {
        let response = v1::identity_client::IdentityClient::new(self.channel()?)
            .sign_workload(v1::SignWorkloadRequest {
                spiffe_id: id.uri(),
                csr_der,
            })
            .await
            .map_err(|s| ControlError::from_status("sign_workload", s))?
            .into_inner();
        if response.chain_der.is_empty() {
            return Err(ControlError::BadCertificate("empty chain".into()));
        }
        Ok(Signed {
            chain: response.chain_der,
            roots: response.trust_bundle_der,
        })
    }

    /// Keeps the node certificate fresh: renews at half life, retries with backoff.
    pub async fn run_node_renewal(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.config.min_backoff, self.config.max_backoff);
        loop {
            let wait = match self.node_certificate() {
                Some(c) => c
                    .renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default(),
                None => Duration::ZERO,
            };
            tokio::time::sleep(wait).await;
            match self.bootstrap().await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    warn!(error = %e, "node certificate renewal failed");
                    self.set_status(|s| s.last_error = Some(e.to_string()));
                    tokio::time::sleep(backoff.next_wait()).await;
                }
            }
        }
    }

    /// Follows the configuration stream into `store` for ever, reconnecting with backoff.
    pub async fn run_config(self: Arc<Self>, store: Arc<StateStore>) {
        let mut backoff = Backoff::new(self.config.min_backoff, self.config.max_backoff);
        loop {
            let result = self.follow(&store, &mut backoff).await;
            self.set_status(|s| {
                s.connected = false;
                s.reconnects += 1;
                if let Err(e) = &result {
                    s.last_error = Some(e.to_string());
                }
            });
            if let Err(e) = result {
                warn!(error = %e, "configuration stream lost; serving the last good configuration");
                let needs_bootstrap = matches!(e, ControlError::NotBootstrapped)
                    || self.node_certificate().is_some_and(|c| c.expired());
                if needs_bootstrap && let Err(e) = self.bootstrap().await {
                    warn!(error = %e, "bootstrap failed");
                }
            }
            tokio::time::sleep(backoff.next_wait()).await;
        }
    }

    async fn follow(&self, store: &StateStore, backoff: &mut Backoff) -> Result<(), ControlError> {
        let channel = self.channel()?;
        let (tx, rx) = mpsc::channel(4);
        let subscribe = v1::ConfigRequest {
            kind: Some(v1::config_request::Kind::Subscribe(v1::Subscribe {
                node: self.config.node.clone(),
                last_applied: store.current().version.map(Into::into),
            })),
        };
        let _ = tx.send(subscribe).await;
        let mut updates = v1::config_client::ConfigClient::new(channel)
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| ControlError::from_status("config stream", s))?
            .into_inner();
        self.set_status(|s| s.connected = true);
        loop {
            let update = updates
                .message()
                .await
                .map_err(|s| ControlError::from_status("config stream", s))?
                .ok_or(ControlError::Unreachable {
                    call: "config stream",
                    message: "the controller closed the stream".into(),
                })?;
            backoff.reset();
            let answer = match store.apply(&update) {
                Ok(version) => {
                    info!(
                        seq = version.seq,
                        full = update.full,
                        "configuration applied"
                    );
                    v1::config_request::Kind::Ack(v1::Ack {
                        version: Some(version.into()),
                    })
                }
                Err(e) => {
                    warn!(error = %e, "configuration refused; keeping the last good one");
                    v1::config_request::Kind::Nack(v1::Nack {
                        version: update.version,
                        reason: e.to_string(),
                    })
                }
            };
            if tx
                .send(v1::ConfigRequest { kind: Some(answer) })
                .await
                .is_err()
            {
                return Err(ControlError::Unreachable {
                    call: "config stream",
                    message: "the stream closed".into(),
                });
            }
        }
    }
}

/// A fresh P-256 key and a CSR whose only SAN is `id`.
pub fn new_key_and_csr(id: &SpiffeId) -> Result<(KeyPair, Vec<u8>), ControlError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ControlError::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    let uri = id
        .uri()
        .try_into()
        .map_err(|e: rcgen::Error| ControlError::Key(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| ControlError::Key(e.to_string()))?;
    Ok((key, csr.der().to_vec()))
}

fn node_certificate(
    id: &SpiffeId,
    key: &KeyPair,
    response: &v1::CertificateResponse,
) -> Result<NodeCertificate, ControlError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let leaf = response
        .chain_der
        .first()
        .ok_or_else(|| ControlError::BadCertificate("empty chain".into()))?;
    let (_, parsed) =
        X509Certificate::from_der(leaf).map_err(|e| ControlError::BadCertificate(e.to_string()))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(ControlError::BadCertificate(
            "the leaf is not for our key".into(),
        ));
    }
    let uri_ok = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value.general_names.iter().any(
                |n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == id.uri()),
            )
        });
    if !uri_ok {
        return Err(ControlError::BadCertificate(format!(
            "the leaf does not name {id}"
        )));
    }
    let ts = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let chain_pem = response
        .chain_der
        .iter()
        .map(|der| pem_encode(der))
        .collect::<String>();
    Ok(NodeCertificate {
        chain_pem,
        key_pem: key.serialize_pem(),
        not_before: ts(parsed.validity().not_before.timestamp()),
        not_after: ts(parsed.validity().not_after.timestamp()),
    })
}

fn pem_encode(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Jittered exponential backoff.
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next wait: uniformly between half and all of the current step, which doubles up to
    /// the maximum.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        half + step.mul_f64(rand::random::<f64>() * 0.5)
    }
}

/// The controller as the certificate manager's signer.
pub struct GrpcSigner(pub Arc<ControlClient>);

impl mesh_proxy::identity::Signer for GrpcSigner {
    async fn sign(
        &self,
        id: &SpiffeId,
        csr_der: Vec<u8>,
    ) -> Result<mesh_proxy::identity::SignedCert, mesh_proxy::identity::SignError> {
        use mesh_proxy::identity::{SignError, SignedCert};
        use rustls::pki_types::CertificateDer;
        match self.0.sign_workload(id, csr_der).await {
            Ok(signed) => Ok(SignedCert {
                chain: signed.chain.into_iter().map(CertificateDer::from).collect(),
                roots: signed.roots.into_iter().map(CertificateDer::from).collect(),
            }),
            Err(ControlError::Refused { message, .. }) => Err(SignError::Refused(message)),
            Err(e) => Err(SignError::Unavailable(e.to_string())),
        }
    }
}

// === The agent's control plane ===

/// The running control-plane half of the agent: controller client, configuration store and
/// the workload certificates its pods need.
pub struct ControlPlane {
    pub client: Arc<ControlClient>,
    pub store: Arc<StateStore>,
    pub certs: Arc<mesh_proxy::identity::CertManager>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the control-plane tasks. Bootstrap is retried in the background with backoff: the
/// datapath and proxy do not wait for the controller.
pub fn start(
    settings: &crate::config::ControllerSettings,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<ControlPlane, ControlError> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map_err(|e| ControlError::Credential(p.display().to_string(), e.to_string()))
    };
    let credential = match &settings.credential {
        crate::config::CredentialSource::BootstrapTokenFile(p) => {
            // Read now so that a missing file fails the start, and again at each renewal.
            read(p)?;
            BootstrapCredential::TokenFile(p.clone())
        }
        crate::config::CredentialSource::ServiceAccountTokenFile(p) => {
            BootstrapCredential::ServiceAccountTokenFile(p.clone())
        }
    };
    let trust_domain =
        TrustDomain::new(&settings.trust_domain).map_err(|e| ControlError::Key(e.to_string()))?;
    let client = ControlClient::new(ControlConfig {
        address: settings.address.clone(),
        server_name: settings.server_name.clone(),
        controller_roots_pem: read(&settings.ca_file)?,
        node: settings.node.clone(),
        trust_domain,
        credential,
        min_backoff: Duration::from_millis(250),
        max_backoff: Duration::from_secs(30),
    });
    let store = Arc::new(StateStore::new(&settings.node));
    let certs = mesh_proxy::identity::CertManager::new(
        GrpcSigner(client.clone()),
        mesh_proxy::identity::CertConfig::default(),
        registry,
    )
    .map_err(|e| ControlError::Key(e.to_string()))?;
    let mut tasks = Vec::new();
    let (c, s) = (client.clone(), store.clone());
    tasks.push(tokio::spawn(async move {
        let mut backoff = Backoff::new(c.config.min_backoff, c.config.max_backoff);
        while let Err(e) = c.bootstrap().await {
            warn!(error = %e, "bootstrap failed; retrying");
            c.set_status(|st| st.last_error = Some(e.to_string()));
            tokio::time::sleep(backoff.next_wait()).await;
        }
        let renew = tokio::spawn(c.clone().run_node_renewal());
        c.run_config(s).await;
        renew.abort();
    }));
    tasks.push(tokio::spawn(keep_identities(store.clone(), certs.clone())));
    Ok(ControlPlane {
        client,
        store,
        certs,
        tasks,
    })
}

/// Keeps a certificate for every identity of the node's workloads and the trust bundle of
/// the configuration in force.
pub async fn keep_identities(
    store: Arc<StateStore>,
    certs: Arc<mesh_proxy::identity::CertManager>,
) {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use std::collections::BTreeSet;
    let mut changes = store.subscribe();
    let mut held: BTreeSet<SpiffeId> = BTreeSet::new();
    loop {
        let applied = changes.borrow_and_update().clone();
        let roots: Vec<CertificateDer<'static>> = applied
            .snapshot
            .trust_bundle
            .iter()
            .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()))
            .filter_map(Result::ok)
            .collect();
        if !roots.is_empty()
            && let Err(e) = certs.set_trust_bundle(roots)
        {
            warn!(error = %e, "trust bundle refused");
        }
        let wanted: BTreeSet<SpiffeId> = applied
            .snapshot
            .workloads
            .values()
            .map(|w| w.identity.clone())
            .collect();
        for id in wanted.difference(&held) {
            let (certs, id) = (certs.clone(), id.clone());
            tokio::spawn(async move {
                if let Err(e) = certs.fetch(&id).await {
                    warn!(identity = %id, error = %e, "workload certificate not issued");
                }
            });
        }
        for id in held.difference(&wanted) {
            certs.forget(id);
        }
        held = wanted;
        if changes.changed().await.is_err() {
            return;
        }
    }
}
