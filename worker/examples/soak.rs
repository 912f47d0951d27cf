//! Soak test of a worker (issue 8), driven by `scripts/soak`: a real
//! nats-server (Quilt's embedded broker) and a real `quilt worker`, mixed
//! load for a configurable time, and a SIGKILL of the worker every few
//! minutes (restarted at once, same id and data directory). The load, per 20
//! tasks: 12 ordinary commands, 2 abusive ones (fork bomb, memory bomb, CPU
//! spin past its timeout, output flood, scratch fill, /dev/shm fill, in
//! turn), 4 execs into 3 long-running containers, and 2 tasks with a
//! language environment (pip, on the Debian python image) when
//! `--python-image` is given, else 2 more ordinary ones.
//!
//! At the end it checks, and prints as one JSON object:
//! - every task answered exactly once: each id seen once on
//!   `quilt.results.*` (the stream republishes only what it stored) and the
//!   results stream holds one message per task;
//! - every outcome as its kind expects (an abusive task is contained and
//!   named: `oom_killed`, `timed_out`, `truncated`, `pids_limit_hit`, a
//!   failed write);
//! - the worker's resident memory and open descriptors over each lifetime
//!   between kills (first sample after a warm-up, last before the kill,
//!   and the largest RSS of each minute), its unreaped children, and the
//!   event log's size;
//! - after the long-running containers are removed and the worker stopped:
//!   no cgroup, mount, loop device, process, network namespace or zombie
//!   left.
//!
//! The worker inherits the environment, so `QUILT_USERNS=START:COUNT`
//! soaks it in user-namespace mode.
//!
//! Usage: soak --quilt PATH --busybox-tar TAR --dir DIR [--minutes 30]
//!             [--kill-every 180] [--rate 4] [--concurrency 4] [--python-image TAR]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use quilt::broker::{BrokerOptions, EmbeddedBroker};
use serde_json::{json, Value};

const WORKER_ID: &str = "soak";
const LONG_RUNNING: [&str; 3] = ["soak-lr-0", "soak-lr-1", "soak-lr-2"];

struct Args {
    quilt: PathBuf,
    busybox_tar: PathBuf,
    python_image: Option<PathBuf>,
    dir: PathBuf,
    minutes: f64,
    kill_every: Duration,
    rate: f64,
    concurrency: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        quilt: PathBuf::new(),
        busybox_tar: PathBuf::new(),
        python_image: None,
        dir: PathBuf::new(),
        minutes: 30.0,
        kill_every: Duration::from_secs(180),
        rate: 4.0,
        concurrency: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--quilt" => args.quilt = value.into(),
            "--busybox-tar" => args.busybox_tar = value.into(),
            "--python-image" => args.python_image = Some(value.into()),
            "--dir" => args.dir = value.into(),
            "--minutes" => args.minutes = value.parse().expect("--minutes"),
            "--kill-every" => args.kill_every = Duration::from_secs(value.parse().expect("--kill-every")),
            "--rate" => args.rate = value.parse().expect("--rate"),
            "--concurrency" => args.concurrency = value.parse().expect("--concurrency"),
            _ => panic!("unknown flag {flag}"),
        }
    }
    assert!(
        !args.quilt.as_os_str().is_empty() && !args.dir.as_os_str().is_empty(),
        "--quilt, --busybox-tar and --dir are required"
    );
    args
}

