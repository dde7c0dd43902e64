//! The load generator, run inside the client pod (`mesh-bench client ...`): the same code for
//! every step, speaking raw TCP, HTTP/1.1 or gRPC to the [server](super::server).
//!
//! - `rr`: closed-loop round trips on one connection as fast as they come back; latency is each
//!   round trip's own time, the rate what the path sustains.
//! - `fixed`: round trips started on an open-loop schedule at a fixed rate; each latency is
//!   measured from the *intended* send time, so a stall counts against every request it
//!   delayed (no coordinated omission).
//! - `bulk`: one stream of bytes one way (gRPC: a `Chat` stream of 64 KiB messages, each
//!   echoed back), throughput in MB/s.
//! - `duplex` (TCP): several connections to the echo port, each sending for a time while the
//!   echo comes back on the same connection, so every hop carries full load both ways at
//!   once; every byte sent must come back. Throughput in MB/s, both directions summed.
//! - `hold`: opens connections, says `held`, keeps them until stdin closes.
//! - `churn` (the restart scenario): until stdin closes, new connections one after another
//!   on two threads, one connection held open with a round trip every 10 ms, and HTTP
//!   requests on a kept-alive connection; prints every outcome with its wall-clock time
//!   ([`Churn`]).
//!
//! Each prints one JSON object ([`Sample`]) on stdout.
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hdrhistogram::Histogram;
use mesh_demo::grpc::proto::{SayRequest, echo_client::EchoClient};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use super::wire::{self, Retry};

/// The protocol a step speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Http,
    Grpc,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Http => "http",
            Proto::Grpc => "grpc",
        }
    }

    fn parse(s: &str) -> Result<Proto> {
        Ok(match s {
            "tcp" => Proto::Tcp,
            "http" => Proto::Http,
            "grpc" => Proto::Grpc,
            _ => bail!("unknown protocol {s:?} (tcp, http, grpc)"),
        })
    }
}

/// What one client run measured. Latencies in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    /// Round trips per second (measured part only).
    pub per_s: f64,
    /// Every round trip made, warm-up included (for CPU per request).
    pub requests: u64,
    /// Bulk: payload bytes sent, and MB/s.
    pub bytes: u64,
    pub mb_per_s: f64,
}

/// `client PROTO rr|fixed|bulk|duplex|hold ADDR ARGS...`
pub fn main(args: &[String]) -> Result<()> {
    let (Some(proto), Some(kind), Some(addr)) = (args.first(), args.get(1), args.get(2)) else {
        bail!("usage: client tcp|http|grpc rr|fixed|bulk|duplex|hold ADDR ...");
    };
    let proto = Proto::parse(proto)?;
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack (1 ns instead of
    // 50 µs), so the fixed-rate schedule's sleeps end when asked.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let num = |i: usize| -> Result<u64> {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("argument {i} must be a number"))
    };
    let sample = match kind.as_str() {
        "rr" => rr(proto, addr, num(3)? as usize, num(4)?)?,
        "fixed" => fixed(proto, addr, num(3)? as usize, num(4)?, num(5)?)?,
        "bulk" => bulk(proto, addr, num(3)?)?,
        "duplex" if proto == Proto::Tcp => duplex(addr, num(3)? as usize, num(4)?)?,
        "hold" => return hold(proto, addr, num(3)? as usize),
        "churn" => {
            let http = args.get(3).context("churn needs the HTTP address")?;
            println!("{}", serde_json::to_string(&churn(addr, http)?)?);
            return Ok(());
        }
        other => bail!("unknown client command {other:?}"),
    };
    println!("{}", serde_json::to_string(&sample)?);
    Ok(())
}

// === Round trips ===

/// One connection that does round trips of a fixed size.
enum Conn {
    Tcp(TcpStream),
    Http(BufReader<TcpStream>),
    Grpc(Box<GrpcConn>),
}

struct GrpcConn {
    rt: tokio::runtime::Runtime,
    client: EchoClient<Channel>,
}

