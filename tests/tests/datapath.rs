//! Privileged tests of the kernel datapath, with real traffic between network namespaces.
//!
//! Topology per test: a client pod (its own netns + cgroup, interface eth0 at 10.77.0.2) joined
//! by a veth pair to a "remote" netns at 10.77.0.1; an agent process in its own cgroup.
use std::{net::Ipv4Addr, path::Path};

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

fn counter(agent: &Agent, c: Counter) -> u64 {
    mesh_agent::ebpf::Maps::open(&agent.pin_dir())
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
    // Per-connection state goes away with the sockets.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (socks, peers) = (
            entries(&agent, mesh_common::SOCKS_MAP),
            entries(&agent, mesh_common::ORIG_PEER_MAP),
        );
        if socks == 0 && peers == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{socks} sockhash and {peers} original-destination entries outlived their sockets"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if skmsg {
        assert!(
            redirected >= 100 * MB,
            "sk_msg carried only {redirected} bytes of the app -> proxy hop"
        );
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
fn inbound_steering_of_captured_ports_only() {
    if !privileged("inbound_steering_of_captured_ports_only") {
        return;
    }
    let w = world();
    // The pod's applications: a captured port, an uncaptured one, and the HBONE port.
    let app = Sink::start(&w.pod, &format!("{POD_IP}:8080"));
    let plain = Sink::start(&w.pod, &format!("{POD_IP}:9090"));
    let hbone = Sink::start(&w.pod, &format!("{POD_IP}:15008"));
    let agent = Agent::start(Path::new(AGENT), &instance("in"), &agent_args(&w, &[]));
    // Drain events of the agent's own start.
    mesh_agent::ebpf::drain_flows(&agent.pin_dir()).expect("drain");

    let remote: Ipv4Addr = REMOTE_IP.parse().expect("ip");
    let reply = send_from(&w.remote, &app.addr.to_string(), 5000);
    let saw = mesh_tests::reply_peer(&reply);
    assert_eq!(
        saw.ip().to_string(),
        POD_IP,
        "captured port reached the app directly: {reply}"
    );
    assert!(reply.contains("len=5000"), "{reply}");
    for s in [&plain, &hbone] {
        let reply = send_from(&w.remote, &s.addr.to_string(), 10);
        assert_eq!(
            mesh_tests::reply_peer(&reply).ip(),
            remote,
            "port {} was steered",
            s.addr
        );
    }
    assert_eq!(counter(&agent, Counter::SkLookupSteered), 1);

    let flows = mesh_agent::ebpf::drain_flows(&agent.pin_dir()).expect("drain flows");
    let verdicts: Vec<(u16, Option<FlowVerdict>)> = flows
        .iter()
        .filter(|e| mesh_agent::ebpf::ip_from_key(e.src_ip) == remote)
        .map(|e| (e.dst_port, FlowVerdict::from_u32(e.verdict)))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (8080, Some(FlowVerdict::Steered)),
            (9090, Some(FlowVerdict::Passthrough)),
            (15008, Some(FlowVerdict::Mesh)),
        ]
    );
    let maps = mesh_agent::ebpf::Maps::open(&agent.pin_dir()).expect("maps");
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
    let maps = mesh_agent::ebpf::Maps::open(&agent.pin_dir()).expect("maps");
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
    let mut cfg = mesh_agent::config::DatapathConfig::new(&inst).expect("config");
    cfg.capture = vec!["10.77.0.0/24".parse().expect("cidr")];
    let pin_dir = cfg.pin_dir();
    let _cleanup = PinCleanup(pin_dir.clone());
    let mut dp = mesh_agent::ebpf::Datapath::load(cfg).expect("load datapath");

    let good: mesh_agent::config::PodSpec = pod_arg(&w, "")
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

struct PinCleanup(std::path::PathBuf);

impl Drop for PinCleanup {
    fn drop(&mut self) {
        let _ = mesh_agent::ebpf::remove_instance(&self.0);
    }
}
