//! A real distribution image: Debian bookworm with python3, built by
//! mmdebstrap, imported as a rootfs tarball.

use quilt_tests::{assert_nothing_left, debian_python_tarball, quilt_binary, TestDir};

#[test]
fn debian_python_image_runs_python() {
    let data = TestDir::new("debian-python");
    let tarball = debian_python_tarball();
    let quilt = |args: &[&str]| {
        std::process::Command::new(quilt_binary())
            .arg("--data-dir")
            .arg(&data.path)
            .args(args)
            .output()
            .unwrap()
    };
    let import = quilt(&["image", "import", tarball.to_str().unwrap(), "--name", "debian:bookworm-python3"]);
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    let run = quilt(&[
        "run",
        "--local",
        "--name",
        "debian-python",
        "--image",
        "debian:bookworm-python3",
        "--memory",
        "256M",
        "--",
        "python3",
        "-c",
        "import sys, json; print(json.dumps({'version': list(sys.version_info[:2]), 'ok': True}))",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        r#"{"version": [3, 11], "ok": true}"#,
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_nothing_left(&data, "quilt", "debian-python");
}
