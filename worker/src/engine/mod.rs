//! The container engine: create, start, wait for, kill and delete isolated,
//! limited containers, and say exactly how each one ended.
//!
//! It owns namespaces, cgroups, the root filesystem mounts, process spawn and
//! output capture. It knows nothing about NATS, tasks or images: callers hand
//! it a [`ContainerSpec`] whose root is a list of directories (an image's
//! unpacked layers, a plain rootfs, an OCI bundle's root) and get an
//! [`Outcome`] back.
//!
//! A container's life: [`Engine::create`] validates the spec and makes its
//! cgroup with the limits set (and, for disk scratch only, a state directory
//! `<state>/<id>/` holding the writable layer: an ext4 image of the scratch
//! size, see the `disk_layer` module, or plain upper and work directories;
//! by default the writable layer is a tmpfs inside the container's mount
//! namespace and captured output goes to anonymous files, so nothing per
//! container exists on the host's disk);
//! [`Container::start`] clones the setup process straight into fresh pid,
//! mount, uts, ipc, cgroup and (unless `network: host`) net namespaces, which
//! builds the root and execs the command (see the `child` module for the
//! exact order); [`Container::wait`] waits on the pidfd and enforces the
//! wall-clock timeout by killing the whole cgroup; [`Container::finish`]
//! reads usage and OOM counters from the cgroup, then removes everything.
//! (Removing the cgroup can wait, bounded at 2 s, for killed processes to
//! finish exiting; that wait blocks the calling thread.)
//! All mounts live only in the container's own mount namespace, so they
//! vanish with its last process even if the runtime itself is killed.
//! With [`EngineConfig::user_namespace`] set, the process also enters a
//! user namespace that maps container ids to an unprivileged host range
//! just before it takes its identity (the `userns` module).
//!
//! The container's first process is its pid 1: when it exits, the kernel
//! kills everything else in the pid namespace, daemonised grandchildren
//! included, so nothing outlives a container.
//!
//! **Each limit a container runs into is named in its [`Outcome`].** From
//! the cgroup, read before it is removed: OOM kills, forks refused at the
//! pids limit, and the periods and time the CPU quota throttled it. From
//! its in-memory filesystems: whether the scratch tmpfs (the writable root)
//! and /dev/shm had no block, or no inode, left ([`Usage`]); a disk layer's
//! filesystem is mounted by the runtime itself, which keeps its descriptor
//! for the same fstatfs. Those tmpfs
//! mounts exist only in the container's mount namespace and vanish with its
//! pid 1, and resolving `/proc/<pid>/root/...` from the host would follow
//! paths the container controls; instead the setup process opens an
//! `O_PATH` descriptor of each tmpfs root right after mounting it (before
//! pivot_root, long before exec) and sends both to the runtime with
//! `SCM_RIGHTS` over its setup channel, a `SOCK_SEQPACKET` pair whose
//! container end is close-on-exec: nothing the command does can reach that
//! channel. [`Container::finish`] gives each descriptor to fstatfs only
//! (never to a path lookup), then closes it before removing the cgroup, as
//! it keeps the tmpfs and its cgroup-charged pages alive. "Full" means
//! fewer than one free block, "inodes exhausted" no free inode, both as
//! they are when the container ended: a task that fills its scratch and then
//! deletes the file, or fills an unlinked file, is not named. Descriptor
//! exhaustion (EMFILE at `RLIMIT_NOFILE`, 1024 soft / 4096 hard by default)
//! is per process and leaves no trace outside it, so it is not named.
//!
//! Long-running containers ([`Engine::start_long_running`], see the
//! `long_running` module) are started under a per-container shim so that
//! they outlive the process that started them, and are found again with
//! [`Engine::adopt`]; [`Engine::create_exec`] prepares a process that joins
//! a running one's namespaces and a cgroup of its own inside its cgroup,
//! and is then started, waited for and finished like any container.

mod bundle;
mod capabilities;
#[cfg_attr(test, allow(unsafe_code))]
mod cgroup;
#[allow(unsafe_code)]
mod child;
mod disk_layer;
mod long_running;
mod output;
#[cfg_attr(test, allow(unsafe_code))]
mod seccomp;
mod spec;
#[allow(unsafe_code)]
mod sys;
#[allow(unsafe_code)]
mod userns;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

pub use bundle::{load_bundle, BundleError};
pub use capabilities::{Capability, CapabilitySet, DEFAULT_CAPABILITIES};
pub use cgroup::CgroupVersion;
pub use child::SetupStep;
pub use disk_layer::{loop_devices_backed_under, DiskLayerError};
pub use long_running::{Adoption, LongRunning, LongRunningConfig, ProcessIdentity, RunEnd, RunIdentity};
pub use output::{OutputFollower, StreamProgress};
pub use spec::{
    default_rlimits, parse_cpus, parse_duration, parse_size, scratch_inodes, validate_env_name, validate_id,
    ContainerSpec, Limits, MachineSize, NetworkMode, Rlimit, RootSpec, Scratch, SpecError, User, MAX_PIDS,
    MAX_TIMEOUT, MIN_MEMORY_BYTES, MIN_SCRATCH_INODES, SCRATCH_BYTES_PER_INODE, SHM_INODES,
};
pub use sys::{set_parent_death_signal, take_inherited_fd};
pub use userns::{shift_tree, unshift_tree, IdRange, IdRangeError};

use cgroup::{AttachHandle, CgroupController, CgroupError, CgroupLimits, CgroupRoot, ContainerCgroup};
use child::{ChildDescriptors, ChildPlan, RootPaths, FILESYSTEMS_MESSAGE_SIZE, FILESYSTEMS_TAG, REPORT_SIZE};
use output::Capture;
use seccomp::SeccompError;

