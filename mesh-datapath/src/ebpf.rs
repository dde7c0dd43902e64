//! The datapath: loads the kernel programs, pins their maps under
//! `/sys/fs/bpf/mesh/<instance>/`, attaches the agent-scope programs, and enrolls pods.
//!
//! Pin layout:
//! - `maps/<MAP>`: every map (re-opened by a restarted agent, so state survives it);
//! - `links/<pod>/<params>/<program>`: the pod's cgroup, netns and tc links. `<params>` names
//!   the program build and load-time parameters, so a restarted agent with the same ones adopts
//!   the links as they are (nothing is attached twice) and one with different ones attaches
//!   the new programs before removing the old.
//!
//! The agent-scope programs (getsockopt, sockops on the agent's own cgroup) are not pinned:
//! they live exactly as long as the agent's proxy that needs them.
use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    fs::{self, File},
    net::{Ipv4Addr, TcpListener},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf,
        SockHash, lpm_trie::Key,
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SchedClassifier, SkLookup, SkMsg, SockOps,
        TcAttachType,
        links::{FdLink, PinnedLink},
        tc,
    },
};
use mesh_common::{
    CAPTURE_MAP, CAPTURE_REDIRECT, COUNTERS_MAP, CaptureRule, Counter, EXCLUDED_PORTS_MAP,
    FLOWS_MAP, FlowEvent, INBOUND_EXCLUDE, INBOUND_MAP, INBOUND_STEER, InboundKey, LISTENERS_MAP,
    POD_COUNTERS_MAP, POD_FLAG_PERMISSIVE, PODS_MAP, PROG_CONNECT4, PROG_CONNECT6, PROG_GETSOCKOPT,
    PROG_SK_LOOKUP, PROG_SK_LOOKUP6, PROG_SKMSG, PROG_SOCKOPS, PROG_TC_INGRESS, PodCounters,
    PodEntry, SOCKS_MAP,
};

use mesh_netns::{self as netns, NetnsError, PodSockets};

use crate::{
    cgroup::{self, CgroupError},
    config::{Cidr, DatapathConfig, Mode, PodSpec, pin_name},
};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs at {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    #[error("load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attach {program} to {target}: {source}")]
    Attach {
        program: &'static str,
        target: String,
        source: aya::programs::ProgramError,
    },
    #[error("pin {what} at {path}: {reason}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {map} is missing from the eBPF object")]
    MissingMap { map: &'static str },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("pod {pod}: {reason}")]
    Pod { pod: String, reason: String },
    #[error("open pinned state of instance at {path}: {reason}")]
    NotLoaded { path: PathBuf, reason: String },
    #[error(
        "pod {pod}: {count} inbound port entries (declared plus excluded) exceed the cap of \
         {max} per pod (--max-inbound-ports-per-pod)"
    )]
    TooManyInboundPorts {
        pod: String,
        count: usize,
        max: usize,
    },
    #[error("pod {pod}: map {map} is full: the pod is not enrolled")]
    MapFull { pod: String, map: &'static str },
}

impl DatapathError {
    pub fn kind(&self) -> &'static str {
        match self {
            DatapathError::Bpffs { .. } => "bpffs",
            DatapathError::Load(_) => "load",
            DatapathError::Program { .. } => "program",
            DatapathError::Attach { .. } => "attach",
            DatapathError::Pin { .. } => "pin",
            DatapathError::Map { .. } => "map",
            DatapathError::MissingMap { .. } => "missing_map",
            DatapathError::Cgroup(e) => e.kind(),
            DatapathError::Netns(e) => e.kind(),
            DatapathError::Pod { .. } => "pod",
            DatapathError::NotLoaded { .. } => "not_loaded",
            DatapathError::TooManyInboundPorts { .. } => "too_many_inbound_ports",
            DatapathError::MapFull { .. } => "map_full",
        }
    }
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

fn prog_err(program: &'static str) -> impl Fn(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { program, source }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there (as agents on real nodes do), and
/// creates `dir` on it.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mount_point = Path::new("/sys/fs/bpf");
    let is_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if dir.starts_with(mount_point) && !is_bpffs(mount_point) {
        nix::mount::mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| DatapathError::Bpffs {
            path: mount_point.into(),
            reason: format!("not mounted, and mounting it failed: {e}"),
        })?;
    }
    fs::create_dir_all(dir).map_err(|e| DatapathError::Bpffs {
        path: dir.into(),
        reason: e.to_string(),
    })?;
    if !is_bpffs(dir) {
        return Err(DatapathError::Bpffs {
            path: dir.into(),
            reason: "not on a bpf filesystem".into(),
        });
    }
    Ok(())
}

