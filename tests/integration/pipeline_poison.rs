//! Poison input against a real worker: malformed JSON, wrong types, unknown
//! fields, a payload over the limit, a missing image, a missing command, a
//! task that keeps failing and one that kills its worker every time. Each
//! gets a clear answer (a `rejected` or `error` result naming the problem,
//! or a dead letter), and the worker keeps serving the next task.

use std::time::Duration;

use nix::sys::signal::Signal;
use quilt_tests::pipeline::{task, Agent, Broker, Setup, Worker, BOUND};
use quilt_tests::TestDir;
use serde_json::{json, Value};

async fn setup(name: &str, worker_args: &[&str]) -> (TestDir, Broker, Worker, Agent) {
    let Setup { dir, broker, data } = Setup::new(name).await;
    let worker = Worker::start(&data, &broker.url, name, worker_args);
    let agent = Agent::connect(&broker.url).await;
    (dir, broker, worker, agent)
}

fn assert_error(result: &Value, status: &str, kind: &str, mentions: &str) {
    assert_eq!(result["status"], status, "{result:#}");
    assert_eq!(result["error"]["kind"], kind, "{result:#}");
    let message = result["error"]["message"].as_str().unwrap();
    assert!(message.contains(mentions), "{message:?} does not mention {mentions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tasks_are_rejected_naming_the_field_and_the_worker_keeps_serving() {
    let (_dir, broker, mut worker, agent) = setup("poison", &[]).await;

    // Not JSON at all: the id comes from the message id header.
    agent.submit_raw(b"{not json".to_vec(), Some("p-garbage")).await.unwrap();
    // Wrong type, unknown field, a bad value, a missing required field.
    let cases: &[(&str, Value, &str)] = &[
        (
            "p-types",
            json!({"id": "p-types", "image": "busybox", "limits": {"memory_mb": "lots"}}),
            "limits.memory_mb",
        ),
        (
            "p-unknown",
            json!({"id": "p-unknown", "image": "busybox", "command": ["true"], "colour": "red"}),
            "colour",
        ),
        ("p-cpus", json!({"id": "p-cpus", "image": "busybox", "limits": {"cpus": -2}}), "limits.cpus"),
        ("p-noimage-field", json!({"id": "p-noimage-field", "command": ["true"]}), "image"),
        (
            "p-mode",
            json!({"id": "p-mode", "image": "busybox", "container": {"mode": "forever"}}),
            "container",
        ),
        (
            "p-host",
            json!({"id": "p-host", "image": "busybox", "command": ["true"], "network": "host"}),
            "network",
        ),
    ];
    for (id, body, _) in cases {
        agent.submit_raw(serde_json::to_vec(body).unwrap(), Some(id)).await.unwrap();
    }
    // An image the worker does not have (and may not pull).
    agent
        .submit(&json!({"id": "p-missing-image", "image": "example.invalid/nope:1", "command": ["true"]}))
        .await;
    // A command the image does not have.
    agent.submit(&task("p-nocmd", &["/no/such/program"])).await;
    // Over the stream's size limit: refused to the publisher outright.
    let huge = json!({"id": "p-huge", "image": "busybox", "stdin": "x".repeat(2 << 20)});
    let refused = agent.submit_raw(serde_json::to_vec(&huge).unwrap(), Some("p-huge")).await;
    assert!(refused.is_err(), "a 2 MiB task was accepted");
    // And a good task after all of it.
    agent.submit(&task("p-good", &["echo", "still serving"])).await;

    let result = agent.result("p-garbage", BOUND).await;
    assert_error(&result, "rejected", "invalid_task", "key must be a string");
    for (id, _, field) in cases {
        let result = agent.result(id, BOUND).await;
        assert_error(&result, "rejected", "invalid_task", field);
    }
    let result = agent.result("p-missing-image", BOUND).await;
    assert_error(&result, "rejected", "image_not_found", "example.invalid/nope");
    let result = agent.result("p-nocmd", BOUND).await;
    assert_error(&result, "error", "command_not_found", "");
    assert_eq!(agent.result_now("p-huge").await, None);
    let result = agent.result("p-good", BOUND).await;
    assert_eq!(result["stdout"], "still serving\n");

    // Rejections are final: none of them was delivered twice.
    let log = worker.log_text();
    assert!(!log.contains("handing it back"), "a rejected task was retried:\n{log}");
    assert!(agent.dead_letters().await.is_empty());
    assert!(worker.terminate().success());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_on_every_delivery_is_dead_lettered_with_its_last_error() {
    // Pulling from a registry that refuses connections fails in a way worth
    // retrying; after --max-deliver attempts the task is dead-lettered.
    let (_dir, broker, mut worker, agent) =
        setup("poison-dlq", &["--max-deliver", "2", "--insecure-registry", "127.0.0.1:1"]).await;
    agent.submit(&json!({"id": "p-retry", "image": "127.0.0.1:1/nothing/here:1", "command": ["true"]})).await;
    let result = agent.result("p-retry", BOUND).await;
    assert_eq!(result["status"], "error", "{result:#}");
    assert_eq!(result["attempt"], 2);
    assert!(
        result["error"]["message"].as_str().unwrap().contains("gave up after 2 deliveries"),
        "{result:#}"
    );
    let letters = agent.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["task_id"], "p-retry");
    assert_eq!(letters[0]["attempts"], 2);
    assert_eq!(letters[0]["error"]["kind"], result["error"]["kind"]);
    assert!(letters[0]["task"].as_str().unwrap().contains("127.0.0.1:1/nothing/here:1"));
    assert_eq!(letters[0]["headers"]["Nats-Msg-Id"], "p-retry");

    agent.submit(&task("p-after", &["echo", "ok"])).await;
    assert_eq!(agent.result("p-after", BOUND).await["stdout"], "ok\n");
    assert!(worker.terminate().success());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_its_worker_every_time_is_dead_lettered() {
    let Setup { dir: _dir, broker, data } = Setup::new("poison-killer").await;
    let crash = [("QUILT_CRASH_AT", "after_fetch")];
    let mut worker = Worker::start_with_env(&data, &broker.url, "killer", &["--max-deliver", "2"], &crash);
    let agent = Agent::connect(&broker.url).await;
    agent.submit(&task("p-killer", &["true"])).await;
    // Both allowed deliveries kill the worker; it is restarted each time
    // (as its service manager would), the last time without the fault.
    for restart_with in [&crash[..], &[]] {
        let status = worker.wait_exit(BOUND);
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(Signal::SIGKILL as i32));
        worker.restart(restart_with);
    }
    let result = agent.result("p-killer", BOUND).await;
    assert_error(&result, "error", "max_deliveries", "delivered 2 times");
    let letters = agent.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["task_id"], "p-killer");
    // The queue no longer holds it, and the worker serves the next task.
    agent.submit(&task("p-next", &["echo", "next"])).await;
    assert_eq!(agent.result("p-next", BOUND).await["stdout"], "next\n");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut tasks = agent.jetstream.get_stream("QUILT_TASKS").await.unwrap();
    assert_eq!(tasks.info().await.unwrap().state.messages, 0);
    assert!(worker.terminate().success());
    broker.stop().await;
}
