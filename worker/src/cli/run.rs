//! `quilt run`: through NATS as a task (see `tasks.rs`), or with `--local`
//! driving the engine directly; either way the container's output is
//! printed as it is produced and Quilt exits with its code.
//!
//! Exit codes: the container's own; 128+N when a signal killed it; 124 when
//! the timeout killed it; 123 when the OOM killer did; 125 when Quilt could
//! not run it (bad input, setup failure); 126 when the command is not
//! executable; 127 when it is not found in the image. `--json` prints the
//! full outcome for an unambiguous answer.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use quilt::engine::{
    load_bundle, parse_cpus, parse_duration, parse_size, validate_env_name, ContainerSpec, Engine,
    EngineConfig, EngineError, NetworkMode, Outcome, OutputFollower, SetupStep, Status, UnavailableLimits,
};
use quilt::image::{container_command, resolve_user, ImageRecord, ImageStore, Lease};

/// Exit code for a container killed on its timeout.
pub(crate) const EXIT_TIMED_OUT: u8 = 124;
/// Exit code for a container whose process the OOM killer killed.
pub(crate) const EXIT_OOM_KILLED: u8 = 123;

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// Run on this machine with the engine directly, without NATS.
    #[arg(long)]
    pub(crate) local: bool,
    /// Image from the local store (see `quilt image`); its Env, WorkingDir,
    /// Entrypoint/Cmd and User apply unless overridden.
    #[arg(long, conflicts_with_all = ["rootfs", "bundle"])]
    pub(crate) image: Option<String>,
    /// Root filesystem directory (used read-only; writes go to a private layer).
    #[arg(long, conflicts_with = "bundle")]
    pub(crate) rootfs: Option<PathBuf>,
    /// OCI runtime bundle directory (config.json plus its root).
    #[arg(long)]
    pub(crate) bundle: Option<PathBuf>,
    /// Container id with --local, task id through NATS (default: generated).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Memory limit, e.g. 256M, 1G.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) memory: Option<String>,
    /// CPU limit in CPUs, e.g. 0.5.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) cpus: Option<String>,
    /// Most processes at once.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) pids: Option<String>,
    /// Wall-clock limit, e.g. 10s, 500ms, 2m.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) timeout: Option<String>,
    /// Bytes of stdout and of stderr kept, e.g. 1M.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) output_limit: Option<String>,
    /// Network: none (loopback only) or host.
    #[arg(long, default_value = "none")]
    pub(crate) network: String,
    /// Environment variable K=V (repeatable).
    #[arg(long = "env", short = 'e')]
    pub(crate) env: Vec<String>,
    /// Working directory inside the container.
    #[arg(long, short = 'w')]
    pub(crate) workdir: Option<String>,
    /// UID[:GID] to run as.
    #[arg(long, short = 'u')]
    pub(crate) user: Option<String>,
    /// Host name inside the container.
    #[arg(long)]
    pub(crate) hostname: Option<String>,
    /// Mount the root read-only.
    #[arg(long)]
    pub(crate) read_only: bool,
    /// Where the container's writes go: memory (a tmpfs counted in its memory
    /// limit, gone with the container), disk (a filesystem of the scratch size
    /// of its own, in the data dir) or directory (a plain directory in the
    /// data dir, not size-limited).
    #[arg(long, default_value = "memory")]
    pub(crate) scratch: String,
    /// Size of the scratch layer, e.g. 64M (default 256M; in memory, at most the memory limit).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) scratch_size: Option<String>,
    /// Feed this file to the command's stdin ("-" for Quilt's own stdin).
    #[arg(long)]
    pub(crate) stdin: Option<PathBuf>,
    /// Through NATS: create (or reuse) the long-running container of this
    /// name instead of a one-task container; the command keeps running.
    #[arg(long, conflicts_with_all = ["local", "target"])]
    pub(crate) long_running: Option<String>,
    /// With --long-running: no (default), on-failure or always.
    #[arg(long, requires = "long_running")]
    pub(crate) restart: Option<String>,
    /// With --restart on-failure: restarts allowed after failures in a row (default 5).
    #[arg(long, requires = "restart")]
    pub(crate) max_retries: Option<u32>,
    /// Through NATS: run the command inside this running long-running container.
    #[arg(long, conflicts_with_all = ["local", "image"])]
    pub(crate) target: Option<String>,
    /// Through NATS: a package the command needs, from the image's apt (repeatable).
    #[arg(long, value_name = "PACKAGE")]
    pub(crate) apt: Vec<String>,
    /// Through NATS: a package from the image's apk (Alpine; repeatable).
    #[arg(long, value_name = "PACKAGE")]
    pub(crate) apk: Vec<String>,
    /// Through NATS: a Python requirement, installed into a venv (repeatable).
    #[arg(long, value_name = "REQUIREMENT")]
    pub(crate) pip: Vec<String>,
    /// Through NATS: an npm package (repeatable).
    #[arg(long, value_name = "PACKAGE")]
    pub(crate) npm: Vec<String>,
    /// Through NATS: python3 or node, from the image's package manager.
    #[arg(long)]
    pub(crate) runtime: Option<String>,
    /// Through NATS: a requirements.txt whose requirements are installed.
    #[arg(long, value_name = "FILE")]
    pub(crate) requirements: Option<PathBuf>,
    /// Through NATS: a package.json whose dependencies are installed.
    #[arg(long, value_name = "FILE")]
    pub(crate) package_json: Option<PathBuf>,
    /// With --local: user-namespace mode, container ids 0..COUNT mapped to host ids START..
    /// (START:COUNT, e.g. 100000:65536; as the worker's --userns).
    #[arg(long, env = "QUILT_USERNS", value_name = "START:COUNT", requires = "local")]
    pub(crate) userns: Option<quilt::engine::IdRange>,
    /// Print the full outcome as JSON (with the captured output) instead of streaming output.
    #[arg(long)]
    pub(crate) json: bool,
    /// The command and its arguments.
    #[arg(last = true)]
    pub(crate) command: Vec<String>,
    #[command(flatten)]
    pub(crate) nats: super::nats::NatsArgs,
}

