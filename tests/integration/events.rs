//! The event log survives `kill -9`: a child process appends as fast as it
//! can, reporting each committed sequence number; it is killed at a random
//! point, and every event it reported must be in the reopened log, intact,
//! with sequence numbers contiguous from 1.
//!
//! The child is this test binary itself, running only
//! [`child_appends_until_killed`] with `QUILT_EVENTS_CHILD` set to the log's
//! path. Without that variable the child test returns at once, so a normal
//! run passes it trivially (it is not an ignored test: it must stay
//! selectable by name for the parent to run it).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use quilt::events::EventLog;

/// An event the child appends: (round * 1000 + producer, counter, payload).
type Event = (u32, u64, String);

const CHILD_VARIABLE: &str = "QUILT_EVENTS_CHILD";
const ROUND_VARIABLE: &str = "QUILT_EVENTS_CHILD_ROUND";
const CHILD_TEST: &str = "events::child_appends_until_killed";
const PRODUCERS: u32 = 8;
const ROUNDS: u64 = 10;

fn payload(source: u32, counter: u64) -> String {
    format!("{source}:{counter}:").repeat(4)
}

/// The child half: appends from several producers until killed. Does
/// nothing unless started by [`committed_events_survive_kill_9`].
#[test]
fn child_appends_until_killed() {
    let Some(path) = std::env::var_os(CHILD_VARIABLE) else { return };
    let round: u32 = std::env::var(ROUND_VARIABLE).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    runtime.block_on(async move {
        let log = EventLog::<Event>::open(Path::new(&path)).unwrap();
        let mut producers = Vec::new();
        for producer in 0..PRODUCERS {
            let log = log.clone();
            producers.push(tokio::spawn(async move {
                let source = round * 1000 + producer;
                for counter in 0.. {
                    let seq = log.append((source, counter, payload(source, counter))).await.unwrap();
                    // Reported only once committed; one write per line so a
                    // kill cuts at most the last, unterminated line.
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(format!("committed {seq} {source} {counter}\n").as_bytes()).unwrap();
                    stdout.flush().unwrap();
                }
            }));
        }
        for producer in producers {
            producer.await.unwrap();
        }
    });
}

#[test]
fn committed_events_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut prng = seed;
    let mut reported: BTreeMap<u64, (u32, u64)> = BTreeMap::new();
    let mut last_seq = 0;
    for round in 0..ROUNDS {
        prng = prng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let kill_after = Duration::from_millis(5 + (prng >> 33) % 200);
        let lines = run_child_until_killed(&path, round, kill_after, seed);
        for line in lines {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let ["committed", seq, source, counter] = fields[..] {
                let seq: u64 = seq.parse().unwrap();
                let previous = reported.insert(seq, (source.parse().unwrap(), counter.parse().unwrap()));
                assert!(previous.is_none(), "seed {seed}: sequence {seq} reported twice");
            }
        }

        let log = EventLog::<Event>::open(&path).unwrap();
        let mut stored = BTreeMap::new();
        log.scan(1, |recorded| {
            stored.insert(recorded.seq, recorded.event);
        })
        .unwrap();
        let count = stored.len() as u64;
        assert_eq!(stored.keys().next_back().copied().unwrap_or(0), count, "seed {seed}: holes in the log");
        assert_eq!(log.last_seq(), count, "seed {seed}");
        assert!(count > last_seq, "seed {seed}, round {round}: the child committed nothing");
        last_seq = count;
        for (seq, (source, counter)) in &reported {
            let event = stored.get(seq).unwrap_or_else(|| panic!("seed {seed}: committed event {seq} lost"));
            assert_eq!(event, &(*source, *counter, payload(*source, *counter)), "seed {seed}: event {seq}");
        }
    }
    assert!(reported.len() as u64 >= ROUNDS, "seed {seed}: only {} events reported", reported.len());
}

/// Runs the child on `path`, kills it with SIGKILL `kill_after` its first
/// committed event, and returns the complete lines it printed.
fn run_child_until_killed(path: &Path, round: u64, kill_after: Duration, seed: u64) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD_VARIABLE, path)
        .env(ROUND_VARIABLE, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (sender, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || loop {
        let mut line = String::new();
        match stdout.read_line(&mut line) {
            // A line cut by the kill has no newline: the child did not finish
            // reporting it, so it is not counted.
            Ok(n) if n > 0 && line.ends_with('\n') => {
                if sender.send(line).is_err() {
                    return;
                }
            }
            _ => return,
        }
    });
    let mut collected = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !collected.iter().any(|line: &String| line.starts_with("committed ")) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(remaining) {
            Ok(line) => collected.push(line),
            Err(_) => {
                let _ = child.kill();
                let output = child.wait_with_output().unwrap();
                panic!(
                    "seed {seed}: the child reported nothing within 60 s: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
    std::thread::sleep(kill_after);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGKILL),
        "seed {seed}: the child ended on its own: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    reader.join().unwrap();
    collected.extend(lines.try_iter());
    collected
}