/// Failures of the engine, one variant per step. [`EngineError::kind`] gives
/// a stable name for the wire.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The spec failed validation.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The bundle could not be read.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A container with this id exists already.
    #[error("a container with id {0:?} already exists")]
    AlreadyExists(String),
    /// The state directory could not be made or used.
    #[error("container state directory {path}")]
    StateDirectory {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Control group trouble.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The seccomp filter could not be built.
    #[error("building the seccomp filter")]
    Seccomp(#[source] SeccompError),
    /// Reading a kernel fact at start-up.
    #[error("reading {path}")]
    KernelInfo {
        /// The file.
        path: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Creating a pipe.
    #[error("creating a pipe")]
    Pipe(#[source] Errno),
    /// clone or clone3 failed.
    #[error("creating the container process (clone)")]
    Clone(#[source] Errno),
    /// A setup step in the container's process failed.
    #[error("{}: {}", step.describe(), errno.desc())]
    Setup {
        /// The step.
        step: SetupStep,
        /// The errno it failed with.
        errno: Errno,
    },
    /// The setup process vanished without a report.
    #[error("the container's setup process died before exec ({0})")]
    SetupLost(String),
    /// Waiting for the container process.
    #[error("waiting for the container process")]
    Wait(#[source] std::io::Error),
    /// Output capture.
    #[error("capturing output")]
    Output(#[source] std::io::Error),
    /// Signalling the container.
    #[error("signalling the container")]
    Kill(#[source] Errno),
    /// More layers than one overlay mount can name.
    #[error("{0} layers are more than one overlay mount can stack here (its options must fit in a page)")]
    TooManyLayers(usize),
    /// The call does not fit the container's state.
    #[error("container is {0}")]
    State(&'static str),
    /// User-namespace mode cannot work on this host.
    #[error("user-namespace mode ({range}): {reason}")]
    UserNamespace {
        /// The configured range.
        range: IdRange,
        /// What failed.
        reason: String,
    },
    /// A disk layer could not be made or attached.
    #[error(transparent)]
    DiskLayer(#[from] DiskLayerError),
    /// The container's user or group is outside the user namespace's range.
    #[error("id {id} is not mapped in the user namespace (range {range} maps container ids 0 to {})", range.count - 1)]
    UnmappedId {
        /// The uid or gid.
        id: u32,
        /// The configured range.
        range: IdRange,
    },
}

impl EngineError {
    /// A stable, machine-readable name of the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::Spec(_) | EngineError::Bundle(_) | EngineError::UnmappedId { .. } => "invalid_spec",
            EngineError::AlreadyExists(_) => "already_exists",
            EngineError::Setup { step: SetupStep::CommandNotFound, .. } => "command_not_found",
            EngineError::Setup { step: SetupStep::CommandNotExecutable, .. } => "command_not_executable",
            EngineError::Setup { step: SetupStep::WorkdirOnProc, .. } => "invalid_spec",
            EngineError::Setup { step: SetupStep::MountTarget, .. } => "invalid_rootfs",
            EngineError::Setup { .. } | EngineError::SetupLost(_) => "setup",
            EngineError::Cgroup(_) => "cgroup",
            EngineError::DiskLayer(DiskLayerError::NoSpace { .. }) => "no_space",
            _ => "runtime",
        }
    }
}

/// Where the engine keeps its state and cgroups.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Per-container state directories live under here.
    pub state_dir: PathBuf,
    /// Relative cgroup path under which every container's cgroup is made.
    pub cgroup_parent: String,
    /// What to do with a limit whose cgroup controller this host lacks.
    pub unavailable_limits: UnavailableLimits,
    /// User-namespace mode: container ids `0..count` are host ids
    /// `host_start..` (see the `userns` module). `None`: containers share
    /// the host's user namespace (their root is host root, confined by
    /// capabilities, seccomp and namespaces).
    pub user_namespace: Option<IdRange>,
}

/// Policy for limits whose cgroup controller is missing on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnavailableLimits {
    /// Refuse to create the container (the default: a limit is a promise).
    #[default]
    Refuse,
    /// Run without that limit; the engine logs the missing controllers once
    /// at start. For hosts whose cgroup tree lacks a controller.
    Skip,
}

struct Shared {
    config: EngineConfig,
    cgroups: CgroupRoot,
    seccomp: seccomp::BpfProgram,
    last_capability: u32,
    machine: MachineSize,
    /// This process's pid namespace, to return to after cloning an exec
    /// into a container's.
    own_pid_namespace: OwnedFd,
    /// The user namespace containers enter, in user-namespace mode.
    user_namespace: Option<userns::UserNamespace>,
    /// What making disk layers of their own filesystem needs; `None` where
    /// the host lacks it (disk layers are then plain directories).
    disk_layers: Option<disk_layer::DiskLayers>,
    /// This process's user namespace (device, inode): an exec into a
    /// container in another one joins it.
    own_user_namespace: (u64, u64),
}

/// The engine: cheap to clone, shareable across tasks.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Detect cgroups, compile the seccomp filter and make the state directory.
    pub fn new(config: EngineConfig) -> Result<Engine, EngineError> {
        let cgroups = CgroupRoot::detect(&config.cgroup_parent)?;
        Engine::with_cgroups(config, cgroups)
    }

    /// As [`Engine::new`], with the cgroup v2 hierarchy mounted at `mount`
    /// instead of the detected one (tests of the v2 path on a v1 host).
    pub fn with_cgroup_v2_at(config: EngineConfig, mount: &Path) -> Result<Engine, EngineError> {
        let cgroups = CgroupRoot::v2_at(mount, &config.cgroup_parent)?;
        Engine::with_cgroups(config, cgroups)
    }

    fn with_cgroups(config: EngineConfig, cgroups: CgroupRoot) -> Result<Engine, EngineError> {
        let missing: Vec<&str> = [CgroupController::Memory, CgroupController::Pids, CgroupController::Cpu]
            .into_iter()
            .filter(|controller| !cgroups.has_controller(*controller))
            .map(CgroupController::name)
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                missing = ?missing,
                policy = ?config.unavailable_limits,
                "cgroup {} tree lacks controllers; limits on them are {}",
                cgroups.version(),
                match config.unavailable_limits {
                    UnavailableLimits::Refuse => "refused",
                    UnavailableLimits::Skip => "not enforced",
                }
            );
        }
        let seccomp = seccomp::default_program().map_err(EngineError::Seccomp)?;
        let last_capability = read_last_capability()?;
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|source| EngineError::StateDirectory { path: config.state_dir.clone(), source })?;
        const OWN_PID_NAMESPACE: &str = "/proc/self/ns/pid";
        let own_pid_namespace = std::fs::File::open(OWN_PID_NAMESPACE)
            .map_err(|source| EngineError::KernelInfo { path: OWN_PID_NAMESPACE, source })?
            .into();
        let own_user_namespace = userns::namespace_of("self")
            .map_err(|source| EngineError::KernelInfo { path: "/proc/self/ns/user", source })?;
        let user_namespace = match config.user_namespace {
            Some(range) => {
                let failed = |reason: String| EngineError::UserNamespace { range, reason };
                let namespace = userns::UserNamespace::create(range)
                    .map_err(|error| failed(format!("creating the user namespace: {error}")))?;
                userns::probe_idmapped_mount(&namespace, &config.state_dir).map_err(|errno| {
                    failed(format!(
                        "an idmapped mount of {} failed ({}): user-namespace mode needs Linux 5.12+ and a \
                         filesystem with idmapped mounts (ext4, xfs, btrfs, tmpfs) for the data directory",
                        config.state_dir.display(),
                        errno.desc()
                    ))
                })?;
                Some(namespace)
            }
            None => None,
        };
        let disk_layers = match disk_layer::DiskLayers::probe() {
            Ok(disk_layers) => Some(disk_layers),
            Err(reason) => {
                tracing::warn!(
                    %reason,
                    "disk layers (long-running containers, --scratch disk) are plain directories, not size-limited"
                );
                None
            }
        };
        Ok(Engine {
            shared: Arc::new(Shared {
                config,
                cgroups,
                seccomp,
                last_capability,
                machine: MachineSize::detect(),
                own_pid_namespace,
                user_namespace,
                own_user_namespace,
                disk_layers,
            }),
        })
    }

    /// The cgroup version in use.
    pub fn cgroup_version(&self) -> CgroupVersion {
        self.shared.cgroups.version()
    }

    /// The user namespace's range, in user-namespace mode.
    pub fn user_namespace(&self) -> Option<IdRange> {
        self.shared.user_namespace.as_ref().map(userns::UserNamespace::range)
    }

    /// Refuses a spec whose user or groups the user namespace does not map.
    fn check_mapped(&self, spec: &ContainerSpec) -> Result<(), EngineError> {
        if let Some(range) = self.user_namespace() {
            let ids =
                [spec.user.uid, spec.user.gid].into_iter().chain(spec.user.additional_gids.iter().copied());
            if let Some(id) = ids.into_iter().find(|id| !range.maps(*id)) {
                return Err(EngineError::UnmappedId { id, range });
            }
        }
        Ok(())
    }

    /// Where `spec`'s writes go on disk, if they do: a filesystem of its own
    /// where the host can make one, else a plain directory.
    fn disk_layout(&self, spec: &ContainerSpec) -> Option<DiskLayout> {
        match spec.root.scratch {
            _ if spec.root.read_only => None,
            Scratch::Memory => None,
            Scratch::Disk if self.shared.disk_layers.is_some() => Some(DiskLayout::OwnFilesystem),
            Scratch::Disk | Scratch::Directory => Some(DiskLayout::Directory),
        }
    }

    /// Makes what a disk layer needs in container directory `dir` (which
    /// exists) unless it is there already (a long-running container's
    /// later runs): the root's mount point, and the image (its own
    /// filesystem) or the upper and work directories.
    fn make_disk_layer(&self, dir: &Path, layout: DiskLayout, limits: &Limits) -> Result<(), EngineError> {
        let subdirs: &[&str] = match layout {
            DiskLayout::OwnFilesystem => &["rootfs", disk_layer::MOUNT_POINT],
            DiskLayout::Directory => &["rootfs", "upper", "work"],
        };
        for sub in subdirs {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| EngineError::StateDirectory { path, source })?;
        }
        match (layout, &self.shared.disk_layers) {
            (DiskLayout::OwnFilesystem, Some(disk_layers)) => {
                let image = dir.join(disk_layer::IMAGE);
                if !image.exists() {
                    disk_layers.make(&image, limits.scratch_bytes)?;
                }
                Ok(())
            }
            _ => self.own_upper(&dir.join("upper")),
        }
    }

    /// Mounts the disk layer of container directory `dir` (detached), for
    /// its setup process to move into place.
    fn mount_disk_layer(&self, dir: &Path) -> Result<OwnedFd, EngineError> {
        let owner = self.user_namespace().map(|range| (range.host_id(0), range.host_id(0)));
        Ok(disk_layer::mount(&dir.join(disk_layer::IMAGE), owner)?)
    }

    /// Gives a fresh on-disk upper directory (owned by host root) to the
    /// container's root, in user-namespace mode: the upper directory's
    /// owner is the owner of the container's `/`.
    fn own_upper(&self, upper: &Path) -> Result<(), EngineError> {
        use std::os::unix::fs::MetadataExt;
        let Some(range) = self.user_namespace() else { return Ok(()) };
        let fresh = std::fs::metadata(upper)
            .map(|metadata| metadata.uid() == 0)
            .map_err(|source| EngineError::StateDirectory { path: upper.to_path_buf(), source })?;
        if fresh {
            std::os::unix::fs::chown(upper, Some(range.host_id(0)), Some(range.host_id(0)))
                .map_err(|source| EngineError::StateDirectory { path: upper.to_path_buf(), source })?;
        }
        Ok(())
    }

    /// The plan's user-namespace part for `spec` (a container with a root
    /// of its own).
    fn userns_plan(&self, spec: &ContainerSpec) -> Option<child::UsernsPlan> {
        self.shared
            .user_namespace
            .as_ref()
            .map(|namespace| child::UsernsPlan::new(Some(namespace.fd()), namespace.range(), spec))
    }

    /// This machine's size, against which limits are judged.
    pub fn machine(&self) -> MachineSize {
        self.shared.machine
    }

    /// Validate `spec`, then make the container's cgroup (and, for disk
    /// scratch, its state directory). On error nothing is left behind.
    pub fn create(&self, spec: ContainerSpec) -> Result<Container, EngineError> {
        let name = spec.id.clone();
        self.create_in(spec, &name, None)
    }

    /// Prepare an exec into the running long-running container `target`:
    /// `spec` (whose id names the exec, unique within the container) gives
    /// the command, identity, limits and timeout; its root is ignored, the
    /// process joins the target's namespaces. Its cgroup is a sub-cgroup of
    /// the target's, so the exec counts against the container's limits as
    /// well as its own. [`Container::start`], `wait` and `finish` then work
    /// as for any container; `finish` removes only the exec's cgroup.
    pub fn create_exec(&self, target: &LongRunning, spec: ContainerSpec) -> Result<Container, EngineError> {
        let pidfd = target.init_pidfd().ok_or(EngineError::State("not running"))?;
        let join = pidfd.try_clone_to_owned().map_err(EngineError::Wait)?;
        // The container's own user namespace, whatever this engine's mode
        // is now: it may have been started before a restart changed it.
        let pid = target.identity().init.pid;
        let theirs = userns::namespace_of(&pid.to_string()).map_err(EngineError::Wait)?;
        let name = format!("{}/{}", target.id(), spec.id);
        let mut container = self.create_in(spec, &name, Some(join))?;
        container.join_user_namespace = theirs != self.shared.own_user_namespace;
        Ok(container)
    }

    fn create_in(
        &self,
        mut spec: ContainerSpec,
        cgroup_name: &str,
        join: Option<OwnedFd>,
    ) -> Result<Container, EngineError> {
        let created_at = Instant::now();
        if join.is_some() {
            // An exec has no root of its own and never writes one.
            spec.root.read_only = true;
            spec.root.scratch = Scratch::Memory;
        }
        spec.validate(&self.shared.machine)?;
        self.check_mapped(&spec)?;
        let state_dir = &self.shared.config.state_dir;
        let disk_layout = self.disk_layout(&spec);
        let disk_dir = disk_layout.map(|_| state_dir.join(&spec.id));
        let disk = disk_dir.as_deref().zip(disk_layout);
        let (options, _) = child::overlay_options(&spec, &root_paths(state_dir, disk, &spec));
        if options.len() > child::MAX_OVERLAY_OPTIONS {
            return Err(EngineError::TooManyLayers(spec.root.layers.len()));
        }
        let cgroups = &self.shared.cgroups;
        let enforce = |controller| {
            self.shared.config.unavailable_limits == UnavailableLimits::Refuse
                || cgroups.has_controller(controller)
        };
        let limits = CgroupLimits {
            memory_bytes: Some(spec.limits.memory_bytes).filter(|_| enforce(CgroupController::Memory)),
            cpu_millis: spec.limits.cpu_millis.filter(|_| enforce(CgroupController::Cpu)),
            pids: Some(spec.limits.pids).filter(|_| enforce(CgroupController::Pids)),
        };
        // The cgroup name is the container id, so its creation is what makes
        // ids unique on this host.
        let cgroup = match cgroups.create(cgroup_name, &limits) {
            Ok(cgroup) => cgroup,
            Err(CgroupError::AlreadyExists { .. }) => {
                return Err(EngineError::AlreadyExists(spec.id.clone()))
            }
            Err(error) => return Err(error.into()),
        };
        if let Some((dir, layout)) = disk {
            let made = std::fs::create_dir(dir)
                .map_err(|source| EngineError::StateDirectory { path: dir.to_path_buf(), source })
                .and_then(|()| self.make_disk_layer(dir, layout, &spec.limits));
            if let Err(error) = made {
                let _ = std::fs::remove_dir_all(dir);
                let _ = cgroup.delete();
                return Err(error);
            }
        }
        Ok(Container {
            engine: self.clone(),
            spec,
            disk_dir,
            disk_layout,
            cgroup: Some(cgroup),
            join,
            join_user_namespace: false,
            filesystems: ContainerFilesystems::default(),
            process: None,
            stdout: None,
            stderr: None,
            stdin_task: None,
            exit: None,
            timed_out: false,
            created_at,
            started_at: None,
            exec_at: None,
            exited_at: None,
        })
    }

    /// Removes whatever is left of container `id` after a crash of the
    /// process that ran it: every process in its cgroup is killed (which
    /// also ends its namespaces and the mounts that live in them), then the
    /// cgroup and its on-disk state directory are deleted. Returns whether
    /// anything was found. Idempotent.
    pub fn reap(&self, id: &str) -> Result<bool, EngineError> {
        validate_id(id)?;
        let mut found = false;
        if let Some(cgroup) = self.shared.cgroups.open_existing(id) {
            found = true;
            cgroup.kill_all()?;
            cgroup.delete()?;
        }
        let dir = self.shared.config.state_dir.join(id);
        // A long-running container's shim outlives its first process by a
        // moment: it records the exit (a file created, then renamed) in this
        // directory, so a removal racing it can find a new entry
        // (ENOTEMPTY). Retry for a bounded time; the shim exits right after.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => return Ok(true),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(found),
                Err(error)
                    if error.kind() == std::io::ErrorKind::DirectoryNotEmpty
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(source) => return Err(EngineError::StateDirectory { path: dir, source }),
            }
        }
    }

    /// Ids of containers that exist on this host (a cgroup under the
    /// engine's parent, or a state directory) and start with `prefix`:
    /// after a crash, what [`Engine::reap`] should look at.
    pub fn existing(&self, prefix: &str) -> Vec<String> {
        let mut ids: Vec<String> =
            self.shared.cgroups.list().into_iter().filter(|id| id.starts_with(prefix)).collect();
        if let Ok(entries) = std::fs::read_dir(&self.shared.config.state_dir) {
            for entry in entries.flatten() {
                if let Ok(name) = entry.file_name().into_string() {
                    if name.starts_with(prefix) && validate_id(&name).is_ok() {
                        ids.push(name);
                    }
                }
            }
        }
        ids.sort();
        ids.dedup();
        ids
    }

    /// Create, start, wait and finish in one call.
    pub async fn run(&self, spec: ContainerSpec) -> Result<Outcome, EngineError> {
        let mut container = self.create(spec)?;
        if let Err(error) = container.start().await {
            let _ = container.finish().await;
            return Err(error);
        }
        container.wait().await?;
        container.finish().await
    }
}

