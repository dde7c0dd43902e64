//! The stock mode's pure parts: the counters' verdict, the tables, the resources.
use super::*;

fn counted(connections: u64, requests: u64, paths: &[&str], routes: &[&str]) -> ProxyCounters {
    ProxyCounters {
        connections,
        bytes: connections * 1000,
        requests,
        paths: paths.iter().map(|s| s.to_string()).collect(),
        routes: routes.iter().map(|s| s.to_string()).collect(),
        iptables_redirected: None,
    }
}

fn through_the_mesh() -> StockResult {
    let values = |v: f64| {
        MEASURES
            .iter()
            .flat_map(|m| m.figures())
            .map(|(k, _, _)| (k, vec![v, v * 1.5, v * 0.5]))
            .collect()
    };
    StockResult {
        secs: 3,
        rounds: 3,
        no_mesh: StockSide {
            values: values(100.0),
            ..StockSide::default()
        },
        mesh: StockSide {
            values: values(40.0),
            l4: counted(500, 0, &["hbone"], &[]),
            http: counted(
                130,
                9000,
                &["hbone"],
                &["TrafficTarget bench/client-to-server-http#nginx"],
            ),
            http_requests: 8990,
        },
        seconds: 40.0,
    }
}

#[test]
fn the_mesh_runs_must_cross_the_proxies_and_the_others_must_not() {
    through_the_mesh()
        .verify()
        .expect("both sides took their path");
    let mut r = through_the_mesh();
    r.no_mesh.l4 = counted(3, 0, &["hbone"], &[]);
    assert!(format!("{:#}", r.verify().expect_err("refused")).contains("no-mesh runs to the L4"));
    let mut r = through_the_mesh();
    r.mesh.l4 = counted(0, 0, &[], &[]);
    assert!(format!("{:#}", r.verify().expect_err("refused")).contains("did not cross"));
    let mut r = through_the_mesh();
    r.mesh.l4.requests = 10;
    assert!(
        format!("{:#}", r.verify().expect_err("refused")).contains("parsed requests on the L4")
    );
    let mut r = through_the_mesh();
    r.mesh.http.requests = 100;
    assert!(format!("{:#}", r.verify().expect_err("refused")).contains("the agents counted 100"));
    let mut r = through_the_mesh();
    r.mesh.http.routes = vec!["TrafficTarget bench/client-to-server-tcp".into()];
    assert!(format!("{:#}", r.verify().expect_err("refused")).contains("\"nginx\" match"));
}

#[test]
fn the_table_has_medians_spreads_and_ratios() {
    let md = through_the_mesh().markdown();
    assert!(
        md.contains(
            "| iperf3, 1 stream | Gbit/s | 100.00 (50.00..150.00) | 40.00 (20.00..60.00) | 0.40x |"
        ),
        "{md}"
    );
    assert!(
        md.contains("|  | p99 µs | 100 (50..150) | 40 (20..60) | 0.40x |"),
        "{md}"
    );
    assert_eq!(md.matches("| 0.40x |").count(), 16, "{md}");
    assert!(md.contains("9000 requests on the HTTP port (wrk saw 8990 answered"));
    let rows = StockResult::compare_rows(&through_the_mesh(), &through_the_mesh());
    assert_eq!(rows.lines().count(), 32, "{rows}");
    assert!(rows.contains("| stock | iperf3, 1 stream, mesh | Gbit/s | 40.00 | 40.00 | 1.00x |"));
}

#[test]
fn the_bench_resources_declare_and_admit_both_nginx_ports() {
    let r = ladder::RESOURCES;
    assert!(r.contains(&format!(
        "{{name: tcp-nginx, port: {NGINX_TCP_PORT}, targetPort: {NGINX_TCP_PORT}}}"
    )));
    assert!(r.contains(&format!(
        "{{name: http-nginx, port: {NGINX_HTTP_PORT}, targetPort: {NGINX_HTTP_PORT}}}"
    )));
    // The TCP rule covers the L4 port and iperf3's, not the HTTP port (a TCP rule would
    // admit its requests without the L7 match).
    let tcp = r
        .lines()
        .find(|l| l.starts_with("spec: {matches: {ports:"))
        .expect("the TCPRoute's ports");
    assert!(tcp.contains(&NGINX_TCP_PORT.to_string()) && tcp.contains(&IPERF3_PORT.to_string()));
    assert!(!tcp.contains(&NGINX_HTTP_PORT.to_string()), "{tcp}");
    assert!(r.contains(&format!(
        "{{name: {NGINX_MATCH}, pathRegex: '/', methods: [GET]}}"
    )));
    assert!(r.contains(&format!("matches: [echo, {NGINX_MATCH}]")));
}

#[test]
fn nginx_listens_on_both_ports_of_the_pod_ip() {
    let conf = nginx_conf(Path::new("/tmp/x"));
    assert!(conf.contains(&format!("listen @POD_IP@:{NGINX_TCP_PORT} ")));
    assert!(conf.contains(&format!("listen @POD_IP@:{NGINX_HTTP_PORT} ")));
    assert!(conf.contains("access_log off;") && conf.contains("pid /tmp/x/nginx.pid;"));
    assert!(SERVER_SCRIPT.contains("@POD_IP@/$1"));
}
