//! The per-pod verdict of `status`: checked against the kernel and with a real connection,
//! never taken from what the agent believes it did.
//!
//! For each enrolled pod, in order:
//!
//! 1. `enrolled`: the datapath's pod table (`PODS_V1`) has the pod's IP, with the id of the
//!    pod's cgroup.
//! 2. `connect4`, `sockops`: the kernel's list of programs attached to the pod's cgroup
//!    (`BPF_PROG_QUERY`) holds the mesh's program, and it is the one the agent's pinned link
//!    for that pod holds.
//! 3. `sk_lookup`: the same for the pod's network namespace.
//! 4. `capture`: a helper process joins the pod's cgroup and network namespace (as the pod's
//!    own processes are) and connects to a captured destination. The check passes when the
//!    connection is established with the proxy's outbound listener (127.0.0.1:15001 in the
//!    pod's namespace) instead of the address it asked for: connect4 ran and redirected it.
//! 5. `proxy`: the pod's proxy recorded that very connection (matched by the helper's source
//!    address) with the destination the helper asked for: the proxy accepted it and read its
//!    original destination back from the kernel.
//!
//! The destination (see [`target`]) is a service VIP of the configuration with a port the
//! service does not have, so the proxy refuses it at once without dialling anything: the probe
//! shows in the access log, metrics and `flows` as one refused connection (`NR`,
//! `no_such_port`), marked as a probe in `flows`. Without a service VIP it is the pod's own
//! address on the proxy's port, which the proxy refuses as well.
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_common::{PROG_CONNECT4, PROG_SK_LOOKUP, PROG_SOCKOPS};
use mesh_core::model::NodeSnapshot;
use serde::{Deserialize, Serialize};

use mesh_datapath::config::{DatapathConfig, Mode, PodSpec};
use mesh_datapath::features::Check;
use mesh_datapath::kernel::{self, Hook};
use mesh_proxy::telemetry::Telemetry;

/// How long the helper waits for its connection, then for the proxy to close it.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long, after the helper is done, the proxy gets to record the connection.
const RECORD_WAIT: Duration = Duration::from_secs(1);

/// The name of the hidden subcommand the helper runs.
pub const HELPER_COMMAND: &str = "probe-connect";

/// One pod's verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodHealth {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub healthy: bool,
    pub checks: Vec<Check>,
}

/// What the helper saw, printed as one JSON line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeReport {
    pub target: String,
    /// The helper's end of the connection.
    pub local: Option<String>,
    /// The end the kernel connected it to.
    pub peer: Option<String>,
    /// How the connection ended: `closed`, `reset`, `open` (still open at the timeout) or
    /// `answered` (the other end sent bytes).
    pub ended: Option<String>,
    pub error: Option<String>,
}

// === The helper ===

/// The helper's work, in the pod's cgroup and namespace: connect to `target`, note both ends,
/// wait for the other end to close (up to `timeout`), report.
pub fn helper(target: SocketAddrV4, timeout: Duration) -> ProbeReport {
    let mut report = ProbeReport {
        target: target.to_string(),
        ..ProbeReport::default()
    };
    let mut conn = match TcpStream::connect_timeout(&SocketAddr::V4(target), timeout) {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(format!("connect to {target}: {e}"));
            return report;
        }
    };
    report.local = conn.local_addr().ok().map(|a| a.to_string());
    report.peer = conn.peer_addr().ok().map(|a| a.to_string());
    let _ = conn.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 64];
    report.ended = Some(
        match conn.read(&mut buf) {
            Ok(0) => "closed",
            Ok(_) => "answered",
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
            Err(_) => "open",
        }
        .to_string(),
    );
    report
}

/// Runs the helper (this same executable) inside `cgroup` and the network namespace `netns`.
fn run_helper(cgroup: &Path, netns: &Path, target: SocketAddrV4) -> Result<ProbeReport, String> {
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .map_err(|e| format!("open {}/cgroup.procs: {e}", cgroup.display()))?;
    let ns = File::open(netns).map_err(|e| format!("open {}: {e}", netns.display()))?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args([
        HELPER_COMMAND,
        "--target",
        &target.to_string(),
        "--timeout-ms",
        &PROBE_TIMEOUT.as_millis().to_string(),
    ])
    .env("RUST_LOG", "off")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: between fork and exec only write(2) and setns(2), both async-signal-safe, on
    // descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            (&procs).write_all(b"0")?;
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("start the probe: {e}"))?;
    let deadline = Instant::now() + PROBE_TIMEOUT * 2 + Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the probe did not finish in time".into());
            }
        }
    }
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    serde_json::from_str(out.trim()).map_err(|_| {
        format!(
            "the probe failed: {}",
            if err.trim().is_empty() {
                out.trim()
            } else {
                err.trim()
            }
        )
    })
}

