//! Escape attempts (issue 8): hostile fixtures that try to leave a container
//! or reach the host, each against a host canary that must be unchanged
//! afterwards. Every attack runs twice: in a container's first process
//! (`quilt run --local`) and in a process exec'd into a running long-running
//! container through a real worker (`{"container": {"target": NAME}}`),
//! whose setup process passes through the container's namespaces on its way
//! in. The attacks: overwriting the runtime through `/proc/<pid>/exe`
//! (CVE-2019-5736), descriptors that reach the container (listed, opened
//! through `/proc/self/fd/N`, and used as a working directory or a `PATH`
//! entry before the setup process's execve, CVE-2024-21626; also in a
//! worker's ephemeral task and on the cgroup v2 path), an image whose
//! `/dev`, `/proc`, `/sys` or `/dev/null` is a symlink to the host, the
//! host-wide kernel knobs and cgroup `release_agent`s, and the privileged
//! system calls (mount, user namespaces, keyrings, eBPF, perf, ptrace, setns,
//! kill of a host process).
//!
//! The attacks are a static C program, `tests/fixtures/escape/attack.c`,
//! built with `cc -static` at test time and put into the container's root
//! as `/bin/attack`; it prints `try LABEL ok` for an attempt that worked and
//! `try LABEL ERRNO` for one refused. The tests require each attempt to be
//! refused with the errno the protection gives (EPERM from the seccomp
//! filter, EROFS from a read-only mount, ESRCH from the pid namespace...),
//! not merely to fail, and check the canaries: the sha256 of `quilt` and
//! `quilt-shim` (and that no descriptor of them is ever held inside), a file
//! and a directory of the host with their times, the host's `core_pattern`
//! and the other knobs that name a program the kernel runs, the cgroup
//! `release_agent`s, a host `sleep` that must stay alive, unsignalled and
//! untraced, and the host's mount table.
//!
//! [`the_attacks_work_where_nothing_stops_them`] is the proof that the
//! tests can fail: it runs the same program, with the same modes, outside any
//! container against harmless targets (a copy of busybox, a scratch file, a
//! private mount namespace) and requires `ok` from each attempt there.
//!
//! Every other test runs again as `..._in_a_user_namespace`: the same body
//! in user-namespace mode ([`Mode::UserNamespace`], given to each `quilt` it
//! starts), where the container's root is host uid 100000. Each variant
//! shows a container's `/proc/self/uid_map` and requires its mode's, so it
//! cannot pass with the mode ignored. The refusals are the same in both
//! modes but one: a host sysctl under `/proc/sys` is refused with EACCES
//! there (its owner, host root, is no one in the container) before the
//! read-only mount can refuse it with EROFS.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use quilt::engine::{ContainerSpec, Engine, EngineConfig, EngineError, UnavailableLimits};
use quilt_tests::images::{busybox_entries, write_rootfs_tarball, Entry};
use quilt_tests::pipeline::{assert_worker_left_nothing, Agent, LongRunningGuard, Setup, Worker, BOUND};
use quilt_tests::{
    assert_nothing_left, build_busybox_rootfs, quilt_binary, quilt_in, text, wait_bounded, Mode, TestDir,
    COMMAND_DEADLINE, SHOW_UID_MAP,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const ATTACK_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/escape/attack.c");

/// The descriptor numbers probed through `/proc/self/fd/N` links.
const LEAK_PROBES: std::ops::RangeInclusive<u32> = 3..=64;

/// `/bin/attack`: built once per test process into Cargo's scratch
/// directory for integration tests, named after the source's hash so that
/// concurrent test processes share it and an edit rebuilds it.
pub(crate) fn attack_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let source = std::fs::read(ATTACK_SOURCE).unwrap();
        let digest = hex(&Sha256::digest(&source));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(dir).unwrap();
        let binary = dir.join(format!("escape-attack-{}", &digest[..16]));
        if !binary.is_file() {
            let partial = dir.join(format!("escape-attack-{}.{}", &digest[..16], std::process::id()));
            let mut cc = Command::new("cc");
            cc.args(["-static", "-O1", "-Wall", "-o"]).arg(&partial).arg(ATTACK_SOURCE);
            let output = output_bounded(&mut cc, "cc -static (apt-get install -y gcc libc6-dev)");
            assert!(output.status.success(), "cc -static {ATTACK_SOURCE}: {}", text(&output.stderr));
            std::fs::rename(&partial, &binary).unwrap();
        }
        binary
    })
}

/// Runs `command` with its output captured; kills it and fails the test
/// after [`COMMAND_DEADLINE`].
pub(crate) fn output_bounded(command: &mut Command, what: &str) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    wait_bounded(child, COMMAND_DEADLINE, &[what])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn sha256_file(path: &Path) -> String {
    hex(&Sha256::digest(std::fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))))
}

/// A busybox root at `dir` with `/bin/attack` and the links `/fdN ->
/// /proc/self/fd/N` for every N of [`LEAK_PROBES`].
pub(crate) fn hostile_rootfs(dir: &Path) -> PathBuf {
    build_busybox_rootfs(dir);
    std::fs::copy(attack_binary(), dir.join("bin/attack")).unwrap();
    for n in LEAK_PROBES {
        std::os::unix::fs::symlink(format!("/proc/self/fd/{n}"), dir.join(format!("fd{n}"))).unwrap();
    }
    dir.to_path_buf()
}

/// The same root as image entries.
pub(crate) fn hostile_entries() -> Vec<Entry> {
    let mut entries = busybox_entries();
    entries.push(Entry::file("bin/attack", 0o755, std::fs::read(attack_binary()).unwrap()));
    for n in LEAK_PROBES {
        entries.push(Entry::symlink(format!("fd{n}"), format!("/proc/self/fd/{n}")));
    }
    entries
}

/// Imports `entries` as a one-layer image `name` into a worker's data directory.
pub(crate) fn import_image(data: &Path, name: &str, entries: &[Entry]) {
    let tarball = data.join(format!("{name}.tar"));
    write_rootfs_tarball(&tarball, entries, false);
    let mut import = Command::new(quilt_binary());
    import.arg("--data-dir").arg(data).args(["image", "import", "--name", name]).arg(&tarball);
    let output = output_bounded(&mut import, "quilt image import");
    assert!(output.status.success(), "image import {name}: {}", text(&output.stderr));
    std::fs::remove_file(&tarball).unwrap();
}

/// `quilt run --local --name ID FLAGS -- COMMAND` in `mode` (the flags name
/// the root: `--rootfs DIR` or `--image NAME`), bounded; asserts that the
/// container left nothing behind.
fn run_quilt(mode: Mode, data: &TestDir, id: &str, flags: &[&str], command: &[&str]) -> Output {
    let mut args = vec!["run", "--local", "--name", id];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend_from_slice(command);
    let output = quilt_in(mode, data, &args);
    assert_nothing_left(data, "quilt", id);
    output
}

/// [`run_quilt`] on the root directory `rootfs`.
fn run_local(mode: Mode, data: &TestDir, rootfs: &Path, id: &str, command: &[&str]) -> Output {
    run_quilt(mode, data, id, &["--rootfs", rootfs.to_str().unwrap()], command)
}

