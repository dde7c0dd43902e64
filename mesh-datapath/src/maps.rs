//! The datapath's pinned maps as people read them: what each is for, how full it is, and its
//! entries with keys and values decoded (addresses, ports, counter names).
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::{
    HashMap, LpmTrie, Map, MapData, MapInfo, MapType, PerCpuArray, PerCpuHashMap, PerCpuValues,
    SockHash,
};
use mesh_common::{
    CAPTURE_BYPASS, CAPTURE_REDIRECT, CaptureRule, Counter, InboundKey, OrigDst,
    POD_FLAG_PERMISSIVE, PeerKey, PodCounters, PodEntry, SockKey,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::Cidr;
use crate::ebpf::ip_from_key;

/// One pinned map of the datapath.
#[derive(Debug, Clone, Copy)]
pub struct MapDef {
    /// The pin (and kernel object) name.
    pub name: &'static str,
    /// The short name the commands also accept.
    pub alias: &'static str,
    /// Who writes it and who reads it.
    pub purpose: &'static str,
    /// How its keys are written on the command line.
    pub key_syntax: &'static str,
}

/// Every map of [`mesh_common::ALL_MAPS`], described.
pub const MAPS: [MapDef; 12] = [
    MapDef {
        name: mesh_common::ORIG_DST_MAP,
        alias: "orig_dst",
        purpose: "original destinations by socket cookie (connect4)",
        key_syntax: "COOKIE",
    },
    MapDef {
        name: mesh_common::ORIG_PEER_MAP,
        alias: "orig_peer",
        purpose: "original destinations by client (for getsockopt)",
        key_syntax: "NETNS/IP:PORT",
    },
    MapDef {
        name: mesh_common::CAPTURE_MAP,
        alias: "capture",
        purpose: "destination prefixes connect4 captures",
        key_syntax: "A.B.C.D/LEN",
    },
    MapDef {
        name: mesh_common::EXCLUDED_PORTS_MAP,
        alias: "excluded_ports",
        purpose: "destination ports connect4 never captures",
        key_syntax: "PORT",
    },
    MapDef {
        name: mesh_common::SOCKS_MAP,
        alias: "socks",
        purpose: "app <-> proxy sockets sk_msg redirects between",
        key_syntax: "NETNS/IP:PORT-IP:PORT",
    },
    MapDef {
        name: mesh_common::SOCK_BUDGET_MAP,
        alias: "sock_budget",
        purpose: "bytes each sockhash socket may still hand over by sk_msg",
        key_syntax: "NETNS/IP:PORT-IP:PORT",
    },
    MapDef {
        name: mesh_common::PODS_MAP,
        alias: "pods",
        purpose: "enrolled pods by IP (for sk_lookup and tc)",
        key_syntax: "IP",
    },
    MapDef {
        name: mesh_common::INBOUND_MAP,
        alias: "inbound",
        purpose: "inbound app ports sk_lookup steers to the proxy",
        key_syntax: "IP:PORT",
    },
    MapDef {
        name: mesh_common::LISTENERS_MAP,
        alias: "listeners",
        purpose: "each pod's inbound listener (for sk_lookup)",
        key_syntax: "IP",
    },
    MapDef {
        name: mesh_common::POD_COUNTERS_MAP,
        alias: "pod_counters",
        purpose: "packets and bytes into each pod (from tc)",
        key_syntax: "IP",
    },
    MapDef {
        name: mesh_common::COUNTERS_MAP,
        alias: "counters",
        purpose: "counters by reason code (every program)",
        key_syntax: "NAME|INDEX",
    },
    MapDef {
        name: mesh_common::FLOWS_MAP,
        alias: "flows",
        purpose: "inbound flow events from sk_lookup",
        key_syntax: "-",
    },
];

/// An entry keyed by a socket's 4-tuple in its network namespace (`NETNS/IP:PORT-IP:PORT`).
fn sock_entry(k: &SockKey, value: String, value_fields: serde_json::Value) -> Entry {
    let local = SocketAddrV4::new(ip_from_key(k.local_ip), k.local_port as u16);
    let remote = SocketAddrV4::new(ip_from_key(k.remote_ip), k.remote_port as u16);
    Entry {
        key: format!("{}/{local}-{remote}", k.netns),
        value,
        key_fields: json!({
            "netns": k.netns,
            "local": local.to_string(),
            "remote": remote.to_string(),
        }),
        value_fields,
    }
}

/// The map `name` names: its pin name or short name, any case, `-` for `_`, with or without
/// the `_V1` suffix.
pub fn find(name: &str) -> Option<&'static MapDef> {
    let want = name.to_ascii_lowercase().replace('-', "_");
    MAPS.iter().find(|m| {
        let pin = m.name.to_ascii_lowercase();
        let bare = pin.rsplit_once("_v").map_or(pin.as_str(), |(b, _)| b);
        want == pin || want == bare || want == m.alias
    })
}

