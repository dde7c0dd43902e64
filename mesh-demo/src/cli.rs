//! The `mesh-demo` command line.
//!
//! Exit status: 0 when a command did its job (`load` included, whatever the calls did),
//! 1 when `call` failed or something broke at run time, 64 for bad arguments.

use std::{io::Write, net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use tracing::{info, warn};

use crate::{
    client::{self, Mode, Target},
    duration, grpc, http, load, tcp,
};

/// Exit status for bad arguments (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

const MAIN_HELP: &str = "\
Exit status: 0 on success (for `load`: once it ran, whatever the requests did), 1 when
`call` failed or at a run-time error, 64 on bad arguments.
Logs go to stderr; RUST_LOG sets their level (default warn).";

const HTTP_HELP: &str = "\
Paths: /healthz answers `ok`; /status/<code> answers with that status (200-599);
/delay/<ms> waits first (at most 60 s); any other path answers 200.
The JSON: pod, method, path, version, peer, caller (the x-forwarded-client-cert
header, or null), headers, body_bytes (the request body is counted, not kept).
Prints `listening ADDR` on stdout once bound. Stops on SIGTERM or Ctrl-C, letting
requests in flight finish.";

const TCP_ECHO_HELP: &str = "\
Prints `listening ADDR` on stdout once bound. Stops on SIGTERM or Ctrl-C.";

const GRPC_HELP: &str = "\
Service mesh.demo.v1.Echo: Say (unary; fail_code asks for a status, delay_ms waits
first), Count (server streaming), Sum (client streaming), Chat (bidirectional: a Say
answer per message). `caller` is the x-forwarded-client-cert metadata, or empty.
Every response, failed or not, carries the trailer `x-demo-pod: NAME`.
HTTP/2 without TLS only (prior knowledge), as gRPC clients speak it.
Prints `listening ADDR` on stdout once bound. Stops on SIGTERM or Ctrl-C, letting
calls in flight finish (for up to 10 s).";

const LOAD_HELP: &str = "\
tcp and http1 open a new connection per request, so a mesh resolves and balances
each one; http2 sends every request over one shared connection, grpc every Say call
over one shared channel.
Failure kinds: connect_refused, connect_failed, reset, timeout, eof, http_<status>,
grpc_<code>, bad_reply, other. Latency is that of the successful requests.
Exits 0 once it ran, whatever the requests did; the caller judges the report.";

const CALL_HELP: &str = "\
Prints the reply (the JSON body, the line for tcp, or for grpc the JSON
{pod, message, caller, trailer_pod}) on stdout and exits 0. On failure prints
`<kind>: <message>` on stderr and exits 1; for a gRPC status
`grpc_<code> (<name>): <message>`, e.g. `grpc_7 (PermissionDenied): ...`.";

#[derive(Parser, Debug)]
#[command(
    name = "mesh-demo",
    version,
    about = "Demo workloads for the mesh: servers to run in pods, and clients that call them",
    after_help = MAIN_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve HTTP/1.1 and h2c on one port; answer every request with JSON describing it.
    Http(HttpArgs),
    /// Answer each line received with `NAME <line>`; half-close after the client's EOF.
    TcpEcho(TcpEchoArgs),
    /// Serve the gRPC echo service (unary and streaming calls) over h2c.
    Grpc(GrpcArgs),
    /// Send many requests and report successes, failures by kind, replies by pod and latency.
    Load(LoadArgs),
    /// Send one request and print the reply; exit 1 (kind and message on stderr) if it fails.
    Call(CallArgs),
    /// Do nothing until SIGTERM or Ctrl-C, then exit 0: a pod sandbox's placeholder process
    /// (what a container runtime's `pause` image runs), or a container that only waits.
    Pause,
}

#[derive(Args, Debug)]
#[command(after_help = HTTP_HELP)]
pub struct HttpArgs {
    /// Address to listen on (port 0 picks a free one; the line on stdout says which).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Name put in every reply, usually the pod's.
    #[arg(long)]
    pub name: String,
}

