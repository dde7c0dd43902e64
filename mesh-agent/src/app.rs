//! Composition root: wires the datapath, the pods and the proxy for `mesh-agent run`.
use std::{io::Write as _, path::PathBuf, sync::Arc};

use anyhow::Context as _;

use mesh_datapath::{
    cgroup,
    config::{Cidr, PodSpec},
    ebpf::{Datapath, DatapathError},
};
use mesh_netns as netns;

use mesh_proxy::{config::ProxyConfig, local::LocalPods, proxy, telemetry::Telemetry};

use crate::{
    admin::{self, AdminState},
    config::Config,
    enroll::node::NodePods,
    enroll::reconcile::{EnrollError, Node, Reconciler, Wanted},
    handover::{self, Event, Inherited, Offer},
};

/// Why the agent's main loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// SIGTERM or [`Agent::shutdown`].
    Stopped,
    /// The pod asked for the mesh's removal from the node.
    Uninstalling,
    /// A successor serves every pod from the same sockets.
    HandedOver,
}

/// The cgroup the agent runs in. Its own sockets must never be captured, and the programs that
/// act on the proxy's sockets attach there, so it is never the v2 root.
pub fn agent_cgroup(cfg: &Config, mount: &std::path::Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = &cfg.cgroup {
        return Ok(path.clone());
    }
    let current = cgroup::current(mount)?;
    if cgroup::check_attachable(mount, &current).is_ok() {
        Ok(current)
    } else {
        Ok(mount.join(format!("mesh-agent-{}", cfg.datapath.instance)))
    }
}

/// Runs the agent until SIGINT or SIGTERM, then drains: the proxy takes no new connection
/// and open ones get the grace period to finish.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting");
    raise_nofile_limit();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cfg.worker_threads {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build().context("start the runtime")?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("install SIGTERM handler")?;
        let mut agent = start(cfg).await?;
        println!("READY");
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            ended = agent.ended() => return ended,
        }
        agent.shutdown().await
    })
}

