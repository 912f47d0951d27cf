//! The client verbs over NATS: `quilt run` (without `--local`), `quilt
//! submit`, `quilt result`, `quilt events`.

use std::io::IsTerminal;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use clap::Args;
use futures_util::StreamExt;
use quilt::broker::{self, subjects};
use quilt::engine::{parse_cpus, parse_duration, parse_size};
use quilt::protocol::{
    parse_task, validate_task_id, ContainerMode, ContainerOptions, Environment, EventMessage, Network,
    OutputChunk, OutputStream, Progress, RestartPolicy, Runtime, Task, TaskLimits, TaskResult, TaskStatus,
};

use super::nats::{next_result, publish_task, result_stream, NatsArgs};
use super::run::{RunArgs, EXIT_OOM_KILLED, EXIT_TIMED_OUT};
use super::EXIT_QUILT_ERROR;

#[derive(Args, Debug)]
pub(crate) struct SubmitArgs {
    /// A task as JSON (see schemas/task.json), from this file or "-" for
    /// stdin, instead of the flags. An id is added when it has none.
    #[arg(long)]
    task: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug)]
pub(crate) struct ResultArgs {
    /// The task's id.
    id: String,
    /// Wait for the result when there is none yet, at most this long (e.g. 30s).
    #[arg(long)]
    wait: Option<String>,
    #[command(flatten)]
    nats: NatsArgs,
}

