//! Privileged tests of the kernel datapath, with real traffic between network namespaces.
//!
//! Topology per test: a client pod (its own netns + cgroup, interface eth0 at 10.77.0.2) joined
//! by a veth pair to a "remote" netns at 10.77.0.1; an agent process in its own cgroup.
use std::{net::Ipv4Addr, path::Path, time::Duration};

use mesh_common::{Counter, FlowVerdict};
use mesh_tests::{Agent, Cgroup, Netns, Sink, instance, link, privileged, probe, send_from};

const AGENT: &str = env!("CARGO_BIN_EXE_mesh-agent");
const PROBE: &str = env!("CARGO_BIN_EXE_mesh-probe");
const POD_IP: &str = "10.77.0.2";
const REMOTE_IP: &str = "10.77.0.1";
const MB: u64 = 1024 * 1024;

struct World {
    pod: Netns,
    remote: Netns,
    pod_cg: Cgroup,
}

fn world() -> World {
    let pod = Netns::new("p");
    let remote = Netns::new("r");
    link(&pod, "eth0", POD_IP, &remote, "eth0", REMOTE_IP);
    World {
        pod,
        remote,
        pod_cg: Cgroup::new("pod"),
    }
}

fn pod_arg(w: &World, extra: &str) -> String {
    format!(
        "--pod=name=default/client,cgroup={},netns={},ip={POD_IP}{extra}",
        w.pod_cg.path.display(),
        w.pod.path.display()
    )
}

fn agent_args(w: &World, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--capture=10.77.0.0/24".to_string(),
        pod_arg(w, ",inbound=8080"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs mesh-probe with `args` in the client pod; the line it printed (it must succeed).
fn probe_line(w: &World, args: &[&str]) -> String {
    let out = mesh_tests::command_in(Path::new(PROBE), &w.pod_cg, &w.pod)
        .args(args)
        .output()
        .expect("run mesh-probe");
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{line}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    line
}

fn counter(agent: &Agent, c: Counter) -> u64 {
    mesh_datapath::ebpf::Maps::open(&agent.pin_dir())
        .expect("open pinned maps")
        .counter(c)
        .expect("read counter")
}

/// Number of entries in a pinned map of the agent.
fn entries(agent: &Agent, name: &str) -> usize {
    let data =
        aya::maps::MapData::from_pin(agent.pin_dir().join("maps").join(name)).expect("pinned map");
    let map = aya::maps::Map::from_map_data(data).expect("map");
    match name {
        mesh_common::SOCKS_MAP => aya::maps::SockHash::<_, mesh_common::SockKey>::try_from(map)
            .expect("sockhash")
            .keys()
            .count(),
        mesh_common::SOCK_BUDGET_MAP => {
            aya::maps::HashMap::<_, mesh_common::SockKey, u64>::try_from(map)
                .expect("hash map")
                .keys()
                .count()
        }
        _ => aya::maps::HashMap::<_, mesh_common::PeerKey, mesh_common::OrigDst>::try_from(map)
            .expect("hash map")
            .keys()
            .count(),
    }
}

/// Outbound capture end to end: the pod's connection to a remote IP lands on the proxy in the
/// pod's netns, SO_ORIGINAL_DST names the remote, and 100 MB arrive intact.
fn outbound_capture(skmsg: bool) {
    let w = world();
    let sink = Sink::start(&w.remote, &format!("{REMOTE_IP}:9000"));
    let extra: &[&str] = if skmsg { &[] } else { &["--no-skmsg"] };
    let agent = Agent::start(
        Path::new(AGENT),
        &instance(if skmsg { "out" } else { "outnomsg" }),
        &agent_args(&w, extra),
    );

    let r = probe(
        Path::new(PROBE),
        &w.pod_cg,
        &w.pod,
        &sink.addr.to_string(),
        100 * MB,
    );
    assert!(r.intact(), "payload corrupted or truncated: {r:?}");
    // The server saw the proxy's upstream socket, not the client's own.
    assert_eq!(r.server_saw().ip().to_string(), POD_IP);
    assert_ne!(
        r.server_saw().port(),
        r.local.port(),
        "connection was not proxied: {r:?}"
    );
    // The client itself was connected to the outbound listener on loopback.
    assert_eq!(r.local.ip().to_string(), "127.0.0.1");

    assert_eq!(counter(&agent, Counter::Connect4Redirected), 1);
    assert_eq!(counter(&agent, Counter::GetsockoptAnswered), 1);
    let redirected = counter(&agent, Counter::SkmsgRedirectedBytes);
    let plain = counter(&agent, Counter::SkmsgPlainBytes);
    // Per-connection state goes away with the sockets.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (socks, peers, budgets) = (
            entries(&agent, mesh_common::SOCKS_MAP),
            entries(&agent, mesh_common::ORIG_PEER_MAP),
            entries(&agent, mesh_common::SOCK_BUDGET_MAP),
        );
        if socks == 0 && peers == 0 && budgets == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{socks} sockhash, {peers} original-destination and {budgets} budget entries \
             outlived their sockets"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if skmsg {
        // sk_msg hands over the first bytes of the upload, up to its budget; the rest goes by
        // TCP's own path, and the payload arrived intact across the switch (checked above).
        let budget = mesh_common::DEFAULT_SKMSG_BUDGET;
        assert!(
            redirected > 0 && redirected <= budget + 4096,
            "sk_msg carried {redirected} bytes, budget {budget}"
        );
        assert!(
            redirected + plain >= 100 * MB,
            "{redirected} + {plain} bytes seen by sk_msg"
        );
        assert!(counter(&agent, Counter::SkmsgFallback) >= 1);
    } else {
        assert_eq!(redirected, 0, "sk_msg must be off");
        assert!(counter(&agent, Counter::SockopsSockhashDisabled) >= 2);
    }
}