/// Identifies the program build and its load-time parameters (names link pin directories).
fn params_id(cfg: &DatapathConfig) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(crate::EBPF_OBJECT);
    feed(&cfg.outbound_port.to_le_bytes());
    feed(&[cfg.skmsg as u8, cfg.refuse_native_ipv6 as u8]);
    feed(&cfg.skmsg_budget.to_le_bytes());
    format!("p{h:016x}")
}

// === Maps ===

/// The pinned maps of one instance, opened by path: used by the running agent and by the
/// debugging commands alike.
pub struct Maps {
    pub pods: HashMap<MapData, u32, PodEntry>,
    pub inbound: HashMap<MapData, InboundKey, u32>,
    pub listeners: SockHash<MapData, u32>,
    pub pod_counters: PerCpuHashMap<MapData, u32, PodCounters>,
    pub counters: PerCpuArray<MapData, u64>,
    pub capture: LpmTrie<MapData, u32, CaptureRule>,
    pub excluded: HashMap<MapData, u32, u32>,
}

fn open_pinned(dir: &Path, name: &'static str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| DatapathError::NotLoaded {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Map::from_map_data(data).map_err(map_err(name))
}

impl Maps {
    /// Opens the maps pinned in `<pin_dir>/maps`.
    pub fn open(pin_dir: &Path) -> Result<Maps> {
        let dir = pin_dir.join("maps");
        Ok(Maps {
            pods: open_pinned(&dir, PODS_MAP)?
                .try_into()
                .map_err(map_err(PODS_MAP))?,
            inbound: open_pinned(&dir, INBOUND_MAP)?
                .try_into()
                .map_err(map_err(INBOUND_MAP))?,
            listeners: open_pinned(&dir, LISTENERS_MAP)?
                .try_into()
                .map_err(map_err(LISTENERS_MAP))?,
            pod_counters: open_pinned(&dir, POD_COUNTERS_MAP)?
                .try_into()
                .map_err(map_err(POD_COUNTERS_MAP))?,
            counters: open_pinned(&dir, COUNTERS_MAP)?
                .try_into()
                .map_err(map_err(COUNTERS_MAP))?,
            capture: open_pinned(&dir, CAPTURE_MAP)?
                .try_into()
                .map_err(map_err(CAPTURE_MAP))?,
            excluded: open_pinned(&dir, EXCLUDED_PORTS_MAP)?
                .try_into()
                .map_err(map_err(EXCLUDED_PORTS_MAP))?,
        })
    }

