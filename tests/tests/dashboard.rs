//! The Grafana dashboard the chart ships (`deploy/helm/mesh/dashboards/mesh.json`) against a
//! real Prometheus (Debian's) scraping the agents and the controller of the single-machine
//! mesh while its demo pods talk: every panel's query returns data, and the traffic panels
//! show the traffic. Privileged; needs `prometheus` (`cargo xtask prereqs`).
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[allow(dead_code, reason = "each suite uses a subset")]
mod common;

use common::{ECHO_VIP, call, up};
use mesh_tests::cluster::AGENT_ADMIN;
use mesh_tests::{installed, privileged};
use nix::sched::{CloneFlags, setns};
use serde_json::Value;

const WEB_VIP: &str = "10.96.0.10:80";
/// The controller's admin endpoint in the fabric's namespace.
const CONTROLLER_ADMIN: &str = "127.0.0.1:15014";

/// Accepts on the host's loopback and carries each connection to `target` inside the network
/// namespace `netns`: how a Prometheus outside the simulated nodes reaches their loopback-only
/// metrics, as it would reach a pod's port on a real cluster.
fn forward(netns: &str, target: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let (netns, target): (PathBuf, SocketAddr) = (
        PathBuf::from("/run/netns").join(netns),
        target.parse().expect("target"),
    );
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let netns = netns.clone();
            std::thread::spawn(move || {
                let Ok(file) = std::fs::File::open(&netns) else {
                    return;
                };
                // This thread only: the accepted socket stays in the host's namespace.
                if setns(file.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
                    return;
                }
                let Ok(upstream) = TcpStream::connect_timeout(&target, Duration::from_secs(2))
                else {
                    return;
                };
                let (Ok(mut conn_r), Ok(mut up_w)) = (conn.try_clone(), upstream.try_clone())
                else {
                    return;
                };
                let back = std::thread::spawn(move || {
                    let (mut up_r, mut conn_w) = (upstream, conn);
                    let _ = std::io::copy(&mut up_r, &mut conn_w);
                    let _ = conn_w.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut conn_r, &mut up_w);
                let _ = up_w.shutdown(std::net::Shutdown::Write);
                let _ = back.join();
            });
        }
    });
    addr
}

/// Prometheus scraping `targets` (job, address) every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[(&str, SocketAddr)]) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = String::from("global:\n  scrape_interval: 1s\nscrape_configs:\n");
        for (job, addr) in targets {
            config.push_str(&format!(
                "- job_name: {job}\n  static_configs:\n  - targets: ['{addr}']\n"
            ));
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).expect("write the configuration");
        let addr = mesh_tests::inprocess::free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).expect("log file"))
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !get(p.addr, "/-/ready").is_ok_and(|(status, _)| status.contains(" 200 ")) {
            assert!(Instant::now() < deadline, "prometheus never got ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// The result vector of an instant query.
    fn query(&self, expr: &str) -> Vec<Value> {
        let (status, body) = get(self.addr, &format!("/api/v1/query?query={}", encode(expr)))
            .expect("query prometheus");
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{expr}: not a JSON answer ({e}): {status} {body}"));
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Whether every target was scraped successfully.
    fn all_up(&self) -> bool {
        let up = self.query("up");
        !up.is_empty() && up.iter().all(|s| s["value"][1] == "1")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET in HTTP/1.0, so the answer is not chunked: its status line and body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: prometheus\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The dashboard's queries: (panel title, expression), with Grafana's interval variables
/// given the values Grafana would give them here.
fn panels() -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/helm/mesh/dashboards/mesh.json"
    );
    let text = std::fs::read_to_string(path).expect("the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty(), "a dashboard without panels");
    panels
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().expect("a title").to_string();
            p["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .map(move |t| {
                    let expr = t["expr"].as_str().expect("an expression");
                    (
                        title.clone(),
                        expr.replace("$__rate_interval", "15s")
                            .replace("$__range", "5m"),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_dashboard_panel_has_data_from_a_real_prometheus() {
    let test = "every_dashboard_panel_has_data_from_a_real_prometheus";
    if !privileged(test) || !installed(test, &[("prometheus", &["--version"], "prometheus")]) {
        return;
    }
    let c = up(&[]);
    let targets = [
        ("node-1", forward(&c.names.node("node-1"), AGENT_ADMIN)),
        ("node-2", forward(&c.names.node("node-2"), AGENT_ADMIN)),
        ("controller", forward(&c.names.fabric(), CONTROLLER_ADMIN)),
    ];
    let prometheus = Prometheus::start(&targets);

    // Traffic for every panel while Prometheus scrapes: TCP and HTTP through the mesh, and
    // calls the policy refuses.
    let web = format!("http://{WEB_VIP}/");
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        assert!(call(&c, "demo/client", ECHO_VIP).status.success());
        let out = c
            .exec(
                "demo/client",
                &["curl", "-sS", "-o", "/dev/null", &web, &web],
            )
            .expect("curl");
        assert!(out.status.success(), "{out:?}");
        assert!(
            !call(&c, "demo/intruder", ECHO_VIP).status.success(),
            "the intruder is refused"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !prometheus.all_up() {
        assert!(
            Instant::now() < deadline,
            "not every target is scraped: {:?}",
            prometheus.query("up")
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let mut empty = Vec::new();
    for (title, expr) in panels() {
        let result = prometheus.query(&expr);
        if result.is_empty() {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n  {}",
        empty.join("\n  ")
    );

    // The traffic panels show the traffic, not only series.
    let positive = |expr: &str| {
        prometheus.query(expr).iter().any(|s| {
            s["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        })
    };
    for expr in [
        r#"sum(rate(istio_requests_total{reporter="destination"}[15s]))"#,
        r#"sum(rate(istio_tcp_connections_opened_total{reporter="destination"}[15s]))"#,
        r#"sum(increase(mesh_tcp_connections_denied_total[5m]))"#,
        r#"min(mesh_datapath_counters_readable)"#,
    ] {
        assert!(positive(expr), "{expr} shows nothing");
    }
}