/// The kind of a task, and so what its outcome must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Ordinary,
    ForkBomb,
    MemoryBomb,
    CpuSpin,
    OutputFlood,
    ScratchFill,
    ShmFill,
    Exec,
    Environment,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ordinary => "ordinary",
            Kind::ForkBomb => "fork_bomb",
            Kind::MemoryBomb => "memory_bomb",
            Kind::CpuSpin => "cpu_spin",
            Kind::OutputFlood => "output_flood",
            Kind::ScratchFill => "scratch_fill",
            Kind::ShmFill => "shm_fill",
            Kind::Exec => "exec",
            Kind::Environment => "environment",
        }
    }

    /// The n-th task's kind: 12 ordinary, 2 abusive, 4 exec, 2 environment per 20.
    fn of(n: u64, environments: bool) -> Kind {
        const ABUSIVE: [Kind; 6] = [
            Kind::ForkBomb,
            Kind::MemoryBomb,
            Kind::CpuSpin,
            Kind::OutputFlood,
            Kind::ScratchFill,
            Kind::ShmFill,
        ];
        match n % 20 {
            0..=11 => Kind::Ordinary,
            12 | 13 => ABUSIVE[((n / 20) * 2 + n % 20 - 12) as usize % ABUSIVE.len()],
            14..=17 => Kind::Exec,
            _ if environments => Kind::Environment,
            _ => Kind::Ordinary,
        }
    }

    fn task(self, id: &str, n: u64) -> Value {
        let sh = |script: &str| json!(["sh", "-c", script]);
        match self {
            Kind::Ordinary => json!({"id": id, "image": "busybox", "command": sh(&format!(
                "i=0; while [ $i -lt {} ]; do i=$((i+1)); done; echo ok {n}; sleep 0.{}", 200 + n % 2000, n % 5
            ))}),
            Kind::ForkBomb => json!({"id": id, "image": "busybox", "limits": {"pids": 64, "timeout_s": 10},
                "command": sh("b() { b | b & }; b; sleep 2; echo survived")}),
            Kind::MemoryBomb => {
                json!({"id": id, "image": "busybox", "limits": {"memory_mb": 64, "timeout_s": 20},
                "command": sh("x=a; while true; do x=$x$x; done")})
            }
            Kind::CpuSpin => json!({"id": id, "image": "busybox", "limits": {"cpus": 0.2, "timeout_s": 2},
                "command": sh("while true; do :; done")}),
            Kind::OutputFlood => {
                json!({"id": id, "image": "busybox", "limits": {"output_bytes": 65536, "timeout_s": 20},
                "command": sh("yes flood | head -c 20000000")})
            }
            Kind::ScratchFill => {
                json!({"id": id, "image": "busybox", "limits": {"memory_mb": 256, "timeout_s": 30},
                "command": sh("dd if=/dev/zero of=/fill bs=1M count=4096 2>&1; echo done")})
            }
            Kind::ShmFill => {
                json!({"id": id, "image": "busybox", "limits": {"memory_mb": 256, "timeout_s": 30},
                "command": sh("dd if=/dev/zero of=/dev/shm/fill bs=1M count=1024 2>&1; echo done")})
            }
            Kind::Exec => {
                json!({"id": id, "container": {"target": LONG_RUNNING[n as usize % LONG_RUNNING.len()]},
                "command": sh(&format!("echo exec {n}"))})
            }
            Kind::Environment => json!({"id": id, "image": "debian-python",
                "environment": {"pip": [if n % 40 < 20 { "six==1.16.0" } else { "idna==3.7" }]},
                "command": ["python3", "-c", "import sys; print('env ok')"]}),
        }
    }

    /// Whether `result` is what this kind must end as: contained, and named.
    fn expected(self, result: &Value) -> bool {
        let status = result["status"].as_str().unwrap_or("");
        let stdout = result["stdout"].as_str().unwrap_or("");
        match self {
            Kind::Ordinary => status == "succeeded" && stdout.starts_with("ok "),
            Kind::ForkBomb => result["usage"]["pids_limit_hit"] == true,
            Kind::MemoryBomb => status == "oom_killed",
            Kind::CpuSpin => status == "timed_out",
            Kind::OutputFlood => status == "succeeded" && result["truncated"]["stdout"] == true,
            // dd stops with ENOSPC at the scratch or /dev/shm size.
            Kind::ScratchFill | Kind::ShmFill => {
                stdout.contains("No space left on device") || status == "oom_killed"
            }
            Kind::Exec => status == "succeeded" && stdout.starts_with("exec "),
            Kind::Environment => status == "succeeded" && stdout == "env ok\n",
        }
    }
}

/// A `quilt worker` child process, killed by its pid.
struct WorkerProcess {
    child: Child,
    started: Instant,
}

