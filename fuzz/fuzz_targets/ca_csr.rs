//! The CA's workload signing: a `SignWorkloadRequest` (protobuf, as it arrives over gRPC) with
//! the requested SPIFFE ID and a PKCS#10 CSR, parsed and checked as the controller's Identity
//! service does, then signed.
//!
//! Invariants: nothing panics; a certificate is issued only for a workload identity of the
//! CA's trust domain, only when the CSR itself (read by x509-parser, independently of rcgen)
//! is a P-256 request whose only SAN is that identity; the certificate names exactly the
//! requested identity.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_api::v1::SignWorkloadRequest;
use mesh_controller::ca::Ca;
use mesh_core::SpiffeId;
use mesh_core::identity::{TrustDomain, from_certificate};
use prost::Message;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

static CA: LazyLock<Ca> = LazyLock::new(|| {
    let td = TrustDomain::new("cluster.local").expect("trust domain");
    Ca::generate(&td).expect("generate the CA")
});

fuzz_target!(|data: &[u8]| {
    let Ok(req) = SignWorkloadRequest::decode(data) else {
        return;
    };
    // As mesh_controller::server's sign_workload: parse, then workload identities only.
    let Ok(id) = req.spiffe_id.parse::<SpiffeId>() else {
        return;
    };
    if id.workload_parts().is_none() {
        return;
    }
    let issued = match CA.sign_csr(&req.csr_der, &id, Duration::from_secs(3600)) {
        Ok(issued) => issued,
        Err(e) => {
            assert!(!e.kind().is_empty() && !e.to_string().is_empty());
            return;
        }
    };
    assert_eq!(
        id.trust_domain(),
        CA.trust_domain(),
        "signed for another trust domain"
    );
    assert_csr_asks_for(&req.csr_der, &id);
    let leaf = issued.chain.first().expect("an issued chain has a leaf");
    let named = from_certificate(leaf).expect("the issued leaf names one identity");
    assert_eq!(named, id, "the certificate names another identity");
});

/// The CSR, read independently of the CA's parser: a P-256 key and exactly one SAN, the URI
/// of `id`.
fn assert_csr_asks_for(der: &[u8], id: &SpiffeId) {
    let (_, csr) = X509CertificationRequest::from_der(der).expect("a signed CSR parses");
    let spki = &csr.certification_request_info.subject_pki;
    assert_eq!(
        spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY,
        "key type"
    );
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    assert_eq!(curve, Some(OID_EC_P256), "curve");
    let mut sans = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            sans.extend(san.general_names.iter().cloned());
        }
    }
    let uri = id.uri();
    assert!(
        matches!(sans.as_slice(), [GeneralName::URI(u)] if *u == uri),
        "signed a CSR whose SANs are {sans:?}, not only {uri}"
    );
}
