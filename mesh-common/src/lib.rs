//! The kernel/user ABI of the mesh datapath.
//!
//! Every type here crosses the boundary between the eBPF programs (`mesh-ebpf`) and the agent
//! (`mesh-agent`): map keys and values, map names, pin layout and stable reason codes. Layouts
//! are `#[repr(C)]`, padded explicitly, and checked by `const` size assertions so that kernel
//! and user space cannot drift apart. A layout change gets a new `_vN` map name, never an
//! in-place change.
#![no_std]
#![deny(unsafe_code)]

// === Ports ===

/// Outbound capture target inside each pod's network namespace (127.0.0.1).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext listener inside each pod's network namespace.
pub const INBOUND_PORT: u16 = 15006;
/// Inbound HBONE (mTLS) port on the pod IP; never captured.
pub const HBONE_PORT: u16 = 15008;

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`, as iptables REDIRECT users know it.
pub const SO_ORIGINAL_DST: i32 = 80;
/// `SOL_IP`.
pub const SOL_IP: i32 = 0;

/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as read from a
/// `u32` field of a BPF context (network byte order).
pub const V4_MAPPED_BE: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// 127.0.0.1 in network byte order as read from a `u32` field of a BPF context.
pub const LOOPBACK_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

// === Map names ===
// Kernel object names are at most 15 bytes.

/// Original destinations by the capturing socket's cookie. connect4 writes; sockops moves the
/// entry to [`ORIG_PEER_MAP`] once the socket has a source port.
pub const ORIG_DST_MAP: &str = "ORIG_DST_V1";
/// Original destinations by the proxy-side peer (netns cookie, client address). sockops writes;
/// getsockopt reads; sockops deletes when the client socket closes.
pub const ORIG_PEER_MAP: &str = "ORIG_PEER_V1";
/// Destinations the mesh captures (mesh CIDRs, service VIPs). Agent writes; connect4 reads.
pub const CAPTURE_MAP: &str = "CAPTURE_V1";
/// Destination ports never captured (HBONE, user exclusions). Agent writes; connect4 reads.
pub const EXCLUDED_PORTS_MAP: &str = "EXCL_PORTS_V1";
/// Established app <-> proxy loopback sockets by 4-tuple. sockops writes; sk_msg reads.
pub const SOCKS_MAP: &str = "SOCKS_V1";
/// sk_msg's remaining budget (bytes it may still redirect) per sockhash socket. sockops writes;
/// sk_msg spends it and deletes the entry when the socket moves to TCP's own path for good.
pub const SOCK_BUDGET_MAP: &str = "SOCK_BUDGET_V1";
/// Enrolled pods by IPv4 address. Agent writes; sk_lookup and tc read.
pub const PODS_MAP: &str = "PODS_V1";
/// Per-pod inbound port rules ([`INBOUND_STEER`], [`INBOUND_EXCLUDE`]). Agent writes; sk_lookup
/// reads. A STRICT pod's every port is steered but for its exclusions; a PERMISSIVE pod's only
/// the ports marked [`INBOUND_STEER`]. (`INBOUND_V1` listed the captured ports of every pod.)
pub const INBOUND_MAP: &str = "INBOUND_V2";
/// Each pod's inbound listener socket, by pod IPv4. Agent writes; sk_lookup reads.
pub const LISTENERS_MAP: &str = "LISTENERS_V1";
/// Per-pod packet and byte counters. tc writes; the agent reads.
pub const POD_COUNTERS_MAP: &str = "POD_COUNT_V1";
/// Global counters by [`Counter`] index (per CPU). Every program writes; the agent reads.
pub const COUNTERS_MAP: &str = "COUNTERS_V1";
/// Flow events ([`FlowEvent`]). sk_lookup writes; the agent drains.
pub const FLOWS_MAP: &str = "FLOWS_V1";

/// Maps an earlier build pinned and this one no longer uses: removed when the datapath loads.
pub const RETIRED_MAPS: [&str; 1] = ["INBOUND_V1"];

/// Every pinned map, for inspection and cleanup.
pub const ALL_MAPS: [&str; 12] = [
    ORIG_DST_MAP,
    ORIG_PEER_MAP,
    CAPTURE_MAP,
    EXCLUDED_PORTS_MAP,
    SOCKS_MAP,
    SOCK_BUDGET_MAP,
    PODS_MAP,
    INBOUND_MAP,
    LISTENERS_MAP,
    POD_COUNTERS_MAP,
    COUNTERS_MAP,
    FLOWS_MAP,
];

// === Program names ===

pub const PROG_CONNECT4: &str = "mesh_connect4";
pub const PROG_CONNECT6: &str = "mesh_connect6";
pub const PROG_GETSOCKOPT: &str = "mesh_getsockopt";
pub const PROG_SOCKOPS: &str = "mesh_sockops";
pub const PROG_SKMSG: &str = "mesh_skmsg";
pub const PROG_SK_LOOKUP: &str = "mesh_sk_lookup";
/// Attached to STRICT pods' network namespaces only: refuses inbound IPv6 TCP.
pub const PROG_SK_LOOKUP6: &str = "mesh_sk_lookup6";
pub const PROG_TC_INGRESS: &str = "mesh_tc_ingress";

// === Global parameters (read-only data, set at load time) ===

/// Port connect4 rewrites captured connections to (u16 stored as u32).
pub const GLOBAL_OUTBOUND_PORT: &str = "OUTBOUND_PORT";
/// Non-zero: sockops inserts app <-> proxy sockets into [`SOCKS_MAP`] for sk_msg.
pub const GLOBAL_SKMSG_ENABLED: &str = "SKMSG_ENABLED";
/// Non-zero: connect6 refuses connections to native (not IPv4-mapped) IPv6 destinations other
/// than loopback (egress denied: the mesh cannot carry IPv6 yet).
pub const GLOBAL_REFUSE_NATIVE_V6: &str = "REFUSE_V6";
/// Bytes each direction of an app <-> proxy connection may hand over by sk_msg before it moves
/// to TCP's own path (u64).
pub const GLOBAL_SKMSG_BUDGET: &str = "SKMSG_BUDGET";
/// Default of [`GLOBAL_SKMSG_BUDGET`]: about what a TCP socket may buffer unread by default.
pub const DEFAULT_SKMSG_BUDGET: u64 = 4 * 1024 * 1024;

// === Map sizes ===

pub const ORIG_DST_ENTRIES: u32 = 65_536;
pub const CAPTURE_ENTRIES: u32 = 4_096;
pub const EXCLUDED_PORTS_ENTRIES: u32 = 256;
pub const SOCKS_ENTRIES: u32 = 65_536;
pub const PODS_ENTRIES: u32 = 1_024;
pub const INBOUND_ENTRIES: u32 = 16_384;
pub const FLOWS_BYTES: u32 = 256 * 1024;

// === Keys and values ===

/// An original destination: IPv4 and port, both in network byte order as they appear in
/// `sockaddr_in`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 8);

/// The client end of a captured connection as the proxy's accepted socket sees its peer.
/// Loopback addresses repeat in every pod, so the network namespace cookie is part of the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerKey {
    pub netns: u64,
    /// Client IPv4, network byte order.
    pub ip: u32,
    /// Client port, host byte order.
    pub port: u32,
}
const _: () = assert!(core::mem::size_of::<PeerKey>() == 16);

/// A socket's 4-tuple in its network namespace; key of [`SOCKS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockKey {
    pub netns: u64,
    /// Local and remote IPv4, network byte order.
    pub local_ip: u32,
    pub remote_ip: u32,
    /// Local and remote port, host byte order.
    pub local_port: u32,
    pub remote_port: u32,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 24);

