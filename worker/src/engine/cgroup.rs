//! Control groups of containers, on cgroup v1 and v2 (detected at run time).
//!
//! **Owns**: the directory `<hierarchy>/<parent>/<name>` of every container (one per v1
//! hierarchy Quilt uses, one on v2): creating it, writing its limits, handing the container's
//! child process the means to join it, killing everything in it, reading its counters and
//! removing it. Also owns the `<parent>` directories themselves (created when missing) and,
//! on v2, enabling `memory`, `pids` and `cpu` in `cgroup.subtree_control` along the parent chain.
//!
//! **Must not touch**: any cgroup outside `<parent>` (the worker's own cgroup, systemd's
//! slices), `release_agent`/`notify_on_release`, or any process not listed in a container
//! cgroup. It never moves the worker itself and never forks: spawning the child is the process
//! layer's job, which calls [`ContainerCgroup::attach_handle`] before it clones.
//!
//! # Design
//!
//! - **Detection happens once per process.** `/sys/fs/cgroup` being cgroup2 (statfs magic)
//!   means v2; otherwise v1, with each controller's hierarchy found by its own mount in a
//!   single parse of `/proc/self/mountinfo`. A "hybrid" host (v1 hierarchies plus a cgroup2
//!   mount at `/sys/fs/cgroup/unified`) is treated as v1: its v2 tree usually has no resource
//!   controllers. Controllers sharing a hierarchy (`cpu,cpuacct`) share one directory, created
//!   once. [`CgroupRoot`] keeps the result, so [`CgroupRoot::create`] does only the mkdirs
//!   and the limit writes, because container start is measured in milliseconds.
//! - **The child attaches itself.** On v2 the child is cloned straight into the cgroup with
//!   `clone3(CLONE_INTO_CGROUP)` from a directory descriptor opened `O_RDONLY|O_DIRECTORY`
//!   (an `O_PATH` descriptor is refused by the kernel), so it never runs outside it. v1 has no
//!   such flag. If the parent wrote the child's pid after the clone, the child would run, and
//!   could fork, outside its limits until then; it would cost a synchronisation round-trip; and
//!   a pid written late can name a recycled process. Instead the parent opens every hierarchy's
//!   `tasks` file (`O_WRONLY|O_CLOEXEC`) before the clone, and the child writes `"0"` (itself)
//!   to each with a bare `write(2)` before it drops privileges and execs. That is
//!   async-signal-safe and allocates nothing, which is all a child of a threaded process may do
//!   (STYLE rule 4); the descriptors close themselves at exec.
//! - **Devices.** On v1 the devices cgroup denies everything (`a`), then allows only
//!   null, zero, full, random, urandom, tty, ptmx and the pts range. cgroup v2 has no device
//!   files: there, device access is limited by a `BPF_CGROUP_DEVICE` program, which Quilt does
//!   **not** install. On v2, devices are restricted by not granting `CAP_MKNOD` and by Quilt's
//!   own tmpfs `/dev` holding only those nodes (device nodes in image layers are skipped).
//! - **What goes through `cgroups-rs` and what is direct file I/O.** Through `cgroups-rs`: the
//!   cgroup2 check of `/sys/fs/cgroup` and the mountinfo parse (once, in
//!   [`CgroupRoot::detect`]; [`CgroupRoot::v2_at`] checks its own path with nix's statfs); the
//!   [`cgroups_rs::fs::Hierarchy`] our cgroups are loaded from (a small implementation of our
//!   own, because the crate's `V2` hard-codes `/sys/fs/cgroup`, and its `V1` re-parses
//!   mountinfo on every construction and every `Cgroup::clone`, and spans every hierarchy,
//!   cpuset included, which would need seeding); and every limit write, through its memory,
//!   cpu, pids and devices controllers, which render the kernel formats (`cpu.max`, device
//!   rules). `Resources::apply` is not used: it reads every value back after writing it and
//!   silently drops memory errors. Direct: `mkdir`/`rmdir` (the crate's `create` re-reads
//!   `/sys/fs/cgroup/cgroup.controllers` and rewrites `subtree_control` at every level for each
//!   cgroup, and its `delete` cannot tell "still busy" from "failed"); `subtree_control` at
//!   detection; `cgroup.kill`, `cgroup.procs` and `kill(2)`; the attach descriptors (the crate
//!   only attaches by pid); and the counters in [`ContainerCgroup::usage`] (its stat getters
//!   read a dozen files per call, report a missing file as 0 where we need "unknown", and its
//!   `memory.oom_control` parser panics on unexpected text).
//! - **Killing** uses `cgroup.kill` on v2 (Linux 5.14+), which the kernel makes race-free
//!   against concurrent forks. Elsewhere it reads `cgroup.procs` and sends SIGKILL to each pid,
//!   repeating for a bounded number of rounds; the pids limit keeps a fork bomb finite, so the
//!   rounds converge. A pid of 0 or below is never signalled (`kill(0)` would hit our own
//!   process group), nor is the worker itself.
//! - **Removal** waits, bounded, for the cgroup to empty: `rmdir` fails with `EBUSY` while a
//!   killed process is still exiting. If it never empties the caller gets
//!   [`CgroupError::NotEmpty`] and can find the leftover later with [`CgroupRoot::list`].
//! - **Blocking.** Everything here is synchronous file I/O, and `kill_all` and `delete` sleep
//!   (bounded, see the constants); async callers run them on a blocking thread.
#![deny(unsafe_code)]

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::devices::{DevicePermissions, DeviceType, DevicesController};
use cgroups_rs::fs::hierarchies::{self, Mountinfo};
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup, Controller as _, Hierarchy, MaxValue, Subsystem};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
use nix::unistd::Pid;

/// Where cgroup v2 is mounted when the host runs the unified hierarchy.
const UNIFIED_MOUNT_POINT: &str = "/sys/fs/cgroup";
/// CFS period in microseconds; quotas are expressed against it.
const CPU_PERIOD_US: u64 = 100_000;
/// Microseconds of quota per thousandth of a CPU at [`CPU_PERIOD_US`].
const CPU_QUOTA_US_PER_MILLI: u64 = CPU_PERIOD_US / 1000;
/// The kernel refuses CFS quotas below 1 ms (`EINVAL`), i.e. below 10 thousandths of a CPU.
const MIN_CPU_QUOTA_US: u64 = 1000;
/// Below this a container cannot even exec a shell; such a value is a caller bug.
const MIN_MEMORY_BYTES: u64 = 4 * 1024 * 1024;
/// How long [`ContainerCgroup::kill_all`] repeats "list cgroup.procs, SIGKILL each" before it
/// gives up. A SIGKILLed process leaves the list only once it has exited, which on a loaded
/// machine (or for a process with much memory to free) takes more than half a second.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between two kill rounds or two `rmdir` attempts.
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(10);
/// How long [`ContainerCgroup::delete`] waits, in total, for the cgroup to empty.
const DELETE_TIMEOUT: Duration = Duration::from_secs(2);
/// Deepest nesting of sub-cgroups that [`ContainerCgroup::delete`] removes below a container.
const MAX_NESTED_DEPTH: u32 = 16;
/// Controllers Quilt enables on v2 (`cpuacct` does not exist there: `cpu.stat` is core).
const V2_CONTROLLERS: [CgroupController; 3] =
    [CgroupController::Memory, CgroupController::Pids, CgroupController::Cpu];
/// Controllers whose v1 hierarchies Quilt uses; also every member a [`ControllerSet`] can have.
const V1_CONTROLLERS: [CgroupController; 5] = [
    CgroupController::Memory,
    CgroupController::Pids,
    CgroupController::Cpu,
    CgroupController::CpuAcct,
    CgroupController::Devices,
];

/// The only devices a container may use on v1, all character devices, all `rwm`.
/// Matches the nodes Quilt puts in the container's own `/dev`.
const DEVICE_ALLOWLIST: [DeviceRule; 8] = [
    DeviceRule::char(1, Some(3)), // null
    DeviceRule::char(1, Some(5)), // zero
    DeviceRule::char(1, Some(7)), // full
    DeviceRule::char(1, Some(8)), // random
    DeviceRule::char(1, Some(9)), // urandom
    DeviceRule::char(5, Some(0)), // tty
    DeviceRule::char(5, Some(2)), // ptmx
    DeviceRule::char(136, None),  // pts/*
];

