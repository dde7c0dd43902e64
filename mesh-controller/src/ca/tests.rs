use super::*;

use rcgen::CertificateParams;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").expect("trust domain")
}

fn web() -> SpiffeId {
    SpiffeId::workload(&td(), "shop", "web").expect("identity")
}

fn csr(key: &KeyPair, sans: &[&str]) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|s| match s.strip_prefix("dns:") {
            Some(d) => SanType::DnsName((*d).try_into().expect("dns name")),
            None => SanType::URI((*s).try_into().expect("uri")),
        })
        .collect();
    params.serialize_request(key).expect("csr").der().to_vec()
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key")
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(der).expect("certificate parses");
    let sans = cert
        .subject_alternative_name()
        .expect("san extension parses")
        .expect("has sans");
    sans.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn signs_a_csr_for_the_authorized_identity_only() {
    let ca = Ca::generate(&td()).expect("ca");
    let key = p256();
    let issued = ca
        .sign_csr(
            &csr(&key, &[&web().uri()]),
            &web(),
            Duration::from_secs(3600),
        )
        .expect("signed");
    assert_eq!(issued.chain.len(), 1, "a root CA adds no intermediates");
    assert_eq!(issued.roots, ca.roots());
    assert_eq!(uri_sans(&issued.chain[0]), vec![web().uri()]);

    let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).expect("leaf");
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "the CSR key"
    );
    assert!(!leaf.is_ca());
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!((3600..=3660).contains(&lifetime), "lifetime {lifetime}");
    let (_, root) = X509Certificate::from_der(&ca.roots()[0]).expect("root");
    leaf.verify_signature(Some(root.public_key()))
        .expect("leaf signed by the root");
}

#[test]
fn refuses_second_san_other_identity_and_no_san() {
    let ca = Ca::generate(&td()).expect("ca");
    let key = p256();
    let other = SpiffeId::workload(&td(), "shop", "admin").expect("id");
    let day = Duration::from_secs(86400);

    let e = ca
        .sign_csr(&csr(&key, &[&web().uri(), "dns:web.shop.svc"]), &web(), day)
        .expect_err("two SANs");
    assert_eq!(e.kind(), "sans", "{e}");
    assert!(e.to_string().contains("DNS web.shop.svc"), "{e}");

    let e = ca
        .sign_csr(&csr(&key, &[&web().uri(), &other.uri()]), &web(), day)
        .expect_err("two URIs");
    assert_eq!(e.kind(), "sans");

    let e = ca
        .sign_csr(&csr(&key, &[&other.uri()]), &web(), day)
        .expect_err("another identity");
    assert_eq!(e.kind(), "sans");

    let e = ca
        .sign_csr(&csr(&key, &[]), &web(), day)
        .expect_err("no SAN");
    assert_eq!(e.kind(), "sans");

    let foreign =
        SpiffeId::workload(&TrustDomain::new("other.org").expect("td"), "a", "b").expect("id");
    let e = ca
        .sign_csr(&csr(&key, &[&foreign.uri()]), &foreign, day)
        .expect_err("foreign trust domain");
    assert_eq!(e.kind(), "trust_domain");

    let e = ca.sign_csr(b"not a csr", &web(), day).expect_err("garbage");
    assert_eq!(e.kind(), "bad_csr");
}

#[test]
fn refuses_a_csr_whose_key_did_not_sign_it() {
    let ca = Ca::generate(&td()).expect("ca");
    let signer = p256();
    let other = p256();
    let mut der = csr(&signer, &[&web().uri()]);
    // Put another P-256 public key (same length) in place of the signer's: the request now
    // names a key that did not sign it.
    let theirs = signer.public_key_raw().to_vec();
    let pos = der
        .windows(theirs.len())
        .position(|w| w == theirs.as_slice())
        .expect("public key inside the CSR");
    der[pos..pos + theirs.len()].copy_from_slice(other.public_key_raw());
    let e = ca
        .sign_csr(&der, &web(), Duration::from_secs(60))
        .expect_err("mismatched key");
    assert_eq!(e.kind(), "bad_csr", "{e}");
}

#[test]
fn refuses_keys_other_than_p256() {
    let ca = Ca::generate(&td()).expect("ca");
    let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
    let e = ca
        .sign_csr(&csr(&ed, &[&web().uri()]), &web(), Duration::from_secs(60))
        .expect_err("ed25519 key");
    assert_eq!(e.kind(), "key_type");
}

#[test]
fn a_directory_ca_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Ca::load_or_create_dir(dir.path(), &td()).expect("created");
    let issued = first
        .sign_csr(
            &csr(&p256(), &[&web().uri()]),
            &web(),
            Duration::from_secs(60),
        )
        .expect("signed");
    let mode = std::fs::metadata(dir.path().join("ca.key"))
        .expect("key file")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let second = Ca::load_or_create_dir(dir.path(), &td()).expect("loaded");
    assert_eq!(
        second.roots(),
        first.roots(),
        "same trust root after restart"
    );
    let (_, root) = X509Certificate::from_der(&second.roots()[0]).expect("root");
    let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).expect("leaf");
    leaf.verify_signature(Some(root.public_key()))
        .expect("old leaf verifies under the reloaded root");

    std::fs::write(dir.path().join("ca.key"), "garbage").expect("corrupt");
    let e = Ca::load_or_create_dir(dir.path(), &td()).expect_err("corrupt key");
    assert_eq!(e.kind(), "invalid");
}

