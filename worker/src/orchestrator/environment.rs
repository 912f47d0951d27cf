//! A task's language environment: found in the store or built once, then
//! stacked on its image.
//!
//! A build runs in a build container: the task's image, its writes on disk,
//! the host's network (package registries must be reachable; task
//! containers keep theirs), the host's `/etc/resolv.conf` and CA bundle put
//! in for the build (so pip, npm and apt trust what the host trusts, on
//! networks that re-sign TLS) and taken out of the layer after. The
//! container runs `sleep`; each step of [`crate::env::plan`] is exec'd into
//! it as an argument vector, its output appended to the build log. When
//! every step succeeded, the container's upper directory becomes the
//! environment's layer; when one fails, the task fails with kind
//! `environment` and the package manager's own message, the log is kept in
//! `environments/failed/`, and nothing is cached. Tasks wanting the same
//! environment while it builds wait for that build.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{ContainerSpec, NetworkMode, Scratch};
use crate::env::{self, EnvLease, EnvironmentMeta, PackageManager, BUILD_CA_BUNDLE};
use crate::image::ImageRecord;
use crate::protocol::{CacheOutcome, EnvironmentReport, ErrorInfo, Event, Task, TaskStatus};

use super::run::{final_failure, Failure};
use super::{note, record, Shared};

/// How environments are built and kept.
#[derive(Debug, Clone)]
pub struct EnvironmentConfig {
    /// The store is trimmed (least recently used first) to this many bytes.
    pub budget_bytes: u64,
    /// Longest a whole build may take.
    pub build_timeout: Duration,
    /// The host's CA bundle, put into build containers (None: not).
    pub ca_bundle: Option<PathBuf>,
    /// Environment variables passed to build steps (proxy settings).
    pub pass_env: Vec<(String, String)>,
    /// Environments built at start (each a task with `image` and
    /// `environment`), so the first task that needs one finds it built.
    pub prebuild: Vec<Task>,
}

impl Default for EnvironmentConfig {
    fn default() -> Self {
        let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
        EnvironmentConfig {
            budget_bytes: 10 << 30,
            build_timeout: Duration::from_secs(15 * 60),
            ca_bundle: bundle.is_file().then(|| bundle.to_path_buf()),
            pass_env: Vec::new(),
            prebuild: Vec::new(),
        }
    }
}

/// A task's environment, ready: its layer (leased), the variables the task
/// runs with, and how it was had.
pub(super) struct Prepared {
    pub(super) layer: PathBuf,
    pub(super) lease: EnvLease,
    pub(super) env: Vec<(String, String)>,
    pub(super) report: EnvironmentReport,
}

fn environment_failure(
    shared: &Shared,
    task_id: &str,
    attempt: u64,
    message: impl std::fmt::Display,
) -> Failure {
    final_failure(shared, task_id, attempt, TaskStatus::Error, "environment", message)
}

impl Prepared {
    /// Stacks the environment's layer on `spec`'s image and sets its
    /// variables, after the image's and before the task's own.
    pub(super) fn apply(&self, task: &Task, spec: &mut ContainerSpec) {
        spec.root.layers.insert(0, self.layer.clone());
        for (name, value) in &self.env {
            if !task.env.contains_key(name) {
                spec.env.retain(|(existing, _)| existing != name);
                spec.env.push((name.clone(), value.clone()));
            }
        }
    }
}

