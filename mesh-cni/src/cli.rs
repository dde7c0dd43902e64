//! The `mesh-cni` program: run by the container runtime as a chained CNI plugin
//! (`CNI_COMMAND` set), or by the agent's DaemonSet to install or remove itself:
//!
//! ```text
//! mesh-cni install --conf-dir /etc/cni/net.d --bin-dir /opt/cni/bin
//!                  [--agent-socket PATH] [--exclude-namespace NS]... [--timeout-seconds N]
//!                  [--watch [--watch-interval SECONDS]] [--uninstall-signal FILE]
//! mesh-cni uninstall --conf-dir /etc/cni/net.d [--bin-dir /opt/cni/bin]
//! ```
//!
//! With `--watch`, `install` stays: every interval it checks that the runtime's configuration
//! still ends with the plugin and the binary is still in place, and puts back what the primary
//! CNI (an upgrade of it, a restart that rewrites its conflist) or someone else took away. It
//! never removes the plugin, not even when stopped: a node without the agent keeps meshed
//! pods waiting instead of starting them unmeshed.
//!
//! The one exception is the mesh's removal: `--uninstall-signal` names the downward API file
//! of the pod's annotations, and once it says `mesh.io/uninstall="true"` (the chart's
//! pre-delete hook sets it, see [`crate::signal`]) the plugin is taken out of the chain and its
//! binary removed, and nothing is put back; an `install` started then installs nothing.
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::{CniEnv, CniError, PLUGIN_TYPE, install};

const USAGE: &str = "usage: mesh-cni install --conf-dir DIR --bin-dir DIR [--agent-socket PATH] \
                     [--exclude-namespace NS]... [--timeout-seconds N] \
                     [--watch [--watch-interval SECONDS]] [--uninstall-signal FILE]\n       \
                     mesh-cni uninstall --conf-dir DIR [--bin-dir DIR]\n\
                     (run by the container runtime with CNI_COMMAND set, it is a CNI plugin)";

/// The program: a CNI plugin when `CNI_COMMAND` is set, else `install` or `uninstall`.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::env::var_os("CNI_COMMAND").is_some() {
        return plugin();
    }
    let result = match args.first().map(String::as_str) {
        Some("install") => setup(&args[1..], true),
        Some("uninstall") => setup(&args[1..], false),
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("--version" | "-V") => {
            println!("mesh-cni {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-cni: {e}");
            ExitCode::from(64)
        }
    }
}

fn plugin() -> ExitCode {
    let env = CniEnv::from_env();
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // The error object names the version the runtime asked for when it can be read.
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| "1.0.0".into());
    let result = match read {
        Ok(_) => crate::run(&env, &stdin),
        Err(e) => Err(CniError {
            code: CniError::DECODING,
            msg: "cannot read the network configuration from stdin".into(),
            details: e.to_string(),
        }),
    };
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.to_json(&version));
            eprintln!("mesh-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How often `install --watch` checks the configuration when `--watch-interval` is not given.
pub const DEFAULT_WATCH_SECONDS: u64 = 2;

/// What `install` or `uninstall` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub conf_dir: PathBuf,
    /// Required for `install`.
    pub bin_dir: Option<PathBuf>,
    pub agent_socket: Option<String>,
    pub exclude_namespaces: Vec<String>,
    pub timeout_seconds: Option<u64>,
    /// `install --watch`: keep the plugin chained, checking every this often.
    pub watch: Option<std::time::Duration>,
    /// `install`: the downward API annotations file that may ask for the mesh's removal.
    pub uninstall_signal: Option<PathBuf>,
}

