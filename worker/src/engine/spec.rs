//! What a container is asked to be: the validated description the engine
//! starts from, whichever front end produced it (the CLI, an OCI bundle, a
//! task from the queue).
//!
//! Every field is checked here, before any side effect, so bad input gives
//! one clear error naming the field and leaves nothing behind. The checks are
//! the lexical ones; what can only be known inside the container (does the
//! command exist in the image, does the workdir resolve inside the root) is
//! checked by the container's setup process and reported as a setup step.

use std::path::PathBuf;
use std::time::Duration;

use super::capabilities::{Capability, CapabilitySet};

/// Largest argv, env or path we accept; far above anything legitimate and
/// well below the kernel's own ARG_MAX, so an error is ours and readable.
const MAX_ARGUMENT_BYTES: usize = 128 * 1024;
/// Number of rlimit resources Linux defines (`RLIM_NLIMITS`).
const RLIMIT_COUNT: u32 = 16;
/// Lowest memory limit that can start a process at all.
pub const MIN_MEMORY_BYTES: u64 = 4 * 1024 * 1024;
/// Longest wall-clock timeout accepted: a week. Longer work is a long-running
/// container, not a task.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Highest pids limit the kernel could honour (`/proc/sys/kernel/pid_max` cap).
pub const MAX_PIDS: u64 = 4 * 1024 * 1024;

/// Inodes (files, directories, links) `/dev/shm` holds: POSIX shared memory
/// and semaphores are a handful of files; 4096 of them is 16 KiB of the
/// default 64 MiB each. Creating one more fails with ENOSPC.
pub const SHM_INODES: u64 = 4096;
/// Bytes of in-memory scratch per inode it holds: one per 4 KiB page, as
/// many files as the scratch could hold non-empty ones (65 536 at the default
/// 256 MiB).
pub const SCRATCH_BYTES_PER_INODE: u64 = 4096;
/// Fewest inodes an in-memory scratch layer holds, however small.
pub const MIN_SCRATCH_INODES: u64 = 4096;

/// The `nr_inodes` bound of an in-memory scratch tmpfs of `size` bytes. A
/// tmpfs without one allows about half the machine's pages in inodes: a task
/// creating millions of empty files would then only stop at the memory limit
/// (inodes are kernel memory charged to the container), slowly and unnamed.
pub fn scratch_inodes(size: u64) -> u64 {
    (size / SCRATCH_BYTES_PER_INODE).max(MIN_SCRATCH_INODES)
}

/// A container to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Unique id: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`; names the cgroup and state directory.
    pub id: String,
    /// The root filesystem.
    pub root: RootSpec,
    /// argv; `command[0]` without a `/` is looked up in the container's `PATH`.
    pub command: Vec<String>,
    /// Environment as given (names validated); `PATH` and `HOME` are added
    /// when absent, nothing else from the runtime's own environment leaks in.
    pub env: Vec<(String, String)>,
    /// Absolute working directory inside the container; created when missing.
    pub workdir: String,
    /// Identity of the container's process.
    pub user: User,
    /// Host name inside the container's UTS namespace.
    pub hostname: String,
    /// Network namespace choice.
    pub network: NetworkMode,
    /// Resource limits.
    pub limits: Limits,
    /// Capabilities the process keeps (all four sets and the bounding set).
    pub capabilities: CapabilitySet,
    /// Resource limits set with setrlimit before exec.
    pub rlimits: Vec<Rlimit>,
    /// Bytes fed to the process's standard input, then end of file. `None`
    /// means standard input is at end of file from the start.
    pub stdin: Option<Vec<u8>>,
}

/// The root filesystem of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    /// Directories stacked as overlayfs lower layers, topmost first. Never
    /// written to: the container writes into a private upper directory.
    pub layers: Vec<PathBuf>,
    /// Mount the root read-only (no upper directory at all).
    pub read_only: bool,
    /// Where the container's writes go.
    pub scratch: Scratch,
}

