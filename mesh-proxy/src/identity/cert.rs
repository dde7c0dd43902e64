//! Building CSRs and reading the certificates that come back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::CertError;

/// A fresh P-256 key and a CSR naming `id` as its only SAN.
pub(super) fn new_key_and_csr(id: &SpiffeId) -> Result<(KeyPair, Vec<u8>), CertError> {
    let err = |e: rcgen::Error| CertError::Csr {
        id: id.clone(),
        reason: e.to_string(),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.uri().try_into().map_err(err)?)];
    let csr = params.serialize_request(&key).map_err(err)?;
    Ok((key, csr.der().to_vec()))
}

/// What the manager reads from a leaf certificate.
pub(super) struct Leaf {
    /// Every SAN, URIs as themselves and the others described.
    pub(super) sans: Vec<String>,
    pub(super) serial: String,
    pub(super) issuer: String,
    pub(super) not_before: SystemTime,
    pub(super) not_after: SystemTime,
}

/// Why a signed certificate cannot be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeafError {
    #[error("it does not parse: {0}")]
    Der(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("its SAN extension does not parse: {0}")]
    San(#[source] x509_parser::error::X509Error),
    #[error("its validity starts or ends before 1970 ({0})")]
    BeforeEpoch(i64),
}

impl Leaf {
    pub(super) fn parse(der: &CertificateDer<'_>) -> Result<Self, LeafError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(LeafError::Der)?;
        let sans = match cert.subject_alternative_name() {
            Ok(Some(ext)) => ext
                .value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => (*u).to_string(),
                    other => format!("non-URI {other}"),
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(LeafError::San(e)),
        };
        let validity = cert.validity();
        Ok(Leaf {
            sans,
            serial: cert
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            issuer: cert.issuer().to_string(),
            not_before: from_unix(validity.not_before.timestamp())?,
            not_after: from_unix(validity.not_after.timestamp())?,
        })
    }
}

fn from_unix(secs: i64) -> Result<SystemTime, LeafError> {
    u64::try_from(secs)
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .map_err(|_| LeafError::BeforeEpoch(secs))
}

pub(super) fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(super) fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("@{}", unix_secs(t)))
}
