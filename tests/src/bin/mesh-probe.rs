//! A test client: connects, sends N deterministic bytes, half-closes, and prints its local
//! address, what it sent (length and FNV-1a) and the server's one-line reply.
//!
//! `mesh-probe ADDR BYTES`, or `mesh-probe ADDR hold`: connect, print `local=<addr>`, and keep
//! the connection open until standard input closes, or `mesh-probe ADDR flood SECONDS`: write
//! as fast as the socket accepts without blocking, for SECONDS or until 512 MiB are queued,
//! and print `queued=<bytes> error=<first error other than EAGAIN, or none>`.
use std::{
    io::{BufRead, BufReader, Write},
    net::{Shutdown, TcpStream},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let (Some(addr), Some("hold")) = (args.get(1), args.get(2).map(String::as_str)) {
        return match hold(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-probe: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let (Some(addr), Some("flood"), Some(secs)) = (
        args.get(1),
        args.get(2).map(String::as_str),
        args.get(3).and_then(|s| s.parse::<u64>().ok()),
    ) {
        return match flood(addr, Duration::from_secs(secs)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-probe: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (Some(addr), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse::<u64>().ok()))
    else {
        eprintln!("usage: mesh-probe ADDR BYTES");
        return ExitCode::from(64);
    };
    match run(addr, n) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn hold(addr: &str) -> std::io::Result<()> {
    let s = TcpStream::connect(addr)?;
    println!("local={}", s.local_addr()?);
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)?;
    drop(s);
    Ok(())
}

/// Most a flood queues: far above any bounded buffering, far below socket memory pressure.
const FLOOD_CAP: u64 = 512 * 1024 * 1024;

fn flood(addr: &str, time: Duration) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nonblocking(true)?;
    let buf = vec![0x5au8; 64 * 1024];
    let deadline = std::time::Instant::now() + time;
    let mut queued = 0u64;
    let mut error = String::from("none");
    while std::time::Instant::now() < deadline && queued < FLOOD_CAP {
        match s.write(&buf) {
            Ok(n) => queued += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => {
                error = e.to_string().replace(' ', "_");
                break;
            }
        }
    }
    println!("local={} queued={queued} error={error}", s.local_addr()?);
    Ok(())
}

fn run(addr: &str, n: u64) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let local = s.local_addr()?;
    let mut fnv = mesh_tests::Fnv::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < n {
        let len = ((n - sent) as usize).min(buf.len());
        mesh_tests::fill(&mut buf[..len], sent);
        fnv.update(&buf[..len]);
        s.write_all(&buf[..len])?;
        sent += len as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut line = String::new();
    // A socket in a sockmap may report EAGAIN when FIN arrives on an empty queue: retry.
    let mut reader = BufReader::new(s);
    let mut retries = 0;
    loop {
        match reader.read_line(&mut line) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && retries < 100 => {
                retries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
    println!(
        "local={local} sent={sent} fnv={:016x} reply={}",
        fnv.finish(),
        line.trim()
    );
    Ok(())
}
