//! NATS connection flags shared by every verb that talks to NATS, and the
//! client side of the protocol: publish a task, follow its output, await
//! its result.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::message::PublishMessage;
use clap::Args;
use futures_util::StreamExt;
use quilt::broker::{self, subjects, ConnectConfig};
use quilt::protocol::{Task, TaskResult};

/// The file in the data directory where `quilt up` writes its broker's URL.
pub(crate) const URL_FILE: &str = "nats.url";

#[derive(Args, Debug, Clone)]
pub(crate) struct NatsArgs {
    /// NATS server URL(s), comma-separated. Default: the URL `quilt up`
    /// wrote into the data directory, else nats://127.0.0.1:4222.
    #[arg(long, env = "QUILT_NATS_URL")]
    pub(crate) nats: Option<String>,
    /// NATS credentials file (.creds).
    #[arg(long, env = "QUILT_NATS_CREDS")]
    pub(crate) creds: Option<PathBuf>,
    /// CA certificate for TLS to NATS (implies TLS).
    #[arg(long, env = "QUILT_TLS_CA")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (with --tls-key).
    #[arg(long, env = "QUILT_TLS_CERT", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Client key for mutual TLS (with --tls-cert).
    #[arg(long, env = "QUILT_TLS_KEY", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
}

impl NatsArgs {
    pub(crate) fn url(&self, data_dir: &Path) -> String {
        if let Some(url) = &self.nats {
            return url.clone();
        }
        std::fs::read_to_string(data_dir.join(URL_FILE))
            .ok()
            .map(|text| text.trim().to_owned())
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned())
    }

    pub(crate) fn config(&self, data_dir: &Path, name: &str, retry: bool) -> ConnectConfig {
        ConnectConfig {
            url: self.url(data_dir),
            credentials: self.creds.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_client: self.tls_cert.clone().zip(self.tls_key.clone()),
            require_tls: false,
            name: name.to_owned(),
            retry_first_connect: retry,
        }
    }

    /// Connects for a client verb: fails at once when nobody answers.
    pub(crate) async fn connect(&self, data_dir: &Path) -> anyhow::Result<async_nats::Client> {
        let config = self.config(data_dir, "quilt-cli", false);
        broker::connect(&config).await.with_context(|| {
            format!(
                "is a Quilt broker running? Start one with `quilt up`, or give --nats URL (tried {})",
                broker::without_credentials(&config.url)
            )
        })
    }
}

/// Publishes `task` (whose id is set) to `quilt.tasks` with `Nats-Msg-Id`
/// = its id, and waits for the stream's acknowledgement.
pub(crate) async fn publish_task(
    context: &async_nats::jetstream::Context,
    task: &Task,
) -> anyhow::Result<bool> {
    let id = task.id.as_deref().context("the task has no id")?;
    let payload = serde_json::to_vec(task)?;
    let ack = context
        .send_publish(subjects::TASKS, PublishMessage::build().payload(payload.into()).message_id(id))
        .await
        .context("publishing the task")?
        .await
        .context("the task queue did not accept the task")?;
    Ok(ack.duplicate)
}

/// Follows the result subject of `task_id`: the stored result if there is
/// one, else the next one published.
pub(crate) async fn result_stream(
    context: &async_nats::jetstream::Context,
    task_id: &str,
) -> anyhow::Result<async_nats::jetstream::consumer::push::Ordered> {
    let stream = context
        .get_stream(subjects::RESULTS_STREAM)
        .await
        .context("the results stream is missing: has a worker ever started against this NATS?")?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_subject: context.client().new_inbox(),
            filter_subject: subjects::result(task_id),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .context("following the result")?;
    consumer.messages().await.context("following the result")
}

/// Waits for the next result on `results`, at most `timeout` if given.
pub(crate) async fn next_result(
    results: &mut async_nats::jetstream::consumer::push::Ordered,
    timeout: Option<Duration>,
) -> anyhow::Result<Option<TaskResult>> {
    let next = async {
        match results.next().await {
            Some(Ok(message)) => serde_json::from_slice::<TaskResult>(&message.payload)
                .context("a result that does not parse")
                .map(Some),
            Some(Err(error)) => Err(anyhow::anyhow!(error).context("following the result")),
            None => bail!("the result subscription ended"),
        }
    };
    match timeout {
        Some(timeout) => match tokio::time::timeout(timeout, next).await {
            Ok(result) => result,
            Err(_) => Ok(None),
        },
        None => next.await,
    }
}
