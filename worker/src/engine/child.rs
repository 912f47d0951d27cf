//! The container's setup process: everything between clone and exec.
//!
//! [`ChildPlan::prepare`] runs in the runtime (allocating freely) and turns a
//! spec into C strings, descriptor numbers and pointer arrays. [`run`] runs in
//! the child that [`spawn`] cloned, which in a multi-threaded runtime may
//! only make async-signal-safe calls: it allocates nothing, takes no lock and
//! logs nothing (STYLE.md rule 4). On cgroup v1 that child even shares the
//! runtime's memory (vfork style, on a stack of its own) until it execs: the
//! only memory of the parent it writes besides that stack is the calling
//! thread's errno, and that thread is suspended until the exec. It is a strictly ordered script; each step that
//! can fail has a [`SetupStep`], and a failure is reported to the parent over
//! a close-on-exec setup channel as `(step, errno)` before the child exits.
//! End of file on that channel means the exec succeeded. The channel is a
//! `SOCK_SEQPACKET` socket for a container (which also carries its
//! filesystems' descriptors) and a pipe for a long-running container's launch.
//!
//! Order and why:
//! 1. stdio onto 0-2, then every other descriptor closed but the setup
//!    channel, the cgroup `tasks` files, an exec's pidfd and a disk layer's
//!    mount (the runtime's open directories must not be reachable through
//!    `/dev/fd/N` before exec), signals reset (Rust ignores SIGPIPE; a blocked mask would
//!    survive exec), non-dumpable;
//! 2. cgroup v1: the child writes "0" to each hierarchy's `tasks` file
//!    itself. Moving oneself by thread avoids the global threadgroup
//!    rwsem (kernel/cgroup/cgroup.c, `cgroup_procs_write_start`), whose
//!    write side waits for an RCU grace period on an idle machine (~11 ms
//!    here). On v2 clone3's CLONE_INTO_CGROUP did it already. Then a new
//!    cgroup namespace rooted at the container's cgroup;
//! 3. mounts: propagation private; the root (overlay of the layers plus a
//!    private upper, on a tmpfs that exists only in this mount namespace, on
//!    a disk layer's ext4, which the runtime mounted detached and this
//!    process moves into place (and closes), or in a directory on disk; or a
//!    read-only bind); then /proc, /dev (tmpfs with the
//!    standard nodes), /dev/pts, /dev/shm, /dev/mqueue, /sys (read-only).
//!    The scratch tmpfs and /dev/shm get a size and an inode bound
//!    (`nr_inodes`); right after /dev/shm is mounted, an `O_PATH` descriptor
//!    of each tmpfs root goes to the parent over the setup channel
//!    (`SCM_RIGHTS`, see [`ChildPlan::report_filesystems`]), so that it can
//!    fstatfs them after the container ended without ever resolving a path
//!    inside it.
//!    Every target inside the root is opened with openat2(RESOLVE_IN_ROOT |
//!    RESOLVE_NO_SYMLINKS) and mounted onto that descriptor with move_mount,
//!    so an image whose /proc or /dev is a symlink gets an error, never a
//!    mount on the host (CVE-2019-16884, CVE-2019-19921 style attacks).
//!    Masked paths get a read-only empty tmpfs or /dev/null (checked to be
//!    the 1:3 character device); read-only paths are rebound read-only.
//!    In user-namespace mode (see the `userns` module) each image layer is
//!    first bound onto itself through an idmapped mount, the upper
//!    directory, /dev (and its nodes) and /dev/shm are given to the
//!    container's root, and its own network gets
//!    `ip_unprivileged_port_start` 0;
//! 4. hostname, loopback up;
//! 5. pivot_root(".", ".") then a lazy unmount of the old root;
//! 6. workdir: created, entered, and rejected if it lands on procfs or
//!    outside the root (getcwd says "(unreachable)"; CVE-2024-21626 leaked a
//!    host directory through the workdir);
//! 7. read-only root, in user-namespace mode setns into the namespace (an
//!    exec: into its container's, after the other namespaces), rlimits,
//!    bounding set, groups/gid/uid (raw syscalls:
//!    glibc's wrappers broadcast to threads that do not exist in this child),
//!    capabilities, ambient set, no_new_privs;
//! 8. every descriptor above 2 marked close-on-exec (close_range), seccomp
//!    filter installed last, then execve through the container's PATH.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::capabilities::CapabilitySet;
use super::spec::{ContainerSpec, Rlimit};
use super::sys;

/// The setup steps of a container's process, in order. Each names what failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SetupStep {
    /// Moving stdin/stdout/stderr into place.
    Stdio = 1,
    /// Joining the container's cgroup (v1).
    CgroupAttach,
    /// Creating the cgroup namespace.
    CgroupNamespace,
    /// Starting a new session.
    Session,
    /// Making mount propagation private.
    MountPropagation,
    /// Mounting the in-memory scratch layer.
    Scratch,
    /// Mounting the root filesystem.
    RootMount,
    /// A mount target inside the root is missing, a symlink or not a directory.
    MountTarget,
    /// Mounting /proc.
    MountProc,
    /// Mounting /dev.
    MountDev,
    /// Creating the device nodes.
    DeviceNodes,
    /// Mounting /dev/pts.
    MountDevPts,
    /// Mounting /dev/shm.
    MountShm,
    /// Mounting /dev/mqueue.
    MountMqueue,
    /// Mounting /sys.
    MountSys,
    /// Opening and checking the host's /dev/null.
    DevNull,
    /// Masking a path.
    MaskPath,
    /// Making a path read-only.
    ReadonlyPath,
    /// Setting the host name.
    Hostname,
    /// Bringing `lo` up.
    Loopback,
    /// pivot_root into the container root.
    PivotRoot,
    /// Detaching the old root.
    DetachOldRoot,
    /// Creating or entering the working directory.
    Workdir,
    /// The working directory resolved onto procfs.
    WorkdirOnProc,
    /// Remounting the root read-only.
    ReadonlyRoot,
    /// setrlimit.
    Rlimits,
    /// Dropping the capability bounding set.
    BoundingSet,
    /// setgroups.
    Groups,
    /// setresgid.
    Gid,
    /// setresuid.
    Uid,
    /// capset.
    Capabilities,
    /// The ambient capability set.
    AmbientCapabilities,
    /// PR_SET_NO_NEW_PRIVS.
    NoNewPrivileges,
    /// Marking descriptors close-on-exec.
    CloseDescriptors,
    /// Installing the seccomp filter.
    Seccomp,
    /// The command is not in the image (or not on its PATH).
    CommandNotFound,
    /// The command exists but cannot be executed.
    CommandNotExecutable,
    /// execve failed for another reason.
    Exec,
    /// Joining a running container's namespaces (exec).
    JoinNamespaces,
    /// Asking to be killed with the shim (long-running containers).
    ParentDeathSignal,
    /// Creating a long-running container's first process from its shim.
    ShimClone,
    /// Executing the shim of a long-running container.
    ShimExec,
    /// Handing the scratch and /dev/shm descriptors to the runtime.
    ReportFilesystems,
    /// Presenting the image's files through the user namespace's id mapping.
    IdmapLayers,
    /// Giving the container's root its files (user-namespace mode).
    Ownership,
    /// Letting the container's root bind ports below 1024 in its network.
    UnprivilegedPorts,
    /// Entering the user namespace.
    UserNamespace,
    /// Moving the disk layer's filesystem into place.
    DiskScratch,
}

