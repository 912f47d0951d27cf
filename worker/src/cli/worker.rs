//! `quilt up` (embedded nats-server + a worker) and `quilt worker --nats URL`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use quilt::broker::{self, BrokerOptions, EmbeddedBroker, JetStreamSettings};
use quilt::engine::{parse_duration, parse_size, UnavailableLimits};
use quilt::image::PullOptions;
use quilt::orchestrator::{self, validate_worker_id, CrashPoint, TaskLimitsPolicy, WorkerConfig};
use tokio::sync::watch;

use super::nats::{NatsArgs, URL_FILE};

#[derive(Args, Debug)]
pub(crate) struct WorkerArgs {
    /// This worker's id (1 to 32 of a-z 0-9 _ -). Default: the one kept in
    /// the data directory, made from the host name the first time.
    #[arg(long, env = "QUILT_WORKER_ID")]
    worker_id: Option<String>,
    /// Tasks run at once.
    #[arg(long, env = "QUILT_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,
    /// Memory of a task that sets none, e.g. 512M.
    #[arg(long, env = "QUILT_DEFAULT_MEMORY", default_value = "512M")]
    default_memory: String,
    /// Most memory a task may have.
    #[arg(long, env = "QUILT_MAX_MEMORY", default_value = "4G")]
    max_memory: String,
    /// Wall-clock limit of a task that sets none, e.g. 5m.
    #[arg(long, env = "QUILT_DEFAULT_TIMEOUT", default_value = "5m")]
    default_timeout: String,
    /// Longest wall-clock limit a task may have.
    #[arg(long, env = "QUILT_MAX_TIMEOUT", default_value = "1h")]
    max_timeout: String,
    /// Most processes a task may have.
    #[arg(long, env = "QUILT_MAX_PIDS", default_value_t = 4096)]
    max_pids: u64,
    /// Size of a long-running container's writable layer, e.g. 1G: a
    /// filesystem of its own, allocated in full on the data disk when the
    /// container is made.
    #[arg(long, env = "QUILT_LONG_RUNNING_DISK", default_value = "1G")]
    long_running_disk: String,
    /// Let tasks ask for the host's network ("network": "host").
    #[arg(long, env = "QUILT_ALLOW_HOST_NETWORK")]
    allow_host_network: bool,
    /// Refuse tasks whose image is not already in the local store instead of pulling it.
    #[arg(long, env = "QUILT_NO_PULL")]
    no_pull: bool,
    /// A registry (host[:port]) to pull from over plain HTTP (loopback ones always are).
    #[arg(long = "insecure-registry", env = "QUILT_INSECURE_REGISTRIES", value_delimiter = ',')]
    insecure_registries: Vec<String>,
    /// How long running tasks may take to finish on SIGTERM before they are handed back.
    #[arg(long, env = "QUILT_SHUTDOWN_GRACE", default_value = "30s")]
    shutdown_grace: String,
    /// JetStream AckWait of the shared task consumer.
    #[arg(long, env = "QUILT_ACK_WAIT", default_value = "30s")]
    ack_wait: String,
    /// Deliveries of a task before it is dead-lettered.
    #[arg(long, env = "QUILT_MAX_DELIVER", default_value_t = 5)]
    max_deliver: i64,
    /// Stream replicas (3 on a 3-node cluster).
    #[arg(long, env = "QUILT_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// User-namespace mode: container uids and gids 0..COUNT are host ids START.. (START:COUNT,
    /// e.g. 100000:65536), so a container's root is an unprivileged host user. Off by default.
    #[arg(long, env = "QUILT_USERNS", value_name = "START:COUNT")]
    userns: Option<quilt::engine::IdRange>,
    /// Run without limits whose cgroup controller this host lacks (default: refuse such tasks).
    #[arg(long, env = "QUILT_SKIP_UNAVAILABLE_LIMITS")]
    skip_unavailable_limits: bool,
    /// The shim of long-running containers (default: `quilt-shim` next to this program).
    #[arg(long, env = "QUILT_SHIM")]
    shim: Option<std::path::PathBuf>,
    /// Size at which a long-running container's log segment is rotated, e.g. 8M.
    #[arg(long, env = "QUILT_LOG_SEGMENT_SIZE", default_value = "8M")]
    log_segment_size: String,
    /// Log segments kept per long-running container.
    #[arg(long, env = "QUILT_LOG_SEGMENTS", default_value_t = 4)]
    log_segments: u32,
    /// Built language environments are trimmed (least recently used first) to this size.
    #[arg(long, env = "QUILT_ENVIRONMENT_BUDGET", default_value = "10G")]
    environment_budget: String,
    /// Longest a language environment's build may take.
    #[arg(long, env = "QUILT_ENVIRONMENT_BUILD_TIMEOUT", default_value = "15m")]
    environment_build_timeout: String,
    /// The CA bundle put into environment builds, or `none` (default: the
    /// host's /etc/ssl/certs/ca-certificates.crt when it exists).
    #[arg(long, env = "QUILT_CA_BUNDLE")]
    ca_bundle: Option<String>,
    /// An environment variable of the worker passed to environment builds,
    /// e.g. HTTPS_PROXY (repeatable).
    #[arg(long = "build-env", value_name = "NAME", env = "QUILT_BUILD_ENV", value_delimiter = ',')]
    build_env: Vec<String>,
    /// A JSON file listing environments to build at start:
    /// `[{"image": "debian:bookworm", "environment": {"pip": ["requests"]}}]`.
    #[arg(long, env = "QUILT_PREBUILD", value_name = "FILE")]
    prebuild: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics on `GET /metrics` at this IP address and
    /// port, e.g. 127.0.0.1:9464 (port 0 picks a free one; the bound address
    /// is written to <data-dir>/metrics.addr). Default: no metrics endpoint.
    #[arg(long, env = "QUILT_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
pub(crate) struct UpArgs {
    /// Client port of the embedded nats-server on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 4222)]
    port: u16,
    /// The nats-server executable (default: $QUILT_NATS_SERVER, then PATH).
    #[arg(long)]
    nats_server: Option<PathBuf>,
    #[command(flatten)]
    worker: WorkerArgs,
}

#[derive(Args, Debug)]
pub(crate) struct JoinArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    worker: WorkerArgs,
}

