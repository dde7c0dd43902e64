//! rustls configurations that authenticate peers by SPIFFE identity, for HBONE mTLS.
//!
//! Both sides speak TLS 1.3 only, offer ALPN [`ALPN_REQUESTS`] then `h2` (the server picks
//! the first of its own the client offered), and read everything from the
//! [`CertManager`] at each handshake: the certificate presented is the identity's current one
//! (so rotation needs no new configuration), and peers are verified against the current trust
//! bundle (so a bundle push applies to the next handshake). Session resumption is off, so every
//! handshake presents and verifies certificates in full.
//!
//! What is checked at the TLS level:
//! - the server accepts a client whose chain verifies against the bundle and whose leaf has
//!   exactly one URI SAN, a SPIFFE ID in the server's trust domain. Which identities may do what
//!   is policy's job, later, with [`peer_identity`];
//! - the client accepts a server whose chain verifies against the bundle and whose single URI
//!   SAN is exactly the identity it expected. DNS names are ignored: SPIFFE certificates have
//!   none, so the `ServerName` given to the connector is irrelevant (and SNI is not sent).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use mesh_core::SpiffeId;
use mesh_core::identity::{IdError, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};

use crate::identity::{CertManager, TrustBundle};

#[cfg(test)]
mod tests;

/// The ALPN protocol HBONE runs over.
pub const ALPN_H2: &[u8] = b"h2";

/// The ALPN protocol of an HBONE connection that also carries L7 requests as streams of
/// their own (`crate::hbone::requests`); both sides offer it ahead of [`ALPN_H2`].
pub const ALPN_REQUESTS: &[u8] = b"mesh-hbone-requests/1";

/// Why a TLS configuration could not be built, or a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("build the TLS {side} configuration: {source}")]
    Config {
        side: &'static str,
        source: rustls::Error,
    },
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer certificate does not parse: {0}")]
    BadCertificate(String),
    #[error("the peer certificate has {0} URI SANs, a SPIFFE certificate has exactly one")]
    UriSanCount(usize),
    #[error("the peer certificate's URI SAN is not a mesh SPIFFE ID: {0}")]
    BadId(#[from] IdError),
    #[error("peer {presented} is not in trust domain {expected}")]
    TrustDomain {
        presented: Box<SpiffeId>,
        expected: TrustDomain,
    },
    #[error("peer is {presented}, expected {expected}")]
    UnexpectedPeer {
        presented: Box<SpiffeId>,
        expected: Box<SpiffeId>,
    },
    #[error("there is no trust bundle to verify peers against")]
    NoTrustBundle,
}

impl TlsError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TlsError::Config { .. } => "config",
            TlsError::NoCertificate => "no_certificate",
            TlsError::BadCertificate(_) => "bad_certificate",
            TlsError::UriSanCount(_) => "uri_san_count",
            TlsError::BadId(_) => "bad_id",
            TlsError::TrustDomain { .. } => "trust_domain",
            TlsError::UnexpectedPeer { .. } => "unexpected_peer",
            TlsError::NoTrustBundle => "no_trust_bundle",
        }
    }
}

/// As a rustls certificate error, so it reaches the handshake error (and a bad_certificate
/// alert reaches the peer).
impl From<TlsError> for rustls::Error {
    fn from(e: TlsError) -> Self {
        let refused = Arc::new(Refused(e));
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(refused)))
    }
}

/// A [`TlsError`] on its way through rustls. rustls prints the cause of a certificate error
/// with `{:?}`, so this `Debug` is the error's message: handshake errors then read
/// "invalid peer certificate: Other(OtherError(peer is spiffe://…, expected spiffe://…))".
struct Refused(TlsError);

impl fmt::Debug for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The SPIFFE ID of a peer: the single URI SAN of the leaf (`certs[0]`), as given by
/// `ServerConnection::peer_certificates()` or `ClientConnection::peer_certificates()`.
/// Other SAN types are ignored, as the X.509-SVID specification allows. It does not verify
/// the chain: call it on certificates a handshake has verified.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, TlsError> {
    use mesh_core::identity::{CertIdError, from_certificate};
    let leaf = certs.first().ok_or(TlsError::NoCertificate)?;
    from_certificate(leaf).map_err(|e| match e {
        CertIdError::Parse(why) => TlsError::BadCertificate(why),
        CertIdError::UriSanCount(n) => TlsError::UriSanCount(n),
        CertIdError::Id(id) => TlsError::BadId(id),
    })
}

