//! Language environments for real: a Debian bookworm image (mmdebstrap),
//! packages from Debian's mirror, PyPI and the npm registry, built once by
//! a real worker and reused; failures and hostile names; eviction that
//! never takes a layer in use.

use std::time::Duration;

use quilt_tests::pipeline::{assert_worker_left_nothing, Agent, Broker, Worker};
use quilt_tests::{debian_python_tarball, quilt_binary, text, TestDir};
use serde_json::{json, Value};

/// Builds reach the package registries: minutes, not seconds, on a cold cache.
const BUILD_BOUND: Duration = Duration::from_secs(900);

fn quilt(data: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(quilt_binary()).arg("--data-dir").arg(data).args(args).output().unwrap()
}

async fn setup(name: &str) -> (TestDir, Broker, std::path::PathBuf) {
    let dir = TestDir::new(name);
    let broker = Broker::start(&dir.path.join("nats")).await;
    let data = dir.path.join("worker");
    std::fs::create_dir_all(&data).unwrap();
    let tarball = debian_python_tarball();
    let import = quilt(&data, &["image", "import", tarball.to_str().unwrap(), "--name", "debian:py"]);
    assert!(import.status.success(), "{}", text(&import.stderr));
    (dir, broker, data)
}

fn python_task(id: &str, pip: &[&str], code: &str) -> Value {
    json!({
        "id": id, "image": "debian:py", "command": ["python3", "-c", code],
        "environment": {"pip": pip}, "limits": {"timeout_s": 60},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_environments_are_built_once_cached_by_content_and_refused_when_bad() {
    let (_dir, broker, data) = setup("env-python").await;
    let mut worker = Worker::start(&data, &broker.url, "envpy", &["--concurrency", "8"]);
    let agent = Agent::connect(&broker.url).await;
    let print_six = "import six; print(six.__version__)";

    // apt (python3, python3-venv) + pip, built for the first task.
    agent.submit(&python_task("py-1", &["six==1.16.0"], print_six)).await;
    let first = agent.result("py-1", BUILD_BOUND).await;
    assert_eq!(
        (first["status"].clone(), first["stdout"].clone()),
        (json!("succeeded"), json!("1.16.0\n")),
        "{first}"
    );
    assert_eq!(first["environment"]["cache"], "miss", "{first}");
    let key = first["environment"]["key"].as_str().unwrap().to_owned();

    // The same again: found built.
    agent.submit(&python_task("py-2", &["six==1.16.0"], print_six)).await;
    let second = agent.result("py-2", BUILD_BOUND).await;
    assert_eq!(second["stdout"], "1.16.0\n", "{second}");
    assert_eq!(
        (second["environment"]["cache"].clone(), second["environment"]["key"].clone()),
        (json!("hit"), json!(key))
    );

    // Another spec, another layer.
    agent.submit(&python_task("py-3", &["six==1.15.0"], print_six)).await;
    let other = agent.result("py-3", BUILD_BOUND).await;
    assert_eq!(other["stdout"], "1.15.0\n", "{other}");
    assert_ne!(other["environment"]["key"], json!(key));

    // Five at once with a spec not built yet: one build, four waited for it.
    for index in 0..5 {
        agent
            .submit(&python_task(
                &format!("py-c{index}"),
                &["idna==3.7"],
                "import idna; print(idna.__version__)",
            ))
            .await;
    }
    let mut misses = 0;
    let mut keys = std::collections::BTreeSet::new();
    for index in 0..5 {
        let result = agent.result(&format!("py-c{index}"), BUILD_BOUND).await;
        assert_eq!(result["stdout"], "3.7\n", "{result}");
        misses += usize::from(result["environment"]["cache"] == "miss");
        keys.insert(result["environment"]["key"].as_str().unwrap().to_owned());
    }
    assert_eq!((misses, keys.len()), (1, 1), "exactly one build for five identical tasks");
    assert_eq!(worker.log_text().matches("building an environment").count(), 3, "{}", worker.log_text());

    // An unknown package: an error naming it, and nothing cached.
    agent.submit(&python_task("py-bad", &["quilt-no-such-package-0xdead==1.0"], "pass")).await;
    let bad = agent.result("py-bad", BUILD_BOUND).await;
    assert_eq!(
        (bad["status"].clone(), bad["error"]["kind"].clone()),
        (json!("error"), json!("environment")),
        "{bad}"
    );
    let message = bad["error"]["message"].as_str().unwrap();
    assert!(message.contains("quilt-no-such-package-0xdead") && message.contains("pip"), "{message}");
    // Its build log, by the key the message names.
    let key_prefix = message.rsplit("quilt env inspect ").next().unwrap().trim_end_matches(')');
    let inspect = quilt(&data, &["env", "inspect", key_prefix]);
    assert_eq!(inspect.status.code(), Some(1), "{}", text(&inspect.stderr));
    assert!(text(&inspect.stdout).contains("== pip: install"), "{}", text(&inspect.stdout));
    let listed: Vec<Value> = serde_json::from_slice(&quilt(&data, &["env", "ls", "--json"]).stdout).unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.iter().all(|meta| !meta["spec"]["pip"].to_string().contains("0xdead")), "{listed:?}");

    // A shell string as a package name never reaches anything.
    agent.submit(&python_task("py-evil", &["x; rm -rf /"], "pass")).await;
    let evil = agent.result("py-evil", BUILD_BOUND).await;
    assert_eq!(evil["status"], "rejected", "{evil}");
    assert!(evil["error"]["message"].as_str().unwrap().contains("environment.pip[0]"), "{evil}");
    assert_eq!(
        worker.log_text().matches("building an environment").count(),
        4,
        "only the unknown package was tried"
    );

    // Through the CLI, as the README shows.
    let run = quilt(
        &data,
        &[
            "run",
            "--nats",
            &broker.url,
            "--image",
            "debian:py",
            "--pip",
            "six==1.16.0",
            "--",
            "python3",
            "-c",
            print_six,
        ],
    );
    assert_eq!(
        (run.status.code(), text(&run.stdout)),
        (Some(0), "1.16.0".to_owned()),
        "{}",
        text(&run.stderr)
    );

    // Eviction: least recently used first, never a layer a task is using.
    let busy = python_task(
        "py-busy",
        &["six==1.15.0"],
        "import time, six; print('ready', flush=True); time.sleep(8)",
    );
    let mut output = agent.client.subscribe("quilt.output.py-busy.stdout").await.unwrap();
    agent.client.flush().await.unwrap();
    agent.submit(&busy).await;
    let _ = tokio::time::timeout(Duration::from_secs(60), futures_util::StreamExt::next(&mut output)).await;
    let pruned = quilt(&data, &["env", "prune"]);
    assert!(pruned.status.success(), "{}", text(&pruned.stderr));
    let left: Vec<Value> = serde_json::from_slice(&quilt(&data, &["env", "ls", "--json"]).stdout).unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["key"], other["environment"]["key"], "the layer in use stays");
    assert_eq!(agent.result("py-busy", BUILD_BOUND).await["status"], "succeeded");

    assert!(worker.terminate().success());
    assert_worker_left_nothing("envpy", &data);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_an_npm_package_prebuilt_at_start_are_installed_and_required() {
    let (dir, broker, data) = setup("env-node").await;
    // Prebuilt at start, from the worker's configuration.
    let prebuild = dir.path.join("prebuild.json");
    let listed = json!([{"image": "debian:py", "environment": {"npm": ["is-number@7.0.0"]}}]);
    std::fs::write(&prebuild, listed.to_string()).unwrap();
    let mut worker =
        Worker::start(&data, &broker.url, "envnode", &["--prebuild", prebuild.to_str().unwrap()]);
    let agent = Agent::connect(&broker.url).await;
    let deadline = std::time::Instant::now() + BUILD_BOUND;
    while !worker.log_text().contains("environment prebuilt") {
        assert!(std::time::Instant::now() < deadline, "not prebuilt: {}", worker.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let task = json!({
        "id": "node-1", "image": "debian:py",
        "command": ["node", "-e", "console.log(require('is-number/package.json').version, require('is-number')(5))"],
        "environment": {"npm": ["is-number@7.0.0"]}, "limits": {"timeout_s": 60},
    });
    agent.submit(&task).await;
    let result = agent.result("node-1", BUILD_BOUND).await;
    assert_eq!(
        (result["status"].clone(), result["stdout"].clone()),
        (json!("succeeded"), json!("7.0.0 true\n")),
        "{result}"
    );
    assert_eq!(result["environment"]["cache"], "hit", "prebuilt at start");
    // A package.json naming the same dependency is the same environment.
    let manifest = json!({
        "id": "node-2", "image": "debian:py",
        "command": ["node", "-e", "console.log(require('is-number')('x'))"],
        "environment": {"package_json": r#"{"name": "app", "dependencies": {"is-number": "7.0.0"}}"#},
    });
    agent.submit(&manifest).await;
    let second = agent.result("node-2", BUILD_BOUND).await;
    assert_eq!(
        (second["stdout"].clone(), second["environment"]["cache"].clone()),
        (json!("false\n"), json!("hit")),
        "{second}"
    );
    assert!(worker.terminate().success());
    assert_worker_left_nothing("envnode", &data);
    broker.stop().await;
}
