//! The parsers against what the tools printed on a Debian 12 machine (wrk 4.1.0, hey 0.1.4,
//! iperf3 3.12), against nginx 1.22 on loopback or against servers made to fail.
use super::*;

/// `wrk -t1 -c1 -d2s --latency` against nginx on loopback.
const WRK_1_CONNECTION: &str = r##"Running 2s test @ http://127.0.0.1:18081/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   111.35us  485.30us   5.20ms   95.85%
    Req/Sec    46.45k     4.78k   49.97k    90.00%
  Latency Distribution
     50%   19.00us
     75%   19.00us
     90%   23.00us
     99%    2.96ms
  92255 requests in 2.00s, 13.20MB read
Requests/sec:  46108.39
Transfer/sec:      6.60MB
"##;

/// `wrk -t2 -c64 -d2s --latency`: a distribution in µs and ms.
const WRK_64_CONNECTIONS: &str = r##"Running 2s test @ http://127.0.0.1:18081/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.38ms    2.00ms  22.55ms   88.60%
    Req/Sec    33.15k     6.57k   51.56k    65.00%
  Latency Distribution
     50%  729.00us
     75%    1.35ms
     90%    3.65ms
     99%    9.79ms
  132418 requests in 2.01s, 18.94MB read
Requests/sec:  65808.26
Transfer/sec:      9.41MB
"##;

/// A path nginx has no file for: every answer a 404.
const WRK_NOT_FOUND: &str = r##"Running 1s test @ http://127.0.0.1:18081/missing
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    78.88us  340.39us   4.08ms   97.01%
    Req/Sec    37.81k     6.01k   42.12k    90.00%
  Latency Distribution
     50%   22.00us
     75%   26.00us
     90%   29.00us
     99%    2.23ms
  37515 requests in 1.00s, 11.02MB read
  Non-2xx or 3xx responses: 37515
Requests/sec:  37368.70
Transfer/sec:     10.98MB
"##;

/// nginx killed a second into the run: answers, then socket errors.
const WRK_SERVER_KILLED: &str = r##"Running 2s test @ http://127.0.0.1:18081/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    80.66us  313.94us   5.55ms   98.60%
    Req/Sec    57.62k     4.77k   62.00k    80.00%
  Latency Distribution
     50%   49.00us
     75%   55.00us
     90%   59.00us
     99%    1.22ms
  57460 requests in 2.01s, 8.22MB read
  Socket errors: connect 0, read 8, write 408, timeout 0
Requests/sec:  28612.22
Transfer/sec:      4.09MB
"##;

/// A server that resets every connection: socket errors and no answer.
const WRK_CONNECTIONS_RESET: &str = r##"Running 1s test @ http://127.0.0.1:18092/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.00s, 0.00B read
  Socket errors: connect 0, read 1163, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:       0.00B
"##;

/// A server that accepts and never answers (`--timeout 1s`): no answer, and no socket
/// errors line either.
const WRK_NO_ANSWER: &str = r##"Running 2s test @ http://127.0.0.1:18091/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 2.01s, 0.00B read
Requests/sec:      0.00
Transfer/sec:       0.00B
"##;

/// Nothing listening: wrk stops at once.
const WRK_REFUSED: &str = r##"unable to connect to 127.0.0.1:18089 Connection refused
"##;

/// `hey -z 2s -c 32 -disable-keepalive` against nginx on loopback.
const HEY_NEW_CONNECTIONS: &str = r##"
Summary:
  Total:	2.0009 secs
  Slowest:	0.0288 secs
  Fastest:	0.0001 secs
  Average:	0.0038 secs
  Requests/sec:	8274.7169
  
  Total data:	49671 bytes
  Size/request:	3 bytes

Response time histogram:
  0.000 [1]	|
  0.003 [8449]	|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■
  0.006 [5123]	|■■■■■■■■■■■■■■■■■■■■■■■■
  0.009 [1799]	|■■■■■■■■■
  0.012 [586]	|■■■
  0.014 [253]	|■
  0.017 [286]	|■
  0.020 [31]	|
  0.023 [23]	|
  0.026 [3]	|
  0.029 [3]	|


Latency distribution:
  10% in 0.0011 secs
  25% in 0.0018 secs
  50% in 0.0029 secs
  75% in 0.0049 secs
  90% in 0.0075 secs
  95% in 0.0102 secs
  99% in 0.0157 secs