fn duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    parse_duration(text).with_context(|| format!("invalid --{flag} {text:?}: use e.g. 30s, 5m, 500ms"))
}

fn size(flag: &str, text: &str) -> anyhow::Result<u64> {
    parse_size(text).with_context(|| format!("invalid --{flag} {text:?}: use e.g. 512M, 4G"))
}

/// The worker id: given, else kept in the data directory, else made once.
fn worker_id(data_dir: &Path, given: Option<String>) -> anyhow::Result<String> {
    let file = data_dir.join("worker-id");
    if let Some(id) = given {
        validate_worker_id(&id)?;
        return Ok(id);
    }
    if let Ok(text) = std::fs::read_to_string(&file) {
        let id = text.trim().to_owned();
        validate_worker_id(&id).with_context(|| format!("{} holds an invalid worker id", file.display()))?;
        return Ok(id);
    }
    let host: String = nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_default()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .take(20)
        .collect();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let id = if host.is_empty() { format!("w-{suffix}") } else { format!("{host}-{suffix}") };
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    std::fs::write(&file, format!("{id}\n")).with_context(|| format!("writing {}", file.display()))?;
    Ok(id)
}

fn worker_config(data_dir: &Path, args: WorkerArgs) -> anyhow::Result<WorkerConfig> {
    let mut config = WorkerConfig::new(worker_id(data_dir, args.worker_id)?, data_dir);
    if args.concurrency == 0 {
        anyhow::bail!("--concurrency must be at least 1");
    }
    config.concurrency = args.concurrency;
    config.limits = TaskLimitsPolicy {
        default_memory_bytes: size("default-memory", &args.default_memory)?,
        max_memory_bytes: size("max-memory", &args.max_memory)?,
        default_timeout: duration("default-timeout", &args.default_timeout)?,
        max_timeout: duration("max-timeout", &args.max_timeout)?,
        max_pids: args.max_pids,
        long_running_disk_bytes: size("long-running-disk", &args.long_running_disk)?,
        ..TaskLimitsPolicy::default()
    };
    config.limits.default_memory_bytes =
        config.limits.default_memory_bytes.min(config.limits.max_memory_bytes);
    config.limits.default_pids = config.limits.default_pids.min(config.limits.max_pids);
    config.allow_host_network = args.allow_host_network;
    config.pull = (!args.no_pull)
        .then(|| PullOptions { insecure_registries: args.insecure_registries, ..PullOptions::default() });
    config.shutdown_grace = duration("shutdown-grace", &args.shutdown_grace)?;
    config.jetstream = JetStreamSettings {
        ack_wait: duration("ack-wait", &args.ack_wait)?,
        max_deliver: args.max_deliver.max(1),
        replicas: args.replicas.max(1),
        ..JetStreamSettings::default()
    };
    config.user_namespace = args.userns;
    if args.skip_unavailable_limits {
        config.unavailable_limits = UnavailableLimits::Skip;
    }
    if let Some(shim) = args.shim {
        config.long_running.shim = shim;
    }
    if !config.long_running.shim.is_file() {
        anyhow::bail!(
            "the shim of long-running containers, {}, is missing (build it with `cargo build --bin quilt-shim`, or give --shim)",
            config.long_running.shim.display()
        );
    }
    config.long_running.log_segment_bytes = size("log-segment-size", &args.log_segment_size)?.max(4096);
    if args.log_segments == 0 {
        anyhow::bail!("--log-segments must be at least 1");
    }
    config.long_running.log_segments = args.log_segments;
    config.environments.budget_bytes = size("environment-budget", &args.environment_budget)?;
    config.environments.build_timeout =
        duration("environment-build-timeout", &args.environment_build_timeout)?;
    match args.ca_bundle.as_deref() {
        None => {}
        Some("none") => config.environments.ca_bundle = None,
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            if !path.is_file() {
                anyhow::bail!("--ca-bundle {}: no such file", path.display());
            }
            config.environments.ca_bundle = Some(path);
        }
    }
    if let Some(path) = &args.prebuild {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --prebuild {}", path.display()))?;
        let entries: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| {
            format!("--prebuild {}: a JSON array of {{image, environment}}", path.display())
        })?;
        for (index, entry) in entries.into_iter().enumerate() {
            let task = quilt::protocol::parse_task(&serde_json::to_vec(&entry)?)
                .map_err(|error| anyhow::anyhow!("--prebuild {}[{index}]: {error}", path.display()))?;
            if task.environment.is_none() {
                anyhow::bail!("--prebuild {}[{index}]: no environment", path.display());
            }
            config.environments.prebuild.push(task);
        }
    }
    config.metrics_listen = args.metrics_listen;
    for name in args.build_env {
        if let Ok(value) = std::env::var(&name) {
            config.environments.pass_env.push((name, value));
        }
    }
    // Test seam for the crash-recovery tests (see orchestrator's module doc).
    if let Ok(point) = std::env::var("QUILT_CRASH_AT") {
        config.crash_at = Some(point.parse::<CrashPoint>().map_err(anyhow::Error::msg)?);
    }
    Ok(config)
}

