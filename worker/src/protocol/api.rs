//! Replies of the control API (`quilt.api.<worker_id>.<verb>` and
//! `quilt.api.any.<verb>`, the NATS micro service `quilt`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A container on a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerSummary {
    /// The container's id.
    pub id: String,
    /// The worker it runs on.
    pub worker_id: String,
    /// The task it runs.
    pub task_id: String,
    /// Its first process on the worker's host, once started.
    pub pid: Option<i32>,
    /// A long-running container's name (none for a task's own container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `running` (a task's container, or a long-running one), `exited`
    /// (a long-running container whose command ended), `stopped`.
    pub status: String,
    /// A long-running container: its image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A long-running container: its current (or last) run, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u32>,
    /// A long-running container: how its last run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// A long-running container: the signal that ended its last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// A long-running container: its restart policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<super::RestartPolicy>,
}

/// Log bytes of a long-running container (`containers.logs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogChunkReply {
    /// The bytes, as text (invalid UTF-8 replaced).
    pub data: String,
    /// Offset of the first byte in the container's log (later than asked
    /// when older bytes were rotated away).
    pub start: u64,
    /// Offset to ask for next, to follow the log.
    pub next: u64,
}

/// Where a long-running container lives, as registered in the KV bucket
/// `quilt_containers` under its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerRegistration {
    /// The owning worker.
    pub worker_id: String,
    /// The container's id on that worker.
    pub container_id: String,
    /// sha256 of what defines the container (image, command, env, workdir,
    /// user, limits, network, restart policy): a create with the same name
    /// and fingerprint reuses it, with another is a conflict.
    pub fingerprint: String,
}

/// A worker, as `worker.info` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerInfo {
    /// Its id.
    pub worker_id: String,
    /// Quilt's version.
    pub version: String,
    /// Tasks it runs at once.
    pub concurrency: usize,
    /// Tasks running now.
    pub running: usize,
    /// `v1` or `v2`.
    pub cgroup_version: String,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// The last sequence number of its event log.
    pub event_log_seq: u64,
}

/// An image in a worker's store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageSummary {
    /// Normalised name.
    pub name: String,
    /// Manifest digest.
    pub digest: String,
    /// Size of its layer blobs, bytes.
    pub size: u64,
}

/// Every control API reply: the value, or an error with a stable kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiReply<T> {
    /// The answer.
    Ok(T),
    /// Why there is none: `kind` is `not_found`, `bad_request` or `internal`.
    Error(super::ErrorInfo),
}

/// The body of `containers.stop`, `containers.remove`, `containers.logs`,
/// `containers.exec` and `containers.forget`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerRequest {
    /// The long-running container's name.
    pub name: String,
    /// stop, remove: seconds between SIGTERM and SIGKILL (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_s: Option<f64>,
    /// logs: the first byte wanted (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// logs: the last lines instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<usize>,
    /// logs: most bytes in the reply (at most 262144).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<usize>,
    /// exec: the command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// exec: environment variables.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// exec: working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// exec: `UID[:GID]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// exec: wall-clock limit in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
}
