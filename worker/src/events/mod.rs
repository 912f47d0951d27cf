//! The event log: every state transition of a task or container, appended
//! durably to a redb file, and the projections folded from it.
//!
//! It owns one redb file and its two tables: `events` (sequence number ->
//! record, sequence numbers start at 1 and only grow, even across snapshots
//! and restarts) and `snapshots` (the sequence a snapshot covers -> the
//! serialized projection; only the newest is kept). It knows nothing of
//! containers, cgroups or NATS: callers decide what an event is and when a
//! side effect may happen.
//!
//! Durability, in plain words: when [`EventLog::append`] returns a sequence
//! number, the event is on disk (redb `Durability::Immediate`, two-phase
//! commit, see SECURITY.md "Delivery and state"), and a `kill -9` or a power
//! cut at any later point leaves it readable. An append answered with an
//! error was not acknowledged: it may still be on disk if the commit failed
//! after its data reached the file (a failed fsync), so a caller that retries
//! may find it twice: events should be facts ("task t finished with 0") that a
//! projection can fold twice without harm. A snapshot and the deletion of the
//! events it covers are one transaction, so a crash leaves both or neither.
//!
//! Ordering rule (DESIGN.md "Event log"): a side effect that matters (result
//! published, task acked, container removed) is recorded here before or right
//! after it happens, so that after a crash exactly one outcome is visible: a
//! result stored but not yet published is republished, never recomputed. The
//! log gives callers the primitive for that: an append is answered only once
//! it is durable, and events are replayed in sequence order.
//!
//! Why a dedicated writer thread: redb is synchronous and allows one write
//! transaction at a time, and each durable commit costs a couple of fsyncs
//! (~200 µs here, PERF.md). One OS thread owns all writes and puts every
//! append waiting at that moment into one transaction (group commit), so the
//! fsync cost is shared by all producers instead of serializing them, and no
//! tokio worker thread ever blocks on an fsync. Reads ([`EventLog::replay`],
//! [`EventLog::load_snapshot`]) use redb's snapshot-isolated read
//! transactions on the caller's thread; they block, so async callers run them
//! in `spawn_blocking`.
//!
//! Each record carries a schema version (see `record.rs`), so a later build
//! can migrate old events; this build refuses versions it does not know with
//! an error naming the sequence number.

mod record;
mod writer;

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use record::EVENT_VERSION;
use writer::{Command, Counters};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");