/// A running agent, as [`start`] returns it.
pub struct Agent {
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Agent {
    /// Drains like SIGTERM does (no new connection, open ones get the grace period), stops
    /// every task of the agent and, with `unenroll_on_exit`, takes its pods out of the datapath.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        match self.task.as_mut() {
            Some(_) => self.join().await,
            // It ended already, and [`Agent::ended`] said how.
            None => Ok(()),
        }
    }

    /// Resolves when the agent stopped on its own (an error), which it does not otherwise.
    /// Cancel-safe: dropping it leaves the agent running and [`Agent::shutdown`] usable.
    pub async fn ended(&mut self) -> anyhow::Result<()> {
        match self.task.as_mut() {
            Some(_) => self.join().await,
            None => std::future::pending().await,
        }
    }

    /// Waits for the task; the handle is let go only once it has finished.
    async fn join(&mut self) -> anyhow::Result<()> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let ended = task.await;
        self.task = None;
        ended.context("the agent's task")?
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Starts the whole agent on the current runtime: checks the node, moves the process into the
/// agent's cgroup, loads the datapath, connects to the controller, serves the admin endpoints
/// and enrolls the configured pods. Returns once those pods are served; the agent then follows
/// the configuration until [`Agent::shutdown`].
pub async fn start(cfg: Config) -> anyhow::Result<Agent> {
    if cfg
        .uninstall_signal
        .as_deref()
        .is_some_and(crate::uninstall::requested)
    {
        return start_uninstalled(cfg).await;
    }
    let missing: Vec<String> = mesh_datapath::features::check(false)
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "this node lacks what the datapath needs (see `mesh-agent doctor`):\n  {}",
            missing.join("\n  ")
        );
    }
    let mount = cgroup::v2_mount()?;
    let own = agent_cgroup(&cfg, &mount)?;
    cgroup::move_self(&mount, &own)?;
    tracing::info!(cgroup = %own.display(), "agent cgroup");

    let mut datapath = Datapath::load(cfg.datapath.clone()).context("load the datapath")?;
    datapath
        .attach_agent(&own)
        .context("attach the agent-scope programs")?;
    let mut inherited = take_over(cfg.handover_socket.clone()).await;
    let inherited_pods = inherited
        .as_mut()
        .map(|i| std::mem::take(&mut i.pods))
        .unwrap_or_default();
    let inherited_endpoints = inherited
        .as_mut()
        .map(|i| std::mem::take(&mut i.endpoints))
        .unwrap_or_default();

    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut registry = prometheus_client::registry::Registry::default();
        let telemetry = Telemetry::new(&mut registry);
        registry.register_collector(Box::new(admin::kernel_metrics::KernelCounters::pinned(
            cfg.datapath.pin_dir(),
        )));
        telemetry.log_requests_every(cfg.proxy.access_log_every);
        let control = cfg
            .controller
            .as_ref()
            .map(|c| crate::control::start(c, &mut registry))
            .transpose()
            .context("start the controller connection")?;
        // Policy changes reach the connections open when they arrive.
        let revocation = control.as_ref().map(|c| {
            tokio::spawn(mesh_proxy::revocation::watch(
                c.store.clone(),
                telemetry.clone(),
            ))
        });
        let mesh = control
            .as_ref()
            .zip(cfg.controller.as_ref())
            .map(|(c, settings)| proxy::Mesh {
                store: c.store.clone(),
                certs: c.certs.clone(),
                egress: settings.egress,
                local: Arc::new(LocalPods::default()),
            });
        let mut admin = AdminState::new(
            cfg.clone(),
            control.as_ref().map(|c| c.store.clone()),
            control.as_ref().map(|c| c.certs.clone()),
            telemetry.clone(),
            registry,
        );
        if let Some(c) = &control {
            admin = admin.with_control(c.client.clone());
        }
        let admin = Arc::new(admin);
        let endpoints = admin::start(&cfg.admin, &admin, inherited_endpoints).await?;
        let serving = match cfg.proxy.threads {
            0 => proxy::Serving::shared(),
            n => proxy::Serving::pinned(n).context("start the proxy's threads")?,
        };
        let node = AgentNode {
            datapath,
            mesh,
            telemetry: telemetry.clone(),
            proxy: cfg.proxy.clone(),
            serving,
            inherited: inherited_pods,
        };
        // On a real node: pods found through the CNI plugin and the cgroup hierarchy.
        let wanted = match (&cfg.discover_pods, &cfg.controller) {
            (Some(d), _) => Wanted::Discovered(NodePods::new(mount.clone(), d.netns_dirs.clone())),
            (None, Some(c)) if cfg.enroll_from_config => Wanted::Config {
                node: c.node.clone(),
            },
            _ => Wanted::Fixed,
        };
        let mut pods = Reconciler::new(
            node,
            wanted,
            admin.enroll_failures.clone(),
            !cfg.datapath.capture.is_empty(),
        );
        pods.enroll_fixed(&cfg.pods)?;
        // With no agent to take over from, successors are served from the start.
        let mut handovers = match (&cfg.handover_socket, &inherited) {
            (Some(path), None) => serve_handover(path),
            _ => None,
        };
        // Whether a successor holds the listening sockets (then they are never refused).
        let mut successor = false;
        let _ = ready_tx.send(());

        // Every configuration change: what to capture, and the pods to enroll.
        let mut changes = control.as_ref().map(|c| c.store.subscribe());
        let (mut cni_calls, cni_task) = match &cfg.discover_pods {
            Some(d) => {
                let (rx, task) =
                    crate::cni::serve(&d.cni_socket).context("listen for the CNI plugin")?;
                tracing::info!(socket = %d.cni_socket.display(), "listening for the CNI plugin");
                (Some(rx), Some(task))
            }
            None => (None, None),
        };
        let ending = loop {
            let mut reconciled = changes.is_none();
            if let Some(rx) = changes.as_mut() {
                let (arrived, snapshot) = {
                    let applied = rx.borrow_and_update();
                    (applied.version.is_some(), applied.snapshot.clone())
                };
                admin.set_wanted(pods.round(&snapshot, arrived));
                reconciled = arrived;
            }
            // Every pod this agent wants is served: the one it took over from stops accepting.
            if reconciled && let Some(from) = inherited.take() {
                took_over(from, pods.node_mut());
                if let Some(path) = &cfg.handover_socket {
                    handovers = serve_handover(path);
                }
            }
            let changed = async {
                match changes.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let retry = async {
                if pods.retrying() {
                    tokio::time::sleep(crate::enroll::RETRY_AFTER).await
                } else {
                    std::future::pending().await
                }
            };
            let cni_call = async {
                match cni_calls.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            // A plugin that gave up is noticed within a second.
            let tick = async {
                if pods.waiting() {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await
                } else {
                    std::future::pending().await
                }
            };
            let uninstall = async {
                match &cfg.uninstall_signal {
                    Some(file) => crate::uninstall::until_requested(file).await,
                    None => std::future::pending().await,
                }
            };
            let handover = async {
                match handovers.as_mut() {
                    Some(h) => h.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop_rx.changed() => break Ending::Stopped,
                () = uninstall => break Ending::Uninstalling,
                event = handover => match event {
                    Some(Event::Asked(reply)) => {
                        successor = true;
                        let _ = reply.send(offer(&pods, &endpoints));
                    }
                    Some(Event::Taken) => break Ending::HandedOver,
                    Some(Event::GaveUp(e)) => {
                        successor = false;
                        tracing::warn!(error = %e, "the successor did not take over; serving on");
                    }
                    None => handovers = None,
                },
                () = retry => {}
                () = tick => {}
                call = cni_call => match call {
                    Some(call) => pods.hold(call),
                    None => cni_calls = None,
                },
                alive = changed => {
                    if !alive {
                        changes = None;
                    }
                }
            }
        };
        // No successor is served once stopping.
        drop(handovers);
        let released = ending == Ending::HandedOver || successor;
        match ending {
            Ending::Uninstalling => {
                tracing::warn!("the mesh is being removed from this node: letting every pod go")
            }
            Ending::HandedOver => tracing::info!(
                "the successor serves every pod: accepting no more, draining the open connections"
            ),
            Ending::Stopped => tracing::info!("shutting down"),
        }
        admin.set_draining();
        let mut endpoints = Some(endpoints);
        if released {
            // The successor serves them from the same listeners.
            if let Some(e) = endpoints.take() {
                e.stop();
            }
        }
        let stop = if released {
            proxy::Stop::Release
        } else {
            proxy::Stop::Refuse
        };
        let drained = proxy::drain(pods.served(), stop, &telemetry, cfg.proxy.drain_grace).await;
        tracing::info!(
            open = drained.open,
            cut = drained.cut,
            elapsed = ?drained.elapsed,
            "drained"
        );
        // No more CNI calls or policy changes to follow; the admin pages stay while the
        // agent lives.
        for task in revocation.into_iter().chain(cni_task) {
            task.abort();
        }
        match ending {
            Ending::Uninstalling => {
                // Every pod unenrolled and the datapath dropped (its programs held by pins
                // only), then the pins removed: nothing of the mesh is left in the kernel.
                pods.finish(true);
                remove_pins(&cfg.datapath.pin_dir());
                admin.set_uninstalled();
                tracing::info!("the mesh is removed from this node; idle until stopped");
                let _ = stop_rx.changed().await;
            }
            Ending::HandedOver => {
                // The successor's pods: never unenrolled from here.
                pods.finish(false);
                tracing::info!("handed over; idle until stopped");
                let _ = stop_rx.changed().await;
            }
            Ending::Stopped => pods.finish(cfg.unenroll_on_exit && !released),
        }
        if let Some(e) = endpoints {
            e.stop();
        }
        Ok(())
    });
    let mut task = task;
    tokio::select! {
        ready = ready_rx => match ready {
            Ok(()) => Ok(Agent { stop, task: Some(task) }),
            // The task ended before it was ready: its error says why.
            Err(_) => Err(task.await.context("the agent's task")?.err().unwrap_or_else(|| anyhow::anyhow!("the agent stopped while starting"))),
        },
        ended = &mut task => Err(ended.context("the agent's task")?.err().unwrap_or_else(|| anyhow::anyhow!("the agent stopped while starting"))),
    }
}

