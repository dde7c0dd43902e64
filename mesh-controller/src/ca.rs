//! The mesh's certificate authority.
//!
//! Keys are ECDSA P-256: rustls (ring and aws-lc-rs), Go's crypto/tls, BoringSSL/Envoy and
//! OpenSSL all verify it, hardware and FIPS modules support it, and signing is cheap. Ed25519
//! would be smaller, but it is not accepted by every TLS peer a mesh meets (and not by FIPS
//! deployments), so it is not the default a platform team can rely on.
//!
//! The root is generated on first start and persisted so that a restart keeps the same trust
//! root: in a directory (local mode) or in a Kubernetes Secret (cluster mode, [`secret`]). An
//! existing CA (for example an intermediate under an organisation's root) can be loaded from
//! PEM files instead; then the bundle the mesh distributes is the given roots.
//!
//! Signing never trusts what a CSR asks for beyond its public key: the controller builds the
//! certificate itself (one URI SAN, the identity it has authorized; client and server usage;
//! its own validity), after checking the CSR's signature, key type and that its only SAN is the
//! identity asked for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::SpiffeId;
use mesh_core::identity::TrustDomain;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

pub mod secret;

/// Lifetime of the generated root.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Largest backdating of a leaf's not-before, to absorb clock skew between nodes.
const MAX_SKEW: Duration = Duration::from_secs(60);

/// Why the CA could not be loaded, created or stored.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("generate the CA: {0}")]
    Generate(rcgen::Error),
    #[error("kubernetes secret {name}: {reason}")]
    Secret { name: String, reason: String },
}

impl CaError {
    pub fn kind(&self) -> &'static str {
        match self {
            CaError::Read { .. } => "read",
            CaError::Write { .. } => "write",
            CaError::Invalid { .. } => "invalid",
            CaError::Generate(_) => "generate",
            CaError::Secret { .. } => "secret",
        }
    }
}

/// Why a signing request was refused. Messages go back to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("the CSR does not parse or its signature does not verify with its own key: {0}")]
    BadCsr(String),
    #[error("the CSR key must be ECDSA P-256, it is {0}")]
    KeyType(String),
    #[error(
        "the CSR must carry exactly one subject alternative name, the URI {expected}; it has {found}"
    )]
    Sans { expected: String, found: String },
    #[error("identity {0} is not in trust domain {1}")]
    TrustDomain(String, String),
    #[error("sign: {0}")]
    Sign(String),
}

impl SignError {
    pub fn kind(&self) -> &'static str {
        match self {
            SignError::BadCsr(_) => "bad_csr",
            SignError::KeyType(_) => "key_type",
            SignError::Sans { .. } => "sans",
            SignError::TrustDomain(..) => "trust_domain",
            SignError::Sign(_) => "sign",
        }
    }
}

/// A signed leaf with its chain (leaf first) and the roots to verify it with.
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
}

