//! The datapath's parameters and the pods it enrolls, as plain values, validated.
use std::{fmt, net::Ipv4Addr, path::PathBuf, str::FromStr};

use serde::Serialize;

/// Where everything of the mesh is pinned.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/mesh";

/// A datapath parameter or pod the datapath cannot take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("instance name {0:?}: use 1-32 characters of [a-z0-9-]")]
    Instance(String),
    #[error("pod spec {spec:?}: {reason}")]
    Pod { spec: String, reason: String },
    #[error("CIDR {0:?}: expected a.b.c.d/len with len <= 32")]
    Cidr(String),
    #[error("two pods share the IP {0}")]
    DuplicateIp(Ipv4Addr),
    #[error("two pods share the name {0}")]
    DuplicateName(String),
}

impl ConfigError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigError::Instance(_) => "instance",
            ConfigError::Pod { .. } => "pod",
            ConfigError::Cidr(_) => "cidr",
            ConfigError::DuplicateIp(_) => "duplicate_ip",
            ConfigError::DuplicateName(_) => "duplicate_name",
        }
    }
}

/// Checks an instance name: it becomes a bpffs directory and part of cgroup names.
pub fn validate_instance(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Instance(name.into()))
    }
}

/// Default cap on the inbound port entries of one pod (the node-wide map holds
/// `mesh_common::INBOUND_ENTRIES`).
pub const DEFAULT_MAX_INBOUND_PORTS: usize = 64;

/// The datapath's parameters.
#[derive(Debug, Clone, Serialize)]
pub struct DatapathConfig {
    /// Name of this agent's pinned state: /sys/fs/bpf/mesh/<instance>/.
    pub instance: String,
    /// Root of the pins (default /sys/fs/bpf/mesh).
    pub bpffs_root: PathBuf,
    /// Port connect4 rewrites captured connections to.
    pub outbound_port: u16,
    /// Port of the proxy's in-pod inbound listener.
    pub inbound_port: u16,
    /// sk_msg acceleration of the app <-> proxy hop.
    pub skmsg: bool,
    /// Bytes each direction of an app <-> proxy connection may hand over by sk_msg before it
    /// moves to TCP's own path for good (which bounds what may wait unread in the kernel).
    pub skmsg_budget: u64,
    /// Destinations captured (mesh pod CIDRs, service VIPs).
    pub capture: Vec<Cidr>,
    /// Destination ports never captured (15008 always).
    pub excluded_ports: Vec<u16>,
    /// Most inbound port entries (declared plus excluded ports) one pod may take in the
    /// node-wide inbound map; a pod asking for more is refused enrollment.
    pub max_inbound_ports: usize,
    /// connect6 refuses native IPv6 destinations (set when egress is denied: the mesh carries
    /// IPv4 only, so IPv6 would leave the pod unchecked).
    pub refuse_native_ipv6: bool,
}

impl DatapathConfig {
    pub fn new(instance: &str) -> Result<DatapathConfig, ConfigError> {
        validate_instance(instance)?;
        Ok(DatapathConfig {
            instance: instance.into(),
            bpffs_root: PathBuf::from(BPFFS_ROOT),
            outbound_port: mesh_common::OUTBOUND_PORT,
            inbound_port: mesh_common::INBOUND_PORT,
            skmsg: true,
            skmsg_budget: mesh_common::DEFAULT_SKMSG_BUDGET,
            capture: Vec::new(),
            excluded_ports: Vec::new(),
            max_inbound_ports: DEFAULT_MAX_INBOUND_PORTS,
            refuse_native_ipv6: false,
        })
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs_root.join(&self.instance)
    }
}

/// An IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl FromStr for Cidr {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Cidr, ConfigError> {
        let err = || ConfigError::Cidr(s.into());
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().map_err(|_| err())?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        if len > 32 {
            return Err(err());
        }
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Ok(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Inbound policy mode of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    #[default]
    Strict,
    Permissive,
}

