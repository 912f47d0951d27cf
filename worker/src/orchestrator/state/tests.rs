//! The projection against a simple model, over random histories: many
//! tasks, each with a lifecycle cut short at a random point (a crash),
//! interleaved at random as concurrent tasks are. Checked: the fold equals
//! the model; folding every event twice changes nothing; a snapshot taken
//! anywhere (serialized and read back) and folded on gives the same state;
//! another interleaving of the same per-task histories gives the same state.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::protocol::{ErrorInfo, ResultTimings, ResultUsage, TaskStatus, Truncated};

/// A held task as compared: (attempt, attempt of the stored result, published, discarded).
type Held = (u64, Option<u64>, bool, bool);
/// Held tasks by id, and the containers that may exist.
type View = (BTreeMap<String, Held>, BTreeSet<String>);

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn result(task: &str, attempt: u64) -> TaskResult {
    TaskResult {
        schema: 1,
        id: task.to_owned(),
        worker_id: "w".into(),
        container_id: Some(format!("w.{task}-{attempt}")),
        status: TaskStatus::Succeeded,
        exit_code: Some(0),
        signal: None,
        stdout: format!("out {task}"),
        stderr: String::new(),
        truncated: Truncated::default(),
        timings: ResultTimings::default(),
        usage: ResultUsage::default(),
        error: None,
        attempt,
        environment: None,
    }
}

/// One delivery of a task as the worker records it, cut after `cut` events.
fn delivery(rng: &mut Rng, task: &str, attempt: u64, seq: u64) -> Vec<Event> {
    let container = format!("w.{task}-{attempt}");
    let mut events = vec![Event::TaskClaimed { task_id: task.into(), stream_seq: seq, attempt }];
    match rng.below(4) {
        // Rejected before a container: result, publish, ack.
        0 => {
            events.push(Event::ResultStored { result: Box::new(result(task, attempt)) });
            events.push(Event::ResultPublished {
                task_id: task.into(),
                result_seq: Some(seq),
                duplicate: false,
            });
            events.push(Event::TaskAcked { task_id: task.into() });
        }
        // Retried: a container that failed to start, handed back.
        1 => {
            events.push(Event::ContainerCreating { task_id: task.into(), container_id: container.clone() });
            events.push(Event::ContainerRemoved { task_id: task.into(), container_id: container });
            events.push(Event::TaskReleased { task_id: task.into(), reason: "retry".into() });
        }
        // Dead-lettered on its last delivery.
        2 => {
            events.push(Event::ResultStored { result: Box::new(result(task, attempt)) });
            events.push(Event::DeadLettered {
                task_id: task.into(),
                attempts: attempt,
                error: ErrorInfo { kind: "registry".into(), message: "down".into() },
            });
        }
        // The whole path; another worker may have won the race.
        _ => {
            events.push(Event::ContainerCreating { task_id: task.into(), container_id: container.clone() });
            events.push(Event::ContainerStarted {
                task_id: task.into(),
                container_id: container.clone(),
                pid: 7,
            });
            events.push(Event::ContainerRemoved { task_id: task.into(), container_id: container });
            events.push(Event::ResultStored { result: Box::new(result(task, attempt)) });
            if rng.below(4) == 0 {
                events.push(Event::ResultDiscarded { task_id: task.into(), reason: "lost lease".into() });
            } else {
                events.push(Event::ResultPublished {
                    task_id: task.into(),
                    result_seq: None,
                    duplicate: false,
                });
            }
            events.push(Event::TaskAcked { task_id: task.into() });
        }
    }
    // A crash cuts the delivery anywhere (or not at all).
    let keep = 1 + rng.below(events.len() as u64 + 2).min(events.len() as u64 - 1) as usize;
    events.truncate(keep);
    events
}

