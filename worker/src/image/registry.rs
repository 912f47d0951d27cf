//! Pulling images from registries: resolve a reference to a manifest for
//! this machine, download its config and layers into the store (verified,
//! resumable, a few at a time), then hand them to [`super::import::commit`]
//! to unpack and record, as an import does.
//!
//! The distribution protocol and its authentication flows (anonymous,
//! Docker Hub's bearer tokens, basic credentials) are `oci-client`'s. This
//! module owns what it does not do: which hosts may be reached over plain
//! HTTP, where credentials come from, retries and deadlines, resuming a
//! download that was cut off, and checking every byte against its digest
//! before the store sees it. It never writes outside the store and knows
//! nothing of containers.
//!
//! A layer download goes to `tmp/partial-sha256-<hex>` in the store, held
//! with an exclusive `flock` while it is written. When the process is
//! killed, the next pull re-hashes what is there and asks for the rest with
//! an HTTP `Range` request; a registry that answers with the whole blob
//! instead makes it start over. The blob enters `blobs/` only when the whole
//! of it hashes to its digest; a mismatch deletes the partial file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt as _;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use sha2::{Digest as _, Sha256};

use super::import::{commit, pick_platform};
use super::store::{sha256_of, ImageRecord, ImageStore};
use super::unpack::UnpackLimits;
use super::{host_architecture, ImageError, Reference};

/// Manifest media types asked for, OCI and Docker v2 schema 2.
const MANIFEST_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Largest image config accepted; real ones are a few KiB.
const MAX_CONFIG_BYTES: i64 = 16 * 1024 * 1024;
/// Nested indexes followed before giving up.
const MAX_INDEX_DEPTH: usize = 4;
/// Attempts of one network step on a transient failure (connect, 5xx, a cut stream).
const ATTEMPTS: u32 = 4;
/// Wait before the second attempt; doubled each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// A read that stalls this long fails the attempt (and is retried).
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a pull waiting for another process's download of the same blob looks again.
const LOCK_POLL: Duration = Duration::from_millis(200);

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries (`host` or `host:port`) reached over plain HTTP although
    /// not loopback. Loopback registries always are.
    pub insecure_registries: Vec<String>,
    /// A Docker `config.json` to take credentials from; `None` means
    /// `$HOME/.docker/config.json` when it exists, else anonymous.
    pub credentials: Option<PathBuf>,
    /// The whole pull, unpacking excluded, must finish within this.
    pub timeout: Duration,
    /// Connecting to the registry must succeed within this.
    pub connect_timeout: Duration,
    /// Layers downloaded at once.
    pub parallel_downloads: usize,
    /// Draw one progress line per layer on stderr.
    pub progress: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure_registries: Vec::new(),
            credentials: None,
            timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
            parallel_downloads: 3,
            progress: false,
        }
    }
}

impl ImageStore {
    /// Pull `name` from its registry into the store, under its normalised
    /// name, and unpack its layers. Blobs already in the store are not
    /// downloaded again.
    ///
    /// Blocking: it runs its own small tokio runtime for the downloads, so an
    /// async caller must call it from `spawn_blocking`, not from a task.
    pub fn pull(&self, name: &str, options: &PullOptions) -> Result<ImageRecord, ImageError> {
        crate::install_crypto_provider();
        let reference = Reference::parse(name)?;
        let auth = credentials_for(&reference, options.credentials.as_deref())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|source| ImageError::Io { path: self.root().to_owned(), source })?;
        let fetched = runtime.block_on(async {
            tokio::time::timeout(options.timeout, fetch(self, &reference, auth, options)).await.map_err(
                |_| ImageError::PullTimeout { reference: reference.to_string(), after: options.timeout },
            )?
        })?;
        drop(runtime);
        commit(self, &reference.to_string(), fetched.manifest_digest, &fetched.config, fetched.layers)
    }
}

/// What a pull downloaded: enough for [`commit`].
struct Fetched {
    manifest_digest: String,
    config: Vec<u8>,
    layers: Vec<(String, String, u64)>,
}

/// One registry, one repository, one authenticated client.
struct Session {
    client: Client,
    auth: RegistryAuth,
    image: oci_client::Reference,
    registry: String,
}

impl Session {
    fn at_digest(&self, digest: &str) -> oci_client::Reference {
        self.image.clone_with_digest(digest.to_owned())
    }
}

