//! A task's result (on `quilt.results.<id>`) and its live output chunks
//! (on `quilt.output.<id>.stdout|stderr`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema_version;

/// How a task ended, as one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// The command exited with 0.
    Succeeded,
    /// The command exited non-zero or was killed by a signal.
    Failed,
    /// The wall-clock limit passed; the container was killed.
    TimedOut,
    /// The kernel's OOM killer killed a process of the container.
    OomKilled,
    /// The task was refused before anything ran (invalid, or names an image
    /// that does not exist); `error` says which field and why. Not retried.
    Rejected,
    /// Quilt could not run the task (the command is missing from the image,
    /// the image could not be fetched after every attempt, ...); `error`
    /// says what.
    Error,
}

/// Whether a stream was cut at the task's output limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Truncated {
    /// stdout was longer than the limit.
    pub stdout: bool,
    /// stderr was longer than the limit.
    pub stderr: bool,
}

/// Wall-clock milliseconds of a task's phases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResultTimings {
    /// From the publish (the stream's timestamp) to the worker's claim.
    pub queued_ms: f64,
    /// Finding (or pulling) the image and leasing its layers.
    pub image_ms: f64,
    /// From container creation to the command's exec.
    pub start_ms: f64,
    /// From exec to the exit of the command.
    pub run_ms: f64,
    /// From the claim to the result, on the worker.
    pub total_ms: f64,
}

/// Resources the container used, from its cgroup, and which of its limits
/// it ran into. `cpu_throttled_periods`, `cpu_throttled_ns`, `scratch_full`,
/// `shm_full` and `inodes_exhausted` came later: a result without them reads
/// as `null` / `false`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResultUsage {
    /// CPU time of all its processes, nanoseconds.
    pub cpu_ns: Option<u64>,
    /// Peak memory, bytes.
    pub peak_memory_bytes: Option<u64>,
    /// A fork failed on the pids limit.
    pub pids_limit_hit: bool,
    /// CPU quota periods (100 ms each) in which the task was throttled
    /// because it had used up its `cpus` share; 0 without a quota, `null`
    /// where the host does not report it.
    #[serde(default)]
    pub cpu_throttled_periods: Option<u64>,
    /// Total time the CPU quota held the task back, nanoseconds.
    #[serde(default)]
    pub cpu_throttled_ns: Option<u64>,
    /// The in-memory scratch layer (the container's writable root) had no
    /// space left when the task ended: a write failed with ENOSPC.
    #[serde(default)]
    pub scratch_full: bool,
    /// `/dev/shm` had no space left when the task ended.
    #[serde(default)]
    pub shm_full: bool,
    /// The scratch layer or `/dev/shm` had no inode left when the task
    /// ended: creating a file failed with ENOSPC.
    #[serde(default)]
    pub inodes_exhausted: bool,
}

/// Why a task was rejected or could not run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorInfo {
    /// A stable, machine-readable name: `invalid_task`, `payload_too_large`,
    /// `image_not_found`, `command_not_found`, `not_executable`,
    /// `limit_not_allowed`, `network_not_allowed`, `max_deliveries`, ...
    pub kind: String,
    /// For people: what failed, naming the field where there is one.
    pub message: String,
}

/// The result of a task, published once on `quilt.results.<id>` (stream
/// `QUILT_RESULTS`, message id = task id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskResult {
    /// Message format version.
    #[serde(default = "schema_version")]
    pub schema: u32,
    /// The task's id.
    pub id: String,
    /// The worker that ran (or refused) it.
    pub worker_id: String,
    /// The container it ran in, if one was made.
    pub container_id: Option<String>,
    /// How it ended.
    pub status: TaskStatus,
    /// The command's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed the command, when one did.
    pub signal: Option<i32>,
    /// Standard output as text (invalid UTF-8 replaced), at most the output limit.
    pub stdout: String,
    /// Standard error, likewise.
    pub stderr: String,
    /// Which streams were cut at the limit.
    pub truncated: Truncated,
    /// Timings.
    pub timings: ResultTimings,
    /// Resource usage.
    pub usage: ResultUsage,
    /// What went wrong, for `rejected` and `error`.
    pub error: Option<ErrorInfo>,
    /// Which delivery of the task produced this result (1 = the first).
    pub attempt: u64,
    /// For a task with an `environment`: whether its layer was built for
    /// it or found built, and how long the build took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<EnvironmentReport>,
}