Details (average, fastest, slowest):
  DNS+dialup:	0.0006 secs, 0.0001 secs, 0.0288 secs
  DNS-lookup:	0.0000 secs, 0.0000 secs, 0.0000 secs
  req write:	0.0005 secs, 0.0000 secs, 0.0248 secs
  resp wait:	0.0017 secs, 0.0000 secs, 0.0159 secs
  resp read:	0.0010 secs, 0.0000 secs, 0.0170 secs

Status code distribution:
  [200]	16557 responses



"##;

/// Every answer a 404.
const HEY_NOT_FOUND: &str = r##"
Summary:
  Total:	1.0012 secs
  Slowest:	0.0143 secs
  Fastest:	0.0001 secs
  Average:	0.0007 secs
  Requests/sec:	5418.2862
  
  Total data:	830025 bytes
  Size/request:	153 bytes

Response time histogram:
  0.000 [1]	|
  0.002 [5077]	|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■
  0.003 [263]	|■■
  0.004 [32]	|
  0.006 [38]	|
  0.007 [9]	|
  0.009 [0]	|
  0.010 [0]	|
  0.011 [1]	|
  0.013 [3]	|
  0.014 [1]	|


Latency distribution:
  10% in 0.0003 secs
  25% in 0.0004 secs
  50% in 0.0005 secs
  75% in 0.0008 secs
  90% in 0.0013 secs
  95% in 0.0017 secs
  99% in 0.0043 secs

Details (average, fastest, slowest):
  DNS+dialup:	0.0002 secs, 0.0001 secs, 0.0143 secs
  DNS-lookup:	0.0000 secs, 0.0000 secs, 0.0000 secs
  req write:	0.0001 secs, 0.0000 secs, 0.0050 secs
  resp wait:	0.0003 secs, 0.0000 secs, 0.0119 secs
  resp read:	0.0001 secs, 0.0000 secs, 0.0050 secs

Status code distribution:
  [404]	5425 responses



"##;

/// nginx killed a second into the run: answers, then refused connections.
const HEY_SERVER_KILLED: &str = r##"
Summary:
  Total:	2.0088 secs
  Slowest:	0.0165 secs
  Fastest:	0.0001 secs
  Average:	0.0006 secs
  Requests/sec:	3665.3596
  
  Total data:	20862 bytes
  Size/request:	3 bytes

Response time histogram:
  0.000 [1]	|
  0.002 [6705]	|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■
  0.003 [73]	|
  0.005 [129]	|■
  0.007 [18]	|
  0.008 [5]	|
  0.010 [12]	|
  0.012 [1]	|
  0.013 [7]	|
  0.015 [0]	|
  0.016 [3]	|


Latency distribution:
  10% in 0.0002 secs
  25% in 0.0003 secs
  50% in 0.0004 secs
  75% in 0.0005 secs
  90% in 0.0007 secs
  95% in 0.0011 secs
  99% in 0.0046 secs

Details (average, fastest, slowest):
  DNS+dialup:	0.0001 secs, 0.0001 secs, 0.0165 secs
  DNS-lookup:	0.0000 secs, 0.0000 secs, 0.0000 secs
  req write:	0.0001 secs, 0.0000 secs, 0.0122 secs
  resp wait:	0.0002 secs, 0.0000 secs, 0.0088 secs
  resp read:	0.0001 secs, 0.0000 secs, 0.0123 secs

Status code distribution:
  [200]	6954 responses

Error distribution:
  [1]	Get "http://127.0.0.1:18081/": EOF
  [408]	Get "http://127.0.0.1:18081/": dial tcp 127.0.0.1:18081: connect: connection refused

"##;

/// Nothing listening: hey's rate counts the refused connections.
const HEY_REFUSED: &str = r##"
Summary:
  Total:	1.0004 secs
  Slowest:	0.0000 secs
  Fastest:	0.0000 secs
  Average:	 NaN secs
  Requests/sec:	22191.5698
  

Response time histogram:


Latency distribution:

Details (average, fastest, slowest):
  DNS+dialup:	 NaN secs, 0.0000 secs, 0.0000 secs
  DNS-lookup:	 NaN secs, 0.0000 secs, 0.0000 secs
  req write:	 NaN secs, 0.0000 secs, 0.0000 secs
  resp wait:	 NaN secs, 0.0000 secs, 0.0000 secs
  resp read:	 NaN secs, 0.0000 secs, 0.0000 secs

Status code distribution:

Error distribution:
  [22200]	Get "http://127.0.0.1:18089/": dial tcp 127.0.0.1:18089: connect: connection refused

"##;

/// A server that never answers (`-t 1`).
const HEY_NO_ANSWER: &str = r##"
Summary:
  Total:	2.0114 secs
  Slowest:	0.0000 secs
  Fastest:	0.0000 secs
  Average:	 NaN secs
  Requests/sec:	1.9887
  

