//! Connecting to NATS and creating Quilt's JetStream streams, consumer and
//! KV bucket: the one place their settings live (DESIGN.md "Wire
//! protocol"). [`ensure`] is idempotent: every worker calls it at start, and
//! a stream whose settings differ from this build's is updated to them.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, kv, Context};

use super::subjects;

/// Failures connecting to NATS or setting up JetStream, named after the step.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Reading the credentials file.
    #[error("reading the NATS credentials file {path}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the server.
    #[error("connecting to NATS at {url}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: async_nats::ConnectError,
    },
    /// Creating or updating a stream.
    #[error("setting up the JetStream stream {name} (is JetStream enabled on the server?)")]
    Stream {
        /// The stream.
        name: &'static str,
        /// Why.
        #[source]
        source: async_nats::Error,
    },
    /// Creating or updating the workers' consumer.
    #[error("setting up the JetStream consumer {name}")]
    Consumer {
        /// The consumer.
        name: String,
        /// Why.
        #[source]
        source: async_nats::Error,
    },
    /// Creating the KV bucket.
    #[error("setting up the KV bucket {name}")]
    KeyValue {
        /// The bucket.
        name: &'static str,
        /// Why.
        #[source]
        source: async_nats::Error,
    },
}

impl SetupError {
    /// A stable, machine-readable name of the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            SetupError::Credentials { .. } => "credentials",
            SetupError::Connect { .. } => "connect",
            SetupError::Stream { .. } => "stream",
            SetupError::Consumer { .. } => "consumer",
            SetupError::KeyValue { .. } => "key_value",
        }
    }
}

/// How to reach NATS.
#[derive(Debug, Clone, Default)]
pub struct ConnectConfig {
    /// `nats://host:port` (several, comma-separated, for a cluster).
    pub url: String,
    /// A `.creds` file (JWT + NKey seed).
    pub credentials: Option<PathBuf>,
    /// CA certificate to verify the server with; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Refuse a connection without TLS.
    pub require_tls: bool,
    /// Name shown in the server's connection list.
    pub name: String,
    /// Keep retrying the first connection (a worker waiting for its broker)
    /// instead of failing at once (a CLI command).
    pub retry_first_connect: bool,
}

/// Connects to NATS. After the first connection the client reconnects by
/// itself, forever, with backoff; publishes made while disconnected are
/// buffered (and JetStream requests time out, which callers retry).
pub async fn connect(config: &ConnectConfig) -> Result<async_nats::Client, SetupError> {
    crate::install_crypto_provider();
    // Logged and reported without the password.
    let url = without_credentials(&config.url);
    let mut options = async_nats::ConnectOptions::new()
        .name(&config.name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        // Connection changes are what an operator needs to see in a
        // worker's log; the client reports them only as events.
        .event_callback(move |event| {
            let url = url.clone();
            async move {
                match event {
                    async_nats::Event::Connected => tracing::info!(%url, "connected to NATS"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!(%url, "disconnected from NATS; reconnecting")
                    }
                    other => tracing::warn!(%url, event = %other, "NATS connection event"),
                }
            }
        });
    if let Some(path) = &config.credentials {
        options = options
            .credentials_file(path)
            .await
            .map_err(|source| SetupError::Credentials { path: path.clone(), source })?;
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((certificate, key)) = &config.tls_client {
        options = options.add_client_certificate(certificate.clone(), key.clone());
    }
    if config.require_tls {
        options = options.require_tls(true);
    }
    if config.retry_first_connect {
        options = options.retry_on_initial_connect();
    }
    // A user and password in the URL (`nats://worker:secret@hub:4222`, as
    // the accounts of broker-config/accounts.conf expect) are sent as the
    // connection's credentials; the client does not take them from the URL.
    let (urls, user_and_password) = split_user_and_password(&config.url);
    if let Some((user, password)) = user_and_password {
        options = options.user_and_password(user, password);
    }
    // The URL with its secret removed is the one errors and logs show. A
    // cluster is several URLs separated by commas; the client takes them
    // as a list (a `&str` is one address to it).
    let servers: Vec<String> =
        urls.split(',').map(|url| url.trim().to_owned()).filter(|url| !url.is_empty()).collect();
    options.connect(servers).await.map_err(|source| SetupError::Connect { url: urls.clone(), source })
}

/// `urls` without the user information, for logs and messages.
pub fn without_credentials(urls: &str) -> String {
    split_user_and_password(urls).0
}

/// The server URLs without user information, and the first user and
/// password found in them.
fn split_user_and_password(urls: &str) -> (String, Option<(String, String)>) {
    let mut credentials = None;
    let stripped: Vec<String> = urls
        .split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = match url.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, url),
            };
            let (authority, path) = match rest.find('/') {
                Some(at) => rest.split_at(at),
                None => (rest, ""),
            };
            let host = match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    if credentials.is_none() {
                        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                        credentials = Some((user.to_owned(), password.to_owned()));
                    }
                    host
                }
                None => authority,
            };
            match scheme {
                Some(scheme) => format!("{scheme}://{host}{path}"),
                None => format!("{host}{path}"),
            }
        })
        .collect();
    (stripped.join(","), credentials)
}

