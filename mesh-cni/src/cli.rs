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

/// What `install` or `uninstall` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub conf_dir: PathBuf,
    /// Required for `install`.
    pub bin_dir: Option<PathBuf>,
    pub agent_socket: Option<String>,
    pub exclude_namespaces: Vec<String>,
    pub timeout_seconds: Option<u64>,
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
    };
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
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
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
    } = parse_setup(args, add)?;
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
    let bin_dir = bin_dir.unwrap_or_default();
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
}
