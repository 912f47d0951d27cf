//! Long-running containers through the wire protocol and the control API,
//! with real workers, a real nats-server and real containers: exec into a
//! container (100 at once), restart policies and their back-off, a worker
//! killed with -9 and its 20 containers re-adopted, and two workers sharing
//! the fleet-wide names (a conflict refused, a task forwarded to the owner).
//! Every control request is a plain NATS request, as any client would make.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use quilt_tests::pipeline::{assert_worker_left_nothing, Agent, LongRunningGuard, Setup, Worker, BOUND};
use quilt_tests::{quilt_binary, text};
use serde_json::{json, Value};

fn create_task(id: &str, name: &str, command: &[&str], restart: &str) -> Value {
    json!({
        "id": id,
        "image": "busybox",
        "command": command,
        "container": {"mode": "long_running", "name": name, "restart": restart},
    })
}

fn exec_task(id: &str, target: &str, command: &[&str]) -> Value {
    json!({"id": id, "command": command, "container": {"target": target}})
}

/// The summary of long-running container `name` from `containers.inspect`.
async fn inspect(agent: &Agent, name: &str) -> Value {
    let reply = agent.request("quilt.api.any.containers.inspect", &Value::String(name.into())).await;
    reply["ok"].clone()
}

/// Waits until `containers.inspect` of `name` satisfies `done`.
async fn wait_for(agent: &Agent, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + BOUND;
    loop {
        let summary = inspect(agent, name).await;
        if done(&summary) {
            return summary;
        }
        assert!(Instant::now() < deadline, "{name} not {what} within {BOUND:?}: {summary}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn remove(agent: &Agent, name: &str) {
    let reply = agent.request("quilt.api.any.containers.remove", &json!({"name": name, "grace_s": 1})).await;
    assert_eq!(reply["ok"], name, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_execs_at_once_into_one_container_keep_their_outputs_apart() {
    let Setup { dir: _dir, broker, data } = Setup::new("lr-exec").await;
    let _guard = LongRunningGuard { worker_id: "lrexec".into() };
    let mut worker = Worker::start(&data, &broker.url, "lrexec", &["--concurrency", "32"]);
    let agent = Agent::connect(&broker.url).await;

    agent
        .submit(&create_task(
            "x-create",
            "box",
            &["sh", "-c", "echo up; mkdir -p /data; exec sleep 100000"],
            "no",
        ))
        .await;
    let created = agent.result("x-create", BOUND).await;
    assert_eq!(created["status"], "succeeded", "{created}");
    assert_eq!(created["container_id"], "lrexec.box");
    let init_pid = wait_for(&agent, "box", "running", |c| c["status"] == "running").await["pid"].clone();

    // A file written by one exec is seen by the next: they share the container's root.
    agent.submit(&exec_task("x-write", "box", &["sh", "-c", "echo kept > /data/file"])).await;
    assert_eq!(agent.result("x-write", BOUND).await["status"], "succeeded");

    for index in 0..100 {
        let script = format!(
            "echo start-{index}; sleep 0.$((RANDOM % 5)); cat /data/file; echo end-{index}; echo err-{index} >&2; exit {}",
            index % 7
        );
        agent.submit(&exec_task(&format!("x-{index}"), "box", &["sh", "-c", &script])).await;
    }
    for index in 0..100 {
        let result = agent.result(&format!("x-{index}"), BOUND).await;
        assert_eq!(result["stdout"], format!("start-{index}\nkept\nend-{index}\n"), "{result}");
        assert_eq!(result["stderr"], format!("err-{index}\n"), "{result}");
        assert_eq!(result["exit_code"], index % 7, "{result}");
        assert_eq!(result["container_id"], "lrexec.box");
    }

    // Same pid namespace (the container's init is pid 1), same security
    // profile as the container: no_new_privs, seccomp filter, no CAP_SYS_ADMIN.
    let profile = exec_task(
        "x-profile",
        "box",
        &["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; echo; grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status"],
    );
    agent.submit(&profile).await;
    let profile = agent.result("x-profile", BOUND).await;
    let stdout = profile["stdout"].as_str().unwrap();
    assert!(stdout.starts_with("sleep 100000"), "{stdout}");
    assert!(stdout.contains("NoNewPrivs:\t1") && stdout.contains("Seccomp:\t2"), "{stdout}");
    let effective = stdout.lines().find_map(|line| line.strip_prefix("CapEff:\t")).unwrap();
    let effective = u64::from_str_radix(effective.trim(), 16).unwrap();
    assert_eq!(effective & (1 << 21), 0, "CAP_SYS_ADMIN must not be effective: {effective:x}");

    // Exec's own limits and timeout: the exec is killed, the container is not.
    let timed = json!({"id": "x-timeout", "command": ["sleep", "30"], "container": {"target": "box"}, "limits": {"timeout_s": 0.5}});
    agent.submit(&timed).await;
    assert_eq!(agent.result("x-timeout", BOUND).await["status"], "timed_out");
    let still = inspect(&agent, "box").await;
    assert_eq!((still["status"].clone(), still["pid"].clone()), (json!("running"), init_pid));

    // Through the control API too; an unknown target is an error result.
    let reply = agent
        .request("quilt.api.any.containers.exec", &json!({"name": "box", "command": ["cat", "/data/file"]}))
        .await;
    assert_eq!(reply["ok"]["stdout"], "kept\n", "{reply}");
    agent.submit(&exec_task("x-nobody", "nobody", &["true"])).await;
    let missing = agent.result("x-nobody", BOUND).await;
    assert_eq!(
        (missing["status"].clone(), missing["error"]["kind"].clone()),
        (json!("error"), json!("container_not_found"))
    );

    // The CLI: exec with its exit code, logs by tail and followed.
    let cli = |args: &[&str]| {
        let mut command = std::process::Command::new(quilt_binary());
        command.arg("--data-dir").arg(&data).arg(args[0]).args(["--nats", &broker.url]).args(&args[1..]);
        command
    };
    let exec = cli(&["exec", "box"]).args(["--", "sh", "-c", "echo cli; exit 5"]).output().unwrap();
    let raw = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    assert_eq!(
        (exec.status.code(), raw(&exec.stdout)),
        (Some(5), "cli\n".to_owned()),
        "{}",
        text(&exec.stderr)
    );
    let tail = cli(&["logs", "box", "--tail", "1"]).output().unwrap();
    assert_eq!(raw(&tail.stdout), "up\n", "{}", text(&tail.stderr));
    let mut follow = cli(&["logs", "box", "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let write = exec_task("x-log", "box", &["sh", "-c", "echo followed line > /proc/1/fd/1"]);
    agent.submit(&write).await;
    assert_eq!(agent.result("x-log", BOUND).await["status"], "succeeded");
    let mut stdout = follow.stdout.take().unwrap();
    let seen = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut seen = Vec::new();
        let mut buffer = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("followed line\n") {
            match stdout.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => seen.extend_from_slice(&buffer[..read]),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let seen = tokio::time::timeout(BOUND, seen).await.expect("followed within the bound").unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(seen, "up\nfollowed line\n");

    // `sleep` as pid 1 ignores SIGTERM: the stop waits out its grace period,
    // longer than a NATS client's default request timeout, and still answers.
    let started = Instant::now();
    let stop = cli(&["stop", "box", "--grace", "11"]).output().unwrap();
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    assert!(started.elapsed() >= Duration::from_secs(11), "{:?}", started.elapsed());
    assert!(raw(&stop.stdout).contains("\"status\": \"stopped\""), "{}", raw(&stop.stdout));

    remove(&agent, "box").await;
    let gone = cli(&["exec", "box", "--", "true"]).output().unwrap();
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone.stderr));
    assert!(text(&gone.stderr).contains("not_found"), "{}", text(&gone.stderr));
    assert!(worker.terminate().success());
    assert_worker_left_nothing("lrexec", &data);
    broker.stop().await;
}

/// `long_running_*` events of one container, from the worker's mirror.
async fn container_events(agent: &Agent, worker: &str, name: &str, bound: Duration) -> Vec<Value> {
    let stream = agent.jetstream.get_stream("QUILT_EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: format!("quilt.events.{worker}.>"),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.fetch().max_messages(10_000).expires(bound).messages().await.unwrap();
    let mut events = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        let event: Value = serde_json::from_slice(&message.payload).unwrap();
        if event["event"]["name"] == name {
            events.push(event["event"].clone());
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policies_retry_then_stop_restart_always_and_back_off_within_bounds() {
    let Setup { dir: _dir, broker, data } = Setup::new("lr-restart").await;
    let _guard = LongRunningGuard { worker_id: "lrrestart".into() };
    let mut worker = Worker::start(&data, &broker.url, "lrrestart", &[]);
    let agent = Agent::connect(&broker.url).await;

    // on-failure with 2 retries: three runs, each exiting 3, then it stays exited.
    let flaky = json!({
        "id": "r-flaky", "image": "busybox", "command": ["sh", "-c", "echo run; exit 3"],
        "container": {"mode": "long_running", "name": "flaky", "restart": "on-failure", "max_retries": 2},
    });
    agent.submit(&flaky).await;
    assert_eq!(agent.result("r-flaky", BOUND).await["status"], "succeeded");
    let done =
        wait_for(&agent, "flaky", "exited after 3 runs", |c| c["status"] == "exited" && c["run"] == 3).await;
    assert_eq!(done["exit_code"], 3, "{done}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(inspect(&agent, "flaky").await["run"], 3, "no fourth run");
    let log = agent.request("quilt.api.any.containers.logs", &json!({"name": "flaky"})).await;
    assert_eq!(log["ok"]["data"], "run\nrun\nrun\n", "{log}");

    // The waits before runs 2 and 3 follow quick exits: 250 ms, then 500 ms
    // (documented: 250 ms doubled per quick exit in a row, at most 10 s).
    let events = container_events(&agent, "lrrestart", "flaky", Duration::from_secs(2)).await;
    let exited: BTreeMap<u64, u64> = events
        .iter()
        .filter(|event| event["kind"] == "long_running_exited")
        .map(|event| (event["run"].as_u64().unwrap(), event["exited_at_unix_ms"].as_u64().unwrap()))
        .collect();
    let started: BTreeMap<u64, u64> = events
        .iter()
        .filter(|event| event["kind"] == "long_running_started")
        .map(|event| {
            (event["identity"]["run"].as_u64().unwrap(), event["started_at_unix_ms"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(exited.keys().copied().collect::<Vec<_>>(), [1, 2, 3], "{events:?}");
    for (run, expected) in [(2u64, 250u64), (3, 500)] {
        let waited = started[&run] - exited[&(run - 1)];
        assert!(
            (expected..expected + 1500).contains(&waited),
            "run {run} started {waited} ms after run {} ended; expected {expected} ms (+ start-up)",
            run - 1
        );
    }

    // always: restarted after a clean exit too, until stopped.
    agent.submit(&create_task("r-always", "always", &["sh", "-c", "echo tick; sleep 0.2"], "always")).await;
    assert_eq!(agent.result("r-always", BOUND).await["status"], "succeeded");
    wait_for(&agent, "always", "restarted twice", |c| c["run"].as_u64().unwrap_or(0) >= 3).await;
    let stopped =
        agent.request("quilt.api.any.containers.stop", &json!({"name": "always", "grace_s": 1})).await;
    assert_eq!(stopped["ok"]["status"], "stopped", "{stopped}");
    let run = stopped["ok"]["run"].clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(inspect(&agent, "always").await["run"], run, "a stopped container is not restarted");

    // no: one run, its status kept.
    agent.submit(&create_task("r-no", "once", &["sh", "-c", "exit 4"], "no")).await;
    assert_eq!(agent.result("r-no", BOUND).await["status"], "succeeded");
    let once = wait_for(&agent, "once", "exited", |c| c["status"] == "exited").await;
    assert_eq!((once["run"].clone(), once["exit_code"].clone()), (json!(1), json!(4)));

    // A stopped container is started again by a long-running task for it.
    agent.submit(&create_task("r-always-2", "always", &["sh", "-c", "echo tick; sleep 0.2"], "always")).await;
    assert_eq!(agent.result("r-always-2", BOUND).await["status"], "succeeded");
    wait_for(&agent, "always", "running again", |c| c["run"].as_u64() > run.as_u64()).await;

    for name in ["flaky", "always", "once"] {
        remove(&agent, name).await;
    }
    assert!(worker.terminate().success());
    assert_worker_left_nothing("lrrestart", &data);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_with_9_readopts_its_20_containers_and_records_one_that_ended() {
    let Setup { dir: _dir, broker, data } = Setup::new("lr-adopt").await;
    let _guard = LongRunningGuard { worker_id: "lradopt".into() };
    let mut worker = Worker::start(&data, &broker.url, "lradopt", &["--concurrency", "8"]);
    let agent = Agent::connect(&broker.url).await;

    for index in 0..20 {
        let name = format!("svc{index}");
        let script = format!("echo hello {index}; exec sleep 100000");
        agent.submit(&create_task(&format!("a-{index}"), &name, &["sh", "-c", &script], "no")).await;
    }
    let mut pids = BTreeMap::new();
    for index in 0..20 {
        assert_eq!(agent.result(&format!("a-{index}"), BOUND).await["status"], "succeeded");
        let name = format!("svc{index}");
        let summary = wait_for(&agent, &name, "logging", |c| c["status"] == "running").await;
        pids.insert(name, summary["pid"].as_i64().unwrap());
    }

    worker.kill9();
    // While the worker is down, one container's command is killed.
    let victim = pids["svc7"];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    // Its shim reaps it and records how it ended.
    let deadline = Instant::now() + BOUND;
    while std::path::Path::new(&format!("/proc/{victim}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{victim}/stat")).unwrap_or_default();
        assert!(Instant::now() < deadline, "svc7's first process is still there: {stat}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The others still run, though their worker is gone.
    for (name, pid) in &pids {
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        assert_eq!(alive, name != "svc7", "{name} (pid {pid})");
    }

    worker.restart(&[]);
    assert!(worker.log_text().contains("adopted a running long-running container"));
    let list = agent.request("quilt.api.lradopt.containers.list", &json!("")).await;
    let list = list["ok"].as_array().unwrap().clone();
    assert_eq!(list.len(), 20, "{list:?}");
    for container in &list {
        let name = container["name"].as_str().unwrap();
        if name == "svc7" {
            assert_eq!(container["status"], "exited", "{container}");
            assert_eq!(container["signal"], 9, "{container}");
            assert_eq!(container["run"], 1, "restart \"no\": not restarted");
        } else {
            assert_eq!(container["status"], "running", "{container}");
            assert_eq!(container["pid"], pids[name], "adopted, not started again: {container}");
        }
    }
    // None duplicated: each container's cgroup holds exactly its first process.
    for (name, pid) in &pids {
        let cgroup = ["/sys/fs/cgroup/pids/quilt", "/sys/fs/cgroup/quilt"]
            .iter()
            .map(|parent| format!("{parent}/lradopt.{name}/init/cgroup.procs"))
            .find(|path| std::path::Path::new(path).exists() || name == "svc7")
            .unwrap();
        let procs = std::fs::read_to_string(&cgroup).unwrap_or_default();
        let expected = if name == "svc7" { String::new() } else { format!("{pid}\n") };
        assert_eq!(procs, expected, "{cgroup}");
    }
    // Logs intact and still written to: the first line, then an exec's echo after the restart.
    for index in 0..20 {
        let name = format!("svc{index}");
        let log = agent.request("quilt.api.any.containers.logs", &json!({"name": name, "tail": 5})).await;
        assert_eq!(log["ok"]["data"], format!("hello {index}\n"), "{log}");
    }
    let exec = json!({"id": "a-exec", "command": ["sh", "-c", "echo after restart > /proc/1/fd/1; echo ok"], "container": {"target": "svc3"}});
    agent.submit(&exec).await;
    assert_eq!(agent.result("a-exec", BOUND).await["stdout"], "ok\n");
    let log = agent.request("quilt.api.any.containers.logs", &json!({"name": "svc3"})).await;
    assert_eq!(log["ok"]["data"], "hello 3\nafter restart\n", "{log}");

    for index in 0..20 {
        remove(&agent, &format!("svc{index}")).await;
    }
    assert!(worker.terminate().success());
    assert_worker_left_nothing("lradopt", &data);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn names_are_unique_across_workers_and_tasks_reach_the_owner() {
    let Setup { dir, broker, data } = Setup::new("lr-fleet").await;
    let _guards =
        [LongRunningGuard { worker_id: "owner".into() }, LongRunningGuard { worker_id: "other".into() }];
    let mut owner = Worker::start(&data, &broker.url, "owner", &[]);
    let agent = Agent::connect(&broker.url).await;

    // Created on the owner (a task routed to it), before the other worker exists.
    let db = create_task("f-create", "db", &["sh", "-c", "echo db up; exec sleep 100000"], "no");
    agent.submit_to("quilt.tasks.worker.owner", &db).await;
    assert_eq!(agent.result("f-create", BOUND).await["worker_id"], "owner");

    let other_data = dir.path.join("other");
    quilt_tests::pipeline::import_busybox(&other_data);
    let mut other = Worker::start(&other_data, &broker.url, "other", &[]);

    // Routed to the other worker: it forwards to the owner, which runs it.
    for index in 0..5 {
        let exec = exec_task(&format!("f-exec-{index}"), "db", &["sh", "-c", "echo $(hostname) $((6 * 7))"]);
        agent.submit_to("quilt.tasks.worker.other", &exec).await;
    }
    // Through the shared queue: whoever takes it, the owner answers.
    for index in 5..15 {
        agent
            .submit(&exec_task(
                &format!("f-exec-{index}"),
                "db",
                &["sh", "-c", "echo $(hostname) $((6 * 7))"],
            ))
            .await;
    }
    for index in 0..15 {
        let result = agent.result(&format!("f-exec-{index}"), BOUND).await;
        assert_eq!(
            (result["worker_id"].clone(), result["stdout"].clone()),
            (json!("owner"), json!("quilt 42\n")),
            "{result}"
        );
    }
    assert!(
        other.log_text().contains("task forwarded to the owner of its container"),
        "{}",
        other.log_text()
    );

    // Creating "db" again with another definition is refused, on either worker.
    let clash = create_task("f-clash", "db", &["sh", "-c", "echo imposter; exec sleep 100000"], "no");
    agent.submit_to("quilt.tasks.worker.other", &clash).await;
    let refused = agent.result("f-clash", BOUND).await;
    assert_eq!(
        (refused["status"].clone(), refused["error"]["kind"].clone()),
        (json!("rejected"), json!("name_conflict")),
        "{refused}"
    );
    let clash = json!({"id": "f-clash-2", "image": "busybox", "command": ["true"], "container": {"mode": "long_running", "name": "db", "restart": "always"}});
    agent.submit_to("quilt.tasks.worker.owner", &clash).await;
    assert_eq!(agent.result("f-clash-2", BOUND).await["error"]["kind"], "name_conflict");
    // The same definition again is a reuse, answered by the owner.
    let again = create_task("f-again", "db", &["sh", "-c", "echo db up; exec sleep 100000"], "no");
    agent.submit_to("quilt.tasks.worker.other", &again).await;
    let reused = agent.result("f-again", BOUND).await;
    assert_eq!(
        (reused["status"].clone(), reused["worker_id"].clone()),
        (json!("succeeded"), json!("owner")),
        "{reused}"
    );

    // The control API on the other worker relays to the owner.
    let logs = agent.request("quilt.api.any.containers.logs", &json!({"name": "db"})).await;
    assert_eq!(logs["ok"]["data"], "db up\n", "{logs}");
    let own_only = agent.request("quilt.api.other.containers.logs", &json!({"name": "db"})).await;
    assert_eq!(own_only["error"]["kind"], "not_found", "{own_only}");
    // Forgetting a name whose owner answers is refused.
    let forget = agent.request("quilt.api.other.containers.forget", &json!({"name": "db"})).await;
    assert_eq!(forget["error"]["kind"], "bad_request", "{forget}");

    // The owner is gone for good: its name is forgotten and created elsewhere.
    owner.kill9();
    let forget = agent.request("quilt.api.other.containers.forget", &json!({"name": "db"})).await;
    assert_eq!(forget["ok"], "db", "{forget}");
    let moved = create_task("f-moved", "db", &["sh", "-c", "echo moved; exec sleep 100000"], "no");
    agent.submit(&moved).await;
    assert_eq!(agent.result("f-moved", BOUND).await["worker_id"], "other");
    agent.submit(&exec_task("f-after", "db", &["echo", "here"])).await;
    assert_eq!(agent.result("f-after", BOUND).await["worker_id"], "other");
    // When the old owner comes back after all, its copy gives way.
    owner.restart(&[]);
    assert!(
        owner.log_text().contains("now belongs to another worker; removing this copy"),
        "{}",
        owner.log_text()
    );
    let list = agent.request("quilt.api.owner.containers.list", &json!("")).await;
    assert_eq!(list["ok"], json!([]), "{list}\n{}", owner.log_text());
    let registrations = agent.jetstream.get_key_value("quilt_containers").await.unwrap();
    let registration: Value =
        serde_json::from_slice(&registrations.get("db").await.unwrap().unwrap()).unwrap();
    assert_eq!(registration["worker_id"], "other");

    remove(&agent, "db").await;
    assert_eq!(registrations.get("db").await.unwrap(), None, "the name is free again");
    assert!(other.terminate().success());
    assert!(owner.terminate().success());
    assert_worker_left_nothing("owner", &data);
    assert_worker_left_nothing("other", &other_data);
    broker.stop().await;
}
