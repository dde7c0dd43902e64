//! The Helm chart `deploy/helm/mesh` and what is rendered from it: lint, Kubernetes' own
//! schemas for every supported release, the values schema, the namespace, the binaries'
//! parsers for every flag the chart passes, the checked-in `deploy/*.yaml`, and the examples
//! against the SMI CRDs the chart ships.
//!
//! Needs `helm` and kubernetes-validate, which `cargo xtask prereqs` installs. Nothing here
//! needs privileges, so a missing tool fails the test (naming that command) instead of
//! skipping it.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser;
use serde_json::Value;
use xtask::{manifests, tools};

/// Non-default values: another namespace and trust domain, one controller replica, the
/// ServiceMonitor, capture CIDRs, an unprivileged agent, other CNI paths.
const CUSTOM_VALUES: &str = "tests/chart/custom-values.yaml";
const CUSTOM_NAMESPACE: &str = "edge-mesh";

/// The oldest Kubernetes release the chart supports (pod-bound tokens name the node), and the
/// newest that kubernetes-validate must know at least.
const OLDEST_KUBERNETES: (u32, u32) = (1, 30);
const NEWEST_REQUIRED: (u32, u32) = (1, 34);

/// Kinds without a namespace.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
];

/// Controller flags the chart passes that the controller gains in parallel work (the trust
/// bundle ConfigMap and leader election). While the parser knows none of them, the controller
/// test leaves them out and says so; once it knows one, every one is checked like any other
/// flag (so a flag that landed under another name fails the test).
const PENDING_CONTROLLER_FLAGS: &[&str] = &["trust-bundle", "leader-elect", "lease"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

// === tools ===

fn require_helm() {
    let ok = Command::new(tools::HELM)
        .args(["version", "--short"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "`{}` does not run: the chart tests need Helm; install it with `cargo xtask prereqs`",
        tools::HELM
    );
}

fn require_kubernetes_validate() {
    assert!(
        tools::kubernetes_validate_present(),
        "{} is missing: the chart tests need kubernetes-validate; install it with \
         `cargo xtask prereqs`",
        tools::KUBERNETES_VALIDATE
    );
}

/// `helm ARGS` in the workspace: stdout, or stderr when it fails.
fn helm(args: &[&str]) -> Result<String, String> {
    require_helm();
    let out = Command::new(tools::HELM)
        .current_dir(workspace())
        .args(args)
        .output()
        .expect("helm runs");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `helm template` of the chart with the CRDs: default values, or a values file.
fn render(values: Option<&str>, extra: &[&str]) -> Result<String, String> {
    let mut args = vec!["template", "mesh", manifests::CHART, "--include-crds"];
    if let Some(v) = values {
        args.extend(["-f", v]);
    }
    args.extend(extra);
    helm(&args)
}

fn rendered(values: Option<&str>) -> String {
    render(values, &[]).unwrap_or_else(|e| panic!("helm template ({values:?}): {e}"))
}

/// Every object of a rendering.
fn objects(rendered: &str) -> Vec<Value> {
    manifests::documents(rendered)
        .iter()
        .map(|d| serde_yaml_ng::from_str(d).unwrap_or_else(|e| panic!("YAML: {e}\n{d}")))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("{v} is not a list"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list}"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} entry {name}"))
}

/// The value of `--flag=value` in `args` (the chart writes every flag so).
/// The first element of the array `list` that `pick` accepts.
fn item<'a>(list: &'a Value, what: &str, pick: impl Fn(&Value) -> bool) -> &'a Value {
    list.as_array()
        .unwrap_or_else(|| panic!("{what}: not in a list: {list}"))
        .iter()
        .find(|v| pick(v))
        .unwrap_or_else(|| panic!("no {what}"))
}

/// The controller's arguments as the Deployment renders them.
fn controller_args(objects: &[Value]) -> Vec<String> {
    let pod = &find(objects, "Deployment", "mesh-controller")["spec"]["template"]["spec"];
    strings(&container(pod, "containers", "controller")["args"])
}

