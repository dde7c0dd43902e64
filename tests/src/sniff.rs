//! A packet capture on one interface of a test namespace (AF_PACKET), to check what crosses
//! the wire: TCP payloads by port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crate::Netns;

/// One TCP segment seen on the wire.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

/// A running capture; [`Sniffer::stop`] returns what it saw.
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Segment>>>,
}

impl Sniffer {
    /// Captures every IPv4 TCP segment on `iface` of `netns`.
    pub fn start(netns: &Netns, iface: &str) -> Sniffer {
        Sniffer::start_in(netns.file(), iface)
    }

    /// Captures every IPv4 TCP segment on `iface` of the namespace `ns` (an open
    /// `/run/netns/<name>`).
    pub fn start_in(ns: std::fs::File, iface: &str) -> Sniffer {
        let stop = Arc::new(AtomicBool::new(false));
        let (iface, flag) = (iface.to_string(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let fd = open(&iface);
            ready_tx.send(()).expect("ready");
            let mut segments = Vec::new();
            let mut frame = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: reads into a buffer we own, of the length we pass.
                let n = unsafe { libc::recv(fd, frame.as_mut_ptr().cast(), frame.len(), 0) };
                if n > 0 {
                    segments.extend(parse(&frame[..n as usize]));
                }
            }
            // SAFETY: closes the socket this thread opened and nothing else uses.
            unsafe { libc::close(fd) };
            segments
        });
        ready_rx.recv().expect("capture started");
        Sniffer {
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> Vec<Segment> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("capture thread"))
            .unwrap_or_default()
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn open(iface: &str) -> libc::c_int {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    let name = std::ffi::CString::new(iface).expect("interface name");
    // SAFETY: a NUL-terminated name we own.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index != 0, "no interface {iface}");
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: binds our socket to a sockaddr_ll of the right size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert!(
        rc == 0,
        "bind AF_PACKET: {}",
        std::io::Error::last_os_error()
    );
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: sets a receive timeout from a timeval we own.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    // A large queue, so a burst is not dropped before this thread reads it (best effort).
    let size: libc::c_int = 64 << 20;
    // SAFETY: sets a socket option from an int we own.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    fd
}

/// The TCP segment in an Ethernet frame, if it carries IPv4 TCP.
fn parse(frame: &[u8]) -> Option<Segment> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let tcp = ip.get(ihl..total.min(ip.len()))?;
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        payload: tcp.get(doff..)?.to_vec(),
    })
}