#[derive(Args, Debug)]
#[command(after_help = TCP_ECHO_HELP)]
pub struct TcpEchoArgs {
    /// Address to listen on (port 0 picks a free one; the line on stdout says which).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9000")]
    pub listen: SocketAddr,
    /// Name put before every reply line, usually the pod's.
    #[arg(long)]
    pub name: String,
}

#[derive(Args, Debug)]
#[command(after_help = GRPC_HELP)]
pub struct GrpcArgs {
    /// Address to listen on (port 0 picks a free one; the line on stdout says which).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9090")]
    pub listen: SocketAddr,
    /// Name put in every reply and trailer, usually the pod's (visible ASCII).
    #[arg(long, value_parser = parse_grpc_name)]
    pub name: String,
}

/// How and where calls go; shared by `load` and `call`.
#[derive(Args, Debug)]
pub struct CallTarget {
    /// Where to send: HOST:PORT ([V6]:PORT for IPv6 literals).
    #[arg(long, value_name = "HOST:PORT")]
    pub target: Target,
    /// Protocol of the requests.
    #[arg(long, value_enum, default_value_t = Mode::Http1)]
    pub mode: Mode,
    /// Path to GET in the http modes.
    #[arg(long, default_value = "/", value_parser = parse_path)]
    pub path: String,
    /// The gRPC status code the server is asked to answer with, 0 for OK (grpc mode).
    #[arg(long, value_name = "CODE", default_value_t = 0,
          value_parser = clap::value_parser!(i32).range(0..=16))]
    pub fail_code: i32,
    /// Bound on each request, connecting included: e.g. 2s, 500ms.
    #[arg(long, default_value = "2s", value_parser = duration::parse)]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
#[command(after_help = LOAD_HELP)]
pub struct LoadArgs {
    #[command(flatten)]
    pub call: CallTarget,
    /// Requests in all.
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,
    /// Requests in flight at once.
    #[arg(long, value_name = "C", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub concurrency: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[command(after_help = CALL_HELP)]
pub struct CallArgs {
    #[command(flatten)]
    pub call: CallTarget,
}

fn parse_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') && !s.contains(char::is_whitespace) {
        Ok(s.to_owned())
    } else {
        Err(format!("`{s}` must start with `/` and contain no spaces"))
    }
}

