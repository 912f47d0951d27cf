//! broker-config/cluster.conf for real: three nats-server nodes on
//! loopback, Quilt's streams created with 3 replicas by two workers that
//! know all three nodes; tasks spread over both workers; one node SIGKILLed
//! while tasks flow loses nothing, and every task is answered once.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quilt_tests::pipeline::{assert_worker_left_nothing, import_busybox, task, Agent, Worker, BOUND};
use quilt_tests::TestDir;

struct Node {
    child: Child,
    client_port: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_cluster(dir: &TestDir) -> Vec<Node> {
    let config = dir.path.join("cluster.conf");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker-config/cluster.conf"),
        &config,
    )
    .unwrap();
    let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| (free_port(), free_port(), free_port())).collect();
    let program = quilt::broker::find_nats_server(None).unwrap();
    let mut nodes = Vec::new();
    for (index, (client, route, leaf)) in ports.iter().enumerate() {
        let mut command = Command::new(&program);
        command
            .arg("-c")
            .arg(&config)
            .env("QUILT_NODE_NAME", format!("n{}", index + 1))
            .env("QUILT_CLIENT_LISTEN", format!("127.0.0.1:{client}"))
            .env("QUILT_CLUSTER_LISTEN", format!("127.0.0.1:{route}"))
            .env("QUILT_LEAF_LISTEN", format!("127.0.0.1:{leaf}"))
            .env("QUILT_STORE_DIR", dir.path.join(format!("store-{}", index + 1)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path.join(format!("n{}.log", index + 1))).unwrap());
        for (other, (_, other_route, _)) in ports.iter().enumerate() {
            command
                .env(format!("QUILT_ROUTE_{}", other + 1), format!("nats-route://127.0.0.1:{other_route}"));
        }
        nodes.push(Node { child: command.spawn().unwrap(), client_port: *client });
    }
    let deadline = Instant::now() + BOUND;
    for node in &nodes {
        while std::net::TcpStream::connect(("127.0.0.1", node.client_port)).is_err() {
            assert!(Instant::now() < deadline, "a cluster node did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_replicates_spreads_tasks_and_survives_a_node() {
    let dir = TestDir::new("cluster");
    let mut nodes = start_cluster(&dir);
    let urls: Vec<String> =
        nodes.iter().map(|node| format!("nats://127.0.0.1:{}", node.client_port)).collect();
    let all = urls.join(",");
    let mut workers = Vec::new();
    for id in ["cla", "clb"] {
        let data = dir.path.join(id);
        import_busybox(&data);
        // The workers wait for the cluster to elect its JetStream leader.
        workers.push(Worker::start(&data, &all, id, &["--replicas", "3"]));
    }
    let agent = Agent::connect(&urls[2]).await;
    let mut tasks = agent.jetstream.get_stream("QUILT_TASKS").await.unwrap();
    assert_eq!(tasks.info().await.unwrap().config.num_replicas, 3);

    for index in 0..20 {
        agent.submit(&task(&format!("cl-{index}"), &["sh", "-c", "sleep 0.3; echo done"])).await;
    }
    let mut by_worker = std::collections::BTreeMap::new();
    for index in 0..20 {
        let result = agent.result(&format!("cl-{index}"), BOUND).await;
        assert_eq!(result["stdout"], "done\n", "{result}");
        *by_worker.entry(result["worker_id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    assert_eq!(by_worker.len(), 2, "tasks spread over both workers: {by_worker:?}");

    // One node dies while tasks flow: nothing is lost, each is answered once.
    for index in 20..30 {
        agent.submit_retrying(&task(&format!("cl-{index}"), &["sh", "-c", "sleep 0.2; echo done"])).await;
    }
    let killed = nodes.remove(0);
    drop(killed);
    for index in 30..40 {
        agent.submit_retrying(&task(&format!("cl-{index}"), &["sh", "-c", "echo done"])).await;
    }
    for index in 20..40 {
        let result = agent.result(&format!("cl-{index}"), BOUND).await;
        assert_eq!(result["stdout"], "done\n", "{result}");
    }
    assert_eq!(agent.results_stored().await, 40, "one result per task");

    for (worker, id) in workers.iter_mut().zip(["cla", "clb"]) {
        assert!(worker.terminate().success(), "{}", worker.log_text());
        assert_worker_left_nothing(id, &dir.path.join(id));
    }
}
