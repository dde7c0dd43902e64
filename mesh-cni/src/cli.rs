//! The `mesh-cni` program: run by the container runtime as a chained CNI plugin
//! (`CNI_COMMAND` set), or by the agent's DaemonSet to install or remove itself:
//!
//! ```text
//! mesh-cni install --conf-dir /etc/cni/net.d --bin-dir /opt/cni/bin
//!                  [--agent-socket PATH] [--exclude-namespace NS]... [--timeout-seconds N]
//! mesh-cni uninstall --conf-dir /etc/cni/net.d [--bin-dir /opt/cni/bin]
//! ```
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::{CniEnv, CniError, PLUGIN_TYPE, install};

const USAGE: &str = "usage: mesh-cni install --conf-dir DIR --bin-dir DIR [--agent-socket PATH] \
                     [--exclude-namespace NS]... [--timeout-seconds N]\n       \
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

/// `install` / `uninstall`.
fn setup(args: &[String], add: bool) -> Result<(), String> {
    let mut conf_dir = None;
    let mut bin_dir = None;
    let mut socket = None;
    let mut exclude = Vec::new();
    let mut timeout = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--conf-dir" => conf_dir = Some(PathBuf::from(value()?)),
            "--bin-dir" => bin_dir = Some(PathBuf::from(value()?)),
            "--agent-socket" if add => socket = Some(value()?),
            "--exclude-namespace" if add => exclude.push(value()?),
            "--timeout-seconds" if add => {
                let v = value()?;
                timeout = Some(
                    v.parse::<u64>()
                        .ok()
                        .filter(|n| (1..=600).contains(n))
                        .ok_or_else(|| {
                            format!("--timeout-seconds {v:?}: a number from 1 to 600")
                        })?,
                );
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let conf_dir = conf_dir.ok_or_else(|| format!("--conf-dir is required\n{USAGE}"))?;
    if !add {
        for path in install::uninstall(&conf_dir).map_err(|e| e.to_string())? {
            println!("removed {PLUGIN_TYPE} from {}", path.display());
        }
        if let Some(bin) = bin_dir {
            let path = bin.join(PLUGIN_TYPE);
            match std::fs::remove_file(&path) {
                Ok(()) => println!("removed {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("remove {}: {e}", path.display())),
            }
        }
        return Ok(());
    }
    let bin_dir = bin_dir.ok_or_else(|| format!("--bin-dir is required\n{USAGE}"))?;
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
    Ok(())
}
