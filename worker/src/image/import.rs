//! Importing images without a registry: an OCI image layout (a directory, or
//! a tarball of one, as skopeo, umoci and newer `docker save` write), a
//! docker-archive tarball (classic `docker save`), or a plain root filesystem
//! tarball (mmdebstrap, `tar -C rootfs -c .`), which becomes a one-layer image.
//!
//! The format is detected, not declared: a directory with `oci-layout`; a
//! tarball whose top level holds `oci-layout` or `manifest.json`; otherwise a
//! rootfs tarball (gzip and zstd sniffed). Archives are extracted into the
//! store's `tmp/` accepting only plain files and directories with simple
//! names; every blob is verified against its digest as it is copied in.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};

use super::store::{sha256_of, ImageRecord, ImageStore, LayerRecord, RunConfig};
use super::unpack::Compression;
use super::{host_architecture, ImageError};

/// OCI media types used when Quilt writes manifests itself.
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// Import the image at `path` under the normalised `name`.
pub(super) fn import(store: &ImageStore, path: &Path, name: &str) -> Result<ImageRecord, ImageError> {
    let meta = std::fs::metadata(path).map_err(|source| ImageError::Io { path: path.to_owned(), source })?;
    if meta.is_dir() {
        if !path.join("oci-layout").is_file() {
            return Err(ImageError::UnknownFormat(path.to_owned()));
        }
        return import_oci_layout(store, path, name);
    }
    match scan_archive(path)? {
        ArchiveKind::OciLayout | ArchiveKind::DockerArchive => {
            let scratch = Scratch::new(store)?;
            extract_archive(path, &scratch.path)?;
            if scratch.path.join("oci-layout").is_file() {
                import_oci_layout(store, &scratch.path, name)
            } else {
                import_docker_archive(store, &scratch.path, name)
            }
        }
        ArchiveKind::Rootfs => import_rootfs_tarball(store, path, name),
    }
}

/// A directory in the store's tmp/, removed on drop.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new(store: &ImageStore) -> Result<Scratch, ImageError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = store.root().join("tmp").join(format!(
            "import-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).map_err(|source| ImageError::Io { path: path.clone(), source })?;
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

enum ArchiveKind {
    OciLayout,
    DockerArchive,
    Rootfs,
}

/// Open a possibly compressed tarball.
fn open_tar(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let io = |source| ImageError::Io { path: path.to_owned(), source };
    let mut head = [0u8; 4];
    let read = File::open(path).map_err(io)?.read(&mut head).map_err(io)?;
    let file = std::io::BufReader::new(File::open(path).map_err(io)?);
    Ok(match Compression::sniff(&head[..read]) {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(io)?),
    })
}

/// Top-level entry name, without a leading `./`.
fn top_level(name: &Path) -> Option<String> {
    let mut parts = name.components().filter(|c| !matches!(c, Component::CurDir));
    let first = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some(first.as_os_str().to_string_lossy().into_owned())
}

fn scan_archive(path: &Path) -> Result<ArchiveKind, ImageError> {
    let mut archive = tar::Archive::new(open_tar(path)?);
    let bad = |source| ImageError::Archive { path: path.to_owned(), source };
    let mut docker = false;
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let name = entry.path().map_err(bad)?.into_owned();
        match top_level(&name).as_deref() {
            Some("oci-layout") => return Ok(ArchiveKind::OciLayout),
            Some("manifest.json") => docker = true,
            _ => {}
        }
    }
    Ok(if docker { ArchiveKind::DockerArchive } else { ArchiveKind::Rootfs })
}

