//! Fixtures for the task pipeline tests: a real nats-server (Quilt's
//! embedded broker, on a free loopback port with its own store), real
//! `quilt worker` processes (so a test can SIGKILL or SIGSTOP them by pid),
//! and an agent: a plain NATS client that publishes tasks and reads results
//! the way any client would.
//!
//! Every wait is bounded; every process a fixture starts is killed by its
//! own pid when the fixture drops.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use quilt::broker::{BrokerOptions, EmbeddedBroker};
use serde_json::Value;

use crate::images::{busybox_entries, write_rootfs_tarball};
use crate::{quilt_binary, text, TestDir};

/// The longest any single wait in the pipeline tests may take.
pub const BOUND: Duration = Duration::from_secs(60);

/// A nats-server with JetStream, our child, on a free loopback port.
pub struct Broker {
    /// The running server.
    pub broker: Option<EmbeddedBroker>,
    /// Its URL.
    pub url: String,
}

impl Broker {
    /// Starts one with its store under `dir`.
    pub async fn start(dir: &Path) -> Broker {
        let broker = EmbeddedBroker::start(BrokerOptions::new(dir))
            .await
            .unwrap_or_else(|error| panic!("starting nats-server: {error}"));
        let url = broker.url();
        Broker { broker: Some(broker), url }
    }

    /// The server process's pid.
    pub fn pid(&self) -> u32 {
        self.broker.as_ref().and_then(EmbeddedBroker::pid).expect("nats-server is running")
    }

    /// Times the supervisor restarted the server.
    pub fn restarts(&self) -> u64 {
        self.broker.as_ref().map_or(0, EmbeddedBroker::restarts)
    }

    /// Stops the server (SIGTERM, then SIGKILL).
    pub async fn stop(mut self) {
        if let Some(broker) = self.broker.take() {
            broker.stop().await;
        }
    }
}

/// The usual start of a pipeline test: its own directory, a broker with its
/// store in `<dir>/nats`, and a worker data directory `<dir>/worker` holding
/// the busybox image. Keep `dir` alive for the whole test: dropping it
/// removes the directory.
pub struct Setup {
    /// The test's directory.
    pub dir: TestDir,
    /// The broker.
    pub broker: Broker,
    /// The worker's data directory.
    pub data: PathBuf,
}

impl Setup {
    /// Makes all three.
    pub async fn new(name: &str) -> Setup {
        let dir = TestDir::new(name);
        let broker = Broker::start(&dir.path.join("nats")).await;
        let data = dir.path.join("worker");
        import_busybox(&data);
        Setup { dir, broker, data }
    }
}

/// Imports the busybox image as `busybox` into a worker's data directory.
pub fn import_busybox(data_dir: &Path) {
    std::fs::create_dir_all(data_dir).unwrap();
    let tarball = data_dir.join("busybox-rootfs.tar");
    write_rootfs_tarball(&tarball, &busybox_entries(), false);
    let output = Command::new(quilt_binary())
        .arg("--data-dir")
        .arg(data_dir)
        .args(["image", "import", "--name", "busybox"])
        .arg(&tarball)
        .output()
        .unwrap();
    assert!(output.status.success(), "image import: {}", text(&output.stderr));
    std::fs::remove_file(&tarball).unwrap();
}

/// A `quilt worker` process.
pub struct Worker {
    child: Option<Child>,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its id.
    pub id: String,
    /// Where its stderr goes (appended across restarts).
    pub log: PathBuf,
    url: String,
    args: Vec<String>,
}

impl Worker {
    /// Starts `quilt worker --nats URL --worker-id ID` with test-friendly
    /// defaults (AckWait 2 s, 10 s shutdown grace, no pulls unless `args`
    /// name an `--insecure-registry`) and `args` after them, and waits
    /// until it is ready.
    pub fn start(data_dir: &Path, url: &str, id: &str, args: &[&str]) -> Worker {
        Worker::start_with_env(data_dir, url, id, args, &[])
    }

    /// [`Worker::start`] with extra environment variables (e.g. `QUILT_CRASH_AT`).
    pub fn start_with_env(
        data_dir: &Path,
        url: &str,
        id: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Worker {
        let mut worker = Worker {
            child: None,
            data_dir: data_dir.to_path_buf(),
            id: id.to_owned(),
            log: data_dir.join("worker.log"),
            url: url.to_owned(),
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
        };
        worker.spawn(env);
        worker
    }

    fn spawn(&mut self, env: &[(&str, &str)]) {
        std::fs::create_dir_all(&self.data_dir).unwrap();
        let log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let ready_mark = std::fs::metadata(&self.log).map_or(0, |meta| meta.len());
        let mut command = Command::new(quilt_binary());
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["worker", "--nats", &self.url, "--worker-id", &self.id])
            .args(self.defaults())
            .args(&self.args)
            .env("QUILT_LOG", "quilt=info")
            .env_remove("QUILT_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (name, value) in env {
            command.env(name, value);
        }
        self.child = Some(command.spawn().unwrap());
        self.wait_log_after(ready_mark, "worker ready");
    }