/// The names `find` accepts, for error messages.
pub fn known() -> String {
    MAPS.iter().map(|m| m.alias).collect::<Vec<_>>().join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("open the pinned map {path}: {reason} (is the instance right? see --instance)")]
    Open { path: PathBuf, reason: String },
    #[error("read map {map}: {reason}")]
    Read { map: &'static str, reason: String },
    #[error("{map} is a ring buffer: its events are read with `mesh-agent flows`")]
    NotListable { map: &'static str },
    #[error("key {key:?} for {map}: expected {syntax}")]
    BadKey {
        map: &'static str,
        key: String,
        syntax: &'static str,
    },
}

impl MapError {
    pub fn kind(&self) -> &'static str {
        match self {
            MapError::Open { .. } => "open",
            MapError::Read { .. } => "read",
            MapError::NotListable { .. } => "not_listable",
            MapError::BadKey { .. } => "bad_key",
        }
    }
}

fn pin_path(pin_dir: &Path, map: &MapDef) -> PathBuf {
    pin_dir.join("maps").join(map.name)
}

fn open(pin_dir: &Path, map: &MapDef) -> Result<Map, MapError> {
    let path = pin_path(pin_dir, map);
    let open_err = |reason: String| MapError::Open {
        path: path.clone(),
        reason,
    };
    if !path.exists() {
        return Err(open_err("no such pin".into()));
    }
    let data = MapData::from_pin(&path).map_err(|e| open_err(e.to_string()))?;
    Map::from_map_data(data).map_err(|e| open_err(e.to_string()))
}

// === Summaries ===

/// How full one map is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapSummary {
    pub name: String,
    pub kind: String,
    /// Entries now; `None` for a ring buffer.
    pub entries: Option<u64>,
    /// Most entries it holds (for a ring buffer: bytes).
    pub capacity: u64,
    pub purpose: String,
    pub error: Option<String>,
}

/// A summary of every map of the instance pinned at `pin_dir`.
pub fn summaries(pin_dir: &Path) -> Vec<MapSummary> {
    MAPS.iter()
        .map(|m| {
            let mut s = MapSummary {
                name: m.name.to_string(),
                kind: "-".into(),
                entries: None,
                capacity: 0,
                purpose: m.purpose.to_string(),
                error: None,
            };
            match summarize(pin_dir, m) {
                Ok((kind, entries, capacity)) => {
                    s.kind = kind;
                    s.entries = entries;
                    s.capacity = capacity;
                }
                Err(e) => s.error = Some(e.to_string()),
            }
            s
        })
        .collect()
}