/// Tells whoever follows the task what its preparation is doing.
fn progress(shared: &Shared, task_id: &str, started: Instant, message: String) {
    let progress = crate::protocol::Progress {
        schema: crate::protocol::SCHEMA_VERSION,
        task_id: task_id.to_owned(),
        message,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    let client = shared.client.clone();
    let subject = crate::broker::subjects::progress(task_id);
    let payload = serde_json::to_vec(&progress).unwrap_or_default();
    // Best effort: progress is for people watching, not a record.
    tokio::spawn(async move {
        let _ = client.publish(subject, payload.into()).await;
    });
}

/// Finds or builds the environment of `task` on `image` (whose unpacked
/// layers are `layers`, topmost first). `None` when the task asks for none.
pub(super) async fn prepare(
    shared: &Arc<Shared>,
    task: &Task,
    task_id: &str,
    attempt: u64,
    image: &ImageRecord,
    layers: &[PathBuf],
) -> Result<Option<Prepared>, Failure> {
    let Some(wanted) = &task.environment else { return Ok(None) };
    let normal = wanted.normalize().map_err(|error| {
        final_failure(shared, task_id, attempt, TaskStatus::Rejected, "invalid_task", error)
    })?;
    if normal.is_empty() {
        return Ok(None);
    }
    let key = env::key(&image.manifest_digest, &normal);
    let image_path =
        image.config.env.iter().find_map(|entry| entry.strip_prefix("PATH=")).unwrap_or_default().to_owned();
    let runtime_env = env::runtime_env(&normal, &image_path);
    let started = Instant::now();
    let lock = shared.environments.build_lock(&key);
    let _building = match lock.try_lock() {
        Ok(guard) => guard,
        Err(_) => {
            progress(
                shared,
                task_id,
                started,
                "environment: waiting for the same environment's build".into(),
            );
            lock.lock().await
        }
    };
    let store_error = |error: env::EnvError| environment_failure(shared, task_id, attempt, error);
    // A layer evicted between the lookup and the lock reads as missing: built again.
    let found = shared.environments.lease(&key).unwrap_or_else(|error| {
        tracing::warn!(key = %&key[..16], %error, "cannot lease a built environment; building it again");
        None
    });
    if let Some((layer, lease)) = found {
        shared.metrics.environment_hit();
        let waited = started.elapsed();
        return Ok(Some(Prepared {
            layer,
            lease,
            env: runtime_env,
            report: EnvironmentReport {
                key,
                cache: CacheOutcome::Hit,
                build_ms: if waited > Duration::from_millis(50) { waited.as_secs_f64() * 1e3 } else { 0.0 },
            },
        }));
    }
    shared.metrics.environment_miss();
    let manager =
        PackageManager::detect(layers).ok_or_else(|| store_error(env::EnvError::NoPackageManager))?;
    let steps = env::plan(manager, &normal).map_err(store_error)?;
    tracing::info!(task = %task_id, key = %&key[..16], image = %image.name, steps = steps.len(), "building an environment");
    progress(
        shared,
        task_id,
        started,
        format!("environment: building on {} ({} steps)", image.name, steps.len()),
    );
    let built = build(shared, task_id, started, &key, layers, &steps).await;
    let build_ms = started.elapsed().as_secs_f64() * 1e3;
    let (upper, log) = match built {
        Ok(built) => built,
        Err(BuildFailure { message, log }) => {
            shared.metrics.environment_built(false);
            shared.environments.keep_failed_log(&key, &log);
            tracing::warn!(task = %task_id, key = %&key[..16], %message, "environment build failed");
            note(
                &shared.recorder,
                Event::EnvironmentFailed {
                    key: key.clone(),
                    task_id: task_id.to_owned(),
                    error: ErrorInfo { kind: "environment".into(), message: message.clone() },
                },
            );
            let message = format!("{message} (build log: quilt env inspect {})", &key[..16]);
            return Err(environment_failure(shared, task_id, attempt, message));
        }
    };
    let size = env::tree_size(&upper);
    if size > shared.config.environments.budget_bytes {
        shared.metrics.environment_built(false);
        remove_build_container(shared, &key).await;
        let message = format!(
            "the environment takes {size} bytes, more than the store's budget of {} bytes",
            shared.config.environments.budget_bytes
        );
        shared.environments.keep_failed_log(&key, &log);
        return Err(environment_failure(shared, task_id, attempt, message));
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let meta = EnvironmentMeta {
        key: key.clone(),
        image: image.name.clone(),
        base_digest: image.manifest_digest.clone(),
        spec: normal,
        size: 0,
        build_ms: build_ms as u64,
        built_at: now,
        last_used: now,
    };
    let image_name = meta.image.clone();
    let committed = shared.environments.commit(&upper, &log, meta);
    remove_build_container(shared, &key).await;
    shared.metrics.environment_built(committed.is_ok());
    committed.map_err(store_error)?;
    record(
        &shared.recorder,
        Event::EnvironmentBuilt {
            key: key.clone(),
            image: image_name,
            size: shared.environments.meta(&key).map_or(size, |meta| meta.size),
            build_ms: build_ms as u64,
            task_id: task_id.to_owned(),
        },
    )
    .await;
    tracing::info!(task = %task_id, key = %&key[..16], build_ms, "environment built");
    let (layer, lease) = shared
        .environments
        .lease(&key)
        .map_err(store_error)?
        .ok_or_else(|| environment_failure(shared, task_id, attempt, "the built environment vanished"))?;
    let evicted = shared.environments.evict(shared.config.environments.budget_bytes);
    if !evicted.is_empty() {
        tracing::info!(evicted = ?evicted, "environments evicted (least recently used) to stay within the budget");
        note(&shared.recorder, Event::EnvironmentsEvicted { keys: evicted });
    }
    Ok(Some(Prepared {
        layer,
        lease,
        env: runtime_env,
        report: EnvironmentReport { key, cache: CacheOutcome::Miss, build_ms },
    }))
}

struct BuildFailure {
    message: String,
    log: Vec<u8>,
}

fn build_container_id(shared: &Shared, key: &str) -> String {
    format!("{}.env-{}", shared.config.worker_id, &key[..16])
}

async fn remove_build_container(shared: &Shared, key: &str) {
    let engine = shared.engine.clone();
    let id = build_container_id(shared, key);
    match tokio::task::spawn_blocking(move || engine.reap(&id)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "cannot remove an environment's build container"),
        Err(error) => tracing::warn!(%error, "cannot remove an environment's build container"),
    }
}

/// The last `bytes` of `text`, at a character boundary.
fn tail(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Runs `steps` in a build container on `layers`; the upper directory
/// holding what they wrote, and the build log.
async fn build(
    shared: &Arc<Shared>,
    task_id: &str,
    started: Instant,
    key: &str,
    layers: &[PathBuf],
    steps: &[env::BuildStep],
) -> Result<(PathBuf, Vec<u8>), BuildFailure> {
    let id = build_container_id(shared, key);
    let mut log = Vec::new();
    let fail = |message: String, log: Vec<u8>| BuildFailure { message, log };
    // A build left by a crash of this worker starts over.
    remove_build_container(shared, key).await;
    let upper = shared.engine.container_dir(&id).join("upper");
    let injected = inject_host_files(shared, &upper).map_err(|error| fail(error.to_string(), Vec::new()))?;
    if let Some(range) = shared.engine.user_namespace() {
        // In user-namespace mode the container's root owns what it finds.
        crate::engine::shift_tree(&upper, range).map_err(|error| {
            fail(format!("giving {} to the container's root: {error}", upper.display()), Vec::new())
        })?;
    }
    let mut spec = ContainerSpec::new(&id, layers.to_vec(), vec!["sleep".into(), "86400".into()]);
    // The layer is the upper directory itself, renamed into the store.
    spec.root.scratch = Scratch::Directory;
    spec.network = NetworkMode::Host;
    spec.limits.timeout = None;
    spec.limits.memory_bytes = shared.config.limits.max_memory_bytes;
    spec.limits.pids = shared.config.limits.max_pids;
    let running = shared
        .engine
        .start_long_running(spec, 1, &shared.config.long_running)
        .await
        .map_err(|error| fail(format!("starting the build container: {error}"), Vec::new()))?;
    let deadline = Instant::now() + shared.config.environments.build_timeout;
    let mut step_env: Vec<(String, String)> = vec![
        ("DEBIAN_FRONTEND".into(), "noninteractive".into()),
        ("HOME".into(), "/root".into()),
        ("PIP_DISABLE_PIP_VERSION_CHECK".into(), "1".into()),
    ];
    if injected.ca_bundle {
        for name in
            ["SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "npm_config_cafile"]
        {
            step_env.push((name.into(), BUILD_CA_BUNDLE.into()));
        }
    }
    step_env.extend(shared.config.environments.pass_env.iter().cloned());
    let mut failure = None;
    for (index, step) in steps.iter().enumerate() {
        log.extend_from_slice(format!("== {}: {}\n", step.what, step.argv.join(" ")).as_bytes());
        progress(
            shared,
            task_id,
            started,
            format!("environment: {} ({}/{})", step.what, index + 1, steps.len()),
        );
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failure =
                Some(format!("the build took longer than {:?}", shared.config.environments.build_timeout));
            break;
        }
        let mut exec = ContainerSpec::new(format!("step-{index}"), layers.to_vec(), step.argv.clone());
        exec.env = step_env.clone();
        exec.workdir = "/".into();
        exec.limits.timeout = Some(left);
        exec.limits.memory_bytes = shared.config.limits.max_memory_bytes;
        exec.limits.pids = shared.config.limits.max_pids;
        exec.limits.output_bytes = 1 << 20;
        let outcome = match shared.engine.create_exec(&running, exec) {
            Ok(mut container) => match container.start().await {
                Ok(()) => {
                    let _ = container.wait().await;
                    container.finish().await
                }
                Err(error) => {
                    let _ = container.finish().await;
                    Err(error)
                }
            },
            Err(error) => Err(error),
        };
        match outcome {
            Ok(outcome) => {
                log.extend_from_slice(&outcome.stdout.data);
                log.extend_from_slice(&outcome.stderr.data);
                if outcome.exit_code != Some(0) {
                    let output = String::from_utf8_lossy(if outcome.stderr.data.is_empty() {
                        &outcome.stdout.data
                    } else {
                        &outcome.stderr.data
                    })
                    .into_owned();
                    let how = match (outcome.timed_out, outcome.exit_code, outcome.signal) {
                        (true, _, _) => "timed out".to_owned(),
                        (_, Some(code), _) => format!("exit {code}"),
                        (_, None, Some(signal)) => format!("signal {signal}"),
                        _ => "failed".to_owned(),
                    };
                    failure = Some(format!("{} ({how}): {}", step.what, tail(output.trim(), 2000)));
                    break;
                }
            }
            Err(error) => {
                failure = Some(format!("{}: {error}", step.what));
                break;
            }
        }
    }
    let _ = running.kill_all();
    let _ = tokio::time::timeout(Duration::from_secs(30), running.wait()).await;
    if let Some(message) = failure {
        remove_build_container(shared, key).await;
        return Err(fail(message, log));
    }
    injected.remove(&upper);
    if let Some(range) = shared.engine.user_namespace() {
        // Cached layers hold image ids in either mode: what the build's root
        // wrote as host id START+n is stored as n (see engine::unshift_tree).
        if let Err(error) = crate::engine::unshift_tree(&upper, range) {
            remove_build_container(shared, key).await;
            return Err(fail(format!("shifting the layer's owners back to image ids: {error}"), log));
        }
    }
    Ok((upper, log))
}

/// What [`inject_host_files`] put into the upper directory.
struct Injected {
    resolv_conf: bool,
    ca_bundle: bool,
}

impl Injected {
    /// Takes the host's files out of the layer again.
    fn remove(&self, upper: &Path) {
        if self.resolv_conf {
            let _ = std::fs::remove_file(upper.join("etc/resolv.conf"));
        }
        if self.ca_bundle {
            if let Some(dir) = Path::new(BUILD_CA_BUNDLE).parent() {
                let _ = std::fs::remove_dir_all(upper.join(dir.strip_prefix("/").unwrap_or(dir)));
            }
        }
    }
}

/// Puts the host's resolver configuration and CA bundle into the build
/// container's upper directory (made before the container starts).
fn inject_host_files(shared: &Shared, upper: &Path) -> std::io::Result<Injected> {
    std::fs::create_dir_all(upper.join("etc"))?;
    let resolv_conf = match std::fs::read("/etc/resolv.conf") {
        Ok(bytes) => {
            std::fs::write(upper.join("etc/resolv.conf"), bytes)?;
            true
        }
        Err(_) => false,
    };
    let ca_bundle = match &shared.config.environments.ca_bundle {
        Some(bundle) => {
            let target = upper.join(BUILD_CA_BUNDLE.trim_start_matches('/'));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(bundle, &target)?;
            true
        }
        None => false,
    };
    Ok(Injected { resolv_conf, ca_bundle })
}

/// Builds the configured environments, one after another (a task needing
/// one meanwhile waits for its build, as for any build).
pub(super) async fn prebuild(shared: Arc<Shared>) {
    for (index, task) in shared.config.environments.prebuild.iter().enumerate() {
        let task_id = format!("prebuild-{index}");
        let outcome = match super::run::resolve_image_for(&shared, &task_id, 0, &task.image).await {
            Ok((image, layers, _lease)) => {
                prepare(&shared, task, &task_id, 0, &image, &layers).await.map(|_| ())
            }
            Err(failure) => Err(failure),
        };
        match outcome {
            Ok(()) => tracing::info!(image = %task.image, "environment prebuilt"),
            Err(Failure::Final(result)) => {
                let message = result.error.map(|error| error.message).unwrap_or_default();
                tracing::warn!(image = %task.image, %message, "an environment to prebuild failed");
            }
            Err(_) => tracing::warn!(image = %task.image, "an environment to prebuild failed"),
        }
    }
}
