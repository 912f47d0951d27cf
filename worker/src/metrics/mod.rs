//! Metrics: what a worker counts about its tasks, and a small HTTP endpoint
//! serving it in the Prometheus text format (version 0.0.4) on
//! `GET /metrics`.
//!
//! It owns the counters and histograms ([`Metrics`]: plain atomics, so
//! counting on a task's path takes no lock) and the listening socket handed
//! to [`MetricsListener::serve`]. It knows nothing of tasks, NATS or the
//! event log: the orchestrator feeds the counters and answers
//! [`Source::gauges`] with what is true at the moment of a scrape (tasks
//! running, queue depth, event log size).
//!
//! Why by hand: the exposition format is a few lines of text per metric
//! and the endpoint answers one GET; the Prometheus client crates bring a
//! registry and an HTTP stack (hyper) for that. The server reads at most
//! 8 KiB of request head within 5 s, serves a few connections at once and
//! closes each after one response, so a slow or hostile client cannot hold
//! the worker (see `server.rs`).

mod server;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::TaskStatus;

pub use server::{MetricsError, MetricsListener, MetricsServer, CLIENT_TIMEOUT, MAX_HEAD_BYTES};

/// The file in the worker's data directory that holds the endpoint's bound
/// address (`127.0.0.1:9464`), written once it serves, removed when it stops.
pub const ADDRESS_FILE: &str = "metrics.addr";

/// Upper bounds, in seconds, of the histograms' buckets: from a task
/// answered at once to the default task timeout (5 min); longer ones land
/// in `+Inf`.
pub const BUCKETS: [f64; 15] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// The statuses of the result protocol, in the order they are exposed.
const STATUSES: [TaskStatus; 6] = [
    TaskStatus::Succeeded,
    TaskStatus::Failed,
    TaskStatus::TimedOut,
    TaskStatus::OomKilled,
    TaskStatus::Rejected,
    TaskStatus::Error,
];

/// A status's label value: its name on the wire.
fn status_label(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Succeeded => "succeeded",
        TaskStatus::Failed => "failed",
        TaskStatus::TimedOut => "timed_out",
        TaskStatus::OomKilled => "oom_killed",
        TaskStatus::Rejected => "rejected",
        TaskStatus::Error => "error",
    }
}

fn status_index(status: TaskStatus) -> usize {
    match status {
        TaskStatus::Succeeded => 0,
        TaskStatus::Failed => 1,
        TaskStatus::TimedOut => 2,
        TaskStatus::OomKilled => 3,
        TaskStatus::Rejected => 4,
        TaskStatus::Error => 5,
    }
}

/// A histogram with the fixed [`BUCKETS`]: a counter per bucket and the
/// sum of the observations in microseconds.
#[derive(Debug, Default)]
struct Histogram {
    /// Observations per bucket, not cumulative; the last one counts those
    /// above every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// An observation is capped at a year, so the sum cannot wrap in practice.
const MAX_OBSERVATION_MICROS: u64 = 365 * 24 * 3600 * 1_000_000;

impl Histogram {
    fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = BUCKETS.iter().position(|bound| seconds <= *bound).unwrap_or(BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX).min(MAX_OBSERVATION_MICROS);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// The counters and histograms a worker keeps. Cheap to update from any
/// thread; read only by a scrape.
#[derive(Debug)]
pub struct Metrics {
    tasks: [AtomicU64; STATUSES.len()],
    task_duration: Histogram,
    task_queue: Histogram,
    environment_hits: AtomicU64,
    environment_misses: AtomicU64,
    environment_builds_ok: AtomicU64,
    environment_builds_failed: AtomicU64,
    sample_errors: AtomicU64,
    started_unix_s: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// All at zero; the start time is now.
    pub fn new() -> Metrics {
        Metrics {
            tasks: Default::default(),
            task_duration: Histogram::default(),
            task_queue: Histogram::default(),
            environment_hits: AtomicU64::new(0),
            environment_misses: AtomicU64::new(0),
            environment_builds_ok: AtomicU64::new(0),
            environment_builds_failed: AtomicU64::new(0),
            sample_errors: AtomicU64::new(0),
            started_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |since| since.as_secs_f64()),
        }
    }

    /// A result with `status` was published (stored in `QUILT_RESULTS`).
    pub fn task_finished(&self, status: TaskStatus) {
        self.tasks[status_index(status)].fetch_add(1, Ordering::Relaxed);
    }