/// The arguments of `install` (`install = true`) or `uninstall`, as `--flag value` or
/// `--flag=value`.
pub fn parse_setup(args: &[String], install: bool) -> Result<Setup, String> {
    let mut conf_dir = None;
    let mut setup = Setup {
        conf_dir: PathBuf::new(),
        bin_dir: None,
        agent_socket: None,
        exclude_namespaces: Vec::new(),
        timeout_seconds: None,
        watch: None,
        uninstall_signal: None,
    };
    let mut watch = false;
    let mut interval = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || match &inline {
            Some(v) => Ok(v.clone()),
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}")),
        };
        match flag {
            "--conf-dir" => conf_dir = Some(PathBuf::from(value()?)),
            "--bin-dir" => setup.bin_dir = Some(PathBuf::from(value()?)),
            "--agent-socket" if install => setup.agent_socket = Some(value()?),
            "--exclude-namespace" if install => setup.exclude_namespaces.push(value()?),
            "--timeout-seconds" if install => {
                let v = value()?;
                setup.timeout_seconds = Some(
                    v.parse::<u64>()
                        .ok()
                        .filter(|n| (1..=600).contains(n))
                        .ok_or_else(|| {
                            format!("--timeout-seconds {v:?}: a number from 1 to 600")
                        })?,
                );
            }
            "--watch" if install && inline.is_none() => watch = true,
            "--uninstall-signal" if install => {
                setup.uninstall_signal = Some(PathBuf::from(value()?));
            }
            "--watch-interval" if install => {
                let v = value()?;
                interval = Some(
                    v.parse::<u64>()
                        .ok()
                        .filter(|n| (1..=3600).contains(n))
                        .ok_or_else(|| format!("--watch-interval {v:?}: seconds from 1 to 3600"))?,
                );
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    match (watch, interval) {
        (true, i) => {
            setup.watch = Some(std::time::Duration::from_secs(
                i.unwrap_or(DEFAULT_WATCH_SECONDS),
            ))
        }
        (false, Some(_)) => return Err(format!("--watch-interval needs --watch\n{USAGE}")),
        (false, None) => {}
    }
    setup.conf_dir = conf_dir.ok_or_else(|| format!("--conf-dir is required\n{USAGE}"))?;
    if install && setup.bin_dir.is_none() {
        return Err(format!("--bin-dir is required\n{USAGE}"));
    }
    Ok(setup)
}

/// `install` / `uninstall`.
fn setup(args: &[String], add: bool) -> Result<(), String> {
    let Setup {
        conf_dir,
        bin_dir,
        agent_socket: socket,
        exclude_namespaces: exclude,
        timeout_seconds: timeout,
        watch,
        uninstall_signal,
    } = parse_setup(args, add)?;
    let removal = |bin_dir: Option<&std::path::Path>| -> Result<(), String> {
        for note in remove(&conf_dir, bin_dir)? {
            println!("{note}");
        }
        Ok(())
    };
    if !add {
        return removal(bin_dir.as_deref());
    }
    let bin_dir = bin_dir.unwrap_or_default();
    let removing = || {
        uninstall_signal
            .as_deref()
            .is_some_and(crate::uninstall_requested)
    };
    if removing() {
        println!("the mesh is being removed from this node: not installing {PLUGIN_TYPE}");
        removal(Some(&bin_dir))?;
        return idle(watch);
    }
    let me = std::env::current_exe().map_err(|e| format!("find this program: {e}"))?;
    let bin = install::install_binary(&me, &bin_dir).map_err(|e| e.to_string())?;
    println!("installed {}", bin.display());
    let mut entry = serde_json::json!({ "type": PLUGIN_TYPE });
    if let Some(s) = socket {
        entry["agentSocket"] = s.into();
    }
    if !exclude.is_empty() {
        entry["excludeNamespaces"] = exclude.into();
    }
    if let Some(t) = timeout {
        entry["timeoutSeconds"] = t.into();
    }
    let conf = install::install(&conf_dir, &entry).map_err(|e| e.to_string())?;
    println!("chained {PLUGIN_TYPE} into {}", conf.display());
    let Some(every) = watch else {
        return Ok(());
    };
    println!("watching {} every {}s", conf_dir.display(), every.as_secs());
    let _ = std::io::Write::flush(&mut std::io::stdout());
    loop {
        std::thread::sleep(every);
        if removing() {
            println!("the mesh is being removed from this node: taking {PLUGIN_TYPE} out");
            removal(Some(&bin_dir))?;
            let _ = std::io::Write::flush(&mut std::io::stdout());
            return idle(watch);
        }
        match keep_installed(&me, &bin_dir, &conf_dir, &entry) {
            Ok(Some(note)) => println!("{note}"),
            Ok(None) => {}
            // A primary CNI in the middle of rewriting its files: the next round tries again.
            Err(e) => eprintln!("mesh-cni: {e}"),
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
}

/// Takes the plugin out of every conflist in `conf_dir` and removes its binary from
/// `bin_dir`; says what it removed.
pub fn remove(
    conf_dir: &std::path::Path,
    bin_dir: Option<&std::path::Path>,
) -> Result<Vec<String>, String> {
    let mut notes: Vec<String> = install::uninstall(conf_dir)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|path| format!("removed {PLUGIN_TYPE} from {}", path.display()))
        .collect();
    if let Some(bin) = bin_dir {
        let path = bin.join(PLUGIN_TYPE);
        match std::fs::remove_file(&path) {
            Ok(()) => notes.push(format!("removed {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("remove {}: {e}", path.display())),
        }
    }
    Ok(notes)
}

/// After the removal: a watcher stays (the container must not exit and be restarted into a
/// loop), doing nothing; a one-shot install returns.
fn idle(watch: Option<std::time::Duration>) -> Result<(), String> {
    if watch.is_none() {
        return Ok(());
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    loop {
        std::thread::park();
    }
}

/// One round of `install --watch`: puts back the binary and the configuration entry if either
/// is gone; says what it put back.
pub fn keep_installed(
    me: &std::path::Path,
    bin_dir: &std::path::Path,
    conf_dir: &std::path::Path,
    entry: &serde_json::Value,
) -> Result<Option<String>, install::InstallError> {
    let mut notes = Vec::new();
    if !bin_dir.join(PLUGIN_TYPE).is_file() {
        let bin = install::install_binary(me, bin_dir)?;
        notes.push(format!("put back {}", bin.display()));
    }
    if install::chained(conf_dir, entry)?.is_none() {
        let conf = install::install(conf_dir, entry)?;
        notes.push(format!(
            "chained {PLUGIN_TYPE} into {} again (the configuration had changed)",
            conf.display()
        ));
    }
    Ok((!notes.is_empty()).then(|| notes.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_take_their_value_after_a_space_or_an_equals_sign() {
        let s = parse_setup(
            &args(&[
                "--conf-dir=/etc/cni/net.d",
                "--bin-dir",
                "/opt/cni/bin",
                "--agent-socket=/run/x.sock",
                "--exclude-namespace=kube-system",
                "--exclude-namespace",
                "mesh-system",
                "--timeout-seconds=45",
            ]),
            true,
        )
        .expect("valid");
        assert_eq!(s.conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(s.bin_dir, Some(PathBuf::from("/opt/cni/bin")));
        assert_eq!(s.agent_socket.as_deref(), Some("/run/x.sock"));
        assert_eq!(s.exclude_namespaces, ["kube-system", "mesh-system"]);
        assert_eq!(s.timeout_seconds, Some(45));

        for (bad, why) in [
            (&["--conf-dir=/c"][..], "--bin-dir is required"),
            (&["--bin-dir=/b"][..], "--conf-dir is required"),
            (&["--conf-dir"][..], "needs a value"),
            (
                &["--conf-dir=/c", "--bin-dir=/b", "--timeout-seconds=0"][..],
                "1 to 600",
            ),
            (
                &["--conf-dir=/c", "--bin-dir=/b", "--verbose"][..],
                "unknown argument",
            ),
        ] {
            let e = parse_setup(&args(bad), true).expect_err(why);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        // `uninstall` takes no plugin settings.
        let e = parse_setup(&args(&["--conf-dir=/c", "--agent-socket=/s"]), false)
            .expect_err("uninstall with a socket");
        assert!(e.contains("unknown argument"), "{e}");
    }

    #[test]
    fn watching_is_asked_for_with_an_interval_in_range() {
        let base = ["--conf-dir=/c", "--bin-dir=/b"];
        let parse = |extra: &[&str]| {
            let all: Vec<&str> = base.iter().chain(extra).copied().collect();
            parse_setup(&args(&all), true)
        };
        assert_eq!(parse(&[]).expect("no watch").watch, None);
        assert_eq!(
            parse(&["--watch"]).expect("watch").watch,
            Some(std::time::Duration::from_secs(DEFAULT_WATCH_SECONDS))
        );
        assert_eq!(
            parse(&["--watch", "--watch-interval=5"])
                .expect("watch every 5 s")
                .watch,
            Some(std::time::Duration::from_secs(5))
        );
        for (bad, why) in [
            (&["--watch-interval=5"][..], "needs --watch"),
            (&["--watch", "--watch-interval=0"][..], "1 to 3600"),
            (&["--watch=yes"][..], "unknown argument"),
        ] {
            let e = parse(bad).expect_err(why);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let e = parse_setup(&args(&["--conf-dir=/c", "--watch"]), false).expect_err("uninstall");
        assert!(e.contains("unknown argument"), "{e}");
    }

    #[test]
    fn a_watch_round_puts_back_what_was_taken_and_leaves_the_rest() {
        let dir = tempfile::tempdir().expect("dir");
        let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
        std::fs::create_dir_all(&conf).expect("conf dir");
        std::fs::create_dir_all(&bin).expect("bin dir");
        let me = dir.path().join("plugin");
        std::fs::write(&me, b"#!/bin/sh\n").expect("plugin");
        let primary = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "plugins": [{"type": "bridge", "bridge": "cni0"}],
        });
        let primary_text = serde_json::to_string(&primary).expect("json");
        std::fs::write(conf.join("10-pods.conflist"), &primary_text).expect("conflist");
        let entry = serde_json::json!({"type": PLUGIN_TYPE, "agentSocket": "/run/a.sock"});

        // Nothing installed yet: both are put back.
        let note = keep_installed(&me, &bin, &conf, &entry)
            .expect("round")
            .expect("something put back");
        assert!(
            note.contains("put back") && note.contains("again"),
            "{note}"
        );
        assert!(bin.join(PLUGIN_TYPE).is_file());
        // In place: a round changes nothing.
        assert_eq!(
            keep_installed(&me, &bin, &conf, &entry).expect("round"),
            None
        );
        // The primary CNI rewrites its conflist as it knows it: chained again, its own
        // plugins kept.
        std::fs::write(conf.join("10-pods.conflist"), &primary_text).expect("rewrite");
        let note = keep_installed(&me, &bin, &conf, &entry)
            .expect("round")
            .expect("re-chained");
        assert!(note.contains("10-pods.conflist"), "{note}");
        let now: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(conf.join("10-pods.conflist")).expect("read"),
        )
        .expect("json");
        assert_eq!(now["plugins"][0]["type"], "bridge");
        assert_eq!(now["plugins"][1], entry);
        // A configuration that sorts first appears: the plugin follows it.
        std::fs::write(conf.join("05-new.conflist"), &primary_text).expect("new file");
        let note = keep_installed(&me, &bin, &conf, &entry)
            .expect("round")
            .expect("followed");
        assert!(note.contains("05-new.conflist"), "{note}");
        assert!(install::chained(&conf, &entry).expect("read").is_some());
    }
}
