//! The objects the controller's directory gets for pods, as the API server would hold them.
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::PodSpec;

fn yaml_str(v: &str) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into())
}

/// What the API server holds of one pod, as the controller's directory gets it.
#[derive(Debug, Clone)]
pub struct PodObject<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// `metadata.uid`.
    pub uid: &'a str,
    /// `spec.nodeName`.
    pub node: &'a str,
    /// Service account, labels, TLS mode, ports, probe and annotations.
    pub spec: &'a PodSpec,
    /// The cgroup and network namespace, as the `mesh.io/cgroup` and `mesh.io/netns`
    /// annotations of `enrollment: config`; `None` as on a real cluster.
    pub place: Option<(PathBuf, PathBuf)>,
    /// `status.podIP` once the pod's network is set up (phase Running); `None`: Pending.
    pub ip: Option<Ipv4Addr>,
}

/// Namespace objects (enrolled in the mesh) for the namespaces of `pods`, then their Pod
/// objects: one multi-document YAML file.
pub fn pod_objects_yaml<'a>(pods: impl IntoIterator<Item = PodObject<'a>>) -> String {
    let pods: Vec<PodObject<'a>> = pods.into_iter().collect();
    let mut out = String::new();
    let namespaces: BTreeSet<&str> = pods.iter().map(|p| p.namespace).collect();
    for ns in namespaces {
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    mesh.io/enrolled: \"true\"\n---\n"
        );
    }
    for p in &pods {
        let labels: String = p
            .spec
            .labels
            .iter()
            .map(|(k, v)| format!("    {k}: {}\n", yaml_str(v)))
            .collect();
        let place = match &p.place {
            Some((cgroup, netns)) => format!(
                "    mesh.io/cgroup: {}\n    mesh.io/netns: {}\n",
                cgroup.display(),
                netns.display()
            ),
            None => String::new(),
        };
        let status = match p.ip {
            Some(ip) => format!("  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n"),
            None => "  phase: Pending\n".to_string(),
        };
        let _ = write!(
            out,
            "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  uid: {uid}
  labels:
{labels_or_empty}  annotations:
    mesh.io/tls-mode: {mode}
{place}{annotations}spec:
  nodeName: {node}
  serviceAccountName: {sa}
  containers:
  - name: app
    image: local
{ports}{probe}status:
{status}---
",
            name = p.name,
            ns = p.namespace,
            uid = p.uid,
            labels_or_empty = if labels.is_empty() {
                "    mesh.io/sim: \"true\"\n".to_string()
            } else {
                labels
            },
            mode = p.spec.tls_mode.as_deref().unwrap_or("strict"),
            annotations = p
                .spec
                .annotations
                .iter()
                .map(|(k, v)| format!("    {k}: {}\n", yaml_str(v)))
                .collect::<String>(),
            node = p.node,
            sa = p.spec.service_account.as_deref().unwrap_or("default"),
            probe = p
                .spec
                .probe_port
                .map(|port| format!(
                    "    readinessProbe:\n      tcpSocket:\n        port: {port}\n"
                ))
                .unwrap_or_default(),
            ports = if p.spec.ports.is_empty() {
                String::new()
            } else {
                let list: String = p
                    .spec
                    .ports
                    .iter()
                    .map(|port| format!("    - containerPort: {port}\n"))
                    .collect();
                format!("    ports:\n{list}")
            },
        );
    }
    out
}

/// Node objects, each with its pod CIDR (`spec.podCIDR` and `spec.podCIDRs`).
pub fn node_objects_yaml<'a>(nodes: impl IntoIterator<Item = (&'a str, String)>) -> String {
    let mut out = String::new();
    for (name, cidr) in nodes {
        let _ = write!(
            out,
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {cidr}\n  podCIDRs:\n  - {cidr}\n---\n"
        );
    }
    out
}

/// Replaces the file at `path` with `text` atomically (written beside it, then renamed), so a
/// reader such as the controller never sees half of it.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replace {}", path.display()))
}