impl SockKey {
    /// The key the other end of the same connection is stored under.
    pub const fn peer(&self) -> SockKey {
        SockKey {
            netns: self.netns,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Value of [`CAPTURE_MAP`]: how a matching destination is handled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CaptureRule {
    /// [`CAPTURE_REDIRECT`] or [`CAPTURE_BYPASS`] (a more specific prefix that opts out).
    pub action: u32,
}
const _: () = assert!(core::mem::size_of::<CaptureRule>() == 4);

pub const CAPTURE_REDIRECT: u32 = 1;
pub const CAPTURE_BYPASS: u32 = 2;

/// Value of [`PODS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodEntry {
    /// Network namespace cookie of the pod.
    pub netns: u64,
    /// cgroup v2 id of the pod.
    pub cgroup: u64,
    /// `POD_FLAG_*`.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PodEntry>() == 24);

/// The pod accepts plaintext inbound (PERMISSIVE) rather than only mTLS (STRICT).
pub const POD_FLAG_PERMISSIVE: u32 = 1;

/// Value of [`INBOUND_MAP`]: a declared application port, steered whatever the pod's mode.
pub const INBOUND_STEER: u32 = 1;
/// Value of [`INBOUND_MAP`]: a port the operator excluded, never steered (the application
/// answers it directly, STRICT or not).
pub const INBOUND_EXCLUDE: u32 = 2;

/// Key of [`INBOUND_MAP`]: one port of one pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InboundKey {
    /// Pod IPv4, network byte order.
    pub ip: u32,
    /// Port, host byte order.
    pub port: u32,
}
const _: () = assert!(core::mem::size_of::<InboundKey>() == 8);

/// Value of [`POD_COUNTERS_MAP`] (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<PodCounters>() == 16);

/// A flow event from the kernel: one per inbound connection attempt to an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()` at the event.
    pub ktime_ns: u64,
    /// IPv4 addresses, network byte order.
    pub src_ip: u32,
    pub dst_ip: u32,
    /// Ports, host byte order.
    pub src_port: u16,
    pub dst_port: u16,
    /// `FlowVerdict` as u32.
    pub verdict: u32,
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 24);

/// What the datapath did with a new inbound connection.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowVerdict {
    /// Steered into the proxy's inbound listener.
    Steered = 1,
    /// Mesh traffic (HBONE port): delivered as addressed.
    Mesh = 2,
    /// Port not captured: delivered as addressed.
    Passthrough = 3,
    /// Captured port of a PERMISSIVE pod, but the proxy's listener is missing: delivered as
    /// addressed (fail open).
    NoListener = 4,
    /// Captured port of a STRICT pod, but the proxy's listener is missing (agent down) or could
    /// not be selected: the connection is refused (fail closed).
    Refused = 5,
}

