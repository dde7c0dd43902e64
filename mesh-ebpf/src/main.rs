//! The mesh's kernel programs, one object embedded in the agent.
//!
//! - `mesh_connect4` (cgroup/connect4, pod cgroups): captures connections to mesh destinations
//!   by rewriting them to the proxy's outbound listener on 127.0.0.1 in the pod's own netns.
//! - `mesh_connect6` (cgroup/connect6, pod cgroups): the same for IPv4-mapped destinations of
//!   dual-stack sockets (`::ffff:a.b.c.d`, rewritten to `::ffff:127.0.0.1`); refuses native
//!   IPv6 destinations when egress is denied.
//! - `mesh_sockops` (sockops, pod and agent cgroups): tracks original destinations by the
//!   client's address once it has a port, and puts app <-> proxy sockets into a sockhash.
//! - `mesh_skmsg` (sk_msg on the sockhash): hands each send of the application straight to
//!   the proxy's socket, up to a byte budget; past it (or once any send took the normal path)
//!   the application's sends stay on TCP's own path for good, which has flow control (see
//!   `mesh_skmsg`). The proxy's sends always take TCP's path (see `Sends::Plain`).
//! - `mesh_getsockopt` (cgroup/getsockopt, agent cgroup): answers `SO_ORIGINAL_DST`.
//! - `mesh_sk_lookup` (sk_lookup, pod netns): steers inbound TCP into the proxy's inbound
//!   listener (every port of a STRICT pod but its exclusions, the declared ports of a
//!   PERMISSIVE one); emits a flow event per connection attempt. A STRICT pod whose listener
//!   is gone (agent down) refuses the connection: it fails closed.
//! - `mesh_sk_lookup6` (sk_lookup, STRICT pods' netns only): refuses inbound IPv6 TCP, which
//!   the mesh cannot carry yet.
//! - `mesh_tc_ingress` (tc ingress, pod interface): per-pod packet and byte counters.
//!
//! connect4/6, getsockopt and sk_msg fail open: an internal error never breaks the
//! application's connection, it only bypasses the mesh and is counted. sk_lookup fails open
//! for PERMISSIVE pods and closed for STRICT ones.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, TC_ACT_OK, bpf_sock, sk_action,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, cgroup_sockopt, classifier, map, sk_lookup, sk_msg, sock_ops},
    maps::{
        HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash, lpm_trie::Key,
    },
    programs::{
        SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext, TcContext,
    },
};
use mesh_common::{
    CAPTURE_ENTRIES, CAPTURE_REDIRECT, COUNTER_SLOTS, CaptureRule, Counter, EXCLUDED_PORTS_ENTRIES,
    FLOWS_BYTES, FlowEvent, FlowVerdict, HBONE_PORT, INBOUND_ENTRIES, INBOUND_EXCLUDE,
    INBOUND_STEER, InboundKey, LOOPBACK_BE, ORIG_DST_ENTRIES, OrigDst, POD_FLAG_PERMISSIVE,
    PODS_ENTRIES, PeerKey, PodCounters, PodEntry, SO_ORIGINAL_DST, SOCKS_ENTRIES, SOL_IP, SockKey,
    V4_MAPPED_BE,
};

// === Parameters (read-only, set by the agent at load time) ===

#[unsafe(no_mangle)]
static OUTBOUND_PORT: Global<u32> = Global::new(mesh_common::OUTBOUND_PORT as u32);
#[unsafe(no_mangle)]
static SKMSG_ENABLED: Global<u32> = Global::new(1);
#[unsafe(no_mangle)]
static REFUSE_V6: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKMSG_BUDGET: Global<u64> = Global::new(mesh_common::DEFAULT_SKMSG_BUDGET);

// === Maps ===

/// connect4 writes (socket cookie -> original destination); sockops reads and deletes.
#[map(name = "ORIG_DST_V1")]
static ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);
/// sockops writes (client address -> original destination); getsockopt reads; sockops deletes.
#[map(name = "ORIG_PEER_V1")]
static ORIG_PEER: LruHashMap<PeerKey, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);
/// The agent writes mesh CIDRs and VIPs; connect4 reads.
#[map(name = "CAPTURE_V1")]
static CAPTURE: LpmTrie<u32, CaptureRule> =
    LpmTrie::pinned(CAPTURE_ENTRIES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);
