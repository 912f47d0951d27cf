//! Image files on disk, made by the tests themselves, for the image store's
//! integration tests: no network, no registry, no host tools besides busybox.
//!
//! Three formats, each as the tool that usually writes it does:
//!
//! - **OCI image layout** (skopeo `oci:`, umoci, `docker save` since 25): a
//!   directory with `oci-layout`, `index.json` and content-addressed
//!   `blobs/sha256/<hex>` holding manifests, configs and layers. See the
//!   [image-layout spec](https://github.com/opencontainers/image-spec/blob/main/image-layout.md),
//!   [manifest](https://github.com/opencontainers/image-spec/blob/main/manifest.md),
//!   [image index](https://github.com/opencontainers/image-spec/blob/main/image-index.md),
//!   [config](https://github.com/opencontainers/image-spec/blob/main/config.md) and
//!   [layer](https://github.com/opencontainers/image-spec/blob/main/layer.md) (whiteouts).
//!   `index.json` names the image with the `org.opencontainers.image.ref.name`
//!   annotation, which is how `skopeo inspect oci:<dir>:<tag>` finds it.
//! - **docker-archive** (classic `docker save`, before 25): a tar of
//!   `manifest.json` (`[{Config, RepoTags, Layers}]`), the config as
//!   `<hex>.json`, each layer uncompressed as `<id>/layer.tar` next to the
//!   legacy `<id>/VERSION` and `<id>/json`, and a `repositories` file. Docker
//!   named `<id>` after a v1 chain id; here it is the hex of the layer's diff_id
//!   (so equal layers share one directory). A reader must only follow
//!   `manifest.json`, so the directory name must not matter to it.
//! - **rootfs tarball** (mmdebstrap, `debootstrap | tar`): one plain or gzip
//!   tar of the whole filesystem.
//!
//! Every digest is the sha256 of the exact bytes written, and every byte is
//! deterministic (uid/gid 0, mtime 0, GNU headers, gzip without timestamp,
//! JSON from `serde_json`), so a digest is the same on every run.
//!
//! The JSON is written by hand with `serde_json` rather than with the
//! `oci-spec` types the image store reads it with: a fixture that shares the
//! consumer's types would also share its misreadings of the spec.
//! [`Entry::Raw`] writes tar headers byte by byte because the `tar` crate's
//! builder rightly refuses `..` and absolute names, which are exactly what a
//! hostile layer carries.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index (one manifest per platform).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed layer.
pub const LAYER_TAR_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a gzip layer.
pub const LAYER_GZIP_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a zstd layer.
pub const LAYER_ZSTD_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The annotation in `index.json` that names an image in a layout.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// The `created` time of every config and history entry, for stable digests.
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// Width of the tar header's name and linkname fields; longer names need a
/// GNU `././@LongLink` record before the header.
const TAR_NAME_FIELD_LEN: usize = 100;

/// One entry of a layer tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Relative path, e.g. `etc`.
        path: String,
        /// Permission bits, e.g. `0o755` or `0o1777`.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Relative path, e.g. `etc/passwd`.
        path: String,
        /// Permission bits, e.g. `0o644`.
        mode: u32,
        /// The file's bytes.
        content: Vec<u8>,
    },
    /// A symbolic link (the target is written as given, absolute or `..` allowed).
    Symlink {
        /// Relative path of the link itself.
        path: String,
        /// What the link points to.
        target: String,
    },
    /// A hard link to an entry earlier in the same tar.
    Hardlink {
        /// Relative path of the new name.
        path: String,
        /// Path of the earlier entry, as written in this tar.
        target: String,
    },
    /// An OCI whiteout: `a/gone` writes the empty file `a/.wh.gone`, which
    /// deletes `a/gone` from the layers below.
    Whiteout {
        /// Path of the file or directory to delete.
        path: String,
    },
    /// An OCI opaque directory: writes `<path>/.wh..wh..opq`, which hides
    /// everything the layers below had in `<path>`.
    OpaqueDir {
        /// Path of the directory whose lower contents are hidden.
        path: String,
    },
    /// A hostile entry, its header written byte for byte: names and link
    /// targets the `tar` builder would refuse (`../escape`, `/abs`), any
    /// entry type. Names longer than 100 bytes get a GNU long-name record.
    Raw {
        /// The name exactly as it should appear in the archive.
        header_name: Vec<u8>,
        /// The header's type flag.
        kind: tar::EntryType,
        /// The header's link name, exactly as given.
        link: Option<Vec<u8>>,
        /// The entry's data (its size is written in the header whatever `kind` is).
        content: Vec<u8>,
    },
}

impl Entry {
    /// A directory entry.
    pub fn dir(path: impl Into<String>, mode: u32) -> Entry {
        Entry::Dir { path: path.into(), mode }
    }

    /// A regular file entry.
    pub fn file(path: impl Into<String>, mode: u32, content: impl Into<Vec<u8>>) -> Entry {
        Entry::File { path: path.into(), mode, content: content.into() }
    }

    /// A symbolic link entry.
    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> Entry {
        Entry::Symlink { path: path.into(), target: target.into() }
    }

    /// The name this entry gets in the archive (lossy for raw names).
    fn archive_name(&self) -> String {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::Hardlink { path, .. } => path.clone(),
            Entry::Whiteout { path } => whiteout_name(path),
            Entry::OpaqueDir { path } => opaque_name(path),
            Entry::Raw { header_name, .. } => String::from_utf8_lossy(header_name).into_owned(),
        }
    }
}

