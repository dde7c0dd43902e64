//! The server every ladder step measures against, run as the server pod's application
//! (`mesh-bench serve`): one process with four listeners, the same in every step.
//!
//! - [`ECHO_PORT`]: TCP echo (round trips of any size);
//! - [`SINK_PORT`]: reads to the end of the stream, then answers one byte (bulk throughput);
//! - [`HTTP_PORT`]: HTTP/1.1 keep-alive; `POST /echo` answers a body as long as the request's,
//!   `POST /sink` a 1-byte body;
//! - [`GRPC_PORT`]: the `mesh.demo.v1.Echo` gRPC service of `mesh-demo` (h2c).
use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;

use anyhow::{Context, Result};

use super::wire::{self, Retry};

pub const ECHO_PORT: u16 = 9000;
pub const SINK_PORT: u16 = 9001;
pub const HTTP_PORT: u16 = 8080;
pub const GRPC_PORT: u16 = 9090;
/// Every port the server pod declares.
pub const PORTS: [u16; 4] = [ECHO_PORT, SINK_PORT, HTTP_PORT, GRPC_PORT];

/// Binds every listener on `ip`, prints `listening ...` once all are bound, serves forever.
pub fn serve(ip: &str, name: &str) -> Result<()> {
    let bind =
        |port: u16| TcpListener::bind((ip, port)).with_context(|| format!("bind {ip}:{port}"));
    let (echo, sink, http) = (bind(ECHO_PORT)?, bind(SINK_PORT)?, bind(HTTP_PORT)?);
    let grpc_addr: SocketAddr = format!("{ip}:{GRPC_PORT}")
        .parse()
        .context("gRPC address")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("gRPC runtime")?;
    let grpc = rt
        .block_on(mesh_demo::grpc::GrpcServer::bind(grpc_addr, name))
        .context("bind the gRPC server")?;
    accept_loop(echo, |c| echo_conn(&c));
    accept_loop(sink, |c| sink_conn(&c));
    accept_loop(http, |c| http_conn(&c));
    println!("listening {ip} ports {PORTS:?}");
    io::stdout().flush().context("stdout")?;
    rt.block_on(grpc.serve(std::future::pending()));
    Ok(())
}

/// Serves each connection on its own thread.
fn accept_loop(l: TcpListener, handle: fn(TcpStream) -> io::Result<()>) {
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let _ = c.set_nodelay(true);
            thread::spawn(move || handle(c));
        }
    });
}

fn echo_conn(c: &TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = Retry(c).read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        (&*c).write_all(&buf[..n])?;
    }
}

fn sink_conn(c: &TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    while Retry(c).read(&mut buf)? > 0 {}
    (&*c).write_all(b"k")
}

fn http_conn(c: &TcpStream) -> io::Result<()> {
    let mut r = BufReader::with_capacity(256 * 1024, Retry(c));
    while let Some(head) = wire::read_head(&mut r)? {
        let len = wire::skip_body(&mut r, head.framing)?;
        let reply = if head.start.starts_with("POST /sink") {
            1
        } else {
            len
        };
        wire::respond(&mut &*c, reply)?;
    }
    Ok(())
}