    /// A task's command ran for `duration` (container creation to its exit).
    pub fn task_ran(&self, duration: Duration) {
        self.task_duration.observe(duration);
    }

    /// A task was started `queued` after its publish.
    pub fn task_started(&self, queued: Duration) {
        self.task_queue.observe(queued);
    }

    /// A task's language environment was found built.
    pub fn environment_hit(&self) {
        self.environment_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// A task's language environment had to be built.
    pub fn environment_miss(&self) {
        self.environment_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// An environment build ended, stored (`ok`) or not.
    pub fn environment_built(&self, ok: bool) {
        let counter = if ok { &self.environment_builds_ok } else { &self.environment_builds_failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A sample of a scrape could not be read (and was left out).
    pub fn sample_failed(&self) {
        self.sample_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// The shared task consumer's backlog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Tasks not yet delivered to any worker (`num_pending`).
    pub pending: u64,
    /// Tasks delivered and not yet acked (`num_ack_pending`).
    pub ack_pending: u64,
}

/// What a scrape reads from the worker at that moment. `None`: the value
/// could not be read; its sample is left out rather than reported as 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Tasks this worker holds right now.
    pub tasks_running: u64,
    /// Long-running containers of this worker whose command runs.
    pub containers_running: u64,
    /// The shared consumer's backlog.
    pub queue: Option<QueueDepth>,
    /// Size of the event log file.
    pub event_log_bytes: Option<u64>,
}

/// What the endpoint serves: the worker's counters and its gauges of the
/// moment. A test seam as much as an interface: the orchestrator's
/// `WorkerView` is the real one.
pub trait Source: Send + Sync + 'static {
    /// The counters.
    fn metrics(&self) -> &Metrics;
    /// The gauges, read now; a failed read counts [`Metrics::sample_failed`].
    fn gauges(&self) -> impl std::future::Future<Output = Gauges> + Send;
}

/// Writes metric families in the text format, each with its `# HELP` and
/// `# TYPE` lines.
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // `fmt::Write` for a String cannot fail.
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, label_value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape_label_value(label_value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.family(name, "histogram", help);
        let bucket_name = format!("{name}_bucket");
        // `_count` is the cumulative total, so it always equals `+Inf`
        // even while observations land during the scrape.
        let mut cumulative = 0u64;
        for (bound, count) in BUCKETS.iter().zip(&histogram.buckets) {
            cumulative += count.load(Ordering::Relaxed);
            self.sample(&bucket_name, &[("le", &bound.to_string())], cumulative);
        }
        cumulative += histogram.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        self.sample(&bucket_name, &[("le", "+Inf")], cumulative);
        let sum = histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], cumulative);
    }
}

/// A label value with `\`, `"` and newlines escaped, as the format asks.
fn escape_label_value(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The whole exposition of `metrics` and `gauges`.
pub fn render(metrics: &Metrics, gauges: &Gauges) -> String {
    let mut out = Exposition { text: String::with_capacity(8192) };
    out.family(
        "quilt_tasks_total",
        "counter",
        "Results this worker published (stored in QUILT_RESULTS), by status.",
    );
    for status in STATUSES {
        let count = metrics.tasks[status_index(status)].load(Ordering::Relaxed);
        out.sample("quilt_tasks_total", &[("status", status_label(status))], count);
    }
    out.histogram(
        "quilt_task_duration_seconds",
        "Run time of a task's command: from its container's creation to the command's exit.",
        &metrics.task_duration,
    );
    out.histogram(
        "quilt_task_queue_seconds",
        "Time from a task's publish (the stream's timestamp) to this worker starting it.",
        &metrics.task_queue,
    );
    out.single("quilt_tasks_running", "gauge", "Tasks this worker holds right now.", gauges.tasks_running);
    out.single(
        "quilt_containers_running",
        "gauge",
        "Long-running containers of this worker whose command is running.",
        gauges.containers_running,
    );
    out.family(
        "quilt_queue_pending",
        "gauge",
        "Tasks waiting in the shared queue, not yet delivered to any worker (left out when unreadable).",
    );
    if let Some(queue) = gauges.queue {
        out.sample("quilt_queue_pending", &[], queue.pending);
    }
    out.family(
        "quilt_queue_ack_pending",
        "gauge",
        "Tasks of the shared queue delivered to a worker and not yet acked (left out when unreadable).",
    );
    if let Some(queue) = gauges.queue {
        out.sample("quilt_queue_ack_pending", &[], queue.ack_pending);
    }
    out.single(
        "quilt_environment_cache_hits_total",
        "counter",
        "Language environments found already built.",
        metrics.environment_hits.load(Ordering::Relaxed),
    );
    out.single(
        "quilt_environment_cache_misses_total",
        "counter",
        "Language environments that had to be built.",
        metrics.environment_misses.load(Ordering::Relaxed),
    );
    out.family("quilt_environment_builds_total", "counter", "Language environment builds, by outcome.");
    out.sample(
        "quilt_environment_builds_total",
        &[("outcome", "ok")],
        metrics.environment_builds_ok.load(Ordering::Relaxed),
    );
    out.sample(
        "quilt_environment_builds_total",
        &[("outcome", "failed")],
        metrics.environment_builds_failed.load(Ordering::Relaxed),
    );
    out.family(
        "quilt_event_log_bytes",
        "gauge",
        "Size of the worker's event log file (left out when unreadable).",
    );
    if let Some(bytes) = gauges.event_log_bytes {
        out.sample("quilt_event_log_bytes", &[], bytes);
    }
    out.single(
        "quilt_metrics_errors_total",
        "counter",
        "Samples left out of a scrape because they could not be read.",
        metrics.sample_errors.load(Ordering::Relaxed),
    );
    out.single(
        "quilt_worker_start_time_seconds",
        "gauge",
        "When the worker started, in seconds since the Unix epoch.",
        metrics.started_unix_s,
    );
    out.family("quilt_build_info", "gauge", "The worker's version, as a label; always 1.");
    out.sample("quilt_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    out.text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The samples of an exposition, checked on the way: every sample's
    /// family was announced by `# HELP` then `# TYPE`, each family once.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut helped = Vec::new();
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut samples = BTreeMap::new();
        assert!(text.ends_with('\n'), "the exposition ends with a newline");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                assert!(!helped.contains(&name), "HELP of {name} twice");
                helped.push(name);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(
                    helped.last().map(String::as_str),
                    Some(name),
                    "TYPE of {name} right after its HELP"
                );
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(typed.insert(name.to_owned(), kind.to_owned()).is_none(), "TYPE of {name} twice");
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                let family = match typed.get(name) {
                    Some(_) => name,
                    None => ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| name.strip_suffix(suffix))
                        .filter(|base| typed.get(*base).map(String::as_str) == Some("histogram"))
                        .unwrap_or_else(|| panic!("sample {name} of an unannounced family")),
                };
                assert!(name.starts_with("quilt_") && family.starts_with("quilt_"));
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
                assert!(samples.insert(series.to_owned(), value).is_none(), "{series} twice");
            }
        }
        samples
    }

    #[test]
    fn status_labels_are_the_wire_names_of_the_statuses() {
        for (index, status) in STATUSES.into_iter().enumerate() {
            assert_eq!(status_index(status), index);
            assert_eq!(serde_json::to_value(status).unwrap(), status_label(status));
        }
    }

    #[test]
    fn every_family_is_announced_and_every_status_exposed_from_zero() {
        let samples = parse(&render(&Metrics::new(), &Gauges::default()));
        for status in ["succeeded", "failed", "timed_out", "oom_killed", "rejected", "error"] {
            assert_eq!(samples[&format!("quilt_tasks_total{{status=\"{status}\"}}")], 0.0);
        }
        assert_eq!(samples["quilt_task_duration_seconds_count"], 0.0);
        assert_eq!(samples["quilt_task_duration_seconds_bucket{le=\"+Inf\"}"], 0.0);
        assert_eq!(samples[&format!("quilt_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))], 1.0);
        assert!(samples["quilt_worker_start_time_seconds"] > 1.6e9);
        assert_eq!(samples["quilt_environment_builds_total{outcome=\"failed\"}"], 0.0);
    }

    #[test]
    fn histograms_are_cumulative_with_inf_sum_and_count() {
        let metrics = Metrics::new();
        for millis in [1, 5, 7, 200, 1000, 250_000, 400_000] {
            metrics.task_ran(Duration::from_millis(millis));
        }
        metrics.task_started(Duration::from_micros(1500));
        let samples = parse(&render(&metrics, &Gauges::default()));
        let bucket = |le: &str| samples[&format!("quilt_task_duration_seconds_bucket{{le=\"{le}\"}}")];
        // A value on a bound belongs to that bucket (`le`: less or equal).
        assert_eq!(bucket("0.005"), 2.0);
        assert_eq!(bucket("0.01"), 3.0);
        assert_eq!(bucket("0.1"), 3.0);
        assert_eq!(bucket("0.25"), 4.0);
        assert_eq!(bucket("1"), 5.0);
        assert_eq!(bucket("300"), 6.0);
        assert_eq!(bucket("+Inf"), 7.0);
        assert_eq!(samples["quilt_task_duration_seconds_count"], 7.0);
        let sum = samples["quilt_task_duration_seconds_sum"];
        assert!((sum - 651.213).abs() < 1e-9, "sum {sum}");
        let mut previous = 0.0;
        for bound in BUCKETS {
            let count = bucket(&bound.to_string());
            assert!(count >= previous, "buckets never decrease");
            previous = count;
        }
        assert_eq!(samples["quilt_task_queue_seconds_count"], 1.0);
        assert_eq!(samples["quilt_task_queue_seconds_bucket{le=\"0.005\"}"], 1.0);
        assert!((samples["quilt_task_queue_seconds_sum"] - 0.0015).abs() < 1e-12);
    }

    #[test]
    fn counters_and_gauges_show_what_was_counted_and_read() {
        let metrics = Metrics::new();
        metrics.task_finished(TaskStatus::Succeeded);
        metrics.task_finished(TaskStatus::Succeeded);
        metrics.task_finished(TaskStatus::OomKilled);
        metrics.environment_hit();
        metrics.environment_miss();
        metrics.environment_miss();
        metrics.environment_built(true);
        metrics.environment_built(false);
        metrics.sample_failed();
        let gauges = Gauges {
            tasks_running: 3,
            containers_running: 2,
            queue: Some(QueueDepth { pending: 17, ack_pending: 4 }),
            event_log_bytes: Some(1 << 20),
        };
        let samples = parse(&render(&metrics, &gauges));
        assert_eq!(samples["quilt_tasks_total{status=\"succeeded\"}"], 2.0);
        assert_eq!(samples["quilt_tasks_total{status=\"oom_killed\"}"], 1.0);
        assert_eq!(samples["quilt_tasks_total{status=\"failed\"}"], 0.0);
        assert_eq!(samples["quilt_tasks_running"], 3.0);
        assert_eq!(samples["quilt_containers_running"], 2.0);
        assert_eq!(samples["quilt_queue_pending"], 17.0);
        assert_eq!(samples["quilt_queue_ack_pending"], 4.0);
        assert_eq!(samples["quilt_event_log_bytes"], 1048576.0);
        assert_eq!(samples["quilt_environment_cache_hits_total"], 1.0);
        assert_eq!(samples["quilt_environment_cache_misses_total"], 2.0);
        assert_eq!(samples["quilt_environment_builds_total{outcome=\"ok\"}"], 1.0);
        assert_eq!(samples["quilt_metrics_errors_total"], 1.0);
    }

    #[test]
    fn unreadable_samples_are_left_out_not_zero() {
        let text = render(&Metrics::new(), &Gauges::default());
        let samples = parse(&text);
        assert!(!samples.contains_key("quilt_queue_pending"));
        assert!(!samples.contains_key("quilt_queue_ack_pending"));
        assert!(!samples.contains_key("quilt_event_log_bytes"));
        // Their metadata stays, so the family is known to be served.
        assert!(text.contains("# TYPE quilt_queue_pending gauge\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn huge_observations_do_not_wrap_the_sum() {
        let metrics = Metrics::new();
        metrics.task_ran(Duration::MAX);
        metrics.task_ran(Duration::MAX);
        let samples = parse(&render(&metrics, &Gauges::default()));
        assert_eq!(samples["quilt_task_duration_seconds_bucket{le=\"+Inf\"}"], 2.0);
        assert_eq!(samples["quilt_task_duration_seconds_bucket{le=\"300\"}"], 0.0);
        assert_eq!(samples["quilt_task_duration_seconds_sum"], 2.0 * MAX_OBSERVATION_MICROS as f64 / 1e6);
    }
}