/// The agent writes excluded destination ports (host order); connect4 reads.
#[map(name = "EXCL_PORTS_V1")]
static EXCLUDED_PORTS: HashMap<u32, u32> = HashMap::pinned(EXCLUDED_PORTS_ENTRIES, 0);
/// sockops writes app <-> proxy sockets; sk_msg reads.
#[map(name = "SOCKS_V1")]
static SOCKS: SockHash<SockKey> = SockHash::pinned(SOCKS_ENTRIES, 0);
/// sockops writes each sockhash socket's sk_msg budget (bytes it may still redirect); sk_msg
/// spends it and deletes the entry when the socket's sends move to TCP's own path for good.
#[map(name = "SOCK_BUDGET_V1")]
static BUDGET: LruHashMap<SockKey, u64> = LruHashMap::pinned(SOCKS_ENTRIES, 0);
/// The agent writes enrolled pods by IPv4; sk_lookup and tc read.
#[map(name = "PODS_V1")]
static PODS: HashMap<u32, PodEntry> = HashMap::pinned(PODS_ENTRIES, 0);
/// The agent writes per-pod port rules (`INBOUND_STEER`, `INBOUND_EXCLUDE`); sk_lookup reads.
#[map(name = "INBOUND_V2")]
static INBOUND: HashMap<InboundKey, u32> = HashMap::pinned(INBOUND_ENTRIES, 0);
/// The agent writes each pod's inbound listener (by pod IPv4); sk_lookup reads.
#[map(name = "LISTENERS_V1")]
static LISTENERS: SockHash<u32> = SockHash::pinned(PODS_ENTRIES, 0);
/// tc writes per-pod counters (the agent creates the entry at enrollment); the agent reads.
#[map(name = "POD_COUNT_V1")]
static POD_COUNTERS: PerCpuHashMap<u32, PodCounters> = PerCpuHashMap::pinned(PODS_ENTRIES, 0);
/// Every program counts here by `Counter`; the agent reads.
#[map(name = "COUNTERS_V1")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);
/// sk_lookup writes flow events; the agent drains.
#[map(name = "FLOWS_V1")]
static FLOWS: RingBuf = RingBuf::pinned(FLOWS_BYTES, 0);

#[inline(always)]
fn count(counter: Counter) {
    add(counter, 1);
}

#[inline(always)]
fn add(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, exclusively ours for the duration of this program run.
        unsafe { *slot += n };
    }
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const TCP_CLOSE: u32 = 7;
const ENOENT: i32 = 2;

// === connect4 ===

/// Verdict 1: let the connect proceed (rewritten or not).
#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    count(try_connect4(&ctx));
    1
}

fn try_connect4(ctx: &SockAddrContext) -> Counter {
    // SAFETY: the context pointer is valid for the program's run; fields read and written are
    // the ones the verifier allows for connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_family != AF_INET || sa.type_ != SOCK_STREAM {
        return Counter::Connect4NotTcp4;
    }
    match capture(ctx, sa.user_ip4, sa.user_port as u16) {
        Capture::NotCaptured => Counter::Connect4NotCaptured,
        Capture::ExcludedPort => Counter::Connect4ExcludedPort,
        Capture::MapFull => Counter::Connect4MapFull,
        Capture::Recorded => {
            sa.user_ip4 = LOOPBACK_BE;
            sa.user_port = (OUTBOUND_PORT.load() as u16).to_be() as u32;
            Counter::Connect4Redirected
        }
    }
}

enum Capture {
    NotCaptured,
    ExcludedPort,
    MapFull,
    /// The original destination is recorded: rewrite the connect to the outbound listener.
    Recorded,
}

/// Decides whether a connect to `ip`:`port_be` (network order) is captured, and if so records
/// its original destination under the socket's cookie.
#[inline(always)]
fn capture(ctx: &SockAddrContext, ip: u32, port_be: u16) -> Capture {
    let port = u16::from_be(port_be);
    let key = Key::new(32, ip);
    match CAPTURE.get(&key) {
        Some(rule) if rule.action == CAPTURE_REDIRECT => {}
        _ => return Capture::NotCaptured,
    }
    if port == HBONE_PORT || EXCLUDED_PORTS.get_ptr(&(port as u32)).is_some() {
        return Capture::ExcludedPort;
    }
    // SAFETY: bpf_get_socket_cookie is allowed for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = OrigDst {
        ip,
        port: port_be,
        _pad: 0,
    };
    if ORIG_DST.insert(&cookie, &orig, 0).is_err() {
        // Fail open: without the original destination the proxy could not forward.
        return Capture::MapFull;
    }
    Capture::Recorded
}

