//! The performance ladder's fast mode as a privileged test: every step produces plausible
//! figures, and the mesh steps went through the proxy as the agents' counters show. The
//! figures themselves are not asserted (this is a debug build on a shared machine). With the
//! stock tools installed, their runs too: figures from every tool, the mesh's runs counted by
//! the agents (as bytes on the L4 ports, as requests on the HTTP port), the others not.
use std::process::Command;

use mesh_tests::bench::report::{Report, StepResult, median};
use mesh_tests::bench::stock::MEASURES;
use mesh_tests::{installed, privileged};

fn values<'a>(s: &'a StepResult, key: &str) -> &'a [f64] {
    s.values
        .get(key)
        .unwrap_or_else(|| panic!("step {} has no {key}", s.id))
}

#[test]
fn the_fast_ladder_measures_every_step_and_the_mesh_steps_cross_the_proxy() {
    if !privileged("the_fast_ladder_measures_every_step_and_the_mesh_steps_cross_the_proxy") {
        return;
    }
    // The stock tools too, when installed (`cargo xtask prereqs`): 3 s per run. With
    // MESH_REQUIRE_PRIVILEGED=1 a missing program fails the test.
    let stock = installed(
        "the_fast_ladder_measures_every_step_and_the_mesh_steps_cross_the_proxy (stock tools)",
        &[
            ("iperf3", &["--version"], "iperf3"),
            ("sh", &["-c", "command -v wrk"], "wrk"),
            ("sh", &["-c", "command -v hey"], "hey"),
            ("nginx", &["-v"], "nginx"),
        ],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("ladder.json");
    // One repetition keeps the debug build's run short; the plan is otherwise the fast mode's.
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-bench"))
        .args(["run", "--fast", "--reps", "1", "--prefix"])
        .arg(format!("{}b", mesh_tests::prefix()))
        .arg("--json")
        .arg(&json)
        .args(stock.then_some("--stock"))
        .output()
        .expect("run mesh-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mesh-bench failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("| kernel |"),
        "no environment header:\n{stdout}"
    );
    let report: Report =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON")).expect("a report");
    let ids: Vec<u8> = report.steps.iter().map(|s| s.id).collect();
    assert_eq!(
        ids,
        [1, 2, 3, 4, 5, 6, 7, 8],
        "the fast mode runs the eight steps"
    );
    assert!(!report.environment.kernel.is_empty() && report.environment.cpus > 0);
    // The restart scenario ran every way, under load.
    let keys: Vec<&str> = report.restarts.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        ["in-place", "handover", "handover-new-programs", "crash"],
        "the restart scenario"
    );
    for r in &report.restarts {
        assert!(
            r.new_connections > 0 && r.requests > 0 && r.agent_seconds > 0.0,
            "{}: no load measured: {r:?}",
            r.key
        );
    }
    assert!(
        stdout.contains("## Agent restart under load"),
        "no restart table:\n{stdout}"
    );

    for s in &report.steps {
        let bulk = median(values(s, "bulk_mb_s")).expect("a throughput");
        assert!(bulk > 0.0, "step {}: throughput {bulk}", s.id);
        if s.datapath.protocol == mesh_tests::bench::client::Proto::Tcp {
            // Several streams both ways, every byte echoed back (the client checks the counts).
            let duplex = median(values(s, "duplex_mb_s")).expect("a both-ways throughput");
            assert!(duplex > 0.0, "step {}: both ways {duplex}", s.id);
        }
        for series in ["1b_fixed", "1b_max", "1kb_fixed", "1kb_max"] {
            let p50 = values(s, &format!("{series}_p50"));
            let p99 = values(s, &format!("{series}_p99"));
            for (a, b) in p50.iter().zip(p99) {
                assert!(
                    *a > 0.0 && a <= b,
                    "step {} {series}: p50 {a} p99 {b}",
                    s.id
                );
            }
            let rate = median(values(s, &format!("{series}_per_s"))).expect("a rate");
            assert!(rate > 0.0, "step {} {series}: {rate} req/s", s.id);
        }
        let p = &s.proxy;
        if !s.datapath.mesh {
            assert_eq!(p.connections + p.requests, 0, "step {} is not meshed", s.id);
            continue;
        }
        assert!(
            p.connections + p.requests > 0 && p.bytes + p.requests > 0,
            "step {}: the agents counted nothing: {p:?}",
            s.id
        );
        let expected = if s.datapath.cross_node {
            "hbone"
        } else {
            "same_node"
        };
        assert!(
            p.paths.iter().any(|x| x == expected),
            "step {}: no {expected} traffic in the agents' counters: {p:?}",
            s.id
        );
        let cpu = median(values(s, "cpu_s_per_10k_req")).expect("CPU per request");
        assert!(cpu >= 0.0, "step {}: CPU {cpu}", s.id);
        assert!(
            s.rss_mib.get("idle").is_some_and(|m| *m > 0.0),
            "step {}: RSS",
            s.id
        );
    }
    if stock {
        let s = report.stock.as_ref().expect("the stock tools' figures");
        assert!(
            stdout.contains("## Stock tools"),
            "no stock table:\n{stdout}"
        );
        for m in &MEASURES {
            for (side, values) in [("no mesh", &s.no_mesh.values), ("mesh", &s.mesh.values)] {
                let figures = m.figures();
                let v = |key: &str| {
                    values
                        .get(key)
                        .unwrap_or_else(|| panic!("{} ({side}): no {key}", m.title))
                };
                let rate = v(&figures[0].0);
                assert!(
                    rate.len() == 1 && rate[0] > 0.0,
                    "{} ({side}): {rate:?}",
                    m.title
                );
                if let [_, p50, p99] = &figures[..] {
                    let (p50, p99) = (v(&p50.0)[0], v(&p99.0)[0]);
                    assert!(
                        p50 <= p99 && p99 > 0.0,
                        "{} ({side}): p50 {p50} p99 {p99}",
                        m.title
                    );
                }
            }
        }
        // mesh-bench checked the counters too; these are what a reader of the JSON sees.
        let (none, mesh) = (&s.no_mesh, &s.mesh);
        assert_eq!(
            none.l4.connections + none.http.connections + none.http.requests,
            0,
            "the no-mesh stock runs went through an agent: {none:?}"
        );
        assert!(
            mesh.l4.paths.iter().any(|p| p == "hbone") && mesh.l4.requests == 0,
            "the mesh's stock runs to the L4 ports: {:?}",
            mesh.l4
        );
        assert!(
            mesh.http.requests >= mesh.http_requests && mesh.http_requests > 0,
            "the mesh's stock runs to the HTTP port: {:?}",
            mesh.http
        );
    }
    let iptables = report.step(3).expect("step 3");
    assert!(
        iptables.proxy.iptables_redirected.is_some_and(|n| n > 0),
        "the iptables step's REDIRECT rule matched nothing: {:?}",
        iptables.proxy
    );
}

