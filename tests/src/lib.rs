//! Fixtures shared by Quilt's integration tests: a busybox rootfs built from
//! the host's busybox-static, a private data directory per test, the `quilt`
//! binary, and checks that a test left nothing behind.
//!
//! These tests need root, a real kernel and `busybox` on PATH (Debian's
//! busybox-static); `.ci/run` installs what they need.

pub mod images;
pub mod pipeline;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the shared busybox rootfs lives (built once per test process).
pub fn busybox_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        remove_stale_rootfs();
        let dir = PathBuf::from(format!("/tmp/quilt-test-rootfs-{}", std::process::id()));
        build_busybox_rootfs(&dir);
        dir
    })
}

/// The rootfs fixture outlives its test process (nothing runs at exit), so
/// each run removes those of test processes that are gone.
fn remove_stale_rootfs() {
    let Ok(entries) = std::fs::read_dir("/tmp") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("quilt-test-rootfs-").and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Build a minimal busybox root filesystem at `dir`.
pub fn build_busybox_rootfs(dir: &Path) {
    let busybox = which("busybox").expect("busybox not on PATH: apt-get install -y busybox-static");
    let _ = std::fs::remove_dir_all(dir);
    for sub in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::copy(&busybox, dir.join("bin/busybox")).unwrap();
    let list = Command::new(&busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
}

/// Find a program on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| candidate.is_file())
}

/// The `quilt` binary built next to this test binary.
pub fn quilt_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("QUILT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/integration-<hash> -> target/<profile>/quilt
    let candidate = exe.parent().and_then(Path::parent).map(|dir| dir.join("quilt")).unwrap();
    assert!(
        candidate.is_file(),
        "{} not built: run `cargo build --workspace --bins` first (or set QUILT_BIN)",
        candidate.display()
    );
    candidate
}

/// A private data directory for one test, removed (with a leftover check) on drop.
pub struct TestDir {
    /// The directory.
    pub path: PathBuf,
}

impl TestDir {
    /// Make a fresh one named after the test.
    pub fn new(name: &str) -> TestDir {
        let path = PathBuf::from(format!("/tmp/quilt-test-{}-{}", std::process::id(), name));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // QUILT_TEST_KEEP=1 keeps it for a post-mortem.
        if std::env::var_os("QUILT_TEST_KEEP").is_some() {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `quilt run --local --rootfs <busybox> [flags] -- command`, with `--data-dir`.
pub fn quilt_run(data: &TestDir, id: &str, flags: &[&str], command: &[&str]) -> Output {
    quilt_run_command(data, id, flags, command).output().unwrap()
}

fn quilt_run_command(data: &TestDir, id: &str, flags: &[&str], command: &[&str]) -> Command {
    let mut cmd = Command::new(quilt_binary());
    cmd.arg("--data-dir")
        .arg(&data.path)
        .args(["run", "--local", "--name", id, "--rootfs"])
        .arg(busybox_rootfs())
        .args(flags)
        .arg("--")
        .args(command);
    cmd
}

/// As [`quilt_run`] with `--json`, parsed.
pub fn quilt_run_json(
    data: &TestDir,
    id: &str,
    flags: &[&str],
    command: &[&str],
) -> (i32, serde_json::Value) {
    quilt_run_json_in(Mode::Host, data, id, flags, command)
}

/// [`quilt_run_json`] in `mode`.
pub fn quilt_run_json_in(
    mode: Mode,
    data: &TestDir,
    id: &str,
    flags: &[&str],
    command: &[&str],
) -> (i32, serde_json::Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(flags);
    let mut cmd = quilt_run_command(data, id, &all, command);
    parse_outcome(mode.apply(&mut cmd).output().unwrap())
}

fn parse_outcome(output: Output) -> (i32, serde_json::Value) {
    let code = output.status.code().unwrap_or(-1);
    let value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "quilt --json printed no JSON ({error}); exit {code}; stdout {:?}; stderr {:?}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (code, value)
}

/// The text a container printed on stdout, trimmed.
pub fn stdout_text(outcome: &serde_json::Value) -> String {
    outcome["stdout"]["text"].as_str().unwrap_or_default().trim().to_owned()
}

/// Every v1 hierarchy or v2 tree where a container's cgroup could be.
pub fn cgroup_dirs(parent: &str, id: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let base = Path::new("/sys/fs/cgroup");
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            dirs.push(entry.path().join(parent).join(id));
        }
    }
    dirs.push(base.join(parent).join(id));
    dirs
}

/// Assert that container `id` left no cgroup, mount, state directory or process behind.
pub fn assert_nothing_left(data: &TestDir, parent: &str, id: &str) {
    for dir in cgroup_dirs(parent, id) {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    assert_no_loop_devices_under(&data.path);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let data_path = data.path.to_string_lossy();
    for line in mountinfo.lines() {
        assert!(!line.contains(data_path.as_ref()), "mount left behind: {line}");
    }
    let state = data.path.join("containers").join(id);
    assert!(!state.exists(), "state directory {} left behind", state.display());
}

/// Host processes whose command line contains `needle` (used to check, never to kill).
pub fn processes_matching(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

/// A Debian bookworm root filesystem with python3, as an uncompressed
/// tarball built by mmdebstrap from Debian's mirror. Built once per machine
/// and kept outside the repository (`QUILT_TEST_CACHE`, default
/// `/var/cache/quilt-tests`); concurrent test processes wait on a lock.
pub fn debian_python_tarball() -> PathBuf {
    let cache = std::env::var_os("QUILT_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/quilt-tests"));
    std::fs::create_dir_all(&cache).unwrap();
    let tarball = cache.join("debian-bookworm-python3.tar");
    let lock_file = std::fs::File::create(cache.join("debian-bookworm-python3.lock")).unwrap();
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).unwrap();
    if !tarball.is_file() {
        // mmdebstrap picks its output format from the extension: keep `.tar`.
        let partial = cache.join("debian-bookworm-python3.partial.tar");
        let _ = std::fs::remove_dir_all(&partial);
        let _ = std::fs::remove_file(&partial);
        let status = Command::new("mmdebstrap")
            .args(["--variant=apt", "--include=python3", "--mode=root", "--quiet", "bookworm"])
            .arg(&partial)
            .status()
            .expect("mmdebstrap not installed: apt-get install -y mmdebstrap");
        assert!(status.success(), "mmdebstrap failed ({status}); it needs Debian's mirror");
        std::fs::rename(&partial, &tarball).unwrap();
    }
    tarball
}

/// Longest any one `quilt` command may take in the tests: it is killed, and
/// the test fails, after this.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// Output bytes as trimmed text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

/// Run `quilt --data-dir <data> ARGS`, bounded by [`COMMAND_DEADLINE`].
pub fn quilt(data: &TestDir, args: &[&str]) -> Output {
    quilt_bounded(Command::new(quilt_binary()).arg("--data-dir").arg(&data.path).args(args), args)
}

/// [`quilt`] in `mode`.
pub fn quilt_in(mode: Mode, data: &TestDir, args: &[&str]) -> Output {
    let mut command = Command::new(quilt_binary());
    mode.apply(command.arg("--data-dir").arg(&data.path).args(args));
    quilt_bounded(&mut command, args)
}

fn quilt_bounded(command: &mut Command, args: &[&str]) -> Output {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_bounded(child, COMMAND_DEADLINE, args)
}

/// The host ids of the tests' user-namespace mode: container ids
/// `0..65536` are host ids `100000..165536`.
pub const USERNS_RANGE: &str = "100000:65536";

/// A shell command that prints the uid map its container runs under on one
/// line, `uid_map 0 100000 65536` in user-namespace mode; see
/// [`Mode::assert_in_effect`].
pub const SHOW_UID_MAP: &str = "echo uid_map $(cat /proc/self/uid_map)";

/// The mode an isolation test's containers run in. It is given to each
/// `quilt` process the test starts, never set in the test process's own
/// environment: tests run in parallel threads of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A container's root is the host's root (no `--userns`).
    Host,
    /// `QUILT_USERNS=`[`USERNS_RANGE`]: a container's root is host uid 100000.
    UserNamespace,
}

impl Mode {
    /// Sets `QUILT_USERNS` on a `quilt` command for this mode (removes it in
    /// [`Mode::Host`], lest the test process's environment pick a mode).
    pub fn apply(self, command: &mut Command) -> &mut Command {
        match self {
            Mode::Host => command.env_remove("QUILT_USERNS"),
            Mode::UserNamespace => command.env("QUILT_USERNS", USERNS_RANGE),
        }
    }

    /// The environment a `quilt worker` needs for this mode (see
    /// `pipeline::Worker::start_with_env`); it inherits the rest.
    pub fn worker_env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Mode::Host => &[],
            Mode::UserNamespace => &[("QUILT_USERNS", USERNS_RANGE)],
        }
    }

    /// `base`, prefixed `userns-` in user-namespace mode: a test's two
    /// variants run at once, so their directories, container ids (cgroups
    /// are host-wide) and worker ids must differ, and a prefix keeps one
    /// variant's paths from containing the other's (the leftover checks
    /// search the mount table for them).
    pub fn name(self, base: &str) -> String {
        match self {
            Mode::Host => base.to_owned(),
            Mode::UserNamespace => format!("userns-{base}"),
        }
    }

    /// The engine's `user_namespace` setting for this mode.
    pub fn id_range(self) -> Option<quilt::engine::IdRange> {
        match self {
            Mode::Host => None,
            Mode::UserNamespace => Some(USERNS_RANGE.parse().unwrap()),
        }
    }

    /// The line [`SHOW_UID_MAP`] prints in a container of this mode: in
    /// host mode the test process's own map (the host's user namespace).
    pub fn uid_map_line(self) -> String {
        let map = match self {
            Mode::Host => std::fs::read_to_string("/proc/self/uid_map").unwrap(),
            Mode::UserNamespace => format!("0 {}", USERNS_RANGE.replace(':', " ")),
        };
        format!("uid_map {}", map.split_whitespace().collect::<Vec<_>>().join(" "))
    }

    /// Asserts that `output` holds the line [`SHOW_UID_MAP`] prints in this
    /// mode: the proof that the container really ran in it.
    pub fn assert_in_effect(self, output: &str) {
        let expected = self.uid_map_line();
        assert!(
            output.lines().any(|line| line == expected),
            "not run in {self:?} mode (is QUILT_USERNS set in the tests' environment?): \
             no line {expected:?} in:\n{output}"
        );
    }
}

/// Wait for a child, killing it (by its own handle) and failing after `deadline`.
pub fn wait_bounded(mut child: Child, deadline: Duration, what: &[&str]) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("quilt {what:?} still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Assert a command succeeded, showing its output otherwise.
pub fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}: {} {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// Run a container from `image`, assert it succeeded and left nothing behind, return its stdout.
pub fn run_image(data: &TestDir, id: &str, image: &str, command: &[&str]) -> String {
    let mut args = vec!["run", "--local", "--name", id, "--image", image, "--"];
    args.extend_from_slice(command);
    let output = quilt(data, &args);
    assert_ok(&output);
    assert_nothing_left(data, "quilt", id);
    text(&output.stdout)
}

/// No loop device is backed by a file under `dir` (a disk layer's device
/// detaches itself once its container's mount namespace is gone, which the
/// kernel may finish a moment after the last process: bounded wait).
pub fn assert_no_loop_devices_under(dir: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = quilt::engine::loop_devices_backed_under(dir);
        if left.is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "loop devices left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