/// The model: what the worker holds, computed per task from its own events
/// only, with no shared state.
fn model(events: &[Event]) -> View {
    let mut per_task: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
    let mut containers: BTreeMap<String, bool> = BTreeMap::new();
    for event in events {
        if let Some(task) = event.task_id() {
            per_task.entry(task.to_owned()).or_default().push(event);
        }
        match event {
            Event::ContainerCreating { container_id, .. } | Event::ContainerStarted { container_id, .. } => {
                containers.insert(container_id.clone(), true);
            }
            Event::ContainerRemoved { container_id, .. } | Event::ContainerReaped { container_id, .. } => {
                containers.insert(container_id.clone(), false);
            }
            _ => {}
        }
    }
    let mut held = BTreeMap::new();
    for (task, events) in per_task {
        // Only what follows the last terminal event counts.
        let start = events
            .iter()
            .rposition(|event| {
                matches!(
                    event,
                    Event::TaskAcked { .. } | Event::TaskReleased { .. } | Event::DeadLettered { .. }
                )
            })
            .map_or(0, |index| index + 1);
        let live = &events[start..];
        if live.is_empty() {
            continue;
        }
        let attempt = live
            .iter()
            .filter_map(|event| match event {
                Event::TaskClaimed { attempt, .. } => Some(*attempt),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let result_attempt = live.iter().find_map(|event| match event {
            Event::ResultStored { result } => Some(result.attempt),
            _ => None,
        });
        let published = live.iter().any(|event| matches!(event, Event::ResultPublished { .. }));
        let discarded = live.iter().any(|event| matches!(event, Event::ResultDiscarded { .. }));
        held.insert(task, (attempt, result_attempt, published, discarded));
    }
    let open = containers.into_iter().filter(|(_, open)| *open).map(|(id, _)| id).collect();
    (held, open)
}

fn fold(events: &[Event]) -> WorkerState {
    let mut state = WorkerState::default();
    for (seq, event) in events.iter().enumerate() {
        state.apply(seq as u64 + 1, event);
    }
    state
}

fn view(state: &WorkerState) -> View {
    let held = state
        .tasks
        .iter()
        .map(|(id, entry)| {
            (
                id.clone(),
                (entry.attempt, entry.result.as_ref().map(|r| r.attempt), entry.published, entry.discarded),
            )
        })
        .collect();
    (held, state.containers.keys().cloned().collect())
}

/// Per-task histories (deliveries in order), then a random interleaving.
fn history(rng: &mut Rng) -> (Vec<Vec<Event>>, Vec<Event>) {
    let tasks = 1 + rng.below(6);
    let mut per_task = Vec::new();
    for task in 0..tasks {
        let name = format!("t{task}");
        let mut events = Vec::new();
        for attempt in 1..=1 + rng.below(3) {
            let delivery = delivery(rng, &name, attempt, task * 10 + attempt);
            // A delivery cut short before its terminal event is a crash:
            // at the restart, reconciliation reaps and releases.
            let finished = matches!(
                delivery.last(),
                Some(Event::TaskAcked { .. } | Event::TaskReleased { .. } | Event::DeadLettered { .. })
            );
            let open = delivery.iter().rev().find_map(|event| match event {
                Event::ContainerCreating { container_id, .. }
                | Event::ContainerStarted { container_id, .. } => Some(container_id.clone()),
                Event::ContainerRemoved { .. } => Some(String::new()),
                _ => None,
            });
            let stored = delivery.iter().any(|event| matches!(event, Event::ResultStored { .. }));
            events.extend(delivery);
            if !finished && rng.below(2) == 0 {
                if let Some(container) = open.filter(|id| !id.is_empty()) {
                    events.push(Event::ContainerReaped {
                        task_id: Some(name.clone()),
                        container_id: container,
                        found: true,
                    });
                }
                if !stored {
                    events.push(Event::TaskReleased { task_id: name.clone(), reason: "restart".into() });
                }
            }
        }
        per_task.push(events);
    }
    (per_task.clone(), interleave(rng, per_task))
}

fn interleave(rng: &mut Rng, mut per_task: Vec<Vec<Event>>) -> Vec<Event> {
    for events in &mut per_task {
        events.reverse();
    }
    let mut merged = Vec::new();
    loop {
        let live: Vec<usize> = (0..per_task.len()).filter(|index| !per_task[*index].is_empty()).collect();
        if live.is_empty() {
            return merged;
        }
        let pick = live[rng.below(live.len() as u64) as usize];
        merged.push(per_task[pick].pop().unwrap());
    }
}

#[test]
fn the_fold_matches_the_model_over_random_histories() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..3000 {
        let (per_task, events) = history(&mut rng);
        let state = fold(&events);
        assert_eq!(view(&state), model(&events), "round {round}: {events:#?}");

        // Facts fold idempotently.
        let doubled: Vec<Event> = events.iter().flat_map(|event| [event.clone(), event.clone()]).collect();
        assert_eq!(fold(&doubled), state, "round {round}: folding twice differs");

        // A snapshot anywhere, read back, folded on.
        let cut = rng.below(events.len() as u64 + 1) as usize;
        let snapshot = serde_json::to_vec(&fold(&events[..cut])).unwrap();
        let mut resumed: WorkerState = serde_json::from_slice(&snapshot).unwrap();
        for (seq, event) in events[cut..].iter().enumerate() {
            resumed.apply((cut + seq) as u64 + 1, event);
        }
        assert_eq!(resumed, state, "round {round}: snapshot at {cut} differs");

        // Another interleaving of the same per-task histories.
        assert_eq!(fold(&interleave(&mut rng, per_task)), state, "round {round}: order matters");
    }
}

/// A long-running container as compared: (run, running run, last ended run,
/// its exit code, failures in a row, stopped).
type LongView = (u32, Option<u32>, Option<u32>, Option<i32>, u32, bool);

fn identity(run: u32) -> crate::engine::RunIdentity {
    crate::engine::RunIdentity {
        run,
        init: crate::engine::ProcessIdentity { pid: 100 + run as i32, start_ticks: run as u64 },
        shim: crate::engine::ProcessIdentity { pid: 200 + run as i32, start_ticks: run as u64 },
    }
}

/// One container's history: runs that start (or fail to), end, get adopted
/// or stopped, perhaps removed; cut short anywhere by a crash.
fn container_history(rng: &mut Rng, name: &str) -> Vec<Event> {
    let task = crate::protocol::parse_task(
        format!(r#"{{"image": "b", "container": {{"mode": "long_running", "name": "{name}", "restart": "always"}}}}"#)
            .as_bytes(),
    )
    .unwrap();
    let mut events = vec![Event::LongRunningCreated {
        name: name.into(),
        container_id: format!("w.{name}"),
        task_id: format!("create-{name}"),
        task: Box::new(task),
    }];
    let mut clock = 1_000;
    for run in 1..=1 + rng.below(4) as u32 {
        events.push(Event::LongRunningStarting { name: name.into(), run });
        clock += 1 + rng.below(20_000);
        if rng.below(5) == 0 {
            events.push(Event::LongRunningStartFailed {
                name: name.into(),
                run,
                error: ErrorInfo { kind: "setup".into(), message: "no".into() },
                at_unix_ms: clock,
            });
            continue;
        }
        events.push(Event::LongRunningStarted {
            name: name.into(),
            identity: identity(run),
            started_at_unix_ms: clock,
        });
        if rng.below(3) == 0 {
            events.push(Event::LongRunningAdopted { name: name.into(), run });
        }
        if rng.below(4) == 0 {
            events.push(Event::LongRunningStopped { name: name.into() });
        }
        clock += 1 + rng.below(20_000);
        events.push(Event::LongRunningExited {
            name: name.into(),
            run,
            exit_code: Some(rng.below(2) as i32),
            signal: None,
            lost: false,
            exited_at_unix_ms: clock,
        });
    }
    if rng.below(4) == 0 {
        events.push(Event::LongRunningRemoved { name: name.into() });
    }
    let keep = 1 + rng.below(events.len() as u64 + 2).min(events.len() as u64 - 1) as usize;
    events.truncate(keep);
    events
}

/// The model of one container, from its own events in order.
fn long_model(events: &[Event]) -> Option<LongView> {
    let (mut run, mut running, mut ended, mut code, mut failures, mut stopped) =
        (0, None, None, None, 0, false);
    let mut exists = false;
    for event in events {
        match event {
            Event::LongRunningCreated { .. } => exists = true,
            Event::LongRunningStarting { run: r, .. } => run = run.max(*r),
            Event::LongRunningStarted { identity, .. } => {
                run = run.max(identity.run);
                running = Some(identity.run);
                stopped = false;
            }
            Event::LongRunningStartFailed { run: r, .. } => {
                run = run.max(*r);
                ended = Some(*r);
                code = None;
                failures += 1;
                stopped = false;
            }
            Event::LongRunningExited { run: r, exit_code, .. } => {
                running = None;
                ended = Some(*r);
                code = *exit_code;
                failures = if *exit_code == Some(0) { 0 } else { failures + 1 };
            }
            Event::LongRunningStopped { .. } => stopped = true,
            Event::LongRunningRemoved { .. } => exists = false,
            _ => {}
        }
    }
    exists.then_some((run, running, ended, code, failures, stopped))
}

fn long_view(state: &WorkerState) -> BTreeMap<String, LongView> {
    state
        .long_running
        .iter()
        .map(|(name, entry)| {
            let exit = entry.last_exit;
            (
                name.clone(),
                (
                    entry.run,
                    entry.running.map(|identity| identity.run),
                    exit.map(|exit| exit.run),
                    exit.and_then(|exit| exit.exit_code),
                    entry.consecutive_failures,
                    entry.stopped,
                ),
            )
        })
        .collect()
}

#[test]
fn long_running_containers_fold_like_their_model_twice_and_from_snapshots() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for round in 0..3000 {
        let per_container: Vec<Vec<Event>> =
            (0..1 + rng.below(4)).map(|index| container_history(&mut rng, &format!("c{index}"))).collect();
        let expected: BTreeMap<String, LongView> = per_container
            .iter()
            .enumerate()
            .filter_map(|(index, events)| long_model(events).map(|view| (format!("c{index}"), view)))
            .collect();
        let events = interleave(&mut rng, per_container.clone());
        let state = fold(&events);
        assert_eq!(long_view(&state), expected, "round {round}: {events:#?}");

        let doubled: Vec<Event> = events.iter().flat_map(|event| [event.clone(), event.clone()]).collect();
        assert_eq!(fold(&doubled), state, "round {round}: folding twice differs");

        let cut = rng.below(events.len() as u64 + 1) as usize;
        let snapshot = serde_json::to_vec(&fold(&events[..cut])).unwrap();
        let mut resumed: WorkerState = serde_json::from_slice(&snapshot).unwrap();
        for (seq, event) in events[cut..].iter().enumerate() {
            resumed.apply((cut + seq) as u64 + 1, event);
        }
        assert_eq!(resumed, state, "round {round}: snapshot at {cut} differs");

        assert_eq!(fold(&interleave(&mut rng, per_container)), state, "round {round}: order matters");
    }
}