    /// Global counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|c| Ok((*c, self.counter(*c)?)))
            .collect()
    }

    pub fn counter(&self, c: Counter) -> Result<u64> {
        let v: PerCpuValues<u64> = self
            .counters
            .get(&(c as u32), 0)
            .map_err(map_err(COUNTERS_MAP))?;
        Ok(v.iter().sum())
    }

    /// Per-pod counters, summed over CPUs; None if the pod is not enrolled.
    pub fn pod_counters(&self, ip: Ipv4Addr) -> Result<Option<PodCounters>> {
        match self.pod_counters.get(&ip_key(ip), 0) {
            Ok(v) => Ok(Some(v.iter().fold(PodCounters::default(), |a, c| {
                PodCounters {
                    rx_packets: a.rx_packets + c.rx_packets,
                    rx_bytes: a.rx_bytes + c.rx_bytes,
                }
            }))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(POD_COUNTERS_MAP)(e)),
        }
    }

    /// Every entry that names `ip`, map by map: what unenrollment must leave empty.
    pub fn entries_for(&self, ip: Ipv4Addr) -> Result<Vec<&'static str>> {
        let key = ip_key(ip);
        let mut found = Vec::new();
        if self.pods.get(&key, 0).is_ok() {
            found.push(PODS_MAP);
        }
        if self.listeners.get(&key, 0).is_ok() {
            found.push(LISTENERS_MAP);
        }
        if self.pod_counters.get(&key, 0).is_ok() {
            found.push(POD_COUNTERS_MAP);
        }
        for k in self.inbound.keys() {
            if k.map_err(map_err(INBOUND_MAP))?.ip == key {
                found.push(INBOUND_MAP);
                break;
            }
        }
        Ok(found)
    }

    /// Enrolled pod IPs.
    pub fn pod_ips(&self) -> Result<Vec<Ipv4Addr>> {
        self.pods
            .keys()
            .map(|k| k.map(ip_from_key).map_err(map_err(PODS_MAP)))
            .collect()
    }

    /// Makes the capture map hold exactly `cidrs`: missing prefixes first, then the ones no
    /// longer wanted, so a prefix kept in both is never absent. Returns whether it changed.
    pub fn replace_capture(&mut self, cidrs: &[Cidr]) -> Result<bool> {
        let want: BTreeSet<(u32, u32)> = cidrs
            .iter()
            .map(|c| (u32::from(c.len), ip_key(c.addr)))
            .collect();
        let have: BTreeSet<(u32, u32)> = self
            .capture
            .keys()
            .map(|k| k.map(|k| (k.prefix_len(), k.data())))
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(CAPTURE_MAP))?;
        for (len, addr) in want.difference(&have) {
            let rule = CaptureRule {
                action: CAPTURE_REDIRECT,
            };
            self.capture
                .insert(&Key::new(*len, *addr), rule, 0)
                .map_err(map_err(CAPTURE_MAP))?;
        }
        for (len, addr) in have.difference(&want) {
            self.capture
                .remove(&Key::new(*len, *addr))
                .map_err(map_err(CAPTURE_MAP))?;
        }
        Ok(want != have)
    }

    fn set_capture(&mut self, cfg: &DatapathConfig) -> Result<()> {
        for cidr in &cfg.capture {
            let key = Key::new(cidr.len as u32, ip_key(cidr.addr));
            let rule = CaptureRule {
                action: CAPTURE_REDIRECT,
            };
            self.capture
                .insert(&key, rule, 0)
                .map_err(map_err(CAPTURE_MAP))?;
        }
        for port in &cfg.excluded_ports {
            self.excluded
                .insert(*port as u32, 1, 0)
                .map_err(map_err(EXCLUDED_PORTS_MAP))?;
        }
        Ok(())
    }

    fn add_pod(&mut self, spec: &PodSpec, entry: PodEntry, listener: &TcpListener) -> Result<()> {
        let key = ip_key(spec.ip);
        let full = |map: &'static str| {
            let pod = spec.name.clone();
            move |e: aya::maps::MapError| match &e {
                aya::maps::MapError::SyscallError(s)
                    if s.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    DatapathError::MapFull { pod, map }
                }
                _ => DatapathError::Map { map, source: e },
            }
        };
        self.pods.insert(key, entry, 0).map_err(full(PODS_MAP))?;
        if self.pod_counters.get(&key, 0).is_err() {
            let zeros = PerCpuValues::try_from(vec![
                PodCounters::default();
                aya::util::nr_cpus().map_err(|(_, e)| {
                    DatapathError::Pod {
                        pod: spec.name.clone(),
                        reason: format!("count CPUs: {e}"),
                    }
                })?
            ])
            .map_err(|e| DatapathError::Pod {
                pod: spec.name.clone(),
                reason: format!("per-CPU counters: {e}"),
            })?;
            self.pod_counters
                .insert(key, zeros, 0)
                .map_err(full(POD_COUNTERS_MAP))?;
        }
        // Rules no longer wanted go first, then the current set.
        self.remove_inbound(spec.ip)?;
        for (port, rule) in inbound_rules(spec) {
            let k = InboundKey {
                ip: key,
                port: port as u32,
            };
            self.inbound.insert(k, rule, 0).map_err(full(INBOUND_MAP))?;
        }
        self.listeners
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(full(LISTENERS_MAP))?;
        Ok(())
    }

    fn remove_inbound(&mut self, ip: Ipv4Addr) -> Result<()> {
        let key = ip_key(ip);
        let stale: Vec<InboundKey> = self
            .inbound
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.ip == key)
            .collect();
        for k in stale {
            ignore_missing(self.inbound.remove(&k)).map_err(map_err(INBOUND_MAP))?;
        }
        Ok(())
    }

    /// Removes every entry of the pod at `ip`.
    pub fn remove_pod(&mut self, ip: Ipv4Addr) -> Result<()> {
        let key = ip_key(ip);
        ignore_missing(self.listeners.remove(&key)).map_err(map_err(LISTENERS_MAP))?;
        self.remove_inbound(ip)?;
        ignore_missing(self.pods.remove(&key)).map_err(map_err(PODS_MAP))?;
        ignore_missing(self.pod_counters.remove(&key)).map_err(map_err(POD_COUNTERS_MAP))?;
        Ok(())
    }
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The pod's entries in [`INBOUND_MAP`]: its declared ports steered, its excluded ports never
/// (an exclusion wins over a declaration of the same port).
pub fn inbound_rules(spec: &PodSpec) -> std::collections::BTreeMap<u16, u32> {
    let mut rules: std::collections::BTreeMap<u16, u32> = spec
        .inbound_ports
        .iter()
        .map(|p| (*p, INBOUND_STEER))
        .collect();
    for p in &spec.excluded_inbound_ports {
        rules.insert(*p, INBOUND_EXCLUDE);
    }
    rules
}