/// Failures of this module, one variant per step; the OS error is kept as the source.
/// `pub` (not `pub(crate)`) because the engine's public error wraps it.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The parent path is not a relative path of plain components.
    #[error("cgroup parent {parent:?} must be a relative path of plain components")]
    InvalidParent {
        /// The rejected parent.
        parent: String,
    },
    /// The container name is not a single plain path component.
    #[error("cgroup name {name:?} must be a single plain path component")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// statfs on the would-be cgroup2 mount failed.
    #[error("cannot statfs {path}")]
    Detect {
        /// The mount point examined.
        path: PathBuf,
        /// The statfs error.
        #[source]
        source: Errno,
    },
    /// The path given as a cgroup2 mount is some other file system.
    #[error("{path} is not a cgroup2 mount")]
    NotCgroup2 {
        /// The mount point examined.
        path: PathBuf,
    },
    /// No v1 hierarchy for any controller Quilt uses is mounted.
    #[error("no cgroup v1 hierarchy for memory, pids, cpu, cpuacct or devices is mounted")]
    NoHierarchy,
    /// Reading the controllers a cgroup2 tree offers failed.
    #[error("cannot read the available controllers from {path}")]
    ReadControllers {
        /// The `cgroup.controllers` or `cgroup.subtree_control` file.
        path: PathBuf,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// Creating Quilt's parent cgroup failed.
    #[error("cannot create the parent cgroup {path}")]
    CreateParent {
        /// The directory.
        path: PathBuf,
        /// The mkdir error.
        #[source]
        source: io::Error,
    },
    /// A limit is zero, too small or too large to write.
    #[error("invalid {limit} limit {value}: {reason}")]
    InvalidLimit {
        /// Which limit (`memory_bytes`, `cpu_millis`, `pids`).
        limit: &'static str,
        /// The rejected value.
        value: u64,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A limit was asked for whose controller this host's tree lacks.
    #[error("{controller} limit unsupported: no {controller} controller in this cgroup {version} tree")]
    ControllerMissing {
        /// The missing controller.
        controller: CgroupController,
        /// The tree's version.
        version: CgroupVersion,
    },
    /// A container cgroup of that name already exists (a leftover, or a name reused).
    #[error("cgroup {path} already exists")]
    AlreadyExists {
        /// The existing directory.
        path: PathBuf,
    },
    /// mkdir of the container cgroup failed.
    #[error("cannot create cgroup {path}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The mkdir error.
        #[source]
        source: io::Error,
    },
    /// Writing a limit failed.
    #[error("cannot write {value:?} to {file} in {path}")]
    SetLimit {
        /// The cgroup directory.
        path: PathBuf,
        /// The control file.
        file: &'static str,
        /// The value written.
        value: String,
        /// The error from `cgroups-rs`, which carries the OS error (boxed: it is large).
        #[source]
        source: Box<cgroups_rs::fs::error::Error>,
    },
    /// Opening a descriptor for the child to attach with failed.
    #[error("cannot open {path} for attaching")]
    OpenAttach {
        /// The `tasks` file (v1) or cgroup directory (v2).
        path: PathBuf,
        /// The open error.
        #[source]
        source: io::Error,
    },
    /// Writing `cgroup.kill` failed.
    #[error("cannot write {path}")]
    Kill {
        /// The `cgroup.kill` file.
        path: PathBuf,
        /// The write error.
        #[source]
        source: io::Error,
    },
    /// Listing the processes of a cgroup failed.
    #[error("cannot read {path}")]
    ListProcesses {
        /// The `cgroup.procs` file.
        path: PathBuf,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// SIGKILL could not be sent to a process of the cgroup.
    #[error("cannot SIGKILL pid {pid}")]
    Signal {
        /// The process.
        pid: i32,
        /// The kill(2) error.
        #[source]
        source: Errno,
    },
    /// Processes were still appearing after every kill round.
    #[error("{remaining} processes still in {path} after {KILL_TIMEOUT:?} of SIGKILLs")]
    KillIncomplete {
        /// A cgroup directory that still has processes.
        path: PathBuf,
        /// How many were left in the last listing.
        remaining: usize,
    },
    /// rmdir of the cgroup failed for a reason other than it being busy.
    #[error("cannot remove cgroup {path}")]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The rmdir error.
        #[source]
        source: io::Error,
    },
    /// The cgroup still had processes (or sub-cgroups) when the wait ran out.
    #[error("cgroup {path} did not empty within {DELETE_TIMEOUT:?}")]
    NotEmpty {
        /// The directory.
        path: PathBuf,
    },
}

/// Which cgroup interface the host offers. `pub` because the engine re-exports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller (or group of controllers).
    V1,
    /// The unified hierarchy.
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// A controller Quilt relies on. `pub` because [`CgroupError::ControllerMissing`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupController {
    /// Memory limit, peak and OOM kill counters.
    Memory,
    /// Process count limit.
    Pids,
    /// CPU bandwidth limit (and, on v2, CPU time).
    Cpu,
    /// CPU time accounting (v1 only).
    CpuAcct,
    /// Device access list (v1 only).
    Devices,
}

impl CgroupController {
    /// The controller's name as the kernel spells it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            CgroupController::Memory => "memory",
            CgroupController::Pids => "pids",
            CgroupController::Cpu => "cpu",
            CgroupController::CpuAcct => "cpuacct",
            CgroupController::Devices => "devices",
        }
    }

    fn bit(self) -> u8 {
        match self {
            CgroupController::Memory => 1,
            CgroupController::Pids => 1 << 1,
            CgroupController::Cpu => 1 << 2,
            CgroupController::CpuAcct => 1 << 3,
            CgroupController::Devices => 1 << 4,
        }
    }
}

impl fmt::Display for CgroupController {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A small set of [`CgroupController`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ControllerSet(u8);

impl ControllerSet {
    fn contains(self, controller: CgroupController) -> bool {
        self.0 & controller.bit() != 0
    }

    fn insert(&mut self, controller: CgroupController) {
        self.0 |= controller.bit();
    }

    fn remove(&mut self, controller: CgroupController) {
        self.0 &= !controller.bit();
    }

    fn iter(self) -> impl Iterator<Item = CgroupController> {
        V1_CONTROLLERS.into_iter().filter(move |controller| self.contains(*controller))
    }
}

/// Limits to apply. None = not limited by Quilt (caller always sets them in practice).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CgroupLimits {
    /// Memory limit in bytes; swap cannot extend it.
    pub(crate) memory_bytes: Option<u64>,
    /// CPU quota in thousandths of a CPU (1000 = one full CPU); period is 100_000 us.
    pub(crate) cpu_millis: Option<u64>,
    /// Most processes (and threads) alive at once.
    pub(crate) pids: Option<u64>,
}

/// [`CgroupLimits`] checked and converted to what the kernel files take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ValidLimits {
    memory_bytes: Option<i64>,
    cpu_quota_us: Option<i64>,
    pids: Option<i64>,
}

impl ValidLimits {
    /// Rejects zero, too-small values and anything that would turn negative as an `i64`.
    fn new(limits: &CgroupLimits) -> Result<Self, CgroupError> {
        let memory_bytes = limits
            .memory_bytes
            .map(|bytes| {
                if bytes < MIN_MEMORY_BYTES {
                    return Err(CgroupError::InvalidLimit {
                        limit: "memory_bytes",
                        value: bytes,
                        reason: "below the 4 MiB minimum",
                    });
                }
                to_kernel_value("memory_bytes", bytes)
            })
            .transpose()?;
        let cpu_quota_us = limits
            .cpu_millis
            .map(|millis| {
                let quota = cpu_quota_us(millis).ok_or(CgroupError::InvalidLimit {
                    limit: "cpu_millis",
                    value: millis,
                    reason: "too large",
                })?;
                if quota < MIN_CPU_QUOTA_US {
                    return Err(CgroupError::InvalidLimit {
                        limit: "cpu_millis",
                        value: millis,
                        reason: "below the kernel's 1 ms quota minimum (10 thousandths of a CPU)",
                    });
                }
                to_kernel_value("cpu_millis", quota)
            })
            .transpose()?;
        let pids = limits
            .pids
            .map(|pids| {
                if pids == 0 {
                    return Err(CgroupError::InvalidLimit { limit: "pids", value: pids, reason: "zero" });
                }
                to_kernel_value("pids", pids)
            })
            .transpose()?;
        Ok(Self { memory_bytes, cpu_quota_us, pids })
    }

    /// The controllers these limits need.
    fn required_controllers(&self) -> impl Iterator<Item = CgroupController> {
        [
            (self.memory_bytes.is_some(), CgroupController::Memory),
            (self.cpu_quota_us.is_some(), CgroupController::Cpu),
            (self.pids.is_some(), CgroupController::Pids),
        ]
        .into_iter()
        .filter_map(|(needed, controller)| needed.then_some(controller))
    }
}

/// The CFS quota in microseconds per [`CPU_PERIOD_US`] for `millis` thousandths of a CPU.
fn cpu_quota_us(millis: u64) -> Option<u64> {
    millis.checked_mul(CPU_QUOTA_US_PER_MILLI)
}

/// Kernel limit files parse signed 64-bit numbers; a larger `u64` would wrap negative.
fn to_kernel_value(limit: &'static str, value: u64) -> Result<i64, CgroupError> {
    i64::try_from(value).map_err(|_| CgroupError::InvalidLimit { limit, value, reason: "too large" })
}

/// One entry of the v1 devices allow-list: a character device, any minor when `minor` is None.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeviceRule {
    major: i64,
    minor: Option<i64>,
}

impl DeviceRule {
    const fn char(major: i64, minor: Option<i64>) -> Self {
        Self { major, minor }
    }

    /// The minor in `cgroups-rs`'s convention, where -1 means "any".
    fn minor_or_any(self) -> i64 {
        self.minor.unwrap_or(-1)
    }
}