/// The server side of HBONE for `local`: presents `local`'s current certificate, requires a
/// client certificate from `local`'s trust domain verified against the current bundle.
pub fn server_config(
    mgr: Arc<CertManager>,
    local: SpiffeId,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(ring::default_provider());
    let verifier = SpiffeClientVerifier {
        trust_domain: local.trust_domain().clone(),
        mgr: mgr.clone(),
        algs: provider.signature_verification_algorithms,
        provider: provider.clone(),
        cache: Mutex::new(None),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            side: "server",
            source,
        })?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(CurrentCert { mgr, id: local }));
    config.alpn_protocols = vec![ALPN_REQUESTS.to_vec(), ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client side of HBONE from `local` to `expected_peer`: presents `local`'s current
/// certificate, accepts only a server certified as exactly `expected_peer` by the current
/// bundle.
pub fn client_config(
    mgr: Arc<CertManager>,
    local: SpiffeId,
    expected_peer: SpiffeId,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(ring::default_provider());
    let verifier = SpiffeServerVerifier {
        mgr: mgr.clone(),
        expected: expected_peer,
        algs: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            side: "client",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(CurrentCert { mgr, id: local }));
    config.alpn_protocols = vec![ALPN_REQUESTS.to_vec(), ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

// === impl CurrentCert ===

/// Resolves to the identity's current certificate at each handshake; none once it expired.
struct CurrentCert {
    mgr: Arc<CertManager>,
    id: SpiffeId,
}

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CurrentCert")
            .field("id", &self.id.uri())
            .finish()
    }
}

impl CurrentCert {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        let key = self.mgr.current(&self.id);
        if key.is_none() {
            tracing::warn!(identity = %self.id, "no valid certificate to present");
        }
        key
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// === impl SpiffeServerVerifier ===

/// The client's check of the server: chain to the current bundle, exactly the expected ID.
struct SpiffeServerVerifier {
    mgr: Arc<CertManager>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected.uri())
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.mgr.trust_store();
        if bundle.is_empty() {
            return Err(TlsError::NoTrustBundle.into());
        }
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            bundle.store(),
            intermediates,
            now,
            self.algs.all,
        )?;
        let presented = peer_identity(std::slice::from_ref(end_entity))?;
        if presented != self.expected {
            return Err(TlsError::UnexpectedPeer {
                presented: Box::new(presented),
                expected: Box::new(self.expected.clone()),
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

// === impl SpiffeClientVerifier ===

/// A webpki client verifier and the bundle it was built from.
type CachedVerifier = (Arc<TrustBundle>, Arc<dyn ClientCertVerifier>);

/// The server's check of clients: chain to the current bundle (webpki, client auth), one
/// SPIFFE ID in our trust domain.
struct SpiffeClientVerifier {
    mgr: Arc<CertManager>,
    trust_domain: TrustDomain,
    provider: Arc<CryptoProvider>,
    algs: WebPkiSupportedAlgorithms,
    /// The webpki verifier built for the bundle it was built from; rebuilt when the manager's
    /// bundle is replaced.
    cache: Mutex<Option<CachedVerifier>>,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain.as_str())
            .finish()
    }
}

impl SpiffeClientVerifier {
    fn webpki(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let bundle = self.mgr.trust_store();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((built_for, verifier)) = cache.as_ref()
            && Arc::ptr_eq(built_for, &bundle)
        {
            return Ok(verifier.clone());
        }
        if bundle.is_empty() {
            return Err(TlsError::NoTrustBundle.into());
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            bundle.store().clone(),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("build the client verifier: {e}")))?;
        *cache = Some((bundle, verifier.clone()));
        Ok(verifier)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: the bundle changes under us, and mesh clients have a single certificate.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki()?
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = peer_identity(std::slice::from_ref(end_entity))?;
        if presented.trust_domain() != &self.trust_domain {
            return Err(TlsError::TrustDomain {
                presented: Box::new(presented),
                expected: self.trust_domain.clone(),
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
