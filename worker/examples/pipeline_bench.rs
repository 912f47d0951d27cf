//! End-to-end figures of the task pipeline against `crun run`, in one run
//! (PERF.md P2, P3, P5). Driven by `scripts/bench-pipeline`, which starts
//! `quilt up` with a busybox image and makes the crun bundle.
//!
//! P2: an agent with a NATS connection publishes a `/bin/true` task and
//!     waits for its result; interleaved sample by sample with `crun run`
//!     of the same busybox rootfs (memory + pids limits), back to back and
//!     with an idle gap before each sample.
//! P3: tasks published as fast as the agent can, completions per second,
//!     against four parallel `crun run` loops over the same wall time.
//! P5: resident memory of the idle worker process (`--worker-pid`).
//!
//! Usage: pipeline_bench --url URL --bundle DIR --worker-pid PID [--n 100] [--gap-ms 100] [--seconds 10] [--tasks 400]

#[path = "support/publish.rs"]
mod publish;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use futures_util::StreamExt;

struct Args {
    url: String,
    bundle: String,
    worker_pid: u32,
    n: usize,
    gap_ms: u64,
    seconds: u64,
    tasks: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        url: String::new(),
        bundle: String::new(),
        worker_pid: 0,
        n: 100,
        gap_ms: 100,
        seconds: 10,
        tasks: 400,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value,
            "--bundle" => args.bundle = value,
            "--worker-pid" => args.worker_pid = value.parse().expect("--worker-pid"),
            "--n" => args.n = value.parse().expect("--n"),
            "--gap-ms" => args.gap_ms = value.parse().expect("--gap-ms"),
            "--seconds" => args.seconds = value.parse().expect("--seconds"),
            "--tasks" => args.tasks = value.parse().expect("--tasks"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!args.url.is_empty() && !args.bundle.is_empty(), "--url and --bundle are required");
    args
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let index = ((p / 100.0 * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[index]
}

/// One `crun run` + `crun delete`, timing the run only (as peer-latency does).
fn crun_once(bundle: &str, name: &str) -> f64 {
    let started = Instant::now();
    let status = Command::new("crun")
        .args(["run", "--bundle", bundle, name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("crun");
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    let _ = Command::new("crun").args(["delete", "-f", name]).stderr(Stdio::null()).status();
    assert!(status.success(), "crun run failed: {status}");
    elapsed
}

async fn task_once(client: &async_nats::Client, jetstream: &async_nats::jetstream::Context, id: &str) -> f64 {
    let started = Instant::now();
    let mut result = client.subscribe(format!("quilt.results.{id}")).await.unwrap();
    let task = serde_json::json!({"id": id, "image": "busybox", "command": ["/bin/true"]});
    jetstream
        .send_publish(
            "quilt.tasks",
            PublishMessage::build().payload(serde_json::to_vec(&task).unwrap().into()).message_id(id),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let message =
        tokio::time::timeout(Duration::from_secs(30), result.next()).await.expect("result").unwrap();
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    let value: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(value["status"], "succeeded", "{value}");
    elapsed
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse_args();
    let client = async_nats::connect(&args.url).await.expect("connect");
    let jetstream = async_nats::jetstream::new(client.clone());
    let run = std::process::id();

    if args.worker_pid != 0 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!(
            "P5 idle worker RSS: {} KiB (pid {})",
            rss_kib(args.worker_pid).unwrap_or(0),
            args.worker_pid
        );
    }

    // P2, both passes, interleaved with crun sample by sample.
    for gap in [0, args.gap_ms] {
        let (mut quilt, mut crun) = (Vec::new(), Vec::new());
        for i in 0..args.n + 5 {
            let order_quilt_first = i % 2 == 0;
            for first in [true, false] {
                if gap > 0 {
                    tokio::time::sleep(Duration::from_millis(gap)).await;
                }
                if first == order_quilt_first {
                    let sample = task_once(&client, &jetstream, &format!("bench-{run}-{gap}-{i}")).await;
                    if i >= 5 {
                        quilt.push(sample);
                    }
                } else {
                    let bundle = args.bundle.clone();
                    let name = format!("bench-{run}-{gap}-{i}");
                    let sample =
                        tokio::task::spawn_blocking(move || crun_once(&bundle, &name)).await.unwrap();
                    if i >= 5 {
                        crun.push(sample);
                    }
                }
            }
        }
        let quilt_median = percentile(&mut quilt, 50.0);
        let crun_median = percentile(&mut crun, 50.0);
        println!(
            "P2 gap_ms={gap} n={}: quilt publish->result median {quilt_median:.2} ms (p95 {:.2}), crun run median {crun_median:.2} ms (p95 {:.2}); ratio quilt/crun {:.3}",
            args.n,
            percentile(&mut quilt, 95.0),
            percentile(&mut crun, 95.0),
            quilt_median / crun_median
        );
    }

    // P3: four crun loops for `seconds`, then the queue for as many tasks.
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let loops: Vec<_> = (0..4)
        .map(|loop_index| {
            let bundle = args.bundle.clone();
            std::thread::spawn(move || {
                let mut runs = 0u64;
                while Instant::now() < deadline {
                    crun_once(&bundle, &format!("bench-{run}-loop{loop_index}-{runs}"));
                    runs += 1;
                }
                runs
            })
        })
        .collect();
    let crun_runs: u64 = loops.into_iter().map(|handle| handle.join().unwrap()).sum();
    let crun_rate = crun_runs as f64 / started.elapsed().as_secs_f64();

    let mut results = client.subscribe("quilt.results.*").await.unwrap();
    client.flush().await.unwrap();
    let started = Instant::now();
    publish::publish_true_tasks(&jetstream, (0..args.tasks).map(|i| format!("bench-{run}-burst-{i}"))).await;
    let mut done = 0;
    while done < args.tasks {
        let message =
            tokio::time::timeout(Duration::from_secs(60), results.next()).await.expect("results").unwrap();
        let value: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        if value["id"].as_str().is_some_and(|id| id.starts_with(&format!("bench-{run}-burst-"))) {
            assert_eq!(value["status"], "succeeded", "{value}");
            done += 1;
        }
    }
    let quilt_rate = args.tasks as f64 / started.elapsed().as_secs_f64();
    println!(
        "P3: quilt {quilt_rate:.1} tasks/s ({} tasks), 4 crun loops {crun_rate:.1} runs/s ({crun_runs} runs in {} s); ratio {:.2}",
        args.tasks,
        args.seconds,
        quilt_rate / crun_rate
    );
    if args.worker_pid != 0 {
        println!("worker RSS after the burst: {} KiB", rss_kib(args.worker_pid).unwrap_or(0));
    }
}
