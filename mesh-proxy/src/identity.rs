//! Workload certificates held on the pods' behalf: on-demand issuance and rotation.
//!
//! [`CertManager`] obtains one certificate per SPIFFE identity: it generates a P-256 key
//! locally, sends a CSR naming the identity as its only SAN to a [`Signer`] (the controller's
//! CA over gRPC), checks that the returned leaf is for our key and our identity, and serves it
//! to the rustls resolvers of [`crate::tls`] through the non-blocking [`CertManager::current`].
//!
//! Each identity then gets a renewal task that replaces the certificate at a fraction
//! (default half) of its validity. A failed renewal is retried with jittered exponential
//! backoff; meanwhile the last certificate is served until it actually expires, and never
//! after. Connections already established are never touched by a rotation.
//!
//! The trust bundle (the CA roots peers are verified against) is replaced in place with
//! [`CertManager::set_trust_bundle`]; the verifiers read it at each handshake.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use mesh_core::SpiffeId;
use prometheus_client::registry::Registry;
use rcgen::KeyPair;
use rustls::RootCertStore;
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod cert;
mod metrics;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use cert::{Leaf, new_key_and_csr, rfc3339, unix_secs};
use metrics::Metrics;

/// The shortest wait the manager ever schedules, so a broken certificate can't spin a core.
const MIN_DELAY: Duration = Duration::from_millis(10);

// === Signer ===

/// A certificate returned by a [`Signer`].
#[derive(Clone, Debug)]
pub struct SignedCert {
    /// The leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The CA roots the chain leads to.
    pub roots: Vec<CertificateDer<'static>>,
}

/// Signs CSRs for identities: the controller's CA, over gRPC.
pub trait Signer: Send + Sync + 'static {
    fn sign(
        &self,
        id: &SpiffeId,
        csr_der: Vec<u8>,
    ) -> impl Future<Output = Result<SignedCert, SignError>> + Send;
}

/// Why a [`Signer`] returned no certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The CA could not be reached or did not answer; worth retrying.
    #[error("the CA is unavailable: {0}")]
    Unavailable(String),
    /// The CA refused to sign (not authorized for this identity, bad CSR).
    #[error("the CA refused to sign: {0}")]
    Refused(String),
    /// The CA answered with something that is not a certificate chain.
    #[error("the CA sent an invalid response: {0}")]
    InvalidResponse(String),
}

impl SignError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SignError::Unavailable(_) => "unavailable",
            SignError::Refused(_) => "refused",
            SignError::InvalidResponse(_) => "invalid_response",
        }
    }
}

type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<SignedCert, SignError>> + Send + 'a>>;

/// [`Signer`] made object safe, so the manager is not generic over it.
trait DynSigner: Send + Sync + 'static {
    fn sign_boxed<'a>(&'a self, id: &'a SpiffeId, csr_der: Vec<u8>) -> SignFuture<'a>;
}

impl<S: Signer> DynSigner for S {
    fn sign_boxed<'a>(&'a self, id: &'a SpiffeId, csr_der: Vec<u8>) -> SignFuture<'a> {
        Box::pin(self.sign(id, csr_der))
    }
}

// === Errors ===

/// Why the manager has no certificate (or no trust bundle) to offer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("invalid certificate configuration: {0}")]
    Config(String),
    #[error("build a key and CSR for {id}: {reason}")]
    Csr { id: SpiffeId, reason: String },
    #[error("sign a certificate for {id}: {source}")]
    Sign { id: SpiffeId, source: SignError },
    #[error("the certificate signed for {id} is unusable: {reason}")]
    BadCert { id: SpiffeId, reason: String },
    #[error("the certificate signed for {id} is unusable: {source}")]
    UnreadableCert {
        id: SpiffeId,
        source: cert::LeafError,
    },
    #[error("the certificate of {id} expired at {not_after} and renewing it failed: {cause}")]
    Expired {
        id: SpiffeId,
        not_after: String,
        cause: String,
    },
    #[error("issuance for {id} was cancelled (identity forgotten or manager stopped)")]
    Cancelled { id: SpiffeId },
    #[error("trust bundle rejected: {0}")]
    TrustBundle(String),
}