/// `a/gone` -> `a/.wh.gone`.
fn whiteout_name(path: &str) -> String {
    let path = path.trim_end_matches('/');
    match path.rsplit_once('/') {
        Some((parent, name)) => format!("{parent}/.wh.{name}"),
        None => format!(".wh.{path}"),
    }
}

/// `a` -> `a/.wh..wh..opq`.
fn opaque_name(path: &str) -> String {
    let path = path.trim_end_matches('/');
    if path.is_empty() || path == "." {
        ".wh..wh..opq".to_owned()
    } else {
        format!("{path}/.wh..wh..opq")
    }
}

/// How a layer blob is compressed in an OCI layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// The tar as is.
    None,
    /// gzip, without a timestamp.
    Gzip,
    /// zstd at its default level.
    Zstd,
}

impl LayerCompression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            LayerCompression::None => LAYER_TAR_MEDIA_TYPE,
            LayerCompression::Gzip => LAYER_GZIP_MEDIA_TYPE,
            LayerCompression::Zstd => LAYER_ZSTD_MEDIA_TYPE,
        }
    }

    fn compress(self, tar: &[u8]) -> Vec<u8> {
        match self {
            LayerCompression::None => tar.to_vec(),
            LayerCompression::Gzip => gzip_bytes(tar),
            LayerCompression::Zstd => zstd::encode_all(tar, 0).expect("zstd into memory"),
        }
    }
}

fn gzip_bytes(bytes: &[u8]) -> Vec<u8> {
    // GzEncoder writes mtime 0 and no file name, so the output is stable.
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

/// A header with the fields every entry shares: uid/gid 0, mtime 0.
fn base_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(size);
    header
}

/// Build a layer tar (uncompressed bytes): entries in the given order, uid/gid
/// 0, mtime 0, GNU headers (long names as GNU long-name records).
///
/// Panics if a non-raw entry has a name the `tar` crate refuses (absolute or
/// with `..`): such entries belong in [`Entry::Raw`].
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        append_entry(&mut builder, entry).unwrap_or_else(|error| {
            panic!("layer entry {:?}: {error} (hostile names go in Entry::Raw)", entry.archive_name())
        });
    }
    builder.into_inner().expect("tar into memory")
}

fn append_entry(builder: &mut tar::Builder<Vec<u8>>, entry: &Entry) -> std::io::Result<()> {
    use tar::EntryType;
    match entry {
        Entry::Dir { path, mode } => {
            builder.append_data(&mut base_header(EntryType::Directory, *mode, 0), path, std::io::empty())
        }
        Entry::File { path, mode, content } => builder.append_data(
            &mut base_header(EntryType::Regular, *mode, content.len() as u64),
            path,
            content.as_slice(),
        ),
        Entry::Symlink { path, target } => {
            builder.append_link(&mut base_header(EntryType::Symlink, 0o777, 0), path, target)
        }
        Entry::Hardlink { path, target } => {
            builder.append_link(&mut base_header(EntryType::Link, 0o644, 0), path, target)
        }
        Entry::Whiteout { .. } | Entry::OpaqueDir { .. } => builder.append_data(
            &mut base_header(EntryType::Regular, 0o644, 0),
            entry.archive_name(),
            std::io::empty(),
        ),
        Entry::Raw { header_name, kind, link, content } => {
            append_raw(builder, header_name, *kind, link.as_deref(), content)
        }
    }
}

fn append_raw(
    builder: &mut tar::Builder<Vec<u8>>,
    name: &[u8],
    kind: tar::EntryType,
    link: Option<&[u8]>,
    content: &[u8],
) -> std::io::Result<()> {
    let mode = match kind {
        tar::EntryType::Directory => 0o755,
        tar::EntryType::Symlink => 0o777,
        _ => 0o644,
    };
    let mut header = base_header(kind, mode, content.len() as u64);
    if name.len() > TAR_NAME_FIELD_LEN {
        append_gnu_long_record(builder, tar::EntryType::GNULongName, name)?;
    }
    copy_truncated(&mut header.as_old_mut().name, name);
    if let Some(link) = link {
        if link.len() > TAR_NAME_FIELD_LEN {
            append_gnu_long_record(builder, tar::EntryType::GNULongLink, link)?;
        }
        copy_truncated(&mut header.as_old_mut().linkname, link);
    }
    header.set_cksum();
    builder.append(&header, content)
}

/// The record GNU tar writes before a header whose name (`L`) or link (`K`)
/// does not fit: `././@LongLink`, its data the full name and a NUL.
fn append_gnu_long_record(
    builder: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    value: &[u8],
) -> std::io::Result<()> {
    let mut data = value.to_vec();
    data.push(0);
    let mut header = base_header(kind, 0o644, data.len() as u64);
    copy_truncated(&mut header.as_old_mut().name, b"././@LongLink");
    header.set_cksum();
    builder.append(&header, data.as_slice())
}

fn copy_truncated(field: &mut [u8], value: &[u8]) {
    let len = value.len().min(field.len());
    field[..len].copy_from_slice(&value[..len]);
}

/// Image config knobs (the OCI config's `config` object).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Env`: `KEY=VALUE` entries (omitted when empty).
    pub env: Vec<String>,
    /// `Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `WorkingDir`.
    pub working_dir: Option<String>,
    /// `User`: `user`, `uid`, `user:group` or `uid:gid`.
    pub user: Option<String>,
}

