//! A throwaway CA and a [`Signer`] over it, for the identity and TLS tests and, with the
//! `testing` feature, for the HBONE benchmark (`benches/hbone.rs`).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::SpiffeId;
use prometheus_client::registry::Registry;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{CertConfig, CertManager, SignError, SignedCert, Signer};

/// A self-signed P-256 root that signs workload certificates like the controller does
/// (backdated by a tenth of the lifetime, server and client auth).
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> Arc<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate a CA key");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(1);
        let root = params
            .self_signed(&key)
            .expect("self-sign the CA")
            .der()
            .clone();
        Arc::new(TestCa {
            issuer: Issuer::new(params, key),
            root,
        })
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    /// Signs the CSR's key for `uri` (the CSR's own SANs are ignored).
    pub fn sign(
        &self,
        uri: &str,
        csr_der: &[u8],
        lifetime: Duration,
    ) -> Result<CertificateDer<'static>, String> {
        let mut csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| format!("parse the CSR: {e}"))?;
        let p = &mut csr.params;
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(
            uri.to_string()
                .try_into()
                .map_err(|e| format!("{uri}: {e}"))?,
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let lifetime = time::Duration::try_from(lifetime).map_err(|e| e.to_string())?;
        let now = OffsetDateTime::now_utc();
        p.not_before = now - lifetime / 10;
        p.not_after = now + lifetime;
        p.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        p.use_authority_key_identifier_extension = true;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| format!("sign: {e}"))?;
        Ok(cert.der().clone())
    }
}

struct SignerState {
    ca: Mutex<Arc<TestCa>>,
    lifetime: Duration,
    delay: Mutex<Duration>,
    failing: AtomicBool,
    calls: AtomicUsize,
    /// A URI to certify instead of the requested identity.
    sign_as: Mutex<Option<String>>,
}

/// A [`Signer`] over a [`TestCa`] that counts its calls and fails on demand.
#[derive(Clone)]
pub struct TestSigner(Arc<SignerState>);

impl TestSigner {
    pub fn new(ca: Arc<TestCa>, lifetime: Duration) -> Self {
        TestSigner(Arc::new(SignerState {
            ca: Mutex::new(ca),
            lifetime,
            delay: Mutex::new(Duration::ZERO),
            failing: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            sign_as: Mutex::new(None),
        }))
    }

    pub fn set_failing(&self, failing: bool) {
        self.0.failing.store(failing, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.0.delay.lock().expect("delay lock") = delay;
    }

    pub fn set_ca(&self, ca: Arc<TestCa>) {
        *self.0.ca.lock().expect("ca lock") = ca;
    }

    pub fn sign_as(&self, uri: Option<&str>) {
        *self.0.sign_as.lock().expect("sign_as lock") = uri.map(str::to_string);
    }

    pub fn calls(&self) -> usize {
        self.0.calls.load(Ordering::SeqCst)
    }
}

impl Signer for TestSigner {
    fn sign(
        &self,
        id: &SpiffeId,
        csr_der: Vec<u8>,
    ) -> impl Future<Output = Result<SignedCert, SignError>> + Send {
        let state = self.0.clone();
        let uri = id.uri();
        async move {
            state.calls.fetch_add(1, Ordering::SeqCst);
            let delay = *state.delay.lock().expect("delay lock");
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if state.failing.load(Ordering::SeqCst) {
                return Err(SignError::Unavailable(
                    "the test signer was told to fail".into(),
                ));
            }
            let ca = state.ca.lock().expect("ca lock").clone();
            let uri = state
                .sign_as
                .lock()
                .expect("sign_as lock")
                .clone()
                .unwrap_or(uri);
            let leaf = ca
                .sign(&uri, &csr_der, state.lifetime)
                .map_err(SignError::Refused)?;
            Ok(SignedCert {
                chain: vec![leaf],
                roots: vec![ca.root()],
            })
        }
    }
}

/// A manager over `signer` with the default configuration, and the registry it reports to.
pub fn manager(signer: &TestSigner) -> (Arc<CertManager>, Registry) {
    let mut registry = Registry::default();
    let mgr = CertManager::new(signer.clone(), CertConfig::default(), &mut registry)
        .expect("default configuration is valid");
    (mgr, registry)
}

pub fn id(s: &str) -> SpiffeId {
    s.parse().expect("valid SPIFFE ID")
}

/// The value of the sample `name{labels}` in the registry's text exposition, 0 if absent.
pub fn sample(registry: &Registry, name_and_labels: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("numeric sample"))
        .unwrap_or(0.0)
}

pub fn rotations(registry: &Registry, id: &SpiffeId, result: &str) -> f64 {
    sample(
        registry,
        &format!("mesh_cert_rotations_total{{identity=\"{id}\",result=\"{result}\"}}"),
    )
}

/// The serial (hex) of a certificate.
pub fn serial(cert: &CertificateDer<'_>) -> String {
    let (_, c) = X509Certificate::from_der(cert).expect("parse certificate");
    c.raw_serial().iter().map(|b| format!("{b:02x}")).collect()
}

/// Unix seconds at which a certificate expires.
pub fn not_after(cert: &CertificateDer<'_>) -> i64 {
    let (_, c) = X509Certificate::from_der(cert).expect("parse certificate");
    c.validity().not_after.timestamp()
}

/// Polls `check` every 50 ms until it returns `Some`, failing the test after `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sleeps until the wall clock reaches `unix` seconds plus `margin`.
pub async fn sleep_past(unix: i64, margin: Duration) {
    let target = std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64) + margin;
    if let Ok(d) = target.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(d).await;
    }
}
