//! The `mesh-controller` command line: flags (see [`crate::config::Args`]), logging, and the
//! run until SIGTERM.
use clap::Parser;

use crate::{app, config};

#[derive(Parser)]
#[command(
    name = "mesh-controller",
    version,
    about = "Cluster controller of the mesh"
)]
struct Cli {
    #[command(flatten)]
    args: config::Args,
}

/// Runs the controller; logs go to stderr, and stdout gets `READY grpc=<addr> admin=<addr>`
/// once it serves.
pub fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let config = match config::Config::from_args(&cli.args).and_then(|c| {
        c.check_files()?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-controller: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-controller: start the runtime: {e}");
            return std::process::ExitCode::from(70);
        }
    };
    runtime.block_on(async {
        let controller = match app::start(config).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("mesh-controller: {e}");
                return std::process::ExitCode::from(1);
            }
        };
        println!(
            "READY grpc={} admin={}",
            controller.grpc_addr, controller.admin_addr
        );
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("mesh-controller: signal handler: {e}");
                    return std::process::ExitCode::from(70);
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        controller.shutdown().await;
        std::process::ExitCode::SUCCESS
    })
}