pub(crate) fn run(data_dir: &Path, args: RunArgs) -> anyhow::Result<u8> {
    if !args.local {
        return super::tasks::run_remote(data_dir, args);
    }
    let wants_environment =
        !(args.apt.is_empty() && args.apk.is_empty() && args.pip.is_empty() && args.npm.is_empty())
            || args.runtime.is_some()
            || args.requirements.is_some()
            || args.package_json.is_some();
    if wants_environment {
        anyhow::bail!(
            "language environments are built by a worker: run without --local (through `quilt up`)"
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_local(data_dir, args))
}

fn build_spec(args: &RunArgs, image: Option<&ImageRoot>) -> anyhow::Result<ContainerSpec> {
    let id = args.name.clone().unwrap_or_else(generate_id);
    let mut spec = if let Some(image) = image {
        let config = &image.record.config;
        let command = container_command(config, &args.command);
        if command.is_empty() {
            bail!("no command: image {} has no Entrypoint or Cmd; give one after --", image.record.name);
        }
        let mut spec = ContainerSpec::new(id, image.layers.clone(), command);
        for entry in &config.env {
            if let Some((name, value)) = entry.split_once('=') {
                spec.env.push((name.to_owned(), value.to_owned()));
            }
        }
        if let Some(workdir) = &config.working_dir {
            spec.workdir = workdir.clone();
        }
        if let Some(user) = &config.user {
            let (uid, gid) = resolve_user(&image.layers, user)?;
            spec.user.uid = uid;
            spec.user.gid = gid;
        }
        spec
    } else if let Some(bundle) = &args.bundle {
        let mut spec = load_bundle(bundle, &id)?;
        if !args.command.is_empty() {
            spec.command = args.command.clone();
        }
        spec
    } else {
        let rootfs = args.rootfs.clone().context("--image, --rootfs or --bundle is required")?;
        let rootfs = rootfs
            .canonicalize()
            .with_context(|| format!("root filesystem {} does not exist", rootfs.display()))?;
        if args.command.is_empty() {
            bail!("no command given: quilt run --local --rootfs DIR -- CMD [ARGS...]");
        }
        ContainerSpec::new(id, vec![rootfs], args.command.clone())
    };
    // A bundle's own namespaces decide its network unless --network is given.
    if args.bundle.is_none() || args.network != "none" {
        spec.network = args.network.parse::<NetworkMode>()?;
    }
    if let Some(memory) = &args.memory {
        spec.limits.memory_bytes = parse_size(memory)
            .with_context(|| format!("invalid --memory {memory:?}: use e.g. 256M or 1G"))?;
        spec.limits.shm_bytes = spec.limits.shm_bytes.min(spec.limits.memory_bytes);
    }
    if let Some(cpus) = &args.cpus {
        spec.limits.cpu_millis =
            Some(parse_cpus(cpus).with_context(|| format!("invalid --cpus {cpus:?}: use e.g. 0.5 or 2"))?);
    }
    if let Some(pids) = &args.pids {
        spec.limits.pids =
            pids.parse().ok().with_context(|| format!("invalid --pids {pids:?}: use a positive number"))?;
    }
    if let Some(timeout) = &args.timeout {
        spec.limits.timeout = Some(
            parse_duration(timeout)
                .with_context(|| format!("invalid --timeout {timeout:?}: use e.g. 10s or 500ms"))?,
        );
    }
    if let Some(limit) = &args.output_limit {
        spec.limits.output_bytes =
            parse_size(limit).with_context(|| format!("invalid --output-limit {limit:?}: use e.g. 1M"))?;
    }
    for entry in &args.env {
        let (name, value) =
            entry.split_once('=').with_context(|| format!("invalid --env {entry:?}: use NAME=VALUE"))?;
        validate_env_name(name)?;
        spec.env.retain(|(existing, _)| existing != name);
        spec.env.push((name.to_owned(), value.to_owned()));
    }
    if let Some(workdir) = &args.workdir {
        spec.workdir = workdir.clone();
    }
    if let Some(user) = &args.user {
        let (uid, gid) = match user.split_once(':') {
            Some((uid, gid)) => (uid, Some(gid)),
            None => (user.as_str(), None),
        };
        spec.user.uid =
            uid.parse().ok().with_context(|| format!("invalid --user {user:?}: use UID[:GID]"))?;
        spec.user.gid = match gid {
            Some(gid) => {
                gid.parse().ok().with_context(|| format!("invalid --user {user:?}: use UID[:GID]"))?
            }
            None => spec.user.uid,
        };
    }
    if let Some(hostname) = &args.hostname {
        spec.hostname = hostname.clone();
    }
    if args.read_only {
        spec.root.read_only = true;
    }
    spec.root.scratch = args.scratch.parse()?;
    if let Some(size) = &args.scratch_size {
        spec.limits.scratch_bytes =
            parse_size(size).with_context(|| format!("invalid --scratch-size {size:?}: use e.g. 64M"))?;
    }
    if let Some(path) = &args.stdin {
        let bytes = if path.as_os_str() == "-" {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).context("reading stdin")?;
            bytes
        } else {
            std::fs::read(path).with_context(|| format!("reading --stdin {}", path.display()))?
        };
        spec.stdin = Some(bytes);
    }
    Ok(spec)
}