// === The destination ===

fn captured(cfg: &DatapathConfig, ip: Ipv4Addr) -> bool {
    cfg.capture.iter().any(|c| {
        let mask = if c.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(c.len))
        };
        u32::from(ip) & mask == u32::from(c.addr)
    })
}

fn port_captured(cfg: &DatapathConfig, port: u16) -> bool {
    port != mesh_common::HBONE_PORT && !cfg.excluded_ports.contains(&port)
}

/// Where the probe connects for `pod_ip`: a captured service VIP with a port the service does
/// not have (the proxy refuses it without dialling), else the pod's own address on the
/// proxy's outbound port. `None` when neither is captured.
pub fn target(
    cfg: &DatapathConfig,
    snapshot: Option<&NodeSnapshot>,
    pod_ip: Ipv4Addr,
) -> Option<SocketAddrV4> {
    let vip = snapshot.and_then(|s| {
        s.services.values().find_map(|svc| {
            let vip = svc.vip.filter(|v| captured(cfg, *v))?;
            let taken: BTreeSet<u16> = svc.ports.iter().map(|p| p.port).collect();
            let port = (cfg.outbound_port..=u16::MAX)
                .find(|p| !taken.contains(p) && port_captured(cfg, *p))?;
            Some(SocketAddrV4::new(vip, port))
        })
    });
    vip.or_else(|| {
        (captured(cfg, pod_ip) && port_captured(cfg, cfg.outbound_port))
            .then(|| SocketAddrV4::new(pod_ip, cfg.outbound_port))
    })
}

// === The checks ===

/// What checking one pod needs.
pub struct PodProbe<'a> {
    pub spec: &'a PodSpec,
    pub datapath: &'a DatapathConfig,
    pub target: Option<SocketAddrV4>,
    pub telemetry: &'a Telemetry,
}