/// The listening sockets of the agent serving at `path`, if one does. Failing to take them is
/// logged: this agent then listens itself, once the other one has stopped.
async fn take_over(path: Option<PathBuf>) -> Option<Inherited> {
    let path = path?;
    let shown = path.display().to_string();
    let taken = tokio::task::spawn_blocking(move || handover::take_over(&path)).await;
    match taken {
        Ok(Ok(Some(inherited))) => {
            tracing::info!(socket = %shown, from = %inherited.from, pods = inherited.pods.len(),
                endpoints = inherited.endpoints.len(), "took over the running agent's listening sockets");
            Some(inherited)
        }
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            tracing::warn!(socket = %shown, error = %e,
                "cannot take over from the running agent; listening anew once it stopped");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "the hand-over task failed");
            None
        }
    }
}

/// Tells the agent taken over from that this one serves every pod, and closes the sockets
/// it handed over for pods this agent does not serve.
fn took_over(from: Inherited, node: &mut AgentNode) {
    let unclaimed = std::mem::take(&mut node.inherited);
    if !unclaimed.is_empty() {
        tracing::info!(pods = ?unclaimed.keys().collect::<Vec<_>>(),
            "closing the handed-over sockets of pods not served here");
    }
    match from.taken() {
        Ok(()) => tracing::info!("took over: the earlier agent stops accepting and drains"),
        Err(e) => tracing::warn!(error = %e, "cannot tell the earlier agent it was taken over"),
    }
}

/// Serves successors at `path`; a failure is logged (this agent then cannot be taken over).
fn serve_handover(path: &std::path::Path) -> Option<handover::Handovers> {
    match handover::serve(path) {
        Ok(rx) => {
            tracing::info!(socket = %path.display(), "a successor can take over here");
            Some(rx)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot serve successors; an upgrade will not be hitless");
            None
        }
    }
}

