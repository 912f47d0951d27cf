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
