//! Attacks on the controller: a tenant's resources reaching into another namespace, and node
//! credentials that outlive their proof.

use std::time::{Duration, Instant};

use mesh_agent::control::new_key_and_csr;
use mesh_api::v1;
use mesh_core::SpiffeId;
use mesh_tests::cluster::{PodSpec, demo_dir, http_get_in};
use mesh_tests::inprocess::{ClusterDir, namespace, pod, td};
use mesh_tests::privileged;
use rcgen::KeyPair;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::common::{ECHO_VIP, call, up_with, wait_until_ok};

/// The `evil` tenant's own service, reachable by its own pods: the control that shows
/// `mallory` is meshed and that `evil`'s TrafficTargets work inside `evil`.
const EVIL_ECHO_VIP: &str = "10.96.66.1:9000";

/// What the tenant of namespace `evil` writes: a TCPRoute and a TrafficTarget in its own
/// namespace naming `demo/echo` as the destination and its own `mallory` as the source, plus
/// a legitimate TrafficTarget for its own service.
const EVIL_YAML: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: evil-echo, namespace: evil}
spec:
  clusterIP: 10.96.66.1
  selector: {app: evil-echo}
  ports:
  - {name: tcp-echo, port: 9000, targetPort: 9000}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: every-port, namespace: evil}
spec:
  matches: {ports: []}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: mallory-to-evil-echo, namespace: evil}
spec:
  destination: {kind: ServiceAccount, name: evil-echo, namespace: evil}
  rules: [{kind: TCPRoute, name: every-port}]
  sources: [{kind: ServiceAccount, name: mallory, namespace: evil}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: mallory-to-demo-echo, namespace: evil}
spec:
  destination: {kind: ServiceAccount, name: echo, namespace: demo}
  rules: [{kind: TCPRoute, name: every-port}]
  sources: [{kind: ServiceAccount, name: mallory, namespace: evil}]
"#;

fn evil_pod(name: &str, service_account: &str, run: &[&str]) -> PodSpec {
    PodSpec {
        namespace: "evil".into(),
        name: name.into(),
        service_account: Some(service_account.into()),
        labels: [("app".to_string(), name.to_string())].into(),
        tls_mode: None,
        ports: if run.is_empty() { vec![] } else { vec![9000] },
        run: run.iter().map(|s| s.to_string()).collect(),
        annotations: Default::default(),
        probe_port: None,
    }
}

/// A TrafficTarget in `evil` naming `demo/echo` as its destination opens nothing: `mallory`
/// reaches `evil`'s own service but never `demo/echo`, and the controller lists the
/// TrafficTarget in `/debug/rejected` with the field and the reason.
#[test]
fn a_traffic_target_in_another_namespace_does_not_open_a_workload() {
    if !privileged("a_traffic_target_in_another_namespace_does_not_open_a_workload") {
        return;
    }
    let resources = tempfile::tempdir().expect("resources dir");
    for entry in std::fs::read_dir(demo_dir().join("resources")).expect("demo resources") {
        let entry = entry.expect("demo resource");
        std::fs::copy(entry.path(), resources.path().join(entry.file_name()))
            .expect("copy a demo resource");
    }
    std::fs::write(resources.path().join("evil.yaml"), EVIL_YAML).expect("write evil.yaml");

    let mut c = up_with(resources.path(), &[]);
    c.add_pod("node-1", evil_pod("mallory", "mallory", &[]))
        .expect("add mallory");
    c.add_pod(
        "node-2",
        evil_pod(
            "evil-echo",
            "evil-echo",
            &[
                "mesh-demo",
                "tcp-echo",
                "--listen",
                "0.0.0.0:9000",
                "--name",
                "{pod}",
            ],
        ),
    )
    .expect("add evil-echo");

    // The control: mallory is meshed and its tenant's own TrafficTarget lets it through.
    wait_until_ok(&c, "evil/mallory", EVIL_ECHO_VIP);

    // The attack: demo/echo, which demo/client reaches, stays closed to mallory.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let out = call(&c, "evil/mallory", ECHO_VIP);
        assert!(
            !out.status.success(),
            "evil/mallory reached demo/echo through evil's TrafficTarget: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_until_ok(&c, "demo/client", ECHO_VIP);

    let rejected = http_get_in(&c.names.fabric(), "127.0.0.1:15014", "/debug/rejected")
        .expect("the controller's /debug/rejected");
    let rejected: serde_json::Value = serde_json::from_str(&rejected).expect("JSON");
    let entry = rejected
        .as_array()
        .expect("a list of rejections")
        .iter()
        .find(|r| r["key"]["name"] == "mallory-to-demo-echo")
        .unwrap_or_else(|| panic!("the TrafficTarget is not listed: {rejected}"));
    assert_eq!(entry["key"]["kind"], "TrafficTarget", "{entry}");
    assert_eq!(entry["key"]["namespace"], "evil", "{entry}");
    let reason = entry["reason"].as_str().expect("a reason");
    assert!(
        reason.contains(
            "spec.destination.namespace: \"demo\" is not the TrafficTarget's own namespace \"evil\""
        ),
        "{reason}"
    );
    assert!(
        !rejected.to_string().contains("mallory-to-evil-echo"),
        "the tenant's own TrafficTarget is valid: {rejected}"
    );
    c.down().expect("cluster down");
}

// === Node credentials ===

/// A bootstrap token for `node-a` only.
const NODE_A_TOKEN: &str = "node-a-bootstrap-token-0123456789";

/// A gRPC channel to the controller, presenting `client` (chain PEM, key PEM) if given:
/// what anyone holding a node's certificate and key can open.
fn channel(controller: &mesh_controller::app::Controller, client: Option<(&str, &str)>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&controller.roots_pem))
        .domain_name("mesh-controller.mesh-system.svc");
    if let Some((chain, key)) = client {
        tls = tls.identity(Identity::from_pem(chain, key));
    }
    Endpoint::from_shared(format!("https://{}", controller.grpc_addr))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect_lazy()
}