fn read_last_capability() -> Result<u32, EngineError> {
    const PATH: &str = "/proc/sys/kernel/cap_last_cap";
    let text =
        std::fs::read_to_string(PATH).map_err(|source| EngineError::KernelInfo { path: PATH, source })?;
    text.trim().parse().map_err(|_| EngineError::KernelInfo {
        path: PATH,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, text.trim().to_owned()),
    })
}

struct Process {
    pid: libc::pid_t,
    pidfd: AsyncFd<OwnedFd>,
}

/// How the container's first process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// Exited with a code.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

/// A created container. Call [`Container::finish`] to tear it down; dropping
/// it instead kills its processes but leaves its state directory and cgroup
/// for the next start-up's cleanup.
pub struct Container {
    engine: Engine,
    spec: ContainerSpec,
    /// The on-disk state directory, for disk scratch only.
    disk_dir: Option<PathBuf>,
    /// How its disk layer is kept, for disk scratch only.
    disk_layout: Option<DiskLayout>,
    cgroup: Option<ContainerCgroup>,
    /// For an exec: the pidfd of the running container's first process.
    join: Option<OwnedFd>,
    /// For an exec: whether that process is in a user namespace of its own.
    join_user_namespace: bool,
    /// Its scratch tmpfs and /dev/shm, as handed over by its setup process.
    filesystems: ContainerFilesystems,
    process: Option<Process>,
    stdout: Option<Capture>,
    stderr: Option<Capture>,
    stdin_task: Option<tokio::task::JoinHandle<()>>,
    exit: Option<ExitStatus>,
    timed_out: bool,
    created_at: Instant,
    started_at: Option<Instant>,
    /// When the command's exec was confirmed (end of file on the setup channel).
    exec_at: Option<Instant>,
    exited_at: Option<Instant>,
}

