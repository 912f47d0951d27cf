//! Limits: pids, memory, wall clock, output.

use std::process::Command;

use quilt_tests::{
    assert_nothing_left, busybox_rootfs, processes_matching, quilt_binary, quilt_run_json, TestDir,
};

#[test]
fn fork_bomb_stops_at_the_pids_limit() {
    let data = TestDir::new("lim-forkbomb");
    let (code, outcome) = quilt_run_json(
        &data,
        "lim-forkbomb",
        &["--pids", "32", "--timeout", "3s"],
        &["/bin/sh", "-c", "bomb() { bomb | bomb & }; bomb; exec sleep 10"],
    );
    assert_eq!(outcome["pids_limit_hit"], true, "{outcome}");
    assert_eq!(outcome["status"], "timed_out", "{outcome}");
    assert_eq!(code, 124);
    assert_nothing_left(&data, "quilt", "lim-forkbomb");
    // The host still forks.
    assert!(Command::new("true").status().unwrap().success());
}

#[test]
fn memory_hog_is_oom_killed() {
    let data = TestDir::new("lim-oom");
    let (code, outcome) = quilt_run_json(
        &data,
        "lim-oom",
        &["--memory", "32M", "--timeout", "20s"],
        &["/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
    );
    assert_eq!(outcome["status"], "oom_killed", "{outcome}");
    assert_eq!(outcome["oom_killed"], true);
    assert_eq!(outcome["signal"], 9);
    assert_eq!(code, 123);
    let peak = outcome["usage"]["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak <= 33 << 20, "peak {peak} above the limit");
    assert_nothing_left(&data, "quilt", "lim-oom");
}

#[test]
fn timeout_kills_daemonised_grandchildren() {
    let data = TestDir::new("lim-timeout");
    let (code, outcome) = quilt_run_json(
        &data,
        "lim-timeout",
        &["--timeout", "1s"],
        &["/bin/sh", "-c", "(setsid sleep 9871 &) ; sleep 9872 & sleep 9873"],
    );
    assert_eq!(outcome["status"], "timed_out", "{outcome}");
    assert_eq!(code, 124);
    let run_ms = outcome["timings"]["run_ms"].as_f64().unwrap();
    assert!((900.0..5000.0).contains(&run_ms), "run_ms {run_ms}");
    for needle in ["sleep 9871", "sleep 9872", "sleep 9873"] {
        assert!(processes_matching(needle).is_empty(), "{needle} survived");
    }
    assert_nothing_left(&data, "quilt", "lim-timeout");
}

#[test]
fn cpu_quota_throttles() {
    let data = TestDir::new("lim-cpu");
    let (_, outcome) = quilt_run_json(
        &data,
        "lim-cpu",
        &["--cpus", "0.2", "--timeout", "2s"],
        &["/bin/sh", "-c", "while :; do :; done"],
    );
    assert_eq!(outcome["status"], "timed_out");
    let cpu_ns = outcome["usage"]["cpu_ns"].as_u64().unwrap();
    // 0.2 CPU for ~2 s is ~0.4 s of CPU; unthrottled it would be ~2 s.
    assert!(cpu_ns < 900_000_000, "cpu {cpu_ns} ns: not throttled");
    assert!(cpu_ns > 100_000_000, "cpu {cpu_ns} ns: did not run");
    assert_nothing_left(&data, "quilt", "lim-cpu");
}

/// Peak RSS of a child, from wait4's rusage.
fn run_measuring_peak_rss(command: &mut Command) -> (i32, u64) {
    let child =
        command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid out-buffer.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid out-pointers; `child` is never waited on by std.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    std::mem::forget(child);
    (libc::WEXITSTATUS(status), usage.ru_maxrss as u64 * 1024)
}

#[test]
fn output_flood_is_truncated_and_runtime_memory_stays_flat() {
    let data = TestDir::new("lim-yes");
    let base = |id: &str, limit: &str, seconds: &str, program: &str| {
        let mut command = Command::new(quilt_binary());
        command
            .arg("--data-dir")
            .arg(&data.path)
            .args(["run", "--local", "--name", id, "--output-limit", limit, "--timeout", seconds, "--rootfs"])
            .arg(busybox_rootfs())
            .args(["--", program]);
        command
    };
    let (_, baseline_rss) = run_measuring_peak_rss(&mut base("lim-true", "1M", "5s", "/bin/true"));
    let (code, flood_rss) = run_measuring_peak_rss(&mut base("lim-yes", "1M", "3s", "/bin/yes"));
    assert_eq!(code, 124);
    assert!(
        flood_rss < baseline_rss + (8 << 20),
        "runtime RSS grew from {baseline_rss} to {flood_rss} bytes under an output flood"
    );
    let (_, outcome) =
        quilt_run_json(&data, "lim-yes-json", &["--output-limit", "64k", "--timeout", "1s"], &["/bin/yes"]);
    assert_eq!(outcome["stdout"]["truncated"], true, "{}", outcome["stdout"]["bytes"]);
    assert_eq!(outcome["stdout"]["text"].as_str().unwrap().len(), 64 * 1024);
    assert!(outcome["stdout"]["bytes"].as_u64().unwrap() > 64 * 1024);
    for id in ["lim-true", "lim-yes", "lim-yes-json"] {
        assert_nothing_left(&data, "quilt", id);
    }
}