/// The platform an image config and an index entry describe.
#[derive(Clone, Copy)]
struct Platform {
    architecture: &'static str,
    variant: Option<&'static str>,
}

const LINUX_AMD64: Platform = Platform { architecture: "amd64", variant: None };
const LINUX_ARM64: Platform = Platform { architecture: "arm64", variant: Some("v8") };

impl Platform {
    fn to_json(self) -> Value {
        let mut platform = json!({ "architecture": self.architecture, "os": "linux" });
        if let Some(variant) = self.variant {
            platform["variant"] = json!(variant);
        }
        platform
    }
}

/// The OCI image config JSON (also what docker-archive's `<hex>.json` holds).
fn config_json(platform: Platform, diff_ids: &[String], config: &ImageConfig) -> Value {
    let mut run = serde_json::Map::new();
    if !config.env.is_empty() {
        run.insert("Env".into(), json!(config.env));
    }
    if let Some(entrypoint) = &config.entrypoint {
        run.insert("Entrypoint".into(), json!(entrypoint));
    }
    if let Some(cmd) = &config.cmd {
        run.insert("Cmd".into(), json!(cmd));
    }
    if let Some(working_dir) = &config.working_dir {
        run.insert("WorkingDir".into(), json!(working_dir));
    }
    if let Some(user) = &config.user {
        run.insert("User".into(), json!(user));
    }
    let history: Vec<Value> = (0..diff_ids.len())
        .map(|index| json!({ "created": EPOCH, "created_by": format!("quilt-tests fixture layer {index}") }))
        .collect();
    let mut image = platform.to_json();
    image["created"] = json!(EPOCH);
    image["config"] = Value::Object(run);
    image["rootfs"] = json!({ "type": "layers", "diff_ids": diff_ids });
    image["history"] = json!(history);
    image
}

/// A content descriptor: what a manifest or index says about a blob.
struct Descriptor {
    media_type: &'static str,
    digest: String,
    size: u64,
}

impl Descriptor {
    fn to_json(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

fn to_json_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("JSON values always serialise")
}

/// Write `bytes` as `blobs/sha256/<hex>` of the layout at `dir`.
fn write_blob(dir: &Path, media_type: &'static str, bytes: &[u8]) -> Descriptor {
    let digest = sha256_digest(bytes);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap_or_else(|error| panic!("create {}: {error}", blobs.display()));
    let path = blobs.join(digest.trim_start_matches("sha256:"));
    std::fs::write(&path, bytes).unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
    Descriptor { media_type, digest, size: bytes.len() as u64 }
}

/// Write one platform's layers, config and manifest as blobs; return the manifest's descriptor.
fn write_image_blobs(
    dir: &Path,
    platform: Platform,
    layers: &[(Vec<u8>, LayerCompression)],
    config: &ImageConfig,
) -> Descriptor {
    let diff_ids: Vec<String> = layers.iter().map(|(tar, _)| sha256_digest(tar)).collect();
    let layer_descriptors: Vec<Value> = layers
        .iter()
        .map(|(tar, compression)| {
            write_blob(dir, compression.media_type(), &compression.compress(tar)).to_json()
        })
        .collect();
    let config_bytes = to_json_bytes(&config_json(platform, &diff_ids, config));
    let config_descriptor = write_blob(dir, CONFIG_MEDIA_TYPE, &config_bytes);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config_descriptor.to_json(),
        "layers": layer_descriptors,
    });
    write_blob(dir, MANIFEST_MEDIA_TYPE, &to_json_bytes(&manifest))
}

