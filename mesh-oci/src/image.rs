//! OCI image layout archives: the layout (`oci-layout`, `index.json`, `blobs/sha256/...`) of
//! one or more images in a tar file, as `ctr images import`, `podman load` and `skopeo copy
//! oci-archive:...` take it. Layers are stored uncompressed (a registry push may compress
//! them); every blob is named by its SHA-256 digest; nothing in it depends on when or where
//! it was written.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layer::{self, Layer, MTIME};
use crate::tar::{Header, Kind, Tar};

pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// The index annotation containerd (and podman) name an imported image by.
pub const NAME_ANNOTATION: &str = "io.containerd.image.name";
/// The OCI annotation of an image's reference in a layout: its tag.
pub const REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// The creation time every configuration states: fixed, so a rebuild has the same digest.
pub const CREATED: &str = "1970-01-01T00:00:00Z";

/// Why an archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("build a layer")]
    Layer(#[from] layer::Error),
    #[error("encode {what} as JSON")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{name}: {digest} is not a blob of this archive")]
    UnknownLayer { name: String, digest: String },
    #[error("write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Layer(e) => e.kind(),
            Error::Json { .. } => "json",
            Error::UnknownLayer { .. } => "unknown_layer",
            Error::Write { .. } => "write",
        }
    }
}

// === OCI documents ===

/// A reference to a blob (image-spec descriptor.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// The images of a layout (image-spec image-index.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

/// One image: its configuration and layers (image-spec manifest.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An image's configuration (image-spec config.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigFile {
    pub created: String,
    pub architecture: String,
    pub os: String,
    pub config: RunConfig,
    pub rootfs: RootFs,
}

/// How a container of the image runs, unless its creator says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// `uid[:gid]` or a name from the image's `/etc/passwd`; Kubernetes' `runAsNonRoot` can
    /// only check a numeric one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let sum = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = sum.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The tag of a full image name (`docker.io/library/mesh-agent:0.1.0` -> `0.1.0`), `latest`
/// when it has none.
pub fn tag_of(name: &str) -> &str {
    match name.rsplit_once(':') {
        Some((_, tag)) if !tag.contains('/') => tag,
        _ => "latest",
    }
}

// === impl Archive ===

/// The blobs and images of one layout, written with [`Archive::write`].
#[derive(Debug, Default)]
pub struct Archive {
    /// By digest: the order they are written in.
    blobs: BTreeMap<String, Vec<u8>>,
    manifests: Vec<Descriptor>,
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    fn put(&mut self, media_type: &str, bytes: Vec<u8>) -> Descriptor {
        let d = Descriptor {
            media_type: media_type.into(),
            digest: digest(&bytes),
            size: bytes.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
        };
        self.blobs.entry(d.digest.clone()).or_insert(bytes);
        d
    }

    /// Adds `layer`'s archive as a blob; its descriptor names it in [`Archive::add_image`].
    /// The same layer added twice is stored once.
    pub fn add_layer(&mut self, layer: &Layer) -> Result<Descriptor, Error> {
        Ok(self.put(LAYER_TYPE, layer.tar()?))
    }

