use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::*;

/// The model projection of the property test: a map of counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Change {
    Set { key: String, value: i64 },
    Add { key: String, delta: i64 },
    Delete { key: String },
}

#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Counters(BTreeMap<String, i64>);

impl Projection for Counters {
    type Event = Change;
    fn apply(&mut self, _seq: u64, event: &Change) {
        fold(&mut self.0, event);
    }
}

fn fold(map: &mut BTreeMap<String, i64>, event: &Change) {
    match event {
        Change::Set { key, value } => {
            map.insert(key.clone(), *value);
        }
        Change::Add { key, delta } => *map.entry(key.clone()).or_default() += delta,
        Change::Delete { key } => {
            map.remove(key);
        }
    }
}

/// splitmix64: deterministic, good enough to pick events and cut points.
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn change(&mut self) -> Change {
        let key = format!("k{}", self.below(8));
        match self.below(3) {
            0 => Change::Set { key, value: self.below(1000) as i64 - 500 },
            1 => Change::Add { key, delta: self.below(21) as i64 - 10 },
            _ => Change::Delete { key },
        }
    }
}

fn all_events<E: Serialize + DeserializeOwned + Send + 'static>(log: &EventLog<E>) -> Vec<(u64, E)> {
    let mut events = Vec::new();
    log.replay(1, |seq, event| events.push((seq, event))).unwrap();
    events
}

#[test]
fn appended_events_replay_in_order_with_their_time() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::<Change>::open(&dir.path().join("events.redb")).unwrap();
    let changes = [
        Change::Set { key: "a".into(), value: 1 },
        Change::Add { key: "a".into(), delta: 2 },
        Change::Delete { key: "b".into() },
    ];
    for (index, change) in changes.iter().enumerate() {
        assert_eq!(log.append_blocking(change.clone()).unwrap(), index as u64 + 1);
    }
    assert_eq!(log.last_seq(), 3);
    let replayed = all_events(&log);
    assert_eq!(
        replayed,
        changes.iter().cloned().enumerate().map(|(i, c)| (i as u64 + 1, c)).collect::<Vec<_>>()
    );
    let mut tail = Vec::new();
    assert_eq!(log.replay(3, |seq, _| tail.push(seq)).unwrap(), 3);
    assert_eq!(tail, [3]);
    let before = now_ms();
    let mut times = Vec::new();
    log.scan(1, |recorded| times.push(recorded.at_ms)).unwrap();
    assert!(times.iter().all(|&at| at <= before && at + 60_000 > before), "{times:?} vs {before}");
}

#[test]
fn sequence_numbers_keep_growing_across_reopen_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    {
        let log = EventLog::<u32>::open(&path).unwrap();
        assert_eq!(log.append_blocking(10).unwrap(), 1);
        assert_eq!(log.append_blocking(11).unwrap(), 2);
    }
    {
        let log = EventLog::<u32>::open(&path).unwrap();
        assert_eq!(log.last_seq(), 2);
        assert_eq!(log.append_blocking(12).unwrap(), 3);
        // A snapshot of everything leaves no event to read the sequence from.
        log.snapshot_blocking(3, &"state").unwrap();
        assert!(all_events(&log).is_empty());
    }
    let log = EventLog::<u32>::open(&path).unwrap();
    assert_eq!(log.last_seq(), 3);
    assert_eq!(log.append_blocking(13).unwrap(), 4);
    assert_eq!(all_events(&log), [(4, 13)]);
    assert_eq!(log.load_snapshot::<String>().unwrap(), Some((3, "state".to_string())));
}

#[test]
fn snapshots_refuse_uncommitted_or_older_points() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::<u32>::open(&dir.path().join("events.redb")).unwrap();
    for n in 0..5 {
        log.append_blocking(n).unwrap();
    }
    let ahead = log.snapshot_blocking(6, &0).unwrap_err();
    assert!(matches!(ahead, EventLogError::SnapshotAhead { up_to: 6, last: 5 }), "{ahead}");
    log.snapshot_blocking(4, &4).unwrap();
    let behind = log.snapshot_blocking(2, &2).unwrap_err();
    assert_eq!(behind.kind(), "snapshot_behind");
    assert_eq!(log.load_snapshot::<u32>().unwrap(), Some((4, 4)));
    assert_eq!(all_events(&log), [(5, 4)]);
}

