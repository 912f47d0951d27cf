//! A task: what an agent publishes on `quilt.tasks`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{schema_version, SCHEMA_VERSION};

/// Longest task id: ids are NATS subject tokens (`quilt.results.<id>`) and
/// message ids, so they stay short and plain.
pub const MAX_TASK_ID_LEN: usize = 128;

/// A task as published on `quilt.tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Message format version; absent means the current one (1).
    #[serde(default = "schema_version")]
    pub schema: u32,
    /// The task's id: 1 to 128 of `A-Z a-z 0-9 _ -`. Chosen by the client so
    /// it can subscribe to `quilt.results.<id>` before publishing; publish
    /// with the NATS header `Nats-Msg-Id` set to it so a retried publish is
    /// dropped as a duplicate. Absent: the worker names the task
    /// `seq-<stream sequence>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The image, by name (`docker.io/library/alpine:3.20`, `busybox`) or
    /// digest; taken from the worker's image store, pulled when missing.
    /// Required, except for a task run inside a long-running container
    /// (`container.target`), which uses that container's image.
    #[serde(default)]
    pub image: String,
    /// The command and its arguments; empty means the image's Entrypoint/Cmd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Environment variables, added to (and overriding) the image's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the container (absolute); default the image's, else `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// `UID[:GID]` to run as; default the image's user, else 0 (root inside
    /// the container, with the default capability set only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Text fed to the command's standard input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Resource limits; each is clamped to the worker's maximum, and a
    /// missing one takes the worker's default.
    #[serde(default)]
    pub limits: TaskLimits,
    /// Network: `none` (default: a namespace with only loopback) or `host`
    /// (only where the worker's operator allows it).
    #[serde(default)]
    pub network: Network,
    /// Where the task runs: a fresh container removed afterwards (the
    /// default, `{"mode": "ephemeral"}`), a named long-running container
    /// created or reused (`{"mode": "long_running", "name": "n", "restart":
    /// "on-failure"}`), or inside a running long-running container
    /// (`{"target": "n"}`).
    #[serde(default)]
    pub container: ContainerOptions,
    /// Packages the task needs on top of its image (apt or apk, pip, npm,
    /// a runtime): built once into an environment layer, cached by content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<super::environment::Environment>,
}

/// A task's resource limits. All optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskLimits {
    /// Memory limit in MiB (the in-memory scratch layer counts toward it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// CPU limit in CPUs, e.g. 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Most processes and threads at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Wall-clock limit in seconds; the whole container is killed when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// Bytes kept of each of stdout and stderr; the rest is counted and dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
}

/// A task's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// A fresh network namespace with only loopback.
    #[default]
    None,
    /// The worker's network (opt-in by the operator).
    Host,
}

/// Where a task runs (see [`Task::container`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerOptions {
    /// `ephemeral` (the default) or `long_running`.
    #[serde(default)]
    pub mode: ContainerMode,
    /// `long_running`: the container's name, unique across the fleet: 1 to
    /// 61 of `A-Z a-z 0-9 _ . -`, starting and ending with a letter or
    /// digit, without `..`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `long_running`: when its command ends, `no` (default), `on-failure`
    /// or `always` start it again, after a back-off (see the README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// `on-failure`: restarts allowed after consecutive failures (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Run the task's command inside this running long-running container,
    /// joining its namespaces and cgroup; `mode`, `name`, `restart` and
    /// `image` do not apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// How the task's container lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ContainerMode {
    /// A fresh container for this task, removed after it.
    #[default]
    Ephemeral,
    /// A named container that keeps running after the task (which ends
    /// once the container has started), until stopped or removed.
    LongRunning,
}

/// What happens when a long-running container's command ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestartPolicy {
    /// Leave it stopped.
    #[default]
    #[serde(rename = "no")]
    No,
    /// Start it again when it failed (non-zero exit, a signal, lost), up to
    /// `max_retries` times in a row.
    #[serde(rename = "on-failure")]
    OnFailure,
    /// Start it again whenever it ends, unless it was stopped.
    #[serde(rename = "always")]
    Always,
}

/// Default of `max_retries` for `on-failure`.
pub const DEFAULT_MAX_RETRIES: u32 = 5;

/// Where a checked task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A fresh container.
    Ephemeral,
    /// Create (or reuse) long-running container `name`.
    LongRunning {
        /// Its name.
        name: String,
        /// Its restart policy.
        restart: RestartPolicy,
        /// Restarts allowed after consecutive failures (`on-failure`).
        max_retries: u32,
    },
    /// Exec into running container `target`.
    Exec {
        /// The container's name.
        target: String,
    },
}

