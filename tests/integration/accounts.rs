//! broker-config/accounts.conf for real: a nats-server with those users, a
//! `quilt worker` connected as `worker` runs an agent's task end to end,
//! the agent's own permissions stop it at the control API and at other
//! subjects (the server's permission errors are asserted), and the admin
//! reaches the control API.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quilt_tests::pipeline::{assert_worker_left_nothing, import_busybox, task, Agent, Worker, BOUND};
use quilt_tests::TestDir;
use serde_json::json;

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// nats-server with JetStream and the project's accounts file, on loopback.
fn start_server(dir: &TestDir) -> Server {
    let accounts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker-config/accounts.conf");
    // nats-server resolves `include` against the including file's directory.
    std::fs::copy(&accounts, dir.path.join("accounts.conf")).unwrap();
    let port = free_port();
    let config = dir.path.join("server.conf");
    std::fs::write(
        &config,
        format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\ninclude \"accounts.conf\"\n",
            dir.path.join("store").display(),
        ),
    )
    .unwrap();
    let program = quilt::broker::find_nats_server(None).unwrap();
    let child = Command::new(program)
        .arg("-c")
        .arg(&config)
        .env("QUILT_AGENT_PASSWORD", "agent-pw")
        .env("QUILT_WORKER_PASSWORD", "worker-pw")
        .env("QUILT_LEAF_PASSWORD", "leaf-pw")
        .env("QUILT_ADMIN_PASSWORD", "admin-pw")
        .env("QUILT_SYS_PASSWORD", "sys-pw")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path.join("server.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + BOUND;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let log = std::fs::read_to_string(dir.path.join("server.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "nats-server did not listen: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, port }
}

/// A connection as `user`, collecting the server's errors (permission violations).
async fn connect_as(
    port: u16,
    user: &str,
    password: &str,
) -> (async_nats::Client, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = errors.clone();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    seen.lock().unwrap().push(error.to_string());
                }
            }
        })
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap();
    (client, errors)
}

async fn wait_for_error(errors: &std::sync::Mutex<Vec<String>>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if errors.lock().unwrap().iter().any(|error| error.contains(needle)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no server error containing {needle:?}: {:?}",
            errors.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_users_run_tasks_and_keep_agents_out_of_the_control_plane() {
    let dir = TestDir::new("accounts");
    let server = start_server(&dir);
    let data = dir.path.join("worker");
    import_busybox(&data);
    // A wrong password is refused outright.
    let refused = async_nats::ConnectOptions::with_user_and_password("agent".into(), "wrong".into())
        .connect(format!("nats://127.0.0.1:{}", server.port))
        .await;
    assert!(refused.is_err());

    // The worker, with its own user in the URL (the password is not logged).
    let worker_url = format!("nats://worker:worker-pw@127.0.0.1:{}", server.port);
    let mut worker = Worker::start(&data, &worker_url, "acct", &[]);
    assert!(!worker.log_text().contains("worker-pw"), "{}", worker.log_text());

    // The agent submits a task and reads its result and output.
    let (agent_client, agent_errors) = connect_as(server.port, "agent", "agent-pw").await;
    let agent =
        Agent { jetstream: async_nats::jetstream::new(agent_client.clone()), client: agent_client.clone() };
    let mut output = agent_client.subscribe("quilt.output.acct-1.stdout").await.unwrap();
    agent.submit(&task("acct-1", &["echo", "hello"])).await;
    let result = agent.result("acct-1", BOUND).await;
    assert_eq!((result["status"].clone(), result["stdout"].clone()), (json!("succeeded"), json!("hello\n")));
    let chunk =
        tokio::time::timeout(BOUND, futures_util::StreamExt::next(&mut output)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&chunk.payload).contains("hello"));

    // ...and nothing else: not the control API, not other workers' queues,
    // not the events, not the task queue's contents.
    agent_client.publish("quilt.api.any.health", "".into()).await.unwrap();
    wait_for_error(&agent_errors, "Permissions Violation for Publish to \"quilt.api.any.health\"").await;
    agent_client.publish("quilt.tasks.worker.acct", "{}".into()).await.unwrap();
    wait_for_error(&agent_errors, "Permissions Violation for Publish to \"quilt.tasks.worker.acct\"").await;
    let _events = agent_client.subscribe("quilt.events.>").await.unwrap();
    wait_for_error(&agent_errors, "Permissions Violation for Subscription to \"quilt.events.>\"").await;
    let _tasks = agent_client.subscribe("quilt.tasks").await.unwrap();
    wait_for_error(&agent_errors, "Permissions Violation for Subscription to \"quilt.tasks\"").await;
    agent_client.publish("$JS.API.STREAM.DELETE.QUILT_TASKS", "".into()).await.unwrap();
    wait_for_error(
        &agent_errors,
        "Permissions Violation for Publish to \"$JS.API.STREAM.DELETE.QUILT_TASKS\"",
    )
    .await;

    // The admin reaches the control API.
    let (admin, _) = connect_as(server.port, "admin", "admin-pw").await;
    let reply =
        tokio::time::timeout(BOUND, admin.request("quilt.api.any.health", "".into())).await.unwrap().unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap()["ok"], "ok");

    assert!(worker.terminate().success(), "{}", worker.log_text());
    assert_worker_left_nothing("acct", &data);
    drop(server);
}