// === connect6 ===

/// Verdict 1 (proceed, rewritten or not) except for a native IPv6 destination while egress
/// is denied: 0, the application's connect fails with EPERM.
#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let counter = try_connect6(&ctx);
    count(counter);
    if counter == Counter::Connect6RefusedNative {
        0
    } else {
        1
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Counter {
    // SAFETY: the context pointer is valid for the program's run; fields read and written are
    // the ones the verifier allows for connect6.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_family != AF_INET6 || sa.type_ != SOCK_STREAM {
        return Counter::Connect6NotTcp;
    }
    // 32-bit loads: the verifier allows no other width on user_ip6.
    let w0 = sa.user_ip6[0];
    let w1 = sa.user_ip6[1];
    let w2 = sa.user_ip6[2];
    let w3 = sa.user_ip6[3];
    if w0 == 0 && w1 == 0 && w2 == V4_MAPPED_BE {
        // A dual-stack socket reaching an IPv4 destination: captured exactly like connect4.
        return match capture(ctx, w3, sa.user_port as u16) {
            Capture::NotCaptured => Counter::Connect6NotCaptured,
            Capture::ExcludedPort => Counter::Connect6ExcludedPort,
            Capture::MapFull => Counter::Connect6MapFull,
            Capture::Recorded => {
                sa.user_ip6[3] = LOOPBACK_BE;
                sa.user_port = (OUTBOUND_PORT.load() as u16).to_be() as u32;
                Counter::Connect6Redirected
            }
        };
    }
    let loopback = w0 == 0 && w1 == 0 && w2 == 0 && w3 == u32::from_ne_bytes([0, 0, 0, 1]);
    if !loopback && REFUSE_V6.load() != 0 {
        return Counter::Connect6RefusedNative;
    }
    Counter::Connect6NotCaptured
}

// === sockops ===

/// Verdict 1: sockops return values are advisory; the connection is never affected.
#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    if let Some(counter) = try_sockops(&ctx) {
        count(counter);
    }
    1
}

fn try_sockops(ctx: &SockOpsContext) -> Option<Counter> {
    // AF_INET6: a dual-stack client captured by connect6 (to ::ffff:127.0.0.1); its IPv4 view
    // (local_ip4, remote_ip4) is what the proxy's AF_INET socket sees. Only the active side
    // can be such a socket: the proxy's listeners are AF_INET.
    let family = ctx.family();
    if family != AF_INET && !(family == AF_INET6 && ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
    {
        return None;
    }
    let outbound_port = OUTBOUND_PORT.load();
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // Client side of a captured connection: move its original destination to the key
            // the proxy's accepted socket will see as its peer.
            // SAFETY: allowed helpers for sock_ops; the pointer is the program's context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            // SAFETY: the pointer returned by the map lookup is valid during this run.
            let orig = unsafe { *ORIG_DST.get_ptr(&cookie)? };
            let _ = ORIG_DST.remove(&cookie);
            let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
            let key = PeerKey {
                netns,
                ip: ctx.local_ip4(),
                port: ctx.local_port(),
            };
            if ORIG_PEER.insert(&key, &orig, 0).is_err() {
                return Some(Counter::SockopsMapError);
            }
            count(Counter::SockopsOrigDstTracked);
            if remote_port(ctx) == outbound_port && ctx.remote_ip4() == LOOPBACK_BE {
                return Some(insert_sock(ctx, netns, Sends::Redirect));
            }
            None
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // Proxy side: an accepted connection on the outbound listener from pod loopback.
            // The peer-keyed original destination lives as long as this socket: learn when it
            // closes. (The client may close first, before the proxy has asked for it.)
            if ctx.local_port() == outbound_port && ctx.local_ip4() == LOOPBACK_BE {
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
                // SAFETY: allowed helper for sock_ops.
                let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
                return Some(insert_sock(ctx, netns, Sends::Plain));
            }
            None
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == TCP_CLOSE && ctx.local_port() == outbound_port {
                // SAFETY: allowed helper for sock_ops.
                let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
                let key = PeerKey {
                    netns,
                    ip: ctx.remote_ip4(),
                    port: remote_port(ctx),
                };
                // Both ends' sk_msg budgets go with the connection (a client still sending
                // after this takes TCP's path, which is always safe).
                let own = sock_key(ctx, netns);
                let _ = BUDGET.remove(&own);
                let _ = BUDGET.remove(&own.peer());
                if ORIG_PEER.remove(&key).is_ok() {
                    return Some(Counter::SockopsOrigDstRemoved);
                }
            }
            None
        }
        _ => None,
    }
}

