//! Crash recovery of the task pipeline, with a real nats-server, real
//! `quilt worker` processes and real containers. It proves the promises of
//! SECURITY.md "Delivery and state":
//!
//! - a worker SIGKILLed at any point of a task's path (fetched, container
//!   started, container exited, result stored, result published, before the
//!   ack) and restarted answers every task with exactly one result, reruns a
//!   task only if its result was not yet stored, reaps what the dead process
//!   left, and its event log replays to an empty state;
//! - nats-server SIGKILLed while tasks run and restarted by the embedded
//!   broker's supervisor loses no task and duplicates no result;
//! - a worker paused past AckWait, whose task another worker then finishes,
//!   discards its own result instead of publishing a second one.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use quilt::events::{rebuild, EventLog};
use quilt::orchestrator::state::WorkerState;
use quilt::protocol::Event;
use quilt_tests::pipeline::{
    assert_worker_left_nothing, containers_of, drain_results, import_busybox, task, Agent, Broker, Setup,
    Worker, BOUND,
};
use quilt_tests::TestDir;
use serde_json::Value;

use crate::pipeline::mirrored_events;

/// How long the tasks in flight at a nats-server crash may take to finish
/// once it is back.
const RECOVERY: Duration = Duration::from_secs(20);

/// How long a core subscription must stay quiet before it counts as drained.
const QUIET: Duration = Duration::from_millis(500);