/// `sh -c SCRIPT` in a fresh container on `rootfs`; its stdout, after
/// checking that it exited 0.
fn sh_local(mode: Mode, data: &TestDir, rootfs: &Path, id: &str, script: &str) -> String {
    let output = run_local(mode, data, rootfs, id, &["/bin/sh", "-c", script]);
    assert!(
        output.status.success(),
        "{id}: {:?}\n{}\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The attempts `attack` printed: (label, result), the result `ok` or an errno name.
pub(crate) fn attempts(output: &str) -> Vec<(String, String)> {
    output
        .lines()
        .filter_map(|line| line.strip_prefix("try "))
        .filter_map(|rest| rest.rsplit_once(' '))
        .map(|(label, result)| (label.to_owned(), result.to_owned()))
        .collect()
}

/// Asserts that `runs` runs of `attack` finished, and that every attempt
/// was refused with an errno allowed for it: `allowed` maps label prefixes
/// to the errnos the protection gives (the first matching prefix wins; an
/// attempt no prefix matches fails the test). Returns the attempts.
pub(crate) fn assert_refused(
    output: &str,
    runs: usize,
    allowed: &[(&str, &[&str])],
) -> Vec<(String, String)> {
    let finished = output.lines().filter(|line| *line == "done").count();
    assert_eq!(finished, runs, "not every attack ran to its end:\n{output}");
    let attempts = attempts(output);
    assert!(!attempts.is_empty(), "no attempts:\n{output}");
    for (label, result) in &attempts {
        assert_ne!(result, "ok", "ESCAPE: `{label}` worked inside the container:\n{output}");
        let errnos = allowed
            .iter()
            .find(|(prefix, _)| label.starts_with(prefix))
            .unwrap_or_else(|| panic!("attempt `{label}` has no expectation:\n{output}"))
            .1;
        assert!(
            errnos.contains(&result.as_str()),
            "`{label}` refused with {result}, expected one of {errnos:?}:\n{output}"
        );
    }
    attempts
}

/// Asserts that each label in `labels` was attempted and worked.
fn assert_worked(output: &str, labels: &[&str]) {
    let attempts = attempts(output);
    for label in labels {
        let result = attempts
            .iter()
            .find(|(attempted, _)| attempted == label)
            .unwrap_or_else(|| panic!("`{label}` not attempted:\n{output}"));
        assert_eq!(result.1, "ok", "`{label}` did not work outside a container either:\n{output}");
    }
}

/// The runtime's own binaries, `quilt` and `quilt-shim`, by content and
/// by identity (`st_dev:st_ino`, as `attack` prints what it holds).
pub(crate) struct BinaryCanary {
    hashes: Vec<(PathBuf, String)>,
    identities: Vec<(PathBuf, String)>,
}

impl BinaryCanary {
    pub(crate) fn take() -> BinaryCanary {
        let quilt = quilt_binary();
        let shim = quilt.with_file_name("quilt-shim");
        assert!(shim.is_file(), "{} not built: cargo build --workspace --bins", shim.display());
        let hashes = [&quilt, &shim].into_iter().map(|path| (path.clone(), sha256_file(path))).collect();
        let identities = [quilt, shim]
            .into_iter()
            .map(|path| {
                let meta = std::fs::metadata(&path).unwrap();
                (path, format!("{}:{}", meta.dev(), meta.ino()))
            })
            .collect();
        BinaryCanary { hashes, identities }
    }

    /// Asserts that the `info held` descriptors `attack` reports include
    /// neither binary: holding one is the first half of CVE-2019-5736; the
    /// write succeeds as soon as no process runs the binary any more.
    pub(crate) fn assert_not_held(&self, output: &str) {
        for line in output.lines().filter(|line| line.starts_with("info held ")) {
            for (path, identity) in &self.identities {
                assert!(
                    !line.ends_with(&format!(" {identity}")),
                    "ESCAPE: the container holds {} ({line})\n{output}",
                    path.display()
                );
            }
        }
    }

    pub(crate) fn assert_unchanged(&self) {
        for (path, hash) in &self.hashes {
            assert_eq!(
                &sha256_file(path),
                hash,
                "ESCAPE: {} was overwritten from inside a container (rebuild it: touch worker/src/main.rs)",
                path.display()
            );
        }
    }
}

/// A host file with known content, inode times and inode number.
pub(crate) struct FileCanary {
    path: PathBuf,
    content: Vec<u8>,
    stamp: (i64, i64, i64, i64, u64),
}

fn stamp(path: &Path) -> (i64, i64, i64, i64, u64) {
    let meta = std::fs::symlink_metadata(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    (meta.mtime(), meta.mtime_nsec(), meta.ctime(), meta.ctime_nsec(), meta.ino())
}

impl FileCanary {
    pub(crate) fn new(path: PathBuf) -> FileCanary {
        let content = format!("canary {}\n", path.display()).into_bytes();
        std::fs::write(&path, &content).unwrap();
        let stamp = stamp(&path);
        FileCanary { path, content, stamp }
    }

    /// What changed, if anything.
    pub(crate) fn change(&self) -> Option<String> {
        let now = std::fs::read(&self.path).unwrap_or_default();
        if now != self.content {
            return Some(format!(
                "host file {} now holds {:?}",
                self.path.display(),
                String::from_utf8_lossy(&now)
            ));
        }
        (stamp(&self.path) != self.stamp).then(|| format!("host file {} was touched", self.path.display()))
    }

    pub(crate) fn assert_unchanged(&self) {
        if let Some(change) = self.change() {
            panic!("ESCAPE: {change}");
        }
    }
}

/// A host directory holding one canary file; its entries and times must not change.
pub(crate) struct DirectoryCanary {
    path: PathBuf,
    file: FileCanary,
    entries: BTreeSet<String>,
    stamp: (i64, i64, i64, i64, u64),
}

fn entries_of(path: &Path) -> BTreeSet<String> {
    std::fs::read_dir(path)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

impl DirectoryCanary {
    pub(crate) fn new(path: PathBuf) -> DirectoryCanary {
        std::fs::create_dir_all(&path).unwrap();
        let file = FileCanary::new(path.join("canary"));
        let entries = entries_of(&path);
        let stamp = stamp(&path);
        DirectoryCanary { path, file, entries, stamp }
    }

    pub(crate) fn assert_unchanged(&self) {
        self.file.assert_unchanged();
        assert_eq!(
            entries_of(&self.path),
            self.entries,
            "ESCAPE: host directory {} changed",
            self.path.display()
        );
        assert_eq!(
            stamp(&self.path),
            self.stamp,
            "ESCAPE: host directory {} was touched",
            self.path.display()
        );
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let path = self.path.to_string_lossy();
        for line in mountinfo.lines() {
            assert!(!line.contains(path.as_ref()), "ESCAPE: a mount appeared on the host: {line}");
        }
    }
}

/// Kernel settings that name a program the kernel runs as root on the
/// host (for a core dump, a module, a power-off, a hotplug event); those
/// this kernel has are attacked and watched.
const KERNEL_KNOBS: &[&str] = &[
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/kernel/modprobe",
    "/proc/sys/kernel/poweroff_cmd",
    "/proc/sys/kernel/hotplug",
];

fn kernel_knobs() -> Vec<PathBuf> {
    KERNEL_KNOBS.iter().map(PathBuf::from).filter(|path| path.is_file()).collect()
}

/// Host-wide kernel settings a container must not reach: the
/// [`KERNEL_KNOBS`] and the `release_agent` of every cgroup v1 hierarchy
/// (CVE-2022-0492).
pub(crate) struct KernelCanary {
    values: Vec<(PathBuf, String)>,
}

impl KernelCanary {
    pub(crate) fn take() -> KernelCanary {
        let mut paths = kernel_knobs();
        paths.extend(release_agents());
        let values =
            paths.into_iter().map(|path| (path.clone(), std::fs::read_to_string(&path).unwrap())).collect();
        KernelCanary { values }
    }

    pub(crate) fn assert_unchanged(&self) {
        for (path, value) in &self.values {
            assert_eq!(
                &std::fs::read_to_string(path).unwrap(),
                value,
                "ESCAPE: host {} changed",
                path.display()
            );
        }
    }
}

/// The host's cgroup v1 `release_agent` files.
fn release_agents() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|entries| entries.flatten().map(|entry| entry.path().join("release_agent")).collect())
        .unwrap_or_default();
    found.push(PathBuf::from("/sys/fs/cgroup/release_agent"));
    found.retain(|path| path.is_file());
    found
}

/// A host process (`sleep`) that no container may signal, trace or stop;
/// killed by its own handle when dropped.
pub(crate) struct Victim {
    child: Child,
}

impl Victim {
    pub(crate) fn start() -> Victim {
        let child = Command::new("sleep")
            .arg("1000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Victim { child }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Alive, sleeping (not stopped, not traced) and without a pending
    /// signal; a process just detached from a tracer may take a moment to
    /// go back to sleep (longer on a loaded machine), so this waits for
    /// that, at most 10 s.
    pub(crate) fn assert_untouched(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "ESCAPE: the host process {} was killed",
                self.pid()
            );
            let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix(name))
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_owned()
            };
            let sleeping = field("State:").starts_with('S') && field("TracerPid:") == "0";
            let no_signal = field("SigPnd:") == "0000000000000000" && field("ShdPnd:") == "0000000000000000";
            if sleeping && no_signal {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ESCAPE: the host process was stopped, traced or signalled:\n{status}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker in `mode` with the hostile image `escape` imported, on its own
/// broker; its long-running containers are killed even if the test fails.
/// `name` and `worker_id` get the mode's suffix ([`Mode::name`]).
pub(crate) struct Fleet {
    // Fields drop in order: the worker and its containers before the broker
    // and the directory.
    worker: Worker,
    _guard: LongRunningGuard,
    pub(crate) agent: Agent,
    pub(crate) setup: Setup,
    pub(crate) mode: Mode,
    names: std::sync::Mutex<Vec<String>>,
    tasks: AtomicU32,
}

impl Fleet {
    pub(crate) async fn start(name: &str, worker_id: &str, mode: Mode) -> Fleet {
        let setup = Setup::new(&mode.name(name)).await;
        import_image(&setup.data, "escape", &hostile_entries());
        let worker_id = mode.name(worker_id);
        let guard = LongRunningGuard { worker_id: worker_id.clone() };
        let worker = Worker::start_with_env(
            &setup.data,
            &setup.broker.url,
            &worker_id,
            &["--concurrency", "8"],
            mode.worker_env(),
        );
        let agent = Agent::connect(&setup.broker.url).await;
        let tasks = AtomicU32::new(0);
        Fleet { worker, _guard: guard, agent, setup, mode, names: Default::default(), tasks }
    }

    fn task_id(&self, what: &str) -> String {
        format!("{what}-{}", self.tasks.fetch_add(1, Ordering::SeqCst))
    }

    /// Creates long-running container `name` from `image` running
    /// `command`; returns the creating task's result.
    pub(crate) async fn create(&self, name: &str, image: &str, command: &[&str]) -> Value {
        let id = self.task_id(&format!("create-{name}"));
        let task = json!({
            "id": id, "image": image, "command": command,
            "container": {"mode": "long_running", "name": name, "restart": "no"},
        });
        self.agent.submit(&task).await;
        let result = self.agent.result(&id, BOUND).await;
        if result["status"] == "succeeded" {
            self.names.lock().unwrap().push(name.to_owned());
        }
        result
    }

    /// Like [`Fleet::create`], and waits until the container runs.
    pub(crate) async fn create_running(&self, name: &str, image: &str, command: &[&str]) -> Value {
        let result = self.create(name, image, command).await;
        assert_eq!(result["status"], "succeeded", "{result}");
        let deadline = Instant::now() + BOUND;
        loop {
            let reply =
                self.agent.request("quilt.api.any.containers.inspect", &Value::String(name.into())).await;
            if reply["ok"]["status"] == "running" {
                return reply["ok"].clone();
            }
            assert!(Instant::now() < deadline, "{name} not running within {BOUND:?}: {reply}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `command` in `target` as an exec task with `extra` fields
    /// (e.g. `workdir`, `env`) merged in; returns the result.
    pub(crate) async fn exec_with(&self, target: &str, command: &[&str], extra: Value) -> Value {
        let id = self.task_id("exec");
        let mut task = json!({
            "id": id, "command": command, "container": {"target": target}, "limits": {"timeout_s": 60},
        });
        if let (Some(task), Value::Object(extra)) = (task.as_object_mut(), extra) {
            task.extend(extra);
        }
        self.agent.submit(&task).await;
        self.agent.result(&id, BOUND).await
    }

    /// Runs `task` (an ephemeral container; an id is added) and returns its result.
    pub(crate) async fn task(&self, mut task: Value) -> Value {
        let id = self.task_id("task");
        task["id"] = json!(id);
        if task.get("limits").is_none() {
            task["limits"] = json!({"timeout_s": 60});
        }
        self.agent.submit(&task).await;
        self.agent.result(&id, BOUND).await
    }

    /// `sh -c SCRIPT` in `target`; its stdout, after checking that it exited 0.
    pub(crate) async fn sh(&self, target: &str, script: &str) -> String {
        let result = self.exec_with(target, &["sh", "-c", script], json!({})).await;
        assert_eq!(result["status"], "succeeded", "{result}");
        result["stdout"].as_str().unwrap().to_owned()
    }

    /// Stops the worker (SIGTERM); its long-running containers keep running.
    pub(crate) fn stop_worker(&mut self) {
        assert!(self.worker.terminate().success());
    }

    /// Starts the worker again on its data directory; it re-adopts its containers.
    pub(crate) fn restart_worker(&mut self) {
        self.worker.restart(self.mode.worker_env());
    }

    /// Asserts that an exec in `target` runs in the fleet's mode.
    pub(crate) async fn assert_mode(&self, target: &str) {
        self.mode.assert_in_effect(&self.sh(target, SHOW_UID_MAP).await);
    }

    /// Removes the containers, stops the worker and checks it left nothing.
    pub(crate) async fn stop(self) {
        let names = std::mem::take(&mut *self.names.lock().unwrap());
        for name in names {
            let reply = self
                .agent
                .request("quilt.api.any.containers.remove", &json!({"name": name, "grace_s": 1}))
                .await;
            assert_eq!(reply["ok"], name, "{reply}");
        }
        let Fleet { mut worker, _guard, agent, setup, .. } = self;
        assert!(worker.terminate().success());
        assert_worker_left_nothing(&worker.id, &setup.data);
        drop(agent);
        let Setup { dir, broker, .. } = setup;
        broker.stop().await;
        drop(dir);
    }
}

/// The shell loop that copies a file over the `exe` of every visible
/// process (CVE-2019-5736 with `cp`), one attempt line each.
const CP_OVER_EXE: &str = "echo pwned > /tmp/payload; for p in /proc/[0-9]*; do \
       if cp /tmp/payload $p/exe 2>/tmp/cp.err; then echo \"try cp-over $p/exe ok\"; \
       elif grep -q 'Text file busy' /tmp/cp.err; then echo \"try cp-over $p/exe ETXTBSY\"; \
       elif grep -q 'Permission denied' /tmp/cp.err; then echo \"try cp-over $p/exe EACCES\"; \
       elif grep -q 'No such file' /tmp/cp.err; then echo \"try cp-over $p/exe ENOENT\"; \
       else echo \"try cp-over $p/exe $(cat /tmp/cp.err)\"; fi; done";

/// What refuses a write to a binary that runs (ETXTBSY), or to the `exe`
/// of a process the container may not inspect (EACCES), or one that is gone.
const EXE_REFUSALS: &[(&str, &[&str])] = &[
    ("open-write", &["ETXTBSY", "EACCES", "ENOENT"]),
    ("reopen-write", &["ETXTBSY", "EACCES", "ENOENT"]),
    ("cp-over", &["ETXTBSY", "EACCES", "ENOENT"]),
];

#[test]
fn the_attacks_work_where_nothing_stops_them() {
    // The positive control of every test here: the same program, outside
    // any container, against harmless targets, succeeds at each attempt the
    // container tests require to be refused.
    let data = TestDir::new("esc-control");
    let attack = attack_binary();
    let run = |command: &mut Command| {
        String::from_utf8_lossy(&output_bounded(command, "attack").stdout).into_owned()
    };

    // CVE-2019-5736: a copy of busybox that runs, is held by an O_PATH
    // descriptor of its /proc/<pid>/exe, exits, and is overwritten.
    let victim_binary = data.path.join("victim/busybox");
    std::fs::create_dir_all(victim_binary.parent().unwrap()).unwrap();
    std::fs::copy(quilt_tests::which("busybox").unwrap(), &victim_binary).unwrap();
    let mut victim = Command::new(&victim_binary).args(["sleep", "0.5"]).spawn().unwrap();
    let pid = victim.id().to_string();
    let output = run(Command::new(attack).args(["exe", "3", &pid]));
    let _ = victim.wait();
    assert_worked(&output, &[&format!("reopen-write /proc/{pid}/exe")]);
    assert!(std::fs::read(&victim_binary).unwrap().starts_with(b"QUILT-ESCAPE-MARKER"), "{output}");

    // A descriptor the process holds is reachable through /proc/self/fd.
    let output =
        run(Command::new("sh").arg("-c").arg(format!("exec 7</etc/hostname; exec {} fds", attack.display())));
    assert!(output.lines().any(|line| line.starts_with("fdlist 0 1 2") && line.contains(" 7")), "{output}");
    assert_worked(&output, &["open-read /proc/self/fd/7"]);

    // Mounts, in a private mount namespace of their own that vanishes.
    let mounts = data.path.join("mounts");
    std::fs::create_dir_all(&mounts).unwrap();
    let output = run(Command::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(attack)
        .arg("mount")
        .arg(&mounts));
    let mount_labels: Vec<String> =
        ["tmpfs", "proc", "cgroup-memory", "cgroup-release-agent", "cgroup2", "bind-root"]
            .iter()
            .map(|name| format!("mount-{name} {}/quilt-mount-{name}", mounts.display()))
            .collect();
    let mut labels: Vec<&str> = mount_labels.iter().map(String::as_str).collect();
    labels.extend(["umount /sys", "fsopen tmpfs", "open_tree /", "chroot"]);
    assert_worked(&output, &labels);

    let output = run(Command::new(attack).args(["userns"]));
    assert_worked(
        &output,
        &["unshare-user", "unshare-user-mount", "unshare-mount", "clone-newuser", "clone3-newuser"],
    );
    let output = run(Command::new(attack).args(["keyctl"]));
    assert_worked(&output, &["keyctl-get-session-keyring", "add_key"]);
    let output = run(Command::new(attack).args(["bpf"]));
    assert_worked(&output, &["bpf-map-create", "bpf-prog-load"]);
    let output = run(Command::new(attack).args(["perf"]));
    assert_worked(&output, &["perf-self", "perf-system-wide"]);

    let mut sleeper = Victim::start();
    let pid = sleeper.pid().to_string();
    let output = run(Command::new(attack).args(["ptrace", &pid]));
    assert_worked(&output, &[&format!("ptrace-attach {pid}"), &format!("ptrace-seize {pid}")]);
    let output = run(Command::new(attack).args([
        "setns",
        &format!("/proc/{pid}/ns/uts"),
        &format!("/proc/{pid}/ns/mnt"),
    ]));
    assert_worked(&output, &[&format!("setns /proc/{pid}/ns/uts"), &format!("setns /proc/{pid}/ns/mnt")]);
    // Signal 0 checks that the signal would be delivered, without sending one.
    let output = run(Command::new(attack).args(["kill", "0", &pid]));
    assert_worked(&output, &[&format!("kill {pid}"), &format!("pidfd_send_signal {pid}")]);
    sleeper.assert_untouched();

    let scratch = data.path.join("writable");
    std::fs::write(&scratch, "").unwrap();
    let output = run(Command::new(attack).args(["write", scratch.to_str().unwrap(), "x"]));
    assert_worked(&output, &[&format!("write {}", scratch.display())]);
}

#[test]
fn proc_exe_cannot_overwrite_the_runtime_at_start() {
    proc_exe_cannot_overwrite_the_runtime_at_start_in(Mode::Host);
}

#[test]
fn proc_exe_cannot_overwrite_the_runtime_at_start_in_a_user_namespace() {
    proc_exe_cannot_overwrite_the_runtime_at_start_in(Mode::UserNamespace);
}

fn proc_exe_cannot_overwrite_the_runtime_at_start_in(mode: Mode) {
    let id = mode.name("esc-exe-start");
    let data = TestDir::new(&id);
    let rootfs = hostile_rootfs(&data.path.join("rootfs"));
    let binaries = BinaryCanary::take();
    let busybox = sha256_file(&rootfs.join("bin/busybox"));
    // The first process is `sh` (pid 1): `attack exe` opens every visible
    // /proc/<pid>/exe for writing and keeps reopening held O_PATH
    // descriptors for a second; then `cp` over each.
    let script = format!("{SHOW_UID_MAP}; attack exe 1; {CP_OVER_EXE}; true");
    let output = sh_local(mode, &data, &rootfs, &id, &script);
    mode.assert_in_effect(&output);
    let refused = assert_refused(&output, 1, EXE_REFUSALS);
    assert!(refused.iter().any(|(label, _)| label == "open-write /proc/1/exe"), "{output}");
    assert!(output.contains("info /proc/1/exe -> /bin/busybox"), "pid 1 is not the command: {output}");
    binaries.assert_not_held(&output);
    binaries.assert_unchanged();
    // The root directory is the overlay's read-only lower layer.
    assert_eq!(sha256_file(&rootfs.join("bin/busybox")), busybox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proc_exe_cannot_overwrite_the_runtime_at_exec() {
    proc_exe_cannot_overwrite_the_runtime_at_exec_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proc_exe_cannot_overwrite_the_runtime_at_exec_in_a_user_namespace() {
    proc_exe_cannot_overwrite_the_runtime_at_exec_in(Mode::UserNamespace).await;
}

async fn proc_exe_cannot_overwrite_the_runtime_at_exec_in(mode: Mode) {
    let mut fleet = Fleet::start("esc-exe-exec", "escexe", mode).await;
    let binaries = BinaryCanary::take();
    // The race, in the container's first process: for 10 s it watches for
    // every process that appears in the container (an exec's setup process
    // is there, running the worker's code, until its execve), holds an
    // O_PATH descriptor of its exe where it can, and keeps trying to reopen
    // each for writing, also after the worker has stopped and its binary
    // is no longer busy (CVE-2019-5736 against runc worked this way).
    const RACE_SECONDS: u64 = 10;
    let started = tokio::time::Instant::now();
    let init = format!("attack exe-race {RACE_SECONDS} > /race.log 2>&1; exec sleep 100000");
    fleet.create_running("box", "escape", &["sh", "-c", &init]).await;

    // Every process an exec can see, by its exe, for writing and with cp.
    let output = fleet.sh("box", &format!("{SHOW_UID_MAP}; attack exe 1; {CP_OVER_EXE}; true")).await;
    mode.assert_in_effect(&output);
    let refused = assert_refused(&output, 1, EXE_REFUSALS);
    assert!(refused.iter().any(|(label, _)| label == "open-write /proc/1/exe"), "{output}");
    binaries.assert_not_held(&output);

    // Forty execs come and go while the race watches.
    for _ in 0..40 {
        let result = fleet.exec_with("box", &["true"], json!({})).await;
        assert_eq!(result["status"], "succeeded", "{result}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The container outlives its worker; the race goes on without it.
    fleet.stop_worker();
    tokio::time::sleep_until(started + Duration::from_secs(RACE_SECONDS + 1)).await;
    binaries.assert_unchanged();

    fleet.restart_worker();
    let log = fleet.sh("box", "cat /race.log").await;
    assert!(log.ends_with("done\n"), "the race did not finish: {log}");
    let worked: Vec<_> = attempts(&log).into_iter().filter(|(_, result)| result == "ok").collect();
    assert!(worked.is_empty(), "ESCAPE: {worked:?}\n{log}");
    binaries.assert_not_held(&log);
    // How many setup processes the race caught (pids whose exe it could
    // not even read): informative, it depends on the scheduler.
    eprintln!("{}", log.lines().find(|line| line.starts_with("info exe-race")).unwrap_or_default());
    binaries.assert_unchanged();
    fleet.stop().await;
}

/// The only descriptors a container's process may hold are its stdio, and
/// no /proc/self/fd/N reaches anything else.
fn assert_only_stdio(output: &str) {
    assert!(output.lines().any(|line| line == "fdlist 0 1 2"), "descriptors beyond 0-2 leaked:\n{output}");
    let attempts = assert_refused(
        output,
        1,
        &[("open-read /proc/self/fd/", &["ENOENT"]), ("open-write /proc/self/fd/", &["ENOENT"])],
    );
    assert_eq!(attempts.len(), 2 * LEAK_PROBES.count(), "{output}");
}

#[test]
fn only_stdio_descriptors_reach_the_first_process() {
    only_stdio_descriptors_reach_the_first_process_in(Mode::Host);
}

#[test]
fn only_stdio_descriptors_reach_the_first_process_in_a_user_namespace() {
    only_stdio_descriptors_reach_the_first_process_in(Mode::UserNamespace);
}

fn only_stdio_descriptors_reach_the_first_process_in(mode: Mode) {
    let id = mode.name("esc-fds-start");
    let data = TestDir::new(&id);
    let rootfs = hostile_rootfs(&data.path.join("rootfs"));
    let stray = DirectoryCanary::new(data.path.join("stray"));
    // `attack` is the container's first process itself (the shell that
    // shows the uid map execs it); Quilt is started with two stray
    // descriptors that are not close-on-exec, as a careless parent leaves
    // them: a directory of the host and a file for appending.
    let rootfs = rootfs.to_str().unwrap();
    let script = format!("{SHOW_UID_MAP}; exec /bin/attack fds");
    let args = ["run", "--local", "--name", &id, "--rootfs", rootfs, "--", "/bin/sh", "-c", &script];
    let output = quilt_with_stray_descriptors(mode, &data, &stray, &args);
    assert_nothing_left(&data, "quilt", &id);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    mode.assert_in_effect(&stdout);
    assert_only_stdio(&stdout);
    stray.assert_unchanged();
}

/// The directory's fd number in [`quilt_with_stray_descriptors`].
const STRAY_DIRECTORY_FD: u32 = 7;

/// `quilt --data-dir DATA ARGS` in `mode`, started by a shell that leaves
/// it descriptor 7 on `stray`'s directory and 9 on its canary file (opened
/// for appending), neither close-on-exec; bounded.
fn quilt_with_stray_descriptors(
    mode: Mode,
    data: &TestDir,
    stray: &DirectoryCanary,
    args: &[&str],
) -> Output {
    let child = mode
        .apply(&mut Command::new("sh"))
        .arg("-c")
        .arg(format!("exec {STRAY_DIRECTORY_FD}<\"$0\" 9>>\"$1\"; shift; exec \"$@\""))
        .arg(&stray.path)
        .arg(&stray.file.path)
        .arg(quilt_binary())
        .arg("--data-dir")
        .arg(&data.path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child, COMMAND_DEADLINE, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_stdio_descriptors_reach_an_exec() {
    only_stdio_descriptors_reach_an_exec_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_stdio_descriptors_reach_an_exec_in_a_user_namespace() {
    only_stdio_descriptors_reach_an_exec_in(Mode::UserNamespace).await;
}

async fn only_stdio_descriptors_reach_an_exec_in(mode: Mode) {
    let fleet = Fleet::start("esc-fds-exec", "escfds", mode).await;
    fleet.create_running("box", "escape", &["sleep", "100000"]).await;
    fleet.assert_mode("box").await;
    let result = fleet.exec_with("box", &["/bin/attack", "fds"], json!({})).await;
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_only_stdio(result["stdout"].as_str().unwrap());
    // The container's first process, started by the shim, holds only stdio too.
    let init = fleet.sh("box", "ls /proc/1/fd | tr '\\n' ' '").await;
    assert_eq!(init.trim(), "0 1 2", "the first process holds more than stdio");
    fleet.stop().await;
}

/// The probe run with its working directory on a `/proc/self/fd/N` link:
/// if the setup process holds a directory of the host at N when it enters
/// the working directory, the command starts outside the root, where `..`
/// leads to the host's `/` (runc's CVE-2024-21626). It then overwrites the
/// canary, by its path on the host.
fn leak_probe(canary: &FileCanary) -> String {
    let relative = canary.path.strip_prefix("/").unwrap().display().to_string();
    format!(
        "cd ../../../../../../../../../../../../../../../..; \
         if [ -e {relative} ]; then echo ESCAPED > {relative}; echo ESCAPED; fi; echo probed"
    )
}

/// The working directories that lead through descriptor N: the image's own
/// link `/fdN`, and `/dev/fd/N`, which every container has (Quilt makes
/// `/dev/fd -> /proc/self/fd`), so no hostile image is needed.
fn leak_workdirs(n: u32) -> [String; 2] {
    [format!("/fd{n}"), format!("/dev/fd/{n}")]
}

/// A `PATH` that leads through descriptor N to a host directory: the
/// program is looked up by execve, before close-on-exec descriptors close.
fn leak_path(n: u32, host_bin: &Path) -> String {
    format!("/dev/fd/{n}/../../../../../../../../../../../../../../../..{}", host_bin.display())
}

/// A host directory holding a program the container must never run.
fn host_only_program(dir: &Path) -> PathBuf {
    let bin = dir.join("host-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(attack_binary(), bin.join("quilt-host-probe")).unwrap();
    bin
}

/// Collects what got out, so that one run reports every way out at once.
#[derive(Default)]
struct Escapes(Vec<String>);

impl Escapes {
    /// Judges one probe: refused by the working-directory step, run inside
    /// the root, or escaped; anything else fails the test at once.
    fn workdir(&mut self, what: &str, refused: bool, refusal: &str, stdout: &str) {
        if stdout.contains("ESCAPED") {
            self.0.push(format!("{what}: the command started outside the root and wrote the host canary"));
        } else if refused {
            assert!(refusal.contains("working directory"), "{what}: refused for another reason: {refusal}");
        } else {
            assert_eq!(stdout.trim(), "probed", "{what}");
        }
    }

    /// Judges one `PATH` probe: the program must not be found.
    fn path(&mut self, what: &str, not_found: bool, stdout: &str) {
        if !not_found {
            self.0.push(format!("{what}: the host's program ran: {:?}", stdout.lines().next()));
        }
    }

    fn assert_none(mut self, canary: &FileCanary) {
        self.0.extend(canary.change());
        assert!(
            self.0.is_empty(),
            "ESCAPE (CVE-2024-21626 style): a descriptor the setup process holds leads out of the root:\n{}",
            self.0.join("\n")
        );
    }
}

#[test]
fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_at_start() {
    no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_at_start_in(Mode::Host);
}

#[test]
fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_at_start_in_a_user_namespace() {
    no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_at_start_in(Mode::UserNamespace);
}

fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_at_start_in(mode: Mode) {
    let data = TestDir::new(&mode.name("esc-leak-start"));
    let rootfs = hostile_rootfs(&data.path.join("rootfs"));
    import_image(&data.path, "busybox", &busybox_entries());
    import_image(&data.path, "escape", &hostile_entries());
    let shown = run_quilt(
        mode,
        &data,
        &mode.name("esc-leak-mode"),
        &["--image", "busybox"],
        &["sh", "-c", SHOW_UID_MAP],
    );
    mode.assert_in_effect(&text(&shown.stdout));
    let canary = FileCanary::new(data.path.join("canary"));
    let host_bin = host_only_program(&data.path);
    let probe = leak_probe(&canary);
    let rootfs_flags = ["--rootfs", rootfs.to_str().unwrap()];
    let mut escapes = Escapes::default();
    for n in LEAK_PROBES {
        let [link, dev_fd] = leak_workdirs(n);
        for (root, workdir) in [
            (&rootfs_flags[..], &link),
            (&["--image", "escape"][..], &link),
            (&["--image", "busybox"][..], &dev_fd),
        ] {
            let id = mode.name(&format!("esc-leak-{n}"));
            let mut flags = root.to_vec();
            flags.extend(["--workdir", workdir]);
            let output = run_quilt(mode, &data, &id, &flags, &["/bin/sh", "-c", &probe]);
            let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
            let code = output.status.code();
            assert!(matches!(code, Some(0 | 125)), "{root:?} {workdir}: exit {code:?}: {stdout} {stderr}");
            escapes.workdir(
                &format!("{} --workdir {workdir}", root.join(" ")),
                code == Some(125),
                &stderr,
                &stdout,
            );
        }
        let path = format!("PATH={}", leak_path(n, &host_bin));
        let output = run_quilt(
            mode,
            &data,
            &mode.name("esc-leak-path"),
            &["--image", "busybox", "--env", &path],
            &["quilt-host-probe", "fds"],
        );
        escapes.path(&path, output.status.code() == Some(127), &text(&output.stdout));
    }
    // A directory descriptor Quilt inherited from its parent, not close-on-exec.
    let stray = DirectoryCanary::new(data.path.join("stray"));
    let stray_id = mode.name("esc-leak-stray");
    let workdir = format!("/dev/fd/{STRAY_DIRECTORY_FD}");
    let args = [
        "run",
        "--local",
        "--name",
        &stray_id,
        "--image",
        "busybox",
        "--workdir",
        &workdir,
        "--",
        "/bin/sh",
        "-c",
        &probe,
    ];
    let output = quilt_with_stray_descriptors(mode, &data, &stray, &args);
    assert_nothing_left(&data, "quilt", &stray_id);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(matches!(output.status.code(), Some(0 | 125)), "{workdir}: {stdout} {stderr}");
    escapes.workdir(
        &format!("--workdir {workdir} (inherited)"),
        output.status.code() == Some(125),
        &stderr,
        &stdout,
    );
    let path = format!("PATH={}", leak_path(STRAY_DIRECTORY_FD, &host_bin));
    let args = [
        "run",
        "--local",
        "--name",
        &stray_id,
        "--image",
        "busybox",
        "--env",
        &path,
        "--",
        "quilt-host-probe",
        "fds",
    ];
    let output = quilt_with_stray_descriptors(mode, &data, &stray, &args);
    assert_nothing_left(&data, "quilt", &stray_id);
    escapes.path(&format!("{path} (inherited)"), output.status.code() == Some(127), &text(&output.stdout));
    escapes.assert_none(&canary);
}

/// Judges an exec's or a task's result for [`Escapes::workdir`].
fn judge_workdir(escapes: &mut Escapes, what: &str, result: &Value) {
    let status = result["status"].as_str().unwrap_or_default();
    assert!(matches!(status, "succeeded" | "error"), "{what}: {result}");
    if status == "error" {
        assert_eq!(result["error"]["kind"], "setup", "{what}: {result}");
    }
    let refusal = result["error"]["message"].as_str().unwrap_or_default();
    escapes.workdir(what, status == "error", refusal, result["stdout"].as_str().unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_in_a_worker_task() {
    no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_in_a_worker_task_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_in_a_worker_task_in_a_user_namespace(
) {
    no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_in_a_worker_task_in(Mode::UserNamespace)
        .await;
}

async fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_in_a_worker_task_in(mode: Mode) {
    let fleet = Fleet::start("esc-leak-task", "escleaktask", mode).await;
    let shown = fleet.task(json!({"image": "busybox", "command": ["sh", "-c", SHOW_UID_MAP]})).await;
    mode.assert_in_effect(shown["stdout"].as_str().unwrap_or_default());
    let canary = FileCanary::new(fleet.setup.dir.path.join("canary"));
    let host_bin = host_only_program(&fleet.setup.dir.path);
    let probe = leak_probe(&canary);
    let mut escapes = Escapes::default();
    for n in LEAK_PROBES {
        let [link, dev_fd] = leak_workdirs(n);
        for (image, workdir) in [("escape", &link), ("busybox", &dev_fd)] {
            let task = json!({"image": image, "command": ["sh", "-c", &probe], "workdir": workdir});
            let result = fleet.task(task).await;
            judge_workdir(&mut escapes, &format!("task on {image} with workdir {workdir}"), &result);
        }
        let path = leak_path(n, &host_bin);
        let result = fleet
            .task(json!({"image": "busybox", "command": ["quilt-host-probe", "fds"], "env": {"PATH": path}}))
            .await;
        escapes.path(
            &format!("task with PATH={path}"),
            result["error"]["kind"] == "command_not_found",
            result["stdout"].as_str().unwrap_or_default(),
        );
    }
    escapes.assert_none(&canary);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_at_exec() {
    no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_at_exec_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_at_exec_in_a_user_namespace() {
    no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_at_exec_in(Mode::UserNamespace).await;
}

async fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_at_exec_in(mode: Mode) {
    let fleet = Fleet::start("esc-leak-exec", "escleak", mode).await;
    let canary = FileCanary::new(fleet.setup.dir.path.join("canary"));
    let host_bin = host_only_program(&fleet.setup.dir.path);
    let probe = leak_probe(&canary);
    fleet.create_running("box", "escape", &["sleep", "100000"]).await;
    fleet.assert_mode("box").await;
    let mut escapes = Escapes::default();
    for n in LEAK_PROBES {
        for workdir in leak_workdirs(n) {
            let result = fleet.exec_with("box", &["sh", "-c", &probe], json!({"workdir": workdir})).await;
            judge_workdir(&mut escapes, &format!("exec with workdir {workdir}"), &result);
        }
        let path = leak_path(n, &host_bin);
        let result =
            fleet.exec_with("box", &["quilt-host-probe", "fds"], json!({"env": {"PATH": path}})).await;
        escapes.path(
            &format!("exec with PATH={path}"),
            result["error"]["kind"] == "command_not_found",
            result["stdout"].as_str().unwrap_or_default(),
        );
    }
    escapes.assert_none(&canary);
    fleet.stop().await;
}

/// Removes the per-test cgroup v2 parent the engine leaves in place.
struct CgroupParent(PathBuf);

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[tokio::test]
async fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_on_cgroup_v2() {
    no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_on_cgroup_v2_in(Mode::Host).await;
}

#[tokio::test]
async fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_on_cgroup_v2_in_a_user_namespace() {
    no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_on_cgroup_v2_in(Mode::UserNamespace)
        .await;
}

async fn no_workdir_or_path_reaches_the_host_through_a_leaked_descriptor_on_cgroup_v2_in(mode: Mode) {
    // On cgroup v2 the setup process is cloned with CLONE_INTO_CGROUP, so it
    // holds a descriptor of its cgroup's directory in the host's cgroup2
    // mount until its execve. This host is v1 "hybrid"; its cgroup2 tree
    // at /sys/fs/cgroup/unified serves the v2 path, as in cgroup_v2.rs.
    // The root is a plain directory (no image lease is held).
    const UNIFIED: &str = "/sys/fs/cgroup/unified";
    if !Path::new(UNIFIED).join("cgroup.procs").exists() {
        eprintln!("skipping: no cgroup2 tree at {UNIFIED}");
        return;
    }
    let data = TestDir::new(&mode.name("esc-leak-v2"));
    let rootfs = hostile_rootfs(&data.path.join("rootfs"));
    let canary = FileCanary::new(data.path.join("canary"));
    let host_bin = host_only_program(&data.path);
    let parent = mode.name(&format!("quilt-escape-v2-{}", std::process::id()));
    let _parent = CgroupParent(Path::new(UNIFIED).join(&parent));
    let config = EngineConfig {
        state_dir: data.path.join("containers"),
        cgroup_parent: parent,
        unavailable_limits: UnavailableLimits::Skip,
        user_namespace: mode.id_range(),
    };
    let engine = Engine::with_cgroup_v2_at(config, Path::new(UNIFIED)).unwrap();
    let command = vec!["/bin/sh".into(), "-c".into(), SHOW_UID_MAP.into()];
    let shown = engine.run(ContainerSpec::new("esc-v2-mode", vec![rootfs.clone()], command)).await.unwrap();
    mode.assert_in_effect(&String::from_utf8_lossy(&shown.stdout.data));
    let probe = leak_probe(&canary);
    let mut escapes = Escapes::default();
    for n in LEAK_PROBES {
        for workdir in leak_workdirs(n) {
            let command = vec!["/bin/sh".into(), "-c".into(), probe.clone()];
            let mut spec = ContainerSpec::new(format!("esc-v2-{n}"), vec![rootfs.clone()], command);
            spec.workdir = workdir.clone();
            let what = format!("workdir {workdir}");
            match engine.run(spec).await {
                Ok(outcome) => {
                    escapes.workdir(&what, false, "", &String::from_utf8_lossy(&outcome.stdout.data))
                }
                Err(error @ EngineError::Setup { .. }) => {
                    escapes.workdir(&what, true, &error.to_string(), "")
                }
                Err(error) => panic!("{what}: {error}"),
            }
        }
        let command = vec!["quilt-host-probe".into(), "fds".into()];
        let mut spec = ContainerSpec::new(format!("esc-v2-path-{n}"), vec![rootfs.clone()], command);
        let path = leak_path(n, &host_bin);
        spec.env.push(("PATH".into(), path.clone()));
        match engine.run(spec).await {
            Err(error) if error.kind() == "command_not_found" => {}
            Ok(outcome) => {
                escapes.path(&format!("PATH={path}"), false, &String::from_utf8_lossy(&outcome.stdout.data))
            }
            Err(error) => panic!("PATH={path}: {error}"),
        }
    }
    escapes.assert_none(&canary);
}

/// A hostile image whose mount targets lead to the host.
struct SymlinkVariant {
    name: &'static str,
    /// (path in the image, the host path it links to) instead of a directory.
    links: Vec<(String, String)>,
    /// The start is refused: the top-level targets are opened inside the
    /// root without following symlinks, so a link there is an error; links
    /// under /dev and /proc are covered by the fresh tmpfs and procfs and
    /// never seen.
    refused: bool,
}

fn symlink_variants(target_dir: &Path, target_file: &Path) -> Vec<SymlinkVariant> {
    let dir = target_dir.display().to_string();
    let relative = format!("../../../../../../../../..{dir}");
    let variant = |name, links: &[(&str, &str)], refused| SymlinkVariant {
        name,
        links: links.iter().map(|(path, target)| ((*path).to_owned(), (*target).to_owned())).collect(),
        refused,
    };
    vec![
        variant("dev-abs", &[("dev", &dir)], true),
        variant("dev-rel", &[("dev", &relative)], true),
        variant("proc-abs", &[("proc", &dir)], true),
        variant("sys-abs", &[("sys", &dir)], true),
        variant("null", &[("dev/null", &target_file.display().to_string())], false),
        variant("shm-pts-mqueue", &[("dev/shm", &dir), ("dev/pts", &dir), ("dev/mqueue", &dir)], false),
        variant("proc-sys", &[("proc/sys", &dir)], false),
    ]
}

/// Writes through every mount target an image could have redirected, and
/// shows /dev/null is the real device.
const THROUGH_THE_MOUNTS: &str = "echo pwned > /dev/null; echo pwned > /dev/shm/pwned; \
     echo pwned > /dev/mqueue/pwned 2>/dev/null; ls /dev/pts /proc/sys /sys >/dev/null; \
     stat -c '%t:%T %F' /dev/null; echo ran";

/// [`THROUGH_THE_MOUNTS`] after [`SHOW_UID_MAP`], and what it prints in `mode`.
fn through_the_mounts(mode: Mode) -> (String, String) {
    let script = format!("{SHOW_UID_MAP}; {THROUGH_THE_MOUNTS}");
    (script, format!("{}\n1:3 character special file\nran\n", mode.uid_map_line()))
}

fn apply_variant(rootfs: &Path, links: &[(String, String)]) {
    for (path, target) in links {
        let at = rootfs.join(path);
        if at.is_dir() && !at.is_symlink() {
            std::fs::remove_dir_all(&at).unwrap();
        } else {
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        }
        std::os::unix::fs::symlink(target, &at).unwrap();
    }
}

#[test]
fn image_with_host_symlinks_for_its_mounts_cannot_mount_onto_the_host_at_start() {
    image_with_host_symlinks_for_its_mounts_cannot_mount_onto_the_host_at_start_in(Mode::Host);
}

#[test]
fn image_with_host_symlinks_for_its_mounts_cannot_mount_onto_the_host_at_start_in_a_user_namespace() {
    image_with_host_symlinks_for_its_mounts_cannot_mount_onto_the_host_at_start_in(Mode::UserNamespace);
}

fn image_with_host_symlinks_for_its_mounts_cannot_mount_onto_the_host_at_start_in(mode: Mode) {
    let data = TestDir::new(&mode.name("esc-links-start"));
    let target_dir = DirectoryCanary::new(data.path.join("host-target"));
    let target_file = FileCanary::new(data.path.join("passwd-canary"));
    let (script, expected) = through_the_mounts(mode);
    for SymlinkVariant { name, links, refused } in symlink_variants(&target_dir.path, &target_file.path) {
        let rootfs = hostile_rootfs(&data.path.join(format!("rootfs-{name}")));
        apply_variant(&rootfs, &links);
        let id = mode.name(&format!("esc-link-{name}"));
        let output = run_local(mode, &data, &rootfs, &id, &["/bin/sh", "-c", &script]);
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
        if refused {
            assert_eq!(output.status.code(), Some(125), "{name}: {stdout} {stderr}");
            assert!(stderr.contains("mount target"), "{name}: the error does not say why: {stderr}");
        } else {
            assert!(output.status.success(), "{name}: {stdout} {stderr}");
            assert_eq!(stdout, expected.trim_end(), "{name}");
        }
        target_dir.assert_unchanged();
        target_file.assert_unchanged();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_with_host_symlinks_for_its_mounts_cannot_mount_onto_the_host_at_exec() {
    image_with_host_symlinks_for_its_mounts_cannot_mount_onto_the_host_at_exec_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_with_host_symlinks_for_its_mounts_cannot_mount_onto_the_host_at_exec_in_a_user_namespace() {
    image_with_host_symlinks_for_its_mounts_cannot_mount_onto_the_host_at_exec_in(Mode::UserNamespace).await;
}

async fn image_with_host_symlinks_for_its_mounts_cannot_mount_onto_the_host_at_exec_in(mode: Mode) {
    let fleet = Fleet::start("esc-links-exec", "esclinks", mode).await;
    let target_dir = DirectoryCanary::new(fleet.setup.dir.path.join("host-target"));
    let target_file = FileCanary::new(fleet.setup.dir.path.join("passwd-canary"));
    let (script, expected) = through_the_mounts(mode);
    for SymlinkVariant { name, links, refused } in symlink_variants(&target_dir.path, &target_file.path) {
        let mut entries = hostile_entries();
        for (path, target) in &links {
            entries.retain(|entry| !matches!(entry, Entry::Dir { path: dir, .. } if dir == path));
            entries.push(Entry::symlink(path.clone(), target.clone()));
        }
        let image = format!("link-{name}");
        import_image(&fleet.setup.data, &image, &entries);
        let created = fleet.create(name, &image, &["sleep", "100000"]).await;
        if refused {
            assert_eq!(created["status"], "error", "{name}: {created}");
            assert_eq!(created["error"]["kind"], "invalid_rootfs", "{name}: {created}");
        } else {
            assert_eq!(created["status"], "succeeded", "{name}: {created}");
            assert_eq!(fleet.sh(name, &script).await, expected, "{name}");
        }
        target_dir.assert_unchanged();
        target_file.assert_unchanged();
    }
    fleet.stop().await;
}

/// Writes to host-wide kernel knobs, cgroup mounts (with a release_agent)
/// and the release_agent files of every host hierarchy, by name; shows the
/// uid map first.
fn kernel_knob_script() -> String {
    let mut script = format!(
        "{SHOW_UID_MAP}; attack write /proc/sysrq-trigger h; attack mount /tmp; \
         echo cgroupfs $(ls -A /sys/fs/cgroup | wc -l)",
    );
    for knob in kernel_knobs() {
        script.push_str(&format!("; attack write {} '|/bin/attack %p'", knob.display()));
    }
    for agent in release_agents() {
        script.push_str(&format!("; attack write {} /bin/attack", agent.display()));
    }
    script
}

fn assert_kernel_knobs_refused(mode: Mode, output: &str) {
    // The host has no /proc/sysrq-trigger when its kernel lacks magic SysRq.
    let sysrq: &[&str] =
        if Path::new("/proc/sysrq-trigger").exists() { &["EROFS"] } else { &["EROFS", "ENOENT"] };
    // In a user namespace the container's root does not own the host's
    // sysctl files (host root does), so the permission check refuses the
    // open before the read-only mount is consulted.
    let sysctl: &[&str] = match mode {
        Mode::Host => &["EROFS"],
        Mode::UserNamespace => &["EROFS", "EACCES"],
    };
    assert_refused(
        output,
        2 + kernel_knobs().len() + release_agents().len(),
        &[
            ("open-write /proc/sys/", sysctl),
            ("open-write /proc/sysrq-trigger", sysrq),
            ("open-write /sys/fs/cgroup/", &["ENOENT", "EROFS"]),
            ("mount-", &["EPERM"]),
            ("remount-rw", &["EPERM"]),
            ("umount", &["EPERM"]),
            ("fsopen", &["EPERM"]),
            ("open_tree", &["EPERM"]),
            ("chroot", &["EPERM"]),
        ],
    );
    assert!(output.contains("cgroupfs 0\n"), "the cgroup filesystem is visible inside:\n{output}");
}

#[test]
fn kernel_knobs_and_release_agents_are_out_of_reach_at_start() {
    kernel_knobs_and_release_agents_are_out_of_reach_at_start_in(Mode::Host);
}

#[test]
fn kernel_knobs_and_release_agents_are_out_of_reach_at_start_in_a_user_namespace() {
    kernel_knobs_and_release_agents_are_out_of_reach_at_start_in(Mode::UserNamespace);
}

fn kernel_knobs_and_release_agents_are_out_of_reach_at_start_in(mode: Mode) {
    let id = mode.name("esc-knobs-start");
    let data = TestDir::new(&id);
    let rootfs = hostile_rootfs(&data.path.join("rootfs"));
    let kernel = KernelCanary::take();
    let output = sh_local(mode, &data, &rootfs, &id, &kernel_knob_script());
    mode.assert_in_effect(&output);
    assert_kernel_knobs_refused(mode, &output);
    kernel.assert_unchanged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_knobs_and_release_agents_are_out_of_reach_at_exec() {
    kernel_knobs_and_release_agents_are_out_of_reach_at_exec_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_knobs_and_release_agents_are_out_of_reach_at_exec_in_a_user_namespace() {
    kernel_knobs_and_release_agents_are_out_of_reach_at_exec_in(Mode::UserNamespace).await;
}

async fn kernel_knobs_and_release_agents_are_out_of_reach_at_exec_in(mode: Mode) {
    let fleet = Fleet::start("esc-knobs-exec", "escknobs", mode).await;
    let kernel = KernelCanary::take();
    fleet.create_running("box", "escape", &["sleep", "100000"]).await;
    let output = fleet.sh("box", &kernel_knob_script()).await;
    mode.assert_in_effect(&output);
    assert_kernel_knobs_refused(mode, &output);
    kernel.assert_unchanged();
    fleet.stop().await;
}

/// Namespaces, keyrings, eBPF, perf, ptrace of the host victim and of
/// every visible process, setns into every namespace of pid 1, and a
/// SIGKILL to the victim's host pid.
fn privileged_script(victim: u32) -> String {
    format!(
        "{SHOW_UID_MAP}; attack userns; \
         if unshare -U true 2>/tmp/unshare.err; then echo 'try unshare-U ok'; \
         elif grep -q 'not permitted' /tmp/unshare.err; then echo 'try unshare-U EPERM'; \
         else echo \"try unshare-U $(cat /tmp/unshare.err)\"; fi; \
         attack keyctl; attack bpf; attack perf; \
         attack ptrace {victim} $(cd /proc && ls -d [0-9]*); \
         attack setns /proc/1/ns/*; \
         attack kill 9 {victim}"
    )
}

fn assert_privileged_refused(output: &str) {
    assert_refused(
        output,
        7,
        &[
            ("unshare-", &["EPERM"]),
            ("clone-", &["EPERM"]),
            // clone3's flags sit in memory a seccomp filter cannot read: ENOSYS makes libc fall back.
            ("clone3-", &["ENOSYS"]),
            ("keyctl-", &["EPERM"]),
            ("add_key", &["EPERM"]),
            ("request_key", &["EPERM"]),
            ("bpf-", &["EPERM"]),
            ("perf-", &["EPERM"]),
            ("ptrace-", &["EPERM"]),
            ("process_vm_readv", &["EPERM"]),
            // The host pid does not exist in the container's pid namespace.
            ("pidfd_getfd", &["EPERM", "ESRCH"]),
            ("setns", &["EPERM"]),
            ("kill", &["ESRCH"]),
            ("pidfd_send_signal", &["ESRCH"]),
        ],
    );
}

#[test]
fn privileged_syscalls_are_refused_at_start() {
    privileged_syscalls_are_refused_at_start_in(Mode::Host);
}

#[test]
fn privileged_syscalls_are_refused_at_start_in_a_user_namespace() {
    privileged_syscalls_are_refused_at_start_in(Mode::UserNamespace);
}

fn privileged_syscalls_are_refused_at_start_in(mode: Mode) {
    let id = mode.name("esc-priv-start");
    let data = TestDir::new(&id);
    let rootfs = hostile_rootfs(&data.path.join("rootfs"));
    let mut victim = Victim::start();
    let output = sh_local(mode, &data, &rootfs, &id, &privileged_script(victim.pid()));
    mode.assert_in_effect(&output);
    assert_privileged_refused(&output);
    victim.assert_untouched();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_syscalls_are_refused_at_exec() {
    privileged_syscalls_are_refused_at_exec_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_syscalls_are_refused_at_exec_in_a_user_namespace() {
    privileged_syscalls_are_refused_at_exec_in(Mode::UserNamespace).await;
}

async fn privileged_syscalls_are_refused_at_exec_in(mode: Mode) {
    let fleet = Fleet::start("esc-priv-exec", "escpriv", mode).await;
    let mut victim = Victim::start();
    fleet.create_running("box", "escape", &["sleep", "100000"]).await;
    let output = fleet.sh("box", &privileged_script(victim.pid())).await;
    mode.assert_in_effect(&output);
    assert_privileged_refused(&output);
    victim.assert_untouched();
    fleet.stop().await;
}
