//! A blocking client of the container runtime interface (CRI v1, the kubelet's API to the
//! runtime) over the runtime's unix socket: the calls a kubelet makes to run and remove pods,
//! as many as the tests need. Each call has a deadline; a refusal carries the runtime's
//! message (for RunPodSandbox, the CNI plugin's error among it).
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use cri::{ContainerConfig, ContainerStatus, PodSandboxConfig};

/// How long one call may take (RunPodSandbox waits for the CNI plugins, the mesh's included).
const CALL_LIMIT: Duration = Duration::from_secs(90);

/// A connection to one runtime's CRI socket.
pub struct Cri {
    runtime: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    socket: PathBuf,
}

/// A pod sandbox as the runtime reports it.
#[derive(Debug, Clone)]
pub struct SandboxStatus {
    /// SANDBOX_READY (its containers can run).
    pub ready: bool,
    /// The pod's address, once its network is set up.
    pub ip: String,
    /// The network namespace the runtime created for it (from the verbose status).
    pub netns: Option<PathBuf>,
}

impl Cri {
    /// Connects to the socket at `socket` (the channel connects lazily: the first call tells
    /// whether the runtime answers).
    pub fn connect(socket: &Path) -> Result<Cri> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the CRI client's async runtime")?;
        let path = socket.to_path_buf();
        // The URI is not used: every connection goes to the unix socket.
        let endpoint = Endpoint::try_from("http://[::1]:50051").context("endpoint")?;
        let channel = {
            let _guard = runtime.enter();
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }))
        };
        Ok(Cri {
            runtime,
            client: RuntimeServiceClient::new(channel),
            socket: socket.to_path_buf(),
        })
    }

    /// Runs one call with the deadline; `what` names it in errors.
    fn call<T, F>(
        &self,
        what: &str,
        call: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let future = call(self.client.clone());
        match self
            .runtime
            .block_on(async { tokio::time::timeout(CALL_LIMIT, future).await })
        {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(anyhow!(
                "{what} ({}): {:?}: {}",
                self.socket.display(),
                status.code(),
                status.message()
            )),
            Err(_) => Err(anyhow!(
                "{what} ({}): no answer within {} s",
                self.socket.display(),
                CALL_LIMIT.as_secs()
            )),
        }
    }

    /// The runtime's name and version (`containerd 1.6.20...`): it answers CRI calls.
    pub fn version(&self) -> Result<String> {
        let v = self.call("Version", |mut c| async move {
            c.version(cri::VersionRequest::default()).await
        })?;
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// The runtime's verbose status: `info` holds JSON documents, `cniconfig` among them (the
    /// CNI network configuration the runtime has loaded).
    pub fn status_info(&self) -> Result<HashMap<String, String>> {
        let s = self.call("Status", |mut c| async move {
            c.status(cri::StatusRequest { verbose: true }).await
        })?;
        Ok(s.info)
    }

    /// Creates and starts a pod sandbox (its network set up by the CNI plugins); its ID.
    pub fn run_pod_sandbox(&self, config: &PodSandboxConfig) -> Result<String> {
        let config = config.clone();
        let r = self.call("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
        })?;
        Ok(r.pod_sandbox_id)
    }

    /// The state, address and network namespace of sandbox `id`.
    pub fn pod_sandbox_status(&self, id: &str) -> Result<SandboxStatus> {
        let id = id.to_string();
        let r = self.call("PodSandboxStatus", |mut c| async move {
            c.pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: true,
            })
            .await
        })?;
        let status = r.status.context("PodSandboxStatus without a status")?;
        // containerd's verbose `info` holds the sandbox's OCI spec, which names the network
        // namespace the sandbox joined.
        let netns = r
            .info
            .get("info")
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .and_then(|v| {
                v["runtimeSpec"]["linux"]["namespaces"]
                    .as_array()?
                    .iter()
                    .find(|ns| ns["type"] == "network")?["path"]
                    .as_str()
                    .map(PathBuf::from)
            })
            .filter(|p| !p.as_os_str().is_empty());
        Ok(SandboxStatus {
            ready: status.state == cri::PodSandboxState::SandboxReady as i32,
            ip: status.network.map(|n| n.ip).unwrap_or_default(),
            netns,
        })
    }

    /// Stops the sandbox's containers and tears its network down (CNI DEL).
    pub fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.call("StopPodSandbox", |mut c| async move {
            c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id })
                .await
        })?;
        Ok(())
    }

    /// Removes a stopped sandbox and its containers.
    pub fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.call("RemovePodSandbox", |mut c| async move {
            c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
        })?;
        Ok(())
    }

    /// The IDs of every pod sandbox the runtime has.
    pub fn list_pod_sandboxes(&self) -> Result<Vec<String>> {
        let r = self.call("ListPodSandbox", |mut c| async move {
            c.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                .await
        })?;
        Ok(r.items.into_iter().map(|s| s.id).collect())
    }

    /// Creates a container in the sandbox `sandbox` (created with `sandbox_config`); its ID.
    pub fn create_container(
        &self,
        sandbox: &str,
        config: &ContainerConfig,
        sandbox_config: &PodSandboxConfig,
    ) -> Result<String> {
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.to_string(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let r = self.call("CreateContainer", |mut c| async move {
            c.create_container(request).await
        })?;
        Ok(r.container_id)
    }

    /// Starts a created container.
    pub fn start_container(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.call("StartContainer", |mut c| async move {
            c.start_container(cri::StartContainerRequest { container_id: id })
                .await
        })?;
        Ok(())
    }

    /// The state of container `id` (its exit code once it has exited).
    pub fn container_status(&self, id: &str) -> Result<ContainerStatus> {
        let id = id.to_string();
        let r = self.call("ContainerStatus", |mut c| async move {
            c.container_status(cri::ContainerStatusRequest {
                container_id: id,
                verbose: false,
            })
            .await
        })?;
        r.status.context("ContainerStatus without a status")
    }
}

/// Whether a container has exited.
pub fn exited(status: &ContainerStatus) -> bool {
    status.state == cri::ContainerState::ContainerExited as i32
}

/// The namespaces of a pod's containers, as the kubelet asks for them by default: the pod's
/// network and IPC namespaces, a PID namespace per container.
fn pod_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A sandbox configuration as the kubelet writes one for a pod: its metadata, where its
/// containers' logs go, its cgroup parent (the pod's cgroup), its own network namespace.
pub fn sandbox_config(
    namespace: &str,
    name: &str,
    uid: &str,
    attempt: u32,
    log_directory: &Path,
    cgroup_parent: &str,
) -> PodSandboxConfig {
    let labels = HashMap::from([
        (
            "io.kubernetes.pod.namespace".to_string(),
            namespace.to_string(),
        ),
        ("io.kubernetes.pod.name".to_string(), name.to_string()),
        ("io.kubernetes.pod.uid".to_string(), uid.to_string()),
    ]);
    PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.to_string(),
            namespace: namespace.to_string(),
            attempt,
        }),
        hostname: name.to_string(),
        log_directory: log_directory.display().to_string(),
        labels,
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.to_string(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container configuration running `argv` from `image`, its output to `log_path`
/// (relative to the sandbox's log directory).
pub fn container_config(
    name: &str,
    image: &str,
    argv: &[String],
    log_path: &str,
) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: argv.to_vec(),
        log_path: log_path.to_string(),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