fn flag(args: &[String], name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
}

// === lint and Kubernetes' schemas ===

#[test]
fn helm_lint_passes_in_strict_mode() {
    for values in [None, Some(CUSTOM_VALUES)] {
        let mut args = vec!["lint", "--strict", manifests::CHART];
        if let Some(v) = values {
            args.extend(["-f", v]);
        }
        let out = helm(&args).unwrap_or_else(|e| panic!("helm lint ({values:?}): {e}"));
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm lint ({values:?}):\n{out}"
        );
    }
}

/// The Kubernetes releases kubernetes-validate has schemas for, from the oldest the chart
/// supports on.
fn kubernetes_versions() -> Vec<(u32, u32)> {
    require_kubernetes_validate();
    let python = Path::new(tools::VENV).join("bin/python");
    let out = Command::new(&python)
        .args([
            "-c",
            "import kubernetes_validate.utils as u; print(' '.join(u.all_versions()))",
        ])
        .output()
        .expect("the venv's python runs");
    assert!(out.status.success(), "kubernetes-validate's versions");
    let versions: BTreeSet<(u32, u32)> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .filter(|v| *v >= OLDEST_KUBERNETES)
        .collect();
    for minor in OLDEST_KUBERNETES.1..=NEWEST_REQUIRED.1 {
        assert!(
            versions.contains(&(1, minor)),
            "kubernetes-validate has no schemas for 1.{minor}; `cargo xtask prereqs` installs \
             kubernetes-validate {}",
            tools::KUBERNETES_VALIDATE_VERSION
        );
    }
    versions.into_iter().collect()
}

/// Runs kubernetes-validate in strict mode (unknown fields fail) on `docs` for each release.
fn validate_with_kubernetes(docs: &[String], label: &str) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join(format!("{label}.yaml"));
    std::fs::write(&file, docs.join("---\n")).expect("write the rendering");
    for (major, minor) in kubernetes_versions() {
        let version = format!("{major}.{minor}");
        let out = Command::new(tools::KUBERNETES_VALIDATE)
            .args(["--strict", "-k", &version])
            .arg(&file)
            .output()
            .expect("kubernetes-validate runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{label} does not validate against Kubernetes {version}:\n{text}"
        );
        // An object of a kind kubernetes-validate has no schema for only gets a warning: none
        // may pass unchecked.
        assert!(
            !text.contains("WARN") && !text.contains("ERROR"),
            "{label} against Kubernetes {version}:\n{text}"
        );
        let passed = text.matches(" passed for resource ").count();
        assert_eq!(
            passed,
            docs.len(),
            "{label}: not every object was checked against {version}:\n{text}"
        );
    }
}

#[test]
fn every_rendered_object_validates_against_each_supported_kubernetes_version() {
    for (values, label) in [(None, "default"), (Some(CUSTOM_VALUES), "custom")] {
        let text = rendered(values);
        let (monitors, docs): (Vec<String>, Vec<String>) = manifests::documents(&text)
            .into_iter()
            .partition(|d| manifests::kind_of(d) == Some("ServiceMonitor"));
        // The ServiceMonitor is the Prometheus Operator's CRD, not part of Kubernetes, so
        // kubernetes-validate has no schema for it; it is rendered only when asked for.
        assert_eq!(monitors.len(), usize::from(values.is_some()), "{label}");
        validate_with_kubernetes(&docs, label);
    }
}

// === values ===