impl SetupStep {
    const ALL: &'static [SetupStep] = &[
        SetupStep::Stdio,
        SetupStep::CgroupAttach,
        SetupStep::CgroupNamespace,
        SetupStep::Session,
        SetupStep::MountPropagation,
        SetupStep::Scratch,
        SetupStep::RootMount,
        SetupStep::MountTarget,
        SetupStep::MountProc,
        SetupStep::MountDev,
        SetupStep::DeviceNodes,
        SetupStep::MountDevPts,
        SetupStep::MountShm,
        SetupStep::MountMqueue,
        SetupStep::MountSys,
        SetupStep::DevNull,
        SetupStep::MaskPath,
        SetupStep::ReadonlyPath,
        SetupStep::Hostname,
        SetupStep::Loopback,
        SetupStep::PivotRoot,
        SetupStep::DetachOldRoot,
        SetupStep::Workdir,
        SetupStep::WorkdirOnProc,
        SetupStep::ReadonlyRoot,
        SetupStep::Rlimits,
        SetupStep::BoundingSet,
        SetupStep::Groups,
        SetupStep::Gid,
        SetupStep::Uid,
        SetupStep::Capabilities,
        SetupStep::AmbientCapabilities,
        SetupStep::NoNewPrivileges,
        SetupStep::CloseDescriptors,
        SetupStep::Seccomp,
        SetupStep::CommandNotFound,
        SetupStep::CommandNotExecutable,
        SetupStep::Exec,
        SetupStep::JoinNamespaces,
        SetupStep::ParentDeathSignal,
        SetupStep::ShimClone,
        SetupStep::ShimExec,
        SetupStep::ReportFilesystems,
        SetupStep::IdmapLayers,
        SetupStep::Ownership,
        SetupStep::UnprivilegedPorts,
        SetupStep::UserNamespace,
        SetupStep::DiskScratch,
    ];

    /// Decode a step number from the report pipe.
    pub(super) fn from_code(code: u32) -> Option<SetupStep> {
        SetupStep::ALL.iter().copied().find(|step| *step as u32 == code)
    }

    /// What the step does, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            SetupStep::Stdio => "setting up stdin/stdout/stderr",
            SetupStep::CgroupAttach => "joining the container cgroup",
            SetupStep::CgroupNamespace => "creating the cgroup namespace",
            SetupStep::Session => "starting a new session",
            SetupStep::MountPropagation => "making mounts private",
            SetupStep::Scratch => "mounting the in-memory scratch layer",
            SetupStep::RootMount => "mounting the root filesystem",
            SetupStep::MountTarget => {
                "opening a mount target in the image (is /proc, /dev or /sys a symlink or a file?)"
            }
            SetupStep::MountProc => "mounting /proc",
            SetupStep::MountDev => "mounting /dev",
            SetupStep::DeviceNodes => "creating device nodes in /dev",
            SetupStep::MountDevPts => "mounting /dev/pts",
            SetupStep::MountShm => "mounting /dev/shm",
            SetupStep::MountMqueue => "mounting /dev/mqueue",
            SetupStep::MountSys => "mounting /sys",
            SetupStep::DevNull => "checking the host /dev/null",
            SetupStep::MaskPath => "masking a /proc or /sys path",
            SetupStep::ReadonlyPath => "making a /proc path read-only",
            SetupStep::Hostname => "setting the hostname",
            SetupStep::Loopback => "bringing up the loopback interface",
            SetupStep::PivotRoot => "pivot_root into the container root",
            SetupStep::DetachOldRoot => "detaching the host root",
            SetupStep::Workdir => "creating or entering the working directory",
            SetupStep::WorkdirOnProc => "checking the working directory (it resolves onto /proc)",
            SetupStep::ReadonlyRoot => "making the root read-only",
            SetupStep::Rlimits => "setting rlimits",
            SetupStep::BoundingSet => "dropping the capability bounding set",
            SetupStep::Groups => "setting supplementary groups",
            SetupStep::Gid => "setting the group id",
            SetupStep::Uid => "setting the user id",
            SetupStep::Capabilities => "setting capabilities",
            SetupStep::AmbientCapabilities => "setting ambient capabilities",
            SetupStep::NoNewPrivileges => "setting no_new_privs",
            SetupStep::CloseDescriptors => "closing inherited descriptors",
            SetupStep::Seccomp => "installing the seccomp filter",
            SetupStep::CommandNotFound => "command not found in the container",
            SetupStep::CommandNotExecutable => "command is not executable",
            SetupStep::Exec => "executing the command",
            SetupStep::JoinNamespaces => "joining the running container's namespaces",
            SetupStep::ParentDeathSignal => "setting the parent death signal",
            SetupStep::ShimClone => "creating the container process from its shim",
            SetupStep::ShimExec => "executing the container's shim (quilt-shim)",
            SetupStep::ReportFilesystems => "handing the scratch and /dev/shm descriptors to Quilt",
            SetupStep::IdmapLayers => {
                "mapping the image's file owners into the user namespace (idmapped mounts need Linux 5.12+ \
                 and a filesystem that supports them: ext4, xfs, btrfs, tmpfs)"
            }
            SetupStep::Ownership => "giving the container's root its directories (user-namespace mode)",
            SetupStep::UnprivilegedPorts => "setting the container network's ip_unprivileged_port_start",
            SetupStep::UserNamespace => "entering the user namespace",
            SetupStep::DiskScratch => "moving the disk layer's filesystem into place",
        }
    }
}

/// The report the child writes on failure: step and errno, native endian.
pub(super) const REPORT_SIZE: usize = 8;

/// The message that carries the container's in-memory filesystems to the
/// runtime: this tag, then whether a scratch tmpfs descriptor and whether a
/// /dev/shm descriptor follow (1 or 0 each), in that order in `SCM_RIGHTS`.
/// Its length (4) tells it apart from a failure report ([`REPORT_SIZE`]).
pub(super) const FILESYSTEMS_TAG: [u8; 2] = *b"FS";
/// Length of the filesystems message.
pub(super) const FILESYSTEMS_MESSAGE_SIZE: usize = 4;

/// How the root filesystem gets mounted.
pub(super) enum RootPlan {
    /// overlayfs: the layers read-only, a private upper directory; with
    /// `memory_scratch`, upper and work directories live on a tmpfs that
    /// exists only in the container's mount namespace.
    ///
    /// Mounted with mount(2) rather than fsconfig, whose string values are
    /// capped at 256 bytes; the layers are named relative to `layer_dir` (their
    /// common parent, entered first) so that a page of options holds dozens.
    Overlay {
        options: CString,
        layer_dir: Option<CString>,
        memory_scratch: Option<MemoryScratch>,
        disk_scratch: Option<DiskScratch>,
    },
    /// A read-only bind of a single directory (a read-only root of several
    /// layers is an overlay without `upper`).
    ReadOnlyBind { source: CString },
    /// No root of its own: an exec joins the mount, UTS, IPC, network and
    /// cgroup namespaces of a running container's first process (given by
    /// its pidfd); the pid namespace was joined at clone time.
    Join { pidfd: RawFd },
}

/// A tmpfs for the writable layer, mounted at `mount_point` inside the
/// container's (private) mount namespace only.
pub(super) struct MemoryScratch {
    size: CString,
    /// `nr_inodes`: see [`super::spec::scratch_inodes`].
    inodes: CString,
    mount_point: CString,
}

/// A disk layer's ext4 filesystem (see the `disk_layer` module), mounted
/// by the runtime (the setup process, in the container's cgroup, may not
/// open block devices) and moved to `mount_point` inside the container's
/// mount namespace only.
pub(super) struct DiskScratch {
    /// The detached mount (from fsmount), set once it is made.
    mount: RawFd,
    mount_point: CString,
}

/// Everything the child needs, prepared before clone.
pub(super) struct ChildPlan {
    pub(super) stdin: RawFd,
    pub(super) stdout: RawFd,
    pub(super) stderr: RawFd,
    pub(super) report: RawFd,
    pub(super) cgroup_tasks: Vec<RawFd>,
    pub(super) root: RootPlan,
    pub(super) root_target: CString,
    pub(super) read_only_root: bool,
    pub(super) shm_size: CString,
    /// `nr_inodes` of /dev/shm ([`super::spec::SHM_INODES`]).
    pub(super) shm_inodes: CString,
    pub(super) hostname: CString,
    pub(super) loopback: bool,
    pub(super) workdir: CString,
    pub(super) rlimits: Vec<Rlimit>,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) groups: Vec<libc::gid_t>,
    pub(super) capabilities: CapabilitySet,
    pub(super) last_capability: u32,
    pub(super) seccomp: libc::sock_fprog,
    pub(super) program: CString,
    pub(super) search_path: CString,
    pub(super) argv: Vec<*const libc::c_char>,
    pub(super) envp: Vec<*const libc::c_char>,
    /// SIGKILL this process when its parent dies (a long-running
    /// container's first process, whose parent is its shim: without the
    /// shim nobody could record how it ended).
    pub(super) die_with_parent: bool,
    /// Send an `O_PATH` descriptor of the scratch tmpfs root (when there is
    /// one) and of /dev/shm's to the runtime over `report`, which must then
    /// be a `SOCK_SEQPACKET` socket (a [`FILESYSTEMS_TAG`] message), as soon
    /// as both are mounted: long before exec, so the command never holds
    /// anything it could swap in. Off for a report pipe (long-running
    /// containers) and for execs, which mount nothing.
    pub(super) report_filesystems: bool,
    /// User-namespace mode (see the `userns` module); `None` runs the
    /// container in the host's user namespace.
    pub(super) user_namespace: Option<UsernsPlan>,
    /// Owns the strings `argv` and `envp` point into.
    _strings: Vec<CString>,
}

