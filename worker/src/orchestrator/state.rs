//! The worker's state as a pure fold of its event log: which tasks it holds
//! (claimed, with a stored result, published) and which containers may
//! exist on this host. Rebuilt at start from the newest snapshot plus the
//! events after it; what it says is then reconciled with reality.
//!
//! Every event is a fact, so folding one twice changes nothing, and events
//! of different tasks commute: producers may apply them in any order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::RunIdentity;
use crate::events::Projection;
use crate::protocol::{Event, Task, TaskResult};

/// A run shorter than this counts as a quick exit: the next restart waits
/// (see `orchestrator::long_running::restart_delay`).
pub const QUICK_EXIT_MS: u64 = 10_000;

/// A task this worker has claimed and not yet acked, released or dead-lettered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEntry {
    /// Its sequence in `QUILT_TASKS` (the latest delivery's).
    pub stream_seq: u64,
    /// The latest delivery's number.
    pub attempt: u64,
    /// The result, once stored: from then on it is published, never recomputed.
    pub result: Option<TaskResult>,
    /// The result is in `QUILT_RESULTS` (by this worker or, found there, by another).
    pub published: bool,
    /// This worker's result was dropped for another worker's.
    pub discarded: bool,
}

/// A container that may exist on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerEntry {
    /// The task it runs.
    pub task_id: String,
    /// Its first process, once started.
    pub pid: Option<i32>,
}

/// How a long-running container's last run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunExit {
    /// The run.
    pub run: u32,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal, when one killed it.
    pub signal: Option<i32>,
    /// No record of its end exists (its shim was killed), or it never started.
    pub lost: bool,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

impl RunExit {
    /// Anything but exit code 0.
    pub fn failed(&self) -> bool {
        self.exit_code != Some(0)
    }
}

/// A long-running container of this worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongRunningEntry {
    /// Its id (cgroup and directory name).
    pub container_id: String,
    /// The task that created it (image, command, limits, restart policy).
    pub task: Task,
    /// That task's id.
    pub created_by: String,
    /// The latest run's number (0: never started).
    pub run: u32,
    /// The latest run, while it may be running.
    pub running: Option<RunIdentity>,
    /// When the latest run started, milliseconds since the Unix epoch.
    pub started_at_unix_ms: u64,
    /// How the latest ended run ended.
    pub last_exit: Option<RunExit>,
    /// Failed runs in a row (reset by a run that exits 0).
    pub consecutive_failures: u32,
    /// Runs in a row that lasted less than [`QUICK_EXIT_MS`].
    pub quick_exits: u32,
    /// Stopped on request: not restarted.
    pub stopped: bool,
}

impl LongRunningEntry {
    fn ended(&mut self, exit: RunExit) {
        if exit.run != self.run || self.last_exit.is_some_and(|last| last.run == exit.run) {
            return;
        }
        self.running = None;
        self.last_exit = Some(exit);
        self.consecutive_failures = if exit.failed() { self.consecutive_failures + 1 } else { 0 };
        let quick = exit.at_unix_ms.saturating_sub(self.started_at_unix_ms) < QUICK_EXIT_MS;
        self.quick_exits = if quick { self.quick_exits + 1 } else { 0 };
    }
}

/// The projection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerState {
    /// Tasks held, by id.
    pub tasks: BTreeMap<String, TaskEntry>,
    /// Containers that may exist, by id.
    pub containers: BTreeMap<String, ContainerEntry>,
    /// Long-running containers, by name.
    #[serde(default)]
    pub long_running: BTreeMap<String, LongRunningEntry>,
}

impl WorkerState {
    fn task(&mut self, task_id: &str) -> &mut TaskEntry {
        self.tasks.entry(task_id.to_owned()).or_insert(TaskEntry {
            stream_seq: 0,
            attempt: 0,
            result: None,
            published: false,
            discarded: false,
        })
    }

    /// Tasks whose result is stored but neither published nor discarded.
    pub fn unpublished(&self) -> impl Iterator<Item = (&String, &TaskResult)> {
        self.tasks.iter().filter_map(|(id, entry)| match &entry.result {
            Some(result) if !entry.published && !entry.discarded => Some((id, result)),
            _ => None,
        })
    }
}

impl Projection for WorkerState {
    type Event = Event;