impl fmt::Display for DeviceRule {
    /// The rule as `devices.allow` and `devices.list` spell it.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.minor {
            Some(minor) => write!(formatter, "c {}:{} rwm", self.major, minor),
            None => write!(formatter, "c {}:* rwm", self.major),
        }
    }
}

/// One mounted hierarchy (v1) or the unified tree (v2), with the Quilt controllers it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HierarchyMount {
    /// Where it is mounted.
    mount_point: PathBuf,
    /// The cgroup the mount shows as its root (`/` unless bind-mounted from a sub-cgroup).
    mount_root: PathBuf,
    controllers: ControllerSet,
}

/// Picks, for each controller Quilt uses, the v1 hierarchy mounting it, one entry per mount
/// so a joint `cpu,cpuacct` hierarchy yields one directory, not two.
fn v1_mounts(mountinfo: &[Mountinfo]) -> Vec<HierarchyMount> {
    let mut mounts: Vec<HierarchyMount> = Vec::new();
    for controller in V1_CONTROLLERS {
        let Some(info) = mountinfo.iter().find(|info| {
            info.fs_type.0 == "cgroup" && info.super_opts.iter().any(|option| option == controller.name())
        }) else {
            continue;
        };
        match mounts.iter_mut().find(|mount| mount.mount_point == info.mount_point) {
            Some(mount) => mount.controllers.insert(controller),
            None => {
                let mut controllers = ControllerSet::default();
                controllers.insert(controller);
                mounts.push(HierarchyMount {
                    mount_point: info.mount_point.clone(),
                    mount_root: info.mount_root.clone(),
                    controllers,
                });
            }
        }
    }
    mounts
}

/// The hierarchies Quilt uses, as a `cgroups-rs` [`Hierarchy`]: built once at detection with
/// only Quilt's controllers, so loading a cgroup from it does no I/O.
#[derive(Debug, Clone)]
struct QuiltHierarchy {
    version: CgroupVersion,
    /// v1: one per mounted hierarchy; v2: exactly one, the unified tree.
    mounts: Vec<HierarchyMount>,
}

impl QuiltHierarchy {
    /// Every Quilt controller available in any of the mounts.
    fn controllers(&self) -> ControllerSet {
        let mut all = ControllerSet::default();
        for controller in self.mounts.iter().flat_map(|mount| mount.controllers.iter()) {
            all.insert(controller);
        }
        all
    }
}

impl Hierarchy for QuiltHierarchy {
    fn subsystems(&self) -> Vec<Subsystem> {
        let v2 = self.version == CgroupVersion::V2;
        let mut subsystems = Vec::new();
        for mount in &self.mounts {
            for controller in mount.controllers.iter() {
                let point = mount.mount_point.clone();
                let root = mount.mount_root.clone();
                subsystems.push(match controller {
                    CgroupController::Memory => Subsystem::Mem(MemController::new(point, root, v2)),
                    CgroupController::Pids => Subsystem::Pid(PidController::new(point, root, v2)),
                    CgroupController::Cpu => Subsystem::Cpu(CpuController::new(point, root, v2)),
                    CgroupController::CpuAcct => Subsystem::CpuAcct(CpuAcctController::new(point, root)),
                    CgroupController::Devices => Subsystem::Devices(DevicesController::new(point, root)),
                });
            }
        }
        subsystems
    }

    fn root(&self) -> PathBuf {
        let first_mount = self.mounts.first().map(|mount| mount.mount_point.as_path());
        match self.version {
            CgroupVersion::V2 => first_mount.map(Path::to_path_buf).unwrap_or_default(),
            // v1 hierarchies are mounted side by side, conventionally under /sys/fs/cgroup.
            CgroupVersion::V1 => {
                first_mount.and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default()
            }
        }
    }

    fn root_control_group(&self) -> Cgroup {
        Cgroup::load(Box::new(self.clone()), "")
    }

    fn parent_control_group(&self, path: &str) -> Cgroup {
        let parent = Path::new(path).parent().unwrap_or(Path::new(""));
        Cgroup::load(Box::new(self.clone()), parent)
    }

    fn v2(&self) -> bool {
        self.version == CgroupVersion::V2
    }
}

/// Checks that `parent` is a non-empty relative path of plain components.
fn validate_parent(parent: &str) -> Result<PathBuf, CgroupError> {
    let path = Path::new(parent);
    let plain = path.components().next().is_some()
        && path.components().all(|component| matches!(component, Component::Normal(_)));
    if plain {
        Ok(path.to_path_buf())
    } else {
        Err(CgroupError::InvalidParent { parent: parent.to_owned() })
    }
}

/// Checks that `name` is exactly one plain path component, so it cannot leave the parent.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// A container cgroup, or one level below it (`container/sub`: the leaf of a long-running
/// container's first process, or one exec's cgroup inside the container's).
fn is_valid_path(path: &str) -> bool {
    match path.split_once('/') {
        None => is_valid_name(path),
        Some((container, sub)) => is_valid_name(container) && is_valid_name(sub),
    }
}

fn validate_path(path: &str) -> Result<(), CgroupError> {
    if is_valid_path(path) {
        Ok(())
    } else {
        Err(CgroupError::InvalidName { name: path.to_owned() })
    }
}

/// Where Quilt's cgroups live: detected once per process (parse /proc/self/mountinfo once), then cheap to use.
#[derive(Debug, Clone)]
pub(crate) struct CgroupRoot {
    hierarchy: QuiltHierarchy,
    /// Relative path under each mount that holds every container cgroup.
    parent: PathBuf,
    /// v1: `memory.memsw.limit_in_bytes` exists; v2: `memory.swap.max` exists.
    swap_limit: bool,
    /// v2 only: `cgroup.kill` exists (Linux 5.14+).
    cgroup_kill: bool,
}

impl CgroupRoot {
    /// Detect: if /sys/fs/cgroup is cgroup2 (statfs magic) -> V2 there; else V1 using the v1
    /// hierarchies for memory, pids, cpu, cpuacct and devices, each found by its own mount point
    /// in mountinfo (a joint `cpu,cpuacct` mount gives one directory). `parent` is a relative
    /// path like "quilt" under which every container cgroup is created; created if missing (on
    /// v2, +memory +pids +cpu are enabled in the subtree_control of the parent chain where
    /// available).
    pub(crate) fn detect(parent: &str) -> Result<Self, CgroupError> {
        let parent_path = validate_parent(parent)?;
        if hierarchies::is_cgroup2_unified_mode() {
            return Self::v2_at(Path::new(UNIFIED_MOUNT_POINT), parent);
        }
        let mounts = v1_mounts(&hierarchies::mountinfo_self());
        if mounts.is_empty() {
            return Err(CgroupError::NoHierarchy);
        }
        for mount in &mounts {
            let path = mount.mount_point.join(&parent_path);
            fs::create_dir_all(&path).map_err(|source| CgroupError::CreateParent { path, source })?;
        }
        let swap_limit =
            mounts.iter().find(|mount| mount.controllers.contains(CgroupController::Memory)).is_some_and(
                |mount| mount.mount_point.join(&parent_path).join("memory.memsw.limit_in_bytes").exists(),
            );
        let root = Self {
            hierarchy: QuiltHierarchy { version: CgroupVersion::V1, mounts },
            parent: parent_path,
            swap_limit,
            cgroup_kill: false,
        };
        root.log_detected();
        Ok(root)
    }

    /// A cgroup v2 hierarchy mounted at `mount`, with container cgroups under `mount/parent`.
    /// Used by [`CgroupRoot::detect`] for `/sys/fs/cgroup`, and by tests against the hybrid
    /// host's `/sys/fs/cgroup/unified`. The controllers offered are those of the mount's
    /// `cgroup.controllers` that could be enabled down to the parent.
    pub(crate) fn v2_at(mount: &Path, parent: &str) -> Result<Self, CgroupError> {
        let parent_path = validate_parent(parent)?;
        let stat =
            statfs(mount).map_err(|source| CgroupError::Detect { path: mount.to_path_buf(), source })?;
        if stat.filesystem_type() != CGROUP2_SUPER_MAGIC {
            return Err(CgroupError::NotCgroup2 { path: mount.to_path_buf() });
        }
        let controllers_file = mount.join("cgroup.controllers");
        let offered = fs::read_to_string(&controllers_file)
            .map_err(|source| CgroupError::ReadControllers { path: controllers_file, source })?;
        let mut enabled = v2_controller_set(&offered);

        // Each level must delegate a controller for the next level to have it, so enable it
        // in the root, every ancestor, and the parent itself (whose children are containers).
        let mut level = mount.to_path_buf();
        for component in parent_path.components() {
            enabled = enable_v2_controllers(&level, enabled)?;
            level.push(component);
            match fs::create_dir(&level) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(CgroupError::CreateParent { path: level, source }),
            }
        }
        enabled = enable_v2_controllers(&level, enabled)?;