impl CertError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CertError::Config(_) => "config",
            CertError::Csr { .. } => "csr",
            CertError::Sign { .. } => "sign",
            CertError::BadCert { .. } | CertError::UnreadableCert { .. } => "bad_cert",
            CertError::Expired { .. } => "expired",
            CertError::Cancelled { .. } => "cancelled",
            CertError::TrustBundle(_) => "trust_bundle",
        }
    }
}

// === Configuration ===

/// When certificates are renewed and how failed renewals are retried.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CertConfig {
    /// The fraction of a certificate's validity after which it is renewed.
    pub renew_fraction: f64,
    /// The first retry delay after a failed renewal.
    pub min_backoff: Duration,
    /// The longest retry delay. Both bounds shrink for short-lived certificates so that
    /// several retries fit before expiry (see [`CertConfig::backoff`]).
    pub max_backoff: Duration,
}

impl Default for CertConfig {
    fn default() -> Self {
        CertConfig {
            renew_fraction: 0.5,
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl CertConfig {
    pub fn validate(&self) -> Result<(), CertError> {
        if !(self.renew_fraction > 0.0 && self.renew_fraction < 1.0) {
            return Err(CertError::Config(format!(
                "renew_fraction {} is not strictly between 0 and 1",
                self.renew_fraction
            )));
        }
        if self.min_backoff.is_zero() || self.min_backoff > self.max_backoff {
            return Err(CertError::Config(format!(
                "backoff bounds {:?} .. {:?} must be non-zero and ordered",
                self.min_backoff, self.max_backoff
            )));
        }
        Ok(())
    }

    /// The delay before retry `attempt` (1 for the first) of a certificate valid for
    /// `lifetime`, before jitter: doubling from `min_backoff` up to `max_backoff`, both capped
    /// so that at least about four retries fit in the second half of the lifetime.
    pub fn backoff(&self, attempt: u32, lifetime: Duration) -> Duration {
        let cap = self.max_backoff.min(lifetime / 8).max(MIN_DELAY);
        let floor = self.min_backoff.min(cap / 4).max(MIN_DELAY).min(cap);
        let doublings = attempt.saturating_sub(1).min(20);
        floor.saturating_mul(1u32 << doublings).min(cap)
    }

    /// When to renew a certificate valid from `not_before` to `not_after`, received at `now`.
    /// Normally `not_before + fraction * lifetime`; if that is already past (a backdated or
    /// late certificate), the same fraction of what is left, so renewal never spins.
    fn renew_at(
        &self,
        not_before: SystemTime,
        not_after: SystemTime,
        now: SystemTime,
    ) -> SystemTime {
        let lifetime = not_after.duration_since(not_before).unwrap_or_default();
        let planned = not_before + lifetime.mul_f64(self.renew_fraction);
        if planned > now {
            return planned;
        }
        let left = not_after.duration_since(now).unwrap_or_default();
        now + left.mul_f64(self.renew_fraction).max(MIN_DELAY)
    }
}

/// A uniformly random delay in `[d/2, d]`, so agents don't retry in lockstep.
fn jitter(d: Duration) -> Duration {
    use rand::Rng as _;
    let hi = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(hi / 2..=hi))
}

// === Debug view ===

/// Where an identity's certificate stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertState {
    /// The first certificate is being requested.
    Issuing,
    /// No certificate: the last attempt failed.
    Failed,
    /// Valid and not yet due for renewal.
    Valid,
    /// Valid but due: a renewal is in progress or being retried.
    Renewing,
    /// Expired: nothing is served until a renewal succeeds.
    Expired,
}

impl CertState {
    /// The name `/debug/certs` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Issuing => "issuing",
            CertState::Failed => "failed",
            CertState::Valid => "valid",
            CertState::Renewing => "renewing",
            CertState::Expired => "expired",
        }
    }

    /// A certificate is served (valid, or valid and being renewed).
    pub fn serving(self) -> bool {
        matches!(self, CertState::Valid | CertState::Renewing)
    }
}

