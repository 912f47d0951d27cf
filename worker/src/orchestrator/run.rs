//! One delivery of one task, from fetch to confirmed ack; publishing
//! results, output and dead letters; settling what a previous run held.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{AckKind, Message};
use futures_util::StreamExt;

use crate::broker::subjects;
use crate::engine::{Container, EngineError, Outcome, OutputFollower, SetupStep, Status};
use crate::image::{ImageError, ImageRecord, Lease};
use crate::protocol::{
    parse_task, task_id_from_bytes, validate_task_id, DeadLetter, ErrorInfo, Event, OutputChunk,
    OutputStream, Placement, ResultTimings, ResultUsage, Task, TaskResult, TaskStatus, Truncated,
    SCHEMA_VERSION,
};

use super::{long_running, note, plan, record, wait_or_stop, CrashPoint, Shared};

/// Why a task did not produce a result on this delivery.
pub(super) enum Failure {
    /// A final answer that is not a container outcome (rejected, error).
    Final(Box<TaskResult>),
    /// Worth another delivery; dead-lettered on the last one.
    Retry(ErrorInfo),
    /// The worker is shutting down and handed the task back.
    Abandoned,
    /// The task was routed to the worker that owns its long-running
    /// container (`quilt.tasks.worker.<owner>`), which answers it.
    Forwarded {
        /// That worker.
        to: String,
    },
}

/// What became of a result publish.
enum Publication {
    /// This publish stored it, at this sequence.
    Stored(u64),
    /// The stream already holds a result for the task: this worker's own
    /// (published before a crash) or another's.
    AlreadyThere { ours: bool },
    /// The worker is abandoning work; the result stays stored in the log
    /// and is published at the next start.
    GaveUp,
}

/// A task's id: its `id` field, else its `Nats-Msg-Id` header, else an
/// `id` found in a message that does not parse, else `seq-<stream sequence>`.
fn identify(
    parsed_id: Option<String>,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
    stream_seq: u64,
) -> String {
    parsed_id
        .or_else(|| {
            headers
                .and_then(|headers| headers.get(subjects::MSG_ID_HEADER))
                .map(|value| value.as_str().to_owned())
                .filter(|id| validate_task_id(id).is_ok())
        })
        .or_else(|| task_id_from_bytes(payload))
        .unwrap_or_else(|| format!("seq-{stream_seq}"))
}