        let swap_limit = enabled.contains(CgroupController::Memory) && level.join("memory.swap.max").exists();
        let cgroup_kill = level.join("cgroup.kill").exists();
        let root = Self {
            hierarchy: QuiltHierarchy {
                version: CgroupVersion::V2,
                mounts: vec![HierarchyMount {
                    mount_point: mount.to_path_buf(),
                    mount_root: PathBuf::new(),
                    controllers: enabled,
                }],
            },
            parent: parent_path,
            swap_limit,
            cgroup_kill,
        };
        root.log_detected();
        Ok(root)
    }

    fn log_detected(&self) {
        let controllers: Vec<&str> =
            self.hierarchy.controllers().iter().map(CgroupController::name).collect();
        tracing::debug!(
            version = %self.version(),
            parent = %self.parent.display(),
            ?controllers,
            swap_limit = self.swap_limit,
            cgroup_kill = self.cgroup_kill,
            "cgroups detected"
        );
        if self.version() == CgroupVersion::V1 && !self.has_controller(CgroupController::Devices) {
            tracing::warn!("no v1 devices hierarchy: container device access is not restricted by cgroups");
        }
    }

    /// Which cgroup interface is in use.
    pub(crate) fn version(&self) -> CgroupVersion {
        self.hierarchy.version
    }

    /// Controllers that are actually available for limits (so callers can tell the user e.g.
    /// "memory limit unsupported: no memory controller in this cgroup v2 tree").
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn controllers(&self) -> Vec<CgroupController> {
        self.hierarchy.controllers().iter().collect()
    }

    /// Whether `controller` is available for container cgroups.
    pub(crate) fn has_controller(&self, controller: CgroupController) -> bool {
        self.hierarchy.controllers().contains(controller)
    }

    /// Creates the container cgroup `name` in every hierarchy and writes `limits` (and, on v1,
    /// the device allow-list). A limit whose controller is missing is
    /// [`CgroupError::ControllerMissing`], reported before anything is created; an existing
    /// cgroup of that name is [`CgroupError::AlreadyExists`]. On any failure, the directories
    /// created so far are removed again.
    ///
    /// `name` may name a sub-cgroup of an existing container cgroup (`container/sub`); on v2
    /// the container's `cgroup.subtree_control` then gets Quilt's controllers first, which the
    /// kernel allows only while the container cgroup itself holds no process.
    pub(crate) fn create(&self, name: &str, limits: &CgroupLimits) -> Result<ContainerCgroup, CgroupError> {
        validate_path(name)?;
        if let (CgroupVersion::V2, Some((container, _))) = (self.version(), name.split_once('/')) {
            let dir = self.container(container).primary_dir().to_path_buf();
            enable_v2_controllers(&dir, self.hierarchy.controllers())?;
        }
        let limits = ValidLimits::new(limits)?;
        let available = self.hierarchy.controllers();
        if let Some(controller) =
            limits.required_controllers().find(|controller| !available.contains(*controller))
        {
            return Err(CgroupError::ControllerMissing { controller, version: self.version() });
        }

        let cgroup = self.container(name);
        for (created, dir) in cgroup.dirs.iter().enumerate() {
            if let Err(source) = fs::create_dir(&dir.path) {
                cgroup.remove_created(created);
                return Err(if source.kind() == io::ErrorKind::AlreadyExists {
                    CgroupError::AlreadyExists { path: dir.path.clone() }
                } else {
                    CgroupError::Create { path: dir.path.clone(), source }
                });
            }
        }
        if let Err(error) = self.apply_limits(name, &limits) {
            cgroup.remove_created(cgroup.dirs.len());
            return Err(error);
        }
        Ok(cgroup)
    }

    /// Writes `limits` through `cgroups-rs`'s controllers of the freshly created cgroup.
    fn apply_limits(&self, name: &str, limits: &ValidLimits) -> Result<(), CgroupError> {
        let v2 = self.version() == CgroupVersion::V2;
        let cgroup = Cgroup::load(Box::new(self.hierarchy.clone()), self.parent.join(name));
        for subsystem in cgroup.subsystems() {
            match subsystem {
                Subsystem::Mem(memory) => {
                    if let Some(bytes) = limits.memory_bytes {
                        apply_memory(memory, bytes, self.swap_limit, v2)?;
                    }
                }
                Subsystem::Cpu(cpu) => {
                    if let Some(quota) = limits.cpu_quota_us {
                        apply_cpu(cpu, quota, v2)?;
                    }
                }
                Subsystem::Pid(pids) => {
                    if let Some(max) = limits.pids {
                        pids.set_pid_max(MaxValue::Value(max)).map_err(|source| {
                            set_limit_error(pids.path(), "pids.max", max.to_string(), source)
                        })?;
                    }
                }
                Subsystem::Devices(devices) => restrict_devices(devices)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Re-open an existing container cgroup by name (for cleanup of leftovers after a crash).
    /// None when the name is invalid or no hierarchy has a cgroup of that name.
    pub(crate) fn open_existing(&self, name: &str) -> Option<ContainerCgroup> {
        if !is_valid_path(name) {
            return None;
        }
        let cgroup = self.container(name);
        cgroup.dirs.iter().any(|dir| dir.path.is_dir()).then_some(cgroup)
    }

    /// Names of all container cgroups that exist under the parent in any hierarchy (for
    /// leftover detection), sorted.
    pub(crate) fn list(&self) -> Vec<String> {
        let mut names = Vec::new();
        for mount in &self.hierarchy.mounts {
            let Ok(entries) = fs::read_dir(mount.mount_point.join(&self.parent)) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    continue;
                }
                if let Ok(name) = entry.file_name().into_string() {
                    if is_valid_name(&name) {
                        names.push(name);
                    }
                }
            }
        }
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Names of the sub-cgroups of container cgroup `name` in any hierarchy, sorted.
    pub(crate) fn children(&self, name: &str) -> Vec<String> {
        if !is_valid_name(name) {
            return Vec::new();
        }
        let mut names = Vec::new();
        for mount in &self.hierarchy.mounts {
            let Ok(entries) = fs::read_dir(mount.mount_point.join(&self.parent).join(name)) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    if let Ok(child) = entry.file_name().into_string() {
                        names.push(child);
                    }
                }
            }
        }
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The handle of container `name` (whether or not it exists).
    fn container(&self, name: &str) -> ContainerCgroup {
        let dirs = self
            .hierarchy
            .mounts
            .iter()
            .map(|mount| CgroupDir {
                path: mount.mount_point.join(&self.parent).join(name),
                controllers: mount.controllers,
            })
            .collect();
        ContainerCgroup {
            name: name.to_owned(),
            version: self.version(),
            dirs,
            cgroup_kill: self.cgroup_kill,
        }
    }
}

/// The controllers of Quilt's that a cgroup2 `cgroup.controllers`/`subtree_control` lists.
fn v2_controller_set(text: &str) -> ControllerSet {
    let mut set = ControllerSet::default();
    for word in text.split_whitespace() {
        if let Some(controller) = V2_CONTROLLERS.into_iter().find(|controller| controller.name() == word) {
            set.insert(controller);
        }
    }
    set
}

/// Enables `wanted` in `dir/cgroup.subtree_control` and returns those that are enabled there.
/// A controller the kernel refuses (e.g. `EBUSY` when `dir` holds processes) is dropped with
/// a warning: a container asking for its limit then gets [`CgroupError::ControllerMissing`].
fn enable_v2_controllers(dir: &Path, wanted: ControllerSet) -> Result<ControllerSet, CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&file)
        .map_err(|source| CgroupError::ReadControllers { path: file.clone(), source })?;
    let already = v2_controller_set(&current);
    let mut enabled = wanted;
    for controller in wanted.iter() {
        if already.contains(controller) {
            continue;
        }
        // One controller per write: the kernel applies a multi-controller write all or nothing.
        if let Err(error) = write_file(&file, &format!("+{controller}")) {
            tracing::warn!(
                %controller,
                file = %file.display(),
                %error,
                "cannot enable cgroup controller; its limits will be unavailable"
            );
            enabled.remove(controller);
        }
    }
    Ok(enabled)
}

fn set_limit_error(
    path: &Path,
    file: &'static str,
    value: String,
    source: cgroups_rs::fs::error::Error,
) -> CgroupError {
    CgroupError::SetLimit { path: path.to_path_buf(), file, value, source: Box::new(source) }
}

/// v1: `memory.limit_in_bytes`, then `memory.memsw.limit_in_bytes` to the same value (the
/// kernel requires memsw >= limit, so the limit goes first). v2: `memory.max`, then
/// `memory.swap.max` = 0. Either way swap cannot extend the limit.
fn apply_memory(memory: &MemController, bytes: i64, swap_limit: bool, v2: bool) -> Result<(), CgroupError> {
    let (limit_file, swap_file, swap_value) = if v2 {
        ("memory.max", "memory.swap.max", 0)
    } else {
        ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", bytes)
    };
    memory
        .set_limit(bytes)
        .map_err(|source| set_limit_error(memory.path(), limit_file, bytes.to_string(), source))?;
    if swap_limit {
        memory
            .set_memswap_limit(swap_value)
            .map_err(|source| set_limit_error(memory.path(), swap_file, swap_value.to_string(), source))?;
    }
    Ok(())
}