#[cfg(test)]
mod url_tests {
    use super::split_user_and_password;

    #[test]
    fn user_and_password_are_taken_out_of_the_urls() {
        assert_eq!(split_user_and_password("nats://127.0.0.1:4222"), ("nats://127.0.0.1:4222".into(), None));
        assert_eq!(
            split_user_and_password("nats://worker:s3cr:et@hub:4222,nats://hub2:4222"),
            ("nats://hub:4222,nats://hub2:4222".into(), Some(("worker".into(), "s3cr:et".into())))
        );
        assert_eq!(
            split_user_and_password("tls://agent:pw@10.0.0.1:4222"),
            ("tls://10.0.0.1:4222".into(), Some(("agent".into(), "pw".into())))
        );
    }
}

/// The settings of Quilt's streams and consumer. Defaults follow DESIGN.md.
#[derive(Debug, Clone)]
pub struct JetStreamSettings {
    /// How long a claimed task may go without an ack or progress ack before
    /// the server gives it to another worker.
    pub ack_wait: Duration,
    /// Deliveries of a task before it is dead-lettered.
    pub max_deliver: i64,
    /// Tasks claimed and not yet acked, across the fleet.
    pub max_ack_pending: i64,
    /// Largest task message, bytes.
    pub max_task_bytes: i32,
    /// A task id published again within this window is dropped as a duplicate.
    pub task_duplicate_window: Duration,
    /// How long results are kept.
    pub results_max_age: Duration,
    /// How long live output is kept for replay.
    pub output_max_age: Duration,
    /// How long mirrored events are kept.
    pub events_max_age: Duration,
    /// How long dead letters are kept.
    pub dlq_max_age: Duration,
    /// Replicas of every stream (1 on a single node, 3 on the cluster).
    pub replicas: usize,
}

impl Default for JetStreamSettings {
    fn default() -> Self {
        JetStreamSettings {
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            max_ack_pending: 1024,
            max_task_bytes: 1024 * 1024,
            task_duplicate_window: Duration::from_secs(120),
            results_max_age: Duration::from_secs(24 * 3600),
            output_max_age: Duration::from_secs(15 * 60),
            events_max_age: Duration::from_secs(24 * 3600),
            dlq_max_age: Duration::from_secs(30 * 24 * 3600),
            replicas: 1,
        }
    }
}

/// Handles on what [`ensure`] set up.
#[derive(Debug, Clone)]
pub struct JetStreamHandles {
    /// The JetStream context.
    pub context: Context,
    /// `QUILT_TASKS`.
    pub tasks: stream::Stream,
    /// `QUILT_RESULTS`.
    pub results: stream::Stream,
    /// The workers' shared pull consumer on `quilt.tasks`.
    pub consumer: jetstream::consumer::Consumer<pull::Config>,
    /// The KV bucket `quilt_containers`: long-running container name ->
    /// owning worker.
    pub containers: kv::Store,
}