/// Extract an image archive: plain files and directories only, relative
/// names without `..`; anything else in it is refused.
fn extract_archive(path: &Path, into: &Path) -> Result<(), ImageError> {
    let mut archive = tar::Archive::new(open_tar(path)?);
    let bad = |source| ImageError::Archive { path: path.to_owned(), source };
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let name = entry.path().map_err(bad)?.into_owned();
        let mut relative = PathBuf::new();
        for component in name.components() {
            match component {
                Component::Normal(part) => relative.push(part),
                Component::CurDir => {}
                _ => {
                    return Err(ImageError::ArchiveEntry {
                        path: path.to_owned(),
                        entry: name.display().to_string(),
                    })
                }
            }
        }
        if relative.as_os_str().is_empty() {
            continue;
        }
        let target = into.join(&relative);
        let io = |source| ImageError::Io { path: target.clone(), source };
        match entry.header().entry_type() {
            tar::EntryType::Directory => std::fs::create_dir_all(&target).map_err(io)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                let mut file = File::create_new(&target).map_err(io)?;
                std::io::copy(&mut entry, &mut file).map_err(io)?;
            }
            // docker save writes symlinks for layers shared between images.
            tar::EntryType::Symlink => {
                let link = entry.link_name().map_err(bad)?.map(|l| l.into_owned()).unwrap_or_default();
                let resolved = target.parent().unwrap_or(into).join(&link);
                let inside = normalise(&resolved).filter(|p| p.starts_with(into));
                match inside {
                    Some(source) if source.is_file() => {
                        if let Some(parent) = target.parent() {
                            std::fs::create_dir_all(parent).map_err(io)?;
                        }
                        std::fs::copy(&source, &target).map_err(io)?;
                    }
                    _ => {
                        return Err(ImageError::ArchiveEntry {
                            path: path.to_owned(),
                            entry: name.display().to_string(),
                        })
                    }
                }
            }
            _ => {
                return Err(ImageError::ArchiveEntry {
                    path: path.to_owned(),
                    entry: name.display().to_string(),
                })
            }
        }
    }
    Ok(())
}

/// Lexically normalise an absolute path; `None` if `..` climbs above `/`.
fn normalise(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(part) => out.push(part),
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn blob_in_layout(layout: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let (algorithm, hex) = digest.split_once(':').ok_or_else(|| ImageError::BadDigest(digest.to_owned()))?;
    super::reference::validate_digest(digest).map_err(|_| ImageError::BadDigest(digest.to_owned()))?;
    Ok(layout.join("blobs").join(algorithm).join(hex))
}

fn read_layout_blob(layout: &Path, descriptor: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let digest = descriptor.digest().to_string();
    let path = blob_in_layout(layout, &digest)?;
    let bytes = std::fs::read(&path).map_err(|source| ImageError::Io { path: path.clone(), source })?;
    let actual = sha256_of(&bytes);
    if actual != digest {
        return Err(ImageError::DigestMismatch { expected: digest, actual });
    }
    Ok(bytes)
}

fn is_index(media_type: &MediaType) -> bool {
    matches!(media_type, MediaType::ImageIndex)
        || media_type.to_string() == "application/vnd.docker.distribution.manifest.list.v2+json"
}

/// Pick the manifest for this host from an index: linux and the host's architecture.
pub(super) fn pick_platform(index: &ImageIndex) -> Option<&Descriptor> {
    let manifests = index.manifests();
    let arch = host_architecture();
    let matching = manifests.iter().find(|descriptor| {
        descriptor
            .platform()
            .as_ref()
            .is_some_and(|p| p.os().to_string() == "linux" && p.architecture().to_string() == arch)
    });
    matching.or_else(|| match manifests.as_slice() {
        [only] if only.platform().is_none() => Some(only),
        _ => None,
    })
}

fn import_oci_layout(store: &ImageStore, layout: &Path, name: &str) -> Result<ImageRecord, ImageError> {
    let index_path = layout.join("index.json");
    let index = ImageIndex::from_file(&index_path)
        .map_err(|source| ImageError::Json { path: index_path.clone(), source })?;
    // The descriptor of the image: the only one, or the one whose ref name
    // annotation matches the wanted tag.
    let wanted_tag = name.rsplit_once(':').map(|(_, tag)| tag).unwrap_or("latest");
    let mut descriptor = match index.manifests().as_slice() {
        [only] => only.clone(),
        many => many
            .iter()
            .find(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get("org.opencontainers.image.ref.name"))
                    .is_some_and(|r| r == wanted_tag)
            })
            .cloned()
            .ok_or_else(|| {
                ImageError::NoManifest(format!("no image tagged {wanted_tag:?} in {}", layout.display()))
            })?,
    };
    // Follow nested indexes down to a manifest for this platform.
    for _ in 0..4 {
        if !is_index(descriptor.media_type()) {
            break;
        }
        let bytes = read_layout_blob(layout, &descriptor)?;
        store.write_blob_bytes(&bytes)?;
        let nested = ImageIndex::from_reader(bytes.as_slice())
            .map_err(|source| ImageError::Json { path: index_path.clone(), source })?;
        descriptor = pick_platform(&nested).cloned().ok_or_else(|| {
            ImageError::NoManifest(format!("no linux/{} image in {}", host_architecture(), layout.display()))
        })?;
    }
    let manifest_bytes = read_layout_blob(layout, &descriptor)?;
    let manifest = ImageManifest::from_reader(manifest_bytes.as_slice())
        .map_err(|source| ImageError::Json { path: index_path.clone(), source })?;
    let config_bytes = read_layout_blob(layout, manifest.config())?;
    let mut layers = Vec::new();
    for layer in manifest.layers() {
        let digest = layer.digest().to_string();
        let path = blob_in_layout(layout, &digest)?;
        let file = File::open(&path).map_err(|source| ImageError::Io { path: path.clone(), source })?;
        let (digest, size) = store.write_blob(file, Some(&digest))?;
        layers.push((digest, layer.media_type().to_string(), size));
    }
    let manifest_digest = store.write_blob_bytes(&manifest_bytes)?;
    commit(store, name, manifest_digest, &config_bytes, layers)
}

