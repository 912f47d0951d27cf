//! From a parsed task to a container spec: image config applied, limits
//! filled from the worker's defaults and clamped to its maxima.

use std::path::PathBuf;
use std::time::Duration;

use crate::engine::{ContainerSpec, NetworkMode};
use crate::image::{container_command, resolve_user, ImageRecord};
use crate::protocol::{Network, Task, TaskError};

/// Limits applied to a task that does not set them, and the most a task may ask for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskLimitsPolicy {
    /// Memory of a task that sets none, bytes.
    pub default_memory_bytes: u64,
    /// Most memory a task may have, bytes.
    pub max_memory_bytes: u64,
    /// CPUs (thousandths) of a task that sets none; `None` leaves it unthrottled.
    pub default_cpu_millis: Option<u64>,
    /// Most CPUs (thousandths) a task may have.
    pub max_cpu_millis: u64,
    /// Processes of a task that sets none.
    pub default_pids: u64,
    /// Most processes a task may have.
    pub max_pids: u64,
    /// Wall-clock limit of a task that sets none.
    pub default_timeout: Duration,
    /// Longest wall-clock limit.
    pub max_timeout: Duration,
    /// Output kept per stream for a task that sets none, bytes.
    pub default_output_bytes: u64,
    /// Most output kept per stream, bytes.
    pub max_output_bytes: u64,
    /// Size of a long-running container's writable layer, bytes: a
    /// filesystem of its own on the data disk (see the engine's
    /// `disk_layer` module), allocated in full when it is made.
    pub long_running_disk_bytes: u64,
}

impl Default for TaskLimitsPolicy {
    fn default() -> Self {
        TaskLimitsPolicy {
            default_memory_bytes: 512 << 20,
            max_memory_bytes: 4 << 30,
            default_cpu_millis: None,
            max_cpu_millis: 64_000,
            default_pids: 512,
            max_pids: 4096,
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(3600),
            default_output_bytes: 1 << 20,
            max_output_bytes: 2 << 20,
            long_running_disk_bytes: 1 << 30,
        }
    }
}

