//! One filesystem layer of an image: the files and directories it holds, each with a fixed
//! owner, mode and modification time, written as a tar archive in path order. The same files
//! give the same bytes, so the same digest, wherever and whenever the layer is built.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::ldd;
use crate::tar::{Header, Kind, Tar};

/// The modification time of every entry: the epoch.
pub const MTIME: u64 = 0;

/// Why a layer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path:?} is not a plain absolute path in the image")]
    Path { path: String },
    #[error("{path} is already in the layer as a {existing}")]
    Conflict {
        path: String,
        existing: &'static str,
    },
    #[error("read {source_path} for {path}")]
    Read {
        path: String,
        source_path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("add {path} to the layer's archive")]
    Archive {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the libraries of {path}")]
    Libraries {
        path: String,
        #[source]
        source: ldd::Error,
    },
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Path { .. } => "path",
            Error::Conflict { .. } => "conflict",
            Error::Read { .. } => "read",
            Error::Archive { .. } => "archive",
            Error::Libraries { .. } => "libraries",
        }
    }
}

/// Where an entry's contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    Dir,
    Bytes(Vec<u8>),
    /// A file on this machine, read when the layer is written.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    content: Content,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// What an entry of a layer is, as [`Layer::entries`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The path in the image, without the leading slash (`usr/local/bin/mesh-agent`).
    pub path: String,
    pub dir: bool,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

// === impl Layer ===

/// The entries of one layer, by path. Parent directories are added as they are needed
/// (owned by root, mode 0755).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layer {
    entries: BTreeMap<String, Entry>,
}

impl Layer {
    pub fn new() -> Layer {
        Layer::default()
    }

    /// A directory at `path` owned by `uid`:`gid`.
    pub fn dir(&mut self, path: &str, mode: u32, uid: u32, gid: u32) -> Result<(), Error> {
        self.insert(
            path,
            Entry {
                content: Content::Dir,
                mode,
                uid,
                gid,
            },
        )
    }

    /// A root-owned file at `path` with `bytes` as its contents.
    pub fn bytes(&mut self, path: &str, bytes: impl Into<Vec<u8>>, mode: u32) -> Result<(), Error> {
        self.insert(
            path,
            Entry {
                content: Content::Bytes(bytes.into()),
                mode,
                uid: 0,
                gid: 0,
            },
        )
    }

    /// A root-owned file at `path` with the contents of `source` on this machine (symbolic
    /// links followed), read when the layer is written.
    pub fn file(&mut self, path: &str, source: &Path, mode: u32) -> Result<(), Error> {
        self.insert(
            path,
            Entry {
                content: Content::File(source.into()),
                mode,
                uid: 0,
                gid: 0,
            },
        )
    }

    /// The executable `source` at `path` (mode 0755), with the shared libraries and the
    /// dynamic loader it needs at the paths this machine's loader finds them (`ldd`), so that
    /// the layer alone runs it.
    pub fn executable(&mut self, path: &str, source: &Path) -> Result<(), Error> {
        self.file(path, source, 0o755)?;
        let libraries = ldd::shared_objects(source).map_err(|source| Error::Libraries {
            path: path.into(),
            source,
        })?;
        for lib in libraries {
            let at = lib.to_string_lossy();
            // Two executables share their libraries: a library already in the layer stays.
            if !self.entries.contains_key(at.trim_start_matches('/')) {
                self.file(&at, &lib, 0o755)?;
            }
        }
        Ok(())
    }