/// v1: `cpu.cfs_period_us` then `cpu.cfs_quota_us`; v2: `cpu.max` = `"<quota> <period>"`.
fn apply_cpu(cpu: &CpuController, quota_us: i64, v2: bool) -> Result<(), CgroupError> {
    if v2 {
        return cpu.set_cfs_quota_and_period(Some(quota_us), Some(CPU_PERIOD_US)).map_err(|source| {
            set_limit_error(cpu.path(), "cpu.max", format!("{quota_us} {CPU_PERIOD_US}"), source)
        });
    }
    cpu.set_cfs_period(CPU_PERIOD_US).map_err(|source| {
        set_limit_error(cpu.path(), "cpu.cfs_period_us", CPU_PERIOD_US.to_string(), source)
    })?;
    cpu.set_cfs_quota(quota_us)
        .map_err(|source| set_limit_error(cpu.path(), "cpu.cfs_quota_us", quota_us.to_string(), source))
}

/// v1 devices cgroup: deny all, then allow exactly [`DEVICE_ALLOWLIST`].
fn restrict_devices(devices: &DevicesController) -> Result<(), CgroupError> {
    // `cgroups-rs` renders this as "a *:* "; the kernel reads only the leading "a".
    devices
        .deny_device(DeviceType::All, -1, -1, &[])
        .map_err(|source| set_limit_error(devices.path(), "devices.deny", "a".to_owned(), source))?;
    let access = DevicePermissions::all();
    for rule in DEVICE_ALLOWLIST {
        devices
            .allow_device(DeviceType::Char, rule.major, rule.minor_or_any(), &access)
            .map_err(|source| set_limit_error(devices.path(), "devices.allow", rule.to_string(), source))?;
    }
    Ok(())
}

/// One directory of a container cgroup and the controllers its hierarchy carries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupDir {
    path: PathBuf,
    controllers: ControllerSet,
}

/// One container's cgroup: a directory per v1 hierarchy, or one directory on v2.
#[derive(Debug)]
pub(crate) struct ContainerCgroup {
    name: String,
    version: CgroupVersion,
    dirs: Vec<CgroupDir>,
    cgroup_kill: bool,
}

/// What the container's child process needs to join its cgroup; prepared before the clone.
#[derive(Debug)]
pub(crate) enum AttachHandle {
    /// v1: one fd per hierarchy, `<hierarchy>/<parent>/<name>/tasks` opened O_WRONLY|O_CLOEXEC.
    /// The container's child process writes "0" to each itself, before it execs. `tasks`
    /// moves only the writing thread, which is all of the child while it is single-threaded.
    V1 {
        /// The `tasks` files, in hierarchy order.
        tasks: Vec<OwnedFd>,
    },
    /// v2: the cgroup directory opened O_RDONLY|O_DIRECTORY|O_CLOEXEC (O_PATH is not accepted
    /// by CLONE_INTO_CGROUP), for clone3's `cgroup` argument.
    V2 {
        /// The cgroup directory.
        dir: OwnedFd,
    },
}

/// Counters read from a container cgroup; a field is None when its file is missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CgroupUsage {
    /// CPU time in nanoseconds (v1 `cpuacct.usage`; v2 `cpu.stat` usage_usec * 1000).
    pub(crate) cpu_ns: Option<u64>,
    /// Peak memory in bytes (v1 `memory.max_usage_in_bytes`; v2 `memory.peak`).
    pub(crate) peak_memory_bytes: Option<u64>,
    /// Processes killed by the OOM killer (`oom_kill` of v1 `memory.oom_control`, v2 `memory.events`).
    pub(crate) oom_kills: Option<u64>,
    /// Forks refused by the pids limit (`max` of `pids.events`).
    pub(crate) pids_limit_hit: Option<u64>,
    /// CFS periods in which the CPU quota ran out (`nr_throttled` of `cpu.stat`, v1 and v2).
    pub(crate) cpu_throttled_periods: Option<u64>,
    /// Time spent throttled, nanoseconds (v1 `cpu.stat` throttled_time; v2 `cpu.stat`
    /// throttled_usec * 1000).
    pub(crate) cpu_throttled_ns: Option<u64>,
}

impl ContainerCgroup {
    /// The container name the cgroup was created or opened with.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Files the child writes "0" to, to move itself into this cgroup: every v1 hierarchy's
    /// `tasks`, or the v2 `cgroup.procs`. For children that cannot be cloned into their cgroup
    /// (a long-running container's first process, cloned by its shim's intermediate; an
    /// exec, cloned into another pid namespace). Close-on-exec.
    pub(crate) fn attach_files(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        let file = match self.version {
            CgroupVersion::V1 => "tasks",
            CgroupVersion::V2 => "cgroup.procs",
        };
        let mut files = Vec::with_capacity(self.dirs.len());
        for dir in &self.dirs {
            let path = dir.path.join(file);
            // std always adds O_CLOEXEC.
            let opened = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|source| CgroupError::OpenAttach { path, source })?;
            files.push(OwnedFd::from(opened));
        }
        Ok(files)
    }

    /// What the child needs to join this cgroup (see the module doc for why the child does
    /// it). Open it before the clone; the descriptors are close-on-exec.
    pub(crate) fn attach_handle(&self) -> Result<AttachHandle, CgroupError> {
        match self.version {
            CgroupVersion::V1 => {
                let mut tasks = Vec::with_capacity(self.dirs.len());
                for dir in &self.dirs {
                    let path = dir.path.join("tasks");
                    // std always adds O_CLOEXEC.
                    let file = fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|source| CgroupError::OpenAttach { path, source })?;
                    tasks.push(OwnedFd::from(file));
                }
                Ok(AttachHandle::V1 { tasks })
            }
            CgroupVersion::V2 => {
                let path = self.primary_dir().to_path_buf();
                let dir = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY)
                    .open(&path)
                    .map_err(|source| CgroupError::OpenAttach { path, source })?;
                Ok(AttachHandle::V2 { dir: OwnedFd::from(dir) })
            }
        }
    }

    /// SIGKILL every process in the cgroup, daemonised grandchildren included: v2 via
    /// `cgroup.kill` when present, else (and on v1) read `cgroup.procs` and kill each pid,
    /// repeating (for at most [`KILL_TIMEOUT`]) until empty. A cgroup that is already gone
    /// counts as empty.
    pub(crate) fn kill_all(&self) -> Result<(), CgroupError> {
        if self.version == CgroupVersion::V2 && self.cgroup_kill {
            let path = self.primary_dir().join("cgroup.kill");
            return match write_file(&path, "1") {
                Err(error) if error.kind() != io::ErrorKind::NotFound => {
                    Err(CgroupError::Kill { path, source: error })
                }
                _ => Ok(()),
            };
        }
        let mut pause = Duration::from_millis(1);
        let deadline = std::time::Instant::now() + KILL_TIMEOUT;
        loop {
            let pids = self.processes()?;
            if pids.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(CgroupError::KillIncomplete {
                    path: self.primary_dir().to_path_buf(),
                    remaining: pids.len(),
                });
            }
            for pid in pids {
                match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(source) => return Err(CgroupError::Signal { pid, source }),
                }
            }
            thread::sleep(pause);
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }

    /// Whether no process is left in the cgroup (true when it no longer exists). On v2 this is
    /// `populated 0` in `cgroup.events`, which also covers sub-cgroups.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn is_empty(&self) -> bool {
        if self.version == CgroupVersion::V2 {
            match fs::read_to_string(self.primary_dir().join("cgroup.events")) {
                Ok(events) => {
                    if let Some(populated) = flat_keyed_value(&events, "populated") {
                        return populated == 0;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => return true,
                Err(_) => {}
            }
        }
        self.processes().is_ok_and(|pids| pids.is_empty())
    }

    /// Read before delete. cpu time in ns (v1 cpuacct.usage; v2 cpu.stat usage_usec*1000), peak
    /// memory bytes (v1 memory.max_usage_in_bytes; v2 memory.peak if present), oom kills (v1
    /// memory.oom_control "oom_kill N"; v2 memory.events "oom_kill N"), how often pids.max
    /// was hit (pids.events "max N") and how often and how long the CPU quota throttled it
    /// (cpu.stat "nr_throttled", and v1 "throttled_time" in ns or v2 "throttled_usec"; v2 has
    /// them only where the cpu controller is enabled). Missing controller files give None
    /// fields, not errors.
    pub(crate) fn usage(&self) -> CgroupUsage {
        match self.version {
            CgroupVersion::V1 => {
                let cpuacct = self.dir_with(CgroupController::CpuAcct);
                let cpu = self.dir_with(CgroupController::Cpu);
                let memory = self.dir_with(CgroupController::Memory);
                let pids = self.dir_with(CgroupController::Pids);
                let cpu_stat = cpu.and_then(|dir| fs::read_to_string(dir.join("cpu.stat")).ok());
                CgroupUsage {
                    cpu_ns: cpuacct.and_then(|dir| read_u64(&dir.join("cpuacct.usage"))),
                    peak_memory_bytes: memory
                        .and_then(|dir| read_u64(&dir.join("memory.max_usage_in_bytes"))),
                    oom_kills: memory.and_then(|dir| read_keyed(&dir.join("memory.oom_control"), "oom_kill")),
                    pids_limit_hit: pids.and_then(|dir| read_keyed(&dir.join("pids.events"), "max")),
                    cpu_throttled_periods: cpu_stat
                        .as_deref()
                        .and_then(|text| flat_keyed_value(text, "nr_throttled")),
                    cpu_throttled_ns: cpu_stat
                        .as_deref()
                        .and_then(|text| flat_keyed_value(text, "throttled_time")),
                }
            }
            CgroupVersion::V2 => {
                let dir = self.primary_dir();
                let cpu_stat = fs::read_to_string(dir.join("cpu.stat")).ok();
                let cpu_stat_value = |key| cpu_stat.as_deref().and_then(|text| flat_keyed_value(text, key));
                CgroupUsage {
                    cpu_ns: cpu_stat_value("usage_usec").and_then(|micros| micros.checked_mul(1000)),
                    peak_memory_bytes: read_u64(&dir.join("memory.peak")),
                    oom_kills: read_keyed(&dir.join("memory.events"), "oom_kill"),
                    pids_limit_hit: read_keyed(&dir.join("pids.events"), "max"),
                    cpu_throttled_periods: cpu_stat_value("nr_throttled"),
                    cpu_throttled_ns: cpu_stat_value("throttled_usec")
                        .and_then(|micros| micros.checked_mul(1000)),
                }
            }
        }
    }

    /// Remove the cgroup in every hierarchy, sub-cgroups first. Waits (bounded, <= 2 s total,
    /// short sleeps) for it to become empty (rmdir gives EBUSY until then); gives
    /// [`CgroupError::NotEmpty`] if it never does. It does not kill: call
    /// [`ContainerCgroup::kill_all`] first. Idempotent: already gone = Ok.
    pub(crate) fn delete(self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + DELETE_TIMEOUT;
        for dir in &self.dirs {
            remove_cgroup_dir(&dir.path, deadline)?;
        }
        Ok(())
    }

    /// The directories this cgroup occupies (one per v1 hierarchy, one on v2).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|dir| dir.path.clone()).collect()
    }

    /// The first directory: the only one on v2.
    fn primary_dir(&self) -> &Path {
        self.dirs.first().map(|dir| dir.path.as_path()).unwrap_or(Path::new(""))
    }

    fn dir_with(&self, controller: CgroupController) -> Option<&Path> {
        self.dirs.iter().find(|dir| dir.controllers.contains(controller)).map(|dir| dir.path.as_path())
    }

    /// Every process listed in any of the cgroup's directories or their sub-cgroups (a
    /// long-running container's leaf and exec cgroups), without duplicates.
    fn processes(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = Vec::new();
        for dir in &self.dirs {
            collect_processes(&dir.path, MAX_NESTED_DEPTH, &mut pids)?;
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// Rollback of a failed [`CgroupRoot::create`]: removes the first `count` directories.
    fn remove_created(&self, count: usize) {
        for dir in self.dirs.iter().take(count) {
            if let Err(error) = fs::remove_dir(&dir.path) {
                tracing::warn!(path = %dir.path.display(), %error, "cannot roll back cgroup");
            }
        }
    }
}

/// Appends the pids of `dir/cgroup.procs` and of every sub-cgroup below it, `depth` levels
/// deep (cgroupfs directories hold only control files and sub-cgroups: no symlinks).
fn collect_processes(dir: &Path, depth: u32, pids: &mut Vec<i32>) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.procs");
    match fs::read_to_string(&path) {
        Ok(text) => pids.extend(parse_pids(&text)),
        // Removed meanwhile (a finished exec's or run's sub-cgroup): reading
        // a file of a just-removed cgroup gives ENODEV.
        Err(error)
            if error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ENODEV) =>
        {
            return Ok(())
        }
        Err(source) => return Err(CgroupError::ListProcesses { path, source }),
    }
    let Some(depth) = depth.checked_sub(1) else {
        return Ok(());
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            collect_processes(&entry.path(), depth, pids)?;
        }
    }
    Ok(())
}

