//! The fuzzing step of `cargo xtask test`: every cargo-fuzz target in `fuzz/` runs for a
//! bounded time, seeded from its committed corpus in `fuzz/corpus/<target>/`.
//!
//! Targets are what `cargo fuzz list` reports (the `[[bin]]` entries of fuzz/Cargo.toml), so a
//! new target needs no change here. The builds carry sanitizer and coverage flags and live in
//! `fuzz/target`; inputs the fuzzer finds go to `fuzz/target/corpus-work/<target>/`, never
//! into the committed seeds, and a crashing input to `fuzz/artifacts/<target>/`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

/// Seconds per target when neither `--fuzz-seconds` nor MESH_FUZZ_SECONDS says otherwise.
pub const DEFAULT_SECONDS: u64 = 30;

/// How long each target runs: the flag, else MESH_FUZZ_SECONDS, else the default. 0 skips the
/// step, which CI (CI=true) refuses: there the fuzzers always run.
pub fn seconds(flag: Option<u64>, env: Option<&str>, ci: bool) -> Result<u64> {
    let seconds = match (flag, env) {
        (Some(n), _) => n,
        (None, Some(s)) => s
            .trim()
            .parse()
            .with_context(|| format!("MESH_FUZZ_SECONDS={s:?} is not a whole number of seconds"))?,
        (None, None) => DEFAULT_SECONDS,
    };
    if seconds == 0 && ci {
        bail!(
            "the fuzzing step cannot be skipped in CI (CI=true): --fuzz-seconds / \
             MESH_FUZZ_SECONDS must be above 0"
        );
    }
    Ok(seconds)
}

/// What one target's run came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Ran its time without a finding; `runs` inputs were executed.
    Clean { runs: Option<u64> },
    /// The fuzzer stopped on a finding; `reproducer` is the input that triggers it.
    Found { reproducer: Option<PathBuf> },
}

/// Runs every target for `seconds` each. Returns each target's outcome; an error only when a
/// target could not be built or started.
pub fn run_all(root: &Path, seconds: u64) -> Result<Vec<(String, Outcome)>> {
    let fuzz_dir = root.join("fuzz");
    let target_dir = fuzz_dir.join("target");
    let targets = list(root)?;
    if targets.is_empty() {
        bail!("`cargo fuzz list` found no fuzz target in fuzz/Cargo.toml");
    }

    let started = Instant::now();
    let status = cargo_fuzz(root)
        .arg("build")
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .context("start cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    println!(
        "fuzz: built {} targets in {:.0}s",
        targets.len(),
        started.elapsed().as_secs_f64()
    );

    let logs = target_dir.join("fuzz-logs");
    fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    let mut outcomes = Vec::new();
    for target in targets {
        let seeds = fuzz_dir.join("corpus").join(&target);
        let work = target_dir.join("corpus-work").join(&target);
        fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
        let mut corpora = vec![work];
        if seeds.is_dir() {
            corpora.push(seeds);
        } else {
            println!(
                "fuzz: warning: {target} has no seed corpus in {}",
                seeds.display()
            );
        }
        let log = logs.join(format!("{target}.log"));
        let started = Instant::now();
        let outcome = run_one(root, &target_dir, &target, &corpora, seconds, &log)?;
        match &outcome {
            Outcome::Clean { runs } => println!(
                "fuzz {target}: ok, {} inputs in {:.0}s",
                runs.map_or_else(|| "?".to_string(), |n| n.to_string()),
                started.elapsed().as_secs_f64()
            ),
            Outcome::Found { reproducer } => {
                println!("fuzz {target}: FAILED, the fuzzer found an input that fails it");
                print_tail(&log, 40);
                match reproducer {
                    Some(path) => println!(
                        "  reproducer: {}\n  replay it: cargo +nightly fuzz run {target} {}",
                        path.display(),
                        path.display()
                    ),
                    None => println!("  no reproducer was written; the log is {}", log.display()),
                }
            }
        }
        outcomes.push((target, outcome));
    }
    Ok(outcomes)
}