fn generate_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("run-{}-{:08x}", std::process::id(), nanos)
}

/// An image's layers, held for the container's lifetime.
struct ImageRoot {
    record: ImageRecord,
    layers: Vec<PathBuf>,
    _lease: Lease,
}

fn image_root(data_dir: &Path, name: &str) -> anyhow::Result<ImageRoot> {
    let store = ImageStore::open(data_dir).context("opening the image store")?;
    let record = store.find(name)?;
    let (layers, lease) = store.lease(&record)?;
    Ok(ImageRoot { record, layers, _lease: lease })
}

async fn run_local(data_dir: &Path, args: RunArgs) -> anyhow::Result<u8> {
    let image = args.image.as_deref().map(|name| image_root(data_dir, name)).transpose()?;
    let spec = build_spec(&args, image.as_ref())?;
    let engine = Engine::new(EngineConfig {
        state_dir: data_dir.join("containers"),
        cgroup_parent: "quilt".to_owned(),
        unavailable_limits: UnavailableLimits::Refuse,
        user_namespace: args.userns,
    })
    .context("starting the container engine")?;
    let mut container = match engine.create(spec) {
        Ok(container) => container,
        Err(error) => return Ok(report_start_error(&error, args.json)),
    };
    if let Err(error) = container.start().await {
        // Best effort: the start error is the one worth reporting.
        let _ = container.finish().await;
        return Ok(report_start_error(&error, args.json));
    }
    let mut streams = Vec::new();
    if !args.json {
        if let Some(follower) = container.follow_stdout() {
            streams.push(tokio::spawn(copy_out(follower?, false)));
        }
        if let Some(follower) = container.follow_stderr() {
            streams.push(tokio::spawn(copy_out(follower?, true)));
        }
    }
    let interrupted = tokio::select! {
        exit = container.wait() => { exit?; None }
        signal = interrupt() => Some(signal),
    };
    if interrupted.is_some() {
        container.kill_all()?;
    }
    let outcome = container.finish().await?;
    for stream in streams {
        stream.await.context("output stream")??;
    }
    if args.json {
        print_json(&outcome)?;
    }
    if let Some(signal) = interrupted {
        return Ok(128 + signal as u8);
    }
    Ok(exit_code(&outcome))
}