Response time histogram:


Latency distribution:

Details (average, fastest, slowest):
  DNS+dialup:	 NaN secs, 0.0000 secs, 0.0000 secs
  DNS-lookup:	 NaN secs, 0.0000 secs, 0.0000 secs
  req write:	 NaN secs, 0.0000 secs, 0.0000 secs
  resp wait:	 NaN secs, 0.0000 secs, 0.0000 secs
  resp read:	 NaN secs, 0.0000 secs, 0.0000 secs

Status code distribution:

Error distribution:
  [4]	Get "http://127.0.0.1:18091/": context deadline exceeded (Client.Timeout exceeded while awaiting headers)

"##;

/// `iperf3 -c 127.0.0.1 -t 1 -J`.
const IPERF3_ONE_STREAM: &str = r##"{
	"start":	{
		"connected":	[{
				"socket":	5,
				"local_host":	"127.0.0.1",
				"local_port":	42084,
				"remote_host":	"127.0.0.1",
				"remote_port":	15201
			}],
		"version":	"iperf 3.12",
		"system_info":	"Linux vm 6.18.44-fc-v1300 #1 SMP PREEMPT_DYNAMIC @0 x86_64",
		"timestamp":	{
			"time":	"Mon, 07 Dec 2026 17:46:49 GMT",
			"timesecs":	1796665609
		},
		"connecting_to":	{
			"host":	"127.0.0.1",
			"port":	15201
		},
		"cookie":	"zfkmdvhxsxp3fberuahmirxrle2siag7qcwm",
		"tcp_mss_default":	32768,
		"target_bitrate":	0,
		"sock_bufsize":	0,
		"sndbuf_actual":	16384,
		"rcvbuf_actual":	131072,
		"test_start":	{
			"protocol":	"TCP",
			"num_streams":	1,
			"blksize":	131072,
			"omit":	0,
			"duration":	1,
			"bytes":	0,
			"blocks":	0,
			"reverse":	0,
			"tos":	0,
			"target_bitrate":	0
		}
	},
	"intervals":	[{
			"streams":	[{
					"socket":	5,
					"start":	0,
					"end":	1.000125,
					"seconds":	1.0001250505447388,
					"bytes":	2620129280,
					"bits_per_second":	20958413378.9901,
					"retransmits":	0,
					"snd_cwnd":	2750286,
					"snd_wnd":	386048,
					"rtt":	123,
					"rttvar":	76,
					"pmtu":	65535,
					"omitted":	false,
					"sender":	true
				}],
			"sum":	{
				"start":	0,
				"end":	1.000125,
				"seconds":	1.0001250505447388,
				"bytes":	2620129280,
				"bits_per_second":	20958413378.9901,
				"retransmits":	0,
				"omitted":	false,
				"sender":	true
			}
		}],
	"end":	{
		"streams":	[{
				"sender":	{
					"socket":	5,
					"start":	0,
					"end":	1.000125,
					"seconds":	1.000125,
					"bytes":	2620129280,
					"bits_per_second":	20958414438.195229,
					"retransmits":	0,
					"max_snd_cwnd":	2750286,
					"max_snd_wnd":	386048,
					"max_rtt":	123,
					"min_rtt":	123,
					"mean_rtt":	123,
					"sender":	true
				},
				"receiver":	{
					"socket":	5,
					"start":	0,
					"end":	1.000634,
					"seconds":	1.000125,
					"bytes":	2612396032,
					"bits_per_second":	20885926578.5492,
					"sender":	true
				}
			}],
		"sum_sent":	{
			"start":	0,
			"end":	1.000125,
			"seconds":	1.000125,
			"bytes":	2620129280,
			"bits_per_second":	20958414438.195229,
			"retransmits":	0,
			"sender":	true
		},
		"sum_received":	{
			"start":	0,
			"end":	1.000634,
			"seconds":	1.000634,
			"bytes":	2612396032,
			"bits_per_second":	20885926578.5492,
			"sender":	true
		},
		"cpu_utilization_percent":	{
			"host_total":	33.0203169378388,
			"host_user":	0.1245341205514255,
			"host_system":	32.895782817287369,
			"remote_total":	64.819356334520577,
			"remote_user":	2.2969207830157377,
			"remote_system":	62.522435551504827
		},
		"sender_tcp_congestion":	"bbr",
		"receiver_tcp_congestion":	"bbr"
	}
}
"##;

