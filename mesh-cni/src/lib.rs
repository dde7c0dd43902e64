//! The mesh's chained CNI plugin.
//!
//! The container runtime runs it after the node's primary plugin (bridge, Calico, Cilium in
//! chaining mode, flannel, ...) for every pod sandbox it sets up:
//!
//! - `ADD`: a Kubernetes pod (`K8S_POD_*` in `CNI_ARGS`) is handed to the node agent over its
//!   unix socket (namespace, name and UID, the network namespace, the addresses the primary
//!   plugin assigned) and the plugin answers only once the agent has enrolled it, so no
//!   container of a meshed pod ever starts unmeshed. The agent says whether the pod is meshed
//!   at all; a pod in a namespace of `excludeNamespaces` passes at once without asking. If the
//!   agent cannot be reached, `ADD` fails with code 11 (try again later) and a message the
//!   kubelet shows in the pod's events; the runtime retries.
//! - `DEL`: the agent unenrolls the pod; an agent that cannot be reached does not hold up the
//!   deletion (the agent drops pods that are gone when it starts).
//! - `CHECK`: the agent confirms the pod is enrolled (or not meshed).
//! - `VERSION`: the CNI versions this plugin speaks.
//!
//! Whatever the primary plugin returned (`prevResult`) is passed on unchanged.
//!
//! [`install`] and [`uninstall`] put the plugin into the node's CNI configuration and take it
//! out again: see there.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod cli;
pub mod install;
pub mod signal;

pub use install::{install, uninstall};
pub use signal::{UNINSTALL_ANNOTATION, uninstall_requested};

/// The plugin's `type` in a conflist, and its binary's name.
pub const PLUGIN_TYPE: &str = "mesh-cni";
/// Where the agent listens unless the plugin's configuration says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/mesh/cni.sock";
/// How long ADD waits for the agent by default (enrollment may wait for the controller to
/// announce a pod that was created a moment ago).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The CNI specification versions the plugin accepts.
pub const SUPPORTED_VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.2.0"];

// === Errors (CNI error codes) ===

/// A CNI error: printed as the spec's error object on stdout, exit status non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", details_suffix(.details))]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(": {details}")
    }
}

impl CniError {
    /// 1: the configuration's `cniVersion` is not one the plugin speaks.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// 4: a required `CNI_*` variable is missing or bad.
    pub const INVALID_ENV: u32 = 4;
    /// 6: the configuration on stdin is not valid JSON of the expected shape.
    pub const DECODING: u32 = 6;
    /// 7: the configuration is valid JSON but wrong for this plugin.
    pub const INVALID_CONFIG: u32 = 7;
    /// 11: try again later (the agent is not reachable yet).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// 100: the agent refused or failed the enrollment.
    pub const ENROLL_FAILED: u32 = 100;

    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error object.
    pub fn to_json(&self, cni_version: &str) -> String {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

// === Inputs ===

/// The plugin's entry in the conflist, as the runtime passes it on stdin.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The primary plugin's result (chained plugins get it from the runtime).
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// The agent's socket ([`DEFAULT_AGENT_SOCKET`] if absent).
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// Namespaces whose pods never wait for the agent (the mesh's own, kube-system).
    #[serde(default)]
    pub exclude_namespaces: Vec<String>,
    /// How long ADD waits for the agent's answer, seconds.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                CniError::DECODING,
                "the network configuration on stdin is not valid",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                CniError::INCOMPATIBLE_VERSION,
                format!("CNI version {:?} is not supported", conf.cni_version),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        if conf.plugin_type != PLUGIN_TYPE {
            return Err(CniError::new(
                CniError::INVALID_CONFIG,
                format!(
                    "this plugin is {PLUGIN_TYPE:?}, the configuration names {:?}",
                    conf.plugin_type
                ),
                "",
            ));
        }
        if conf.timeout_seconds == Some(0) {
            return Err(CniError::new(
                CniError::INVALID_CONFIG,
                "timeoutSeconds must be at least 1",
                "",
            ));
        }
        Ok(conf)
    }

    fn socket(&self) -> &Path {
        self.agent_socket
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_AGENT_SOCKET))
    }

    fn timeout(&self) -> Duration {
        self.timeout_seconds
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
    }

    /// The primary plugin's result, required: this plugin only ever runs chained.
    fn prev_result(&self) -> Result<&Value, CniError> {
        self.prev_result.as_ref().ok_or_else(|| {
            CniError::new(
                CniError::INVALID_CONFIG,
                "mesh-cni is a chained plugin: list it after the primary plugin in a conflist",
                "no prevResult",
            )
        })
    }
}

/// The `CNI_*` environment of one call.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

impl CniEnv {
    pub fn from_env() -> CniEnv {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }

    fn require(&self, name: &str, value: &str) -> Result<(), CniError> {
        if value.is_empty() {
            Err(CniError::new(
                CniError::INVALID_ENV,
                format!("{name} is not set"),
                "",
            ))
        } else {
            Ok(())
        }
    }
}

/// The pod a call is for, from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Absent from older runtimes; the agent then finds it from its own configuration.
    #[serde(default)]
    pub uid: Option<String>,
}