/// Checks a long-running container's name (see [`ContainerOptions::name`]).
pub fn validate_container_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    // It is also a key of the KV bucket, which refuses a key that ends in
    // a dot or holds an empty token.
    let ok = !bytes.is_empty()
        && bytes.len() <= 61
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..")
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a container name: 1 to 61 of A-Z a-z 0-9 _ . -, starting and ending with a letter or digit, no \"..\""
        ))
    }
}

/// A task that cannot run as given: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TaskError {
    /// The field, as a path (`limits.memory_mb`), or `.` for the whole message.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl TaskError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> TaskError {
        TaskError { field: field.into(), message: message.into() }
    }
}

/// Parses a task from its JSON bytes: a wrong type, an unknown or missing
/// field is an error naming the field; then checks what the types cannot
/// say (id alphabet, env names, paths).
pub fn parse_task(bytes: &[u8]) -> Result<Task, TaskError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let task: Task = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        // serde_json appends " at line L column C"; the path says where.
        let message = inner.to_string();
        let message = match message.rfind(" at line ") {
            Some(at) => message[..at].to_owned(),
            None => message,
        };
        TaskError::new(if path.is_empty() { ".".to_owned() } else { path }, message)
    })?;
    deserializer.end().map_err(|_| TaskError::new(".", "trailing characters after the task"))?;
    task.check()?;
    Ok(task)
}

impl Task {
    fn check(&self) -> Result<(), TaskError> {
        if self.schema != SCHEMA_VERSION {
            return Err(TaskError::new(
                "schema",
                format!(
                    "version {} is not supported; this worker reads version {SCHEMA_VERSION}",
                    self.schema
                ),
            ));
        }
        if let Some(id) = &self.id {
            validate_task_id(id)?;
        }
        self.check_container()?;
        if let Some(environment) = &self.environment {
            environment.normalize()?;
        }
        let exec = self.container.target.is_some();
        if (self.image.is_empty() && !exec)
            || self.image.len() > 1024
            || self.image.contains(char::is_control)
        {
            return Err(TaskError::new("image", "must be an image name or digest"));
        }
        for (index, argument) in self.command.iter().enumerate() {
            if argument.contains('\0') {
                return Err(TaskError::new(format!("command[{index}]"), "contains a NUL character"));
            }
        }
        if self.command.first().is_some_and(String::is_empty) {
            return Err(TaskError::new("command[0]", "the program name is empty"));
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(TaskError::new(
                    format!("env.{name}"),
                    "a variable name must be non-empty, without '=' or NUL",
                ));
            }
            if value.contains('\0') {
                return Err(TaskError::new(format!("env.{name}"), "the value contains a NUL character"));
            }
        }
        if let Some(workdir) = &self.workdir {
            if !workdir.starts_with('/')
                || workdir.contains('\0')
                || workdir.split('/').any(|part| part == "..")
            {
                return Err(TaskError::new("workdir", "must be an absolute path without '..'"));
            }
        }
        if let Some(user) = &self.user {
            let valid = |part: &str| !part.is_empty() && part.parse::<u32>().is_ok();
            let ok = match user.split_once(':') {
                Some((uid, gid)) => valid(uid) && valid(gid),
                None => valid(user),
            };
            if !ok {
                return Err(TaskError::new("user", "must be UID or UID:GID (numbers)"));
            }
        }
        if let Some(cpus) = self.limits.cpus {
            if !cpus.is_finite() || cpus <= 0.0 {
                return Err(TaskError::new("limits.cpus", "must be a positive number"));
            }
            if !reads_back_exactly(cpus) {
                return Err(TaskError::new("limits.cpus", INEXACT_NUMBER));
            }
        }
        if let Some(timeout) = self.limits.timeout_s {
            if !timeout.is_finite() || timeout <= 0.0 {
                return Err(TaskError::new("limits.timeout_s", "must be a positive number of seconds"));
            }
            if !reads_back_exactly(timeout) {
                return Err(TaskError::new("limits.timeout_s", INEXACT_NUMBER));
            }
        }
        for (field, value) in [
            ("limits.memory_mb", self.limits.memory_mb),
            ("limits.pids", self.limits.pids),
            ("limits.output_bytes", self.limits.output_bytes),
        ] {
            if value == Some(0) {
                return Err(TaskError::new(field, "must be positive"));
            }
        }
        Ok(())
    }
}