impl Conn {
    fn open(proto: Proto, addr: &str) -> Result<Conn> {
        Ok(match proto {
            Proto::Tcp => Conn::Tcp(tcp(addr)?),
            Proto::Http => Conn::Http(BufReader::with_capacity(256 * 1024, tcp(addr)?)),
            Proto::Grpc => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let channel = rt.block_on(
                    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                        .tcp_nodelay(true)
                        .connect(),
                )?;
                let client = EchoClient::new(channel);
                Conn::Grpc(Box::new(GrpcConn { rt, client }))
            }
        })
    }

    /// Sends `req` (the request payload) and waits for an answer of the same size.
    fn round_trip(&mut self, req: &[u8], resp: &mut [u8]) -> Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.write_all(req)?;
                wire::read_exact(s, resp)?;
            }
            Conn::Http(r) => {
                let mut out = wire::request_head("/echo", req.len() as u64);
                out.extend_from_slice(req);
                r.get_ref().write_all(&out)?;
                let head = wire::read_head(r)?.context("the server closed")?;
                ensure!(head.start.contains(" 200"), "HTTP answer {:?}", head.start);
                let n = wire::skip_body(r, head.framing)?;
                ensure!(
                    n == req.len() as u64,
                    "answered {n} bytes, not {}",
                    req.len()
                );
            }
            Conn::Grpc(g) => {
                let message = String::from_utf8_lossy(req).into_owned();
                let reply =
                    g.rt.block_on(g.client.say(SayRequest {
                        message,
                        ..SayRequest::default()
                    }))?
                    .into_inner();
                ensure!(reply.message.len() == req.len(), "short gRPC echo");
            }
        }
        Ok(())
    }
}

fn tcp(addr: &str) -> Result<TcpStream> {
    let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn histogram() -> Result<Histogram<u64>> {
    // 1 µs to 60 s, 3 significant digits.
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

fn percentiles(h: &Histogram<u64>) -> Sample {
    let q = |q: f64| h.value_at_quantile(q) as f64;
    Sample {
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
        ..Sample::default()
    }
}

fn payload(size: usize) -> (Vec<u8>, Vec<u8>) {
    (vec![b'a'; size], vec![0u8; size])
}

/// `n` closed-loop round trips after `n / 10` (at least 100) to warm up.
fn rr(proto: Proto, addr: &str, size: usize, n: u64) -> Result<Sample> {
    let mut c = Conn::open(proto, addr)?;
    let (req, mut resp) = payload(size);
    let warm = (n / 10).max(100);
    for _ in 0..warm {
        c.round_trip(&req, &mut resp)?;
    }
    let mut h = histogram()?;
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        c.round_trip(&req, &mut resp)?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Sample {
        per_s: n as f64 / secs,
        requests: warm + n,
        ..percentiles(&h)
    })
}

/// Round trips started every `1 / rate` s for `millis` ms, latency from the intended start.
fn fixed(proto: Proto, addr: &str, size: usize, rate: u64, millis: u64) -> Result<Sample> {
    let mut c = Conn::open(proto, addr)?;
    let (req, mut resp) = payload(size);
    let warm = rate.clamp(100, 1000);
    for _ in 0..warm {
        c.round_trip(&req, &mut resp)?;
    }
    let mut h = histogram()?;
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let n = rate * millis / 1000;
    let start = Instant::now();
    for i in 0..n {
        let intended = start + interval * i as u32;
        wait_until(intended);
        c.round_trip(&req, &mut resp)?;
        h.saturating_record(intended.elapsed().as_micros() as u64);
    }
    Ok(Sample {
        per_s: n as f64 / start.elapsed().as_secs_f64(),
        requests: warm + n,
        ..percentiles(&h)
    })
}

/// Sleeps until shortly before `t`, then spins: a plain sleep overshoots by the timer slack
/// and wake-up latency, which the open-loop schedule would count as latency of the path.
fn wait_until(t: Instant) {
    const SPIN: Duration = Duration::from_micros(50);
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        if d > SPIN {
            thread::sleep(d - SPIN);
        }
        while Instant::now() < t {
            std::hint::spin_loop();
        }
    }
}

// === Bulk ===

const CHUNK: usize = 256 * 1024;
const GRPC_MESSAGE: usize = 64 * 1024;

