//! The load generator: N calls, C at a time, and a report of what came back.
//!
//! Tcp and http1 open a new connection per call, so a mesh in between resolves and balances
//! each one; http2 sends every call as a stream of one shared h2c connection, and grpc every
//! `Say` call on one shared gRPC channel. The report counts successes, failures by
//! [`ErrorKind`](crate::client::ErrorKind), replies by the answering pod, and the latency of
//! the successful calls.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::client::{self, CallError, ErrorKind, GrpcClient, Http2Client, Mode, Target};

/// The slowest latency the histogram tells apart (an hour, in microseconds); slower calls
/// count as this.
const HIGHEST_US: u64 = 3_600_000_000;

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct LoadConfig {
    pub target: Target,
    pub mode: Mode,
    /// Calls in all, at least 1.
    pub requests: u64,
    /// Calls in flight at once, at least 1.
    pub concurrency: u64,
    /// The HTTP path (http modes only).
    pub path: String,
    /// The gRPC status code each call asks the server for, 0 for OK (grpc only).
    pub fail_code: i32,
    /// The bound on each call, connection included.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
}

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::duration::format(*d))
}

/// Why a run could not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("create the latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    #[error("merge latency histograms: {0}")]
    Merge(#[from] hdrhistogram::AdditionError),
    #[error("a load worker stopped: {0}")]
    Worker(#[from] tokio::task::JoinError),
}

/// What a run saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    pub target: Target,
    pub mode: Mode,
    pub total: u64,
    pub successes: u64,
    /// Failed calls by kind (`connect_refused`, `reset`, `timeout`, `eof`, `http_<status>`,
    /// `grpc_<code>`, `bad_reply`, ...).
    pub failures: BTreeMap<String, u64>,
    /// The first error message seen for each kind.
    pub failure_examples: BTreeMap<String, String>,
    /// Successful replies by the name of the pod that answered.
    pub pods: BTreeMap<String, u64>,
    /// Latency of successful calls; none when nothing succeeded.
    pub latency_us: Option<Latency>,
    pub elapsed_ms: u64,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// Runs the calls and reports. Failed calls are part of the report, not an error.
pub async fn run(config: &LoadConfig) -> Result<Report, LoadError> {
    let started = Instant::now();
    let histogram = Histogram::<u64>::new_with_bounds(1, HIGHEST_US, 3)?;
    let mut tally = Tally::new(histogram.clone());

    let connect = async {
        match config.mode {
            Mode::Http2 => Http2Client::connect(&config.target)
                .await
                .map(|c| Some(Shared::Http2(c))),
            Mode::Grpc => GrpcClient::connect(&config.target)
                .await
                .map(|c| Some(Shared::Grpc(c))),
            Mode::Tcp | Mode::Http1 => Ok(None),
        }
    };
    let shared = match tokio::time::timeout(config.timeout, connect).await {
        Ok(Ok(shared)) => shared,
        // Without the connection no call can be made: each counts as that failure.
        Ok(Err(e)) => {
            tally.fail(&e, config.requests);
            return Ok(tally.report(config, started.elapsed()));
        }
        Err(_) => {
            tally.fail(&CallError::Timeout(config.timeout), config.requests);
            return Ok(tally.report(config, started.elapsed()));
        }
    };

    let next = Arc::new(AtomicU64::new(0));
    let config_arc = Arc::new(config.clone());
    let mut workers = JoinSet::new();
    for _ in 0..config.concurrency.min(config.requests) {
        let next = next.clone();
        let config = config_arc.clone();
        let shared = shared.clone();
        let mut tally = Tally::new(histogram.clone());
        workers.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < config.requests {
                let began = Instant::now();
                let result = tokio::time::timeout(config.timeout, async {
                    match &shared {
                        Some(Shared::Http2(h2)) => h2.get(&config.path).await,
                        Some(Shared::Grpc(grpc)) => {
                            grpc.say(client::say_probe(config.fail_code)).await
                        }
                        None => match config.mode {
                            Mode::Tcp => client::call_tcp(&config.target).await,
                            _ => client::call_http1(&config.target, &config.path).await,
                        },
                    }
                })
                .await
                .unwrap_or(Err(CallError::Timeout(config.timeout)));
                tally.record(result.map(|reply| reply.pod), began.elapsed());
            }
            tally
        });
    }
    drop(shared);
    while let Some(worker) = workers.join_next().await {
        tally.merge(worker?)?;
    }
    Ok(tally.report(config, started.elapsed()))
}

/// The connection or channel every call of a run shares, in the modes that share one.
#[derive(Clone)]
enum Shared {
    Http2(Http2Client),
    Grpc(GrpcClient),
}

/// Counts kept by one worker, merged at the end.
struct Tally {
    successes: u64,
    failures: BTreeMap<ErrorKind, u64>,
    examples: BTreeMap<ErrorKind, String>,
    pods: BTreeMap<String, u64>,
    latency: Histogram<u64>,
}

impl Tally {
    fn new(latency: Histogram<u64>) -> Tally {
        Tally {
            successes: 0,
            failures: BTreeMap::new(),
            examples: BTreeMap::new(),
            pods: BTreeMap::new(),
            latency,
        }
    }

    fn record(&mut self, result: Result<String, CallError>, took: Duration) {
        match result {
            Ok(pod) => {
                self.successes += 1;
                *self.pods.entry(pod).or_default() += 1;
                let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                self.latency.saturating_record(us.max(1));
            }
            Err(e) => self.fail(&e, 1),
        }
    }

