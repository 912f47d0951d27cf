//! Every NATS subject, stream, consumer and bucket name Quilt uses, in one
//! place (DESIGN.md "Wire protocol").

/// Where agents publish tasks.
pub const TASKS: &str = "quilt.tasks";
/// Prefix of the subjects routing a task to one worker (`quilt.tasks.worker.<id>`).
pub const TASKS_FOR_WORKER_PREFIX: &str = "quilt.tasks.worker";
/// Dead letters: tasks that used up their deliveries or could not be answered.
pub const DLQ: &str = "quilt.dlq";

/// The work queue stream.
pub const TASKS_STREAM: &str = "QUILT_TASKS";
/// Results, one per task.
pub const RESULTS_STREAM: &str = "QUILT_RESULTS";
/// Live output, kept briefly.
pub const OUTPUT_STREAM: &str = "QUILT_OUTPUT";
/// Mirror of the workers' event logs.
pub const EVENTS_STREAM: &str = "QUILT_EVENTS";
/// Dead letters.
pub const DLQ_STREAM: &str = "QUILT_DLQ";
/// The durable pull consumer all workers share on `quilt.tasks`.
pub const WORKERS_CONSUMER: &str = "quilt-workers";
/// KV bucket: long-running container name -> owning worker id.
pub const CONTAINERS_BUCKET: &str = "quilt_containers";

/// Header carrying a message's id, for JetStream's duplicate detection.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// `quilt.results.<task_id>`.
pub fn result(task_id: &str) -> String {
    format!("quilt.results.{task_id}")
}

/// Every result subject.
pub const RESULTS_ALL: &str = "quilt.results.*";

/// `quilt.worker.results.<task_id>`: where workers publish a result. Only
/// `QUILT_RESULTS` listens there; it stores the result as
/// `quilt.results.<task_id>` and republishes it on that subject once stored.
pub fn result_input(task_id: &str) -> String {
    format!("quilt.worker.results.{task_id}")
}

/// Every subject workers publish results on.
pub const RESULTS_INPUT_ALL: &str = "quilt.worker.results.*";

/// `quilt.output.<task_id>.<stream>` where stream is `stdout` or `stderr`.
pub fn output(task_id: &str, stream: &str) -> String {
    format!("quilt.output.{task_id}.{stream}")
}

/// Both output streams of a task.
pub fn output_all(task_id: &str) -> String {
    format!("quilt.output.{task_id}.*")
}

/// Every output subject.
pub const OUTPUT_ALL: &str = "quilt.output.*.*";

/// `quilt.events.<worker_id>.<kind>`.
pub fn event(worker_id: &str, kind: &str) -> String {
    format!("quilt.events.{worker_id}.{kind}")
}

/// Every event subject.
pub const EVENTS_ALL: &str = "quilt.events.>";

/// The advisory the server publishes when a task used up its deliveries.
pub fn max_deliveries_advisory() -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{TASKS_STREAM}.{WORKERS_CONSUMER}")
}

/// The control API's pseudo worker id answered by any one worker.
pub const API_ANY: &str = "any";

/// `quilt.api.<worker_id>`: the prefix of a worker's control API verbs
/// (`quilt.api.any` for whichever worker answers first).
pub fn api_prefix(worker_id: &str) -> String {
    format!("quilt.api.{worker_id}")
}

/// `quilt.api.<worker_id>.<verb>`.
pub fn api(worker_id: &str, verb: &str) -> String {
    format!("quilt.api.{worker_id}.{verb}")
}

/// Discovery of every running instance of the control API service.
pub const API_PING: &str = "$SRV.PING.quilt";

/// Subject of tasks routed to worker `worker_id` (it owns their long-running container).
pub fn tasks_for_worker(worker_id: &str) -> String {
    format!("{TASKS_FOR_WORKER_PREFIX}.{worker_id}")
}

/// Durable consumer of the tasks routed to worker `worker_id`.
pub fn worker_consumer(worker_id: &str) -> String {
    format!("quilt-worker-{worker_id}")
}

/// `quilt.progress.<task_id>`: progress of a task's preparation (core NATS).
pub fn progress(task_id: &str) -> String {
    format!("quilt.progress.{task_id}")
}
