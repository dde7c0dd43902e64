//! Workload identity in process: the controller's CA, node bootstrap, node-bound signing and
//! rotation, with the agents' certificate manager and rustls configs, over gRPC on 127.0.0.1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_agent::control::{
    BootstrapCredential, ControlClient, ControlError, GrpcSigner, new_key_and_csr,
};
use mesh_core::SpiffeId;
use mesh_core::identity::TrustDomain;
use mesh_proxy::identity::{CertConfig, CertManager};
use mesh_proxy::tls;
use mesh_tests::inprocess::{
    ClusterDir, TestAgent, control_config, eventually, free_port, namespace, pod, td,
};
use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn cluster() -> ClusterDir {
    let c = ClusterDir::new();
    c.write("ns.yaml", &namespace("shop"));
    c.write(
        "web.yaml",
        &pod("shop", "web-0", "node-a", "10.1.0.5", "web", "web", ""),
    );
    c.write(
        "api.yaml",
        &pod("shop", "api-0", "node-b", "10.2.0.7", "api", "api", ""),
    );
    c
}

fn web() -> SpiffeId {
    SpiffeId::workload(&td(), "shop", "web").expect("id")
}

fn api() -> SpiffeId {
    SpiffeId::workload(&td(), "shop", "api").expect("id")
}

/// A certificate manager signing through `agent`'s controller client.
fn manager(agent: &TestAgent, lifetime_hint: Duration) -> (Arc<CertManager>, Registry) {
    let mut registry = Registry::default();
    let config = CertConfig {
        min_backoff: Duration::from_millis(100).min(lifetime_hint / 10),
        max_backoff: Duration::from_secs(1),
        ..CertConfig::default()
    };
    let mgr =
        CertManager::new(GrpcSigner(agent.client.clone()), config, &mut registry).expect("manager");
    (mgr, registry)
}

