//! Throughput of a Quilt fleet: an agent publishes a burst of `/bin/true`
//! tasks as fast as it can and counts results until all are in. Prints the
//! rate, and how many tasks each worker ran, as one JSON line. Driven by
//! `scripts/bench-scale`, which starts deploy/sim with 1, 2 and 3 VMs.
//!
//! Usage: scale_bench --url nats://user:password@host:4222 [--tasks 300] [--warmup 20]

#[path = "support/publish.rs"]
mod publish;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

struct Args {
    url: String,
    tasks: usize,
    warmup: usize,
}

fn parse_args() -> Args {
    let mut args = Args { url: String::new(), tasks: 300, warmup: 20 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value,
            "--tasks" => args.tasks = value.parse().expect("--tasks"),
            "--warmup" => args.warmup = value.parse().expect("--warmup"),
            _ => panic!("unknown flag {flag}"),
        }
    }
    assert!(!args.url.is_empty(), "--url is required");
    args
}

async fn connect(url: &str) -> async_nats::Client {
    let rest = url.trim_start_matches("nats://");
    let options = match rest.split_once('@') {
        Some((credentials, _)) => {
            let (user, password) = credentials.split_once(':').expect("user:password@");
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        }
        None => async_nats::ConnectOptions::new(),
    };
    let address = rest.rsplit_once('@').map_or(rest, |(_, address)| address);
    options.connect(address).await.expect("connect")
}

/// Publishes `count` tasks named `prefix-N`, then waits for their results;
/// returns the seconds from the first publish to the last result, and the
/// count per worker.
async fn burst(client: &async_nats::Client, prefix: &str, count: usize) -> (f64, BTreeMap<String, usize>) {
    let jetstream = async_nats::jetstream::new(client.clone());
    let mut results = client.subscribe("quilt.results.*").await.unwrap();
    client.flush().await.unwrap();
    let started = Instant::now();
    publish::publish_true_tasks(&jetstream, (0..count).map(|i| format!("{prefix}-{i}"))).await;
    let mut by_worker = BTreeMap::new();
    let mut done = 0;
    while done < count {
        let message =
            tokio::time::timeout(Duration::from_secs(120), results.next()).await.expect("results").unwrap();
        let value: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        if !value["id"].as_str().is_some_and(|id| id.starts_with(&format!("{prefix}-"))) {
            continue;
        }
        assert_eq!(value["status"], "succeeded", "{value}");
        *by_worker.entry(value["worker_id"].as_str().unwrap_or("?").to_owned()).or_insert(0) += 1;
        done += 1;
    }
    (started.elapsed().as_secs_f64(), by_worker)
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let client = connect(&args.url).await;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    // Warm up: images, environment of the first containers, connections.
    burst(&client, &format!("warm{run}"), args.warmup).await;
    let (seconds, by_worker) = burst(&client, &format!("scale{run}"), args.tasks).await;
    println!(
        "{}",
        serde_json::json!({
            "tasks": args.tasks,
            "seconds": seconds,
            "tasks_per_second": args.tasks as f64 / seconds,
            "by_worker": by_worker,
        })
    );
}
