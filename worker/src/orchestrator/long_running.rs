//! Long-running containers of this worker: created (or reused) by name,
//! supervised run after run under their restart policy, exec'd into,
//! stopped, removed, and re-adopted after a restart of the worker.
//!
//! Placement: a name belongs to one worker of the fleet. The worker that
//! creates container N registers `N -> {worker, fingerprint}` in the KV
//! bucket `quilt_containers` with a create (compare-and-set on "absent"),
//! so two workers racing for N cannot both win. A task for N that reaches
//! another worker through `quilt.tasks` is forwarded, unchanged, to
//! `quilt.tasks.worker.<owner>` (message id `<task id>.fwd`, so a retried
//! forward is dropped as a duplicate), and its delivery acked: the owner
//! runs it and publishes the result. A create of N with a different
//! definition (image, command, limits, restart policy: the fingerprint) is
//! refused as `name_conflict`.
//!
//! When the owner is gone for good, tasks forwarded to it wait in its
//! durable consumer (they are not lost, and run if it comes back with its
//! data directory). An operator who retires that worker for good removes
//! its registrations with `quilt rm --forget N` (control API
//! `containers.forget`, refused while the owner answers), after which N can
//! be created elsewhere; tasks still queued for the old owner stay in the
//! stream until it returns or they age out. Quilt never moves a container
//! by itself: its files and processes live on the owner's host. If the old
//! owner does come back, it checks each name at start: one now registered
//! to another worker is removed here; one nobody took is registered again.
//!
//! Runs: the task that creates N ends once N's command has started (status
//! `succeeded`, no exit code). A supervisor task per container then waits
//! for each run's end (recorded by its shim even while the worker is down),
//! records it, and applies the policy: `no` leaves it exited; `on-failure`
//! starts it again after a failure, at most `max_retries` times in a row;
//! `always` starts it again after any end. Before a restart that follows a
//! run shorter than 10 s the supervisor waits 250 ms, doubled for each such
//! run in a row, at most 10 s ([`backoff`]): a crash loop never hot-loops.
//!
//! Worker restart: nothing here is killed when the worker stops. At start,
//! each container the log says is running is adopted by pidfd and start
//! time ([`Engine::adopt`]); a run that ended meanwhile is recorded with
//! the status its shim wrote, and the policy applies as if the worker had
//! watched. Execs that were running when the worker died are killed (their
//! tasks are redelivered and run again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::CreateErrorKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use sha2::Digest;
use tokio::sync::watch;

use crate::broker::subjects;
use crate::engine::{Adoption, LongRunning, RunEnd};
use crate::image::Lease;
use crate::protocol::{
    ContainerRegistration, ContainerSummary, ErrorInfo, Event, RestartPolicy, Task, TaskResult, TaskStatus,
    DEFAULT_MAX_RETRIES,
};

use super::run::{drive, engine_failure, error_info, final_failure, resolve_image_for, task_spec, Failure};
use super::state::LongRunningEntry;
use super::{note, plan, record, Shared};

/// First back-off after a quick exit.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The wait before restarting after `quick_exits` runs in a row that each
/// lasted less than 10 s: none after a longer run, else 250 ms doubled per
/// quick exit, at most [`MAX_BACKOFF`].
pub fn backoff(quick_exits: u32) -> Duration {
    match quick_exits {
        0 => Duration::ZERO,
        n => FIRST_BACKOFF.saturating_mul(1 << (n - 1).min(16)).min(MAX_BACKOFF),
    }
}

/// Whether (and after what wait) the container of `entry` is started again,
/// by its policy, now that its last run ended.
pub fn restart_delay(entry: &LongRunningEntry) -> Option<Duration> {
    if entry.stopped || entry.running.is_some() {
        return None;
    }
    let exit = entry.last_exit?;
    let restart = match entry.task.container.restart.unwrap_or_default() {
        RestartPolicy::No => false,
        RestartPolicy::OnFailure => {
            exit.failed()
                && entry.consecutive_failures
                    <= entry.task.container.max_retries.unwrap_or(DEFAULT_MAX_RETRIES)
        }
        RestartPolicy::Always => true,
    };
    restart.then(|| backoff(entry.quick_exits))
}