fn metric(registry: &Registry, needle: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
    text.lines()
        .filter(|l| l.starts_with(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn serial(der: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(der).expect("certificate");
    c.raw_serial_as_string()
}

/// An mTLS echo server for `local` on 127.0.0.1; each accepted connection echoes until EOF.
async fn echo_server(mgr: &Arc<CertManager>, local: &SpiffeId) -> std::net::SocketAddr {
    let config = tls::server_config(mgr.clone(), local.clone()).expect("server config");
    let acceptor = TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

type Client = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(
    mgr: &Arc<CertManager>,
    local: &SpiffeId,
    peer: &SpiffeId,
    addr: std::net::SocketAddr,
) -> std::io::Result<Client> {
    let config =
        tls::client_config(mgr.clone(), local.clone(), peer.clone()).expect("client config");
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("mesh.invalid").expect("name");
    let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
    // TLS 1.3: the server checks the client certificate after the client's handshake ends;
    // one round trip shows whether it accepted.
    tls.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await?;
    Ok(tls)
}

async fn roundtrip(c: &mut Client, msg: &[u8]) {
    c.write_all(msg)
        .await
        .expect("write on the held connection");
    let mut buf = vec![0u8; msg.len()];
    c.read_exact(&mut buf)
        .await
        .expect("read on the held connection");
    assert_eq!(buf, msg);
}

fn csr_with_sans(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(key).expect("csr").der().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_and_every_refusal() {
    let dir = cluster();
    let controller = dir.start("127.0.0.1:0".parse().expect("addr"), &[]).await;
    let a = TestAgent::start(&controller, "node-a").await;
    let b = TestAgent::start(&controller, "node-b").await;

    // Issuance: node-a holds web-0, so it gets web's certificate.
    let (mgr_a, _) = manager(&a, Duration::from_secs(3600));
    let cert = mgr_a.fetch(&web()).await.expect("web certificate");
    assert_eq!(tls::peer_identity(&cert.cert).expect("uri san"), web());
    assert!(
        !mgr_a.trust_bundle().is_empty(),
        "the trust bundle came with it"
    );

    // Node authorization: node-b has no pod running as web.
    let (key, csr) = new_key_and_csr(&web()).expect("csr");
    drop(key);
    let e = b
        .client
        .sign_workload(&web(), csr)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&e, ControlError::Refused { message, .. } if message.contains("no meshed pod")),
        "{e}"
    );

    // A CSR with a second SAN.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let two = csr_with_sans(
        &key,
        vec![
            SanType::URI(web().uri().try_into().expect("uri")),
            SanType::DnsName("web.shop.svc".try_into().expect("dns")),
        ],
    );
    let e = a
        .client
        .sign_workload(&web(), two)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("exactly one"), "{e}");

    // A CSR whose key did not sign it.
    let mut der = csr_with_sans(
        &key,
        vec![SanType::URI(web().uri().try_into().expect("uri"))],
    );
    let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let raw = key.public_key_raw().to_vec();
    let pos = der
        .windows(raw.len())
        .position(|w| w == raw.as_slice())
        .expect("key in csr");
    der[pos..pos + raw.len()].copy_from_slice(other.public_key_raw());
    let e = a
        .client
        .sign_workload(&web(), der)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("signature"), "{e}");

    // Another trust domain.
    let foreign =
        SpiffeId::workload(&TrustDomain::new("other.org").expect("td"), "shop", "web").expect("id");
    let (_, csr) = new_key_and_csr(&foreign).expect("csr");
    let e = a
        .client
        .sign_workload(&foreign, csr)
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, ControlError::Refused { .. }), "{e}");

    // Bad and expired bootstrap tokens.
    for (token, needle) in [
        ("not-a-known-token-0000000", "not known"),
        ("expired-token-0123456789", "expired"),
    ] {
        let c = ControlClient::new(control_config(&controller, "node-c", token));
        let e = c.bootstrap().await.expect_err("refused");
        assert!(
            matches!(&e, ControlError::Refused { message, .. } if message.contains(needle)),
            "{token}: {e}"
        );
        let (_, csr) = new_key_and_csr(&web()).expect("csr");
        let e = c
            .sign_workload(&web(), csr)
            .await
            .err()
            .expect("no node certificate");
        assert_eq!(e.kind(), "not_bootstrapped");
    }

    // The rustls verifiers: web on node-a talks to api on node-b; a certificate from another
    // CA for the same identity is refused, and so is the wrong expected identity.
    let (mgr_b, _) = manager(&b, Duration::from_secs(3600));
    mgr_b.fetch(&api()).await.expect("api certificate");
    let addr = echo_server(&mgr_b, &api()).await;
    let mut ok = connect(&mgr_a, &web(), &api(), addr)
        .await
        .expect("mTLS web -> api");
    roundtrip(&mut ok, b"hello").await;
    connect(&mgr_a, &web(), &web(), addr)
        .await
        .expect_err("api is not web: the client refuses");

    let rogue = rogue_manager(&web()).await;
    connect(&rogue, &web(), &api(), addr)
        .await
        .expect_err("a client certified by another CA is refused");
    controller.shutdown().await;
}