/// How a task's environment was had.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentReport {
    /// The environment's key: sha256 of the base image's manifest digest
    /// and the normalised spec.
    pub key: String,
    /// `hit`: it was built already; `miss`: this task built it.
    pub cache: CacheOutcome,
    /// Build time in milliseconds (0 on a hit), or waiting for another
    /// task's build of the same environment.
    pub build_ms: f64,
}

/// Found, or built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CacheOutcome {
    /// Built before.
    Hit,
    /// Built now.
    Miss,
}

impl TaskResult {
    /// A result without a container outcome (a rejection, an error, or a
    /// stand-in): no exit, no output, zero timings and usage.
    pub fn without_outcome(
        id: &str,
        worker_id: &str,
        container_id: Option<String>,
        status: TaskStatus,
        error: Option<ErrorInfo>,
        attempt: u64,
    ) -> TaskResult {
        TaskResult {
            schema: super::SCHEMA_VERSION,
            id: id.to_owned(),
            worker_id: worker_id.to_owned(),
            container_id,
            status,
            exit_code: None,
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            truncated: Truncated::default(),
            timings: ResultTimings::default(),
            usage: ResultUsage::default(),
            error,
            attempt,
            environment: None,
        }
    }
}

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl OutputStream {
    /// The last token of the output subject.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// A piece of a running task's output, published live on
/// `quilt.output.<id>.<stream>` (stream `QUILT_OUTPUT`, kept a short while
/// so a client that connects late can replay it). Chunks are cut on UTF-8
/// character boundaries; the last one of each stream has `eof: true` and is
/// published before the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputChunk {
    /// Message format version.
    #[serde(default = "schema_version")]
    pub schema: u32,
    /// The task's id.
    pub id: String,
    /// Which delivery of the task produced it; a client that sees a higher
    /// attempt than before starts over (the task is being run again).
    pub attempt: u64,
    /// Which stream.
    pub stream: OutputStream,
    /// Byte offset of `data` in the stream, so gaps and repeats are visible.
    pub offset: u64,
    /// The bytes, as text (invalid UTF-8 replaced).
    pub data: String,
    /// The stream ended (the output limit may have cut it: see the result).
    pub eof: bool,
}

/// A task moved to `quilt.dlq` (stream `QUILT_DLQ`): it used up its
/// deliveries. The agent also gets an `error` result for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    /// Message format version.
    #[serde(default = "schema_version")]
    pub schema: u32,
    /// The task's id.
    pub task_id: String,
    /// Its sequence in `QUILT_TASKS`.
    pub stream_seq: u64,
    /// Deliveries made.
    pub attempts: u64,
    /// The worker that gave up on it.
    pub worker_id: String,
    /// The last failure.
    pub error: ErrorInfo,
    /// The subject it was published on.
    pub subject: String,
    /// Its NATS headers (several values of one header joined with ", ").
    pub headers: BTreeMap<String, String>,
    /// The task message as published (invalid UTF-8 replaced).
    pub task: String,
}

/// Progress of a task's preparation, published (core NATS, not stored) on
/// `quilt.progress.<task_id>`: what a terminal shows while an environment
/// builds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    /// Message format version.
    #[serde(default = "schema_version")]
    pub schema: u32,
    /// The task.
    pub task_id: String,
    /// What is being done, e.g. `environment: pip: install (5/6)`.
    pub message: String,
    /// Milliseconds since the preparation began.
    pub elapsed_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result written before the abuse fields existed still reads, with
    /// nothing named; a current one keeps them.
    #[test]
    fn usage_without_the_later_fields_reads_as_nothing_named() {
        let old: ResultUsage =
            serde_json::from_str(r#"{"cpu_ns": 5, "peak_memory_bytes": null, "pids_limit_hit": true}"#)
                .unwrap();
        assert_eq!(
            old,
            ResultUsage { cpu_ns: Some(5), pids_limit_hit: true, ..ResultUsage::default() },
            "{old:?}"
        );
        let current = ResultUsage {
            cpu_throttled_periods: Some(7),
            cpu_throttled_ns: Some(9),
            scratch_full: true,
            shm_full: true,
            inodes_exhausted: true,
            ..old
        };
        let text = serde_json::to_string(&current).unwrap();
        assert_eq!(serde_json::from_str::<ResultUsage>(&text).unwrap(), current, "{text}");
    }
}