/// Write `oci-layout` and an `index.json` naming `top` as `tag`.
fn write_layout_index(dir: &Path, tag: &str, top: &Descriptor) {
    let mut entry = top.to_json();
    entry["annotations"] = json!({ REF_NAME_ANNOTATION: tag });
    let index = json!({ "schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [entry] });
    let layout = json!({ "imageLayoutVersion": "1.0.0" });
    for (name, value) in [("oci-layout", layout), ("index.json", index)] {
        let path = dir.join(name);
        std::fs::write(&path, to_json_bytes(&value))
            .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
    }
}

/// Write an OCI image layout at `dir`: `oci-layout`, `index.json` naming the
/// image `tag` (`org.opencontainers.image.ref.name`), and `blobs/sha256/...`
/// with the given layers (bottom first, each compressed as given), a
/// linux/amd64 config whose `rootfs.diff_ids` are the sha256 of each
/// uncompressed tar, and the manifest. Returns the manifest digest.
pub fn write_oci_layout(
    dir: &Path,
    tag: &str,
    layers: &[(Vec<u8>, LayerCompression)],
    config: &ImageConfig,
) -> String {
    let manifest = write_image_blobs(dir, LINUX_AMD64, layers, config);
    write_layout_index(dir, tag, &manifest);
    manifest.digest
}

/// The same image as [`write_oci_layout`], but `index.json` points at an
/// image index (multi-platform) listing linux/arm64/v8 first (its own config
/// and a tiny layer holding only `etc/platform`) and then linux/amd64, so a
/// consumer has to pick the host's platform rather than the first entry.
/// Returns (index digest, amd64 manifest digest).
pub fn write_oci_layout_multiplatform(
    dir: &Path,
    tag: &str,
    layers: &[(Vec<u8>, LayerCompression)],
    config: &ImageConfig,
) -> (String, String) {
    let arm64_layer =
        layer_tar(&[Entry::dir("etc", 0o755), Entry::file("etc/platform", 0o644, "linux/arm64/v8\n")]);
    let arm64 = write_image_blobs(dir, LINUX_ARM64, &[(arm64_layer, LayerCompression::Gzip)], config);
    let amd64 = write_image_blobs(dir, LINUX_AMD64, layers, config);
    let entries: Vec<Value> = [(&arm64, LINUX_ARM64), (&amd64, LINUX_AMD64)]
        .into_iter()
        .map(|(manifest, platform)| {
            let mut entry = manifest.to_json();
            entry["platform"] = platform.to_json();
            entry
        })
        .collect();
    let index = json!({ "schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": entries });
    let index_descriptor = write_blob(dir, INDEX_MEDIA_TYPE, &to_json_bytes(&index));
    write_layout_index(dir, tag, &index_descriptor);
    (index_descriptor.digest, amd64.digest)
}

/// Write a docker-archive tarball at `path`, as classic `docker save` does:
/// `manifest.json` (`Config`, `RepoTags`, `Layers`), the linux/amd64 config
/// as `<hex>.json`, each layer uncompressed as `<hex>/layer.tar` (with the
/// legacy `VERSION` and `json` beside it) and `repositories`. A `repo_tag`
/// without a tag gets `:latest`, as docker writes it.
pub fn write_docker_archive(path: &Path, repo_tag: &str, layers: &[Vec<u8>], config: &ImageConfig) {
    let (repository, tag) = split_repo_tag(repo_tag);
    let diff_ids: Vec<String> = layers.iter().map(|tar| sha256_digest(tar)).collect();
    let config_bytes = to_json_bytes(&config_json(LINUX_AMD64, &diff_ids, config));
    let config_name = format!("{}.json", hex_of(&sha256_digest(&config_bytes)));

    let mut entries = vec![Entry::file(config_name.clone(), 0o644, config_bytes)];
    let mut layer_names = Vec::new();
    let mut parent: Option<String> = None;
    for (tar, diff_id) in layers.iter().zip(&diff_ids) {
        let id = hex_of(diff_id).to_owned();
        layer_names.push(format!("{id}/layer.tar"));
        // An equal layer further up reuses the directory already written.
        if !entries.iter().any(|entry| entry.archive_name() == id) {
            let mut legacy = json!({ "id": id, "created": EPOCH });
            if let Some(parent) = &parent {
                legacy["parent"] = json!(parent);
            }
            entries.push(Entry::dir(id.clone(), 0o755));
            entries.push(Entry::file(format!("{id}/VERSION"), 0o644, "1.0"));
            entries.push(Entry::file(format!("{id}/json"), 0o644, to_json_bytes(&legacy)));
            entries.push(Entry::file(format!("{id}/layer.tar"), 0o644, tar.clone()));
        }
        parent = Some(id);
    }
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": [format!("{repository}:{tag}")],
        "Layers": layer_names,
    }]);
    entries.push(Entry::file("manifest.json", 0o644, to_json_bytes(&manifest)));
    if let Some(top) = &parent {
        let repositories = json!({ repository: { tag: top } });
        entries.push(Entry::file("repositories", 0o644, to_json_bytes(&repositories)));
    }
    // docker save walks its staging directory, so the archive is in name order.
    entries.sort_by_key(Entry::archive_name);
    std::fs::write(path, layer_tar(&entries))
        .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
}

/// `registry:5000/name:tag` -> (`registry:5000/name`, `tag`); no tag -> `latest`.
fn split_repo_tag(repo_tag: &str) -> (&str, &str) {
    match repo_tag.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => (repository, tag),
        _ => (repo_tag, "latest"),
    }
}

fn hex_of(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

/// Write a rootfs tarball at `path` (one layer of `entries`, gzip when
/// `gzip`), as mmdebstrap writes.
pub fn write_rootfs_tarball(path: &Path, entries: &[Entry], gzip: bool) {
    let tar = layer_tar(entries);
    let bytes = if gzip { gzip_bytes(&tar) } else { tar };
    std::fs::write(path, bytes).unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
}

/// The busybox image used across tests, sorted by path: the host's
/// busybox-static at `bin/busybox`, a symlink per applet (`busybox --list`),
/// the dirs `proc dev sys tmp etc root`, `/etc/passwd` (root 0, nobody 65534,
/// app 1000) and `/etc/group`. Entries rather than a tar, so callers can
/// split them across layers.
pub fn busybox_entries() -> Vec<Entry> {
    let busybox = crate::which("busybox").expect("busybox not on PATH: apt-get install -y busybox-static");
    let binary =
        std::fs::read(&busybox).unwrap_or_else(|error| panic!("read {}: {error}", busybox.display()));
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .unwrap_or_else(|error| panic!("{} --list: {error}", busybox.display()));
    let mut entries = vec![
        Entry::dir("bin", 0o755),
        Entry::file("bin/busybox", 0o755, binary),
        Entry::dir("dev", 0o755),
        Entry::dir("etc", 0o755),
        Entry::file(
            "etc/passwd",
            0o644,
            "root:x:0:0:root:/root:/bin/sh\n\
             nobody:x:65534:65534:nobody:/:/bin/false\n\
             app:x:1000:1000:app:/tmp:/bin/sh\n",
        ),
        Entry::file("etc/group", 0o644, "root:x:0:\nnogroup:x:65534:\napp:x:1000:\n"),
        Entry::dir("proc", 0o555),
        Entry::dir("root", 0o700),
        Entry::dir("sys", 0o555),
        Entry::dir("tmp", 0o1777),
    ];
    let applets = String::from_utf8_lossy(&list.stdout).into_owned();
    let mut applets: Vec<&str> =
        applets.lines().map(str::trim).filter(|applet| !applet.is_empty() && *applet != "busybox").collect();
    applets.sort_unstable();
    applets.dedup();
    entries.extend(applets.into_iter().map(|applet| Entry::symlink(format!("bin/{applet}"), "busybox")));
    entries.sort_by_key(Entry::archive_name);
    entries
}

/// sha256 of `bytes` as `sha256:<hex>`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut digest = String::with_capacity(7 + 64);
    digest.push_str("sha256:");
    for byte in hash {
        digest.push_str(&format!("{byte:02x}"));
    }
    digest
}

