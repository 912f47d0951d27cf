//! The task pipeline end to end: a real nats-server, a real `quilt worker`
//! process, real containers; an agent publishes tasks and reads results and
//! live output over plain NATS.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use quilt_tests::pipeline::{assert_worker_left_nothing, import_busybox, task, Agent, Setup, Worker, BOUND};
use serde_json::Value;

/// Reads every event the worker mirrored on `QUILT_EVENTS`, in log order.
pub(crate) async fn mirrored_events(agent: &Agent, worker_id: &str) -> Vec<Value> {
    let mut stream = agent.jetstream.get_stream("QUILT_EVENTS").await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut events = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(message) = stream.get_raw_message(seq).await {
            let event: Value = serde_json::from_slice(&message.payload).unwrap();
            if event["worker_id"] == worker_id {
                events.push(event);
            }
        }
    }
    events.sort_by_key(|event| event["seq"].as_u64());
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_streams_its_output_live_and_returns_one_result() {
    let Setup { dir: _dir, broker, data } = Setup::new("pipeline-e2e").await;
    let mut worker = Worker::start(&data, &broker.url, "e2e", &[]);
    let agent = Agent::connect(&broker.url).await;

    let mut output = agent.client.subscribe("quilt.output.t-live.*").await.unwrap();
    agent.client.flush().await.unwrap();
    let id = agent
        .submit(&task("t-live", &["sh", "-c", "echo out; echo err >&2; sleep 0.3; printf 'more é'"]))
        .await;
    let result = agent.result(&id, BOUND).await;
    assert_eq!(result["status"], "succeeded", "{result:#}");
    assert_eq!(result["exit_code"], 0);
    assert_eq!(result["stdout"], "out\nmore é");
    assert_eq!(result["stderr"], "err\n");
    assert_eq!(result["worker_id"], "e2e");
    assert_eq!(result["attempt"], 1);
    assert!(result["container_id"].as_str().unwrap().starts_with("e2e."));

    // The live chunks add up to the same text, each stream ends with eof.
    let mut streams: BTreeMap<String, (String, bool)> = BTreeMap::new();
    while streams.values().filter(|(_, eof)| *eof).count() < 2 {
        let message = tokio::time::timeout(BOUND, output.next()).await.expect("output within bound").unwrap();
        let chunk: Value = serde_json::from_slice(&message.payload).unwrap();
        let entry = streams.entry(chunk["stream"].as_str().unwrap().to_owned()).or_default();
        assert_eq!(chunk["offset"].as_u64().unwrap(), entry.0.len() as u64, "chunks in order, no gap");
        entry.0.push_str(chunk["data"].as_str().unwrap());
        entry.1 |= chunk["eof"].as_bool().unwrap();
    }
    assert_eq!(streams["stdout"].0, "out\nmore é");
    assert_eq!(streams["stderr"].0, "err\n");

    // A failing command is a result too, with its code.
    let id = agent.submit(&task("t-fail", &["sh", "-c", "exit 3"])).await;
    let result = agent.result(&id, BOUND).await;
    assert_eq!(result["status"], "failed");
    assert_eq!(result["exit_code"], 3);

    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert_worker_left_nothing("e2e", &data);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tasks_run_with_at_most_the_configured_concurrency() {
    let Setup { dir: _dir, broker, data } = Setup::new("pipeline-fifty").await;
    let mut worker = Worker::start(&data, &broker.url, "fifty", &["--concurrency", "4"]);
    let agent = Agent::connect(&broker.url).await;

    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(agent.submit(&task(&format!("t{n}"), &["sh", "-c", &format!("sleep 0.1; echo {n}")])).await);
    }
    for (n, id) in ids.iter().enumerate() {
        let result = agent.result(id, BOUND).await;
        assert_eq!(result["status"], "succeeded", "{result:#}");
        assert_eq!(result["stdout"], format!("{n}\n"));
    }
    assert_eq!(agent.results_stored().await, 50, "one result per task");

    // The worker's own log, in order, says how many containers were alive at once.
    let events = mirrored_events(&agent, "fifty").await;
    let (mut alive, mut most) = (0i64, 0i64);
    for event in &events {
        match event["event"]["kind"].as_str().unwrap() {
            "container_creating" => alive += 1,
            "container_removed" => alive -= 1,
            _ => {}
        }
        most = most.max(alive);
    }
    assert!(most <= 4, "{most} containers at once with --concurrency 4");
    assert!(most >= 2, "tasks never overlapped (at most {most} at once)");
    assert_eq!(alive, 0);

    assert!(worker.terminate().success());
    assert_worker_left_nothing("fifty", &data);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_id_published_twice_runs_once() {
    let Setup { dir: _dir, broker, data } = Setup::new("pipeline-dup").await;
    let mut worker = Worker::start(&data, &broker.url, "dup", &[]);
    let agent = Agent::connect(&broker.url).await;
    let mut seen = agent.subscribe_results().await;

    let body = task("t-twice", &["sh", "-c", "echo ran"]);
    agent.submit(&body).await;
    // Within the stream's duplicate window: dropped by the server.
    assert_eq!(agent.submit_raw(serde_json::to_vec(&body).unwrap(), Some("t-twice")).await, Ok(true));
    let result = agent.result("t-twice", BOUND).await;
    assert_eq!(result["stdout"], "ran\n");
    // Published again under another message id (outside the window, say):
    // the stored result stands and the task is not run again.
    assert_eq!(agent.submit_raw(serde_json::to_vec(&body).unwrap(), Some("t-twice-again")).await, Ok(false));
    let marker = agent.submit(&task("t-after", &["true"])).await;
    agent.result(&marker, BOUND).await;
    let ids = quilt_tests::pipeline::drain_results(&mut seen, Duration::from_millis(500)).await;
    assert_eq!(ids.iter().filter(|id| *id == "t-twice").count(), 1, "results seen: {ids:?}");
    let events = mirrored_events(&agent, "dup").await;
    let runs = events
        .iter()
        .filter(|event| {
            event["event"]["kind"] == "container_creating" && event["event"]["task_id"] == "t-twice"
        })
        .count();
    assert_eq!(runs, 1, "the task ran {runs} times");

    assert!(worker.terminate().success());
    broker.stop().await;
}

/// Waits (bounded) until worker `worker_id` has mirrored an event of `kind` about `task_id`.
pub(crate) async fn wait_for_event(agent: &Agent, worker_id: &str, kind: &str, task_id: &str) {
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        let events = mirrored_events(agent, worker_id).await;
        if events.iter().any(|event| event["event"]["kind"] == kind && event["event"]["task_id"] == task_id) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no {kind} for {task_id} from {worker_id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_fetching_and_lets_running_tasks_finish() {
    let Setup { dir, broker, data } = Setup::new("pipeline-drain").await;
    let mut worker = Worker::start(&data, &broker.url, "drain", &[]);
    let agent = Agent::connect(&broker.url).await;

    agent.submit(&task("t-running", &["sh", "-c", "sleep 1; echo finished"])).await;
    wait_for_event(&agent, "drain", "container_started", "t-running").await;
    worker.signal(nix::sys::signal::Signal::SIGTERM);
    // Published once the worker says it is stopping: not taken by it.
    let deadline = std::time::Instant::now() + BOUND;
    while !worker.log_text().contains("stopping: no new tasks") {
        assert!(std::time::Instant::now() < deadline, "no stop message:\n{}", worker.log_text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    agent.submit(&task("t-later", &["echo", "later"])).await;
    assert!(worker.wait_exit(BOUND).success(), "{}", worker.log_text());
    let result = agent.result_now("t-running").await.expect("the running task finished before the exit");
    assert_eq!(result["stdout"], "finished\n");
    assert_eq!(agent.result_now("t-later").await, None, "a stopping worker took a new task");
    assert_worker_left_nothing("drain", &data);

    // The next worker takes what was left in the queue.
    import_busybox(&dir.path.join("next"));
    let mut next = Worker::start(&dir.path.join("next"), &broker.url, "drain-next", &[]);
    assert_eq!(agent.result("t-later", BOUND).await["stdout"], "later\n");
    assert!(next.terminate().success());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_still_running_after_the_grace_period_are_handed_back() {
    let Setup { dir: _dir, broker, data } = Setup::new("pipeline-handback").await;
    let mut worker = Worker::start(&data, &broker.url, "handback", &["--shutdown-grace", "500ms"]);
    let agent = Agent::connect(&broker.url).await;

    agent.submit(&task("t-long", &["sh", "-c", "sleep 3; echo done"])).await;
    wait_for_event(&agent, "handback", "container_started", "t-long").await;
    let stopped = std::time::Instant::now();
    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert!(stopped.elapsed() < Duration::from_secs(3), "the worker waited for the task past its grace");
    wait_for_event(&agent, "handback", "task_released", "t-long").await;
    assert_eq!(agent.result_now("t-long").await, None);
    assert_worker_left_nothing("handback", &data);

    // Handed back with a NAK: the restarted worker runs it again at once.
    worker.restart(&[]);
    let result = agent.result("t-long", BOUND).await;
    assert_eq!(result["stdout"], "done\n");
    assert_eq!(result["attempt"], 2);
    assert!(worker.terminate().success());
    broker.stop().await;
}