pub(crate) async fn interrupt() -> i32 {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => libc::SIGINT,
        _ = term.recv() => libc::SIGTERM,
    }
}

async fn copy_out(mut follower: OutputFollower, stderr: bool) -> anyhow::Result<()> {
    let mut buffer = vec![0u8; 64 * 1024];
    while let Some(read) = follower.next_chunk(&mut buffer).await? {
        // A closed terminal or pipe on our side must not fail the container.
        let _ = if stderr {
            let mut out = std::io::stderr().lock();
            out.write_all(&buffer[..read]).and_then(|()| out.flush())
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(&buffer[..read]).and_then(|()| out.flush())
        };
    }
    Ok(())
}

/// Map an outcome to the documented exit code.
pub(crate) fn exit_code(outcome: &Outcome) -> u8 {
    match outcome.status() {
        Status::TimedOut => EXIT_TIMED_OUT,
        Status::OomKilled => EXIT_OOM_KILLED,
        Status::Succeeded | Status::Failed => match (outcome.exit_code, outcome.signal) {
            (Some(code), _) => code as u8,
            (None, Some(signal)) => 128u8.wrapping_add(signal as u8),
            (None, None) => super::EXIT_QUILT_ERROR,
        },
    }
}

fn report_start_error(error: &EngineError, json: bool) -> u8 {
    let code = match error {
        EngineError::Setup { step: SetupStep::CommandNotFound, .. } => 127,
        EngineError::Setup { step: SetupStep::CommandNotExecutable, .. } => 126,
        _ => super::EXIT_QUILT_ERROR,
    };
    if json {
        let value = serde_json::json!({
            "status": "error",
            "error": { "kind": error.kind(), "message": error.to_string() },
        });
        println!("{value}");
    } else {
        eprintln!("quilt: {error}");
    }
    code
}

fn print_json(outcome: &Outcome) -> anyhow::Result<()> {
    let mut value = serde_json::to_value(outcome)?;
    value["status"] = serde_json::to_value(outcome.status())?;
    value["stdout"]["text"] = String::from_utf8_lossy(&outcome.stdout.data).into_owned().into();
    value["stderr"]["text"] = String::from_utf8_lossy(&outcome.stderr.data).into_owned().into();
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}
