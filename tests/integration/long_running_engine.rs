//! The engine's long-running containers, on cgroup v1 and on the v2 code
//! path (this host's cgroup2 tree at /sys/fs/cgroup/unified): started under
//! a shim, exec'd into, adopted by a second engine (as a restarted worker
//! would) by pidfd and start time and never by a pid whose start time
//! differs, ended and recorded by the shim, started again with the log
//! continuing, and reaped without a trace.

use std::path::Path;
use std::time::Duration;

use quilt::engine::{
    Adoption, ContainerSpec, Engine, EngineConfig, ExitStatus, LongRunningConfig, ProcessIdentity, RunEnd,
    RunIdentity, Scratch, UnavailableLimits,
};
use quilt_tests::{busybox_rootfs, quilt_binary, TestDir};

fn config(data: &TestDir, parent: &str) -> EngineConfig {
    EngineConfig {
        state_dir: data.path.join("containers"),
        cgroup_parent: parent.into(),
        unavailable_limits: UnavailableLimits::Skip,
        user_namespace: None,
    }
}

fn long_running() -> LongRunningConfig {
    LongRunningConfig {
        shim: quilt_binary().with_file_name("quilt-shim"),
        log_segment_bytes: 1 << 20,
        log_segments: 2,
    }
}

fn spec(id: &str, command: &[&str]) -> ContainerSpec {
    let mut spec = ContainerSpec::new(
        id,
        vec![busybox_rootfs().to_path_buf()],
        command.iter().map(|s| s.to_string()).collect(),
    );
    spec.root.scratch = Scratch::Disk;
    spec.limits.timeout = None;
    spec
}

fn logs(engine: &Engine, id: &str) -> String {
    let chunk = quilt::shim::read_from(&engine.logs_dir(id), 0, 1 << 20).unwrap();
    String::from_utf8_lossy(&chunk.data).into_owned()
}