/// An IPv4 address as the kernel programs see it in a `u32` field (network byte order).
pub fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ip_from_key(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(k.to_ne_bytes())
}

/// Drains the flow events currently in the ring buffer of an instance.
pub fn drain_flows(pin_dir: &Path) -> Result<Vec<FlowEvent>> {
    Ok(FlowReader::open(pin_dir)?.drain())
}

/// The reader of the kernel's flow ring (one per consumer: each event is read once).
pub struct FlowReader {
    ring: RingBuf<MapData>,
}

impl FlowReader {
    /// Opens the flow ring pinned by the instance at `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<FlowReader> {
        let map = open_pinned(&pin_dir.join("maps"), FLOWS_MAP)?;
        let ring: RingBuf<MapData> = map.try_into().map_err(map_err(FLOWS_MAP))?;
        Ok(FlowReader { ring })
    }

    /// Takes every event queued since the last call.
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: FlowEvent is plain integers; read_unaligned copes with any alignment
                // and the length was checked.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
            }
        }
        out
    }
}

// === Datapath ===

struct Enrolled {
    spec: PodSpec,
}

/// The loaded datapath of one agent instance.
pub struct Datapath {
    cfg: DatapathConfig,
    ebpf: Ebpf,
    maps: Maps,
    cgroup_mount: PathBuf,
    params: String,
    pods: StdHashMap<String, Enrolled>,
}

impl Datapath {
    /// Loads the programs, creating or re-opening the instance's pinned maps.
    pub fn load(cfg: DatapathConfig) -> Result<Datapath> {
        let cgroup_mount = cgroup::v2_mount()?;
        let pin_dir = cfg.pin_dir();
        let maps_dir = pin_dir.join("maps");
        ensure_bpffs(&maps_dir)?;
        fs::create_dir_all(pin_dir.join("links")).map_err(|e| DatapathError::Bpffs {
            path: pin_dir.join("links"),
            reason: e.to_string(),
        })?;
        for retired in mesh_common::RETIRED_MAPS {
            let _ = fs::remove_file(maps_dir.join(retired));
        }
        let outbound_port = cfg.outbound_port as u32;
        let skmsg = cfg.skmsg as u32;
        let refuse_v6 = cfg.refuse_native_ipv6 as u32;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global(mesh_common::GLOBAL_OUTBOUND_PORT, &outbound_port, true)
            .override_global(mesh_common::GLOBAL_SKMSG_ENABLED, &skmsg, true)
            .override_global(mesh_common::GLOBAL_REFUSE_NATIVE_V6, &refuse_v6, true)
            .override_global(mesh_common::GLOBAL_SKMSG_BUDGET, &cfg.skmsg_budget, true)
            .load(crate::EBPF_OBJECT)?;
        load_programs(&mut ebpf)?;
        if cfg.skmsg {
            let socks: SockHash<_, mesh_common::SockKey> = ebpf
                .map(SOCKS_MAP)
                .ok_or(DatapathError::MissingMap { map: SOCKS_MAP })?
                .try_into()
                .map_err(map_err(SOCKS_MAP))?;
            let fd = socks.fd().try_clone().map_err(|e| DatapathError::Pin {
                what: "sockhash fd",
                path: maps_dir.join(SOCKS_MAP),
                reason: e.to_string(),
            })?;
            program::<SkMsg>(&mut ebpf, PROG_SKMSG)?
                .attach(&fd)
                .map_err(|source| DatapathError::Attach {
                    program: PROG_SKMSG,
                    target: SOCKS_MAP.into(),
                    source,
                })?;
        }
        let mut maps = Maps::open(&pin_dir)?;
        maps.set_capture(&cfg)?;
        let params = params_id(&cfg);
        Ok(Datapath {
            cfg,
            ebpf,
            maps,
            cgroup_mount,
            params,
            pods: StdHashMap::new(),
        })
    }