impl FlowVerdict {
    pub const fn from_u32(v: u32) -> Option<FlowVerdict> {
        match v {
            1 => Some(FlowVerdict::Steered),
            2 => Some(FlowVerdict::Mesh),
            3 => Some(FlowVerdict::Passthrough),
            4 => Some(FlowVerdict::NoListener),
            5 => Some(FlowVerdict::Refused),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            FlowVerdict::Steered => "steered",
            FlowVerdict::Mesh => "mesh",
            FlowVerdict::Passthrough => "passthrough",
            FlowVerdict::NoListener => "no_listener",
            FlowVerdict::Refused => "refused",
        }
    }
}

// === Counters and reason codes ===

/// Global counters: stable indexes into [`COUNTERS_MAP`]. Retired indexes are never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect4: destination captured and rewritten to the outbound listener.
    Connect4Redirected = 0,
    /// connect4: destination not in the mesh.
    Connect4NotCaptured = 1,
    /// connect4: destination port excluded.
    Connect4ExcludedPort = 2,
    /// connect4: failed to record the original destination (fail open).
    Connect4MapFull = 3,
    /// connect4: not IPv4/TCP.
    Connect4NotTcp4 = 4,
    /// sockops: original destination moved to the peer-keyed map.
    SockopsOrigDstTracked = 5,
    /// sockops: failed to record the peer-keyed original destination.
    SockopsMapError = 6,
    /// sockops: socket inserted into the sockhash.
    SockopsSockhashInsert = 7,
    /// sockops: sockhash insertion failed.
    SockopsSockhashError = 8,
    /// getsockopt: SO_ORIGINAL_DST answered.
    GetsockoptAnswered = 9,
    /// getsockopt: SO_ORIGINAL_DST asked for a socket the mesh did not capture.
    GetsockoptUnknown = 10,
    /// getsockopt: caller's buffer too small for sockaddr_in.
    GetsockoptShortBuffer = 11,
    /// sk_msg: message redirected to the peer socket.
    SkmsgRedirected = 12,
    /// sk_msg: bytes redirected to the peer socket.
    SkmsgRedirectedBytes = 13,
    /// sk_msg: peer socket not in the sockhash; message took the normal path.
    SkmsgNoPeer = 14,
    /// sk_lookup: connection steered to the inbound listener.
    SkLookupSteered = 15,
    /// sk_lookup: captured port but no listener registered (fail open).
    SkLookupNoListener = 16,
    /// sk_lookup: bpf_sk_assign failed (fail open).
    SkLookupAssignError = 17,
    /// tc: packets counted for an enrolled pod.
    TcCounted = 18,
    /// Flow event dropped: ring buffer full.
    FlowEventDropped = 19,
    /// sockops: peer-keyed original destination removed when the proxy's socket closed.
    SockopsOrigDstRemoved = 20,
    /// sockops: sk_msg acceleration switched off at load time; socket not inserted.
    SockopsSockhashDisabled = 21,
    /// sk_lookup: STRICT pod without a listener (agent down): connection refused.
    SkLookupRefusedNoListener = 22,
    /// sk_lookup6: inbound IPv6 TCP to a STRICT pod refused.
    SkLookupRefusedIpv6 = 23,
    /// connect6: IPv4-mapped destination captured and rewritten to the outbound listener.
    Connect6Redirected = 24,
    /// connect6: destination not in the mesh (native IPv6 allowed, or a mapped address not
    /// captured).
    Connect6NotCaptured = 25,
    /// connect6: IPv4-mapped destination port excluded.
    Connect6ExcludedPort = 26,
    /// connect6: failed to record the original destination (fail open).
    Connect6MapFull = 27,
    /// connect6: native IPv6 destination refused (egress denied).
    Connect6RefusedNative = 28,
    /// connect6: not TCP.
    Connect6NotTcp = 29,
    /// sk_msg: a direction of a connection moved to TCP's own path for good (budget spent, or
    /// a send found no peer).
    SkmsgFallback = 30,
    /// sk_msg: message sent on TCP's own path after the move.
    SkmsgPlain = 31,
    /// sk_msg: bytes sent on TCP's own path (the move's message included).
    SkmsgPlainBytes = 32,
}