fn bulk(proto: Proto, addr: &str, bytes: u64) -> Result<Sample> {
    let t = Instant::now();
    match proto {
        Proto::Tcp => {
            let s = tcp(addr)?;
            send(&s, bytes)?;
            s.shutdown(Shutdown::Write)?;
            wire::read_exact(&s, &mut [0u8; 1])?;
        }
        Proto::Http => {
            let s = tcp(addr)?;
            (&s).write_all(&wire::request_head("/sink", bytes))?;
            send(&s, bytes)?;
            let mut r = BufReader::new(Retry(&s));
            let head = wire::read_head(&mut r)?.context("the server closed")?;
            ensure!(head.start.contains(" 200"), "HTTP answer {:?}", head.start);
            wire::skip_body(&mut r, head.framing)?;
        }
        Proto::Grpc => grpc_bulk(addr, bytes)?,
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(Sample {
        bytes,
        mb_per_s: bytes as f64 / secs / 1e6,
        ..Sample::default()
    })
}

/// `streams` echo connections, each sending for `secs` seconds while reading its echo.
fn duplex(addr: &str, streams: usize, secs: u64) -> Result<Sample> {
    ensure!(streams > 0 && secs > 0, "duplex needs streams and seconds");
    let t = Instant::now();
    let until = t + Duration::from_secs(secs);
    let runs: Vec<_> = (0..streams)
        .map(|_| {
            let s = tcp(addr)?;
            Ok(thread::spawn(move || duplex_stream(s, until)))
        })
        .collect::<Result<_>>()?;
    let mut bytes = 0;
    for run in runs {
        bytes += run
            .join()
            .map_err(|_| anyhow::anyhow!("a stream panicked"))??;
    }
    Ok(Sample {
        bytes,
        mb_per_s: bytes as f64 / t.elapsed().as_secs_f64() / 1e6,
        ..Sample::default()
    })
}

/// Sends until `until` on one thread, reads the echo to the end on this one; both counts.
fn duplex_stream(s: TcpStream, until: Instant) -> Result<u64> {
    let w = s.try_clone()?;
    let writer = thread::spawn(move || -> Result<u64> {
        let buf = vec![0x5au8; CHUNK];
        let mut sent = 0u64;
        while Instant::now() < until {
            (&w).write_all(&buf).context("send")?;
            sent += CHUNK as u64;
        }
        w.shutdown(Shutdown::Write)?;
        Ok(sent)
    });
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        match Retry(&s).read(&mut buf).context("receive")? {
            0 => break,
            n => received += n as u64,
        }
    }
    let sent = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    ensure!(received == sent, "sent {sent} bytes, {received} came back");
    Ok(sent + received)
}

fn send(mut s: &TcpStream, bytes: u64) -> Result<()> {
    let buf = vec![0x5au8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let len = ((bytes - sent) as usize).min(CHUNK);
        s.write_all(&buf[..len])?;
        sent += len as u64;
    }
    Ok(())
}

/// A `Chat` stream of 64 KiB messages (each echoed back), until `bytes` went out.
fn grpc_bulk(addr: &str, bytes: u64) -> Result<()> {
    let Conn::Grpc(g) = Conn::open(Proto::Grpc, addr)? else {
        bail!("not a gRPC connection");
    };
    let GrpcConn { rt, mut client } = *g;
    let n = bytes.div_ceil(GRPC_MESSAGE as u64);
    let message = "a".repeat(GRPC_MESSAGE);
    rt.block_on(async move {
        let outbound = futures::stream::iter((0..n).map(move |_| SayRequest {
            message: message.clone(),
            ..SayRequest::default()
        }));
        let mut inbound = client.chat(outbound).await?.into_inner();
        let mut got = 0u64;
        while let Some(reply) = inbound.message().await? {
            got += reply.message.len() as u64;
        }
        ensure!(
            got == n * GRPC_MESSAGE as u64,
            "the echo stream ended early"
        );
        Ok(())
    })
}

// === Held connections ===

/// Opens `n` connections (each carries one round trip), prints `held`, keeps them until
/// stdin closes.
fn hold(proto: Proto, addr: &str, n: usize) -> Result<()> {
    let mut held = Vec::with_capacity(n);
    let (req, mut resp) = payload(1);
    for _ in 0..n {
        let mut c = Conn::open(proto, addr)?;
        c.round_trip(&req, &mut resp)?;
        held.push(c);
    }
    println!("held");
    std::io::stdout().flush()?;
    let _ = std::io::stdin().read(&mut [0u8; 1])?;
    drop(held);
    Ok(())
}

// === Churn ===

/// What `churn` saw; times are milliseconds since the Unix epoch, latencies microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Churn {
    /// New connections that carried their round trip: (start, latency).
    pub connected: Vec<(u64, u64)>,
    /// New connections that failed: (start, kind).
    pub failed: Vec<(u64, String)>,
    /// Round trips on the held connection.
    pub held_trips: u64,
    /// When the held connection broke (it is opened again after each break).
    pub held_broken: Vec<(u64, String)>,
    /// HTTP requests answered: (start, latency).
    pub requests: Vec<(u64, u64)>,
    /// HTTP requests that failed: (start, kind).
    pub failed_requests: Vec<(u64, String)>,
}

/// How long `churn` waits after a failed call before the next.
const FAILED_PAUSE: Duration = Duration::from_millis(10);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The kind of a failed call, from its I/O error.
fn failure_kind(e: &anyhow::Error) -> String {
    use std::io::ErrorKind as K;
    let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>());
    match io.map(|e| e.kind()) {
        Some(K::ConnectionRefused) => "refused",
        Some(K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted) => "reset",
        Some(K::UnexpectedEof) => "eof",
        Some(K::TimedOut | K::WouldBlock) => "timeout",
        _ if e.to_string().contains("closed") => "eof",
        _ => "other",
    }
    .into()
}

