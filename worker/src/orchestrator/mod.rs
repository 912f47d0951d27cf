//! The worker: claims tasks from `quilt.tasks`, runs each in a container,
//! records and publishes its result, exactly once as the agent sees it.
//!
//! It owns the event log `<data-dir>/events.redb`, the containers it makes
//! (ids `<worker_id>.<random>`) and its pull loop on the shared consumer. It
//! drives the engine and the image store and talks to NATS; it knows
//! nothing of how a container is built.
//!
//! One task's path (SECURITY.md "Delivery and state"):
//! 1. A delivery is fetched only when a slot is free (`concurrency`).
//! 2. If the log already holds this task's result (a redelivery after a
//!    crash or a lost ack), that result is published if it was not yet, and
//!    the delivery acked: the task is never run twice by this worker. If
//!    `QUILT_RESULTS` already holds a result (another worker finished it),
//!    the delivery is acked without running.
//! 3. `task_claimed`; the task is parsed and validated. Bad input gets a
//!    `rejected` result naming the field, and is never redelivered.
//! 4. The image is found (or pulled) and the container made. Its id is
//!    `<worker_id>.<random>`, so whatever a crash leaves is found at the
//!    next start by that naming even if `container_creating` never reached
//!    the disk. Output is published live; progress acks (`+WPI`) keep the
//!    lease while the task runs.
//! 5. `result_stored`, durable, *then* the result is published with
//!    `Nats-Msg-Id` = task id and `Nats-Expected-Last-Subject-Sequence: 0`,
//!    so `QUILT_RESULTS` stores at most one result per task whoever
//!    publishes; a worker that finds another's result there (it lost its
//!    lease while paused) discards its own. Then `result_published`, then
//!    the delivery is acked and the server's confirmation awaited
//!    (`task_acked`).
//! 6. A failure worth retrying (a registry unreachable, a cgroup error)
//!    hands the task back with a delayed NAK; on the last allowed delivery
//!    it is dead-lettered on `quilt.dlq` instead, and an `error` result
//!    tells the agent. A task that kills its worker every time is
//!    dead-lettered from the server's max-deliveries advisory.
//!
//! Which events are awaited: only those a later step relies on being on
//! disk: `result_stored` before the publish, and the terminal ones
//! (`task_released`, `dead_lettered`, `result_discarded`, reconciliation).
//! The others are queued (`Recorder::note`): the log commits in order
//! and a failed commit refuses everything after it, so each queued event is
//! durable by the time the next awaited one is, and one fsync covers a
//! whole phase of a task.
//!
//! At start the log is replayed, then reconciled with reality: every
//! container the log says may exist (and any leftover of this worker's
//! naming) is reaped and `container_reaped` recorded; stored results not yet
//! published are published; tasks held without a result are released (the
//! server redelivers them). Ephemeral containers are not re-adopted: their
//! output pipes died with the old process. Long-running containers are
//! (see [`long_running`]): they keep running while the worker is down.
//!
//! Besides the shared consumer, each worker pulls from its own durable
//! consumer on `quilt.tasks.worker.<id>`: tasks other workers forwarded to
//! it because it owns their long-running container. Both share the slots.
//!
//! Shutdown: stop fetching, let running tasks finish within the grace
//! period, then kill the rest and hand them back (NAK).
//!
//! Metrics: the worker counts results, run and queue times and environment
//! lookups into [`crate::metrics::Metrics`] (atomics, no lock on a task's
//! path); with `metrics_listen` it serves them over HTTP from ready to
//! shutdown, the gauges read at each scrape from its state.
//!
//! Test seam: `WorkerConfig::crash_at` names a point at which the process
//! SIGKILLs itself (see [`CrashPoint`]), for the crash-recovery tests.

mod environment;
pub mod long_running;
mod plan;
mod recorder;
mod run;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::{watch, Semaphore};

use crate::broker::{self, JetStreamHandles, JetStreamSettings, SetupError};
use crate::engine::{Engine, EngineConfig, EngineError, LongRunningConfig, UnavailableLimits};
use crate::events::{rebuild, EventLog, EventLogError};
use crate::image::{ImageError, ImageStore, PullOptions};
use crate::protocol::{ContainerSummary, Event, ImageSummary, WorkerInfo};

