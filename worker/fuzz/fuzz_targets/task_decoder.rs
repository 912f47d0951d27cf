//! `task_decoder`: the task parser on arbitrary bytes.
//!
//! A task is the first thing the worker reads from an agent, so every byte
//! string must give `Ok` or a `TaskError`, never a panic. For an accepted
//! task it also checks what the rest of the worker relies on:
//!
//! - `placement()` agrees with `container` (exec iff `target`, a
//!   long-running placement only with a valid name);
//! - the environment, already checked by `parse_task`, normalises;
//! - serialising the task and parsing it again gives an equal task (the CLI
//!   and the restart of long-running containers republish tasks this way);
//! - `task_id_from_bytes`, used for tasks that fail to parse, agrees with
//!   the parsed id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quilt::protocol::{parse_task, task_id_from_bytes, validate_container_name, Placement};

fuzz_target!(|data: &[u8]| {
    let recovered_id = task_id_from_bytes(data);
    let Ok(task) = parse_task(data) else { return };
    assert_eq!(recovered_id, task.id, "task_id_from_bytes disagrees with parse_task");

    match task.placement() {
        Placement::Exec { target } => {
            assert_eq!(task.container.target.as_ref(), Some(&target));
            assert!(task.environment.is_none(), "an exec task carries an environment");
        }
        Placement::LongRunning { name, .. } => {
            assert!(task.container.target.is_none());
            validate_container_name(&name).expect("a long-running placement has a valid name");
        }
        Placement::Ephemeral => assert!(task.container.target.is_none() && task.container.name.is_none()),
    }
    if let Some(environment) = &task.environment {
        environment.normalize().expect("parse_task accepted an environment that does not normalise");
    }

    let bytes = serde_json::to_vec(&task).expect("a task serialises");
    let again = parse_task(&bytes).unwrap_or_else(|error| {
        panic!("the serialised task {} does not parse: {error}", String::from_utf8_lossy(&bytes))
    });
    assert_eq!(task, again, "serialise -> parse changed the task: {}", String::from_utf8_lossy(&bytes));
    assert_eq!(task.placement(), again.placement());
});