/// What the setup process does differently in user-namespace mode.
pub(super) struct UsernsPlan {
    /// The namespace to enter; `None` for an exec, which enters the one of
    /// the container it joins (through the `Join` pidfd).
    pub(super) fd: Option<RawFd>,
    /// Host uid and gid of the container's root: the owner given to the
    /// writable layer's top, /dev, /dev/shm and a created workdir.
    pub(super) root_uid: u32,
    pub(super) root_gid: u32,
    /// Absolute directories of the image layers, each bound onto itself
    /// through an idmapped mount before the overlay is made of them.
    pub(super) layers: Vec<CString>,
}

impl UsernsPlan {
    /// The plan for `range`'s namespace `fd` (or the joined container's,
    /// with `None`) and the spec's layers.
    pub(super) fn new(fd: Option<RawFd>, range: super::userns::IdRange, spec: &ContainerSpec) -> UsernsPlan {
        UsernsPlan {
            fd,
            root_uid: range.host_id(0),
            root_gid: range.host_id(0),
            layers: spec.root.layers.iter().map(|layer| c_path(layer)).collect(),
        }
    }
}

/// Descriptors the plan refers to, by role.
pub(super) struct ChildDescriptors {
    pub(super) stdin: RawFd,
    pub(super) stdout: RawFd,
    pub(super) stderr: RawFd,
    pub(super) report: RawFd,
    pub(super) cgroup_tasks: Vec<RawFd>,
}

/// Paths the runtime owns for one container.
pub(super) struct RootPaths {
    /// Where the root gets mounted before pivot_root.
    pub(super) target: std::path::PathBuf,
    /// overlayfs upper directory.
    pub(super) upper: std::path::PathBuf,
    /// overlayfs work directory.
    pub(super) work: std::path::PathBuf,
    /// For in-memory scratch: the directory the tmpfs covers (inside the
    /// container's mount namespace) and its size in bytes; `upper`, `work`
    /// and `target` are then directories on that tmpfs.
    pub(super) memory_scratch: Option<(std::path::PathBuf, u64)>,
    /// For a disk layer of its own filesystem: where it is mounted (inside
    /// the container's mount namespace); `upper` and `work` are on it.
    pub(super) disk_scratch: Option<std::path::PathBuf>,
}

fn c_string(text: impl Into<Vec<u8>>) -> CString {
    // Specs are validated to hold no NUL; a NUL here would be a bug upstream,
    // and an empty string is the harmless fallback.
    CString::new(text).unwrap_or_default()
}

fn c_path(path: &std::path::Path) -> CString {
    use std::os::unix::ffi::OsStrExt;
    c_string(path.as_os_str().as_bytes())
}

impl ChildPlan {
    /// The disk layer's detached mount, once made.
    pub(super) fn set_disk_mount(&mut self, mount: RawFd) {
        if let RootPlan::Overlay { disk_scratch: Some(disk), .. } = &mut self.root {
            disk.mount = mount;
        }
    }

    /// Turn a validated spec into the child's plan.
    pub(super) fn prepare(
        spec: &ContainerSpec,
        paths: &RootPaths,
        descriptors: ChildDescriptors,
        seccomp: libc::sock_fprog,
        last_capability: u32,
    ) -> ChildPlan {
        let root = if spec.root.read_only && spec.root.layers.len() == 1 {
            RootPlan::ReadOnlyBind { source: c_path(&spec.root.layers[0]) }
        } else {
            let (options, layer_dir) = overlay_options(spec, paths);
            RootPlan::Overlay {
                options: c_string(options),
                layer_dir: layer_dir.map(|dir| c_path(&dir)),
                memory_scratch: paths.memory_scratch.as_ref().map(|(mount_point, size)| MemoryScratch {
                    size: c_string(size.to_string()),
                    inodes: c_string(super::spec::scratch_inodes(*size).to_string()),
                    mount_point: c_path(mount_point),
                }),
                disk_scratch: paths
                    .disk_scratch
                    .as_ref()
                    .map(|mount_point| DiskScratch { mount: -1, mount_point: c_path(mount_point) }),
            }
        };
        let env = spec.effective_env();
        let search_path =
            env.iter().find(|(name, _)| name == "PATH").map(|(_, value)| value.clone()).unwrap_or_default();
        let mut strings: Vec<CString> = Vec::with_capacity(spec.command.len() + env.len());
        for argument in &spec.command {
            strings.push(c_string(argument.as_bytes()));
        }
        for (name, value) in &env {
            strings.push(c_string(format!("{name}={value}")));
        }
        let (argument_strings, env_strings) = strings.split_at(spec.command.len());
        let mut argv: Vec<*const libc::c_char> = argument_strings.iter().map(|s| s.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = env_strings.iter().map(|s| s.as_ptr()).collect();
        envp.push(std::ptr::null());
        ChildPlan {
            stdin: descriptors.stdin,
            stdout: descriptors.stdout,
            stderr: descriptors.stderr,
            report: descriptors.report,
            cgroup_tasks: descriptors.cgroup_tasks,
            root,
            root_target: c_path(&paths.target),
            read_only_root: spec.root.read_only,
            shm_size: c_string(format!("{}", spec.limits.shm_bytes)),
            shm_inodes: c_string(super::spec::SHM_INODES.to_string()),
            hostname: c_string(spec.hostname.as_bytes()),
            loopback: spec.network == super::spec::NetworkMode::None,
            workdir: c_string(spec.workdir.as_bytes()),
            rlimits: spec.rlimits.clone(),
            uid: spec.user.uid,
            gid: spec.user.gid,
            groups: spec.user.additional_gids.clone(),
            capabilities: spec.capabilities,
            last_capability,
            seccomp,
            program: c_string(spec.command[0].as_bytes()),
            search_path: c_string(search_path),
            argv,
            envp,
            die_with_parent: false,
            report_filesystems: false,
            user_namespace: None,
            _strings: strings,
        }
    }
}

/// The container's first process, as seen from the runtime.
pub(super) struct Spawned {
    /// Host pid.
    pub(super) pid: libc::pid_t,
    /// Its pidfd (close-on-exec).
    pub(super) pidfd: OwnedFd,
}

/// Stack of a vfork-style child: the setup script's frames are small (no
/// buffers, no recursion); the guard page below catches a mistake.
pub(super) const CHILD_STACK_SIZE: usize = 256 * 1024;

/// Clones the container's first process into fresh `namespaces`; the child
/// runs [`run`] with `plan` and never returns here.
///
/// Without a cgroup v2 directory (cgroup v1, where the child attaches itself)
/// the child shares our address space and we wait until it has exec'd or
/// exited (`CLONE_VM | CLONE_VFORK`, as posix_spawn does). A fork-style clone
/// of this multi-threaded process would copy and write-protect its page
/// tables and flush the TLB of every CPU running one of its threads: that
/// was the largest cost of a task at full load. On cgroup v2, clone3's
/// `CLONE_INTO_CGROUP` puts the child straight into its cgroup, which only
/// clone3 offers, and clone3 cannot start a child on a new stack without
/// assembly, so that path keeps fork semantics.
pub(super) fn spawn(plan: &ChildPlan, namespaces: u64, cgroup_dir: Option<RawFd>) -> Result<Spawned, Errno> {
    match cgroup_dir {
        None => spawn_sharing_memory(plan, namespaces),
        Some(dir) => spawn_forked(plan, namespaces, Some(dir)),
    }
}

extern "C" fn child_entry(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `spawn_sharing_memory` passes a pointer to a plan that stays
    // alive (its caller is suspended by CLONE_VFORK) until we exec or exit.
    unsafe { run(&*(plan as *const ChildPlan)) }
}

fn spawn_sharing_memory(plan: &ChildPlan, namespaces: u64) -> Result<Spawned, Errno> {
    let namespaces = libc::c_int::try_from(namespaces).map_err(|_| Errno::EINVAL)?;
    spawn_vfork(child_entry, plan as *const ChildPlan as *mut libc::c_void, namespaces)
}

/// clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD) of `entry(argument)` on a
/// fresh guarded stack, into `namespaces`.
fn spawn_vfork(
    entry: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    argument: *mut libc::c_void,
    namespaces: libc::c_int,
) -> Result<Spawned, Errno> {
    let stack = sys::ChildStack::new(CHILD_STACK_SIZE)?;
    let flags =
        namespaces | libc::CLONE_VM | libc::CLONE_VFORK | sys::CLONE_PIDFD as libc::c_int | libc::SIGCHLD;
    let mut pidfd: libc::c_int = -1;
    // Every signal blocked while the child shares our memory: a handler of
    // ours (tokio's, which writes to the runtime's pipe) must not run in it
    // before its `reset_signals` step restores defaults and unblocks.
    // SAFETY: sigset_t is plain data that sigfillset initialises.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigset pointers; this thread's mask only.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
    }
    // SAFETY: the child runs `entry` on its own stack with `argument` (a
    // plan or a shim launch), making only async-signal-safe calls on memory
    // that argument owns; this
    // thread is suspended until the child has exec'd or exited, so the plan
    // and the stack outlive the child's use of them. CLONE_PIDFD stores a
    // new descriptor in `pidfd` (the parent_tid argument).
    let pid = unsafe { libc::clone(entry, stack.top(), flags, argument, &mut pidfd as *mut libc::c_int) };
    let error = Errno::last();
    // SAFETY: restoring this thread's own mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    drop(stack);
    if pid == -1 {
        return Err(error);
    }
    // SAFETY: clone with CLONE_PIDFD stored a new descriptor that we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Spawned { pid, pidfd })
}

