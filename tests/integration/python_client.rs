//! The Python example agent (deploy/examples/agent_client.py) against a real
//! nats-server and `quilt worker`: it is run as a process, as a user would,
//! and must print the live output, the summary, and exit with the task's code.
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

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/agent_client.py")
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
    let (out_path, err_path) = (dir.join(format!("{name}.stdout")), dir.join(format!("{name}.stderr")));
    let mut child = Command::new(python)
        .arg(script())
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
                "agent_client.py {args:?} still running after {BOUND:?}; stderr so far:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code().unwrap_or_else(|| panic!("agent_client.py {args:?} killed: {status}")),
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