fn summarize(pin_dir: &Path, m: &MapDef) -> Result<(String, Option<u64>, u64), MapError> {
    let path = pin_path(pin_dir, m);
    if !path.exists() {
        return Err(MapError::Open {
            path,
            reason: "no such pin".into(),
        });
    }
    let info = MapInfo::from_pin(&path).map_err(|e| MapError::Open {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let kind = info.map_type().map_or_else(|_| "unknown".into(), kind_name);
    let entries = match info.map_type() {
        Ok(MapType::RingBuf) => None,
        Ok(MapType::Array | MapType::PerCpuArray) => Some(u64::from(info.max_entries())),
        _ => {
            let data = MapData::from_pin(&path).map_err(|e| MapError::Open {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            Some(
                count_keys(&data, info.key_size(), info.max_entries()).map_err(|e| {
                    MapError::Read {
                        map: m.name,
                        reason: e.to_string(),
                    }
                })?,
            )
        }
    };
    Ok((kind, entries, u64::from(info.max_entries())))
}

fn kind_name(t: MapType) -> String {
    match t {
        MapType::Hash => "hash",
        MapType::LruHash => "lru_hash",
        MapType::LpmTrie => "lpm_trie",
        MapType::SockHash => "sockhash",
        MapType::PerCpuHash => "percpu_hash",
        MapType::PerCpuArray => "percpu_array",
        MapType::Array => "array",
        MapType::RingBuf => "ringbuf",
        _ => "other",
    }
    .to_string()
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The `map_elem` member of `union bpf_attr`, as `BPF_MAP_GET_NEXT_KEY` reads it.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// Counts the keys of any keyed map, whatever their type (walks at most `max + 1` keys, in
/// case entries come and go during the walk).
fn count_keys(map: &MapData, key_size: u32, max: u32) -> std::io::Result<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let size = key_size as usize;
    let mut key = vec![0u8; size];
    let mut next = vec![0u8; size];
    let mut first = true;
    let mut n = 0u64;
    while n <= u64::from(max) {
        let mut attr = NextKeyAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: the kernel reads `key_size` bytes at `key` (or none for the first key) and
        // writes `key_size` bytes at `next_key`; both buffers are that long and outlive the
        // call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &mut attr as *mut NextKeyAttr,
                std::mem::size_of::<NextKeyAttr>() as libc::c_uint,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(n);
            }
            return Err(e);
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(n)
}

// === Entries ===

/// One decoded entry: its key as the command line writes it, its value in words, and both
/// as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub value: String,
    pub key_fields: serde_json::Value,
    pub value_fields: serde_json::Value,
}

/// Every entry of `map`, keys in the map's order.
pub fn entries(pin_dir: &Path, map: &MapDef) -> Result<Vec<Entry>, MapError> {
    let m = open(pin_dir, map)?;
    let read = |e: aya::maps::MapError| MapError::Read {
        map: map.name,
        reason: e.to_string(),
    };
    let name = map.name;
    let mut out = Vec::new();
    match name {
        mesh_common::ORIG_DST_MAP => {
            let h: HashMap<MapData, u64, OrigDst> = m.try_into().map_err(read)?;
            for item in h.iter() {
                let (cookie, dst) = item.map_err(read)?;
                out.push(entry(
                    cookie.to_string(),
                    json!({ "cookie": cookie }),
                    orig_dst(dst),
                ));
            }
        }
        mesh_common::ORIG_PEER_MAP => {
            let h: HashMap<MapData, PeerKey, OrigDst> = m.try_into().map_err(read)?;
            for item in h.iter() {
                let (k, dst) = item.map_err(read)?;
                let client = SocketAddrV4::new(ip_from_key(k.ip), k.port as u16);
                out.push(entry(
                    format!("{}/{client}", k.netns),
                    json!({ "netns": k.netns, "client": client.to_string() }),
                    orig_dst(dst),
                ));
            }
        }
        mesh_common::CAPTURE_MAP => {
            let t: LpmTrie<MapData, u32, CaptureRule> = m.try_into().map_err(read)?;
            for item in t.iter() {
                let (k, rule) = item.map_err(read)?;
                let cidr = Cidr {
                    addr: ip_from_key(k.data()),
                    len: k.prefix_len() as u8,
                };
                let action = match rule.action {
                    CAPTURE_REDIRECT => "redirect",
                    CAPTURE_BYPASS => "bypass",
                    _ => "unknown",
                };
                out.push(Entry {
                    key: cidr.to_string(),
                    value: action.to_string(),
                    key_fields: json!({ "prefix": cidr.to_string() }),
                    value_fields: json!({ "action": action }),
                });
            }
        }
        mesh_common::EXCLUDED_PORTS_MAP => {
            let h: HashMap<MapData, u32, u32> = m.try_into().map_err(read)?;
            for item in h.iter() {
                let (port, _) = item.map_err(read)?;
                out.push(Entry {
                    key: port.to_string(),
                    value: "never captured".into(),
                    key_fields: json!({ "port": port }),
                    value_fields: json!({}),
                });
            }
        }
        mesh_common::SOCK_BUDGET_MAP => {
            let h: HashMap<MapData, SockKey, u64> = m.try_into().map_err(read)?;
            for item in h.iter() {
                let (k, left) = item.map_err(read)?;
                out.push(sock_entry(
                    &k,
                    format!("{left} bytes left"),
                    json!({ "bytes_left": left }),
                ));
            }
        }
        mesh_common::SOCKS_MAP => {
            let h: SockHash<MapData, SockKey> = m.try_into().map_err(read)?;
            for k in h.keys() {
                let k = k.map_err(read)?;
                out.push(sock_entry(&k, "socket".into(), json!({})));
            }
        }
        mesh_common::PODS_MAP => {
            let h: HashMap<MapData, u32, PodEntry> = m.try_into().map_err(read)?;
            for item in h.iter() {
                let (ip, pod) = item.map_err(read)?;
                let mode = if pod.flags & POD_FLAG_PERMISSIVE != 0 {
                    "PERMISSIVE"
                } else {
                    "STRICT"
                };
                out.push(Entry {
                    key: ip_from_key(ip).to_string(),
                    value: format!("netns {} cgroup {} {mode}", pod.netns, pod.cgroup),
                    key_fields: json!({ "ip": ip_from_key(ip).to_string() }),
                    value_fields: json!({
                        "netns_cookie": pod.netns,
                        "cgroup_id": pod.cgroup,
                        "mode": mode,
                    }),
                });
            }
        }
        mesh_common::INBOUND_MAP => {
            let h: HashMap<MapData, InboundKey, u32> = m.try_into().map_err(read)?;
            for item in h.iter() {
                let (k, _) = item.map_err(read)?;
                let addr = SocketAddrV4::new(ip_from_key(k.ip), k.port as u16);
                out.push(Entry {
                    key: addr.to_string(),
                    value: "steered to the proxy".into(),
                    key_fields: json!({ "ip": addr.ip().to_string(), "port": addr.port() }),
                    value_fields: json!({}),
                });
            }
        }
        mesh_common::LISTENERS_MAP => {
            let h: SockHash<MapData, u32> = m.try_into().map_err(read)?;
            for k in h.keys() {
                let ip = ip_from_key(k.map_err(read)?);
                out.push(Entry {
                    key: ip.to_string(),
                    value: "inbound listener socket".into(),
                    key_fields: json!({ "ip": ip.to_string() }),
                    value_fields: json!({}),
                });
            }
        }
        mesh_common::POD_COUNTERS_MAP => {
            let h: PerCpuHashMap<MapData, u32, PodCounters> = m.try_into().map_err(read)?;
            for item in h.iter() {
                let (ip, per_cpu) = item.map_err(read)?;
                let (packets, bytes) = per_cpu
                    .iter()
                    .fold((0, 0), |(p, b), c| (p + c.rx_packets, b + c.rx_bytes));
                out.push(Entry {
                    key: ip_from_key(ip).to_string(),
                    value: format!("rx {packets} packets, {bytes} bytes"),
                    key_fields: json!({ "ip": ip_from_key(ip).to_string() }),
                    value_fields: json!({ "rx_packets": packets, "rx_bytes": bytes }),
                });
            }
        }
        mesh_common::COUNTERS_MAP => {
            let a: PerCpuArray<MapData, u64> = m.try_into().map_err(read)?;
            for c in Counter::ALL {
                let v: PerCpuValues<u64> = a.get(&(c as u32), 0).map_err(read)?;
                let sum: u64 = v.iter().sum();
                out.push(Entry {
                    key: c.name().to_string(),
                    value: sum.to_string(),
                    key_fields: json!({ "index": c as u32, "name": c.name() }),
                    value_fields: json!({ "value": sum }),
                });
            }
        }
        _ => return Err(MapError::NotListable { map: name }),
    }
    if name != mesh_common::COUNTERS_MAP {
        out.sort_by(|a, b| a.key.cmp(&b.key));
    }
    Ok(out)
}

fn entry(key: String, key_fields: serde_json::Value, dst: (String, serde_json::Value)) -> Entry {
    Entry {
        key,
        value: dst.0,
        key_fields,
        value_fields: dst.1,
    }
}

fn orig_dst(d: OrigDst) -> (String, serde_json::Value) {
    let addr = SocketAddrV4::new(ip_from_key(d.ip), u16::from_be(d.port));
    (
        format!("original destination {addr}"),
        json!({ "original_dst": addr.to_string() }),
    )
}

/// The key `key` written the way [`entries`] writes the keys of `map`.
pub fn canonical_key(map: &MapDef, key: &str) -> Result<String, MapError> {
    let bad = || MapError::BadKey {
        map: map.name,
        key: key.to_string(),
        syntax: map.key_syntax,
    };
    let addr = |s: &str| s.parse::<SocketAddrV4>().map_err(|_| bad());
    let canon = match map.name {
        mesh_common::ORIG_DST_MAP => key.parse::<u64>().map_err(|_| bad())?.to_string(),
        mesh_common::ORIG_PEER_MAP => {
            let (netns, client) = key.split_once('/').ok_or_else(bad)?;
            let netns: u64 = netns.parse().map_err(|_| bad())?;
            format!("{netns}/{}", addr(client)?)
        }
        mesh_common::CAPTURE_MAP => key.parse::<Cidr>().map_err(|_| bad())?.to_string(),
        mesh_common::EXCLUDED_PORTS_MAP => key.parse::<u16>().map_err(|_| bad())?.to_string(),
        mesh_common::SOCKS_MAP | mesh_common::SOCK_BUDGET_MAP => {
            let (netns, pair) = key.split_once('/').ok_or_else(bad)?;
            let netns: u64 = netns.parse().map_err(|_| bad())?;
            let (l, r) = pair.split_once('-').ok_or_else(bad)?;
            format!("{netns}/{}-{}", addr(l)?, addr(r)?)
        }
        mesh_common::PODS_MAP | mesh_common::LISTENERS_MAP | mesh_common::POD_COUNTERS_MAP => {
            key.parse::<Ipv4Addr>().map_err(|_| bad())?.to_string()
        }
        mesh_common::INBOUND_MAP => addr(key)?.to_string(),
        mesh_common::COUNTERS_MAP => {
            let by_index = key
                .parse::<u32>()
                .ok()
                .and_then(|i| Counter::ALL.iter().find(|c| **c as u32 == i));
            let by_name = Counter::ALL.iter().find(|c| c.name() == key);
            by_name.or(by_index).ok_or_else(bad)?.name().to_string()
        }
        _ => return Err(MapError::NotListable { map: map.name }),
    };
    Ok(canon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_found_by_pin_name_bare_name_or_alias() {
        for name in ["PODS_V1", "pods_v1", "PODS", "pods"] {
            assert_eq!(find(name).map(|m| m.name), Some("PODS_V1"), "{name}");
        }
        assert_eq!(find("pod-counters").map(|m| m.name), Some("POD_COUNT_V1"));
        assert_eq!(find("EXCL_PORTS").map(|m| m.name), Some("EXCL_PORTS_V1"));
        assert!(find("nope").is_none());
        assert_eq!(MAPS.len(), mesh_common::ALL_MAPS.len());
        for name in mesh_common::ALL_MAPS {
            assert!(find(name).is_some(), "{name} is not described");
        }
    }

    #[test]
    fn keys_are_checked_and_written_the_way_entries_are() {
        let key = |map: &str, k: &str| canonical_key(find(map).expect("map"), k);
        assert_eq!(key("pods", "10.0.0.1").expect("ip"), "10.0.0.1");
        assert_eq!(
            key("capture", "10.96.1.2/16").expect("cidr"),
            "10.96.0.0/16"
        );
        assert_eq!(key("counters", "15").expect("index"), "sk_lookup_steered");
        assert_eq!(
            key("counters", "connect4_redirected").expect("name"),
            "connect4_redirected"
        );
        assert_eq!(
            key("socks", "7/127.0.0.1:15001-127.0.0.1:40000").expect("tuple"),
            "7/127.0.0.1:15001-127.0.0.1:40000"
        );
        let e = key("inbound", "10.0.0.1").expect_err("no port");
        assert_eq!(e.kind(), "bad_key");
        assert!(e.to_string().contains("IP:PORT"), "{e}");
        assert_eq!(key("flows", "x").expect_err("ring").kind(), "not_listable");
    }
}