    fn insert(&mut self, path: &str, entry: Entry) -> Result<(), Error> {
        let path = normalize(path)?;
        // Each parent is a directory: added if missing, refused if a file.
        let mut parent = String::new();
        for part in path.split('/').take(path.split('/').count() - 1) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match self.entries.get(&parent) {
                Some(e) if e.content != Content::Dir => {
                    return Err(Error::Conflict {
                        path: parent,
                        existing: "file",
                    });
                }
                Some(_) => {}
                None => {
                    self.entries.insert(
                        parent.clone(),
                        Entry {
                            content: Content::Dir,
                            mode: 0o755,
                            uid: 0,
                            gid: 0,
                        },
                    );
                }
            }
        }
        match self.entries.get(&path) {
            // A directory added as a parent may be given its own owner and mode.
            Some(e) if e.content == Content::Dir && entry.content == Content::Dir => {}
            Some(e) => {
                return Err(Error::Conflict {
                    path,
                    existing: if e.content == Content::Dir {
                        "directory"
                    } else {
                        "file"
                    },
                });
            }
            None => {}
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Every entry, in the order the layer's archive holds them.
    pub fn entries(&self) -> Vec<Listed> {
        self.entries
            .iter()
            .map(|(path, e)| Listed {
                path: path.clone(),
                dir: e.content == Content::Dir,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
            })
            .collect()
    }

    /// The layer as an (uncompressed) tar archive.
    pub fn tar(&self) -> Result<Vec<u8>, Error> {
        let mut tar = Tar::new(Vec::new());
        for (path, e) in &self.entries {
            let mut header = Header {
                path,
                kind: Kind::File,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                size: 0,
                mtime: MTIME,
            };
            let written = match &e.content {
                Content::Dir => {
                    header.kind = Kind::Dir;
                    tar.append(&header, &[])
                }
                Content::Bytes(bytes) => {
                    header.size = bytes.len() as u64;
                    tar.append(&header, bytes)
                }
                Content::File(source) => {
                    let read = |source_err| Error::Read {
                        path: path.clone(),
                        source_path: source.clone(),
                        source: source_err,
                    };
                    let mut file = fs::File::open(source).map_err(read)?;
                    header.size = file.metadata().map_err(read)?.len();
                    tar.append_reader(&header, &mut file)
                }
            };
            written.map_err(|source| Error::Archive {
                path: path.clone(),
                source,
            })?;
        }
        tar.finish().map_err(|source| Error::Archive {
            path: "the end".into(),
            source,
        })
    }
}

/// `path` without its leading and trailing slashes; refused if relative, empty, or with
/// `.`/`..` or empty components.
fn normalize(path: &str) -> Result<String, Error> {
    let bad = || Error::Path { path: path.into() };
    let inner = path.strip_prefix('/').ok_or_else(bad)?;
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if inner.is_empty()
        || inner
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad());
    }
    Ok(inner.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_added_and_entries_are_in_path_order() {
        let mut layer = Layer::new();
        layer.bytes("/etc/passwd", "root\n", 0o644).expect("passwd");
        layer.dir("/tmp", 0o1777, 0, 0).expect("tmp");
        layer.bytes("/etc/group", "root\n", 0o644).expect("group");
        let listed: Vec<(String, bool, u32)> = layer
            .entries()
            .into_iter()
            .map(|e| (e.path, e.dir, e.mode))
            .collect();
        assert_eq!(
            listed,
            [
                ("etc".to_string(), true, 0o755),
                ("etc/group".into(), false, 0o644),
                ("etc/passwd".into(), false, 0o644),
                ("tmp".into(), true, 0o1777),
            ]
        );
    }

    #[test]
    fn bad_paths_and_conflicts_are_refused() {
        let mut layer = Layer::new();
        for bad in ["etc/x", "/", "/a/../b", "/a//b", "/./a"] {
            assert_eq!(
                layer.bytes(bad, "", 0o644).map_err(|e| e.kind()),
                Err("path"),
                "{bad}"
            );
        }
        layer.bytes("/etc/passwd", "", 0o644).expect("passwd");
        assert_eq!(
            layer
                .bytes("/etc/passwd/x", "", 0o644)
                .map_err(|e| e.kind()),
            Err("conflict")
        );
        assert_eq!(
            layer.dir("/etc/passwd", 0o755, 0, 0).map_err(|e| e.kind()),
            Err("conflict")
        );
        // A parent directory may be given its own owner.
        layer.dir("/etc", 0o700, 1, 1).expect("etc");
        assert_eq!(layer.entries()[0].uid, 1);
    }

    #[test]
    fn the_same_files_give_the_same_bytes_and_a_changed_file_does_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let src = dir.path().join("prog");
        fs::write(&src, b"#!/bin/true\n").expect("write");
        let build = || {
            let mut layer = Layer::new();
            layer
                .file("/usr/local/bin/prog", &src, 0o755)
                .expect("file");
            layer.tar().expect("tar")
        };
        let first = build();
        // A later modification time on the machine is not in the layer.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&src, b"#!/bin/true\n").expect("rewrite");
        assert_eq!(build(), first);
        fs::write(&src, b"#!/bin/false\n").expect("change");
        assert_ne!(build(), first);
    }

    #[test]
    fn an_executable_brings_its_loader_and_libraries() {
        let mut layer = Layer::new();
        layer
            .executable("/usr/local/bin/true", Path::new("/bin/true"))
            .expect("executable");
        let paths: Vec<String> = layer.entries().into_iter().map(|e| e.path).collect();
        assert!(
            paths.contains(&"usr/local/bin/true".to_string()),
            "{paths:?}"
        );
        assert!(paths.iter().any(|p| p.ends_with("/libc.so.6")), "{paths:?}");
        assert!(paths.iter().any(|p| p.contains("ld-linux")), "{paths:?}");
    }
}