fn spawn_forked(plan: &ChildPlan, namespaces: u64, cgroup_dir: Option<RawFd>) -> Result<Spawned, Errno> {
    let mut pidfd: libc::c_int = -1;
    let mut args = sys::CloneArgs {
        flags: namespaces | sys::CLONE_PIDFD,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(dir) = cgroup_dir {
        args.flags |= sys::CLONE_INTO_CGROUP;
        args.cgroup = dir as u64;
    }
    // SAFETY: the child runs only `run`, which is async-signal-safe and uses
    // nothing but the plan, prepared before the clone.
    let pid = unsafe { sys::clone3(&mut args) }?;
    if pid == 0 {
        // SAFETY: we are the child of clone3 without CLONE_VM; the plan's
        // pointers are valid in this copy of the address space.
        unsafe { run(plan) }
    }
    // SAFETY: clone3 with CLONE_PIDFD stored a new descriptor that we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Spawned { pid, pidfd })
}

/// Clones an exec's process into the pid namespace of a running container
/// (given by the pidfd of its first process); the child joins the other
/// namespaces itself (`RootPlan::Join`).
///
/// A pid namespace can only be entered by a new child: setns(CLONE_NEWPID)
/// changes which namespace this thread's next child is born in. The thread
/// switches, clones vfork-style and switches back to `own_pid_namespace`
/// before anything else can run on it. Failing to switch back would make
/// every later container of this thread nest inside that one, so it aborts.
pub(super) fn spawn_joined(
    plan: &ChildPlan,
    target_pidfd: RawFd,
    own_pid_namespace: RawFd,
) -> Result<Spawned, Errno> {
    sys::setns(target_pidfd, libc::CLONE_NEWPID)?;
    let spawned = spawn_sharing_memory(plan, 0);
    if let Err(errno) = sys::setns(own_pid_namespace, libc::CLONE_NEWPID) {
        tracing::error!(%errno, "cannot return to the worker's pid namespace after an exec; aborting");
        std::process::abort();
    }
    spawned
}

/// The launch of a long-running container: an intermediate process clones
/// the container's first process (so that it is the intermediate's child),
/// then execs the shim (`quilt-shim`), which from then on is that process's
/// parent: it copies its output into log files and records how it ended,
/// whether or not the worker is running.
///
/// The intermediate shares our memory (`CLONE_VM | CLONE_VFORK`) and, like
/// the container's setup process, makes only async-signal-safe calls on
/// what is prepared here. It keeps every signal blocked (a handler of ours
/// must not run in it); the shim unblocks them after exec.
pub(super) struct ShimLaunch<'a> {
    /// The container's first process.
    pub(super) plan: &'a ChildPlan,
    /// Namespaces of the container's first process.
    pub(super) namespaces: libc::c_int,
    /// The stack the intermediate clones the first process onto.
    pub(super) init_stack: sys::ChildStack,
    /// The shim's program, argv and envp.
    pub(super) program: CString,
    pub(super) argv: Vec<*const libc::c_char>,
    pub(super) envp: Vec<*const libc::c_char>,
    /// Become the shim's fd 4 (the container's merged stdout and stderr)
    /// and fd 5 (the hold pipe); the first process's pidfd becomes fd 3.
    pub(super) output: RawFd,
    pub(super) hold: RawFd,
    /// Become the shim's fds 0 and 1 (`/dev/null`) and 2 (its own log).
    pub(super) null: RawFd,
    pub(super) shim_log: RawFd,
    /// Written by the intermediate: the first process's pid, 0 if none.
    pub(super) init_pid: std::sync::atomic::AtomicI32,
}