/// One identity's certificate, for the debug command. Times are RFC 3339, UTC.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertInfo {
    pub identity: SpiffeId,
    pub state: CertState,
    pub serial: Option<String>,
    pub issuer: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    /// The next renewal attempt (planned or retry).
    pub next_rotation: Option<String>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

// === Trust bundle ===

/// The CA roots peers are verified against, as given and as a rustls store.
#[derive(Debug)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
}

impl TrustBundle {
    fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self, CertError> {
        let mut store = RootCertStore::empty();
        for (i, der) in certs.iter().enumerate() {
            store
                .add(der.clone())
                .map_err(|e| CertError::TrustBundle(format!("root #{i}: {e}")))?;
        }
        Ok(TrustBundle {
            certs,
            store: Arc::new(store),
        })
    }

    fn empty() -> Self {
        TrustBundle {
            certs: Vec::new(),
            store: Arc::new(RootCertStore::empty()),
        }
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    pub fn store(&self) -> &Arc<RootCertStore> {
        &self.store
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

// === impl CertManager ===

/// Issues, renews and serves the certificates of the identities the agent holds.
/// Dropping it stops every renewal.
pub struct CertManager {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = read(&self.shared.entries)
            .keys()
            .map(|id| id.uri())
            .collect();
        f.debug_struct("CertManager")
            .field("identities", &ids)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl CertManager {
    /// A manager using `signer`, registering its metrics into `registry`.
    pub fn new<S: Signer>(
        signer: S,
        config: CertConfig,
        registry: &mut Registry,
    ) -> Result<Arc<Self>, CertError> {
        config.validate()?;
        Ok(Arc::new(CertManager {
            shared: Arc::new(Shared {
                signer: Box::new(signer),
                config,
                metrics: Metrics::register(registry),
                bundle: RwLock::new(Arc::new(TrustBundle::empty())),
                entries: RwLock::new(HashMap::new()),
            }),
        }))
    }

    pub fn config(&self) -> &CertConfig {
        &self.shared.config
    }

    /// The certificate of `id`, issued now if there is no valid one. Concurrent calls for the
    /// same identity share one issuance. After the first success the identity is renewed in
    /// the background until [`CertManager::forget`].
    pub async fn fetch(&self, id: &SpiffeId) -> Result<Arc<CertifiedKey>, CertError> {
        let entry = self.shared.entry(id);
        let previous = entry.latest();
        if let Some(p) = &previous
            && SystemTime::now() < p.not_after
        {
            return Ok(p.key.clone());
        }
        match self.shared.issue(&entry).await {
            Ok(issued) => Ok(issued.key.clone()),
            Err(e) => match previous {
                Some(p) => Err(CertError::Expired {
                    id: id.clone(),
                    not_after: rfc3339(p.not_after),
                    cause: e.to_string(),
                }),
                None => Err(e),
            },
        }
    }

    /// The still-valid certificate of `id`, if any. Never blocks: for rustls resolvers.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        let entry = read(&self.shared.entries).get(id).cloned()?;
        entry.valid(SystemTime::now()).map(|i| i.key.clone())
    }

    /// Stops renewing `id` and drops its certificate.
    pub fn forget(&self, id: &SpiffeId) {
        let entry = write(&self.shared.entries).remove(id);
        if let Some(entry) = entry {
            entry.stop();
            self.shared.metrics.forget(id);
            tracing::info!(identity = %id, "certificate forgotten");
        }
    }

    /// Replaces the trust bundle. Handshakes started afterwards verify peers against it.
    /// Refused, keeping the old bundle, if it is empty or any root does not parse.
    pub fn set_trust_bundle(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), CertError> {
        if roots.is_empty() {
            return Err(CertError::TrustBundle("it has no roots".to_string()));
        }
        let bundle = TrustBundle::new(roots)?;
        tracing::info!(roots = bundle.certs.len(), "trust bundle replaced");
        *write(&self.shared.bundle) = Arc::new(bundle);
        Ok(())
    }

    /// The current CA roots.
    pub fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        self.trust_store().certs.clone()
    }

    /// The current CA roots with their rustls store. The same `Arc` until the bundle is
    /// replaced, so verifiers can cache what they derive from it.
    pub fn trust_store(&self) -> Arc<TrustBundle> {
        read(&self.shared.bundle).clone()
    }

    /// Every identity held, sorted, for the debug command.
    pub fn certs(&self) -> Vec<CertInfo> {
        let entries: Vec<Arc<Entry>> = read(&self.shared.entries).values().cloned().collect();
        let now = SystemTime::now();
        let mut infos: Vec<CertInfo> = entries.iter().map(|e| e.info(now)).collect();
        infos.sort_by(|a, b| a.identity.cmp(&b.identity));
        infos
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        let entries: Vec<Arc<Entry>> = write(&self.shared.entries)
            .drain()
            .map(|(_, e)| e)
            .collect();
        for entry in entries {
            entry.stop();
        }
    }
}

// === impl Shared ===

type IssueResult = Result<Arc<Issued>, CertError>;

struct Shared {
    signer: Box<dyn DynSigner>,
    config: CertConfig,
    metrics: Metrics,
    bundle: RwLock<Arc<TrustBundle>>,
    entries: RwLock<HashMap<SpiffeId, Arc<Entry>>>,
}

impl Shared {
    fn entry(&self, id: &SpiffeId) -> Arc<Entry> {
        if let Some(e) = read(&self.entries).get(id) {
            return e.clone();
        }
        write(&self.entries)
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Entry::new(id.clone())))
            .clone()
    }