async fn crash_if(shared: &Shared, point: CrashPoint) {
    if shared.config.crash_at == Some(point) {
        // "After X" means X is durable: let queued events reach the disk.
        shared.recorder.settle().await;
        tracing::warn!(?point, "crashing on purpose (crash_at)");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
}

fn elapsed_ms(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// Handles one delivery of a task, to the end: a confirmed ack, a NAK, or
/// (when the worker is abandoning work) nothing, for the server to redeliver.
pub(crate) async fn handle_delivery(shared: &Arc<Shared>, message: Message) {
    let claimed_at = Instant::now();
    let (stream_seq, attempt, queued_ms) = match message.info() {
        Ok(info) => {
            let published_ns = info.published.unix_timestamp_nanos();
            let now_ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos() as i128);
            let queued_ms = ((now_ns - published_ns).max(0) as f64 / 1e3).round() / 1e3;
            (info.stream_sequence, u64::try_from(info.delivered).unwrap_or(1).max(1), queued_ms)
        }
        Err(error) => {
            tracing::warn!(%error, "a message without JetStream metadata on the task consumer; dropping it");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let payload = message.payload.clone();
    let max_task_bytes = usize::try_from(shared.config.jetstream.max_task_bytes).unwrap_or(usize::MAX);
    let parsed: Result<Task, ErrorInfo> = if payload.len() > max_task_bytes {
        Err(ErrorInfo {
            kind: "payload_too_large".into(),
            message: format!(
                "the task is {} bytes; this worker takes at most {max_task_bytes}",
                payload.len()
            ),
        })
    } else {
        parse_task(&payload)
            .map_err(|error| ErrorInfo { kind: "invalid_task".into(), message: error.to_string() })
    };
    let task_id = identify(
        parsed.as_ref().ok().and_then(|task| task.id.clone()),
        message.headers.as_ref(),
        &payload,
        stream_seq,
    );
    let message = Arc::new(message);

    // The server may deliver again a task this very process is running: its
    // first delivery timed out (the worker was paused past AckWait) or a
    // restarted server lost it. Keep this delivery's lease until that run
    // ends, then answer from the log below, rather than run it twice at once.
    let _in_flight = match InFlight::claim(shared, &task_id) {
        Some(claim) => claim,
        None => {
            tracing::info!(task = %task_id, attempt, "task delivered again while running here; waiting for that run");
            let progress = tokio::spawn(keep_lease(Arc::clone(&message), shared.ack_wait));
            let claim = loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some(claim) = InFlight::claim(shared, &task_id) {
                    break claim;
                }
            };
            progress.abort();
            claim
        }
    };

    // A redelivery of a task whose result this worker already stored is
    // answered from the log, never rerun.
    let held = shared.recorder.state().tasks.get(&task_id).cloned();
    if let Some(entry) = held {
        if let Some(result) = entry.result {
            tracing::info!(task = %task_id, attempt, "redelivered task answered from the log");
            if !entry.published && !entry.discarded && !publish_and_record(shared, &result).await {
                return;
            }
            ack(shared, &message, &task_id).await;
            return;
        }
    }
    // Another worker may have finished it (this delivery is a redelivery
    // after that worker's ack was lost, or a duplicate publish outside the
    // dedupe window): its result stands.
    // Queued, not awaited: nothing that follows needs the claim on disk
    // first. After a crash the server redelivers the task either way, and
    // its containers are found by this worker's naming.
    note(&shared.recorder, Event::TaskClaimed { task_id: task_id.clone(), stream_seq, attempt });
    if let Some(existing) = existing_result(shared, &task_id).await {
        tracing::info!(task = %task_id, by = %existing.worker_id, "task already has a result; not running it again");
        ack(shared, &message, &task_id).await;
        return;
    }
    crash_if(shared, CrashPoint::AfterFetch).await;
    shared.metrics.task_started(Duration::try_from_secs_f64(queued_ms / 1e3).unwrap_or_default());

    let progress = tokio::spawn(keep_lease(Arc::clone(&message), shared.ack_wait));
    let outcome = match parsed {
        Err(error) => Err(Failure::Final(Box::new(failure_result(
            shared,
            &task_id,
            attempt,
            TaskStatus::Rejected,
            error,
            None,
        )))),
        Ok(task) => execute(shared, &task, &task_id, attempt, &payload).await,
    };
    let finished = match outcome {
        Ok(mut result) => {
            result.timings.queued_ms = queued_ms;
            result.timings.total_ms = elapsed_ms(claimed_at);
            Some(result)
        }
        Err(Failure::Final(result)) => {
            let mut result = *result;
            result.timings.queued_ms = queued_ms;
            result.timings.total_ms = elapsed_ms(claimed_at);
            Some(result)
        }
        Err(Failure::Retry(error)) if attempt >= shared.max_deliver => {
            tracing::warn!(task = %task_id, attempt, kind = %error.kind, "last delivery failed; dead-lettering");
            dead_letter(shared, &task_id, stream_seq, attempt, &message, error.clone()).await;
            let mut result = failure_result(
                shared,
                &task_id,
                attempt,
                TaskStatus::Error,
                ErrorInfo {
                    kind: error.kind,
                    message: format!("gave up after {attempt} deliveries: {}", error.message),
                },
                None,
            );
            result.timings.queued_ms = queued_ms;
            result.timings.total_ms = elapsed_ms(claimed_at);
            Some(result)
        }
        Err(Failure::Retry(error)) => {
            let delay = Duration::from_secs(1 << attempt.min(5)).min(Duration::from_secs(30));
            tracing::warn!(task = %task_id, attempt, kind = %error.kind, message = %error.message, ?delay, "task failed; handing it back for a retry");
            let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            record(
                &shared.recorder,
                Event::TaskReleased {
                    task_id: task_id.clone(),
                    reason: format!("{}: {}", error.kind, error.message),
                },
            )
            .await;
            None
        }
        Err(Failure::Forwarded { to }) => {
            tracing::info!(task = %task_id, owner = %to, "task forwarded to the owner of its container");
            progress.abort();
            record(&shared.recorder, Event::TaskForwarded { task_id: task_id.clone(), to }).await;
            ack(shared, &message, &task_id).await;
            None
        }
        Err(Failure::Abandoned) => {
            let _ = message.ack_with(AckKind::Nak(None)).await;
            record(
                &shared.recorder,
                Event::TaskReleased {
                    task_id: task_id.clone(),
                    reason: "the worker is shutting down".into(),
                },
            )
            .await;
            None
        }
    };
    if let Some(result) = finished {
        let result = fit_result(result, shared.max_payload);
        record(&shared.recorder, Event::ResultStored { result: Box::new(result.clone()) }).await;
        crash_if(shared, CrashPoint::AfterStored).await;
        if publish_and_record(shared, &result).await {
            crash_if(shared, CrashPoint::BeforeAck).await;
            progress.abort();
            ack(shared, &message, &task_id).await;
        }
    }
    progress.abort();
}

/// A task held by one handler of this process; released on drop.
struct InFlight {
    shared: Arc<Shared>,
    task_id: String,
}

impl InFlight {
    /// Holds `task_id`, unless another handler of this process does.
    fn claim(shared: &Arc<Shared>, task_id: &str) -> Option<InFlight> {
        let mut held = shared.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(task_id.to_owned())
            .then(|| InFlight { shared: Arc::clone(shared), task_id: task_id.to_owned() })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.task_id);
    }
}

/// Progress acks (`+WPI`) every third of AckWait, so a long task keeps its
/// delivery. Stops when aborted; a worker paused (SIGSTOP) past AckWait
/// loses the delivery to another worker, which is what the result checks
/// are for.
async fn keep_lease(message: Arc<Message>, ack_wait: Duration) {
    let period = (ack_wait / 3).max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        ticker.tick().await;
        if let Err(error) = message.ack_with(AckKind::Progress).await {
            tracing::debug!(%error, "progress ack failed");
        }
    }
}