extern "C" fn shim_entry(launch: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `spawn_with_shim` passes a launch that stays alive (its caller
    // is suspended by CLONE_VFORK) until we exec or exit.
    unsafe { shim_intermediate(&*(launch as *const ShimLaunch<'_>)) }
}

/// Where the long-running container's first process and its shim came from.
pub(super) struct ShimSpawned {
    /// The shim (the intermediate, after exec): our child.
    pub(super) shim: Spawned,
    /// The container's first process (the shim's child), 0 if it was not created.
    pub(super) init_pid: libc::pid_t,
}

/// Starts the intermediate of [`ShimLaunch`]; returns once it has exec'd
/// the shim or exited (a failure is then on the plan's report pipe).
pub(super) fn spawn_with_shim(launch: &ShimLaunch<'_>) -> Result<ShimSpawned, Errno> {
    let shim = spawn_vfork(shim_entry, launch as *const ShimLaunch<'_> as *mut libc::c_void, 0)?;
    let init_pid = launch.init_pid.load(std::sync::atomic::Ordering::SeqCst);
    Ok(ShimSpawned { shim, init_pid })
}

/// # Safety
/// Only in the intermediate of [`spawn_with_shim`], with a launch prepared
/// before the clone.
unsafe fn shim_intermediate(launch: &ShimLaunch<'_>) -> ! {
    let failure = match shim_steps(launch) {
        Ok(()) => (SetupStep::ShimExec, Errno::UnknownErrno),
        Err(failure) => failure,
    };
    let pid = launch.init_pid.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill with integers; the process is our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut report = [0u8; REPORT_SIZE];
    report[..4].copy_from_slice(&(failure.0 as u32).to_ne_bytes());
    report[4..].copy_from_slice(&(failure.1 as i32).to_ne_bytes());
    let _ = sys::write_all_raw(launch.plan.report, &report);
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(125) }
}

fn shim_steps(launch: &ShimLaunch<'_>) -> StepResult {
    let stack_top = launch.init_stack.top();
    let mut pidfd: libc::c_int = -1;
    let flags = launch.namespaces
        | libc::CLONE_VM
        | libc::CLONE_VFORK
        | sys::CLONE_PIDFD as libc::c_int
        | libc::SIGCHLD;
    // SAFETY: as in `spawn_vfork`: the child runs `child_entry` with the plan
    // on its own stack and we are suspended until it has exec'd or exited.
    let pid = unsafe {
        libc::clone(
            child_entry,
            stack_top,
            flags,
            launch.plan as *const ChildPlan as *mut libc::c_void,
            &mut pidfd as *mut libc::c_int,
        )
    };
    if pid == -1 {
        return Err((SetupStep::ShimClone, Errno::last()));
    }
    launch.init_pid.store(pid, std::sync::atomic::Ordering::SeqCst);
    // Lift the descriptors above the target numbers first so that no dup2
    // overwrites one still to be moved.
    let mut high = [0 as RawFd; 6];
    let sources = [launch.null, launch.null, launch.shim_log, pidfd, launch.output, launch.hold];
    for (slot, fd) in high.iter_mut().zip(sources) {
        // SAFETY: fcntl on descriptors this process holds.
        let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        errno_of(duplicate as libc::c_long).at(SetupStep::ShimExec)?;
        *slot = duplicate;
    }
    for (target, fd) in high.iter().enumerate() {
        // SAFETY: dup2 onto 0-5; the copies are not close-on-exec.
        errno_of(unsafe { libc::dup2(*fd, target as RawFd) } as libc::c_long).at(SetupStep::ShimExec)?;
    }
    // Its own session: a terminal's signals to the worker's process group
    // must not reach the shims of containers meant to outlive the worker.
    // SAFETY: setsid takes no arguments.
    errno_of(unsafe { libc::setsid() } as libc::c_long).at(SetupStep::Session)?;
    // SAFETY: argv and envp are NULL-terminated arrays of NUL-terminated
    // strings the launch owns.
    unsafe { libc::execve(launch.program.as_ptr(), launch.argv.as_ptr(), launch.envp.as_ptr()) };
    Err((SetupStep::ShimExec, Errno::last()))
}

/// Most bytes of overlay options one mount(2) takes (a page).
pub(super) const MAX_OVERLAY_OPTIONS: usize = 4095;

/// The overlay mount options for a spec, and the directory the lower layers
/// are named relative to (their common parent, when they have one).
pub(super) fn overlay_options(
    spec: &ContainerSpec,
    paths: &RootPaths,
) -> (String, Option<std::path::PathBuf>) {
    let layers = &spec.root.layers;
    let common = layers
        .first()
        .and_then(|first| first.parent())
        .filter(|parent| layers.iter().all(|layer| layer.parent() == Some(*parent)));
    let lower: Vec<String> = layers
        .iter()
        .map(|layer| match common {
            Some(_) => layer.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            None => layer.to_string_lossy().into_owned(),
        })
        .collect();
    let mut options = format!("lowerdir={}", lower.join(":"));
    if !spec.root.read_only {
        options.push_str(&format!(",upperdir={},workdir={}", paths.upper.display(), paths.work.display()));
    }
    (options, common.map(|dir| dir.to_path_buf()))
}

/// A failed step with its errno.
type StepResult = Result<(), (SetupStep, Errno)>;

trait At<T> {
    fn at(self, step: SetupStep) -> Result<T, (SetupStep, Errno)>;
}

impl<T> At<T> for Result<T, Errno> {
    fn at(self, step: SetupStep) -> Result<T, (SetupStep, Errno)> {
        self.map_err(|errno| (step, errno))
    }
}

fn errno_of(result: libc::c_long) -> Result<(), Errno> {
    if result < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// The child's entry point after clone3. Never returns.
///
/// # Safety
/// Must only be called in the child of a clone3 without CLONE_VM, with a
/// plan whose pointers are valid in this (copied) address space.
pub(super) unsafe fn run(plan: &ChildPlan) -> ! {
    let failure = match setup_and_exec(plan) {
        Ok(()) => (SetupStep::Exec, Errno::UnknownErrno),
        Err(failure) => failure,
    };
    let mut report = [0u8; REPORT_SIZE];
    report[..4].copy_from_slice(&(failure.0 as u32).to_ne_bytes());
    report[4..].copy_from_slice(&(failure.1 as i32).to_ne_bytes());
    // Nothing more can be done if the parent went away.
    let _ = sys::write_all_raw(plan.report, &report);
    let code = match failure.0 {
        SetupStep::CommandNotFound => 127,
        SetupStep::CommandNotExecutable => 126,
        _ => 125,
    };
    // SAFETY: _exit is async-signal-safe and skips atexit handlers and
    // destructors that belong to the parent's state.
    unsafe { libc::_exit(code) }
}

fn setup_and_exec(plan: &ChildPlan) -> StepResult {
    // SAFETY (all calls below): raw system calls on descriptors and C strings
    // the plan owns; none allocates or locks.
    stdio(plan)?;
    close_unneeded_descriptors(plan).at(SetupStep::CloseDescriptors)?;
    reset_signals();
    // SAFETY: prctl with integer arguments.
    errno_of(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } as libc::c_long)
        .at(SetupStep::Session)?;
    if plan.die_with_parent {
        // SAFETY: prctl with integer arguments. The parent (the shim's
        // intermediate process) is suspended by CLONE_VFORK until we exec,
        // so it cannot have died before this takes effect.
        errno_of(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } as libc::c_long)
            .at(SetupStep::ParentDeathSignal)?;
    }
    for fd in &plan.cgroup_tasks {
        sys::write_all_raw(*fd, b"0").at(SetupStep::CgroupAttach)?;
    }
    if let RootPlan::Join { pidfd } = plan.root {
        // setns(2) with a pidfd enters all the named namespaces at once (or
        // none); entering the mount namespace also moves root and working
        // directory to that namespace's root, the container's pivoted root.
        let namespaces = libc::CLONE_NEWNS
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWCGROUP;
        // SAFETY: setns with a descriptor and flags.
        errno_of(unsafe { libc::setns(pidfd, namespaces) } as libc::c_long).at(SetupStep::JoinNamespaces)?;
        // SAFETY: setsid takes no arguments.
        errno_of(unsafe { libc::setsid() } as libc::c_long).at(SetupStep::Session)?;
        workdir(plan)?;
        if plan.user_namespace.is_some() {
            // Last, separately: with the user namespace in the same call,
            // the kernel would check the right to enter the (host-owned)
            // mount namespace with the capabilities of the new one.
            sys::setns(pidfd, libc::CLONE_NEWUSER).at(SetupStep::UserNamespace)?;
        }
    } else {
        // SAFETY: unshare and setsid take plain integers.
        errno_of(unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } as libc::c_long)
            .at(SetupStep::CgroupNamespace)?;
        // SAFETY: as above.
        errno_of(unsafe { libc::setsid() } as libc::c_long).at(SetupStep::Session)?;
        // SAFETY: umask cannot fail. Device nodes and mount points get exact modes.
        unsafe { libc::umask(0) };
        mounts(plan)?;
        errno_of(
            // SAFETY: hostname is a valid buffer of the given length.
            unsafe { libc::sethostname(plan.hostname.as_ptr(), plan.hostname.as_bytes().len()) }
                as libc::c_long,
        )
        .at(SetupStep::Hostname)?;
        if plan.loopback {
            sys::loopback_up().at(SetupStep::Loopback)?;
        }
        workdir(plan)?;
        if plan.read_only_root {
            sys::mount_setattr(libc::AT_FDCWD, c"/", 0, sys::MOUNT_ATTR_RDONLY)
                .at(SetupStep::ReadonlyRoot)?;
        }
        if let Some(fd) = plan.user_namespace.as_ref().and_then(|userns| userns.fd) {
            // setns, not unshare: this child may share the runtime's memory
            // (vfork style), which unshare(CLONE_NEWUSER) refuses. It gains
            // every capability inside the namespace and none outside.
            sys::setns(fd, libc::CLONE_NEWUSER).at(SetupStep::UserNamespace)?;
        }
    }
    for rlimit in &plan.rlimits {
        let value = libc::rlimit { rlim_cur: rlimit.soft, rlim_max: rlimit.hard };
        // SAFETY: value is a valid rlimit.
        errno_of(unsafe { libc::setrlimit(rlimit.resource as _, &value) } as libc::c_long)
            .at(SetupStep::Rlimits)?;
    }
    identity(plan)?;
    // SAFETY: prctl with integer arguments.
    errno_of(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long)
        .at(SetupStep::NoNewPrivileges)?;
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o022) };
    sys::close_range(3, u32::MAX, sys::CLOSE_RANGE_CLOEXEC).at(SetupStep::CloseDescriptors)?;
    // SAFETY: seccomp reads the program the plan points at, which lives in
    // this address space until exec replaces it.
    errno_of(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &plan.seccomp as *const libc::sock_fprog,
        )
    })
    .at(SetupStep::Seccomp)?;
    exec(plan)
}

fn stdio(plan: &ChildPlan) -> StepResult {
    // Move the three descriptors above 2 first so that dup2 cannot clobber one
    // that happens to sit on 0-2 already.
    let mut high = [0 as RawFd; 3];
    for (slot, fd) in high.iter_mut().zip([plan.stdin, plan.stdout, plan.stderr]) {
        // SAFETY: fcntl on a descriptor the plan owns.
        let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        errno_of(duplicate as libc::c_long).at(SetupStep::Stdio)?;
        *slot = duplicate;
    }
    for (target, fd) in high.iter().enumerate() {
        // SAFETY: dup2 onto 0-2; the result is not close-on-exec.
        errno_of(unsafe { libc::dup2(*fd, target as RawFd) } as libc::c_long).at(SetupStep::Stdio)?;
    }
    Ok(())
}