/// The pids of a `cgroup.procs` text that may be signalled: positive, and not the worker.
fn parse_pids(text: &str) -> impl Iterator<Item = i32> + '_ {
    let own_pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    text.lines().filter_map(|line| line.trim().parse::<i32>().ok()).filter(move |pid| {
        if *pid == own_pid {
            tracing::warn!(pid, "the worker itself is in a container cgroup; not killing it");
        }
        *pid > 0 && *pid != own_pid
    })
}

/// The value of `key` in a flat-keyed cgroup file ("key value" per line), e.g. `oom_kill`
/// in `memory.oom_control`/`memory.events`, `usage_usec` in `cpu.stat`, `max` in `pids.events`.
fn flat_keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        if fields.next()? != key {
            return None;
        }
        fields.next()?.parse().ok()
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    flat_keyed_value(&fs::read_to_string(path).ok()?, key)
}

/// Writes `value` in one write(2), as cgroup files require, without creating or truncating.
fn write_file(path: &Path, value: &str) -> io::Result<()> {
    fs::OpenOptions::new().write(true).open(path)?.write_all(value.as_bytes())
}

/// rmdir `path`, retrying while the kernel says it is busy until `deadline`; sub-cgroups a
/// container created are removed first.
fn remove_cgroup_dir(path: &Path, deadline: Instant) -> Result<(), CgroupError> {
    let mut pause = Duration::from_millis(1);
    loop {
        let error = match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => error,
        };
        if error.raw_os_error() != Some(libc::EBUSY) {
            return Err(CgroupError::Remove { path: path.to_path_buf(), source: error });
        }
        remove_nested_cgroups(path, MAX_NESTED_DEPTH);
        let now = Instant::now();
        if now >= deadline {
            return Err(CgroupError::NotEmpty { path: path.to_path_buf() });
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
    }
}