/// A pod to enroll: its cgroup v2 directory, its network namespace and its address.
///
/// On the command line: `name=NS/POD,cgroup=PATH,netns=PATH,ip=A.B.C.D[,iface=eth0]
/// [,inbound=8080+9090][,exclude=9100+9101][,mode=permissive]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodSpec {
    pub name: String,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    /// The pod's interface to its node (tc counters).
    pub iface: String,
    /// Declared application ports. A PERMISSIVE pod's inbound TCP is steered to the proxy on
    /// these only; a STRICT pod's on every port.
    pub inbound_ports: Vec<u16>,
    /// Ports the operator excluded (`mesh.io/exclude-inbound-ports`): never steered, the
    /// application answers them directly whatever the mode.
    pub excluded_inbound_ports: Vec<u16>,
    pub mode: Mode,
}

impl PodSpec {
    /// A name usable as a bpffs directory (no '/' and no '.'), unique per pod name.
    pub fn pin_name(&self) -> String {
        pin_name(&self.name)
    }
}

pub fn pin_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // FNV-1a of the exact name keeps names that differ only in replaced characters apart.
    let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    format!("{clean}-{hash:08x}")
}

impl FromStr for PodSpec {
    type Err = ConfigError;
    fn from_str(spec: &str) -> Result<PodSpec, ConfigError> {
        let err = |reason: &str| ConfigError::Pod {
            spec: spec.into(),
            reason: reason.into(),
        };
        let (mut name, mut cgroup, mut netns, mut ip) = (None, None, None, None);
        let mut iface = "eth0".to_string();
        let mut inbound_ports = Vec::new();
        let mut excluded_inbound_ports = Vec::new();
        let mut mode = Mode::Strict;
        for field in spec.split(',') {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| err(&format!("field {field:?} is not key=value")))?;
            match k {
                "name" => {
                    let ok = v
                        .split_once('/')
                        .is_some_and(|(n, p)| !n.is_empty() && !p.is_empty() && !p.contains('/'));
                    if !ok {
                        return Err(err("name must be NAMESPACE/POD"));
                    }
                    name = Some(v.to_string());
                }
                "cgroup" => cgroup = Some(PathBuf::from(v)),
                "netns" => netns = Some(PathBuf::from(v)),
                "ip" => {
                    ip = Some(
                        v.parse::<Ipv4Addr>()
                            .map_err(|_| err(&format!("ip {v:?} is not an IPv4 address")))?,
                    )
                }
                "iface" => iface = v.to_string(),
                "inbound" => {
                    for p in v.split('+').filter(|p| !p.is_empty()) {
                        let port: u16 =
                            p.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                                err(&format!("inbound port {p:?} is not 1-65535"))
                            })?;
                        if port == mesh_common::HBONE_PORT {
                            return Err(err("port 15008 carries mTLS and cannot be captured"));
                        }
                        inbound_ports.push(port);
                    }
                }
                "exclude" => {
                    for p in v.split('+').filter(|p| !p.is_empty()) {
                        let port: u16 =
                            p.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                                err(&format!("excluded port {p:?} is not 1-65535"))
                            })?;
                        excluded_inbound_ports.push(port);
                    }
                }
                "mode" => {
                    mode = match v.to_ascii_lowercase().as_str() {
                        "strict" => Mode::Strict,
                        "permissive" => Mode::Permissive,
                        _ => return Err(err("mode must be strict or permissive")),
                    }
                }
                other => return Err(err(&format!("unknown field {other:?}"))),
            }
        }
        let cgroup = cgroup.ok_or_else(|| err("missing cgroup="))?;
        if !cgroup.is_absolute() {
            return Err(err("cgroup must be an absolute path"));
        }
        let netns = netns.ok_or_else(|| err("missing netns="))?;
        if !netns.is_absolute() {
            return Err(err("netns must be an absolute path"));
        }
        Ok(PodSpec {
            name: name.ok_or_else(|| err("missing name="))?,
            cgroup,
            netns,
            ip: ip.ok_or_else(|| err("missing ip="))?,
            iface,
            inbound_ports,
            excluded_inbound_ports,
            mode,
        })
    }
}

