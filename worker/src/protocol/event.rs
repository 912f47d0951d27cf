//! A worker's lifecycle events: appended to its redb event log, and
//! mirrored on `quilt.events.<worker_id>.<kind>` for observability.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::result::{ErrorInfo, TaskResult};
use super::schema_version;
use super::task::Task;
use crate::engine::RunIdentity;

/// One state transition of a task or container. Events are facts: folding
/// one twice leaves the same state (see `orchestrator::state`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The worker started (after replaying its log).
    WorkerStarted {
        /// Its id.
        worker_id: String,
        /// Quilt's version.
        version: String,
    },
    /// A delivery of a task was fetched from `QUILT_TASKS`.
    TaskClaimed {
        /// The task.
        task_id: String,
        /// Its sequence number in `QUILT_TASKS`.
        stream_seq: u64,
        /// Which delivery this is (1 = the first).
        attempt: u64,
    },
    /// A container is about to be created for a task; recorded first, so a
    /// crash at any later point knows which container to reap.
    ContainerCreating {
        /// The task.
        task_id: String,
        /// The container's id (also its cgroup's name).
        container_id: String,
    },
    /// The container's command was started.
    ContainerStarted {
        /// The task.
        task_id: String,
        /// The container.
        container_id: String,
        /// Its first process, in the worker's pid namespace.
        pid: i32,
    },
    /// The container is gone: exited and removed, or never started.
    ContainerRemoved {
        /// The task.
        task_id: String,
        /// The container.
        container_id: String,
    },
    /// The task's result is durable in the log; from here it is published,
    /// never recomputed.
    ResultStored {
        /// The result.
        result: Box<TaskResult>,
    },
    /// The result is in `QUILT_RESULTS` (the server acknowledged it).
    ResultPublished {
        /// The task.
        task_id: String,
        /// Its sequence in `QUILT_RESULTS`, when this publish stored it.
        result_seq: Option<u64>,
        /// The stream already had a result for this task (a duplicate).
        duplicate: bool,
    },
    /// This worker's result was dropped: another delivery of the task
    /// already published one (this worker lost its lease).
    ResultDiscarded {
        /// The task.
        task_id: String,
        /// Why.
        reason: String,
    },
    /// The task's message was acknowledged (and the server confirmed it).
    TaskAcked {
        /// The task.
        task_id: String,
    },
    /// The task was handed back for another delivery (a NAK): shutdown
    /// before it finished, or a failure worth retrying.
    TaskReleased {
        /// The task.
        task_id: String,
        /// Why.
        reason: String,
    },
    /// The task was routed to the worker owning its long-running container
    /// (published on `quilt.tasks.worker.<to>`) and this delivery acked.
    TaskForwarded {
        /// The task.
        task_id: String,
        /// The owning worker.
        to: String,
    },
    /// The task was moved to `quilt.dlq` after its last allowed delivery.
    DeadLettered {
        /// The task.
        task_id: String,
        /// Deliveries made.
        attempts: u64,
        /// The last failure.
        error: ErrorInfo,
    },
    /// At start-up, a container the log says was live was found (or not)
    /// and removed: its process tree killed, cgroup and directory deleted.
    ContainerReaped {
        /// The task it ran, when known.
        task_id: Option<String>,
        /// The container.
        container_id: String,
        /// Something of it was still there.
        found: bool,
    },
    /// A long-running container is this worker's (its name is registered
    /// to it in `quilt_containers`) and about to be started the first time.
    LongRunningCreated {
        /// Its name.
        name: String,
        /// Its id (cgroup and directory name).
        container_id: String,
        /// The id of the task that created it.
        task_id: String,
        /// The task that created it: image, command, limits and restart
        /// policy of every run.
        task: Box<Task>,
    },
    /// A run of a long-running container is about to start: recorded first,
    /// so that a crash before `long_running_started` never reuses the run's
    /// number (the processes of such a run are killed when the next starts).
    LongRunningStarting {
        /// Its name.
        name: String,
        /// The run.
        run: u32,
    },
    /// A run of a long-running container started.
    LongRunningStarted {
        /// Its name.
        name: String,
        /// The run: number, and the pids and start times of its first
        /// process and shim (what a restarted worker re-adopts by).
        identity: RunIdentity,
        /// When, in milliseconds since the Unix epoch.
        started_at_unix_ms: u64,
    },
    /// A run could not be started (a restart whose image is gone, a
    /// command not found): counts as a failed run.
    LongRunningStartFailed {
        /// Its name.
        name: String,
        /// The run that failed to start.
        run: u32,
        /// Why.
        error: ErrorInfo,
        /// When, in milliseconds since the Unix epoch.
        at_unix_ms: u64,
    },
    /// A run ended, as its shim recorded it (or `lost` when the shim itself
    /// was killed and left no record).
    LongRunningExited {
        /// Its name.
        name: String,
        /// The run.
        run: u32,
        /// Exit code of its first process.
        exit_code: Option<i32>,
        /// Signal that killed it.
        signal: Option<i32>,
        /// No record of the end exists.
        lost: bool,
        /// When, in milliseconds since the Unix epoch.
        exited_at_unix_ms: u64,
    },
    /// A restarted worker found a run still going and took it over.
    LongRunningAdopted {
        /// Its name.
        name: String,
        /// The run.
        run: u32,
    },
    /// A stop was asked for: the container is not restarted until a
    /// long-running task for it starts it again.
    LongRunningStopped {
        /// Its name.
        name: String,
    },
    /// The container was removed: processes, cgroup, files, logs and its
    /// name's registration.
    LongRunningRemoved {
        /// Its name.
        name: String,
    },
    /// A language environment was built and stored.
    EnvironmentBuilt {
        /// Its key.
        key: String,
        /// The image it was built on.
        image: String,
        /// Bytes of its layer.
        size: u64,
        /// How long the build took, milliseconds.
        build_ms: u64,
        /// The task that built it.
        task_id: String,
    },
    /// A language environment's build failed; nothing was stored.
    EnvironmentFailed {
        /// Its key.
        key: String,
        /// The task that asked for it.
        task_id: String,
        /// Why.
        error: ErrorInfo,
    },
    /// Language environments were removed to keep the store within its budget.
    EnvironmentsEvicted {
        /// Their keys.
        keys: Vec<String>,
    },
}

