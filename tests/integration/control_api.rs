//! The control API answers plain NATS requests, not only the CLI: the micro
//! service discovery (`$SRV.PING.quilt`) finds the worker, and its verbs on
//! `quilt.api.<worker>.<verb>` and `quilt.api.any.<verb>` describe what runs.

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use quilt_tests::pipeline::{task, Agent, Setup, Worker, BOUND};
use quilt_tests::{quilt_binary, text, wait_bounded};
use serde_json::Value;

async fn request(agent: &Agent, subject: &str, body: &str) -> Value {
    let reply = tokio::time::timeout(BOUND, agent.client.request(subject.to_owned(), body.to_owned().into()))
        .await
        .expect("a reply within the bound")
        .unwrap_or_else(|error| panic!("request {subject}: {error}"));
    serde_json::from_slice(&reply.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_answers_plain_nats_requests() {
    let Setup { dir, broker, data } = Setup::new("control-api").await;
    let mut worker = Worker::start(&data, &broker.url, "api", &[]);
    let agent = Agent::connect(&broker.url).await;

    // Discovery: every instance of the service answers a ping.
    let inbox = agent.client.new_inbox();
    let mut pings = agent.client.subscribe(inbox.clone()).await.unwrap();
    agent.client.publish_with_reply("$SRV.PING.quilt", inbox, "".into()).await.unwrap();
    let ping = tokio::time::timeout(BOUND, pings.next()).await.unwrap().unwrap();
    let ping: Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "quilt");
    assert_eq!(ping["metadata"]["worker_id"], "api");

    // A running task's container is listed and can be inspected.
    agent.submit(&task("t-api", &["sleep", "3"])).await;
    let container = loop {
        let list = request(&agent, "quilt.api.api.containers.list", "").await;
        let started = list["ok"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["task_id"] == "t-api" && c["pid"].is_i64())
            .cloned();
        if let Some(container) = started {
            break container;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let id = container["id"].as_str().unwrap();
    assert!(id.starts_with("api."));
    let inspected = request(&agent, "quilt.api.any.containers.inspect", id).await;
    assert_eq!(inspected["ok"], container);
    let missing = request(&agent, "quilt.api.api.containers.inspect", "api.nope").await;
    assert_eq!(missing["error"]["kind"], "not_found", "{missing}");

    let info = request(&agent, "quilt.api.any.worker.info", "").await;
    assert_eq!(info["ok"]["worker_id"], "api");
    assert_eq!(info["ok"]["running"], 1);
    assert_eq!(info["ok"]["concurrency"], 4);
    let images = request(&agent, "quilt.api.api.images.list", "").await;
    assert!(
        images["ok"]
            .as_array()
            .unwrap()
            .iter()
            .any(|image| image["name"] == "docker.io/library/busybox:latest"),
        "{images}"
    );
    assert_eq!(request(&agent, "quilt.api.api.health", "").await["ok"], "ok");

    // And the CLI over the same API.
    let ps = Command::new(quilt_binary())
        .arg("--data-dir")
        .arg(dir.path.join("client"))
        .args(["ps", "--nats", &broker.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ps = wait_bounded(ps, BOUND, &["ps"]);
    assert!(ps.status.success(), "{}", text(&ps.stderr));
    let table = text(&ps.stdout);
    assert!(table.contains(id) && table.contains("t-api"), "{table}");

    assert!(worker.terminate().success());
    broker.stop().await;
}