    /// Issues a certificate for `entry`, joining the issuance already in flight if any. The
    /// issuance runs in its own task, so it completes (and is kept) even if every caller goes
    /// away.
    async fn issue(self: &Arc<Self>, entry: &Arc<Entry>) -> IssueResult {
        let cancelled = || CertError::Cancelled {
            id: entry.id.clone(),
        };
        let mut rx = {
            let mut st = lock(&entry.state);
            if st.forgotten {
                return Err(cancelled());
            }
            match &st.inflight {
                Some(inflight) => inflight.rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    let shared = self.clone();
                    let task_entry = entry.clone();
                    let task = tokio::spawn(async move {
                        let result = shared.issue_once(&task_entry.id).await;
                        shared.record(&task_entry, &result);
                        let _ = tx.send(Some(result));
                    });
                    st.inflight = Some(Inflight {
                        rx: rx.clone(),
                        task,
                    });
                    rx
                }
            }
        };
        match rx.wait_for(Option::is_some).await {
            Ok(done) => done.clone().unwrap_or_else(|| Err(cancelled())),
            Err(_) => Err(cancelled()),
        }
    }

    async fn issue_once(&self, id: &SpiffeId) -> IssueResult {
        let (key, csr) = new_key_and_csr(id)?;
        let signed = self
            .signer
            .sign_boxed(id, csr)
            .await
            .map_err(|source| CertError::Sign {
                id: id.clone(),
                source,
            })?;
        self.accept(id, &key, signed).map(Arc::new)
    }

    /// Checks a signed certificate before using it: it chains to a root we know, names exactly
    /// `id`, is for `key`, and has not expired.
    fn accept(
        &self,
        id: &SpiffeId,
        key: &KeyPair,
        signed: SignedCert,
    ) -> Result<Issued, CertError> {
        let bad = |reason: String| CertError::BadCert {
            id: id.clone(),
            reason,
        };
        let leaf_der = signed
            .chain
            .first()
            .ok_or_else(|| bad("the chain is empty".to_string()))?;
        let leaf = Leaf::parse(leaf_der).map_err(|source| CertError::UnreadableCert {
            id: id.clone(),
            source,
        })?;
        let expected = id.uri();
        if leaf.sans != [expected.as_str()] {
            return Err(bad(format!(
                "its SANs are {:?}, expected exactly the URI {expected}",
                leaf.sans
            )));
        }
        let now = SystemTime::now();
        if leaf.not_after <= now || leaf.not_after <= leaf.not_before {
            return Err(bad(format!(
                "it is valid from {} to {}",
                rfc3339(leaf.not_before),
                rfc3339(leaf.not_after)
            )));
        }

        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&pkcs8)
            .map_err(|e| bad(format!("load our own key: {e}")))?;
        let certified = CertifiedKey::new(signed.chain.clone(), signing_key);
        certified
            .keys_match()
            .map_err(|e| bad(format!("it is not for the key we generated: {e}")))?;

        let anchors = if signed.roots.is_empty() {
            read(&self.bundle).clone()
        } else {
            Arc::new(TrustBundle::new(signed.roots.clone()).map_err(|e| bad(e.to_string()))?)
        };
        let parsed = ParsedCertificate::try_from(leaf_der).map_err(|e| bad(e.to_string()))?;
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &anchors.store,
            signed.chain.get(1..).unwrap_or_default(),
            UnixTime::now(),
            algs.all,
        )
        .map_err(|e| {
            bad(format!(
                "its chain does not verify against the CA roots: {e}"
            ))
        })?;

        // Until the first bundle is pushed with the configuration, trust the roots that came
        // with our own certificate.
        if !signed.roots.is_empty() {
            let mut bundle = write(&self.bundle);
            if bundle.is_empty() {
                tracing::info!(
                    roots = anchors.certs.len(),
                    "trust bundle taken from the CA"
                );
                *bundle = anchors;
            }
        }

        Ok(Issued {
            renew_at: self.config.renew_at(leaf.not_before, leaf.not_after, now),
            key: Arc::new(certified),
            serial: leaf.serial,
            issuer: leaf.issuer,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        })
    }

    /// Books the outcome of one issuance; on the first success, starts renewing.
    fn record(self: &Arc<Self>, entry: &Arc<Entry>, result: &IssueResult) {
        let id = &entry.id;
        let mut st = lock(&entry.state);
        match result {
            Ok(issued) => {
                st.failures = 0;
                st.last_error = None;
                st.next_retry = None;
                if !st.forgotten {
                    *write(&entry.cert) = Some(issued.clone());
                    self.metrics.issued(id, unix_secs(issued.not_after));
                    if st.renewer.is_none() {
                        st.renewer = Some(tokio::spawn(renew(self.clone(), entry.clone())));
                    }
                }
                tracing::info!(
                    identity = %id,
                    serial = %issued.serial,
                    not_after = %rfc3339(issued.not_after),
                    renew_at = %rfc3339(issued.renew_at),
                    "certificate issued"
                );
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                st.last_error = Some(e.to_string());
                if !st.forgotten {
                    self.metrics.failed(id);
                }
                tracing::warn!(identity = %id, error = %e, kind = e.kind(), "certificate issuance failed");
            }
        }
        st.inflight = None;
    }
}