#[test]
fn unknown_schema_version_is_an_error_naming_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    {
        let log = EventLog::<u32>::open(&path).unwrap();
        log.append_blocking(1).unwrap();
        log.append_blocking(2).unwrap();
    }
    {
        // A record written by a future build.
        let db = Database::open(&path).unwrap();
        let transaction = db.begin_write().unwrap();
        transaction
            .open_table(EVENTS)
            .unwrap()
            .insert(2, [9u8, 0, 0, 0, 0, 0, 0, 0, 0, b'2'].as_slice())
            .unwrap();
        transaction.commit().unwrap();
    }
    let log = EventLog::<u32>::open(&path).unwrap();
    let mut seen = Vec::new();
    let error = log.replay(1, |seq, _| seen.push(seq)).unwrap_err();
    assert!(matches!(error, EventLogError::UnknownVersion { seq: 2, version: 9 }), "{error}");
    assert_eq!(error.kind(), "unknown_version");
    assert!(error.to_string().contains("event 2"), "{error}");
    assert_eq!(seen, [1]);
    let wrong_type = EventLog::<String>::open(&dir.path().join("other.redb")).unwrap();
    wrong_type.append_blocking("not a number".into()).unwrap();
    drop(wrong_type);
    let numbers = EventLog::<u32>::open(&dir.path().join("other.redb")).unwrap();
    assert!(matches!(numbers.replay(1, |_, _| {}).unwrap_err(), EventLogError::Decode { seq: 1, .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_all_committed_in_fewer_transactions() {
    const PRODUCERS: u32 = 64;
    const EACH: u32 = 20;
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::<(u32, u32)>::open(&dir.path().join("events.redb")).unwrap();
    let mut tasks = Vec::new();
    for producer in 0..PRODUCERS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for n in 0..EACH {
                answers.push((log.append((producer, n)).await.unwrap(), (producer, n)));
            }
            answers
        }));
    }
    let mut answered = BTreeMap::new();
    for task in tasks {
        for (seq, event) in task.await.unwrap() {
            assert!(answered.insert(seq, event).is_none(), "sequence {seq} answered twice");
        }
    }
    let total = u64::from(PRODUCERS * EACH);
    assert_eq!(answered.keys().copied().collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
    // Each answer names the event stored at that sequence.
    assert_eq!(all_events(&log), answered.into_iter().collect::<Vec<_>>());
    let commits = log.commits();
    assert!(commits < total, "{commits} transactions for {total} events: no group commit");
}

#[test]
fn compaction_keeps_the_file_bounded() {
    const EVENTS_TOTAL: u64 = 100_000;
    const SNAPSHOT_EVERY: u64 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    let log = EventLog::<Change>::open(&path).unwrap();
    let mut prng = Prng(7);
    let mut state = Counters::default();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut seq = 0;
    let mut largest = 0;
    while seq < EVENTS_TOTAL {
        // 100 producers at a time, so group commit keeps the test quick.
        let changes: Vec<Change> = (0..100).map(|_| prng.change()).collect();
        let answers =
            runtime.block_on(futures_util::future::join_all(changes.iter().map(|c| log.append(c.clone()))));
        for (change, answer) in changes.iter().zip(answers) {
            seq = answer.unwrap();
            state.apply(seq, change);
        }
        if seq % SNAPSHOT_EVERY == 0 {
            log.snapshot_blocking(seq, &state).unwrap();
        }
        largest = largest.max(std::fs::metadata(&path).unwrap().len());
    }
    // Without compaction the file grows by ~90 bytes per event (8.9 MB for
    // these 100k, measured). With it at most 10k events are live (~0.9 MB)
    // and pages freed by a compaction are reused by the next 10k, so the file
    // peaks near 1.1 MB; 3 MiB leaves room for redb's allocation rounding
    // while still catching a log that is not compacted (a third of 8.9 MB).
    assert!(largest < 3 << 20, "file grew to {largest} bytes");
    let (rebuilt, last) = rebuild::<Counters, _>(&log).unwrap();
    assert_eq!((rebuilt, last), (state, EVENTS_TOTAL));
}

