//! Resource abuse, each stopped at its limit and named in the outcome: a
//! fork bomb, a memory bomb, a CPU spin, a disk fill, a /dev/shm fill, file
//! creation until the inodes run out, descriptor exhaustion and an output
//! flood; a disk layer's fill, which stops at its size, and a directory
//! layer's, which stops at its filesystem. Real
//! containers on the busybox rootfs through `quilt run --local`, then the
//! same abuses as tasks through a real worker, which keeps serving.
//!
//! Every container runs with a `--timeout` (or a task `timeout_s`), so every
//! run is bounded even if a limit were missing.
//!
//! Each test runs again as `..._in_a_user_namespace`, in user-namespace
//! mode ([`Mode::UserNamespace`]), with the same expectations; one of its
//! containers shows its uid map, which proves the mode.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quilt_tests::pipeline::{assert_worker_left_nothing, task, Agent, Setup, Worker, BOUND};
use quilt_tests::{
    assert_no_loop_devices_under, assert_nothing_left, cgroup_dirs, processes_matching, quilt_run_json_in,
    Mode, TestDir, SHOW_UID_MAP,
};
use serde_json::{json, Value};

/// Runs `quilt run --local --json` in `mode` on a thread while `sample` is
/// called every 20 ms on this one; returns the exit code, the outcome and
/// every sample.
fn run_sampling<T>(
    mode: Mode,
    data: &TestDir,
    id: &str,
    flags: &[&str],
    command: &[&str],
    mut sample: impl FnMut() -> T,
) -> (i32, Value, Vec<T>) {
    let done = Arc::new(AtomicBool::new(false));
    let (code, outcome, samples) = std::thread::scope(|scope| {
        let finished = Arc::clone(&done);
        let runner = scope.spawn(move || {
            let result = quilt_run_json_in(mode, data, id, flags, command);
            finished.store(true, Ordering::SeqCst);
            result
        });
        let mut samples = Vec::new();
        while !done.load(Ordering::SeqCst) {
            samples.push(sample());
            std::thread::sleep(Duration::from_millis(20));
        }
        let (code, outcome) = runner.join().expect("quilt run thread");
        (code, outcome, samples)
    });
    (code, outcome, samples)
}

/// Processes on the host (numeric entries of /proc).
fn host_process_count() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .count()
}