/// Renews `entry` at its planned time, retrying with backoff, for as long as it is held.
async fn renew(shared: Arc<Shared>, entry: Arc<Entry>) {
    loop {
        let Some(cur) = entry.latest() else { return };
        sleep_until(cur.renew_at).await;
        let mut attempt = 0u32;
        loop {
            // Someone else (a fetch after expiry) may have renewed meanwhile.
            if let Some(latest) = entry.latest()
                && !Arc::ptr_eq(&latest, &cur)
            {
                break;
            }
            match shared.issue(&entry).await {
                Ok(_) => break,
                Err(CertError::Cancelled { .. }) => return,
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    let lifetime = cur
                        .not_after
                        .duration_since(cur.not_before)
                        .unwrap_or_default();
                    let delay = jitter(shared.config.backoff(attempt, lifetime));
                    lock(&entry.state).next_retry = Some(SystemTime::now() + delay);
                    tracing::warn!(
                        identity = %entry.id,
                        error = %e,
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        expired = cur.not_after <= SystemTime::now(),
                        "certificate renewal failed"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

async fn sleep_until(t: SystemTime) {
    if let Ok(d) = t.duration_since(SystemTime::now()) {
        tokio::time::sleep(d).await;
    }
}

// === impl Entry ===

/// A certificate with what the manager needs to know about it.
#[derive(Debug)]
struct Issued {
    key: Arc<CertifiedKey>,
    serial: String,
    issuer: String,
    not_before: SystemTime,
    not_after: SystemTime,
    renew_at: SystemTime,
}

struct Inflight {
    rx: watch::Receiver<Option<IssueResult>>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct EntryState {
    inflight: Option<Inflight>,
    renewer: Option<JoinHandle<()>>,
    forgotten: bool,
    failures: u32,
    last_error: Option<String>,
    next_retry: Option<SystemTime>,
}

/// One identity held by the manager.
struct Entry {
    id: SpiffeId,
    /// The latest certificate, possibly expired.
    cert: RwLock<Option<Arc<Issued>>>,
    state: Mutex<EntryState>,
}

impl Entry {
    fn new(id: SpiffeId) -> Self {
        Entry {
            id,
            cert: RwLock::new(None),
            state: Mutex::new(EntryState::default()),
        }
    }

    fn latest(&self) -> Option<Arc<Issued>> {
        read(&self.cert).clone()
    }

    fn valid(&self, now: SystemTime) -> Option<Arc<Issued>> {
        read(&self.cert)
            .as_ref()
            .filter(|i| now < i.not_after)
            .cloned()
    }

    /// Stops the renewal and any issuance in flight, for good.
    fn stop(&self) {
        let mut st = lock(&self.state);
        st.forgotten = true;
        if let Some(r) = st.renewer.take() {
            r.abort();
        }
        if let Some(i) = st.inflight.take() {
            i.task.abort();
        }
        *write(&self.cert) = None;
    }

    fn info(&self, now: SystemTime) -> CertInfo {
        let st = lock(&self.state);
        let cert = self.latest();
        let state = match &cert {
            None if st.inflight.is_some() || st.failures == 0 => CertState::Issuing,
            None => CertState::Failed,
            Some(c) if now >= c.not_after => CertState::Expired,
            Some(c) if now >= c.renew_at => CertState::Renewing,
            Some(_) => CertState::Valid,
        };
        let next_rotation = match (&st.next_retry, &cert) {
            (Some(retry), _) if st.failures > 0 => Some(*retry),
            (_, Some(c)) => Some(c.renew_at),
            _ => None,
        };
        CertInfo {
            identity: self.id.clone(),
            state,
            serial: cert.as_ref().map(|c| c.serial.clone()),
            issuer: cert.as_ref().map(|c| c.issuer.clone()),
            not_before: cert.as_ref().map(|c| rfc3339(c.not_before)),
            not_after: cert.as_ref().map(|c| rfc3339(c.not_after)),
            next_rotation: next_rotation.map(rfc3339),
            consecutive_failures: st.failures,
            last_error: st.last_error.clone(),
        }
    }
}

// === Locks ===
// A panic while holding one of these locks leaves consistent data (every critical section is
// a plain assignment), so poisoning is ignored.

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