/// Best-effort, depth-first rmdir of the sub-cgroups below `path` (cgroupfs directories hold
/// only control files and sub-cgroups, and cannot contain symlinks).
fn remove_nested_cgroups(path: &Path, depth: u32) {
    let Some(depth) = depth.checked_sub(1) else {
        return;
    };
    let Ok(entries) = fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            let child = entry.path();
            remove_nested_cgroups(&child, depth);
            // Still busy children are retried by the caller's next round.
            let _ = fs::remove_dir(&child);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Mutex, MutexGuard};

    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

    const TEST_PARENT: &str = "quilt-test";
    const MIB: u64 = 1024 * 1024;

    // ---- pure logic -------------------------------------------------------------------

    #[test]
    fn errors_can_cross_threads() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<CgroupError>();
        assert_send_sync::<ContainerCgroup>();
        assert_send_sync::<CgroupRoot>();
    }

    #[test]
    fn cpu_quota_is_millis_times_one_hundred_against_a_100ms_period() {
        assert_eq!(CPU_PERIOD_US, 100_000);
        assert_eq!(cpu_quota_us(500), Some(50_000));
        assert_eq!(cpu_quota_us(1000), Some(100_000));
        assert_eq!(cpu_quota_us(2500), Some(250_000));
        assert_eq!(cpu_quota_us(u64::MAX), None);
        let limits = ValidLimits::new(&CgroupLimits { cpu_millis: Some(1500), ..CgroupLimits::default() })
            .expect("valid");
        assert_eq!(limits.cpu_quota_us, Some(150_000));
    }

    #[test]
    fn limits_never_write_zero_tiny_or_negative_values() {
        let invalid = |limits: CgroupLimits, expected: &str| match ValidLimits::new(&limits) {
            Err(CgroupError::InvalidLimit { limit, .. }) => assert_eq!(limit, expected),
            other => panic!("{limits:?} gave {other:?}"),
        };
        for bytes in [0, 1, MIN_MEMORY_BYTES - 1, 1u64 << 63, u64::MAX] {
            invalid(CgroupLimits { memory_bytes: Some(bytes), ..CgroupLimits::default() }, "memory_bytes");
        }
        for millis in [0, 9, u64::MAX / 100 + 1, u64::MAX] {
            invalid(CgroupLimits { cpu_millis: Some(millis), ..CgroupLimits::default() }, "cpu_millis");
        }
        for pids in [0, 1u64 << 63] {
            invalid(CgroupLimits { pids: Some(pids), ..CgroupLimits::default() }, "pids");
        }
        let valid = ValidLimits::new(&CgroupLimits {
            memory_bytes: Some(MIN_MEMORY_BYTES),
            cpu_millis: Some(10),
            pids: Some(1),
        })
        .expect("smallest valid limits");
        assert_eq!(
            valid,
            ValidLimits { memory_bytes: Some(4 * MIB as i64), cpu_quota_us: Some(1000), pids: Some(1) }
        );
        assert_eq!(
            valid.required_controllers().collect::<Vec<_>>(),
            [CgroupController::Memory, CgroupController::Cpu, CgroupController::Pids]
        );
        assert_eq!(ValidLimits::new(&CgroupLimits::default()).ok(), Some(ValidLimits::default()));
    }

    #[test]
    fn device_allowlist_is_exactly_the_container_dev_nodes() {
        let rendered: Vec<String> = DEVICE_ALLOWLIST.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                "c 1:3 rwm",
                "c 1:5 rwm",
                "c 1:7 rwm",
                "c 1:8 rwm",
                "c 1:9 rwm",
                "c 5:0 rwm",
                "c 5:2 rwm",
                "c 136:* rwm",
            ]
        );
        assert_eq!(DeviceRule::char(136, None).minor_or_any(), -1);
    }

    #[test]
    fn flat_keyed_files_are_parsed_by_key() {
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(flat_keyed_value(oom_control, "oom_kill"), Some(3));
        assert_eq!(flat_keyed_value(oom_control, "oom_kill_disable"), Some(0));
        let memory_events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(flat_keyed_value(memory_events, "oom_kill"), Some(1));
        assert_eq!(flat_keyed_value(memory_events, "max"), Some(12));
        let cpu_stat = "usage_usec 70462309\nuser_usec 53114467\nsystem_usec 17347842\n\
                        nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n";
        assert_eq!(flat_keyed_value(cpu_stat, "usage_usec"), Some(70_462_309));
        let pids_events = "max 7\nmax.imposed 7\n";
        assert_eq!(flat_keyed_value(pids_events, "max"), Some(7));
        // Missing keys, prefixes and garbage are "unknown", never a panic.
        assert_eq!(flat_keyed_value(cpu_stat, "usage"), None);
        assert_eq!(flat_keyed_value("", "oom_kill"), None);
        assert_eq!(flat_keyed_value("oom_kill\n", "oom_kill"), None);
        assert_eq!(flat_keyed_value("oom_kill -1\n", "oom_kill"), None);
        assert_eq!(flat_keyed_value("oom_kill lots\n", "oom_kill"), None);
    }

    #[test]
    fn only_positive_foreign_pids_are_ever_signalled() {
        let own = std::process::id();
        let text = format!("0\n-1\n\n42\nnot-a-pid\n{own}\n 7 \n");
        assert_eq!(parse_pids(&text).collect::<Vec<_>>(), [42, 7]);
    }

    #[test]
    fn names_and_parents_cannot_leave_the_parent_cgroup() {
        for bad in ["", ".", "..", "a/b", "/abs", "../x", "x\0y"] {
            assert!(!is_valid_name(bad), "{bad:?} accepted");
        }
        assert!(is_valid_name("4242-task-0f3a"));
        for bad in ["", "/quilt", "../quilt", "quilt/../x", "./quilt"] {
            assert!(validate_parent(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(validate_parent("quilt").ok(), Some(PathBuf::from("quilt")));
        assert_eq!(validate_parent("a/b").ok(), Some(PathBuf::from("a/b")));
    }

    fn mountinfo(point: &str, options: &[&str]) -> Mountinfo {
        Mountinfo {
            mount_root: PathBuf::from("/"),
            mount_point: PathBuf::from(point),
            fs_type: ("cgroup".to_owned(), None),
            super_opts: options.iter().map(|option| (*option).to_owned()).collect(),
        }
    }

    #[test]
    fn separate_cpu_and_cpuacct_mounts_give_separate_directories() {
        let mounts = v1_mounts(&[
            mountinfo("/sys/fs/cgroup/cpu", &["rw", "cpu"]),
            mountinfo("/sys/fs/cgroup/cpuacct", &["rw", "cpuacct"]),
            mountinfo("/sys/fs/cgroup/memory", &["rw", "memory"]),
            mountinfo("/sys/fs/cgroup/systemd", &["rw", "name=systemd"]),
        ]);
        let points: Vec<_> = mounts.iter().map(|m| m.mount_point.clone()).collect();
        assert_eq!(
            points,
            [
                PathBuf::from("/sys/fs/cgroup/memory"),
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/sys/fs/cgroup/cpuacct"),
            ]
        );
        assert!(!mounts[1].controllers.contains(CgroupController::CpuAcct));
    }

    #[test]
    fn joint_cpu_cpuacct_mount_gives_one_directory_with_both() {
        let mounts = v1_mounts(&[
            mountinfo("/sys/fs/cgroup/cpu,cpuacct", &["rw", "cpu", "cpuacct"]),
            mountinfo("/sys/fs/cgroup/pids", &["rw", "pids"]),
        ]);
        assert_eq!(mounts.len(), 2);
        let joint = &mounts[1];
        assert_eq!(joint.mount_point, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert!(joint.controllers.contains(CgroupController::Cpu));
        assert!(joint.controllers.contains(CgroupController::CpuAcct));
        let hierarchy = QuiltHierarchy { version: CgroupVersion::V1, mounts };
        assert_eq!(hierarchy.subsystems().len(), 3);
        assert_eq!(hierarchy.root(), PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn v2_controller_lists_keep_only_quilts_controllers() {
        let set = v2_controller_set("cpuset cpu io memory hugetlb pids rdma misc\n");
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            [CgroupController::Memory, CgroupController::Pids, CgroupController::Cpu]
        );
        assert_eq!(v2_controller_set("hugetlb\n"), ControllerSet::default());
    }

    // ---- against this host's cgroups (root) -------------------------------------------

    /// The real-cgroup tests share the parent cgroup, which each removes at the end.
    static REAL_CGROUPS: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        REAL_CGROUPS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn unique_name(test: &str) -> String {
        format!("{}-{test}", std::process::id())
    }

    /// Kills and reaps the test's children and removes its cgroup and the test parent, even
    /// when an assertion failed half-way.
    struct Cleanup<'a> {
        root: &'a CgroupRoot,
        name: String,
        children: Vec<Child>,
    }

    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            let paths = self.root.container(&self.name).paths();
            if let Some(cgroup) = self.root.open_existing(&self.name) {
                let _ = cgroup.kill_all();
                let _ = cgroup.delete();
            }
            for path in paths {
                if let Some(parent) = path.parent() {
                    let _ = fs::remove_dir(parent);
                }
            }
        }
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
            .trim()
            .to_owned()
    }

    /// The directory of `cgroup` whose hierarchy has `file`.
    fn dir_with_file(cgroup: &ContainerCgroup, file: &str) -> PathBuf {
        cgroup
            .paths()
            .into_iter()
            .find(|path| path.join(file).exists())
            .unwrap_or_else(|| panic!("no hierarchy has {file}"))
    }

    fn procs(path: &Path) -> Vec<i32> {
        read(&path.join("cgroup.procs")).lines().filter_map(|line| line.parse().ok()).collect()
    }

    fn assert_close_on_exec(fd: &OwnedFd) {
        let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFD).expect("F_GETFD");
        assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
    }

    /// Polls until `cgroup` is empty, for at most two seconds.
    fn wait_until_empty(cgroup: &ContainerCgroup) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if cgroup.is_empty() {
                return true;
            }
            thread::sleep(Duration::from_millis(5));
        }
        cgroup.is_empty()
    }

    /// A shell that, once released through its stdin, starts a daemonised grandchild (own
    /// session, reparented away from the shell) and a plain one, then waits.
    fn spawn_forking_shell() -> Child {
        Command::new("sh")
            .args(["-c", "read go; setsid sleep 30 & sleep 30 & wait"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn sh")
    }

    fn release(child: &mut Child) {
        let stdin = child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"go\n").expect("release the shell");
        stdin.flush().expect("flush");
    }

    fn v1_root() -> Option<CgroupRoot> {
        let root = CgroupRoot::detect(TEST_PARENT).expect("detect");
        if root.version() == CgroupVersion::V1 {
            Some(root)
        } else {
            eprintln!("skipping: this host's cgroups are not v1");
            None
        }
    }

    fn unified_root() -> Option<CgroupRoot> {
        let mount = Path::new("/sys/fs/cgroup/unified");
        match CgroupRoot::v2_at(mount, TEST_PARENT) {
            Ok(root) => Some(root),
            Err(error) => {
                eprintln!("skipping: no cgroup2 mount at {}: {error}", mount.display());
                None
            }
        }
    }

    #[test]
    fn v1_create_limit_attach_kill_measure_delete() {
        let _serial = serial();
        let Some(root) = v1_root() else { return };
        let name = unique_name("v1-lifecycle");
        let mut cleanup = Cleanup { root: &root, name: name.clone(), children: Vec::new() };
        for controller in [
            CgroupController::Memory,
            CgroupController::Pids,
            CgroupController::Cpu,
            CgroupController::CpuAcct,
            CgroupController::Devices,
        ] {
            assert!(root.has_controller(controller), "{controller} missing");
        }

        let limits = CgroupLimits { memory_bytes: Some(64 * MIB), cpu_millis: Some(500), pids: Some(16) };
        let cgroup = root.create(&name, &limits).expect("create");
        assert_eq!(cgroup.name(), name);
        let paths = cgroup.paths();
        assert!(paths.iter().all(|path| path.is_dir()));
        assert!(paths.iter().all(|path| path.ends_with(Path::new(TEST_PARENT).join(&name))));

        let memory = dir_with_file(&cgroup, "memory.limit_in_bytes");
        assert_eq!(read(&memory.join("memory.limit_in_bytes")), (64 * MIB).to_string());
        if memory.join("memory.memsw.limit_in_bytes").exists() {
            assert_eq!(read(&memory.join("memory.memsw.limit_in_bytes")), (64 * MIB).to_string());
        }
        let cpu = dir_with_file(&cgroup, "cpu.cfs_quota_us");
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
        let pids = dir_with_file(&cgroup, "pids.max");
        assert_eq!(read(&pids.join("pids.max")), "16");
        let devices = dir_with_file(&cgroup, "devices.list");
        let mut listed: Vec<String> =
            read(&devices.join("devices.list")).lines().map(str::to_owned).collect();
        let mut expected: Vec<String> = DEVICE_ALLOWLIST.iter().map(ToString::to_string).collect();
        listed.sort();
        expected.sort();
        assert_eq!(listed, expected);

        // A second create of the same name must not reuse (or remove) the existing cgroup.
        assert!(matches!(root.create(&name, &limits), Err(CgroupError::AlreadyExists { .. })));
        assert!(paths.iter().all(|path| path.is_dir()));
        assert!(root.list().contains(&name));
        assert!(root.open_existing(&name).is_some());

        let child = Command::new("sleep").arg("5").spawn().expect("spawn sleep");
        let pid = child.id();
        cleanup.children.push(child);
        let AttachHandle::V1 { tasks } = cgroup.attach_handle().expect("attach handle") else {
            panic!("v1 host gave a v2 attach handle");
        };
        assert_eq!(tasks.len(), paths.len());
        for fd in tasks {
            assert_close_on_exec(&fd);
            let mut file = fs::File::from(fd);
            file.write_all(pid.to_string().as_bytes()).expect("write pid to tasks");
        }
        let pid = i32::try_from(pid).expect("pid fits i32");
        for path in &paths {
            assert_eq!(procs(path), [pid], "{}", path.display());
        }
        assert!(!cgroup.is_empty());

        cgroup.kill_all().expect("kill_all");
        let status = cleanup.children[0].wait().expect("wait sleep");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(cgroup.is_empty());

        let usage = cgroup.usage();
        assert!(usage.cpu_ns.is_some(), "{usage:?}");
        assert!(usage.peak_memory_bytes.is_some(), "{usage:?}");
        assert_eq!(usage.oom_kills, Some(0));
        assert_eq!(usage.pids_limit_hit, Some(0));
        assert_eq!(usage.cpu_throttled_periods, Some(0), "{usage:?}");
        assert_eq!(usage.cpu_throttled_ns, Some(0), "{usage:?}");

        cgroup.delete().expect("delete");
        for path in &paths {
            assert!(!path.exists(), "{} left behind", path.display());
        }
        assert!(root.open_existing(&name).is_none());
        assert!(!root.list().contains(&name));
        // Deleting what is already gone is fine.
        root.container(&name).delete().expect("idempotent delete");
    }

    /// The production path on v1: the child writes "0" to the pre-opened `tasks` descriptors
    /// between fork and exec, so the program it execs starts inside every hierarchy.
    #[test]
    #[allow(unsafe_code)]
    fn v1_child_attaches_itself_before_exec() {
        use std::os::unix::process::CommandExt;

        let _serial = serial();
        let Some(root) = v1_root() else { return };
        let name = unique_name("v1-self-attach");
        let mut cleanup = Cleanup { root: &root, name: name.clone(), children: Vec::new() };
        let cgroup = root.create(&name, &CgroupLimits::default()).expect("create");
        let AttachHandle::V1 { tasks } = cgroup.attach_handle().expect("attach handle") else {
            panic!("v1 host gave a v2 attach handle");
        };
        let mut command = Command::new("sleep");
        command.arg("5");
        // SAFETY: the hook runs in the forked child of this multi-threaded test process, where
        // only async-signal-safe calls are allowed: it only iterates a Vec that was built before
        // the fork and calls write(2); it allocates, locks and logs nothing.
        unsafe {
            command.pre_exec(move || {
                for fd in &tasks {
                    nix::unistd::write(fd, b"0")?;
                }
                Ok(())
            });
        }
        // spawn returns only once the exec succeeded, so the attach happened before it.
        let child = command.spawn().expect("spawn self-attaching sleep");
        drop(command);
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        cleanup.children.push(child);
        for path in cgroup.paths() {
            assert_eq!(procs(&path), [pid], "{}", path.display());
        }
        cgroup.kill_all().expect("kill_all");
        let status = cleanup.children[0].wait().expect("wait sleep");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        cgroup.delete().expect("delete");
    }

    #[test]
    fn v1_kill_all_reaches_daemonised_grandchildren_and_delete_waits() {
        let _serial = serial();
        let Some(root) = v1_root() else { return };
        let name = unique_name("v1-grandchildren");
        let mut cleanup = Cleanup { root: &root, name: name.clone(), children: Vec::new() };
        let cgroup =
            root.create(&name, &CgroupLimits { pids: Some(16), ..CgroupLimits::default() }).expect("create");
        let paths = cgroup.paths();
        cleanup.children.push(spawn_forking_shell());
        let shell = &mut cleanup.children[0];
        let AttachHandle::V1 { tasks } = cgroup.attach_handle().expect("attach handle") else {
            panic!("v1 host gave a v2 attach handle");
        };
        for fd in tasks {
            fs::File::from(fd).write_all(shell.id().to_string().as_bytes()).expect("write pid to tasks");
        }
        release(shell);
        let pids_dir = dir_with_file(&cgroup, "pids.max");
        let deadline = Instant::now() + Duration::from_secs(2);
        while procs(&pids_dir).len() < 3 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(procs(&pids_dir).len(), 3, "shell and both grandchildren");

        // A cgroup with live processes is never removed, and the wait is bounded.
        let started = Instant::now();
        match root.container(&name).delete() {
            Err(CgroupError::NotEmpty { path }) => assert!(paths.contains(&path)),
            other => panic!("delete of a busy cgroup gave {other:?}"),
        }
        assert!(started.elapsed() < DELETE_TIMEOUT + Duration::from_millis(500));
        assert!(paths.iter().all(|path| path.is_dir()));

        cgroup.kill_all().expect("kill_all");
        assert!(wait_until_empty(&cgroup), "processes survived kill_all");
        cgroup.delete().expect("delete");
        assert!(paths.iter().all(|path| !path.exists()));
    }

    #[test]
    fn v2_unified_create_attach_kill_measure_delete() {
        let _serial = serial();
        let Some(root) = unified_root() else { return };
        assert_eq!(root.version(), CgroupVersion::V2);
        let name = unique_name("v2-lifecycle");
        let mut cleanup = Cleanup { root: &root, name: name.clone(), children: Vec::new() };

        // Only the controllers this tree offers are usable, and asking for a missing one is
        // a clear error that leaves nothing behind.
        let available = root.controllers();
        for (limits, controller) in [
            (
                CgroupLimits { memory_bytes: Some(64 * MIB), ..CgroupLimits::default() },
                CgroupController::Memory,
            ),
            (CgroupLimits { cpu_millis: Some(500), ..CgroupLimits::default() }, CgroupController::Cpu),
            (CgroupLimits { pids: Some(16), ..CgroupLimits::default() }, CgroupController::Pids),
        ] {
            if available.contains(&controller) {
                continue;
            }
            match root.create(&name, &limits) {
                Err(error @ CgroupError::ControllerMissing { .. }) => {
                    let message = error.to_string();
                    assert_eq!(
                        message,
                        format!(
                            "{controller} limit unsupported: no {controller} controller in this cgroup v2 tree"
                        )
                    );
                }
                other => panic!("{controller} limit gave {other:?}"),
            }
            assert!(root.open_existing(&name).is_none());
        }

        let cgroup = root.create(&name, &CgroupLimits::default()).expect("create");
        let paths = cgroup.paths();
        assert_eq!(paths.len(), 1);
        assert!(paths[0].is_dir());
        assert!(root.list().contains(&name));

        let AttachHandle::V2 { dir } = cgroup.attach_handle().expect("attach handle") else {
            panic!("v2 root gave a v1 attach handle");
        };
        assert_close_on_exec(&dir);
        let status_flags = OFlag::from_bits_truncate(fcntl(dir.as_fd(), FcntlArg::F_GETFL).expect("F_GETFL"));
        assert!(!status_flags.contains(OFlag::O_PATH), "CLONE_INTO_CGROUP refuses O_PATH");
        assert!(status_flags.contains(OFlag::O_DIRECTORY));
        drop(dir);

        cleanup.children.push(spawn_forking_shell());
        let shell = &mut cleanup.children[0];
        write_file(&paths[0].join("cgroup.procs"), &shell.id().to_string())
            .expect("write pid to cgroup.procs");
        release(shell);
        let deadline = Instant::now() + Duration::from_secs(2);
        while procs(&paths[0]).len() < 3 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(procs(&paths[0]).len(), 3, "shell and both grandchildren");
        assert!(!cgroup.is_empty());

        assert!(root.cgroup_kill, "kernel 5.14+ has cgroup.kill");
        cgroup.kill_all().expect("kill_all");
        let status = cleanup.children[0].wait().expect("wait shell");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(wait_until_empty(&cgroup), "processes survived cgroup.kill");

        let usage = cgroup.usage();
        assert!(usage.cpu_ns.is_some(), "{usage:?}");

        cgroup.delete().expect("delete");
        assert!(!paths[0].exists());
        assert!(root.open_existing(&name).is_none());
    }
}
