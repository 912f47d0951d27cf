//! OCI images: the content store, import without a registry, layer
//! unpacking and the settings an image gives a container.
//!
//! It owns everything under `<data-dir>/images/`. It produces root
//! filesystem layers (snapshot directories, read-only) and run settings for
//! the engine, and knows nothing of namespaces or cgroups. Layers are hostile
//! input: they are unpacked by `unpack` under the rules of SECURITY.md
//! ("Images and files"), and every blob is verified against its digest.

mod import;
pub mod reference;
mod registry;
mod store;
mod unpack;

use std::path::{Path, PathBuf};

pub use reference::{Reference, ReferenceError};
pub use registry::PullOptions;
pub use store::{ImageRecord, ImageStore, LayerRecord, Lease, PruneReport, RunConfig};
pub use unpack::{Compression, UnpackError};
// Reachable for the fuzz target worker/fuzz (layer_unpack), which unpacks
// with small limits; not part of the supported API.
#[doc(hidden)]
pub use unpack::{unpack_layer, UnpackLimits, UnpackReport};

/// Failures of the image store, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file of the store or of an import.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An image reference that does not parse.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A malformed digest.
    #[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
    BadDigest(String),
    /// Content whose digest is not the one announced.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The announced digest.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// A layer whose uncompressed content does not match the config's diff_id.
    #[error("layer {layer}: uncompressed digest {actual} does not match the image config's {expected}")]
    DiffIdMismatch {
        /// The layer blob.
        layer: String,
        /// The config's diff_id.
        expected: String,
        /// What the layer hashes to.
        actual: String,
    },
    /// A layer that could not be unpacked safely.
    #[error("unpacking layer {layer}: {source}")]
    Unpack {
        /// The layer blob.
        layer: String,
        /// Why.
        #[source]
        source: unpack::UnpackError,
    },
    /// The config lists a different number of layers than the manifest.
    #[error("image has {layers} layers but its config lists {diff_ids} diff_ids")]
    LayerCount {
        /// Layers in the manifest.
        layers: usize,
        /// diff_ids in the config.
        diff_ids: usize,
    },
    /// A store record that cannot be read or written.
    #[error("image record: {0}")]
    Record(#[source] serde_json::Error),
    /// An OCI JSON document that does not parse.
    #[error("{path}: {source}")]
    Json {
        /// The document.
        path: PathBuf,
        /// oci-spec's error.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// docker save's manifest.json that does not parse.
    #[error("{path}: {source}")]
    DockerManifest {
        /// The document.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// An image archive that is not a readable tar.
    #[error("reading archive {path}: {source}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An image archive entry that is not a plain file or directory with a simple name.
    #[error(
        "archive {path}: refusing entry {entry:?} (only plain files and directories inside the archive)"
    )]
    ArchiveEntry {
        /// The archive.
        path: PathBuf,
        /// The entry.
        entry: String,
    },
    /// A path that is none of the formats Quilt imports.
    #[error("{0}: not an OCI image layout directory, OCI or docker archive, or rootfs tarball")]
    UnknownFormat(PathBuf),
    /// No manifest for this name or platform.
    #[error("{0}")]
    NoManifest(String),
    /// No such image in the store.
    #[error("no image {0:?} in the store (quilt image ls lists them; quilt image import or pull adds one)")]
    NotFound(String),
    /// The image's user cannot be resolved.
    #[error("{0}")]
    User(String),
    /// The registry could not be reached (unknown host, refused, TLS, 5xx after retries).
    #[error("cannot reach registry {registry}: {source}")]
    RegistryConnect {
        /// The registry host.
        registry: String,
        /// oci-client's error.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// The registry or its token service refused the credentials (or their absence).
    #[error("authentication to registry {registry} failed: {source}")]
    RegistryAuth {
        /// The registry host.
        registry: String,
        /// oci-client's error.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// The registry has no manifest for the reference.
    #[error("manifest not found: {source}")]
    ManifestNotFound {
        /// The reference pulled.
        reference: String,
        /// oci-client's error.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// Fetching a manifest or index failed.
    #[error("fetching the manifest: {source}")]
    ManifestFetch {
        /// The reference pulled.
        reference: String,
        /// oci-client's error.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// A manifest or index from a registry that does not parse.
    #[error("the manifest does not parse: {source}")]
    ManifestParse {
        /// The reference pulled.
        reference: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Downloading a blob failed.
    #[error("downloading blob {digest}: {source}")]
    BlobFetch {
        /// The blob.
        digest: String,
        /// oci-client's error.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// A manifest announcing a layer larger than unpacking accepts.
    #[error("layer {digest} is {size} bytes; layers over {limit} bytes are refused")]
    LayerTooLarge {
        /// The layer blob.
        digest: String,
        /// Its announced size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A registry sent more bytes than the manifest announced for a blob.
    #[error("blob {digest}: the registry sent more than the {size} bytes the manifest announced")]
    BlobTooLarge {
        /// The blob.
        digest: String,
        /// Its announced size.
        size: u64,
    },
    /// A credentials file that cannot be used.
    #[error("credentials {path}: {problem}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The pull did not finish in time.
    #[error("timed out after {after:?}")]
    PullTimeout {
        /// The reference pulled.
        reference: String,
        /// The limit.
        after: std::time::Duration,
    },
}

impl ImageError {
    /// A stable, machine-readable name of the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            ImageError::Reference(_) | ImageError::BadDigest(_) => "invalid_reference",
            ImageError::NotFound(_) | ImageError::NoManifest(_) | ImageError::ManifestNotFound { .. } => {
                "image_not_found"
            }
            ImageError::DigestMismatch { .. }
            | ImageError::DiffIdMismatch { .. }
            | ImageError::BlobTooLarge { .. } => "digest_mismatch",
            ImageError::RegistryConnect { .. }
            | ImageError::ManifestFetch { .. }
            | ImageError::ManifestParse { .. }
            | ImageError::BlobFetch { .. } => "registry",
            ImageError::RegistryAuth { .. } | ImageError::Credentials { .. } => "registry_auth",
            ImageError::PullTimeout { .. } => "timeout",
            ImageError::Unpack { .. }
            | ImageError::ArchiveEntry { .. }
            | ImageError::LayerTooLarge { .. } => "hostile_image",
            ImageError::User(_) => "invalid_user",
            _ => "image",
        }
    }
}

/// The OCI architecture name of this machine.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The canonical name of an image reference (`busybox` ->
/// `docker.io/library/busybox:latest`).
pub fn normalise_name(name: &str) -> Result<String, ImageError> {
    Ok(Reference::parse(name)?.to_string())
}

impl ImageStore {
    /// Import the image file or directory at `path` under `name`.
    pub fn import(&self, path: &Path, name: &str) -> Result<ImageRecord, ImageError> {
        let name = normalise_name(name)?;
        import::import(self, path, &name)
    }

    /// Look an image up by name (normalised) or by manifest digest.
    pub fn find(&self, name_or_digest: &str) -> Result<ImageRecord, ImageError> {
        if name_or_digest.starts_with("sha256:") {
            return self
                .list()?
                .into_iter()
                .find(|record| record.manifest_digest == name_or_digest)
                .ok_or_else(|| ImageError::NotFound(name_or_digest.to_owned()));
        }
        let name = normalise_name(name_or_digest)?;
        self.get(&name)?.ok_or(ImageError::NotFound(name))
    }
}

/// The command a container from this image runs: Docker's rule, entrypoint
/// followed by the given arguments, or by the image's `Cmd` when none are given.
pub fn container_command(config: &RunConfig, args: &[String]) -> Vec<String> {
    let mut command = config.entrypoint.clone().unwrap_or_default();
    if args.is_empty() {
        command.extend(config.cmd.clone().unwrap_or_default());
    } else {
        command.extend(args.iter().cloned());
    }
    command
}

/// Resolve an image's `User` (`uid`, `uid:gid`, `name`, `name:group`) to
/// numbers, reading `/etc/passwd` and `/etc/group` from the topmost layer
/// that has them. The files are opened inside the layer without following
/// symlinks, so a layer cannot make Quilt read a host file.
pub fn resolve_user(layers_topmost_first: &[PathBuf], user: &str) -> Result<(u32, u32), ImageError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let (uid, primary_gid) = match user_part.parse::<u32>() {
        Ok(uid) => {
            let gid = lookup(layers_topmost_first, "etc/passwd", |fields| {
                (fields.get(2)? == &user_part).then(|| fields.get(3)?.parse().ok())?
            })
            .unwrap_or(uid);
            (uid, gid)
        }
        Err(_) => lookup(layers_topmost_first, "etc/passwd", |fields| {
            (fields.first()? == &user_part)
                .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))?
        })
        .ok_or_else(|| ImageError::User(format!("user {user_part:?} is not in the image's /etc/passwd")))?,
    };
    let gid = match group_part {
        None => primary_gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup(layers_topmost_first, "etc/group", |fields| {
                (fields.first()? == &group).then(|| fields.get(2)?.parse().ok())?
            })
            .ok_or_else(|| ImageError::User(format!("group {group:?} is not in the image's /etc/group")))?,
        },
    };
    Ok((uid, gid))
}

/// Find the first line of a colon-separated file (from the topmost layer
/// holding it) for which `pick` returns a value.
fn lookup<T>(layers: &[PathBuf], file: &str, pick: impl Fn(&[&str]) -> Option<T>) -> Option<T> {
    use std::io::Read;
    for layer in layers {
        let Ok(dir) = std::fs::File::open(layer) else { continue };
        let how = nix::fcntl::OpenHow::new()
            .flags(nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NOFOLLOW)
            .resolve(nix::fcntl::ResolveFlag::RESOLVE_IN_ROOT | nix::fcntl::ResolveFlag::RESOLVE_NO_SYMLINKS);
        let Ok(fd) = nix::fcntl::openat2(&dir, file, how) else { continue };
        let mut text = String::new();
        let mut handle = std::fs::File::from(fd);
        if !handle.metadata().map(|m| m.is_file()).unwrap_or(false)
            || handle.read_to_string(&mut text).is_err()
        {
            // A whiteout (character device) or something odd: the file is gone.
            return None;
        }
        return text.lines().find_map(|line| pick(&line.split(':').collect::<Vec<_>>()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_follows_docker() {
        let config = RunConfig {
            entrypoint: Some(vec!["/entry".into()]),
            cmd: Some(vec!["default".into()]),
            ..RunConfig::default()
        };
        assert_eq!(container_command(&config, &[]), ["/entry", "default"]);
        assert_eq!(container_command(&config, &["x".into()]), ["/entry", "x"]);
        let plain = RunConfig { cmd: Some(vec!["/bin/sh".into()]), ..RunConfig::default() };
        assert_eq!(container_command(&plain, &[]), ["/bin/sh"]);
    }

    #[test]
    fn users_resolve_from_the_topmost_layer() {
        let lower = tempfile::tempdir().unwrap();
        let upper = tempfile::tempdir().unwrap();
        std::fs::create_dir(lower.path().join("etc")).unwrap();
        std::fs::write(lower.path().join("etc/passwd"), "app:x:1:1::/:/bin/sh\n").unwrap();
        std::fs::create_dir(upper.path().join("etc")).unwrap();
        std::fs::write(upper.path().join("etc/passwd"), "app:x:1000:1001::/:/bin/sh\n").unwrap();
        std::fs::write(upper.path().join("etc/group"), "staff:x:50:\n").unwrap();
        let layers = vec![upper.path().to_path_buf(), lower.path().to_path_buf()];
        assert_eq!(resolve_user(&layers, "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(&layers, "app:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(&layers, "1000").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(&layers, "42:7").unwrap(), (42, 7));
        assert!(matches!(resolve_user(&layers, "nobody"), Err(ImageError::User(_))));
    }

    #[test]
    fn passwd_symlink_to_the_host_is_not_followed() {
        let layer = tempfile::tempdir().unwrap();
        std::fs::create_dir(layer.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", layer.path().join("etc/passwd")).unwrap();
        assert!(matches!(resolve_user(&[layer.path().to_path_buf()], "root"), Err(ImageError::User(_))));
    }
}