#[test]
fn outbound_capture_with_skmsg() {
    if !privileged("outbound_capture_with_skmsg") {
        return;
    }
    outbound_capture(true);
}

/// A client that sends a few bytes within the sk_msg budget and then more past it, back to
/// back, must get its whole echo: the proxy finds the first in the handed-over queue and the
/// rest in TCP's, and must read both before it waits. The proxy's own sends (the echo) are
/// never handed over, so the application only ever reads from TCP's queue.
#[test]
fn bytes_on_both_sides_of_the_sk_msg_switch_are_all_read() {
    if !privileged("bytes_on_both_sides_of_the_sk_msg_switch_are_all_read") {
        return;
    }
    const BUDGET: u64 = 64 * 1024;
    const ROUNDS: u64 = 8;
    let w = world();
    let echo = w
        .remote
        .run(|| std::net::TcpListener::bind(format!("{REMOTE_IP}:9200")).expect("bind"));
    std::thread::spawn(move || {
        while let Ok((conn, _)) = echo.accept() {
            std::thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                let mut reader = conn.try_clone().expect("clone");
                let mut writer = conn;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    let agent = Agent::start(
        Path::new(AGENT),
        &instance("switch"),
        &agent_args(&w, &[&format!("--skmsg-budget={BUDGET}")]),
    );
    let line = probe_line(
        &w,
        &[
            &format!("{REMOTE_IP}:9200"),
            "switch",
            &BUDGET.to_string(),
            &ROUNDS.to_string(),
        ],
    );
    assert_eq!(
        mesh_tests::field(&line, "stalled").as_deref(),
        Some("0"),
        "echoes stalled at the switch: {line}"
    );
    assert!(counter(&agent, Counter::SkmsgFallback) >= ROUNDS);
    // Only the application's sends were handed over, each connection's up to its budget.
    let redirected = counter(&agent, Counter::SkmsgRedirectedBytes);
    assert!(
        redirected > 0 && redirected <= ROUNDS * BUDGET,
        "sk_msg carried {redirected} bytes in {ROUNDS} connections of budget {BUDGET}"
    );
}

#[test]
fn outbound_capture_without_skmsg() {
    if !privileged("outbound_capture_without_skmsg") {
        return;
    }
    outbound_capture(false);
}

#[test]
fn other_cgroups_and_uncaptured_destinations_are_not_touched() {
    if !privileged("other_cgroups_and_uncaptured_destinations_are_not_touched") {
        return;
    }
    let w = world();
    let sink = Sink::start(&w.remote, &format!("{REMOTE_IP}:9000"));
    let other = Sink::start(&w.remote, "10.77.0.1:9001");
    let agent = Agent::start(
        Path::new(AGENT),
        &instance("nocap"),
        &agent_args(&w, &["--exclude-port=9001"]),
    );
    // Same netns, but a cgroup that is not enrolled: direct.
    let outsider = Cgroup::new("outsider");
    let r = probe(
        Path::new(PROBE),
        &outsider,
        &w.pod,
        &sink.addr.to_string(),
        1000,
    );
    assert!(r.intact());
    assert_eq!(
        r.server_saw(),
        r.local,
        "a non-enrolled cgroup was captured"
    );
    // Enrolled pod, excluded port: direct.
    let r = probe(
        Path::new(PROBE),
        &w.pod_cg,
        &w.pod,
        &other.addr.to_string(),
        1000,
    );
    assert_eq!(r.server_saw(), r.local, "an excluded port was captured");
    assert_eq!(counter(&agent, Counter::Connect4Redirected), 0);
    assert_eq!(counter(&agent, Counter::Connect4ExcludedPort), 1);
}

#[test]
fn inbound_steering_covers_every_port_of_a_strict_pod_but_its_exclusions() {
    if !privileged("inbound_steering_covers_every_port_of_a_strict_pod_but_its_exclusions") {
        return;
    }
    let w = world();
    // The pod's applications: a declared port, an undeclared one, an excluded one, and the
    // HBONE port.
    let app = Sink::start(&w.pod, &format!("{POD_IP}:8080"));
    let undeclared = Sink::start(&w.pod, &format!("{POD_IP}:9090"));
    let excluded = Sink::start(&w.pod, &format!("{POD_IP}:9100"));
    let hbone = Sink::start(&w.pod, &format!("{POD_IP}:15008"));
    let args = vec![
        "--capture=10.77.0.0/24".to_string(),
        pod_arg(&w, ",inbound=8080,exclude=9100"),
    ];
    let agent = Agent::start(Path::new(AGENT), &instance("in"), &args);
    // Drain events of the agent's own start.
    mesh_datapath::ebpf::drain_flows(&agent.pin_dir()).expect("drain");

    let remote: Ipv4Addr = REMOTE_IP.parse().expect("ip");
    for s in [&app, &undeclared] {
        let reply = send_from(&w.remote, &s.addr.to_string(), 5000);
        assert_eq!(
            mesh_tests::reply_peer(&reply).ip().to_string(),
            POD_IP,
            "port {} of a STRICT pod reached the app directly: {reply}",
            s.addr
        );
        assert!(reply.contains("len=5000"), "{reply}");
    }
    for s in [&excluded, &hbone] {
        let reply = send_from(&w.remote, &s.addr.to_string(), 10);
        assert_eq!(
            mesh_tests::reply_peer(&reply).ip(),
            remote,
            "port {} was steered",
            s.addr
        );
    }
    assert_eq!(counter(&agent, Counter::SkLookupSteered), 2);

    let flows = mesh_datapath::ebpf::drain_flows(&agent.pin_dir()).expect("drain flows");
    let verdicts: Vec<(u16, Option<FlowVerdict>)> = flows
        .iter()
        .filter(|e| mesh_datapath::ebpf::ip_from_key(e.src_ip) == remote)
        .map(|e| (e.dst_port, FlowVerdict::from_u32(e.verdict)))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (8080, Some(FlowVerdict::Steered)),
            (9090, Some(FlowVerdict::Steered)),
            (9100, Some(FlowVerdict::Passthrough)),
            (15008, Some(FlowVerdict::Mesh)),
        ]
    );
    let maps = mesh_datapath::ebpf::Maps::open(&agent.pin_dir()).expect("maps");
    let c = maps
        .pod_counters(POD_IP.parse().expect("ip"))
        .expect("read")
        .expect("pod has counters");
    assert!(
        c.rx_packets >= 9 && c.rx_bytes > 5000,
        "tc counters did not move: {c:?}"
    );
}

#[test]
fn restart_after_sigkill_adopts_pins_and_keeps_capturing() {
    if !privileged("restart_after_sigkill_adopts_pins_and_keeps_capturing") {
        return;
    }
    let w = world();
    let sink = Sink::start(&w.remote, &format!("{REMOTE_IP}:9000"));
    let args = agent_args(&w, &[]);
    let agent = Agent::start(Path::new(AGENT), &instance("restart"), &args);
    let r = probe(
        Path::new(PROBE),
        &w.pod_cg,
        &w.pod,
        &sink.addr.to_string(),
        1000,
    );
    assert_ne!(r.server_saw(), r.local);
    let map_id = |a: &Agent| {
        aya::maps::MapData::from_pin(a.pin_dir().join("maps").join(mesh_common::PODS_MAP))
            .expect("pinned map")
            .info()
            .expect("map info")
            .id()
    };
    let before = map_id(&agent);

    // A captured connection stays open across the kill.
    let mut held = mesh_tests::command_in(Path::new(PROBE), &w.pod_cg, &w.pod)
        .args([&sink.addr.to_string(), "hold"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn holding probe");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(held.stdout.take().expect("stdout")),
        &mut first,
    )
    .expect("holding probe connected");
    assert!(
        first.starts_with("local=127.0.0.1:"),
        "hold was not captured: {first}"
    );

    let agent = agent.kill_and_restart(&args);
    assert_eq!(map_id(&agent), before, "pinned maps were not reused");
    let r = probe(
        Path::new(PROBE),
        &w.pod_cg,
        &w.pod,
        &sink.addr.to_string(),
        1000,
    );
    assert!(r.intact());
    assert_ne!(r.server_saw(), r.local, "not captured after restart");
    // Counters survive (pinned), and a second connect4 on the cgroup would have counted the
    // already-rewritten loopback destination as not captured.
    drop(held.stdin.take());
    let _ = held.wait();
    assert_eq!(counter(&agent, Counter::Connect4Redirected), 3);
    assert_eq!(
        counter(&agent, Counter::Connect4NotCaptured),
        0,
        "attached twice"
    );
    let pod_dir = std::fs::read_dir(agent.pin_dir().join("links"))
        .expect("links dir")
        .next()
        .expect("one pod")
        .expect("entry")
        .path();
    assert_eq!(std::fs::read_dir(pod_dir).expect("pod links").count(), 1);
}

#[test]
fn unenroll_restores_direct_traffic_and_leaves_no_entries() {
    if !privileged("unenroll_restores_direct_traffic_and_leaves_no_entries") {
        return;
    }
    let w = world();
    let sink = Sink::start(&w.remote, &format!("{REMOTE_IP}:9000"));
    let agent = Agent::start(
        Path::new(AGENT),
        &instance("unenroll"),
        &agent_args(&w, &[]),
    );
    let r = probe(
        Path::new(PROBE),
        &w.pod_cg,
        &w.pod,
        &sink.addr.to_string(),
        1000,
    );
    assert_ne!(r.server_saw(), r.local);

    let out = agent.command(&["unenroll", "--name", "default/client", "--ip", POD_IP]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = probe(
        Path::new(PROBE),
        &w.pod_cg,
        &w.pod,
        &sink.addr.to_string(),
        1000,
    );
    assert_eq!(r.server_saw(), r.local, "still captured after unenroll");
    let maps = mesh_datapath::ebpf::Maps::open(&agent.pin_dir()).expect("maps");
    let left = maps.entries_for(POD_IP.parse().expect("ip")).expect("scan");
    assert!(left.is_empty(), "entries left in {left:?}");
    assert_eq!(
        std::fs::read_dir(agent.pin_dir().join("links"))
            .expect("links")
            .count(),
        0
    );
}

#[test]
fn enrolling_bad_input_fails_clearly_and_changes_nothing() {
    if !privileged("enrolling_bad_input_fails_clearly_and_changes_nothing") {
        return;
    }
    let w = world();
    let inst = instance("bad");
    let mut cfg = mesh_datapath::config::DatapathConfig::new(&inst).expect("config");
    cfg.capture = vec!["10.77.0.0/24".parse().expect("cidr")];
    // A cap above the node-wide map's size, so that the map itself can be filled below.
    let map_size = mesh_common::INBOUND_ENTRIES as usize;
    cfg.max_inbound_ports = map_size + 1;
    let pin_dir = cfg.pin_dir();
    let _cleanup = PinCleanup(pin_dir.clone());
    let mut dp = mesh_datapath::ebpf::Datapath::load(cfg).expect("load datapath");

    let good: mesh_datapath::config::PodSpec = pod_arg(&w, "")
        .trim_start_matches("--pod=")
        .parse()
        .expect("spec");
    let cases = [
        (
            "cgroup",
            "/sys/fs/cgroup/unified/mesh-test-does-not-exist",
            "cgroup",
            "No such file",
        ),
        (
            "netns",
            "/run/netns/mesh-test-does-not-exist",
            "network namespace",
            "No such file",
        ),
        ("netns", "/etc/hostname", "not a network namespace", ""),
        (
            "cgroup",
            &dp.cgroup_mount().display().to_string(),
            "root of the cgroup v2",
            "",
        ),
    ];
    for (field, value, want1, want2) in cases {
        let mut spec = good.clone();
        match field {
            "cgroup" => spec.cgroup = value.into(),
            _ => spec.netns = value.into(),
        }
        let err = dp
            .enroll(&spec)
            .err()
            .expect("enroll must fail")
            .to_string();
        assert!(
            err.contains(want1) && err.contains(want2),
            "{field}={value}: unclear error {err:?}"
        );
        assert!(err.contains(value), "error does not name {value}: {err}");
    }
    let mut spec = good.clone();
    spec.iface = "nosuch0".into();
    let err = dp.enroll(&spec).err().expect("bad iface").to_string();
    assert!(err.contains("no interface nosuch0"), "{err}");

    assert!(
        dp.maps().pod_ips().expect("pods").is_empty(),
        "a failed enroll left a pod entry"
    );
    assert_eq!(
        std::fs::read_dir(pin_dir.join("links"))
            .expect("links")
            .count(),
        0
    );

    // More inbound entries than the per-pod cap: refused before the kernel is touched.
    let mut greedy = good.clone();
    greedy.excluded_inbound_ports = (1..=map_size as u16 + 2).collect();
    let err = dp.enroll(&greedy).err().expect("over the cap").to_string();
    assert!(
        err.contains(&format!("{} inbound port entries", map_size + 2))
            && err.contains("--max-inbound-ports-per-pod"),
        "{err}"
    );
    // Within the cap but more than the node-wide map holds: refused loudly, nothing left.
    greedy.excluded_inbound_ports.pop();
    let err = dp.enroll(&greedy).err().expect("map full");
    assert_eq!(err.kind(), "map_full", "{err}");
    assert!(err.to_string().contains("INBOUND_V2 is full"), "{err}");
    assert!(
        dp.maps()
            .entries_for(POD_IP.parse().expect("ip"))
            .expect("scan")
            .is_empty(),
        "a refused pod left entries"
    );

    // And the good spec still enrolls, twice (idempotent), and unenrolls.
    dp.enroll(&good).expect("enroll");
    dp.enroll(&good).expect("enroll again");
    assert_eq!(
        dp.maps().pod_ips().expect("pods"),
        vec![POD_IP.parse::<Ipv4Addr>().expect("ip")]
    );
    dp.unenroll(&good).expect("unenroll");
    assert!(
        dp.maps()
            .entries_for(POD_IP.parse().expect("ip"))
            .expect("scan")
            .is_empty()
    );
}

/// Connects from inside `netns`, sends `bytes`, returns the reply line, or why it failed.
fn try_send_from(netns: &mesh_tests::Netns, addr: &str, bytes: usize) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    let addr: std::net::SocketAddr = addr.parse().expect("address");
    netns.run(move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&vec![7u8; bytes])?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim().to_string())
    })
}