/// `cargo +nightly fuzz` in the workspace root, with the fuzz build's own target directory
/// (a CARGO_TARGET_DIR from the environment would mix sanitizer builds into the main one).
fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(root)
        .env("CARGO_TARGET_DIR", root.join("fuzz").join("target"))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER");
    cmd
}

fn list(root: &Path) -> Result<Vec<String>> {
    let out = cargo_fuzz(root)
        .arg("list")
        .stderr(Stdio::inherit())
        .output()
        .context("run `cargo +nightly fuzz list` (is cargo-fuzz installed? cargo xtask prereqs)")?;
    if !out.status.success() {
        bail!("cargo fuzz list failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

fn run_one(
    root: &Path,
    target_dir: &Path,
    target: &str,
    corpora: &[PathBuf],
    seconds: u64,
    log: &Path,
) -> Result<Outcome> {
    let out = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone().context("clone the log handle")?;
    let status = cargo_fuzz(root)
        .arg("run")
        .arg("--target-dir")
        .arg(target_dir)
        .arg(target)
        .args(corpora)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // One input taking this long is a finding (a hang), not a slow run.
        .arg("-timeout=20")
        .arg("-print_final_stats=1")
        .stdout(out)
        .stderr(err)
        .status()
        .with_context(|| format!("start cargo fuzz run {target}"))?;
    let text = fs::read_to_string(log).unwrap_or_default();
    if status.success() {
        return Ok(Outcome::Clean {
            runs: executed_units(&text),
        });
    }
    let reproducer = reproducer(&text).map(|p| root.join(p));
    // A crash, a panic, a leak, a timeout or running out of memory: libFuzzer says ERROR and
    // (nearly always) saves the input. Anything else is the build or the tool failing.
    if reproducer.is_none() && !text.contains("ERROR:") {
        print_tail(log, 40);
        bail!(
            "cargo fuzz run {target} failed ({status}) without a finding; see {}",
            log.display()
        );
    }
    Ok(Outcome::Found { reproducer })
}

/// The input libFuzzer saved: `Test unit written to <path>` (relative to the working
/// directory).
fn reproducer(log: &str) -> Option<PathBuf> {
    log.lines()
        .rev()
        .find_map(|l| l.split_once("Test unit written to "))
        .map(|(_, p)| PathBuf::from(p.trim()))
}

/// `stat::number_of_executed_units: N` of -print_final_stats.
fn executed_units(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
}

fn print_tail(log: &Path, lines: usize) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    for l in &all[all.len().saturating_sub(lines)..] {
        println!("  | {l}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_come_from_the_flag_then_the_environment() {
        assert_eq!(seconds(None, None, true).expect("default"), DEFAULT_SECONDS);
        assert_eq!(seconds(None, Some("45"), true).expect("env"), 45);
        assert_eq!(seconds(Some(5), Some("45"), true).expect("flag"), 5);
        assert_eq!(seconds(Some(0), None, false).expect("local skip"), 0);
        assert!(seconds(None, Some("soon"), false).is_err());
    }

    #[test]
    fn ci_cannot_skip_fuzzing() {
        let e = seconds(Some(0), None, true).expect_err("CI refuses 0");
        assert!(e.to_string().contains("CI"), "{e}");
        assert!(seconds(None, Some("0"), true).is_err());
    }

    #[test]
    fn reads_the_reproducer_and_the_run_count() {
        let log = "INFO: Seed: 1\n#1024 NEW cov: 10\n==123== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='/r/fuzz/artifacts/spiffe_id/'; Test unit written to \
                   /r/fuzz/artifacts/spiffe_id/crash-ab12\nBase64: AAA=\n";
        assert_eq!(
            reproducer(log),
            Some(PathBuf::from("/r/fuzz/artifacts/spiffe_id/crash-ab12"))
        );
        assert_eq!(reproducer("#2 DONE\n"), None);
        let stats = "Done 81234 runs in 31 second(s)\nstat::number_of_executed_units: 81234\n\
                     stat::average_exec_per_sec:     2620\n";
        assert_eq!(executed_units(stats), Some(81234));
    }
}