/// Turns true on SIGTERM or SIGINT.
fn stop_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (sender, receiver) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        sender.send_replace(true);
        eprintln!("quilt: stopping: no new tasks; waiting for running ones");
        // Keep the sender alive so receivers do not see a closed channel.
        std::future::pending::<()>().await;
    });
    Ok(receiver)
}

/// Serves the control API over the worker, subscribed before it says it is ready.
async fn start_api(view: orchestrator::WorkerView) {
    if let Err(error) = quilt::api::serve(view).await {
        tracing::error!(%error, "the control API is not available");
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn up(data_dir: &Path, args: UpArgs) -> anyhow::Result<u8> {
    runtime()?.block_on(async move {
        let stop = stop_on_signals()?;
        let config = worker_config(data_dir, args.worker)?;
        let mut options = BrokerOptions::new(data_dir);
        options.port = (args.port != 0).then_some(args.port);
        options.nats_server = args.nats_server;
        let broker = EmbeddedBroker::start(options).await.context("starting the embedded nats-server")?;
        let url = broker.url();
        let url_file = data_dir.join(URL_FILE);
        std::fs::write(&url_file, format!("{url}\n"))
            .with_context(|| format!("writing {}", url_file.display()))?;
        let client = broker::connect(&broker::ConnectConfig {
            url: url.clone(),
            name: format!("quilt-worker-{}", config.worker_id),
            retry_first_connect: true,
            ..Default::default()
        })
        .await
        .context("connecting to the embedded nats-server")?;
        println!(
            "quilt is up: NATS at {url}, worker {} running {} tasks at once",
            config.worker_id, config.concurrency
        );
        println!("publish tasks to quilt.tasks; try: quilt run --image busybox -- echo hello");
        let result = orchestrator::run_with(config, client, stop, start_api).await;
        // The broker stops last, after the worker confirmed its acks.
        broker.stop().await;
        let _ = std::fs::remove_file(&url_file);
        result.context("worker")?;
        Ok(0)
    })
}

pub(crate) fn join(data_dir: &Path, args: JoinArgs) -> anyhow::Result<u8> {
    runtime()?.block_on(async move {
        let stop = stop_on_signals()?;
        let config = worker_config(data_dir, args.worker)?;
        let connect = args.nats.config(data_dir, &format!("quilt-worker-{}", config.worker_id), true);
        eprintln!(
            "quilt: worker {} connecting to {}",
            config.worker_id,
            quilt::broker::without_credentials(&connect.url)
        );
        let client = broker::connect(&connect).await.context("connecting to NATS")?;
        orchestrator::run_with(config, client, stop, start_api).await.context("worker")?;
        Ok(0)
    })
}
