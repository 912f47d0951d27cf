//! The worker's Prometheus endpoint (`--metrics-listen`): a real worker on a
//! port it picked, found through `<data-dir>/metrics.addr`, scraped over a
//! plain TCP connection the way Prometheus does, after it ran real tasks.
//! And the NATS micro service's own statistics (`$SRV.STATS.quilt`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quilt_tests::pipeline::{task, Agent, Setup, Worker, BOUND};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` and reads the answer until the server closes.
async fn http(address: SocketAddr, request: &str) -> String {
    let exchange = async {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8(answer).unwrap()
    };
    tokio::time::timeout(BOUND, exchange).await.expect("the endpoint answers within the bound")
}

/// One scrape: the head of the answer and its samples by series.
async fn scrape(address: SocketAddr) -> (String, BTreeMap<String, f64>) {
    let answer = http(address, "GET /metrics HTTP/1.1\r\nHost: quilt\r\nAccept: text/plain\r\n\r\n").await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    let samples = body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample: {line}"));
            (series.to_owned(), value.parse::<f64>().unwrap_or_else(|_| panic!("a number: {line}")))
        })
        .collect();
    (head.to_owned(), samples)
}

/// A scrape once the worker holds no task and the queue has nothing
/// unacked: a result is visible to agents before its worker has counted
/// it, acked the delivery and let the task go.
async fn scrape_settled(address: SocketAddr) -> (String, BTreeMap<String, f64>) {
    let deadline = Instant::now() + BOUND;
    loop {
        let (head, samples) = scrape(address).await;
        let settled = samples.get("quilt_tasks_running") == Some(&0.0)
            && samples.get("quilt_queue_ack_pending") == Some(&0.0);
        if settled {
            return (head, samples);
        }
        assert!(Instant::now() < deadline, "the worker did not settle within {BOUND:?}: {samples:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_tasks_and_shows_the_queue() {
    let Setup { dir: _dir, broker, data } = Setup::new("metrics").await;
    let mut worker = Worker::start(&data, &broker.url, "metrics", &["--metrics-listen", "127.0.0.1:0"]);
    // Written before the worker says it is ready.
    let address_file = data.join(quilt::metrics::ADDRESS_FILE);
    let address: SocketAddr = std::fs::read_to_string(&address_file)
        .unwrap_or_else(|error| panic!("{}: {error}\n{}", address_file.display(), worker.log_text()))
        .trim()
        .parse()
        .unwrap();
    assert!(address.ip().is_loopback() && address.port() != 0, "{address}");
    assert!(worker.log_text().contains("metrics endpoint listening"), "{}", worker.log_text());

    let agent = Agent::connect(&broker.url).await;
    let ids = [
        agent.submit(&task("m-ok-1", &["sh", "-c", "echo one"])).await,
        agent.submit(&task("m-ok-2", &["sh", "-c", "sleep 0.2; echo two"])).await,
        agent.submit(&task("m-fail", &["sh", "-c", "exit 3"])).await,
    ];
    for (id, status) in ids.iter().zip(["succeeded", "succeeded", "failed"]) {
        assert_eq!(agent.result(id, BOUND).await["status"], status);
    }

    let (head, samples) = scrape_settled(address).await;
    assert!(head.contains("\r\nContent-Type: text/plain; version=0.0.4"), "{head}");
    assert!(head.contains("\r\nConnection: close"), "{head}");

    let tasks = |status: &str| samples[&format!("quilt_tasks_total{{status=\"{status}\"}}")];
    assert_eq!(tasks("succeeded"), 2.0, "{samples:#?}");
    assert_eq!(tasks("failed"), 1.0);
    for status in ["timed_out", "oom_killed", "rejected", "error"] {
        assert_eq!(tasks(status), 0.0, "{status}");
    }
    assert_eq!(samples["quilt_task_duration_seconds_count"], 3.0);
    assert_eq!(samples["quilt_task_duration_seconds_bucket{le=\"+Inf\"}"], 3.0);
    // One task slept 0.2 s.
    assert!(samples["quilt_task_duration_seconds_sum"] >= 0.2, "{samples:#?}");
    assert!(samples["quilt_task_duration_seconds_bucket{le=\"0.1\"}"] <= 2.0);
    assert_eq!(samples["quilt_task_queue_seconds_count"], 3.0);
    assert_eq!(samples["quilt_queue_pending"], 0.0);
    assert_eq!(samples["quilt_tasks_running"], 0.0);
    assert_eq!(samples["quilt_containers_running"], 0.0);
    assert!(samples["quilt_event_log_bytes"] > 0.0);
    assert_eq!(samples["quilt_metrics_errors_total"], 0.0);
    assert_eq!(samples["quilt_environment_cache_hits_total"], 0.0);
    assert_eq!(samples["quilt_environment_cache_misses_total"], 0.0);
    let started = samples["quilt_worker_start_time_seconds"];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(started <= now && started > now - BOUND.as_secs_f64() * 2.0, "start {started}, now {now}");
    assert!(samples.keys().any(|series| series.starts_with("quilt_build_info{version=")));

    // Other requests get an error, never the metrics.
    let wrong = http(address, "GET /debug HTTP/1.1\r\n\r\n").await;
    assert!(wrong.starts_with("HTTP/1.1 404 "), "{wrong}");
    let post = http(address, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    // A client that connects and says nothing does not hold the endpoint.
    let _silent = TcpStream::connect(address).await.unwrap();
    let (_, again) = scrape(address).await;
    assert_eq!(again["quilt_task_duration_seconds_count"], 3.0);

    // The control API's micro service keeps its own statistics per endpoint.
    let health = agent.request("quilt.api.metrics.health", &Value::String(String::new())).await;
    assert_eq!(health["ok"], "ok");
    let stats = agent.request("$SRV.STATS.quilt", &Value::String(String::new())).await;
    assert_eq!(stats["name"], "quilt", "{stats:#}");
    let endpoint = stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|endpoint| endpoint["subject"] == "quilt.api.metrics.health")
        .unwrap_or_else(|| panic!("the health endpoint in {stats:#}"));
    assert!(endpoint["num_requests"].as_u64().unwrap() >= 1, "{endpoint:#}");

    // Stopping the worker stops the endpoint and removes its address file.
    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert!(!address_file.exists(), "{} left behind", address_file.display());
    assert!(
        TcpStream::connect(address).await.is_err(),
        "the endpoint still answers after the worker stopped"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_depth_is_read_at_scrape_time() {
    let Setup { dir: _dir, broker, data } = Setup::new("metrics-queue").await;
    let worker = Worker::start(
        &data,
        &broker.url,
        "mqueue",
        &["--metrics-listen", "127.0.0.1:0", "--concurrency", "1"],
    );
    let address: SocketAddr =
        std::fs::read_to_string(data.join(quilt::metrics::ADDRESS_FILE)).unwrap().trim().parse().unwrap();
    let agent = Agent::connect(&broker.url).await;
    // One slot: the first task holds it, the other two wait in the queue.
    agent.submit(&task("q-hold", &["sleep", "3"])).await;
    agent.submit(&task("q-wait-1", &["true"])).await;
    agent.submit(&task("q-wait-2", &["true"])).await;
    let deadline = Instant::now() + BOUND;
    loop {
        let (_, samples) = scrape(address).await;
        if samples.get("quilt_tasks_running") == Some(&1.0)
            && samples.get("quilt_queue_pending") == Some(&2.0)
        {
            assert_eq!(samples["quilt_queue_ack_pending"], 1.0, "{samples:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "never saw one running and two pending: {samples:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in ["q-hold", "q-wait-1", "q-wait-2"] {
        assert_eq!(agent.result(id, BOUND).await["status"], "succeeded");
    }
    // An environment not built yet is a cache miss; on busybox (no package
    // manager) it cannot be built, so no build is counted, and the task's
    // `error` result is.
    let environment = serde_json::json!({
        "id": "q-env", "image": "busybox", "command": ["true"], "environment": {"pip": ["six"]},
    });
    agent.submit(&environment).await;
    let result = agent.result("q-env", BOUND).await;
    assert_eq!((&result["status"], &result["error"]["kind"]), (&"error".into(), &"environment".into()));
    let (_, samples) = scrape_settled(address).await;
    assert_eq!(samples["quilt_environment_cache_misses_total"], 1.0, "{samples:#?}");
    assert_eq!(samples["quilt_environment_cache_hits_total"], 0.0);
    assert_eq!(samples["quilt_environment_builds_total{outcome=\"ok\"}"], 0.0);
    assert_eq!(samples["quilt_environment_builds_total{outcome=\"failed\"}"], 0.0);
    assert_eq!(samples["quilt_tasks_total{status=\"error\"}"], 1.0);
    assert_eq!(samples["quilt_task_duration_seconds_count"], 3.0, "no command ran for q-env");
    // With the broker gone, the queue's depth is left out (not 0) and the
    // failure counted; the rest is still served.
    broker.stop().await;
    let (_, samples) = scrape(address).await;
    assert!(!samples.contains_key("quilt_queue_pending"), "{samples:#?}");
    assert!(!samples.contains_key("quilt_queue_ack_pending"));
    assert!(samples["quilt_metrics_errors_total"] >= 1.0);
    assert_eq!(samples["quilt_tasks_total{status=\"succeeded\"}"], 3.0);
    drop(worker);
}
