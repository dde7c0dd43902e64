//! The local directory source: every `*.yaml` / `*.yml` file of one directory (not
//! recursive; hidden files skipped; symlinks followed, so a mounted ConfigMap works), each a
//! stream of YAML documents, applied to the index with the file's path as origin.
//!
//! Changes are picked up from inotify events (notify) and, as a fallback, by comparing file
//! sizes and modification times every 200 ms, so an edit reaches the index well within a
//! second. An edited file's resources replace the ones it held before (resources that left
//! the file are removed); a deleted file's resources are removed.
//!
//! Bad input never wipes the last good configuration: a document that names a resource but is
//! invalid keeps that resource's previous version in force, invalid YAML keeps every
//! resource the file held, and each problem is recorded as a rejection naming the file and the
//! document. When two files define the same resource, the first path in sort order wins and
//! the other is rejected.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::index::{Index, SharedIndex};
use crate::resource::{Resource, ResourceError, ResourceKey, parse_yaml_stream};

/// How often file metadata is compared when no event arrives.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Why the local source cannot run.
#[derive(Debug, thiserror::Error)]
pub enum LocalSourceError {
    #[error("read directory {path}: {source}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("the file scanner task failed: {0}")]
    Scanner(String),
}

impl LocalSourceError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            LocalSourceError::Directory { .. } => "directory",
            LocalSourceError::NotADirectory { .. } => "not_a_directory",
            LocalSourceError::Scanner(_) => "scanner",
        }
    }
}

/// Loads the directory once into `index` (tests, one-shot tools).
pub fn load_once(dir: impl AsRef<Path>, index: &SharedIndex) -> Result<(), LocalSourceError> {
    let dir = dir.as_ref();
    check_dir(dir)?;
    let mut loader = Loader::new(dir.to_path_buf());
    loader
        .step(index, true)
        .map_err(|source| LocalSourceError::Directory {
            path: dir.to_path_buf(),
            source,
        })
}

/// Loads the directory, signals `ready`, then follows changes until the future is dropped.
/// Fails only when the directory cannot be read at start.
pub async fn run(
    dir: PathBuf,
    index: SharedIndex,
    ready: Option<oneshot::Sender<()>>,
) -> Result<(), LocalSourceError> {
    check_dir(&dir)?;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let watcher = watch(&dir, events_tx);
    let mut events = watcher.as_ref().map(|_| events_rx);

    let mut loader = Loader::new(dir.clone());
    let dir_error = |source| LocalSourceError::Directory {
        path: dir.clone(),
        source,
    };
    loader = step(loader, &index, true)
        .await?
        .map_err(|(_, e)| dir_error(e))?;
    info!(dir = %dir.display(), files = loader.files.len(), "local source loaded");
    if let Some(ready) = ready {
        let _ = ready.send(());
    }

    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let force = match events.as_mut() {
            Some(rx) => tokio::select! {
                event = rx.recv() => match event {
                    Some(()) => {
                        while rx.try_recv().is_ok() {}
                        true
                    }
                    None => {
                        events = None;
                        false
                    }
                },
                _ = tick.tick() => false,
            },
            None => {
                tick.tick().await;
                false
            }
        };
        loader = match step(loader, &index, force).await? {
            Ok(loader) => loader,
            Err((loader, e)) => {
                warn!(dir = %dir.display(), error = %e, "cannot read the directory; keeping the last configuration");
                loader
            }
        };
    }
}

fn check_dir(dir: &Path) -> Result<(), LocalSourceError> {
    let meta = std::fs::metadata(dir).map_err(|source| LocalSourceError::Directory {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(LocalSourceError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// One scan on the blocking pool, handing the loader back.
async fn step(
    mut loader: Loader,
    index: &SharedIndex,
    force: bool,
) -> Result<Result<Loader, (Loader, std::io::Error)>, LocalSourceError> {
    let index = index.clone();
    tokio::task::spawn_blocking(move || match loader.step(&index, force) {
        Ok(()) => Ok(loader),
        Err(e) => Err((loader, e)),
    })
    .await
    .map_err(|e| LocalSourceError::Scanner(e.to_string()))
}

/// An inotify watch on the directory feeding `tx`; `None` (polling only) when unavailable.
fn watch(dir: &Path, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let handler = move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| is_change(&e.kind)) {
            let _ = tx.send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "file notifications unavailable; polling only");
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
        warn!(dir = %dir.display(), error = %e, "cannot watch the directory; polling only");
        return None;
    }
    Some(watcher)
}

/// Whether an event can change what the directory defines. Opening and reading a file (the
/// scan itself does) is not a change: reacting to it would rescan forever.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
    }
}

// === Loader ===

/// What the source knows of one file.
#[derive(Debug, Default)]
struct FileState {
    /// Size and modification time when last read.
    stamp: Option<(u64, Option<SystemTime>)>,
    /// Hash of the content last parsed.
    hash: Option<u64>,
    /// The last good version of every resource the file defines.
    good: BTreeMap<ResourceKey, Resource>,
    /// Problems found in the file as last read.
    rejections: Vec<(Option<ResourceKey>, String)>,
}

#[derive(Debug)]
struct Loader {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The file each resource in the index came from.
    applied: BTreeMap<ResourceKey, PathBuf>,
}

// === impl Loader ===

impl Loader {
    fn new(dir: PathBuf) -> Self {
        Loader {
            dir,
            files: BTreeMap::new(),
            applied: BTreeMap::new(),
        }
    }