/// `iperf3 -c -J` with no server.
const IPERF3_REFUSED: &str = r##"{
	"start":	{
		"connected":	[],
		"version":	"iperf 3.12",
		"system_info":	"Linux vm 6.18.44-fc-v1300 #1 SMP PREEMPT_DYNAMIC @0 x86_64"
	},
	"intervals":	[],
	"end":	{
	},
	"error":	"unable to connect to server: Connection refused"
}
"##;

fn failure(r: Result<HttpRun>) -> String {
    format!("{:#}", r.expect_err("a failed run is no figure"))
}

#[test]
fn wrk_reports_rate_requests_and_percentiles() {
    let one = wrk(WRK_1_CONNECTION).expect("a clean run");
    assert_eq!(
        one,
        HttpRun {
            requests: 92255,
            per_s: 46108.39,
            p50_us: 19.0,
            p99_us: 2960.0,
        }
    );
    let many = wrk(WRK_64_CONNECTIONS).expect("a clean run");
    assert_eq!((many.requests, many.per_s), (132418, 65808.26));
    assert_eq!((many.p50_us, many.p99_us), (729.0, 9790.0));
}

#[test]
fn wrk_durations_in_every_unit() {
    for (s, us) in [
        ("19.00us", 19.0),
        ("1.35ms", 1350.0),
        ("1.50s", 1.5e6),
        ("2.00m", 120e6),
        ("1.00h", 3600e6),
    ] {
        assert!((wrk_duration_us(s).expect(s) - us).abs() < 1e-6, "{s}");
    }
    assert!(wrk_duration_us("12").is_err());
}

#[test]
fn a_wrk_run_with_errors_is_a_failure_not_a_figure() {
    let e = failure(wrk(WRK_NOT_FOUND));
    assert!(e.contains("37515 responses were not 2xx or 3xx"), "{e}");
    let e = failure(wrk(WRK_SERVER_KILLED));
    assert!(
        e.contains("socket errors (connect 0, read 8, write 408, timeout 0)"),
        "{e}"
    );
    let e = failure(wrk(WRK_CONNECTIONS_RESET));
    assert!(e.contains("read 1163"), "{e}");
    let e = failure(wrk(WRK_NO_ANSWER));
    assert!(e.contains("completed no request"), "{e}");
    let e = failure(wrk(WRK_REFUSED));
    assert!(
        e.contains("no summary") && e.contains("Connection refused"),
        "{e}"
    );
    // Without --latency there is no distribution to read.
    let without: String = WRK_1_CONNECTION
        .lines()
        .filter(|l| !(l.contains('%') && l.trim_start().starts_with(['5', '7', '9'])))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(failure(wrk(&without)).contains("--latency"));
}

#[test]
fn hey_reports_rate_answers_and_percentiles() {
    let run = hey(HEY_NEW_CONNECTIONS).expect("a clean run");
    assert_eq!(run.requests, 16557);
    assert!((run.per_s - 8274.7169).abs() < 1e-9);
    assert!((run.p50_us - 2900.0).abs() < 1e-6, "{run:?}");
    assert!((run.p99_us - 15700.0).abs() < 1e-6, "{run:?}");
}

#[test]
fn a_hey_run_with_errors_or_other_statuses_is_a_failure() {
    let e = failure(hey(HEY_NOT_FOUND));
    assert!(e.contains("5425 responses with status 404"), "{e}");
    // 6954 answers, one connection cut and 408 refused: the rate would count them all.
    let e = failure(hey(HEY_SERVER_KILLED));
    assert!(
        e.contains("409 requests failed, e.g. Get \"http://127.0.0.1:18081/\": EOF"),
        "{e}"
    );
    let e = failure(hey(HEY_REFUSED));
    assert!(e.contains("22200 requests failed"), "{e}");
    let e = failure(hey(HEY_NO_ANSWER));
    assert!(
        e.contains("4 requests failed") && e.contains("Client.Timeout"),
        "{e}"
    );
    assert!(failure(hey("")).contains("no request was answered"));
}

#[test]
fn iperf3_reports_what_the_server_received() {
    let gbit = iperf3(IPERF3_ONE_STREAM.as_bytes()).expect("a clean run");
    assert!((gbit - 20.8859265785492).abs() < 1e-9, "{gbit}");
    let e = format!(
        "{:#}",
        iperf3(IPERF3_REFUSED.as_bytes()).expect_err("no server")
    );
    assert!(
        e.contains("iperf3: unable to connect to server: Connection refused"),
        "{e}"
    );
    assert!(iperf3(b"").is_err());
    assert!(iperf3(br#"{"end": {}}"#).is_err());
}