    /// Adds the image `name` (a full reference, `registry/repository:tag`) for linux/amd64:
    /// `config` on the `layers` (added before, bottom first). Returns its manifest's
    /// descriptor as the index lists it.
    pub fn add_image(
        &mut self,
        name: &str,
        config: RunConfig,
        layers: &[Descriptor],
    ) -> Result<Descriptor, Error> {
        for l in layers {
            if !self.blobs.contains_key(&l.digest) {
                return Err(Error::UnknownLayer {
                    name: name.into(),
                    digest: l.digest.clone(),
                });
            }
        }
        let file = ConfigFile {
            created: CREATED.into(),
            architecture: "amd64".into(),
            os: "linux".into(),
            config,
            // Uncompressed layers: each one's digest is its diff ID too.
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: layers.iter().map(|l| l.digest.clone()).collect(),
            },
        };
        let config = self.put(CONFIG_TYPE, to_json("the image configuration", &file)?);
        let manifest = Manifest {
            schema_version: 2,
            media_type: MANIFEST_TYPE.into(),
            config,
            layers: layers.to_vec(),
        };
        let mut d = self.put(MANIFEST_TYPE, to_json("the manifest", &manifest)?);
        d.platform = Some(Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
        });
        d.annotations = BTreeMap::from([
            (NAME_ANNOTATION.to_string(), name.to_string()),
            (REF_ANNOTATION.to_string(), tag_of(name).to_string()),
        ]);
        self.manifests.push(d.clone());
        Ok(d)
    }

    /// The layout's index.
    pub fn index(&self) -> Index {
        Index {
            schema_version: 2,
            media_type: INDEX_TYPE.into(),
            manifests: self.manifests.clone(),
        }
    }

    /// Writes the layout as a tar archive at `out` (through a temporary file beside it, so a
    /// failed write leaves no partial archive).
    pub fn write(&self, out: &Path) -> Result<(), Error> {
        let index = serde_json::to_vec(&self.index()).map_err(|source| Error::Json {
            what: "the index",
            source,
        })?;
        let mut files: Vec<(String, &[u8])> = vec![
            ("index.json".into(), &index),
            ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
        ];
        for (d, bytes) in &self.blobs {
            files.push((format!("blobs/{}", d.replacen(':', "/", 1)), bytes));
        }
        files.sort();
        let write_err = |source| Error::Write {
            path: out.into(),
            source,
        };
        let tmp = out.with_extension("partial");
        let file = fs::File::create(&tmp).map_err(write_err)?;
        let mut tar = Tar::new(std::io::BufWriter::new(file));
        let mut header = Header {
            path: "",
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: MTIME,
        };
        for dir in ["blobs", "blobs/sha256"] {
            header.path = dir;
            tar.append(&header, &[]).map_err(write_err)?;
        }
        header.kind = Kind::File;
        header.mode = 0o644;
        for (path, bytes) in &files {
            header.path = path;
            header.size = bytes.len() as u64;
            tar.append(&header, bytes).map_err(write_err)?;
        }
        tar.finish()
            .and_then(|mut w| w.get_mut().sync_all())
            .map_err(write_err)?;
        fs::rename(&tmp, out).map_err(write_err)
    }
}

fn to_json<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|source| Error::Json { what, source })
}

// === impl Unpacked ===

/// Why an archive could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not a valid tar archive")]
    Tar { what: String },
    #[error("{what}: missing from the layout")]
    Missing { what: String },
    #[error("{what}: invalid JSON")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("blob {digest} does not match its digest ({actual})")]
    Digest { digest: String, actual: String },
}

impl ReadError {
    pub fn kind(&self) -> &'static str {
        match self {
            ReadError::Io { .. } => "io",
            ReadError::Tar { .. } => "tar",
            ReadError::Missing { .. } => "missing",
            ReadError::Json { .. } => "json",
            ReadError::Digest { .. } => "digest",
        }
    }
}