#[test]
fn an_intermediate_is_loaded_with_its_roots() {
    let root = Ca::generate(&td()).expect("root");
    // An intermediate signed by the root, as an organisation would hand it over.
    let key = p256();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let inter = params.signed_by(&key, &root.issuer).expect("intermediate");
    let roots_pem = root.roots_pem().join("");
    let ca = Ca::from_pem(&td(), &inter.pem(), &key.serialize_pem(), Some(&roots_pem))
        .expect("intermediate CA");
    let issued = ca
        .sign_csr(
            &csr(&p256(), &[&web().uri()]),
            &web(),
            Duration::from_secs(60),
        )
        .expect("signed");
    assert_eq!(issued.chain.len(), 2, "leaf and intermediate");
    assert_eq!(issued.chain[1], *inter.der());
    assert_eq!(issued.roots, root.roots());

    let e = Ca::from_pem(&td(), &inter.pem(), &p256().serialize_pem(), None)
        .expect_err("key of another certificate");
    assert!(e.to_string().contains("does not belong"), "{e}");
    let leaf_pem = der_to_pem(&issued.chain[0]);
    let e = Ca::from_pem(&td(), &leaf_pem, &key.serialize_pem(), None).expect_err("not a CA");
    assert_eq!(e.kind(), "invalid");
}

#[test]
fn controller_serving_certificate_names_its_addresses() {
    let ca = Ca::generate(&td()).expect("ca");
    let (issued, _key) = ca
        .issue_server(
            &["mesh-controller.mesh-system.svc".into(), "127.0.0.1".into()],
            Duration::from_secs(60),
        )
        .expect("issued");
    assert_eq!(
        uri_sans(&issued.chain[0]),
        vec!["spiffe://cluster.local/mesh/controller".to_string()]
    );
}

mod secret {
    use super::*;
    use crate::ca::secret::load_or_create;
    use http::{Method, Request, Response};
    use http_body_util::BodyExt;
    use k8s_openapi::api::core::v1::Secret;
    use kube::client::Body;
    use kube::{Api, Client};

    fn json(status: u16, body: serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).expect("json")))
            .expect("response")
    }

    fn not_found() -> serde_json::Value {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "secrets \"mesh-ca\" not found"})
    }

    #[tokio::test]
    async fn created_on_first_start_and_reused_after() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<Secret> = Api::namespaced(Client::new(svc, "mesh-system"), "mesh-system");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("get");
            assert_eq!(req.method(), Method::GET);
            assert_eq!(
                req.uri().path(),
                "/api/v1/namespaces/mesh-system/secrets/mesh-ca"
            );
            send.send_response(json(404, not_found()));
            let (req, send) = handle.next_request().await.expect("create");
            assert_eq!(req.method(), Method::POST);
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let created: Secret = serde_json::from_slice(&body).expect("secret body");
            send.send_response(json(201, serde_json::to_value(&created).expect("json")));
            // The next start finds it.
            let (_, send) = handle.next_request().await.expect("get again");
            send.send_response(json(200, serde_json::to_value(&created).expect("json")));
        });
        let first = load_or_create(&api, "mesh-ca", &td())
            .await
            .expect("created");
        let second = load_or_create(&api, "mesh-ca", &td())
            .await
            .expect("loaded");
        assert_eq!(first.roots(), second.roots());
        server.await.expect("mock server");
    }

    #[tokio::test]
    async fn a_replica_that_loses_the_race_loads_the_winner() {
        let winner = Ca::generate(&td()).expect("ca");
        let (cert, key) = winner.to_pem();
        let stored = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "mesh-ca", "namespace": "mesh-system"},
        "data": {
            "ca.crt": pem_b64(cert),
            "ca.key": pem_b64(key),
        }});
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<Secret> = Api::namespaced(Client::new(svc, "mesh-system"), "mesh-system");
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.expect("get");
            send.send_response(json(404, not_found()));
            let (_, send) = handle.next_request().await.expect("create");
            send.send_response(json(
                409,
                serde_json::json!({"kind": "Status",
                "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                "code": 409, "message": "already exists"}),
            ));
            let (_, send) = handle.next_request().await.expect("get the winner");
            send.send_response(json(200, stored));
        });
        let ca = load_or_create(&api, "mesh-ca", &td())
            .await
            .expect("loaded");
        assert_eq!(ca.roots(), winner.roots());
        server.await.expect("mock server");
    }

    fn pem_b64(s: &str) -> String {
        let v =
            serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).expect("bytes");
        v.as_str().expect("base64 string").to_string()
    }
}