/// Acks with the server's confirmation, retried within AckWait; recorded
/// once confirmed.
///
/// Bounded by AckWait, not by the client's request timeout: past AckWait
/// the server redelivers anyway and the log answers that delivery, so
/// waiting longer only holds a slot. And a server restarted after a crash
/// may have lost the delivery from its consumer state (it delivers the task
/// afresh) and never answers an ack of it: five 10 s request timeouts held
/// the slot for close to a minute, while the fresh delivery waited for it.
async fn ack(shared: &Shared, message: &Message, task_id: &str) {
    let deadline = tokio::time::Instant::now() + shared.ack_wait;
    let per_try = (shared.ack_wait / 2).clamp(Duration::from_millis(500), Duration::from_secs(10));
    let mut backoff = Duration::from_millis(100);
    for attempt in 0u32.. {
        match tokio::time::timeout(per_try, message.double_ack()).await {
            Ok(Ok(())) => {
                // Queued: if it is lost in a crash, the restart finds the
                // result published and removes the (already gone) message.
                note(&shared.recorder, Event::TaskAcked { task_id: task_id.to_owned() });
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(task = %task_id, %error, attempt, "ack not confirmed; retrying");
            }
            Err(_) => {
                tracing::warn!(task = %task_id, attempt, ?per_try, "ack not confirmed in time; retrying");
            }
        }
        if tokio::time::Instant::now() + backoff >= deadline {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    // The server redelivers after AckWait; the log answers that delivery.
    tracing::warn!(task = %task_id, "ack never confirmed; the redelivery will be answered from the log");
}

/// Publishes a stored result and records what became of it. False when the
/// worker gave up (it is abandoning work; the next start publishes it).
async fn publish_and_record(shared: &Shared, result: &TaskResult) -> bool {
    match publish_result(shared, result).await {
        Publication::Stored(seq) => {
            shared.metrics.task_finished(result.status);
            crash_if(shared, CrashPoint::AfterPublished).await;
            // Queued: if it is lost in a crash, the restart publishes again,
            // finds this result stored and records it then.
            note(
                &shared.recorder,
                Event::ResultPublished {
                    task_id: result.id.clone(),
                    result_seq: Some(seq),
                    duplicate: false,
                },
            );
            true
        }
        Publication::AlreadyThere { ours: true } => {
            note(
                &shared.recorder,
                Event::ResultPublished { task_id: result.id.clone(), result_seq: None, duplicate: true },
            );
            true
        }
        Publication::AlreadyThere { ours: false } => {
            tracing::warn!(task = %result.id, "another worker already published this task's result; discarding ours");
            record(
                &shared.recorder,
                Event::ResultDiscarded {
                    task_id: result.id.clone(),
                    reason:
                        "another delivery of the task already published a result (this worker lost its lease)"
                            .into(),
                },
            )
            .await;
            true
        }
        Publication::GaveUp => false,
    }
}

/// The result stored in `QUILT_RESULTS` for `task_id`, if any. Errors
/// (NATS unreachable) read as none: the publish itself is guarded too.
async fn existing_result(shared: &Shared, task_id: &str) -> Option<TaskResult> {
    let subject = subjects::result(task_id);
    match shared.jetstream.results.get_last_raw_message_by_subject(&subject).await {
        // Not ours to judge: a message on the subject is a result.
        Ok(message) => Some(serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
            TaskResult::without_outcome(task_id, "unknown", None, TaskStatus::Error, None, 0)
        })),
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => None,
        Err(error) => {
            tracing::debug!(task = %task_id, %error, "could not look up an existing result");
            None
        }
    }
}

