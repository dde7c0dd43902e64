//! Writes the generated part of the seed corpora into fuzz/corpus/<target>/ (files named
//! `gen-*`; hand-written seeds have other names and are left alone):
//!
//!   cargo +nightly run --manifest-path fuzz/Cargo.toml --example seeds
//!
//! The seeds are real inputs of each parser: the project's own YAML (deploy/), a node snapshot
//! compiled from it as the controller sends it, CSRs and certificates as the agent and the CA
//! make them, and the HTTP/2 bytes of the HBONE client's CONNECT requests; plus near misses
//! of each (a second SAN, another trust domain, a non-canonical authority).
#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use mesh_api::{convert, v1};
use mesh_controller::ca::Ca;
use mesh_controller::compile::{CompileOptions, compile_node};
use mesh_controller::index::Index;
use mesh_controller::resource::parse_yaml_stream;
use mesh_core::SpiffeId;
use mesh_core::identity::TrustDomain;
use mesh_core::policy::TrafficPolicyMode;
use prost::Message;
use rcgen::{
    CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    SanType, SignatureAlgorithm,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const NODE: &str = "node-a";

/// Pods of the demo's workloads on node-a, in an enrolled namespace.
const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {mesh.io/enrolled: "true"}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v1-0, namespace: demo, labels: {app: web, version: v1}}
spec:
  serviceAccountName: web
  nodeName: node-a
  containers: [{name: web, image: web, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: client-0, namespace: demo, labels: {app: client}}
spec:
  serviceAccountName: client
  nodeName: node-a
  containers: [{name: client, image: client}]
status: {podIP: 10.0.1.6}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-0, namespace: demo, labels: {app: echo}}
spec:
  serviceAccountName: echo
  nodeName: node-b
  containers: [{name: echo, image: echo, ports: [{containerPort: 9000}]}]
status: {podIP: 10.0.2.5}
"#;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/ is in the repository")
        .to_path_buf();
    let corpus = root.join("fuzz").join("corpus");
    let yaml = project_yaml(&root);

    let mut out = Seeds::new(&corpus, "resource_yaml");
    for (name, text) in &yaml {
        out.write(name, text.as_bytes());
    }
    out.write("pods", PODS.as_bytes());

    let td = TrustDomain::new("cluster.local").expect("trust domain");
    let ca = Ca::generate(&td).expect("a CA");
    let web = SpiffeId::workload(&td, "demo", "web").expect("id");

    let mut out = Seeds::new(&corpus, "config_apply");
    for (name, bytes) in config_updates(&yaml, &ca) {
        out.write(&name, &bytes);
    }

    let mut out = Seeds::new(&corpus, "ca_csr");
    let other = TrustDomain::new("evil.example").expect("td");
    let cases: [(&str, String, Vec<u8>); 8] = [
        (
            "valid",
            web.uri(),
            csr(&PKCS_ECDSA_P256_SHA256, &[web.uri()]),
        ),
        (
            "two-sans",
            web.uri(),
            csr(
                &PKCS_ECDSA_P256_SHA256,
                &[web.uri(), "spiffe://cluster.local/mesh/controller".into()],
            ),
        ),
        (
            "san-mismatch",
            web.uri(),
            csr(
                &PKCS_ECDSA_P256_SHA256,
                &["spiffe://cluster.local/ns/kube-system/sa/admin".into()],
            ),
        ),
        ("no-san", web.uri(), csr(&PKCS_ECDSA_P256_SHA256, &[])),
        (
            "p384",
            web.uri(),
            csr(&PKCS_ECDSA_P384_SHA384, &[web.uri()]),
        ),
        ("ed25519", web.uri(), csr(&PKCS_ED25519, &[web.uri()])),
        (
            "other-trust-domain",
            SpiffeId::workload(&other, "demo", "web").expect("id").uri(),
            csr(&PKCS_ECDSA_P256_SHA256, &[web.uri()]),
        ),
        (
            "node-identity",
            "spiffe://cluster.local/mesh/node/node-a".into(),
            csr(
                &PKCS_ECDSA_P256_SHA256,
                &["spiffe://cluster.local/mesh/node/node-a".into()],
            ),
        ),
    ];
    for (name, spiffe_id, csr_der) in cases {
        out.write(
            name,
            &v1::SignWorkloadRequest { spiffe_id, csr_der }.encode_to_vec(),
        );
    }

    let mut out = Seeds::new(&corpus, "spiffe_id");
    let issued = ca
        .sign_csr(
            &csr(&PKCS_ECDSA_P256_SHA256, &[web.uri()]),
            &web,
            Duration::from_secs(3600),
        )
        .expect("signed");
    let leaf = issued.chain.first().expect("leaf");
    out.write("cert-issued", &[&[0u8][..], leaf].concat());
    let two_uris = self_signed(&[web.uri(), "spiffe://cluster.local/ns/demo/sa/client".into()]);
    out.write("cert-two-uris", &[&[0u8][..], &two_uris].concat());

    let mut out = Seeds::new(&corpus, "hbone_connect");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cases: [(&str, &[(Method, &str)]); 4] = [
        ("connect", &[(Method::CONNECT, "10.0.1.5:8080")]),
        (
            "connect-three",
            &[
                (Method::CONNECT, "10.0.1.5:8080"),
                (Method::CONNECT, "10.0.1.6:9000"),
                (Method::CONNECT, "255.255.255.255:65535"),
            ],
        ),
        (
            "near-misses",
            &[
                (Method::CONNECT, "10.0.1.5:08080"),
                (Method::CONNECT, "localhost:8080"),
                (Method::CONNECT, "[::ffff:10.0.1.5]:8080"),
                (Method::CONNECT, "10.0.1.5:0"),
            ],
        ),
        (
            "get",
            &[
                (Method::GET, "http://10.0.1.5:8080/admin/"),
                (Method::POST, "https://10.0.1.5:8080/"),
            ],
        ),
    ];
    for (name, requests) in cases {
        let bytes = runtime.block_on(h2_client_bytes(requests));
        out.write(name, &bytes);
    }
}