/// The pids controller's directory of container `id`, once it exists.
fn pids_cgroup(id: &str) -> Option<PathBuf> {
    cgroup_dirs("quilt", id).into_iter().find(|dir| dir.join("pids.current").is_file())
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> u64 {
    let status = nix::sys::statvfs::statvfs(path).unwrap();
    status.blocks_available() as u64 * status.fragment_size() as u64
}

/// The outcome fields that name an abuse, for messages and for the checks
/// that a quiet container names none.
fn named(outcome: &Value) -> Value {
    json!({
        "status": outcome["status"],
        "pids_limit_hit": outcome["pids_limit_hit"],
        "cpu_throttled_periods": outcome["usage"]["cpu_throttled_periods"],
        "scratch_full": outcome["usage"]["scratch_full"],
        "shm_full": outcome["usage"]["shm_full"],
        "inodes_exhausted": outcome["usage"]["inodes_exhausted"],
        "truncated": [outcome["stdout"]["truncated"], outcome["stderr"]["truncated"]],
    })
}

#[test]
fn a_quiet_container_names_no_abuse() {
    a_quiet_container_names_no_abuse_in(Mode::Host);
}

#[test]
fn a_quiet_container_names_no_abuse_in_a_user_namespace() {
    a_quiet_container_names_no_abuse_in(Mode::UserNamespace);
}

fn a_quiet_container_names_no_abuse_in(mode: Mode) {
    let id = mode.name("abuse-quiet");
    let data = TestDir::new(&id);
    let script = format!("echo data > /tmp/file; echo shm > /dev/shm/file; cat /tmp/file; {SHOW_UID_MAP}");
    let (code, outcome) = quilt_run_json_in(
        mode,
        &data,
        &id,
        &["--cpus", "0.5", "--timeout", "20s"],
        &["/bin/sh", "-c", &script],
    );
    assert_eq!(code, 0, "{outcome}");
    mode.assert_in_effect(outcome["stdout"]["text"].as_str().unwrap());
    assert_eq!(
        named(&outcome),
        json!({
            "status": "succeeded",
            "pids_limit_hit": false,
            "cpu_throttled_periods": 0,
            "scratch_full": false,
            "shm_full": false,
            "inodes_exhausted": false,
            "truncated": [false, false],
        }),
        "{outcome}"
    );
    assert_eq!(outcome["usage"]["cpu_throttled_ns"], 0, "{outcome}");
    assert_nothing_left(&data, "quilt", &id);
}

#[test]
fn fork_bomb_stops_at_the_pids_limit_and_the_host_recovers() {
    fork_bomb_stops_at_the_pids_limit_and_the_host_recovers_in(Mode::Host);
}

#[test]
fn fork_bomb_stops_at_the_pids_limit_and_the_host_recovers_in_a_user_namespace() {
    fork_bomb_stops_at_the_pids_limit_and_the_host_recovers_in(Mode::UserNamespace);
}

fn fork_bomb_stops_at_the_pids_limit_and_the_host_recovers_in(mode: Mode) {
    let id = &mode.name("abuse-forkbomb");
    let data = TestDir::new(id);
    // Unique text in every bomb process's command line (forks keep it),
    // a shell function name; neither mode's is part of the other's.
    let marker = &format!("abuse_forkbomb_1f3a_{mode:?}");
    // pid 1 becomes `sleep` without forking: once the bomb holds every pid,
    // a fork of its own would fail and end the container early.
    let script = format!("{SHOW_UID_MAP}; {marker}() {{ {marker} | {marker} & }}; {marker}; exec sleep 10");
    let baseline = host_process_count();
    let flags = ["--pids", "32", "--timeout", "3s"];
    let (code, outcome, samples) = run_sampling(mode, &data, id, &flags, &["/bin/sh", "-c", &script], || {
        let in_cgroup = pids_cgroup(id)
            .and_then(|dir| std::fs::read_to_string(dir.join("pids.current")).ok())
            .and_then(|text| text.trim().parse::<u64>().ok());
        (in_cgroup, host_process_count())
    });
    assert_eq!(outcome["pids_limit_hit"], true, "{outcome}");
    assert_eq!(outcome["status"], "timed_out", "{outcome}");
    assert_eq!(code, 124);
    mode.assert_in_effect(outcome["stdout"]["text"].as_str().unwrap());
    let most_in_cgroup = samples.iter().filter_map(|(count, _)| *count).max();
    assert!(matches!(most_in_cgroup, Some(1..=32)), "pids.current peaked at {most_in_cgroup:?}");
    // Once the container is gone, so is every bomb process, and the host's
    // process count is back where it was (give or take what other work on
    // the machine started meanwhile).
    assert!(processes_matching(marker).is_empty(), "bomb processes survived");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = host_process_count();
        if now <= baseline + 16 {
            break;
        }
        assert!(Instant::now() < deadline, "host processes {now}, {baseline} before the bomb");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_nothing_left(&data, "quilt", id);
    assert!(std::process::Command::new("true").status().unwrap().success(), "the host cannot fork");
}

#[test]
fn memory_bomb_across_processes_is_oom_killed() {
    memory_bomb_across_processes_is_oom_killed_in(Mode::Host);
}

#[test]
fn memory_bomb_across_processes_is_oom_killed_in_a_user_namespace() {
    memory_bomb_across_processes_is_oom_killed_in(Mode::UserNamespace);
}

fn memory_bomb_across_processes_is_oom_killed_in(mode: Mode) {
    let id = mode.name("abuse-membomb");
    let data = TestDir::new(&id);
    // Four shells each doubling a string until memory runs out.
    let script = format!("{SHOW_UID_MAP}; for i in 1 2 3 4; do (x=a; while :; do x=$x$x; done) & done; wait");
    let (code, outcome) = quilt_run_json_in(
        mode,
        &data,
        &id,
        &["--memory", "64M", "--timeout", "20s"],
        &["/bin/sh", "-c", &script],
    );
    assert_eq!(outcome["status"], "oom_killed", "{outcome}");
    mode.assert_in_effect(outcome["stdout"]["text"].as_str().unwrap());
    assert_eq!(outcome["oom_killed"], true);
    assert_eq!(code, 123);
    let peak = outcome["usage"]["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak <= 65 << 20, "peak {peak} above the 64 MiB limit");
    assert_nothing_left(&data, "quilt", &id);
}

#[test]
fn cpu_spin_is_held_to_its_quota_and_named() {
    cpu_spin_is_held_to_its_quota_and_named_in(Mode::Host);
}

#[test]
fn cpu_spin_is_held_to_its_quota_and_named_in_a_user_namespace() {
    cpu_spin_is_held_to_its_quota_and_named_in(Mode::UserNamespace);
}

fn cpu_spin_is_held_to_its_quota_and_named_in(mode: Mode) {
    let id = mode.name("abuse-cpu");
    let free_id = mode.name("abuse-cpu-free");
    let data = TestDir::new(&id);
    // Two spinners want two CPUs; the quota gives them half of one.
    let script = format!("{SHOW_UID_MAP}; while :; do :; done & while :; do :; done");
    let spin = ["/bin/sh", "-c", &script];
    let (_, outcome) = quilt_run_json_in(mode, &data, &id, &["--cpus", "0.5", "--timeout", "3s"], &spin);
    assert_eq!(outcome["status"], "timed_out", "{outcome}");
    mode.assert_in_effect(outcome["stdout"]["text"].as_str().unwrap());
    let cpu_s = outcome["usage"]["cpu_ns"].as_u64().unwrap() as f64 / 1e9;
    let wall_s = outcome["timings"]["run_ms"].as_f64().unwrap() / 1e3;
    // At most its quota (plus one period of slack); at least a fair part of
    // it even on a busy machine.
    assert!(cpu_s <= 0.5 * wall_s + 0.1, "{cpu_s:.2} s of CPU in {wall_s:.2} s at --cpus 0.5");
    assert!(cpu_s >= 0.2 * wall_s, "{cpu_s:.2} s of CPU in {wall_s:.2} s: it hardly ran");
    let periods = outcome["usage"]["cpu_throttled_periods"].as_u64().unwrap();
    let throttled_ns = outcome["usage"]["cpu_throttled_ns"].as_u64().unwrap();
    // ~30 periods of 100 ms in 3 s; a spinner wanting 4x its quota is held
    // back in most of them.
    assert!(periods >= 5, "throttled in {periods} periods: {outcome}");
    assert!(throttled_ns > 0, "{outcome}");

    // The same spin without a quota is never throttled.
    let (_, free) = quilt_run_json_in(mode, &data, &free_id, &["--timeout", "1s"], &spin);
    assert_eq!(free["usage"]["cpu_throttled_periods"], 0, "{free}");
    assert_eq!(free["usage"]["cpu_throttled_ns"], 0, "{free}");
    for id in [id, free_id] {
        assert_nothing_left(&data, "quilt", &id);
    }
}

#[test]
fn disk_fill_stops_at_the_scratch_size_off_the_host_disk_and_is_named() {
    disk_fill_stops_at_the_scratch_size_off_the_host_disk_and_is_named_in(Mode::Host);
}

#[test]
fn disk_fill_stops_at_the_scratch_size_off_the_host_disk_and_is_named_in_a_user_namespace() {
    disk_fill_stops_at_the_scratch_size_off_the_host_disk_and_is_named_in(Mode::UserNamespace);
}

fn disk_fill_stops_at_the_scratch_size_off_the_host_disk_and_is_named_in(mode: Mode) {
    let id = mode.name("abuse-disk");
    let data = TestDir::new(&id);
    let host_paths = [data.path.clone(), PathBuf::from("/")];
    let before: Vec<u64> = host_paths.iter().map(|path| free_bytes(path)).collect();
    // The default scratch (in memory, 256 MiB): write 400 MiB, then hold the
    // full scratch for a moment so the host's free space is sampled with it.
    let script =
        format!("dd if=/dev/zero of=/fill bs=1M count=400; echo dd=$?; ls -l /fill; sleep 1; {SHOW_UID_MAP}");
    let (code, outcome, samples) =
        run_sampling(mode, &data, &id, &["--timeout", "30s"], &["/bin/sh", "-c", &script], || {
            host_paths.iter().map(|path| free_bytes(path)).collect::<Vec<u64>>()
        });
    assert_eq!(code, 0, "{outcome}");
    let stderr = outcome["stderr"]["text"].as_str().unwrap();
    assert!(stderr.contains("No space left on device"), "{outcome}");
    let stdout = outcome["stdout"]["text"].as_str().unwrap();
    mode.assert_in_effect(stdout);
    // busybox dd reports ENOSPC on stderr and exits 1; the file holds what
    // fitted: the 256 MiB scratch less the few pages its directories use.
    assert!(stdout.contains("dd=1"), "{outcome}");
    let size: u64 = stdout.split_whitespace().nth(5).and_then(|field| field.parse().ok()).unwrap();
    assert!(((250 << 20)..=(256 << 20)).contains(&size), "/fill is {size} bytes: {outcome}");
    assert_eq!(outcome["usage"]["scratch_full"], true, "{outcome}");
    assert_eq!(outcome["usage"]["shm_full"], false, "{outcome}");
    assert_eq!(outcome["status"], "succeeded", "{outcome}");
    // The 256 MiB went to memory, not to the host's disk: its free space moved
    // by clearly less. Other work on the machine writes meanwhile too (a
    // build alongside took 140 MiB once), so the bound is 3/4 of the fill.
    for (index, path) in host_paths.iter().enumerate() {
        let lowest = samples.iter().map(|sample| sample[index]).min().unwrap();
        let drop = before[index].saturating_sub(lowest);
        assert!(drop < 192 << 20, "{} lost {drop} bytes of free space during the fill", path.display());
    }
    assert_nothing_left(&data, "quilt", &id);
}

/// A small ext4 filesystem in a file, loop-mounted (the loop device is
/// released on unmount: `autoclear`) as the state directory of a test's
/// containers, so a disk layer can be filled without filling the host.
struct SmallFilesystem {
    mount_point: PathBuf,
    mounted: bool,
}

impl SmallFilesystem {
    /// Mounted as `<data>/containers`, where `quilt run --local` keeps
    /// container directories.
    fn new(data: &TestDir, megabytes: u64) -> SmallFilesystem {
        SmallFilesystem::at(&data.path, &data.path.join("containers"), megabytes)
    }

    /// Its image in `dir`, mounted at `mount_point`.
    fn at(dir: &std::path::Path, mount_point: &std::path::Path, megabytes: u64) -> SmallFilesystem {
        let image = dir.join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(megabytes << 20).unwrap();
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&image)
            .status()
            .unwrap();
        assert!(made.success(), "mkfs.ext4 failed");
        let mount_point = mount_point.to_path_buf();
        std::fs::create_dir_all(&mount_point).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount_point)
            .status()
            .unwrap();
        assert!(mounted.success(), "mounting {} failed", image.display());
        SmallFilesystem { mount_point, mounted: true }
    }

    fn unmount(&mut self) {
        if std::mem::take(&mut self.mounted) {
            let status = std::process::Command::new("umount").arg(&self.mount_point).status().unwrap();
            assert!(status.success(), "unmounting {} failed", self.mount_point.display());
        }
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        if self.mounted {
            let _ = std::process::Command::new("umount").arg(&self.mount_point).status();
        }
    }
}