#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u32 {
    // Network order in the upper 16 bits.
    u16::from_be((ctx.remote_port() >> 16) as u16) as u32
}

/// The socket's own key in the sockhash and the budget map.
#[inline(always)]
fn sock_key(ctx: &SockOpsContext, netns: u64) -> SockKey {
    SockKey {
        netns,
        local_ip: ctx.local_ip4(),
        remote_ip: ctx.remote_ip4(),
        local_port: ctx.local_port(),
        remote_port: remote_port(ctx),
    }
}

/// Whether a socket's own sends are handed over by sk_msg.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sends {
    /// Up to its budget (the application's socket).
    Redirect,
    /// Never: TCP's path from the first byte (the proxy's socket). It is in the sockhash only
    /// as the target of the application's sends.
    ///
    /// Past the budget a direction moves to TCP, and the reader may then find bytes in both
    /// queues: a read returns the redirected ones only, short of its buffer, and a reader that
    /// takes a short read to mean "drained" (edge-triggered: nginx, tokio) waits for a wake-up
    /// that never comes, the rest unread in its TCP queue. The proxy reads until the socket
    /// says "would block"; an application is not ours to change, so what it reads only ever
    /// comes by one path.
    Plain,
}

fn insert_sock(ctx: &SockOpsContext, netns: u64, sends: Sends) -> Counter {
    if SKMSG_ENABLED.load() == 0 {
        return Counter::SockopsSockhashDisabled;
    }
    let mut key = sock_key(ctx, netns);
    // The budget first: a socket in the sockhash without one never redirects (safe).
    if sends == Sends::Redirect && BUDGET.insert(&key, &SKMSG_BUDGET.load(), 0).is_err() {
        return Counter::SockopsSockhashError;
    }
    // SAFETY: ctx.ops is the live bpf_sock_ops of this program run.
    match SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, 0) {
        Ok(()) => Counter::SockopsSockhashInsert,
        Err(_) => {
            let _ = BUDGET.remove(&key);
            Counter::SockopsSockhashError
        }
    }
}

// === sk_msg ===

/// Verdict SK_PASS: redirected to the peer, or the normal TCP path.
///
/// A redirect queues the bytes on the peer's receive side at once, whatever the peer has
/// read: the kernel applies no flow control to it, so a sender faster than its reader would
/// grow the queue until socket memory runs out and its `write()` fails with ENOMEM. The
/// application's socket may therefore redirect at most `SKMSG_BUDGET` bytes in its lifetime,
/// which bounds what can wait unread. Past the budget, and as soon as any send took the
/// normal path (peer not in the sockhash yet), its sends stay on TCP's own path for good,
/// with TCP's backpressure. Bytes never reorder: the reader (the proxy) drains the redirected
/// queue before it reads what arrived by TCP, and nothing is redirected after the switch. The
/// proxy's socket has no budget: its sends are never redirected (see `Sends::Plain`).
#[sk_msg]
pub fn mesh_skmsg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    let md = unsafe { &*ctx.msg };
    let netns = unsafe { bpf_get_netns_cookie(ctx.msg.cast()) };
    let own = SockKey {
        netns,
        local_ip: md.local_ip4,
        remote_ip: md.remote_ip4,
        local_port: md.local_port,
        remote_port: u16::from_be((md.remote_port >> 16) as u16) as u32,
    };
    let size = md.size as u64;
    let Some(left) = BUDGET.get_ptr_mut(&own) else {
        // Switched to TCP's path earlier (or never given a budget): stay there.
        count(Counter::SkmsgPlain);
        add(Counter::SkmsgPlainBytes, size);
        return sk_action::SK_PASS;
    };
    // SAFETY: valid during this run; sends on one socket are serialized by the socket lock.
    if unsafe { *left } < size {
        let _ = BUDGET.remove(&own);
        count(Counter::SkmsgFallback);
        add(Counter::SkmsgPlainBytes, size);
        return sk_action::SK_PASS;
    }
    let mut peer = own.peer();
    // BPF_F_INGRESS: queue into the peer's receive side, as if it had come off the wire.
    let verdict = SOCKS.redirect_msg(&ctx, &mut peer, aya_ebpf::bindings::BPF_F_INGRESS as u64);
    if verdict == sk_action::SK_PASS as i64 {
        // SAFETY: as above.
        unsafe { *left -= size };
        count(Counter::SkmsgRedirected);
        add(Counter::SkmsgRedirectedBytes, size);
    } else {
        // This send takes the normal path, so every later one must too.
        let _ = BUDGET.remove(&own);
        count(Counter::SkmsgNoPeer);
        count(Counter::SkmsgFallback);
        add(Counter::SkmsgPlainBytes, size);
    }
    sk_action::SK_PASS
}

