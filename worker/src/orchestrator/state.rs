//! The worker's state as a pure fold of its event log: which tasks it holds
//! (claimed, with a stored result, published) and which containers may
//! exist on this host. Rebuilt at start from the newest snapshot plus the
//! events after it; what it says is then reconciled with reality.
//!
//! Every event is a fact, so folding one twice changes nothing, and events
//! of different tasks commute: producers may apply them in any order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::events::Projection;
use crate::protocol::{Event, TaskResult};

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

/// The projection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerState {
    /// Tasks held, by id.
    pub tasks: BTreeMap<String, TaskEntry>,
    /// Containers that may exist, by id.
    pub containers: BTreeMap<String, ContainerEntry>,
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
                    entry.result = Some(result.clone());
                }
            }
            Event::ResultPublished { task_id, .. } => self.task(task_id).published = true,
            Event::ResultDiscarded { task_id, .. } => self.task(task_id).discarded = true,
            Event::TaskAcked { task_id }
            | Event::TaskReleased { task_id, .. }
            | Event::DeadLettered { task_id, .. } => {
                self.tasks.remove(task_id);
            }
        }
    }
}

#[cfg(test)]
mod tests;