/// Builds the container spec of `task` on `image` (layers topmost first).
/// A task value above the policy's maximum is clamped to it.
pub(crate) fn container_spec(
    container_id: &str,
    task: &Task,
    image: &ImageRecord,
    layers: Vec<PathBuf>,
    policy: &TaskLimitsPolicy,
    allow_host_network: bool,
) -> Result<ContainerSpec, TaskError> {
    let config = &image.config;
    let command = container_command(config, &task.command);
    if command.is_empty() {
        return Err(TaskError::new(
            "command",
            format!("image {} has no Entrypoint or Cmd; give a command", image.name),
        ));
    }
    let mut spec = ContainerSpec::new(container_id, layers, command);
    for entry in &config.env {
        if let Some((name, value)) = entry.split_once('=') {
            spec.env.push((name.to_owned(), value.to_owned()));
        }
    }
    for (name, value) in &task.env {
        spec.env.retain(|(existing, _)| existing != name);
        spec.env.push((name.clone(), value.clone()));
    }
    if let Some(workdir) = task.workdir.as_ref().or(config.working_dir.as_ref()) {
        if !workdir.is_empty() {
            spec.workdir = workdir.clone();
        }
    }
    match &task.user {
        Some(user) => {
            let (uid, gid) = match user.split_once(':') {
                Some((uid, gid)) => (uid.parse(), gid.parse()),
                None => (user.parse(), user.parse()),
            };
            spec.user.uid = uid.map_err(|_| TaskError::new("user", "must be UID or UID:GID"))?;
            spec.user.gid = gid.map_err(|_| TaskError::new("user", "must be UID or UID:GID"))?;
        }
        None => {
            if let Some(user) = config.user.as_deref().filter(|user| !user.is_empty()) {
                let (uid, gid) = resolve_user(&spec.root.layers, user)
                    .map_err(|error| TaskError::new("image", format!("its User {user:?}: {error}")))?;
                spec.user.uid = uid;
                spec.user.gid = gid;
            }
        }
    }
    spec.network = match task.network {
        Network::None => NetworkMode::None,
        Network::Host if allow_host_network => NetworkMode::Host,
        Network::Host => {
            return Err(TaskError::new("network", "host networking is not allowed by this worker's operator"))
        }
    };
    let limits = &task.limits;
    spec.limits.memory_bytes = limits
        .memory_mb
        .map_or(policy.default_memory_bytes, |mb| mb.saturating_mul(1 << 20))
        .min(policy.max_memory_bytes);
    spec.limits.shm_bytes = spec.limits.shm_bytes.min(spec.limits.memory_bytes);
    spec.limits.cpu_millis = match limits.cpus {
        Some(cpus) => Some(((cpus * 1000.0).round() as u64).clamp(1, policy.max_cpu_millis)),
        None => policy.default_cpu_millis.map(|millis| millis.min(policy.max_cpu_millis)),
    };
    spec.limits.pids = limits.pids.unwrap_or(policy.default_pids).min(policy.max_pids);
    let timeout = match limits.timeout_s {
        // Clamp before converting: a huge float would not fit a Duration.
        Some(seconds) => Duration::from_secs_f64(seconds.min(policy.max_timeout.as_secs_f64())),
        None => policy.default_timeout,
    };
    spec.limits.timeout = Some(timeout.min(policy.max_timeout));
    spec.limits.output_bytes =
        limits.output_bytes.unwrap_or(policy.default_output_bytes).min(policy.max_output_bytes);
    if let Some(stdin) = &task.stdin {
        spec.stdin = Some(stdin.clone().into_bytes());
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::RunConfig;
    use crate::protocol::parse_task;

    fn image() -> ImageRecord {
        serde_json::from_value(serde_json::json!({
            "name": "local/test:1",
            "manifest_digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "config_digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "layers": [],
            "config": RunConfig { cmd: Some(vec!["sh".into()]), env: vec!["PATH=/bin".into(), "A=1".into()], ..Default::default() },
            "architecture": "amd64",
            "os": "linux",
            "stored_at": 0,
        }))
        .unwrap()
    }

    #[test]
    fn limits_are_clamped_to_the_maxima_and_defaults_fill_gaps() {
        let policy = TaskLimitsPolicy::default();
        let task = parse_task(
            br#"{"image": "i", "limits": {"memory_mb": 99999999999, "pids": 100000, "timeout_s": 1e300, "output_bytes": 99999999999, "cpus": 1000}}"#,
        )
        .unwrap();
        let spec = container_spec("c", &task, &image(), vec![PathBuf::from("/x")], &policy, false).unwrap();
        assert_eq!(spec.limits.memory_bytes, policy.max_memory_bytes);
        assert_eq!(spec.limits.pids, policy.max_pids);
        assert_eq!(spec.limits.timeout, Some(policy.max_timeout));
        assert_eq!(spec.limits.output_bytes, policy.max_output_bytes);
        assert_eq!(spec.limits.cpu_millis, Some(policy.max_cpu_millis));
        let task = parse_task(br#"{"image": "i", "env": {"A": "2"}}"#).unwrap();
        let spec = container_spec("c", &task, &image(), vec![PathBuf::from("/x")], &policy, false).unwrap();
        assert_eq!(spec.limits.memory_bytes, policy.default_memory_bytes);
        assert_eq!(spec.limits.timeout, Some(policy.default_timeout));
        assert_eq!(spec.command, vec!["sh".to_owned()]);
        assert!(spec.env.contains(&("A".to_owned(), "2".to_owned())));
        assert!(!spec.env.contains(&("A".to_owned(), "1".to_owned())));
    }

    #[test]
    fn host_network_needs_the_operator() {
        let task = parse_task(br#"{"image": "i", "network": "host"}"#).unwrap();
        let error =
            container_spec("c", &task, &image(), vec![], &TaskLimitsPolicy::default(), false).unwrap_err();
        assert_eq!(error.field, "network");
    }
}
