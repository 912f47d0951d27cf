//! deploy/sim/quilt-sim for real: a 3-node NATS cluster (cluster.conf with
//! accounts.conf) and three worker "VMs" (network namespaces on a bridge,
//! each configured from deploy/quilt.env; two of them behind a leaf node,
//! leaf.conf, one connected to the cluster directly). Tasks spread over all
//! three; a VM power-cut mid-task moves its tasks to the others, each
//! answered once; a NATS node SIGKILLed while tasks flow loses nothing; the
//! VM boots again and rejoins; `down` leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use quilt_tests::pipeline::{containers_of, task, Agent, BOUND};
use quilt_tests::{quilt_binary, text, TestDir};
use serde_json::Value;

const TAG: &str = "qt7";
const SUBNET: &str = "10.213.77";

/// A running simulation; `quilt-sim down` when dropped.
struct Sim {
    state: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sim/quilt-sim")
}

impl Sim {
    fn up(dir: &TestDir) -> Sim {
        let sim = Sim { state: dir.path.join("sim") };
        // A leftover of an interrupted run would make `up` refuse.
        let _ = sim.command(&["down"]);
        let quilt = quilt_binary();
        sim.run(&[
            "up",
            "--tag",
            TAG,
            "--subnet",
            SUBNET,
            "--vms",
            "3",
            "--leaf",
            "1,2",
            "--quilt",
            quilt.to_str().unwrap(),
            // A dead VM's tasks move after AckWait: keep the test short.
            "--worker-env",
            "QUILT_ACK_WAIT=3s",
            "--worker-env",
            "QUILT_NO_PULL=true",
            "--worker-env",
            "QUILT_SHUTDOWN_GRACE=10s",
        ]);
        sim
    }

    fn command(&self, args: &[&str]) -> std::process::Output {
        Command::new(script()).arg("--state").arg(&self.state).args(args).output().unwrap()
    }

    fn run(&self, args: &[&str]) -> String {
        let output = self.command(args);
        assert!(
            output.status.success(),
            "quilt-sim {args:?} failed: {}\n{}\n{}",
            output.status,
            text(&output.stderr),
            self.logs()
        );
        text(&output.stdout)
    }