/// Where a container's root is assembled: for disk scratch, directories under
/// its own state directory; otherwise the engine's state directory, which each
/// container covers with its own tmpfs (or its read-only root) inside its own
/// private mount namespace.
fn root_paths(state_dir: &Path, disk: Option<(&Path, DiskLayout)>, spec: &ContainerSpec) -> RootPaths {
    match disk {
        Some((dir, DiskLayout::OwnFilesystem)) => {
            let layer = dir.join(disk_layer::MOUNT_POINT);
            RootPaths {
                target: dir.join("rootfs"),
                upper: layer.join("upper"),
                work: layer.join("work"),
                memory_scratch: None,
                disk_scratch: Some(layer),
            }
        }
        Some((dir, DiskLayout::Directory)) => RootPaths {
            target: dir.join("rootfs"),
            upper: dir.join("upper"),
            work: dir.join("work"),
            memory_scratch: None,
            disk_scratch: None,
        },
        None if spec.root.read_only => RootPaths {
            target: state_dir.to_path_buf(),
            upper: PathBuf::new(),
            work: PathBuf::new(),
            memory_scratch: None,
            disk_scratch: None,
        },
        None => RootPaths {
            target: state_dir.join("root"),
            upper: state_dir.join("upper"),
            work: state_dir.join("work"),
            memory_scratch: Some((
                state_dir.to_path_buf(),
                spec.limits.scratch_bytes.min(spec.limits.memory_bytes),
            )),
            disk_scratch: None,
        },
    }
}