#[test]
fn a_disk_layer_fill_stops_at_its_size() {
    a_disk_layer_fill_stops_at_its_size_in(Mode::Host);
}

#[test]
fn a_disk_layer_fill_stops_at_its_size_in_a_user_namespace() {
    a_disk_layer_fill_stops_at_its_size_in(Mode::UserNamespace);
}

/// `--scratch disk` is a filesystem of its own of the scratch size (32 MiB
/// here): a 100 MiB fill stops inside it, with the host's data disk
/// gigabytes from full, and the outcome names it. The layer's mount and
/// loop device go with the container.
fn a_disk_layer_fill_stops_at_its_size_in(mode: Mode) {
    let id = mode.name("abuse-disk-layer-size");
    let data = TestDir::new(&id);
    let script = format!(
        "dd if=/dev/zero of=/fill bs=1M count=100; echo dd=$?; ls -l /fill; grep ' / ' /proc/mounts | cut -d' ' -f3; \
         {SHOW_UID_MAP}"
    );
    let (code, outcome) = quilt_run_json_in(
        mode,
        &data,
        &id,
        &["--scratch", "disk", "--scratch-size", "32M", "--timeout", "20s"],
        &["/bin/sh", "-c", &script],
    );
    assert_eq!(code, 0, "{outcome}");
    let stdout = outcome["stdout"]["text"].as_str().unwrap();
    mode.assert_in_effect(stdout);
    assert!(stdout.contains("dd=1\n"), "{outcome}");
    assert!(stdout.contains("\noverlay\n"), "{outcome}");
    assert!(outcome["stderr"]["text"].as_str().unwrap().contains("No space left on device"), "{outcome}");
    // What fitted: the 32 MiB less the filesystem's journal and metadata.
    let size: u64 = stdout.split_whitespace().nth(5).and_then(|field| field.parse().ok()).unwrap();
    assert!(((20 << 20)..=(32 << 20)).contains(&size), "/fill is {size} bytes: {outcome}");
    assert!(free_bytes(&data.path) > 1 << 30, "the data disk itself has room");
    assert_eq!(outcome["usage"]["scratch_full"], true, "{outcome}");
    assert_eq!(outcome["usage"]["shm_full"], false, "{outcome}");
    assert_nothing_left(&data, "quilt", &id);
}