impl Task {
    fn check_container(&self) -> Result<(), TaskError> {
        let options = &self.container;
        if let Some(target) = &options.target {
            validate_container_name(target).map_err(|message| TaskError::new("container.target", message))?;
            if self.environment.is_some() {
                return Err(TaskError::new(
                    "environment",
                    "a command run in an existing container (container.target) uses that container's environment",
                ));
            }
            if options.mode != ContainerMode::Ephemeral
                || options.name.is_some()
                || options.restart.is_some()
                || options.max_retries.is_some()
            {
                return Err(TaskError::new(
                    "container.target",
                    "runs in an existing container: mode, name, restart and max_retries do not apply",
                ));
            }
            return Ok(());
        }
        match options.mode {
            ContainerMode::Ephemeral => {
                for (field, given) in [
                    ("container.name", options.name.is_some()),
                    ("container.restart", options.restart.is_some()),
                    ("container.max_retries", options.max_retries.is_some()),
                ] {
                    if given {
                        return Err(TaskError::new(field, "only for \"mode\": \"long_running\""));
                    }
                }
            }
            ContainerMode::LongRunning => {
                let name = options.name.as_deref().ok_or_else(|| {
                    TaskError::new("container.name", "a long-running container needs a name")
                })?;
                validate_container_name(name).map_err(|message| TaskError::new("container.name", message))?;
                if options.max_retries.is_some() && options.restart != Some(RestartPolicy::OnFailure) {
                    return Err(TaskError::new(
                        "container.max_retries",
                        "only with \"restart\": \"on-failure\"",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Where the (checked) task runs.
    pub fn placement(&self) -> Placement {
        let options = &self.container;
        if let Some(target) = &options.target {
            return Placement::Exec { target: target.clone() };
        }
        match (options.mode, &options.name) {
            (ContainerMode::LongRunning, Some(name)) => Placement::LongRunning {
                name: name.clone(),
                restart: options.restart.unwrap_or_default(),
                max_retries: options.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
            },
            _ => Placement::Ephemeral,
        }
    }
}

const INEXACT_NUMBER: &str =
    "must be a number JSON reads back exactly: at most 15 significant digits, exponent within ±22";

/// True when `value` written as JSON reads back as the same number.
/// serde_json without its `float_roundtrip` feature reads some numbers one
/// bit off (`1e-25` becomes 9.999999999999999e-26, which prints and reads
/// back as 1e-25), so a task republished by the CLI or by a long-running
/// container's restart would change. Found by the `task_decoder` fuzz target.
fn reads_back_exactly(value: f64) -> bool {
    serde_json::to_string(&value).ok().and_then(|text| serde_json::from_str::<f64>(&text).ok()) == Some(value)
}

/// A task id must be a plain NATS subject token.
pub fn validate_task_id(id: &str) -> Result<(), TaskError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_TASK_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TaskError::new("id", format!("must be 1 to {MAX_TASK_ID_LEN} of A-Z a-z 0-9 _ -")))
    }
}

/// The task id of a message that may not parse as a task: its `id` field
/// when the bytes are a JSON object with a valid one.
pub fn task_id_from_bytes(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct JustId {
        id: Option<serde_json::Value>,
    }
    let id = serde_json::from_slice::<JustId>(bytes).ok()?.id?;
    let id = id.as_str()?;
    validate_task_id(id).ok()?;
    Some(id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_task_takes_defaults() {
        let task = parse_task(br#"{"image": "busybox", "command": ["true"]}"#).unwrap();
        assert_eq!(task.schema, 1);
        assert_eq!(task.id, None);
        assert_eq!(task.network, Network::None);
        assert_eq!(task.placement(), Placement::Ephemeral);
        assert_eq!(task.limits, TaskLimits::default());
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"image": "b", "colour": 1}"#, "colour"),
            (br#"{"image": "b", "limits": {"memory_mb": "lots"}}"#, "limits.memory_mb"),
            (br#"{"image": "b", "limits": {"memroy_mb": 1}}"#, "limits.memroy_mb"),
            (br#"{"image": 5}"#, "image"),
            (br#"{"command": ["x"]}"#, "image"),
            (br#"{"image": "b", "id": "a b"}"#, "id"),
            (br#"{"image": "b", "command": ["sh", "-c", 3]}"#, "command[2]"),
            (br#"{"image": "b", "env": {"A=B": "x"}}"#, "env.A=B"),
            (br#"{"image": "b", "limits": {"cpus": -1}}"#, "limits.cpus"),
            (br#"{"image": "b", "limits": {"pids": 0}}"#, "limits.pids"),
            (br#"{"image": "b", "workdir": "rel"}"#, "workdir"),
            (br#"{"image": "b", "container": {"mode": "long_running"}}"#, "container.name"),
            (br#"{"image": "b", "container": {"mode": "forever", "name": "n"}}"#, "container.mode"),
            (br#"{"image": "b", "container": {"mode": "long_running", "name": "a/b"}}"#, "container.name"),
            (br#"{"image": "b", "container": {"mode": "long_running", "name": "db."}}"#, "container.name"),
            (br#"{"image": "b", "container": {"mode": "long_running", "name": "a..b"}}"#, "container.name"),
            (br#"{"image": "b", "container": {"name": "n"}}"#, "container.name"),
            (br#"{"container": {"target": "n", "restart": "always"}}"#, "container.target"),
            (br#"{"image": "b", "container": {"mode": "long_running", "name": "n", "max_retries": 2}}"#, "container.max_retries"),
            (br#"{"image": "b", "container": {"mode": "long_running", "name": "n", "restart": "sometimes"}}"#, "container.restart"),
            (br#"{"image": "b", "schema": 2}"#, "schema"),
            (br#"{"image": "b"} x"#, "."),
            (b"not json", "."),
        ];
        for (bytes, field) in cases {
            let error = parse_task(bytes).unwrap_err();
            assert!(
                error.field == *field || error.field.starts_with(&format!("{field}.")),
                "{}: got field {:?} ({})",
                String::from_utf8_lossy(bytes),
                error.field,
                error.message
            );
        }
        let error = parse_task(br#"{"image": "b", "colour": 1}"#).unwrap_err();
        assert!(error.message.contains("unknown field `colour`"), "{error}");
    }

    /// Found by the `task_decoder` fuzz target: this task parsed, but
    /// serialising and parsing it again changed `cpus` by one bit.
    #[test]
    fn accepted_float_limits_survive_serialise_and_parse() {
        let error = parse_task(br#"{"image": "c", "limits": {"cpus": 1e-25}}"#).unwrap_err();
        assert_eq!((error.field.as_str(), error.message.as_str()), ("limits.cpus", INEXACT_NUMBER));
        let error = parse_task(br#"{"image": "c", "limits": {"timeout_s": 1e-25}}"#).unwrap_err();
        assert_eq!(error.field, "limits.timeout_s");
        for text in [
            &br#"{"image": "c", "limits": {"cpus": 0.5, "timeout_s": 1e300}}"#[..],
            br#"{"image": "c", "limits": {"cpus": 0.001, "timeout_s": 86400.25}}"#,
            br#"{"image": "c", "limits": {"cpus": 123456789012345, "timeout_s": 1.5e-22}}"#,
        ] {
            let task = parse_task(text).unwrap();
            assert_eq!(parse_task(&serde_json::to_vec(&task).unwrap()).unwrap(), task);
        }
    }

    #[test]
    fn placements() {
        let task = parse_task(br#"{"container": {"target": "db"}, "command": ["ls"]}"#).unwrap();
        assert_eq!(task.placement(), Placement::Exec { target: "db".into() });
        let task = parse_task(
            br#"{"image": "b", "container": {"mode": "long_running", "name": "db", "restart": "on-failure", "max_retries": 2}}"#,
        )
        .unwrap();
        assert_eq!(
            task.placement(),
            Placement::LongRunning { name: "db".into(), restart: RestartPolicy::OnFailure, max_retries: 2 }
        );
        let task =
            parse_task(br#"{"image": "b", "container": {"mode": "long_running", "name": "db"}}"#).unwrap();
        assert_eq!(
            task.placement(),
            Placement::LongRunning {
                name: "db".into(),
                restart: RestartPolicy::No,
                max_retries: DEFAULT_MAX_RETRIES
            }
        );
    }

    #[test]
    fn ids_of_unparsable_tasks_are_recovered_when_valid() {
        assert_eq!(task_id_from_bytes(br#"{"id": "t-1", "image": 3}"#).as_deref(), Some("t-1"));
        assert_eq!(task_id_from_bytes(br#"{"id": "t 1"}"#), None);
        assert_eq!(task_id_from_bytes(b"garbage"), None);
        assert_eq!(task_id_from_bytes(br#"{"id": 7}"#), None);
    }
}