/// How a disk layer is kept (see the `disk_layer` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskLayout {
    /// An ext4 image of the scratch size, mounted in the container only.
    OwnFilesystem,
    /// Plain `upper` and `work` directories, not size-limited.
    Directory,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), EngineError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(EngineError::Pipe)
}

impl Container {
    /// The container's id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// The spec it was created from.
    pub fn spec(&self) -> &ContainerSpec {
        &self.spec
    }

    /// The host pid of its first process, once started.
    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref().map(|p| p.pid)
    }

    /// Start the container: returns once the command has been exec'd, or with
    /// the failed setup step.
    pub async fn start(&mut self) -> Result<(), EngineError> {
        if self.process.is_some() {
            return Err(EngineError::State("already started"));
        }
        let cgroup = self.cgroup.as_ref().ok_or(EngineError::State("finished"))?;
        let (stdin_read, stdin_write) = pipe()?;
        let (stdout_read, stdout_write) = pipe()?;
        let (stderr_read, stderr_write) = pipe()?;
        let (report_read, report_write) = setup_channel()?;
        let (tasks, cgroup_dir) = if self.join.is_some() {
            (cgroup.attach_files()?, None)
        } else {
            match cgroup.attach_handle()? {
                AttachHandle::V1 { tasks } => (tasks, None),
                AttachHandle::V2 { dir } => (Vec::new(), Some(dir)),
            }
        };
        let state_dir = &self.engine.shared.config.state_dir;
        let paths = root_paths(state_dir, self.disk_dir.as_deref().zip(self.disk_layout), &self.spec);
        let disk_mount = match (&self.disk_dir, self.disk_layout) {
            (Some(dir), Some(DiskLayout::OwnFilesystem)) => Some(self.engine.mount_disk_layer(dir)?),
            _ => None,
        };
        let mut namespaces = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if self.spec.network == NetworkMode::None {
            namespaces |= libc::CLONE_NEWNET;
        }
        let start = Instant::now();
        // The plan holds raw pointers (argv, the seccomp program): it lives
        // in this block only, so the future stays Send.
        let spawned = {
            let mut plan = ChildPlan::prepare(
                &self.spec,
                &paths,
                ChildDescriptors {
                    stdin: stdin_read.as_raw_fd(),
                    stdout: stdout_write.as_raw_fd(),
                    stderr: stderr_write.as_raw_fd(),
                    report: report_write.as_raw_fd(),
                    cgroup_tasks: tasks.iter().map(|fd| fd.as_raw_fd()).collect(),
                },
                seccomp::sock_fprog(&self.engine.shared.seccomp).map_err(EngineError::Seccomp)?,
                self.engine.shared.last_capability,
            );
            plan.report_filesystems = self.join.is_none();
            if let Some(mount) = &disk_mount {
                plan.set_disk_mount(mount.as_raw_fd());
            }
            plan.user_namespace = match (&self.join, self.join_user_namespace) {
                (None, _) => self.engine.userns_plan(&self.spec),
                // The owner of a created working directory: this engine's
                // container root, or host root when its mode changed since.
                (Some(_), true) => Some(child::UsernsPlan {
                    fd: None,
                    root_uid: self.engine.user_namespace().map_or(0, |range| range.host_id(0)),
                    root_gid: self.engine.user_namespace().map_or(0, |range| range.host_id(0)),
                    layers: Vec::new(),
                }),
                (Some(_), false) => None,
            };
            match &self.join {
                Some(target) => {
                    plan.root = child::RootPlan::Join { pidfd: target.as_raw_fd() };
                    child::spawn_joined(
                        &plan,
                        target.as_raw_fd(),
                        self.engine.shared.own_pid_namespace.as_raw_fd(),
                    )
                }
                None => {
                    child::spawn(&plan, namespaces as u64, cgroup_dir.as_ref().map(|dir| dir.as_raw_fd()))
                }
            }
        }
        .map_err(EngineError::Clone)?;
        drop((stdin_read, stdout_write, stderr_write, report_write, tasks, cgroup_dir));
        self.started_at = Some(start);
        self.process = Some(Process {
            pid: spawned.pid,
            pidfd: sys::register_pidfd(spawned.pidfd).map_err(EngineError::Wait)?,
        });

        let cap = self.spec.limits.output_bytes;
        // A directory layer shares the captures' filesystem and can fill it.
        let reserved = self.disk_layout == Some(DiskLayout::Directory);
        self.stdout =
            Some(Capture::start(stdout_read, state_dir, cap, reserved).map_err(EngineError::Output)?);
        self.stderr =
            Some(Capture::start(stderr_read, state_dir, cap, reserved).map_err(EngineError::Output)?);
        if let Some(bytes) = self.spec.stdin.clone() {
            let mut sender =
                tokio::net::unix::pipe::Sender::from_owned_fd(stdin_write).map_err(EngineError::Output)?;
            self.stdin_task = Some(tokio::spawn(async move {
                // A container that exits without reading its input is not an error.
                let _ = sender.write_all(&bytes).await;
            }));
        } else {
            drop(stdin_write);
        }

        let report = read_setup_channel(report_read).await?;
        self.filesystems = report.filesystems;
        // Kept to read how full the layer got; the filesystem lives until
        // it is closed, in `finish`.
        self.filesystems.scratch = self.filesystems.scratch.take().or(disk_mount);
        match report.failure {
            None => {
                self.exec_at = Some(Instant::now());
                Ok(())
            }
            Some(error) => {
                self.wait_exit().await?;
                Err(error)
            }
        }
    }

    /// Wait for the container's first process to exit, killing the whole
    /// container when the spec's timeout passes first.
    pub async fn wait(&mut self) -> Result<ExitStatus, EngineError> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        let (Some(started), Some(_)) = (self.started_at, self.process.as_ref()) else {
            return Err(EngineError::State("not started"));
        };
        let deadline =
            self.spec.limits.timeout.map(|timeout| tokio::time::Instant::from_std(started + timeout));
        if let Some(deadline) = deadline {
            tokio::select! {
                exit = self.wait_exit() => return exit,
                () = tokio::time::sleep_until(deadline) => {
                    self.timed_out = true;
                    self.kill_all()?;
                }
            }
        }
        self.wait_exit().await
    }

    async fn wait_exit(&mut self) -> Result<ExitStatus, EngineError> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        let process = self.process.as_ref().ok_or(EngineError::State("not started"))?;
        loop {
            let mut guard = process.pidfd.readable().await.map_err(EngineError::Wait)?;
            match sys::wait_pidfd_nohang(process.pidfd.get_ref().as_raw_fd()) {
                Ok(Some(exit)) => {
                    let status = match exit {
                        sys::ChildExit::Exited(code) => ExitStatus::Exited(code),
                        sys::ChildExit::Signaled(signal) => ExitStatus::Signaled(signal),
                    };
                    self.exit = Some(status);
                    self.exited_at = Some(Instant::now());
                    return Ok(status);
                }
                Ok(None) => guard.clear_ready(),
                Err(errno) => return Err(EngineError::Wait(std::io::Error::from(errno))),
            }
        }
    }

    /// Send `signal` to the container's first process.
    pub fn signal(&self, signal: i32) -> Result<(), EngineError> {
        let process = self.process.as_ref().ok_or(EngineError::State("not started"))?;
        match sys::pidfd_send_signal(process.pidfd.get_ref().as_raw_fd(), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(errno) => Err(EngineError::Kill(errno)),
        }
    }

    /// SIGKILL every process of the container: its pid 1 (the kernel then
    /// kills the rest of the pid namespace) and everything in its cgroup.
    pub fn kill_all(&self) -> Result<(), EngineError> {
        if self.process.is_some() && self.exit.is_none() {
            self.signal(libc::SIGKILL)?;
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_all()?;
        }
        Ok(())
    }

    /// Follow the container's stdout as it is produced.
    pub fn follow_stdout(&self) -> Option<std::io::Result<OutputFollower>> {
        self.stdout.as_ref().map(Capture::follow)
    }

    /// Follow the container's stderr as it is produced.
    pub fn follow_stderr(&self) -> Option<std::io::Result<OutputFollower>> {
        self.stderr.as_ref().map(Capture::follow)
    }

    /// Tear the container down: stop it if it still runs, collect its output,
    /// usage and OOM counters, then remove its cgroup and state directory.
    pub async fn finish(mut self) -> Result<Outcome, EngineError> {
        if self.process.is_some() && self.exit.is_none() {
            self.kill_all()?;
            self.wait_exit().await?;
        }
        let teardown_start = Instant::now();
        if let Some(task) = self.stdin_task.take() {
            task.abort();
        }
        // Before the output captures close: the space they reserved on the
        // same filesystem is freed with them.
        let disk_fill = match self.disk_layout {
            Some(DiskLayout::Directory) => self.disk_dir.as_deref().and_then(disk_layer_fill),
            _ => None,
        };
        let stdout = finish_stream(self.stdout.take()).await;
        let stderr = finish_stream(self.stderr.take()).await;
        let mut usage = Usage::default();
        // Read, then closed, before the cgroup goes: the descriptors keep the
        // tmpfs contents alive, and those pages are charged to the cgroup.
        let scratch = disk_fill.or_else(|| {
            let own_filesystem = self.disk_layout == Some(DiskLayout::OwnFilesystem);
            self.filesystems.scratch.take().and_then(|fd| match own_filesystem {
                true => ext4_fill(&fd),
                false => filesystem_fill(&fd),
            })
        });
        let shm = self.filesystems.shm.take().and_then(|fd| filesystem_fill(&fd));
        usage.scratch_full = scratch.is_some_and(|fill| fill.full);
        usage.shm_full = shm.is_some_and(|fill| fill.full);
        usage.inodes_exhausted = [scratch, shm].into_iter().flatten().any(|fill| fill.inodes_exhausted);
        let mut oom_killed = false;
        let mut pids_limit_hit = false;
        if let Some(cgroup) = self.cgroup.take() {
            let counters = cgroup.usage();
            usage.cpu_ns = counters.cpu_ns;
            usage.peak_memory_bytes = counters.peak_memory_bytes;
            usage.cpu_throttled_periods = counters.cpu_throttled_periods;
            usage.cpu_throttled_ns = counters.cpu_throttled_ns;
            oom_killed = counters.oom_kills.unwrap_or(0) > 0;
            pids_limit_hit = counters.pids_limit_hit.unwrap_or(0) > 0;
            cgroup.delete()?;
        }
        if let Some(dir) = self.disk_dir.take() {
            std::fs::remove_dir_all(&dir)
                .map_err(|source| EngineError::StateDirectory { path: dir, source })?;
        }
        let finished = Instant::now();
        let exited = self.exited_at.unwrap_or(teardown_start);
        let exec = self.exec_at.unwrap_or(exited);
        let (exit_code, signal) = match self.exit {
            Some(ExitStatus::Exited(code)) => (Some(code), None),
            Some(ExitStatus::Signaled(signal)) => (None, Some(signal)),
            None => (None, None),
        };
        Ok(Outcome {
            container_id: self.spec.id.clone(),
            exit_code,
            signal,
            oom_killed,
            timed_out: self.timed_out,
            pids_limit_hit,
            timings: Timings {
                setup_ms: millis(exec.saturating_duration_since(self.created_at)),
                run_ms: millis(exited.saturating_duration_since(exec)),
                teardown_ms: millis(finished.saturating_duration_since(exited)),
                total_ms: millis(finished.saturating_duration_since(self.created_at)),
            },
            usage,
            stdout: stdout?,
            stderr: stderr?,
        })
    }
}