#[test]
fn a_disk_layer_bigger_than_the_data_disk_has_room_for_is_refused() {
    let id = "abuse-disk-layer-room";
    let data = TestDir::new(id);
    let mut filesystem = SmallFilesystem::new(&data, 48);
    let (code, outcome) = quilt_run_json_in(
        Mode::Host,
        &data,
        id,
        &["--scratch", "disk", "--scratch-size", "1G", "--timeout", "20s"],
        &["/bin/true"],
    );
    assert_eq!(code, 125, "{outcome}");
    assert_eq!(outcome["status"], "error", "{outcome}");
    let message = outcome["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("no space for a 1024 MiB disk layer at "), "{outcome}");
    assert!(!filesystem.mount_point.join(id).exists(), "the container's directory was left");
    assert_no_loop_devices_under(&filesystem.mount_point);
    filesystem.unmount();
    assert_nothing_left(&data, "quilt", id);
}

/// A worker whose data disk has no room for a long-running container's
/// layer hands the task back for a worker that has; after the last
/// delivery (here the first) the result names the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_room_for_a_disk_layer_says_no_space() {
    let Setup { dir, broker, data } = Setup::new("abuse-no-room").await;
    let mut filesystem = SmallFilesystem::at(&dir.path, &data.join("containers"), 48);
    let mut worker =
        Worker::start(&data, &broker.url, "noroom", &["--long-running-disk", "1G", "--max-deliver", "1"]);
    let agent = Agent::connect(&broker.url).await;
    let id = agent
        .submit(&json!({"id": "lr-big", "image": "busybox", "command": ["sleep", "1000"],
            "container": {"mode": "long_running", "name": "big"}}))
        .await;
    let result = agent.result(&id, BOUND).await;
    assert_eq!(result["status"], "error", "{result:#}");
    assert_eq!(result["error"]["kind"], "no_space", "{result:#}");
    let message = result["error"]["message"].as_str().unwrap();
    assert!(message.contains("no space for a 1024 MiB disk layer"), "{result:#}");
    // The worker keeps serving tasks that need no disk layer.
    let ok = agent.submit(&task("after-no-room", &["echo", "fine"])).await;
    assert_eq!(agent.result(&ok, BOUND).await["stdout"], "fine\n");
    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert_no_loop_devices_under(&data);
    filesystem.unmount();
    assert_worker_left_nothing("noroom", &data);
    broker.stop().await;
}