async fn fetch(
    store: &ImageStore,
    reference: &Reference,
    auth: RegistryAuth,
    options: &PullOptions,
) -> Result<Fetched, ImageError> {
    let registry = reference.registry_endpoint().to_owned();
    let plain_http = reference.is_loopback_registry() || is_listed(&registry, &options.insecure_registries);
    let config = ClientConfig {
        protocol: if plain_http {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(options.connect_timeout),
        read_timeout: Some(READ_TIMEOUT),
        platform_resolver: None,
        ..ClientConfig::default()
    };
    let client = Client::try_from(config)
        .map_err(|source| ImageError::RegistryConnect { registry: registry.clone(), source })?;
    let image = match (reference.tag(), reference.digest()) {
        (_, Some(digest)) => oci_client::Reference::with_digest(
            registry.clone(),
            reference.repository().to_owned(),
            digest.to_owned(),
        ),
        (tag, None) => oci_client::Reference::with_tag(
            registry.clone(),
            reference.repository().to_owned(),
            tag.unwrap_or("latest").to_owned(),
        ),
    };
    let session = Session { client, auth, image, registry };
    authenticate(&session).await?;

    let (manifest_digest, manifest) = resolve_manifest(store, &session, reference).await?;

    let config_descriptor = manifest.config();
    if config_descriptor.size() > MAX_CONFIG_BYTES as u64 {
        return Err(ImageError::NoManifest(format!(
            "{reference}: image config of {} bytes is over the {MAX_CONFIG_BYTES} bytes accepted",
            config_descriptor.size()
        )));
    }
    let config_digest = config_descriptor.digest().to_string();
    refuse_oversized_layers(&manifest)?;
    download_blob(store, &session, config_descriptor, None).await?;
    let config = store.read_blob(&config_digest)?;

    let progress = Progress::new(options.progress);
    let mut unique: Vec<&Descriptor> = Vec::new();
    for layer in manifest.layers() {
        if !unique.iter().any(|seen| seen.digest() == layer.digest()) {
            unique.push(layer);
        }
    }
    let results: Vec<Result<(), ImageError>> = futures_util::stream::iter(unique)
        .map(|layer| {
            let bar = progress.bar(layer);
            let session = &session;
            async move { download_blob(store, session, layer, Some(&bar)).await }
        })
        .buffer_unordered(options.parallel_downloads.max(1))
        .collect()
        .await;
    progress.finish();
    results.into_iter().collect::<Result<Vec<()>, ImageError>>()?;

    let layers = manifest
        .layers()
        .iter()
        .map(|layer| (layer.digest().to_string(), layer.media_type().to_string(), layer.size()))
        .collect();
    Ok(Fetched { manifest_digest, config, layers })
}

/// Refuse, before downloading anything, a manifest announcing a layer larger
/// than unpacking would accept: a hostile registry must not fill the disk first.
fn refuse_oversized_layers(manifest: &ImageManifest) -> Result<(), ImageError> {
    let limit = UnpackLimits::default().max_total_bytes;
    match manifest.layers().iter().find(|layer| layer.size() > limit) {
        Some(layer) => {
            Err(ImageError::LayerTooLarge { digest: layer.digest().to_string(), size: layer.size(), limit })
        }
        None => Ok(()),
    }
}

/// Whether `registry` (`host:port`) is in the list, by `host:port` or by host alone.
fn is_listed(registry: &str, list: &[String]) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(host, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            host
        } else {
            registry
        }
    });
    list.iter().any(|entry| entry == registry || entry == host)
}

/// Reach the registry and get a token when it asks for one (the
/// `WWW-Authenticate` challenge of `/v2/`). A wrong password fails here,
/// with the token service's answer.
async fn authenticate(session: &Session) -> Result<(), ImageError> {
    with_retries(|| async {
        session.client.auth(&session.image, &session.auth, RegistryOperation::Pull).await.map(|_| ())
    })
    .await
    .map_err(|source| match source {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::RegistryTokenDecodeError(_) => {
            ImageError::RegistryAuth { registry: session.registry.clone(), source }
        }
        source => ImageError::RegistryConnect { registry: session.registry.clone(), source },
    })
}