async fn bootstrap(
    channel: Channel,
    token: Option<&str>,
) -> Result<v1::CertificateResponse, tonic::Status> {
    let node = SpiffeId::node(&td(), "node-a").expect("node id");
    let (_, csr) = new_key_and_csr(&node).expect("csr");
    v1::identity_client::IdentityClient::new(channel)
        .bootstrap(v1::BootstrapRequest {
            node: "node-a".into(),
            csr_der: csr,
            credential: token.map(|t| v1::bootstrap_request::Credential::BootstrapToken(t.into())),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn sign_web(channel: Channel) -> Result<v1::CertificateResponse, tonic::Status> {
    let web = SpiffeId::workload(&td(), "shop", "web").expect("web id");
    let (_, csr) = new_key_and_csr(&web).expect("csr");
    v1::identity_client::IdentityClient::new(channel)
        .sign_workload(v1::SignWorkloadRequest {
            spiffe_id: web.to_string(),
            csr_der: csr,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Someone who copied node-a's certificate and key (a stolen disk, a decommissioned node)
/// cannot keep it alive: renewing with the certificate alone is refused, renewing after
/// the operator revoked node-a's token is refused, and once the certificate expires it opens
/// nothing. Before, the controller renewed any still-valid node certificate without a
/// credential, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_node_certificate_lapses_without_a_fresh_proof() {
    let dir = ClusterDir::new();
    dir.write("ns.yaml", &namespace("shop"));
    dir.write(
        "web.yaml",
        &pod("shop", "web-0", "node-a", "10.1.0.5", "web", "web", ""),
    );
    let tokens = dir.dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("{NODE_A_TOKEN} node-a 2999-01-01T00:00:00Z\n"),
    )
    .expect("token file");
    let controller = dir
        .start(
            "127.0.0.1:0".parse().expect("addr"),
            &["--node-cert-ttl", "3s"],
        )
        .await;

    // node-a bootstraps; the thief copies its key and certificate.
    let node = SpiffeId::node(&td(), "node-a").expect("node id");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names =
            vec![rcgen::SanType::URI(node.uri().try_into().expect("uri san"))];
        params.serialize_request(&key).expect("csr").der().to_vec()
    };
    let issued = v1::identity_client::IdentityClient::new(channel(&controller, None))
        .bootstrap(v1::BootstrapRequest {
            node: "node-a".into(),
            csr_der: csr,
            credential: Some(v1::bootstrap_request::Credential::BootstrapToken(
                NODE_A_TOKEN.into(),
            )),
        })
        .await
        .expect("node-a bootstraps with its token")
        .into_inner();
    let chain: String = issued
        .chain_der
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
        .collect();
    let key_pem = key.serialize_pem();
    let stolen = || channel(&controller, Some((&chain, &key_pem)));

    // The control: while valid, the certificate is node-a's identity.
    sign_web(stolen())
        .await
        .expect("the certificate works while valid");

    // Renewal with the certificate as the only proof.
    let e = bootstrap(stolen(), None)
        .await
        .expect_err("renewal without a credential");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert!(e.message().contains("no bootstrap credential"), "{e}");

    // The operator revokes node-a's token: the certificate no longer renews with it.
    std::fs::write(&tokens, "").expect("revoke");
    let e = bootstrap(stolen(), Some(NODE_A_TOKEN))
        .await
        .expect_err("renewal with a revoked token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    assert!(e.message().contains("not known"), "{e}");

    // Expired, the certificate opens nothing (the TLS handshake refuses it).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let e = sign_web(stolen()).await.expect_err("expired certificate");
    assert_ne!(e.code(), tonic::Code::Ok);
    let e = bootstrap(stolen(), None)
        .await
        .expect_err("renewal with an expired certificate");
    assert_ne!(e.code(), tonic::Code::Ok, "{e}");
    controller.shutdown().await;
}

/// A token file with a token for any node (`*`) does not start a cluster-mode controller: the
/// operator hears why (the flag and the line) with status 64, before anything is served.
#[test]
fn a_wildcard_bootstrap_token_does_not_start_a_cluster_controller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "# named tokens are fine\nnode-1-token-0123456789 node-1 2999-01-01T00:00:00Z\n\
         any-node-token-0123456789 * 2999-01-01T00:00:00Z\n",
    )
    .expect("token file");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-controller"))
        .arg("--kubernetes")
        .arg("--bootstrap-tokens")
        .arg(&tokens)
        .output()
        .expect("run mesh-controller");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--bootstrap-tokens") && stderr.contains("line 3: tokens for any node"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "it must not serve");
}