#[test]
fn a_directory_layer_fill_stops_at_its_filesystem_and_is_named() {
    a_directory_layer_fill_stops_at_its_filesystem_and_is_named_in(Mode::Host);
}

#[test]
fn a_directory_layer_fill_stops_at_its_filesystem_and_is_named_in_a_user_namespace() {
    a_directory_layer_fill_stops_at_its_filesystem_and_is_named_in(Mode::UserNamespace);
}

/// `--scratch directory` (what environment builds use) is not size-limited:
/// a fill stops where the data directory's filesystem does, here a 48 MiB
/// one, the outcome names it, and what the container printed is kept even
/// so (the captures live on that filesystem too). The space comes back
/// when the container is removed.
fn a_directory_layer_fill_stops_at_its_filesystem_and_is_named_in(mode: Mode) {
    let id = mode.name("abuse-directory-layer");
    let data = TestDir::new(&id);
    let mut filesystem = SmallFilesystem::new(&data, 48);
    let empty = free_bytes(&filesystem.mount_point);
    let script = format!("dd if=/dev/zero of=/fill bs=1M count=100; echo dd=$?; {SHOW_UID_MAP}");
    let (code, outcome) = quilt_run_json_in(
        mode,
        &data,
        &id,
        &["--scratch", "directory", "--timeout", "20s"],
        &["/bin/sh", "-c", &script],
    );
    assert_eq!(code, 0, "{outcome}");
    let stdout = outcome["stdout"]["text"].as_str().unwrap();
    mode.assert_in_effect(stdout);
    assert!(stdout.contains("dd=1"), "{outcome}");
    assert!(outcome["stderr"]["text"].as_str().unwrap().contains("No space left on device"), "{outcome}");
    assert_eq!(outcome["usage"]["scratch_full"], true, "{outcome}");
    assert_eq!(outcome["usage"]["shm_full"], false, "{outcome}");
    // The layer was removed with the container, and its space is free again.
    let after = free_bytes(&filesystem.mount_point);
    assert!(after + (1 << 20) >= empty, "{after} bytes free after the run, {empty} before");
    filesystem.unmount();
    assert_nothing_left(&data, "quilt", &id);
}

