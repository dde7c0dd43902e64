//! A test client: connects, sends N deterministic bytes, half-closes, and prints its local
//! address, what it sent (length and FNV-1a) and the server's one-line reply.
//!
//! `mesh-probe ADDR BYTES`, or `mesh-probe ADDR hold`: connect, print `local=<addr>`, and keep
//! the connection open until standard input closes, or `mesh-probe ADDR flood SECONDS`: write
//! as fast as the socket accepts without blocking, for SECONDS or until 512 MiB are queued,
//! and print `queued=<bytes> error=<first error other than EAGAIN, or none>`, or
//! `mesh-probe ADDR switch BUDGET ROUNDS`: against an echo server, ROUNDS connections each
//! sending BUDGET - 16 bytes, then 8 and 64 bytes in two writes at once (the second past an
//! sk_msg budget of BUDGET), each time waiting up to 5 s for the whole echo; print
//! `rounds=<n> stalled=<rounds whose echo did not come back whole>`.
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
    if let (Some(addr), Some("switch"), Some(budget), Some(rounds)) = (
        args.get(1),
        args.get(2).map(String::as_str),
        args.get(3).and_then(|s| s.parse::<usize>().ok()),
        args.get(4).and_then(|s| s.parse::<usize>().ok()),
    ) {
        return match switch(addr, budget, rounds) {
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

fn switch(addr: &str, budget: usize, rounds: usize) -> std::io::Result<()> {
    if budget < 64 {
        return Err(std::io::Error::other("a budget of at least 64 bytes"));
    }
    let mut stalled = 0;
    for _ in 0..rounds {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let within = vec![0x11u8; budget - 16];
        s.write_all(&within)?;
        let mut echo = vec![0u8; within.len()];
        std::io::Read::read_exact(&mut s, &mut echo)?;
        // 8 bytes still within the budget, then 64 past it: two sends, back to back.
        s.write_all(&[0x22u8; 8])?;
        s.write_all(&[0x33u8; 64])?;
        let mut tail = [0u8; 72];
        let mut got = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // A blocking read on a socket in a sockmap may end early with EAGAIN (see the
        // kernel notes): read again until the deadline.
        while got < tail.len() && std::time::Instant::now() < deadline {
            match std::io::Read::read(&mut s, &mut tail[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        if got < tail.len() {
            stalled += 1;
        } else if tail[..8] != [0x22; 8] || tail[8..] != [0x33; 64] {
            return Err(std::io::Error::other("the echo came back reordered"));
        }
    }
    println!("rounds={rounds} stalled={stalled}");
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
