//! The content store: blobs by digest, image records by name, and each
//! layer unpacked once into a snapshot directory shared read-only by every
//! container that uses it.
//!
//! On disk, under `<data-dir>/images/`:
//! ```text
//! blobs/sha256/<hex>      manifests, configs and layers, verified as written
//! snapshots/<hex>/        a layer unpacked (hex of its diff_id), an overlayfs lower dir
//! records/<hex>.json      one image: name, manifest, config, layers (hex of sha256(name))
//! tmp/                    work in progress; renamed into place only when complete
//! tmp/partial-sha256-<hex> a registry download cut off, kept so the next pull resumes it
//! ```
//! Everything becomes visible by an atomic rename, so a crash leaves at most
//! files in `tmp/`, which the next open removes. A snapshot in use by a live
//! container is held with a shared `flock` on its directory ([`Lease`]);
//! `prune` takes the lock exclusively before deleting, so it never removes one
//! in use, even from another process, and a crashed holder releases it.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::unpack::{unpack_layer, Compression, UnpackLimits};
use super::ImageError;

/// Name prefix of partial downloads in `tmp/` (they carry no pid: they outlive their writer).
const PARTIAL_PREFIX: &str = "partial-sha256-";
/// How long an abandoned partial download is kept.
const PARTIAL_KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the blob as stored (compressed, when it is).
    pub digest: String,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// Media type of the blob.
    pub media_type: String,
    /// Size of the blob in bytes.
    pub size: u64,
}

/// The parts of an image's config that shape a container (OCI image spec, `config`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// Entrypoint, if any.
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments (or command, without an entrypoint).
    pub cmd: Option<Vec<String>>,
    /// Working directory.
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    pub user: Option<String>,
}

/// One image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Normalised reference, e.g. `docker.io/library/busybox:latest`.
    pub name: String,
    /// Digest of the image manifest.
    pub manifest_digest: String,
    /// Digest of the image config.
    pub config_digest: String,
    /// Layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// Run settings from the config.
    pub config: RunConfig,
    /// Architecture, e.g. `amd64`.
    pub architecture: String,
    /// OS, e.g. `linux`.
    pub os: String,
    /// When it was stored, seconds since the epoch.
    pub stored_at: u64,
}

impl ImageRecord {
    /// Total size of the layer blobs.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|layer| layer.size).sum()
    }
}

/// What prune removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Blobs removed.
    pub blobs: u64,
    /// Snapshots removed.
    pub snapshots: u64,
    /// Snapshots kept because a live container holds them.
    pub in_use: u64,
    /// Bytes of blobs freed.
    pub bytes: u64,
}

/// Shared locks on the snapshots of one running container; dropping it releases them.
#[derive(Debug)]
pub struct Lease {
    _locks: Vec<nix::fcntl::Flock<File>>,
}

/// The store rooted at `<data-dir>/images`.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// `sha256:<64 lowercase hex>` -> the hex part.
pub(crate) fn sha256_hex(digest: &str) -> Result<&str, ImageError> {
    super::reference::validate_digest(digest).map_err(|_| ImageError::BadDigest(digest.to_owned()))?;
    digest.strip_prefix("sha256:").ok_or_else(|| ImageError::BadDigest(digest.to_owned()))
}

/// `sha256:<hex>` of bytes.
pub(crate) fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_owned(), source }
}

impl ImageStore {
    /// Open (creating) the store under `data_dir`, and clear leftovers of
    /// interrupted work from `tmp/`.
    pub fn open(data_dir: &Path) -> Result<ImageStore, ImageError> {
        let root = data_dir.join("images");
        for sub in ["blobs/sha256", "snapshots", "records", "tmp"] {
            let path = root.join(sub);
            std::fs::create_dir_all(&path).map_err(io_error(&path))?;
        }
        let store = ImageStore { root };
        store.clear_stale_tmp();
        Ok(store)
    }