pub use environment::EnvironmentConfig;
pub use plan::TaskLimitsPolicy;
use recorder::Recorder;
use state::WorkerState;

/// How long one pull request waits for tasks before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// The event log's file in the data directory.
const EVENT_LOG_FILE: &str = "events.redb";

/// How long a scrape waits for the task consumer's info from JetStream.
const QUEUE_INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// Points at which a worker configured to crash kills itself with SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Right after `task_claimed` is durable.
    AfterFetch,
    /// Right after the container's command started.
    AfterStart,
    /// Right after the container exited and was removed, before the result is stored.
    AfterExit,
    /// Right after `result_stored` is durable.
    AfterStored,
    /// Right after the server acknowledged the result, before `result_published`.
    AfterPublished,
    /// Right before the delivery is acked.
    BeforeAck,
}

impl std::str::FromStr for CrashPoint {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text {
            "after_fetch" => CrashPoint::AfterFetch,
            "after_start" => CrashPoint::AfterStart,
            "after_exit" => CrashPoint::AfterExit,
            "after_stored" => CrashPoint::AfterStored,
            "after_published" => CrashPoint::AfterPublished,
            "before_ack" => CrashPoint::BeforeAck,
            other => return Err(format!("unknown crash point {other:?}")),
        })
    }
}

/// A worker's settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This worker's id: 1 to 32 of `a-z 0-9 _ -`.
    pub worker_id: String,
    /// Where the event log, containers and images live.
    pub data_dir: PathBuf,
    /// Tasks run at once.
    pub concurrency: usize,
    /// Defaults and maxima of task limits.
    pub limits: TaskLimitsPolicy,
    /// Whether tasks may ask for `"network": "host"`.
    pub allow_host_network: bool,
    /// Pull images missing from the store (with these options), or refuse them.
    pub pull: Option<PullOptions>,
    /// How long running tasks may take to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Stream and consumer settings (applied at start).
    pub jetstream: JetStreamSettings,
    /// What to do with limits this host's cgroups cannot enforce.
    pub unavailable_limits: UnavailableLimits,
    /// User-namespace mode: containers' ids mapped to this host range.
    pub user_namespace: Option<crate::engine::IdRange>,
    /// Cgroup under which containers' cgroups are made.
    pub cgroup_parent: String,
    /// Test seam: SIGKILL this process at this point of the first task that reaches it.
    pub crash_at: Option<CrashPoint>,
    /// Long-running containers: the shim program, log rotation.
    pub long_running: LongRunningConfig,
    /// Language environments: store budget, build timeout, CA bundle.
    pub environments: EnvironmentConfig,
    /// Serve Prometheus metrics (`GET /metrics`) on this address; none by default.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Where `quilt-shim` is by default: next to the running executable.
pub fn default_shim_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("quilt-shim")))
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/quilt-shim"))
}

impl WorkerConfig {
    /// Defaults for a worker with this id and data directory.
    pub fn new(worker_id: impl Into<String>, data_dir: impl Into<PathBuf>) -> WorkerConfig {
        WorkerConfig {
            worker_id: worker_id.into(),
            data_dir: data_dir.into(),
            concurrency: 4,
            limits: TaskLimitsPolicy::default(),
            allow_host_network: false,
            pull: Some(PullOptions::default()),
            shutdown_grace: Duration::from_secs(30),
            jetstream: JetStreamSettings::default(),
            unavailable_limits: UnavailableLimits::Refuse,
            user_namespace: None,
            cgroup_parent: "quilt".to_owned(),
            crash_at: None,
            long_running: LongRunningConfig {
                shim: default_shim_path(),
                log_segment_bytes: 8 << 20,
                log_segments: 4,
            },
            environments: EnvironmentConfig::default(),
            metrics_listen: None,
        }
    }
}