#[test]
fn rebuild_from_snapshot_and_tail_equals_the_fold_of_every_event() {
    for seed in 0..8 {
        let dir = tempfile::tempdir().unwrap();
        let compacted_path = dir.path().join("compacted.redb");
        let mut compacted = EventLog::<Change>::open(&compacted_path).unwrap();
        let full = EventLog::<Change>::open(&dir.path().join("full.redb")).unwrap();
        let mut prng = Prng(seed);
        let mut model = BTreeMap::new();
        let count = 200 + prng.below(300);
        for n in 1..=count {
            let change = prng.change();
            fold(&mut model, &change);
            assert_eq!(compacted.append_blocking(change.clone()).unwrap(), n);
            full.append_blocking(change).unwrap();
            match prng.below(40) {
                // Snapshot what the log itself rebuilds, as a worker would.
                0 => {
                    let (state, last) = rebuild::<Counters, _>(&compacted).unwrap();
                    compacted.snapshot_blocking(last, &state).unwrap();
                }
                1 => {
                    drop(compacted);
                    compacted = EventLog::open(&compacted_path).unwrap();
                }
                _ => {}
            }
        }
        let from_snapshot = rebuild::<Counters, _>(&compacted).unwrap();
        let from_full = rebuild::<Counters, _>(&full).unwrap();
        assert_eq!(from_snapshot.0 .0, model, "seed {seed}");
        assert_eq!(from_snapshot, from_full, "seed {seed}");
        assert_eq!(from_snapshot.1, count);
    }
}

#[test]
fn a_failed_snapshot_does_not_fail_the_appends_batched_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::<u32>::open(&dir.path().join("events.redb")).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let outcomes = runtime.block_on(async {
        let appends = futures_util::future::join_all((0..10).map(|n| log.append(n)));
        let snapshot = log.snapshot(1_000, &0);
        tokio::join!(appends, snapshot)
    });
    let seqs: HashSet<u64> = outcomes.0.into_iter().map(Result::unwrap).collect();
    assert_eq!(seqs.len(), 10);
    assert_eq!(outcomes.1.unwrap_err().kind(), "snapshot_ahead");
}

/// Storage whose fsync fails on demand, like a disk going bad under load.
#[derive(Debug)]
struct FailingSync {
    inner: redb::backends::InMemoryBackend,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl redb::StorageBackend for FailingSync {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.inner.write(offset, data)
    }
}

#[test]
fn a_failed_commit_answers_every_waiter_of_its_batch_with_the_error() {
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let backend = FailingSync { inner: redb::backends::InMemoryBackend::new(), fail: Arc::clone(&fail) };
    let db = redb::Builder::new().create_with_backend(backend).unwrap();
    let log = EventLog::<u32>::start(db).unwrap();
    assert_eq!(log.append_blocking(0).unwrap(), 1);
    fail.store(true, Ordering::Relaxed);
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let outcomes = runtime.block_on(futures_util::future::join_all((1..=20).map(|n| log.append(n))));
    for outcome in outcomes {
        let error = outcome.unwrap_err();
        assert_eq!(error.kind(), "commit", "{error}");
        assert!(std::error::Error::source(&error).is_some());
    }
    assert_eq!(log.last_seq(), 1);
    assert_eq!(log.commits(), 1);
}

#[tokio::test]
async fn queued_appends_are_durable_in_order_once_a_later_append_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    {
        let log = EventLog::<u64>::open(&path).unwrap();
        let mut answers = Vec::new();
        for value in 0..100u64 {
            answers.push(log.append_queued(value).unwrap());
        }
        let last = log.append(100).await.unwrap();
        assert_eq!(last, 101);
        // The queued ones were answered too, in order.
        for (index, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.await.unwrap().unwrap(), index as u64 + 1);
        }
    }
    let log = EventLog::<u64>::open(&path).unwrap();
    let mut seen = Vec::new();
    log.replay(1, |seq, value| seen.push((seq, value))).unwrap();
    assert_eq!(seen, (0..=100u64).map(|value| (value + 1, value)).collect::<Vec<_>>());
}