/// The YAML files of deploy/ (the demo's resources and the examples), by file name.
fn project_yaml(root: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for dir in ["deploy/demo/resources", "deploy/examples"] {
        let mut paths: Vec<PathBuf> = fs::read_dir(root.join(dir))
            .expect("deploy/ directory")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        paths.sort();
        for path in paths {
            let stem = path
                .file_stem()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            files.push((stem, fs::read_to_string(&path).expect("read YAML")));
        }
    }
    files
}

/// A full snapshot of node-a compiled from the project's YAML, then deltas on top of it, as
/// length-delimited `ConfigUpdate`s.
fn config_updates(yaml: &[(String, String)], ca: &Ca) -> Vec<(String, Vec<u8>)> {
    let mut index = Index::new();
    for text in yaml.iter().map(|(_, t)| t.as_str()).chain([PODS]) {
        for resource in parse_yaml_stream(text).into_iter().flatten() {
            index.apply("seeds", resource);
        }
    }
    let opts = CompileOptions {
        service_cidrs: vec![],
        trust_domain: ca.trust_domain().clone(),
        traffic_policy: TrafficPolicyMode::DefaultDeny,
    };
    let mut full = compile_node(&index, &opts, NODE);
    full.trust_bundle = ca.roots_pem();
    assert!(
        !full.workloads.is_empty(),
        "the seed snapshot has workloads"
    );

    let mut smaller = full.clone();
    let first = smaller
        .workloads
        .keys()
        .next()
        .cloned()
        .expect("a workload");
    smaller.workloads.remove(&first);

    let update = |seq: u64, base: Option<(u64, &mesh_core::model::NodeSnapshot)>, new| {
        let (upserts, removals) = convert::diff(base.map(|(_, b)| b), new);
        v1::ConfigUpdate {
            version: Some(v1::Version { epoch: 1, seq }),
            full: base.is_none(),
            base: base.map(|(seq, _)| v1::Version { epoch: 1, seq }),
            upserts,
            removals,
        }
    };
    let encode = |updates: &[v1::ConfigUpdate]| {
        let mut out = Vec::new();
        for u in updates {
            u.encode_length_delimited(&mut out).expect("encode");
        }
        out
    };
    let full_update = update(1, None, &full);
    let delta = update(2, Some((1, &full)), &smaller);
    let back = update(3, Some((2, &smaller)), &full);
    let stale = update(3, Some((1, &full)), &smaller);
    vec![
        ("full".into(), encode(std::slice::from_ref(&full_update))),
        (
            "full-then-deltas".into(),
            encode(&[full_update.clone(), delta.clone(), back]),
        ),
        ("stale-delta".into(), encode(&[full_update, delta, stale])),
    ]
}

fn csr(alg: &'static SignatureAlgorithm, uris: &[String]) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI(u.as_str().try_into().expect("URI")))
        .collect();
    params.serialize_request(&key).expect("CSR").der().to_vec()
}

fn self_signed(uris: &[String]) -> Vec<u8> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI(u.as_str().try_into().expect("URI")))
        .collect();
    params.self_signed(&key).expect("cert").der().to_vec()
}

/// What an h2 client writes for `requests` (without the connection preface, which the
/// target adds), with a server on the other end so that the handshake completes.
async fn h2_client_bytes(requests: &[(Method, &str)]) -> Vec<u8> {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let written = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder {
        inner: client_io,
        written: written.clone(),
    };
    let server = tokio::spawn(async move {
        let mut h2 = h2::server::handshake(server_io)
            .await
            .expect("server handshake");
        while let Some(Ok((_request, mut respond))) = h2.accept().await {
            let _ = respond.send_response(http::Response::new(()), true);
        }
    });
    let (mut client, connection) = h2::client::handshake(recorder).await.expect("handshake");
    let connection = tokio::spawn(connection);
    let mut responses = Vec::new();
    for (method, uri) in requests {
        let request = Request::builder()
            .method(method.clone())
            .uri(*uri)
            .body(())
            .expect("request");
        client = client.ready().await.expect("ready");
        let (response, mut body) = client.send_request(request, false).expect("send");
        body.send_data(Bytes::from_static(b"hello"), true)
            .expect("data");
        responses.push(response);
    }
    for response in responses {
        let _ = tokio::time::timeout(Duration::from_secs(5), response).await;
    }
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    server.abort();
    let bytes = written.lock().expect("recorded").clone();
    bytes
        .strip_prefix(PREFACE)
        .expect("the client starts with the preface")
        .to_vec()
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An I/O stream that keeps a copy of everything written through it.
struct Recorder {
    inner: tokio::io::DuplexStream,
    written: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Recorder {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written
                .lock()
                .expect("recorder")
                .extend_from_slice(&buf[..*n]);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One target's directory of seeds.
struct Seeds {
    dir: PathBuf,
}

impl Seeds {
    fn new(corpus: &Path, target: &str) -> Seeds {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir).expect("create the corpus directory");
        for entry in fs::read_dir(&dir).expect("corpus directory") {
            let path = entry.expect("entry").path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("gen-"))
            {
                fs::remove_file(&path).expect("remove an old generated seed");
            }
        }
        Seeds { dir }
    }

    fn write(&mut self, name: &str, bytes: &[u8]) {
        let path = self.dir.join(format!("gen-{name}"));
        fs::write(&path, bytes).expect("write a seed");
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
}