#[test]
fn a_strict_pod_fails_closed_while_the_agent_is_down_and_a_permissive_one_open() {
    if !privileged("a_strict_pod_fails_closed_while_the_agent_is_down_and_a_permissive_one_open") {
        return;
    }
    let strict = world();
    let permissive = Netns::new("q");
    link(
        &permissive,
        "eth0",
        "10.77.1.2",
        &strict.remote,
        "eth1",
        "10.77.1.1",
    );
    let permissive_cg = mesh_tests::Cgroup::new("perm");
    let app = Sink::start(&strict.pod, &format!("{POD_IP}:8080"));
    let undeclared = Sink::start(&strict.pod, &format!("{POD_IP}:9090"));
    let excluded = Sink::start(&strict.pod, &format!("{POD_IP}:9100"));
    let perm_app = Sink::start(&permissive, "10.77.1.2:8080");
    let args = vec![
        "--capture=10.77.0.0/16".to_string(),
        pod_arg(&strict, ",inbound=8080,exclude=9100"),
        format!(
            "--pod=name=default/perm,cgroup={},netns={},ip=10.77.1.2,inbound=8080,mode=permissive",
            permissive_cg.path.display(),
            permissive.path.display()
        ),
    ];
    let mut agent = Agent::start(Path::new(AGENT), &instance("down"), &args);
    let steered = |addr: &str| {
        let reply = try_send_from(&strict.remote, addr, 100).expect("served while up");
        mesh_tests::reply_peer(&reply).ip().to_string()
    };
    assert_eq!(steered(&app.addr.to_string()), POD_IP);
    assert_eq!(steered(&perm_app.addr.to_string()), "10.77.1.2");
    mesh_datapath::ebpf::drain_flows(&agent.pin_dir()).expect("drain");

    agent.kill();
    // STRICT: nothing answers but the proxy, and the proxy is gone.
    for s in [&app, &undeclared] {
        let r = try_send_from(&strict.remote, &s.addr.to_string(), 100);
        let e = r.expect_err("a STRICT pod answered plaintext while the agent was down");
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{}: {e}",
            s.addr
        );
    }
    // The excluded port is the application's own, agent or not.
    let reply = try_send_from(&strict.remote, &excluded.addr.to_string(), 10).expect("excluded");
    assert_eq!(mesh_tests::reply_peer(&reply).ip().to_string(), REMOTE_IP);
    // PERMISSIVE fails open: the application answers directly.
    let reply = try_send_from(&strict.remote, &perm_app.addr.to_string(), 10)
        .expect("a PERMISSIVE pod fails open");
    assert_eq!(mesh_tests::reply_peer(&reply).ip().to_string(), "10.77.1.1");

    let maps = mesh_datapath::ebpf::Maps::open(&agent.pin_dir()).expect("maps");
    assert_eq!(
        maps.counter(Counter::SkLookupRefusedNoListener)
            .expect("counter"),
        2
    );
    let verdicts: Vec<(u16, Option<FlowVerdict>)> =
        mesh_datapath::ebpf::drain_flows(&agent.pin_dir())
            .expect("drain flows")
            .iter()
            .map(|e| (e.dst_port, FlowVerdict::from_u32(e.verdict)))
            .collect();
    assert_eq!(
        verdicts,
        vec![
            (8080, Some(FlowVerdict::Refused)),
            (9090, Some(FlowVerdict::Refused)),
            (9100, Some(FlowVerdict::Passthrough)),
            (8080, Some(FlowVerdict::NoListener)),
        ]
    );

    // The window: from the restarted agent's start until the pod is served again.
    let started = std::time::Instant::now();
    let agent = agent.kill_and_restart(&args);
    let ready = started.elapsed();
    let served = loop {
        if let Ok(reply) = try_send_from(&strict.remote, &app.addr.to_string(), 100) {
            assert_eq!(mesh_tests::reply_peer(&reply).ip().to_string(), POD_IP);
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never served again"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!(
        "fail-closed window after restart (datapath only, no controller): agent READY after \
         {ready:?}, STRICT pod served again after {served:?}"
    );
    drop(agent);
}