/// The signing CA: its key, its certificate, the chain above it and the trust roots.
pub struct Ca {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate followed by any intermediates above it (not the root, unless
    /// the CA is the root).
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

// === impl Ca ===

impl Ca {
    /// A new self-signed root for the trust domain.
    pub fn generate(trust_domain: &TrustDomain) -> Result<Ca, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain.as_str());
        dn.push(DnType::CommonName, format!("mesh root CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - MAX_SKEW;
        params.not_after = now + ROOT_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ca::from_pem(trust_domain, &cert_pem, &key_pem, None)
    }

    /// A CA from PEM: its certificate, its private key, and the roots to distribute (`None`
    /// when the certificate is itself the root). Intermediates between the CA and the root
    /// may follow the CA certificate in `cert_pem`.
    pub fn from_pem(
        trust_domain: &TrustDomain,
        cert_pem: &str,
        key_pem: &str,
        roots_pem: Option<&str>,
    ) -> Result<Ca, CaError> {
        let invalid = |what: &str, reason: String| CaError::Invalid {
            what: what.to_string(),
            reason,
        };
        let chain = certs_from_pem(cert_pem).map_err(|r| invalid("CA certificate", r))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| invalid("CA key", e.to_string()))?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(invalid("CA key", "must be ECDSA P-256".into()));
        }
        let ca_cert = &chain[0];
        let (_, parsed) = x509_parser::parse_x509_certificate(ca_cert)
            .map_err(|e| invalid("CA certificate", e.to_string()))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid(
                "CA key",
                "does not belong to the CA certificate".into(),
            ));
        }
        if !parsed.is_ca() {
            return Err(invalid(
                "CA certificate",
                "basic constraints do not allow it to sign".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(ca_cert, key)
            .map_err(|e| invalid("CA certificate", e.to_string()))?;
        let roots = match roots_pem {
            Some(p) => certs_from_pem(p).map_err(|r| invalid("CA roots", r))?,
            None => vec![chain[chain.len() - 1].clone()],
        };
        Ok(Ca {
            trust_domain: trust_domain.clone(),
            issuer,
            chain,
            roots,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    /// Loads the CA from `dir` (`ca.crt`, `ca.key`), creating and storing a new root there on
    /// first start. The key file is written with mode 0600, and both files are written to a
    /// temporary name first so a crash never leaves half a CA.
    pub fn load_or_create_dir(dir: &Path, trust_domain: &TrustDomain) -> Result<Ca, CaError> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        if cert_path.exists() || key_path.exists() {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|source| CaError::Read {
                    path: p.to_path_buf(),
                    source,
                })
            };
            return Ca::from_pem(trust_domain, &read(&cert_path)?, &read(&key_path)?, None);
        }
        std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let ca = Ca::generate(trust_domain)?;
        write_private(&key_path, &ca.key_pem)?;
        write_private(&cert_path, &ca.cert_pem)?;
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The trust roots, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The trust roots, PEM, as distributed in the configuration.
    pub fn roots_pem(&self) -> Vec<String> {
        self.roots.iter().map(|c| der_to_pem(c)).collect()
    }

    /// The CA certificate and key, PEM, for persisting.
    pub fn to_pem(&self) -> (&str, &str) {
        (&self.cert_pem, &self.key_pem)
    }

    /// Signs a CSR for `identity`, which the caller has already authorized. The CSR must be
    /// signed by its own P-256 key and name exactly `identity` as its only SAN.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        identity: &SpiffeId,
        validity: Duration,
    ) -> Result<Issued, SignError> {
        if identity.trust_domain() != &self.trust_domain {
            return Err(SignError::TrustDomain(
                identity.to_string(),
                self.trust_domain.to_string(),
            ));
        }
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| SignError::BadCsr(e.to_string()))?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(SignError::KeyType(format!(
                "{:?}",
                csr.public_key.algorithm()
            )));
        }
        let expected = identity.uri();
        let sans = &csr.params.subject_alt_names;
        let only_expected =
            matches!(sans.as_slice(), [SanType::URI(u)] if u.as_str() == expected.as_str());
        if !only_expected {
            return Err(SignError::Sans {
                expected,
                found: describe_sans(sans),
            });
        }
        self.issue(&csr.public_key, identity, &[], validity)
    }

    /// Issues the controller's own serving certificate: its SPIFFE ID plus the DNS names and
    /// addresses agents dial. The key never leaves the controller.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        validity: Duration,
    ) -> Result<(Issued, KeyPair), SignError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| SignError::Sign(e.to_string()))?;
        let id = SpiffeId::controller(&self.trust_domain);
        let extra: Vec<SanType> = dns_names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n
                    .as_str()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e: rcgen::Error| SignError::Sign(format!("{n}: {e}"))),
            })
            .collect::<Result<_, _>>()?;
        let issued = self.issue(&key, &id, &extra, validity)?;
        Ok((issued, key))
    }

    fn issue(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &SpiffeId,
        extra_sans: &[SanType],
        validity: Duration,
    ) -> Result<Issued, SignError> {
        let uri = identity
            .uri()
            .try_into()
            .map_err(|e: rcgen::Error| SignError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = std::iter::once(SanType::URI(uri))
            .chain(extra_sans.iter().cloned())
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        let skew = MAX_SKEW.min(validity / 10);
        params.not_before = now - skew;
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| SignError::Sign(e.to_string()))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(
            self.chain
                .iter()
                .filter(|c| !self.roots.contains(c))
                .cloned(),
        );
        Ok(Issued {
            chain,
            roots: self.roots.clone(),
        })
    }
}

fn describe_sans(sans: &[SanType]) -> String {
    if sans.is_empty() {
        return "none".to_string();
    }
    sans.iter()
        .map(|s| match s {
            SanType::URI(u) => format!("URI {}", u.as_str()),
            SanType::DnsName(d) => format!("DNS {}", d.as_str()),
            SanType::IpAddress(ip) => format!("IP {ip}"),
            SanType::Rfc822Name(e) => format!("email {}", e.as_str()),
            _ => "another name".to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A random positive 128-bit serial.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// All certificates in a PEM text; at least one.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate in the PEM text".to_string());
    }
    Ok(certs)
}

/// PEM text of one DER certificate.
pub fn der_to_pem(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|source| CaError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests;
