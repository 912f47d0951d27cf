//! Long-running container figures against crun, in one run (PERF.md P5 and
//! exec latency). Driven by `scripts/bench-long-running`, which starts
//! `quilt up` with a busybox image and makes a crun bundle running `sleep`.
//!
//! Exec: `/bin/true` run inside a running container, start to exit, median
//!     of `--n` samples, interleaved sample by sample: `crun exec` of a
//!     detached crun container; `quilt exec NAME -- /bin/true` (the CLI: a
//!     process, a NATS request, the exec, the result); and the same request
//!     on `quilt.api.any.containers.exec` from a connected client. Back to
//!     back, then with an idle gap before each sample.
//! P5: the `quilt up` process's resident memory idle, then with
//!     `--containers` long-running `sleep` containers, plus the memory of
//!     their shims (RSS, PSS and private), i.e. everything beyond the
//!     containers' own processes that runs on the host for them.
//!
//! Usage: long_running_bench --url URL --bundle DIR --quilt BIN --worker-pid PID [--n 100] [--gap-ms 100] [--containers 200]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use futures_util::StreamExt;
use serde_json::{json, Value};

struct Args {
    url: String,
    bundle: String,
    quilt: String,
    worker_pid: u32,
    n: usize,
    gap_ms: u64,
    containers: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        url: String::new(),
        bundle: String::new(),
        quilt: String::new(),
        worker_pid: 0,
        n: 100,
        gap_ms: 100,
        containers: 200,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value = given.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value,
            "--bundle" => args.bundle = value,
            "--quilt" => args.quilt = value,
            "--worker-pid" => args.worker_pid = value.parse().expect("--worker-pid"),
            "--n" => args.n = value.parse().expect("--n"),
            "--gap-ms" => args.gap_ms = value.parse().expect("--gap-ms"),
            "--containers" => args.containers = value.parse().expect("--containers"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(
        !args.url.is_empty() && !args.bundle.is_empty() && !args.quilt.is_empty() && args.worker_pid != 0
    );
    args
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((p / 100.0 * samples.len() as f64).ceil() as usize).saturating_sub(1).min(samples.len() - 1)]
}

fn run_timed(program: &str, args: &[&str]) -> f64 {
    let started = Instant::now();
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    assert!(status.success(), "{program} {args:?}: {status}");
    elapsed
}

/// `(VmRSS, Pss, Private_Clean + Private_Dirty)` of `pid`, KiB.
fn memory_kib(pid: u32) -> (u64, u64, u64) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        rollup
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"), field("Private_Clean:") + field("Private_Dirty:"))
}

fn parent_of(pid: i64) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rfind(')').unwrap();
    stat[after + 1..].split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn create(client: &async_nats::Client, jetstream: &async_nats::jetstream::Context, name: &str) {
    let id = format!("create-{name}");
    let task = json!({
        "id": id, "image": "busybox", "command": ["sleep", "1000000"],
        "container": {"mode": "long_running", "name": name},
    });
    let mut results = client.subscribe(format!("quilt.results.{id}")).await.unwrap();
    client.flush().await.unwrap();
    let publish = PublishMessage::build().payload(serde_json::to_vec(&task).unwrap().into()).message_id(&id);
    jetstream.send_publish("quilt.tasks", publish).await.unwrap().await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(60), results.next()).await.unwrap().unwrap();
    let result: Value = serde_json::from_slice(&result.payload).unwrap();
    assert_eq!(result["status"], "succeeded", "{result}");
}

