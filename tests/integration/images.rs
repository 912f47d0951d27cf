//! The image store through the `quilt` binary: import of every format,
//! containers from images, whiteouts, platforms, hostile layers, prune.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use quilt_tests::images::busybox_layer;
use quilt_tests::images::{
    busybox_entries, layer_tar, write_docker_archive, write_oci_layout, write_oci_layout_multiplatform,
    write_rootfs_tarball, Entry, ImageConfig, LayerCompression,
};
use quilt_tests::{assert_nothing_left, assert_ok, quilt, quilt_binary, run_image, text, TestDir};

fn import(data: &TestDir, path: &Path, name: &str) -> Output {
    quilt(data, &["image", "import", path.to_str().unwrap(), "--name", name])
}

#[test]
fn oci_layout_image_runs_with_its_config() {
    let data = TestDir::new("img-oci");
    let layout = data.path.join("layout");
    let config = ImageConfig {
        env: vec!["PATH=/bin".into(), "GREETING=from-image".into()],
        entrypoint: Some(vec!["/bin/sh".into(), "-c".into()]),
        cmd: Some(vec!["echo default-cmd".into()]),
        working_dir: Some("/srv/app".into()),
        user: Some("app".into()),
    };
    write_oci_layout(&layout, "v1", &[busybox_layer()], &config);
    assert_ok(&import(&data, &layout, "example.local/busybox:v1"));
    // Cmd when no command is given, after the entrypoint.
    assert_eq!(run_image(&data, "img-oci-1", "example.local/busybox:v1", &[]), "default-cmd");
    // Given arguments replace Cmd; Env, WorkingDir and User apply.
    let out =
        run_image(&data, "img-oci-2", "example.local/busybox:v1", &["echo $GREETING; pwd; id -u; id -g"]);
    assert_eq!(out, "from-image\n/srv/app\n1000\n1000");
    let listed = text(&quilt(&data, &["image", "ls"]).stdout);
    assert!(listed.contains("example.local/busybox:v1"), "{listed}");
}

#[test]
fn whiteouts_and_opaque_directories_behave_as_in_docker() {
    let data = TestDir::new("img-wh");
    let layout = data.path.join("layout");
    let base = layer_tar(&[
        Entry::dir("a", 0o755),
        Entry::file("a/keep", 0o644, "keep"),
        Entry::file("a/gone", 0o644, "gone"),
        Entry::dir("d", 0o755),
        Entry::file("d/old", 0o644, "old"),
        Entry::file("replaced", 0o644, "v1"),
    ]);
    let top = layer_tar(&[
        Entry::Whiteout { path: "a/gone".into() },
        Entry::OpaqueDir { path: "d".into() },
        Entry::file("d/new", 0o644, "new"),
        Entry::file("replaced", 0o644, "v2"),
    ]);
    write_oci_layout(
        &layout,
        "latest",
        &[busybox_layer(), (base, LayerCompression::Zstd), (top, LayerCompression::None)],
        &ImageConfig { env: vec!["PATH=/bin".into()], ..ImageConfig::default() },
    );
    assert_ok(&import(&data, &layout, "layers"));
    let out = run_image(
        &data,
        "img-wh",
        "layers",
        &["/bin/sh", "-c", "ls /a; echo --; ls /d; echo --; cat /replaced"],
    );
    assert_eq!(out, "keep\n--\nnew\n--\nv2");
}

#[test]
fn multi_platform_index_yields_the_host_manifest() {
    let data = TestDir::new("img-multi");
    let layout = data.path.join("layout");
    let (_, amd64_manifest) = write_oci_layout_multiplatform(
        &layout,
        "latest",
        &[busybox_layer()],
        &ImageConfig { env: vec!["PATH=/bin".into()], ..ImageConfig::default() },
    );
    let output = import(&data, &layout, "multi");
    assert_ok(&output);
    assert!(text(&output.stdout).ends_with(&amd64_manifest), "{}", text(&output.stdout));
    // The arm64 variant's only layer holds etc/platform; the host's has busybox.
    assert_eq!(
        run_image(
            &data,
            "img-multi",
            "multi",
            &["/bin/sh", "-c", "ls /etc/platform 2>/dev/null || echo amd64"]
        ),
        "amd64"
    );
}