/// docker save's manifest.json.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn archive_file(root: &Path, relative: &str) -> Result<PathBuf, ImageError> {
    let path = root.join(relative);
    match normalise(&path) {
        Some(normal) if normal.starts_with(root) && normal.is_file() => Ok(normal),
        _ => Err(ImageError::ArchiveEntry { path: root.to_owned(), entry: relative.to_owned() }),
    }
}

fn import_docker_archive(store: &ImageStore, root: &Path, name: &str) -> Result<ImageRecord, ImageError> {
    let manifest_path = root.join("manifest.json");
    let bytes = std::fs::read(&manifest_path)
        .map_err(|source| ImageError::Io { path: manifest_path.clone(), source })?;
    let entries: Vec<DockerManifestEntry> = serde_json::from_slice(&bytes)
        .map_err(|source| ImageError::DockerManifest { path: manifest_path.clone(), source })?;
    let entry = match entries.as_slice() {
        [only] => only,
        many => many
            .iter()
            .find(|e| {
                e.repo_tags.iter().flatten().any(|t| super::normalise_name(t).ok().as_deref() == Some(name))
            })
            .ok_or_else(|| ImageError::NoManifest(format!("no image named {name} in the archive")))?,
    };
    let config_path = archive_file(root, &entry.config)?;
    let config_bytes =
        std::fs::read(&config_path).map_err(|source| ImageError::Io { path: config_path.clone(), source })?;
    let mut layers = Vec::new();
    for layer in &entry.layers {
        let path = archive_file(root, layer)?;
        let media_type = sniff_layer_media_type(&path)?;
        let file = File::open(&path).map_err(|source| ImageError::Io { path: path.clone(), source })?;
        let (digest, size) = store.write_blob(file, None)?;
        layers.push((digest, media_type.to_owned(), size));
    }
    let manifest = synthesize_manifest(&config_bytes, &layers);
    let manifest_digest = store.write_blob_bytes(&manifest)?;
    commit(store, name, manifest_digest, &config_bytes, layers)
}