/// Fetch the manifest the reference names and, through indexes, the one for
/// linux/<this machine>. Stores every manifest and index fetched; returns the
/// image manifest's digest and the manifest.
async fn resolve_manifest(
    store: &ImageStore,
    session: &Session,
    reference: &Reference,
) -> Result<(String, ImageManifest), ImageError> {
    let mut target = session.image.clone();
    let mut expected = reference.digest().map(str::to_owned);
    for _ in 0..=MAX_INDEX_DEPTH {
        let (bytes, _) = with_retries(|| async {
            session.client.pull_manifest_raw(&target, &session.auth, MANIFEST_MEDIA_TYPES).await
        })
        .await
        .map_err(|source| manifest_error(session, reference, source))?;
        let digest = sha256_of(&bytes);
        if let Some(expected) = &expected {
            if *expected != digest {
                return Err(ImageError::DigestMismatch { expected: expected.clone(), actual: digest });
            }
        }
        let document: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|source| ImageError::ManifestParse { reference: reference.to_string(), source })?;
        if document.get("manifests").is_some() {
            let index: ImageIndex = serde_json::from_value(document)
                .map_err(|source| ImageError::ManifestParse { reference: reference.to_string(), source })?;
            store.write_blob_bytes(&bytes)?;
            let chosen = pick_platform(&index).ok_or_else(|| {
                ImageError::NoManifest(format!(
                    "{reference}: no linux/{} image in its index",
                    host_architecture()
                ))
            })?;
            let chosen = chosen.digest().to_string();
            target = session.at_digest(&chosen);
            expected = Some(chosen);
            continue;
        }
        let manifest: ImageManifest = serde_json::from_value(document)
            .map_err(|source| ImageError::ManifestParse { reference: reference.to_string(), source })?;
        store.write_blob_bytes(&bytes)?;
        return Ok((digest, manifest));
    }
    Err(ImageError::NoManifest(format!("{reference}: indexes nested more than {MAX_INDEX_DEPTH} deep")))
}

fn manifest_error(session: &Session, reference: &Reference, source: OciDistributionError) -> ImageError {
    let not_found = match &source {
        OciDistributionError::ServerError { code, .. } => *code == 404,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|error| {
            matches!(
                error.code,
                oci_client::errors::OciErrorCode::ManifestUnknown
                    | oci_client::errors::OciErrorCode::NameUnknown
                    | oci_client::errors::OciErrorCode::NotFound
            )
        }),
        _ => false,
    };
    match source {
        _ if not_found => ImageError::ManifestNotFound { reference: reference.to_string(), source },
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            ImageError::RegistryAuth { registry: session.registry.clone(), source }
        }
        source => ImageError::ManifestFetch { reference: reference.to_string(), source },
    }
}

/// Run a network step, again after a pause when it failed in a way that may pass.
async fn with_retries<T, F, Fut>(mut step: F) -> Result<T, OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match step().await {
            Err(error) if attempt < ATTEMPTS && is_transient(&error) => {
                tracing::debug!(%error, attempt, "registry request failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            result => return result,
        }
    }
}