#[test]
fn strict_pods_refuse_inbound_ipv6_and_dual_stack_sockets_are_captured() {
    if !privileged("strict_pods_refuse_inbound_ipv6_and_dual_stack_sockets_are_captured") {
        return;
    }
    let w = world();
    for (ns, addr) in [(&w.pod, "fd77::2/64"), (&w.remote, "fd77::1/64")] {
        mesh_tests::sh(&[
            "ip", "-n", &ns.name, "-6", "addr", "add", addr, "dev", "eth0", "nodad",
        ]);
    }
    // A dual-stack application listening on every address.
    let app = Sink::start(&w.pod, "[::]:8080");
    let sink = Sink::start(&w.remote, &format!("{REMOTE_IP}:9000"));
    let agent = Agent::start(Path::new(AGENT), &instance("v6"), &agent_args(&w, &[]));

    // Inbound IPv6 to a STRICT pod: refused, never answered by the application.
    let e = try_send_from(&w.remote, "[fd77::2]:8080", 10)
        .expect_err("IPv6 plaintext reached a STRICT pod");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert_eq!(counter(&agent, Counter::SkLookupRefusedIpv6), 1);
    // The same port over IPv4 is steered; the pod's own IPv6 loopback stays its own.
    let reply = try_send_from(&w.remote, &format!("{POD_IP}:8080"), 10).expect("IPv4");
    // The dual-stack application sees IPv4 peers as IPv4-mapped addresses.
    assert_eq!(
        mesh_tests::reply_peer(&reply)
            .ip()
            .to_canonical()
            .to_string(),
        POD_IP
    );
    try_send_from(&w.pod, "[::1]:8080", 10).expect("in-pod ::1");
    assert!(app.peers.lock().expect("peers").len() >= 2);

    // A dual-stack socket to an IPv4-mapped captured destination is captured like IPv4.
    let mapped = format!("[::ffff:{REMOTE_IP}]:9000");
    let r = probe(Path::new(PROBE), &w.pod_cg, &w.pod, &mapped, 100_000);
    assert_eq!(
        r.local.ip().to_string(),
        "::ffff:127.0.0.1",
        "the mapped destination was not captured: {r:?}"
    );
    assert!(r.intact(), "{r:?}");
    assert_eq!(counter(&agent, Counter::Connect6Redirected), 1);
    assert_eq!(sink.peers.lock().expect("peers").len(), 1);
    // ... and accelerated like IPv4: sk_msg carried the client's upload to the proxy.
    assert!(
        counter(&agent, Counter::SkmsgRedirectedBytes) >= 100_000,
        "the dual-stack socket's sends were not redirected"
    );
}