// === getsockopt ===

/// Verdict 1: the call proceeds; for SO_ORIGINAL_DST on a captured connection we supply the
/// answer, otherwise the kernel's own result stands.
#[cgroup_sockopt(getsockopt)]
pub fn mesh_getsockopt(ctx: SockoptContext) -> i32 {
    if let Some(counter) = try_getsockopt(&ctx) {
        count(counter);
    }
    1
}

/// `struct sockaddr_in`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr: u32,
    zero: [u8; 8],
}

fn try_getsockopt(ctx: &SockoptContext) -> Option<Counter> {
    // SAFETY: the context pointer is valid for the program's run.
    let so = unsafe { &mut *ctx.sockopt };
    if so.level != SOL_IP || so.optname != SO_ORIGINAL_DST {
        return None;
    }
    let sk: *mut bpf_sock = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return Some(Counter::GetsockoptUnknown);
    }
    let (peer_ip, peer_port) = unsafe { ((*sk).dst_ip4, u16::from_be((*sk).dst_port) as u32) };
    let netns = unsafe { bpf_get_netns_cookie(ctx.sockopt.cast()) };
    let key = PeerKey {
        netns,
        ip: peer_ip,
        port: peer_port,
    };
    let orig = unsafe { *ORIG_PEER.get_ptr(&key)? };
    let optval = unsafe { so.__bindgen_anon_2.optval } as *mut SockaddrIn;
    let end = unsafe { so.__bindgen_anon_3.optval_end } as usize;
    if optval as usize + core::mem::size_of::<SockaddrIn>() > end {
        return Some(Counter::GetsockoptShortBuffer);
    }
    // SAFETY: bounds checked against optval_end just above.
    unsafe {
        *optval = SockaddrIn {
            family: AF_INET as u16,
            port_be: orig.port,
            addr: orig.ip,
            zero: [0; 8],
        };
    }
    // Separate 32-bit stores: the verifier rejects the merged 64-bit one the compiler would emit.
    // SAFETY: both fields are writable context fields for getsockopt programs.
    unsafe {
        core::ptr::write_volatile(&mut so.optlen, core::mem::size_of::<SockaddrIn>() as i32);
        core::ptr::write_volatile(&mut so.retval, 0);
    }
    Some(Counter::GetsockoptAnswered)
}

// === sk_lookup ===

/// Verdict SK_PASS with the proxy's listener selected, or without selection (the kernel's
/// normal lookup runs); SK_DROP (the client gets a reset) for a STRICT pod whose listener is
/// missing.
#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    let (counter, verdict) = try_sk_lookup(&ctx);
    if let Some(counter) = counter {
        count(counter);
    }
    verdict
}