    fn fail(&mut self, e: &CallError, count: u64) {
        let kind = e.kind();
        *self.failures.entry(kind).or_default() += count;
        self.examples.entry(kind).or_insert_with(|| e.to_string());
    }

    fn merge(&mut self, other: Tally) -> Result<(), hdrhistogram::AdditionError> {
        self.successes += other.successes;
        for (kind, n) in other.failures {
            *self.failures.entry(kind).or_default() += n;
        }
        for (kind, message) in other.examples {
            self.examples.entry(kind).or_insert(message);
        }
        for (pod, n) in other.pods {
            *self.pods.entry(pod).or_default() += n;
        }
        self.latency.add(&other.latency)
    }

    fn report(self, config: &LoadConfig, elapsed: Duration) -> Report {
        let latency_us = (!self.latency.is_empty()).then(|| Latency {
            p50: self.latency.value_at_quantile(0.50),
            p99: self.latency.value_at_quantile(0.99),
            max: self.latency.max(),
        });
        Report {
            target: config.target.clone(),
            mode: config.mode,
            total: self.successes + self.failures.values().sum::<u64>(),
            successes: self.successes,
            failures: self
                .failures
                .into_iter()
                .map(|(kind, n)| (kind.to_string(), n))
                .collect(),
            failure_examples: self
                .examples
                .into_iter()
                .map(|(kind, message)| (kind.to_string(), message))
                .collect(),
            pods: self.pods,
            latency_us,
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

// === impl Report ===

impl Report {
    /// Calls that failed, of any kind.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// The report as an aligned table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_table(&mut out);
        out
    }

    fn write_table(&self, out: &mut String) -> std::fmt::Result {
        writeln!(out, "target     {} ({})", self.target, self.mode)?;
        writeln!(
            out,
            "requests   {} total, {} ok, {} failed",
            self.total,
            self.successes,
            self.failed()
        )?;
        writeln!(out, "elapsed    {} ms", self.elapsed_ms)?;
        match &self.latency_us {
            Some(l) => writeln!(
                out,
                "latency    p50 {} us, p99 {} us, max {} us",
                l.p50, l.p99, l.max
            )?,
            None => writeln!(out, "latency    -")?,
        }
        let width = self
            .pods
            .keys()
            .chain(self.failures.keys())
            .map(String::len)
            .max()
            .unwrap_or(0);
        if !self.pods.is_empty() {
            writeln!(out, "replies by pod")?;
            for (pod, n) in &self.pods {
                writeln!(out, "  {pod:<width$}  {n:>8}")?;
            }
        }
        if !self.failures.is_empty() {
            writeln!(out, "failures by kind")?;
            for (kind, n) in &self.failures {
                let example = self.failure_examples.get(kind).map_or("", String::as_str);
                writeln!(out, "  {kind:<width$}  {n:>8}  e.g. {example}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            target: "127.0.0.1:9000".parse().expect("target"),
            mode: Mode::Tcp,
            total: 5,
            successes: 3,
            failures: BTreeMap::from([("connect_refused".into(), 2)]),
            failure_examples: BTreeMap::from([(
                "connect_refused".into(),
                "connect: Connection refused".into(),
            )]),
            pods: BTreeMap::from([("a".into(), 2), ("b".into(), 1)]),
            latency_us: Some(Latency {
                p50: 100,
                p99: 900,
                max: 950,
            }),
            elapsed_ms: 12,
        }
    }

    #[test]
    fn table_lists_pods_and_failure_kinds() {
        let table = report().table();
        assert!(table.contains("5 total, 3 ok, 2 failed"), "{table}");
        assert!(table.contains("p50 100 us, p99 900 us"), "{table}");
        assert!(table.contains("  a                       2"), "{table}");
        assert!(
            table.contains("connect_refused         2  e.g. connect"),
            "{table}"
        );
    }

    #[test]
    fn json_has_the_documented_fields() {
        let json = serde_json::to_value(report()).expect("serialize");
        assert_eq!(json["target"], "127.0.0.1:9000");
        assert_eq!(json["mode"], "tcp");
        assert_eq!(json["total"], 5);
        assert_eq!(json["successes"], 3);
        assert_eq!(json["failures"]["connect_refused"], 2);
        assert_eq!(json["pods"]["a"], 2);
        assert_eq!(json["latency_us"]["p99"], 900);
    }

    #[test]
    fn tallies_merge() {
        let histogram = Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("histogram");
        let mut a = Tally::new(histogram.clone());
        let mut b = Tally::new(histogram);
        a.record(Ok("x".into()), Duration::from_micros(100));
        b.record(Ok("x".into()), Duration::from_micros(300));
        b.record(Err(CallError::BadReply("nope".into())), Duration::ZERO);
        a.merge(b).expect("same bounds");
        let config = LoadConfig {
            target: "127.0.0.1:1".parse().expect("target"),
            mode: Mode::Http1,
            requests: 3,
            concurrency: 1,
            path: "/".into(),
            fail_code: 0,
            timeout: Duration::from_secs(1),
        };
        let report = a.report(&config, Duration::from_millis(5));
        assert_eq!(report.total, 3);
        assert_eq!(report.successes, 2);
        assert_eq!(report.pods["x"], 2);
        assert_eq!(report.failures["bad_reply"], 1);
        assert_eq!(
            report.failure_examples["bad_reply"],
            "unexpected reply: nope"
        );
        let latency = report.latency_us.expect("two successes");
        assert!((299..=301).contains(&latency.max), "{latency:?}");
    }
}