/// A manager whose certificates and roots come from a CA the mesh does not know.
async fn rogue_manager(id: &SpiffeId) -> Arc<CertManager> {
    struct Rogue {
        ca: rcgen::Issuer<'static, KeyPair>,
        root: CertificateDer<'static>,
    }
    impl mesh_proxy::identity::Signer for Rogue {
        async fn sign(
            &self,
            id: &SpiffeId,
            csr_der: Vec<u8>,
        ) -> Result<mesh_proxy::identity::SignedCert, mesh_proxy::identity::SignError> {
            let csr =
                rcgen::CertificateSigningRequestParams::from_der(&csr_der.into()).expect("csr");
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::URI(id.uri().try_into().expect("uri"))];
            let leaf = params.signed_by(&csr.public_key, &self.ca).expect("leaf");
            Ok(mesh_proxy::identity::SignedCert {
                chain: vec![leaf.der().clone()],
                roots: vec![self.root.clone()],
            })
        }
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let root = params.self_signed(&key).expect("root");
    let rogue = Rogue {
        root: root.der().clone(),
        ca: rcgen::Issuer::new(params, key),
    };
    let mgr =
        CertManager::new(rogue, CertConfig::default(), &mut Registry::default()).expect("manager");
    mgr.fetch(id).await.expect("rogue certificate");
    mgr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_connections_and_outlives_the_controller_until_expiry() {
    const LIFETIME: Duration = Duration::from_secs(4);
    let dir = cluster();
    let addr = free_port();
    let controller = dir.start(addr, &["--workload-cert-ttl", "4s"]).await;
    let a = TestAgent::start(&controller, "node-a").await;
    let b = TestAgent::start(&controller, "node-b").await;
    let (mgr_a, reg_a) = manager(&a, LIFETIME);
    let (mgr_b, _) = manager(&b, LIFETIME);
    let first = mgr_b.fetch(&api()).await.expect("api certificate");
    mgr_a.fetch(&web()).await.expect("web certificate");
    let server = echo_server(&mgr_b, &api()).await;

    // One connection held open across several rotations, and a new handshake every 500 ms
    // that records the server certificate it saw.
    let mut held = connect(&mgr_a, &web(), &api(), server)
        .await
        .expect("first handshake");
    let mut seen = std::collections::BTreeSet::new();
    seen.insert(serial(&first.cert[0]));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(9) {
        let c = connect(&mgr_a, &web(), &api(), server)
            .await
            .expect("new handshakes succeed during rotations");
        let peer = c
            .get_ref()
            .1
            .peer_certificates()
            .expect("server certificate")[0]
            .clone();
        seen.insert(serial(&peer));
        roundtrip(&mut held, b"still here").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        seen.len() >= 3,
        "new handshakes saw {} server certificates in 9 s of 4 s certificates",
        seen.len()
    );
    let rotations_ok = metric(
        &reg_a,
        "mesh_cert_rotations_total{identity=\"spiffe://cluster.local/ns/shop/sa/web\",result=\"success\"}",
    );
    assert!(rotations_ok >= 3.0, "web rotated {rotations_ok} times");

    // The controller goes away: the agent keeps serving the last certificate until it
    // expires, counting failures; then it stops offering an expired certificate.
    controller.shutdown().await;
    let last = mgr_a.current(&web()).expect("current certificate");
    let not_after = {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, c) = X509Certificate::from_der(&last.cert[0]).expect("leaf");
        std::time::UNIX_EPOCH + Duration::from_secs(c.validity().not_after.timestamp() as u64)
    };
    eventually(Duration::from_secs(5), "renewal failures", || {
        (metric(&reg_a, "mesh_cert_rotations_total{identity=\"spiffe://cluster.local/ns/shop/sa/web\",result=\"failure\"}") >= 1.0)
            .then_some(())
    })
    .await;
    if std::time::SystemTime::now() + Duration::from_millis(300) < not_after {
        assert!(mgr_a.current(&web()).is_some(), "still valid: still served");
    }
    roundtrip(&mut held, b"controller gone").await;
    eventually(Duration::from_secs(8), "expiry", || {
        mgr_a.current(&web()).is_none().then_some(())
    })
    .await;
    assert!(
        std::time::SystemTime::now() >= not_after,
        "not dropped before expiry"
    );
    roundtrip(&mut held, b"open connections are never cut").await;
    let info = mgr_a.certs();
    let web_info = info
        .iter()
        .find(|c| c.identity == web())
        .expect("web in certs()");
    assert!(web_info.consecutive_failures >= 1, "{web_info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_keeps_the_trust_root() {
    let dir = cluster();
    let addr = free_port();
    let controller = dir.start(addr, &[]).await;
    let roots_before = controller.roots_pem.clone();
    let b = TestAgent::start(&controller, "node-b").await;
    let (mgr_b, _) = manager(&b, Duration::from_secs(3600));
    mgr_b
        .fetch(&api())
        .await
        .expect("api certificate before restart");
    controller.shutdown().await;

    let controller = dir.start(addr, &[]).await;
    assert_eq!(
        controller.roots_pem, roots_before,
        "same root after restart"
    );
    // A certificate issued by the new process verifies against the old one's.
    let a = TestAgent::start(&controller, "node-a").await;
    let (mgr_a, _) = manager(&a, Duration::from_secs(3600));
    mgr_a
        .fetch(&web())
        .await
        .expect("web certificate after restart");
    let server = echo_server(&mgr_b, &api()).await;
    let mut c = connect(&mgr_a, &web(), &api(), server)
        .await
        .expect("pre-restart server certificate verifies under the post-restart bundle");
    roundtrip(&mut c, b"same root").await;
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_holds_certificates_for_the_workloads_of_its_node() {
    use mesh_agent::config::{ControllerSettings, CredentialSource};
    let dir = cluster();
    let controller = dir.start("127.0.0.1:0".parse().expect("addr"), &[]).await;
    let files = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        files.path().join("token"),
        format!("{}\n", mesh_tests::inprocess::TOKEN),
    )
    .expect("token file");
    std::fs::write(files.path().join("ca.crt"), &controller.roots_pem).expect("ca file");
    let settings = ControllerSettings {
        address: format!("https://{}", controller.grpc_addr),
        server_name: "mesh-controller.mesh-system.svc".into(),
        ca_file: files.path().join("ca.crt"),
        node: "node-a".into(),
        trust_domain: "cluster.local".into(),
        credential: CredentialSource::BootstrapTokenFile(files.path().join("token")),
        egress: mesh_proxy::outbound::Egress::Allow,
    };
    let mut registry = Registry::default();
    let plane = mesh_agent::control::start(&settings, &mut registry).expect("control plane");

    // web-0 runs on node-a: its identity's certificate is fetched without anyone asking.
    eventually(Duration::from_secs(10), "web's certificate", || {
        plane.certs.current(&web()).map(|_| ())
    })
    .await;
    assert!(
        plane.certs.current(&api()).is_none(),
        "api-0 runs on node-b"
    );
    assert!(
        !plane.certs.trust_bundle().is_empty(),
        "trust bundle from the configuration"
    );
    assert!(plane.client.status().connected);

    // A second pod with another identity lands on node-a: its certificate follows; when it
    // goes, the identity is forgotten.
    dir.write(
        "admin.yaml",
        &pod(
            "shop", "admin-0", "node-a", "10.1.0.9", "admin", "admin", "",
        ),
    );
    let admin = SpiffeId::workload(&td(), "shop", "admin").expect("id");
    eventually(Duration::from_secs(10), "admin's certificate", || {
        plane.certs.current(&admin).map(|_| ())
    })
    .await;
    std::fs::remove_file(dir.resources().join("admin.yaml")).expect("remove pod");
    eventually(Duration::from_secs(10), "admin forgotten", || {
        (!plane.certs.certs().iter().any(|c| c.identity == admin)).then_some(())
    })
    .await;
    drop(plane);
    controller.shutdown().await;
}

/// The agent renews its node certificate by proving its node again with the bootstrap token
/// it re-reads from its file; once the operator revokes the token, renewal stops and the node
/// certificate lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_node_certificate_with_a_fresh_proof() {
    const NODE_TOKEN: &str = "node-a-only-token-0123456789";
    let dir = cluster();
    let tokens = dir.dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("{NODE_TOKEN} node-a 2999-01-01T00:00:00Z\n"),
    )
    .expect("controller token file");
    let agent_token = dir.dir.path().join("agent-token");
    std::fs::write(&agent_token, format!("{NODE_TOKEN}\n")).expect("agent token file");
    let controller = dir
        .start(
            "127.0.0.1:0".parse().expect("addr"),
            &["--node-cert-ttl", "2s"],
        )
        .await;
    let mut config = control_config(&controller, "node-a", NODE_TOKEN);
    config.credential = BootstrapCredential::TokenFile(agent_token);
    let client = ControlClient::new(config);
    client.bootstrap().await.expect("bootstrap");
    let first = client.node_certificate().expect("node certificate");
    let renewal = tokio::spawn(client.clone().run_node_renewal());

    // Renewed (at half life) with the token, before the first one expires.
    let renewed = eventually(Duration::from_secs(5), "a renewed node certificate", || {
        client
            .node_certificate()
            .filter(|c| c.not_after > first.not_after)
    })
    .await;
    assert!(!renewed.expired());

    // Revoked: renewals are refused and the certificate runs out.
    std::fs::write(&tokens, "").expect("revoke");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let last = client.node_certificate().expect("node certificate");
    assert!(last.expired(), "renewed without a valid token");
    let error = client.status().last_error.unwrap_or_default();
    assert!(error.contains("not known"), "{error}");
    renewal.abort();
    controller.shutdown().await;
}