#[test]
fn connections_to_the_proxy_s_own_ports_are_refused_and_do_not_loop() {
    if !privileged("connections_to_the_proxy_s_own_ports_are_refused_and_do_not_loop") {
        return;
    }
    let w = world();
    let agent = Agent::start(Path::new(AGENT), &instance("loop"), &agent_args(&w, &[]));
    let pid = agent.child.as_ref().expect("running").id();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("agent fds")
            .count()
    };
    let before = fds();
    for _ in 0..20 {
        for port in [15006, 15001] {
            let started = std::time::Instant::now();
            let r = try_send_from(&w.pod, &format!("127.0.0.1:{port}"), 10);
            assert!(
                r.as_ref().map_or(true, |line| line.is_empty()),
                "127.0.0.1:{port} answered {r:?}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "127.0.0.1:{port} was not refused at once"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = fds();
    assert!(
        after <= before + 5,
        "the agent's descriptors grew from {before} to {after}"
    );
    // The agent still serves.
    let app = Sink::start(&w.pod, &format!("{POD_IP}:8080"));
    let reply = try_send_from(&w.remote, &app.addr.to_string(), 10).expect("still served");
    assert_eq!(mesh_tests::reply_peer(&reply).ip().to_string(), POD_IP);
}

/// A sender faster than its reader is held back by TCP's flow control in both directions,
/// never fails with ENOMEM, and queues a bounded amount (sk_msg alone would queue without bound
/// on the reader's side until socket memory ran out).
#[test]
fn a_sender_faster_than_its_reader_is_held_back_not_failed() {
    if !privileged("a_sender_faster_than_its_reader_is_held_back_not_failed") {
        return;
    }
    // What bounded buffering may hold: socket buffers on three sockets, the proxy's copy
    // buffers and the sk_msg budget come to well under this; unbounded queueing goes past it
    // in a fraction of the time given.
    const BOUND: u64 = 128 * MB;
    let w = world();
    let agent = Agent::start(Path::new(AGENT), &instance("flood"), &agent_args(&w, &[]));

    // Upload: the server accepts and never reads.
    let stall = w
        .remote
        .run(|| std::net::TcpListener::bind(format!("{REMOTE_IP}:9100")).expect("bind"));
    let held = std::thread::spawn(move || stall.accept().map(|(c, _)| c));
    let line = probe_line(&w, &[&format!("{REMOTE_IP}:9100"), "flood", "3"]);
    let _conn = held.join().expect("accept thread").expect("accept");
    let queued: u64 = mesh_tests::field(&line, "queued")
        .and_then(|q| q.parse().ok())
        .expect("queued");
    assert_eq!(
        mesh_tests::field(&line, "error").as_deref(),
        Some("none"),
        "the application's write failed: {line}"
    );
    assert!(
        queued < BOUND,
        "upload queued {queued} bytes unread: {line}"
    );
    assert!(counter(&agent, Counter::SkmsgFallback) >= 1);

    // Download: the server writes as fast as it can; the application never reads.
    let flood = w
        .remote
        .run(|| std::net::TcpListener::bind(format!("{REMOTE_IP}:9101")).expect("bind"));
    let writer = std::thread::spawn(move || {
        let (mut c, _) = flood.accept().expect("accept");
        c.set_nonblocking(true).expect("nonblocking");
        let buf = vec![0xa5u8; 64 * 1024];
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut queued = 0u64;
        while std::time::Instant::now() < deadline && queued < 4 * BOUND {
            match std::io::Write::write(&mut c, &buf) {
                Ok(n) => queued += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(e),
            }
        }
        Ok((queued, c))
    });
    let mut holder = mesh_tests::command_in(Path::new(PROBE), &w.pod_cg, &w.pod)
        .args([&format!("{REMOTE_IP}:9101"), "hold"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run mesh-probe hold");
    let (queued, _conn) = writer
        .join()
        .expect("writer thread")
        .expect("the proxy cut the download instead of holding it back");
    drop(holder.stdin.take());
    let status = holder.wait().expect("mesh-probe hold");
    assert!(status.success(), "the application's connection failed");
    assert!(queued < BOUND, "download queued {queued} bytes unread");

    // The datapath still carries ordinary traffic.
    let sink = Sink::start(&w.remote, &format!("{REMOTE_IP}:9000"));
    let r = probe(
        Path::new(PROBE),
        &w.pod_cg,
        &w.pod,
        &sink.addr.to_string(),
        MB,
    );
    assert!(r.intact(), "{r:?}");
}

struct PinCleanup(std::path::PathBuf);

impl Drop for PinCleanup {
    fn drop(&mut self) {
        let _ = mesh_datapath::ebpf::remove_instance(&self.0);
    }
}