#[derive(Args, Debug)]
pub(crate) struct EventsArgs {
    /// Only this worker's events.
    #[arg(long)]
    worker: Option<String>,
    /// Only events of this kind (e.g. result_published).
    #[arg(long)]
    kind: Option<String>,
    /// Start from the oldest event kept instead of new ones only.
    #[arg(long)]
    all: bool,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
    #[command(flatten)]
    nats: NatsArgs,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

/// A task from `quilt run`'s flags.
/// The task's `environment` from --apt, --apk, --pip, --npm, --runtime,
/// --requirements and --package-json; `None` when none is given.
fn environment_from_flags(args: &RunArgs) -> anyhow::Result<Option<Environment>> {
    let read = |path: &Option<PathBuf>, flag: &str| -> anyhow::Result<Option<String>> {
        path.as_ref()
            .map(|path| {
                std::fs::read_to_string(path).with_context(|| format!("reading --{flag} {}", path.display()))
            })
            .transpose()
    };
    let environment = Environment {
        runtime: match args.runtime.as_deref() {
            None => None,
            Some("python3") => Some(Runtime::Python3),
            Some("node") => Some(Runtime::Node),
            Some(other) => bail!("invalid --runtime {other:?}: use python3 or node"),
        },
        apt: args.apt.clone(),
        apk: args.apk.clone(),
        pip: args.pip.clone(),
        npm: args.npm.clone(),
        requirements_txt: read(&args.requirements, "requirements")?,
        package_json: read(&args.package_json, "package-json")?,
    };
    Ok((environment != Environment::default()).then_some(environment))
}

pub(crate) fn task_from_flags(args: &RunArgs) -> anyhow::Result<Task> {
    for (given, flag) in [
        (args.rootfs.is_some(), "--rootfs"),
        (args.bundle.is_some(), "--bundle"),
        (args.hostname.is_some(), "--hostname"),
        (args.read_only, "--read-only"),
        (args.scratch != "memory", "--scratch"),
        (args.scratch_size.is_some(), "--scratch-size"),
    ] {
        if given {
            bail!("{flag} works only with --local (a task through NATS names an --image)");
        }
    }
    let image = match (&args.image, &args.target) {
        (Some(image), _) => image.clone(),
        // An exec runs in its container's image.
        (None, Some(_)) => String::new(),
        (None, None) => bail!("--image is required (or --target NAME, or --local with --rootfs/--bundle)"),
    };
    let id = match &args.name {
        Some(id) => {
            validate_task_id(id).map_err(|error| anyhow::anyhow!("--name: {}", error.message))?;
            id.clone()
        }
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    let mut env = std::collections::BTreeMap::new();
    for entry in &args.env {
        let (name, value) =
            entry.split_once('=').with_context(|| format!("invalid --env {entry:?}: use NAME=VALUE"))?;
        env.insert(name.to_owned(), value.to_owned());
    }
    let limits = TaskLimits {
        memory_mb: args
            .memory
            .as_deref()
            .map(|text| {
                parse_size(text)
                    .map(|bytes| bytes.div_ceil(1 << 20))
                    .with_context(|| format!("invalid --memory {text:?}: use e.g. 256M or 1G"))
            })
            .transpose()?,
        cpus: args
            .cpus
            .as_deref()
            .map(|text| {
                parse_cpus(text)
                    .map(|millis| millis as f64 / 1000.0)
                    .with_context(|| format!("invalid --cpus {text:?}: use e.g. 0.5 or 2"))
            })
            .transpose()?,
        pids: args
            .pids
            .as_deref()
            .map(|text| text.parse().ok().with_context(|| format!("invalid --pids {text:?}")))
            .transpose()?,
        timeout_s: args
            .timeout
            .as_deref()
            .map(|text| {
                parse_duration(text)
                    .map(|duration| duration.as_secs_f64())
                    .with_context(|| format!("invalid --timeout {text:?}: use e.g. 10s or 500ms"))
            })
            .transpose()?,
        output_bytes: args
            .output_limit
            .as_deref()
            .map(|text| parse_size(text).with_context(|| format!("invalid --output-limit {text:?}")))
            .transpose()?,
    };
    let stdin = match &args.stdin {
        None => None,
        Some(path) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("reading stdin as text")?;
            Some(text)
        }
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading --stdin {} as text", path.display()))?,
        ),
    };
    let task = Task {
        schema: quilt::protocol::SCHEMA_VERSION,
        id: Some(id),
        image,
        command: args.command.clone(),
        env,
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        stdin,
        limits,
        network: match args.network.as_str() {
            "none" => Network::None,
            "host" => Network::Host,
            other => bail!("invalid --network {other:?}: use none or host"),
        },
        container: ContainerOptions {
            mode: if args.long_running.is_some() {
                ContainerMode::LongRunning
            } else {
                ContainerMode::Ephemeral
            },
            name: args.long_running.clone(),
            restart: match args.restart.as_deref() {
                None => None,
                Some("no") => Some(RestartPolicy::No),
                Some("on-failure") => Some(RestartPolicy::OnFailure),
                Some("always") => Some(RestartPolicy::Always),
                Some(other) => bail!("invalid --restart {other:?}: use no, on-failure or always"),
            },
            max_retries: args.max_retries,
            target: args.target.clone(),
        },
        environment: environment_from_flags(args)?,
    };
    // The same checks the worker makes, so a mistake is caught here.
    let json = serde_json::to_vec(&task)?;
    parse_task(&json).map_err(|error| anyhow::anyhow!("invalid task: {error}"))?;
    Ok(task)
}

/// The exit code that stands for a result.
pub(crate) fn result_exit_code(result: &TaskResult) -> u8 {
    match result.status {
        TaskStatus::Succeeded => 0,
        TaskStatus::Failed => match (result.exit_code, result.signal) {
            (Some(code), _) => code as u8,
            (None, Some(signal)) => 128u8.wrapping_add(signal as u8),
            (None, None) => EXIT_QUILT_ERROR,
        },
        TaskStatus::TimedOut => EXIT_TIMED_OUT,
        TaskStatus::OomKilled => EXIT_OOM_KILLED,
        TaskStatus::Rejected | TaskStatus::Error => {
            match result.error.as_ref().map(|error| error.kind.as_str()) {
                Some("command_not_found") => 127,
                Some("not_executable") => 126,
                _ => EXIT_QUILT_ERROR,
            }
        }
    }
}