/// What defines a container: a create with the same name and fingerprint
/// reuses it.
fn fingerprint(task: &Task) -> String {
    let defining = serde_json::json!({
        "image": task.image,
        "command": task.command,
        "env": task.env,
        "workdir": task.workdir,
        "user": task.user,
        "limits": task.limits,
        "network": task.network,
        "restart": task.container.restart,
        "max_retries": task.container.max_retries,
        "environment": task.environment.as_ref().and_then(|environment| environment.normalize().ok()),
    });
    let digest = sha2::Sha256::digest(defining.to_string().as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}

/// A long-running container this process manages.
pub(crate) struct Managed {
    name: String,
    container_id: String,
    /// The current run, while one is running.
    run: Mutex<Option<Arc<LongRunning>>>,
    /// The image's layers stay leased while the container exists.
    lease: Mutex<Option<Lease>>,
    /// And its environment's layer, if it has one.
    env_lease: Mutex<Option<crate::env::EnvLease>>,
    /// Serialises start, stop and remove of this container.
    operation: tokio::sync::Mutex<()>,
    /// True while a stop or remove is under way: no restart.
    halt: watch::Sender<bool>,
    /// Counts the run ends the supervisor has recorded.
    ends: watch::Sender<u64>,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Managed {
    fn new(name: &str, container_id: &str) -> Arc<Managed> {
        Arc::new(Managed {
            name: name.to_owned(),
            container_id: container_id.to_owned(),
            run: Mutex::new(None),
            lease: Mutex::new(None),
            env_lease: Mutex::new(None),
            operation: tokio::sync::Mutex::new(()),
            halt: watch::Sender::new(false),
            ends: watch::Sender::new(0),
            supervisor: Mutex::new(None),
        })
    }

    fn current(&self) -> Option<Arc<LongRunning>> {
        self.run.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_current(&self, run: Option<Arc<LongRunning>>) {
        *self.run.lock().unwrap_or_else(|e| e.into_inner()) = run;
    }
}

/// The long-running containers of this process, by name.
#[derive(Default)]
pub(crate) struct LongRunningSet {
    containers: Mutex<HashMap<String, Arc<Managed>>>,
}

impl LongRunningSet {
    fn get(&self, name: &str) -> Option<Arc<Managed>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    fn insert(&self, managed: Arc<Managed>) {
        self.containers.lock().unwrap_or_else(|e| e.into_inner()).insert(managed.name.clone(), managed);
    }

    fn remove(&self, name: &str) {
        self.containers.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }
}

/// A control API failure: a stable kind and a message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// `not_found`, `not_running`, `bad_request`, `unavailable` or `internal`.
    pub kind: &'static str,
    /// What happened.
    pub message: String,
}

impl ControlError {
    fn new(kind: &'static str, message: impl Into<String>) -> ControlError {
        ControlError { kind, message: message.into() }
    }
}

fn created_result(shared: &Shared, task_id: &str, attempt: u64, container_id: &str) -> TaskResult {
    let mut result = TaskResult::without_outcome(
        task_id,
        &shared.config.worker_id,
        Some(container_id.to_owned()),
        TaskStatus::Succeeded,
        None,
        attempt,
    );
    result.error = None;
    result
}

/// A task with `"mode": "long_running"`: create container `name`, or reuse
/// it (starting it again if it is not running).
pub(super) async fn create(
    shared: &Arc<Shared>,
    task: &Task,
    task_id: &str,
    attempt: u64,
    name: &str,
    payload: &bytes::Bytes,
) -> Result<TaskResult, Failure> {
    let reject = |kind: &str, message: String| {
        final_failure(shared, task_id, attempt, TaskStatus::Rejected, kind, message)
    };
    let wanted = fingerprint(task);
    let existing = shared.recorder.state().long_running.get(name).cloned();
    if let Some(entry) = existing {
        if fingerprint(&entry.task) != wanted {
            return Err(reject(
                "name_conflict",
                format!(
                    "container {name:?} exists with another definition; remove it or choose another name"
                ),
            ));
        }
        let managed = shared.long_running.get(name).ok_or_else(|| {
            Failure::Retry(error_info("internal", format!("container {name:?} is not managed here")))
        })?;
        let _operation = managed.operation.lock().await;
        if managed.current().is_none() {
            let run = shared.recorder.state().long_running.get(name).map_or(entry.run, |entry| entry.run) + 1;
            managed.halt.send_replace(false);
            start_run(shared, &managed, &entry.task, run).await.map_err(|failure| {
                failure.into_task_failure(shared, task_id, attempt, &managed.container_id)
            })?;
            ensure_supervisor(shared, &managed);
        }
        return Ok(created_result(shared, task_id, attempt, &managed.container_id));
    }

    let container_id = format!("{}.{name}", shared.config.worker_id);
    match register(shared, name, &container_id, &wanted).await {
        Ok(_) => {}
        Err(error) if error.kind() == CreateErrorKind::AlreadyExists => {
            let owner = registration_of(shared, name).await.map_err(Failure::Retry)?;
            match owner {
                // Registered by this worker, unknown to its log: a crash
                // between registering and recording. Carry on.
                Some(owner) if owner.worker_id == shared.config.worker_id => {}
                Some(owner) if owner.fingerprint == wanted => {
                    return Err(forward(shared, task_id, &owner.worker_id, payload).await);
                }
                Some(owner) => {
                    return Err(reject(
                        "name_conflict",
                        format!(
                            "container {name:?} exists on worker {} with another definition; remove it or choose another name",
                            owner.worker_id
                        ),
                    ));
                }
                // Removed meanwhile: the next delivery registers it.
                None => {
                    return Err(Failure::Retry(error_info(
                        "placement",
                        "the name's registration changed; retrying",
                    )))
                }
            }
        }
        Err(error) => return Err(Failure::Retry(error_info("placement", error))),
    }
    record(
        &shared.recorder,
        Event::LongRunningCreated {
            name: name.to_owned(),
            container_id: container_id.clone(),
            task_id: task_id.to_owned(),
            task: Box::new(task.clone()),
        },
    )
    .await;
    let managed = Managed::new(name, &container_id);
    shared.long_running.insert(Arc::clone(&managed));
    let _operation = managed.operation.lock().await;
    match start_run(shared, &managed, task, 1).await {
        Ok(()) => {
            ensure_supervisor(shared, &managed);
            tracing::info!(container = %name, task = %task_id, "long-running container created");
            Ok(created_result(shared, task_id, attempt, &container_id))
        }
        Err(failure) => {
            // A container whose first run cannot start is not kept.
            if let Err(error) = remove_now(shared, &managed).await {
                tracing::warn!(container = %name, %error, "cannot remove a container that failed to start");
            }
            Err(failure.into_task_failure(shared, task_id, attempt, &container_id))
        }
    }
}

/// Registers `name` to this worker, if nobody has it (compare-and-set on absence).
async fn register(
    shared: &Shared,
    name: &str,
    container_id: &str,
    fingerprint: &str,
) -> Result<u64, async_nats::jetstream::kv::CreateError> {
    let registration = ContainerRegistration {
        worker_id: shared.config.worker_id.clone(),
        container_id: container_id.to_owned(),
        fingerprint: fingerprint.to_owned(),
    };
    let value = bytes::Bytes::from(serde_json::to_vec(&registration).unwrap_or_default());
    shared.jetstream.containers.create(name, value).await
}

async fn registration_of(shared: &Shared, name: &str) -> Result<Option<ContainerRegistration>, ErrorInfo> {
    let value =
        shared.jetstream.containers.get(name).await.map_err(|error| error_info("placement", error))?;
    Ok(value.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

/// Publishes the task unchanged to its container's owner and says so.
async fn forward(shared: &Shared, task_id: &str, owner: &str, payload: &bytes::Bytes) -> Failure {
    let publish = Publish::build().payload(payload.clone()).message_id(format!("{task_id}.fwd"));
    let sent = match shared.jetstream.context.send_publish(subjects::tasks_for_worker(owner), publish).await {
        Ok(ack) => ack.await.map(drop).map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match sent {
        Ok(()) => Failure::Forwarded { to: owner.to_owned() },
        Err(error) => Failure::Retry(error_info("forward", error)),
    }
}

/// Why a run did not start.
enum StartFailure {
    /// The image could not be resolved: already the task's answer.
    Task(Failure),
    /// The engine refused or the command failed to start.
    Engine(crate::engine::EngineError),
}

impl StartFailure {
    fn info(&self) -> ErrorInfo {
        match self {
            StartFailure::Task(Failure::Final(result)) => {
                result.error.clone().unwrap_or_else(|| error_info("start", "failed"))
            }
            StartFailure::Task(Failure::Retry(info)) => info.clone(),
            StartFailure::Task(_) => error_info("start", "failed"),
            StartFailure::Engine(error) => error_info(error.kind(), error),
        }
    }

    fn into_task_failure(self, shared: &Shared, task_id: &str, attempt: u64, container_id: &str) -> Failure {
        match self {
            StartFailure::Task(failure) => failure,
            StartFailure::Engine(error) => engine_failure(shared, task_id, attempt, &error, container_id),
        }
    }
}

/// Starts run `run` of `managed` as `task` defines it, and records it (or
/// its failure).
async fn start_run(
    shared: &Arc<Shared>,
    managed: &Managed,
    task: &Task,
    run: u32,
) -> Result<(), StartFailure> {
    record(&shared.recorder, Event::LongRunningStarting { name: managed.name.clone(), run }).await;
    let result = start_run_inner(shared, managed, task, run).await;
    match &result {
        Ok(running) => {
            record(
                &shared.recorder,
                Event::LongRunningStarted {
                    name: managed.name.clone(),
                    identity: running.identity(),
                    started_at_unix_ms: now_unix_ms(),
                },
            )
            .await;
        }
        Err(failure) => {
            tracing::warn!(container = %managed.name, run, error = %failure.info().message, "a run of a long-running container did not start");
            record(
                &shared.recorder,
                Event::LongRunningStartFailed {
                    name: managed.name.clone(),
                    run,
                    error: failure.info(),
                    at_unix_ms: now_unix_ms(),
                },
            )
            .await;
        }
    }
    let running = result?;
    managed.set_current(Some(Arc::new(running)));
    Ok(())
}

async fn start_run_inner(
    shared: &Arc<Shared>,
    managed: &Managed,
    task: &Task,
    run: u32,
) -> Result<LongRunning, StartFailure> {
    let task_id = format!("{}-run-{run}", managed.name);
    let (image, layers, lease) =
        resolve_image_for(shared, &task_id, 0, &task.image).await.map_err(StartFailure::Task)?;
    let mut spec = plan::container_spec(
        &managed.container_id,
        task,
        &image,
        layers,
        &shared.config.limits,
        shared.config.allow_host_network,
    )
    .map_err(|error| StartFailure::Task(Failure::Retry(error_info("invalid_task", error))))?;
    let prepared = super::environment::prepare(shared, task, &task_id, 0, &image, &spec.root.layers)
        .await
        .map_err(StartFailure::Task)?;
    if let Some(prepared) = &prepared {
        prepared.apply(task, &mut spec);
    }
    spec.root.scratch = crate::engine::Scratch::Disk;
    spec.limits.scratch_bytes = shared.config.limits.long_running_disk_bytes;
    // A long-running container has no wall-clock limit; its execs do.
    spec.limits.timeout = None;
    spec.stdin = None;
    let running = shared
        .engine
        .start_long_running(spec, run, &shared.config.long_running)
        .await
        .map_err(StartFailure::Engine)?;
    *managed.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
    *managed.env_lease.lock().unwrap_or_else(|e| e.into_inner()) = prepared.map(|prepared| prepared.lease);
    Ok(running)
}

fn ensure_supervisor(shared: &Arc<Shared>, managed: &Arc<Managed>) {
    let mut supervisor = managed.supervisor.lock().unwrap_or_else(|e| e.into_inner());
    if supervisor.as_ref().is_some_and(|task| !task.is_finished()) {
        return;
    }
    *supervisor = Some(tokio::spawn(supervise(Arc::clone(shared), Arc::clone(managed))));
}

/// Watches `managed` run after run: records each end and restarts by policy.
async fn supervise(shared: Arc<Shared>, managed: Arc<Managed>) {
    let mut halt = managed.halt.subscribe();
    loop {
        if let Some(run) = managed.current() {
            let end = match run.wait().await {
                Ok(end) => end,
                Err(error) => {
                    tracing::error!(container = %managed.name, %error, "cannot wait for a long-running container");
                    return;
                }
            };
            managed.set_current(None);
            record_end(&shared, &managed, run.identity().run, end).await;
        }
        if *halt.borrow() {
            return;
        }
        let Some(entry) = shared.recorder.state().long_running.get(&managed.name).cloned() else {
            return;
        };
        let Some(delay) = restart_delay(&entry) else {
            return;
        };
        tracing::info!(container = %managed.name, run = entry.run + 1, ?delay, "restarting a long-running container");
        let mut stopping = shared.stopping.clone();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = halt.wait_for(|halt| *halt) => return,
            // The next worker applies the policy from the log.
            _ = stopping.wait_for(|stopping| *stopping) => return,
        }
        let _operation = managed.operation.lock().await;
        if *halt.borrow() {
            return;
        }
        // A failed start is recorded as a failed run; the loop decides again.
        let _ = start_run(&shared, &managed, &entry.task, entry.run + 1).await;
    }
}

async fn record_end(shared: &Shared, managed: &Managed, run: u32, end: RunEnd) {
    let event = match end {
        RunEnd::Exited { status, exited_at_unix_ms } => {
            let (exit_code, signal) = match status {
                crate::engine::ExitStatus::Exited(code) => (Some(code), None),
                crate::engine::ExitStatus::Signaled(signal) => (None, Some(signal)),
            };
            Event::LongRunningExited {
                name: managed.name.clone(),
                run,
                exit_code,
                signal,
                lost: false,
                exited_at_unix_ms,
            }
        }
        RunEnd::Lost => Event::LongRunningExited {
            name: managed.name.clone(),
            run,
            exit_code: None,
            signal: None,
            lost: true,
            exited_at_unix_ms: now_unix_ms(),
        },
    };
    tracing::info!(container = %managed.name, run, ?end, "a run of a long-running container ended");
    record(&shared.recorder, event).await;
    managed.ends.send_modify(|ends| *ends += 1);
}

/// A task with `"target": name`: run its command inside the container.
pub(super) async fn exec(
    shared: &Arc<Shared>,
    task: &Task,
    task_id: &str,
    attempt: u64,
    target: &str,
    payload: &bytes::Bytes,
) -> Result<TaskResult, Failure> {
    let final_error = |kind: &str, message: String| {
        final_failure(shared, task_id, attempt, TaskStatus::Error, kind, message)
    };
    let entry = shared.recorder.state().long_running.get(target).cloned();
    let Some(entry) = entry else {
        return match registration_of(shared, target).await.map_err(Failure::Retry)? {
            Some(owner) if owner.worker_id != shared.config.worker_id => {
                Err(forward(shared, task_id, &owner.worker_id, payload).await)
            }
            _ => Err(final_error("container_not_found", format!("no long-running container {target:?}"))),
        };
    };
    let managed = shared.long_running.get(target);
    let Some(running) = managed.as_ref().and_then(|managed| managed.current()) else {
        return Err(final_error("container_not_running", format!("container {target:?} is not running")));
    };
    let mut exec_task = task.clone();
    exec_task.image = entry.task.image.clone();
    let image_started = Instant::now();
    let (image, layers, _lease) = resolve_image_for(shared, task_id, attempt, &exec_task.image).await?;
    let image_ms = image_started.elapsed().as_secs_f64() * 1e3;
    let exec_id = format!("exec-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let spec = task_spec(shared, &exec_id, &exec_task, &image, layers, task_id, attempt)?;
    let container = shared
        .engine
        .create_exec(&running, spec)
        .map_err(|error| engine_failure(shared, task_id, attempt, &error, &entry.container_id))?;
    let mut result = drive(shared, task_id, attempt, container, image_ms, false).await?;
    result.container_id = Some(entry.container_id.clone());
    Ok(result)
}

/// `containers.exec` of the control API: [`exec`] without the queue.
pub(crate) async fn exec_request(
    shared: &Arc<Shared>,
    request: crate::protocol::ContainerRequest,
) -> Result<TaskResult, ControlError> {
    let task_id = format!("api-exec-{}", uuid::Uuid::new_v4().simple());
    let task = Task {
        schema: crate::protocol::SCHEMA_VERSION,
        id: Some(task_id.clone()),
        image: String::new(),
        command: request.command,
        env: request.env,
        workdir: request.workdir,
        user: request.user,
        stdin: None,
        limits: crate::protocol::TaskLimits { timeout_s: request.timeout_s, ..Default::default() },
        network: crate::protocol::Network::None,
        container: crate::protocol::ContainerOptions {
            target: Some(request.name.clone()),
            ..Default::default()
        },
        environment: None,
    };
    let payload = bytes::Bytes::from(serde_json::to_vec(&task).unwrap_or_default());
    let task = crate::protocol::parse_task(&payload)
        .map_err(|error| ControlError::new("bad_request", error.to_string()))?;
    match exec(shared, &task, &task_id, 1, &request.name, &payload).await {
        Ok(result) => Ok(result),
        Err(Failure::Final(result)) => Ok(*result),
        Err(Failure::Retry(info)) => {
            Err(ControlError::new("internal", format!("{}: {}", info.kind, info.message)))
        }
        Err(Failure::Forwarded { to }) => Err(ControlError::new(
            "unavailable",
            format!("container {:?} belongs to worker {to}", request.name),
        )),
        Err(Failure::Abandoned) => Err(ControlError::new("unavailable", "the worker is shutting down")),
    }
}

/// `containers.forget`: deletes the registration of `name` when its owner
/// no longer answers (retired for good), so the name can be created again.
pub(crate) async fn forget(shared: &Arc<Shared>, name: &str) -> Result<(), ControlError> {
    let entry = shared
        .jetstream
        .containers
        .entry(name)
        .await
        .map_err(|error| ControlError::new("unavailable", error.to_string()))?
        .ok_or_else(|| ControlError::new("not_found", format!("no registration of {name:?}")))?;
    let owner: ContainerRegistration = serde_json::from_slice(&entry.value)
        .map_err(|error| ControlError::new("internal", format!("the registration of {name:?}: {error}")))?;
    if owner.worker_id == shared.config.worker_id {
        return Err(ControlError::new(
            "bad_request",
            format!("{name:?} is this worker's: remove it instead"),
        ));
    }
    let ping = shared.client.request(subjects::api(&owner.worker_id, "health"), bytes::Bytes::new());
    if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), ping).await {
        return Err(ControlError::new(
            "bad_request",
            format!("worker {} owns {name:?} and answers: remove it there", owner.worker_id),
        ));
    }
    shared
        .jetstream
        .containers
        .delete_expect_revision(name, Some(entry.revision))
        .await
        .map_err(|error| ControlError::new("unavailable", error.to_string()))?;
    tracing::info!(container = %name, owner = %owner.worker_id, "forgot the registration of a container whose owner is gone");
    Ok(())
}

/// Stops container `name`: SIGTERM, `grace`, then every process killed.
/// It stays stopped (no restart) until a long-running task starts it again.
pub(crate) async fn stop(
    shared: &Arc<Shared>,
    name: &str,
    grace: Duration,
) -> Result<ContainerSummary, ControlError> {
    let managed = shared
        .long_running
        .get(name)
        .ok_or_else(|| ControlError::new("not_found", format!("no container {name:?} here")))?;
    let _operation = managed.operation.lock().await;
    stop_locked(shared, &managed, grace).await?;
    summary(shared, name).ok_or_else(|| ControlError::new("not_found", format!("no container {name:?} here")))
}

async fn stop_locked(
    shared: &Arc<Shared>,
    managed: &Arc<Managed>,
    grace: Duration,
) -> Result<(), ControlError> {
    managed.halt.send_replace(true);
    record(&shared.recorder, Event::LongRunningStopped { name: managed.name.clone() }).await;
    let Some(run) = managed.current() else {
        return Ok(());
    };
    let mut ends = managed.ends.subscribe();
    let seen = *ends.borrow_and_update();
    let internal = |error: crate::engine::EngineError| ControlError::new("internal", error.to_string());
    run.signal(libc::SIGTERM).map_err(internal)?;
    let ended = tokio::time::timeout(grace, ends.wait_for(|count| *count > seen)).await.is_ok();
    if !ended {
        run.kill_all().map_err(internal)?;
        if tokio::time::timeout(Duration::from_secs(10), ends.wait_for(|count| *count > seen)).await.is_err()
        {
            return Err(ControlError::new("internal", "the container did not end after SIGKILL"));
        }
    }
    Ok(())
}

/// Removes container `name`: stops it, deletes its files, logs, records
/// and its name's registration.
pub(crate) async fn remove(shared: &Arc<Shared>, name: &str, grace: Duration) -> Result<(), ControlError> {
    let managed = shared
        .long_running
        .get(name)
        .ok_or_else(|| ControlError::new("not_found", format!("no container {name:?} here")))?;
    let _operation = managed.operation.lock().await;
    stop_locked(shared, &managed, grace).await?;
    remove_now(shared, &managed).await
}

async fn remove_now(shared: &Arc<Shared>, managed: &Arc<Managed>) -> Result<(), ControlError> {
    managed.halt.send_replace(true);
    if let Some(run) = managed.current() {
        let _ = run.kill_all();
    }
    if let Some(task) = managed.supervisor.lock().unwrap_or_else(|e| e.into_inner()).take() {
        task.abort();
    }
    let engine = shared.engine.clone();
    let id = managed.container_id.clone();
    tokio::task::spawn_blocking(move || engine.reap(&id))
        .await
        .map_err(|error| ControlError::new("internal", error.to_string()))?
        .map_err(|error| ControlError::new("internal", error.to_string()))?;
    managed.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
    // Only our own registration is deleted.
    if let Ok(Some(entry)) = shared.jetstream.containers.entry(&managed.name).await {
        let ours = serde_json::from_slice::<ContainerRegistration>(&entry.value)
            .is_ok_and(|owner| owner.worker_id == shared.config.worker_id);
        if ours {
            if let Err(error) =
                shared.jetstream.containers.delete_expect_revision(&managed.name, Some(entry.revision)).await
            {
                tracing::warn!(container = %managed.name, %error, "cannot delete the name's registration");
            }
        }
    }
    record(&shared.recorder, Event::LongRunningRemoved { name: managed.name.clone() }).await;
    shared.long_running.remove(&managed.name);
    Ok(())
}

/// The log of container `name` from byte `offset` (at most `max_bytes`),
/// or its last `tail` lines.
pub(crate) fn logs(
    shared: &Shared,
    name: &str,
    offset: Option<u64>,
    tail: Option<usize>,
    max_bytes: usize,
) -> Result<crate::shim::LogChunk, ControlError> {
    let entry = shared
        .recorder
        .state()
        .long_running
        .get(name)
        .cloned()
        .ok_or_else(|| ControlError::new("not_found", format!("no container {name:?} here")))?;
    let dir = shared.engine.logs_dir(&entry.container_id);
    let read = match (tail, offset) {
        (Some(lines), _) => crate::shim::tail(&dir, lines, max_bytes),
        (None, offset) => crate::shim::read_from(&dir, offset.unwrap_or(0), max_bytes),
    };
    read.map_err(|error| ControlError::new("internal", format!("reading the log of {name:?}: {error}")))
}

/// Summaries of this worker's long-running containers.
pub(crate) fn summaries(shared: &Shared) -> Vec<ContainerSummary> {
    let state = shared.recorder.state();
    state.long_running.keys().filter_map(|name| summary_of(shared, &state.long_running, name)).collect()
}

/// The summary of container `name`, if this worker has it.
pub(crate) fn summary(shared: &Shared, name: &str) -> Option<ContainerSummary> {
    summary_of(shared, &shared.recorder.state().long_running, name)
}

fn summary_of(
    shared: &Shared,
    containers: &std::collections::BTreeMap<String, LongRunningEntry>,
    name: &str,
) -> Option<ContainerSummary> {
    let entry = containers.get(name)?;
    let status = if entry.running.is_some() {
        "running"
    } else if entry.stopped {
        "stopped"
    } else {
        "exited"
    };
    Some(ContainerSummary {
        id: entry.container_id.clone(),
        worker_id: shared.config.worker_id.clone(),
        task_id: entry.created_by.clone(),
        pid: entry.running.map(|identity| identity.init.pid),
        name: Some(name.to_owned()),
        status: status.to_owned(),
        image: Some(entry.task.image.clone()),
        run: Some(entry.run),
        exit_code: entry.last_exit.and_then(|exit| exit.exit_code),
        signal: entry.last_exit.and_then(|exit| exit.signal),
        restart: Some(entry.task.container.restart.unwrap_or_default()),
    })
}

/// At start: takes over every long-running container the log knows of.
/// Runs still going are adopted; runs that ended meanwhile are recorded
/// with the status their shim wrote; the policy then applies.
pub(crate) async fn adopt_all(shared: &Arc<Shared>) {
    let entries: Vec<(String, LongRunningEntry)> = shared
        .recorder
        .state()
        .long_running
        .iter()
        .map(|(name, entry)| (name.clone(), entry.clone()))
        .collect();
    for (name, entry) in entries {
        let managed = Managed::new(&name, &entry.container_id);
        shared.long_running.insert(Arc::clone(&managed));
        if let Some(identity) = entry.running {
            match shared.engine.adopt(&entry.container_id, &identity) {
                Ok(Adoption::Running(running)) => {
                    tracing::info!(container = %name, run = identity.run, pid = identity.init.pid, "adopted a running long-running container");
                    note(
                        &shared.recorder,
                        Event::LongRunningAdopted { name: name.clone(), run: identity.run },
                    );
                    let running = Arc::new(running);
                    kill_stale_execs(shared, &entry.container_id);
                    managed.set_current(Some(running));
                }
                Ok(Adoption::Ended(end)) => record_end(shared, &managed, identity.run, end).await,
                Err(error) => {
                    tracing::warn!(container = %name, %error, "cannot adopt a long-running container; recording it lost");
                    record_end(shared, &managed, identity.run, RunEnd::Lost).await;
                }
            }
        }
        if !still_ours(shared, &name, &entry).await {
            // The supervisor records the end of the run that the stop kills.
            ensure_supervisor(shared, &managed);
            let _operation = managed.operation.lock().await;
            if let Err(error) = stop_locked(shared, &managed, Duration::ZERO).await {
                tracing::warn!(container = %name, %error, "stopping a container whose name went to another worker");
            }
            // Removed even if the stop said otherwise: removal kills again.
            if let Err(error) = remove_now(shared, &managed).await {
                tracing::warn!(container = %name, %error, "cannot remove a container whose name went to another worker");
            }
            continue;
        }
        // The image, and its environment's layer, stay leased while the
        // container exists (eviction must not take a layer it is built on).
        if let Ok((image, _, lease)) = resolve_image_for(shared, &name, 0, &entry.task.image).await {
            *managed.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
            let normal = entry.task.environment.as_ref().and_then(|environment| environment.normalize().ok());
            if let Some(normal) = normal.filter(|normal| !normal.is_empty()) {
                let key = crate::env::key(&image.manifest_digest, &normal);
                if let Ok(Some((_, env_lease))) = shared.environments.lease(&key) {
                    *managed.env_lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(env_lease);
                }
            }
        }
        if !entry.stopped {
            ensure_supervisor(shared, &managed);
        }
    }
}

/// Whether container `name` is still this worker's at start-up. A name
/// whose registration is gone (forgotten while this worker was away, and
/// not taken) is registered again. A name registered to another worker was
/// forgotten (`containers.forget`: this worker was declared gone for good)
/// and created there: this copy is removed. When the bucket cannot be read
/// the container is kept.
async fn still_ours(shared: &Shared, name: &str, entry: &LongRunningEntry) -> bool {
    let owner = match registration_of(shared, name).await {
        Ok(owner) => owner,
        Err(error) => {
            tracing::warn!(container = %name, error = %error.message, "cannot check the name's registration; keeping the container");
            return true;
        }
    };
    match owner {
        Some(owner) if owner.worker_id == shared.config.worker_id => true,
        Some(owner) => {
            tracing::warn!(container = %name, owner = %owner.worker_id, "this container's name was forgotten and now belongs to another worker; removing this copy");
            false
        }
        None => {
            match register(shared, name, &entry.container_id, &fingerprint(&entry.task)).await {
                Ok(_) => {
                    tracing::info!(container = %name, "registered a container whose registration was gone");
                    true
                }
                // Taken between the read and the create: by another worker.
                Err(error) if error.kind() == CreateErrorKind::AlreadyExists => {
                    Box::pin(still_ours(shared, name, entry)).await
                }
                Err(error) => {
                    tracing::warn!(container = %name, %error, "cannot register the container again; keeping it");
                    true
                }
            }
        }
    }
}

/// Execs left running by a previous worker process: their tasks are
/// redelivered, so the processes are killed.
fn kill_stale_execs(shared: &Shared, container_id: &str) {
    match shared.engine.reap_execs(container_id) {
        Ok(0) => {}
        Ok(count) => {
            tracing::info!(container = %container_id, count, "killed execs left by the previous worker")
        }
        Err(error) => tracing::warn!(container = %container_id, %error, "cannot kill leftover execs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ProcessIdentity, RunIdentity};
    use crate::orchestrator::state::RunExit;
    use crate::protocol::parse_task;

    fn entry(policy: &str, last_exit_code: Option<i32>, failures: u32, quick: u32) -> LongRunningEntry {
        let task = parse_task(
            format!(r#"{{"image": "b", "container": {{"mode": "long_running", "name": "n", "restart": "{policy}"}}}}"#)
                .as_bytes(),
        )
        .unwrap();
        LongRunningEntry {
            container_id: "w.n".into(),
            task,
            created_by: "t".into(),
            run: 1,
            running: None,
            started_at_unix_ms: 0,
            last_exit: Some(RunExit {
                run: 1,
                exit_code: last_exit_code,
                signal: None,
                lost: false,
                at_unix_ms: 1,
            }),
            consecutive_failures: failures,
            quick_exits: quick,
            stopped: false,
        }
    }

    #[test]
    fn backoff_doubles_from_250_ms_to_10_s_and_is_zero_after_a_long_run() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(1));
        assert_eq!(backoff(6), Duration::from_secs(8));
        assert_eq!(backoff(7), MAX_BACKOFF);
        assert_eq!(backoff(1000), MAX_BACKOFF);
    }

    #[test]
    fn policies_decide_restarts() {
        assert_eq!(restart_delay(&entry("no", Some(1), 1, 1)), None);
        assert_eq!(restart_delay(&entry("on-failure", Some(0), 0, 1)), None);
        assert_eq!(restart_delay(&entry("on-failure", Some(1), 1, 1)), Some(backoff(1)));
        assert_eq!(restart_delay(&entry("on-failure", Some(1), DEFAULT_MAX_RETRIES, 2)), Some(backoff(2)));
        assert_eq!(restart_delay(&entry("on-failure", Some(1), DEFAULT_MAX_RETRIES + 1, 3)), None);
        assert_eq!(restart_delay(&entry("always", Some(0), 0, 0)), Some(Duration::ZERO));
        assert_eq!(restart_delay(&entry("always", None, 3, 3)), Some(backoff(3)));
        let mut stopped = entry("always", Some(0), 0, 0);
        stopped.stopped = true;
        assert_eq!(restart_delay(&stopped), None);
        let mut running = entry("always", Some(0), 0, 0);
        running.running = Some(RunIdentity {
            run: 2,
            init: ProcessIdentity { pid: 1, start_ticks: 1 },
            shim: ProcessIdentity { pid: 2, start_ticks: 2 },
        });
        assert_eq!(restart_delay(&running), None);
    }

    #[test]
    fn fingerprints_change_with_the_definition_only() {
        let a = parse_task(br#"{"id": "a", "image": "b", "command": ["x"], "container": {"mode": "long_running", "name": "n"}}"#).unwrap();
        let b = parse_task(br#"{"id": "b", "image": "b", "command": ["x"], "container": {"mode": "long_running", "name": "n"}}"#).unwrap();
        let c = parse_task(br#"{"id": "c", "image": "b", "command": ["y"], "container": {"mode": "long_running", "name": "n"}}"#).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }
}