/// Publishes `result` so that `QUILT_RESULTS` holds at most one result per
/// task, whoever publishes: message id = task id (duplicate window) and an
/// expected last subject sequence of 0 (no result yet). Workers publish on
/// `quilt.worker.results.<id>`; the stream stores the result as
/// `quilt.results.<id>` and only then republishes it there, so even a plain
/// subscriber never sees a result the stream refused. Retries while NATS is
/// away.
async fn publish_result(shared: &Shared, result: &TaskResult) -> Publication {
    let subject = subjects::result_input(&result.id);
    let payload = match serde_json::to_vec(result) {
        Ok(payload) => bytes::Bytes::from(payload),
        Err(error) => {
            // A TaskResult always serializes; keep the worker alive regardless.
            tracing::error!(%error, "result does not serialize");
            return Publication::GaveUp;
        }
    };
    let mut backoff = Duration::from_millis(100);
    let mut abandoning = shared.abandoning.subscribe();
    loop {
        let publish = Publish::build()
            .payload(payload.clone())
            .message_id(&result.id)
            .expected_last_subject_sequence(0);
        let attempt = async {
            let ack = shared.jetstream.context.send_publish(subject.clone(), publish).await?;
            ack.await
        };
        let already_there = match attempt.await {
            Ok(ack) if !ack.duplicate => return Publication::Stored(ack.sequence),
            Ok(_) => true,
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => true,
            Err(error) => {
                tracing::warn!(task = %result.id, %error, "publishing the result failed; retrying");
                false
            }
        };
        // Stored before: by this worker before a crash, or by another
        // delivery of the task. The stored one tells whose it is.
        if already_there {
            if let Some(existing) = existing_result(shared, &result.id).await {
                let ours = existing.worker_id == result.worker_id
                    && existing.container_id == result.container_id
                    && existing.attempt == result.attempt;
                return Publication::AlreadyThere { ours };
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = abandoning.wait_for(|abandon| *abandon) => return Publication::GaveUp,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Cuts stdout/stderr until the result's JSON fits in a NATS message (JSON
/// escaping can make binary output several times its size).
fn fit_result(mut result: TaskResult, max_payload: usize) -> TaskResult {
    // Room for headers and the protocol line.
    let budget = max_payload.saturating_sub(4096).max(16 * 1024);
    for _ in 0..64 {
        let Ok(size) = serde_json::to_vec(&result).map(|json| json.len()) else { break };
        if size <= budget {
            break;
        }
        let (text, flag) = if result.stdout.len() >= result.stderr.len() {
            (&mut result.stdout, &mut result.truncated.stdout)
        } else {
            (&mut result.stderr, &mut result.truncated.stderr)
        };
        if text.is_empty() {
            break;
        }
        let mut cut = text.len() / 2;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        *flag = true;
    }
    result
}

pub(super) fn failure_result(
    shared: &Shared,
    task_id: &str,
    attempt: u64,
    status: TaskStatus,
    error: ErrorInfo,
    container_id: Option<String>,
) -> TaskResult {
    TaskResult::without_outcome(task_id, &shared.config.worker_id, container_id, status, Some(error), attempt)
}

pub(super) fn error_info(kind: &str, message: impl std::fmt::Display) -> ErrorInfo {
    ErrorInfo { kind: kind.to_owned(), message: message.to_string() }
}

/// Image, container, output, outcome.
async fn execute(
    shared: &Arc<Shared>,
    task: &Task,
    task_id: &str,
    attempt: u64,
    payload: &bytes::Bytes,
) -> Result<TaskResult, Failure> {
    match task.placement() {
        Placement::Ephemeral => {}
        Placement::LongRunning { name, .. } => {
            return long_running::create(shared, task, task_id, attempt, &name, payload).await
        }
        Placement::Exec { target } => {
            let result = long_running::exec(shared, task, task_id, attempt, &target, payload).await;
            observe_run(shared, &result);
            return result;
        }
    }
    let image_started = Instant::now();
    let (image, layers, lease) = resolve_image_for(shared, task_id, attempt, &task.image).await?;
    let image_ms = elapsed_ms(image_started);
    let prepared = super::environment::prepare(shared, task, task_id, attempt, &image, &layers).await?;
    let container_id =
        format!("{}.{}", shared.config.worker_id, &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut spec = task_spec(shared, &container_id, task, &image, layers, task_id, attempt)?;
    if let Some(prepared) = &prepared {
        prepared.apply(task, &mut spec);
    }
    // Queued: a crash from here on is cleaned up by the start-up sweep of
    // every container named `<worker_id>.*`, recorded or not.
    note(
        &shared.recorder,
        Event::ContainerCreating { task_id: task_id.to_owned(), container_id: container_id.clone() },
    );
    let removed =
        || Event::ContainerRemoved { task_id: task_id.to_owned(), container_id: container_id.clone() };
    let container = match shared.engine.create(spec) {
        Ok(container) => container,
        Err(error) => {
            note(&shared.recorder, removed());
            return Err(engine_failure(shared, task_id, attempt, &error, &container_id));
        }
    };
    let mut result = drive(shared, task_id, attempt, container, image_ms, true).await;
    observe_run(shared, &result);
    drop(lease);
    if let Some(prepared) = prepared {
        match &mut result {
            Ok(result) => result.environment = Some(prepared.report),
            Err(Failure::Final(result)) => result.environment = Some(prepared.report),
            Err(_) => {}
        }
    }
    note(&shared.recorder, removed());
    result
}

/// Feeds a command's run time (container creation to exit, as the result
/// reports it) to the metrics, when the command ran to an outcome.
fn observe_run(shared: &Shared, result: &Result<TaskResult, Failure>) {
    if let Ok(result) = result {
        let seconds = (result.timings.start_ms + result.timings.run_ms) / 1e3;
        shared.metrics.task_ran(Duration::try_from_secs_f64(seconds).unwrap_or_default());
    }
}

/// A final answer that is not a container outcome: `status` with an error.
pub(super) fn final_failure(
    shared: &Shared,
    task_id: &str,
    attempt: u64,
    status: TaskStatus,
    kind: &str,
    message: impl std::fmt::Display,
) -> Failure {
    Failure::Final(Box::new(failure_result(
        shared,
        task_id,
        attempt,
        status,
        error_info(kind, message),
        None,
    )))
}

/// The spec of container `container_id` running `task` on `image`; a task
/// the spec refuses is answered `rejected`.
pub(super) fn task_spec(
    shared: &Shared,
    container_id: &str,
    task: &Task,
    image: &ImageRecord,
    layers: Vec<std::path::PathBuf>,
    task_id: &str,
    attempt: u64,
) -> Result<crate::engine::ContainerSpec, Failure> {
    plan::container_spec(
        container_id,
        task,
        image,
        layers,
        &shared.config.limits,
        shared.config.allow_host_network,
    )
    .map_err(|error| final_failure(shared, task_id, attempt, TaskStatus::Rejected, "invalid_task", error))
}

/// Finds (or pulls) a task's image; failures become the task's answer.
pub(super) async fn resolve_image_for(
    shared: &Shared,
    task_id: &str,
    attempt: u64,
    image: &str,
) -> Result<(ImageRecord, Vec<std::path::PathBuf>, Lease), Failure> {
    resolve_image(shared, image).await.map_err(|error| {
        let info = error_info(error.kind(), &error);
        match error.kind() {
            "image_not_found" | "invalid_reference" => Failure::Final(Box::new(failure_result(
                shared,
                task_id,
                attempt,
                TaskStatus::Rejected,
                info,
                None,
            ))),
            "registry" | "timeout" | "image" => Failure::Retry(info),
            _ => Failure::Final(Box::new(failure_result(
                shared,
                task_id,
                attempt,
                TaskStatus::Error,
                info,
                None,
            ))),
        }
    })
}

/// Starts a created container (an ephemeral one or an exec) and drives it
/// to its outcome: events, live output, wait (or abandonment), teardown.
pub(super) async fn drive(
    shared: &Arc<Shared>,
    task_id: &str,
    attempt: u64,
    mut container: Container,
    image_ms: f64,
    record_start: bool,
) -> Result<TaskResult, Failure> {
    let container_id = container.id().to_owned();
    if let Err(error) = container.start().await {
        let _ = container.finish().await;
        return Err(engine_failure(shared, task_id, attempt, &error, &container_id));
    }
    if let Some(pid) = container.pid().filter(|_| record_start) {
        // Queued: the reaping after a crash goes by `container_creating`.
        note(
            &shared.recorder,
            Event::ContainerStarted { task_id: task_id.to_owned(), container_id: container_id.clone(), pid },
        );
    }
    crash_if(shared, CrashPoint::AfterStart).await;
    let mut streams = Vec::new();
    for (stream, follower) in
        [(OutputStream::Stdout, container.follow_stdout()), (OutputStream::Stderr, container.follow_stderr())]
    {
        if let Some(Ok(follower)) = follower {
            streams.push(tokio::spawn(publish_output(
                shared.client.clone(),
                task_id.to_owned(),
                attempt,
                stream,
                follower,
            )));
        }
    }
    let mut abandoning = shared.abandoning.subscribe();
    let abandoned = tokio::select! {
        exit = container.wait() => {
            if let Err(error) = exit {
                tracing::warn!(task = %task_id, %error, "waiting for the container failed");
            }
            false
        }
        _ = abandoning.wait_for(|abandon| *abandon) => true,
    };
    if abandoned {
        let _ = container.kill_all();
    }
    let finished = container.finish().await;
    for stream in streams {
        let _ = stream.await;
    }
    if abandoned {
        return Err(Failure::Abandoned);
    }
    let outcome = finished.map_err(|error| Failure::Retry(error_info(error.kind(), &error)))?;
    crash_if(shared, CrashPoint::AfterExit).await;
    Ok(outcome_result(shared, task_id, attempt, &outcome, image_ms))
}

pub(super) fn engine_failure(
    shared: &Shared,
    task_id: &str,
    attempt: u64,
    error: &EngineError,
    container_id: &str,
) -> Failure {
    let container_id = Some(container_id.to_owned());
    let (status, kind) = match error {
        EngineError::Setup { step: SetupStep::CommandNotFound, .. } => {
            (TaskStatus::Error, "command_not_found")
        }
        EngineError::Setup { step: SetupStep::CommandNotExecutable, .. } => {
            (TaskStatus::Error, "not_executable")
        }
        EngineError::Spec(_) => (TaskStatus::Rejected, "invalid_task"),
        _ => match error.kind() {
            "invalid_spec" => (TaskStatus::Rejected, "invalid_task"),
            "limit_unavailable" => (TaskStatus::Rejected, "limit_not_allowed"),
            "invalid_rootfs" | "setup" => (TaskStatus::Error, error.kind()),
            // cgroups, the kernel, a clash of ids: the host's trouble, retried.
            other => return Failure::Retry(error_info(other, error)),
        },
    };
    Failure::Final(Box::new(failure_result(
        shared,
        task_id,
        attempt,
        status,
        error_info(kind, error),
        container_id,
    )))
}

fn outcome_result(
    shared: &Shared,
    task_id: &str,
    attempt: u64,
    outcome: &Outcome,
    image_ms: f64,
) -> TaskResult {
    let status = match outcome.status() {
        Status::Succeeded => TaskStatus::Succeeded,
        Status::Failed => TaskStatus::Failed,
        Status::TimedOut => TaskStatus::TimedOut,
        Status::OomKilled => TaskStatus::OomKilled,
    };
    TaskResult {
        schema: SCHEMA_VERSION,
        id: task_id.to_owned(),
        worker_id: shared.config.worker_id.clone(),
        container_id: Some(outcome.container_id.clone()),
        status,
        exit_code: outcome.exit_code,
        signal: outcome.signal,
        stdout: String::from_utf8_lossy(&outcome.stdout.data).into_owned(),
        stderr: String::from_utf8_lossy(&outcome.stderr.data).into_owned(),
        truncated: Truncated { stdout: outcome.stdout.truncated, stderr: outcome.stderr.truncated },
        timings: ResultTimings {
            queued_ms: 0.0,
            image_ms,
            start_ms: outcome.timings.setup_ms,
            run_ms: outcome.timings.run_ms,
            total_ms: 0.0,
        },
        usage: ResultUsage {
            cpu_ns: outcome.usage.cpu_ns,
            peak_memory_bytes: outcome.usage.peak_memory_bytes,
            pids_limit_hit: outcome.pids_limit_hit,
            cpu_throttled_periods: outcome.usage.cpu_throttled_periods,
            cpu_throttled_ns: outcome.usage.cpu_throttled_ns,
            scratch_full: outcome.usage.scratch_full,
            shm_full: outcome.usage.shm_full,
            inodes_exhausted: outcome.usage.inodes_exhausted,
        },
        error: None,
        attempt,
        environment: None,
    }
}

/// Finds the image in the store, pulling it when missing (if allowed), and
/// leases its layers for the container's life.
async fn resolve_image(
    shared: &Shared,
    name: &str,
) -> Result<(ImageRecord, Vec<std::path::PathBuf>, Lease), ImageError> {
    let images = Arc::clone(&shared.images);
    let pull = shared.config.pull.clone();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let record = match images.find(&name) {
            Ok(record) => record,
            Err(ImageError::NotFound(missing)) => match &pull {
                Some(options) => {
                    tracing::info!(image = %name, "pulling a missing image");
                    images.pull(&name, options)?
                }
                None => return Err(ImageError::NotFound(missing)),
            },
            Err(error) => return Err(error),
        };
        let (layers, lease) = images.lease(&record)?;
        Ok((record, layers, lease))
    })
    .await
    .map_err(|error| ImageError::Io {
        path: std::path::PathBuf::from("(image resolution)"),
        source: std::io::Error::other(error.to_string()),
    })?
}

/// How many bytes at the end of `bytes` are the start of a UTF-8 character
/// not yet complete (0 to 3): held back so a chunk never splits a character.
fn incomplete_utf8_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: look further back
        }
        let needed = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// Publishes a stream's output as it is produced, then an `eof` chunk.
async fn publish_output(
    client: async_nats::Client,
    task_id: String,
    attempt: u64,
    stream: OutputStream,
    mut follower: OutputFollower,
) {
    let subject = subjects::output(&task_id, stream.as_str());
    let mut buffer = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut offset = 0u64;
    let send = |data: String, offset: u64, eof: bool| {
        let chunk =
            OutputChunk { schema: SCHEMA_VERSION, id: task_id.clone(), attempt, stream, offset, data, eof };
        let client = client.clone();
        let subject = subject.clone();
        async move {
            if let Ok(payload) = serde_json::to_vec(&chunk) {
                // Live output is best effort: the result carries the output too.
                let _ = client.publish(subject, payload.into()).await;
            }
        }
    };
    loop {
        match follower.next_chunk(&mut buffer).await {
            Ok(Some(read)) => {
                pending.extend_from_slice(&buffer[..read]);
                let keep = incomplete_utf8_tail(&pending);
                let ready = pending.len() - keep;
                if ready == 0 {
                    continue;
                }
                let text = String::from_utf8_lossy(&pending[..ready]).into_owned();
                send(text, offset, false).await;
                offset += ready as u64;
                pending.drain(..ready);
            }
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(task = %task_id, %error, "following output failed");
                break;
            }
        }
    }
    let rest = String::from_utf8_lossy(&pending).into_owned();
    send(rest, offset, true).await;
}

/// Moves a task to `quilt.dlq`: the task, its headers, attempts, last error.
async fn dead_letter(
    shared: &Shared,
    task_id: &str,
    stream_seq: u64,
    attempts: u64,
    message: &Message,
    error: ErrorInfo,
) {
    let letter = dead_letter_of(
        shared,
        task_id,
        attempts,
        error.clone(),
        TaskMessage {
            stream_seq,
            subject: &message.subject,
            headers: message.headers.as_ref(),
            payload: &message.payload,
        },
    );
    publish_dead_letter(shared, letter).await;
    record(&shared.recorder, Event::DeadLettered { task_id: task_id.to_owned(), attempts, error }).await;
}

/// A task message as `QUILT_TASKS` holds it.
struct TaskMessage<'a> {
    stream_seq: u64,
    subject: &'a str,
    headers: Option<&'a async_nats::HeaderMap>,
    payload: &'a [u8],
}

