//! A containerd of one test's own, driven with `ctr` (no CRI, no network): its root, state,
//! socket, runc root and the containers' output under one temporary directory
//! (`mesh-sim-<prefix>...`, so `cargo xtask clean` finds it after a killed run), the daemon
//! and its shims in a cgroup of the test's, each container in a cgroup `/mesh-test-...` of
//! its own. Images are imported and containers run as `ctr run` runs them: from the image's
//! configuration (entrypoint, `PATH`, user), with the argv the test gives. Everything is
//! removed on drop.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::node::snapshotter;
use crate::cluster::{Proc, spawn_app};
use crate::{Cgroup, unique};

/// How long containerd may take to answer after it starts.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a container may run.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// The namespace of containerd's objects (as the kubelet's are in `k8s.io`).
const NAMESPACE: &str = "mesh-test";

/// How a container's process ended, and the runtime spec it ran with.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    /// What the process wrote to its standard output and error.
    pub output: String,
    /// What `ctr` said.
    pub ctr: String,
    /// The OCI runtime spec containerd made from the image and the options.
    pub spec: Value,
}

// === impl Containerd ===

pub struct Containerd {
    dir: tempfile::TempDir,
    socket: PathBuf,
    proc: Option<Proc>,
    snapshotter: &'static str,
    containers: Vec<String>,
    // Dropped last: kills what is left of the daemon and its shims.
    _cgroup: Cgroup,
}

