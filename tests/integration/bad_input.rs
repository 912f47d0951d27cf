//! Bad input: one clear line, a non-zero exit, no panic, nothing left behind.

use std::path::Path;

use quilt_tests::{assert_nothing_left, busybox_rootfs, quilt_binary, TestDir};

/// Run quilt with `args` and return (exit code, stderr).
fn quilt(data: &TestDir, args: &[&str]) -> (i32, String) {
    let output = std::process::Command::new(quilt_binary())
        .arg("--data-dir")
        .arg(&data.path)
        .args(args)
        .output()
        .unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn assert_clear_error(data: &TestDir, id: &str, args: &[&str], expect: &str) {
    let (code, stderr) = quilt(data, args);
    assert_ne!(code, 0, "{args:?} succeeded");
    assert!(code != 101, "{args:?} panicked: {stderr}");
    assert!(stderr.contains(expect), "{args:?}: expected {expect:?} in {stderr:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr:?}");
    assert_nothing_left(data, "quilt", id);
}

fn run_args<'a>(id: &'a str, rootfs: &'a str, flags: &[&'a str], command: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--local", "--name", id, "--rootfs", rootfs];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend_from_slice(command);
    args
}

#[test]
fn missing_rootfs() {
    let data = TestDir::new("bad-rootfs");
    assert_clear_error(
        &data,
        "bad-rootfs",
        &run_args("bad-rootfs", "/nonexistent/rootfs", &[], &["/bin/true"]),
        "does not exist",
    );
}

#[test]
fn command_not_found() {
    let data = TestDir::new("bad-cmd");
    let rootfs = busybox_rootfs().to_str().unwrap();
    let (code, stderr) = quilt(&data, &run_args("bad-cmd", rootfs, &[], &["no-such-program"]));
    assert_eq!(code, 127, "{stderr}");
    assert!(stderr.contains("command not found"), "{stderr}");
    assert_nothing_left(&data, "quilt", "bad-cmd");
    let (code, stderr) = quilt(&data, &run_args("bad-cmd", rootfs, &[], &["/etc/passwd"]));
    assert_eq!(code, 126, "{stderr}");
    assert!(stderr.contains("not executable"), "{stderr}");
    assert_nothing_left(&data, "quilt", "bad-cmd");
}

#[test]
fn bad_limits() {
    let data = TestDir::new("bad-limits");
    let rootfs = busybox_rootfs().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--memory", "0"], "invalid memory limit"),
        (&["--memory", "-5M"], "invalid --memory"),
        (&["--memory", "900T"], "invalid memory limit"),
        (&["--cpus", "0"], "invalid --cpus"),
        (&["--cpus", "-1"], "invalid --cpus"),
        (&["--cpus", "4096"], "invalid cpu limit"),
        (&["--pids", "0"], "invalid pids limit"),
        (&["--pids", "-3"], "invalid --pids"),
        (&["--timeout", "0s"], "invalid timeout"),
        (&["--timeout", "forever"], "invalid --timeout"),
        (&["--timeout", "99999999s"], "invalid timeout"),
        (&["--network", "bridge"], "invalid network mode"),
    ];
    for (flags, expect) in cases {
        assert_clear_error(
            &data,
            "bad-limits",
            &run_args("bad-limits", rootfs, flags, &["/bin/true"]),
            expect,
        );
    }
}

#[test]
fn bad_workdir_and_env() {
    let data = TestDir::new("bad-wd");
    let rootfs = busybox_rootfs().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--workdir", "/proc/self"], "must not be under /proc"),
        (&["--workdir", "/../../etc"], "invalid workdir"),
        (&["--workdir", "relative"], "invalid workdir"),
        (&["--env", "=x"], "invalid environment variable name"),
        (&["--env", "NOVALUE"], "invalid --env"),
    ];
    for (flags, expect) in cases {
        assert_clear_error(&data, "bad-wd", &run_args("bad-wd", rootfs, flags, &["/bin/true"]), expect);
    }
    assert_clear_error(
        &data,
        "escape",
        &run_args("../escape", rootfs, &[], &["/bin/true"]),
        "invalid container id",
    );
}

/// A tiny rootfs with busybox and a hostile twist.
fn hostile_rootfs(dir: &Path, twist: impl FnOnce(&Path)) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy(busybox_rootfs().join("bin/busybox"), dir.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", dir.join("bin/sh")).unwrap();
    twist(dir);
}

#[test]
fn workdir_symlink_onto_proc_is_refused() {
    let data = TestDir::new("bad-wdlink");
    let rootfs = data.path.join("rootfs");
    hostile_rootfs(&rootfs, |dir| std::os::unix::fs::symlink("/proc/self", dir.join("work")).unwrap());
    let (code, stderr) = quilt(
        &data,
        &run_args("bad-wdlink", rootfs.to_str().unwrap(), &["--workdir", "/work"], &["/bin/sh", "-c", "pwd"]),
    );
    assert_eq!(code, 125, "{stderr}");
    assert!(stderr.contains("resolves onto /proc"), "{stderr}");
    assert_nothing_left(&data, "quilt", "bad-wdlink");
}

#[test]
fn image_with_proc_or_dev_as_symlink_to_the_host_is_refused() {
    for (name, target) in [("proc", "/etc"), ("dev", "/tmp")] {
        let data = TestDir::new(&format!("bad-link-{name}"));
        let rootfs = data.path.join("rootfs");
        hostile_rootfs(&rootfs, |dir| std::os::unix::fs::symlink(target, dir.join(name)).unwrap());
        let id = format!("bad-link-{name}");
        let (code, stderr) =
            quilt(&data, &run_args(&id, rootfs.to_str().unwrap(), &[], &["/bin/sh", "-c", "true"]));
        assert_eq!(code, 125, "{stderr}");
        assert!(stderr.contains("symlink"), "{stderr}");
        assert_nothing_left(&data, "quilt", &id);
        // Nothing was mounted over the host directory the link pointed at.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(target)), "{target} got a mount");
    }
}

#[test]
fn malformed_bundle() {
    let data = TestDir::new("bad-bundle");
    let bundle = data.path.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("config.json"), "{\"process\": [").unwrap();
    let (code, stderr) =
        quilt(&data, &["run", "--local", "--name", "bad-bundle", "--bundle", bundle.to_str().unwrap()]);
    assert_eq!(code, 125);
    assert!(stderr.contains("config.json"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    std::fs::write(
        bundle.join("config.json"),
        r#"{"ociVersion":"1.0.2","root":{"path":"/nonexistent"},"process":{"cwd":"/","args":["/bin/true"],"env":["BAD\u0000NAME=1"],"user":{"uid":0,"gid":0}}}"#,
    )
    .unwrap();
    let (code, stderr) =
        quilt(&data, &["run", "--local", "--name", "bad-bundle", "--bundle", bundle.to_str().unwrap()]);
    assert_eq!(code, 125);
    assert!(stderr.contains("environment variable name") || stderr.contains("does not exist"), "{stderr}");
    assert_nothing_left(&data, "quilt", "bad-bundle");
}