#[test]
fn shm_fill_stops_at_64_mib_and_is_named() {
    shm_fill_stops_at_64_mib_and_is_named_in(Mode::Host);
}

#[test]
fn shm_fill_stops_at_64_mib_and_is_named_in_a_user_namespace() {
    shm_fill_stops_at_64_mib_and_is_named_in(Mode::UserNamespace);
}

fn shm_fill_stops_at_64_mib_and_is_named_in(mode: Mode) {
    let id = mode.name("abuse-shm");
    let data = TestDir::new(&id);
    let script =
        format!("dd if=/dev/zero of=/dev/shm/fill bs=1M count=100; ls -l /dev/shm/fill; {SHOW_UID_MAP}");
    let (code, outcome) =
        quilt_run_json_in(mode, &data, &id, &["--timeout", "20s"], &["/bin/sh", "-c", &script]);
    assert_eq!(code, 0, "{outcome}");
    assert!(outcome["stderr"]["text"].as_str().unwrap().contains("No space left on device"), "{outcome}");
    let stdout = outcome["stdout"]["text"].as_str().unwrap();
    mode.assert_in_effect(stdout);
    let size: u64 = stdout.split_whitespace().nth(4).and_then(|field| field.parse().ok()).unwrap();
    assert_eq!(size, 64 << 20, "{outcome}");
    assert_eq!(outcome["usage"]["shm_full"], true, "{outcome}");
    assert_eq!(outcome["usage"]["scratch_full"], false, "{outcome}");
    assert_nothing_left(&data, "quilt", &id);
}

/// A script that creates empty files in `dir` until that fails, then
/// prints how many it made. `true` (not `:`) so that a failed redirection
/// does not end the shell.
fn create_files_until_failure(dir: &str) -> String {
    format!("cd {dir} && i=0; while true > f$i; do i=$((i+1)); done; echo $i")
}

#[test]
fn file_creation_stops_at_the_inode_bound_and_is_named() {
    file_creation_stops_at_the_inode_bound_and_is_named_in(Mode::Host);
}

#[test]
fn file_creation_stops_at_the_inode_bound_and_is_named_in_a_user_namespace() {
    file_creation_stops_at_the_inode_bound_and_is_named_in(Mode::UserNamespace);
}

fn file_creation_stops_at_the_inode_bound_and_is_named_in(mode: Mode) {
    let (id, shm_id) = (mode.name("abuse-inodes"), mode.name("abuse-inodes-shm"));
    let data = TestDir::new(&id);
    // Default scratch: 65 536 inodes, a few of them the overlay's own.
    let script = format!("{SHOW_UID_MAP}; {}", create_files_until_failure("/tmp"));
    let (code, outcome) =
        quilt_run_json_in(mode, &data, &id, &["--timeout", "60s"], &["/bin/sh", "-c", &script]);
    assert_eq!(code, 0, "{outcome}");
    assert_eq!(quilt::engine::scratch_inodes(256 << 20), 65_536);
    let stdout = outcome["stdout"]["text"].as_str().unwrap();
    mode.assert_in_effect(stdout);
    let made: u64 = stdout.lines().last().unwrap().parse().unwrap();
    assert!((65_500..65_536).contains(&made), "{made} files: {outcome}");
    assert!(outcome["stderr"]["text"].as_str().unwrap().contains("No space left on device"), "{outcome}");
    assert_eq!(outcome["usage"]["inodes_exhausted"], true, "{outcome}");
    assert_eq!(outcome["usage"]["scratch_full"], false, "empty files take no blocks: {outcome}");

    // /dev/shm: 4096 inodes, its root directory one of them.
    let (code, outcome) = quilt_run_json_in(
        mode,
        &data,
        &shm_id,
        &["--timeout", "20s"],
        &["/bin/sh", "-c", &create_files_until_failure("/dev/shm")],
    );
    assert_eq!(code, 0, "{outcome}");
    assert_eq!(quilt::engine::SHM_INODES, 4096);
    assert_eq!(outcome["stdout"]["text"], "4095\n", "{outcome}");
    assert_eq!(outcome["usage"]["inodes_exhausted"], true, "{outcome}");
    assert_eq!(outcome["usage"]["shm_full"], false, "{outcome}");
    for id in [id, shm_id] {
        assert_nothing_left(&data, "quilt", &id);
    }
}

#[test]
fn descriptor_exhaustion_stops_at_rlimit_nofile() {
    descriptor_exhaustion_stops_at_rlimit_nofile_in(Mode::Host);
}

