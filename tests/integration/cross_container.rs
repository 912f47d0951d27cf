//! Two containers running at once on one worker, A and B (long-running
//! containers reached by exec tasks, as an agent would): B holds a secret of
//! every kind a container can make (a file in its root, a file in its
//! `/dev/shm`, a SysV message queue and shared memory segment, a POSIX
//! message queue, a listening abstract unix socket, its processes), and A,
//! looking for each with the hostile fixture `attack`
//! (tests/fixtures/escape/attack.c), must find none and must not be able to
//! signal B's processes by their host pids.
//!
//! Every probe A runs is also run in B, where it must find what B made: the
//! proof that the probe notices a leak, so that each test would fail if the
//! namespace that separates A from B were shared.
//!
//! Each test runs again as `..._in_a_user_namespace`, with the worker in
//! user-namespace mode ([`Mode::UserNamespace`]), where A and B share one
//! id range and are kept apart by the same namespaces; B shows its uid map
//! when it makes its secrets, which proves the mode.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use quilt_tests::pipeline::{containers_of, BOUND};
use quilt_tests::{Mode, SHOW_UID_MAP};

use crate::escapes::{assert_refused, attack_binary, attempts, output_bounded, Fleet};

/// The SysV keys of B's message queue and shared memory segment (hex for
/// `attack`, decimal as /proc/sysvipc lists them).
const MESSAGE_KEY: (&str, &str) = ("0x51554c54", "1364544596");
const SHARED_MEMORY_KEY: (&str, &str) = ("0x51554c55", "1364544597");
/// B's POSIX message queue, abstract socket, and files.
const QUEUE: &str = "quilt-secret-mq";
const SOCKET: &str = "quilt-secret-sock";
const ROOT_FILE: &str = "/quilt-secret-file";
const SHM_FILE: &str = "/dev/shm/quilt-secret-shm";
/// Arguments that mark each container's first process in a process list.
const B_MARK: &str = "424242";
/// What B's files hold.
const CONTENT: &str = "b-private-4711";
const A_MARK: &str = "434343";

/// A fleet in `mode` running A and B, with B's secrets made.
struct Pair {
    fleet: Fleet,
    worker_id: String,
}