/// `quilt run --image IMG -- CMD` through NATS: publish, stream the output
/// live, print the result's summary, exit with the task's code.
pub(crate) fn run_remote(data_dir: &Path, args: RunArgs) -> anyhow::Result<u8> {
    let task = task_from_flags(&args)?;
    runtime()?.block_on(async move {
        let client = args.nats.connect(data_dir).await?;
        let context = broker::context(client.clone());
        let id = task.id.clone().unwrap_or_default();
        // Subscribe before publishing, so nothing is missed.
        let mut output = client.subscribe(subjects::output_all(&id)).await.context("following the output")?;
        // Environment builds take a while: say what happens, on a terminal.
        let show_progress = !args.json && std::io::stderr().is_terminal();
        let mut progress = client.subscribe(subjects::progress(&id)).await.context("following the progress")?;
        let mut results = result_stream(&context, &id).await?;
        publish_task(&context, &task).await?;
        let mut printer = OutputPrinter::default();
        let interrupted = super::run::interrupt();
        tokio::pin!(interrupted);
        // A task nobody takes waits in the queue silently; say so once.
        let no_worker_check = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(no_worker_check);
        let mut checked = false;
        let result = loop {
            tokio::select! {
                _ = &mut no_worker_check, if !checked => {
                    checked = true;
                    if super::api::discover(&client).await.map(|workers| workers.is_empty()).unwrap_or(false) {
                        eprintln!("quilt: no worker answers on this NATS; task {id} waits in the queue until one starts");
                    }
                }
                Some(message) = output.next() => {
                    if !args.json {
                        printer.print(&message.payload);
                    }
                }
                Some(message) = progress.next() => {
                    if let (true, Ok(step)) = (show_progress, serde_json::from_slice::<Progress>(&message.payload)) {
                        eprintln!("quilt: {} ({:.1} s)", step.message, step.elapsed_ms as f64 / 1e3);
                    }
                }
                result = next_result(&mut results, None) => {
                    break result?.context("no result")?;
                }
                signal = &mut interrupted => {
                    eprintln!("quilt: task {id} stays submitted (queued, or running on its worker); get its result with `quilt result {id}`");
                    return Ok(128 + signal as u8);
                }
            }
        };
        // Output published before the result may still be in flight: wait
        // (briefly) for both streams' end.
        if !args.json {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while !printer.ended(result.attempt) {
                match tokio::time::timeout_at(deadline, output.next()).await {
                    Ok(Some(message)) => printer.print(&message.payload),
                    _ => break,
                }
            }
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&result)?);
        } else if let Some(error) = &result.error {
            eprintln!("quilt: task {id} {}: {}: {}", status_word(result.status), error.kind, error.message);
        } else if result.status == TaskStatus::TimedOut {
            eprintln!("quilt: task {id} timed out");
        } else if result.status == TaskStatus::OomKilled {
            eprintln!("quilt: task {id} was killed: out of memory");
        }
        Ok(result_exit_code(&result))
    })
}

fn status_word(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Succeeded => "succeeded",
        TaskStatus::Failed => "failed",
        TaskStatus::TimedOut => "timed out",
        TaskStatus::OomKilled => "was OOM-killed",
        TaskStatus::Rejected => "was rejected",
        TaskStatus::Error => "failed to run",
    }
}

/// Prints live output chunks of one task, starting over when a new
/// delivery of the task (a retry on another worker) begins.
#[derive(Default)]
struct OutputPrinter {
    attempt: u64,
    ended: [bool; 2],
}

impl OutputPrinter {
    fn print(&mut self, payload: &[u8]) {
        let Ok(chunk) = serde_json::from_slice::<OutputChunk>(payload) else { return };
        if chunk.attempt < self.attempt {
            return;
        }
        if chunk.attempt > self.attempt {
            if self.attempt != 0 {
                eprintln!("quilt: the task is running again (delivery {})", chunk.attempt);
            }
            self.attempt = chunk.attempt;
            self.ended = [false; 2];
        }
        let index = usize::from(chunk.stream == OutputStream::Stderr);
        if chunk.eof {
            self.ended[index] = true;
        }
        let _ = if chunk.stream == OutputStream::Stderr {
            let mut out = std::io::stderr().lock();
            out.write_all(chunk.data.as_bytes()).and_then(|()| out.flush())
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(chunk.data.as_bytes()).and_then(|()| out.flush())
        };
    }

    fn ended(&self, attempt: u64) -> bool {
        self.attempt == attempt && self.ended == [true, true]
    }
}

