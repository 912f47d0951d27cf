//! `quilt ps`, `inspect`, `exec`, `stop`, `rm` and `logs`: the control API
//! from the command line.
//! Workers are found with the micro service discovery (`$SRV.PING.quilt`),
//! then each is asked on its own subject.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use quilt::broker::subjects;
use quilt::protocol::{ApiReply, ContainerRequest, ContainerSummary, LogChunkReply, TaskResult};

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
    /// The container's id, or a long-running container's name.
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
        println!(
            "{:<32} {:<16} {:<8} {:<34} {:<20} {:>8}",
            "CONTAINER", "NAME", "STATUS", "TASK", "WORKER", "PID"
        );
        for container in containers {
            let pid = container.pid.map_or_else(|| "-".to_owned(), |pid| pid.to_string());
            let status = match (container.status.as_str(), container.exit_code, container.signal) {
                ("exited", Some(code), _) => format!("exited({code})"),
                ("exited", None, Some(signal)) => format!("killed({signal})"),
                (status, _, _) => status.to_owned(),
            };
            println!(
                "{:<32} {:<16} {:<8} {:<34} {:<20} {:>8}",
                container.id,
                container.name.as_deref().unwrap_or("-"),
                status,
                container.task_id,
                container.worker_id,
                pid
            );
        }
        Ok(0)
    })
}

pub(crate) fn inspect(data_dir: &Path, args: InspectArgs) -> anyhow::Result<u8> {
    runtime()?.block_on(async move {
        let client = args.nats.connect(data_dir).await?;
        // Container ids start with their worker's id; a long-running
        // container's name is resolved by whichever worker answers (it relays
        // to the owner).
        let workers = discover(&client).await?;
        let owner = workers.iter().find(|worker| args.id.starts_with(&format!("{worker}.")));
        let worker = match owner {
            Some(owner) => owner.as_str(),
            None if !workers.is_empty() => subjects::API_ANY,
            None => bail!("no worker answered (is one running against this NATS?)"),
        };
        match ask::<ContainerSummary>(&client, worker, "containers.inspect", &args.id).await? {
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

#[derive(Args, Debug)]
pub(crate) struct ExecArgs {
    /// The long-running container's name.
    name: String,
    /// Environment variable NAME=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Working directory inside the container.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// UID[:GID] to run as.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Wall-clock limit in seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Args, Debug)]
pub(crate) struct StopArgs {
    /// The long-running container's name.
    name: String,
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 10.0)]
    grace: f64,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Args, Debug)]
pub(crate) struct RmArgs {
    /// The long-running container's name.
    name: String,
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 10.0)]
    grace: f64,
    /// Only drop the name's registration: for a container whose worker is
    /// gone for good (refused while that worker answers).
    #[arg(long)]
    forget: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Args, Debug)]
pub(crate) struct LogsArgs {
    /// The long-running container's name.
    name: String,
    /// Keep printing what the container writes.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only the last K lines (then follow, with --follow).
    #[arg(long)]
    tail: Option<usize>,
    #[command(flatten)]
    nats: NatsArgs,
}

/// Asks whichever worker answers `quilt.api.any.<verb>` (it relays to the
/// container's owner).
async fn ask_any<T: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    verb: &str,
    request: &ContainerRequest,
    timeout: Duration,
) -> anyhow::Result<ApiReply<T>> {
    let body = serde_json::to_vec(request)?;
    // The client's own request timeout (10 s by default) would cut a stop's
    // grace period short: this one waits as long as the verb may take.
    let request = async_nats::Request::new().payload(body.into()).timeout(Some(timeout));
    let reply = client
        .send_request(subjects::api(subjects::API_ANY, verb), request)
        .await
        .with_context(|| format!("asking for {verb} (is a worker running against this NATS?)"))?;
    serde_json::from_slice(&reply.payload).with_context(|| format!("the {verb} reply does not parse"))
}