#[test]
fn docker_archive_and_rootfs_tarballs_import() {
    let data = TestDir::new("img-archives");
    let archive = data.path.join("saved.tar");
    write_docker_archive(
        &archive,
        "saved:1",
        &[layer_tar(&busybox_entries()), layer_tar(&[Entry::file("marker", 0o644, "docker-archive")])],
        &ImageConfig { env: vec!["PATH=/bin".into()], ..ImageConfig::default() },
    );
    assert_ok(&import(&data, &archive, "saved:1"));
    assert_eq!(run_image(&data, "img-docker", "saved:1", &["/bin/cat", "/marker"]), "docker-archive");

    let mut entries = busybox_entries();
    entries.push(Entry::file("marker", 0o644, "rootfs-tarball"));
    for (gzip, name) in [(true, "rootfs:gz"), (false, "rootfs:plain")] {
        let tarball = data.path.join(format!("rootfs-{gzip}.tar"));
        write_rootfs_tarball(&tarball, &entries, gzip);
        assert_ok(&import(&data, &tarball, name));
        assert_eq!(
            run_image(&data, &format!("img-rootfs-{gzip}"), name, &["/bin/cat", "/marker"]),
            "rootfs-tarball"
        );
    }
    // The same layer content is stored once.
    let records: serde_json::Value =
        serde_json::from_slice(&quilt(&data, &["image", "ls", "--json"]).stdout).unwrap();
    assert_eq!(records.as_array().unwrap().len(), 3);
}

/// A tree outside the store that hostile layers aim at, with a fingerprint.
struct Canary {
    dir: PathBuf,
}

impl Canary {
    fn new(data: &TestDir) -> Canary {
        let dir = data.path.join("canary");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("secret"), "host secret").unwrap();
        std::fs::write(dir.join("sub/file"), "host file").unwrap();
        Canary { dir }
    }

    fn fingerprint(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    stack.push(path.clone());
                    out.push((path, Vec::new()));
                } else {
                    out.push((path.clone(), std::fs::read(&path).unwrap_or_default()));
                }
            }
        }
        out.sort();
        out
    }
}

#[test]
fn hostile_layers_fail_cleanly_and_leave_the_host_untouched() {
    let data = TestDir::new("img-hostile");
    let canary = Canary::new(&data);
    let before = canary.fingerprint();
    let canary_text = canary.dir.to_str().unwrap().to_owned();
    let raw = |name: &str, kind: tar::EntryType, link: Option<&str>, content: &str| Entry::Raw {
        header_name: name.as_bytes().to_vec(),
        kind,
        link: link.map(|l| l.as_bytes().to_vec()),
        content: content.as_bytes().to_vec(),
    };
    let cases: Vec<(&str, Vec<Entry>, &str)> = vec![
        ("dotdot", vec![raw("../../../../../../escape", tar::EntryType::Regular, None, "x")], ".."),
        (
            "absolute",
            vec![raw(&format!("{canary_text}/secret"), tar::EntryType::Regular, None, "pwned")],
            "absolute",
        ),
        (
            "symlink-then-write",
            vec![
                Entry::symlink("evil", canary_text.clone()),
                raw("evil/secret", tar::EntryType::Regular, None, "pwned"),
            ],
            "",
        ),
        ("hardlink-host", vec![raw("passwd", tar::EntryType::Link, Some("/etc/passwd"), "")], "link"),
        ("hardlink-dotdot", vec![raw("x", tar::EntryType::Link, Some("../../../../etc/passwd"), "")], "link"),
        ("whiteout-outside", vec![raw("../.wh.secret", tar::EntryType::Regular, None, "")], ""),
    ];
    for (label, entries, expect) in cases {
        let layout = data.path.join(format!("hostile-{label}"));
        let mut all = busybox_entries();
        all.extend(entries);
        write_oci_layout(
            &layout,
            "latest",
            &[(layer_tar(&all), LayerCompression::Gzip)],
            &ImageConfig::default(),
        );
        let output = import(&data, &layout, &format!("hostile-{label}"));
        let stderr = text(&output.stderr);
        if label == "symlink-then-write" && output.status.success() {
            // Resolved inside the layer: the write landed in the snapshot, never on the host.
        } else {
            assert_eq!(output.status.code(), Some(125), "{label}: {stderr}");
            assert!(stderr.to_lowercase().contains(expect), "{label}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{label}: {stderr}");
            let listed = text(&quilt(&data, &["image", "ls"]).stdout);
            assert!(!listed.contains(&format!("hostile-{label}")), "{label} was stored: {listed}");
        }
        assert_eq!(canary.fingerprint(), before, "{label} touched the host");
        assert!(!Path::new("/escape").exists());
    }
    // Nothing half-unpacked stays in the store's scratch space.
    let tmp = data.path.join("images/tmp");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "leftovers in {}", tmp.display());
}