/// Ctrl-C in the middle of a step: the run exits with 130 and leaves no cluster behind (no
/// state directory, network namespace, cgroup or pinned datapath state of its prefix).
#[test]
fn an_interrupted_run_removes_its_clusters() {
    if !privileged("an_interrupted_run_removes_its_clusters") {
        return;
    }
    let prefix = format!("{}i", mesh_tests::prefix());
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("stderr");
    let mut run = Command::new(env!("CARGO_BIN_EXE_mesh-bench"))
        .args([
            "run", "--fast", "--reps", "1", "--steps", "6", "--prefix", &prefix,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run mesh-bench");
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    // Interrupted once the step's agents run (its measurements start).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while !said().contains("warm-up") {
        assert!(
            std::time::Instant::now() < deadline,
            "the step never started measuring:\n{}",
            said()
        );
        assert!(
            run.try_wait().expect("wait").is_none(),
            "mesh-bench ended early:\n{}",
            said()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        !mesh_tests::cluster::prefixes_starting(&prefix).is_empty(),
        "no cluster to remove"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = run.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "{}", said());
    assert_eq!(
        mesh_tests::cluster::prefixes_starting(&prefix),
        Vec::<String>::new(),
        "state left: {}",
        said()
    );
    let left = |dir: &std::path::Path, start: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.starts_with(start))
                    .collect()
            })
            .unwrap_or_default()
    };
    let none = Vec::<String>::new();
    let netns = left("/run/netns".as_ref(), &prefix);
    assert_eq!(netns, none, "network namespaces left");
    let pins = left("/sys/fs/bpf/mesh".as_ref(), &prefix);
    assert_eq!(pins, none, "pins left");
    let cgroups = mesh_datapath::cgroup::v2_mount().expect("cgroup v2");
    let cgroups = left(&cgroups, &format!("mesh-sim-{prefix}"));
    assert_eq!(cgroups, none, "cgroups left");
}