/// Rejects pod sets the datapath cannot represent (its maps are keyed by pod IP).
pub fn validate_pods(pods: &[PodSpec]) -> Result<(), ConfigError> {
    for (i, a) in pods.iter().enumerate() {
        for b in &pods[i + 1..] {
            if a.ip == b.ip {
                return Err(ConfigError::DuplicateIp(a.ip));
            }
            if a.name == b.name {
                return Err(ConfigError::DuplicateName(a.name.clone()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_pod_spec() {
        let p: PodSpec = "name=default/web-0,cgroup=/sys/fs/cgroup/pod1,netns=/run/netns/p1,\
                          ip=10.1.0.5,iface=veth0,inbound=8080+9090,mode=permissive"
            .parse()
            .expect("valid spec");
        assert_eq!(p.name, "default/web-0");
        assert_eq!(p.ip, Ipv4Addr::new(10, 1, 0, 5));
        assert_eq!(p.iface, "veth0");
        assert_eq!(p.inbound_ports, vec![8080, 9090]);
        assert_eq!(p.mode, Mode::Permissive);
    }

    #[test]
    fn rejects_bad_pod_specs_with_reasons() {
        let cases = [
            ("name=a/b,cgroup=/c,netns=/n", "missing ip"),
            ("name=ab,cgroup=/c,netns=/n,ip=10.0.0.1", "NAMESPACE/POD"),
            ("name=a/b,cgroup=c,netns=/n,ip=10.0.0.1", "absolute"),
            ("name=a/b,cgroup=/c,netns=/n,ip=10.0.0.300", "not an IPv4"),
            (
                "name=a/b,cgroup=/c,netns=/n,ip=10.0.0.1,inbound=15008",
                "15008",
            ),
            (
                "name=a/b,cgroup=/c,netns=/n,ip=10.0.0.1,inbound=0",
                "1-65535",
            ),
            (
                "name=a/b,cgroup=/c,netns=/n,ip=10.0.0.1,colour=red",
                "unknown field",
            ),
            (
                "name=a/b,cgroup=/c,netns=/n,ip=10.0.0.1,mode=lax",
                "strict or permissive",
            ),
            ("garbage", "not key=value"),
        ];
        for (spec, want) in cases {
            let e = spec.parse::<PodSpec>().expect_err(spec).to_string();
            assert!(e.contains(want), "{spec}: {e} lacks {want:?}");
        }
    }

    #[test]
    fn cidrs_are_normalised_and_checked() {
        let c: Cidr = "10.1.2.3/16".parse().expect("valid");
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert_eq!("10.0.0.1".parse::<Cidr>().expect("host").len, 32);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0/8".parse::<Cidr>().is_err());
        assert_eq!("0.0.0.0/0".parse::<Cidr>().expect("any").len, 0);
    }

    #[test]
    fn pin_names_have_no_dots_or_slashes_and_stay_distinct() {
        let a = pin_name("ns/a.b");
        let b = pin_name("ns/a_b");
        assert!(!a.contains('.') && !a.contains('/'));
        assert_ne!(a, b);
    }

    #[test]
    fn instance_names_are_checked() {
        assert!(validate_instance("node-1").is_ok());
        for bad in ["", "Node", "a/b", "a.b", &"x".repeat(33)] {
            assert!(validate_instance(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn duplicate_pod_ips_are_rejected() {
        let a: PodSpec = "name=a/a,cgroup=/c,netns=/n,ip=10.0.0.1"
            .parse()
            .expect("a");
        let mut b = a.clone();
        b.name = "a/b".into();
        assert_eq!(
            validate_pods(&[a, b]),
            Err(ConfigError::DuplicateIp(Ipv4Addr::new(10, 0, 0, 1)))
        );
    }
}