/// Reads the report pipe of a setup process until end of file: `None` when
/// the command was exec'd (the pipe closed on exec without a word), else the
/// failed step.
async fn read_setup_report(report_read: OwnedFd) -> Result<Option<EngineError>, EngineError> {
    let mut report =
        tokio::net::unix::pipe::Receiver::from_owned_fd(report_read).map_err(EngineError::Wait)?;
    let mut buffer = [0u8; REPORT_SIZE];
    let mut filled = 0;
    while filled < REPORT_SIZE {
        let read = report.read(&mut buffer[filled..]).await.map_err(EngineError::Wait)?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    Ok(match filled {
        0 => None,
        REPORT_SIZE => {
            let code = u32::from_ne_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]);
            let errno = i32::from_ne_bytes([buffer[4], buffer[5], buffer[6], buffer[7]]);
            Some(match SetupStep::from_code(code) {
                Some(step) => EngineError::Setup { step, errno: Errno::from_raw(errno) },
                None => EngineError::SetupLost(format!("unknown step {code}")),
            })
        }
        partial => Some(EngineError::SetupLost(format!("short report of {partial} bytes"))),
    })
}

/// A connected `SOCK_SEQPACKET` pair for a setup process's reports (the
/// runtime's end first): message boundaries keep a failure report and the
/// filesystems message apart, and only a Unix socket carries descriptors.
fn setup_channel() -> Result<(OwnedFd, OwnedFd), EngineError> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(EngineError::Pipe)
}