    /// Remove entries of `tmp/` whose writer is gone: their names carry the
    /// writer's pid. Partial downloads are kept for a week, for a pull to resume.
    fn clear_stale_tmp(&self) {
        let Ok(entries) = std::fs::read_dir(self.root.join("tmp")) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PARTIAL_PREFIX) {
                let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                if age.is_some_and(|age| age > PARTIAL_KEPT_FOR) {
                    let _ = remove_any(&entry.path());
                }
                continue;
            }
            let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let _ = remove_any(&entry.path());
            }
        }
    }

    fn tmp_path(&self, kind: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!("{kind}-{}-{n}", std::process::id()))
    }

    /// Where an interrupted download of a blob is kept: `tmp/partial-sha256-<hex>`.
    pub(crate) fn partial_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("tmp").join(format!("{PARTIAL_PREFIX}{}", sha256_hex(digest)?)))
    }

    /// Move a complete download, already verified against `digest`, into the blobs.
    pub(crate) fn install_partial(&self, partial: &Path, digest: &str) -> Result<(), ImageError> {
        let path = self.blob_path(digest)?;
        File::open(partial).and_then(|file| file.sync_all()).map_err(io_error(partial))?;
        std::fs::rename(partial, &path).map_err(io_error(&path))
    }

    /// Where a blob lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("blobs/sha256").join(sha256_hex(digest)?))
    }

    /// Whether a blob is present.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Read a whole (small) blob: a manifest, an index or a config.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest)?;
        std::fs::read(&path).map_err(io_error(&path))
    }

    /// Stream `reader` into the store, hashing as it goes. With `expected`,
    /// a mismatch is an error and nothing is stored; a blob already present is
    /// not written again. Returns the digest and size.
    pub fn write_blob(
        &self,
        mut reader: impl Read,
        expected: Option<&str>,
    ) -> Result<(String, u64), ImageError> {
        if let Some(expected) = expected {
            let path = self.blob_path(expected)?;
            if let Ok(meta) = std::fs::metadata(&path) {
                return Ok((expected.to_owned(), meta.len()));
            }
        }
        let tmp = self.tmp_path("blob");
        let result = (|| {
            let mut file = File::create_new(&tmp).map_err(io_error(&tmp))?;
            let mut hasher = Sha256::new();
            let mut buffer = vec![0u8; 256 * 1024];
            let mut size = 0u64;
            loop {
                let read = reader.read(&mut buffer).map_err(io_error(&tmp))?;
                if read == 0 {
                    break;
                }
                hasher.update(&buffer[..read]);
                file.write_all(&buffer[..read]).map_err(io_error(&tmp))?;
                size += read as u64;
            }
            let digest = format!("sha256:{}", hex(&hasher.finalize()));
            if let Some(expected) = expected {
                if expected != digest {
                    return Err(ImageError::DigestMismatch { expected: expected.to_owned(), actual: digest });
                }
            }
            file.sync_all().map_err(io_error(&tmp))?;
            let path = self.blob_path(&digest)?;
            std::fs::rename(&tmp, &path).map_err(io_error(&path))?;
            Ok((digest, size))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Store bytes as a blob.
    pub fn write_blob_bytes(&self, bytes: &[u8]) -> Result<String, ImageError> {
        self.write_blob(bytes, Some(&sha256_of(bytes))).map(|(digest, _)| digest)
    }

    /// Where a layer's snapshot lives (whether or not it exists yet).
    pub fn snapshot_path(&self, diff_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("snapshots").join(sha256_hex(diff_id)?))
    }

    /// Unpack a layer blob into its snapshot, once: an existing snapshot is
    /// reused. The unpacked tar must hash to the layer's diff_id.
    pub fn ensure_snapshot(&self, layer: &LayerRecord) -> Result<PathBuf, ImageError> {
        let target = self.snapshot_path(&layer.diff_id)?;
        if target.is_dir() {
            return Ok(target);
        }
        self.unpack_blob(&layer.digest, &layer.media_type, Some(&layer.diff_id)).map(|(path, _)| path)
    }

    /// Unpack a layer blob into the snapshot named by its diff_id, which is
    /// computed while unpacking and, when `expected_diff_id` is given, must
    /// match it. Returns the snapshot and the diff_id.
    pub fn unpack_blob(
        &self,
        digest: &str,
        media_type: &str,
        expected_diff_id: Option<&str>,
    ) -> Result<(PathBuf, String), ImageError> {
        let blob = self.blob_path(digest)?;
        let mut file = File::open(&blob).map_err(io_error(&blob))?;
        let compression = match Compression::from_media_type(media_type) {
            Some(compression) => compression,
            None => {
                let mut head = [0u8; 4];
                let read = file.read(&mut head).map_err(io_error(&blob))?;
                file = File::open(&blob).map_err(io_error(&blob))?;
                Compression::sniff(&head[..read])
            }
        };
        let tmp = self.tmp_path("snapshot");
        std::fs::create_dir(&tmp).map_err(io_error(&tmp))?;
        let result = unpack_layer(std::io::BufReader::new(file), compression, &tmp, &UnpackLimits::default())
            .map_err(|source| ImageError::Unpack { layer: digest.to_owned(), source })
            .and_then(|report| {
                tracing::debug!(layer = %digest, entries = report.entries, bytes = report.bytes, "layer unpacked");
                for neutralised in &report.neutralised {
                    tracing::warn!(layer = %digest, path = %neutralised.path, reason = neutralised.reason, "layer entry neutralised");
                }
                match expected_diff_id {
                    Some(expected) if expected != report.diff_id => Err(ImageError::DiffIdMismatch {
                        layer: digest.to_owned(),
                        expected: expected.to_owned(),
                        actual: report.diff_id,
                    }),
                    _ => Ok(report.diff_id),
                }
            })
            .and_then(|diff_id| Ok((self.snapshot_path(&diff_id)?, diff_id)));
        let (target, diff_id) = match result {
            Ok(done) => done,
            Err(error) => {
                let _ = remove_any(&tmp);
                return Err(error);
            }
        };
        match std::fs::rename(&tmp, &target) {
            Ok(()) => Ok((target, diff_id)),
            // Another process (or an earlier import) has the same snapshot.
            Err(_) if target.is_dir() => {
                let _ = remove_any(&tmp);
                Ok((target, diff_id))
            }
            Err(source) => {
                let _ = remove_any(&tmp);
                Err(ImageError::Io { path: target, source })
            }
        }
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root.join("records").join(format!("{}.json", hex(&Sha256::digest(name.as_bytes()))))
    }

    /// Store (or replace) an image record; its snapshots must exist.
    pub fn put_record(&self, record: &ImageRecord) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec_pretty(record).map_err(ImageError::Record)?;
        let tmp = self.tmp_path("record");
        std::fs::write(&tmp, bytes).map_err(io_error(&tmp))?;
        let path = self.record_path(&record.name);
        std::fs::rename(&tmp, &path).map_err(io_error(&path))
    }

    /// The record stored under a normalised name.
    pub fn get(&self, name: &str) -> Result<Option<ImageRecord>, ImageError> {
        let path = self.record_path(name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(ImageError::Record),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ImageError::Io { path, source }),
        }
    }

    /// Every record, sorted by name.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let dir = self.root.join("records");
        let mut records = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_error(&dir))?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                let bytes = std::fs::read(&path).map_err(io_error(&path))?;
                records.push(serde_json::from_slice::<ImageRecord>(&bytes).map_err(ImageError::Record)?);
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    /// Remove a record (its blobs and snapshots stay until `prune`).
    pub fn remove(&self, name: &str) -> Result<bool, ImageError> {
        let path = self.record_path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(ImageError::Io { path, source }),
        }
    }

    /// Snapshot directories of an image, topmost first (overlayfs lowerdir
    /// order), each held with a shared lock for as long as the lease lives.
    pub fn lease(&self, record: &ImageRecord) -> Result<(Vec<PathBuf>, Lease), ImageError> {
        let mut paths = Vec::with_capacity(record.layers.len());
        let mut locks = Vec::with_capacity(record.layers.len());
        for layer in record.layers.iter().rev() {
            let path = self.ensure_snapshot(layer)?;
            let dir = File::open(&path).map_err(io_error(&path))?;
            let lock = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockShared)
                .map_err(|(_, errno)| ImageError::Io { path: path.clone(), source: errno.into() })?;
            locks.push(lock);
            paths.push(path);
        }
        Ok((paths, Lease { _locks: locks }))
    }

    /// Remove blobs and snapshots no record refers to, except snapshots a
    /// live container holds.
    pub fn prune(&self) -> Result<PruneReport, ImageError> {
        let records = self.list()?;
        let mut blobs: HashSet<String> = HashSet::new();
        let mut snapshots: HashSet<String> = HashSet::new();
        for record in &records {
            blobs.insert(sha256_hex(&record.manifest_digest)?.to_owned());
            blobs.insert(sha256_hex(&record.config_digest)?.to_owned());
            for layer in &record.layers {
                blobs.insert(sha256_hex(&layer.digest)?.to_owned());
                snapshots.insert(sha256_hex(&layer.diff_id)?.to_owned());
            }
        }
        let mut report = PruneReport::default();
        let snapshot_dir = self.root.join("snapshots");
        for entry in std::fs::read_dir(&snapshot_dir).map_err(io_error(&snapshot_dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if snapshots.contains(&name) {
                continue;
            }
            let Ok(dir) = File::open(entry.path()) else { continue };
            match nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    // Renamed away while locked, so no new lease can find it.
                    let doomed = self.tmp_path("prune");
                    std::fs::rename(entry.path(), &doomed).map_err(io_error(&doomed))?;
                    drop(lock);
                    remove_any(&doomed).map_err(io_error(&doomed))?;
                    report.snapshots += 1;
                }
                Err(_) => report.in_use += 1,
            }
        }
        let blob_dir = self.root.join("blobs/sha256");
        for entry in std::fs::read_dir(&blob_dir).map_err(io_error(&blob_dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if blobs.contains(&name) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(entry.path()).map_err(io_error(&entry.path()))?;
            report.blobs += 1;
            report.bytes += size;
        }
        Ok(report)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}