impl Containerd {
    /// Starts containerd and waits until `ctr` reaches it.
    pub fn start(tag: &str) -> Result<Containerd> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mesh-sim-{}", unique(tag)))
            .tempdir()
            .context("create the runtime's directory")?;
        let cgroup = Cgroup::new(tag);
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path(), &socket, false))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let proc = spawn_app(cmd, &dir.path().join("containerd.log"))
            .context("start containerd (Debian package containerd)")?;
        // Its shims are started later and stay in its cgroup.
        std::fs::write(cgroup.path.join("cgroup.procs"), proc.pid().to_string())
            .context("move containerd into its cgroup")?;
        let mut rt = Containerd {
            dir,
            socket,
            proc: Some(proc),
            snapshotter: snapshotter(),
            containers: Vec::new(),
            _cgroup: cgroup,
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = rt.proc.as_mut().and_then(Proc::exited) {
                bail!(
                    "containerd exited ({status}); its log:\n{}",
                    rt.log_tail(30)
                );
            }
            let ok = rt
                .ctr()
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return Ok(rt);
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd does not answer after {} s; its log:\n{}",
                    START_LIMIT.as_secs(),
                    rt.log_tail(30)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE]);
        cmd
    }

    /// The last `n` lines of containerd's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.proc.as_ref().map(|p| p.tail(n)).unwrap_or_default()
    }

    /// Imports the image archive `archive` (`ctr images import`, unpacked for the snapshotter
    /// containers use); the names of the images it holds.
    pub fn import(&self, archive: &Path) -> Result<Vec<String>> {
        let out = self
            .ctr()
            .args(["images", "import"])
            .arg(format!("--snapshotter={}", self.snapshotter))
            .arg(archive)
            .output()
            .context("run ctr images import")?;
        ensure!(
            out.status.success(),
            "ctr images import {}: {}\ncontainerd's log:\n{}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            self.log_tail(20)
        );
        let list = self.ctr().args(["images", "list", "-q"]).output()?;
        Ok(String::from_utf8_lossy(&list.stdout)
            .lines()
            .map(String::from)
            .collect())
    }

    /// Runs a container of `image` with `argv` and the extra environment `env` (`K=V`) to its
    /// end, then removes it.
    pub fn run(&mut self, image: &str, argv: &[&str], env: &[&str]) -> Result<Ran> {
        let (id, mut cmd) = self.container_command("run");
        // The process's output to a file, and no standard input (ctr would pass its own,
        // which a process reading it waits on for ever).
        let log = self.dir.path().join(format!("{id}.log"));
        cmd.arg(format!("--log-uri=file://{}", log.display()))
            .arg("--runc-root")
            .arg(self.dir.path().join("runc"));
        for e in env {
            cmd.arg(format!("--env={e}"));
        }
        cmd.arg(image).arg(&id).args(argv);
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("run ctr run")?;
        let deadline = Instant::now() + RUN_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                self.remove(&id);
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{image} {argv:?} still ran after {} s; its output:\n{}",
                    RUN_LIMIT.as_secs(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let spec = self
            .spec(&id)
            .with_context(|| format!("ctr run said: {}", stderr.trim()));
        self.remove(&id);
        Ok(Ran {
            code: status.code().unwrap_or(-1),
            output: std::fs::read_to_string(&log).unwrap_or_default(),
            ctr: stderr,
            spec: spec?,
        })
    }

    /// The runtime spec of a container of `image` created with no argv (the image's own
    /// entrypoint), which is never started.
    pub fn create(&mut self, image: &str) -> Result<Value> {
        let (id, mut cmd) = self.container_command("create");
        cmd.arg(image).arg(&id);
        let out = cmd.output().context("run ctr containers create")?;
        ensure!(
            out.status.success(),
            "ctr containers create: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let spec = self.spec(&id);
        self.remove(&id);
        spec
    }

    /// `ctr <verb>` for a new container with the test's options, and its id.
    fn container_command(&mut self, verb: &str) -> (String, Command) {
        let id = format!("mesh-test-{}", unique("ctr"));
        let mut cmd = self.ctr();
        if verb == "create" {
            // Never started: no cgroup.
            cmd.args(["containers", "create"]);
        } else {
            cmd.arg(verb)
                // Its own cgroup at the hierarchies' roots, where leftovers are looked for.
                .arg(format!("--cgroup=/{id}"));
        }
        cmd.arg(format!("--snapshotter={}", self.snapshotter));
        self.containers.push(id.clone());
        (id, cmd)
    }

    /// The OCI runtime spec of container `id`.
    fn spec(&self, id: &str) -> Result<Value> {
        let info = self
            .ctr()
            .args(["containers", "info", id])
            .output()
            .context("run ctr containers info")?;
        ensure!(
            info.status.success(),
            "ctr containers info {id}: {}\ncontainerd's log:\n{}",
            String::from_utf8_lossy(&info.stderr).trim(),
            self.log_tail(20)
        );
        let info: Value = serde_json::from_slice(&info.stdout).context("ctr containers info")?;
        Ok(info["Spec"].clone())
    }

    /// Removes container `id` (its task first, if one is left) with its snapshot.
    fn remove(&mut self, id: &str) {
        let quiet = |cmd: &mut Command| {
            let _ = cmd.output();
        };
        quiet(
            self.ctr()
                .args(["tasks", "kill", "--signal", "SIGKILL", id]),
        );
        quiet(self.ctr().args(["tasks", "delete", "--force", id]));
        quiet(self.ctr().args(["containers", "delete", id]));
        self.containers.retain(|c| c != id);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.containers.clone() {
            self.remove(&id);
        }
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
        // What a container left mounted under the directory, deepest first.
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|p| Path::new(p).starts_with(self.dir.path()))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// containerd's configuration: everything under `dir`, its API at `socket`, only the plugins
/// used (without `cri`, not the CRI plugin either). Plugin sections may follow.
pub(crate) fn config_toml(dir: &Path, socket: &Path, cri: bool) -> String {
    let dir = dir.display();
    let socket = socket.display();
    let no_cri = if cri {
        ""
    } else {
        "  \"io.containerd.grpc.v1.cri\",\n"
    };
    format!(
        r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
# No other snapshotters, no /opt plugin directory.
disabled_plugins = [
{no_cri}  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""
"#
    )
}