fn dead_letter_of(
    shared: &Shared,
    task_id: &str,
    attempts: u64,
    error: ErrorInfo,
    task: TaskMessage<'_>,
) -> DeadLetter {
    let headers: BTreeMap<String, String> = task
        .headers
        .map(|headers| {
            headers
                .iter()
                .map(|(name, values)| {
                    (
                        name.to_string(),
                        values.iter().map(|value| value.as_str()).collect::<Vec<_>>().join(", "),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    DeadLetter {
        schema: SCHEMA_VERSION,
        task_id: task_id.to_owned(),
        stream_seq: task.stream_seq,
        attempts,
        worker_id: shared.config.worker_id.clone(),
        error,
        subject: task.subject.to_owned(),
        headers,
        task: String::from_utf8_lossy(task.payload).into_owned(),
    }
}

async fn publish_dead_letter(shared: &Shared, letter: DeadLetter) {
    let Ok(payload) = serde_json::to_vec(&letter) else { return };
    let payload = bytes::Bytes::from(payload);
    let message_id = format!("dlq-{}-{}", letter.task_id, letter.stream_seq);
    for attempt in 0..10u32 {
        let publish = Publish::build().payload(payload.clone()).message_id(&message_id);
        let sent = async {
            let ack = shared.jetstream.context.send_publish(subjects::DLQ, publish).await?;
            ack.await
        };
        match sent.await {
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(task = %letter.task_id, %error, attempt, "publishing the dead letter failed; retrying");
                if wait_or_stop(&shared.stopping, Duration::from_millis(200 << attempt.min(5))).await {
                    return;
                }
            }
        }
    }
}

/// Listens for the server's max-deliveries advisories: a task delivered
/// MaxDeliver times without an ack (its worker died each time) is moved to
/// the DLQ, answered with an `error` result, and deleted from the queue.
/// Workers share the advisory through a queue group, so one handles it.
pub(crate) async fn watch_max_deliveries(shared: Arc<Shared>) {
    #[derive(serde::Deserialize)]
    struct Advisory {
        stream_seq: u64,
        deliveries: u64,
    }
    let mut subscription = match shared
        .client
        .queue_subscribe(subjects::max_deliveries_advisory(), "quilt-workers".into())
        .await
    {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::warn!(%error, "cannot watch max-deliveries advisories");
            return;
        }
    };
    while let Some(message) = subscription.next().await {
        let Ok(advisory) = serde_json::from_slice::<Advisory>(&message.payload) else { continue };
        let task = match shared.jetstream.tasks.get_raw_message(advisory.stream_seq).await {
            Ok(task) => task,
            Err(_) => continue, // acked or deleted meanwhile
        };
        let task_id = identify(
            parse_task(&task.payload).ok().and_then(|task| task.id),
            Some(&task.headers),
            &task.payload,
            advisory.stream_seq,
        );
        let error = error_info(
            "max_deliveries",
            format!(
                "the task was delivered {} times and never finished (its worker stopped each time)",
                advisory.deliveries
            ),
        );
        let letter = dead_letter_of(
            &shared,
            &task_id,
            advisory.deliveries,
            error.clone(),
            TaskMessage {
                stream_seq: advisory.stream_seq,
                subject: &task.subject,
                headers: Some(&task.headers),
                payload: &task.payload,
            },
        );
        publish_dead_letter(&shared, letter).await;
        let result =
            failure_result(&shared, &task_id, advisory.deliveries, TaskStatus::Error, error.clone(), None);
        record(&shared.recorder, Event::ResultStored { result: Box::new(result.clone()) }).await;
        if publish_and_record(&shared, &result).await {
            let _ = shared.jetstream.tasks.delete_message(advisory.stream_seq).await;
            record(&shared.recorder, Event::DeadLettered { task_id, attempts: advisory.deliveries, error })
                .await;
        }
    }
}

/// Kills every running container; their handlers hand the tasks back.
pub(crate) fn abandon_running(shared: &Shared) {
    shared.abandoning.send_replace(true);
}

/// At start: what the log says this worker held when it stopped. Stored
/// results are published; tasks whose result is published are removed from
/// the queue (their delivery died with the old process); tasks without a
/// result are released for the server to redeliver.
pub(crate) async fn settle_held_tasks(shared: &Arc<Shared>) {
    let held: Vec<(String, super::state::TaskEntry)> =
        shared.recorder.state().tasks.iter().map(|(id, entry)| (id.clone(), entry.clone())).collect();
    for (task_id, entry) in held {
        match entry.result {
            Some(result) => {
                if !entry.published && !entry.discarded {
                    tracing::info!(task = %task_id, "publishing a result stored before a restart");
                    if !publish_and_record(shared, &result).await {
                        continue;
                    }
                }
                // The old delivery cannot be acked any more; the message is
                // removed by its sequence, if it is still this task's.
                if let Ok(message) = shared.jetstream.tasks.get_raw_message(entry.stream_seq).await {
                    let id = identify(
                        parse_task(&message.payload).ok().and_then(|task| task.id),
                        Some(&message.headers),
                        &message.payload,
                        entry.stream_seq,
                    );
                    if id == task_id {
                        let _ = shared.jetstream.tasks.delete_message(entry.stream_seq).await;
                    }
                }
                record(&shared.recorder, Event::TaskAcked { task_id }).await;
            }
            None => {
                record(
                    &shared.recorder,
                    Event::TaskReleased {
                        task_id,
                        reason: "the worker restarted before the task finished; the server redelivers it"
                            .into(),
                    },
                )
                .await;
            }
        }
    }
}