impl PodProbe<'_> {
    fn re_enroll(&self) -> String {
        re_enroll(self.datapath, self.spec)
    }

    /// Runs every check (see the module documentation). `on_probe` is told the helper's
    /// source address before the proxy can record the connection.
    pub fn run(&self, on_probe: &dyn Fn(&str)) -> PodHealth {
        let spec = self.spec;
        let mut checks = vec![
            self.enrolled(),
            self.program(
                "connect4",
                Hook::Connect4,
                &spec.cgroup,
                PROG_CONNECT4,
                "cgroup",
            ),
            self.program(
                "sockops",
                Hook::SockOps,
                &spec.cgroup,
                PROG_SOCKOPS,
                "cgroup",
            ),
            self.program(
                "sk_lookup",
                Hook::SkLookup,
                &spec.netns,
                PROG_SK_LOOKUP,
                "network namespace",
            ),
        ];
        let seen_before = self.telemetry.recent(0).last().map_or(0, |e| e.seq);
        let (capture, report) = self.capture(on_probe);
        checks.push(capture);
        checks.push(self.proxy(report.as_ref(), seen_before));
        PodHealth {
            pod: spec.name.clone(),
            ip: spec.ip,
            healthy: checks.iter().all(|c| c.ok),
            checks,
        }
    }

    fn enrolled(&self) -> Check {
        let spec = self.spec;
        let result = (|| {
            let maps = mesh_datapath::ebpf::Maps::open(&self.datapath.pin_dir())
                .map_err(|e| e.to_string())?;
            let entry = maps
                .pods
                .get(&mesh_datapath::ebpf::ip_key(spec.ip), 0)
                .map_err(|_| format!("{} has no entry for {}", mesh_common::PODS_MAP, spec.ip))?;
            let cgroup_id = fs::metadata(&spec.cgroup)
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .map_err(|e| format!("{}: {e}", spec.cgroup.display()))?;
            if entry.cgroup != cgroup_id {
                return Err(format!(
                    "{} names cgroup id {} for {}, but {} has id {cgroup_id}",
                    mesh_common::PODS_MAP,
                    entry.cgroup,
                    spec.ip,
                    spec.cgroup.display()
                ));
            }
            let permissive = entry.flags & mesh_common::POD_FLAG_PERMISSIVE != 0;
            if permissive != (spec.mode == Mode::Permissive) {
                return Err(format!(
                    "{} has the wrong mode for {}",
                    mesh_common::PODS_MAP,
                    spec.ip
                ));
            }
            Ok(format!(
                "{} has {} (cgroup id {cgroup_id}, netns cookie {})",
                mesh_common::PODS_MAP,
                spec.ip,
                entry.netns
            ))
        })();
        Check::new("enrolled", result).hint(self.re_enroll())
    }

    /// The pods' link pins of `program` (one per program build the agent attached with).
    fn pinned_programs(&self, program: &str) -> Vec<(String, Result<u32, String>)> {
        let dir = self
            .datapath
            .pin_dir()
            .join("links")
            .join(self.spec.pin_name());
        let Ok(builds) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        builds
            .flatten()
            .map(|b| b.path().join(program))
            .filter(|p| p.exists())
            .map(|p| (p.display().to_string(), kernel::pinned_link_program(&p)))
            .collect()
    }

    fn program(&self, name: &str, hook: Hook, target: &Path, program: &str, what: &str) -> Check {
        let result = (|| {
            let ids = kernel::attached_at(target, hook).map_err(|e| {
                format!(
                    "ask the kernel what is attached to {}: {e}",
                    target.display()
                )
            })?;
            let names = kernel::program_names(&ids);
            let ours: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|id| names.get(id).is_some_and(|n| n == program))
                .collect();
            let pinned = self.pinned_programs(program);
            let describe = |ids: &[u32]| {
                if ids.is_empty() {
                    "nothing".to_string()
                } else {
                    ids.iter()
                        .map(|id| format!("{} ({id})", names.get(id).map_or("?", String::as_str)))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            if ours.is_empty() {
                let held = match pinned.first() {
                    Some((path, Ok(prog))) => {
                        format!("; its pinned link {path} holds program {prog}, not attached")
                    }
                    Some((path, Err(e))) => format!("; its pinned link {path}: {e}"),
                    None => "; no link is pinned for it".into(),
                };
                return Err(format!(
                    "{program} is not attached at {} of the pod's {what} {} (attached: {}){held}",
                    hook.name(),
                    target.display(),
                    describe(&ids)
                ));
            }
            let pinned_ids: Vec<u32> = pinned.iter().filter_map(|(_, r)| r.clone().ok()).collect();
            if !pinned_ids.is_empty() && !pinned_ids.iter().any(|id| ours.contains(id)) {
                return Err(format!(
                    "{} is attached at {} of {}, but not the program the agent's pinned link \
                     holds ({pinned_ids:?})",
                    describe(&ours),
                    hook.name(),
                    target.display()
                ));
            }
            Ok(format!("{} attached at {}", describe(&ours), hook.name()))
        })();
        Check::new(name, result).hint(self.re_enroll())
    }

    fn capture(&self, on_probe: &dyn Fn(&str)) -> (Check, Option<ProbeReport>) {
        let Some(target) = self.target else {
            let check = Check::new(
                "capture",
                Err(
                    "no captured destination to probe: no --capture prefix covers a service \
                     VIP or the pod's address"
                        .into(),
                ),
            )
            .hint("give the agent --capture prefixes for the pod and service ranges");
            return (check, None);
        };
        let proxy = SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.datapath.outbound_port);
        let report = match run_helper(&self.spec.cgroup, &self.spec.netns, target) {
            Ok(r) => r,
            Err(e) => return (Check::new("capture", Err(e)), None),
        };
        if let Some(local) = &report.local {
            on_probe(local);
        }
        let result = match (&report.peer, &report.error) {
            (Some(peer), _) if *peer == proxy.to_string() => Ok(format!(
                "a connection to {target} from the pod was redirected to {proxy}, the proxy's \
                 listener"
            )),
            (Some(peer), _) => Err(format!(
                "a connection to {target} from the pod reached {peer}: not captured"
            )),
            (None, Some(e)) => Err(format!(
                "{e}: the connection was not redirected to the proxy"
            )),
            (None, None) => Err("the probe reported nothing".into()),
        };
        (
            Check::new("capture", result).hint(self.re_enroll()),
            Some(report),
        )
    }

    fn proxy(&self, report: Option<&ProbeReport>, after: u64) -> Check {
        let Some(local) = report.and_then(|r| r.local.clone()) else {
            return Check::new("proxy", Err("no probe connection reached the proxy".into()));
        };
        let target = report.map(|r| r.target.clone()).unwrap_or_default();
        let deadline = Instant::now() + RECORD_WAIT;
        let pod = &self.spec.name;
        loop {
            let found = self
                .telemetry
                .recent(after)
                .into_iter()
                .find(|e| e.pod == *pod && e.src_addr.as_deref() == Some(local.as_str()));
            if let Some(e) = found {
                let result = if e.dst_addr == target {
                    Ok(format!(
                        "the pod's proxy handled it with its original destination {target} \
                         ({} {})",
                        e.flags,
                        e.reason.unwrap_or("-")
                    ))
                } else {
                    Err(format!(
                        "the pod's proxy handled it as a connection to {}, not {target}: the \
                         original destination came back wrong",
                        e.dst_addr
                    ))
                };
                return Check::new("proxy", result).hint(self.re_enroll());
            }
            if Instant::now() >= deadline {
                let captured = report
                    .and_then(|r| r.peer.as_deref())
                    .is_some_and(|p| p.starts_with("127.0.0.1:"));
                let why = if captured {
                    "connected to the proxy's port, but the pod's proxy has no record of it"
                } else {
                    "the probe connection never reached the pod's proxy"
                };
                return Check::new("proxy", Err(why.into())).hint(self.re_enroll());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What to do when a pod's datapath is broken.
fn re_enroll(datapath: &DatapathConfig, spec: &PodSpec) -> String {
    format!(
        "the agent attaches what is missing when it starts, but adopts the links it pinned as \
         they are: remove the pod's pins and map entries (`mesh-agent unenroll --instance {} \
         --name {} --ip {}`), then restart the agent",
        datapath.instance, spec.name, spec.ip
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::model::{Service, ServicePort};
    use std::sync::Arc;

    fn datapath(capture: &[&str]) -> DatapathConfig {
        let mut d = DatapathConfig::new("probe-test").expect("instance");
        d.capture = capture.iter().map(|c| c.parse().expect("cidr")).collect();
        d
    }

    fn snapshot(vip: [u8; 4], ports: &[u16]) -> NodeSnapshot {
        let name = mesh_core::model::NamespacedName::new("demo", "web");
        let svc = Service {
            name: name.clone(),
            vip: Some(vip.into()),
            ports: ports
                .iter()
                .map(|p| ServicePort {
                    name: format!("p{p}"),
                    port: *p,
                    target_port: *p,
                    protocol: Default::default(),
                })
                .collect(),
            endpoints: vec![],
        };
        NodeSnapshot {
            services: Arc::new([(name, Arc::new(svc))].into_iter().collect()),
            ..NodeSnapshot::default()
        }
    }

    #[test]
    fn the_probe_goes_to_a_captured_vip_on_a_port_the_service_lacks() {
        let pod: Ipv4Addr = [10, 244, 1, 10].into();
        let d = datapath(&["10.244.0.0/16", "10.96.0.0/16"]);
        let s = snapshot([10, 96, 0, 10], &[80, 15001]);
        assert_eq!(
            target(&d, Some(&s), pod),
            Some("10.96.0.10:15002".parse().expect("addr"))
        );
        // The VIP is not captured: the pod's own address, on the proxy's port.
        let d = datapath(&["10.244.0.0/16"]);
        assert_eq!(
            target(&d, Some(&s), pod),
            Some("10.244.1.10:15001".parse().expect("addr"))
        );
        assert_eq!(target(&datapath(&[]), Some(&s), pod), None);
    }

    #[test]
    fn the_helper_reports_both_ends_and_how_the_connection_ended() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = match listener.local_addr().expect("addr") {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound IPv4"),
        };
        let server = std::thread::spawn(move || drop(listener.accept()));
        let report = helper(addr, Duration::from_secs(2));
        server.join().expect("server");
        assert_eq!(report.peer.as_deref(), Some(addr.to_string().as_str()));
        assert!(report.local.is_some());
        assert_eq!(report.ended.as_deref(), Some("closed"), "{report:?}");

        let closed = "127.0.0.1:1".parse().expect("addr");
        let report = helper(closed, Duration::from_millis(500));
        assert!(report.error.is_some(), "{report:?}");
    }
}
