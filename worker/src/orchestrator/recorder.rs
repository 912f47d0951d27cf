//! Recording events: append to the log (durable), fold into the in-memory
//! state, mirror on `quilt.events.<worker>.<kind>`, and compact the log
//! every so often.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::broker::subjects;
use crate::events::{rebuild, EventLog, EventLogError, Projection};
use crate::protocol::{Event, EventMessage, SCHEMA_VERSION};

use super::state::WorkerState;

/// Events appended between two snapshots. A snapshot replaces the events it
/// covers, so the log holds at most about this many events plus one state.
const SNAPSHOT_EVERY: u64 = 4096;

/// Appends events and keeps the state folded from them.
#[derive(Clone)]
pub(crate) struct Recorder {
    inner: Arc<Inner>,
}

struct Inner {
    log: EventLog<Event>,
    state: Mutex<WorkerState>,
    worker_id: String,
    client: Mutex<Option<async_nats::Client>>,
    since_snapshot: AtomicU64,
    compacting: Mutex<()>,
    /// Queued events not yet answered by the log.
    unanswered: AtomicU64,
}

impl Recorder {
    pub(crate) fn new(log: EventLog<Event>, state: WorkerState, worker_id: String) -> Recorder {
        Recorder {
            inner: Arc::new(Inner {
                log,
                state: Mutex::new(state),
                worker_id,
                client: Mutex::new(None),
                since_snapshot: AtomicU64::new(0),
                compacting: Mutex::new(()),
                unanswered: AtomicU64::new(0),
            }),
        }
    }

    /// Mirror events on NATS from now on.
    pub(crate) fn mirror_to(&self, client: async_nats::Client) {
        *self.inner.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client);
    }

    /// The log's last committed sequence number.
    pub(crate) fn last_seq(&self) -> u64 {
        self.inner.log.last_seq()
    }

    /// The state folded so far.
    pub(crate) fn state(&self) -> MutexGuard<'_, WorkerState> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `event`; returns once it is durable (and folded in).
    pub(crate) async fn record(&self, event: Event) -> Result<u64, EventLogError> {
        let seq = self.inner.log.append(event.clone()).await?;
        self.state().apply(seq, &event);
        self.after_commit(seq, event).await;
        Ok(seq)
    }

    /// Queues `event` and folds it in at once, without waiting for it to be
    /// durable: it becomes durable with the next awaited [`Recorder::record`]
    /// at the latest (the log commits in order and refuses everything after
    /// a failed commit). For facts whose durability matters only together
    /// with a later one, such as `container_started` before `result_stored`.
    pub(crate) fn note(&self, event: Event) -> Result<(), EventLogError> {
        let answer = self.inner.log.append_queued(event.clone())?;
        // Folded now, in program order; the sequence number only matters
        // to snapshots, which are rebuilt from the log itself.
        self.state().apply(self.inner.log.last_seq() + 1, &event);
        self.inner.unanswered.fetch_add(1, Ordering::AcqRel);
        let recorder = self.clone();
        tokio::spawn(async move {
            let answer = answer.await;
            recorder.inner.unanswered.fetch_sub(1, Ordering::AcqRel);
            if let Ok(Ok(seq)) = answer {
                recorder.after_commit(seq, event).await;
            }
        });
        Ok(())
    }

    /// Waits (at most a few seconds) until every queued event was answered
    /// by the log: the crash points use it, so "crash after X" means X is
    /// durable.
    pub(crate) async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.inner.unanswered.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Mirrors a committed event and compacts the log when it is due.
    async fn after_commit(&self, seq: u64, event: Event) {
        let client = self.inner.client.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(client) = client {
            let message = EventMessage {
                schema: SCHEMA_VERSION,
                worker_id: self.inner.worker_id.clone(),
                seq,
                at_ms: now_ms(),
                event,
            };
            let subject = subjects::event(&self.inner.worker_id, message.event.kind());
            if let Ok(payload) = serde_json::to_vec(&message) {
                // Observability only: a mirror lost while NATS is away is
                // not worth holding a task for; the log has the event.
                if let Err(error) = client.publish(subject, payload.into()).await {
                    tracing::debug!(%error, seq, "event not mirrored");
                }
            }
        }
        if self.inner.since_snapshot.fetch_add(1, Ordering::Relaxed) + 1 >= SNAPSHOT_EVERY {
            self.inner.since_snapshot.store(0, Ordering::Relaxed);
            let recorder = self.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(error) = recorder.compact() {
                    tracing::warn!(%error, "event log compaction failed; will retry later");
                }
            });
        }
    }

    /// Replaces every committed event by a snapshot of the state they fold
    /// to. The snapshot is rebuilt from the log itself, not taken from the
    /// in-memory state, so it covers exactly the committed events whatever
    /// order concurrent producers applied theirs in. Blocking.
    pub(crate) fn compact(&self) -> Result<u64, EventLogError> {
        let _one_at_a_time = self.inner.compacting.lock().unwrap_or_else(|e| e.into_inner());
        let (state, last) = rebuild::<WorkerState, Event>(&self.inner.log)?;
        self.inner.log.snapshot_blocking(last, &state)?;
        Ok(last)
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}
