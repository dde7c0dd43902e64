//! The `mesh-controller` command line: flags (see [`crate::config::Args`]), logging, and the
//! run until SIGTERM.
use clap::Parser;

use crate::{app, config};

#[derive(Parser)]
#[command(
    name = "mesh-controller",
    version,
    about = "Cluster controller of the mesh",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: config::Args,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Remove the mesh from every node before it is deleted (the chart's pre-delete hook):
    /// annotate the agent pods mesh.io/uninstall=true and wait until each has let its pods
    /// go (it stops being ready) or is gone.
    Uninstall {
        /// The namespace of the agents.
        #[arg(long, default_value = "mesh-system")]
        namespace: String,
        /// The label selector of the agent pods.
        #[arg(long, default_value = "app=mesh-agent")]
        selector: String,
        /// How long to wait for the agents (e.g. 300s, 5m).
        #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

/// A runtime of `builder`, or the exit code that says it could not start.
fn runtime(
    mut builder: tokio::runtime::Builder,
) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("mesh-controller: start the runtime: {e}");
        std::process::ExitCode::from(70)
    })
}

/// `mesh-controller uninstall`.
fn uninstall(
    namespace: &str,
    selector: &str,
    timeout: std::time::Duration,
) -> std::process::ExitCode {
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let client = match kube::Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("mesh-controller: kubernetes client: {e}");
                return std::process::ExitCode::from(1);
            }
        };
        let api = kube::Api::namespaced(client, namespace);
        match crate::uninstall::run(&api, selector, timeout, std::time::Duration::from_secs(2))
            .await
        {
            Ok(report) => {
                println!(
                    "the mesh is removed from {} node(s); {} did not confirm",
                    report.confirmed.len(),
                    report.unconfirmed.len()
                );
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mesh-controller: {e}");
                std::process::ExitCode::from(1)
            }
        }
    })
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
    if let Some(Command::Uninstall {
        namespace,
        selector,
        timeout,
    }) = &cli.command
    {
        return uninstall(namespace, selector, *timeout);
    }
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
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(r) => r,
        Err(code) => return code,
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