/// `CNI_ARGS`: `K=V` pairs separated by `;`. Not a Kubernetes pod (no namespace or name):
/// `Ok(None)`. A malformed pair is an error, not ignored.
pub fn pod_from_args(args: &str) -> Result<Option<PodRef>, CniError> {
    let mut kv = BTreeMap::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                CniError::INVALID_ENV,
                "CNI_ARGS is malformed",
                format!("{pair:?} is not KEY=VALUE"),
            )
        })?;
        kv.insert(k, v);
    }
    let get = |k: &str| kv.get(k).copied().filter(|v| !v.is_empty());
    match (get("K8S_POD_NAMESPACE"), get("K8S_POD_NAME")) {
        (Some(namespace), Some(name)) => Ok(Some(PodRef {
            namespace: namespace.into(),
            name: name.into(),
            uid: get("K8S_POD_UID").map(str::to_string),
        })),
        _ => Ok(None),
    }
}

/// The interface addresses of a CNI result (`ips[].address`, prefix length dropped).
pub fn result_ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str())
                .map(|a| a.split('/').next().unwrap_or(a).to_string())
                .collect()
        })
        .unwrap_or_default()
}

// === The agent's side of the conversation ===

/// What the plugin asks the agent: one JSON object per line, one request per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub op: Op,
    pub pod: PodRef,
    pub container_id: String,
    /// The sandbox's network namespace (`CNI_NETNS`).
    pub netns: String,
    pub ifname: String,
    /// The addresses the primary plugin assigned.
    pub ips: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Add,
    Del,
    Check,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The pod is in the mesh and its datapath is in place.
    Enrolled,
    /// The pod is not in the mesh: nothing to do.
    NotMeshed,
    /// DEL: the pod's datapath is gone (or was never there).
    Removed,
    /// The agent could not do it; the reason is for the pod's events.
    Failed { message: String },
}

/// Sends `request` to the agent at `socket` and waits up to `timeout` for its answer.
pub fn ask_agent(socket: &Path, request: &Request, timeout: Duration) -> std::io::Result<Response> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the agent's answer {answer:?} is not valid: {e}"),
        )
    })
}

// === One call ===

/// What a successful call prints on stdout (nothing for DEL).
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<String>, CniError> {
    if env.command == "VERSION" {
        return Ok(Some(
            serde_json::json!({
                "cniVersion": SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1],
                "supportedVersions": SUPPORTED_VERSIONS,
            })
            .to_string(),
        ));
    }
    let op = match env.command.as_str() {
        "ADD" => Op::Add,
        "DEL" => Op::Del,
        "CHECK" => Op::Check,
        "" => {
            return Err(CniError::new(
                CniError::INVALID_ENV,
                "CNI_COMMAND is not set (this program is run by the container runtime)",
                "",
            ));
        }
        other => {
            return Err(CniError::new(
                CniError::INVALID_ENV,
                format!("unknown CNI_COMMAND {other:?}"),
                "ADD, DEL, CHECK, VERSION",
            ));
        }
    };
    let conf = NetConf::parse(stdin)?;
    env.require("CNI_CONTAINERID", &env.container_id)?;
    env.require("CNI_IFNAME", &env.ifname)?;
    // DEL may come without a namespace (the sandbox is already gone).
    if op != Op::Del {
        env.require("CNI_NETNS", &env.netns)?;
    }
    let pass = || -> Result<Option<String>, CniError> {
        match op {
            Op::Del => Ok(None),
            // CHECK prints nothing on success; ADD passes the primary result on.
            Op::Check => conf.prev_result().map(|_| None),
            Op::Add => Ok(Some(conf.prev_result()?.to_string())),
        }
    };
    let prev = match op {
        Op::Del => conf.prev_result.clone().unwrap_or(Value::Null),
        _ => conf.prev_result()?.clone(),
    };
    let Some(pod) = pod_from_args(&env.args)? else {
        // Not a Kubernetes pod: nothing of the mesh's.
        return pass();
    };
    if conf.exclude_namespaces.contains(&pod.namespace) {
        return pass();
    }
    let request = Request {
        op,
        pod: pod.clone(),
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        ips: result_ips(&prev),
    };
    let who = format!("pod {}/{}", pod.namespace, pod.name);
    match ask_agent(conf.socket(), &request, conf.timeout()) {
        Ok(Response::Enrolled | Response::NotMeshed | Response::Removed) => pass(),
        Ok(Response::Failed { message }) if op == Op::Del => {
            // Deletion goes on; the agent retries its own cleanup.
            eprintln!("mesh-cni: the mesh agent could not unenroll {who}: {message}");
            Ok(None)
        }
        Ok(Response::Failed { message }) => Err(CniError::new(
            CniError::ENROLL_FAILED,
            format!("the mesh agent could not enroll {who}"),
            message,
        )),
        Err(e) if op == Op::Del => {
            eprintln!(
                "mesh-cni: the mesh agent at {} is unreachable ({e}); {who} is deleted anyway",
                conf.socket().display()
            );
            Ok(None)
        }
        Err(e) => Err(CniError::new(
            CniError::TRY_AGAIN_LATER,
            format!(
                "the mesh agent at {} is unreachable; {who} cannot start outside the mesh and \
                 will be retried",
                conf.socket().display()
            ),
            e.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests;