/// Number of slots in [`COUNTERS_MAP`] (room for future counters).
pub const COUNTER_SLOTS: u32 = 64;

impl Counter {
    pub const ALL: [Counter; 33] = [
        Counter::Connect4Redirected,
        Counter::Connect4NotCaptured,
        Counter::Connect4ExcludedPort,
        Counter::Connect4MapFull,
        Counter::Connect4NotTcp4,
        Counter::SockopsOrigDstTracked,
        Counter::SockopsMapError,
        Counter::SockopsSockhashInsert,
        Counter::SockopsSockhashError,
        Counter::GetsockoptAnswered,
        Counter::GetsockoptUnknown,
        Counter::GetsockoptShortBuffer,
        Counter::SkmsgRedirected,
        Counter::SkmsgRedirectedBytes,
        Counter::SkmsgNoPeer,
        Counter::SkLookupSteered,
        Counter::SkLookupNoListener,
        Counter::SkLookupAssignError,
        Counter::TcCounted,
        Counter::FlowEventDropped,
        Counter::SockopsOrigDstRemoved,
        Counter::SockopsSockhashDisabled,
        Counter::SkLookupRefusedNoListener,
        Counter::SkLookupRefusedIpv6,
        Counter::Connect6Redirected,
        Counter::Connect6NotCaptured,
        Counter::Connect6ExcludedPort,
        Counter::Connect6MapFull,
        Counter::Connect6RefusedNative,
        Counter::Connect6NotTcp,
        Counter::SkmsgFallback,
        Counter::SkmsgPlain,
        Counter::SkmsgPlainBytes,
    ];