/// Where a container's writable layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scratch {
    /// A tmpfs of `Limits::scratch_bytes` that exists only in the container's
    /// mount namespace: nothing touches the host's disk and nothing survives
    /// the container, even a crash of the runtime. Its pages count toward the
    /// container's memory limit. The default, for one-shot tasks.
    #[default]
    Memory,
    /// On disk, under the engine's state directory, kept until the
    /// container is finished (long-running containers keep it between
    /// runs): an ext4 filesystem of `Limits::scratch_bytes` of its own,
    /// mounted only in the container (see the engine's `disk_layer`
    /// module); where the host cannot make one, a plain directory.
    Disk,
    /// On disk as plain `upper` and `work` directories under the engine's
    /// state directory: not size-limited, it can fill the filesystem there.
    /// For environment builds, whose layer is that upper directory.
    Directory,
}

impl std::str::FromStr for Scratch {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "memory" => Ok(Scratch::Memory),
            "disk" => Ok(Scratch::Disk),
            "directory" => Ok(Scratch::Directory),
            other => Err(SpecError::Scratch(other.to_owned())),
        }
    }
}

/// Which network namespace the container gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// A fresh network namespace holding only `lo`, up.
    #[default]
    None,
    /// The host's network namespace: an explicit, operator-level opt-in.
    Host,
}

impl std::str::FromStr for NetworkMode {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "none" => Ok(NetworkMode::None),
            "host" => Ok(NetworkMode::Host),
            other => Err(SpecError::Network(other.to_owned())),
        }
    }
}

/// User and groups of the container's process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
}

/// Resource limits of one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory (and memory+swap) limit in bytes.
    pub memory_bytes: u64,
    /// CPU quota in thousandths of a CPU; `None` leaves the CPU unthrottled.
    pub cpu_millis: Option<u64>,
    /// Most processes and threads alive at once.
    pub pids: u64,
    /// Wall-clock limit from start; the whole cgroup is killed when it passes.
    pub timeout: Option<Duration>,
    /// Bytes kept of each of stdout and stderr; the rest is counted and dropped.
    pub output_bytes: u64,
    /// Size of the container's `/dev/shm` tmpfs (which also holds at most
    /// [`SHM_INODES`] inodes).
    pub shm_bytes: u64,
    /// Size of the in-memory scratch layer ([`Scratch::Memory`]). Its pages
    /// are charged to the container's memory cgroup, so the memory limit
    /// caps it too, whichever is lower. Its inodes are bounded by
    /// [`scratch_inodes`] of that size.
    pub scratch_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 * 1024 * 1024,
            cpu_millis: None,
            pids: 512,
            timeout: None,
            output_bytes: 1024 * 1024,
            shm_bytes: 64 * 1024 * 1024,
            scratch_bytes: 256 * 1024 * 1024,
        }
    }
}

/// One setrlimit(2) call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// `RLIMIT_*` resource number.
    pub resource: u32,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// The rlimits every container gets unless its spec says otherwise.
// RLIMIT_* are u32 on glibc and c_int on musl (Alpine): the cast is needed there.
#[allow(clippy::unnecessary_cast)]
pub fn default_rlimits() -> Vec<Rlimit> {
    vec![
        Rlimit { resource: libc::RLIMIT_NOFILE as u32, soft: 1024, hard: 4096 },
        Rlimit { resource: libc::RLIMIT_CORE as u32, soft: 0, hard: 0 },
    ]
}