/// An image layout archive read back into memory, every blob checked against its name: what
/// a runtime importing it would see.
#[derive(Debug)]
pub struct Unpacked {
    /// The archive's files by path (`index.json`, `blobs/sha256/<hex>`, ...).
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Unpacked {
    pub fn read(path: &Path) -> Result<Unpacked, ReadError> {
        let bytes = fs::read(path).map_err(|source| ReadError::Io {
            path: path.into(),
            source,
        })?;
        let entries = crate::tar::read(&bytes).ok_or_else(|| ReadError::Tar {
            what: path.display().to_string(),
        })?;
        let files: BTreeMap<String, Vec<u8>> = entries
            .into_iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| (e.path, e.data))
            .collect();
        for (name, bytes) in &files {
            if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                let actual = digest(bytes);
                if actual != format!("sha256:{hex}") {
                    return Err(ReadError::Digest {
                        digest: format!("sha256:{hex}"),
                        actual,
                    });
                }
            }
        }
        Ok(Unpacked { files })
    }

    /// The blob `d` names, checked against its size.
    pub fn blob(&self, d: &Descriptor) -> Result<&[u8], ReadError> {
        let bytes = self
            .files
            .get(&format!("blobs/{}", d.digest.replacen(':', "/", 1)))
            .ok_or_else(|| ReadError::Missing {
                what: d.digest.clone(),
            })?;
        if bytes.len() as u64 != d.size {
            return Err(ReadError::Missing {
                what: format!("{} of {} bytes (it has {})", d.digest, d.size, bytes.len()),
            });
        }
        Ok(bytes)
    }

    fn json<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, ReadError> {
        serde_json::from_slice(bytes).map_err(|source| ReadError::Json {
            what: what.into(),
            source,
        })
    }

    pub fn index(&self) -> Result<Index, ReadError> {
        let bytes = self
            .files
            .get("index.json")
            .ok_or_else(|| ReadError::Missing {
                what: "index.json".into(),
            })?;
        Self::json("index.json", bytes)
    }

    pub fn manifest(&self, d: &Descriptor) -> Result<Manifest, ReadError> {
        Self::json(&d.digest, self.blob(d)?)
    }

    pub fn config(&self, m: &Manifest) -> Result<ConfigFile, ReadError> {
        Self::json(&m.config.digest, self.blob(&m.config)?)
    }

    /// The entries of the layer `d`.
    pub fn layer(&self, d: &Descriptor) -> Result<Vec<crate::tar::Entry>, ReadError> {
        crate::tar::read(self.blob(d)?).ok_or_else(|| ReadError::Tar {
            what: d.digest.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(text: &str) -> Layer {
        let mut layer = Layer::new();
        layer.bytes("/etc/motd", text, 0o644).expect("motd");
        layer.dir("/tmp", 0o1777, 0, 0).expect("tmp");
        layer
    }

    fn config(label: &str) -> RunConfig {
        RunConfig {
            user: Some("65532:65532".into()),
            env: vec!["PATH=/usr/local/bin".into()],
            entrypoint: vec!["/usr/local/bin/x".into()],
            labels: BTreeMap::from([("l".to_string(), label.to_string())]),
            ..RunConfig::default()
        }
    }

    /// An archive of two images sharing one layer, written to `dir/name`.
    fn write(dir: &Path, name: &str, label: &str) -> (PathBuf, Vec<Descriptor>) {
        let mut archive = Archive::new();
        let l = archive.add_layer(&layer("hello")).expect("layer");
        let again = archive.add_layer(&layer("hello")).expect("layer");
        assert_eq!(l, again);
        let images = vec![
            archive
                .add_image(
                    "example.test/a:1.0",
                    config(label),
                    std::slice::from_ref(&l),
                )
                .expect("a"),
            archive
                .add_image("localhost:5000/b", config(label), &[l])
                .expect("b"),
        ];
        let path = dir.join(name);
        archive.write(&path).expect("write");
        (path, images)
    }

    #[test]
    fn the_index_and_manifests_name_their_blobs_by_digest_and_size() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, images) = write(dir.path(), "a.tar", "x");
        // Every blob's name is checked against its digest as it is read.
        let unpacked = Unpacked::read(&path).expect("read back");
        let names: Vec<&str> = unpacked.files.keys().map(String::as_str).collect();
        // Two names of one image: one layer, one configuration, one manifest.
        assert_eq!(names.len(), 3 + 2, "{names:?}");
        assert_eq!(images[0].digest, images[1].digest);
        assert_eq!(
            unpacked.files["oci-layout"],
            br#"{"imageLayoutVersion":"1.0.0"}"#
        );
        let index = unpacked.index().expect("index");
        assert_eq!(index.manifests, images);
        let refs: Vec<(&str, &str)> = index
            .manifests
            .iter()
            .map(|m| {
                (
                    m.annotations[NAME_ANNOTATION].as_str(),
                    m.annotations[REF_ANNOTATION].as_str(),
                )
            })
            .collect();
        assert_eq!(
            refs,
            [
                ("example.test/a:1.0", "1.0"),
                ("localhost:5000/b", "latest")
            ]
        );
        for d in &index.manifests {
            assert_eq!(d.media_type, MANIFEST_TYPE);
            assert_eq!(d.platform.as_ref().expect("platform").architecture, "amd64");
            let manifest = unpacked.manifest(d).expect("manifest");
            assert_eq!(manifest.config.media_type, CONFIG_TYPE);
            let config = unpacked.config(&manifest).expect("config");
            assert_eq!(
                (config.architecture.as_str(), config.os.as_str()),
                ("amd64", "linux")
            );
            assert_eq!(config.created, CREATED);
            assert_eq!(config.config, super::tests::config("x"));
            assert_eq!(manifest.layers.len(), 1);
            assert_eq!(manifest.layers[0].media_type, LAYER_TYPE);
            assert_eq!(config.rootfs.diff_ids, [manifest.layers[0].digest.clone()]);
            let entries = unpacked.layer(&manifest.layers[0]).expect("layer");
            let listed: Vec<(&str, u64, u32)> = entries
                .iter()
                .map(|e| (e.path.as_str(), e.mtime, e.mode))
                .collect();
            assert_eq!(
                listed,
                [
                    ("etc", 0, 0o755),
                    ("etc/motd", 0, 0o644),
                    ("tmp", 0, 0o1777)
                ]
            );
        }
        // GNU tar reads the layout too.
        let out = std::process::Command::new("tar")
            .arg("-tf")
            .arg(&path)
            .output()
            .expect("run tar");
        assert!(out.status.success());
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.lines().any(|l| l == "index.json"), "{list}");
    }

    #[test]
    fn a_size_or_digest_that_does_not_match_its_blob_is_found() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, images) = write(dir.path(), "a.tar", "x");
        let unpacked = Unpacked::read(&path).expect("read back");
        let mut wrong = images[0].clone();
        wrong.size += 1;
        assert_eq!(unpacked.blob(&wrong).map_err(|e| e.kind()), Err("missing"));
        // A blob whose bytes changed no longer matches its name.
        let mut bytes = fs::read(&path).expect("read");
        let motd = bytes
            .windows(5)
            .position(|w| w == b"hello")
            .expect("the layer's file");
        bytes[motd] = b'j';
        fs::write(&path, &bytes).expect("write");
        let err = Unpacked::read(&path).map_err(|e| e.kind());
        // The tar header checksums cover headers only: the blob's digest catches it.
        assert_eq!(err.err(), Some("digest"));
    }

    #[test]
    fn the_same_input_gives_the_same_archive_and_a_changed_one_does_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (a, images_a) = write(dir.path(), "a.tar", "x");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (b, images_b) = write(dir.path(), "b.tar", "x");
        assert_eq!(images_a, images_b);
        assert_eq!(fs::read(&a).expect("a"), fs::read(&b).expect("b"));
        let (_, images_c) = write(dir.path(), "c.tar", "y");
        assert_ne!(images_a[0].digest, images_c[0].digest);
    }

    #[test]
    fn an_image_on_a_layer_not_in_the_archive_is_refused() {
        let mut archive = Archive::new();
        let mut other = Archive::new();
        let l = other.add_layer(&layer("x")).expect("layer");
        assert_eq!(
            archive
                .add_image("a:1", RunConfig::default(), &[l])
                .map_err(|e| e.kind()),
            Err("unknown_layer")
        );
    }
}