    /// The tail of every worker's log, for failure messages.
    fn logs(&self) -> String {
        let mut all = String::new();
        for vm in 1..=3 {
            let log =
                std::fs::read_to_string(self.state.join(format!("vm{vm}/worker.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            all.push_str(&format!("--- vm{vm} worker log (last lines, newest first)\n{}\n", tail.join("\n")));
        }
        all
    }

    fn url(&self, user: &str) -> String {
        self.run(&["url", user])
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let output = self.command(&["down"]);
        if !output.status.success() && !std::thread::panicking() {
            panic!("quilt-sim down: {}", text(&output.stderr));
        }
    }
}

fn worker(vm: u32) -> String {
    format!("{TAG}-vm{vm}")
}

/// Connects as the user in node `node`'s URL of `quilt-sim url`
/// (`nats://user:password@address:4222`, one per node, comma-separated).
async fn connect(urls: &str, node: usize) -> Agent {
    let url = urls.split(',').nth(node - 1).unwrap();
    let (credentials, address) = url.trim_start_matches("nats://").split_once('@').unwrap();
    let (user, password) = credentials.split_once(':').unwrap();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .connection_timeout(Duration::from_secs(2))
        .connect(address)
        .await
        .unwrap_or_else(|error| panic!("connecting as {user} to {address}: {error}"));
    let jetstream = async_nats::jetstream::new(client.clone());
    Agent { client, jetstream }
}

async fn results(agent: &Agent, ids: &[String]) -> Vec<Value> {
    let mut all = Vec::new();
    for id in ids {
        let result = agent.result(id, BOUND).await;
        assert_eq!(result["status"], "succeeded", "{result}");
        assert_eq!(result["stdout"], "done\n", "{result}");
        all.push(result);
    }
    all
}

async fn submit_batch(agent: &Agent, prefix: &str, count: usize, command: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for index in 0..count {
        // Retried on a missing PubAck (a NATS node dies in this test): the
        // same message id makes a second copy a duplicate.
        ids.push(agent.submit_retrying(&task(&format!("{prefix}-{index}"), &["sh", "-c", command])).await);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_vms_spread_tasks_and_survive_a_vm_and_a_node() {
    let dir = TestDir::new("sim");
    let sim = Sim::up(&dir);
    let agents = sim.url("agent");
    // The agent talks to node 3; node 1 is the one that dies.
    let agent = connect(&agents, 3).await;
    let admin = connect(&sim.url("admin"), 2).await;
    let mut stream = admin.jetstream.get_stream("QUILT_TASKS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.num_replicas, 3);

    // Spread: every VM (leaf-connected or not) takes tasks.
    let ids = submit_batch(&agent, "spread", 30, "sleep 0.3; echo done").await;
    let mut by_worker = std::collections::BTreeMap::new();
    for result in results(&agent, &ids).await {
        *by_worker.entry(result["worker_id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    assert_eq!(by_worker.len(), 3, "tasks spread over all three VMs: {by_worker:?}\n{}", sim.logs());

    // A VM loses power mid-task: its tasks run again elsewhere, once each.
    let ids = submit_batch(&agent, "cut", 9, "sleep 3; echo done").await;
    let deadline = Instant::now() + BOUND;
    while containers_of(&worker(2)).is_empty() {
        assert!(Instant::now() < deadline, "VM 2 never started a task\n{}", sim.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim.run(&["kill-vm", "2"]);
    assert!(containers_of(&worker(2)).is_empty(), "the power cut left containers running");
    for result in results(&agent, &ids).await {
        assert_ne!(result["worker_id"], worker(2), "a result from the dead VM: {result}");
    }

    // A NATS node dies while tasks flow: nothing lost, every task answered.
    let mut ids = submit_batch(&agent, "node-a", 15, "sleep 0.2; echo done").await;
    sim.run(&["kill-node", "1"]);
    ids.extend(submit_batch(&agent, "node-b", 15, "echo done").await);
    let started = Instant::now();
    let mut by_worker = std::collections::BTreeSet::new();
    for result in results(&agent, &ids).await {
        by_worker.insert(result["worker_id"].as_str().unwrap().to_owned());
    }
    eprintln!("30 tasks answered {:?} after a NATS node died", started.elapsed());
    // Both live VMs work on: the leaf-connected one and the one connected
    // to the cluster directly, whichever node each was on (a worker whose
    // node died reconnects first; bounded rounds until both have answered).
    let deadline = Instant::now() + BOUND;
    let mut round = 0;
    while !(by_worker.contains(&worker(1)) && by_worker.contains(&worker(3))) {
        assert!(
            Instant::now() < deadline,
            "a worker stopped taking tasks after the node died: {by_worker:?}\n{}",
            sim.logs()
        );
        let ids = submit_batch(&agent, &format!("node-c{round}"), 8, "sleep 0.3; echo done").await;
        for result in results(&agent, &ids).await {
            by_worker.insert(result["worker_id"].as_str().unwrap().to_owned());
        }
        round += 1;
    }

    // The VM boots again (same disk) and takes tasks; the node comes back.
    sim.run(&["start-vm", "2"]);
    sim.run(&["start-node", "1"]);
    let status = sim.run(&["status"]);
    assert!(!status.contains("down"), "{status}");
    let ids = submit_batch(&agent, "back", 12, "sleep 0.5; echo done").await;
    let mut by_worker = std::collections::BTreeSet::new();
    for result in results(&agent, &ids).await {
        by_worker.insert(result["worker_id"].as_str().unwrap().to_owned());
    }
    assert!(by_worker.contains(&worker(2)), "the rebooted VM took no task: {by_worker:?}\n{}", sim.logs());

    // Exactly once: one result per task over the whole run.
    assert_eq!(agent.results_stored().await, 30 + 9 + 30 + 8 * round + 12, "one result per task");

    // `down` leaves no namespace, cgroup, mount or process behind.
    let state = sim.state.clone();
    let started: Vec<(i32, String)> =
        ["n1/nats", "n2/nats", "n3/nats", "vm1/leaf", "vm2/leaf", "vm1/worker", "vm2/worker", "vm3/worker"]
            .iter()
            .map(|name| {
                let record = std::fs::read_to_string(state.join(format!("{name}.pid"))).unwrap();
                let (pid, start) = record.trim().split_once(' ').unwrap();
                (pid.parse().unwrap(), start.to_owned())
            })
            .collect();
    drop(sim);
    for (pid, start) in started {
        // The same pid with the same start time would be the same process.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let alive = stat.rsplit_once(") ").is_some_and(|(_, fields)| {
            let fields: Vec<&str> = fields.split(' ').collect();
            fields[0] != "Z" && fields[19] == start
        });
        assert!(!alive, "process {pid} of the simulation is still running");
    }
    let namespaces = std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&format!("qsim-{TAG}-")))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(namespaces.is_empty(), "network namespaces left: {namespaces:?}");
    for vm in 1..=3 {
        assert!(containers_of(&worker(vm)).is_empty(), "containers of VM {vm} left");
        assert!(!Path::new(&format!("/sys/fs/cgroup/unified/qsim-{TAG}-vm{vm}")).exists());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(state.to_str().unwrap()), "mounts left under {}", state.display());
    assert!(!state.exists(), "the state directory is removed");
}