    /// AckWait 2 s, 10 s shutdown grace, 64 MiB long-running disk layers and
    /// no pulls, unless the test's own arguments set them (a flag may be
    /// given once); tests that exercise pulling say so with
    /// `--insecure-registry`.
    fn defaults(&self) -> Vec<&'static str> {
        let given = |flag: &str| self.args.iter().any(|arg| arg == flag);
        let mut defaults = Vec::new();
        // Long-running containers' disk layers are allocated in full: 64 MiB
        // each rather than the default 1 GiB, as tests make dozens.
        for (flag, value) in
            [("--ack-wait", "2s"), ("--shutdown-grace", "10s"), ("--long-running-disk", "64M")]
        {
            if !given(flag) {
                defaults.extend([flag, value]);
            }
        }
        if !given("--insecure-registry") {
            defaults.push("--no-pull");
        }
        defaults
    }

    /// Waits until the log, after byte `from`, contains `needle`.
    fn wait_log_after(&mut self, from: u64, needle: &str) {
        let deadline = Instant::now() + BOUND;
        loop {
            let log = std::fs::read(&self.log).unwrap_or_default();
            let tail = String::from_utf8_lossy(log.get(from as usize..).unwrap_or_default());
            if tail.contains(needle) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().unwrap()) {
                panic!("worker {} exited ({status}) before {needle:?}; its log:\n{tail}", self.id);
            }
            assert!(Instant::now() < deadline, "worker {} not {needle:?} within {BOUND:?}:\n{tail}", self.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the worker again on the same data directory (after a kill).
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none() || self.try_exit().is_some(), "restart of a running worker");
        self.spawn(env);
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("worker running").id() as i32
    }

    /// Its exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.as_mut().expect("worker running").try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "worker {} still running after {bound:?}", self.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(BOUND)
    }

    /// The worker's log so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Containers of worker `worker_id` that exist on this host: cgroup
/// directories named `<worker_id>.*` under any hierarchy's `quilt/`.
pub fn containers_of(worker_id: &str) -> Vec<PathBuf> {
    let prefix = format!("{worker_id}.");
    let mut found = Vec::new();
    let base = Path::new("/sys/fs/cgroup");
    let mut parents = vec![base.join("quilt")];
    if let Ok(entries) = std::fs::read_dir(base) {
        parents.extend(entries.flatten().map(|entry| entry.path().join("quilt")));
    }
    for parent in parents {
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    found.push(entry.path());
                }
            }
        }
    }
    found
}

/// Asserts worker `worker_id` left no container (cgroup), no mount under
/// its data directory and no container state directory.
pub fn assert_worker_left_nothing(worker_id: &str, data_dir: &Path) {
    let cgroups = containers_of(worker_id);
    assert!(cgroups.is_empty(), "cgroups left behind: {cgroups:?}");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let data = data_dir.to_string_lossy();
    for line in mountinfo.lines() {
        assert!(!line.contains(data.as_ref()), "mount left behind: {line}");
    }
    crate::assert_no_loop_devices_under(data_dir);
    let containers = data_dir.join("containers");
    if let Ok(entries) = std::fs::read_dir(&containers) {
        let left: Vec<_> = entries.flatten().map(|entry| entry.path()).collect();
        assert!(left.is_empty(), "container state left behind: {left:?}");
    }
}

/// An agent: a plain NATS client speaking the wire protocol.
pub struct Agent {
    /// The connection.
    pub client: async_nats::Client,
    /// JetStream on it.
    pub jetstream: async_nats::jetstream::Context,
}