fn is_transient(error: &OciDistributionError) -> bool {
    match error {
        OciDistributionError::RequestError(error) => {
            error.is_connect() || error.is_timeout() || error.is_body() || error.is_request()
        }
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

/// Why one attempt at a blob failed: worth another try, or final.
enum Attempt {
    Transient(OciDistributionError),
    /// The blob did not match its digest after continuing a partial file.
    ResumedMismatch(ImageError),
    Final(ImageError),
}

/// Download one blob into the store, resuming a partial download, unless it
/// is there already.
async fn download_blob(
    store: &ImageStore,
    session: &Session,
    descriptor: &Descriptor,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<(), ImageError> {
    let digest = descriptor.digest().to_string();
    let size = descriptor.size();
    if store.has_blob(&digest) {
        if let Some(bar) = bar {
            bar.set_position(size);
            bar.finish_with_message("already present");
        }
        return Ok(());
    }
    let partial_path = store.partial_path(&digest)?;
    let mut partial = lock_partial(store, &partial_path, &digest).await?;
    let Some(file) = partial.as_mut() else {
        // Another process completed it while this one waited.
        return Ok(());
    };
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match download_attempt(session, descriptor, file, &partial_path, bar).await {
            Ok(()) => break,
            Err(Attempt::Transient(error)) if attempt < ATTEMPTS => {
                tracing::debug!(%error, %digest, attempt, "blob download failed; resuming");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Err(Attempt::Transient(source)) => return Err(ImageError::BlobFetch { digest, source }),
            // The kept prefix may be what was wrong (a disk error, a writer
            // that lied): one more try from the first byte decides.
            Err(Attempt::ResumedMismatch(error)) if attempt < ATTEMPTS => {
                tracing::warn!(%error, %digest, "resumed download does not match its digest; starting over");
                file.set_len(0).map_err(|source| ImageError::Io { path: partial_path.clone(), source })?;
                attempt += 1;
            }
            Err(Attempt::ResumedMismatch(error)) | Err(Attempt::Final(error)) => {
                if matches!(error, ImageError::DigestMismatch { .. }) {
                    let _ = std::fs::remove_file(&partial_path);
                }
                return Err(error);
            }
        }
    }
    store.install_partial(&partial_path, &digest)?;
    if let Some(bar) = bar {
        bar.finish_with_message("done");
    }
    Ok(())
}

/// Open the partial file of `digest` and lock it, waiting while another
/// process downloads the same blob. `None` when that process completed it.
async fn lock_partial(
    store: &ImageStore,
    path: &Path,
    digest: &str,
) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, ImageError> {
    loop {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| ImageError::Io { path: path.to_owned(), source })?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                if store.has_blob(digest) {
                    let _ = std::fs::remove_file(path);
                    return Ok(None);
                }
                // The holder before us may have installed it and removed this name.
                if !path.exists() {
                    continue;
                }
                return Ok(Some(lock));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => tokio::time::sleep(LOCK_POLL).await,
            Err((_, errno)) => return Err(ImageError::Io { path: path.to_owned(), source: errno.into() }),
        }
    }
}

/// One try: hash what the partial file holds, ask for the rest (or all of
/// it), append, and check the whole against the digest.
async fn download_attempt(
    session: &Session,
    descriptor: &Descriptor,
    file: &mut std::fs::File,
    path: &Path,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<(), Attempt> {
    use std::io::{Seek, SeekFrom, Write};
    let io = |source| Attempt::Final(ImageError::Io { path: path.to_owned(), source });
    let digest = descriptor.digest().to_string();
    let size = descriptor.size();
    let mut have = file.metadata().map_err(io)?.len();
    if have > size {
        file.set_len(0).map_err(io)?;
        have = 0;
    }
    let mut hasher = hash_prefix(file, have).map_err(io)?;
    let mut resumed = have > 0;
    let wanted = OciDescriptor {
        media_type: descriptor.media_type().to_string(),
        digest: digest.clone(),
        size: size as i64,
        ..OciDescriptor::default()
    };
    let image = session.at_digest(&digest);
    let response = if have > 0 {
        session.client.pull_blob_stream_partial(&image, &wanted, have, None).await
    } else {
        session.client.pull_blob_stream(&image, &wanted).await.map(BlobResponse::Full)
    };
    let mut stream = match response {
        Ok(BlobResponse::Partial(stream)) => {
            tracing::debug!(%digest, offset = have, "resuming download");
            stream
        }
        Ok(BlobResponse::Full(stream)) => {
            if have > 0 {
                tracing::debug!(%digest, "registry refused the range; starting over");
                file.set_len(0).map_err(io)?;
                have = 0;
                hasher = Sha256::new();
                resumed = false;
            }
            stream
        }
        Err(error) if is_transient(&error) => return Err(Attempt::Transient(error)),
        Err(source) => return Err(Attempt::Final(ImageError::BlobFetch { digest, source })),
    };
    file.seek(SeekFrom::Start(have)).map_err(io)?;
    if let Some(bar) = bar {
        bar.set_position(have);
    }
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            // oci-client's own check of a whole blob; ours below reports it.
            Err(error)
                if error.get_ref().is_some_and(|inner| inner.is::<oci_client::errors::DigestError>()) =>
            {
                break;
            }
            Err(error) => return Err(Attempt::Transient(OciDistributionError::IoError(error))),
        };
        if have + chunk.len() as u64 > size {
            let _ = file.set_len(0);
            return Err(Attempt::Final(ImageError::BlobTooLarge { digest, size }));
        }
        file.write_all(&chunk).map_err(io)?;
        hasher.update(&chunk);
        have += chunk.len() as u64;
        if let Some(bar) = bar {
            bar.set_position(have);
        }
    }
    if have < size {
        return Err(Attempt::Transient(OciDistributionError::IoError(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("blob {digest} ended after {have} of {size} bytes"),
        ))));
    }
    let actual = format!("sha256:{}", hex(&hasher.finalize()));
    if actual != digest {
        let error = ImageError::DigestMismatch { expected: digest, actual };
        return Err(if resumed { Attempt::ResumedMismatch(error) } else { Attempt::Final(error) });
    }
    Ok(())
}