    fn apply(&mut self, _seq: u64, event: &Event) {
        match event {
            Event::WorkerStarted { .. } => {}
            Event::TaskClaimed { task_id, stream_seq, attempt } => {
                let entry = self.task(task_id);
                if *attempt >= entry.attempt {
                    entry.attempt = *attempt;
                    entry.stream_seq = *stream_seq;
                }
            }
            Event::ContainerCreating { task_id, container_id } => {
                self.containers
                    .entry(container_id.clone())
                    .or_insert(ContainerEntry { task_id: task_id.clone(), pid: None });
            }
            Event::ContainerStarted { task_id, container_id, pid } => {
                let entry = self
                    .containers
                    .entry(container_id.clone())
                    .or_insert(ContainerEntry { task_id: task_id.clone(), pid: None });
                entry.pid = Some(*pid);
            }
            Event::ContainerRemoved { container_id, .. } | Event::ContainerReaped { container_id, .. } => {
                self.containers.remove(container_id);
            }
            Event::ResultStored { result } => {
                let entry = self.task(&result.id);
                // The first stored result is the one published; a second
                // (which the worker never appends) would not replace it.
                if entry.result.is_none() {
                    entry.result = Some((**result).clone());
                }
            }
            Event::ResultPublished { task_id, .. } => self.task(task_id).published = true,
            Event::ResultDiscarded { task_id, .. } => self.task(task_id).discarded = true,
            Event::TaskAcked { task_id }
            | Event::TaskReleased { task_id, .. }
            | Event::TaskForwarded { task_id, .. }
            | Event::DeadLettered { task_id, .. } => {
                self.tasks.remove(task_id);
            }
            Event::LongRunningCreated { name, container_id, task_id, task } => {
                self.long_running.entry(name.clone()).or_insert_with(|| LongRunningEntry {
                    container_id: container_id.clone(),
                    task: (**task).clone(),
                    created_by: task_id.clone(),
                    run: 0,
                    running: None,
                    started_at_unix_ms: 0,
                    last_exit: None,
                    consecutive_failures: 0,
                    quick_exits: 0,
                    stopped: false,
                });
            }
            Event::LongRunningStarting { name, run } => {
                if let Some(entry) = self.long_running.get_mut(name) {
                    entry.run = entry.run.max(*run);
                }
            }
            Event::LongRunningStarted { name, identity, started_at_unix_ms } => {
                if let Some(entry) = self.long_running.get_mut(name) {
                    let newer = entry.running.is_none_or(|running| running.run < identity.run)
                        && entry.last_exit.is_none_or(|exit| exit.run < identity.run);
                    if identity.run >= entry.run && newer {
                        entry.run = identity.run;
                        entry.running = Some(*identity);
                        entry.started_at_unix_ms = *started_at_unix_ms;
                        entry.stopped = false;
                    }
                }
            }
            Event::LongRunningStartFailed { name, run, at_unix_ms, .. } => {
                if let Some(entry) = self.long_running.get_mut(name) {
                    let newer = entry.last_exit.is_none_or(|exit| exit.run < *run);
                    if *run >= entry.run && newer {
                        entry.run = *run;
                        entry.started_at_unix_ms = *at_unix_ms;
                        entry.stopped = false;
                    }
                    entry.ended(RunExit {
                        run: *run,
                        exit_code: None,
                        signal: None,
                        lost: true,
                        at_unix_ms: *at_unix_ms,
                    });
                }
            }
            Event::LongRunningExited { name, run, exit_code, signal, lost, exited_at_unix_ms } => {
                if let Some(entry) = self.long_running.get_mut(name) {
                    entry.ended(RunExit {
                        run: *run,
                        exit_code: *exit_code,
                        signal: *signal,
                        lost: *lost,
                        at_unix_ms: *exited_at_unix_ms,
                    });
                }
            }
            Event::LongRunningAdopted { .. } => {}
            Event::LongRunningStopped { name } => {
                if let Some(entry) = self.long_running.get_mut(name) {
                    entry.stopped = true;
                }
            }
            Event::LongRunningRemoved { name } => {
                self.long_running.remove(name);
            }
            // The environment store is its own record (meta.json); these
            // are for the operator's history.
            Event::EnvironmentBuilt { .. }
            | Event::EnvironmentFailed { .. }
            | Event::EnvironmentsEvicted { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests;