async fn api(client: &async_nats::Client, verb: &str, body: &Value) -> Value {
    let reply = client
        .request(format!("quilt.api.any.{verb}"), serde_json::to_vec(body).unwrap().into())
        .await
        .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse_args();
    let client = async_nats::connect(&args.url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_rss, _, _) = memory_kib(args.worker_pid);

    // Exec latency, interleaved with crun exec.
    create(&client, &jetstream, "bench-exec").await;
    let crun_name = format!("lr-bench-{}", std::process::id());
    let started = Command::new("crun")
        .args(["run", "--detach", "--bundle", &args.bundle, &crun_name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(started.success(), "crun run --detach: {started}");
    let exec_body = json!({"name": "bench-exec", "command": ["/bin/true"]});
    for gap_ms in [0, args.gap_ms] {
        let (mut crun, mut cli, mut request) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..args.n + 5 {
            let mut order = [0, 1, 2];
            order.rotate_left(round % 3);
            for variant in order {
                if gap_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(gap_ms)).await;
                }
                let sample = match variant {
                    0 => run_timed("crun", &["exec", &crun_name, "/bin/true"]),
                    1 => run_timed(
                        &args.quilt,
                        &["exec", "--nats", &args.url, "bench-exec", "--", "/bin/true"],
                    ),
                    _ => {
                        let started = Instant::now();
                        let reply = api(&client, "containers.exec", &exec_body).await;
                        let elapsed = started.elapsed().as_secs_f64() * 1e3;
                        assert_eq!(reply["ok"]["exit_code"], 0, "{reply}");
                        elapsed
                    }
                };
                if round >= 5 {
                    [&mut crun, &mut cli, &mut request][variant].push(sample);
                }
            }
        }
        let (crun_median, cli_median, request_median) =
            (median(&mut crun), median(&mut cli), median(&mut request));
        println!(
            "exec /bin/true, gap {gap_ms} ms, n={}: crun exec median {crun_median:.2} ms (p90 {:.2}); quilt exec (CLI) median {cli_median:.2} ms (p90 {:.2}), ratio {:.2}; containers.exec request median {request_median:.2} ms (p90 {:.2}), ratio {:.2}",
            args.n,
            percentile(&mut crun, 90.0),
            percentile(&mut cli, 90.0),
            cli_median / crun_median,
            percentile(&mut request, 90.0),
            request_median / crun_median,
        );
    }
    let _ = Command::new("crun").args(["delete", "-f", &crun_name]).stderr(Stdio::null()).status();
    let reply = api(&client, "containers.remove", &json!({"name": "bench-exec", "grace_s": 0})).await;
    assert_eq!(reply["ok"], "bench-exec", "{reply}");

    // P5: many long-running sleep containers.
    let names: Vec<String> = (0..args.containers).map(|index| format!("p5-{index}")).collect();
    let started = Instant::now();
    futures_util::stream::iter(names.iter())
        .for_each_concurrent(16, |name| {
            let (client, jetstream) = (client.clone(), jetstream.clone());
            async move { create(&client, &jetstream, name).await }
        })
        .await;
    let creating = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let list = api(&client, "containers.list", &json!("")).await;
    let pids: Vec<i64> = list["ok"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|container| container["name"].as_str().is_some_and(|name| name.starts_with("p5-")))
        .filter_map(|container| container["pid"].as_i64())
        .collect();
    assert_eq!(pids.len(), args.containers, "running containers");
    let (mut rss, mut pss, mut private) = (0, 0, 0);
    for pid in &pids {
        let (shim_rss, shim_pss, shim_private) = memory_kib(parent_of(*pid));
        rss += shim_rss;
        pss += shim_pss;
        private += shim_private;
    }
    let (busy_rss, _, _) = memory_kib(args.worker_pid);
    let worker_growth = busy_rss.saturating_sub(idle_rss);
    println!(
        "P5: {} long-running sleep containers created in {creating:.1} s; worker RSS idle {:.1} MiB, with them {:.1} MiB (+{:.1} MiB); their shims: RSS {:.1} MiB, PSS {:.1} MiB, private {:.1} MiB ({:.0} KiB private each); overhead beyond the containers (worker growth + shim PSS) {:.1} MiB",
        args.containers,
        idle_rss as f64 / 1024.0,
        busy_rss as f64 / 1024.0,
        worker_growth as f64 / 1024.0,
        rss as f64 / 1024.0,
        pss as f64 / 1024.0,
        private as f64 / 1024.0,
        private as f64 / pids.len() as f64,
        (worker_growth + pss) as f64 / 1024.0,
    );
    futures_util::stream::iter(names.iter())
        .for_each_concurrent(16, |name| {
            let client = client.clone();
            async move {
                let reply = api(&client, "containers.remove", &json!({"name": name, "grace_s": 0})).await;
                assert_eq!(reply["ok"].as_str(), Some(name.as_str()), "{reply}");
            }
        })
        .await;
}