/// sha256 state after the first `length` bytes of `file`.
fn hash_prefix(file: &mut std::fs::File, length: u64) -> std::io::Result<Sha256> {
    use std::io::{Read, Seek, SeekFrom};
    let mut hasher = Sha256::new();
    file.seek(SeekFrom::Start(0))?;
    let mut limited = (&mut *file).take(length);
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = limited.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Credentials for the reference's registry from a Docker `config.json`
/// (`{"auths": {"host": {"auth": base64("user:pass")}}}`), or anonymous.
fn credentials_for(reference: &Reference, explicit: Option<&Path>) -> Result<RegistryAuth, ImageError> {
    let default = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"));
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => match default {
            Some(path) if path.is_file() => path,
            _ => return Ok(RegistryAuth::Anonymous),
        },
    };
    let bytes = std::fs::read(&path).map_err(|source| ImageError::Io { path: path.clone(), source })?;
    let bad = |problem: String| ImageError::Credentials { path: path.clone(), problem };
    let config: DockerConfig =
        serde_json::from_slice(&bytes).map_err(|error| bad(format!("not a Docker config.json: {error}")))?;
    let mut wanted = vec![reference.registry(), reference.registry_endpoint()];
    if reference.registry() == "docker.io" {
        wanted.extend(["index.docker.io", "https://index.docker.io/v1/"]);
    }
    let entry = config.auths.iter().find(|(key, _)| {
        let host = key.trim_start_matches("https://").trim_start_matches("http://");
        let host = host.split('/').next().unwrap_or(host);
        wanted.iter().any(|wanted| *key == wanted || host == *wanted)
    });
    let Some((key, entry)) = entry else { return Ok(RegistryAuth::Anonymous) };
    if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
    }
    let Some(encoded) = &entry.auth else { return Ok(RegistryAuth::Anonymous) };
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|error| bad(format!("auths.{key}.auth is not base64: {error}")))?;
    let text = String::from_utf8(decoded).map_err(|_| bad(format!("auths.{key}.auth is not UTF-8")))?;
    let (user, password) =
        text.split_once(':').ok_or_else(|| bad(format!("auths.{key}.auth is not user:password")))?;
    Ok(RegistryAuth::Basic(user.to_owned(), password.to_owned()))
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, DockerAuth>,
}

#[derive(serde::Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// One line per layer on stderr, updated in place; nothing when hidden.
struct Progress {
    bars: Option<indicatif::MultiProgress>,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        Progress {
            bars: enabled
                .then(|| indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr())),
        }
    }

    fn bar(&self, layer: &Descriptor) -> indicatif::ProgressBar {
        let Some(bars) = &self.bars else { return indicatif::ProgressBar::hidden() };
        let bar = bars.add(indicatif::ProgressBar::new(layer.size()));
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} {bytes:>10}/{total_bytes:<10} {wide_bar} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        let digest = layer.digest().to_string();
        bar.set_prefix(digest.chars().take(19).collect::<String>());
        bar
    }

    fn finish(&self) {
        if let Some(bars) = &self.bars {
            let _ = bars.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_registries_match_by_host_or_host_and_port() {
        let list = vec!["registry.lan".to_owned(), "other:5000".to_owned()];
        assert!(is_listed("registry.lan:5000", &list));
        assert!(is_listed("registry.lan", &list));
        assert!(is_listed("other:5000", &list));
        assert!(!is_listed("other:5001", &list));
        assert!(!is_listed("registry.lan.evil", &list));
    }

    #[test]
    fn layers_over_the_unpack_limit_are_refused_before_download() {
        let manifest = |size: u64| {
            let json = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": format!("sha256:{}", "a".repeat(64)), "size": 10},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": format!("sha256:{}", "b".repeat(64)), "size": size}],
            });
            serde_json::from_value::<ImageManifest>(json).unwrap()
        };
        assert!(refuse_oversized_layers(&manifest(1 << 30)).is_ok());
        assert!(matches!(
            refuse_oversized_layers(&manifest(1 << 40)),
            Err(ImageError::LayerTooLarge { size, .. }) if size == 1 << 40
        ));
    }

    #[test]
    fn credentials_come_from_docker_config() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:x");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{auth}"}}, "ghcr.io": {{}}}}}}"#
            ),
        )
        .unwrap();
        let hub = Reference::parse("busybox").unwrap();
        assert_eq!(
            credentials_for(&hub, Some(&path)).unwrap(),
            RegistryAuth::Basic("alice".into(), "s3cret:x".into())
        );
        let ghcr = Reference::parse("ghcr.io/org/x").unwrap();
        assert_eq!(credentials_for(&ghcr, Some(&path)).unwrap(), RegistryAuth::Anonymous);
        let other = Reference::parse("quay.io/org/x").unwrap();
        assert_eq!(credentials_for(&other, Some(&path)).unwrap(), RegistryAuth::Anonymous);
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(credentials_for(&hub, Some(&path)), Err(ImageError::Credentials { .. })));
    }
}