    /// Stable name for metrics and debugging output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Connect4Redirected => "connect4_redirected",
            Counter::Connect4NotCaptured => "connect4_not_captured",
            Counter::Connect4ExcludedPort => "connect4_excluded_port",
            Counter::Connect4MapFull => "connect4_map_full",
            Counter::Connect4NotTcp4 => "connect4_not_tcp4",
            Counter::SockopsOrigDstTracked => "sockops_orig_dst_tracked",
            Counter::SockopsMapError => "sockops_map_error",
            Counter::SockopsSockhashInsert => "sockops_sockhash_insert",
            Counter::SockopsSockhashError => "sockops_sockhash_error",
            Counter::GetsockoptAnswered => "getsockopt_answered",
            Counter::GetsockoptUnknown => "getsockopt_unknown",
            Counter::GetsockoptShortBuffer => "getsockopt_short_buffer",
            Counter::SkmsgRedirected => "skmsg_redirected",
            Counter::SkmsgRedirectedBytes => "skmsg_redirected_bytes",
            Counter::SkmsgNoPeer => "skmsg_no_peer",
            Counter::SkLookupSteered => "sk_lookup_steered",
            Counter::SkLookupNoListener => "sk_lookup_no_listener",
            Counter::SkLookupAssignError => "sk_lookup_assign_error",
            Counter::TcCounted => "tc_counted",
            Counter::FlowEventDropped => "flow_event_dropped",
            Counter::SockopsOrigDstRemoved => "sockops_orig_dst_removed",
            Counter::SockopsSockhashDisabled => "sockops_sockhash_disabled",
            Counter::SkLookupRefusedNoListener => "sk_lookup_refused_no_listener",
            Counter::SkLookupRefusedIpv6 => "sk_lookup_refused_ipv6",
            Counter::Connect6Redirected => "connect6_redirected",
            Counter::Connect6NotCaptured => "connect6_not_captured",
            Counter::Connect6ExcludedPort => "connect6_excluded_port",
            Counter::Connect6MapFull => "connect6_map_full",
            Counter::Connect6RefusedNative => "connect6_refused_native",
            Counter::Connect6NotTcp => "connect6_not_tcp",
            Counter::SkmsgFallback => "skmsg_fallback",
            Counter::SkmsgPlain => "skmsg_plain",
            Counter::SkmsgPlainBytes => "skmsg_plain_bytes",
        }
    }

    /// Counts connections the datapath let through uncaptured or unsteered because it could
    /// not do its part (a full map, a failed socket assignment): what monitoring alerts on.
    pub const fn fails_open(self) -> bool {
        matches!(
            self,
            Counter::Connect4MapFull
                | Counter::Connect6MapFull
                | Counter::SkLookupNoListener
                | Counter::SkLookupAssignError
        )
    }
}

const _: () = assert!((Counter::ALL.len() as u32) <= COUNTER_SLOTS);

// === impl aya::Pod ===

#[cfg(feature = "user")]
#[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
mod user {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers with explicit padding,
    // so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::CaptureRule {}
    unsafe impl aya::Pod for super::PodEntry {}
    unsafe impl aya::Pod for super::InboundKey {}
    unsafe impl aya::Pod for super::PodCounters {}
    unsafe impl aya::Pod for super::FlowEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_key_peer_is_an_involution() {
        let k = SockKey {
            netns: 7,
            local_ip: 1,
            remote_ip: 2,
            local_port: 3,
            remote_port: 4,
        };
        assert_eq!(k.peer().local_port, 4);
        assert_eq!(k.peer().remote_ip, 1);
        assert_eq!(k.peer().peer(), k);
    }

    #[test]
    fn counter_indexes_and_names_are_unique() {
        for (i, a) in Counter::ALL.iter().enumerate() {
            assert_eq!(*a as usize, i, "Counter::ALL is ordered by index");
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn map_names_fit_kernel_object_names() {
        for name in ALL_MAPS {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }

    #[test]
    fn flow_verdict_round_trips() {
        for v in [
            FlowVerdict::Steered,
            FlowVerdict::Mesh,
            FlowVerdict::Passthrough,
            FlowVerdict::NoListener,
            FlowVerdict::Refused,
        ] {
            assert_eq!(FlowVerdict::from_u32(v as u32), Some(v));
        }
        assert_eq!(FlowVerdict::from_u32(0), None);
    }
}