/// Failures that stop a worker, named after the step.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A worker id outside the allowed alphabet.
    #[error("invalid worker id {0:?}: use 1 to 32 of a-z 0-9 _ -")]
    WorkerId(String),
    /// Opening or replaying the event log.
    #[error("event log")]
    EventLog(#[source] EventLogError),
    /// Starting the engine.
    #[error("container engine")]
    Engine(#[source] EngineError),
    /// Opening the image store.
    #[error("image store")]
    Images(#[source] ImageError),
    /// Setting up JetStream.
    #[error("JetStream set-up")]
    Setup(#[source] SetupError),
    /// Opening the environment store.
    #[error("environment store")]
    Environments(#[source] crate::env::EnvError),
    /// Binding the metrics endpoint.
    #[error("metrics endpoint")]
    Metrics(#[source] crate::metrics::MetricsError),
    /// A blocking task panicked.
    #[error("internal task failed: {0}")]
    Join(String),
}

impl WorkerError {
    /// A stable, machine-readable name of the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            WorkerError::WorkerId(_) => "invalid_worker_id",
            WorkerError::EventLog(_) => "event_log",
            WorkerError::Engine(_) => "engine",
            WorkerError::Images(_) => "images",
            WorkerError::Setup(_) => "setup",
            WorkerError::Environments(_) => "environments",
            WorkerError::Metrics(_) => "metrics",
            WorkerError::Join(_) => "internal",
        }
    }
}

/// Checks a worker id: it is a NATS subject token and a container id prefix.
pub fn validate_worker_id(id: &str) -> Result<(), WorkerError> {
    let ok = !id.is_empty()
        && id.len() <= 32
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(WorkerError::WorkerId(id.to_owned()))
    }
}

/// What the worker shares between its tasks.
pub(crate) struct Shared {
    pub(crate) config: WorkerConfig,
    pub(crate) engine: Engine,
    pub(crate) images: Arc<ImageStore>,
    pub(crate) client: async_nats::Client,
    pub(crate) jetstream: JetStreamHandles,
    pub(crate) recorder: Recorder,
    pub(crate) ack_wait: Duration,
    pub(crate) max_deliver: u64,
    /// The server's largest message: results are fitted under it.
    pub(crate) max_payload: usize,
    /// Flips to true when the worker should stop fetching.
    pub(crate) stopping: watch::Receiver<bool>,
    /// Flips to true when running tasks must be killed and handed back.
    pub(crate) abandoning: watch::Sender<bool>,
    /// Tasks a handler of this process holds right now, by id.
    pub(crate) in_flight: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Long-running containers this process manages, by name.
    pub(crate) long_running: long_running::LongRunningSet,
    /// Built language environments.
    pub(crate) environments: crate::env::EnvStore,
    /// Counters for the metrics endpoint.
    pub(crate) metrics: crate::metrics::Metrics,
}

/// Read-only access to a running worker, for the control API (which
/// depends on the orchestrator, not the other way round).
#[derive(Clone)]
pub struct WorkerView {
    shared: Arc<Shared>,
    started: std::time::Instant,
}

impl WorkerView {
    /// The worker's id.
    pub fn worker_id(&self) -> &str {
        &self.shared.config.worker_id
    }

    /// The worker's NATS connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.shared.client
    }

    /// The containers that may exist on this worker, by the log.
    pub fn containers(&self) -> Vec<ContainerSummary> {
        let mut containers: Vec<ContainerSummary> = self
            .shared
            .recorder
            .state()
            .containers
            .iter()
            .map(|(id, entry)| ContainerSummary {
                id: id.clone(),
                worker_id: self.shared.config.worker_id.clone(),
                task_id: entry.task_id.clone(),
                pid: entry.pid,
                name: None,
                status: "running".to_owned(),
                image: None,
                run: None,
                exit_code: None,
                signal: None,
                restart: None,
            })
            .collect();
        containers.extend(long_running::summaries(&self.shared));
        containers
    }

    /// Long-running container `name`, if this worker owns it.
    pub fn long_running(&self, name: &str) -> Option<ContainerSummary> {
        long_running::summary(&self.shared, name)
    }

    /// Stops long-running container `name` (SIGTERM, `grace`, SIGKILL).
    pub async fn stop(
        &self,
        name: &str,
        grace: Duration,
    ) -> Result<ContainerSummary, long_running::ControlError> {
        long_running::stop(&self.shared, name, grace).await
    }

    /// Removes long-running container `name`.
    pub async fn remove(&self, name: &str, grace: Duration) -> Result<(), long_running::ControlError> {
        long_running::remove(&self.shared, name, grace).await
    }

    /// Log bytes of long-running container `name`: from `offset`, or its
    /// last `tail` lines (reads files: call from a blocking thread).
    pub fn logs(
        &self,
        name: &str,
        offset: Option<u64>,
        tail: Option<usize>,
        max_bytes: usize,
    ) -> Result<crate::shim::LogChunk, long_running::ControlError> {
        long_running::logs(&self.shared, name, offset, tail, max_bytes)
    }

    /// Runs `request`'s command inside long-running container
    /// `request.name` and returns its result (an error result is a result).
    pub async fn exec(
        &self,
        request: crate::protocol::ContainerRequest,
    ) -> Result<crate::protocol::TaskResult, long_running::ControlError> {
        long_running::exec_request(&self.shared, request).await
    }

    /// Drops the registration of `name` whose owner is gone for good.
    pub async fn forget(&self, name: &str) -> Result<(), long_running::ControlError> {
        long_running::forget(&self.shared, name).await
    }

    /// The worker's JetStream handles (the KV bucket of container names).
    pub fn jetstream(&self) -> &JetStreamHandles {
        &self.shared.jetstream
    }

    /// What the worker is and does.
    pub fn info(&self) -> WorkerInfo {
        WorkerInfo {
            worker_id: self.shared.config.worker_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            concurrency: self.shared.config.concurrency,
            running: self.shared.in_flight.lock().unwrap_or_else(|e| e.into_inner()).len(),
            cgroup_version: self.shared.engine.cgroup_version().to_string(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            event_log_seq: self.shared.recorder.last_seq(),
        }
    }

    /// The images in the worker's store (reads files: call from a blocking thread).
    pub fn images(&self) -> Result<Vec<ImageSummary>, ImageError> {
        Ok(self
            .shared
            .images
            .list()?
            .into_iter()
            .map(|record| ImageSummary {
                size: record.size(),
                name: record.name,
                digest: record.manifest_digest,
            })
            .collect())
    }
}

impl crate::metrics::Source for WorkerView {
    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.shared.metrics
    }

    /// Brief locks only: the set of held tasks and the folded state, each
    /// for a count.
    async fn gauges(&self) -> crate::metrics::Gauges {
        let shared = &self.shared;
        let tasks_running = shared.in_flight.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        let containers_running =
            shared.recorder.state().long_running.values().filter(|entry| entry.running.is_some()).count()
                as u64;
        let info = tokio::time::timeout(QUEUE_INFO_TIMEOUT, shared.jetstream.consumer.get_info()).await;
        let queue = match info {
            Ok(Ok(info)) => Some(crate::metrics::QueueDepth {
                pending: info.num_pending,
                ack_pending: info.num_ack_pending as u64,
            }),
            Ok(Err(error)) => {
                tracing::debug!(%error, "metrics: cannot read the task consumer's info");
                shared.metrics.sample_failed();
                None
            }
            Err(_) => {
                tracing::debug!("metrics: the task consumer's info did not come in time");
                shared.metrics.sample_failed();
                None
            }
        };
        let event_log_bytes = match tokio::fs::metadata(shared.config.data_dir.join(EVENT_LOG_FILE)).await {
            Ok(metadata) => Some(metadata.len()),
            Err(error) => {
                tracing::debug!(%error, "metrics: cannot read the event log's size");
                shared.metrics.sample_failed();
                None
            }
        };
        crate::metrics::Gauges { tasks_running, containers_running, queue, event_log_bytes }
    }
}

/// Runs a worker on `client` until `stop` turns true, then drains.
pub async fn run(
    config: WorkerConfig,
    client: async_nats::Client,
    stop: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    run_with(config, client, stop, |_| std::future::ready(())).await
}

/// [`run`], awaiting `on_ready` with a view of the worker before it takes
/// tasks (and says "worker ready"), e.g. to start the control API first.
pub async fn run_with<Ready>(
    config: WorkerConfig,
    client: async_nats::Client,
    stop: watch::Receiver<bool>,
    on_ready: impl FnOnce(WorkerView) -> Ready,
) -> Result<(), WorkerError>
where
    Ready: std::future::Future<Output = ()>,
{
    let started = std::time::Instant::now();
    let metrics = crate::metrics::Metrics::new();
    validate_worker_id(&config.worker_id)?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| WorkerError::Images(ImageError::Io { path: config.data_dir.clone(), source }))?;
    // Bound now, so a taken address stops the worker before it does anything.
    let metrics_listener = match config.metrics_listen {
        Some(address) => {
            Some(crate::metrics::MetricsListener::bind(address).await.map_err(WorkerError::Metrics)?)
        }
        None => None,
    };
    let log_path = config.data_dir.join(EVENT_LOG_FILE);
    let (log, state) = tokio::task::spawn_blocking(move || {
        let log = EventLog::<Event>::open(&log_path)?;
        let (state, _) = rebuild::<WorkerState, Event>(&log)?;
        Ok::<_, EventLogError>((log, state))
    })
    .await
    .map_err(|error| WorkerError::Join(error.to_string()))?
    .map_err(WorkerError::EventLog)?;
    let recorder = Recorder::new(log, state, config.worker_id.clone());
    let engine = Engine::new(EngineConfig {
        state_dir: config.data_dir.join("containers"),
        cgroup_parent: config.cgroup_parent.clone(),
        unavailable_limits: config.unavailable_limits,
        user_namespace: config.user_namespace,
    })
    .map_err(WorkerError::Engine)?;
    let images = Arc::new(ImageStore::open(&config.data_dir).map_err(WorkerError::Images)?);
    let environments = crate::env::EnvStore::open(&config.data_dir).map_err(WorkerError::Environments)?;

    // Mirror from the first event on: the reconciliation below
    // (`container_reaped`) is what an operator most wants to see.
    recorder.mirror_to(client.clone());
    // Reap before anything else: nothing left behind must outlive a restart.
    // Long-running containers are not left behind: they are adopted below.
    reap_leftovers(&engine, &recorder, &config.worker_id).await?;

    let context = broker::context(client.clone());
    let jetstream = loop {
        match broker::ensure(&context, &config.jetstream).await {
            Ok(handles) => break handles,
            Err(error) => {
                tracing::warn!(error = %crate_error_chain(&error), "JetStream not ready; retrying");
                if wait_or_stop(&stop, Duration::from_secs(1)).await {
                    return Ok(());
                }
            }
        }
    };
    let consumer_config = jetstream.consumer.cached_info().config.clone();
    let max_payload = client.server_info().max_payload.max(64 * 1024);
    let shared = Arc::new(Shared {
        ack_wait: consumer_config.ack_wait,
        max_deliver: u64::try_from(consumer_config.max_deliver).unwrap_or(u64::MAX).max(1),
        max_payload,
        config,
        engine,
        images,
        client,
        jetstream,
        recorder,
        stopping: stop.clone(),
        abandoning: watch::Sender::new(false),
        in_flight: std::sync::Mutex::default(),
        long_running: long_running::LongRunningSet::default(),
        environments,
        metrics,
    });
    run::settle_held_tasks(&shared).await;
    long_running::adopt_all(&shared).await;
    let own_consumer = loop {
        match broker::ensure_worker_consumer(
            &shared.jetstream.tasks,
            &shared.config.jetstream,
            &shared.config.worker_id,
        )
        .await
        {
            Ok(consumer) => break consumer,
            Err(error) => {
                tracing::warn!(error = %crate_error_chain(&error), "cannot set up this worker's consumer; retrying");
                if wait_or_stop(&stop, Duration::from_secs(1)).await {
                    return Ok(());
                }
            }
        }
    };
    record(
        &shared.recorder,
        Event::WorkerStarted {
            worker_id: shared.config.worker_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
    )
    .await;
    on_ready(WorkerView { shared: Arc::clone(&shared), started }).await;
    let metrics_server = metrics_listener
        .map(|listener| serve_metrics(listener, WorkerView { shared: Arc::clone(&shared), started }));
    tracing::info!(worker = %shared.config.worker_id, concurrency = shared.config.concurrency, "worker ready");

    let advisories = tokio::spawn(run::watch_max_deliveries(Arc::clone(&shared)));
    let prebuilding = tokio::spawn(environment::prebuild(Arc::clone(&shared)));
    let slots = Arc::new(Semaphore::new(shared.config.concurrency.max(1)));
    let mut running = tokio::task::JoinSet::new();
    let mut routed = tokio::task::JoinSet::new();
    // The shared queue and the tasks routed to this worker (for the
    // long-running containers it owns) share the slots.
    tokio::join!(
        pull_loop(&shared, &shared.jetstream.consumer, &slots, &mut running),
        pull_loop(&shared, &own_consumer, &slots, &mut routed),
    );
    advisories.abort();
    prebuilding.abort();

    // Drain: running tasks get the grace period, then are handed back.
    let drained = tokio::time::timeout(shared.config.shutdown_grace, async {
        while running.join_next().await.is_some() {}
        while routed.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(left = running.len() + routed.len(), "grace period over; handing running tasks back");
        run::abandon_running(&shared);
        while running.join_next().await.is_some() {}
        while routed.join_next().await.is_some() {}
    }
    // Acks and results are published through the client's buffer: flush it.
    let _ = shared.client.flush().await;
    if let Some(server) = metrics_server {
        server.stop().await;
        let _ = std::fs::remove_file(shared.config.data_dir.join(crate::metrics::ADDRESS_FILE));
    }
    if let Err(error) = tokio::task::spawn_blocking({
        let shared = Arc::clone(&shared);
        move || shared.recorder.compact()
    })
    .await
    .map_err(|error| error.to_string())
    .and_then(|result| result.map_err(|error| error.to_string()))
    {
        tracing::warn!(%error, "final event log compaction failed");
    }
    Ok(())
}

/// Starts the metrics endpoint and says where it is: in the log, and in
/// `<data-dir>/metrics.addr` for whoever picked port 0.
fn serve_metrics(
    listener: crate::metrics::MetricsListener,
    view: WorkerView,
) -> crate::metrics::MetricsServer {
    let address = listener.local_addr();
    let file = view.shared.config.data_dir.join(crate::metrics::ADDRESS_FILE);
    let server = listener.serve(view);
    if let Err(error) = std::fs::write(&file, format!("{address}\n")) {
        tracing::warn!(file = %file.display(), %error, "cannot write the metrics endpoint's address");
    }
    tracing::info!(%address, "metrics endpoint listening (GET /metrics)");
    server
}

async fn pull_loop(
    shared: &Arc<Shared>,
    consumer: &async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>,
    slots: &Arc<Semaphore>,
    running: &mut tokio::task::JoinSet<()>,
) {
    let mut stop = shared.stopping.clone();
    let mut backoff = Duration::from_millis(100);
    loop {
        // Fetch only as many tasks as there are free slots.
        let first = tokio::select! {
            biased;
            _ = stop.wait_for(|stopping| *stopping) => return,
            permit = Arc::clone(slots).acquire_owned() => match permit { Ok(permit) => permit, Err(_) => return },
        };
        let mut permits = vec![first];
        while let Ok(permit) = Arc::clone(slots).try_acquire_owned() {
            permits.push(permit);
        }
        // Reap finished handlers so the set does not grow.
        while running.try_join_next().is_some() {}
        // Short-lived pull requests without idle heartbeats: async-nats
        // 0.51's batch stream swallows a heartbeat without arranging to be
        // woken again, so with heartbeats on, a task delivered right after
        // one sits unread until the request's local timer fires and is then
        // dropped (redelivered only after AckWait). A request that expires
        // every few seconds gives the same protection heartbeats would: a
        // subscription that stalled is replaced within seconds.
        let batch = consumer.batch().max_messages(permits.len()).expires(PULL_EXPIRES).messages().await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%error, "fetching tasks failed; retrying");
                drop(permits);
                if wait_or_stop(&shared.stopping, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                // Stopping wins over a task that arrived at the same moment.
                biased;
                _ = stop.wait_for(|stopping| *stopping) => {
                    // Tasks this pull request already received are handed
                    // back at once; any still in flight from the server are
                    // redelivered after AckWait.
                    while let Some(Some(Ok(message))) = batch.next().now_or_never() {
                        let _ = message.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                    }
                    return;
                }
                message = batch.next() => message,
            };
            match message {
                Some(Ok(message)) => {
                    backoff = Duration::from_millis(100);
                    let Some(permit) = permits.pop() else {
                        // More than asked for cannot happen; hand it back.
                        let _ = message.ack_with(async_nats::jetstream::AckKind::Nak(None)).await;
                        continue;
                    };
                    let shared = Arc::clone(shared);
                    running.spawn(async move {
                        run::handle_delivery(&shared, message).await;
                        drop(permit);
                    });
                }
                Some(Err(error)) => {
                    // A server restart, a consumer error: a new pull
                    // request starts over.
                    tracing::debug!(%error, "pull request ended");
                    break;
                }
                None => break,
            }
        }
    }
}

