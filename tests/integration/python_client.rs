//! The Python examples against a real nats-server and `quilt worker`, run as
//! processes, as a user would: the agent (deploy/examples/agent_client.py)
//! must print the live output, the summary, and exit with the task's code;
//! the control API client (deploy/examples/control_client.py) lists, execs
//! into, reads the log of, and removes a long-running container with plain
//! nats-py requests.
//!
//! Needs a Python with nats-py, named by QUILT_EXAMPLES_PYTHON (.ci/run
//! makes one in /opt/quilt-examples); without it the test fails, never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quilt_tests::pipeline::{assert_worker_left_nothing, Agent, Setup, Worker, BOUND};

const INSTALL: &str = "python3 -m venv /opt/quilt-examples && \
     /opt/quilt-examples/bin/pip install nats-py==2.16.0 && \
     export QUILT_EXAMPLES_PYTHON=/opt/quilt-examples/bin/python3 (as .ci/run does)";

/// The interpreter to run the example with; it must have nats-py.
fn python() -> PathBuf {
    let python = std::env::var_os("QUILT_EXAMPLES_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        panic!("QUILT_EXAMPLES_PYTHON is not set: it names a Python with nats-py; {INSTALL}")
    });
    let check = Command::new(&python).args(["-c", "import nats"]).output().unwrap_or_else(|error| {
        panic!("QUILT_EXAMPLES_PYTHON={}: cannot run it ({error}); {INSTALL}", python.display())
    });
    assert!(
        check.status.success(),
        "QUILT_EXAMPLES_PYTHON={} cannot import nats ({}); {INSTALL}",
        python.display(),
        String::from_utf8_lossy(&check.stderr).trim()
    );
    python
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples").join(name)
}

/// What one run of the example printed, and its exit code.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the example with `args` against `url`, killed (and the test failed)
/// after [`BOUND`]. Output goes to files, so a full pipe cannot stall it.
fn run_example(python: &Path, dir: &Path, name: &str, url: &str, args: &[&str]) -> Run {
    run_script(python, "agent_client.py", dir, name, url, args)
}