/// Closes every descriptor above 2 that setup does not need, before anything
/// resolves a path the task chose. The child starts with a copy of all the
/// runtime's descriptors (image leases hold snapshot directories open, a v2
/// cgroup directory is open for `CLONE_INTO_CGROUP`, a parent may leak
/// more); close-on-exec only closes them at exec, and until then a workdir
/// or a `PATH` entry of `/dev/fd/N/..` walks out of the root through one
/// (the CVE-2024-21626 pattern). Kept: the report channel, the cgroup
/// `tasks` files, an exec's pidfd, and the disk layer's detached mount,
/// the only directory, which the root mount closes once it is in place. No
/// allocation: the kept numbers are sorted in a stack array and the gaps
/// between them closed with close_range(2).
fn close_unneeded_descriptors(plan: &ChildPlan) -> Result<(), Errno> {
    const MAX_KEPT: usize = 16;
    let mut kept = [0 as RawFd; MAX_KEPT];
    let mut count = 0;
    let join = match plan.root {
        RootPlan::Join { pidfd } => Some(pidfd),
        _ => None,
    };
    let user_namespace = plan.user_namespace.as_ref().and_then(|userns| userns.fd);
    let disk_mount = match &plan.root {
        RootPlan::Overlay { disk_scratch: Some(disk), .. } => Some(disk.mount),
        _ => None,
    };
    for fd in [plan.report]
        .into_iter()
        .chain(plan.cgroup_tasks.iter().copied())
        .chain(join)
        .chain(user_namespace)
        .chain(disk_mount)
    {
        if fd > 2 && count < MAX_KEPT {
            kept[count] = fd;
            count += 1;
        } else if fd > 2 {
            // More than the plan can hold: keep everything rather than
            // close one setup still needs (a bug upstream; setup fails
            // closed anyway on the workdir check).
            return Ok(());
        }
    }
    let kept = &mut kept[..count];
    kept.sort_unstable();
    let mut first: u32 = 3;
    for &fd in kept.iter() {
        let fd = fd as u32;
        if fd > first {
            sys::close_range(first, fd - 1, 0)?;
        }
        first = first.max(fd + 1);
    }
    sys::close_range(first, u32::MAX, 0)
}

fn reset_signals() {
    // SAFETY: an all-zero sigaction with SIG_DFL is valid; sigprocmask with an
    // empty set. Failures (SIGKILL, SIGSTOP, invalid numbers) are expected and
    // harmless.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        for signal in 1..libc::SIGRTMAX() {
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

const TARGET_RESOLVE: u64 = sys::RESOLVE_IN_ROOT | sys::RESOLVE_NO_SYMLINKS | sys::RESOLVE_NO_MAGICLINKS;

/// Open a directory inside the root to mount onto, creating it when missing.
fn mount_target(
    root: RawFd,
    path: &CStr,
    step: SetupStep,
) -> Result<std::os::fd::OwnedFd, (SetupStep, Errno)> {
    match sys::openat2(root, path, libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW, TARGET_RESOLVE) {
        Ok(fd) => Ok(fd),
        Err(Errno::ENOENT) => {
            // A single component relative to the root: mkdirat cannot follow
            // a symlink planted by the image.
            sys::mkdirat(root, path, 0o755).at(step)?;
            sys::openat2(root, path, libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW, TARGET_RESOLVE)
                .at(SetupStep::MountTarget)
        }
        Err(errno) => Err((SetupStep::MountTarget, errno)),
    }
}

/// A new filesystem, configured, mounted detached with `attributes`.
fn new_mount(
    fstype: &CStr,
    options: &[(&CStr, &CStr)],
    attributes: u64,
    step: SetupStep,
) -> Result<std::os::fd::OwnedFd, (SetupStep, Errno)> {
    let context = sys::fsopen(fstype).at(step)?;
    for (key, value) in options {
        sys::fsconfig_string(context.as_raw_fd(), key, value).at(step)?;
    }
    sys::fsconfig_create(context.as_raw_fd()).at(step)?;
    sys::fsmount(context.as_raw_fd(), attributes).at(step)
}

const NOSUID_NODEV_NOEXEC: u64 = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV | sys::MOUNT_ATTR_NOEXEC;

const MASKED_PATHS: &[&CStr] = &[
    c"proc/acpi",
    c"proc/asound",
    c"proc/kcore",
    c"proc/keys",
    c"proc/latency_stats",
    c"proc/timer_list",
    c"proc/timer_stats",
    c"proc/sched_debug",
    c"proc/scsi",
    c"sys/firmware",
    c"sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&CStr] = &[c"proc/bus", c"proc/fs", c"proc/irq", c"proc/sys", c"proc/sysrq-trigger"];

/// (name, major, minor) of the device nodes every container gets.
const DEVICES: &[(&CStr, u32, u32)] = &[
    (c"null", 1, 3),
    (c"zero", 1, 5),
    (c"full", 1, 7),
    (c"random", 1, 8),
    (c"urandom", 1, 9),
    (c"tty", 5, 0),
];

const DEVICE_LINKS: &[(&CStr, &CStr)] = &[
    (c"/proc/self/fd", c"fd"),
    (c"/proc/self/fd/0", c"stdin"),
    (c"/proc/self/fd/1", c"stdout"),
    (c"/proc/self/fd/2", c"stderr"),
    (c"pts/ptmx", c"ptmx"),
];

fn mounts(plan: &ChildPlan) -> StepResult {
    // SAFETY: mount with NULL source/type/data only changes propagation.
    errno_of(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } as libc::c_long)
    .at(SetupStep::MountPropagation)?;

    let mut scratch_root = None;
    let root = match &plan.root {
        RootPlan::Overlay { options, layer_dir, memory_scratch, disk_scratch } => {
            if let Some(scratch) = memory_scratch {
                let tmpfs = new_mount(
                    c"tmpfs",
                    &[(c"size", &scratch.size), (c"nr_inodes", &scratch.inodes), (c"mode", c"0755")],
                    sys::MOUNT_ATTR_NODEV,
                    SetupStep::Scratch,
                )?;
                for name in [c"upper", c"work", c"root"] {
                    sys::mkdirat(tmpfs.as_raw_fd(), name, 0o755).at(SetupStep::Scratch)?;
                }
                if let Some(userns) = &plan.user_namespace {
                    // The upper directory's owner is the owner of the root.
                    sys::chown_at(tmpfs.as_raw_fd(), c"upper", userns.root_uid, userns.root_gid)
                        .at(SetupStep::Ownership)?;
                }
                sys::move_mount_path(tmpfs.as_raw_fd(), &scratch.mount_point).at(SetupStep::Scratch)?;
                if plan.report_filesystems {
                    scratch_root = Some(filesystem_root(&tmpfs)?);
                }
            }
            if let Some(disk) = disk_scratch {
                sys::move_mount_path(disk.mount, &disk.mount_point).at(SetupStep::DiskScratch)?;
                // SAFETY: closing a descriptor nothing else in this process uses.
                errno_of(unsafe { libc::close(disk.mount) } as libc::c_long).at(SetupStep::DiskScratch)?;
            }
            if let Some(userns) = &plan.user_namespace {
                for layer in &userns.layers {
                    idmap_onto_itself(layer, userns)?;
                }
            }
            if let Some(dir) = layer_dir {
                // SAFETY: dir is NUL-terminated.
                errno_of(unsafe { libc::chdir(dir.as_ptr()) } as libc::c_long).at(SetupStep::RootMount)?;
            }
            // SAFETY: all strings are NUL-terminated; the target is a
            // runtime-owned directory in this private mount namespace.
            errno_of(unsafe {
                libc::mount(
                    c"overlay".as_ptr(),
                    plan.root_target.as_ptr(),
                    c"overlay".as_ptr(),
                    libc::MS_NODEV,
                    options.as_ptr().cast(),
                )
            } as libc::c_long)
            .at(SetupStep::RootMount)?;
            sys::openat2(libc::AT_FDCWD, &plan.root_target, libc::O_PATH | libc::O_DIRECTORY, 0)
                .at(SetupStep::RootMount)?
        }
        RootPlan::ReadOnlyBind { source } => {
            let tree =
                sys::open_tree(libc::AT_FDCWD, source, sys::OPEN_TREE_CLONE).at(SetupStep::RootMount)?;
            if let Some(userns) = &plan.user_namespace {
                sys::mount_setattr_idmap(tree.as_raw_fd(), userns_fd(userns)?).at(SetupStep::IdmapLayers)?;
            }
            sys::move_mount_path(tree.as_raw_fd(), &plan.root_target).at(SetupStep::RootMount)?;
            tree
        }
        // An exec joins the container's mounts instead (see `setup_and_exec`).
        RootPlan::Join { .. } => return Err((SetupStep::RootMount, Errno::EINVAL)),
    };
    let root_fd = root.as_raw_fd();

    let proc_target = mount_target(root_fd, c"proc", SetupStep::MountProc)?;
    let proc_mount = new_mount(c"proc", &[], NOSUID_NODEV_NOEXEC, SetupStep::MountProc)?;
    if plan.user_namespace.is_some() && plan.loopback {
        // The container's network namespace belongs to the host's user
        // namespace, where its root has no CAP_NET_BIND_SERVICE; as in
        // rootless Podman, let everyone bind low ports in that network.
        let knob = sys::openat2(
            proc_mount.as_raw_fd(),
            c"sys/net/ipv4/ip_unprivileged_port_start",
            libc::O_WRONLY | libc::O_CLOEXEC,
            TARGET_RESOLVE,
        )
        .at(SetupStep::UnprivilegedPorts)?;
        sys::write_all_raw(knob.as_raw_fd(), b"0").at(SetupStep::UnprivilegedPorts)?;
    }
    sys::move_mount_fd(proc_mount.as_raw_fd(), proc_target.as_raw_fd()).at(SetupStep::MountProc)?;

    let dev_target = mount_target(root_fd, c"dev", SetupStep::MountDev)?;
    let dev = new_mount(
        c"tmpfs",
        &[(c"mode", c"755"), (c"size", c"65536k")],
        sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NOEXEC,
        SetupStep::MountDev,
    )?;
    let dev_fd = dev.as_raw_fd();
    for (name, major, minor) in DEVICES {
        // SAFETY: name is a single component inside the tmpfs we just made.
        errno_of(unsafe {
            libc::mknodat(dev_fd, name.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(*major, *minor))
        } as libc::c_long)
        .at(SetupStep::DeviceNodes)?;
    }
    for (target, name) in DEVICE_LINKS {
        // SAFETY: as above; the link text is only ever resolved inside the container.
        errno_of(unsafe { libc::symlinkat(target.as_ptr(), dev_fd, name.as_ptr()) } as libc::c_long)
            .at(SetupStep::DeviceNodes)?;
    }
    for (name, mode) in [(c"pts", 0o755), (c"shm", 0o1777), (c"mqueue", 0o755)] {
        sys::mkdirat(dev_fd, name, mode).at(SetupStep::DeviceNodes)?;
    }
    if let Some(userns) = &plan.user_namespace {
        let names = DEVICES.iter().map(|(name, _, _)| *name).chain([c"", c"pts", c"shm", c"mqueue"]);
        for name in names {
            sys::chown_at(dev_fd, name, userns.root_uid, userns.root_gid).at(SetupStep::Ownership)?;
        }
    }
    sys::move_mount_fd(dev_fd, dev_target.as_raw_fd()).at(SetupStep::MountDev)?;

    let pts_target = sys::openat2(dev_fd, c"pts", libc::O_PATH | libc::O_DIRECTORY, TARGET_RESOLVE)
        .at(SetupStep::MountDevPts)?;
    let pts = new_mount(
        c"devpts",
        &[(c"ptmxmode", c"0666"), (c"mode", c"0620")],
        sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NOEXEC,
        SetupStep::MountDevPts,
    )?;
    sys::move_mount_fd(pts.as_raw_fd(), pts_target.as_raw_fd()).at(SetupStep::MountDevPts)?;

    let shm_target = sys::openat2(dev_fd, c"shm", libc::O_PATH | libc::O_DIRECTORY, TARGET_RESOLVE)
        .at(SetupStep::MountShm)?;
    let shm = new_mount(
        c"tmpfs",
        &[(c"mode", c"1777"), (c"size", &plan.shm_size), (c"nr_inodes", &plan.shm_inodes)],
        NOSUID_NODEV_NOEXEC,
        SetupStep::MountShm,
    )?;
    if let Some(userns) = &plan.user_namespace {
        sys::chown_at(shm.as_raw_fd(), c"", userns.root_uid, userns.root_gid).at(SetupStep::Ownership)?;
    }
    sys::move_mount_fd(shm.as_raw_fd(), shm_target.as_raw_fd()).at(SetupStep::MountShm)?;
    if plan.report_filesystems {
        let shm_root = filesystem_root(&shm)?;
        let mut message = [0u8; FILESYSTEMS_MESSAGE_SIZE];
        message[..2].copy_from_slice(&FILESYSTEMS_TAG);
        message[2] = u8::from(scratch_root.is_some());
        message[3] = 1;
        let mut descriptors = [shm_root.as_raw_fd(); 2];
        let count = match &scratch_root {
            Some(scratch) => {
                descriptors[0] = scratch.as_raw_fd();
                2
            }
            None => 1,
        };
        sys::send_with_descriptors(plan.report, &message, &descriptors[..count])
            .at(SetupStep::ReportFilesystems)?;
    }

    let mqueue_target = sys::openat2(dev_fd, c"mqueue", libc::O_PATH | libc::O_DIRECTORY, TARGET_RESOLVE)
        .at(SetupStep::MountMqueue)?;
    let mqueue = new_mount(c"mqueue", &[], NOSUID_NODEV_NOEXEC, SetupStep::MountMqueue)?;
    sys::move_mount_fd(mqueue.as_raw_fd(), mqueue_target.as_raw_fd()).at(SetupStep::MountMqueue)?;

    let sys_target = mount_target(root_fd, c"sys", SetupStep::MountSys)?;
    let sysfs = new_mount(c"sysfs", &[], sys::MOUNT_ATTR_RDONLY | NOSUID_NODEV_NOEXEC, SetupStep::MountSys)?;
    sys::move_mount_fd(sysfs.as_raw_fd(), sys_target.as_raw_fd()).at(SetupStep::MountSys)?;

    mask_paths(root_fd)?;
    readonly_paths(root_fd)?;

    // SAFETY: fchdir and pivot_root(".", ".") on the root mount; the old root
    // ends up stacked on top and is lazily detached right away.
    unsafe {
        errno_of(libc::fchdir(root_fd) as libc::c_long).at(SetupStep::PivotRoot)?;
        errno_of(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()))
            .at(SetupStep::PivotRoot)?;
        errno_of(libc::umount2(c".".as_ptr(), libc::MNT_DETACH) as libc::c_long)
            .at(SetupStep::DetachOldRoot)?;
        errno_of(libc::chdir(c"/".as_ptr()) as libc::c_long).at(SetupStep::DetachOldRoot)?;
    }
    Ok(())
}