/// What a container's setup process said before its exec.
#[derive(Default)]
struct SetupReport {
    /// The failed step, if one failed.
    failure: Option<EngineError>,
    /// Its in-memory filesystems, when it sent them.
    filesystems: ContainerFilesystems,
}

/// Reads a setup channel ([`setup_channel`]) until end of file, which comes
/// when the setup process's end closes on exec (or it exits): the
/// filesystems message, if any, then a failure report, if any. Nothing the
/// command does after exec can reach this channel.
async fn read_setup_channel(channel: OwnedFd) -> Result<SetupReport, EngineError> {
    let channel = sys::register_socket(channel).map_err(EngineError::Wait)?;
    let mut report = SetupReport::default();
    loop {
        let mut guard = channel.readable().await.map_err(EngineError::Wait)?;
        // One byte more than any valid message, so an oversized one shows.
        let mut buffer = [0u8; REPORT_SIZE + 1];
        let message = match sys::receive_with_descriptors(channel.get_ref().as_raw_fd(), &mut buffer) {
            Ok(message) => message,
            Err(Errno::EAGAIN) => {
                guard.clear_ready();
                continue;
            }
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(EngineError::Wait(errno.into())),
        };
        let data = &buffer[..message.length.min(buffer.len())];
        if message.truncated {
            return Err(EngineError::SetupLost(format!("oversized report of {} bytes", message.length)));
        }
        match (data.len(), message.descriptors.len()) {
            (0, 0) => return Ok(report),
            (REPORT_SIZE, 0) => {
                let code = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
                let errno = i32::from_ne_bytes([data[4], data[5], data[6], data[7]]);
                report.failure = Some(match SetupStep::from_code(code) {
                    Some(step) => EngineError::Setup { step, errno: Errno::from_raw(errno) },
                    None => EngineError::SetupLost(format!("unknown step {code}")),
                });
                return Ok(report);
            }
            (FILESYSTEMS_MESSAGE_SIZE, count)
                if data[..2] == FILESYSTEMS_TAG
                    && data[2] <= 1
                    && data[3] <= 1
                    && usize::from(data[2] + data[3]) == count =>
            {
                let mut descriptors = message.descriptors.into_iter();
                report.filesystems = ContainerFilesystems {
                    scratch: if data[2] == 1 { descriptors.next() } else { None },
                    shm: if data[3] == 1 { descriptors.next() } else { None },
                };
            }
            (length, count) => {
                return Err(EngineError::SetupLost(format!(
                    "unexpected report of {length} bytes and {count} descriptors"
                )))
            }
        }
    }
}