/// Kills and removes what a previous run of this worker left: every
/// container the log says may exist, and any of this worker's naming.
async fn reap_leftovers(engine: &Engine, recorder: &Recorder, worker_id: &str) -> Result<(), WorkerError> {
    let (long_running, mut targets) = {
        let state = recorder.state();
        let long_running: Vec<String> =
            state.long_running.values().map(|entry| entry.container_id.clone()).collect();
        let targets: Vec<(String, Option<String>)> =
            state.containers.iter().map(|(id, entry)| (id.clone(), Some(entry.task_id.clone()))).collect();
        (long_running, targets)
    };
    let prefix = format!("{worker_id}.");
    let existing = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || engine.existing(&prefix))
            .await
            .map_err(|error| WorkerError::Join(error.to_string()))?
    };
    for id in existing {
        if !targets.iter().any(|(known, _)| *known == id) && !long_running.contains(&id) {
            targets.push((id, None));
        }
    }
    for (container_id, task_id) in targets {
        let engine = engine.clone();
        let id = container_id.clone();
        let found = tokio::task::spawn_blocking(move || engine.reap(&id))
            .await
            .map_err(|error| WorkerError::Join(error.to_string()))?
            .map_err(WorkerError::Engine)?;
        tracing::info!(container = %container_id, found, "reaped a container left by a previous run");
        recorder
            .record(Event::ContainerReaped { task_id, container_id, found })
            .await
            .map_err(WorkerError::EventLog)?;
    }
    Ok(())
}