#[test]
fn the_namespace_value_reaches_every_namespaced_object_and_flag() {
    for (values, ns) in [
        (None, "mesh-system"),
        (Some(CUSTOM_VALUES), CUSTOM_NAMESPACE),
    ] {
        let text = rendered(values);
        let objects = objects(&text);
        for o in &objects {
            let kind = o["kind"].as_str().expect("kind");
            let name = &o["metadata"]["name"];
            if CLUSTER_SCOPED.contains(&kind) {
                assert!(o["metadata"]["namespace"].is_null(), "{kind} {name}");
            } else {
                assert_eq!(o["metadata"]["namespace"], ns, "{kind} {name}");
            }
            for s in o["subjects"].as_array().into_iter().flatten() {
                assert_eq!(s["namespace"], ns, "{kind} {name}: subject {s}");
            }
        }
        assert_eq!(find(&objects, "Namespace", ns)["kind"], "Namespace");
        let controller = controller_args(&objects);
        let host = format!("mesh-controller.{ns}.svc");
        for (name, want) in [
            ("ca-secret", format!("{ns}/mesh-ca")),
            ("trust-bundle", format!("{ns}/mesh-ca-root")),
            ("lease", format!("{ns}/mesh-controller")),
            ("agent-service-account", format!("{ns}/mesh-agent")),
        ] {
            assert_eq!(flag(&controller, name), Some(want), "controller --{name}");
        }
        let names = flag(&controller, "server-names").expect("--server-names");
        assert!(
            names.split(',').any(|n| n == host),
            "--server-names={names}"
        );
        let ds = &find(&objects, "DaemonSet", "mesh-agent")["spec"]["template"]["spec"];
        let agent = strings(&container(ds, "containers", "agent")["args"]);
        assert_eq!(
            flag(&agent, "controller"),
            Some(format!("https://{host}:15012"))
        );
        assert_eq!(flag(&agent, "controller-name"), Some(host.clone()));
        let cni = strings(&container(ds, "initContainers", "install-cni")["command"]);
        assert!(
            cni.contains(&format!("--exclude-namespace={ns}")),
            "the CNI plugin asks about the mesh's own pods: {cni:?}"
        );
        if ns != "mesh-system" {
            let left: Vec<&str> = text.lines().filter(|l| l.contains("mesh-system")).collect();
            assert!(
                left.is_empty(),
                "mesh-system left in the rendering: {left:?}"
            );
        }
    }
}

#[test]
fn the_values_schema_refuses_bad_values_with_the_key_in_the_message() {
    for (set, key) in [
        ("controller.replicas=two", "replicas"),
        ("controller.replicas=0", "replicas"),
        ("controller.trafficPolicy=maybe", "trafficPolicy"),
        ("agent.egress=block", "egress"),
        ("agent.captureCIDRs={10.0.0.0/33}", "captureCIDRs"),
        ("agent.workerThreads=0", "workerThreads"),
        ("agent.proxyThreads=-1", "proxyThreads"),
        ("controller.workloadCertTTL=a day", "workloadCertTTL"),
        ("namespace.name=Mesh_System", "name"),
        // A rolling update that could never move.
        (
            "agent.updateStrategy.maxSurge=0,agent.updateStrategy.maxUnavailable=0",
            "updateStrategy",
        ),
        // A misspelt key is refused, not ignored.
        ("controller.replica=3", "replica"),
    ] {
        let Err(e) = render(None, &["--set", set]) else {
            panic!("--set {set} was accepted");
        };
        assert!(
            e.contains("values don't meet the specifications of the schema") && e.contains(key),
            "--set {set}: {e}"
        );
    }
    let Err(e) = render(None, &["--set-string", "controller.replicas=2"]) else {
        panic!("a string of digits was accepted as a number of replicas");
    };
    assert!(e.contains("replicas"), "{e}");
}

#[test]
fn the_chart_owns_its_namespace_only_outside_the_release_namespace() {
    let Err(e) = render(None, &["--namespace", "mesh-system"]) else {
        panic!("namespace.create with -n mesh-system was accepted");
    };
    assert!(
        e.contains("namespace.create=true") && e.contains("namespace.create=false"),
        "{e}"
    );
    let text = render(
        None,
        &[
            "--namespace",
            "mesh-system",
            "--set",
            "namespace.create=false",
        ],
    )
    .expect("-n mesh-system with namespace.create=false renders");
    let objects = objects(&text);
    assert!(objects.iter().all(|o| o["kind"] != "Namespace"));
    assert_eq!(
        find(&objects, "DaemonSet", "mesh-agent")["metadata"]["namespace"],
        "mesh-system"
    );
}

