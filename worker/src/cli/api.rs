//! `quilt ps` and `quilt inspect`: the control API from the command line.
//! Workers are found with the micro service discovery (`$SRV.PING.quilt`),
//! then each is asked on its own subject.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use quilt::broker::subjects;
use quilt::protocol::{ApiReply, ContainerSummary};

use super::nats::NatsArgs;

/// How long discovery waits for workers to answer.
const DISCOVERY: Duration = Duration::from_millis(500);

#[derive(Args, Debug)]
pub(crate) struct PsArgs {
    /// Only this worker's containers.
    #[arg(long)]
    worker: Option<String>,
    /// Print JSON (one array) instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Args, Debug)]
pub(crate) struct InspectArgs {
    /// The container's id.
    id: String,
    #[command(flatten)]
    nats: NatsArgs,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

/// The ids of the workers whose control API answers a ping.
pub(crate) async fn discover(client: &async_nats::Client) -> anyhow::Result<Vec<String>> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client.publish_with_reply(subjects::API_PING, inbox, "".into()).await?;
    client.flush().await?;
    let mut workers = Vec::new();
    let deadline = tokio::time::Instant::now() + DISCOVERY;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await {
        let ping: serde_json::Value = serde_json::from_slice(&message.payload).unwrap_or_default();
        if let Some(id) = ping["metadata"]["worker_id"].as_str() {
            workers.push(id.to_owned());
        }
    }
    workers.sort();
    workers.dedup();
    Ok(workers)
}

async fn ask<T: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    worker: &str,
    verb: &str,
    body: &str,
) -> anyhow::Result<ApiReply<T>> {
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(subjects::api(worker, verb), body.to_owned().into()),
    )
    .await
    .with_context(|| format!("worker {worker} did not answer {verb}"))?
    .with_context(|| format!("asking worker {worker} for {verb}"))?;
    serde_json::from_slice(&reply.payload)
        .with_context(|| format!("worker {worker}'s {verb} reply does not parse"))
}

pub(crate) fn ps(data_dir: &Path, args: PsArgs) -> anyhow::Result<u8> {
    runtime()?.block_on(async move {
        let client = args.nats.connect(data_dir).await?;
        let workers = match args.worker {
            Some(worker) => vec![worker],
            None => discover(&client).await?,
        };
        let mut containers: Vec<ContainerSummary> = Vec::new();
        for worker in &workers {
            match ask::<Vec<ContainerSummary>>(&client, worker, "containers.list", "").await? {
                ApiReply::Ok(list) => containers.extend(list),
                ApiReply::Error(error) => {
                    eprintln!("quilt: worker {worker}: {}: {}", error.kind, error.message)
                }
            }
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&containers)?);
            return Ok(0);
        }
        if workers.is_empty() {
            eprintln!("quilt: no worker answered (is one running against this NATS?)");
        }
        println!("{:<32} {:<34} {:<20} {:>8}", "CONTAINER", "TASK", "WORKER", "PID");
        for container in containers {
            let pid = container.pid.map_or_else(|| "-".to_owned(), |pid| pid.to_string());
            println!("{:<32} {:<34} {:<20} {:>8}", container.id, container.task_id, container.worker_id, pid);
        }
        Ok(0)
    })
}

pub(crate) fn inspect(data_dir: &Path, args: InspectArgs) -> anyhow::Result<u8> {
    runtime()?.block_on(async move {
        let client = args.nats.connect(data_dir).await?;
        // Container ids start with their worker's id.
        let workers = discover(&client).await?;
        let owner = workers.iter().find(|worker| args.id.starts_with(&format!("{worker}.")));
        let Some(owner) = owner else {
            bail!("no running worker owns container {} (workers: {})", args.id, workers.join(", "));
        };
        match ask::<ContainerSummary>(&client, owner, "containers.inspect", &args.id).await? {
            ApiReply::Ok(container) => {
                println!("{}", serde_json::to_string_pretty(&container)?);
                Ok(0)
            }
            ApiReply::Error(error) => {
                eprintln!("quilt: {}: {}", error.kind, error.message);
                Ok(1)
            }
        }
    })
}
