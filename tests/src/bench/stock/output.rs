//! What the stock tools print, read into figures. A run that failed anywhere (a socket error,
//! a response that is not 2xx, a request hey gave up on, an iperf3 error) is an error here,
//! never a figure: a load generator's rate counts its failures as fast answers.
use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

/// One run of an HTTP load generator (wrk or hey).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpRun {
    /// Requests answered (2xx) within the run.
    pub requests: u64,
    pub per_s: f64,
    /// Latency percentiles, µs.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `wrk --latency`'s report: `N requests in ...`, `Requests/sec:` and the `50%` and `99%`
/// lines of the latency distribution. Fails on `Socket errors:` (connect, read, write,
/// timeout), on `Non-2xx or 3xx responses:` and when no request completed.
pub fn wrk(text: &str) -> Result<HttpRun> {
    let (mut requests, mut per_s, mut p50, mut p99) = (None, None, None, None);
    for line in text.lines().map(str::trim) {
        if let Some(errors) = line.strip_prefix("Socket errors:") {
            let total: u64 = errors
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            ensure!(total == 0, "wrk: socket errors ({})", errors.trim());
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            bail!("wrk: {} responses were not 2xx or 3xx", n.trim());
        } else if let Some(rate) = line.strip_prefix("Requests/sec:") {
            per_s = Some(number(rate.trim(), "wrk's Requests/sec")?);
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            requests = Some(
                n.trim()
                    .parse::<u64>()
                    .with_context(|| format!("wrk's request count in {line:?}"))?,
            );
        } else if let [pct @ ("50%" | "99%"), value] =
            line.split_whitespace().collect::<Vec<_>>()[..]
        {
            let us = wrk_duration_us(value)?;
            if pct == "50%" {
                p50 = Some(us);
            } else {
                p99 = Some(us);
            }
        }
    }
    let requests = requests.with_context(|| format!("wrk printed no summary:\n{text}"))?;
    ensure!(requests > 0, "wrk completed no request:\n{text}");
    let per_s = per_s.with_context(|| format!("wrk printed no Requests/sec:\n{text}"))?;
    let (Some(p50_us), Some(p99_us)) = (p50, p99) else {
        bail!("wrk printed no latency distribution (it needs --latency):\n{text}");
    };
    Ok(HttpRun {
        requests,
        per_s,
        p50_us,
        p99_us,
    })
}

/// A duration as wrk prints it (`19.00us`, `2.96ms`, `1.00s`, `1.50m`, `1.00h`), in µs.
fn wrk_duration_us(s: &str) -> Result<f64> {
    let (n, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600e6)
    } else {
        bail!("wrk's duration {s:?} has no unit");
    };
    Ok(number(n, "a wrk duration")? * scale)
}

/// hey's summary: `Requests/sec:`, the `50%` and `99%` lines of `Latency distribution:`
/// (seconds) and `Status code distribution:`. Fails on any line of `Error distribution:`
/// (hey counts those requests in its rate), on a status that is not 2xx and when no request
/// was answered.
pub fn hey(text: &str) -> Result<HttpRun> {
    #[derive(PartialEq)]
    enum Section {
        Other,
        Latency,
        Status,
        Errors,
    }
    let mut section = Section::Other;
    let (mut requests, mut per_s, mut p50, mut p99) = (0u64, None, None, None);
    let mut failed = 0u64;
    let mut first_error = None;
    for line in text.lines().map(str::trim) {
        match line {
            "" => continue,
            "Latency distribution:" => section = Section::Latency,
            "Status code distribution:" => section = Section::Status,
            "Error distribution:" => section = Section::Errors,
            l if l.ends_with(':') => section = Section::Other,
            _ => {}
        }
        if let Some(rate) = line.strip_prefix("Requests/sec:") {
            per_s = Some(number(rate.trim(), "hey's Requests/sec")?);
            continue;
        }
        match section {
            Section::Latency => {
                if let [pct @ ("50%" | "99%"), "in", secs, "secs"] =
                    line.split_whitespace().collect::<Vec<_>>()[..]
                {
                    let us = number(secs, "a hey latency")? * 1e6;
                    if pct == "50%" {
                        p50 = Some(us);
                    } else {
                        p99 = Some(us);
                    }
                }
            }
            Section::Status => {
                // `[200]	16557 responses`
                let Some((code, rest)) = bracketed(line) else {
                    continue;
                };
                let n: u64 = rest
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("hey's status line {line:?}"))?;
                ensure!(
                    code.starts_with('2'),
                    "hey: {n} responses with status {code}"
                );
                requests += n;
            }
            Section::Errors => {
                // `[22200]	Get "http://...": dial tcp ...: connect: connection refused`
                if let Some((n, what)) = bracketed(line) {
                    failed += n.parse::<u64>().unwrap_or(1);
                    first_error.get_or_insert_with(|| what.trim().to_string());
                }
            }
            Section::Other => {}
        }
    }
    if let Some(what) = first_error {
        bail!("hey: {failed} requests failed, e.g. {what}");
    }
    ensure!(requests > 0, "hey: no request was answered:\n{text}");
    let per_s = per_s.with_context(|| format!("hey printed no Requests/sec:\n{text}"))?;
    let (Some(p50_us), Some(p99_us)) = (p50, p99) else {
        bail!("hey printed no latency distribution:\n{text}");
    };
    Ok(HttpRun {
        requests,
        per_s,
        p50_us,
        p99_us,
    })
}

/// `[x] rest` -> (`x`, `rest`).
fn bracketed(line: &str) -> Option<(&str, &str)> {
    line.strip_prefix('[')?.split_once(']')
}

fn number(s: &str, what: &str) -> Result<f64> {
    let v: f64 = s
        .parse()
        .with_context(|| format!("{what}: {s:?} is not a number"))?;
    ensure!(v.is_finite(), "{what}: {s:?} is not a finite number");
    Ok(v)
}

/// What the stock mode and the ladder read of `iperf3 -c -J`'s report.
#[derive(Debug, Deserialize)]
pub(crate) struct Iperf3Report {
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub end: Option<Iperf3End>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Iperf3End {
    /// Client to server.
    #[serde(default)]
    pub sum_received: Option<Iperf3Sum>,
    /// Server to client (`--bidir` only).
    #[serde(default)]
    pub sum_received_bidir_reverse: Option<Iperf3Sum>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Iperf3Sum {
    pub bytes: u64,
    pub seconds: f64,
    pub bits_per_second: f64,
}

/// `iperf3 -c -J`'s report: what the server received, Gbit/s (10^9 bits). Fails on the
/// report's `error` and when nothing arrived.
pub fn iperf3(json: &[u8]) -> Result<f64> {
    let report: Iperf3Report = serde_json::from_slice(json).with_context(|| {
        format!(
            "iperf3's JSON report: {}",
            String::from_utf8_lossy(json).trim()
        )
    })?;
    if let Some(error) = report.error {
        bail!("iperf3: {error}");
    }
    let sum = report
        .end
        .and_then(|e| e.sum_received)
        .context("iperf3's report has no end.sum_received")?;
    ensure!(
        sum.bytes > 0 && sum.bits_per_second > 0.0,
        "iperf3: nothing arrived"
    );
    Ok(sum.bits_per_second / 1e9)
}

#[cfg(test)]
mod tests;