pub(crate) fn submit(data_dir: &Path, args: SubmitArgs) -> anyhow::Result<u8> {
    let task = match &args.task {
        Some(path) => {
            let bytes = if path.as_os_str() == "-" {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                    .context("reading the task from stdin")?;
                bytes
            } else {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
            };
            let mut task = parse_task(&bytes).map_err(|error| anyhow::anyhow!("invalid task: {error}"))?;
            if task.id.is_none() {
                task.id = Some(uuid::Uuid::new_v4().simple().to_string());
            }
            task
        }
        None => task_from_flags(&args.run)?,
    };
    runtime()?.block_on(async move {
        let client = args.run.nats.connect(data_dir).await?;
        let context = broker::context(client);
        let duplicate = publish_task(&context, &task).await?;
        let id = task.id.unwrap_or_default();
        if duplicate {
            eprintln!(
                "quilt: a task with id {id} was already submitted; this one was dropped as a duplicate"
            );
        }
        println!("{id}");
        Ok(0)
    })
}

pub(crate) fn result(data_dir: &Path, args: ResultArgs) -> anyhow::Result<u8> {
    validate_task_id(&args.id).map_err(|error| anyhow::anyhow!("invalid task id: {}", error.message))?;
    let wait = args
        .wait
        .as_deref()
        .map(|text| parse_duration(text).with_context(|| format!("invalid --wait {text:?}: use e.g. 30s")))
        .transpose()?;
    runtime()?.block_on(async move {
        let client = args.nats.connect(data_dir).await?;
        let context = broker::context(client);
        let result = match wait {
            None => {
                let stream = context
                    .get_stream(subjects::RESULTS_STREAM)
                    .await
                    .context("the results stream is missing: has a worker ever started against this NATS?")?;
                match stream.get_last_raw_message_by_subject(&subjects::result(&args.id)).await {
                    Ok(message) => Some(serde_json::from_slice::<TaskResult>(&message.payload)?),
                    Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => None,
                    Err(error) => return Err(anyhow::anyhow!(error).context("reading the result")),
                }
            }
            Some(wait) => {
                let mut results = result_stream(&context, &args.id).await?;
                next_result(&mut results, Some(wait)).await?
            }
        };
        match result {
            Some(result) => {
                println!("{}", serde_json::to_string_pretty(&result)?);
                Ok(0)
            }
            None => {
                eprintln!("quilt: no result for task {} (yet)", args.id);
                Ok(1)
            }
        }
    })
}

pub(crate) fn events(data_dir: &Path, args: EventsArgs) -> anyhow::Result<u8> {
    runtime()?.block_on(async move {
        let client = args.nats.connect(data_dir).await?;
        let context = broker::context(client.clone());
        let stream = context
            .get_stream(subjects::EVENTS_STREAM)
            .await
            .context("the events stream is missing: has a worker ever started against this NATS?")?;
        let filter =
            subjects::event(args.worker.as_deref().unwrap_or("*"), args.kind.as_deref().unwrap_or("*"));
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_subject: client.new_inbox(),
                filter_subject: filter,
                deliver_policy: if args.all { DeliverPolicy::All } else { DeliverPolicy::New },
                ..Default::default()
            })
            .await
            .context("following the events")?;
        let mut messages = consumer.messages().await.context("following the events")?;
        let started = Instant::now();
        let mut seen = 0u64;
        let interrupted = super::run::interrupt();
        tokio::pin!(interrupted);
        while args.count.is_none_or(|count| seen < count) {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else { break };
                    let message = message.context("following the events")?;
                    // Print what parses; a newer worker's event is shown raw.
                    match serde_json::from_slice::<EventMessage>(&message.payload) {
                        Ok(event) => println!("{}", serde_json::to_string(&event)?),
                        Err(_) => println!("{}", String::from_utf8_lossy(&message.payload)),
                    }
                    seen += 1;
                }
                _ = &mut interrupted => break,
            }
        }
        tracing::debug!(seen, elapsed = ?started.elapsed(), "events done");
        Ok(0)
    })
}