    pub fn config(&self) -> &DatapathConfig {
        &self.cfg
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn cgroup_mount(&self) -> &Path {
        &self.cgroup_mount
    }

    // Cgroup attachments are bpf_links (Linux 5.7+), which always coexist with other programs
    // on the cgroup; the link API takes no flags, so the mode is `Single` (0) here.

    /// Attaches the programs that act on the proxy's own sockets (SO_ORIGINAL_DST answers,
    /// sockhash insertion of accepted sockets) to the agent's cgroup. They are not pinned: they
    /// go away with this process.
    pub fn attach_agent(&mut self, agent_cgroup: &Path) -> Result<()> {
        cgroup::check_attachable(&self.cgroup_mount, agent_cgroup)?;
        let cg = File::open(agent_cgroup).map_err(|source| CgroupError::Read {
            path: agent_cgroup.into(),
            source,
        })?;
        let target = agent_cgroup.display().to_string();
        program::<CgroupSockopt>(&mut self.ebpf, PROG_GETSOCKOPT)?
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|source| DatapathError::Attach {
                program: PROG_GETSOCKOPT,
                target: target.clone(),
                source,
            })?;
        program::<SockOps>(&mut self.ebpf, PROG_SOCKOPS)?
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|source| DatapathError::Attach {
                program: PROG_SOCKOPS,
                target,
                source,
            })?;
        Ok(())
    }

    /// Enrolls a pod: attaches (or adopts) its links, opens the proxy's sockets in its network
    /// namespace, and records it in the maps. Idempotent. On error nothing is changed.
    pub fn enroll(&mut self, spec: &PodSpec) -> Result<PodSockets> {
        self.enroll_with(spec, None)
    }

    /// [`Datapath::enroll`], keeping the listening sockets an earlier agent handed over when
    /// they are the pod's: in its network namespace, on the proxy's ports. The kernel queues
    /// connections on them all along, so the pod is never without a listener.
    pub fn enroll_with(
        &mut self,
        spec: &PodSpec,
        inherited: Option<PodSockets>,
    ) -> Result<PodSockets> {
        let pod_err = |reason: String| DatapathError::Pod {
            pod: spec.name.clone(),
            reason,
        };
        // Validate everything from outside before touching the kernel.
        let rules = inbound_rules(spec).len();
        if rules > self.cfg.max_inbound_ports {
            return Err(DatapathError::TooManyInboundPorts {
                pod: spec.name.clone(),
                count: rules,
                max: self.cfg.max_inbound_ports,
            });
        }
        cgroup::check_attachable(&self.cgroup_mount, &spec.cgroup)?;
        let cg = File::open(&spec.cgroup).map_err(|source| CgroupError::Read {
            path: spec.cgroup.clone(),
            source,
        })?;
        let cgroup_id = fs::metadata(&spec.cgroup)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .map_err(|source| CgroupError::Read {
                path: spec.cgroup.clone(),
                source,
            })?;
        let ns = netns::open(&spec.netns)?;
        if let Some(other) = self
            .pods
            .values()
            .find(|p| p.spec.ip == spec.ip && p.spec.name != spec.name)
        {
            return Err(pod_err(format!(
                "IP {} already belongs to {}",
                spec.ip, other.spec.name
            )));
        }

        let (out_port, in_port) = (self.cfg.outbound_port, self.cfg.inbound_port);
        let iface = spec.iface.clone();
        let pod = spec.name.clone();
        let (sockets, cookie) = netns::run_in(&ns, &spec.netns, move || {
            if let Some(sockets) = inherited {
                match inherited_fit(&sockets, out_port, in_port) {
                    Ok(cookie) => return Ok((sockets, cookie)),
                    Err(e) => tracing::warn!(%pod, error = %e,
                        "the listeners handed over are not this pod's; listening anew"),
                }
            }
            let bind = |port| {
                TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|e| format!("listen on 127.0.0.1:{port} in the pod: {e}"))
            };
            if nix::net::if_::if_nametoindex(iface.as_str()).is_err() {
                return Err(format!(
                    "no interface {iface} in the pod's network namespace"
                ));
            }
            let outbound = bind(out_port)?;
            let inbound = bind(in_port)?;
            let cookie = netns::netns_cookie(&outbound)
                .map_err(|e| format!("read the network namespace cookie: {e}"))?;
            Ok((
                PodSockets {
                    outbound,
                    inbound,
                    hbone: None,
                },
                cookie,
            ))
        })?
        .map_err(pod_err)?;

        // The pins are the only owners of the links: removing them (here, by another agent
        // or by `mesh-agent unenroll`) detaches the programs.
        drop(self.attach_pod(spec, &cg, &ns)?);

        let mut flags = 0;
        if spec.mode == Mode::Permissive {
            flags |= POD_FLAG_PERMISSIVE;
        }
        let entry = PodEntry {
            netns: cookie,
            cgroup: cgroup_id,
            flags,
            _pad: 0,
        };
        if let Err(e) = self.maps.add_pod(spec, entry, &sockets.inbound) {
            let _ = self.maps.remove_pod(spec.ip);
            let _ = self.remove_links(spec, &ns);
            return Err(e);
        }
        self.pods
            .insert(spec.name.clone(), Enrolled { spec: spec.clone() });
        Ok(sockets)
    }

    fn pod_links_dir(&self, spec: &PodSpec) -> PathBuf {
        self.cfg.pin_dir().join("links").join(spec.pin_name())
    }

    /// Attaches the pod's programs, or adopts the pinned links of an earlier agent with the
    /// same program build and parameters.
    fn attach_pod(&mut self, spec: &PodSpec, cg: &File, ns: &File) -> Result<Vec<PinnedLink>> {
        let pod_dir = self.pod_links_dir(spec);
        let want = pod_dir.join(&self.params);
        let names = [PROG_CONNECT4, PROG_CONNECT6, PROG_SOCKOPS, PROG_SK_LOOKUP];
        if names.iter().all(|n| want.join(n).exists()) {
            let adopted: Result<Vec<_>, _> = names
                .iter()
                .map(|n| PinnedLink::from_pin(want.join(n)))
                .collect();
            if let Ok(mut links) = adopted {
                tracing::info!(pod = %spec.name, "adopted pinned links");
                links.extend(self.sync_ipv6_refusal(spec, ns, &want)?);
                return Ok(links);
            }
        }
        let pin_err = |what: &'static str, path: &Path, reason: String| DatapathError::Pin {
            what,
            path: path.into(),
            reason,
        };
        let _ = fs::remove_dir_all(&want);
        fs::create_dir_all(&want).map_err(|e| pin_err("links", &want, e.to_string()))?;

        let result = (|| {
            let mut links = Vec::new();
            let target = spec.cgroup.display().to_string();
            let attach_err = |program: &'static str, target: &str| {
                let target = target.to_string();
                move |source| DatapathError::Attach {
                    program,
                    target,
                    source,
                }
            };
            let p = program::<CgroupSockAddr>(&mut self.ebpf, PROG_CONNECT4)?;
            let id = p
                .attach(cg, CgroupAttachMode::Single)
                .map_err(attach_err(PROG_CONNECT4, &target))?;
            let link: FdLink = p
                .take_link(id)
                .map_err(prog_err(PROG_CONNECT4))?
                .try_into()
                .map_err(|e| pin_err("link", &want, format!("{e}")))?;
            links.push(pin(link, &want.join(PROG_CONNECT4))?);

            let p = program::<CgroupSockAddr>(&mut self.ebpf, PROG_CONNECT6)?;
            let id = p
                .attach(cg, CgroupAttachMode::Single)
                .map_err(attach_err(PROG_CONNECT6, &target))?;
            let link: FdLink = p
                .take_link(id)
                .map_err(prog_err(PROG_CONNECT6))?
                .try_into()
                .map_err(|e| pin_err("link", &want, format!("{e}")))?;
            links.push(pin(link, &want.join(PROG_CONNECT6))?);

            let p = program::<SockOps>(&mut self.ebpf, PROG_SOCKOPS)?;
            let id = p
                .attach(cg, CgroupAttachMode::Single)
                .map_err(attach_err(PROG_SOCKOPS, &target))?;
            let link: FdLink = p
                .take_link(id)
                .map_err(prog_err(PROG_SOCKOPS))?
                .try_into()
                .map_err(|e| pin_err("link", &want, format!("{e}")))?;
            links.push(pin(link, &want.join(PROG_SOCKOPS))?);

            let ns_target = spec.netns.display().to_string();
            let p = program::<SkLookup>(&mut self.ebpf, PROG_SK_LOOKUP)?;
            let id = p
                .attach(ns.as_fd())
                .map_err(attach_err(PROG_SK_LOOKUP, &ns_target))?;
            let link: FdLink = p.take_link(id).map_err(prog_err(PROG_SK_LOOKUP))?.into();
            links.push(pin(link, &want.join(PROG_SK_LOOKUP))?);
            links.extend(self.sync_ipv6_refusal(spec, ns, &want)?);

            self.attach_tc(spec, ns, &want)?;
            Ok(links)
        })();
        match result {
            Ok(links) => {
                // Only now drop what an earlier agent pinned with other programs/parameters.
                if let Ok(dir) = fs::read_dir(&pod_dir) {
                    for e in dir.flatten() {
                        if e.file_name() != std::ffi::OsStr::new(&self.params) {
                            let _ = fs::remove_dir_all(e.path());
                        }
                    }
                }
                Ok(links)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&want);
                if fs::read_dir(&pod_dir).is_ok_and(|mut d| d.next().is_none()) {
                    let _ = fs::remove_dir(&pod_dir);
                }
                Err(e)
            }
        }
    }

    /// A STRICT pod's network namespace gets `mesh_sk_lookup6`, which refuses inbound IPv6 (the
    /// mesh carries IPv4 only); a PERMISSIVE pod's has none (its pin is removed, which detaches
    /// it when the mode changed).
    fn sync_ipv6_refusal(
        &mut self,
        spec: &PodSpec,
        ns: &File,
        dir: &Path,
    ) -> Result<Option<PinnedLink>> {
        let path = dir.join(PROG_SK_LOOKUP6);
        if spec.mode == Mode::Permissive {
            return match fs::remove_file(&path) {
                Ok(()) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(DatapathError::Pin {
                    what: "removal",
                    path,
                    reason: e.to_string(),
                }),
            };
        }
        if let Ok(link) = PinnedLink::from_pin(&path) {
            return Ok(Some(link));
        }
        let p = program::<SkLookup>(&mut self.ebpf, PROG_SK_LOOKUP6)?;
        let id = p
            .attach(ns.as_fd())
            .map_err(|source| DatapathError::Attach {
                program: PROG_SK_LOOKUP6,
                target: spec.netns.display().to_string(),
                source,
            })?;
        let link: FdLink = p.take_link(id).map_err(prog_err(PROG_SK_LOOKUP6))?.into();
        pin(link, &path).map(Some)
    }

    /// tc ingress on the pod's interface, attached from inside the pod's namespace. TCX links
    /// (Linux 6.6+) are pinned like the others; on older kernels the netlink filter persists
    /// by itself and is replaced by name, so it is never attached twice either.
    fn attach_tc(&mut self, spec: &PodSpec, ns: &File, dir: &Path) -> Result<()> {
        let iface = spec.iface.clone();
        let pin_path = dir.join(PROG_TC_INGRESS);
        let prog = program::<SchedClassifier>(&mut self.ebpf, PROG_TC_INGRESS)?;
        let target = format!("{} in {}", spec.iface, spec.netns.display());
        netns::run_in(ns, &spec.netns, move || -> Result<()> {
            let tcx = crate::kernel::kernel_at_least(6, 6);
            if !tcx {
                let _ = tc::qdisc_add_clsact(&iface);
                let _ = tc::qdisc_detach_program(&iface, TcAttachType::Ingress, PROG_TC_INGRESS);
            }
            // The link of an earlier enrollment of this pod (unenrolled just before, e.g. on
            // a mode change) is released by the kernel after its pin is removed, from a work
            // queue: until then the same program on the same hook is refused with EEXIST.
            let mut attempts = 0;
            let id = loop {
                match prog.attach(&iface, TcAttachType::Ingress) {
                    Ok(id) => break id,
                    Err(source) if already_attached(&source) && attempts < TC_REATTACH_ATTEMPTS => {
                        attempts += 1;
                        std::thread::sleep(TC_REATTACH_PAUSE);
                    }
                    Err(source) => {
                        return Err(DatapathError::Attach {
                            program: PROG_TC_INGRESS,
                            target: target.clone(),
                            source,
                        });
                    }
                }
            };
            let link = prog.take_link(id).map_err(prog_err(PROG_TC_INGRESS))?;
            if tcx {
                let fd = FdLink::try_from(link).map_err(|e| DatapathError::Pin {
                    what: "tc link",
                    path: pin_path.clone(),
                    reason: e.to_string(),
                })?;
                pin(fd, &pin_path)?;
            } else {
                // Netlink filter: detaching on drop would act by ifindex on whatever namespace
                // the dropping thread is in; it stays attached and is replaced or removed by
                // name from inside the pod's namespace.
                std::mem::forget(link);
            }
            Ok(())
        })?
    }

    fn remove_links(&self, spec: &PodSpec, ns: &File) -> Result<()> {
        let dir = self.pod_links_dir(spec);
        let iface = spec.iface.clone();
        let _ = netns::run_in(ns, &spec.netns, move || {
            if !crate::kernel::kernel_at_least(6, 6) {
                let _ = tc::qdisc_detach_program(&iface, TcAttachType::Ingress, PROG_TC_INGRESS);
            }
        });
        remove_pins(&dir)
    }

    /// Unenrolls a pod: detaches its links and removes its map entries. Idempotent.
    pub fn unenroll(&mut self, spec: &PodSpec) -> Result<()> {
        self.pods.remove(&spec.name);
        self.maps.remove_pod(spec.ip)?;
        match netns::open(&spec.netns) {
            Ok(ns) => self.remove_links(spec, &ns),
            // The namespace is gone (pod deleted): its sk_lookup and tc went with it.
            Err(_) => remove_pins(&self.pod_links_dir(spec)),
        }
    }

    /// What the datapath captures from now on: `extra` (the cluster's pod and service CIDRs)
    /// besides the configuration's `--capture`. Whether it changed.
    pub fn set_capture(&mut self, extra: &[Cidr]) -> Result<bool> {
        let mut all = self.cfg.capture.clone();
        all.extend_from_slice(extra);
        self.maps.replace_capture(&all)
    }

    pub fn enrolled(&self) -> impl Iterator<Item = &PodSpec> {
        self.pods.values().map(|p| &p.spec)
    }
}

