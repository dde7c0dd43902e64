//! Attacks on the L7 policy: paths that leave an allowed prefix once the application resolves
//! them, and refusals that tell the caller about the destination's policy.

use std::time::{Duration, Instant};

use mesh_tests::cluster::{Cluster, demo_dir};
use mesh_tests::privileged;

use crate::common::up_with;

/// web's Service VIP (HTTP, port 80 to the pods' 8080).
const WEB_VIP: &str = "10.96.0.10:80";

/// The demo's policy, with client allowed `GET /public/...` on web and nothing else there.
const PUBLIC_ONLY: &str = r#"
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: web-public, namespace: demo}
spec:
  matches:
  - {name: public, pathRegex: "/public/.*", methods: [GET]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: client-to-web, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: web, namespace: demo}
  rules: [{kind: HTTPRouteGroup, name: web-public, matches: [public]}]
  sources: [{kind: ServiceAccount, name: client, namespace: demo}]
"#;

/// The demo cluster with [`PUBLIC_ONLY`] in place of the demo's rule for web.
fn cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("temporary directory");
    for file in ["services.yaml", "split.yaml"] {
        std::fs::copy(
            demo_dir().join("resources").join(file),
            dir.path().join(file),
        )
        .expect("copy the demo resources");
    }
    let policy =
        std::fs::read_to_string(demo_dir().join("resources/policy.yaml")).expect("policy.yaml");
    let kept: Vec<&str> = policy
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: client-to-web"))
        .collect();
    std::fs::write(
        dir.path().join("policy.yaml"),
        format!("{}\n---{PUBLIC_ONLY}", kept.join("\n---\n")),
    )
    .expect("write the policy");
    up_with(dir.path(), &[])
}

/// What curl saw: the status, the response headers and the body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

/// `curl --path-as-is` from `pod` to web's VIP, the path sent exactly as given.
fn get(c: &Cluster, pod: &str, path: &str) -> Answer {
    get_with(c, pod, path, &[])
}

/// [`get`] with more curl arguments.
fn get_with(c: &Cluster, pod: &str, path: &str, extra: &[&str]) -> Answer {
    let url = format!("http://{WEB_VIP}{path}");
    let mut argv = vec![
        "curl",
        "-sS",
        "--path-as-is",
        "--max-time",
        "10",
        "-D",
        "/dev/stderr",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    argv.extend_from_slice(extra);
    argv.push(&url);
    let out = c.exec(pod, &argv).expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Answer {
        status: code.trim().parse().unwrap_or(0),
        headers: String::from_utf8_lossy(&out.stderr).into_owned(),
        body: body.to_owned(),
    }
}

/// The path the demo HTTP server says it received, when the answer is its own.
fn app_path(answer: &Answer) -> Option<String> {
    let reply: serde_json::Value = serde_json::from_str(answer.body.trim()).ok()?;
    reply["path"].as_str().map(str::to_owned)
}

/// The log of the agent of `node` (its access log included).
fn agent_log(c: &Cluster, node: &str) -> String {
    let n = &c.nodes[c.node_index(node).expect("node")];
    let proc = n.agent.as_ref().expect("the agent runs");
    std::fs::read_to_string(&proc.log).unwrap_or_default()
}

/// Waits for `check` to hold on the agent log of `node`.
fn wait_for_log(c: &Cluster, node: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = agent_log(c, node);
        if check(&log) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{node}'s agent log never showed {what}:\n{}",
            log.lines().rev().take(40).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Words that name the destination's policy or identities.
const POLICY_WORDS: [&str; 7] = [
    "TrafficTarget",
    "client-to-web",
    "web-public",
    "spiffe://",
    "sa/",
    "no HTTP match",
    "x-mesh-reason",
];

#[test]
fn dot_segments_cannot_leave_an_allowed_prefix_and_refusals_name_no_policy() {
    if !privileged("dot_segments_cannot_leave_an_allowed_prefix_and_refusals_name_no_policy") {
        return;
    }
    let c = cluster();

    // What the rule allows works, and the application sees the path the policy matched.
    let deadline = Instant::now() + Duration::from_secs(30);
    let allowed = loop {
        let a = get(&c, "demo/client", "/public/x");
        if a.status == 200 || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(allowed.status, 200, "{}{}", allowed.headers, allowed.body);
    assert_eq!(app_path(&allowed).as_deref(), Some("/public/x"));
    let dotted = get(&c, "demo/client", "/public/./x");
    assert_eq!(dotted.status, 200, "{}", dotted.body);
    assert_eq!(
        app_path(&dotted).as_deref(),
        Some("/public/x"),
        "the application receives the normalized path: {}",
        dotted.body
    );

    // The attacks: none reaches the application's /admin/ (nor anything of it).
    for path in [
        "/public/../admin/",
        "/public/%2e%2e/admin/",
        "/public/%2E%2E/admin/",
        "/public//../admin/",
        "/public/..%2fadmin/",
        "/public/..%2Fadmin/",
        "/public/%2e%2e%2fadmin/",
        "/public/..%5cadmin/",
    ] {
        let a = get(&c, "demo/client", path);
        assert!(
            a.status == 403 || a.status == 400,
            "{path}: {} {}{}",
            a.status,
            a.headers,
            a.body
        );
        assert_eq!(
            app_path(&a),
            None,
            "{path} reached the application: {}",
            a.body
        );
    }

    // The same over HTTP/2 (prior knowledge: the `:path` pseudo-header) and with the
    // absolute-form request target of a forward proxy.
    for path in [
        "/public/../admin/",
        "/public/%2e%2e/admin/",
        "/public/..%2fadmin/",
    ] {
        let h2 = get_with(&c, "demo/client", path, &["--http2-prior-knowledge"]);
        let target = format!("http://{WEB_VIP}{path}");
        let absolute = get_with(&c, "demo/client", "/", &["--request-target", &target]);
        for (how, a) in [("HTTP/2", h2), ("absolute-form", absolute)] {
            assert!(
                a.status == 403 || a.status == 400,
                "{how} {path}: {} {}{}",
                a.status,
                a.headers,
                a.body
            );
            assert_eq!(app_path(&a), None, "{how} {path} reached the application");
        }
    }

    // A refused request gets a plain refusal; the reason is only in web's node log.
    let denied = get(&c, "demo/client", "/admin/");
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert_eq!(denied.body.trim(), "access denied");
    for word in POLICY_WORDS {
        assert!(
            !denied.headers.contains(word) && !denied.body.contains(word),
            "the refusal names {word:?}: {}{}",
            denied.headers,
            denied.body
        );
    }
    wait_for_log(&c, "node-2", "the reason of the /admin/ refusal", |log| {
        log.lines()
            .any(|l| l.contains("no_http_match") && l.contains("no HTTP match for GET /admin/"))
    });

    // A caller no TrafficTarget names: refused at web's node, told nothing more.
    let intruder = get(&c, "demo/intruder", "/public/x");
    assert_eq!(intruder.status, 403, "{}", intruder.body);
    assert_eq!(intruder.body.trim(), "access denied");
    for word in POLICY_WORDS {
        assert!(
            !intruder.headers.contains(word) && !intruder.body.contains(word),
            "the refusal names {word:?}: {}{}",
            intruder.headers,
            intruder.body
        );
    }
    wait_for_log(&c, "node-2", "the intruder's refusal", |log| {
        log.lines()
            .any(|l| l.contains("no_traffic_target") && l.contains("sa/intruder"))
    });
    c.down().expect("teardown");
}