/// The busybox image as one gzip layer.
pub fn busybox_layer() -> (Vec<u8>, LayerCompression) {
    (layer_tar(&busybox_entries()), LayerCompression::Gzip)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read;

    use super::*;

    fn small_layers() -> Vec<(Vec<u8>, LayerCompression)> {
        let base = layer_tar(&[
            Entry::dir("etc", 0o755),
            Entry::file("etc/hostname", 0o644, "fixture\n"),
            Entry::dir("opt", 0o755),
            Entry::file("opt/old", 0o600, "to be whited out"),
            Entry::dir("var", 0o755),
            Entry::file("var/cache", 0o644, "hidden by the opaque dir"),
        ]);
        let middle = layer_tar(&[
            Entry::Whiteout { path: "opt/old".into() },
            Entry::OpaqueDir { path: "var".into() },
            Entry::symlink("etc/link", "/etc/hostname"),
            Entry::Hardlink { path: "etc/hard".into(), target: "etc/hostname".into() },
        ]);
        let top = layer_tar(&[Entry::file(format!("deep/{}", "n".repeat(150)), 0o755, "long name")]);
        vec![(base, LayerCompression::None), (middle, LayerCompression::Gzip), (top, LayerCompression::Zstd)]
    }

    fn knobs() -> ImageConfig {
        ImageConfig {
            env: vec!["PATH=/bin".into(), "GREETING=hi".into()],
            entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
            cmd: Some(vec!["echo $GREETING".into()]),
            working_dir: Some("/tmp".into()),
            user: Some("1000:1000".into()),
        }
    }

    fn decompress(media_type: &str, blob: &[u8]) -> Vec<u8> {
        match media_type {
            LAYER_TAR_MEDIA_TYPE => blob.to_vec(),
            LAYER_GZIP_MEDIA_TYPE => {
                let mut tar = Vec::new();
                flate2::read::GzDecoder::new(blob).read_to_end(&mut tar).unwrap();
                tar
            }
            LAYER_ZSTD_MEDIA_TYPE => zstd::decode_all(blob).unwrap(),
            other => panic!("unexpected layer media type {other}"),
        }
    }

    /// Read the blob a descriptor names, checking its digest and size.
    fn read_blob(dir: &Path, descriptor: &Value) -> Vec<u8> {
        let digest = descriptor["digest"].as_str().unwrap();
        let hex = digest.strip_prefix("sha256:").unwrap();
        let bytes = std::fs::read(dir.join("blobs/sha256").join(hex))
            .unwrap_or_else(|error| panic!("blob {digest} missing: {error}"));
        assert_eq!(sha256_digest(&bytes), digest, "blob content does not match its name");
        assert_eq!(descriptor["size"].as_u64().unwrap(), bytes.len() as u64, "size of {digest}");
        bytes
    }

    /// An image reached from a layout: its manifest digest, config and uncompressed layers.
    struct VerifiedImage {
        manifest_digest: String,
        config: Value,
        layer_media_types: Vec<String>,
        layers: Vec<Vec<u8>>,
    }

    /// Follow every descriptor from `index.json` down, checking each blob
    /// and each diff_id; return the images found.
    fn verify_layout(dir: &Path) -> Vec<VerifiedImage> {
        let layout: Value = serde_json::from_slice(&std::fs::read(dir.join("oci-layout")).unwrap()).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["mediaType"], INDEX_MEDIA_TYPE);
        let mut images = Vec::new();
        for descriptor in index["manifests"].as_array().unwrap() {
            verify_descriptor(dir, descriptor, &mut images);
        }
        images
    }

    fn verify_descriptor(dir: &Path, descriptor: &Value, images: &mut Vec<VerifiedImage>) {
        let bytes = read_blob(dir, descriptor);
        let document: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(document["schemaVersion"], 2);
        assert_eq!(document["mediaType"], descriptor["mediaType"]);
        match descriptor["mediaType"].as_str().unwrap() {
            INDEX_MEDIA_TYPE => {
                for nested in document["manifests"].as_array().unwrap() {
                    verify_descriptor(dir, nested, images);
                }
            }
            MANIFEST_MEDIA_TYPE => {
                assert_eq!(document["config"]["mediaType"], CONFIG_MEDIA_TYPE);
                let config: Value = serde_json::from_slice(&read_blob(dir, &document["config"])).unwrap();
                let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
                let layer_descriptors = document["layers"].as_array().unwrap();
                assert_eq!(diff_ids.len(), layer_descriptors.len());
                assert_eq!(config["history"].as_array().unwrap().len(), diff_ids.len());
                let mut layers = Vec::new();
                let mut layer_media_types = Vec::new();
                for (layer, diff_id) in layer_descriptors.iter().zip(diff_ids) {
                    let media_type = layer["mediaType"].as_str().unwrap();
                    let tar = decompress(media_type, &read_blob(dir, layer));
                    assert_eq!(sha256_digest(&tar), diff_id.as_str().unwrap(), "diff_id");
                    layer_media_types.push(media_type.to_owned());
                    layers.push(tar);
                }
                images.push(VerifiedImage {
                    manifest_digest: descriptor["digest"].as_str().unwrap().to_owned(),
                    config,
                    layer_media_types,
                    layers,
                });
            }
            other => panic!("index or manifest expected, found {other}"),
        }
    }

    fn tar_names(tar: &[u8]) -> Vec<String> {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .unwrap()
            .map(|entry| String::from_utf8_lossy(&entry.unwrap().path_bytes()).into_owned())
            .collect()
    }

    #[test]
    fn oci_layout_blobs_match_their_names_and_diff_ids() {
        let dir = tempfile::tempdir().unwrap();
        let layers = small_layers();
        let manifest_digest = write_oci_layout(dir.path(), "v1", &layers, &knobs());

        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], manifest_digest.as_str());
        assert_eq!(index["manifests"][0]["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(index["manifests"][0]["annotations"][REF_NAME_ANNOTATION], "v1");

        let images = verify_layout(dir.path());
        assert_eq!(images.len(), 1);
        let image = &images[0];
        assert_eq!(image.manifest_digest, manifest_digest);
        assert_eq!(
            image.layer_media_types,
            [LAYER_TAR_MEDIA_TYPE, LAYER_GZIP_MEDIA_TYPE, LAYER_ZSTD_MEDIA_TYPE]
        );
        for ((tar, _), read_back) in layers.iter().zip(&image.layers) {
            assert_eq!(tar, read_back, "a layer changed on its way through compression");
        }
        let config = &image.config;
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(config["config"]["Env"], json!(["PATH=/bin", "GREETING=hi"]));
        assert_eq!(config["config"]["Entrypoint"], json!(["/bin/sh", "-c"]));
        assert_eq!(config["config"]["Cmd"], json!(["echo $GREETING"]));
        assert_eq!(config["config"]["WorkingDir"], "/tmp");
        assert_eq!(config["config"]["User"], "1000:1000");
    }

    #[test]
    fn empty_config_knobs_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        write_oci_layout(dir.path(), "bare", &small_layers(), &ImageConfig::default());
        let images = verify_layout(dir.path());
        assert_eq!(images[0].config["config"], json!({}));
    }

    #[test]
    fn multiplatform_index_lists_arm64_first_and_amd64() {
        let dir = tempfile::tempdir().unwrap();
        let layers = small_layers();
        let (index_digest, amd64_digest) =
            write_oci_layout_multiplatform(dir.path(), "multi", &layers, &knobs());

        let top: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(top["manifests"][0]["digest"], index_digest.as_str());
        assert_eq!(top["manifests"][0]["mediaType"], INDEX_MEDIA_TYPE);
        assert_eq!(top["manifests"][0]["annotations"][REF_NAME_ANNOTATION], "multi");

        let nested: Value = serde_json::from_slice(&read_blob(dir.path(), &top["manifests"][0])).unwrap();
        let platforms: Vec<&Value> =
            nested["manifests"].as_array().unwrap().iter().map(|entry| &entry["platform"]).collect();
        assert_eq!(platforms[0], &json!({ "architecture": "arm64", "os": "linux", "variant": "v8" }));
        assert_eq!(platforms[1], &json!({ "architecture": "amd64", "os": "linux" }));
        assert_eq!(nested["manifests"][1]["digest"], amd64_digest.as_str());

        let images = verify_layout(dir.path());
        assert_eq!(images.len(), 2);
        assert_eq!(images[0].config["architecture"], "arm64");
        assert_eq!(images[0].config["variant"], "v8");
        assert_eq!(tar_names(&images[0].layers[0]), ["etc", "etc/platform"]);
        assert_eq!(images[1].manifest_digest, amd64_digest);
        assert_eq!(images[1].config["architecture"], "amd64");
        assert_eq!(images[1].layers, layers.into_iter().map(|(tar, _)| tar).collect::<Vec<_>>());
    }

    /// `skopeo inspect` (containers/image, the reader most tools share), when installed.
    fn skopeo_inspect(skopeo: &Path, reference: &str) -> Value {
        // The platform overrides are global options, so they go before `inspect`.
        let output = Command::new(skopeo)
            .args(["--override-os", "linux", "--override-arch", "amd64", "inspect", reference])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "skopeo inspect {reference}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Other implementations read the fixtures: skopeo and umoci, when the
    /// host has them (the tests do not install them).
    #[test]
    fn fixtures_round_trip_through_skopeo_and_umoci() {
        let dir = tempfile::tempdir().unwrap();
        let single = dir.path().join("single");
        let multi = dir.path().join("multi");
        let archive = dir.path().join("docker.tar");
        let layers = small_layers();
        let manifest_digest = write_oci_layout(&single, "v1", &layers, &knobs());
        let (index_digest, _) = write_oci_layout_multiplatform(&multi, "v1", &layers, &knobs());
        let plain: Vec<Vec<u8>> = layers.into_iter().map(|(tar, _)| tar).collect();
        write_docker_archive(&archive, "fixture:v1", &plain, &knobs());

        match crate::which("skopeo") {
            None => eprintln!("skipping the skopeo round trip: skopeo is not installed"),
            Some(skopeo) => {
                // skopeo reports the digest of the top manifest: the index for the multi-platform layout.
                for (layout, digest) in [(&single, &manifest_digest), (&multi, &index_digest)] {
                    let inspected = skopeo_inspect(&skopeo, &format!("oci:{}:v1", layout.display()));
                    assert_eq!(inspected["Digest"], digest.as_str());
                    assert_eq!(inspected["Architecture"], "amd64");
                    assert_eq!(inspected["Layers"].as_array().unwrap().len(), 3);
                }
                let inspected = skopeo_inspect(&skopeo, &format!("docker-archive:{}", archive.display()));
                assert_eq!(inspected["Layers"].as_array().unwrap().len(), 3);
            }
        }
        match crate::which("umoci") {
            None => eprintln!("skipping the umoci round trip: umoci is not installed"),
            Some(umoci) => {
                let output = Command::new(umoci)
                    .arg("stat")
                    .arg("--image")
                    .arg(format!("{}:v1", single.display()))
                    .output()
                    .unwrap();
                assert!(output.status.success(), "umoci stat: {}", String::from_utf8_lossy(&output.stderr));
            }
        }
    }

    #[test]
    fn docker_archive_lists_manifest_config_and_layers() {
        let dir = tempfile::tempdir().unwrap();
        let archive_path = dir.path().join("image.tar");
        let (base, _) = small_layers().remove(0);
        let top = layer_tar(&[Entry::file("hello", 0o644, "world")]);
        // The base layer twice: docker shares one directory for equal layers.
        let layers = vec![base.clone(), top.clone(), base.clone()];
        write_docker_archive(&archive_path, "registry.local:5000/fixture/busybox", &layers, &knobs());

        let bytes = std::fs::read(&archive_path).unwrap();
        let mut files = BTreeMap::new();
        let mut names = Vec::new();
        for entry in tar::Archive::new(bytes.as_slice()).entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            names.push(name.clone());
            files.insert(name, content);
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "docker save writes entries in name order");

        let manifest: Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        let manifest = &manifest[0];
        assert_eq!(manifest["RepoTags"], json!(["registry.local:5000/fixture/busybox:latest"]));
        let config_name = manifest["Config"].as_str().unwrap();
        let config_bytes = &files[config_name];
        assert_eq!(format!("{}.json", hex_of(&sha256_digest(config_bytes))), config_name);
        let config: Value = serde_json::from_slice(config_bytes).unwrap();
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["config"]["User"], "1000:1000");

        let layer_names: Vec<&str> =
            manifest["Layers"].as_array().unwrap().iter().map(|name| name.as_str().unwrap()).collect();
        assert_eq!(layer_names.len(), 3);
        assert_eq!(layer_names[0], layer_names[2]);
        let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
        for ((name, diff_id), original) in layer_names.iter().zip(diff_ids).zip(&layers) {
            let layer = &files[*name];
            assert_eq!(layer, original);
            assert_eq!(sha256_digest(layer), diff_id.as_str().unwrap());
            let id = name.strip_suffix("/layer.tar").unwrap();
            assert_eq!(files[&format!("{id}/VERSION")], b"1.0");
        }
        assert_eq!(names.iter().filter(|name| name.ends_with("/layer.tar")).count(), 2);

        let repositories: Value = serde_json::from_slice(&files["repositories"]).unwrap();
        let top_id = layer_names[2].strip_suffix("/layer.tar").unwrap();
        assert_eq!(repositories, json!({ "registry.local:5000/fixture/busybox": { "latest": top_id } }));
    }

    #[test]
    fn repo_tags_split_at_the_tag_not_the_port() {
        assert_eq!(split_repo_tag("busybox:1.36"), ("busybox", "1.36"));
        assert_eq!(split_repo_tag("busybox"), ("busybox", "latest"));
        assert_eq!(split_repo_tag("host:5000/busybox"), ("host:5000/busybox", "latest"));
        assert_eq!(split_repo_tag("host:5000/busybox:edge"), ("host:5000/busybox", "edge"));
    }

    #[test]
    fn same_image_twice_gives_the_same_digests_and_bytes() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        let build = |dir: &Path| {
            let entries = busybox_entries();
            let (lower, upper) = entries.split_at(entries.len() / 2);
            let layers =
                vec![(layer_tar(lower), LayerCompression::Gzip), (layer_tar(upper), LayerCompression::Zstd)];
            let single = write_oci_layout(&dir.join("oci"), "busybox", &layers, &knobs());
            let multi = write_oci_layout_multiplatform(&dir.join("multi"), "busybox", &layers, &knobs());
            let plain: Vec<Vec<u8>> = layers.into_iter().map(|(tar, _)| tar).collect();
            write_docker_archive(&dir.join("docker.tar"), "busybox:test", &plain, &knobs());
            write_rootfs_tarball(&dir.join("rootfs.tar.gz"), &entries, true);
            (single, multi)
        };
        assert_eq!(build(first.path()), build(second.path()));
        for file in ["docker.tar", "rootfs.tar.gz", "oci/index.json", "multi/index.json"] {
            assert_eq!(
                std::fs::read(first.path().join(file)).unwrap(),
                std::fs::read(second.path().join(file)).unwrap(),
                "{file} differs between two builds"
            );
        }
    }

    #[test]
    fn raw_entries_put_hostile_bytes_in_the_header() {
        let long_escape = format!("../{}", "x/".repeat(70));
        let tar = layer_tar(&[
            Entry::Raw {
                header_name: b"../escape".to_vec(),
                kind: tar::EntryType::Regular,
                link: None,
                content: b"out".to_vec(),
            },
            Entry::Raw {
                header_name: b"/abs".to_vec(),
                kind: tar::EntryType::Directory,
                link: None,
                content: vec![],
            },
            Entry::Raw {
                header_name: b"bin/evil".to_vec(),
                kind: tar::EntryType::Link,
                link: Some(b"/etc/shadow".to_vec()),
                content: vec![],
            },
            Entry::Raw {
                header_name: long_escape.clone().into_bytes(),
                kind: tar::EntryType::Symlink,
                link: Some(format!("/{}", "../".repeat(50)).into_bytes()),
                content: vec![],
            },
        ]);

        let mut archive = tar::Archive::new(tar.as_slice());
        let mut entries = archive.entries().unwrap().map(Result::unwrap);

        let mut escape = entries.next().unwrap();
        assert_eq!(&escape.header().as_old().name[..10], b"../escape\0");
        assert_eq!(escape.header().entry_type(), tar::EntryType::Regular);
        assert_eq!(escape.header().mtime().unwrap(), 0);
        assert_eq!(escape.header().uid().unwrap(), 0);
        let mut content = Vec::new();
        escape.read_to_end(&mut content).unwrap();
        assert_eq!(content, b"out");

        let absolute = entries.next().unwrap();
        assert_eq!(&absolute.header().as_old().name[..5], b"/abs\0");
        assert_eq!(absolute.header().entry_type(), tar::EntryType::Directory);

        let hardlink = entries.next().unwrap();
        assert_eq!(&hardlink.header().as_old().linkname[..12], b"/etc/shadow\0");
        assert_eq!(hardlink.header().entry_type(), tar::EntryType::Link);

        let long = entries.next().unwrap();
        assert_eq!(&*long.path_bytes(), long_escape.as_bytes());
        assert_eq!(&long.header().as_old().name[..], &long_escape.as_bytes()[..TAR_NAME_FIELD_LEN]);
        assert_eq!(long.link_name_bytes().unwrap().as_ref(), format!("/{}", "../".repeat(50)).as_bytes());
        assert!(entries.next().is_none());
    }

    #[test]
    #[should_panic(expected = "Entry::Raw")]
    fn plain_entries_refuse_hostile_names() {
        layer_tar(&[Entry::file("../escape", 0o644, "x")]);
    }

    #[test]
    fn whiteouts_opaque_dirs_and_links_use_the_oci_names() {
        let (middle, _) = small_layers().remove(1);
        assert_eq!(tar_names(&middle), ["opt/.wh.old", "var/.wh..wh..opq", "etc/link", "etc/hard"]);
        assert_eq!(whiteout_name("gone"), ".wh.gone");
        assert_eq!(whiteout_name("a/b/gone/"), "a/b/.wh.gone");
        assert_eq!(opaque_name("."), ".wh..wh..opq");

        let mut archive = tar::Archive::new(middle.as_slice());
        let kinds: Vec<(tar::EntryType, Option<String>)> = archive
            .entries()
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                let link = entry.link_name().unwrap().map(|link| link.display().to_string());
                (entry.header().entry_type(), link)
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (tar::EntryType::Regular, None),
                (tar::EntryType::Regular, None),
                (tar::EntryType::Symlink, Some("/etc/hostname".into())),
                (tar::EntryType::Link, Some("etc/hostname".into())),
            ]
        );
    }

    #[test]
    fn busybox_entries_hold_the_binary_applets_and_users() {
        let entries = busybox_entries();
        let names: Vec<String> = entries.iter().map(Entry::archive_name).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        for dir in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
            assert!(
                entries.iter().any(|entry| matches!(entry, Entry::Dir { path, .. } if path == dir)),
                "{dir}"
            );
        }
        assert!(entries.contains(&Entry::symlink("bin/sh", "busybox")));
        let Some(Entry::File { mode, content, .. }) =
            entries.iter().find(|entry| entry.archive_name() == "bin/busybox")
        else {
            panic!("no bin/busybox file");
        };
        assert_eq!(*mode, 0o755);
        assert_eq!(&content[..4], b"\x7fELF");
        let passwd = entries.iter().find(|entry| entry.archive_name() == "etc/passwd").unwrap();
        let Entry::File { content, .. } = passwd else { panic!("etc/passwd is not a file") };
        let passwd = String::from_utf8_lossy(content);
        for user in ["root:x:0:0:", "nobody:x:65534:65534:", "app:x:1000:1000:"] {
            assert!(passwd.lines().any(|line| line.starts_with(user)), "{user} missing from {passwd}");
        }
    }

    #[test]
    fn rootfs_tarball_is_one_layer_plain_or_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let entries = [Entry::dir("etc", 0o755), Entry::file("etc/os-release", 0o644, "ID=fixture\n")];
        write_rootfs_tarball(&dir.path().join("rootfs.tar"), &entries, false);
        write_rootfs_tarball(&dir.path().join("rootfs.tar.gz"), &entries, true);
        assert_eq!(std::fs::read(dir.path().join("rootfs.tar")).unwrap(), layer_tar(&entries));
        let gzipped = std::fs::read(dir.path().join("rootfs.tar.gz")).unwrap();
        assert_eq!(decompress(LAYER_GZIP_MEDIA_TYPE, &gzipped), layer_tar(&entries));
    }

    #[test]
    fn digests_are_sha256_hex() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
