//! Putting the plugin into a node's CNI configuration and taking it out again.
//!
//! The runtime uses the first configuration file of its configuration directory in name order
//! (`*.conflist`, `*.conf`, `*.json`). [`install`] appends the plugin's entry to that file's
//! `plugins` (replacing an entry of an earlier install, so installing twice changes nothing);
//! a single-plugin `.conf` becomes a `.conflist` holding the original plugin and this one.
//! [`uninstall`] removes the plugin's entries from every conflist and leaves the rest as the
//! primary CNI wrote it. Files are replaced atomically (written beside, then renamed), so the
//! runtime never reads half a file.
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::PLUGIN_TYPE;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no CNI configuration in {dir} yet (is the primary CNI installed?)")]
    NoConfig { dir: PathBuf },
    #[error("{path} is not a valid CNI configuration: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("the plugin's entry must be a JSON object with \"type\": \"{PLUGIN_TYPE}\"")]
    BadEntry,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io { what, path, source }
}

/// The configuration files of `dir` in the order the runtime reads them.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io("read", dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn read_json(path: &Path) -> Result<Map<String, Value>, InstallError> {
    let text = fs::read(path).map_err(io("read", path))?;
    match serde_json::from_slice(&text) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(InstallError::BadConfig {
            path: path.into(),
            reason: "not a JSON object".into(),
        }),
        Err(e) => Err(InstallError::BadConfig {
            path: path.into(),
            reason: e.to_string(),
        }),
    }
}

/// Writes `value` to `path` atomically.
fn write_json(path: &Path, value: &Value) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().to_string());
    let tmp = dir.join(format!(".{}.mesh-tmp", name.unwrap_or_default()));
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| InstallError::BadConfig {
        path: path.into(),
        reason: e.to_string(),
    })?;
    text.push(b'\n');
    fs::write(&tmp, text).map_err(io("write", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).map_err(io("chmod", &tmp))?;
    fs::rename(&tmp, path).map_err(io("replace", path))
}

fn is_ours(plugin: &Value) -> bool {
    plugin["type"] == PLUGIN_TYPE
}

/// Adds `entry` (the plugin's configuration) to the runtime's configuration in `dir`; returns
/// the file it is in.
pub fn install(dir: &Path, entry: &Value) -> Result<PathBuf, InstallError> {
    if !entry.is_object() || !is_ours(entry) {
        return Err(InstallError::BadEntry);
    }
    let first = config_files(dir)?
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig { dir: dir.into() })?;
    let mut conf = read_json(&first)?;
    let Some(plugins) = conf.get_mut("plugins") else {
        // A single plugin: a conflist of it and this one takes its place.
        if !conf.contains_key("type") {
            return Err(InstallError::BadConfig {
                path: first,
                reason: "neither \"plugins\" nor \"type\"".into(),
            });
        }
        let mut list = Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(v) = conf.get(key) {
                list.insert(key.into(), v.clone());
            }
        }
        list.insert(
            "plugins".into(),
            Value::Array(vec![Value::Object(conf), entry.clone()]),
        );
        let target = first.with_extension("conflist");
        write_json(&target, &Value::Object(list))?;
        if target != first {
            fs::remove_file(&first).map_err(io("remove", &first))?;
        }
        return Ok(target);
    };
    let Value::Array(list) = plugins else {
        return Err(InstallError::BadConfig {
            path: first,
            reason: "\"plugins\" is not a list".into(),
        });
    };
    let before = list.clone();
    list.retain(|p| !is_ours(p));
    list.push(entry.clone());
    if *list != before {
        write_json(&first, &Value::Object(conf))?;
    }
    Ok(first)
}

/// The file the runtime reads, when it already ends with exactly `entry`: what [`install`]
/// would write there changes nothing. `None` when the primary CNI rewrote its configuration
/// without the plugin, a file that sorts first appeared, or the entry differs.
pub fn chained(dir: &Path, entry: &Value) -> Result<Option<PathBuf>, InstallError> {
    let Some(first) = config_files(dir)?.into_iter().next() else {
        return Ok(None);
    };
    let conf = read_json(&first)?;
    let last = match conf.get("plugins") {
        Some(Value::Array(list)) => list.last(),
        _ => None,
    };
    Ok((last == Some(entry)).then_some(first))
}

/// Removes the plugin from every conflist in `dir`; returns the files it changed.
pub fn uninstall(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for path in config_files(dir)? {
        // A file that is not ours to understand is not ours to change either.
        let Ok(mut conf) = read_json(&path) else {
            continue;
        };
        let Some(Value::Array(list)) = conf.get_mut("plugins") else {
            continue;
        };
        let n = list.len();
        list.retain(|p| !is_ours(p));
        if list.len() != n {
            write_json(&path, &Value::Object(conf))?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// Copies the plugin binary `src` into the runtime's plugin directory `bin_dir` (atomically,
/// so a pod being set up meanwhile runs the old or the new one, never half of one).
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.mesh-tmp"));
    fs::copy(src, &tmp).map_err(io("copy the plugin to", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(io("chmod", &tmp))?;
    fs::rename(&tmp, &target).map_err(io("replace", &target))?;
    Ok(target)
}