fn run_script(python: &Path, file: &str, dir: &Path, name: &str, url: &str, args: &[&str]) -> Run {
    let (out_path, err_path) = (dir.join(format!("{name}.stdout")), dir.join(format!("{name}.stderr")));
    let mut child = Command::new(python)
        .arg(script(file))
        .args(args)
        .env("QUILT_NATS_URL", url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + BOUND;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{file} {args:?} still running after {BOUND:?}; stderr so far:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code().unwrap_or_else(|| panic!("{file} {args:?} killed: {status}")),
        stdout: std::fs::read_to_string(&out_path).unwrap(),
        stderr: std::fs::read_to_string(&err_path).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_streams_output_and_exits_with_the_task_code() {
    let python = python();
    let Setup { dir, broker, data } = Setup::new("python-client").await;
    let mut worker = Worker::start(&data, &broker.url, "py", &[]);
    let agent = Agent::connect(&broker.url).await;

    let (py, out, url) = (python.clone(), dir.path.clone(), broker.url.clone());
    let failing = tokio::task::spawn_blocking(move || {
        run_example(
            &py,
            &out,
            "fail",
            &url,
            &["--image", "busybox", "--id", "py-fail", "--", "sh", "-c", "echo out; echo err >&2; exit 3"],
        )
    })
    .await
    .unwrap();
    let context = format!("stdout {:?}, stderr {:?}", failing.stdout, failing.stderr);
    assert_eq!(failing.code, 3, "{context}");
    // The client prints only live chunks (never the result's copy), so this
    // is the live output, each stream on its own side.
    assert!(failing.stdout.contains("out\n"), "{context}");
    assert!(!failing.stdout.contains("err"), "{context}");
    assert!(failing.stderr.contains("err\n"), "{context}");
    assert!(failing.stderr.contains("task py-fail failed (exit 3)"), "summary missing: {context}");
    // The result it reported is the one stored for the task.
    let result = agent.result("py-fail", BOUND).await;
    assert_eq!(result["status"], "failed", "{result:#}");
    assert_eq!(result["exit_code"], 3);
    assert_eq!(result["worker_id"], "py");

    let (py, out, url) = (python, dir.path.clone(), broker.url.clone());
    let hello = tokio::task::spawn_blocking(move || {
        run_example(&py, &out, "hello", &url, &["--image", "busybox", "--", "echo", "hello"])
    })
    .await
    .unwrap();
    assert_eq!(hello.code, 0, "stdout {:?}, stderr {:?}", hello.stdout, hello.stderr);
    assert_eq!(hello.stdout, "hello\n", "stderr {:?}", hello.stderr);
    assert!(hello.stderr.contains("succeeded (exit 0)"), "stderr {:?}", hello.stderr);

    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert_worker_left_nothing("py", &data);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_control_client_drives_a_long_running_container() {
    let python = python();
    let Setup { dir, broker, data } = Setup::new("python-control").await;
    let _guard = quilt_tests::pipeline::LongRunningGuard { worker_id: "pyctl".into() };
    let mut worker = Worker::start(&data, &broker.url, "pyctl", &[]);
    let agent = Agent::connect(&broker.url).await;
    let create = serde_json::json!({
        "id": "py-create", "image": "busybox",
        "command": ["sh", "-c", "echo first line; exec sleep 100000"],
        "container": {"mode": "long_running", "name": "pybox"},
    });
    agent.submit(&create).await;
    assert_eq!(agent.result("py-create", BOUND).await["status"], "succeeded");

    let control = |name: &'static str, args: Vec<&'static str>| {
        let (py, out, url) = (python.clone(), dir.path.clone(), broker.url.clone());
        tokio::task::spawn_blocking(move || run_script(&py, "control_client.py", &out, name, &url, &args))
    };
    let list = control("list", vec!["list"]).await.unwrap();
    assert_eq!(list.code, 0, "{}", list.stderr);
    let listed: serde_json::Value = serde_json::from_str(list.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(
        (listed["name"].clone(), listed["status"].clone()),
        (serde_json::json!("pybox"), serde_json::json!("running"))
    );

    let exec = control("exec", vec!["exec", "pybox", "--", "sh", "-c", "echo out; echo err >&2; exit 3"])
        .await
        .unwrap();
    assert_eq!((exec.code, exec.stdout.as_str(), exec.stderr.as_str()), (3, "out\n", "err\n"));
    let logs = control("logs", vec!["logs", "pybox", "--tail", "1"]).await.unwrap();
    assert_eq!((logs.code, logs.stdout.as_str()), (0, "first line\n"), "{}", logs.stderr);
    let missing = control("missing", vec!["exec", "nobox", "--", "true"]).await.unwrap();
    assert_eq!(missing.code, 1, "{}", missing.stdout);
    assert!(missing.stderr.contains("not_found"), "{}", missing.stderr);

    let removed = control("rm", vec!["rm", "pybox", "--grace", "1"]).await.unwrap();
    assert_eq!((removed.code, removed.stdout.trim()), (0, "\"pybox\""), "{}", removed.stderr);
    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert_worker_left_nothing("pyctl", &data);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_agent_asks_for_packages_and_gets_them() {
    let python = python();
    let Setup { dir, broker, data } = Setup::new("python-packages").await;
    let tarball = quilt_tests::debian_python_tarball();
    let import = Command::new(quilt_tests::quilt_binary())
        .arg("--data-dir")
        .arg(&data)
        .args(["image", "import", tarball.to_str().unwrap(), "--name", "debian:py"])
        .output()
        .unwrap();
    assert!(import.status.success(), "{}", String::from_utf8_lossy(&import.stderr));
    let mut worker = Worker::start(&data, &broker.url, "pypkg", &[]);
    let (py, out, url) = (python, dir.path.clone(), broker.url.clone());
    let run = tokio::task::spawn_blocking(move || {
        run_example(
            &py,
            &out,
            "pip",
            &url,
            &[
                "--image",
                "debian:py",
                "--pip",
                "six==1.16.0",
                "--",
                "python3",
                "-c",
                "import six; print(six.__version__)",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!((run.code, run.stdout.as_str()), (0, "1.16.0\n"), "stderr {:?}", run.stderr);
    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert_worker_left_nothing("pypkg", &data);
    broker.stop().await;
}
