//! The cgroup v2 code path. This machine is cgroup v1 "hybrid": its cgroup2
//! tree at /sys/fs/cgroup/unified has no memory, pids or cpu controller (they
//! are bound to v1), but it has every core file. So these tests exercise the
//! v2 path that does not need those controllers, for real: CLONE_INTO_CGROUP,
//! cgroup.kill, cpu.stat, removal; and check that a limit the tree cannot
//! enforce is refused, not silently dropped. The limit files themselves are
//! covered by the cgroup module's unit tests.

use std::path::Path;
use std::time::Duration;

use quilt::engine::{ContainerSpec, Engine, EngineConfig, EngineError, UnavailableLimits};
use quilt_tests::{busybox_rootfs, TestDir};

const UNIFIED: &str = "/sys/fs/cgroup/unified";

fn engine(data: &TestDir, policy: UnavailableLimits) -> Option<Engine> {
    if !Path::new(UNIFIED).join("cgroup.procs").exists() {
        eprintln!("skipping: no cgroup2 tree at {UNIFIED}");
        return None;
    }
    let config = EngineConfig {
        state_dir: data.path.join("containers"),
        cgroup_parent: "quilt-v2-test".into(),
        unavailable_limits: policy,
        user_namespace: None,
    };
    Some(Engine::with_cgroup_v2_at(config, Path::new(UNIFIED)).unwrap())
}

fn spec(id: &str, command: &[&str]) -> ContainerSpec {
    ContainerSpec::new(
        id,
        vec![busybox_rootfs().to_path_buf()],
        command.iter().map(|s| s.to_string()).collect(),
    )
}

#[tokio::test]
async fn v2_container_is_born_in_its_cgroup_and_killed_whole() {
    let data = TestDir::new("v2-kill");
    let Some(engine) = engine(&data, UnavailableLimits::Skip) else { return };
    assert_eq!(engine.cgroup_version(), quilt::engine::CgroupVersion::V2);
    let mut spec =
        spec("v2-kill", &["/bin/sh", "-c", "cat /proc/self/cgroup; (setsid sleep 9881 &); sleep 9882"]);
    spec.limits.timeout = Some(Duration::from_millis(800));
    let cgroup_dir = Path::new(UNIFIED).join("quilt-v2-test/v2-kill");
    let mut container = engine.create(spec).unwrap();
    assert!(cgroup_dir.is_dir());
    container.start().await.unwrap();
    // Born in the cgroup: the pid is there from the first instant.
    let procs = std::fs::read_to_string(cgroup_dir.join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|line| line == container.pid().unwrap().to_string()), "{procs}");
    container.wait().await.unwrap();
    let outcome = container.finish().await.unwrap();
    assert!(outcome.timed_out);
    // Inside its own cgroup namespace the container sees itself at the root.
    assert!(String::from_utf8_lossy(&outcome.stdout.data).contains("0::/"), "{outcome:?}");
    assert!(outcome.usage.cpu_ns.is_some());
    assert!(!cgroup_dir.exists());
    assert!(quilt_tests::processes_matching("sleep 988").is_empty());
}

#[tokio::test]
async fn v2_refuses_a_limit_it_cannot_enforce() {
    let data = TestDir::new("v2-refuse");
    let Some(engine) = engine(&data, UnavailableLimits::Refuse) else { return };
    if std::fs::read_to_string(Path::new(UNIFIED).join("cgroup.controllers")).unwrap().contains("memory") {
        eprintln!("skipping: this cgroup2 tree has a memory controller");
        return;
    }
    let error = engine.create(spec("v2-refuse", &["/bin/true"])).err().unwrap();
    assert!(matches!(error, EngineError::Cgroup(_)), "{error:?}");
    assert!(error.to_string().contains("memory"), "{error}");
    assert!(!data.path.join("containers/v2-refuse").exists());
    assert!(!Path::new(UNIFIED).join("quilt-v2-test/v2-refuse").exists());
}
