use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::testing::{
    TestCa, TestSigner, eventually, id, manager, not_after, rotations, sample, serial, sleep_past,
};
use super::*;

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    let (_, c) = X509Certificate::from_der(cert).expect("parse leaf");
    let san = c
        .subject_alternative_name()
        .expect("SAN parses")
        .expect("SAN present");
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => (*u).to_string(),
            other => format!("{other}"),
        })
        .collect()
}

fn leaf(key: &CertifiedKey) -> &CertificateDer<'static> {
    key.cert.first().expect("a leaf")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_issues_a_cert_naming_the_identity() {
    let ca = TestCa::new("ca-a");
    let signer = TestSigner::new(ca.clone(), Duration::from_secs(3600));
    let (mgr, registry) = manager(&signer);
    let web = id(WEB);

    let key = mgr.fetch(&web).await.expect("issued");
    assert_eq!(uri_sans(leaf(&key)), vec![WEB.to_string()]);
    key.keys_match().expect("the leaf is for the key we hold");
    let current = mgr.current(&web).expect("served without blocking");
    assert!(
        Arc::ptr_eq(&current, &key),
        "current() serves the fetched certificate"
    );
    assert!(Arc::ptr_eq(&mgr.fetch(&web).await.expect("cached"), &key));
    assert_eq!(signer.calls(), 1, "a valid certificate is not issued again");
    assert_eq!(
        mgr.trust_bundle(),
        vec![ca.root()],
        "the CA's roots seed an empty bundle"
    );
    assert_eq!(rotations(&registry, &web, "success"), 1.0);
    assert_eq!(
        sample(
            &registry,
            &format!("mesh_cert_expiry_timestamp_seconds{{identity=\"{WEB}\"}}")
        ),
        not_after(leaf(&key)) as f64
    );
    assert!(
        mgr.current(&id("spiffe://cluster.local/ns/default/sa/other"))
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_call_the_signer_once() {
    let signer = TestSigner::new(TestCa::new("ca-a"), Duration::from_secs(3600));
    signer.set_delay(Duration::from_millis(300));
    let (mgr, _registry) = manager(&signer);
    let web = id(WEB);

    let fetches = (0..8).map(|_| mgr.fetch(&web));
    let keys = futures::future::join_all(fetches).await;
    let first = keys[0].as_ref().expect("issued").clone();
    for k in &keys {
        assert!(
            Arc::ptr_eq(k.as_ref().expect("issued"), &first),
            "all callers share one cert"
        );
    }
    assert_eq!(signer.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_share_a_failure() {
    let signer = TestSigner::new(TestCa::new("ca-a"), Duration::from_secs(3600));
    signer.set_delay(Duration::from_millis(300));
    signer.set_failing(true);
    let (mgr, registry) = manager(&signer);
    let web = id(WEB);

    let results = futures::future::join_all((0..4).map(|_| mgr.fetch(&web))).await;
    for r in &results {
        assert_eq!(r.as_ref().expect_err("the signer fails").kind(), "sign");
    }
    assert_eq!(signer.calls(), 1);
    assert_eq!(rotations(&registry, &web, "failure"), 1.0);
    assert_eq!(mgr.certs()[0].state, CertState::Failed);

    signer.set_failing(false);
    mgr.fetch(&web).await.expect("a later fetch tries again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_cert_naming_another_identity() {
    let signer = TestSigner::new(TestCa::new("ca-a"), Duration::from_secs(3600));
    signer.sign_as(Some("spiffe://cluster.local/ns/default/sa/admin"));
    let (mgr, registry) = manager(&signer);
    let web = id(WEB);

    let err = mgr
        .fetch(&web)
        .await
        .expect_err("a cert for admin is not a cert for web");
    assert_eq!(err.kind(), "bad_cert", "{err}");
    assert!(err.to_string().contains("sa/admin"), "{err}");
    assert!(mgr.current(&web).is_none());
    assert_eq!(rotations(&registry, &web, "failure"), 1.0);
}

/// Returns a leaf signed by one CA with the roots of another.
struct MismatchedSigner {
    signs: Arc<TestCa>,
    claims: Arc<TestCa>,
}

impl Signer for MismatchedSigner {
    async fn sign(&self, id: &SpiffeId, csr_der: Vec<u8>) -> Result<SignedCert, SignError> {
        let leaf = self
            .signs
            .sign(&id.uri(), &csr_der, Duration::from_secs(3600))
            .map_err(SignError::Refused)?;
        Ok(SignedCert {
            chain: vec![leaf],
            roots: vec![self.claims.root()],
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_cert_that_does_not_chain_to_the_roots() {
    let signer = MismatchedSigner {
        signs: TestCa::new("ca-a"),
        claims: TestCa::new("ca-b"),
    };
    let mut registry = Registry::default();
    let mgr = CertManager::new(signer, CertConfig::default(), &mut registry).expect("manager");
    let err = mgr
        .fetch(&id(WEB))
        .await
        .expect_err("chain does not verify");
    assert_eq!(err.kind(), "bad_cert", "{err}");
    assert!(
        mgr.trust_bundle().is_empty(),
        "roots of a refused cert are not adopted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_at_half_life_without_a_gap() {
    let signer = TestSigner::new(TestCa::new("ca-a"), Duration::from_secs(4));
    let (mgr, registry) = manager(&signer);
    let web = id(WEB);

    let first = serial(leaf(&mgr.fetch(&web).await.expect("issued")));
    let mut seen = vec![first];
    let mut gaps = 0;
    eventually("two rotations", Duration::from_secs(30), || {
        match mgr.current(&web) {
            Some(k) => {
                let s = serial(leaf(&k));
                if seen.last() != Some(&s) {
                    seen.push(s);
                }
            }
            None => gaps += 1,
        }
        (seen.len() >= 3).then_some(())
    })
    .await;
    assert_eq!(
        gaps, 0,
        "a certificate is served at all times across rotations"
    );
    assert!(rotations(&registry, &web, "success") >= 3.0);
    assert_eq!(rotations(&registry, &web, "failure"), 0.0);
    let info = &mgr.certs()[0];
    assert_eq!(info.state, CertState::Valid);
    assert!(info.next_rotation.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_serving_until_expiry_while_the_signer_fails() {
    let signer = TestSigner::new(TestCa::new("ca-a"), Duration::from_secs(6));
    let (mgr, registry) = manager(&signer);
    let web = id(WEB);

    let key = mgr.fetch(&web).await.expect("issued");
    let expiry = not_after(leaf(&key));
    signer.set_failing(true);

    eventually("a failed renewal", Duration::from_secs(10), || {
        (rotations(&registry, &web, "failure") >= 1.0).then_some(())
    })
    .await;
    let served = mgr
        .current(&web)
        .expect("the last cert is served until it expires");
    assert!(Arc::ptr_eq(&served, &key));
    let info = &mgr.certs()[0];
    assert_eq!(info.state, CertState::Renewing);
    assert!(info.consecutive_failures >= 1);
    assert!(
        info.last_error
            .as_deref()
            .unwrap_or("")
            .contains("told to fail")
    );

    sleep_past(expiry, Duration::from_millis(500)).await;
    assert!(
        mgr.current(&web).is_none(),
        "an expired cert is never served"
    );
    let err = mgr.fetch(&web).await.expect_err("nothing valid to return");
    assert_eq!(err.kind(), "expired", "{err}");
    assert_eq!(mgr.certs()[0].state, CertState::Expired);
    assert!(
        rotations(&registry, &web, "failure") >= 2.0,
        "retries are counted"
    );

    signer.set_failing(false);
    let renewed = eventually("recovery", Duration::from_secs(10), || mgr.current(&web)).await;
    assert_ne!(serial(leaf(&renewed)), serial(leaf(&key)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_stops_renewal() {
    let signer = TestSigner::new(TestCa::new("ca-a"), Duration::from_secs(4));
    let (mgr, registry) = manager(&signer);
    let web = id(WEB);

    let key = mgr.fetch(&web).await.expect("issued");
    mgr.forget(&web);
    assert!(mgr.current(&web).is_none());
    assert!(mgr.certs().is_empty());
    // Past the time the cert would have been renewed (and expired).
    sleep_past(not_after(leaf(&key)), Duration::from_millis(500)).await;
    assert_eq!(signer.calls(), 1, "no renewal after forget");
    assert_eq!(
        sample(
            &registry,
            &format!("mesh_cert_expiry_timestamp_seconds{{identity=\"{WEB}\"}}")
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_bundle_is_replaced_or_kept_whole() {
    let a = TestCa::new("ca-a");
    let b = TestCa::new("ca-b");
    let (mgr, _registry) = manager(&TestSigner::new(a.clone(), Duration::from_secs(3600)));
    assert!(mgr.trust_bundle().is_empty());

    mgr.set_trust_bundle(vec![a.root(), b.root()])
        .expect("two roots");
    assert_eq!(mgr.trust_bundle(), vec![a.root(), b.root()]);
    let store = mgr.trust_store();
    assert_eq!(store.store().len(), 2);

    let err = mgr.set_trust_bundle(vec![]).expect_err("empty");
    assert_eq!(err.kind(), "trust_bundle");
    let err = mgr
        .set_trust_bundle(vec![b.root(), CertificateDer::from(vec![1, 2, 3])])
        .expect_err("garbage");
    assert_eq!(err.kind(), "trust_bundle");
    assert!(
        Arc::ptr_eq(&store, &mgr.trust_store()),
        "a refused bundle changes nothing"
    );

    mgr.set_trust_bundle(vec![b.root()]).expect("one root");
    assert_eq!(mgr.trust_bundle(), vec![b.root()]);
    mgr.fetch(&id(WEB)).await.expect("issued by a");
    assert_eq!(
        mgr.trust_bundle(),
        vec![b.root()],
        "a pushed bundle is not overridden"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_describes_each_identity() {
    let (mgr, _registry) = manager(&TestSigner::new(
        TestCa::new("ca-a"),
        Duration::from_secs(3600),
    ));
    let web = id(WEB);
    let api = id("spiffe://cluster.local/ns/prod/sa/api");
    let key = mgr.fetch(&web).await.expect("issued");
    mgr.fetch(&api).await.expect("issued");

    let infos = mgr.certs();
    assert_eq!(infos.len(), 2);
    let info = infos
        .iter()
        .find(|i| i.identity == web)
        .expect("web listed");
    assert_eq!(info.serial.as_deref(), Some(serial(leaf(&key)).as_str()));
    assert_eq!(info.state, CertState::Valid);
    assert!(info.issuer.as_deref().unwrap_or("").contains("ca-a"));
    let json = serde_json::to_value(info).expect("serialize");
    assert_eq!(json["identity"], WEB);
    assert_eq!(json["state"], "valid");
    assert!(json["not_after"].as_str().expect("a time").ends_with('Z'));
    assert!(json["next_rotation"].is_string());
}

#[test]
fn backoff_doubles_within_bounds_scaled_to_the_lifetime() {
    let cfg = CertConfig::default();
    let day = Duration::from_secs(24 * 3600);
    let long: Vec<Duration> = (1..=10).map(|n| cfg.backoff(n, day)).collect();
    assert_eq!(long[0], Duration::from_millis(250));
    assert_eq!(long[1], Duration::from_millis(500));
    assert_eq!(long[7], Duration::from_secs(30), "capped by max_backoff");
    assert_eq!(cfg.backoff(u32::MAX, day), Duration::from_secs(30));

    let short = Duration::from_secs(4);
    assert_eq!(cfg.backoff(1, short), Duration::from_millis(125));
    assert_eq!(
        cfg.backoff(10, short),
        Duration::from_millis(500),
        "an eighth of the lifetime"
    );
    let total: Duration = (1..=4).map(|n| cfg.backoff(n, short)).sum();
    assert!(
        total < short / 2,
        "four retries fit in the second half of the lifetime"
    );

    for _ in 0..100 {
        let j = jitter(Duration::from_millis(400));
        assert!(
            j >= Duration::from_millis(200) && j <= Duration::from_millis(400),
            "{j:?}"
        );
    }
}

#[test]
fn renewal_is_planned_at_the_configured_fraction() {
    let cfg = CertConfig::default();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let day = Duration::from_secs(24 * 3600);
    assert_eq!(cfg.renew_at(t0, t0 + day, t0), t0 + day / 2);
    let late = t0 + day * 3 / 4;
    assert_eq!(
        cfg.renew_at(t0, t0 + day, late),
        late + day / 8,
        "half of what is left"
    );
    let cfg = CertConfig {
        renew_fraction: 0.75,
        ..CertConfig::default()
    };
    assert_eq!(
        cfg.renew_at(t0, t0 + Duration::from_secs(8), t0),
        t0 + Duration::from_secs(6)
    );
}

#[test]
fn config_is_validated() {
    assert!(CertConfig::default().validate().is_ok());
    for bad in [
        CertConfig {
            renew_fraction: 1.0,
            ..CertConfig::default()
        },
        CertConfig {
            renew_fraction: f64::NAN,
            ..CertConfig::default()
        },
        CertConfig {
            min_backoff: Duration::from_secs(60),
            ..CertConfig::default()
        },
        CertConfig {
            min_backoff: Duration::ZERO,
            ..CertConfig::default()
        },
    ] {
        assert_eq!(
            bad.validate().expect_err("invalid").kind(),
            "config",
            "{bad:?}"
        );
    }
}