    /// Scans the directory and, when anything changed, brings the index in line. `force`
    /// compares contents even when sizes and times are unchanged.
    fn step(&mut self, index: &SharedIndex, force: bool) -> std::io::Result<()> {
        let (changed, gone) = self.scan(force)?;
        if changed.is_empty() && gone.is_empty() {
            return Ok(());
        }
        debug!(
            changed = changed.len(),
            removed = gone.len(),
            "local source files changed"
        );
        index.update(|ix| self.sync(ix, &changed, &gone));
        Ok(())
    }

    /// Reads new and changed files. Returns the files whose content changed and the files
    /// that disappeared.
    fn scan(&mut self, force: bool) -> std::io::Result<(BTreeSet<PathBuf>, Vec<PathBuf>)> {
        let mut present = BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let yaml = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
            // Metadata follows symlinks; a dangling link or a directory is skipped.
            if name.starts_with('.')
                || !yaml
                || !std::fs::metadata(&path).is_ok_and(|m| m.is_file())
            {
                continue;
            }
            present.insert(path);
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(*p))
            .cloned()
            .collect();
        for path in &gone {
            self.files.remove(path);
        }

        let mut changed = BTreeSet::new();
        for path in present {
            let state = self.files.entry(path.clone()).or_default();
            let stamp = std::fs::metadata(&path)
                .ok()
                .map(|m| (m.len(), m.modified().ok()));
            if !force && stamp.is_some() && state.stamp == stamp {
                continue;
            }
            state.stamp = stamp;
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    // Keep what the file held; say why it was not read.
                    let reason =
                        format!("cannot read the file: {e}; its previous resources stay in force");
                    if state.rejections != [(None, reason.clone())] {
                        state.rejections = vec![(None, reason)];
                        state.hash = None;
                        changed.insert(path);
                    }
                    continue;
                }
            };
            let hash = {
                let mut h = DefaultHasher::new();
                text.hash(&mut h);
                h.finish()
            };
            if state.hash == Some(hash) {
                continue;
            }
            state.hash = Some(hash);
            parse_file(state, &text);
            changed.insert(path);
        }
        Ok((changed, gone))
    }

    /// Applies the union of every file's resources: removes what no file defines any more,
    /// applies what changed, and replaces the files' rejections.
    fn sync(&mut self, index: &mut Index, changed: &BTreeSet<PathBuf>, gone: &[PathBuf]) {
        let mut desired: BTreeMap<&ResourceKey, &PathBuf> = BTreeMap::new();
        let mut duplicates: Vec<(&PathBuf, &ResourceKey, &PathBuf)> = Vec::new();
        for (path, state) in &self.files {
            for key in state.good.keys() {
                match desired.get(key) {
                    Some(first) => duplicates.push((path, key, first)),
                    None => {
                        desired.insert(key, path);
                    }
                }
            }
        }

        for (key, path) in &self.applied {
            if !desired.contains_key(key) && index.origin(key) == Some(origin(path).as_str()) {
                index.remove(key);
            }
        }
        for (key, path) in &desired {
            let stale = changed.contains(*path) || self.applied.get(*key) != Some(*path);
            if stale && let Some(resource) = self.files.get(*path).and_then(|s| s.good.get(*key)) {
                index.apply(&origin(path), resource.clone());
            }
        }

        for path in gone.iter().chain(self.files.keys()) {
            index.clear_rejections_from(&origin(path));
        }
        for (path, state) in &self.files {
            for (key, reason) in &state.rejections {
                index.record_rejection(&origin(path), key.clone(), reason.clone());
            }
        }
        for (path, key, first) in duplicates {
            let reason = format!(
                "{key} is also defined in {}, which is used",
                first.display()
            );
            index.record_rejection(&origin(path), Some(key.clone()), reason);
        }

        self.applied = desired
            .into_iter()
            .map(|(key, path)| (key.clone(), path.clone()))
            .collect();
    }
}

fn origin(path: &Path) -> String {
    path.display().to_string()
}

/// Parses a file's new content into its state, keeping last good versions where the new
/// content is not usable.
fn parse_file(state: &mut FileState, text: &str) {
    let previous = std::mem::take(&mut state.good);
    state.rejections.clear();
    let mut good = BTreeMap::new();
    let mut broken_yaml = false;
    for result in parse_yaml_stream(text) {
        match result {
            Ok(resource) => {
                let key = resource.key();
                if good.insert(key.clone(), resource).is_some() {
                    state.rejections.push((
                        Some(key),
                        "defined more than once in this file; the last one is used".into(),
                    ));
                }
            }
            Err(e @ ResourceError::Yaml { .. }) => {
                broken_yaml = true;
                state.rejections.push((
                    None,
                    format!("{e}; the file's previous resources stay in force"),
                ));
            }
            Err(e) => match e.key().cloned() {
                Some(key) => {
                    let kept = match previous.get(&key) {
                        Some(last_good) => {
                            good.entry(key.clone()).or_insert_with(|| last_good.clone());
                            "; the previous version stays in force"
                        }
                        None => "",
                    };
                    state.rejections.push((Some(key), format!("{e}{kept}")));
                }
                None => state.rejections.push((None, e.to_string())),
            },
        }
    }
    if broken_yaml {
        // The rest of the file is unreadable: nothing it held is removed.
        for (key, resource) in previous {
            good.entry(key).or_insert(resource);
        }
    }
    state.good = good;
}

#[cfg(test)]
mod tests;
