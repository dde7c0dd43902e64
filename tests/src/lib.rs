//! Support for the privileged tests: RAII guards for network namespaces, cgroups and agent
//! processes (each cleans up on drop, also when the test panics), a privilege gate that skips
//! or fails per `MESH_REQUIRE_PRIVILEGED`, and a small TCP sink server.
//!
//! Every object a test creates carries the prefix `mt<pid>` so leftovers are recognisable and
//! `cargo xtask clean` can remove them.
use std::{
    fs::{self, File},
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    os::{fd::AsFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

/// Prefix of every namespace, cgroup and instance the tests create.
pub fn prefix() -> String {
    format!("mt{}", std::process::id())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short unique name: `mt<pid>x<n>` (interface names are limited to 15 bytes).
pub fn unique(tag: &str) -> String {
    format!("{}{}{}", prefix(), tag, SEQ.fetch_add(1, Ordering::Relaxed))
}

// === Privilege gate ===

/// Returns true if the test may run; otherwise records why it skips. With
/// `MESH_REQUIRE_PRIVILEGED=1` a skip is a failure.
pub fn privileged(test: &str) -> bool {
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("needs root (BPF, network namespaces, cgroups)".to_string())
    } else if mesh_datapath::cgroup::v2_mount().is_err() {
        Some("no cgroup v2 hierarchy mounted".to_string())
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("kernel without BTF".to_string())
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("iproute2 (`ip`) is not installed".to_string())
    } else {
        None
    };
    let Some(reason) = reason else { return true };
    skip(test, &reason);
    false
}

/// Returns true if every program a test runs is installed; otherwise records which are
/// missing and the Debian packages that have them, as [`privileged`] records its reason.
/// `programs`: (program, a harmless invocation that succeeds when it is usable, package).
pub fn installed(test: &str, programs: &[(&str, &[&str], &str)]) -> bool {
    let missing: Vec<String> = programs
        .iter()
        .filter(|(program, args, _)| {
            !Command::new(program)
                .args(*args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(program, args, package)| {
            format!("`{program} {}` (Debian package {package})", args.join(" "))
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip(
        test,
        &format!(
            "needs {} (`cargo xtask prereqs` installs them)",
            missing.join(", ")
        ),
    );
    false
}

/// Records that `test` skips and why; with `MESH_REQUIRE_PRIVILEGED=1` a skip is a failure.
fn skip(test: &str, reason: &str) {
    if std::env::var("MESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: skipped, but MESH_REQUIRE_PRIVILEGED=1: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
    if let Ok(log) = std::env::var("MESH_TEST_SKIP_LOG")
        && let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(log)
    {
        let _ = writeln!(f, "{test}: {reason}");
    }
}

// === Commands ===

/// Runs a command and panics with its output if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// === Network namespaces ===

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        let path = PathBuf::from("/run/netns").join(&name);
        Netns { name, path }
    }

    pub fn file(&self) -> File {
        File::open(&self.path).expect("open netns file")
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = self.file();
        thread::scope(|s| {
            s.spawn(|| {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in netns")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins two namespaces with a veth pair: `a_if` in `a` with `a_ip`, `b_if` in `b` with
/// `b_ip` (both /24). The pair goes away with either namespace.
pub fn link(a: &Netns, a_if: &str, a_ip: &str, b: &Netns, b_if: &str, b_ip: &str) {
    let ta = unique("a");
    let tb = unique("b");
    sh(&[
        "ip", "link", "add", &ta, "netns", &a.name, "type", "veth", "peer", "name", &tb, "netns",
        &b.name,
    ]);
    sh(&["ip", "-n", &a.name, "link", "set", &ta, "name", a_if]);
    sh(&["ip", "-n", &b.name, "link", "set", &tb, "name", b_if]);
    for (ns, ifname, ip) in [(a, a_if, a_ip), (b, b_if, b_ip)] {
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            ifname,
        ]);
        sh(&["ip", "-n", &ns.name, "link", "set", ifname, "up"]);
    }
}

// === cgroups ===

/// A cgroup v2 directory; on drop its processes are killed and it is removed.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Cgroup {
        let mount = mesh_datapath::cgroup::v2_mount().expect("cgroup v2 mount");
        let path = mount.join(format!("mesh-test-{}", unique(tag)));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Cgroup { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// Kills what is left in a cgroup and removes it (retrying while processes exit).
pub fn remove_cgroup(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(procs) = fs::read_to_string(path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                eprintln!("could not remove cgroup {}: {e}", path.display());
                return;
            }
        }
    }
}

/// A command that will run inside `cgroup` and `netns`: it moves itself into the cgroup
/// first (before entering the netns, whose /sys may differ), then enters the namespace.
pub fn command_in(program: &Path, cgroup: &Cgroup, netns: &Netns) -> Command {
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.path.join("cgroup.procs"))
        .expect("open cgroup.procs");
    let ns = netns.file();
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec we only call write(2) and setns(2), both async-signal-safe,
    // on descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let mut f = &procs;
            f.write_all(b"0")?;
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd
}

// === The probe client ===

/// What `mesh-probe` reported.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub local: SocketAddr,
    pub sent: u64,
    pub fnv: String,
    pub reply: String,
}

impl ProbeResult {
    /// The peer address the server saw.
    pub fn server_saw(&self) -> SocketAddr {
        field(&self.reply, "peer")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no peer in reply {:?}", self.reply))
    }

    /// True if the server received exactly what was sent.
    pub fn intact(&self) -> bool {
        field(&self.reply, "len") == Some(self.sent.to_string())
            && field(&self.reply, "fnv") == Some(self.fnv.clone())
    }
}

/// The value of `key=value` in a line of `key=value` words.
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// Runs `mesh-probe` in a cgroup and netns: sends `bytes` to `addr`.
pub fn probe(
    probe_bin: &Path,
    cgroup: &Cgroup,
    netns: &Netns,
    addr: &str,
    bytes: u64,
) -> ProbeResult {
    let out = command_in(probe_bin, cgroup, netns)
        .args([addr, &bytes.to_string()])
        .output()
        .expect("run mesh-probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mesh-probe {addr} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    let reply = line
        .split_once("reply=")
        .map(|(_, r)| r.to_string())
        .unwrap_or_default();
    ProbeResult {
        local: field(line, "local")
            .and_then(|l| l.parse().ok())
            .expect("local address"),
        sent: field(line, "sent")
            .and_then(|s| s.parse().ok())
            .expect("sent"),
        fnv: field(line, "fnv").expect("fnv"),
        reply,
    }
}

// === The sink server ===

/// A TCP server in a namespace: for each connection it reads to EOF, then replies with
/// `peer=<addr> len=<n> fnv=<hex>` and closes. Stops when dropped.
pub struct Sink {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    listener: Option<TcpListener>,
}

impl Sink {
    pub fn start(netns: &Netns, addr: &str) -> Sink {
        let listener = netns.run(|| TcpListener::bind(addr).expect("bind sink"));
        let addr = listener.local_addr().expect("sink address");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let l = listener.try_clone().expect("clone listener");
        let p = peers.clone();
        thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { break };
                let p = p.clone();
                thread::spawn(move || {
                    let peer = conn.peer_addr().ok();
                    let mut fnv = Fnv::default();
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut len = 0u64;
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                fnv.update(&buf[..n]);
                                len += n as u64;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                            Err(_) => return,
                        }
                    }
                    if let Some(peer) = peer {
                        if let Ok(mut v) = p.lock() {
                            v.push(peer);
                        }
                        let _ = writeln!(conn, "peer={peer} len={len} fnv={:016x}", fnv.finish());
                    }
                });
            }
        });
        Sink {
            addr,
            peers,
            listener: Some(listener),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(l) = self.listener.take() {
            // Wakes the accept loop with an error so its thread ends.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&l),
                nix::sys::socket::Shutdown::Both,
            );
        }
    }
}

/// Connects from inside `netns` (no cgroup involved), sends `bytes`, returns the reply line.
pub fn send_from(netns: &Netns, addr: &str, bytes: u64) -> String {
    let addr = addr.to_string();
    netns.run(move || {
        let mut s =
            std::net::TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let buf = vec![7u8; bytes as usize];
        s.write_all(&buf).expect("send");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("reply");
        line.trim().to_string()
    })
}

/// The peer a sink reported in a reply line.
pub fn reply_peer(reply: &str) -> SocketAddr {
    field(reply, "peer")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no peer in reply {reply:?}"))
}

// === Agent processes ===

/// A running `mesh-agent run` in its own cgroup. Dropping it kills the agent and removes the
/// instance's pinned state.
pub struct Agent {
    pub instance: String,
    pub child: Option<Child>,
    pub cgroup: Cgroup,
    bin: PathBuf,
}

impl Agent {
    /// Starts the agent and waits until it reports READY.
    pub fn start(bin: &Path, instance: &str, args: &[String]) -> Agent {
        let cgroup = Cgroup::new("agent");
        let agent = Agent {
            instance: instance.into(),
            child: None,
            cgroup,
            bin: bin.into(),
        };
        agent.spawn(args)
    }

    fn spawn(mut self, args: &[String]) -> Agent {
        let mut child = Command::new(&self.bin)
            .args(["run", "--instance", &self.instance, "--cgroup"])
            .arg(&self.cgroup.path)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mesh-agent");
        let stdout = child.stdout.take().expect("agent stdout");
        let stderr = child.stderr.take().expect("agent stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                if let Ok(mut s) = l.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        let mut lines = BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(l)) if l == "READY" => {}
            other => {
                let _ = child.wait();
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "agent did not become ready ({other:?}); log:\n{}",
                    log.lock().map(|s| s.clone()).unwrap_or_default()
                );
            }
        }
        self.child = Some(child);
        self
    }

    /// Kills the agent with SIGKILL (its pinned state stays) and starts it again.
    pub fn kill_and_restart(mut self, args: &[String]) -> Agent {
        self.kill();
        self.spawn(args)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs another `mesh-agent` subcommand against this instance.
    pub fn command(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(args)
            .args(["--instance", &self.instance])
            .output()
            .expect("run mesh-agent")
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new(mesh_datapath::config::BPFFS_ROOT).join(&self.instance)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        let _ = mesh_datapath::ebpf::remove_instance(&self.pin_dir());
        // Killed, it leaves its hand-over socket behind.
        let _ = std::fs::remove_file(mesh_agent::handover::default_socket(&self.instance));
    }
}

/// `GET path` on an agent's admin endpoint (plain HTTP/1.1, the connection closed after
/// the answer): the whole answer with its status line and headers, or the connection error.
pub fn admin_get(admin: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// An instance name unique to this test run.
pub fn instance(tag: &str) -> String {
    format!("{}-{tag}", prefix())
}

// === Payload and checksum ===

/// FNV-1a, 64 bit.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Deterministic payload: byte i of the stream is a function of its offset.
pub fn fill(buf: &mut [u8], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = offset + i as u64;
        *b = (x ^ (x >> 8) ^ (x >> 16)) as u8;
    }
}

pub mod bench;
pub mod cluster;
pub mod inprocess;
pub mod runtime;
pub mod sniff;
