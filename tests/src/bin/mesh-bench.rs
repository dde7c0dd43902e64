//! The performance ladder: what the mesh costs, hop by hop, on this machine (root).
//!
//! ```text
//! mesh-bench run [--fast] [--steps 1,2,...] [--json FILE] [--markdown FILE] [--compare OLD.json]
//!                [--stock] [--charts DIR]
//! mesh-bench compare OLD.json NEW.json
//! mesh-bench charts REPORT.json --out DIR
//! ```
//!
//! `client` and `serve` are the halves that run inside the pods. See `benches/README.md`.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mesh_tests::bench::{
    charts, client,
    env::Environment,
    ladder::{self, Options, Plan, STEPS},
    report::{self, Report},
    restart, server, stock,
};
use mesh_tests::cluster::Binaries;

#[derive(Parser)]
#[command(
    name = "mesh-bench",
    about = "The mesh's performance ladder on this machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ladder (root): each step on a fresh simulated cluster.
    Run {
        /// The fast mode (under 2 minutes): fewer repetitions, shorter runs.
        #[arg(long)]
        fast: bool,
        /// Only these steps (numbers, comma-separated); default: 1-8, plus 9-11 in the full
        /// mode.
        #[arg(long, value_delimiter = ',')]
        steps: Vec<u8>,
        /// Override the plan's number of repetitions.
        #[arg(long)]
        reps: Option<usize>,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the markdown report here (it is printed either way).
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Print ratios against an earlier run's JSON.
        #[arg(long)]
        compare: Option<PathBuf>,
        /// Draw the run's charts (SVG) into this directory, made if missing.
        #[arg(long)]
        charts: Option<PathBuf>,
        /// Also run the restart scenario with the steps named by --steps (it runs with the
        /// whole ladder anyway).
        #[arg(long)]
        restarts: bool,
        /// Prefix of the clusters' namespaces, cgroups and pins (each step appends its number).
        #[arg(long, default_value = "mbench")]
        prefix: String,
        /// One more flag for every agent (repeatable), e.g. `--agent-arg=--worker-threads=1`:
        /// compares a setting with the default in runs of the same build.
        #[arg(long = "agent-arg", value_name = "FLAG", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// Also run the stock tools (iperf3, wrk and hey against nginx and iperf3 in the
        /// pods) without and with the mesh, across nodes (needs iperf3, wrk, hey and nginx).
        #[arg(long)]
        stock: bool,
    },
    /// Print the ratios of a run's medians to an earlier run's.
    Compare { old: PathBuf, new: PathBuf },
    /// Draw a saved run's charts (SVG): ratios to no mesh, latency, restarts.
    Charts {
        /// The run's JSON (`run --json`).
        report: PathBuf,
        /// The directory to write them into, made if missing.
        #[arg(long)]
        out: PathBuf,
    },
    /// The load generator, inside the client pod.
    #[command(hide = true)]
    Client {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The server, the server pod's application.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        ip: String,
        #[arg(long)]
        name: String,
    },
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// On Ctrl-C or SIGTERM the run stops and removes what its steps left (processes, network
/// namespaces, cgroups, pinned datapath state of every cluster whose prefix starts with
/// `prefix`), then exits with 130: an interrupted run leaves the machine as it found it.
fn tear_down_on_signal(prefix: String) {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    std::thread::spawn(move || {
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("mesh-bench: interrupted: removing the run's clusters");
        // The step under way may be tearing its cluster down at the same time: try again
        // until nothing is left.
        for attempt in 1..=5 {
            let left = mesh_tests::cluster::prefixes_starting(&prefix);
            if left.is_empty() {
                break;
            }
            for p in left {
                match mesh_tests::cluster::cleanup(&p) {
                    Ok(n) => eprintln!("mesh-bench: removed {n} objects of {p}"),
                    Err(e) if attempt == 5 => {
                        eprintln!("mesh-bench: could not remove all of {p}: {e:#}")
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(300)),
                }
            }
        }
        std::process::exit(130);
    });
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.command {
        Command::Client { args } => client::main(&args),
        Command::Serve { ip, name } => server::serve(&ip, &name),
        Command::Compare { old, new } => {
            read(&old).and_then(|o| read(&new).map(|n| print!("{}", report::compare(&o, &n))))
        }
        Command::Charts { report, out } => read(&report).and_then(|r| draw(&r, &out)),
        Command::Run {
            fast,
            steps,
            reps,
            json,
            markdown,
            compare,
            charts,
            restarts,
            prefix,
            agent_args,
            stock,
        } => {
            if !nix::unistd::geteuid().is_root() {
                eprintln!(
                    "mesh-bench: needs root: each step builds a simulated cluster (network \
                     namespaces, cgroups, eBPF programs). Run it with sudo."
                );
                return ExitCode::from(77);
            }
            // Found out now, not after the run.
            if let Some(dir) = charts.as_ref().filter(|d| d.exists() && !d.is_dir()) {
                eprintln!("mesh-bench: --charts {} is not a directory", dir.display());
                return ExitCode::from(64);
            }
            let mut plan = if fast { Plan::fast() } else { Plan::full() };
            if let Some(r) = reps {
                plan.reps = r.max(1);
            }
            plan.agent_args = agent_args;
            // The restart scenario runs with the whole ladder, or when asked for.
            let restarts = restarts || steps.is_empty();
            tear_down_on_signal(prefix.clone());
            run(plan, &steps, restarts, stock, &prefix).and_then(|r| {
                let md = r.markdown();
                print!("{md}");
                if let Some(path) = json {
                    std::fs::write(&path, serde_json::to_string_pretty(&r)?)
                        .with_context(|| format!("write {}", path.display()))?;
                }
                if let Some(path) = markdown {
                    std::fs::write(&path, &md)
                        .with_context(|| format!("write {}", path.display()))?;
                }
                if let Some(dir) = charts {
                    draw(&r, &dir)?;
                }
                if let Some(old) = compare {
                    print!("\n{}", report::compare(&read(&old)?, &r));
                }
                Ok(())
            })
        }
    };
    // Interrupted: the step failed because its cluster went away; the run's end (and exit
    // code) is the teardown's.
    while INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read(path: &PathBuf) -> Result<Report> {
    let text = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a ladder report", path.display()))
}

/// Writes the report's charts into `dir` and says which.
fn draw(report: &Report, dir: &Path) -> Result<()> {
    let written = charts::write(report, dir)?;
    if written.is_empty() {
        eprintln!("mesh-bench: nothing to chart in this run");
    }
    for path in written {
        eprintln!("mesh-bench: wrote {}", path.display());
    }
    Ok(())
}

fn run(plan: Plan, only: &[u8], restarts: bool, stock: bool, prefix: &str) -> Result<Report> {
    if let Some(bad) = only.iter().find(|id| !STEPS.iter().any(|s| s.id == **id)) {
        bail!("there is no step {bad} (steps 1 to {})", STEPS.len());
    }
    let full = plan.name == "full";
    let steps: Vec<_> = STEPS
        .iter()
        .filter(|s| {
            if only.is_empty() {
                full || !s.extra
            } else {
                only.contains(&s.id)
            }
        })
        .collect();
    let exe = std::env::current_exe().context("this binary's path")?;
    let dir = exe.parent().context("this binary's directory")?;
    let bins = Binaries::in_dir(dir);
    for b in [&bins.agent, &bins.controller] {
        if !b.exists() {
            bail!(
                "{} is missing: build it with `cargo build -p mesh-tests --bins` (add --release \
                 for the figures worth keeping)",
                b.display()
            );
        }
    }
    // Before any step: a missing program should not end a long run.
    let tools = stock.then(stock::Tools::find).transpose()?;
    let mut environment = Environment::record();
    let opts = Options {
        plan,
        bins,
        exe: exe.clone(),
        prefix: prefix.into(),
    };
    let mut results = Vec::new();
    for step in steps {
        results.push(ladder::run_step(step, &opts)?);
    }
    let restarts = if restarts {
        restart::run_all(&opts)?
    } else {
        Vec::new()
    };
    let stock = tools.map(|t| stock::run(&opts, &t)).transpose()?;
    environment.finish();
    Ok(Report {
        environment,
        plan: opts.plan,
        steps: results,
        restarts,
        stock,
    })
}