/// What a successor gets: every served pod's listeners and the admin endpoints'.
fn offer(pods: &Reconciler<AgentNode>, endpoints: &admin::Endpoints) -> Offer {
    let mut offer = Offer::default();
    for (name, proxy) in pods.served_by_name() {
        match proxy.listening() {
            Ok(Some(listening)) => offer.pods.push((name.to_string(), listening)),
            Ok(None) => {}
            Err(e) => tracing::warn!(pod = %name, error = %e, "cannot hand over the listeners"),
        }
    }
    match endpoints.listeners() {
        Ok(fds) => offer.endpoints = fds,
        Err(e) => tracing::warn!(error = %e, "cannot hand over the admin endpoints"),
    }
    offer
}

/// Removes everything the instance pinned (detaching its programs), saying what failed.
fn remove_pins(pin_dir: &std::path::Path) {
    match mesh_datapath::ebpf::remove_instance(pin_dir) {
        Ok(()) => tracing::info!(pins = %pin_dir.display(), "removed the datapath's pins"),
        Err(e) => tracing::error!(pins = %pin_dir.display(), error = %e,
            "cannot remove the datapath's pins; `mesh-agent clean` removes them"),
    }
}

/// An agent started while its pod asks for the mesh's removal: it removes whatever the last
/// one may have left, loads nothing, and serves `/healthz` (503 `uninstalled`) until stopped.
async fn start_uninstalled(cfg: Config) -> anyhow::Result<Agent> {
    tracing::warn!("the mesh is being removed from this node: not starting the datapath");
    remove_pins(&cfg.datapath.pin_dir());
    let mut registry = prometheus_client::registry::Registry::default();
    let telemetry = Telemetry::new(&mut registry);
    let admin = Arc::new(AdminState::new(
        cfg.clone(),
        None,
        None,
        telemetry,
        registry,
    ));
    admin.set_uninstalled();
    let endpoints = admin::start(&cfg.admin, &admin, Vec::new()).await?;
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let _ = stop_rx.changed().await;
        endpoints.stop();
        Ok(())
    });
    Ok(Agent {
        stop,
        task: Some(task),
    })
}

/// The node as the agent changes it: the datapath, and a proxy for each pod it enrolls.
struct AgentNode {
    datapath: Datapath,
    mesh: Option<proxy::Mesh>,
    telemetry: Telemetry,
    proxy: ProxyConfig,
    /// Where the pods' connections are served.
    serving: proxy::Serving,
    /// Listening sockets handed over by the agent this one took over from, by pod, until
    /// the pod is enrolled with them.
    inherited: std::collections::BTreeMap<String, netns::PodSockets>,
}

impl Node for AgentNode {
    type Served = proxy::PodProxy;

    fn enroll(&mut self, pod: &PodSpec) -> Result<proxy::PodProxy, EnrollError> {
        let handed = self.inherited.remove(&pod.name);
        let sockets =
            self.datapath
                .enroll_with(pod, handed)
                .map_err(|source| EnrollError::Datapath {
                    pod: pod.name.clone(),
                    source: Box::new(source),
                })?;
        let netns = |source| EnrollError::Netns {
            pod: pod.name.clone(),
            source,
        };
        let ns = netns::open(&pod.netns).map_err(netns)?;
        let worker = netns::Worker::spawn(&ns, &pod.netns).map_err(netns)?;
        let served = proxy::start(
            &pod.name,
            pod.ip,
            proxy::PodNet::in_netns(worker),
            sockets,
            self.mesh.clone(),
            self.telemetry.clone(),
            &self.proxy,
            &self.serving,
        )
        .map_err(|source| EnrollError::Proxy {
            pod: pod.name.clone(),
            source,
        })?;
        tracing::info!(pod = %pod.name, ip = %pod.ip, "enrolled");
        Ok(served)
    }

    fn unenroll(&mut self, pod: &PodSpec) -> Result<(), DatapathError> {
        self.datapath.unenroll(pod)
    }

    fn set_capture(&mut self, cluster: &[Cidr]) -> Result<(), DatapathError> {
        self.datapath.set_capture(cluster).map(|_| ())
    }
}

/// Raises the soft limit on open files to the hard limit. The proxy holds two descriptors per
/// connection it carries (and its listeners and tunnels), and distributions set the soft
/// limit to 1024, which a busy node reaches long before its memory. Failing to raise it is
/// logged, not fatal: the agent works, with fewer connections.
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return;
        }
    };
    if soft >= hard {
        tracing::info!(soft, hard, "open-file limit");
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => tracing::info!(soft = hard, hard, was = soft, "raised the open-file limit"),
        Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
    }
}