fn start_worker(args: &Args, url: &str, log: &Path) -> WorkerProcess {
    let mark = std::fs::metadata(log).map_or(0, |meta| meta.len());
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = Command::new(&args.quilt)
        .arg("--data-dir")
        .arg(args.dir.join("data"))
        .args(["worker", "--nats", url, "--worker-id", WORKER_ID, "--no-pull", "--ack-wait", "5s"])
        .args(["--shutdown-grace", "10s", "--concurrency", &args.concurrency.to_string()])
        .env("QUILT_LOG", "quilt=info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read(log).unwrap_or_default();
        if String::from_utf8_lossy(&text[mark as usize..]).contains("worker ready") {
            break;
        }
        assert!(Instant::now() < deadline, "the worker was not ready within 120 s (log {})", log.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    WorkerProcess { child, started: Instant::now() }
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count())
}

/// Zombie processes on the machine whose parent is one of `parents`: a
/// child its parent has not reaped. (Zombies of other parents, such as
/// orphans handed to an init that does not reap, are not Quilt's.)
fn zombies_of(parents: &HashSet<i32>) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let Some((_, rest)) = stat.rsplit_once(") ") else { continue };
        let mut fields = rest.split(' ');
        let (state, ppid) = (fields.next(), fields.next().and_then(|ppid| ppid.parse::<i32>().ok()));
        if state == Some("Z") && ppid.is_some_and(|ppid| parents.contains(&ppid)) {
            found.push(pid);
        }
    }
    found
}

/// Network namespaces in use on the machine (by inode).
fn net_namespaces() -> HashSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut found = HashSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(meta) = std::fs::metadata(entry.path().join("ns/net")) {
            found.insert(meta.ino());
        }
    }
    found
}

/// Processes running a given executable.
fn processes_of(executable: &Path) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| exe == executable) {
            found.push(pid);
        }
    }
    found
}

fn worker_cgroups() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let base = Path::new("/sys/fs/cgroup");
    let mut parents = vec![base.join("quilt")];
    parents.extend(std::fs::read_dir(base).unwrap().flatten().map(|entry| entry.path().join("quilt")));
    for parent in parents {
        for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&format!("{WORKER_ID}.")) {
                found.push(entry.path());
            }
        }
    }
    found
}

#[derive(Default)]
struct Lifetime {
    first_rss_kib: u64,
    last_rss_kib: u64,
    first_fds: usize,
    last_fds: usize,
    samples: usize,
    /// The largest RSS seen in each minute of the lifetime (from its start),
    /// to tell growth that levels off from growth that does not.
    rss_kib_by_minute: Vec<u64>,
}

fn import(args: &Args, name: &str, tarball: &Path) {
    let output = Command::new(&args.quilt)
        .arg("--data-dir")
        .arg(args.dir.join("data"))
        .args(["image", "import", "--name", name])
        .arg(tarball)
        .output()
        .unwrap();
    assert!(output.status.success(), "image import: {}", String::from_utf8_lossy(&output.stderr));
}