/// The context with the request timeout Quilt uses: long enough for a
/// server fsyncing every write on a slow disk.
pub fn context(client: async_nats::Client) -> Context {
    let mut context = jetstream::new(client);
    context.set_timeout(Duration::from_secs(10));
    context
}

/// Creates (or updates) every stream, the workers' consumer and the KV
/// bucket. Safe to call from every worker at every start.
pub async fn ensure(context: &Context, settings: &JetStreamSettings) -> Result<JetStreamHandles, SetupError> {
    let replicas = settings.replicas.max(1);
    let tasks = ensure_stream(
        context,
        subjects::TASKS_STREAM,
        stream::Config {
            description: Some("Quilt tasks: a work queue, one delivery per worker at a time".into()),
            subjects: vec![subjects::TASKS.into(), format!("{}.*", subjects::TASKS_FOR_WORKER_PREFIX)],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            max_message_size: settings.max_task_bytes,
            duplicate_window: settings.task_duplicate_window,
            num_replicas: replicas,
            allow_direct: true,
            ..Default::default()
        },
    )
    .await?;
    let results = ensure_stream(
        context,
        subjects::RESULTS_STREAM,
        stream::Config {
            description: Some("Quilt results: one per task id".into()),
            // Workers publish on quilt.worker.results.<id>; the result is
            // stored as quilt.results.<id> and, once stored, republished
            // there. A publish the stream refuses (a second result for the
            // task) therefore never reaches anyone, not even a plain
            // subscriber. Needs nats-server 2.10+.
            subjects: vec![subjects::RESULTS_INPUT_ALL.into()],
            subject_transform: Some(stream::SubjectTransform {
                source: subjects::RESULTS_INPUT_ALL.into(),
                destination: "quilt.results.{{wildcard(1)}}".into(),
            }),
            republish: Some(stream::Republish {
                source: subjects::RESULTS_ALL.into(),
                destination: "quilt.results.{{wildcard(1)}}".into(),
                headers_only: false,
            }),
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_age: settings.results_max_age,
            max_messages_per_subject: 1,
            duplicate_window: settings.results_max_age.min(Duration::from_secs(3600)),
            num_replicas: replicas,
            allow_direct: true,
            ..Default::default()
        },
    )
    .await?;
    // Live output is a convenience for replay (the result carries the
    // output) and the events are a mirror (each worker's redb log is the
    // record): both in memory, bounded, without the fsync per message that
    // `sync_interval: always` costs file streams.
    ensure_stream(
        context,
        subjects::OUTPUT_STREAM,
        memory_stream(
            "Quilt live output, kept briefly for replay",
            subjects::OUTPUT_ALL,
            settings.output_max_age,
            96 * 1024 * 1024,
            replicas,
        ),
    )
    .await?;
    ensure_stream(
        context,
        subjects::EVENTS_STREAM,
        memory_stream(
            "Quilt workers' lifecycle events (mirrors of their event logs)",
            subjects::EVENTS_ALL,
            settings.events_max_age,
            64 * 1024 * 1024,
            replicas,
        ),
    )
    .await?;
    ensure_stream(
        context,
        subjects::DLQ_STREAM,
        stream::Config {
            description: Some("Quilt dead letters: tasks that used up their deliveries".into()),
            subjects: vec![subjects::DLQ.into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_age: settings.dlq_max_age,
            duplicate_window: Duration::from_secs(3600),
            num_replicas: replicas,
            ..Default::default()
        },
    )
    .await?;
    let consumer =
        ensure_consumer(&tasks, settings, subjects::WORKERS_CONSUMER, subjects::TASKS.into()).await?;
    let containers = ensure_bucket(context, replicas).await?;
    Ok(JetStreamHandles { context: context.clone(), tasks, results, consumer, containers })
}

/// Creates (or updates) the durable consumer of tasks routed to one worker
/// (`quilt.tasks.worker.<id>`: tasks for the long-running containers it
/// owns). Its filter does not overlap the shared consumer's, as a
/// work-queue stream requires.
pub async fn ensure_worker_consumer(
    tasks: &stream::Stream,
    settings: &JetStreamSettings,
    worker_id: &str,
) -> Result<jetstream::consumer::Consumer<pull::Config>, SetupError> {
    ensure_consumer(
        tasks,
        settings,
        &subjects::worker_consumer(worker_id),
        subjects::tasks_for_worker(worker_id),
    )
    .await
}

/// A bounded in-memory stream that drops its oldest messages when full.
fn memory_stream(
    description: &str,
    subject: &str,
    max_age: Duration,
    max_bytes: i64,
    replicas: usize,
) -> stream::Config {
    stream::Config {
        description: Some(description.into()),
        subjects: vec![subject.into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::Memory,
        max_age,
        max_bytes,
        discard: DiscardPolicy::Old,
        num_replicas: replicas,
        allow_direct: true,
        ..Default::default()
    }
}

async fn ensure_stream(
    context: &Context,
    name: &'static str,
    mut config: stream::Config,
) -> Result<stream::Stream, SetupError> {
    config.name = name.into();
    // Memory streams hold replayable conveniences, not records: when an
    // older build made one on file (a stream update cannot change the
    // storage type), it is recreated rather than refused.
    if config.storage == StorageType::Memory {
        if let Ok(mut existing) = context.get_stream(name).await {
            let storage = existing.info().await.map(|info| info.config.storage).ok();
            if storage.is_some_and(|storage| storage != config.storage) {
                tracing::warn!(stream = name, "recreating the stream with this build's storage type");
                context
                    .delete_stream(name)
                    .await
                    .map_err(|source| SetupError::Stream { name, source: source.into() })?;
            }
        }
    }
    context
        .create_or_update_stream(config)
        .await
        .map_err(|source| SetupError::Stream { name, source: source.into() })?;
    context.get_stream(name).await.map_err(|source| SetupError::Stream { name, source: source.into() })
}

async fn ensure_consumer(
    tasks: &stream::Stream,
    settings: &JetStreamSettings,
    name: &str,
    filter_subject: String,
) -> Result<jetstream::consumer::Consumer<pull::Config>, SetupError> {
    let config = pull::Config {
        durable_name: Some(name.into()),
        description: Some(format!("Quilt workers pull tasks on {filter_subject} from here")),
        filter_subject,
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: settings.max_deliver,
        max_ack_pending: settings.max_ack_pending,
        max_waiting: 512,
        ..Default::default()
    };
    let error = |source: async_nats::Error| SetupError::Consumer { name: name.to_owned(), source };
    match tasks.consumer_info(name).await {
        Ok(info) => {
            let current = &info.config;
            if current.ack_wait != config.ack_wait
                || current.max_deliver != config.max_deliver
                || current.max_ack_pending != config.max_ack_pending
            {
                tasks.update_consumer(config).await.map_err(|e| error(e.into()))?;
            }
            tasks.get_consumer(name).await.map_err(error)
        }
        Err(_) => {
            // Another worker may create it at the same moment: creating an
            // identical consumer is accepted by the server.
            tasks.create_consumer(config).await.map_err(|e| error(e.into()))
        }
    }
}

async fn ensure_bucket(context: &Context, replicas: usize) -> Result<kv::Store, SetupError> {
    let name = subjects::CONTAINERS_BUCKET;
    if let Ok(store) = context.get_key_value(name).await {
        return Ok(store);
    }
    context
        .create_key_value(kv::Config {
            bucket: name.into(),
            description: "Quilt long-running containers: name -> owning worker id".into(),
            history: 1,
            storage: StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|source| SetupError::KeyValue { name, source: source.into() })
}
