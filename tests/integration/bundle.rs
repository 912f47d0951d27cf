//! OCI runtime bundles.

use quilt_tests::{assert_nothing_left, busybox_rootfs, quilt_binary, TestDir};

#[test]
fn runs_a_bundle_with_its_settings() {
    let data = TestDir::new("bundle-run");
    let bundle = data.path.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::os::unix::fs::symlink(busybox_rootfs(), bundle.join("rootfs")).unwrap();
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "bundled",
        "process": {
            "cwd": "/tmp",
            "args": ["/bin/sh", "-c", "hostname; pwd; echo $FROM; id -u; touch /x 2>/dev/null || echo ro; grep NoNewPrivs /proc/self/status; exit 7"],
            "env": ["FROM=bundle", "PATH=/bin"],
            "user": {"uid": 123, "gid": 456},
            "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 128, "soft": 64}]
        },
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
            "resources": {"memory": {"limit": 67108864}, "pids": {"limit": 64}}
        }
    });
    std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    let output = std::process::Command::new(quilt_binary())
        .arg("--data-dir")
        .arg(&data.path)
        .args(["run", "--local", "--name", "bundle-run", "--bundle"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(7), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, ["bundled", "/tmp", "bundle", "123", "ro", "NoNewPrivs:\t1"]);
    assert_nothing_left(&data, "quilt", "bundle-run");
}