impl Pair {
    async fn start(name: &str, worker_id: &str, mode: Mode) -> Pair {
        let fleet = Fleet::start(name, worker_id, mode).await;
        let b_init = format!("attack listen {SOCKET} & exec sleep {B_MARK}");
        fleet.create_running("b", "escape", &["sh", "-c", &b_init]).await;
        fleet.create_running("a", "escape", &["sleep", A_MARK]).await;
        let made = fleet
            .sh(
                "b",
                &format!(
                    "{SHOW_UID_MAP}; echo {CONTENT} > {ROOT_FILE}; echo {CONTENT} > {SHM_FILE}; \
                     attack msg-create {}; attack shm-create {}; attack mq-create {QUEUE}",
                    MESSAGE_KEY.0, SHARED_MEMORY_KEY.0
                ),
            )
            .await;
        mode.assert_in_effect(&made);
        let made = attempts(&made);
        assert_eq!(made.len(), 3, "{made:?}");
        assert!(made.iter().all(|(_, result)| result == "ok"), "B could not make its secrets: {made:?}");
        // B's listener starts in the background of its first process.
        let deadline = Instant::now() + BOUND;
        while !fleet.sh("b", &format!("attack connect {SOCKET}")).await.contains(" ok\n") {
            assert!(Instant::now() < deadline, "B's listener not up within {BOUND:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Pair { fleet, worker_id: mode.name(worker_id) }
    }

    /// Runs `script` in A and in B; returns (A's output, B's output).
    async fn both(&self, script: &str) -> (String, String) {
        (self.fleet.sh("a", script).await, self.fleet.sh("b", script).await)
    }

    /// Host pids of container `name`'s first process and its children: the
    /// `init` leaf of its cgroup (execs have leaves of their own, which come
    /// and go), from every hierarchy.
    fn host_pids(&self, name: &str) -> BTreeSet<u32> {
        let cgroup = format!("{}.{name}", self.worker_id);
        containers_of(&self.worker_id)
            .into_iter()
            .filter(|dir| dir.file_name().is_some_and(|file| file.to_string_lossy() == cgroup))
            .flat_map(|dir| {
                std::fs::read_to_string(dir.join("init/cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter_map(|line| line.trim().parse::<u32>().ok())
            .collect()
    }

    async fn stop(self) {
        self.fleet.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cannot_see_another_ones_files() {
    a_container_cannot_see_another_ones_files_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cannot_see_another_ones_files_in_a_user_namespace() {
    a_container_cannot_see_another_ones_files_in(Mode::UserNamespace).await;
}

async fn a_container_cannot_see_another_ones_files_in(mode: Mode) {
    let pair = Pair::start("cross-files", "crossfiles", mode).await;
    // Every file named quilt-secret* under / (procfs and sysfs aside), and
    // under the root of every process A can see.
    let search = "find / \\( -path /proc -o -path /sys \\) -prune -o -name 'quilt-secret*' -print; \
                  for root in /proc/[0-9]*/root/; do find $root -xdev -name 'quilt-secret*'; done; true";
    let (in_a, in_b) = pair.both(search).await;
    assert_eq!(in_a, "", "A finds B's files");
    assert!(in_b.contains(ROOT_FILE) && in_b.contains(SHM_FILE), "the search misses B's own files: {in_b}");
    let read = format!("cat {ROOT_FILE} {SHM_FILE} 2>&1; true");
    let (in_a, in_b) = pair.both(&read).await;
    assert!(!in_a.contains(CONTENT), "A reads B's files: {in_a}");
    assert_eq!(in_b, format!("{CONTENT}\n{CONTENT}\n"));
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_sees_only_its_own_processes() {
    a_container_sees_only_its_own_processes_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_sees_only_its_own_processes_in_a_user_namespace() {
    a_container_sees_only_its_own_processes_in(Mode::UserNamespace).await;
}

async fn a_container_sees_only_its_own_processes_in(mode: Mode) {
    let pair = Pair::start("cross-ps", "crossps", mode).await;
    let (in_a, in_b) = pair.both("ps -o pid,args").await;
    assert!(in_a.contains(A_MARK) && !in_a.contains(B_MARK), "A sees B's processes:\n{in_a}");
    assert!(in_b.contains(B_MARK) && !in_b.contains(A_MARK), "B's own list lacks it:\n{in_b}");
    // Nor are B's processes there by their host pids.
    let b_pids = pair.host_pids("b");
    assert!(!b_pids.is_empty());
    let listing: Vec<String> = b_pids.iter().map(|pid| format!("/proc/{pid}")).collect();
    let in_a = pair.fleet.sh("a", &format!("ls -d {} 2>/dev/null; true", listing.join(" "))).await;
    assert_eq!(in_a, "", "A has /proc entries for B's host pids");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cannot_see_another_ones_dev_shm() {
    a_container_cannot_see_another_ones_dev_shm_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cannot_see_another_ones_dev_shm_in_a_user_namespace() {
    a_container_cannot_see_another_ones_dev_shm_in(Mode::UserNamespace).await;
}

async fn a_container_cannot_see_another_ones_dev_shm_in(mode: Mode) {
    let pair = Pair::start("cross-shm", "crossshm", mode).await;
    let (in_a, in_b) = pair.both("ls -A /dev/shm").await;
    assert_eq!(in_a, "", "A's /dev/shm holds B's file");
    assert_eq!(in_b, "quilt-secret-shm\n");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cannot_reach_another_ones_ipc_objects() {
    a_container_cannot_reach_another_ones_ipc_objects_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cannot_reach_another_ones_ipc_objects_in_a_user_namespace() {
    a_container_cannot_reach_another_ones_ipc_objects_in(Mode::UserNamespace).await;
}

async fn a_container_cannot_reach_another_ones_ipc_objects_in(mode: Mode) {
    let pair = Pair::start("cross-ipc", "crossipc", mode).await;
    let script = format!(
        "cat /proc/sysvipc/msg /proc/sysvipc/shm; ls -A /dev/mqueue; \
         attack msg-find {}; attack shm-find {}; attack mq-find {QUEUE}",
        MESSAGE_KEY.0, SHARED_MEMORY_KEY.0
    );
    let (in_a, in_b) = pair.both(&script).await;
    assert!(
        !in_a.contains(MESSAGE_KEY.1) && !in_a.contains(SHARED_MEMORY_KEY.1),
        "A lists B's SysV IPC:\n{in_a}"
    );
    assert!(!in_a.lines().any(|line| line == QUEUE), "A's /dev/mqueue lists B's queue:\n{in_a}");
    assert_refused(
        &in_a,
        3,
        &[("msg-find", &["ENOENT"]), ("shm-find", &["ENOENT"]), ("mq-find", &["ENOENT"])],
    );
    // B's own view: the probes find all three.
    assert!(in_b.contains(MESSAGE_KEY.1) && in_b.contains(SHARED_MEMORY_KEY.1), "{in_b}");
    assert!(in_b.lines().any(|line| line == QUEUE), "{in_b}");
    assert_eq!(attempts(&in_b).iter().filter(|(_, result)| result == "ok").count(), 3, "{in_b}");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cannot_connect_to_another_ones_abstract_socket() {
    a_container_cannot_connect_to_another_ones_abstract_socket_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cannot_connect_to_another_ones_abstract_socket_in_a_user_namespace() {
    a_container_cannot_connect_to_another_ones_abstract_socket_in(Mode::UserNamespace).await;
}

async fn a_container_cannot_connect_to_another_ones_abstract_socket_in(mode: Mode) {
    let pair = Pair::start("cross-socket", "crosssocket", mode).await;
    let script = format!("attack connect {SOCKET}; echo listed $(grep -c '@{SOCKET}' /proc/net/unix)");
    let (in_a, in_b) = pair.both(&script).await;
    assert_refused(&in_a, 1, &[("connect", &["ECONNREFUSED"])]);
    assert!(in_a.contains("listed 0\n"), "A's /proc/net/unix lists B's socket:\n{in_a}");
    assert!(in_b.contains(&format!("try connect @{SOCKET} ok")), "{in_b}");
    assert!(in_b.contains(&format!("info answer {SOCKET}-answer")), "{in_b}");
    assert!(in_b.contains("listed 1\n"), "{in_b}");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cannot_signal_another_one() {
    a_container_cannot_signal_another_one_in(Mode::Host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_cannot_signal_another_one_in_a_user_namespace() {
    a_container_cannot_signal_another_one_in(Mode::UserNamespace).await;
}

async fn a_container_cannot_signal_another_one_in(mode: Mode) {
    let pair = Pair::start("cross-kill", "crosskill", mode).await;
    let b_pids = pair.host_pids("b");
    let b_pid_list: Vec<String> = b_pids.iter().map(u32::to_string).collect();
    assert!(b_pids.len() >= 2, "B's sleep and listener: {b_pids:?}");
    let init_before = pair.fleet.sh("b", "cat /proc/1/stat | cut -d' ' -f22").await;

    // The control: from the host, the same program reaches every pid (signal 0).
    let mut control = std::process::Command::new(attack_binary());
    control.args(["kill", "0"]).args(&b_pid_list);
    let output = String::from_utf8_lossy(&output_bounded(&mut control, "attack kill 0").stdout).into_owned();
    assert!(attempts(&output).iter().all(|(_, result)| result == "ok"), "B's host pids are wrong:\n{output}");

    // From A: SIGKILL to each of B's host pids. (Not `kill -1`: should the
    // pid namespace ever be missing, that would kill the whole host.)
    let in_a = pair.fleet.sh("a", &format!("attack kill 9 {}", b_pid_list.join(" "))).await;
    assert_refused(&in_a, 1, &[("kill", &["ESRCH"]), ("pidfd_send_signal", &["ESRCH"])]);

    // B is whole: the same processes, the same first process, its socket answers.
    assert_eq!(pair.host_pids("b").intersection(&b_pids).count(), b_pids.len(), "B lost processes");
    assert_eq!(pair.fleet.sh("b", "cat /proc/1/stat | cut -d' ' -f22").await, init_before);
    assert!(pair.fleet.sh("b", &format!("attack connect {SOCKET}")).await.contains(" ok\n"));
    pair.stop().await;
}