async fn submit(jetstream: &async_nats::jetstream::Context, task: &Value) {
    let id = task["id"].as_str().unwrap().to_owned();
    let publish = PublishMessage::build().payload(serde_json::to_vec(task).unwrap().into()).message_id(&id);
    jetstream.send_publish("quilt.tasks", publish).await.unwrap().await.unwrap();
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    std::fs::create_dir_all(args.dir.join("data")).unwrap();
    let namespaces_before = net_namespaces();
    let shim = args.quilt.with_file_name("quilt-shim");

    let broker = EmbeddedBroker::start(BrokerOptions::new(args.dir.join("nats"))).await.expect("nats-server");
    let url = broker.url();
    import(&args, "busybox", &args.busybox_tar);
    if let Some(python) = &args.python_image {
        import(&args, "debian-python", python);
    }
    let log = args.dir.join("worker.log");
    let mut worker = start_worker(&args, &url, &log);

    let client = async_nats::connect(&url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    // Every republished result, counted by task id.
    let seen: Arc<Mutex<HashMap<String, (u32, Value)>>> = Arc::default();
    let mut results = client.subscribe("quilt.results.*").await.unwrap();
    client.flush().await.unwrap();
    let collector = {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Some(message) = results.next().await {
                let Ok(value) = serde_json::from_slice::<Value>(&message.payload) else { continue };
                let id = value["id"].as_str().unwrap_or("").to_owned();
                let mut seen = seen.lock().unwrap();
                let entry = seen.entry(id).or_insert((0, Value::Null));
                entry.0 += 1;
                entry.1 = value;
            }
        })
    };

    for (index, name) in LONG_RUNNING.iter().enumerate() {
        let id = format!("create-{index}");
        submit(
            &jetstream,
            &json!({"id": id, "image": "busybox",
            "container": {"mode": "long_running", "name": name, "restart": "always"},
            "command": ["sh", "-c", "while true; do sleep 1; done"]}),
        )
        .await;
    }

    // The execs need their containers: wait for the three creations.
    let deadline = Instant::now() + Duration::from_secs(120);
    while (0..LONG_RUNNING.len()).any(|i| !seen.lock().unwrap().contains_key(&format!("create-{i}"))) {
        assert!(Instant::now() < deadline, "the long-running containers were not created within 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let environments = args.python_image.is_some();
    let mut kinds: BTreeMap<String, Kind> = BTreeMap::new();
    let mut lifetimes = vec![Lifetime::default()];
    let mut kills = 0;
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(args.minutes * 60.0);
    let mut next_kill = started + args.kill_every;
    let mut next_sample = started;
    let mut event_log_max = 0;
    let mut worker_zombies_max = 0;
    let gap = Duration::from_secs_f64(1.0 / args.rate);
    let mut n = 0u64;
    while Instant::now() < end {
        let kind = Kind::of(n, environments);
        let id = format!("soak-{n}");
        submit(&jetstream, &kind.task(&id, n)).await;
        kinds.insert(id, kind);
        n += 1;

        let now = Instant::now();
        if now >= next_sample {
            next_sample = now + Duration::from_secs(5);
            let pid = worker.child.id();
            let size = std::fs::metadata(args.dir.join("data/events.redb")).map_or(0, |meta| meta.len());
            // Children the worker has not reaped (a container's first
            // process between its exit and the worker's wait is one, briefly).
            let ours: HashSet<i32> = [pid as i32].into_iter().chain(processes_of(&shim)).collect();
            worker_zombies_max = worker_zombies_max.max(zombies_of(&ours).len());
            event_log_max = event_log_max.max(size);
            // The first 30 s of a lifetime are its warm-up.
            if worker.started.elapsed() > Duration::from_secs(30) {
                let rss = status_field(pid, "VmRSS:").unwrap_or(0);
                let fds = fd_count(pid);
                let life = lifetimes.last_mut().unwrap();
                if life.samples == 0 {
                    life.first_rss_kib = rss;
                    life.first_fds = fds;
                }
                life.last_rss_kib = rss;
                life.last_fds = fds;
                life.samples += 1;
                let minute = (worker.started.elapsed().as_secs() / 60) as usize;
                if life.rss_kib_by_minute.len() <= minute {
                    life.rss_kib_by_minute.resize(minute + 1, 0);
                }
                life.rss_kib_by_minute[minute] = life.rss_kib_by_minute[minute].max(rss);
            }
        }
        if now >= next_kill && now + Duration::from_secs(60) < end {
            kill(Pid::from_raw(worker.child.id() as i32), Signal::SIGKILL).unwrap();
            worker.child.wait().unwrap();
            kills += 1;
            eprintln!(
                "soak: {:>5.0} s: SIGKILLed the worker ({} tasks so far)",
                started.elapsed().as_secs_f64(),
                n
            );
            worker = start_worker(&args, &url, &log);
            lifetimes.push(Lifetime::default());
            next_kill = Instant::now() + args.kill_every;
        }
        tokio::time::sleep(gap).await;
    }
    eprintln!(
        "soak: load over after {:.0} s, {n} tasks; waiting for every result",
        started.elapsed().as_secs_f64()
    );

    // Every task answered (bounded).
    let all: Vec<String> =
        kinds.keys().cloned().chain((0..LONG_RUNNING.len()).map(|i| format!("create-{i}"))).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let missing = all.iter().filter(|id| !seen.lock().unwrap().contains_key(*id)).count();
        if missing == 0 {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("soak: {missing} tasks still without a result after 10 min");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Late duplicates would arrive within AckWait of a redelivery.
    tokio::time::sleep(Duration::from_secs(10)).await;

    let mut by_kind: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut unexpected = Vec::new();
    let mut missing = Vec::new();
    let mut duplicated = Vec::new();
    {
        let seen = seen.lock().unwrap();
        for (id, kind) in &kinds {
            match seen.get(id) {
                None => missing.push(id.clone()),
                Some((count, result)) => {
                    if *count > 1 {
                        duplicated.push(id.clone());
                    }
                    let status = result["status"].as_str().unwrap_or("?").to_owned();
                    *by_kind.entry(kind.name()).or_default().entry(status).or_default() += 1;
                    if !kind.expected(result) {
                        unexpected.push(json!({"id": id, "kind": kind.name(), "status": result["status"],
                            "stdout": result["stdout"].as_str().map(|s| s.chars().take(200).collect::<String>()),
                            "error": result["error"]}));
                    }
                }
            }
        }
    }
    let mut results_stream = jetstream.get_stream("QUILT_RESULTS").await.unwrap();
    let stored = results_stream.info().await.unwrap().state.messages;

    // Remove the long-running containers, stop the worker, look for leftovers.
    for name in LONG_RUNNING {
        let request = serde_json::to_vec(&json!({"name": name, "grace_s": 1})).unwrap();
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            client.request("quilt.api.any.containers.remove", request.into()),
        )
        .await;
    }
    kill(Pid::from_raw(worker.child.id() as i32), Signal::SIGTERM).unwrap();
    let stopped = worker.child.wait().unwrap();
    let event_log_end = std::fs::metadata(args.dir.join("data/events.redb")).map_or(0, |meta| meta.len());
    collector.abort();
    broker.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let cgroups = worker_cgroups();
    let data = args.dir.join("data").to_string_lossy().into_owned();
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| line.contains(&data))
        .map(str::to_owned)
        .collect();
    let loop_devices = quilt::engine::loop_devices_backed_under(&args.dir.join("data"));
    let shims = processes_of(&shim);
    let quilt_processes: HashSet<i32> =
        processes_of(&args.quilt).into_iter().chain(shims.iter().copied()).collect();
    let new_zombies = zombies_of(&quilt_processes);
    let new_namespaces = net_namespaces().difference(&namespaces_before).count();

    let lifetimes_json: Vec<Value> = lifetimes
        .iter()
        .filter(|life| life.samples > 1)
        .map(|life| {
            json!({"rss_kib_first": life.first_rss_kib, "rss_kib_last": life.last_rss_kib,
                "rss_growth_kib": life.last_rss_kib as i64 - life.first_rss_kib as i64,
                "fds_first": life.first_fds, "fds_last": life.last_fds, "samples": life.samples,
                "rss_kib_max_by_minute": life.rss_kib_by_minute})
        })
        .collect();
    let ok = missing.is_empty()
        && duplicated.is_empty()
        && unexpected.is_empty()
        && stored == all.len() as u64
        && stopped.success()
        && cgroups.is_empty()
        && mounts.is_empty()
        && loop_devices.is_empty()
        && shims.is_empty()
        && new_zombies.is_empty()
        && new_namespaces == 0;
    let summary = json!({
        "ok": ok,
        "minutes": args.minutes,
        "tasks": all.len(),
        "worker_kills": kills,
        "answered_once": all.len() - missing.len() - duplicated.len(),
        "missing": missing,
        "duplicated": duplicated,
        "results_stored": stored,
        "outcomes_by_kind": by_kind,
        "unexpected_outcomes": unexpected,
        "worker_lifetimes": lifetimes_json,
        "event_log_bytes": {"max": event_log_max, "end": event_log_end},
        "worker_unreaped_children_max": worker_zombies_max,
        "worker_exit_on_sigterm": stopped.to_string(),
        "left_behind": {
            "cgroups": cgroups, "mounts": mounts, "loop_devices": loop_devices, "shim_processes": shims,
            "zombies": new_zombies, "network_namespaces": new_namespaces,
        },
    });
    println!("{}", serde_json::to_string_pretty(&summary).unwrap());
    std::process::exit(if ok { 0 } else { 1 });
}