// === the binaries' parsers ===

/// The agent's and the CNI installer's arguments as the DaemonSet renders them, checked by
/// the real parsers, with what must agree between them and the controller.
#[test]
fn the_rendered_agent_and_cni_arguments_are_accepted_by_the_real_parsers() {
    for values in [None, Some(CUSTOM_VALUES)] {
        let objects = objects(&rendered(values));
        let ds = &find(&objects, "DaemonSet", "mesh-agent")["spec"]["template"]["spec"];
        let args: Vec<String> = strings(&container(ds, "containers", "agent")["args"])
            .into_iter()
            .map(|a| a.replace("$(NODE_NAME)", "node-1"))
            .collect();
        assert_eq!(args[0], "run", "{values:?}");
        let cfg = mesh_agent::cli::run_config(&args[1..])
            .unwrap_or_else(|e| panic!("{values:?}: the agent refuses {args:?}: {e}"));
        let discover = cfg.discover_pods.as_ref().expect("--discover-pods");
        let threads = values.map(|_| 2);
        assert_eq!(
            cfg.worker_threads, threads,
            "{values:?}: agent.workerThreads"
        );
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let proxy_threads = values.map_or(cpus, |_| 0);
        assert_eq!(
            cfg.proxy.threads, proxy_threads,
            "{values:?}: agent.proxyThreads"
        );
        let install = strings(&container(ds, "initContainers", "install-cni")["command"]);
        assert_eq!(install[..2], ["mesh-cni", "install"]);
        let setup = mesh_cni::cli::parse_setup(&install[2..], true)
            .unwrap_or_else(|e| panic!("{values:?}: install-cni: {e}"));
        assert_eq!(
            setup.agent_socket.clone().map(PathBuf::from),
            Some(discover.cni_socket.clone()),
            "the plugin asks another socket than the agent listens on"
        );
        let watch = strings(&container(ds, "containers", "cni-watch")["command"]);
        assert_eq!(watch[..2], ["mesh-cni", "install"]);
        let watching = mesh_cni::cli::parse_setup(&watch[2..], true)
            .unwrap_or_else(|e| panic!("{values:?}: cni-watch: {e}"));
        assert!(watching.watch.is_some(), "cni-watch without --watch");
        assert_eq!(
            mesh_cni::cli::Setup {
                watch: None,
                ..watching
            },
            setup,
            "the watcher would install another entry than the init container"
        );
        // The CNI containers write the host directories the volumes name.
        let host_path = |volume: &str| {
            item(&ds["volumes"], volume, |v| v["name"] == volume)["hostPath"]["path"].clone()
        };
        let (conf, bin) = match values {
            None => ("/etc/cni/net.d", "/opt/cni/bin"),
            Some(_) => (
                "/var/lib/rancher/k3s/agent/etc/cni/net.d",
                "/var/lib/rancher/k3s/data/current/bin",
            ),
        };
        assert_eq!(host_path("cni-conf"), conf);
        assert_eq!(host_path("cni-bin"), bin);
        // A node's old and new agent meet at the hand-over socket: a host directory.
        let handover = cfg.handover_socket.as_ref().expect("--handover-socket");
        let mount = item(
            &container(ds, "containers", "agent")["volumeMounts"],
            "mount of the hand-over socket",
            |m| handover.starts_with(m["mountPath"].as_str().expect("path")),
        );
        assert_eq!(
            host_path(mount["name"].as_str().expect("name")),
            mount["mountPath"]
        );
        let controller = controller_args(&objects);
        // Both ends of the bootstrap agree: trust domain, token audience.
        assert_eq!(
            flag(&args, "trust-domain"),
            flag(&controller, "trust-domain")
        );
        let projected = item(&ds["volumes"], "token volume", |v| v["name"] == "token");
        assert_eq!(
            Some(
                projected["projected"]["sources"][0]["serviceAccountToken"]["audience"]
                    .as_str()
                    .expect("audience")
                    .to_string()
            ),
            flag(&controller, "token-audiences")
        );
        // The agents mount the ConfigMap the controller publishes.
        let bundle = flag(&controller, "trust-bundle").expect("--trust-bundle");
        let mounted = item(&ds["volumes"], "controller-ca volume", |v| {
            v["name"] == "controller-ca"
        });
        assert_eq!(
            bundle.split_once('/').map(|(_, n)| n),
            mounted["configMap"]["name"].as_str()
        );
        assert_eq!(
            mounted["configMap"]["items"][0],
            serde_json::json!({"key": "ca.crt", "path": "ca.crt"})
        );
        assert_eq!(
            flag(&args, "controller-ca").as_deref(),
            Some("/var/run/mesh/ca/ca.crt")
        );
    }
}