/// Bad input in a container spec. Each variant names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Container id malformed.
    #[error(
        "invalid container id {0:?}: use 1-128 characters [A-Za-z0-9_.-], starting with a letter or digit"
    )]
    Id(String),
    /// No layers given.
    #[error("no root filesystem given")]
    NoRoot,
    /// A layer directory does not exist or is not a directory.
    #[error("root filesystem {0:?} does not exist or is not a directory")]
    RootMissing(PathBuf),
    /// A layer path is relative or holds a character overlayfs cannot take.
    #[error("root filesystem path {0:?} must be absolute and must not contain ',' ':' '\\' or a newline")]
    RootPath(PathBuf),
    /// Empty command.
    #[error("no command given")]
    NoCommand,
    /// NUL byte in an argument.
    #[error("command argument {0} contains a NUL byte")]
    CommandNul(usize),
    /// Too much argv/env.
    #[error("command and environment are too large ({0} bytes; limit {MAX_ARGUMENT_BYTES})")]
    TooLarge(usize),
    /// Env name malformed.
    #[error("invalid environment variable name {0:?}: must be non-empty and contain no '=' or NUL")]
    EnvName(String),
    /// Env value with NUL.
    #[error("environment variable {0} has a NUL byte in its value")]
    EnvValue(String),
    /// Workdir malformed.
    #[error("invalid workdir {0:?}: must be an absolute path without '..' components")]
    Workdir(String),
    /// Workdir under /proc.
    #[error("invalid workdir {0:?}: must not be under /proc")]
    WorkdirProc(String),
    /// Hostname malformed.
    #[error("invalid hostname {0:?}: 1-64 characters [A-Za-z0-9.-]")]
    Hostname(String),
    /// Unknown scratch kind.
    #[error("invalid scratch {0:?}: expected memory, disk or directory")]
    Scratch(String),
    /// Scratch size out of range.
    #[error("invalid scratch size {0} bytes: must be at least 1 MiB")]
    ScratchSize(u64),
    /// Unknown network mode.
    #[error("invalid network mode {0:?}: expected none or host")]
    Network(String),
    /// Memory limit out of range.
    #[error("invalid memory limit {0} bytes: must be between 4 MiB and this machine's memory ({1} bytes)")]
    Memory(u64, u64),
    /// CPU limit out of range.
    #[error("invalid cpu limit {0} millicpus: must be between 1 and {1} (this machine's CPUs)")]
    Cpu(u64, u64),
    /// Pids limit out of range.
    #[error("invalid pids limit {0}: must be between 1 and {MAX_PIDS}")]
    Pids(u64),
    /// Timeout out of range.
    #[error("invalid timeout {0:?}: must be more than zero and at most 7 days")]
    Timeout(Duration),
    /// Output cap out of range.
    #[error("invalid output limit {0} bytes: must be between 1 and 1 GiB")]
    Output(u64),
    /// /dev/shm size out of range.
    #[error("invalid /dev/shm size {0} bytes: must be between 4 KiB and the memory limit")]
    Shm(u64),
    /// A capability the engine refuses to grant.
    #[error("capability {0} is never granted to containers")]
    ForbiddenCapability(Capability),
    /// An rlimit with soft above hard, or an unknown resource.
    #[error("invalid rlimit {0}: soft {1} above hard {2}, or unknown resource")]
    Rlimit(u32, u64, u64),
}

impl ContainerSpec {
    /// A spec with defaults: root, id and command given; network none; root user;
    /// default limits, capabilities and rlimits.
    pub fn new(id: impl Into<String>, layers: Vec<PathBuf>, command: Vec<String>) -> Self {
        ContainerSpec {
            id: id.into(),
            root: RootSpec { layers, read_only: false, scratch: Scratch::Memory },
            command,
            env: Vec::new(),
            workdir: "/".to_owned(),
            user: User::default(),
            hostname: "quilt".to_owned(),
            network: NetworkMode::None,
            limits: Limits::default(),
            capabilities: CapabilitySet::default_set(),
            rlimits: default_rlimits(),
            stdin: None,
        }
    }

    /// Check every field lexically and against this machine's size. Nothing
    /// is touched on disk except `stat` of the root layers.
    pub fn validate(&self, machine: &MachineSize) -> Result<(), SpecError> {
        validate_id(&self.id)?;
        if self.root.layers.is_empty() {
            return Err(SpecError::NoRoot);
        }
        for layer in &self.root.layers {
            let text = layer.to_string_lossy();
            if !layer.is_absolute() || text.contains([',', ':', '\n', '\\']) {
                return Err(SpecError::RootPath(layer.clone()));
            }
            if !layer.is_dir() {
                return Err(SpecError::RootMissing(layer.clone()));
            }
        }
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(SpecError::NoCommand);
        }
        let mut total = 0usize;
        for (index, argument) in self.command.iter().enumerate() {
            if argument.contains('\0') {
                return Err(SpecError::CommandNul(index));
            }
            total += argument.len() + 1;
        }
        for (name, value) in &self.env {
            validate_env_name(name)?;
            if value.contains('\0') {
                return Err(SpecError::EnvValue(name.clone()));
            }
            total += name.len() + value.len() + 2;
        }
        if total > MAX_ARGUMENT_BYTES {
            return Err(SpecError::TooLarge(total));
        }
        validate_workdir(&self.workdir)?;
        validate_hostname(&self.hostname)?;
        self.limits.validate(machine)?;