/// Whether listening sockets handed over by an earlier agent serve the pod whose network
/// namespace the calling thread is in: both listening, in this namespace, on the proxy's
/// loopback ports. The namespace's cookie when they do.
fn inherited_fit(
    sockets: &PodSockets,
    out_port: u16,
    in_port: u16,
) -> std::result::Result<u64, String> {
    let here = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|probe| netns::netns_cookie(&probe))
        .map_err(|e| format!("read the network namespace cookie: {e}"))?;
    for (what, sock, port) in [
        ("outbound", &sockets.outbound, out_port),
        ("inbound", &sockets.inbound, in_port),
    ] {
        let cookie = netns::netns_cookie(sock).map_err(|e| format!("{what}: {e}"))?;
        if cookie != here {
            return Err(format!(
                "the {what} listener is in another network namespace"
            ));
        }
        let want = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match sock.local_addr() {
            Ok(addr) if addr == want => {}
            other => return Err(format!("the {what} listener is on {other:?}, not {want}")),
        }
        let listening = socket2::SockRef::from(sock)
            .is_listener()
            .map_err(|e| format!("{what}: {e}"))?;
        if !listening {
            return Err(format!("the {what} socket is not listening"));
        }
    }
    Ok(here)
}

/// Unenrolls a pod of an instance from its pinned state alone (no running agent needed).
pub fn unenroll_pinned(pin_dir: &Path, name: &str, ip: Ipv4Addr) -> Result<()> {
    let mut maps = Maps::open(pin_dir)?;
    maps.remove_pod(ip)?;
    remove_pins(&pin_dir.join("links").join(pin_name(name)))
}

