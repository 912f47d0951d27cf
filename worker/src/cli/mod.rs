//! Flags, environment variables and subcommands. Parses the command line,
//! sets up logging and hands off to one module per verb.

mod api;
mod env;
mod image;
mod nats;
mod run;
mod schema;
mod tasks;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code when Quilt itself could not run the container (bad input, setup failure).
pub(crate) const EXIT_QUILT_ERROR: u8 = 125;

/// Quilt: run untrusted tasks in isolated, limited containers.
#[derive(Parser, Debug)]
#[command(name = "quilt", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Where Quilt keeps its state (container directories, later images and the event log).
    #[arg(long, global = true, env = "QUILT_DATA_DIR", default_value = "/var/lib/quilt")]
    pub(crate) data_dir: PathBuf,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Start an embedded nats-server and a worker on it: Quilt on one machine.
    Up(Box<worker::UpArgs>),
    /// Run a worker against an existing NATS deployment (--nats URL).
    Worker(Box<worker::JoinArgs>),
    /// Run a command as a task (through NATS; --local: on this machine
    /// directly), print its output, exit with its exit code.
    Run(Box<run::RunArgs>),
    /// Submit a task and print its id without waiting.
    Submit(Box<tasks::SubmitArgs>),
    /// Print a task's result as JSON.
    Result(tasks::ResultArgs),
    /// List the containers of every worker (or one), through the control API.
    Ps(api::PsArgs),
    /// Show one container, through the control API of the worker that owns it.
    Inspect(api::InspectArgs),
    /// Run a command inside a long-running container; print its output,
    /// exit with its exit code.
    Exec(Box<api::ExecArgs>),
    /// Stop a long-running container (SIGTERM, a grace period, SIGKILL); it
    /// is not restarted until a long-running task starts it again.
    Stop(api::StopArgs),
    /// Remove a long-running container: stop it, delete its files, logs and name.
    Rm(api::RmArgs),
    /// Print a long-running container's log (its command's stdout and stderr).
    Logs(api::LogsArgs),
    /// Follow the workers' lifecycle events, one JSON object per line.
    Events(tasks::EventsArgs),
    /// Write the JSON Schema files of the wire protocol into a directory.
    Schema(schema::SchemaArgs),
    /// Manage the local image store.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// The local store of built language environments.
    #[command(subcommand)]
    Env(env::EnvCommand),
}

/// Parse, run, map the result to an exit code.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    // The long-running roles report what they do (a retried NATS set-up, a
    // reaped container) by default; the other verbs print only their output.
    let serving = matches!(cli.command, Command::Up(_) | Command::Worker(_));
    init_logging(if serving { Some("quilt=info") } else { None });
    let result = match cli.command {
        Command::Up(args) => worker::up(&cli.data_dir, *args),
        Command::Worker(args) => worker::join(&cli.data_dir, *args),
        Command::Run(args) => run::run(&cli.data_dir, *args),
        Command::Submit(args) => tasks::submit(&cli.data_dir, *args),
        Command::Result(args) => tasks::result(&cli.data_dir, args),
        Command::Events(args) => tasks::events(&cli.data_dir, args),
        Command::Ps(args) => api::ps(&cli.data_dir, args),
        Command::Inspect(args) => api::inspect(&cli.data_dir, args),
        Command::Exec(args) => api::exec(&cli.data_dir, *args),
        Command::Stop(args) => api::stop(&cli.data_dir, args),
        Command::Rm(args) => api::rm(&cli.data_dir, args),
        Command::Logs(args) => api::logs(&cli.data_dir, args),
        Command::Schema(args) => schema::run(args),
        Command::Image(command) => image::run(&cli.data_dir, command),
        Command::Env(command) => env::run(&cli.data_dir, command),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        // A closed stdout (`quilt image ls | head -1`) is the reader's choice, not an error.
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("quilt: {}", one_line(&error));
            ExitCode::from(EXIT_QUILT_ERROR)
        }
    }
}

/// `error: cause: cause` on one line.
pub(crate) fn one_line(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn init_logging(default: Option<&str>) {
    // QUILT_LOG (e.g. QUILT_LOG=debug) sets the filter; without it a plain
    // `quilt run` prints nothing but the container's own output.
    if let Some(filter) = std::env::var("QUILT_LOG").ok().or(default.map(str::to_owned)) {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
    }
}