impl Event {
    /// The event's kind: the last token of its subject.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::WorkerStarted { .. } => "worker_started",
            Event::TaskClaimed { .. } => "task_claimed",
            Event::ContainerCreating { .. } => "container_creating",
            Event::ContainerStarted { .. } => "container_started",
            Event::ContainerRemoved { .. } => "container_removed",
            Event::ResultStored { .. } => "result_stored",
            Event::ResultPublished { .. } => "result_published",
            Event::ResultDiscarded { .. } => "result_discarded",
            Event::TaskAcked { .. } => "task_acked",
            Event::TaskReleased { .. } => "task_released",
            Event::DeadLettered { .. } => "dead_lettered",
            Event::TaskForwarded { .. } => "task_forwarded",
            Event::ContainerReaped { .. } => "container_reaped",
            Event::LongRunningCreated { .. } => "long_running_created",
            Event::LongRunningStarting { .. } => "long_running_starting",
            Event::LongRunningStarted { .. } => "long_running_started",
            Event::LongRunningStartFailed { .. } => "long_running_start_failed",
            Event::LongRunningExited { .. } => "long_running_exited",
            Event::LongRunningAdopted { .. } => "long_running_adopted",
            Event::LongRunningStopped { .. } => "long_running_stopped",
            Event::LongRunningRemoved { .. } => "long_running_removed",
            Event::EnvironmentBuilt { .. } => "environment_built",
            Event::EnvironmentFailed { .. } => "environment_failed",
            Event::EnvironmentsEvicted { .. } => "environments_evicted",
        }
    }

    /// The task the event is about, if any.
    pub fn task_id(&self) -> Option<&str> {
        match self {
            Event::WorkerStarted { .. }
            | Event::LongRunningStarting { .. }
            | Event::LongRunningStarted { .. }
            | Event::LongRunningStartFailed { .. }
            | Event::LongRunningExited { .. }
            | Event::LongRunningAdopted { .. }
            | Event::LongRunningStopped { .. }
            | Event::LongRunningRemoved { .. }
            | Event::EnvironmentsEvicted { .. } => None,
            Event::EnvironmentBuilt { task_id, .. } | Event::EnvironmentFailed { task_id, .. } => {
                Some(task_id)
            }
            Event::LongRunningCreated { task_id, .. } => Some(task_id),
            Event::ResultStored { result } => Some(&result.id),
            Event::ContainerReaped { task_id, .. } => task_id.as_deref(),
            Event::TaskClaimed { task_id, .. }
            | Event::ContainerCreating { task_id, .. }
            | Event::ContainerStarted { task_id, .. }
            | Event::ContainerRemoved { task_id, .. }
            | Event::ResultPublished { task_id, .. }
            | Event::ResultDiscarded { task_id, .. }
            | Event::TaskAcked { task_id }
            | Event::TaskReleased { task_id, .. }
            | Event::TaskForwarded { task_id, .. }
            | Event::DeadLettered { task_id, .. } => Some(task_id),
        }
    }
}

/// An event as mirrored on `quilt.events.<worker_id>.<kind>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventMessage {
    /// Message format version.
    #[serde(default = "schema_version")]
    pub schema: u32,
    /// The worker whose log holds the event.
    pub worker_id: String,
    /// Its sequence number in that log.
    pub seq: u64,
    /// When it was appended, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The event.
    pub event: Event,
}