/// Failures of the event log, named after the step that failed. redb's
/// errors are shared (`Arc`) because one failed commit answers every
/// producer of its batch.
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    /// Opening or creating the redb file.
    #[error("opening event log {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// Starting the writer thread.
    #[error("starting the event log writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// Beginning a read or write transaction.
    #[error("beginning an event log transaction: {0}")]
    Begin(#[source] Arc<redb::TransactionError>),
    /// Opening one of the log's tables.
    #[error("opening an event log table: {0}")]
    Table(#[source] Arc<redb::TableError>),
    /// Writing an event or a snapshot into the transaction.
    #[error("writing to the event log: {0}")]
    Insert(#[source] Arc<redb::StorageError>),
    /// Deleting the events a snapshot covers.
    #[error("compacting the event log: {0}")]
    Compact(#[source] Arc<redb::StorageError>),
    /// Making the transaction durable.
    #[error("committing to the event log: {0}")]
    Commit(#[source] Arc<redb::CommitError>),
    /// Reading the log's tables.
    #[error("reading the event log: {0}")]
    Read(#[source] Arc<redb::StorageError>),
    /// Serializing an event or a snapshot.
    #[error("serializing for the event log: {0}")]
    Encode(#[source] serde_json::Error),
    /// A stored event that does not parse as this build's event type.
    #[error("event {seq} does not decode: {source}")]
    Decode {
        /// Its sequence number.
        seq: u64,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A stored event shorter than its header.
    #[error("event {seq} is truncated")]
    Truncated {
        /// Its sequence number.
        seq: u64,
    },
    /// A stored event of a schema version this build does not know.
    #[error("event {seq} has schema version {version}, this build reads version {EVENT_VERSION}")]
    UnknownVersion {
        /// Its sequence number.
        seq: u64,
        /// The version it carries.
        version: u8,
    },
    /// A stored snapshot that does not parse as the projection asked for.
    #[error("snapshot up to {up_to} does not decode: {source}")]
    SnapshotDecode {
        /// The sequence it covers.
        up_to: u64,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A stored snapshot of a format this build does not know.
    #[error("snapshot up to {up_to} has format version {version}")]
    UnknownSnapshotVersion {
        /// The sequence it covers.
        up_to: u64,
        /// The version it carries.
        version: u8,
    },
    /// A snapshot claiming events not yet committed.
    #[error("snapshot up to {up_to} is ahead of the log, which ends at {last}")]
    SnapshotAhead {
        /// The sequence the snapshot claimed to cover.
        up_to: u64,
        /// The log's last sequence.
        last: u64,
    },
    /// A snapshot older than the one stored (its events are gone).
    #[error("snapshot up to {up_to} is older than the stored one, up to {current}")]
    SnapshotBehind {
        /// The sequence the snapshot claimed to cover.
        up_to: u64,
        /// The stored snapshot's sequence.
        current: u64,
    },
    /// The writer thread is gone (it panicked); nothing more can be appended.
    #[error("the event log writer thread is gone")]
    WriterGone,
}

impl EventLogError {
    /// A stable, machine-readable name of the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            EventLogError::Open { .. } => "open",
            EventLogError::Spawn(_) => "spawn",
            EventLogError::Begin(_) => "begin",
            EventLogError::Table(_) => "table",
            EventLogError::Insert(_) => "insert",
            EventLogError::Compact(_) => "compact",
            EventLogError::Commit(_) => "commit",
            EventLogError::Read(_) => "read",
            EventLogError::Encode(_) => "encode",
            EventLogError::Decode { .. } => "decode",
            EventLogError::Truncated { .. } => "truncated",
            EventLogError::UnknownVersion { .. } => "unknown_version",
            EventLogError::SnapshotDecode { .. } => "snapshot_decode",
            EventLogError::UnknownSnapshotVersion { .. } => "unknown_snapshot_version",
            EventLogError::SnapshotAhead { .. } => "snapshot_ahead",
            EventLogError::SnapshotBehind { .. } => "snapshot_behind",
            EventLogError::WriterGone => "writer_gone",
        }
    }
}

/// One event as stored, with its sequence number and append time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded<E> {
    /// Its sequence number (from 1).
    pub seq: u64,
    /// When it was appended, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The event.
    pub event: E,
}

/// A state folded from events: pure, deterministic, serializable so it can
/// be snapshotted.
pub trait Projection: Default + Serialize + DeserializeOwned {
    /// The events it folds.
    type Event;
    /// Folds one event in; must not fail or do I/O.
    fn apply(&mut self, seq: u64, event: &Self::Event);
}

/// A handle on the event log; clones are cheap and share the one writer.
/// The file is closed when the last handle is dropped (after the writer
/// finished what it was given).
pub struct EventLog<E> {
    shared: Arc<Shared>,
    _event: PhantomData<fn(E) -> E>,
}

impl<E> Clone for EventLog<E> {
    fn clone(&self) -> Self {
        EventLog { shared: Arc::clone(&self.shared), _event: PhantomData }
    }
}

struct Shared {
    db: Arc<Database>,
    commands: Option<mpsc::UnboundedSender<Command>>,
    counters: Arc<Counters>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop; waiting for it closes
        // the file, so the log can be reopened right away.
        drop(self.commands.take());
        if let Some(writer) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // A panicked writer already answered nobody; nothing to report.
            let _ = writer.join();
        }
    }
}

impl<E: Serialize + DeserializeOwned + Send + 'static> EventLog<E> {
    /// Opens the log at `path`, creating it if missing, and starts its writer.
    pub fn open(path: &Path) -> Result<Self, EventLogError> {
        let db = Database::create(path)
            .map_err(|source| EventLogError::Open { path: path.to_path_buf(), source })?;
        Self::start(db)
    }

    /// Creates the tables if missing and starts the writer on `db`.
    fn start(db: Database) -> Result<Self, EventLogError> {
        let db = Arc::new(db);
        // Create the tables once, so readers never meet a missing one.
        let transaction = db.begin_write().map_err(|e| EventLogError::Begin(Arc::new(e)))?;
        let last_seq = {
            let events = transaction.open_table(EVENTS).map_err(|e| EventLogError::Table(Arc::new(e)))?;
            let snapshots =
                transaction.open_table(SNAPSHOTS).map_err(|e| EventLogError::Table(Arc::new(e)))?;
            let last_event =
                events.last().map_err(|e| EventLogError::Read(Arc::new(e)))?.map(|(k, _)| k.value());
            let last_snapshot =
                snapshots.last().map_err(|e| EventLogError::Read(Arc::new(e)))?.map(|(k, _)| k.value());
            // After a snapshot compacted every event, the snapshot still
            // remembers where the sequence stood.
            last_event.unwrap_or(0).max(last_snapshot.unwrap_or(0))
        };
        transaction.commit().map_err(|e| EventLogError::Commit(Arc::new(e)))?;
        let counters = Arc::new(Counters { commits: AtomicU64::new(0), last_seq: AtomicU64::new(last_seq) });
        let (sender, receiver) = mpsc::unbounded_channel();
        let writer = std::thread::Builder::new()
            .name("quilt-event-log".into())
            .spawn({
                let db = Arc::clone(&db);
                let counters = Arc::clone(&counters);
                move || writer::run(db, counters, receiver)
            })
            .map_err(EventLogError::Spawn)?;
        Ok(EventLog {
            shared: Arc::new(Shared {
                db,
                commands: Some(sender),
                counters,
                writer: Mutex::new(Some(writer)),
            }),
            _event: PhantomData,
        })
    }

    /// Appends `event`; returns its sequence number once it is durable.
    /// The channel is unbounded: each producer waits for its answer, so at
    /// most one append per producer is queued.
    pub async fn append(&self, event: E) -> Result<u64, EventLogError> {
        let answer = self.submit(&event)?;
        answer.await.map_err(|_| EventLogError::WriterGone)?
    }

    /// Queues `event` without waiting for it to be durable; the returned
    /// receiver answers with its sequence number once it is (drop it if
    /// the answer does not matter). Appends are committed in the order they
    /// are queued, and a failed commit fails every later append, so once
    /// any later [`EventLog::append`] returns `Ok`, this event is durable
    /// too: a caller can queue facts whose order matters but whose own
    /// durability only matters together with the next awaited one (one
    /// group commit instead of several).
    pub fn append_queued(
        &self,
        event: E,
    ) -> Result<oneshot::Receiver<Result<u64, EventLogError>>, EventLogError> {
        self.submit(&event)
    }

    /// [`EventLog::append`] for threads outside the async runtime (panics
    /// if called from within it, like any blocking wait).
    pub fn append_blocking(&self, event: E) -> Result<u64, EventLogError> {
        let answer = self.submit(&event)?;
        answer.blocking_recv().map_err(|_| EventLogError::WriterGone)?
    }

    fn submit(&self, event: &E) -> Result<oneshot::Receiver<Result<u64, EventLogError>>, EventLogError> {
        let record = record::encode_event(now_ms(), event)?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Append { record, reply })?;
        Ok(answer)
    }

    fn send(&self, command: Command) -> Result<(), EventLogError> {
        let sender = self.shared.commands.as_ref().ok_or(EventLogError::WriterGone)?;
        sender.send(command).map_err(|_| EventLogError::WriterGone)
    }

    /// Stores `state` as the projection of every event up to `up_to` and
    /// deletes those events, in one durable transaction.
    pub async fn snapshot<S: Serialize>(&self, up_to: u64, state: &S) -> Result<(), EventLogError> {
        let answer = self.submit_snapshot(up_to, state)?;
        answer.await.map_err(|_| EventLogError::WriterGone)?
    }

    /// [`EventLog::snapshot`] for threads outside the async runtime.
    pub fn snapshot_blocking<S: Serialize>(&self, up_to: u64, state: &S) -> Result<(), EventLogError> {
        let answer = self.submit_snapshot(up_to, state)?;
        answer.blocking_recv().map_err(|_| EventLogError::WriterGone)?
    }

    fn submit_snapshot<S: Serialize>(
        &self,
        up_to: u64,
        state: &S,
    ) -> Result<oneshot::Receiver<Result<(), EventLogError>>, EventLogError> {
        let state = record::encode_snapshot(state)?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::Snapshot { up_to, state, reply })?;
        Ok(answer)
    }

    /// The newest snapshot: the sequence it covers and the state.
    pub fn load_snapshot<S: DeserializeOwned>(&self) -> Result<Option<(u64, S)>, EventLogError> {
        let transaction = self.shared.db.begin_read().map_err(|e| EventLogError::Begin(Arc::new(e)))?;
        let snapshots = transaction.open_table(SNAPSHOTS).map_err(|e| EventLogError::Table(Arc::new(e)))?;
        let Some((up_to, state)) = snapshots.last().map_err(|e| EventLogError::Read(Arc::new(e)))? else {
            return Ok(None);
        };
        let up_to = up_to.value();
        Ok(Some((up_to, record::decode_snapshot(up_to, state.value())?)))
    }

    /// Calls `f` with every stored event from sequence `from` on, in order;
    /// returns the last sequence seen (or `from - 1` if none). Stops at the
    /// first event that does not decode.
    pub fn replay(&self, from: u64, mut f: impl FnMut(u64, E)) -> Result<u64, EventLogError> {
        let mut last = from.saturating_sub(1);
        self.scan(from, |recorded| {
            last = recorded.seq;
            f(recorded.seq, recorded.event);
        })?;
        Ok(last)
    }

    /// Like [`EventLog::replay`], with each event's append time.
    pub fn scan(&self, from: u64, mut f: impl FnMut(Recorded<E>)) -> Result<(), EventLogError> {
        let transaction = self.shared.db.begin_read().map_err(|e| EventLogError::Begin(Arc::new(e)))?;
        let events = transaction.open_table(EVENTS).map_err(|e| EventLogError::Table(Arc::new(e)))?;
        for entry in events.range(from..).map_err(|e| EventLogError::Read(Arc::new(e)))? {
            let (seq, bytes) = entry.map_err(|e| EventLogError::Read(Arc::new(e)))?;
            let seq = seq.value();
            let (at_ms, event) = record::decode_event(seq, bytes.value())?;
            f(Recorded { seq, at_ms, event });
        }
        Ok(())
    }

    /// The highest sequence number committed (0 for an empty log).
    pub fn last_seq(&self) -> u64 {
        self.shared.counters.last_seq.load(Ordering::Acquire)
    }

    /// Durable transactions committed by this handle's writer since open.
    pub fn commits(&self) -> u64 {
        self.shared.counters.commits.load(Ordering::Relaxed)
    }
}

/// Rebuilds a projection: the newest snapshot, then every event after it.
/// Returns the state and the last sequence it covers.
pub fn rebuild<P, E>(log: &EventLog<E>) -> Result<(P, u64), EventLogError>
where
    P: Projection<Event = E>,
    E: Serialize + DeserializeOwned + Send + 'static,
{
    let (covered, mut state) = log.load_snapshot::<P>()?.unwrap_or_default();
    let last = log.replay(covered + 1, |seq, event| state.apply(seq, &event))?;
    Ok((state, last.max(covered)))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests;