/// Records an event; a log that cannot be written is fatal for the
/// promise of exactly-once, so the process stops rather than run on.
pub(crate) async fn record(recorder: &Recorder, event: Event) -> u64 {
    match recorder.record(event).await {
        Ok(seq) => seq,
        Err(error) => {
            tracing::error!(%error, "cannot append to the event log; stopping the worker");
            eprintln!("quilt: the event log cannot be written ({error}); stopping");
            std::process::exit(70);
        }
    }
}

/// Queues an event ([`Recorder::note`]); a log that refuses it is fatal, as for [`record`].
pub(crate) fn note(recorder: &Recorder, event: Event) {
    if let Err(error) = recorder.note(event) {
        tracing::error!(%error, "cannot append to the event log; stopping the worker");
        eprintln!("quilt: the event log cannot be written ({error}); stopping");
        std::process::exit(70);
    }
}

/// Sleeps `duration`, or less if the worker is told to stop; true when stopping.
pub(crate) async fn wait_or_stop(stop: &watch::Receiver<bool>, duration: Duration) -> bool {
    let mut stop = stop.clone();
    if *stop.borrow() {
        return true;
    }
    let stopped = tokio::select! {
        _ = tokio::time::sleep(duration) => false,
        _ = stop.wait_for(|stopping| *stopping) => true,
    };
    stopped || *stop.borrow()
}

fn crate_error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