/// Reads exactly `buf.len()` bytes within 2 s, riding out a sockmap's spurious `EAGAIN` as
/// [`wire::read_exact`] does, but not past the deadline.
fn read_exact_bounded(mut s: &TcpStream, buf: &mut [u8]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A TCP connection with 2 s bounds on connecting, reading and writing.
fn bounded(addr: &str) -> Result<TcpStream> {
    let sa: std::net::SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let s = TcpStream::connect_timeout(&sa, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

fn churn(echo: &str, http: &str) -> Result<Churn> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Mutex::new(Churn::default()));
    let mut threads = Vec::new();
    for _ in 0..2 {
        let (stop, out, echo) = (stop.clone(), out.clone(), echo.to_string());
        threads.push(thread::spawn(move || {
            let (req, mut resp) = payload(64);
            while !stop.load(Ordering::Relaxed) {
                let (at, started) = (now_ms(), Instant::now());
                let done = bounded(&echo).and_then(|mut s| {
                    s.write_all(&req)?;
                    read_exact_bounded(&s, &mut resp)
                });
                let failed = {
                    let mut o = out.lock().expect("churn results");
                    match done {
                        Ok(()) => o.connected.push((at, started.elapsed().as_micros() as u64)),
                        Err(e) => o.failed.push((at, failure_kind(&e))),
                    }
                    !o.failed.is_empty() && o.failed.last().is_some_and(|(t, _)| *t == at)
                };
                // A refusal comes back at once: pace the retries like a client would.
                if failed {
                    thread::sleep(FAILED_PAUSE);
                }
            }
        }));
    }
    {
        let (stop, out, echo) = (stop.clone(), out.clone(), echo.to_string());
        threads.push(thread::spawn(move || {
            let (req, mut resp) = payload(16);
            let mut held = None;
            while !stop.load(Ordering::Relaxed) {
                let at = now_ms();
                // Only an established connection breaks; failing to open the next one is not
                // counted again.
                let established = held.is_some();
                let conn = match held.take() {
                    Some(c) => Ok(c),
                    None => bounded(&echo),
                };
                let trip = conn.and_then(|mut s| {
                    s.write_all(&req)?;
                    read_exact_bounded(&s, &mut resp)?;
                    Ok(s)
                });
                match trip {
                    Ok(s) => {
                        held = Some(s);
                        out.lock().expect("churn results").held_trips += 1;
                    }
                    Err(e) if established => out
                        .lock()
                        .expect("churn results")
                        .held_broken
                        .push((at, failure_kind(&e))),
                    Err(_) => {}
                }
                thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    {
        let (stop, out, http) = (stop.clone(), out.clone(), http.to_string());
        threads.push(thread::spawn(move || {
            let (req, mut resp) = payload(64);
            let open = |addr: &str| -> Result<Conn> {
                Ok(Conn::Http(BufReader::with_capacity(
                    64 * 1024,
                    bounded(addr)?,
                )))
            };
            let mut conn: Option<Conn> = None;
            while !stop.load(Ordering::Relaxed) {
                let (at, started) = (now_ms(), Instant::now());
                // A kept-alive connection the server closed before answering is tried again
                // once on a new one, as HTTP/1.1 clients do.
                let reused = conn.is_some();
                let mut result = match conn.take() {
                    Some(c) => Ok(c),
                    None => open(&http),
                }
                .and_then(|mut c| c.round_trip(&req, &mut resp).map(|()| c));
                if reused && result.as_ref().is_err_and(|e| failure_kind(e) == "eof") {
                    result =
                        open(&http).and_then(|mut c| c.round_trip(&req, &mut resp).map(|()| c));
                }
                let mut o = out.lock().expect("churn results");
                let pause = match result {
                    Ok(c) => {
                        conn = Some(c);
                        o.requests.push((at, started.elapsed().as_micros() as u64));
                        Duration::from_millis(2)
                    }
                    Err(e) => {
                        o.failed_requests.push((at, failure_kind(&e)));
                        FAILED_PAUSE
                    }
                };
                drop(o);
                thread::sleep(pause);
            }
        }));
    }
    println!("churning");
    std::io::stdout().flush()?;
    let _ = std::io::stdin().read(&mut [0u8; 1])?;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let churn = std::mem::take(&mut *out.lock().expect("churn results"));
    Ok(churn)
}
