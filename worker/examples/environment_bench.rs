//! PERF.md P4: a Python task whose environment (python3 + a pip package) is
//! built and cached, against the same task on an image that already holds
//! those packages, interleaved sample by sample in one run. Also the cold
//! build: the first task on a fresh environment, end to end, with the
//! build time the worker reports. Driven by `scripts/bench-environments`,
//! which starts `quilt up` with both images imported (`debian:py` and
//! `debian:baked`, the latter made by running the same apt and pip commands
//! directly in a bwrap container: the peer of the cold build).
//!
//! Usage: environment_bench --url URL [--n 40] [--package six==1.16.0]

use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use futures_util::StreamExt;
use serde_json::{json, Value};

const CODE: &str = "import six; print(six.__version__)";

async fn task_once(
    client: &async_nats::Client,
    jetstream: &async_nats::jetstream::Context,
    task: &Value,
) -> (f64, Value) {
    let id = task["id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let mut result = client.subscribe(format!("quilt.results.{id}")).await.unwrap();
    client.flush().await.unwrap();
    let publish = PublishMessage::build().payload(serde_json::to_vec(task).unwrap().into()).message_id(&id);
    jetstream.send_publish("quilt.tasks", publish).await.unwrap().await.unwrap();
    let message =
        tokio::time::timeout(Duration::from_secs(900), result.next()).await.expect("result").unwrap();
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    let value: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(value["status"], "succeeded", "{value}");
    (elapsed, value)
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut url = String::new();
    let mut n = 40usize;
    let mut package = "six==1.16.0".to_owned();
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value = given.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => url = value,
            "--n" => n = value.parse().expect("--n"),
            "--package" => package = value,
            other => panic!("unknown flag {other}"),
        }
    }
    let client = async_nats::connect(&url).await.expect("connect");
    let jetstream = async_nats::jetstream::new(client.clone());
    let run = std::process::id();
    let with_environment = |id: String| json!({"id": id, "image": "debian:py", "command": ["python3", "-c", CODE], "environment": {"pip": [package]}});
    let baked = |id: String| {
        json!({
            "id": id, "image": "debian:baked", "command": ["python3", "-c", CODE],
            "env": {"PATH": "/opt/quilt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        })
    };

    // Cold: the first task builds the environment.
    let (cold, value) = task_once(&client, &jetstream, &with_environment(format!("cold-{run}"))).await;
    assert_eq!(value["environment"]["cache"], "miss", "{value}");
    let build_ms = value["environment"]["build_ms"].as_f64().unwrap_or(0.0);
    println!("cold: first task {cold:.0} ms end to end, of which the environment build {build_ms:.0} ms");

    // Warm, interleaved with the baked image.
    let (mut warm, mut peer) = (Vec::new(), Vec::new());
    for round in 0..n + 3 {
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for environment in order {
            let id = format!("p4-{run}-{round}-{}", if environment { "env" } else { "baked" });
            let task = if environment { with_environment(id) } else { baked(id) };
            let (elapsed, value) = task_once(&client, &jetstream, &task).await;
            assert_eq!(value["stdout"], "1.16.0\n", "{value}");
            if environment {
                assert_eq!(value["environment"]["cache"], "hit", "{value}");
            }
            if round >= 3 {
                if environment { &mut warm } else { &mut peer }.push(elapsed);
            }
        }
    }
    let (warm, peer) = (median(&mut warm), median(&mut peer));
    println!(
        "P4 n={n}: cached environment median {warm:.2} ms, baked image median {peer:.2} ms, ratio {:.3}",
        warm / peer
    );
}