#[test]
fn the_rendered_controller_arguments_are_accepted_by_its_parser() {
    let known: BTreeSet<String> =
        <mesh_controller::config::Args as clap::CommandFactory>::command()
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
    let landed = PENDING_CONTROLLER_FLAGS.iter().any(|f| known.contains(*f));
    for values in [None, Some(CUSTOM_VALUES)] {
        let objects = objects(&rendered(values));
        let args = controller_args(&objects);
        let mut checked = vec!["mesh-controller".to_string()];
        for a in &args {
            let name = a.trim_start_matches("--").split('=').next().unwrap_or("");
            if PENDING_CONTROLLER_FLAGS.contains(&name) && !landed {
                eprintln!("not checked: {a} (the controller does not have --{name} yet)");
                continue;
            }
            checked.push(a.clone());
        }
        let parsed = mesh_controller::config::Args::try_parse_from(&checked)
            .unwrap_or_else(|e| panic!("{values:?}: the controller refuses {checked:?}: {e}"));
        mesh_controller::config::Config::from_args(&parsed)
            .unwrap_or_else(|e| panic!("{values:?}: the controller refuses {checked:?}: {e}"));
    }
}

// === the plain manifests ===

#[test]
fn the_checked_in_manifests_equal_the_rendering() {
    require_helm();
    let rendering = manifests::render(Path::new(tools::HELM), &workspace()).expect("render");
    for m in manifests::split(&rendering).expect("split") {
        let on_disk = std::fs::read_to_string(workspace().join(m.path))
            .unwrap_or_else(|e| panic!("{}: {e}", m.path));
        assert!(
            on_disk == m.text,
            "{} differs from the chart's rendering: run `cargo xtask manifests`",
            m.path
        );
    }
}

// === CRDs and examples ===

/// The CRDs the chart ships.
fn shipped_crds() -> Vec<Value> {
    let text = std::fs::read_to_string(workspace().join("deploy/helm/mesh/crds/smi.yaml"))
        .expect("the chart's CRDs");
    objects(&text)
}

#[test]
fn the_shipped_crds_serve_the_common_smi_versions_with_one_storage_version_each() {
    let crds = shipped_crds();
    for (name, versions, storage) in [
        (
            "traffictargets.access.smi-spec.io",
            &["v1alpha1", "v1alpha2", "v1alpha3"][..],
            "v1alpha3",
        ),
        (
            "httproutegroups.specs.smi-spec.io",
            &["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"][..],
            "v1alpha4",
        ),
        (
            "tcproutes.specs.smi-spec.io",
            &["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"][..],
            "v1alpha4",
        ),
        (
            "trafficsplits.split.smi-spec.io",
            &["v1alpha1", "v1alpha2", "v1alpha3", "v1alpha4"][..],
            "v1alpha4",
        ),
    ] {
        let crd = find(&crds, "CustomResourceDefinition", name);
        let listed = crd["spec"]["versions"].as_array().expect("versions");
        let served: BTreeSet<&str> = listed
            .iter()
            .filter(|v| v["served"] == true)
            .map(|v| v["name"].as_str().expect("name"))
            .collect();
        assert_eq!(served, versions.iter().copied().collect(), "{name}");
        let stored: Vec<&str> = listed
            .iter()
            .filter(|v| v["storage"] == true)
            .map(|v| v["name"].as_str().expect("name"))
            .collect();
        assert_eq!(stored, [storage], "{name}");
        for v in listed {
            assert_eq!(v["subresources"]["status"], serde_json::json!({}), "{name}");
        }
    }
}