fn try_sk_lookup(ctx: &SkLookupContext) -> (Option<Counter>, u32) {
    let pass = (None, sk_action::SK_PASS);
    // SAFETY: the context pointer is valid for the program's run.
    let lk = unsafe { &*ctx.lookup };
    if lk.family != AF_INET || lk.protocol != IPPROTO_TCP {
        return pass;
    }
    let local_ip = lk.local_ip4;
    let remote_ip = lk.remote_ip4;
    // Only connections to an enrolled pod, and not the proxy's own connections to its app.
    // SAFETY: the pointer returned by the map lookup is valid during this run.
    let Some(flags) = PODS.get_ptr(&local_ip).map(|p| unsafe { (*p).flags }) else {
        return pass;
    };
    if remote_ip == local_ip || remote_ip == LOOPBACK_BE {
        return pass;
    }
    let strict = flags & POD_FLAG_PERMISSIVE == 0;
    let port = lk.local_port;
    let mut action = sk_action::SK_PASS;
    let verdict;
    let counter;
    if port == HBONE_PORT as u32 {
        verdict = FlowVerdict::Mesh;
        counter = None;
    } else if !steered(local_ip, port, strict) {
        verdict = FlowVerdict::Passthrough;
        counter = None;
    } else {
        match LISTENERS.redirect_sk_lookup(ctx, local_ip, 0) {
            Ok(()) => {
                verdict = FlowVerdict::Steered;
                counter = Some(Counter::SkLookupSteered);
            }
            Err(e) if strict => {
                // Fail closed: nothing may answer a STRICT pod's port but the proxy.
                verdict = FlowVerdict::Refused;
                counter = Some(if e == -ENOENT {
                    Counter::SkLookupRefusedNoListener
                } else {
                    Counter::SkLookupAssignError
                });
                action = sk_action::SK_DROP;
            }
            Err(e) if e == -ENOENT => {
                verdict = FlowVerdict::NoListener;
                counter = Some(Counter::SkLookupNoListener);
            }
            Err(_) => {
                verdict = FlowVerdict::NoListener;
                counter = Some(Counter::SkLookupAssignError);
            }
        }
    }
    let event = FlowEvent {
        // SAFETY: helper without preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        src_ip: remote_ip,
        dst_ip: local_ip,
        src_port: u16::from_be(lk.remote_port),
        dst_port: port as u16,
        verdict: verdict as u32,
    };
    if FLOWS.output::<FlowEvent>(&event, 0).is_err() {
        count(Counter::FlowEventDropped);
    }
    (counter, action)
}

/// Whether inbound TCP to `port` of the pod at `ip` goes to the proxy: every port of a STRICT
/// pod but the excluded ones; the declared ports of a PERMISSIVE pod.
#[inline(always)]
fn steered(ip: u32, port: u32, strict: bool) -> bool {
    // SAFETY: the pointer returned by the map lookup is valid during this run.
    match INBOUND
        .get_ptr(&InboundKey { ip, port })
        .map(|v| unsafe { *v })
    {
        Some(INBOUND_EXCLUDE) => false,
        Some(INBOUND_STEER) => true,
        _ => strict,
    }
}

/// Attached to STRICT pods' network namespaces only. Verdict SK_DROP for inbound IPv6 TCP from
/// outside the pod (the mesh carries IPv4 only: plaintext over IPv6 would reach the
/// application unchecked); SK_PASS without selection for the rest.
#[sk_lookup]
pub fn mesh_sk_lookup6(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    let lk = unsafe { &*ctx.lookup };
    if lk.family != AF_INET6 || lk.protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    // Word by word: 32-bit context loads only, and no memcmp.
    let (r0, r1, r2, r3) = (
        lk.remote_ip6[0],
        lk.remote_ip6[1],
        lk.remote_ip6[2],
        lk.remote_ip6[3],
    );
    let loopback = r0 == 0 && r1 == 0 && r2 == 0 && r3 == u32::from_ne_bytes([0, 0, 0, 1]);
    let to_itself = r0 == lk.local_ip6[0]
        && r1 == lk.local_ip6[1]
        && r2 == lk.local_ip6[2]
        && r3 == lk.local_ip6[3];
    // The pod's own connections (to ::1 or to itself) stay inside it.
    if loopback || to_itself {
        return sk_action::SK_PASS;
    }
    count(Counter::SkLookupRefusedIpv6);
    sk_action::SK_DROP
}

// === tc ingress ===

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;

/// Verdict TC_ACT_OK always: tc only observes.
#[classifier]
pub fn mesh_tc_ingress(ctx: TcContext) -> i32 {
    if let Some(counter) = try_tc_ingress(&ctx) {
        count(counter);
    }
    TC_ACT_OK
}

fn try_tc_ingress(ctx: &TcContext) -> Option<Counter> {
    let proto: u16 = ctx.load(12).ok()?;
    if u16::from_be(proto) != ETH_P_IP {
        return None;
    }
    // Destination address at offset 16 of the IPv4 header.
    let dst: u32 = ctx.load(ETH_HLEN + 16).ok()?;
    let c = POD_COUNTERS.get_ptr_mut(&dst)?;
    // SAFETY: per-CPU value, exclusively ours for this program run.
    unsafe {
        (*c).rx_packets += 1;
        (*c).rx_bytes += ctx.len() as u64;
    }
    Some(Counter::TcCounted)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