impl Agent {
    /// Connects (bounded retries while the server comes up).
    pub async fn connect(url: &str) -> Agent {
        let deadline = Instant::now() + BOUND;
        let client = loop {
            match async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(1))
                .connect(url)
                .await
            {
                Ok(client) => break client,
                Err(error) => {
                    assert!(Instant::now() < deadline, "cannot connect to {url}: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let jetstream = async_nats::jetstream::new(client.clone());
        Agent { client, jetstream }
    }

    /// Publishes a task (JSON) with `Nats-Msg-Id` = its `id`; returns the id.
    pub async fn submit(&self, task: &Value) -> String {
        let id = task["id"].as_str().expect("tasks in tests carry an id").to_owned();
        self.submit_raw(serde_json::to_vec(task).unwrap(), Some(&id)).await.unwrap();
        id
    }

    /// [`Agent::submit`] as an agent must do it while a cluster node fails:
    /// a publish whose PubAck does not come (the stream's leader died with
    /// it) is sent again with the same message id, which the stream drops if
    /// the first one was stored. Bounded by [`BOUND`].
    pub async fn submit_retrying(&self, task: &Value) -> String {
        let id = task["id"].as_str().expect("tasks in tests carry an id").to_owned();
        let deadline = Instant::now() + BOUND;
        loop {
            match self.submit_raw(serde_json::to_vec(task).unwrap(), Some(&id)).await {
                Ok(_) => return id,
                Err(error) => {
                    assert!(Instant::now() < deadline, "publishing {id}: {error}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Publishes raw bytes on `quilt.tasks`, optionally with a message id;
    /// returns whether the stream called it a duplicate, or the publish error.
    pub async fn submit_raw(&self, payload: Vec<u8>, message_id: Option<&str>) -> Result<bool, String> {
        let mut publish = async_nats::jetstream::message::PublishMessage::build().payload(payload.into());
        if let Some(id) = message_id {
            publish = publish.message_id(id);
        }
        let deadline = Instant::now() + BOUND;
        loop {
            let attempt = async {
                let ack = self.jetstream.send_publish("quilt.tasks", publish.clone()).await?;
                ack.await
            };
            match attempt.await {
                Ok(ack) => return Ok(ack.duplicate),
                // The stream appears when the first worker starts.
                Err(error)
                    if error.kind() == async_nats::jetstream::context::PublishErrorKind::StreamNotFound
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => return Err(error.to_string()),
            }
        }
    }

    /// The stored result of task `id`, if there is one.
    pub async fn result_now(&self, id: &str) -> Option<Value> {
        let stream = self.jetstream.get_stream("QUILT_RESULTS").await.ok()?;
        match stream.get_last_raw_message_by_subject(&format!("quilt.results.{id}")).await {
            Ok(message) => Some(serde_json::from_slice(&message.payload).unwrap()),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => None,
            Err(error) => panic!("reading the result of {id}: {error}"),
        }
    }

    /// Waits (at most `bound`) for the result of task `id`.
    pub async fn result(&self, id: &str, bound: Duration) -> Value {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(result) = self.result_now(id).await {
                return result;
            }
            assert!(Instant::now() < deadline, "no result for task {id} within {bound:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many messages `QUILT_RESULTS` ever stored (its last sequence).
    pub async fn results_stored(&self) -> u64 {
        let mut stream = self.jetstream.get_stream("QUILT_RESULTS").await.unwrap();
        stream.info().await.unwrap().state.last_sequence
    }

    /// Every dead letter in `QUILT_DLQ`.
    pub async fn dead_letters(&self) -> Vec<Value> {
        let Ok(mut stream) = self.jetstream.get_stream("QUILT_DLQ").await else { return Vec::new() };
        let state = stream.info().await.unwrap().state.clone();
        let mut letters = Vec::new();
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(message) = stream.get_raw_message(seq).await {
                letters.push(serde_json::from_slice(&message.payload).unwrap());
            }
        }
        letters
    }

    /// Publishes a task (JSON) on `subject` (e.g. `quilt.tasks.worker.<id>`,
    /// a task routed to one worker) with `Nats-Msg-Id` = its `id`.
    pub async fn submit_to(&self, subject: &str, task: &Value) -> String {
        let id = task["id"].as_str().expect("tasks in tests carry an id").to_owned();
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(task).unwrap().into())
            .message_id(&id);
        let ack = self.jetstream.send_publish(subject.to_owned(), publish).await.unwrap();
        ack.await.unwrap();
        id
    }

    /// A control API request (JSON body) on `subject`; the JSON reply.
    pub async fn request(&self, subject: &str, body: &Value) -> Value {
        let body = match body {
            Value::String(text) => text.clone().into_bytes(),
            other => serde_json::to_vec(other).unwrap(),
        };
        let reply = tokio::time::timeout(BOUND, self.client.request(subject.to_owned(), body.into()))
            .await
            .unwrap_or_else(|_| panic!("no reply on {subject} within {BOUND:?}"))
            .unwrap_or_else(|error| panic!("request {subject}: {error}"));
        serde_json::from_slice(&reply.payload).unwrap()
    }

    /// A plain (core NATS) subscription to every result subject: what an
    /// agent without JetStream sees.
    pub async fn subscribe_results(&self) -> async_nats::Subscriber {
        let subscriber = self.client.subscribe("quilt.results.*").await.unwrap();
        self.client.flush().await.unwrap();
        subscriber
    }
}

/// Drains `subscriber` for `quiet` after the last message and returns the
/// result ids received, in order.
pub async fn drain_results(subscriber: &mut async_nats::Subscriber, quiet: Duration) -> Vec<String> {
    let mut ids = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(quiet, subscriber.next()).await {
        let result: Value = serde_json::from_slice(&message.payload).unwrap();
        ids.push(result["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// A minimal task running `command` in busybox.
pub fn task(id: &str, command: &[&str]) -> Value {
    serde_json::json!({ "id": id, "image": "busybox", "command": command })
}

/// Kills, when dropped, every process left in a cgroup of worker
/// `worker_id` (long-running containers outlive their worker on purpose)
/// and removes those cgroups: a failed test leaves nothing running. Their
/// shims exit by themselves once their container's first process is dead.
pub struct LongRunningGuard {
    /// The worker whose containers are cleaned up.
    pub worker_id: String,
}

impl Drop for LongRunningGuard {
    fn drop(&mut self) {
        for _ in 0..50 {
            let cgroups = containers_of(&self.worker_id);
            if cgroups.is_empty() {
                return;
            }
            for cgroup in &cgroups {
                kill_cgroup_tree(cgroup);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn kill_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                kill_cgroup_tree(&entry.path());
            }
        }
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|line| line.trim().parse::<i32>().ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = std::fs::remove_dir(dir);
}
