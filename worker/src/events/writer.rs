//! The one writer: a dedicated OS thread that owns every write transaction.
//!
//! It takes the first command waiting on its channel, then every other
//! command already waiting (up to [`MAX_BATCH`]), applies them in order in
//! one durable transaction and answers each only after the commit returned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::{Database, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::{EventLogError, EVENTS, SNAPSHOTS};

/// Most commands in one transaction: bounds the transaction's size and the
/// latency of the first producer of a long queue.
const MAX_BATCH: usize = 4096;

pub(crate) enum Command {
    Append { record: Vec<u8>, reply: oneshot::Sender<Result<u64, EventLogError>> },
    Snapshot { up_to: u64, state: Vec<u8>, reply: oneshot::Sender<Result<(), EventLogError>> },
}

/// What the writer shares with the handles.
pub(crate) struct Counters {
    /// Durable transactions committed since open.
    pub(crate) commits: AtomicU64,
    /// The highest sequence number known durable.
    pub(crate) last_seq: AtomicU64,
}

/// A failure of the whole transaction, answered to each of its waiters.
#[derive(Clone)]
enum BatchFailure {
    Begin(Arc<redb::TransactionError>),
    Table(Arc<redb::TableError>),
    Insert(Arc<redb::StorageError>),
    Read(Arc<redb::StorageError>),
    Compact(Arc<redb::StorageError>),
    Commit(Arc<redb::CommitError>),
}

impl From<BatchFailure> for EventLogError {
    fn from(failure: BatchFailure) -> Self {
        match failure {
            BatchFailure::Begin(source) => EventLogError::Begin(source),
            BatchFailure::Table(source) => EventLogError::Table(source),
            BatchFailure::Insert(source) => EventLogError::Insert(source),
            BatchFailure::Read(source) => EventLogError::Read(source),
            BatchFailure::Compact(source) => EventLogError::Compact(source),
            BatchFailure::Commit(source) => EventLogError::Commit(source),
        }
    }
}

/// An answer held until the transaction's outcome is known.
enum Pending {
    Appended(oneshot::Sender<Result<u64, EventLogError>>, u64),
    Snapshotted(oneshot::Sender<Result<(), EventLogError>>),
}

pub(crate) fn run(
    db: Arc<Database>,
    counters: Arc<Counters>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut batch = Vec::with_capacity(64);
    // After a failed commit every later command fails too: an append whose
    // answer nobody awaits (`EventLog::append_queued`) is then never
    // followed by a durable one, so "a later append succeeded" keeps
    // meaning "every earlier one is durable".
    let mut poisoned: Option<BatchFailure> = None;
    while let Some(first) = commands.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match commands.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        if let Some(failure) = &poisoned {
            for command in batch.drain(..) {
                match command {
                    Command::Append { reply, .. } => drop(reply.send(Err(failure.clone().into()))),
                    Command::Snapshot { reply, .. } => drop(reply.send(Err(failure.clone().into()))),
                }
            }
            continue;
        }
        poisoned = write_batch(&db, &counters, &mut batch).err();
    }
}

fn write_batch(db: &Database, counters: &Counters, batch: &mut Vec<Command>) -> Result<(), BatchFailure> {
    let last_seq = counters.last_seq.load(Ordering::Acquire);
    let mut pending = Vec::with_capacity(batch.len());
    let mut commands = std::mem::take(batch).into_iter();
    let outcome = begin(db).and_then(|transaction| {
        let next = apply(&transaction, last_seq, &mut commands, &mut pending)?;
        transaction.commit().map_err(|e| BatchFailure::Commit(Arc::new(e)))?;
        Ok(next)
    });
    // Commands not yet turned into pending answers (the transaction failed
    // before reaching them) are answered with the failure too.
    let rest = commands;
    match outcome {
        Ok(new_last) => {
            counters.commits.fetch_add(1, Ordering::Relaxed);
            counters.last_seq.store(new_last, Ordering::Release);
            for answer in pending {
                match answer {
                    Pending::Appended(reply, seq) => drop(reply.send(Ok(seq))),
                    Pending::Snapshotted(reply) => drop(reply.send(Ok(()))),
                }
            }
            Ok(())
        }
        Err(failure) => {
            tracing::error!(error = %EventLogError::from(failure.clone()), "event log transaction failed");
            for answer in pending {
                match answer {
                    Pending::Appended(reply, _) => drop(reply.send(Err(failure.clone().into()))),
                    Pending::Snapshotted(reply) => drop(reply.send(Err(failure.clone().into()))),
                }
            }
            for command in rest {
                match command {
                    Command::Append { reply, .. } => drop(reply.send(Err(failure.clone().into()))),
                    Command::Snapshot { reply, .. } => drop(reply.send(Err(failure.clone().into()))),
                }
            }
            Err(failure)
        }
    }
}

fn begin(db: &Database) -> Result<WriteTransaction, BatchFailure> {
    let mut transaction = db.begin_write().map_err(|e| BatchFailure::Begin(Arc::new(e)))?;
    // Immediate is redb's default; set it anyway, it is the promise we make.
    transaction
        .set_durability(redb::Durability::Immediate)
        .expect("an exclusive-writer database accepts immediate durability");
    transaction.set_two_phase_commit(true);
    Ok(transaction)
}

/// Applies the commands in order; returns the last sequence number assigned.
fn apply(
    transaction: &WriteTransaction,
    mut last_seq: u64,
    commands: &mut std::vec::IntoIter<Command>,
    pending: &mut Vec<Pending>,
) -> Result<u64, BatchFailure> {
    let mut events = transaction.open_table(EVENTS).map_err(|e| BatchFailure::Table(Arc::new(e)))?;
    let mut snapshots = transaction.open_table(SNAPSHOTS).map_err(|e| BatchFailure::Table(Arc::new(e)))?;
    for command in commands.by_ref() {
        match command {
            Command::Append { record, reply } => {
                let seq = last_seq + 1;
                events.insert(seq, record.as_slice()).map_err(|e| BatchFailure::Insert(Arc::new(e)))?;
                last_seq = seq;
                pending.push(Pending::Appended(reply, seq));
            }
            Command::Snapshot { up_to, state, reply } => {
                let current = snapshots
                    .last()
                    .map_err(|e| BatchFailure::Read(Arc::new(e)))?
                    .map(|(seq, _)| seq.value());
                if up_to > last_seq {
                    drop(reply.send(Err(EventLogError::SnapshotAhead { up_to, last: last_seq })));
                    continue;
                }
                if let Some(current) = current.filter(|&current| current > up_to) {
                    drop(reply.send(Err(EventLogError::SnapshotBehind { up_to, current })));
                    continue;
                }
                snapshots.insert(up_to, state.as_slice()).map_err(|e| BatchFailure::Insert(Arc::new(e)))?;
                // Only the newest snapshot is kept, and the events it covers go
                // in the same transaction: a crash leaves either both or neither.
                snapshots.retain_in(..up_to, |_, _| false).map_err(|e| BatchFailure::Compact(Arc::new(e)))?;
                events.retain_in(..=up_to, |_, _| false).map_err(|e| BatchFailure::Compact(Arc::new(e)))?;
                pending.push(Pending::Snapshotted(reply));
            }
        }
    }
    Ok(last_seq)
}
