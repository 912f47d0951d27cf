//! The messages Quilt exchanges over NATS: a task, its result, its live
//! output and the worker's lifecycle events, as serde types.
//!
//! These types *are* the wire protocol: the JSON Schema files in `schemas/`
//! are generated from them (`quilt schema`, checked by a test that fails when
//! they drift), and README.md's protocol section describes them. Every type
//! refuses unknown fields, so a misspelt field is an error naming it rather
//! than a setting silently ignored. Every message carries `schema`, the
//! version of its format; this build writes and reads [`SCHEMA_VERSION`].
//!
//! This module knows nothing of NATS connections, containers or the event
//! log; the subjects the messages travel on are in `broker::subjects`.

mod api;
mod environment;
mod event;
mod result;
mod task;

pub use api::{
    ApiReply, ContainerRegistration, ContainerRequest, ContainerSummary, ImageSummary, LogChunkReply,
    WorkerInfo,
};
pub use environment::{
    check_apk, check_apt, check_npm, check_pip, Environment, NormalizedEnvironment, Runtime,
    MAX_MANIFEST_BYTES, MAX_PACKAGES,
};
pub use event::{Event, EventMessage};
pub use result::{
    CacheOutcome, DeadLetter, EnvironmentReport, ErrorInfo, OutputChunk, OutputStream, Progress,
    ResultTimings, ResultUsage, TaskResult, TaskStatus, Truncated,
};
pub use task::{
    parse_task, task_id_from_bytes, validate_container_name, validate_task_id, ContainerMode,
    ContainerOptions, Network, Placement, RestartPolicy, Task, TaskError, TaskLimits, DEFAULT_MAX_RETRIES,
    MAX_TASK_ID_LEN,
};

/// The version of the message formats this build writes and accepts.
pub const SCHEMA_VERSION: u32 = 1;

fn schema_version() -> u32 {
    SCHEMA_VERSION
}

/// The schema files as written to `schemas/`: (file name, pretty JSON text).
pub fn schema_files() -> Vec<(&'static str, String)> {
    schemas()
        .into_iter()
        .map(|(name, schema)| {
            let mut text = serde_json::to_string_pretty(&schema).expect("a schema serializes");
            text.push('\n');
            (name, text)
        })
        .collect()
}

/// Every message type with a schema file, as (file name, schema).
pub fn schemas() -> Vec<(&'static str, schemars::Schema)> {
    vec![
        ("task.json", schemars::schema_for!(Task)),
        ("result.json", schemars::schema_for!(TaskResult)),
        ("output.json", schemars::schema_for!(OutputChunk)),
        ("event.json", schemars::schema_for!(EventMessage)),
        ("dead_letter.json", schemars::schema_for!(DeadLetter)),
        ("progress.json", schemars::schema_for!(Progress)),
        ("api/containers.list.json", schemars::schema_for!(ApiReply<Vec<ContainerSummary>>)),
        ("api/containers.inspect.json", schemars::schema_for!(ApiReply<ContainerSummary>)),
        ("api/containers.stop.json", schemars::schema_for!(ApiReply<ContainerSummary>)),
        ("api/containers.remove.json", schemars::schema_for!(ApiReply<String>)),
        ("api/containers.logs.json", schemars::schema_for!(ApiReply<LogChunkReply>)),
        ("api/containers.exec.json", schemars::schema_for!(ApiReply<TaskResult>)),
        ("api/containers.forget.json", schemars::schema_for!(ApiReply<String>)),
        ("api/container_request.json", schemars::schema_for!(ContainerRequest)),
        ("container_registration.json", schemars::schema_for!(ContainerRegistration)),
        ("api/images.list.json", schemars::schema_for!(ApiReply<Vec<ImageSummary>>)),
        ("api/worker.info.json", schemars::schema_for!(ApiReply<WorkerInfo>)),
        ("api/health.json", schemars::schema_for!(ApiReply<String>)),
    ]
}

#[cfg(test)]
mod tests {
    /// schemas/ is generated from these types (`quilt schema --out schemas`):
    /// a change to a message type without regenerating fails here.
    #[test]
    fn schema_files_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        for (name, expected) in super::schema_files() {
            let path = dir.join(name);
            let actual = std::fs::read_to_string(&path).unwrap_or_else(|error| {
                panic!("{}: {error}; run `quilt schema --out schemas`", path.display())
            });
            assert!(
                actual == expected,
                "{} differs from the type it documents; run `cargo run -- schema --out schemas`",
                path.display()
            );
        }
    }
}