fn parse_grpc_name(s: &str) -> Result<String, String> {
    grpc::parse_name(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

/// Parses the command line, runs the command and returns the exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mesh-demo: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command))
}

/// Runs one command to completion.
pub async fn run(command: Command) -> ExitCode {
    match command {
        Command::Http(args) => {
            let server = match http::HttpServer::bind(args.listen, &args.name).await {
                Ok(server) => server,
                Err(e) => return fail(&e),
            };
            match server.local_addr() {
                Ok(addr) => announce(addr),
                Err(e) => return fail(&e),
            }
            info!(name = %args.name, "http server started");
            server.serve(shutdown_signal()).await;
            ExitCode::SUCCESS
        }
        Command::TcpEcho(args) => {
            let server = match tcp::EchoServer::bind(args.listen, &args.name).await {
                Ok(server) => server,
                Err(e) => return fail(&e),
            };
            match server.local_addr() {
                Ok(addr) => announce(addr),
                Err(e) => return fail(&e),
            }
            info!(name = %args.name, "tcp echo started");
            server.serve(shutdown_signal()).await;
            ExitCode::SUCCESS
        }
        Command::Grpc(args) => {
            let server = match grpc::GrpcServer::bind(args.listen, &args.name).await {
                Ok(server) => server,
                Err(e) => return fail(&e),
            };
            match server.local_addr() {
                Ok(addr) => announce(addr),
                Err(e) => return fail(&e),
            }
            info!(name = %args.name, "grpc server started");
            server.serve(shutdown_signal()).await;
            ExitCode::SUCCESS
        }
        Command::Load(args) => {
            let config = load::LoadConfig {
                target: args.call.target,
                mode: args.call.mode,
                requests: args.requests,
                concurrency: args.concurrency,
                path: args.call.path,
                fail_code: args.call.fail_code,
                timeout: args.call.timeout,
            };
            info!(?config, "load");
            let report = match load::run(&config).await {
                Ok(report) => report,
                Err(e) => return fail(&e),
            };
            let out = if args.json {
                match serde_json::to_string(&report) {
                    Ok(json) => json + "\n",
                    Err(e) => return fail(&e),
                }
            } else {
                report.table()
            };
            print_stdout(&out);
            ExitCode::SUCCESS
        }
        Command::Call(args) => {
            let c = args.call;
            match client::call(c.mode, &c.target, &c.path, c.fail_code, c.timeout).await {
                Ok(reply) => {
                    print_stdout(&format!("{}\n", reply.text));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}", e.summary());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Pause => {
            shutdown_signal().await;
            ExitCode::SUCCESS
        }
    }
}

/// The line tests and scripts wait for.
fn announce(addr: SocketAddr) {
    print_stdout(&format!("listening {addr}\n"));
}

/// Writes to stdout; a reader that went away is not worth a panic.
fn print_stdout(s: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        warn!(error = %e, "write to stdout");
    }
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("mesh-demo: {e}");
    ExitCode::FAILURE
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot watch SIGINT");
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = term => info!("SIGTERM"),
        () = interrupt => info!("SIGINT"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn load_arguments_parse() {
        let cli = Cli::try_parse_from([
            "mesh-demo",
            "load",
            "--target",
            "127.0.0.1:9000",
            "--requests",
            "10",
            "--concurrency",
            "2",
            "--mode",
            "tcp",
            "--timeout",
            "500ms",
            "--json",
        ])
        .expect("valid arguments");
        let Command::Load(args) = cli.command else {
            panic!("expected load");
        };
        assert_eq!(args.requests, 10);
        assert_eq!(args.concurrency, 2);
        assert_eq!(args.call.mode, Mode::Tcp);
        assert_eq!(args.call.timeout, Duration::from_millis(500));
        assert_eq!(args.call.path, "/");
        assert_eq!(args.call.fail_code, 0);
        assert!(args.json);
    }

    #[test]
    fn grpc_arguments_parse() {
        let cli =
            Cli::try_parse_from(["mesh-demo", "grpc", "--name", "web-1"]).expect("valid arguments");
        let Command::Grpc(args) = cli.command else {
            panic!("expected grpc");
        };
        assert_eq!(args.listen, "0.0.0.0:9090".parse().expect("addr"));
        assert_eq!(args.name, "web-1");

        let cli = Cli::try_parse_from([
            "mesh-demo",
            "call",
            "--target",
            "127.0.0.1:9090",
            "--mode",
            "grpc",
            "--fail-code",
            "7",
        ])
        .expect("valid arguments");
        let Command::Call(args) = cli.command else {
            panic!("expected call");
        };
        assert_eq!(args.call.mode, Mode::Grpc);
        assert_eq!(args.call.fail_code, 7);
    }

    #[test]
    fn bad_arguments_are_refused() {
        for args in [
            &[
                "mesh-demo",
                "load",
                "--target",
                "127.0.0.1:9000",
                "--requests",
                "0",
            ][..],
            &[
                "mesh-demo",
                "load",
                "--target",
                "127.0.0.1",
                "--requests",
                "1",
            ],
            &[
                "mesh-demo",
                "call",
                "--target",
                "127.0.0.1:80",
                "--timeout",
                "2",
            ],
            &[
                "mesh-demo",
                "call",
                "--target",
                "127.0.0.1:80",
                "--path",
                "x",
            ],
            &[
                "mesh-demo",
                "call",
                "--target",
                "127.0.0.1:80",
                "--mode",
                "http3",
            ],
            &["mesh-demo", "http", "--listen", "nowhere", "--name", "a"],
            &["mesh-demo", "grpc", "--name", "two\nlines"],
            &[
                "mesh-demo",
                "call",
                "--target",
                "127.0.0.1:80",
                "--fail-code",
                "17",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} was accepted");
        }
    }
}
