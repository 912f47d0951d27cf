//! A worker's lifecycle events: appended to its redb event log, and
//! mirrored on `quilt.events.<worker_id>.<kind>` for observability.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::result::{ErrorInfo, TaskResult};
use super::schema_version;

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
        result: TaskResult,
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
            Event::ContainerReaped { .. } => "container_reaped",
        }
    }

    /// The task the event is about, if any.
    pub fn task_id(&self) -> Option<&str> {
        match self {
            Event::WorkerStarted { .. } => None,
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