        if self.capabilities.grants(Capability::SysAdmin) {
            return Err(SpecError::ForbiddenCapability(Capability::SysAdmin));
        }
        for rlimit in &self.rlimits {
            if rlimit.soft > rlimit.hard || rlimit.resource >= RLIMIT_COUNT {
                return Err(SpecError::Rlimit(rlimit.resource, rlimit.soft, rlimit.hard));
            }
        }
        Ok(())
    }

    /// The environment the process gets: the spec's, plus `PATH` and `HOME`
    /// when it lacks them.
    pub fn effective_env(&self) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        if !env.iter().any(|(name, _)| name == "PATH") {
            env.push((
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ));
        }
        if !env.iter().any(|(name, _)| name == "HOME") {
            let home = if self.user.uid == 0 { "/root" } else { "/" };
            env.push(("HOME".to_owned(), home.to_owned()));
        }
        env
    }
}

impl Limits {
    /// Range checks against this machine.
    pub fn validate(&self, machine: &MachineSize) -> Result<(), SpecError> {
        if self.memory_bytes < MIN_MEMORY_BYTES || self.memory_bytes > machine.memory_bytes {
            return Err(SpecError::Memory(self.memory_bytes, machine.memory_bytes));
        }
        if let Some(cpu) = self.cpu_millis {
            if cpu == 0 || cpu > machine.cpus * 1000 {
                return Err(SpecError::Cpu(cpu, machine.cpus * 1000));
            }
        }
        if self.pids == 0 || self.pids > MAX_PIDS {
            return Err(SpecError::Pids(self.pids));
        }
        if let Some(timeout) = self.timeout {
            if timeout.is_zero() || timeout > MAX_TIMEOUT {
                return Err(SpecError::Timeout(timeout));
            }
        }
        if self.output_bytes == 0 || self.output_bytes > 1 << 30 {
            return Err(SpecError::Output(self.output_bytes));
        }
        if self.shm_bytes < 4096 || self.shm_bytes > self.memory_bytes {
            return Err(SpecError::Shm(self.shm_bytes));
        }
        if self.scratch_bytes < 1 << 20 {
            return Err(SpecError::ScratchSize(self.scratch_bytes));
        }
        Ok(())
    }
}

/// The machine's size, against which limits are judged "absurd".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineSize {
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// Online CPUs.
    pub cpus: u64,
}

impl MachineSize {
    /// Read from sysinfo(2) and sched_getaffinity.
    pub fn detect() -> MachineSize {
        let memory_bytes = nix::sys::sysinfo::sysinfo().map(|info| info.ram_total()).unwrap_or(u64::MAX);
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
        MachineSize { memory_bytes, cpus }
    }
}

/// Container ids name directories and cgroups, so they are kept to a safe alphabet.
pub fn validate_id(id: &str) -> Result<(), SpecError> {
    let bytes = id.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Id(id.to_owned()))
    }
}

/// An environment variable name: non-empty, no `=`, no NUL.
pub fn validate_env_name(name: &str) -> Result<(), SpecError> {
    if name.is_empty() || name.contains(['=', '\0']) {
        Err(SpecError::EnvName(name.to_owned()))
    } else {
        Ok(())
    }
}

fn validate_workdir(workdir: &str) -> Result<(), SpecError> {
    if !workdir.starts_with('/')
        || workdir.contains('\0')
        || workdir.len() > 4000
        || workdir.split('/').any(|part| part == "..")
    {
        return Err(SpecError::Workdir(workdir.to_owned()));
    }
    let first = workdir.split('/').find(|part| !part.is_empty() && *part != ".");
    if first == Some("proc") {
        return Err(SpecError::WorkdirProc(workdir.to_owned()));
    }
    Ok(())
}

fn validate_hostname(hostname: &str) -> Result<(), SpecError> {
    let ok = !hostname.is_empty()
        && hostname.len() <= 64
        && hostname.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Hostname(hostname.to_owned()))
    }
}

/// Parse a size such as `256M`, `1G`, `512k`, `1048576` (binary units).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// Parse a duration such as `10s`, `500ms`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return None,
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return None;
    }
    Some(Duration::from_secs_f64(seconds))
}