/// Removes everything an instance pinned: links (which detaches them) and maps.
pub fn remove_instance(pin_dir: &Path) -> Result<()> {
    remove_pins(pin_dir)
}

fn remove_pins(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DatapathError::Pin {
            what: "removal",
            path: dir.into(),
            reason: e.to_string(),
        }),
    }
}

/// How often, and how far apart, tc ingress is attached again while the kernel still holds
/// the released link of the pod's previous enrollment (2 s in all).
const TC_REATTACH_ATTEMPTS: u32 = 40;
const TC_REATTACH_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// The attach failed because the same program is still attached to the hook.
fn already_attached(e: &aya::programs::ProgramError) -> bool {
    matches!(
        e,
        aya::programs::ProgramError::SyscallError(s)
            if s.io_error.raw_os_error() == Some(libc::EEXIST)
    )
}

fn pin(link: FdLink, path: &Path) -> Result<PinnedLink> {
    let _ = fs::remove_file(path);
    link.pin(path).map_err(|e| DatapathError::Pin {
        what: "link",
        path: path.into(),
        reason: e.to_string(),
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::Program {
            program: name,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(prog_err(name))
}

/// Loads every program into the kernel (the verifier checks each here).
pub fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    program::<CgroupSockAddr>(ebpf, PROG_CONNECT4)?
        .load()
        .map_err(prog_err(PROG_CONNECT4))?;
    program::<CgroupSockAddr>(ebpf, PROG_CONNECT6)?
        .load()
        .map_err(prog_err(PROG_CONNECT6))?;
    program::<CgroupSockopt>(ebpf, PROG_GETSOCKOPT)?
        .load()
        .map_err(prog_err(PROG_GETSOCKOPT))?;
    program::<SockOps>(ebpf, PROG_SOCKOPS)?
        .load()
        .map_err(prog_err(PROG_SOCKOPS))?;
    program::<SkMsg>(ebpf, PROG_SKMSG)?
        .load()
        .map_err(prog_err(PROG_SKMSG))?;
    program::<SkLookup>(ebpf, PROG_SK_LOOKUP)?
        .load()
        .map_err(prog_err(PROG_SK_LOOKUP))?;
    program::<SkLookup>(ebpf, PROG_SK_LOOKUP6)?
        .load()
        .map_err(prog_err(PROG_SK_LOOKUP6))?;
    program::<SchedClassifier>(ebpf, PROG_TC_INGRESS)?
        .load()
        .map_err(prog_err(PROG_TC_INGRESS))?;
    Ok(())
}