/// Waits (bounded) until `QUILT_TASKS` holds no message: every task was
/// acked (or removed by a restarted worker), none is left to redeliver.
async fn wait_queue_empty(agent: &Agent) {
    let deadline = Instant::now() + BOUND;
    loop {
        let messages = match agent.jetstream.get_stream("QUILT_TASKS").await {
            Ok(mut stream) => stream.info().await.map(|info| info.state.messages).ok(),
            Err(_) => None,
        };
        if messages == Some(0) {
            return;
        }
        assert!(Instant::now() < deadline, "tasks still queued after {BOUND:?}: {messages:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until the worker mirrored at least `count` events of `kind`.
async fn wait_events(agent: &Agent, worker_id: &str, kind: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + BOUND;
    loop {
        let events = mirrored_events(agent, worker_id).await;
        if events.iter().filter(|event| event["event"]["kind"] == kind).count() >= count {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{worker_id} mirrored fewer than {count} {kind} events: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) for the next event of `kind` on a core subscription to
/// a worker's mirrored events.
async fn next_event(events: &mut async_nats::Subscriber, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let message = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} event within {BOUND:?}"))
            .expect("the subscription is open");
        let event: Value = serde_json::from_slice(&message.payload).unwrap();
        if event["event"]["kind"] == kind {
            return event;
        }
    }
}

/// Asserts the stopped worker's event log replays to a state holding no
/// task and no container: what it says matches what is (nothing).
fn assert_log_replays_empty(data_dir: &Path) {
    let log = EventLog::<Event>::open(&data_dir.join("events.redb")).expect("the event log opens");
    let (state, _) = rebuild::<WorkerState, Event>(&log).expect("the event log replays");
    assert!(state.tasks.is_empty(), "the log still holds tasks: {:#?}", state.tasks);
    assert!(state.containers.is_empty(), "the log still holds containers: {:#?}", state.containers);
}

/// Asserts that the mirrored events, folded, leave no container open: every
/// `container_creating` is matched by a `container_removed` or `_reaped`.
fn assert_no_container_open(events: &[Value]) {
    let mut open = BTreeSet::new();
    for event in events {
        let id = event["event"]["container_id"].as_str();
        match (event["event"]["kind"].as_str().unwrap(), id) {
            ("container_creating" | "container_started", Some(id)) => {
                open.insert(id.to_owned());
            }
            ("container_removed" | "container_reaped", Some(id)) => {
                open.remove(id);
            }
            _ => {}
        }
    }
    assert!(open.is_empty(), "containers never removed nor reaped: {open:?}");
}

fn kinds_of<'a>(events: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    events.iter().filter(move |event| event["event"]["kind"] == kind)
}

/// Publishes a task, retrying while the server is away: resubmitting is
/// safe, the stream drops a second copy by its `Nats-Msg-Id`.
async fn submit_retrying(agent: &Agent, body: &Value) -> String {
    let id = body["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + BOUND;
    loop {
        match agent.submit_raw(serde_json::to_vec(body).unwrap(), Some(&id)).await {
            Ok(_) => return id,
            Err(error) => {
                assert!(Instant::now() < deadline, "cannot submit {id} within {BOUND:?}: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// SIGKILLs a worker at `point` of its first task, restarts it, and checks
/// that both tasks get exactly one correct result and nothing is left.
async fn crash_and_recover(point: &str) {
    let worker_id = format!("crash-{}", point.replace('_', "-"));
    let Setup { dir: _dir, broker, data } = Setup::new(&format!("pipeline-{worker_id}")).await;
    // One task at a time: the crash hits the first task submitted, and the
    // second is still queued when the worker dies.
    let mut worker = Worker::start_with_env(
        &data,
        &broker.url,
        &worker_id,
        &["--concurrency", "1"],
        &[("QUILT_CRASH_AT", point)],
    );
    let agent = Agent::connect(&broker.url).await;
    let mut seen = agent.subscribe_results().await;

    // The first task still runs when `after_start` fires, so there is a
    // live container to reap.
    let first = agent.submit(&task("t-first", &["sh", "-c", "sleep 0.5; echo first"])).await;
    let second = agent.submit(&task("t-second", &["sh", "-c", "echo second"])).await;

    let status = worker.wait_exit(BOUND);
    assert_eq!(
        status.signal(),
        Some(9),
        "the worker did not crash at {point}: {status}\n{}",
        worker.log_text()
    );
    let left_at_crash = containers_of(&worker_id);
    if point == "after_start" {
        assert!(!left_at_crash.is_empty(), "no container left by a crash right after its start");
    }

    worker.restart(&[]);
    let results = [(first.as_str(), "first\n"), (second.as_str(), "second\n")];
    for (id, stdout) in results {
        let result = agent.result(id, BOUND).await;
        assert_eq!(result["status"], "succeeded", "{point}: {result:#}");
        assert_eq!(result["stdout"], stdout, "{point}: {result:#}");
        assert_eq!(result["worker_id"], worker_id.as_str());
    }
    wait_queue_empty(&agent).await;
    assert_eq!(agent.results_stored().await, 2, "{point}: one stored result per task");
    let ids = drain_results(&mut seen, QUIET).await;
    for (id, _) in results {
        assert_eq!(ids.iter().filter(|seen| *seen == id).count(), 1, "{point}: results seen {ids:?}");
    }

    // A task whose result was stored before the crash is answered from the
    // log; one without a stored result runs again on its redelivery.
    let rerun = matches!(point, "after_fetch" | "after_start" | "after_exit");
    let result = agent.result(&first, BOUND).await;
    assert_eq!(result["attempt"], if rerun { 2 } else { 1 }, "{point}: {result:#}");

    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert_worker_left_nothing(&worker_id, &data);
    assert_log_replays_empty(&data);

    // A clean start after the recovery finds nothing to reap or release.
    worker.restart(&[]);
    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert_log_replays_empty(&data);
    let events = wait_events(&agent, &worker_id, "worker_started", 3).await;
    let starts: Vec<u64> =
        kinds_of(&events, "worker_started").map(|event| event["seq"].as_u64().unwrap()).collect();
    let (second_start, third_start) = (starts[1], starts[2]);
    let in_run = |from: u64, to: u64, kind: &'static str| {
        events
            .iter()
            .filter(move |event| {
                let seq = event["seq"].as_u64().unwrap();
                seq > from && seq < to && event["event"]["kind"] == kind
            })
            .collect::<Vec<_>>()
    };
    // Every container the crash left was reaped by the restart.
    let reaped = in_run(0, second_start, "container_reaped");
    for path in &left_at_crash {
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            reaped.iter().any(|event| event["event"]["container_id"] == name.as_ref()),
            "{point}: container {name} left at the crash was not reaped: {reaped:#?}"
        );
    }
    // The restart settled the task the crash interrupted, before serving:
    // what it did there is the step the dead process never took.
    let (settled_kind, duplicate) = match point {
        "after_stored" => ("result_published", Some(false)),
        "after_published" => ("result_published", Some(true)),
        "before_ack" => ("task_acked", None),
        _ => ("task_released", None),
    };
    let settled: Vec<_> = in_run(starts[0], second_start, settled_kind)
        .into_iter()
        .filter(|event| event["event"]["task_id"] == first.as_str())
        .filter(|event| duplicate.is_none_or(|duplicate| event["event"]["duplicate"] == duplicate))
        .collect();
    assert_eq!(settled.len(), 1, "{point}: the restart did not settle with {settled_kind}: {events:#?}");
    if !rerun {
        let again: Vec<_> = in_run(second_start, u64::MAX, "container_creating")
            .into_iter()
            .filter(|event| event["event"]["task_id"] == first.as_str())
            .collect();
        assert!(again.is_empty(), "{point}: a task with a stored result ran again: {again:#?}");
    }
    assert!(in_run(second_start, third_start, "container_reaped").is_empty(), "{point}: {events:#?}");
    assert!(in_run(second_start, third_start, "task_released").is_empty(), "{point}: {events:#?}");
    // Mirroring is best effort: the crash may have cut off the old
    // process's last events (the log has them, checked above). From the
    // restart on, every container made is removed again.
    let after_restart: Vec<Value> =
        events.iter().filter(|event| event["seq"].as_u64().unwrap() > second_start).cloned().collect();
    assert_no_container_open(&after_restart);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_fetch_recovers() {
    crash_and_recover("after_fetch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_start_recovers() {
    crash_and_recover("after_start").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_exit_recovers() {
    crash_and_recover("after_exit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_stored_recovers() {
    crash_and_recover("after_stored").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_published_recovers() {
    crash_and_recover("after_published").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_before_ack_recovers() {
    crash_and_recover("before_ack").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_while_tasks_run_loses_nothing() {
    let Setup { dir: _dir, broker, data } = Setup::new("pipeline-nats-kill").await;
    let mut worker = Worker::start(&data, &broker.url, "nats-kill", &["--concurrency", "4"]);
    let agent = Agent::connect(&broker.url).await;
    let mut seen = agent.subscribe_results().await;

    let body = |n: usize| task(&format!("t{n}"), &["sh", "-c", &format!("sleep 0.3; echo {n}")]);
    for n in 0..10 {
        agent.submit(&body(n)).await;
    }
    // Kill the server once the first task finished: others are running,
    // the rest are queued.
    agent.result("t0", BOUND).await;
    let pid = broker.pid();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + BOUND;
    while broker.restarts() < 1 {
        assert!(Instant::now() < deadline, "nats-server not restarted within {BOUND:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(broker.pid(), pid);
    for n in 10..20 {
        submit_retrying(&agent, &body(n)).await;
    }

    // Promptly: a delivery the restarted server forgot must not hold a
    // slot for long (the worker once waited out five 10 s ack timeouts).
    for n in 0..20 {
        let result = agent.result(&format!("t{n}"), RECOVERY).await;
        assert_eq!(result["status"], "succeeded", "{result:#}");
        assert_eq!(result["stdout"], format!("{n}\n"));
    }
    wait_queue_empty(&agent).await;
    assert_eq!(agent.results_stored().await, 20, "one stored result per task");
    // A core subscriber misses what is published while the server is down,
    // but must never see a task answered twice.
    let ids = drain_results(&mut seen, QUIET).await;
    for n in 0..20 {
        let id = format!("t{n}");
        assert!(ids.iter().filter(|seen| **seen == id).count() <= 1, "results seen: {ids:?}");
    }

    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert_worker_left_nothing("nats-kill", &data);
    assert_log_replays_empty(&data);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_past_ack_wait_discards_its_result() {
    let dir = TestDir::new("pipeline-paused");
    let broker = Broker::start(&dir.path.join("nats")).await;
    let (data_a, data_b) = (dir.path.join("worker-a"), dir.path.join("worker-b"));
    import_busybox(&data_a);
    import_busybox(&data_b);
    let mut worker_a = Worker::start(&data_a, &broker.url, "w-a", &["--concurrency", "1"]);
    let agent = Agent::connect(&broker.url).await;
    let mut seen = agent.subscribe_results().await;
    let mut a_events = agent.client.subscribe("quilt.events.w-a.>").await.unwrap();
    agent.client.flush().await.unwrap();

    let id = agent.submit(&task("t-slow", &["sh", "-c", "sleep 4; echo done"])).await;
    // A holds the task and its container runs: pause A so it cannot renew
    // its lease. B starts only now, so the task cannot go to B first.
    let started = next_event(&mut a_events, "container_started").await;
    assert_eq!(started["event"]["task_id"], "t-slow");
    worker_a.signal(Signal::SIGSTOP);
    let mut worker_b = Worker::start(&data_b, &broker.url, "w-b", &["--concurrency", "1"]);

    // After AckWait (2 s) the server redelivers the task to B, which runs it.
    let result = agent.result(&id, BOUND).await;
    assert_eq!(result["worker_id"], "w-b", "{result:#}");
    assert_eq!(result["stdout"], "done\n");
    assert_eq!(result["attempt"], 2);

    // A wakes up with its own, now stale, result: it must drop it.
    worker_a.signal(Signal::SIGCONT);
    let discarded = next_event(&mut a_events, "result_discarded").await;
    assert_eq!(discarded["event"]["task_id"], "t-slow");

    wait_queue_empty(&agent).await;
    assert_eq!(agent.results_stored().await, 1, "one stored result");
    assert_eq!(agent.result_now(&id).await.unwrap()["worker_id"], "w-b", "B's result stands");
    let ids = drain_results(&mut seen, QUIET).await;
    assert_eq!(ids, vec![id.clone()], "results seen on core NATS");
    let a_log = mirrored_events(&agent, "w-a").await;
    assert_eq!(kinds_of(&a_log, "result_published").count(), 0, "A published: {a_log:#?}");

    assert!(worker_a.terminate().success(), "{}", worker_a.log_text());
    assert!(worker_b.terminate().success(), "{}", worker_b.log_text());
    assert_worker_left_nothing("w-a", &data_a);
    assert_worker_left_nothing("w-b", &data_b);
    assert_log_replays_empty(&data_a);
    assert_log_replays_empty(&data_b);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_delivered_again_to_the_worker_running_it_runs_once() {
    let Setup { dir: _dir, broker, data } = Setup::new("pipeline-again").await;
    // A free slot keeps a pull request open, so the redelivery comes to the
    // worker that still runs the task.
    let mut worker = Worker::start(&data, &broker.url, "again", &["--concurrency", "2"]);
    let agent = Agent::connect(&broker.url).await;
    let mut seen = agent.subscribe_results().await;
    let mut events = agent.client.subscribe("quilt.events.again.>").await.unwrap();
    agent.client.flush().await.unwrap();

    let id = agent.submit(&task("t-again", &["sh", "-c", "sleep 6; echo once"])).await;
    next_event(&mut events, "container_started").await;
    // Paused past AckWait (2 s): no progress acks, the server redelivers.
    worker.signal(Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    worker.signal(Signal::SIGCONT);

    let result = agent.result(&id, BOUND).await;
    assert_eq!(result["stdout"], "once\n", "{result:#}");
    wait_queue_empty(&agent).await;
    assert!(worker.terminate().success(), "{}", worker.log_text());
    let log = mirrored_events(&agent, "again").await;
    let runs = kinds_of(&log, "container_creating").count();
    assert_eq!(runs, 1, "the task ran {runs} times: {log:#?}");
    assert_eq!(kinds_of(&log, "result_discarded").count(), 0, "{log:#?}");
    // The premise: the redelivery did reach this worker during the run.
    assert!(
        worker.log_text().contains("task delivered again while running here"),
        "the task was not delivered again during its run: {}",
        worker.log_text()
    );
    assert_eq!(agent.results_stored().await, 1);
    assert_eq!(drain_results(&mut seen, QUIET).await, vec![id]);
    assert_worker_left_nothing("again", &data);
    assert_log_replays_empty(&data);
    broker.stop().await;
}