#[test]
fn descriptor_exhaustion_stops_at_rlimit_nofile_in_a_user_namespace() {
    descriptor_exhaustion_stops_at_rlimit_nofile_in(Mode::UserNamespace);
}

fn descriptor_exhaustion_stops_at_rlimit_nofile_in(mode: Mode) {
    let id = mode.name("abuse-fds");
    let data = TestDir::new(&id);
    // Shows the limits, tries to raise the hard one, opens descriptors 3, 4,
    // ... until that fails (`command` keeps a failed redirection of `exec`
    // from ending the shell), raises the soft limit to the hard one and goes
    // on.
    let open_all = "while command eval \"exec $i</dev/null\"; do i=$((i+1)); \
                    [ $i -gt 10000 ] && break; done; echo opened $i";
    let script = format!(
        "{SHOW_UID_MAP}; ulimit -Sn; ulimit -Hn; ulimit -Hn 4097 || echo refused; i=3; {open_all}; \
         ulimit -Sn 4096; {open_all}"
    );
    let (code, outcome) =
        quilt_run_json_in(mode, &data, &id, &["--timeout", "20s"], &["/bin/sh", "-c", &script]);
    assert_eq!(code, 0, "{outcome}");
    let expected = format!("{}\n1024\n4096\nrefused\nopened 1024\nopened 4096\n", mode.uid_map_line());
    assert_eq!(outcome["stdout"]["text"], expected, "{outcome}");
    assert!(outcome["stderr"]["text"].as_str().unwrap().contains("Too many open files"), "{outcome}");
    assert_nothing_left(&data, "quilt", &id);
}

#[test]
fn output_flood_a_hundred_times_the_cap_is_cut_and_flagged() {
    output_flood_a_hundred_times_the_cap_is_cut_and_flagged_in(Mode::Host);
}

#[test]
fn output_flood_a_hundred_times_the_cap_is_cut_and_flagged_in_a_user_namespace() {
    output_flood_a_hundred_times_the_cap_is_cut_and_flagged_in(Mode::UserNamespace);
}

fn output_flood_a_hundred_times_the_cap_is_cut_and_flagged_in(mode: Mode) {
    let id = mode.name("abuse-flood");
    let data = TestDir::new(&id);
    let flood = 100 * 64 * 1024 + 1;
    // The uid map's line comes first on stdout, within the cap.
    let script = format!("{SHOW_UID_MAP}; yes | head -c {flood}; yes | head -c {flood} >&2");
    let shown = mode.uid_map_line().len() + 1;
    let (code, outcome) = quilt_run_json_in(
        mode,
        &data,
        &id,
        &["--output-limit", "64k", "--timeout", "20s"],
        &["/bin/sh", "-c", &script],
    );
    assert_eq!(code, 0, "{outcome}");
    mode.assert_in_effect(outcome["stdout"]["text"].as_str().unwrap());
    for (stream, written) in [("stdout", shown + flood), ("stderr", flood)] {
        assert_eq!(outcome[stream]["truncated"], true, "{stream}");
        assert_eq!(outcome[stream]["bytes"], written, "{stream}");
        assert_eq!(outcome[stream]["text"].as_str().unwrap().len(), 64 * 1024, "{stream}");
    }
    assert_nothing_left(&data, "quilt", &id);
}

/// Peak resident memory of a process (`VmHWM`), bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