/// Binds image layer directory `layer` onto itself through an idmapped
/// mount of the user namespace, in this private mount namespace only: the
/// overlay then sees image uid 0 as the container's root.
fn idmap_onto_itself(layer: &CStr, userns: &UsernsPlan) -> StepResult {
    let tree = sys::open_tree(libc::AT_FDCWD, layer, sys::OPEN_TREE_CLONE).at(SetupStep::IdmapLayers)?;
    sys::mount_setattr_idmap(tree.as_raw_fd(), userns_fd(userns)?).at(SetupStep::IdmapLayers)?;
    sys::move_mount_path(tree.as_raw_fd(), layer).at(SetupStep::IdmapLayers)
}

/// The namespace a container with a root of its own enters (only an exec
/// has none, and it mounts nothing).
fn userns_fd(userns: &UsernsPlan) -> Result<RawFd, (SetupStep, Errno)> {
    userns.fd.ok_or((SetupStep::IdmapLayers, Errno::EINVAL))
}

/// An `O_PATH` descriptor of the root of a freshly made mount, for the
/// runtime: fstatfs works on it, and unlike the `fsmount` descriptor it
/// carries no mount-ownership semantics across namespaces.
fn filesystem_root(mount: &OwnedFd) -> Result<OwnedFd, (SetupStep, Errno)> {
    sys::openat2(mount.as_raw_fd(), c".", libc::O_PATH | libc::O_DIRECTORY, TARGET_RESOLVE)
        .at(SetupStep::ReportFilesystems)
}