/// Checks an object of an SMI group against the shipped CRD's schema of its version.
fn check_smi(crds: &[Value], object: &Value) -> Result<(), String> {
    let api_version = object["apiVersion"].as_str().ok_or("no apiVersion")?;
    let kind = object["kind"].as_str().ok_or("no kind")?;
    let (group, version) = api_version.split_once('/').ok_or("no group")?;
    let crd = crds
        .iter()
        .find(|c| c["spec"]["group"] == group && c["spec"]["names"]["kind"] == kind)
        .ok_or_else(|| format!("no shipped CRD has {kind} in {group}"))?;
    let served = crd["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == version && v["served"] == true)
        .ok_or_else(|| format!("the shipped CRD does not serve {api_version} {kind}"))?;
    let schema = &served["schema"]["openAPIV3Schema"];
    let validator = jsonschema::validator_for(schema).map_err(|e| format!("schema: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

#[test]
fn every_example_under_deploy_is_valid_against_the_crds_that_ship() {
    let crds = shipped_crds();
    let smi_groups: BTreeSet<&str> = crds
        .iter()
        .filter_map(|c| c["spec"]["group"].as_str())
        .collect();
    let mut builtin = Vec::new();
    let mut checked = 0;
    for dir in ["deploy/examples", "deploy/demo/resources"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(workspace().join(dir))
            .expect(dir)
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read");
            for doc in manifests::documents(&text) {
                let object: Value = serde_yaml_ng::from_str(&doc)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                let api_version = object["apiVersion"].as_str().expect("apiVersion");
                let group = api_version.split_once('/').map_or("", |(g, _)| g);
                if smi_groups.contains(group) {
                    check_smi(&crds, &object)
                        .unwrap_or_else(|e| panic!("{}: {e}\n{doc}", file.display()));
                } else if group == "gateway.networking.k8s.io" {
                    // The Gateway API CRDs do not ship with the chart (v1.2.0 or newer is
                    // required): the example must be of the v1 API they serve.
                    assert_eq!(api_version, "gateway.networking.k8s.io/v1", "{file:?}");
                    assert!(
                        ["HTTPRoute", "GRPCRoute"].contains(&object["kind"].as_str().unwrap_or("")),
                        "{file:?}: {}",
                        object["kind"]
                    );
                } else {
                    builtin.push(doc);
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 10, "only {checked} examples found");
    // Services and the like: Kubernetes' own schema.
    validate_with_kubernetes(&builtin, "examples");
}

#[test]
fn the_shipped_crd_schemas_refuse_what_the_controller_cannot_read() {
    let crds = shipped_crds();
    let split = |api_version: &str, weight: Value| {
        serde_json::json!({
            "apiVersion": api_version,
            "kind": "TrafficSplit",
            "metadata": {"name": "s", "namespace": "demo"},
            "spec": {"service": "web", "backends": [{"service": "web-v1", "weight": weight}]},
        })
    };
    check_smi(&crds, &split("split.smi-spec.io/v1alpha4", 90.into())).expect("a valid split");
    check_smi(&crds, &split("split.smi-spec.io/v1alpha1", "500m".into()))
        .expect("v1alpha1 weights are quantities");
    let e = check_smi(&crds, &split("split.smi-spec.io/v1alpha4", "ninety".into()))
        .expect_err("a weight that is no number");
    assert!(e.contains("weight"), "{e}");
    let e = check_smi(&crds, &split("split.smi-spec.io/v1beta1", 90.into()))
        .expect_err("an unserved version");
    assert!(e.contains("does not serve"), "{e}");
    let target = serde_json::json!({
        "apiVersion": "access.smi-spec.io/v1alpha3",
        "kind": "TrafficTarget",
        "metadata": {"name": "t"},
        "spec": {"rules": [{"kind": "TCPRoute", "name": "r"}]},
    });
    let e = check_smi(&crds, &target).expect_err("a TrafficTarget without destination");
    assert!(e.contains("destination"), "{e}");
}

// === what operators expect of the pods ===

#[test]
fn the_pods_have_priorities_probes_resources_and_the_least_privilege_each_needs() {
    for values in [None, Some(CUSTOM_VALUES)] {
        let objects = objects(&rendered(values));
        let ds = &find(&objects, "DaemonSet", "mesh-agent")["spec"];
        assert_eq!(ds["updateStrategy"]["type"], "RollingUpdate", "{values:?}");
        // An upgrade starts the new agent beside the old one, which hands its sockets over.
        let rolling = &ds["updateStrategy"]["rollingUpdate"];
        let (surge, unavailable) = match values {
            None => (1.into(), 0.into()),
            // Restarted in place, a tenth of the nodes at a time.
            Some(_) => (0.into(), "10%".into()),
        };
        assert_eq!(
            (&rolling["maxSurge"], &rolling["maxUnavailable"]),
            (&surge, &unavailable)
        );
        let pod = &ds["template"]["spec"];
        assert_eq!(pod["hostPID"], true);
        assert_eq!(pod["hostNetwork"], true);
        let agent = container(pod, "containers", "agent");
        // On the host network a declared port is a host port, which two agents of one node
        // cannot both have: the scheduler would never place the new one.
        assert!(agent["ports"].is_null(), "{values:?}: {}", agent["ports"]);
        let args = strings(&agent["args"]);
        let admin = flag(&args, "admin").expect("--admin");
        // Readiness says draining or removed; liveness only that the agent serves at all.
        for (probe, path) in [
            ("startupProbe", "/healthz"),
            ("readinessProbe", "/healthz"),
            ("livenessProbe", "/livez"),
        ] {
            let get = &agent[probe]["httpGet"];
            assert_eq!(get["path"], path, "{probe}");
            assert_eq!(
                format!("{}:{}", get["host"].as_str().expect("host"), get["port"]),
                admin,
                "{probe} asks another address than the admin endpoint"
            );
        }
        assert!(agent["resources"]["requests"].is_object());
        let privileged = agent["securityContext"]["privileged"] == true;
        let bpffs = item(&agent["volumeMounts"], "bpffs mount", |m| {
            m["mountPath"] == "/sys/fs/bpf"
        });
        // Kubernetes refuses Bidirectional propagation in an unprivileged container.
        assert_eq!(
            bpffs["mountPropagation"],
            if privileged {
                "Bidirectional"
            } else {
                "HostToContainer"
            }
        );
        if !privileged {
            let add = strings(&agent["securityContext"]["capabilities"]["add"]);
            for cap in ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"] {
                assert!(add.iter().any(|c| c == cap), "{cap} missing: {add:?}");
            }
        }
        for (list, name) in [
            ("initContainers", "install-cni"),
            ("containers", "cni-watch"),
        ] {
            let sc = &container(pod, list, name)["securityContext"];
            assert!(sc["privileged"].is_null(), "{name} is privileged");
            assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
            assert_eq!(sc["allowPrivilegeEscalation"], false);
        }
        let deployment = &find(&objects, "Deployment", "mesh-controller")["spec"];
        let pod = &deployment["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsUser"], 65532);
        assert_eq!(pod["securityContext"]["runAsGroup"], 65532);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let controller = container(pod, "containers", "controller");
        assert_eq!(
            controller["securityContext"]["readOnlyRootFilesystem"],
            true
        );
        assert_eq!(controller["readinessProbe"]["tcpSocket"]["port"], "grpc");
        match values {
            None => {
                assert_eq!(
                    ds["template"]["spec"]["priorityClassName"],
                    "system-node-critical"
                );
                assert_eq!(pod["priorityClassName"], "system-cluster-critical");
                assert_eq!(deployment["replicas"], 2);
                assert!(privileged, "the default agent is privileged");
                let tolerations = &ds["template"]["spec"]["tolerations"];
                assert_eq!(tolerations, &serde_json::json!([{"operator": "Exists"}]));
                let pdb = find(&objects, "PodDisruptionBudget", "mesh-controller");
                assert_eq!(pdb["spec"]["maxUnavailable"], 1);
                let annotations = &ds["template"]["metadata"]["annotations"];
                assert_eq!(annotations["prometheus.io/scrape"], "true");
                assert_eq!(annotations["prometheus.io/port"], "15020");
            }
            Some(_) => {
                assert_eq!(deployment["replicas"], 1);
                assert!(!privileged);
                assert!(objects.iter().all(|o| o["kind"] != "PodDisruptionBudget"));
                let monitor = find(&objects, "ServiceMonitor", "mesh-agent");
                assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
                assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");
                let service = find(&objects, "Service", "mesh-agent-metrics");
                assert_eq!(service["spec"]["ports"][0]["port"], 15120);
                assert_eq!(flag(&args, "metrics").as_deref(), Some("0.0.0.0:15120"));
            }
        }
    }
}

/// `helm uninstall` first removes the mesh from every node: the pre-delete hook annotates the
/// pods the DaemonSet makes, and every container of those pods reads the annotation.
#[test]
fn the_uninstall_hook_reaches_every_container_of_the_agents() {
    for (values, ns) in [
        (None, "mesh-system"),
        (Some(CUSTOM_VALUES), CUSTOM_NAMESPACE),
    ] {
        let objects = objects(&rendered(values));
        let job = find(&objects, "Job", "mesh-uninstall");
        assert_eq!(job["metadata"]["annotations"]["helm.sh/hook"], "pre-delete");
        let args = strings(&job["spec"]["template"]["spec"]["containers"][0]["args"]);
        assert_eq!(args[0], "uninstall", "{values:?}");
        assert_eq!(flag(&args, "namespace").as_deref(), Some(ns));
        let selector = flag(&args, "selector").expect("--selector");
        let ds = find(&objects, "DaemonSet", "mesh-agent");
        let labels = &ds["spec"]["template"]["metadata"]["labels"];
        for term in selector.split(',') {
            let (k, v) = term.split_once('=').expect("key=value");
            assert_eq!(
                labels[k], v,
                "the hook's selector misses the agents: {selector}"
            );
        }
        // Its account may list and annotate pods, in the agents' namespace only.
        let role = find(&objects, "Role", "mesh-uninstall");
        assert_eq!(role["metadata"]["namespace"], ns);
        assert_eq!(role["rules"][0]["resources"][0], "pods");
        assert_eq!(
            role["rules"][0]["verbs"],
            serde_json::json!(["list", "patch"])
        );

        // Every container reads the pod's annotations where its --uninstall-signal says.
        let pod = &ds["spec"]["template"]["spec"];
        let podinfo = item(&pod["volumes"], "podinfo volume", |v| {
            v["name"] == "podinfo"
        });
        assert_eq!(
            podinfo["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
            "metadata.annotations"
        );
        let file = podinfo["downwardAPI"]["items"][0]["path"]
            .as_str()
            .expect("path");
        for (list, name, key) in [
            ("initContainers", "install-cni", "command"),
            ("containers", "cni-watch", "command"),
            ("containers", "agent", "args"),
        ] {
            let c = container(pod, list, name);
            let mount = item(
                &c["volumeMounts"],
                &format!("podinfo mount of {name}"),
                |m| m["name"] == "podinfo",
            );
            let expected = format!("{}/{file}", mount["mountPath"].as_str().expect("mountPath"));
            assert_eq!(
                flag(&strings(&c[key]), "uninstall-signal").as_deref(),
                Some(expected.as_str()),
                "{name}"
            );
        }
    }
    // Without the hook (uninstall.enabled=false) nothing of it renders.
    let off = render(None, &["--set", "uninstall.enabled=false"]).expect("renders");
    assert!(
        !off.contains("mesh-uninstall"),
        "the hook rendered while disabled"
    );
}