fn report<T>(reply: ApiReply<T>) -> Result<T, u8> {
    match reply {
        ApiReply::Ok(value) => Ok(value),
        ApiReply::Error(error) => {
            eprintln!("quilt: {}: {}", error.kind, error.message);
            Err(1)
        }
    }
}

pub(crate) fn exec(data_dir: &Path, args: ExecArgs) -> anyhow::Result<u8> {
    runtime()?.block_on(async move {
        let client = args.nats.connect(data_dir).await?;
        let mut env = std::collections::BTreeMap::new();
        for pair in &args.env {
            let (name, value) =
                pair.split_once('=').with_context(|| format!("--env {pair:?}: use NAME=VALUE"))?;
            env.insert(name.to_owned(), value.to_owned());
        }
        let request = ContainerRequest {
            name: args.name,
            command: args.command,
            env,
            workdir: args.workdir,
            user: args.user,
            timeout_s: args.timeout,
            ..Default::default()
        };
        let wait = Duration::from_secs_f64(args.timeout.unwrap_or(3600.0) + 30.0);
        let result = match report(ask_any::<TaskResult>(&client, "containers.exec", &request, wait).await?) {
            Ok(result) => result,
            Err(code) => return Ok(code),
        };
        use std::io::Write;
        std::io::stdout().write_all(result.stdout.as_bytes())?;
        std::io::stderr().write_all(result.stderr.as_bytes())?;
        if let Some(error) = &result.error {
            eprintln!("quilt: {:?}: {}: {}", result.status, error.kind, error.message);
        }
        Ok(super::tasks::result_exit_code(&result))
    })
}

pub(crate) fn stop(data_dir: &Path, args: StopArgs) -> anyhow::Result<u8> {
    runtime()?.block_on(async move {
        let client = args.nats.connect(data_dir).await?;
        let request = ContainerRequest { name: args.name, grace_s: Some(args.grace), ..Default::default() };
        let wait = Duration::from_secs_f64(args.grace.max(0.0) + 30.0);
        match report(ask_any::<ContainerSummary>(&client, "containers.stop", &request, wait).await?) {
            Ok(summary) => {
                println!("{}", serde_json::to_string_pretty(&summary)?);
                Ok(0)
            }
            Err(code) => Ok(code),
        }
    })
}

pub(crate) fn rm(data_dir: &Path, args: RmArgs) -> anyhow::Result<u8> {
    runtime()?.block_on(async move {
        let client = args.nats.connect(data_dir).await?;
        let verb = if args.forget { "containers.forget" } else { "containers.remove" };
        let request = ContainerRequest { name: args.name, grace_s: Some(args.grace), ..Default::default() };
        let wait = Duration::from_secs_f64(args.grace.max(0.0) + 30.0);
        match report(ask_any::<String>(&client, verb, &request, wait).await?) {
            Ok(name) => {
                println!("{name}");
                Ok(0)
            }
            Err(code) => Ok(code),
        }
    })
}

pub(crate) fn logs(data_dir: &Path, args: LogsArgs) -> anyhow::Result<u8> {
    use std::io::Write;
    runtime()?.block_on(async move {
        let client = args.nats.connect(data_dir).await?;
        let mut request = ContainerRequest { name: args.name.clone(), tail: args.tail, ..Default::default() };
        let mut stdout = std::io::stdout();
        loop {
            let chunk = match report(
                ask_any::<LogChunkReply>(&client, "containers.logs", &request, Duration::from_secs(10))
                    .await?,
            ) {
                Ok(chunk) => chunk,
                Err(code) => return Ok(code),
            };
            stdout.write_all(chunk.data.as_bytes())?;
            stdout.flush()?;
            if chunk.next > chunk.start && request.tail.is_none() {
                // More may be there right away.
                request.offset = Some(chunk.next);
                continue;
            }
            if !args.follow {
                return Ok(0);
            }
            request.tail = None;
            request.offset = Some(chunk.next);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}