fn mask_paths(root: RawFd) -> StepResult {
    // The host's /dev/null, opened in this mount namespace, checked to be the
    // real 1:3 character device before it is bound over anything.
    let null =
        sys::openat2(libc::AT_FDCWD, c"/dev/null", libc::O_PATH | libc::O_NOFOLLOW, sys::RESOLVE_NO_SYMLINKS)
            .at(SetupStep::DevNull)?;
    let status = fstat(null.as_raw_fd()).at(SetupStep::DevNull)?;
    if status.st_mode & libc::S_IFMT != libc::S_IFCHR || status.st_rdev != libc::makedev(1, 3) {
        return Err((SetupStep::DevNull, Errno::ENODEV));
    }
    for path in MASKED_PATHS {
        let target = match sys::openat2(root, path, libc::O_PATH | libc::O_NOFOLLOW, TARGET_RESOLVE) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => continue,
            Err(errno) => return Err((SetupStep::MaskPath, errno)),
        };
        let kind = fstat(target.as_raw_fd()).at(SetupStep::MaskPath)?.st_mode & libc::S_IFMT;
        let cover = if kind == libc::S_IFDIR {
            new_mount(
                c"tmpfs",
                &[(c"size", c"4k")],
                sys::MOUNT_ATTR_RDONLY | NOSUID_NODEV_NOEXEC,
                SetupStep::MaskPath,
            )?
        } else {
            sys::open_tree(null.as_raw_fd(), c"", sys::OPEN_TREE_CLONE | libc::AT_EMPTY_PATH as u32)
                .at(SetupStep::MaskPath)?
        };
        sys::move_mount_fd(cover.as_raw_fd(), target.as_raw_fd()).at(SetupStep::MaskPath)?;
    }
    Ok(())
}

fn readonly_paths(root: RawFd) -> StepResult {
    for path in READONLY_PATHS {
        let target = match sys::openat2(root, path, libc::O_PATH | libc::O_NOFOLLOW, TARGET_RESOLVE) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => continue,
            Err(errno) => return Err((SetupStep::ReadonlyPath, errno)),
        };
        let tree = sys::open_tree(
            target.as_raw_fd(),
            c"",
            sys::OPEN_TREE_CLONE | (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as u32,
        )
        .at(SetupStep::ReadonlyPath)?;
        sys::mount_setattr(
            tree.as_raw_fd(),
            c"",
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            sys::MOUNT_ATTR_RDONLY | NOSUID_NODEV_NOEXEC,
        )
        .at(SetupStep::ReadonlyPath)?;
        sys::move_mount_fd(tree.as_raw_fd(), target.as_raw_fd()).at(SetupStep::ReadonlyPath)?;
    }
    Ok(())
}

fn fstat(fd: RawFd) -> Result<libc::stat, Errno> {
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut status: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: status is a valid out-pointer.
    errno_of(unsafe { libc::fstat(fd, &mut status) } as libc::c_long)?;
    Ok(status)
}

const PATH_BUFFER: usize = 4096;
const PROC_SUPER_MAGIC: libc::c_long = 0x9fa0;

fn workdir(plan: &ChildPlan) -> StepResult {
    let bytes = plan.workdir.as_bytes();
    if bytes.len() >= PATH_BUFFER {
        return Err((SetupStep::Workdir, Errno::ENAMETOOLONG));
    }
    // mkdir -p, one component at a time, in a stack buffer. After pivot_root
    // every path resolves inside the container, so symlinks in the image can
    // only point at other places inside it.
    let mut buffer = [0u8; PATH_BUFFER];
    buffer[..bytes.len()].copy_from_slice(bytes);
    for end in 1..=bytes.len() {
        if end == bytes.len() || bytes[end] == b'/' {
            let saved = buffer[end];
            buffer[end] = 0;
            // SAFETY: buffer is NUL-terminated at `end`.
            let result = unsafe { libc::mkdir(buffer.as_ptr().cast(), 0o755) };
            if result < 0 && Errno::last() != Errno::EEXIST {
                return Err((SetupStep::Workdir, Errno::last()));
            }
            if let (0, Some(userns)) = (result, &plan.user_namespace) {
                // Created by host root; owned, as without a user
                // namespace, by the container's root.
                // SAFETY: buffer is NUL-terminated at `end`.
                let name = unsafe { CStr::from_ptr(buffer.as_ptr().cast()) };
                sys::chown_at(libc::AT_FDCWD, name, userns.root_uid, userns.root_gid)
                    .at(SetupStep::Ownership)?;
            }
            buffer[end] = saved;
        }
    }
    // SAFETY: workdir is NUL-terminated.
    errno_of(unsafe { libc::chdir(plan.workdir.as_ptr()) } as libc::c_long).at(SetupStep::Workdir)?;
    // SAFETY: an all-zero statfs is a valid out-buffer.
    let mut status: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: status is a valid out-pointer.
    errno_of(unsafe { libc::statfs(c".".as_ptr(), &mut status) } as libc::c_long).at(SetupStep::Workdir)?;
    if status.f_type as libc::c_long == PROC_SUPER_MAGIC {
        return Err((SetupStep::WorkdirOnProc, Errno::EPERM));
    }
    // The working directory must be inside the root: for a directory it
    // cannot reach from its root, getcwd(2) answers "(unreachable)/..."
    // instead of an absolute path (runc's check for CVE-2024-21626).
    let mut cwd = [0u8; PATH_BUFFER];
    // SAFETY: cwd is a valid buffer of the given length.
    let length = unsafe { libc::syscall(libc::SYS_getcwd, cwd.as_mut_ptr(), cwd.len()) };
    errno_of(length).at(SetupStep::Workdir)?;
    if cwd[0] != b'/' {
        return Err((SetupStep::Workdir, Errno::EPERM));
    }
    Ok(())
}

fn identity(plan: &ChildPlan) -> StepResult {
    let caps = &plan.capabilities;
    for capability in 0..=plan.last_capability {
        if capability < 64 && caps.bounding & (1u64 << capability) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        errno_of(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability as libc::c_ulong, 0, 0, 0) }
            as libc::c_long)
        .at(SetupStep::BoundingSet)?;
    }
    // SAFETY: raw syscalls (not glibc's wrappers, which signal every thread the
    // parent had); groups is a valid array of the given length.
    unsafe {
        errno_of(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) as libc::c_long).at(SetupStep::Uid)?;
        errno_of(libc::syscall(libc::SYS_setgroups, plan.groups.len(), plan.groups.as_ptr()))
            .at(SetupStep::Groups)?;
        errno_of(libc::syscall(libc::SYS_setresgid, plan.gid, plan.gid, plan.gid)).at(SetupStep::Gid)?;
        errno_of(libc::syscall(libc::SYS_setresuid, plan.uid, plan.uid, plan.uid)).at(SetupStep::Uid)?;
        errno_of(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) as libc::c_long).at(SetupStep::Uid)?;
    }
    sys::capset(caps.effective, caps.permitted, caps.inheritable).at(SetupStep::Capabilities)?;
    // SAFETY: prctl with integer arguments.
    unsafe {
        errno_of(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) as libc::c_long)
            .at(SetupStep::AmbientCapabilities)?;
        for capability in 0..=plan.last_capability.min(63) {
            if caps.ambient & (1u64 << capability) != 0 {
                errno_of(libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE,
                    capability as libc::c_ulong,
                    0,
                    0,
                ) as libc::c_long)
                .at(SetupStep::AmbientCapabilities)?;
            }
        }
    }
    Ok(())
}

fn exec(plan: &ChildPlan) -> StepResult {
    let program = plan.program.as_bytes();
    // SAFETY (execve calls): argv and envp are NULL-terminated arrays of
    // pointers to NUL-terminated strings the plan owns.
    if program.contains(&b'/') {
        // SAFETY: see above.
        unsafe { libc::execve(plan.program.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
        return Err(exec_failure(Errno::last()));
    }
    let mut denied = false;
    let mut buffer = [0u8; PATH_BUFFER];
    for directory in plan.search_path.as_bytes().split(|b| *b == b':') {
        let directory: &[u8] = if directory.is_empty() { b"." } else { directory };
        let length = directory.len() + 1 + program.len();
        if length >= PATH_BUFFER {
            continue;
        }
        buffer[..directory.len()].copy_from_slice(directory);
        buffer[directory.len()] = b'/';
        buffer[directory.len() + 1..length].copy_from_slice(program);
        buffer[length] = 0;
        // SAFETY: see above; buffer is NUL-terminated at `length`.
        unsafe { libc::execve(buffer.as_ptr().cast(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
        match Errno::last() {
            Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::ENAMETOOLONG => {}
            Errno::EACCES => denied = true,
            other => return Err(exec_failure(other)),
        }
    }
    if denied {
        Err((SetupStep::CommandNotExecutable, Errno::EACCES))
    } else {
        Err((SetupStep::CommandNotFound, Errno::ENOENT))
    }
}

fn exec_failure(errno: Errno) -> (SetupStep, Errno) {
    match errno {
        Errno::ENOENT | Errno::ENOTDIR => (SetupStep::CommandNotFound, errno),
        Errno::EACCES | Errno::ENOEXEC => (SetupStep::CommandNotExecutable, errno),
        other => (SetupStep::Exec, other),
    }
}