fn limited_task(id: &str, limits: Value, script: &str) -> Value {
    let mut body = task(id, &["sh", "-c", script]);
    body["limits"] = limits;
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuses_through_a_worker_are_named_and_it_keeps_serving() {
    abuses_through_a_worker_are_named_and_it_keeps_serving_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuses_through_a_worker_are_named_and_it_keeps_serving_in_a_user_namespace() {
    abuses_through_a_worker_are_named_and_it_keeps_serving_in(Mode::UserNamespace).await;
}

async fn abuses_through_a_worker_are_named_and_it_keeps_serving_in(mode: Mode) {
    let Setup { dir: _dir, broker, data } = Setup::new(&mode.name("abuse-worker")).await;
    let worker_id = mode.name("abuse");
    let mut worker = Worker::start_with_env(&data, &broker.url, &worker_id, &[], mode.worker_env());
    let agent = Agent::connect(&broker.url).await;
    let run = |body: Value| {
        let agent = &agent;
        async move {
            let id = agent.submit(&body).await;
            agent.result(&id, BOUND).await
        }
    };

    let warm = run(task("t-warm", &["sh", "-c", SHOW_UID_MAP])).await;
    assert_eq!(warm["status"], "succeeded", "{warm:#}");
    mode.assert_in_effect(warm["stdout"].as_str().unwrap());

    let bomb =
        run(limited_task("t-bomb", json!({"pids": 32, "timeout_s": 3}), "b() { b | b & }; b; exec sleep 10"))
            .await;
    assert_eq!(bomb["status"], "timed_out", "{bomb:#}");
    assert_eq!(bomb["usage"]["pids_limit_hit"], true, "{bomb:#}");

    let memory = run(limited_task(
        "t-memory",
        json!({"memory_mb": 32, "timeout_s": 20}),
        "dd if=/dev/zero of=/dev/null bs=128M count=1",
    ))
    .await;
    assert_eq!(memory["status"], "oom_killed", "{memory:#}");

    // A quota of 10 ms per 100 ms period: two spinners reach it in every
    // period they get the CPU at all, however busy the machine (at 0.5 a
    // loaded CI machine left them under their quota in most periods).
    let spin = run(limited_task(
        "t-spin",
        json!({"cpus": 0.1, "timeout_s": 3}),
        "while :; do :; done & while :; do :; done",
    ))
    .await;
    assert_eq!(spin["status"], "timed_out", "{spin:#}");
    assert!(spin["usage"]["cpu_throttled_periods"].as_u64().unwrap() >= 3, "{spin:#}");
    assert!(spin["usage"]["cpu_throttled_ns"].as_u64().unwrap() > 0, "{spin:#}");

    let disk =
        run(limited_task("t-disk", json!({"timeout_s": 30}), "dd if=/dev/zero of=/fill bs=1M count=400"))
            .await;
    assert!(disk["stderr"].as_str().unwrap().contains("No space left on device"), "{disk:#}");
    assert_eq!(disk["usage"]["scratch_full"], true, "{disk:#}");

    let shm = run(limited_task(
        "t-shm",
        json!({"timeout_s": 20}),
        "dd if=/dev/zero of=/dev/shm/fill bs=1M count=100",
    ))
    .await;
    assert_eq!(shm["usage"]["shm_full"], true, "{shm:#}");
    assert_eq!(shm["usage"]["scratch_full"], false, "{shm:#}");

    let inodes =
        run(limited_task("t-inodes", json!({"timeout_s": 20}), &create_files_until_failure("/dev/shm")))
            .await;
    assert_eq!(inodes["stdout"], "4095\n", "{inodes:#}");
    assert_eq!(inodes["usage"]["inodes_exhausted"], true, "{inodes:#}");

    let fds = run(limited_task(
        "t-fds",
        json!({"timeout_s": 20}),
        "i=3; while command eval \"exec $i</dev/null\"; do i=$((i+1)); [ $i -gt 10000 ] && break; done; \
         echo opened $i",
    ))
    .await;
    assert_eq!(fds["stdout"], "opened 1024\n", "{fds:#}");
    assert!(fds["stderr"].as_str().unwrap().contains("Too many open files"), "{fds:#}");

    // 100 MiB of output against the default 1 MiB cap: cut, flagged, and
    // the worker's peak memory does not grow with it.
    let before = peak_rss(worker.pid());
    let flood =
        run(limited_task("t-flood", json!({"timeout_s": 30}), "yes | head -c 104857600; echo done >&2"))
            .await;
    assert_eq!(flood["status"], "succeeded", "{}", flood["stderr"]);
    assert_eq!(flood["truncated"]["stdout"], true);
    assert_eq!(flood["stderr"], "done\n");
    let after = peak_rss(worker.pid());
    assert!(after < before + (16 << 20), "worker peak RSS grew from {before} to {after} bytes");

    // Every one of them is named, and none names the others' abuse.
    for (result, fields) in [
        (&bomb, vec!["pids_limit_hit"]),
        (&spin, vec![]),
        (&disk, vec!["scratch_full"]),
        (&shm, vec!["shm_full"]),
        (&inodes, vec!["inodes_exhausted"]),
        (&fds, vec![]),
        (&flood, vec![]),
    ] {
        for field in ["pids_limit_hit", "scratch_full", "shm_full", "inodes_exhausted"] {
            assert_eq!(result["usage"][field], fields.contains(&field), "{field} in {result:#}");
        }
    }

    // And it still runs a plain task.
    let after_all = run(task("t-after", &["sh", "-c", "echo still here"])).await;
    assert_eq!(after_all["status"], "succeeded", "{after_all:#}");
    assert_eq!(after_all["stdout"], "still here\n");
    assert!(worker.try_exit().is_none(), "the worker exited");
    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert_worker_left_nothing(&worker_id, &data);
    broker.stop().await;
}
