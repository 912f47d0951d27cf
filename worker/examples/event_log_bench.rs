//! P6 of PERF.md: durable appends per second to the event log, one producer
//! awaiting each append (no batching possible) and 64 concurrent producers
//! (group commit), and start-up time to rebuild a projection over 1M events,
//! with and without a snapshot. Medians of 3 runs.
//!
//! `cargo run --release --example event_log_bench [-- --events N --replay N]`

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use quilt::events::{rebuild, EventLog, Projection};
use serde::{Deserialize, Serialize};

const RUNS: usize = 3;
const PRODUCERS: u64 = 64;
/// Live tasks in the replay projection: a worker's state is bounded by what
/// runs now, not by its history.
const LIVE_TASKS: u64 = 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
enum TaskEvent {
    Started { task: u64, image: String },
    Finished { task: u64, exit_code: i32 },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Tasks {
    running: BTreeMap<u64, String>,
    finished: u64,
}

impl Projection for Tasks {
    type Event = TaskEvent;
    fn apply(&mut self, _seq: u64, event: &TaskEvent) {
        match event {
            TaskEvent::Started { task, image } => {
                self.running.insert(*task, image.clone());
            }
            TaskEvent::Finished { task, .. } => {
                self.running.remove(task);
                self.finished += 1;
            }
        }
    }
}

fn event(n: u64) -> TaskEvent {
    let task = (n / 2) % LIVE_TASKS;
    if n.is_multiple_of(2) {
        TaskEvent::Started { task, image: "docker.io/library/python:3.12-slim".into() }
    } else {
        TaskEvent::Finished { task, exit_code: 0 }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn argument(name: &str, default: u64) -> u64 {
    let arguments: Vec<String> = std::env::args().collect();
    arguments
        .iter()
        .position(|a| a == name)
        .and_then(|i| arguments.get(i + 1))
        .map_or(default, |value| value.parse().expect("a number"))
}

async fn append_one_at_a_time(path: &Path, count: u64) -> (f64, Vec<Duration>) {
    let log = EventLog::<TaskEvent>::open(path).unwrap();
    let mut latencies = Vec::with_capacity(count as usize);
    let start = Instant::now();
    for n in 0..count {
        let sent = Instant::now();
        log.append(event(n)).await.unwrap();
        latencies.push(sent.elapsed());
    }
    (count as f64 / start.elapsed().as_secs_f64(), latencies)
}

async fn append_concurrently(path: &Path, count: u64, producers: u64) -> (f64, f64) {
    let log = EventLog::<TaskEvent>::open(path).unwrap();
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|producer| {
            let log = log.clone();
            tokio::spawn(async move {
                for n in (producer..count).step_by(producers as usize) {
                    log.append(event(n)).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    (rate, count as f64 / log.commits() as f64)
}

fn main() {
    let events = argument("--events", 20_000);
    let replay = argument("--replay", 1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();

    let single = events / 4;
    let mut rates = Vec::new();
    let mut latencies = Vec::new();
    for run in 0..RUNS {
        let path = dir.path().join(format!("single-{run}.redb"));
        let (rate, mut run_latencies) = runtime.block_on(append_one_at_a_time(&path, single));
        rates.push(rate);
        latencies.append(&mut run_latencies);
        std::fs::remove_file(path).unwrap();
    }
    latencies.sort();
    let percentile = |p: usize| latencies[latencies.len() * p / 100].as_secs_f64() * 1e6;
    println!(
        "one producer, {single} appends x {RUNS}: median {:.0} events/s (append p50 {:.0} us, p99 {:.0} us)",
        median(rates),
        percentile(50),
        percentile(99)
    );

    let mut rates = Vec::new();
    let mut per_commit = Vec::new();
    for run in 0..RUNS {
        let path = dir.path().join(format!("group-{run}.redb"));
        let (rate, batch) = runtime.block_on(append_concurrently(&path, events, PRODUCERS));
        rates.push(rate);
        per_commit.push(batch);
        std::fs::remove_file(path).unwrap();
    }
    println!(
        "{PRODUCERS} producers, {events} appends x {RUNS}: median {:.0} events/s ({:.1} events per commit)",
        median(rates),
        median(per_commit)
    );

    // One log of `replay` events, written with group commit (256 producers to
    // keep the set-up short); its projection is checked against a fold.
    let path = dir.path().join("replay.redb");
    let start = Instant::now();
    runtime.block_on(append_concurrently(&path, replay, 256));
    println!("wrote {replay} events in {:.1} s", start.elapsed().as_secs_f64());
    let log = EventLog::<TaskEvent>::open(&path).unwrap();
    let time_rebuild = |log: &EventLog<TaskEvent>| {
        let times: Vec<f64> = (0..RUNS)
            .map(|_| {
                let start = Instant::now();
                let (tasks, last) = rebuild::<Tasks, _>(log).unwrap();
                let elapsed = start.elapsed().as_secs_f64();
                assert_eq!((last, tasks.finished), (replay, replay / 2));
                elapsed
            })
            .collect();
        median(times)
    };
    println!("rebuild over {replay} events, no snapshot: median {:.3} s", time_rebuild(&log));
    // A worker snapshots every 10k events, so at most that many follow the
    // snapshot at start-up; take it 5k events before the end.
    let up_to = replay - 5_000;
    let mut state = Tasks::default();
    log.replay(1, |seq, event| {
        if seq <= up_to {
            state.apply(seq, &event);
        }
    })
    .unwrap();
    runtime.block_on(log.snapshot(up_to, &state)).unwrap();
    println!(
        "rebuild over {replay} events, snapshot at {up_to} + 5000 events: median {:.3} s",
        time_rebuild(&log)
    );
}