fn import_rootfs_tarball(store: &ImageStore, path: &Path, name: &str) -> Result<ImageRecord, ImageError> {
    let media_type = sniff_layer_media_type(path)?;
    let file = File::open(path).map_err(|source| ImageError::Io { path: path.to_owned(), source })?;
    let (digest, size) = store.write_blob(file, None)?;
    // The diff_id is only known once the layer is unpacked: unpack it first,
    // then write the config that names it.
    let (_, diff_id) = store.unpack_blob(&digest, media_type, None)?;
    let config = serde_json::json!({
        "architecture": host_architecture(),
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": format!("quilt image import {}", path.display())}]
    });
    let config_bytes = serde_json::to_vec(&config).map_err(ImageError::Record)?;
    let layers = vec![(digest, media_type.to_owned(), size)];
    let manifest = synthesize_manifest(&config_bytes, &layers);
    let manifest_digest = store.write_blob_bytes(&manifest)?;
    commit(store, name, manifest_digest, &config_bytes, layers)
}

/// The OCI layer media type matching a layer file's compression, sniffed.
fn sniff_layer_media_type(path: &Path) -> Result<&'static str, ImageError> {
    let mut head = [0u8; 4];
    let read = File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|source| ImageError::Io { path: path.to_owned(), source })?;
    Ok(match Compression::sniff(&head[..read]) {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    })
}

fn synthesize_manifest(config: &[u8], layers: &[(String, String, u64)]) -> Vec<u8> {
    let value = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": sha256_of(config), "size": config.len()},
        "layers": layers.iter().map(|(digest, media_type, size)| serde_json::json!({
            "mediaType": media_type, "digest": digest, "size": size
        })).collect::<Vec<_>>(),
    });
    // serde_json output of a json! value is deterministic (sorted keys).
    serde_json::to_vec(&value).unwrap_or_default()
}

/// Store the config, unpack every layer into its snapshot (checking diff_ids
/// against the config), then write the record.
pub(super) fn commit(
    store: &ImageStore,
    name: &str,
    manifest_digest: String,
    config_bytes: &[u8],
    layers: Vec<(String, String, u64)>,
) -> Result<ImageRecord, ImageError> {
    let config = ImageConfiguration::from_reader(config_bytes)
        .map_err(|source| ImageError::Json { path: PathBuf::from("image config"), source })?;
    let config_digest = store.write_blob_bytes(config_bytes)?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != layers.len() {
        return Err(ImageError::LayerCount { layers: layers.len(), diff_ids: diff_ids.len() });
    }
    let layers: Vec<LayerRecord> = layers
        .into_iter()
        .zip(diff_ids)
        .map(|((digest, media_type, size), diff_id)| LayerRecord {
            digest,
            diff_id: diff_id.clone(),
            media_type,
            size,
        })
        .collect();
    for layer in &layers {
        store.ensure_snapshot(layer)?;
    }
    let run = config.config().as_ref();
    let record = ImageRecord {
        name: name.to_owned(),
        manifest_digest,
        config_digest,
        layers,
        config: RunConfig {
            env: run.and_then(|c| c.env().clone()).unwrap_or_default(),
            entrypoint: run.and_then(|c| c.entrypoint().clone()),
            cmd: run.and_then(|c| c.cmd().clone()),
            working_dir: run.and_then(|c| c.working_dir().clone()).filter(|w| !w.is_empty()),
            user: run.and_then(|c| c.user().clone()).filter(|u| !u.is_empty()),
        },
        architecture: config.architecture().to_string(),
        os: config.os().to_string(),
        stored_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    store.put_record(&record)?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_refuses_climbing_out() {
        assert_eq!(normalise(Path::new("/a/b/../c")), Some(PathBuf::from("/a/c")));
        assert_eq!(normalise(Path::new("/../x")), None);
    }

    #[test]
    fn top_level_names() {
        assert_eq!(top_level(Path::new("./manifest.json")).as_deref(), Some("manifest.json"));
        assert_eq!(top_level(Path::new("blobs/sha256/x")), None);
    }
}
