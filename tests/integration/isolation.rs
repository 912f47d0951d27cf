//! What a process inside a container can see and do.

use quilt_tests::{assert_nothing_left, quilt_run_json, stdout_text, TestDir};

fn run(name: &str, flags: &[&str], command: &[&str]) -> serde_json::Value {
    let data = TestDir::new(name);
    let (code, outcome) = quilt_run_json(&data, name, flags, command);
    assert_nothing_left(&data, "quilt", name);
    assert!(code >= 0, "{outcome}");
    outcome
}

fn sh(name: &str, script: &str) -> serde_json::Value {
    run(name, &[], &["/bin/sh", "-c", script])
}

#[test]
fn sees_only_its_own_processes() {
    let outcome = sh("iso-pids", "echo /proc/[0-9]*; echo $$");
    assert_eq!(stdout_text(&outcome), "/proc/1\n1", "{outcome}");
}

#[test]
fn mount_is_refused() {
    let outcome = sh("iso-mount", "mount -t tmpfs none /tmp && echo MOUNTED; echo done");
    assert_eq!(stdout_text(&outcome), "done", "{outcome}");
}

#[test]
fn proc_sys_sysrq_and_sys_are_read_only() {
    let outcome = sh(
        "iso-ro",
        "for f in /proc/sys/kernel/domainname /proc/sysrq-trigger /sys/kernel/uevent_helper; do \
           if echo h > $f 2>/dev/null; then echo WROTE $f; fi; done; \
         touch /sys/quilt 2>/dev/null && echo WROTE /sys; echo done",
    );
    assert_eq!(stdout_text(&outcome), "done", "{outcome}");
}

#[test]
fn masked_paths_read_empty() {
    let outcome = sh(
        "iso-mask",
        "for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug; do \
           [ -e $f ] && echo $f $(cat $f 2>/dev/null | wc -c); done; \
         echo firmware $(ls -A /sys/firmware | wc -l)",
    );
    let text = stdout_text(&outcome);
    assert!(text.contains("/proc/keys 0"), "{text}");
    assert!(text.contains("/proc/timer_list 0"), "{text}");
    assert!(text.ends_with("firmware 0"), "{text}");
    for line in text.lines() {
        assert!(line.ends_with(" 0"), "not empty: {line}");
    }
}

#[test]
fn capabilities_and_no_new_privs() {
    let outcome =
        sh("iso-caps", "grep -E '^(CapEff|CapBnd|CapPrm|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status");
    let text = stdout_text(&outcome);
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("{name} missing in {text}"))
    };
    let default = quilt::engine::CapabilitySet::default_set().effective_hex();
    assert_eq!(field("CapEff:"), default);
    assert_eq!(field("CapPrm:"), default);
    assert_eq!(field("CapBnd:"), default);
    assert_eq!(field("CapAmb:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
}

#[test]
fn network_none_has_only_loopback_up() {
    let outcome = sh("iso-net", "ls /sys/class/net; ip -o link show lo | grep -c ',UP'; ip -o addr show lo | grep -c 'inet 127.0.0.1'");
    assert_eq!(stdout_text(&outcome), "lo\n1\n1", "{outcome}");
}

#[test]
fn network_host_is_opt_in() {
    let outcome = run("iso-hostnet", &["--network", "host"], &["/bin/sh", "-c", "ls /sys/class/net | wc -l"]);
    let count: usize = stdout_text(&outcome).parse().unwrap();
    let host = std::fs::read_dir("/sys/class/net").unwrap().count();
    assert_eq!(count, host, "{outcome}");
}

#[test]
fn init_holds_only_stdio() {
    // `; true` keeps sh as pid 1 instead of exec'ing ls.
    let outcome = sh("iso-fds", "ls /proc/1/fd; true");
    assert_eq!(stdout_text(&outcome).split_whitespace().collect::<Vec<_>>(), ["0", "1", "2"], "{outcome}");
}

#[test]
fn hostname_user_workdir_env() {
    let outcome = run(
        "iso-ident",
        &[
            "--hostname",
            "box1",
            "--user",
            "1000:1000",
            "--workdir",
            "/home/app",
            "--env",
            "GREETING=hi there",
        ],
        &["/bin/sh", "-c", "hostname; id -u; id -g; pwd; echo $GREETING; grep CapEff /proc/self/status"],
    );
    let text = stdout_text(&outcome);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(&lines[..5], ["box1", "1000", "1000", "/home/app", "hi there"], "{outcome}");
    assert!(lines[5].ends_with("0000000000000000"), "non-root keeps no effective caps: {}", lines[5]);
}

#[test]
fn root_is_private_and_writable_but_the_rootfs_is_untouched() {
    let outcome = sh("iso-upper", "echo data > /etc/quilt-marker && cat /etc/quilt-marker");
    assert_eq!(stdout_text(&outcome), "data");
    assert!(!quilt_tests::busybox_rootfs().join("etc/quilt-marker").exists());
    let read_only =
        run("iso-rdonly", &["--read-only"], &["/bin/sh", "-c", "touch /etc/x 2>/dev/null || echo refused"]);
    assert_eq!(stdout_text(&read_only), "refused");
}

#[test]
fn dev_is_minimal() {
    let outcome =
        sh("iso-dev", "ls /dev | tr '\\n' ' '; echo; echo x > /dev/null && head -c 4 /dev/zero | wc -c");
    let text = stdout_text(&outcome);
    let mut lines = text.lines();
    let mut entries: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout",
            "tty", "urandom", "zero"
        ]
    );
    assert_eq!(lines.next(), Some("4"));
}

#[test]
fn stdin_is_fed_and_output_is_streamed() {
    let data = TestDir::new("iso-stdin");
    let input = data.path.join("input");
    std::fs::write(&input, "line one\nline two\n").unwrap();
    let output = quilt_tests::quilt_run(
        &data,
        "iso-stdin",
        &["--stdin", input.to_str().unwrap()],
        &["/bin/sh", "-c", "wc -l; echo to-stderr >&2; exit 3"],
    );
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "2");
    assert_eq!(String::from_utf8_lossy(&output.stderr).trim(), "to-stderr");
    assert_nothing_left(&data, "quilt", "iso-stdin");
}

#[test]
fn memory_scratch_is_size_limited_and_disk_scratch_works() {
    let outcome = run(
        "iso-scratch-mem",
        &["--scratch-size", "4M"],
        &[
            "/bin/sh",
            "-c",
            "dd if=/dev/zero of=/big bs=1M count=8 2>/dev/null || echo full; df -k / | tail -1",
        ],
    );
    let text = stdout_text(&outcome);
    assert!(text.starts_with("full"), "{text}");
    assert!(text.contains(" 4096 "), "scratch not 4 MiB: {text}");
    let outcome = run(
        "iso-scratch-disk",
        &["--scratch", "disk"],
        &["/bin/sh", "-c", "dd if=/dev/zero of=/big bs=1M count=8 2>/dev/null && wc -c < /big"],
    );
    assert_eq!(stdout_text(&outcome), "8388608", "{outcome}");
}
