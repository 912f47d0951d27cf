//! User-namespace mode (`--userns START:COUNT`): the container's root is
//! host uid START, the image's files look inside as they are in the image,
//! what a container writes is owned by its own ids on the host, and it works
//! the same for one-task containers, long-running ones, execs and
//! environment builds (whose cached layer holds image ids, so it serves
//! workers in either mode). The isolation batteries (escapes,
//! cross_container, abuse) also run in this mode, in their own modules.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quilt_tests::pipeline::{assert_worker_left_nothing, task, Agent, LongRunningGuard, Setup, Worker};
use quilt_tests::{
    assert_nothing_left, build_busybox_rootfs, cgroup_dirs, debian_python_tarball, quilt_binary, text,
    wait_bounded, TestDir, USERNS_RANGE,
};
use serde_json::json;

const START: u32 = 100000;
const BOUND: Duration = Duration::from_secs(60);

/// Host uids (real, effective, saved, filesystem) of `pid`.
fn host_uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .map(|ids| ids.split_whitespace().filter_map(|id| id.parse().ok()).collect())
        .unwrap_or_default()
}

/// Pids in container `id`'s cgroup, waiting (bounded) until there is one.
fn container_pids(id: &str) -> Vec<u32> {
    let deadline = Instant::now() + BOUND;
    loop {
        let pids: Vec<u32> = cgroup_dirs("quilt", id)
            .iter()
            .filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|procs| procs.lines().filter_map(|line| line.trim().parse().ok()).collect::<Vec<_>>())
            .collect();
        if !pids.is_empty() || Instant::now() > deadline {
            return pids;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A busybox rootfs with a directory and file owned by 1000 (as an image
/// unpacked by root holds them), a set-user-id copy of busybox and a
/// root-only file.
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    build_busybox_rootfs(&root);
    let home = root.join("home/app");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("notes"), "image\n").unwrap();
    for path in [&home, &home.join("notes")] {
        std::os::unix::fs::chown(path, Some(1000), Some(1000)).unwrap();
    }
    std::fs::write(root.join("secret"), "root only\n").unwrap();
    std::fs::set_permissions(root.join("secret"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    root
}

fn run_local(data: &TestDir, id: &str, flags: &[&str], script: &str) -> std::process::Output {
    let child = Command::new(quilt_binary())
        .arg("--data-dir")
        .arg(&data.path)
        .args(["run", "--local", "--name", id])
        .args(flags)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child, BOUND, &["run", id])
}

#[test]
fn a_containers_root_is_an_unprivileged_host_user_that_sees_the_image_as_it_is() {
    let data = TestDir::new("userns-local");
    let root = rootfs(&data.path);
    let rootfs = root.to_str().unwrap();
    let flags = ["--userns", USERNS_RANGE, "--rootfs", rootfs, "--network", "none"];

    // The container's root, seen from the host while it runs: uid START.
    let id = "userns-local-1";
    let script = "cat /proc/self/uid_map; sleep 2";
    let running = std::thread::spawn({
        let path = data.path.clone();
        let flags = flags_owned(&flags);
        move || {
            let output = Command::new(quilt_binary())
                .arg("--data-dir")
                .arg(path)
                .args(["run", "--local", "--name", id])
                .args(flags)
                .args(["--", "sh", "-c", script])
                .output()
                .unwrap();
            (output.status.code(), text(&output.stdout))
        }
    });
    let pids = container_pids(id);
    assert!(!pids.is_empty(), "no process in the container's cgroup");
    for pid in &pids {
        let uids = host_uids(*pid);
        assert!(uids.is_empty() || uids == [START; 4], "pid {pid} runs as host uids {uids:?}");
    }
    let (code, stdout) = running.join().unwrap();
    assert_eq!(code, Some(0), "{stdout}");
    let map: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(map, ["0", "100000", "65536"], "uid_map inside: {stdout}");
    assert_nothing_left(&data, "quilt", id);

    // Inside, the image's owners are the image's; what the container makes
    // is its own; its root cannot read past modes on files it does not own
    // more than root could (it does own them: 0600 root is readable).
    let script = "stat -c '%u:%g %n' / /bin/busybox /home/app /home/app/notes /dev /dev/null /dev/shm; \
                  cat /secret; touch /made && stat -c '%u:%g %n' /made; \
                  mkdir -p /w/x && stat -c '%u:%g %n' /w/x; \
                  nc -l -p 80 & sleep 0.3; netstat -ltn | grep -c ':80 '; kill $!";
    let output = run_local(&data, "userns-local-2", &flags, script);
    assert!(output.status.success(), "{}{}", text(&output.stdout), text(&output.stderr));
    let stdout = text(&output.stdout);
    for expected in [
        "0:0 /\n",
        "0:0 /bin/busybox\n",
        "1000:1000 /home/app\n",
        "1000:1000 /home/app/notes\n",
        "0:0 /dev\n",
        "0:0 /dev/null\n",
        "0:0 /dev/shm\n",
        "root only\n",
        "0:0 /made\n",
        "0:0 /w/x\n",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    // Port 80 bound by the container's root in its own network.
    assert_eq!(stdout.lines().last(), Some("1"), "port 80 not bound:\n{stdout}");

    // Image user 1000 is host uid START+1000, owns its files, and nothing else.
    let script = "id -u; echo more >> /home/app/notes && cat /home/app/notes; cat /secret || echo refused";
    let output = run_local(&data, "userns-local-3", &[&flags[..], &["--user", "1000:1000"]].concat(), script);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "1000\nimage\nmore\nrefused");

    // The read-only bind root (one layer, --read-only) is mapped the same way.
    let output = run_local(
        &data,
        "userns-local-4",
        &[&flags[..], &["--read-only"]].concat(),
        "stat -c '%u:%g' /home/app/notes; touch /x 2>/dev/null || echo read-only",
    );
    assert_eq!(text(&output.stdout), "1000:1000\nread-only", "{}", text(&output.stderr));

    // The image on the host is untouched: the mapping is in the mounts only.
    let notes = std::fs::metadata(root.join("home/app/notes")).unwrap();
    assert_eq!((notes.uid(), notes.gid()), (1000, 1000));
    assert_eq!(std::fs::metadata(root.join("bin/busybox")).unwrap().uid(), 0);

    // A user the range does not map is refused before anything starts.
    let output = run_local(&data, "userns-local-5", &[&flags[..], &["--user", "70000"]].concat(), "true");
    assert_eq!(output.status.code(), Some(125));
    assert!(
        text(&output.stderr).contains("id 70000 is not mapped in the user namespace (range 100000:65536"),
        "{}",
        text(&output.stderr)
    );
    // And a range that would map the host's root is refused by the CLI.
    let output = run_local(&data, "userns-local-6", &["--userns", "0:65536", "--rootfs", rootfs], "true");
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("START must be at least 1"), "{}", text(&output.stderr));
    for id in ["userns-local-2", "userns-local-3", "userns-local-4", "userns-local-5"] {
        assert_nothing_left(&data, "quilt", id);
    }
}

fn flags_owned(flags: &[&str]) -> Vec<String> {
    flags.iter().map(|flag| (*flag).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_in_user_namespace_mode_runs_tasks_long_running_containers_and_execs() {
    let setup = Setup::new("userns-worker").await;
    let mut worker = Worker::start(&setup.data, &setup.broker.url, "usernsw", &["--userns", USERNS_RANGE]);
    let _guard = LongRunningGuard { worker_id: "usernsw".to_owned() };
    let agent = Agent::connect(&setup.broker.url).await;

    agent.submit(&task("u-1", &["sh", "-c", "cat /proc/self/uid_map; id -u; stat -c %u /bin/busybox"])).await;
    let result = agent.result("u-1", BOUND).await;
    assert_eq!(result["status"], "succeeded", "{result}");
    let words: Vec<&str> = result["stdout"].as_str().unwrap().split_whitespace().collect();
    assert_eq!(words, ["0", "100000", "65536", "0", "0"], "{result}");

    // A long-running container writes to its disk layer; execs join its
    // user namespace.
    let create = json!({
        "id": "u-box", "image": "busybox",
        "command": ["sh", "-c", "echo kept > /data; mkdir -p /home/app; chown 1000:1000 /home/app; exec sleep 1000"],
        "container": {"mode": "long_running", "name": "box"},
    });
    agent.submit(&create).await;
    let created = agent.result("u-box", BOUND).await;
    assert_eq!(created["status"], "succeeded", "{created}");
    let exec =
        |id: &str, command: &[&str]| json!({"id": id, "command": command, "container": {"target": "box"}});
    let mut seen = String::new();
    for attempt in 0..50 {
        agent
            .submit(&exec(
                &format!("u-x{attempt}"),
                &["sh", "-c", "cat /data && stat -c %u:%g /data /home/app"],
            ))
            .await;
        let result = agent.result(&format!("u-x{attempt}"), BOUND).await;
        seen = result["stdout"].as_str().unwrap_or_default().to_owned();
        if seen == "kept\n0:0\n1000:1000\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, "kept\n0:0\n1000:1000\n");
    agent.submit(&exec("u-map", &["cat", "/proc/self/uid_map"])).await;
    let result = agent.result("u-map", BOUND).await;
    let words: Vec<String> =
        result["stdout"].as_str().unwrap().split_whitespace().map(str::to_owned).collect();
    assert_eq!(words, ["0", "100000", "65536"], "{result}");
    agent
        .submit(
            &json!({"id": "u-x1000", "command": ["sh", "-c", "id -u; touch /home/app/mine && echo wrote"],
        "container": {"target": "box"}, "user": "1000"}),
        )
        .await;
    let result = agent.result("u-x1000", BOUND).await;
    assert_eq!(result["stdout"], "1000\nwrote\n", "{result}");

    // On disk, the layer (a filesystem of its own, read with debugfs once
    // the container synced it) holds the container's ids shifted.
    agent.submit(&exec("u-sync", &["sync"])).await;
    assert_eq!(agent.result("u-sync", BOUND).await["status"], "succeeded");
    let image = find_layer_image(&setup.data);
    assert_eq!(owner_in_image(&image, "/upper/data"), (START, START));
    assert_eq!(owner_in_image(&image, "/upper/home/app/mine"), (START + 1000, START + 1000));
    assert_eq!(owner_in_image(&image, "/upper"), (START, START), "the layer's top is the container's /");

    let removed =
        agent.request("quilt.api.any.containers.remove", &json!({"name": "box", "grace_s": 1})).await;
    assert_eq!(removed["ok"], "box", "{removed}");
    worker.terminate();
    assert_worker_left_nothing("usernsw", &setup.data);
    setup.broker.stop().await;
}

/// The disk layer image of the one long-running container in `data`.
fn find_layer_image(data: &Path) -> PathBuf {
    let images: Vec<PathBuf> = std::fs::read_dir(data.join("containers"))
        .unwrap()
        .flatten()
        .map(|entry| entry.path().join("layer.img"))
        .filter(|image| image.exists())
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    images[0].clone()
}

/// The owner of `path` inside the ext4 image `image`, read with debugfs
/// (read-only, `-c`: the filesystem is mounted in its container).
fn owner_in_image(image: &Path, path: &str) -> (u32, u32) {
    let output =
        Command::new("debugfs").arg("-c").arg("-R").arg(format!("stat {path}")).arg(image).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| -> u32 {
        let words: Vec<&str> = text.split_whitespace().collect();
        let at = words.iter().position(|word| *word == name).unwrap_or_else(|| panic!("no {name} in {text}"));
        words[at + 1].parse().unwrap()
    };
    (field("User:"), field("Group:"))
}

/// Host ids in `range` under `root` (symlinks not followed): none may be
/// left in a cached layer.
fn shifted_entries(root: &Path) -> Vec<(PathBuf, u32, u32)> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        if metadata.uid() >= START || metadata.gid() >= START {
            found.push((path.clone(), metadata.uid(), metadata.gid()));
        }
        if metadata.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().flatten().map(|entry| entry.path()));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_built_in_a_user_namespace_is_cached_with_image_ids_and_serves_either_mode() {
    let setup = Setup::new("userns-env").await;
    let tarball = debian_python_tarball();
    let import = Command::new(quilt_binary())
        .arg("--data-dir")
        .arg(&setup.data)
        .args(["image", "import", tarball.to_str().unwrap(), "--name", "debian:py"])
        .output()
        .unwrap();
    assert!(import.status.success(), "{}", text(&import.stderr));
    let python = |id: &str| {
        json!({
            "id": id, "image": "debian:py",
            "command": ["sh", "-c", "cat /proc/self/uid_map; python3 -c 'import six; print(six.__version__)'"],
            "environment": {"pip": ["six==1.16.0"]}, "limits": {"timeout_s": 60},
        })
    };
    let build_bound = Duration::from_secs(900);

    let mut worker = Worker::start(&setup.data, &setup.broker.url, "usernse", &["--userns", USERNS_RANGE]);
    let agent = Agent::connect(&setup.broker.url).await;
    agent.submit(&python("e-1")).await;
    let built = agent.result("e-1", build_bound).await;
    assert_eq!(built["status"], "succeeded", "{built}");
    assert_eq!(built["environment"]["cache"], "miss", "{built}");
    let words: Vec<&str> = built["stdout"].as_str().unwrap().split_whitespace().collect();
    assert_eq!(words, ["0", "100000", "65536", "1.16.0"], "{built}");
    worker.terminate();

    let layers: Vec<PathBuf> = std::fs::read_dir(setup.data.join("environments"))
        .unwrap()
        .flatten()
        .map(|entry| entry.path().join("layer"))
        .filter(|layer| layer.is_dir())
        .collect();
    assert_eq!(layers.len(), 1, "{layers:?}");
    let shifted = shifted_entries(&layers[0]);
    assert!(
        shifted.is_empty(),
        "host ids of the namespace left in the cached layer: {:?}",
        &shifted[..5.min(shifted.len())]
    );
    assert_eq!(std::fs::metadata(&layers[0]).unwrap().uid(), 0);

    // The same cached layer, for a worker without a user namespace.
    let mut plain = Worker::start(&setup.data, &setup.broker.url, "usernse", &[]);
    agent.submit(&python("e-2")).await;
    let hit = agent.result("e-2", BOUND).await;
    assert_eq!(hit["environment"]["cache"], "hit", "{hit}");
    let words: Vec<&str> = hit["stdout"].as_str().unwrap().split_whitespace().collect();
    assert_eq!(words, ["0", "0", "4294967295", "1.16.0"], "{hit}");
    plain.terminate();
    assert_worker_left_nothing("usernse", &setup.data);
    setup.broker.stop().await;
}