async fn wait_logs(engine: &Engine, id: &str, needle: &str) {
    for _ in 0..500 {
        if logs(engine, id).contains(needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{needle:?} not in the log of {id}: {:?}", logs(engine, id));
}

/// The whole life of a long-running container on `engine`; `reopen` makes a
/// second engine on the same state, as a restarted worker would.
async fn lifecycle(engine: Engine, reopen: impl Fn() -> Engine, id: &str, cgroup_dirs: &[&Path]) {
    let command =
        ["/bin/sh", "-c", "echo run start; mkdir -p /state; echo 1 >> /state/runs; exec sleep 100000"];
    // What a crash while its disk layer was being made leaves: a half-made
    // image under its temporary name, which the first run makes anew.
    std::fs::create_dir_all(engine.container_dir(id)).unwrap();
    std::fs::write(engine.container_dir(id).join("layer.img.partial"), b"half made").unwrap();
    let running = engine.start_long_running(spec(id, &command), 1, &long_running()).await.unwrap();
    assert!(!engine.container_dir(id).join("layer.img.partial").exists());
    assert!(engine.container_dir(id).join("layer.img").is_file());
    let identity = running.identity();
    assert_eq!(identity.run, 1);
    wait_logs(&engine, id, "run start\n").await;
    // The first process is in its leaf (with, for a moment, the `mkdir` it
    // forks before it execs `sleep`).
    for dir in cgroup_dirs {
        let path = dir.join(id).join("init/cgroup.procs");
        let mut procs = String::new();
        for _ in 0..500 {
            procs = std::fs::read_to_string(&path).unwrap();
            if procs.trim() == identity.init.pid.to_string() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(procs.trim(), identity.init.pid.to_string(), "{}", dir.display());
    }

    // An exec: inside the container's pid namespace and root, its own output and status.
    let mut exec_spec =
        spec("exec-1", &["/bin/sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; cat /state/runs; exit 7"]);
    exec_spec.limits.timeout = Some(Duration::from_secs(30));
    let mut exec = engine.create_exec(&running, exec_spec).unwrap();
    exec.start().await.unwrap();
    exec.wait().await.unwrap();
    let outcome = exec.finish().await.unwrap();
    assert_eq!(outcome.exit_code, Some(7));
    assert_eq!(String::from_utf8_lossy(&outcome.stdout.data), "sleep 100000 1\n");
    for dir in cgroup_dirs {
        assert!(!dir.join(id).join("exec-1").exists(), "the exec's cgroup is removed");
    }

    // A restarted worker adopts the run by its identity, not by a bare pid.
    let second = reopen();
    let wrong = RunIdentity {
        shim: ProcessIdentity { start_ticks: identity.shim.start_ticks + 1, ..identity.shim },
        ..identity
    };
    match second.adopt(id, &wrong).unwrap() {
        Adoption::Ended(RunEnd::Lost) => {}
        _ => panic!("a pid with another start time must not be adopted"),
    }
    let adopted = match second.adopt(id, &identity).unwrap() {
        Adoption::Running(adopted) => adopted,
        Adoption::Ended(end) => panic!("the run is going on, not {end:?}"),
    };
    assert_eq!(adopted.identity(), identity);
    drop(running);

    // Killed: the shim records the signal; the adopter learns it.
    adopted.kill_all().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), adopted.wait()).await.unwrap().unwrap();
    assert!(matches!(end, RunEnd::Exited { status: ExitStatus::Signaled(9), .. }), "{end:?}");
    // And a later adopter reads the same record.
    match reopen().adopt(id, &identity).unwrap() {
        Adoption::Ended(again) => assert_eq!(again, end),
        Adoption::Running(_) => panic!("the run ended"),
    }

    // Run 2: the same files (its writable layer persists), the log continues.
    let running = second.start_long_running(spec(id, &command), 2, &long_running()).await.unwrap();
    wait_logs(&second, id, "run start\nrun start\n").await;
    let mut exec = second.create_exec(&running, spec("exec-2", &["/bin/cat", "/state/runs"])).unwrap();
    exec.start().await.unwrap();
    exec.wait().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&exec.finish().await.unwrap().stdout.data), "1\n1\n");

    // Reaped: processes, shim, cgroups and files gone.
    let shim = running.identity().shim.pid;
    assert!(second.reap(id).unwrap());
    for _ in 0..300 {
        if !Path::new(&format!("/proc/{shim}")).exists()
            || std::fs::read_to_string(format!("/proc/{shim}/stat")).is_ok_and(|stat| stat.contains(") Z "))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), running.wait()).await;
    for dir in cgroup_dirs {
        assert!(!dir.join(id).exists(), "{}", dir.join(id).display());
    }
    assert!(!second.container_dir(id).exists());
    // Its disk layer's loop device went with its mount namespace.
    quilt_tests::assert_no_loop_devices_under(&second.container_dir(id));
    assert!(quilt_tests::processes_matching(&format!("--exit-file {}", second.container_dir(id).display()))
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_long_running_container_lives_is_adopted_and_is_reaped() {
    let data = TestDir::new("lr-engine-v1");
    let parent = "quilt-lr-engine-v1";
    let engine = Engine::new(config(&data, parent)).unwrap();
    if engine.cgroup_version() != quilt::engine::CgroupVersion::V1 {
        eprintln!("skipping: not a cgroup v1 host");
        return;
    }
    let dirs: Vec<std::path::PathBuf> = ["memory", "pids", "cpu,cpuacct"]
        .iter()
        .map(|hierarchy| Path::new("/sys/fs/cgroup").join(hierarchy).join(parent))
        .filter(|dir| dir.is_dir())
        .collect();
    let dirs: Vec<&Path> = dirs.iter().map(|dir| dir.as_path()).collect();
    lifecycle(engine, || Engine::new(config(&data, parent)).unwrap(), "lr-v1", &dirs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_long_running_container_lives_is_adopted_and_is_reaped() {
    const UNIFIED: &str = "/sys/fs/cgroup/unified";
    if !Path::new(UNIFIED).join("cgroup.procs").exists() {
        eprintln!("skipping: no cgroup2 tree at {UNIFIED}");
        return;
    }
    let data = TestDir::new("lr-engine-v2");
    let parent = "quilt-lr-engine-v2";
    let make = || Engine::with_cgroup_v2_at(config(&data, parent), Path::new(UNIFIED)).unwrap();
    let dir = Path::new(UNIFIED).join(parent);
    lifecycle(make(), make, "lr-v2", &[dir.as_path()]).await;
}