#[test]
fn device_nodes_are_neutralised() {
    let data = TestDir::new("img-dev");
    let layout = data.path.join("layout");
    let mut entries = busybox_entries();
    entries.push(Entry::Raw {
        header_name: b"dev/sda".to_vec(),
        kind: tar::EntryType::Block,
        link: None,
        content: Vec::new(),
    });
    write_oci_layout(
        &layout,
        "latest",
        &[(layer_tar(&entries), LayerCompression::Gzip)],
        &ImageConfig { env: vec!["PATH=/bin".into()], ..ImageConfig::default() },
    );
    assert_ok(&import(&data, &layout, "devnode"));
    // The container's /dev is Quilt's own; the layer's node was never created.
    let snapshots = std::fs::read_dir(data.path.join("images/snapshots")).unwrap();
    for snapshot in snapshots.flatten() {
        assert!(!snapshot.path().join("dev/sda").exists());
    }
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused() {
    let data = TestDir::new("img-digest");
    let layout = data.path.join("layout");
    write_oci_layout(&layout, "latest", &[busybox_layer()], &ImageConfig::default());
    // Corrupt the largest blob (the layer) in place.
    let blobs = layout.join("blobs/sha256");
    let largest = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&largest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&largest, bytes).unwrap();
    let output = import(&data, &layout, "corrupt");
    assert_eq!(output.status.code(), Some(125));
    assert!(text(&output.stderr).contains("digest mismatch"), "{}", text(&output.stderr));
    let stored = std::fs::read_dir(data.path.join("images/blobs/sha256")).unwrap().count();
    assert!(!data.path.join("images/blobs/sha256").join(largest.file_name().unwrap()).exists());
    assert!(stored <= 1, "{stored} blobs stored from a corrupt image");
}

#[test]
fn bad_names_are_refused() {
    let data = TestDir::new("img-names");
    let layout = data.path.join("layout");
    write_oci_layout(&layout, "latest", &[busybox_layer()], &ImageConfig::default());
    let long = "a".repeat(10 * 1024);
    for name in ["", "../x", "UPPER/x", "a b", long.as_str()] {
        let output = import(&data, &layout, name);
        assert_eq!(output.status.code(), Some(125), "{name:.20}");
        let stderr = text(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.len() < 400, "error too long: {stderr}");
    }
    let output = quilt(&data, &["run", "--local", "--image", "nope:1", "--", "/bin/true"]);
    assert_eq!(output.status.code(), Some(125));
    assert!(text(&output.stderr).contains("no image"), "{}", text(&output.stderr));
}

#[test]
fn prune_keeps_what_a_running_container_uses() {
    let data = TestDir::new("img-prune");
    let layout = data.path.join("layout");
    write_oci_layout(
        &layout,
        "latest",
        &[busybox_layer()],
        &ImageConfig { env: vec!["PATH=/bin".into()], ..ImageConfig::default() },
    );
    assert_ok(&import(&data, &layout, "pruneme"));
    let snapshots = || std::fs::read_dir(data.path.join("images/snapshots")).unwrap().count();
    assert_eq!(snapshots(), 1);
    // A container holds the image's layers while it runs.
    let mut running = Command::new(quilt_binary())
        .arg("--data-dir")
        .arg(&data.path)
        .args([
            "run",
            "--local",
            "--name",
            "img-prune",
            "--image",
            "pruneme",
            "--",
            "/bin/sh",
            "-c",
            "echo up; sleep 3",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 3];
    std::io::Read::read_exact(running.stdout.as_mut().unwrap(), &mut first).unwrap();
    assert_ok(&quilt(&data, &["image", "rm", "pruneme"]));
    let report = text(&quilt(&data, &["image", "prune"]).stdout);
    assert!(report.contains("kept 1 snapshots in use"), "{report}");
    assert_eq!(snapshots(), 1);
    assert!(running.wait().unwrap().success());
    let report = text(&quilt(&data, &["image", "prune"]).stdout);
    assert!(report.contains("and 1 snapshots"), "{report}");
    assert_eq!(snapshots(), 0);
    assert_eq!(std::fs::read_dir(data.path.join("images/blobs/sha256")).unwrap().count(), 0);
    assert_nothing_left(&data, "quilt", "img-prune");
}