/// A container's in-memory filesystems: `O_PATH` descriptors of the roots of
/// its scratch tmpfs and its /dev/shm, opened by its setup process right
/// after mounting them and passed over the setup channel before exec. They
/// are only ever given to fstatfs, never used to resolve a path: the files
/// under them are the container's, and hostile.
#[derive(Default)]
struct ContainerFilesystems {
    scratch: Option<OwnedFd>,
    shm: Option<OwnedFd>,
}

/// How full one of those filesystems was.
#[derive(Debug, Clone, Copy)]
struct Fill {
    /// Less than a block (a page, on tmpfs) left: a write got ENOSPC.
    full: bool,
    /// Not one inode left: creating a file got ENOSPC.
    inodes_exhausted: bool,
}

/// fstatfs of a tmpfs root descriptor; `None` if the kernel refuses (then
/// nothing is claimed).
fn filesystem_fill(root: &OwnedFd) -> Option<Fill> {
    let status = nix::sys::statfs::fstatfs(root).ok()?;
    let block = status.block_size() as u64;
    Some(Fill {
        full: (status.blocks_free() as u64).saturating_mul(block) < block.max(1),
        inodes_exhausted: status.files() as u64 > 0 && status.files_free() as u64 == 0,
    })
}

/// How full the filesystem holding a plain-directory disk layer
/// (container directory `dir`) was; its upper directory is made by the
/// runtime and opened without following links, and only given to fstatfs.
fn disk_layer_fill(dir: &Path) -> Option<Fill> {
    use std::os::unix::fs::OpenOptionsExt;
    let upper = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join("upper"))
        .ok()?;
    ext4_fill(&OwnedFd::from(upper))
}

/// fstatfs of a disk filesystem. Unlike tmpfs, ext4 refuses writes while
/// statfs still shows some space available (it keeps up to 4096 clusters,
/// or 2% of a small filesystem, for itself), so it counts as full with less
/// than 1/20 of it, at most 16 MiB, available to ordinary processes.
fn ext4_fill(root: &OwnedFd) -> Option<Fill> {
    let status = nix::sys::statfs::fstatfs(root).ok()?;
    let block = status.block_size() as u64;
    let total = (status.blocks() as u64).saturating_mul(block);
    let margin = (total / 20).clamp(block.max(1), 16 << 20);
    Some(Fill {
        full: (status.blocks_available() as u64).saturating_mul(block) < margin,
        inodes_exhausted: status.files() as u64 > 0 && status.files_free() as u64 == 0,
    })
}

async fn finish_stream(capture: Option<Capture>) -> Result<StreamOutcome, EngineError> {
    let Some(mut capture) = capture else {
        return Ok(StreamOutcome::default());
    };
    // Every writer is dead once pid 1 is; the bound only guards against a
    // descriptor briefly held by a sibling container's setup process.
    let progress = match tokio::time::timeout(Duration::from_secs(5), capture.finish()).await {
        Ok(result) => result.map_err(EngineError::Output)?,
        Err(_) => {
            capture.abort();
            return Err(EngineError::Output(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "output pipe still open 5 s after the container exited",
            )));
        }
    };
    let data = capture.read_captured(progress.captured).map_err(EngineError::Output)?;
    Ok(StreamOutcome { bytes: progress.produced, truncated: progress.truncated(), data })
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

impl Drop for Container {
    fn drop(&mut self) {
        // finish() consumed the cgroup; anything still here means the caller
        // gave up on the container, which must not keep running unaccounted.
        if self.cgroup.is_some() && self.exit.is_none() {
            let _ = self.kill_all();
        }
    }
}

/// Wall-clock timings in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// From create to the command's exec.
    pub setup_ms: f64,
    /// From exec to the exit of pid 1.
    pub run_ms: f64,
    /// From exit to everything removed.
    pub teardown_ms: f64,
    /// All of it.
    pub total_ms: f64,
}

/// Resource usage, read from the cgroup and the container's in-memory
/// filesystems after it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// CPU time of all processes, nanoseconds.
    pub cpu_ns: Option<u64>,
    /// Peak memory, bytes.
    pub peak_memory_bytes: Option<u64>,
    /// CPU quota periods in which the container was throttled (`nr_throttled`
    /// of the cgroup's `cpu.stat`); 0 without a quota.
    pub cpu_throttled_periods: Option<u64>,
    /// Time it spent throttled by the CPU quota, nanoseconds.
    pub cpu_throttled_ns: Option<u64>,
    /// The writable layer had no block left when the container ended (a
    /// write got ENOSPC): the in-memory scratch, or for disk scratch the
    /// filesystem holding it. Always false for read-only roots.
    pub scratch_full: bool,
    /// /dev/shm had no block left when the container ended.
    pub shm_full: bool,
    /// The scratch layer or /dev/shm had no inode left when the container
    /// ended (creating a file got ENOSPC).
    pub inodes_exhausted: bool,
}

/// One captured stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StreamOutcome {
    /// Bytes the container wrote in all.
    pub bytes: u64,
    /// More was written than the cap kept.
    pub truncated: bool,
    /// The kept bytes (at most the output cap).
    #[serde(skip)]
    pub data: Vec<u8>,
}

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// The container's id.
    pub container_id: String,
    /// Exit code of pid 1, when it exited.
    pub exit_code: Option<i32>,
    /// Signal that killed pid 1, when one did.
    pub signal: Option<i32>,
    /// The kernel's OOM killer killed a process of the container.
    pub oom_killed: bool,
    /// The wall-clock timeout passed and the container was killed.
    pub timed_out: bool,
    /// A fork failed on the pids limit.
    pub pids_limit_hit: bool,
    /// Timings.
    pub timings: Timings,
    /// Resource usage.
    pub usage: Usage,
    /// Standard output.
    pub stdout: StreamOutcome,
    /// Standard error.
    pub stderr: StreamOutcome,
}

/// The outcome as one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Exit code 0.
    Succeeded,
    /// Non-zero exit or a signal.
    Failed,
    /// Killed on the wall-clock timeout.
    TimedOut,
    /// Killed by the OOM killer.
    OomKilled,
}

impl Outcome {
    /// Timeout first (the kill it causes is ours), then OOM, then the exit.
    pub fn status(&self) -> Status {
        if self.timed_out {
            Status::TimedOut
        } else if self.oom_killed {
            Status::OomKilled
        } else if self.exit_code == Some(0) {
            Status::Succeeded
        } else {
            Status::Failed
        }
    }
}