/// Parse a CPU count such as `0.5` or `2` into thousandths of a CPU.
pub fn parse_cpus(text: &str) -> Option<u64> {
    let value: f64 = text.trim().parse().ok()?;
    if !value.is_finite() || value <= 0.0 || value > 1e6 {
        return None;
    }
    Some((value * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineSize {
        MachineSize { memory_bytes: 8 << 30, cpus: 2 }
    }

    fn spec() -> ContainerSpec {
        ContainerSpec::new("c1", vec![PathBuf::from("/")], vec!["/bin/true".into()])
    }

    #[test]
    fn defaults_validate() {
        spec().validate(&machine()).unwrap();
    }

    #[test]
    fn scratch_inodes_follow_its_size() {
        assert_eq!(scratch_inodes(Limits::default().scratch_bytes), 65_536);
        assert_eq!(scratch_inodes(1 << 20), MIN_SCRATCH_INODES);
        assert_eq!(scratch_inodes(1 << 30), 262_144);
    }

    #[test]
    fn bad_ids() {
        for id in ["", "-x", "a/b", "a b", &"x".repeat(129), "..", "é"] {
            assert_eq!(validate_id(id), Err(SpecError::Id(id.to_owned())), "{id}");
        }
        validate_id("task-1.2_x").unwrap();
    }

    #[test]
    fn env_names() {
        assert!(validate_env_name("A=B").is_err());
        assert!(validate_env_name("A\0").is_err());
        assert!(validate_env_name("").is_err());
        validate_env_name("PYTHONPATH").unwrap();
    }

    #[test]
    fn workdirs() {
        let mut s = spec();
        for (dir, want_proc) in [("/proc", true), ("/proc/self", true), ("//proc/x", true), ("/./proc", true)]
        {
            s.workdir = dir.into();
            let err = s.validate(&machine()).unwrap_err();
            assert_eq!(matches!(err, SpecError::WorkdirProc(_)), want_proc, "{dir}");
        }
        for dir in ["relative", "/a/../b", "/.."] {
            s.workdir = dir.into();
            assert!(matches!(s.validate(&machine()), Err(SpecError::Workdir(_))), "{dir}");
        }
        s.workdir = "/processes/x".into();
        s.validate(&machine()).unwrap();
    }

    #[test]
    fn limits_are_range_checked() {
        let m = machine();
        let mut s = spec();
        s.limits.memory_bytes = 0;
        assert!(matches!(s.validate(&m), Err(SpecError::Memory(..))));
        s.limits.memory_bytes = 1 << 50;
        assert!(matches!(s.validate(&m), Err(SpecError::Memory(..))));
        s.limits.memory_bytes = 64 << 20;
        s.limits.cpu_millis = Some(0);
        assert!(matches!(s.validate(&m), Err(SpecError::Cpu(..))));
        s.limits.cpu_millis = Some(3000);
        assert!(matches!(s.validate(&m), Err(SpecError::Cpu(..))));
        s.limits.cpu_millis = Some(500);
        s.limits.pids = 0;
        assert!(matches!(s.validate(&m), Err(SpecError::Pids(0))));
        s.limits.pids = 64;
        s.limits.timeout = Some(Duration::ZERO);
        assert!(matches!(s.validate(&m), Err(SpecError::Timeout(_))));
        s.limits.timeout = Some(Duration::from_secs(1));
        s.validate(&m).unwrap();
    }

    #[test]
    fn sizes_durations_cpus() {
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("-1M"), None);
        assert_eq!(parse_size("99999999999999999999"), None);
        assert_eq!(parse_size("16777216T"), None);
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("1x"), None);
        assert_eq!(parse_cpus("0.5"), Some(500));
        assert_eq!(parse_cpus("-1"), None);
        assert_eq!(parse_cpus("nan"), None);
    }

    #[test]
    fn env_gets_path_and_home() {
        let mut s = spec();
        s.env.push(("HOME".into(), "/work".into()));
        let env = s.effective_env();
        assert!(env.iter().any(|(k, _)| k == "PATH"));
        assert_eq!(env.iter().filter(|(k, _)| k == "HOME").count(), 1);
    }
}
